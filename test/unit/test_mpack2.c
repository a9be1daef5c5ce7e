/*
 * test_mpack2.c — unit tests of the streaming pack reader and writer and
 * of mpack v2 (mpack.h; SPEC 2, 2.1):
 *  - round trips writer -> reader for v1 (whole and streamed blobs) and
 *    v2 (plain keys and the meta frame; built, verbatim, large-blob and
 *    `none` frames), every blob extracted again with the frame
 *    decompressor and compared with its content;
 *  - the same packs fed in every chunking (1 byte at a time, small and
 *    random splits, whole) give identical results;
 *  - every malformed v2 pack of issue 13 (wrong sizes, lengths that do
 *    not add up, data that decompresses to more or fewer bytes, `blobs`
 *    in a v2 pack, `meta` with plain keys, a blob that does not hash to
 *    its id, truncated data, ...) is refused with a message naming it;
 *  - bounds: a zip bomb stops at `size` with bounded memory, the total
 *    unpacked limit, the metadata limit, the reorder buffer, the zstd
 *    window limit;
 *  - determinism of the writer, the sizer's agreement with the writer
 *    whatever the chunking, the byte-range URIs;
 *  - a cross-check with an independent implementation
 *    (test/unit/mpack_xcheck.py: Python's zstandard and msgpack): its
 *    packs are read here, and ours are checked there;
 *  - in a FAILALLOC=1 build, the v2 writer and the stream reader with
 *    the Nth allocation failing, for every N (include/mh/failalloc.h).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zstd.h>

#include "mh/failalloc.h"
#include "mh/mpack.h"
#include "tap.h"

static mh_str_t S(const char *s)
{
    return (mh_str_t){s, s ? strlen(s) : 0};
}
static const mh_str_t NIL = {NULL, 0};

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* ================================================================ fixture */

#define NBLOBS 60
#define NCOMMITS 6

/* A small history: blobs of text-like content (an empty one, a large
 * one, two paths sharing one content), and a chain of commits whose
 * snapshots upsert them, with real snapshot and commit ids. */
typedef struct {
    uint8_t *content[NBLOBS];
    size_t len[NBLOBS];
    mh_id_t id[NBLOBS];
    char path[NBLOBS][32];
    mh_id_t sid[NCOMMITS], cid[NCOMMITS];
    mh_buf_t up[NCOMMITS], rm[NCOMMITS];
    char msg[NCOMMITS][32], at[NCOMMITS][40];
} fixture_t;

static fixture_t F;
#define BIG 5 /* the index of the large blob */
#define BIG_LEN ((size_t)3 << 20)

static void fixture_init(void)
{
    static const char *words[] = {"static", "int", "return", "uv_loop_t", "handle", "->", "(", ")", "{", "}", ";",
                                  "if", "else", "0", "1", "NULL", "size_t", "buf", "len", "\n", "    ", "/* x */"};
    for (int i = 0; i < NBLOBS; i++) {
        size_t n = i == 0 ? 0 : i == BIG ? BIG_LEN : 200 + (rnd() % 12000);
        uint8_t *c = malloc(n ? n : 1);
        size_t k = 0;
        while (k < n) {
            const char *w = words[rnd() % (sizeof words / sizeof *words)];
            size_t wl = strlen(w);
            if (wl > n - k) wl = n - k;
            memcpy(c + k, w, wl);
            k += wl;
            if (k < n) c[k++] = ' ';
        }
        if (i == 7) { /* the same content as blob 6: the same id twice */
            free(c);
            n = F.len[6];
            c = malloc(n);
            memcpy(c, F.content[6], n);
        }
        F.content[i] = c;
        F.len[i] = n;
        mh_blob_id(c, n, &F.id[i]);
        snprintf(F.path[i], sizeof F.path[i], "src/f%03d.c", i);
    }
    mh_manifest_t prev = {0}, cur = {0};
    for (int k = 0; k < NCOMMITS; k++) {
        mh_manifest_clone(&cur, &prev);
        for (int i = k; i < NBLOBS; i += NCOMMITS) mh_manifest_upsert(&cur, F.path[i], strlen(F.path[i]), F.id[i].s);
        if (k == 3) mh_manifest_remove(&cur, F.path[1], strlen(F.path[1]));
        mh_manifest_id(&cur, &F.sid[k]);
        uint32_t nu, nr;
        mh_manifest_diff(&prev, &cur, &F.up[k], &nu, &F.rm[k], &nr);
        snprintf(F.msg[k], sizeof F.msg[k], "commit %d", k);
        snprintf(F.at[k], sizeof F.at[k], "2026-01-0%dT00:00:00+00:00", k + 1);
        mh_str_t parent = k ? S(F.cid[k - 1].s) : NIL;
        mh_commit_id(&parent, k ? 1 : 0, S(F.sid[k].s), S(F.msg[k]), S(F.at[k]), S("gabriel"), &F.cid[k]);
        mh_manifest_clone(&prev, &cur);
    }
    mh_manifest_free(&prev);
    mh_manifest_free(&cur);
}

static int blob_index(const uint8_t digest[32])
{
    mh_id_t t;
    mh_id_from_digest(&t, digest);
    for (int i = 0; i < NBLOBS; i++)
        if (strcmp(t.s, F.id[i].s) == 0) return i;
    return -1;
}

/* commits, snapshots (v1 and v2 alike) */
static void write_commits_snapshots(mh_packw_t *w)
{
    mh_packw_commits(w, NCOMMITS);
    for (int k = 0; k < NCOMMITS; k++)
        mh_packw_commit(w, S(F.cid[k].s), k ? S(F.cid[k - 1].s) : NIL, NIL, S(F.sid[k].s), S(F.msg[k]), S("gabriel"),
                        S(F.at[k]), S("main"), (const uint8_t *)"\x81\xa8" "agent_id\xa3" "bot", 14);
    mh_packw_snapshots(w, NCOMMITS);
    for (int k = 0; k < NCOMMITS; k++)
        mh_packw_snapshot(w, S(F.sid[k].s), k ? S(F.sid[k - 1].s) : NIL, F.up[k].p, F.up[k].len, F.rm[k].p,
                          F.rm[k].len);
}

static void write_heads(mh_packw_t *w)
{
    mh_packw_branch_heads(w, 1);
    mh_packw_branch_head(w, S("main"), S(F.cid[NCOMMITS - 1].s));
}

/* A v1 pack of the fixture; `streamed`: blobs through _blob_begin/_data
 * in small pieces, and `out` drained into `all` after every call. */
static int build_v1(mh_buf_t *all, bool streamed)
{
    mh_buf_t out = {0};
    mh_packw_t w;
    mh_packw_init(&w, &out);
    write_commits_snapshots(&w);
    mh_packw_blobs(&w, NBLOBS);
    for (int i = 0; i < NBLOBS; i++) {
        if (!streamed) {
            mh_packw_blob(&w, S(F.id[i].s), F.content[i], F.len[i]);
            continue;
        }
        mh_packw_blob_begin(&w, S(F.id[i].s), F.len[i]);
        if (w.pos + (all->len - all->len) != w.pos) return -1;
        for (size_t k = 0; k < F.len[i]; k += 1000) {
            mh_packw_blob_data(&w, F.content[i] + k, F.len[i] - k < 1000 ? F.len[i] - k : 1000);
            mh_buf_append(all, out.p, out.len); /* drain */
            out.len = 0;
        }
    }
    write_heads(&w);
    int rc = mh_packw_finish(&w);
    mh_buf_append(all, out.p, out.len);
    mh_buf_free(&out);
    if (!rc && w.pos != all->len) rc = -2; /* pos counts drained bytes */
    return rc;
}

/* How build_v2 lays the blobs out in frames. */
typedef struct {
    bool meta;           /* metadata in the meta frame */
    int level;
    size_t target;       /* built frame target (decompressed bytes) */
    bool with_none;      /* blobs 10..14 in a `none` frame */
    bool large;          /* the big blob as a large (sizer) frame */
    const uint8_t *copy_src; /* a v2 pack to copy its frame 0 from, verbatim */
    size_t copy_len;
    size_t drain;        /* drain `out` when it exceeds this many bytes (0: never) */
} v2opt_t;

/* The blobs that go into built frames (not none, not large, not copied). */
static bool in_built(const v2opt_t *o, int i, const bool *copied)
{
    if (o->with_none && i >= 10 && i < 15) return false;
    if (o->large && i == BIG) return false;
    return !copied[i];
}

/* A v2 pack with empty metadata, up to its frames section. */
static void v2_no_meta(mh_packw_t *w, mh_buf_t *out, const mh_packw_opts_t *po)
{
    mh_packw_init_v2(w, out, po);
    mh_packw_commits(w, 0);
    mh_packw_snapshots(w, 0);
    mh_packw_branch_heads(w, 0);
}

static void drain(mh_buf_t *out, mh_buf_t *all, size_t at)
{
    if (out->len > at) {
        mh_buf_append(all, out->p, out->len);
        out->len = 0;
    }
}

static int build_v2(mh_buf_t *all, const v2opt_t *o)
{
    mh_buf_t out = {0};
    mh_packw_t w;
    mh_packw_opts_t po = {.level = o->level, .meta_frame = o->meta};
    mh_packw_init_v2(&w, &out, &po);
    write_commits_snapshots(&w);
    write_heads(&w);
    bool copied[NBLOBS] = {0};
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_pack_t src = {0};
    if (o->copy_src) {
        const char *why;
        if (mh_pack_read(&a, o->copy_src, o->copy_len, NULL, &src, &why) || src.nframes == 0) return -3;
        for (size_t b = 0; b < src.nblobs; b++)
            if (src.blobs[b].frame == 0) {
                uint8_t d[32];
                for (int i = 0; i < NBLOBS; i++)
                    if (memcmp(src.blobs[b].object_id.p, F.id[i].s, MH_ID_LEN) == 0) copied[i] = true;
                (void)d;
            }
    }
    /* count the frames first (the count goes up front) */
    uint32_t nframes = 0;
    size_t acc = 0;
    int inframe = 0;
    for (int i = 0; i < NBLOBS; i++) {
        if (!in_built(o, i, copied)) continue;
        if (inframe && acc + F.len[i] > o->target) {
            nframes++;
            acc = 0;
            inframe = 0;
        }
        acc += F.len[i];
        inframe++;
    }
    nframes += inframe ? 1 : 0;
    nframes += (o->with_none ? 1 : 0) + (o->large ? 1 : 0) + (o->copy_src ? 1 : 0);
    mh_packw_frames(&w, nframes);
    drain(&out, all, o->drain);
    if (o->copy_src) {
        const mh_pack_frame_t *f = &src.frames[0];
        mh_packw_blobref_t refs[NBLOBS];
        uint32_t n = 0;
        for (size_t b = f->first_blob; b < f->first_blob + f->nblobs; b++)
            refs[n++] = (mh_packw_blobref_t){src.blobs[b].object_id, src.blobs[b].length};
        mh_packw_frame_copy_begin(&w, f->codec, f->size, refs, n, f->data_length);
        for (uint64_t k = 0; k < f->data_length; k += 777) {
            uint64_t m = f->data_length - k < 777 ? f->data_length - k : 777;
            mh_packw_frame_copy_data(&w, o->copy_src + f->data_offset + k, (size_t)m);
            drain(&out, all, o->drain);
        }
        mh_packw_frame_end(&w);
    }
    acc = 0;
    inframe = 0;
    for (int i = 0; i < NBLOBS; i++) {
        if (!in_built(o, i, copied)) continue;
        if (inframe && acc + F.len[i] > o->target) {
            mh_packw_frame_end(&w);
            drain(&out, all, o->drain);
            acc = 0;
            inframe = 0;
        }
        if (!inframe) mh_packw_frame_begin(&w, MH_PACK_ZSTD);
        mh_packw_frame_blob(&w, S(F.id[i].s), F.len[i]);
        for (size_t k = 0; k < F.len[i]; k += 4096)
            mh_packw_frame_data(&w, F.content[i] + k, F.len[i] - k < 4096 ? F.len[i] - k : 4096);
        acc += F.len[i];
        inframe++;
    }
    if (inframe) mh_packw_frame_end(&w);
    drain(&out, all, o->drain);
    if (o->with_none) {
        mh_packw_frame_begin(&w, MH_PACK_NONE);
        for (int i = 10; i < 15; i++) {
            mh_packw_frame_blob(&w, S(F.id[i].s), F.len[i]);
            mh_packw_frame_data(&w, F.content[i], F.len[i]);
        }
        mh_packw_frame_end(&w);
        drain(&out, all, o->drain);
    }
    if (o->large) {
        mh_zsizer_t *z;
        uint64_t clen = 0;
        int rc = mh_zsizer_new(o->level, F.len[BIG], &z);
        for (size_t k = 0; !rc && k < F.len[BIG]; k += 100000)
            rc = mh_zsizer_update(z, F.content[BIG] + k, F.len[BIG] - k < 100000 ? F.len[BIG] - k : 100000);
        if (!rc) rc = mh_zsizer_final(z, &clen);
        mh_zsizer_free(z);
        if (rc) return -4;
        mh_packw_frame_large_begin(&w, MH_PACK_ZSTD, S(F.id[BIG].s), F.len[BIG], clen);
        /* a different split from the sizer's on purpose */
        for (size_t k = 0; k < F.len[BIG]; k += 65537) {
            mh_packw_frame_large_data(&w, F.content[BIG] + k, F.len[BIG] - k < 65537 ? F.len[BIG] - k : 65537);
            drain(&out, all, o->drain);
        }
        mh_packw_frame_end(&w);
    }
    int rc = mh_packw_finish(&w);
    mh_buf_append(all, out.p, out.len);
    mh_buf_free(&out);
    mh_arena_release(&a);
    if (!rc && w.pos != all->len) rc = -2;
    return rc;
}

/* ============================================================ reading */

/* Feeds buf to a new reader in pieces: chunk > 0: that size; chunk 0:
 * random sizes from 1 to 3 * len / 4 (and some 1-byte runs). */
static int read_split(mh_arena_t *a, const uint8_t *buf, size_t len, size_t chunk, unsigned flags,
                      const mh_pack_limits_t *lim, mh_packr_t **out)
{
    mh_packr_t *r;
    int rc = mh_packr_new(a, lim, flags, 0, &r);
    if (rc) return rc;
    size_t off = 0;
    while (!rc && off < len) {
        size_t n = chunk ? chunk : 1 + (size_t)(rnd() % (rnd() % 4 == 0 ? 3 : (len * 3 / 4 + 1)));
        if (n > len - off) n = len - off;
        rc = mh_packr_feed(r, buf + off, n);
        off += n;
    }
    if (!rc) rc = mh_packr_finish(r);
    *out = r;
    return rc;
}

/* Checks a read pack against the fixture: every blob's content (through
 * the frame decompressor or the v1 byte range), the ids, the metadata. */
static int check_result(const uint8_t *buf, const mh_packr_result_t *res, int want_version)
{
    int bad = 0;
    bool seen[NBLOBS] = {0};
    bad += res->version != want_version;
    bad += res->ncommits != NCOMMITS || res->nsnapshots != NCOMMITS || !res->branch_heads;
    for (size_t k = 0; k < res->ncommits && k < NCOMMITS; k++) {
        bad += res->commits[k].commit_id.n != MH_ID_LEN || memcmp(res->commits[k].commit_id.p, F.cid[k].s, MH_ID_LEN);
        bad += res->snapshots[k].snapshot_id.n != MH_ID_LEN ||
               memcmp(res->snapshots[k].snapshot_id.p, F.sid[k].s, MH_ID_LEN);
    }
    for (size_t b = 0; b < res->nblobs; b++) {
        const mh_packr_blob_t *r = &res->blobs[b];
        int i = blob_index(r->id);
        if (i < 0 || r->length != F.len[i]) {
            bad++;
            continue;
        }
        for (int j = 0; j < NBLOBS; j++) seen[j] |= strcmp(F.id[j].s, F.id[i].s) == 0; /* blobs 6 and 7 share an id */
        if (r->frame == MH_PACK_NOFRAME) {
            bad += memcmp(buf + r->offset, F.content[i], F.len[i]) != 0;
            continue;
        }
        const mh_pack_frame_t *f = &res->frames[r->frame];
        mh_buf_t got = {0};
        int rc = mh_frame_extract(f->codec, buf + f->data_offset, f->data_length, f->size, r->offset, r->length, &got);
        bad += rc != 0 || got.len != F.len[i] || (got.len && memcmp(got.p, F.content[i], got.len) != 0);
        mh_buf_free(&got);
    }
    for (int i = 0; i < NBLOBS; i++) bad += !seen[i];
    return bad;
}

/* Reads buf whole and in several chunkings; all must agree. */
static void check_all_chunkings(const char *name, const uint8_t *buf, size_t len, int version)
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_packr_t *ref;
    int rc = read_split(&a, buf, len, len, MH_PACKR_VERIFY | MH_PACKR_HASH_PACK, NULL, &ref);
    TAP_OK(rc == 0, "%s: read whole with VERIFY (%s)", name, rc ? mh_packr_why(ref) : "ok");
    const mh_packr_result_t *R = mh_packr_result(ref);
    TAP_EQ_INT(check_result(buf, R, version), 0, "  every blob, id and commit as written");
    uint8_t d[32];
    mh_sha256(buf, len, d);
    TAP_OK(memcmp(d, R->pack_digest, 32) == 0, "  pack digest = SHA-256 of the bytes");
    size_t chunks[] = {1, 2, 7, 64, 4096, 65536, 0, 0, 0};
    int bad = 0;
    for (size_t c = 0; c < sizeof chunks / sizeof *chunks; c++) {
        if (chunks[c] == 1 && len > (8u << 20)) continue; /* 1-byte feeds of a large pack: too slow for a unit test */
        mh_packr_t *r;
        unsigned par = c % 2 ? MH_PACKR_PARALLEL : 0; /* every other one with the hasher thread */
        rc = read_split(&a, buf, len, chunks[c], MH_PACKR_VERIFY | MH_PACKR_HASH_PACK | par, NULL, &r);
        const mh_packr_result_t *X = mh_packr_result(r);
        int b = rc != 0 || X->version != R->version || X->ncommits != R->ncommits ||
                X->nsnapshots != R->nsnapshots || X->nblobs != R->nblobs || X->nframes != R->nframes ||
                X->has_meta != R->has_meta || memcmp(X->pack_digest, R->pack_digest, 32) != 0 ||
                (X->nblobs && memcmp(X->blobs, R->blobs, X->nblobs * sizeof *X->blobs) != 0) ||
                (X->nframes && memcmp(X->frames, R->frames, X->nframes * sizeof *X->frames) != 0) ||
                (X->has_meta && memcmp(&X->meta, &R->meta, sizeof X->meta) != 0);
        for (size_t k = 0; !b && k < X->ncommits; k++)
            b = memcmp(X->commits[k].commit_id.p, R->commits[k].commit_id.p, MH_ID_LEN) != 0 ||
                X->commits[k].message.n != R->commits[k].message.n;
        if (b) printf("# chunking %zu: rc %d (%s)\n", chunks[c], rc, rc ? mh_packr_why(r) : "different result");
        bad += b;
        mh_packr_free(r);
    }
    TAP_EQ_INT(bad, 0, "  the same result fed 1, 2, 7, 64, 4096, 65536 bytes at a time and in random splits"
                       " (half of them hashing on a second thread)");
    /* the whole-buffer reader agrees */
    mh_pack_t p;
    const char *why = NULL;
    rc = mh_pack_read_flags(&a, buf, len, NULL, MH_PACKR_VERIFY, &p, &why);
    bad = rc != 0 || p.nblobs != R->nblobs || p.ncommits != R->ncommits || p.nframes != R->nframes;
    for (size_t b = 0; !bad && b < p.nblobs; b++) {
        mh_id_t t;
        mh_id_from_digest(&t, R->blobs[b].id);
        const mh_pack_blob_t *x = &p.blobs[b];
        bad += memcmp(x->object_id.p, t.s, MH_ID_LEN) != 0 || x->offset != R->blobs[b].offset ||
               x->length != R->blobs[b].length || x->frame != R->blobs[b].frame;
        if (x->frame != MH_PACK_NOFRAME)
            bad += x->frame_offset != R->frames[x->frame].data_offset ||
                   x->frame_length != R->frames[x->frame].data_length || x->codec != R->frames[x->frame].codec;
        else bad += x->codec != MH_PACK_RAW;
    }
    TAP_OK(!bad, "  mh_pack_read agrees, blob records with their frame fields (%s)", why ? why : "ok");
    mh_packr_free(ref);
    mh_arena_release(&a);
}

/* ========================================================= round trips */

static void test_roundtrip_v1(void)
{
    mh_buf_t a = {0}, b = {0};
    TAP_EQ_INT(build_v1(&a, false), 0, "v1: written");
    TAP_EQ_INT(build_v1(&b, true), 0, "v1: written with streamed blobs, output drained as it grows");
    TAP_OK(a.len == b.len && memcmp(a.p, b.p, a.len) == 0, "v1: streamed blobs give the same bytes");
    check_all_chunkings("v1", a.p, a.len, 1);
    mh_buf_free(&a);
    mh_buf_free(&b);
}

static void test_roundtrip_v2(void)
{
    mh_buf_t plain = {0}, meta = {0}, again = {0}, drained = {0}, copy = {0};
    v2opt_t o = {.level = 3, .target = 64 << 10, .with_none = true, .large = true};
    TAP_EQ_INT(build_v2(&plain, &o), 0, "v2 plain keys: written (built, none and large frames)");
    check_all_chunkings("v2 plain", plain.p, plain.len, 2);
    TAP_EQ_INT(build_v2(&again, &o), 0, "v2: written again");
    TAP_OK(again.len == plain.len && memcmp(again.p, plain.p, plain.len) == 0, "v2: the same inputs give the same bytes");
    o.drain = 1000;
    TAP_EQ_INT(build_v2(&drained, &o), 0, "v2: written with the output drained past 1000 bytes");
    TAP_OK(drained.len == plain.len && memcmp(drained.p, plain.p, plain.len) == 0,
           "v2: draining does not change the bytes (w->pos counts them)");
    o.drain = 0;
    o.meta = true;
    TAP_EQ_INT(build_v2(&meta, &o), 0, "v2 meta frame: written");
    check_all_chunkings("v2 meta", meta.p, meta.len, 2);
    mh_arena_t ar;
    mh_arena_init(&ar, 0);
    mh_packr_t *r;
    read_split(&ar, meta.p, meta.len, meta.len, 0, NULL, &r);
    TAP_OK(mh_packr_result(r)->has_meta && mh_packr_result(r)->meta.codec == MH_PACK_ZSTD,
           "v2 meta frame: read as the meta frame");
    mh_packr_free(r);
    mh_arena_release(&ar);
    /* a pack that reuses frame 0 of `plain` verbatim */
    o.meta = false;
    o.copy_src = plain.p;
    o.copy_len = plain.len;
    o.drain = 5000;
    TAP_EQ_INT(build_v2(&copy, &o), 0, "v2: a frame copied verbatim from another pack (in 777-byte pieces)");
    check_all_chunkings("v2 copy", copy.p, copy.len, 2);
    mh_buf_free(&plain);
    mh_buf_free(&meta);
    mh_buf_free(&again);
    mh_buf_free(&drained);
    mh_buf_free(&copy);
}


/* ======================================================== bad v2 packs */

static void zc(const void *p, size_t n, mh_buf_t *out)
{
    out->len = 0;
    mh_buf_reserve(out, ZSTD_compressBound(n));
    out->len = ZSTD_compress(out->p, out->cap, n ? p : "", n, 3);
}

/* A frame as raw msgpack, keys in `order` (c codec, s size, b blobs, d
 * data, x an unknown key, B a second `blobs`); codec NULL, size < 0 or a
 * letter missing from order leave that key out. */
typedef struct {
    const char *codec;
    int64_t size;
    int nblobs;
    const char *ids[4];
    uint64_t lens[4];
    const void *data;
    size_t dlen;
    const char *order;
    bool data_str;   /* data as str instead of bin */
    bool bad_entry;  /* blobs[0] is [id] only */
} rawframe_t;

static void put_frame(mh_mpw_t *w, const rawframe_t *f)
{
    const char *order = f->order ? f->order : "csbd";
    uint32_t n = 0;
    for (const char *o = order; *o; o++) n += (*o != 'c' || f->codec) && (*o != 's' || f->size >= 0);
    mh_mpw_map(w, n);
    for (const char *o = order; *o; o++) {
        switch (*o) {
        case 'c':
            if (f->codec) {
                mh_mpw_cstr(w, "codec");
                mh_mpw_cstr(w, f->codec);
            }
            break;
        case 's':
            if (f->size >= 0) {
                mh_mpw_cstr(w, "size");
                mh_mpw_uint(w, (uint64_t)f->size);
            }
            break;
        case 'b': case 'B':
            mh_mpw_cstr(w, "blobs");
            mh_mpw_arr(w, (uint32_t)f->nblobs);
            for (int i = 0; i < f->nblobs; i++) {
                mh_mpw_arr(w, f->bad_entry && i == 0 ? 1 : 2);
                mh_mpw_cstr(w, f->ids[i]);
                if (!(f->bad_entry && i == 0)) mh_mpw_uint(w, f->lens[i]);
            }
            break;
        case 'd':
            mh_mpw_cstr(w, "data");
            if (f->data_str) mh_mpw_str(w, f->data, f->dlen);
            else mh_mpw_bin(w, f->data, f->dlen);
            break;
        case 'x':
            mh_mpw_cstr(w, "comment");
            mh_mpw_map(w, 1);
            mh_mpw_cstr(w, "deep");
            mh_mpw_arr(w, 2);
            mh_mpw_uint(w, 1);
            mh_mpw_bin(w, "zz", 2);
            break;
        }
    }
}

static const char *HELLO = "hello fetch world", *WORLD = "and another blob";
static mh_id_t H_ID, W_ID;

/* The bad packs. Each builds a v2 pack with one thing wrong. */
enum {
    B_OK, B_OK_REORDER, B_OK_UNKNOWN_KEY, B_OK_EMPTY, B_SUM_SHORT, B_SUM_LONG, B_MORE, B_FEWER, B_BLOBS_KEY,
    B_OBJECTS_KEY, B_META_AND_COMMITS, B_COMMITS_AND_META, B_HASH, B_HASH_NONE, B_TRUNC_ZSTD, B_NO_FRAMES,
    B_CODEC, B_NONE_LEN, B_BAD_ID, B_BAD_ENTRY, B_META_BLOBS, B_META_FRAMES_INSIDE, B_AFTER_ZSTD, B_DATA_STR,
    B_NO_SIZE, B_NO_CODEC, B_NO_DATA, B_NO_BLOBS, B_DUP_KEY, B_DUP_BLOBS, B_GARBAGE, B_META_TRAILING,
    B_META_SHORT, B_FRAMES_NIL, B_VERSION3, B_SIZE_STR, B_NB
};
static const struct {
    const char *name;
    int rc;
    const char *why; /* a substring of the reason */
} bads[B_NB] = {
    [B_OK] = {"a good pack", 0, NULL},
    [B_OK_REORDER] = {"data before codec, size and blobs (buffered, accepted)", 0, NULL},
    [B_OK_UNKNOWN_KEY] = {"an unknown key in a frame (ignored)", 0, NULL},
    [B_OK_EMPTY] = {"an empty frames array", 0, NULL},
    [B_SUM_SHORT] = {"blob lengths add up to less than size", MH_EPARSE, "frames[0].blobs: lengths add up to 30, size says 40"},
    [B_SUM_LONG] = {"blob lengths add up to more than size", MH_EPARSE, "lengths add up to more than size (20)"},
    [B_MORE] = {"data decompresses to more than size", MH_EPARSE, "frames[0]: data decompresses to more than size (17) bytes"},
    [B_FEWER] = {"data decompresses to fewer than size", MH_EPARSE, "frames[0]: data decompresses to fewer than size (33) bytes"},
    [B_BLOBS_KEY] = {"`blobs` in a v2 pack", MH_EPARSE, "pack.blobs: not allowed in a v2 pack"},
    [B_OBJECTS_KEY] = {"`objects` in a v2 pack", MH_EPARSE, "pack.objects: not allowed in a v2 pack"},
    [B_META_AND_COMMITS] = {"`meta` then plain commits", MH_EPARSE, "both `meta` and plain"},
    [B_COMMITS_AND_META] = {"plain commits then `meta`", MH_EPARSE, "both `meta` and plain"},
    [B_HASH] = {"a blob that does not hash to its id (zstd)", MH_EHASH, "frames[0].blobs[1] (sha256:"},
    [B_HASH_NONE] = {"a blob that does not hash to its id (none)", MH_EHASH, "content does not hash to its object_id"},
    [B_TRUNC_ZSTD] = {"a truncated zstd frame in complete data", MH_EPARSE, "the zstd frame is truncated"},
    [B_NO_FRAMES] = {"no `frames`", MH_EPARSE, "pack.frames: missing"},
    [B_CODEC] = {"an unknown codec", MH_EPARSE, "frames[0].codec: unknown codec \"lz4\""},
    [B_NONE_LEN] = {"codec none with data longer than size", MH_EPARSE, "with codec none, size says"},
    [B_BAD_ID] = {"a bad id in blobs", MH_EPARSE, "frames[0].blobs[0]: object id is not a sha256 id"},
    [B_BAD_ENTRY] = {"a blobs entry that is not [id, length]", MH_EPARSE, "frames[0].blobs[0]: not [object_id, length]"},
    [B_META_BLOBS] = {"`blobs` in the meta frame", MH_EPARSE, "meta.blobs: not allowed in the meta frame"},
    [B_META_FRAMES_INSIDE] = {"`frames` inside the meta map", MH_EPARSE, "meta.frames: not allowed inside meta"},
    [B_AFTER_ZSTD] = {"bytes after the zstd frame", MH_EPARSE, "bytes after the end of the zstd frame"},
    [B_DATA_STR] = {"data as str", MH_EPARSE, "frames[0].data: not bin"},
    [B_NO_SIZE] = {"a frame without size", MH_EPARSE, "frames[0].size: missing"},
    [B_NO_CODEC] = {"a frame without codec", MH_EPARSE, "frames[0].codec: missing"},
    [B_NO_DATA] = {"a frame without data", MH_EPARSE, "frames[0].data: missing"},
    [B_NO_BLOBS] = {"a frame without blobs", MH_EPARSE, "frames[0].blobs: missing"},
    [B_DUP_KEY] = {"a frame key twice", MH_EPARSE, "frames[0].size: key appears twice"},
    [B_DUP_BLOBS] = {"`blobs` twice in a frame", MH_EPARSE, "frames[0].blobs: key appears twice"},
    [B_GARBAGE] = {"data that is not zstd", MH_EPARSE, "frames[0].data: not a valid zstd frame"},
    [B_META_TRAILING] = {"meta data with bytes after its map", MH_EPARSE, "meta: malformed msgpack: trailing bytes"},
    [B_META_SHORT] = {"meta data whose map is cut short", MH_EPARSE, "meta: malformed msgpack: string or bin longer"},
    [B_FRAMES_NIL] = {"frames nil", MH_EPARSE, "frames: not an array"},
    [B_VERSION3] = {"format version 3", MH_EPARSE, "unsupported format version"},
    [B_SIZE_STR] = {"size as a string", MH_EPARSE, "frames[0].size: not a non-negative integer"},
};

/* Body: optional plain commits (one real commit) / meta / blobs keys,
 * then frames. */
static void build_bad(mh_buf_t *b, int k)
{
    mh_buf_t z = {0}, z2 = {0}, m = {0};
    mh_mpw_t w;
    mh_mpw_init(&w, b);
    mh_mpw_raw(&w, k == B_VERSION3 ? "MUSE\x03" : "MUSE\x02", 5);
    char HW[64];
    memcpy(HW, HELLO, 17);
    memcpy(HW + 17, WORLD, 16);
    zc(HW, 33, &z);
    rawframe_t f = {.codec = "zstd", .size = 33, .nblobs = 2, .ids = {H_ID.s, W_ID.s}, .lens = {17, 16},
                    .data = z.p, .dlen = z.len};
    bool meta = k == B_META_AND_COMMITS || k == B_COMMITS_AND_META || k == B_META_BLOBS ||
                k == B_META_FRAMES_INSIDE || k == B_META_TRAILING || k == B_META_SHORT;
    bool commits = k == B_META_AND_COMMITS || k == B_COMMITS_AND_META;
    bool extra = k == B_BLOBS_KEY || k == B_OBJECTS_KEY;
    uint32_t keys = 1 + meta + commits + extra - (k == B_NO_FRAMES);
    mh_mpw_map(&w, keys);
    if (k == B_COMMITS_AND_META) {
        mh_mpw_cstr(&w, "commits");
        mh_mpw_arr(&w, 0);
    }
    if (meta) {
        mh_mpw_t mw;
        mh_mpw_init(&mw, &m);
        mh_mpw_map(&mw, k == B_META_FRAMES_INSIDE ? 2 : 1);
        mh_mpw_cstr(&mw, "branch_heads");
        mh_mpw_map(&mw, 1);
        mh_mpw_cstr(&mw, "main");
        mh_mpw_cstr(&mw, F.cid[0].s);
        if (k == B_META_FRAMES_INSIDE) {
            mh_mpw_cstr(&mw, "frames");
            mh_mpw_arr(&mw, 0);
        }
        if (k == B_META_TRAILING) mh_mpw_nil(&mw);
        size_t mlen = k == B_META_SHORT ? m.len - 3 : m.len;
        zc(m.p, mlen, &z2);
        mh_mpw_cstr(&w, "meta");
        rawframe_t mf = {.codec = "zstd", .size = (int64_t)mlen, .data = z2.p, .dlen = z2.len, .order = "csd"};
        if (k == B_META_BLOBS) {
            mf.order = "csbd";
            mf.nblobs = 0;
        }
        put_frame(&w, &mf);
    }
    if (k == B_META_AND_COMMITS) {
        mh_mpw_cstr(&w, "commits");
        mh_mpw_arr(&w, 0);
    }
    if (extra) {
        mh_mpw_cstr(&w, k == B_BLOBS_KEY ? "blobs" : "objects");
        mh_mpw_arr(&w, 0);
    }
    if (k == B_NO_FRAMES) goto out;
    mh_mpw_cstr(&w, "frames");
    if (k == B_FRAMES_NIL) {
        mh_mpw_nil(&w);
        goto out;
    }
    if (k == B_OK_EMPTY) {
        mh_mpw_arr(&w, 0);
        goto out;
    }
    mh_mpw_arr(&w, 1);
    switch (k) {
    case B_OK_REORDER: f.order = "dbsc"; break;
    case B_OK_UNKNOWN_KEY: f.order = "cxsbd"; break;
    case B_SUM_SHORT: f.size = 40; f.lens[1] = 13; zc(HW, 40, &z); f.dlen = z.len; break;
    case B_SUM_LONG: f.size = 20; f.order = "sbcd"; break;
    case B_MORE: /* sizes say 17 + 0, the data holds 33 */
        f.size = 17;
        f.lens[1] = 0;
        f.ids[1] = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        break;
    case B_FEWER: zc(HW, 20, &z); f.dlen = z.len; break;
    case B_HASH: HW[20] ^= 1; zc(HW, 33, &z); f.dlen = z.len; break;
    case B_HASH_NONE: HW[20] ^= 1; f.codec = "none"; f.data = HW; f.dlen = 33; break;
    case B_TRUNC_ZSTD: f.dlen = z.len - 2; break;
    case B_CODEC: f.codec = "lz4"; break;
    case B_NONE_LEN: f.codec = "none"; f.data = HW; f.dlen = 34; break;
    case B_BAD_ID: f.ids[0] = "sha256:XYZ"; break;
    case B_BAD_ENTRY: f.bad_entry = true; break;
    case B_AFTER_ZSTD:
        mh_buf_append(&z, "\x00\x01", 2);
        f.dlen = z.len;
        break;
    case B_DATA_STR: f.data_str = true; break;
    case B_NO_SIZE: f.size = -1; break;
    case B_NO_CODEC: f.codec = NULL; break;
    case B_NO_DATA: f.order = "csb"; break;
    case B_NO_BLOBS: f.order = "csd"; break;
    case B_DUP_KEY: f.order = "cssbd"; break;
    case B_DUP_BLOBS: f.order = "csbBd"; break;
    case B_GARBAGE: f.data = "this is not zstd at all"; f.dlen = 23; break;
    case B_SIZE_STR: f.size = -1; f.order = "cxsbd"; break;
    }
    if (k == B_SIZE_STR) { /* size as "33" */
        mh_mpw_map(&w, 5);
        mh_mpw_cstr(&w, "codec");
        mh_mpw_cstr(&w, "zstd");
        mh_mpw_cstr(&w, "size");
        mh_mpw_cstr(&w, "33");
        mh_mpw_cstr(&w, "blobs");
        mh_mpw_arr(&w, 0);
        mh_mpw_cstr(&w, "data");
        mh_mpw_bin(&w, z.p, z.len);
        mh_mpw_cstr(&w, "x");
        mh_mpw_nil(&w);
    } else {
        put_frame(&w, &f);
    }
out:
    mh_buf_free(&z);
    mh_buf_free(&z2);
    mh_buf_free(&m);
}

static void test_bad_v2(void)
{
    mh_blob_id(HELLO, 17, &H_ID);
    mh_blob_id(WORLD, 16, &W_ID);
    for (int k = 0; k < B_NB; k++) {
        mh_buf_t b = {0};
        build_bad(&b, k);
        mh_arena_t a;
        mh_arena_init(&a, 0);
        mh_packr_t *r1, *r2, *r3, *r5;
        int rc1 = read_split(&a, b.p, b.len, b.len, MH_PACKR_VERIFY, NULL, &r1);
        int rc2 = read_split(&a, b.p, b.len, 1, MH_PACKR_VERIFY, NULL, &r2);
        int rc3 = read_split(&a, b.p, b.len, 0, MH_PACKR_VERIFY, NULL, &r3);
        int rc5 = read_split(&a, b.p, b.len, 0, MH_PACKR_VERIFY | MH_PACKR_PARALLEL, NULL, &r5);
        const char *why = mh_packr_why(r1);
        bool msg_ok = bads[k].why ? why && strstr(why, bads[k].why) : why == NULL;
        TAP_OK(rc1 == bads[k].rc && msg_ok, "%s: %s (%s)", bads[k].rc ? "refused" : "accepted", bads[k].name,
               why ? why : "ok");
        if (rc1 != bads[k].rc || !msg_ok) printf("#   rc %d, want %d; want reason containing '%s'\n", rc1, bads[k].rc,
                                                 bads[k].why ? bads[k].why : "");
        const char *w2 = mh_packr_why(r2), *w3 = mh_packr_why(r3);
        TAP_OK(rc2 == rc1 && rc3 == rc1 && (why ? w2 && w3 && !strcmp(w2, why) && !strcmp(w3, why) : !w2 && !w3),
               "  the same fed 1 byte at a time and in random pieces");
        const char *w5 = mh_packr_why(r5);
        TAP_OK(rc5 == rc1 && (why ? w5 && !strcmp(w5, why) : !w5), "  the same with the blobs hashed on a second thread");
        mh_packr_free(r5);
        if (k == B_OK_REORDER)
            TAP_OK(mh_packr_result(r1)->reorder_peak == (uint64_t)mh_packr_result(r1)->frames[0].data_length,
                   "  the out-of-order data was buffered and counted (%llu bytes)",
                   (unsigned long long)mh_packr_result(r1)->reorder_peak);
        if (k == B_OK) TAP_OK(mh_packr_result(r1)->reorder_peak == 0, "  writers' key order: nothing buffered");
        /* the whole-buffer reader says the same */
        mh_pack_t p;
        const char *pw = NULL;
        int rc4 = mh_pack_read_flags(&a, b.p, b.len, NULL, MH_PACKR_VERIFY, &p, &pw);
        TAP_OK(rc4 == rc1 && (why ? pw && !strcmp(pw, why) : pw == NULL), "  mh_pack_read says the same");
        mh_packr_free(r1);
        mh_packr_free(r2);
        mh_packr_free(r3);
        mh_arena_release(&a);
        mh_buf_free(&b);
    }
}

/* Truncation of a real v2 pack at every length: always an error, never
 * a crash, with or without VERIFY. */
static void test_truncation(void)
{
    mh_buf_t b = {0};
    v2opt_t o = {.level = 1, .target = 8 << 10, .with_none = true, .meta = true};
    build_v2(&b, &o);
    mh_arena_t a;
    mh_arena_init(&a, 0);
    int bad = 0, n = 0;
    size_t step = b.len / 400 + 1;
    for (size_t cut = 0; cut < b.len; cut += (cut < 600 ? 1 : step + (rnd() % 97)), n++) {
        mh_packr_t *r;
        int rc = read_split(&a, b.p, cut, 0, n % 2 ? MH_PACKR_VERIFY : 0, NULL, &r);
        if (rc != MH_EPARSE || !mh_packr_why(r)) {
            bad++;
            if (bad < 4) printf("# cut %zu: rc %d (%s)\n", cut, rc, mh_packr_why(r) ? mh_packr_why(r) : "");
        }
        mh_packr_free(r);
        if (n % 64 == 0) {
            mh_arena_release(&a);
            mh_arena_init(&a, 0);
        }
    }
    TAP_EQ_INT(bad, 0, "truncated v2 packs (every length up to 600, then ~400 more): MH_EPARSE with a reason");
    mh_packr_t *r;
    read_split(&a, b.p, 1000, 0, 0, NULL, &r);
    TAP_OK(mh_packr_why(r) && strstr(mh_packr_why(r), "truncated"), "  the reason says so (%s)", mh_packr_why(r));
    mh_packr_free(r);
    mh_arena_release(&a);
    mh_buf_free(&b);
}

/* ============================================================= bounds */

/* A frame map whose data is `z`, claiming `size` and one blob. */
static void one_frame_pack(mh_buf_t *b, const uint8_t *z, size_t zlen, uint64_t size, const char *id)
{
    mh_mpw_t w;
    mh_mpw_init(&w, b);
    mh_mpw_raw(&w, "MUSE\x02", 5);
    mh_mpw_map(&w, 1);
    mh_mpw_cstr(&w, "frames");
    mh_mpw_arr(&w, 1);
    rawframe_t f = {.codec = "zstd", .size = (int64_t)size, .nblobs = 1, .ids = {id}, .lens = {size},
                    .data = z, .dlen = zlen};
    put_frame(&w, &f);
}

static void test_zip_bomb(void)
{
    /* 1 GiB of zeros in one zstd frame: ~40 KB compressed. */
    const size_t piece = 1 << 20;
    const uint64_t total = (uint64_t)1 << 30;
    uint8_t *zeros = calloc(1, piece);
    ZSTD_CCtx *c = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, 1);
    mh_buf_t z = {0};
    uint64_t t0 = mh_now_us();
    for (uint64_t done = 0; done < total; done += piece) {
        ZSTD_inBuffer in = {zeros, piece, 0};
        ZSTD_EndDirective e = done + piece == total ? ZSTD_e_end : ZSTD_e_continue;
        size_t left;
        do {
            mh_buf_reserve(&z, ZSTD_CStreamOutSize());
            ZSTD_outBuffer out = {z.p + z.len, z.cap - z.len, 0};
            left = ZSTD_compressStream2(c, &out, &in, e);
            z.len += out.pos;
        } while (in.pos < in.size || (e == ZSTD_e_end && left));
    }
    ZSTD_freeCCtx(c);
    TAP_COMMENT("zip bomb: 1 GiB of zeros is %zu bytes of zstd (made in %.0f ms)", z.len, (mh_now_us() - t0) / 1e3);
    mh_id_t id;
    mh_blob_id(zeros, piece, &id);
    mh_buf_t b = {0};
    one_frame_pack(&b, z.p, z.len, piece, id.s);
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_packr_t *r;
    t0 = mh_now_us();
    int rc = read_split(&a, b.p, b.len, 4096, MH_PACKR_VERIFY, NULL, &r);
    double ms = (mh_now_us() - t0) / 1e3;
    const char *why = mh_packr_why(r);
    TAP_OK(rc == MH_EPARSE && why && strstr(why, "data decompresses to more than size (1048576) bytes"),
           "zip bomb: a 1 MiB frame that decompresses to 1 GiB is refused (%s)", why ? why : "accepted!");
    size_t peak = mh_packr_result(r)->mem_peak;
    TAP_OK(peak < (4u << 20), "  reader memory stayed bounded: peak %zu bytes", peak);
    TAP_COMMENT("  stopped after %.1f ms", ms);
    mh_packr_free(r);
    /* the frame decompressor stops at size too */
    mh_framer_t *fr;
    mh_framer_new(MH_PACK_ZSTD, piece, 0, piece, 0, &fr);
    mh_buf_t got = {0};
    rc = mh_framer_feed(fr, z.p, z.len, (mh_frame_out_cb)mh_buf_append, &got);
    TAP_OK(rc == MH_EPARSE && got.len == piece, "  the frame decompressor stops at size too (%s, %zu bytes out)",
           mh_framer_why(fr) ? mh_framer_why(fr) : "ok", got.len);
    mh_framer_free(fr);
    mh_buf_free(&got);
    /* a frame claiming 20 GiB is refused before anything is decompressed */
    b.len = 0;
    one_frame_pack(&b, z.p, z.len, (uint64_t)20 << 30, id.s);
    rc = read_split(&a, b.p, b.len, b.len, MH_PACKR_VERIFY, NULL, &r);
    why = mh_packr_why(r);
    TAP_OK(rc == MH_ELIMIT && why && strstr(why, "more than the limit (17179869184 bytes) in total"),
           "a frame claiming 20 GiB: over MUSEHUB_MAX_UNPACKED_BYTES (%s)", why ? why : "accepted");
    mh_packr_free(r);
    mh_arena_release(&a);
    mh_buf_free(&b);
    mh_buf_free(&z);
    free(zeros);
}

static void test_limits(void)
{
    mh_buf_t b = {0};
    v2opt_t o = {.level = 1, .target = 64 << 10, .with_none = true, .large = true};
    build_v2(&b, &o);
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_packr_t *r;
    mh_pack_limits_t lim = mh_pack_limits_default;
    lim.max_unpacked = 2 << 20;
    int rc = read_split(&a, b.p, b.len, 10000, MH_PACKR_VERIFY, &lim, &r);
    TAP_OK(rc == MH_ELIMIT && strstr(mh_packr_why(r), "frames decompress to more than the limit (2097152 bytes)"),
           "total unpacked over the limit: MH_ELIMIT (%s)", mh_packr_why(r));
    mh_packr_free(r);
    lim = mh_pack_limits_default;
    lim.max_frame_size = 32 << 10; /* the built frames are ~64 KiB: over it with several blobs */
    rc = read_split(&a, b.p, b.len, b.len, 0, &lim, &r);
    TAP_OK(rc == MH_ELIMIT && strstr(mh_packr_why(r), "is above the limit (32768) for a frame of"),
           "a frame of several blobs above the frame size limit: refused (%s)", mh_packr_why(r));
    mh_packr_free(r);
    /* ... but a frame of one blob may be larger (the 3 MiB large frame) */
    mh_buf_t one = {0};
    mh_buf_t z = {0};
    zc(F.content[BIG], F.len[BIG], &z);
    one_frame_pack(&one, z.p, z.len, F.len[BIG], F.id[BIG].s);
    rc = read_split(&a, one.p, one.len, 100000, MH_PACKR_VERIFY, &lim, &r);
    TAP_OK(rc == 0, "  a frame of one 3 MiB blob passes that limit (%s)", rc ? mh_packr_why(r) : "ok");
    mh_packr_free(r);
    lim = mh_pack_limits_default;
    lim.max_meta_bytes = 2000;
    rc = read_split(&a, b.p, b.len, 333, 0, &lim, &r);
    TAP_OK(rc == MH_ELIMIT && strstr(mh_packr_why(r), "metadata larger than the limit (2000 bytes)"),
           "metadata over the limit: MH_ELIMIT (%s)", mh_packr_why(r));
    mh_packr_free(r);
    rc = read_split(&a, b.p, b.len, b.len, MH_PACKR_BORROW, &lim, &r);
    TAP_EQ_INT(rc, MH_ELIMIT, "  also when decoded in place (BORROW, one chunk)");
    mh_packr_free(r);
    /* the reorder buffer limit */
    mh_buf_t ro = {0};
    mh_mpw_t w;
    mh_mpw_init(&w, &ro);
    mh_mpw_raw(&w, "MUSE\x02", 5);
    mh_mpw_map(&w, 1);
    mh_mpw_cstr(&w, "frames");
    mh_mpw_arr(&w, 1);
    rawframe_t f = {.codec = "zstd", .size = (int64_t)F.len[BIG], .nblobs = 1, .ids = {F.id[BIG].s},
                    .lens = {F.len[BIG]}, .data = z.p, .dlen = z.len, .order = "dcsb"};
    put_frame(&w, &f);
    lim = mh_pack_limits_default;
    rc = read_split(&a, ro.p, ro.len, 4096, MH_PACKR_VERIFY, &lim, &r);
    TAP_OK(rc == 0 && mh_packr_result(r)->reorder_peak == z.len,
           "data before the other keys: buffered (%llu bytes) and verified", (unsigned long long)mh_packr_result(r)->reorder_peak);
    mh_packr_free(r);
    lim.max_reorder = 1000;
    rc = read_split(&a, ro.p, ro.len, 4096, MH_PACKR_VERIFY, &lim, &r);
    TAP_OK(rc == MH_ELIMIT && strstr(mh_packr_why(r), "larger than the reorder limit (1000 bytes)"),
           "  over the reorder limit: MH_ELIMIT (%s)", mh_packr_why(r));
    mh_packr_free(r);
    /* a zstd window over the limit */
    ZSTD_CCtx *c = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(c, ZSTD_c_windowLog, 25);
    ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 0);
    mh_buf_t zw = {0};
    mh_buf_reserve(&zw, ZSTD_compressBound(F.len[BIG]));
    ZSTD_inBuffer in = {F.content[BIG], F.len[BIG], 0};
    ZSTD_outBuffer out = {zw.p, zw.cap, 0};
    /* continue, then end: the size is not known up front, so the frame
     * keeps the 32 MiB window it asks for */
    ZSTD_compressStream2(c, &out, &in, ZSTD_e_continue);
    ZSTD_inBuffer none = {NULL, 0, 0};
    while (ZSTD_compressStream2(c, &out, &none, ZSTD_e_end)) {
    }
    zw.len = out.pos;
    ZSTD_freeCCtx(c);
    one.len = 0;
    one_frame_pack(&one, zw.p, zw.len, F.len[BIG], F.id[BIG].s);
    rc = read_split(&a, one.p, one.len, 65536, MH_PACKR_VERIFY, NULL, &r);
    TAP_OK(rc == MH_ELIMIT && strstr(mh_packr_why(r), "zstd window is larger than the limit"),
           "a 32 MiB zstd window: over the window limit (%s)", mh_packr_why(r));
    mh_packr_free(r);
    lim = mh_pack_limits_default;
    lim.max_window_log = 25;
    rc = read_split(&a, one.p, one.len, 65536, MH_PACKR_VERIFY, &lim, &r);
    TAP_EQ_INT(rc, 0, "  accepted with max_window_log 25");
    mh_packr_free(r);
    mh_buf_free(&zw);
    mh_buf_free(&ro);
    mh_buf_free(&z);
    mh_buf_free(&one);
    mh_arena_release(&a);
    mh_buf_free(&b);
}

/* Reading a large v2 pack in small chunks holds little: the reader's
 * memory does not grow with the pack. */
static void test_memory(void)
{
    mh_buf_t big = {0}, z = {0};
    mh_packw_t w;
    mh_packw_opts_t po = {.level = 1};
    v2_no_meta(&w, &big, &po);
    const int nframes = 48;
    mh_packw_frames(&w, nframes);
    uint8_t *buf = malloc(1 << 20);
    for (int fi = 0; fi < nframes; fi++) {
        mh_packw_frame_begin(&w, MH_PACK_ZSTD);
        for (int bi = 0; bi < 4; bi++) {
            for (size_t k = 0; k < (1u << 20); k++) buf[k] = (uint8_t)((k * 7 + (size_t)fi * 13 + (size_t)bi) ^ (rnd() & 3));
            mh_id_t id;
            mh_blob_id(buf, 1 << 20, &id);
            mh_packw_frame_blob(&w, S(id.s), 1 << 20);
            mh_packw_frame_data(&w, buf, 1 << 20);
        }
        mh_packw_frame_end(&w);
    }
    TAP_EQ_INT(mh_packw_finish(&w), 0, "a v2 pack of 192 MiB of blobs in 48 frames: written");
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_packr_t *r;
    int rc = read_split(&a, big.p, big.len, 64 << 10, MH_PACKR_VERIFY | MH_PACKR_HASH_PACK, NULL, &r);
    size_t peak = mh_packr_result(r)->mem_peak;
    TAP_OK(rc == 0 && peak < (2u << 20), "  read in 64 KiB chunks with VERIFY: reader peak %zu bytes (pack %zu bytes)",
           peak, big.len);
    mh_packr_free(r);
    mh_arena_release(&a);
    free(buf);
    mh_buf_free(&big);
    mh_buf_free(&z);
}

/* The blob hasher's thread (MH_PACKR_PARALLEL): the same verdicts and
 * messages as a read on one thread, the first mismatch reported ahead of
 * a later error of the reader's own, and bounded memory. */
static void test_parallel(void)
{
    mh_buf_t good = {0}, bad = {0};
    const int nframes = 12, per = 4;
    const size_t blen = 200000;
    uint8_t *buf = malloc(blen);
    for (int pass = 0; pass < 2; pass++) {
        mh_buf_t *out = pass ? &bad : &good;
        mh_packw_t w;
        mh_packw_opts_t po = {.level = 1};
        v2_no_meta(&w, out, &po);
        mh_packw_frames(&w, (uint32_t)nframes);
        for (int fi = 0; fi < nframes; fi++) {
            mh_packw_frame_begin(&w, MH_PACK_ZSTD);
            for (int bi = 0; bi < per; bi++) {
                size_t n = bi == 1 ? 0 : blen; /* an empty blob in every frame */
                for (size_t k = 0; k < n; k++) buf[k] = (uint8_t)((k * 31 + (size_t)fi * 7 + (size_t)bi) ^ (rnd() & 7));
                mh_id_t id;
                mh_blob_id(buf, n, &id);
                if (pass && fi == 7 && bi == 2) buf[blen / 2] ^= 1; /* frames[7].blobs[2] lies */
                mh_packw_frame_blob(&w, S(id.s), n);
                if (n) mh_packw_frame_data(&w, buf, n);
            }
            mh_packw_frame_end(&w);
        }
        TAP_OK(mh_packw_finish(&w) == 0, "a v2 pack of %d frames of %d blobs (%s): written", nframes, per,
               pass ? "frames[7].blobs[2] does not hash to its id" : "all good");
    }
    free(buf);
    mh_arena_t a;
    mh_arena_init(&a, 0);
    const unsigned P = MH_PACKR_VERIFY | MH_PACKR_PARALLEL;
    size_t chunks[] = {good.len, 1 << 20, 4096, 0, 0};
    int diff = 0;
    size_t peak = 0;
    for (size_t c = 0; c < sizeof chunks / sizeof *chunks; c++) {
        mh_packr_t *r1, *r2;
        int rc1 = read_split(&a, good.p, good.len, chunks[c], MH_PACKR_VERIFY, NULL, &r1);
        int rc2 = read_split(&a, good.p, good.len, chunks[c], P, NULL, &r2);
        const mh_packr_result_t *X = mh_packr_result(r1), *Y = mh_packr_result(r2);
        diff += rc1 != 0 || rc2 != 0 || X->nblobs != Y->nblobs ||
                memcmp(X->blobs, Y->blobs, X->nblobs * sizeof *X->blobs) != 0;
        if (Y->mem_peak > peak) peak = Y->mem_peak;
        mh_packr_free(r1);
        mh_packr_free(r2);
    }
    TAP_EQ_INT(diff, 0, "  accepted with and without the hasher thread, the same blob records, in every chunking");
    TAP_OK(peak < (5u << 20), "  reader peak with the hasher thread %zu bytes (pack %zu bytes)", peak, good.len);
    /* the lie, then (cut) a truncation past it: the mismatch comes first */
    size_t cuts[] = {bad.len, bad.len - 1000, bad.len - bad.len / 8};
    diff = 0;
    for (size_t k = 0; k < sizeof cuts / sizeof *cuts; k++)
        for (size_t c = 0; c < sizeof chunks / sizeof *chunks; c++) {
            mh_packr_t *r1, *r2;
            int rc1 = read_split(&a, bad.p, cuts[k], chunks[c], MH_PACKR_VERIFY, NULL, &r1);
            int rc2 = read_split(&a, bad.p, cuts[k], chunks[c], P, NULL, &r2);
            const char *w1 = mh_packr_why(r1), *w2 = mh_packr_why(r2);
            bool same = rc1 == MH_EHASH && rc2 == rc1 && w1 && w2 && !strcmp(w1, w2) &&
                        strstr(w1, "frames[7].blobs[2] (sha256:");
            if (!same) printf("# cut %zu chunk %zu: %d %s / %d %s\n", cuts[k], chunks[c], rc1, w1 ? w1 : "-", rc2,
                              w2 ? w2 : "-");
            diff += !same;
            mh_packr_free(r1);
            mh_packr_free(r2);
        }
    TAP_EQ_INT(diff, 0, "  a lying blob: MH_EHASH naming frames[7].blobs[2] on both, also when the pack is cut after it");
    /* freed mid-stream, with work queued: nothing leaks, nothing waits */
    mh_packr_t *r;
    int rc = mh_packr_new(&a, NULL, P, good.len, &r);
    if (!rc) rc = mh_packr_feed(r, good.p, good.len / 2);
    TAP_EQ_INT(rc, 0, "  half a pack fed to a reader with the hasher thread");
    mh_packr_free(r);
    mh_arena_release(&a);
    mh_buf_free(&good);
    mh_buf_free(&bad);
}

/* ============================================================ writer */

static void test_writer_misuse(void)
{
    mh_buf_t out = {0};
    mh_packw_t w;
    mh_packw_opts_t po = {.level = 20};
    mh_packw_init_v2(&w, &out, &po);
    TAP_EQ_INT(mh_packw_finish(&w), MH_EINVAL, "writer: level 20 refused (windows readers refuse)");
    po.level = 3;
    out.len = 0;
    mh_packw_init_v2(&w, &out, &po);
    mh_packw_commits(&w, 0);
    mh_packw_snapshots(&w, 0);
    mh_packw_blobs(&w, 0);
    TAP_EQ_INT(mh_packw_finish(&w), MH_EINVAL, "writer: a blobs section in v2 is a misuse");
    out.len = 0;
    v2_no_meta(&w, &out, &po);
    mh_packw_frames(&w, 1);
    mh_packw_frame_begin(&w, MH_PACK_ZSTD);
    mh_packw_frame_blob(&w, S(H_ID.s), 17);
    mh_packw_frame_data(&w, HELLO, 10);
    mh_packw_frame_end(&w);
    TAP_EQ_INT(mh_packw_finish(&w), MH_EINVAL, "writer: a blob given fewer bytes than announced");
    out.len = 0;
    v2_no_meta(&w, &out, &po);
    mh_packw_frames(&w, 1);
    mh_packw_frame_large_begin(&w, MH_PACK_ZSTD, S(H_ID.s), 17, 5);
    mh_packw_frame_large_data(&w, HELLO, 17);
    mh_packw_frame_end(&w);
    TAP_EQ_INT(mh_packw_finish(&w), MH_EINVAL, "writer: a large frame whose compressed length differs from the sizer's");
    out.len = 0;
    v2_no_meta(&w, &out, &po);
    mh_packw_frames(&w, 1);
    mh_packw_blobref_t ref = {S(H_ID.s), 17};
    mh_packw_frame_copy_begin(&w, MH_PACK_ZSTD, 18, &ref, 1, 30);
    TAP_EQ_INT(mh_packw_finish(&w), MH_EINVAL, "writer: a verbatim frame whose blob lengths do not add up to size");
    out.len = 0;
    v2_no_meta(&w, &out, &po);
    mh_packw_frames(&w, 2);
    mh_packw_frame_begin(&w, MH_PACK_NONE);
    mh_packw_frame_end(&w);
    TAP_EQ_INT(mh_packw_finish(&w), MH_EINVAL, "writer: fewer frames than announced");
    out.len = 0;
    mh_packw_init(&w, &out);
    mh_packw_commits(&w, 0);
    mh_packw_snapshots(&w, 0);
    mh_packw_blobs(&w, 1);
    mh_packw_blob_begin(&w, S(H_ID.s), 17);
    mh_packw_blob_data(&w, HELLO, 17);
    mh_packw_blob_data(&w, HELLO, 1);
    TAP_EQ_INT(mh_packw_finish(&w), MH_EINVAL, "writer v1: more streamed bytes than announced");
    mh_buf_free(&out);
}

static void test_sizer(void)
{
    /* The sizer's count equals the writer's bytes whatever the split, at
     * every level the writer accepts. */
    int bad = 0;
    for (int level = 1; level <= 19; level += 6) {
        uint64_t lens[3];
        size_t splits[3] = {1, 4099, F.len[BIG]};
        for (int s = 0; s < 3; s++) {
            mh_zsizer_t *z;
            mh_zsizer_new(level, F.len[BIG] / 8, &z);
            for (size_t k = 0; k < F.len[BIG] / 8; k += splits[s]) {
                size_t n = F.len[BIG] / 8 - k < splits[s] ? F.len[BIG] / 8 - k : splits[s];
                mh_zsizer_update(z, F.content[BIG] + k, n);
            }
            bad += mh_zsizer_final(z, &lens[s]) != 0;
            mh_zsizer_free(z);
        }
        bad += lens[0] != lens[1] || lens[1] != lens[2];
        /* the writer with that length */
        mh_buf_t out = {0};
        mh_packw_t w;
        mh_packw_opts_t po = {.level = level};
        mh_id_t id;
        mh_blob_id(F.content[BIG], F.len[BIG] / 8, &id);
        v2_no_meta(&w, &out, &po);
        mh_packw_frames(&w, 1);
        mh_packw_frame_large_begin(&w, MH_PACK_ZSTD, S(id.s), F.len[BIG] / 8, lens[0]);
        for (size_t k = 0; k < F.len[BIG] / 8; k += 3)
            mh_packw_frame_large_data(&w, F.content[BIG] + k, F.len[BIG] / 8 - k < 3 ? F.len[BIG] / 8 - k : 3);
        mh_packw_frame_end(&w);
        bad += mh_packw_finish(&w) != 0 || w.frame_length != lens[0];
        mh_buf_free(&out);
    }
    TAP_EQ_INT(bad, 0, "sizer: the same length in 1-byte, 4099-byte and whole pieces, and the writer agrees (levels 1, 7, 13, 19)");
    mh_zsizer_t *z;
    mh_zsizer_new(3, 10, &z);
    mh_zsizer_update(z, "12345", 5);
    uint64_t l;
    TAP_EQ_INT(mh_zsizer_final(z, &l), MH_EINVAL, "sizer: fewer bytes than announced is MH_EINVAL");
    mh_zsizer_free(z);
}

/* ============================================================ serving */

static int collect_cb(void *ud, const uint8_t *p, size_t n)
{
    mh_buf_t *b = ud;
    if (n > (128u << 10)) return MH_EINVAL; /* pieces are bounded */
    return mh_buf_append(b, p, n);
}

static void test_framer(void)
{
    mh_buf_t z = {0};
    zc(F.content[BIG], F.len[BIG], &z);
    /* every range shape, fed in odd pieces */
    int bad = 0;
    uint64_t ranges[][2] = {{0, 0}, {0, 1}, {0, BIG_LEN}, {BIG_LEN - 1, 1}, {BIG_LEN, 0}, {1000, 300000},
                            {2000000, 1048576}};
    for (size_t k = 0; k < sizeof ranges / sizeof *ranges; k++) {
        mh_framer_t *f;
        bad += mh_framer_new(MH_PACK_ZSTD, BIG_LEN, ranges[k][0], ranges[k][1], 0, &f) != 0;
        mh_buf_t got = {0};
        int rc = 0;
        for (size_t i = 0; !rc && i < z.len && !mh_framer_done(f); i += 5000)
            rc = mh_framer_feed(f, z.p + i, z.len - i < 5000 ? z.len - i : 5000, collect_cb, &got);
        if (!rc) rc = mh_framer_finish(f);
        bool ok = rc == 0 && got.len == ranges[k][1] &&
                  (got.len == 0 || memcmp(got.p, F.content[BIG] + ranges[k][0], got.len) == 0);
        if (!ok) printf("# range %llu:%llu: rc %d (%s), %zu bytes\n", (unsigned long long)ranges[k][0],
                        (unsigned long long)ranges[k][1], rc, mh_framer_why(f) ? mh_framer_why(f) : "", got.len);
        bad += !ok;
        /* zstd keeps one window (2 MiB at level 3) plus a block and our 128 KiB */
        if (k == 2) TAP_OK(mh_framer_mem(f) < (3u << 20), "framer: holds %zu bytes (the zstd window and buffers)", mh_framer_mem(f));
        mh_framer_free(f);
        mh_buf_free(&got);
    }
    TAP_EQ_INT(bad, 0, "framer: ranges (empty, first byte, whole, last byte, end, middle) in pieces of <= 128 KiB");
    /* an early range stops before the end of the data */
    mh_framer_t *f;
    mh_framer_new(MH_PACK_ZSTD, BIG_LEN, 0, 100, 0, &f);
    mh_buf_t got = {0};
    size_t fed = 0;
    for (; fed < z.len && !mh_framer_done(f); fed += 1000) mh_framer_feed(f, z.p + fed, 1000, collect_cb, &got);
    TAP_OK(mh_framer_done(f) && fed < z.len / 10 && mh_framer_finish(f) == 0,
           "framer: the first 100 bytes need only the start of the data (%zu of %zu bytes fed)", fed, z.len);
    mh_framer_free(f);
    /* truncated data, and a none frame */
    mh_framer_new(MH_PACK_ZSTD, BIG_LEN, 0, BIG_LEN, 0, &f);
    got.len = 0;
    mh_framer_feed(f, z.p, z.len - 10, collect_cb, &got);
    TAP_EQ_INT(mh_framer_finish(f), MH_EPARSE, "framer: truncated zstd data is MH_EPARSE");
    mh_framer_free(f);
    got.len = 0;
    TAP_OK(mh_frame_extract(MH_PACK_NONE, (const uint8_t *)"abcdefgh", 8, 8, 2, 3, &got) == 0 && got.len == 3 &&
               memcmp(got.p, "cde", 3) == 0,
           "frame_extract: a none frame's range");
    got.len = 0;
    TAP_EQ_INT(mh_frame_extract(MH_PACK_NONE, (const uint8_t *)"abcdefgh", 8, 6, 0, 6, &got), MH_EPARSE,
               "frame_extract: none data longer than size");
    TAP_EQ_INT(mh_frame_extract(MH_PACK_ZSTD, z.p, z.len, BIG_LEN, 10, BIG_LEN, &got), MH_EINVAL,
               "frame_extract: a range past size is MH_EINVAL");
    mh_buf_free(&got);
    mh_buf_free(&z);
}

/* =============================================================== URIs */

static void test_uri(void)
{
    mh_blob_loc_t l = {.offset = 123, .length = 45}, p;
    strcpy(l.mpack.s, F.id[1].s);
    char buf[MH_BLOB_URI_MAX];
    int n = mh_blob_uri_format(&l, buf, sizeof buf);
    char want[200];
    snprintf(want, sizeof want, "mpack://%s#123:45", F.id[1].s);
    TAP_EQ_STR(n > 0 ? buf : NULL, want, "uri: v1 form");
    TAP_OK(mh_blob_uri_parse(buf, (size_t)n, &p) == 0 && !p.framed && p.offset == 123 && p.length == 45 &&
               !strcmp(p.mpack.s, F.id[1].s),
           "uri: v1 parsed back");
    l.framed = true;
    l.frame_offset = 1000;
    l.frame_length = 4096;
    l.offset = 0;
    l.length = UINT64_MAX;
    n = mh_blob_uri_format(&l, buf, sizeof buf);
    snprintf(want, sizeof want, "mpack://%s#1000:4096/0:18446744073709551615", F.id[1].s);
    TAP_EQ_STR(n > 0 ? buf : NULL, want, "uri: v2 form");
    TAP_OK(mh_blob_uri_parse(buf, (size_t)n, &p) == 0 && p.framed && p.frame_offset == 1000 && p.frame_length == 4096 &&
               p.offset == 0 && p.length == UINT64_MAX,
           "uri: v2 parsed back");
    TAP_EQ_INT(mh_blob_uri_format(&l, buf, 20), MH_EINVAL, "uri: a buffer too small is MH_EINVAL");
    const char *bad[] = {"mpack://%s#", "mpack://%s#1:", "mpack://%s#01:2", "mpack://%s#1:2/", "mpack://%s#1:2/3",
                         "mpack://%s#-1:2", "mpack://%s#1:2/3:4x", "mpack://%s#18446744073709551616:0",
                         "mpack://%s#18446744073709551615:1", "mpack://%s#1:2:3", "mpack:/%s#1:2", "mpack://%s1:2",
                         "mpack://%s#1:2 "};
    int nbad = 0;
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char u[200];
        snprintf(u, sizeof u, bad[i], F.id[1].s);
        if (mh_blob_uri_parse(u, strlen(u), &p) != MH_EPARSE) {
            printf("# accepted: %s\n", u);
            nbad++;
        }
    }
    snprintf(want, sizeof want, "mpack://sha256:%064d#1:2", 0);
    want[20] = 'A';
    nbad += mh_blob_uri_parse(want, strlen(want), &p) != MH_EPARSE;
    TAP_EQ_INT(nbad, 0, "uri: malformed forms refused (empty, signs, leading zeros, overflow, extra parts, bad id)");
}

/* ======================================================= cross-check */

static char xscript[4096];

/* test/unit/mpack_xcheck.py from the repository root (make unit runs
 * there) or next to the source tree of this binary (build/test/..). */
static bool find_script(const char *argv0)
{
    const char *cands[] = {"test/unit/mpack_xcheck.py", NULL};
    for (int i = 0; cands[i]; i++)
        if (access(cands[i], R_OK) == 0) {
            snprintf(xscript, sizeof xscript, "%s", cands[i]);
            return true;
        }
    const char *slash = strrchr(argv0, '/');
    if (slash) {
        snprintf(xscript, sizeof xscript, "%.*s/../../test/unit/mpack_xcheck.py", (int)(slash - argv0), argv0);
        if (access(xscript, R_OK) == 0) return true;
    }
    return false;
}

/* Runs the script; its output in out (NUL-terminated); the exit code. */
static int run_py(const char *args, mh_buf_t *out)
{
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s %s 2>&1", xscript, args);
    out->len = 0;
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) mh_buf_append(out, buf, n);
    while (out->len && (out->p[out->len - 1] == '\n' || out->p[out->len - 1] == '\r')) out->len--;
    mh_buf_append_byte(out, 0);
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static bool write_file(const char *path, const mh_buf_t *b)
{
    FILE *f = fopen(path, "wb");
    if (!f) return false;
    bool ok = fwrite(b->p, 1, b->len, f) == b->len;
    return fclose(f) == 0 && ok;
}

static bool read_file(const char *path, mh_buf_t *b)
{
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    char buf[65536];
    size_t n;
    b->len = 0;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) mh_buf_append(b, buf, n);
    fclose(f);
    return true;
}

/* Rebuilds every snapshot from its delta (parents come first) and checks
 * its id, and recomputes every commit id: the metadata of a pack read
 * here is what its writer meant. */
static int check_ids(const mh_packr_result_t *res)
{
    int bad = 0;
    mh_manifest_t *ms = calloc(res->nsnapshots + 1, sizeof *ms);
    for (size_t i = 0; i < res->nsnapshots; i++) {
        const mh_pack_snapshot_t *sn = &res->snapshots[i];
        for (size_t j = 0; sn->parent.p && j < i; j++)
            if (res->snapshots[j].snapshot_id.n == sn->parent.n &&
                memcmp(res->snapshots[j].snapshot_id.p, sn->parent.p, sn->parent.n) == 0)
                mh_manifest_clone(&ms[i], &ms[j]);
        const char *why;
        bad += mh_manifest_apply(&ms[i], sn->upsert, sn->remove, &why) != 0;
        mh_id_t id;
        mh_manifest_id(&ms[i], &id);
        bad += memcmp(id.s, sn->snapshot_id.p, MH_ID_LEN) != 0;
    }
    for (size_t i = 0; i < res->nsnapshots; i++) mh_manifest_free(&ms[i]);
    free(ms);
    for (size_t i = 0; i < res->ncommits; i++) {
        const mh_pack_commit_t *c = &res->commits[i];
        mh_str_t ps[2] = {c->parent, c->parent2};
        int np = (ps[0].p != NULL) + (ps[1].p != NULL);
        mh_id_t id;
        mh_commit_id(ps[0].p ? ps : ps + 1, np, c->snapshot_id, c->message, c->committed_at, c->author, &id);
        bad += memcmp(id.s, c->commit_id.p, MH_ID_LEN) != 0;
    }
    return bad;
}

static void test_xcheck(const char *argv0)
{
    if (!find_script(argv0)) {
        TAP_OK(0, "cross-check: test/unit/mpack_xcheck.py found");
        return;
    }
    mh_buf_t out = {0}, pack = {0};
    int rc = run_py("", &out);
    if (rc == 77) {
        printf("ok %d - cross-check # SKIP python3-zstandard or python3-msgpack missing (make deps)\n", ++tap_n);
        mh_buf_free(&out);
        return;
    }
    char path[] = "/tmp/mh-xcheck-XXXXXX";
    int fd = mkstemp(path);
    if (fd >= 0) close(fd);
    char args[4200];
    /* ours, checked by Python */
    for (int meta = 0; meta < 2; meta++) {
        pack.len = 0;
        v2opt_t o = {.level = 3, .target = 48 << 10, .with_none = true, .large = true, .meta = meta};
        build_v2(&pack, &o);
        write_file(path, &pack);
        snprintf(args, sizeof args, "check %s", path);
        rc = run_py(args, &out);
        char want[128];
        snprintf(want, sizeof want, "blobs=%d commits=%d snapshots=%d meta=%d", NBLOBS, NCOMMITS, NCOMMITS, meta);
        TAP_OK(rc == 0 && strstr((char *)out.p, want), "cross-check: our v2 pack (%s) read by Python: %s",
               meta ? "meta frame" : "plain keys", (char *)out.p);
    }
    /* ... and a corrupted one is refused there too (the checker checks) */
    {
        mh_arena_t a;
        mh_arena_init(&a, 0);
        mh_pack_t p;
        const char *why;
        mh_pack_read(&a, pack.p, pack.len, NULL, &p, &why);
        for (size_t f = 0; f < p.nframes; f++)
            if (p.frames[f].codec == MH_PACK_NONE) pack.p[p.frames[f].data_offset + 5] ^= 0x20;
        mh_arena_release(&a);
        write_file(path, &pack);
        rc = run_py(args, &out);
        TAP_OK(rc == 1 && strstr((char *)out.p, "does not hash"), "cross-check: a corrupted blob refused by Python: %s",
               (char *)out.p);
    }
    /* Python's, read here */
    for (int meta = 0; meta < 2; meta++) {
        snprintf(args, sizeof args, "gen %s%s", path, meta ? " --meta" : "");
        rc = run_py(args, &out);
        bool ok = rc == 0 && read_file(path, &pack);
        mh_arena_t a;
        mh_arena_init(&a, 0);
        mh_packr_t *r = NULL;
        int rrc = ok ? read_split(&a, pack.p, pack.len, 0, MH_PACKR_VERIFY, NULL, &r) : -1;
        const mh_packr_result_t *res = r ? mh_packr_result(r) : NULL;
        TAP_OK(ok && rrc == 0, "cross-check: Python's v2 pack (%s) read here with VERIFY in random pieces (%s)",
               meta ? "meta frame" : "plain keys", r && rrc ? mh_packr_why(r) : "ok");
        /* the same blobs, commits and snapshots in the same order */
        int bad = 0;
        size_t nb = 0, nc = 0, ns = 0;
        for (char *line = (char *)out.p; res && line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
            char kind[16], id[80];
            unsigned long long len = 0;
            if (sscanf(line, "%15s %79s %llu", kind, id, &len) < 2) continue;
            if (!strcmp(kind, "blob")) {
                mh_id_t t = {{0}};
                if (nb < res->nblobs) mh_id_from_digest(&t, res->blobs[nb].id);
                bad += nb >= res->nblobs || strcmp(t.s, id) || res->blobs[nb].length != len;
                nb++;
            } else if (!strcmp(kind, "commit")) {
                bad += nc >= res->ncommits || memcmp(res->commits[nc].commit_id.p, id, MH_ID_LEN);
                nc++;
            } else if (!strcmp(kind, "snapshot")) {
                bad += ns >= res->nsnapshots || memcmp(res->snapshots[ns].snapshot_id.p, id, MH_ID_LEN);
                ns++;
            }
        }
        TAP_OK(res && bad == 0 && nb == res->nblobs && nc == res->ncommits && ns == res->nsnapshots && nb == 40,
               "  the same %zu blobs, %zu commits, %zu snapshots as Python wrote", nb, nc, ns);
        TAP_OK(res && check_ids(res) == 0 && res->has_meta == meta,
               "  every snapshot rebuilt to its id and every commit id recomputed here");
        TAP_OK(res && res->reorder_peak > 0, "  its data-first frame was buffered (%llu bytes)",
               res ? (unsigned long long)res->reorder_peak : 0ull);
        mh_packr_free(r);
        mh_arena_release(&a);
    }
    unlink(path);
    mh_buf_free(&out);
    mh_buf_free(&pack);
}

/* ======================================================= failalloc */

/* The v2 writer (meta frame, built and none frames) and the stream
 * reader (4 KiB feeds, VERIFY) on part of the fixture; *d receives a
 * digest of the pack and of what was read. */
static int wl_v2(uint8_t d[32])
{
    mh_buf_t out = {0};
    mh_packw_t w;
    mh_packw_opts_t po = {.level = 1, .meta_frame = true};
    mh_packw_init_v2(&w, &out, &po);
    write_commits_snapshots(&w);
    write_heads(&w);
    mh_packw_frames(&w, 3);
    for (int f = 0; f < 3; f++) {
        mh_packw_frame_begin(&w, f == 2 ? MH_PACK_NONE : MH_PACK_ZSTD);
        for (int i = 10 + 6 * f; i < 16 + 6 * f; i++) {
            mh_packw_frame_blob(&w, S(F.id[i].s), F.len[i]);
            mh_packw_frame_data(&w, F.content[i], F.len[i]);
        }
        mh_packw_frame_end(&w);
    }
    int rc = mh_packw_finish(&w);
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_packr_t *r = NULL;
    if (!rc) rc = read_split(&a, out.p, out.len, 4096, MH_PACKR_VERIFY | MH_PACKR_HASH_PACK, NULL, &r);
    if (!rc) {
        const mh_packr_result_t *R = mh_packr_result(r);
        uint8_t acc[32 + 3 * sizeof(size_t)];
        memcpy(acc, R->pack_digest, 32);
        memcpy(acc + 32, &R->nblobs, sizeof(size_t));
        memcpy(acc + 32 + sizeof(size_t), &R->ncommits, sizeof(size_t));
        memcpy(acc + 32 + 2 * sizeof(size_t), &R->nframes, sizeof(size_t));
        mh_sha256(acc, sizeof acc, d);
    }
    mh_packr_free(r);
    mh_arena_release(&a);
    mh_buf_free(&out);
    return rc;
}

/* With FAILALLOC=1 (make BUILD=build-failalloc SAN=1 FAILALLOC=1
 * build-failalloc/test/test_mpack2): the Nth allocation fails, N = 1, 2,
 * ..., one-shot then persistent; every run ends in the baseline result or
 * MH_ENOMEM (ASan catches crashes, LSan leaks at exit). */
static void test_failalloc(void)
{
    uint8_t base[32] = {0}, d[32];
    mh_failalloc_disarm();
    TAP_EQ_INT(wl_v2(base), 0, "failalloc workload (v2 writer + stream reader): baseline");
    if (!mh_failalloc_enabled()) return;
    for (int persist = 0; persist < 2; persist++) {
        int runs = 0, bad = 0, enomem = 0;
        for (uint64_t n = 1; n < 100000; n++, runs++) {
            memset(d, 0, sizeof d);
            mh_failalloc_arm(n, persist);
            int rc = wl_v2(d);
            uint64_t failed = mh_failalloc_failed();
            mh_failalloc_disarm();
            bool same = rc == 0 && memcmp(d, base, 32) == 0;
            if (!same && rc != MH_ENOMEM) {
                if (bad++ < 3) printf("# n=%llu: rc %d\n", (unsigned long long)n, rc);
            }
            enomem += rc == MH_ENOMEM;
            if (!failed) break;
        }
        TAP_OK(bad == 0, "failalloc (%s): %d runs, each the baseline or MH_ENOMEM (%d MH_ENOMEM)",
               persist ? "persistent" : "one-shot", runs, enomem);
    }
}

static uint64_t t_last;
static void lap(const char *what)
{
    uint64_t t = mh_now_us();
    TAP_COMMENT("(%s: %.0f ms)", what, (t - t_last) / 1e3);
    t_last = t;
}

int main(int argc, char **argv)
{
    (void)argc;
    t_last = mh_now_us();
    fixture_init();
    test_roundtrip_v1();
    lap("roundtrip_v1");
    test_roundtrip_v2();
    lap("roundtrip_v2");
    test_bad_v2();
    lap("bad_v2");
    test_truncation();
    lap("truncation");
    test_zip_bomb();
    lap("zip_bomb");
    test_limits();
    lap("limits");
    test_memory();
    lap("memory");
    test_parallel();
    lap("parallel");
    test_writer_misuse();
    lap("writer_misuse");
    test_sizer();
    lap("sizer");
    test_framer();
    lap("framer");
    test_uri();
    lap("uri");
    test_xcheck(argv[0]);
    lap("xcheck");
    test_failalloc();
    lap("failalloc");
    for (int i = 0; i < NBLOBS; i++) free(F.content[i]);
    for (int k = 0; k < NCOMMITS; k++) {
        mh_buf_free(&F.up[k]);
        mh_buf_free(&F.rm[k]);
    }
    return tap_done();
}
