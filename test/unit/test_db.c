/*
 * test_db.c — the db module against a real PostgreSQL.
 *
 * Needs MUSEHUB_TEST_DATABASE_URL (make unit starts a throwaway server);
 * without it only the pure COPY/helper tests run and the rest is skipped.
 * The tests run in a database of their own (mh_test_db, created and
 * dropped here) so they never disturb other test programs.
 *
 * Every callback checks that it was not called from inside the API call
 * that started its operation (in_api counter).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mh/db.h"
#include "tap.h"
#include "testdb.h"

static uv_loop_t *loop;
static uv_timer_t tick;
static mh_db_t *db;
static char *test_url;
static int in_api, reentrant;

#define API(call)                                                              \
    do {                                                                       \
        in_api++;                                                              \
        call;                                                                  \
        in_api--;                                                              \
    } while (0)

static void tick_cb(uv_timer_t *t) { (void)t; }


/* Runs the loop until *v >= target; bails out of the whole program on a
 * timeout (a callback that never fires is a failure, and its user data
 * lives on a stack frame we must not leave). */
static void wait_for(const int *v, int target, int ms, const char *what)
{
    uint64_t end = mh_now_ms() + (uint64_t)ms;
    while (*v < target) {
        if (mh_now_ms() > end) {
            printf("not ok - timed out waiting for %s\nBail out!\n", what);
            fflush(stdout);
            exit(1);
        }
        uv_run(loop, UV_RUN_ONCE);
    }
}

static void spin(int ms)
{
    uint64_t end = mh_now_ms() + (uint64_t)ms;
    while (mh_now_ms() < end) uv_run(loop, UV_RUN_ONCE);
}

/* --------------------------------------------------------- result box */

typedef struct {
    int done, err, ntuples;
    char msg[256], val[256], val2[256], cmd[32];
    uint64_t t_ms;
} res_t;

static void res_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    res_t *r = ud;
    if (in_api) reentrant++;
    r->done++;
    r->err = err;
    r->t_ms = mh_now_ms();
    snprintf(r->msg, sizeof r->msg, "%s", errmsg ? errmsg : "");
    if (res) {
        r->ntuples = PQntuples(res);
        if (r->ntuples > 0 && PQnfields(res) > 0) snprintf(r->val, sizeof r->val, "%s", PQgetvalue(res, 0, 0));
        if (r->ntuples > 0 && PQnfields(res) > 1) snprintf(r->val2, sizeof r->val2, "%s", PQgetvalue(res, 0, 1));
        snprintf(r->cmd, sizeof r->cmd, "%s", PQcmdTuples(res));
    }
}

static res_t Q(const char *sql)
{
    res_t r = {0};
    API(mh_db_query(db, sql, 0, NULL, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 15000, sql);
    return r;
}

static res_t CQ(mh_dbconn_t *c, const char *sql)
{
    res_t r = {0};
    API(mh_dbconn_query(c, sql, 0, NULL, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 15000, sql);
    return r;
}

static res_t CS(mh_dbconn_t *c, const char *sql)
{
    res_t r = {0};
    API(mh_dbconn_script(c, sql, res_cb, &r));
    wait_for(&r.done, 1, 15000, sql);
    return r;
}

typedef struct {
    int done, err;
    mh_dbconn_t *c;
} acq_t;

static void acq_cb(void *ud, mh_dbconn_t *c, int err)
{
    acq_t *a = ud;
    if (in_api) reentrant++;
    a->done++;
    a->err = err;
    a->c = c;
}

static mh_dbconn_t *acquire(mh_db_t *d)
{
    acq_t a = {0};
    API(mh_db_acquire(d, acq_cb, &a));
    wait_for(&a.done, 1, 15000, "acquire");
    return a.c;
}

static mh_db_t *open_pool(uint32_t size, uint32_t timeout_ms, uint32_t max_waiters)
{
    mh_db_config_t cfg = {test_url, size, timeout_ms, max_waiters};
    mh_db_t *d = NULL;
    int rc = mh_db_open(loop, &cfg, &d);
    TAP_EQ_INT(rc, 0, "mh_db_open");
    return d;
}

static void closed_cb(void *arg) { (*(int *)arg)++; }

static void close_pool(mh_db_t *d)
{
    int closed = 0;
    API(mh_db_close(d, closed_cb, &closed));
    wait_for(&closed, 1, 15000, "close");
}

/* ------------------------------------------------ pure helpers (no db) */

static void test_copy_helpers(void)
{
    mh_buf_t b = {0};
    mh_copy_field(&b, "a\tb\\c\nd\re", 9, false);
    mh_copy_field(&b, NULL, 0, false);
    mh_copy_int(&b, -123, false);
    mh_copy_int(&b, INT64_MIN, false);
    mh_copy_int(&b, 0, false);
    const uint8_t bin[3] = {0x00, 0xff, 0x10};
    mh_copy_bytea(&b, bin, 3, false);
    mh_copy_bytea(&b, bin, 0, false);
    mh_copy_field(&b, NULL, 0, true);
    mh_buf_append_byte(&b, 0);
    TAP_EQ_STR((char *)b.p,
               "a\\tb\\\\c\\nd\\re\t\\N\t-123\t-9223372036854775808\t0\t\\\\x00ff10\t\\\\x\t\\N\n",
               "COPY text escaping of fields, NULL, ints, bytea");
    mh_buf_free(&b);
}

static void test_copyb_helpers(void)
{
    mh_buf_t b = {0};
    size_t at;
    TAP_OK(mh_copyb_row(&b, 4) == 0, "binary COPY: a row");
    mh_copyb_field(&b, "ab", 2);
    mh_copyb_field(&b, NULL, 0);
    mh_copyb_int4(&b, -2);
    mh_copyb_open(&b, &at);
    mh_buf_append(&b, "\0\1\2", 3);
    TAP_OK(mh_copyb_close(&b, at) == 0, "binary COPY: a field written in place");
    mh_copyb_end(&b);
    static const uint8_t want[] = {'P', 'G', 'C', 'O', 'P', 'Y', '\n', 0xff, '\r', '\n', 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                   0, 4,                               /* fields */
                                   0, 0, 0, 2, 'a', 'b',               /* text */
                                   0xff, 0xff, 0xff, 0xff,             /* NULL */
                                   0, 0, 0, 4, 0xff, 0xff, 0xff, 0xfe, /* int4 -2 */
                                   0, 0, 0, 3, 0, 1, 2,                /* bytes in place */
                                   0xff, 0xff};                        /* trailer */
    TAP_OK(b.len == sizeof want && memcmp(b.p, want, sizeof want) == 0,
           "binary COPY: header, length-prefixed fields, NULL, int4, trailer (%zu bytes)", b.len);
    b.len = 0;
    mh_copyb_end(&b);
    TAP_OK(b.len == 21 && memcmp(b.p, want, 19) == 0, "binary COPY without rows: header and trailer");
    TAP_OK(mh_copyb_field(&b, "x", (size_t)INT32_MAX + 1) == MH_EINVAL, "binary COPY: a field of 2^31 bytes refused");
    mh_buf_free(&b);
}

/* ---------------------------------------------------------- db tests */

static void test_simple(void)
{
    res_t r = Q("SELECT 1 + 1, 'x'");
    TAP_OK(r.err == 0 && !strcmp(r.val, "2") && !strcmp(r.val2, "x"), "simple query (%d %s)", r.err, r.msg);
    r = Q("SHOW statement_timeout");
    TAP_EQ_STR(r.val, "5s", "statement_timeout set from query_timeout_ms at connect");
    r = Q("SHOW application_name");
    TAP_EQ_STR(r.val, "musehubd", "application_name=musehubd");
    r = Q("SHOW jit");
    TAP_EQ_STR(r.val, "off", "jit=off at connect (mh/db.h)");
    r = Q("");
    TAP_OK(r.done == 1 && r.err == 0, "empty query is not an error");
    r = Q("SELEKT nonsense");
    TAP_OK(r.err == MH_EDB && strstr(r.msg, "syntax error"), "syntax error -> MH_EDB with message '%s'", r.msg);
    r = Q("SELECT 1; SELECT 2");
    TAP_OK(r.err == MH_EDB, "one-shot queries refuse several statements (%s)", r.msg);
}

typedef struct {
    int done, err;
    int isnull;
    uint8_t bytes[16];
    size_t n;
    char text[64];
} params_t;

static void params_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    params_t *p = ud;
    (void)errmsg;
    if (in_api) reentrant++;
    p->done++;
    p->err = err;
    if (!res) return;
    snprintf(p->text, sizeof p->text, "%s", mh_pq_str(res, 0, 0));
    p->isnull = mh_pq_isnull(res, 0, 1) && !strcmp(mh_pq_str(res, 0, 1), "");
    mh_arena_t a;
    mh_arena_init(&a, 0);
    uint8_t *out;
    if (!mh_pq_bytea(&a, res, 0, 2, &out, &p->n) && p->n <= sizeof p->bytes) memcpy(p->bytes, out, p->n);
    mh_arena_release(&a);
}

static void test_params(void)
{
    const uint8_t bin[5] = {0x00, 0x01, 0xfe, 0xff, 0x5c};
    char text[8] = "hé\\'x";
    const char *vals[3] = {text, NULL, (const char *)bin};
    int lens[3] = {0, 0, 5};
    int fmts[3] = {0, 0, 1};
    params_t p = {0};
    API(mh_db_query(db, "SELECT $1::text, $2::int, $3::bytea", 3, vals, lens, fmts, params_cb, &p));
    memset(text, 'Z', sizeof text - 1); /* parameters were copied */
    wait_for(&p.done, 1, 10000, "params");
    TAP_OK(p.err == 0 && !strcmp(p.text, "hé\\'x"), "text parameter round trip (%s)", p.text);
    TAP_OK(p.isnull, "NULL parameter -> SQL NULL, mh_pq_str gives \"\"");
    TAP_OK(p.n == 5 && !memcmp(p.bytes, bin, 5), "binary bytea parameter, mh_pq_bytea decodes \\x form");
    res_t r = Q("SELECT 9223372036854775807::int8, -42");
    TAP_EQ_STR(r.val, "9223372036854775807", "int8 text");
}

/* mh_pq_array: any text round-trips through a text[] parameter. */
static void test_array(void)
{
    static const char *const items[] = {"a", "", "NULL", "null", "x\"y", "b\\c", "sp ace", "{}", "a,b", "\xc3\xa9"};
    mh_arena_t a;
    mh_arena_init(&a, 0);
    const char *vals[1] = {mh_pq_array(&a, items, 10, 0)};
    params_t p = {0};
    API(mh_db_query(db,
                    "SELECT ($1::text[] = ARRAY['a', '', 'NULL', 'null', 'x\"y', E'b\\\\c', 'sp ace', '{}', 'a,b',"
                    " E'\\xc3\\xa9'])::text, NULL::int, '\\x'::bytea",
                    1, vals, NULL, NULL, params_cb, &p));
    wait_for(&p.done, 1, 10000, "array");
    TAP_OK(p.err == 0 && !strcmp(p.text, "true"), "text[] literal round trip (%s: %s)", vals[0], p.text);
    const char *ids[2] = {"sha256:aaXX", "sha256:bbYY"};
    TAP_EQ_STR(mh_pq_array(&a, ids, 2, 9), "{sha256:aa,sha256:bb}", "text[] of fixed-length items");
    mh_arena_release(&a);
}

static const mh_stmt_t st_add = {"t_add", "SELECT $1::int + 1", 1};
static const mh_stmt_t st_kv = {"t_kv", "SELECT v FROM kv WHERE id = $1", 1};

typedef struct {
    int done, bad, next, total, inflight;
    const mh_stmt_t *st;
    mh_db_t *d;
} chain_t;

static void chain_issue(chain_t *ch);

static void chain_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    chain_t *ch = ud;
    (void)errmsg;
    if (in_api) reentrant++;
    ch->done++;
    ch->inflight--;
    if (err || !res || PQntuples(res) != 1) ch->bad++;
    chain_issue(ch);
}

static void chain_issue(chain_t *ch)
{
    while (ch->next < ch->total && ch->inflight < 64) {
        char v[16];
        snprintf(v, sizeof v, "%d", 1 + ch->next % 10000);
        const char *vals[1] = {v};
        ch->next++;
        ch->inflight++;
        API(mh_db_exec(ch->d, ch->st, vals, NULL, NULL, chain_cb, ch));
    }
}

static void test_prepared(void)
{
    /* Sequential and concurrent uses of one statement across the pool. */
    int ok = 0;
    for (int i = 0; i < 50; i++) {
        char v[16];
        snprintf(v, sizeof v, "%d", i);
        const char *vals[1] = {v};
        res_t r = {0};
        API(mh_db_exec(db, &st_add, vals, NULL, NULL, res_cb, &r));
        wait_for(&r.done, 1, 10000, "exec");
        ok += r.err == 0 && atoi(r.val) == i + 1;
    }
    TAP_EQ_INT(ok, 50, "prepared statement, 50 sequential executions");
    chain_t ch = {.total = 2000, .st = &st_add, .d = db};
    chain_issue(&ch);
    wait_for(&ch.done, ch.total, 30000, "exec chain");
    TAP_EQ_INT(ch.bad, 0, "prepared statement, 2000 executions 64 in flight");

    mh_dbconn_t *c = acquire(db);
    for (int i = 0; i < 3; i++) {
        const char *vals[1] = {"5"};
        res_t r = {0};
        API(mh_dbconn_exec(c, &st_add, vals, NULL, NULL, res_cb, &r));
        wait_for(&r.done, 1, 10000, "held exec");
    }
    res_t r = CQ(c, "SELECT count(*) FROM pg_prepared_statements WHERE name = 't_add'");
    TAP_EQ_STR(r.val, "1", "statement prepared once per connection");
    /* The session loses it behind our back: the next exec re-prepares. */
    CQ(c, "DEALLOCATE t_add");
    const char *vals[1] = {"7"};
    r = (res_t){0};
    API(mh_dbconn_exec(c, &st_add, vals, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 10000, "exec after deallocate");
    TAP_OK(r.err == MH_EDB, "exec of a deallocated statement fails once (%s)", r.msg);
    r = (res_t){0};
    API(mh_dbconn_exec(c, &st_add, vals, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 10000, "exec re-prepared");
    TAP_OK(r.err == 0 && !strcmp(r.val, "8"), "then it is prepared again (%s)", r.msg);
    static const mh_stmt_t st_bad = {"t_bad", "SELEKT $1", 1};
    r = (res_t){0};
    API(mh_dbconn_exec(c, &st_bad, vals, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 10000, "bad stmt");
    TAP_OK(r.err == MH_EDB && strstr(r.msg, "syntax"), "a statement that fails to prepare reports it (%s)", r.msg);
    r = CQ(c, "SELECT 1");
    TAP_OK(r.err == 0, "connection fine after a failed prepare");
    mh_dbconn_release(c);
}

typedef struct {
    int done, bad;
    int order[1000];
} fair_t;

typedef struct {
    fair_t *f;
    int i;
} fair_item_t;

static void fair_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    fair_item_t *it = ud;
    (void)errmsg;
    if (in_api) reentrant++;
    if (err || !res || atoi(PQgetvalue(res, 0, 0)) != it->i) it->f->bad++;
    it->f->order[it->f->done++] = it->i;
}

static void test_concurrent(void)
{
    static fair_t f;
    static fair_item_t items[1000];
    char v[16];
    uint64_t t0 = mh_now_ms();
    for (int i = 0; i < 1000; i++) {
        items[i] = (fair_item_t){&f, i};
        snprintf(v, sizeof v, "%d", i);
        const char *vals[1] = {v};
        API(mh_db_query(db, "SELECT $1::int", 1, vals, NULL, NULL, fair_cb, &items[i]));
    }
    mh_db_stats_t st;
    mh_db_stats(db, &st);
    TAP_OK(st.waiters >= 990, "queries beyond the pool wait in the queue (%u)", st.waiters);
    wait_for(&f.done, 1000, 30000, "1000 queries");
    uint64_t ms = mh_now_ms() - t0;
    TAP_EQ_INT(f.bad, 0, "1000 concurrent queries through a pool of 4 all complete");
    /* Under load a free connection takes the next batch of waiters (at
     * most 32), so completions interleave by batch (and a backend the
     * scheduler leaves out finishes late); a LIFO or starving queue would
     * be far off. The exact order is checked on one connection below. */
    int maxdev = 0;
    long sumdev = 0;
    for (int i = 0; i < 1000; i++) {
        int d = abs(f.order[i] - i);
        if (d > maxdev) maxdev = d;
        sumdev += d;
    }
    TAP_OK(sumdev / 1000 <= 100, "completion roughly in submission order (mean distance %ld, max %d)",
           sumdev / 1000, maxdev);
    TAP_COMMENT("1000 one-shot queries, pool of 4: %llu ms", (unsigned long long)ms);
}

/* Strict FIFO on one connection: queries and an acquire queued behind a
 * held connection are served exactly in order. */
static int fifo_seq;

typedef struct {
    int seq;
    int err;
} fifo_item_t;

static void fifo_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    fifo_item_t *it = ud;
    (void)res;
    (void)errmsg;
    if (in_api) reentrant++;
    it->err = err;
    it->seq = ++fifo_seq;
}

static mh_dbconn_t *fifo_conn;
static int fifo_acq_seq;

static void fifo_acq_cb(void *ud, mh_dbconn_t *c, int err)
{
    (void)ud;
    (void)err;
    if (in_api) reentrant++;
    fifo_conn = c;
    fifo_acq_seq = ++fifo_seq;
}

static void test_fifo_exact(void)
{
    mh_db_t *d = open_pool(1, 5000, 0);
    mh_dbconn_t *c = acquire(d);
    static fifo_item_t it[40];
    for (int i = 0; i < 40; i++) {
        it[i] = (fifo_item_t){0, 0};
        if (i == 20) API(mh_db_acquire(d, fifo_acq_cb, NULL));
        API(mh_db_query(d, "SELECT 1", 0, NULL, NULL, NULL, fifo_cb, &it[i]));
    }
    mh_dbconn_release(c);
    wait_for(&fifo_acq_seq, 1, 5000, "queued acquire");
    spin(50);
    int ok = 0;
    for (int i = 0; i < 20; i++) ok += it[i].seq == i + 1 && !it[i].err;
    TAP_OK(ok == 20 && fifo_acq_seq == 21 && it[20].seq == 0, "FIFO: 20 queries, then the queued acquire, in order");
    mh_dbconn_release(fifo_conn);
    wait_for(&it[39].seq, 1, 5000, "rest of the queue");
    ok = 0;
    for (int i = 20; i < 40; i++) ok += it[i].seq == i + 2 && !it[i].err;
    TAP_EQ_INT(ok, 20, "FIFO: then the 20 queries behind it, in order");
    close_pool(d);
}

static void test_copy_transaction(void)
{
    res_t r = Q("CREATE TABLE copy_t (id int8 PRIMARY KEY, name text, data bytea)");
    TAP_OK(r.err == 0, "create table (%s)", r.msg);
    mh_dbconn_t *c = acquire(db);
    TAP_OK(c != NULL, "acquire");
    r = CS(c, "BEGIN; SET LOCAL synchronous_commit = off; SELECT 42");
    TAP_OK(r.err == 0 && !strcmp(r.val, "42"), "script: last statement's result");
    mh_buf_t b = {0};
    const int N = 100000;
    char name[64];
    uint8_t data[8];
    for (int i = 0; i < N; i++) {
        int n = snprintf(name, sizeof name, "row\t%d\\x\n", i);
        memcpy(data, &i, 4);
        memcpy(data + 4, "\0\\\n", 4);
        mh_copy_int(&b, i, false);
        mh_copy_field(&b, i % 7 ? name : NULL, (size_t)n, false);
        mh_copy_bytea(&b, data, 8, true);
    }
    r = (res_t){0};
    uint64_t t0 = mh_now_us();
    API(mh_dbconn_copy_in(c, "COPY copy_t (id, name, data) FROM STDIN", b.p, b.len, res_cb, &r));
    size_t bytes = b.len;
    wait_for(&r.done, 1, 60000, "copy");
    mh_buf_free(&b); /* borrowed until the callback */
    uint64_t us = mh_now_us() - t0;
    TAP_OK(r.err == 0 && !strcmp(r.cmd, "100000"), "COPY 100k rows (%s) %s", r.cmd, r.msg);
    TAP_COMMENT("COPY: %.0f rows/s (%.1f MB in %.0f ms)", N / (us / 1e6), bytes / 1e6, us / 1e3);
    r = CS(c, "COMMIT");
    TAP_OK(r.err == 0, "commit");
    mh_dbconn_release(c);
    r = Q("SELECT count(*), count(name) FROM copy_t");
    TAP_OK(!strcmp(r.val, "100000") && !strcmp(r.val2, "85714"), "rows committed (%s, %s non-null)", r.val, r.val2);
    r = Q("SELECT name = E'row\\t12345\\\\x\\n', data = '\\x39300000005c0a00'::bytea FROM copy_t WHERE id = 12345");
    TAP_OK(!strcmp(r.val, "t") && !strcmp(r.val2, "t"), "escaped text and bytea round trip (%s %s)", r.val, r.val2);

    /* A COPY whose data is wrong: error, connection still usable. */
    c = acquire(db);
    r = (res_t){0};
    API(mh_dbconn_copy_in(c, "COPY copy_t (id, name, data) FROM STDIN", "x\ty\t\\N\n", 7, res_cb, &r));
    wait_for(&r.done, 1, 10000, "bad copy");
    TAP_OK(r.err == MH_EDB && strstr(r.msg, "invalid input"), "bad COPY data -> MH_EDB (%s)", r.msg);
    r = CQ(c, "SELECT 1");
    TAP_OK(r.err == 0, "connection usable after a failed COPY");
    /* Binary format: the values arrive as they were (bytea raw, a NULL, a
     * text with a tab and a backslash, no escaping). */
    r = CQ(c, "CREATE TABLE copyb_t (id int, name text, data bytea)");
    TAP_OK(r.err == 0, "create table (%s)", r.msg);
    mh_buf_t bb = {0};
    for (int i = 0; i < 2; i++) {
        mh_copyb_row(&bb, 3);
        mh_copyb_int4(&bb, 200000 + i);
        mh_copyb_field(&bb, i ? "t\tab\\" : NULL, i ? 5 : 0);
        mh_copyb_field(&bb, "\0\\\n\xff", 4);
    }
    mh_copyb_end(&bb);
    r = (res_t){0};
    API(mh_dbconn_copy_in(c, "COPY copyb_t (id, name, data) FROM STDIN (FORMAT binary)", bb.p, bb.len, res_cb, &r));
    wait_for(&r.done, 1, 10000, "binary copy");
    mh_buf_free(&bb);
    TAP_OK(r.err == 0 && !strcmp(r.cmd, "2"), "binary COPY of 2 rows (%s) %s", r.cmd, r.msg);
    r = CQ(c, "SELECT count(*) FILTER (WHERE name IS NULL AND data = '\\x005c0aff'::bytea),"
              " count(*) FILTER (WHERE name = E't\\tab\\\\' AND data = '\\x005c0aff'::bytea)"
              " FROM copyb_t");
    TAP_OK(!strcmp(r.val, "1") && !strcmp(r.val2, "1"), "binary COPY round trip (%s %s)", r.val, r.val2);
    r = CS(c, "COPY copy_t FROM STDIN");
    TAP_OK(r.err == MH_EDB, "COPY FROM STDIN inside a script is refused cleanly (%s)", r.msg);
    r = CQ(c, "SELECT 2");
    TAP_OK(r.err == 0 && !strcmp(r.val, "2"), "connection usable after that");
    mh_dbconn_release(c);
}

static void test_rollback_on_release(void)
{
    mh_db_stats_t st;
    mh_dbconn_t *c = acquire(db);
    mh_db_stats(db, &st);
    TAP_EQ_INT(st.held, 1, "stats: one held");
    res_t r = CS(c, "BEGIN; INSERT INTO copy_t VALUES (-1, 'pending', NULL)");
    TAP_OK(r.err == 0, "insert inside a transaction");
    mh_dbconn_release(c);
    mh_db_stats(db, &st);
    TAP_EQ_INT(st.held, 0, "stats: none held after release");
    /* Every connection must see no row -1 and be outside a transaction. */
    int seen = 0;
    for (int i = 0; i < 8; i++) {
        r = Q("SELECT count(*) FROM copy_t WHERE id = -1");
        seen += strcmp(r.val, "0") != 0;
    }
    TAP_EQ_INT(seen, 0, "release mid-transaction rolled back");
    c = acquire(db);
    r = CS(c, "BEGIN; SELECT 1/0");
    TAP_OK(r.err == MH_EDB && strstr(r.msg, "division by zero"), "script error reported (%s)", r.msg);
    r = CQ(c, "SELECT 1");
    TAP_OK(r.err == MH_EDB && strstr(r.msg, "aborted"), "transaction in error state (%s)", r.msg);
    mh_dbconn_release(c);
    r = Q("SELECT 'fine'");
    TAP_OK(r.err == 0, "pool fine after releasing a failed transaction");

    /* Release while a query is in flight: the query still reports. */
    c = acquire(db);
    CS(c, "BEGIN");
    r = (res_t){0};
    API(mh_dbconn_query(c, "INSERT INTO copy_t VALUES (-2, 'x', NULL)", 0, NULL, NULL, NULL, res_cb, &r));
    mh_dbconn_release(c);
    wait_for(&r.done, 1, 10000, "in-flight release");
    TAP_OK(r.err == 0, "query in flight at release completes");
    r = Q("SELECT count(*) FROM copy_t WHERE id = -2");
    TAP_EQ_STR(r.val, "0", "and its transaction was rolled back");
}

typedef struct {
    int done, err, n;
    char msg[256];
    int nonnull[8];
    char vals[8][32];
} pipe_t;

static void pipe_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    pipe_t *p = ud;
    if (in_api) reentrant++;
    p->done++;
    p->err = err;
    p->n = n;
    snprintf(p->msg, sizeof p->msg, "%s", errmsg ? errmsg : "");
    for (int i = 0; i < n && i < 8; i++) {
        p->nonnull[i] = results[i] != NULL;
        if (results[i] && PQntuples(results[i]) > 0)
            snprintf(p->vals[i], sizeof p->vals[i], "%s", PQgetvalue(results[i], 0, 0));
    }
}

static void test_pipeline(void)
{
    const char *v3[1] = {"3"};
    mh_db_pq_t ok[5] = {
        {NULL, "SELECT 10", 0, NULL, NULL, NULL},
        {&st_add, NULL, 0, v3, NULL, NULL},
        {NULL, "SELECT $1::int * 2", 1, v3, NULL, NULL},
        {&st_add, NULL, 0, v3, NULL, NULL},
        {NULL, "SELECT 'five'", 0, NULL, NULL, NULL},
    };
    pipe_t p = {0};
    API(mh_db_pipeline(db, ok, 5, pipe_cb, &p));
    wait_for(&p.done, 1, 10000, "pipeline");
    TAP_OK(p.err == 0 && p.n == 5 && !strcmp(p.vals[0], "10") && !strcmp(p.vals[1], "4") &&
               !strcmp(p.vals[2], "6") && !strcmp(p.vals[3], "4") && !strcmp(p.vals[4], "five"),
           "pipeline of 5 queries, results in order (%s)", p.msg);

    static const mh_stmt_t st_new = {"t_new", "SELECT $1::int - 1", 1};
    mh_db_pq_t bad[5] = {
        {NULL, "SELECT 1", 0, NULL, NULL, NULL},
        {&st_new, NULL, 0, v3, NULL, NULL},
        {NULL, "SELECT 1/0", 0, NULL, NULL, NULL},
        {NULL, "SELECT 4", 0, NULL, NULL, NULL},
        {&st_new, NULL, 0, v3, NULL, NULL},
    };
    p = (pipe_t){0};
    API(mh_db_pipeline(db, bad, 5, pipe_cb, &p));
    wait_for(&p.done, 1, 10000, "failing pipeline");
    TAP_OK(p.err == MH_EDB && strstr(p.msg, "division by zero"), "pipeline: first error reported (%s)", p.msg);
    TAP_OK(p.nonnull[0] && p.nonnull[1] && !p.nonnull[2] && !p.nonnull[3] && !p.nonnull[4] &&
               !strcmp(p.vals[1], "2"),
           "pipeline: results before the error kept, NULL from it on");
    /* The same statement on a held connection inside a transaction. */
    mh_dbconn_t *c = acquire(db);
    CS(c, "BEGIN");
    p = (pipe_t){0};
    API(mh_dbconn_pipeline(c, ok, 5, pipe_cb, &p));
    wait_for(&p.done, 1, 10000, "held pipeline");
    TAP_OK(p.err == 0 && !strcmp(p.vals[4], "five"), "pipeline on a held connection in a transaction");
    res_t r = CS(c, "COMMIT");
    TAP_OK(r.err == 0, "commit after pipeline");
    mh_dbconn_release(c);
}

static void test_errors(void)
{
    res_t r = Q("INSERT INTO copy_t VALUES (1, 'dup', NULL)");
    TAP_OK(r.err == MH_ECONFLICT && strstr(r.msg, "duplicate key"), "unique violation -> MH_ECONFLICT (%s)", r.msg);
    mh_dbconn_t *c = acquire(db);
    CS(c, "BEGIN; SET LOCAL statement_timeout = 100");
    uint64_t t0 = mh_now_ms();
    r = CQ(c, "SELECT pg_sleep(3)");
    TAP_OK(r.err == MH_ETIMEDOUT && mh_now_ms() - t0 < 2000, "statement timeout -> MH_ETIMEDOUT (%s)", r.msg);
    mh_dbconn_release(c);
    r = Q("SELECT 1");
    TAP_OK(r.err == 0, "pool fine after a statement timeout");

    /* Refused arguments fail on a later turn, never inside the call. */
    r = (res_t){0};
    API(mh_db_query(db, NULL, 0, NULL, NULL, NULL, res_cb, &r));
    TAP_EQ_INT(r.done, 0, "no callback inside the call");
    wait_for(&r.done, 1, 1000, "einval");
    TAP_EQ_INT(r.err, MH_EINVAL, "NULL sql -> MH_EINVAL");
    static const mh_stmt_t st_long = {"a_statement_name_that_is_much_longer_than_sixty_three_bytes_xxxxxxxxx", "SELECT 1", 0};
    r = (res_t){0};
    API(mh_db_exec(db, &st_long, NULL, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 1000, "long name");
    TAP_EQ_INT(r.err, MH_EINVAL, "statement name over 63 bytes -> MH_EINVAL");

    /* Bounded waiters: pool of 1 held, max 2 waiters. */
    mh_db_t *small = open_pool(1, 5000, 2);
    c = acquire(small);
    res_t w[3] = {{0}};
    for (int i = 0; i < 3; i++) API(mh_db_query(small, "SELECT 1", 0, NULL, NULL, NULL, res_cb, &w[i]));
    wait_for(&w[2].done, 1, 1000, "third waiter");
    TAP_OK(w[2].err == MH_EDBDOWN && !w[0].done, "waiters beyond max_waiters -> MH_EDBDOWN (%s)", w[2].msg);
    mh_dbconn_release(c);
    wait_for(&w[1].done, 1, 5000, "waiters");
    TAP_OK(w[0].err == 0 && w[1].err == 0, "queued waiters run after release");
    /* Closing with waiters queued cancels them. */
    c = acquire(small);
    res_t late = {0};
    API(mh_db_query(small, "SELECT 1", 0, NULL, NULL, NULL, res_cb, &late));
    int closed = 0;
    API(mh_db_close(small, closed_cb, &closed));
    wait_for(&late.done, 1, 5000, "cancelled waiter");
    TAP_EQ_INT(late.err, MH_ECANCELED, "close cancels waiters");
    TAP_EQ_INT(closed, 0, "close waits for the held connection");
    mh_dbconn_release(c);
    wait_for(&closed, 1, 5000, "close after release");
    TAP_EQ_INT(closed, 1, "close completes once it is released");
}

static void test_client_timeout(void)
{
    /* statement_timeout 300 ms; the session disables it, so only the
     * client timer (300 ms + 2 s) can end the query. */
    mh_db_t *d = open_pool(1, 300, 0);
    acq_t a = {0};
    API(mh_db_acquire(d, acq_cb, &a));
    wait_for(&a.done, 1, 5000, "acquire");
    res_t r = CS(a.c, "SET statement_timeout = 0");
    uint64_t t0 = mh_now_ms();
    r = CQ(a.c, "SELECT pg_sleep(10)");
    uint64_t ms = mh_now_ms() - t0;
    TAP_OK(r.err == MH_ETIMEDOUT && ms >= 2200 && ms < 4000, "no answer by timeout + 2 s -> MH_ETIMEDOUT after %llu ms (%s)",
           (unsigned long long)ms, r.msg);
    r = CQ(a.c, "SELECT 1");
    TAP_EQ_INT(r.err, MH_EDBDOWN, "the held connection is dead until released");
    mh_dbconn_release(a.c);
    r = (res_t){0};
    API(mh_db_query(d, "SELECT 'back'", 0, NULL, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 10000, "after client timeout");
    TAP_OK(r.err == 0 && !strcmp(r.val, "back"), "pool reconnected after the client timeout");
    mh_db_stats_t st;
    mh_db_stats(d, &st);
    TAP_OK(st.reconnects >= 1, "reconnects counted (%llu)", (unsigned long long)st.reconnects);
    close_pool(d);
}

static void test_dropped(void)
{
    mh_dbconn_t *c = acquire(db);
    res_t r = CQ(c, "SELECT pg_backend_pid()");
    char pid[256];
    snprintf(pid, sizeof pid, "%s", r.val);
    CS(c, "BEGIN; INSERT INTO copy_t VALUES (-3, 'lost', NULL)");
    res_t inflight = {0};
    API(mh_dbconn_query(c, "SELECT pg_sleep(10)", 0, NULL, NULL, NULL, res_cb, &inflight));
    spin(100);
    const char *vals[1] = {pid};
    r = (res_t){0};
    API(mh_db_query(db, "SELECT pg_terminate_backend($1::int)", 1, vals, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 10000, "terminate");
    TAP_OK(r.err == 0 && !strcmp(r.val, "t"), "terminated backend %s", pid);
    wait_for(&inflight.done, 1, 10000, "in-flight query on dropped connection");
    TAP_OK(inflight.err == MH_EDBDOWN, "in-flight query on a dropped connection -> MH_EDBDOWN (%s)", inflight.msg);
    r = CQ(c, "COMMIT");
    TAP_EQ_INT(r.err, MH_EDBDOWN, "COMMIT on the lost session fails, never runs on a new one");
    mh_dbconn_release(c);
    int ok = 0;
    for (int i = 0; i < 8; i++) ok += Q("SELECT 1").err == 0;
    TAP_EQ_INT(ok, 8, "next queries succeed after the pool reconnects");
    r = Q("SELECT count(*) FROM copy_t WHERE id = -3");
    TAP_EQ_STR(r.val, "0", "the lost transaction did not commit");

    /* Idle connections killed: noticed while idle, replaced. */
    mh_db_stats_t st;
    mh_db_stats(db, &st);
    uint64_t before = st.reconnects;
    r = Q("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'musehubd' "
          "AND state = 'idle' AND pid <> pg_backend_pid() AND datname = current_database()");
    TAP_OK(r.err == 0 && atoi(r.val) >= 2, "terminated %s idle backends", r.val);
    spin(300);
    ok = 0;
    for (int i = 0; i < 20; i++) ok += Q("SELECT 1").err == 0;
    TAP_EQ_INT(ok, 20, "queries succeed after idle connections were dropped");
    spin(300);
    mh_db_stats(db, &st);
    TAP_OK(st.reconnects >= before + (uint64_t)atoi(r.val) && st.connected == 4,
           "reconnected (%llu reconnects, %u connected)", (unsigned long long)st.reconnects, st.connected);
}

typedef struct {
    int got;
    char payload[64];
} note_t;

static void note_cb(void *ud, const char *channel, const char *payload)
{
    note_t *n = ud;
    if (in_api) reentrant++;
    if (strcmp(channel, "mh_chan")) return;
    n->got++;
    snprintf(n->payload, sizeof n->payload, "%s", payload);
}

static bool notify_until(note_t *n, const char *payload)
{
    int start = n->got;
    for (int i = 0; i < 100 && n->got == start; i++) {
        const char *vals[1] = {payload};
        res_t r = {0};
        API(mh_db_query(db, "SELECT pg_notify('mh_chan', $1)", 1, vals, NULL, NULL, res_cb, &r));
        wait_for(&r.done, 1, 5000, "notify");
        spin(50);
    }
    return n->got > start && !strcmp(n->payload, payload);
}

static void test_listen(void)
{
    static note_t n;
    int rc;
    API(rc = mh_db_listen(db, "mh_chan", note_cb, &n));
    TAP_EQ_INT(rc, 0, "mh_db_listen");
    TAP_OK(notify_until(&n, "p1"), "NOTIFY delivered (%s)", n.payload);
    res_t r = Q("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = current_database()");
    TAP_EQ_STR(r.val, "1", "terminated the listening backend");
    TAP_OK(notify_until(&n, "p2"), "NOTIFY delivered after the listener reconnected (%s)", n.payload);
}

static void test_metrics(void)
{
    mh_buf_t b = {0};
    int rc = mh_db_metrics_write(db, &b);
    mh_buf_append_byte(&b, 0);
    const char *s = (const char *)b.p;
    TAP_OK(rc == 0 && strstr(s, "\nmusehub_db_pool_size 4\n") && strstr(s, "musehub_db_pool_connected ") &&
               strstr(s, "musehub_db_pool_idle ") && strstr(s, "musehub_db_pool_held 0\n") &&
               strstr(s, "musehub_db_pool_waiters 0\n") && strstr(s, "musehub_db_queries_total ") &&
               strstr(s, "musehub_db_errors_total ") && strstr(s, "musehub_db_reconnects_total ") &&
               strstr(s, "# TYPE musehub_db_queries_total counter"),
           "Prometheus metrics");
    mh_buf_free(&b);
}

static void test_bench_lookup(void)
{
    res_t r = Q("CREATE TABLE kv (id int PRIMARY KEY, v text)");
    TAP_OK(r.err == 0, "create kv (%s)", r.msg);
    r = Q("INSERT INTO kv SELECT g, 'value ' || g FROM generate_series(1, 10000) g");
    TAP_OK(r.err == 0, "kv table");
    mh_db_t *d = open_pool(8, 5000, 0);
    chain_t warm = {.total = 200, .st = &st_kv, .d = d};
    chain_issue(&warm);
    wait_for(&warm.done, warm.total, 30000, "warm");
    chain_t ch = {.total = 40000, .st = &st_kv, .d = d};
    uint64_t t0 = mh_now_us();
    chain_issue(&ch);
    wait_for(&ch.done, ch.total, 120000, "lookups");
    uint64_t us = mh_now_us() - t0;
    TAP_EQ_INT(ch.bad + warm.bad, 0, "40000 prepared PK lookups, 64 in flight, pool of 8");
    TAP_COMMENT("prepared PK lookup: %.0f queries/s (8 connections, 64 in flight)", ch.total / (us / 1e6));
    close_pool(d);
}

/* Batches: queued one-shot ops share a pipeline but stay independent. */
typedef struct {
    int done, ok, edb, conflict, other;
} tally_t;

typedef struct {
    tally_t *t;
    int i;
    int err;
    char val[32];
} titem_t;

static void tally_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    titem_t *it = ud;
    (void)errmsg;
    if (in_api) reentrant++;
    it->err = err;
    if (res && PQntuples(res) > 0) snprintf(it->val, sizeof it->val, "%s", PQgetvalue(res, 0, 0));
    it->t->done++;
    if (!err)
        it->t->ok++;
    else if (err == MH_EDB)
        it->t->edb++;
    else if (err == MH_ECONFLICT)
        it->t->conflict++;
    else
        it->t->other++;
}

static void test_batches(void)
{
    static const mh_stmt_t st_ins = {"t_ins", "INSERT INTO batch_t VALUES ($1::int) RETURNING x", 1};
    Q("CREATE TABLE batch_t (x int PRIMARY KEY)");
    Q("INSERT INTO batch_t SELECT g * 10 + 5 FROM generate_series(0, 29) g");
    mh_db_t *d = open_pool(2, 5000, 0);
    static titem_t items[300];
    tally_t t = {0};
    char v[16];
    int want_edb = 0, want_conflict = 0;
    for (int i = 0; i < 300; i++) {
        items[i] = (titem_t){&t, i, 0, ""};
        snprintf(v, sizeof v, "%d", i);
        const char *vals[1] = {v};
        if (i % 13 == 0) { /* fails alone */
            API(mh_db_query(d, "SELECT 1/0", 0, NULL, NULL, NULL, tally_cb, &items[i]));
            want_edb++;
        } else if (i % 2) { /* one implicit transaction each */
            API(mh_db_exec(d, &st_ins, vals, NULL, NULL, tally_cb, &items[i]));
            want_conflict += i % 10 == 5;
        } else {
            API(mh_db_query(d, "SELECT $1::int * 2", 1, vals, NULL, NULL, tally_cb, &items[i]));
        }
    }
    wait_for(&t.done, 300, 30000, "batched queries");
    int wrong = 0;
    for (int i = 0; i < 300; i++)
        if (i % 13 && !(i % 2) && atoi(items[i].val) != 2 * i) wrong++;
    TAP_OK(t.edb == want_edb && t.conflict == want_conflict && t.other == 0 && !wrong,
           "batched one-shot queries fail alone (%d/%d errors, %d/%d conflicts, %d other, %d wrong)", t.edb,
           want_edb, t.conflict, want_conflict, t.other, wrong);
    res_t r = Q("SELECT count(*) FROM batch_t");
    int inserted = 0;
    for (int i = 1; i < 300; i += 2) inserted += i % 13 != 0 && i % 10 != 5;
    TAP_EQ_INT(atoi(r.val), 30 + inserted, "every successful insert committed, next to failing ones");

    /* A batch whose connection is killed: every op reports, none hangs. */
    mh_db_t *one = open_pool(1, 5000, 0);
    res_t pid = {0};
    API(mh_db_query(one, "SELECT pg_backend_pid()", 0, NULL, NULL, NULL, res_cb, &pid));
    wait_for(&pid.done, 1, 5000, "pid");
    tally_t k = {0};
    static titem_t kitems[21];
    for (int i = 0; i < 21; i++) {
        kitems[i] = (titem_t){&k, i, 0, ""};
        API(mh_db_query(one, i ? "SELECT pg_sleep(0.05)" : "SELECT pg_sleep(0.3)", 0, NULL, NULL, NULL, tally_cb,
                        &kitems[i]));
    }
    wait_for(&k.done, 1, 5000, "first sleeper");
    spin(200);
    const char *vals[1] = {pid.val};
    r = (res_t){0};
    API(mh_db_query(d, "SELECT pg_terminate_backend($1::int)", 1, vals, NULL, NULL, res_cb, &r));
    wait_for(&k.done, 21, 10000, "killed batch");
    int down = 0;
    for (int i = 0; i < 21; i++) down += kitems[i].err == MH_EDBDOWN;
    TAP_OK(k.ok >= 1 && down >= 1 && k.ok + down == 21, "killed batch: %d ok, %d MH_EDBDOWN", k.ok, down);
    r = (res_t){0};
    API(mh_db_query(one, "SELECT 'again'", 0, NULL, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 10000, "after killed batch");
    TAP_OK(r.err == 0, "pool of one reconnected after the killed batch");
    close_pool(one);
    close_pool(d);
}

static void test_connect_paths(void)
{
    /* Two hosts, the first refusing: libpq closes its first socket and
     * opens another during connect (the poll handle must follow). */
    PQconninfoOption *o = PQconninfoParse(test_url, NULL);
    const char *host = "127.0.0.1", *port = "5432", *user = "", *dbn = "";
    for (PQconninfoOption *p = o; p->keyword; p++) {
        if (!p->val) continue;
        if (!strcmp(p->keyword, "host")) host = p->val;
        if (!strcmp(p->keyword, "port")) port = p->val;
        if (!strcmp(p->keyword, "user")) user = p->val;
        if (!strcmp(p->keyword, "dbname")) dbn = p->val;
    }
    char url[512];
    snprintf(url, sizeof url, "host=127.0.0.1,%s port=1,%s user='%s' dbname='%s'", host, port, user, dbn);
    PQconninfoFree(o);
    mh_db_config_t cfg = {url, 2, 5000, 0};
    mh_db_t *d = NULL;
    TAP_EQ_INT(mh_db_open(loop, &cfg, &d), 0, "open with two hosts");
    res_t r = {0};
    API(mh_db_query(d, "SELECT 'second host'", 0, NULL, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 10000, "multi-host");
    TAP_OK(r.err == 0 && !strcmp(r.val, "second host"), "connects through the second host (%s)", r.msg);
    close_pool(d);

    /* Nothing listening: waiters fail with MH_EDBDOWN after the timeout. */
    cfg = (mh_db_config_t){"postgresql://nobody@127.0.0.1:1/none", 2, 400, 0};
    TAP_EQ_INT(mh_db_open(loop, &cfg, &d), 0, "open an unreachable database (connects in the background)");
    r = (res_t){0};
    acq_t a = {0};
    uint64_t t0 = mh_now_ms();
    API(mh_db_query(d, "SELECT 1", 0, NULL, NULL, NULL, res_cb, &r));
    API(mh_db_acquire(d, acq_cb, &a));
    wait_for(&a.done, 1, 5000, "unreachable acquire");
    uint64_t ms = mh_now_ms() - t0;
    TAP_OK(r.err == MH_EDBDOWN && a.err == MH_EDBDOWN && a.c == NULL && ms >= 350 && ms < 2000,
           "query and acquire fail with MH_EDBDOWN after %llu ms (%s)", (unsigned long long)ms, r.msg);
    mh_db_stats_t st;
    mh_db_stats(d, &st);
    TAP_OK(st.connected == 0 && st.errors == 2, "stats: 0 connected, 2 errors");
    close_pool(d);

    /* The same with the default 30 s timeout (issue 15 item 6, SPEC 4.8):
     * once its attempts failed and no connection is up, the pool answers
     * within 2 s, not after the query timeout; a waiter queued before the
     * first attempt failed is cut short too. */
    cfg = (mh_db_config_t){"postgresql://nobody@127.0.0.1:1/none", 2, 30000, 0};
    TAP_EQ_INT(mh_db_open(loop, &cfg, &d), 0, "open an unreachable database, 30 s query timeout");
    r = (res_t){0};
    t0 = mh_now_ms();
    API(mh_db_query(d, "SELECT 1", 0, NULL, NULL, NULL, res_cb, &r));
    wait_for(&r.done, 1, 5000, "unreachable, first query");
    ms = mh_now_ms() - t0;
    TAP_OK(r.err == MH_EDBDOWN && ms < 2000, "first query: MH_EDBDOWN after %llu ms (%s)", (unsigned long long)ms, r.msg);
    r = (res_t){0};
    a = (acq_t){0};
    t0 = mh_now_ms();
    API(mh_db_query(d, "SELECT 1", 0, NULL, NULL, NULL, res_cb, &r));
    API(mh_db_acquire(d, acq_cb, &a));
    wait_for(&a.done, 1, 5000, "unreachable acquire, 30 s timeout");
    ms = mh_now_ms() - t0;
    TAP_OK(r.err == MH_EDBDOWN && a.err == MH_EDBDOWN && ms < 2000,
           "later query and acquire: MH_EDBDOWN after %llu ms", (unsigned long long)ms);
    close_pool(d);

    cfg = (mh_db_config_t){"host='unterminated", 1, 0, 0};
    TAP_OK(mh_db_open(loop, &cfg, &d) == MH_EINVAL, "invalid conninfo -> MH_EINVAL");

    /* Closing with queries in flight: each reports once, then done. */
    d = open_pool(2, 5000, 0);
    spin(100);
    tally_t t = {0};
    static titem_t items[10];
    for (int i = 0; i < 10; i++) {
        items[i] = (titem_t){&t, i, 0, ""};
        API(mh_db_query(d, "SELECT 1", 0, NULL, NULL, NULL, tally_cb, &items[i]));
    }
    int closed = 0;
    API(mh_db_close(d, closed_cb, &closed));
    wait_for(&closed, 1, 5000, "close with queries in flight");
    int cancelled = 0;
    for (int i = 0; i < 10; i++) cancelled += items[i].err == MH_ECANCELED;
    TAP_OK(t.done == 10 && t.ok + cancelled == 10 && t.ok >= 2, "close: %d in flight completed, %d cancelled", t.ok,
           cancelled);
}

/* ---------------------------------------------------------- migrations */

static const mh_migration_t migs[] = {
    {"t0001_a", "CREATE TABLE mig_a (x int); INSERT INTO mig_a VALUES (1);"},
    {"t0002_b", "ALTER TABLE mig_a ADD COLUMN y int; INSERT INTO mig_a VALUES (2, 2);"},
};

static PGconn *sync_conn(void)
{
    PGconn *pg = PQconnectdb(test_url);
    if (PQstatus(pg) != CONNECTION_OK) {
        printf("not ok - sync connect: %s\nBail out!\n", PQerrorMessage(pg));
        exit(1);
    }
    PQsetNoticeProcessor(pg, testdb_quiet, NULL);
    return pg;
}

static char *sync_val(PGconn *pg, const char *sql)
{
    static char v[128];
    PGresult *r = PQexec(pg, sql);
    snprintf(v, sizeof v, "%s", PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) ? PQgetvalue(r, 0, 0) : "?");
    PQclear(r);
    return v;
}

static void *mig_thread(void *arg)
{
    *(int *)arg = mh_db_migrate(test_url, migs, 2);
    return NULL;
}

static void test_migrations(void)
{
    PGconn *pg = sync_conn();
    PQclear(PQexec(pg, "DROP TABLE IF EXISTS schema_migrations, mig_a"));
    TAP_EQ_INT(mh_db_migrate(test_url, migs, 2), 0, "migrate");
    TAP_EQ_INT(mh_db_migrate(test_url, migs, 2), 0, "migrate again");
    TAP_EQ_STR(sync_val(pg, "SELECT count(*) || '/' || sum(x) FROM mig_a"), "2/3", "each migration applied once");
    TAP_EQ_STR(sync_val(pg, "SELECT string_agg(name, ',' ORDER BY name) FROM schema_migrations"), "t0001_a,t0002_b",
               "recorded");
    PQclear(PQexec(pg, "DROP TABLE IF EXISTS schema_migrations, mig_a"));
    pthread_t t[2];
    int rc[2] = {1, 1};
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, mig_thread, &rc[i]);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    TAP_OK(rc[0] == 0 && rc[1] == 0, "two concurrent migrators both succeed (%d %d)", rc[0], rc[1]);
    TAP_EQ_STR(sync_val(pg, "SELECT count(*) || '/' || sum(x) FROM mig_a"), "2/3", "applied once with two at once");
    const mh_migration_t more[] = {
        migs[0], migs[1],
        {"t0003_c", "INSERT INTO mig_a VALUES (3); SELECT 1/0;"},
        {"t0004_d", "INSERT INTO mig_a VALUES (4);"},
    };
    TAP_EQ_INT(mh_db_migrate(test_url, more, 4), MH_EDB, "a failing migration -> MH_EDB");
    TAP_EQ_STR(sync_val(pg, "SELECT count(*) FROM mig_a"), "2", "nothing of it (or after it) applied");
    TAP_EQ_STR(sync_val(pg, "SELECT count(*) FROM schema_migrations"), "2", "not recorded");
    TAP_EQ_INT(mh_db_migrate("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2", migs, 2), MH_EDBDOWN,
               "unreachable database -> MH_EDBDOWN");
    PQfinish(pg);
}


int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    mh_log_set_level(getenv("MH_TEST_LOG") ? getenv("MH_TEST_LOG") : "error");
    test_copy_helpers();
    test_copyb_helpers();
    const char *base = getenv("MUSEHUB_TEST_DATABASE_URL");
    if (!base || !*base) {
        printf("ok %d # SKIP no database\n", ++tap_n);
        return tap_done();
    }
    testdb_admin(base, "DROP DATABASE IF EXISTS mh_test_db WITH (FORCE)");
    testdb_admin(base, "CREATE DATABASE mh_test_db");
    test_url = testdb_url(base, "mh_test_db");

    loop = uv_default_loop();
    uv_timer_init(loop, &tick);
    uv_timer_start(&tick, tick_cb, 10, 10);
    db = open_pool(4, 5000, 0);
    test_simple();
    test_params();
    test_array();
    test_prepared();
    test_concurrent();
    test_fifo_exact();
    test_copy_transaction();
    test_rollback_on_release();
    test_pipeline();
    test_errors();
    test_client_timeout();
    test_dropped();
    test_batches();
    test_connect_paths();
    test_listen();
    test_metrics();
    test_bench_lookup();
    close_pool(db);
    TAP_EQ_INT(reentrant, 0, "no callback fired from inside the call that started it");
    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    TAP_EQ_INT(uv_loop_close(loop), 0, "every handle closed");

    test_migrations();
    testdb_admin(base, "DROP DATABASE IF EXISTS mh_test_db WITH (FORCE)");
    free(test_url);
    return tap_done();
}
