/*
 * store_routes.c — the fs backend's presigned URLs served by the server
 * itself (SPEC 3, 4.3 step 2): PUT /_store/incoming/<id> streams the body
 * to disk while hashing it and keeps it only when hash and length match
 * what the URL signs; GET /_store/mpacks/<hex> serves a pack (with Range).
 *
 * Invariants: the URL's HMAC covers method, key, expiry, size and hash,
 * so nothing here trusts the client beyond what the server signed; a PUT
 * never overwrites an existing key (mh_store_fs_upload_open refuses).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mh/hub.h"

typedef struct {
    mh_fs_upload_t *up;
    int err;        /* first write error */
    bool finished;
} upload_t;

/* Answers a failed step of a presigned-URL request (rc != 0). */
static void store_fail(mh_req_t *req, int rc, const char *doing)
{
    switch (rc) {
    case MH_EHASH:
        mh_res_error(req, 400, "digest_mismatch", "the bytes do not hash to the signed key or length; nothing was kept");
        break;
    case MH_ELIMIT: mh_res_error(req, 400, "size_mismatch", "more bytes than the signed size"); break;
    case MH_EEXIST: mh_res_error(req, 409, "exists", "this staging key was already uploaded"); break;
    case MH_ENOENT: mh_res_error(req, 404, "not_found", "no such object"); break;
    case MH_ENOMEM: mh_res_error(req, 503, "unavailable", "out of memory"); break;
    default: mh_res_error(req, 500, "internal", "%s: %s", doing, mh_strerror(rc)); break;
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
    if (u && u->up) {
        mh_store_fs_upload_abort(u->up);
        u->up = NULL;
    }
    mh_res_error(req, 400, "aborted", "upload aborted");
}

static void upload_body(mh_req_t *req, const uint8_t *data, size_t n)
{
    upload_t *u = req->user;
    if (!u->up || u->err) return;
    int rc = mh_store_fs_upload_write(u->up, data, n);
    if (rc) {
        u->err = rc;
        mh_store_fs_upload_abort(u->up);
        u->up = NULL;
    }
}

static void upload_finished_cb(void *ud, int rc)
{
    mh_req_t *req = ud;
    if (rc) store_fail(req, rc, "upload failed");
    else mh_res_send(req, 200, NULL, NULL, 0);
}

static void upload_end(mh_req_t *req)
{
    upload_t *u = req->user;
    if (u->err) {
        store_fail(req, u->err, "write failed");
        return;
    }
    mh_fs_upload_t *up = u->up;
    u->up = NULL;
    /* Length and hash are checked at once; fsync and the no-overwrite
     * link run on the thread pool so a large pack never stalls the loop. */
    mh_store_fs_upload_finish_async(up, upload_finished_cb, req);
}

void mh_h_store_put(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    mh_str_t key = mh_req_param(req, "key");
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
    int rc = u && k ? mh_store_fs_upload_open(hub->store, k, size, sha, &u->up) : MH_ENOMEM;
    if (rc) {
        store_fail(req, rc, "cannot stage upload");
        return;
    }
    req->user = u;
    req->on_body = upload_body;
    req->on_body_end = upload_end;
    req->on_abort = upload_abort;
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
    if (!url_ok(req, "GET", key, NULL, NULL)) return;
    char *k = mh_strndup(&req->arena, key.p, key.n);
    int fd = -1;
    uint64_t size = 0;
    int rc = k ? mh_store_fs_open_read(hub->store, k, &fd, &size) : MH_ENOMEM;
    if (rc) {
        store_fail(req, rc, "cannot read");
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
        store_fail(req, MH_ENOMEM, "");
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
