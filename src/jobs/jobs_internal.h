/*
 * jobs_internal.h — private to src/jobs/: the contract between the queue
 * runner (queue.c) and the job handlers (index.c, gc.c), and the sweep of
 * superseded packs (sweep.c).
 *
 * A handler is started with a claimed job and must end it exactly once,
 * with mh_job_done or mh__job_fail, and only once none of its own
 * asynchronous operations (queries, store calls, thread-pool work) is
 * still pending. It checks mh__job_cancelled() between steps: when the
 * runner is stopping or the lease was lost it ends with
 * mh__job_fail(j, false, "cancelled") at the next step.
 */
#ifndef MH_JOBS_INTERNAL_H
#define MH_JOBS_INTERNAL_H

#include "mh/codec.h"
#include "mh/jobs.h"
#include "mh/refwrite.h"
#include "mh/step.h"

typedef struct mh_job mh_job_t;

struct mh_job {
    /* For handlers (read-only, except arena and state). */
    mh_jobs_t *runner;
    uv_loop_t *loop;
    mh_db_t *db;
    mh_store_t *store;
    const mh_jobs_config_t *cfg;
    mh_arena_t arena; /* everything of this run; released when the job ends */
    char id[MH_ID_SIZE + 8];
    char *repo_id; /* NULL for a job without a repository */
    char type[32];
    mh_val_t payload; /* decoded JSON (a MAP; empty map when {}) */
    int attempt, max_attempts;
    uint64_t t0_us;
    void *state; /* the handler's */

    /* Runner-private. */
    mh_job_t *next;
    uv_timer_t heartbeat;
    bool heartbeat_busy, lease_lost, ended;
    int refs; /* handler + heartbeat query + finish query + timer */
};

/* True when the handler should stop at its next step (runner stopping,
 * lease lost). */
bool mh__job_cancelled(const mh_job_t *j);

/* Ends the job successfully with `result` (a MAP built in j->arena; it is
 * stored as JSON in jobs.result). */
void mh_job_done(mh_job_t *j, const mh_val_t *result);

/* Ends the job with an error. permanent: no retry (bad payload, a pack
 * that is not referenced any more); otherwise it is retried with backoff
 * until max_attempts, then `failed` with the error kept. */
void mh__job_fail(mh_job_t *j, bool permanent, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* The job's step machine set up (mh/step.h): loop, db, store, the
 * runner's cancellation (steps from `final` on still run), finish. */
void mh__job_step_init(mh_job_t *j, mh_step_t *s, const mh_step_def_t *steps, int n, int final,
                       void (*finish)(mh_step_t *s));
/* A new job operation of `size` bytes whose first member is its
 * mh_step_t: zeroed in the job's arena, cleanup (may be NULL) run with
 * it, set up by mh__job_step_init, and j->state pointing at it. NULL
 * after failing the job (to be retried). */
void *mh__job_new(mh_job_t *j, size_t size, const mh_step_def_t *steps, int n, int final, void (*finish)(mh_step_t *s),
                  void (*cleanup)(void *op));
#define MH__JOB_NEW(j, type, steps, final, finish, cleanup)                                                            \
    ((void)sizeof(char[offsetof(type, step) == 0 ? 1 : -1]),                                                           \
     (type *)mh__job_new((j), sizeof(type), (steps), (int)(sizeof(steps) / sizeof *(steps)), (final), (finish),        \
                         (cleanup)))

/* The end of a job run on the kit, for its finish callback: an error
 * fails the job ("<what>: <reason>: <error>"), for good when `permanent`;
 * otherwise the job is done with result (built with b: a failed build is
 * retried). */
void mh__job_end(mh_job_t *j, const mh_step_t *s, const char *what, bool permanent, const mh_vb_t *b,
                 const mh_val_t *result);

/* Milliseconds since the job started (a float, never 0). */
double mh__job_elapsed_ms(const mh_job_t *j);
/* The same rounded up to whole milliseconds (>= 1), for results. */
int64_t mh__job_elapsed_ms_int(const mh_job_t *j);

/* The handlers. */
void mh__job_index_start(mh_job_t *j);
void mh__job_gc_start(mh_job_t *j);

/* One pass of the sweep: deletes up to a batch of superseded packs whose
 * grace period is over and that no mpack_index row points at and no
 * mpack_refs row names, each under the pack's advisory lock (the same lock
 * the GC and index transactions take before (re)creating a pack), row
 * first and store object second in one transaction. done(arg, deleted)
 * fires once on a later loop turn. */
void mh__jobs_sweep(mh_db_t *db, mh_store_t *store, uint32_t grace_s, bool (*stopping)(void *arg),
                    void (*done)(void *arg, int deleted), void *arg);

/* One pass over abandoned staged uploads: up to a batch of push grants
 * expired for more than grace_s seconds lose their staging key
 * (incoming/<id>, deleted from the store; absent is fine) and then their
 * row; afterwards the store's temporaries older than six hours are swept
 * (mh_store_sweep_tmp). A store error keeps the row for the next pass.
 * done(arg, uploads, tmp) fires once on a later loop turn with the number
 * of grants removed and of temporaries removed. SPEC 4.3. */
void mh__jobs_sweep_staged(mh_db_t *db, mh_store_t *store, uint32_t grace_s, bool (*stopping)(void *arg),
                          void (*done)(void *arg, int uploads, unsigned tmp), void *arg);

/* One pass over the fetch-answer cache (SPEC 4.4): deletes up to a batch
 * of fetch_packs rows older than age_s seconds and marks superseded each
 * fetch pack (kind 'fetch') that no younger row, mpack_refs or
 * mpack_index row names, so the sweep deletes it one grace period later.
 * done(arg, rows, packs) fires once on a later loop turn (0, 0 after a
 * database error, which is logged). */
void mh__jobs_prune_fetch(mh_db_t *db, uint32_t age_s, void (*done)(void *arg, int rows, int packs), void *arg);

/* ------------------------------------------------------------ helpers */

/* Process-wide counters (queue.c), for metrics. */
void mh__jobs_count_swept(int n);
void mh__jobs_count_staged_swept(int uploads, unsigned tmp);
void mh__jobs_count_fetch_pruned(int rows, int packs);

#endif
