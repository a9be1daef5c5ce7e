/*
 * proposals.c — proposals and their merge (SPEC 4.6):
 *
 *   POST /api/repos/{repo_id}/proposals                      create (WRITE)
 *   GET  /api/repos/{repo_id}/proposals[?state=]             list (READ)
 *   GET  /api/repos/{repo_id}/proposals/{proposal_id}        one, with a diff summary (READ)
 *   POST /api/repos/{repo_id}/proposals/{proposal_id}/close  close (WRITE)
 *   POST /api/repos/{repo_id}/proposals/{proposal_id}/merge  merge (WRITE)
 *
 * Numbers are allocated per repository under a transaction-scoped
 * advisory lock of that repository's proposals, so concurrent creations
 * get consecutive numbers without touching the repository row (which
 * every branch move updates).
 *
 * Merge is a state machine (DESIGN 3): PROPOSAL (the row, must be open)
 * -> GRAPH (the repository's commit graph at the state just read: branch
 * heads and the merge base, merge.c) -> DEPTH (of to-head's snapshot row)
 * -> three manifests (base, ours = to_branch head, theirs = from_branch
 * head) -> MERGE (thread pool: three-way merge, merged snapshot id and
 * delta, commit id) -> TX: ACQUIRE, BEGIN, LOCK (the proposal row and the
 * to_branch row FOR UPDATE, from_branch's head; each must be what the
 * merge was computed from), WRITE (snapshot, commit, refs, the branch
 * move, the proposal marked merged, the state_seq bump), COMMIT.
 *
 * Invariants: a merge writes nothing when it conflicts, when the proposal
 * is no longer open, or when either branch moved since the merge was
 * computed (then it is recomputed once from a fresh graph, and a second
 * move is a 409); otherwise every row goes in one transaction. The
 * merge commit is in PostgreSQL only and adds no blob: every object of
 * the merged manifest is already referenced by this repository (it comes
 * from one of its two heads). The transaction locks the repository row
 * first, as every writer of a repository's refs does (push, server-side
 * commits, the jobs, deletion), then the proposal row, then the branch
 * row: writers of one repository are serialised and cannot deadlock.
 */
#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include "hub_internal.h"
#include "merge.h"
#include "mh/hub.h"
#include "mh/mpack.h"

#define MAX_TITLE 1024
#define MAX_BODY (256 * 1024)
#define LIST_MAX "1000" /* proposals listed, newest first */
#define DIFF_MAX 10000     /* paths listed per kind in a diff summary */
#define CONFLICTS_MAX 10000 /* paths listed in a conflict answer */
#define WORK_ARENA_LIMIT ((size_t)1 << 30)

/* The columns every proposal query returns, in proposal_val's order. */
#define PCOLS                                                                                                        \
    "proposal_id, number, state, title, body, from_branch, to_branch, created_by,"                                  \
    " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'),"                            \
    " to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), merge_commit_id, repo_id"
#define NPCOLS 12


static char *text_field(mh_arena_t *a, const mh_val_t *v, size_t max, bool allow_empty)
{
    if (!v || v->t != MH_V_STR || v->v.s.n > max || (!allow_empty && v->v.s.n == 0)) return NULL;
    if (memchr(v->v.s.p, 0, v->v.s.n) || !mh_utf8_valid(v->v.s.p, v->v.s.n)) return NULL;
    return mh_strndup(a, v->v.s.p, v->v.s.n);
}

/* The proposal of row r (PCOLS from column c0) as a response map. */
static mh_val_t *proposal_val(mh_arena_t *a, PGresult *res, int r, int c0)
{
    static const char *const names[NPCOLS] = {"proposal_id", "number", "state", "title", "body", "from_branch",
                                              "to_branch", "created_by", "created_at", "updated_at",
                                              "merge_commit_id", "repo_id"};
    mh_val_t *m = mh_v_map(a);
    if (!m) return NULL;
    for (int i = 0; i < NPCOLS; i++) {
        mh_val_t v;
        if (mh_pq_isnull(res, r, c0 + i)) v = mh_v_nil();
        else if (i == 1) v = mh_v_int(mh_pq_int(res, r, c0 + i));
        else {
            char *s = mh_strdup(a, mh_pq_str(res, r, c0 + i));
            if (!s) return NULL;
            v = mh_v_str(s);
        }
        if (mh_map_put(a, m, names[i], v)) return NULL;
    }
    return m;
}

/* The proposal id of the route, validated (false: answered 404). */
static bool proposal_param(mh_req_t *req, char out[MH_ID_SIZE])
{
    mh_str_t p = mh_req_param(req, "proposal_id");
    if (!p.p || !mh_id_valid(p.p, p.n)) {
        mh_res_error(req, 404, "not_found", "proposal not found");
        return false;
    }
    memcpy(out, p.p, MH_ID_LEN);
    out[MH_ID_LEN] = 0;
    return true;
}

static bool nomem(mh_req_t *req)
{
    mh_res_fail(req, MH_ENOMEM, "proposals");
    return false;
}

/* ============================================================== create */

typedef struct {
    mh_req_t *req;
    char *title, *body, *from, *to;
    mh_id_t id;
} pcreate_t;

static void create_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    pcreate_t *p = ud;
    mh_req_t *req = p->req;
    if (err) {
        mh_res_fail(req, err, errmsg);
        return;
    }
    PGresult *res = results[n - 1];
    if (PQntuples(res) != 1) {
        mh_res_error(req, 422, "unknown_branch", "from_branch '%s' does not exist in this repository", p->from);
        return;
    }
    mh_val_t *v = proposal_val(&req->arena, res, 0, 0);
    if (!v) {
        nomem(req);
        return;
    }
    mh_info("req %s: proposal %s #%s opened: %s -> %s", req->id, p->id.s, mh_pq_str(res, 0, 1), p->from, p->to);
    mh_res_val(req, 201, v);
}

static void create_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    pcreate_t *p = req->user;
    const mh_caller_t *caller = mh_req_caller(req);
    const char **lock = mh_alloc(&req->arena, sizeof *lock), **v = mh_alloc(&req->arena, 7 * sizeof *v);
    if (!lock || !v) {
        nomem(req);
        return;
    }
    lock[0] = repo->repo_id;
    v[0] = p->id.s;
    v[1] = repo->repo_id;
    v[2] = p->title;
    v[3] = p->body;
    v[4] = p->from;
    v[5] = p->to;
    v[6] = caller->handle ? caller->handle : "anonymous";
    /* One implicit transaction: the lock, then the insert, whose
     * statement snapshot is taken after the lock is held (READ
     * COMMITTED), so max(number) sees every proposal committed before.
     * from_branch must exist; to_branch may be created by the merge. */
    mh_db_pq_t qs[2] = {
        {NULL, "SELECT pg_advisory_xact_lock(hashtextextended('musehub:proposals:' || $1::text, 0))", 1, lock, NULL,
         NULL},
        {NULL,
         "INSERT INTO proposals (proposal_id, repo_id, number, title, body, from_branch, to_branch, created_by)"
         " SELECT $1, $2, coalesce((SELECT max(number) FROM proposals WHERE repo_id = $2), 0) + 1, $3, $4, $5, $6, $7"
         " WHERE EXISTS (SELECT 1 FROM branches WHERE repo_id = $2 AND name = $5)"
         " RETURNING " PCOLS,
         7, v, NULL, NULL},
    };
    mh_db_pipeline(hub->db, qs, 2, create_cb, p);
}

void mh_h_proposal_create(mh_req_t *req)
{
    mh_val_t body;
    if (!mh_req_body_val(req, &body)) return;
    if (body.t != MH_V_MAP) {
        mh_res_error(req, 422, "invalid_body", "the body must be a map");
        return;
    }
    mh_arena_t *a = &req->arena;
    pcreate_t *p = mh_calloc(a, sizeof *p);
    uint8_t rnd[32];
    if (!p || mh_random(rnd, sizeof rnd)) {
        nomem(req);
        return;
    }
    p->req = req;
    mh_id_from_digest(&p->id, rnd);
    p->title = text_field(a, mh_val_get(&body, "title"), MAX_TITLE, false);
    if (!p->title) {
        mh_res_error(req, 422, "invalid_field", "'title' must be a UTF-8 string of 1..%d bytes without NUL", MAX_TITLE);
        return;
    }
    const mh_val_t *bv = mh_val_get(&body, "body");
    p->body = "";
    if (bv && bv->t != MH_V_NIL && !(p->body = text_field(a, bv, MAX_BODY, true))) {
        mh_res_error(req, 422, "invalid_field", "'body' must be a UTF-8 string of at most %d bytes without NUL",
                     MAX_BODY);
        return;
    }
    const char *names[2] = {"from_branch", "to_branch"};
    char **dst[2] = {&p->from, &p->to};
    for (int i = 0; i < 2; i++) {
        const mh_val_t *v = mh_val_get(&body, names[i]);
        if (!v || v->t != MH_V_STR || !mh_branch_valid(v->v.s.p, v->v.s.n)) {
            mh_res_error(req, 422, "invalid_field", "'%s' must be a valid branch name", names[i]);
            return;
        }
        if (!(*dst[i] = mh_strndup(a, v->v.s.p, v->v.s.n))) {
            nomem(req);
            return;
        }
    }
    if (strcmp(p->from, p->to) == 0) {
        mh_res_error(req, 422, "invalid_field", "from_branch and to_branch must differ");
        return;
    }
    req->user = p;
    mh_hub_load_repo(req, MH_PERM_WRITE, create_repo_cb);
}

/* ================================================================ list */

static void list_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_req_t *req = ud;
    if (err) {
        mh_res_fail(req, err, errmsg);
        return;
    }
    mh_arena_t *a = &req->arena;
    mh_val_t *arr = mh_v_arr(a), *out = mh_v_map(a);
    int rc = arr && out ? 0 : MH_ENOMEM;
    for (int r = 0; !rc && r < PQntuples(res); r++) {
        mh_val_t *v = proposal_val(a, res, r, 0);
        rc = v ? mh_arr_push(a, arr, *v) : MH_ENOMEM;
    }
    if (!rc) rc = mh_map_put(a, out, "proposals", *arr);
    if (rc) nomem(req);
    else mh_res_val(req, 200, out);
}

static void list_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    const char *vals[2] = {repo->repo_id, req->user ? (const char *)req->user : ""};
    mh_db_query(hub->db,
                "SELECT " PCOLS " FROM proposals WHERE repo_id = $1 AND ($2 = '' OR state = $2)"
                " ORDER BY number DESC LIMIT " LIST_MAX,
                2, vals, NULL, NULL, list_cb, req);
}

void mh_h_proposal_list(mh_req_t *req)
{
    mh_str_t st = mh_req_query(req, "state");
    req->user = NULL;
    if (st.p && st.n) {
        if (!mh_str_eq(st, "open") && !mh_str_eq(st, "closed") && !mh_str_eq(st, "merged")) {
            mh_res_error(req, 422, "invalid_query", "state must be open, closed or merged");
            return;
        }
        req->user = mh_strndup(&req->arena, st.p, st.n);
        if (!req->user) {
            nomem(req);
            return;
        }
    }
    mh_hub_load_repo(req, MH_PERM_READ, list_repo_cb);
}

/* =============================================================== close */

static void close_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_req_t *req = ud;
    if (err) {
        mh_res_fail(req, err, errmsg);
        return;
    }
    if (PQntuples(res) != 1) {
        mh_res_error(req, 404, "not_found", "proposal not found");
        return;
    }
    if (mh_pq_str(res, 0, 0)[0] != '1') {
        mh_res_error(req, 409, "not_open", "the proposal is %s, not open", mh_pq_str(res, 0, 3));
        return;
    }
    mh_val_t *v = proposal_val(&req->arena, res, 0, 1);
    if (!v) nomem(req);
    else mh_res_val(req, 200, v);
}

static void close_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    const char *vals[2] = {(const char *)req->user, repo->repo_id};
    /* One statement: the update when the proposal is open, else the row
     * as it is (the outer scan sees the statement's snapshot, from before
     * the update), so 404 and 409 need no second query. */
    mh_db_query(hub->db,
                "WITH u AS (UPDATE proposals SET state = 'closed', updated_at = now()"
                "  WHERE proposal_id = $1 AND repo_id = $2 AND state = 'open' RETURNING " PCOLS ")"
                " SELECT 1, * FROM u"
                " UNION ALL SELECT 0, " PCOLS " FROM proposals WHERE proposal_id = $1 AND repo_id = $2"
                "  AND NOT EXISTS (SELECT 1 FROM u)",
                2, vals, NULL, NULL, close_cb, req);
}

void mh_h_proposal_close(mh_req_t *req)
{
    char *id = mh_alloc(&req->arena, MH_ID_SIZE);
    if (!id) {
        nomem(req);
        return;
    }
    if (!proposal_param(req, id)) return;
    req->user = id;
    mh_hub_load_repo(req, MH_PERM_WRITE, close_repo_cb);
}

/* ====================================================== graph helpers */

/* What both GET (diff summary) and merge need: the proposal row, the
 * repository's graph, the two heads and their merge base. */
typedef struct {
    mh_req_t *req;
    mh_hub_t *hub;
    mh_repo_t *repo;
    char pid[MH_ID_SIZE];
    mh_val_t *pval;     /* the proposal as a response map */
    char *state, *title, *from, *to;
    int64_t number;
    mh_graph_t *g;
    bool has_from, has_to, has_base;
    mh_id_t from_head, to_head, base, from_snap, to_snap, base_snap;
} pctx_t;

/* Copies the proposal row (PCOLS) out of res. */
static int ctx_row(pctx_t *x, PGresult *res)
{
    mh_arena_t *a = &x->req->arena;
    x->pval = proposal_val(a, res, 0, 0);
    x->number = mh_pq_int(res, 0, 1);
    x->state = mh_strdup(a, mh_pq_str(res, 0, 2));
    x->title = mh_strdup(a, mh_pq_str(res, 0, 3));
    x->from = mh_strdup(a, mh_pq_str(res, 0, 5));
    x->to = mh_strdup(a, mh_pq_str(res, 0, 6));
    return x->pval && x->state && x->title && x->from && x->to ? 0 : MH_ENOMEM;
}

/* Resolves both heads and the merge base on x->g. */
static int ctx_resolve(pctx_t *x)
{
    const mh_graph_t *g = x->g;
    x->has_from = x->has_to = x->has_base = false;
    const mh_gbranch_t *bf = mh_graph_branch(g, x->from, strlen(x->from));
    const mh_gbranch_t *bt = mh_graph_branch(g, x->to, strlen(x->to));
    uint32_t nf = MH_GNONE, nt = MH_GNONE;
    if (bf && bf->node != MH_GNONE) {
        x->has_from = true;
        nf = bf->node;
        mh_graph_id(g, nf, &x->from_head);
        mh_graph_snap_id(g, nf, &x->from_snap);
    }
    if (bt && bt->node != MH_GNONE) {
        x->has_to = true;
        nt = bt->node;
        mh_graph_id(g, nt, &x->to_head);
        mh_graph_snap_id(g, nt, &x->to_snap);
    }
    if (x->has_from && x->has_to) {
        uint32_t b;
        int rc = mh_graph_merge_base(g, nf, nt, &b);
        if (rc) return rc;
        if (b != MH_GNONE) {
            x->has_base = true;
            mh_graph_id(g, b, &x->base);
            mh_graph_snap_id(g, b, &x->base_snap);
        }
    }
    return 0;
}

typedef void (*ctx_cb)(pctx_t *x);

typedef struct {
    pctx_t *x;
    ctx_cb cb;
} graph_wait_t;

static void ctx_graph_cb(void *ud, mh_graph_t *g, int err, const char *errmsg)
{
    graph_wait_t *w = ud;
    pctx_t *x = w->x;
    if (err) {
        mh_res_fail(x->req, err, errmsg);
        return;
    }
    if (mh_graph_hold(&x->req->arena, g)) {
        nomem(x->req);
        return;
    }
    x->g = g;
    int rc = ctx_resolve(x);
    if (rc) {
        mh_res_fail(x->req, rc, "merge base");
        return;
    }
    w->cb(x);
}

/* Gets the repository's graph at the state load_repo read (the cached one,
 * else one query), resolves the heads and the base, then cb(x). */
static void ctx_graph(pctx_t *x, ctx_cb cb)
{
    graph_wait_t *w = mh_alloc(&x->req->arena, sizeof *w);
    if (!w) {
        nomem(x->req);
        return;
    }
    w->x = x;
    w->cb = cb;
    mh_graph_t *g = mh_graph_cache_get(x->hub, x->repo->repo_id, x->repo->state_seq);
    if (g) {
        ctx_graph_cb(w, g, 0, NULL);
        return;
    }
    if (mh_graph_load(x->hub, &x->req->arena, x->repo->repo_id, ctx_graph_cb, w)) nomem(x->req);
}

static const mh_stmt_t st_proposal = {
    "proposal_by_id", "SELECT " PCOLS " FROM proposals WHERE proposal_id = $1 AND repo_id = $2", 2};

/* ================================================ get (+ diff summary) */

typedef struct {
    pctx_t x;
    mh_arena_t work; /* manifests */
    mh_manifest_t base_m, head_m;
    int loading;     /* 0: base, 1: head */
} pget_t;

static void pget_free(void *arg)
{
    pget_t *p = arg;
    mh_manifest_free(&p->base_m);
    mh_manifest_free(&p->head_m);
    mh_arena_release(&p->work);
}

static int put_paths(mh_arena_t *a, mh_val_t *map, const char *key, const mh_mpath_t *ps, size_t n)
{
    mh_val_t *arr = mh_v_arr(a);
    if (!arr) return MH_ENOMEM;
    for (size_t i = 0; i < n && i < DIFF_MAX; i++)
        if (mh_arr_push(a, arr, mh_v_strn(ps[i].path, ps[i].plen))) return MH_ENOMEM;
    return mh_map_put(a, map, key, *arr);
}

static void pget_respond(pget_t *p, bool with_diff)
{
    mh_req_t *req = p->x.req;
    mh_arena_t *a = &req->arena;
    mh_val_t *m = p->x.pval;
    int rc = 0;
    rc |= mh_map_put(a, m, "from_head", p->x.has_from ? mh_v_str(p->x.from_head.s) : mh_v_nil());
    rc |= mh_map_put(a, m, "to_head", p->x.has_to ? mh_v_str(p->x.to_head.s) : mh_v_nil());
    rc |= mh_map_put(a, m, "merge_base", p->x.has_base ? mh_v_str(p->x.base.s) : mh_v_nil());
    if (!rc && with_diff) {
        mh_mchanges_t ch;
        mh_val_t *d = mh_v_map(a);
        rc = d ? mh_manifest_changes(a, &p->base_m, &p->head_m, &ch) : MH_ENOMEM;
        if (!rc) rc = put_paths(a, d, "added", ch.added, ch.nadded);
        if (!rc) rc = put_paths(a, d, "changed", ch.changed, ch.nchanged);
        if (!rc) rc = put_paths(a, d, "removed", ch.removed, ch.nremoved);
        if (!rc)
            rc = mh_map_put(a, d, "truncated",
                            mh_v_bool(ch.nadded > DIFF_MAX || ch.nchanged > DIFF_MAX || ch.nremoved > DIFF_MAX));
        if (!rc) rc = mh_map_put(a, m, "diff", *d);
    } else if (!rc) {
        rc = mh_map_put(a, m, "diff", mh_v_nil());
    }
    if (rc) nomem(req);
    else mh_res_val(req, 200, m);
}

static void pget_manifest_cb(void *ud, int err, const char *why)
{
    pget_t *p = ud;
    if (err) {
        mh_error("req %s: proposal diff: %s (%s)", p->x.req->id, mh_strerror(err), why ? why : "");
        mh_res_fail(p->x.req, err == MH_ENOENT || err == MH_EHASH || err == MH_EPARSE ? MH_EIO : err,
                    "rebuilding a manifest");
        return;
    }
    if (p->loading++ == 0) {
        mh_hub_load_manifest(p->x.hub, &p->work, p->x.from_snap.s, &p->head_m, pget_manifest_cb, p);
        return;
    }
    pget_respond(p, true);
}

static void pget_graph_done(pctx_t *x)
{
    pget_t *p = (pget_t *)x;
    if (!x->has_from) { /* from_branch is gone: no diff to show */
        pget_respond(p, false);
        return;
    }
    /* No base (to_branch absent, or unrelated histories): everything on
     * from_branch counts as added. */
    if (!x->has_base) {
        p->loading = 1;
        mh_hub_load_manifest(x->hub, &p->work, x->from_snap.s, &p->head_m, pget_manifest_cb, p);
        return;
    }
    p->loading = 0;
    mh_hub_load_manifest(x->hub, &p->work, x->base_snap.s, &p->base_m, pget_manifest_cb, p);
}

static void pget_row_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    pget_t *p = ud;
    mh_req_t *req = p->x.req;
    if (err) {
        mh_res_fail(req, err, errmsg);
        return;
    }
    if (PQntuples(res) != 1) {
        mh_res_error(req, 404, "not_found", "proposal not found");
        return;
    }
    if (ctx_row(&p->x, res)) {
        nomem(req);
        return;
    }
    ctx_graph(&p->x, pget_graph_done);
}

static void pget_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    pget_t *p = req->user;
    p->x.repo = repo;
    const char *vals[2] = {p->x.pid, repo->repo_id};
    mh_db_exec(p->x.hub->db, &st_proposal, vals, NULL, NULL, pget_row_cb, p);
}

void mh_h_proposal_get(mh_req_t *req)
{
    pget_t *p = mh_calloc(&req->arena, sizeof *p);
    if (!p || mh_arena_defer(&req->arena, pget_free, p)) {
        nomem(req);
        return;
    }
    mh_arena_init(&p->work, WORK_ARENA_LIMIT);
    p->x.req = req;
    p->x.hub = req->app;
    if (!proposal_param(req, p->x.pid)) return;
    req->user = p;
    mh_hub_load_repo(req, MH_PERM_READ, pget_repo_cb);
}

/* =============================================================== merge */

typedef enum {
    M_PROPOSAL,
    M_GRAPH,
    M_DEPTH,
    M_LOAD_BASE,
    M_LOAD_OURS,
    M_LOAD_THEIRS,
    M_MERGE,
    M_MERGED,
    M_ACQUIRE,
    M_BEGIN,
    M_LOCK,
    M_WRITE,
    M_COMMIT,
    M_COMMITTED,
    M_DONE,
} mstate_t;

typedef struct {
    pctx_t x;
    mstate_t state;
    bool busy;
    uint64_t t0;
    mh_arena_t work;
    uv_work_t uvw;
    int work_status;
    mh_manifest_t base_m, ours_m, theirs_m, merged;
    mh_mpath_t *conf;
    size_t nconf;
    int64_t ours_depth, ours_gen, theirs_gen;
    /* the merge commit */
    char *author, *message;
    char committed_at[48];
    mh_id_t sid, cid;
    int64_t gen, depth;
    bool new_snapshot, checkpoint;
    mh_buf_t up, rm, cp;
    size_t entry_count;
    mh_dbconn_t *conn;
    bool retried; /* the merge was recomputed once after a branch moved */
} merge_t;

static void madvance(merge_t *m);

static void merge_free(void *arg)
{
    merge_t *m = arg;
    if (m->conn) mh_dbconn_release(m->conn);
    m->conn = NULL;
    mh_manifest_free(&m->base_m);
    mh_manifest_free(&m->ours_m);
    mh_manifest_free(&m->theirs_m);
    mh_manifest_free(&m->merged);
    free(m->conf);
    mh_buf_free(&m->up);
    mh_buf_free(&m->rm);
    mh_buf_free(&m->cp);
    mh_arena_release(&m->work);
}

/* Forgets everything computed from a graph, before recomputing the merge. */
static void merge_reset(merge_t *m)
{
    mh_manifest_free(&m->base_m);
    mh_manifest_free(&m->ours_m);
    mh_manifest_free(&m->theirs_m);
    mh_manifest_free(&m->merged);
    free(m->conf);
    m->conf = NULL;
    m->nconf = 0;
    m->up.len = m->rm.len = m->cp.len = 0;
    m->new_snapshot = m->checkpoint = false;
    m->work_status = 0;
    m->ours_depth = m->ours_gen = m->theirs_gen = m->depth = m->gen = 0;
    m->entry_count = 0;
}

static void mfail(merge_t *m, int status, const char *code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void mfail(merge_t *m, int status, const char *code, const char *fmt, ...)
{
    char detail[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    if (m->conn) {
        mh_dbconn_release(m->conn); /* rolls back */
        m->conn = NULL;
    }
    m->state = M_DONE;
    mh_info("req %s: merge of proposal %s refused: %d %s: %s", m->x.req->id, m->x.pid, status, code, detail);
    if (status == 503) mh_res_header(m->x.req, "Retry-After", "2");
    mh_res_error(m->x.req, status, code, "%s", detail);
}

static void mfail_db(merge_t *m, int err, const char *errmsg)
{
    if (err == MH_ECONFLICT) {
        mfail(m, 409, "stale_head", "branch '%s' changed concurrently; retry the merge", m->x.to);
        return;
    }
    mh_error("req %s: merge: database: %s (%s)", m->x.req->id, mh_strerror(err), errmsg ? errmsg : "");
    if (err == MH_EDBDOWN || err == MH_ETIMEDOUT) mfail(m, 503, "unavailable", "the database is unavailable; retry shortly");
    else mfail(m, 500, "internal", "database error");
}

/* ---------------------------------------------------------- callbacks */

static void m_row_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    merge_t *m = ud;
    m->busy = false;
    if (err) {
        mfail_db(m, err, errmsg);
        return;
    }
    if (PQntuples(res) != 1) {
        mfail(m, 404, "not_found", "proposal not found");
        return;
    }
    if (ctx_row(&m->x, res)) {
        mfail(m, 503, "unavailable", "out of memory");
        return;
    }
    if (strcmp(m->x.state, "open") != 0) {
        mfail(m, 409, "not_open", "proposal #%lld is %s; only an open proposal can be merged", (long long)m->x.number,
              m->x.state);
        return;
    }
    m->state = M_GRAPH;
    madvance(m);
}

static void m_graph_done(pctx_t *x)
{
    merge_t *m = (merge_t *)x;
    m->busy = false;
    if (!x->has_from) {
        mfail(m, 409, "unknown_branch", "from_branch '%s' does not exist", x->from);
        return;
    }
    if (x->has_to && x->has_base && strcmp(x->base.s, x->from_head.s) == 0) {
        mfail(m, 409, "nothing_to_merge", "'%s' has no commit that '%s' lacks (%s is already in it)", x->from, x->to,
              x->from_head.s);
        return;
    }
    const mh_graph_t *g = x->g;
    uint32_t nf = mh_graph_find(g, x->from_head.s);
    m->theirs_gen = g->nodes[nf].gen;
    if (x->has_to) m->ours_gen = g->nodes[mh_graph_find(g, x->to_head.s)].gen;
    /* Without a to_branch the merged tree is from_branch's: only its
     * manifest is needed (base and ours stay empty). */
    m->state = x->has_to ? M_DEPTH : M_LOAD_THEIRS;
    madvance(m);
}

static void m_depth_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    merge_t *m = ud;
    m->busy = false;
    if (err) {
        mfail_db(m, err, errmsg);
        return;
    }
    if (PQntuples(res) != 1) {
        mfail(m, 500, "internal", "the snapshot row of %s is missing", m->x.to_head.s);
        return;
    }
    m->ours_depth = mh_pq_int(res, 0, 0);
    m->state = m->x.has_base ? M_LOAD_BASE : M_LOAD_OURS;
    madvance(m);
}

static void m_manifest_cb(void *ud, int err, const char *why)
{
    merge_t *m = ud;
    m->busy = false;
    if (err) {
        mh_error("req %s: merge: rebuilding a manifest: %s (%s)", m->x.req->id, mh_strerror(err), why ? why : "");
        bool down = err == MH_EDBDOWN || err == MH_ETIMEDOUT || err == MH_ENOMEM;
        mfail(m, down ? 503 : 500, down ? "unavailable" : "internal", "cannot rebuild a manifest of the merge");
        return;
    }
    m->state++;
    madvance(m);
}

/* ------------------------------------------------- MERGE (thread pool) */

static void merge_work(uv_work_t *w)
{
    merge_t *m = w->data;
    pctx_t *x = &m->x;
    if (mh_merge_manifests(&m->base_m, &m->ours_m, &m->theirs_m, &m->merged, &m->conf, &m->nconf)) goto nomem;
    if (m->nconf) return;
    mh_manifest_id(&m->merged, &m->sid);
    m->entry_count = m->merged.n;
    /* Delta against the first parent's snapshot (to-head); a merged tree
     * equal to it reuses its row (a delta against itself would make the
     * row its own parent). Without a to-head the tree is from-head's,
     * whose row exists. */
    m->new_snapshot = x->has_to && strcmp(m->sid.s, x->to_snap.s) != 0;
    if (m->new_snapshot) {
        uint32_t nu, nr;
        if (mh_manifest_diff(&m->ours_m, &m->merged, &m->up, &nu, &m->rm, &nr)) goto nomem;
        m->depth = m->ours_depth + 1;
        m->checkpoint = m->depth >= MH_CHECKPOINT_INTERVAL;
        if (m->checkpoint) {
            m->depth = 0;
            if (mh_manifest_encode(&m->merged, &m->cp)) goto nomem;
        }
    }
    mh_iso_now(m->committed_at, sizeof m->committed_at);
    mh_str_t parents[2];
    int np = 0;
    if (x->has_to) parents[np++] = (mh_str_t){x->to_head.s, MH_ID_LEN};
    parents[np++] = (mh_str_t){x->from_head.s, MH_ID_LEN};
    mh_commit_id(parents, np, (mh_str_t){m->sid.s, MH_ID_LEN}, (mh_str_t){m->message, strlen(m->message)},
                 (mh_str_t){m->committed_at, strlen(m->committed_at)}, (mh_str_t){m->author, strlen(m->author)},
                 &m->cid);
    m->gen = (m->ours_gen > m->theirs_gen ? m->ours_gen : m->theirs_gen) + 1;
    return;
nomem:
    m->work_status = 503;
}

static void m_work_done(uv_work_t *w, int status)
{
    merge_t *m = w->data;
    m->busy = false;
    if (status || m->work_status) {
        mfail(m, 503, "unavailable", "out of memory");
        return;
    }
    m->state = M_MERGED;
    madvance(m);
}

/* Answers 409 {"error": "conflict", "detail", "paths": [...]}: SPEC 4.6's
 * error body with the extra key. */
static void respond_conflict(merge_t *m)
{
    mh_req_t *req = m->x.req;
    mh_arena_t *a = &req->arena;
    mh_val_t *v = mh_v_map(a), *paths = mh_v_arr(a);
    char *detail = mh_sprintf(a, "%zu path%s changed differently on '%s' and '%s' since %s", m->nconf,
                              m->nconf == 1 ? "" : "s", m->x.to, m->x.from,
                              m->x.has_base ? m->x.base.s : "their creation (unrelated histories)");
    int rc = v && paths && detail ? 0 : MH_ENOMEM;
    for (size_t i = 0; !rc && i < m->nconf && i < CONFLICTS_MAX; i++)
        rc = mh_arr_push(a, paths, mh_v_strn(m->conf[i].path, m->conf[i].plen));
    if (!rc) rc = mh_map_put(a, v, "error", mh_v_str("conflict"));
    if (!rc) rc = mh_map_put(a, v, "detail", mh_v_str(detail));
    if (!rc) rc = mh_map_put(a, v, "paths", *paths);
    if (!rc) rc = mh_map_put(a, v, "truncated", mh_v_bool(m->nconf > CONFLICTS_MAX));
    m->state = M_DONE;
    mh_info("req %s: merge of proposal %s: %zu conflicts", req->id, m->x.pid, m->nconf);
    if (rc) nomem(req);
    else mh_res_val(req, 409, v);
}

/* ------------------------------------------------------------------ TX */

static void m_acquire_cb(void *ud, mh_dbconn_t *c, int err)
{
    merge_t *m = ud;
    m->busy = false;
    if (err) {
        mfail_db(m, err, "no connection");
        return;
    }
    m->conn = c;
    m->state = M_BEGIN;
    madvance(m);
}

static void m_step_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    merge_t *m = ud;
    m->busy = false;
    if (err) {
        mfail_db(m, err, errmsg);
        return;
    }
    m->state++;
    madvance(m);
}

static void m_lock_cb(void *ud, PGresult **r, int n, int err, const char *errmsg)
{
    merge_t *m = ud;
    pctx_t *x = &m->x;
    m->busy = false;
    if (err || n != 4) {
        mfail_db(m, err ? err : MH_EDB, errmsg);
        return;
    }
    /* 0: the repository row (locked); 1: proposal state (locked);
     * 2: to_branch head (locked); 3: from_branch head */
    if (mh_pq_int(r[0], 0, 0) != 1) {
        mfail(m, 404, "not_found", "the repository was deleted");
        return;
    }
    r++;
    if (PQntuples(r[0]) != 1) {
        mfail(m, 404, "not_found", "proposal not found");
        return;
    }
    const char *st = mh_pq_str(r[0], 0, 0);
    if (strcmp(st, "open") != 0) {
        mfail(m, 409, "not_open", "proposal #%lld is %s; only an open proposal can be merged", (long long)x->number, st);
        return;
    }
    const char *to = PQntuples(r[1]) ? mh_pq_str(r[1], 0, 0) : NULL;
    const char *from = PQntuples(r[2]) ? mh_pq_str(r[2], 0, 0) : NULL;
    bool to_ok = x->has_to ? (to && strcmp(to, x->to_head.s) == 0) : !to;
    bool from_ok = from && strcmp(from, x->from_head.s) == 0;
    if (!to_ok || !from_ok) {
        if (!m->retried) {
            /* A branch moved since the graph was read (a concurrent
             * push or commit, or a graph cached by this process at a
             * state another process had already changed, whose
             * invalidation is still on its way): compute the merge once
             * more from a freshly loaded graph. */
            m->retried = true;
            mh_dbconn_release(m->conn); /* rolls back */
            m->conn = NULL;
            merge_reset(m);
            mh_graph_cache_drop(x->hub, x->repo->repo_id);
            mh_info("req %s: merge of proposal %s: '%s' moved meanwhile; recomputing", x->req->id, x->pid,
                    !to_ok ? x->to : x->from);
            m->state = M_GRAPH;
            madvance(m);
            return;
        }
        mfail(m, 409, "stale_head", "branch '%s' moved while the merge was computed; retry the merge",
              !to_ok ? x->to : x->from);
        return;
    }
    m->state = M_WRITE;
    madvance(m);
}

static void m_write_cb(void *ud, PGresult **r, int n, int err, const char *errmsg)
{
    merge_t *m = ud;
    m->busy = false;
    if (err) {
        mfail_db(m, err, errmsg);
        return;
    }
    (void)r;
    (void)n;
    m->state = M_COMMIT;
    madvance(m);
}

static void m_start_lock(merge_t *m)
{
    pctx_t *x = &m->x;
    const char *const vp[2] = {x->pid, x->repo->repo_id};
    const char *const vt[2] = {x->repo->repo_id, x->to};
    const char *const vf[2] = {x->repo->repo_id, x->from};
    /* Lock order: the repository row (as push, server-side commits, the
     * jobs and deletion take it first: writers of one repository are
     * serialised and cannot deadlock), then the proposal, then the branch. */
    mh_db_pq_t qs[4] = {
        {NULL, "SELECT count(*) FROM (SELECT 1 FROM repos WHERE repo_id = $1 FOR UPDATE) r", 1, vt, NULL, NULL},
        {NULL, "SELECT state FROM proposals WHERE proposal_id = $1 AND repo_id = $2 FOR UPDATE", 2, vp, NULL, NULL},
        {NULL, "SELECT head_commit_id FROM branches WHERE repo_id = $1 AND name = $2 FOR UPDATE", 2, vt, NULL, NULL},
        {NULL, "SELECT head_commit_id FROM branches WHERE repo_id = $1 AND name = $2", 2, vf, NULL, NULL},
    };
    m->busy = true;
    mh_dbconn_pipeline(m->conn, qs, 4, m_lock_cb, m);
}

static void m_start_write(merge_t *m)
{
    pctx_t *x = &m->x;
    mh_arena_t *a = &m->work;
    char *entries = mh_sprintf(a, "%zu", m->entry_count), *depth = mh_sprintf(a, "%lld", (long long)m->depth);
    char *gen = mh_sprintf(a, "%lld", (long long)m->gen);
    mh_db_pq_t *qs = mh_alloc(a, 8 * sizeof *qs);
    const char **vs = mh_alloc(a, 7 * sizeof *vs), **vc = mh_alloc(a, 9 * sizeof *vc),
               **vr = mh_alloc(a, 3 * sizeof *vr), **vb = mh_alloc(a, 3 * sizeof *vb),
               **vq = mh_alloc(a, 3 * sizeof *vq);
    int *ls = mh_calloc(a, 7 * sizeof *ls), *fs = mh_calloc(a, 7 * sizeof *fs);
    if (!entries || !depth || !gen || !qs || !vs || !vc || !vr || !vb || !vq || !ls || !fs) {
        mfail(m, 503, "unavailable", "out of memory");
        return;
    }
    int n = 0;
    if (m->new_snapshot) {
        vs[0] = m->sid.s;
        vs[1] = x->to_snap.s;
        vs[2] = (const char *)m->up.p;
        ls[2] = (int)m->up.len;
        fs[2] = 1;
        vs[3] = (const char *)m->rm.p;
        ls[3] = (int)m->rm.len;
        fs[3] = 1;
        vs[4] = entries;
        vs[5] = depth;
        vs[6] = m->checkpoint ? (const char *)m->cp.p : NULL;
        ls[6] = m->checkpoint ? (int)m->cp.len : 0;
        fs[6] = 1;
        qs[n++] = (mh_db_pq_t){NULL,
                               "INSERT INTO snapshots (snapshot_id, parent_snapshot_id, delta_upsert, delta_remove,"
                               " entry_count, depth, checkpoint) VALUES ($1, $2, $3, $4, $5::int, $6::int, $7)"
                               " ON CONFLICT DO NOTHING",
                               7, vs, ls, fs};
    }
    vc[0] = m->cid.s;
    vc[1] = x->has_to ? x->to_head.s : x->from_head.s;
    vc[2] = x->has_to ? x->from_head.s : NULL;
    vc[3] = m->sid.s;
    vc[4] = m->message;
    vc[5] = m->author;
    vc[6] = m->committed_at;
    vc[7] = x->to;
    vc[8] = gen;
    qs[n++] = (mh_db_pq_t){NULL,
                           "INSERT INTO commits (commit_id, parent_commit_id, parent2_commit_id, snapshot_id, message,"
                           " author, committed_at, branch, generation) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::int)"
                           " ON CONFLICT DO NOTHING",
                           9, vc, NULL, NULL};
    vr[0] = x->repo->repo_id;
    vr[1] = m->cid.s;
    vr[2] = x->to;
    /* The branch is this repository's own (per-repository metadata,
     * sql/0008). */
    qs[n++] = (mh_db_pq_t){NULL,
                           "INSERT INTO commit_refs (repo_id, commit_id, branch) VALUES ($1, $2, $3)"
                           " ON CONFLICT DO NOTHING",
                           3, vr, NULL, NULL};
    const char **vsr = mh_alloc(a, 2 * sizeof *vsr);
    if (!vsr) {
        mfail(m, 503, "unavailable", "out of memory");
        return;
    }
    vsr[0] = x->repo->repo_id;
    vsr[1] = m->sid.s;
    qs[n++] = (mh_db_pq_t){NULL,
                           "INSERT INTO snapshot_refs (repo_id, snapshot_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", 2,
                           vsr, NULL, NULL};
    vb[0] = x->repo->repo_id;
    vb[1] = x->to;
    vb[2] = m->cid.s;
    /* The to_branch row is locked (LOCK); a missing one is created here
     * and a concurrent creator collides on its key (409). */
    qs[n++] = (mh_db_pq_t){NULL,
                           x->has_to ? "UPDATE branches SET head_commit_id = $3, updated_at = now()"
                                       " WHERE repo_id = $1 AND name = $2"
                                     : "INSERT INTO branches (repo_id, name, head_commit_id) VALUES ($1, $2, $3)",
                           3, vb, NULL, NULL};
    vq[0] = x->pid;
    vq[1] = x->repo->repo_id;
    vq[2] = m->cid.s;
    qs[n++] = (mh_db_pq_t){NULL,
                           "UPDATE proposals SET state = 'merged', merge_commit_id = $3, updated_at = now()"
                           " WHERE proposal_id = $1 AND repo_id = $2",
                           3, vq, NULL, NULL};
    qs[n++] = (mh_db_pq_t){NULL,
                           "UPDATE repos SET state_seq = state_seq + 1, updated_at = now() WHERE repo_id = $1", 1, vr,
                           NULL, NULL};
    m->busy = true;
    mh_dbconn_pipeline(m->conn, qs, n, m_write_cb, m);
}

/* -------------------------------------------------------------- advance */

static void madvance(merge_t *m)
{
    pctx_t *x = &m->x;
    mh_hub_t *hub = x->hub;
    while (!m->busy && m->state != M_DONE) {
        switch (m->state) {
        case M_PROPOSAL: {
            m->busy = true;
            const char *vals[2] = {x->pid, x->repo->repo_id};
            mh_db_exec(hub->db, &st_proposal, vals, NULL, NULL, m_row_cb, m);
            break;
        }
        case M_GRAPH:
            m->busy = true;
            ctx_graph(x, m_graph_done);
            break;
        case M_DEPTH: {
            m->busy = true;
            const char *vals[1] = {x->to_snap.s};
            mh_db_query(hub->db, "SELECT depth FROM snapshots WHERE snapshot_id = $1", 1, vals, NULL, NULL, m_depth_cb,
                        m);
            break;
        }
        case M_LOAD_BASE:
            m->busy = true;
            mh_hub_load_manifest(hub, &m->work, x->base_snap.s, &m->base_m, m_manifest_cb, m);
            break;
        case M_LOAD_OURS:
            m->busy = true;
            mh_hub_load_manifest(hub, &m->work, x->to_snap.s, &m->ours_m, m_manifest_cb, m);
            break;
        case M_LOAD_THEIRS:
            m->busy = true;
            mh_hub_load_manifest(hub, &m->work, x->from_snap.s, &m->theirs_m, m_manifest_cb, m);
            break;
        case M_MERGE: {
            char *msg = mh_sprintf(&m->work, "Merge proposal #%lld from %s into %s\n\n%s", (long long)x->number,
                                   x->from, x->to, x->title);
            if (!msg) {
                mfail(m, 503, "unavailable", "out of memory");
                return;
            }
            m->message = msg;
            m->busy = true;
            m->uvw.data = m;
            uv_queue_work(hub->loop, &m->uvw, merge_work, m_work_done);
            break;
        }
        case M_MERGED:
            if (m->nconf) {
                respond_conflict(m);
                return;
            }
            m->state = M_ACQUIRE;
            break;
        case M_ACQUIRE:
            m->busy = true;
            mh_db_acquire(hub->db, m_acquire_cb, m);
            break;
        case M_BEGIN:
            m->busy = true;
            mh_dbconn_script(m->conn, "BEGIN", m_step_cb, m); /* -> M_LOCK */
            break;
        case M_LOCK:
            m_start_lock(m);
            break;
        case M_WRITE:
            m_start_write(m);
            if (m->state == M_DONE) return;
            break;
        case M_COMMIT:
            m->busy = true;
            mh_dbconn_script(m->conn, "COMMIT", m_step_cb, m); /* -> M_COMMITTED */
            break;
        case M_COMMITTED: {
            mh_dbconn_release(m->conn);
            m->conn = NULL;
            m->state = M_DONE;
            mh_fetch_cache_invalidate(hub, x->repo->repo_id);
            mh_hub_manifest_cache_put(hub, m->sid.s, &m->merged);
            mh_info("req %s: proposal %s #%lld merged: %s -> %s, merge commit %s, %llu ms", x->req->id, x->pid,
                    (long long)x->number, x->from, x->to, m->cid.s,
                    (unsigned long long)((mh_now_us() - m->t0) / 1000));
            mh_arena_t *a = &x->req->arena;
            mh_val_t *v = mh_v_map(a);
            int rc = v ? 0 : MH_ENOMEM;
            if (!rc) rc = mh_map_put(a, v, "proposal_id", mh_v_str(x->pid));
            if (!rc) rc = mh_map_put(a, v, "number", mh_v_int(x->number));
            if (!rc) rc = mh_map_put(a, v, "state", mh_v_str("merged"));
            if (!rc) rc = mh_map_put(a, v, "merge_commit_id", mh_v_str(m->cid.s));
            if (!rc) rc = mh_map_put(a, v, "snapshot_id", mh_v_str(m->sid.s));
            if (!rc) rc = mh_map_put(a, v, "to_branch", mh_v_str(x->to));
            if (!rc) rc = mh_map_put(a, v, "from_branch", mh_v_str(x->from));
            if (!rc) rc = mh_map_put(a, v, "merge_base", x->has_base ? mh_v_str(x->base.s) : mh_v_nil());
            if (rc) nomem(x->req);
            else mh_res_val(x->req, 200, v);
            return;
        }
        case M_DONE:
            break;
        }
    }
}

static void merge_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    merge_t *m = req->user;
    m->x.repo = repo;
    const mh_caller_t *caller = mh_req_caller(req);
    m->author = (char *)(caller->handle ? caller->handle : "anonymous");
    m->state = M_PROPOSAL;
    madvance(m);
}

void mh_h_proposal_merge(mh_req_t *req)
{
    merge_t *m = mh_calloc(&req->arena, sizeof *m);
    if (!m || mh_arena_defer(&req->arena, merge_free, m)) {
        nomem(req);
        return;
    }
    mh_arena_init(&m->work, WORK_ARENA_LIMIT);
    m->x.req = req;
    m->x.hub = req->app;
    m->t0 = mh_now_us();
    if (!proposal_param(req, m->x.pid)) return;
    req->user = m;
    mh_hub_load_repo(req, MH_PERM_WRITE, merge_repo_cb);
}
