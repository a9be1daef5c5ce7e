/*
 * failalloc.h — allocation-failure injection for tests, SQLite's method:
 * count allocations and make the Nth one fail, for N = 1, 2, 3, ... until
 * a run completes without reaching N. Every run must end in success or a
 * clean error (MH_ENOMEM, an HTTP 5xx), never a crash, never a leak.
 *
 * How it hooks in: a build with `make FAILALLOC=1` (see the Makefile's
 * unit-failalloc target; it uses build-failalloc/ with ASan) compiles with
 * -DMH_FAILALLOC and links every binary with
 *   -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=strdup,
 *   --wrap=strndup,--wrap=mh_alloc,--wrap=mh_calloc,--wrap=mh_strndup,
 *   --wrap=mh_strdup,--wrap=mh_sprintf,--wrap=mh_arena_defer
 * so every call from the project's own object files goes through the
 * counters in src/core/failalloc.c. Not counted: allocations made inside
 * shared libraries (libuv, libpq, jansson, msgpack-c, libcurl, libcrypto,
 * libc's asprintf and friends), and calls between the arena functions
 * inside core.c itself (an arena's chunk malloc is counted). No
 * LD_PRELOAD, and nothing changes in a normal build: there the functions
 * below are inert stubs (mh_failalloc_enabled() is false).
 *
 * Modes. One-shot (the default): only the Nth allocation after arming
 * fails, later ones succeed — this exercises each recovery path on its
 * own and lets a server keep running. Persistent: the Nth and every later
 * allocation fail (memory exhausted for good) — this exercises cleanup
 * under pressure.
 *
 * Environment (read once, before the first counted allocation):
 *   MH_FAILALLOC_N=N        arm at start: fail the Nth allocation (0 or
 *                           unset: count only, never fail)
 *   MH_FAILALLOC_PERSIST=1  persistent mode
 *   MH_FAILALLOC_TRACE=1    print a stack trace of each injected failure
 *                           to stderr (under ASan: symbolised)
 *   MH_FAILALLOC_CTL=path   for long-running processes (the server): start
 *                           disarmed; SIGUSR2 reads "N [persist]" from
 *                           `path`, resets the counters and arms; SIGUSR1
 *                           disarms. Each signal writes one line to stderr:
 *                             "failalloc: armed seq=S n=N persist=P"
 *                             "failalloc: disarmed seq=S count=C failed=F"
 *                           where C is the number of allocations counted
 *                           since the arming and F the failures injected.
 * Counters are atomic: allocations on the libuv thread pool are counted
 * too (so a server's count is not exactly reproducible from run to run).
 */
#ifndef MH_FAILALLOC_H
#define MH_FAILALLOC_H

#include <stdbool.h>
#include <stdint.h>

/* True when this binary was built with the hook (FAILALLOC=1). */
bool mh_failalloc_enabled(void);

/* Resets both counters and arms: the nth counted allocation from now
 * (1-based) fails; with persist, every later one fails too. n == 0 counts
 * without failing. No-op when not enabled. Thread-safe. */
void mh_failalloc_arm(uint64_t n, bool persist);

/* Stops injecting (counters keep their values). Thread-safe. */
void mh_failalloc_disarm(void);

/* Allocations counted since the last arm (0 when not enabled). */
uint64_t mh_failalloc_count(void);

/* Failures injected since the last arm (0 when not enabled). */
uint64_t mh_failalloc_failed(void);

#endif
