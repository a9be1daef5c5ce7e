/*
 * packbuild.c — the one pack builder (mh/packbuild.h): fetch packs, GC's
 * consolidated pack and the pack of a server-side commit are all built
 * here, as a stream, with memory bounded by configuration.
 *
 * Three stages:
 *
 *   PLAN   (loop, once) the output order and its units: v2 frames
 *          (built groups of up to MH_PB_FRAME_TARGET bytes in path order,
 *          source frames copied verbatim, large blobs on their own), and
 *          the items that feed them: one per source byte range in the
 *          order the output consumes them (a v1 blob's bytes; a source
 *          frame's data, decompressed once per unit for all the unit's
 *          blobs in it; a frame copied as is; a large blob's bytes twice,
 *          sizer then writer), or a blob in memory. Consecutive reading
 *          items of one pack form a segment: one ranged reader
 *          (mh_store_reader_open_ranges), which coalesces nearby ranges.
 *   RUN    a loop of (window of the current segment) -> thread-pool work
 *          that consumes it item by item until the window is used up or
 *          OUT_CAP bytes of output are pending -> the loop hands the
 *          output to the store writer and waits for room -> next window
 *          (or the next segment's reader). The work function is the only
 *          code that touches the consumer state and the mh_packw_t; it
 *          also hashes the output, so the pack's id is known at its end.
 *   END    the writer finished under mpacks/<hex> (or kept open for the
 *          caller: GC stores the pack inside its transaction).
 *
 * Invariants:
 *  - Memory: two read windows, one built frame's content and compressed
 *    copy, the output buffer (at most OUT_CAP plus one frame), zstd
 *    contexts, the writer's two chunks: computed by plan_mem and reserved
 *    from the budget before anything is held. Blob bytes are never held
 *    beyond one frame's content.
 *  - Determinism: the plan depends only on the blobs, their sources and
 *    the options; frames are compressed with mh_packw's fixed parameters.
 *  - A source frame whose bytes do not decompress to what its index rows
 *    say is MH_EPARSE (a corrupt stored pack): nothing is stored.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define ZSTD_STATIC_LINKING_ONLY /* the memory estimates (exported by libzstd) */
#include <zstd.h>

#include "mh/packbuild.h"

#define FRAME_T MH_PB_FRAME_TARGET
#define OUT_CAP ((size_t)1 << 20)         /* output bytes pending before the loop drains them */
#define STEP_BYTES ((size_t)256 << 10)    /* input or output bytes handled per consume call */
#define DCTX_WINDOW_MAX ((uint64_t)1 << 24) /* the readers' zstd window limit (mh_pack_limits_t) */
#define NOFRAME UINT32_MAX

/* ================================================================ types */

typedef struct {
    const char *id;   /* MH_ID_LEN bytes, the caller's */
    const char *path; /* the caller's; NULL: unknown */
    uint32_t plen, age;
    uint64_t len;
    uint32_t pack;   /* MH_PB_MEM or an index into packs */
    uint32_t sframe; /* NOFRAME or an index into sf */
    uint64_t off;    /* v1 source: in the file; v2 source: in the decompressed frame */
    const uint8_t *mem;
    bool has_src;
    /* where it lands */
    uint32_t out_frame;
    uint64_t out_off;
} pblob_t;

typedef struct {
    char id[MH_ID_SIZE];
} ppack_t;

typedef struct {
    uint8_t key[8]; /* pack index, frame_no (the map's key) */
    uint32_t pack;
    mh_pb_frame_t f;
    uint32_t wanted; /* blobs located in it */
    uint64_t wanted_bytes;
    bool emitted; /* copied as a unit */
} psframe_t;

/* What an item does with its bytes. */
enum { A_V1, A_GROUP, A_COPY, A_SIZE, A_LARGE, A_PUT };

typedef struct {
    uint8_t act;
    bool frame;        /* the bytes are a source frame's data, decompressed for its targets */
    uint32_t pack;     /* MH_PB_MEM: no read */
    uint64_t off, len; /* file range (MEM: the blob's bytes) */
    uint32_t sframe;   /* frame items and A_COPY */
    uint32_t first, n; /* its blobs: b->tg[first .. first + n), by offset in the source */
    uint32_t unit;     /* v2: the unit it feeds */
} item_t;

enum { U_GROUP, U_REUSE, U_LARGE };

typedef struct {
    uint8_t kind;
    uint32_t first, n; /* its blobs in frame order: b->ub[first .. first + n) */
    uint64_t size;
    uint32_t last_item;
    uint64_t data_len; /* U_LARGE: learnt by the sizer */
    int codec;         /* U_LARGE */
} unit_t;

typedef struct {
    uint32_t pack;
    uint32_t first_range, nranges; /* b->rg / b->ritem */
} seg_t;

enum { PH_HEAD, PH_SECTION, PH_ITEMS, PH_TAIL, PH_FINISH, PH_DONE };
enum { STOP_OUT, STOP_WIN, STOP_DONE, STOP_ERR };
enum { D_PLAN, D_RESERVE, D_RUN };

struct mh_pb {
    mh_pb_opts_t o;
    int level;
    /* input */
    pblob_t *bl;
    size_t nbl, capbl;
    ppack_t *packs;
    size_t npacks, cappk;
    mh_idmap_t pack_map;
    psframe_t *sf;
    size_t nsf, capsf;
    mh_idmap_t sf_map;
    /* plan */
    bool planned;
    uint32_t *order, *tg, *ub;
    size_t ntg, nub;
    item_t *it;
    size_t nit, capit;
    unit_t *un;
    size_t nun, capun;
    seg_t *sg;
    size_t nsg;
    mh_range_t *rg;
    uint32_t *ritem, *iseg; /* range -> item; item -> segment (reading items) */
    size_t nrg;
    uint64_t max_sframe, max_large;
    bool any_group, any_frame;
    size_t mem;
    /* run (loop) */
    mh_pb_env_t env;
    mh_pb_cb cb, store_cb;
    void *ud, *store_ud;
    mh_budget_res_t res;
    mh_store_writer_t *wr;
    mh_store_reader_t *rd;
    size_t rd_seg;
    bool rd_last; /* the open reader delivered its last window */
    mh_store_window_t win;
    bool have_win;
    uv_work_t work;
    bool running, in_work, freed, ended, storing;
    int dstate;
    int stop;
    /* consumer (thread pool) */
    int phase;
    mh_buf_t out;
    mh_packw_t w;
    mh_sha256_t *h;
    size_t cur;
    bool started;
    uint64_t at;
    size_t wp;
    uint64_t wat;
    uint32_t ti;
    uint64_t dpos;
    mh_framer_t *fr;
    mh_zsizer_t *sz;
    mh_sha256_t *vh;
    uint8_t *content;
    mh_packw_blobref_t *refs;
    size_t caprefs;
    mh_pb_outframe_t *of;
    size_t nof, capof;
    /* results */
    mh_id_t id;
    mh_pb_stats_t st;
    int err;
    const char *why;
    char whybuf[200];
};

/* Per-process counters (loop thread only). */
static struct {
    uint64_t ok, failed, built, reused, large, bytes, read;
} stats;

/* ================================================================ input */

static const void *pack_key(const void *ctx, uint32_t v) { return ((const mh_pb_t *)ctx)->packs[v].id; }
static const void *sf_key(const void *ctx, uint32_t v) { return ((const mh_pb_t *)ctx)->sf[v].key; }

int mh_pb_new(const mh_pb_opts_t *opts, mh_pb_t **out)
{
    *out = NULL;
    int level = opts->level ? opts->level : 3;
    if ((opts->version != 1 && opts->version != 2) || level < 1 || level > 19) return MH_EINVAL;
    mh_pb_t *b = calloc(1, sizeof *b);
    if (!b) return MH_ENOMEM;
    b->o = *opts;
    b->level = level;
    if (b->o.verify) b->o.reuse_frames = false;
    mh_idmap_init(&b->pack_map, NULL, MH_ID_LEN, pack_key, b);
    mh_idmap_init(&b->sf_map, NULL, 8, sf_key, b);
    *out = b;
    return 0;
}

int mh_pb_add(mh_pb_t *b, const char *id, uint64_t len, const char *path, uint32_t plen, uint32_t age,
              size_t *index)
{
    if (b->running) return MH_EINVAL;
    pblob_t *v = mh_vec_grow(b->bl, &b->capbl, b->nbl + 1, sizeof *v, 256);
    if (!v) return MH_ENOMEM;
    b->bl = v;
    v[b->nbl] = (pblob_t){.id = id, .path = path, .plen = path ? plen : 0, .age = age, .len = len,
                          .pack = MH_PB_MEM, .sframe = NOFRAME, .out_frame = MH_PACK_NOFRAME};
    if (index) *index = b->nbl;
    b->nbl++;
    b->st.blob_bytes += len;
    return 0;
}

void mh_pb_set_path(mh_pb_t *b, size_t index, const char *path, uint32_t plen, uint32_t age)
{
    pblob_t *x = &b->bl[index];
    x->path = path;
    x->plen = path ? plen : 0;
    x->age = age;
}

void mh_pb_src_mem(mh_pb_t *b, size_t index, const void *content)
{
    pblob_t *x = &b->bl[index];
    x->pack = MH_PB_MEM;
    x->sframe = NOFRAME;
    x->mem = content;
    x->has_src = true;
}

/* The index of pack id (interned). MH_ENOMEM. */
static int intern_pack(mh_pb_t *b, const char *mpack_id, uint32_t *out)
{
    uint32_t x = mh_idmap_find(&b->pack_map, mpack_id);
    if (x != MH_IDMAP_NONE) {
        *out = x;
        return 0;
    }
    ppack_t *p = mh_vec_grow(b->packs, &b->cappk, b->npacks + 1, sizeof *p, 16);
    if (!p) return MH_ENOMEM;
    b->packs = p;
    memcpy(p[b->npacks].id, mpack_id, MH_ID_LEN);
    p[b->npacks].id[MH_ID_LEN] = 0;
    if (mh_idmap_add(&b->pack_map, (uint32_t)b->npacks, NULL) < 0) return MH_ENOMEM;
    *out = (uint32_t)b->npacks++;
    return 0;
}

static int intern_frame(mh_pb_t *b, uint32_t pack, const mh_pb_frame_t *f, uint32_t *out)
{
    uint8_t key[8];
    memcpy(key, &pack, 4);
    memcpy(key + 4, &f->frame_no, 4);
    uint32_t x = mh_idmap_find(&b->sf_map, key);
    if (x != MH_IDMAP_NONE) {
        *out = x;
        return 0;
    }
    psframe_t *s = mh_vec_grow(b->sf, &b->capsf, b->nsf + 1, sizeof *s, 64);
    if (!s) return MH_ENOMEM;
    b->sf = s;
    s[b->nsf] = (psframe_t){.pack = pack, .f = *f};
    memcpy(s[b->nsf].key, key, 8);
    if (mh_idmap_add(&b->sf_map, (uint32_t)b->nsf, NULL) < 0) return MH_ENOMEM;
    *out = (uint32_t)b->nsf++;
    return 0;
}

int mh_pb_src_pack(mh_pb_t *b, size_t index, const char *mpack_id, const mh_pb_frame_t *frame, uint64_t off)
{
    pblob_t *x = &b->bl[index];
    uint32_t pack, sf = NOFRAME;
    int rc = intern_pack(b, mpack_id, &pack);
    if (!rc && frame) rc = intern_frame(b, pack, frame, &sf);
    if (rc) return rc;
    x->pack = pack;
    x->sframe = sf;
    x->off = off;
    x->has_src = true;
    return 0;
}

size_t mh_pb_count(const mh_pb_t *b) { return b->nbl; }

/* ================================================================= plan */

static int plan_fail(mh_pb_t *b, int err, const char *why)
{
    if (!b->err) {
        b->err = err;
        b->why = why;
    }
    return err;
}

static item_t *new_item(mh_pb_t *b, uint8_t act, uint32_t unit)
{
    item_t *v = mh_vec_grow(b->it, &b->capit, b->nit + 1, sizeof *v, 256);
    if (!v) return NULL;
    b->it = v;
    v[b->nit] = (item_t){.act = act, .pack = MH_PB_MEM, .sframe = NOFRAME, .first = (uint32_t)b->ntg, .unit = unit};
    return &v[b->nit++];
}

/* An item for blobs tg[first..first+n) (already appended to tg) with
 * their common source. */
static int add_item(mh_pb_t *b, uint8_t act, uint32_t unit, uint32_t first, uint32_t n)
{
    item_t *it = new_item(b, act, unit);
    if (!it) return MH_ENOMEM;
    const pblob_t *x = &b->bl[b->tg[first]];
    it->first = first;
    it->n = n;
    if (x->pack == MH_PB_MEM || x->len == 0) {
        it->len = x->len;
        return 0;
    }
    it->pack = x->pack;
    if (x->sframe != NOFRAME && act != A_COPY) {
        const psframe_t *s = &b->sf[x->sframe];
        it->frame = true;
        it->sframe = x->sframe;
        it->off = s->f.data_offset;
        it->len = s->f.data_length;
        if (s->f.size > b->max_sframe) b->max_sframe = s->f.size;
        b->any_frame = true;
    } else if (act == A_COPY) {
        const psframe_t *s = &b->sf[x->sframe];
        it->sframe = x->sframe;
        it->off = s->f.data_offset;
        it->len = s->f.data_length;
    } else {
        it->off = x->off;
        it->len = x->len;
    }
    return 0;
}

/* Blobs a, b by their source place: memory first (by id), then pack,
 * frame, offset. */
static int cmp_source(const void *x, const void *y, void *arg)
{
    const mh_pb_t *b = arg;
    const pblob_t *p = &b->bl[*(const uint32_t *)x], *q = &b->bl[*(const uint32_t *)y];
    bool pm = p->pack == MH_PB_MEM || p->len == 0, qm = q->pack == MH_PB_MEM || q->len == 0;
    if (pm != qm) return pm ? -1 : 1;
    if (pm) return memcmp(p->id, q->id, MH_ID_LEN);
    if (p->pack != q->pack) return p->pack < q->pack ? -1 : 1;
    uint64_t pf = p->sframe == NOFRAME ? p->off : b->sf[p->sframe].f.data_offset;
    uint64_t qf = q->sframe == NOFRAME ? q->off : b->sf[q->sframe].f.data_offset;
    if (pf != qf) return pf < qf ? -1 : 1;
    return p->off < q->off ? -1 : p->off > q->off;
}

/* Path order: by path (bytewise, a prefix first; unknown paths last),
 * then age (oldest first), then id. */
static int cmp_path(const void *x, const void *y, void *arg)
{
    const mh_pb_t *b = arg;
    const pblob_t *p = &b->bl[*(const uint32_t *)x], *q = &b->bl[*(const uint32_t *)y];
    if (!p->path != !q->path) return p->path ? -1 : 1;
    if (p->path) {
        size_t m = p->plen < q->plen ? p->plen : q->plen;
        int c = memcmp(p->path, q->path, m);
        if (c) return c;
        if (p->plen != q->plen) return p->plen < q->plen ? -1 : 1;
        if (p->age != q->age) return p->age < q->age ? -1 : 1;
    }
    return memcmp(p->id, q->id, MH_ID_LEN);
}

/* Items of blobs tg[first..end) sorted by source: one per memory or v1
 * blob, one per source frame (its blobs by offset; overlapping blobs mean
 * corrupt index rows). */
static int items_by_source(mh_pb_t *b, uint8_t act, uint32_t unit, uint32_t first, uint32_t end)
{
    qsort_r(b->tg + first, end - first, sizeof *b->tg, cmp_source, b);
    for (uint32_t i = first; i < end;) {
        const pblob_t *x = &b->bl[b->tg[i]];
        uint32_t j = i + 1;
        if (x->pack != MH_PB_MEM && x->len && x->sframe != NOFRAME) {
            uint64_t endoff = x->off + x->len;
            while (j < end && b->bl[b->tg[j]].sframe == x->sframe && b->bl[b->tg[j]].len &&
                   b->bl[b->tg[j]].pack != MH_PB_MEM) {
                if (b->bl[b->tg[j]].off < endoff)
                    return plan_fail(b, MH_EDB, "two blobs overlap in one source frame (corrupt index rows)");
                endoff = b->bl[b->tg[j]].off + b->bl[b->tg[j]].len;
                j++;
            }
        }
        int rc = add_item(b, act, unit, i, j - i);
        if (rc) return rc;
        i = j;
    }
    return 0;
}

static unit_t *new_unit(mh_pb_t *b, uint8_t kind)
{
    unit_t *v = mh_vec_grow(b->un, &b->capun, b->nun + 1, sizeof *v, 64);
    if (!v) return NULL;
    b->un = v;
    v[b->nun] = (unit_t){.kind = kind, .first = (uint32_t)b->nub};
    return &v[b->nun++];
}

/* Closes unit u after its items were added. */
static void unit_close(mh_pb_t *b, unit_t *u) { u->last_item = (uint32_t)(b->nit - 1); }

/* The group grp[0..n): a built frame. Its items read memory blobs
 * first, then each pack in turn. */
static int emit_group(mh_pb_t *b, const uint32_t *grp, uint32_t n)
{
    if (n == 0) return 0;
    unit_t *u = new_unit(b, U_GROUP);
    if (!u) return MH_ENOMEM;
    uint32_t ui = (uint32_t)(u - b->un), t0 = (uint32_t)b->ntg;
    u->n = n;
    for (uint32_t i = 0; i < n; i++) {
        pblob_t *x = &b->bl[grp[i]];
        x->out_off = u->size;
        u->size += x->len;
        b->ub[b->nub++] = grp[i];
        b->tg[b->ntg++] = grp[i];
    }
    b->any_group = true;
    int rc = items_by_source(b, A_GROUP, ui, t0, (uint32_t)b->ntg);
    if (!rc) unit_close(b, &b->un[ui]);
    return rc;
}

/* A large blob: its own frame, sized then written (memory: one call). */
static int emit_large(mh_pb_t *b, uint32_t blob)
{
    unit_t *u = new_unit(b, U_LARGE);
    if (!u) return MH_ENOMEM;
    uint32_t ui = (uint32_t)(u - b->un);
    const pblob_t *x = &b->bl[blob];
    u->n = 1;
    u->size = x->len;
    b->ub[b->nub++] = blob;
    b->tg[b->ntg++] = blob;
    b->bl[blob].out_off = 0;
    int rc;
    if (b->o.version == 1) {
        rc = add_item(b, A_V1, ui, (uint32_t)b->ntg - 1, 1); /* streamed as it arrives */
    } else if (x->pack == MH_PB_MEM) {
        rc = add_item(b, A_PUT, ui, (uint32_t)b->ntg - 1, 1);
    } else {
        rc = add_item(b, A_SIZE, ui, (uint32_t)b->ntg - 1, 1);
        if (!rc) rc = add_item(b, A_LARGE, ui, (uint32_t)b->ntg - 1, 1);
        if (x->len > b->max_large) b->max_large = x->len;
    }
    if (!rc) unit_close(b, &b->un[ui]);
    return rc;
}

/* Source frame f copied verbatim, if fb[0..n) (its wanted blobs, by
 * offset) are all of its blobs and tile it exactly: 1 when emitted, 0
 * when it cannot be, MH_ENOMEM. */
static int emit_reuse(mh_pb_t *b, uint32_t f, const uint32_t *fb, uint32_t n)
{
    psframe_t *s = &b->sf[f];
    uint64_t pos = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (b->bl[fb[i]].off != pos) return 0;
        pos += b->bl[fb[i]].len;
    }
    if (pos != s->f.size || n != s->f.blob_count || (n != 1 && s->f.size > MH_PACK_FRAME_MAX)) return 0;
    unit_t *u = new_unit(b, U_REUSE);
    if (!u) return MH_ENOMEM;
    uint32_t ui = (uint32_t)(u - b->un), t0 = (uint32_t)b->ntg;
    u->n = n;
    u->size = s->f.size;
    for (uint32_t i = 0; i < n; i++) {
        b->ub[b->nub++] = fb[i];
        b->tg[b->ntg++] = fb[i];
        b->bl[fb[i]].out_off = b->bl[fb[i]].off;
    }
    int rc = add_item(b, A_COPY, ui, t0, n);
    if (rc) return rc;
    unit_close(b, &b->un[ui]);
    s->emitted = true;
    return 1;
}

/* Inside one source frame: by offset, an empty blob before a non-empty
 * one at the same offset (the order a frame's `blobs` list has), then id. */
static int cmp_inframe(const void *x, const void *y, void *arg)
{
    const mh_pb_t *b = arg;
    const pblob_t *p = &b->bl[*(const uint32_t *)x], *q = &b->bl[*(const uint32_t *)y];
    if (p->sframe != q->sframe) return p->sframe < q->sframe ? -1 : 1;
    if (p->off != q->off) return p->off < q->off ? -1 : 1;
    if (p->len != q->len) return p->len < q->len ? -1 : 1;
    return memcmp(p->id, q->id, MH_ID_LEN);
}

/* The located blobs of each source frame by offset: byf[start[f] ..
 * start[f + 1]); and each frame's wanted counts. */
static int frames_index(mh_pb_t *b, uint32_t **byf_out, uint32_t **start_out)
{
    uint32_t *start = calloc(b->nsf + 2, sizeof *start), *byf = malloc((b->nbl + 1) * sizeof *byf);
    if (!start || !byf) {
        free(start);
        free(byf);
        return MH_ENOMEM;
    }
    size_t k = 0;
    for (size_t i = 0; i < b->nbl; i++) {
        pblob_t *x = &b->bl[i];
        if (x->sframe == NOFRAME || x->pack == MH_PB_MEM) continue;
        byf[k++] = (uint32_t)i;
        b->sf[x->sframe].wanted++;
        b->sf[x->sframe].wanted_bytes += x->len;
    }
    qsort_r(byf, k, sizeof *byf, cmp_inframe, b);
    for (size_t i = 0; i < k; i++) start[b->bl[byf[i]].sframe + 1]++;
    for (size_t f = 0; f < b->nsf; f++) start[f + 1] += start[f];
    *byf_out = byf;
    *start_out = start;
    return 0;
}

/* Tries to copy the frame blob x lies in: 1 done (x is in it), 0 not. */
static int try_reuse(mh_pb_t *b, const pblob_t *x, const uint32_t *byf, const uint32_t *start)
{
    if (!b->o.reuse_frames || b->o.version != 2 || x->sframe == NOFRAME || x->pack == MH_PB_MEM) return 0;
    psframe_t *s = &b->sf[x->sframe];
    if (s->emitted) return 1;
    if (s->wanted != s->f.blob_count || s->wanted_bytes != s->f.size) return 0;
    int rc = emit_reuse(b, x->sframe, byf + start[x->sframe], start[x->sframe + 1] - start[x->sframe]);
    if (rc == 0) s->wanted = 0; /* does not tile: never again */
    return rc;
}

static int plan_order(mh_pb_t *b)
{
    uint32_t *byf = NULL, *start = NULL;
    int rc = frames_index(b, &byf, &start);
    uint32_t *grp = rc ? NULL : malloc((b->nbl + 1) * sizeof *grp);
    if (!rc && !grp) rc = MH_ENOMEM;
    for (size_t i = 0; i < b->nbl; i++) b->order[i] = (uint32_t)i;
    if (!rc) qsort_r(b->order, b->nbl, sizeof *b->order, cmp_path, b);
    /* The open group stays open across a copied or large frame: its
     * blobs are written when it is full. */
    uint32_t ng = 0;
    uint64_t gsize = 0;
    for (size_t i = 0; !rc && i < b->nbl; i++) {
        uint32_t bi = b->order[i];
        const pblob_t *x = &b->bl[bi];
        rc = try_reuse(b, x, byf, start);
        if (rc) {
            rc = rc < 0 ? rc : 0;
            continue;
        }
        if (x->len >= FRAME_T) {
            rc = emit_large(b, bi);
            continue;
        }
        if (gsize + x->len > FRAME_T) {
            rc = emit_group(b, grp, ng);
            ng = 0;
            gsize = 0;
        }
        grp[ng++] = bi;
        gsize += x->len;
    }
    if (!rc) rc = emit_group(b, grp, ng);
    free(grp);
    free(byf);
    free(start);
    return rc;
}

/* Segments: runs of reading items of one pack, each item one range. */
static int plan_segments(mh_pb_t *b)
{
    b->rg = malloc((b->nit + 1) * sizeof *b->rg);
    b->ritem = malloc((b->nit + 1) * sizeof *b->ritem);
    b->iseg = malloc((b->nit + 1) * sizeof *b->iseg);
    b->sg = malloc((b->nit + 1) * sizeof *b->sg);
    if (!b->rg || !b->ritem || !b->iseg || !b->sg) return MH_ENOMEM;
    for (size_t i = 0; i < b->nit; i++) {
        item_t *it = &b->it[i];
        b->iseg[i] = UINT32_MAX;
        if (it->pack == MH_PB_MEM || it->len == 0) continue;
        if (!b->nsg || b->sg[b->nsg - 1].pack != it->pack)
            b->sg[b->nsg++] = (seg_t){it->pack, (uint32_t)b->nrg, 0};
        b->sg[b->nsg - 1].nranges++;
        b->iseg[i] = (uint32_t)b->nsg - 1;
        b->ritem[b->nrg] = (uint32_t)i;
        b->rg[b->nrg++] = (mh_range_t){it->off, it->len};
    }
    return 0;
}

/* What the build holds at most (docs/architecture.md, "The pack
 * builder"). */
static size_t plan_mem(const mh_pb_t *b, const mh_pb_env_t *env)
{
    size_t m = OUT_CAP + STEP_BYTES;
    if (b->nrg) m += mh_store_reader_mem(MH_PB_READ_WINDOW);
    if (!env->mem && env->store) {
        mh_store_writer_opts_t wo = {false, 0};
        m += mh_store_writer_mem(env->store, &wo);
    }
    if (b->o.version == 1 && b->any_group) m += 2 * (size_t)FRAME_T; /* a group's content, written out */
    if (b->o.version == 2) {
        ZSTD_compressionParameters cp = ZSTD_getCParams(b->level, FRAME_T, 0);
        size_t cctx = ZSTD_estimateCCtxSize_usingCParams(cp);
        /* a frame's content, its compressed copy, the copy in the output */
        if (b->any_group) m += (size_t)FRAME_T + 2 * ZSTD_compressBound(FRAME_T);
        if (b->max_large) {
            ZSTD_compressionParameters lp = ZSTD_getCParams(b->level, b->max_large, 0);
            size_t s = ZSTD_estimateCStreamSize_usingCParams(lp);
            cctx = (s > cctx ? s : cctx) + s; /* the writer's and the sizer's */
        }
        if (b->o.meta_frame) cctx += ZSTD_estimateCStreamSize(b->level);
        m += cctx;
    }
    if (b->any_frame) {
        uint64_t wdw = b->max_sframe < DCTX_WINDOW_MAX ? b->max_sframe : DCTX_WINDOW_MAX;
        m += ZSTD_estimateDStreamSize((size_t)wdw) + ((size_t)128 << 10);
    }
    return m;
}

static int plan(mh_pb_t *b)
{
    for (size_t i = 0; i < b->nbl; i++)
        if (!b->bl[i].has_src) return plan_fail(b, MH_EINVAL, "a blob without a source");
    b->order = malloc((b->nbl + 1) * sizeof *b->order);
    b->ub = malloc((b->nbl + 1) * sizeof *b->ub);
    if (!b->order || !b->ub) return MH_ENOMEM;
    b->tg = malloc((b->nbl + 1) * sizeof *b->tg);
    int rc = b->tg ? plan_order(b) : MH_ENOMEM;
    if (!rc) rc = plan_segments(b);
    b->planned = !rc;
    return rc;
}

/* ============================================================= consumer */

/* Everything below up to the driver runs on the thread pool, inside one
 * work call at a time. */

static int fail(mh_pb_t *b, int err, const char *why)
{
    return plan_fail(b, err, why);
}

static int fail_blob(mh_pb_t *b, int err, const char *what, const pblob_t *x)
{
    if (!b->err) snprintf(b->whybuf, sizeof b->whybuf, "object %.*s: %s", MH_ID_LEN, x->id, what);
    return fail(b, err, b->whybuf);
}

static void wsync(mh_pb_t *b)
{
    if (b->w.err) fail(b, b->w.err, b->w.err == MH_ENOMEM ? "out of memory" : "the pack writer refused a frame");
}

/* Verification of a streamed blob: bytes as they pass, then the end. */
static void vupdate(mh_pb_t *b, const void *p, size_t n)
{
    if (b->o.verify && n) mh_sha256_update(b->vh, p, n);
}

static void vend(mh_pb_t *b, const pblob_t *x)
{
    if (!b->o.verify) return;
    uint8_t got[32], want[32];
    mh_sha256_final(b->vh, got);
    if (mh_id_digest(x->id, MH_ID_LEN, want) || memcmp(got, want, 32) != 0)
        fail_blob(b, MH_EHASH, "the indexed bytes do not hash to its id", x);
}

/* Bytes [pos, pos + n) of blob x's content reach item it. */
static void deliver(mh_pb_t *b, const item_t *it, pblob_t *x, uint64_t pos, const uint8_t *p, size_t n)
{
    switch (it->act) {
    case A_V1:
        if (pos == 0) {
            mh_packw_blob_begin(&b->w, (mh_str_t){x->id, MH_ID_LEN}, x->len);
            x->out_off = b->w.pos;
        }
        mh_packw_blob_data(&b->w, p, n);
        vupdate(b, p, n);
        if (pos + n == x->len) vend(b, x);
        break;
    case A_GROUP:
        if (n) memcpy(b->content + x->out_off + pos, p, n);
        break;
    case A_SIZE: {
        int rc = mh_zsizer_update(b->sz, p, n);
        if (rc) fail(b, rc, "sizing a large frame");
        break;
    }
    case A_LARGE:
        mh_packw_frame_large_data(&b->w, p, n);
        vupdate(b, p, n);
        if (pos + n == x->len) vend(b, x);
        break;
    default: break;
    }
}

/* The framer's output: decompressed bytes [dpos, dpos + m) of the
 * current frame item, handed to the blobs they belong to. */
static int frame_out_cb(void *ud, const uint8_t *q, size_t m)
{
    mh_pb_t *b = ud;
    const item_t *it = &b->it[b->cur];
    uint64_t pos = b->dpos;
    b->dpos += m;
    while (m && b->ti < it->n && !b->err) {
        pblob_t *x = &b->bl[b->tg[it->first + b->ti]];
        if (pos + m <= x->off) return 0;
        if (pos < x->off) {
            size_t skip = (size_t)(x->off - pos);
            q += skip;
            m -= skip;
            pos = x->off;
        }
        uint64_t in = pos - x->off, left = x->len - in;
        size_t take = m < left ? m : (size_t)left;
        deliver(b, it, x, in, q, take);
        q += take;
        m -= take;
        pos += take;
        if (in + take == x->len) b->ti++;
    }
    return b->err;
}

static int sframe_fail(mh_pb_t *b, const item_t *it, int err, const char *what)
{
    const psframe_t *s = &b->sf[it->sframe];
    if (!b->err)
        snprintf(b->whybuf, sizeof b->whybuf, "pack %s frame %u: %s", b->packs[s->pack].id, s->f.frame_no, what);
    return fail(b, err, b->whybuf);
}

static void item_begin(mh_pb_t *b, item_t *it)
{
    pblob_t *x = &b->bl[b->tg[it->first]];
    b->at = 0;
    b->ti = 0;
    b->dpos = 0;
    if (it->frame) {
        const psframe_t *s = &b->sf[it->sframe];
        const pblob_t *lastb = &b->bl[b->tg[it->first + it->n - 1]];
        int rc = mh_framer_new(s->f.codec, s->f.size, 0, lastb->off + lastb->len, 0, &b->fr);
        if (rc) sframe_fail(b, it, rc == MH_EINVAL ? MH_EPARSE : rc, "its index rows lie outside the frame");
    }
    switch (it->act) {
    case A_COPY: {
        const psframe_t *s = &b->sf[it->sframe];
        for (uint32_t i = 0; i < it->n; i++) {
            const pblob_t *y = &b->bl[b->tg[it->first + i]];
            b->refs[i] = (mh_packw_blobref_t){{y->id, MH_ID_LEN}, y->len};
        }
        mh_packw_frame_copy_begin(&b->w, s->f.codec, s->f.size, b->refs, it->n, s->f.data_length);
        break;
    }
    case A_SIZE: {
        int rc = mh_zsizer_new(b->level, x->len, &b->sz);
        if (rc) fail(b, rc, "sizing a large frame");
        break;
    }
    case A_LARGE: {
        const unit_t *u = &b->un[it->unit];
        mh_packw_frame_large_begin(&b->w, u->codec, (mh_str_t){x->id, MH_ID_LEN}, x->len, u->data_len);
        if (!x->len) vend(b, x);
        break;
    }
    case A_PUT:
        if (b->o.verify) {
            vupdate(b, x->mem, (size_t)x->len);
            vend(b, x);
        }
        b->refs[0] = (mh_packw_blobref_t){{x->id, MH_ID_LEN}, x->len};
        mh_packw_frame_put(&b->w, b->refs, 1, x->len ? x->mem : (const void *)"", (size_t)x->len);
        break;
    case A_V1:
        if (!it->frame && x->len == 0) deliver(b, it, x, 0, (const uint8_t *)"", 0);
        break;
    default: break;
    }
    wsync(b);
}

static void record_frame(mh_pb_t *b, const unit_t *u, uint8_t kind)
{
    mh_pb_outframe_t *of = mh_vec_grow(b->of, &b->capof, b->nof + 1, sizeof *of, 64);
    if (!of) {
        fail(b, MH_ENOMEM, "out of memory");
        return;
    }
    b->of = of;
    of[b->nof] = (mh_pb_outframe_t){b->w.frame_offset, b->w.frame_length, b->w.frame_size, u->n, b->w.frame_codec,
                                    kind};
    for (uint32_t i = 0; i < u->n; i++) b->bl[b->ub[u->first + i]].out_frame = (uint32_t)b->nof;
    b->nof++;
    if (kind == MH_PB_REUSED) b->st.frames_reused++;
    else if (kind == MH_PB_LARGE) b->st.frames_large++;
    else b->st.frames_built++;
    if (b->w.frame_codec == MH_PACK_NONE) b->st.frames_none++;
}

static void group_end(mh_pb_t *b, const unit_t *u)
{
    for (uint32_t i = 0; i < u->n; i++) {
        pblob_t *x = &b->bl[b->ub[u->first + i]];
        b->refs[i] = (mh_packw_blobref_t){{x->id, MH_ID_LEN}, x->len};
        if (!b->o.verify) continue;
        mh_id_t got;
        mh_blob_id(x->len ? b->content + x->out_off : (const uint8_t *)"", (size_t)x->len, &got);
        if (memcmp(got.s, x->id, MH_ID_LEN) != 0) {
            fail_blob(b, MH_EHASH, "the indexed bytes do not hash to its id", x);
            return;
        }
    }
    if (b->o.version == 2) {
        mh_packw_frame_put(&b->w, b->refs, u->n, u->size ? b->content : (const uint8_t *)"", (size_t)u->size);
    } else {
        /* v1: the group's blobs, raw, in path order; out_off becomes the
         * content's place in the file. */
        for (uint32_t i = 0; i < u->n; i++) {
            pblob_t *x = &b->bl[b->ub[u->first + i]];
            uint64_t at = x->out_off;
            mh_packw_blob_begin(&b->w, (mh_str_t){x->id, MH_ID_LEN}, x->len);
            x->out_off = b->w.pos;
            mh_packw_blob_data(&b->w, b->content + at, (size_t)x->len);
        }
    }
    wsync(b);
}

static void item_end(mh_pb_t *b, item_t *it)
{
    if (it->frame) {
        if (!b->err && b->ti < it->n) sframe_fail(b, it, MH_EPARSE, "its data ends before the blobs its index rows name");
        mh_framer_free(b->fr);
        b->fr = NULL;
    }
    unit_t *u = &b->un[it->unit];
    switch (it->act) {
    case A_COPY:
    case A_LARGE: mh_packw_frame_end(&b->w); break;
    case A_SIZE: {
        uint64_t clen = 0;
        int rc = mh_zsizer_final(b->sz, &clen);
        mh_zsizer_free(b->sz);
        b->sz = NULL;
        if (rc) fail(b, rc, "sizing a large frame");
        /* What zstd cannot shrink is stored as is. */
        u->codec = clen < u->size ? MH_PACK_ZSTD : MH_PACK_NONE;
        u->data_len = clen < u->size ? clen : u->size;
        break;
    }
    default: break;
    }
    wsync(b);
    if (b->err || u->last_item != b->cur) return;
    if (u->kind == U_GROUP) group_end(b, u);
    if (!b->err && b->o.version == 2)
        record_frame(b, u, u->kind == U_GROUP ? MH_PB_BUILT : u->kind == U_REUSE ? MH_PB_REUSED : MH_PB_LARGE);
}

/* Consumes up to n bytes of the current item (at most STEP_BYTES of
 * input or about as much output); returns the bytes taken. */
static size_t consume(mh_pb_t *b, item_t *it, const uint8_t *p, size_t n)
{
    if (it->frame) {
        size_t used = 0;
        int rc = mh_framer_feed_some(b->fr, p, n, STEP_BYTES, frame_out_cb, b, &used);
        if (rc && !b->err) sframe_fail(b, it, rc, mh_framer_why(b->fr) ? mh_framer_why(b->fr) : "decompressing");
        return used;
    }
    size_t take = n < STEP_BYTES ? n : STEP_BYTES;
    if (it->act == A_COPY) {
        mh_packw_frame_copy_data(&b->w, p, take);
        wsync(b);
    } else {
        deliver(b, it, &b->bl[b->tg[it->first]], b->at, p, take);
        wsync(b);
    }
    return take;
}

/* The window's next bytes for the current item; false when the window
 * is used up (or there is none). */
static bool next_piece(mh_pb_t *b, const uint8_t **p, size_t *n)
{
    while (b->have_win && b->wp < b->win.npieces) {
        const mh_store_piece_t *pc = &b->win.pieces[b->wp];
        if (b->wat >= pc->n) {
            b->wp++;
            b->wat = 0;
            continue;
        }
        uint32_t seg = b->iseg[b->cur];
        if (seg != b->rd_seg || b->ritem[b->sg[seg].first_range + pc->index] != b->cur || pc->at + b->wat != b->at) {
            fail(b, MH_EIO, "the store delivered ranges out of order");
            return false;
        }
        *p = pc->p + b->wat;
        *n = pc->n - (size_t)b->wat;
        return true;
    }
    return false;
}

/* One step of the current item; false when it needs a window. */
static bool item_step(mh_pb_t *b)
{
    item_t *it = &b->it[b->cur];
    if (!b->started) {
        b->started = true;
        item_begin(b, it);
        if (b->err) return true;
    }
    bool mem = it->pack == MH_PB_MEM || it->act == A_PUT;
    if (!mem && b->at < it->len) {
        const uint8_t *p;
        size_t n;
        if (!next_piece(b, &p, &n)) return b->err != 0;
        size_t used = consume(b, it, p, n);
        b->wat += used;
        b->at += used;
        if (b->at < it->len) return true;
    } else if (mem && it->act != A_PUT && b->at < it->len) {
        const pblob_t *x = &b->bl[b->tg[it->first]];
        b->at += consume(b, it, x->mem + b->at, (size_t)(it->len - b->at));
        if (b->at < it->len) return true;
    }
    if (b->err) return true;
    item_end(b, it);
    b->started = false;
    b->cur++;
    return true;
}

/* Empty sections when the caller has no metadata. */
static int meta_empty(mh_packw_t *w, int part)
{
    if (part == MH_PB_META_HEAD) {
        mh_packw_commits(w, 0);
        mh_packw_snapshots(w, 0);
        if (w->version == 2) mh_packw_branch_heads(w, 0);
    } else if (w->version == 1) {
        mh_packw_branch_heads(w, 0);
    }
    return 0;
}

static void meta_step(mh_pb_t *b, int part, int next_phase)
{
    bool done = true;
    int rc = b->o.meta ? b->o.meta(b->o.meta_ud, &b->w, part, OUT_CAP, &done) : meta_empty(&b->w, part);
    if (rc) fail(b, rc, "writing the metadata");
    wsync(b);
    if (done) b->phase = next_phase;
}

/* Runs the consumer until it needs a window, has OUT_CAP bytes pending,
 * ends, or fails. */
static int run_steps(mh_pb_t *b)
{
    for (;;) {
        if (b->err) return STOP_ERR;
        if (b->out.len >= OUT_CAP) return STOP_OUT;
        switch (b->phase) {
        case PH_HEAD: meta_step(b, MH_PB_META_HEAD, PH_SECTION); break;
        case PH_SECTION:
            if (b->o.version == 1) mh_packw_blobs(&b->w, (uint32_t)b->nbl);
            else mh_packw_frames(&b->w, (uint32_t)b->nun);
            wsync(b);
            b->phase = PH_ITEMS;
            break;
        case PH_ITEMS:
            if (b->cur == b->nit) b->phase = PH_TAIL;
            else if (!item_step(b)) return STOP_WIN;
            break;
        case PH_TAIL: meta_step(b, MH_PB_META_TAIL, PH_FINISH); break;
        case PH_FINISH: {
            int rc = mh_packw_finish(&b->w);
            if (rc) return fail(b, rc, "finishing the pack"), STOP_ERR;
            b->phase = PH_DONE;
            return STOP_DONE;
        }
        default: return STOP_DONE;
        }
    }
}

static void work_cb(uv_work_t *req)
{
    mh_pb_t *b = req->data;
    if (!b->planned) {
        if (plan(b) && !b->err) fail(b, MH_ENOMEM, "out of memory");
        return;
    }
    b->stop = run_steps(b);
    if (b->out.len) mh_sha256_update(b->h, b->out.p, b->out.len);
    if (b->stop == STOP_DONE) {
        uint8_t d[32];
        mh_sha256_final(b->h, d);
        mh_id_from_digest(&b->id, d);
    }
}

/* =============================================================== driver */

/* The loop side: reader windows in, output to the writer, budget. */

static void destroy(mh_pb_t *b)
{
    mh_store_reader_close(b->rd);
    if (b->wr) mh_store_writer_abort(b->wr);
    mh_budget_release(&b->res);
    mh_framer_free(b->fr);
    mh_zsizer_free(b->sz);
    mh_sha256_free(b->h);
    mh_sha256_free(b->vh);
    mh_packw_free(&b->w);
    mh_buf_free(&b->out);
    mh_idmap_free(&b->pack_map);
    mh_idmap_free(&b->sf_map);
    free(b->bl);
    free(b->packs);
    free(b->sf);
    free(b->order);
    free(b->tg);
    free(b->ub);
    free(b->it);
    free(b->un);
    free(b->sg);
    free(b->rg);
    free(b->ritem);
    free(b->iseg);
    free(b->content);
    free(b->refs);
    free(b->of);
    free(b);
}

/* The build's end: its callback, once (it may free b). */
static void end(mh_pb_t *b, int err)
{
    if (b->ended) return;
    b->ended = true;
    if (err && !b->err) fail(b, err, NULL);
    mh_store_reader_close(b->rd);
    b->rd = NULL;
    if (err) {
        if (b->wr) mh_store_writer_abort(b->wr);
        b->wr = NULL;
        stats.failed++;
    } else {
        stats.ok++;
        stats.built += b->st.frames_built;
        stats.reused += b->st.frames_reused;
        stats.large += b->st.frames_large;
        stats.bytes += b->st.bytes;
        stats.read += b->st.bytes_read;
    }
    /* What is still held: the open writer's chunks (keep_open). */
    if (!b->wr) mh_budget_release(&b->res);
    b->cb(b->ud, err);
}

static void queue_work(mh_pb_t *b);

static void window_cb(void *ud, int err, const mh_store_window_t *w)
{
    mh_pb_t *b = ud;
    if (err) {
        if (err == MH_ENOENT) {
            snprintf(b->whybuf, sizeof b->whybuf, "source pack %s is missing from the store",
                     b->packs[b->sg[b->rd_seg].pack].id);
            fail(b, MH_ESTORE, b->whybuf);
            err = MH_ESTORE;
        }
        end(b, err);
        return;
    }
    b->win = *w;
    b->have_win = true;
    b->wp = 0;
    b->wat = 0;
    b->rd_last = w->last;
    b->st.bytes_read += w->n;
    queue_work(b);
}

/* The current item needs bytes: the next window of its segment's reader,
 * opening that reader first when another one is open. */
static void want_window(mh_pb_t *b)
{
    uint32_t seg = b->iseg[b->cur];
    b->have_win = false;
    if (b->rd && b->rd_seg == seg && !b->rd_last) {
        mh_store_reader_next(b->rd);
        return;
    }
    mh_store_reader_close(b->rd);
    b->rd = NULL;
    if (seg == UINT32_MAX) {
        end(b, fail(b, MH_EINVAL, "the build needs bytes it did not plan to read"));
        return;
    }
    const seg_t *s = &b->sg[seg];
    char key[MH_MPACK_KEY_SIZE];
    mh_mpack_key(key, b->packs[s->pack].id);
    b->rd_seg = seg;
    b->rd_last = false;
    int rc = mh_store_reader_open_ranges(b->env.store, key, b->rg + s->first_range, s->nranges, MH_PB_READ_WINDOW,
                                         window_cb, b, &b->rd);
    if (rc) end(b, rc);
}

static void next_step(mh_pb_t *b);
static void reserve(mh_pb_t *b);

static void finished_cb(void *ud, int err, const uint8_t *sha256, uint64_t size)
{
    mh_pb_t *b = ud;
    (void)sha256;
    (void)size;
    b->wr = NULL; /* the store freed it */
    b->storing = false;
    if (b->freed) destroy(b);
    else end(b, err);
}

static void room_cb(void *ud, int err)
{
    mh_pb_t *b = ud;
    if (err) end(b, err);
    else next_step(b);
}

/* After a work call: the output goes out, then the next step. */
static void drain(mh_pb_t *b)
{
    if (!b->out.len) {
        next_step(b);
        return;
    }
    b->st.bytes += b->out.len;
    if (b->env.mem) {
        int rc = mh_buf_append(b->env.mem, b->out.p, b->out.len);
        b->out.len = 0;
        if (rc) end(b, rc);
        else next_step(b);
        return;
    }
    int rc = mh_store_writer_write(b->wr, b->out.p, b->out.len, room_cb, b);
    b->out.len = 0;
    if (rc) end(b, rc);
}

static void next_step(mh_pb_t *b)
{
    switch (b->stop) {
    case STOP_OUT: queue_work(b); return;
    case STOP_WIN: want_window(b); return;
    default: break;
    }
    mh_store_reader_close(b->rd);
    b->rd = NULL;
    if (b->env.mem || b->env.keep_open) {
        end(b, 0);
        return;
    }
    char key[MH_MPACK_KEY_SIZE];
    mh_mpack_key(key, b->id.s);
    b->storing = true;
    mh_store_writer_finish(b->wr, key, finished_cb, b);
}

static void after_work_cb(uv_work_t *req, int status)
{
    mh_pb_t *b = req->data;
    b->in_work = false;
    if (b->freed) {
        destroy(b);
        return;
    }
    if (status && !b->err) fail(b, MH_ECANCELED, "shutting down");
    if (b->err) {
        end(b, b->err);
        return;
    }
    if (b->dstate == D_PLAN) {
        reserve(b);
        return;
    }
    drain(b);
}

static void queue_work(mh_pb_t *b)
{
    b->in_work = true;
    b->work.data = b;
    int rc = uv_queue_work(b->env.loop, &b->work, work_cb, after_work_cb);
    if (rc) {
        b->in_work = false;
        end(b, MH_ENOMEM);
    }
}

/* Planned: the buffers and contexts the plan needs, then the run. */
static void start(mh_pb_t *b)
{
    b->dstate = D_RUN;
    size_t maxn = 1;
    for (size_t i = 0; i < b->nun; i++)
        if (b->un[i].n > maxn) maxn = b->un[i].n;
    b->refs = malloc(maxn * sizeof *b->refs);
    b->h = mh_sha256_new();
    if (b->o.verify) b->vh = mh_sha256_new();
    if (b->any_group) b->content = malloc((size_t)FRAME_T);
    if (!b->refs || !b->h || (b->o.verify && !b->vh) || (b->any_group && !b->content)) {
        end(b, fail(b, MH_ENOMEM, "out of memory"));
        return;
    }
    if (!b->env.mem) {
        mh_store_writer_opts_t wo = {false, 0};
        int rc = mh_store_writer_open(b->env.store, &wo, &b->wr);
        if (rc) {
            end(b, rc);
            return;
        }
    }
    if (b->o.version == 1) {
        mh_packw_init(&b->w, &b->out);
    } else {
        mh_packw_opts_t po = {b->level, b->o.meta_frame};
        mh_packw_init_v2(&b->w, &b->out, &po);
    }
    b->phase = PH_HEAD;
    queue_work(b);
}

static void reserved_cb(void *ud, int err)
{
    mh_pb_t *b = ud;
    if (err) {
        fail(b, err, err == MH_EBUDGET ? "the pack-memory budget stayed spent" : "the budget is closing");
        end(b, err);
    } else {
        start(b);
    }
}

static void reserve(mh_pb_t *b)
{
    b->mem = plan_mem(b, &b->env);
    b->st.mem = b->mem;
    b->dstate = D_RESERVE;
    if (!b->env.budget) {
        start(b);
        return;
    }
    mh_budget_acquire(&b->res, b->env.budget, b->mem, reserved_cb, b);
}

void mh_pb_run(mh_pb_t *b, const mh_pb_env_t *env, mh_pb_cb cb, void *ud)
{
    b->env = *env;
    b->cb = cb;
    b->ud = ud;
    b->running = true;
    b->dstate = D_PLAN;
    /* Planning sorts every blob: on the thread pool. */
    queue_work(b);
}

static void stored_cb(void *ud, int err, const uint8_t *sha256, uint64_t size)
{
    mh_pb_t *b = ud;
    (void)sha256;
    (void)size;
    b->wr = NULL;
    b->storing = false;
    mh_budget_release(&b->res);
    if (b->freed) {
        destroy(b);
        return;
    }
    b->store_cb(b->store_ud, err);
}

void mh_pb_store(mh_pb_t *b, mh_pb_cb cb, void *ud)
{
    char key[MH_MPACK_KEY_SIZE];
    mh_mpack_key(key, b->id.s);
    b->store_cb = cb;
    b->store_ud = ud;
    b->storing = true;
    mh_store_writer_finish(b->wr, key, stored_cb, b);
}

void mh_pb_free(mh_pb_t *b)
{
    if (!b) return;
    b->freed = true;
    /* Work on the thread pool may be reading the reader's window: the
     * end of the work frees everything. No callback of the reader (none
     * is due while work runs), the writer or the budget fires after
     * destroy. */
    if (b->in_work || b->storing) return;
    destroy(b); /* aborts a writer still open: nothing is kept */
}

/* ============================================================== results */

const mh_id_t *mh_pb_id(const mh_pb_t *b) { return &b->id; }

void mh_pb_stats(const mh_pb_t *b, mh_pb_stats_t *st) { *st = b->st; }

const mh_pb_outframe_t *mh_pb_frames(const mh_pb_t *b, size_t *n)
{
    *n = b->nof;
    return b->of;
}

void mh_pb_place(const mh_pb_t *b, size_t index, mh_pb_place_t *out)
{
    const pblob_t *x = &b->bl[index];
    *out = (mh_pb_place_t){x->id, x->out_frame, x->out_off, x->len};
}

const char *mh_pb_why(const mh_pb_t *b) { return b->err ? (b->why ? b->why : mh_strerror(b->err)) : NULL; }

size_t mh_pb_mem(const mh_pb_t *b) { return b->mem; }

int mh_pb_metrics_write(mh_buf_t *out)
{
    return mh_buf_printf(out,
                         "# HELP musehub_pack_builds_total Packs built (fetch, GC, server-side commits), by result.\n"
                         "# TYPE musehub_pack_builds_total counter\n"
                         "musehub_pack_builds_total{result=\"ok\"} %llu\n"
                         "musehub_pack_builds_total{result=\"error\"} %llu\n"
                         "# HELP musehub_pack_build_frames_total Frames written by the builder: compressed from "
                         "gathered blobs, copied verbatim from a source pack, or one large blob each.\n"
                         "# TYPE musehub_pack_build_frames_total counter\n"
                         "musehub_pack_build_frames_total{kind=\"built\"} %llu\n"
                         "musehub_pack_build_frames_total{kind=\"reused\"} %llu\n"
                         "musehub_pack_build_frames_total{kind=\"large\"} %llu\n"
                         "# HELP musehub_pack_build_bytes_total Bytes of the packs built.\n"
                         "# TYPE musehub_pack_build_bytes_total counter\n"
                         "musehub_pack_build_bytes_total %llu\n"
                         "# HELP musehub_pack_build_read_bytes_total Source pack bytes the builder read.\n"
                         "# TYPE musehub_pack_build_read_bytes_total counter\n"
                         "musehub_pack_build_read_bytes_total %llu\n",
                         (unsigned long long)stats.ok, (unsigned long long)stats.failed,
                         (unsigned long long)stats.built, (unsigned long long)stats.reused,
                         (unsigned long long)stats.large, (unsigned long long)stats.bytes,
                         (unsigned long long)stats.read);
}
