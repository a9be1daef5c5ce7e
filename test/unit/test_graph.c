/*
 * test_graph.c — the commit-graph walk of fetch (SPEC 4.4) and the commit
 * log order (SPEC 4.5) on synthetic graphs: linear history, merges, a
 * have that is not an ancestor of the want, unknown parents, random
 * DAGs checked against a brute-force reachability oracle, and graphs
 * extended step by step (mh__graph_extend) against the graph built at once.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/hub/hub_internal.h"
#include "tap.h"

/* ------------------------------------------------------------ fixtures */

#define MAXN 512

static char ids[MAXN][MH_ID_SIZE], snaps[MAXN][MH_ID_SIZE];

static const char *cid(int i)
{
    if (!ids[i][0]) {
        char s[32];
        snprintf(s, sizeof s, "commit-%d", i);
        mh_id_t id;
        mh_blob_id(s, strlen(s), &id);
        memcpy(ids[i], id.s, MH_ID_SIZE);
        snprintf(s, sizeof s, "snap-%d", i);
        mh_blob_id(s, strlen(s), &id);
        memcpy(snaps[i], id.s, MH_ID_SIZE);
    }
    return ids[i];
}

typedef struct {
    int n;
    int p[MAXN][2]; /* -1 = none */
    uint32_t gen[MAXN];
    int idx[MAXN];  /* commit number -> graph node */
    mh_graph_t *g;
} dag_t;

static void dag_init(dag_t *d) { memset(d, 0, sizeof *d); }

/* Adds commit i with parents a, b (-1 = none); generations computed. */
static void dag_add(dag_t *d, int i, int a, int b)
{
    d->p[i][0] = a;
    d->p[i][1] = b;
    uint32_t g = 0;
    if (a >= 0 && d->gen[a] > g) g = d->gen[a];
    if (b >= 0 && d->gen[b] > g) g = d->gen[b];
    d->gen[i] = g + 1;
    if (i + 1 > d->n) d->n = i + 1;
}

/* Builds the graph, adding commits in a scrambled order so that node
 * indices differ from commit numbers. */
static mh_graph_t *dag_build(dag_t *d)
{
    mh_graph_t *g = mh__graph_new("repo", 7, 4); /* small: exercise growth */
    for (int k = 0; k < d->n; k++) {
        int i = (k * 7919) % d->n;
        if (d->n % 7919 == 0) i = k;
        cid(i);
        const char *a = d->p[i][0] >= 0 ? cid(d->p[i][0]) : NULL;
        const char *b = d->p[i][1] >= 0 ? cid(d->p[i][1]) : NULL;
        if (mh__graph_add(g, cid(i), a, b, snaps[i], d->gen[i])) return NULL;
    }
    mh__graph_seal(g);
    for (int i = 0; i < d->n; i++) d->idx[i] = (int)mh__graph_find(g, cid(i));
    d->g = g;
    return g;
}

/* Runs the walk; returns the sent set as a bitmap over commit numbers. */
static int walk(dag_t *d, const int *want, int nw, const int *have, int nh, char *sent, size_t *nsent)
{
    uint32_t w[MAXN], h[MAXN], out[MAXN];
    for (int i = 0; i < nw; i++) w[i] = (uint32_t)d->idx[want[i]];
    for (int i = 0; i < nh; i++) h[i] = (uint32_t)d->idx[have[i]];
    uint8_t *flags = calloc(d->g->n, 1);
    size_t n = 0;
    int rc = mh__graph_walk(d->g, w, (size_t)nw, h, (size_t)nh, flags, out, &n);
    memset(sent, 0, MAXN);
    for (size_t k = 0; k < n; k++)
        for (int i = 0; i < d->n; i++)
            if ((uint32_t)d->idx[i] == out[k]) sent[i]++;
    /* Newest first: generation never increases along the output. */
    for (size_t k = 1; k < n; k++)
        if (d->g->nodes[out[k]].gen > d->g->nodes[out[k - 1]].gen) rc = -999;
    free(flags);
    *nsent = n;
    return rc;
}

static void reach(dag_t *d, const int *from, int nf, char *mark)
{
    int stack[MAXN * 2], sp = 0;
    memset(mark, 0, MAXN);
    for (int i = 0; i < nf; i++) stack[sp++] = from[i];
    while (sp) {
        int x = stack[--sp];
        if (x < 0 || mark[x]) continue;
        mark[x] = 1;
        stack[sp++] = d->p[x][0];
        stack[sp++] = d->p[x][1];
    }
}

/* Checks the walk against the oracle reach(want) \ reach(have). */
static bool walk_ok(dag_t *d, const int *want, int nw, const int *have, int nh)
{
    char sent[MAXN], rw[MAXN], rh[MAXN];
    size_t n;
    if (walk(d, want, nw, have, nh, sent, &n)) return false;
    reach(d, want, nw, rw);
    reach(d, have, nh, rh);
    for (int i = 0; i < d->n; i++) {
        int expect = rw[i] && !rh[i];
        if (sent[i] != expect) {
            printf("# commit %d: sent %d, expected %d\n", i, sent[i], expect);
            return false;
        }
    }
    return true;
}

static bool sent_is(dag_t *d, const int *want, int nw, const int *have, int nh, const int *expect, int ne)
{
    char sent[MAXN];
    size_t n;
    if (walk(d, want, nw, have, nh, sent, &n)) return false;
    if ((int)n != ne) {
        printf("# sent %zu commits, expected %d\n", n, ne);
        return false;
    }
    for (int i = 0; i < ne; i++)
        if (sent[expect[i]] != 1) {
            printf("# commit %d not sent\n", expect[i]);
            return false;
        }
    return true;
}

/* ----------------------------------------------------------------- tests */

static void test_linear(void)
{
    dag_t d;
    dag_init(&d);
    for (int i = 0; i < 10; i++) dag_add(&d, i, i - 1, -1);
    TAP_OK(dag_build(&d) != NULL, "linear: built");
    TAP_EQ_INT(d.g->n, 10, "linear: 10 nodes");
    int w[] = {9}, h[] = {4}, h2[] = {9};
    int all[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, top[] = {5, 6, 7, 8, 9};
    TAP_OK(sent_is(&d, w, 1, NULL, 0, all, 10), "linear: full clone sends everything");
    TAP_OK(sent_is(&d, w, 1, h, 1, top, 5), "linear: have the middle sends the top half");
    TAP_OK(sent_is(&d, w, 1, h2, 1, NULL, 0), "linear: up to date sends nothing");
    int w2[] = {4}, h3[] = {9};
    TAP_OK(sent_is(&d, w2, 1, h3, 1, NULL, 0), "linear: want an ancestor of have sends nothing");

    /* The log: newest first, pages by cursor. */
    uint32_t out[16], n;
    bool more;
    TAP_EQ_INT(mh__graph_log(d.g, (uint32_t)d.idx[9], MH_GNONE, 3, out, &n, &more), 0, "log: first page");
    TAP_OK(n == 3 && out[0] == (uint32_t)d.idx[9] && out[1] == (uint32_t)d.idx[8] && out[2] == (uint32_t)d.idx[7] &&
               more,
           "log: 9 8 7, more");
    TAP_EQ_INT(mh__graph_log(d.g, (uint32_t)d.idx[9], (uint32_t)d.idx[7], 3, out, &n, &more), 0, "log: second page");
    TAP_OK(n == 3 && out[0] == (uint32_t)d.idx[6] && out[2] == (uint32_t)d.idx[4] && more, "log: 6 5 4, more");
    TAP_EQ_INT(mh__graph_log(d.g, (uint32_t)d.idx[9], (uint32_t)d.idx[2], 3, out, &n, &more), 0, "log: last page");
    TAP_OK(n == 2 && out[0] == (uint32_t)d.idx[1] && out[1] == (uint32_t)d.idx[0] && !more, "log: 1 0, no more");
    TAP_EQ_INT(mh__graph_log(d.g, (uint32_t)d.idx[9], (uint32_t)d.idx[0], 3, out, &n, &more), 0, "log: past the end");
    TAP_OK(n == 0 && !more, "log: empty page after the root");
    TAP_EQ_INT(mh__graph_log(d.g, (uint32_t)d.idx[4], (uint32_t)d.idx[7], 3, out, &n, &more), MH_ENOENT,
               "log: a cursor that is not an ancestor is refused");
    mh__graph_unref(d.g);
}

/*
 *   0 - 1 - 2 ----------- 5 - 6
 *        \               /
 *         3 - 4 --------
 *        \
 *         7 - 8            (another branch: x1, x2)
 */
static void test_merge(void)
{
    dag_t d;
    dag_init(&d);
    dag_add(&d, 0, -1, -1);
    dag_add(&d, 1, 0, -1);
    dag_add(&d, 2, 1, -1);
    dag_add(&d, 3, 1, -1);
    dag_add(&d, 4, 3, -1);
    dag_add(&d, 5, 2, 4);
    dag_add(&d, 6, 5, -1);
    dag_add(&d, 7, 1, -1);
    dag_add(&d, 8, 7, -1);
    TAP_OK(dag_build(&d) != NULL, "merge: built");
    TAP_EQ_INT(d.gen[5], 5, "merge: generation of the merge is 1 + max(parents)");
    int w[] = {6};
    int h2[] = {2}, e2[] = {6, 5, 4, 3};
    TAP_OK(sent_is(&d, w, 1, h2, 1, e2, 4), "merge: have the first-parent side sends the merged branch");
    int h4[] = {4}, e4[] = {6, 5, 2};
    TAP_OK(sent_is(&d, w, 1, h4, 1, e4, 3), "merge: have the second-parent side sends the first-parent commit");
    int h24[] = {2, 4}, e24[] = {6, 5};
    TAP_OK(sent_is(&d, w, 1, h24, 2, e24, 2), "merge: have both sides sends merge and child");
    int h8[] = {8}, e8[] = {6, 5, 4, 3, 2};
    TAP_OK(sent_is(&d, w, 1, h8, 1, e8, 5), "merge: a have that is not an ancestor cuts at the common base");
    int w2[] = {8, 2}, h3[] = {3}, e3[] = {8, 7, 2};
    TAP_OK(sent_is(&d, w2, 2, h3, 1, e3, 3), "merge: two wants, have on a third line");
    TAP_OK(walk_ok(&d, w2, 2, h3, 1), "merge: matches the oracle");

    /* Flags: the have side is marked, down to the common base. */
    uint32_t ww[1] = {(uint32_t)d.idx[6]}, hh[1] = {(uint32_t)d.idx[8]}, out[16];
    uint8_t flags[16] = {0};
    size_t n;
    mh__graph_walk(d.g, ww, 1, hh, 1, flags, out, &n);
    TAP_OK((flags[d.idx[8]] & MH_GW_HAVE) && (flags[d.idx[7]] & MH_GW_HAVE) && (flags[d.idx[1]] & MH_GW_HAVE) &&
               !(flags[d.idx[2]] & MH_GW_HAVE),
           "merge: have-side commits carry HAVE");

    /* Log across a merge: generation desc, ties by id desc. */
    uint32_t lo[16], ln;
    bool more;
    mh__graph_log(d.g, (uint32_t)d.idx[6], MH_GNONE, 16, lo, &ln, &more);
    TAP_EQ_INT(ln, 7, "log: merge history has 7 commits");
    bool sorted = true;
    for (uint32_t i = 1; i < ln; i++) {
        const mh_gnode_t *a = &d.g->nodes[lo[i - 1]], *b = &d.g->nodes[lo[i]];
        if (a->gen < b->gen || (a->gen == b->gen && memcmp(a->id, b->id, 32) < 0)) sorted = false;
    }
    TAP_OK(sorted && lo[0] == (uint32_t)d.idx[6] && lo[6] == (uint32_t)d.idx[0], "log: ordered newest first");
    mh__graph_unref(d.g);
}

static void test_unknown_parent(void)
{
    /* A parent outside the repository's refs is not walked. */
    mh_graph_t *g = mh__graph_new("r", 1, 0);
    cid(100);
    cid(101);
    cid(102);
    TAP_EQ_INT(mh__graph_add(g, cid(101), cid(100), NULL, snaps[101], 2), 0, "orphan: add with foreign parent");
    TAP_EQ_INT(mh__graph_add(g, cid(102), cid(101), NULL, snaps[102], 3), 0, "orphan: add child");
    TAP_EQ_INT(mh__graph_add(g, cid(102), cid(101), NULL, snaps[102], 3), 0, "orphan: duplicate ignored");
    TAP_EQ_INT(mh__graph_add(g, "sha256:xyz", NULL, NULL, snaps[102], 3), MH_EPARSE, "orphan: bad id refused");
    TAP_EQ_INT(mh__graph_add_branch(g, "main", cid(102)), 0, "branch main");
    TAP_EQ_INT(mh__graph_add_branch(g, "dev", cid(100)), 0, "branch dev (head outside)");
    mh__graph_seal(g);
    TAP_EQ_INT(g->n, 2, "orphan: two nodes");
    uint32_t i101 = mh__graph_find(g, cid(101));
    TAP_OK(i101 != MH_GNONE && g->nodes[i101].p[0] == MH_GNONE, "orphan: foreign parent resolves to none");
    TAP_EQ_INT(mh__graph_find(g, cid(100)), MH_GNONE, "orphan: foreign commit not found");
    TAP_EQ_STR(g->branches[0].name, "dev", "branches sorted by name");
    const mh_gbranch_t *b = mh__graph_branch(g, "main", 4);
    TAP_OK(b && b->node == mh__graph_find(g, cid(102)), "branch lookup resolves the head");
    TAP_OK(mh__graph_branch(g, "mai", 3) == NULL && mh__graph_branch(g, "mainx", 5) == NULL, "branch lookup is exact");
    TAP_OK(g->branches[0].node == MH_GNONE, "a head outside the graph has no node");
    uint32_t w[1] = {mh__graph_find(g, cid(102))}, out[4];
    uint8_t flags[4] = {0};
    size_t n;
    mh__graph_walk(g, w, 1, NULL, 0, flags, out, &n);
    TAP_EQ_INT(n, 2, "orphan: walk stops at the repository's edge");
    mh_id_t s;
    mh__graph_snap_id(g, i101, &s);
    TAP_EQ_STR(s.s, snaps[101], "snapshot id round-trips");
    mh__graph_unref(g);
}

static unsigned rnd_state = 12345;
static unsigned rnd(void)
{
    rnd_state = rnd_state * 1103515245u + 12345u;
    return (rnd_state >> 16) & 0x7fff;
}

static void test_random(void)
{
    int bad = 0, runs = 0;
    for (int t = 0; t < 40; t++) {
        dag_t d;
        dag_init(&d);
        int n = 50 + (int)(rnd() % 250);
        for (int i = 0; i < n; i++) {
            int a = i ? (int)(rnd() % (unsigned)i) : -1;
            /* Mostly chains (parent = previous), sometimes far jumps and merges. */
            if (i && rnd() % 4) a = i - 1;
            int b = (i > 1 && rnd() % 6 == 0) ? (int)(rnd() % (unsigned)i) : -1;
            if (b == a) b = -1;
            if (i && rnd() % 25 == 0) a = -1; /* extra roots */
            dag_add(&d, i, a, b);
        }
        if (!dag_build(&d)) {
            bad++;
            continue;
        }
        for (int q = 0; q < 20; q++) {
            int w[3], h[4];
            int nw = 1 + (int)(rnd() % 3), nh = (int)(rnd() % 5);
            for (int i = 0; i < nw; i++) w[i] = (int)(rnd() % (unsigned)n);
            for (int i = 0; i < nh; i++) h[i] = (int)(rnd() % (unsigned)n);
            runs++;
            if (!walk_ok(&d, w, nw, h, nh)) bad++;
        }
        mh__graph_unref(d.g);
    }
    TAP_OK(bad == 0, "random DAGs: %d walks match the oracle (%d bad)", runs, bad);
}


/* ---------------------------------------------- the fetch walk (depth) */

/* mh__graph_walk_ex against its definition: the client's side is every
 * ancestor of a have reached without passing through a want that is not
 * a have; the sent commits are those reachable from the wants (not
 * haves) through commits outside the client's side, fewer than `depth`
 * links away (0: no limit). Also checks the shallow rule: a sent commit's
 * parent that is neither sent nor the client's was cut by the depth. */
static bool walk_ex_ok(dag_t *d, const int *want, int nw, const int *have, int nh, uint64_t depth)
{
    char xwant[MAXN] = {0}, hside[MAXN] = {0}, expect[MAXN] = {0};
    int dist[MAXN], stack[MAXN * 2], sp = 0;
    for (int i = 0; i < nh; i++) stack[sp++] = have[i];
    for (int i = 0; i < nw; i++) xwant[want[i]] = 1;
    for (int i = 0; i < nh; i++) xwant[have[i]] = 0;
    while (sp) {
        int x = stack[--sp];
        if (x < 0 || hside[x]) continue;
        hside[x] = 1;
        for (int j = 0; j < 2; j++)
            if (d->p[x][j] >= 0 && !xwant[d->p[x][j]]) stack[sp++] = d->p[x][j];
    }
    /* BFS by links from the wants (a queue over commit numbers). */
    int queue[MAXN], qh = 0, qt = 0;
    for (int i = 0; i < d->n; i++) dist[i] = -1;
    for (int i = 0; i < nw; i++)
        if (!hside[want[i]] && dist[want[i]] < 0) dist[want[i]] = 0, queue[qt++] = want[i];
    while (qh < qt) {
        int x = queue[qh++];
        expect[x] = 1;
        if (depth && (uint64_t)dist[x] + 1 >= depth) continue;
        for (int j = 0; j < 2; j++) {
            int p = d->p[x][j];
            if (p >= 0 && !hside[p] && dist[p] < 0) dist[p] = dist[x] + 1, queue[qt++] = p;
        }
    }
    uint32_t w[MAXN], h[MAXN], out[MAXN];
    for (int i = 0; i < nw; i++) w[i] = (uint32_t)d->idx[want[i]];
    for (int i = 0; i < nh; i++) h[i] = (uint32_t)d->idx[have[i]];
    uint8_t *flags = calloc(d->g->n, 1);
    size_t n = 0;
    bool ok = mh__graph_walk_ex(d->g, w, (size_t)nw, h, (size_t)nh, depth, flags, out, &n) == 0;
    char sent[MAXN] = {0};
    for (size_t k = 0; k < n; k++)
        for (int i = 0; i < d->n; i++)
            if ((uint32_t)d->idx[i] == out[k]) sent[i]++;
    for (int i = 0; i < d->n && ok; i++)
        if (sent[i] != expect[i]) {
            printf("# walk_ex: commit %d sent %d, expected %d (depth %llu)\n", i, sent[i], expect[i],
                   (unsigned long long)depth);
            ok = false;
        }
    /* A sent commit's parent the walk marks neither sent nor HAVE is one
     * the depth cut (or, for the walk that stops early, one the client
     * may have: never one the client lacks that should have been sent). */
    for (int i = 0; i < d->n && ok; i++)
        for (int j = 0; sent[i] && j < 2; j++) {
            int p = d->p[i][j];
            if (p >= 0 && !sent[p] && !(flags[d->idx[p]] & MH_GW_HAVE) && !hside[p] &&
                !(depth && (uint64_t)dist[i] + 1 >= depth)) {
                printf("# walk_ex: commit %d's parent %d left out without depth\n", i, p);
                ok = false;
            }
        }
    free(flags);
    return ok;
}

static void test_walk_ex(void)
{
    /* A line 0 <- 1 <- ... <- 9. */
    dag_t d;
    dag_init(&d);
    for (int i = 0; i < 10; i++) dag_add(&d, i, i - 1, -1);
    TAP_OK(dag_build(&d) != NULL, "walk_ex: line built");
    int w9[] = {9}, h5[] = {5}, w4[] = {4}, h3[] = {3};
    TAP_OK(walk_ex_ok(&d, w9, 1, NULL, 0, 1), "walk_ex: depth 1 sends the want alone");
    TAP_OK(walk_ex_ok(&d, w9, 1, NULL, 0, 3), "walk_ex: depth 3 sends three commits");
    TAP_OK(walk_ex_ok(&d, w9, 1, NULL, 0, 100), "walk_ex: a depth past the root sends everything");
    TAP_OK(walk_ex_ok(&d, w9, 1, h5, 1, 0), "walk_ex: incremental: only what is new");
    TAP_OK(walk_ex_ok(&d, w4, 1, h5, 1, 0), "walk_ex: a want below a have (deepening) sends it and its history");
    TAP_OK(walk_ex_ok(&d, w4, 1, h5, 1, 2), "walk_ex: deepening by two");
    TAP_OK(walk_ex_ok(&d, w4, 1, h3, 1, 0), "walk_ex: a want above a have");
    uint32_t ww = (uint32_t)d.idx[9], hh = (uint32_t)d.idx[9], out[16];
    uint8_t flags[16] = {0};
    size_t n = 99;
    mh__graph_walk_ex(d.g, &ww, 1, &hh, 1, 0, flags, out, &n);
    TAP_EQ_INT(n, 0, "walk_ex: a want that is also a have sends nothing");
    mh__graph_unref(d.g);

    int bad = 0, runs = 0;
    for (int t = 0; t < 30; t++) {
        dag_init(&d);
        int nn = 40 + (int)(rnd() % 200);
        for (int i = 0; i < nn; i++) {
            int a = i ? (int)(rnd() % (unsigned)i) : -1;
            if (i && rnd() % 4) a = i - 1;
            int b = (i > 1 && rnd() % 5 == 0) ? (int)(rnd() % (unsigned)i) : -1;
            if (b == a) b = -1;
            if (i && rnd() % 30 == 0) a = -1;
            dag_add(&d, i, a, b);
        }
        if (!dag_build(&d)) {
            bad++;
            continue;
        }
        for (int q = 0; q < 30; q++) {
            int w[3], h[4];
            int nw = 1 + (int)(rnd() % 3), nh = (int)(rnd() % 5);
            for (int i = 0; i < nw; i++) w[i] = (int)(rnd() % (unsigned)nn);
            for (int i = 0; i < nh; i++) h[i] = (int)(rnd() % (unsigned)nn);
            uint64_t depth = rnd() % 3 ? 1 + rnd() % 12 : 0;
            runs++;
            if (!walk_ex_ok(&d, w, nw, h, nh, depth)) bad++;
        }
        mh__graph_unref(d.g);
    }
    TAP_OK(bad == 0, "walk_ex: random DAGs: %d walks match the definition (%d bad)", runs, bad);
}

/* ------------------------------------------------------------ extension */

/* Same commits, snapshots, generations, parent edges (by id) and branches,
 * whatever the node order. */
static bool same_graph(const mh_graph_t *a, const mh_graph_t *b)
{
    if (a->n != b->n || a->nbranches != b->nbranches) {
        printf("# n %u/%u, branches %u/%u\n", a->n, b->n, a->nbranches, b->nbranches);
        return false;
    }
    for (uint32_t k = 0; k < a->n; k++) {
        mh_id_t id;
        mh__graph_id(a, k, &id);
        uint32_t x = mh__graph_find(b, id.s);
        if (x == MH_GNONE) return false;
        const mh_gnode_t *na = &a->nodes[k], *nb = &b->nodes[x];
        if (memcmp(na->snap, nb->snap, 32) || na->gen != nb->gen) return false;
        for (int j = 0; j < 2; j++) {
            if ((na->p[j] == MH_GNONE) != (nb->p[j] == MH_GNONE)) {
                printf("# %s parent %d: %u vs %u\n", id.s, j, na->p[j], nb->p[j]);
                return false;
            }
            if (na->p[j] != MH_GNONE && memcmp(a->nodes[na->p[j]].id, b->nodes[nb->p[j]].id, 32)) return false;
        }
    }
    for (uint32_t i = 0; i < a->nbranches; i++)
        if (strcmp(a->branches[i].name, b->branches[i].name) || strcmp(a->branches[i].head.s, b->branches[i].head.s) ||
            (a->branches[i].node == MH_GNONE) != (b->branches[i].node == MH_GNONE))
            return false;
    return true;
}

static int add_commit(mh_graph_t *g, dag_t *d, int i)
{
    const char *a = d->p[i][0] >= 0 ? cid(d->p[i][0]) : NULL;
    const char *b = d->p[i][1] >= 0 ? cid(d->p[i][1]) : NULL;
    return mh__graph_add(g, cid(i), a, b, snaps[i], d->gen[i]);
}

static void test_extend_late_parent(void)
{
    /* 0 <- 1 <- 2 (merge of 1 and 3) ; 3's ref row arrives one step after 2's. */
    dag_t d;
    dag_init(&d);
    dag_add(&d, 0, -1, -1);
    dag_add(&d, 1, 0, -1);
    dag_add(&d, 3, 0, -1);
    dag_add(&d, 2, 1, 3);
    mh_graph_t *g1 = mh__graph_new("r", 1, 0);
    add_commit(g1, &d, 0);
    add_commit(g1, &d, 1);
    add_commit(g1, &d, 2);
    mh__graph_add_branch(g1, "main", cid(2));
    TAP_EQ_INT(mh__graph_seal(g1), 0, "late parent: first step sealed");
    g1->ref_seq = 42;
    uint32_t i2 = mh__graph_find(g1, cid(2));
    TAP_OK(g1->nodes[i2].p[1] == MH_GNONE && g1->npend == 1, "late parent: the missing parent is pending");
    uint32_t w[1] = {i2}, out[8];
    uint8_t flags[8] = {0};
    size_t n;
    TAP_EQ_INT(mh__graph_walk(g1, w, 1, NULL, 0, flags, out, &n), 0, "late parent: walk with a missing parent");
    TAP_EQ_INT(n, 3, "late parent: it sends what it has");

    mh_graph_t *g2 = mh__graph_extend(g1, 2, 1);
    TAP_OK(g2 && g2->ref_seq == 42 && g2->n == 3 && g2->nbranches == 0, "extend: copy of the base, no branches");
    TAP_EQ_INT(add_commit(g2, &d, 3), 0, "extend: add the parent");
    TAP_EQ_INT(add_commit(g2, &d, 1), 0, "extend: a commit already there is ignored");
    mh__graph_add_branch(g2, "main", cid(2));
    mh__graph_add_branch(g2, "side", cid(3));
    TAP_EQ_INT(mh__graph_seal(g2), 0, "extend: sealed");
    TAP_OK(g2->n == 4 && g2->state_seq == 2 && g2->npend == 0, "extend: 4 nodes, nothing pending");
    i2 = mh__graph_find(g2, cid(2));
    TAP_OK(g2->nodes[i2].p[1] == mh__graph_find(g2, cid(3)), "extend: the late parent is linked");
    TAP_OK(g1->n == 3 && g1->npend == 1 && g1->nodes[mh__graph_find(g1, cid(2))].p[1] == MH_GNONE &&
               g1->nbranches == 1,
           "extend: the base is unchanged");
    memset(flags, 0, sizeof flags);
    w[0] = i2;
    mh__graph_walk(g2, w, 1, NULL, 0, flags, out, &n);
    TAP_EQ_INT(n, 4, "extend: the walk now reaches the late parent");
    dag_build(&d);
    mh__graph_add_branch(d.g, "main", cid(2)); /* after sealing: compare names/heads only */
    mh__graph_add_branch(d.g, "side", cid(3));
    d.g->branches[0].node = mh__graph_find(d.g, cid(2));
    d.g->branches[1].node = mh__graph_find(d.g, cid(3));
    TAP_OK(same_graph(g2, d.g), "extend: equals the graph built at once");
    mh__graph_unref(d.g);
    mh__graph_unref(g1);

    /* Extending an empty graph, with nothing new: an empty copy. */
    mh_graph_t *e = mh__graph_new("r", 1, 0);
    mh__graph_seal(e);
    mh_graph_t *e2 = mh__graph_extend(e, 2, 0);
    TAP_OK(e2 && mh__graph_seal(e2) == 0 && e2->n == 0, "extend: empty base, nothing new");
    mh_graph_t *e3 = mh__graph_extend(e2, 3, 2);
    add_commit(e3, &d, 0);
    add_commit(e3, &d, 1);
    TAP_OK(mh__graph_seal(e3) == 0 && e3->n == 2 && e3->nodes[mh__graph_find(e3, cid(1))].p[0] == mh__graph_find(e3, cid(0)),
           "extend: an empty base grows");
    mh__graph_unref(e);
    mh__graph_unref(e2);
    mh__graph_unref(e3);
    mh__graph_unref(g2);
}

static void test_extend_random(void)
{
    int bad = 0, runs = 0, graphs = 0;
    for (int t = 0; t < 40; t++) {
        dag_t d;
        dag_init(&d);
        int n = 20 + (int)(rnd() % 300);
        for (int i = 0; i < n; i++) {
            int a = i ? (int)(rnd() % (unsigned)i) : -1;
            if (i && rnd() % 4) a = i - 1;
            int b = (i > 1 && rnd() % 6 == 0) ? (int)(rnd() % (unsigned)i) : -1;
            if (b == a) b = -1;
            dag_add(&d, i, a, b);
        }
        /* Arrival order: parents first, as pushes deliver them, except
         * every few runs a shuffled one (children before their parents,
         * across steps). */
        int order[MAXN];
        for (int i = 0; i < n; i++) order[i] = i;
        if (t % 3 == 2)
            for (int i = n - 1; i > 0; i--) {
                int j = (int)(rnd() % (unsigned)(i + 1)), x = order[i];
                order[i] = order[j];
                order[j] = x;
            }
        mh_graph_t *g = mh__graph_new("r", 0, 4);
        mh__graph_seal(g);
        int steps = 1 + (int)(rnd() % 6), done = 0;
        for (int s = 1; s <= steps; s++) {
            int upto = s == steps ? n : done + (int)(rnd() % (unsigned)(n - done + 1));
            mh_graph_t *x = mh__graph_extend(g, s, (uint32_t)(upto - done));
            if (!x) {
                bad++;
                break;
            }
            for (; done < upto; done++)
                if (add_commit(x, &d, order[done])) bad++;
            char name[16];
            for (int b = 0; b < s; b++) {
                snprintf(name, sizeof name, "b%d", b);
                mh__graph_add_branch(x, name, cid(order[(upto ? upto - 1 : 0) * b / s]));
            }
            if (mh__graph_seal(x)) bad++;
            mh__graph_unref(g);
            g = x;
        }
        mh_graph_t *inc = g;
        dag_build(&d);
        mh_graph_t *all = d.g;
        /* The branches of the last step, on the graph built at once. */
        for (uint32_t b = 0; b < inc->nbranches; b++) mh__graph_add_branch(all, inc->branches[b].name, inc->branches[b].head.s);
        for (uint32_t b = 0; b < all->nbranches; b++) all->branches[b].node = mh__graph_find(all, all->branches[b].head.s);
        graphs++;
        if (!same_graph(inc, all) || inc->npend != 0) bad++;
        /* And the walks on the extended graph match the oracle. */
        for (int i = 0; i < d.n; i++) d.idx[i] = (int)mh__graph_find(inc, cid(i));
        d.g = inc;
        for (int q = 0; q < 10; q++) {
            int w[2] = {(int)(rnd() % (unsigned)n), (int)(rnd() % (unsigned)n)}, h[1] = {(int)(rnd() % (unsigned)n)};
            runs++;
            if (!walk_ok(&d, w, 2, h, 1)) bad++;
        }
        mh__graph_unref(all);
        mh__graph_unref(inc);
    }
    TAP_OK(bad == 0, "extend: %d graphs built in 1-6 steps equal the graph built at once; %d walks match (%d bad)",
           graphs, runs, bad);
}

static void test_ids(void)
{
    mh_graph_t *g = mh__graph_new("r", 1, 0);
    char up[MH_ID_SIZE], bad[MH_ID_SIZE], longer[MH_ID_SIZE + 1];
    memcpy(up, cid(0), MH_ID_SIZE);
    for (int i = 7; i < MH_ID_LEN; i++)
        if (up[i] >= 'a') up[i] = (char)(up[i] - 'a' + 'A');
    memcpy(bad, cid(0), MH_ID_SIZE);
    bad[40] = 'g';
    memcpy(longer, cid(0), MH_ID_LEN);
    longer[MH_ID_LEN] = '0';
    longer[MH_ID_LEN + 1] = 0;
    TAP_EQ_INT(mh__graph_add(g, up, NULL, NULL, snaps[0], 1), MH_EPARSE, "ids: uppercase hex refused");
    TAP_EQ_INT(mh__graph_add(g, bad, NULL, NULL, snaps[0], 1), MH_EPARSE, "ids: a non-hex digit refused");
    TAP_EQ_INT(mh__graph_add(g, longer, NULL, NULL, snaps[0], 1), MH_EPARSE, "ids: too long refused");
    TAP_EQ_INT(mh__graph_add(g, cid(0) + 1, NULL, NULL, snaps[0], 1), MH_EPARSE, "ids: no prefix refused");
    TAP_EQ_INT(mh__graph_add(g, cid(1), bad, NULL, snaps[1], 2), MH_EPARSE, "ids: a bad parent refused");
    TAP_EQ_INT(mh__graph_add(g, cid(0), NULL, NULL, snaps[0], 1), 0, "ids: a good id accepted");
    mh__graph_seal(g);
    mh_id_t id;
    mh__graph_id(g, 0, &id);
    TAP_EQ_STR(id.s, cid(0), "ids: the id round-trips");
    TAP_EQ_INT(g->n, 1, "ids: only the good one added");
    mh__graph_unref(g);
}

static void test_big_linear(void)
{
    /* Walk cost depends on what is sent: a one-commit delta on a long
     * chain pops a handful of nodes. */
    enum { N = 200000 };
    mh_graph_t *g = mh__graph_new("big", 1, 0);
    char prev[MH_ID_SIZE] = "", cur[MH_ID_SIZE];
    for (int i = 0; i < N; i++) {
        char s[32];
        snprintf(s, sizeof s, "c%d", i);
        mh_id_t id;
        mh_blob_id(s, strlen(s), &id);
        memcpy(cur, id.s, MH_ID_SIZE);
        mh__graph_add(g, cur, prev[0] ? prev : NULL, NULL, cur, (uint32_t)i + 1);
        memcpy(prev, cur, MH_ID_SIZE);
    }
    uint64_t tb = mh_now_us();
    mh__graph_seal(g);
    /* One more commit the incremental way: a copy plus one row. */
    uint64_t te0 = mh_now_us();
    mh_graph_t *g2 = mh__graph_extend(g, 2, 1);
    mh_id_t nid;
    mh_blob_id("one more", 8, &nid);
    mh__graph_add(g2, nid.s, prev, NULL, nid.s, N + 1);
    mh__graph_seal(g2);
    uint64_t te1 = mh_now_us();
    TAP_OK(g2->n == N + 1 && g2->nodes[mh__graph_find(g2, nid.s)].p[0] == mh__graph_find(g2, prev),
           "big: extended by one commit");
    TAP_COMMENT("200k-commit chain: seal %llu us, extension by one commit %llu us", (unsigned long long)(te0 - tb),
                (unsigned long long)(te1 - te0));
    mh__graph_unref(g2);
    uint32_t head = g->n - 1, have = g->n - 2, *out = malloc(N * sizeof *out);
    uint8_t *flags = calloc(N, 1);
    size_t n;
    uint64_t t0 = mh_now_us();
    mh__graph_walk(g, &head, 1, &have, 1, flags, out, &n);
    uint64_t t1 = mh_now_us();
    TAP_EQ_INT(n, 1, "big: one commit ahead sends one");
    memset(flags, 0, N);
    mh__graph_walk(g, &head, 1, NULL, 0, flags, out, &n);
    uint64_t t2 = mh_now_us();
    TAP_EQ_INT(n, N, "big: a full clone sends all");
    TAP_COMMENT("200k-commit chain: delta walk %llu us, full walk %llu us", (unsigned long long)(t1 - t0),
                (unsigned long long)(t2 - t1));
    free(out);
    free(flags);
    mh__graph_unref(g);
}

int main(void)
{
    test_linear();
    test_merge();
    test_unknown_parent();
    test_random();
    test_walk_ex();
    test_extend_late_parent();
    test_extend_random();
    test_ids();
    test_big_linear();
    return tap_done();
}
