/*
 * store_routes.c — the fs backend's presigned URLs served by the server
 * itself (SPEC 3, 4.3 step 2): PUT /_store/incoming/<id> streams the body
 * to disk while hashing it and keeps it only when hash and length match
 * what the URL signs; GET /_store/mpacks/<hex> serves a pack (with Range)
 * as a streamed response read in pieces on the thread pool.
 *
 * Invariants: the URL's HMAC covers method, key, expiry, size and hash,
 * so nothing here trusts the client beyond what the server signed; the
 * key is the raw request path (never percent-decoded), so it has one
 * spelling; a PUT never overwrites an existing key
 * (mh_store_fs_upload_open refuses, and the final link(2) never
 * replaces); no file I/O of an upload runs on the loop thread (the
 * store's writer does it on the thread pool) and an upload holds at most
 * MH_STORE_FS_UPLOAD_MEM bytes, reserved from the pack-memory budget; a
 * full or read-only store answers 507 insufficient_storage and keeps
 * nothing (SPEC 4.8); a GET holds about MH_RES_STREAM_HIGH + DL_CHUNK
 * bytes whatever the pack size.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mh/budget.h"
#include "mh/hub.h"

/* The key exactly as it appears in the request path: "no decoding"
 * (docs/security.md 5), so a key has one spelling, the one the URL was
 * signed for (a percent-encoded spelling is not a valid key and fails the
 * signature check). */
static mh_str_t store_key(const mh_req_t *req)
{
    static const char pre[] = "/_store/";
    if (req->path.n <= sizeof pre - 1 || memcmp(req->path.p, pre, sizeof pre - 1) != 0) return (mh_str_t){NULL, 0};
    return (mh_str_t){req->path.p + sizeof pre - 1, req->path.n - (sizeof pre - 1)};
}

/* One upload: the store's upload writer (bytes go to tmp/ on the thread
 * pool, hashed as they pass), a reservation of its buffers from the
 * pack-memory budget, and the request's flow control: the body is paused
 * while the budget is being waited for and while the writer's buffers
 * are full, resumed when they drain. */
typedef struct {
    mh_req_t *req;
    mh_store_writer_t *up;
    mh_budget_res_t res;
    bool over; /* answered (or the client left): ignore the rest */
} upload_t;

/* Ends the upload's resources (idempotent; also run at arena release). */
static void upload_drop(void *arg)
{
    upload_t *u = arg;
    if (u->up) mh_store_writer_abort(u->up);
    u->up = NULL;
    mh_budget_release(&u->res);
}

/* The one place an upload's store error becomes an answer (SPEC 4.3
 * step 2, 4.8). Nothing is kept in every error case: the writer's
 * temporary file is removed by abort or by the failed finish. */
static void upload_fail(upload_t *u, int rc)
{
    mh_req_t *req = u->req;
    u->over = true;
    upload_drop(u);
    if (req->responded) return;
    /* The body may be paused (waiting for the budget or for the disk):
     * let the rest of it flow so the server can discard it and the
     * connection can carry the next request. */
    mh_req_resume(req);
    switch (rc) {
    case MH_EHASH:
        mh_res_error(req, 400, "digest_mismatch", "the bytes do not hash to the signed key or length; nothing was kept");
        break;
    case MH_ELIMIT: mh_res_error(req, 400, "size_mismatch", "more bytes than the signed size; nothing was kept"); break;
    case MH_EEXIST: mh_res_error(req, 409, "exists", "this staging key was already uploaded"); break;
    case MH_ENOSPC:
        mh_res_error(req, 507, "insufficient_storage", "the object store has no space left; nothing was kept");
        break;
    case MH_EBUDGET: {
        mh_hub_t *hub = req->app;
        char ra[16];
        snprintf(ra, sizeof ra, "%u", mh_budget_retry_after_s(hub->budget));
        mh_res_header(req, "Retry-After", ra);
        mh_res_error(req, 503, "busy", "the server's memory for pack work is spent; retry later");
        break;
    }
    case MH_ENOMEM: mh_res_fail(req, rc, "upload"); break;
    default: mh_res_error(req, 500, "internal", "upload failed: %s", mh_strerror(rc)); break;
    }
}

/* The URL's signature (method "PUT" or "GET"; for PUT also the signed
 * size and hash): false after answering 403. */
static bool url_ok(mh_req_t *req, const char *method, mh_str_t key, uint64_t *size, uint8_t *sha)
{
    mh_hub_t *hub = req->app;
    int rc = mh_store_fs_check_url(hub->store, method, key, req->query, size, sha);
    const char *what = strcmp(method, "PUT") ? "download" : "upload";
    if (rc == MH_ETIMEDOUT) mh_res_error(req, 403, "expired", "this %s URL has expired", what);
    else if (rc) mh_res_error(req, 403, "forbidden", "bad %s URL signature", what);
    return !rc;
}

static void upload_abort(mh_req_t *req)
{
    upload_t *u = req->user;
    if (u) {
        u->over = true;
        upload_drop(u);
    }
    mh_res_error(req, 400, "aborted", "upload aborted");
}

static void upload_drained_cb(void *ud, int err)
{
    upload_t *u = ud;
    if (u->over) return;
    if (err) upload_fail(u, err);
    else mh_req_resume(u->req);
}

static void upload_body(mh_req_t *req, const uint8_t *data, size_t n)
{
    upload_t *u = req->user;
    if (u->over) return;
    int rc = mh_store_writer_write(u->up, data, n, NULL, NULL);
    if (rc) {
        upload_fail(u, rc);
        return;
    }
    /* Both buffers busy: stop reading the socket until a chunk is on disk. */
    if (mh_store_writer_full(u->up)) {
        rc = mh_store_writer_write(u->up, NULL, 0, upload_drained_cb, u);
        if (rc) upload_fail(u, rc);
        else mh_req_pause(req);
    }
}

static void upload_finished_cb(void *ud, int err, const uint8_t *sha256, uint64_t size)
{
    (void)sha256;
    (void)size;
    upload_t *u = ud;
    u->up = NULL; /* finish consumed it */
    if (err) {
        upload_fail(u, err);
        return;
    }
    u->over = true;
    mh_budget_release(&u->res);
    mh_res_send(u->req, 200, NULL, NULL, 0);
}

static void upload_end(mh_req_t *req)
{
    upload_t *u = req->user;
    if (u->over) return;
    /* Length and hash are checked, fsync and the no-overwrite link run on
     * the thread pool once the last chunk is written. */
    mh_store_writer_finish(u->up, NULL, upload_finished_cb, u);
}

static void upload_budget_cb(void *ud, int err)
{
    upload_t *u = ud;
    if (err) upload_fail(u, err);
    else mh_req_resume(u->req);
}

void mh_h_store_put(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    mh_str_t key = store_key(req);
    uint64_t size = 0;
    uint8_t sha[32];
    if (!url_ok(req, "PUT", key, &size, sha)) return;
    if (req->content_length != UINT64_MAX && req->content_length != size) {
        mh_res_error(req, 400, "size_mismatch", "Content-Length %llu differs from the signed size %llu",
                     (unsigned long long)req->content_length, (unsigned long long)size);
        return;
    }
    upload_t *u = mh_calloc(&req->arena, sizeof *u);
    char *k = mh_strndup(&req->arena, key.p, key.n);
    if (!u || !k || mh_arena_defer(&req->arena, upload_drop, u) != 0) {
        mh_res_fail(req, MH_ENOMEM, "store");
        return;
    }
    u->req = req;
    int rc = mh_store_fs_upload_open(hub->store, k, size, sha, &u->up);
    if (rc) {
        upload_fail(u, rc);
        return;
    }
    req->user = u;
    req->on_body = upload_body;
    req->on_body_end = upload_end;
    req->on_abort = upload_abort;
    if (hub->budget) {
        /* The body waits (paused, the request timeout stopped) until the
         * upload's buffers fit the pack-memory budget (SPEC 4.8). */
        mh_req_pause(req);
        mh_budget_acquire(&u->res, hub->budget, MH_STORE_FS_UPLOAD_MEM, upload_budget_cb, u);
    }
}

/* ------------------------------------------------------------------ GET */

/* Served without mapping the file: a mapping of a GiB pack counted every
 * page a client had read against the process (RSS grew to the pack size),
 * and a page fault on the loop thread is a blocking disk read. Instead
 * the file is read in DL_CHUNK pieces with uv_fs_read (libuv's thread
 * pool) and each piece is lent to the streamed response
 * (mh_res_stream_write_ext); the next read starts when the stream wants
 * more, so a download holds about MH_RES_STREAM_HIGH + DL_CHUNK bytes
 * whatever the pack size. sendfile(2) was the alternative: through
 * uv_fs_sendfile it runs on the thread pool against libuv's non-blocking
 * socket, gets EAGAIN once the socket buffer is full and would need our
 * own writability watch on a descriptor uv_tcp_t already polls, ordered
 * by hand against the response head queued with uv_write; pread + write
 * keeps one write path and its back-pressure (docs/architecture.md). */
#define DL_CHUNK (256u << 10)
#define DL_SPARE 4 /* buffers kept for reuse */

typedef struct {
    mh_req_t *req;
    uv_loop_t *loop;
    uv_fs_t rd;
    uv_file fd;
    uint64_t off, end; /* next byte to read, end of the range */
    uint8_t *rbuf;     /* the buffer being read into */
    uint8_t *spare[DL_SPARE];
    int nspare;
    bool reading, waiting, ended;
} dl_t;

static void dl_read(dl_t *d);

/* Ends the response once (closing the file), unless a read is still on
 * the thread pool: its callback finishes the job. */
static void dl_end(dl_t *d, int err)
{
    if (d->ended || d->reading) return;
    d->ended = true;
    if (d->fd >= 0) {
        uv_fs_t cl;
        uv_fs_close(NULL, &cl, d->fd, NULL); /* close(2) of a regular file: does not block */
        uv_fs_req_cleanup(&cl);
        d->fd = -1;
    }
    mh_res_stream_end(d->req, err);
}

static uint8_t *dl_buf(dl_t *d) { return d->nspare ? d->spare[--d->nspare] : malloc(DL_CHUNK); }

typedef struct {
    dl_t *d;
    uint8_t *p;
} dl_lent_t;

/* A piece was written (or dropped): keep its buffer for the next read. */
static void dl_buf_done(void *arg)
{
    dl_lent_t *l = arg;
    dl_t *d = l->d;
    if (d->nspare < DL_SPARE) d->spare[d->nspare++] = l->p;
    else free(l->p);
    free(l);
}

static void dl_read_cb(uv_fs_t *rq)
{
    dl_t *d = rq->data;
    ssize_t n = rq->result;
    uv_fs_req_cleanup(rq);
    d->reading = false;
    uint8_t *b = d->rbuf;
    d->rbuf = NULL;
    if (mh_req_gone(d->req) || n <= 0) {
        free(b);
        if (!mh_req_gone(d->req))
            mh_error("req %s: reading the pack: %s", d->req->id, n < 0 ? uv_strerror((int)n) : "file shorter than its size");
        dl_end(d, mh_req_gone(d->req) ? 0 : MH_EIO);
        return;
    }
    d->off += (uint64_t)n;
    dl_lent_t *l = malloc(sizeof *l);
    if (!l) {
        free(b);
        dl_end(d, MH_ENOMEM);
        return;
    }
    *l = (dl_lent_t){d, b};
    bool more = mh_res_stream_write_ext(d->req, b, (size_t)n, dl_buf_done, l);
    if (d->off >= d->end) dl_end(d, 0);
    else if (more) dl_read(d);
    else d->waiting = true; /* dl_drain reads on */
}

static void dl_read(dl_t *d)
{
    if (d->reading || d->ended || d->off >= d->end) return;
    d->rbuf = dl_buf(d);
    if (!d->rbuf) {
        dl_end(d, MH_ENOMEM);
        return;
    }
    uint64_t left = d->end - d->off;
    uv_buf_t b = uv_buf_init((char *)d->rbuf, (unsigned)(left < DL_CHUNK ? left : DL_CHUNK));
    d->rd.data = d;
    int rc = uv_fs_read(d->loop, &d->rd, d->fd, &b, 1, (int64_t)d->off, dl_read_cb);
    if (rc) {
        free(d->rbuf);
        d->rbuf = NULL;
        mh_error("req %s: reading the pack: %s", d->req->id, uv_strerror(rc));
        dl_end(d, MH_EIO);
        return;
    }
    d->reading = true;
}

static void dl_drain(mh_req_t *req, void *arg)
{
    (void)req;
    dl_t *d = arg;
    d->waiting = false;
    dl_read(d);
}

static void dl_abort(mh_req_t *req, void *arg)
{
    (void)req;
    dl_end(arg, 0); /* or, with a read in flight, when it returns */
}

/* Arena cleanup: the spare buffers, and the file if never ended. */
static void dl_cleanup(void *arg)
{
    dl_t *d = arg;
    for (int i = 0; i < d->nspare; i++) free(d->spare[i]);
    d->nspare = 0;
    if (d->fd >= 0) close(d->fd);
}

void mh_h_store_get(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    mh_str_t key = store_key(req);
    if (!url_ok(req, "GET", key, NULL, NULL)) return;
    char *k = mh_strndup(&req->arena, key.p, key.n);
    int fd = -1;
    uint64_t size = 0;
    int rc = k ? mh_store_fs_open_read(hub->store, k, &fd, &size) : MH_ENOMEM;
    if (rc == MH_ENOENT) {
        mh_res_error(req, 404, "not_found", "no such object");
        return;
    }
    if (rc) {
        mh_res_error(req, 500, "internal", "cannot read: %s", mh_strerror(rc));
        return;
    }
    dl_t *d = mh_calloc(&req->arena, sizeof *d);
    if (!d || mh_arena_defer(&req->arena, dl_cleanup, d)) {
        close(fd);
        mh_res_fail(req, MH_ENOMEM, "store");
        return;
    }
    *d = (dl_t){.req = req, .loop = hub->loop, .fd = fd, .off = 0, .end = size};
    int status = 200;
    mh_str_t range = mh_req_header(req, "range");
    if (range.p) {
        bool unsat = false;
        uint64_t off = 0, len = size;
        if (mh_parse_range(range, size, &off, &len, &unsat)) {
            status = 206;
            d->off = off;
            d->end = off + len;
            char *cr = mh_sprintf(&req->arena, "bytes %llu-%llu/%llu", (unsigned long long)off,
                                  (unsigned long long)(off + len - 1), (unsigned long long)size);
            if (cr) mh_res_header(req, "Content-Range", cr);
        } else if (unsat) {
            char *cr = mh_sprintf(&req->arena, "bytes */%llu", (unsigned long long)size);
            if (cr) mh_res_header(req, "Content-Range", cr);
            mh_res_error(req, 416, "range_not_satisfiable", "range outside the object");
            return;
        }
    }
    mh_res_header(req, "Accept-Ranges", "bytes");
    mh_res_header(req, "Cache-Control", "private, max-age=3600, immutable");
    rc = mh_res_stream_begin(req, status, "application/octet-stream", d->end - d->off, dl_drain, dl_abort, d);
    if (rc) {
        mh_res_fail(req, MH_ENOMEM, "store");
        return;
    }
    if (!mh_res_stream_wants_body(req) || d->off >= d->end) dl_end(d, 0);
    else dl_read(d);
}
