/*
 * fetch.c — POST /{owner}/{slug}/fetch (SPEC 4.4, DESIGN 4 "Fetch"): the
 * want/have negotiation answered with a presigned URL of an mpack built
 * from the repository's stored history: v2 (SPEC 2.1) when the request
 * lists 2 in `formats`, else v1; shallow with `depth`.
 *
 * Invariants:
 *  - Answers are cached by (repo_id, state_seq, request key), the key
 *    being SHA-256 over the sorted, de-duplicated want and have lists,
 *    the pack version answered and the depth. First a per-process map
 *    keyed by the request as sent (caches.c; the hot path: no query beyond
 *    the repository lookup); on a miss the commit graph (cached per
 *    process and state) resolves the ids and the fetch_packs table,
 *    shared by all processes, is asked with the key of the known ids
 *    only, so unknown haves neither force a rebuild nor add rows. Every
 *    branch move bumps state_seq: a cached answer always describes the
 *    state it was built for.
 *  - The same request on the same state builds the same bytes: commits by
 *    (generation, id), snapshots parent first in that order, branch_heads
 *    (the branches whose head is in the pack) by name, and the blobs as
 *    the pack builder orders them (v1: by source; v2: by path, each
 *    blob's path and age taken from the first snapshot of the pack that
 *    adds it). So mpack_id is reproducible and concurrent builds in
 *    several processes store identical packs.
 *  - Commits and snapshots come from PostgreSQL only; blob bytes come from
 *    the source packs' recorded byte ranges and frames, read and written
 *    as a stream by the pack builder (mh/packbuild.h) within the
 *    pack-memory budget, never hashed again: only the whole new pack is
 *    hashed, to name it.
 *  - Access goes through this repository's ref rows only: wants must be
 *    in its commit graph (commit_refs), blobs are located through the
 *    packs it references (mpack_refs: the object_refs view, sql/0050).
 *  - Identical misses in flight are coalesced: the first request builds,
 *    later ones wait for its answer (or its error).
 *
 * The build is an operation of the step kit (mh/step.h); fetch_steps at
 * the end of the file is the protocol.
 */
#include "hub_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_IDS 10000         /* per list; a client sends tips, not histories */
#define MAX_HAVE_MANIFESTS 64 /* have tips whose objects are subtracted */
#define MAX_FORMATS 16        /* entries of `formats` */
#define MAX_DEPTH ((uint64_t)1 << 31)
/* A build keeps row copies and decoded deltas in its own arena: the
 * request arena's 64 MiB cap is sized for API bodies, not for histories.
 * Blob bytes never come into memory beyond the builder's frames. */
#define BUILD_ARENA_LIMIT ((size_t)1 << 30)
/* A walk flag of our own (mh__graph_walk_ex uses the others): the commit
 * is in the pack. */
#define GW_SENT 0x10

typedef mh__answer_t answer_t;

/* ================================================================= state */

typedef enum { SNAP_DELTA, SNAP_ROOT_STORED, SNAP_ROOT_REBUILD } snap_kind_t;

typedef struct {
    const char *id;
    char *parent;     /* stored parent id or NULL */
    uint8_t *up, *rm; /* stored delta (msgpack map / array) */
    size_t upn, rmn;
    mh_val_t upv; /* the upsert map, decoded */
    snap_kind_t kind;
    mh_manifest_t *full; /* SNAP_ROOT_REBUILD: the whole manifest */
    mh_buf_t *full_mp;   /* ... encoded as the root's upsert map */
    int mark;            /* 0 new, 1 on the stack, 2 emitted */
} snap_t;

typedef struct {
    char *commit_id, *p1, *p2, *snap, *message, *author, *committed_at, *branch;
    uint8_t *meta;
    size_t metan;
} crow_t;

typedef struct {
    const char *id;   /* object id (borrowed from a delta or manifest) */
    const char *path; /* the path the first snapshot adding it has it at */
    uint32_t plen, age;
    char *mpack;     /* source pack id */
    bool superseded; /* that pack was replaced by GC (still readable) */
    uint64_t off, len;
    bool framed; /* a v2 source: off is inside frame fr */
    mh_pb_frame_t fr;
} blob_t;

typedef struct fetch fetch_t;

struct fetch {
    mh__op_t op;
    mh_arena_t *a; /* the build arena: op.work (BUILD_ARENA_LIMIT) */
    char **want, **have;
    size_t nwant, nhave;
    int version;          /* the pack version answered: 1 or 2 */
    uint64_t depth;       /* 0: the whole history */
    char reqkey[65];      /* SHA-256 of the request as sent (sorted, unique) */
    char normkey[65];     /* ... of the known ids only (unknown haves dropped) */
    char *key;            /* answer-cache key: repo_id|state_seq|reqkey */
    mh__inflight_t *infl; /* set on the request that builds */
    int64_t seq;          /* the state the answer describes */
    mh_graph_t *g;
    bool g_cached, g_reloaded;
    uint32_t *want_idx, *have_idx;
    size_t nwant_idx, nhave_idx;
    uint32_t *send;
    size_t nsend;
    uint8_t *flags;
    char *shallow; /* sent commits whose parents were left out: nshallow ids of MH_ID_SIZE */
    uint32_t nshallow;
    mh_idlist_t have_snaps; /* snapshots of commits the client has */
    mh_idlist_t snap_ids;   /* snapshots to send; snaps[] is parallel */
    crow_t *commits;
    snap_t *snaps;
    mh_idmap_t blob_map; /* blobs[] (sorted) by object id */
    uint32_t *emit;      /* snapshot indices, parents first */
    size_t nemit;
    mh_manifest_t **havem;
    size_t nhavem;
    size_t pending; /* manifest loads in flight */
    int perr;
    const char *pwhy;
    blob_t *blobs;
    size_t nblobs;
    mh_pb_t *pb;
    int mphase; /* the metadata writer's place: section, element */
    size_t mi;
    mh_pb_stats_t st;
    bool built;
    mh_id_t mpack_id;
    answer_t ans;
    uint64_t t_mark;
    char timing[256];
    size_t tlen;
};

#define F(s) MH_STEP_OP(s, fetch_t, op.step)

enum { S_GRAPH, S_RESOLVE, S_LOOKUP, S_WALK, S_ROWS, S_MANIFESTS, S_BLOBSET, S_LOCATE, S_BUILD, S_ACQUIRE, S_BEGIN, S_PUT,
       S_RECORD, S_COMMIT, S_ANSWER };

static void tmark(fetch_t *f, const char *name)
{
    uint64_t now = mh_now_us();
    if (f->tlen < sizeof f->timing - 32) {
        int n = snprintf(f->timing + f->tlen, sizeof f->timing - f->tlen, " %s=%.1f", name,
                         (double)(now - f->t_mark) / 1000.0);
        if (n > 0) f->tlen += (size_t)n;
    }
    f->t_mark = now;
}

static void free_manifest_cb(void *p) { mh_manifest_free(p); }
static void free_buf_cb(void *p) { mh_buf_free(p); }

/* The cache key of a request: SHA-256 (hex) of "want\n" + each want id +
 * "\n", then "have\n" + each have id + "\n", over lists already sorted
 * and de-duplicated, then "v<version>\n" and, for a shallow fetch,
 * "depth <n>\n". With g, haves that graph does not hold are left out:
 * they cannot change the answer, so garbage haves neither force a rebuild
 * nor add rows. */
static int ids_key(mh_arena_t *a, char *const *want, size_t nw, char *const *have, size_t nh, int version,
                   uint64_t depth, const mh_graph_t *g, char out[65])
{
    char *buf = mh_alloc(a, 64 + (nw + nh) * (MH_ID_LEN + 1)), *p = buf;
    if (!buf) return MH_ENOMEM;
    for (int list = 0; list < 2; list++) {
        char *const *ids = list ? have : want;
        memcpy(p, list ? "have\n" : "want\n", 5);
        p += 5;
        for (size_t i = 0; i < (list ? nh : nw); i++) {
            if (list && g && mh__graph_find(g, ids[i]) == MH_GNONE) continue;
            memcpy(p, ids[i], MH_ID_LEN);
            p += MH_ID_LEN;
            *p++ = '\n';
        }
    }
    p += sprintf(p, "v%d\n", version);
    if (depth) p += sprintf(p, "depth %llu\n", (unsigned long long)depth);
    uint8_t d[32];
    mh_sha256(buf, (size_t)(p - buf), d);
    mh_hex_encode(out, d, 32);
    return 0;
}

/* ============================================================ answering */

static void respond_answer(mh_req_t *req, const answer_t *ans)
{
    mh_hub_t *hub = req->app;
    uint32_t ttl = mh__presign_ttl(hub);
    char *url = NULL;
    if (ans->mpack_id[0]) {
        int rc = mh__pack_url(hub, &req->arena, ans->mpack_id, &url, &ttl);
        if (rc) {
            mh_res_fail(req, rc, "presigning the pack");
            return;
        }
    }
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b), *sh = mh_vb_arr(b);
    for (uint32_t i = 0; i < ans->nshallow; i++) mh_vb_push(b, sh, mh_vb_str(b, ans->shallow + (size_t)i * MH_ID_SIZE));
    mh_vb_put(b, m, "mpack_url", url ? mh_v_str(url) : mh_v_nil());
    mh_vb_put(b, m, "mpack_id", ans->mpack_id[0] ? mh_vb_str(b, ans->mpack_id) : mh_v_nil());
    mh_vb_put(b, m, "mpack_version", mh_v_int(ans->version));
    mh_vb_put(b, m, "commit_count", mh_v_int(ans->commits));
    mh_vb_put(b, m, "snapshot_count", mh_v_int(ans->snapshots));
    mh_vb_put(b, m, "blob_count", mh_v_int(ans->blobs));
    mh_vb_put(b, m, "object_count", mh_v_int(ans->blobs));
    mh_vb_put(b, m, "expires_in", mh_v_int(ttl));
    mh_vb_put(b, m, "shallow", mh_vb_node(b, sh));
    mh_res_val(req, 200, m);
}

static void answer_each(mh_req_t *waiter, void *arg) { respond_answer(waiter, arg); }
static void error_each(mh_req_t *waiter, void *arg) { mh__res_err(waiter, arg); }

/* The builder's end, for itself and every request waiting on the same
 * key: the same answer, or the same error. */
static void fetch_finish(mh_step_t *s)
{
    fetch_t *f = F(s);
    mh_hub_t *hub = f->op.hub;
    mh__inflight_t *x = f->infl;
    mh__err_t e;
    if (mh__op_error(s, NULL, &e)) {
        mh__res_err(f->op.req, &e);
        mh__inflight_done(hub, x, error_each, &e);
        return;
    }
    if (f->built)
        mh_info("fetch %s/%s: v%d%s%s: %zu commits (%u shallow), %zu snapshots, %zu blobs, %llu bytes (frames: %u built, "
                "%u copied, %u large; %llu bytes read), %s in %.1f ms:%s",
                f->op.repo->owner, f->op.repo->slug, f->version, f->depth ? " depth " : "",
                f->depth ? mh_sprintf(f->a, "%llu", (unsigned long long)f->depth) : "", f->nsend, f->nshallow,
                f->nemit, f->nblobs, (unsigned long long)f->st.bytes, f->st.frames_built, f->st.frames_reused,
                f->st.frames_large, (unsigned long long)f->st.bytes_read, f->mpack_id.s,
                (double)(mh_now_us() - s->t0) / 1000.0, f->timing);
    /* Under the key this request was looked up with, and under the state
     * the answer was built for when the graph was newer. */
    char *key = mh_sprintf(f->a, "%s|%lld|%s", f->op.repo->repo_id, (long long)f->seq, f->reqkey);
    if (f->key) mh__answer_put(hub, f->key, &f->ans);
    if (key && (!f->key || strcmp(key, f->key) != 0)) mh__answer_put(hub, key, &f->ans);
    /* The request (and f, and its arenas) may be freed by its answer:
     * the waiters' copy lives on the heap. */
    answer_t ans = f->ans;
    size_t n = (size_t)ans.nshallow * MH_ID_SIZE;
    char *sh = n ? malloc(n) : NULL;
    if (n && !sh) {
        e = (mh__err_t){503, "unavailable", true, 2, "out of memory"};
        mh__res_err(f->op.req, &e);
        mh__inflight_done(hub, x, error_each, &e);
        return;
    }
    if (n) memcpy(sh, ans.shallow, n);
    ans.shallow = sh;
    respond_answer(f->op.req, &ans);
    mh__inflight_done(hub, x, answer_each, &ans);
    free(sh);
}

/* ============================================================= the steps */

/* --- S_GRAPH: the repository's commit graph, cached per state */

static void graph_cb(void *ud, mh_graph_t *g, int err, const char *errmsg)
{
    fetch_t *f = F(ud);
    if (err == MH_ENOENT) {
        mh_step_refuse(&f->op.step, 404, "not_found", "repository not found");
        err = 0;
    } else if (!err && mh__graph_hold(f->a, g)) {
        err = MH_ENOMEM;
    } else if (!err) {
        f->g = g;
        f->g_cached = false;
        tmark(f, "graph_load");
    }
    mh_step_resume(&f->op.step, err, errmsg);
}

static void load_graph(mh_step_t *s, bool force)
{
    fetch_t *f = F(s);
    mh_graph_t *g = force ? NULL : mh__graph_cache_get(f->op.hub, f->op.repo->repo_id, f->seq);
    if (g) {
        if (mh__graph_hold(f->a, g)) {
            mh_step_fail(s, MH_ENOMEM, "graph");
            return;
        }
        f->g = g;
        f->g_cached = true;
        return;
    }
    /* Forced or not, the load reads only the ref rows added since the
     * cached graph of this repository (graph.c), which include the one a
     * forced reload looks for. */
    mh_step_wait(s);
    if (mh__graph_load(f->op.hub, f->a, f->op.repo->repo_id, graph_cb, s)) mh_step_resume(s, MH_ENOMEM, "graph");
}

static void step_graph(mh_step_t *s) { load_graph(s, false); }

/* --- S_RESOLVE: want/have ids to graph nodes; the normalised key */

static void step_resolve(mh_step_t *s)
{
    fetch_t *f = F(s);
    mh_graph_t *g = f->g;
    f->want_idx = mh_alloc(f->a, (f->nwant + 1) * sizeof(uint32_t));
    f->have_idx = mh_alloc(f->a, (f->nhave + 1) * sizeof(uint32_t));
    if (!f->want_idx || !f->have_idx) {
        mh_step_fail(s, MH_ENOMEM, "resolve");
        return;
    }
    f->nwant_idx = f->nhave_idx = 0;
    for (size_t i = 0; i < f->nwant; i++) {
        uint32_t x = mh__graph_find(g, f->want[i]);
        if (x != MH_GNONE) {
            f->want_idx[f->nwant_idx++] = x;
            continue;
        }
        /* A cached graph could predate a ref row added without a branch
         * move: ask the database once more before a 404. */
        if (f->g_cached && !f->g_reloaded) {
            f->g_reloaded = true;
            mh_step_goto(s, S_RESOLVE);
            load_graph(s, true);
            return;
        }
        mh_step_refuse(s, 404, "not_found", "a wanted commit is not in this repository");
        return;
    }
    for (size_t i = 0; i < f->nhave; i++) {
        uint32_t x = mh__graph_find(g, f->have[i]);
        if (x != MH_GNONE) f->have_idx[f->nhave_idx++] = x; /* unknown haves are ignored */
    }
    /* The answer describes the state the graph was read at. */
    f->seq = g->state_seq;
    if (ids_key(f->a, f->want, f->nwant, f->have, f->nhave, f->version, f->depth, g, f->normkey)) {
        mh_step_fail(s, MH_ENOMEM, "resolve");
        return;
    }
    tmark(f, "resolve");
}

/* --- S_LOOKUP: the shared table of built answers */

static const mh_stmt_t st_lookup = {
    "hub_fetch_lookup",
    "SELECT mpack_id, commit_count, snapshot_count, blob_count, mpack_version, shallow,"
    " floor(extract(epoch FROM created_at))::bigint FROM fetch_packs"
    " WHERE repo_id = $1 AND request_key = $2 AND state_seq = $3",
    3};

/* The shallow ids of a text[] literal: "{sha256:...,sha256:...}" (ids
 * need no quoting); NULL is none. MH_EPARSE, MH_ENOMEM. */
static int shallow_read(fetch_t *f, PGresult *res, int r, int c)
{
    if (mh_pq_isnull(res, r, c)) return 0;
    const char *v = mh_pq_str(res, r, c);
    size_t n = strlen(v);
    if (n < 2 || v[0] != '{' || v[n - 1] != '}') return MH_EPARSE;
    size_t count = n == 2 ? 0 : (n - 1) / (MH_ID_LEN + 1);
    if (count && count * (MH_ID_LEN + 1) + 1 != n) return MH_EPARSE;
    f->shallow = mh_alloc(f->a, count * MH_ID_SIZE + 1);
    if (!f->shallow) return MH_ENOMEM;
    for (size_t i = 0; i < count; i++) {
        const char *id = v + 1 + i * (MH_ID_LEN + 1);
        if (!mh_id_valid(id, MH_ID_LEN)) return MH_EPARSE;
        memcpy(f->shallow + i * MH_ID_SIZE, id, MH_ID_LEN);
        f->shallow[i * MH_ID_SIZE + MH_ID_LEN] = 0;
    }
    f->nshallow = (uint32_t)count;
    return 0;
}

static int looked_up(mh_step_t *s, PGresult *res)
{
    fetch_t *f = F(s);
    if (PQntuples(res) != 1) {
        tmark(f, "lookup");
        return 0;
    }
    answer_t *ans = &f->ans;
    if (!mh_pq_isnull(res, 0, 0)) snprintf(ans->mpack_id, sizeof ans->mpack_id, "%s", mh_pq_str(res, 0, 0));
    ans->commits = (uint32_t)mh_pq_int(res, 0, 1);
    ans->snapshots = (uint32_t)mh_pq_int(res, 0, 2);
    ans->blobs = (uint32_t)mh_pq_int(res, 0, 3);
    ans->version = (int)mh_pq_int(res, 0, 4);
    /* Reused until the row is pruned (MUSEHUB_FETCH_CACHE_SECONDS after
     * its creation); its pack is swept one grace period later. */
    ans->expires_at = mh_pq_int(res, 0, 6) + f->op.hub->cfg->fetch_cache_seconds;
    int rc = shallow_read(f, res, 0, 5);
    if (rc) return rc == MH_ENOMEM ? rc : MH_EDB;
    ans->shallow = f->shallow;
    ans->nshallow = f->nshallow;
    tmark(f, "lookup_hit");
    mh_step_goto(s, S_ANSWER);
    return 0;
}

static void step_lookup(mh_step_t *s)
{
    fetch_t *f = F(s);
    char seq[24];
    snprintf(seq, sizeof seq, "%lld", (long long)f->seq);
    mh_db_pq_t q = {&st_lookup, NULL, 0, (const char *const[]){f->op.repo->repo_id, f->normkey, seq}, NULL, NULL};
    mh_step_query(s, &q, looked_up);
}

/* --- S_WALK: walk, list the snapshots to send */

static int cmp_gen_id(const void *x, const void *y, void *arg)
{
    const mh_graph_t *g = arg;
    const mh_gnode_t *a = &g->nodes[*(const uint32_t *)x], *b = &g->nodes[*(const uint32_t *)y];
    if (a->gen != b->gen) return a->gen < b->gen ? -1 : 1;
    return memcmp(a->id, b->id, 32);
}

/* A snapshot id of the graph, copied into the build arena (id lists
 * borrow their keys). */
static const char *snap_text(fetch_t *f, uint32_t node)
{
    mh_id_t sid;
    mh__graph_snap_id(f->g, node, &sid);
    return mh_strndup(f->a, sid.s, MH_ID_LEN);
}

static int plan_snapshots(fetch_t *f)
{
    mh_graph_t *g = f->g;
    /* Snapshots the client has: those of every commit the walk met on the
     * have side (the have tips, their ancestors down to the frontier). */
    mh_idlist_init(&f->have_snaps, f->a);
    for (uint32_t i = 0; i < g->n; i++) {
        if (!(f->flags[i] & MH_GW_HAVE)) continue;
        const char *sid = snap_text(f, i);
        if (!sid || mh_idlist_add(&f->have_snaps, sid) < 0) return MH_ENOMEM;
    }
    /* Snapshots to send: those of the sent commits, once each, in commit
     * order, unless the client has them already. */
    mh_idlist_init(&f->snap_ids, f->a);
    for (size_t i = 0; i < f->nsend; i++) {
        const char *sid = snap_text(f, f->send[i]);
        if (!sid) return MH_ENOMEM;
        if (mh_idlist_find(&f->have_snaps, sid) == MH_IDMAP_NONE && mh_idlist_add(&f->snap_ids, sid) < 0)
            return MH_ENOMEM;
    }
    return 0;
}

static int cmp_idz(const void *x, const void *y) { return memcmp(x, y, MH_ID_LEN); }

/* The sent commits whose parents were left out (SPEC 4.4 `shallow`): a
 * parent neither sent nor the client's. By id. */
static int plan_shallow(fetch_t *f)
{
    const mh_graph_t *g = f->g;
    f->shallow = mh_alloc(f->a, f->nsend * MH_ID_SIZE + 1);
    if (!f->shallow) return MH_ENOMEM;
    for (size_t i = 0; i < f->nsend; i++) {
        const mh_gnode_t *x = &g->nodes[f->send[i]];
        bool cut = false;
        for (int j = 0; j < 2; j++)
            cut |= x->p[j] != MH_GNONE && !(f->flags[x->p[j]] & (GW_SENT | MH_GW_HAVE));
        if (!cut) continue;
        mh_id_t cid;
        mh__graph_id(g, f->send[i], &cid);
        memcpy(f->shallow + (size_t)f->nshallow++ * MH_ID_SIZE, cid.s, MH_ID_SIZE);
    }
    if (f->nshallow > 1) qsort(f->shallow, f->nshallow, MH_ID_SIZE, cmp_idz);
    return 0;
}

static void step_walk(mh_step_t *s)
{
    fetch_t *f = F(s);
    mh_graph_t *g = f->g;
    f->flags = mh_calloc(f->a, g->n ? g->n : 1);
    f->send = mh_alloc(f->a, (g->n ? g->n : 1) * sizeof(uint32_t));
    if (!f->flags || !f->send) {
        mh_step_fail(s, MH_ENOMEM, "walk");
        return;
    }
    int rc = mh__graph_walk_ex(g, f->want_idx, f->nwant_idx, f->have_idx, f->nhave_idx, f->depth, f->flags, f->send,
                               &f->nsend);
    if (rc) {
        mh_step_fail(s, rc, "walk");
        return;
    }
    tmark(f, "walk");
    if (f->nsend == 0) { /* nothing to send: record the empty answer */
        mh_step_goto(s, S_RECORD);
        return;
    }
    /* Pack order: parents before children (generation), then by id. */
    qsort_r(f->send, f->nsend, sizeof *f->send, cmp_gen_id, g);
    for (size_t i = 0; i < f->nsend; i++) f->flags[f->send[i]] |= GW_SENT;
    if (plan_shallow(f) || plan_snapshots(f)) mh_step_fail(s, MH_ENOMEM, "walk");
}

/* --- S_ROWS: commit rows (in pack order) and snapshot delta rows, one
 * round trip */

static const mh_stmt_t st_commits = {
    "hub_fetch_commits",
    "SELECT c.commit_id, c.parent_commit_id, c.parent2_commit_id, c.snapshot_id, c.message, c.author,"
    " c.committed_at, r.branch, r.meta"
    " FROM commits c JOIN commit_refs r ON r.commit_id = c.commit_id AND r.repo_id = $2"
    " WHERE c.commit_id = ANY($1::text[]) ORDER BY c.generation, c.commit_id COLLATE \"C\"",
    2};

static const mh_stmt_t st_snapshots = {
    "hub_fetch_snapshots",
    "SELECT snapshot_id, parent_snapshot_id, delta_upsert, delta_remove FROM snapshots"
    " WHERE snapshot_id = ANY($1::text[])",
    1};

static char *dup_col(mh_arena_t *a, PGresult *res, int r, int c)
{
    return mh_pq_isnull(res, r, c) ? NULL : mh_strdup(a, mh_pq_str(res, r, c));
}

static int copy_commits(fetch_t *f, PGresult *res)
{
    if ((size_t)PQntuples(res) != f->nsend) return MH_ENOENT;
    f->commits = mh_calloc(f->a, f->nsend * sizeof *f->commits);
    if (!f->commits) return MH_ENOMEM;
    for (size_t i = 0; i < f->nsend; i++) {
        crow_t *c = &f->commits[i];
        int r = (int)i;
        char **cols[8] = {&c->commit_id, &c->p1,     &c->p2,           &c->snap,
                          &c->message,   &c->author, &c->committed_at, &c->branch};
        for (int k = 0; k < 8; k++)
            if (!(*cols[k] = dup_col(f->a, res, r, k)) && !mh_pq_isnull(res, r, k)) return MH_ENOMEM;
        if (!c->commit_id || !c->snap || !c->message || !c->author || !c->committed_at || !c->branch) return MH_EPARSE;
        int brc = mh_pq_isnull(res, r, 8) ? 0 : mh_pq_bytea(f->a, res, r, 8, &c->meta, &c->metan);
        if (brc) return brc == MH_ENOMEM ? brc : MH_EPARSE;
        /* An empty meta map adds no keys: splice nothing. */
        if (c->metan == 1 && c->meta[0] == 0x80) c->metan = 0;
    }
    return 0;
}

static int copy_snapshots(fetch_t *f, PGresult *res)
{
    f->snaps = mh_calloc(f->a, (f->snap_ids.n + 1) * sizeof *f->snaps);
    if (!f->snaps) return MH_ENOMEM;
    size_t found = 0;
    for (int r = 0; r < PQntuples(res); r++) {
        const char *id = mh_pq_str(res, r, 0);
        uint32_t ix = mh_id_valid(id, strlen(id)) ? mh_idlist_find(&f->snap_ids, id) : MH_IDMAP_NONE;
        if (ix == MH_IDMAP_NONE || f->snaps[ix].id) continue;
        snap_t *s = &f->snaps[ix];
        s->id = f->snap_ids.ids[ix];
        /* A parent lost to ENOMEM would turn the delta into a root and
         * build (and cache) a wrong pack. */
        if (!(s->parent = dup_col(f->a, res, r, 1)) && !mh_pq_isnull(res, r, 1)) return MH_ENOMEM;
        if (s->parent && !mh_id_valid(s->parent, strlen(s->parent))) return MH_EPARSE;
        int brc = mh_pq_bytea(f->a, res, r, 2, &s->up, &s->upn);
        if (!brc) brc = mh_pq_bytea(f->a, res, r, 3, &s->rm, &s->rmn);
        if (brc) return brc == MH_ENOMEM ? brc : MH_EPARSE;
        found++;
    }
    return found == f->snap_ids.n ? 0 : MH_ENOENT;
}

static int rows_read(mh_step_t *s, PGresult **res, int n)
{
    fetch_t *f = F(s);
    (void)n;
    /* Missing or malformed stored rows are the server's fault. */
    int rc = copy_commits(f, res[0]);
    if (rc) mh_step_fail(s, rc == MH_ENOMEM ? rc : MH_EDB, "commit rows missing or malformed");
    else if ((rc = copy_snapshots(f, res[1])))
        mh_step_fail(s, rc == MH_ENOMEM ? rc : MH_EDB, "snapshot rows missing or malformed");
    else tmark(f, "rows");
    return 0;
}

static void step_rows(mh_step_t *s)
{
    fetch_t *f = F(s);
    const char **ids = mh_alloc(f->a, f->nsend * sizeof *ids);
    if (!ids) {
        mh_step_fail(s, MH_ENOMEM, "rows");
        return;
    }
    for (size_t i = 0; i < f->nsend; i++) {
        mh_id_t cid;
        mh__graph_id(f->g, f->send[i], &cid);
        if (!(ids[i] = mh_strndup(f->a, cid.s, MH_ID_LEN))) {
            mh_step_fail(s, MH_ENOMEM, "rows");
            return;
        }
    }
    const char *commits = mh_pq_array(f->a, ids, f->nsend, MH_ID_LEN);
    const char *snaps = mh_pq_array(f->a, f->snap_ids.ids, f->snap_ids.n, MH_ID_LEN);
    if (!commits || !snaps) {
        mh_step_fail(s, MH_ENOMEM, "rows");
        return;
    }
    mh_db_batch_t b = {0};
    mh_db_batch_stmt(&b, &st_commits, commits, f->op.repo->repo_id); /* branch and metadata are this repository's */
    mh_db_batch_stmt(&b, &st_snapshots, snaps);
    mh_step_batch(s, &b, rows_read);
}

/* --- S_MANIFESTS: delta or root per snapshot; the manifests of the have
 * tips (their objects are not sent) and of roots whose stored parent the
 * client lacks (sent whole), loaded in parallel. */

static void manifest_loaded(void *ud, int err, const char *why)
{
    fetch_t *f = ud;
    if (err && !f->perr) {
        f->perr = mh__manifest_err(err);
        f->pwhy = why ? mh_strdup(f->a, why) : NULL;
    }
    if (--f->pending > 0) return;
    if (!f->perr) tmark(f, "manifests");
    mh_step_resume(&f->op.step, f->perr, f->pwhy ? f->pwhy : "manifest");
}

static int start_manifest(fetch_t *f, const char *sid, mh_manifest_t **out)
{
    mh_manifest_t *m = mh_calloc(f->a, sizeof *m);
    if (!m || mh_arena_defer(f->a, free_manifest_cb, m)) return MH_ENOMEM;
    *out = m;
    f->pending++;
    mh_hub_load_manifest(f->op.hub, f->a, sid, m, manifest_loaded, f);
    return 0;
}

static void step_manifests(mh_step_t *s)
{
    fetch_t *f = F(s);
    for (size_t i = 0; i < f->snap_ids.n; i++) {
        snap_t *sn = &f->snaps[i];
        if (!sn->parent) sn->kind = SNAP_ROOT_STORED;
        else if (mh_idlist_find(&f->have_snaps, sn->parent) != MH_IDMAP_NONE ||
                 mh_idlist_find(&f->snap_ids, sn->parent) != MH_IDMAP_NONE)
            sn->kind = SNAP_DELTA;
        else sn->kind = SNAP_ROOT_REBUILD;
    }
    /* Distinct snapshots of the have tips, at most MAX_HAVE_MANIFESTS:
     * subtracting fewer only sends more blobs, never too few. */
    mh_idlist_t tips;
    mh_idlist_init(&tips, f->a);
    f->havem = mh_calloc(f->a, (f->nhave_idx + 1) * sizeof *f->havem);
    if (!f->havem) {
        mh_step_fail(s, MH_ENOMEM, "manifests");
        return;
    }
    for (size_t i = 0; i < f->nhave_idx && tips.n < MAX_HAVE_MANIFESTS; i++) {
        const char *sid = snap_text(f, f->have_idx[i]);
        if (!sid || mh_idlist_add(&tips, sid) < 0) {
            mh_step_fail(s, MH_ENOMEM, "manifests");
            return;
        }
    }
    /* pending holds one extra count while loads are being started, so no
     * callback can complete the step early. */
    mh_step_wait(s);
    f->pending = 1;
    int rc = 0;
    for (size_t i = 0; i < tips.n && !rc; i++)
        if (!(rc = start_manifest(f, tips.ids[i], &f->havem[i]))) f->nhavem++;
    for (size_t i = 0; i < f->snap_ids.n && !rc; i++)
        if (f->snaps[i].kind == SNAP_ROOT_REBUILD) rc = start_manifest(f, f->snaps[i].id, &f->snaps[i].full);
    manifest_loaded(f, rc, "out of memory");
}

/* --- S_BLOBSET: the objects the sent snapshots add, minus those of the
 * have tips; and the order in which snapshots are written */

static int cmp_blob(const void *x, const void *y)
{
    return memcmp(((const blob_t *)x)->id, ((const blob_t *)y)->id, MH_ID_LEN);
}

static const void *blob_key(const void *ctx, uint32_t v) { return ((const fetch_t *)ctx)->blobs[v].id; }

/* Snapshots parent first: each snapshot is preceded by the chain of its
 * in-pack ancestors (DFS along stored parents, iterative). */
static int order_snapshots(fetch_t *f)
{
    size_t n = f->snap_ids.n;
    f->emit = mh_alloc(f->a, (n + 1) * sizeof *f->emit);
    uint32_t *stack = mh_alloc(f->a, (n + 1) * sizeof *stack);
    if (!f->emit || !stack) return MH_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        size_t sp = 0;
        uint32_t cur = (uint32_t)i;
        while (f->snaps[cur].mark == 0) {
            f->snaps[cur].mark = 1;
            stack[sp++] = cur;
            if (f->snaps[cur].kind != SNAP_DELTA) break;
            uint32_t p = mh_idlist_find(&f->snap_ids, f->snaps[cur].parent);
            if (p == MH_IDMAP_NONE) break;               /* the client has the parent */
            if (f->snaps[p].mark == 1) return MH_EPARSE; /* a cycle: corrupt rows */
            cur = p;
        }
        while (sp > 0) {
            uint32_t x = stack[--sp];
            f->snaps[x].mark = 2;
            f->emit[f->nemit++] = x;
        }
    }
    return 0;
}

/* Decodes each delta (encodes each rebuilt root) and counts the objects
 * the sent snapshots name. */
static int prepare_snapshots(fetch_t *f, size_t *count)
{
    *count = 0;
    for (size_t i = 0; i < f->snap_ids.n; i++) {
        snap_t *s = &f->snaps[i];
        if (s->kind == SNAP_ROOT_REBUILD) {
            s->full_mp = mh_calloc(f->a, sizeof *s->full_mp);
            if (!s->full_mp || mh_arena_defer(f->a, free_buf_cb, s->full_mp) || mh_manifest_encode(s->full, s->full_mp))
                return MH_ENOMEM;
            *count += s->full->n;
            continue;
        }
        const char *why = NULL;
        int rc = mh_msgpack_decode(f->a, s->up, s->upn, &mh_decode_limits_default, &s->upv, &why);
        if (rc == MH_ENOMEM) return rc;
        if (rc || s->upv.t != MH_V_MAP) return MH_EPARSE;
        *count += s->upv.v.m.n;
    }
    return 0;
}

/* Adds the objects snapshot s names that the have tips do not hold, each
 * with the path s has it at and age `age` (its place in the pack: the
 * first snapshot that adds a blob gives its place in path order). */
static int add_blobs(fetch_t *f, const snap_t *s, const mh_idlist_t *have, uint32_t age)
{
    size_t n = s->kind == SNAP_ROOT_REBUILD ? s->full->n : s->upv.v.m.n;
    for (size_t k = 0; k < n; k++) {
        const char *id, *path;
        uint32_t plen;
        if (s->kind == SNAP_ROOT_REBUILD) {
            id = s->full->e[k].id;
            path = s->full->e[k].path;
            plen = s->full->e[k].plen;
        } else {
            const mh_kv_t *kv = &s->upv.v.m.kv[k];
            const mh_val_t *v = &kv->v;
            if (v->t != MH_V_STR || v->v.s.n != MH_ID_LEN || !mh_id_valid(v->v.s.p, MH_ID_LEN) || kv->k.t != MH_V_STR)
                return MH_EPARSE;
            id = v->v.s.p;
            path = kv->k.v.s.p;
            plen = kv->k.v.s.n;
        }
        if (mh_idlist_find(have, id) != MH_IDMAP_NONE) continue;
        f->blobs[f->nblobs] = (blob_t){.id = id, .path = path, .plen = plen, .age = age};
        int added = mh_idmap_add(&f->blob_map, (uint32_t)f->nblobs, NULL);
        if (added < 0) return added;
        f->nblobs += (size_t)added;
    }
    return 0;
}

static void step_blobset(mh_step_t *s)
{
    fetch_t *f = F(s);
    size_t cap = 0;
    int rc = order_snapshots(f);
    if (!rc) rc = prepare_snapshots(f, &cap);
    mh_idlist_t have;
    mh_idlist_init(&have, f->a);
    for (size_t i = 0; i < f->nhavem && !rc; i++)
        for (size_t k = 0; k < f->havem[i]->n && !rc; k++) rc = mh_idlist_add(&have, f->havem[i]->e[k].id) < 0;
    f->blobs = rc ? NULL : mh_calloc(f->a, (cap + 1) * sizeof *f->blobs);
    mh_idmap_init(&f->blob_map, f->a, MH_ID_LEN, blob_key, f);
    if (!rc && !f->blobs) rc = MH_ENOMEM;
    /* Oldest first: the pack's order (parents first). */
    for (size_t i = 0; i < f->nemit && !rc; i++) rc = add_blobs(f, &f->snaps[f->emit[i]], &have, (uint32_t)i);
    if (rc) {
        mh_step_fail(s, rc == MH_ENOMEM ? rc : MH_EDB, "stored snapshots are corrupt");
        return;
    }
    /* By object id, and the map follows. */
    qsort(f->blobs, f->nblobs, sizeof *f->blobs, cmp_blob);
    mh_idmap_init(&f->blob_map, f->a, MH_ID_LEN, blob_key, f);
    for (size_t i = 0; i < f->nblobs && !rc; i++) rc = mh_idmap_add(&f->blob_map, (uint32_t)i, NULL) < 0;
    if (rc) {
        mh_step_fail(s, MH_ENOMEM, "blobset");
        return;
    }
    tmark(f, "blobset");
    if (!f->nblobs) mh_step_goto(s, S_BUILD);
}

/* --- S_LOCATE: each blob's source pack and byte range, through this
 * repository's object refs */

/* Every locate query returns, per row: object id, pack id, byte offset,
 * byte length (v1: in the file; v2: in the frame), then the frame of a v2
 * row (frame_no, data_offset, data_length, codec, size, blob_count: NULL
 * for v1), and for st_locate_all whether the pack is superseded. */
#define LOC_COLS "m.object_id, m.mpack_id, m.byte_offset, m.byte_length, m.frame_no, fr.data_offset, fr.data_length," \
                 " fr.codec, fr.size, fr.blob_count"
#define LOC_FRAME " LEFT JOIN mpack_frames fr ON fr.mpack_id = m.mpack_id AND fr.frame_no = m.frame_no"

/* Fetches of part of the history (incremental and shallow ones): one
 * probe per id, whatever the planner's statistics say — the best row of the
 * blob's index rows (a pack not superseded by GC first, then a v2 pack:
 * its frames are fewer bytes to read and are copied verbatim, where a raw
 * v1 copy another repository pushed would make a clone read ~20x the
 * bytes; then the smallest pack id, deterministic), if the repository
 * holds the blob (MH_SQL_HOLDS_BLOB). About 10 us per id. A set-based
 * join was cheaper per id when its plan was right, but with the
 * statistics a bulk push leaves (or a database of a few large packs) it
 * hash-joined a scan of every index row of every repository: 30 ms for
 * the 700 blobs of a depth-1 fetch among 52,250, 7 ms this way. The
 * cost follows the blobs asked for, however many the repository has. */
static const mh_stmt_t st_locate_few = {
    "hub_fetch_locate_few",
    "SELECT " LOC_COLS " FROM unnest($2::text[]) u(id)"
    " CROSS JOIN LATERAL (SELECT u.id AS object_id, m.mpack_id, m.byte_offset, m.byte_length, m.frame_no"
    " FROM mpack_index m LEFT JOIN mpacks p ON p.mpack_id = m.mpack_id WHERE m.object_id = u.id"
    " AND " MH_SQL_HOLDS_BLOB("$1", "u.id")
    " ORDER BY p.superseded_at IS NOT NULL, m.frame_no IS NULL, m.mpack_id COLLATE \"C\" LIMIT 1) m" LOC_FRAME,
    2};

/* Fetches covering most of the history (full clones): the index rows of
 * the repository's own packs, read by
 * pack without shipping an id array or probing per blob (the
 * repository's blobs are its packs', sql/0050; a pack a repository
 * references is not superseded), plus every index row of a blob only
 * object_refs_kept names. The rows needed and the best source per blob
 * are picked here (take_source); a blob two of its packs hold comes once
 * per pack. A v1-pushed repository reads its own raw packs until GC
 * rewrites them as v2, even where another repository holds the same
 * blobs in v2 frames (looking for those cost a probe per blob: 115 ms
 * of a 10,310-commit clone). */
static const mh_stmt_t st_locate_all = {
    "hub_fetch_locate_all",
    "SELECT " LOC_COLS ", p.superseded_at IS NOT NULL"
    " FROM (SELECT hi.* FROM mpack_refs hr JOIN mpack_index hi ON hi.mpack_id = hr.mpack_id WHERE hr.repo_id = $1"
    "  UNION ALL SELECT mi.* FROM object_refs_kept k JOIN mpack_index mi ON mi.object_id = k.object_id"
    "  WHERE k.repo_id = $1) m"
    " LEFT JOIN mpacks p ON p.mpack_id = m.mpack_id" LOC_FRAME,
    1};

/* Row r as the source of its blob, unless a better one is known: a live
 * pack, then a v2 one, then the smallest pack id (st_locate_few's ORDER BY). A v2 row whose
 * frame has no row is skipped (the object then reads as not indexed). */
static int take_source(fetch_t *f, PGresult *res, int r)
{
    const char *oid = mh_pq_str(res, r, 0), *mp = mh_pq_str(res, r, 1);
    uint32_t ix = mh_id_valid(oid, strlen(oid)) ? mh_idmap_find(&f->blob_map, oid) : MH_IDMAP_NONE;
    int64_t off = mh_pq_int(res, r, 2), len = mh_pq_int(res, r, 3);
    bool framed = !mh_pq_isnull(res, r, 4);
    if (ix == MH_IDMAP_NONE || !mh_id_valid(mp, strlen(mp)) || off < 0 || len < 0 || (framed && mh_pq_isnull(res, r, 5)))
        return 0;
    blob_t *b = &f->blobs[ix];
    bool sup = PQnfields(res) > 10 && strcmp(mh_pq_str(res, r, 10), "t") == 0;
    if (b->mpack) {
        /* The better source sorts first: (superseded, v1, pack id). */
        int c = (int)sup - (int)b->superseded;
        if (!c) c = (int)!framed - (int)!b->framed;
        if (!c) c = strcmp(mp, b->mpack);
        if (c >= 0) return 0;
    }
    if (!(b->mpack = mh_strdup(f->a, mp))) return MH_ENOMEM;
    b->superseded = sup;
    b->off = (uint64_t)off;
    b->len = (uint64_t)len;
    b->framed = framed;
    if (framed)
        b->fr = (mh_pb_frame_t){(uint32_t)mh_pq_int(res, r, 4), (uint64_t)mh_pq_int(res, r, 5),
                                (uint64_t)mh_pq_int(res, r, 6), (uint64_t)mh_pq_int(res, r, 8),
                                (uint32_t)mh_pq_int(res, r, 9),
                                strcmp(mh_pq_str(res, r, 7), "zstd") == 0 ? MH_PACK_ZSTD : MH_PACK_NONE};
    return 0;
}

static int located(mh_step_t *s, PGresult *res)
{
    fetch_t *f = F(s);
    for (int r = 0; r < PQntuples(res); r++)
        if (take_source(f, res, r)) return MH_ENOMEM;
    size_t missing = 0;
    for (size_t i = 0; i < f->nblobs; i++) {
        if (f->blobs[i].mpack) continue;
        if (!missing) mh_info("req %s: fetch: object %s has no mpack index row yet", f->op.req->id, f->blobs[i].id);
        missing++;
    }
    if (missing)
        mh_step_refuse(s, 503, "not_indexed", "%zu needed objects are not indexed yet; retry shortly", missing);
    else tmark(f, "locate");
    return 0;
}

static void step_locate(mh_step_t *s)
{
    fetch_t *f = F(s);
    mh_db_batch_t b = {0};
    if (f->nsend * 2 >= f->g->n) {
        mh_db_batch_stmt(&b, &st_locate_all, f->op.repo->repo_id);
    } else {
        const char **ids = mh_alloc(f->a, f->nblobs * sizeof *ids);
        if (!ids) {
            mh_step_fail(s, MH_ENOMEM, "locate");
            return;
        }
        for (size_t i = 0; i < f->nblobs; i++) ids[i] = f->blobs[i].id;
        const char *arr = mh_pq_array(f->a, ids, f->nblobs, MH_ID_LEN);
        if (!arr) {
            mh_step_fail(s, MH_ENOMEM, "locate");
            return;
        }
        mh_db_batch_stmt(&b, &st_locate_few, f->op.repo->repo_id, arr);
    }
    mh_step_query(s, &b.q[0], located);
}

/* --- S_BUILD: the pack, streamed by the builder into the store */

#define S(x) ((mh_str_t){(x), (x) ? strlen(x) : 0})

static void write_snapshot(fetch_t *f, mh_packw_t *w, const snap_t *s)
{
    static const uint8_t empty_arr[1] = {0x90};
    if (s->kind == SNAP_DELTA) mh_packw_snapshot(w, S(s->id), S(s->parent), s->up, s->upn, s->rm, s->rmn);
    else if (s->kind == SNAP_ROOT_STORED) mh_packw_snapshot(w, S(s->id), (mh_str_t){NULL, 0}, s->up, s->upn, s->rm, s->rmn);
    else mh_packw_snapshot(w, S(s->id), (mh_str_t){NULL, 0}, s->full_mp->p, s->full_mp->len, empty_arr, 1);
    (void)f;
}

/* The branches whose head is in this pack (a client can resolve every
 * head it is told about), sorted by name. */
static void write_branch_heads(fetch_t *f, mh_packw_t *w)
{
    uint32_t nb = 0;
    const mh_gbranch_t *br = f->g->branches;
    for (uint32_t i = 0; i < f->g->nbranches; i++) nb += br[i].node != MH_GNONE && (f->flags[br[i].node] & GW_SENT);
    mh_packw_branch_heads(w, nb);
    for (uint32_t i = 0; i < f->g->nbranches; i++)
        if (br[i].node != MH_GNONE && (f->flags[br[i].node] & GW_SENT))
            mh_packw_branch_head(w, S(br[i].name), (mh_str_t){br[i].head.s, MH_ID_LEN});
}

/* The builder's metadata callback (thread pool): commits, snapshots and
 * (v2) branch heads, resumable after any element once `room` bytes are
 * pending; v1's branch heads come after the blobs (MH_PB_META_TAIL). */
static int fetch_meta(void *ud, mh_packw_t *w, int part, size_t room, bool *done)
{
    fetch_t *f = ud;
    *done = false;
    if (part == MH_PB_META_TAIL) {
        if (w->version == 1) write_branch_heads(f, w);
        *done = true;
        return 0;
    }
    while (w->out->len < room && !w->err) {
        if (f->mphase == 0) {
            mh_packw_commits(w, (uint32_t)f->nsend);
            f->mphase = 1;
            f->mi = 0;
        } else if (f->mphase == 1 && f->mi < f->nsend) {
            const crow_t *c = &f->commits[f->mi++];
            mh_packw_commit(w, S(c->commit_id), S(c->p1), S(c->p2), S(c->snap), S(c->message), S(c->author),
                            S(c->committed_at), S(c->branch), c->metan ? c->meta : NULL, c->metan);
        } else if (f->mphase == 1) {
            mh_packw_snapshots(w, (uint32_t)f->nemit);
            f->mphase = 2;
            f->mi = 0;
        } else if (f->mi < f->nemit) {
            write_snapshot(f, w, &f->snaps[f->emit[f->mi++]]);
        } else {
            if (w->version == 2) write_branch_heads(f, w);
            *done = true;
            return 0;
        }
    }
    return 0;
}

#undef S

static void built_cb(void *ud, int err)
{
    fetch_t *f = ud;
    if (!err) {
        f->built = true;
        f->mpack_id = *mh_pb_id(f->pb);
        mh_pb_stats(f->pb, &f->st);
        tmark(f, "build");
    } else {
        mh_error("req %s: fetch: building the pack: %s", f->op.req->id, mh_pb_why(f->pb));
    }
    mh_step_resume(&f->op.step, err, err ? mh_pb_why(f->pb) : NULL);
}

static void step_build(mh_step_t *s)
{
    fetch_t *f = F(s);
    mh_hub_t *hub = f->op.hub;
    mh_pb_opts_t o = {.version = f->version, .level = (int)hub->cfg->zstd_level, .reuse_frames = true,
                      .meta_frame = true, .meta = fetch_meta, .meta_ud = f};
    int rc = mh_pb_new(&o, &f->pb);
    for (size_t i = 0; i < f->nblobs && !rc; i++) {
        const blob_t *b = &f->blobs[i];
        size_t ix;
        rc = mh_pb_add(f->pb, b->id, b->len, b->path, b->plen, b->age, &ix);
        if (!rc) rc = mh_pb_src_pack(f->pb, ix, b->mpack, b->framed ? &b->fr : NULL, b->off);
    }
    if (rc) {
        mh_step_fail(s, rc, "planning the pack");
        return;
    }
    mh_pb_env_t env = {hub->loop, hub->store, hub->budget, NULL, true};
    mh_step_wait(s);
    mh_pb_run(f->pb, &env, built_cb, f);
}

/* --- S_ACQUIRE .. S_COMMIT: the pack appears under its lock, with its
 * rows. The maintenance pass prunes old answers and supersedes their
 * packs; the sweep deletes a superseded pack under the same lock once no
 * row names it. Finishing the writer inside this transaction means an
 * identical pack being swept at the same moment is either gone before our
 * bytes appear, or sees our fetch_packs row and stays. Nothing to send:
 * no pack, only the answer row, straight on the pool. */

static void step_acquire(mh_step_t *s)
{
    fetch_t *f = F(s);
    if (!f->built) {
        mh_step_goto(s, S_RECORD);
        return;
    }
    mh_step_acquire(s);
}

static void step_begin(mh_step_t *s)
{
    fetch_t *f = F(s);
    mh_db_batch_t b = {0};
    mh_db_batch_add(&b, "BEGIN", 0);
    mh_db_batch_add(&b, mh_rw_sql_pack_lock, 1, f->mpack_id.s);
    mh_step_batch(s, &b, NULL);
}

static void stored_cb(void *ud, int err)
{
    fetch_t *f = ud;
    mh_step_resume(&f->op.step, err, err ? "storing the pack" : NULL);
}

static void step_put(mh_step_t *s)
{
    mh_step_wait(s);
    mh_pb_store(F(s)->pb, stored_cb, F(s));
}

/* The mpacks row (a cache pack: kind 'fetch'; a superseded one of the
 * same bytes is revived) and the shared answer row. */
static const mh_stmt_t st_ins_mpack = {
    "hub_fetch_ins_mpack",
    "INSERT INTO mpacks (mpack_id, size_bytes, kind) VALUES ($1, $2::bigint, 'fetch') ON CONFLICT (mpack_id) DO UPDATE"
    " SET superseded_at = NULL WHERE mpacks.kind = 'fetch' AND mpacks.superseded_at IS NOT NULL",
    2};

static const mh_stmt_t st_ins_answer = {
    "hub_fetch_ins_answer",
    "INSERT INTO fetch_packs (repo_id, state_seq, request_key, mpack_id, commit_count, snapshot_count, blob_count,"
    " mpack_version, depth, shallow) VALUES ($1, $2::bigint, $3, $4, $5::int, $6::int, $7::int, $8::smallint,"
    " $9::bigint, $10::text[]) ON CONFLICT DO NOTHING",
    10};

static int recorded(mh_step_t *s, PGresult **res, int n)
{
    (void)res;
    (void)n;
    fetch_t *f = F(s);
    tmark(f, "record");
    if (!f->built) mh_step_goto(s, S_ANSWER);
    return 0;
}

static void step_record(mh_step_t *s)
{
    fetch_t *f = F(s);
    answer_t *ans = &f->ans;
    memset(ans, 0, sizeof *ans);
    ans->version = f->version;
    ans->shallow = f->shallow;
    ans->nshallow = f->nshallow;
    ans->expires_at = mh_unix_time() + f->op.hub->cfg->fetch_cache_seconds;
    if (f->built) {
        memcpy(ans->mpack_id, f->mpack_id.s, MH_ID_SIZE);
        ans->commits = (uint32_t)f->nsend;
        ans->snapshots = (uint32_t)f->nemit;
        ans->blobs = (uint32_t)f->nblobs;
    }
    char size[24], seq[24], nc[12], ns[12], nb[12], ver[8], depth[24];
    snprintf(size, sizeof size, "%llu", (unsigned long long)f->st.bytes);
    snprintf(seq, sizeof seq, "%lld", (long long)f->seq);
    snprintf(nc, sizeof nc, "%u", ans->commits);
    snprintf(ns, sizeof ns, "%u", ans->snapshots);
    snprintf(nb, sizeof nb, "%u", ans->blobs);
    snprintf(ver, sizeof ver, "%d", f->version);
    snprintf(depth, sizeof depth, "%llu", (unsigned long long)f->depth);
    const char *shallow = NULL;
    if (f->nshallow) {
        const char **ids = mh_alloc(f->a, f->nshallow * sizeof *ids);
        for (uint32_t i = 0; ids && i < f->nshallow; i++) ids[i] = f->shallow + (size_t)i * MH_ID_SIZE;
        if (!ids || !(shallow = mh_pq_array(f->a, ids, f->nshallow, MH_ID_LEN))) {
            mh_step_fail(s, MH_ENOMEM, "record");
            return;
        }
    }
    mh_db_batch_t b = {0};
    if (f->built) mh_db_batch_stmt(&b, &st_ins_mpack, ans->mpack_id, size);
    mh_db_batch_stmt(&b, &st_ins_answer, f->op.repo->repo_id, seq, f->normkey, f->built ? ans->mpack_id : NULL, nc, ns,
                     nb, ver, f->depth ? depth : NULL, shallow);
    mh_step_batch(s, &b, recorded);
}

static void step_answer(mh_step_t *s) { mh_step_done(s); }

/* --- the protocol */

static const mh_step_def_t fetch_steps[] = {
    [S_GRAPH] = {"graph", step_graph},             /* the repository's commit graph */
    [S_RESOLVE] = {"resolve", step_resolve},       /* want/have to graph nodes; the normalised key */
    [S_LOOKUP] = {"lookup", step_lookup},          /* fetch_packs row of (repo, state, normalised key) */
    [S_WALK] = {"walk", step_walk},                /* want/have walk, snapshot plan */
    [S_ROWS] = {"rows", step_rows},                /* commit and snapshot rows */
    [S_MANIFESTS] = {"manifests", step_manifests}, /* of have tips and of roots without their parent */
    [S_BLOBSET] = {"blobset", step_blobset},       /* which blobs to send */
    [S_LOCATE] = {"locate", step_locate},          /* where they are */
    [S_BUILD] = {"build", step_build},             /* the pack, streamed into the store (writer left open) */
    [S_ACQUIRE] = {"acquire", step_acquire},       /* a connection for the transaction (a pack was built) */
    [S_BEGIN] = {"begin", step_begin},             /* BEGIN, the pack's lock */
    [S_PUT] = {"put", step_put},                   /* the pack appears under mpacks/ */
    [S_RECORD] = {"record", step_record},          /* mpacks + fetch_packs rows */
    [S_COMMIT] = {"commit", mh_step_commit},
    [S_ANSWER] = {"answer", step_answer},
};

/* ============================================================== handler */

static int cmp_str(const void *x, const void *y) { return strcmp(*(char *const *)x, *(char *const *)y); }

/* parse_ids's answer when the arena refuses: a 503, not the client's fault. */
static const char ids_oom[] = "out of memory";

/* Reads an array of ids: sorted, de-duplicated, NUL-terminated copies. */
static const char *parse_ids(mh_arena_t *a, const mh_val_t *body, const char *name, bool required, char ***out,
                             size_t *n)
{
    const mh_val_t *v = mh_val_get(body, name);
    *out = NULL;
    *n = 0;
    if (!v || v->t == MH_V_NIL) return required ? "is required" : NULL;
    if (v->t != MH_V_ARR) return "must be an array of commit ids";
    if (required && v->v.a.n == 0) return "must not be empty";
    if (v->v.a.n > MAX_IDS) return "has too many ids";
    char **ids = mh_alloc(a, (v->v.a.n + 1) * sizeof *ids);
    if (!ids) return ids_oom;
    for (uint32_t i = 0; i < v->v.a.n; i++) {
        const mh_val_t *x = &v->v.a.items[i];
        if (x->t != MH_V_STR || !mh_id_valid(x->v.s.p, x->v.s.n)) return "holds an id that is not sha256:<64 hex>";
        if (!(ids[i] = mh_strndup(a, x->v.s.p, x->v.s.n))) return ids_oom;
    }
    size_t k = 0;
    if (v->v.a.n) qsort(ids, v->v.a.n, sizeof *ids, cmp_str);
    for (uint32_t i = 0; i < v->v.a.n; i++)
        if (k == 0 || strcmp(ids[k - 1], ids[i]) != 0) ids[k++] = ids[i];
    *out = ids;
    *n = k;
    return NULL;
}

static void repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    fetch_t *f = req->user;
    f->op.repo = repo;
    f->seq = repo->state_seq;
    f->key = mh_sprintf(&req->arena, "%s|%lld|%s", repo->repo_id, (long long)repo->state_seq, f->reqkey);
    if (!f->key) {
        mh_res_fail(req, MH_ENOMEM, "fetch");
        return;
    }
    const answer_t *hit = mh__answer_get(f->op.hub, f->key);
    if (hit) {
        respond_answer(req, hit);
        return;
    }
    /* The same miss already being built: wait for its outcome. */
    int rc = mh__inflight_join(f->op.hub, f->key, req, &f->infl);
    if (rc) {
        if (rc < 0) mh_res_fail(req, rc, "fetch");
        return;
    }
    mh_step_run(&f->op.step);
}

/* `formats` (SPEC 4.4): the versions the client reads, default [1]; the
 * answer is the highest the server writes (1, 2). NULL, or the reason of
 * a 422. */
static const char *parse_formats(const mh_val_t *body, int *version)
{
    const mh_val_t *v = mh_val_get(body, "formats");
    *version = 1;
    if (!v || v->t == MH_V_NIL) return NULL;
    if (v->t != MH_V_ARR || v->v.a.n == 0 || v->v.a.n > MAX_FORMATS)
        return "formats must be a non-empty array of pack versions (integers)";
    int best = 0;
    for (uint32_t i = 0; i < v->v.a.n; i++) {
        const mh_val_t *x = &v->v.a.items[i];
        if (x->t != MH_V_UINT && x->t != MH_V_INT) return "formats must be a non-empty array of pack versions (integers)";
        if (x->t == MH_V_UINT && (x->v.u == 1 || x->v.u == 2) && (int)x->v.u > best) best = (int)x->v.u;
    }
    if (!best) return "formats lists no pack version this server writes (1, 2)";
    *version = best;
    return NULL;
}

/* `depth` (SPEC 4.4): absent or nil for the whole history, else an
 * integer 1 .. 2^31. */
static const char *parse_depth(const mh_val_t *body, uint64_t *depth)
{
    const mh_val_t *v = mh_val_get(body, "depth");
    *depth = 0;
    if (!v || v->t == MH_V_NIL) return NULL;
    if (v->t != MH_V_UINT || v->v.u < 1 || v->v.u > MAX_DEPTH) return "depth must be an integer from 1 to 2^31";
    *depth = v->v.u;
    return NULL;
}

static void fetch_cleanup(void *op) { mh_pb_free(((fetch_t *)op)->pb); }

static const mh__op_def_t fetch_def = {"fetch", MH__STEPS(fetch_steps), fetch_finish, fetch_cleanup,
                                       BUILD_ARENA_LIMIT};

void mh_h_fetch(mh_req_t *req)
{
    mh_val_t body;
    if (!mh_req_body_val(req, &body)) return;
    mh_arena_t *a = &req->arena;
    fetch_t *f = MH__OP_NEW(req, fetch_t, &fetch_def);
    if (!f) return;
    f->a = &f->op.work;
    f->t_mark = f->op.step.t0;
    if (body.t != MH_V_MAP) {
        mh_res_error(req, 422, "invalid_request", "the body must be a map {want, have}");
        return;
    }
    const char *list = "want ", *why = parse_ids(a, &body, "want", true, &f->want, &f->nwant);
    if (!why) {
        list = "have ";
        why = parse_ids(a, &body, "have", false, &f->have, &f->nhave);
    }
    if (!why) {
        list = "";
        if (!(why = parse_formats(&body, &f->version))) why = parse_depth(&body, &f->depth);
    }
    if (why == ids_oom ||
        (!why && ids_key(a, f->want, f->nwant, f->have, f->nhave, f->version, f->depth, NULL, f->reqkey))) {
        mh_res_fail(req, MH_ENOMEM, "fetch");
        return;
    }
    if (why) {
        mh_res_error(req, 422, "invalid_request", "%s%s", list, why);
        return;
    }
    mh_hub_load_repo(req, MH_PERM_READ, repo_cb);
}
