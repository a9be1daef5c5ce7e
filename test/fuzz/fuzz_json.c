/*
 * fuzz_json.c — libFuzzer target for the JSON decoder (codec.h:
 * mh_json_decode: jansson + conversion with depth/item bounds).
 *
 * Input: the JSON bytes. Invariants checked (abort on violation): every
 * refusal has a reason; a decoded value encodes to JSON, and that JSON
 * decodes to an equal value (strings are valid UTF-8 by then, so no
 * U+FFFD substitution may happen); it also encodes to msgpack that the
 * msgpack reader accepts.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mh/codec.h"

static bool eq(const mh_val_t *a, const mh_val_t *b)
{
    if (a->t != b->t) return false;
    switch (a->t) {
    case MH_V_NIL: return true;
    case MH_V_BOOL: return a->v.b == b->v.b;
    case MH_V_INT: return a->v.i == b->v.i;
    case MH_V_UINT: return a->v.u == b->v.u;
    case MH_V_FLOAT: return a->v.f == b->v.f;
    case MH_V_STR:
    case MH_V_BIN: return a->v.s.n == b->v.s.n && (!a->v.s.n || !memcmp(a->v.s.p, b->v.s.p, a->v.s.n));
    case MH_V_ARR:
        if (a->v.a.n != b->v.a.n) return false;
        for (uint32_t i = 0; i < a->v.a.n; i++)
            if (!eq(&a->v.a.items[i], &b->v.a.items[i])) return false;
        return true;
    case MH_V_MAP:
        if (a->v.m.n != b->v.m.n) return false;
        for (uint32_t i = 0; i < a->v.m.n; i++)
            if (!eq(&a->v.m.kv[i].k, &b->v.m.kv[i].k) || !eq(&a->v.m.kv[i].v, &b->v.m.kv[i].v)) return false;
        return true;
    }
    return false;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mh_arena_t a;
    mh_arena_init(&a, 64u << 20);
    mh_val_t v;
    const char *why = NULL;
    int rc = mh_json_decode(&a, data, size, NULL, &v, &why);
    if (rc) {
        if (!why && rc != MH_ENOMEM) abort();
        mh_arena_release(&a);
        return 0;
    }
    mh_buf_t b = {0};
    if (mh_encode(&v, MH_FMT_JSON, &b) != 0) abort();
    mh_val_t back;
    if (mh_json_decode(&a, b.p, b.len, NULL, &back, &why) != 0 || !eq(&v, &back)) abort();
    b.len = 0;
    if (mh_encode(&v, MH_FMT_MSGPACK, &b) != 0) abort();
    if (mh_msgpack_decode(&a, b.p, b.len, NULL, &back, &why) != 0 || !eq(&v, &back)) abort();
    mh_buf_free(&b);
    mh_arena_release(&a);
    return 0;
}
