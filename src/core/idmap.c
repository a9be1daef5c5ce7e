/*
 * idmap.c — the program's one keyed hash (SipHash-1-3 under a per-process
 * random key) and its one hash map (mh_idmap_t), modelled on redis
 * dict.c: seeded against chosen keys, and growing instead of filling up.
 *
 * SipHash-1-3 (one compression round per word, three at the end), as
 * Python and Rust use for their hash tables: the graph of a 200k-commit
 * history hashes 600k digests per load, and 2-4 costs 40% more.
 *
 * Invariants:
 *  - Every table over keys a client can choose (ids in a pack, ids in a
 *    request, request keys, names) hashes with mh_hash64: without the key
 *    nobody can make keys collide, so probes stay short whatever is sent.
 *  - A map is at most 3/4 full (it doubles first), so an insert always
 *    finds an empty slot and every probe ends.
 *  - Slots hold an entry's index and 32 bits of its key's hash (8
 *    bytes): growing moves slots without hashing again, a probe compares
 *    keys (through the caller's key function) only on a hash match, and a
 *    copy of a map is one memcpy (the commit graph extends a copy).
 *  - Keys are never copied: ids stay where the parser put them.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "mh/core.h"

/* ------------------------------------------------------------ SipHash */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

#define SIPROUND                                                                                                       \
    do {                                                                                                               \
        v0 += v1;                                                                                                      \
        v1 = ROTL(v1, 13);                                                                                             \
        v1 ^= v0;                                                                                                      \
        v0 = ROTL(v0, 32);                                                                                             \
        v2 += v3;                                                                                                      \
        v3 = ROTL(v3, 16);                                                                                             \
        v3 ^= v2;                                                                                                      \
        v0 += v3;                                                                                                      \
        v3 = ROTL(v3, 21);                                                                                             \
        v3 ^= v0;                                                                                                      \
        v2 += v1;                                                                                                      \
        v1 = ROTL(v1, 17);                                                                                             \
        v1 ^= v2;                                                                                                      \
        v2 = ROTL(v2, 32);                                                                                             \
    } while (0)

static inline uint64_t le64(const uint8_t *p)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
#else
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
#endif
}

/* Inlined with constant round counts by its two callers. */
static inline __attribute__((always_inline)) uint64_t siphash(const uint8_t key[16], const void *data, size_t n,
                                                              int crounds, int drounds)
{
    const uint8_t *p = data;
    uint64_t k0 = le64(key), k1 = le64(key + 8);
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    size_t full = n - n % 8;
    for (size_t i = 0; i < full; i += 8) {
        uint64_t m = le64(p + i);
        v3 ^= m;
        for (int r = 0; r < crounds; r++) SIPROUND;
        v0 ^= m;
    }
    /* The last block: the remaining bytes, and the length in the top byte. */
    uint64_t b = (uint64_t)n << 56;
    for (size_t i = 0; i < n % 8; i++) b |= (uint64_t)p[full + i] << (8 * i);
    v3 ^= b;
    for (int r = 0; r < crounds; r++) SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    for (int r = 0; r < drounds; r++) SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

uint64_t mh_siphash(const uint8_t key[16], const void *p, size_t n, int crounds, int drounds)
{
    return siphash(key, p, n, crounds, drounds);
}

static uint8_t process_key[16];
static pthread_once_t process_key_once = PTHREAD_ONCE_INIT;

static void process_key_init(void)
{
    if (mh_random(process_key, sizeof process_key) == 0) return;
    /* No getrandom: still unknown to a remote client, if weaker. */
    uint64_t t = mh_now_us() * 0x9e3779b97f4a7c15ULL, a = (uint64_t)(uintptr_t)&t;
    memcpy(process_key, &t, 8);
    memcpy(process_key + 8, &a, 8);
}

uint64_t mh_hash64(const void *p, size_t n)
{
    pthread_once(&process_key_once, process_key_init);
    return siphash(process_key, p, n, 1, 3);
}

/* ------------------------------------------------------------- id map */

void mh_idmap_init(mh_idmap_t *m, mh_arena_t *a, size_t keylen, mh_idmap_key_fn key, const void *ctx)
{
    *m = (mh_idmap_t){.keylen = keylen, .key = key, .ctx = ctx, .arena = a};
}

static mh_idmap_slot_t *slots_new(mh_idmap_t *m, size_t cap)
{
    if (cap > SIZE_MAX / sizeof(mh_idmap_slot_t)) return NULL;
    return m->arena ? mh_calloc(m->arena, cap * sizeof(mh_idmap_slot_t)) : calloc(cap, sizeof(mh_idmap_slot_t));
}

/* Moves every entry into a table of cap slots (a power of two); the
 * cached hashes place them, no key is hashed again. */
static int rehash(mh_idmap_t *m, size_t cap)
{
    mh_idmap_slot_t *ns = slots_new(m, cap);
    if (!ns) return MH_ENOMEM;
    for (size_t i = 0; i < m->cap; i++) {
        const mh_idmap_slot_t *s = &m->slots[i];
        if (!s->v1) continue;
        size_t j = s->h & (cap - 1);
        while (ns[j].v1) j = (j + 1) & (cap - 1);
        ns[j] = *s;
    }
    if (!m->arena) free(m->slots);
    m->slots = ns;
    m->cap = cap;
    return 0;
}

int mh_idmap_reserve(mh_idmap_t *m, size_t n)
{
    if (n >= UINT32_MAX) return MH_ENOMEM;
    size_t cap = m->cap ? m->cap : 16;
    while (cap / 4 * 3 < n) cap *= 2;
    return cap == m->cap ? 0 : rehash(m, cap);
}

/* The slot holding key, or the empty slot where it would go. */
static mh_idmap_slot_t *probe(const mh_idmap_t *m, const void *key, uint32_t h)
{
    size_t i = h & (m->cap - 1);
    for (;;) {
        mh_idmap_slot_t *s = &m->slots[i];
        if (!s->v1 || (s->h == h && memcmp(m->key(m->ctx, s->v1 - 1), key, m->keylen) == 0)) return s;
        i = (i + 1) & (m->cap - 1);
    }
}

uint32_t mh_idmap_find(const mh_idmap_t *m, const void *key)
{
    if (!m->n) return MH_IDMAP_NONE;
    const mh_idmap_slot_t *s = probe(m, key, (uint32_t)mh_hash64(key, m->keylen));
    return s->v1 ? s->v1 - 1 : MH_IDMAP_NONE;
}

int mh_idmap_add(mh_idmap_t *m, uint32_t v, uint32_t *found)
{
    if (v == MH_IDMAP_NONE || mh_idmap_reserve(m, m->n + 1)) return MH_ENOMEM;
    const void *key = m->key(m->ctx, v);
    uint32_t h = (uint32_t)mh_hash64(key, m->keylen);
    mh_idmap_slot_t *s = probe(m, key, h);
    if (s->v1) {
        if (found) *found = s->v1 - 1;
        return 0;
    }
    *s = (mh_idmap_slot_t){v + 1, h};
    m->n++;
    return 1;
}

int mh_idmap_clone(mh_idmap_t *dst, const mh_idmap_t *src, const void *ctx)
{
    mh_idmap_init(dst, NULL, src->keylen, src->key, ctx);
    if (!src->cap) return 0;
    dst->slots = malloc(src->cap * sizeof *dst->slots);
    if (!dst->slots) return MH_ENOMEM;
    memcpy(dst->slots, src->slots, src->cap * sizeof *dst->slots);
    dst->cap = src->cap;
    dst->n = src->n;
    return 0;
}

void mh_idmap_free(mh_idmap_t *m)
{
    if (!m->arena) free(m->slots);
    mh_idmap_init(m, m->arena, m->keylen, m->key, m->ctx);
}

const void *mh_idmap_key_strv(const void *ctx, uint32_t v) { return ((const char *const *)ctx)[v]; }

/* ------------------------------------------------------------- id list */

static const void *idlist_key(const void *ctx, uint32_t v) { return ((const mh_idlist_t *)ctx)->ids[v]; }

void mh_idlist_init(mh_idlist_t *l, mh_arena_t *a)
{
    *l = (mh_idlist_t){.arena = a};
    mh_idmap_init(&l->map, a, MH_ID_LEN, idlist_key, l);
}

int mh_idlist_add(mh_idlist_t *l, const char *id)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        const char **ids = mh_alloc(l->arena, cap * sizeof *ids);
        if (!ids) return MH_ENOMEM;
        if (l->n) memcpy(ids, l->ids, l->n * sizeof *ids);
        l->ids = ids;
        l->cap = cap;
    }
    l->ids[l->n] = id;
    int rc = mh_idmap_add(&l->map, (uint32_t)l->n, NULL);
    if (rc == 1) l->n++;
    return rc;
}

uint32_t mh_idlist_find(const mh_idlist_t *l, const char *id) { return mh_idmap_find(&l->map, id); }
