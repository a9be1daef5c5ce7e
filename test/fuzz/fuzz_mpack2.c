/*
 * fuzz_mpack2.c — libFuzzer target for the streaming pack reader
 * (mpack.h: mh_packr_*, v0/v1/v2 with frames and the meta frame), the
 * frame decompressor and the v2 writer's verbatim frame copy.
 *
 * Input: byte 0 seeds the chunking, byte 1 picks flags; the rest is the
 * pack. The pack is read twice with MH_PACKR_VERIFY and small limits (8
 * MiB unpacked, so a legitimate-looking bomb stays fast): once in one
 * feed (borrowing the input), once in pieces of 1..64 bytes derived from
 * byte 0 (copying; when bit 2 of byte 1 is set, with MH_PACKR_PARALLEL:
 * blobs hashed on the reader's second thread). Invariants (abort on
 * violation):
 *  - both readings agree: both succeed or both fail, and on success with
 *    the same commits, snapshots, blob and frame records; a failure not
 *    about a frame has the same code and reason in both. (A corrupt zstd
 *    frame may get different reasons: zstd hands out a block's bytes as
 *    its input arrives, so with small feeds whatever consumes them, the
 *    meta parser, a blob's hash or the size bound, can object before
 *    zstd itself sees the corruption. Both are refusals.)
 *  - every refusal has a reason; the reader's memory stays bounded;
 *  - on success every frame's data lies in the input and every blob in
 *    its frame, and every blob extracted by mh_frame_extract hashes to
 *    its id (VERIFY accepted it);
 *  - mh_pack_read_flags agrees with the stream reader;
 *  - a v2 pack re-written with the writer (metadata as plain keys, every
 *    frame copied verbatim) reads back with the same blobs.
 */
#include <stdlib.h>
#include <string.h>

#include "mh/mpack.h"
#include "pack_rewrite.h"

static const uint8_t *g_pack;
static size_t g_len;

static int feed(mh_packr_t *r, const uint8_t *p, size_t n, uint8_t seed)
{
    uint32_t x = 0x9e3779b9u ^ seed;
    size_t off = 0;
    int rc = 0;
    while (!rc && off < n) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        size_t k = 1 + x % 64;
        if (k > n - off) k = n - off;
        rc = mh_packr_feed(r, p + off, k);
        off += k;
    }
    return rc ? rc : mh_packr_finish(r);
}

static bool same_str(mh_str_t a, mh_str_t b)
{
    return a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, a.n) == 0);
}

static int sha_cb(void *ud, const uint8_t *p, size_t n)
{
    return mh_buf_append(ud, p, n);
}

/* Every blob through the frame decompressor, hashed against its id. */
static void check_blobs(const mh_packr_result_t *R)
{
    for (size_t f = 0; f < R->nframes; f++) {
        const mh_pack_frame_t *fr = &R->frames[f];
        if (fr->data_offset > g_len || fr->data_length > g_len - fr->data_offset) abort();
        if (fr->first_blob > R->nblobs || fr->nblobs > R->nblobs - fr->first_blob) abort();
    }
    for (size_t i = 0; i < R->nblobs && i < 64; i++) {
        const mh_packr_blob_t *b = &R->blobs[i];
        mh_buf_t got = {0};
        if (b->frame == MH_PACK_NOFRAME) {
            if (R->version == 2 || b->offset > g_len || b->length > g_len - b->offset) abort();
            mh_buf_append(&got, g_pack + b->offset, (size_t)b->length);
        } else {
            if (b->frame >= R->nframes) abort();
            const mh_pack_frame_t *fr = &R->frames[b->frame];
            if (b->offset > fr->size || b->length > fr->size - b->offset) abort();
            mh_framer_t *x;
            if (mh_framer_new(fr->codec, fr->size, b->offset, b->length, 0, &x)) abort();
            int rc = mh_framer_feed(x, g_pack + fr->data_offset, (size_t)fr->data_length, sha_cb, &got);
            if (!rc) rc = mh_framer_finish(x);
            if (rc && rc != MH_ENOMEM) abort();
            mh_framer_free(x);
            if (rc) {
                mh_buf_free(&got);
                continue;
            }
        }
        uint8_t d[32];
        mh_sha256(got.len ? got.p : (const uint8_t *)"", got.len, d);
        if (got.len != b->length || memcmp(d, b->id, 32) != 0) abort();
        mh_buf_free(&got);
    }
}

/* Re-writes a v2 pack: plain metadata, every frame copied verbatim. */
static void rewrite_v2(const mh_packr_result_t *R, mh_arena_t *a)
{
    mh_buf_t out = {0};
    mh_packw_t w;
    mh_packw_opts_t o = {.level = 1};
    mh_packw_init_v2(&w, &out, &o);
    rewrite_commits_snapshots(&w, R->commits, R->ncommits, R->snapshots, R->nsnapshots);
    rewrite_heads(&w, R->branch_heads);
    mh_packw_frames(&w, (uint32_t)R->nframes);
    for (size_t f = 0; f < R->nframes; f++) {
        const mh_pack_frame_t *fr = &R->frames[f];
        mh_packw_blobref_t *refs = calloc(fr->nblobs + 1, sizeof *refs);
        mh_id_t *ids = calloc(fr->nblobs + 1, sizeof *ids);
        for (uint32_t k = 0; k < fr->nblobs; k++) {
            mh_id_from_digest(&ids[k], R->blobs[fr->first_blob + k].id);
            refs[k] = (mh_packw_blobref_t){{ids[k].s, MH_ID_LEN}, R->blobs[fr->first_blob + k].length};
        }
        mh_packw_frame_copy_begin(&w, fr->codec, fr->size, refs, fr->nblobs, fr->data_length);
        mh_packw_frame_copy_data(&w, g_pack + fr->data_offset, (size_t)fr->data_length);
        mh_packw_frame_end(&w);
        free(refs);
        free(ids);
    }
    /* A frame the reader took may still be one the writer refuses: a
     * single-blob frame over 4 GiB cannot be (the input is small), so
     * the writer must accept everything. */
    if (mh_packw_finish(&w) != 0) abort();
    mh_packr_t *r;
    if (mh_packr_new(a, NULL, MH_PACKR_VERIFY, out.len, &r)) abort();
    int rc = mh_packr_feed(r, out.p, out.len);
    if (!rc) rc = mh_packr_finish(r);
    const mh_packr_result_t *X = mh_packr_result(r);
    if (rc != 0 && rc != MH_ENOMEM) abort();
    if (!rc && (X->nblobs != R->nblobs || X->ncommits != R->ncommits || X->nsnapshots != R->nsnapshots)) abort();
    for (size_t i = 0; !rc && i < X->nblobs; i++)
        if (memcmp(X->blobs[i].id, R->blobs[i].id, 32) || X->blobs[i].length != R->blobs[i].length) abort();
    mh_packr_free(r);
    mh_buf_free(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2) return 0;
    uint8_t seed = data[0], fl = data[1];
    g_pack = data + 2;
    g_len = size - 2;
    mh_pack_limits_t lim = mh_pack_limits_default;
    lim.max_unpacked = 8u << 20;
    lim.max_meta_bytes = 64u << 20;
    lim.max_reorder = 1u << 20;
    lim.max_window_log = 20 + (fl & 3);
    unsigned flags = MH_PACKR_VERIFY | MH_PACKR_HASH_PACK;
    mh_arena_t a;
    mh_arena_init(&a, 256u << 20);
    mh_packr_t *r1, *r2;
    if (mh_packr_new(&a, &lim, flags | MH_PACKR_BORROW, g_len, &r1)) abort();
    /* the chunked reader hashes on its second thread half of the time */
    if (mh_packr_new(&a, &lim, flags | ((fl & 4) ? MH_PACKR_PARALLEL : 0), g_len, &r2)) abort();
    int rc1 = mh_packr_feed(r1, g_pack, g_len);
    if (!rc1) rc1 = mh_packr_finish(r1);
    int rc2 = feed(r2, g_pack, g_len, seed);
    const char *w1 = mh_packr_why(r1), *w2 = mh_packr_why(r2);
    if ((rc1 && !w1) || (rc2 && !w2)) abort();
    if (rc1 != MH_ENOMEM && rc2 != MH_ENOMEM) {
        if ((rc1 == 0) != (rc2 == 0)) abort();
        bool framed = rc1 && (strncmp(w1, "frames[", 7) == 0 || strncmp(w1, "meta", 4) == 0 ||
                              strncmp(w2, "frames[", 7) == 0 || strncmp(w2, "meta", 4) == 0);
        if (rc1 && !framed && (rc1 != rc2 || strcmp(w1, w2) != 0)) abort();
    }
    const mh_packr_result_t *A = mh_packr_result(r1), *B = mh_packr_result(r2);
    if (A->mem_peak > (64u << 20) + 2 * A->meta_bytes || B->mem_peak > (64u << 20) + 2 * B->meta_bytes) abort();
    if (!rc1 && !rc2) {
        if (A->version != B->version || A->ncommits != B->ncommits || A->nsnapshots != B->nsnapshots ||
            A->nblobs != B->nblobs || A->nframes != B->nframes || A->has_meta != B->has_meta ||
            (A->branch_heads == NULL) != (B->branch_heads == NULL) || memcmp(A->pack_digest, B->pack_digest, 32))
            abort();
        if (A->nblobs && memcmp(A->blobs, B->blobs, A->nblobs * sizeof *A->blobs)) abort();
        if (A->nframes && memcmp(A->frames, B->frames, A->nframes * sizeof *A->frames)) abort();
        for (size_t i = 0; i < A->ncommits; i++)
            if (!same_str(A->commits[i].commit_id, B->commits[i].commit_id) ||
                !same_str(A->commits[i].message, B->commits[i].message) ||
                !same_str(A->commits[i].branch, B->commits[i].branch))
                abort();
        for (size_t i = 0; i < A->nsnapshots; i++)
            if (!same_str(A->snapshots[i].snapshot_id, B->snapshots[i].snapshot_id) ||
                A->snapshots[i].upsert->v.m.n != B->snapshots[i].upsert->v.m.n)
                abort();
        check_blobs(A);
        mh_pack_t p;
        const char *why;
        int rc3 = mh_pack_read_flags(&a, g_pack, g_len, &lim, MH_PACKR_VERIFY, &p, &why);
        if (rc3 && rc3 != MH_ENOMEM) abort();
        if (!rc3 && (p.nblobs != A->nblobs || p.ncommits != A->ncommits || p.nframes != A->nframes)) abort();
        if (A->version == 2) rewrite_v2(A, &a);
    }
    mh_packr_free(r1);
    mh_packr_free(r2);
    mh_arena_release(&a);
    return 0;
}
