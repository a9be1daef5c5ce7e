/*
 * storetest.h — synchronous wrappers over the asynchronous store API for
 * the store unit tests (fs and s3): each starts one operation, runs the
 * loop until its callback fired, and checks the interface's promises:
 * the callback fires exactly once and never inside the starting call.
 * A broken promise returns STORETEST_BROKEN, which no MH_E* code equals.
 */
#ifndef MH_STORETEST_H
#define MH_STORETEST_H

#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "mh/store.h"

#define STORETEST_BROKEN (-99999)

static uv_loop_t *loop;

typedef struct {
    int done;
    int err;
    bool reentrant; /* the callback ran inside the starting call */
    mh_buf_t buf;
    uint64_t size;
} res_t;

static bool in_call; /* true while a store call is on the stack */

static void get_cb(void *ud, int err, mh_buf_t *d)
{
    res_t *r = ud;
    r->done++;
    r->err = err;
    r->reentrant |= in_call;
    if (d) r->buf = *d; /* take the bytes */
}

static void done_cb(void *ud, int err)
{
    res_t *r = ud;
    r->done++;
    r->err = err;
    r->reentrant |= in_call;
}

static void head_cb(void *ud, int err, uint64_t size)
{
    res_t *r = ud;
    r->done++;
    r->err = err;
    r->size = size;
    r->reentrant |= in_call;
}

static void wait_for(res_t *r)
{
    while (!r->done) uv_run(loop, UV_RUN_ONCE);
}

#define CALL(expr)                                                                                                   \
    do {                                                                                                             \
        in_call = true;                                                                                              \
        expr;                                                                                                        \
        in_call = false;                                                                                             \
    } while (0)

static int finish(res_t *r, mh_buf_t *out)
{
    wait_for(r);
    if (out) *out = r->buf;
    else mh_buf_free(&r->buf);
    return r->done == 1 && !r->reentrant ? r->err : STORETEST_BROKEN;
}

static int do_get(mh_store_t *s, const char *key, uint64_t off, uint64_t len, mh_buf_t *out)
{
    res_t r = {0};
    CALL(mh_store_get(s, key, off, len, get_cb, &r));
    return finish(&r, out);
}

static int do_ranges(mh_store_t *s, const char *key, const mh_range_t *rg, size_t n, mh_buf_t *out)
{
    res_t r = {0};
    CALL(mh_store_get_ranges(s, key, rg, n, get_cb, &r));
    return finish(&r, out);
}

static int do_put(mh_store_t *s, const char *key, const void *data, size_t n)
{
    res_t r = {0};
    CALL(mh_store_put(s, key, data, n, done_cb, &r));
    return finish(&r, NULL);
}

static int do_move(mh_store_t *s, const char *src, const char *dst)
{
    res_t r = {0};
    CALL(mh_store_move(s, src, dst, done_cb, &r));
    return finish(&r, NULL);
}

static int do_delete(mh_store_t *s, const char *key)
{
    res_t r = {0};
    CALL(mh_store_delete(s, key, done_cb, &r));
    return finish(&r, NULL);
}

static int do_head(mh_store_t *s, const char *key, uint64_t *size)
{
    res_t r = {0};
    CALL(mh_store_head(s, key, head_cb, &r));
    int rc = finish(&r, NULL);
    if (size) *size = r.size;
    return rc;
}

/* ------------------------------------------------------------ streams */

typedef struct {
    int done, err;
    bool reentrant;
    uint8_t sha[32];
    bool has_sha;
    uint64_t size;
} wres_t;

static inline void wfinish_cb(void *ud, int err, const uint8_t *sha, uint64_t size)
{
    wres_t *r = ud;
    r->done++;
    r->err = err;
    r->reentrant |= in_call;
    r->has_sha = sha != NULL;
    if (sha) memcpy(r->sha, sha, 32);
    r->size = size;
}

/* Writes data[0..n) in pieces of `piece` bytes, waiting for each write's
 * callback (the backpressure protocol); returns the first error. */
static inline int write_all(mh_store_writer_t *w, const uint8_t *data, size_t n, size_t piece)
{
    for (size_t off = 0; off < n;) {
        size_t k = n - off < piece ? n - off : piece;
        res_t r = {0};
        in_call = true;
        int rc = mh_store_writer_write(w, data + off, k, done_cb, &r);
        in_call = false;
        if (rc) return rc;
        wait_for(&r);
        if (r.done != 1 || r.reentrant) return STORETEST_BROKEN;
        if (r.err) return r.err;
        off += k;
    }
    return 0;
}

static inline int finish_writer(mh_store_writer_t *w, const char *key, wres_t *out)
{
    memset(out, 0, sizeof *out);
    CALL(mh_store_writer_finish(w, key, wfinish_cb, out));
    while (!out->done) uv_run(loop, UV_RUN_ONCE);
    return out->done == 1 && !out->reentrant ? out->err : STORETEST_BROKEN;
}

/* A whole stream: open, write in pieces, finish. */
static inline int stream_object(mh_store_t *s, bool hash, size_t chunk, const uint8_t *data, size_t n, size_t piece,
                         const char *key, wres_t *out)
{
    mh_store_writer_opts_t o = {.hash = hash, .chunk_bytes = chunk};
    mh_store_writer_t *w = NULL;
    memset(out, 0, sizeof *out);
    int rc = mh_store_writer_open(s, &o, &w);
    if (rc) return rc;
    rc = write_all(w, data, n, piece);
    if (rc) {
        mh_store_writer_abort(w);
        return rc;
    }
    return finish_writer(w, key, out);
}

/* Drives a reader to its end: concatenates the windows (sequential) or
 * appends every piece to per-range buffers (ranged, outs[index]), checks
 * the promises (in order, last flag on the final window only, never
 * re-entrant) and counts windows. */
typedef struct {
    mh_store_reader_t *r;
    int err, windows, errors;
    bool reentrant, last_seen, order_ok, broken;
    uint64_t next_off;
    size_t max_window;
    mh_buf_t all;
    mh_buf_t *outs; /* ranged: one per range */
    size_t nouts;
    uint64_t size;
    int close_after; /* > 0: close inside the callback of that window */
    bool closed;
} rdrive_t;

static inline void rwin_cb(void *ud, int err, const mh_store_window_t *w)
{
    rdrive_t *d = ud;
    d->reentrant |= in_call;
    if (d->last_seen || d->closed) d->broken = true;
    if (err) {
        d->err = err;
        d->errors++;
        return;
    }
    d->windows++;
    d->size = w->size;
    if (w->n > d->max_window) d->max_window = w->n;
    if (!d->outs && d->windows > 1 && w->off != d->next_off) d->order_ok = false;
    d->next_off = w->off + w->n;
    if (!d->outs) mh_buf_append(&d->all, w->p, w->n);
    for (size_t i = 0; d->outs && i < w->npieces; i++) {
        const mh_store_piece_t *pc = &w->pieces[i];
        if (pc->index >= d->nouts || pc->at != d->outs[pc->index].len) d->order_ok = false;
        else mh_buf_append(&d->outs[pc->index], pc->p, pc->n);
    }
    d->last_seen = w->last;
    if (d->close_after && d->windows == d->close_after) {
        d->closed = true;
        mh_store_reader_close(d->r);
        return;
    }
    if (!w->last) {
        in_call = true;
        mh_store_reader_next(d->r);
        in_call = false;
    }
}

static inline int drive_reader(rdrive_t *d)
{
    d->order_ok = true;
    while (!d->err && !d->last_seen && !d->closed) uv_run(loop, UV_RUN_ONCE);
    if (!d->closed) mh_store_reader_close(d->r);
    if (d->reentrant || d->broken || !d->order_ok || d->errors > 1) return STORETEST_BROKEN;
    return d->err;
}

static inline int read_seq(mh_store_t *s, const char *key, uint64_t off, uint64_t len, size_t window, rdrive_t *d)
{
    int close_after = d->close_after;
    memset(d, 0, sizeof *d);
    d->close_after = close_after;
    in_call = true;
    int rc = mh_store_reader_open(s, key, off, len, window, rwin_cb, d, &d->r);
    in_call = false;
    if (rc) return rc;
    return drive_reader(d);
}

static inline int read_ranges(mh_store_t *s, const char *key, const mh_range_t *rg, size_t n, size_t window, rdrive_t *d)
{
    memset(d, 0, sizeof *d);
    d->outs = calloc(n ? n : 1, sizeof *d->outs);
    d->nouts = n;
    in_call = true;
    int rc = mh_store_reader_open_ranges(s, key, rg, n, window, rwin_cb, d, &d->r);
    in_call = false;
    if (rc) return rc;
    return drive_reader(d);
}

/* True when every range's bytes arrived whole and right. */
static inline bool ranges_match(const rdrive_t *d, const uint8_t *data, const mh_range_t *rg, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (d->outs[i].len != rg[i].len || (rg[i].len && memcmp(d->outs[i].p, data + rg[i].off, rg[i].len) != 0))
            return false;
    return true;
}

static inline void rdrive_free(rdrive_t *d)
{
    mh_buf_free(&d->all);
    for (size_t i = 0; d->outs && i < d->nouts; i++) mh_buf_free(&d->outs[i]);
    free(d->outs);
    d->outs = NULL;
}

typedef struct {
    int done, err;
    size_t n;
    char keys[1000][80];
    uint64_t sizes[1000];
    int64_t mtimes[1000];
    char next[80];
    bool has_next;
} lres_t;

static inline void list_cb(void *ud, int err, const mh_store_entry_t *e, size_t n, const char *next)
{
    lres_t *r = ud;
    r->done++;
    r->err = err;
    r->n = n;
    for (size_t i = 0; i < n && i < 1000; i++) {
        snprintf(r->keys[i], sizeof r->keys[i], "%s", e[i].key);
        r->sizes[i] = e[i].size;
        r->mtimes[i] = e[i].mtime;
    }
    r->has_next = next != NULL;
    if (next) snprintf(r->next, sizeof r->next, "%s", next);
}

/* r is large (80 KB): callers keep it static or on the heap. */
static inline int do_list(mh_store_t *s, const char *prefix, const char *after, lres_t *r)
{
    memset(r, 0, sizeof *r);
    CALL(mh_store_list(s, prefix, after, list_cb, r));
    while (!r->done) uv_run(loop, UV_RUN_ONCE);
    return r->done == 1 ? r->err : STORETEST_BROKEN;
}

typedef struct {
    int done, err;
    unsigned removed;
} cres_t;

static inline void count_cb(void *ud, int err, unsigned removed)
{
    cres_t *r = ud;
    r->done++;
    r->err = err;
    r->removed = removed;
}

static inline int do_sweep_tmp(mh_store_t *s, uint32_t older_than_s, unsigned *removed)
{
    cres_t r = {0};
    CALL(mh_store_sweep_tmp(s, older_than_s, count_cb, &r));
    while (!r.done) uv_run(loop, UV_RUN_ONCE);
    if (removed) *removed = r.removed;
    return r.done == 1 ? r.err : STORETEST_BROKEN;
}

#endif
