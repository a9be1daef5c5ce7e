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

static void readyz_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    mh_req_t *req = ud;
    if (err) {
        mh_warn("readyz: database not reachable: %s", errmsg ? errmsg : mh_strerror(err));
        mh_res_header(req, "Retry-After", "2");
        mh_res_error(req, 503, "unavailable", "database not reachable");
        return;
    }
    static const char body[] = "{\"status\":\"ready\"}";
    mh_res_send(req, 200, "application/json", body, sizeof body - 1);
}

void mh_h_readyz(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    mh_db_query(hub->db, "SELECT 1", 0, NULL, NULL, NULL, readyz_cb, req);
}

void mh_h_metrics(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    mh_buf_t out = {0};
    int rc = mh_http_metrics_write(hub->http, &out);
    if (!rc) rc = mh_db_metrics_write(hub->db, &out);
    if (!rc) rc = mh_store_metrics_write(hub->store, &out);
    if (!rc) rc = mh_jobs_metrics_write(&out);
    if (!rc && hub->budget) rc = mh_budget_metrics_write(hub->budget, &out);
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
