/*
 * s3_stream.c — the s3 backend's streams (include/mh/store.h): the
 * writer, the reader, listings and the sweep of tmp/ leftovers, on top of
 * the transport in s3.c (s3_int.h).
 *
 * Writer: chunks fill one buffer; a full chunk becomes a part: hashed on
 * the thread pool (its SHA-256 is signed as x-amz-content-sha256, and
 * the whole object's hash is updated in the same job), then uploaded
 * with UploadPart while the next chunk fills. The multipart upload
 * (CreateMultipartUpload) goes to a private key tmp/<32 hex> and is made
 * only when the first chunk fills: an object smaller than one chunk is
 * one PUT straight to its final key at finish. At finish the final key
 * is known (the hash): HEAD it; if it exists its bytes are ours by hash,
 * so the multipart upload is aborted; otherwise CompleteMultipartUpload,
 * CopyObject tmp -> final, DeleteObject tmp. Abort and every failure end
 * the same way: AbortMultipartUpload and/or DeleteObject of tmp.
 *
 * Reader: HEAD (the size, and "not found" early), then the plan
 * (store.c), then one ranged GET per window with one more in flight
 * while the consumer holds the current one.
 *
 * Invariants:
 *  - Each stream has at most one transfer or hash job in flight (`st` /
 *    `inflight`), so its buffers and hash are touched in order.
 *  - A stream's struct embeds its op (op.embedded): the transport counts
 *    it pending until mh__s3_stream_complete, which frees it — unless a
 *    deferred callback of the stream is still queued, in which case that
 *    callback frees it ("zombie").
 *  - No user callback runs inside an API call: intermediate callbacks go
 *    through mh__s3_defer, completions through mh__s3_op_finish.
 *  - Only keys matching tmp/<32 lowercase hex> are ever swept.
 */
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "s3_int.h"

#define CONTAINER(ptr, type, member) ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

/* S3 allows 10,000 parts per upload: 80 GB at 8 MiB. */
#define MAX_PARTS 10000

/* A request beyond key and range, described for spec_setup. */
typedef struct {
    const uint8_t *data;
    size_t n;
    const char *payload_hex;
    const char *qn[4], *qv[4];
    const char *copy_src;
    bool bucket;
} spec_t;

static void spec_setup(xfer_t *x, void *arg)
{
    const spec_t *sp = arg;
    x->up_data = sp->data;
    x->up_n = sp->n;
    x->payload_hex[0] = 0;
    if (sp->payload_hex) memcpy(x->payload_hex, sp->payload_hex, 65);
    x->copy_src = sp->copy_src;
    x->bucket_level = sp->bucket;
    for (size_t i = 0; i < 4 && sp->qn[i]; i++)
        if (mh__s3_xfer_query(x, sp->qn[i], sp->qv[i]) != 0) x->setup_err = MH_EINVAL;
}

/* A tmp/ key of ours: "tmp/" + 32 lowercase hex. */
static bool tmp_key_ours(const char *k)
{
    if (strncmp(k, "tmp/", 4) != 0 || strlen(k) != 36) return false;
    for (size_t i = 4; i < 36; i++)
        if (!((k[i] >= '0' && k[i] <= '9') || (k[i] >= 'a' && k[i] <= 'f'))) return false;
    return true;
}

static int new_tmp_key(char out[48])
{
    uint8_t r[16];
    char hex[33];
    if (mh_random(r, sizeof r) != 0) return MH_EIO;
    mh_hex_encode(hex, r, sizeof r);
    snprintf(out, 48, "tmp/%s", hex);
    return 0;
}

/* ============================================================== writer */

typedef enum {
    WS_IDLE,       /* nothing in flight */
    WS_CREATE,     /* CreateMultipartUpload */
    WS_HASH,       /* a part on the thread pool */
    WS_PART,       /* UploadPart */
    WS_SMALL_HASH, /* a one-chunk object on the thread pool */
    WS_SMALL_PUT,  /* its PUT to the final key */
    WS_HEAD_DST,   /* does the final key exist? */
    WS_DROP_MPU,   /* it does: AbortMultipartUpload */
    WS_COMPLETE,   /* CompleteMultipartUpload */
    WS_COPY,       /* CopyObject tmp -> final */
    WS_DELETE_TMP, /* DeleteObject tmp */
    WS_CLEAN_MPU,  /* abort or failure: AbortMultipartUpload */
    WS_CLEAN_TMP,  /* abort or failure: DeleteObject tmp */
} ws_t;

typedef struct {
    struct mh_store_writer head;
    s3_op_t op;
    s3_store_t *s3;
    ws_t st;
    mh_buf_t flight; /* the part being hashed or uploaded (head.fill fills) */
    mh_sha256_t *h;  /* whole object (hash on) */
    char part_hex[65];
    uint8_t sha[32];
    char tmp_key[48];
    char upload_id[512];
    unsigned nparts;
    mh_buf_t parts_xml;
    bool mpu_open, tmp_exists, zombie, small;
    s3_defer_t wdefer;
    uv_work_t work;
} s3_writer_t;

static void w_pump(s3_writer_t *w);

static void w_free(s3_writer_t *w)
{
    mh_buf_free(&w->head.fill);
    mh_buf_free(&w->flight);
    mh_buf_free(&w->parts_xml);
    mh_sha256_free(w->h);
    free(w);
}

static void w_defer_cb(s3_defer_t *d)
{
    s3_writer_t *w = CONTAINER(d, s3_writer_t, wdefer);
    if (w->zombie) w_free(w);
    else if (w->head.aborted) w_pump(w);
    else mh_store_writer_fire(&w->head);
}

static void w_complete(s3_writer_t *w)
{
    s3_store_t *s3 = w->s3;
    int err = w->op.err;
    mh_store_note(&s3->base, MH_STORE_OP_WRITER, w->head.aborted ? MH_ECANCELED : err);
    if (!w->head.aborted) {
        if (!err) s3->base.bytes_written += w->head.size;
        if (!w->head.err) w->head.err = err;
        mh_store_writer_fire(&w->head); /* an outstanding write callback goes first */
        if (w->head.fcb) w->head.fcb(w->head.fud, err, !err && w->head.hash ? w->sha : NULL, w->head.size);
    }
    if (w->wdefer.queued) {
        w->zombie = true;
        return;
    }
    w_free(w);
}

static void w_hash_work(uv_work_t *req)
{
    s3_writer_t *w = req->data;
    const mh_buf_t *b = w->small ? &w->head.fill : &w->flight;
    uint8_t d[32];
    mh_sha256(b->p, b->len, d);
    mh_hex_encode(w->part_hex, d, 32);
    if (w->small) memcpy(w->sha, d, 32); /* one chunk: the part is the object */
    else if (w->h) mh_sha256_update(w->h, b->p, b->len);
}

static void w_hash_after(uv_work_t *req, int status)
{
    s3_writer_t *w = req->data;
    s3_store_t *s3 = w->s3;
    mh__s3_enter(s3, false);
    mh__s3_stream_step(&w->op, NULL, status ? MH_ECANCELED : 0);
    mh__s3_leave(s3, false);
}

static void w_queue_hash(s3_writer_t *w, ws_t st)
{
    w->st = st;
    w->work.data = w;
    uv_queue_work(w->s3->base.loop, &w->work, w_hash_work, w_hash_after);
}

/* The final key: given (checked against the hash when we hashed), or
 * named by the hash. */
static int w_resolve_key(s3_writer_t *w)
{
    char hex[65];
    if (w->head.hash) mh_hex_encode(hex, w->sha, 32);
    if (!w->head.key_given) {
        if (!w->head.hash) return MH_EINVAL;
        snprintf(w->head.key, sizeof w->head.key, "mpacks/%s", hex);
        return 0;
    }
    return w->head.hash && strcmp(w->head.key + 7, hex) != 0 ? MH_EHASH : 0;
}

static void w_submit(s3_writer_t *w, ws_t st, http_kind_t kind, const char *key, spec_t *sp)
{
    w->st = st;
    mh__s3_submit(&w->op, kind, key, spec_setup, sp);
}

static void w_submit_mpu(s3_writer_t *w, ws_t st, http_kind_t kind)
{
    spec_t sp = {.qn = {"uploadId"}, .qv = {w->upload_id}};
    w_submit(w, st, kind, w->tmp_key, &sp);
}

/* Ends a failed or aborted stream: drops what exists in the store, then
 * completes the op. */
static void w_cleanup(s3_writer_t *w)
{
    if (w->mpu_open) {
        w_submit_mpu(w, WS_CLEAN_MPU, H_DELETE);
    } else if (w->tmp_exists) {
        spec_t sp = {0};
        w_submit(w, WS_CLEAN_TMP, H_DELETE, w->tmp_key, &sp);
    } else if (w->head.aborted) {
        mh__s3_op_finish(&w->op, MH_ECANCELED);
    } else if (w->head.finishing) {
        mh__s3_op_finish(&w->op, w->head.err);
    } else if (w->head.wcb) {
        mh__s3_defer(w->s3, &w->wdefer, w_defer_cb);
    }
}

/* Everything is uploaded: name the key, then see whether it exists. */
static void w_final(s3_writer_t *w)
{
    if (w->h) mh_sha256_final(w->h, w->sha);
    int rc = w_resolve_key(w);
    if (rc) {
        w->head.err = rc;
        w_pump(w);
        return;
    }
    spec_t sp = {0};
    w_submit(w, WS_HEAD_DST, H_HEAD, w->head.key, &sp);
}

/* Decides the next step when nothing is in flight. */
static void w_pump(s3_writer_t *w)
{
    if (w->st != WS_IDLE || w->op.state == S_DONE) return;
    if (w->head.aborted || w->head.err) {
        if (!(w->head.aborted && w->wdefer.queued)) w_cleanup(w);
        return;
    }
    if (w->head.fill.len >= w->head.chunk || (w->head.finishing && w->mpu_open && w->head.fill.len > 0)) {
        if (!w->mpu_open) {
            spec_t sp = {.qn = {"uploads"}, .qv = {""}};
            w_submit(w, WS_CREATE, H_POST, w->tmp_key, &sp);
            return;
        }
        if (w->nparts >= MAX_PARTS) {
            mh_warn("store: s3 writer: more than %d parts of %zu bytes", MAX_PARTS, w->head.chunk);
            w->head.err = MH_ELIMIT;
            w_pump(w);
            return;
        }
        mh_store_writer_swap(&w->head, &w->flight);
        w->small = false;
        w_queue_hash(w, WS_HASH);
    } else if (w->head.finishing) {
        if (!w->mpu_open) {
            w->small = true;
            w_queue_hash(w, WS_SMALL_HASH);
        } else {
            w_final(w);
        }
        return;
    }
    if (mh_store_writer_room_due(&w->head)) mh__s3_defer(w->s3, &w->wdefer, w_defer_cb);
}

static int w_add_part(s3_writer_t *w, const xfer_t *x)
{
    if (!x->etag[0]) {
        mh_warn("store: s3 UploadPart %s #%u: no ETag in the answer", w->tmp_key, w->nparts + 1);
        return MH_ESTORE;
    }
    w->nparts++;
    return mh_buf_printf(&w->parts_xml, "<Part><PartNumber>%u</PartNumber><ETag>%s</ETag></Part>", w->nparts,
                         x->etag);
}

static void w_complete_mpu(s3_writer_t *w)
{
    mh_buf_t body = {0};
    int rc = mh_buf_printf(&body, "<CompleteMultipartUpload>%.*s</CompleteMultipartUpload>",
                           (int)w->parts_xml.len, (const char *)w->parts_xml.p);
    if (rc) {
        w->head.err = rc;
        w_pump(w);
        return;
    }
    mh_buf_free(&w->parts_xml);
    w->parts_xml = body; /* the POST body lives until the op ends */
    uint8_t d[32];
    char hex[65];
    mh_sha256(body.p, body.len, d);
    mh_hex_encode(hex, d, 32);
    spec_t sp = {.data = body.p, .n = body.len, .payload_hex = hex, .qn = {"uploadId"}, .qv = {w->upload_id}};
    w_submit(w, WS_COMPLETE, H_POST, w->tmp_key, &sp);
}

/* A store without AbortMultipartUpload (the test emulator) keeps the
 * parts until a bucket lifecycle rule removes them; said once. */
static void w_note_abort(s3_writer_t *w, int err)
{
    if (err && err != MH_ENOENT && !w->s3->no_abort_logged) { /* ENOENT: already gone */
        w->s3->no_abort_logged = true;
        mh_warn("store: s3 AbortMultipartUpload refused (%s): incomplete uploads under tmp/ stay until a bucket "
                "lifecycle rule (AbortIncompleteMultipartUpload) removes them",
                mh_strerror(err));
    }
    w->mpu_open = false;
}

static void w_step(s3_writer_t *w, xfer_t *x, int err)
{
    ws_t st = w->st;
    w->st = WS_IDLE;
    /* Once aborted (or failed), a step only records what now exists in
     * the store; w_pump then cleans up instead of going on. */
    bool stop = w->head.aborted || w->head.err;
    switch (st) {
    case WS_IDLE: break;
    case WS_CREATE:
        if (!err && mh_s3_xml_text((const char *)x->body.p, x->body.len, "UploadId", w->upload_id,
                                   sizeof w->upload_id) != 0) {
            mh_warn("store: s3 CreateMultipartUpload %s: no usable UploadId in the answer", w->tmp_key);
            err = MH_ESTORE;
        }
        if (err) w->head.err = err;
        else w->mpu_open = true;
        break;
    case WS_HASH:
        if (err) {
            w->head.err = err;
            break;
        }
        if (stop) break;
        {
            char num[16];
            snprintf(num, sizeof num, "%u", w->nparts + 1);
            spec_t sp = {.data = w->flight.p, .n = w->flight.len, .payload_hex = w->part_hex,
                         .qn = {"partNumber", "uploadId"}, .qv = {num, w->upload_id}};
            w_submit(w, WS_PART, H_PUT, w->tmp_key, &sp);
        }
        return;
    case WS_PART:
        if (!err) err = w_add_part(w, x);
        if (err) w->head.err = err;
        else w->flight.len = 0;
        break;
    case WS_SMALL_HASH:
        if (!err && !stop) err = w_resolve_key(w);
        if (err) {
            w->head.err = err;
            break;
        }
        if (stop) break;
        {
            spec_t sp = {.data = w->head.fill.p, .n = w->head.fill.len, .payload_hex = w->part_hex};
            w_submit(w, WS_SMALL_PUT, H_PUT, w->head.key, &sp);
        }
        return;
    case WS_SMALL_PUT:
        if (err) {
            w->head.err = err;
            break;
        }
        mh__s3_op_finish(&w->op, 0); /* may free w */
        return;
    case WS_HEAD_DST:
        if (stop) break;
        if (err == 0) { /* the pack exists: same bytes by hash, drop ours */
            w_submit_mpu(w, WS_DROP_MPU, H_DELETE);
            return;
        }
        if (err != MH_ENOENT) {
            w->head.err = err;
            break;
        }
        w_complete_mpu(w);
        return;
    case WS_DROP_MPU:
        w_note_abort(w, err);
        mh__s3_op_finish(&w->op, 0); /* may free w */
        return;
    case WS_COMPLETE:
        if (err) {
            w->head.err = err;
            break;
        }
        w->mpu_open = false;
        w->tmp_exists = true;
        if (stop) break;
        {
            spec_t sp = {.copy_src = w->tmp_key};
            w_submit(w, WS_COPY, H_COPY, w->head.key, &sp);
        }
        return;
    case WS_COPY:
        if (err) {
            w->head.err = err;
            break;
        }
        if (stop) break; /* the copy is in place: a whole pack, harmless */
        {
            spec_t sp = {0};
            w_submit(w, WS_DELETE_TMP, H_DELETE, w->tmp_key, &sp);
        }
        return;
    case WS_DELETE_TMP:
        /* The pack is in place; a temporary left behind is the sweep's. */
        if (err && err != MH_ENOENT)
            mh_warn("store: s3 writer: %s left behind (%s); the tmp sweep removes it", w->tmp_key, mh_strerror(err));
        w->tmp_exists = false;
        mh__s3_op_finish(&w->op, 0); /* may free w */
        return;
    case WS_CLEAN_MPU: w_note_abort(w, err); break;
    case WS_CLEAN_TMP: w->tmp_exists = false; break;
    }
    w_pump(w);
}

int mh__s3_writer_open(mh_store_t *s, size_t chunk, bool hash, mh_store_writer_t **out)
{
    s3_store_t *s3 = (s3_store_t *)s;
    if (s3->closing) return MH_EINVAL;
    s3_writer_t *w = calloc(1, sizeof *w);
    if (!w) return MH_ENOMEM;
    if ((hash && !(w->h = mh_sha256_new())) || new_tmp_key(w->tmp_key) != 0) {
        w_free(w);
        return MH_ENOMEM;
    }
    mh_store_writer_init(&w->head, s, chunk, hash);
    w->s3 = s3;
    mh__s3_op_init(&w->op, s3, OP_WRITER, w);
    w->op.embedded = true;
    w->op.state = S_STREAM;
    *out = &w->head;
    return 0;
}

void mh__s3_writer_pump(mh_store_writer_t *ww)
{
    s3_writer_t *w = (s3_writer_t *)ww;
    s3_store_t *s3 = w->s3;
    mh__s3_enter(s3, true);
    w_pump(w); /* may complete (and free) w: s3 was saved */
    mh__s3_leave(s3, true);
}

/* ============================================================== reader */

/* The head (store_int.h) holds the plan and the two buffers; this adds
 * the transfer in flight. */
typedef struct {
    struct mh_store_reader head;
    s3_op_t op;
    s3_store_t *s3;
    char key[MH_STORE_KEY_MAX + 1];
    mh_range_t single;
    const mh_range_t *ranges;
    size_t nranges; /* sequential: 1 */
    int get_buf;
    bool closed, inflight, zombie;
    s3_defer_t defer;
} s3_reader_t;

static void r_pump(s3_reader_t *r);

static void r_free(s3_reader_t *r)
{
    mh_store_reader_fini(&r->head);
    free(r);
}

/* Hands the next window (or the error) to the consumer; runs deferred. */
static void r_deliver(s3_reader_t *r)
{
    mh_store_reader_t *h = &r->head;
    mh_store_window_t win;
    int k = mh_store_reader_take(h, &win);
    if (k < 0) {
        h->cb(h->ud, k, NULL);
    } else if (k == 1) {
        r_pump(r); /* read ahead before handing the window over */
        h->cb(h->ud, 0, &win);
    }
}

static void r_defer_cb(s3_defer_t *d)
{
    s3_reader_t *r = CONTAINER(d, s3_reader_t, defer);
    if (r->zombie) r_free(r);
    else if (r->closed) r_pump(r);
    else r_deliver(r);
}

static void r_pump(s3_reader_t *r)
{
    mh_store_reader_t *h = &r->head;
    if (r->op.state == S_DONE) return;
    if (r->closed) {
        if (!r->inflight) mh__s3_op_finish(&r->op, 0);
        return;
    }
    if (mh_store_reader_due(h)) mh__s3_defer(r->s3, &r->defer, r_defer_cb);
    if (h->err || r->inflight) return;
    if (!h->planned) {
        r->inflight = true;
        mh__s3_submit(&r->op, H_HEAD, r->key, NULL, NULL);
        return;
    }
    int fb;
    while (h->next_read < h->plan.nruns && (fb = mh_store_reader_free_buf(h)) >= 0) {
        const mh_store_run_t *run = &h->plan.runs[h->next_read];
        if (run->len == 0) { /* nothing to fetch */
            h->buf[fb].len = 0;
            mh_store_reader_filled(h, fb);
            mh__s3_defer(r->s3, &r->defer, r_defer_cb);
            continue;
        }
        r->inflight = true;
        r->get_buf = fb;
        h->bstate[fb] = MH_RBUF_READING;
        uint64_t a[3] = {run->off, run->len, h->next_read};
        mh__s3_submit(&r->op, H_GET, r->key, mh__s3_set_range, a);
        return;
    }
}

static void r_step(s3_reader_t *r, xfer_t *x, int err)
{
    mh_store_reader_t *h = &r->head;
    r->inflight = false;
    if (r->closed) {
        r_pump(r);
        return;
    }
    if (x && x->kind == H_GET) h->bstate[r->get_buf] = MH_RBUF_FREE;
    if (err) {
        if (!h->err) h->err = err;
    } else if (x->kind == H_HEAD) {
        h->size = x->content_length;
        const mh_range_t *rg = r->ranges ? r->ranges : &r->single;
        h->err = mh_store_plan_build(rg, r->nranges, h->size, h->window, &h->plan);
        h->planned = h->err == 0;
    } else if (x->body.len != h->plan.runs[h->next_read].len) {
        h->err = MH_ESTORE; /* shorter than its HEAD said: changed under us */
    } else {
        int b = r->get_buf;
        mh_buf_free(&h->buf[b]);
        h->buf[b] = x->body; /* the GET's own buffer becomes the window */
        x->body = (mh_buf_t){0};
        r->s3->base.bytes_read += h->buf[b].len;
        mh_store_reader_filled(h, b);
    }
    r_pump(r);
}

int mh__s3_reader_open(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n, bool sequential,
                       size_t window, mh_store_window_cb cb, void *ud, mh_store_reader_t **out)
{
    s3_store_t *s3 = (s3_store_t *)s;
    s3_reader_t *r = calloc(1, sizeof *r);
    if (!r) return MH_ENOMEM;
    r->head = (mh_store_reader_t){.s = s, .cb = cb, .ud = ud, .window = window};
    r->s3 = s3;
    if (sequential) r->single = ranges[0], r->nranges = 1;
    else r->ranges = ranges, r->nranges = n;
    mh__s3_enter(s3, true);
    mh__s3_op_init(&r->op, s3, OP_READER, r);
    r->op.embedded = true;
    r->op.state = S_STREAM;
    if (!mh__s3_copy_key(r->key, key) || s3->closing) r->head.err = MH_EINVAL;
    *out = &r->head;
    r_pump(r);
    mh__s3_leave(s3, true);
    return 0;
}

void mh__s3_reader_next(mh_store_reader_t *rr)
{
    s3_reader_t *r = (s3_reader_t *)rr;
    s3_store_t *s3 = r->s3;
    mh__s3_enter(s3, true);
    mh_store_reader_release(rr, true); /* the next GET brings its own buffer */
    if (!r->closed && !rr->done) r_pump(r);
    mh__s3_leave(s3, true);
}

void mh__s3_reader_close(mh_store_reader_t *rr)
{
    s3_reader_t *r = (s3_reader_t *)rr;
    s3_store_t *s3 = r->s3;
    mh__s3_enter(s3, true);
    r->closed = true;
    r_pump(r);
    mh__s3_leave(s3, true);
}

static void r_complete(s3_reader_t *r)
{
    mh_store_note(&r->s3->base, MH_STORE_OP_READER, r->head.err);
    if (r->defer.queued) {
        r->zombie = true;
        return;
    }
    r_free(r);
}

/* ============================================================= listing */

typedef struct {
    s3_op_t op;
    mh_store_list_cb cb;
    void *ud;
    char prefix[16];
    char after[1024];
    mh__s3_page_t page;
} s3_list_t;

/* One ListObjectsV2 page: every <Contents> (key, size, mtime), the last
 * key, and whether more follow. keep() filters which keys are returned;
 * the walk goes on past the others. */
typedef struct {
    char key[1024];
    uint64_t size;
    int64_t mtime;
} obj_t;

static int parse_objects(const mh_buf_t *body, bool (*keep)(const char *key, void *arg), void *arg,
                         void (*add)(const obj_t *o, void *arg), char *last, size_t last_size, bool *more)
{
    const char *p = (const char *)body->p, *end = p + body->len, *in;
    size_t inn;
    char trunc[8] = "";
    *more = false;
    last[0] = 0;
    const char *close_list = NULL;
    if (mh_s3_xml_next(p, end, "ListBucketResult", &in, &inn) == NULL) return MH_ESTORE;
    close_list = in + inn;
    while ((p = mh_s3_xml_next(p, close_list, "Contents", &in, &inn)) != NULL) {
        obj_t o = {0};
        char num[32], tm[40];
        if (mh_s3_xml_text(in, inn, "Key", o.key, sizeof o.key) != 0) return MH_ESTORE;
        snprintf(last, last_size, "%s", o.key);
        if (mh_s3_xml_text(in, inn, "Size", num, sizeof num) == 0) o.size = strtoull(num, NULL, 10);
        if (mh_s3_xml_text(in, inn, "LastModified", tm, sizeof tm) == 0) mh_s3_iso_time(tm, &o.mtime);
        if (keep(o.key, arg)) add(&o, arg);
    }
    const char *lp = (const char *)body->p;
    if (mh_s3_xml_text(lp, body->len, "IsTruncated", trunc, sizeof trunc) == 0) *more = strcmp(trunc, "true") == 0;
    return 0;
}

static bool page_keep(const char *key, void *arg)
{
    const mh__s3_page_t *pg = arg;
    size_t n = strlen(key);
    return pg->n < MH__S3_LIST_PAGE && n <= MH_STORE_KEY_MAX && mh_store_key_valid(key, n) &&
           strncmp(key, pg->prefix, strlen(pg->prefix)) == 0;
}

static void page_add(const obj_t *o, void *arg)
{
    mh__s3_page_t *pg = arg;
    memcpy(pg->names[pg->n], o->key, strlen(o->key) + 1); /* page_keep checked the length */
    pg->entries[pg->n] = (mh_store_entry_t){pg->names[pg->n], o->size, o->mtime};
    pg->n++;
}

int mh__s3_list_page(const mh_buf_t *body, mh__s3_page_t *pg)
{
    pg->n = 0;
    if (!pg->entries) pg->entries = malloc(MH__S3_LIST_PAGE * sizeof *pg->entries);
    if (!pg->names) pg->names = malloc(MH__S3_LIST_PAGE * sizeof *pg->names);
    if (!pg->entries || !pg->names) return MH_ENOMEM;
    return parse_objects(body, page_keep, pg, page_add, pg->next, sizeof pg->next, &pg->more);
}

void mh__s3_page_free(mh__s3_page_t *pg)
{
    free(pg->entries);
    free(pg->names);
    pg->entries = NULL;
    pg->names = NULL;
    pg->n = 0;
}

static void list_step(s3_list_t *l, xfer_t *x, int err)
{
    if (!err) err = mh__s3_list_page(&x->body, &l->page);
    if (err == MH_ESTORE) mh_warn("store: s3 list %s: an answer that is not a ListObjectsV2 result", l->prefix);
    mh__s3_op_finish(&l->op, err);
}

static void list_complete(s3_list_t *l)
{
    int err = l->op.err;
    mh_store_note(&l->op.s3->base, MH_STORE_OP_LIST, err);
    const mh__s3_page_t *pg = &l->page;
    l->cb(l->ud, err, err ? NULL : pg->entries, err ? 0 : pg->n, !err && pg->more && pg->next[0] ? pg->next : NULL);
    mh__s3_page_free(&l->page);
    free(l);
}

void mh__s3_list(mh_store_t *s, const char *prefix, const char *after, mh_store_list_cb cb, void *ud)
{
    s3_store_t *s3 = (s3_store_t *)s;
    mh__s3_enter(s3, true);
    s3_list_t *l = calloc(1, sizeof *l);
    if (!l) {
        mh_error("store: s3: out of memory queuing a listing");
        abort();
    }
    l->cb = cb;
    l->ud = ud;
    mh__s3_op_init(&l->op, s3, OP_LIST, l);
    l->op.embedded = true;
    l->op.state = S_STREAM;
    if (!prefix || (strcmp(prefix, "mpacks/") != 0 && strcmp(prefix, "incoming/") != 0) ||
        (after && strlen(after) >= sizeof l->after)) {
        mh__s3_op_finish(&l->op, MH_EINVAL);
    } else {
        snprintf(l->prefix, sizeof l->prefix, "%s", prefix);
        l->page.prefix = l->prefix;
        if (after) snprintf(l->after, sizeof l->after, "%s", after);
        spec_t sp = {.bucket = true,
                     .qn = {"list-type", "prefix", "max-keys", after ? "start-after" : NULL},
                     .qv = {"2", l->prefix, "1000", l->after}};
        mh__s3_submit(&l->op, H_GET, NULL, spec_setup, &sp);
    }
    mh__s3_leave(s3, true);
}

/* =============================================================== sweep */

/* Lists tmp/ page by page deleting objects older than the cutoff, then
 * lists incomplete multipart uploads under tmp/ and aborts the old ones
 * (a store that cannot list them, like the test emulator, skips that
 * part: bucket lifecycle rules cover it, docs/operations.md). */
typedef enum { SW_LIST, SW_DELETE, SW_UPLOADS, SW_ABORT } sw_t;

typedef struct {
    s3_op_t op;
    mh_store_count_cb cb;
    void *ud;
    sw_t st;
    int64_t cutoff;
    char after[1024];
    bool more;
    char (*keys)[48];
    char (*ids)[512];
    size_t n, next;
    unsigned removed;
} s3_sweep_t;

static bool sweep_keep(const char *key, void *arg)
{
    (void)key;
    (void)arg;
    return true;
}

static void sweep_add(const obj_t *o, void *arg)
{
    s3_sweep_t *w = arg;
    if (w->n < MH__S3_LIST_PAGE && tmp_key_ours(o->key) && o->mtime > 0 && o->mtime < w->cutoff)
        memcpy(w->keys[w->n++], o->key, 37); /* tmp_key_ours: 36 characters */
}

static void sweep_list(s3_sweep_t *w)
{
    w->st = SW_LIST;
    spec_t sp = {.bucket = true,
                 .qn = {"list-type", "prefix", "max-keys", w->after[0] ? "start-after" : NULL},
                 .qv = {"2", "tmp/", "1000", w->after}};
    mh__s3_submit(&w->op, H_GET, NULL, spec_setup, &sp);
}

static void sweep_uploads(s3_sweep_t *w)
{
    w->st = SW_UPLOADS;
    w->n = w->next = 0;
    spec_t sp = {.bucket = true, .qn = {"uploads", "prefix"}, .qv = {"", "tmp/"}};
    mh__s3_submit(&w->op, H_GET, NULL, spec_setup, &sp);
}

/* Deletes (or aborts) the next collected item, or moves on. */
static void sweep_next(s3_sweep_t *w)
{
    if (w->next < w->n) {
        size_t i = w->next++;
        spec_t sp = {0};
        if (w->st == SW_ABORT) {
            sp.qn[0] = "uploadId";
            sp.qv[0] = w->ids[i];
        }
        mh__s3_submit(&w->op, H_DELETE, w->keys[i], spec_setup, &sp);
        return;
    }
    if (w->st == SW_DELETE && w->more) {
        w->n = w->next = 0;
        sweep_list(w);
    } else if (w->st == SW_DELETE) {
        sweep_uploads(w);
    } else {
        mh__s3_op_finish(&w->op, 0);
    }
}

static void sweep_parse_uploads(s3_sweep_t *w, const mh_buf_t *body)
{
    const char *p = (const char *)body->p, *end = p + body->len, *in;
    size_t inn;
    while (w->n < MH__S3_LIST_PAGE && (p = mh_s3_xml_next(p, end, "Upload", &in, &inn)) != NULL) {
        char key[64], id[512], tm[40];
        int64_t t = 0;
        if (mh_s3_xml_text(in, inn, "Key", key, sizeof key) != 0 || !tmp_key_ours(key)) continue;
        if (mh_s3_xml_text(in, inn, "UploadId", id, sizeof id) != 0) continue;
        if (mh_s3_xml_text(in, inn, "Initiated", tm, sizeof tm) != 0 || mh_s3_iso_time(tm, &t) != 0) continue;
        if (t >= w->cutoff) continue;
        memcpy(w->keys[w->n], key, 37);
        snprintf(w->ids[w->n], 512, "%s", id);
        w->n++;
    }
}

static void sweep_step(s3_sweep_t *w, xfer_t *x, int err)
{
    switch (w->st) {
    case SW_LIST: {
        char last[1024];
        if (!err) err = parse_objects(&x->body, sweep_keep, w, sweep_add, last, sizeof last, &w->more);
        if (err) {
            mh__s3_op_finish(&w->op, err);
            return;
        }
        snprintf(w->after, sizeof w->after, "%s", last);
        if (!last[0]) w->more = false;
        w->st = SW_DELETE;
        sweep_next(w);
        return;
    }
    case SW_DELETE:
    case SW_ABORT:
        if (!err || err == MH_ENOENT) w->removed++;
        else mh_warn("store: s3 sweep: %s: %s", x->key, mh_strerror(err));
        sweep_next(w);
        return;
    case SW_UPLOADS:
        if (err) {
            mh_debug("store: s3 sweep: cannot list incomplete uploads (%s): left to lifecycle rules", mh_strerror(err));
            mh__s3_op_finish(&w->op, 0);
            return;
        }
        sweep_parse_uploads(w, &x->body);
        w->st = SW_ABORT;
        sweep_next(w);
        return;
    }
}

static void sweep_complete(s3_sweep_t *w)
{
    int err = w->op.err;
    s3_store_t *s3 = w->op.s3;
    mh_store_note(&s3->base, MH_STORE_OP_SWEEP_TMP, err);
    if (w->removed) mh_info("store: s3 sweep removed %u stale temporaries under tmp/", w->removed);
    w->cb(w->ud, err, w->removed);
    free(w->keys);
    free(w->ids);
    free(w);
}

void mh__s3_sweep_tmp(mh_store_t *s, uint32_t older_than_s, mh_store_count_cb cb, void *ud)
{
    s3_store_t *s3 = (s3_store_t *)s;
    mh__s3_enter(s3, true);
    s3_sweep_t *w = calloc(1, sizeof *w);
    if (w) {
        w->keys = malloc(MH__S3_LIST_PAGE * sizeof *w->keys);
        w->ids = malloc(MH__S3_LIST_PAGE * sizeof *w->ids);
    }
    if (!w || !w->keys || !w->ids) {
        mh_error("store: s3: out of memory queuing a sweep");
        abort();
    }
    w->cb = cb;
    w->ud = ud;
    w->cutoff = mh_unix_time() - (int64_t)older_than_s;
    mh__s3_op_init(&w->op, s3, OP_SWEEP, w);
    w->op.embedded = true;
    w->op.state = S_STREAM;
    sweep_list(w);
    mh__s3_leave(s3, true);
}

/* ========================================================== dispatch */

void mh__s3_stream_step(s3_op_t *op, xfer_t *x, int err)
{
    switch (op->kind) {
    case OP_WRITER: w_step(CONTAINER(op, s3_writer_t, op), x, err); break;
    case OP_READER: r_step(CONTAINER(op, s3_reader_t, op), x, err); break;
    case OP_LIST: list_step(CONTAINER(op, s3_list_t, op), x, err); break;
    case OP_SWEEP: sweep_step(CONTAINER(op, s3_sweep_t, op), x, err); break;
    default: break;
    }
}

void mh__s3_stream_complete(s3_op_t *op)
{
    switch (op->kind) {
    case OP_WRITER: w_complete(CONTAINER(op, s3_writer_t, op)); break;
    case OP_READER: r_complete(CONTAINER(op, s3_reader_t, op)); break;
    case OP_LIST: list_complete(CONTAINER(op, s3_list_t, op)); break;
    case OP_SWEEP: sweep_complete(CONTAINER(op, s3_sweep_t, op)); break;
    default: break;
    }
}
