/*
 * store_routes.c — the fs backend's presigned URLs served by the server
 * itself (SPEC 3, 4.3 step 2): PUT /_store/incoming/<id> streams the body
 * to disk while hashing it and keeps it only when hash and length match
 * what the URL signs; GET /_store/mpacks/<hex> serves a pack (with Range).
 *
 * Invariants: the URL's HMAC covers method, key, expiry, size and hash,
 * so nothing here trusts the client beyond what the server signed; a PUT
 * never overwrites an existing key (mh_store_fs_upload_open refuses, and
 * the final link(2) never replaces); no file I/O of an upload runs on the
 * loop thread (the store's writer does it on the thread pool) and an
 * upload holds at most MH_STORE_FS_UPLOAD_MEM bytes, reserved from the
 * pack-memory budget; a full or read-only store answers 507
 * insufficient_storage and keeps nothing (SPEC 4.8).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mh/budget.h"
#include "mh/hub.h"

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
    case MH_ENOMEM: mh_res_error(req, 503, "unavailable", "out of memory"); break;
    default: mh_res_error(req, 500, "internal", "upload failed: %s", mh_strerror(rc)); break;
    }
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
    mh_str_t key = mh_req_param(req, "key");
    uint64_t size = 0;
    uint8_t sha[32];
    int rc = mh_store_fs_check_url(hub->store, "PUT", key, req->query, &size, sha);
    if (rc == MH_ETIMEDOUT) {
        mh_res_error(req, 403, "expired", "this upload URL has expired");
        return;
    }
    if (rc) {
        mh_res_error(req, 403, "forbidden", "bad upload URL signature");
        return;
    }
    if (req->content_length != UINT64_MAX && req->content_length != size) {
        mh_res_error(req, 400, "size_mismatch", "Content-Length %llu differs from the signed size %llu",
                     (unsigned long long)req->content_length, (unsigned long long)size);
        return;
    }
    upload_t *u = mh_calloc(&req->arena, sizeof *u);
    char *k = mh_strndup(&req->arena, key.p, key.n);
    if (!u || !k || mh_arena_defer(&req->arena, upload_drop, u) != 0) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    u->req = req;
    rc = mh_store_fs_upload_open(hub->store, k, size, sha, &u->up);
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

typedef struct {
    void *map;
    size_t len;
} mapping_t;

static void unmap_cb(void *arg)
{
    mapping_t *m = arg;
    if (m->map && m->len) munmap(m->map, m->len);
    free(m);
}

void mh_h_store_get(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    mh_str_t key = mh_req_param(req, "key");
    int rc = mh_store_fs_check_url(hub->store, "GET", key, req->query, NULL, NULL);
    if (rc == MH_ETIMEDOUT) {
        mh_res_error(req, 403, "expired", "this download URL has expired");
        return;
    }
    if (rc) {
        mh_res_error(req, 403, "forbidden", "bad download URL signature");
        return;
    }
    char *k = mh_strndup(&req->arena, key.p, key.n);
    int fd = -1;
    uint64_t size = 0;
    rc = k ? mh_store_fs_open_read(hub->store, k, &fd, &size) : MH_ENOMEM;
    if (rc == MH_ENOENT) {
        mh_res_error(req, 404, "not_found", "no such object");
        return;
    }
    if (rc) {
        mh_res_error(req, 500, "internal", "cannot read: %s", mh_strerror(rc));
        return;
    }
    uint64_t off = 0, len = size;
    int status = 200;
    mh_str_t range = mh_req_header(req, "range");
    if (range.p) {
        bool unsat = false;
        if (mh_parse_range(range, size, &off, &len, &unsat)) {
            status = 206;
            char *cr = mh_sprintf(&req->arena, "bytes %llu-%llu/%llu", (unsigned long long)off,
                                  (unsigned long long)(off + len - 1), (unsigned long long)size);
            if (cr) mh_res_header(req, "Content-Range", cr);
        } else if (unsat) {
            close(fd);
            char *cr = mh_sprintf(&req->arena, "bytes */%llu", (unsigned long long)size);
            if (cr) mh_res_header(req, "Content-Range", cr);
            mh_res_error(req, 416, "range_not_satisfiable", "range outside the object");
            return;
        }
    }
    mh_res_header(req, "Accept-Ranges", "bytes");
    mh_res_header(req, "Cache-Control", "private, max-age=3600, immutable");
    mapping_t *m = calloc(1, sizeof *m);
    if (!m) {
        close(fd);
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    if (size) {
        /* Packs are immutable once renamed into place, so a shared mapping
         * is safe; the kernel pages it in as the socket drains. */
        m->map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
        if (m->map == MAP_FAILED) {
            m->map = NULL;
            close(fd);
            free(m);
            mh_res_error(req, 500, "internal", "cannot map object");
            return;
        }
        m->len = size;
    }
    close(fd);
    mh_res_send_ext(req, status, "application/octet-stream", (const uint8_t *)m->map + off, len, unmap_cb, m);
}
