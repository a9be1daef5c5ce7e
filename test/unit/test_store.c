/*
 * test_store.c — unit tests of the object store front and its fs backend
 * (SPEC 3, 4.3 step 2): async ops on a real libuv loop against a temp
 * directory, key validation (path traversal), presigned URLs, streamed
 * uploads, the signing secret file, many ops in flight, close with ops in
 * flight, metrics.
 */
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "../../src/store/store_int.h"
#include "mh/store.h"
#include "storetest.h"
#include "tap.h"

static char root[64];

/* ------------------------------------------------------------- helpers */


static void pack_key(char *out, const void *data, size_t n)
{
    uint8_t d[32];
    char hex[65];
    mh_sha256(data, n, d);
    mh_hex_encode(hex, d, 32);
    snprintf(out, MH_STORE_KEY_MAX + 1, "mpacks/%s", hex);
}

static uint8_t *pattern(size_t n, uint32_t seed)
{
    uint8_t *p = malloc(n ? n : 1);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        p[i] = (uint8_t)x;
    }
    return p;
}

static bool file_exists(const char *rel)
{
    char p[256];
    struct stat st;
    snprintf(p, sizeof p, "%s/store/%s", root, rel);
    return stat(p, &st) == 0;
}

static int count_entries(const char *sub)
{
    char p[256];
    snprintf(p, sizeof p, "%s/store/%s", root, sub);
    DIR *d = opendir(p);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    if (d) closedir(d);
    return n;
}

static mh_store_t *open_store(const char *sub, const char *secret, const char *url)
{
    char spec[256];
    snprintf(spec, sizeof spec, "fs:%s/%s", root, sub);
    mh_store_config_t cfg = {.spec = spec, .public_url = url, .signing_secret = secret};
    mh_store_t *s = NULL;
    int rc = mh_store_open(loop, &cfg, &s);
    return rc == 0 ? s : NULL;
}

/* Splits a presigned URL into key and query (pointers into url). */
static void split_url(const char *url, mh_str_t *key, mh_str_t *query)
{
    const char *k = strstr(url, "/_store/");
    const char *q = k ? strchr(k, '?') : NULL;
    *key = (mh_str_t){k ? k + 8 : "", k && q ? (size_t)(q - k - 8) : 0};
    *query = (mh_str_t){q ? q + 1 : "", q ? strlen(q + 1) : 0};
}

/* --------------------------------------------------------------- tests */

static void test_open_specs(void)
{
    mh_store_t *s = NULL;
    mh_store_config_t cfg = {.spec = "s3:bucket"};
    TAP_EQ_INT(mh_store_open(loop, &cfg, &s), MH_EINVAL, "s3: refused until the s3 backend is built");
    cfg.spec = "fs:";
    TAP_EQ_INT(mh_store_open(loop, &cfg, &s), MH_EINVAL, "fs: without a directory refused");
    cfg.spec = "ftp:/x";
    TAP_EQ_INT(mh_store_open(loop, &cfg, &s), MH_EINVAL, "unknown backend refused");
    TAP_OK(s == NULL, "no store handed out on error");
}

static void test_keys(void)
{
    static const char *good[] = {
        "mpacks/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "incoming/a",
        "incoming/AZaz09_-",
        "incoming/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    };
    static const char *bad[] = {
        "",
        "mpacks/",
        "mpacks/0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
        "mpacks/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde",
        "mpacks/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0",
        "mpacks/../../../../../../../../../../../../../../../../../../etc/passwd",
        "incoming/",
        "incoming/..",
        "incoming/../mpacks/x",
        "incoming/a/b",
        "incoming/a.b",
        "incoming/%2e%2e",
        "incoming/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "../incoming/a",
        "/etc/passwd",
        ".signing-secret",
        "tmp/x",
        "fetch/x",
        "Incoming/a",
        "incoming//a",
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++)
        TAP_OK(mh_store_key_valid(good[i], strlen(good[i])), "key valid: %s", good[i]);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        TAP_OK(!mh_store_key_valid(bad[i], strlen(bad[i])), "key refused: '%s'", bad[i]);
    TAP_OK(!mh_store_key_valid("incoming/a\0b", 12), "key with NUL refused");
}

static void test_traversal(mh_store_t *s)
{
    static const char *bad[] = {"../../etc/passwd", "incoming/../.signing-secret", "tmp/x", "mpacks/../incoming/a",
                                ".signing-secret"};
    mh_arena_t a;
    mh_arena_init(&a, 0);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        mh_buf_t b = {0};
        uint64_t sz;
        int fd;
        char *url;
        const char *k = bad[i];
        TAP_EQ_INT(do_get(s, k, 0, UINT64_MAX, &b), MH_EINVAL, "get refuses traversal key (deferred cb)");
        TAP_EQ_INT(do_head(s, k, &sz), MH_EINVAL, "head refuses traversal key");
        TAP_EQ_INT(do_put(s, k, "x", 1), MH_EINVAL, "put refuses traversal key");
        TAP_EQ_INT(do_delete(s, k), MH_EINVAL, "delete refuses traversal key");
        TAP_EQ_INT(do_move(s, "incoming/a", k), MH_EINVAL, "move refuses traversal dst");
        TAP_EQ_INT(mh_store_fs_open_read(s, k, &fd, &sz), MH_EINVAL, "open_read refuses traversal key");
        TAP_EQ_INT(mh_store_presign(s, &a, "GET", k, 0, NULL, 60, &url), MH_EINVAL, "presign refuses traversal key");
        mh_str_t key = {k, strlen(k)};
        TAP_EQ_INT(mh_store_fs_check_url(s, "GET", key, MH_STR("X-Muse-Method=GET"), NULL, NULL), MH_EAUTH,
                   "check_url refuses traversal key");
    }
    mh_buf_t b = {0};
    TAP_EQ_INT(do_get(s, NULL, 0, 1, &b), MH_EINVAL, "NULL key refused");
    TAP_OK(file_exists(".signing-secret"), "secret still there");
    mh_arena_release(&a);
}

static void test_put_get_head(mh_store_t *s)
{
    size_t n = 200 * 1024 + 17;
    uint8_t *data = pattern(n, 1);
    char key[MH_STORE_KEY_MAX + 1];
    pack_key(key, data, n);
    mh_buf_t b = {0};
    uint64_t sz = 0;

    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), MH_ENOENT, "get absent -> ENOENT");
    TAP_OK(b.p == NULL, "no buffer on error");
    TAP_EQ_INT(do_head(s, key, &sz), MH_ENOENT, "head absent -> ENOENT");
    TAP_EQ_INT(do_put(s, key, data, n), 0, "put");
    TAP_EQ_INT(count_entries("tmp"), 0, "put leaves nothing in tmp/");
    TAP_EQ_INT(do_head(s, key, &sz), 0, "head");
    TAP_EQ_INT(sz, n, "head size");
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), 0, "get whole");
    TAP_OK(b.len == n && memcmp(b.p, data, n) == 0, "get whole bytes");
    mh_buf_free(&b);
    TAP_EQ_INT(do_get(s, key, 1000, 5000, &b), 0, "get range");
    TAP_OK(b.len == 5000 && memcmp(b.p, data + 1000, 5000) == 0, "get range bytes");
    mh_buf_free(&b);
    TAP_EQ_INT(do_get(s, key, n - 10, UINT64_MAX, &b), 0, "get tail");
    TAP_OK(b.len == 10 && memcmp(b.p, data + n - 10, 10) == 0, "get tail bytes");
    mh_buf_free(&b);
    TAP_EQ_INT(do_get(s, key, n, UINT64_MAX, &b), 0, "get at end -> empty");
    TAP_EQ_INT(b.len, 0, "empty");
    mh_buf_free(&b);
    TAP_EQ_INT(do_get(s, key, n - 10, 11, &b), MH_EINVAL, "range past the end -> EINVAL");
    TAP_EQ_INT(do_get(s, key, n + 1, UINT64_MAX, &b), MH_EINVAL, "offset past the end -> EINVAL");
    TAP_EQ_INT(do_get(s, key, 1, UINT64_MAX - 1, &b), MH_EINVAL, "overflowing range -> EINVAL");

    /* Overwriting a content-addressed key the server built is allowed. */
    TAP_EQ_INT(do_put(s, key, data, n), 0, "put again (same bytes)");
    TAP_EQ_INT(do_put(s, "incoming/empty", "", 0), 0, "put empty object");
    TAP_EQ_INT(do_head(s, "incoming/empty", &sz), 0, "head empty");
    TAP_EQ_INT(sz, 0, "empty size");

    int fd = -1;
    TAP_EQ_INT(mh_store_fs_open_read(s, key, &fd, &sz), 0, "open_read");
    TAP_EQ_INT(sz, n, "open_read size");
    uint8_t *back = malloc(n);
    TAP_OK(fd >= 0 && pread(fd, back, n, 0) == (ssize_t)n && memcmp(back, data, n) == 0, "open_read bytes");
    if (fd >= 0) close(fd);
    TAP_EQ_INT(mh_store_fs_open_read(s, "incoming/nope", &fd, &sz), MH_ENOENT, "open_read absent");
    TAP_EQ_INT(fd, -1, "no fd on error");
    free(back);
    free(data);
}

static void check_ranges(mh_store_t *s, const char *key, const uint8_t *data, const mh_range_t *rg, size_t n,
                         const char *name)
{
    mh_buf_t b = {0}, want = {0};
    for (size_t i = 0; i < n; i++) mh_buf_append(&want, data + rg[i].off, (size_t)rg[i].len);
    int rc = do_ranges(s, key, rg, n, &b);
    TAP_EQ_INT(rc, 0, name);
    TAP_OK(b.len == want.len && (b.len == 0 || memcmp(b.p, want.p, b.len) == 0), "%s: bytes (%zu)", name, b.len);
    mh_buf_free(&b);
    mh_buf_free(&want);
}

static void test_ranges(mh_store_t *s)
{
    size_t n = 12u * 1024 * 1024 + 333;
    uint8_t *data = pattern(n, 2);
    char key[MH_STORE_KEY_MAX + 1];
    pack_key(key, data, n);
    TAP_EQ_INT(do_put(s, key, data, n), 0, "put 12 MiB pack");

    mh_range_t sorted_adjacent[] = {{0, 10}, {10, 20}, {30, 5}, {35, 100}};
    check_ranges(s, key, data, sorted_adjacent, 4, "adjacent sorted ranges");
    mh_range_t unsorted[] = {{5000000, 70}, {100, 10}, {0, 50}, {200000, 3}, {110, 40}, {n - 7, 7}, {150, 0}};
    check_ranges(s, key, data, unsorted, 7, "unsorted ranges, some adjacent, some far");
    mh_range_t overlapping[] = {{1000, 500}, {1200, 500}, {1000, 500}, {999, 2}};
    check_ranges(s, key, data, overlapping, 4, "overlapping and repeated ranges");
    mh_range_t big[] = {{1, 9u * 1024 * 1024}, {0, 4}, {9u * 1024 * 1024 + 10, 100}, {n - 1, 1}};
    check_ranges(s, key, data, big, 4, "a range longer than one run");
    mh_range_t gaps[64];
    for (size_t i = 0; i < 64; i++) gaps[63 - i] = (mh_range_t){i * 150000, 1000 + i};
    check_ranges(s, key, data, gaps, 64, "64 ranges in reverse order with 150 KB strides");
    check_ranges(s, key, data, NULL, 0, "no ranges -> empty");

    mh_buf_t b = {0};
    mh_range_t oob[] = {{0, 1}, {n - 1, 2}};
    TAP_EQ_INT(do_ranges(s, key, oob, 2, &b), MH_EINVAL, "range past the end -> EINVAL");
    TAP_OK(b.p == NULL, "no buffer on error");
    TAP_EQ_INT(do_ranges(s, "incoming/nope", oob, 1, &b), MH_ENOENT, "ranges of absent key -> ENOENT");
    TAP_EQ_INT(do_delete(s, key), 0, "delete big pack");
    free(data);
}

static void test_move_delete(mh_store_t *s)
{
    const char *bytes = "some pack bytes";
    char key[MH_STORE_KEY_MAX + 1];
    pack_key(key, bytes, strlen(bytes));
    mh_buf_t b = {0};
    uint64_t sz;

    TAP_EQ_INT(do_put(s, "incoming/m1", bytes, strlen(bytes)), 0, "stage incoming/m1");
    TAP_EQ_INT(do_move(s, "incoming/m1", key), 0, "move to mpacks/");
    TAP_EQ_INT(do_head(s, "incoming/m1", &sz), MH_ENOENT, "src gone after move");
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), 0, "dst readable");
    TAP_OK(b.len == strlen(bytes) && memcmp(b.p, bytes, b.len) == 0, "dst bytes");
    mh_buf_free(&b);

    TAP_EQ_INT(do_put(s, "incoming/m2", bytes, strlen(bytes)), 0, "stage same bytes again");
    TAP_EQ_INT(do_move(s, "incoming/m2", key), 0, "move onto existing key succeeds");
    TAP_EQ_INT(do_head(s, "incoming/m2", &sz), MH_ENOENT, "src dropped");
    TAP_EQ_INT(do_head(s, key, &sz), 0, "dst still there");
    TAP_EQ_INT(sz, strlen(bytes), "dst size intact");

    TAP_EQ_INT(do_move(s, "incoming/m3", key), MH_ENOENT, "move of absent src -> ENOENT");
    TAP_EQ_INT(do_move(s, key, key), 0, "move onto itself keeps it");
    TAP_EQ_INT(do_head(s, key, &sz), 0, "still there after self-move");
    TAP_EQ_INT(do_move(s, "../x", key), MH_EINVAL, "move bad src -> EINVAL");

    TAP_EQ_INT(do_delete(s, key), 0, "delete");
    TAP_EQ_INT(do_head(s, key, &sz), MH_ENOENT, "gone after delete");
    TAP_EQ_INT(do_delete(s, key), 0, "delete absent succeeds");
}

typedef struct {
    int done, ok;
    const uint8_t *want;
    size_t wlen;
} many_t;

static void many_cb(void *ud, int err, mh_buf_t *d)
{
    many_t *m = ud;
    m->done++;
    if (!err && d->len == m->wlen && memcmp(d->p, m->want, m->wlen) == 0) m->ok++;
    if (d) mh_buf_free(d);
}

static void test_concurrent(mh_store_t *s)
{
    enum { N = 100, NK = 5 };
    uint8_t *data[NK];
    char keys[NK][MH_STORE_KEY_MAX + 1];
    size_t len[NK];
    for (int k = 0; k < NK; k++) {
        len[k] = 10000 + 7919 * (size_t)k;
        data[k] = pattern(len[k], 100 + (uint32_t)k);
        pack_key(keys[k], data[k], len[k]);
        do_put(s, keys[k], data[k], len[k]);
    }
    many_t m[N];
    for (int i = 0; i < N; i++) {
        m[i] = (many_t){0, 0, data[i % NK] + i, len[i % NK] - (size_t)i};
        mh_store_get(s, keys[i % NK], (uint64_t)i, UINT64_MAX, many_cb, &m[i]);
    }
    int done = 0, ok = 0, twice = 0;
    uv_run(loop, UV_RUN_DEFAULT);
    for (int i = 0; i < N; i++) {
        done += m[i].done == 1;
        ok += m[i].ok;
        twice += m[i].done > 1;
    }
    TAP_EQ_INT(done, N, "100 gets in flight: every callback once");
    TAP_EQ_INT(twice, 0, "no callback twice");
    TAP_EQ_INT(ok, N, "100 gets in flight: right bytes");
    for (int k = 0; k < NK; k++) free(data[k]);
}

static void test_presign(mh_store_t *s)
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    uint8_t sha[32], got_sha[32];
    mh_sha256("x", 1, sha);
    char *url = NULL;
    mh_str_t key, q;
    uint64_t size = 0;
    const char *k = "incoming/Up_load-1";

    TAP_EQ_INT(mh_store_presign(s, &a, "PUT", k, 12345, sha, 3600, &url), 0, "presign PUT");
    static const char want_prefix[] =
        "http://127.0.0.1:1337/_store/incoming/Up_load-1?X-Muse-Method=PUT&X-Muse-Expires=";
    TAP_OK(url && strncmp(url, want_prefix, sizeof want_prefix - 1) == 0,
           "PUT URL shape (trailing slash of public URL dropped)");
    TAP_OK(url && strstr(url, "&X-Muse-Size=12345&X-Muse-Sha256=") && strstr(url, "&X-Muse-Signature="),
           "PUT URL binds size and sha256");
    split_url(url, &key, &q);
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, q, &size, got_sha), 0, "PUT URL verifies");
    TAP_EQ_INT(size, 12345, "size from URL");
    TAP_OK(memcmp(sha, got_sha, 32) == 0, "sha256 from URL");
    TAP_EQ_INT(mh_store_fs_check_url(s, "GET", key, q, NULL, NULL), MH_EAUTH, "PUT URL used for GET refused");

    /* Tampering with any signed part. */
    char *t = mh_strdup(&a, q.p);
    char *sig = strstr(t, "X-Muse-Signature=") + 17;
    sig[0] = sig[0] == '0' ? '1' : '0';
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, (mh_str_t){t, strlen(t)}, NULL, NULL), MH_EAUTH,
               "tampered signature refused");
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", MH_STR("incoming/Up_load-2"), q, NULL, NULL), MH_EAUTH,
               "other key refused");
    t = mh_strdup(&a, q.p);
    char *szp = strstr(t, "X-Muse-Size=") + 12;
    szp[0] = '2';
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, (mh_str_t){t, strlen(t)}, NULL, NULL), MH_EAUTH,
               "tampered size refused");
    t = mh_strdup(&a, q.p);
    char *shp = strstr(t, "X-Muse-Sha256=") + 14;
    shp[5] = shp[5] == 'a' ? 'b' : 'a';
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, (mh_str_t){t, strlen(t)}, NULL, NULL), MH_EAUTH,
               "tampered sha256 refused");
    t = mh_strdup(&a, q.p);
    char *exp = strstr(t, "X-Muse-Expires=") + 15;
    exp[9] = exp[9] == '9' ? '8' : (char)(exp[9] + 1);
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, (mh_str_t){t, strlen(t)}, NULL, NULL), MH_EAUTH,
               "tampered expiry refused");
    t = mh_sprintf(&a, "%s&X-Muse-Size=1", q.p);
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, (mh_str_t){t, strlen(t)}, NULL, NULL), MH_EAUTH,
               "repeated parameter refused");
    t = mh_sprintf(&a, "%s&x=1", q.p);
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, (mh_str_t){t, strlen(t)}, NULL, NULL), MH_EAUTH,
               "unknown parameter refused");
    t = mh_sprintf(&a, "%s&", q.p);
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, (mh_str_t){t, strlen(t)}, NULL, NULL), MH_EAUTH,
               "trailing & refused");
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, (mh_str_t){q.p, q.n - 1}, NULL, NULL), MH_EAUTH,
               "truncated signature refused");
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, MH_STR(""), NULL, NULL), MH_EAUTH, "no query refused");
    TAP_EQ_INT(mh_store_fs_check_url(s, "DELETE", key, q, NULL, NULL), MH_EAUTH, "other method refused");

    /* GET URLs carry no size/sha. */
    const char *pk = "mpacks/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    TAP_EQ_INT(mh_store_presign(s, &a, "GET", pk, 0, NULL, 60, &url), 0, "presign GET");
    TAP_OK(!strstr(url, "X-Muse-Size") && !strstr(url, "X-Muse-Sha256"), "GET URL has no size/sha");
    split_url(url, &key, &q);
    size = 7;
    TAP_EQ_INT(mh_store_fs_check_url(s, "GET", key, q, &size, got_sha), 0, "GET URL verifies");
    TAP_EQ_INT(size, 0, "GET size 0");
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", key, q, NULL, NULL), MH_EAUTH, "GET URL used for PUT refused");
    t = mh_sprintf(&a, "%s&X-Muse-Size=0", q.p);
    TAP_EQ_INT(mh_store_fs_check_url(s, "GET", key, (mh_str_t){t, strlen(t)}, NULL, NULL), MH_EAUTH,
               "GET URL with a size refused");

    /* ttl clamps. */
    TAP_EQ_INT(mh_store_presign(s, &a, "GET", pk, 0, NULL, 100000000, &url), 0, "presign huge ttl");
    long long e = atoll(strstr(url, "X-Muse-Expires=") + 15);
    TAP_OK(e <= mh_unix_time() + 604800 && e >= mh_unix_time() + 604790, "ttl clamped to 7 days");
    TAP_EQ_INT(mh_store_presign(s, &a, "DELETE", pk, 0, NULL, 60, &url), MH_EINVAL, "presign DELETE refused");
    TAP_EQ_INT(mh_store_presign(s, &a, "PUT", k, 1, NULL, 60, &url), MH_EINVAL, "presign PUT without sha refused");
    mh_arena_release(&a);
}

/* With a known secret, forge URLs by the documented canonical string:
 * checks the format independently, and lets us make expired URLs. */
static void test_expiry(void)
{
    const char *secret = "unit-test-secret-unit-test-secret";
    mh_store_t *s = open_store("store", secret, "http://h");
    TAP_OK(s != NULL, "open with configured secret");
    if (!s) return;
    char canon[256], sig[65], q[512];
    uint8_t mac[32];
    const char *k = "incoming/exp";
    const char *sha = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
    long long exps[] = {(long long)mh_unix_time() - 5, (long long)mh_unix_time() + 100};
    for (int i = 0; i < 2; i++) {
        snprintf(canon, sizeof canon, "PUT\n%s\n%lld\n%d\n%s", k, exps[i], 1, sha);
        mh_hmac_sha256(secret, strlen(secret), canon, strlen(canon), mac);
        mh_hex_encode(sig, mac, 32);
        snprintf(q, sizeof q,
                 "X-Muse-Method=PUT&X-Muse-Expires=%lld&X-Muse-Size=1&X-Muse-Sha256=%s&X-Muse-Signature=%s", exps[i],
                 sha, sig);
        int rc = mh_store_fs_check_url(s, "PUT", (mh_str_t){k, strlen(k)}, (mh_str_t){q, strlen(q)}, NULL, NULL);
        if (i == 0) TAP_EQ_INT(rc, MH_ETIMEDOUT, "expired URL refused");
        else TAP_EQ_INT(rc, 0, "URL forged from the documented canonical string verifies");
    }
    /* Parameter order is free, but each must appear once. */
    snprintf(q, sizeof q, "X-Muse-Signature=%s&X-Muse-Sha256=%s&X-Muse-Size=1&X-Muse-Expires=%lld&X-Muse-Method=PUT",
             sig, sha, exps[1]);
    TAP_EQ_INT(mh_store_fs_check_url(s, "PUT", (mh_str_t){k, strlen(k)}, (mh_str_t){q, strlen(q)}, NULL, NULL), 0,
               "parameters in another order verify");
    mh_store_close(s);
}

static void test_secret(mh_store_t *s)
{
    char p[256];
    struct stat st;
    snprintf(p, sizeof p, "%s/store/.signing-secret", root);
    TAP_OK(stat(p, &st) == 0, "secret file created");
    TAP_EQ_INT(st.st_mode & 0777, 0600, "secret file mode 0600");
    char before[128] = {0}, after[128] = {0};
    FILE *f = fopen(p, "r");
    size_t n = f ? fread(before, 1, sizeof before - 1, f) : 0;
    if (f) fclose(f);
    TAP_EQ_INT(n, 65, "secret is 64 hex + newline");

    mh_store_t *s2 = open_store("store", NULL, "http://127.0.0.1:1337");
    TAP_OK(s2 != NULL, "second store on the same dir");
    f = fopen(p, "r");
    if (f) {
        if (fread(after, 1, sizeof after - 1, f)) {}
        fclose(f);
    }
    TAP_EQ_STR(after, before, "secret file reused, not rewritten");

    mh_arena_t a;
    mh_arena_init(&a, 0);
    char *url;
    mh_str_t key, q;
    uint8_t sha[32] = {1};
    mh_store_presign(s, &a, "PUT", "incoming/shared", 5, sha, 60, &url);
    split_url(url, &key, &q);
    TAP_EQ_INT(mh_store_fs_check_url(s2, "PUT", key, q, NULL, NULL), 0, "URL of one process verifies in another");
    mh_store_t *s3 = open_store("store", "another-secret-another-secret-xx", "http://h");
    TAP_EQ_INT(mh_store_fs_check_url(s3, "PUT", key, q, NULL, NULL), MH_EAUTH, "other secret refuses it");
    mh_store_close(s3);
    mh_store_close(s2);
    mh_arena_release(&a);
}

/* Opens an upload of `declared` bytes hashing to sha and writes n bytes
 * of data in 4 KiB pieces without waiting (as the HTTP route does while
 * the writer has room); *write_rc gets the first error. */
static mh_store_writer_t *start_upload(mh_store_t *s, const char *key, const uint8_t *data, size_t n, size_t declared,
                                       const uint8_t *sha, int *write_rc)
{
    mh_store_writer_t *u = NULL;
    int rc = mh_store_fs_upload_open(s, key, declared, sha, &u);
    if (rc != 0) {
        *write_rc = rc;
        return NULL;
    }
    *write_rc = 0;
    for (size_t off = 0; off < n && *write_rc == 0; off += 4096) {
        *write_rc = mh_store_writer_write(u, data + off, n - off < 4096 ? n - off : 4096, NULL, NULL);
        if (*write_rc == 0 && mh_store_writer_full(u)) {
            res_t r = {0};
            *write_rc = mh_store_writer_write(u, NULL, 0, done_cb, &r);
            if (*write_rc == 0) {
                wait_for(&r);
                *write_rc = r.err;
            }
        }
    }
    return u;
}

static void test_upload(mh_store_t *s)
{
    size_t n = 3 * 1024 * 1024 + 300000; /* several 1 MiB chunks: the full/drain path runs */
    uint8_t *data = pattern(n, 7), sha[32], bad[32];
    mh_sha256(data, n, sha);
    memcpy(bad, sha, 32);
    bad[0] ^= 1;
    int wrc;
    mh_buf_t b = {0};
    uint64_t sz;
    wres_t f;

    mh_store_writer_t *u = start_upload(s, "incoming/good", data, n, n, sha, &wrc);
    TAP_OK(u && wrc == 0, "upload writes");
    TAP_EQ_INT(count_entries("tmp"), 1, "upload in progress lives in tmp/");
    TAP_OK(!file_exists("incoming/good"), "key not visible before finish");
    TAP_EQ_INT(u ? finish_writer(u, NULL, &f) : -1, 0, "upload finish");
    TAP_OK(f.has_sha && memcmp(f.sha, sha, 32) == 0 && f.size == n, "finish reports hash and size");
    TAP_EQ_INT(do_get(s, "incoming/good", 0, UINT64_MAX, &b), 0, "uploaded key readable");
    TAP_OK(b.len == n && memcmp(b.p, data, n) == 0, "uploaded bytes kept");
    mh_buf_free(&b);
    TAP_EQ_INT(count_entries("tmp"), 0, "tmp/ empty after finish");

    u = NULL;
    TAP_EQ_INT(mh_store_fs_upload_open(s, "incoming/good", n, sha, &u), MH_EEXIST, "upload onto existing key refused");
    TAP_OK(u == NULL, "no upload handle");
    TAP_EQ_INT(mh_store_fs_upload_open(s, "mpacks/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                                       n, sha, &u),
               MH_EINVAL, "upload to a final key refused");
    TAP_EQ_INT(mh_store_fs_upload_open(s, "incoming/../x", n, sha, &u), MH_EINVAL, "upload traversal key refused");

    u = start_upload(s, "incoming/badhash", data, n, n, bad, &wrc);
    TAP_EQ_INT(u ? finish_writer(u, NULL, &f) : -1, MH_EHASH, "wrong hash -> EHASH");
    TAP_OK(!file_exists("incoming/badhash"), "wrong hash: nothing in incoming/");
    TAP_EQ_INT(count_entries("tmp"), 0, "wrong hash: nothing in tmp/");

    u = start_upload(s, "incoming/long", data, n, n - 1, sha, &wrc);
    TAP_EQ_INT(wrc, MH_ELIMIT, "too long -> ELIMIT on write");
    TAP_EQ_INT(u ? mh_store_writer_write(u, "x", 1, NULL, NULL) : -1, MH_ELIMIT, "error is sticky");
    TAP_OK(u && finish_writer(u, NULL, &f) == MH_ELIMIT, "too long: finish fails with it");
    TAP_OK(!file_exists("incoming/long"), "too long: nothing in incoming/");
    TAP_EQ_INT(count_entries("tmp"), 0, "too long: nothing in tmp/");

    u = start_upload(s, "incoming/short", data, n - 1, n, sha, &wrc);
    TAP_EQ_INT(u ? finish_writer(u, NULL, &f) : -1, MH_EHASH, "too short -> EHASH");
    TAP_OK(!file_exists("incoming/short"), "too short: nothing in incoming/");
    TAP_EQ_INT(count_entries("tmp"), 0, "too short: nothing in tmp/");

    u = start_upload(s, "incoming/aborted", data, 2 * 1024 * 1024 + 10, n, sha, &wrc);
    TAP_EQ_INT(count_entries("tmp"), 1, "abort: a temporary file was being written");
    mh_store_writer_abort(u);
    uv_run(loop, UV_RUN_DEFAULT);
    TAP_OK(!file_exists("incoming/aborted"), "abort: nothing in incoming/");
    TAP_EQ_INT(count_entries("tmp"), 0, "abort: nothing in tmp/");

    /* Two uploads racing for one key: the second finish must not replace. */
    mh_store_writer_t *u1 = start_upload(s, "incoming/race", data, n, n, sha, &wrc);
    mh_store_writer_t *u2 = start_upload(s, "incoming/race", data, n, n, sha, &wrc);
    TAP_OK(u1 && u2, "two uploads to one key opened");
    TAP_EQ_INT(finish_writer(u1, NULL, &f), 0, "first finish wins");
    TAP_EQ_INT(finish_writer(u2, NULL, &f), MH_EEXIST, "second finish -> EEXIST, no overwrite");
    TAP_EQ_INT(count_entries("tmp"), 0, "race: nothing in tmp/");
    TAP_EQ_INT(do_head(s, "incoming/race", &sz), 0, "race: the first upload kept");

    /* An empty upload. */
    uint8_t esha[32];
    mh_sha256("", 0, esha);
    u = start_upload(s, "incoming/empty-up", data, 0, 0, esha, &wrc);
    TAP_EQ_INT(u ? finish_writer(u, NULL, &f) : -1, 0, "empty upload");
    TAP_EQ_INT(do_head(s, "incoming/empty-up", &sz), 0, "empty upload kept");
    TAP_EQ_INT(sz, 0, "empty upload is empty");
    u = start_upload(s, "incoming/keyed", data, 10, 10, sha, &wrc);
    TAP_EQ_INT(u ? finish_writer(u, "mpacks/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", &f) : -1,
               MH_EINVAL, "an upload's key cannot be changed at finish");
    TAP_EQ_INT(count_entries("tmp"), 0, "nothing left in tmp/");
    free(data);
}

/* The streaming writer (store.h): multi-chunk objects with and without
 * the store hashing, a given key, a wrong key, an existing key, abort at
 * several points, the room callback, errors. */
static void test_writer(mh_store_t *s)
{
    size_t n = 9u * 1024 * 1024 + 12345;
    uint8_t *data = pattern(n, 41), sha[32];
    mh_sha256(data, n, sha);
    char key[MH_STORE_KEY_MAX + 1];
    pack_key(key, data, n);
    wres_t f;
    mh_buf_t b = {0};
    uint64_t sz;

    TAP_EQ_INT(mh_store_writer_mem(s, NULL), 8u * 1024 * 1024, "fs writer holds two 4 MiB chunks");
    mh_store_writer_opts_t o64 = {.chunk_bytes = 64u * 1024 * 1024 + 1};
    mh_store_writer_t *w = NULL;
    TAP_EQ_INT(mh_store_writer_open(s, &o64, &w), MH_EINVAL, "chunk above 64 MiB refused");

    TAP_EQ_INT(stream_object(s, true, 1024 * 1024, data, n, 300000, NULL, &f), 0, "hashing writer, 1 MiB chunks");
    TAP_OK(f.has_sha && memcmp(f.sha, sha, 32) == 0 && f.size == n, "writer's SHA-256 and size");
    TAP_EQ_INT(do_get(s, key, 0, UINT64_MAX, &b), 0, "object under mpacks/<its hash>");
    TAP_OK(b.len == n && memcmp(b.p, data, n) == 0, "the bytes");
    mh_buf_free(&b);
    TAP_EQ_INT(count_entries("tmp"), 0, "nothing left in tmp/");

    TAP_EQ_INT(stream_object(s, true, 0, data, n, 5u * 1024 * 1024, key, &f), 0,
               "existing key with the same bytes: success, ours dropped");
    TAP_EQ_INT(count_entries("tmp"), 0, "nothing left in tmp/ (dropped)");
    TAP_EQ_INT(stream_object(s, false, 0, data, n, 777777, key, &f), 0, "caller-hashed writer naming its key");
    TAP_OK(!f.has_sha && f.size == n, "no hash reported when the caller hashes");
    char other[MH_STORE_KEY_MAX + 1];
    pack_key(other, "other", 5);
    TAP_EQ_INT(stream_object(s, true, 0, data, 1000, 1000, other, &f), MH_EHASH, "a key that is not the hash: EHASH");
    TAP_EQ_INT(do_head(s, other, &sz), MH_ENOENT, "nothing kept under the wrong key");
    TAP_EQ_INT(stream_object(s, false, 0, data, 1000, 1000, NULL, &f), MH_EINVAL, "no key and no hash: EINVAL");
    TAP_EQ_INT(stream_object(s, true, 0, data, 10, 10, "incoming/x", &f), MH_EINVAL, "a staging key refused");
    TAP_EQ_INT(count_entries("tmp"), 0, "failed finishes leave nothing in tmp/");

    /* Empty object. */
    char ekey[MH_STORE_KEY_MAX + 1];
    pack_key(ekey, "", 0);
    TAP_EQ_INT(stream_object(s, true, 0, data, 0, 1, NULL, &f), 0, "empty object");
    TAP_EQ_INT(do_head(s, ekey, &sz), 0, "empty object stored under the empty hash");
    TAP_EQ_INT(do_delete(s, ekey), 0, "delete it");

    /* Backpressure: a write without a callback may run ahead; the room
     * callback fires once the filling chunk has room again. */
    mh_store_writer_opts_t o = {.hash = true, .chunk_bytes = 1024 * 1024};
    TAP_EQ_INT(mh_store_writer_open(s, &o, &w), 0, "open");
    TAP_EQ_INT(mh_store_writer_write(w, data, 1024 * 1024, NULL, NULL), 0, "write a chunk (no cb): it goes to the pool");
    TAP_OK(!mh_store_writer_full(w), "not full: the filling chunk is empty");
    TAP_EQ_INT(mh_store_writer_write(w, data, 1024 * 1024 + 5, NULL, NULL), 0, "write another while it is written");
    TAP_OK(mh_store_writer_full(w), "full: both chunks taken");
    res_t r1 = {0}, r2 = {0};
    CALL(TAP_EQ_INT(mh_store_writer_write(w, NULL, 0, done_cb, &r1), 0, "wait for room"));
    TAP_EQ_INT(mh_store_writer_write(w, NULL, 0, done_cb, &r2), MH_EINVAL, "a second outstanding callback refused");
    wait_for(&r1);
    TAP_OK(r1.done == 1 && r1.err == 0 && !r1.reentrant, "room callback on a later turn");
    TAP_EQ_INT(mh_store_writer_size(w), 2u * 1024 * 1024 + 5, "size counts accepted bytes");
    /* Abort with a chunk on the thread pool: no callback after, no file left. */
    TAP_EQ_INT(mh_store_writer_write(w, data, 1024 * 1024, done_cb, &r2), 0, "write with a callback");
    mh_store_writer_abort(w);
    uv_run(loop, UV_RUN_DEFAULT);
    TAP_EQ_INT(r2.done, 0, "abort: the outstanding callback never fires");
    TAP_EQ_INT(count_entries("tmp"), 0, "abort: the temporary file is gone");

    /* Abort before any I/O, and right after open. */
    TAP_EQ_INT(mh_store_writer_open(s, &o, &w), 0, "open");
    mh_store_writer_abort(w);
    TAP_EQ_INT(mh_store_writer_open(s, &o, &w), 0, "open");
    mh_store_writer_write(w, data, 100, NULL, NULL);
    mh_store_writer_abort(w);
    uv_run(loop, UV_RUN_DEFAULT);
    TAP_EQ_INT(count_entries("tmp"), 0, "early aborts leave nothing");
    TAP_EQ_INT(do_delete(s, key), 0, "clean up");
    free(data);
}

/* The streaming reader: sequential windows, read-ahead, ranges with
 * coalescing and splitting, errors, close inside a callback. */
static void test_reader(mh_store_t *s)
{
    size_t n = 5u * 1024 * 1024 + 4321;
    uint8_t *data = pattern(n, 43);
    char key[MH_STORE_KEY_MAX + 1];
    pack_key(key, data, n);
    TAP_EQ_INT(do_put(s, key, data, n), 0, "put 5 MiB");
    rdrive_t d = {0};

    TAP_EQ_INT(read_seq(s, key, 0, UINT64_MAX, 1024 * 1024, &d), 0, "sequential read, 1 MiB windows");
    TAP_OK(d.all.len == n && memcmp(d.all.p, data, n) == 0, "every byte, in order");
    TAP_EQ_INT(d.windows, 6, "six windows");
    TAP_OK(d.max_window <= 1024 * 1024 && d.size == n, "windows bounded; size reported");
    rdrive_free(&d);
    TAP_EQ_INT(read_seq(s, key, 1000, 3u * 1024 * 1024, 0, &d), 0, "a range in default (4 MiB) windows");
    TAP_OK(d.all.len == 3u * 1024 * 1024 && memcmp(d.all.p, data + 1000, d.all.len) == 0 && d.windows == 1,
           "one window of the range");
    rdrive_free(&d);
    TAP_EQ_INT(read_seq(s, key, n, UINT64_MAX, 0, &d), 0, "empty tail");
    TAP_OK(d.windows == 1 && d.all.len == 0 && d.last_seen, "one empty last window");
    rdrive_free(&d);
    TAP_EQ_INT(read_seq(s, key, n - 10, 11, 0, &d), MH_EINVAL, "range past the end: EINVAL");
    rdrive_free(&d);
    TAP_EQ_INT(read_seq(s, "incoming/none", 0, UINT64_MAX, 0, &d), MH_ENOENT, "absent key: ENOENT");
    rdrive_free(&d);
    TAP_EQ_INT(read_seq(s, "../x", 0, UINT64_MAX, 0, &d), MH_EINVAL, "bad key: EINVAL");
    rdrive_free(&d);
    d.close_after = 2;
    TAP_EQ_INT(read_seq(s, key, 0, UINT64_MAX, 64 * 1024, &d), 0, "close inside the second window's callback");
    TAP_OK(d.windows == 2 && d.closed, "nothing delivered after close");
    rdrive_free(&d);
    uv_run(loop, UV_RUN_DEFAULT); /* the read ahead in flight completes and is dropped */

    mh_range_t rg[] = {
        {10, 20},           {40, 5},    {60000, 10}, /* one run: gaps < 64 KiB */
        {50, 10},                                     /* back, but inside the run: joins it */
        {2000000, 2500000},                           /* split over 1 MiB windows */
        {n - 1, 1},         {n - 1, 0}, {3, 0},
    };
    size_t nrg = sizeof rg / sizeof *rg;
    TAP_EQ_INT(read_ranges(s, key, rg, nrg, 1024 * 1024, &d), 0, "ranged read");
    TAP_OK(ranges_match(&d, data, rg, nrg), "every range whole, in the caller's order");
    TAP_EQ_INT(d.windows, 6, "6 windows: 4 ranges coalesced, 3 of a split range, the tail, one going back before the run");
    TAP_OK(d.max_window <= 1024 * 1024, "no window above 1 MiB");
    rdrive_free(&d);
    TAP_EQ_INT(read_ranges(s, key, NULL, 0, 0, &d), 0, "no ranges");
    TAP_OK(d.windows == 1 && d.last_seen, "one empty window");
    rdrive_free(&d);
    mh_range_t oob[] = {{0, 1}, {n, 1}};
    TAP_EQ_INT(read_ranges(s, key, oob, 2, 0, &d), MH_EINVAL, "a range outside the object: EINVAL");
    rdrive_free(&d);
    mh_store_reader_t *r = NULL;
    TAP_EQ_INT(mh_store_reader_open_ranges(s, key, NULL, 2, 0, rwin_cb, &d, &r), MH_EINVAL, "NULL ranges refused");
    TAP_EQ_INT(mh_store_reader_mem(0), 8u * 1024 * 1024, "a default reader holds two 4 MiB windows");
    TAP_EQ_INT(do_delete(s, key), 0, "clean up");
    free(data);
}

static void test_list_and_sweep(mh_store_t *s)
{
    static lres_t l;
    char k[MH_STORE_KEY_MAX + 1];
    for (int i = 0; i < 1203; i++) {
        snprintf(k, sizeof k, "incoming/L%04d", i);
        do_put(s, k, "x", (size_t)(i % 3));
    }
    size_t total = 0, pages = 0;
    bool sorted = true, sizes = true;
    char after[80] = "";
    char prev[80] = "";
    int rc;
    do {
        rc = do_list(s, "incoming/", after[0] ? after : NULL, &l);
        pages++;
        for (size_t i = 0; i < l.n; i++) {
            if (strcmp(l.keys[i], prev) <= 0) sorted = false;
            snprintf(prev, sizeof prev, "%s", l.keys[i]);
            if (!strncmp(l.keys[i], "incoming/L", 10) && l.sizes[i] != (uint64_t)(atoi(l.keys[i] + 10) % 3))
                sizes = false;
            total += !strncmp(l.keys[i], "incoming/L", 10);
        }
        snprintf(after, sizeof after, "%s", l.next);
    } while (rc == 0 && l.has_next);
    TAP_EQ_INT(rc, 0, "list incoming/ page by page");
    TAP_EQ_INT(total, 1203, "every key listed once");
    TAP_OK(pages == 2 && sorted && sizes, "two pages, ascending, sizes right");
    TAP_EQ_INT(do_list(s, "tmp/", NULL, &l), MH_EINVAL, "tmp/ is not listable");
    TAP_EQ_INT(do_list(s, "mpacks/", "mpacks/ffff", &l), 0, "list after the last key");
    TAP_OK(l.n == 0 && !l.has_next, "empty page, no next");
    for (int i = 0; i < 1203; i++) {
        snprintf(k, sizeof k, "incoming/L%04d", i);
        do_delete(s, k);
    }

    char p[256];
    snprintf(p, sizeof p, "%s/store/tmp/w-old", root);
    int fd = open(p, O_CREAT | O_WRONLY, 0644);
    if (fd >= 0) close(fd);
    struct timespec old[2] = {{.tv_sec = mh_unix_time() - 100}, {.tv_sec = mh_unix_time() - 100}};
    utimensat(AT_FDCWD, p, old, 0);
    snprintf(p, sizeof p, "%s/store/tmp/w-new", root);
    fd = open(p, O_CREAT | O_WRONLY, 0644);
    if (fd >= 0) close(fd);
    unsigned removed = 0;
    TAP_EQ_INT(do_sweep_tmp(s, 60, &removed), 0, "sweep tmp/");
    TAP_EQ_INT(removed, 1, "one stale temporary removed");
    TAP_OK(!file_exists("tmp/w-old") && file_exists("tmp/w-new"), "the young one kept");
    unlink(p);
}

static void test_close_in_flight(void)
{
    mh_store_t *s = open_store("store", NULL, NULL);
    TAP_OK(s != NULL, "open without public URL");
    if (!s) return;
    mh_arena_t a;
    mh_arena_init(&a, 0);
    char *url;
    TAP_EQ_INT(mh_store_presign(s, &a, "GET", "incoming/good", 0, NULL, 60, &url), MH_EINVAL,
               "presign without public URL -> EINVAL");
    mh_arena_release(&a);
    res_t r[10] = {{0}};
    for (int i = 0; i < 10; i++) mh_store_get(s, "incoming/good", 0, UINT64_MAX, get_cb, &r[i]);
    mh_store_writer_t *u = NULL;
    mh_store_fs_upload_open(s, "incoming/late", 1, (const uint8_t *)"01234567890123456789012345678901", &u);
    mh_store_close(s);
    uv_run(loop, UV_RUN_DEFAULT);
    int ok = 0;
    for (int i = 0; i < 10; i++) {
        ok += r[i].done == 1 && r[i].err == 0 && r[i].buf.len == 3 * 1024 * 1024 + 300000;
        mh_buf_free(&r[i].buf);
    }
    TAP_EQ_INT(ok, 10, "ops in flight at close complete");
    mh_store_writer_abort(u); /* frees the closed store */
    uv_run(loop, UV_RUN_DEFAULT);
    TAP_EQ_INT(count_entries("tmp"), 0, "upload aborted after close: tmp/ empty");
}

static void test_sweep(void)
{
    char p[256];
    snprintf(p, sizeof p, "%s/store/tmp/put-stale", root);
    int fd = open(p, O_CREAT | O_WRONLY, 0644);
    if (fd >= 0) close(fd);
    struct timespec old[2] = {{.tv_sec = mh_unix_time() - 7 * 3600}, {.tv_sec = mh_unix_time() - 7 * 3600}};
    utimensat(AT_FDCWD, p, old, 0);
    snprintf(p, sizeof p, "%s/store/tmp/put-fresh", root);
    fd = open(p, O_CREAT | O_WRONLY, 0644);
    if (fd >= 0) close(fd);
    mh_store_t *s = open_store("store", NULL, NULL);
    TAP_OK(!file_exists("tmp/put-stale"), "stale tmp file swept at open");
    TAP_OK(file_exists("tmp/put-fresh"), "fresh tmp file kept (another process may own it)");
    unlink(p);
    mh_store_close(s);
}

static void test_metrics(mh_store_t *s)
{
    mh_buf_t m = {0};
    TAP_EQ_INT(mh_store_metrics_write(s, &m), 0, "metrics");
    mh_buf_append_byte(&m, 0);
    const char *t = (const char *)m.p;
    TAP_OK(strstr(t, "# TYPE musehub_store_operations_total counter") != NULL, "metrics type line");
    TAP_OK(strstr(t, "musehub_store_operations_total{backend=\"fs\",op=\"get\",result=\"ok\"} ") &&
               !strstr(t, "op=\"get\",result=\"ok\"} 0\n"),
           "get ok counted");
    TAP_OK(strstr(t, "op=\"upload\",result=\"rejected\"} ") && !strstr(t, "op=\"upload\",result=\"rejected\"} 0\n"),
           "rejected uploads counted");
    TAP_OK(strstr(t, "musehub_store_bytes_read_total{backend=\"fs\"} ") &&
               !strstr(t, "musehub_store_bytes_read_total{backend=\"fs\"} 0\n"),
           "bytes read counted");
    TAP_OK(strstr(t, "musehub_store_bytes_written_total{backend=\"fs\"} ") &&
               !strstr(t, "musehub_store_bytes_written_total{backend=\"fs\"} 0\n"),
           "bytes written counted");
    mh_buf_free(&m);
}

/* A full and a read-only store, for real: a 1 MiB tmpfs mounted under
 * the test directory (needs CAP_SYS_ADMIN; skipped without it). Every
 * write path answers MH_ENOSPC and leaves nothing behind (SPEC 4.8). */
static void test_enospc(void)
{
    char mnt[128], spec[160];
    snprintf(mnt, sizeof mnt, "%s/small", root);
    mkdir(mnt, 0755);
    if (mount("tmpfs", mnt, "tmpfs", 0, "size=1m") != 0) {
        TAP_COMMENT("SKIP full-store tests: cannot mount a tmpfs (%s)", strerror(errno));
        return;
    }
    snprintf(spec, sizeof spec, "fs:%s/store", mnt);
    mh_store_config_t cfg = {.spec = spec, .public_url = "http://h"};
    mh_store_t *s = NULL;
    TAP_EQ_INT(mh_store_open(loop, &cfg, &s), 0, "store on a 1 MiB tmpfs");
    if (!s) {
        umount2(mnt, MNT_DETACH);
        return;
    }
    size_t n = 2u * 1024 * 1024;
    uint8_t *data = pattern(n, 77), sha[32];
    mh_sha256(data, n, sha);
    char key[MH_STORE_KEY_MAX + 1];
    pack_key(key, data, n);
    char sub[200];
    snprintf(sub, sizeof sub, "%s/store/tmp", mnt);
    wres_t f;

    TAP_EQ_INT(do_put(s, key, data, n), MH_ENOSPC, "full: put -> ENOSPC");
    TAP_EQ_INT(stream_object(s, true, 256 * 1024, data, n, 100000, NULL, &f), MH_ENOSPC, "full: writer -> ENOSPC");
    int wrc = 0;
    mh_store_writer_t *u = start_upload(s, "incoming/full", data, n, n, sha, &wrc);
    int frc = u ? finish_writer(u, NULL, &f) : wrc;
    TAP_OK(wrc == MH_ENOSPC || frc == MH_ENOSPC, "full: upload -> ENOSPC (write %d, finish %d)", wrc, frc);
    DIR *dd = opendir(sub);
    int left = 0;
    struct dirent *e;
    while (dd && (e = readdir(dd)))
        if (e->d_name[0] != '.') left++;
    if (dd) closedir(dd);
    TAP_EQ_INT(left, 0, "full: nothing left in tmp/");
    TAP_EQ_INT(do_head(s, "incoming/full", NULL), MH_ENOENT, "full: nothing under the staging key");
    TAP_EQ_INT(do_put(s, "incoming/small", "abc", 3), 0, "a small put still fits");

    TAP_EQ_INT(mount(NULL, mnt, NULL, MS_REMOUNT | MS_RDONLY, NULL), 0, "remount read-only");
    TAP_EQ_INT(do_put(s, "incoming/ro", "abc", 3), MH_ENOSPC, "read-only: put -> ENOSPC");
    TAP_EQ_INT(do_move(s, "incoming/small", key), MH_ENOSPC, "read-only: move -> ENOSPC");
    TAP_EQ_INT(stream_object(s, true, 0, data, 1000, 1000, NULL, &f), MH_ENOSPC, "read-only: writer -> ENOSPC");
    uint8_t sha3[32];
    mh_sha256("abc", 3, sha3);
    u = start_upload(s, "incoming/ro", (const uint8_t *)"abc", 3, 3, sha3, &wrc);
    TAP_EQ_INT(u ? finish_writer(u, NULL, &f) : wrc, MH_ENOSPC, "read-only: upload -> ENOSPC");
    mh_buf_t b = {0};
    TAP_EQ_INT(do_get(s, "incoming/small", 0, UINT64_MAX, &b), 0, "read-only: reads still work");
    mh_buf_free(&b);
    mh_store_close(s);
    uv_run(loop, UV_RUN_DEFAULT);
    free(data);
    umount2(mnt, MNT_DETACH);
    rmdir(mnt);
}

int main(void)
{
    mh_log_set_level("error");
    loop = uv_default_loop();
    snprintf(root, sizeof root, "/tmp/mh-test-store-XXXXXX");
    if (!mkdtemp(root)) return 1;

    test_open_specs();
    test_keys();
    mh_store_t *s = open_store("store", NULL, "http://127.0.0.1:1337/");
    TAP_OK(s != NULL, "open fs store (directory created)");
    if (!s) return tap_done();
    TAP_EQ_STR(mh_store_kind(s), "fs", "kind");
    test_secret(s);
    test_traversal(s);
    test_put_get_head(s);
    test_ranges(s);
    test_move_delete(s);
    test_concurrent(s);
    test_presign(s);
    test_expiry();
    test_upload(s);
    test_writer(s);
    test_reader(s);
    test_list_and_sweep(s);
    test_metrics(s);
    mh_store_close(s);
    test_close_in_flight();
    test_sweep();
    test_enospc();
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    tap_rm_tree(root);
    return tap_done();
}
