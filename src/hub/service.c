/*
 * service.c — /healthz (process up), /readyz (database reachable),
 * /metrics (Prometheus text for the whole server) (SPEC 4.8), and who a
 * request came from for the access log.
 *
 * /metrics, in three parts:
 *  1. per process: every module's lines (process_metrics[] below), from
 *     this worker and from each sibling, merged by mh_metrics_collect
 *     (include/mh/metrics.h): same-named samples are summed, so counters
 *     and gauges are totals of the server;
 *  2. from the database, once per scrape: the job queue by type and
 *     status (queue.c counts only what one process ran); given up after
 *     2 s so a database outage cannot make scrapes time out;
 *  3. about the server itself: build info, uptime, workers.
 * The scrape's state is heap-allocated and reference-counted: the
 * answer may go out (queue query given up) while the query is still
 * pending.
 */
#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include "mh/hub.h"
#include "mh/jobs.h"
#include "mh/metrics.h"

void mh_h_healthz(mh_req_t *req)
{
    static const char body[] = "{\"status\":\"ok\"}";
    mh_res_send(req, 200, "application/json", body, sizeof body - 1);
}

/* /readyz answers within READYZ_MS whatever the database does (SPEC 4.8:
 * 503 within 2 s when it is not reachable). The pool itself fails fast
 * when it has no connection (src/db/pool.c, DOWN_WAIT_MS); this deadline
 * also covers a database that stopped answering on an open connection
 * (a network partition), which only the 30 s query timeout would end.
 * The probe outlives the answer: the query's callback still comes. */
#define READYZ_MS 1500

/* A zeroed heap context of `size` bytes that starts with a uv_timer_t,
 * the timer (data = the context) started for ms on hub's loop: for a
 * request that waits on the database with a deadline. The context is
 * freed in the timer's close callback. NULL after answering 503. */
static void *deadline_new(mh_req_t *req, size_t size, uint64_t ms, uv_timer_cb cb)
{
    mh_hub_t *hub = req->app;
    uv_timer_t *t = calloc(1, size);
    if (!t) {
        mh_res_fail(req, MH_ENOMEM, "probe");
        return NULL;
    }
    uv_timer_init(hub->loop, t);
    t->data = t;
    uv_timer_start(t, cb, ms, 0);
    return t;
}

typedef struct {
    uv_timer_t timer; /* first: deadline_new */
    mh_req_t *req;    /* NULL once answered (the request may be gone) */
} readyz_t;

static void readyz_answer(readyz_t *p, int err, const char *why)
{
    mh_req_t *req = p->req;
    if (!req) return;
    p->req = NULL;
    if (err) {
        mh_warn("readyz: database not reachable: %s", why ? why : mh_strerror(err));
        mh_res_header(req, "Retry-After", "2");
        mh_res_error(req, 503, "unavailable", "database not reachable");
        return;
    }
    static const char body[] = "{\"status\":\"ready\"}";
    mh_res_send(req, 200, "application/json", body, sizeof body - 1);
}

static void readyz_closed(uv_handle_t *h) { free(h->data); }

static void readyz_timer_cb(uv_timer_t *t)
{
    readyz_answer(t->data, MH_ETIMEDOUT, "no answer from the database in time");
}

static void readyz_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    readyz_t *p = ud;
    readyz_answer(p, err, errmsg);
    uv_close((uv_handle_t *)&p->timer, readyz_closed);
}

void mh_h_readyz(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    readyz_t *p = deadline_new(req, sizeof *p, READYZ_MS, readyz_timer_cb);
    if (!p) return;
    p->req = req;
    mh_db_query(hub->db, "SELECT 1", 0, NULL, NULL, NULL, readyz_cb, p);
}

/* ------------------------------------------------------ access-log line */

void mh_hub_log_who(mh_req_t *req, const char **client, const char **user)
{
    mh_hub_t *hub = req->app;
    *client = mh_auth_client_addr(hub ? hub->auth : NULL, req);
    const mh_caller_t *c = req->caller;
    *user = c && !c->anonymous && c->handle ? c->handle : "-";
}

/* ------------------------------------------------- per-process metrics */

static int w_http(mh_hub_t *h, mh_buf_t *o) { return h->http ? mh_http_metrics_write(h->http, o) : 0; }
static int w_db(mh_hub_t *h, mh_buf_t *o) { return h->db ? mh_db_metrics_write(h->db, o) : 0; }
static int w_store(mh_hub_t *h, mh_buf_t *o) { return h->store ? mh_store_metrics_write(h->store, o) : 0; }
static int w_jobs(mh_hub_t *h, mh_buf_t *o)
{
    (void)h;
    return mh_jobs_metrics_write(o);
}
static int w_budget(mh_hub_t *h, mh_buf_t *o) { return h->budget ? mh_budget_metrics_write(h->budget, o) : 0; }
static int w_packbuild(mh_hub_t *h, mh_buf_t *o)
{
    (void)h;
    return mh_pb_metrics_write(o);
}
static int w_process(mh_hub_t *h, mh_buf_t *o)
{
    (void)h;
    return mh_metrics_process_write(o);
}

/* The modules whose lines one process contributes. A module with metrics
 * of its own adds one row: its lines are then summed across workers like
 * the others (use a `worker` label for a value that must stay per
 * process). */
static const struct {
    const char *module;
    int (*write)(mh_hub_t *hub, mh_buf_t *out);
} process_metrics[] = {
    {"http", w_http},     {"db", w_db},           {"store", w_store},     {"jobs", w_jobs},
    {"budget", w_budget}, {"packbuild", w_packbuild}, {"process", w_process},
};

int mh_hub_metrics_render(void *arg, mh_buf_t *out)
{
    mh_hub_t *hub = arg;
    for (size_t i = 0; i < sizeof process_metrics / sizeof process_metrics[0]; i++) {
        int rc = process_metrics[i].write(hub, out);
        if (rc) return rc;
    }
    return 0;
}

/* ---------------------------------------------------------- the scrape */

#define QUEUE_WAIT_MS 2000

typedef struct {
    uv_timer_t timer; /* first: deadline_new */
    mh_req_t *req;
    mh_hub_t *hub;
    int refs; /* the collection, the queue query, the timer */
    bool collected, queue_over, answered;
    mh_buf_t merged;
    bool merged_ok;
    uint32_t workers, fresh, stale;
    mh_buf_t queue; /* the queue lines, empty when not known */
} scrape_t;

static void scrape_unref(scrape_t *sc)
{
    if (--sc->refs > 0) return;
    mh_buf_free(&sc->merged);
    mh_buf_free(&sc->queue);
    free(sc);
}

static void timer_closed_cb(uv_handle_t *h) { scrape_unref(h->data); }

/* Lines about the server itself (not summed: they are written once). */
static int server_lines(scrape_t *sc, mh_buf_t *out)
{
    double up = (double)(mh_now_ms() - sc->hub->started_ms) / 1000.0;
    return mh_buf_printf(out,
                         "# HELP musehub_build_info The running binary: version and git commit (value 1).\n"
                         "# TYPE musehub_build_info gauge\n"
                         "musehub_build_info{version=\"%s\",commit=\"%s\"} 1\n"
                         "# HELP musehub_uptime_seconds Seconds since the server (this worker) started.\n"
                         "# TYPE musehub_uptime_seconds gauge\nmusehub_uptime_seconds %.3f\n"
                         "# HELP musehub_workers Serving processes the server runs (MUSEHUB_WORKERS).\n"
                         "# TYPE musehub_workers gauge\nmusehub_workers %u\n"
                         "# HELP musehub_metrics_workers Workers by how their numbers reached this scrape: fresh "
                         "(answered now), stale (too busy: their previous numbers), missing (none yet).\n"
                         "# TYPE musehub_metrics_workers gauge\n"
                         "musehub_metrics_workers{state=\"fresh\"} %u\n"
                         "musehub_metrics_workers{state=\"stale\"} %u\n"
                         "musehub_metrics_workers{state=\"missing\"} %u\n",
                         mh_version, mh_git_commit, up, sc->workers, sc->fresh, sc->stale,
                         sc->workers - sc->fresh - sc->stale);
}

static void maybe_answer(scrape_t *sc)
{
    if (sc->answered || !sc->collected || !sc->queue_over) return;
    sc->answered = true;
    uv_timer_stop(&sc->timer);
    uv_close((uv_handle_t *)&sc->timer, timer_closed_cb);
    mh_req_t *req = sc->req;
    int rc = sc->merged_ok ? 0 : MH_ENOMEM;
    if (!rc && sc->queue.len) rc = mh_buf_append(&sc->merged, sc->queue.p, sc->queue.len);
    if (!rc) rc = server_lines(sc, &sc->merged);
    if (rc) {
        mh_res_fail(req, MH_ENOMEM, "metrics");
        return;
    }
    mh_res_send_buf(req, 200, "text/plain; version=0.0.4; charset=utf-8", &sc->merged);
}

static void collected_cb(void *ud, mh_metrics_result_t *res)
{
    scrape_t *sc = ud;
    sc->collected = true;
    sc->workers = res->workers;
    sc->fresh = res->fresh;
    sc->stale = res->stale;
    if (res->out) {
        sc->merged = *res->out;
        *res->out = (mh_buf_t){0};
        sc->merged_ok = true;
    }
    maybe_answer(sc);
    scrape_unref(sc);
}

static void queue_timeout_cb(uv_timer_t *t)
{
    scrape_t *sc = t->data;
    if (!sc->queue_over) mh_warn("metrics: job queue query took over %d ms; answered without it", QUEUE_WAIT_MS);
    sc->queue_over = true;
    maybe_answer(sc);
}

static const char *const known_types[] = {"mpack.index", "mpack.gc"};
static const char *const statuses[] = {"pending", "running", "done", "failed"};

/* Row of res for (type, status), or -1. */
static int find_row(PGresult *res, const char *type, const char *status)
{
    for (int i = 0; i < PQntuples(res); i++)
        if (!strcmp(mh_pq_str(res, i, 0), type) && !strcmp(mh_pq_str(res, i, 1), status)) return i;
    return -1;
}

static int queue_family(mh_buf_t *o, PGresult *res, const char *family, int col, const char *const *sts, int nst)
{
    int rc = 0;
    /* Every known type and status, zeros included (stable series); then
     * anything else the table holds. */
    int nk = (int)(sizeof known_types / sizeof known_types[0]);
    for (int k = 0; k < nk && !rc; k++)
        for (int s = 0; s < nst && !rc; s++) {
            int r = find_row(res, known_types[k], sts[s]);
            rc = mh_buf_printf(o, "%s{type=\"%s\",status=\"%s\"} %s\n", family, known_types[k], sts[s],
                               r >= 0 ? mh_pq_str(res, r, col) : "0");
        }
    for (int i = 0; i < PQntuples(res) && !rc; i++) {
        const char *t = mh_pq_str(res, i, 0), *s = mh_pq_str(res, i, 1);
        bool known = false;
        for (int k = 0; k < nk; k++) known |= !strcmp(t, known_types[k]);
        bool wanted = false;
        for (int j = 0; j < nst; j++) wanted |= !strcmp(s, sts[j]);
        if (known || !wanted) continue;
        rc = mh_buf_printf(o, "%s{type=\"", family);
        rc = rc ? rc : mh_metrics_label(o, t);
        rc = rc ? rc : mh_buf_printf(o, "\",status=\"%s\"} %s\n", s, mh_pq_str(res, i, col));
    }
    return rc;
}

static void queue_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    scrape_t *sc = ud;
    if (err) {
        if (!sc->queue_over) mh_warn("metrics: job queue query: %s (%s)", mh_strerror(err), errmsg ? errmsg : "");
    } else if (!sc->queue_over) {
        mh_buf_t *o = &sc->queue;
        int rc = mh_buf_append_str(o, "# HELP musehub_jobs_queue Jobs in the queue table, by type and status "
                                      "(finished ones are kept for MUSEHUB_JOB_RETENTION_HOURS).\n"
                                      "# TYPE musehub_jobs_queue gauge\n");
        rc = rc ? rc : queue_family(o, res, "musehub_jobs_queue", 2, statuses, 4);
        rc = rc ? rc
                : mh_buf_append_str(o, "# HELP musehub_jobs_oldest_pending_seconds Age of the oldest job waiting to "
                                       "run (pending and due), by type; 0 when none.\n"
                                       "# TYPE musehub_jobs_oldest_pending_seconds gauge\n");
        rc = rc ? rc : queue_family(o, res, "musehub_jobs_oldest_pending_seconds", 3, statuses, 1);
        if (rc) sc->queue.len = 0; /* out of memory: answer without it */
    }
    sc->queue_over = true;
    maybe_answer(sc);
    scrape_unref(sc);
}

void mh_h_metrics(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    scrape_t *sc = deadline_new(req, sizeof *sc, QUEUE_WAIT_MS, queue_timeout_cb);
    if (!sc) return;
    sc->req = req;
    sc->hub = hub;
    sc->refs = 3;
    mh_db_query(hub->db,
                "SELECT job_type, status, count(*),"
                " coalesce(floor(extract(epoch FROM now() - min(run_after)"
                "   FILTER (WHERE status = 'pending' AND run_after <= now()))), 0)::bigint"
                " FROM jobs GROUP BY 1, 2",
                0, NULL, NULL, NULL, queue_cb, sc);
    mh_metrics_collect(hub->loop, mh_hub_metrics_render, hub, collected_cb, sc);
}
