/*
 * test_core.c — core helpers: base64 (RFC 4648 section 10 vectors and the
 * decoder's strictness), hex, ids, arenas, SipHash (reference vectors),
 * the id map and heap arrays (mh_vec_grow).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mh/core.h"
#include "tap.h"

static const char *dec(mh_arena_t *a, const char *in, int *rc)
{
    uint8_t *out = NULL;
    size_t n = 0;
    *rc = mh_base64_decode(a, in, strlen(in), &out, &n);
    return *rc ? NULL : mh_strndup(a, (const char *)out, n);
}

static void test_hex_ids(void)
{
    uint8_t d[32], e[32];
    mh_id_t id;
    mh_blob_id("x", 1, &id);
    TAP_OK(mh_id_digest(id.s, MH_ID_LEN, d) == 0 && mh_hex_decode(e, id.s + 7, 32) == 0 && !memcmp(d, e, 32),
           "id digest: one pass equals valid + decode");
    mh_id_t back;
    mh_id_from_digest(&back, d);
    TAP_EQ_STR(back.s, id.s, "id digest: round trip");
    uint8_t up[2];
    TAP_OK(mh_hex_decode(up, "ABcd", 2) == 0 && up[0] == 0xab && up[1] == 0xcd, "hex decode takes either case");
    id.s[9] = 'A';
    TAP_EQ_INT(mh_id_digest(id.s, MH_ID_LEN, d), MH_EPARSE, "id digest refuses uppercase");
    id.s[9] = 'g';
    TAP_EQ_INT(mh_id_digest(id.s, MH_ID_LEN, d), MH_EPARSE, "id digest refuses a non-digit");
    TAP_EQ_INT(mh_id_digest("sha256:00", 9, d), MH_EPARSE, "id digest refuses a short id");
    TAP_EQ_INT(mh_id_digest(NULL, 0, d), MH_EPARSE, "id digest refuses NULL");
}

/* SipHash-2-4 against the reference vectors (key 00..0f, message 00..n-1). */
static void test_siphash(void)
{
    uint8_t key[16], msg[64];
    for (int i = 0; i < 16; i++) key[i] = (uint8_t)i;
    for (int i = 0; i < 64; i++) msg[i] = (uint8_t)i;
    TAP_OK(mh_siphash(key, msg, 0, 2, 4) == 0x726fdb47dd0e0e31ULL, "siphash: empty message");
    TAP_OK(mh_siphash(key, msg, 15, 2, 4) == 0xa129ca6149be45e5ULL, "siphash: the paper's 15-byte example");
    TAP_OK(mh_hash64("abc", 3) == mh_hash64("abc", 3) && mh_hash64("abc", 3) != mh_hash64("abd", 3),
           "process hash: stable, distinct");
}

static const void *id_key(const void *ctx, uint32_t v) { return ((const char (*)[MH_ID_SIZE])ctx)[v]; }

static void test_idmap(mh_arena_t *a)
{
    /* 100,000 ids that all share their first 58 hex digits (what a client
     * choosing ids without the content can send): the map still grows and
     * finds every one. */
    enum { N = 100000 };
    char (*ids)[MH_ID_SIZE] = malloc((size_t)N * MH_ID_SIZE);
    for (int i = 0; i < N; i++) snprintf(ids[i], MH_ID_SIZE, "sha256:%058d%06x", 0, (unsigned)i);
    mh_idmap_t m;
    mh_idmap_init(&m, a, MH_ID_LEN, id_key, ids);
    TAP_OK(mh_idmap_find(&m, ids[0]) == MH_IDMAP_NONE, "idmap: empty map finds nothing");
    int added = 0;
    for (int i = 0; i < N; i++) added += mh_idmap_add(&m, (uint32_t)i, NULL) == 1;
    TAP_EQ_INT(added, N, "idmap: every distinct key added");
    TAP_OK(m.n == (size_t)added && m.cap >= m.n * 4 / 3, "idmap: grew, at most 3/4 full");
    int found = 0;
    for (int i = 0; i < N; i++) found += mh_idmap_find(&m, ids[i]) == (uint32_t)i;
    TAP_EQ_INT(found, N, "idmap: every key finds its entry");
    uint32_t dup = 0;
    memcpy(ids[N - 1], ids[7], MH_ID_SIZE);
    TAP_OK(mh_idmap_add(&m, N - 1, &dup) == 0 && dup == 7, "idmap: an equal key is not added twice");
    char other[MH_ID_SIZE];
    memcpy(other, ids[7], MH_ID_SIZE);
    TAP_EQ_INT((int)mh_idmap_find(&m, other), 7, "idmap: keys compare by content, not address");
    other[MH_ID_LEN - 1] = 'z';
    TAP_OK(mh_idmap_find(&m, other) == MH_IDMAP_NONE, "idmap: an absent key is absent");

    /* Heap maps: a clone looks its keys up through its own context. */
    mh_idmap_t h, c;
    mh_idmap_init(&h, NULL, MH_ID_LEN, id_key, ids);
    for (int i = 0; i < 1000; i++) mh_idmap_add(&h, (uint32_t)i, NULL);
    char (*moved)[MH_ID_SIZE] = malloc(1000 * MH_ID_SIZE);
    memcpy(moved, ids, 1000 * MH_ID_SIZE);
    TAP_OK(mh_idmap_clone(&c, &h, moved) == 0 && c.n == 1000, "idmap: clone");
    memset(ids, 0, 1000 * MH_ID_SIZE);
    found = 0;
    for (int i = 0; i < 1000; i++) found += mh_idmap_find(&c, moved[i]) == (uint32_t)i;
    TAP_EQ_INT(found, 1000, "idmap: a clone finds the keys of its own copy");
    mh_idmap_free(&h);
    mh_idmap_free(&c);
    TAP_OK(c.cap == 0 && c.n == 0, "idmap: free empties the map");

    /* The id list: distinct ids in first-seen order. */
    mh_idlist_t l;
    mh_idlist_init(&l, a);
    int r1 = mh_idlist_add(&l, moved[3]), r2 = mh_idlist_add(&l, moved[5]), r3 = mh_idlist_add(&l, moved[3]);
    TAP_OK(r1 == 1 && r2 == 1 && r3 == 0 && l.n == 2 && l.ids[1] == moved[5], "idlist: distinct, in order");
    TAP_OK(mh_idlist_find(&l, moved[5]) == 1 && mh_idlist_find(&l, moved[4]) == MH_IDMAP_NONE, "idlist: find");
    for (int i = 0; i < 1000; i++) mh_idlist_add(&l, moved[i]);
    TAP_EQ_INT((int)l.n, 1000, "idlist: grows");
    free(moved);
    free(ids);
}

static void test_vec_grow(void)
{
    int *v = NULL;
    size_t n = 0, cap = 0;
    int ok = 1;
    for (int i = 0; i < 1000; i++) {
        int *g = mh_vec_grow(v, &cap, n + 1, sizeof *v, 4);
        if (!g) {
            ok = 0;
            break;
        }
        v = g;
        v[n++] = i;
        if (cap < n || (cap & (cap - 1))) ok = 0; /* first 4, then doublings */
    }
    for (size_t i = 0; ok && i < n; i++) ok = v[i] == (int)i;
    TAP_OK(ok && cap == 1024, "vec: 1000 pushes keep every element, capacity 4 doubled to 1024");
    TAP_OK(mh_vec_grow(v, &cap, 10, sizeof *v, 4) == v && cap == 1024, "vec: room already there: same array");
    size_t before = cap;
    TAP_OK(mh_vec_grow(v, &cap, SIZE_MAX / 2, sizeof *v, 4) == NULL && cap == before,
           "vec: an impossible size is NULL, the array and capacity unchanged");
    v[0] = 7;
    TAP_EQ_INT(v[0], 7, "vec: the array is still usable after a failed grow");
    free(v);
}

int main(void)
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    static const char *plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    static const char *coded[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    for (int i = 0; i < 7; i++) {
        char *e = NULL;
        int rc = mh_base64_encode(&a, (const uint8_t *)plain[i], strlen(plain[i]), &e, NULL);
        TAP_OK(!rc && e && !strcmp(e, coded[i]), "encode '%s' (RFC 4648)", plain[i]);
        const char *d = dec(&a, coded[i], &rc);
        TAP_OK(!rc && d && !strcmp(d, plain[i]), "decode '%s' (RFC 4648)", coded[i]);
    }
    int rc;
    const char *d = dec(&a, "Zm9vYg", &rc);
    TAP_OK(!rc && !strcmp(d, "foob"), "padding may be left out");
    static const char *bad[] = {"Zm9vYg=", "Zg=a", "Z===", "Zm 9v", "Zm9v\n", "Zm9v!", "aG=sbA==", "Z"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        dec(&a, bad[i], &rc);
        TAP_EQ_INT(rc, MH_EPARSE, "refused malformed base64");
    }
    uint8_t raw[4] = {0x00, 0x7f, 0x80, 0xff}, back[4];
    char hex[9];
    mh_hex_encode(hex, raw, 4);
    TAP_EQ_STR(hex, "007f80ff", "hex encode");
    TAP_OK(mh_hex_decode(back, hex, 4) == 0 && !memcmp(back, raw, 4), "hex round trip");
    TAP_EQ_INT(mh_hex_decode(back, "zz", 1), MH_EPARSE, "hex refuses a non-digit");
    mh_id_t id;
    mh_blob_id("", 0, &id);
    TAP_EQ_STR(id.s, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "blob id of nothing");
    TAP_OK(mh_id_valid(id.s, MH_ID_LEN), "a blob id is a valid id");
    id.s[10] = 'A';
    TAP_OK(!mh_id_valid(id.s, MH_ID_LEN), "uppercase hex is not an id");
    TAP_OK(!mh_id_valid("sha256:00", 9), "a short id is not an id");
    mh_arena_t lim;
    mh_arena_init(&lim, 1024);
    TAP_OK(mh_alloc(&lim, 512) != NULL && mh_alloc(&lim, 1024) == NULL, "an arena's limit turns into NULL, not an abort");
    mh_arena_release(&lim);
    test_hex_ids();
    test_siphash();
    test_vec_grow();
    test_idmap(&a);
    TAP_EQ_STR(mh_strerror(MH_ENOSPC), "no space left in the object store", "MH_ENOSPC has its text");
    mh_arena_release(&a);
    return tap_done();
}
