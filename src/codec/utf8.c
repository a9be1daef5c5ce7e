/*
 * utf8.c — strict UTF-8 checking (Unicode 15, table 3-7: no overlong
 * forms, no surrogates, nothing above U+10FFFF) and the "maximal subpart"
 * step used to replace bad sequences with U+FFFD when writing JSON.
 *
 * Invariant: mh__utf8_step never reads past p + n and always advances by
 * at least one byte, so callers' loops terminate on any input.
 */
#include "codec_internal.h"

/* Looks at the sequence starting at p[0] (n >= 1 bytes available).
 * Returns true when it is one complete well-formed character; *adv is its
 * length. Returns false otherwise; *adv is then the length of the maximal
 * subpart (the lead byte plus the continuation bytes that were still
 * acceptable), at least 1, which is what one U+FFFD replaces. */
bool mh__utf8_step(const uint8_t *p, size_t n, size_t *adv)
{
    uint8_t c = p[0];
    size_t need;
    uint8_t lo = 0x80, hi = 0xBF; /* allowed range of the second byte */

    if (c < 0x80) {
        *adv = 1;
        return true;
    }
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;      /* overlong */
        else if (c == 0xED) hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0) lo = 0x90;      /* overlong */
        else if (c == 0xF4) hi = 0x8F; /* above U+10FFFF */
    } else {
        *adv = 1; /* 80..C1 and F5..FF can never start a character */
        return false;
    }
    size_t i = 1;
    for (; i < need; i++) {
        if (i >= n) break;
        uint8_t b = p[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) break;
    }
    *adv = i;
    return i == need;
}

bool mh_utf8_valid(const char *s, size_t n)
{
    const uint8_t *p = (const uint8_t *)s;
    size_t i = 0;
    while (i < n) {
        /* ASCII fast path: paths and keys are almost always ASCII. */
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        size_t adv;
        if (!mh__utf8_step(p + i, n - i, &adv)) return false;
        i += adv;
    }
    return true;
}
