/*
 * frame.c — v2 frame helpers around libzstd (SPEC 2.1): the compression
 * parameters every writer path shares, the sizer that learns a stream's
 * compressed length without keeping it, the bounded decompressor that
 * serves one blob out of a frame, and the mpack:// byte-range URIs.
 *
 * Determinism: a frame's bytes depend only on its content, the level and
 * the libzstd version. Every compressing path (built frames in one call,
 * large frames streamed, the sizer) sets the same parameters from
 * mh__zcctx_frame on a freshly reset context: level, the content size
 * pledged (it goes in the frame header and lets small frames use small
 * windows), no checksum (every blob is hashed against its id anyway).
 * Single-threaded streaming compression buffers input into whole blocks
 * before compressing, so how the caller splits the content into pieces
 * does not change the output (a unit test checks 1-byte pieces against
 * one piece), which is what lets the sizer's count match the writer.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "mpack_internal.h"

#define FOUT_CAP ((size_t)128 << 10)

int mh__zlevel(int level, int *out)
{
    if (level == 0) level = 3;
    if (level < 1 || level > 19) return MH_EINVAL;
    *out = level;
    return 0;
}

int mh__zcctx_frame(void *cctx, int level, uint64_t size)
{
    ZSTD_CCtx *c = cctx;
    size_t e = ZSTD_CCtx_reset(c, ZSTD_reset_session_and_parameters);
    if (!ZSTD_isError(e)) e = ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level);
    if (!ZSTD_isError(e)) e = ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 0);
    if (!ZSTD_isError(e)) e = ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 1);
    if (!ZSTD_isError(e) && size != UINT64_MAX) e = ZSTD_CCtx_setPledgedSrcSize(c, size);
    if (ZSTD_isError(e)) return ZSTD_getErrorCode(e) == ZSTD_error_memory_allocation ? MH_ENOMEM : MH_EINVAL;
    return 0;
}

/* ---------------------------------------------------------------- sizer */

struct mh_zsizer {
    ZSTD_CCtx *c;
    uint64_t size, fed, out;
    uint8_t *buf;
    int err;
};

int mh_zsizer_new(int level, uint64_t size, mh_zsizer_t **out)
{
    *out = NULL;
    int lv;
    if (mh__zlevel(level, &lv) || size == UINT64_MAX) return MH_EINVAL;
    mh_zsizer_t *s = calloc(1, sizeof *s);
    if (!s) return MH_ENOMEM;
    s->c = ZSTD_createCCtx();
    s->buf = malloc(FOUT_CAP);
    s->size = size;
    int rc = !s->c || !s->buf ? MH_ENOMEM : mh__zcctx_frame(s->c, lv, size);
    if (rc) {
        mh_zsizer_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

/* Runs the compressor over in (mode continue/end), counting the output. */
static int sizer_run(mh_zsizer_t *s, ZSTD_inBuffer *in, ZSTD_EndDirective mode)
{
    for (;;) {
        ZSTD_outBuffer o = {s->buf, FOUT_CAP, 0};
        size_t left = ZSTD_compressStream2(s->c, &o, in, mode);
        if (ZSTD_isError(left))
            return s->err = ZSTD_getErrorCode(left) == ZSTD_error_memory_allocation ? MH_ENOMEM : MH_EINVAL;
        s->out += o.pos;
        if (mode == ZSTD_e_end ? left == 0 : in->pos == in->size) return 0;
    }
}

int mh_zsizer_update(mh_zsizer_t *s, const void *p, size_t n)
{
    if (s->err) return s->err;
    if (n > s->size - s->fed) return s->err = MH_EINVAL;
    s->fed += n;
    ZSTD_inBuffer in = {p, n, 0};
    return sizer_run(s, &in, ZSTD_e_continue);
}

int mh_zsizer_final(mh_zsizer_t *s, uint64_t *compressed_len)
{
    if (s->err) return s->err;
    if (s->fed != s->size) return s->err = MH_EINVAL;
    ZSTD_inBuffer in = {NULL, 0, 0};
    int rc = sizer_run(s, &in, ZSTD_e_end);
    if (!rc) *compressed_len = s->out;
    return rc;
}

void mh_zsizer_free(mh_zsizer_t *s)
{
    if (!s) return;
    ZSTD_freeCCtx(s->c);
    free(s->buf);
    free(s);
}

/* --------------------------------------------------------------- framer */

struct mh_framer {
    int codec;
    uint64_t size, off, len;
    uint64_t target;   /* bytes to decompress: off + len, or size + 1 when the range runs to the end
                          (one byte past size is the error) */
    uint64_t produced; /* decompressed (or, for none, passed) bytes so far */
    bool zdone;
    int err;
    const char *why;
    ZSTD_DCtx *d;
    uint8_t *buf;
};

int mh_framer_new(int codec, uint64_t size, uint64_t off, uint64_t len, uint32_t max_window_log, mh_framer_t **out)
{
    *out = NULL;
    if ((codec != MH_PACK_ZSTD && codec != MH_PACK_NONE) || off > size || len > size - off) return MH_EINVAL;
    mh_framer_t *f = calloc(1, sizeof *f);
    if (!f) return MH_ENOMEM;
    f->codec = codec;
    f->size = size;
    f->off = off;
    f->len = len;
    f->target = off + len == size && size != UINT64_MAX ? size + 1 : off + len;
    if (codec == MH_PACK_ZSTD) {
        f->d = ZSTD_createDCtx();
        f->buf = malloc(FOUT_CAP);
        if (!f->d || !f->buf) {
            mh_framer_free(f);
            return MH_ENOMEM;
        }
        size_t e = ZSTD_DCtx_setParameter(f->d, ZSTD_d_windowLogMax, (int)(max_window_log ? max_window_log : 24));
        if (ZSTD_isError(e)) {
            mh_framer_free(f);
            return MH_EINVAL;
        }
    }
    *out = f;
    return 0;
}

static int ffail(mh_framer_t *f, int err, const char *why)
{
    if (!f->err) {
        f->err = err;
        f->why = why;
    }
    return f->err;
}

/* Hands the part of [start, start + n) of the decompressed bytes that
 * falls inside the range to the callback. */
static int emit(mh_framer_t *f, const uint8_t *p, size_t n, mh_frame_out_cb cb, void *ud)
{
    uint64_t start = f->produced, end = start + n;
    f->produced = end;
    if (end > f->size) return ffail(f, MH_EPARSE, "frame data decompresses to more than size bytes");
    uint64_t lo = start > f->off ? start : f->off, hi = end < f->off + f->len ? end : f->off + f->len;
    if (lo >= hi) return 0;
    int rc = cb(ud, p + (lo - start), (size_t)(hi - lo));
    return rc ? ffail(f, rc, "the output callback failed") : 0;
}

int mh_framer_feed_some(mh_framer_t *f, const void *p, size_t n, uint64_t max_out, mh_frame_out_cb cb, void *ud,
                        size_t *used)
{
    *used = 0;
    if (f->err) return f->err;
    if (f->codec == MH_PACK_NONE) {
        /* The bytes are the data: at most max_out of them at a time. */
        size_t take = max_out < n ? (size_t)max_out : n;
        if (take > f->size - f->produced) return ffail(f, MH_EPARSE, "frame data is longer than size");
        *used = take;
        return emit(f, p, take, cb, ud);
    }
    ZSTD_inBuffer in = {p, n, 0};
    uint64_t out = 0;
    while (!f->zdone && f->produced < f->target && out < max_out) {
        uint64_t room = f->target - f->produced;
        ZSTD_outBuffer o = {f->buf, room < FOUT_CAP ? (size_t)room : FOUT_CAP, 0};
        size_t ret = ZSTD_decompressStream(f->d, &o, &in);
        if (ZSTD_isError(ret)) {
            ZSTD_ErrorCode c = ZSTD_getErrorCode(ret);
            if (c == ZSTD_error_memory_allocation) return ffail(f, MH_ENOMEM, "out of memory");
            if (c == ZSTD_error_frameParameter_windowTooLarge)
                return ffail(f, MH_ELIMIT, "the zstd window is larger than the limit");
            return ffail(f, MH_EPARSE, "frame data is not a valid zstd frame");
        }
        out += o.pos;
        int rc = o.pos ? emit(f, f->buf, o.pos, cb, ud) : 0;
        if (rc) return rc;
        if (ret == 0) f->zdone = true;
        else if (in.pos == in.size && o.pos < o.size) break; /* needs more input */
    }
    if (f->zdone && in.pos < in.size) return ffail(f, MH_EPARSE, "bytes after the end of the zstd frame");
    /* Once the range is out, the rest of the input is not needed. */
    *used = f->zdone || f->produced >= f->target ? n : in.pos;
    return 0;
}

int mh_framer_feed(mh_framer_t *f, const void *p, size_t n, mh_frame_out_cb cb, void *ud)
{
    size_t used;
    if (f->codec == MH_PACK_NONE) {
        if (f->err) return f->err;
        if (n > f->size - f->produced) return ffail(f, MH_EPARSE, "frame data is longer than size");
        return emit(f, p, n, cb, ud);
    }
    return mh_framer_feed_some(f, p, n, UINT64_MAX, cb, ud, &used);
}

bool mh_framer_done(const mh_framer_t *f)
{
    return !f->err && f->produced >= f->off + f->len && (f->target == f->off + f->len || f->zdone ||
                                                          f->codec == MH_PACK_NONE);
}

int mh_framer_finish(mh_framer_t *f)
{
    if (f->err) return f->err;
    if (f->produced < f->off + f->len)
        return ffail(f, MH_EPARSE, f->codec == MH_PACK_ZSTD && !f->zdone ? "the zstd frame is truncated"
                                                                          : "frame data is shorter than size");
    if (f->target > f->size && f->produced < f->size) return ffail(f, MH_EPARSE, "frame data is shorter than size");
    if (f->codec == MH_PACK_ZSTD && f->target > f->size && !f->zdone)
        return ffail(f, MH_EPARSE, "the zstd frame is truncated");
    return 0;
}

const char *mh_framer_why(const mh_framer_t *f)
{
    return f->err ? f->why : NULL;
}

size_t mh_framer_mem(const mh_framer_t *f)
{
    return sizeof *f + (f->buf ? FOUT_CAP : 0) + (f->d ? ZSTD_sizeof_DCtx(f->d) : 0);
}

void mh_framer_free(mh_framer_t *f)
{
    if (!f) return;
    ZSTD_freeDCtx(f->d);
    free(f->buf);
    free(f);
}

static int append_cb(void *ud, const uint8_t *p, size_t n)
{
    return mh_buf_append(ud, p, n);
}

int mh_frame_extract(int codec, const uint8_t *data, size_t dlen, uint64_t size, uint64_t off, uint64_t len,
                     mh_buf_t *out)
{
    mh_framer_t *f;
    int rc = mh_framer_new(codec, size, off, len, 0, &f);
    if (rc) return rc;
    size_t mark = out->len;
    rc = mh_framer_feed(f, data, dlen, append_cb, out);
    if (!rc) rc = mh_framer_finish(f);
    if (rc) out->len = mark;
    mh_framer_free(f);
    return rc;
}

/* ------------------------------------------------------------- URIs */

int mh_blob_uri_format(const mh_blob_loc_t *l, char *out, size_t size)
{
    if (!mh_id_ok(l->mpack.s, strnlen(l->mpack.s, MH_ID_SIZE))) return MH_EINVAL;
    int n = l->framed ? snprintf(out, size, "mpack://%s#%llu:%llu/%llu:%llu", l->mpack.s,
                                 (unsigned long long)l->frame_offset, (unsigned long long)l->frame_length,
                                 (unsigned long long)l->offset, (unsigned long long)l->length)
                      : snprintf(out, size, "mpack://%s#%llu:%llu", l->mpack.s, (unsigned long long)l->offset,
                                 (unsigned long long)l->length);
    if (n < 0 || (size_t)n >= size) return MH_EINVAL;
    return n;
}

/* A canonical decimal number at *p (no sign, no leading zero). */
static bool num(const char **p, const char *end, uint64_t *v)
{
    const char *q = *p;
    if (q == end || *q < '0' || *q > '9') return false;
    if (*q == '0' && q + 1 < end && q[1] >= '0' && q[1] <= '9') return false;
    uint64_t x = 0;
    for (; q < end && *q >= '0' && *q <= '9'; q++) {
        if (x > (UINT64_MAX - (uint64_t)(*q - '0')) / 10) return false;
        x = x * 10 + (uint64_t)(*q - '0');
    }
    *p = q;
    *v = x;
    return true;
}

/* "<offset>:<length>" with offset + length within 64 bits. */
static bool range(const char **p, const char *end, uint64_t *off, uint64_t *len)
{
    if (!num(p, end, off) || *p == end || **p != ':') return false;
    (*p)++;
    return num(p, end, len) && *len <= UINT64_MAX - *off;
}

int mh_blob_uri_parse(const char *s, size_t n, mh_blob_loc_t *out)
{
    memset(out, 0, sizeof *out);
    const char *end = s + n;
    if (n < 8 + MH_ID_LEN + 4 || memcmp(s, "mpack://", 8) != 0 || !mh_id_ok(s + 8, MH_ID_LEN) ||
        s[8 + MH_ID_LEN] != '#')
        return MH_EPARSE;
    memcpy(out->mpack.s, s + 8, MH_ID_LEN);
    out->mpack.s[MH_ID_LEN] = 0;
    const char *p = s + 8 + MH_ID_LEN + 1;
    uint64_t a, b;
    if (!range(&p, end, &a, &b)) return MH_EPARSE;
    if (p == end) {
        out->offset = a;
        out->length = b;
        return 0;
    }
    if (*p != '/') return MH_EPARSE;
    p++;
    out->framed = true;
    out->frame_offset = a;
    out->frame_length = b;
    if (!range(&p, end, &out->offset, &out->length) || p != end) {
        memset(out, 0, sizeof *out);
        return MH_EPARSE;
    }
    return 0;
}
