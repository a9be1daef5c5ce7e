/*
 * fetch.c — POST /{owner}/{slug}/fetch (SPEC 4.4, DESIGN 4 "Fetch"): the
 * want/have negotiation answered with a presigned URL of a v1 mpack built
 * from the repository's stored history, and the caches that make a
 * repeated fetch cost one repository lookup and one presign.
 *
 * Invariants:
 *  - Answers are cached by (repo_id, state_seq, request key), the key
 *    being SHA-256 over the sorted, de-duplicated want and have lists.
 *    First a per-process map keyed by the request as sent (the hot path:
 *    no query beyond the repository lookup); on a miss the commit graph
 *    (cached per process and state) resolves the ids and the fetch_packs
 *    table, shared by all processes, is asked with the key of the known
 *    ids only, so unknown haves neither force a rebuild nor add rows.
 *    Every branch move bumps state_seq: a cached answer always describes
 *    the state it was built for.
 *  - The same request on the same state builds the same bytes: commits by
 *    (generation, id), snapshots parent first in that order, blobs by
 *    object id, branch_heads (the branches whose head is in the pack) by
 *    name. So mpack_id is reproducible and concurrent builds in several
 *    processes store identical packs.
 *  - Commits and snapshots come from PostgreSQL only; blob bytes come from
 *    the source packs' recorded byte ranges (one ranged read per pack,
 *    coalesced by the store) and are never hashed again: only the whole
 *    new pack is hashed, to name it.
 *  - Access goes through this repository's ref rows only: wants must be
 *    in its commit graph (commit_refs), blobs are located through its
 *    object_refs.
 *  - Identical misses in flight are coalesced: the first request builds,
 *    later ones wait for its answer (or its error).
 *
 * The build is a state machine (DESIGN 3): callbacks record their result,
 * set the next state and call advance().
 */
#include "hub_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_IDS 10000            /* per list; a client sends tips, not histories */
#define MAX_HAVE_MANIFESTS 64    /* have tips whose objects are subtracted */
#define READS_IN_FLIGHT 8        /* source packs read concurrently */
#define POOL_THRESHOLD (256u << 10) /* blob bytes above which the build runs in the thread pool */
/* A build keeps row copies and decoded deltas in its own arena: the
 * request arena's 64 MiB cap is sized for API bodies, not for histories.
 * Blob bytes and the pack itself are heap buffers outside both. */
#define BUILD_ARENA_LIMIT ((size_t)1 << 30)
/* A walk flag of our own (mh_graph_walk uses the low four bits): the
 * commit is in the pack. */
#define GW_SENT 0x10

typedef mh__answer_t answer_t;
typedef struct fetch fetch_t;

/* =============================================================== helpers */


/* Id text (MH_ID_LEN bytes, borrowed) -> uint32: core's seeded id list
 * in the build arena, with a value per id. Do not copy once used. */
typedef struct {
    mh_idlist_t l;
    uint32_t *vals;
} idmap_t;

/* Room for at most `cap` keys (more are refused). */
static int idmap_init(mh_arena_t *a, idmap_t *m, size_t cap)
{
    mh_idlist_init(&m->l, a);
    m->vals = mh_alloc(a, (cap + 1) * sizeof *m->vals);
    m->l.ids = mh_alloc(a, (cap + 1) * sizeof *m->l.ids);
    m->l.cap = cap + 1;
    return m->vals && m->l.ids ? mh_idmap_reserve(&m->l.map, cap) : MH_ENOMEM;
}

static const uint32_t *idmap_get(const idmap_t *m, const char *id)
{
    uint32_t i = mh_idlist_find(&m->l, id);
    return i == MH_IDMAP_NONE ? NULL : &m->vals[i];
}

/* Inserts (id -> v) unless present; true when inserted. */
static bool idmap_put(idmap_t *m, const char *id, uint32_t v)
{
    if (m->l.n + 1 >= m->l.cap || mh_idlist_add(&m->l, id) != 1) return false;
    m->vals[m->l.n - 1] = v;
    return true;
}

/* The cache key of a request: SHA-256 (hex) of "want\n" + each want id +
 * "\n", then "have\n" + each have id + "\n", over lists already sorted
 * and de-duplicated. With g, haves that graph does not hold are left out:
 * they cannot change the answer, so garbage haves neither force a rebuild
 * nor add rows. */
static int ids_key(mh_arena_t *a, char *const *want, size_t nw, char *const *have, size_t nh, const mh_graph_t *g,
                   char out[65])
{
    char *buf = mh_alloc(a, 16 + (nw + nh) * (MH_ID_LEN + 1)), *p = buf;
    if (!buf) return MH_ENOMEM;
    memcpy(p, "want\n", 5);
    p += 5;
    for (size_t i = 0; i < nw; i++) {
        memcpy(p, want[i], MH_ID_LEN);
        p += MH_ID_LEN;
        *p++ = '\n';
    }
    memcpy(p, "have\n", 5);
    p += 5;
    for (size_t i = 0; i < nh; i++) {
        if (g && mh_graph_find(g, have[i]) == MH_GNONE) continue;
        memcpy(p, have[i], MH_ID_LEN);
        p += MH_ID_LEN;
        *p++ = '\n';
    }
    uint8_t d[32];
    mh_sha256(buf, (size_t)(p - buf), d);
    mh_hex_encode(out, d, 32);
    return 0;
}

static void free_manifest_cb(void *p) { mh_manifest_free(p); }
static void free_buf_cb(void *p) { mh_buf_free(p); }

/* ================================================================= state */

typedef enum { SNAP_DELTA, SNAP_ROOT_STORED, SNAP_ROOT_REBUILD } snap_kind_t;

typedef struct {
    char *id, *parent;   /* parent: stored parent id or NULL */
    uint8_t *up, *rm;    /* stored delta (msgpack map / array) */
    size_t upn, rmn;
    mh_val_t upv;        /* the upsert map, decoded */
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
    const char *id;  /* object id (borrowed from a delta or manifest) */
    char *mpack;     /* source pack id */
    bool superseded; /* that pack was replaced by GC (still readable) */
    uint64_t off, len;
    const uint8_t *content;
} blob_t;

typedef struct {
    fetch_t *f;
    char key[MH_MPACK_KEY_SIZE];
    uint32_t first, n;  /* f->order[first .. first+n) */
    mh_range_t *ranges;
    mh_buf_t *buf;
} src_t;

typedef enum {
    S_GRAPH,    /* the repository's commit graph */
    S_RESOLVE,  /* want/have ids to graph nodes; the normalised request key */
    S_LOOKUP,   /* fetch_packs row of (repo, state, normalised request) */
    S_WALK,     /* want/have walk, snapshot plan */
    S_ROWS,     /* commit and snapshot rows */
    S_MANIFESTS,/* manifests of have tips and of roots without their parent */
    S_BLOBSET,  /* which blobs to send */
    S_LOCATE,   /* where they are */
    S_READ,     /* their bytes */
    S_BUILD,    /* the pack */
    S_PUT,      /* into the store */
    S_RECORD,   /* mpacks + fetch_packs rows */
    S_ANSWER,
    S_WAIT,     /* an async step is running */
} fstate_t;

typedef struct {
    int status;
    const char *code;
    const char *detail;
    bool retry;
} ferr_t;

struct fetch {
    mh_req_t *req;
    mh_hub_t *hub;
    mh_arena_t *a;
    fstate_t state;
    mh_repo_t *repo;
    char **want, **have;
    size_t nwant, nhave;
    char reqkey[65];    /* SHA-256 of the request as sent (sorted, unique) */
    char normkey[65];   /* ... of the known ids only (unknown haves dropped) */
    char *key;          /* answer-cache key: repo_id|state_seq|reqkey */
    mh__inflight_t *infl; /* set on the request that builds */
    int64_t seq;        /* the state the answer describes */
    mh_graph_t *g;
    bool g_cached, g_reloaded;
    uint32_t *want_idx, *have_idx;
    size_t nwant_idx, nhave_idx;
    uint32_t *send;
    size_t nsend;
    uint8_t *flags;
    idmap_t have_snaps; /* snapshots of commits the client has */
    const char **snap_ids;
    size_t nsnap_ids;
    crow_t *commits;
    snap_t *snaps;      /* parallel to snap_ids */
    idmap_t snap_map;   /* snapshot id -> index in snaps */
    idmap_t blob_map;   /* object id -> index in blobs (sorted) */
    uint32_t *emit;     /* snapshot indices, parents first */
    size_t nemit;
    mh_manifest_t **havem;
    size_t nhavem;
    size_t pending;
    int perr;
    const char *pwhy;
    blob_t *blobs;
    size_t nblobs;
    uint32_t *order;    /* blob indices by (pack, offset) */
    src_t *srcs;
    size_t nsrcs, next_src, reads_inflight;
    uint64_t blob_bytes;
    mh_buf_t *pack;
    mh_id_t mpack_id;
    uv_work_t work;
    int build_err;
    answer_t ans;
    uint64_t t0, t_mark;
    char timing[256];
    size_t tlen;
};

static void advance(fetch_t *f);

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

/* ============================================================ responding */

static void respond_answer(mh_req_t *req, const answer_t *ans)
{
    mh_hub_t *hub = req->app;
    mh_arena_t *a = &req->arena;
    uint32_t ttl = mh__presign_ttl(hub);
    char *url = NULL;
    if (ans->mpack_id[0]) {
        int rc = mh__pack_url(hub, a, ans->mpack_id, &url, &ttl);
        if (rc) {
            mh_res_fail(req, rc, "presigning the pack");
            return;
        }
    }
    mh_val_t *m = mh_v_map(a);
    if (!m) {
        mh_res_fail(req, MH_ENOMEM, "answer");
        return;
    }
    char *mpack_id = ans->mpack_id[0] ? mh_strdup(a, ans->mpack_id) : NULL;
    int rc = ans->mpack_id[0] && !mpack_id ? MH_ENOMEM : 0; /* never answer an empty id */
    rc |= mh_map_put(a, m, "mpack_url", url ? mh_v_str(url) : mh_v_nil());
    rc |= mh_map_put(a, m, "mpack_id", mpack_id ? mh_v_str(mpack_id) : mh_v_nil());
    rc |= mh_map_put(a, m, "commit_count", mh_v_int(ans->commits));
    rc |= mh_map_put(a, m, "snapshot_count", mh_v_int(ans->snapshots));
    rc |= mh_map_put(a, m, "blob_count", mh_v_int(ans->blobs));
    rc |= mh_map_put(a, m, "object_count", mh_v_int(ans->blobs));
    rc |= mh_map_put(a, m, "expires_in", mh_v_int(ttl));
    if (rc) {
        mh_res_fail(req, MH_ENOMEM, "answer");
        return;
    }
    mh_res_val(req, 200, m);
}

static void respond_error(mh_req_t *req, const ferr_t *e)
{
    if (e->retry) mh_res_header(req, "Retry-After", "2");
    mh_res_error(req, e->status, e->code, "%s", e->detail);
}

/* The error table's answer for err (waiters get the same). */
static ferr_t err_of(int err)
{
    const mh_http_err_t *e = mh_http_err_of(err);
    return (ferr_t){e->status, e->code, e->detail, e->retry};
}

static void answer_each(mh_req_t *waiter, void *arg) { respond_answer(waiter, arg); }
static void error_each(mh_req_t *waiter, void *arg) { respond_error(waiter, arg); }

/* Removes the in-flight record of f (the builder) and answers every
 * waiter with the same outcome. */
static void wake_waiters(fetch_t *f, const answer_t *ans, const ferr_t *e)
{
    mh__inflight_t *x = f->infl;
    f->infl = NULL;
    if (ans) mh__inflight_done(f->hub, x, answer_each, (void *)ans);
    else mh__inflight_done(f->hub, x, error_each, (void *)e);
}

static void fail(fetch_t *f, ferr_t e)
{
    f->state = S_WAIT;
    respond_error(f->req, &e);
    wake_waiters(f, NULL, &e);
}

static void fail_err(fetch_t *f, int err, const char *what)
{
    if (err == MH_EDB || err == MH_EDBDOWN || err == MH_ETIMEDOUT || err == MH_ECONFLICT)
        mh_error("req %s: fetch: database: %s (%s)", f->req->id, mh_strerror(err), what ? what : "");
    else
        mh_error("req %s: fetch: %s (%s)", f->req->id, mh_strerror(err), what ? what : "");
    fail(f, err_of(err));
}

static void finish(fetch_t *f)
{
    /* Under the key this request was looked up with, and under the state
     * the answer was built for when the graph was newer. */
    char *key = mh_sprintf(f->a, "%s|%lld|%s", f->repo->repo_id, (long long)f->seq, f->reqkey);
    if (f->key) mh__answer_put(f->hub, f->key, &f->ans);
    if (key && (!f->key || strcmp(key, f->key) != 0)) mh__answer_put(f->hub, key, &f->ans);
    respond_answer(f->req, &f->ans);
    wake_waiters(f, &f->ans, NULL);
}

/* ============================================================= the steps */

/* Each step either starts one asynchronous operation (state S_WAIT; its
 * callback sets the next state and calls advance), finishes synchronously
 * (state = the next step), or fails (fail() answers; state S_WAIT). */

/* --- S_LOOKUP: the shared table of built answers */

static const mh_stmt_t st_lookup = {
    "hub_fetch_lookup",
    "SELECT mpack_id, commit_count, snapshot_count, blob_count FROM fetch_packs"
    " WHERE repo_id = $1 AND request_key = $2 AND state_seq = $3",
    3};

static void lookup_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    fetch_t *f = ud;
    if (err) {
        fail_err(f, err, errmsg);
        return;
    }
    if (PQntuples(res) == 1) {
        answer_t *ans = &f->ans;
        if (!mh_pq_isnull(res, 0, 0)) snprintf(ans->mpack_id, sizeof ans->mpack_id, "%s", mh_pq_str(res, 0, 0));
        ans->commits = (uint32_t)mh_pq_int(res, 0, 1);
        ans->snapshots = (uint32_t)mh_pq_int(res, 0, 2);
        ans->blobs = (uint32_t)mh_pq_int(res, 0, 3);
        tmark(f, "lookup_hit");
        f->state = S_ANSWER;
    } else {
        tmark(f, "lookup");
        f->state = S_WALK;
    }
    advance(f);
}

static void step_lookup(fetch_t *f)
{
    char seq[24];
    snprintf(seq, sizeof seq, "%lld", (long long)f->seq);
    const char *vals[3] = {f->repo->repo_id, f->normkey, seq};
    f->state = S_WAIT;
    mh_db_exec(f->hub->db, &st_lookup, vals, NULL, NULL, lookup_cb, f);
}

/* --- S_GRAPH: the repository's commit graph, cached per state */

static void graph_cb(void *ud, mh_graph_t *g, int err, const char *errmsg)
{
    fetch_t *f = ud;
    if (err) {
        if (err == MH_ENOENT) fail(f, (ferr_t){404, "not_found", "repository not found", false});
        else fail_err(f, err, errmsg);
        return;
    }
    if (mh_graph_hold(f->a, g)) {
        fail_err(f, MH_ENOMEM, "graph");
        return;
    }
    f->g = g;
    f->g_cached = false;
    tmark(f, "graph_load");
    f->state = S_RESOLVE;
    advance(f);
}

static void step_graph(fetch_t *f, bool force)
{
    mh_graph_t *g = force ? NULL : mh_graph_cache_get(f->hub, f->repo->repo_id, f->seq);
    if (g) {
        if (mh_graph_hold(f->a, g)) {
            fail_err(f, MH_ENOMEM, "graph");
            return;
        }
        f->g = g;
        f->g_cached = true;
        f->state = S_RESOLVE;
        return;
    }
    /* Forced or not, the load reads only the ref rows added since the
     * cached graph of this repository (graph.c), which include the one a
     * forced reload looks for. */
    f->state = S_WAIT;
    if (mh_graph_load(f->hub, f->a, f->repo->repo_id, graph_cb, f)) fail_err(f, MH_ENOMEM, "graph");
}

/* --- S_WALK: resolve ids, walk, list the snapshots to send */

static int cmp_gen_id(const void *x, const void *y, void *arg)
{
    const mh_graph_t *g = arg;
    const mh_gnode_t *a = &g->nodes[*(const uint32_t *)x], *b = &g->nodes[*(const uint32_t *)y];
    if (a->gen != b->gen) return a->gen < b->gen ? -1 : 1;
    return memcmp(a->id, b->id, 32);
}

static int plan_snapshots(fetch_t *f)
{
    mh_graph_t *g = f->g;
    mh_arena_t *a = f->a;
    /* Snapshots the client has: those of every commit the walk met on the
     * have side (the have tips, their ancestors down to the frontier). */
    size_t nh = 0;
    for (uint32_t i = 0; i < g->n; i++) nh += (f->flags[i] & MH_GW_HAVE) != 0;
    if (idmap_init(a, &f->have_snaps, nh)) return MH_ENOMEM;
    for (uint32_t i = 0; i < g->n; i++) {
        if (!(f->flags[i] & MH_GW_HAVE)) continue;
        mh_id_t sid;
        mh_graph_snap_id(g, i, &sid);
        if (idmap_get(&f->have_snaps, sid.s)) continue;
        char *s = mh_strndup(a, sid.s, MH_ID_LEN);
        if (!s) return MH_ENOMEM;
        idmap_put(&f->have_snaps, s, i);
    }
    /* Snapshots to send: those of the sent commits, once each, in commit
     * order, unless the client has them already. */
    f->snap_ids = mh_alloc(a, f->nsend * sizeof *f->snap_ids);
    if (!f->snap_ids || idmap_init(a, &f->snap_map, f->nsend)) return MH_ENOMEM;
    for (size_t i = 0; i < f->nsend; i++) {
        mh_id_t sid;
        mh_graph_snap_id(g, f->send[i], &sid);
        if (idmap_get(&f->have_snaps, sid.s) || idmap_get(&f->snap_map, sid.s)) continue;
        char *s = mh_strndup(a, sid.s, MH_ID_LEN);
        if (!s) return MH_ENOMEM;
        idmap_put(&f->snap_map, s, (uint32_t)f->nsnap_ids);
        f->snap_ids[f->nsnap_ids++] = s;
    }
    return 0;
}

static void step_resolve(fetch_t *f)
{
    mh_graph_t *g = f->g;
    mh_arena_t *a = f->a;
    f->want_idx = mh_alloc(a, (f->nwant + 1) * sizeof(uint32_t));
    f->have_idx = mh_alloc(a, (f->nhave + 1) * sizeof(uint32_t));
    if (!f->want_idx || !f->have_idx) { fail_err(f, MH_ENOMEM, "resolve"); return; }
    f->nwant_idx = f->nhave_idx = 0;
    for (size_t i = 0; i < f->nwant; i++) {
        uint32_t x = mh_graph_find(g, f->want[i]);
        if (x == MH_GNONE) {
            /* A cached graph could predate a ref row added without a
             * branch move: ask the database once more before a 404. */
            if (f->g_cached && !f->g_reloaded) {
                f->g_reloaded = true;
                step_graph(f, true);
                return;
            }
            fail(f, (ferr_t){404, "not_found", "a wanted commit is not in this repository", false});
            return;
        }
        f->want_idx[f->nwant_idx++] = x;
    }
    for (size_t i = 0; i < f->nhave; i++) {
        uint32_t x = mh_graph_find(g, f->have[i]);
        if (x != MH_GNONE) f->have_idx[f->nhave_idx++] = x; /* unknown haves are ignored */
    }
    /* The answer describes the state the graph was read at. */
    f->seq = g->state_seq;
    if (ids_key(a, f->want, f->nwant, f->have, f->nhave, g, f->normkey)) { fail_err(f, MH_ENOMEM, "resolve"); return; }
    tmark(f, "resolve");
    f->state = S_LOOKUP;
}

static void step_walk(fetch_t *f)
{
    mh_graph_t *g = f->g;
    mh_arena_t *a = f->a;
    f->flags = mh_calloc(a, g->n ? g->n : 1);
    f->send = mh_alloc(a, (g->n ? g->n : 1) * sizeof(uint32_t));
    if (!f->flags || !f->send) { fail_err(f, MH_ENOMEM, "walk"); return; }
    int rc = mh_graph_walk(g, f->want_idx, f->nwant_idx, f->have_idx, f->nhave_idx, f->flags, f->send, &f->nsend);
    if (rc) { fail_err(f, rc, "walk"); return; }
    if (f->nsend == 0) {
        tmark(f, "walk");
        f->state = S_RECORD; /* nothing to send: record the empty answer */
        return;
    }
    /* Pack order: parents before children (generation), then by id. */
    qsort_r(f->send, f->nsend, sizeof *f->send, cmp_gen_id, g);
    for (size_t i = 0; i < f->nsend; i++) f->flags[f->send[i]] |= GW_SENT;
    rc = plan_snapshots(f);
    if (rc) { fail_err(f, rc, "walk"); return; }
    tmark(f, "walk");
    f->state = S_ROWS;
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
    mh_arena_t *a = f->a;
    if ((size_t)PQntuples(res) != f->nsend) return MH_ENOENT;
    f->commits = mh_calloc(a, f->nsend * sizeof *f->commits);
    if (!f->commits) return MH_ENOMEM;
    for (size_t i = 0; i < f->nsend; i++) {
        crow_t *c = &f->commits[i];
        int r = (int)i;
        char **cols[8] = {&c->commit_id, &c->p1, &c->p2, &c->snap, &c->message, &c->author, &c->committed_at,
                          &c->branch};
        for (int k = 0; k < 8; k++) {
            *cols[k] = dup_col(a, res, r, k);
            if (!*cols[k] && !mh_pq_isnull(res, r, k)) return MH_ENOMEM;
        }
        if (!c->commit_id || !c->snap || !c->message || !c->author || !c->committed_at || !c->branch)
            return MH_EPARSE;
        int brc = mh_pq_isnull(res, r, 8) ? 0 : mh_pq_bytea(a, res, r, 8, &c->meta, &c->metan);
        if (brc) return brc == MH_ENOMEM ? brc : MH_EPARSE;
        /* An empty meta map adds no keys: splice nothing. */
        if (c->metan == 1 && c->meta[0] == 0x80) c->metan = 0;
    }
    return 0;
}

static int copy_snapshots(fetch_t *f, PGresult *res)
{
    mh_arena_t *a = f->a;
    f->snaps = mh_calloc(a, (f->nsnap_ids ? f->nsnap_ids : 1) * sizeof *f->snaps);
    if (!f->snaps) return MH_ENOMEM;
    int rows = PQntuples(res);
    size_t found = 0;
    for (int r = 0; r < rows; r++) {
        const char *id = mh_pq_str(res, r, 0);
        if (!mh_id_valid(id, strlen(id))) continue;
        const uint32_t *ix = idmap_get(&f->snap_map, id);
        if (!ix || f->snaps[*ix].id) continue;
        snap_t *s = &f->snaps[*ix];
        s->id = (char *)f->snap_ids[*ix];
        s->parent = dup_col(a, res, r, 1);
        /* A parent lost to ENOMEM would turn the delta into a root and
         * build (and cache) a wrong pack. */
        if (!s->parent && !mh_pq_isnull(res, r, 1)) return MH_ENOMEM;
        if (s->parent && !mh_id_valid(s->parent, strlen(s->parent))) return MH_EPARSE;
        int brc = mh_pq_bytea(a, res, r, 2, &s->up, &s->upn);
        if (!brc) brc = mh_pq_bytea(a, res, r, 3, &s->rm, &s->rmn);
        if (brc) return brc == MH_ENOMEM ? brc : MH_EPARSE;
        found++;
    }
    return found == f->nsnap_ids ? 0 : MH_ENOENT;
}

static void rows_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    fetch_t *f = ud;
    (void)n;
    if (err) { fail_err(f, err, errmsg); return; }
    int rc = copy_commits(f, results[0]);
    if (rc) { fail_err(f, rc == MH_ENOMEM ? rc : MH_EDB, "commit rows missing or malformed"); return; }
    rc = copy_snapshots(f, results[1]);
    if (rc) { fail_err(f, rc == MH_ENOMEM ? rc : MH_EDB, "snapshot rows missing or malformed"); return; }
    tmark(f, "rows");
    f->state = S_MANIFESTS;
    advance(f);
}

static void step_rows(fetch_t *f)
{
    mh_arena_t *a = f->a;
    const char **ids = mh_alloc(a, f->nsend * sizeof *ids);
    const char **v1 = mh_alloc(a, 2 * sizeof *v1), **v2 = mh_alloc(a, sizeof *v2);
    if (!ids || !v1 || !v2) { fail_err(f, MH_ENOMEM, "rows"); return; }
    for (size_t i = 0; i < f->nsend; i++) {
        mh_id_t cid;
        mh_graph_id(f->g, f->send[i], &cid);
        if (!(ids[i] = mh_strndup(a, cid.s, MH_ID_LEN))) { fail_err(f, MH_ENOMEM, "rows"); return; }
    }
    v1[0] = mh_pq_array(a, ids, f->nsend, MH_ID_LEN);
    v1[1] = f->repo->repo_id; /* branch and metadata are this repository's */
    v2[0] = mh_pq_array(a, f->snap_ids, f->nsnap_ids, MH_ID_LEN);
    if (!v1[0] || !v2[0]) { fail_err(f, MH_ENOMEM, "rows"); return; }
    mh_db_pq_t qs[2] = {
        {.stmt = &st_commits, .nparams = 2, .vals = v1},
        {.stmt = &st_snapshots, .nparams = 1, .vals = v2},
    };
    f->state = S_WAIT;
    mh_db_pipeline(f->hub->db, qs, 2, rows_cb, f);
}

/* --- S_MANIFESTS: delta or root per snapshot; the manifests of the have
 * tips (their objects are not sent) and of roots whose stored parent the
 * client lacks (sent whole). */

static void manifest_done(fetch_t *f)
{
    if (--f->pending > 0) return;
    if (f->perr) {
        int e = f->perr;
        /* Missing or corrupt stored history is a server fault, not the
         * client's. */
        if (e == MH_ENOENT || e == MH_EHASH || e == MH_EPARSE || e == MH_ELIMIT || e == MH_EINVAL) e = MH_EDB;
        { fail_err(f, e, f->pwhy ? f->pwhy : "manifest"); return; }
    }
    tmark(f, "manifests");
    f->state = S_BLOBSET;
    advance(f);
}

static void manifest_cb(void *ud, int err, const char *why)
{
    fetch_t *f = ud;
    if (err && !f->perr) {
        f->perr = err;
        f->pwhy = why ? mh_strdup(f->a, why) : NULL;
    }
    manifest_done(f);
}

static int start_manifest(fetch_t *f, const char *sid, mh_manifest_t **out)
{
    mh_manifest_t *m = mh_calloc(f->a, sizeof *m);
    if (!m || mh_arena_defer(f->a, free_manifest_cb, m)) return MH_ENOMEM;
    *out = m;
    f->pending++;
    mh_hub_load_manifest(f->hub, f->a, sid, m, manifest_cb, f);
    return 0;
}

static void step_manifests(fetch_t *f)
{
    for (size_t i = 0; i < f->nsnap_ids; i++) {
        snap_t *s = &f->snaps[i];
        if (!s->parent) s->kind = SNAP_ROOT_STORED;
        else if (idmap_get(&f->have_snaps, s->parent) || idmap_get(&f->snap_map, s->parent)) s->kind = SNAP_DELTA;
        else s->kind = SNAP_ROOT_REBUILD;
    }
    /* Distinct snapshots of the have tips, at most MAX_HAVE_MANIFESTS:
     * subtracting fewer only sends more blobs, never too few. */
    const char **hs = mh_alloc(f->a, (f->nhave_idx + 1) * sizeof *hs);
    f->havem = mh_calloc(f->a, (f->nhave_idx + 1) * sizeof *f->havem);
    idmap_t seen;
    if (!hs || !f->havem || idmap_init(f->a, &seen, f->nhave_idx + 1)) { fail_err(f, MH_ENOMEM, "manifests"); return; }
    size_t nhs = 0;
    for (size_t i = 0; i < f->nhave_idx && nhs < MAX_HAVE_MANIFESTS; i++) {
        mh_id_t sid;
        mh_graph_snap_id(f->g, f->have_idx[i], &sid);
        char *s = mh_strndup(f->a, sid.s, MH_ID_LEN);
        if (!s) { fail_err(f, MH_ENOMEM, "manifests"); return; }
        if (idmap_put(&seen, s, 0)) hs[nhs++] = s;
    }
    /* pending holds one extra count while loads are being started, so no
     * callback can complete the step early. */
    f->state = S_WAIT;
    f->pending = 1;
    int rc = 0;
    for (size_t i = 0; i < nhs && !rc; i++) {
        rc = start_manifest(f, hs[i], &f->havem[i]);
        if (!rc) f->nhavem++;
    }
    for (size_t i = 0; i < f->nsnap_ids && !rc; i++)
        if (f->snaps[i].kind == SNAP_ROOT_REBUILD) rc = start_manifest(f, f->snaps[i].id, &f->snaps[i].full);
    if (rc && !f->perr) {
        f->perr = rc;
        f->pwhy = "out of memory";
    }
    manifest_done(f);
}

/* --- S_BLOBSET: the objects the sent snapshots add, minus those of the
 * have tips; and the order in which snapshots are written */

static int cmp_blob(const void *x, const void *y)
{
    return memcmp(((const blob_t *)x)->id, ((const blob_t *)y)->id, MH_ID_LEN);
}

static bool valid_oid(const mh_val_t *v)
{
    return v->t == MH_V_STR && v->v.s.n == MH_ID_LEN && mh_id_valid(v->v.s.p, MH_ID_LEN);
}

/* Snapshots parent first: each snapshot is preceded by the chain of its
 * in-pack ancestors (DFS along stored parents, iterative). */
static int order_snapshots(fetch_t *f)
{
    f->emit = mh_alloc(f->a, (f->nsnap_ids + 1) * sizeof *f->emit);
    uint32_t *stack = mh_alloc(f->a, (f->nsnap_ids + 1) * sizeof *stack);
    if (!f->emit || !stack) return MH_ENOMEM;
    for (size_t i = 0; i < f->nsnap_ids; i++) {
        size_t sp = 0;
        uint32_t cur = (uint32_t)i;
        while (f->snaps[cur].mark == 0) {
            f->snaps[cur].mark = 1;
            stack[sp++] = cur;
            if (f->snaps[cur].kind != SNAP_DELTA) break;
            const uint32_t *p = idmap_get(&f->snap_map, f->snaps[cur].parent);
            if (!p) break; /* the client has the parent */
            if (f->snaps[*p].mark == 1) return MH_EPARSE; /* a cycle: corrupt rows */
            cur = *p;
        }
        while (sp > 0) {
            uint32_t x = stack[--sp];
            f->snaps[x].mark = 2;
            f->emit[f->nemit++] = x;
        }
    }
    return 0;
}

static void step_blobset(fetch_t *f)
{
    mh_arena_t *a = f->a;
    int rc = order_snapshots(f);
    if (rc) { fail_err(f, rc == MH_ENOMEM ? rc : MH_EDB, "snapshot parent cycle"); return; }
    size_t cap = 0;
    for (size_t i = 0; i < f->nsnap_ids; i++) {
        snap_t *s = &f->snaps[i];
        if (s->kind == SNAP_ROOT_REBUILD) {
            s->full_mp = mh_calloc(a, sizeof *s->full_mp);
            if (!s->full_mp || mh_arena_defer(a, free_buf_cb, s->full_mp) || mh_manifest_encode(s->full, s->full_mp))
                { fail_err(f, MH_ENOMEM, "blobset"); return; }
            cap += s->full->n;
            continue;
        }
        const char *why = NULL;
        rc = mh_msgpack_decode(a, s->up, s->upn, &mh_decode_limits_default, &s->upv, &why);
        if (rc || s->upv.t != MH_V_MAP) { fail_err(f, rc == MH_ENOMEM ? rc : MH_EDB, "stored delta is corrupt"); return; }
        cap += s->upv.v.m.n;
    }
    size_t hcap = 0;
    for (size_t i = 0; i < f->nhavem; i++) hcap += f->havem[i]->n;
    idmap_t have_objs, set;
    if (idmap_init(a, &have_objs, hcap) || idmap_init(a, &set, cap + 1))
        { fail_err(f, MH_ENOMEM, "blobset"); return; }
    for (size_t i = 0; i < f->nhavem; i++)
        for (size_t k = 0; k < f->havem[i]->n; k++) idmap_put(&have_objs, f->havem[i]->e[k].id, 0);
    f->blobs = mh_calloc(a, (cap + 1) * sizeof *f->blobs);
    if (!f->blobs) { fail_err(f, MH_ENOMEM, "blobset"); return; }
    for (size_t i = 0; i < f->nsnap_ids; i++) {
        snap_t *s = &f->snaps[i];
        size_t n = s->kind == SNAP_ROOT_REBUILD ? s->full->n : s->upv.v.m.n;
        for (size_t k = 0; k < n; k++) {
            const char *id;
            if (s->kind == SNAP_ROOT_REBUILD) {
                id = s->full->e[k].id;
            } else {
                const mh_val_t *v = &s->upv.v.m.kv[k].v;
                if (!valid_oid(v)) { fail_err(f, MH_EDB, "stored delta names a malformed object id"); return; }
                id = v->v.s.p;
            }
            if (idmap_get(&have_objs, id)) continue;
            if (idmap_put(&set, id, 0)) f->blobs[f->nblobs++].id = id;
        }
    }
    qsort(f->blobs, f->nblobs, sizeof *f->blobs, cmp_blob);
    if (idmap_init(a, &f->blob_map, f->nblobs + 1)) { fail_err(f, MH_ENOMEM, "blobset"); return; }
    for (size_t i = 0; i < f->nblobs; i++) idmap_put(&f->blob_map, f->blobs[i].id, (uint32_t)i);
    tmark(f, "blobset");
    f->state = f->nblobs ? S_LOCATE : S_BUILD;
}

/* --- S_LOCATE: each blob's source pack and byte range, through this
 * repository's object refs */

/* DISTINCT ON keeps one row per object: a pack not superseded by GC
 * first, then the smallest pack id (deterministic). About 2.5x faster
 * than a LATERAL ... LIMIT 1 per object on the seed-000 clone. */
static const mh_stmt_t st_locate = {
    "hub_fetch_locate",
    "SELECT DISTINCT ON (m.object_id COLLATE \"C\") m.object_id, m.mpack_id, m.byte_offset, m.byte_length"
    " FROM object_refs r JOIN mpack_index m ON m.object_id = r.object_id"
    " LEFT JOIN mpacks p ON p.mpack_id = m.mpack_id"
    " WHERE r.repo_id = $1 AND r.object_id = ANY($2::text[])"
    " ORDER BY m.object_id COLLATE \"C\", p.superseded_at IS NOT NULL, m.mpack_id COLLATE \"C\"",
    2};

/* For small blob sets (incremental fetches): one index probe per id,
 * whatever the planner's statistics say. Right after a bulk push they are
 * stale (estimates of one row), and the set-based form above then scans
 * the repository's whole object_refs range: 18 ms instead of 1.5 ms for
 * 50 ids among 27,000. */
#define LOCATE_FEW 256
static const mh_stmt_t st_locate_few = {
    "hub_fetch_locate_few",
    "SELECT u.id, i.mpack_id, i.byte_offset, i.byte_length FROM unnest($2::text[]) u(id)"
    " CROSS JOIN LATERAL (SELECT m.mpack_id, m.byte_offset, m.byte_length FROM mpack_index m"
    " LEFT JOIN mpacks p ON p.mpack_id = m.mpack_id WHERE m.object_id = u.id"
    " AND EXISTS (SELECT 1 FROM object_refs r WHERE r.repo_id = $1 AND r.object_id = u.id)"
    " ORDER BY p.superseded_at IS NOT NULL, m.mpack_id COLLATE \"C\" LIMIT 1) i",
    2};

/* For fetches covering most of the history (full clones): every index row
 * of the repository, without shipping a large id array; the rows needed
 * and the best source per object are picked here. */
static const mh_stmt_t st_locate_all = {
    "hub_fetch_locate_all",
    "SELECT m.object_id, m.mpack_id, m.byte_offset, m.byte_length, p.superseded_at IS NOT NULL"
    " FROM object_refs r JOIN mpack_index m ON m.object_id = r.object_id"
    " LEFT JOIN mpacks p ON p.mpack_id = m.mpack_id WHERE r.repo_id = $1",
    1};

static void locate_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    fetch_t *f = ud;
    if (err) { fail_err(f, err, errmsg); return; }
    int rows = PQntuples(res);
    for (int r = 0; r < rows; r++) {
        const char *oid = mh_pq_str(res, r, 0);
        if (!mh_id_valid(oid, strlen(oid))) continue;
        const uint32_t *ix = idmap_get(&f->blob_map, oid);
        if (!ix) continue;
        blob_t *b = &f->blobs[*ix];
        const char *mp = mh_pq_str(res, r, 1);
        int64_t off = mh_pq_int(res, r, 2), len = mh_pq_int(res, r, 3);
        bool sup = PQnfields(res) > 4 && strcmp(mh_pq_str(res, r, 4), "t") == 0;
        if (!mh_id_valid(mp, strlen(mp)) || off < 0 || len < 0) continue;
        /* Same choice as st_locate's ORDER BY: a live pack, then the
         * smallest pack id. */
        if (b->mpack && (sup > b->superseded || (sup == b->superseded && strcmp(mp, b->mpack) >= 0))) continue;
        if (!(b->mpack = mh_strdup(f->a, mp))) { fail_err(f, MH_ENOMEM, "locate"); return; }
        b->superseded = sup;
        b->off = (uint64_t)off;
        b->len = (uint64_t)len;
    }
    size_t missing = 0;
    for (size_t i = 0; i < f->nblobs; i++) {
        if (f->blobs[i].mpack) continue;
        if (!missing) mh_info("req %s: fetch: object %s has no mpack index row yet", f->req->id, f->blobs[i].id);
        missing++;
    }
    if (missing) {
        char *d = mh_sprintf(f->a, "%zu needed objects are not indexed yet; retry shortly", missing);
        { fail(f, (ferr_t){503, "not_indexed", d ? d : "objects are not indexed yet", true}); return; }
    }
    tmark(f, "locate");
    f->state = S_READ;
    advance(f);
}

static void step_locate(fetch_t *f)
{
    mh_arena_t *a = f->a;
    const char **vals = mh_alloc(a, 2 * sizeof *vals);
    if (!vals) { fail_err(f, MH_ENOMEM, "locate"); return; }
    vals[0] = f->repo->repo_id;
    if (f->nsend * 2 >= f->g->n) {
        f->state = S_WAIT;
        mh_db_exec(f->hub->db, &st_locate_all, vals, NULL, NULL, locate_cb, f);
        return;
    }
    const char **ids = mh_alloc(a, f->nblobs * sizeof *ids);
    if (!ids) { fail_err(f, MH_ENOMEM, "locate"); return; }
    for (size_t i = 0; i < f->nblobs; i++) ids[i] = f->blobs[i].id;
    vals[1] = mh_pq_array(a, ids, f->nblobs, MH_ID_LEN);
    if (!vals[1]) { fail_err(f, MH_ENOMEM, "locate"); return; }
    f->state = S_WAIT;
    mh_db_exec(f->hub->db, f->nblobs <= LOCATE_FEW ? &st_locate_few : &st_locate, vals, NULL, NULL, locate_cb, f);
}

/* --- S_READ: one ranged read per source pack, a few packs at a time */


static int cmp_order(const void *x, const void *y, void *arg)
{
    const fetch_t *f = arg;
    const blob_t *a = &f->blobs[*(const uint32_t *)x], *b = &f->blobs[*(const uint32_t *)y];
    int c = strcmp(a->mpack, b->mpack);
    if (c) return c;
    return a->off < b->off ? -1 : a->off > b->off;
}

static void start_reads(fetch_t *f);

static void read_cb(void *ud, int err, mh_buf_t *data)
{
    src_t *s = ud;
    fetch_t *f = s->f;
    f->reads_inflight--;
    if (!err) {
        /* The buffer is ours: free it with the request. */
        s->buf = mh_alloc(f->a, sizeof *s->buf);
        if (!s->buf || mh_arena_defer(f->a, free_buf_cb, s->buf)) {
            mh_buf_free(data);
            err = MH_ENOMEM;
        } else {
            *s->buf = *data;
            *data = (mh_buf_t){0};
            uint64_t pos = 0;
            for (uint32_t k = 0; k < s->n; k++) {
                blob_t *b = &f->blobs[f->order[s->first + k]];
                if (pos + b->len > s->buf->len) {
                    err = MH_ESTORE;
                    break;
                }
                b->content = s->buf->p + pos;
                pos += b->len;
            }
            if (!err && pos != s->buf->len) err = MH_ESTORE;
            if (err) mh_error("req %s: fetch: short read of %s", f->req->id, s->key);
        }
    } else {
        mh_error("req %s: fetch: reading %s: %s", f->req->id, s->key, mh_strerror(err));
    }
    if (err && !f->perr) f->perr = err == MH_ENOENT ? MH_ESTORE : err;
    start_reads(f);
}

static void start_reads(fetch_t *f)
{
    while (!f->perr && f->next_src < f->nsrcs && f->reads_inflight < READS_IN_FLIGHT) {
        src_t *s = &f->srcs[f->next_src++];
        f->reads_inflight++;
        mh_store_get_ranges(f->hub->store, s->key, s->ranges, s->n, read_cb, s);
    }
    if (f->reads_inflight > 0) return;
    if (f->perr) { fail_err(f, f->perr, "reading source packs"); return; }
    if (f->next_src < f->nsrcs) return;
    tmark(f, "read");
    f->state = S_BUILD;
    advance(f);
}

static void step_read(fetch_t *f)
{
    mh_arena_t *a = f->a;
    f->order = mh_alloc(a, f->nblobs * sizeof *f->order);
    if (!f->order) { fail_err(f, MH_ENOMEM, "read"); return; }
    for (size_t i = 0; i < f->nblobs; i++) {
        f->order[i] = (uint32_t)i;
        f->blob_bytes += f->blobs[i].len;
    }
    qsort_r(f->order, f->nblobs, sizeof *f->order, cmp_order, f);
    size_t ns = 0;
    for (size_t i = 0; i < f->nblobs; i++)
        if (i == 0 || strcmp(f->blobs[f->order[i]].mpack, f->blobs[f->order[i - 1]].mpack) != 0) ns++;
    f->srcs = mh_calloc(a, ns * sizeof *f->srcs);
    mh_range_t *ranges = mh_alloc(a, f->nblobs * sizeof *ranges);
    if (!f->srcs || !ranges) { fail_err(f, MH_ENOMEM, "read"); return; }
    for (size_t i = 0; i < f->nblobs; i++) {
        blob_t *b = &f->blobs[f->order[i]];
        if (i == 0 || strcmp(b->mpack, f->blobs[f->order[i - 1]].mpack) != 0) {
            src_t *s = &f->srcs[f->nsrcs++];
            s->f = f;
            mh_mpack_key(s->key, b->mpack);
            s->first = (uint32_t)i;
            s->ranges = &ranges[i];
        }
        src_t *s = &f->srcs[f->nsrcs - 1];
        ranges[i] = (mh_range_t){b->off, b->len};
        s->n++;
    }
    f->state = S_WAIT;
    f->perr = 0;
    start_reads(f);
}

/* --- S_BUILD: the v1 pack and its id (thread pool when large) */

static int build_pack(fetch_t *f)
{
    static const uint8_t empty_arr[1] = {0x90};
    mh_buf_t *out = f->pack;
    size_t est = 64 + (size_t)f->blob_bytes + f->nblobs * 96 + f->nsend * 512;
    for (size_t i = 0; i < f->nemit; i++) {
        const snap_t *s = &f->snaps[f->emit[i]];
        est += 160 + (s->full_mp ? s->full_mp->len : s->upn + s->rmn);
    }
    if (mh_buf_reserve(out, est)) return MH_ENOMEM;
    mh_packw_t w;
    mh_packw_init(&w, out);
    mh_packw_commits(&w, (uint32_t)f->nsend);
    for (size_t i = 0; i < f->nsend; i++) {
        const crow_t *c = &f->commits[i];
#define S(x) ((mh_str_t){(x), (x) ? strlen(x) : 0})
        mh_packw_commit(&w, S(c->commit_id), S(c->p1), S(c->p2), S(c->snap), S(c->message), S(c->author),
                        S(c->committed_at), S(c->branch), c->metan ? c->meta : NULL, c->metan);
    }
    mh_packw_snapshots(&w, (uint32_t)f->nemit);
    for (size_t i = 0; i < f->nemit; i++) {
        const snap_t *s = &f->snaps[f->emit[i]];
        switch (s->kind) {
        case SNAP_DELTA:
            mh_packw_snapshot(&w, S(s->id), S(s->parent), s->up, s->upn, s->rm, s->rmn);
            break;
        case SNAP_ROOT_STORED:
            mh_packw_snapshot(&w, S(s->id), (mh_str_t){NULL, 0}, s->up, s->upn, s->rm, s->rmn);
            break;
        case SNAP_ROOT_REBUILD:
            mh_packw_snapshot(&w, S(s->id), (mh_str_t){NULL, 0}, s->full_mp->p, s->full_mp->len, empty_arr, 1);
            break;
        }
    }
    mh_packw_blobs(&w, (uint32_t)f->nblobs);
    for (size_t i = 0; i < f->nblobs; i++)
        mh_packw_blob(&w, (mh_str_t){f->blobs[i].id, MH_ID_LEN}, f->blobs[i].content, f->blobs[i].len);
    /* The branches whose head is in this pack (a client can resolve every
     * head it is told about), sorted by name. */
    uint32_t nb = 0;
    const mh_gbranch_t *br = f->g->branches;
    for (uint32_t i = 0; i < f->g->nbranches; i++) nb += br[i].node != MH_GNONE && (f->flags[br[i].node] & GW_SENT);
    mh_packw_branch_heads(&w, nb);
    for (uint32_t i = 0; i < f->g->nbranches; i++)
        if (br[i].node != MH_GNONE && (f->flags[br[i].node] & GW_SENT))
            mh_packw_branch_head(&w, S(br[i].name), (mh_str_t){br[i].head.s, MH_ID_LEN});
#undef S
    int rc = mh_packw_finish(&w);
    if (rc) return rc;
    mh_blob_id(out->p, out->len, &f->mpack_id);
    return 0;
}

static void build_work(uv_work_t *w)
{
    fetch_t *f = w->data;
    f->build_err = build_pack(f);
}

static void build_after(uv_work_t *w, int status)
{
    fetch_t *f = w->data;
    if (status) f->build_err = MH_ECANCELED;
    if (f->build_err) { fail_err(f, f->build_err, "building the pack"); return; }
    tmark(f, "build");
    f->state = S_PUT;
    advance(f);
}

static void step_build(fetch_t *f)
{
    f->pack = mh_calloc(f->a, sizeof *f->pack);
    if (!f->pack || mh_arena_defer(f->a, free_buf_cb, f->pack)) { fail_err(f, MH_ENOMEM, "build"); return; }
    if (f->blob_bytes > POOL_THRESHOLD) {
        /* Nothing else touches f while the job runs: the request waits. */
        f->work.data = f;
        f->state = S_WAIT;
        int rc = uv_queue_work(f->hub->loop, &f->work, build_work, build_after);
        if (rc) fail_err(f, MH_ENOMEM, "queueing the build");
        return;
    }
    int rc = build_pack(f);
    if (rc) { fail_err(f, rc, "building the pack"); return; }
    tmark(f, "build");
    f->state = S_PUT;
}

/* --- S_PUT: store the pack under its own hash */

static void put_cb(void *ud, int err)
{
    fetch_t *f = ud;
    if (err) { fail_err(f, err, "storing the pack"); return; }
    tmark(f, "put");
    f->state = S_RECORD;
    advance(f);
}

static void head_cb(void *ud, int err, uint64_t size)
{
    fetch_t *f = ud;
    char key[MH_MPACK_KEY_SIZE];
    mh_mpack_key(key, f->mpack_id.s);
    if (!err && size == f->pack->len) {
        /* Content-addressed: the same key holds the same bytes (another
         * process, or an earlier state, built this pack). */
        tmark(f, "put_skipped");
        f->state = S_RECORD;
        advance(f);
        return;
    }
    mh_store_put(f->hub->store, key, f->pack->p, f->pack->len, put_cb, f);
}

static void step_put(fetch_t *f)
{
    char key[MH_MPACK_KEY_SIZE];
    mh_mpack_key(key, f->mpack_id.s);
    f->state = S_WAIT;
    mh_store_head(f->hub->store, key, head_cb, f);
}

/* --- S_RECORD: the mpacks row (a cache pack: kind 'fetch') and the
 * shared answer row */

static const mh_stmt_t st_ins_mpack = {
    "hub_fetch_ins_mpack",
    "INSERT INTO mpacks (mpack_id, size_bytes, kind) VALUES ($1, $2::bigint, 'fetch') ON CONFLICT DO NOTHING", 2};

static const mh_stmt_t st_ins_answer = {
    "hub_fetch_ins_answer",
    "INSERT INTO fetch_packs (repo_id, state_seq, request_key, mpack_id, commit_count, snapshot_count, blob_count)"
    " VALUES ($1, $2::bigint, $3, $4, $5::int, $6::int, $7::int) ON CONFLICT DO NOTHING",
    7};

static void record_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    fetch_t *f = ud;
    (void)results;
    (void)n;
    /* The pack is stored: a failed bookkeeping row only costs a rebuild
     * later, so answer anyway. */
    if (err) mh_warn("req %s: fetch: recording the answer: %s (%s)", f->req->id, mh_strerror(err), errmsg ? errmsg : "");
    tmark(f, "record");
    f->state = S_ANSWER;
    advance(f);
}

static void step_record(fetch_t *f)
{
    mh_arena_t *a = f->a;
    answer_t *ans = &f->ans;
    memset(ans, 0, sizeof *ans);
    if (f->pack) {
        memcpy(ans->mpack_id, f->mpack_id.s, MH_ID_SIZE);
        ans->commits = (uint32_t)f->nsend;
        ans->snapshots = (uint32_t)f->nemit;
        ans->blobs = (uint32_t)f->nblobs;
    }
    char **v = mh_alloc(a, 9 * sizeof *v);
    if (!v) { fail_err(f, MH_ENOMEM, "record"); return; }
    v[0] = ans->mpack_id;
    v[1] = mh_sprintf(a, "%zu", f->pack ? f->pack->len : 0);
    v[2] = f->repo->repo_id;
    v[3] = mh_sprintf(a, "%lld", (long long)f->seq);
    v[4] = f->normkey;
    v[5] = ans->mpack_id[0] ? ans->mpack_id : NULL;
    v[6] = mh_sprintf(a, "%u", ans->commits);
    v[7] = mh_sprintf(a, "%u", ans->snapshots);
    v[8] = mh_sprintf(a, "%u", ans->blobs);
    if (!v[1] || !v[3] || !v[6] || !v[7] || !v[8]) { fail_err(f, MH_ENOMEM, "record"); return; }
    mh_db_pq_t qs[2] = {
        {.stmt = &st_ins_mpack, .nparams = 2, .vals = (const char *const *)v},
        {.stmt = &st_ins_answer, .nparams = 7, .vals = (const char *const *)v + 2},
    };
    f->state = S_WAIT;
    if (f->pack) mh_db_pipeline(f->hub->db, qs, 2, record_cb, f);
    else mh_db_pipeline(f->hub->db, qs + 1, 1, record_cb, f);
}

/* --- the loop */

static void advance(fetch_t *f)
{
    for (;;) {
        switch (f->state) {
        case S_GRAPH: step_graph(f, false); break;
        case S_RESOLVE: step_resolve(f); break;
        case S_LOOKUP: step_lookup(f); break;
        case S_WALK: step_walk(f); break;
        case S_ROWS: step_rows(f); break;
        case S_MANIFESTS: step_manifests(f); break;
        case S_BLOBSET: step_blobset(f); break;
        case S_LOCATE: step_locate(f); break;
        case S_READ: step_read(f); break;
        case S_BUILD: step_build(f); break;
        case S_PUT: step_put(f); break;
        case S_RECORD: step_record(f); break;
        case S_ANSWER:
            f->state = S_WAIT;
            if (f->pack)
                mh_info("fetch %s/%s: %zu commits, %zu snapshots, %zu blobs, %zu bytes, %s in %.1f ms:%s",
                        f->repo->owner, f->repo->slug, f->nsend, f->nemit, f->nblobs, f->pack->len, f->mpack_id.s,
                        (double)(mh_now_us() - f->t0) / 1000.0, f->timing);
            finish(f);
            return;
        case S_WAIT: return;
        }
    }
}

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
    if (v->v.a.n) {
        qsort(ids, v->v.a.n, sizeof *ids, cmp_str);
        for (uint32_t i = 0; i < v->v.a.n; i++)
            if (k == 0 || strcmp(ids[k - 1], ids[i]) != 0) ids[k++] = ids[i];
    }
    *out = ids;
    *n = k;
    return NULL;
}

static void release_arena_cb(void *p) { mh_arena_release(p); }

static void repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    fetch_t *f = req->user;
    f->repo = repo;
    f->seq = repo->state_seq;
    f->key = mh_sprintf(f->a, "%s|%lld|%s", repo->repo_id, (long long)repo->state_seq, f->reqkey);
    if (!f->key) { mh_res_fail(req, MH_ENOMEM, "fetch"); return; }
    const answer_t *hit = mh__answer_get(f->hub, f->key);
    if (hit) {
        respond_answer(req, hit);
        return;
    }
    /* The same miss already being built: wait for its outcome. */
    int rc = mh__inflight_join(f->hub, f->key, req, &f->infl);
    if (rc < 0) { mh_res_fail(req, rc, "fetch"); return; }
    if (rc == 1) {
        f->state = S_WAIT;
        return;
    }
    mh_arena_t *ba = mh_alloc(&req->arena, sizeof *ba);
    if (ba) mh_arena_init(ba, BUILD_ARENA_LIMIT);
    if (!ba || mh_arena_defer(&req->arena, release_arena_cb, ba)) {
        fail_err(f, MH_ENOMEM, "fetch");
        return;
    }
    f->a = ba;
    f->state = S_GRAPH;
    advance(f);
}

void mh_h_fetch(mh_req_t *req)
{
    mh_val_t body;
    if (!mh_req_body_val(req, &body)) return;
    mh_arena_t *a = &req->arena;
    fetch_t *f = mh_calloc(a, sizeof *f);
    if (!f) { mh_res_fail(req, MH_ENOMEM, "fetch"); return; }
    f->req = req;
    f->hub = req->app;
    f->a = a;
    f->t0 = f->t_mark = mh_now_us();
    if (body.t != MH_V_MAP) { mh_res_error(req, 422, "invalid_request", "the body must be a map {want, have}"); return; }
    const char *why = parse_ids(a, &body, "want", true, &f->want, &f->nwant);
    if (why == ids_oom) { mh_res_fail(req, MH_ENOMEM, "fetch"); return; }
    if (why) { mh_res_error(req, 422, "invalid_request", "want %s", why); return; }
    why = parse_ids(a, &body, "have", false, &f->have, &f->nhave);
    if (why == ids_oom) { mh_res_fail(req, MH_ENOMEM, "fetch"); return; }
    if (why) { mh_res_error(req, 422, "invalid_request", "have %s", why); return; }
    if (ids_key(a, f->want, f->nwant, f->have, f->nhave, NULL, f->reqkey)) { mh_res_fail(req, MH_ENOMEM, "fetch"); return; }
    req->user = f;
    mh_hub_load_repo(req, MH_PERM_READ, repo_cb);
}
