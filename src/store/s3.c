/*
 * s3.c — the `s3` object store backend (SPEC 3, 4.3, 4.4; DESIGN 1, 4):
 * any S3-compatible store (AWS S3, MinIO, ...), AWS Signature V4 of our
 * own (sigv4.c), libcurl multi driven by the libuv loop.
 *
 *   key "mpacks/<hex>"   -> object <bucket>/mpacks/<hex>
 *   key "incoming/<id>"  -> object <bucket>/incoming/<id>
 *   path style (default): <endpoint>/<bucket>/<key>
 *   virtual-hosted:       <scheme>://<bucket>.<endpoint host>/<key>
 *
 * This file is the transport and the whole-object operations; the
 * streams (writer, reader, listings, the tmp sweep) are in s3_stream.c,
 * on the same ops and transfers (s3_int.h).
 *
 * Shape: an operation (op: get, get_ranges, put, move, delete, head) is a
 * small state machine (`state`, advanced by op_step()) that issues one or
 * more HTTP transfers (xfer). Transfers wait in a FIFO queue for one of
 * WINDOW slots; a slot is an easy handle inside the curl multi, whose
 * sockets are watched with uv_poll_t and whose timeout is a uv_timer_t
 * (CURLMOPT_SOCKETFUNCTION / CURLMOPT_TIMERFUNCTION). curl keeps a cache
 * of connections in the multi, so consecutive transfers reuse them.
 *
 * Invariants:
 *  - Nothing blocks the loop: no curl_easy_perform, no DNS on the loop
 *    (curl's threaded resolver), large payload hashes on the thread pool.
 *  - Every op's callback fires exactly once, never inside the call that
 *    started it nor inside any other call into this backend (api_depth):
 *    completions found there are deferred to an async handle.
 *  - At most WINDOW transfers are in flight; the rest wait in FIFO order.
 *  - A transfer is retried (100 ms, 400 ms, 1.6 s, then it fails) on
 *    connection errors, 5xx, 429 and CopyObject's "200 with an <Error>";
 *    never on another 4xx. 404 is MH_ENOENT (NoSuchBucket: MH_ESTORE, it
 *    is a configuration error), 416 MH_EINVAL, everything else MH_ESTORE,
 *    so the hub answers 502/503 and never hangs: connect timeout 5 s and
 *    a low-speed limit bound every attempt.
 *  - Signatures, secrets and presigned URLs are never logged.
 *  - The store is freed only when no op is pending, the multi handle is
 *    cleaned up and every uv handle it owns has been closed.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "s3_int.h"

static const char *const http_method[] = {"GET", "HEAD", "PUT", "PUT", "DELETE", "POST"};
static const char *const http_label[] = {"GET", "HEAD", "PUT", "COPY", "DELETE", "POST"};

static const mh_store_op_t op_metric[] = {
    [OP_GET] = MH_STORE_OP_GET,       [OP_RANGES] = MH_STORE_OP_GET_RANGES, [OP_PUT] = MH_STORE_OP_PUT,
    [OP_MOVE] = MH_STORE_OP_MOVE,     [OP_DELETE] = MH_STORE_OP_DELETE,     [OP_HEAD] = MH_STORE_OP_HEAD,
    [OP_WRITER] = MH_STORE_OP_WRITER, [OP_READER] = MH_STORE_OP_READER,     [OP_LIST] = MH_STORE_OP_LIST,
    [OP_SWEEP] = MH_STORE_OP_SWEEP_TMP,
};

static void pump(s3_store_t *s3);
static void op_step(s3_op_t *op, xfer_t *x, int err);
static void arm_kick(s3_store_t *s3);
static void defer_op(s3_op_t *op);
static void maybe_shutdown(s3_store_t *s3);

/* ------------------------------------------------------ entry and exit */

/* Every API function and uv callback brackets its work with enter/leave:
 * completions are deferred while an API call is on the stack, and the
 * store is shut down only when nothing of ours is. */
void mh__s3_enter(s3_store_t *s3, bool api)
{
    s3->busy++;
    if (api) s3->api_depth++;
}

void mh__s3_leave(s3_store_t *s3, bool api)
{
    if (api) s3->api_depth--;
    if (--s3->busy == 0) maybe_shutdown(s3);
}

/* ---------------------------------------------------------------- ops */

void mh__s3_op_init(s3_op_t *op, s3_store_t *s3, op_kind_t kind, void *ud)
{
    op->s3 = s3;
    op->kind = kind;
    op->ud = ud;
    s3->pending++;
}

static s3_op_t *op_new(s3_store_t *s3, op_kind_t kind, void *ud)
{
    s3_op_t *op = calloc(1, sizeof *op);
    if (!op) {
        /* As in fs.c: with no op there is no way to call back later. */
        mh_error("store: s3: out of memory queuing an operation");
        abort();
    }
    mh__s3_op_init(op, s3, kind, ud);
    return op;
}

/* Calls the user's callback, then frees the op (a stream's op: the
 * stream code does both). */
static void op_complete(s3_op_t *op)
{
    s3_store_t *s3 = op->s3;
    int err = op->err;
    if (op->embedded) {
        mh__s3_stream_complete(op);
        s3->pending--;
        return;
    }
    mh_store_note(&s3->base, op_metric[op->kind], err);
    switch (op->kind) {
    case OP_GET:
    case OP_RANGES:
        if (err) mh_buf_free(&op->out);
        else s3->base.bytes_read += op->out.len;
        op->cb.get(op->ud, err, err ? NULL : &op->out);
        break;
    case OP_PUT:
        if (!err) s3->base.bytes_written += op->n;
        op->cb.done(op->ud, err);
        break;
    case OP_MOVE:
    case OP_DELETE: op->cb.done(op->ud, err); break;
    case OP_HEAD: op->cb.head(op->ud, err, err ? 0 : op->size); break;
    case OP_WRITER:
    case OP_READER:
    case OP_LIST:
    case OP_SWEEP: break; /* always embedded */
    }
    free(op->segs);
    free(op->runs);
    free(op);
    s3->pending--;
}

/* Ends an op with err once its last transfer is back; never calls the
 * user back from inside an API call (DESIGN 3: not re-entrant). */
void mh__s3_op_finish(s3_op_t *op, int err)
{
    if (!op->err) op->err = err;
    op->state = S_DONE;
    if (op->xfers_out > 0) return;
    s3_store_t *s3 = op->s3;
    if (s3->api_depth > 0) {
        defer_op(op);
        return;
    }
    op_complete(op);
}

bool mh__s3_copy_key(char *dst, const char *key)
{
    size_t n = key ? strnlen(key, MH_STORE_KEY_MAX + 1) : 0;
    if (!key || n > MH_STORE_KEY_MAX || !mh_store_key_valid(key, n)) {
        dst[0] = 0;
        return false;
    }
    memcpy(dst, key, n + 1);
    return true;
}

/* ----------------------------------------------------------- transfers */

static xfer_t *xfer_new(s3_op_t *op, http_kind_t kind, const char *key)
{
    xfer_t *x = calloc(1, sizeof *x);
    if (!x) return NULL;
    x->op = op;
    x->kind = kind;
    x->key = key;
    if (kind == H_PUT) { /* the whole-object PUT; streams override */
        x->up_data = op->data;
        x->up_n = op->n;
        memcpy(x->payload_hex, op->sha_hex, sizeof x->payload_hex);
    }
    op->xfers_out++;
    return x;
}

static void xfer_release_easy(xfer_t *x)
{
    if (x->easy) curl_easy_cleanup(x->easy);
    x->easy = NULL;
    curl_slist_free_all(x->hdrs);
    x->hdrs = NULL;
}

static void xfer_free(xfer_t *x)
{
    xfer_release_easy(x);
    mh_buf_free(&x->body);
    free(x);
}

/* The transfer is over (success or final error): hand it to its op. */
static void xfer_finish(xfer_t *x, int err)
{
    s3_op_t *op = x->op;
    op->xfers_out--;
    op_step(op, x, err);
    xfer_free(x);
}

static void enqueue(s3_store_t *s3, xfer_t *x)
{
    x->next = NULL;
    if (s3->queue_tail) s3->queue_tail->next = x;
    else s3->queue_head = x;
    s3->queue_tail = x;
}

/* Queues a new transfer of op; an allocation failure ends the op. */
void mh__s3_submit(s3_op_t *op, http_kind_t kind, const char *key, void (*setup)(xfer_t *, void *), void *arg)
{
    xfer_t *x = xfer_new(op, kind, key);
    if (!x) {
        mh__s3_op_finish(op, MH_ENOMEM);
        return;
    }
    if (setup) setup(x, arg);
    enqueue(op->s3, x);
    pump(op->s3);
}

/* Drops the transfers of op that have not started (a sibling failed). */
static void cancel_waiting(s3_op_t *op)
{
    s3_store_t *s3 = op->s3;
    xfer_t **lists[] = {&s3->queue_head, &s3->delayed};
    for (size_t l = 0; l < 2; l++) {
        for (xfer_t **pp = lists[l]; *pp;) {
            xfer_t *x = *pp;
            if (x->op != op) {
                pp = &x->next;
                continue;
            }
            *pp = x->next;
            op->xfers_out--;
            xfer_free(x);
        }
    }
    s3->queue_tail = NULL;
    for (xfer_t *x = s3->queue_head; x; x = x->next) s3->queue_tail = x;
}

/* ------------------------------------------------------ curl callbacks */

static bool status_ok(long st)
{
    return st >= 200 && st < 300;
}

/* Keeps the response body within what the request can legitimately
 * return: error bodies are capped (only <Code>/<Message> matter), a 206
 * must not exceed the range asked for, and a 200 answer to a ranged GET
 * (a store that ignores Range) is sliced to the range on the fly. */
static size_t write_cb(char *p, size_t size, size_t nmemb, void *ud)
{
    xfer_t *x = ud;
    size_t n = size * nmemb;
    if (!x->started_body) {
        x->started_body = true;
        curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &x->status);
        curl_off_t cl = -1;
        curl_easy_getinfo(x->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
        size_t want = 0;
        if (x->kind == H_GET && x->status == 206 && x->len != UINT64_MAX) want = (size_t)x->len;
        else if (x->kind == H_GET && x->status == 200 && !x->ranged && cl > 0 && (uint64_t)cl <= SIZE_MAX)
            want = (size_t)cl;
        if (want && mh_buf_reserve(&x->body, want) != 0) {
            x->nomem = true;
            return 0;
        }
    }
    if (x->kind != H_GET || !status_ok(x->status)) {
        size_t room = x->body.len < ERRBODY_MAX ? ERRBODY_MAX - x->body.len : 0;
        if (mh_buf_append(&x->body, p, n < room ? n : room) != 0) x->nomem = true;
        return x->nomem ? 0 : n;
    }
    if (x->ranged && x->status == 200) {
        /* Keep [off, off+len) of the whole object streaming by. */
        uint64_t pos = x->seen, end = x->len == UINT64_MAX ? UINT64_MAX : x->off + x->len;
        x->seen += n;
        uint64_t a = pos > x->off ? pos : x->off, b = x->seen < end ? x->seen : end;
        if (b > a && mh_buf_append(&x->body, p + (a - pos), (size_t)(b - a)) != 0) {
            x->nomem = true;
            return 0;
        }
        if (x->seen >= end) {
            x->range_done = true; /* stop reading: the rest is not ours */
            return 0;
        }
        return n;
    }
    if (x->ranged && x->len != UINT64_MAX && x->body.len + n > x->len) {
        x->overflow = true;
        return 0;
    }
    if (mh_buf_append(&x->body, p, n) != 0) {
        x->nomem = true;
        return 0;
    }
    return n;
}

static size_t read_cb(char *buf, size_t size, size_t nitems, void *ud)
{
    xfer_t *x = ud;
    size_t room = size * nitems, left = x->up_n - x->up_pos;
    size_t n = left < room ? left : room;
    if (n) memcpy(buf, x->up_data + x->up_pos, n);
    x->up_pos += n;
    return n;
}

/* curl rewinds an upload when it resends it on a fresh connection (a
 * kept-alive connection the store had closed): allow it. */
static int seek_cb(void *ud, curl_off_t off, int origin)
{
    xfer_t *x = ud;
    if (origin != SEEK_SET || off < 0 || (uint64_t)off > x->up_n) return CURL_SEEKFUNC_FAIL;
    x->up_pos = (size_t)off;
    return CURL_SEEKFUNC_OK;
}

/* Keeps the ETag of the answer (UploadPart needs it for the completion). */
static size_t header_cb(char *p, size_t size, size_t nitems, void *ud)
{
    xfer_t *x = ud;
    size_t n = size * nitems;
    if (n > 5 && strncasecmp(p, "etag:", 5) == 0) {
        const char *v = p + 5, *e = p + n;
        while (v < e && (*v == ' ' || *v == '\t')) v++;
        while (e > v && (e[-1] == '\r' || e[-1] == '\n' || e[-1] == ' ')) e--;
        size_t vn = (size_t)(e - v) < sizeof x->etag - 1 ? (size_t)(e - v) : sizeof x->etag - 1;
        memcpy(x->etag, v, vn);
        x->etag[vn] = 0;
    }
    return n;
}

int mh__s3_xfer_query(xfer_t *x, const char *name, const char *value)
{
    size_t nn = strlen(name) + 1, vn = strlen(value) + 1;
    if (x->nquery >= sizeof x->query / sizeof x->query[0] || x->qlen + nn + vn > sizeof x->qbuf) return MH_EINVAL;
    char *np = x->qbuf + x->qlen;
    memcpy(np, name, nn);
    memcpy(np + nn, value, vn);
    x->qlen += nn + vn;
    x->query[x->nquery++] = (mh_sigv4_kv_t){np, np + nn};
    return 0;
}

/* ------------------------------------------------------- request setup */

/* The unencoded object path ("/bucket/key" or "/key") into out. */
static int object_path(const s3_store_t *s3, const char *key, mh_buf_t *out)
{
    return mh_buf_printf(out, "%s/%s", s3->path_prefix, key);
}

/* The path of x: its object, or the bucket itself for listings ("/bucket"
 * in path style, "/" virtual-hosted). */
static int xfer_path(const s3_store_t *s3, const xfer_t *x, mh_buf_t *out)
{
    if (!x->bucket_level) return object_path(s3, x->key, out);
    return mh_buf_printf(out, "%s", s3->path_prefix[0] ? s3->path_prefix : "/");
}

static int add_header(struct curl_slist **l, const char *name, const char *value)
{
    char line[1024];
    int n = snprintf(line, sizeof line, "%s: %s", name, value);
    if (n < 0 || (size_t)n >= sizeof line) return MH_EINVAL;
    struct curl_slist *nl = curl_slist_append(*l, line);
    if (!nl) return MH_ENOMEM;
    *l = nl;
    return 0;
}

/* Builds the signed header list of x into x->hdrs. */
static int sign_request(s3_store_t *s3, xfer_t *x, const char *path)
{
    char date[17], range[64] = "";
    mh_buf_t copy_src = {0}, auth = {0};
    const char *payload = x->payload_hex[0] ? x->payload_hex : MH_SIGV4_EMPTY_SHA256;
    mh_sigv4_amz_date(mh_unix_time(), date);
    mh_sigv4_kv_t h[6];
    size_t nh = 0;
    h[nh++] = (mh_sigv4_kv_t){"host", s3->host};
    h[nh++] = (mh_sigv4_kv_t){"x-amz-content-sha256", payload};
    h[nh++] = (mh_sigv4_kv_t){"x-amz-date", date};
    int rc = 0;
    if (x->ranged) {
        if (x->len == UINT64_MAX) snprintf(range, sizeof range, "bytes=%" PRIu64 "-", x->off);
        else snprintf(range, sizeof range, "bytes=%" PRIu64 "-%" PRIu64, x->off, x->off + x->len - 1);
        h[nh++] = (mh_sigv4_kv_t){"range", range};
    }
    if (x->kind == H_COPY) {
        /* x-amz-copy-source is "/<bucket>/<key>", URI-encoded, in both
         * addressing styles. */
        rc = mh_buf_printf(&copy_src, "/%s/", s3->bucket);
        const char *src = x->copy_src ? x->copy_src : x->op->key;
        if (rc == 0) rc = mh_sigv4_uri_encode(&copy_src, src, strlen(src), true);
        if (rc == 0) rc = mh_buf_append_byte(&copy_src, 0);
        if (rc == 0) h[nh++] = (mh_sigv4_kv_t){"x-amz-copy-source", (const char *)copy_src.p};
    }
    mh_sigv4_req_t r = {.method = http_method[x->kind], .path = path, .query = x->nquery ? x->query : NULL,
                        .nquery = x->nquery, .headers = h, .nheaders = nh, .payload_hash = payload,
                        .amz_date = date};
    if (rc == 0) rc = mh_sigv4_authorization(&s3->cred, &r, &auth);
    if (rc == 0) rc = mh_buf_append_byte(&auth, 0);
    /* curl sends exactly these values: Host is set explicitly so the
     * signed host can never differ from the one on the wire. */
    for (size_t i = 0; i < nh && rc == 0; i++) rc = add_header(&x->hdrs, h[i].name, h[i].value);
    if (rc == 0) rc = add_header(&x->hdrs, "authorization", (const char *)auth.p);
    /* No "Expect: 100-continue" round trip before PUT/POST bodies. */
    if (rc == 0 && (x->kind == H_PUT || x->kind == H_COPY || x->kind == H_POST)) {
        struct curl_slist *nl = curl_slist_append(x->hdrs, "Expect:");
        if (nl) x->hdrs = nl;
        else rc = MH_ENOMEM;
    }
    mh_buf_free(&copy_src);
    mh_buf_free(&auth);
    return rc;
}

static int easy_setup(s3_store_t *s3, xfer_t *x)
{
    mh_buf_t path = {0}, url = {0};
    int rc = xfer_path(s3, x, &path);
    if (rc == 0) rc = mh_buf_append_byte(&path, 0);
    if (rc == 0) rc = mh_buf_append_str(&url, s3->origin);
    if (rc == 0) rc = mh_sigv4_uri_encode(&url, (const char *)path.p, path.len - 1, true);
    /* The query as sent; sigv4 signs the same parameters sorted. */
    for (size_t i = 0; i < x->nquery && rc == 0; i++) {
        rc = mh_buf_append_byte(&url, i ? '&' : '?');
        if (rc == 0) rc = mh_sigv4_uri_encode(&url, x->query[i].name, strlen(x->query[i].name), false);
        if (rc == 0) rc = mh_buf_append_byte(&url, '=');
        if (rc == 0) rc = mh_sigv4_uri_encode(&url, x->query[i].value, strlen(x->query[i].value), false);
    }
    if (rc == 0) rc = mh_buf_append_byte(&url, 0);
    if (rc == 0) rc = sign_request(s3, x, (const char *)path.p);
    if (rc == 0 && !(x->easy = curl_easy_init())) rc = MH_ENOMEM;
    if (rc == 0) {
        CURL *e = x->easy;
        x->errbuf[0] = 0;
        curl_easy_setopt(e, CURLOPT_URL, (const char *)url.p);
        curl_easy_setopt(e, CURLOPT_PRIVATE, x);
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->hdrs);
        curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->errbuf);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
        curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
        curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
        curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, s3->connect_ms);
        curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, (long)LOW_SPEED_LIMIT);
        /* CopyObject and CompleteMultipartUpload send nothing until the
         * store has assembled the object (real S3 sends spaces to keep the
         * connection alive, other stores stay silent): they get a longer
         * window before a stall is declared (bench: 8 concurrent clones'
         * completes against the emulator were cut at 15 s, then retried). */
        long stall_s = s3->low_speed_s;
        if ((x->kind == H_COPY || x->kind == H_POST) && stall_s < SLOW_ANSWER_TIME_S) stall_s = SLOW_ANSWER_TIME_S;
        curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, stall_s);
        curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
        curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
        curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
        switch (x->kind) {
        case H_GET: break;
        case H_HEAD: curl_easy_setopt(e, CURLOPT_NOBODY, 1L); break;
        case H_POST:
            curl_easy_setopt(e, CURLOPT_POST, 1L);
            curl_easy_setopt(e, CURLOPT_POSTFIELDS, x->up_n ? (const char *)x->up_data : "");
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)x->up_n);
            break;
        case H_PUT:
        case H_COPY:
            curl_easy_setopt(e, CURLOPT_UPLOAD, 1L);
            curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, (curl_off_t)(x->kind == H_PUT ? x->up_n : 0));
            curl_easy_setopt(e, CURLOPT_READFUNCTION, read_cb);
            curl_easy_setopt(e, CURLOPT_READDATA, x);
            curl_easy_setopt(e, CURLOPT_SEEKFUNCTION, seek_cb);
            curl_easy_setopt(e, CURLOPT_SEEKDATA, x);
            break;
        case H_DELETE: curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, "DELETE"); break;
        }
    }
    mh_buf_free(&path);
    mh_buf_free(&url);
    return rc;
}

/* Starts queued transfers while the window has room. */
static void pump(s3_store_t *s3)
{
    while (s3->active < WINDOW && s3->queue_head) {
        xfer_t *x = s3->queue_head;
        s3->queue_head = x->next;
        if (!s3->queue_head) s3->queue_tail = NULL;
        x->next = NULL;
        int rc = x->setup_err ? x->setup_err : easy_setup(s3, x);
        if (rc == 0 && curl_multi_add_handle(s3->multi, x->easy) != CURLM_OK) rc = MH_ESTORE;
        if (rc != 0) {
            mh_error("store: s3 %s %s: cannot start the request: %s", http_label[x->kind], x->key, mh_strerror(rc));
            xfer_finish(x, rc);
            continue;
        }
        s3->active++;
    }
}

/* ---------------------------------------------------- results, retries */

static bool curl_retryable(CURLcode cc)
{
    switch (cc) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM: return true;
    default: return false;
    }
}

/* How an attempt ended: 0, a final MH_E* error, or 1 = retry. code/msg
 * receive the S3 error, if any. */
/* S3 answers that mean "no space for these bytes" (SPEC 4.8: 507):
 * HTTP 507 (MinIO's XMinioStorageFull and friends), and quota codes of
 * MinIO and Ceph RGW. Never retried: it will not get better by itself. */
static bool full_answer(long status, const char *code)
{
    static const char *const codes[] = {"XMinioStorageFull", "QuotaExceeded", "XMinioAdminBucketQuotaExceeded",
                                        "XMinioBucketQuotaExceeded", "InsufficientStorage"};
    if (status == 507) return true;
    for (size_t i = 0; i < sizeof codes / sizeof *codes; i++)
        if (strcmp(code, codes[i]) == 0) return true;
    return false;
}

static int classify(xfer_t *x, char *code, size_t cs, char *msg, size_t ms)
{
    code[0] = msg[0] = 0;
    if (x->nomem) return MH_ENOMEM;
    if (x->range_done && x->cc == CURLE_WRITE_ERROR) x->cc = CURLE_OK; /* we stopped it */
    if (x->overflow) return MH_ESTORE;
    if (x->cc != CURLE_OK) return curl_retryable(x->cc) ? 1 : MH_ESTORE;
    if (!x->status) curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &x->status);
    bool err_body = x->kind != H_GET || !status_ok(x->status);
    if (err_body) mh_s3_xml_error((const char *)x->body.p, x->body.len, code, cs, msg, ms);
    if (status_ok(x->status)) {
        /* CopyObject and CompleteMultipartUpload may fail after sending
         * 200: the error is the body. */
        if ((x->kind == H_COPY || x->kind == H_POST) && code[0]) return full_answer(0, code) ? MH_ENOSPC : 1;
        return 0;
    }
    if (full_answer(x->status, code)) return MH_ENOSPC;
    /* A call the store does not implement will not start working. */
    if (x->status == 501 || strcmp(code, "NotImplemented") == 0) return MH_ESTORE;
    if (x->status >= 500 || x->status == 429 || strcmp(code, "SlowDown") == 0) return 1;
    if (x->status == 404) return strcmp(code, "NoSuchBucket") == 0 ? MH_ESTORE : MH_ENOENT;
    if (x->status == 416) return MH_EINVAL;
    return MH_ESTORE;
}

static void log_attempt(const xfer_t *x, const char *code, const char *msg, const char *what)
{
    if (x->cc != CURLE_OK)
        mh_warn("store: s3 %s %s: %s (attempt %d/%d)%s", http_label[x->kind], x->key ? x->key : "(bucket)",
                x->errbuf[0] ? x->errbuf : curl_easy_strerror(x->cc), x->attempt + 1, MAX_ATTEMPTS, what);
    else
        mh_warn("store: s3 %s %s: HTTP %ld %s%s%s (attempt %d/%d)%s", http_label[x->kind],
                x->key ? x->key : "(bucket)", x->status,
                code[0] ? code : "", msg[0] ? ": " : "", msg, x->attempt + 1, MAX_ATTEMPTS, what);
}

static void retry_later(s3_store_t *s3, xfer_t *x)
{
    uint64_t delay = s3->backoff_base_ms;
    for (int i = 0; i < x->attempt; i++) delay *= 4; /* 100, 400, 1600 ms */
    xfer_release_easy(x);
    mh_buf_free(&x->body);
    x->attempt++;
    x->status = 0;
    x->cc = CURLE_OK;
    x->up_pos = 0;
    x->seen = 0;
    x->started_body = x->nomem = x->overflow = x->range_done = false;
    x->due = uv_now(s3->base.loop) + delay;
    x->next = s3->delayed;
    s3->delayed = x;
    arm_kick(s3);
}

/* An easy handle left the multi. */
static void xfer_done(s3_store_t *s3, xfer_t *x)
{
    char code[64], msg[256];
    int r = classify(x, code, sizeof code, msg, sizeof msg);
    if (r == 1 && x->attempt + 1 < MAX_ATTEMPTS && x->op->state != S_DONE) {
        log_attempt(x, code, msg, ", retrying");
        retry_later(s3, x);
        return;
    }
    if (r == 1) r = MH_ESTORE;
    if (r == MH_ESTORE || r == MH_ENOMEM) log_attempt(x, code, msg, "");
    /* A full store is logged once when it starts and once when writes
     * succeed again, not per request. */
    if (r == MH_ENOSPC && !s3->full) {
        s3->full = true;
        log_attempt(x, code, msg, ": the store is full, writes are refused with 507 until space is freed");
    } else if (r == 0 && s3->full && (x->kind == H_PUT || x->kind == H_POST || x->kind == H_COPY)) {
        s3->full = false;
        mh_info("store: s3 bucket %s accepts writes again", s3->bucket);
    }
    if (r == 0 && x->kind == H_HEAD) {
        curl_off_t cl = -1;
        curl_easy_getinfo(x->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
        if (cl < 0) {
            mh_warn("store: s3 HEAD %s: no Content-Length in the answer", x->key);
            r = MH_ESTORE;
        }
        x->content_length = cl < 0 ? 0 : (uint64_t)cl;
    }
    xfer_finish(x, r);
}

static void check_multi_info(s3_store_t *s3)
{
    CURLMsg *m;
    int left;
    /* Transfers whose socket could not be watched (see socket_cb): taken
     * out of the multi first, which also drops any message of theirs. */
    while (s3->doomed) {
        xfer_t *x = s3->doomed;
        s3->doomed = x->doom_next;
        curl_multi_remove_handle(s3->multi, x->easy);
        s3->active--;
        xfer_done(s3, x); /* nomem: a final MH_ENOMEM */
    }
    while ((m = curl_multi_info_read(s3->multi, &left))) {
        if (m->msg != CURLMSG_DONE) continue;
        xfer_t *x = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&x);
        x->cc = m->data.result;
        curl_multi_remove_handle(s3->multi, m->easy_handle);
        s3->active--;
        xfer_done(s3, x);
    }
    pump(s3);
}

/* ------------------------------------------------------ libuv <-> curl */

static void sock_closed_cb(uv_handle_t *h)
{
    free(h->data);
}

static void sock_close(s3_store_t *s3, sock_ctx_t *c)
{
    if (c->prev) c->prev->next = c->next;
    else s3->socks = c->next;
    if (c->next) c->next->prev = c->prev;
    uv_close((uv_handle_t *)&c->poll, sock_closed_cb);
}

static void poll_cb(uv_poll_t *h, int status, int events)
{
    sock_ctx_t *c = h->data;
    s3_store_t *s3 = c->s3;
    int flags = 0, running;
    if (status < 0) flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
    mh__s3_enter(s3, false);
    curl_multi_socket_action(s3->multi, c->fd, flags, &running);
    check_multi_info(s3);
    mh__s3_leave(s3, false);
}

/* Marks e's transfer to be failed by check_multi_info (no curl API call
 * is allowed from inside a curl callback). */
static void doom(s3_store_t *s3, CURL *e)
{
    xfer_t *x = NULL;
    if (e) curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&x);
    if (!x || x->doomed) return;
    x->doomed = x->nomem = true;
    x->doom_next = s3->doomed;
    s3->doomed = x;
}

static int socket_cb(CURL *e, curl_socket_t fd, int what, void *userp, void *socketp)
{
    s3_store_t *s3 = userp;
    sock_ctx_t *c = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (c) {
            sock_close(s3, c);
            if (!s3->shut) curl_multi_assign(s3->multi, fd, NULL);
        }
        return 0;
    }
    if (!c) {
        c = calloc(1, sizeof *c);
        if (!c || uv_poll_init_socket(s3->base.loop, &c->poll, fd) != 0) {
            /* Returning -1 would make curl abort every transfer of the
             * multi without a CURLMSG_DONE and refuse new ones while they
             * remain (multi->dead): every store operation would hang.
             * Fail only this transfer, once curl has returned. */
            mh_error("store: s3: cannot watch socket %d", (int)fd);
            free(c);
            doom(s3, e);
            return 0;
        }
        c->fd = fd;
        c->s3 = s3;
        c->poll.data = c;
        c->next = s3->socks;
        if (s3->socks) s3->socks->prev = c;
        s3->socks = c;
        curl_multi_assign(s3->multi, fd, c);
    }
    int ev = ((what & CURL_POLL_IN) ? UV_READABLE : 0) | ((what & CURL_POLL_OUT) ? UV_WRITABLE : 0);
    uv_poll_start(&c->poll, ev, poll_cb);
    return 0;
}

static void curl_timer_cb(uv_timer_t *t)
{
    s3_store_t *s3 = t->data;
    int running;
    mh__s3_enter(s3, false);
    curl_multi_socket_action(s3->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_multi_info(s3);
    mh__s3_leave(s3, false);
}

/* CURLMOPT_TIMERFUNCTION: never act from inside curl; a 0 ms timer runs
 * on the next loop turn. */
static int timer_fn(CURLM *m, long timeout_ms, void *userp)
{
    (void)m;
    s3_store_t *s3 = userp;
    if (timeout_ms < 0) uv_timer_stop(&s3->curl_timer);
    else uv_timer_start(&s3->curl_timer, curl_timer_cb, (uint64_t)timeout_ms, 0);
    return 0;
}

/* Deferred completions go through an async handle rather than a 0 ms
 * timer: it wakes the loop's poll phase, so a caller driving the loop
 * with UV_RUN_ONCE sees the callback in that very turn. The handle is
 * ref'd only while completions wait, so an idle store never keeps a loop
 * alive. */
static void defer_op(s3_op_t *op)
{
    s3_store_t *s3 = op->s3;
    if (!s3->deferred) uv_ref((uv_handle_t *)&s3->defer);
    op->next = s3->deferred;
    s3->deferred = op;
    uv_async_send(&s3->defer);
}

void mh__s3_defer(s3_store_t *s3, s3_defer_t *d, void (*fn)(s3_defer_t *d))
{
    if (d->queued) return;
    d->queued = true;
    d->fn = fn;
    d->next = NULL;
    if (s3->dwork_tail) s3->dwork_tail->next = d;
    else s3->dwork_head = d;
    s3->dwork_tail = d;
    s3->pending++;
    uv_ref((uv_handle_t *)&s3->defer);
    uv_async_send(&s3->defer);
}

/* Deferred stream work, oldest first; work queued meanwhile waits for
 * the next turn. */
static void run_deferred_work(s3_store_t *s3)
{
    s3_defer_t *d = s3->dwork_head, *last = s3->dwork_tail;
    s3->dwork_head = s3->dwork_tail = NULL;
    while (d) {
        s3_defer_t *nx = d->next;
        bool end = d == last;
        d->queued = false;
        d->next = NULL;
        d->fn(d); /* may free d */
        s3->pending--;
        if (end) break;
        d = nx;
    }
}

static void defer_cb(uv_async_t *h)
{
    s3_store_t *s3 = h->data;
    mh__s3_enter(s3, false);
    run_deferred_work(s3);
    s3_op_t *list = s3->deferred, *rev = NULL;
    s3->deferred = NULL;
    uv_unref((uv_handle_t *)&s3->defer);
    if (s3->dwork_head) { /* queued by the work above: another turn */
        uv_ref((uv_handle_t *)&s3->defer);
        uv_async_send(&s3->defer);
    }
    while (list) { /* oldest first */
        s3_op_t *nx = list->next;
        list->next = rev;
        rev = list;
        list = nx;
    }
    while (rev) {
        s3_op_t *nx = rev->next;
        op_complete(rev);
        rev = nx;
    }
    mh__s3_leave(s3, false);
}

/* The kick timer: retries whose backoff is over go back in the queue. */
static void kick_cb(uv_timer_t *t)
{
    s3_store_t *s3 = t->data;
    mh__s3_enter(s3, false);
    uint64_t now = uv_now(s3->base.loop);
    for (xfer_t **pp = &s3->delayed; *pp;) {
        xfer_t *x = *pp;
        if (x->due > now) {
            pp = &x->next;
            continue;
        }
        *pp = x->next;
        enqueue(s3, x);
    }
    pump(s3);
    arm_kick(s3);
    mh__s3_leave(s3, false);
}

static void arm_kick(s3_store_t *s3)
{
    if (s3->shut) return;
    uint64_t now = uv_now(s3->base.loop), due = UINT64_MAX;
    for (xfer_t *x = s3->delayed; x; x = x->next)
        if (x->due < due) due = x->due;
    if (due == UINT64_MAX) uv_timer_stop(&s3->kick);
    else uv_timer_start(&s3->kick, kick_cb, due > now ? due - now : 0, 0);
}

/* ---------------------------------------------------------- op states */

void mh__s3_set_range(xfer_t *x, void *arg)
{
    const uint64_t *r = arg;
    x->ranged = true;
    x->off = r[0];
    x->len = r[1];
    x->run = (size_t)r[2];
}

/* A finished run of get_ranges: check its length and copy each range to
 * its place in the result. */
static int take_run(s3_op_t *op, xfer_t *x)
{
    const run_t *run = &op->runs[x->run];
    if (x->body.len != run->end - run->off) return MH_EINVAL; /* the object is shorter */
    for (size_t k = run->i; k < run->j; k++) {
        const seg_t *sg = &op->segs[k];
        if (sg->len) memcpy(op->out.p + sg->out, x->body.p + (sg->off - run->off), (size_t)sg->len);
    }
    return 0;
}

static void hash_work_cb(uv_work_t *w)
{
    s3_op_t *op = w->data;
    uint8_t d[32];
    mh_sha256(op->data, op->n, d);
    mh_hex_encode(op->sha_hex, d, sizeof d);
}

static void hash_after_cb(uv_work_t *w, int status)
{
    s3_op_t *op = w->data;
    s3_store_t *s3 = op->s3;
    mh__s3_enter(s3, false);
    op_step(op, NULL, status == 0 ? 0 : MH_ECANCELED);
    mh__s3_leave(s3, false);
}

/* The single place where an op moves on: x is the transfer that just
 * finished with err (NULL for the hash step). */
static void op_step(s3_op_t *op, xfer_t *x, int err)
{
    switch (op->state) {
    case S_GET:
        if (err == MH_EINVAL && op->len == UINT64_MAX) {
            /* 416 for "bytes=<off>-": off is at or past the end; reading
             * the empty tail of an object succeeds, so ask its size. */
            op->state = S_GET_HEAD;
            mh__s3_submit(op, H_HEAD, op->key, NULL, NULL);
            return;
        }
        if (err == 0 && op->len != UINT64_MAX && x->body.len != op->len) err = MH_EINVAL;
        if (err == 0) {
            op->out = x->body;
            x->body = (mh_buf_t){0};
        }
        mh__s3_op_finish(op, err);
        return;
    case S_GET_HEAD:
        if (err == 0 && (op->off > x->content_length || (op->len == UINT64_MAX && op->off != x->content_length)))
            err = MH_EINVAL;
        mh__s3_op_finish(op, err);
        return;
    case S_RANGES:
        if (!op->err && err) {
            op->err = err;
            cancel_waiting(op);
        } else if (!op->err) {
            op->err = take_run(op, x);
            if (op->err) cancel_waiting(op);
        }
        if (op->xfers_out == 0) mh__s3_op_finish(op, op->err);
        return;
    case S_RANGES_HEAD: mh__s3_op_finish(op, err); return;
    case S_PUT_HASH:
        if (err) {
            mh__s3_op_finish(op, err);
            return;
        }
        op->state = S_PUT;
        mh__s3_submit(op, H_PUT, op->key, NULL, NULL);
        return;
    case S_PUT: mh__s3_op_finish(op, err); return;
    case S_MV_SAME: mh__s3_op_finish(op, err); return;
    case S_MV_HEAD_DST:
        if (err == 0) { /* same bytes by hash: only drop the source */
            op->state = S_MV_HEAD_SRC;
            mh__s3_submit(op, H_HEAD, op->key, NULL, NULL);
        } else if (err == MH_ENOENT) {
            op->state = S_MV_COPY;
            mh__s3_submit(op, H_COPY, op->key2, NULL, NULL);
        } else {
            mh__s3_op_finish(op, err);
        }
        return;
    case S_MV_HEAD_SRC:
    case S_MV_COPY:
        if (err) {
            mh__s3_op_finish(op, err); /* MH_ENOENT: the source is absent */
            return;
        }
        op->state = S_MV_DELETE;
        mh__s3_submit(op, H_DELETE, op->key, NULL, NULL);
        return;
    case S_MV_DELETE: mh__s3_op_finish(op, err == MH_ENOENT ? 0 : err); return;
    case S_DELETE: mh__s3_op_finish(op, err == MH_ENOENT ? 0 : err); return;
    case S_HEAD:
        if (err == 0) op->size = x->content_length;
        mh__s3_op_finish(op, err);
        return;
    case S_STREAM: mh__s3_stream_step(op, x, err); return;
    case S_DONE:
        /* A sibling transfer of a failed op: only wait for the last. */
        if (op->xfers_out == 0) mh__s3_op_finish(op, op->err);
        return;
    }
}

/* ------------------------------------------------------- backend ops */

static void s3_get(mh_store_t *s, const char *key, uint64_t off, uint64_t len, mh_store_get_cb cb, void *ud)
{
    s3_store_t *s3 = (s3_store_t *)s;
    mh__s3_enter(s3, true);
    s3_op_t *op = op_new(s3, OP_GET, ud);
    op->cb.get = cb;
    op->off = off;
    op->len = len;
    if (!mh__s3_copy_key(op->key, key) || (len != UINT64_MAX && (len > SIZE_MAX || off > UINT64_MAX - len))) {
        mh__s3_op_finish(op, MH_EINVAL);
    } else if (len == 0) {
        op->state = S_GET_HEAD;
        mh__s3_submit(op, H_HEAD, op->key, NULL, NULL);
    } else if (off == 0 && len == UINT64_MAX) {
        op->state = S_GET;
        mh__s3_submit(op, H_GET, op->key, NULL, NULL);
    } else {
        uint64_t r[3] = {off, len, 0};
        op->state = S_GET;
        mh__s3_submit(op, H_GET, op->key, mh__s3_set_range, r);
    }
    mh__s3_leave(s3, true);
}

static int seg_cmp(const void *a, const void *b)
{
    const seg_t *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* Sorts the ranges and groups them into runs (one ranged GET each).
 * Zero-length ranges need no bytes and join no run. */
static int plan_ranges(s3_op_t *op, const mh_range_t *ranges, size_t n, size_t *total)
{
    size_t pos = 0;
    op->segs = malloc(n * sizeof *op->segs);
    op->runs = malloc(n * sizeof *op->runs);
    if (!op->segs || !op->runs) return MH_ENOMEM;
    for (size_t k = 0; k < n; k++) {
        uint64_t off = ranges[k].off, len = ranges[k].len;
        if (len > SIZE_MAX - pos || off > UINT64_MAX - len) return MH_EINVAL;
        op->segs[k] = (seg_t){off, len, pos};
        pos += (size_t)len;
    }
    qsort(op->segs, n, sizeof *op->segs, seg_cmp);
    op->nsegs = n;
    for (size_t i = 0; i < n;) {
        if (op->segs[i].len == 0) {
            i++;
            continue;
        }
        uint64_t rs = op->segs[i].off, re = rs + op->segs[i].len;
        size_t j = i + 1;
        for (; j < n; j++) {
            uint64_t end = op->segs[j].off + op->segs[j].len, ne = end > re ? end : re;
            if (op->segs[j].off > re + RANGE_GAP || ne - rs > RUN_MAX) break;
            re = ne;
        }
        op->runs[op->nruns++] = (run_t){rs, re, i, j};
        i = j;
    }
    *total = pos;
    return 0;
}

static void s3_get_ranges(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n, mh_store_get_cb cb,
                          void *ud)
{
    s3_store_t *s3 = (s3_store_t *)s;
    mh__s3_enter(s3, true);
    s3_op_t *op = op_new(s3, OP_RANGES, ud);
    op->cb.get = cb;
    size_t total = 0;
    int rc = mh__s3_copy_key(op->key, key) && (n == 0 || ranges) ? 0 : MH_EINVAL;
    if (rc == 0 && n > 0) rc = plan_ranges(op, ranges, n, &total);
    if (rc == 0 && total && mh_buf_reserve(&op->out, total) != 0) rc = MH_ENOMEM;
    if (rc != 0) {
        mh__s3_op_finish(op, rc);
    } else if (op->nruns == 0) {
        /* Nothing to read: still answer MH_ENOENT for an absent key. */
        op->state = S_RANGES_HEAD;
        mh__s3_submit(op, H_HEAD, op->key, NULL, NULL);
    } else {
        op->out.len = total;
        op->state = S_RANGES;
        for (size_t r = 0; r < op->nruns && op->state == S_RANGES; r++) {
            uint64_t a[3] = {op->runs[r].off, op->runs[r].end - op->runs[r].off, r};
            mh__s3_submit(op, H_GET, op->key, mh__s3_set_range, a);
        }
    }
    mh__s3_leave(s3, true);
}

static void s3_put(mh_store_t *s, const char *key, const void *data, size_t n, mh_store_done_cb cb, void *ud)
{
    s3_store_t *s3 = (s3_store_t *)s;
    mh__s3_enter(s3, true);
    s3_op_t *op = op_new(s3, OP_PUT, ud);
    op->cb.done = cb;
    op->data = data;
    op->n = n;
    op->state = S_PUT_HASH;
    if (!mh__s3_copy_key(op->key, key) || (n && !data)) {
        mh__s3_op_finish(op, MH_EINVAL);
    } else if (n > HASH_INLINE_MAX) {
        op->work.data = op;
        uv_queue_work(s3->base.loop, &op->work, hash_work_cb, hash_after_cb);
    } else {
        hash_work_cb(&(uv_work_t){.data = op});
        op_step(op, NULL, 0);
    }
    mh__s3_leave(s3, true);
}

static void s3_move(mh_store_t *s, const char *src, const char *dst, mh_store_done_cb cb, void *ud)
{
    s3_store_t *s3 = (s3_store_t *)s;
    mh__s3_enter(s3, true);
    s3_op_t *op = op_new(s3, OP_MOVE, ud);
    op->cb.done = cb;
    if (!mh__s3_copy_key(op->key, src) || !mh__s3_copy_key(op->key2, dst)) {
        mh__s3_op_finish(op, MH_EINVAL);
    } else if (strcmp(op->key, op->key2) == 0) {
        op->state = S_MV_SAME;
        mh__s3_submit(op, H_HEAD, op->key, NULL, NULL);
    } else {
        op->state = S_MV_HEAD_DST;
        mh__s3_submit(op, H_HEAD, op->key2, NULL, NULL);
    }
    mh__s3_leave(s3, true);
}

/* One request on `key` (op's callback already set): state, method;
 * a bad key finishes the op with MH_EINVAL (its callback on a later turn). */
static void key_op(s3_op_t *op, const char *key, op_state_t state, http_kind_t method)
{
    if (!mh__s3_copy_key(op->key, key)) {
        mh__s3_op_finish(op, MH_EINVAL);
    } else {
        op->state = state;
        mh__s3_submit(op, method, op->key, NULL, NULL);
    }
}

static void s3_delete(mh_store_t *s, const char *key, mh_store_done_cb cb, void *ud)
{
    s3_store_t *s3 = (s3_store_t *)s;
    mh__s3_enter(s3, true);
    s3_op_t *op = op_new(s3, OP_DELETE, ud);
    op->cb.done = cb;
    key_op(op, key, S_DELETE, H_DELETE);
    mh__s3_leave(s3, true);
}

static void s3_head(mh_store_t *s, const char *key, mh_store_head_cb cb, void *ud)
{
    s3_store_t *s3 = (s3_store_t *)s;
    mh__s3_enter(s3, true);
    s3_op_t *op = op_new(s3, OP_HEAD, ud);
    op->cb.head = cb;
    key_op(op, key, S_HEAD, H_HEAD);
    mh__s3_leave(s3, true);
}

/* ------------------------------------------------------- presigned URLs */

/* Query-signed URL (SigV4, X-Amz-Expires = ttl_s, already clamped to
 * [1, 604800] by store.c). Signed headers: host, plus content-length for
 * PUT so the upload must be exactly `size` bytes (clients send
 * Content-Length on their own; chunked uploads are refused). The payload
 * is UNSIGNED-PAYLOAD: S3 cannot check a SHA-256 given only in a URL, so
 * `sha256` is not part of the URL; the hub verifies the staged bytes
 * against the pack key at unpack (SPEC 4.3). */
static int s3_presign(mh_store_t *s, mh_arena_t *a, const char *method, const char *key, uint64_t size,
                      const uint8_t *sha256, uint32_t ttl_s, char **url)
{
    (void)sha256;
    s3_store_t *s3 = (s3_store_t *)s;
    bool put = strcmp(method, "PUT") == 0;
    char date[17], len[24];
    mh_buf_t path = {0}, q = {0}, enc = {0};
    mh_sigv4_amz_date(mh_unix_time(), date);
    snprintf(len, sizeof len, "%" PRIu64, size);
    mh_sigv4_kv_t h[2] = {{"host", s3->host}, {"content-length", len}};
    int rc = object_path(s3, key, &path);
    if (rc == 0) rc = mh_buf_append_byte(&path, 0);
    if (rc == 0) {
        mh_sigv4_req_t r = {.method = method, .path = (const char *)path.p, .headers = h, .nheaders = put ? 2 : 1,
                            .payload_hash = MH_SIGV4_UNSIGNED_PAYLOAD, .amz_date = date};
        rc = mh_sigv4_presign(&s3->cred, &r, ttl_s, &q);
    }
    if (rc == 0) rc = mh_sigv4_uri_encode(&enc, (const char *)path.p, path.len - 1, true);
    if (rc == 0) {
        /* memcpy, not printf: this runs once per fetch answer (hot). */
        size_t on = strlen(s3->origin);
        char *u = mh_alloc(a, on + enc.len + 1 + q.len + 1);
        if (u) {
            memcpy(u, s3->origin, on);
            memcpy(u + on, enc.p, enc.len);
            u[on + enc.len] = '?';
            memcpy(u + on + enc.len + 1, q.p, q.len);
            u[on + enc.len + 1 + q.len] = 0;
        }
        *url = u;
        if (!u) rc = MH_ENOMEM;
    }
    mh_buf_free(&path);
    mh_buf_free(&q);
    mh_buf_free(&enc);
    return rc;
}

/* -------------------------------------------------------- open and close */

static void s3_free(s3_store_t *s3)
{
    free(s3->origin);
    free(s3->host);
    free(s3->path_prefix);
    free(s3->bucket);
    free(s3->region);
    free(s3->access_key);
    if (s3->secret_key) {
        memset(s3->secret_key, 0, strlen(s3->secret_key));
        free(s3->secret_key);
    }
    memset(&s3->cred, 0, sizeof s3->cred);
    free(s3);
    curl_global_cleanup();
}

static void handle_closed_cb(uv_handle_t *h)
{
    s3_store_t *s3 = h->data;
    if (--s3->open_handles == 0) s3_free(s3);
}

static void shutdown_store(s3_store_t *s3)
{
    s3->shut = true;
    if (s3->multi) curl_multi_cleanup(s3->multi); /* may REMOVE sockets via socket_cb */
    s3->multi = NULL;
    while (s3->socks) sock_close(s3, s3->socks);
    uv_timer_stop(&s3->curl_timer);
    uv_timer_stop(&s3->kick);
    s3->open_handles = 3;
    uv_close((uv_handle_t *)&s3->curl_timer, handle_closed_cb);
    uv_close((uv_handle_t *)&s3->kick, handle_closed_cb);
    uv_close((uv_handle_t *)&s3->defer, handle_closed_cb);
}

static void maybe_shutdown(s3_store_t *s3)
{
    if (s3->closing && !s3->shut && s3->pending == 0 && s3->busy == 0) shutdown_store(s3);
}

static void s3_close(mh_store_t *s)
{
    s3_store_t *s3 = (s3_store_t *)s;
    mh__s3_enter(s3, false);
    s3->closing = true;
    mh__s3_leave(s3, false);
}

/* Splits MUSEHUB_S3_ENDPOINT ("http[s]://host[:port][/]") into origin
 * and host. No endpoint: AWS's regional endpoint. The default port of
 * the scheme is dropped, as HTTP clients drop it from the Host header
 * they send (and sign) for presigned URLs. */
static int parse_endpoint(s3_store_t *s3, const char *ep, char **scheme, char **host)
{
    if (!ep || !*ep) {
        *scheme = strdup("https");
        mh_buf_t b = {0};
        if (mh_buf_printf(&b, "s3.%s.amazonaws.com%c", s3->region, 0) != 0) return MH_ENOMEM;
        *host = (char *)b.p;
        return *scheme ? 0 : MH_ENOMEM;
    }
    const char *rest;
    if (strncmp(ep, "http://", 7) == 0) {
        *scheme = strdup("http");
        rest = ep + 7;
    } else if (strncmp(ep, "https://", 8) == 0) {
        *scheme = strdup("https");
        rest = ep + 8;
    } else {
        return MH_EINVAL;
    }
    if (!*scheme) return MH_ENOMEM;
    size_t n = strcspn(rest, "/");
    if (n == 0 || (rest[n] && strcmp(rest + n, "/") != 0)) return MH_EINVAL; /* a path prefix is not supported */
    for (size_t i = 0; i < n; i++) {
        char c = rest[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '-' ||
              c == ':' || c == '[' || c == ']'))
            return MH_EINVAL;
    }
    const char *dflt = strcmp(*scheme, "http") == 0 ? ":80" : ":443";
    size_t dn = strlen(dflt);
    if (n > dn && memcmp(rest + n - dn, dflt, dn) == 0) n -= dn;
    if (!(*host = strndup(rest, n))) return MH_ENOMEM;
    for (char *p = *host; *p; p++)
        if (*p >= 'A' && *p <= 'Z') *p = (char)(*p - 'A' + 'a');
    return 0;
}

static bool bucket_valid(const char *b, bool dns)
{
    size_t n = strlen(b);
    if (n < 3 || n > 63) return false;
    for (size_t i = 0; i < n; i++) {
        char c = b[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-';
        if (!dns) ok |= (c >= 'A' && c <= 'Z') || c == '_';
        if (!ok) return false;
    }
    return true;
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static int s3_init(s3_store_t *s3, const mh_store_config_t *cfg, const char *bucket)
{
    char *scheme = NULL, *ephost = NULL;
    int rc = 0;
    s3->path_style = cfg->s3_path_style;
    s3->bucket = strdup(bucket);
    s3->region = strdup(cfg->s3_region && *cfg->s3_region ? cfg->s3_region : "us-east-1");
    s3->access_key = dup_or_null(cfg->s3_access_key);
    s3->secret_key = dup_or_null(cfg->s3_secret_key);
    if (!s3->bucket || !s3->region) return MH_ENOMEM;
    if (!s3->access_key || !*s3->access_key || !s3->secret_key || !*s3->secret_key) {
        mh_error("store: s3 needs MUSEHUB_S3_ACCESS_KEY and MUSEHUB_S3_SECRET_KEY");
        return MH_EINVAL;
    }
    if (!bucket_valid(bucket, !s3->path_style)) {
        mh_error("store: s3 bucket name \"%s\" is not valid%s", bucket,
                 s3->path_style ? "" : " for virtual-hosted addressing (MUSEHUB_S3_PATH_STYLE=0)");
        return MH_EINVAL;
    }
    if ((rc = parse_endpoint(s3, cfg->s3_endpoint, &scheme, &ephost)) != 0) {
        if (rc == MH_EINVAL)
            mh_error("store: MUSEHUB_S3_ENDPOINT=\"%s\" is not http[s]://host[:port]", cfg->s3_endpoint);
        free(scheme);
        free(ephost);
        return rc;
    }
    mh_buf_t host = {0}, origin = {0}, prefix = {0};
    if (s3->path_style) rc = mh_buf_printf(&host, "%s%c", ephost, 0);
    else rc = mh_buf_printf(&host, "%s.%s%c", bucket, ephost, 0);
    if (rc == 0) rc = mh_buf_printf(&origin, "%s://%s%c", scheme, (const char *)host.p, 0);
    if (rc == 0) rc = mh_buf_printf(&prefix, "%s%s%c", s3->path_style ? "/" : "", s3->path_style ? bucket : "", 0);
    s3->host = (char *)host.p;
    s3->origin = (char *)origin.p;
    s3->path_prefix = (char *)prefix.p;
    free(scheme);
    free(ephost);
    if (rc != 0) return rc;
    s3->cred = (mh_sigv4_cred_t){.access_key = s3->access_key, .secret_key = s3->secret_key,
                                 .region = s3->region, .service = "s3"};
    return 0;
}

int mh_store_s3_open(uv_loop_t *loop, const mh_store_config_t *cfg, const char *bucket, mh_store_t **out)
{
    *out = NULL;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return MH_ESTORE;
    s3_store_t *s3 = calloc(1, sizeof *s3);
    if (!s3) {
        curl_global_cleanup();
        return MH_ENOMEM;
    }
    s3->base.ops = &mh_store_s3_ops;
    s3->base.loop = loop;
    s3->connect_ms = CONNECT_TIMEOUT_MS;
    s3->low_speed_s = LOW_SPEED_TIME_S;
    s3->backoff_base_ms = 100;
    int rc = s3_init(s3, cfg, bucket);
    if (rc == 0 && !(s3->multi = curl_multi_init())) rc = MH_ENOMEM;
    if (rc != 0) {
        if (s3->multi) curl_multi_cleanup(s3->multi);
        s3_free(s3);
        return rc;
    }
    curl_multi_setopt(s3->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
    curl_multi_setopt(s3->multi, CURLMOPT_SOCKETDATA, s3);
    curl_multi_setopt(s3->multi, CURLMOPT_TIMERFUNCTION, timer_fn);
    curl_multi_setopt(s3->multi, CURLMOPT_TIMERDATA, s3);
    curl_multi_setopt(s3->multi, CURLMOPT_MAXCONNECTS, (long)(2 * WINDOW));
    uv_timer_init(loop, &s3->curl_timer);
    uv_timer_init(loop, &s3->kick);
    uv_async_init(loop, &s3->defer, defer_cb);
    uv_unref((uv_handle_t *)&s3->defer);
    s3->curl_timer.data = s3->kick.data = s3->defer.data = s3;
    mh_info("store: s3 bucket %s at %s (%s, region %s)", s3->bucket, s3->origin,
            s3->path_style ? "path style" : "virtual-hosted", s3->region);
    *out = &s3->base;
    return 0;
}

void mh_store_s3_tune(mh_store_t *s, unsigned connect_ms, unsigned low_speed_s, unsigned backoff_base_ms)
{
    if (!s || s->ops != &mh_store_s3_ops) return;
    s3_store_t *s3 = (s3_store_t *)s;
    if (connect_ms) s3->connect_ms = (long)connect_ms;
    if (low_speed_s) s3->low_speed_s = (long)low_speed_s;
    if (backoff_base_ms) s3->backoff_base_ms = backoff_base_ms;
}

const mh_store_ops_t mh_store_s3_ops = {
    .kind = "s3",
    .get = s3_get,
    .get_ranges = s3_get_ranges,
    .put = s3_put,
    .move = s3_move,
    .del = s3_delete,
    .head = s3_head,
    .presign = s3_presign,
    .close = s3_close,
    .writer_chunk_default = 8u * 1024u * 1024u,
    .writer_chunk_min = 5u * 1024u * 1024u, /* S3's smallest part but the last */
    .writer_open = mh__s3_writer_open,
    .writer_pump = mh__s3_writer_pump,
    .reader_open = mh__s3_reader_open,
    .reader_next = mh__s3_reader_next,
    .reader_close = mh__s3_reader_close,
    .list = mh__s3_list,
    .sweep_tmp = mh__s3_sweep_tmp,
};
