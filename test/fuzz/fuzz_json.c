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
#include <stdlib.h>
#include <string.h>

#include "mh/codec.h"

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
    if (mh_json_decode(&a, b.p, b.len, NULL, &back, &why) != 0 || !mh_val_equal(&v, &back)) abort();
    b.len = 0;
    if (mh_encode(&v, MH_FMT_MSGPACK, &b) != 0) abort();
    if (mh_msgpack_decode(&a, b.p, b.len, NULL, &back, &why) != 0 || !mh_val_equal(&v, &back)) abort();
    mh_buf_free(&b);
    mh_arena_release(&a);
    return 0;
}
