/*
 * test_budget.c — unit tests of the pack-memory budget (src/budget,
 * SPEC 4.8) on a real libuv loop: immediate grants, FIFO order (a large
 * head blocks smaller requests behind it), release and shrink waking
 * waiters, growth of a held reservation, the queue timeout (MH_EBUDGET),
 * timeout 0, oversize work running alone, cancel by release (callback
 * never fires), callbacks never inside the call, close with waiters,
 * try_acquire never jumping the queue, and the metrics text.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "mh/budget.h"
#include "tap.h"

static uv_loop_t *loop;
static bool in_call;
static int order[64], norder;

typedef struct {
    int id;
    int calls;
    int err;
    bool reentrant;
    uint64_t at_ms;
} waiter_t;

static void got_cb(void *ud, int err)
{
    waiter_t *w = ud;
    w->calls++;
    w->err = err;
    w->reentrant |= in_call;
    w->at_ms = uv_now(loop);
    if (norder < 64) order[norder++] = w->id;
}

#define CALL(expr)                                                                                                   \
    do {                                                                                                             \
        in_call = true;                                                                                              \
        expr;                                                                                                        \
        in_call = false;                                                                                             \
    } while (0)

/* Runs the loop until nothing is due (no waiters with deadlines left
 * pending would keep it running: callers use run_until). */
static void run_once(void)
{
    uv_run(loop, UV_RUN_NOWAIT);
    uv_run(loop, UV_RUN_NOWAIT);
}

static void timer_noop_cb(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop for about ms milliseconds. */
static void run_for(uint64_t ms)
{
    uv_timer_t t;
    uv_timer_init(loop, &t);
    uv_timer_start(&t, timer_noop_cb, ms, 0);
    uv_run(loop, UV_RUN_ONCE);
    while (uv_is_active((uv_handle_t *)&t)) uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
}

static void run_until(const waiter_t *w)
{
    while (!w->calls) uv_run(loop, UV_RUN_ONCE);
}

static uint64_t in_use(const mh_budget_t *b)
{
    mh_budget_stats_t st;
    mh_budget_stats(b, &st);
    return st.in_use;
}

static uint64_t waiting(const mh_budget_t *b)
{
    mh_budget_stats_t st;
    mh_budget_stats(b, &st);
    return st.waiting;
}

static void test_basics(void)
{
    mh_budget_t *b = NULL;
    TAP_EQ_INT(mh_budget_new(loop, 0, 100, &b), MH_EINVAL, "a budget of 0 bytes is refused");
    TAP_EQ_INT(mh_budget_new(loop, 100, 1000, &b), 0, "budget of 100 bytes");
    mh_budget_res_t r1 = {0}, r2 = {0};
    waiter_t w1 = {1}, w2 = {2};
    CALL(mh_budget_acquire(&r1, b, 60, got_cb, &w1));
    TAP_EQ_INT(w1.calls, 0, "grant: no callback inside the call");
    TAP_EQ_INT(mh_budget_held(&r1), 60, "grant accounted at once");
    TAP_EQ_INT(in_use(b), 60, "in use 60");
    TAP_OK(mh_budget_pending(&r1), "pending until the callback");
    run_once();
    TAP_OK(w1.calls == 1 && w1.err == 0 && !w1.reentrant, "granted on a later turn, once");
    TAP_OK(!mh_budget_pending(&r1), "not pending after the callback");
    CALL(mh_budget_acquire(&r2, b, 40, got_cb, &w2));
    run_once();
    TAP_OK(w2.calls == 1 && w2.err == 0, "exactly the rest of the budget fits");
    TAP_EQ_INT(in_use(b), 100, "in use 100");
    TAP_EQ_INT(mh_budget_try_acquire(&r2, b, 1), MH_EBUDGET, "try_acquire past the budget refused");
    mh_budget_release(&r2);
    TAP_EQ_INT(mh_budget_try_acquire(&r1, b, 100), 0, "a lone holder may grow past the budget (runs alone)");
    TAP_EQ_INT(mh_budget_held(&r1), 160, "held 160 of 100");
    mh_budget_shrink(&r1, 100);
    TAP_EQ_INT(mh_budget_try_acquire(&r2, b, 40), 0, "back within the budget, others fit again");
    mh_budget_shrink(&r1, 10);
    TAP_EQ_INT(mh_budget_held(&r1), 50, "shrink");
    TAP_EQ_INT(mh_budget_try_acquire(&r2, b, 10), 0, "try_acquire of the freed bytes");
    TAP_EQ_INT(mh_budget_held(&r2), 50, "r2 grew to 50");
    mh_budget_shrink(&r2, 1000);
    TAP_EQ_INT(mh_budget_held(&r2), 0, "shrink past held gives back all");
    mh_budget_release(&r1);
    mh_budget_release(&r2);
    TAP_EQ_INT(in_use(b), 0, "all released");
    mh_budget_release(&r2); /* idempotent */
    waiter_t w0 = {3};
    mh_budget_res_t r0 = {0};
    CALL(mh_budget_acquire(&r0, b, 0, got_cb, &w0));
    run_once();
    TAP_OK(w0.calls == 1 && w0.err == 0 && mh_budget_held(&r0) == 0, "zero bytes granted");
    TAP_EQ_INT(mh_budget_retry_after_s(b), 1, "Retry-After of a 1000 ms queue is 1 s");
    mh_budget_close(b);
    run_once();
}

static void test_fifo(void)
{
    mh_budget_t *b = NULL;
    mh_budget_new(loop, 100, 5000, &b);
    mh_budget_res_t hold = {0}, big = {0}, s1 = {0}, s2 = {0};
    waiter_t wh = {10}, wb = {11}, w1 = {12}, w2 = {13};
    norder = 0;
    mh_budget_acquire(&hold, b, 70, got_cb, &wh);
    CALL(mh_budget_acquire(&big, b, 80, got_cb, &wb));
    CALL(mh_budget_acquire(&s1, b, 10, got_cb, &w1));
    CALL(mh_budget_acquire(&s2, b, 20, got_cb, &w2));
    run_once();
    TAP_OK(wh.calls == 1 && wb.calls == 0 && w1.calls == 0 && w2.calls == 0,
           "FIFO: the small requests wait behind the large head although they would fit");
    TAP_EQ_INT(waiting(b), 3, "three waiting");
    mh_budget_res_t fresh = {0};
    TAP_EQ_INT(mh_budget_try_acquire(&fresh, b, 1), MH_EBUDGET, "try_acquire does not jump the queue");
    CALL(mh_budget_release(&hold));
    TAP_OK(wb.calls == 0, "release: no callback inside the call");
    run_once();
    TAP_OK(wb.calls == 1 && wb.err == 0 && w1.calls == 1 && w1.err == 0 && w2.calls == 0,
           "release wakes the head and what fits after it, in order");
    TAP_OK(norder >= 3 && order[1] == 11 && order[2] == 12, "callbacks in queue order");
    TAP_EQ_INT(in_use(b), 90, "80 + 10 in use");
    TAP_EQ_INT(waiting(b), 1, "one still waiting");
    mh_budget_shrink(&big, 40);
    run_once();
    TAP_OK(w2.calls == 1 && w2.err == 0, "shrink wakes the next waiter");
    mh_budget_release(&big);
    mh_budget_release(&s1);
    mh_budget_release(&s2);
    mh_budget_close(b);
    run_once();
}

static void test_grow_and_timeout(void)
{
    mh_budget_t *b = NULL;
    mh_budget_new(loop, 100, 150, &b);
    mh_budget_res_t a = {0}, c = {0};
    waiter_t wa = {20}, wc = {21}, wg = {22};
    mh_budget_acquire(&a, b, 50, got_cb, &wa);
    mh_budget_acquire(&c, b, 40, got_cb, &wc);
    run_once();
    uint64_t t0 = uv_now(loop);
    CALL(mh_budget_acquire(&a, b, 30, got_cb, &wg)); /* 50 + 40 + 30 > 100: waits */
    TAP_EQ_INT(mh_budget_held(&a), 50, "a growth that does not fit waits; held unchanged");
    run_until(&wg);
    TAP_OK(wg.err == MH_EBUDGET && !wg.reentrant, "growth times out with MH_EBUDGET");
    TAP_OK(wg.at_ms - t0 >= 140, "after about the queue timeout (%llu ms)", (unsigned long long)(wg.at_ms - t0));
    TAP_EQ_INT(mh_budget_held(&a), 50, "a timed-out growth keeps what was held");
    mh_budget_stats_t st;
    mh_budget_stats(b, &st);
    TAP_OK(st.timeouts == 1 && st.waited == 1 && st.waiting == 0, "timeout counted");
    waiter_t wg2 = {23};
    mh_budget_acquire(&a, b, 30, got_cb, &wg2);
    mh_budget_release(&c);
    run_once();
    TAP_OK(wg2.calls == 1 && wg2.err == 0 && mh_budget_held(&a) == 80, "growth granted when another releases");

    /* Two holders each waiting to grow: the first to time out fails and
     * releases, and that lets the other through. */
    waiter_t wc2 = {24}, ga = {25}, gc = {26};
    mh_budget_shrink(&a, 30);
    mh_budget_acquire(&c, b, 50, got_cb, &wc2);
    run_once();
    mh_budget_acquire(&a, b, 30, got_cb, &ga);
    run_for(60);
    mh_budget_acquire(&c, b, 30, got_cb, &gc);
    run_until(&ga);
    TAP_EQ_INT(ga.err, MH_EBUDGET, "deadlock broken: the first grower times out");
    mh_budget_release(&a);
    run_until(&gc);
    TAP_OK(gc.err == 0 && mh_budget_held(&c) == 80, "and the second grows once the first released");
    mh_budget_release(&c);
    mh_budget_close(b);
    run_once();

    /* timeout 0: never wait. */
    mh_budget_new(loop, 10, 0, &b);
    mh_budget_res_t x = {0}, y = {0};
    waiter_t wx = {27}, wy = {28};
    mh_budget_acquire(&x, b, 8, got_cb, &wx);
    CALL(mh_budget_acquire(&y, b, 8, got_cb, &wy));
    TAP_EQ_INT(wy.calls, 0, "timeout 0: still no callback inside the call");
    run_once();
    TAP_OK(wx.err == 0 && wy.calls == 1 && wy.err == MH_EBUDGET, "timeout 0: fails at once when it does not fit");
    TAP_EQ_INT(mh_budget_held(&y), 0, "nothing held after the failure");
    mh_budget_release(&x);
    mh_budget_release(&y);
    mh_budget_close(b);
    run_once();
}

static void test_oversize(void)
{
    mh_budget_t *b = NULL;
    mh_budget_new(loop, 100, 2000, &b);
    mh_budget_res_t small = {0}, huge = {0}, after = {0};
    waiter_t ws = {30}, wh = {31}, wa = {32};
    mh_budget_acquire(&small, b, 10, got_cb, &ws);
    mh_budget_acquire(&huge, b, 250, got_cb, &wh);
    mh_budget_acquire(&after, b, 5, got_cb, &wa);
    run_once();
    TAP_OK(ws.calls == 1 && wh.calls == 0 && wa.calls == 0, "oversize waits while anything else is held");
    mh_budget_release(&small);
    run_once();
    TAP_OK(wh.calls == 1 && wh.err == 0 && mh_budget_held(&huge) == 250, "oversize runs alone once nothing is held");
    TAP_OK(wa.calls == 0, "and nothing runs beside it");
    mh_budget_stats_t st;
    mh_budget_stats(b, &st);
    TAP_EQ_INT(st.oversize, 1, "oversize grant counted");
    TAP_EQ_INT(mh_budget_try_acquire(&huge, b, 50), MH_EBUDGET, "a lone holder does not grow past a waiter (FIFO)");
    mh_budget_release(&huge);
    run_once();
    TAP_OK(wa.calls == 1 && wa.err == 0, "the next runs after it");
    mh_budget_release(&after);
    mh_budget_close(b);
    run_once();
}

static void test_cancel_and_close(void)
{
    mh_budget_t *b = NULL;
    mh_budget_new(loop, 100, 60000, &b);
    mh_budget_res_t h = {0}, w = {0}, w2 = {0}, g = {0};
    waiter_t wh = {40}, ww = {41}, ww2 = {42}, wg = {43};
    mh_budget_acquire(&h, b, 100, got_cb, &wh);
    mh_budget_acquire(&w, b, 50, got_cb, &ww);
    mh_budget_acquire(&w2, b, 50, got_cb, &ww2);
    run_once();
    mh_budget_release(&w); /* cancel while waiting */
    TAP_EQ_INT(waiting(b), 1, "cancel removes the waiter");
    mh_budget_acquire(&g, b, 0, got_cb, &wg);
    mh_budget_release(&g); /* cancel while the grant's callback is due */
    mh_budget_release(&h);
    run_once();
    TAP_OK(ww.calls == 0, "a cancelled waiter is never called back");
    TAP_OK(wg.calls == 0, "a cancelled grant is never called back");
    TAP_OK(ww2.calls == 1 && ww2.err == 0, "the waiter behind the cancelled one is granted");
    mh_budget_res_t late = {0};
    waiter_t wl = {44};
    mh_budget_acquire(&h, b, 60, got_cb, &wh);
    mh_budget_acquire(&late, b, 60, got_cb, &wl);
    run_once();
    CALL(mh_budget_close(b));
    TAP_OK(wl.calls == 0, "close: no callback inside the call");
    run_once();
    TAP_OK(wl.calls == 1 && wl.err == MH_ECANCELED, "close fails waiters with MH_ECANCELED");
    /* Reservations still held keep the closed budget alive until released. */
    TAP_EQ_INT(mh_budget_held(&w2), 50, "held bytes survive close");
    mh_budget_release(&w2);
    mh_budget_release(&h);
    mh_budget_release(&late);
    run_once();
    int alive = uv_loop_alive(loop);
    TAP_OK(!alive, "the closed budget left no handle behind");
}

static void test_metrics(void)
{
    mh_budget_t *b = NULL;
    mh_budget_new(loop, 1000, 0, &b);
    mh_budget_res_t r = {0};
    mh_budget_try_acquire(&r, b, 250);
    mh_buf_t m = {0};
    TAP_EQ_INT(mh_budget_metrics_write(b, &m), 0, "metrics");
    mh_buf_append_byte(&m, 0);
    const char *t = (const char *)m.p;
    TAP_OK(strstr(t, "# TYPE musehub_pack_memory_budget_bytes gauge\nmusehub_pack_memory_budget_bytes 1000\n") != NULL,
           "budget gauge");
    TAP_OK(strstr(t, "musehub_pack_memory_in_use_bytes 250\n") != NULL, "in-use gauge");
    TAP_OK(strstr(t, "# TYPE musehub_pack_memory_timeouts_total counter\n") != NULL, "timeouts counter");
    TAP_OK(strstr(t, "# HELP musehub_pack_memory_waiting ") != NULL, "waiting gauge has HELP");
    mh_buf_free(&m);
    mh_budget_release(&r);
    mh_budget_close(b);
    run_once();
}

int main(void)
{
    mh_log_set_level("error");
    loop = uv_default_loop();
    test_basics();
    test_fifo();
    test_grow_and_timeout();
    test_oversize();
    test_cancel_and_close();
    test_metrics();
    uv_run(loop, UV_RUN_DEFAULT);
    TAP_EQ_INT(uv_loop_close(loop), 0, "loop closes cleanly (every handle closed)");
    return tap_done();
}
