/*
 * storetest.h — synchronous wrappers over the asynchronous store API for
 * the store unit tests (fs and s3): each starts one operation, runs the
 * loop until its callback fired, and checks the interface's promises:
 * the callback fires exactly once and never inside the starting call.
 * A broken promise returns STORETEST_BROKEN, which no MH_E* code equals.
 */
#ifndef MH_STORETEST_H
#define MH_STORETEST_H

#include <uv.h>

#include "mh/store.h"

#define STORETEST_BROKEN (-99999)

static uv_loop_t *loop;

typedef struct {
    int done;
    int err;
    bool reentrant; /* the callback ran inside the starting call */
    mh_buf_t buf;
    uint64_t size;
} res_t;

static bool in_call; /* true while a store call is on the stack */

static void get_cb(void *ud, int err, mh_buf_t *d)
{
    res_t *r = ud;
    r->done++;
    r->err = err;
    r->reentrant |= in_call;
    if (d) r->buf = *d; /* take the bytes */
}

static void done_cb(void *ud, int err)
{
    res_t *r = ud;
    r->done++;
    r->err = err;
    r->reentrant |= in_call;
}

static void head_cb(void *ud, int err, uint64_t size)
{
    res_t *r = ud;
    r->done++;
    r->err = err;
    r->size = size;
    r->reentrant |= in_call;
}

static void wait_for(res_t *r)
{
    while (!r->done) uv_run(loop, UV_RUN_ONCE);
}

#define CALL(expr)                                                                                                   \
    do {                                                                                                             \
        in_call = true;                                                                                              \
        expr;                                                                                                        \
        in_call = false;                                                                                             \
    } while (0)

static int finish(res_t *r, mh_buf_t *out)
{
    wait_for(r);
    if (out) *out = r->buf;
    else mh_buf_free(&r->buf);
    return r->done == 1 && !r->reentrant ? r->err : STORETEST_BROKEN;
}

static int do_get(mh_store_t *s, const char *key, uint64_t off, uint64_t len, mh_buf_t *out)
{
    res_t r = {0};
    CALL(mh_store_get(s, key, off, len, get_cb, &r));
    return finish(&r, out);
}

static int do_ranges(mh_store_t *s, const char *key, const mh_range_t *rg, size_t n, mh_buf_t *out)
{
    res_t r = {0};
    CALL(mh_store_get_ranges(s, key, rg, n, get_cb, &r));
    return finish(&r, out);
}

static int do_put(mh_store_t *s, const char *key, const void *data, size_t n)
{
    res_t r = {0};
    CALL(mh_store_put(s, key, data, n, done_cb, &r));
    return finish(&r, NULL);
}

static int do_move(mh_store_t *s, const char *src, const char *dst)
{
    res_t r = {0};
    CALL(mh_store_move(s, src, dst, done_cb, &r));
    return finish(&r, NULL);
}

static int do_delete(mh_store_t *s, const char *key)
{
    res_t r = {0};
    CALL(mh_store_delete(s, key, done_cb, &r));
    return finish(&r, NULL);
}

static int do_head(mh_store_t *s, const char *key, uint64_t *size)
{
    res_t r = {0};
    CALL(mh_store_head(s, key, head_cb, &r));
    int rc = finish(&r, NULL);
    if (size) *size = r.size;
    return rc;
}

#endif
