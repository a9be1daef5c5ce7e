/*
 * failalloc.c — allocation-failure injection (see include/mh/failalloc.h).
 *
 * Role: in a FAILALLOC=1 build the linker sends every malloc/calloc/
 * realloc and arena allocation made by the project's objects here
 * (-Wl,--wrap=...). Each counted call bumps an atomic counter; the call
 * whose number equals the armed target (and, in persistent mode, every
 * later one) returns NULL / MH_ENOMEM instead of memory. In any other
 * build this file only provides inert stubs, so nothing links to the
 * __wrap_ symbols and the normal allocators are used untouched.
 *
 * Invariants:
 *  - Disarmed (the default without MH_FAILALLOC_N), nothing is counted
 *    and every call goes straight to the real allocator.
 *  - A failed realloc leaves its block untouched (C semantics), so callers
 *    see exactly what a real out-of-memory would give them.
 *  - The signal handlers only touch atomics and call async-signal-safe
 *    functions (open, read, close, write).
 */
#include "mh/failalloc.h"

#include "mh/core.h"

#ifndef MH_FAILALLOC

bool mh_failalloc_enabled(void) { return false; }
void mh_failalloc_arm(uint64_t n, bool persist)
{
    (void)n;
    (void)persist;
}
void mh_failalloc_disarm(void) {}
uint64_t mh_failalloc_count(void) { return 0; }
uint64_t mh_failalloc_failed(void) { return 0; }

#else /* MH_FAILALLOC */

#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/common_interface_defs.h>
#else
#include <execinfo.h>
#endif

/* The real functions, resolved by the linker's --wrap. */
void *__real_malloc(size_t n);
void *__real_calloc(size_t nmemb, size_t size);
void *__real_realloc(void *p, size_t n);
char *__real_strdup(const char *s);
char *__real_strndup(const char *s, size_t n);
void *__real_mh_alloc(mh_arena_t *a, size_t n);
void *__real_mh_calloc(mh_arena_t *a, size_t n);
char *__real_mh_strndup(mh_arena_t *a, const char *s, size_t n);
char *__real_mh_strdup(mh_arena_t *a, const char *s);
int __real_mh_arena_defer(mh_arena_t *a, void (*fn)(void *), void *arg);

static atomic_bool counting;      /* armed: count every call */
static atomic_uint_fast64_t target; /* 0 = never fail */
static atomic_bool persist;
static atomic_uint_fast64_t count, failed, seq;
static atomic_int init_state;     /* 0 not yet, 1 in progress, 2 done */
static bool trace;
static char ctl_path[512];
static _Thread_local bool in_trace;

static void arm(uint64_t n, bool p)
{
    /* Stop counting while the counters are reset so a concurrent thread
     * cannot be numbered against the old target. */
    atomic_store(&counting, false);
    atomic_store(&count, 0);
    atomic_store(&failed, 0);
    atomic_store(&target, n);
    atomic_store(&persist, p);
    atomic_fetch_add(&seq, 1);
    atomic_store(&counting, true);
}

/* ---------------------------------------------- signal control (server) */

/* Writes s and the decimal digits of the numbers into one line on fd 2
 * with a single write(2): async-signal-safe (no stdio, no malloc). */
static void sig_line(const char *what, const char *k1, uint64_t v1, const char *k2, uint64_t v2, const char *k3,
                     uint64_t v3, const char *k4, uint64_t v4)
{
    char buf[256];
    size_t n = 0;
    const char *keys[4] = {k1, k2, k3, k4};
    uint64_t vals[4] = {v1, v2, v3, v4};
    for (const char *p = "failalloc: "; *p;) buf[n++] = *p++;
    for (const char *p = what; *p && n < 64;) buf[n++] = *p++;
    for (int i = 0; i < 4; i++) {
        if (!keys[i]) continue;
        buf[n++] = ' ';
        for (const char *p = keys[i]; *p && n < 200;) buf[n++] = *p++;
        buf[n++] = '=';
        char d[24];
        int k = 0;
        uint64_t v = vals[i];
        do d[k++] = (char)('0' + v % 10); while ((v /= 10) && k < 24);
        while (k) buf[n++] = d[--k];
    }
    buf[n++] = '\n';
    ssize_t w = write(2, buf, n);
    (void)w;
}

static void on_arm_signal(int sig)
{
    (void)sig;
    int saved = errno;
    uint64_t n = 0;
    bool p = false;
    int fd = open(ctl_path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char buf[128];
        ssize_t r = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (r > 0) {
            buf[r] = 0;
            const char *c = buf;
            while (*c == ' ') c++;
            while (*c >= '0' && *c <= '9') n = n * 10 + (uint64_t)(*c++ - '0');
            while (*c == ' ') c++;
            p = *c == 'p';
        }
    }
    arm(n, p);
    sig_line("armed", "seq", atomic_load(&seq), "n", n, "persist", p, NULL, 0);
    errno = saved;
}

static void on_disarm_signal(int sig)
{
    (void)sig;
    int saved = errno;
    atomic_store(&counting, false);
    sig_line("disarmed", "seq", atomic_load(&seq), "count", atomic_load(&count), "failed", atomic_load(&failed),
             NULL, 0);
    errno = saved;
}

/* ------------------------------------------------------------- set-up */

static uint64_t env_u64(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 10) : 0;
}

/* Reads the environment once. getenv, strtoull and sigaction do not
 * allocate, so this is safe inside the first counted allocation. */
static void init_once(void)
{
    int expect = 0;
    if (atomic_load(&init_state) == 2 || !atomic_compare_exchange_strong(&init_state, &expect, 1)) return;
    trace = env_u64("MH_FAILALLOC_TRACE") != 0;
    const char *ctl = getenv("MH_FAILALLOC_CTL");
    if (ctl && *ctl && strlen(ctl) < sizeof ctl_path) {
        memcpy(ctl_path, ctl, strlen(ctl) + 1);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESTART;
        sa.sa_handler = on_arm_signal;
        sigaction(SIGUSR2, &sa, NULL);
        sa.sa_handler = on_disarm_signal;
        sigaction(SIGUSR1, &sa, NULL);
    } else if (getenv("MH_FAILALLOC_N")) {
        arm(env_u64("MH_FAILALLOC_N"), env_u64("MH_FAILALLOC_PERSIST") != 0);
    }
    atomic_store(&init_state, 2);
}

/* Runs before main so a server is ready for signals before it serves. */
__attribute__((constructor)) static void failalloc_ctor(void) { init_once(); }

static void print_trace(uint64_t n)
{
    if (in_trace) return;
    in_trace = true;
    fprintf(stderr, "failalloc: injected failure at allocation %llu\n", (unsigned long long)n);
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_print_stack_trace();
#else
    void *frames[32];
    int k = backtrace(frames, 32);
    backtrace_symbols_fd(frames, k, 2);
#endif
    in_trace = false;
}

/* Counts one allocation; true when it must fail. */
static bool should_fail(void)
{
    if (atomic_load_explicit(&init_state, memory_order_acquire) != 2) init_once();
    if (!atomic_load_explicit(&counting, memory_order_relaxed) || in_trace) return false;
    uint64_t c = atomic_fetch_add(&count, 1) + 1;
    uint64_t t = atomic_load(&target);
    if (t == 0 || (c != t && !(c > t && atomic_load(&persist)))) return false;
    atomic_fetch_add(&failed, 1);
    if (trace) print_trace(c);
    return true;
}

/* ------------------------------------------------------------ the API */

bool mh_failalloc_enabled(void) { return true; }
void mh_failalloc_arm(uint64_t n, bool p)
{
    if (atomic_load(&init_state) != 2) init_once();
    arm(n, p);
}
void mh_failalloc_disarm(void) { atomic_store(&counting, false); }
uint64_t mh_failalloc_count(void) { return atomic_load(&count); }
uint64_t mh_failalloc_failed(void) { return atomic_load(&failed); }

/* ------------------------------------------------------------ wrappers */

/* The linker's --wrap targets (their prototypes are the real ones'). */
void *__wrap_malloc(size_t n) { return should_fail() ? NULL : __real_malloc(n); }

void *__wrap_calloc(size_t nmemb, size_t size) { return should_fail() ? NULL : __real_calloc(nmemb, size); }

void *__wrap_realloc(void *p, size_t n)
{
    /* realloc(p, 0) frees p in glibc: failing it would turn a free into a
     * leak no real allocator produces, so it is passed through uncounted. */
    if (p && n == 0) return __real_realloc(p, n);
    return should_fail() ? NULL : __real_realloc(p, n);
}

/* libc's strdup allocates inside libc, out of --wrap=malloc's reach. */
char *__wrap_strdup(const char *s) { return should_fail() ? NULL : __real_strdup(s); }

char *__wrap_strndup(const char *s, size_t n) { return should_fail() ? NULL : __real_strndup(s, n); }

void *__wrap_mh_alloc(mh_arena_t *a, size_t n) { return should_fail() ? NULL : __real_mh_alloc(a, n); }

void *__wrap_mh_calloc(mh_arena_t *a, size_t n) { return should_fail() ? NULL : __real_mh_calloc(a, n); }

char *__wrap_mh_strndup(mh_arena_t *a, const char *s, size_t n)
{
    return should_fail() ? NULL : __real_mh_strndup(a, s, n);
}

char *__wrap_mh_strdup(mh_arena_t *a, const char *s) { return should_fail() ? NULL : __real_mh_strdup(a, s); }

/* A variadic function cannot forward its arguments to __real_mh_sprintf:
 * core's mh_vsprintf takes them (its own mh_alloc call stays unwrapped:
 * --wrap only redirects calls between object files). */
char *__wrap_mh_sprintf(mh_arena_t *a, const char *fmt, ...)
{
    if (should_fail()) return NULL;
    va_list ap;
    va_start(ap, fmt);
    char *p = mh_vsprintf(a, fmt, ap);
    va_end(ap);
    return p;
}

int __wrap_mh_arena_defer(mh_arena_t *a, void (*fn)(void *), void *arg)
{
    return should_fail() ? MH_ENOMEM : __real_mh_arena_defer(a, fn, arg);
}

#endif /* MH_FAILALLOC */
