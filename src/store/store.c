/*
 * store.c — the object store front: parses MUSEHUB_STORE, opens the
 * backend named by it, dispatches every call through the backend's vtable
 * (store_int.h), validates keys, and keeps the Prometheus counters all
 * backends share. It also holds what both backends' streams share: the
 * writer's front (argument checks, the filling chunk, the write
 * callback), the reader's head (window delivery from two buffers) and the
 * read plans that turn ranges into windows.
 *
 * Invariants:
 *  - This file never calls a user callback itself: backends own the
 *    "exactly once, on a later loop turn" rule (DESIGN 3), including for
 *    errors found before any I/O, so the front stays a thin switch.
 *  - Adding a backend = one row in `backends[]` plus its open function.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "store_int.h"

/* ------------------------------------------------------------------ keys */

static bool is_lower_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

static bool is_id_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

static bool has_prefix(const char *p, size_t n, const char *lit, size_t litn)
{
    return n >= litn && memcmp(p, lit, litn) == 0;
}

bool mh_store_key_is_staging(const char *key, size_t n)
{
    static const char pre[] = "incoming/";
    const size_t pn = sizeof(pre) - 1;
    if (!key || !has_prefix(key, n, pre, pn)) return false;
    size_t idn = n - pn;
    if (idn < 1 || idn > 64) return false;
    for (size_t i = pn; i < n; i++)
        if (!is_id_char(key[i])) return false;
    return true;
}

bool mh_store_staging_key_valid(const char *key)
{
    return key && mh_store_key_is_staging(key, strnlen(key, MH_STORE_KEY_MAX + 1));
}

/* A whitelist, not a blacklist: nothing else ('.', '/', '%', NUL, upper
 * hex in pack keys) can reach a path or an URL, so "..", encoded slashes
 * and alternate spellings of the same pack are all refused here. */
bool mh_store_key_valid(const char *key, size_t n)
{
    static const char pre[] = "mpacks/";
    const size_t pn = sizeof(pre) - 1;
    if (!key) return false;
    if (has_prefix(key, n, pre, pn)) {
        if (n != pn + 64) return false;
        for (size_t i = pn; i < n; i++)
            if (!is_lower_hex(key[i])) return false;
        return true;
    }
    return mh_store_key_is_staging(key, n);
}

/* --------------------------------------------------------------- metrics */

static const char *const op_names[MH_STORE_OP_COUNT_] = {
    "get",      "get_ranges", "put",    "move",   "delete", "head",      "presign",
    "check_url", "upload",    "open_read", "writer", "reader", "list", "sweep_tmp",
};
static const char *const res_names[MH_STORE_RES_COUNT_] = {"ok", "not_found", "rejected", "error"};

mh_store_res_t mh_store_res_of(int err)
{
    switch (err) {
    case 0: return MH_STORE_RES_OK;
    case MH_ENOENT: return MH_STORE_RES_NOT_FOUND;
    case MH_EINVAL:
    case MH_EEXIST:
    case MH_EHASH:
    case MH_ELIMIT:
    case MH_EAUTH:
    case MH_ETIMEDOUT:
    case MH_ECANCELED: return MH_STORE_RES_REJECTED;
    default: return MH_STORE_RES_ERROR;
    }
}

void mh_store_note(mh_store_t *s, mh_store_op_t op, int err)
{
    if ((unsigned)op < MH_STORE_OP_COUNT_) s->ops_total[op][mh_store_res_of(err)]++;
}

int mh_store_metrics_write(mh_store_t *s, mh_buf_t *out)
{
    int rc = mh_buf_append_str(out, "# HELP musehub_store_operations_total Object store operations by kind and "
                                    "result.\n# TYPE musehub_store_operations_total counter\n");
    for (int o = 0; o < MH_STORE_OP_COUNT_ && rc == 0; o++)
        for (int r = 0; r < MH_STORE_RES_COUNT_ && rc == 0; r++)
            rc = mh_buf_printf(out, "musehub_store_operations_total{backend=\"%s\",op=\"%s\",result=\"%s\"} %" PRIu64 "\n",
                               s->ops->kind, op_names[o], res_names[r], s->ops_total[o][r]);
    if (rc == 0)
        rc = mh_buf_printf(out,
                           "# HELP musehub_store_bytes_read_total Bytes read from the object store.\n"
                           "# TYPE musehub_store_bytes_read_total counter\n"
                           "musehub_store_bytes_read_total{backend=\"%s\"} %" PRIu64 "\n"
                           "# HELP musehub_store_bytes_written_total Bytes written to the object store.\n"
                           "# TYPE musehub_store_bytes_written_total counter\n"
                           "musehub_store_bytes_written_total{backend=\"%s\"} %" PRIu64 "\n",
                           s->ops->kind, s->bytes_read, s->ops->kind, s->bytes_written);
    return rc;
}

/* -------------------------------------------------------- open and close */

typedef int (*backend_open_fn)(uv_loop_t *loop, const mh_store_config_t *cfg, const char *arg, mh_store_t **out);

static const struct {
    const char *prefix; /* in MUSEHUB_STORE, with the colon */
    backend_open_fn open; /* NULL: recognised but not built into this binary */
} backends[] = {
    {"fs:", mh_store_fs_open},
    {"s3:", mh_store_s3_open},
};

int mh_store_open(uv_loop_t *loop, const mh_store_config_t *cfg, mh_store_t **out)
{
    *out = NULL;
    const char *spec = cfg ? cfg->spec : NULL;
    if (!loop || !spec) return MH_EINVAL;
    for (size_t i = 0; i < sizeof(backends) / sizeof(backends[0]); i++) {
        size_t pn = strlen(backends[i].prefix);
        if (strncmp(spec, backends[i].prefix, pn) != 0) continue;
        const char *arg = spec + pn;
        if (!*arg) {
            mh_error("store: MUSEHUB_STORE=\"%s\" names no %s", spec, spec[0] == 'f' ? "directory" : "bucket");
            return MH_EINVAL;
        }
        if (!backends[i].open) {
            mh_error("store: %.2s backend not built yet (MUSEHUB_STORE=\"%s\")", backends[i].prefix, spec);
            return MH_EINVAL;
        }
        return backends[i].open(loop, cfg, arg, out);
    }
    mh_error("store: MUSEHUB_STORE=\"%s\" is neither fs:<dir> nor s3:<bucket>", spec);
    return MH_EINVAL;
}

void mh_store_close(mh_store_t *s)
{
    if (s) s->ops->close(s);
}

const char *mh_store_kind(const mh_store_t *s)
{
    return s->ops->kind;
}

/* -------------------------------------------------------------- dispatch */

void mh_store_get(mh_store_t *s, const char *key, uint64_t off, uint64_t len, mh_store_get_cb cb, void *ud)
{
    s->ops->get(s, key, off, len, cb, ud);
}

void mh_store_get_ranges(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n, mh_store_get_cb cb,
                         void *ud)
{
    s->ops->get_ranges(s, key, ranges, n, cb, ud);
}

void mh_store_put(mh_store_t *s, const char *key, const void *data, size_t n, mh_store_done_cb cb, void *ud)
{
    s->ops->put(s, key, data, n, cb, ud);
}

void mh_store_move(mh_store_t *s, const char *src, const char *dst, mh_store_done_cb cb, void *ud)
{
    s->ops->move(s, src, dst, cb, ud);
}

void mh_store_delete(mh_store_t *s, const char *key, mh_store_done_cb cb, void *ud)
{
    s->ops->del(s, key, cb, ud);
}

void mh_store_head(mh_store_t *s, const char *key, mh_store_head_cb cb, void *ud)
{
    s->ops->head(s, key, cb, ud);
}

int mh_store_presign(mh_store_t *s, mh_arena_t *a, const char *method, const char *key, uint64_t size,
                     const uint8_t *sha256, uint32_t ttl_s, char **url)
{
    *url = NULL;
    int rc;
    if (!method || (strcmp(method, "GET") != 0 && strcmp(method, "PUT") != 0) || !key ||
        !mh_store_key_valid(key, strlen(key)) || (strcmp(method, "PUT") == 0 && !sha256))
        rc = MH_EINVAL;
    else
        rc = s->ops->presign(s, a, method, key, size, sha256, ttl_s < 1 ? 1 : ttl_s > 604800 ? 604800 : ttl_s, url);
    mh_store_note(s, MH_STORE_OP_PRESIGN, rc);
    return rc;
}

/* --------------------------------------------------------------- streams */

size_t mh_store_writer_mem(const mh_store_t *s, const mh_store_writer_opts_t *o)
{
    size_t c = o && o->chunk_bytes ? o->chunk_bytes : s->ops->writer_chunk_default;
    if (c < s->ops->writer_chunk_min) c = s->ops->writer_chunk_min;
    return 2 * c;
}

int mh_store_writer_open(mh_store_t *s, const mh_store_writer_opts_t *o, mh_store_writer_t **out)
{
    *out = NULL;
    size_t c = o && o->chunk_bytes ? o->chunk_bytes : s->ops->writer_chunk_default;
    if (c > MH_STORE_WINDOW_MAX) return MH_EINVAL;
    if (c < s->ops->writer_chunk_min) c = s->ops->writer_chunk_min;
    return s->ops->writer_open(s, c, o && o->hash, out);
}

void mh_store_writer_init(mh_store_writer_t *w, mh_store_t *s, size_t chunk, bool hash)
{
    w->s = s;
    w->chunk = chunk;
    w->hash = hash;
    w->limit = UINT64_MAX;
}

int mh_store_writer_write(mh_store_writer_t *w, const void *data, size_t n, mh_store_done_cb cb, void *ud)
{
    if ((n && !data) || w->finishing || w->aborted || (cb && w->wcb)) return MH_EINVAL;
    if (w->err) return w->err;
    if (n > w->limit - w->size) return w->err = MH_ELIMIT;
    if (n) {
        /* A chunk's buffer is reserved whole the first time, so appends
         * never reallocate (and the two buffers are all a writer holds). */
        size_t want = w->fill.len + n > w->chunk ? w->fill.len + n : w->chunk;
        if (w->fill.cap < want && mh_buf_reserve(&w->fill, want - w->fill.len) != 0) return w->err = MH_ENOMEM;
        memcpy(w->fill.p + w->fill.len, data, n);
        w->fill.len += n;
        w->size += n;
    }
    if (cb) {
        w->wcb = cb;
        w->wud = ud;
    }
    w->s->ops->writer_pump(w);
    return 0;
}

bool mh_store_writer_full(const mh_store_writer_t *w)
{
    return !w->err && w->fill.len >= w->chunk;
}

uint64_t mh_store_writer_size(const mh_store_writer_t *w)
{
    return w->size;
}

bool mh_store_writer_room_due(const mh_store_writer_t *w)
{
    return w->wcb && (w->err || w->fill.len < w->chunk);
}

void mh_store_writer_fire(mh_store_writer_t *w)
{
    if (!mh_store_writer_room_due(w)) return;
    mh_store_done_cb cb = w->wcb;
    w->wcb = NULL;
    cb(w->wud, w->err);
}

void mh_store_writer_swap(mh_store_writer_t *w, mh_buf_t *flight)
{
    mh_buf_t t = w->fill;
    w->fill = *flight;
    *flight = t;
}

/* The destination: a content-addressed key, or none when the writer
 * hashes (the hash names it); an fs upload's was fixed at open. */
static int finish_key(mh_store_writer_t *w, const char *key)
{
    if (w->key_fixed) return key ? MH_EINVAL : 0;
    if (!key) return w->hash ? 0 : MH_EINVAL;
    size_t kn = strnlen(key, MH_STORE_KEY_MAX + 1);
    if (kn > MH_STORE_KEY_MAX || !mh_store_key_valid(key, kn) || key[0] != 'm') return MH_EINVAL;
    memcpy(w->key, key, kn + 1);
    w->key_given = true;
    return 0;
}

void mh_store_writer_finish(mh_store_writer_t *w, const char *key, mh_store_writer_done_cb cb, void *ud)
{
    w->fcb = cb;
    w->fud = ud;
    w->finishing = true;
    int rc = finish_key(w, key);
    if (rc && !w->err) w->err = rc;
    /* An upload must be exactly the signed length. */
    if (!w->err && w->limit != UINT64_MAX && w->size != w->limit) w->err = MH_EHASH;
    w->s->ops->writer_pump(w);
}

void mh_store_writer_abort(mh_store_writer_t *w)
{
    if (!w) return;
    w->aborted = true;
    w->wcb = NULL;
    w->fcb = NULL;
    w->s->ops->writer_pump(w);
}

static size_t clamp_window(size_t window)
{
    if (window == 0) return MH_STORE_WINDOW_DEFAULT;
    if (window < MH_STORE_WINDOW_MIN) return MH_STORE_WINDOW_MIN;
    return window > MH_STORE_WINDOW_MAX ? MH_STORE_WINDOW_MAX : window;
}

size_t mh_store_reader_mem(size_t window)
{
    return 2 * clamp_window(window);
}

int mh_store_reader_open(mh_store_t *s, const char *key, uint64_t off, uint64_t len, size_t window,
                         mh_store_window_cb cb, void *ud, mh_store_reader_t **out)
{
    mh_range_t r = {off, len};
    *out = NULL;
    return s->ops->reader_open(s, key, &r, 1, true, clamp_window(window), cb, ud, out);
}

int mh_store_reader_open_ranges(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n, size_t window,
                                mh_store_window_cb cb, void *ud, mh_store_reader_t **out)
{
    *out = NULL;
    if (n && !ranges) return MH_EINVAL;
    return s->ops->reader_open(s, key, ranges, n, false, clamp_window(window), cb, ud, out);
}

void mh_store_reader_next(mh_store_reader_t *r)
{
    r->s->ops->reader_next(r);
}

void mh_store_reader_close(mh_store_reader_t *r)
{
    if (r) r->s->ops->reader_close(r);
}

void mh_store_list(mh_store_t *s, const char *prefix, const char *after, mh_store_list_cb cb, void *ud)
{
    s->ops->list(s, prefix, after, cb, ud);
}

void mh_store_sweep_tmp(mh_store_t *s, uint32_t older_than_s, mh_store_count_cb cb, void *ud)
{
    s->ops->sweep_tmp(s, older_than_s, cb, ud);
}

/* ------------------------------------------------------------ read plans */

void mh_store_plan_free(mh_store_plan_t *p)
{
    free(p->runs);
    free(p->pieces);
    memset(p, 0, sizeof *p);
}

/* Grows an array of `size`-byte elements to hold one more. */
static int grow(void **arr, size_t n, size_t *cap, size_t size)
{
    if (n < *cap) return 0;
    size_t nc = *cap ? 2 * *cap : 16;
    void *na = realloc(*arr, nc * size);
    if (!na) return MH_ENOMEM;
    *arr = na;
    *cap = nc;
    return 0;
}

int mh_store_plan_build(const mh_range_t *ranges, size_t n, uint64_t size, size_t window, mh_store_plan_t *out)
{
    memset(out, 0, sizeof *out);
    size_t rcap = 0, pcap = 0;
    mh_store_run_t *cur = NULL;
    int rc = 0;
    for (size_t k = 0; k < n && rc == 0; k++) {
        uint64_t off = ranges[k].off, len = ranges[k].len;
        if (off > size || (len != UINT64_MAX && len > size - off)) {
            rc = MH_EINVAL;
            break;
        }
        if (len == UINT64_MAX) len = size - off;
        uint64_t pos = 0;
        do {
            uint64_t st = off + pos, rem = len - pos, take;
            uint64_t cur_end = cur ? cur->off + cur->len : 0;
            if (cur && st >= cur->off && st <= cur_end + MH_STORE_RANGE_GAP && st - cur->off < window) {
                uint64_t room = cur->off + window - st;
                take = rem < room ? rem : room;
                if (st + take > cur_end) cur->len = st + take - cur->off;
            } else {
                if ((rc = grow((void **)&out->runs, out->nruns, &rcap, sizeof *out->runs)) != 0) break;
                cur = &out->runs[out->nruns++];
                take = rem < window ? rem : window;
                *cur = (mh_store_run_t){st, take, out->npieces, 0};
            }
            if ((rc = grow((void **)&out->pieces, out->npieces, &pcap, sizeof *out->pieces)) != 0) break;
            out->pieces[out->npieces++] = (mh_store_plan_piece_t){k, pos, (size_t)(st - cur->off), (size_t)take};
            cur->count++;
            pos += take;
        } while (pos < len);
    }
    if (rc == 0 && out->nruns == 0) {
        out->runs = calloc(1, sizeof *out->runs);
        if (!out->runs) rc = MH_ENOMEM;
        else out->nruns = 1;
    }
    if (rc != 0) mh_store_plan_free(out);
    return rc;
}

void mh_store_plan_window(const mh_store_plan_t *p, size_t run, const uint8_t *base, uint64_t size,
                          mh_store_piece_t *out, mh_store_window_t *w)
{
    const mh_store_run_t *r = &p->runs[run];
    for (size_t i = 0; i < r->count; i++) {
        const mh_store_plan_piece_t *pp = &p->pieces[r->first + i];
        out[i] = (mh_store_piece_t){pp->index, pp->at, base ? base + pp->rel : NULL, pp->n};
    }
    *w = (mh_store_window_t){.p = r->len ? base : NULL, .n = (size_t)r->len, .off = r->off, .pieces = out,
                             .npieces = r->count, .size = size, .last = run + 1 == p->nruns};
}

/* ------------------------------------------------------------- reader head */

bool mh_store_reader_due(const mh_store_reader_t *r)
{
    if (r->err) return !r->err_told;
    if (!r->planned || r->bstate[0] == MH_RBUF_DELIVERED || r->bstate[1] == MH_RBUF_DELIVERED) return false;
    for (int i = 0; i < 2; i++)
        if (r->bstate[i] == MH_RBUF_FULL && r->brun[i] == r->next_deliver) return true;
    return false;
}

int mh_store_reader_take(mh_store_reader_t *r, mh_store_window_t *win)
{
    if (!mh_store_reader_due(r)) return 0;
    int ready = r->bstate[0] == MH_RBUF_FULL && r->brun[0] == r->next_deliver ? 0 : 1;
    const mh_store_run_t *run = &r->plan.runs[r->next_deliver];
    if (!r->err && run->count > r->out_cap) {
        mh_store_piece_t *no = realloc(r->out, run->count * sizeof *no);
        if (!no) r->err = MH_ENOMEM;
        else r->out = no, r->out_cap = run->count;
    }
    if (r->err) {
        r->err_told = true;
        return r->err;
    }
    mh_store_plan_window(&r->plan, r->next_deliver, r->buf[ready].p, r->size, r->out, win);
    r->bstate[ready] = MH_RBUF_DELIVERED;
    r->next_deliver++;
    if (win->last) r->done = true;
    return 1;
}

int mh_store_reader_free_buf(const mh_store_reader_t *r)
{
    return r->bstate[0] == MH_RBUF_FREE ? 0 : r->bstate[1] == MH_RBUF_FREE ? 1 : -1;
}

void mh_store_reader_filled(mh_store_reader_t *r, int b)
{
    r->bstate[b] = MH_RBUF_FULL;
    r->brun[b] = r->next_read++;
}

void mh_store_reader_release(mh_store_reader_t *r, bool drop)
{
    for (int i = 0; i < 2; i++) {
        if (r->bstate[i] != MH_RBUF_DELIVERED) continue;
        r->bstate[i] = MH_RBUF_FREE;
        if (drop) mh_buf_free(&r->buf[i]);
    }
}

void mh_store_reader_fini(mh_store_reader_t *r)
{
    mh_buf_free(&r->buf[0]);
    mh_buf_free(&r->buf[1]);
    mh_store_plan_free(&r->plan);
    free(r->out);
    r->out = NULL;
}
