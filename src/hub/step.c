/*
 * step.c — the state-machine kit (include/mh/step.h): the one advance()
 * loop, the one set of callbacks that record a result and go on, and the
 * one way an operation ends.
 *
 * Every kit callback follows the same path: clear busy, hand the result
 * to the step's handler (or end the operation on an error), then
 * mh_step_run, which either runs the next steps or, once the operation
 * has ended, releases its connection and calls finish as its very last
 * action.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "mh/step.h"

void mh_step_init(mh_step_t *s, const mh_step_def_t *steps, int n, const char *what, const char *id,
                  const mh_step_env_t *env, void (*finish)(mh_step_t *s))
{
    *s = (mh_step_t){.steps = steps,
                     .nsteps = n,
                     .what = what,
                     .id = id,
                     .loop = env->loop,
                     .db = env->db,
                     .store = env->store,
                     .finish = finish,
                     .final = n,
                     .t0 = mh_now_us()};
}

void mh_step_goto(mh_step_t *s, int state) { s->state = state; }

static void end(mh_step_t *s)
{
    /* From a work function: recorded (err/status), applied by
     * work_after_cb on the loop thread. Ending here would let the loop
     * finish, answer and free the operation while the work still runs. */
    if (s->in_work) return;
    s->ended = true;
    if (s->conn) {
        mh_dbconn_release(s->conn); /* rolls back an open transaction */
        s->conn = NULL;
    }
}

void mh_step_done(mh_step_t *s) { end(s); }

void mh_step_fail(mh_step_t *s, int err, const char *why)
{
    if (!s->err && !s->status) {
        s->err = err ? err : MH_EIO;
        snprintf(s->why, sizeof s->why, "%s", why ? why : "");
    }
    end(s);
}

void mh_step_refuse(mh_step_t *s, int status, const char *code, const char *fmt, ...)
{
    if (!s->err && !s->status) {
        s->status = status;
        s->code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->why, sizeof s->why, fmt, ap);
        va_end(ap);
    }
    end(s);
}

void mh_step_run(mh_step_t *s)
{
    if (s->running) return; /* a re-entrant completion: the loop below goes on */
    s->running = true;
    while (!s->busy && !s->ended) {
        if (s->state >= s->nsteps) {
            end(s);
            break;
        }
        if (s->stopping && s->state < s->final && s->stopping(s)) {
            mh_step_fail(s, MH_ECANCELED, "cancelled");
            break;
        }
        int cur = s->state;
        s->state = cur + 1;
        if (mh_log_level_current <= MH_LOG_DEBUG)
            mh_debug("%s: %s step %s (%.1f ms)", s->id, s->what, s->steps[cur].name,
                     (double)(mh_now_us() - s->t0) / 1000.0);
        s->steps[cur].run(s);
    }
    s->running = false;
    if (s->ended && s->finish) {
        void (*finish)(mh_step_t *) = s->finish;
        s->finish = NULL;
        finish(s); /* last: it may free the operation */
    }
}

/* What every callback does once the handler returned rc: MH_STEP_WAIT
 * (it started another call) waits; an error ends the operation (a
 * handler that wants to give a reason calls mh_step_fail itself: the
 * first error wins); then the operation goes on. */
static void after(mh_step_t *s, int rc)
{
    if (rc == MH_STEP_WAIT) return;
    if (rc < 0) mh_step_fail(s, rc, NULL);
    mh_step_run(s);
}

/* The call in flight (ud's) has completed: the step no longer waits; its
 * handler is still in s->on (the callback knows which member). */
static mh_step_t *took(void *ud)
{
    mh_step_t *s = ud;
    s->busy = false;
    return s;
}

static void start(mh_step_t *s)
{
    s->busy = true;
    memset(&s->on, 0, sizeof s->on);
}

/* ---------------------------------------------------------- database */

static void res_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_step_t *s = took(ud);
    if (err) mh_step_resume(s, err, errmsg);
    else after(s, s->on.res ? s->on.res(s, res) : 0);
}

static void pipe_cb(void *ud, PGresult **res, int n, int err, const char *errmsg)
{
    mh_step_t *s = took(ud);
    if (err) mh_step_resume(s, err, errmsg);
    else after(s, s->on.pipe ? s->on.pipe(s, res, n) : 0);
}

void mh_step_query(mh_step_t *s, const mh_db_pq_t *q, mh_step_res_fn on)
{
    start(s);
    s->on.res = on;
    if (s->conn) {
        if (q->stmt) mh_dbconn_exec(s->conn, q->stmt, q->vals, q->lens, q->fmts, res_cb, s);
        else mh_dbconn_query(s->conn, q->sql, q->nparams, q->vals, q->lens, q->fmts, res_cb, s);
    } else {
        if (q->stmt) mh_db_exec(s->db, q->stmt, q->vals, q->lens, q->fmts, res_cb, s);
        else mh_db_query(s->db, q->sql, q->nparams, q->vals, q->lens, q->fmts, res_cb, s);
    }
}

void mh_step_pipeline(mh_step_t *s, const mh_db_pq_t *qs, int n, mh_step_pipe_fn on)
{
    start(s);
    s->on.pipe = on;
    if (s->conn) mh_dbconn_pipeline(s->conn, qs, n, pipe_cb, s);
    else mh_db_pipeline(s->db, qs, n, pipe_cb, s);
}

void mh_step_batch(mh_step_t *s, const mh_db_batch_t *b, mh_step_pipe_fn on)
{
    if (b->full) {
        mh_step_fail(s, MH_EINVAL, "a statement batch overflowed");
        return;
    }
    mh_step_pipeline(s, b->q, b->n, on);
}

void mh_step_copy(mh_step_t *s, const char *copy_sql, const void *data, size_t n)
{
    start(s);
    mh_dbconn_copy_in(s->conn, copy_sql, data, n, res_cb, s);
}

static void acquire_cb(void *ud, mh_dbconn_t *c, int err)
{
    mh_step_t *s = took(ud);
    if (!err) s->conn = c;
    mh_step_resume(s, err, "no database connection");
}

void mh_step_acquire(mh_step_t *s)
{
    start(s);
    mh_db_acquire(s->db, acquire_cb, s);
}

static int committed(mh_step_t *s, PGresult *res)
{
    (void)res;
    mh_dbconn_release(s->conn);
    s->conn = NULL;
    return 0;
}

void mh_step_commit(mh_step_t *s)
{
    start(s);
    s->on.res = committed;
    mh_dbconn_script(s->conn, "COMMIT", res_cb, s);
}

void mh_step_rollback(mh_step_t *s)
{
    if (s->conn) mh_dbconn_release(s->conn);
    s->conn = NULL;
}

/* -------------------------------------------------------------- store */

static void done_cb(void *ud, int err)
{
    mh_step_t *s = took(ud);
    after(s, s->on.done ? s->on.done(s, err) : err);
}

static void head_cb(void *ud, int err, uint64_t size)
{
    mh_step_t *s = took(ud);
    after(s, s->on.head(s, err, size));
}

void mh_step_put(mh_step_t *s, const char *key, const void *data, size_t n, mh_step_done_fn on)
{
    start(s);
    s->on.done = on;
    mh_store_put(s->store, key, data, n, done_cb, s);
}

void mh_step_move(mh_step_t *s, const char *src, const char *dst, mh_step_done_fn on)
{
    start(s);
    s->on.done = on;
    mh_store_move(s->store, src, dst, done_cb, s);
}

void mh_step_head(mh_step_t *s, const char *key, mh_step_head_fn on)
{
    start(s);
    s->on.head = on;
    mh_store_head(s->store, key, head_cb, s);
}

/* --------------------------------------------------------- thread pool */

static void work_cb(uv_work_t *w)
{
    mh_step_t *s = w->data;
    s->work_fn(s);
}

static void work_after_cb(uv_work_t *w, int status)
{
    mh_step_t *s = took(w->data);
    s->in_work = false;
    if (status) mh_step_fail(s, MH_ECANCELED, "thread-pool work cancelled");
    else if (s->work_err) mh_step_fail(s, s->work_err, s->work_why);
    else if (s->err || s->status) end(s); /* failed or refused by the work function */
    mh_step_run(s);
}

void mh_step_work(mh_step_t *s, void (*fn)(mh_step_t *s))
{
    start(s);
    s->work_fn = fn;
    s->work_err = 0;
    s->work.data = s;
    s->in_work = true;
    int rc = uv_queue_work(s->loop, &s->work, work_cb, work_after_cb);
    if (rc) {
        s->in_work = false;
        mh_step_fail(took(s), MH_ENOMEM, "cannot queue thread-pool work");
    }
}

/* ------------------------------------------------------ other calls */

void mh_step_wait(mh_step_t *s) { start(s); }

void mh_step_resume(mh_step_t *s, int err, const char *why)
{
    took(s);
    if (err) mh_step_fail(s, err, why);
    mh_step_run(s);
}

void mh_step_cb(void *ud, int err, const char *why) { mh_step_resume(ud, err, why); }
