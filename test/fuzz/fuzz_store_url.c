/*
 * fuzz_store_url.c — libFuzzer target for the fs store's /_store/ URL
 * checks (SPEC 3, 4.3 step 2): the key whitelist and the strict query
 * parser of mh_store_fs_check_url, both fed bytes a client controls.
 *
 * Input: byte 0 picks the method (even: GET, odd: PUT), the rest is
 * "<key>\n<query>" (no '\n': all key). Invariants checked: the key
 * whitelist agrees with a direct restatement of its grammar, and a
 * check never succeeds without the secret (the fuzzer cannot sign), nor
 * returns anything but MH_EAUTH / MH_ETIMEDOUT.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../src/store/store_int.h"
#include "mh/store.h"

static mh_store_t *store;
static char dir[64] = "/tmp/mh-fuzz-store-XXXXXX";

/* The store dir holds only three empty subdirectories (the secret is
 * configured): remove them when the fuzzer exits. */
static void cleanup(void)
{
    static const char *subs[] = {"mpacks", "incoming", "tmp", ""};
    char p[128];
    for (size_t i = 0; i < 4; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, subs[i]);
        rmdir(p);
    }
}

static bool key_grammar(const uint8_t *p, size_t n)
{
    if (n == 71 && memcmp(p, "mpacks/", 7) == 0) {
        for (size_t i = 7; i < n; i++)
            if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f'))) return false;
        return true;
    }
    if (n < 10 || n > 73 || memcmp(p, "incoming/", 9) != 0) return false;
    for (size_t i = 9; i < n; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'z') || (p[i] >= 'A' && p[i] <= 'Z') ||
              p[i] == '_' || p[i] == '-'))
            return false;
    return true;
}

static void setup(void)
{
    static char spec[80];
    if (!mkdtemp(dir)) abort();
    atexit(cleanup);
    snprintf(spec, sizeof spec, "fs:%s", dir);
    mh_log_set_level("error");
    mh_store_config_t cfg = {.spec = spec, .public_url = "http://h", .signing_secret = "fuzz-secret-fuzz-secret-fuzz-sec"};
    if (mh_store_open(uv_default_loop(), &cfg, &store) != 0) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!store) setup();
    if (size < 1) return 0;
    const char *method = (data[0] & 1) ? "PUT" : "GET";
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    const uint8_t *nl = memchr(p, '\n', n);
    size_t kn = nl ? (size_t)(nl - p) : n;
    mh_str_t key = {(const char *)p, kn};
    mh_str_t query = nl ? (mh_str_t){(const char *)nl + 1, n - kn - 1} : (mh_str_t){"", 0};

    if (mh_store_key_valid(key.p, key.n) != key_grammar(p, kn)) abort();
    uint64_t sz;
    uint8_t sha[32];
    int rc = mh_store_fs_check_url(store, method, key, query, &sz, sha);
    if (rc != MH_EAUTH && rc != MH_ETIMEDOUT) abort();
    return 0;
}
