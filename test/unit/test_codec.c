/*
 * test_codec.c — unit tests of the codec (codec.h): the bounded msgpack
 * reader (every type and width boundary, malformed input: truncation at
 * every byte, huge counts, depth, trailing bytes, ext/reserved types), the
 * JSON decoder (duplicates, depth, NUL), the encoders in both formats
 * (round trips, invalid UTF-8 -> U+FFFD, bin -> base64), the value
 * helpers and the streaming packer.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mh/codec.h"
#include "tap.h"

static mh_arena_t A;

/* ---------------------------------------------------------------- helpers */

static int dec(const void *p, size_t n, mh_val_t *out, const char **why)
{
    return mh_msgpack_decode(&A, p, n, NULL, out, why);
}

static int dec_lim(const void *p, size_t n, uint32_t depth, uint32_t items, mh_val_t *out)
{
    mh_decode_limits_t lim = {depth, items};
    const char *why;
    return mh_msgpack_decode(&A, p, n, &lim, out, &why);
}

/* Encodes v as msgpack into a fresh buffer (caller frees). */
static mh_buf_t enc_mp(const mh_val_t *v)
{
    mh_buf_t b = {0};
    int rc = mh_encode(v, MH_FMT_MSGPACK, &b);
    if (rc) printf("# encode failed: %d\n", rc);
    return b;
}

static char *enc_json(const mh_val_t *v)
{
    mh_buf_t b = {0};
    if (mh_encode(v, MH_FMT_JSON, &b) || mh_buf_append_byte(&b, 0)) {
        mh_buf_free(&b);
        return NULL;
    }
    char *s = mh_strdup(&A, (char *)b.p);
    mh_buf_free(&b);
    return s;
}

/* A sample document holding every type (used by several tests). */
static mh_val_t *sample(void)
{
    mh_val_t *root = mh_v_map(&A), *arr = mh_v_arr(&A), *inner = mh_v_map(&A);
    static const uint8_t bin[] = {0, 1, 2, 0xff, 0xfe};
    mh_map_put(&A, root, "nil", mh_v_nil());
    mh_map_put(&A, root, "t", mh_v_bool(true));
    mh_map_put(&A, root, "f", mh_v_bool(false));
    mh_map_put(&A, root, "neg", mh_v_int(-123456789012LL));
    mh_map_put(&A, root, "pos", mh_v_int(42));
    mh_map_put(&A, root, "big", mh_v_uint(UINT64_MAX));
    mh_map_put(&A, root, "pi", mh_v_float(3.25));
    mh_map_put(&A, root, "str", mh_v_str("h\xc3\xa9llo \"w\" \\ \n"));
    mh_map_put(&A, root, "bin", mh_v_bin(bin, sizeof bin));
    mh_arr_push(&A, arr, mh_v_int(1));
    mh_arr_push(&A, arr, mh_v_str(""));
    mh_map_put(&A, inner, "k", mh_v_str("v"));
    mh_arr_push(&A, arr, mh_v_ref(inner));
    mh_map_put(&A, root, "arr", mh_v_ref(arr));
    mh_map_put(&A, root, "inner", mh_v_ref(inner));
    return root;
}

/* ------------------------------------------------------------ round trips */

static void test_roundtrip_msgpack(void)
{
    mh_val_t *root = sample();
    mh_buf_t b = enc_mp(root);
    mh_val_t back;
    const char *why;
    TAP_EQ_INT(dec(b.p, b.len, &back, &why), 0, "msgpack round trip decodes");
    TAP_OK(mh_val_equal(root, &back), "msgpack round trip: every type equal");
    /* str/bin point into the input buffer (zero-copy) */
    const mh_val_t *s = mh_val_get(&back, "str"), *bn = mh_val_get(&back, "bin");
    TAP_OK(s && (const uint8_t *)s->v.s.p > b.p && (const uint8_t *)s->v.s.p < b.p + b.len, "str borrows the input");
    TAP_OK(bn && bn->t == MH_V_BIN && (const uint8_t *)bn->v.s.p < b.p + b.len, "bin borrows the input");
    mh_buf_free(&b);
}

static void test_roundtrip_json(void)
{
    mh_val_t *root = mh_v_map(&A), *arr = mh_v_arr(&A);
    mh_map_put(&A, root, "a", mh_v_int(-5));
    mh_map_put(&A, root, "b", mh_v_uint(7));
    mh_map_put(&A, root, "c", mh_v_float(0.5));
    mh_map_put(&A, root, "d", mh_v_str("\xe2\x99\xab x\ty"));
    mh_map_put(&A, root, "e", mh_v_nil());
    mh_map_put(&A, root, "f", mh_v_bool(true));
    mh_arr_push(&A, arr, mh_v_str("q"));
    mh_map_put(&A, root, "g", mh_v_ref(arr));
    char *js = enc_json(root);
    TAP_OK(js != NULL, "json encodes");
    TAP_EQ_STR(js, "{\"a\":-5,\"b\":7,\"c\":0.5,\"d\":\"\xe2\x99\xab x\\ty\",\"e\":null,\"f\":true,\"g\":[\"q\"]}",
               "json is compact, in insertion order");
    mh_val_t back;
    const char *why;
    TAP_EQ_INT(mh_json_decode(&A, (const uint8_t *)js, strlen(js), NULL, &back, &why), 0, "json decodes back");
    TAP_OK(mh_val_equal(root, &back), "json round trip equal");
}

/* ------------------------------------------- msgpack types and boundaries */

static void check_uint(uint64_t u, uint8_t first)
{
    mh_val_t v = mh_v_uint(u), back;
    mh_buf_t b = enc_mp(&v);
    const char *why;
    int rc = dec(b.p, b.len, &back, &why);
    TAP_OK(rc == 0 && back.t == MH_V_UINT && back.v.u == u && b.p[0] == first, "uint %llu (0x%02x)",
           (unsigned long long)u, first);
    mh_buf_free(&b);
}

static void check_int(int64_t i, uint8_t first)
{
    mh_val_t v = {.t = MH_V_INT, .v.i = i}, back;
    mh_buf_t b = enc_mp(&v);
    const char *why;
    int rc = dec(b.p, b.len, &back, &why);
    TAP_OK(rc == 0 && back.t == MH_V_INT && back.v.i == i && b.p[0] == first, "int %lld (0x%02x)", (long long)i,
           first);
    mh_buf_free(&b);
}

static void check_strbin(bool is_bin, size_t n, uint8_t first)
{
    char *data = malloc(n + 1);
    memset(data, 'a', n);
    mh_val_t v = is_bin ? mh_v_bin(data, n) : mh_v_strn(data, n), back;
    mh_buf_t b = enc_mp(&v);
    const char *why;
    int rc = dec(b.p, b.len, &back, &why);
    TAP_OK(rc == 0 && mh_val_equal(&v, &back) && b.p[0] == first, "%s of %zu bytes (0x%02x)", is_bin ? "bin" : "str", n,
           first);
    /* one byte short must fail */
    TAP_OK(dec(b.p, b.len - 1, &back, &why) == MH_EPARSE, "%s of %zu bytes, truncated: error", is_bin ? "bin" : "str",
           n);
    mh_buf_free(&b);
    free(data);
}

static void check_container(bool is_map, uint32_t n, uint8_t first)
{
    mh_val_t *c = is_map ? mh_v_map(&A) : mh_v_arr(&A);
    for (uint32_t i = 0; i < n; i++) {
        if (is_map) mh_map_put(&A, c, "k", mh_v_int(i & 0x7f));
        else mh_arr_push(&A, c, mh_v_int(i & 0x7f));
    }
    mh_buf_t b = enc_mp(c);
    mh_val_t back;
    const char *why;
    int rc = dec(b.p, b.len, &back, &why);
    TAP_OK(rc == 0 && mh_val_equal(c, &back) && b.p[0] == first, "%s of %u (0x%02x)", is_map ? "map" : "array", n, first);
    mh_buf_free(&b);
}

static void test_boundaries(void)
{
    check_uint(0, 0x00);
    check_uint(127, 0x7f);
    check_uint(128, 0xcc);
    check_uint(255, 0xcc);
    check_uint(256, 0xcd);
    check_uint(65535, 0xcd);
    check_uint(65536, 0xce);
    check_uint(UINT32_MAX, 0xce);
    check_uint((uint64_t)UINT32_MAX + 1, 0xcf);
    check_uint(UINT64_MAX, 0xcf);
    check_int(-1, 0xff);
    check_int(-32, 0xe0);
    check_int(-33, 0xd0);
    check_int(-128, 0xd0);
    check_int(-129, 0xd1);
    check_int(-32768, 0xd1);
    check_int(-32769, 0xd2);
    check_int(INT32_MIN, 0xd2);
    check_int((int64_t)INT32_MIN - 1, 0xd3);
    check_int(INT64_MIN, 0xd3);
    check_strbin(false, 0, 0xa0);
    check_strbin(false, 31, 0xbf);
    check_strbin(false, 32, 0xd9);
    check_strbin(false, 255, 0xd9);
    check_strbin(false, 256, 0xda);
    check_strbin(false, 65535, 0xda);
    check_strbin(false, 65536, 0xdb);
    check_strbin(true, 0, 0xc4);
    check_strbin(true, 255, 0xc4);
    check_strbin(true, 256, 0xc5);
    check_strbin(true, 65535, 0xc5);
    check_strbin(true, 65536, 0xc6);
    check_container(false, 0, 0x90);
    check_container(false, 15, 0x9f);
    check_container(false, 16, 0xdc);
    check_container(false, 65535, 0xdc);
    check_container(false, 65536, 0xdd);
    check_container(true, 0, 0x80);
    check_container(true, 15, 0x8f);
    check_container(true, 16, 0xde);
    check_container(true, 65536, 0xdf);

    /* hand-made encodings msgpack-c never emits */
    mh_val_t v;
    const char *why;
    static const uint8_t f32[] = {0xca, 0x3f, 0xc0, 0x00, 0x00}; /* 1.5f */
    TAP_OK(dec(f32, sizeof f32, &v, &why) == 0 && v.t == MH_V_FLOAT && v.v.f == 1.5, "float32");
    static const uint8_t f64[] = {0xcb, 0xc0, 0x04, 0, 0, 0, 0, 0, 0}; /* -2.5 */
    TAP_OK(dec(f64, sizeof f64, &v, &why) == 0 && v.t == MH_V_FLOAT && v.v.f == -2.5, "float64");
    static const uint8_t i8pos[] = {0xd0, 0x05};
    TAP_OK(dec(i8pos, 2, &v, &why) == 0 && v.t == MH_V_UINT && v.v.u == 5, "non-negative int8 becomes UINT");
    static const uint8_t i64neg[] = {0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe};
    TAP_OK(dec(i64neg, sizeof i64neg, &v, &why) == 0 && v.t == MH_V_INT && v.v.i == -2, "int64 -2");
    static const uint8_t i16[] = {0xd1, 0x80, 0x00};
    TAP_OK(dec(i16, 3, &v, &why) == 0 && v.t == MH_V_INT && v.v.i == -32768, "int16 sign extension");
    static const uint8_t s8short[] = {0xd9, 0x02, 'h', 'i'};
    TAP_OK(dec(s8short, 4, &v, &why) == 0 && mh_val_streq(&v, "hi"), "non-minimal str8");
    static const uint8_t nilb[] = {0xc0}, tb[] = {0xc3}, fb[] = {0xc2};
    TAP_OK(dec(nilb, 1, &v, &why) == 0 && v.t == MH_V_NIL, "nil");
    TAP_OK(dec(tb, 1, &v, &why) == 0 && v.t == MH_V_BOOL && v.v.b, "true");
    TAP_OK(dec(fb, 1, &v, &why) == 0 && v.t == MH_V_BOOL && !v.v.b, "false");
    static const uint8_t intkey[] = {0x81, 0x01, 0xa1, 'x'};
    TAP_OK(dec(intkey, 4, &v, &why) == 0 && v.t == MH_V_MAP && v.v.m.kv[0].k.t == MH_V_UINT, "non-str map key kept");
}

/* ------------------------------------------------------------- malformed */

static void test_truncation(void)
{
    mh_val_t *root = sample();
    mh_buf_t b = enc_mp(root);
    int bad = 0;
    for (size_t cut = 0; cut < b.len; cut++) {
        /* a fresh heap copy of exactly `cut` bytes, so ASan sees overreads */
        uint8_t *p = malloc(cut ? cut : 1);
        memcpy(p, b.p, cut);
        mh_val_t v;
        const char *why = NULL;
        int rc = dec(p, cut, &v, &why);
        if (rc != MH_EPARSE || !why) bad++;
        free(p);
    }
    TAP_OK(bad == 0, "truncation at each of %zu byte positions is MH_EPARSE with a reason (%d bad)", b.len, bad);
    mh_buf_free(&b);
}

static void test_malformed(void)
{
    mh_val_t v;
    const char *why = NULL;
    static const uint8_t arr32[] = {0xdd, 0xff, 0xff, 0xff, 0xff};
    TAP_EQ_INT(dec(arr32, 5, &v, &why), MH_EPARSE, "dd ff ff ff ff (array32 of 4G) refused without allocating");
    static const uint8_t map32[] = {0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0, 0xc0};
    TAP_EQ_INT(dec(map32, sizeof map32, &v, &why), MH_EPARSE, "df ff ff ff ff (map32 of 4G) refused");
    static const uint8_t str32[] = {0xdb, 0xff, 0xff, 0xff, 0xff, 'a'};
    TAP_EQ_INT(dec(str32, sizeof str32, &v, &why), MH_EPARSE, "str32 longer than input refused");
    static const uint8_t bin32[] = {0xc6, 0x7f, 0xff, 0xff, 0xff};
    TAP_EQ_INT(dec(bin32, sizeof bin32, &v, &why), MH_EPARSE, "bin32 longer than input refused");
    /* a map of 2 pairs needs >= 4 bytes: 3 are refused up front */
    static const uint8_t map2short[] = {0x82, 0xc0, 0xc0, 0xc0};
    TAP_EQ_INT(dec(map2short, sizeof map2short, &v, &why), MH_EPARSE, "map count vs bytes left (2 per pair)");

    uint8_t deep[1001];
    memset(deep, 0x91, 1000);
    deep[1000] = 0xc0;
    TAP_EQ_INT(dec(deep, sizeof deep, &v, &why), MH_ELIMIT, "depth 1000 refused (MH_ELIMIT)");
    TAP_EQ_INT(dec_lim(deep + 1000 - 32, 33, 32, 100, &v), 0, "depth 32 accepted at max_depth 32");
    TAP_EQ_INT(dec_lim(deep + 1000 - 33, 34, 32, 100, &v), MH_ELIMIT, "depth 33 refused at max_depth 32");

    static const uint8_t items[] = {0x93, 0x01, 0x02, 0x92, 0x03, 0x04};
    TAP_EQ_INT(dec_lim(items, sizeof items, 8, 5, &v), 0, "5 items within max_items 5");
    TAP_EQ_INT(dec_lim(items, sizeof items, 8, 4, &v), MH_ELIMIT, "5 items over max_items 4");

    static const uint8_t trailing[] = {0x01, 0x02};
    TAP_EQ_INT(dec(trailing, 2, &v, &why), MH_EPARSE, "trailing bytes refused");
    TAP_EQ_INT(dec(NULL, 0, &v, &why), MH_EPARSE, "empty input refused");
    static const uint8_t c1[] = {0xc1};
    TAP_EQ_INT(dec(c1, 1, &v, &why), MH_EPARSE, "reserved 0xc1 refused");
    static const uint8_t fixext[] = {0xd4, 0x01, 0x00};
    TAP_EQ_INT(dec(fixext, 3, &v, &why), MH_EPARSE, "fixext refused");
    static const uint8_t ts[] = {0xd6, 0xff, 0, 0, 0, 0};
    TAP_EQ_INT(dec(ts, sizeof ts, &v, &why), MH_EPARSE, "timestamp ext refused");
    static const uint8_t ext8[] = {0xc7, 0x01, 0x05, 0x00};
    TAP_EQ_INT(dec(ext8, sizeof ext8, &v, &why), MH_EPARSE, "ext8 refused");
    TAP_OK(why != NULL, "a reason is given (%s)", why ? why : "");
}

/* ------------------------------------------------------------------ JSON */

static int jdec(const char *s, mh_val_t *v, const char **why)
{
    return mh_json_decode(&A, (const uint8_t *)s, strlen(s), NULL, v, why);
}

static void test_json_decode(void)
{
    mh_val_t v;
    const char *why = NULL;
    TAP_EQ_INT(jdec("{\"a\":1,\"a\":2}", &v, &why), MH_EPARSE, "duplicate keys refused");
    TAP_OK(why && *why, "duplicate: reason '%s'", why ? why : "");
    TAP_EQ_INT(jdec("{\"a\":1} x", &v, &why), MH_EPARSE, "trailing garbage refused");
    TAP_EQ_INT(jdec("", &v, &why), MH_EPARSE, "empty body refused");
    TAP_EQ_INT(jdec("{\"a\":\"\xff\"}", &v, &why), MH_EPARSE, "invalid UTF-8 input refused");
    TAP_EQ_INT(jdec("[1, -2, 3.5, 18446744073709551615]", &v, &why), MH_EPARSE, "integer over int64 refused");
    TAP_EQ_INT(jdec("[1, -2, 3.5, true, null, \"s\"]", &v, &why), 0, "array of scalars");
    TAP_OK(v.t == MH_V_ARR && v.v.a.items[0].t == MH_V_UINT && v.v.a.items[1].t == MH_V_INT &&
               v.v.a.items[1].v.i == -2 && v.v.a.items[2].t == MH_V_FLOAT && v.v.a.items[3].t == MH_V_BOOL &&
               v.v.a.items[4].t == MH_V_NIL && mh_val_streq(&v.v.a.items[5], "s"),
           "JSON types map to the view");
    TAP_EQ_INT(jdec("\"top\"", &v, &why), 0, "any top-level type accepted");

    char deep[2 * 100 + 1];
    memset(deep, '[', 100);
    memset(deep + 100, ']', 100);
    deep[200] = 0;
    TAP_EQ_INT(jdec(deep, &v, &why), MH_ELIMIT, "depth 100 over max_depth 32 refused");
    char *deeper = malloc(2 * 5000 + 1);
    memset(deeper, '[', 5000);
    memset(deeper + 5000, ']', 5000);
    deeper[10000] = 0;
    TAP_OK(jdec(deeper, &v, &why) != 0, "depth 5000 refused (jansson's own limit)");
    free(deeper);

    TAP_EQ_INT(jdec("{\"m\":\"a\\u0000b\",\"k\":\"ok\"}", &v, &why), 0, "\\u0000 kept in a string");
    const mh_val_t *m = mh_val_get(&v, "m");
    TAP_OK(m && m->v.s.n == 3 && m->v.s.p[1] == 0, "string with NUL keeps its length");
    TAP_OK(mh_val_cstr(&A, m) == NULL, "mh_val_cstr refuses a string with NUL");
    TAP_EQ_STR(mh_val_cstr(&A, mh_val_get(&v, "k")), "ok", "mh_val_cstr copies");
    TAP_OK(mh_val_cstr(&A, &v) == NULL, "mh_val_cstr of a map is NULL");
}

/* ---------------------------------------------------------- JSON output */

static void test_json_encode(void)
{
    mh_val_t *root = mh_v_map(&A);
    mh_map_put(&A, root, "bad", mh_v_strn("a\xff" "b\xc3", 4));
    mh_map_put(&A, root, "sur", mh_v_strn("\xed\xa0\x80z", 4));
    mh_map_put(&A, root, "bin", mh_v_bin("hello", 5));
    mh_map_put(&A, root, "nan", mh_v_float(NAN));
    mh_map_put(&A, root, "inf", mh_v_float(INFINITY));
    mh_map_put(&A, root, "big", mh_v_uint(UINT64_MAX));
    char *js = enc_json(root);
    TAP_EQ_STR(js,
               "{\"bad\":\"a\xef\xbf\xbd" "b\xef\xbf\xbd\",\"sur\":\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbdz\","
               "\"bin\":\"aGVsbG8=\",\"nan\":null,\"inf\":null,\"big\":1.8446744073709552e19}",
               "invalid UTF-8 -> U+FFFD, bin -> base64, NaN/Inf -> null, huge uint -> real");

    /* invalid UTF-8 in a key, and non-str keys from msgpack input */
    static const uint8_t mp[] = {0x83, 0xa2, 0xff, 'k', 0x01, 0x07, 0x02, 0xc3, 0xa1, 'v'};
    mh_val_t v;
    const char *why;
    TAP_EQ_INT(dec(mp, sizeof mp, &v, &why), 0, "map with odd keys decodes");
    TAP_EQ_STR(enc_json(&v), "{\"\xef\xbf\xbdk\":1,\"7\":2,\"true\":\"v\"}", "odd keys become JSON strings");

    mh_val_t *ak = mh_v_map(&A);
    mh_kv_t kv[1] = {{.k = {.t = MH_V_ARR}, .v = {.t = MH_V_NIL}}};
    ak->v.m.kv = kv;
    ak->v.m.n = 1;
    mh_buf_t b = {0};
    mh_buf_append(&b, "xy", 2);
    TAP_OK(mh_encode(ak, MH_FMT_JSON, &b) != 0 && b.len == 2, "array key: error, nothing appended");
    mh_buf_free(&b);
    TAP_EQ_STR(enc_json(&(mh_val_t){.t = MH_V_UINT, .v.u = 5}), "5", "scalar at top level");
}

/* ------------------------------------------------------- helpers, growth */

static void test_values(void)
{
    mh_val_t *m = mh_v_map(&A);
    int ok = 1;
    char *keys[1000];
    for (int i = 0; i < 1000; i++) {
        keys[i] = mh_sprintf(&A, "key%d", i);
        ok &= mh_map_put(&A, m, keys[i], mh_v_int(i)) == 0;
    }
    for (int i = 0; i < 1000; i++) {
        const mh_val_t *v = mh_val_get(m, keys[i]);
        ok &= v && v->t == MH_V_UINT && v->v.u == (uint64_t)i;
    }
    TAP_OK(ok && m->v.m.n == 1000, "map grows to 1000 pairs, lookups find them");
    TAP_OK(mh_val_get(m, "nope") == NULL && mh_val_get(NULL, "x") == NULL, "absent key is NULL");
    TAP_OK(mh_map_put(&A, mh_v_arr(&A), "k", mh_v_nil()) == MH_EINVAL, "map_put on an array: MH_EINVAL");

    /* mh_val_equal: deep, typed, NaN equal to NaN */
    mh_val_t nan1 = mh_v_float(NAN), nan2 = mh_v_float(NAN), one_i = mh_v_int(-1), one_u = mh_v_uint(1);
    TAP_OK(mh_val_equal(&nan1, &nan2) && mh_val_equal(m, m), "equal: NaN to NaN, a map to itself");
    mh_val_t i1 = mh_v_int(1);
    TAP_OK(!mh_val_equal(&one_i, &one_u) && mh_val_equal(&i1, &one_u), "equal: by type and value (1 is UINT)");
    mh_val_t *m2 = mh_v_map(&A);
    for (int i = 0; i < 999; i++) mh_map_put(&A, m2, keys[i], mh_v_int(i));
    TAP_OK(!mh_val_equal(m, m2), "equal: a map with one pair fewer differs");
    mh_map_put(&A, m2, keys[999], mh_v_int(1000));
    TAP_OK(!mh_val_equal(m, m2), "equal: a different value differs");

    /* decoded containers can grow too */
    static const uint8_t three[] = {0x93, 0x01, 0x02, 0x03};
    mh_val_t d;
    const char *why;
    dec(three, sizeof three, &d, &why);
    ok = 1;
    for (int i = 0; i < 100; i++) ok &= mh_arr_push(&A, &d, mh_v_int(i)) == 0;
    ok &= d.v.a.n == 103 && d.v.a.items[2].v.u == 3 && d.v.a.items[102].v.u == 99;
    TAP_OK(ok, "a decoded array grows by push");
    static const uint8_t onemap[] = {0x81, 0xa1, 'a', 0x01};
    dec(onemap, sizeof onemap, &d, &why);
    ok = 1;
    for (int i = 0; i < 20; i++) ok &= mh_map_put(&A, &d, keys[i], mh_v_int(i)) == 0;
    TAP_OK(ok && d.v.m.n == 21 && mh_val_get(&d, "a")->v.u == 1 && mh_val_get(&d, "key19")->v.u == 19,
           "a decoded map grows by put");

    TAP_OK(mh_utf8_valid("", 0) && mh_utf8_valid("ascii", 5), "utf8: ascii");
    TAP_OK(mh_utf8_valid("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf", 13), "utf8: 2,3,4-byte, U+10FFFF");
    TAP_OK(!mh_utf8_valid("\xc0\x80", 2), "utf8: overlong 2-byte NUL refused");
    TAP_OK(!mh_utf8_valid("\xe0\x80\x80", 3), "utf8: overlong 3-byte refused");
    TAP_OK(!mh_utf8_valid("\xf0\x80\x80\x80", 4), "utf8: overlong 4-byte refused");
    TAP_OK(!mh_utf8_valid("\xed\xa0\x80", 3), "utf8: surrogate refused");
    TAP_OK(!mh_utf8_valid("\xf4\x90\x80\x80", 4), "utf8: above U+10FFFF refused");
    TAP_OK(!mh_utf8_valid("\xe2\x82", 2), "utf8: truncated refused");
    TAP_OK(!mh_utf8_valid("\x80", 1) && !mh_utf8_valid("\xff", 1), "utf8: stray bytes refused");
}

/* --------------------------------------------------- the streaming packer */

static void test_mpw(void)
{
    mh_buf_t b = {0};
    mh_mpw_t w;
    mh_mpw_init(&w, &b);
    mh_mpw_map(&w, 3);
    mh_mpw_cstr(&w, "blob");
    mh_mpw_bin_header(&w, 3);
    mh_buf_append(&b, "abc", 3); /* the caller appends the body */
    mh_mpw_cstr(&w, "list");
    mh_mpw_arr(&w, 4);
    mh_mpw_nil(&w);
    mh_mpw_bool(&w, true);
    mh_mpw_int(&w, -7);
    mh_mpw_str(&w, "xyz", 2);
    mh_mpw_cstr(&w, "raw");
    mh_mpw_raw(&w, "\x92\x01\x02", 3);
    TAP_EQ_INT(w.err, 0, "mpw: no error");
    mh_val_t v;
    const char *why;
    TAP_EQ_INT(dec(b.p, b.len, &v, &why), 0, "mpw output decodes");
    const mh_val_t *blob = mh_val_get(&v, "blob"), *list = mh_val_get(&v, "list"), *raw = mh_val_get(&v, "raw");
    TAP_OK(blob && blob->t == MH_V_BIN && blob->v.s.n == 3 && memcmp(blob->v.s.p, "abc", 3) == 0, "mpw: bin header + body");
    TAP_OK(list && list->v.a.n == 4 && list->v.a.items[2].v.i == -7 && mh_val_streq(&list->v.a.items[3], "xy"),
           "mpw: array items");
    TAP_OK(raw && raw->t == MH_V_ARR && raw->v.a.n == 2, "mpw: raw splice");

    /* mh_mpw_val writes decoded values back verbatim */
    mh_buf_t b2 = {0};
    mh_mpw_init(&w, &b2);
    mh_mpw_val(&w, &v);
    TAP_OK(w.err == 0 && b2.len == b.len && memcmp(b.p, b2.p, b.len) == 0, "mpw_val re-encodes identically");
    mh_buf_free(&b);
    mh_buf_free(&b2);
}

int main(void)
{
    mh_arena_init(&A, 0);
    test_roundtrip_msgpack();
    test_roundtrip_json();
    test_boundaries();
    test_truncation();
    test_malformed();
    test_json_decode();
    test_json_encode();
    test_values();
    test_mpw();
    mh_arena_release(&A);
    return tap_done();
}
