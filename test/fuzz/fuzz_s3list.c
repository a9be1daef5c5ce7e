/*
 * fuzz_s3list.c — libFuzzer target for the reader of S3 ListObjectsV2
 * pages (mh__s3_list_page, src/store/s3_stream.c), which mh_store_list
 * (`musehubd fsck`, the maintenance sweeps) runs over whatever answers at
 * MUSEHUB_S3_ENDPOINT.
 *
 * Input: the body bytes, copied into an exact-size heap buffer so ASan
 * catches any read past the end. The prefix is "mpacks/" or "incoming/"
 * by the input's length. Invariants checked: at most a page of entries,
 * every listed key a valid store key (mh_store_key_valid, which
 * test/fuzz/fuzz_store_url.c checks against its grammar) under the
 * prefix, NUL-terminated, each entry's key pointing at its own name slot;
 * "more" only for a page that says <IsTruncated>true; a refused page
 * lists nothing.
 */
#include <stdlib.h>
#include <string.h>

#include "../../src/store/s3_int.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mh_buf_t body = {0};
    body.p = malloc(size ? size : 1);
    if (!body.p) return 0;
    memcpy(body.p, data, size);
    body.len = size;
    body.cap = size;
    mh__s3_page_t pg = {.prefix = size % 2 ? "mpacks/" : "incoming/"};
    int rc = mh__s3_list_page(&body, &pg);
    if (rc && rc != MH_ESTORE && rc != MH_ENOMEM) abort();
    if (!rc) {
        if (pg.n > MH__S3_LIST_PAGE) abort();
        if (pg.more && !memmem(body.p, size, "<IsTruncated>true</IsTruncated>", 31)) abort();
        if (strnlen(pg.next, sizeof pg.next) >= sizeof pg.next) abort();
        for (size_t i = 0; i < pg.n; i++) {
            const char *k = pg.entries[i].key;
            size_t n = strnlen(k, MH_STORE_KEY_MAX + 1);
            if (k != pg.names[i] || n > MH_STORE_KEY_MAX || !mh_store_key_valid(k, n)) abort();
            if (strncmp(k, pg.prefix, strlen(pg.prefix)) != 0) abort();
        }
    }
    mh__s3_page_free(&pg);
    free(body.p);
    return 0;
}
