/*
 * test_jobs.c — unit tests of src/jobs/: the pure helpers (backoff, job
 * types, the consolidated pack of mpack.gc, the COPY rows of
 * mpack.index), then, against a throwaway database
 * (MUSEHUB_TEST_DATABASE_URL; skipped without one), the runner itself:
 * wake-up by NOTIFY, claiming, taking over an expired lease, leaving a
 * live lease alone, permanent failures, retries with backoff up to
 * max_attempts, pruning, the sweep of superseded packs, and stopping.
 */
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mh/db.h"
#include "mh/jobs.h"
#include "mh/mpack.h"
#include "mh/store.h"
#include "tap.h"
#include "testdb.h"

/* ------------------------------------------------------------- pure */

static void test_backoff(void)
{
    TAP_EQ_INT(mh_job_backoff_s(1), 1, "backoff after attempt 1: 1 s");
    TAP_EQ_INT(mh_job_backoff_s(2), 4, "backoff after attempt 2: 4 s");
    TAP_EQ_INT(mh_job_backoff_s(3), 16, "backoff after attempt 3: 16 s");
    TAP_EQ_INT(mh_job_backoff_s(6), 1024, "backoff after attempt 6: 1024 s");
    TAP_EQ_INT(mh_job_backoff_s(7), 3600, "backoff capped at an hour");
    TAP_EQ_INT(mh_job_backoff_s(1000), 3600, "backoff of a huge attempt stays capped");
    TAP_EQ_INT(mh_job_backoff_s(0), 1, "attempt 0 treated as 1");
}

static void test_types(void)
{
    TAP_OK(mh_job_type_known("mpack.index", 11) && mh_job_type_known("mpack.gc", 8), "known job types");
    TAP_OK(!mh_job_type_known("mpack.gcx", 9) && !mh_job_type_known("mpack.g", 7) && !mh_job_type_known("", 0),
           "unknown job types");
}

typedef struct {
    mh_id_t id;
    char content[64];
    size_t len;
} tblob_t;

static void make_blob(tblob_t *b, const char *content)
{
    b->len = strlen(content);
    memcpy(b->content, content, b->len);
    mh_blob_id(b->content, b->len, &b->id);
}

/* mpack.index's COPY rows (refwrite's mh_rw_index_rows): one per
 * distinct object id, v1 rows without a frame, v2 rows with their frame. (GC's pack is the pack
 * builder's: test_packbuild.c.) */
static void test_index_rows(void)
{
    tblob_t tb[3];
    make_blob(&tb[0], "alpha");
    make_blob(&tb[1], "beta");
    make_blob(&tb[2], "gamma");
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_buf_t v0 = {0};
    mh_packw_t w;
    mh_packw_init(&w, &v0);
    mh_packw_commits(&w, 0);
    mh_packw_snapshots(&w, 0);
    mh_packw_blobs(&w, 3);
    mh_packw_blob(&w, (mh_str_t){tb[0].id.s, MH_ID_LEN}, tb[0].content, tb[0].len);
    mh_packw_blob(&w, (mh_str_t){tb[1].id.s, MH_ID_LEN}, tb[1].content, tb[1].len);
    mh_packw_blob(&w, (mh_str_t){tb[0].id.s, MH_ID_LEN}, tb[0].content, tb[0].len);
    mh_packw_branch_heads(&w, 0);
    TAP_EQ_INT(mh_packw_finish(&w), 0, "pack with a repeated blob written");
    mh_packr_t *rd = NULL;
    int rc = mh_packr_new(&a, NULL, MH_PACKR_VERIFY, v0.len, &rd);
    if (!rc) rc = mh_packr_feed(rd, v0.p, v0.len);
    if (!rc) rc = mh_packr_finish(rd);
    const mh_packr_result_t *pr = mh_packr_result(rd);
    mh_buf_t rows = {0}, frows = {0};
    size_t nrows = 0;
    TAP_OK(rc == 0 && mh_rw_index_rows(pr, &rows, &frows, &nrows) == 0, "index rows built");
    TAP_EQ_INT(nrows, 2, "one row per distinct object id");
    TAP_EQ_INT(frows.len, 0, "no frame rows for a v1 pack");
    /* rows in id order, each id once (the first copy's place) */
    char expect[2][256];
    for (int k = 0; k < 2; k++)
        snprintf(expect[k], sizeof expect[k], "%s\t%llu\t%llu\t\\N\n", tb[k].id.s,
                 (unsigned long long)pr->blobs[k].offset, (unsigned long long)pr->blobs[k].length);
    int lo = strcmp(tb[0].id.s, tb[1].id.s) < 0 ? 0 : 1;
    char both[512];
    snprintf(both, sizeof both, "%s%s", expect[lo], expect[1 - lo]);
    TAP_OK(rows.len == strlen(both) && !memcmp(rows.p, both, rows.len),
           "COPY rows: id, offset, length, no frame; in id order");
    mh_packr_free(rd);

    /* v2 (SPEC 2.1, sql/0030): one row per frame, blobs name their frame
     * and their place inside its decompressed bytes. */
    mh_buf_t v2 = {0};
    mh_packw_opts_t wo = {3, false};
    mh_packw_init_v2(&w, &v2, &wo);
    mh_packw_commits(&w, 0);
    mh_packw_snapshots(&w, 0);
    mh_packw_branch_heads(&w, 0);
    mh_packw_frames(&w, 2);
    mh_packw_frame_begin(&w, MH_PACK_ZSTD);
    for (int k = 0; k < 2; k++) {
        mh_packw_frame_blob(&w, (mh_str_t){tb[k].id.s, MH_ID_LEN}, tb[k].len);
        mh_packw_frame_data(&w, tb[k].content, tb[k].len);
    }
    mh_packw_frame_end(&w);
    uint64_t f0_off = w.frame_offset, f0_len = w.frame_length;
    mh_packw_frame_begin(&w, MH_PACK_NONE);
    mh_packw_frame_blob(&w, (mh_str_t){tb[2].id.s, MH_ID_LEN}, tb[2].len);
    mh_packw_frame_data(&w, tb[2].content, tb[2].len);
    mh_packw_frame_end(&w);
    uint64_t f1_off = w.frame_offset, f1_len = w.frame_length;
    TAP_EQ_INT(mh_packw_finish(&w), 0, "v2 pack of two frames written");
    rc = mh_packr_new(&a, NULL, MH_PACKR_NO_DECOMPRESS, v2.len, &rd);
    if (!rc) rc = mh_packr_feed(rd, v2.p, v2.len);
    if (!rc) rc = mh_packr_finish(rd);
    pr = mh_packr_result(rd);
    rows.len = frows.len = 0;
    TAP_OK(rc == 0 && mh_rw_index_rows(pr, &rows, &frows, &nrows) == 0 && nrows == 3, "v2 index rows built");
    char line[3][256], wanted[1024];
    snprintf(line[0], sizeof line[0], "%s\t0\t%zu\t0\n", tb[0].id.s, tb[0].len);
    snprintf(line[1], sizeof line[1], "%s\t%zu\t%zu\t0\n", tb[1].id.s, tb[0].len, tb[1].len);
    snprintf(line[2], sizeof line[2], "%s\t0\t%zu\t1\n", tb[2].id.s, tb[2].len);
    int ord[3] = {0, 1, 2}; /* the lines in id order (each starts with its id) */
    for (int i = 0; i < 3; i++)
        for (int j = i + 1; j < 3; j++)
            if (strcmp(line[ord[j]], line[ord[i]]) < 0) {
                int t = ord[i];
                ord[i] = ord[j];
                ord[j] = t;
            }
    snprintf(wanted, sizeof wanted, "%s%s%s", line[ord[0]], line[ord[1]], line[ord[2]]);
    TAP_OK(rows.len == strlen(wanted) && !memcmp(rows.p, wanted, rows.len),
           "v2 COPY rows: offsets inside the frame, frame_no; in id order");
    snprintf(wanted, sizeof wanted, "0\t%llu\t%llu\tzstd\t%zu\t2\n1\t%llu\t%llu\tnone\t%zu\t1\n",
             (unsigned long long)f0_off, (unsigned long long)f0_len, tb[0].len + tb[1].len,
             (unsigned long long)f1_off, (unsigned long long)f1_len, tb[2].len);
    TAP_OK(frows.len == strlen(wanted) && !memcmp(frows.p, wanted, frows.len),
           "frame rows: data range in the file, codec, size, blob count");
    mh_packr_free(rd);
    mh_buf_free(&v2);
    mh_buf_free(&frows);

    mh_buf_free(&rows);
    mh_buf_free(&v0);
    mh_arena_release(&a);
}

/* ------------------------------------------------------- with a database */

static uv_loop_t *loop;
static PGconn *pg;
static char store_dir[] = "/tmp/mh-test-jobs-XXXXXX";




static void exec_sql(const char *sql)
{
    PGresult *r = PQexec(pg, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
        printf("# %s: %s", sql, PQerrorMessage(pg));
    PQclear(r);
}

/* First column of the first row ("" when no row), copied into buf. */
static const char *scalar(const char *sql, char *buf, size_t size)
{
    PGresult *r = PQexec(pg, sql);
    snprintf(buf, size, "%s", PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
    return buf;
}

/* Runs the loop until `sql` returns `want` or timeout_ms pass. */
static bool wait_for(const char *sql, const char *want, int timeout_ms)
{
    char buf[512];
    uint64_t end = mh_now_ms() + (uint64_t)timeout_ms;
    while (mh_now_ms() < end) {
        for (int i = 0; i < 10; i++) {
            uv_run(loop, UV_RUN_NOWAIT);
            usleep(1000);
        }
        if (!strcmp(scalar(sql, buf, sizeof buf), want)) return true;
    }
    printf("#   waited for %s == '%s', last '%s'\n", sql, want, buf);
    return false;
}

static void spin(int ms)
{
    uint64_t end = mh_now_ms() + (uint64_t)ms;
    while (mh_now_ms() < end) {
        uv_run(loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
}

#define REPO "sha256:1111111111111111111111111111111111111111111111111111111111111111"
#define JOB(n) "sha256:00000000000000000000000000000000000000000000000000000000000000" n

static bool stopped;
static void stopped_cb(void *arg)
{
    (void)arg;
    stopped = true;
}

static bool db_closed;
static void db_closed_cb(void *arg)
{
    (void)arg;
    db_closed = true;
}

static void stop_runner(mh_jobs_t *r)
{
    stopped = false;
    mh_jobs_stop(r, stopped_cb, NULL);
    uint64_t end = mh_now_ms() + 10000;
    while (!stopped && mh_now_ms() < end) uv_run(loop, UV_RUN_ONCE);
    TAP_OK(stopped, "runner stopped");
}

static void test_runner(const char *url)
{
    char buf[512];
    mh_db_t *db = NULL;
    mh_db_config_t dc = {.url = url, .pool_size = 4, .query_timeout_ms = 10000};
    TAP_EQ_INT(mh_db_open(loop, &dc, &db), 0, "pool opened");
    mh_store_t *store = NULL;
    char spec[64];
    snprintf(spec, sizeof spec, "fs:%s", store_dir);
    mh_store_config_t sc = {.spec = spec, .public_url = "http://127.0.0.1:1"};
    TAP_EQ_INT(mh_store_open(loop, &sc, &store), 0, "store opened");

    exec_sql("INSERT INTO repos (repo_id, owner, owner_id, name, slug, visibility) VALUES ('" REPO
             "', 'u', 'sha256:x', 'r', 'r', 'public')");

    /* Phase 1: polling effectively off, so only NOTIFY can wake it. */
    mh_jobs_config_t jc = {.concurrency = 2, .lease_s = 3, .poll_ms = 600000, .maintenance_s = 600};
    mh_jobs_t *r = NULL;
    TAP_EQ_INT(mh_jobs_start(loop, db, store, &jc, &r), 0, "runner started");
    spin(300); /* connected, LISTENing, first (empty) claim done */
    uint64_t t0 = mh_now_ms();
    exec_sql("INSERT INTO jobs (job_id, repo_id, job_type) VALUES ('" JOB("01") "', '" REPO "', 'mpack.gc')");
    TAP_OK(wait_for("SELECT status FROM jobs WHERE job_id = '" JOB("01") "'", "done", 3000),
           "a job inserted after start is run (woken by NOTIFY)");
    TAP_OK(mh_now_ms() - t0 < 1500, "NOTIFY wake-up took %llu ms", (unsigned long long)(mh_now_ms() - t0));
    TAP_EQ_STR(scalar("SELECT result->>'skipped' || ':' || (result->>'packs_before') FROM jobs WHERE job_id = '" JOB(
                          "01") "'",
                      buf, sizeof buf),
               "true:0", "mpack.gc of a repository without packs: skipped, 0 packs");
    stop_runner(r);
    /* Freed only after the pool is closed: its LISTEN callback still
     * points at it (a stopped runner ignores notifications). */
    mh_jobs_t *r1 = r;

    /* Phase 2: fast polling and maintenance. */
    exec_sql("INSERT INTO jobs (job_id, repo_id, job_type, status, attempt, lease_until, locked_by) VALUES ('" JOB(
        "02") "', '" REPO "', 'mpack.gc', 'running', 1, now() - interval '1 second', 'dead-worker')");
    exec_sql("INSERT INTO jobs (job_id, repo_id, job_type, status, attempt, lease_until, locked_by) VALUES ('" JOB(
        "03") "', '" REPO "', 'mpack.gc', 'running', 1, now() + interval '1 hour', 'live-worker')");
    exec_sql("INSERT INTO jobs (job_id, repo_id, job_type) VALUES ('" JOB("04") "', '" REPO "', 'x.unknown')");
    exec_sql("INSERT INTO jobs (job_id, repo_id, job_type, payload) VALUES ('" JOB("05") "', '" REPO
             "', 'mpack.index', '{\"mpack_key\": 5}')");
    exec_sql("INSERT INTO jobs (job_id, repo_id, job_type, payload) VALUES ('" JOB("06") "', '" REPO
             "', 'mpack.index', '{\"mpack_key\": \"sha256:" "2222222222222222222222222222222222222222222222222222222222222222" "\"}')");
    /* A grant whose upload never arrives: a retryable failure. */
    exec_sql("INSERT INTO push_grants (grant_id, repo_id, identity_id, mpack_key, size_bytes, staging_key, expires_at)"
             " VALUES ('g1', '" REPO "', 'sha256:x', 'sha256:3333333333333333333333333333333333333333333333333333333333333333',"
             " 10, 'incoming/g1', now() + interval '1 hour')");
    exec_sql("INSERT INTO jobs (job_id, repo_id, job_type, payload, max_attempts) VALUES ('" JOB("07") "', '" REPO
             "', 'mpack.index', '{\"mpack_key\": \"sha256:3333333333333333333333333333333333333333333333333333333333333333\"}', 2)");
    /* Pruning. */
    exec_sql("INSERT INTO jobs (job_id, repo_id, job_type, status, updated_at) VALUES ('" JOB("08") "', '" REPO
             "', 'mpack.gc', 'done', now() - interval '3 hours')");
    exec_sql("INSERT INTO jobs (job_id, repo_id, job_type, status, updated_at) VALUES ('" JOB("09") "', '" REPO
             "', 'mpack.gc', 'failed', now() - interval '10 minutes')");
    /* Sweep: S1 superseded long ago and unreferenced (goes); S2 still
     * named by a repository, S3 still indexed, S4 within the grace period
     * (all stay). Each has bytes in the store. */
    const char *packs[4] = {"sha256:5100000000000000000000000000000000000000000000000000000000000000",
                            "sha256:5200000000000000000000000000000000000000000000000000000000000000",
                            "sha256:5300000000000000000000000000000000000000000000000000000000000000",
                            "sha256:5400000000000000000000000000000000000000000000000000000000000000"};
    char path[4][256];
    for (int i = 0; i < 4; i++) {
        char sql[512];
        snprintf(sql, sizeof sql,
                 "INSERT INTO mpacks (mpack_id, size_bytes, kind, superseded_at) VALUES ('%s', 1, 'push', now() - "
                 "interval '%s')",
                 packs[i], i == 3 ? "0 seconds" : "2 hours");
        exec_sql(sql);
        snprintf(path[i], sizeof path[i], "%s/mpacks/%s", store_dir, packs[i] + 7);
        FILE *f = fopen(path[i], "w");
        if (f) {
            fputs("x", f);
            fclose(f);
        }
    }
    exec_sql("INSERT INTO mpack_refs (repo_id, mpack_id) VALUES ('" REPO
             "', 'sha256:5200000000000000000000000000000000000000000000000000000000000000')");
    exec_sql("INSERT INTO mpack_index (object_id, mpack_id, byte_offset, byte_length) VALUES ('sha256:o', "
             "'sha256:5300000000000000000000000000000000000000000000000000000000000000', 0, 1)");

    jc = (mh_jobs_config_t){.concurrency = 2, .lease_s = 3, .poll_ms = 50, .maintenance_s = 1,
                            .retention_hours = 1, .grace_s = 3600};
    TAP_EQ_INT(mh_jobs_start(loop, db, store, &jc, &r), 0, "runner restarted");

    /* First: pending:1 lasts only the 1 s retry delay, and the waits for
     * the other jobs below may take longer than that on a loaded run. */
    TAP_OK(wait_for("SELECT status || ':' || attempt FROM jobs WHERE job_id = '" JOB("07") "'", "pending:1", 3000),
           "a retryable failure goes back to pending");
    TAP_EQ_STR(scalar("SELECT (extract(epoch FROM run_after - updated_at) BETWEEN 0.9 AND 1.1)::text FROM jobs"
                      " WHERE job_id = '" JOB("07") "'",
                      buf, sizeof buf),
               "true", "first retry delayed by 1 s");
    TAP_OK(strlen(scalar("SELECT error FROM jobs WHERE job_id = '" JOB("07") "'", buf, sizeof buf)) > 0,
           "the error of the failed attempt is kept");

    TAP_OK(wait_for("SELECT status || ':' || attempt FROM jobs WHERE job_id = '" JOB("02") "'", "done:2", 3000),
           "a running job whose lease expired is taken over (attempt 2) and completed");
    TAP_OK(wait_for("SELECT status || ':' || attempt FROM jobs WHERE job_id = '" JOB("04") "'", "failed:1", 3000),
           "unknown job type: failed at once, not retried");
    TAP_OK(strstr(scalar("SELECT error FROM jobs WHERE job_id = '" JOB("04") "'", buf, sizeof buf), "unknown") != NULL,
           "its error is kept");
    TAP_OK(wait_for("SELECT status || ':' || attempt FROM jobs WHERE job_id = '" JOB("05") "'", "failed:1", 3000),
           "bad payload: failed at once");
    TAP_OK(wait_for("SELECT status || ':' || attempt FROM jobs WHERE job_id = '" JOB("06") "'", "failed:1", 3000),
           "mpack.index of a pack neither referenced nor granted: failed at once (never imported)");
    TAP_OK(wait_for("SELECT status || ':' || attempt FROM jobs WHERE job_id = '" JOB("07") "'", "failed:2", 5000),
           "after max_attempts (2) the job is failed");
    TAP_EQ_STR(scalar("SELECT status || ':' || attempt || ':' || locked_by FROM jobs WHERE job_id = '" JOB("03") "'",
                      buf, sizeof buf),
               "running:1:live-worker", "a job under a live lease is left alone");
    TAP_OK(wait_for("SELECT count(*) FROM jobs WHERE job_id = '" JOB("08") "'", "0", 4000),
           "a job finished before the retention period is pruned");
    TAP_EQ_STR(scalar("SELECT count(*) FROM jobs WHERE job_id = '" JOB("09") "'", buf, sizeof buf), "1",
               "a recently finished job is kept");
    TAP_OK(wait_for("SELECT count(*) FROM mpacks WHERE mpack_id = '" "sha256:5100000000000000000000000000000000000000000000000000000000000000" "'",
                    "0", 4000),
           "sweep: a superseded, unreferenced pack's row is deleted after the grace period");
    spin(200);
    TAP_OK(access(path[0], F_OK) != 0, "sweep: and its bytes");
    TAP_OK(access(path[1], F_OK) == 0 && access(path[2], F_OK) == 0 && access(path[3], F_OK) == 0,
           "sweep: referenced, indexed and recently superseded packs stay");
    TAP_EQ_STR(scalar("SELECT count(*) FROM mpacks WHERE mpack_id LIKE 'sha256:5%'", buf, sizeof buf), "3",
               "sweep: their rows stay");

    stop_runner(r);
    db_closed = false;
    mh_db_close(db, db_closed_cb, NULL);
    mh_store_close(store);
    uint64_t end = mh_now_ms() + 10000;
    while (!db_closed && mh_now_ms() < end) uv_run(loop, UV_RUN_ONCE);
    TAP_OK(db_closed, "pool closed after the runner");
    mh_jobs_free(r);
    mh_jobs_free(r1);
    uv_run(loop, UV_RUN_DEFAULT);
    TAP_EQ_INT(uv_loop_close(loop), 0, "every handle closed");
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    mh_log_set_level(getenv("MH_TEST_LOG") ? getenv("MH_TEST_LOG") : "error");
    test_backoff();
    test_types();
    test_index_rows();
    const char *base = getenv("MUSEHUB_TEST_DATABASE_URL");
    if (!base || !*base) {
        printf("ok %d # SKIP no database\n", ++tap_n);
        return tap_done();
    }
    testdb_admin(base, "DROP DATABASE IF EXISTS mh_test_jobs WITH (FORCE)");
    testdb_admin(base, "CREATE DATABASE mh_test_jobs");
    char *url = testdb_url(base, "mh_test_jobs");
    TAP_EQ_INT(mh_db_migrate(url, mh_migrations, mh_migrations_count), 0, "schema migrated");
    pg = PQconnectdb(url);
    PQsetNoticeProcessor(pg, testdb_quiet, NULL);
    if (!mkdtemp(store_dir)) {
        printf("not ok %d - mkdtemp\n", ++tap_n);
        return 1;
    }
    loop = uv_default_loop();
    test_runner(url);
    PQfinish(pg);
    testdb_admin(base, "DROP DATABASE IF EXISTS mh_test_jobs WITH (FORCE)");
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", store_dir);
    if (system(cmd)) printf("# could not remove %s\n", store_dir);
    free(url);
    return tap_done();
}
