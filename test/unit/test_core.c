/*
 * test_core.c — core helpers: base64 (RFC 4648 section 10 vectors and the
 * decoder's strictness), hex, ids, arenas.
 */
#include <string.h>

#include "mh/core.h"
#include "tap.h"

static const char *dec(mh_arena_t *a, const char *in, int *rc)
{
    uint8_t *out = NULL;
    size_t n = 0;
    *rc = mh_base64_decode(a, in, strlen(in), &out, &n);
    return *rc ? NULL : mh_strndup(a, (const char *)out, n);
}

int main(void)
{
    mh_arena_t a;
    mh_arena_init(&a, 0);
    static const char *plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    static const char *coded[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    for (int i = 0; i < 7; i++) {
        char *e = NULL;
        int rc = mh_base64_encode(&a, (const uint8_t *)plain[i], strlen(plain[i]), &e, NULL);
        TAP_OK(!rc && e && !strcmp(e, coded[i]), "encode '%s' (RFC 4648)", plain[i]);
        const char *d = dec(&a, coded[i], &rc);
        TAP_OK(!rc && d && !strcmp(d, plain[i]), "decode '%s' (RFC 4648)", coded[i]);
    }
    int rc;
    const char *d = dec(&a, "Zm9vYg", &rc);
    TAP_OK(!rc && !strcmp(d, "foob"), "padding may be left out");
    static const char *bad[] = {"Zm9vYg=", "Zg=a", "Z===", "Zm 9v", "Zm9v\n", "Zm9v!", "aG=sbA==", "Z"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        dec(&a, bad[i], &rc);
        TAP_EQ_INT(rc, MH_EPARSE, "refused malformed base64");
    }
    uint8_t raw[4] = {0x00, 0x7f, 0x80, 0xff}, back[4];
    char hex[9];
    mh_hex_encode(hex, raw, 4);
    TAP_EQ_STR(hex, "007f80ff", "hex encode");
    TAP_OK(mh_hex_decode(back, hex, 4) == 0 && !memcmp(back, raw, 4), "hex round trip");
    TAP_EQ_INT(mh_hex_decode(back, "zz", 1), MH_EPARSE, "hex refuses a non-digit");
    mh_id_t id;
    mh_blob_id("", 0, &id);
    TAP_EQ_STR(id.s, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "blob id of nothing");
    TAP_OK(mh_id_valid(id.s, MH_ID_LEN), "a blob id is a valid id");
    id.s[10] = 'A';
    TAP_OK(!mh_id_valid(id.s, MH_ID_LEN), "uppercase hex is not an id");
    TAP_OK(!mh_id_valid("sha256:00", 9), "a short id is not an id");
    mh_arena_t lim;
    mh_arena_init(&lim, 1024);
    TAP_OK(mh_alloc(&lim, 512) != NULL && mh_alloc(&lim, 1024) == NULL, "an arena's limit turns into NULL, not an abort");
    mh_arena_release(&lim);
    mh_arena_release(&a);
    return tap_done();
}
