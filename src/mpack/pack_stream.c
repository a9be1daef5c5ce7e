/*
 * pack_stream.c — the streaming pack reader (mpack.h, mh_packr_*): v0, v1
 * and v2 (SPEC 2, 2.1) fed in chunks of any size.
 *
 * Layers, bottom up:
 *  - a msgpack tokenizer that reads one token header at a time, staging
 *    the (at most 9) header bytes when a chunk ends inside one;
 *  - a value walker that passes over one whole value (any nesting) either
 *    skipping it or capturing its bytes, applying the document's bounds
 *    (nesting depth, total items, counts against the bytes left when the
 *    length is known) exactly as the whole-buffer decoder does. A capture
 *    that lies inside one chunk is a pointer span; one that crosses chunk
 *    ends is copied into a growing buffer;
 *  - the pack grammar (a state machine, one step function per state):
 *    body keys; commits/snapshots/branch_heads captured element by
 *    element, then decoded into the arena and checked by pack_elem.c;
 *    v1 blob maps walked key by key with the content's bytes hashed as
 *    they pass; v2 frame maps walked key by key with `data` streamed
 *    into the frame sink;
 *  - the frame sink: `none` data passes as is, `zstd` data goes through
 *    ZSTD_decompressStream into a fixed 128 KiB buffer whose size is
 *    clamped so that no more than size + 1 bytes can ever come out (the
 *    zip-bomb guard stops at once); the decompressed bytes are split at
 *    the frame's blob lengths and hashed (MH_PACKR_VERIFY), or, for the
 *    `meta` frame, fed to a second instance of the grammar (the inner
 *    parser) that reads the metadata map.
 * Nothing is sized from a count: arrays grow as elements arrive, so a
 * lying count costs nothing but an error at the end.
 * A frame whose `data` comes before the keys needed to stream it (codec,
 * size, and for a blob frame its complete `blobs`) has its compressed
 * bytes buffered up to limits.max_reorder and processed at the map's end.
 */
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "mpack_internal.h"

const mh_pack_limits_t mh_pack_limits_default = {
    .max_depth = 16,
    .max_items = 64u << 20,
    .max_commits = 16u << 20,
    .max_snapshots = 16u << 20,
    .max_blobs = 16u << 20,
    .max_frames = 16u << 20,
    .max_meta_bytes = (uint64_t)1 << 30,
    .max_unpacked = (uint64_t)16 << 30,
    .max_frame_size = MH_PACK_FRAME_MAX,
    .max_reorder = (uint64_t)64 << 20,
    .max_window_log = 24,
};

#define KEY_CAP 24    /* a key longer than this (encoded) is no key we know */
#define SMALL_CAP 128 /* object_id, codec, size, [id, length] */
#define ZOUT_CAP ((size_t)128 << 10)

/* ---------------------------------------------------------------- types */

typedef struct {
    mh_vtype_t t;
    uint64_t n; /* ARR/MAP count, STR/BIN length, UINT value */
} tok_t;

enum { K_COMMITS, K_SNAPSHOTS, K_BLOBS, K_OBJECTS, K_HEADS, K_FRAMES, K_META, K_NBODY, K_UNKNOWN = 31 };
static const char *const body_key_name[K_NBODY] = {"commits", "snapshots", "blobs", "objects",
                                                    "branch_heads", "frames", "meta"};
enum { BK_ID, BK_CONTENT, BK_N };
static const char *const blob_key_name[BK_N] = {"object_id", "content"};
enum { FK_CODEC, FK_SIZE, FK_BLOBS, FK_DATA, FK_N };
static const char *const frame_key_name[FK_N] = {"codec", "size", "blobs", "data"};

/* Grammar states. *_W states run when the walk started by the state
 * before them has ended (the captured value is in s->val). */
enum {
    P_MAGIC, P_BODY, P_KEY, P_KEY_W, P_VAL, P_NEXT, P_END,
    P_SECT, P_ELEM, P_ELEM_W, P_HEADS_W,
    P_BLOBS, P_BLOB, P_BKEY, P_BKEY_W, P_BVAL, P_BID_W, P_BCONTENT, P_BEND,
    P_FRAMES, P_FRAME, P_FMAP, P_FKEY, P_FKEY_W, P_FVAL, P_FCODEC_W, P_FSIZE_W, P_FBLOB, P_FBLOB_W, P_FPAY, P_FEND,
    P_WALK,
};

enum { W_SKIP, W_CAP_SOFT, W_CAP_META };    /* walk modes */
enum { D_STREAM, D_REORDER, D_SKIP };       /* what happens to a frame's data */
enum { FR_BLOBS, FR_META };                 /* frame kinds */

typedef struct ps ps_t;

/* One msgpack byte stream under the pack grammar: the pack itself
 * (outer), or the decompressed `meta` frame (inner). */
struct ps {
    mh_packr_t *r;
    bool inner;
    bool borrow;           /* chunks outlive the reader (outer + MH_PACKR_BORROW) */
    const char *pfx;       /* "pack" / "meta" */
    const char *sect_name[K_NBODY]; /* "commits" / "meta.commits", ... */
    int st;
    uint64_t total;        /* stream length when known, else 0 */
    const uint8_t *chunk, *p, *end; /* the chunk being fed */
    uint64_t cbase;        /* stream offset of chunk[0] */
    /* token header staging */
    uint8_t hdr[9], hn, hneed;
    /* value walker */
    uint64_t *rem;         /* values left per open level (a map's 2n keys and values) */
    uint32_t wtop, wbase;  /* levels in use; document depth of the walked value */
    uint64_t wpay;         /* str/bin payload bytes left */
    int wmode, wret;
    size_t wcap;           /* capture limit (bytes) */
    bool wover;            /* capture overflowed (W_CAP_SOFT: it went on as a skip) */
    const uint8_t *cap_from;
    mh_buf_t capbuf;       /* captured bytes of earlier chunks */
    const uint8_t *val;    /* the captured value, after a walk */
    size_t vlen;
    bool vspan;            /* val points into the current chunk */
    /* body */
    uint32_t pairs;
    unsigned seen;
    int key;
    uint32_t elems;        /* elements left in the current array */
    size_t eidx;           /* index of the current element */
    uint32_t mpairs;       /* pairs left in the current blob/frame map */
    unsigned mseen;
    int mkey;
};

/* A v1 blob being read. */
typedef struct {
    bool have_id, have_content;
    uint8_t id[32];
    uint64_t off, len, left;
} vblob_t;

/* The v2 frame being read. */
typedef struct {
    int kind;
    size_t idx;
    uint8_t codec;
    uint64_t size;
    uint32_t first, n;     /* blob records */
    uint32_t bleft;        /* entries left in `blobs` */
    uint64_t bsum;
    uint64_t doff, dlen, dleft;
    int dmode;
    mh_buf_t reorder;
    /* sink */
    uint64_t produced;
    bool zdone;
    mh__bcur_t bc;         /* MH_PACKR_VERIFY on this thread: the blobs' hashes */
} frame_t;

struct mh_packr {
    mh_arena_t *a;
    mh_pack_limits_t lim;
    unsigned flags;
    int err;
    const char *why;
    bool finished;
    uint64_t items;
    mh_packr_result_t res;
    size_t ccap, scap, bcap, fcap; /* capacities of the result arrays */
    ps_t outer;
    ps_t *meta;            /* inner parser of the meta frame */
    vblob_t vb;
    frame_t fr;
    SHA256_CTX sha;        /* blob hashing (one at a time) */
    SHA256_CTX packsha;    /* MH_PACKR_HASH_PACK */
    ZSTD_DCtx *dctx;
    uint8_t *zout;
    mh__bhash_t *bh;       /* MH_PACKR_PARALLEL: v2 blob hashing on a second thread */
};

/* ---------------------------------------------------------------- errors */

static int hash_first(mh_packr_t *r);

static int fail(mh_packr_t *r, int err, const char *why)
{
    if (!r->err && r->bh && hash_first(r)) return r->err;
    if (!r->err) {
        r->err = err;
        r->why = why;
    }
    return r->err;
}

static int failf(mh_packr_t *r, int err, const char *fallback, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int failf(mh_packr_t *r, int err, const char *fallback, const char *fmt, ...)
{
    if (r->err) return r->err; /* (a hasher thread's mismatch comes first through fail) */
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    const char *w = mh_strdup(r->a, buf);
    return fail(r, err, w ? w : fallback);
}

static int nomem(mh_packr_t *r)
{
    return fail(r, MH_ENOMEM, "out of memory");
}

/* "<pfx>: malformed msgpack: <what>" — the whole-buffer decoder's words. */
static int malformed(ps_t *s, int err, const char *what)
{
    return failf(s->r, err, "pack: malformed msgpack", "%s: malformed msgpack: %s", s->pfx, what);
}

/* A message about an element: "<sect>[<idx>].<field>: <msg>". */
static int ebad(ps_t *s, int err, const char *sect, size_t idx, const char *field, const char *msg)
{
    mh__rd_t rd = {.a = s->r->a, .why = &s->r->why, .sect = sect, .idx = idx};
    if (!s->r->err && s->r->bh) hash_first(s->r);
    if (s->r->err) return s->r->err;
    s->r->err = err;
    return mh__bad(&rd, err, field, msg);
}

/* The frame's name for messages: "frames[3]" or "meta". */
static const char *fname(mh_packr_t *r, char *buf, size_t n)
{
    if (r->fr.kind == FR_META) return "meta";
    snprintf(buf, n, "frames[%zu]", r->fr.idx);
    return buf;
}

/* A message about the current frame: "frames[3]<msg>" / "meta<msg>". */
static int fbad(mh_packr_t *r, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fbad(mh_packr_t *r, int err, const char *fmt, ...)
{
    char fn[40], msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return failf(r, err, "pack: bad frame", "%s%s", fname(r, fn, sizeof fn), msg);
}

/* ------------------------------------------------------------- tokenizer */

/* Bytes of the token header that starts with c (0: not allowed). */
static uint8_t tok_hlen(uint8_t c)
{
    if (c <= 0xc0 || c >= 0xe0 || c == 0xc2 || c == 0xc3) return 1;
    switch (c) {
    case 0xc4: case 0xcc: case 0xd0: case 0xd9: return 2;
    case 0xc5: case 0xcd: case 0xd1: case 0xda: case 0xdc: case 0xde: return 3;
    case 0xc6: case 0xca: case 0xce: case 0xd2: case 0xdb: case 0xdd: case 0xdf: return 5;
    case 0xcb: case 0xcf: case 0xd3: return 9;
    default: return 0; /* 0xc1 reserved, 0xc7-0xc9 and 0xd4-0xd8 ext */
    }
}

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* Decodes a complete header b[0 .. tok_hlen(b[0])). Negative integers
 * become INT (their value is not needed here), floats FLOAT. */
static void tok_parse(const uint8_t *b, tok_t *t)
{
    uint8_t c = b[0];
    t->n = 0;
    if (c <= 0x7f) { t->t = MH_V_UINT; t->n = c; return; }
    if (c >= 0xe0) { t->t = MH_V_INT; return; }
    if (c <= 0x8f) { t->t = MH_V_MAP; t->n = c & 0x0f; return; }
    if (c <= 0x9f) { t->t = MH_V_ARR; t->n = c & 0x0f; return; }
    if (c <= 0xbf) { t->t = MH_V_STR; t->n = c & 0x1f; return; }
    switch (c) {
    case 0xc0: t->t = MH_V_NIL; return;
    case 0xc2: case 0xc3: t->t = MH_V_BOOL; return;
    case 0xc4: case 0xc5: case 0xc6: t->t = MH_V_BIN; t->n = be(b + 1, 1 << (c - 0xc4)); return;
    case 0xca: case 0xcb: t->t = MH_V_FLOAT; return;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: t->t = MH_V_UINT; t->n = be(b + 1, 1 << (c - 0xcc)); return;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int w = 1 << (c - 0xd0);
        uint64_t u = be(b + 1, w);
        int64_t i = w == 1 ? (int8_t)u : w == 2 ? (int16_t)u : w == 4 ? (int32_t)u : (int64_t)u;
        if (i >= 0) { t->t = MH_V_UINT; t->n = (uint64_t)i; }
        else t->t = MH_V_INT;
        return;
    }
    case 0xd9: case 0xda: case 0xdb: t->t = MH_V_STR; t->n = be(b + 1, 1 << (c - 0xd9)); return;
    case 0xdc: case 0xdd: t->t = MH_V_ARR; t->n = be(b + 1, c == 0xdc ? 2 : 4); return;
    default: t->t = MH_V_MAP; t->n = be(b + 1, c == 0xde ? 2 : 4); return;
    }
}

static uint64_t cur_pos(const ps_t *s)
{
    return s->cbase + (uint64_t)(s->p - s->chunk);
}

/* How many of `left` payload bytes the rest of the chunk holds. */
static size_t avail_upto(const ps_t *s, uint64_t left)
{
    size_t avail = (size_t)(s->end - s->p);
    return left < avail ? (size_t)left : avail;
}

/* Reads the next token header: 1 when *t is set, 0 when the chunk ended
 * first (the bytes so far are staged), <0 on error. Checks a str/bin
 * length against the bytes left when the stream length is known. */
static int next_tok(ps_t *s, tok_t *t)
{
    const uint8_t *b;
    if (s->hn == 0) {
        if (s->p == s->end) return 0;
        uint8_t need = tok_hlen(*s->p);
        if (!need) return malformed(s, MH_EPARSE, *s->p == 0xc1 ? "reserved byte 0xc1" : "ext types are not supported");
        if ((size_t)(s->end - s->p) < need) {
            s->hn = (uint8_t)(s->end - s->p);
            s->hneed = need;
            memcpy(s->hdr, s->p, s->hn);
            s->p = s->end;
            return 0;
        }
        b = s->p;
        s->p += need;
    } else {
        size_t take = (size_t)(s->hneed - s->hn);
        if ((size_t)(s->end - s->p) < take) take = (size_t)(s->end - s->p);
        memcpy(s->hdr + s->hn, s->p, take);
        s->hn = (uint8_t)(s->hn + take);
        s->p += take;
        if (s->hn < s->hneed) return 0;
        s->hn = 0;
        b = s->hdr;
    }
    tok_parse(b, t);
    if ((t->t == MH_V_STR || t->t == MH_V_BIN) && s->total && t->n > s->total - cur_pos(s))
        return malformed(s, MH_EPARSE, "string or bin longer than the input");
    return 1;
}

/* Applies the decoder's bounds to a container of n elements at document
 * depth `depth` (per: fewest bytes an element takes: 1, or 2 per pair). */
static int container(ps_t *s, uint64_t n, unsigned per, uint32_t depth)
{
    mh_packr_t *r = s->r;
    if (depth >= r->lim.max_depth) return malformed(s, MH_ELIMIT, "nesting deeper than the limit");
    if (s->total && n > (s->total - cur_pos(s)) / per) return malformed(s, MH_EPARSE, "count larger than the bytes left");
    if (n > (uint64_t)r->lim.max_items - r->items) return malformed(s, MH_ELIMIT, "more items than the limit");
    r->items += n;
    return 0;
}

/* ---------------------------------------------------------------- walker */

static int walk_start(ps_t *s, int mode, size_t cap, uint32_t depth, int ret)
{
    /* Fast path: a scalar wholly inside the chunk (keys, ids, sizes). */
    if (s->hn == 0 && s->p < s->end) {
        size_t avail = (size_t)(s->end - s->p);
        uint8_t hl = tok_hlen(*s->p);
        if (hl && hl <= avail) {
            tok_t t;
            tok_parse(s->p, &t);
            uint64_t pay = t.t == MH_V_STR || t.t == MH_V_BIN ? t.n : 0;
            if (t.t != MH_V_ARR && t.t != MH_V_MAP && pay <= avail - hl && (mode == W_SKIP || hl + pay <= cap)) {
                s->val = mode == W_SKIP ? NULL : s->p;
                s->vlen = mode == W_SKIP ? 0 : hl + (size_t)pay;
                s->vspan = true;
                s->wover = false;
                s->capbuf.len = 0;
                s->p += hl + pay;
                s->st = ret;
                return 1;
            }
        }
    }
    s->wtop = 1;
    s->rem[0] = 1;
    s->wbase = depth;
    s->wpay = 0;
    s->wmode = mode;
    s->wcap = cap;
    s->wover = false;
    s->wret = ret;
    s->cap_from = s->p;
    s->capbuf.len = 0;
    s->st = P_WALK;
    return 1;
}

static size_t cap_len(const ps_t *s)
{
    return s->capbuf.len + (size_t)(s->p - s->cap_from);
}

/* Walks until the value ends (1), the chunk ends (0) or an error (<0). */
static int walk(ps_t *s)
{
    for (;;) {
        if (s->wpay) {
            size_t take = avail_upto(s, s->wpay);
            s->p += take;
            s->wpay -= take;
            if (s->wpay) return 0;
        }
        while (s->wtop && s->rem[s->wtop - 1] == 0) s->wtop--;
        if (s->wtop == 0) break;
        tok_t t;
        int rc = next_tok(s, &t);
        if (rc <= 0) return rc;
        s->rem[s->wtop - 1]--;
        if (t.t == MH_V_ARR || t.t == MH_V_MAP) {
            unsigned per = t.t == MH_V_MAP ? 2 : 1;
            if ((rc = container(s, t.n, per, s->wbase + s->wtop - 1))) return rc;
            if (t.n) s->rem[s->wtop++] = t.n * per;
        } else if (t.t == MH_V_STR || t.t == MH_V_BIN) {
            s->wpay = t.n;
        }
        if (s->wmode != W_SKIP && !s->wover && cap_len(s) + s->wpay > s->wcap) {
            if (s->wmode == W_CAP_META)
                return failf(s->r, MH_ELIMIT, "pack: metadata larger than the limit",
                             "%s: metadata larger than the limit (%llu bytes)", s->pfx,
                             (unsigned long long)s->r->lim.max_meta_bytes);
            s->wover = true; /* W_CAP_SOFT: go on as a skip */
        }
    }
    /* The value is complete. */
    if (s->wmode != W_SKIP && !s->wover) {
        if (s->capbuf.len) {
            if (mh_buf_append(&s->capbuf, s->cap_from, (size_t)(s->p - s->cap_from))) return nomem(s->r);
            s->val = s->capbuf.p;
            s->vlen = s->capbuf.len;
            s->vspan = false;
        } else {
            s->val = s->cap_from;
            s->vlen = (size_t)(s->p - s->cap_from);
            s->vspan = true;
        }
    } else {
        s->val = NULL;
        s->vlen = 0;
    }
    s->st = s->wret;
    return 1;
}

/* A captured value that is one token with its payload (a key, a small
 * str or int): its token and payload. false when it is not one token. */
static bool small_tok(const ps_t *s, tok_t *t, const uint8_t **pay)
{
    if (!s->val || s->vlen == 0) return false;
    uint8_t hl = tok_hlen(s->val[0]);
    if (!hl || hl > s->vlen) return false;
    tok_parse(s->val, t);
    *pay = s->val + hl;
    if (t->t == MH_V_STR || t->t == MH_V_BIN) return t->n == s->vlen - hl;
    return t->t != MH_V_ARR && t->t != MH_V_MAP ? hl == s->vlen : true;
}

/* Index of the captured key among names[0..n), or K_UNKNOWN. */
static int classify(const ps_t *s, const char *const *names, int n)
{
    tok_t t;
    const uint8_t *pay;
    if (!small_tok(s, &t, &pay) || t.t != MH_V_STR) return K_UNKNOWN;
    for (int k = 0; k < n; k++)
        if (strlen(names[k]) == t.n && memcmp(names[k], pay, t.n) == 0) return k;
    return K_UNKNOWN;
}

/* ------------------------------------------------------------- arrays */

static int grow(mh_packr_t *r, void **arr, size_t *cap, size_t n, size_t elem)
{
    if (n < *cap) return 0;
    size_t nc = *cap ? *cap * 2 : 16;
    void *g = realloc(*arr, nc * elem);
    if (!g) return nomem(r);
    *arr = g;
    *cap = nc;
    return 0;
}

/* ------------------------------------------------------------ metadata */

static size_t meta_left(const mh_packr_t *r)
{
    return r->res.meta_bytes >= r->lim.max_meta_bytes ? 0 : (size_t)(r->lim.max_meta_bytes - r->res.meta_bytes);
}

/* Decodes the captured element into the arena (its bytes copied there
 * unless they may be borrowed) and counts what that took. */
static int decode_val(ps_t *s, const mh_val_t **out)
{
    mh_packr_t *r = s->r;
    size_t before = r->a->used;
    const uint8_t *bytes = s->val;
    if (!(s->vspan && s->borrow)) {
        uint8_t *c = mh_alloc(r->a, s->vlen);
        if (!c) return nomem(r);
        memcpy(c, s->val, s->vlen);
        bytes = c;
    }
    mh_val_t *v = mh_alloc(r->a, sizeof *v);
    if (!v) return nomem(r);
    /* The walker applied the document's depth and item bounds already. */
    const mh_decode_limits_t dl = {.max_depth = r->lim.max_depth, .max_items = UINT32_MAX};
    const char *dwhy = NULL;
    int rc = mh_msgpack_decode(r->a, bytes, s->vlen, &dl, v, &dwhy);
    if (rc) return rc == MH_ENOMEM ? nomem(r) : malformed(s, rc, dwhy ? dwhy : "?");
    r->res.meta_bytes += r->a->used - before;
    if (r->res.meta_bytes > r->lim.max_meta_bytes)
        return failf(r, MH_ELIMIT, "pack: metadata larger than the limit", "%s: metadata larger than the limit (%llu bytes)",
                     s->pfx, (unsigned long long)r->lim.max_meta_bytes);
    s->capbuf.len = 0;
    *out = v;
    return 0;
}

/* ------------------------------------------------------------- the sink */

static int hash_mismatch(mh_packr_t *r, const char *where, const uint8_t id[32])
{
    mh_id_t t;
    mh_id_from_digest(&t, id);
    return failf(r, MH_EHASH, "pack: a blob does not hash to its object_id", "%s (%s): content does not hash to its object_id",
                 where, t.s);
}

/* Blob `blob` of frame `frame_idx` does not hash to its id. */
static int blob_mismatch(mh_packr_t *r, size_t frame_idx, uint32_t blob, const uint8_t id[32])
{
    char w[80];
    snprintf(w, sizeof w, "frames[%zu].blobs[%u]", frame_idx, blob);
    return hash_mismatch(r, w, id);
}

/* With the hasher thread: waits for it and, when it found a mismatch,
 * makes that the reader's error: the mismatch lies before the reader's
 * position, so it comes first, as in a read on one thread. Returns the
 * reader's error (0: none). */
static int hash_first(mh_packr_t *r)
{
    mh__bhash_t *h = r->bh;
    if (!h || r->err) return r->err;
    mh__bhash_bad_t bad;
    if (!mh__bhash_sync(h, &bad)) return 0;
    r->bh = NULL; /* the message below fails through here again */
    mh__bhash_free(h);
    return blob_mismatch(r, bad.frame_idx, bad.blob, bad.id);
}

/* The frame's blob the cursor stopped at does not hash to its id, or
 * bytes came past its last blob. */
static int frame_blob_bad(mh_packr_t *r)
{
    frame_t *f = &r->fr;
    if (f->bc.cur >= f->n) return fbad(r, MH_EPARSE, ": data is longer than its blobs"); /* size == bsum: unreachable */
    return blob_mismatch(r, f->idx, f->bc.cur, r->res.blobs[f->first + f->bc.cur].id);
}

static int ps_feed(ps_t *s, const uint8_t *p, size_t n);

/* Decompressed bytes of the current frame. */
static int deliver(mh_packr_t *r, const uint8_t *p, size_t n)
{
    frame_t *f = &r->fr;
    if (f->kind == FR_META) return ps_feed(r->meta, p, n);
    if (!(r->flags & MH_PACKR_VERIFY)) return 0;
    if (r->bh) return mh__bhash_data(r->bh, p, n) ? hash_first(r) : 0;
    return mh__bcur_feed(&f->bc, p, n) ? 0 : frame_blob_bad(r);
}

static int ps_init(mh_packr_t *r, ps_t *s, bool inner, uint64_t total);
static void ps_release(ps_t *s);

static int sink_start(mh_packr_t *r)
{
    frame_t *f = &r->fr;
    f->produced = 0;
    f->zdone = false;
    if (f->codec == MH_PACK_ZSTD) {
        if (!r->dctx) {
            r->dctx = ZSTD_createDCtx();
            if (!r->dctx) return nomem(r);
            if (ZSTD_isError(ZSTD_DCtx_setParameter(r->dctx, ZSTD_d_windowLogMax, (int)r->lim.max_window_log)))
                return fail(r, MH_EINVAL, "pack: bad zstd window limit");
        }
        if (!r->zout && !(r->zout = malloc(ZOUT_CAP))) return nomem(r);
        ZSTD_DCtx_reset(r->dctx, ZSTD_reset_session_only);
    }
    if (f->kind == FR_META) {
        if (!r->meta && !(r->meta = calloc(1, sizeof *r->meta))) return nomem(r);
        ps_release(r->meta);
        return ps_init(r, r->meta, true, f->size);
    }
    if (!(r->flags & MH_PACKR_VERIFY)) return 0;
    if (r->flags & MH_PACKR_PARALLEL) {
        if (!r->bh && mh__bhash_new(&r->bh)) return nomem(r);
        int rc = mh__bhash_frame(r->bh, f->idx, r->res.blobs + f->first, f->n);
        return rc == MH_ENOMEM ? nomem(r) : rc ? hash_first(r) : 0;
    }
    return mh__bcur_start(&f->bc, r->res.blobs + f->first, f->n) ? 0 : frame_blob_bad(r);
}

static int zfail(mh_packr_t *r, size_t ret)
{
    ZSTD_ErrorCode c = ZSTD_getErrorCode(ret);
    if (c == ZSTD_error_memory_allocation) return nomem(r);
    if (c == ZSTD_error_frameParameter_windowTooLarge)
        return fbad(r, MH_ELIMIT, ".data: the zstd window is larger than the limit (2^%u bytes)", r->lim.max_window_log);
    /* Not zstd's own words (ZSTD_getErrorName): for the same corrupt
     * frame they depend on how its bytes were split into feeds, and the
     * reason of a refusal must not. */
    return fbad(r, MH_EPARSE, ".data: not a valid zstd frame");
}

static int too_long(mh_packr_t *r)
{
    return fbad(r, MH_EPARSE, ": data decompresses to more than size (%llu) bytes", (unsigned long long)r->fr.size);
}

/* The next n bytes of the frame's data. */
static int sink_input(mh_packr_t *r, const uint8_t *p, size_t n)
{
    frame_t *f = &r->fr;
    if (f->codec == MH_PACK_NONE) {
        if (n > f->size - f->produced) return too_long(r);
        f->produced += n;
        return deliver(r, p, n);
    }
    ZSTD_inBuffer in = {p, n, 0};
    for (;;) {
        if (f->zdone) {
            if (in.pos < in.size) return fbad(r, MH_EPARSE, ".data: bytes after the end of the zstd frame");
            return 0;
        }
        /* Never room for more than size + 1 bytes: one byte past size is
         * the error, and nothing further is ever decompressed. */
        uint64_t room = f->size - f->produced + 1;
        ZSTD_outBuffer out = {r->zout, room < ZOUT_CAP ? (size_t)room : ZOUT_CAP, 0};
        size_t ret = ZSTD_decompressStream(r->dctx, &out, &in);
        if (ZSTD_isError(ret)) return zfail(r, ret);
        if (out.pos) {
            if (out.pos > f->size - f->produced) return too_long(r);
            f->produced += out.pos;
            int rc = deliver(r, r->zout, out.pos);
            if (rc) return rc;
        }
        if (ret == 0) {
            f->zdone = true;
            continue;
        }
        if (in.pos == in.size && out.pos < out.size) return 0; /* needs more input */
    }
}

static int ps_end(ps_t *s);

static int sink_end(mh_packr_t *r)
{
    frame_t *f = &r->fr;
    if (f->codec == MH_PACK_ZSTD && !f->zdone)
        return fbad(r, MH_EPARSE, ".data: the zstd frame is truncated (%llu of size %llu bytes decompressed)",
                    (unsigned long long)f->produced, (unsigned long long)f->size);
    if (f->produced < f->size)
        return fbad(r, MH_EPARSE, ": data decompresses to fewer than size (%llu) bytes (%llu)",
                    (unsigned long long)f->size, (unsigned long long)f->produced);
    if (f->kind == FR_META) return ps_end(r->meta);
    return 0;
}

/* --------------------------------------------------------------- frames */

static void frame_begin(mh_packr_t *r, int kind, size_t idx)
{
    frame_t *f = &r->fr;
    mh_buf_t keep = f->reorder;
    memset(f, 0, sizeof *f);
    f->reorder = keep;
    f->reorder.len = 0;
    f->kind = kind;
    f->idx = idx;
    f->first = (uint32_t)r->res.nblobs;
}

/* The size rules, once codec, size and blobs are all known. */
static int frame_check_sizes(ps_t *s)
{
    mh_packr_t *r = s->r;
    frame_t *f = &r->fr;
    if (f->kind == FR_BLOBS) {
        if (f->n != 1 && f->size > r->lim.max_frame_size)
            return fbad(r, MH_ELIMIT, ".size: %llu is above the limit (%llu) for a frame of %u blobs",
                        (unsigned long long)f->size, (unsigned long long)r->lim.max_frame_size, f->n);
        if (f->bsum != f->size)
            return fbad(r, MH_EPARSE, ".blobs: lengths add up to %llu, size says %llu", (unsigned long long)f->bsum,
                        (unsigned long long)f->size);
    }
    return 0;
}

/* The keys needed to stream the data are known. */
static bool frame_ready(const ps_t *s)
{
    const frame_t *f = &s->r->fr;
    bool blobs_done = f->kind == FR_META || ((s->mseen & (1u << FK_BLOBS)) && f->bleft == 0);
    return (s->mseen & (1u << FK_CODEC)) && (s->mseen & (1u << FK_SIZE)) && blobs_done;
}

static int frame_end(ps_t *s)
{
    mh_packr_t *r = s->r;
    frame_t *f = &r->fr;
    for (int k = 0; k < FK_N; k++) {
        if (k == FK_BLOBS && f->kind == FR_META) continue;
        if (!(s->mseen & (1u << k))) return fbad(r, MH_EPARSE, ".%s: missing", frame_key_name[k]);
    }
    int rc = frame_check_sizes(s);
    if (rc) return rc;
    if (f->codec == MH_PACK_NONE && f->dlen != f->size)
        return fbad(r, MH_EPARSE, ": data is %llu bytes with codec none, size says %llu", (unsigned long long)f->dlen,
                    (unsigned long long)f->size);
    if (f->dmode == D_REORDER) {
        if ((rc = sink_start(r)) || (rc = sink_input(r, f->reorder.p, f->reorder.len)) || (rc = sink_end(r))) return rc;
        f->reorder.len = 0;
        if (f->reorder.cap > ZOUT_CAP) mh_buf_free(&f->reorder); /* do not keep a large one */
    }
    mh_pack_frame_t rec;
    memset(&rec, 0, sizeof rec); /* padding too: records compare with memcmp */
    rec.data_offset = f->doff;
    rec.data_length = f->dlen;
    rec.size = f->size;
    rec.first_blob = f->first;
    rec.nblobs = f->n;
    rec.codec = f->codec;
    if (f->kind == FR_META) {
        r->res.meta = rec;
        r->res.has_meta = true;
        return 0;
    }
    if ((rc = grow(r, (void **)&r->res.frames, &r->fcap, r->res.nframes, sizeof rec))) return rc;
    r->res.frames[r->res.nframes++] = rec;
    return 0;
}

/* ------------------------------------------------------------- grammar */

/* Each step returns 1 (moved on), 0 (the chunk is used up) or <0. */

static int st_magic(ps_t *s)
{
    mh_packr_t *r = s->r;
    while (s->p < s->end) {
        if (s->hn == 0 && *s->p != 'M') { /* a v0 body (a map never starts with 'M') */
            r->res.version = 0;
            s->st = P_BODY;
            return 1;
        }
        s->hdr[s->hn++] = *s->p++;
        if (s->hn == 5 || (s->hn <= 4 && memcmp(s->hdr, "MUSE", s->hn) != 0)) break;
    }
    if (s->hn < 5 && (s->hn == 0 || memcmp(s->hdr, "MUSE", s->hn) == 0)) return 0;
    if (memcmp(s->hdr, "MUSE", 4) != 0) return fail(r, MH_EPARSE, "pack: the body is not a map");
    if (s->hdr[4] != 0x01 && s->hdr[4] != 0x02) return fail(r, MH_EPARSE, "pack: unsupported format version");
    r->res.version = s->hdr[4];
    s->hn = 0;
    s->st = P_BODY;
    return 1;
}

static int st_body(ps_t *s)
{
    tok_t t;
    int rc = next_tok(s, &t);
    if (rc <= 0) return rc;
    if (t.t != MH_V_MAP)
        return failf(s->r, MH_EPARSE, "pack: the body is not a map", "%s: the body is not a map", s->pfx);
    if ((rc = container(s, t.n, 2, 0))) return rc;
    s->pairs = (uint32_t)t.n;
    s->st = s->pairs ? P_KEY : P_END;
    return 1;
}

static int st_key(ps_t *s)
{
    s->pairs--;
    return walk_start(s, W_CAP_SOFT, KEY_CAP, 1, P_KEY_W);
}

static bool is_plain_meta_key(int k)
{
    return k == K_COMMITS || k == K_SNAPSHOTS || k == K_HEADS;
}

static int body_bad(ps_t *s, const char *field, const char *msg)
{
    return ebad(s, MH_EPARSE, s->pfx, MH__NO_IDX, field, msg);
}

static int st_key_w(ps_t *s)
{
    int k = classify(s, body_key_name, K_NBODY);
    int v = s->r->res.version;
    if (!s->inner && v < 2 && (k == K_FRAMES || k == K_META)) k = K_UNKNOWN; /* unknown keys of v0/v1 */
    if (k != K_UNKNOWN) {
        if (s->seen & (1u << k)) return body_bad(s, body_key_name[k], "key appears twice");
        if (s->inner && !is_plain_meta_key(k)) return body_bad(s, body_key_name[k], "not allowed inside meta");
        if (!s->inner && v == 2 && (k == K_BLOBS || k == K_OBJECTS))
            return body_bad(s, body_key_name[k], "not allowed in a v2 pack (blobs go in frames)");
        if ((k == K_BLOBS && (s->seen & (1u << K_OBJECTS))) || (k == K_OBJECTS && (s->seen & (1u << K_BLOBS))))
            return body_bad(s, NULL, "both `blobs` and `objects` present");
        if ((k == K_META && (s->seen & ((1u << K_COMMITS) | (1u << K_SNAPSHOTS) | (1u << K_HEADS)))) ||
            (is_plain_meta_key(k) && (s->seen & (1u << K_META))))
            return body_bad(s, NULL, "both `meta` and plain commits/snapshots/branch_heads (use one form)");
        s->seen |= 1u << k;
    }
    s->key = k;
    s->st = P_VAL;
    return 1;
}

static int st_val(ps_t *s)
{
    switch (s->key) {
    case K_COMMITS: case K_SNAPSHOTS: s->st = P_SECT; return 1;
    case K_HEADS: return walk_start(s, W_CAP_META, meta_left(s->r), 1, P_HEADS_W);
    case K_BLOBS: case K_OBJECTS: s->st = P_BLOBS; return 1;
    case K_FRAMES: s->st = P_FRAMES; return 1;
    case K_META:
        frame_begin(s->r, FR_META, 0);
        s->st = P_FMAP;
        return 1;
    default: return walk_start(s, W_SKIP, 0, 1, P_NEXT);
    }
}

static int st_next(ps_t *s)
{
    s->st = s->pairs ? P_KEY : P_END;
    return 1;
}

static int st_end(ps_t *s)
{
    if (s->p < s->end) return malformed(s, MH_EPARSE, "trailing bytes after the value");
    return 0;
}

/* Opens an array section: nil (when allowed) or an array within limits. */
static int open_array(ps_t *s, const char *sect, uint64_t max, uint64_t have, size_t min_bytes, bool nil_ok,
                      int next)
{
    tok_t t;
    int rc = next_tok(s, &t);
    if (rc <= 0) return rc;
    s->eidx = 0;
    s->elems = 0;
    if (t.t == MH_V_NIL && nil_ok) { /* Python clients may send None */
        s->st = P_NEXT;
        return 1;
    }
    if (t.t != MH_V_ARR) return ebad(s, MH_EPARSE, sect, MH__NO_IDX, NULL, "not an array");
    if ((rc = container(s, t.n, 1, 1))) return rc;
    if (t.n > max || have > max - t.n) return ebad(s, MH_ELIMIT, sect, MH__NO_IDX, NULL, "more elements than the limit");
    if (s->total && t.n * min_bytes > s->total)
        return ebad(s, MH_EPARSE, sect, MH__NO_IDX, NULL, "more elements than the pack can hold");
    s->elems = (uint32_t)t.n;
    s->st = next;
    return 1;
}

static int st_sect(ps_t *s)
{
    mh_packr_t *r = s->r;
    if (s->key == K_COMMITS)
        return open_array(s, s->sect_name[K_COMMITS], r->lim.max_commits, r->res.ncommits, MH__MIN_COMMIT_BYTES, true,
                          P_ELEM);
    return open_array(s, s->sect_name[K_SNAPSHOTS], r->lim.max_snapshots, r->res.nsnapshots, MH__MIN_SNAPSHOT_BYTES,
                      true, P_ELEM);
}

/* Points the str/bin values of a tree decoded from `from` at the copy of
 * those bytes at `to`. */
static void rebase(mh_val_t *v, const uint8_t *from, const uint8_t *to)
{
    switch (v->t) {
    case MH_V_STR: case MH_V_BIN: v->v.s.p = (const char *)to + ((const uint8_t *)v->v.s.p - from); break;
    case MH_V_ARR:
        for (uint32_t i = 0; i < v->v.a.n; i++) rebase(&v->v.a.items[i], from, to);
        break;
    case MH_V_MAP:
        for (uint32_t i = 0; i < v->v.m.n; i++) {
            rebase(&v->v.m.kv[i].k, from, to);
            rebase(&v->v.m.kv[i].v, from, to);
        }
        break;
    default: break;
    }
}

static int elem_done(ps_t *s, const mh_val_t *v);

/* Fast path of an element that lies wholly inside the chunk: decoded
 * straight from it (one pass instead of a walk and a decode). 1 when
 * done, 0 when the element continues past the chunk (the walker takes
 * over), <0 on error. */
static int elem_direct(ps_t *s)
{
    mh_packr_t *r = s->r;
    if (s->hn || s->p == s->end || r->lim.max_depth <= 2) return 0;
    size_t before = r->a->used;
    mh_val_t *v = mh_alloc(r->a, sizeof *v);
    if (!v) return nomem(r);
    uint64_t items_left = (uint64_t)r->lim.max_items - r->items;
    /* Elements sit at depth 2 (body map, array): the decoder counts from 0. */
    const mh_decode_limits_t dl = {.max_depth = r->lim.max_depth - 2,
                                   .max_items = items_left > UINT32_MAX ? UINT32_MAX : (uint32_t)items_left};
    size_t used = 0;
    uint64_t items = 0;
    const char *dwhy = NULL;
    int rc = mh_msgpack_decode_prefix(r->a, s->p, (size_t)(s->end - s->p), &dl, v, &used, &items, &dwhy);
    if (rc == 0 && !s->borrow) {
        uint8_t *c = mh_alloc(r->a, used);
        if (!c) return nomem(r);
        memcpy(c, s->p, used);
        rebase(v, s->p, c);
    }
    r->res.meta_bytes += r->a->used - before;
    if (rc < 0) return rc == MH_ENOMEM ? nomem(r) : malformed(s, rc, dwhy ? dwhy : "?");
    if (r->res.meta_bytes > r->lim.max_meta_bytes)
        return failf(r, MH_ELIMIT, "pack: metadata larger than the limit", "%s: metadata larger than the limit (%llu bytes)",
                     s->pfx, (unsigned long long)r->lim.max_meta_bytes);
    if (rc > 0) return 0;
    r->items += items;
    s->p += used;
    s->elems--;
    rc = elem_done(s, v);
    return rc < 0 ? rc : 1;
}

static int st_elem(ps_t *s)
{
    if (s->elems == 0) {
        s->st = P_NEXT;
        return 1;
    }
    int rc = elem_direct(s);
    if (rc) return rc;
    s->elems--;
    return walk_start(s, W_CAP_META, meta_left(s->r), 2, P_ELEM_W);
}

static int st_elem_w(ps_t *s)
{
    const mh_val_t *v;
    int rc = decode_val(s, &v);
    if (rc) return rc;
    return elem_done(s, v);
}

/* A decoded commit or snapshot: checked and appended. */
static int elem_done(ps_t *s, const mh_val_t *v)
{
    mh_packr_t *r = s->r;
    int rc;
    mh__rd_t rd = {.a = r->a, .why = &r->why, .sect = s->sect_name[s->key], .idx = s->eidx};
    if (s->key == K_COMMITS) {
        if ((rc = grow(r, (void **)&r->res.commits, &r->ccap, r->res.ncommits, sizeof(mh_pack_commit_t)))) return rc;
        rc = mh__pack_commit(&rd, v, &r->res.commits[r->res.ncommits]);
        if (!rc) r->res.ncommits++;
    } else {
        if ((rc = grow(r, (void **)&r->res.snapshots, &r->scap, r->res.nsnapshots, sizeof(mh_pack_snapshot_t))))
            return rc;
        rc = mh__pack_snapshot(&rd, v, &r->res.snapshots[r->res.nsnapshots]);
        if (!rc) r->res.nsnapshots++;
    }
    if (rc) return fail(r, rc, r->why);
    s->eidx++;
    s->st = P_ELEM;
    return 1;
}

static int st_heads_w(ps_t *s)
{
    mh_packr_t *r = s->r;
    const mh_val_t *v;
    int rc = decode_val(s, &v);
    if (rc) return rc;
    mh__rd_t rd = {.a = r->a, .why = &r->why, .sect = s->sect_name[K_HEADS], .idx = MH__NO_IDX};
    if ((rc = mh__pack_heads(&rd, v, &r->res.branch_heads))) return fail(r, rc, r->why);
    s->st = P_NEXT;
    return 1;
}

/* ------------------------------------------------------- v0/v1 blobs */

static int blob_bad(ps_t *s, int err, const char *field, const char *msg)
{
    return ebad(s, err, s->sect_name[s->key], s->eidx, field, msg);
}

static int st_blobs(ps_t *s)
{
    mh_packr_t *r = s->r;
    return open_array(s, s->sect_name[s->key], r->lim.max_blobs, r->res.nblobs, MH__MIN_BLOB_BYTES, true, P_BLOB);
}

static int st_blob(ps_t *s)
{
    if (s->elems == 0) {
        s->st = P_NEXT;
        return 1;
    }
    tok_t t;
    int rc = next_tok(s, &t);
    if (rc <= 0) return rc;
    s->elems--;
    if (t.t != MH_V_MAP) return blob_bad(s, MH_EPARSE, NULL, "element is not a map");
    if ((rc = container(s, t.n, 2, 2))) return rc;
    s->mpairs = (uint32_t)t.n;
    s->mseen = 0;
    memset(&s->r->vb, 0, sizeof s->r->vb);
    s->st = P_BKEY;
    return 1;
}

static int st_bkey(ps_t *s)
{
    if (s->mpairs == 0) {
        s->st = P_BEND;
        return 1;
    }
    s->mpairs--;
    return walk_start(s, W_CAP_SOFT, KEY_CAP, 3, P_BKEY_W);
}

static int st_bkey_w(ps_t *s)
{
    int k = classify(s, blob_key_name, BK_N);
    if (k != K_UNKNOWN) {
        if (s->mseen & (1u << k)) return blob_bad(s, MH_EPARSE, blob_key_name[k], "key appears twice");
        s->mseen |= 1u << k;
    }
    s->mkey = k;
    s->st = P_BVAL;
    return 1;
}

static int st_bval(ps_t *s)
{
    mh_packr_t *r = s->r;
    if (s->mkey == BK_ID) return walk_start(s, W_CAP_SOFT, SMALL_CAP, 3, P_BID_W);
    if (s->mkey != BK_CONTENT) return walk_start(s, W_SKIP, 0, 3, P_BKEY);
    tok_t t;
    int rc = next_tok(s, &t);
    if (rc <= 0) return rc;
    if (t.t != MH_V_BIN && t.t != MH_V_STR) return blob_bad(s, MH_EPARSE, "content", "not bin or str");
    vblob_t *b = &r->vb;
    b->have_content = true;
    b->off = cur_pos(s);
    b->len = b->left = t.n;
    if (r->flags & MH_PACKR_VERIFY) SHA256_Init(&r->sha);
    s->st = P_BCONTENT;
    return 1;
}

static int st_bid_w(ps_t *s)
{
    tok_t t;
    const uint8_t *pay;
    vblob_t *b = &s->r->vb;
    if (!s->wover && small_tok(s, &t, &pay) && t.t == MH_V_NIL) return blob_bad(s, MH_EPARSE, "object_id", "missing");
    if (s->wover || !small_tok(s, &t, &pay) || t.t != MH_V_STR || !mh_id_ok((const char *)pay, t.n))
        return blob_bad(s, MH_EPARSE, "object_id", "not a sha256 id");
    mh__id_digest((const char *)pay, b->id);
    b->have_id = true;
    s->st = P_BKEY;
    return 1;
}

static int st_bcontent(ps_t *s)
{
    mh_packr_t *r = s->r;
    vblob_t *b = &r->vb;
    size_t take = avail_upto(s, b->left);
    if (r->flags & MH_PACKR_VERIFY) SHA256_Update(&r->sha, s->p, take);
    s->p += take;
    b->left -= take;
    if (b->left) return 0;
    s->st = P_BKEY;
    return 1;
}

static int st_bend(ps_t *s)
{
    mh_packr_t *r = s->r;
    vblob_t *b = &r->vb;
    if (!b->have_id) return blob_bad(s, MH_EPARSE, "object_id", "missing");
    if (!b->have_content) return blob_bad(s, MH_EPARSE, "content", "missing");
    if (r->flags & MH_PACKR_VERIFY) {
        uint8_t got[32];
        SHA256_Final(got, &r->sha);
        if (memcmp(got, b->id, 32) != 0) {
            char w[64];
            snprintf(w, sizeof w, "%s[%zu]", s->sect_name[s->key], s->eidx);
            return hash_mismatch(r, w, b->id);
        }
    }
    int rc = grow(r, (void **)&r->res.blobs, &r->bcap, r->res.nblobs, sizeof(mh_packr_blob_t));
    if (rc) return rc;
    mh_packr_blob_t *rec = &r->res.blobs[r->res.nblobs++];
    memset(rec, 0, sizeof *rec); /* padding too: records compare with memcmp */
    memcpy(rec->id, b->id, 32);
    rec->offset = b->off;
    rec->length = b->len;
    rec->frame = MH_PACK_NOFRAME;
    s->eidx++;
    s->st = P_BLOB;
    return 1;
}

/* ------------------------------------------------------------ v2 frames */

static int st_frames(ps_t *s)
{
    mh_packr_t *r = s->r;
    return open_array(s, "frames", r->lim.max_frames, r->res.nframes, MH__MIN_FRAME_BYTES, false, P_FRAME);
}

static int st_frame(ps_t *s)
{
    if (s->elems == 0) {
        s->st = P_NEXT;
        return 1;
    }
    s->elems--;
    frame_begin(s->r, FR_BLOBS, s->eidx);
    s->st = P_FMAP;
    return 1;
}

static int st_fmap(ps_t *s)
{
    mh_packr_t *r = s->r;
    tok_t t;
    int rc = next_tok(s, &t);
    if (rc <= 0) return rc;
    if (t.t != MH_V_MAP) return fbad(r, MH_EPARSE, ": not a map");
    if ((rc = container(s, t.n, 2, r->fr.kind == FR_META ? 1 : 2))) return rc;
    s->mpairs = (uint32_t)t.n;
    s->mseen = 0;
    s->st = P_FKEY;
    return 1;
}

static uint32_t fdepth(const ps_t *s)
{
    return s->r->fr.kind == FR_META ? 2 : 3; /* depth of a frame map's keys and values */
}

static int st_fkey(ps_t *s)
{
    if (s->mpairs == 0) {
        s->st = P_FEND;
        return 1;
    }
    s->mpairs--;
    return walk_start(s, W_CAP_SOFT, KEY_CAP, fdepth(s), P_FKEY_W);
}

static int st_fkey_w(ps_t *s)
{
    mh_packr_t *r = s->r;
    int k = classify(s, frame_key_name, FK_N);
    if (k != K_UNKNOWN) {
        /* `blobs` has two bits: its key was seen (FK_N), its array is
         * complete (FK_BLOBS); the other keys' values follow their key
         * at once, so the key's bit is enough. */
        unsigned bit = 1u << (k == FK_BLOBS ? FK_N : k);
        if (s->mseen & bit) return fbad(r, MH_EPARSE, ".%s: key appears twice", frame_key_name[k]);
        if (k == FK_BLOBS && r->fr.kind == FR_META) return fbad(r, MH_EPARSE, ".blobs: not allowed in the meta frame");
        if (k != FK_DATA) s->mseen |= bit; /* data: once its header is read */
    }
    s->mkey = k;
    s->st = P_FVAL;
    return 1;
}

static int frame_data_header(ps_t *s, const tok_t *t)
{
    mh_packr_t *r = s->r;
    frame_t *f = &r->fr;
    if (t->t != MH_V_BIN) return fbad(r, MH_EPARSE, ".data: not bin");
    f->doff = cur_pos(s);
    f->dlen = f->dleft = t->n;
    bool skip = f->kind == FR_BLOBS && (r->flags & MH_PACKR_NO_DECOMPRESS) && !(r->flags & MH_PACKR_VERIFY);
    int rc;
    if (skip) {
        f->dmode = D_SKIP;
    } else if (frame_ready(s)) {
        if ((rc = frame_check_sizes(s))) return rc;
        if (f->codec == MH_PACK_NONE && f->dlen != f->size)
            return fbad(r, MH_EPARSE, ": data is %llu bytes with codec none, size says %llu",
                        (unsigned long long)f->dlen, (unsigned long long)f->size);
        f->dmode = D_STREAM;
        if ((rc = sink_start(r))) return rc;
    } else {
        if (f->dlen > r->lim.max_reorder)
            return fbad(r, MH_ELIMIT,
                        ": data (%llu bytes) comes before codec, size or blobs and is larger than the reorder limit "
                        "(%llu bytes)",
                        (unsigned long long)f->dlen, (unsigned long long)r->lim.max_reorder);
        f->dmode = D_REORDER;
        f->reorder.len = 0;
        if (mh_buf_reserve(&f->reorder, (size_t)f->dlen)) return nomem(r);
        if (f->dlen > r->res.reorder_peak) r->res.reorder_peak = f->dlen;
    }
    s->mseen |= 1u << FK_DATA;
    s->st = P_FPAY;
    return 1;
}

static int st_fval(ps_t *s)
{
    mh_packr_t *r = s->r;
    frame_t *f = &r->fr;
    uint32_t d = fdepth(s);
    tok_t t;
    int rc;
    switch (s->mkey) {
    case FK_CODEC: return walk_start(s, W_CAP_SOFT, SMALL_CAP, d, P_FCODEC_W);
    case FK_SIZE: return walk_start(s, W_CAP_SOFT, SMALL_CAP, d, P_FSIZE_W);
    case FK_BLOBS:
        if ((rc = next_tok(s, &t)) <= 0) return rc;
        if (t.t != MH_V_ARR) return fbad(r, MH_EPARSE, ".blobs: not an array");
        if ((rc = container(s, t.n, 1, d))) return rc;
        if (t.n > r->lim.max_blobs || r->res.nblobs > r->lim.max_blobs - t.n)
            return fbad(r, MH_ELIMIT, ".blobs: more blobs in the pack than the limit (%u)", r->lim.max_blobs);
        f->bleft = (uint32_t)t.n;
        s->st = P_FBLOB;
        return 1;
    case FK_DATA:
        if ((rc = next_tok(s, &t)) <= 0) return rc;
        return frame_data_header(s, &t);
    default: return walk_start(s, W_SKIP, 0, d, P_FKEY);
    }
}

static int st_fcodec_w(ps_t *s)
{
    mh_packr_t *r = s->r;
    tok_t t;
    const uint8_t *pay;
    if (s->wover || !small_tok(s, &t, &pay) || t.t != MH_V_STR) return fbad(r, MH_EPARSE, ".codec: not a string");
    if (t.n == 4 && memcmp(pay, "zstd", 4) == 0) r->fr.codec = MH_PACK_ZSTD;
    else if (t.n == 4 && memcmp(pay, "none", 4) == 0) r->fr.codec = MH_PACK_NONE;
    else return fbad(r, MH_EPARSE, ".codec: unknown codec \"%.*s\" (zstd or none)", (int)(t.n > 16 ? 16 : t.n), pay);
    s->st = P_FKEY;
    return 1;
}

static int st_fsize_w(ps_t *s)
{
    mh_packr_t *r = s->r;
    frame_t *f = &r->fr;
    tok_t t;
    const uint8_t *pay;
    if (s->wover || !small_tok(s, &t, &pay) || t.t != MH_V_UINT)
        return fbad(r, MH_EPARSE, ".size: not a non-negative integer");
    f->size = t.n;
    if (f->size > r->lim.max_unpacked - r->res.unpacked)
        return failf(r, MH_ELIMIT, "pack: more decompressed bytes than the limit",
                     "pack: frames decompress to more than the limit (%llu bytes) in total",
                     (unsigned long long)r->lim.max_unpacked);
    r->res.unpacked += f->size;
    if (f->bsum > f->size)
        return fbad(r, MH_EPARSE, ".blobs: lengths add up to more than size (%llu)", (unsigned long long)f->size);
    s->st = P_FKEY;
    return 1;
}

static int st_fblob(ps_t *s)
{
    mh_packr_t *r = s->r;
    frame_t *f = &r->fr;
    if (f->bleft == 0) {
        s->mseen |= 1u << FK_BLOBS;
        if ((s->mseen & (1u << FK_SIZE)) && f->bsum != f->size)
            return fbad(r, MH_EPARSE, ".blobs: lengths add up to %llu, size says %llu", (unsigned long long)f->bsum,
                        (unsigned long long)f->size);
        s->st = P_FKEY;
        return 1;
    }
    f->bleft--;
    return walk_start(s, W_CAP_SOFT, SMALL_CAP, fdepth(s) + 1, P_FBLOB_W);
}

static int st_fblob_w(ps_t *s)
{
    mh_packr_t *r = s->r;
    frame_t *f = &r->fr;
    tok_t t, ti, tl;
    const uint8_t *pay = NULL;
    bool ok = !s->wover && small_tok(s, &t, &pay) && t.t == MH_V_ARR && t.n == 2;
    /* (an entry longer than SMALL_CAP was not captured: s->val is NULL) */
    const uint8_t *end = ok ? s->val + s->vlen : NULL, *q = pay;
    /* [str id, uint length]: two tokens after the array header */
    if (ok && q < end && tok_hlen(*q) && tok_hlen(*q) <= (size_t)(end - q)) {
        tok_parse(q, &ti);
        const uint8_t *idp = q + tok_hlen(*q);
        ok = ti.t == MH_V_STR && ti.n <= (size_t)(end - idp);
        if (ok) {
            q = idp + ti.n;
            ok = q < end && tok_hlen(*q) && tok_hlen(*q) == (size_t)(end - q);
            if (ok) tok_parse(q, &tl);
            ok = ok && tl.t == MH_V_UINT;
        }
        if (ok && !mh_id_ok((const char *)idp, ti.n))
            return fbad(r, MH_EPARSE, ".blobs[%u]: object id is not a sha256 id", f->n);
        if (ok) pay = idp;
    } else {
        ok = false;
    }
    if (!ok) return fbad(r, MH_EPARSE, ".blobs[%u]: not [object_id, length]", f->n);
    if (tl.n > UINT64_MAX - f->bsum) return fbad(r, MH_EPARSE, ".blobs: lengths overflow");
    if ((s->mseen & (1u << FK_SIZE)) && f->bsum + tl.n > f->size)
        return fbad(r, MH_EPARSE, ".blobs: lengths add up to more than size (%llu)", (unsigned long long)f->size);
    int rc = grow(r, (void **)&r->res.blobs, &r->bcap, r->res.nblobs, sizeof(mh_packr_blob_t));
    if (rc) return rc;
    mh_packr_blob_t *rec = &r->res.blobs[r->res.nblobs++];
    memset(rec, 0, sizeof *rec);
    mh__id_digest((const char *)pay, rec->id);
    rec->offset = f->bsum;
    rec->length = tl.n;
    rec->frame = (uint32_t)f->idx;
    f->bsum += tl.n;
    f->n++;
    s->st = P_FBLOB;
    return 1;
}

static int st_fpay(ps_t *s)
{
    mh_packr_t *r = s->r;
    frame_t *f = &r->fr;
    size_t take = avail_upto(s, f->dleft);
    const uint8_t *p = s->p;
    s->p += take;
    f->dleft -= take;
    int rc = 0;
    if (f->dmode == D_STREAM) rc = sink_input(r, p, take);
    else if (f->dmode == D_REORDER) rc = mh_buf_append(&f->reorder, p, take) ? nomem(r) : 0;
    if (rc) return rc;
    if (f->dleft) return 0;
    if (f->dmode == D_STREAM && (rc = sink_end(r))) return rc;
    s->st = P_FKEY;
    return 1;
}

static int st_fend(ps_t *s)
{
    int rc = frame_end(s);
    if (rc) return rc;
    if (s->r->fr.kind == FR_META) {
        s->st = P_NEXT;
    } else {
        s->eidx++;
        s->st = P_FRAME;
    }
    return 1;
}

/* ---------------------------------------------------------- the driver */

static int step(ps_t *s)
{
    switch (s->st) {
    case P_MAGIC: return st_magic(s);
    case P_BODY: return st_body(s);
    case P_KEY: return st_key(s);
    case P_KEY_W: return st_key_w(s);
    case P_VAL: return st_val(s);
    case P_NEXT: return st_next(s);
    case P_END: return st_end(s);
    case P_SECT: return st_sect(s);
    case P_ELEM: return st_elem(s);
    case P_ELEM_W: return st_elem_w(s);
    case P_HEADS_W: return st_heads_w(s);
    case P_BLOBS: return st_blobs(s);
    case P_BLOB: return st_blob(s);
    case P_BKEY: return st_bkey(s);
    case P_BKEY_W: return st_bkey_w(s);
    case P_BVAL: return st_bval(s);
    case P_BID_W: return st_bid_w(s);
    case P_BCONTENT: return st_bcontent(s);
    case P_BEND: return st_bend(s);
    case P_FRAMES: return st_frames(s);
    case P_FRAME: return st_frame(s);
    case P_FMAP: return st_fmap(s);
    case P_FKEY: return st_fkey(s);
    case P_FKEY_W: return st_fkey_w(s);
    case P_FVAL: return st_fval(s);
    case P_FCODEC_W: return st_fcodec_w(s);
    case P_FSIZE_W: return st_fsize_w(s);
    case P_FBLOB: return st_fblob(s);
    case P_FBLOB_W: return st_fblob_w(s);
    case P_FPAY: return st_fpay(s);
    case P_FEND: return st_fend(s);
    case P_WALK: return walk(s);
    default: return fail(s->r, MH_EINVAL, "pack: reader in a bad state");
    }
}

static int ps_feed(ps_t *s, const uint8_t *p, size_t n)
{
    s->chunk = s->p = p;
    s->end = p + n;
    if (s->st == P_WALK) s->cap_from = p;
    int rc;
    while ((rc = step(s)) > 0) {
    }
    if (rc < 0) return rc;
    /* The chunk is used up: keep what a capture still needs of it. */
    if (s->st == P_WALK && s->wmode != W_SKIP && !s->wover) {
        if (mh_buf_append(&s->capbuf, s->cap_from, (size_t)(s->end - s->cap_from))) return nomem(s->r);
    }
    s->cbase += n;
    s->chunk = s->p = s->end = NULL;
    return 0;
}

static int ps_end(ps_t *s)
{
    mh_packr_t *r = s->r;
    if (s->st == P_END) return 0;
    if (s->st == P_MAGIC) {
        if (s->hn == 0 && s->cbase == 0) return fail(r, MH_EPARSE, "pack: malformed msgpack: empty input");
        return fail(r, MH_EPARSE, "pack: truncated header");
    }
    return malformed(s, MH_EPARSE, "truncated");
}

static int ps_init(mh_packr_t *r, ps_t *s, bool inner, uint64_t total)
{
    uint64_t *rem = s->rem;
    mh_buf_t cb = s->capbuf;
    memset(s, 0, sizeof *s);
    s->r = r;
    s->inner = inner;
    s->total = total;
    s->capbuf = cb;
    s->capbuf.len = 0;
    s->borrow = !inner && (r->flags & MH_PACKR_BORROW);
    s->pfx = inner ? "meta" : "pack";
    static const char *const outer_names[K_NBODY] = {"commits", "snapshots", "blobs", "objects",
                                                     "branch_heads", "frames", "meta"};
    static const char *const inner_names[K_NBODY] = {"meta.commits", "meta.snapshots", "meta.blobs", "meta.objects",
                                                     "meta.branch_heads", "meta.frames", "meta.meta"};
    memcpy(s->sect_name, inner ? inner_names : outer_names, sizeof s->sect_name);
    s->st = inner ? P_BODY : P_MAGIC;
    s->rem = rem ? rem : malloc(((size_t)r->lim.max_depth + 2) * sizeof *s->rem);
    if (!s->rem) return nomem(r);
    return 0;
}

static void ps_release(ps_t *s)
{
    free(s->rem);
    s->rem = NULL;
    mh_buf_free(&s->capbuf);
}

/* ------------------------------------------------------------ public */

int mh_packr_new(mh_arena_t *a, const mh_pack_limits_t *lim, unsigned flags, uint64_t total_len, mh_packr_t **out)
{
    *out = NULL;
    mh_packr_t *r = calloc(1, sizeof *r);
    if (!r) return MH_ENOMEM;
    r->a = a;
    r->flags = flags;
    const mh_pack_limits_t *d = &mh_pack_limits_default;
    r->lim = lim ? *lim : *d;
    /* The fields added with v2 take their default when zero, so limit
     * structs filled in before they existed keep working; the older
     * fields mean what they say (0 = nothing allowed). */
#define DEF(f) if (!r->lim.f) r->lim.f = d->f
    DEF(max_frames); DEF(max_meta_bytes); DEF(max_unpacked); DEF(max_frame_size); DEF(max_reorder);
    DEF(max_window_log);
#undef DEF
    if (r->lim.max_depth > 1024) r->lim.max_depth = 1024;
    r->res.version = -1;
    if (flags & MH_PACKR_HASH_PACK) SHA256_Init(&r->packsha);
    if (ps_init(r, &r->outer, false, total_len)) {
        free(r);
        return MH_ENOMEM;
    }
    *out = r;
    return 0;
}

int mh_packr_feed(mh_packr_t *r, const void *p, size_t n)
{
    if (r->err) return r->err;
    if (r->finished) return fail(r, MH_EINVAL, "pack: fed after finish");
    if (n == 0) return 0;
    /* The bounds checks rely on the announced length. */
    if (r->outer.total && n > r->outer.total - r->res.bytes)
        return fail(r, MH_EPARSE, "pack: longer than its announced length");
    if (r->flags & MH_PACKR_HASH_PACK) SHA256_Update(&r->packsha, p, n);
    r->res.bytes += n;
    int rc = ps_feed(&r->outer, p, n);
    size_t m = mh_packr_mem(r);
    if (m > r->res.mem_peak) r->res.mem_peak = m;
    return rc;
}

int mh_packr_finish(mh_packr_t *r)
{
    if (r->err) return r->err;
    if (r->finished) return 0;
    r->finished = true;
    int rc = ps_end(&r->outer);
    if (rc) return rc;
    if (r->bh) {
        if ((rc = hash_first(r))) return rc;
        mh__bhash_free(r->bh);
        r->bh = NULL;
    }
    if (r->res.version == 2 && !(r->outer.seen & (1u << K_FRAMES)))
        return fail(r, MH_EPARSE, "pack.frames: missing (required in a v2 pack)");
    if (r->flags & MH_PACKR_HASH_PACK) SHA256_Final(r->res.pack_digest, &r->packsha);
    /* Done reading: only the result is kept (its holder charges
     * mh_packr_mem against the pack-memory budget until it frees it). */
    ps_release(&r->outer);
    if (r->meta) {
        ps_release(r->meta);
        free(r->meta);
        r->meta = NULL;
    }
    mh_buf_free(&r->fr.reorder);
    ZSTD_freeDCtx(r->dctx);
    r->dctx = NULL;
    free(r->zout);
    r->zout = NULL;
    return 0;
}

const char *mh_packr_why(const mh_packr_t *r)
{
    return r->err ? r->why : NULL;
}

const mh_packr_result_t *mh_packr_result(const mh_packr_t *r)
{
    return &r->res;
}

static size_t ps_mem(const ps_t *s, const mh_packr_t *r)
{
    return s->capbuf.cap + (s->rem ? ((size_t)r->lim.max_depth + 2) * sizeof *s->rem : 0);
}

size_t mh_packr_mem(const mh_packr_t *r)
{
    size_t m = sizeof *r + r->ccap * sizeof(mh_pack_commit_t) + r->scap * sizeof(mh_pack_snapshot_t) +
               r->bcap * sizeof(mh_packr_blob_t) + r->fcap * sizeof(mh_pack_frame_t) + r->fr.reorder.cap +
               ps_mem(&r->outer, r) + (size_t)r->res.meta_bytes;
    if (r->meta) m += sizeof *r->meta + ps_mem(r->meta, r);
    if (r->zout) m += ZOUT_CAP;
    if (r->dctx) m += ZSTD_sizeof_DCtx(r->dctx);
    if (r->bh) m += mh__bhash_mem(r->bh);
    return m;
}

void mh_packr_free(mh_packr_t *r)
{
    if (!r) return;
    mh__bhash_free(r->bh);
    ps_release(&r->outer);
    if (r->meta) {
        ps_release(r->meta);
        free(r->meta);
    }
    mh_buf_free(&r->fr.reorder);
    ZSTD_freeDCtx(r->dctx);
    free(r->zout);
    free(r->res.commits);
    free(r->res.snapshots);
    free(r->res.blobs);
    free(r->res.frames);
    free(r);
}
