/*
 * conn.c — one PostgreSQL connection driven by the libuv loop.
 *
 * libpq runs in non-blocking mode; its socket is watched by a uv_poll_t.
 * A connection goes DOWN -> CONNECTING (PQconnectStartParams, then
 * PQconnectPoll on every readiness event) -> READY <-> BUSY, and back to
 * DOWN (backoff 100 ms .. 5 s) whenever the session is lost.
 *
 * Running an operation: its logical queries become a plan of steps. A
 * single step is sent in normal mode; several steps (a statement used for
 * the first time on this session is PREPAREd and EXECUTEd in the same
 * round trip, or a user pipeline) are sent in pipeline mode closed by one
 * Sync. A batch (several one-shot ops taken from the waiters queue) is
 * one pipeline with one Sync per op: each op is its own implicit
 * transaction and its own error scope, and is reported as soon as its
 * Sync arrives. Then PQflush until 0 (watching UV_WRITABLE meanwhile),
 * and on readability PQconsumeInput and PQgetResult while !PQisBusy, so
 * nothing ever blocks: PQgetResult only blocks when PQisBusy says so.
 *
 * Invariants:
 *  - The op in flight is failed exactly once: by its results, by the
 *    query timer (timeout + 2 s: the session is declared dead) or by the
 *    loss of the session (MH_EDBDOWN, never retried here: the caller
 *    decides because the query may not be idempotent).
 *  - The set of prepared statement names describes the current session;
 *    it is emptied whenever the session goes away.
 *  - During connect libpq may close its socket and open another (next
 *    address, SSL retry) possibly with the same fd number, so every
 *    connect step re-registers the poll handle (or replaces it when the
 *    number changed): epoll silently forgets closed descriptors.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "db_int.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define CLIENT_GRACE_MS 2000 /* client timer = statement_timeout + this */
#define COPY_CHUNK (64 * 1024)
#define CONNECT_WARN_MS 10000
#define DB_BIG_RESULT ((size_t)16 << 20) /* a result this large: recycle the session (mh__db_conn_maybe_recycle) */

static void on_poll(uv_poll_t *h, int status, int events);
static void on_timer(uv_timer_t *t);
static void conn_connect(mh_dbconn_t *c);
static void conn_drain(mh_dbconn_t *c);
static void conn_copy_pump(mh_dbconn_t *c);

/* ------------------------------------------------------------ helpers */

/* Copies the first line of a libpq/server message without its severity
 * prefix ("FATAL:  ..."): callers log and show it, one line reads best. */
static void copy_msg(char *dst, size_t cap, const char *src)
{
    if (!src) src = "";
    static const char *const prefixes[] = {"FATAL:  ", "ERROR:  ", "PANIC:  "};
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
        if (!strncmp(src, prefixes[i], strlen(prefixes[i]))) src += strlen(prefixes[i]);
    size_t n = strcspn(src, "\n");
    while (n && src[n - 1] == ' ') n--;
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

void mh__db_notice_cb(void *arg, const char *message)
{
    (void)arg;
    char msg[256];
    copy_msg(msg, sizeof msg, message);
    mh_debug("db: server notice: %s", msg);
}

static bool status_ok(ExecStatusType st)
{
    return st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY ||
           st == PGRES_SINGLE_TUPLE;
}

/* The one place where PostgreSQL errors become MH_E* codes. */
int mh__db_translate(PGconn *pg, const PGresult *r, char *msg, size_t cap)
{
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    const char *m = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if ((!m || !*m) && r) m = PQresultErrorMessage(r);
    if ((!m || !*m) && r && PQresultStatus(r) == PGRES_PIPELINE_ABORTED)
        m = "pipeline aborted by an earlier error";
    if ((!m || !*m) && pg) m = PQerrorMessage(pg);
    if (msg && cap) copy_msg(msg, cap, m);
    if (state) {
        if (!strcmp(state, "23505") || !strcmp(state, "40001") || !strcmp(state, "40P01"))
            return MH_ECONFLICT;
        if (!strcmp(state, "57014")) return MH_ETIMEDOUT;
        /* class 08 connection_exception; 57P01..03 admin/crash shutdown,
         * cannot_connect_now: the session is gone or going. */
        if (!strncmp(state, "08", 2) || !strcmp(state, "57P01") || !strcmp(state, "57P02") ||
            !strcmp(state, "57P03"))
            return MH_EDBDOWN;
    }
    if (!pg || PQstatus(pg) == CONNECTION_BAD) return MH_EDBDOWN;
    return MH_EDB;
}

/* ------------------------------------------------- prepared-name set */

static uint32_t name_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

static bool prep_has(const mh_dbconn_t *c, const char *name)
{
    if (!c->prep_n) return false;
    uint32_t mask = c->prep_cap - 1;
    for (uint32_t i = name_hash(name) & mask;; i = (i + 1) & mask) {
        if (!c->prep[i]) return false;
        if (c->prep[i] == name || !strcmp(c->prep[i], name)) return true;
    }
}

static void prep_insert(const char **tab, uint32_t cap, const char *name)
{
    uint32_t mask = cap - 1;
    uint32_t i = name_hash(name) & mask;
    while (tab[i]) i = (i + 1) & mask;
    tab[i] = name;
}

/* Records name (which outlives the pool: it belongs to a static
 * mh_stmt_t). On ENOMEM it is simply not recorded, so the statement is
 * prepared again next time and the server answers 42P05, which
 * op_evaluate() accepts. */
static void prep_add(mh_dbconn_t *c, const char *name)
{
    if (prep_has(c, name)) return;
    if (2 * (c->prep_n + 1) > c->prep_cap) {
        uint32_t cap = c->prep_cap ? 2 * c->prep_cap : 32;
        const char **tab = calloc(cap, sizeof *tab);
        if (!tab) return;
        for (uint32_t i = 0; i < c->prep_cap; i++)
            if (c->prep[i]) prep_insert(tab, cap, c->prep[i]);
        free(c->prep);
        c->prep = tab;
        c->prep_cap = cap;
    }
    prep_insert(c->prep, c->prep_cap, name);
    c->prep_n++;
}

/* Rare (a failed PREPARE, or a statement the session lost): rebuild. */
static void prep_remove(mh_dbconn_t *c, const char *name)
{
    if (!prep_has(c, name)) return;
    const char **old = c->prep;
    uint32_t cap = c->prep_cap;
    c->prep = calloc(cap, sizeof *c->prep);
    c->prep_n = 0;
    if (!c->prep) {
        c->prep_cap = 0;
        free(old);
        return;
    }
    for (uint32_t i = 0; i < cap; i++)
        if (old[i] && strcmp(old[i], name)) {
            prep_insert(c->prep, cap, old[i]);
            c->prep_n++;
        }
    free(old);
}

static void prep_clear(mh_dbconn_t *c)
{
    free(c->prep);
    c->prep = NULL;
    c->prep_cap = c->prep_n = 0;
}

/* ---------------------------------------------------- socket watching */

static void poll_close_cb(uv_handle_t *h) { free(h); }

static void conn_unwatch(mh_dbconn_t *c)
{
    if (!c->poll) return;
    /* uv_close stops the watcher at once: the fd may be closed right after. */
    uv_close((uv_handle_t *)c->poll, poll_close_cb);
    c->poll = NULL;
    c->poll_fd = -1;
    c->poll_events = 0;
}

/* Watches libpq's socket for events. `reregister` forces a fresh epoll
 * registration (connect phase: see the file comment). */
static int conn_watch(mh_dbconn_t *c, int events, bool reregister)
{
    int fd = PQsocket(c->pg);
    if (fd < 0) return MH_EIO;
    if (c->poll && c->poll_fd != fd) conn_unwatch(c);
    if (!c->poll) {
        c->poll = malloc(sizeof *c->poll);
        if (!c->poll) return MH_ENOMEM;
        if (uv_poll_init(c->db->loop, c->poll, fd)) {
            free(c->poll);
            c->poll = NULL;
            return MH_EIO;
        }
        c->poll->data = c;
        c->poll_fd = fd;
        c->poll_events = 0;
    } else if (reregister) {
        uv_poll_stop(c->poll);
        c->poll_events = 0;
    }
    if (events != c->poll_events) {
        if (uv_poll_start(c->poll, events, on_poll)) return MH_EIO;
        c->poll_events = events;
    }
    return 0;
}

/* --------------------------------------------------------- lifecycle */

static void timer_close_cb(uv_handle_t *h)
{
    mh_dbconn_t *c = h->data;
    mh_db_t *db = c->db;
    prep_clear(c);
    mh__db_conn_freed(db, c);
    free(c);
}

mh_dbconn_t *mh__db_conn_new(mh_db_t *db, bool is_listen)
{
    mh_dbconn_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->db = db;
    c->is_listen = is_listen;
    c->poll_fd = -1;
    c->backoff_ms = BACKOFF_MIN_MS;
    uv_timer_init(db->loop, &c->timer);
    c->timer.data = c;
    db->nopen++;
    conn_connect(c);
    return c;
}

/* Drops the libpq session (not the struct). */
static void conn_teardown(mh_dbconn_t *c)
{
    uv_timer_stop(&c->timer);
    conn_unwatch(c);
    if (c->pg) PQfinish(c->pg);
    c->pg = NULL;
    prep_clear(c);
    c->listened = 0;
}

static void conn_schedule_retry(mh_dbconn_t *c)
{
    if (c->db->closing && !c->held) {
        mh__db_conn_shutdown(c);
        return;
    }
    c->state = CS_DOWN;
    /* A little jitter so the pools of many processes do not reconnect in
     * lock step after a restart of the server. */
    uint64_t delay = c->backoff_ms + mh_now_us() % (c->backoff_ms / 4 + 1);
    uv_timer_start(&c->timer, on_timer, delay, 0);
    c->backoff_ms = c->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : c->backoff_ms * 2;
}

static void conn_connect_failed(mh_dbconn_t *c, const char *why)
{
    char msg[256];
    copy_msg(msg, sizeof msg, why);
    /* While the server is down every connection retries: one warning per
     * CONNECT_WARN_MS for the whole pool is enough. */
    uint64_t now = mh_now_ms();
    if (!c->db->last_connect_warn_ms || now - c->db->last_connect_warn_ms >= CONNECT_WARN_MS) {
        c->db->last_connect_warn_ms = now;
        mh_warn("db: cannot connect: %s (retrying every %u ms at most)", msg, (unsigned)BACKOFF_MAX_MS);
    } else {
        mh_debug("db: cannot connect: %s (retry in %u ms)", msg, (unsigned)c->backoff_ms);
    }
    c->recycling = false;
    conn_teardown(c);
    conn_schedule_retry(c);
    mh__db_conn_unreachable(c->db);
}

static void conn_connect(mh_dbconn_t *c)
{
    mh_db_t *db = c->db;
    /* May resolve a host name synchronously (libpq's getaddrinfo). */
    c->pg = PQconnectStartParams(db->keys, db->vals, 1);
    if (!c->pg) {
        conn_connect_failed(c, "out of memory");
        return;
    }
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        conn_connect_failed(c, PQerrorMessage(c->pg));
        return;
    }
    PQsetNoticeProcessor(c->pg, mh__db_notice_cb, NULL);
    c->state = CS_CONNECTING;
    uv_timer_start(&c->timer, on_timer, (uint64_t)db->query_timeout_ms + CLIENT_GRACE_MS, 0);
    /* libpq: after PQconnectStart, act as if PQconnectPoll said WRITING. */
    if (conn_watch(c, UV_WRITABLE, true)) conn_connect_failed(c, "cannot watch the socket");
}

static void conn_connected(mh_dbconn_t *c)
{
    mh_db_t *db = c->db;
    uv_timer_stop(&c->timer);
    if (PQsetnonblocking(c->pg, 1)) {
        conn_connect_failed(c, PQerrorMessage(c->pg));
        return;
    }
    c->state = CS_READY;
    c->backoff_ms = BACKOFF_MIN_MS;
    if (c->ever_connected && !c->recycling) {
        db->reconnects++;
        mh_info("db: reconnected (backend pid %d)", PQbackendPID(c->pg));
    }
    c->recycling = false;
    c->ever_connected = true;
    prep_clear(c);
    /* Watch for readability even when idle, to notice a server that
     * closes the session (restart, pg_terminate_backend). */
    if (conn_watch(c, UV_READABLE, true)) {
        mh__db_conn_lost(c, MH_EDBDOWN, "cannot watch the socket");
        return;
    }
    mh__db_conn_ready(c);
}

static void conn_connect_step(mh_dbconn_t *c)
{
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_OK:
        conn_connected(c);
        return;
    case PGRES_POLLING_READING:
        if (conn_watch(c, UV_READABLE, true)) conn_connect_failed(c, "cannot watch the socket");
        return;
    case PGRES_POLLING_WRITING:
        if (conn_watch(c, UV_WRITABLE, true)) conn_connect_failed(c, "cannot watch the socket");
        return;
    default:
        conn_connect_failed(c, PQerrorMessage(c->pg));
        return;
    }
}

/* Drops the session without touching the op (already detached). */
static void conn_drop(mh_dbconn_t *c, const char *why)
{
    char msg[256];
    copy_msg(msg, sizeof msg, why);
    if (c->state == CS_CLOSED) return;
    if (!c->db->closing) mh_warn("db: connection lost: %s", msg);
    mh__db_idle_remove(c->db, c);
    conn_teardown(c);
    if (c->held) c->broken = true;
    conn_schedule_retry(c);
    mh__db_conn_unreachable(c->db);
}

void mh__db_conn_lost(mh_dbconn_t *c, int err, const char *msg)
{
    char why[256];
    copy_msg(why, sizeof why, msg);
    db_op_t *op = c->op;
    c->op = NULL;
    conn_drop(c, why);
    /* The head op gets err; the rest of a batch never ran: MH_EDBDOWN. */
    for (bool head = true; op; head = false) {
        db_op_t *next = op->next;
        op->next = NULL;
        op->err = head ? err : MH_EDBDOWN;
        copy_msg(op->errmsg, sizeof op->errmsg, why);
        if (next)
            mh__db_defer(c->db, op);
        else
            mh__db_op_finished(c, op);
        op = next;
    }
}

void mh__db_conn_shutdown(mh_dbconn_t *c)
{
    if (c->state == CS_CLOSED) return;
    mh__db_idle_remove(c->db, c);
    db_op_t *op = c->op;
    c->op = NULL;
    conn_teardown(c);
    c->state = CS_CLOSED;
    uv_close((uv_handle_t *)&c->timer, timer_close_cb);
    while (op) {
        db_op_t *next = op->next;
        op->next = NULL;
        op->err = MH_ECANCELED;
        copy_msg(op->errmsg, sizeof op->errmsg, "the database pool is closing");
        if (next)
            mh__db_defer(c->db, op);
        else
            mh__db_op_finished(c, op);
        op = next;
    }
}

static void on_timer(uv_timer_t *t)
{
    mh_dbconn_t *c = t->data;
    char msg[128];
    switch (c->state) {
    case CS_DOWN:
        conn_connect(c);
        break;
    case CS_CONNECTING:
        snprintf(msg, sizeof msg, "no connection within %u ms",
                 (unsigned)(c->db->query_timeout_ms + CLIENT_GRACE_MS));
        conn_connect_failed(c, msg);
        break;
    case CS_BUSY:
        snprintf(msg, sizeof msg, "no answer from the database within %u ms",
                 (unsigned)(c->db->query_timeout_ms + CLIENT_GRACE_MS));
        mh__db_conn_lost(c, MH_ETIMEDOUT, msg);
        break;
    default:
        break;
    }
}

/* -------------------------------------------------------- operations */

static void plan_add(db_op_t *op, int kind, int qidx)
{
    db_step_t *s = &op->steps[op->nsteps++];
    s->kind = (uint8_t)kind;
    s->qidx = qidx;
    s->res = NULL;
}

/* Builds the steps for this session: statements not yet prepared here get
 * a PREPARE in the same pipeline as their first execution, at the start
 * of the op's segment so no earlier failure in it can abort the PREPARE
 * (a later op of the same batch relies on it). `pipeline`: part of a
 * batch, so the op is closed by its own Sync even when it is one step. */
static void plan(mh_dbconn_t *c, db_op_t *op, bool pipeline)
{
    op->nsteps = op->recv = 0;
    if (op->kind == OP_SCRIPT || op->kind == OP_COPY || op->kind == OP_INTERNAL) {
        plan_add(op, ST_SIMPLE, -1);
        op->pipelined = false;
        return;
    }
    for (int i = 0; i < op->nq; i++) {
        const mh_stmt_t *st = op->q[i].stmt;
        if (st && !prep_has(c, st->name)) {
            prep_add(c, st->name);
            plan_add(op, ST_PREPARE, i);
        }
    }
    for (int i = 0; i < op->nq; i++) plan_add(op, op->q[i].stmt ? ST_EXEC : ST_QUERY, i);
    op->pipelined = pipeline || op->nsteps > 1;
    if (op->pipelined) plan_add(op, ST_SYNC, -1);
}

static int step_send(mh_dbconn_t *c, db_op_t *op, const db_step_t *s)
{
    PGconn *pg = c->pg;
    const db_q_t *q = s->qidx >= 0 ? &op->q[s->qidx] : NULL;
    switch (s->kind) {
    case ST_QUERY:
        return PQsendQueryParams(pg, q->sql, q->nparams, NULL, q->vals, q->lens, q->fmts, 0);
    case ST_EXEC:
        return PQsendQueryPrepared(pg, q->stmt->name, q->nparams, q->vals, q->lens, q->fmts,
                                   q->stmt->result_format ? 1 : 0);
    case ST_PREPARE:
        return PQsendPrepare(pg, q->stmt->name, q->stmt->sql, q->stmt->nparams, NULL);
    case ST_SYNC:
        return PQpipelineSync(pg);
    default:
        return PQsendQuery(pg, op->simple_sql);
    }
}

/* Flushes libpq's output; returns -1 when the session was lost. */
static int conn_flush(mh_dbconn_t *c)
{
    db_op_t *op = c->op;
    int r = PQflush(c->pg);
    if (r < 0) {
        mh__db_conn_lost(c, MH_EDBDOWN, PQerrorMessage(c->pg));
        return -1;
    }
    op->flushing = r == 1;
    if (conn_watch(c, r == 1 ? UV_READABLE | UV_WRITABLE : UV_READABLE, false)) {
        mh__db_conn_lost(c, MH_EDBDOWN, "cannot watch the socket");
        return -1;
    }
    return 0;
}

void mh__db_conn_run(mh_dbconn_t *c, db_op_t *ops)
{
    bool batch = ops->next != NULL;
    c->op = ops;
    c->state = CS_BUSY;
    for (db_op_t *op = ops; op; op = op->next) plan(c, op, batch);
    if (ops->pipelined && !PQenterPipelineMode(c->pg)) {
        mh__db_conn_lost(c, MH_EDB, PQerrorMessage(c->pg));
        return;
    }
    for (db_op_t *op = ops; op; op = op->next) {
        for (int i = 0; i < op->nsteps; i++) {
            if (step_send(c, op, &op->steps[i])) continue;
            if (!op->pipelined && PQstatus(c->pg) == CONNECTION_OK) {
                /* Refused before anything was queued (bad arguments): the
                 * session is intact, only this op fails. */
                c->op = NULL;
                c->state = CS_READY;
                op->err = MH_EDB;
                copy_msg(op->errmsg, sizeof op->errmsg, PQerrorMessage(c->pg));
                mh__db_op_finished(c, op);
                return;
            }
            /* Half a pipeline may be queued: the session cannot be trusted. */
            mh__db_conn_lost(c, PQstatus(c->pg) == CONNECTION_OK ? MH_EDB : MH_EDBDOWN, PQerrorMessage(c->pg));
            return;
        }
    }
    uv_timer_start(&c->timer, on_timer, (uint64_t)c->db->query_timeout_ms + CLIENT_GRACE_MS, 0);
    conn_flush(c);
}

/* Sets op->err/errmsg from the first failed step and keeps the prepared
 * set true to the session. */
static void op_evaluate(mh_dbconn_t *c, db_op_t *op)
{
    for (int i = 0; i < op->nsteps; i++) {
        db_step_t *s = &op->steps[i];
        ExecStatusType st = s->res ? PQresultStatus(s->res) : PGRES_COMMAND_OK;
        if (s->kind == ST_SYNC || status_ok(st)) continue;
        const char *state = s->res ? PQresultErrorField(s->res, PG_DIAG_SQLSTATE) : NULL;
        if (s->kind == ST_PREPARE && !(state && !strcmp(state, "42P05")))
            prep_remove(c, op->q[s->qidx].stmt->name); /* 42P05: it does exist */
        if (s->kind == ST_EXEC && state && !strcmp(state, "26000"))
            prep_remove(c, op->q[s->qidx].stmt->name); /* the session lost it */
        if (!op->err) op->err = mh__db_translate(c->pg, s->res, op->errmsg, sizeof op->errmsg);
        /* Our own refusal comes back as 57014 query_canceled: not a timeout. */
        if (op->copy_refused && op->err == MH_ETIMEDOUT) op->err = MH_EDB;
    }
}

/* Notes an op whose results are huge (see mh__db_conn_maybe_recycle). */
static void note_big_results(mh_dbconn_t *c, const db_op_t *op)
{
    for (int i = 0; i < op->nsteps; i++)
        if (op->steps[i].res && PQresultMemorySize(op->steps[i].res) > DB_BIG_RESULT) c->recycle = true;
}

bool mh__db_conn_maybe_recycle(mh_dbconn_t *c)
{
    if (!c->recycle || c->op || c->state != CS_READY) return false;
    c->recycle = false;
    c->recycling = true;
    mh_debug("db: reopening a session that received a result over %zu MiB", DB_BIG_RESULT >> 20);
    mh__db_idle_remove(c->db, c);
    conn_teardown(c);
    conn_connect(c);
    return true;
}

static void conn_op_done(mh_dbconn_t *c)
{
    db_op_t *op = c->op;
    c->op = NULL;
    uv_timer_stop(&c->timer);
    c->state = CS_READY;
    op_evaluate(c, op);
    note_big_results(c, op);
    PGTransactionStatusType ts = PQtransactionStatus(c->pg);
    if (op->err == MH_EDBDOWN || PQstatus(c->pg) == CONNECTION_BAD || ts == PQTRANS_UNKNOWN ||
        ts == PQTRANS_ACTIVE || PQpipelineStatus(c->pg) != PQ_PIPELINE_OFF) {
        conn_drop(c, op->errmsg[0] ? op->errmsg : "session in an unexpected state");
    } else if (conn_watch(c, UV_READABLE, false)) {
        conn_drop(c, "cannot watch the socket");
    }
    mh__db_op_finished(c, op);
}

/* The head op of a batch got its Sync: report it, go on with the next.
 * The client timer restarts: the next op began when this one ended. */
static void conn_segment_done(mh_dbconn_t *c)
{
    db_op_t *op = c->op;
    c->op = op->next;
    op->next = NULL;
    op_evaluate(c, op);
    note_big_results(c, op);
    uv_timer_start(&c->timer, on_timer, (uint64_t)c->db->query_timeout_ms + CLIENT_GRACE_MS, 0);
    bool dead = op->err == MH_EDBDOWN || PQstatus(c->pg) == CONNECTION_BAD;
    char msg[256];
    memcpy(msg, op->errmsg, sizeof msg);
    mh__db_defer(c->db, op);
    if (dead) mh__db_conn_lost(c, MH_EDBDOWN, msg[0] ? msg : "connection lost");
}

static void step_store(db_step_t *s, PGresult *r)
{
    if (!s->res) {
        s->res = r;
    } else if (!status_ok(PQresultStatus(s->res))) {
        PQclear(r); /* keep the first error */
    } else {
        PQclear(s->res); /* scripts: keep the last statement's result */
        s->res = r;
    }
}

/* Collects every result available without blocking. */
static void conn_drain(mh_dbconn_t *c)
{
    PGconn *pg = c->pg;
    db_op_t *op;
    while ((op = c->op) && !op->copying) {
        if (PQisBusy(pg)) {
            if (PQstatus(pg) == CONNECTION_BAD) mh__db_conn_lost(c, MH_EDBDOWN, PQerrorMessage(pg));
            return;
        }
        PGresult *r = PQgetResult(pg);
        if (!r) {
            if (!op->pipelined) {
                conn_op_done(c);
                return;
            }
            /* Pipeline: the end of one step's results. The Sync step is
             * answered by its own PGRES_PIPELINE_SYNC result instead. */
            if (op->recv + 1 >= op->nsteps) {
                mh__db_conn_lost(c, MH_EDB, "unexpected end of pipeline results");
                return;
            }
            op->recv++;
            continue;
        }
        switch (PQresultStatus(r)) {
        case PGRES_PIPELINE_SYNC:
            PQclear(r);
            op->recv = op->nsteps;
            if (op->next) {
                conn_segment_done(c);
                continue;
            }
            if (!PQexitPipelineMode(pg)) {
                mh__db_conn_lost(c, MH_EDB, PQerrorMessage(pg));
                return;
            }
            conn_op_done(c);
            return;
        case PGRES_COPY_IN:
            PQclear(r);
            if (op->kind == OP_COPY && !op->copy_started) {
                op->copy_started = op->copying = true;
                conn_copy_pump(c);
                return;
            }
            /* A COPY FROM STDIN nobody feeds: end it with an error so the
             * server reports it and the session stays usable. */
            op->copy_refused = true;
            if (PQputCopyEnd(pg, "COPY FROM STDIN needs mh_dbconn_copy_in") < 0 || conn_flush(c)) {
                if (c->op) mh__db_conn_lost(c, MH_EDBDOWN, PQerrorMessage(pg));
                return;
            }
            break;
        case PGRES_COPY_OUT:
        case PGRES_COPY_BOTH:
            PQclear(r);
            mh__db_conn_lost(c, MH_EDB, "COPY TO STDOUT is not supported");
            return;
        default:
            if (op->recv >= op->nsteps) {
                PQclear(r);
                mh__db_conn_lost(c, MH_EDB, "more results than queries");
                return;
            }
            step_store(&op->steps[op->recv], r);
            break;
        }
    }
}

/* Streams COPY data: chunks go to libpq only while the socket takes them,
 * so libpq's buffer stays around one chunk instead of growing to the
 * whole payload. */
static void conn_copy_pump(mh_dbconn_t *c)
{
    db_op_t *op = c->op;
    PGconn *pg = c->pg;
    while (op->copying) {
        if (op->flushing) return; /* wait for writability */
        int r;
        if (op->copy_off < op->copy_n) {
            size_t k = op->copy_n - op->copy_off;
            if (k > COPY_CHUNK) k = COPY_CHUNK;
            r = PQputCopyData(pg, (const char *)op->copy_data + op->copy_off, (int)k);
            if (r > 0) op->copy_off += k;
        } else {
            r = PQputCopyEnd(pg, NULL);
            if (r > 0) op->copying = false;
        }
        if (r == 0) { /* would block: libpq could not queue it */
            op->flushing = true;
            if (conn_watch(c, UV_READABLE | UV_WRITABLE, false))
                mh__db_conn_lost(c, MH_EDBDOWN, "cannot watch the socket");
            return;
        }
        if (r < 0) {
            if (PQstatus(pg) == CONNECTION_BAD) {
                mh__db_conn_lost(c, MH_EDBDOWN, PQerrorMessage(pg));
                return;
            }
            /* The server ended the COPY (an error): collect the result. */
            op->copying = false;
            break;
        }
        if (conn_flush(c)) return;
    }
    conn_drain(c);
}

static void conn_notifies(mh_dbconn_t *c)
{
    PGnotify *n;
    while (c->pg && (n = PQnotifies(c->pg))) {
        if (c->is_listen) mh__db_notify(c->db, n->relname, n->extra);
        PQfreemem(n);
    }
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    mh_dbconn_t *c = h->data;
    if (c->state == CS_CONNECTING) {
        conn_connect_step(c);
        return;
    }
    if (status < 0) {
        /* libuv reports POLLERR (a reset socket) as UV_EBADF: read what
         * the server said last, it explains the loss better. */
        bool bad = !PQconsumeInput(c->pg) || PQstatus(c->pg) == CONNECTION_BAD;
        mh__db_conn_lost(c, MH_EDBDOWN, bad ? PQerrorMessage(c->pg) : uv_strerror(status));
        return;
    }
    if ((events & UV_READABLE) && !PQconsumeInput(c->pg)) {
        mh__db_conn_lost(c, MH_EDBDOWN, PQerrorMessage(c->pg));
        return;
    }
    conn_notifies(c);
    if (c->state != CS_READY && c->state != CS_BUSY) return; /* a callback closed it */
    db_op_t *op = c->op;
    if (!op) {
        if (PQstatus(c->pg) == CONNECTION_BAD) mh__db_conn_lost(c, MH_EDBDOWN, PQerrorMessage(c->pg));
        return;
    }
    if (op->flushing && conn_flush(c)) return;
    if (op->copying) {
        conn_copy_pump(c);
        return;
    }
    conn_drain(c);
}
