/*
 * test_s3.c — unit tests of the s3 object store backend (src/store/s3.c).
 *
 * Part 1 (always): configuration errors, presigned URL shapes, the fs-only
 * functions refusing an s3 store, and the transfer machinery against a
 * scripted HTTP server running on the same libuv loop: signed headers on
 * the wire, ranged reads, a 200 answer to a ranged GET, retries with
 * backoff on 503/500/429/connection loss/a stalled answer, no retry on
 * 4xx, 404 -> MH_ENOENT, CopyObject's "200 with an <Error>", the window
 * of 16 transfers in flight, callbacks never re-entrant, close with
 * operations in flight.
 *
 * Part 2 (when MUSEHUB_TEST_S3_ENDPOINT is set, e.g. by a runner that
 * started scripts/s3emu.js; bucket MUSEHUB_TEST_S3_BUCKET, default
 * "musehub-test"; credentials S3RVER/S3RVER unless MUSEHUB_TEST_S3_ACCESS_KEY
 * / _SECRET_KEY are set): the real thing against an S3 emulator that
 * verifies SigV4 — put/get/ranged get/get_ranges/head/move/delete,
 * presigned GET and PUT used by a plain HTTP client (libcurl easy), a
 * tampered, a wrong-length and an expired presigned URL refused (403),
 * bad credentials refused without retries.
 */
#include <curl/curl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "../../src/store/store_int.h"
#include "mh/store.h"
#include "storetest.h"
#include "tap.h"


/* ------------------------------------------------------------- helpers */


/* Closes a store and runs the loop until its handles are gone. */
static void close_store(mh_store_t *s)
{
    mh_store_close(s);
    uv_run(loop, UV_RUN_NOWAIT);
    uv_run(loop, UV_RUN_NOWAIT);
}

static mh_store_t *open_s3(const char *endpoint, const char *bucket, bool path_style, const char *ak,
                           const char *sk, int *err)
{
    char spec[128];
    snprintf(spec, sizeof spec, "s3:%s", bucket);
    mh_store_config_t cfg = {.spec = spec,
                             .s3_endpoint = endpoint,
                             .s3_region = "us-east-1",
                             .s3_access_key = ak,
                             .s3_secret_key = sk,
                             .s3_path_style = path_style};
    mh_store_t *s = NULL;
    int rc = mh_store_open(loop, &cfg, &s);
    if (err) *err = rc;
    return s;
}

static void pack_key(char out[72], const void *data, size_t n)
{
    uint8_t d[32];
    char hex[65];
    mh_sha256(data, n, d);
    mh_hex_encode(hex, d, 32);
    snprintf(out, 72, "mpacks/%s", hex);
}

/* -------------------------------------------- part 1: configuration */

static void test_config(void)
{
    int err;
    mh_store_t *s = open_s3("http://127.0.0.1:9", "bucket", true, NULL, "x", &err);
    TAP_OK(!s && err == MH_EINVAL, "open: missing access key refused");
    s = open_s3("ftp://127.0.0.1:9", "bucket", true, "a", "b", &err);
    TAP_OK(!s && err == MH_EINVAL, "open: non-http endpoint refused");
    s = open_s3("http://127.0.0.1:9/prefix", "bucket", true, "a", "b", &err);
    TAP_OK(!s && err == MH_EINVAL, "open: endpoint with a path refused");
    s = open_s3("http://127.0.0.1:9", "b", true, "a", "b", &err);
    TAP_OK(!s && err == MH_EINVAL, "open: too short bucket name refused");
    s = open_s3("http://127.0.0.1:9", "Bad_Bucket", false, "a", "b", &err);
    TAP_OK(!s && err == MH_EINVAL, "open: non-DNS bucket refused for virtual-hosted");
    s = open_s3("http://127.0.0.1:9", "s3:", true, "a", "b", &err);
    TAP_OK(!s && err == MH_EINVAL, "open: bucket with ':' refused");
    mh_store_config_t none = {.spec = "s3:"};
    TAP_EQ_INT(mh_store_open(loop, &none, &s), MH_EINVAL, "open: empty bucket refused");

    s = open_s3("http://127.0.0.1:9000/", "musehub", true, "AK", "SK", &err);
    TAP_OK(s && err == 0, "open: path-style store");
    if (!s) return;
    TAP_EQ_STR(mh_store_kind(s), "s3", "kind is s3");

    /* fs-only functions refuse an s3 store. */
    uint64_t size;
    uint8_t sha[32] = {0};
    int fd;
    mh_store_writer_t *u = NULL;
    TAP_EQ_INT(mh_store_fs_check_url(s, "GET", MH_STR("mpacks/x"), MH_STR("a=b"), &size, sha), MH_EINVAL,
               "fs check_url refuses s3");
    TAP_EQ_INT(mh_store_fs_upload_open(s, "incoming/x", 1, sha, &u), MH_EINVAL, "fs upload_open refuses s3");
    TAP_EQ_INT(mh_store_fs_open_read(s, "incoming/x", &fd, &size), MH_EINVAL, "fs open_read refuses s3");

    /* Presigned URLs. */
    mh_arena_t a;
    mh_arena_init(&a, 0);
    char *url = NULL;
    char key[72];
    pack_key(key, "x", 1);
    TAP_EQ_INT(mh_store_presign(s, &a, "GET", key, 0, NULL, 600, &url), 0, "presign GET");
    char want[160];
    snprintf(want, sizeof want, "http://127.0.0.1:9000/musehub/%s?X-Amz-Algorithm=AWS4-HMAC-SHA256&", key);
    TAP_OK(url && strncmp(url, want, strlen(want)) == 0, "presign GET: path-style URL");
    TAP_OK(url && strstr(url, "&X-Amz-Expires=600&") && strstr(url, "X-Amz-SignedHeaders=host&") &&
               strstr(url, "X-Amz-Credential=AK%2F") && strstr(url, "%2Fus-east-1%2Fs3%2Faws4_request&"),
           "presign GET: expiry, credential scope, signed headers");
    TAP_OK(url && strlen(strstr(url, "X-Amz-Signature=")) == 16 + 64, "presign GET: signature last, 64 hex");
    TAP_EQ_INT(mh_store_presign(s, &a, "PUT", "incoming/up_1", 1234, sha, 604800 * 2, &url), 0,
               "presign PUT");
    TAP_OK(url && strstr(url, "/musehub/incoming/up_1?") && strstr(url, "X-Amz-SignedHeaders=content-length%3Bhost") &&
               strstr(url, "X-Amz-Expires=604800&"),
           "presign PUT: content-length signed, ttl clamped to 7 days");
    TAP_EQ_INT(mh_store_presign(s, &a, "PUT", "incoming/up_1", 1234, NULL, 60, &url), MH_EINVAL,
               "presign PUT without sha256 refused");
    TAP_EQ_INT(mh_store_presign(s, &a, "GET", "../etc/passwd", 0, NULL, 60, &url), MH_EINVAL,
               "presign of a bad key refused");
    close_store(s);

    s = open_s3("HTTP://Example.COM:80", "musehub", true, "AK", "SK", &err);
    TAP_OK(!s, "open: scheme is case-sensitive (HTTP:// refused)");
    if (s) close_store(s);
    s = open_s3("http://Example.COM:80", "musehub", false, "AK", "SK", &err);
    TAP_OK(s != NULL, "open: virtual-hosted store");
    if (s) {
        TAP_EQ_INT(mh_store_presign(s, &a, "GET", key, 0, NULL, 60, &url), 0, "virtual-hosted presign");
        snprintf(want, sizeof want, "http://musehub.example.com/%s?", key);
        TAP_OK(url && strncmp(url, want, strlen(want)) == 0,
               "virtual-hosted URL: bucket in the host, default port dropped, host lowercased");
        close_store(s);
    }
    s = open_s3(NULL, "musehub", false, "AK", "SK", &err);
    TAP_OK(s != NULL, "open: no endpoint means AWS");
    if (s) {
        mh_store_presign(s, &a, "GET", key, 0, NULL, 60, &url);
        TAP_OK(url && strncmp(url, "https://musehub.s3.us-east-1.amazonaws.com/mpacks/", 50) == 0,
               "AWS regional endpoint by default");
        close_store(s);
    }
    mh_arena_release(&a);
}

/* ------------------------------------------- part 1: a scripted server */

enum { ACT_RESPOND = 0, ACT_CLOSE, ACT_STALL, ACT_DELAY };

typedef struct {
    int status;
    const char *body; /* NULL: empty */
    int act;
    const char *headers; /* extra header lines, each ending in \r\n */
} fresp_t;

#define MAX_SCRIPT 64
#define MAX_LOG 256

static struct {
    uv_tcp_t listener;
    int port;
    fresp_t script[MAX_SCRIPT];
    int nscript, next;
    fresp_t dflt;
    int requests, conns;
    char log[MAX_LOG][512]; /* request heads, truncated */
    int waiting, waiting_max; /* requests received, not yet answered */
    const char *obj;          /* served when the script is used up (NULL: dflt) */
    char postbody[8192];      /* body of the last POST (truncated) */
    size_t body_bytes;        /* request body bytes received in all */
    size_t objlen;
} fk;

typedef struct {
    uv_tcp_t tcp;
    mh_buf_t in;
    bool closing;
    int open; /* handles still to close */
    uv_timer_t delay;
    bool delay_init;
    char *pending_out;
    size_t pending_n;
} fconn_t;

static void script(int status, const char *body, int act)
{
    fk.script[fk.nscript++] = (fresp_t){status, body, act, NULL};
}

static void script_h(int status, const char *body, const char *headers)
{
    fk.script[fk.nscript++] = (fresp_t){status, body, ACT_RESPOND, headers};
}

static void script_reset(void)
{
    fk.nscript = fk.next = fk.requests = fk.waiting = fk.waiting_max = 0;
    fk.dflt = (fresp_t){200, NULL, ACT_RESPOND, NULL};
    fk.obj = NULL;
}

/* Both handles of a connection (tcp, delay timer) must be closed before
 * it is freed: the last close callback frees it. */
static void fconn_closed(uv_handle_t *h)
{
    fconn_t *c = h->data;
    if (--c->open > 0) return;
    mh_buf_free(&c->in);
    free(c->pending_out);
    free(c);
}

static void fconn_close(fconn_t *c)
{
    if (c->closing) return;
    c->closing = true;
    c->open = c->delay_init ? 2 : 1;
    uv_close((uv_handle_t *)&c->tcp, fconn_closed);
    if (c->delay_init) uv_close((uv_handle_t *)&c->delay, fconn_closed);
}

static void fwrite_cb(uv_write_t *w, int status)
{
    (void)status;
    free(w);
}

static void fsend(fconn_t *c, const char *p, size_t n)
{
    uv_write_t *w = malloc(sizeof *w + n);
    memcpy((char *)(w + 1), p, n);
    uv_buf_t b = uv_buf_init((char *)(w + 1), (unsigned)n);
    uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, fwrite_cb);
}

static void fdelay_cb(uv_timer_t *t)
{
    fconn_t *c = t->data;
    fk.waiting--;
    fsend(c, c->pending_out, c->pending_n);
}

/* The response to a request: from the script, or (script used up and
 * fk.obj set) the object itself, honouring a Range header. */
static fresp_t next_response(fconn_t *c, size_t hl, char **own_body)
{
    *own_body = NULL;
    if (fk.next < fk.nscript) return fk.script[fk.next++];
    if (!fk.obj) return fk.dflt;
    char *rg = memmem(c->in.p, hl, "range: bytes=", 13);
    if (!rg) return (fresp_t){200, fk.obj, ACT_RESPOND, NULL};
    unsigned long a = strtoul(rg + 13, &rg, 10), e = strtoul(rg + 1, NULL, 10);
    if (a >= fk.objlen) return (fresp_t){416, NULL, ACT_RESPOND, NULL};
    if (e >= fk.objlen) e = fk.objlen - 1;
    *own_body = strndup(fk.obj + a, e - a + 1);
    return (fresp_t){206, *own_body, ACT_RESPOND, NULL};
}

/* Answers one complete request of head length hl (body already in). */
static void fanswer(fconn_t *c, size_t hl)
{
    char *own = NULL;
    fresp_t r = next_response(c, hl, &own);
    int i = fk.requests++;
    if (i < MAX_LOG) snprintf(fk.log[i], sizeof fk.log[i], "%.*s", (int)(hl < 511 ? hl : 511), (char *)c->in.p);
    bool head = strncmp((char *)c->in.p, "HEAD ", 5) == 0;
    if (r.act == ACT_CLOSE) {
        fconn_close(c);
        return;
    }
    fk.waiting++;
    if (fk.waiting > fk.waiting_max) fk.waiting_max = fk.waiting;
    if (r.act == ACT_STALL) return;
    size_t bl = r.body ? strlen(r.body) : 0;
    free(c->pending_out);
    c->pending_out = malloc(bl + 256);
    int n = snprintf(c->pending_out, bl + 256, "HTTP/1.1 %d X\r\nContent-Length: %zu\r\n%s\r\n%s", r.status, bl,
                     r.headers ? r.headers : "", head || !r.body ? "" : r.body);
    c->pending_n = (size_t)n;
    free(own);
    if (r.act == ACT_DELAY) {
        if (!c->delay_init) {
            uv_timer_init(loop, &c->delay);
            c->delay.data = c;
            c->delay_init = true;
        }
        uv_timer_start(&c->delay, fdelay_cb, 30, 0);
        return;
    }
    fk.waiting--;
    fsend(c, c->pending_out, c->pending_n);
}

static void falloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    (void)h;
    b->base = malloc(sz);
    b->len = sz;
}

static void fread_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *b)
{
    fconn_t *c = st->data;
    if (nread < 0) {
        free(b->base);
        fconn_close(c);
        return;
    }
    mh_buf_append(&c->in, b->base, (size_t)nread);
    free(b->base);
    for (;;) {
        uint8_t *e = c->in.len ? memmem(c->in.p, c->in.len, "\r\n\r\n", 4) : NULL;
        if (!e) return;
        size_t hl = (size_t)(e - c->in.p) + 4, bl = 0;
        char *cl = memmem(c->in.p, hl, "content-length:", 15);
        if (!cl) cl = memmem(c->in.p, hl, "Content-Length:", 15);
        if (cl) bl = strtoul(cl + 15, NULL, 10);
        if (c->in.len < hl + bl) return;
        if (memcmp(c->in.p, "POST ", 5) == 0) {
            size_t keep = bl < sizeof fk.postbody - 1 ? bl : sizeof fk.postbody - 1;
            memcpy(fk.postbody, c->in.p + hl, keep);
            fk.postbody[keep] = 0;
        }
        fk.body_bytes += bl;
        fanswer(c, hl);
        if (c->closing) return;
        memmove(c->in.p, c->in.p + hl + bl, c->in.len - hl - bl);
        c->in.len -= hl + bl;
    }
}

static void fconnect_cb(uv_stream_t *srv, int status)
{
    if (status < 0) return;
    fconn_t *c = calloc(1, sizeof *c);
    fk.conns++;
    uv_tcp_init(loop, &c->tcp);
    c->tcp.data = c;
    if (uv_accept(srv, (uv_stream_t *)&c->tcp) != 0) {
        fconn_close(c);
        return;
    }
    uv_read_start((uv_stream_t *)&c->tcp, falloc, fread_cb);
}

static void fake_start(void)
{
    struct sockaddr_in sa;
    uv_ip4_addr("127.0.0.1", 0, &sa);
    uv_tcp_init(loop, &fk.listener);
    uv_tcp_bind(&fk.listener, (const struct sockaddr *)&sa, 0);
    uv_listen((uv_stream_t *)&fk.listener, 128, fconnect_cb);
    struct sockaddr_storage ss;
    int len = sizeof ss;
    uv_tcp_getsockname(&fk.listener, (struct sockaddr *)&ss, &len);
    fk.port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static bool logged(int i, const char *needle)
{
    return i < fk.requests && i < MAX_LOG && strstr(fk.log[i], needle) != NULL;
}

/* The streams on the wire: the multipart writer's request sequence, the
 * small-object PUT, "exists" dropping the upload, a full store (507 and
 * quota codes -> MH_ENOSPC, not retried, upload aborted), the reader's
 * HEAD + ranged GETs, a listing and the tmp sweep. */
static void test_fake_streams(const char *ep)
{
    int err;
    mh_store_t *s = open_s3(ep, "bkt", true, "AKID", "SECRET", &err);
    mh_store_s3_tune(s, 500, 1, 5);
    size_t n = 11u * 1024 * 1024;
    uint8_t *data = malloc(n);
    for (size_t i = 0; i < n; i++) data[i] = (uint8_t)(i * 31 + (i >> 13));
    char key[72];
    pack_key(key, data, n);
    wres_t f;
    char line[256];

    TAP_EQ_INT(mh_store_writer_mem(s, NULL), 16u * 1024 * 1024, "s3 writer holds two 8 MiB parts");
    mh_store_writer_opts_t small = {.chunk_bytes = 1024};
    TAP_EQ_INT(mh_store_writer_mem(s, &small), 10u * 1024 * 1024, "parts below 5 MiB are raised to 5 MiB");

    /* 11 MiB in 5 MiB parts: create, 2 parts, last part, HEAD, complete, copy, delete. */
    script_reset();
    script(200, "<InitiateMultipartUploadResult><Bucket>bkt</Bucket><Key>x</Key>"
                "<UploadId>up&amp;1</UploadId></InitiateMultipartUploadResult>", ACT_RESPOND);
    script_h(200, NULL, "ETag: \"e1\"\r\n");
    script_h(200, NULL, "ETag: \"e2\"\r\n");
    script_h(200, NULL, "ETag: \"e3\"\r\n");
    script(404, NULL, ACT_RESPOND);
    script(200, "<CompleteMultipartUploadResult><ETag>x</ETag></CompleteMultipartUploadResult>", ACT_RESPOND);
    script(200, "<CopyObjectResult><ETag>x</ETag></CopyObjectResult>", ACT_RESPOND);
    script(204, NULL, ACT_RESPOND);
    fk.body_bytes = 0;
    TAP_EQ_INT(stream_object(s, true, 5u * 1024 * 1024, data, n, 1024 * 1024, NULL, &f), 0, "multipart writer");
    uint8_t sha[32];
    mh_sha256(data, n, sha);
    TAP_OK(f.has_sha && memcmp(f.sha, sha, 32) == 0 && f.size == n, "multipart writer: hash and size");
    TAP_EQ_INT(fk.requests, 8, "eight requests");
    TAP_OK(logged(0, "POST /bkt/tmp/") && logged(0, "?uploads= HTTP/1.1"), "CreateMultipartUpload on tmp/<random>");
    TAP_OK(logged(1, "PUT /bkt/tmp/") && logged(1, "?partNumber=1&uploadId=up%261 HTTP/1.1") &&
               logged(1, "Content-Length: 5242880"),
           "UploadPart 1: 5 MiB, upload id from the XML (entity decoded, re-encoded)");
    TAP_OK(logged(2, "?partNumber=2&uploadId=up%261") && logged(3, "?partNumber=3&") &&
               logged(3, "Content-Length: 1048576"),
           "UploadPart 2 and the short last part");
    char *hexp = NULL;
    char hex[65];
    mh_hex_encode(hex, sha, 32);
    snprintf(line, sizeof line, "HEAD /bkt/mpacks/%s ", hex);
    TAP_OK(logged(4, line), "HEAD of the final key named by the hash");
    TAP_OK(logged(5, "POST /bkt/tmp/") && logged(5, "?uploadId=up%261 HTTP/1.1"), "CompleteMultipartUpload");
    snprintf(line, sizeof line, "PUT /bkt/mpacks/%s ", hex);
    TAP_OK(logged(6, line) && logged(6, "x-amz-copy-source: /bkt/tmp/"), "CopyObject tmp -> final");
    TAP_OK(logged(7, "DELETE /bkt/tmp/") && !logged(7, "uploadId"), "DeleteObject tmp");
    TAP_OK(fk.body_bytes >= n, "every byte went up (%zu)", fk.body_bytes);
    (void)hexp;

    /* The Complete body lists the parts in order with their ETags. */
    script_reset();
    script(200, "<InitiateMultipartUploadResult><UploadId>U</UploadId></InitiateMultipartUploadResult>",
           ACT_RESPOND);
    script_h(200, NULL, "ETag: \"p1\"\r\n");
    script_h(200, NULL, "ETag: \"p2\"\r\n");
    script(404, NULL, ACT_RESPOND);
    script(500, "<Error><Code>InternalError</Code></Error>", ACT_RESPOND); /* complete: retried */
    script(200, "<CompleteMultipartUploadResult/>", ACT_RESPOND);
    script(200, "<CopyObjectResult/>", ACT_RESPOND);
    script(204, NULL, ACT_RESPOND);
    mh_store_writer_opts_t o5 = {.hash = false, .chunk_bytes = 5u * 1024 * 1024};
    mh_store_writer_t *w = NULL;
    mh_store_writer_open(s, &o5, &w);
    write_all(w, data, 6u * 1024 * 1024, 1024 * 1024);
    TAP_EQ_INT(finish_writer(w, key, &f), 0, "caller-keyed multipart writer (complete retried once)");
    TAP_OK(!f.has_sha, "no hash reported");
    TAP_EQ_INT(fk.requests, 8, "eight requests");
    snprintf(line, sizeof line, "HEAD /bkt/%s ", key);
    TAP_OK(logged(3, line), "HEAD of the caller's key");
    TAP_OK(logged(4, "POST ") && logged(5, "POST "), "complete retried after a 500");
    TAP_EQ_STR(fk.postbody,
               "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"p1\"</ETag></Part>"
               "<Part><PartNumber>2</PartNumber><ETag>\"p2\"</ETag></Part></CompleteMultipartUpload>",
               "the Complete body lists the parts in order with their ETags");

    /* The final key exists: the upload is dropped, nothing copied. */
    script_reset();
    script(200, "<InitiateMultipartUploadResult><UploadId>U</UploadId></InitiateMultipartUploadResult>",
           ACT_RESPOND);
    script_h(200, NULL, "ETag: \"p1\"\r\n");
    script_h(200, NULL, "ETag: \"p2\"\r\n");
    script(200, NULL, ACT_RESPOND);  /* HEAD: exists */
    script(204, NULL, ACT_RESPOND);  /* AbortMultipartUpload */
    mh_store_writer_open(s, &o5, &w);
    write_all(w, data, 6u * 1024 * 1024, 1024 * 1024);
    TAP_EQ_INT(finish_writer(w, key, &f), 0, "existing final key: success");
    TAP_OK(fk.requests == 5 && logged(4, "DELETE /bkt/tmp/") && logged(4, "?uploadId=U "),
           "existing final key: AbortMultipartUpload, no copy");

    /* One chunk or less: a single PUT to the final key. */
    script_reset();
    script(200, NULL, ACT_RESPOND);
    TAP_EQ_INT(stream_object(s, true, 0, data, 1000, 300, NULL, &f), 0, "small object");
    uint8_t sha1k[32];
    mh_sha256(data, 1000, sha1k);
    mh_hex_encode(hex, sha1k, 32);
    snprintf(line, sizeof line, "PUT /bkt/mpacks/%s ", hex);
    TAP_OK(fk.requests == 1 && logged(0, line) && logged(0, "Content-Length: 1000"), "one PUT to mpacks/<hash>");
    snprintf(line, sizeof line, "x-amz-content-sha256: %s", hex);
    TAP_OK(logged(0, line), "the PUT signs the object's hash");

    /* A full store: 507 is MH_ENOSPC at once (no retries). */
    script_reset();
    script(507, "<Error><Code>XMinioStorageFull</Code><Message>Storage backend has reached its minimum free "
                "drive threshold.</Message></Error>",
           ACT_RESPOND);
    TAP_EQ_INT(stream_object(s, true, 0, data, 1000, 1000, NULL, &f), MH_ENOSPC, "507 -> MH_ENOSPC");
    TAP_EQ_INT(fk.requests, 1, "507 not retried");
    script_reset();
    script(403, "<Error><Code>QuotaExceeded</Code></Error>", ACT_RESPOND);
    TAP_EQ_INT(do_put(s, key, "abc", 3), MH_ENOSPC, "a quota code -> MH_ENOSPC (put)");
    /* Full during a part: the multipart upload is aborted, nothing kept. */
    script_reset();
    script(200, "<InitiateMultipartUploadResult><UploadId>U</UploadId></InitiateMultipartUploadResult>",
           ACT_RESPOND);
    script(507, "<Error><Code>XMinioStorageFull</Code></Error>", ACT_RESPOND);
    script(204, NULL, ACT_RESPOND); /* AbortMultipartUpload */
    mh_store_writer_open(s, &o5, &w);
    int wrc = write_all(w, data, 6u * 1024 * 1024, 6u * 1024 * 1024);
    int frc = finish_writer(w, key, &f);
    TAP_OK(wrc == MH_ENOSPC || frc == MH_ENOSPC, "507 on a part -> MH_ENOSPC (write %d, finish %d)", wrc, frc);
    TAP_OK(fk.requests == 3 && logged(2, "DELETE /bkt/tmp/") && logged(2, "uploadId=U"), "and the upload is aborted");

    /* Abort mid-stream: AbortMultipartUpload; no callback. */
    script_reset();
    script(200, "<InitiateMultipartUploadResult><UploadId>U</UploadId></InitiateMultipartUploadResult>",
           ACT_RESPOND);
    script_h(200, NULL, "ETag: \"p1\"\r\n");
    script(204, NULL, ACT_RESPOND);
    mh_store_writer_open(s, &o5, &w);
    res_t r = {0};
    mh_store_writer_write(w, data, 5u * 1024 * 1024 + 10, done_cb, &r);
    while (fk.requests < 2) uv_run(loop, UV_RUN_ONCE);
    mh_store_writer_abort(w);
    for (int i = 0; i < 200 && fk.requests < 3; i++) uv_run(loop, UV_RUN_ONCE);
    uv_run(loop, UV_RUN_NOWAIT);
    TAP_OK(fk.requests == 3 && logged(2, "DELETE /bkt/tmp/") && logged(2, "uploadId=U"), "abort: upload aborted");
    TAP_OK(r.done <= 1, "abort: at most the room callback that was due before");

    /* Reader: HEAD, then one ranged GET per window. */
    static char obj[300001];
    for (size_t i = 0; i < sizeof obj - 1; i++) obj[i] = (char)('a' + i % 23);
    script_reset();
    fk.obj = obj;
    fk.objlen = sizeof obj - 1;
    rdrive_t d = {0};
    TAP_EQ_INT(read_seq(s, key, 0, UINT64_MAX, 64 * 1024, &d), 0, "reader over the fake");
    TAP_OK(d.all.len == fk.objlen && memcmp(d.all.p, obj, fk.objlen) == 0, "reader: every byte");
    TAP_OK(d.windows == 5 && logged(0, "HEAD ") && logged(1, "range: bytes=0-65535\r\n") &&
               logged(5, "range: bytes=262144-299999\r\n"),
           "reader: HEAD then 5 ranged GETs of 64 KiB");
    rdrive_free(&d);
    script_reset();
    fk.obj = obj;
    fk.objlen = sizeof obj - 1;
    mh_range_t rg[] = {{10, 5}, {100, 10}, {200000, 7}, {5, 1}};
    TAP_EQ_INT(read_ranges(s, key, rg, 4, 0, &d), 0, "ranged reader over the fake");
    TAP_OK(ranges_match(&d, (const uint8_t *)obj, rg, 4), "ranged reader: the bytes");
    TAP_OK(fk.requests == 4 && logged(1, "range: bytes=10-109\r\n") && logged(2, "range: bytes=200000-200006\r\n") &&
               logged(3, "range: bytes=5-5\r\n"),
           "ranged reader: HEAD + 3 GETs (coalesced, then a new run)");
    rdrive_free(&d);
    script_reset();
    script(404, NULL, ACT_RESPOND);
    TAP_EQ_INT(read_seq(s, key, 0, UINT64_MAX, 0, &d), MH_ENOENT, "reader of an absent key: ENOENT");
    rdrive_free(&d);
    fk.obj = NULL;

    /* Listing. */
    static lres_t l;
    script_reset();
    script(200,
           "<ListBucketResult><IsTruncated>true</IsTruncated>"
           "<Contents><Key>incoming/a1</Key><LastModified>2026-01-02T03:04:05.000Z</LastModified>"
           "<Size>12</Size></Contents>"
           "<Contents><Key>incoming/bad.name</Key><Size>1</Size></Contents>"
           "<Contents><Key>incoming/b2</Key><LastModified>2026-01-02T03:04:06.000Z</LastModified>"
           "<Size>0</Size></Contents></ListBucketResult>",
           ACT_RESPOND);
    TAP_EQ_INT(do_list(s, "incoming/", "incoming/a0", &l), 0, "list");
    TAP_OK(logged(0, "GET /bkt?") && logged(0, "list-type=2") && logged(0, "prefix=incoming%2F") &&
               logged(0, "start-after=incoming%2Fa0") && logged(0, "max-keys=1000"),
           "ListObjectsV2 with start-after");
    TAP_OK(l.n == 2 && !strcmp(l.keys[0], "incoming/a1") && l.sizes[0] == 12 && l.mtimes[0] == 1767323045 &&
               !strcmp(l.keys[1], "incoming/b2"),
           "valid keys, sizes and times");
    TAP_OK(l.has_next && !strcmp(l.next, "incoming/b2"), "next = the last key");

    /* Sweep: old tmp objects deleted, young and foreign ones kept; old
     * incomplete uploads aborted. */
    script_reset();
    script(200,
           "<ListBucketResult><IsTruncated>false</IsTruncated>"
           "<Contents><Key>tmp/0123456789abcdef0123456789abcdef</Key>"
           "<LastModified>2020-01-01T00:00:00Z</LastModified><Size>5</Size></Contents>"
           "<Contents><Key>tmp/fedcba9876543210fedcba9876543210</Key>"
           "<LastModified>2099-01-01T00:00:00Z</LastModified><Size>5</Size></Contents>"
           "<Contents><Key>tmp/not-ours</Key><LastModified>2020-01-01T00:00:00Z</LastModified></Contents>"
           "</ListBucketResult>",
           ACT_RESPOND);
    script(204, NULL, ACT_RESPOND);
    script(200,
           "<ListMultipartUploadsResult><Upload><Key>tmp/00000000000000000000000000000000</Key>"
           "<UploadId>old-1</UploadId><Initiated>2020-01-01T00:00:00.000Z</Initiated></Upload>"
           "<Upload><Key>tmp/11111111111111111111111111111111</Key><UploadId>new-1</UploadId>"
           "<Initiated>2099-01-01T00:00:00.000Z</Initiated></Upload></ListMultipartUploadsResult>",
           ACT_RESPOND);
    script(204, NULL, ACT_RESPOND);
    unsigned removed = 0;
    TAP_EQ_INT(do_sweep_tmp(s, 3600, &removed), 0, "sweep");
    TAP_EQ_INT(removed, 2, "one object and one upload removed");
    TAP_OK(logged(1, "DELETE /bkt/tmp/0123456789abcdef0123456789abcdef ") && logged(2, "GET /bkt?") &&
               logged(2, "uploads=") && logged(3, "DELETE /bkt/tmp/00000000000000000000000000000000?uploadId=old-1 ") &&
               fk.requests == 4,
           "sweep: the requests");
    script_reset();
    script(200, "<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>", ACT_RESPOND);
    script(501, "<Error><Code>NotImplemented</Code></Error>", ACT_RESPOND);
    TAP_EQ_INT(do_sweep_tmp(s, 3600, &removed), 0, "sweep on a store that cannot list uploads");
    TAP_OK(removed == 0 && fk.requests == 2, "501 not retried; nothing removed");
    close_store(s);
    free(data);
}

static void test_fake(void)
{
    fake_start();
    char ep[64];
    snprintf(ep, sizeof ep, "http://127.0.0.1:%d", fk.port);
    int err;
    mh_store_t *s = open_s3(ep, "bkt", true, "AKID", "SECRET", &err);
    TAP_OK(s != NULL, "fake: store opened");
    if (!s) return;
    mh_store_s3_tune(s, 500, 1, 5); /* fast backoff: 5, 20, 80 ms */
    char key[72];
    pack_key(key, "fake", 4);
    mh_buf_t b = {0};

    /* A plain GET and what goes on the wire. */
    script_reset();
    script(200, "hello world", ACT_RESPOND);
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), 0, "fake: GET ok");
    TAP_OK(b.len == 11 && memcmp(b.p, "hello world", 11) == 0, "fake: GET body");
    mh_buf_free(&b);
    char line[128];
    snprintf(line, sizeof line, "GET /bkt/%s HTTP/1.1\r\n", key);
    TAP_OK(logged(0, line), "fake: path-style request line");
    snprintf(line, sizeof line, "Host: 127.0.0.1:%d\r\n", fk.port);
    TAP_OK(logged(0, line), "fake: Host sent as signed");
    if (!logged(0, line)) TAP_COMMENT("request: %s", fk.log[0]);
    TAP_OK(logged(0, "authorization: AWS4-HMAC-SHA256 Credential=AKID/") &&
               logged(0, "SignedHeaders=host;x-amz-content-sha256;x-amz-date,Signature="),
           "fake: Authorization header");
    TAP_OK(logged(0, "x-amz-content-sha256: e3b0c442"), "fake: empty payload hash");
    TAP_OK(!logged(0, "range:"), "fake: no Range for a whole object");

    /* Ranged GET. */
    script_reset();
    script(206, "llo", ACT_RESPOND);
    TAP_EQ_INT(do_get(s, key, 2, 3, &b), 0, "fake: ranged GET ok");
    TAP_OK(b.len == 3 && memcmp(b.p, "llo", 3) == 0, "fake: ranged GET body");
    mh_buf_free(&b);
    TAP_OK(logged(0, "range: bytes=2-4\r\n") && logged(0, "SignedHeaders=host;range;"), "fake: Range signed and sent");
    script_reset();
    script(206, "ll", ACT_RESPOND);
    TAP_EQ_INT(do_get(s, key, 2, 3, NULL), MH_EINVAL, "fake: short 206 (range past the end) is MH_EINVAL");
    script_reset();
    script(206, "llo wo", ACT_RESPOND);
    TAP_EQ_INT(do_get(s, key, 2, 3, NULL), MH_ESTORE, "fake: 206 longer than asked is MH_ESTORE");
    script_reset();
    script(200, "hello world", ACT_RESPOND);
    TAP_EQ_INT(do_get(s, key, 6, 5, &b), 0, "fake: 200 to a ranged GET is sliced");
    TAP_OK(b.len == 5 && memcmp(b.p, "world", 5) == 0, "fake: sliced bytes");
    mh_buf_free(&b);
    script_reset();
    script(206, "world", ACT_RESPOND);
    TAP_EQ_INT(do_get(s, key, 6, UINT64_MAX, &b), 0, "fake: open-ended range");
    TAP_OK(logged(0, "range: bytes=6-\r\n") && b.len == 5, "fake: open-ended Range header");
    mh_buf_free(&b);
    script_reset();
    script(416, "<Error><Code>InvalidRange</Code></Error>", ACT_RESPOND);
    fk.dflt = (fresp_t){200, "hello world", ACT_RESPOND, NULL}; /* the HEAD: size 11 */
    TAP_EQ_INT(do_get(s, key, 11, UINT64_MAX, &b), 0, "fake: empty tail (416 then HEAD) is an empty read");
    TAP_OK(b.len == 0 && logged(1, "HEAD "), "fake: empty tail read checked the size");
    mh_buf_free(&b);
    script_reset();
    script(416, "<Error><Code>InvalidRange</Code></Error>", ACT_RESPOND);
    fk.dflt = (fresp_t){200, "hello world", ACT_RESPOND, NULL};
    TAP_EQ_INT(do_get(s, key, 12, UINT64_MAX, NULL), MH_EINVAL, "fake: offset past the end is MH_EINVAL");
    script_reset();
    fk.dflt = (fresp_t){200, "hello world", ACT_RESPOND, NULL};
    TAP_EQ_INT(do_get(s, key, 3, 0, &b), 0, "fake: zero-length read is a HEAD");
    TAP_OK(b.len == 0 && fk.requests == 1 && logged(0, "HEAD "), "fake: one HEAD, no GET");
    mh_buf_free(&b);

    /* Retries. */
    script_reset();
    script(503, "<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>", ACT_RESPOND);
    script(500, "<Error><Code>InternalError</Code></Error>", ACT_RESPOND);
    script(200, "ok", ACT_RESPOND);
    uint64_t t0 = uv_now(loop);
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), 0, "fake: 503 and 500 retried, then ok");
    TAP_OK(fk.requests == 3 && b.len == 2, "fake: three attempts");
    TAP_OK(uv_now(loop) - t0 >= 25, "fake: backoff waited (5 + 20 ms)");
    mh_buf_free(&b);
    script_reset();
    for (int i = 0; i < 5; i++) script(500, NULL, ACT_RESPOND);
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, NULL), MH_ESTORE, "fake: 500 four times is MH_ESTORE");
    TAP_EQ_INT(fk.requests, 4, "fake: exactly four attempts");
    script_reset();
    script(429, NULL, ACT_RESPOND);
    TAP_EQ_INT(do_put(s, key, "abc", 3), 0, "fake: 429 retried");
    TAP_EQ_INT(fk.requests, 2, "fake: 429 then ok");
    TAP_OK(logged(1, "PUT ") && logged(1, "x-amz-content-sha256: ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
           "fake: PUT signs the payload hash");
    TAP_OK(!logged(1, "Expect:") && !logged(1, "expect:"), "fake: no Expect: 100-continue");
    script_reset();
    script(403, "<Error><Code>SignatureDoesNotMatch</Code></Error>", ACT_RESPOND);
    TAP_EQ_INT(do_put(s, key, "abc", 3), MH_ESTORE, "fake: 403 is MH_ESTORE");
    TAP_EQ_INT(fk.requests, 1, "fake: 403 not retried");
    script_reset();
    script(400, NULL, ACT_RESPOND);
    TAP_EQ_INT(do_delete(s, key), MH_ESTORE, "fake: 400 is MH_ESTORE, not retried");
    TAP_EQ_INT(fk.requests, 1, "fake: one attempt for a 400");
    script_reset();
    script(404, "<Error><Code>NoSuchKey</Code></Error>", ACT_RESPOND);
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, NULL), MH_ENOENT, "fake: 404 NoSuchKey is MH_ENOENT");
    TAP_EQ_INT(fk.requests, 1, "fake: 404 not retried");
    script_reset();
    script(404, "<Error><Code>NoSuchBucket</Code></Error>", ACT_RESPOND);
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, NULL), MH_ESTORE, "fake: NoSuchBucket is MH_ESTORE");
    script_reset();
    script(404, NULL, ACT_RESPOND);
    TAP_EQ_INT(do_delete(s, key), 0, "fake: deleting an absent key succeeds");
    script_reset();
    script(0, NULL, ACT_CLOSE);
    script(200, "back", ACT_RESPOND);
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), 0, "fake: connection closed without answer is retried");
    TAP_OK(b.len == 4, "fake: answer of the retry");
    mh_buf_free(&b);
    script_reset();
    script(0, NULL, ACT_STALL);
    script(200, "late", ACT_RESPOND);
    t0 = uv_now(loop);
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), 0, "fake: stalled answer aborted by the low-speed limit, retried");
    TAP_OK(uv_now(loop) - t0 >= 900 && b.len == 4, "fake: the stall cost about the low-speed window");
    mh_buf_free(&b);

    /* Sequential requests reuse one kept-alive connection. */
    script_reset();
    fk.conns = 0;
    for (int i = 0; i < 5; i++) do_head(s, key, NULL);
    TAP_OK(fk.conns <= 1, "fake: 5 sequential requests on %d new connection(s)", fk.conns);

    /* A PUT whose kept-alive connection the server closed is resent. */
    script_reset();
    script(0, NULL, ACT_CLOSE);
    TAP_EQ_INT(do_put(s, key, "0123456789", 10), 0, "fake: PUT resent after its connection dropped");
    TAP_OK(fk.requests == 2 && logged(1, "Content-Length: 10"), "fake: the PUT was sent again, whole");

    /* HEAD and move. */
    script_reset();
    script(200, "0123456789", ACT_RESPOND);
    uint64_t size = 0;
    TAP_EQ_INT(do_head(s, key, &size), 0, "fake: HEAD ok");
    TAP_EQ_INT(size, 10, "fake: HEAD size from Content-Length");
    char key2[72];
    pack_key(key2, "fake2", 5);
    script_reset();
    script(404, NULL, ACT_RESPOND);                                     /* HEAD dst */
    script(200, "<Error><Code>InternalError</Code></Error>", ACT_RESPOND); /* copy fails inside a 200 */
    script(200, "<CopyObjectResult><ETag>x</ETag></CopyObjectResult>", ACT_RESPOND);
    script(204, NULL, ACT_RESPOND); /* DELETE src */
    TAP_EQ_INT(do_move(s, "incoming/abc", key2), 0, "fake: move = copy (retried after a 200 error) + delete");
    TAP_OK(fk.requests == 4 && logged(0, "HEAD ") && logged(1, "x-amz-copy-source: /bkt/incoming/abc\r\n") &&
               logged(2, "SignedHeaders=host;x-amz-content-sha256;x-amz-copy-source;x-amz-date") &&
               logged(3, "DELETE /bkt/incoming/abc "),
           "fake: move request sequence");
    script_reset();
    script(200, "x", ACT_RESPOND);   /* HEAD dst: exists */
    script(200, "x", ACT_RESPOND);   /* HEAD src */
    script(204, NULL, ACT_RESPOND);  /* DELETE src */
    TAP_EQ_INT(do_move(s, "incoming/abc", key2), 0, "fake: move onto an existing key only deletes the source");
    TAP_OK(fk.requests == 3 && logged(2, "DELETE /bkt/incoming/abc "), "fake: no copy when the destination exists");
    script_reset();
    script(200, "x", ACT_RESPOND);  /* HEAD dst: exists */
    script(404, NULL, ACT_RESPOND); /* HEAD src: absent */
    TAP_EQ_INT(do_move(s, "incoming/abc", key2), MH_ENOENT, "fake: absent source is MH_ENOENT even if dst exists");
    script_reset();
    script(404, NULL, ACT_RESPOND); /* HEAD dst */
    script(404, "<Error><Code>NoSuchKey</Code></Error>", ACT_RESPOND);
    TAP_EQ_INT(do_move(s, "incoming/abc", key2), MH_ENOENT, "fake: copy of an absent source is MH_ENOENT");

    /* Bad keys: refused without I/O, callback still on a later turn. */
    script_reset();
    TAP_EQ_INT(do_get(s, "mpacks/../../x", 0, 1, NULL), MH_EINVAL, "fake: bad key refused");
    TAP_EQ_INT(do_move(s, "incoming/a", "x"), MH_EINVAL, "fake: bad move target refused");
    TAP_EQ_INT(do_put(s, "incoming/a b", "x", 1), MH_EINVAL, "fake: bad put key refused");
    TAP_EQ_INT(fk.requests, 0, "fake: nothing sent for bad keys");

    /* get_ranges: coalescing into runs. */
    static char obj[300001];
    for (size_t i = 0; i < sizeof obj - 1; i++) obj[i] = (char)('a' + i % 26);
    script_reset();
    fk.obj = obj;
    fk.objlen = sizeof obj - 1;
    /* [10,5) [0,4) [100,10) [10,5) form one run 0..110; [200000,3) another */
    mh_range_t rg[] = {{10, 5}, {0, 4}, {200000, 3}, {100, 10}, {10, 5}};
    TAP_EQ_INT(do_ranges(s, key, rg, 5, &b), 0, "fake: get_ranges ok");
    TAP_EQ_INT(fk.requests, 2, "fake: two runs, two ranged GETs");
    TAP_OK((logged(0, "range: bytes=0-109\r\n") && logged(1, "range: bytes=200000-200002\r\n")) ||
               (logged(1, "range: bytes=0-109\r\n") && logged(0, "range: bytes=200000-200002\r\n")),
           "fake: runs coalesce ranges closer than 64 KiB");
    bool same = b.len == 27 && memcmp(b.p, obj + 10, 5) == 0 && memcmp(b.p + 5, obj, 4) == 0 &&
                memcmp(b.p + 9, obj + 200000, 3) == 0 && memcmp(b.p + 12, obj + 100, 10) == 0 &&
                memcmp(b.p + 22, obj + 10, 5) == 0;
    TAP_OK(same, "fake: bytes in the order asked, repeats included");
    mh_buf_free(&b);
    script_reset();
    fk.dflt = (fresp_t){200, "abc", ACT_RESPOND, NULL};
    TAP_EQ_INT(do_ranges(s, key, NULL, 0, &b), 0, "fake: get_ranges of nothing");
    TAP_OK(b.len == 0 && fk.requests == 1 && logged(0, "HEAD "), "fake: empty get_ranges checks existence");
    mh_buf_free(&b);
    script_reset();
    script(500, NULL, ACT_RESPOND);
    script(500, NULL, ACT_RESPOND);
    script(500, NULL, ACT_RESPOND);
    script(500, NULL, ACT_RESPOND);
    mh_range_t rg2[] = {{0, 3}};
    TAP_EQ_INT(do_ranges(s, key, rg2, 1, &b), MH_ESTORE, "fake: get_ranges fails after retries");
    TAP_OK(b.p == NULL, "fake: no buffer on error");

    /* Window: 40 GETs at once, answers delayed; never more than 16 in flight. */
    script_reset();
    fk.dflt = (fresp_t){200, "w", ACT_DELAY, NULL};
    res_t many[40] = {{0}};
    in_call = true;
    for (int i = 0; i < 40; i++) mh_store_get(s, key, 0, UINT64_MAX, get_cb, &many[i]);
    in_call = false;
    int ok = 0, reent = 0;
    for (int i = 0; i < 40; i++) {
        wait_for(&many[i]);
        ok += many[i].err == 0 && many[i].buf.len == 1;
        reent += many[i].reentrant;
        mh_buf_free(&many[i].buf);
    }
    TAP_EQ_INT(ok, 40, "window: 40 GETs completed");
    TAP_EQ_INT(reent, 0, "window: no callback inside the call");
    TAP_OK(fk.waiting_max <= 16 && fk.waiting_max >= 8, "window: at most 16 in flight (saw %d)", fk.waiting_max);

    /* Close with operations in flight: they complete, then the store goes. */
    script_reset();
    fk.dflt = (fresp_t){200, "z", ACT_DELAY, NULL};
    res_t r1 = {0}, r2 = {0};
    mh_store_get(s, key, 0, UINT64_MAX, get_cb, &r1);
    mh_store_head(s, key, head_cb, &r2);
    mh_store_close(s);
    wait_for(&r1);
    wait_for(&r2);
    TAP_OK(r1.err == 0 && r1.buf.len == 1 && r2.err == 0 && r2.size == 1, "close: in-flight ops completed");
    mh_buf_free(&r1.buf);
    uv_run(loop, UV_RUN_NOWAIT);

    /* Metrics of a fresh store. */
    s = open_s3(ep, "bkt", true, "AKID", "SECRET", &err);
    script_reset();
    do_get(s, key, 0, UINT64_MAX, NULL);
    mh_buf_t m = {0};
    mh_store_metrics_write(s, &m);
    mh_buf_append_byte(&m, 0);
    TAP_OK(strstr((char *)m.p, "musehub_store_operations_total{backend=\"s3\",op=\"get\",result=\"ok\"} 1") != NULL,
           "metrics: s3 get counted");
    mh_buf_free(&m);
    close_store(s);

    test_fake_streams(ep);

    /* Nothing listening: connection refused, retried, then MH_ESTORE. */
    uv_close((uv_handle_t *)&fk.listener, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    s = open_s3(ep, "bkt", true, "AKID", "SECRET", &err);
    mh_store_s3_tune(s, 500, 1, 5);
    t0 = uv_now(loop);
    TAP_EQ_INT(do_head(s, key, NULL), MH_ESTORE, "refused connection: MH_ESTORE");
    TAP_OK(uv_now(loop) - t0 < 3000, "refused connection: no hang");
    close_store(s);
}

/* ---------------------------------------------- part 2: the emulator */

typedef struct {
    const uint8_t *p;
    size_t n, pos;
} upload_t;

static size_t up_read(char *buf, size_t size, size_t nitems, void *ud)
{
    upload_t *u = ud;
    size_t n = u->n - u->pos < size * nitems ? u->n - u->pos : size * nitems;
    memcpy(buf, u->p + u->pos, n);
    u->pos += n;
    return n;
}

static size_t body_write(char *p, size_t size, size_t nmemb, void *ud)
{
    mh_buf_append(ud, p, size * nmemb);
    return size * nmemb;
}

/* A plain HTTP client (what a muse client does with a presigned URL). */
static long http_do(const char *method, const char *url, const void *body, size_t n, mh_buf_t *out)
{
    CURL *e = curl_easy_init();
    upload_t u = {body, n, 0};
    mh_buf_t sink = {0};
    long st = 0;
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, body_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, out ? out : &sink);
    curl_easy_setopt(e, CURLOPT_TIMEOUT, 20L);
    if (strcmp(method, "PUT") == 0) {
        curl_easy_setopt(e, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, (curl_off_t)n);
        curl_easy_setopt(e, CURLOPT_READFUNCTION, up_read);
        curl_easy_setopt(e, CURLOPT_READDATA, &u);
    }
    if (curl_easy_perform(e) == CURLE_OK) curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &st);
    curl_easy_cleanup(e);
    mh_buf_free(&sink);
    return st;
}

/* The streams against the emulator (real multipart uploads, copies,
 * ranged GETs, listings), with bytes checked end to end. */
static void test_emulator_streams(mh_store_t *s, const char *uniq)
{
    size_t n = 19u * 1024 * 1024 + 777; /* three 8 MiB parts, the last one short */
    uint8_t *data = malloc(n);
    for (size_t i = 0; i < n; i++) data[i] = (uint8_t)((i * 2654435761u) >> 13) ^ (uint8_t)uniq[i % 6];
    char key[72];
    pack_key(key, data, n);
    wres_t f;
    mh_buf_t b = {0};

    TAP_EQ_INT(stream_object(s, true, 0, data, n, 3u * 1024 * 1024, NULL, &f), 0, "emu: multipart writer, 19 MiB");
    uint8_t sha[32];
    mh_sha256(data, n, sha);
    TAP_OK(f.has_sha && memcmp(f.sha, sha, 32) == 0 && f.size == n, "emu: writer hash and size");
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), 0, "emu: the object under mpacks/<hash>");
    TAP_OK(b.len == n && memcmp(b.p, data, n) == 0, "emu: every byte");
    mh_buf_free(&b);
    TAP_EQ_INT(stream_object(s, true, 0, data, n, n, key, &f), 0, "emu: the same object again (exists: dropped)");
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), 0, "emu: still readable");
    TAP_OK(b.len == n && memcmp(b.p, data, n) == 0, "emu: still the same bytes");
    mh_buf_free(&b);

    /* No tmp/ object is left visible (only the emulator's own leftovers
     * of refused AbortMultipartUpload calls, which are not objects). */
    unsigned removed = 7;
    TAP_EQ_INT(do_sweep_tmp(s, 0, &removed), 0, "emu: tmp sweep runs (uploads listing unsupported: skipped)");
    TAP_EQ_INT(removed, 0, "emu: the writers left no tmp/ object behind");

    char key2[72];
    pack_key(key2, data, 100000);
    TAP_EQ_INT(stream_object(s, false, 0, data, 100000, 7000, key2, &f), 0, "emu: small caller-keyed object (one PUT)");
    TAP_EQ_INT(do_get(s, key2, 0, UINT64_MAX, &b), 0, "emu: small object readable");
    TAP_OK(b.len == 100000 && memcmp(b.p, data, 100000) == 0, "emu: small object bytes");
    mh_buf_free(&b);

    mh_store_writer_opts_t o = {.hash = true};
    mh_store_writer_t *w = NULL;
    mh_store_writer_open(s, &o, &w);
    write_all(w, data, 9u * 1024 * 1024, 1024 * 1024);
    mh_store_writer_abort(w);
    for (int i = 0; i < 50; i++) uv_run(loop, UV_RUN_NOWAIT), usleep(2000);

    rdrive_t d = {0};
    TAP_EQ_INT(read_seq(s, key, 0, UINT64_MAX, 2u * 1024 * 1024, &d), 0, "emu: reader, 2 MiB windows");
    TAP_OK(d.all.len == n && memcmp(d.all.p, data, n) == 0 && d.windows == 10 && d.max_window <= 2u * 1024 * 1024,
           "emu: every byte in 10 windows of at most 2 MiB");
    rdrive_free(&d);
    mh_range_t rg[] = {{5, 10}, {3000, 4}, {8u * 1024 * 1024, 5u * 1024 * 1024}, {n - 3, 3}, {1, 2}};
    TAP_EQ_INT(read_ranges(s, key, rg, 5, 0, &d), 0, "emu: ranged reader");
    TAP_OK(ranges_match(&d, data, rg, 5), "emu: ranges whole and right, a 5 MiB range split");
    rdrive_free(&d);
    TAP_EQ_INT(read_seq(s, "incoming/nothing-here", 0, UINT64_MAX, 0, &d), MH_ENOENT, "emu: reader of absent key");
    rdrive_free(&d);

    static lres_t l;
    char k[80];
    for (int i = 0; i < 3; i++) {
        snprintf(k, sizeof k, "incoming/ls%s_%d", uniq, i);
        do_put(s, k, "abc", (size_t)i);
    }
    snprintf(k, sizeof k, "incoming/ls%s_", uniq);
    TAP_EQ_INT(do_list(s, "incoming/", k, &l), 0, "emu: list after a key");
    int mine = 0;
    for (size_t i = 0; i < l.n; i++)
        if (!strncmp(l.keys[i], k, strlen(k))) mine += l.sizes[i] == (uint64_t)(l.keys[i][strlen(k)] - '0');
    TAP_EQ_INT(mine, 3, "emu: our three keys with their sizes");
    TAP_OK(l.n > 0 && l.mtimes[0] > mh_unix_time() - 3600 && l.mtimes[0] <= mh_unix_time() + 5,
           "emu: modification times are now");
    for (int i = 0; i < 3; i++) {
        snprintf(k, sizeof k, "incoming/ls%s_%d", uniq, i);
        do_delete(s, k);
    }
    do_delete(s, key);
    do_delete(s, key2);
    free(data);
}

static void test_emulator(const char *ep)
{
    const char *bucket = getenv("MUSEHUB_TEST_S3_BUCKET");
    const char *ak = getenv("MUSEHUB_TEST_S3_ACCESS_KEY"), *sk = getenv("MUSEHUB_TEST_S3_SECRET_KEY");
    if (!bucket || !*bucket) bucket = "musehub-test";
    if (!ak) ak = "S3RVER";
    if (!sk) sk = "S3RVER";
    int err;
    mh_store_t *s = open_s3(ep, bucket, true, ak, sk, &err);
    TAP_OK(s != NULL, "emu: store opened on %s bucket %s", ep, bucket);
    if (!s) return;
    char uniq[32];
    snprintf(uniq, sizeof uniq, "%d_%" PRIu64, (int)getpid(), mh_now_us());

    /* A pack of 300 KiB: hashed on the thread pool, stored, read back. */
    size_t n = 300 * 1024;
    uint8_t *data = malloc(n);
    for (size_t i = 0; i < n; i++) data[i] = (uint8_t)((i * 7919u + uniq[i % 8]) >> 3);
    char key[72];
    pack_key(key, data, n);
    TAP_EQ_INT(do_put(s, key, data, n), 0, "emu: put 300 KiB");
    uint64_t size = 0;
    TAP_EQ_INT(do_head(s, key, &size), 0, "emu: head");
    TAP_EQ_INT(size, n, "emu: head size");
    mh_buf_t b = {0};
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), 0, "emu: get whole");
    TAP_OK(b.len == n && memcmp(b.p, data, n) == 0, "emu: whole object round-trips");
    mh_buf_free(&b);
    TAP_EQ_INT(do_get(s, key, 1000, 777, &b), 0, "emu: ranged get (206)");
    TAP_OK(b.len == 777 && memcmp(b.p, data + 1000, 777) == 0, "emu: ranged bytes");
    mh_buf_free(&b);
    TAP_EQ_INT(do_get(s, key, n - 5, UINT64_MAX, &b), 0, "emu: tail get");
    TAP_OK(b.len == 5 && memcmp(b.p, data + n - 5, 5) == 0, "emu: tail bytes");
    mh_buf_free(&b);
    TAP_EQ_INT(do_get(s, key, n, UINT64_MAX, &b), 0, "emu: empty tail at the end");
    TAP_EQ_INT(b.len, 0, "emu: empty tail is empty");
    mh_buf_free(&b);
    TAP_EQ_INT(do_get(s, key, n - 5, 10, NULL), MH_EINVAL, "emu: range past the end is MH_EINVAL");
    TAP_EQ_INT(do_get(s, key, n + 10, 1, NULL), MH_EINVAL, "emu: range after the end is MH_EINVAL");
    mh_range_t rg[] = {{5000, 100}, {10, 20}, {200000, 50}, {5050, 10}, {0, 0}, {n - 1, 1}};
    TAP_EQ_INT(do_ranges(s, key, rg, 6, &b), 0, "emu: get_ranges");
    size_t pos = 0;
    bool same = b.len == 100 + 20 + 50 + 10 + 1;
    for (size_t i = 0; same && i < 6; i++) {
        same = memcmp(b.p + pos, data + rg[i].off, (size_t)rg[i].len) == 0;
        pos += (size_t)rg[i].len;
    }
    TAP_OK(same, "emu: get_ranges bytes in the order asked");
    mh_buf_free(&b);
    char absent[72];
    pack_key(absent, uniq, strlen(uniq));
    TAP_EQ_INT(do_get(s, absent, 0, UINT64_MAX, NULL), MH_ENOENT, "emu: absent key is MH_ENOENT");
    TAP_EQ_INT(do_head(s, absent, NULL), MH_ENOENT, "emu: head of an absent key is MH_ENOENT");
    TAP_EQ_INT(do_get(s, absent, 0, 0, NULL), MH_ENOENT, "emu: zero-length read of an absent key");

    /* Presigned PUT into a staging key by a plain client, then move. */
    mh_arena_t a;
    mh_arena_init(&a, 0);
    char stage[80], stage2[80];
    snprintf(stage, sizeof stage, "incoming/u%s", uniq);
    snprintf(stage2, sizeof stage2, "incoming/v%s", uniq);
    uint8_t sha[32];
    mh_sha256(data, 4096, sha);
    char *url = NULL;
    TAP_EQ_INT(mh_store_presign(s, &a, "PUT", stage, 4096, sha, 600, &url), 0, "emu: presign PUT");
    TAP_EQ_INT(http_do("PUT", url, data, 4095, NULL), 403, "emu: presigned PUT with another length refused (403)");
    char *bad = mh_strdup(&a, url);
    bad[strlen(bad) - 1] = bad[strlen(bad) - 1] == '0' ? '1' : '0';
    TAP_EQ_INT(http_do("PUT", bad, data, 4096, NULL), 403, "emu: tampered presigned PUT refused (403)");
    char *other = mh_strdup(&a, url);
    memcpy(strstr(other, "/incoming/u") + 10, "v", 1);
    TAP_EQ_INT(http_do("PUT", other, data, 4096, NULL), 403, "emu: presigned PUT for another key refused (403)");
    TAP_EQ_INT(http_do("PUT", url, data, 4096, NULL), 200, "emu: presigned PUT accepted");
    TAP_EQ_INT(do_head(s, stage, &size), 0, "emu: staged object present");
    TAP_EQ_INT(size, 4096, "emu: staged size");
    TAP_EQ_INT(do_head(s, stage2, NULL), MH_ENOENT, "emu: the other key was not written");

    char key2[72];
    pack_key(key2, data, 4096);
    TAP_EQ_INT(do_move(s, stage, key2), 0, "emu: move (server-side copy + delete)");
    TAP_EQ_INT(do_head(s, stage, NULL), MH_ENOENT, "emu: source gone after move");
    TAP_EQ_INT(do_get(s, key2, 0, UINT64_MAX, &b), 0, "emu: destination readable");
    TAP_OK(b.len == 4096 && memcmp(b.p, data, 4096) == 0, "emu: moved bytes");
    mh_buf_free(&b);
    TAP_EQ_INT(do_put(s, stage, data, 4096), 0, "emu: stage again");
    TAP_EQ_INT(do_move(s, stage, key2), 0, "emu: move onto an existing pack");
    TAP_EQ_INT(do_head(s, stage, NULL), MH_ENOENT, "emu: source dropped");
    TAP_EQ_INT(do_move(s, stage, key2), MH_ENOENT, "emu: move of an absent source is MH_ENOENT");
    TAP_EQ_INT(do_move(s, key2, key2), 0, "emu: move onto itself is a no-op");

    /* Presigned GET. */
    TAP_EQ_INT(mh_store_presign(s, &a, "GET", key2, 0, NULL, 600, &url), 0, "emu: presign GET");
    TAP_EQ_INT(http_do("GET", url, NULL, 0, &b), 200, "emu: presigned GET 200");
    TAP_OK(b.len == 4096 && memcmp(b.p, data, 4096) == 0, "emu: presigned GET bytes");
    mh_buf_free(&b);
    bad = mh_strdup(&a, url);
    char *exp = strstr(bad, "X-Amz-Expires=600");
    memcpy(exp + 14, "900", 3);
    TAP_EQ_INT(http_do("GET", bad, NULL, 0, NULL), 403, "emu: presigned GET with a changed expiry refused (403)");
    TAP_EQ_INT(mh_store_presign(s, &a, "GET", key2, 0, NULL, 1, &url), 0, "emu: presign GET for 1 s");
    sleep(2);
    TAP_EQ_INT(http_do("GET", url, NULL, 0, NULL), 403, "emu: expired presigned GET refused (403)");

    test_emulator_streams(s, uniq);

    /* Many operations at once go through the window. */
    enum { MANY = 48 };
    res_t rs[MANY] = {{0}};
    char keys[MANY][80];
    for (int i = 0; i < MANY; i++) {
        snprintf(keys[i], sizeof keys[i], "incoming/m%d_%s", i, uniq);
        mh_store_put(s, keys[i], data + i, 1000, done_cb, &rs[i]);
    }
    int ok = 0;
    for (int i = 0; i < MANY; i++) {
        wait_for(&rs[i]);
        ok += rs[i].err == 0;
    }
    TAP_EQ_INT(ok, MANY, "emu: 48 concurrent puts");
    memset(rs, 0, sizeof rs);
    for (int i = 0; i < MANY; i++) mh_store_get(s, keys[i], 0, UINT64_MAX, get_cb, &rs[i]);
    ok = 0;
    for (int i = 0; i < MANY; i++) {
        wait_for(&rs[i]);
        ok += rs[i].err == 0 && rs[i].buf.len == 1000 && memcmp(rs[i].buf.p, data + i, 1000) == 0;
        mh_buf_free(&rs[i].buf);
    }
    TAP_EQ_INT(ok, MANY, "emu: 48 concurrent gets");
    memset(rs, 0, sizeof rs);
    for (int i = 0; i < MANY; i++) mh_store_delete(s, keys[i], done_cb, &rs[i]);
    ok = 0;
    for (int i = 0; i < MANY; i++) {
        wait_for(&rs[i]);
        ok += rs[i].err == 0;
    }
    TAP_EQ_INT(ok, MANY, "emu: 48 concurrent deletes");

    TAP_EQ_INT(do_delete(s, key), 0, "emu: delete");
    TAP_EQ_INT(do_delete(s, key), 0, "emu: delete again (absent is success)");
    TAP_EQ_INT(do_delete(s, key2), 0, "emu: delete moved pack");
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, NULL), MH_ENOENT, "emu: deleted key is gone");
    close_store(s);

    /* Bad credentials: refused at once (403 is never retried). */
    s = open_s3(ep, bucket, true, ak, "wrong-secret", &err);
    uint64_t t0 = uv_now(loop);
    TAP_EQ_INT(do_put(s, key, data, 10), MH_ESTORE, "emu: wrong secret is MH_ESTORE");
    TAP_OK(uv_now(loop) - t0 < 1500, "emu: wrong secret not retried (retries would take 2.1 s)");
    close_store(s);
    s = open_s3(ep, bucket, true, "NOSUCHKEY", sk, &err);
    TAP_EQ_INT(do_head(s, key2, NULL), MH_ESTORE, "emu: unknown access key is MH_ESTORE");
    close_store(s);
    s = open_s3(ep, "no-such-bucket-here", true, ak, sk, &err);
    TAP_EQ_INT(do_get(s, key2, 0, UINT64_MAX, NULL), MH_ESTORE, "emu: absent bucket is MH_ESTORE");
    close_store(s);
    mh_arena_release(&a);
    free(data);
}

int main(void)
{
    loop = uv_default_loop();
    mh_log_set_level(getenv("MUSEHUB_TEST_VERBOSE") ? "debug" : "error");
    curl_global_init(CURL_GLOBAL_DEFAULT);
    test_config();
    test_fake();
    const char *ep = getenv("MUSEHUB_TEST_S3_ENDPOINT");
    if (ep && *ep) test_emulator(ep);
    else TAP_COMMENT("SKIP emulator tests: MUSEHUB_TEST_S3_ENDPOINT not set (start scripts/s3emu.js)");
    uv_run(loop, UV_RUN_NOWAIT);
    curl_global_cleanup();
    return tap_done();
}
