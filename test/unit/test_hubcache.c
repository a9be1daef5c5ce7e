/*
 * test_hubcache.c — the per-process caches and small helpers behind fetch
 * and the read API that need no database: the reconstructed-manifest LRU
 * (entries own their bytes; a hit calls back on a later loop turn, never
 * re-entrantly), the text[] literal builder, the id hash and the
 * If-None-Match matcher (SPEC 4.5 objects).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/hub/hub_internal.h"
#include "tap.h"

typedef struct {
    int calls, err;
} cbres_t;

static void load_cb(void *ud, int err, const char *why)
{
    (void)why;
    cbres_t *r = ud;
    r->calls++;
    r->err = err;
}

static void test_manifest_lru(void)
{
    mh_hub_t hub = {0};
    hub.loop = uv_default_loop();

    /* A 100-entry manifest whose bytes live in a buffer we then destroy. */
    enum { N = 100 };
    char *buf = malloc(N * (32 + MH_ID_LEN));
    mh_manifest_t m = {0};
    char *p = buf;
    for (int i = 0; i < N; i++) {
        int n = snprintf(p, 32, "dir/file_%03d.txt", i);
        char c[16];
        snprintf(c, sizeof c, "%d", i);
        mh_id_t oid;
        mh_blob_id(c, strlen(c), &oid);
        memcpy(p + 32, oid.s, MH_ID_LEN);
        mh_manifest_upsert(&m, p, (uint32_t)n, p + 32);
        p += 32 + MH_ID_LEN;
    }
    mh_id_t sid;
    mh_manifest_id(&m, &sid);
    mh_hub_manifest_cache_put(&hub, sid.s, &m);
    mh_manifest_free(&m);
    memset(buf, 'X', N * (32 + MH_ID_LEN));
    free(buf);

    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_manifest_t out;
    cbres_t r = {0};
    mh_hub_load_manifest(&hub, &a, sid.s, &out, load_cb, &r);
    TAP_EQ_INT(r.calls, 0, "lru hit: no re-entrant callback");
    uv_run(hub.loop, UV_RUN_DEFAULT);
    TAP_EQ_INT(r.calls, 1, "lru hit: callback once, on a later turn");
    TAP_EQ_INT(r.err, 0, "lru hit: success");
    TAP_EQ_INT(out.n, N, "lru hit: all entries");
    mh_id_t again;
    mh_manifest_id(&out, &again);
    TAP_EQ_STR(again.s, sid.s, "lru hit: the copy hashes to the snapshot id");
    TAP_OK(out.n == N && out.e[7].plen == 16 && memcmp(out.e[7].path, "dir/file_007.txt", 16) == 0,
           "lru hit: paths intact after the source buffer was destroyed");

    /* Modifying the caller's copy does not touch the cache. */
    mh_manifest_remove(&out, "dir/file_007.txt", 16);
    mh_manifest_t out2;
    cbres_t r2 = {0};
    mh_hub_load_manifest(&hub, &a, sid.s, &out2, load_cb, &r2);
    uv_run(hub.loop, UV_RUN_DEFAULT);
    TAP_EQ_INT(out2.n, N, "lru: a caller's edit does not reach the cache");

    /* Bad ids are refused asynchronously too. */
    mh_manifest_t out3;
    cbres_t r3 = {0};
    mh_hub_load_manifest(&hub, &a, "sha256:nope", &out3, load_cb, &r3);
    TAP_EQ_INT(r3.calls, 0, "bad id: no re-entrant callback");
    uv_run(hub.loop, UV_RUN_DEFAULT);
    TAP_EQ_INT(r3.err, MH_EINVAL, "bad id: MH_EINVAL");

    /* Many puts stay bounded (64 slots): eviction frees what it drops. */
    for (int i = 0; i < 200; i++) {
        mh_manifest_t t = {0};
        char path[32];
        snprintf(path, sizeof path, "only_%d", i);
        mh_manifest_upsert(&t, path, (uint32_t)strlen(path), sid.s);
        mh_id_t tid;
        mh_manifest_id(&t, &tid);
        mh_hub_manifest_cache_put(&hub, tid.s, &t);
        mh_manifest_free(&t);
    }
    TAP_OK(1, "lru: 200 puts into 64 slots (eviction; leaks checked under ASan)");

    mh_manifest_free(&out);
    mh_manifest_free(&out2);
    mh_manifest_free(&out3);
    mh_arena_release(&a);
    mh_fetch_cache_free(&hub);
    TAP_OK(hub.fetch_cache == NULL, "caches freed");
    mh_fetch_cache_free(&hub); /* idempotent */
}

static void test_helpers(void)
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    const char *ids[] = {"sha256:aa", "sha256:bb"};
    TAP_EQ_STR(mh_pq_array(&a, ids, 2, 0), "{sha256:aa,sha256:bb}", "pg array");
    TAP_EQ_STR(mh_pq_array(&a, ids, 0, 0), "{}", "pg array: empty");
    mh_arena_release(&a);

    mh_id_t x, y;
    mh_blob_id("x", 1, &x);
    mh_blob_id("y", 1, &y);
    TAP_OK(mh_hash64(x.s, MH_ID_LEN) == mh_hash64(x.s, MH_ID_LEN) && mh_hash64(x.s, MH_ID_LEN) != mh_hash64(y.s, MH_ID_LEN), "id hash: stable, distinct");

    const char *tag = "\"sha256:abc\"";
    TAP_OK(mh__etag_matches(MH_STR("\"sha256:abc\""), tag), "etag: exact");
    TAP_OK(mh__etag_matches(MH_STR("W/\"sha256:abc\""), tag), "etag: weak");
    TAP_OK(mh__etag_matches(MH_STR("\"x\", \"sha256:abc\" "), tag), "etag: in a list");
    TAP_OK(mh__etag_matches(MH_STR("*"), tag), "etag: star");
    TAP_OK(!mh__etag_matches(MH_STR("\"sha256:abcd\""), tag), "etag: longer tag differs");
    TAP_OK(!mh__etag_matches(MH_STR("sha256:abc"), tag), "etag: unquoted differs");
    TAP_OK(!mh__etag_matches(MH_STR(""), tag), "etag: empty");
    TAP_OK(!mh__etag_matches(MH_STR(",,, ,"), tag), "etag: only separators");
    TAP_OK(!mh__etag_matches(MH_STR("W/"), tag), "etag: bare W/");
}

/* The answer cache: an answer is not returned past its expires_at, and a
 * newer record of the same key replaces it, whatever it says (a pruned
 * answer built again may name another pack). */
static void test_answers(void)
{
    mh_hub_t hub = {0};
    int64_t now = mh_unix_time();
    char sh[2 * MH_ID_SIZE] = {0};
    mh_id_t x;
    mh_blob_id("x", 1, &x);
    memcpy(sh, x.s, MH_ID_LEN);
    memcpy(sh + MH_ID_SIZE, x.s, MH_ID_LEN);
    mh__answer_t old = {.version = 2, .commits = 3, .expires_at = now - 1};
    memcpy(old.mpack_id, x.s, MH_ID_SIZE);
    mh__answer_put(&hub, "r|1|k", &old);
    TAP_OK(mh__answer_get(&hub, "r|1|k") == NULL, "answer: expired, not returned");

    mh__answer_t again = {.version = 2, .commits = 4, .shallow = sh, .nshallow = 2, .expires_at = now + 60};
    mh_id_t y;
    mh_blob_id("y", 1, &y);
    memcpy(again.mpack_id, y.s, MH_ID_SIZE);
    mh__answer_put(&hub, "r|1|k", &again);
    const mh__answer_t *got = mh__answer_get(&hub, "r|1|k");
    TAP_OK(got && strcmp(got->mpack_id, y.s) == 0 && got->commits == 4 && got->nshallow == 2 && got->shallow != sh &&
               memcmp(got->shallow, sh, sizeof sh) == 0,
           "answer: a newer record replaces an expired one naming another pack");

    mh__answer_t older = again;
    older.commits = 5;
    older.expires_at = now + 30;
    mh__answer_put(&hub, "r|1|k", &older);
    got = mh__answer_get(&hub, "r|1|k");
    TAP_OK(got && got->commits == 4 && got->expires_at == now + 60, "answer: an older record does not replace it");
    mh_fetch_cache_free(&hub);
}

int main(void)
{
    test_manifest_lru();
    test_helpers();
    test_answers();
    return tap_done();
}
