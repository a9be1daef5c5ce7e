/*
 * ids.c — path validation and commit ids (SPEC section 1).
 *
 * A path is checked in one pass over its bytes (segments, NUL), then for
 * UTF-8. The commit id hashes the five fields joined with NUL, the parent
 * ids sorted bytewise first, so a merge's id does not depend on which
 * parent the client listed first. Hashing uses libcrypto's SHA256_CTX on
 * the stack (see manifest.c for why this module uses the low-level API).
 */
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>
#include <string.h>

#include "mh/mpack.h"

#define MH_PATH_MAX 4096

bool mh_path_valid(const char *p, size_t n)
{
    if (!p || n == 0 || n > MH_PATH_MAX) return false;
    size_t seg = 0; /* start of the current segment */
    for (size_t i = 0; i <= n; i++) {
        if (i < n && p[i] != '/') {
            if (p[i] == '\0') return false;
            continue;
        }
        size_t len = i - seg;
        /* an empty segment covers a leading '/', a trailing '/' and "//" */
        if (len == 0) return false;
        if (p[seg] == '.' && (len == 1 || (len == 2 && p[seg + 1] == '.'))) return false;
        seg = i + 1;
    }
    return mh_utf8_valid(p, n);
}

/* Bytewise order, a proper prefix first (Python's str order for UTF-8). */
static int str_cmp(mh_str_t a, mh_str_t b)
{
    size_t m = a.n < b.n ? a.n : b.n;
    int c = m ? memcmp(a.p, b.p, m) : 0;
    if (c) return c;
    return a.n < b.n ? -1 : a.n > b.n;
}

void mh_commit_id(const mh_str_t *parents, int nparents, mh_str_t snapshot_id, mh_str_t message,
                  mh_str_t committed_at, mh_str_t author, mh_id_t *out)
{
    /* Sort a copy of the (at most a few) parents: insertion sort. */
    mh_str_t sorted[8];
    int np = nparents < 0 ? 0 : nparents > 8 ? 8 : nparents;
    for (int i = 0; i < np; i++) {
        mh_str_t x = parents[i];
        int j = i;
        for (; j > 0 && str_cmp(sorted[j - 1], x) > 0; j--) sorted[j] = sorted[j - 1];
        sorted[j] = x;
    }
    /* A stack context: computing an id cannot fail for lack of memory
     * (core's wrapper allocates one; a failure there would have to be
     * reported as a wrong id). */
    SHA256_CTX c;
    uint8_t digest[32];
    SHA256_Init(&c);
    for (int i = 0; i < np; i++) {
        if (i) SHA256_Update(&c, "", 1);
        SHA256_Update(&c, sorted[i].p, sorted[i].n);
    }
    const mh_str_t rest[4] = {snapshot_id, message, committed_at, author};
    for (int i = 0; i < 4; i++) {
        SHA256_Update(&c, "", 1);
        if (rest[i].n) SHA256_Update(&c, rest[i].p, rest[i].n);
    }
    SHA256_Final(digest, &c);
    mh_id_from_digest(out, digest);
}

void mh_mpack_key(char out[MH_MPACK_KEY_SIZE], const char *mpack_id)
{
    memcpy(out, "mpacks/", 7);
    memcpy(out + 7, mpack_id + 7, 64);
    out[71] = 0;
}
