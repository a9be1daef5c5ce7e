/*
 * jobs.h — background jobs (SPEC 4.7): a queue in the PostgreSQL table
 * `jobs`, claimed with FOR UPDATE SKIP LOCKED so any number of processes
 * (`musehubd serve` with MUSEHUB_JOBS=1, `musehubd worker`) share it, and
 * the two job types:
 *
 *   mpack.index  payload {mpack_key}: objects rows (mpack:// URIs with byte
 *                ranges), object refs, mpack_index rows, the mpacks and
 *                mpack_refs rows for one pack; result {objects_written,
 *                object_refs_written, elapsed_ms}
 *   mpack.gc     consolidates every pack a repository references (kinds
 *                push/commit/gc; fetch packs are caches) into one v1 pack
 *                of blobs sorted by object id; result {packs_before,
 *                packs_after, consolidated_key, skipped, ...}
 *
 * The runner (one per process) also prunes finished jobs after a retention
 * period and sweeps superseded packs out of the store after a grace period
 * (once no mpack_index row points at them and no mpack_refs row names
 * them), so a fetch that located a pack before a GC swapped it still reads
 * it; then staged uploads (incoming/<id>) of push grants expired for more
 * than the grace period, with their grant rows, and the store's stale
 * temporaries (SPEC 4.3). Design notes: docs/architecture.md, "Jobs".
 *
 * Invariants:
 *  - Everything runs on the loop: queries through the db module, store
 *    operations through the store module, CPU-heavy steps (parsing and
 *    hashing packs, building the consolidated pack) on the thread pool.
 *  - At-least-once: a job whose worker died is taken over once its lease
 *    (renewed by a heartbeat while it runs) has expired; both handlers are
 *    idempotent, and each writes its rows in one transaction.
 *  - A job's status is only changed by the worker holding its lease
 *    (locked_by and attempt must still match).
 */
#ifndef MH_JOBS_H
#define MH_JOBS_H

#include <uv.h>

#include "mh/budget.h"
#include "mh/core.h"
#include "mh/db.h"
#include "mh/mpack.h"
#include "mh/refwrite.h"
#include "mh/store.h"

typedef struct mh_jobs mh_jobs_t;

/* Runner settings; zero fields take the defaults noted (the MUSEHUB_*
 * variables of the same meaning are in src/core/config.c). */
typedef struct {
    uint32_t concurrency;     /* jobs one process runs at once; 2 (MUSEHUB_JOB_CONCURRENCY) */
    uint32_t lease_s;         /* lease length, seconds; 30 (MUSEHUB_JOB_LEASE_SECONDS); the
                                 heartbeat renews it every lease_s/3 */
    uint32_t poll_ms;         /* polling fallback to LISTEN/NOTIFY, ms; 2000 */
    uint32_t retention_hours; /* finished jobs are deleted after; 168 (MUSEHUB_JOB_RETENTION_HOURS) */
    uint32_t grace_s;         /* superseded packs stay in the store for, and staged
                                 uploads after their grant expired; 3600
                                 (MUSEHUB_MPACK_GRACE_SECONDS) */
    uint32_t maintenance_s;   /* period of pruning and sweeping, seconds; 60
                                 (MUSEHUB_JOB_MAINTENANCE_SECONDS) */
    uint32_t fetch_cache_s;   /* fetch answers (fetch_packs rows) are pruned after, seconds,
                                 and their packs handed to the sweep; 86400
                                 (MUSEHUB_FETCH_CACHE_SECONDS) */
    uint64_t max_pack_bytes;  /* largest pack indexed; 2 GiB (MUSEHUB_MAX_MPACK_BYTES) */
    uint64_t max_unpacked;    /* largest decompressed total of a v2 pack read; 16 GiB
                                 (MUSEHUB_MAX_UNPACKED_BYTES) */
    uint32_t gc_level;        /* zstd level of GC's consolidated packs; 9 (MUSEHUB_GC_ZSTD_LEVEL) */
    mh_budget_t *budget;      /* the process's pack-memory budget (borrowed; NULL: unlimited) */
} mh_jobs_config_t;

/* SQL text for the transaction-scoped advisory lock of a pack, taken by
 * everything that creates, revives or deletes a pack's row or bytes: GC,
 * the index job, the sweep, push (around the move into mpacks/) and
 * `musehubd fsck --repair`:
 * pg_advisory_xact_lock(hashtextextended('musehub:mpack:' || id, 0)). */
#define MH_SQL_LOCK_MPACK(param) "pg_advisory_xact_lock(hashtextextended('musehub:mpack:' || " param ", 0))"

/* The NOTIFY channel: a trigger on `jobs` (sql/0003_jobs.sql) notifies it
 * on every insert, with the job type as payload. */
#define MH_JOBS_CHANNEL "musehub_jobs"

/* Starts the runner on `loop`: LISTENs on MH_JOBS_CHANNEL (a dedicated
 * connection of the pool), polls every poll_ms as a fallback, claims up to
 * `concurrency` jobs at a time, and runs maintenance every maintenance_s
 * (first run a second after start). db and store are borrowed and must
 * outlive the runner. cfg is copied. *out is stopped with mh_jobs_stop
 * and freed with mh_jobs_free. Errors: MH_EINVAL (NULL argument),
 * MH_ENOMEM, or the error of mh_db_listen. SPEC 4.7. */
int mh_jobs_start(uv_loop_t *loop, mh_db_t *db, mh_store_t *store, const mh_jobs_config_t *cfg,
                  mh_jobs_t **out);

/* Stops claiming, stops the timers, asks running jobs to stop at their
 * next step (a job interrupted this way goes back to `pending` at once,
 * its attempt not counted) and calls done(arg) on a later loop turn once
 * no job, query or timer of the runner is left. Work already on the
 * thread pool or in the store finishes first (a step, not a job). Call
 * before mh_db_close; a second call is ignored. */
void mh_jobs_stop(mh_jobs_t *r, void (*done)(void *arg), void *arg);

/* Frees a stopped runner. Call after mh_db_close's callback (the LISTEN
 * callback keeps a pointer to the runner until the pool is closed).
 * NULL is a no-op. */
void mh_jobs_free(mh_jobs_t *r);

/* Appends Prometheus text for this process's job counters:
 * musehub_jobs_claimed_total, musehub_jobs_finished_total{type,outcome}
 * (outcome: done, retry, failed, abandoned), musehub_jobs_running,
 * the histogram musehub_jobs_duration_seconds{type} (buckets 10 ms ..
 * 1 h, one observation per finished run), musehub_mpacks_swept_total,
 * musehub_jobs_pruned_total, musehub_staged_uploads_swept_total,
 * musehub_store_tmp_swept_total. Counters are process-wide (one runner per
 * process), so the handler needs no runner pointer. MH_ENOMEM. SPEC 4.8. */
int mh_jobs_metrics_write(mh_buf_t *out);

/* ---------------------------------------------------- job types, payloads */

/* True when type[0..n) is a job type this server runs ("mpack.index",
 * "mpack.gc"). */
bool mh_job_type_known(const char *type, size_t n);

/* Seconds to wait before retrying after failed attempt number `attempt`
 * (1-based): 1, 4, 16, 64, ... (4^(attempt-1)), at most 3600. */
uint32_t mh_job_backoff_s(int attempt);

/* ------------------------------------------------ exposed for unit tests */

/* mh_rw_index_rows, the COPY rows of a pack's blobs (and v2 frames), is
 * refwrite's (mh/refwrite.h). */

#endif
