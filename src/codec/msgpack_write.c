/*
 * msgpack_write.c — msgpack output through msgpack-c's packer, writing
 * into an mh_buf_t (codec.h: mh_mpw_*, and mh_encode's msgpack half).
 *
 * msgpack-c's packer is a pair (data, write callback) whose pack functions
 * are static inline, so building one on the stack per call costs nothing
 * and keeps msgpack.h out of our public header. Errors are sticky: after
 * the first failed append every later call is a no-op, and the caller
 * checks w->err once at the end.
 */
#include <msgpack.h>
#include <string.h>

#include "codec_internal.h"

static int write_cb(void *data, const char *buf, size_t len)
{
    mh_mpw_t *w = data;
    if (w->err) return -1;
    int rc = mh_buf_append(w->out, buf, len);
    if (rc) {
        w->err = rc;
        return -1;
    }
    return 0;
}

/* Declares `pk` bound to w, or returns early when w already failed. */
#define PACKER(w)                                                              \
    msgpack_packer pk;                                                         \
    if ((w)->err) return;                                                      \
    msgpack_packer_init(&pk, (w), write_cb)

void mh_mpw_init(mh_mpw_t *w, mh_buf_t *out)
{
    w->out = out;
    w->err = 0;
}

void mh_mpw_map(mh_mpw_t *w, uint32_t n)
{
    PACKER(w);
    msgpack_pack_map(&pk, n);
}

void mh_mpw_arr(mh_mpw_t *w, uint32_t n)
{
    PACKER(w);
    msgpack_pack_array(&pk, n);
}

void mh_mpw_str(mh_mpw_t *w, const char *p, size_t n)
{
    PACKER(w);
    if (n > UINT32_MAX) {
        w->err = MH_EINVAL; /* not representable in msgpack */
        return;
    }
    msgpack_pack_str(&pk, n);
    if (n) msgpack_pack_str_body(&pk, p, n);
}

void mh_mpw_cstr(mh_mpw_t *w, const char *s)
{
    mh_mpw_str(w, s ? s : "", s ? strlen(s) : 0);
}

void mh_mpw_bin_header(mh_mpw_t *w, size_t n)
{
    PACKER(w);
    if (n > UINT32_MAX) {
        w->err = MH_EINVAL;
        return;
    }
    msgpack_pack_bin(&pk, n);
}

void mh_mpw_bin(mh_mpw_t *w, const void *p, size_t n)
{
    mh_mpw_bin_header(w, n);
    PACKER(w);
    if (n) msgpack_pack_bin_body(&pk, p, n);
}

void mh_mpw_nil(mh_mpw_t *w)
{
    PACKER(w);
    msgpack_pack_nil(&pk);
}

void mh_mpw_bool(mh_mpw_t *w, bool b)
{
    PACKER(w);
    if (b) msgpack_pack_true(&pk);
    else msgpack_pack_false(&pk);
}

void mh_mpw_int(mh_mpw_t *w, int64_t i)
{
    PACKER(w);
    msgpack_pack_int64(&pk, i); /* msgpack-c picks the smallest width */
}

void mh_mpw_uint(mh_mpw_t *w, uint64_t u)
{
    PACKER(w);
    msgpack_pack_uint64(&pk, u);
}

void mh_mpw_float(mh_mpw_t *w, double f)
{
    PACKER(w);
    msgpack_pack_double(&pk, f);
}

void mh_mpw_raw(mh_mpw_t *w, const void *p, size_t n)
{
    if (w->err || n == 0) return;
    int rc = mh_buf_append(w->out, p, n);
    if (rc) w->err = rc;
}

void mh_mpw_val(mh_mpw_t *w, const mh_val_t *v)
{
    if (w->err) return;
    switch (v->t) {
    case MH_V_NIL: mh_mpw_nil(w); break;
    case MH_V_BOOL: mh_mpw_bool(w, v->v.b); break;
    case MH_V_INT: mh_mpw_int(w, v->v.i); break;
    case MH_V_UINT: mh_mpw_uint(w, v->v.u); break;
    case MH_V_FLOAT: mh_mpw_float(w, v->v.f); break;
    case MH_V_STR: mh_mpw_str(w, v->v.s.p, v->v.s.n); break;
    case MH_V_BIN: mh_mpw_bin(w, v->v.s.p, v->v.s.n); break;
    case MH_V_ARR:
        mh_mpw_arr(w, v->v.a.n);
        for (uint32_t i = 0; i < v->v.a.n && !w->err; i++) mh_mpw_val(w, &v->v.a.items[i]);
        break;
    case MH_V_MAP:
        mh_mpw_map(w, v->v.m.n);
        for (uint32_t i = 0; i < v->v.m.n && !w->err; i++) {
            mh_mpw_val(w, &v->v.m.kv[i].k);
            mh_mpw_val(w, &v->v.m.kv[i].v);
        }
        break;
    default: w->err = MH_EINVAL; break;
    }
}
