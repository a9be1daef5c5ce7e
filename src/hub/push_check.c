/*
 * push_check.c — the CPU half of push unpack (SPEC 4.3), run on the
 * thread pool: everything that is checked about a pack before a single
 * row is written, once the stream (mh_rw_upload_stream, upload.c) has
 * read it, hashed it against its key, parsed it and hashed every blob
 * against its id. push.c does the rest (grants, queries, the
 * transaction); the two meet only in mh__unpack_t.
 *
 *   INDEX    the pack's commits, snapshots and blobs by id; the ids it
 *            names outside itself (parents, snapshots, objects) for the
 *            repository to resolve
 *   BASES    which stored snapshots pack snapshots are deltas against
 *   PREPARE  the repository's side as maps; every commit id, parents
 *            and generations; the commit, object and frame COPY rows
 *   REBUILD  every manifest from its delta (parents first; a chain hands
 *            its manifest down without copying), every snapshot id, the
 *            ghost guard, and the snapshot COPY rows — on a thread of its
 *            own while push.c runs the transaction's first statements
 *
 * Invariants: a client error is MH_EPARSE with `why` (422 invalid_pack);
 * nothing here reads anything but the pack and what the caller looked
 * up; every table is core's seeded id map over indices of the pack's own
 * arrays (blobs by their 32-byte digest, as the reader keeps them).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub_internal.h"
#include "mh/refwrite.h"

static const void *commit_key(const void *ctx, uint32_t v)
{
    return ((const mh_packr_result_t *)ctx)->commits[v].commit_id.p;
}
static const void *snap_key(const void *ctx, uint32_t v)
{
    return ((const mh_packr_result_t *)ctx)->snapshots[v].snapshot_id.p;
}
static const void *blob_key(const void *ctx, uint32_t v) { return ((const mh_packr_result_t *)ctx)->blobs[v].id; }
static const void *base_key(const void *ctx, uint32_t v) { return ((const mh__unpack_t *)ctx)->bases[v].id; }

static bool has(const mh_idmap_t *m, const char *id) { return mh_idmap_find(m, id) != MH_IDMAP_NONE; }

/* Whether the pack holds the blob whose id (text, valid) is `id`. */
static bool has_blob(const mh__unpack_t *x, const char *id)
{
    uint8_t d[32];
    return mh_id_digest(id, MH_ID_LEN, d) == 0 && mh_idmap_find(&x->blobs, d) != MH_IDMAP_NONE;
}

/* A client error: its reason, formatted in the work arena. */
static int reject(mh__unpack_t *x, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int reject(mh__unpack_t *x, int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    x->why = mh_strdup(x->a, buf);
    return x->why ? err : MH_ENOMEM;
}

/* ================================================================= INDEX */

/* Adds id unless the pack holds it (`held`) or the list has it. */
static int outside(mh_idlist_t *l, bool held, const char *id)
{
    if (!id || held) return 0;
    int rc = mh_idlist_add(l, id);
    return rc < 0 ? rc : 0;
}

static int index_pack(mh__unpack_t *x)
{
    const mh_packr_result_t *p = x->pack;
    mh_idmap_init(&x->commits, x->a, MH_ID_LEN, commit_key, p);
    mh_idmap_init(&x->snaps, x->a, MH_ID_LEN, snap_key, p);
    mh_idmap_init(&x->blobs, x->a, 32, blob_key, p);
    int rc = 0;
    /* A snapshot may appear more than once (two commits with the same
     * tree): the map keeps the first, every entry is rebuilt and checked
     * on its own, and the rows collapse on insert. */
    for (size_t i = 0; i < p->ncommits && !rc; i++) rc = mh_idmap_add(&x->commits, (uint32_t)i, NULL) < 0;
    for (size_t i = 0; i < p->nsnapshots && !rc; i++) rc = mh_idmap_add(&x->snaps, (uint32_t)i, NULL) < 0;
    for (size_t i = 0; i < p->nblobs && !rc; i++) rc = mh_idmap_add(&x->blobs, (uint32_t)i, NULL) < 0;
    return rc ? MH_ENOMEM : 0;
}

/* The ids the pack names but does not hold: commit parents, snapshots
 * (parents and commits' trees) and upserted objects. */
static int collect_outside(mh__unpack_t *x)
{
    const mh_packr_result_t *p = x->pack;
    mh_idlist_init(&x->ext_parents, x->a);
    mh_idlist_init(&x->ext_snaps, x->a);
    mh_idlist_init(&x->ext_objects, x->a);
    int rc = 0;
    for (size_t i = 0; i < p->ncommits && !rc; i++) {
        const mh_pack_commit_t *c = &p->commits[i];
        rc = outside(&x->ext_parents, c->parent.p && has(&x->commits, c->parent.p), c->parent.p);
        if (!rc) rc = outside(&x->ext_parents, c->parent2.p && has(&x->commits, c->parent2.p), c->parent2.p);
        if (!rc) rc = outside(&x->ext_snaps, has(&x->snaps, c->snapshot_id.p), c->snapshot_id.p);
    }
    for (size_t i = 0; i < p->nsnapshots && !rc; i++) {
        const mh_pack_snapshot_t *s = &p->snapshots[i];
        rc = outside(&x->ext_snaps, s->parent.p && has(&x->snaps, s->parent.p), s->parent.p);
        for (uint32_t k = 0; k < s->upsert->v.m.n && !rc; k++) {
            const mh_val_t *v = &s->upsert->v.m.kv[k].v;
            if (v->t != MH_V_STR || !mh_id_valid(v->v.s.p, v->v.s.n)) continue; /* REBUILD reports it */
            rc = outside(&x->ext_objects, has_blob(x, v->v.s.p), v->v.s.p);
        }
    }
    x->head_in_pack = has(&x->commits, x->head);
    return rc;
}

int mh__unpack_index(mh__unpack_t *x)
{
    int rc = index_pack(x);
    return rc ? rc : collect_outside(x);
}

/* ================================================================= BASES */

int mh__unpack_bases(mh__unpack_t *x)
{
    const mh_packr_result_t *p = x->pack;
    mh_idmap_t have;
    mh_idmap_init(&have, x->a, MH_ID_LEN, mh_idmap_key_strv, x->have_snaps);
    x->bases = mh_calloc(x->a, (x->nhave_snaps + 1) * sizeof *x->bases);
    if (!x->bases || mh_idmap_reserve(&have, x->nhave_snaps)) return MH_ENOMEM;
    for (size_t i = 0; i < x->nhave_snaps; i++)
        if (mh_idmap_add(&have, (uint32_t)i, NULL) < 0) return MH_ENOMEM;
    mh_idmap_init(&x->base_map, x->a, MH_ID_LEN, base_key, x);
    for (size_t i = 0; i < p->nsnapshots; i++) {
        const mh_pack_snapshot_t *s = &p->snapshots[i];
        uint32_t h = s->parent.p ? mh_idmap_find(&have, s->parent.p) : MH_IDMAP_NONE;
        if (h == MH_IDMAP_NONE) continue;
        mh__base_t *b = &x->bases[x->nbases];
        memcpy(b->id, s->parent.p, MH_ID_LEN);
        b->id[MH_ID_LEN] = 0;
        b->depth = x->have_depth[h];
        int added = mh_idmap_add(&x->base_map, (uint32_t)x->nbases, NULL);
        if (added < 0) return MH_ENOMEM;
        x->nbases += (size_t)added;
    }
    return 0;
}

/* =============================================================== REBUILD */

typedef mh__have_t have_t;

static int have_init(mh__unpack_t *x, have_t *h)
{
    struct {
        mh_idmap_t *m;
        const char **ids;
        size_t n;
    } sets[3] = {{&h->objects, x->have_objects, x->nhave_objects},
                 {&h->snaps, x->have_snaps, x->nhave_snaps},
                 {&h->commits, x->have_commits, x->nhave_commits}};
    for (int k = 0; k < 3; k++) {
        mh_idmap_init(sets[k].m, x->a, MH_ID_LEN, mh_idmap_key_strv, sets[k].ids);
        if (mh_idmap_reserve(sets[k].m, sets[k].n)) return MH_ENOMEM;
        for (size_t i = 0; i < sets[k].n; i++)
            if (mh_idmap_add(sets[k].m, (uint32_t)i, NULL) < 0) return MH_ENOMEM;
    }
    return 0;
}

/* Snapshots parents first (iterative DFS); every parent in the pack or
 * stored in this repository. */
static int order_snapshots(mh__unpack_t *x, const have_t *h, uint32_t *order, int *children)
{
    const mh_packr_result_t *p = x->pack;
    size_t ns = p->nsnapshots, no = 0;
    uint8_t *mark = mh_calloc(x->a, ns + 1);
    uint32_t *stack = mh_alloc(x->a, (ns + 1) * sizeof *stack);
    if (!mark || !stack) return MH_ENOMEM;
    for (size_t i = 0; i < ns; i++) {
        const mh_pack_snapshot_t *s = &p->snapshots[i];
        if (!s->parent.p) continue;
        uint32_t pi = mh_idmap_find(&x->snaps, s->parent.p);
        if (pi != MH_IDMAP_NONE) children[pi]++;
        else if (!has(&h->snaps, s->parent.p))
            return reject(x, MH_EPARSE,
                          "snapshots[%zu]: parent snapshot %.*s is neither in the pack nor in this repository", i,
                          MH_ID_LEN, s->parent.p);
    }
    for (size_t i = 0; i < ns; i++) {
        size_t sp = 0;
        uint32_t cur = (uint32_t)i;
        /* Climb to the first ancestor already ordered (or a root). */
        while (mark[cur] != 2) {
            if (mark[cur] == 1)
                return reject(x, MH_EPARSE, "snapshot %.*s is its own ancestor", MH_ID_LEN,
                              p->snapshots[cur].snapshot_id.p);
            mark[cur] = 1;
            stack[sp++] = cur;
            const mh_pack_snapshot_t *s = &p->snapshots[cur];
            uint32_t pi = s->parent.p ? mh_idmap_find(&x->snaps, s->parent.p) : MH_IDMAP_NONE;
            if (pi == MH_IDMAP_NONE) break;
            cur = pi;
        }
        while (sp) {
            uint32_t k = stack[--sp];
            mark[k] = 2;
            order[no++] = k;
        }
    }
    return 0;
}

/* The manifest snapshot i starts from: its in-pack parent's (the last
 * child takes it over: in a linear history no manifest is ever copied),
 * a stored base's, or empty for a root. */
static int start_manifest(mh__unpack_t *x, mh_manifest_t *ms, int *children, const int *depth, uint32_t i, int *pdepth)
{
    const mh_pack_snapshot_t *s = &x->pack->snapshots[i];
    *pdepth = -1;
    if (!s->parent.p) {
        ms[i] = (mh_manifest_t){0};
        return 0;
    }
    uint32_t pi = mh_idmap_find(&x->snaps, s->parent.p);
    if (pi != MH_IDMAP_NONE) {
        *pdepth = depth[pi];
        if (--children[pi] == 0) {
            ms[i] = ms[pi];
            ms[pi] = (mh_manifest_t){0};
            return 0;
        }
        return mh_manifest_clone(&ms[i], &ms[pi]);
    }
    uint32_t bi = mh_idmap_find(&x->base_map, s->parent.p);
    if (bi == MH_IDMAP_NONE || !x->bases[bi].loaded) return MH_ENOMEM; /* cannot happen: BASES loaded it */
    *pdepth = (int)x->bases[bi].depth;
    return mh_manifest_clone(&ms[i], &x->bases[bi].m);
}

/* The tmp_snapshots row (COPY binary format: the deltas and checkpoints
 * are written as raw bytes where they are encoded, no hex): delta form; a
 * checkpoint every MH_CHECKPOINT_INTERVAL links. */
static int snapshot_row(mh__unpack_t *x, const mh_pack_snapshot_t *s, const mh_manifest_t *m, int depth,
                        bool checkpoint)
{
    mh_buf_t *b = &x->snapshot_rows;
    size_t at;
    int rc = mh_copyb_row(b, 7);
    if (!rc) rc = mh_copyb_field(b, s->snapshot_id.p, s->snapshot_id.n);
    if (!rc) rc = mh_copyb_field(b, s->parent.p, s->parent.p ? s->parent.n : 0);
    /* One writer per field: each keeps its own sticky error. */
    const mh_val_t *delta[2] = {s->upsert, s->remove};
    for (int k = 0; k < 2 && !rc; k++) {
        mh_mpw_t w;
        rc = mh_copyb_open(b, &at);
        if (rc) break;
        mh_mpw_init(&w, b);
        mh_mpw_val(&w, delta[k]);
        rc = w.err ? w.err : mh_copyb_close(b, at);
    }
    if (!rc) rc = mh_copyb_int4(b, (int32_t)m->n);
    if (!rc) rc = mh_copyb_int4(b, depth);
    if (!rc && checkpoint) {
        rc = mh_copyb_open(b, &at);
        if (!rc) rc = mh_manifest_encode(m, b);
        if (!rc) rc = mh_copyb_close(b, at);
    } else if (!rc) rc = mh_copyb_field(b, NULL, 0);
    return rc ? MH_ENOMEM : 0;
}

/* Rebuilds snapshot i: its delta applied, its id, the ghost guard (every
 * object it adds is in the pack or already this repository's), its row. */
static int rebuild_snapshot(mh__unpack_t *x, const have_t *h, mh_manifest_t *ms, int *children, int *depth, uint32_t i)
{
    const mh_pack_snapshot_t *s = &x->pack->snapshots[i];
    int pdepth;
    int rc = start_manifest(x, ms, children, depth, i, &pdepth);
    if (rc) return rc;
    const char *why = NULL;
    rc = mh_manifest_apply(&ms[i], s->upsert, s->remove, &why);
    if (rc == MH_ENOMEM) return rc;
    if (rc)
        return reject(x, MH_EPARSE, "snapshots[%u] (%.*s): %s", i, MH_ID_LEN, s->snapshot_id.p,
                      why ? why : "bad delta");
    mh_id_t sid;
    mh_manifest_id(&ms[i], &sid);
    if (memcmp(sid.s, s->snapshot_id.p, MH_ID_LEN) != 0)
        return reject(x, MH_EPARSE, "snapshots[%u]: the rebuilt manifest hashes to %s, not to snapshot_id %.*s", i,
                      sid.s, MH_ID_LEN, s->snapshot_id.p);
    for (uint32_t k = 0; k < s->upsert->v.m.n; k++) {
        const mh_kv_t *kv = &s->upsert->v.m.kv[k];
        if (!has_blob(x, kv->v.v.s.p) && !has(&h->objects, kv->v.v.s.p))
            return reject(x, MH_EPARSE,
                          "snapshots[%u]: object %.*s (%.*s) is neither in the pack nor in this repository", i,
                          MH_ID_LEN, kv->v.v.s.p, (int)kv->k.v.s.n, kv->k.v.s.p);
    }
    depth[i] = pdepth + 1;
    bool checkpoint = depth[i] >= MH_CHECKPOINT_INTERVAL;
    if (checkpoint) depth[i] = 0;
    rc = snapshot_row(x, s, &ms[i], depth[i], checkpoint);
    if (children[i] == 0) mh_manifest_free(&ms[i]);
    return rc;
}

static void rebuild_release(mh__unpack_t *x)
{
    if (x->rb.ms)
        for (size_t i = 0; i < x->pack->nsnapshots; i++) mh_manifest_free(&x->rb.ms[i]);
    free(x->rb.ms);
    x->rb.ms = NULL;
    x->rb.done = true;
}

static int rebuild_some(mh__unpack_t *x, const have_t *h, size_t chunk)
{
    size_t ns = x->pack->nsnapshots;
    int rc = 0;
    if (!x->rb.ms && !x->rb.done) { /* the first chunk */
        x->rb.ms = calloc(ns + 1, sizeof *x->rb.ms);
        x->rb.children = mh_calloc(x->a, (ns + 1) * sizeof *x->rb.children);
        x->rb.depth = mh_alloc(x->a, (ns + 1) * sizeof *x->rb.depth);
        x->rb.order = mh_alloc(x->a, (ns + 1) * sizeof *x->rb.order);
        bool ok = x->rb.ms && x->rb.children && x->rb.depth && x->rb.order;
        rc = ok ? order_snapshots(x, h, x->rb.order, x->rb.children) : MH_ENOMEM;
    }
    while (!rc && x->rb.next < ns && x->snapshot_rows.len < chunk)
        rc = rebuild_snapshot(x, h, x->rb.ms, x->rb.children, x->rb.depth, x->rb.order[x->rb.next++]);
    if (!rc && x->snapshot_rows.len && mh_copyb_end(&x->snapshot_rows)) rc = MH_ENOMEM;
    if (rc || x->rb.next >= ns) rebuild_release(x);
    return rc;
}

/* Commits parents first (iterative DFS over both parents). */
static int order_commits(mh__unpack_t *x, uint32_t *order)
{
    const mh_packr_result_t *p = x->pack;
    size_t nc = p->ncommits, no = 0;
    uint8_t *mark = mh_calloc(x->a, nc + 1);
    /* A commit is pushed when a child finds it unvisited: at most twice
     * per child (two parents), so 2 * nc + 1 entries suffice. */
    uint32_t *stack = mh_alloc(x->a, (2 * nc + 2) * sizeof *stack);
    if (!mark || !stack) return MH_ENOMEM;
    for (size_t i = 0; i < nc; i++) {
        if (mark[i]) continue;
        size_t sp = 0;
        stack[sp++] = (uint32_t)i;
        while (sp) {
            uint32_t c = stack[sp - 1];
            if (mark[c] == 2) {
                sp--;
                continue;
            }
            const mh_pack_commit_t *cm = &p->commits[c];
            bool pushed = false;
            if (mark[c] == 0) {
                mark[c] = 1;
                const mh_str_t ps[2] = {cm->parent, cm->parent2};
                for (int k = 0; k < 2; k++) {
                    uint32_t pi = ps[k].p ? mh_idmap_find(&x->commits, ps[k].p) : MH_IDMAP_NONE;
                    if (pi == MH_IDMAP_NONE) continue;
                    if (mark[pi] == 1)
                        return reject(x, MH_EPARSE, "commit %.*s is its own ancestor", MH_ID_LEN, cm->commit_id.p);
                    if (mark[pi] == 0) {
                        stack[sp++] = pi;
                        pushed = true;
                    }
                }
                if (pushed) continue;
            }
            sp--;
            mark[c] = 2;
            order[no++] = c;
        }
    }
    return 0;
}

/* Checks commit i (parents, tree, id) given its parents' generations, and
 * sets its own. */
static int check_commit(mh__unpack_t *x, const have_t *h, int *gen, uint32_t i)
{
    const mh_pack_commit_t *c = &x->pack->commits[i];
    if (!c->parent.p && c->parent2.p)
        return reject(x, MH_EPARSE, "commits[%u]: parent2_commit_id without parent_commit_id", i);
    mh_str_t ps[2];
    int np = 0, g = 0;
    const mh_str_t both[2] = {c->parent, c->parent2};
    for (int k = 0; k < 2; k++) {
        if (!both[k].p) continue;
        int v;
        uint32_t pi = mh_idmap_find(&x->commits, both[k].p), hi = MH_IDMAP_NONE;
        if (pi != MH_IDMAP_NONE) v = gen[pi];
        else if ((hi = mh_idmap_find(&h->commits, both[k].p)) != MH_IDMAP_NONE) v = (int)x->have_gen[hi];
        else
            return reject(x, MH_EPARSE, "commits[%u]: parent %.*s is neither in the pack nor in this repository", i,
                          MH_ID_LEN, both[k].p);
        if (v > g) g = v;
        ps[np++] = both[k];
    }
    gen[i] = g + 1;
    if (!has(&x->snaps, c->snapshot_id.p) && !has(&h->snaps, c->snapshot_id.p))
        return reject(x, MH_EPARSE, "commits[%u]: snapshot %.*s is neither in the pack nor in this repository", i,
                      MH_ID_LEN, c->snapshot_id.p);
    mh_id_t cid;
    mh_commit_id(ps, np, c->snapshot_id, c->message, c->committed_at, c->author, &cid);
    if (memcmp(cid.s, c->commit_id.p, MH_ID_LEN) != 0)
        return reject(x, MH_EPARSE, "commits[%u]: the fields hash to %s, not to commit_id %.*s", i, cid.s, MH_ID_LEN,
                      c->commit_id.p);
    return 0;
}

/* Commit i's tmp_commits row. */
static int commit_row(mh__unpack_t *x, int gen, uint32_t i, mh_buf_t *meta)
{
    const mh_pack_commit_t *c = &x->pack->commits[i];
    uint32_t nmeta = 0;
    meta->len = 0;
    if (mh_pack_commit_meta(c, meta, &nmeta)) return MH_ENOMEM;
    mh_buf_t *b = &x->commit_rows;
    int rc = mh_copy_field(b, c->commit_id.p, c->commit_id.n, false);
    rc |= mh_copy_field(b, c->parent.p, c->parent.n, false);
    rc |= mh_copy_field(b, c->parent2.p, c->parent2.n, false);
    rc |= mh_copy_field(b, c->snapshot_id.p, c->snapshot_id.n, false);
    rc |= mh_copy_field(b, c->message.p, c->message.n, false);
    rc |= mh_copy_field(b, c->author.p, c->author.n, false);
    rc |= mh_copy_field(b, c->committed_at.p, c->committed_at.n, false);
    rc |= mh_copy_field(b, c->branch.p ? c->branch.p : "", c->branch.p ? c->branch.n : 0, false);
    rc |= mh_copy_int(b, gen, false);
    rc |= nmeta ? mh_copy_bytea(b, meta->p, meta->len, true) : mh_copy_field(b, NULL, 0, true);
    return rc ? MH_ENOMEM : 0;
}

static int cmp_commit(const void *a, const void *b, void *ctx)
{
    const mh_pack_commit_t *c = ctx;
    return memcmp(c[*(const uint32_t *)a].commit_id.p, c[*(const uint32_t *)b].commit_id.p, MH_ID_LEN);
}

/* Every commit checked parents first (generations need it), then the
 * rows written in commit id order, each id once (a pack may list a commit
 * twice): the inserts need no sort and no DISTINCT (refwrite.c,
 * mh_rw_history_rows). */
static int rebuild_commits(mh__unpack_t *x, const have_t *h)
{
    size_t nc = x->pack->ncommits;
    int *gen = mh_calloc(x->a, (nc + 1) * sizeof *gen);
    uint32_t *order = mh_alloc(x->a, (nc + 1) * sizeof *order);
    mh_buf_t meta = {0};
    int rc = gen && order ? order_commits(x, order) : MH_ENOMEM;
    for (size_t oi = 0; oi < nc && !rc; oi++) rc = check_commit(x, h, gen, order[oi]);
    for (size_t k = 0; k < nc && !rc; k++) order[k] = (uint32_t)k;
    if (!rc) qsort_r(order, nc, sizeof *order, cmp_commit, (void *)x->pack->commits);
    for (size_t k = 0; k < nc && !rc; k++)
        if (k == 0 || cmp_commit(&order[k - 1], &order[k], (void *)x->pack->commits) != 0)
            rc = commit_row(x, gen[order[k]], order[k], &meta);
    mh_buf_free(&meta);
    return rc;
}

int mh__unpack_prepare(mh__unpack_t *x)
{
    int rc = have_init(x, &x->have);
    if (!rc) rc = rebuild_commits(x, &x->have);
    size_t nrows;
    if (!rc) rc = mh_rw_index_rows(x->pack, &x->object_rows, &x->frame_rows, &nrows);
    return rc;
}

int mh__unpack_rebuild(mh__unpack_t *x, size_t chunk) { return rebuild_some(x, &x->have, chunk); }

void mh__unpack_free(mh__unpack_t *x)
{
    mh_buf_free(&x->commit_rows);
    mh_buf_free(&x->snapshot_rows);
    mh_buf_free(&x->object_rows);
    mh_buf_free(&x->frame_rows);
    rebuild_release(x);
    for (size_t i = 0; i < x->nbases; i++) mh_manifest_free(&x->bases[i].m);
}
