/*
 * fuzz_msgpack.c — libFuzzer target for the bounded msgpack reader
 * (codec.h: mh_msgpack_decode), which parses request bodies and packs.
 *
 * Input: the bytes to decode. Invariants checked (abort on violation):
 * every str/bin of a decoded value lies inside the input; a decoded value
 * re-encoded with mh_encode decodes again to an equal value (re-encoding
 * is canonical and idempotent); JSON output of any decoded value either
 * succeeds or fails cleanly (non-string keys, invalid UTF-8). Decoding is
 * done twice, with the default limits and with tight ones.
 */
#include <stdlib.h>
#include <string.h>

#include "mh/codec.h"

static void check_inside(const mh_val_t *v, const uint8_t *buf, size_t len)
{
    if (v->t == MH_V_STR || v->t == MH_V_BIN) {
        const uint8_t *p = (const uint8_t *)v->v.s.p;
        if (p < buf || p > buf + len || v->v.s.n > (size_t)(buf + len - p)) abort();
    } else if (v->t == MH_V_ARR) {
        for (uint32_t i = 0; i < v->v.a.n; i++) check_inside(&v->v.a.items[i], buf, len);
    } else if (v->t == MH_V_MAP) {
        for (uint32_t i = 0; i < v->v.m.n; i++) {
            check_inside(&v->v.m.kv[i].k, buf, len);
            check_inside(&v->v.m.kv[i].v, buf, len);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const mh_decode_limits_t tight = {.max_depth = 4, .max_items = 64};
    mh_arena_t a;
    mh_arena_init(&a, 64u << 20);
    for (int pass = 0; pass < 2; pass++) {
        mh_val_t v;
        const char *why = NULL;
        int rc = mh_msgpack_decode(&a, data, size, pass ? &tight : NULL, &v, &why);
        if (rc) {
            if (!why && rc != MH_ENOMEM) abort(); /* every refusal has a reason */
            continue;
        }
        check_inside(&v, data, size);
        mh_buf_t b = {0};
        if (mh_encode(&v, MH_FMT_MSGPACK, &b) == 0) {
            mh_val_t back;
            const mh_decode_limits_t loose = {.max_depth = 64, .max_items = UINT32_MAX};
            if (mh_msgpack_decode(&a, b.p, b.len, &loose, &back, &why) != 0 || !mh_val_equal(&v, &back)) abort();
        }
        b.len = 0;
        (void)mh_encode(&v, MH_FMT_JSON, &b);
        mh_buf_free(&b);
    }
    mh_arena_release(&a);
    return 0;
}
