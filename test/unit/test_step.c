/*
 * test_step.c — the step kit (include/mh/step.h) without a database or a
 * store: steps in table order, mh_step_goto, the first error winning,
 * refusals, finish exactly once and last, thread-pool work, and a work
 * function that refuses: the operation must not end (and be freed by its
 * finish) while the work is still on the thread pool.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "mh/step.h"
#include "tap.h"

typedef struct {
    mh_step_t step;
    char trace[64];
    int finished;          /* finish calls */
    bool freed;            /* finish "freed" the operation */
    atomic_int work_state; /* 0 not started, 1 refused (still running), 2 returned */
    int work_state_at_finish;
} op_t;

#define OP(s) MH_STEP_OP(s, op_t, step)

static void mark(mh_step_t *s, char c)
{
    op_t *o = OP(s);
    size_t n = strlen(o->trace);
    if (n + 1 < sizeof o->trace) o->trace[n] = c, o->trace[n + 1] = 0;
}

static void finish(mh_step_t *s)
{
    op_t *o = OP(s);
    o->finished++;
    o->work_state_at_finish = atomic_load(&o->work_state);
    o->freed = true; /* a real finish may free the operation here */
}

/* ---------------------------------------------------- order and goto */

enum { A, B, C, D };
static void step_a(mh_step_t *s) { mark(s, 'a'); }
static void step_b(mh_step_t *s)
{
    mark(s, 'b');
    mh_step_goto(s, D); /* skip C */
}
static void step_c(mh_step_t *s) { mark(s, 'c'); }
static void step_d(mh_step_t *s)
{
    mark(s, 'd');
    mh_step_done(s);
}
static const mh_step_def_t order_steps[] = {
    [A] = {"a", step_a}, [B] = {"b", step_b}, [C] = {"c", step_c}, [D] = {"d", step_d}};

/* ------------------------------------------------- errors and refusals */

static void fail_twice(mh_step_t *s)
{
    mh_step_fail(s, MH_EPARSE, "first");
    mh_step_fail(s, MH_EIO, "second");
}
static void never(mh_step_t *s) { mark(s, 'x'); }
static const mh_step_def_t fail_steps[] = {{"fail", fail_twice}, {"never", never}};

static void refuse(mh_step_t *s) { mh_step_refuse(s, 409, "stale_head", "branch '%s' moved", "main"); }
static const mh_step_def_t refuse_steps[] = {{"refuse", refuse}, {"never", never}};

/* ---------------------------------------------------------- thread pool */

static void sleep_ms(int ms)
{
    struct timespec ts = {0, (long)ms * 1000000L};
    nanosleep(&ts, NULL);
}

static void add_work(mh_step_t *s) { mark(s, 'w'); }
static void step_work(mh_step_t *s) { mh_step_work(s, add_work); }
static void after_work(mh_step_t *s) { mark(s, 'z'); }
static const mh_step_def_t work_steps[] = {{"work", step_work}, {"after", after_work}};

/* Refuses at once, then keeps running for a while: the loop thread must
 * not finish the operation meanwhile. */
static void refusing_work(mh_step_t *s)
{
    op_t *o = OP(s);
    mh_step_refuse(s, 422, "invalid_field", "bad field");
    atomic_store(&o->work_state, 1);
    sleep_ms(50);
    atomic_store(&o->work_state, 2);
}

static void step_refusing_work(mh_step_t *s)
{
    op_t *o = OP(s);
    mh_step_work(s, refusing_work);
    /* Let the work refuse before this step returns to the kit's loop: the
     * kit must still wait for the work to come back. */
    while (atomic_load(&o->work_state) == 0) sleep_ms(1);
}
static const mh_step_def_t refusing_steps[] = {{"work", step_refusing_work}, {"never", never}};

static void failing_work(mh_step_t *s)
{
    s->work_err = MH_EHASH;
    s->work_why = "blob 3 does not hash to its id";
}
static void step_failing_work(mh_step_t *s) { mh_step_work(s, failing_work); }
static const mh_step_def_t failing_steps[] = {{"work", step_failing_work}, {"never", never}};

static op_t *run(uv_loop_t *loop, const mh_step_def_t *steps, int n)
{
    op_t *o = calloc(1, sizeof *o);
    mh_step_init(&o->step, steps, n, "test", "t", &(mh_step_env_t){loop, NULL, NULL}, finish);
    mh_step_run(&o->step);
    uv_run(loop, UV_RUN_DEFAULT);
    return o;
}

int main(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);

    op_t *o = run(&loop, order_steps, 4);
    TAP_EQ_STR(o->trace, "abd", "steps run in table order; goto skips");
    TAP_OK(o->finished == 1 && !o->step.err && !o->step.status, "finish once, success");
    free(o);

    o = run(&loop, fail_steps, 2);
    TAP_OK(o->step.err == MH_EPARSE && !strcmp(o->step.why, "first") && o->trace[0] == 0,
           "the first error wins and ends the operation (%d %s)", o->step.err, o->step.why);
    TAP_EQ_INT(o->finished, 1, "finish once after a failure");
    free(o);

    o = run(&loop, refuse_steps, 2);
    TAP_OK(o->step.status == 409 && !strcmp(o->step.code, "stale_head") && !strcmp(o->step.why, "branch 'main' moved"),
           "a refusal keeps status, code and detail");
    TAP_OK(o->finished == 1 && o->trace[0] == 0, "a refusal ends the operation");
    free(o);

    o = run(&loop, work_steps, 2);
    TAP_EQ_STR(o->trace, "wz", "thread-pool work, then the next step on the loop");
    TAP_EQ_INT(o->finished, 1, "finish once after work");
    free(o);

    o = run(&loop, failing_steps, 2);
    TAP_OK(o->step.err == MH_EHASH && !strcmp(o->step.why, "blob 3 does not hash to its id") && o->trace[0] == 0,
           "work_err ends the operation with its reason");
    free(o);

    o = run(&loop, refusing_steps, 2);
    TAP_EQ_INT(o->finished, 1, "a refusal made on the thread pool: finish once");
    TAP_EQ_INT(o->work_state_at_finish, 2, "finish runs only after the work function returned");
    TAP_OK(o->step.status == 422 && !strcmp(o->step.code, "invalid_field") && o->trace[0] == 0,
           "the refusal recorded on the thread pool is the answer; no later step ran");
    free(o);

    uv_loop_close(&loop);
    return tap_done();
}
