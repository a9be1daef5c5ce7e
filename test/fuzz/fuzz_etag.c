/*
 * fuzz_etag.c — libFuzzer target for the If-None-Match list parser of
 * GET /{owner}/{slug}/objects/{id} (SPEC 4.5): any header bytes must be
 * read without touching memory outside them, and a value naming the
 * object's tag must match.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/hub/hub_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char tag[] = "\"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"";
    /* An exact-size heap copy so ASan catches any read past the end. */
    char *p = malloc(size ? size : 1);
    if (!p) return 0;
    memcpy(p, data, size);
    mh_str_t v = {p, size};
    bool m = mh__etag_matches(v, tag);
    /* The value followed by ", <tag>" must always match. */
    size_t tl = strlen(tag);
    char *q = malloc(size + 2 + tl);
    if (q) {
        memcpy(q, data, size);
        memcpy(q + size, ", ", 2);
        memcpy(q + size + 2, tag, tl);
        if (!mh__etag_matches((mh_str_t){q, size + 2 + tl}, tag)) abort();
        free(q);
    }
    (void)m;
    free(p);
    return 0;
}
