/*
 * service.c — /healthz (process up), /readyz (database reachable) and
 * /metrics (Prometheus text) (SPEC 4.8).
 */
#include <libpq-fe.h>
#include <stdlib.h>

#include "mh/hub.h"
#include "mh/jobs.h"

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

typedef struct {
    uv_timer_t timer;
    mh_req_t *req; /* NULL once answered (the request may be gone) */
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
    readyz_t *p = calloc(1, sizeof *p);
    if (!p) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    p->req = req;
    p->timer.data = p;
    uv_timer_init(hub->loop, &p->timer);
    uv_timer_start(&p->timer, readyz_timer_cb, READYZ_MS, 0);
    mh_db_query(hub->db, "SELECT 1", 0, NULL, NULL, NULL, readyz_cb, p);
}

void mh_h_metrics(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    mh_buf_t out = {0};
    int rc = mh_http_metrics_write(hub->http, &out);
    if (!rc) rc = mh_db_metrics_write(hub->db, &out);
    if (!rc) rc = mh_store_metrics_write(hub->store, &out);
    if (!rc) rc = mh_jobs_metrics_write(&out);
    if (!rc)
        rc = mh_buf_printf(&out, "# TYPE musehub_uptime_seconds gauge\nmusehub_uptime_seconds %.3f\n",
                           (double)(mh_now_ms() - hub->started_ms) / 1000.0);
    if (rc) {
        mh_buf_free(&out);
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    mh_res_send_buf(req, 200, "text/plain; version=0.0.4", &out);
}
