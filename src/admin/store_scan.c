/*
 * store_scan.c — lists every key under a prefix of the object store for
 * fsck (admin_internal.h), through the store module's own listing
 * (mh_store_list: fs readdir on the thread pool, s3 ListObjectsV2 by the
 * store's S3 client), one page after the other, each awaited by running
 * the command's private loop. One S3 client for the whole program: the
 * same signing, retries, error logging and response parsing as the server.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "admin_internal.h"

typedef struct {
    mh__store_list_t *out;
    bool done;
    int err;
    char next[1024]; /* start-after of the following page (any name the store listed); "" on the last */
} page_wait_t;

static void page_cb(void *ud, int err, const mh_store_entry_t *e, size_t n, const char *next)
{
    page_wait_t *w = ud;
    w->done = true;
    w->err = err;
    w->next[0] = 0;
    if (err) return;
    mh__store_list_t *l = w->out;
    if (n) {
        mh__store_obj_t *v = mh_vec_grow(l->v, &l->cap, l->n + n, sizeof *v, 256);
        if (!v) {
            w->err = MH_ENOMEM;
            return;
        }
        l->v = v;
    }
    for (size_t i = 0; i < n; i++) {
        mh__store_obj_t *o = &l->v[l->n++];
        snprintf(o->key, sizeof o->key, "%s", e[i].key); /* a valid key: at most MH_STORE_KEY_MAX bytes */
        o->size = e[i].size;
        o->mtime = e[i].mtime;
    }
    if (next && strlen(next) >= sizeof w->next) w->err = MH_ESTORE; /* longer than S3 allows */
    else if (next) snprintf(w->next, sizeof w->next, "%s", next);
}

static int cmp_key(const void *a, const void *b)
{
    return strcmp(((const mh__store_obj_t *)a)->key, ((const mh__store_obj_t *)b)->key);
}

int mh__store_list(mh_store_t *store, uv_loop_t *loop, const char *prefix, mh__store_list_t *out)
{
    page_wait_t w = {.out = out};
    do {
        char after[sizeof w.next];
        snprintf(after, sizeof after, "%s", w.next);
        w.done = false;
        mh_store_list(store, prefix, after[0] ? after : NULL, page_cb, &w);
        while (!w.done) uv_run(loop, UV_RUN_ONCE);
    } while (!w.err && w.next[0]);
    if (w.err) {
        fprintf(stderr, "musehubd fsck: listing %s of the store: %s%s\n", prefix, mh_strerror(w.err),
                w.err == MH_ESTORE ? " (see the store's log line above; s3 needs s3:ListBucket)" : "");
        return -1;
    }
    if (out->n) qsort(out->v, out->n, sizeof *out->v, cmp_key);
    return 0;
}

void mh__store_list_free(mh__store_list_t *l)
{
    free(l->v);
    memset(l, 0, sizeof *l);
}
