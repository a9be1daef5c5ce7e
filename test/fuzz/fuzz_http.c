/*
 * fuzz_http.c — libFuzzer target for the HTTP connection glue: arbitrary
 * bytes are one connection's input, fed in up to three pieces (the first
 * two bytes, which are also input, pick the cut points, so spans arrive
 * split) through the same code
 * path a socket read takes (mh__conn_feed on a "fake" connection whose
 * writes land in a buffer and complete on the next loop turn), then EOF,
 * then a graceful stop. Routes cover sync answers, buffered bodies with
 * JSON/msgpack decoding, streaming bodies with pause/resume, an early
 * pre_route answer and a gate (X-Gate) that denies or continues.
 *
 * Invariants checked: no crash/leak/UB (sanitizers), and everything
 * written starts with a status line.
 */
#include <stdlib.h>
#include <string.h>

#include "../../src/http/http_internal.h"

static uv_loop_t loop;

static void h_hello(mh_req_t *req) { mh_res_send(req, 200, "text/plain", "hello", 5); }

static void h_echo(mh_req_t *req) { mh_res_send(req, 200, NULL, req->body.p, req->body.len); }

static void h_val(mh_req_t *req)
{
    mh_val_t v;
    if (mh_req_body_val(req, &v)) mh_res_val(req, 201, &v);
}

static void st_body(mh_req_t *req, const uint8_t *d, size_t n)
{
    (void)d;
    req->user = (void *)((uintptr_t)req->user + n);
    /* Pause and resume at once: the resume is deferred to the next turn. */
    mh_req_pause(req);
    mh_req_resume(req);
}

static void st_end(mh_req_t *req) { mh_res_error(req, 200, "ok", "%zu bytes", (size_t)(uintptr_t)req->user); }

static void st_abort(mh_req_t *req) { mh_res_send(req, 499, NULL, NULL, 0); }

static void h_stream(mh_req_t *req)
{
    mh_str_t p = mh_req_param(req, "name");
    if (p.n && p.p[0] == 'x') {
        mh_res_error(req, 403, "forbidden", "no %s", p.p); /* early answer, body discarded */
        return;
    }
    req->on_body = st_body;
    req->on_body_end = st_end;
    req->on_abort = st_abort;
}

static void h_query(mh_req_t *req)
{
    mh_str_t a = mh_req_query(req, "a");
    mh_res_header(req, "X-A", a.p ? a.p : "-");
    mh_res_send(req, 204, NULL, NULL, 0);
}

static void gate(mh_req_t *req, void *arg)
{
    (void)arg;
    if (req->body.len & 1) mh_res_error(req, 401, "unauthorized", "odd body");
    else mh_req_continue(req);
}

static void pre_route(mh_req_t *req)
{
    if (mh_req_header(req, "x-deny").p) mh_res_error(req, 401, "unauthorized", "denied");
    else if (mh_req_header(req, "x-gate").p) req->gate = gate;
}

static const mh_route_t routes[] = {
    {"GET", "/", h_hello, "root", 0, false},
    {"POST", "/echo", h_echo, "echo", 64, false},
    {"POST", "/val", h_val, "val", 0, false},
    {"PUT", "/s/{name}", h_stream, "stream", 4096, true},
    {"GET", "/q/{*rest}", h_query, "query", 0, false},
    {"DELETE", "/q/{a}/{b}", h_hello, "del", 0, false},
    {NULL, NULL, NULL, NULL, 0, false},
};

static void stopped(void *arg) { *(int *)arg = 1; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int inited;
    if (!inited) {
        uv_loop_init(&loop);
        mh_log_level_current = MH_LOG_ERROR;
        inited = 1;
    }
    mh_http_config_t cfg = {
        .routes = routes,
        .default_max_body = 4096,
        .max_header_bytes = 1024,
        .max_headers = 16,
        .pre_route = pre_route,
    };
    mh_http_server_t *s;
    if (mh__http_fake_server(&loop, &cfg, &s)) return 0;
    mh_buf_t sink = {0};
    mh__http_fake_sink(s, &sink);
    mh_conn_t *c = mh__conn_new(s, true);
    size_t cut1 = size ? data[0] % (size + 1) : 0;
    size_t cut2 = size > 1 ? cut1 + data[1] % (size - cut1 + 1) : size;
    const size_t at[4] = {0, cut1, cut2, size};
    for (int i = 0; i < 3; i++) {
        /* The only connection: while it exists, nconns is 1. */
        if (s->nconns && at[i + 1] > at[i]) mh__conn_feed(c, (const char *)data + at[i], at[i + 1] - at[i]);
        uv_run(&loop, UV_RUN_NOWAIT);
    }
    if (s->nconns) mh__conn_eof(c);
    uv_run(&loop, UV_RUN_NOWAIT);
    int done = 0;
    mh_http_stop(s, 0, stopped, &done);
    while (!done) uv_run(&loop, UV_RUN_ONCE);
    if (sink.len && (sink.len < 9 || memcmp(sink.p, "HTTP/1.1 ", 9) != 0)) abort();
    mh_buf_free(&sink);
    return 0;
}
