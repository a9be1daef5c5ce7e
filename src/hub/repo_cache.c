/*
 * repo_cache.c — a per-process cache of repository lookups (the one
 * query every repository-scoped request makes: the repository row and the
 * caller's collaborator role), so a cached fetch answer costs no database
 * round trip at all (DESIGN 4: "a repeated fetch costs one lookup and one
 * presign").
 *
 * Invariants:
 *  - Only rows that exist are cached (a repository created a moment later
 *    is never hidden by a cached 404).
 *  - Every change to a `repos` or `collaborators` row NOTIFYs channel
 *    musehub_repo with the repository id (trigger, sql/0006), and every
 *    process LISTENs: an entry is dropped within milliseconds of the
 *    commit that changed it. The writing process also drops it
 *    synchronously (mh_fetch_cache_invalidate).
 *  - Notifications can be lost while the LISTEN connection reconnects, so
 *    entries also expire after MH_REPO_CACHE_TTL_MS.
 *  - A lookup that was in flight while any invalidation happened is not
 *    inserted (the epoch check), so a stale row read before a push can
 *    never be cached after that push's invalidation.
 */
#include <stdlib.h>
#include <string.h>

#include "hub_internal.h"
#include "mh/hub.h"

#define MH_REPO_CACHE_SLOTS 4096 /* power of two */
#define MH_REPO_CACHE_TTL_MS 2000

typedef struct {
    char *key;     /* "<o|i>\0owner\0slug\0identity" flattened, see make_key */
    size_t klen;
    char *repo_id; /* for invalidation */
    mh_repo_t row; /* heap strings (one block: `block`) */
    char *role;    /* NULL: no collaborator role */
    char *block;
    uint64_t expires_ms;
} entry_t;

struct mh_repo_cache {
    entry_t *slot[MH_REPO_CACHE_SLOTS];
    uint32_t n;
    uint64_t epoch; /* bumped by every invalidation */
    bool listening;
};

static void entry_free(entry_t *e)
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

static mh_repo_cache_t *cache_get(mh_hub_t *hub)
{
    if (hub->repo_cache) return hub->repo_cache;
    mh_repo_cache_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    hub->repo_cache = c;
    /* Without a working LISTEN other processes' changes would only be
     * seen after the TTL: refuse to cache at all then. */
    c->listening = mh_db_listen(hub->db, "musehub_repo", notify_cb, hub) == 0;
    if (!c->listening) mh_warn("repo cache: LISTEN failed; repository lookups are not cached");
    return c;
}

void mh_hub_repo_cache_invalidate(mh_hub_t *hub, const char *repo_id)
{
    mh_repo_cache_t *c = hub->repo_cache;
    if (!c) return;
    c->epoch++;
    for (uint32_t i = 0; i < MH_REPO_CACHE_SLOTS && c->n; i++) {
        entry_t *e = c->slot[i];
        if (e && (!repo_id || strcmp(e->repo_id, repo_id) == 0)) {
            entry_free(e);
            c->slot[i] = NULL;
            c->n--;
        }
    }
}

void mh_hub_repo_cache_free(mh_hub_t *hub)
{
    mh_repo_cache_t *c = hub->repo_cache;
    if (!c) return;
    for (uint32_t i = 0; i < MH_REPO_CACHE_SLOTS; i++) entry_free(c->slot[i]);
    free(c);
    hub->repo_cache = NULL;
}

uint64_t mh_hub_repo_cache_epoch(mh_hub_t *hub)
{
    mh_repo_cache_t *c = cache_get(hub);
    return c ? c->epoch : 0;
}

/* Direct-mapped: a colliding key simply replaces the older entry. */
static uint32_t slot_of(const char *key, size_t klen)
{
    return (uint32_t)(mh_hash64(key, klen) & (MH_REPO_CACHE_SLOTS - 1));
}

bool mh_hub_repo_cache_lookup(mh_hub_t *hub, const char *key, size_t klen, mh_arena_t *a, mh_repo_t *out,
                              const char **role)
{
    mh_repo_cache_t *c = hub->repo_cache;
    if (!c || !c->listening) return false;
    uint32_t i = slot_of(key, klen);
    entry_t *e = c->slot[i];
    if (!e || e->klen != klen || memcmp(e->key, key, klen) != 0) return false;
    if (mh_now_ms() >= e->expires_ms) {
        entry_free(e);
        c->slot[i] = NULL;
        c->n--;
        return false;
    }
    /* Hand out arena copies: handlers may keep them past a later
     * invalidation that frees the entry. */
    const mh_repo_t *r = &e->row;
    out->repo_id = mh_strdup(a, r->repo_id);
    out->owner = mh_strdup(a, r->owner);
    out->owner_id = mh_strdup(a, r->owner_id);
    out->name = mh_strdup(a, r->name);
    out->slug = mh_strdup(a, r->slug);
    out->visibility = mh_strdup(a, r->visibility);
    out->description = mh_strdup(a, r->description);
    out->default_branch = mh_strdup(a, r->default_branch);
    out->created_at = mh_strdup(a, r->created_at);
    out->state_seq = r->state_seq;
    *role = e->role ? mh_strdup(a, e->role) : NULL;
    return out->repo_id && out->owner && out->owner_id && out->name && out->slug && out->visibility &&
           out->description && out->default_branch && out->created_at && (!e->role || *role);
}

void mh_hub_repo_cache_put(mh_hub_t *hub, uint64_t epoch, const char *key, size_t klen, const mh_repo_t *r,
                           const char *role)
{
    mh_repo_cache_t *c = hub->repo_cache;
    if (!c || !c->listening || c->epoch != epoch) return;
    const char *src[10] = {r->repo_id, r->owner, r->owner_id, r->name, r->slug, r->visibility,
                           r->description, r->default_branch, r->created_at, role ? role : ""};
    size_t total = 0;
    for (int i = 0; i < 10; i++) total += strlen(src[i]) + 1;
    entry_t *e = calloc(1, sizeof *e);
    char *block = malloc(total);
    char *k = malloc(klen);
    if (!e || !block || !k) {
        free(e);
        free(block);
        free(k);
        return;
    }
    char *dst[10];
    char *p = block;
    for (int i = 0; i < 10; i++) {
        size_t n = strlen(src[i]) + 1;
        memcpy(p, src[i], n);
        dst[i] = p;
        p += n;
    }
    memcpy(k, key, klen);
    e->key = k;
    e->klen = klen;
    e->block = block;
    e->row = (mh_repo_t){.repo_id = dst[0], .owner = dst[1], .owner_id = dst[2], .name = dst[3], .slug = dst[4],
                         .visibility = dst[5], .description = dst[6], .default_branch = dst[7],
                         .created_at = dst[8], .state_seq = r->state_seq};
    e->repo_id = dst[0];
    e->role = role ? dst[9] : NULL;
    e->expires_ms = mh_now_ms() + MH_REPO_CACHE_TTL_MS;
    uint32_t i = slot_of(key, klen);
    if (c->slot[i]) entry_free(c->slot[i]);
    else c->n++;
    c->slot[i] = e;
}
