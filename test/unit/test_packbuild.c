/*
 * test_packbuild.c — the pack builder (mh/packbuild.h) against a real fs
 * store: v1 and v2 outputs from v1, v2 and memory sources, read back with
 * the verifying reader; frame reuse (the copied frames' bytes are the
 * source's), large blobs, codec "none" for incompressible content, path
 * order, determinism, the metadata callback, verification, the budget,
 * and freeing a build in flight.
 */
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "mh/packbuild.h"
#include "tap.h"

static uv_loop_t *loop;
static char root[64];

typedef struct {
    int done, err;
} wait_t;

static void done_cb(void *ud, int err)
{
    wait_t *w = ud;
    w->done++;
    w->err = err;
}

static void put_cb(void *ud, int err)
{
    done_cb(ud, err);
}

static int run_until(wait_t *w)
{
    while (!w->done) uv_run(loop, UV_RUN_ONCE);
    return w->err;
}

/* ------------------------------------------------------------ sources */

typedef struct {
    mh_id_t id;
    const char *path;
    uint32_t age;
    uint8_t *p;
    size_t len;
} blob_t;

static uint64_t rng = 88172645463325252ull;
static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* Text-like content (compressible) or random bytes. */
static void make_blob(blob_t *b, const char *path, uint32_t age, size_t len, bool random, int seed)
{
    b->path = path;
    b->age = age;
    b->len = len;
    b->p = malloc(len ? len : 1);
    for (size_t i = 0; i < len; i++)
        b->p[i] = random ? (uint8_t)rnd() : (uint8_t)("abcdefgh line of text\n"[(i + (size_t)seed) % 22]);
    if (len > 8) memcpy(b->p, &seed, sizeof seed);
    mh_blob_id(b->p, len, &b->id);
}

static mh_store_t *store;

static int put_pack(const mh_buf_t *pack, mh_id_t *id)
{
    mh_blob_id(pack->p, pack->len, id);
    char key[MH_MPACK_KEY_SIZE];
    mh_mpack_key(key, id->s);
    wait_t w = {0};
    mh_store_put(store, key, pack->p, pack->len, put_cb, &w);
    return run_until(&w);
}

/* v1 source: blobs in order; offsets recorded. */
static int v1_source(blob_t *bs, size_t n, uint64_t *offs, mh_id_t *id)
{
    mh_buf_t out = {0};
    mh_packw_t w;
    mh_packw_init(&w, &out);
    mh_packw_commits(&w, 0);
    mh_packw_snapshots(&w, 0);
    mh_packw_blobs(&w, (uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        mh_packw_blob(&w, (mh_str_t){bs[i].id.s, MH_ID_LEN}, bs[i].p, bs[i].len);
        offs[i] = w.pos - bs[i].len;
    }
    mh_packw_branch_heads(&w, 0);
    int rc = mh_packw_finish(&w);
    if (!rc) rc = put_pack(&out, id);
    mh_buf_free(&out);
    return rc;
}

/* v2 source: frames of the given sizes (blob counts), read back for
 * their rows. */
typedef struct {
    mh_id_t id;
    mh_buf_t bytes;
    mh_arena_t a;
    mh_pack_t p;
} v2src_t;

static int v2_source(blob_t *bs, const uint32_t *per_frame, size_t nframes, v2src_t *out)
{
    mh_packw_t w;
    mh_packw_opts_t o = {3, false};
    memset(out, 0, sizeof *out);
    mh_packw_init_v2(&w, &out->bytes, &o);
    mh_packw_commits(&w, 0);
    mh_packw_snapshots(&w, 0);
    mh_packw_branch_heads(&w, 0);
    mh_packw_frames(&w, (uint32_t)nframes);
    size_t k = 0;
    for (size_t f = 0; f < nframes; f++) {
        mh_packw_frame_begin(&w, MH_PACK_ZSTD);
        for (uint32_t i = 0; i < per_frame[f]; i++, k++) {
            mh_packw_frame_blob(&w, (mh_str_t){bs[k].id.s, MH_ID_LEN}, bs[k].len);
            mh_packw_frame_data(&w, bs[k].p, bs[k].len);
        }
        mh_packw_frame_end(&w);
    }
    int rc = mh_packw_finish(&w);
    if (rc) return rc;
    mh_arena_init(&out->a, 0);
    const char *why = NULL;
    rc = mh_pack_read(&out->a, out->bytes.p, out->bytes.len, NULL, &out->p, &why);
    if (!rc) rc = put_pack(&out->bytes, &out->id);
    return rc;
}

static void v2src_free(v2src_t *s)
{
    mh_buf_free(&s->bytes);
    mh_arena_release(&s->a);
}

/* Adds blob i of a v2 source (its index in the source's blob list). */
static int add_v2(mh_pb_t *b, const v2src_t *s, size_t i, const blob_t *bl, size_t *index)
{
    const mh_pack_blob_t *x = &s->p.blobs[i];
    const mh_pack_frame_t *f = &s->p.frames[x->frame];
    mh_pb_frame_t fr = {x->frame, f->data_offset, f->data_length, f->size, f->nblobs, f->codec};
    int rc = mh_pb_add(b, bl->id.s, bl->len, bl->path, bl->path ? (uint32_t)strlen(bl->path) : 0, bl->age, index);
    if (!rc) rc = mh_pb_src_pack(b, *index, s->id.s, &fr, x->offset);
    return rc;
}

/* ------------------------------------------------------------- fixture */

/* v1 source: A(a, age 0) B(a, age 1) C(b) E(empty) L1(large, random);
 * v2 source: frame 0 [D(c) G(c, age 1)], frame 1 [H(d) I(e)], frame 2
 * [L2 (large, compressible)], frame 3 [N (random, 100 KiB)]. */
enum { A, B, C, E, L1, D, G, H, I, L2, N, NB };
static blob_t bl[NB];
static uint64_t v1offs[5];
static mh_id_t v1id;
static v2src_t v2;

static int fixture(void)
{
    make_blob(&bl[A], "a", 0, 3000, false, 1);
    make_blob(&bl[B], "a", 1, 3100, false, 2);
    make_blob(&bl[C], "b", 0, 1000, false, 3);
    make_blob(&bl[E], "e/empty", 0, 0, false, 4);
    make_blob(&bl[L1], "large1", 0, (size_t)(5u << 20), true, 5);
    make_blob(&bl[D], "c", 0, 20000, false, 6);
    make_blob(&bl[G], "c", 1, 20001, false, 7);
    make_blob(&bl[H], "d", 0, 5000, false, 8);
    make_blob(&bl[I], "f", 0, 7000, false, 9);
    make_blob(&bl[L2], "large2", 0, (size_t)(6u << 20), false, 10);
    make_blob(&bl[N], "n.bin", 0, 100000, true, 11);
    int rc = v1_source(bl, 5, v1offs, &v1id);
    static const uint32_t per_frame[] = {2, 2, 1, 1};
    if (!rc) rc = v2_source(bl + D, per_frame, 4, &v2);
    return rc;
}

/* The builder with every blob but I (frame 1 of the v2 source is then
 * partly wanted and recompressed; frames 0, 2 and 3 are whole). */
static mh_pb_t *builder(const mh_pb_opts_t *o, bool with_i)
{
    mh_pb_t *b = NULL;
    if (mh_pb_new(o, &b)) return NULL;
    for (int k = A; k <= L1; k++) {
        size_t ix;
        mh_pb_add(b, bl[k].id.s, bl[k].len, bl[k].path, (uint32_t)strlen(bl[k].path), bl[k].age, &ix);
        mh_pb_src_pack(b, ix, v1id.s, NULL, v1offs[k]);
    }
    for (int k = D; k < NB; k++) {
        if (k == I && !with_i) continue;
        size_t ix;
        add_v2(b, &v2, (size_t)(k - D), &bl[k], &ix);
    }
    return b;
}

static int build(mh_pb_t *b, mh_buf_t *mem, mh_budget_t *budget)
{
    mh_pb_env_t env = {loop, store, budget, mem, false};
    wait_t w = {0};
    mh_pb_run(b, &env, done_cb, &w);
    return run_until(&w);
}

/* Reads the stored pack of build b and checks every blob (VERIFY). */
static int read_back(const mh_id_t *id, mh_buf_t *bytes, mh_arena_t *a, mh_pack_t *p)
{
    char key[MH_MPACK_KEY_SIZE];
    mh_mpack_key(key, id->s);
    char path[256];
    snprintf(path, sizeof path, "%s/store/%s", root, key);
    FILE *f = fopen(path, "rb");
    if (!f) return MH_ENOENT;
    memset(bytes, 0, sizeof *bytes);
    uint8_t tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) mh_buf_append(bytes, tmp, n);
    fclose(f);
    mh_id_t got;
    mh_blob_id(bytes->p, bytes->len, &got);
    if (strcmp(got.s, id->s) != 0) return MH_EHASH;
    const char *why = NULL;
    mh_arena_init(a, 0);
    int rc = mh_pack_read_flags(a, bytes->p, bytes->len, NULL, MH_PACKR_VERIFY, p, &why);
    if (rc) printf("# read back: %s\n", why ? why : "?");
    return rc;
}

static int find_blob(const mh_pack_t *p, const char *id)
{
    for (size_t i = 0; i < p->nblobs; i++)
        if (memcmp(p->blobs[i].object_id.p, id, MH_ID_LEN) == 0) return (int)i;
    return -1;
}

/* --------------------------------------------------------------- tests */

static void test_v2_reuse(void)
{
    mh_pb_opts_t o = {.version = 2, .level = 3, .reuse_frames = true};
    mh_pb_t *b = builder(&o, false);
    mh_buf_t mem = {0};
    TAP_EQ_INT(build(b, NULL, NULL), 0, "v2: built into the store");
    mh_pb_stats_t st;
    mh_pb_stats(b, &st);
    TAP_EQ_INT(st.frames_reused, 3, "v2: frames 0, 2 and 3 of the v2 source copied verbatim");
    TAP_EQ_INT(st.frames_large, 1, "v2: the large v1 blob got a frame of its own");
    TAP_EQ_INT(st.frames_none, 1, "v2: random content zstd cannot shrink is stored with codec none");
    mh_buf_t bytes;
    mh_arena_t a;
    mh_pack_t p;
    TAP_EQ_INT(read_back(mh_pb_id(b), &bytes, &a, &p), 0, "v2: the stored pack hashes to its id and verifies");
    TAP_EQ_INT(p.version, 2, "v2: version 2");
    TAP_EQ_INT(p.nblobs, NB - 1, "v2: every blob once");
    /* The copied frames' data are the source's bytes. */
    int same = 0;
    size_t nof;
    const mh_pb_outframe_t *of = mh_pb_frames(b, &nof);
    TAP_EQ_INT(nof, p.nframes, "v2: frames reported = frames read");
    for (size_t f = 0; f < nof; f++) {
        bool ok = of[f].data_offset == p.frames[f].data_offset && of[f].data_length == p.frames[f].data_length &&
                  of[f].size == p.frames[f].size && of[f].codec == p.frames[f].codec;
        if (!ok) printf("# frame %zu differs from what was reported\n", f);
        if (of[f].kind != MH_PB_REUSED) continue;
        for (size_t s = 0; s < v2.p.nframes; s++)
            if (v2.p.frames[s].data_length == of[f].data_length &&
                memcmp(v2.bytes.p + v2.p.frames[s].data_offset, bytes.p + of[f].data_offset, of[f].data_length) == 0)
                same++;
    }
    TAP_EQ_INT(same, 3, "v2: reused frames are byte-identical to the source frames");
    /* Placements agree with the reader's records. */
    int placed = 0;
    for (size_t i = 0; i < mh_pb_count(b); i++) {
        mh_pb_place_t pl;
        mh_pb_place(b, i, &pl);
        int k = find_blob(&p, pl.id);
        placed += k >= 0 && p.blobs[k].frame == pl.frame && p.blobs[k].offset == pl.offset &&
                  p.blobs[k].length == pl.length;
    }
    TAP_EQ_INT(placed, NB - 1, "v2: every placement is where the reader finds the blob");
    /* Path order inside the built frame: a(age 0), a(age 1), b, d. */
    int ka = find_blob(&p, bl[A].id.s), kb = find_blob(&p, bl[B].id.s), kc = find_blob(&p, bl[C].id.s),
        kh = find_blob(&p, bl[H].id.s);
    TAP_OK(ka >= 0 && kb >= 0 && kc >= 0 && kh >= 0 && p.blobs[ka].frame == p.blobs[kh].frame &&
               p.blobs[ka].offset < p.blobs[kb].offset && p.blobs[kb].offset < p.blobs[kc].offset &&
               p.blobs[kc].offset < p.blobs[kh].offset,
           "v2: a built frame holds its blobs in path order, oldest first, across sources");
    /* The same build into memory: the same bytes. */
    mh_pb_t *b2 = builder(&o, false);
    TAP_EQ_INT(build(b2, &mem, NULL), 0, "v2: built into memory");
    TAP_OK(mem.len == bytes.len && memcmp(mem.p, bytes.p, mem.len) == 0 && !strcmp(mh_pb_id(b2)->s, mh_pb_id(b)->s),
           "v2: deterministic: the same inputs give the same bytes");
    mh_pb_free(b2);
    mh_buf_free(&mem);
    mh_buf_free(&bytes);
    mh_arena_release(&a);
    mh_pb_free(b);
}

static void test_v2_recompress(void)
{
    /* With I wanted too, frame 1 is copied; without reuse nothing is. */
    mh_pb_opts_t o = {.version = 2, .level = 3, .reuse_frames = false};
    mh_pb_t *b = builder(&o, true);
    TAP_EQ_INT(build(b, NULL, NULL), 0, "v2 without reuse: built");
    mh_pb_stats_t st;
    mh_pb_stats(b, &st);
    TAP_EQ_INT(st.frames_reused, 0, "v2 without reuse: no frame copied");
    TAP_EQ_INT(st.frames_large, 2, "v2 without reuse: both large blobs in frames of their own, recompressed");
    mh_buf_t bytes;
    mh_arena_t a;
    mh_pack_t p;
    TAP_EQ_INT(read_back(mh_pb_id(b), &bytes, &a, &p), 0, "v2 without reuse: verifies");
    TAP_EQ_INT(p.nblobs, NB, "v2 without reuse: every blob");
    mh_buf_free(&bytes);
    mh_arena_release(&a);
    mh_pb_free(b);
}

static void test_v1(void)
{
    mh_pb_opts_t o = {.version = 1};
    mh_pb_t *b = builder(&o, false);
    TAP_EQ_INT(build(b, NULL, NULL), 0, "v1: built");
    mh_buf_t bytes;
    mh_arena_t a;
    mh_pack_t p;
    TAP_EQ_INT(read_back(mh_pb_id(b), &bytes, &a, &p), 0, "v1: verifies");
    TAP_EQ_INT(p.version, 1, "v1: version 1");
    TAP_EQ_INT(p.nblobs, NB - 1, "v1: every blob");
    int placed = 0;
    for (size_t i = 0; i < mh_pb_count(b); i++) {
        mh_pb_place_t pl;
        mh_pb_place(b, i, &pl);
        int k = find_blob(&p, pl.id);
        placed += k >= 0 && pl.frame == MH_PACK_NOFRAME && p.blobs[k].offset == pl.offset;
    }
    TAP_EQ_INT(placed, NB - 1, "v1: placements are the content offsets in the file");
    mh_buf_free(&bytes);
    mh_arena_release(&a);
    mh_pb_free(b);
}

/* Metadata: one commit and one branch head. */
static int meta_cb(void *ud, mh_packw_t *w, int part, size_t room, bool *done)
{
    (void)ud;
    (void)room;
    static const char cid[] = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    static const char sid[] = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    *done = true;
    if (part == MH_PB_META_HEAD) {
        mh_packw_commits(w, 1);
        mh_packw_commit(w, MH_STR(cid), (mh_str_t){NULL, 0}, (mh_str_t){NULL, 0}, MH_STR(sid), MH_STR("m"),
                        MH_STR("me"), MH_STR("2026-01-01T00:00:00Z"), MH_STR("main"), NULL, 0);
        mh_packw_snapshots(w, 0);
    }
    if ((part == MH_PB_META_HEAD) == (w->version == 2)) {
        mh_packw_branch_heads(w, 1);
        mh_packw_branch_head(w, MH_STR("main"), MH_STR(cid));
    }
    return 0;
}

static void test_meta(void)
{
    for (int v = 1; v <= 2; v++) {
        mh_pb_opts_t o = {.version = v, .meta_frame = v == 2, .meta = meta_cb};
        mh_pb_t *b = NULL;
        mh_pb_new(&o, &b);
        size_t ix;
        mh_pb_add(b, bl[C].id.s, bl[C].len, "b", 1, 0, &ix);
        mh_pb_src_mem(b, ix, bl[C].p);
        mh_buf_t mem = {0};
        TAP_OK(build(b, &mem, NULL) == 0, "v%d meta: built", v);
        mh_arena_t a;
        mh_arena_init(&a, 0);
        mh_pack_t p;
        const char *why = NULL;
        int rc = mh_pack_read_flags(&a, mem.p, mem.len, NULL, MH_PACKR_VERIFY, &p, &why);
        TAP_OK(rc == 0 && p.ncommits == 1 && p.branch_heads && p.nblobs == 1, "v%d meta: commit, head and blob read back",
               v);
        mh_arena_release(&a);
        mh_buf_free(&mem);
        mh_pb_free(b);
    }
}

static void test_verify(void)
{
    /* C's bytes claimed at A's offset: a wrong index row. */
    mh_pb_opts_t o = {.version = 2, .verify = true};
    mh_pb_t *b = NULL;
    mh_pb_new(&o, &b);
    size_t ix;
    mh_pb_add(b, bl[C].id.s, bl[C].len, "b", 1, 0, &ix);
    mh_pb_src_pack(b, ix, v1id.s, NULL, v1offs[A]);
    TAP_EQ_INT(build(b, NULL, NULL), MH_EHASH, "verify: bytes that do not hash to the id are refused");
    TAP_OK(mh_pb_why(b) && strstr(mh_pb_why(b), bl[C].id.s), "verify: the reason names the object");
    mh_pb_free(b);
    /* The same for a large blob (streamed) and in v1. */
    o.version = 1;
    mh_pb_new(&o, &b);
    mh_pb_add(b, bl[L1].id.s, bl[L1].len, "x", 1, 0, &ix);
    mh_pb_src_pack(b, ix, v1id.s, NULL, v1offs[L1] - 1);
    TAP_EQ_INT(build(b, NULL, NULL), MH_EHASH, "verify: a streamed v1 blob is checked too");
    mh_pb_free(b);
    /* A source frame too short for its rows: a corrupt pack. */
    mh_pb_opts_t o2 = {.version = 2};
    mh_pb_new(&o2, &b);
    const mh_pack_frame_t *f = &v2.p.frames[0];
    mh_pb_frame_t fr = {0, f->data_offset, f->data_length, f->size, 2, MH_PACK_ZSTD};
    mh_pb_add(b, bl[D].id.s, bl[D].len, "c", 1, 0, &ix);
    mh_pb_src_pack(b, ix, v2.id.s, &fr, f->size - 10);
    TAP_EQ_INT(build(b, NULL, NULL), MH_EPARSE, "corrupt: index rows beyond the frame end the build");
    mh_pb_free(b);
}

static int count_tmp(void)
{
    char p[128];
    snprintf(p, sizeof p, "%s/store/tmp", root);
    int n = 0;
    FILE *f;
    char cmd[200];
    snprintf(cmd, sizeof cmd, "ls -A %s | wc -l", p);
    if ((f = popen(cmd, "r"))) {
        if (fscanf(f, "%d", &n) != 1) n = -1;
        pclose(f);
    }
    return n;
}

static void test_budget_and_free(void)
{
    mh_budget_t *bud = NULL;
    mh_budget_new(loop, 8u << 20, 0, &bud);
    mh_budget_res_t hold;
    mh_budget_res_init(&hold);
    TAP_EQ_INT(mh_budget_try_acquire(&hold, bud, 1u << 20), 0, "budget: someone holds 1 MiB");
    mh_pb_opts_t o = {.version = 2, .reuse_frames = true};
    mh_pb_t *b = builder(&o, false);
    TAP_EQ_INT(build(b, NULL, bud), MH_EBUDGET, "budget: a build that does not fit fails at once (no wait)");
    TAP_OK(mh_pb_mem(b) > (8u << 20), "budget: the reservation was %zu bytes", mh_pb_mem(b));
    mh_pb_free(b);
    mh_budget_release(&hold);
    b = builder(&o, false);
    TAP_EQ_INT(build(b, NULL, bud), 0, "budget: alone, a build larger than the budget runs");
    mh_budget_stats_t st;
    mh_budget_stats(bud, &st);
    TAP_EQ_INT(st.in_use, 0, "budget: everything given back at the end");
    mh_pb_free(b);
    /* Freed in flight: after a few loop turns. */
    for (int turns = 1; turns < 40; turns += 6) {
        b = builder(&o, false);
        mh_pb_env_t env = {loop, store, bud, NULL, false};
        wait_t w = {0};
        mh_pb_run(b, &env, done_cb, &w);
        for (int t = 0; t < turns && !w.done; t++) uv_run(loop, UV_RUN_ONCE);
        mh_pb_free(b);
        for (int t = 0; t < 200; t++) uv_run(loop, UV_RUN_NOWAIT);
        if (w.done > 1) break;
    }
    uv_run(loop, UV_RUN_DEFAULT);
    mh_budget_stats(bud, &st);
    TAP_EQ_INT(st.in_use, 0, "free in flight: the reservation is given back");
    TAP_EQ_INT(count_tmp(), 0, "free in flight: nothing left under tmp/");
    /* keep_open, then freed without storing: nothing kept. */
    b = builder(&o, false);
    mh_pb_env_t env = {loop, store, bud, NULL, true};
    wait_t w = {0};
    mh_pb_run(b, &env, done_cb, &w);
    TAP_EQ_INT(run_until(&w), 0, "keep_open: built");
    mh_budget_stats(bud, &st);
    TAP_OK(st.in_use > 0, "keep_open: the writer's memory stays reserved until stored");
    wait_t s = {0};
    mh_pb_store(b, done_cb, &s);
    TAP_EQ_INT(run_until(&s), 0, "keep_open: stored");
    mh_buf_t bytes;
    mh_arena_t a;
    mh_pack_t p;
    TAP_EQ_INT(read_back(mh_pb_id(b), &bytes, &a, &p), 0, "keep_open: the pack is in place");
    mh_buf_free(&bytes);
    mh_arena_release(&a);
    mh_pb_free(b);
    uv_run(loop, UV_RUN_DEFAULT);
    mh_budget_stats(bud, &st);
    TAP_EQ_INT(st.in_use, 0, "keep_open: released after storing");
    mh_budget_close(bud);
}

static void test_mem_sources(void)
{
    /* A server-side commit: blobs in memory, one large. */
    mh_pb_opts_t o = {.version = 2, .level = 3, .verify = true};
    mh_pb_t *b = NULL;
    mh_pb_new(&o, &b);
    int ks[] = {A, B, C, E, L2, N};
    for (size_t i = 0; i < sizeof ks / sizeof *ks; i++) {
        size_t ix;
        const blob_t *x = &bl[ks[i]];
        mh_pb_add(b, x->id.s, x->len, x->path, (uint32_t)strlen(x->path), x->age, &ix);
        mh_pb_src_mem(b, ix, x->p);
    }
    mh_buf_t mem = {0};
    TAP_EQ_INT(build(b, &mem, NULL), 0, "memory sources: built");
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_pack_t p;
    const char *why = NULL;
    TAP_OK(mh_pack_read_flags(&a, mem.p, mem.len, NULL, MH_PACKR_VERIFY, &p, &why) == 0 && p.nblobs == 6,
           "memory sources: verifies, every blob");
    mh_pb_stats_t st;
    mh_pb_stats(b, &st);
    TAP_EQ_INT(st.frames_large, 1, "memory sources: the large blob in a frame of its own");
    mh_arena_release(&a);
    mh_buf_free(&mem);
    mh_pb_free(b);
}

int main(void)
{
    mh_log_set_level("error");
    loop = uv_default_loop();
    snprintf(root, sizeof root, "/tmp/mh-test-pb-XXXXXX");
    if (!mkdtemp(root)) return 1;
    char spec[128];
    snprintf(spec, sizeof spec, "fs:%s/store", root);
    mh_store_config_t cfg = {.spec = spec, .public_url = "http://127.0.0.1:1/"};
    TAP_EQ_INT(mh_store_open(loop, &cfg, &store), 0, "fs store");
    TAP_EQ_INT(fixture(), 0, "source packs stored");
    test_v2_reuse();
    test_v2_recompress();
    test_v1();
    test_meta();
    test_verify();
    test_mem_sources();
    test_budget_and_free();
    mh_store_close(store);
    uv_run(loop, UV_RUN_DEFAULT);
    v2src_free(&v2);
    for (int k = 0; k < NB; k++) free(bl[k].p);
    tap_rm_tree(root);
    return tap_done();
}
