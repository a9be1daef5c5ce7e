/*
 * fuzz_range.c — libFuzzer target for the Range header parser
 * (hub.h: mh_parse_range), which picks the bytes GET
 * /{owner}/{slug}/objects/{id} (SPEC 4.5) and GET /_store/mpacks/... send
 * out of a stored object or a mapped pack.
 *
 * Input: byte 0 picks the object size (0..63 directly, else from the
 * next 8 bytes big-endian, so huge sizes are reached too), the rest is
 * the header value, copied into an exact-size heap buffer so ASan catches
 * any read past its end. Invariants checked (abort on violation): an
 * accepted range is non-empty and lies inside the object
 * (off + len <= size, no overflow); "unsatisfiable" is never reported
 * together with an accepted range; and, restated without cleverness, a
 * single "bytes=A-B", "bytes=A-" or "bytes=-N" with decimal digits is
 * read as RFC 9110 14.1.2 says.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mh/hub.h"

/* Decimal digits only, no overflow past UINT64_MAX / 2 (plenty). */
static bool num(const char *p, size_t n, uint64_t *out)
{
    if (n == 0 || n > 18) return false;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return false;
        v = v * 10 + (uint64_t)(p[i] - '0');
    }
    *out = v;
    return true;
}

/* The expected reading of short, well-formed values: 1 accepted, 0
 * unsatisfiable, -1 not a case this restatement decides. */
static int expect(const char *p, size_t n, uint64_t size, uint64_t *off, uint64_t *len)
{
    if (n < 7 || memcmp(p, "bytes=", 6) != 0) return -1;
    p += 6, n -= 6;
    const char *dash = memchr(p, '-', n);
    if (!dash || memchr(dash + 1, '-', n - (size_t)(dash - p) - 1)) return -1;
    uint64_t a = 0, b = 0;
    size_t an = (size_t)(dash - p), bn = n - an - 1;
    if (an == 0) {
        if (!num(dash + 1, bn, &b)) return -1;
        if (b == 0 || size == 0) return 0;
        *len = b < size ? b : size;
        *off = size - *len;
        return 1;
    }
    if (!num(p, an, &a)) return -1;
    if (bn == 0) b = UINT64_MAX;
    else if (!num(dash + 1, bn, &b) || b < a) return -1;
    if (a >= size) return 0;
    *off = a;
    *len = (b >= size ? size - 1 : b) - a + 1;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    uint64_t osize = data[0] & 63;
    data++, size--;
    if (data[-1] & 64) {
        if (size < 8) return 0;
        osize = 0;
        for (int i = 0; i < 8; i++) osize = osize << 8 | data[i];
        data += 8, size -= 8;
    }
    char *p = malloc(size ? size : 1);
    if (!p) return 0;
    memcpy(p, data, size);
    uint64_t off = 0, len = 0, eoff = 0, elen = 0;
    bool unsat = false;
    bool ok = mh_parse_range((mh_str_t){p, size}, osize, &off, &len, &unsat);
    if (ok && (unsat || len == 0 || off >= osize || len > osize - off)) abort();
    int want = expect(p, size, osize, &eoff, &elen);
    if (want == 1 && (!ok || off != eoff || len != elen)) abort();
    if (want == 0 && (ok || !unsat)) abort();
    free(p);
    return 0;
}
