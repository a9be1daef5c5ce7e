/*
 * budget.c — the process-wide pack-memory budget (include/mh/budget.h,
 * SPEC 4.8): byte accounting, one FIFO wait queue with a deadline per
 * request, and deferred callbacks.
 *
 * Shape: a request is either granted at once (bytes added to in_use and
 * r->held, r moved to the ready list) or appended to the wait queue.
 * Whenever bytes come back (shrink, release, a timeout, a cancel) pump()
 * grants waiters from the head while the head fits. Callbacks are never
 * called from these functions: the ready list is drained by an idle
 * handle on a later loop turn (DESIGN 3). A deadline timer fails the
 * head of the queue when its time is up; all requests share one timeout,
 * so the queue is also sorted by deadline and only the head's deadline
 * needs a timer.
 *
 * Invariants:
 *  - in_use == the sum of held over all reservations, and bytes are
 *    accounted at grant time (not at callback time), so a try_acquire
 *    between a grant and its callback sees the truth.
 *  - A reservation is in at most one list: idle (none), waiting (queue),
 *    ready (ready list, callback due).
 *  - The struct is freed only when closing, both handles are closed and no
 *    reservation holds bytes or has a request (nres == 0).
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "mh/budget.h"

enum { R_IDLE = 0, R_WAITING, R_READY };

struct mh_budget {
    uv_loop_t *loop;
    uv_timer_t deadline; /* the head of the queue gives up */
    uv_idle_t dispatch;  /* runs ready callbacks */
    uint64_t total, in_use;
    uint32_t timeout_ms;
    mh_budget_res_t *wait_head, *wait_tail;
    mh_budget_res_t *ready_head, *ready_tail;
    uint64_t nwaiting;
    uint64_t nres; /* reservations holding bytes or with a request, plus guards */
    unsigned open_handles;
    bool closing, handles_closing;
    mh_budget_stats_t st;
};

static void deadline_cb(uv_timer_t *t);
static void dispatch_cb(uv_idle_t *h);

/* ------------------------------------------------------------- lists */

static void list_push(mh_budget_res_t **head, mh_budget_res_t **tail, mh_budget_res_t *r)
{
    r->next = NULL;
    r->prev = *tail;
    if (*tail) (*tail)->next = r;
    else *head = r;
    *tail = r;
}

static void list_unlink(mh_budget_res_t **head, mh_budget_res_t **tail, mh_budget_res_t *r)
{
    if (r->prev) r->prev->next = r->next;
    else *head = r->next;
    if (r->next) r->next->prev = r->prev;
    else *tail = r->prev;
    r->prev = r->next = NULL;
}

/* ---------------------------------------------------------- lifecycle */

static void handle_closed_cb(uv_handle_t *h)
{
    mh_budget_t *b = h->data;
    if (--b->open_handles == 0) free(b);
}

/* A closed budget goes once nobody uses it: ready reservations count as
 * users, so every due callback has fired by then. */
static void maybe_finish(mh_budget_t *b)
{
    if (!b->closing || b->nres > 0 || b->handles_closing) return;
    b->handles_closing = true;
    uv_close((uv_handle_t *)&b->deadline, handle_closed_cb);
    uv_close((uv_handle_t *)&b->dispatch, handle_closed_cb);
}

static bool res_active(const mh_budget_res_t *r)
{
    return r->b && (r->held > 0 || r->state != R_IDLE);
}

/* After a change to r: counts it in or out of the budget's users. */
static void res_track(mh_budget_res_t *r, bool was_active)
{
    mh_budget_t *b = r->b;
    bool active = r->held > 0 || r->state != R_IDLE;
    if (active && !was_active) b->nres++;
    if (!active) r->b = NULL;
    if (!active && was_active) {
        b->nres--;
        maybe_finish(b);
    }
}

/* ----------------------------------------------------------- dispatch */

static void make_ready(mh_budget_t *b, mh_budget_res_t *r, int result)
{
    r->state = R_READY;
    r->result = result;
    list_push(&b->ready_head, &b->ready_tail, r);
    uv_idle_start(&b->dispatch, dispatch_cb);
}

/* Runs the callbacks that are due, oldest first. A callback may call any
 * function of this module; what it makes ready lands after `last` and
 * runs on a later turn. */
static void dispatch_cb(uv_idle_t *h)
{
    mh_budget_t *b = h->data;
    mh_budget_res_t *last = b->ready_tail;
    b->nres++; /* keep b alive across the callbacks */
    while (b->ready_head) {
        mh_budget_res_t *r = b->ready_head;
        bool end = r == last;
        list_unlink(&b->ready_head, &b->ready_tail, r);
        r->state = R_IDLE;
        mh_budget_cb cb = r->cb;
        void *ud = r->ud;
        r->cb = NULL;
        res_track(r, true);
        cb(ud, r->result);
        if (end) break;
    }
    if (!b->ready_head) uv_idle_stop(&b->dispatch);
    b->nres--;
    maybe_finish(b);
}

/* ---------------------------------------------------------- the queue */

static bool fits(const mh_budget_t *b, const mh_budget_res_t *r, uint64_t bytes)
{
    if (b->in_use <= b->total && bytes <= b->total - b->in_use) return true;
    return b->in_use == r->held; /* alone: oversize work runs by itself */
}

static void grant(mh_budget_t *b, mh_budget_res_t *r, uint64_t bytes)
{
    if (b->in_use + bytes > b->total) b->st.oversize++;
    b->in_use += bytes;
    r->held += bytes;
    b->st.granted++;
}

static void arm_deadline(mh_budget_t *b)
{
    if (b->handles_closing) return;
    if (!b->wait_head) {
        uv_timer_stop(&b->deadline);
        return;
    }
    uint64_t now = uv_now(b->loop), due = b->wait_head->deadline;
    uv_timer_start(&b->deadline, deadline_cb, due > now ? due - now : 0, 0);
}

static void unwait(mh_budget_t *b, mh_budget_res_t *r)
{
    list_unlink(&b->wait_head, &b->wait_tail, r);
    b->nwaiting--;
    b->st.wait_seconds += (double)(uv_now(b->loop) - r->since) / 1000.0;
}

/* Grants waiters from the head while the head fits. */
static void pump(mh_budget_t *b)
{
    bool changed = false;
    while (b->wait_head && fits(b, b->wait_head, b->wait_head->want)) {
        mh_budget_res_t *r = b->wait_head;
        unwait(b, r);
        grant(b, r, r->want);
        make_ready(b, r, 0);
        changed = true;
    }
    if (changed) arm_deadline(b);
}

static void deadline_cb(uv_timer_t *t)
{
    mh_budget_t *b = t->data;
    uint64_t now = uv_now(b->loop);
    while (b->wait_head && b->wait_head->deadline <= now) {
        mh_budget_res_t *r = b->wait_head;
        unwait(b, r);
        b->st.timeouts++;
        make_ready(b, r, MH_EBUDGET);
    }
    pump(b); /* the next in line may fit now that the head is gone */
    arm_deadline(b);
}

/* --------------------------------------------------------------- API */

int mh_budget_new(uv_loop_t *loop, uint64_t total, uint32_t queue_timeout_ms, mh_budget_t **out)
{
    *out = NULL;
    if (!loop || total == 0) return MH_EINVAL;
    mh_budget_t *b = calloc(1, sizeof *b);
    if (!b) return MH_ENOMEM;
    b->loop = loop;
    b->total = total;
    b->timeout_ms = queue_timeout_ms;
    uv_timer_init(loop, &b->deadline);
    uv_idle_init(loop, &b->dispatch);
    b->deadline.data = b->dispatch.data = b;
    b->open_handles = 2;
    *out = b;
    return 0;
}

void mh_budget_close(mh_budget_t *b)
{
    if (!b || b->closing) return;
    b->closing = true;
    while (b->wait_head) {
        mh_budget_res_t *r = b->wait_head;
        unwait(b, r);
        make_ready(b, r, MH_ECANCELED);
    }
    uv_timer_stop(&b->deadline);
    maybe_finish(b);
}

void mh_budget_res_init(mh_budget_res_t *r)
{
    memset(r, 0, sizeof *r);
}

/* A new request on r: r must be idle and not bound to another budget.
 * Misuse is a programming error (there is no list slot to fail a second
 * request through), so it aborts with a log line. */
static void check_request(const mh_budget_res_t *r, const mh_budget_t *b)
{
    if (!b || r->state != R_IDLE || (res_active(r) && r->b != b)) {
        mh_error("budget: a reservation got a request while %s", !b ? "no budget was given"
                                                                    : r->state != R_IDLE ? "another is pending"
                                                                                         : "bound to another budget");
        abort();
    }
}

void mh_budget_acquire(mh_budget_res_t *r, mh_budget_t *b, uint64_t bytes, mh_budget_cb cb, void *ud)
{
    check_request(r, b);
    bool was = res_active(r);
    r->b = b;
    r->cb = cb;
    r->ud = ud;
    r->want = bytes;
    if (b->closing) {
        make_ready(b, r, MH_ECANCELED);
    } else if (!b->wait_head && fits(b, r, bytes)) {
        grant(b, r, bytes);
        make_ready(b, r, 0);
    } else if (b->timeout_ms > 0) {
        r->state = R_WAITING;
        r->since = uv_now(b->loop);
        r->deadline = r->since + b->timeout_ms;
        list_push(&b->wait_head, &b->wait_tail, r);
        b->nwaiting++;
        b->st.waited++;
        if (b->wait_head == r) arm_deadline(b);
    } else {
        b->st.waited++;
        b->st.timeouts++;
        make_ready(b, r, MH_EBUDGET);
    }
    res_track(r, was);
}

int mh_budget_try_acquire(mh_budget_res_t *r, mh_budget_t *b, uint64_t bytes)
{
    check_request(r, b);
    if (b->closing) return MH_ECANCELED;
    if (b->wait_head || !fits(b, r, bytes)) return MH_EBUDGET;
    bool was = res_active(r);
    r->b = b;
    grant(b, r, bytes);
    if (r->held > 0) res_track(r, was);
    else if (!was) r->b = NULL;
    return 0;
}

void mh_budget_shrink(mh_budget_res_t *r, uint64_t bytes)
{
    mh_budget_t *b = r->b;
    if (!b || bytes == 0 || r->held == 0) return;
    if (bytes > r->held) bytes = r->held;
    r->held -= bytes;
    b->in_use -= bytes;
    pump(b);
    res_track(r, true);
}

void mh_budget_release(mh_budget_res_t *r)
{
    mh_budget_t *b = r->b;
    if (!b) {
        mh_budget_res_init(r);
        return;
    }
    bool was = res_active(r);
    if (r->state == R_WAITING) {
        unwait(b, r);
        arm_deadline(b);
    } else if (r->state == R_READY) {
        list_unlink(&b->ready_head, &b->ready_tail, r);
    }
    r->state = R_IDLE;
    r->cb = NULL;
    b->in_use -= r->held;
    r->held = 0;
    pump(b);
    res_track(r, was);
}
uint64_t mh_budget_held(const mh_budget_res_t *r)
{
    return r->held;
}

bool mh_budget_pending(const mh_budget_res_t *r)
{
    return r->state != R_IDLE;
}

uint32_t mh_budget_retry_after_s(const mh_budget_t *b)
{
    uint32_t s = (b->timeout_ms + 999) / 1000;
    return s < 1 ? 1 : s;
}

void mh_budget_stats(const mh_budget_t *b, mh_budget_stats_t *st)
{
    *st = b->st;
    st->total = b->total;
    st->in_use = b->in_use;
    st->waiting = b->nwaiting;
}

int mh_budget_metrics_write(const mh_budget_t *b, mh_buf_t *out)
{
    mh_budget_stats_t st;
    mh_budget_stats(b, &st);
    return mh_buf_printf(
        out,
        "# HELP musehub_pack_memory_budget_bytes Bytes of pack work this process may hold at once "
        "(MUSEHUB_PACK_MEMORY).\n"
        "# TYPE musehub_pack_memory_budget_bytes gauge\nmusehub_pack_memory_budget_bytes %" PRIu64 "\n"
        "# HELP musehub_pack_memory_in_use_bytes Bytes of the pack-memory budget reserved now.\n"
        "# TYPE musehub_pack_memory_in_use_bytes gauge\nmusehub_pack_memory_in_use_bytes %" PRIu64 "\n"
        "# HELP musehub_pack_memory_waiting Requests waiting for pack memory now.\n"
        "# TYPE musehub_pack_memory_waiting gauge\nmusehub_pack_memory_waiting %" PRIu64 "\n"
        "# HELP musehub_pack_memory_waits_total Requests for pack memory that had to wait.\n"
        "# TYPE musehub_pack_memory_waits_total counter\nmusehub_pack_memory_waits_total %" PRIu64 "\n"
        "# HELP musehub_pack_memory_timeouts_total Requests for pack memory that gave up (answered 503).\n"
        "# TYPE musehub_pack_memory_timeouts_total counter\nmusehub_pack_memory_timeouts_total %" PRIu64 "\n"
        "# HELP musehub_pack_memory_oversize_total Grants larger than the free budget that ran alone.\n"
        "# TYPE musehub_pack_memory_oversize_total counter\nmusehub_pack_memory_oversize_total %" PRIu64 "\n"
        "# HELP musehub_pack_memory_grants_total Requests for pack memory granted.\n"
        "# TYPE musehub_pack_memory_grants_total counter\nmusehub_pack_memory_grants_total %" PRIu64 "\n"
        "# HELP musehub_pack_memory_wait_seconds_total Time requests spent waiting for pack memory.\n"
        "# TYPE musehub_pack_memory_wait_seconds_total counter\nmusehub_pack_memory_wait_seconds_total %.3f\n",
        st.total, st.in_use, st.waiting, st.waited, st.timeouts, st.oversize, st.granted, st.wait_seconds);
}
