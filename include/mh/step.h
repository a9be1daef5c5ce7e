/*
 * step.h — the state-machine kit every multi-step operation is written
 * with (DESIGN 3): push unpack, server-side commits, merges, fetch, the
 * mpack.index and mpack.gc jobs, repository deletion.
 *
 * An operation embeds one mh_step_t and lists its steps in a table of
 * named functions, in protocol order; that table is the operation's
 * advance() and reads like the protocol. mh_step_run runs steps until one
 * waits for an asynchronous call. A step either
 *   - finishes synchronously (the next step runs: s->state was already
 *     set to the one after it, mh_step_goto picks another), or
 *   - starts ONE asynchronous call through the kit (a query, a pipeline,
 *     a store call, thread-pool work) whose result goes to a handler; the
 *     handler returns 0 to go on, MH_STEP_WAIT when it started another
 *     call, or an MH_E* error, or
 *   - ends the operation: mh_step_fail (an error), mh_step_refuse (a
 *     refusal SPEC defines: status, code, detail) or mh_step_done.
 *
 * Invariants:
 *  - An operation ends exactly once, through its finish callback, which
 *    the kit calls as the very last thing it does with the operation
 *    (nginx's finalize_request): finish may answer and free everything,
 *    so nothing touches the operation after it. Steps and handlers never
 *    answer themselves.
 *  - The held connection (s->conn, a transaction) is released before
 *    finish runs: a failure rolls the transaction back.
 *  - Callbacks fire on later loop turns (the modules' rule), and a
 *    re-entrant completion only clears busy: the running loop goes on.
 *  - Loop thread only, except the function given to mh_step_work.
 */
#ifndef MH_STEP_H
#define MH_STEP_H

#include <stddef.h>
#include <uv.h>

#include "mh/core.h"
#include "mh/db.h"
#include "mh/store.h"

typedef struct mh_step mh_step_t;

/* One row of an operation's step table. */
typedef struct {
    const char *name; /* for the debug log */
    void (*run)(mh_step_t *s);
} mh_step_def_t;

/* A handler's "I started another asynchronous call". */
#define MH_STEP_WAIT 1

typedef int (*mh_step_res_fn)(mh_step_t *s, PGresult *res);
typedef int (*mh_step_pipe_fn)(mh_step_t *s, PGresult **res, int n);
/* Store handlers see the error (a missing key may be an answer). */
typedef int (*mh_step_done_fn)(mh_step_t *s, int err);
typedef int (*mh_step_head_fn)(mh_step_t *s, int err, uint64_t size);

struct mh_step {
    /* --- the operation (mh_step_init, then set by the operation) */
    const mh_step_def_t *steps;
    int nsteps;
    const char *what; /* "unpack", "mpack.index", ... in logs */
    const char *id;   /* the request or job id, in logs */
    uv_loop_t *loop;
    mh_db_t *db;
    mh_store_t *store;
    /* Ends the operation (required): reads err (0: success), why, and for
     * a refusal status/code; called once, last. */
    void (*finish)(mh_step_t *s);
    /* Jobs: true when the operation must stop at its next step; steps from
     * index `final` on still run (after COMMIT the work is done). */
    bool (*stopping)(mh_step_t *s);
    int final;

    /* --- the outcome (read by finish) */
    int err;          /* first error, MH_E*; 0 */
    int status;       /* a refusal's HTTP status; 0 */
    const char *code; /* a refusal's SPEC code */
    char why[512];    /* the error's reason or the refusal's detail */

    /* --- state (the kit's) */
    int state; /* the step that runs next */
    bool busy, ended, running;
    bool in_work; /* work_fn is on the thread pool: ending is deferred to the loop */
    uint64_t t0;       /* mh_now_us() at init */
    mh_dbconn_t *conn; /* the held connection: the operation's transaction */
    void *arg;         /* what the call in flight works on, for helpers (refwrite) */
    void *user;        /* the operation's own (a job keeps its mh_job_t here) */
    union {            /* the handler of the call in flight */
        mh_step_res_fn res;
        mh_step_pipe_fn pipe;
        mh_step_done_fn done;
        mh_step_head_fn head;
    } on;
    uv_work_t work;
    void (*work_fn)(mh_step_t *s);
    int work_err;         /* set by work_fn: MH_E* */
    const char *work_why; /* set by work_fn: lives at least as long as the operation */
};

/* The operation that embeds s as `member`. */
#define MH_STEP_OP(s, type, member) ((type *)(void *)((char *)(s)-offsetof(type, member)))

/* Where an operation runs: its loop, database pool and object store. */
typedef struct {
    uv_loop_t *loop;
    mh_db_t *db;
    mh_store_t *store;
} mh_step_env_t;

/* Zeroes s and sets its table (n steps), names (what, id: borrowed, for
 * logs), where it runs, finish and the clock. Jobs then set stopping,
 * final and user. */
void mh_step_init(mh_step_t *s, const mh_step_def_t *steps, int n, const char *what, const char *id,
                  const mh_step_env_t *env, void (*finish)(mh_step_t *s));
/* Runs steps from s->state until one waits or the operation ends; then,
 * if it ended, calls finish. Call it to start the operation. */
void mh_step_run(mh_step_t *s);
/* The step to run after the current one (default: the next in the table). */
void mh_step_goto(mh_step_t *s, int state);

/* Ends the operation: success, an error (first wins; why is copied, may
 * be NULL), or a refusal (SPEC's status and code, a detail). */
void mh_step_done(mh_step_t *s);
void mh_step_fail(mh_step_t *s, int err, const char *why);
void mh_step_refuse(mh_step_t *s, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* ---------------------------------------------------------- database */

/* One statement (q->stmt or q->sql with its parameters, copied): on the
 * held connection when there is one, else on the pool. on may be NULL. A
 * database error ends the operation with its code and message. */
void mh_step_query(mh_step_t *s, const mh_db_pq_t *q, mh_step_res_fn on);
/* Several statements, one round trip (pipeline mode; on the held
 * connection they share its transaction). on may be NULL. */
void mh_step_pipeline(mh_step_t *s, const mh_db_pq_t *qs, int n, mh_step_pipe_fn on);
/* mh_step_pipeline of a batch (mh_db_batch_t); a full batch ends the
 * operation with MH_EINVAL. */
void mh_step_batch(mh_step_t *s, const mh_db_batch_t *b, mh_step_pipe_fn on);
/* Held connection only: COPY ... FROM STDIN of data[0..n) (borrowed
 * until the step goes on). */
void mh_step_copy(mh_step_t *s, const char *copy_sql, const void *data, size_t n);
/* Takes a connection out of the pool into s->conn. */
void mh_step_acquire(mh_step_t *s);
/* COMMIT on the held connection, then gives it back. */
void mh_step_commit(mh_step_t *s);
/* Gives the held connection back at once, rolling its transaction back,
 * without ending the operation (it may start over). */
void mh_step_rollback(mh_step_t *s);

/* -------------------------------------------------------------- store */

void mh_step_put(mh_step_t *s, const char *key, const void *data, size_t n, mh_step_done_fn on);
void mh_step_move(mh_step_t *s, const char *src, const char *dst, mh_step_done_fn on);
void mh_step_head(mh_step_t *s, const char *key, mh_step_head_fn on);

/* --------------------------------------------------------- thread pool */

/* Runs fn(s) on libuv's thread pool (nothing else touches the operation
 * meanwhile); fn reports through s->work_err / s->work_why, or calls
 * mh_step_fail / mh_step_refuse / mh_step_goto, which only record while
 * fn runs: the operation ends (or goes on) back on the loop thread, once
 * the work is over, never while it is in flight. */
void mh_step_work(mh_step_t *s, void (*fn)(mh_step_t *s));

/* ------------------------------------------------------ other calls */

/* For calls the kit does not wrap (several in parallel, a module's own
 * callback): mark the step as waiting, then resume it from the callback
 * with the outcome (err 0: go on). mh_step_cb has mh_manifest_cb's shape
 * (ud = the step). */
void mh_step_wait(mh_step_t *s);
void mh_step_resume(mh_step_t *s, int err, const char *why);
void mh_step_cb(void *ud, int err, const char *why);

#endif
