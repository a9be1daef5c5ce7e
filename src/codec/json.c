/*
 * json.c — JSON through jansson, converted to and from the value view
 * (codec.h: mh_json_decode, mh_encode).
 *
 * Decoding: json_loadb with JSON_REJECT_DUPLICATES (a duplicated key is
 * ambiguous, and two parsers disagreeing on which one wins is a classic
 * smuggling bug), JSON_DECODE_ANY (the caller checks the top-level type)
 * and JSON_ALLOW_NUL ("\u0000" is kept, strings carry their length; fields
 * where a NUL is forbidden are checked by their users, and mh_val_cstr
 * refuses them). The EOF check stays on, so trailing garbage is an error.
 * jansson bounds nesting at 2048 on its own; the conversion walk enforces
 * the caller's smaller max_depth and max_items. Strings are copied into
 * the arena because the json_t tree is freed before returning.
 *
 * Encoding: the view becomes a json_t tree dumped with JSON_COMPACT.
 * jansson refuses strings that are not UTF-8 (json_stringn returns NULL),
 * and msgpack input may carry any bytes in a str, so such strings are
 * rewritten with U+FFFD for each maximal invalid subpart. BIN becomes a
 * base64 string, NaN/Inf become null, and a uint above INT64_MAX (which a
 * json_int_t cannot hold) becomes a real.
 */
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec_internal.h"

/* ---------------------------------------------------------------- decode */

typedef struct {
    mh_arena_t *a;
    const mh_decode_limits_t *lim;
    uint64_t items;
    const char *why;
} jd_t;

static int jd_fail(jd_t *d, int err, const char *why)
{
    d->why = why;
    return err;
}

static int jd_count(jd_t *d, size_t n, uint32_t depth)
{
    if (depth >= d->lim->max_depth) return jd_fail(d, MH_ELIMIT, "nesting deeper than the limit");
    if (n > (uint64_t)d->lim->max_items - d->items) return jd_fail(d, MH_ELIMIT, "more items than the limit");
    d->items += n;
    return 0;
}

static int jd_str(jd_t *d, const char *s, size_t n, mh_val_t *out)
{
    if (n > UINT32_MAX) return jd_fail(d, MH_ELIMIT, "string too long");
    char *c = mh_strndup(d->a, s, n);
    if (!c) return jd_fail(d, MH_ENOMEM, "out of memory");
    *out = mh_v_strn(c, n);
    return 0;
}

static int jd_val(jd_t *d, json_t *j, mh_val_t *out, uint32_t depth);

static int jd_arr(jd_t *d, json_t *j, mh_val_t *out, uint32_t depth)
{
    size_t n = json_array_size(j);
    int rc = jd_count(d, n, depth);
    if (rc) return rc;
    *out = (mh_val_t){.t = MH_V_ARR, .v.a.n = (uint32_t)n};
    if (n == 0) return 0;
    out->v.a.items = mh_alloc(d->a, mh_val_cap(n) * sizeof(mh_val_t));
    if (!out->v.a.items) return jd_fail(d, MH_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        rc = jd_val(d, json_array_get(j, i), &out->v.a.items[i], depth + 1);
        if (rc) return rc;
    }
    return 0;
}

static int jd_obj(jd_t *d, json_t *j, mh_val_t *out, uint32_t depth)
{
    size_t n = json_object_size(j);
    int rc = jd_count(d, n, depth);
    if (rc) return rc;
    *out = (mh_val_t){.t = MH_V_MAP, .v.m.n = (uint32_t)n};
    if (n == 0) return 0;
    mh_kv_t *kv = mh_alloc(d->a, mh_val_cap(n) * sizeof(mh_kv_t));
    if (!kv) return jd_fail(d, MH_ENOMEM, "out of memory");
    out->v.m.kv = kv;
    const char *key;
    size_t klen, i = 0;
    json_t *val;
    /* jansson iterates in insertion order, i.e. document order. */
    json_object_keylen_foreach(j, key, klen, val)
    {
        if ((rc = jd_str(d, key, klen, &kv[i].k))) return rc;
        if ((rc = jd_val(d, val, &kv[i].v, depth + 1))) return rc;
        i++;
    }
    return 0;
}

static int jd_val(jd_t *d, json_t *j, mh_val_t *out, uint32_t depth)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT: return jd_obj(d, j, out, depth);
    case JSON_ARRAY: return jd_arr(d, j, out, depth);
    case JSON_STRING: return jd_str(d, json_string_value(j), json_string_length(j), out);
    case JSON_INTEGER: *out = mh_v_int(json_integer_value(j)); return 0;
    case JSON_REAL: *out = (mh_val_t){.t = MH_V_FLOAT, .v.f = json_real_value(j)}; return 0;
    case JSON_TRUE: *out = mh_v_bool(true); return 0;
    case JSON_FALSE: *out = mh_v_bool(false); return 0;
    case JSON_NULL: *out = mh_v_nil(); return 0;
    }
    return jd_fail(d, MH_EPARSE, "unknown JSON type");
}

int mh_json_decode(mh_arena_t *a, const uint8_t *buf, size_t len, const mh_decode_limits_t *lim,
                   mh_val_t *out, const char **why)
{
    const char *dummy;
    if (!why) why = &dummy;
    *why = NULL;
    *out = mh_v_nil();
    json_error_t jerr;
    json_t *root = json_loadb((const char *)(buf ? buf : (const uint8_t *)""), len,
                              JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!root) {
        *why = mh_sprintf(a, "invalid JSON at byte %d: %s", jerr.position, jerr.text);
        if (!*why) *why = "invalid JSON";
        return MH_EPARSE;
    }
    jd_t d = {.a = a, .lim = lim ? lim : &mh_decode_limits_default};
    int rc = jd_val(&d, root, out, 0);
    json_decref(root);
    if (rc) {
        *why = d.why;
        *out = mh_v_nil();
    }
    return rc;
}

/* ---------------------------------------------------------------- encode */

/* A json string from bytes that may not be UTF-8: valid input is taken
 * as is, otherwise each maximal invalid subpart becomes U+FFFD. */
static json_t *je_string(const char *s, size_t n)
{
    if (mh_utf8_valid(s, n)) return json_stringn_nocheck(s ? s : "", n);
    char *fixed = malloc(n * 3 + 1); /* each bad byte grows to at most 3 */
    if (!fixed) return NULL;
    size_t o = 0, i = 0;
    const uint8_t *p = (const uint8_t *)s;
    while (i < n) {
        size_t adv;
        if (mh__utf8_step(p + i, n - i, &adv)) {
            memcpy(fixed + o, p + i, adv);
            o += adv;
        } else {
            memcpy(fixed + o, "\xEF\xBF\xBD", 3);
            o += 3;
        }
        i += adv;
    }
    json_t *j = json_stringn_nocheck(fixed, o);
    free(fixed);
    return j;
}

static json_t *je_bin(const char *p, size_t n)
{
    mh_arena_t tmp;
    mh_arena_init(&tmp, 0);
    char *b64 = NULL;
    size_t blen = 0;
    json_t *j = NULL;
    if (mh_base64_encode(&tmp, (const uint8_t *)p, n, &b64, &blen) == 0) j = json_stringn_nocheck(b64, blen);
    mh_arena_release(&tmp);
    return j;
}

static json_t *je_val(const mh_val_t *v);

/* Object keys are strings in JSON; scalar keys of other types (which only
 * msgpack input can produce) are written as their JSON text. */
static int je_key(const mh_val_t *k, json_t *obj, json_t *child)
{
    char num[40];
    json_t *ks = NULL;
    switch (k->t) {
    case MH_V_STR: ks = je_string(k->v.s.p, k->v.s.n); break;
    case MH_V_BIN: ks = je_bin(k->v.s.p, k->v.s.n); break;
    case MH_V_UINT: snprintf(num, sizeof num, "%" PRIu64, k->v.u); ks = json_string(num); break;
    case MH_V_INT: snprintf(num, sizeof num, "%" PRId64, k->v.i); ks = json_string(num); break;
    case MH_V_BOOL: ks = json_string(k->v.b ? "true" : "false"); break;
    case MH_V_NIL: ks = json_string("null"); break;
    case MH_V_FLOAT: snprintf(num, sizeof num, "%.17g", k->v.f); ks = json_string(num); break;
    default: break; /* arrays/maps as keys: not representable */
    }
    if (!ks) {
        json_decref(child);
        return MH_EINVAL;
    }
    int rc = json_object_setn_new_nocheck(obj, json_string_value(ks), json_string_length(ks), child);
    json_decref(ks);
    return rc ? MH_ENOMEM : 0;
}

static json_t *je_container(const mh_val_t *v)
{
    json_t *j = v->t == MH_V_ARR ? json_array() : json_object();
    if (!j) return NULL;
    uint32_t n = v->t == MH_V_ARR ? v->v.a.n : v->v.m.n;
    for (uint32_t i = 0; i < n; i++) {
        const mh_val_t *item = v->t == MH_V_ARR ? &v->v.a.items[i] : &v->v.m.kv[i].v;
        json_t *c = je_val(item);
        int rc = !c;
        if (!rc && v->t == MH_V_ARR) rc = json_array_append_new(j, c);
        else if (!rc) rc = je_key(&v->v.m.kv[i].k, j, c);
        if (rc) {
            json_decref(j);
            return NULL;
        }
    }
    return j;
}

static json_t *je_val(const mh_val_t *v)
{
    switch (v->t) {
    case MH_V_NIL: return json_null();
    case MH_V_BOOL: return json_boolean(v->v.b);
    case MH_V_INT: return json_integer(v->v.i);
    case MH_V_UINT:
        if (v->v.u <= (uint64_t)INT64_MAX) return json_integer((json_int_t)v->v.u);
        return json_real((double)v->v.u);
    case MH_V_FLOAT: return isfinite(v->v.f) ? json_real(v->v.f) : json_null();
    case MH_V_STR: return je_string(v->v.s.p, v->v.s.n);
    case MH_V_BIN: return je_bin(v->v.s.p, v->v.s.n);
    case MH_V_ARR:
    case MH_V_MAP: return je_container(v);
    }
    return NULL;
}

/* The dump callback's error is sticky: jansson 2.14 ignores a failing
 * callback inside some string writes and carries on, so without this a
 * failed append would drop a piece of the document and still succeed. */
typedef struct {
    mh_buf_t *out;
    int err;
} je_sink_t;

static int je_dump_cb(const char *buf, size_t size, void *data)
{
    je_sink_t *s = data;
    if (!s->err && mh_buf_append(s->out, buf, size)) s->err = MH_ENOMEM;
    return s->err ? -1 : 0;
}

static int encode_json(const mh_val_t *v, mh_buf_t *out)
{
    json_t *j = je_val(v);
    if (!j) return MH_ENOMEM; /* or an unencodable key; both are our bug or OOM */
    je_sink_t sink = {out, 0};
    int rc = json_dump_callback(j, je_dump_cb, &sink, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(j);
    return rc || sink.err ? MH_ENOMEM : 0;
}

int mh_encode(const mh_val_t *v, mh_format_t fmt, mh_buf_t *out)
{
    size_t mark = out->len;
    int rc;
    if (fmt == MH_FMT_MSGPACK) {
        mh_mpw_t w;
        mh_mpw_init(&w, out);
        mh_mpw_val(&w, v);
        rc = w.err;
    } else {
        rc = encode_json(v, out);
    }
    if (rc) out->len = mark; /* never leave half a document behind */
    return rc;
}
