/*
 * test_merge.c — the pure parts of SPEC 4.6's merge (src/hub/merge.c):
 *  - the three-way merge of manifests: every (base, ours, theirs)
 *    combination of one path, named cases, and random manifests checked
 *    path by path against a direct oracle (including paths whose order
 *    depends on the proper-prefix rule: "a" < "a.b" < "a/b" < "ab");
 *  - the change summary (added / changed / removed) against an oracle;
 *  - the merge base on synthetic commit graphs: linear, diverged,
 *    criss-cross (two best bases of one generation: the smaller id),
 *    unrelated histories, a node against its own ancestor, and random
 *    DAGs against a brute-force "common ancestor of highest generation,
 *    then smallest id" oracle.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/hub/merge.h"
#include "tap.h"

/* ------------------------------------------------------------ fixtures */

#define NPATHS 12
static const char *const PATHS[NPATHS] = {"a", "a.b", "a/b", "a/b/c", "ab", "b", "dir/x", "dir/y", "z", "z/z",
                                          "\xc3\xa9t\xc3\xa9", "~"};
#define NIDS 3
static mh_id_t IDS[NIDS];

static void init_ids(void)
{
    for (int i = 0; i < NIDS; i++) {
        char s[32];
        snprintf(s, sizeof s, "content-%d", i);
        mh_blob_id(s, strlen(s), &IDS[i]);
    }
}

/* A manifest from a per-path choice: -1 absent, else an index into IDS. */
static void build(mh_manifest_t *m, const int *pick)
{
    mh_manifest_free(m);
    for (int i = 0; i < NPATHS; i++)
        if (pick[i] >= 0) mh_manifest_upsert(m, PATHS[i], (uint32_t)strlen(PATHS[i]), IDS[pick[i]].s);
}

static const char *find(const mh_manifest_t *m, const char *path)
{
    const mh_mentry_t *e = mh_manifest_find(m, path, strlen(path));
    return e ? e->id : NULL;
}

static bool same(const char *a, const char *b)
{
    if (!a || !b) return a == b;
    return memcmp(a, b, MH_ID_LEN) == 0;
}

/* The oracle of SPEC 4.6, one path at a time. Returns false on conflict;
 * *r the merged id (NULL: absent). */
static bool oracle(int b, int o, int t, int *r)
{
    if (o == t) *r = o;
    else if (b == o) *r = t;
    else if (b == t) *r = o;
    else return false;
    return true;
}

static bool sorted_ok(const mh_manifest_t *m)
{
    for (size_t i = 1; i < m->n; i++) {
        const mh_mentry_t *a = &m->e[i - 1], *b = &m->e[i];
        size_t n = a->plen < b->plen ? a->plen : b->plen;
        int c = memcmp(a->path, b->path, n);
        if (c > 0 || (c == 0 && a->plen >= b->plen)) return false;
    }
    return true;
}

/* Runs one merge and compares it with the oracle; returns true when equal. */
static bool check_merge(const int *pb, const int *po, const int *pt, char *why, size_t whyn)
{
    mh_manifest_t b = {0}, o = {0}, t = {0}, out = {0};
    build(&b, pb);
    build(&o, po);
    build(&t, pt);
    mh_mpath_t *conf = NULL;
    size_t nconf = 0;
    bool ok = mh__merge_manifests(&b, &o, &t, &out, &conf, &nconf) == 0;
    /* expected conflicts, in path order (PATHS is not sorted: sort by
     * walking the merged union in manifest order) */
    int want_conf = 0, want_n = 0;
    int res[NPATHS];
    for (int i = 0; i < NPATHS; i++) {
        if (!oracle(pb[i], po[i], pt[i], &res[i])) {
            want_conf++;
            res[i] = -2;
        } else if (res[i] >= 0) {
            want_n++;
        }
    }
    if (ok && (int)nconf != want_conf) {
        snprintf(why, whyn, "%zu conflicts, want %d", nconf, want_conf);
        ok = false;
    }
    if (ok && want_conf) {
        if (out.n != 0) {
            snprintf(why, whyn, "conflicting merge left %zu entries", out.n);
            ok = false;
        }
        for (size_t k = 0; ok && k < nconf; k++) {
            int idx = -1;
            for (int i = 0; i < NPATHS; i++)
                if (strlen(PATHS[i]) == conf[k].plen && !memcmp(PATHS[i], conf[k].path, conf[k].plen)) idx = i;
            if (idx < 0 || res[idx] != -2) {
                snprintf(why, whyn, "reported conflict %.*s is not one", (int)conf[k].plen, conf[k].path);
                ok = false;
            }
            if (ok && k > 0) {
                size_t n = conf[k - 1].plen < conf[k].plen ? conf[k - 1].plen : conf[k].plen;
                int c = memcmp(conf[k - 1].path, conf[k].path, n);
                if (c > 0 || (c == 0 && conf[k - 1].plen >= conf[k].plen)) {
                    snprintf(why, whyn, "conflicts out of path order");
                    ok = false;
                }
            }
        }
    }
    if (ok && !want_conf) {
        if ((int)out.n != want_n || !sorted_ok(&out)) {
            snprintf(why, whyn, "merged %zu entries (sorted %d), want %d", out.n, sorted_ok(&out), want_n);
            ok = false;
        }
        for (int i = 0; ok && i < NPATHS; i++) {
            const char *got = find(&out, PATHS[i]);
            const char *want = res[i] >= 0 ? IDS[res[i]].s : NULL;
            if (!same(got, want)) {
                snprintf(why, whyn, "path %s: wrong result", PATHS[i]);
                ok = false;
            }
        }
    }
    free(conf);
    mh_manifest_free(&b);
    mh_manifest_free(&o);
    mh_manifest_free(&t);
    mh_manifest_free(&out);
    return ok;
}

/* ------------------------------------------------------- three-way merge */

static void test_one_path_all_combinations(void)
{
    /* Every (b, o, t) in {absent, X, Y, Z}^3 on one path, with the other
     * paths present and unchanged. */
    int bad = 0;
    char why[160] = "";
    for (int b = -1; b < NIDS; b++)
        for (int o = -1; o < NIDS; o++)
            for (int t = -1; t < NIDS; t++) {
                int pb[NPATHS], po[NPATHS], pt[NPATHS];
                for (int i = 0; i < NPATHS; i++) pb[i] = po[i] = pt[i] = i % NIDS;
                pb[3] = b;
                po[3] = o;
                pt[3] = t;
                if (!check_merge(pb, po, pt, why, sizeof why)) {
                    if (!bad) TAP_COMMENT("b=%d o=%d t=%d: %s", b, o, t, why);
                    bad++;
                }
            }
    TAP_OK(bad == 0, "three-way merge: all 64 (base, ours, theirs) states of one path");
}

static void test_named_cases(void)
{
    mh_manifest_t b = {0}, o = {0}, t = {0}, out = {0};
    mh_mpath_t *conf = NULL;
    size_t nconf = 9;
    const char *X = IDS[0].s, *Y = IDS[1].s, *Z = IDS[2].s;
    /* changed on one side takes that side; on both identically, that value */
    mh_manifest_upsert(&b, "keep", 4, X);
    mh_manifest_upsert(&b, "ours", 4, X);
    mh_manifest_upsert(&b, "theirs", 6, X);
    mh_manifest_upsert(&b, "both", 4, X);
    mh_manifest_upsert(&b, "gone", 4, X);
    mh_manifest_clone(&o, &b);
    mh_manifest_clone(&t, &b);
    mh_manifest_upsert(&o, "ours", 4, Y);
    mh_manifest_upsert(&t, "theirs", 6, Z);
    mh_manifest_upsert(&o, "both", 4, Z);
    mh_manifest_upsert(&t, "both", 4, Z);
    mh_manifest_remove(&t, "gone", 4);
    mh_manifest_upsert(&o, "new/o", 5, Y);
    mh_manifest_upsert(&t, "new/t", 5, Z);
    TAP_EQ_INT(mh__merge_manifests(&b, &o, &t, &out, &conf, &nconf), 0, "clean merge returns 0");
    TAP_EQ_INT(nconf, 0, "clean merge: no conflicts");
    TAP_OK(conf == NULL, "clean merge: no conflict array");
    TAP_EQ_INT(out.n, 6, "clean merge: 6 entries (gone removed, two added)");
    TAP_OK(same(find(&out, "keep"), X) && same(find(&out, "ours"), Y) && same(find(&out, "theirs"), Z) &&
               same(find(&out, "both"), Z) && !find(&out, "gone") && same(find(&out, "new/o"), Y) &&
               same(find(&out, "new/t"), Z),
           "clean merge: each path takes the side that changed it");
    mh_id_t mid, want;
    mh_manifest_id(&out, &mid);
    mh_manifest_t ref = {0};
    mh_manifest_clone(&ref, &b);
    mh_manifest_upsert(&ref, "ours", 4, Y);
    mh_manifest_upsert(&ref, "theirs", 6, Z);
    mh_manifest_upsert(&ref, "both", 4, Z);
    mh_manifest_remove(&ref, "gone", 4);
    mh_manifest_upsert(&ref, "new/o", 5, Y);
    mh_manifest_upsert(&ref, "new/t", 5, Z);
    mh_manifest_id_nocache(&ref, &want);
    TAP_EQ_STR(mid.s, want.s, "merged manifest hashes to the expected snapshot id");

    /* conflicts: modify/modify, modify/delete, add/add */
    mh_manifest_upsert(&o, "keep", 4, Y);
    mh_manifest_upsert(&t, "keep", 4, Z);
    mh_manifest_upsert(&o, "gone", 4, Y); /* theirs deleted it */
    mh_manifest_upsert(&o, "new/t", 5, Y); /* both added, differently */
    TAP_EQ_INT(mh__merge_manifests(&b, &o, &t, &out, &conf, &nconf), 0, "conflicting merge returns 0");
    TAP_EQ_INT(nconf, 3, "three conflicts");
    TAP_OK(nconf == 3 && conf[0].plen == 4 && !memcmp(conf[0].path, "gone", 4) && conf[1].plen == 4 &&
               !memcmp(conf[1].path, "keep", 4) && conf[2].plen == 5 && !memcmp(conf[2].path, "new/t", 5),
           "conflicts listed in path order: gone, keep, new/t");
    TAP_EQ_INT(out.n, 0, "a conflicting merge leaves out empty");
    free(conf);

    /* unrelated histories (empty base) */
    mh_manifest_t empty = {0}, one = {0}, two = {0};
    mh_manifest_upsert(&one, "a", 1, X);
    mh_manifest_upsert(&one, "s", 1, Z);
    mh_manifest_upsert(&two, "b", 1, Y);
    mh_manifest_upsert(&two, "s", 1, Z);
    TAP_OK(mh__merge_manifests(&empty, &one, &two, &out, &conf, &nconf) == 0 && nconf == 0 && out.n == 3,
           "empty base: disjoint paths and identical shared ones merge");
    mh_manifest_upsert(&two, "s", 1, Y);
    TAP_OK(mh__merge_manifests(&empty, &one, &two, &out, &conf, &nconf) == 0 && nconf == 1 && conf[0].plen == 1 &&
               conf[0].path[0] == 's',
           "empty base: a shared path with different contents conflicts");
    free(conf);
    /* all empty */
    TAP_OK(mh__merge_manifests(&empty, &empty, &empty, &out, &conf, &nconf) == 0 && nconf == 0 && out.n == 0,
           "three empty manifests merge to an empty one");
    /* out reused: its old entries are replaced */
    TAP_OK(mh__merge_manifests(&empty, &one, &empty, &out, &conf, &nconf) == 0 && out.n == 2 &&
               mh__merge_manifests(&empty, &empty, &empty, &out, &conf, &nconf) == 0 && out.n == 0,
           "out's previous entries are replaced");
    mh_id_t e1, e2;
    mh_manifest_id(&out, &e1);
    mh_manifest_id_nocache(&empty, &e2);
    TAP_EQ_STR(e1.s, e2.s, "a reused out hashes like a fresh manifest (cache invalidated)");
    mh_manifest_free(&empty);
    mh_manifest_free(&one);
    mh_manifest_free(&two);
    mh_manifest_free(&ref);
    mh_manifest_free(&b);
    mh_manifest_free(&o);
    mh_manifest_free(&t);
    mh_manifest_free(&out);
}

static void test_random_merges(void)
{
    srand(4242);
    int bad = 0, conflicted = 0;
    char why[160] = "";
    for (int it = 0; it < 5000; it++) {
        int pb[NPATHS], po[NPATHS], pt[NPATHS];
        for (int i = 0; i < NPATHS; i++) {
            pb[i] = rand() % (NIDS + 1) - 1;
            /* mostly unchanged, so clean merges are common too */
            po[i] = rand() % 4 ? pb[i] : rand() % (NIDS + 1) - 1;
            pt[i] = rand() % 4 ? pb[i] : rand() % (NIDS + 1) - 1;
        }
        for (int i = 0; i < NPATHS; i++)
            if (!oracle(pb[i], po[i], pt[i], &(int){0})) {
                conflicted++;
                break;
            }
        if (!check_merge(pb, po, pt, why, sizeof why)) {
            if (!bad) TAP_COMMENT("iteration %d: %s", it, why);
            bad++;
        }
    }
    TAP_OK(bad == 0, "5000 random three-way merges agree with the oracle (%d with conflicts)", conflicted);
    TAP_OK(conflicted > 500 && conflicted < 4500, "the random cases mix clean and conflicting merges");
}

/* ------------------------------------------------------- change summary */

static void test_changes(void)
{
    srand(99);
    int bad = 0;
    for (int it = 0; it < 2000; it++) {
        int pf[NPATHS], pt[NPATHS];
        for (int i = 0; i < NPATHS; i++) {
            pf[i] = rand() % (NIDS + 1) - 1;
            pt[i] = rand() % 3 ? pf[i] : rand() % (NIDS + 1) - 1;
        }
        mh_manifest_t f = {0}, t = {0};
        build(&f, pf);
        build(&t, pt);
        mh_arena_t a;
        mh_arena_init(&a, 0);
        mh_mchanges_t ch;
        int rc = mh__manifest_changes(&a, &f, &t, &ch);
        size_t na = 0, nc = 0, nr = 0;
        bool ok = rc == 0;
        for (int i = 0; ok && i < NPATHS; i++) {
            const mh_mpath_t *list = NULL;
            size_t n = 0;
            if (pf[i] < 0 && pt[i] >= 0) list = ch.added, n = ch.nadded, na++;
            else if (pf[i] >= 0 && pt[i] < 0) list = ch.removed, n = ch.nremoved, nr++;
            else if (pf[i] >= 0 && pf[i] != pt[i]) list = ch.changed, n = ch.nchanged, nc++;
            if (!list) continue;
            bool found = false;
            for (size_t k = 0; k < n; k++)
                if (list[k].plen == strlen(PATHS[i]) && !memcmp(list[k].path, PATHS[i], list[k].plen)) found = true;
            ok = found;
        }
        ok = ok && na == ch.nadded && nc == ch.nchanged && nr == ch.nremoved;
        if (!ok) bad++;
        mh_arena_release(&a);
        mh_manifest_free(&f);
        mh_manifest_free(&t);
    }
    TAP_OK(bad == 0, "2000 random change summaries agree with the oracle");

    mh_manifest_t e = {0};
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_mchanges_t ch;
    TAP_OK(mh__manifest_changes(&a, &e, &e, &ch) == 0 && ch.added && ch.changed && ch.removed &&
               ch.nadded + ch.nchanged + ch.nremoved == 0,
           "empty to empty: three empty, non-NULL lists");
    mh_arena_release(&a);
}

/* ---------------------------------------------------------- merge base */

#define MAXN 400
static char cids[MAXN][MH_ID_SIZE], sids[MAXN][MH_ID_SIZE];

static const char *cid(int i)
{
    if (!cids[i][0]) {
        char s[32];
        mh_id_t id;
        snprintf(s, sizeof s, "commit-%d", i);
        mh_blob_id(s, strlen(s), &id);
        memcpy(cids[i], id.s, MH_ID_SIZE);
        snprintf(s, sizeof s, "snap-%d", i);
        mh_blob_id(s, strlen(s), &id);
        memcpy(sids[i], id.s, MH_ID_SIZE);
    }
    return cids[i];
}

/* A graph of n commits; parents p1[i], p2[i] (-1 none; always < i), with
 * generation numbers computed as push does. */
static mh_graph_t *make_graph(int n, const int *p1, const int *p2, int *gen)
{
    mh_graph_t *g = mh__graph_new("sha256:test", 1, (uint32_t)n);
    for (int i = 0; i < n; i++) {
        int g1 = p1[i] >= 0 ? gen[p1[i]] : 0, g2 = p2[i] >= 0 ? gen[p2[i]] : 0;
        gen[i] = (g1 > g2 ? g1 : g2) + 1;
        cid(i);
        mh__graph_add(g, cids[i], p1[i] >= 0 ? cid(p1[i]) : NULL, p2[i] >= 0 ? cid(p2[i]) : NULL, sids[i],
                     (uint32_t)gen[i]);
    }
    mh__graph_seal(g);
    return g;
}

static int base_of(mh_graph_t *g, int x, int y)
{
    uint32_t out = 0;
    int rc = mh__graph_merge_base(g, mh__graph_find(g, cid(x)), mh__graph_find(g, cid(y)), &out);
    if (rc) return -100;
    if (out == MH_GNONE) return -1;
    mh_id_t id;
    mh__graph_id(g, out, &id);
    for (int i = 0; i < MAXN; i++)
        if (cids[i][0] && !strcmp(cids[i], id.s)) return i;
    return -99;
}

/* Brute force: ancestors (inclusive) by DFS; common ones; highest
 * generation, then the smallest id. */
static void ancestors(int n, const int *p1, const int *p2, int x, char *mark)
{
    memset(mark, 0, (size_t)n);
    int stack[MAXN * 2], sp = 0;
    stack[sp++] = x;
    while (sp) {
        int v = stack[--sp];
        if (v < 0 || mark[v]) continue;
        mark[v] = 1;
        stack[sp++] = p1[v];
        stack[sp++] = p2[v];
    }
}

static int oracle_base(int n, const int *p1, const int *p2, const int *gen, int x, int y)
{
    static char ax[MAXN], ay[MAXN];
    ancestors(n, p1, p2, x, ax);
    ancestors(n, p1, p2, y, ay);
    int best = -1;
    for (int i = 0; i < n; i++) {
        if (!ax[i] || !ay[i]) continue;
        if (best < 0 || gen[i] > gen[best] || (gen[i] == gen[best] && strcmp(cid(i), cid(best)) < 0)) best = i;
    }
    return best;
}

static void test_base_shapes(void)
{
    int gen[16];
    /* linear 0-1-2-3 */
    {
        int p1[] = {-1, 0, 1, 2}, p2[] = {-1, -1, -1, -1};
        mh_graph_t *g = make_graph(4, p1, p2, gen);
        TAP_EQ_INT(base_of(g, 3, 1), 1, "linear: base of a commit and its ancestor is the ancestor");
        TAP_EQ_INT(base_of(g, 1, 3), 1, "linear: symmetric");
        TAP_EQ_INT(base_of(g, 2, 2), 2, "a commit with itself");
        mh__graph_unref(g);
    }
    /* diverged: 0-1-2 (ours), 1-3-4 (theirs) */
    {
        int p1[] = {-1, 0, 1, 1, 3}, p2[] = {-1, -1, -1, -1, -1};
        mh_graph_t *g = make_graph(5, p1, p2, gen);
        TAP_EQ_INT(base_of(g, 2, 4), 1, "diverged: the fork point");
        mh__graph_unref(g);
    }
    /* after a merge: 0-1(main)-3(merge of 1,2), 0-2(feature)-4; base(3,4) = 2 */
    {
        int p1[] = {-1, 0, 0, 1, 2}, p2[] = {-1, -1, -1, 2, -1};
        mh_graph_t *g = make_graph(5, p1, p2, gen);
        TAP_EQ_INT(base_of(g, 3, 4), 2, "after a merge: the merged feature commit");
        mh__graph_unref(g);
    }
    /* criss-cross: 1 and 2 fork from 0; 3 = merge(1,2), 4 = merge(2,1);
     * both 1 and 2 are best bases of 3 and 4 (same generation): the
     * smaller id wins */
    {
        int p1[] = {-1, 0, 0, 1, 2}, p2[] = {-1, -1, -1, 2, 1};
        mh_graph_t *g = make_graph(5, p1, p2, gen);
        int want = strcmp(cid(1), cid(2)) < 0 ? 1 : 2;
        TAP_EQ_INT(base_of(g, 3, 4), want, "criss-cross: of two best bases, the smaller id");
        mh__graph_unref(g);
    }
    /* unrelated: two roots */
    {
        int p1[] = {-1, 0, -1, 2}, p2[] = {-1, -1, -1, -1};
        mh_graph_t *g = make_graph(4, p1, p2, gen);
        TAP_EQ_INT(base_of(g, 1, 3), -1, "unrelated histories: no base");
        mh__graph_unref(g);
    }
    /* deeper common ancestor is not chosen over a higher one: 0-1-2, 1-3,
     * 2-4(merge 2,3), 3-5; base(4,5) = 3 (gen 3), not 1 */
    {
        int p1[] = {-1, 0, 1, 1, 2, 3}, p2[] = {-1, -1, -1, -1, 3, -1};
        mh_graph_t *g = make_graph(6, p1, p2, gen);
        TAP_EQ_INT(base_of(g, 4, 5), 3, "the common ancestor of highest generation");
        mh__graph_unref(g);
    }
    /* out of range */
    {
        int p1[] = {-1}, p2[] = {-1};
        mh_graph_t *g = make_graph(1, p1, p2, gen);
        uint32_t out;
        TAP_EQ_INT(mh__graph_merge_base(g, 0, 7, &out), MH_EINVAL, "a node out of range: MH_EINVAL");
        mh__graph_unref(g);
    }
}

static void test_base_random(void)
{
    srand(7);
    static int p1[MAXN], p2[MAXN], gen[MAXN];
    int bad = 0, none = 0, checks = 0;
    for (int round = 0; round < 40; round++) {
        int n = 20 + rand() % 300;
        int roots = 1 + rand() % 3;
        for (int i = 0; i < n; i++) {
            if (i < roots) {
                p1[i] = p2[i] = -1;
                continue;
            }
            /* mostly recent parents: long branches, occasional merges */
            int span = 1 + rand() % (i < 12 ? i : 12);
            p1[i] = i - span;
            p2[i] = rand() % 5 == 0 ? rand() % i : -1;
            if (p2[i] == p1[i]) p2[i] = -1;
        }
        mh_graph_t *g = make_graph(n, p1, p2, gen);
        for (int k = 0; k < 25; k++) {
            int x = rand() % n, y = rand() % n;
            int got = base_of(g, x, y), want = oracle_base(n, p1, p2, gen, x, y);
            checks++;
            if (want < 0) none++;
            if (got != want) {
                if (!bad) TAP_COMMENT("round %d: base(%d, %d) = %d, want %d", round, x, y, got, want);
                bad++;
            }
        }
        mh__graph_unref(g);
    }
    TAP_OK(bad == 0, "%d merge bases on random DAGs agree with brute force (%d unrelated pairs)", checks, none);
}

int main(void)
{
    init_ids();
    test_one_path_all_combinations();
    test_named_cases();
    test_random_merges();
    test_changes();
    test_base_shapes();
    test_base_random();
    return tap_done();
}
