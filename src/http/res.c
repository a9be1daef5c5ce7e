/*
 * res.c — responses (status line and headers built once into the request
 * arena, body as a second borrowed buffer, one uv_write), request
 * accessors (headers, format, body decoding), reason phrases and the
 * access-log line.
 *
 * Invariants: a request responds at most once (later calls are logged and
 * ignored, their buffers still released); a response to a request whose
 * client has gone is dropped and the request freed; the last thing every
 * mh_res_* path does is mh__req_maybe_free, so nothing touches the request
 * after it may have been freed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http_internal.h"

#define Q(r) ((req_t *)(r))

/* ---------------------------------------------------------- accessors */

mh_str_t mh_req_header(const mh_req_t *r, const char *lname)
{
    size_t n = strlen(lname);
    for (int i = 0; i < r->nheaders; i++)
        if (r->headers[i].name.n == n && memcmp(r->headers[i].name.p, lname, n) == 0) return r->headers[i].value;
    return (mh_str_t){NULL, 0};
}

static bool ci_contains(mh_str_t hay, const char *needle)
{
    size_t n = strlen(needle);
    for (size_t i = 0; i + n <= hay.n; i++)
        if (strncasecmp(hay.p + i, needle, n) == 0) return true;
    return false;
}

mh_format_t mh_req_format(const mh_req_t *r)
{
    mh_format_t dflt = r->route ? r->route->format : MH_FMT_JSON;
    mh_str_t acc = mh_req_header(r, "accept");
    if (!acc.p) return dflt;
    if (ci_contains(acc, "application/x-msgpack") || ci_contains(acc, "application/msgpack")) return MH_FMT_MSGPACK;
    if (ci_contains(acc, "application/json")) return MH_FMT_JSON;
    return dflt;
}

/* The media type of Content-Type (before ';', trimmed) equals lit. */
static bool media_is(mh_str_t ct, const char *lit)
{
    size_t n = 0;
    while (n < ct.n && ct.p[n] != ';') n++;
    while (n && (ct.p[n - 1] == ' ' || ct.p[n - 1] == '\t')) n--;
    return n == strlen(lit) && strncasecmp(ct.p, lit, n) == 0;
}

bool mh_req_body_val(mh_req_t *r, mh_val_t *out)
{
    if (r->body.len == 0) {
        mh_val_t *m = mh_v_map(&r->arena);
        if (!m) {
            mh_res_error(r, 503, "unavailable", "out of memory");
            return false;
        }
        *out = *m;
        return true;
    }
    mh_str_t ct = mh_req_header(r, "content-type");
    /* Anything but msgpack is read as JSON: curl -d sends form types. */
    bool mp = ct.p && (media_is(ct, "application/x-msgpack") || media_is(ct, "application/msgpack"));
    const char *why = NULL;
    int rc = mp ? mh_msgpack_decode(&r->arena, r->body.p, r->body.len, &mh_decode_limits_default, out, &why)
                : mh_json_decode(&r->arena, r->body.p, r->body.len, &mh_decode_limits_default, out, &why);
    if (rc == MH_ENOMEM) {
        mh_res_error(r, 503, "unavailable", "out of memory decoding the body");
        return false;
    }
    if (rc) {
        mh_res_error(r, 422, "invalid_body", "cannot decode the %s body: %s", mp ? "msgpack" : "JSON",
                     why ? why : mh_strerror(rc));
        return false;
    }
    return true;
}

bool mh_req_gone(const mh_req_t *r) { return r->gone; }

/* ------------------------------------------------------------ reasons */

const char *mh_http_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 428: return "Precondition Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status < 200 ? "Informational" : status < 300 ? "Success" : status < 400 ? "Redirection"
                    : status < 500 ? "Client Error" : "Server Error";
    }
}

/* ------------------------------------------------------------ logging */

void mh__req_log_and_count(req_t *q)
{
    mh_req_t *r = &q->r;
    int status = r->status ? r->status : 499;
    double secs = (double)(mh_now_us() - r->start_us) / 1e6;
    mh__http_observe(r->server, q->metric, status, secs);
    if (MH_LOG_INFO < mh_log_level_current) return;
    const char *client = r->peer[0] ? r->peer : "-", *user = "-";
    if (r->server->cfg.log_who) r->server->cfg.log_who(r, &client, &user);
    /* The path only, never the query: query strings carry presigned URL
     * signatures (/_store/...?X-Muse-Signature=...). */
    char *path = mh_strndup(&r->arena, r->path.n ? r->path.p : "-", r->path.n ? r->path.n : 1);
    const mh_log_field_t f[] = {
        MH_LF_S("event", "access"), MH_LF_S("method", r->method), MH_LF_S("path", path ? path : "-"),
        MH_LF_I("status", status),  MH_LF_I("bytes", r->bytes_out), MH_LF_N("ms", secs * 1000.0),
        MH_LF_S("req_id", r->id),   MH_LF_S("client", client),     MH_LF_S("user", user),
    };
    mh_log_fields(MH_LOG_INFO, f, sizeof f / sizeof f[0], "%s %s %d %llu %.3f %s %s %s", r->method, path ? path : "-",
                  status, (unsigned long long)r->bytes_out, secs * 1000.0, r->id, client, user);
}

/* ---------------------------------------------------------- responses */

void mh_res_header(mh_req_t *r, const char *name, const char *value)
{
    if (r->responded || !name || !value) return;
    size_t nl = strlen(name), vl = strlen(value);
    if (strpbrk(name, "\r\n: ") || strpbrk(value, "\r\n") || !nl) {
        mh_warn("req %s: header '%s' dropped (bad characters)", r->id, name);
        return;
    }
    /* Framing headers are ours alone. */
    if (!strcasecmp(name, "content-length") || !strcasecmp(name, "connection") ||
        !strcasecmp(name, "transfer-encoding"))
        return;
    req_t *q = Q(r);
    res_hdr_t *h = mh_alloc(&r->arena, sizeof *h);
    char *n = mh_strndup(&r->arena, name, nl), *v = mh_strndup(&r->arena, value, vl);
    if (!h || !n || !v) return;
    *h = (res_hdr_t){NULL, n, v, nl, vl};
    *q->hdrs_tail = h;
    q->hdrs_tail = &h->next;
}

static char *put(char *o, const char *s, size_t n)
{
    memcpy(o, s, n);
    return o + n;
}

#define PUT_LIT(o, lit) put((o), (lit), sizeof(lit) - 1)

static char *put_u64(char *o, uint64_t v)
{
    char tmp[24];
    int i = 0;
    do tmp[i++] = (char)('0' + v % 10);
    while ((v /= 10));
    while (i) *o++ = tmp[--i];
    return o;
}

/* Builds the head of the response into the arena; NULL on ENOMEM.
 * Shared with stream.c (streamed responses). */
char *mh__res_build_head(req_t *q, int status, const char *ctype, size_t n, bool body_allowed, bool keep,
                         size_t *len)
{
    mh_req_t *r = &q->r;
    const char *reason = mh_http_reason(status);
    const char *date;
    size_t datelen;
    mh__http_date(r->server, &date, &datelen);
    size_t rl = strlen(reason), cl = ctype ? strlen(ctype) : 0;
    size_t cap = 160 + rl + datelen + cl;
    for (res_hdr_t *h = q->hdrs; h; h = h->next) cap += h->nlen + h->vlen + 4;
    char *b = mh_alloc(&r->arena, cap), *o = b;
    if (!b) return NULL;
    o = PUT_LIT(o, "HTTP/1.1 ");
    o = put_u64(o, (uint64_t)status);
    *o++ = ' ';
    o = put(o, reason, rl);
    o = PUT_LIT(o, "\r\nServer: musehubd\r\nDate: ");
    o = put(o, date, datelen);
    if (ctype) {
        o = PUT_LIT(o, "\r\nContent-Type: ");
        o = put(o, ctype, cl);
    }
    if (body_allowed) {
        o = PUT_LIT(o, "\r\nContent-Length: ");
        o = put_u64(o, n);
    }
    o = keep ? PUT_LIT(o, "\r\nConnection: keep-alive\r\nX-Request-Id: ")
             : PUT_LIT(o, "\r\nConnection: close\r\nX-Request-Id: ");
    o = put(o, r->id, 16);
    o = PUT_LIT(o, "\r\n");
    for (res_hdr_t *h = q->hdrs; h; h = h->next) {
        o = put(o, h->name, h->nlen);
        o = PUT_LIT(o, ": ");
        o = put(o, h->value, h->vlen);
        o = PUT_LIT(o, "\r\n");
    }
    o = PUT_LIT(o, "\r\n");
    *len = (size_t)(o - b);
    return b;
}

static void res_emit(req_t *q, int status, const char *ctype, const void *body, size_t n)
{
    mh_req_t *r = &q->r;
    mh_conn_t *c = r->conn;
    if (status < 100 || status > 999) status = 500;
    r->responded = true;
    r->status = status;
    if (r->gone || !c || c->closing) {
        r->status = 499; /* nginx's "client closed request" */
        mh__req_maybe_free(q);
        return;
    }
    bool keep = mh__req_keep_alive(q);
    bool body_allowed = !(status < 200 || status == 204 || status == 304);
    size_t hl = 0;
    char *head = mh__res_build_head(q, status, ctype, n, body_allowed, keep, &hl);
    if (!head) {
        /* The arena is at its limit: a fixed answer, then close. It still
         * carries SPEC's error body (the close makes it safe for HEAD). */
        static const char oom[] = "HTTP/1.1 503 Service Unavailable\r\nServer: musehubd\r\n"
                                  "Content-Type: application/json\r\nContent-Length: 48\r\n"
                                  "Connection: close\r\n\r\n"
                                  "{\"error\":\"unavailable\",\"detail\":\"out of memory\"}";
        head = (char *)oom;
        hl = sizeof oom - 1;
        keep = false;
        body_allowed = false;
        r->status = 503;
    }
    /* Fields set directly: uv_buf_init takes an unsigned int length, and
     * a pack served from the store may be larger than that. */
    int nb = 0;
    q->bufs[nb].base = head;
    q->bufs[nb++].len = hl;
    if (body_allowed && !q->head && n) {
        q->bufs[nb].base = (char *)body;
        q->bufs[nb++].len = n;
    }
    r->bytes_out = hl + (nb == 2 ? n : 0);
    int rc = mh__conn_write(c, q, nb);
    mh__conn_response_queued(c, q, keep && rc >= 0);
    if (rc < 0) {
        mh__conn_close(c);
    } else if (rc == 1) {
        /* Written already. Inside our own dispatch (hold > 0) the request
         * is freed when the handler returns; from an asynchronous callback
         * the caller may still touch arena memory after this call, so the
         * completion waits for the next loop turn. */
        if (q->hold) mh__req_write_done(q, 0);
        else mh__http_defer_done(q);
    }
    mh__req_maybe_free(q);
}

static bool second_response(mh_req_t *r)
{
    if (!r->responded) return false;
    mh_error("req %s: second response ignored (a handler answered twice)", r->id);
    return true;
}

void mh_res_send(mh_req_t *r, int status, const char *content_type, const void *body, size_t n)
{
    if (second_response(r)) return;
    res_emit(Q(r), status, content_type, body, n);
}

void mh_res_send_buf(mh_req_t *r, int status, const char *content_type, mh_buf_t *body)
{
    if (second_response(r)) {
        mh_buf_free(body);
        return;
    }
    req_t *q = Q(r);
    mh_buf_free(&q->owned);
    q->owned = *body;
    *body = (mh_buf_t){0};
    res_emit(q, status, content_type, q->owned.p, q->owned.len);
}

void mh_res_send_ext(mh_req_t *r, int status, const char *content_type, const void *body, size_t n,
                     void (*done)(void *arg), void *arg)
{
    if (second_response(r)) {
        if (done) done(arg);
        return;
    }
    req_t *q = Q(r);
    q->ext_done = done;
    q->ext_arg = arg;
    res_emit(q, status, content_type, body, n);
}

static const char *ctype_of(mh_format_t f) { return f == MH_FMT_MSGPACK ? "application/x-msgpack" : "application/json"; }

mh_vb_t *mh_res_build(mh_req_t *r)
{
    if (!r->out.a) mh_vb_init(&r->out, &r->arena);
    return &r->out;
}

/* Encodes and sends; the caller checked that v is a whole answer. */
static void send_val(mh_req_t *r, int status, const mh_val_t *v)
{
    mh_format_t f = mh_req_format(r);
    mh_buf_t b = {0};
    if (mh_encode(v, f, &b)) {
        mh_buf_free(&b);
        static const char body[] = "{\"error\":\"internal\",\"detail\":\"cannot encode the response\"}";
        res_emit(Q(r), 500, "application/json", body, sizeof body - 1);
        return;
    }
    mh_res_send_buf(r, status, ctype_of(f), &b);
}

void mh_res_val(mh_req_t *r, int status, const mh_val_t *v)
{
    if (second_response(r)) return;
    if (r->out.err || !v) {
        mh_res_fail(r, r->out.err ? r->out.err : MH_ENOMEM, "building the answer");
        return;
    }
    send_val(r, status, v);
}

/* The error body, built outside the request's builder (whose error may be
 * the reason we are here). */
static void send_error(mh_req_t *r, int status, const char *code, const char *detail)
{
    mh_val_t *m = mh_v_map(&r->arena);
    if (!m || !detail || mh_map_put(&r->arena, m, "error", mh_v_str(code)) ||
        mh_map_put(&r->arena, m, "detail", mh_v_str(detail))) {
        static const char body[] = "{\"error\":\"unavailable\",\"detail\":\"out of memory\"}";
        res_emit(Q(r), status, "application/json", body, sizeof body - 1);
        return;
    }
    send_val(r, status, m);
}

void mh_res_error(mh_req_t *r, int status, const char *code, const char *detail_fmt, ...)
{
    if (second_response(r)) return;
    va_list ap, ap2;
    va_start(ap, detail_fmt);
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, detail_fmt, ap);
    va_end(ap);
    char *detail = n >= 0 ? mh_alloc(&r->arena, (size_t)n + 1) : NULL;
    if (detail) vsnprintf(detail, (size_t)n + 1, detail_fmt, ap2);
    va_end(ap2);
    send_error(r, status, code, detail);
}

/* ------------------------------------------------- the error table */

/* Every MH_E* a handler can meet, and what the client sees for it
 * (DESIGN 7: one place turns an error into an answer; handlers never
 * pick a status for an error code themselves). The sources name where
 * each code is made: PostgreSQL's SQLSTATE classes are translated once,
 * by the db module (src/db/conn.c, mh__db_translate). */
static const mh_http_err_t errors[] = {
    /* resources of this process */
    {MH_ENOMEM, 503, "unavailable", "the server is out of memory; retry shortly", true, false},
    {MH_ECANCELED, 503, "unavailable", "the server is stopping; retry shortly", true, false},
    /* db: SQLSTATE class 08 (connection exception), 57P01..57P03 (shutdown),
     * no connection in time, the pool's wait queue full */
    {MH_EDBDOWN, 503, "unavailable", "the database is unavailable; retry shortly", true, false},
    /* db: 57014 query_canceled (statement_timeout), the client-side timeout */
    {MH_ETIMEDOUT, 503, "unavailable", "the database is unavailable; retry shortly", true, false},
    /* db: 23505 unique_violation, 40001 serialization_failure,
     * 40P01 deadlock_detected: a concurrent writer won */
    {MH_ECONFLICT, 409, "conflict", "a concurrent change won; retry", false, false},
    /* db: every other SQLSTATE */
    {MH_EDB, 500, "internal", "database error", false, false},
    /* store: S3 5xx and transport errors, fs I/O errors */
    {MH_ESTORE, 503, "store_unavailable", "the object store is unavailable; retry shortly", true, false},
    {MH_EIO, 503, "store_unavailable", "the object store is unavailable; retry shortly", true, false},
    /* store: a full disk or bucket (SPEC 4.8) */
    {MH_ENOSPC, 507, "insufficient_storage", "no space left in the object store", false, false},
    /* budget: the pack-memory budget stayed spent for the queue timeout */
    {MH_EBUDGET, 503, "busy", "the server's memory for pack work is spent; retry later", true, false},
    /* limits: body sizes, pack sizes, entry counts */
    {MH_ELIMIT, 413, "too_large", "the input exceeds a configured limit", false, true},
    /* codec, mpack: malformed input; bytes that do not hash to their id */
    {MH_EPARSE, 422, "invalid_body", "malformed input", false, true},
    {MH_EHASH, 422, "hash_mismatch", "content does not hash to its id", false, true},
    {MH_ENOENT, 404, "not_found", "not found", false, true},
    {MH_EAUTH, 401, "unauthorized", "authentication failed", false, false},
};

static const mh_http_err_t internal_error = {0, 500, "internal", "internal error", false, false};

const mh_http_err_t *mh_http_err_of(int err)
{
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (errors[i].err == err) return &errors[i];
    return &internal_error;
}

void mh_res_fail(mh_req_t *r, int err, const char *what)
{
    const mh_http_err_t *e = mh_http_err_of(err);
    if (!e->explain) MH_LOG(e->status >= 500 ? MH_LOG_ERROR : MH_LOG_INFO, "req %s: %s (%s)", r->id,
                                  mh_strerror(err), what ? what : "");
    if (e->retry) mh_res_header(r, "Retry-After", "2");
    if (second_response(r)) return;
    send_error(r, e->status, e->code, e->explain && what ? what : e->detail);
}
