/*
 * msgpack_read.c — the bounded, zero-copy msgpack reader (codec.h).
 *
 * Why our own: msgpack-c's unpacker allocates count * sizeof(object) for
 * an array/map header before it has seen a single element, so `dd ff ff
 * ff ff` (5 bytes) asks for ~100 GB. Here every count is checked before
 * anything is allocated:
 *  - against the bytes left: each array element needs >= 1 byte and each
 *    map pair >= 2, so a count can never exceed what the input could hold;
 *  - against lim->max_items, summed over the whole document;
 *  - nesting is bounded by lim->max_depth, which also bounds recursion.
 * str/bin values point into the input (never copied), which is what lets
 * the pack reader compute each blob's byte offset by pointer arithmetic.
 * Ext types (including timestamps) and the reserved byte 0xc1 are errors:
 * nothing in the protocol uses them.
 */
#include <string.h>

#include "codec_internal.h"

const mh_decode_limits_t mh_decode_limits_default = {.max_depth = 32, .max_items = 16u << 20};

typedef struct {
    mh_arena_t *a;
    const uint8_t *p, *end;
    const mh_decode_limits_t *lim;
    uint64_t items; /* array elements + map pairs seen so far */
    const char *why;
    bool prefix;    /* mh_msgpack_decode_prefix: running out of bytes is INCOMPLETE */
} rd_t;

/* Returned (positive) through the read_* chain when a prefix decode runs
 * out of bytes: the value may continue past the buffer. */
#define INCOMPLETE 1

static int fail(rd_t *r, int err, const char *why)
{
    r->why = why;
    return err;
}

/* Out of bytes: an error for a whole-buffer decode, INCOMPLETE for a
 * prefix decode. */
static int short_input(rd_t *r, const char *why)
{
    return r->prefix ? INCOMPLETE : fail(r, MH_EPARSE, why);
}

static size_t left(const rd_t *r)
{
    return (size_t)(r->end - r->p);
}

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* Reads an n-byte big-endian unsigned integer; fails on truncation. */
static int take_be(rd_t *r, int n, uint64_t *v)
{
    if (left(r) < (size_t)n) return short_input(r, "truncated");
    *v = be(r->p, n);
    r->p += n;
    return 0;
}

static int read_val(rd_t *r, mh_val_t *out, uint32_t depth);

static int read_strbin(rd_t *r, mh_val_t *out, mh_vtype_t t, uint64_t n)
{
    if (n > left(r)) return short_input(r, "string or bin longer than the input");
    out->t = t;
    out->v.s.p = (const char *)r->p;
    out->v.s.n = (uint32_t)n; /* n <= 2^32-1 by construction of the header */
    r->p += n;
    return 0;
}

/* Checks a container count before anything is allocated. `per` is the
 * minimum number of bytes one element needs (1 per array item, 2 per map
 * pair). */
static int check_count(rd_t *r, uint64_t n, unsigned per, uint32_t depth)
{
    if (depth >= r->lim->max_depth) return fail(r, MH_ELIMIT, "nesting deeper than the limit");
    if (n > left(r) / per) return short_input(r, "count larger than the bytes left");
    if (n > (uint64_t)r->lim->max_items - r->items) return fail(r, MH_ELIMIT, "more items than the limit");
    r->items += n;
    return 0;
}

/* The checks of a container of n entries of `per` values each, and its
 * block of entries of `size` bytes (NULL when empty); *rc the error. */
static void *container(rd_t *r, uint64_t n, unsigned per, uint32_t depth, size_t size, int *rc)
{
    *rc = check_count(r, n, per, depth);
    if (*rc || n == 0) return NULL;
    void *p = mh_alloc(r->a, mh_val_cap(n) * size);
    if (!p) *rc = fail(r, MH_ENOMEM, "out of memory");
    return p;
}

static int read_arr(rd_t *r, mh_val_t *out, uint64_t n, uint32_t depth)
{
    int rc;
    mh_val_t *items = container(r, n, 1, depth, sizeof *items, &rc);
    *out = (mh_val_t){.t = MH_V_ARR, .v.a = {items, (uint32_t)n}};
    for (uint64_t i = 0; !rc && i < n; i++) rc = read_val(r, &items[i], depth + 1);
    return rc;
}

static int read_map(rd_t *r, mh_val_t *out, uint64_t n, uint32_t depth)
{
    int rc;
    mh_kv_t *kv = container(r, n, 2, depth, sizeof *kv, &rc);
    *out = (mh_val_t){.t = MH_V_MAP, .v.m = {kv, (uint32_t)n}};
    for (uint64_t i = 0; !rc && i < n; i++) {
        rc = read_val(r, &kv[i].k, depth + 1);
        if (!rc) rc = read_val(r, &kv[i].v, depth + 1);
    }
    return rc;
}

/* Stores a signed value, normalising non-negative ones to UINT so callers
 * test one type for "a count" whatever width the sender chose. */
static void set_signed(mh_val_t *out, int64_t i)
{
    if (i >= 0) {
        out->t = MH_V_UINT;
        out->v.u = (uint64_t)i;
    } else {
        out->t = MH_V_INT;
        out->v.i = i;
    }
}

static int read_float(rd_t *r, mh_val_t *out, int n)
{
    uint64_t bits;
    int rc = take_be(r, n, &bits);
    if (rc) return rc;
    out->t = MH_V_FLOAT;
    if (n == 4) {
        uint32_t b32 = (uint32_t)bits;
        float f;
        memcpy(&f, &b32, sizeof(f));
        out->v.f = f;
    } else {
        memcpy(&out->v.f, &bits, sizeof(double));
    }
    return 0;
}

/* Types whose header byte carries the length (or the value) itself. */
static bool read_fixed(rd_t *r, uint8_t c, mh_val_t *out, uint32_t depth, int *rc)
{
    if (c <= 0x7f) {
        out->t = MH_V_UINT;
        out->v.u = c;
    } else if (c >= 0xe0) {
        out->t = MH_V_INT;
        out->v.i = (int8_t)c;
    } else if (c <= 0x8f) {
        *rc = read_map(r, out, c & 0x0f, depth);
    } else if (c <= 0x9f) {
        *rc = read_arr(r, out, c & 0x0f, depth);
    } else if (c <= 0xbf) {
        *rc = read_strbin(r, out, MH_V_STR, c & 0x1f);
    } else {
        return false;
    }
    return true;
}

static int read_val(rd_t *r, mh_val_t *out, uint32_t depth)
{
    if (r->p >= r->end) return short_input(r, "truncated");
    uint8_t c = *r->p++;
    int rc = 0;
    if (read_fixed(r, c, out, depth, &rc)) return rc;

    uint64_t n;
    switch (c) {
    case 0xc0: out->t = MH_V_NIL; return 0;
    case 0xc2: out->t = MH_V_BOOL; out->v.b = false; return 0;
    case 0xc3: out->t = MH_V_BOOL; out->v.b = true; return 0;
    case 0xc4: case 0xc5: case 0xc6: /* bin 8/16/32 */
        if ((rc = take_be(r, 1 << (c - 0xc4), &n))) return rc;
        return read_strbin(r, out, MH_V_BIN, n);
    case 0xca: return read_float(r, out, 4);
    case 0xcb: return read_float(r, out, 8);
    case 0xcc: case 0xcd: case 0xce: case 0xcf: /* uint 8/16/32/64 */
        if ((rc = take_be(r, 1 << (c - 0xcc), &n))) return rc;
        out->t = MH_V_UINT;
        out->v.u = n;
        return 0;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: { /* int 8/16/32/64 */
        int w = 1 << (c - 0xd0);
        if ((rc = take_be(r, w, &n))) return rc;
        /* the w-byte two's complement value, sign-extended */
        int64_t i = w == 1 ? (int8_t)n : w == 2 ? (int16_t)n : w == 4 ? (int32_t)n : (int64_t)n;
        set_signed(out, i);
        return 0;
    }
    case 0xd9: case 0xda: case 0xdb: /* str 8/16/32 */
        if ((rc = take_be(r, 1 << (c - 0xd9), &n))) return rc;
        return read_strbin(r, out, MH_V_STR, n);
    case 0xdc: case 0xdd: /* array 16/32 */
        if ((rc = take_be(r, c == 0xdc ? 2 : 4, &n))) return rc;
        return read_arr(r, out, n, depth);
    case 0xde: case 0xdf: /* map 16/32 */
        if ((rc = take_be(r, c == 0xde ? 2 : 4, &n))) return rc;
        return read_map(r, out, n, depth);
    case 0xc1: return fail(r, MH_EPARSE, "reserved byte 0xc1");
    default: /* 0xc7-0xc9 ext, 0xd4-0xd8 fixext */
        return fail(r, MH_EPARSE, "ext types are not supported");
    }
}

int mh_msgpack_decode(mh_arena_t *a, const uint8_t *buf, size_t len, const mh_decode_limits_t *lim,
                      mh_val_t *out, const char **why)
{
    rd_t r = {.a = a, .p = buf, .end = buf + len, .lim = lim ? lim : &mh_decode_limits_default};
    const char *dummy;
    if (!why) why = &dummy;
    *why = NULL;
    if (len == 0 || !buf) {
        *why = "empty input";
        return MH_EPARSE;
    }
    int rc = read_val(&r, out, 0);
    if (rc == 0 && r.p != r.end) rc = fail(&r, MH_EPARSE, "trailing bytes after the value");
    if (rc) {
        *why = r.why;
        out->t = MH_V_NIL;
    }
    return rc;
}

int mh_msgpack_decode_prefix(mh_arena_t *a, const uint8_t *buf, size_t len, const mh_decode_limits_t *lim,
                             mh_val_t *out, size_t *used, uint64_t *items, const char **why)
{
    rd_t r = {.a = a, .p = buf, .end = buf + len, .lim = lim ? lim : &mh_decode_limits_default, .prefix = true};
    const char *dummy;
    if (!why) why = &dummy;
    *why = NULL;
    int rc = len && buf ? read_val(&r, out, 0) : INCOMPLETE;
    if (rc) {
        if (rc < 0) *why = r.why;
        out->t = MH_V_NIL;
        return rc;
    }
    *used = (size_t)(r.p - buf);
    if (items) *items = r.items;
    return 0;
}
