/*
 * caches.c — the hub's per-process caches, in one place (DESIGN 1: caches
 * are caches; nothing lives only here):
 *
 *   repository lookups   (owner/slug or id, caller) -> row and role, 2 s,
 *                        dropped on NOTIFY musehub_repo (sql/0006)
 *   refs                 (repository, state_seq) -> the refs answer's
 *                        branch heads and tags
 *   fetch answers        (repository, state_seq, request key) -> answer,
 *                        and the builds in flight that identical requests
 *                        wait for
 *   presigned pack URLs  pack id -> URL, reused for half its lifetime
 *
 * plus the container the commit-graph cache (graph.c) and the manifest
 * LRU (manifests.c) hang from, so neither of them depends on fetch.c.
 *
 * Invariants:
 *  - Every key a client can influence is hashed with core's seeded
 *    mh_hash64; tables are bounded (direct-mapped, or FIFO-evicted).
 *  - Everything keyed by state_seq needs no invalidation: every branch
 *    move bumps it in the same transaction. A repository's lookup row is
 *    dropped by the process that changed it at once, by the others when
 *    the NOTIFY arrives, by everyone after its TTL.
 *  - A lookup that overlapped any invalidation is not inserted (the epoch
 *    check), so a row read before a push is never cached after it.
 *  - Handed-out data are arena copies: an entry freed by an invalidation
 *    never dangles in a request.
 *  - Loop thread only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub_internal.h"

#define REPO_SLOTS 4096 /* repository lookups, direct-mapped */
#define REPO_TTL_MS 2000
#define REFS_SLOTS 1024   /* branch heads, direct-mapped */
#define ANSWER_SLOTS 8192 /* fetch answers, FIFO */
#define ANSWER_BUCKETS 16384
#define URL_SLOTS 256 /* presigned URLs, direct-mapped */

/* ============================================================ container */

typedef struct repo_ent repo_ent_t;
typedef struct refs_ent refs_ent_t;
typedef struct answer_ent answer_ent_t;
typedef struct url_ent url_ent_t;
typedef struct inflight inflight_t;

struct mh_fetch_cache {
    mh_hub_t *hub;
    mh__graph_cache_t *graphs;     /* graph.c */
    mh__manifest_lru_t *manifests; /* manifests.c */
    /* repository lookups */
    repo_ent_t *repos[REPO_SLOTS];
    uint32_t nrepos;
    uint64_t epoch; /* bumped by every invalidation */
    bool listening;
    /* branch heads */
    refs_ent_t *refs[REFS_SLOTS];
    /* fetch answers */
    answer_ent_t *buckets[ANSWER_BUCKETS];
    answer_ent_t *ring[ANSWER_SLOTS];
    uint32_t head;
    inflight_t *inflight;
    /* presigned URLs */
    url_ent_t *urls[URL_SLOTS];
};

mh_fetch_cache_t *mh__caches(mh_hub_t *hub)
{
    if (!hub->fetch_cache) {
        mh_fetch_cache_t *fc = calloc(1, sizeof *fc);
        if (!fc) return NULL;
        fc->hub = hub;
        hub->fetch_cache = fc;
    }
    return hub->fetch_cache;
}

mh__graph_cache_t **mh__caches_graphs(mh_hub_t *hub, bool create)
{
    mh_fetch_cache_t *fc = create ? mh__caches(hub) : hub->fetch_cache;
    return fc ? &fc->graphs : NULL;
}

mh__manifest_lru_t **mh__caches_manifests(mh_hub_t *hub, bool create)
{
    mh_fetch_cache_t *fc = create ? mh__caches(hub) : hub->fetch_cache;
    return fc ? &fc->manifests : NULL;
}

/* ================================================== repository lookups */

struct repo_ent {
    char *key; /* see hub.c: kind byte, captures and caller, NUL-separated */
    size_t klen;
    mh_repo_t row; /* strings in `block` */
    char *role;    /* NULL: no collaborator role */
    char *block;
    uint64_t expires_ms;
};

static void repo_ent_free(repo_ent_t *e)
{
    if (!e) return;
    free(e->key);
    free(e->block);
    free(e);
}

static void notify_cb(void *ud, const char *channel, const char *payload)
{
    (void)channel;
    mh_hub_repo_cache_invalidate(ud, payload && *payload && strcmp(payload, "*") != 0 ? payload : NULL);
}

/* The repository half, LISTENing on first use: without a working LISTEN
 * other processes' changes would only be seen after the TTL, so nothing
 * is cached then. */
static mh_fetch_cache_t *repo_side(mh_hub_t *hub)
{
    mh_fetch_cache_t *fc = mh__caches(hub);
    if (!fc || fc->listening || fc->epoch == UINT64_MAX) return fc;
    fc->listening = mh_db_listen(hub->db, "musehub_repo", notify_cb, hub) == 0;
    if (!fc->listening) {
        mh_warn("repo cache: LISTEN failed; repository lookups are not cached");
        fc->epoch = UINT64_MAX; /* do not try again */
    }
    return fc;
}

void mh_hub_repo_cache_invalidate(mh_hub_t *hub, const char *repo_id)
{
    mh_fetch_cache_t *fc = hub->fetch_cache;
    if (!fc) return;
    if (fc->epoch != UINT64_MAX) fc->epoch++;
    for (uint32_t i = 0; i < REPO_SLOTS && fc->nrepos; i++) {
        repo_ent_t *e = fc->repos[i];
        if (e && (!repo_id || strcmp(e->row.repo_id, repo_id) == 0)) {
            repo_ent_free(e);
            fc->repos[i] = NULL;
            fc->nrepos--;
        }
    }
}

void mh_hub_repo_cache_free(mh_hub_t *hub)
{
    mh_fetch_cache_t *fc = hub->fetch_cache;
    if (!fc) return;
    for (uint32_t i = 0; i < REPO_SLOTS; i++) {
        repo_ent_free(fc->repos[i]);
        fc->repos[i] = NULL;
    }
    fc->nrepos = 0;
}

uint64_t mh_hub_repo_cache_epoch(mh_hub_t *hub)
{
    mh_fetch_cache_t *fc = repo_side(hub);
    return fc ? fc->epoch : 0;
}

static uint32_t repo_slot(const char *key, size_t klen) { return (uint32_t)(mh_hash64(key, klen) & (REPO_SLOTS - 1)); }

bool mh_hub_repo_cache_lookup(mh_hub_t *hub, const char *key, size_t klen, mh_arena_t *a, mh_repo_t *out,
                              const char **role)
{
    mh_fetch_cache_t *fc = hub->fetch_cache;
    if (!fc || !fc->listening) return false;
    uint32_t i = repo_slot(key, klen);
    repo_ent_t *e = fc->repos[i];
    if (!e || e->klen != klen || memcmp(e->key, key, klen) != 0) return false;
    if (mh_now_ms() >= e->expires_ms) {
        repo_ent_free(e);
        fc->repos[i] = NULL;
        fc->nrepos--;
        return false;
    }
    const mh_repo_t *r = &e->row;
    char **dst[9] = {&out->repo_id,    &out->owner,       &out->owner_id,       &out->name,      &out->slug,
                     &out->visibility, &out->description, &out->default_branch, &out->created_at};
    char *const src[9] = {r->repo_id,    r->owner,       r->owner_id,       r->name,      r->slug,
                          r->visibility, r->description, r->default_branch, r->created_at};
    bool ok = true;
    for (int k = 0; k < 9; k++) ok &= (*dst[k] = mh_strdup(a, src[k])) != NULL;
    out->state_seq = r->state_seq;
    *role = e->role ? mh_strdup(a, e->role) : NULL;
    return ok && (!e->role || *role);
}

void mh_hub_repo_cache_put(mh_hub_t *hub, uint64_t epoch, const char *key, size_t klen, const mh_repo_t *r,
                           const char *role)
{
    mh_fetch_cache_t *fc = hub->fetch_cache;
    if (!fc || !fc->listening || fc->epoch != epoch) return;
    const char *src[10] = {r->repo_id,    r->owner,       r->owner_id,       r->name,       r->slug,
                           r->visibility, r->description, r->default_branch, r->created_at, role ? role : ""};
    size_t total = 0;
    for (int i = 0; i < 10; i++) total += strlen(src[i]) + 1;
    repo_ent_t *e = calloc(1, sizeof *e);
    char *block = malloc(total), *k = malloc(klen);
    if (!e || !block || !k) { /* a cache: best effort */
        free(e);
        free(block);
        free(k);
        return;
    }
    char *dst[10], *p = block;
    for (int i = 0; i < 10; i++) {
        dst[i] = p;
        p = stpcpy(p, src[i]) + 1;
    }
    memcpy(k, key, klen);
    *e = (repo_ent_t){
        .key = k, .klen = klen, .block = block, .role = role ? dst[9] : NULL, .expires_ms = mh_now_ms() + REPO_TTL_MS};
    e->row = (mh_repo_t){.repo_id = dst[0],
                         .owner = dst[1],
                         .owner_id = dst[2],
                         .name = dst[3],
                         .slug = dst[4],
                         .visibility = dst[5],
                         .description = dst[6],
                         .default_branch = dst[7],
                         .created_at = dst[8],
                         .state_seq = r->state_seq};
    uint32_t i = repo_slot(key, klen);
    if (fc->repos[i]) repo_ent_free(fc->repos[i]);
    else fc->nrepos++;
    fc->repos[i] = e;
}

/* ========================================================= branch heads */

struct refs_ent {
    char *repo_id;
    int64_t state_seq;
    uint32_t nb, n;        /* [0, nb) branches, [nb, n) tags */
    char **names, **heads; /* all in one heap block with the entry */
};

static uint32_t refs_slot(const char *repo_id)
{
    return (uint32_t)mh_hash64(repo_id, strlen(repo_id)) & (REFS_SLOTS - 1);
}

bool mh__refs_cache_get(mh_hub_t *hub, const mh_repo_t *repo, uint32_t *nb, uint32_t *n, char *const **names,
                        char *const **heads)
{
    mh_fetch_cache_t *fc = hub->fetch_cache;
    refs_ent_t *e = fc ? fc->refs[refs_slot(repo->repo_id)] : NULL;
    if (!e || e->state_seq != repo->state_seq || strcmp(e->repo_id, repo->repo_id) != 0) return false;
    *nb = e->nb;
    *n = e->n;
    *names = e->names;
    *heads = e->heads;
    return true;
}

void mh__refs_cache_put(mh_hub_t *hub, const mh_repo_t *repo, uint32_t nb, uint32_t n, char *const *names,
                        char *const *heads)
{
    mh_fetch_cache_t *fc = mh__caches(hub);
    if (!fc) return;
    size_t bytes = sizeof(refs_ent_t) + 2 * (size_t)n * sizeof(char *) + strlen(repo->repo_id) + 1;
    for (uint32_t i = 0; i < n; i++) bytes += strlen(names[i]) + strlen(heads[i]) + 2;
    refs_ent_t *e = malloc(bytes);
    if (!e) return; /* a cache: best effort */
    e->names = (char **)(e + 1);
    e->heads = e->names + n;
    char *p = (char *)(e->heads + n);
    e->repo_id = p;
    p = stpcpy(p, repo->repo_id) + 1;
    for (uint32_t i = 0; i < n; i++) {
        e->names[i] = p;
        p = stpcpy(p, names[i]) + 1;
        e->heads[i] = p;
        p = stpcpy(p, heads[i]) + 1;
    }
    e->nb = nb;
    e->n = n;
    e->state_seq = repo->state_seq;
    uint32_t k = refs_slot(repo->repo_id);
    free(fc->refs[k]);
    fc->refs[k] = e;
}

void mh_hub_refs_cache_free(void)
{
    /* The branch heads live in the hub's caches now: mh_fetch_cache_free
     * frees them. Kept so callers need not know. */
}

/* ======================================================== fetch answers */

struct answer_ent {
    answer_ent_t *next;
    char *key;
    uint64_t hash;
    mh__answer_t ans;
};

struct inflight {
    inflight_t *next;
    char *key;
    mh_req_t **waiters;
    size_t n, cap;
};

static void answer_unlink(mh_fetch_cache_t *fc, answer_ent_t *e)
{
    answer_ent_t **pp = &fc->buckets[e->hash % ANSWER_BUCKETS];
    while (*pp && *pp != e) pp = &(*pp)->next;
    if (*pp) *pp = e->next;
    free(e->key);
    free(e->ans.shallow);
    free(e);
}

const mh__answer_t *mh__answer_get(mh_hub_t *hub, const char *key)
{
    mh_fetch_cache_t *fc = hub->fetch_cache;
    if (!fc) return NULL;
    uint64_t h = mh_hash64(key, strlen(key));
    for (answer_ent_t *e = fc->buckets[h % ANSWER_BUCKETS]; e; e = e->next)
        if (e->hash == h && strcmp(e->key, key) == 0) return e->ans.expires_at > mh_unix_time() ? &e->ans : NULL;
    return NULL;
}

/* ans with a heap copy of its shallow ids; false on ENOMEM. */
static bool answer_copy(mh__answer_t *dst, const mh__answer_t *ans)
{
    size_t n = (size_t)ans->nshallow * MH_ID_SIZE;
    char *sh = n ? malloc(n) : NULL;
    if (n && !sh) return false;
    if (n) memcpy(sh, ans->shallow, n);
    *dst = *ans;
    dst->shallow = sh;
    return true;
}

void mh__answer_put(mh_hub_t *hub, const char *key, const mh__answer_t *ans)
{
    mh_fetch_cache_t *fc = mh__caches(hub);
    if (!fc) return;
    uint64_t h = mh_hash64(key, strlen(key));
    for (answer_ent_t *x = fc->buckets[h % ANSWER_BUCKETS]; x; x = x->next)
        if (x->hash == h && strcmp(x->key, key) == 0) {
            /* A newer record of the key (its row pruned, the answer built
             * again, perhaps into another pack) replaces the old one. */
            mh__answer_t copy;
            if (ans->expires_at > x->ans.expires_at && answer_copy(&copy, ans)) {
                free(x->ans.shallow);
                x->ans = copy;
            }
            return;
        }
    answer_ent_t *e = calloc(1, sizeof *e);
    if (!e || !(e->key = strdup(key)) || !answer_copy(&e->ans, ans)) { /* a cache: best effort */
        if (e) free(e->key);
        free(e);
        return;
    }
    e->hash = h;
    /* FIFO eviction: the ring slot's previous occupant goes. */
    uint32_t slot = fc->head++ % ANSWER_SLOTS;
    if (fc->ring[slot]) answer_unlink(fc, fc->ring[slot]);
    fc->ring[slot] = e;
    e->next = fc->buckets[e->hash % ANSWER_BUCKETS];
    fc->buckets[e->hash % ANSWER_BUCKETS] = e;
}

int mh__inflight_join(mh_hub_t *hub, const char *key, mh_req_t *req, mh__inflight_t **mine)
{
    mh_fetch_cache_t *fc = mh__caches(hub);
    *mine = NULL;
    if (!fc) return MH_ENOMEM;
    for (inflight_t *x = fc->inflight; x; x = x->next) {
        if (strcmp(x->key, key) != 0) continue;
        mh_req_t **w = mh_vec_grow(x->waiters, &x->cap, x->n + 1, sizeof *w, 8);
        if (!w) return MH_ENOMEM;
        x->waiters = w;
        w[x->n++] = req;
        return 1;
    }
    inflight_t *x = calloc(1, sizeof *x);
    if (!x || !(x->key = strdup(key))) {
        free(x);
        return MH_ENOMEM;
    }
    x->next = fc->inflight;
    fc->inflight = x;
    *mine = x;
    return 0;
}

static void inflight_free(inflight_t *x)
{
    free(x->waiters);
    free(x->key);
    free(x);
}

void mh__inflight_done(mh_hub_t *hub, mh__inflight_t *x, void (*each)(mh_req_t *waiter, void *arg), void *arg)
{
    mh_fetch_cache_t *fc = hub->fetch_cache;
    if (!x) return;
    if (fc) {
        inflight_t **pp = &fc->inflight;
        while (*pp && *pp != x) pp = &(*pp)->next;
        if (*pp) *pp = x->next;
    }
    for (size_t i = 0; i < x->n; i++) each(x->waiters[i], arg);
    inflight_free(x);
}

/* ====================================================== presigned URLs */

struct url_ent {
    char mpack_id[MH_ID_SIZE];
    int64_t signed_at, expires_at; /* unix seconds */
    char url[];
};

uint32_t mh__presign_ttl(const mh_hub_t *hub)
{
    uint32_t ttl = hub->cfg && hub->cfg->presign_ttl ? hub->cfg->presign_ttl : 3600;
    return ttl > 604800 ? 604800 : ttl;
}

/* Presigning (an HMAC and the URL's formatting) was half of a cached fetch
 * answer's instructions (docs/benchmarks.md): a URL is reused while at
 * least half its lifetime is left, and expires_in reports what is left. */
int mh__pack_url(mh_hub_t *hub, mh_arena_t *a, const char *mpack_id, char **url, uint32_t *expires_in)
{
    mh_fetch_cache_t *fc = mh__caches(hub);
    uint32_t ttl = mh__presign_ttl(hub);
    int64_t now = mh_unix_time();
    size_t slot = (size_t)mh_hash64(mpack_id, MH_ID_LEN) & (URL_SLOTS - 1);
    url_ent_t *e = fc ? fc->urls[slot] : NULL;
    if (e && strcmp(e->mpack_id, mpack_id) == 0 && now - e->signed_at < (int64_t)ttl / 2 && now < e->expires_at) {
        *url = mh_strdup(a, e->url);
        *expires_in = (uint32_t)(e->expires_at - now);
        return *url ? 0 : MH_ENOMEM;
    }
    char key[MH_MPACK_KEY_SIZE];
    mh_mpack_key(key, mpack_id);
    int rc = mh_store_presign(hub->store, a, "GET", key, 0, NULL, ttl, url);
    if (rc) return rc;
    *expires_in = ttl;
    size_t n = strlen(*url);
    url_ent_t *ne = fc ? malloc(sizeof *ne + n + 1) : NULL;
    if (ne) { /* a cache: best effort */
        snprintf(ne->mpack_id, sizeof ne->mpack_id, "%s", mpack_id);
        ne->signed_at = now;
        ne->expires_at = now + ttl;
        memcpy(ne->url, *url, n + 1);
        free(fc->urls[slot]);
        fc->urls[slot] = ne;
    }
    return 0;
}

/* =========================================================== lifecycle */

void mh_fetch_cache_invalidate(mh_hub_t *hub, const char *repo_id)
{
    /* This process changed the repository: drop its lookup now rather
     * than when our own NOTIFY comes back. */
    mh_hub_repo_cache_invalidate(hub, repo_id);
    mh_fetch_cache_t *fc = hub->fetch_cache;
    if (!fc || !repo_id) return;
    /* The commit graph stays: it is keyed by state_seq, so it is never
     * used for the new state, and the next load extends a copy of it with
     * the new ref rows instead of reading the whole history again
     * (graph.c). */
    size_t rl = strlen(repo_id);
    for (uint32_t i = 0; i < ANSWER_SLOTS; i++) {
        answer_ent_t *e = fc->ring[i];
        if (e && strncmp(e->key, repo_id, rl) == 0 && e->key[rl] == '|') {
            answer_unlink(fc, e);
            fc->ring[i] = NULL;
        }
    }
}

void mh_fetch_cache_free(mh_hub_t *hub)
{
    mh_fetch_cache_t *fc = hub->fetch_cache;
    if (!fc) return;
    mh_hub_repo_cache_free(hub);
    for (uint32_t i = 0; i < REFS_SLOTS; i++) free(fc->refs[i]);
    for (uint32_t i = 0; i < ANSWER_SLOTS; i++)
        if (fc->ring[i]) answer_unlink(fc, fc->ring[i]);
    for (inflight_t *n, *x = fc->inflight; x; x = n) {
        n = x->next;
        inflight_free(x);
    }
    for (uint32_t i = 0; i < URL_SLOTS; i++) free(fc->urls[i]);
    mh__graph_cache_free(fc->graphs);
    mh__manifest_lru_free(fc->manifests);
    free(fc);
    hub->fetch_cache = NULL;
}
