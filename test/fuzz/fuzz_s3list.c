/*
 * fuzz_s3list.c — libFuzzer target for the reader of S3 ListObjectsV2
 * pages (mh__s3_list_page, src/admin/store_scan.c), which `musehubd fsck`
 * runs over whatever answers at MUSEHUB_S3_ENDPOINT.
 *
 * Input: the body bytes, copied into an exact-size heap buffer so ASan
 * catches any read past the end. Invariants checked: every listed key is
 * a valid store key (mpacks/<64 hex> or incoming/<1..64 of [A-Za-z0-9_-]>)
 * and NUL-terminated; a continuation token is returned only for a page
 * that says IsTruncated, and a truncated page without one is an error.
 */
#include <stdlib.h>
#include <string.h>

#include "../../src/admin/admin_internal.h"

static void check_key(const char *k)
{
    size_t n = strnlen(k, 80);
    if (n >= 80) abort();
    if (!strncmp(k, "mpacks/", 7)) {
        if (n != 71 || strspn(k + 7, "0123456789abcdef") != 64) abort();
    } else if (!strncmp(k, "incoming/", 9)) {
        if (n < 10 || n > 73 ||
            strspn(k + 9, "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-") != n - 9)
            abort();
    } else {
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *body = malloc(size ? size : 1);
    if (!body) return 0;
    memcpy(body, data, size);
    mh__store_list_t l = {0};
    char *token = NULL;
    int rc = mh__s3_list_page(body, size, &l, &token);
    if (rc && token) abort();
    if (token && !memmem(body, size, "<IsTruncated>true</IsTruncated>", 31)) abort();
    for (size_t i = 0; i < l.n; i++) check_key(l.v[i].key);
    free(token);
    mh__store_list_free(&l);
    free(body);
    return 0;
}
