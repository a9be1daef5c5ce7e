/*
 * db_int.h — private structures shared by the db module's files:
 * pool.c (the pool, waiters, deferred delivery, public entry points,
 * LISTEN), conn.c (one libpq connection's state machine on the loop) and
 * migrate.c. Nothing outside src/db includes this.
 *
 * Invariants:
 *  - An operation (db_op_t) is one heap block holding copies of everything
 *    it needs (SQL, parameters, COPY data), so callers may free their
 *    arguments as soon as the call returns.
 *  - A connection runs at most one operation at a time (c->op).
 *  - User callbacks are only ever called from the pool's uv_idle handle
 *    (pool.c: mh__db_defer), never from inside a public call; notifications
 *    are delivered from the listen connection's poll callback.
 *  - A connection struct is freed only in its timer's close callback, so
 *    it stays valid for the rest of any callback that shut it down.
 */
#ifndef MH_DB_INT_H
#define MH_DB_INT_H

#include "mh/db.h"

/* Connection states. */
enum {
    CS_DOWN = 0,   /* no PGconn: waiting for the reconnect timer */
    CS_CONNECTING, /* PQconnectPoll in progress */
    CS_READY,      /* connected, no operation running */
    CS_BUSY,       /* an operation is in flight (c->op) */
    CS_CLOSED,     /* shut down; freed when its timer handle has closed */
};

/* What one step of a plan sends. */
enum {
    ST_QUERY = 0, /* PQsendQueryParams */
    ST_EXEC,      /* PQsendQueryPrepared */
    ST_PREPARE,   /* PQsendPrepare */
    ST_SYNC,      /* PQpipelineSync */
    ST_SIMPLE,    /* PQsendQuery: scripts, COPY, internal commands */
};

/* Operation kinds (what the callback looks like). */
enum {
    OP_QUERY = 0, /* one result: mh_db_query, mh_db_exec, held variants */
    OP_SCRIPT,    /* simple-protocol script */
    OP_COPY,      /* COPY FROM STDIN */
    OP_PIPELINE,  /* n results */
    OP_ACQUIRE,   /* hands out a held connection */
    OP_INTERNAL,  /* ROLLBACK on release, LISTEN: no user callback */
};

typedef struct db_op db_op_t;

/* One step of the plan a connection runs for an operation. */
typedef struct {
    uint8_t kind; /* ST_* */
    int qidx;     /* logical query it belongs to, -1 for SYNC/SIMPLE */
    PGresult *res;/* last result (or first error) received for it */
} db_step_t;

/* One logical query of an operation, with copied parameters. */
typedef struct {
    const mh_stmt_t *stmt; /* prepared statement, or NULL */
    const char *sql;       /* when stmt is NULL */
    int nparams;
    const char **vals;
    int *lens;
    int *fmts; /* NULL = all text */
} db_q_t;

struct db_op {
    db_op_t *next; /* waiters queue / deferred queue */
    mh_db_t *db;
    mh_dbconn_t *conn; /* the held connection (held ops, acquire result) */
    uint8_t kind;      /* OP_* */
    bool pipelined;    /* the current run uses pipeline mode */
    bool flushing;     /* PQflush returned 1: waiting for writability */
    bool copy_started, copying;
    bool copy_refused; /* we ended a COPY FROM STDIN nobody feeds */
    int err;        /* 0 or MH_E* */
    uint64_t enq_ms;/* when it joined the waiters queue */
    int nq;
    db_q_t *q;
    const char *simple_sql; /* OP_SCRIPT, OP_COPY, OP_INTERNAL */
    int nsteps, recv, cap_steps;
    db_step_t *steps;
    const uint8_t *copy_data;
    size_t copy_n, copy_off;
    PGresult **results; /* OP_PIPELINE: nq slots handed to the callback */
    union {
        mh_db_result_cb res;
        mh_db_conn_cb conn;
        mh_db_pipeline_cb pipe;
    } cb;
    void *ud;
    /* OP_INTERNAL: called (with the connection) when it ends. */
    void (*internal_done)(mh_dbconn_t *c, db_op_t *op);
    size_t internal_arg;
    char errmsg[256];
};

struct mh_dbconn {
    mh_db_t *db;
    PGconn *pg;
    uv_poll_t *poll; /* heap: replaced when libpq's socket changes */
    int poll_fd, poll_events;
    uv_timer_t timer; /* connect timeout, query timeout, reconnect backoff */
    uint8_t state;    /* CS_* */
    bool is_listen;   /* the dedicated LISTEN connection (not pooled) */
    bool held;        /* handed out by mh_db_acquire */
    bool broken;      /* lost while held: fails every query until released */
    bool release_pending; /* released while an operation was in flight */
    bool ever_connected;
    bool in_idle;
    bool recycle; /* received a huge result: reopen the session when free (conn.c) */
    bool recycling; /* reopening on purpose: not counted as a reconnect */
    mh_dbconn_t *idle_prev, *idle_next;
    db_op_t *op; /* in flight: the head of a batch when ->next is set */
    uint32_t backoff_ms;
    /* Names of the statements prepared on this session (open addressing,
     * linear probing, cap a power of two, at most half full). */
    const char **prep;
    uint32_t prep_cap, prep_n;
    size_t listened; /* listen connection: channels LISTENed on this session */
};

typedef struct {
    char *channel;
    void (*cb)(void *ud, const char *channel, const char *payload);
    void *ud;
} db_chan_t;

struct mh_db {
    uv_loop_t *loop;
    char *url, *options;
    const char *keys[4], *vals[4]; /* PQconnectStartParams arrays */
    uint32_t pool_size, query_timeout_ms, max_waiters;
    mh_dbconn_t **conns;
    mh_dbconn_t *idle_head;
    uint32_t nidle, nheld;
    db_op_t *wait_head, *wait_tail;
    uint32_t nwait;
    uv_timer_t wait_timer;
    db_op_t *done_head, *done_tail;
    uv_idle_t idle; /* delivers deferred callbacks */
    mh_dbconn_t *listen;
    db_chan_t *chans;
    size_t nchans, capchans;
    uint64_t queries, errors, reconnects;
    uint64_t last_connect_warn_ms;
    bool tried;    /* a connect attempt failed or a session was lost at least once */
    bool closing, finishing, delivering;
    int nopen;     /* connections not yet freed */
    int nhandles;  /* pool-level handles still open during finish */
    void (*close_done)(void *arg);
    void *close_arg;
};

/* ----- conn.c */
mh_dbconn_t *mh__db_conn_new(mh_db_t *db, bool is_listen);
/* Runs op on a READY connection (no other op). ops may be a batch (a
 * list through ->next of OP_QUERY/OP_PIPELINE ops from the waiters
 * queue): sent back to back in one pipeline, one Sync per op, so each op
 * is still its own implicit transaction and fails alone. */
void mh__db_conn_run(mh_dbconn_t *c, db_op_t *ops);
/* Tears the session down and schedules a reconnect; fails the op in
 * flight with err/msg. */
void mh__db_conn_lost(mh_dbconn_t *c, int err, const char *msg);
/* Closes for good (pool closing). Fails an op in flight with
 * MH_ECANCELED. */
void mh__db_conn_shutdown(mh_dbconn_t *c);
/* When c->recycle is set (it received a result over DB_BIG_RESULT
 * bytes), closes the session and opens a new one at once, and returns
 * true: libpq's input buffer only ever grows, so one huge row (a
 * million-entry snapshot delta) would otherwise pin that much memory on
 * a pooled connection for good. The connection rejoins the pool when the
 * new session is ready. Only for a connection that is not busy. */
bool mh__db_conn_maybe_recycle(mh_dbconn_t *c);
/* Translates a failed result (or the connection's state) to MH_E* and
 * copies the server's message into msg. */
int mh__db_translate(PGconn *pg, const PGresult *r, char *msg, size_t cap);
void mh__db_notice_cb(void *arg, const char *message);

/* ----- pool.c */
/* A connection became READY with no op: hand it to the next waiter. */
void mh__db_conn_ready(mh_dbconn_t *c);
/* A connect attempt failed or a session was lost: when no connection is
 * left, waiters now wait at most DOWN_WAIT_MS (pool.c). */
void mh__db_conn_unreachable(mh_db_t *db);
/* An operation ended (ok, failed or connection lost) and is detached from
 * c: delivers it (deferred) and decides what c does next. */
void mh__db_op_finished(mh_dbconn_t *c, db_op_t *op);
void mh__db_idle_remove(mh_db_t *db, mh_dbconn_t *c);
void mh__db_conn_freed(mh_db_t *db, mh_dbconn_t *c);
void mh__db_notify(mh_db_t *db, const char *channel, const char *payload);
void mh__db_op_free(db_op_t *op);
/* Queues op's callback for the next loop turn (the only way user
 * callbacks are called). */
void mh__db_defer(mh_db_t *db, db_op_t *op);
db_op_t *mh__db_op_internal(mh_db_t *db, const char *sql, void (*done)(mh_dbconn_t *, db_op_t *));

#endif
