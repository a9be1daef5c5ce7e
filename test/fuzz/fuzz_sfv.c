/*
 * fuzz_sfv.c — libFuzzer target for the parsers of MSign's untrusted
 * headers (SPEC 5): the RFC 8941 dictionary parser and serializer, the
 * strict Signature-Input / Signature reading, and Content-Digest.
 *
 * Input: bytes up to the first '\n' are a Signature-Input value, up to
 * the second '\n' a Signature value, the rest a Content-Digest value
 * (also used as the body). Invariants checked:
 *  - every parse of each part either fails cleanly or serializes, and the
 *    canonical serialization parses again to the same serialization
 *    (a fixed point);
 *  - a parsed MSign signature has a valid key id, a 64-byte signature and
 *    params that are the canonical serialization of an inner list;
 *  - nothing reads past its input (ASan) and the arena stays small.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mh/auth.h"

static void check_roundtrip(const char *p, size_t n)
{
    mh_arena_t a;
    mh_arena_init(&a, 1 << 20);
    mh_sf_dict_t d;
    const char *why = NULL;
    int rc = mh_sf_parse_dict(&a, p, n, &d, &why);
    if (rc == 0) {
        mh_buf_t s1 = {0}, s2 = {0};
        if (mh_sf_serialize_dict(&s1, &d)) abort();
        mh_sf_dict_t d2;
        /* s1's bytes must outlive d2 (keys point into them). */
        if (mh_sf_parse_dict(&a, s1.len ? (const char *)s1.p : "", s1.len, &d2, &why)) {
            fprintf(stderr, "canonical output does not reparse: %.*s (%s)\n", (int)s1.len, s1.p, why);
            abort();
        }
        if (mh_sf_serialize_dict(&s2, &d2)) abort();
        if (s1.len != s2.len || (s1.len && memcmp(s1.p, s2.p, s1.len))) {
            fprintf(stderr, "serialization is not a fixed point:\n%.*s\n%.*s\n", (int)s1.len, s1.p, (int)s2.len,
                    s2.p);
            abort();
        }
        for (uint32_t i = 0; i < d.n; i++) {
            mh_buf_t m = {0};
            if (mh_sf_serialize_member(&m, &d.m[i])) abort();
            mh_buf_free(&m);
        }
        mh_buf_free(&s1);
        mh_buf_free(&s2);
    } else if (rc != MH_EPARSE && rc != MH_ELIMIT) {
        abort();
    } else if (!why) {
        abort();
    }
    if (a.used > (size_t)64 * n + 65536) abort(); /* bounded by the input size */
    mh_arena_release(&a);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data, *end = p + size;
    const char *nl1 = memchr(p, '\n', size);
    const char *nl2 = nl1 ? memchr(nl1 + 1, '\n', (size_t)(end - nl1 - 1)) : NULL;
    mh_str_t si = {p, nl1 ? (size_t)(nl1 - p) : size};
    mh_str_t sg = nl1 ? (mh_str_t){nl1 + 1, (size_t)((nl2 ? nl2 : end) - nl1 - 1)} : (mh_str_t){"", 0};
    mh_str_t cd = nl2 ? (mh_str_t){nl2 + 1, (size_t)(end - nl2 - 1)} : (mh_str_t){NULL, 0};

    check_roundtrip(p, size);
    check_roundtrip(si.p, si.n);
    check_roundtrip(sg.p, sg.n);
    if (cd.p) check_roundtrip(cd.p, cd.n);

    mh_arena_t a;
    mh_arena_init(&a, 1 << 20);
    mh_msign_t m;
    const char *why = NULL;
    int rc = mh_msign_parse(&a, si, sg, &m, &why);
    if (rc == 0) {
        if (!mh_id_valid(m.keyid, strlen(m.keyid)) || !m.params || m.params[0] != '(' ||
            strlen(m.params) != m.params_len)
            abort();
        mh_msign_check_time(&m, 1700000000, &why);
        mh_msign_check_body(&a, &m, cd, cd.p ? cd.p : "", cd.n, &why);
        mh_buf_t base = {0};
        int brc = mh_msign_base(&base, &m, MH_STR("POST"), MH_STR("/a/b/fetch"), MH_STR("x=1"), cd);
        if (brc && brc != MH_EINVAL) abort();
        mh_buf_free(&base);
    } else if ((rc != MH_EAUTH && rc != MH_ENOMEM) || !why) {
        abort();
    }
    mh_arena_release(&a);
    return 0;
}
