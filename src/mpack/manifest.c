/*
 * manifest.c — manifests as sorted entry arrays, and their snapshot ids
 * (SPEC sections 1 and 2).
 *
 * A manifest is an array of (path, id) sorted bytewise by path, unique,
 * so lookup is a binary search and an upsert or remove is one memmove.
 *
 * Snapshot ids are the hot part: a push of 1031 commits x 700 files
 * rebuilds and hashes 1031 manifests, ~64 MB of SHA-256 input, although
 * each differs from its parent in a handful of entries. SHA-256 consumes
 * its input left to right, so the state after the first k entries only
 * depends on those entries. Each manifest therefore keeps a small cache:
 * the SHA-256 state after every CK-th entry, and `dirty`, the lowest
 * index changed since those states were saved. Computing an id resumes
 * from the last saved state at or before `dirty` and re-hashes only the
 * tail, saving new states as it goes. On the seed workload this halves
 * the bytes hashed (changes land anywhere); appends cost almost nothing.
 *
 * Invariants:
 *  - entries [0, dirty) are unchanged since the cached states were
 *    computed; every mutation goes through mh_manifest_dirty() (or the
 *    public mh_manifest_touch() for callers that edit e[] themselves);
 *  - hc->st[j] is the state after feeding entries [0, j*CK) and is valid
 *    for j < hc->nvalid and j*CK <= dirty; st[0] is the initial state;
 *  - dirty == SIZE_MAX means nothing changed since hc->id was computed.
 * The cache needs a copyable SHA-256 state, which core's opaque EVP
 * wrapper does not offer, so it uses libcrypto's SHA256_CTX (a plain
 * struct; same SHA-NI code underneath), deprecated but present in
 * OpenSSL 3. mh_manifest_id_nocache goes through core's wrapper and is the
 * reference the tests compare against.
 */
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>
#include <stdlib.h>
#include <string.h>

#include "mpack_internal.h"

#define CK 16 /* entries between saved SHA-256 states */

struct mh_mhash {
    size_t nvalid; /* st[0..nvalid) were computed (see invariants) */
    size_t cap;    /* slots allocated in st[] */
    mh_id_t id;    /* valid while the manifest's dirty == SIZE_MAX */
    SHA256_CTX st[];
};

/* ------------------------------------------------------------- entries */

void mh_manifest_free(mh_manifest_t *m)
{
    free(m->e);
    free(m->hc);
    memset(m, 0, sizeof(*m));
}

int mh__manifest_reserve(mh_manifest_t *m, size_t need)
{
    if (need <= m->cap) return 0;
    if (need > SIZE_MAX / 2 / sizeof(mh_mentry_t)) return MH_ENOMEM; /* doubling cannot overflow below */
    size_t cap = m->cap ? m->cap : 16;
    while (cap < need) cap *= 2;
    mh_mentry_t *e = realloc(m->e, cap * sizeof(*e));
    if (!e) return MH_ENOMEM;
    m->e = e;
    m->cap = cap;
    return 0;
}

static size_t hc_size(size_t slots)
{
    return sizeof(struct mh_mhash) + slots * sizeof(SHA256_CTX);
}

/* Copies src's still-valid saved states into dst (whose cache is replaced). */
static int clone_cache(mh_manifest_t *dst, const mh_manifest_t *src)
{
    free(dst->hc);
    dst->hc = NULL;
    dst->dirty = 0;
    const struct mh_mhash *s = src->hc;
    if (!s) return 0;
    size_t keep = s->nvalid;
    if (src->dirty != SIZE_MAX && src->dirty / CK + 1 < keep) keep = src->dirty / CK + 1;
    struct mh_mhash *d = malloc(hc_size(s->cap));
    if (!d) return 0; /* the cache is an optimisation: go without */
    memcpy(d, s, hc_size(keep));
    d->nvalid = keep;
    d->cap = s->cap;
    dst->hc = d;
    dst->dirty = src->dirty;
    return 0;
}

int mh_manifest_clone(mh_manifest_t *dst, const mh_manifest_t *src)
{
    if (dst == src) return 0;
    dst->n = 0;
    dst->dirty = 0; /* on failure below, no stale cached id survives */
    int rc = mh__manifest_reserve(dst, src->n);
    if (rc) return rc;
    if (src->n) memcpy(dst->e, src->e, src->n * sizeof(*src->e));
    dst->n = src->n;
    return clone_cache(dst, src);
}

size_t mh__manifest_lower_bound(const mh_manifest_t *m, const char *path, size_t plen)
{
    size_t lo = 0, hi = m->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const mh_mentry_t *e = &m->e[mid];
        if (mh_path_cmp(e->path, e->plen, path, plen) < 0) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

const mh_mentry_t *mh_manifest_find(const mh_manifest_t *m, const char *path, size_t plen)
{
    size_t i = mh__manifest_lower_bound(m, path, plen);
    if (i < m->n && mh_path_cmp(m->e[i].path, m->e[i].plen, path, plen) == 0) return &m->e[i];
    return NULL;
}

int mh_manifest_upsert(mh_manifest_t *m, const char *path, uint32_t plen, const char *id)
{
    size_t i = mh__manifest_lower_bound(m, path, plen);
    if (i < m->n && mh_path_cmp(m->e[i].path, m->e[i].plen, path, plen) == 0) {
        /* Same bytes, same hash: only a real change invalidates states. */
        if (memcmp(m->e[i].id, id, MH_ID_LEN) != 0) mh_manifest_dirty(m, i);
        m->e[i].id = id;
        return 0;
    }
    int rc = mh__manifest_reserve(m, m->n + 1);
    if (rc) return rc;
    memmove(&m->e[i + 1], &m->e[i], (m->n - i) * sizeof(*m->e));
    m->e[i] = (mh_mentry_t){.path = path, .plen = plen, .id = id};
    m->n++;
    mh_manifest_dirty(m, i);
    return 0;
}

int mh_manifest_remove(mh_manifest_t *m, const char *path, size_t plen)
{
    size_t i = mh__manifest_lower_bound(m, path, plen);
    if (i >= m->n || mh_path_cmp(m->e[i].path, m->e[i].plen, path, plen) != 0) return MH_ENOENT;
    memmove(&m->e[i], &m->e[i + 1], (m->n - i - 1) * sizeof(*m->e));
    m->n--;
    mh_manifest_dirty(m, i);
    return 0;
}

void mh_manifest_touch(mh_manifest_t *m, size_t from)
{
    mh_manifest_dirty(m, from);
}

/* -------------------------------------------------------------- hashing */

/* Feeds the SPEC's byte string "e0 0x00 e1 0x00 ..." with ei = "path 0x00
 * id" through a local buffer: one SHA256_Update per few KB instead of
 * four tiny calls per entry (which cost more than the hashing itself). */
typedef struct {
    SHA256_CTX *c;
    size_t len;
    uint8_t buf[8192];
} feed_t;

static void feed_flush(feed_t *f)
{
    if (f->len) SHA256_Update(f->c, f->buf, f->len);
    f->len = 0;
}

/* Appends one entry (with its leading separator unless first): one room
 * check, a variable copy for the path and a fixed 71-byte copy for the id
 * that the compiler inlines. Paths are <= 4096 bytes, so an entry always
 * fits in the emptied buffer; longer ones (not valid) are hashed in parts. */
static inline void feed_entry(feed_t *f, const mh_mentry_t *e, bool first)
{
    size_t need = (size_t)e->plen + MH_ID_LEN + 2;
    if (f->len + need > sizeof(f->buf)) {
        feed_flush(f);
        if (need > sizeof(f->buf)) {
            if (!first) SHA256_Update(f->c, "", 1);
            SHA256_Update(f->c, e->path, e->plen);
            SHA256_Update(f->c, "", 1);
            SHA256_Update(f->c, e->id, MH_ID_LEN);
            return;
        }
    }
    uint8_t *o = f->buf + f->len;
    if (!first) *o++ = 0;
    memcpy(o, e->path, e->plen);
    o += e->plen;
    *o++ = 0;
    memcpy(o, e->id, MH_ID_LEN);
    f->len = (size_t)(o + MH_ID_LEN - f->buf);
}

/* Ensures the cache can hold the states of an n-entry manifest. */
static struct mh_mhash *cache_for(mh_manifest_t *m)
{
    size_t need = m->n / CK + 1;
    struct mh_mhash *h = m->hc;
    if (h && h->cap >= need) return h;
    size_t cap = h ? h->cap : 4;
    while (cap < need) cap *= 2;
    struct mh_mhash *nh = realloc(h, hc_size(cap));
    if (!nh) return NULL;
    if (!h) {
        nh->nvalid = 0;
        m->dirty = 0;
    }
    nh->cap = cap;
    m->hc = nh;
    return nh;
}

/* The id from scratch on a stack context: no allocation, cannot fail. */
static void hash_plain(const mh_manifest_t *m, mh_id_t *out)
{
    SHA256_CTX c;
    SHA256_Init(&c);
    feed_t f = {.c = &c};
    for (size_t i = 0; i < m->n; i++) feed_entry(&f, &m->e[i], i == 0);
    feed_flush(&f);
    uint8_t digest[32];
    SHA256_Final(digest, &c);
    mh_id_from_digest(out, digest);
}

void mh_manifest_id(const mh_manifest_t *cm, mh_id_t *out)
{
    /* A manifest whose e[] the caller set up (cap == 0: not our heap
     * array, nobody will call mh_manifest_free) gets no cache: hashing it
     * allocates nothing and writes nothing. */
    if (!cm->hc && cm->cap == 0) {
        hash_plain(cm, out);
        return;
    }
    /* Otherwise the cache is logical-const state (like C++ `mutable`): the
     * id does not change, only how fast it is found. Such a manifest was
     * grown by mh__manifest_reserve, so it is never an object defined
     * const, and writing through the cast is well-defined. */
    mh_manifest_t *m = (mh_manifest_t *)cm;
    if (m->hc && m->dirty == SIZE_MAX) {
        *out = m->hc->id;
        return;
    }
    struct mh_mhash *h = cache_for(m);
    if (!h) {
        hash_plain(m, out);
        return;
    }
    if (h->nvalid == 0) {
        SHA256_Init(&h->st[0]);
        h->nvalid = 1;
    }
    size_t j = m->dirty / CK; /* last state not touched by any change */
    if (j > h->nvalid - 1) j = h->nvalid - 1;

    SHA256_CTX c = h->st[j];
    feed_t f = {.c = &c};
    for (size_t i = j * CK;; i++) {
        if (i % CK == 0 && i / CK > j) {
            feed_flush(&f);
            h->st[i / CK] = c;
        }
        if (i == m->n) break;
        feed_entry(&f, &m->e[i], i == 0);
    }
    feed_flush(&f);
    h->nvalid = m->n / CK + 1;

    uint8_t digest[32];
    SHA256_Final(digest, &c);
    mh_id_from_digest(&h->id, digest);
    m->dirty = SIZE_MAX;
    *out = h->id;
}

void mh_manifest_id_nocache(const mh_manifest_t *m, mh_id_t *out)
{
    mh_sha256_t *h = mh_sha256_new();
    if (!h) {
        memset(out, 0, sizeof(*out)); /* never a plausible id */
        return;
    }
    /* Same buffering idea as feed_t, through core's wrapper. */
    uint8_t buf[8192];
    size_t len = 0;
    for (size_t i = 0; i < m->n; i++) {
        const mh_mentry_t *e = &m->e[i];
        size_t need = e->plen + MH_ID_LEN + 2;
        if (len + need > sizeof(buf)) {
            mh_sha256_update(h, buf, len);
            len = 0;
        }
        if (need > sizeof(buf)) { /* cannot happen with paths <= 4096 */
            if (i) mh_sha256_update(h, "", 1);
            mh_sha256_update(h, e->path, e->plen);
            mh_sha256_update(h, "", 1);
            mh_sha256_update(h, e->id, MH_ID_LEN);
            continue;
        }
        if (i) buf[len++] = 0;
        memcpy(buf + len, e->path, e->plen);
        len += e->plen;
        buf[len++] = 0;
        memcpy(buf + len, e->id, MH_ID_LEN);
        len += MH_ID_LEN;
    }
    mh_sha256_update(h, buf, len);
    uint8_t digest[32];
    mh_sha256_final(h, digest);
    mh_sha256_free(h);
    mh_id_from_digest(out, digest);
}
