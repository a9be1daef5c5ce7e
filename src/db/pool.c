/*
 * pool.c — the connection pool: the public entry points of db.h, the FIFO
 * queue of waiters, held connections, deferred delivery of callbacks,
 * LISTEN, statistics.
 *
 * Invariants:
 *  - One FIFO queue holds both one-shot queries and acquires, so a burst
 *    of queries cannot starve a caller waiting for a held connection. It
 *    is bounded by max_waiters; a waiter older than query_timeout_ms fails
 *    with MH_EDBDOWN (no connection could be had in time).
 *  - A pooled connection is in exactly one place: the idle list, running
 *    an op, held by a caller, or reconnecting (and it rejoins the pool
 *    when it is READY again).
 *  - Every user callback goes through mh__db_defer() and is called from the
 *    uv_idle handle, so none fires from inside the call that started the
 *    operation, and each fires exactly once.
 *  - A held connection is returned in a clean state: a transaction left
 *    open is rolled back first; a connection lost while held stays
 *    "broken" (every query fails with MH_EDBDOWN) until released, so a
 *    transaction can never silently continue on a new session.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "db_int.h"

#define MAX_STMT_NAME 63 /* NAMEDATALEN - 1: longer names are truncated */
#define MAX_BATCH 32     /* one-shot ops sent in one pipeline */
/* How long a waiter waits while the pool has no connection at all and
 * its last attempts failed (PostgreSQL down): SPEC 4.8 wants /readyz
 * (and every request) answered 503 within 2 s, not after the 30 s query
 * timeout (issue 15 item 6). The pool keeps reconnecting in the
 * background (100 ms .. 5 s backoff), so service resumes by itself. */
#define DOWN_WAIT_MS 1000

static void on_idle(uv_idle_t *h);
static void on_wait_timer(uv_timer_t *t);
static uint64_t wait_limit(const mh_db_t *db);
static void db_maybe_finish(mh_db_t *db);
static void listen_sync(mh_dbconn_t *c);

/* ----------------------------------------------------- building ops */

/* Two-pass packer: with base NULL it only measures, then it copies. */
typedef struct {
    uint8_t *base;
    size_t off;
} pk_t;

static void *pk_take(pk_t *pk, size_t n)
{
    size_t off = (pk->off + 15) & ~(size_t)15;
    pk->off = off + n;
    return pk->base ? pk->base + off : NULL;
}

static const char *pk_str(pk_t *pk, const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = pk_take(pk, n);
    if (d) memcpy(d, s, n);
    return d;
}

static int q_nparams(const mh_db_pq_t *q) { return q->stmt ? q->stmt->nparams : q->nparams; }

static int validate(const mh_db_pq_t *qs, int nq)
{
    for (int i = 0; i < nq; i++) {
        const mh_db_pq_t *q = &qs[i];
        int np = q_nparams(q);
        if (q->stmt) {
            if (!q->stmt->name || !q->stmt->sql || !*q->stmt->name ||
                strlen(q->stmt->name) > MAX_STMT_NAME)
                return MH_EINVAL;
        } else if (!q->sql) {
            return MH_EINVAL;
        }
        if (np < 0 || np > 65535 || (np && !q->vals)) return MH_EINVAL;
        for (int j = 0; j < np && q->fmts; j++)
            if (q->fmts[j] == 1 && q->vals[j] && (!q->lens || q->lens[j] < 0)) return MH_EINVAL;
    }
    return 0;
}

/* Lays out (pk->base NULL: measures) one op with copies of its inputs
 * (a COPY's data is not one of them: mh_dbconn_copy_in borrows it). */
static db_op_t *op_layout(pk_t *pk, int kind, const mh_db_pq_t *qs, int nq, const char *simple)
{
    db_op_t *op = pk_take(pk, sizeof *op);
    int cap = kind == OP_QUERY || kind == OP_PIPELINE ? 2 * nq + 1 : 1;
    db_step_t *steps = pk_take(pk, (size_t)cap * sizeof *steps);
    db_q_t *q = pk_take(pk, (size_t)nq * sizeof *q);
    PGresult **results = kind == OP_PIPELINE ? pk_take(pk, (size_t)nq * sizeof *results) : NULL;
    if (op) {
        memset(op, 0, sizeof *op);
        memset(steps, 0, (size_t)cap * sizeof *steps);
        if (results) memset(results, 0, (size_t)nq * sizeof *results);
        op->kind = (uint8_t)kind;
        op->steps = steps;
        op->cap_steps = cap;
        op->q = q;
        op->nq = nq;
        op->results = results;
    }
    for (int i = 0; i < nq; i++) {
        const mh_db_pq_t *src = &qs[i];
        int np = q_nparams(src);
        const char **vals = pk_take(pk, (size_t)np * sizeof *vals);
        int *lens = pk_take(pk, (size_t)np * sizeof *lens);
        int *fmts = src->fmts ? pk_take(pk, (size_t)np * sizeof *fmts) : NULL;
        for (int j = 0; j < np; j++) {
            const char *v = src->vals[j];
            bool bin = src->fmts && src->fmts[j] == 1;
            size_t len = !v ? 0 : bin ? (size_t)src->lens[j] : strlen(v);
            char *d = v ? pk_take(pk, len + 1) : NULL;
            if (!pk->base) continue;
            if (d) {
                memcpy(d, v, len);
                d[len] = '\0';
            }
            vals[j] = d;
            lens[j] = (int)len;
            if (fmts) fmts[j] = src->fmts[j];
        }
        const char *sql = src->stmt ? NULL : pk_str(pk, src->sql);
        if (q) q[i] = (db_q_t){src->stmt, sql, np, np ? vals : NULL, np ? lens : NULL, fmts};
    }
    const char *s = simple ? pk_str(pk, simple) : NULL;
    if (op) op->simple_sql = s;
    return op;
}

static db_op_t *op_new(mh_db_t *db, int kind, const mh_db_pq_t *qs, int nq, const char *simple, int *err)
{
    *err = validate(qs, nq);
    if (*err) return NULL;
    pk_t pk = {NULL, 0};
    op_layout(&pk, kind, qs, nq, simple);
    pk.base = malloc(pk.off);
    if (!pk.base) {
        *err = MH_ENOMEM;
        return NULL;
    }
    pk.off = 0;
    db_op_t *op = op_layout(&pk, kind, qs, nq, simple);
    op->db = db;
    return op;
}

/* An op that carries only an error (its inputs were refused). */
static db_op_t *op_bare(mh_db_t *db, int kind)
{
    db_op_t *op = calloc(1, sizeof *op);
    if (!op) {
        /* Cannot even record the failure: the callback could never fire. */
        mh_error("db: out of memory");
        abort();
    }
    op->db = db;
    op->kind = (uint8_t)kind;
    return op;
}

void mh__db_op_free(db_op_t *op)
{
    for (int i = 0; i < op->nsteps; i++) PQclear(op->steps[i].res);
    free(op);
}

db_op_t *mh__db_op_internal(mh_db_t *db, const char *sql, void (*done)(mh_dbconn_t *, db_op_t *))
{
    int err;
    db_op_t *op = op_new(db, OP_INTERNAL, NULL, 0, sql, &err);
    if (op) op->internal_done = done;
    return op;
}

/* -------------------------------------------------- deferred delivery */

/* Appends op to the FIFO list head..tail (linked through ->next). */
static void op_append(db_op_t **head, db_op_t **tail, db_op_t *op)
{
    op->next = NULL;
    if (*tail) (*tail)->next = op;
    else *head = op;
    *tail = op;
}

void mh__db_defer(mh_db_t *db, db_op_t *op)
{
    if (db->finishing) {
        /* Called between the end of mh_db_close and its done callback:
         * the idle handle is closing, nothing can be delivered. */
        mh_error("db: operation started after mh_db_close: dropped");
        mh__db_op_free(op);
        return;
    }
    op_append(&db->done_head, &db->done_tail, op);
    if (!uv_is_active((uv_handle_t *)&db->idle)) uv_idle_start(&db->idle, on_idle);
}

static void op_fail(db_op_t *op, int err, const char *msg)
{
    op->err = err;
    snprintf(op->errmsg, sizeof op->errmsg, "%s", msg);
    mh__db_defer(op->db, op);
}

static PGresult *op_result(const db_op_t *op)
{
    PGresult *res = NULL;
    for (int i = 0; i < op->nsteps; i++)
        if (op->steps[i].kind == ST_QUERY || op->steps[i].kind == ST_EXEC ||
            op->steps[i].kind == ST_SIMPLE)
            res = op->steps[i].res;
    return res;
}

/* results[i]: query i's result while no earlier step failed, else NULL. */
static void op_fill_results(db_op_t *op)
{
    bool failed = op->err != 0 && op->nsteps == 0;
    for (int i = 0; i < op->nsteps; i++) {
        const db_step_t *s = &op->steps[i];
        if (s->kind == ST_SYNC) continue;
        bool ok = s->res && (PQresultStatus(s->res) == PGRES_COMMAND_OK ||
                             PQresultStatus(s->res) == PGRES_TUPLES_OK ||
                             PQresultStatus(s->res) == PGRES_EMPTY_QUERY);
        if (!ok) failed = true;
        if (s->kind != ST_PREPARE) op->results[s->qidx] = failed ? NULL : s->res;
    }
}

static void op_deliver(db_op_t *op)
{
    mh_db_t *db = op->db;
    const char *em = NULL;
    if (op->err) {
        db->errors++;
        if (!op->errmsg[0]) snprintf(op->errmsg, sizeof op->errmsg, "%s", mh_strerror(op->err));
        em = op->errmsg;
    }
    switch (op->kind) {
    case OP_ACQUIRE:
        op->cb.conn(op->ud, op->err ? NULL : op->conn, op->err);
        break;
    case OP_PIPELINE:
        op_fill_results(op);
        op->cb.pipe(op->ud, op->results, op->nq, op->err, em);
        break;
    default:
        op->cb.res(op->ud, op->err ? NULL : op_result(op), op->err, em);
        break;
    }
    mh__db_op_free(op);
}

static void on_idle(uv_idle_t *h)
{
    mh_db_t *db = h->data;
    db_op_t *op = db->done_head;
    db->done_head = db->done_tail = NULL;
    /* Ops deferred by these callbacks wait for the next turn. */
    db->delivering = true;
    while (op) {
        db_op_t *next = op->next;
        op_deliver(op);
        op = next;
    }
    db->delivering = false;
    if (!db->done_head) uv_idle_stop(h);
    db_maybe_finish(db);
}

/* ------------------------------------------------------ idle list */

static void idle_push(mh_db_t *db, mh_dbconn_t *c)
{
    c->in_idle = true;
    c->idle_prev = NULL;
    c->idle_next = db->idle_head;
    if (db->idle_head) db->idle_head->idle_prev = c;
    db->idle_head = c;
    db->nidle++;
}

void mh__db_idle_remove(mh_db_t *db, mh_dbconn_t *c)
{
    if (!c->in_idle) return;
    if (c->idle_prev)
        c->idle_prev->idle_next = c->idle_next;
    else
        db->idle_head = c->idle_next;
    if (c->idle_next) c->idle_next->idle_prev = c->idle_prev;
    c->in_idle = false;
    c->idle_prev = c->idle_next = NULL;
    db->nidle--;
}

/* --------------------------------------------------------- dispatch */

static void give(mh_dbconn_t *c, db_op_t *op)
{
    if (op->kind == OP_ACQUIRE) {
        c->held = true;
        c->db->nheld++;
        op->conn = c;
        mh__db_defer(c->db, op);
    } else {
        mh__db_conn_run(c, op);
    }
}

static db_op_t *wait_pop(mh_db_t *db)
{
    db_op_t *op = db->wait_head;
    if (!op) return NULL;
    db->wait_head = op->next;
    if (!db->wait_head) db->wait_tail = NULL;
    db->nwait--;
    op->next = NULL;
    return op;
}

/* c is READY, pooled, not held, no op. Under load (waiters queued) it
 * takes a batch of one-shot ops: its share of the queue, at most
 * MAX_BATCH, so the queue drains in fewer round trips while a slow query
 * holds up only a few others. Acquires are never batched. */
static void conn_available(mh_dbconn_t *c)
{
    mh_db_t *db = c->db;
    if (db->closing) {
        mh__db_conn_shutdown(c);
        return;
    }
    if (mh__db_conn_maybe_recycle(c)) return; /* back when the new session is ready */
    db_op_t *op = wait_pop(db);
    if (!op) {
        idle_push(db, c);
        return;
    }
    if (op->kind != OP_ACQUIRE) {
        uint32_t more = db->nwait / db->pool_size;
        if (more > MAX_BATCH - 1) more = MAX_BATCH - 1;
        for (db_op_t *tail = op; more-- && db->wait_head && db->wait_head->kind != OP_ACQUIRE;)
            tail = tail->next = wait_pop(db);
    }
    give(c, op);
}

static void pool_submit(mh_db_t *db, db_op_t *op)
{
    if (db->closing) {
        op_fail(op, MH_ECANCELED, "the database pool is closing");
        return;
    }
    if (op->kind != OP_ACQUIRE) db->queries++;
    if (!db->wait_head && db->idle_head) {
        mh_dbconn_t *c = db->idle_head;
        mh__db_idle_remove(db, c);
        give(c, op);
        return;
    }
    if (db->nwait >= db->max_waiters) {
        op_fail(op, MH_EDBDOWN, "too many queries waiting for a database connection");
        return;
    }
    op->enq_ms = mh_now_ms();
    op_append(&db->wait_head, &db->wait_tail, op);
    db->nwait++;
    if (!uv_is_active((uv_handle_t *)&db->wait_timer))
        uv_timer_start(&db->wait_timer, on_wait_timer, wait_limit(db), 0);
}

/* True when the database is unreachable as far as the pool can tell:
 * attempts have failed and no connection is up (one held in a
 * transaction counts as up). */
static bool pool_down(const mh_db_t *db)
{
    if (!db->tried) return false;
    for (uint32_t i = 0; i < db->pool_size; i++) {
        const mh_dbconn_t *c = db->conns[i];
        if (c && (c->state == CS_READY || c->state == CS_BUSY)) return false;
    }
    return true;
}

/* How long a waiter may wait, now. */
static uint64_t wait_limit(const mh_db_t *db)
{
    return pool_down(db) && DOWN_WAIT_MS < db->query_timeout_ms ? DOWN_WAIT_MS : db->query_timeout_ms;
}

/* The queue is FIFO, so the head is the oldest waiter: fail the waiters
 * past the limit, then sleep until the head's deadline. */
static void on_wait_timer(uv_timer_t *t)
{
    mh_db_t *db = t->data;
    uint64_t now = mh_now_ms(), limit = wait_limit(db);
    char msg[128];
    if (limit < db->query_timeout_ms)
        snprintf(msg, sizeof msg, "the database is unreachable (no connection; retrying in the background)");
    else
        snprintf(msg, sizeof msg, "no database connection available within %u ms", (unsigned)db->query_timeout_ms);
    while (db->wait_head && db->wait_head->enq_ms + limit <= now) op_fail(wait_pop(db), MH_EDBDOWN, msg);
    if (db->wait_head) uv_timer_start(t, on_wait_timer, db->wait_head->enq_ms + limit - now, 0);
}

void mh__db_conn_unreachable(mh_db_t *db)
{
    db->tried = true;
    /* Waiters queued under the normal limit may be due sooner now. */
    if (db->wait_head && !db->closing) on_wait_timer(&db->wait_timer);
}

static void release_now(mh_dbconn_t *c);

void mh__db_conn_ready(mh_dbconn_t *c)
{
    if (c->is_listen)
        listen_sync(c);
    else if (!c->held)
        conn_available(c);
}

void mh__db_op_finished(mh_dbconn_t *c, db_op_t *op)
{
    if (op->kind == OP_INTERNAL) {
        op->internal_done(c, op);
        mh__db_op_free(op);
        return;
    }
    mh__db_defer(c->db, op);
    if (c->held) {
        if (c->release_pending) release_now(c);
    } else if (c->state == CS_READY) {
        if (c->is_listen)
            listen_sync(c);
        else
            conn_available(c);
    }
}

/* ------------------------------------------------ held connections */

static void rollback_done(mh_dbconn_t *c, db_op_t *op)
{
    if (c->state != CS_READY) return; /* lost: rejoins the pool when reconnected */
    if (op->err || PQtransactionStatus(c->pg) != PQTRANS_IDLE)
        mh__db_conn_lost(c, MH_EDBDOWN, "rollback on release failed: resetting the session");
    else
        conn_available(c);
}

/* Sent to a session given back inside a transaction, in one round trip.
 * A ROLLBACK only hides what its transaction wrote to the session's
 * temporary tables: the rows stay on disk until a COMMIT truncates them
 * (the write path's staging tables live as long as the session, and a
 * refused push would leave up to hundreds of MiB to the next writer), so
 * the tables are dropped too (the next writer creates them again,
 * mh/refwrite.h). DISCARD TEMP may follow ROLLBACK in one simple query. */
#define RELEASE_ROLLBACK "ROLLBACK; DISCARD TEMP"

static void release_now(mh_dbconn_t *c)
{
    mh_db_t *db = c->db;
    bool broken = c->broken;
    c->release_pending = c->broken = c->held = false;
    db->nheld--;
    if (c->state == CS_CLOSED) return;
    if (db->closing) {
        mh__db_conn_shutdown(c);
        return;
    }
    if (c->state != CS_READY) return; /* reconnecting: joins the pool when READY */
    if (broken) {                     /* a fresh session: nothing to roll back */
        conn_available(c);
        return;
    }
    PGTransactionStatusType ts = PQtransactionStatus(c->pg);
    if (ts == PQTRANS_IDLE) {
        conn_available(c);
        return;
    }
    if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR) {
        db_op_t *op = mh__db_op_internal(db, RELEASE_ROLLBACK, rollback_done);
        if (op) {
            mh__db_conn_run(c, op);
            return;
        }
    }
    /* Closing the session rolls back whatever it held. */
    mh__db_conn_lost(c, MH_EDBDOWN, "resetting a released session");
}

void mh_dbconn_release(mh_dbconn_t *c)
{
    if (!c || !c->held || c->release_pending) return;
    if (c->op) {
        c->release_pending = true; /* finishes when the op ends */
        return;
    }
    release_now(c);
}

static void held_submit(mh_dbconn_t *c, db_op_t *op)
{
    op->conn = c;
    if (!c->held) {
        op_fail(op, MH_EINVAL, "the connection is not held");
    } else if (c->op || c->release_pending) {
        op_fail(op, MH_EINVAL, "one query at a time on a held connection");
    } else if (c->broken || c->state != CS_READY) {
        op_fail(op, MH_EDBDOWN, "the database connection was lost");
    } else {
        c->db->queries++;
        mh__db_conn_run(c, op);
    }
}

/* ------------------------------------------------------ public API */

static db_op_t *make(mh_db_t *db, int kind, const mh_db_pq_t *qs, int nq, const char *simple, int *err)
{
    db_op_t *op = op_new(db, kind, qs, nq, simple, err);
    return op ? op : op_bare(db, kind);
}

static void submit(mh_db_t *db, mh_dbconn_t *c, db_op_t *op, int err)
{
    if (err)
        op_fail(op, err, err == MH_ENOMEM ? "out of memory" : "invalid query arguments");
    else if (c)
        held_submit(c, op);
    else
        pool_submit(db, op);
}

static void query_common(mh_db_t *db, mh_dbconn_t *c, const mh_stmt_t *st, const char *sql, int nparams,
                         const char *const *vals, const int *lens, const int *fmts, mh_db_result_cb cb,
                         void *ud)
{
    mh_db_pq_t q = {st, sql, nparams, vals, lens, fmts};
    int err;
    db_op_t *op = make(db, OP_QUERY, &q, 1, NULL, &err);
    op->cb.res = cb;
    op->ud = ud;
    submit(db, c, op, err);
}

void mh_db_query(mh_db_t *db, const char *sql, int nparams, const char *const *vals, const int *lens,
                 const int *fmts, mh_db_result_cb cb, void *ud)
{
    query_common(db, NULL, NULL, sql, nparams, vals, lens, fmts, cb, ud);
}

void mh_db_exec(mh_db_t *db, const mh_stmt_t *st, const char *const *vals, const int *lens,
                const int *fmts, mh_db_result_cb cb, void *ud)
{
    query_common(db, NULL, st, NULL, 0, vals, lens, fmts, cb, ud);
}

void mh_dbconn_query(mh_dbconn_t *c, const char *sql, int nparams, const char *const *vals,
                     const int *lens, const int *fmts, mh_db_result_cb cb, void *ud)
{
    query_common(c->db, c, NULL, sql, nparams, vals, lens, fmts, cb, ud);
}

void mh_dbconn_exec(mh_dbconn_t *c, const mh_stmt_t *st, const char *const *vals, const int *lens,
                    const int *fmts, mh_db_result_cb cb, void *ud)
{
    query_common(c->db, c, st, NULL, 0, vals, lens, fmts, cb, ud);
}

void mh_dbconn_script(mh_dbconn_t *c, const char *sql, mh_db_result_cb cb, void *ud)
{
    int err = MH_EINVAL;
    db_op_t *op = sql ? make(c->db, OP_SCRIPT, NULL, 0, sql, &err) : op_bare(c->db, OP_SCRIPT);
    op->cb.res = cb;
    op->ud = ud;
    submit(c->db, c, op, err);
}

void mh_dbconn_copy_in(mh_dbconn_t *c, const char *copy_sql, const void *data, size_t n,
                       mh_db_result_cb cb, void *ud)
{
    int err = 0;
    bool bad = !copy_sql || (n && !data);
    db_op_t *op = bad ? op_bare(c->db, OP_COPY) : make(c->db, OP_COPY, NULL, 0, copy_sql, &err);
    if (bad) err = MH_EINVAL;
    /* Borrowed, not copied (mh/db.h): a push's snapshot rows are hundreds
     * of MiB on a long history, and a copy doubled them. */
    op->copy_data = err ? NULL : data;
    op->copy_n = err ? 0 : n;
    op->cb.res = cb;
    op->ud = ud;
    submit(c->db, c, op, err);
}

static void pipeline_common(mh_db_t *db, mh_dbconn_t *c, const mh_db_pq_t *qs, int n,
                            mh_db_pipeline_cb cb, void *ud)
{
    int err = 0;
    bool bad = n <= 0 || !qs || n > 100000;
    db_op_t *op = bad ? op_bare(db, OP_PIPELINE) : make(db, OP_PIPELINE, qs, n, NULL, &err);
    if (bad) err = MH_EINVAL;
    op->cb.pipe = cb;
    op->ud = ud;
    submit(db, c, op, err);
}

void mh_dbconn_pipeline(mh_dbconn_t *c, const mh_db_pq_t *qs, int n, mh_db_pipeline_cb cb, void *ud)
{
    pipeline_common(c->db, c, qs, n, cb, ud);
}

void mh_db_pipeline(mh_db_t *db, const mh_db_pq_t *qs, int n, mh_db_pipeline_cb cb, void *ud)
{
    pipeline_common(db, NULL, qs, n, cb, ud);
}

void mh_db_acquire(mh_db_t *db, mh_db_conn_cb cb, void *ud)
{
    db_op_t *op = op_bare(db, OP_ACQUIRE);
    op->cb.conn = cb;
    op->ud = ud;
    pool_submit(db, op);
}

/* ------------------------------------------------------------ LISTEN */

static void listen_done(mh_dbconn_t *c, db_op_t *op)
{
    if (c->state != CS_READY) return; /* lost: LISTENs again when reconnected */
    if (op->err) mh_error("db: LISTEN failed: %s", op->errmsg);
    c->listened = op->internal_arg; /* even on error: do not loop on it */
    listen_sync(c);
}

/* Sends LISTEN for the channels this session does not listen to yet. */
static void listen_sync(mh_dbconn_t *c)
{
    mh_db_t *db = c->db;
    if (c->state != CS_READY || c->op || c->listened >= db->nchans) return;
    mh_buf_t sql = {0};
    int rc = 0;
    for (size_t i = c->listened; i < db->nchans && !rc; i++) {
        const char *ch = db->chans[i].channel;
        char *id = PQescapeIdentifier(c->pg, ch, strlen(ch));
        rc = id ? mh_buf_printf(&sql, "LISTEN %s;", id) : MH_ENOMEM;
        PQfreemem(id);
    }
    db_op_t *op = rc ? NULL : (mh_buf_append_byte(&sql, 0) ? NULL : mh__db_op_internal(db, (char *)sql.p, listen_done));
    mh_buf_free(&sql);
    if (!op) {
        mh__db_conn_lost(c, MH_ENOMEM, "out of memory building LISTEN");
        return;
    }
    op->internal_arg = db->nchans;
    mh__db_conn_run(c, op);
}

void mh__db_notify(mh_db_t *db, const char *channel, const char *payload)
{
    /* Index loop: a callback may add channels (realloc). */
    for (size_t i = 0; i < db->nchans && !db->closing; i++)
        if (!strcmp(db->chans[i].channel, channel)) db->chans[i].cb(db->chans[i].ud, channel, payload);
}

int mh_db_listen(mh_db_t *db, const char *channel,
                 void (*cb)(void *ud, const char *channel, const char *payload), void *ud)
{
    if (!db || !channel || !*channel || strlen(channel) > MAX_STMT_NAME || !cb) return MH_EINVAL;
    if (db->closing) return MH_ECANCELED;
    if (db->nchans == db->capchans) {
        size_t cap = db->capchans ? 2 * db->capchans : 8;
        db_chan_t *ch = realloc(db->chans, cap * sizeof *ch);
        if (!ch) return MH_ENOMEM;
        db->chans = ch;
        db->capchans = cap;
    }
    char *name = strdup(channel);
    if (!name) return MH_ENOMEM;
    db->chans[db->nchans++] = (db_chan_t){name, cb, ud};
    if (!db->listen) {
        db->listen = mh__db_conn_new(db, true);
        if (!db->listen) {
            free(db->chans[--db->nchans].channel);
            return MH_ENOMEM;
        }
    } else {
        listen_sync(db->listen);
    }
    return 0;
}

/* ------------------------------------------------- open, close, stats */

static char *options_with_timeout(const char *url, uint32_t timeout_ms, int *err)
{
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(url, &perr);
    if (!opts) {
        size_t n = perr ? strcspn(perr, "\n") : 0;
        mh_error("db: invalid database URL: %.*s", (int)n, perr ? perr : "");
        PQfreemem(perr);
        *err = perr ? MH_EINVAL : MH_ENOMEM;
        return NULL;
    }
    const char *base = NULL;
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (!strcmp(o->keyword, "options") && o->val && *o->val) base = o->val;
    if (!base) base = getenv("PGOPTIONS");
    char *s = NULL;
    /* The URL's own options are kept: jit=off goes before them (a URL may
     * turn JIT back on, mh/db.h), the timeout after (later -c wins). */
    if (asprintf(&s, "-c jit=off %s%s-c statement_timeout=%u", base ? base : "", base && *base ? " " : "",
                 (unsigned)timeout_ms) < 0)
        s = NULL;
    PQconninfoFree(opts);
    *err = s ? 0 : MH_ENOMEM;
    return s;
}

int mh_db_open(uv_loop_t *loop, const mh_db_config_t *cfg, mh_db_t **out)
{
    *out = NULL;
    /* statement_timeout is an int4 of milliseconds on the server. */
    if (!loop || !cfg || !cfg->url || cfg->pool_size > 1000 || cfg->query_timeout_ms > INT32_MAX)
        return MH_EINVAL;
    mh_db_t *db = calloc(1, sizeof *db);
    if (!db) return MH_ENOMEM;
    db->loop = loop;
    db->pool_size = cfg->pool_size ? cfg->pool_size : 8;
    db->query_timeout_ms = cfg->query_timeout_ms ? cfg->query_timeout_ms : 30000;
    db->max_waiters = cfg->max_waiters ? cfg->max_waiters : 4096;
    int err = 0;
    db->url = strdup(cfg->url);
    db->options = db->url ? options_with_timeout(cfg->url, db->query_timeout_ms, &err) : NULL;
    db->conns = calloc(db->pool_size, sizeof *db->conns);
    if (!db->url || !db->options || !db->conns) {
        free(db->url);
        free(db->options);
        free(db->conns);
        free(db);
        return err ? err : MH_ENOMEM;
    }
    /* Later keywords override what the expanded URL says. */
    db->keys[0] = "dbname", db->vals[0] = db->url;
    db->keys[1] = "application_name", db->vals[1] = "musehubd";
    db->keys[2] = "options", db->vals[2] = db->options;
    uv_idle_init(loop, &db->idle);
    db->idle.data = db;
    uv_timer_init(loop, &db->wait_timer);
    db->wait_timer.data = db;
    for (uint32_t i = 0; i < db->pool_size; i++) {
        db->conns[i] = mh__db_conn_new(db, false);
        if (!db->conns[i]) {
            mh_db_close(db, NULL, NULL); /* freed on a later loop turn */
            return MH_ENOMEM;
        }
    }
    *out = db;
    return 0;
}

static void handle_closed(uv_handle_t *h)
{
    mh_db_t *db = h->data;
    if (--db->nhandles) return;
    void (*done)(void *) = db->close_done;
    void *arg = db->close_arg;
    for (size_t i = 0; i < db->nchans; i++) free(db->chans[i].channel);
    free(db->chans);
    free(db->conns);
    free(db->url);
    free(db->options);
    free(db);
    if (done) done(arg);
}

static void db_maybe_finish(mh_db_t *db)
{
    if (!db->closing || db->finishing || db->delivering || db->nopen || db->done_head) return;
    db->finishing = true;
    db->nhandles = 2;
    uv_close((uv_handle_t *)&db->idle, handle_closed);
    uv_close((uv_handle_t *)&db->wait_timer, handle_closed);
}

void mh__db_conn_freed(mh_db_t *db, mh_dbconn_t *c)
{
    for (uint32_t i = 0; i < db->pool_size; i++)
        if (db->conns[i] == c) db->conns[i] = NULL;
    if (db->listen == c) db->listen = NULL;
    db->nopen--;
    db_maybe_finish(db);
}

void mh_db_close(mh_db_t *db, void (*done)(void *arg), void *arg)
{
    if (!db || db->closing) return;
    db->closing = true;
    db->close_done = done;
    db->close_arg = arg;
    uv_timer_stop(&db->wait_timer);
    db_op_t *op;
    while ((op = wait_pop(db))) op_fail(op, MH_ECANCELED, "the database pool is closing");
    /* Busy ones close when their op ends, held ones when released. */
    for (uint32_t i = 0; i < db->pool_size; i++) {
        mh_dbconn_t *c = db->conns[i];
        if (c && !c->held && !c->op) mh__db_conn_shutdown(c);
    }
    if (db->listen) mh__db_conn_shutdown(db->listen);
    db_maybe_finish(db);
}

void mh_db_stats(mh_db_t *db, mh_db_stats_t *st)
{
    *st = (mh_db_stats_t){.size = db->pool_size, .idle = db->nidle, .held = db->nheld, .waiters = db->nwait,
                          .queries = db->queries, .errors = db->errors, .reconnects = db->reconnects};
    for (uint32_t i = 0; i < db->pool_size; i++) {
        const mh_dbconn_t *c = db->conns[i];
        if (c && (c->state == CS_READY || c->state == CS_BUSY)) st->connected++;
    }
}

int mh_db_metrics_write(mh_db_t *db, mh_buf_t *out)
{
    mh_db_stats_t st;
    mh_db_stats(db, &st);
    static const char *const help[] = {
        "musehub_db_pool_size", "gauge", "PostgreSQL connections configured per process",
        "musehub_db_pool_connected", "gauge", "PostgreSQL connections currently established",
        "musehub_db_pool_idle", "gauge", "Connected and unused pool connections",
        "musehub_db_pool_held", "gauge", "Connections held for transactions",
        "musehub_db_pool_waiters", "gauge", "Operations waiting for a connection",
        "musehub_db_queries_total", "counter", "Database operations started",
        "musehub_db_errors_total", "counter", "Database operations that failed",
        "musehub_db_reconnects_total", "counter", "Sessions re-established after a loss",
    };
    uint64_t v[8] = {st.size, st.connected, st.idle, st.held, st.waiters, st.queries, st.errors, st.reconnects};
    for (int i = 0; i < 8; i++) {
        int rc = mh_buf_printf(out, "# HELP %s %s.\n# TYPE %s %s\n%s %llu\n", help[3 * i], help[3 * i + 2],
                               help[3 * i], help[3 * i + 1], help[3 * i], (unsigned long long)v[i]);
        if (rc) return rc;
    }
    return 0;
}
