/*
 * conn.c — one HTTP/1.1 connection: libuv reads, the llhttp glue, the
 * request life cycle (headers -> routing -> body -> handler -> response),
 * keep-alive and pipelining, limits and timeouts, closing.
 *
 * Invariants:
 *  - User code (pre_route, handlers, on_body_end, on_abort) runs outside
 *    llhttp_execute, except req->on_body which must run on the bytes in
 *    place: on_headers_complete and on_message_complete return HPE_PAUSED
 *    and the driver (conn_parse) acts on the event, then resumes.
 *  - The next pipelined request is not parsed while c->cur has a complete
 *    message and no response: unparsed bytes wait in c->pending, and the
 *    response (mh__conn_response_queued) resumes parsing, directly when we
 *    are inside the driver, else on the next loop turn (server idle handle).
 *  - A connection's memory is freed only in the close callback of its last
 *    handle; requests are freed only by mh__req_maybe_free (see
 *    http_internal.h), so nothing disappears under a caller.
 *  - Closing after an error response is graceful: FIN after the queued
 *    writes (uv_shutdown), then read-and-discard until EOF or a short
 *    linger timeout, so the client reads the response instead of an RST.
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "http_internal.h"

#define Q(r) ((req_t *)(r))

static void conn_fail(mh_conn_t *c, int status, const char *code, const char *detail);
static void conn_after(mh_conn_t *c);

/* ------------------------------------------------------------ requests */

/* Request ids: a bijective mix of a per-process random key and a counter,
 * so ids are unique within the process and unpredictable across processes
 * without a getrandom() call per request. */
static void req_make_id(mh_http_server_t *s, char out[17])
{
    static const char hx[] = "0123456789abcdef";
    uint64_t x = s->id_key + (s->id_ctr++) * 0x9E3779B97F4A7C15ull;
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    for (int i = 15; i >= 0; i--, x >>= 4) out[i] = hx[x & 15];
    out[16] = 0;
}

static req_t *req_new(mh_conn_t *c)
{
    mh_http_server_t *s = c->s;
    req_t *q = s->pool;
    mh_buf_t hdr = {0};
    if (q) {
        s->pool = q->pool_next;
        s->npool--;
        hdr = q->hdr; /* keep its capacity */
        hdr.len = 0;
    } else if (!(q = malloc(sizeof *q))) {
        return NULL;
    }
    memset(q, 0, sizeof *q);
    q->hdr = hdr;
    mh_arena_init(&q->r.arena, MH_HTTP_REQ_ARENA_LIMIT);
    q->r.server = s;
    q->r.app = s->cfg.app;
    q->r.conn = c;
    q->r.method = "-";
    memcpy(q->r.peer, c->peer, sizeof q->r.peer);
    q->r.path = MH_STR("");
    q->r.target = MH_STR("");
    q->r.query = MH_STR("");
    q->r.start_us = mh_now_us();
    req_make_id(s, q->r.id);
    q->hdrs_tail = &q->hdrs;
    q->start_ms = uv_now(s->loop);
    q->metric = s->metric_none;
    q->keep_alive = true;
    q->next = c->reqs;
    if (c->reqs) c->reqs->prev = q;
    c->reqs = q;
    s->live_reqs++;
    s->inflight++;
    return q;
}

static void req_unlink(req_t *q)
{
    mh_conn_t *c = q->r.conn;
    if (!c) return;
    if (q->prev) q->prev->next = q->next;
    else c->reqs = q->next;
    if (q->next) q->next->prev = q->prev;
    q->next = q->prev = NULL;
    q->r.conn = NULL;
}

static void req_free(req_t *q)
{
    mh_http_server_t *s = q->r.server;
    if (!q->nolog) mh__req_log_and_count(q);
    req_unlink(q);
    if (q->ext_done) q->ext_done(q->ext_arg);
    mh_buf_free(&q->owned);
    mh_buf_free(&q->r.body);
    mh_arena_release(&q->r.arena);
    s->inflight--;
    /* Pooled with its header buffer unless that grew unusually large. */
    if (q->hdr.cap > 8192) mh_buf_free(&q->hdr);
    if (s->npool < MH_HTTP_POOL_MAX && !s->orphaned) {
        q->pool_next = s->pool;
        s->pool = q;
        s->npool++;
    } else {
        mh_buf_free(&q->hdr);
        free(q);
    }
    mh__http_req_freed(s);
}

void mh__req_maybe_free(req_t *q)
{
    if (q->hold > 0 || !q->r.responded || q->write_pending) return;
    if (q->r.conn && q->r.conn->cur == q) return;
    req_free(q);
}

/* The client went away (EOF mid-request, reset, timeout, broken stream)
 * while q was not answered. A request nobody has seen is dropped; one a
 * handler owns is marked gone, and a streaming one gets on_abort. */
static void req_client_gone(req_t *q)
{
    q->r.gone = true;
    if (q->r.responded) {
        if (q->rs_open) mh__stream_client_gone(q);
        mh__req_maybe_free(q);
        return;
    }
    if (!q->dispatched) {
        q->r.responded = true;
        q->r.status = 499;
        if (q->phase == PH_HEADERS) q->nolog = true;
        mh__req_maybe_free(q);
        return;
    }
    if (q->stream && q->phase != PH_DONE && !q->aborted && q->r.on_abort) {
        q->aborted = true;
        q->hold++;
        q->r.on_abort(&q->r);
        q->hold--;
    }
    mh__req_maybe_free(q);
}

/* ------------------------------------------------------------ reading */

bool mh__conn_out_full(const mh_conn_t *c)
{
    if (c->nwriting >= MH_HTTP_OUT_MAX_RESPONSES) return true;
    return !c->fake && uv_stream_get_write_queue_size((const uv_stream_t *)&c->tcp) > MH_HTTP_OUT_MAX_BYTES;
}

static bool conn_can_parse(mh_conn_t *c)
{
    if (c->closing || c->stop_parse || c->user_paused) return false;
    const req_t *q = c->cur;
    /* A complete request waits for its answer (a streamed one until it
     * ends: the next answer must not interleave with it). */
    if (q && q->phase == PH_DONE && (!q->r.responded || q->rs_open)) return false;
    /* The client is not reading its answers: stop taking requests until
     * the queued output drains (mh__req_write_done resumes). */
    if (mh__conn_out_full(c)) {
        c->out_full = true;
        return false;
    }
    c->out_full = false;
    return true;
}

static size_t pending_len(const mh_conn_t *c) { return c->pending.len - c->pend_off; }

static int pending_append(mh_conn_t *c, const char *data, size_t n)
{
    if (c->pend_off) {
        size_t left = pending_len(c);
        memmove(c->pending.p, c->pending.p + c->pend_off, left);
        c->pending.len = left;
        c->pend_off = 0;
    }
    return mh_buf_append(&c->pending, data, n);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    mh_conn_t *c = h->data;
    /* One buffer per server: the loop is single-threaded and every read
     * is parsed (or copied to c->pending) before the next alloc. */
    buf->base = c->s->rbuf;
    buf->len = sizeof c->s->rbuf;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    mh_conn_t *c = st->data;
    if (nread > 0) {
        c->idle_since = uv_now(c->s->loop);
        mh__conn_feed(c, buf->base, (size_t)nread);
    } else if (nread == UV_EOF) {
        mh__conn_eof(c);
    } else if (nread < 0) {
        mh__conn_close(c);
    }
}

void mh__conn_update_reading(mh_conn_t *c)
{
    if (c->fake || c->closing) return;
    bool want;
    if (c->finishing) want = !c->eof; /* discard until EOF: avoids an RST */
    else want = !c->eof && !c->user_paused && !c->out_full && pending_len(c) < MH_HTTP_PENDING_MAX;
    if (want && !c->reading) {
        if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0) c->reading = true;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
}

/* ------------------------------------------------------------- timers */

/* The one deadline that applies now, in loop ms; 0 = none. */
static uint64_t conn_due(const mh_conn_t *c)
{
    const mh_http_server_t *s = c->s;
    if (c->closing) return 0;
    if (c->lingering) return c->linger_until;
    const req_t *q = c->cur;
    if (q && q->phase != PH_DONE && !c->user_paused) {
        /* A streamed body may be GiBs: its clock restarts with each chunk. */
        uint64_t from = q->start_ms;
        if (q->stream && q->dispatched && c->body_activity > from) from = c->body_activity;
        return from + s->cfg.request_timeout_ms;
    }
    if (c->nwriting > 0) return c->wq_since + s->cfg.idle_timeout_ms;
    if (q) return 0; /* the handler is working: its own business */
    return c->idle_since + s->cfg.idle_timeout_ms;
}

static void on_timer(uv_timer_t *t);

/* Makes sure the timer fires no later than the current deadline. Each arm
 * is capped at s->tick_ms (the shortest configured timeout), so a later
 * deadline set by a state change never needs a re-arm: the per-request
 * cost is a comparison, and a timer fires at most once per tick. */
void mh__conn_arm(mh_conn_t *c)
{
    if (c->closing) return;
    uint64_t due = conn_due(c);
    if (!due) return;
    if (c->timer_armed && c->timer_due <= due) return;
    uint64_t now = uv_now(c->s->loop);
    uint64_t delay = due > now ? due - now : 0;
    if (delay > c->s->tick_ms) delay = c->s->tick_ms;
    uv_timer_start(&c->timer, on_timer, delay, 0);
    c->timer_armed = true;
    c->timer_due = now + delay;
}

static void on_timer(uv_timer_t *t)
{
    mh_conn_t *c = t->data;
    c->timer_armed = false;
    if (c->closing) return;
    uint64_t now = uv_now(c->s->loop), due = conn_due(c);
    if (!due) return;
    if (now < due) {
        mh__conn_arm(c);
        return;
    }
    if (c->lingering) {
        mh__conn_close(c);
        return;
    }
    req_t *q = c->cur;
    if (q && q->phase != PH_DONE) {
        conn_fail(c, 408, "request_timeout", "the request did not arrive in time");
        conn_after(c);
        return;
    }
    if (c->nwriting > 0 && !c->fake) {
        /* Writes still queued: close only if none progressed for a whole
         * idle period (the client stopped reading). */
        size_t wq = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
        if (wq == 0 || wq != c->wq_sample) {
            c->wq_sample = wq;
            c->wq_since = now;
            mh__conn_arm(c);
            return;
        }
    }
    mh__conn_close(c);
}

/* -------------------------------------------------------- llhttp hooks */

static int hook_fail(mh_conn_t *c, int status, const char *code, const char *detail)
{
    c->err_status = status;
    c->err_code = code;
    c->err_detail = detail;
    return HPE_USER;
}

static int on_message_begin(llhttp_t *p)
{
    mh_conn_t *c = p->data;
    if (c->cur) return hook_fail(c, 500, "internal", "request overlap");
    req_t *q = req_new(c);
    if (!q) return hook_fail(c, 503, "unavailable", "out of memory");
    c->cur = q;
    c->url_len = 0;
    c->hbytes = 0;
    c->nh = 0;
    c->hstate = 0;
    mh__conn_arm(c);
    return 0;
}

/* Appends a span piece to the current request's header buffer, counting
 * it against the limit (NUL separators do not count). */
static int hdr_put(mh_conn_t *c, const char *at, size_t n, int status, const char *code, const char *detail)
{
    if (c->hbytes + n > c->s->cfg.max_header_bytes) return hook_fail(c, status, code, detail);
    if (mh_buf_append(&c->cur->hdr, at, n)) return hook_fail(c, 503, "unavailable", "out of memory");
    c->hbytes += (uint32_t)n;
    return 0;
}

/* Ends the string being accumulated (url, name or value) with a NUL; a
 * name that got no value callback gets an empty value. */
static int hdr_end_item(mh_conn_t *c)
{
    mh_buf_t *b = &c->cur->hdr;
    if (c->hstate == 1) {
        if (mh_buf_append_byte(b, 0)) return -1;
        c->hoff[c->nh - 1].vo = (uint32_t)b->len;
        c->hstate = 2;
    }
    return mh_buf_append_byte(b, 0) ? -1 : 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    mh_conn_t *c = p->data;
    if (!c->cur || c->cur->phase != PH_HEADERS) return 0;
    int rc = hdr_put(c, at, n, 414, "uri_too_long", "the request target is too long");
    if (!rc) c->url_len += (uint32_t)n;
    return rc;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    mh_conn_t *c = p->data;
    /* After the headers, these are chunked trailers: ignored. */
    if (!c->cur || c->cur->phase != PH_HEADERS) return 0;
    if (c->hstate != 1) {
        if ((uint32_t)c->nh >= c->s->cfg.max_headers)
            return hook_fail(c, 431, "headers_too_large", "too many header fields");
        if (hdr_end_item(c)) return hook_fail(c, 503, "unavailable", "out of memory");
        uint32_t at0 = (uint32_t)c->cur->hdr.len;
        c->hoff[c->nh++] = (hoff_t){at0, 0, at0, 0};
        c->hstate = 1;
    }
    int rc = hdr_put(c, at, n, 431, "headers_too_large", "the header section is too large");
    if (!rc) c->hoff[c->nh - 1].nl += (uint32_t)n;
    return rc;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    mh_conn_t *c = p->data;
    if (!c->cur || c->cur->phase != PH_HEADERS || c->nh == 0) return 0;
    if (c->hstate != 2) {
        if (mh_buf_append_byte(&c->cur->hdr, 0)) return hook_fail(c, 503, "unavailable", "out of memory");
        c->hoff[c->nh - 1].vo = (uint32_t)c->cur->hdr.len;
        c->hstate = 2;
    }
    int rc = hdr_put(c, at, n, 431, "headers_too_large", "the header section is too large");
    if (!rc) c->hoff[c->nh - 1].vl += (uint32_t)n;
    return rc;
}

static int on_headers_complete(llhttp_t *p)
{
    mh_conn_t *c = p->data;
    c->ev = EV_HEADERS;
    return HPE_PAUSED;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    mh_conn_t *c = p->data;
    req_t *q = c->cur;
    if (!q || n == 0) return 0;
    q->body_seen += n;
    if (q->discard || q->r.responded) return 0;
    if (q->body_seen > q->max_body)
        return hook_fail(c, 413, "payload_too_large", "the request body is larger than this route accepts");
    if (q->stream) {
        c->body_activity = uv_now(c->s->loop);
        if (q->r.on_body && !q->r.gone) {
            q->hold++;
            q->r.on_body(&q->r, (const uint8_t *)at, n);
            q->hold--;
        }
        /* mh_req_pause inside on_body: stop right here; the rest of this
         * read waits in c->pending until mh_req_resume. These may have
         * been the body's last bytes, with nothing after them: the message
         * then completes on the execute after the resume, which must run
         * even with no bytes left (kick), or the request would wait for
         * bytes that never come and time out (408). */
        if (!c->user_paused) return 0;
        c->kick = true;
        return HPE_PAUSED;
    }
    if (mh_buf_append(&q->r.body, at, n)) return hook_fail(c, 503, "unavailable", "out of memory");
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    mh_conn_t *c = p->data;
    c->ev = EV_MESSAGE;
    return HPE_PAUSED;
}

void mh__http_settings(llhttp_settings_t *st)
{
    llhttp_settings_init(st);
    st->on_message_begin = on_message_begin;
    st->on_url = on_url;
    st->on_header_field = on_header_field;
    st->on_header_value = on_header_value;
    st->on_headers_complete = on_headers_complete;
    st->on_body = on_body;
    st->on_message_complete = on_message_complete;
}

/* ------------------------------------------------------ request events */

static bool is_ws(char ch) { return ch == ' ' || ch == '\t'; }

/* Points the public fields into the request's header buffer, where every
 * span was copied once as it arrived: names are lowercased and values
 * trimmed in place; only the path (a prefix of the target) is copied
 * again so that it, too, is NUL-terminated. */
static int req_build(mh_conn_t *c, req_t *q)
{
    mh_buf_t *b = &q->hdr;
    size_t ul = c->url_len;
    if (hdr_end_item(c)) return MH_ENOMEM;
    const char *qm0 = ul ? memchr(b->p, '?', ul) : NULL;
    size_t pl = qm0 ? (size_t)(qm0 - (const char *)b->p) : ul;
    size_t path_at = b->len;
    /* Reserve first: appending from the buffer itself must not realloc
     * away the source. */
    if (mh_buf_reserve(b, pl + 1)) return MH_ENOMEM;
    if (pl) memcpy(b->p + b->len, b->p, pl);
    b->p[b->len + pl] = 0;
    b->len += pl + 1;
    mh_header_t *h = c->nh ? mh_alloc(&q->r.arena, (size_t)c->nh * sizeof *h) : NULL;
    if (c->nh && !h) return MH_ENOMEM;
    char *m = (char *)b->p; /* no appends after this point: pointers stay valid */

    q->r.target = (mh_str_t){m, ul};
    q->r.query = qm0 ? (mh_str_t){m + pl + 1, ul - pl - 1} : (mh_str_t){m + ul, 0};
    q->r.path = (mh_str_t){m + path_at, pl};
    for (int i = 0; i < c->nh; i++) {
        const hoff_t *o = &c->hoff[i];
        char *name = m + o->no;
        for (uint32_t k = 0; k < o->nl; k++)
            if (name[k] >= 'A' && name[k] <= 'Z') name[k] = (char)(name[k] + 32);
        char *v = m + o->vo;
        size_t vl = o->vl;
        while (vl && is_ws(*v)) v++, vl--;
        while (vl && is_ws(v[vl - 1])) vl--;
        v[vl] = 0;
        h[i] = (mh_header_t){{name, o->nl}, {v, vl}};
    }
    q->r.headers = h;
    q->r.nheaders = c->nh;

    llhttp_t *p = &c->parser;
    q->r.method = llhttp_method_name((llhttp_method_t)p->method);
    q->head = p->method == HTTP_HEAD;
    q->http_major = p->http_major;
    q->http_minor = p->http_minor;
    /* An Upgrade/CONNECT request leaves the stream unparseable after it. */
    q->keep_alive = llhttp_should_keep_alive(p) && !p->upgrade;
    if (p->flags & F_CHUNKED) q->r.content_length = UINT64_MAX;
    else if (p->flags & F_CONTENT_LENGTH) q->r.content_length = p->content_length;
    else q->r.content_length = 0;
    return 0;
}

/* RFC 3986 host [":" port] characters: reg-name (unreserved, sub-delims,
 * pct-encoded), IP literals and the port. Empty is valid (RFC 9112 3.2). */
static bool host_value_ok(mh_str_t v)
{
    for (size_t i = 0; i < v.n; i++) {
        unsigned char ch = (unsigned char)v.p[i];
        if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')) continue;
        if (!strchr("-._~!$&'()*+,;=%:[]", ch) || ch == 0) return false;
    }
    return true;
}

/* RFC 9112 3.2: an HTTP/1.1 request needs exactly one Host field line; any
 * request with two, or with an invalid value, is a 400. Two Host lines
 * are how a request reaches a different virtual host behind a proxy that
 * reads the other one. Returns NULL when fine, else why. */
static const char *host_problem(const req_t *q)
{
    int n = 0;
    mh_str_t v = {0};
    for (int i = 0; i < q->r.nheaders; i++) {
        if (q->r.headers[i].name.n == 4 && memcmp(q->r.headers[i].name.p, "host", 4) == 0) {
            n++;
            v = q->r.headers[i].value;
        }
    }
    if (n > 1) return "more than one Host header field";
    if (n == 0) return q->http_major > 1 || (q->http_major == 1 && q->http_minor >= 1) ? "missing Host header field" : NULL;
    return host_value_ok(v) ? NULL : "invalid Host header field";
}

/* Obsolete line folding (RFC 9112 5.2): a header line continued by a line
 * that starts with SP or HT. llhttp 8 accepts it and joins the lines, a
 * proxy may not: the same bytes would carry different headers. Scans the
 * header bytes llhttp consumed, p[0..n), for LF followed by SP/HT;
 * c->lf_last carries the state across reads. */
static bool saw_obs_fold(mh_conn_t *c, const char *p, size_t n)
{
    if (!n) return false;
    if (c->lf_last && (p[0] == ' ' || p[0] == '\t')) return true;
    for (const char *e = p + n, *lf = memchr(p, '\n', n); lf; lf = memchr(lf + 1, '\n', (size_t)(e - lf - 1)))
        if (lf + 1 < e && (lf[1] == ' ' || lf[1] == '\t')) return true;
    c->lf_last = p[n - 1] == '\n';
    return false;
}

static bool str_ieq(mh_str_t s, const char *lit)
{
    size_t n = strlen(lit);
    return s.n == n && strncasecmp(s.p, lit, n) == 0;
}

static void send_continue_cb(uv_write_t *w, int status)
{
    (void)status;
    free(w);
}

static void send_continue(mh_conn_t *c, req_t *q)
{
    static const char msg[] = "HTTP/1.1 100 Continue\r\n\r\n";
    q->continue_sent = true;
    if (c->fake) {
        if (c->s->fake_sink) mh_buf_append(c->s->fake_sink, msg, sizeof msg - 1);
        return;
    }
    uv_buf_t b = uv_buf_init((char *)msg, sizeof msg - 1);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (n == (int)b.len) return;
    if (n > 0) {
        b.base += n;
        b.len -= (size_t)n;
    }
    /* The socket is busy with earlier responses: queue behind them. The
     * write request is heap-allocated because the request may be freed
     * (client gone) before libuv is done with it. */
    uv_write_t *w = malloc(sizeof *w);
    if (!w || uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, send_continue_cb)) {
        free(w);
        mh__conn_close(c);
    }
}

/* Headers are complete: route, run pre_route, check limits and Expect,
 * and start a streaming handler. Runs outside llhttp_execute. */
static void conn_on_headers(mh_conn_t *c)
{
    mh_http_server_t *s = c->s;
    req_t *q = c->cur;
    if (!q) return;
    q->phase = PH_BODY;
    if (req_build(c, q)) {
        conn_fail(c, 503, "unavailable", "out of memory");
        return;
    }
    mh_req_t *r = &q->r;
    c->lf_last = false;
    const char *bad_host = host_problem(q);
    if (bad_host) {
        conn_fail(c, 400, "bad_request", bad_host);
        return;
    }
    mh_str_t ex = mh_req_header(r, "expect");
    bool has_body = r->content_length > 0;
    /* Known before any early answer: one given instead of 100 Continue
     * leaves it unknown whether the body follows, so it closes. HTTP/1.0
     * clients never wait for 100 (RFC 9110 10.1.1). */
    q->expect_continue = ex.p && q->http_minor >= 1 && has_body;
    const char *allow = NULL;
    int st = mh__route_match(s, q, &allow);
    q->hold++;
    if (s->cfg.pre_route) s->cfg.pre_route(r);
    if (r->responded) {
        /* answered by pre_route */
    } else if (st == 405) {
        if (allow) mh_res_header(r, "Allow", allow);
        mh_res_error(r, 405, "method_not_allowed", "%s is not allowed on this path", r->method);
    } else if (st == 404) {
        mh_res_error(r, 404, "not_found", "no such endpoint");
    } else if (st) {
        mh_res_error(r, st, st == 400 ? "bad_request" : "unavailable", "cannot decode the request path");
    } else {
        q->max_body = r->route->max_body ? r->route->max_body : s->cfg.default_max_body;
        q->stream = r->route->stream_body;
        if (r->content_length != UINT64_MAX && r->content_length > q->max_body) {
            mh_res_error(r, 413, "payload_too_large", "the body may be at most %llu bytes",
                         (unsigned long long)q->max_body);
        } else if (ex.p && q->http_minor >= 1 && !str_ieq(ex, "100-continue")) {
            mh_res_error(r, 417, "expectation_failed", "only 'Expect: 100-continue' is supported");
        } else {
            if (q->stream) {
                q->dispatched = true;
                c->body_activity = uv_now(s->loop);
                if (r->gate) {
                    /* Hold the body back until the gate lets us through. */
                    q->gated = true;
                    c->user_paused = true;
                    mh__conn_update_reading(c);
                    r->gate(r, r->gate_arg);
                } else {
                    r->route->handler(r);
                }
            } else if (has_body && r->content_length != UINT64_MAX) {
                if (mh_buf_reserve(&r->body, (size_t)r->content_length))
                    mh_res_error(r, 503, "unavailable", "out of memory for the body");
            }
            if (q->expect_continue && !r->responded && c->cur == q && !c->closing) send_continue(c, q);
        }
    }
    q->hold--;
    mh__req_maybe_free(q);
}

/* The message is complete: run a buffered handler, or tell a streaming
 * one its body has ended. Runs outside llhttp_execute. */
static void conn_on_message(mh_conn_t *c)
{
    req_t *q = c->cur;
    if (!q) return;
    q->phase = PH_DONE;
    mh_req_t *r = &q->r;
    if (!r->responded) {
        q->hold++;
        if (q->dispatched) {
            if (r->on_body_end && !r->gone) r->on_body_end(r);
        } else if (r->route) {
            q->dispatched = true;
            if (r->gate) {
                q->gated = true;
                r->gate(r, r->gate_arg);
            } else {
                r->route->handler(r);
            }
        } else {
            mh_res_error(r, 500, "internal", "unrouted request");
        }
        q->hold--;
    }
    if (c->cur == q && r->responded && !q->rs_open) {
        c->cur = NULL;
        c->user_paused = false;
    }
    mh__req_maybe_free(q);
    mh__conn_arm(c);
}

/* An error that makes the rest of the stream unusable: answer it (with a
 * fresh request when the current one belongs to a handler) and close. */
static void conn_fail(mh_conn_t *c, int status, const char *code, const char *detail)
{
    if (c->closing) return;
    c->stop_parse = true;
    req_t *q = c->cur;
    if (q && (q->dispatched || q->r.responded)) {
        c->cur = NULL;
        c->user_paused = false;
        if (q->r.responded) {
            /* Its answer is already queued: just end the connection (at
             * once when the answer is still being streamed). */
            if (q->rs_open) {
                mh__conn_close(c);
                return;
            }
            mh__req_maybe_free(q);
            mh__conn_finish(c);
            return;
        }
        req_client_gone(q);
        q = NULL;
    }
    if (!q) {
        q = req_new(c);
        if (!q) {
            mh__conn_close(c);
            return;
        }
        c->cur = q;
    }
    q->phase = PH_DONE;
    q->keep_alive = false;
    mh_res_error(&q->r, status, code, "%s", detail ? detail : "");
}

static void conn_parse_error(mh_conn_t *c, llhttp_errno_t e)
{
    if (e == HPE_USER && c->err_status) {
        conn_fail(c, c->err_status, c->err_code, c->err_detail);
        return;
    }
    const char *why = llhttp_get_error_reason(&c->parser);
    conn_fail(c, 400, "bad_request", why ? why : llhttp_errno_name(e));
}

/* Parses as much of data[0..len) as allowed; returns the bytes consumed.
 * Stops when the current request waits for its response, when the
 * handler paused the body, or when the connection stops parsing (then
 * everything counts as consumed: the rest is discarded). */
static size_t conn_parse(mh_conn_t *c, const char *data, size_t len)
{
    /* A kick may come with no bytes and no buffer (c->pending never
     * allocated). llhttp restarts an open span (the body's) at the data
     * pointer and ends it at data + len: NULL there would report a span
     * of (pointer value) bytes. */
    static const char none[1];
    if (!data) data = none;
    const char *p = data, *end = data + len;
    while (conn_can_parse(c) && (p < end || c->kick)) {
        c->kick = false;
        c->ev = EV_NONE;
        c->err_status = 0;
        /* Bytes of a header section (or of what precedes the next one). */
        bool in_headers = !c->cur || c->cur->phase == PH_HEADERS;
        llhttp_errno_t e = llhttp_execute(&c->parser, p, (size_t)(end - p));
        if ((e == HPE_OK || e == HPE_PAUSED) && in_headers) {
            const char *upto = e == HPE_OK ? end : llhttp_get_error_pos(&c->parser);
            if (saw_obs_fold(c, p, (size_t)(upto - p))) {
                conn_fail(c, 400, "bad_request", "obsolete line folding in the header section");
                return len;
            }
        }
        if (e == HPE_OK) {
            p = end;
        } else if (e == HPE_PAUSED) {
            p = llhttp_get_error_pos(&c->parser);
            llhttp_resume(&c->parser);
            if (c->ev == EV_HEADERS) {
                /* A body-less message completes on the next execute, which
                 * must run even with no bytes left. */
                c->kick = true;
                conn_on_headers(c);
            } else if (c->ev == EV_MESSAGE) {
                conn_on_message(c);
            }
        } else if (e == HPE_PAUSED_UPGRADE) {
            c->stop_parse = true;
            return len;
        } else {
            conn_parse_error(c, e);
            return len;
        }
    }
    if (c->stop_parse || c->closing) return len;
    /* Headers are in but the body is still due: ACK at once. A client
     * that writes the header and the body as two segments with Nagle on
     * (Python's httpx does) otherwise waits for our delayed ACK, up to
     * 40 ms per request. TCP_QUICKACK is not sticky, so it is re-armed
     * each time this happens; it costs one setsockopt only then. */
    if (p == end && c->cur && c->cur->phase == PH_BODY && !c->cur->r.responded) {
        uv_os_fd_t fd;
        int one = 1;
        if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0)
            (void)setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
    }
    return (size_t)(p - data);
}

/* ------------------------------------------------------------- driving */

void mh__conn_feed(mh_conn_t *c, const char *data, size_t len)
{
    if (c->closing || c->stop_parse) return; /* finishing: discard */
    if (pending_len(c) || !conn_can_parse(c)) {
        if (pending_append(c, data, len)) {
            mh__conn_close(c);
            return;
        }
        if (conn_can_parse(c)) mh__conn_drain(c);
        else conn_after(c);
        return;
    }
    c->in_drive++;
    size_t used = conn_parse(c, data, len);
    c->in_drive--;
    if (used < len && !c->closing && pending_append(c, data + used, len - used)) mh__conn_close(c);
    conn_after(c);
}

void mh__conn_drain(mh_conn_t *c)
{
    if (c->closing) return;
    c->in_drive++;
    while (conn_can_parse(c) && (pending_len(c) || c->kick)) {
        size_t n = conn_parse(c, (const char *)c->pending.p + c->pend_off, pending_len(c));
        c->pend_off += n;
        if (n == 0 && !c->kick) break;
    }
    if (c->stop_parse || !pending_len(c)) c->pending.len = c->pend_off = 0;
    c->in_drive--;
    conn_after(c);
}

/* After a batch of parsing: handle EOF, reading and the timer. */
static void conn_after(mh_conn_t *c)
{
    if (c->closing) return;
    if (c->eof && !c->finishing) {
        req_t *q = c->cur;
        bool waiting = q && q->phase == PH_DONE && !q->r.responded;
        /* Unparsed bytes (held back by a pause or a pending response), or
         * an execute owed after a pause on the body's last bytes (kick),
         * may still complete the request: decide only once they ran. */
        if (!waiting && !pending_len(c) && !c->kick) {
            if (q) {
                /* EOF in the middle of a request: the client is gone. */
                c->cur = NULL;
                c->user_paused = false;
                req_client_gone(q);
            }
            mh__conn_finish(c);
            if (c->closing) return;
        }
    }
    mh__conn_update_reading(c);
    mh__conn_arm(c);
}

void mh__conn_eof(mh_conn_t *c)
{
    c->eof = true;
    if (c->closing) return;
    if (c->finishing) {
        if (c->shut_done || c->fake) mh__conn_close(c);
        return;
    }
    /* A complete request still being handled: treat EOF as a half-close,
     * answer it, then close (conn_after). */
    conn_after(c);
}

bool mh__conn_idle(const mh_conn_t *c) { return !c->closing && !c->cur && !pending_len(c); }

/* --------------------------------------------------------------- writes */

static void on_write(uv_write_t *w, int status)
{
    req_t *q = (req_t *)((char *)w - offsetof(req_t, wreq));
    mh__req_write_done(q, status);
}

int mh__conn_write(mh_conn_t *c, req_t *q, int nbufs)
{
    if (c->nwriting++ == 0) {
        c->wq_since = uv_now(c->s->loop);
        c->wq_sample = 0;
    }
    q->write_pending = true;
    if (c->fake) {
        mh_http_server_t *s = c->s;
        for (int i = 0; i < nbufs && s->fake_sink; i++) mh_buf_append(s->fake_sink, q->bufs[i].base, q->bufs[i].len);
        return 1;
    }
    /* Try the socket first: a response that fits in the socket buffer
     * (nearly all of them) then needs no write request, no callback and,
     * above all, no epoll_ctl to re-arm POLLOUT, which libuv would do for
     * every completed uv_write. */
    size_t total = 0;
    for (int i = 0; i < nbufs; i++) total += q->bufs[i].len;
    int n = uv_try_write((uv_stream_t *)&c->tcp, q->bufs, (unsigned)nbufs);
    if (n >= 0 && (size_t)n == total) return 1;
    if (n < 0 && n != UV_EAGAIN) {
        q->write_pending = false;
        c->nwriting--;
        return n;
    }
    uv_buf_t *b = q->bufs;
    for (size_t done = n > 0 ? (size_t)n : 0; done;) {
        size_t k = done < b->len ? done : b->len;
        b->base += k;
        b->len -= k;
        done -= k;
        if (!b->len) {
            b++;
            nbufs--;
        }
    }
    int rc = uv_write(&q->wreq, (uv_stream_t *)&c->tcp, b, (unsigned)nbufs, on_write);
    if (rc) {
        q->write_pending = false;
        c->nwriting--;
    }
    return rc;
}

void mh__req_write_done(req_t *q, int status)
{
    mh_conn_t *c = q->r.conn;
    q->write_pending = false;
    if (c && !c->closing) {
        c->nwriting--;
        c->idle_since = uv_now(c->s->loop);
        if (status < 0) mh__conn_close(c);
        else if (c->finishing && c->fake && c->nwriting == 0) mh__conn_close(c);
        else {
            if (c->out_full && !mh__conn_out_full(c)) {
                /* The client read its answers: take requests again. */
                c->out_full = false;
                mh__conn_update_reading(c);
                if (pending_len(c) || c->kick || c->eof) mh__http_schedule_drain(c);
            }
            mh__conn_arm(c);
        }
    }
    mh__req_maybe_free(q);
}

bool mh__req_keep_alive(const req_t *q)
{
    const mh_conn_t *c = q->r.conn;
    if (!q->keep_alive || !c || c->stop_parse || c->s->stopping) return false;
    if (c->eof && !pending_len(c)) return false;
    if (q->phase != PH_DONE) {
        /* Answered before the body ended: keep the connection only if the
         * rest of the body is known, small, and surely coming. */
        if (q->expect_continue && !q->continue_sent) return false;
        if (q->r.content_length == UINT64_MAX) return false;
        if (q->r.content_length - q->body_seen > c->s->cfg.default_max_body) return false;
    }
    return true;
}

void mh__conn_response_queued(mh_conn_t *c, req_t *q, bool keep)
{
    if (!keep) c->stop_parse = true;
    if (c->cur == q) {
        if (q->phase == PH_DONE) {
            c->cur = NULL;
            c->user_paused = false;
            /* The next pipelined request may now be parsed: right away when
             * the driver is below us, else on the next loop turn. */
            if (keep && !c->in_drive && (pending_len(c) || c->eof)) mh__http_schedule_drain(c);
        } else {
            q->discard = true;
            if (keep && c->user_paused) {
                /* Answered with its body paused (a handler, or a gate that
                 * denied): the pause is over, the rest of the body is read
                 * and discarded. Left paused, the connection read nothing
                 * more and had no timer: it stayed open for good. */
                c->user_paused = false;
                mh__conn_update_reading(c);
                mh__http_schedule_drain(c);
            }
        }
    }
    if (!keep) mh__conn_finish(c);
    else mh__conn_arm(c);
}

/* -------------------------------------------------------------- closing */

static void conn_handle_closed(uv_handle_t *h)
{
    mh_conn_t *c = h->data;
    if (--c->handles_open > 0) return;
    mh_http_server_t *s = c->s;
    if (c->prev) c->prev->next = c->next;
    else s->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    if (c->in_ready) {
        if (c->rprev) c->rprev->rnext = c->rnext;
        else s->ready = c->rnext;
        if (c->rnext) c->rnext->rprev = c->rprev;
    }
    s->nconns--;
    mh_buf_free(&c->pending);
    free(c);
    mh__http_conn_freed(s);
}

void mh__conn_close(mh_conn_t *c)
{
    if (c->closing) return;
    c->closing = true;
    c->stop_parse = true;
    req_t *cur = c->cur;
    c->cur = NULL;
    /* Detach every request first: their later responses (or write
     * cancellations) must not touch this connection. */
    req_t *q = c->reqs, *gone = NULL;
    while (q) {
        req_t *n = q->next;
        q->next = q->prev = NULL;
        q->r.conn = NULL;
        if (!q->r.responded && q != cur) {
            q->pool_next = gone;
            gone = q;
        }
        q = n;
    }
    c->reqs = NULL;
    if (cur) req_client_gone(cur);
    while (gone) {
        req_t *n = gone->pool_next;
        gone->pool_next = NULL;
        req_client_gone(gone);
        gone = n;
    }
    if (!c->fake) uv_close((uv_handle_t *)&c->tcp, conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
}

static void on_shutdown(uv_shutdown_t *sr, int status)
{
    mh_conn_t *c = sr->handle->data;
    if (c->closing) return;
    c->shut_done = true;
    if (status < 0 || c->eof) {
        mh__conn_close(c);
        return;
    }
    c->lingering = true;
    c->linger_until = uv_now(c->s->loop) + MH_HTTP_LINGER_MS;
    mh__conn_update_reading(c);
    mh__conn_arm(c);
}

void mh__conn_finish(mh_conn_t *c)
{
    if (c->closing || c->finishing) return;
    c->finishing = true;
    c->stop_parse = true;
    c->pending.len = c->pend_off = 0;
    if (c->cur && c->cur->r.responded) {
        req_t *q = c->cur;
        c->cur = NULL;
        mh__req_maybe_free(q);
    }
    if (c->nwriting == 0 && (c->eof || c->fake)) {
        mh__conn_close(c);
        return;
    }
    if (c->fake) return; /* closed when its writes complete */
    if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown)) {
        mh__conn_close(c);
        return;
    }
    mh__conn_update_reading(c);
    mh__conn_arm(c);
}

/* ---------------------------------------------------------- connection */

mh_conn_t *mh__conn_new(mh_http_server_t *s, bool fake)
{
    mh_conn_t *c = calloc(1, sizeof *c + s->cfg.max_headers * sizeof(hoff_t));
    if (!c) return NULL;
    c->s = s;
    c->fake = fake;
    llhttp_init(&c->parser, HTTP_REQUEST, &s->settings);
    c->parser.data = c;
    uv_timer_init(s->loop, &c->timer);
    c->timer.data = c;
    c->handles_open = 1;
    if (!fake) {
        uv_tcp_init(s->loop, &c->tcp);
        c->tcp.data = c;
        c->handles_open = 2;
    }
    c->next = s->conns;
    if (s->conns) s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    c->idle_since = uv_now(s->loop);
    return c;
}

/* ---------------------------------------------------- pause and resume */

void mh_req_continue(mh_req_t *r)
{
    req_t *q = Q(r);
    if (!q->gated || r->responded) return;
    q->gated = false;
    if (r->gone) {
        mh_res_send(r, 499, NULL, NULL, 0); /* dropped; frees the request */
        return;
    }
    mh_conn_t *c = r->conn;
    if (q->stream && c && c->cur == q && c->user_paused) {
        /* Let the body flow (parsed on the next loop turn) before the
         * handler may pause it again itself. */
        mh_req_resume(r);
    }
    q->hold++;
    r->route->handler(r);
    q->hold--;
    mh__req_maybe_free(q);
}

void mh_req_pause(mh_req_t *r)
{
    mh_conn_t *c = r->conn;
    if (!c || c->closing || c->cur != Q(r) || Q(r)->phase == PH_DONE) return;
    c->user_paused = true;
    mh__conn_update_reading(c);
}

void mh_req_resume(mh_req_t *r)
{
    mh_conn_t *c = r->conn;
    if (!c || c->closing || !c->user_paused || c->cur != Q(r)) return;
    c->user_paused = false;
    c->body_activity = uv_now(c->s->loop);
    mh__conn_update_reading(c);
    /* Bytes held back by the pause are parsed on the next loop turn, never
     * from inside the caller (which may be a handler callback). */
    mh__http_schedule_drain(c);
    mh__conn_arm(c);
}
