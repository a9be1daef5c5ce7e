/*
 * test_mpack.c — unit tests of the storage model (mpack.h, SPEC 1-2):
 * test vectors cross-checked against Python hashlib (vectors.h, made by
 * gen_vectors.py), path validation, manifests (random operations checked
 * against a model and against the uncached id), deltas, encode/decode,
 * diff, the pack writer and reader (round trip, v0, every rejection,
 * truncation at every byte), blob verification (v2 packs, streaming and
 * chunking: test_mpack2.c), and a benchmark of a
 * seed-000-shaped push (parse + verify + rebuild every manifest), printed
 * as TAP comments.
 */
#include <stdlib.h>
#include <string.h>

#include "mh/mpack.h"
#include "tap.h"
#include "vectors.h"

static mh_arena_t A;

static mh_str_t S(const char *s)
{
    return (mh_str_t){s, s ? strlen(s) : 0};
}

static const mh_str_t NIL = {NULL, 0};

static bool str_is(mh_str_t s, const char *lit)
{
    return s.p && s.n == strlen(lit) && memcmp(s.p, lit, s.n) == 0;
}

/* ---------------------------------------------------------------- vectors */

static void test_vectors(void)
{
    mh_id_t id;
    mh_blob_id("hello fetch world", 17, &id);
    /* literal pasted from: /usr/bin/python3 -c 'import hashlib; ...' */
    TAP_EQ_STR(id.s, "sha256:9f1d7560e180bb42bcd687b83882ba4c4393dbff633f53cc8c1df30eda4a5491",
               "blob_id(b\"hello fetch world\")");
    TAP_EQ_STR(id.s, VEC_HELLO_BLOB_ID, "blob_id matches the generated vector");

    mh_manifest_t m = {0};
    mh_manifest_id(&m, &id);
    TAP_EQ_STR(id.s, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "snapshot_id({})");
    mh_manifest_id_nocache(&m, &id);
    TAP_EQ_STR(id.s, VEC_EMPTY_SNAPSHOT_ID, "snapshot_id({}) uncached");

    for (size_t i = 0; i < sizeof vec_manifests / sizeof vec_manifests[0]; i++) {
        const vec_manifest_t *v = &vec_manifests[i];
        mh_manifest_t mm = {0};
        for (int j = 0; j < v->n; j++) mh_manifest_upsert(&mm, v->e[j].path, strlen(v->e[j].path), v->e[j].id);
        mh_id_t a, b;
        mh_manifest_id(&mm, &a);
        mh_manifest_id_nocache(&mm, &b);
        TAP_EQ_STR(a.s, v->snapshot_id, v->name);
        TAP_EQ_STR(b.s, v->snapshot_id, "  (uncached)");
        mh_manifest_free(&mm);
    }
    for (size_t i = 0; i < sizeof vec_commits / sizeof vec_commits[0]; i++) {
        const vec_commit_t *v = &vec_commits[i];
        mh_str_t parents[2];
        for (int j = 0; j < v->nparents; j++) parents[j] = S(v->parents[j]);
        mh_commit_id(parents, v->nparents, S(v->snapshot_id), S(v->message), S(v->committed_at), S(v->author), &id);
        TAP_EQ_STR(id.s, v->commit_id, v->name);
    }
}

/* ------------------------------------------------------------------ paths */

static void test_paths(void)
{
    static const char *good[] = {"a", "a/b", "a.b", "..a", "a..", ".hidden", "a/.b/c", "...", "\xc3\xa9/\xc3\xbc",
                                 "dir/sub dir/f (1).txt", "a\\b"};
    static const char *bad[] = {"", "/a", "a/", "a//b", ".", "..", "./a", "a/.", "a/./b", "a/../b", "../x",
                                "x/..", "/", "a\xff", "\xc0\xaf", "a/\xed\xa0\x80"};
    int ok = 1;
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        bool v = mh_path_valid(good[i], strlen(good[i]));
        if (!v) printf("# should be valid: '%s'\n", good[i]);
        ok &= v;
    }
    TAP_OK(ok, "valid paths accepted");
    ok = 1;
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        bool v = mh_path_valid(bad[i], strlen(bad[i]));
        if (v) printf("# should be invalid: '%s'\n", bad[i]);
        ok &= !v;
    }
    TAP_OK(ok, "invalid paths refused");
    TAP_OK(!mh_path_valid("a\0b", 3), "NUL in a path refused");
    char *longp = malloc(4097);
    memset(longp, 'p', 4097);
    TAP_OK(mh_path_valid(longp, 4096), "4096-byte path accepted");
    TAP_OK(!mh_path_valid(longp, 4097), "4097-byte path refused");
    free(longp);
    TAP_OK(!mh_id_valid("sha256:9F1D7560E180BB42BCD687B83882BA4C4393DBFF633F53CC8C1DF30EDA4A5491", MH_ID_LEN),
           "id with uppercase hex refused");
}

/* -------------------------------------------------------------- manifests */

#define POOL_PATHS 300
#define POOL_IDS 40
static char pool_path[POOL_PATHS][32];
static mh_id_t pool_id[POOL_IDS];

static void pools_init(void)
{
    for (int i = 0; i < POOL_PATHS; i++) snprintf(pool_path[i], sizeof pool_path[i], "d%d/f%03d.txt", i % 7, i);
    for (int i = 0; i < POOL_IDS; i++) {
        char c[16];
        snprintf(c, sizeof c, "c%d", i);
        mh_blob_id(c, strlen(c), &pool_id[i]);
    }
}

/* The reference model: pool path i -> pool id model[i] (-1: absent). */
static void model_manifest(const int *model, mh_manifest_t *out)
{
    out->n = 0;
    mh_manifest_touch(out, 0);
    for (int i = 0; i < POOL_PATHS; i++)
        if (model[i] >= 0) mh_manifest_upsert(out, pool_path[i], strlen(pool_path[i]), pool_id[model[i]].s);
}

static bool same_entries(const mh_manifest_t *a, const mh_manifest_t *b)
{
    if (a->n != b->n) return false;
    for (size_t i = 0; i < a->n; i++)
        if (a->e[i].plen != b->e[i].plen || memcmp(a->e[i].path, b->e[i].path, a->e[i].plen) ||
            memcmp(a->e[i].id, b->e[i].id, MH_ID_LEN))
            return false;
    return true;
}

static bool sorted_unique(const mh_manifest_t *m)
{
    for (size_t i = 1; i < m->n; i++) {
        size_t n = m->e[i - 1].plen < m->e[i].plen ? m->e[i - 1].plen : m->e[i].plen;
        int c = memcmp(m->e[i - 1].path, m->e[i].path, n);
        if (c > 0 || (c == 0 && m->e[i - 1].plen >= m->e[i].plen)) return false;
    }
    return true;
}

/* A random delta against the model as values: removes of present paths,
 * upserts of random paths (k of each up to kmax). Updates the model. */
static void random_delta(int *model, int kmax, mh_val_t *up, mh_val_t *rm)
{
    *up = (mh_val_t){.t = MH_V_MAP};
    *rm = (mh_val_t){.t = MH_V_ARR};
    int nr = rand() % (kmax + 1), nu = rand() % (kmax + 1);
    static char used[POOL_PATHS];
    memset(used, 0, sizeof used);
    for (int j = 0; j < nr; j++) {
        int p = rand() % POOL_PATHS;
        if (model[p] < 0 || used[p]) continue;
        used[p] = 1;
        model[p] = -1;
        mh_arr_push(&A, rm, mh_v_str(pool_path[p]));
    }
    for (int j = 0; j < nu; j++) {
        int p = rand() % POOL_PATHS;
        if (used[p] == 2) continue; /* one upsert per path */
        used[p] = 2;
        model[p] = rand() % POOL_IDS;
        mh_map_put(&A, up, pool_path[p], mh_v_strn(pool_id[model[p]].s, MH_ID_LEN));
    }
}

static void test_manifest_random(void)
{
    srand(12345);
    int model[POOL_PATHS];
    for (int i = 0; i < POOL_PATHS; i++) model[i] = -1;
    mh_manifest_t m = {0}, ref = {0}, other = {0};
    int bad_id = 0, bad_entries = 0, bad_rc = 0, checks = 0;
    for (int step = 0; step < 3000; step++) {
        int op = rand() % 10;
        if (op < 3) { /* single upsert */
            int p = rand() % POOL_PATHS, v = rand() % POOL_IDS;
            model[p] = v;
            bad_rc += mh_manifest_upsert(&m, pool_path[p], strlen(pool_path[p]), pool_id[v].s) != 0;
        } else if (op < 5) { /* single remove, present or not */
            int p = rand() % POOL_PATHS;
            int want = model[p] >= 0 ? 0 : MH_ENOENT;
            model[p] = -1;
            bad_rc += mh_manifest_remove(&m, pool_path[p], strlen(pool_path[p])) != want;
        } else if (op < 8) { /* a delta, small or large (merge path) */
            mh_val_t up, rm;
            random_delta(model, op == 7 ? 60 : 6, &up, &rm);
            const char *why;
            bad_rc += mh_manifest_apply(&m, &up, &rm, &why) != 0;
        } else if (op == 8) { /* continue on a clone (inherits the cache) */
            bad_rc += mh_manifest_clone(&other, &m) != 0;
            mh_manifest_t t = m;
            m = other;
            other = t;
        } else { /* lookups */
            int p = rand() % POOL_PATHS;
            const mh_mentry_t *e = mh_manifest_find(&m, pool_path[p], strlen(pool_path[p]));
            bad_entries += (model[p] < 0) != (e == NULL);
            if (e) bad_entries += memcmp(e->id, pool_id[model[p]].s, MH_ID_LEN) != 0;
        }
        if (rand() % 3 == 0 || step == 2999) {
            mh_id_t a, b, c;
            mh_manifest_id(&m, &a);
            mh_manifest_id(&m, &c); /* cached answer */
            model_manifest(model, &ref);
            mh_manifest_id_nocache(&ref, &b);
            bad_id += strcmp(a.s, b.s) != 0 || strcmp(a.s, c.s) != 0;
            bad_entries += !same_entries(&m, &ref) || !sorted_unique(&m);
            checks++;
        }
    }
    TAP_OK(bad_rc == 0, "random manifest ops: return codes as expected (%d bad)", bad_rc);
    TAP_OK(bad_entries == 0, "random manifest ops: entries match the model, sorted and unique (%d bad)", bad_entries);
    TAP_OK(bad_id == 0, "random manifest ops: cached id == uncached id of the model, %d checks (%d bad)", checks,
           bad_id);
    mh_manifest_free(&m);
    mh_manifest_free(&ref);
    mh_manifest_free(&other);
}

static void test_apply_errors(void)
{
    mh_manifest_t m = {0};
    const char *ida = pool_id[0].s, *idb = pool_id[1].s;
    mh_manifest_upsert(&m, "a", 1, ida);
    mh_manifest_upsert(&m, "b", 1, ida);
    mh_id_t before, after;
    mh_manifest_id(&m, &before);
    const char *why = NULL;

    mh_val_t up = {.t = MH_V_MAP}, rm = {.t = MH_V_ARR};
    mh_arr_push(&A, &rm, mh_v_str("a"));
    mh_arr_push(&A, &rm, mh_v_str("zz"));
    TAP_EQ_INT(mh_manifest_apply(&m, NULL, &rm, &why), MH_ENOENT, "remove of an absent path: MH_ENOENT");
    mh_manifest_id(&m, &after);
    TAP_OK(m.n == 2 && strcmp(before.s, after.s) == 0, "  ... and the manifest is unchanged");
    rm = (mh_val_t){.t = MH_V_ARR};
    for (int i = 0; i < 20; i++) mh_arr_push(&A, &rm, mh_v_str("b"));
    TAP_EQ_INT(mh_manifest_apply(&m, NULL, &rm, &why), MH_ENOENT, "same path removed twice: MH_ENOENT");
    mh_manifest_id(&m, &after);
    TAP_OK(m.n == 2 && strcmp(before.s, after.s) == 0, "  ... and the manifest is unchanged");

    mh_map_put(&A, &up, "x", mh_v_strn(ida, MH_ID_LEN));
    mh_map_put(&A, &up, "x", mh_v_strn(idb, MH_ID_LEN));
    TAP_EQ_INT(mh_manifest_apply(&m, &up, NULL, &why), MH_EPARSE, "duplicate path in an upsert map: MH_EPARSE");
    up = (mh_val_t){.t = MH_V_MAP};
    for (int i = 0; i < 12; i++) mh_map_put(&A, &up, pool_path[i], mh_v_strn(ida, MH_ID_LEN));
    mh_map_put(&A, &up, pool_path[3], mh_v_strn(idb, MH_ID_LEN));
    TAP_EQ_INT(mh_manifest_apply(&m, &up, NULL, &why), MH_EPARSE, "duplicate path in a large upsert map: MH_EPARSE");
    up = (mh_val_t){.t = MH_V_MAP};
    mh_map_put(&A, &up, "../x", mh_v_strn(ida, MH_ID_LEN));
    TAP_EQ_INT(mh_manifest_apply(&m, &up, NULL, &why), MH_EPARSE, "path ../x: MH_EPARSE");
    up = (mh_val_t){.t = MH_V_MAP};
    char upper[MH_ID_SIZE];
    memcpy(upper, ida, MH_ID_SIZE);
    for (int i = 7; i < MH_ID_LEN; i++)
        if (upper[i] >= 'a') upper[i] -= 32;
    mh_map_put(&A, &up, "c", mh_v_strn(upper, MH_ID_LEN));
    TAP_EQ_INT(mh_manifest_apply(&m, &up, NULL, &why), MH_EPARSE, "id with uppercase hex: MH_EPARSE");
    TAP_OK(why && strstr(why, "sha256"), "  reason: %s", why ? why : "");
    mh_val_t notmap = mh_v_int(3);
    TAP_EQ_INT(mh_manifest_apply(&m, &notmap, NULL, &why), MH_EPARSE, "upsert not a map: MH_EPARSE");
    TAP_EQ_INT(mh_manifest_apply(&m, NULL, &notmap, &why), MH_EPARSE, "remove not an array: MH_EPARSE");
    mh_manifest_id(&m, &after);
    TAP_OK(m.n == 2 && strcmp(before.s, after.s) == 0, "after every refused delta the manifest is unchanged");

    /* remove then upsert of the same path in one delta is fine */
    up = (mh_val_t){.t = MH_V_MAP};
    rm = (mh_val_t){.t = MH_V_ARR};
    mh_arr_push(&A, &rm, mh_v_str("a"));
    mh_map_put(&A, &up, "a", mh_v_strn(idb, MH_ID_LEN));
    TAP_EQ_INT(mh_manifest_apply(&m, &up, &rm, &why), 0, "remove + upsert of one path");
    TAP_OK(m.n == 2 && memcmp(mh_manifest_find(&m, "a", 1)->id, idb, MH_ID_LEN) == 0, "  ... takes the upsert");
    mh_manifest_free(&m);
}

static void test_encode_decode_diff(void)
{
    srand(777);
    int ma[POOL_PATHS], mb[POOL_PATHS];
    int bad = 0;
    for (int round = 0; round < 50; round++) {
        for (int i = 0; i < POOL_PATHS; i++) {
            ma[i] = rand() % 3 ? rand() % POOL_IDS : -1;
            mb[i] = rand() % 4 == 0 ? rand() % POOL_IDS : ma[i];
            if (rand() % 10 == 0) mb[i] = -1;
        }
        if (round == 0)
            for (int i = 0; i < POOL_PATHS; i++) ma[i] = -1; /* from empty: a root delta */
        mh_manifest_t a = {0}, b = {0}, c = {0}, d = {0};
        model_manifest(ma, &a);
        model_manifest(mb, &b);
        mh_buf_t ub = {0}, rb = {0}, eb = {0};
        uint32_t nu, nr;
        bad += mh_manifest_diff(&a, &b, &ub, &nu, &rb, &nr) != 0;
        mh_val_t up, rm;
        const char *why;
        bad += mh_msgpack_decode(&A, ub.p, ub.len, NULL, &up, &why) != 0;
        bad += mh_msgpack_decode(&A, rb.p, rb.len, NULL, &rm, &why) != 0;
        bad += up.v.m.n != nu || rm.v.a.n != nr;
        mh_manifest_clone(&c, &a);
        bad += mh_manifest_apply(&c, &up, &rm, &why) != 0;
        bad += !same_entries(&b, &c);
        /* encode / decode */
        bad += mh_manifest_encode(&b, &eb) != 0;
        bad += mh_manifest_decode(&A, eb.p, eb.len, &d) != 0;
        bad += !same_entries(&b, &d);
        mh_id_t ib, id;
        mh_manifest_id(&b, &ib);
        mh_manifest_id(&d, &id);
        bad += strcmp(ib.s, id.s) != 0;
        mh_buf_free(&ub);
        mh_buf_free(&rb);
        mh_buf_free(&eb);
        mh_manifest_free(&a);
        mh_manifest_free(&b);
        mh_manifest_free(&c);
        mh_manifest_free(&d);
    }
    TAP_OK(bad == 0, "diff(a, b) applied to a gives b; encode/decode round trip (50 rounds, %d bad)", bad);

    /* decode: any key order, duplicates and bad entries refused */
    mh_buf_t b = {0};
    mh_mpw_t w;
    mh_mpw_init(&w, &b);
    mh_mpw_map(&w, 3);
    mh_mpw_cstr(&w, "z");
    mh_mpw_cstr(&w, pool_id[0].s);
    mh_mpw_cstr(&w, "a/b");
    mh_mpw_cstr(&w, pool_id[1].s);
    mh_mpw_cstr(&w, "a");
    mh_mpw_cstr(&w, pool_id[2].s);
    mh_manifest_t m = {0};
    TAP_EQ_INT(mh_manifest_decode(&A, b.p, b.len, &m), 0, "decode of an unsorted map");
    TAP_OK(m.n == 3 && m.e[0].plen == 1 && m.e[1].plen == 3 && m.e[2].path[0] == 'z', "  ... sorted");
    b.len = 0;
    mh_mpw_map(&w, 2);
    mh_mpw_cstr(&w, "a");
    mh_mpw_cstr(&w, pool_id[0].s);
    mh_mpw_cstr(&w, "a");
    mh_mpw_cstr(&w, pool_id[1].s);
    TAP_EQ_INT(mh_manifest_decode(&A, b.p, b.len, &m), MH_EPARSE, "decode: duplicate path refused");
    TAP_EQ_INT((int)m.n, 0, "  ... leaving the manifest empty");
    b.len = 0;
    mh_mpw_map(&w, 1);
    mh_mpw_cstr(&w, "a/../b");
    mh_mpw_cstr(&w, pool_id[0].s);
    TAP_EQ_INT(mh_manifest_decode(&A, b.p, b.len, &m), MH_EPARSE, "decode: bad path refused");
    b.len = 0;
    mh_mpw_map(&w, 1);
    mh_mpw_cstr(&w, "a");
    mh_mpw_cstr(&w, "sha256:00");
    TAP_EQ_INT(mh_manifest_decode(&A, b.p, b.len, &m), MH_EPARSE, "decode: bad id refused");
    mh_buf_free(&b);
    mh_manifest_free(&m);
}

/* ------------------------------------------------------ pack round trip */

static mh_id_t cid[3], sid[3], bid[4];
static uint8_t *big_blob;
static const char *blob_data[4];
static size_t blob_len[4];
static const char *MSG2 = "merge \xe2\x99\xab\nline two\n";

/* meta: {"agent_id": "bot", "breaking_changes": ["x"], "metadata": {"k": 1}} */
static void make_meta(mh_buf_t *meta)
{
    mh_mpw_t w;
    mh_mpw_init(&w, meta);
    mh_mpw_map(&w, 3);
    mh_mpw_cstr(&w, "agent_id");
    mh_mpw_cstr(&w, "bot");
    mh_mpw_cstr(&w, "breaking_changes");
    mh_mpw_arr(&w, 1);
    mh_mpw_cstr(&w, "x");
    mh_mpw_cstr(&w, "metadata");
    mh_mpw_map(&w, 1);
    mh_mpw_cstr(&w, "k");
    mh_mpw_int(&w, 1);
}

static int write_small_pack(mh_buf_t *out)
{
    big_blob = malloc(70000);
    for (int i = 0; i < 70000; i++) big_blob[i] = (uint8_t)(i * 7);
    blob_data[0] = "hello";
    blob_data[1] = "";
    blob_data[2] = (const char *)big_blob;
    blob_data[3] = "\x00\x01\x02";
    blob_len[0] = 5, blob_len[1] = 0, blob_len[2] = 70000, blob_len[3] = 3;
    for (int i = 0; i < 4; i++) mh_blob_id(blob_data[i], blob_len[i], &bid[i]);
    /* snapshots: s0 = {a: b0, d/e: b1}; s1 = s0 - a + {big: b2}; s2 = s1 + {z: b3} */
    mh_manifest_t m0 = {0}, m1 = {0}, m2 = {0};
    mh_manifest_upsert(&m0, "a", 1, bid[0].s);
    mh_manifest_upsert(&m0, "d/e", 3, bid[1].s);
    mh_manifest_clone(&m1, &m0);
    mh_manifest_remove(&m1, "a", 1);
    mh_manifest_upsert(&m1, "big", 3, bid[2].s);
    mh_manifest_clone(&m2, &m1);
    mh_manifest_upsert(&m2, "z", 1, bid[3].s);
    mh_manifest_id(&m0, &sid[0]);
    mh_manifest_id(&m1, &sid[1]);
    mh_manifest_id(&m2, &sid[2]);
    mh_commit_id(NULL, 0, S(sid[0].s), S("root"), S("2026-01-01T00:00:00+00:00"), S("gabriel"), &cid[0]);
    mh_str_t p1 = S(cid[0].s);
    mh_commit_id(&p1, 1, S(sid[1].s), S("two"), S("2026-01-01T00:01:00+00:00"), S("gabriel"), &cid[1]);
    mh_str_t p2[2] = {S(cid[1].s), S(cid[0].s)};
    mh_commit_id(p2, 2, S(sid[2].s), S(MSG2), S("2026-01-01T00:02:00+00:00"), S("J\xc3\xbcrgen"), &cid[2]);

    mh_buf_t meta = {0}, u0 = {0}, r0 = {0}, u1 = {0}, r1 = {0}, u2 = {0}, r2 = {0};
    make_meta(&meta);
    mh_manifest_t empty = {0};
    uint32_t nu, nr;
    mh_manifest_diff(&empty, &m0, &u0, &nu, &r0, &nr);
    mh_manifest_diff(&m0, &m1, &u1, &nu, &r1, &nr);
    mh_manifest_diff(&m1, &m2, &u2, &nu, &r2, &nr);

    mh_packw_t w;
    mh_packw_init(&w, out);
    mh_packw_commits(&w, 3);
    mh_packw_commit(&w, S(cid[0].s), NIL, NIL, S(sid[0].s), S("root"), S("gabriel"), S("2026-01-01T00:00:00+00:00"),
                    S("main"), NULL, 0);
    mh_packw_commit(&w, S(cid[1].s), S(cid[0].s), NIL, S(sid[1].s), S("two"), S("gabriel"),
                    S("2026-01-01T00:01:00+00:00"), S("main"), meta.p, meta.len);
    mh_packw_commit(&w, S(cid[2].s), S(cid[1].s), S(cid[0].s), S(sid[2].s), S(MSG2), S("J\xc3\xbcrgen"),
                    S("2026-01-01T00:02:00+00:00"), S("feature"), NULL, 0);
    mh_packw_snapshots(&w, 3);
    mh_packw_snapshot(&w, S(sid[0].s), NIL, u0.p, u0.len, r0.p, r0.len);
    mh_packw_snapshot(&w, S(sid[1].s), S(sid[0].s), u1.p, u1.len, r1.p, r1.len);
    mh_packw_snapshot(&w, S(sid[2].s), S(sid[1].s), u2.p, u2.len, NULL, 0);
    mh_packw_blobs(&w, 4);
    for (int i = 0; i < 4; i++) mh_packw_blob(&w, S(bid[i].s), blob_data[i], blob_len[i]);
    mh_packw_branch_heads(&w, 2);
    mh_packw_branch_head(&w, S("main"), S(cid[1].s));
    mh_packw_branch_head(&w, S("feature"), S(cid[2].s));
    int rc = mh_packw_finish(&w);
    mh_buf_free(&meta);
    mh_buf_free(&u0), mh_buf_free(&r0), mh_buf_free(&u1), mh_buf_free(&r1), mh_buf_free(&u2), mh_buf_free(&r2);
    mh_manifest_free(&m0), mh_manifest_free(&m1), mh_manifest_free(&m2);
    return rc;
}

/* Rebuilds the snapshots of a pack (parents earlier in the pack) and
 * checks every id; returns the number of mismatches or failures. */
static int rebuild_check(const mh_pack_t *p)
{
    int bad = 0;
    mh_manifest_t *ms = calloc(p->nsnapshots, sizeof(*ms));
    for (size_t i = 0; i < p->nsnapshots; i++) {
        const mh_pack_snapshot_t *s = &p->snapshots[i];
        if (s->parent.p) {
            size_t j = 0;
            while (j < i && !(p->snapshots[j].snapshot_id.n == s->parent.n &&
                              memcmp(p->snapshots[j].snapshot_id.p, s->parent.p, s->parent.n) == 0))
                j++;
            if (j == i) {
                bad++;
                continue;
            }
            mh_manifest_clone(&ms[i], &ms[j]);
        }
        const char *why;
        bad += mh_manifest_apply(&ms[i], s->upsert, s->remove, &why) != 0;
        mh_id_t id;
        mh_manifest_id(&ms[i], &id);
        bad += !str_is(s->snapshot_id, id.s);
    }
    for (size_t i = 0; i < p->nsnapshots; i++) mh_manifest_free(&ms[i]);
    free(ms);
    return bad;
}

static void test_pack_roundtrip(void)
{
    mh_buf_t b = {0};
    TAP_EQ_INT(write_small_pack(&b), 0, "writer: small pack written");
    TAP_OK(b.len > 5 && memcmp(b.p, "MUSE\x01", 5) == 0, "writer: v1 header");
    mh_pack_t p;
    const char *why = NULL;
    int rc = mh_pack_read(&A, b.p, b.len, NULL, &p, &why);
    TAP_EQ_INT(rc, 0, "reader: small pack parses");
    if (rc) {
        printf("# %s\n", why);
        return;
    }
    TAP_EQ_INT(p.version, 1, "version 1");
    TAP_OK(p.ncommits == 3 && p.nsnapshots == 3 && p.nblobs == 4, "counts 3/3/4");
    const mh_pack_commit_t *c = p.commits;
    TAP_OK(str_is(c[0].commit_id, cid[0].s) && !c[0].parent.p && !c[0].parent2.p && str_is(c[0].snapshot_id, sid[0].s) &&
               str_is(c[0].message, "root") && str_is(c[0].author, "gabriel") &&
               str_is(c[0].committed_at, "2026-01-01T00:00:00+00:00") && str_is(c[0].branch, "main"),
           "commit 0: every field");
    TAP_OK(str_is(c[1].parent, cid[0].s) && !c[1].parent2.p && str_is(c[1].message, "two"), "commit 1: parent");
    TAP_OK(str_is(c[2].parent, cid[1].s) && str_is(c[2].parent2, cid[0].s) && str_is(c[2].message, MSG2) &&
               str_is(c[2].author, "J\xc3\xbcrgen") && str_is(c[2].branch, "feature"),
           "commit 2: merge parents, UTF-8 message with newlines");
    int bad = 0;
    for (int i = 0; i < 3; i++) {
        mh_str_t ps[2] = {c[i].parent, c[i].parent2};
        int np = (ps[0].p != NULL) + (ps[1].p != NULL);
        mh_id_t id;
        mh_commit_id(ps, np, c[i].snapshot_id, c[i].message, c[i].committed_at, c[i].author, &id);
        bad += !str_is(c[i].commit_id, id.s);
    }
    TAP_OK(bad == 0, "every commit id recomputes");
    const mh_val_t *meta = c[1].map;
    TAP_OK(mh_val_streq(mh_val_get(meta, "agent_id"), "bot") && mh_val_get(meta, "breaking_changes")->t == MH_V_ARR &&
               mh_val_get(mh_val_get(meta, "metadata"), "k")->v.u == 1 && meta->v.m.n == 11,
           "commit 1: meta spliced (8 + 3 keys)");
    mh_buf_t mb = {0};
    uint32_t nmeta = 99;
    TAP_OK(mh_pack_commit_meta(&c[1], &mb, &nmeta) == 0 && nmeta == 3, "commit_meta: 3 pairs");
    mh_buf_t mref = {0};
    make_meta(&mref);
    TAP_OK(mb.len == mref.len && memcmp(mb.p, mref.p, mb.len) == 0, "commit_meta: same bytes as written");
    TAP_OK(mh_pack_commit_meta(&c[0], &mb, &nmeta) == 0 && nmeta == 0, "commit_meta: none -> empty map");
    mh_buf_free(&mref);

    const mh_pack_snapshot_t *s = p.snapshots;
    TAP_OK(str_is(s[0].snapshot_id, sid[0].s) && !s[0].parent.p && s[0].upsert->v.m.n == 2 && s[0].remove->v.a.n == 0,
           "snapshot 0: root, 2 upserts");
    TAP_OK(str_is(s[1].parent, sid[0].s) && s[1].upsert->v.m.n == 1 && s[1].remove->v.a.n == 1 &&
               mh_val_streq(&s[1].remove->v.a.items[0], "a"),
           "snapshot 1: delta against 0");
    TAP_OK(s[2].remove->t == MH_V_ARR && s[2].remove->v.a.n == 0, "snapshot 2: empty remove");
    TAP_EQ_INT(rebuild_check(&p), 0, "every snapshot id rebuilds from the deltas");

    bad = 0;
    for (int i = 0; i < 4; i++) {
        const mh_pack_blob_t *bl = &p.blobs[i];
        bad += !str_is(bl->object_id, bid[i].s) || bl->length != blob_len[i] || bl->offset + bl->length > b.len ||
               (blob_len[i] && memcmp(b.p + bl->offset, blob_data[i], blob_len[i]) != 0);
    }
    TAP_OK(bad == 0, "every blob's (offset, length) slice equals its content");
    size_t badi = 99;
    TAP_EQ_INT(mh_pack_verify_blobs(b.p, &p, &badi), 0, "verify_blobs: all hash to their ids");
    b.p[p.blobs[2].offset + 500] ^= 1;
    TAP_EQ_INT(mh_pack_verify_blobs(b.p, &p, &badi), MH_EHASH, "verify_blobs: a flipped byte is MH_EHASH");
    TAP_EQ_INT((int)badi, 2, "  ... naming blob 2");
    b.p[p.blobs[2].offset + 500] ^= 1;
    TAP_OK(p.branch_heads && p.branch_heads->v.m.n == 2 && mh_val_streq(mh_val_get(p.branch_heads, "feature"), cid[2].s),
           "branch_heads");

    /* re-writing what was read gives the same bytes (deterministic) */
    mh_buf_t again = {0};
    mh_packw_t w;
    mh_packw_init(&w, &again);
    mh_packw_commits(&w, (uint32_t)p.ncommits);
    for (size_t i = 0; i < p.ncommits; i++) {
        mh_buf_t m = {0};
        mh_pack_commit_meta(&c[i], &m, NULL);
        mh_packw_commit(&w, c[i].commit_id, c[i].parent, c[i].parent2, c[i].snapshot_id, c[i].message, c[i].author,
                        c[i].committed_at, c[i].branch, m.p, m.len);
        mh_buf_free(&m);
    }
    mh_packw_snapshots(&w, (uint32_t)p.nsnapshots);
    for (size_t i = 0; i < p.nsnapshots; i++) {
        mh_buf_t u = {0}, r = {0};
        mh_mpw_t mw;
        mh_mpw_init(&mw, &u);
        mh_mpw_val(&mw, s[i].upsert);
        mh_mpw_init(&mw, &r);
        mh_mpw_val(&mw, s[i].remove);
        mh_packw_snapshot(&w, s[i].snapshot_id, s[i].parent, u.p, u.len, r.p, r.len);
        mh_buf_free(&u);
        mh_buf_free(&r);
    }
    mh_packw_blobs(&w, (uint32_t)p.nblobs);
    for (size_t i = 0; i < p.nblobs; i++) mh_packw_blob(&w, p.blobs[i].object_id, b.p + p.blobs[i].offset, p.blobs[i].length);
    mh_packw_branch_heads(&w, p.branch_heads->v.m.n);
    for (uint32_t i = 0; i < p.branch_heads->v.m.n; i++) {
        const mh_kv_t *kv = &p.branch_heads->v.m.kv[i];
        mh_packw_branch_head(&w, (mh_str_t){kv->k.v.s.p, kv->k.v.s.n}, (mh_str_t){kv->v.v.s.p, kv->v.v.s.n});
    }
    TAP_EQ_INT(mh_packw_finish(&w), 0, "re-write of the read pack");
    TAP_OK(again.len == b.len && memcmp(again.p, b.p, b.len) == 0, "  ... is byte-identical");
    mh_buf_free(&again);

    /* truncation at every byte: always an error, never a crash (ASan) */
    bad = 0;
    for (size_t cut = 0; cut < b.len; cut++) {
        uint8_t *t = malloc(cut ? cut : 1);
        memcpy(t, b.p, cut);
        mh_pack_t tp;
        const char *tw = NULL;
        mh_arena_t ta;
        mh_arena_init(&ta, 0);
        int trc = mh_pack_read(&ta, t, cut, NULL, &tp, &tw);
        bad += trc == 0 || tw == NULL;
        mh_arena_release(&ta);
        free(t);
    }
    TAP_OK(bad == 0, "truncated at each of %zu byte positions: an error with a reason (%d bad)", b.len, bad);

    /* the writer refuses misuse */
    mh_buf_t x = {0};
    mh_packw_init(&w, &x);
    mh_packw_snapshots(&w, 0);
    TAP_EQ_INT(mh_packw_finish(&w), MH_EINVAL, "writer: section out of order -> MH_EINVAL");
    x.len = 0;
    mh_packw_init(&w, &x);
    mh_packw_commits(&w, 2);
    mh_packw_commit(&w, S(cid[0].s), NIL, NIL, S(sid[0].s), S("m"), S("a"), S("t"), S("b"), NULL, 0);
    mh_packw_snapshots(&w, 0);
    TAP_EQ_INT(mh_packw_finish(&w), MH_EINVAL, "writer: fewer commits than announced -> MH_EINVAL");
    x.len = 0;
    mh_packw_init(&w, &x);
    mh_packw_commits(&w, 1);
    mh_packw_commit(&w, S(cid[0].s), NIL, NIL, S(sid[0].s), S("m"), S("a"), S("t"), S("b"), (const uint8_t *)"\x91\x01", 2);
    TAP_EQ_INT(mh_packw_finish(&w), MH_EINVAL, "writer: meta that is not a map -> MH_EINVAL");
    x.len = 0;
    mh_packw_init(&w, &x);
    mh_packw_commits(&w, 0);
    mh_packw_snapshots(&w, 0);
    mh_packw_blobs(&w, 0);
    mh_packw_branch_heads(&w, 0);
    TAP_EQ_INT(mh_packw_finish(&w), 0, "writer: an empty pack");
    TAP_OK(mh_pack_read(&A, x.p, x.len, NULL, &p, &why) == 0 && p.ncommits == 0 && p.nblobs == 0,
           "  ... reads back empty");
    mh_buf_free(&x);
    mh_buf_free(&mb);
    mh_buf_free(&b);
}

/* ------------------------------------------------------------- v0 packs */

static void test_pack_v0(void)
{
    mh_id_t b0;
    mh_blob_id("data", 4, &b0);
    mh_manifest_t m = {0};
    mh_manifest_upsert(&m, "f", 1, b0.s);
    mh_id_t s0, c0;
    mh_manifest_id(&m, &s0);
    mh_commit_id(NULL, 0, S(s0.s), S("msg"), S("2026-01-01T00:00:00"), S("me"), &c0);
    mh_manifest_free(&m);

    /* keys in another order, `objects`, str content, no parents, no
     * branch, no delta_remove, unknown keys at every level */
    mh_buf_t b = {0};
    mh_mpw_t w;
    mh_mpw_init(&w, &b);
    mh_mpw_map(&w, 4);
    mh_mpw_cstr(&w, "objects");
    mh_mpw_arr(&w, 1);
    mh_mpw_map(&w, 3);
    mh_mpw_cstr(&w, "content");
    mh_mpw_cstr(&w, "data");
    mh_mpw_cstr(&w, "object_id");
    mh_mpw_cstr(&w, b0.s);
    mh_mpw_cstr(&w, "size");
    mh_mpw_int(&w, 4);
    mh_mpw_cstr(&w, "extra");
    mh_mpw_int(&w, 1);
    mh_mpw_cstr(&w, "snapshots");
    mh_mpw_arr(&w, 1);
    mh_mpw_map(&w, 2);
    mh_mpw_cstr(&w, "delta_upsert");
    mh_mpw_map(&w, 1);
    mh_mpw_cstr(&w, "f");
    mh_mpw_cstr(&w, b0.s);
    mh_mpw_cstr(&w, "snapshot_id");
    mh_mpw_cstr(&w, s0.s);
    mh_mpw_cstr(&w, "commits");
    mh_mpw_arr(&w, 1);
    mh_mpw_map(&w, 6);
    mh_mpw_cstr(&w, "structured_delta");
    mh_mpw_nil(&w);
    mh_mpw_cstr(&w, "commit_id");
    mh_mpw_cstr(&w, c0.s);
    mh_mpw_cstr(&w, "snapshot_id");
    mh_mpw_cstr(&w, s0.s);
    mh_mpw_cstr(&w, "message");
    mh_mpw_cstr(&w, "msg");
    mh_mpw_cstr(&w, "author");
    mh_mpw_cstr(&w, "me");
    mh_mpw_cstr(&w, "committed_at");
    mh_mpw_cstr(&w, "2026-01-01T00:00:00");
    mh_pack_t p;
    const char *why = NULL;
    int rc = mh_pack_read(&A, b.p, b.len, NULL, &p, &why);
    TAP_EQ_INT(rc, 0, "v0 pack with `objects`, str content, absent optional keys, unknown keys");
    if (rc) printf("# %s\n", why);
    TAP_EQ_INT(p.version, 0, "  version 0");
    TAP_OK(p.ncommits == 1 && !p.commits[0].parent.p && !p.commits[0].parent2.p && p.commits[0].branch.n == 0 &&
               p.commits[0].branch.p != NULL,
           "  absent parents are nil, absent branch is \"\"");
    TAP_OK(p.nsnapshots == 1 && !p.snapshots[0].parent.p && p.snapshots[0].remove->t == MH_V_ARR &&
               p.snapshots[0].remove->v.a.n == 0,
           "  absent delta_remove is an empty array");
    TAP_OK(p.nblobs == 1 && p.blobs[0].length == 4 && memcmp(b.p + p.blobs[0].offset, "data", 4) == 0,
           "  str content: offset into the v0 buffer");
    TAP_EQ_INT(mh_pack_verify_blobs(b.p, &p, NULL), 0, "  blob verifies");
    TAP_EQ_INT(rebuild_check(&p), 0, "  snapshot rebuilds");
    TAP_OK(p.branch_heads == NULL, "  no branch_heads");
    mh_buf_free(&b);
}

/* ----------------------------------------------------------- rejections */

enum {
    M_NONE, M_ID_UPPER, M_ID_MISSING, M_SNAP_BAD, M_PARENT_INT, M_MSG_NUL, M_AUTHOR_INT, M_AT_BADUTF8,
    M_BRANCH_NUL, M_DUP_KEY, M_BREAKING_STR, M_METADATA_ARR, M_AGENT_INT, M_PATH_DOTDOT, M_PATH_ABS,
    M_PATH_EMPTYSEG, M_PATH_DOT, M_UPSERT_ID_UPPER, M_REMOVE_NOT_ARR, M_UPSERT_NOT_MAP, M_REMOVE_BAD_PATH,
    M_CONTENT_INT, M_BLOB_ID_MISSING, M_BLOBS_AND_OBJECTS, M_COMMITS_NOT_ARR, M_COMMIT_NOT_MAP, M_HEAD_BAD_ID,
    M_SNAP_PARENT_BAD, M_MSG_MISSING, M_NMUT
};
static const char *mut_name[M_NMUT] = {
    "valid", "commit_id with uppercase hex", "commit_id missing", "snapshot_id malformed", "parent_commit_id an int",
    "message with NUL", "author not a string", "committed_at invalid UTF-8", "branch with NUL",
    "key `message` twice", "breaking_changes a string", "metadata an array", "agent_id an int",
    "delta_upsert path ../x", "delta_upsert path /abs", "delta_upsert path a//b", "delta_upsert path a/./b",
    "delta_upsert id uppercase", "delta_remove not an array", "delta_upsert not a map", "delta_remove path a/..",
    "blob content an int", "blob object_id missing", "both blobs and objects", "commits not an array",
    "commit not a map", "branch head not an id", "parent_snapshot_id malformed", "message missing",
};

static const char *ID1 = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
static const char *ID2 = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
static const char *IDU = "sha256:ABCDEF1111111111111111111111111111111111111111111111111111111111";

/* A v1 pack with one commit, snapshot and blob, broken as `mut` says. */
static void build_mut(mh_buf_t *b, int mut)
{
    mh_mpw_t w;
    mh_mpw_init(&w, b);
    mh_mpw_raw(&w, "MUSE\x01", 5);
    mh_mpw_map(&w, mut == M_BLOBS_AND_OBJECTS ? 5 : 4);
    mh_mpw_cstr(&w, "commits");
    if (mut == M_COMMITS_NOT_ARR) {
        mh_mpw_map(&w, 0);
    } else if (mut == M_COMMIT_NOT_MAP) {
        mh_mpw_arr(&w, 1);
        mh_mpw_cstr(&w, ID1);
    } else {
        int n = 8 + (mut == M_DUP_KEY) + (mut == M_BREAKING_STR) + (mut == M_METADATA_ARR) + (mut == M_AGENT_INT) -
                (mut == M_ID_MISSING) - (mut == M_MSG_MISSING);
        mh_mpw_arr(&w, 1);
        mh_mpw_map(&w, (uint32_t)n);
        if (mut != M_ID_MISSING) {
            mh_mpw_cstr(&w, "commit_id");
            mh_mpw_cstr(&w, mut == M_ID_UPPER ? IDU : ID1);
        }
        mh_mpw_cstr(&w, "parent_commit_id");
        if (mut == M_PARENT_INT) mh_mpw_int(&w, 5);
        else mh_mpw_nil(&w);
        mh_mpw_cstr(&w, "parent2_commit_id");
        mh_mpw_nil(&w);
        mh_mpw_cstr(&w, "snapshot_id");
        mh_mpw_cstr(&w, mut == M_SNAP_BAD ? "sha256:12" : ID2);
        if (mut != M_MSG_MISSING) {
            mh_mpw_cstr(&w, "message");
            if (mut == M_MSG_NUL) mh_mpw_str(&w, "a\0b", 3);
            else mh_mpw_cstr(&w, "msg");
        }
        mh_mpw_cstr(&w, "author");
        if (mut == M_AUTHOR_INT) mh_mpw_int(&w, 1);
        else mh_mpw_cstr(&w, "me");
        mh_mpw_cstr(&w, "committed_at");
        mh_mpw_cstr(&w, mut == M_AT_BADUTF8 ? "2026\xff" : "2026-01-01T00:00:00Z");
        mh_mpw_cstr(&w, "branch");
        if (mut == M_BRANCH_NUL) mh_mpw_str(&w, "ma\0in", 5);
        else mh_mpw_cstr(&w, "main");
        if (mut == M_DUP_KEY) {
            mh_mpw_cstr(&w, "message");
            mh_mpw_cstr(&w, "other");
        }
        if (mut == M_BREAKING_STR) {
            mh_mpw_cstr(&w, "breaking_changes");
            mh_mpw_cstr(&w, "x");
        }
        if (mut == M_METADATA_ARR) {
            mh_mpw_cstr(&w, "metadata");
            mh_mpw_arr(&w, 0);
        }
        if (mut == M_AGENT_INT) {
            mh_mpw_cstr(&w, "agent_id");
            mh_mpw_int(&w, 3);
        }
    }
    mh_mpw_cstr(&w, "snapshots");
    mh_mpw_arr(&w, 1);
    mh_mpw_map(&w, 4);
    mh_mpw_cstr(&w, "snapshot_id");
    mh_mpw_cstr(&w, ID2);
    mh_mpw_cstr(&w, "parent_snapshot_id");
    if (mut == M_SNAP_PARENT_BAD) mh_mpw_cstr(&w, "sha256:");
    else mh_mpw_nil(&w);
    mh_mpw_cstr(&w, "delta_upsert");
    if (mut == M_UPSERT_NOT_MAP) {
        mh_mpw_arr(&w, 0);
    } else {
        const char *path = mut == M_PATH_DOTDOT ? "../x" : mut == M_PATH_ABS ? "/abs" : mut == M_PATH_EMPTYSEG ? "a//b"
                           : mut == M_PATH_DOT ? "a/./b" : "a/b";
        mh_mpw_map(&w, 1);
        mh_mpw_cstr(&w, path);
        mh_mpw_cstr(&w, mut == M_UPSERT_ID_UPPER ? IDU : ID1);
    }
    mh_mpw_cstr(&w, "delta_remove");
    if (mut == M_REMOVE_NOT_ARR) {
        mh_mpw_cstr(&w, "a");
    } else if (mut == M_REMOVE_BAD_PATH) {
        mh_mpw_arr(&w, 1);
        mh_mpw_cstr(&w, "a/..");
    } else {
        mh_mpw_arr(&w, 0);
    }
    for (int k = 0; k < (mut == M_BLOBS_AND_OBJECTS ? 2 : 1); k++) {
        mh_mpw_cstr(&w, k ? "objects" : "blobs");
        mh_mpw_arr(&w, 1);
        mh_mpw_map(&w, mut == M_BLOB_ID_MISSING ? 1 : 2);
        if (mut != M_BLOB_ID_MISSING) {
            mh_mpw_cstr(&w, "object_id");
            mh_mpw_cstr(&w, ID1);
        }
        mh_mpw_cstr(&w, "content");
        if (mut == M_CONTENT_INT) mh_mpw_int(&w, 7);
        else mh_mpw_bin(&w, "xyz", 3);
    }
    mh_mpw_cstr(&w, "branch_heads");
    mh_mpw_map(&w, 1);
    mh_mpw_cstr(&w, "main");
    mh_mpw_cstr(&w, mut == M_HEAD_BAD_ID ? "main" : ID1);
}

static void test_pack_rejections(void)
{
    for (int mut = 0; mut < M_NMUT; mut++) {
        mh_buf_t b = {0};
        build_mut(&b, mut);
        mh_pack_t p;
        const char *why = NULL;
        int rc = mh_pack_read(&A, b.p, b.len, NULL, &p, &why);
        if (mut == M_NONE) TAP_EQ_INT(rc, 0, "rejection harness: the unbroken pack parses");
        else TAP_OK(rc == MH_EPARSE && why, "refused: %s (%s)", mut_name[mut], why ? why : "no reason");
        mh_buf_free(&b);
    }
    mh_buf_t b = {0};
    build_mut(&b, M_NONE);
    mh_pack_t p;
    const char *why = NULL;
    b.p[4] = 0x03;
    TAP_EQ_INT(mh_pack_read(&A, b.p, b.len, NULL, &p, &why), MH_EPARSE, "refused: MUSE version 3");
    TAP_OK(why && strstr(why, "unsupported format version"), "  reason: %s", why ? why : "");
    b.p[4] = 0x02;
    TAP_EQ_INT(mh_pack_read(&A, b.p, b.len, NULL, &p, &why), MH_EPARSE, "refused: a v1 body under a v2 header");
    TAP_OK(why && strstr(why, "pack.blobs: not allowed in a v2 pack"), "  reason: %s", why ? why : "");
    b.p[4] = 0x01;
    TAP_EQ_INT(mh_pack_read(&A, b.p, 4, NULL, &p, &why), MH_EPARSE, "refused: header only");
    mh_buf_append_byte(&b, 0xc0);
    TAP_EQ_INT(mh_pack_read(&A, b.p, b.len, NULL, &p, &why), MH_EPARSE, "refused: trailing byte after the body");
    b.len--;
    mh_pack_limits_t lim = mh_pack_limits_default;
    lim.max_blobs = 0;
    TAP_EQ_INT(mh_pack_read(&A, b.p, b.len, &lim, &p, &why), MH_ELIMIT, "refused: more blobs than max_blobs");
    lim = mh_pack_limits_default;
    lim.max_depth = 3;
    TAP_EQ_INT(mh_pack_read(&A, b.p, b.len, &lim, &p, &why), MH_ELIMIT, "refused: deeper than max_depth");
    static const uint8_t notmap[] = {'M', 'U', 'S', 'E', 1, 0x90};
    TAP_EQ_INT(mh_pack_read(&A, notmap, sizeof notmap, NULL, &p, &why), MH_EPARSE, "refused: body not a map");
    static const uint8_t huge[] = {'M', 'U', 'S', 'E', 1, 0x81, 0xa7, 'c', 'o', 'm', 'm', 'i', 't', 's',
                                   0xdd, 0xff, 0xff, 0xff, 0xff};
    TAP_EQ_INT(mh_pack_read(&A, huge, sizeof huge, NULL, &p, &why), MH_EPARSE, "refused: commits count of 4G");
    /* 100 one-byte maps cannot be 100 commits */
    mh_buf_t few = {0};
    mh_buf_append(&few, "MUSE\x01\x81\xa7" "commits\xdc\x00\x64", 17);
    for (int i = 0; i < 100; i++) mh_buf_append_byte(&few, 0x80);
    TAP_EQ_INT(mh_pack_read(&A, few.p, few.len, NULL, &p, &why), MH_EPARSE, "refused: more commits than bytes allow");
    mh_buf_free(&few);

    /* the reader leaves duplicate delta paths to apply, which refuses them */
    mh_buf_t d = {0};
    mh_mpw_t w;
    mh_mpw_init(&w, &d);
    mh_mpw_map(&w, 1);
    mh_mpw_cstr(&w, "snapshots");
    mh_mpw_arr(&w, 1);
    mh_mpw_map(&w, 2);
    mh_mpw_cstr(&w, "snapshot_id");
    mh_mpw_cstr(&w, ID2);
    mh_mpw_cstr(&w, "delta_upsert");
    mh_mpw_map(&w, 2);
    mh_mpw_cstr(&w, "p");
    mh_mpw_cstr(&w, ID1);
    mh_mpw_cstr(&w, "p");
    mh_mpw_cstr(&w, ID2);
    TAP_EQ_INT(mh_pack_read(&A, d.p, d.len, NULL, &p, &why), 0, "duplicate upsert paths: reader passes them on");
    mh_manifest_t m = {0};
    TAP_EQ_INT(mh_manifest_apply(&m, p.snapshots[0].upsert, p.snapshots[0].remove, &why), MH_EPARSE,
               "  ... and apply refuses them");
    mh_manifest_free(&m);
    mh_buf_free(&d);
    mh_buf_free(&b);
}

/* ------------------------------------------------------------- benchmark */

#define SEED_FILES 700
#define SEED_COMMITS 1031
#define SEED_CHANGED 5
#define SEED_BLOB 512

typedef struct {
    char path[SEED_FILES][24];
    mh_id_t base[SEED_FILES];
    mh_id_t var[SEED_COMMITS][SEED_CHANGED];
    mh_id_t sid[SEED_COMMITS], cid[SEED_COMMITS];
    char at[SEED_COMMITS][48], msg[SEED_COMMITS][24];
} seed_t;

static void seed_content(char *buf, size_t *len, bool base, int i, int j)
{
    int n = base ? snprintf(buf, 64, "base-%06d", i) : snprintf(buf, 64, "commit-%05d-file-%d", i, j);
    memset(buf + n, base ? 'x' : 'y', SEED_BLOB);
    *len = (size_t)n + SEED_BLOB;
}

/* The seed-000 history (see gen_vectors.py), written with our writer. */
static int build_seed_pack(seed_t *sd, mh_buf_t *out)
{
    char content[SEED_BLOB + 64];
    size_t len;
    mh_manifest_t base = {0}, prev = {0}, cur = {0};
    for (int i = 0; i < SEED_FILES; i++) {
        snprintf(sd->path[i], sizeof sd->path[i], "src/file_%04d.py", i);
        seed_content(content, &len, true, i, 0);
        mh_blob_id(content, len, &sd->base[i]);
        mh_manifest_upsert(&base, sd->path[i], (uint32_t)strlen(sd->path[i]), sd->base[i].s);
    }
    mh_packw_t w;
    mh_packw_init(&w, out);
    mh_packw_commits(&w, SEED_COMMITS);
    for (int i = 0; i < SEED_COMMITS; i++) {
        mh_manifest_clone(&cur, &base);
        for (int j = 0; j < SEED_CHANGED; j++) {
            int idx = (i * SEED_CHANGED + j) % SEED_FILES;
            seed_content(content, &len, false, i, j);
            mh_blob_id(content, len, &sd->var[i][j]);
            mh_manifest_upsert(&cur, sd->path[idx], (uint32_t)strlen(sd->path[idx]), sd->var[i][j].s);
        }
        mh_manifest_id_nocache(&cur, &sd->sid[i]);
        snprintf(sd->msg[i], sizeof sd->msg[i], "commit-%05d", i);
        snprintf(sd->at[i], sizeof sd->at[i], "2026-01-01T%02d:%02d:00+00:00", i / 60, i % 60);
        mh_str_t parent = i ? S(sd->cid[i - 1].s) : NIL;
        mh_commit_id(&parent, i ? 1 : 0, S(sd->sid[i].s), S(sd->msg[i]), S(sd->at[i]), S("gabriel"), &sd->cid[i]);
        mh_packw_commit(&w, S(sd->cid[i].s), parent, NIL, S(sd->sid[i].s), S(sd->msg[i]), S("gabriel"), S(sd->at[i]),
                        S("main"), NULL, 0);
    }
    mh_packw_snapshots(&w, SEED_COMMITS);
    for (int i = 0; i < SEED_COMMITS; i++) {
        mh_manifest_clone(&cur, &base);
        for (int j = 0; j < SEED_CHANGED; j++) {
            int idx = (i * SEED_CHANGED + j) % SEED_FILES;
            mh_manifest_upsert(&cur, sd->path[idx], (uint32_t)strlen(sd->path[idx]), sd->var[i][j].s);
        }
        mh_buf_t u = {0}, r = {0};
        uint32_t nu, nr;
        mh_manifest_diff(&prev, &cur, &u, &nu, &r, &nr);
        mh_packw_snapshot(&w, S(sd->sid[i].s), i ? S(sd->sid[i - 1].s) : NIL, u.p, u.len, r.p, r.len);
        mh_buf_free(&u);
        mh_buf_free(&r);
        mh_manifest_clone(&prev, &cur);
    }
    mh_packw_blobs(&w, SEED_FILES + SEED_COMMITS * SEED_CHANGED);
    for (int i = 0; i < SEED_FILES; i++) {
        seed_content(content, &len, true, i, 0);
        mh_packw_blob(&w, S(sd->base[i].s), content, len);
    }
    for (int i = 0; i < SEED_COMMITS; i++)
        for (int j = 0; j < SEED_CHANGED; j++) {
            seed_content(content, &len, false, i, j);
            mh_packw_blob(&w, S(sd->var[i][j].s), content, len);
        }
    mh_packw_branch_heads(&w, 1);
    mh_packw_branch_head(&w, S("main"), S(sd->cid[SEED_COMMITS - 1].s));
    mh_manifest_free(&base);
    mh_manifest_free(&prev);
    mh_manifest_free(&cur);
    return mh_packw_finish(&w);
}

/* Rebuilds every manifest of a linear chain in pack order: one manifest
 * changed in place (what the hub does along a chain), or, with `clone`,
 * a new manifest per snapshot cloned from its parent (branchy histories).
 * Checks every snapshot id and recomputes every commit id. */
static int rebuild_chain(const mh_pack_t *p, bool clone, bool nocache)
{
    int bad = 0;
    mh_manifest_t cur = {0}, next = {0};
    for (size_t i = 0; i < p->nsnapshots; i++) {
        const mh_pack_snapshot_t *s = &p->snapshots[i];
        if (i && !(s->parent.p && s->parent.n == p->snapshots[i - 1].snapshot_id.n &&
                   memcmp(s->parent.p, p->snapshots[i - 1].snapshot_id.p, s->parent.n) == 0))
            bad++;
        const char *why;
        mh_manifest_t *m = &cur;
        if (clone) {
            mh_manifest_clone(&next, &cur);
            m = &next;
        }
        bad += mh_manifest_apply(m, s->upsert, s->remove, &why) != 0;
        mh_id_t id;
        if (nocache) mh_manifest_id_nocache(m, &id);
        else mh_manifest_id(m, &id);
        bad += !str_is(s->snapshot_id, id.s);
        if (clone) {
            mh_manifest_t t = cur;
            cur = next;
            next = t;
        }
    }
    for (size_t i = 0; i < p->ncommits; i++) {
        const mh_pack_commit_t *c = &p->commits[i];
        mh_str_t ps[2] = {c->parent, c->parent2};
        int np = (ps[0].p != NULL) + (ps[1].p != NULL);
        mh_id_t id;
        mh_commit_id(ps, np, c->snapshot_id, c->message, c->committed_at, c->author, &id);
        bad += !str_is(c->commit_id, id.s);
    }
    mh_manifest_free(&cur);
    mh_manifest_free(&next);
    return bad;
}

static void test_seed_bench(void)
{
    seed_t *sd = calloc(1, sizeof(*sd));
    mh_buf_t b = {0};
    uint64_t t0 = mh_now_us();
    TAP_EQ_INT(build_seed_pack(sd, &b), 0, "seed-000 pack built with the writer");
    TAP_COMMENT("seed pack: %zu bytes, built in %.1f ms", b.len, (mh_now_us() - t0) / 1000.0);
    TAP_EQ_STR(sd->sid[SEED_COMMITS - 1].s, VEC_SEED_LAST_SNAPSHOT_ID, "seed: last snapshot id matches Python");
    TAP_EQ_STR(sd->cid[SEED_COMMITS - 1].s, VEC_SEED_TIP_COMMIT_ID, "seed: tip commit id matches Python");

    double best_parse = 1e9, best_verify = 1e9, best_rebuild = 1e9, best_clone = 1e9, best_nocache = 1e9;
    int bad = 0;
    for (int run = 0; run < 5; run++) {
        mh_arena_t a;
        mh_arena_init(&a, 0);
        mh_pack_t p;
        const char *why = NULL;
        uint64_t t1 = mh_now_us();
        int rc = mh_pack_read(&a, b.p, b.len, NULL, &p, &why);
        uint64_t t2 = mh_now_us();
        size_t badi;
        rc |= mh_pack_verify_blobs(b.p, &p, &badi);
        uint64_t t3 = mh_now_us();
        bad += rebuild_chain(&p, false, false);
        uint64_t t4 = mh_now_us();
        bad += rebuild_chain(&p, true, false);
        uint64_t t5 = mh_now_us();
        bad += rebuild_chain(&p, false, true);
        uint64_t t6 = mh_now_us();
        bad += rc != 0 || p.ncommits != SEED_COMMITS || p.nsnapshots != SEED_COMMITS ||
               p.nblobs != SEED_FILES + SEED_COMMITS * SEED_CHANGED;
#define BEST(v, d) v = (d) / 1000.0 < v ? (d) / 1000.0 : v
        BEST(best_parse, t2 - t1);
        BEST(best_verify, t3 - t2);
        BEST(best_rebuild, t4 - t3);
        BEST(best_clone, t5 - t4);
        BEST(best_nocache, t6 - t5);
        mh_arena_release(&a);
    }
    /* The same pack through the stream reader in 1 MiB feeds (copying:
     * what unpack does with windows of the staged file), hashing blobs. */
    double best_stream = 1e9;
    for (int run = 0; run < 5; run++) {
        mh_arena_t a;
        mh_arena_init(&a, 0);
        mh_packr_t *r;
        uint64_t t1 = mh_now_us();
        int rc = mh_packr_new(&a, NULL, MH_PACKR_VERIFY, b.len, &r);
        for (size_t off = 0; !rc && off < b.len; off += 1 << 20)
            rc = mh_packr_feed(r, b.p + off, b.len - off < (1u << 20) ? b.len - off : 1u << 20);
        if (!rc) rc = mh_packr_finish(r);
        BEST(best_stream, mh_now_us() - t1);
        bad += rc != 0 || mh_packr_result(r)->ncommits != SEED_COMMITS;
        mh_packr_free(r);
        mh_arena_release(&a);
    }
    TAP_OK(bad == 0, "seed: parse, verify, every snapshot and commit id rebuilt (5 runs, %d bad)", bad);
    TAP_COMMENT("bench: stream reader in 1 MiB feeds with blob hashes (copying metadata): %.2f ms", best_stream);
    TAP_COMMENT("bench (best of 5): parse %.2f ms, verify_blobs %.2f ms, rebuild 1031 manifests + ids %.2f ms",
                best_parse, best_verify, best_rebuild);
    TAP_COMMENT("bench: total parse + verify + rebuild = %.2f ms (target: well under 50 ms)",
                best_parse + best_verify + best_rebuild);
    TAP_COMMENT("bench: rebuild cloning a manifest per snapshot %.2f ms; without the id cache %.2f ms", best_clone,
                best_nocache);
    mh_buf_free(&b);
    free(sd);
}

int main(void)
{
    mh_arena_init(&A, 0);
    pools_init();
    test_vectors();
    test_paths();
    test_manifest_random();
    test_apply_errors();
    test_encode_decode_diff();
    test_pack_roundtrip();
    test_pack_v0();
    test_pack_rejections();
    test_seed_bench();
    free(big_blob);
    mh_arena_release(&A);
    return tap_done();
}
