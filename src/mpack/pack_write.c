/*
 * pack_write.c — the mpack writer (SPEC 2 v1, 2.1 v2), streaming into a
 * heap buffer the caller may drain between calls, and the helper that
 * extracts a commit's metadata.
 *
 * The body map always has the same keys in the same order (v1: commits,
 * snapshots, blobs, branch_heads; v2: commits, snapshots, branch_heads,
 * frames, or meta, frames), so the bytes of a pack depend only on what is
 * put in it: the same fetch gives the same mpack id. The writer checks
 * its own protocol (section order, element counts, byte counts of
 * streamed content) and turns a misuse into a sticky MH_EINVAL, because a
 * short count would silently produce a pack whose headers lie about what
 * follows.
 *
 * v2 frames are written in the key order readers stream best: codec,
 * size, blobs, data (a reader then never buffers a frame). Because the
 * `data` bin header carries the compressed length, a frame's compressed
 * bytes must be known before they are written: a built frame is held
 * decompressed (a few MiB, the caller's target) and compressed in one
 * call at its end; a verbatim frame's length comes from its source; a
 * large single-blob frame's length comes from a first pass through
 * mh_zsizer_t (frame.c explains why the two passes agree). The `meta`
 * frame is compressed as the metadata is written, and only its
 * compressed bytes are held until mh_packw_frames writes them.
 *
 * w->pos counts the bytes appended to `out` (a wrapper around every
 * public call measures out->len before and after), so offsets stay right
 * whatever the caller drains.
 */
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "mpack_internal.h"

enum { W_HEADER, W_COMMITS, W_SNAPSHOTS, W_BLOBS, W_HEADS, W_FRAMES };
enum { F_NONE, F_BUILT, F_COPY, F_LARGE }; /* the frame being written */

#define META_PUMP ((size_t)128 << 10) /* metadata bytes buffered before compressing them */

typedef struct {
    char id[MH_ID_LEN];
    uint64_t len;
} fblob_t;

struct mh__packw_z {
    int level;
    bool meta_frame;
    ZSTD_CCtx *cctx;
    /* meta frame */
    mh_buf_t mraw;     /* metadata msgpack not yet compressed */
    mh_buf_t mcomp;    /* the meta frame's compressed bytes */
    uint64_t msize;    /* metadata bytes written in all */
    bool mstarted;
    /* the frame being written */
    int fkind;
    int codec;
    mh_buf_t raw;      /* F_BUILT: the decompressed content */
    mh_buf_t comp;     /* F_BUILT: its compressed bytes */
    fblob_t *blobs;    /* F_BUILT: its blobs */
    size_t nb, cb;
    uint64_t rleft;    /* F_LARGE: content bytes still due */
    uint64_t dleft;    /* F_COPY/F_LARGE: data bytes still due */
    uint64_t dout;     /* F_LARGE: compressed bytes written */
    uint64_t size;
};

static void wfail(mh_packw_t *w, int err)
{
    if (!w->err) w->err = err;
}

/* Syncs the sticky error of the inner msgpack writer. */
static void wsync(mh_packw_t *w)
{
    if (w->mp.err) wfail(w, w->mp.err);
}

/* Every public call is bracketed so that w->pos counts what it appended. */
#define ENTER(w) size_t o0_ = (w)->out->len
#define LEAVE(w) ((w)->pos += (w)->out->len >= o0_ ? (w)->out->len - o0_ : 0)

void mh_packw_init(mh_packw_t *w, mh_buf_t *out)
{
    memset(w, 0, sizeof(*w));
    w->out = out;
    w->version = 1;
    ENTER(w);
    mh_mpw_init(&w->mp, out);
    mh_mpw_raw(&w->mp, "MUSE\x01", 5);
    mh_mpw_map(&w->mp, 4);
    w->state = W_HEADER;
    wsync(w);
    LEAVE(w);
}

void mh_packw_init_v2(mh_packw_t *w, mh_buf_t *out, const mh_packw_opts_t *opts)
{
    memset(w, 0, sizeof(*w));
    w->out = out;
    w->version = 2;
    w->state = W_HEADER;
    ENTER(w);
    mh_packw_opts_t o = opts ? *opts : (mh_packw_opts_t){0};
    w->z = calloc(1, sizeof *w->z);
    if (!w->z) {
        wfail(w, MH_ENOMEM);
        return;
    }
    if (mh__zlevel(o.level, &w->z->level)) {
        wfail(w, MH_EINVAL);
        return;
    }
    w->z->meta_frame = o.meta_frame;
    mh_mpw_init(&w->mp, out);
    mh_mpw_raw(&w->mp, "MUSE\x02", 5);
    mh_mpw_map(&w->mp, o.meta_frame ? 2 : 4);
    wsync(w);
    if (o.meta_frame) {
        /* The metadata goes to the meta frame: a 3-key map of its own. */
        mh_mpw_init(&w->mp, &w->z->mraw);
        mh_mpw_map(&w->mp, 3);
        wsync(w);
    }
    LEAVE(w);
}

static ZSTD_CCtx *cctx(mh_packw_t *w)
{
    if (!w->z->cctx && !(w->z->cctx = ZSTD_createCCtx())) wfail(w, MH_ENOMEM);
    return w->z->cctx;
}

/* Appends compressor output for `in` (mode continue or end) to dst. */
static int zpump(mh_packw_t *w, mh_buf_t *dst, ZSTD_inBuffer *in, ZSTD_EndDirective mode, uint64_t *count)
{
    for (;;) {
        if (mh_buf_reserve(dst, ZSTD_CStreamOutSize())) return MH_ENOMEM;
        ZSTD_outBuffer o = {dst->p + dst->len, dst->cap - dst->len, 0};
        size_t left = ZSTD_compressStream2(w->z->cctx, &o, in, mode);
        if (ZSTD_isError(left)) return MH_EINVAL;
        dst->len += o.pos;
        if (count) *count += o.pos;
        if (mode == ZSTD_e_end ? left == 0 : in->pos == in->size) return 0;
    }
}

/* Meta frame: compresses what is buffered (all of it with `end`). */
static void meta_pump(mh_packw_t *w, bool end)
{
    struct mh__packw_z *z = w->z;
    if (w->err || (!end && z->mraw.len < META_PUMP)) return;
    if (!z->mstarted) {
        if (!cctx(w)) return;
        int rc = mh__zcctx_frame(z->cctx, z->level, UINT64_MAX); /* size unknown until the end */
        if (rc) {
            wfail(w, rc);
            return;
        }
        z->mstarted = true;
    }
    ZSTD_inBuffer in = {z->mraw.p, z->mraw.len, 0};
    z->msize += z->mraw.len;
    int rc = zpump(w, &z->mcomp, &in, end ? ZSTD_e_end : ZSTD_e_continue, NULL);
    if (rc) wfail(w, rc);
    z->mraw.len = 0;
}

/* After an element: pump metadata into the meta compressor. */
static void after_elem(mh_packw_t *w)
{
    wsync(w);
    if (w->z && w->z->meta_frame && w->state <= W_HEADS) meta_pump(w, false);
}

/* The state each section follows, by version. */
static int prev_of(const mh_packw_t *w, int section)
{
    if (w->version == 1) return section - 1;
    switch (section) {
    case W_COMMITS: return W_HEADER;
    case W_SNAPSHOTS: return W_COMMITS;
    case W_HEADS: return W_SNAPSHOTS;
    case W_FRAMES: return W_HEADS;
    default: return -1; /* blobs: not in v2 */
    }
}

/* Opens section `section`: it must follow its predecessor with all of
 * the predecessor's elements given. */
static void open_section(mh_packw_t *w, int section, const char *key, uint32_t n, bool is_map)
{
    if (w->err) return;
    if (w->state != prev_of(w, section) || w->left || w->blob_left) {
        wfail(w, MH_EINVAL);
        return;
    }
    mh_mpw_cstr(&w->mp, key);
    if (is_map) mh_mpw_map(&w->mp, n);
    else mh_mpw_arr(&w->mp, n);
    w->state = section;
    w->left = n;
    wsync(w);
}

/* Accounts for one element of the current section. */
static bool take(mh_packw_t *w, int state)
{
    if (w->err) return false;
    if (w->state != state || w->left == 0 || w->blob_left || (w->z && w->z->fkind != F_NONE)) {
        wfail(w, MH_EINVAL);
        return false;
    }
    w->left--;
    return true;
}

static void put_kv(mh_packw_t *w, const char *key, mh_str_t v)
{
    mh_mpw_cstr(&w->mp, key);
    mh_mpw_str(&w->mp, v.p, v.n);
}

static void put_kv_opt_id(mh_packw_t *w, const char *key, mh_str_t v)
{
    mh_mpw_cstr(&w->mp, key);
    if (v.p) mh_mpw_str(&w->mp, v.p, v.n);
    else mh_mpw_nil(&w->mp);
}

/* Reads a msgpack map (want_map) or array header: count and header size.
 * false when p does not start with one. */
static bool container_header(const uint8_t *p, size_t n, bool want_map, uint32_t *count, size_t *hlen)
{
    if (n == 0) return false;
    uint8_t c = p[0], fix = want_map ? 0x80 : 0x90, w16 = want_map ? 0xde : 0xdc;
    if ((c & 0xf0) == fix) {
        *count = c & 0x0f;
        *hlen = 1;
    } else if (c == w16 && n >= 3) {
        *count = (uint32_t)p[1] << 8 | p[2];
        *hlen = 3;
    } else if (c == w16 + 1 && n >= 5) {
        *count = (uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 8 | p[4];
        *hlen = 5;
    } else {
        return false;
    }
    return true;
}

void mh_packw_commits(mh_packw_t *w, uint32_t n)
{
    ENTER(w);
    open_section(w, W_COMMITS, "commits", n, false);
    LEAVE(w);
}

void mh_packw_commit(mh_packw_t *w, mh_str_t commit_id, mh_str_t parent, mh_str_t parent2, mh_str_t snapshot_id,
                     mh_str_t message, mh_str_t author, mh_str_t committed_at, mh_str_t branch,
                     const uint8_t *meta, size_t meta_len)
{
    uint32_t nmeta = 0;
    size_t hlen = 0;
    if (meta && meta_len && (!container_header(meta, meta_len, true, &nmeta, &hlen) || nmeta > UINT32_MAX - 8)) {
        wfail(w, MH_EINVAL);
        return;
    }
    if (!take(w, W_COMMITS)) return;
    ENTER(w);
    mh_mpw_map(&w->mp, 8 + nmeta);
    put_kv(w, "commit_id", commit_id);
    put_kv_opt_id(w, "parent_commit_id", parent);
    put_kv_opt_id(w, "parent2_commit_id", parent2);
    put_kv(w, "snapshot_id", snapshot_id);
    put_kv(w, "message", message);
    put_kv(w, "author", author);
    put_kv(w, "committed_at", committed_at);
    put_kv(w, "branch", branch);
    if (nmeta) mh_mpw_raw(&w->mp, meta + hlen, meta_len - hlen); /* the pairs, verbatim */
    after_elem(w);
    LEAVE(w);
}

void mh_packw_snapshots(mh_packw_t *w, uint32_t n)
{
    ENTER(w);
    open_section(w, W_SNAPSHOTS, "snapshots", n, false);
    LEAVE(w);
}

void mh_packw_snapshot(mh_packw_t *w, mh_str_t snapshot_id, mh_str_t parent, const uint8_t *upsert_mp,
                       size_t upsert_len, const uint8_t *remove_mp, size_t remove_len)
{
    uint32_t cnt;
    size_t hlen;
    if ((upsert_len && !container_header(upsert_mp, upsert_len, true, &cnt, &hlen)) ||
        (remove_len && !container_header(remove_mp, remove_len, false, &cnt, &hlen))) {
        wfail(w, MH_EINVAL);
        return;
    }
    if (!take(w, W_SNAPSHOTS)) return;
    ENTER(w);
    mh_mpw_map(&w->mp, 4);
    put_kv(w, "snapshot_id", snapshot_id);
    put_kv_opt_id(w, "parent_snapshot_id", parent);
    mh_mpw_cstr(&w->mp, "delta_upsert");
    if (upsert_len) mh_mpw_raw(&w->mp, upsert_mp, upsert_len);
    else mh_mpw_map(&w->mp, 0);
    mh_mpw_cstr(&w->mp, "delta_remove");
    if (remove_len) mh_mpw_raw(&w->mp, remove_mp, remove_len);
    else mh_mpw_arr(&w->mp, 0);
    after_elem(w);
    LEAVE(w);
}

void mh_packw_blobs(mh_packw_t *w, uint32_t n)
{
    ENTER(w);
    open_section(w, W_BLOBS, "blobs", n, false);
    LEAVE(w);
}

void mh_packw_blob(mh_packw_t *w, mh_str_t object_id, const void *content, size_t len)
{
    if (!take(w, W_BLOBS)) return;
    ENTER(w);
    mh_mpw_map(&w->mp, 2);
    put_kv(w, "object_id", object_id);
    mh_mpw_cstr(&w->mp, "content");
    mh_mpw_bin(&w->mp, content, len);
    wsync(w);
    LEAVE(w);
}

void mh_packw_blob_begin(mh_packw_t *w, mh_str_t object_id, uint64_t len)
{
    if (len > UINT32_MAX) { /* a msgpack bin holds at most 4 GiB - 1 */
        wfail(w, MH_EINVAL);
        return;
    }
    if (!take(w, W_BLOBS)) return;
    ENTER(w);
    mh_mpw_map(&w->mp, 2);
    put_kv(w, "object_id", object_id);
    mh_mpw_cstr(&w->mp, "content");
    mh_mpw_bin_header(&w->mp, (size_t)len);
    w->blob_left = len;
    wsync(w);
    LEAVE(w);
}

/* Appends to out, counting the bytes against *left. */
static void put_bytes(mh_packw_t *w, const void *p, size_t n, uint64_t *left)
{
    if (n && mh_buf_append(w->out, p, n)) wfail(w, MH_ENOMEM);
    else *left -= n;
}

void mh_packw_blob_data(mh_packw_t *w, const void *p, size_t n)
{
    if (w->err) return;
    if (n > w->blob_left) {
        wfail(w, MH_EINVAL);
        return;
    }
    ENTER(w);
    put_bytes(w, p, n, &w->blob_left);
    LEAVE(w);
}

void mh_packw_branch_heads(mh_packw_t *w, uint32_t n)
{
    ENTER(w);
    open_section(w, W_HEADS, "branch_heads", n, true);
    LEAVE(w);
}

void mh_packw_branch_head(mh_packw_t *w, mh_str_t branch, mh_str_t commit_id)
{
    if (!take(w, W_HEADS)) return;
    ENTER(w);
    mh_mpw_str(&w->mp, branch.p, branch.n);
    mh_mpw_str(&w->mp, commit_id.p, commit_id.n);
    after_elem(w);
    LEAVE(w);
}

/* ------------------------------------------------------------- frames */

static const char *codec_name(int codec)
{
    return codec == MH_PACK_ZSTD ? "zstd" : "none";
}

void mh_packw_frames(mh_packw_t *w, uint32_t n)
{
    if (w->err) return;
    if (w->version != 2 || w->state != W_HEADS || w->left) {
        wfail(w, MH_EINVAL);
        return;
    }
    ENTER(w);
    struct mh__packw_z *z = w->z;
    if (z->meta_frame) {
        meta_pump(w, true);
        mh_mpw_init(&w->mp, w->out);
        mh_mpw_cstr(&w->mp, "meta");
        mh_mpw_map(&w->mp, 3);
        mh_mpw_cstr(&w->mp, "codec");
        mh_mpw_cstr(&w->mp, "zstd");
        mh_mpw_cstr(&w->mp, "size");
        mh_mpw_uint(&w->mp, z->msize);
        mh_mpw_cstr(&w->mp, "data");
        mh_mpw_bin_header(&w->mp, z->mcomp.len);
        wsync(w);
        if (!w->err) {
            w->frame_offset = w->pos + (w->out->len - o0_);
            w->frame_length = z->mcomp.len;
            w->frame_size = z->msize;
            if (mh_buf_append(w->out, z->mcomp.p, z->mcomp.len)) wfail(w, MH_ENOMEM);
        }
        mh_buf_free(&z->mcomp);
        mh_buf_free(&z->mraw);
    }
    mh_mpw_cstr(&w->mp, "frames");
    mh_mpw_arr(&w->mp, n);
    w->state = W_FRAMES;
    w->left = n;
    wsync(w);
    LEAVE(w);
}

/* Starts a frame of any kind: one element of the frames section. */
static bool frame_open(mh_packw_t *w, int kind, int codec)
{
    if (w->err) return false;
    if (w->version != 2 || w->state != W_FRAMES || w->left == 0 || w->z->fkind != F_NONE ||
        (codec != MH_PACK_ZSTD && codec != MH_PACK_NONE)) {
        wfail(w, MH_EINVAL);
        return false;
    }
    w->left--;
    w->z->fkind = kind;
    w->z->codec = codec;
    return true;
}

/* The frame map up to the data's bytes: {codec, size, blobs, data: bin
 * header}; blobs from the built list, or (ids, lens) given. */
static void frame_head(mh_packw_t *w, uint64_t size, const mh_packw_blobref_t *refs, uint32_t n, uint64_t data_len,
                       size_t o0)
{
    struct mh__packw_z *z = w->z;
    if (data_len > UINT32_MAX) { /* a msgpack bin holds at most 4 GiB - 1 */
        wfail(w, MH_EINVAL);
        return;
    }
    mh_mpw_map(&w->mp, 4);
    mh_mpw_cstr(&w->mp, "codec");
    mh_mpw_cstr(&w->mp, codec_name(z->codec));
    mh_mpw_cstr(&w->mp, "size");
    mh_mpw_uint(&w->mp, size);
    mh_mpw_cstr(&w->mp, "blobs");
    mh_mpw_arr(&w->mp, n);
    for (uint32_t i = 0; i < n; i++) {
        mh_mpw_arr(&w->mp, 2);
        if (refs) {
            mh_mpw_str(&w->mp, refs[i].object_id.p, refs[i].object_id.n);
            mh_mpw_uint(&w->mp, refs[i].length);
        } else {
            mh_mpw_str(&w->mp, z->blobs[i].id, MH_ID_LEN);
            mh_mpw_uint(&w->mp, z->blobs[i].len);
        }
    }
    mh_mpw_cstr(&w->mp, "data");
    mh_mpw_bin_header(&w->mp, (size_t)data_len);
    wsync(w);
    w->frame_offset = w->pos + (w->out->len - o0);
    w->frame_length = data_len;
    w->frame_size = size;
}

enum { DUE_NONE, DUE_BLOB, DUE_DATA, DUE_RAW }; /* which count bounds a frame call's bytes */

/* The v2 state when a frame of `kind` is open and `n` bytes fit in what
 * is still due (the current blob's content, the data, the raw content;
 * DUE_NONE: nothing may be due); otherwise a misuse (NULL). */
static struct mh__packw_z *frame_in(mh_packw_t *w, int kind, uint64_t n, int due)
{
    if (w->err) return NULL;
    struct mh__packw_z *z = w->z;
    uint64_t left = !z ? 0 : due == DUE_BLOB ? w->blob_left : due == DUE_DATA ? z->dleft : due == DUE_RAW ? z->rleft : 0;
    if (!z || z->fkind != kind || n > left) {
        wfail(w, MH_EINVAL);
        return NULL;
    }
    return z;
}

void mh_packw_frame_begin(mh_packw_t *w, int codec)
{
    if (!frame_open(w, F_BUILT, codec)) return;
    w->z->raw.len = 0;
    w->z->nb = 0;
}

void mh_packw_frame_blob(mh_packw_t *w, mh_str_t object_id, uint64_t len)
{
    struct mh__packw_z *z = frame_in(w, F_BUILT, w->blob_left, DUE_NONE); /* the previous blob is complete */
    if (!z) return;
    if (!mh_id_ok(object_id.p, object_id.n) || len > (uint64_t)SIZE_MAX - z->raw.len) {
        wfail(w, MH_EINVAL);
        return;
    }
    if (z->nb == z->cb) {
        size_t nc = z->cb ? z->cb * 2 : 64;
        fblob_t *g = realloc(z->blobs, nc * sizeof *g);
        if (!g) {
            wfail(w, MH_ENOMEM);
            return;
        }
        z->blobs = g;
        z->cb = nc;
    }
    memcpy(z->blobs[z->nb].id, object_id.p, MH_ID_LEN);
    z->blobs[z->nb++].len = len;
    w->blob_left = len;
}

void mh_packw_frame_data(mh_packw_t *w, const void *p, size_t n)
{
    struct mh__packw_z *z = frame_in(w, F_BUILT, n, DUE_BLOB);
    if (!z) return;
    if (n && mh_buf_append(&z->raw, p, n)) {
        wfail(w, MH_ENOMEM);
        return;
    }
    w->blob_left -= n;
}

static void built_end(mh_packw_t *w, size_t o0)
{
    struct mh__packw_z *z = w->z;
    uint64_t size = z->raw.len;
    if (z->nb > UINT32_MAX || (z->nb != 1 && size > MH_PACK_FRAME_MAX)) {
        wfail(w, MH_EINVAL);
        return;
    }
    const uint8_t *data = z->raw.p;
    size_t dlen = z->raw.len;
    if (z->codec == MH_PACK_ZSTD) {
        size_t bound = ZSTD_compressBound(dlen);
        z->comp.len = 0;
        if (!cctx(w)) return;
        if (mh_buf_reserve(&z->comp, bound)) {
            wfail(w, MH_ENOMEM);
            return;
        }
        int rc = mh__zcctx_frame(z->cctx, z->level, size);
        size_t got = rc ? 0 : ZSTD_compress2(z->cctx, z->comp.p, z->comp.cap, dlen ? z->raw.p : (const void *)"", dlen);
        if (rc || ZSTD_isError(got)) {
            wfail(w, rc ? rc : MH_ENOMEM);
            return;
        }
        data = z->comp.p;
        dlen = got;
    }
    frame_head(w, size, NULL, (uint32_t)z->nb, dlen, o0);
    if (!w->err && dlen && mh_buf_append(w->out, data, dlen)) wfail(w, MH_ENOMEM);
    /* Keep the buffers for the next frame, but not huge ones. */
    if (z->raw.cap > 2 * MH_PACK_FRAME_MAX) mh_buf_free(&z->raw);
    if (z->comp.cap > 2 * MH_PACK_FRAME_MAX) mh_buf_free(&z->comp);
}

void mh_packw_frame_put(mh_packw_t *w, const mh_packw_blobref_t *blobs, uint32_t nblobs, const void *raw, size_t len)
{
    uint64_t sum = 0;
    for (uint32_t i = 0; i < nblobs && !w->err; i++) {
        if (!mh_id_ok(blobs[i].object_id.p, blobs[i].object_id.n) || blobs[i].length > UINT64_MAX - sum) break;
        sum += blobs[i].length;
    }
    if (w->err) return;
    if (sum != len || (nblobs != 1 && len > MH_PACK_FRAME_MAX) || (len && !raw)) {
        wfail(w, MH_EINVAL);
        return;
    }
    if (!frame_open(w, F_BUILT, MH_PACK_ZSTD)) return;
    struct mh__packw_z *z = w->z;
    const uint8_t *data = raw;
    size_t dlen = len;
    z->comp.len = 0;
    if (!cctx(w)) return;
    if (mh_buf_reserve(&z->comp, ZSTD_compressBound(len))) {
        wfail(w, MH_ENOMEM);
        return;
    }
    int rc = mh__zcctx_frame(z->cctx, z->level, len);
    size_t got = rc ? 0 : ZSTD_compress2(z->cctx, z->comp.p, z->comp.cap, len ? raw : (const void *)"", len);
    if (rc || ZSTD_isError(got)) {
        wfail(w, rc ? rc : MH_ENOMEM);
        return;
    }
    /* Content zstd cannot shrink (already-compressed media) is stored as
     * is: the same bytes, and no decompression for its readers. */
    if (got < len) {
        data = z->comp.p;
        dlen = got;
    } else {
        z->codec = MH_PACK_NONE;
    }
    ENTER(w);
    frame_head(w, len, blobs, nblobs, dlen, o0_);
    if (!w->err && dlen && mh_buf_append(w->out, data, dlen)) wfail(w, MH_ENOMEM);
    w->frame_codec = z->codec;
    z->fkind = F_NONE;
    if (z->comp.cap > 2 * MH_PACK_FRAME_MAX) mh_buf_free(&z->comp);
    LEAVE(w);
}

void mh_packw_frame_copy_begin(mh_packw_t *w, int codec, uint64_t size, const mh_packw_blobref_t *blobs,
                               uint32_t nblobs, uint64_t data_len)
{
    uint64_t sum = 0;
    for (uint32_t i = 0; i < nblobs; i++) {
        if (!mh_id_ok(blobs[i].object_id.p, blobs[i].object_id.n) || blobs[i].length > UINT64_MAX - sum) {
            wfail(w, MH_EINVAL);
            return;
        }
        sum += blobs[i].length;
    }
    if (sum != size || (nblobs != 1 && size > MH_PACK_FRAME_MAX) || (codec == MH_PACK_NONE && data_len != size)) {
        wfail(w, MH_EINVAL);
        return;
    }
    if (!frame_open(w, F_COPY, codec)) return;
    ENTER(w);
    frame_head(w, size, blobs, nblobs, data_len, o0_);
    w->z->dleft = data_len;
    LEAVE(w);
}

void mh_packw_frame_copy_data(mh_packw_t *w, const void *p, size_t n)
{
    struct mh__packw_z *z = frame_in(w, F_COPY, n, DUE_DATA);
    if (!z) return;
    ENTER(w);
    put_bytes(w, p, n, &z->dleft);
    LEAVE(w);
}

void mh_packw_frame_large_begin(mh_packw_t *w, int codec, mh_str_t object_id, uint64_t size, uint64_t data_len)
{
    if (!mh_id_ok(object_id.p, object_id.n) || (codec == MH_PACK_NONE && data_len != size) || size == UINT64_MAX) {
        wfail(w, MH_EINVAL);
        return;
    }
    if (!frame_open(w, F_LARGE, codec)) return;
    struct mh__packw_z *z = w->z;
    if (codec == MH_PACK_ZSTD) {
        if (!cctx(w)) return;
        int rc = mh__zcctx_frame(z->cctx, z->level, size);
        if (rc) {
            wfail(w, rc);
            return;
        }
    }
    ENTER(w);
    mh_packw_blobref_t one = {object_id, size};
    frame_head(w, size, &one, 1, data_len, o0_);
    z->rleft = size;
    z->dleft = data_len;
    z->dout = 0;
    LEAVE(w);
}

void mh_packw_frame_large_data(mh_packw_t *w, const void *p, size_t n)
{
    struct mh__packw_z *z = frame_in(w, F_LARGE, n, DUE_RAW);
    if (!z) return;
    ENTER(w);
    z->rleft -= n;
    if (z->codec == MH_PACK_NONE) {
        put_bytes(w, p, n, &z->dleft);
    } else {
        ZSTD_inBuffer in = {p, n, 0};
        int rc = zpump(w, w->out, &in, ZSTD_e_continue, &z->dout);
        if (rc) wfail(w, rc);
        else if (z->dout > z->dleft) wfail(w, MH_EINVAL); /* longer than announced: the sizer disagreed */
    }
    LEAVE(w);
}

void mh_packw_frame_end(mh_packw_t *w)
{
    struct mh__packw_z *z = w->z;
    if (w->err) return;
    if (!z || z->fkind == F_NONE || w->blob_left) {
        wfail(w, MH_EINVAL);
        return;
    }
    ENTER(w);
    switch (z->fkind) {
    case F_BUILT: built_end(w, o0_); break;
    case F_COPY:
        if (z->dleft) wfail(w, MH_EINVAL);
        break;
    case F_LARGE:
        if (z->rleft) {
            wfail(w, MH_EINVAL);
        } else if (z->codec == MH_PACK_ZSTD) {
            ZSTD_inBuffer in = {NULL, 0, 0};
            int rc = zpump(w, w->out, &in, ZSTD_e_end, &z->dout);
            if (rc) wfail(w, rc);
            else if (z->dout != z->dleft) wfail(w, MH_EINVAL);
        } else if (z->dleft) {
            wfail(w, MH_EINVAL);
        }
        break;
    }
    w->frame_codec = z->codec;
    z->fkind = F_NONE;
    LEAVE(w);
}

void mh_packw_free(mh_packw_t *w)
{
    struct mh__packw_z *z = w->z;
    if (!z) return;
    ZSTD_freeCCtx(z->cctx);
    mh_buf_free(&z->mraw);
    mh_buf_free(&z->mcomp);
    mh_buf_free(&z->raw);
    mh_buf_free(&z->comp);
    free(z->blobs);
    free(z);
    w->z = NULL;
}

int mh_packw_finish(mh_packw_t *w)
{
    int last = w->version == 2 ? W_FRAMES : W_HEADS;
    if (!w->err && (w->state != last || w->left || w->blob_left || (w->z && w->z->fkind != F_NONE)))
        wfail(w, MH_EINVAL);
    mh_packw_free(w);
    return w->err;
}

/* ------------------------------------------------------------ metadata */

static const char *const std_keys[8] = {"commit_id", "parent_commit_id", "parent2_commit_id", "snapshot_id",
                                        "message",   "author",           "committed_at",      "branch"};

static bool is_std_key(const mh_val_t *k)
{
    if (k->t != MH_V_STR) return false;
    for (int i = 0; i < 8; i++) {
        size_t n = strlen(std_keys[i]);
        if (k->v.s.n == n && memcmp(k->v.s.p, std_keys[i], n) == 0) return true;
    }
    return false;
}

int mh_pack_commit_meta(const mh_pack_commit_t *c, mh_buf_t *out, uint32_t *count)
{
    const mh_val_t *m = c->map;
    uint32_t n = 0;
    for (uint32_t i = 0; m && i < m->v.m.n; i++) n += !is_std_key(&m->v.m.kv[i].k);
    if (count) *count = n;
    size_t mark = out->len;
    mh_mpw_t w;
    mh_mpw_init(&w, out);
    mh_mpw_map(&w, n);
    for (uint32_t i = 0; m && i < m->v.m.n && !w.err; i++) {
        if (is_std_key(&m->v.m.kv[i].k)) continue;
        mh_mpw_val(&w, &m->v.m.kv[i].k);
        mh_mpw_val(&w, &m->v.m.kv[i].v);
    }
    if (w.err) out->len = mark;
    return w.err;
}
