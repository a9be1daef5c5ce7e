/*
 * jobs_internal.h — private to src/jobs/: the contract between the queue
 * runner (queue.c) and the job handlers (index.c, gc.c), and the sweep of
 * superseded packs (sweep.c).
 *
 * A handler is started with a claimed job and must end it exactly once,
 * with mh_job_done or mh_job_fail, and only once none of its own
 * asynchronous operations (queries, store calls, thread-pool work) is
 * still pending. It checks mh_job_cancelled() between steps: when the
 * runner is stopping or the lease was lost it ends with
 * mh_job_fail(j, false, "cancelled") at the next step.
 */
#ifndef MH_JOBS_INTERNAL_H
#define MH_JOBS_INTERNAL_H

#include "mh/codec.h"
#include "mh/jobs.h"

typedef struct mh_job mh_job_t;

struct mh_job {
    /* For handlers (read-only, except arena and state). */
    mh_jobs_t *runner;
    uv_loop_t *loop;
    mh_db_t *db;
    mh_store_t *store;
    const mh_jobs_config_t *cfg;
    mh_arena_t arena;   /* everything of this run; released when the job ends */
    char id[MH_ID_SIZE + 8];
    char *repo_id;      /* NULL for a job without a repository */
    char type[32];
    mh_val_t payload;   /* decoded JSON (a MAP; empty map when {}) */
    int attempt, max_attempts;
    uint64_t t0_us;
    void *state;        /* the handler's */

    /* Runner-private. */
    mh_job_t *next;
    uv_timer_t heartbeat;
    bool heartbeat_busy, lease_lost, ended;
    int refs;           /* handler + heartbeat query + finish query + timer */
};

/* True when the handler should stop at its next step (runner stopping,
 * lease lost). */
bool mh_job_cancelled(const mh_job_t *j);

/* Ends the job successfully with `result` (a MAP built in j->arena; it is
 * stored as JSON in jobs.result). */
void mh_job_done(mh_job_t *j, const mh_val_t *result);

/* Ends the job with an error. permanent: no retry (bad payload, a pack
 * that is not referenced any more); otherwise it is retried with backoff
 * until max_attempts, then `failed` with the error kept. */
void mh_job_fail(mh_job_t *j, bool permanent, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Milliseconds since the job started (a float, never 0). */
double mh_job_elapsed_ms(const mh_job_t *j);
/* The same rounded up to whole milliseconds (>= 1), for results. */
int64_t mh_job_elapsed_ms_int(const mh_job_t *j);

/* The handlers. */
void mh_job_index_start(mh_job_t *j);
void mh_job_gc_start(mh_job_t *j);

/* One pass of the sweep: deletes up to a batch of superseded packs whose
 * grace period is over and that no mpack_index row points at and no
 * mpack_refs row names, each under the pack's advisory lock (the same lock
 * the GC and index transactions take before (re)creating a pack), row
 * first and store object second in one transaction. done(arg, deleted)
 * fires once on a later loop turn. */
void mh_jobs_sweep(mh_db_t *db, mh_store_t *store, uint32_t grace_s, bool (*stopping)(void *arg),
                   void (*done)(void *arg, int deleted), void *arg);

/* One pass over abandoned staged uploads: up to a batch of push grants
 * expired for more than grace_s seconds lose their staging key
 * (incoming/<id>, deleted from the store; absent is fine) and then their
 * row; afterwards the store's temporaries older than six hours are swept
 * (mh_store_sweep_tmp). A store error keeps the row for the next pass.
 * done(arg, uploads, tmp) fires once on a later loop turn with the number
 * of grants removed and of temporaries removed. SPEC 4.3. */
void mh_jobs_sweep_staged(mh_db_t *db, mh_store_t *store, uint32_t grace_s, bool (*stopping)(void *arg),
                          void (*done)(void *arg, int uploads, unsigned tmp), void *arg);

/* ------------------------------------------------------------ helpers */

/* "mpacks/<64 hex>" of an id (out >= 80 bytes). */
void mh_jobs_pack_key(char *out, size_t size, const char *mpack_id);

/* A text[] literal "{a,b,...}" of ids (which need no quoting) in arena a;
 * NULL on ENOMEM. */
char *mh_jobs_pg_array(mh_arena_t *a, char *const *ids, size_t n);

/* Process-wide counters (queue.c), for metrics. */
void mh_jobs_count_swept(int n);
void mh_jobs_count_staged_swept(int uploads, unsigned tmp);

#endif
