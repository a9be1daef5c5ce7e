/*
 * merge.c — the pure parts of proposals and merges (SPEC 4.6): the
 * three-way merge of manifests, the change summary shown on a proposal,
 * and the merge base on the in-memory commit graph. See merge.h.
 *
 * Invariants:
 *  - Manifests are sorted by path (bytewise, a proper prefix first), so
 *    both the merge and the change summary are one simultaneous linear
 *    walk over the sorted entry arrays: no hashing, no lookups.
 *  - Generation numbers strictly decrease along parent edges, so popping
 *    commits from a max-heap by generation visits every descendant (in the
 *    walk) of a commit before the commit itself: its flags are final when
 *    it is popped. On inconsistent data the walk still terminates, since a
 *    node is re-queued only when its flags grow (at most twice).
 */
#include "merge.h"

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------- helpers */

/* Bytewise path order, a proper prefix first (the manifests' order). */
static int path_cmp(const char *a, size_t an, const char *b, size_t bn)
{
    size_t m = an < bn ? an : bn;
    int c = memcmp(a, b, m);
    if (c) return c;
    return an < bn ? -1 : an > bn;
}

/* Object ids equal, NULL meaning "absent". */
static bool same_id(const char *x, const char *y)
{
    if (!x || !y) return x == y;
    return memcmp(x, y, MH_ID_LEN) == 0;
}

/* The entry at index i of m, or NULL past the end. */
static const mh_mentry_t *at(const mh_manifest_t *m, size_t i) { return i < m->n ? &m->e[i] : NULL; }

/* The smallest path among up to three current entries. */
static const mh_mentry_t *min3(const mh_mentry_t *a, const mh_mentry_t *b, const mh_mentry_t *c)
{
    const mh_mentry_t *m = a;
    if (b && (!m || path_cmp(b->path, b->plen, m->path, m->plen) < 0)) m = b;
    if (c && (!m || path_cmp(c->path, c->plen, m->path, m->plen) < 0)) m = c;
    return m;
}

static bool is_at(const mh_mentry_t *e, const mh_mentry_t *m)
{
    return e && path_cmp(e->path, e->plen, m->path, m->plen) == 0;
}

/* --------------------------------------------------------- three-way */

int mh__merge_manifests(const mh_manifest_t *base, const mh_manifest_t *ours, const mh_manifest_t *theirs,
                        mh_manifest_t *out, mh_mpath_t **conf, size_t *nconf)
{
    *conf = NULL;
    *nconf = 0;
    out->n = 0;
    mh_manifest_touch(out, 0);
    mh_mpath_t *cp = NULL;
    size_t nc = 0, capc = 0;
    size_t i = 0, j = 0, k = 0;
    for (;;) {
        const mh_mentry_t *b = at(base, i), *o = at(ours, j), *t = at(theirs, k);
        const mh_mentry_t *m = min3(b, o, t);
        if (!m) break;
        const char *bid = NULL, *oid = NULL, *tid = NULL;
        if (is_at(b, m)) bid = b->id, i++;
        if (is_at(o, m)) oid = o->id, j++;
        if (is_at(t, m)) tid = t->id, k++;
        const char *r;
        if (same_id(oid, tid)) r = oid;
        else if (same_id(bid, oid)) r = tid;
        else if (same_id(bid, tid)) r = oid;
        else {
            if (nc == capc) {
                size_t nn = capc ? 2 * capc : 16;
                mh_mpath_t *g = realloc(cp, nn * sizeof *g);
                if (!g) goto nomem;
                cp = g;
                capc = nn;
            }
            cp[nc++] = (mh_mpath_t){m->path, m->plen};
            continue;
        }
        /* Once a conflict is known the merged manifest is not needed:
         * only the remaining conflicts are collected. */
        if (r && !nc && mh_manifest_upsert(out, m->path, m->plen, r)) goto nomem;
    }
    if (nc) {
        out->n = 0;
        mh_manifest_touch(out, 0);
        *conf = cp;
        *nconf = nc;
    }
    return 0;
nomem:
    free(cp);
    out->n = 0;
    mh_manifest_touch(out, 0);
    return MH_ENOMEM;
}

/* ------------------------------------------------------ change summary */

/* One walk; with lists NULL it only counts. */
static void changes_walk(const mh_manifest_t *from, const mh_manifest_t *to, mh_mchanges_t *c, bool fill)
{
    size_t i = 0, j = 0, na = 0, nch = 0, nr = 0;
    while (i < from->n || j < to->n) {
        const mh_mentry_t *f = at(from, i), *t = at(to, j);
        int cmp = !f ? 1 : !t ? -1 : path_cmp(f->path, f->plen, t->path, t->plen);
        if (cmp < 0) {
            if (fill) c->removed[nr] = (mh_mpath_t){f->path, f->plen};
            nr++;
            i++;
        } else if (cmp > 0) {
            if (fill) c->added[na] = (mh_mpath_t){t->path, t->plen};
            na++;
            j++;
        } else {
            if (!same_id(f->id, t->id)) {
                if (fill) c->changed[nch] = (mh_mpath_t){t->path, t->plen};
                nch++;
            }
            i++;
            j++;
        }
    }
    c->nadded = na;
    c->nchanged = nch;
    c->nremoved = nr;
}

int mh__manifest_changes(mh_arena_t *a, const mh_manifest_t *from, const mh_manifest_t *to, mh_mchanges_t *out)
{
    memset(out, 0, sizeof *out);
    changes_walk(from, to, out, false);
    /* +1: never a zero-byte request, so NULL always means ENOMEM. */
    out->added = mh_alloc(a, (out->nadded + 1) * sizeof(mh_mpath_t));
    out->changed = mh_alloc(a, (out->nchanged + 1) * sizeof(mh_mpath_t));
    out->removed = mh_alloc(a, (out->nremoved + 1) * sizeof(mh_mpath_t));
    if (!out->added || !out->changed || !out->removed) return MH_ENOMEM;
    changes_walk(from, to, out, true);
    return 0;
}

/* ---------------------------------------------------------- merge base */

enum { F_X = 1, F_Y = 2, F_BOTH = 3 };

typedef struct {
    const mh_graph_t *g;
    uint32_t *h;
    size_t n;
} gheap_t;

/* Heap order: higher generation first, then the smaller commit id, so
 * ties at the base's generation are met smallest id first. */
static bool before(const gheap_t *h, uint32_t a, uint32_t b)
{
    const mh_gnode_t *x = &h->g->nodes[a], *y = &h->g->nodes[b];
    if (x->gen != y->gen) return x->gen > y->gen;
    return memcmp(x->id, y->id, 32) < 0;
}

static void hpush(gheap_t *h, uint32_t v)
{
    size_t i = h->n++;
    h->h[i] = v;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!before(h, h->h[i], h->h[p])) break;
        uint32_t t = h->h[i];
        h->h[i] = h->h[p];
        h->h[p] = t;
        i = p;
    }
}

static uint32_t hpop(gheap_t *h)
{
    uint32_t top = h->h[0];
    h->h[0] = h->h[--h->n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < h->n && before(h, h->h[l], h->h[m])) m = l;
        if (r < h->n && before(h, h->h[r], h->h[m])) m = r;
        if (m == i) break;
        uint32_t t = h->h[i];
        h->h[i] = h->h[m];
        h->h[m] = t;
        i = m;
    }
    return top;
}

int mh__graph_merge_base(const mh_graph_t *g, uint32_t x, uint32_t y, uint32_t *out)
{
    *out = MH_GNONE;
    if (x >= g->n || y >= g->n) return MH_EINVAL;
    if (x == y) {
        *out = x;
        return 0;
    }
    /* flags[i]: which sides reach i; done[i]: the flags i was expanded
     * with. A node is pushed each time its flags grow: at most 2 pushes
     * (plus the initial ones), so the heap needs room for 2n + 2. */
    uint8_t *flags = calloc(g->n, 1), *done = calloc(g->n, 1);
    gheap_t h = {g, malloc((2 * (size_t)g->n + 2) * sizeof(uint32_t)), 0};
    if (!flags || !done || !h.h) {
        free(flags);
        free(done);
        free(h.h);
        return MH_ENOMEM;
    }
    flags[x] = F_X;
    flags[y] = F_Y;
    hpush(&h, x);
    hpush(&h, y);
    uint32_t best = MH_GNONE;
    while (h.n) {
        uint32_t v = hpop(&h);
        uint8_t f = flags[v];
        if (done[v] == f) continue; /* a stale duplicate */
        done[v] = f;
        /* Everything at a lower generation than a common ancestor found
         * is worse (ties come out of the heap smallest id first). */
        if (best != MH_GNONE && g->nodes[v].gen < g->nodes[best].gen) break;
        if (f == F_BOTH) {
            if (best == MH_GNONE) best = v;
            continue; /* its ancestors are common too, but lower */
        }
        for (int k = 0; k < 2; k++) {
            uint32_t p = g->nodes[v].p[k];
            if (p == MH_GNONE || p >= g->n || (flags[p] | f) == flags[p]) continue;
            flags[p] |= f;
            hpush(&h, p);
        }
    }
    free(flags);
    free(done);
    free(h.h);
    *out = best;
    return 0;
}
