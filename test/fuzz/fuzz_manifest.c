/*
 * fuzz_manifest.c — libFuzzer target for path validation, manifest
 * decoding and delta application (mpack.h: mh_path_valid,
 * mh_manifest_decode/apply/diff/encode, the incremental mh_manifest_id).
 *
 * Input: byte 0 (unused), then a big-endian u16 length L, then L bytes of a
 * manifest (msgpack map path -> id), then a delta: a msgpack array
 * [upsert map, remove array] (or anything: refused). The whole input is
 * also checked as one path. Invariants checked (abort on violation):
 * mh_path_valid agrees with a plain restatement of SPEC 1's rules; a
 * manifest stays sorted, unique and valid; the cached id equals the
 * uncached one; diff(before, after) applied to before gives after; an
 * encoded manifest decodes to the same entries.
 */
#include <stdlib.h>
#include <string.h>

#include "mh/mpack.h"

/* SPEC 1, restated without cleverness. */
static bool path_ref(const char *p, size_t n)
{
    if (n < 1 || n > 4096 || memchr(p, 0, n) || !mh_utf8_valid(p, n)) return false;
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && p[i] != '/') continue;
        size_t len = i - start;
        if (len == 0) return false;
        if (len == 1 && p[start] == '.') return false;
        if (len == 2 && p[start] == '.' && p[start + 1] == '.') return false;
        start = i + 1;
    }
    return true;
}

static void check(const mh_manifest_t *m)
{
    for (size_t i = 0; i < m->n; i++) {
        if (!mh_path_valid(m->e[i].path, m->e[i].plen) || !mh_id_valid(m->e[i].id, MH_ID_LEN)) abort();
        if (i) {
            size_t a = m->e[i - 1].plen, b = m->e[i].plen, k = a < b ? a : b;
            int c = memcmp(m->e[i - 1].path, m->e[i].path, k);
            if (c > 0 || (c == 0 && a >= b)) abort();
        }
    }
    mh_id_t x, y;
    mh_manifest_id(m, &x);
    mh_manifest_id_nocache(m, &y);
    if (strcmp(x.s, y.s) != 0) abort();
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (mh_path_valid((const char *)data, size) != path_ref((const char *)data, size)) abort();
    if (size < 3) return 0;
    size_t l = (size_t)data[1] << 8 | data[2];
    if (l > size - 3) l = size - 3;
    const uint8_t *mp = data + 3, *dp = mp + l;
    size_t dl = size - 3 - l;

    mh_arena_t a;
    mh_arena_init(&a, 64u << 20);
    mh_manifest_t m = {0}, before = {0}, replay = {0}, back = {0};
    if (mh_manifest_decode(&a, mp, l, &m) != 0) m.n = 0;
    check(&m);
    mh_manifest_clone(&before, &m);

    mh_val_t d;
    const char *why;
    if (mh_msgpack_decode(&a, dp, dl, NULL, &d, &why) == 0 && d.t == MH_V_ARR && d.v.a.n == 2) {
        mh_id_t id0;
        mh_manifest_id(&m, &id0);
        int rc = mh_manifest_apply(&m, &d.v.a.items[0], &d.v.a.items[1], &why);
        check(&m);
        if (rc && rc != MH_ENOMEM && !same_entries(&m, &before)) abort(); /* refused: unchanged */
        /* diff(before, m) replayed on a copy of before gives m */
        mh_buf_t u = {0}, r = {0};
        uint32_t nu, nr;
        if (mh_manifest_diff(&before, &m, &u, &nu, &r, &nr) != 0) abort();
        mh_val_t uv, rv;
        if (mh_msgpack_decode(&a, u.p, u.len, NULL, &uv, &why) || mh_msgpack_decode(&a, r.p, r.len, NULL, &rv, &why))
            abort();
        mh_manifest_clone(&replay, &before);
        if (mh_manifest_apply(&replay, &uv, &rv, &why) != 0 || !same_entries(&replay, &m)) abort();
        check(&replay);
        mh_buf_free(&u);
        mh_buf_free(&r);
    }
    mh_buf_t e = {0};
    if (mh_manifest_encode(&m, &e) != 0) abort();
    if (mh_manifest_decode(&a, e.p, e.len, &back) != 0 || !same_entries(&back, &m)) abort();
    mh_buf_free(&e);
    mh_manifest_free(&m);
    mh_manifest_free(&before);
    mh_manifest_free(&replay);
    mh_manifest_free(&back);
    mh_arena_release(&a);
    return 0;
}
