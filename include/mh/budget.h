/*
 * budget.h — the process-wide pack-memory budget (SPEC 4.8,
 * MUSEHUB_PACK_MEMORY): every piece of pack work of a process (pushing
 * a staged pack through the reader, building a fetch pack, GC, uploads
 * through /_store/) reserves the bytes it will hold before it holds them,
 * and gives them back when done. Work that does not fit waits in one FIFO
 * queue for at most MUSEHUB_PACK_QUEUE_TIMEOUT_MS, then fails with
 * MH_EBUDGET, which the hub answers 503 with a Retry-After header
 * (Gitaly's pack-objects concurrency limiter is the model).
 *
 * Rules (docs/architecture.md, "Streaming store I/O and the pack-memory
 * budget"):
 *  - Strict FIFO: a request that does not fit blocks the ones behind it,
 *    even smaller ones that would fit (no starvation of large work); a
 *    synchronous try never jumps the queue either.
 *  - A request fits when the bytes in use plus the request are within the
 *    budget, or when its reservation is the only one holding bytes ("runs
 *    alone"): work larger than the whole budget is never impossible, it
 *    runs with nothing else beside it (counted in
 *    musehub_pack_memory_oversize_total).
 *  - Timeouts break the only possible deadlock (two holders each waiting
 *    to grow): the first to time out fails and releases.
 *
 * Invariants: single-threaded, loop thread only (thread-pool work never
 * touches a budget: its owner reserves on the loop before queueing the
 * work). Every callback fires exactly once, on a later loop turn, never
 * inside the call that started the request — unless the owner releases
 * the reservation first, after which the callback never fires.
 */
#ifndef MH_BUDGET_H
#define MH_BUDGET_H

#include <uv.h>

#include "mh/core.h"

typedef struct mh_budget mh_budget_t;

/* Result of a request: 0 granted (the bytes are now held), MH_EBUDGET
 * (queue timeout: nothing more is held), MH_ECANCELED (the budget is
 * closing), MH_EINVAL (the reservation already had a request pending). */
typedef void (*mh_budget_cb)(void *ud, int err);

/* One owner's reservation, embedded in the owner's struct (like a
 * uv_req_t) and zeroed (or mh_budget_res_init) before first use. It holds
 * `held` bytes and at most one pending request. The fields are private to
 * budget.c; read them with the functions below. */
typedef struct mh_budget_res {
    mh_budget_t *b;
    uint64_t held;     /* bytes granted, held now */
    uint64_t want;     /* bytes of the pending request */
    int state;         /* idle, waiting, ready (callback due) */
    int result;        /* of a ready request */
    uint64_t deadline; /* loop time (ms) a waiting request gives up */
    uint64_t since;    /* loop time it started waiting */
    mh_budget_cb cb;
    void *ud;
    struct mh_budget_res *prev, *next; /* wait queue or ready list */
} mh_budget_res_t;

/* Counters and gauges of one budget (for metrics and tests). */
typedef struct {
    uint64_t total;     /* bytes, MUSEHUB_PACK_MEMORY */
    uint64_t in_use;    /* bytes held by all reservations now */
    uint64_t waiting;   /* requests in the queue now */
    uint64_t waited;    /* requests that had to queue, since start */
    uint64_t timeouts;  /* requests that gave up (MH_EBUDGET), since start */
    uint64_t oversize;  /* grants that ran alone past the budget, since start */
    uint64_t granted;   /* requests granted, since start */
    double wait_seconds; /* total time granted or timed-out requests waited */
} mh_budget_stats_t;

/* Creates a budget of `total` bytes (> 0) whose requests wait at most
 * `queue_timeout_ms` (0: never wait, fail at once when it does not fit).
 * Owns two libuv handles on `loop` that keep the loop alive only while
 * requests wait or callbacks are due. Errors: MH_EINVAL (total 0 or no
 * loop), MH_ENOMEM. Freed by mh_budget_close. SPEC 4.8. */
int mh_budget_new(uv_loop_t *loop, uint64_t total, uint32_t queue_timeout_ms, mh_budget_t **out);

/* Closes the budget: waiting requests fail with MH_ECANCELED (callbacks
 * on a later turn), new requests fail the same way, and the memory is
 * freed once its handles are closed and every reservation has been
 * released (owners must still call mh_budget_release). NULL is a no-op. */
void mh_budget_close(mh_budget_t *b);

/* Zeroes a reservation (same as memset 0). */
void mh_budget_res_init(mh_budget_res_t *r);

/* Asks for `bytes` more on top of what r holds (a first reservation or a
 * growth). cb(ud, err) fires exactly once on a later loop turn: 0 when
 * granted (mh_budget_held(r) grew by bytes), MH_EBUDGET after the queue
 * timeout, MH_ECANCELED when the budget closes, MH_EINVAL when r already
 * has a request pending or belongs to another budget. Granted at once
 * (still called back later) when nobody waits and the bytes fit; otherwise
 * queued in FIFO order. bytes == 0 is granted at once. */
void mh_budget_acquire(mh_budget_res_t *r, mh_budget_t *b, uint64_t bytes, mh_budget_cb cb, void *ud);

/* The synchronous form: grants `bytes` now (returns 0) only when nobody
 * waits and they fit; otherwise returns MH_EBUDGET and queues nothing.
 * MH_EINVAL when r has a request pending or belongs to another budget,
 * MH_ECANCELED when the budget is closing. For opportunistic growth. */
int mh_budget_try_acquire(mh_budget_res_t *r, mh_budget_t *b, uint64_t bytes);

/* Gives back min(bytes, held) bytes; waiters that now fit are granted
 * (their callbacks fire on a later turn). A pending request of r stays. */
void mh_budget_shrink(mh_budget_res_t *r, uint64_t bytes);

/* Gives back everything r holds and drops its pending request, if any
 * (its callback will never fire). r is idle and reusable afterwards.
 * Safe on a zeroed, never-used reservation. */
void mh_budget_release(mh_budget_res_t *r);

/* Bytes r holds now. */
uint64_t mh_budget_held(const mh_budget_res_t *r);

/* True while r has a request whose callback has not fired yet. */
bool mh_budget_pending(const mh_budget_res_t *r);

/* The Retry-After the hub sends with a 503 for MH_EBUDGET, seconds:
 * the queue timeout rounded up, at least 1. */
uint32_t mh_budget_retry_after_s(const mh_budget_t *b);

/* Fills *st with the budget's gauges and counters. */
void mh_budget_stats(const mh_budget_t *b, mh_budget_stats_t *st);

/* Appends Prometheus text (HELP and TYPE on each family; per process):
 * musehub_pack_memory_budget_bytes (gauge), musehub_pack_memory_in_use_bytes
 * (gauge), musehub_pack_memory_waiting (gauge, requests queued),
 * musehub_pack_memory_waits_total, musehub_pack_memory_timeouts_total,
 * musehub_pack_memory_oversize_total, musehub_pack_memory_grants_total
 * (counters), musehub_pack_memory_wait_seconds_total (counter). MH_ENOMEM. */
int mh_budget_metrics_write(const mh_budget_t *b, mh_buf_t *out);

#endif
