/*
 * queue.c — the job runner of one process (SPEC 4.7): claims jobs from
 * the `jobs` table, keeps their leases alive, records results, retries
 * failures with exponential backoff, prunes old finished jobs and runs the
 * sweeps (sweep.c): superseded packs, then abandoned staged uploads of
 * expired push grants and the store's stale temporaries.
 *
 * Claiming: one UPDATE ... WHERE job_id = (SELECT ... FOR UPDATE SKIP
 * LOCKED) picks the oldest runnable job — pending and due, or running with
 * an expired lease (its worker died) — so any number of processes share
 * the queue without ever running one job twice at the same time. A claim
 * bumps `attempt` and sets `locked_by` to this process's worker id; every
 * later write of the job (heartbeat, result, retry) is conditional on
 * (locked_by, attempt) still matching, so a worker that lost its lease
 * (paused, partitioned) can never overwrite the new owner's outcome.
 *
 * Wake-ups: LISTEN musehub_jobs (a trigger NOTIFYs on insert), a polling
 * timer as the fallback (a lost notification, a job whose run_after or
 * lease just passed), and the end of a job (a slot freed).
 *
 * Invariants: at most cfg.concurrency jobs run at once; at most one claim
 * query is in flight; a job's memory lives until its handler ended, its
 * heartbeat query returned, its finishing query returned and its timer
 * closed (a reference count).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "jobs_internal.h"

struct mh_jobs {
    uv_loop_t *loop;
    mh_db_t *db;
    mh_store_t *store;
    mh_jobs_config_t cfg;
    char worker_id[128];
    char lease_str[16];
    uv_timer_t poll, maint;
    int open_handles;
    bool claiming, rewake;
    int running;
    mh_job_t *jobs;
    bool maint_busy;
    bool stopping, stopped;
    void (*stop_done)(void *arg);
    void *stop_arg;
};

/* ------------------------------------------------------------ counters */

enum { T_INDEX, T_GC, T_OTHER, NTYPES };
enum { O_DONE, O_RETRY, O_FAILED, O_ABANDONED, NOUTCOMES };
static const char *const type_names[NTYPES] = {"mpack.index", "mpack.gc", "other"};
static const char *const outcome_names[NOUTCOMES] = {"done", "retry", "failed", "abandoned"};

/* Upper bounds of the job duration histogram, seconds: an index job of a
 * small push takes milliseconds, a GC of a large repository minutes. */
#define NDBUCKETS 14
static const double dur_le[NDBUCKETS] = {0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600};

static struct {
    uint64_t claimed;
    uint64_t finished[NTYPES][NOUTCOMES];
    uint64_t dur_bucket[NTYPES][NDBUCKETS + 1]; /* last: +Inf */
    uint64_t dur_count[NTYPES];
    double seconds[NTYPES];
    int64_t running;
    uint64_t swept, pruned;
    uint64_t staged_swept, tmp_swept;
    uint64_t fetch_rows_pruned, fetch_packs_superseded;
} stats;

/* One finished run of a job of type t that took secs. */
static void observe_duration(int t, double secs)
{
    int b = 0;
    while (b < NDBUCKETS && secs > dur_le[b]) b++;
    stats.dur_bucket[t][b]++;
    stats.dur_count[t]++;
    stats.seconds[t] += secs;
}

static int type_index(const char *t)
{
    if (!strcmp(t, "mpack.index")) return T_INDEX;
    if (!strcmp(t, "mpack.gc")) return T_GC;
    return T_OTHER;
}

void mh__jobs_count_swept(int n)
{
    if (n > 0) stats.swept += (uint64_t)n;
}

void mh__jobs_count_staged_swept(int uploads, unsigned tmp)
{
    if (uploads > 0) stats.staged_swept += (uint64_t)uploads;
    stats.tmp_swept += tmp;
}

void mh__jobs_count_fetch_pruned(int rows, int packs)
{
    if (rows > 0) stats.fetch_rows_pruned += (uint64_t)rows;
    if (packs > 0) stats.fetch_packs_superseded += (uint64_t)packs;
}

int mh_jobs_metrics_write(mh_buf_t *out)
{
    int rc = mh_buf_printf(out,
                           "# HELP musehub_jobs_claimed_total Jobs claimed by this process.\n"
                           "# TYPE musehub_jobs_claimed_total counter\nmusehub_jobs_claimed_total %llu\n"
                           "# HELP musehub_jobs_running Jobs running in this process.\n"
                           "# TYPE musehub_jobs_running gauge\nmusehub_jobs_running %lld\n"
                           "# HELP musehub_jobs_finished_total Job runs ended, by type and outcome.\n"
                           "# TYPE musehub_jobs_finished_total counter\n",
                           (unsigned long long)stats.claimed, (long long)stats.running);
    for (int t = 0; t < NTYPES && !rc; t++)
        for (int o = 0; o < NOUTCOMES && !rc; o++)
            rc = mh_buf_printf(out, "musehub_jobs_finished_total{type=\"%s\",outcome=\"%s\"} %llu\n", type_names[t],
                               outcome_names[o], (unsigned long long)stats.finished[t][o]);
    if (!rc)
        rc = mh_buf_printf(out, "# HELP musehub_jobs_duration_seconds Time a job run took, claim to outcome, by type.\n"
                                "# TYPE musehub_jobs_duration_seconds histogram\n");
    for (int t = 0; t < NTYPES && !rc; t++) {
        uint64_t cum = 0;
        for (int b = 0; b <= NDBUCKETS && !rc; b++) {
            cum += stats.dur_bucket[t][b];
            if (b < NDBUCKETS)
                rc = mh_buf_printf(out, "musehub_jobs_duration_seconds_bucket{type=\"%s\",le=\"%g\"} %llu\n",
                                   type_names[t], dur_le[b], (unsigned long long)cum);
            else
                rc = mh_buf_printf(out, "musehub_jobs_duration_seconds_bucket{type=\"%s\",le=\"+Inf\"} %llu\n",
                                   type_names[t], (unsigned long long)cum);
        }
        if (!rc)
            rc = mh_buf_printf(out,
                               "musehub_jobs_duration_seconds_sum{type=\"%s\"} %.6f\n"
                               "musehub_jobs_duration_seconds_count{type=\"%s\"} %llu\n",
                               type_names[t], stats.seconds[t], type_names[t], (unsigned long long)stats.dur_count[t]);
    }
    /* The maintenance pass's counters: one family each. */
    const struct {
        const char *name, *help;
        uint64_t v;
    } counters[] = {
        {"musehub_mpacks_swept_total", "Superseded packs deleted from the store.", stats.swept},
        {"musehub_jobs_pruned_total", "Finished jobs deleted after the retention period.", stats.pruned},
        {"musehub_staged_uploads_swept_total", "Abandoned staged uploads (expired push grants) removed.",
         stats.staged_swept},
        {"musehub_store_tmp_swept_total", "Stale store temporaries removed.", stats.tmp_swept},
        {"musehub_fetch_cache_pruned_total",
         "Fetch answers (fetch_packs rows) deleted after MUSEHUB_FETCH_CACHE_SECONDS.", stats.fetch_rows_pruned},
        {"musehub_fetch_packs_superseded_total", "Fetch packs no answer names any more, handed to the sweep.",
         stats.fetch_packs_superseded},
    };
    for (size_t i = 0; i < sizeof counters / sizeof counters[0] && !rc; i++)
        rc = mh_buf_printf(out, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", counters[i].name, counters[i].help,
                           counters[i].name, counters[i].name, (unsigned long long)counters[i].v);
    return rc;
}

/* ------------------------------------------------------------- helpers */

bool mh_job_type_known(const char *type, size_t n)
{
    return (n == 11 && !memcmp(type, "mpack.index", 11)) || (n == 8 && !memcmp(type, "mpack.gc", 8));
}

uint32_t mh_job_backoff_s(int attempt)
{
    if (attempt < 1) attempt = 1;
    uint64_t s = 1;
    for (int i = 1; i < attempt && s < 3600; i++) s *= 4;
    return s > 3600 ? 3600 : (uint32_t)s;
}

double mh__job_elapsed_ms(const mh_job_t *j)
{
    double ms = (double)(mh_now_us() - j->t0_us) / 1000.0;
    return ms > 0.001 ? ms : 0.001;
}

int64_t mh__job_elapsed_ms_int(const mh_job_t *j)
{
    uint64_t ms = (mh_now_us() - j->t0_us + 999) / 1000;
    return ms ? (int64_t)ms : 1;
}

static bool job_stopping(mh_step_t *s) { return mh__job_cancelled(s->user); }

void mh__job_step_init(mh_job_t *j, mh_step_t *s, const mh_step_def_t *steps, int n, int final,
                       void (*finish)(mh_step_t *s))
{
    mh_step_init(s, steps, n, j->type, j->id, &(mh_step_env_t){j->loop, j->db, j->store}, finish);
    s->final = final;
    s->stopping = job_stopping;
    s->user = j;
}

void *mh__job_new(mh_job_t *j, size_t size, const mh_step_def_t *steps, int n, int final, void (*finish)(mh_step_t *s),
                  void (*cleanup)(void *op))
{
    mh_step_t *s = mh_calloc(&j->arena, size);
    if (!s || (cleanup && mh_arena_defer(&j->arena, cleanup, s))) {
        mh__job_fail(j, false, "out of memory");
        return NULL;
    }
    mh__job_step_init(j, s, steps, n, final, finish);
    j->state = s;
    return s;
}

void mh__job_end(mh_job_t *j, const mh_step_t *s, const char *what, bool permanent, const mh_vb_t *b,
                 const mh_val_t *result)
{
    if (s->err)
        mh__job_fail(j, permanent, "%s: %s%s%s", what, s->why[0] ? s->why : "", s->why[0] ? ": " : "",
                     mh_strerror(s->err));
    else if (b->err || !result) mh__job_fail(j, false, "%s: out of memory building the result", what);
    else mh_job_done(j, result);
}

static void try_claim(mh_jobs_t *r);
static void maybe_stopped(mh_jobs_t *r);

/* ------------------------------------------------------- job lifecycle */

static void job_unref(mh_job_t *j)
{
    if (--j->refs > 0) return;
    mh_jobs_t *r = j->runner;
    for (mh_job_t **pp = &r->jobs; *pp; pp = &(*pp)->next)
        if (*pp == j) {
            *pp = j->next;
            break;
        }
    mh_arena_release(&j->arena);
    free(j);
    r->running--;
    stats.running--;
    if (r->stopping) maybe_stopped(r);
    else try_claim(r);
}

static const mh_stmt_t st_heartbeat = {
    "jobs_heartbeat",
    "UPDATE jobs SET lease_until = now() + make_interval(secs => $4::int), updated_at = now()"
    " WHERE job_id = $1 AND locked_by = $2 AND attempt = $3::int AND status = 'running' RETURNING 1",
    4};

static void heartbeat_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_job_t *j = ud;
    j->heartbeat_busy = false;
    if (err) {
        /* The lease is not renewed; the next beat tries again, and the
         * lease outlives two missed beats. */
        mh_warn("job %s: heartbeat: %s (%s)", j->id, mh_strerror(err), errmsg ? errmsg : "");
    } else if (PQntuples(res) == 0 && !j->lease_lost) {
        j->lease_lost = true;
        mh_warn("job %s (%s, attempt %d): lease lost (taken over or deleted); abandoning this run", j->id, j->type,
                j->attempt);
    }
    job_unref(j);
}

static void heartbeat_timer_cb(uv_timer_t *t)
{
    mh_job_t *j = t->data;
    if (j->heartbeat_busy || j->ended) return;
    char att[16];
    snprintf(att, sizeof att, "%d", j->attempt);
    const char *vals[4] = {j->id, j->runner->worker_id, att, j->runner->lease_str};
    j->heartbeat_busy = true;
    j->refs++;
    mh_db_exec(j->db, &st_heartbeat, vals, NULL, NULL, heartbeat_cb, j);
}

bool mh__job_cancelled(const mh_job_t *j) { return j->runner->stopping || j->lease_lost; }

static const mh_stmt_t st_done = {
    "jobs_done",
    "UPDATE jobs SET status = 'done', result = $4::jsonb, error = NULL, lease_until = NULL, updated_at = now()"
    " WHERE job_id = $1 AND locked_by = $2 AND attempt = $3::int AND status = 'running' RETURNING 1",
    4};

static const mh_stmt_t st_fail = {
    "jobs_fail",
    "UPDATE jobs SET status = CASE WHEN $5::bool OR attempt >= max_attempts THEN 'failed' ELSE 'pending' END,"
    " error = $4, run_after = now() + make_interval(secs => $6::int), lease_until = NULL, updated_at = now()"
    " WHERE job_id = $1 AND locked_by = $2 AND attempt = $3::int AND status = 'running' RETURNING status",
    6};

/* Interrupted by a shutdown: back to pending at once, the attempt not
 * counted (the job did not fail; the process is going away). */
static const mh_stmt_t st_abandon = {
    "jobs_abandon",
    "UPDATE jobs SET status = 'pending', attempt = greatest(attempt - 1, 0), run_after = now(),"
    " lease_until = NULL, locked_by = NULL, updated_at = now()"
    " WHERE job_id = $1 AND locked_by = $2 AND attempt = $3::int AND status = 'running' RETURNING 1",
    3};

typedef struct {
    mh_job_t *j;
    int outcome;
} finish_t;

static void finish_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    finish_t *f = ud;
    mh_job_t *j = f->j;
    int t = type_index(j->type);
    if (err) {
        /* The lease expires and another run redoes the job (handlers are
         * idempotent). */
        mh_error("job %s: recording the outcome: %s (%s)", j->id, mh_strerror(err), errmsg ? errmsg : "");
    } else if (PQntuples(res) == 0) {
        mh_warn("job %s: outcome not recorded: the lease was taken over or the job deleted", j->id);
    } else {
        int o = f->outcome;
        if (o == O_RETRY && !strcmp(mh_pq_str(res, 0, 0), "failed")) o = O_FAILED;
        stats.finished[t][o]++;
    }
    job_unref(j);
}

static void heartbeat_closed_cb(uv_handle_t *h) { job_unref(h->data); }

static void finish(mh_job_t *j, int outcome, const char *result_json, const char *error, bool permanent)
{
    if (j->ended) {
        mh_error("job %s: ended twice (ignored)", j->id);
        return;
    }
    j->ended = true;
    mh_jobs_t *r = j->runner;
    int t = type_index(j->type);
    observe_duration(t, mh__job_elapsed_ms(j) / 1000.0);
    uv_timer_stop(&j->heartbeat);
    uv_close((uv_handle_t *)&j->heartbeat, heartbeat_closed_cb);

    if (j->lease_lost) {
        stats.finished[t][O_ABANDONED]++;
        job_unref(j);
        return;
    }
    if (outcome != O_DONE && r->stopping) outcome = O_ABANDONED;

    finish_t *f = mh_alloc(&j->arena, sizeof *f);
    char *att = mh_sprintf(&j->arena, "%d", j->attempt);
    char *backoff = mh_sprintf(&j->arena, "%u", mh_job_backoff_s(j->attempt));
    if (!f || !att || !backoff) {
        mh_error("job %s: out of memory recording the outcome; the lease will expire", j->id);
        job_unref(j);
        return;
    }
    f->j = j;
    f->outcome = outcome;
    const char *vals[6] = {j->id, r->worker_id, att, NULL, NULL, backoff};
    switch (outcome) {
    case O_DONE:
        vals[3] = result_json;
        mh_db_exec(j->db, &st_done, vals, NULL, NULL, finish_cb, f);
        break;
    case O_ABANDONED:
        mh_info("job %s (%s): interrupted by shutdown; back to pending", j->id, j->type);
        mh_db_exec(j->db, &st_abandon, vals, NULL, NULL, finish_cb, f);
        break;
    default:
        vals[3] = error;
        vals[4] = permanent ? "true" : "false";
        mh_db_exec(j->db, &st_fail, vals, NULL, NULL, finish_cb, f);
        break;
    }
}

void mh_job_done(mh_job_t *j, const mh_val_t *result)
{
    mh_buf_t out = {0};
    int rc = mh_encode(result, MH_FMT_JSON, &out);
    char *json = rc ? NULL : mh_strndup(&j->arena, (const char *)out.p, out.len);
    mh_buf_free(&out);
    if (!json) {
        finish(j, O_RETRY, NULL, "out of memory encoding the result", false);
        return;
    }
    mh_info("job %s (%s, repo %s, attempt %d) done in %.1f ms: %s", j->id, j->type, j->repo_id ? j->repo_id : "-",
            j->attempt, mh__job_elapsed_ms(j), json);
    finish(j, O_DONE, json, NULL, false);
}

void mh__job_fail(mh_job_t *j, bool permanent, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!mh__job_cancelled(j))
        mh_warn("job %s (%s, repo %s, attempt %d/%d) failed%s: %s", j->id, j->type, j->repo_id ? j->repo_id : "-",
                j->attempt, j->max_attempts, permanent ? " permanently" : "", msg);
    finish(j, O_RETRY, NULL, msg, permanent);
}

/* ---------------------------------------------------------------- claim */

static const mh_stmt_t st_claim = {
    "jobs_claim",
    "UPDATE jobs SET status = 'running', attempt = attempt + 1,"
    " lease_until = now() + make_interval(secs => $2::int), locked_by = $1, updated_at = now()"
    " WHERE job_id = (SELECT job_id FROM jobs"
    "  WHERE (status = 'pending' AND run_after <= now()) OR (status = 'running' AND lease_until < now())"
    "  ORDER BY run_after LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " RETURNING job_id, repo_id, job_type, payload::text, attempt, max_attempts",
    2};

static void start_job(mh_jobs_t *r, PGresult *res)
{
    mh_job_t *j = calloc(1, sizeof *j);
    if (!j) {
        mh_error("jobs: out of memory starting a claimed job; its lease will expire");
        return;
    }
    j->runner = r;
    j->loop = r->loop;
    j->db = r->db;
    j->store = r->store;
    j->cfg = &r->cfg;
    j->t0_us = mh_now_us();
    mh_arena_init(&j->arena, 0);
    snprintf(j->id, sizeof j->id, "%s", mh_pq_str(res, 0, 0));
    j->repo_id = mh_pq_isnull(res, 0, 1) ? NULL : mh_strdup(&j->arena, mh_pq_str(res, 0, 1));
    snprintf(j->type, sizeof j->type, "%s", mh_pq_str(res, 0, 2));
    j->attempt = (int)mh_pq_int(res, 0, 4);
    j->max_attempts = (int)mh_pq_int(res, 0, 5);
    const char *payload = mh_pq_str(res, 0, 3);
    j->refs = 2; /* the handler's and the heartbeat timer's */
    j->next = r->jobs;
    r->jobs = j;
    r->running++;
    stats.running++;
    stats.claimed++;
    uv_timer_init(r->loop, &j->heartbeat);
    j->heartbeat.data = j;
    uint64_t beat = (uint64_t)r->cfg.lease_s * 1000 / 3;
    uv_timer_start(&j->heartbeat, heartbeat_timer_cb, beat, beat);
    mh_debug("job %s (%s, repo %s): claimed, attempt %d/%d", j->id, j->type, j->repo_id ? j->repo_id : "-", j->attempt,
             j->max_attempts);

    if (r->stopping) {
        finish(j, O_ABANDONED, NULL, "shutdown", false);
        return;
    }
    if (j->attempt > j->max_attempts) {
        /* Its worker died on the last attempt (the lease expired). */
        mh__job_fail(j, true, "the worker running the last attempt stopped (lease expired)");
        return;
    }
    const char *why = NULL;
    mh_val_t v;
    if (!j->repo_id ||
        mh_json_decode(&j->arena, (const uint8_t *)payload, strlen(payload), &mh_decode_limits_default, &v, &why) ||
        v.t != MH_V_MAP) {
        mh__job_fail(j, true, j->repo_id ? "payload is not a JSON object" : "the job names no repository");
        return;
    }
    j->payload = v;
    if (!strcmp(j->type, "mpack.index")) mh__job_index_start(j);
    else if (!strcmp(j->type, "mpack.gc")) mh__job_gc_start(j);
    else mh__job_fail(j, true, "unknown job type '%s'", j->type);
}

static void claim_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_jobs_t *r = ud;
    r->claiming = false;
    if (err) {
        /* The poll timer tries again. */
        if (err != MH_ECANCELED) mh_warn("jobs: claim: %s (%s)", mh_strerror(err), errmsg ? errmsg : "");
        r->rewake = false;
        maybe_stopped(r);
        return;
    }
    bool got = PQntuples(res) == 1;
    if (got) start_job(r, res);
    if (r->stopping) {
        maybe_stopped(r);
        return;
    }
    if (got || r->rewake) {
        r->rewake = false;
        try_claim(r);
    }
}

static void try_claim(mh_jobs_t *r)
{
    if (r->stopping) return;
    if (r->claiming) {
        r->rewake = true; /* something may have become runnable since the query started */
        return;
    }
    if (r->running >= (int)r->cfg.concurrency) return;
    r->claiming = true;
    const char *vals[2] = {r->worker_id, r->lease_str};
    mh_db_exec(r->db, &st_claim, vals, NULL, NULL, claim_cb, r);
}

static void notify_cb(void *ud, const char *channel, const char *payload)
{
    (void)channel;
    (void)payload;
    mh_jobs_t *r = ud;
    if (!r->stopping) try_claim(r);
}

static void poll_cb(uv_timer_t *t) { try_claim(t->data); }

/* --------------------------------------------------------- maintenance */

static const mh_stmt_t st_prune = {
    "jobs_prune",
    "WITH d AS (DELETE FROM jobs WHERE status IN ('done', 'failed')"
    " AND updated_at < now() - make_interval(hours => $1::int) RETURNING 1) SELECT count(*) FROM d",
    1};

static bool sweep_stopping(void *arg) { return ((mh_jobs_t *)arg)->stopping; }

static void staged_done_cb(void *arg, int uploads, unsigned tmp)
{
    mh_jobs_t *r = arg;
    r->maint_busy = false;
    if (uploads > 0) mh_info("jobs: swept %d abandoned staged upload(s) of expired push grants", uploads);
    if (tmp > 0) mh_info("jobs: swept %u stale store temporaries", tmp);
    maybe_stopped(r);
}

static void sweep_done_cb(void *arg, int deleted)
{
    mh_jobs_t *r = arg;
    if (deleted > 0) mh_info("jobs: swept %d superseded pack(s) from the store", deleted);
    if (r->stopping) {
        r->maint_busy = false;
        maybe_stopped(r);
        return;
    }
    mh__jobs_sweep_staged(r->db, r->store, r->cfg.grace_s, sweep_stopping, staged_done_cb, r);
}

static void fetch_pruned_cb(void *arg, int rows, int packs)
{
    mh_jobs_t *r = arg;
    mh__jobs_count_fetch_pruned(rows, packs);
    if (rows > 0)
        mh_info("jobs: pruned %d fetch answer(s) older than %u s; %d fetch pack(s) superseded", rows,
                r->cfg.fetch_cache_s, packs);
    if (r->stopping) {
        r->maint_busy = false;
        maybe_stopped(r);
        return;
    }
    mh__jobs_sweep(r->db, r->store, r->cfg.grace_s, sweep_stopping, sweep_done_cb, r);
}

static void prune_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_jobs_t *r = ud;
    if (err) {
        if (err != MH_ECANCELED) mh_warn("jobs: prune: %s (%s)", mh_strerror(err), errmsg ? errmsg : "");
    } else {
        int64_t n = mh_pq_int(res, 0, 0);
        if (n > 0) {
            stats.pruned += (uint64_t)n;
            mh_info("jobs: pruned %lld finished job(s) older than %u h", (long long)n, r->cfg.retention_hours);
        }
    }
    if (r->stopping) {
        r->maint_busy = false;
        maybe_stopped(r);
        return;
    }
    mh__jobs_prune_fetch(r->db, r->cfg.fetch_cache_s, fetch_pruned_cb, r);
}

static void maint_cb(uv_timer_t *t)
{
    mh_jobs_t *r = t->data;
    if (r->maint_busy || r->stopping) return;
    r->maint_busy = true;
    char hours[16];
    snprintf(hours, sizeof hours, "%u", r->cfg.retention_hours);
    const char *vals[1] = {hours};
    mh_db_exec(r->db, &st_prune, vals, NULL, NULL, prune_cb, r);
}

/* ------------------------------------------------------ start and stop */

int mh_jobs_start(uv_loop_t *loop, mh_db_t *db, mh_store_t *store, const mh_jobs_config_t *cfg, mh_jobs_t **out)
{
    if (!loop || !db || !store || !out) return MH_EINVAL;
    *out = NULL;
    mh_jobs_t *r = calloc(1, sizeof *r);
    if (!r) return MH_ENOMEM;
    r->loop = loop;
    r->db = db;
    r->store = store;
    if (cfg) r->cfg = *cfg;
    mh_jobs_config_t *c = &r->cfg;
    if (!c->concurrency) c->concurrency = 2;
    if (!c->lease_s) c->lease_s = 30;
    if (c->lease_s < 3) c->lease_s = 3; /* a heartbeat every second at least */
    if (!c->poll_ms) c->poll_ms = 2000;
    if (!c->retention_hours) c->retention_hours = 168;
    if (!c->grace_s) c->grace_s = 3600;
    if (!c->fetch_cache_s) c->fetch_cache_s = 86400;
    if (!c->maintenance_s) c->maintenance_s = 60;
    if (!c->max_pack_bytes) c->max_pack_bytes = 2147483648ull;
    if (!c->gc_level) c->gc_level = 9;
    snprintf(r->lease_str, sizeof r->lease_str, "%u", c->lease_s);
    char host[64] = "host";
    gethostname(host, sizeof host - 1);
    host[sizeof host - 1] = 0;
    uint8_t rnd[4] = {0};
    char rhex[9];
    mh_random(rnd, sizeof rnd);
    mh_hex_encode(rhex, rnd, sizeof rnd);
    snprintf(r->worker_id, sizeof r->worker_id, "%s:%d:%s", host, (int)getpid(), rhex);

    int rc = mh_db_listen(db, MH_JOBS_CHANNEL, notify_cb, r);
    if (rc) {
        free(r);
        return rc;
    }
    uv_timer_init(loop, &r->poll);
    uv_timer_init(loop, &r->maint);
    r->poll.data = r->maint.data = r;
    r->open_handles = 2;
    /* The first claim right away: jobs may be waiting since before start. */
    uv_timer_start(&r->poll, poll_cb, 0, c->poll_ms);
    uv_timer_start(&r->maint, maint_cb, 1000, (uint64_t)c->maintenance_s * 1000);
    mh_info("jobs: runner %s started (concurrency %u, lease %u s, retention %u h, pack grace %u s)", r->worker_id,
            c->concurrency, c->lease_s, c->retention_hours, c->grace_s);
    *out = r;
    return 0;
}

static void maybe_stopped(mh_jobs_t *r)
{
    if (!r->stopping || r->stopped || r->claiming || r->running || r->maint_busy || r->open_handles) return;
    r->stopped = true;
    mh_info("jobs: runner %s stopped", r->worker_id);
    if (r->stop_done) r->stop_done(r->stop_arg);
}

static void timer_closed_cb(uv_handle_t *h)
{
    mh_jobs_t *r = h->data;
    r->open_handles--;
    maybe_stopped(r);
}

void mh_jobs_stop(mh_jobs_t *r, void (*done)(void *arg), void *arg)
{
    if (!r || r->stopping) return;
    r->stopping = true;
    r->stop_done = done;
    r->stop_arg = arg;
    if (r->running) mh_info("jobs: stopping; %d running job(s) stop at their next step", r->running);
    uv_timer_stop(&r->poll);
    uv_timer_stop(&r->maint);
    uv_close((uv_handle_t *)&r->poll, timer_closed_cb);
    uv_close((uv_handle_t *)&r->maint, timer_closed_cb);
}

void mh_jobs_free(mh_jobs_t *r) { free(r); }
