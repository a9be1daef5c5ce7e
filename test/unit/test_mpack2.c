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
 *    packs are read here, and ours are checked there.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

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
        rc = read_split(&a, buf, len, chunks[c], MH_PACKR_VERIFY | MH_PACKR_HASH_PACK, NULL, &r);
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
    TAP_EQ_INT(bad, 0, "  the same result fed 1, 2, 7, 64, 4096, 65536 bytes at a time and in random splits");
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

int main(void)
{
    fixture_init();
    test_roundtrip_v1();
    test_roundtrip_v2();
    for (int i = 0; i < NBLOBS; i++) free(F.content[i]);
    for (int k = 0; k < NCOMMITS; k++) {
        mh_buf_free(&F.up[k]);
        mh_buf_free(&F.rm[k]);
    }
    return tap_done();
}
