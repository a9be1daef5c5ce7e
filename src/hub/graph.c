/*
 * graph.c — a repository's commit graph in memory (commit -> parents,
 * snapshot, generation, plus its branches), cached per process and keyed
 * by (repo_id, state_seq); the want/have walk of fetch and the ancestor
 * order of the commit log (SPEC 4.4, 4.5; DESIGN 4 "Fetch").
 *
 * Invariants:
 *  - A graph is loaded with ONE statement, so its branches, commits and
 *    state_seq come from one database snapshot: a graph never mixes two
 *    repository states. Every push bumps repos.state_seq, so a cached
 *    graph is only used for the state it was read at.
 *  - Loading is incremental: a repository's commits are only ever added
 *    (until the repository, and its id, is deleted), and its commit_refs
 *    rows become visible in ref_seq order (sql/0009). So the graph of a
 *    new state is a copy of the cached graph of an older state plus the
 *    rows numbered above its ref_seq, read in one statement with the new
 *    state's branches: one push costs the rows it added, not the history.
 *    Copy, not in place: requests hold graphs across async steps and
 *    thread-pool walks. A parent that is not (yet) a node stays on a
 *    pending list and is linked by the extension that adds it.
 *  - Nodes are 80 bytes (binary digests and parent indices): a 1M-commit
 *    repository costs about 100 MB, and walks never touch strings.
 *  - Generation numbers strictly decrease along parent edges (push
 *    computes them), which is what lets the walk pop commits newest
 *    first and stop early. The walk still terminates on inconsistent
 *    data: each node is queued at most once.
 *  - Sealed graphs are immutable and reference counted; the cache holds
 *    one reference, every request using a graph holds another.
 */
#include "hub_internal.h"

#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ builder */

/* Node lookup is core's id map over node indices, keyed by the nodes'
 * digests: seeded, so ids a client chose cannot pile into one bucket, and
 * 8 bytes a slot; an extension copies it with one memcpy. */
static const void *node_key(const void *ctx, uint32_t v) { return ((const mh_graph_t *)ctx)->nodes[v].id; }

static int grow(mh_graph_t *g, uint32_t cap)
{
    if (cap <= g->cap) return 0;
    mh_gnode_t *nodes = realloc(g->nodes, (size_t)cap * sizeof *nodes);
    if (!nodes) return MH_ENOMEM;
    g->nodes = nodes;
    /* Parent digests are kept for the unsealed nodes only. */
    uint32_t tcap = cap - g->nsealed;
    uint8_t(*tp)[2][32] = realloc(g->tmp_parents, (size_t)tcap * sizeof *tp);
    if (!tp) return MH_ENOMEM;
    g->tmp_parents = tp;
    uint8_t *pm = realloc(g->tmp_pmask, tcap);
    if (!pm) return MH_ENOMEM;
    g->tmp_pmask = pm;
    g->cap = cap;
    return mh_idmap_reserve(&g->map, cap);
}

mh_graph_t *mh__graph_new(const char *repo_id, int64_t state_seq, uint32_t ncommits)
{
    mh_graph_t *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->repo_id = strdup(repo_id ? repo_id : "");
    g->state_seq = state_seq;
    g->refs = 1;
    mh_idmap_init(&g->map, NULL, 32, node_key, g);
    if (!g->repo_id || grow(g, ncommits ? ncommits : 16)) {
        g->refs = 1;
        mh__graph_unref(g);
        return NULL;
    }
    return g;
}

mh_graph_t *mh__graph_extend(const mh_graph_t *base, int64_t state_seq, uint32_t nmore)
{
    if (nmore < 16) nmore = 16;
    if (nmore > UINT32_MAX / 2 - base->n) return NULL;
    mh_graph_t *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->refs = 1;
    mh_idmap_init(&g->map, NULL, 32, node_key, g);
    g->repo_id = strdup(base->repo_id);
    g->state_seq = state_seq;
    g->ref_seq = base->ref_seq;
    /* Allocated at the final size once: a copy is the whole cost of an
     * extension, so it must not be copied again by a realloc. */
    uint32_t cap = base->n + nmore;
    g->nodes = malloc((size_t)cap * sizeof *g->nodes);
    g->tmp_parents = malloc((size_t)nmore * sizeof *g->tmp_parents);
    g->tmp_pmask = malloc(nmore);
    g->pend = base->npend ? malloc((size_t)base->npend * sizeof *g->pend) : NULL;
    if (!g->repo_id || !g->nodes || !g->tmp_parents || !g->tmp_pmask || (base->npend && !g->pend) ||
        mh_idmap_clone(&g->map, &base->map, g)) {
        mh__graph_unref(g);
        return NULL;
    }
    memcpy(g->nodes, base->nodes, (size_t)base->n * sizeof *g->nodes);
    if (base->npend) memcpy(g->pend, base->pend, (size_t)base->npend * sizeof *g->pend);
    g->n = g->nsealed = base->n;
    g->cap = cap;
    g->npend = g->cappend = base->npend;
    if (mh_idmap_reserve(&g->map, cap)) {
        mh__graph_unref(g);
        return NULL;
    }
    return g;
}

/* The digest of a NUL-terminated id; MH_EPARSE when it is not one. */
static int digest_of(const char *id, uint8_t out[32]) { return mh_id_digest(id, id ? strlen(id) : 0, out); }

int mh__graph_add(mh_graph_t *g, const char *commit_id, const char *p1, const char *p2, const char *snapshot_id,
                  uint32_t gen)
{
    uint8_t d[32], s[32], pd[2][32];
    uint8_t pm = 0;
    if (digest_of(commit_id, d) || digest_of(snapshot_id, s)) return MH_EPARSE;
    if (p1 && *p1) {
        if (digest_of(p1, pd[0])) return MH_EPARSE;
        pm |= 1;
    }
    if (p2 && *p2) {
        if (digest_of(p2, pd[1])) return MH_EPARSE;
        pm |= 2;
    }
    if (g->n == g->cap && grow(g, g->cap * 2)) return MH_ENOMEM;
    /* Written in place first: the map's key is the node's own digest. */
    mh_gnode_t *nd = &g->nodes[g->n];
    memcpy(nd->id, d, 32);
    memcpy(nd->snap, s, 32);
    nd->p[0] = nd->p[1] = MH_GNONE;
    nd->gen = gen;
    memcpy(g->tmp_parents[g->n - g->nsealed], pd, sizeof pd);
    g->tmp_pmask[g->n - g->nsealed] = pm;
    int added = mh_idmap_add(&g->map, g->n, NULL); /* 0: a duplicate, ignored */
    if (added < 0) return MH_ENOMEM;
    g->n += (uint32_t)added;
    return 0;
}

int mh__graph_add_branch(mh_graph_t *g, const char *name, const char *head_id)
{
    if (!head_id || !mh_id_valid(head_id, strlen(head_id))) return MH_EPARSE;
    mh_gbranch_t *v = mh_vec_grow(g->branches, &g->capb, (size_t)g->nbranches + 1, sizeof *v, 8);
    if (!v) return MH_ENOMEM;
    g->branches = v;
    mh_gbranch_t *b = &v[g->nbranches];
    b->name = strdup(name);
    if (!b->name) return MH_ENOMEM;
    memcpy(b->head.s, head_id, MH_ID_LEN);
    b->head.s[MH_ID_LEN] = 0;
    b->node = MH_GNONE;
    g->nbranches++;
    return 0;
}

static int branch_cmp(const void *a, const void *b)
{
    return strcmp(((const mh_gbranch_t *)a)->name, ((const mh_gbranch_t *)b)->name);
}

static uint32_t lookup(const mh_graph_t *g, const uint8_t d[32])
{
    return mh_idmap_find(&g->map, d); /* MH_IDMAP_NONE is MH_GNONE */
}

static int pend_push(mh_graph_t *g, uint32_t node, uint32_t j, const uint8_t d[32])
{
    mh_gpend_t *v = mh_vec_grow(g->pend, &g->cappend, (size_t)g->npend + 1, sizeof *v, 8);
    if (!v) return MH_ENOMEM;
    g->pend = v;
    mh_gpend_t *p = &v[g->npend++];
    p->node = node;
    p->j = j;
    memcpy(p->d, d, 32);
    return 0;
}

int mh__graph_seal(mh_graph_t *g)
{
    /* Parents an earlier load did not have may have arrived now. */
    uint32_t keep = 0;
    for (uint32_t k = 0; k < g->npend; k++) {
        mh_gpend_t *pe = &g->pend[k];
        uint32_t x = lookup(g, pe->d);
        if (x != MH_GNONE) g->nodes[pe->node].p[pe->j] = x;
        else g->pend[keep++] = *pe;
    }
    g->npend = keep;
    for (uint32_t k = g->nsealed; k < g->n; k++) {
        for (uint32_t j = 0; j < 2; j++) {
            if (!(g->tmp_pmask[k - g->nsealed] & (1u << j))) continue;
            const uint8_t *d = g->tmp_parents[k - g->nsealed][j];
            /* A parent outside this repository's refs stays MH_GNONE: the
             * repository cannot see it, so walks must not reach it. It is
             * remembered in case a later extension brings it. */
            g->nodes[k].p[j] = lookup(g, d);
            if (g->nodes[k].p[j] == MH_GNONE && pend_push(g, k, j, d)) return MH_ENOMEM;
        }
    }
    free(g->tmp_parents);
    free(g->tmp_pmask);
    g->tmp_parents = NULL;
    g->tmp_pmask = NULL;
    g->nsealed = g->n;
    if (g->nbranches) qsort(g->branches, g->nbranches, sizeof *g->branches, branch_cmp);
    for (uint32_t b = 0; b < g->nbranches; b++) g->branches[b].node = mh__graph_find(g, g->branches[b].head.s);
    g->bytes = sizeof *g + (size_t)g->cap * sizeof(mh_gnode_t) + g->map.cap * sizeof(mh_idmap_slot_t) +
               (size_t)g->nbranches * (sizeof(mh_gbranch_t) + 32) + (size_t)g->cappend * sizeof(mh_gpend_t);
    return 0;
}

void mh__graph_ref(mh_graph_t *g) { g->refs++; }

void mh__graph_unref(mh_graph_t *g)
{
    if (!g || --g->refs > 0) return;
    for (uint32_t b = 0; b < g->nbranches; b++) free(g->branches[b].name);
    free(g->branches);
    free(g->nodes);
    mh_idmap_free(&g->map);
    free(g->tmp_parents);
    free(g->tmp_pmask);
    free(g->pend);
    free(g->repo_id);
    free(g);
}

static void unref_cb(void *arg) { mh__graph_unref(arg); }

int mh__graph_hold(mh_arena_t *a, mh_graph_t *g)
{
    int rc = mh_arena_defer(a, unref_cb, g);
    if (rc) mh__graph_unref(g);
    return rc;
}

uint32_t mh__graph_find(const mh_graph_t *g, const char *commit_id)
{
    uint8_t d[32];
    if (mh_id_digest(commit_id, MH_ID_LEN, d)) return MH_GNONE;
    return lookup(g, d);
}

void mh__graph_id(const mh_graph_t *g, uint32_t i, mh_id_t *out) { mh_id_from_digest(out, g->nodes[i].id); }

void mh__graph_snap_id(const mh_graph_t *g, uint32_t i, mh_id_t *out) { mh_id_from_digest(out, g->nodes[i].snap); }

const mh_gbranch_t *mh__graph_branch(const mh_graph_t *g, const char *name, size_t n)
{
    uint32_t lo = 0, hi = g->nbranches;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        const char *bn = g->branches[mid].name;
        size_t bl = strlen(bn);
        int c = memcmp(bn, name, bl < n ? bl : n);
        if (c == 0) c = bl < n ? -1 : bl > n ? 1 : 0;
        if (c == 0) return &g->branches[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* --------------------------------------------------------------- heaps */

/* A binary max-heap of node indices under an order `above(a, b)`. */
typedef struct {
    uint32_t *v;
    size_t n;
    const mh_graph_t *g;
    bool by_id; /* tie-break on the commit id (log order) */
} heap_t;

static bool above(const heap_t *h, uint32_t a, uint32_t b)
{
    const mh_gnode_t *x = &h->g->nodes[a], *y = &h->g->nodes[b];
    if (x->gen != y->gen) return x->gen > y->gen;
    if (h->by_id) return memcmp(x->id, y->id, 32) > 0;
    return a < b;
}

static void heap_push(heap_t *h, uint32_t x)
{
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!above(h, x, h->v[p])) break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = x;
}

static uint32_t heap_pop(heap_t *h)
{
    uint32_t top = h->v[0], last = h->v[--h->n];
    size_t i = 0, n = h->n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && above(h, h->v[c + 1], h->v[c])) c++;
        if (!above(h, h->v[c], last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (n) h->v[i] = last;
    return top;
}

/* ---------------------------------------------------------------- walk */

typedef struct {
    heap_t h;
    uint8_t *flags;
    size_t pending; /* queued nodes without HAVE: the walk ends at 0 */
} walk_t;

static void mark(walk_t *w, uint32_t x, uint8_t f)
{
    uint8_t old = w->flags[x], nw = (uint8_t)(old | f);
    if (!(old & MH_GW_SEEN)) {
        w->flags[x] = nw | MH_GW_SEEN | MH_GW_QUEUED;
        heap_push(&w->h, x);
        if (!(nw & MH_GW_HAVE)) w->pending++;
        return;
    }
    w->flags[x] = nw;
    /* A queued WANT-only node just learnt the client has it. */
    if ((old & MH_GW_QUEUED) && !(old & MH_GW_HAVE) && (nw & MH_GW_HAVE)) w->pending--;
    /* A node already popped never changes its verdict: with consistent
     * generations all its children were popped before it. */
}

int mh__graph_walk(const mh_graph_t *g, const uint32_t *want, size_t nwant, const uint32_t *have, size_t nhave,
                   uint8_t *flags, uint32_t *out, size_t *nout)
{
    *nout = 0;
    if (!g->n) return 0;
    walk_t w = {.h = {.v = malloc((size_t)g->n * sizeof(uint32_t)), .g = g}, .flags = flags};
    if (!w.h.v) return MH_ENOMEM;
    for (size_t i = 0; i < nhave; i++)
        if (have[i] < g->n) mark(&w, have[i], MH_GW_HAVE);
    for (size_t i = 0; i < nwant; i++)
        if (want[i] < g->n) mark(&w, want[i], MH_GW_WANT);
    size_t k = 0;
    while (w.pending > 0 && w.h.n > 0) {
        uint32_t x = heap_pop(&w.h);
        flags[x] &= (uint8_t)~MH_GW_QUEUED;
        uint8_t f = flags[x] & MH_GW_HAVE ? MH_GW_HAVE : MH_GW_WANT;
        if (f == MH_GW_WANT) {
            w.pending--;
            out[k++] = x;
        }
        for (int j = 0; j < 2; j++) {
            uint32_t p = g->nodes[x].p[j];
            if (p != MH_GNONE) mark(&w, p, f);
        }
    }
    free(w.h.v);
    *nout = k;
    return 0;
}

/* Marks x WANT at distance d from the wants (the smallest wins). */
static void mark_want(walk_t *w, uint32_t *dist, uint32_t x, uint64_t d)
{
    if (dist && (!(w->flags[x] & MH_GW_WANT) || dist[x] > d)) dist[x] = (uint32_t)(d > UINT32_MAX ? UINT32_MAX : d);
    mark(w, x, MH_GW_WANT);
}

int mh__graph_walk_ex(const mh_graph_t *g, const uint32_t *want, size_t nwant, const uint32_t *have, size_t nhave,
                      uint64_t depth, uint8_t *flags, uint32_t *out, size_t *nout)
{
    *nout = 0;
    if (!g->n) return 0;
    walk_t w = {.h = {.v = malloc((size_t)g->n * sizeof(uint32_t)), .g = g}, .flags = flags};
    uint32_t *dist = depth ? malloc((size_t)g->n * sizeof *dist) : NULL;
    if (!w.h.v || (depth && !dist)) {
        free(w.h.v);
        free(dist);
        return MH_ENOMEM;
    }
    for (size_t i = 0; i < nhave; i++)
        if (have[i] < g->n) mark(&w, have[i], MH_GW_HAVE);
    for (size_t i = 0; i < nwant; i++)
        if (want[i] < g->n && !(flags[want[i]] & MH_GW_HAVE)) {
            flags[want[i]] |= MH_GW_XWANT;
            mark_want(&w, dist, want[i], 0);
        }
    size_t k = 0;
    while (w.pending > 0 && w.h.n > 0) {
        uint32_t x = heap_pop(&w.h);
        flags[x] &= (uint8_t)~MH_GW_QUEUED;
        const uint32_t *par = g->nodes[x].p;
        if (flags[x] & MH_GW_HAVE) {
            /* The client's history does not flow into a commit it asks
             * for: that is how a shallow client deepens. */
            for (int j = 0; j < 2; j++)
                if (par[j] != MH_GNONE && !(flags[par[j]] & MH_GW_XWANT)) mark(&w, par[j], MH_GW_HAVE);
            continue;
        }
        w.pending--;
        out[k++] = x;
        uint64_t d = dist ? (uint64_t)dist[x] + 1 : 0;
        if (depth && d >= depth) continue; /* its parents are left out */
        for (int j = 0; j < 2; j++)
            if (par[j] != MH_GNONE) mark_want(&w, dist, par[j], d);
    }
    free(w.h.v);
    free(dist);
    *nout = k;
    return 0;
}

int mh__graph_log(const mh_graph_t *g, uint32_t head, uint32_t cursor, uint32_t limit, uint32_t *out, uint32_t *nout,
                  bool *more)
{
    *nout = 0;
    *more = false;
    if (head >= g->n) return MH_ENOENT;
    uint8_t *seen = calloc(g->n, 1);
    heap_t h = {.v = malloc((size_t)g->n * sizeof(uint32_t)), .g = g, .by_id = true};
    if (!seen || !h.v) {
        free(seen);
        free(h.v);
        return MH_ENOMEM;
    }
    /* Popping a max-heap seeded with the head yields all its ancestors in
     * (generation, id) descending order: any not-yet-queued ancestor has a
     * queued descendant of strictly higher generation. */
    seen[head] = 1;
    heap_push(&h, head);
    bool started = cursor == MH_GNONE;
    uint32_t k = 0;
    while (h.n > 0 && k < limit) {
        uint32_t x = heap_pop(&h);
        for (int j = 0; j < 2; j++) {
            uint32_t p = g->nodes[x].p[j];
            if (p != MH_GNONE && !seen[p]) {
                seen[p] = 1;
                heap_push(&h, p);
            }
        }
        if (started) out[k++] = x;
        else if (x == cursor) started = true;
    }
    int rc = started ? 0 : MH_ENOENT;
    *nout = k;
    *more = started && h.n > 0;
    free(seen);
    free(h.v);
    return rc;
}

/* --------------------------------------------------------------- cache */

#define GC_SLOTS 32
#define GC_MAX_BYTES ((size_t)512 << 20)

struct mh__graph_cache {
    mh_graph_t *g[GC_SLOTS];
    uint64_t used[GC_SLOTS];
    uint64_t tick;
};

static mh__graph_cache_t *gcache(mh_hub_t *hub, bool create)
{
    mh__graph_cache_t **gc = mh__caches_graphs(hub, create);
    if (!gc) return NULL;
    if (!*gc && create) *gc = calloc(1, sizeof **gc);
    return *gc;
}

mh_graph_t *mh__graph_cache_get(mh_hub_t *hub, const char *repo_id, int64_t state_seq)
{
    mh__graph_cache_t *gc = gcache(hub, false);
    if (!gc) return NULL;
    for (int i = 0; i < GC_SLOTS; i++) {
        mh_graph_t *g = gc->g[i];
        if (!g || strcmp(g->repo_id, repo_id) != 0) continue;
        if (g->state_seq != state_seq) return NULL;
        gc->used[i] = ++gc->tick;
        mh__graph_ref(g);
        return g;
    }
    return NULL;
}

/* The cached graph of repo_id whatever its state, with a reference for
 * the caller, or NULL: the base a load extends. */
static mh_graph_t *cache_latest(mh_hub_t *hub, const char *repo_id)
{
    mh__graph_cache_t *gc = gcache(hub, false);
    if (!gc) return NULL;
    for (int i = 0; i < GC_SLOTS; i++) {
        if (gc->g[i] && strcmp(gc->g[i]->repo_id, repo_id) == 0) {
            mh__graph_ref(gc->g[i]);
            return gc->g[i];
        }
    }
    return NULL;
}

static void cache_put(mh_hub_t *hub, mh_graph_t *g)
{
    mh__graph_cache_t *gc = gcache(hub, true);
    if (!gc || g->bytes > GC_MAX_BYTES / 2) return;
    int slot = -1;
    size_t total = g->bytes;
    for (int i = 0; i < GC_SLOTS; i++) {
        if (!gc->g[i]) {
            if (slot < 0) slot = i;
            continue;
        }
        if (strcmp(gc->g[i]->repo_id, g->repo_id) == 0) {
            /* One graph per repository. Two loads raced: keep the newer
             * state (of one state, the one with more ref rows). */
            const mh_graph_t *c = gc->g[i];
            if (c->state_seq > g->state_seq || (c->state_seq == g->state_seq && c->ref_seq > g->ref_seq)) return;
            mh__graph_unref(gc->g[i]);
            gc->g[i] = NULL;
            slot = i;
            continue;
        }
        total += gc->g[i]->bytes;
    }
    /* Evict least recently used graphs until the new one fits. */
    while (slot < 0 || total > GC_MAX_BYTES) {
        int lru = -1;
        for (int i = 0; i < GC_SLOTS; i++)
            if (gc->g[i] && (lru < 0 || gc->used[i] < gc->used[lru])) lru = i;
        if (lru < 0) break;
        total -= gc->g[lru]->bytes;
        mh__graph_unref(gc->g[lru]);
        gc->g[lru] = NULL;
        if (slot < 0) slot = lru;
    }
    if (slot < 0) return;
    mh__graph_ref(g);
    gc->g[slot] = g;
    gc->used[slot] = ++gc->tick;
}

void mh__graph_cache_drop(mh_hub_t *hub, const char *repo_id)
{
    mh__graph_cache_t *gc = gcache(hub, false);
    if (!gc) return;
    for (int i = 0; i < GC_SLOTS; i++) {
        if (gc->g[i] && (!repo_id || strcmp(gc->g[i]->repo_id, repo_id) == 0)) {
            mh__graph_unref(gc->g[i]);
            gc->g[i] = NULL;
        }
    }
}

void mh__graph_cache_free(mh__graph_cache_t *gc)
{
    if (!gc) return;
    for (int i = 0; i < GC_SLOTS; i++) mh__graph_unref(gc->g[i]);
    free(gc);
}

/* ---------------------------------------------------------------- load */

/* One statement = one snapshot: the state counter, the branches and the
 * commit graph cannot come from two different repository states. */
#define GRAPH_SQL                                                                                                      \
    "SELECT 0, state_seq::text, NULL::text, NULL::text, NULL::text, 0, 0::bigint FROM repos WHERE repo_id = $1"        \
    " UNION ALL SELECT 1, name, head_commit_id, NULL::text, NULL::text, 0, 0::bigint FROM branches"                    \
    " WHERE repo_id = $1"                                                                                              \
    " UNION ALL SELECT 2, c.commit_id, c.parent_commit_id, c.parent2_commit_id, c.snapshot_id, c.generation,"          \
    " r.ref_seq FROM commit_refs r JOIN commits c ON c.commit_id = r.commit_id WHERE r.repo_id = $1"

static const mh_stmt_t st_graph = {"hub_graph_load", GRAPH_SQL, 1};
/* Only the rows added since a cached graph was read: a range of the
 * (repo_id, ref_seq) index (sql/0009), which is partial on `ref_seq > 0`
 * (sql/0051: true of every row, so that only a statement saying so can
 * use it, never a probe by the primary key); the clause is here for that
 * proof, a generic plan's $2 proves nothing. Its own statement, so that
 * neither plan is chosen for the other's row counts. */
static const mh_stmt_t st_graph_since = {"hub_graph_since", GRAPH_SQL " AND r.ref_seq > $2::bigint AND r.ref_seq > 0",
                                         2};

typedef struct {
    mh_hub_t *hub;
    char *repo_id;
    const mh_graph_t *base; /* the cached graph extended (held by the arena), or NULL */
    mh_graph_cb cb;
    void *ud;
} loader_t;

static mh_graph_t *build(const loader_t *l, PGresult *res, int *err, const char **why)
{
    int rows = PQntuples(res);
    int64_t seq = -1;
    uint32_t ncommits = 0;
    for (int r = 0; r < rows; r++) {
        int kind = (int)mh_pq_int(res, r, 0);
        if (kind == 0) seq = strtoll(mh_pq_str(res, r, 1), NULL, 10);
        else if (kind == 2) ncommits++;
    }
    if (seq < 0) {
        *err = MH_ENOENT;
        *why = "repository not found";
        return NULL;
    }
    mh_graph_t *g = l->base ? mh__graph_extend(l->base, seq, ncommits) : mh__graph_new(l->repo_id, seq, ncommits);
    if (!g) {
        *err = MH_ENOMEM;
        *why = "out of memory";
        return NULL;
    }
    int rc = 0;
    for (int r = 0; r < rows && rc != MH_ENOMEM; r++) {
        int kind = (int)mh_pq_int(res, r, 0);
        rc = 0;
        if (kind == 1) {
            rc = mh__graph_add_branch(g, mh_pq_str(res, r, 1), mh_pq_str(res, r, 2));
        } else if (kind == 2) {
            const char *p1 = mh_pq_isnull(res, r, 2) ? NULL : mh_pq_str(res, r, 2);
            const char *p2 = mh_pq_isnull(res, r, 3) ? NULL : mh_pq_str(res, r, 3);
            int64_t gen = mh_pq_int(res, r, 5), rs = mh_pq_int(res, r, 6);
            if (rs > g->ref_seq) g->ref_seq = rs;
            rc = mh__graph_add(g, mh_pq_str(res, r, 1), p1, p2, mh_pq_str(res, r, 4),
                               gen < 0            ? 0
                               : gen > UINT32_MAX ? UINT32_MAX
                                                  : (uint32_t)gen);
        }
        if (rc && rc != MH_ENOMEM) mh_warn("graph of %s: skipping a row with a malformed id", l->repo_id);
    }
    if (rc == MH_ENOMEM || mh__graph_seal(g)) {
        mh__graph_unref(g);
        *err = MH_ENOMEM;
        *why = "out of memory";
        return NULL;
    }
    return g;
}

static void load_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    loader_t *l = ud;
    mh_graph_t *g = NULL;
    if (!err) {
        uint64_t t0 = mh_now_us();
        const char *why = NULL;
        g = build(l, res, &err, &why);
        if (g) {
            cache_put(l->hub, g);
            mh_debug("graph of %s: %u commits (%u new), %u branches, seq %lld, ref_seq %lld, built in %llu us",
                     l->repo_id, g->n, g->n - (l->base ? l->base->n : 0), g->nbranches, (long long)g->state_seq,
                     (long long)g->ref_seq, (unsigned long long)(mh_now_us() - t0));
        } else {
            errmsg = why;
            /* A deleted repository: its graph is of no further use. */
            if (err == MH_ENOENT) mh__graph_cache_drop(l->hub, l->repo_id);
        }
    }
    l->cb(l->ud, g, err, errmsg);
}

int mh__graph_load(mh_hub_t *hub, mh_arena_t *a, const char *repo_id, mh_graph_cb cb, void *ud)
{
    loader_t *l = mh_alloc(a, sizeof *l);
    if (!l || !(l->repo_id = mh_strdup(a, repo_id))) return MH_ENOMEM;
    l->hub = hub;
    l->cb = cb;
    l->ud = ud;
    /* The base stays alive with the arena, whatever the cache does
     * meanwhile; without it (or its hold) the load is a full one. */
    mh_graph_t *base = cache_latest(hub, repo_id);
    char *since = base ? mh_sprintf(a, "%lld", (long long)base->ref_seq) : NULL;
    if (base && (!since || mh__graph_hold(a, base))) { /* the hold unrefs on failure */
        if (!since) mh__graph_unref(base);
        base = NULL;
    }
    l->base = base;
    const char *vals[2] = {repo_id, since};
    mh_db_exec(hub->db, base ? &st_graph_since : &st_graph, vals, NULL, NULL, load_cb, l);
    return 0;
}
