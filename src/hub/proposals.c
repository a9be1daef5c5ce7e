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
 * Merge is an operation of the step kit: PROPOSAL (the row, must be open)
 * -> GRAPH (the repository's commit graph at the state just read: branch
 * heads and the merge base, merge.c) -> DEPTH (of to-head's snapshot row)
 * -> three manifests (base, ours = to_branch head, theirs = from_branch
 * head) -> MERGE (thread pool: three-way merge; the merge commit built by
 * refwrite) -> the transaction in refwrite's lock order: BEGIN (the
 * repository row), LOCK (the proposal row, from_branch's head), CHECK
 * (to_branch's row; the move judged: a merge commit on the head it was
 * computed from), WRITE (snapshot, commit, refs, the move, the proposal
 * marked merged), COMMIT.
 *
 * Invariants: a merge writes nothing when it conflicts, when the proposal
 * is no longer open, or when either branch moved since the merge was
 * computed (then it is recomputed once from a fresh graph, and a second
 * move is a 409); otherwise every row goes in one transaction. The
 * merge commit is in PostgreSQL only and adds no blob: every object of
 * the merged manifest is already referenced by this repository (it comes
 * from one of its two heads).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub_internal.h"
#include "merge.h"

#define MAX_TITLE 1024
#define MAX_BODY (256 * 1024)
#define LIST_MAX "1000"     /* proposals listed, newest first */
#define DIFF_MAX 10000      /* paths listed per kind in a diff summary */
#define CONFLICTS_MAX 10000 /* paths listed in a conflict answer */
#define WORK_ARENA_LIMIT ((size_t)1 << 30)

/* The columns every proposal query returns, in proposal_val's order. */
#define PCOLS                                                                                                          \
    "proposal_id, number, state, title, body, from_branch, to_branch, created_by,"                                     \
    " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'),"                               \
    " to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), merge_commit_id, repo_id"
#define NPCOLS 12

/* The proposal of row r (PCOLS from column c0) as a response map. */
static mh_val_t *proposal_val(mh_vb_t *b, PGresult *res, int r, int c0)
{
    static const char *const names[NPCOLS] = {"proposal_id", "number",      "state",           "title",
                                              "body",        "from_branch", "to_branch",       "created_by",
                                              "created_at",  "updated_at",  "merge_commit_id", "repo_id"};
    mh_val_t *m = mh_vb_map(b);
    for (int i = 0; i < NPCOLS; i++) {
        bool null = mh_pq_isnull(res, r, c0 + i);
        mh_vb_put(b, m, names[i],
                  null     ? mh_v_nil()
                  : i == 1 ? mh_v_int(mh_pq_int(res, r, c0 + i))
                           : mh_vb_str(b, mh_pq_str(res, r, c0 + i)));
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
    if (!mh__db_ok(req, err, errmsg)) return;
    PGresult *res = results[n - 1];
    if (PQntuples(res) != 1) {
        mh_res_error(req, 422, "unknown_branch", "from_branch '%s' does not exist in this repository", p->from);
        return;
    }
    mh_info("req %s: proposal %s #%s opened: %s -> %s", req->id, p->id.s, mh_pq_str(res, 0, 1), p->from, p->to);
    mh_res_val(req, 201, proposal_val(mh_res_build(req), res, 0, 0));
}

static void create_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    pcreate_t *p = req->user;
    const mh_caller_t *caller = mh_req_caller(req);
    /* One implicit transaction: the lock, then the insert, whose
     * statement snapshot is taken after the lock is held (READ
     * COMMITTED), so max(number) sees every proposal committed before.
     * from_branch must exist; to_branch may be created by the merge. */
    mh_db_batch_t b = {0};
    mh_db_batch_add(&b, "SELECT pg_advisory_xact_lock(hashtextextended('musehub:proposals:' || $1::text, 0))", 1,
                    repo->repo_id);
    mh_db_batch_add(&b,
                    "INSERT INTO proposals (proposal_id, repo_id, number, title, body, from_branch, to_branch,"
                    " created_by) SELECT $1, $2, coalesce((SELECT max(number) FROM proposals WHERE repo_id = $2), 0)"
                    " + 1, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM branches WHERE repo_id = $2 AND name = $5)"
                    " RETURNING " PCOLS,
                    7, p->id.s, repo->repo_id, p->title, p->body, p->from, p->to,
                    caller->handle ? caller->handle : "anonymous");
    mh_db_pipeline(hub->db, b.q, b.n, create_cb, p);
}

void mh_h_proposal_create(mh_req_t *req)
{
    mh_val_t body;
    if (!mh__body_map(req, &body)) return;
    mh_arena_t *a = &req->arena;
    pcreate_t *p = mh_calloc(a, sizeof *p);
    uint8_t rnd[32];
    if (!p || mh_random(rnd, sizeof rnd)) {
        mh_res_fail(req, MH_ENOMEM, "proposal");
        return;
    }
    p->req = req;
    mh_id_from_digest(&p->id, rnd);
    if (!(p->title = mh__text_field(a, mh_val_get(&body, "title"), MAX_TITLE, false))) {
        mh_res_error(req, 422, "invalid_field", "'title' must be a UTF-8 string of 1..%d bytes without NUL", MAX_TITLE);
        return;
    }
    const mh_val_t *bv = mh_val_get(&body, "body");
    p->body = "";
    if (bv && bv->t != MH_V_NIL && !(p->body = mh__text_field(a, bv, MAX_BODY, true))) {
        mh_res_error(req, 422, "invalid_field", "'body' must be a UTF-8 string of at most %d bytes without NUL",
                     MAX_BODY);
        return;
    }
    char from[256], to[256];
    if (!mh__body_branch(req, &body, "from_branch", from) || !mh__body_branch(req, &body, "to_branch", to)) return;
    if (strcmp(from, to) == 0) {
        mh_res_error(req, 422, "invalid_field", "from_branch and to_branch must differ");
        return;
    }
    if (!(p->from = mh_strdup(a, from)) || !(p->to = mh_strdup(a, to))) {
        mh_res_fail(req, MH_ENOMEM, "proposal");
        return;
    }
    req->user = p;
    mh_hub_load_repo(req, MH_PERM_WRITE, create_repo_cb);
}

/* ================================================================ list */

static mh_val_t *list_row(mh_req_t *req, mh_vb_t *b, PGresult *res, int i)
{
    (void)req;
    return proposal_val(b, res, i, 0);
}

static void list_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh__list_answer(ud, res, err, errmsg, "proposals", list_row);
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
        if (!(req->user = mh_strndup(&req->arena, st.p, st.n))) {
            mh_res_fail(req, MH_ENOMEM, "proposals");
            return;
        }
    }
    mh_hub_load_repo(req, MH_PERM_READ, list_repo_cb);
}

/* =============================================================== close */

static void close_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_req_t *req = ud;
    if (!mh__db_one(req, res, err, errmsg, "proposal not found")) return;
    if (mh_pq_str(res, 0, 0)[0] != '1') {
        mh_res_error(req, 409, "not_open", "the proposal is %s, not open", mh_pq_str(res, 0, 3));
        return;
    }
    mh_res_val(req, 200, proposal_val(mh_res_build(req), res, 0, 1));
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
    char *id = mh__req_alloc(req, MH_ID_SIZE);
    if (!id || !proposal_param(req, id)) return;
    req->user = id;
    mh_hub_load_repo(req, MH_PERM_WRITE, close_repo_cb);
}

/* ====================================================== graph helpers */

/* What both GET (diff summary) and merge need: the proposal row, the
 * repository's graph, the two heads and their merge base. */
typedef struct {
    mh__op_t *op; /* the operation's head: request, hub, repository */
    char pid[MH_ID_SIZE];
    mh_val_t *pval; /* the proposal as a response map */
    char *state, *title, *from, *to;
    int64_t number;
    mh_graph_t *g;
    bool has_from, has_to, has_base;
    uint32_t from_node, to_node;
    mh_id_t from_head, to_head, base, from_snap, to_snap, base_snap;
} pctx_t;

/* Fills what both operations start with; false after answering 404 for a
 * proposal id that cannot exist. */
static bool ctx_init(pctx_t *x, mh__op_t *op)
{
    x->op = op;
    return proposal_param(op->req, x->pid);
}

static const mh_stmt_t st_proposal = {"proposal_by_id",
                                      "SELECT " PCOLS " FROM proposals WHERE proposal_id = $1 AND repo_id = $2", 2};

/* Copies the proposal row (PCOLS) out of res. */
static int ctx_row(pctx_t *x, PGresult *res)
{
    mh_vb_t *b = mh_res_build(x->op->req);
    mh_arena_t *a = &x->op->req->arena;
    x->pval = proposal_val(b, res, 0, 0);
    x->number = mh_pq_int(res, 0, 1);
    x->state = mh_strdup(a, mh_pq_str(res, 0, 2));
    x->title = mh_strdup(a, mh_pq_str(res, 0, 3));
    x->from = mh_strdup(a, mh_pq_str(res, 0, 5));
    x->to = mh_strdup(a, mh_pq_str(res, 0, 6));
    return x->pval && x->state && x->title && x->from && x->to ? 0 : MH_ENOMEM;
}

/* Resolves a branch to its head node, id and snapshot id. */
static bool ctx_head(const mh_graph_t *g, const char *name, uint32_t *node, mh_id_t *head, mh_id_t *snap)
{
    const mh_gbranch_t *b = mh__graph_branch(g, name, strlen(name));
    if (!b || b->node == MH_GNONE) return false;
    *node = b->node;
    mh__graph_id(g, b->node, head);
    mh__graph_snap_id(g, b->node, snap);
    return true;
}

/* Resolves both heads and the merge base on x->g. */
static int ctx_resolve(pctx_t *x)
{
    const mh_graph_t *g = x->g;
    x->has_base = false;
    x->has_from = ctx_head(g, x->from, &x->from_node, &x->from_head, &x->from_snap);
    x->has_to = ctx_head(g, x->to, &x->to_node, &x->to_head, &x->to_snap);
    if (!x->has_from || !x->has_to) return 0;
    uint32_t b;
    int rc = mh__graph_merge_base(g, x->from_node, x->to_node, &b);
    if (rc || b == MH_GNONE) return rc;
    x->has_base = true;
    mh__graph_id(g, b, &x->base);
    mh__graph_snap_id(g, b, &x->base_snap);
    return 0;
}

/* The graph callback of a step (ud = the step, whose operation starts
 * with its pctx_t; see the two users below). */
static void ctx_graph_cb(void *ud, mh_graph_t *g, int err, const char *errmsg);

/* Gets the repository's graph at the state load_repo read (the cached one,
 * else one query), resolves the heads and the base, then goes on. */
static void ctx_graph(mh_step_t *s, pctx_t *x)
{
    mh_graph_t *g = mh__graph_cache_get(x->op->hub, x->op->repo->repo_id, x->op->repo->state_seq);
    mh_step_wait(s);
    if (g) {
        ctx_graph_cb(s, g, 0, NULL);
        return;
    }
    if (mh__graph_load(x->op->hub, &x->op->req->arena, x->op->repo->repo_id, ctx_graph_cb, s))
        mh_step_resume(s, MH_ENOMEM, "graph");
}

/* ================================================ get (+ diff summary) */

typedef struct {
    mh__op_t op;
    pctx_t x;
    mh_manifest_t base_m, head_m;
} pget_t;

/* Both operations that use pctx_t keep it right after their head. */
static pctx_t *ctx_of(mh_step_t *s) { return &MH_STEP_OP(s, pget_t, op.step)->x; }

static void ctx_graph_cb(void *ud, mh_graph_t *g, int err, const char *errmsg)
{
    mh_step_t *s = ud;
    pctx_t *x = ctx_of(s);
    if (!err && mh__graph_hold(&x->op->req->arena, g)) err = MH_ENOMEM;
    if (!err) {
        x->g = g;
        err = ctx_resolve(x);
        errmsg = "merge base";
    }
    mh_step_resume(s, err, errmsg);
}

#define G(s) MH_STEP_OP(s, pget_t, op.step)

enum { G_ROW, G_GRAPH, G_BASE, G_HEAD, G_DONE };

static int pget_row(mh_step_t *s, PGresult *res)
{
    if (PQntuples(res) != 1) {
        mh_step_refuse(s, 404, "not_found", "proposal not found");
        return 0;
    }
    return ctx_row(&G(s)->x, res);
}

static void pget_step_row(mh_step_t *s)
{
    pctx_t *x = &G(s)->x;
    mh_db_pq_t q = {&st_proposal, NULL, 0, (const char *const[]){x->pid, x->op->repo->repo_id}, NULL, NULL};
    mh_step_query(s, &q, pget_row);
}

static void pget_step_graph(mh_step_t *s) { ctx_graph(s, &G(s)->x); }

/* The diff runs from the merge base to from_branch's head; with no base
 * (to_branch absent, unrelated histories) everything on from_branch counts
 * as added; with from_branch gone there is no diff. */
static void pget_step_base(mh_step_t *s)
{
    pget_t *p = G(s);
    if (!p->x.has_from) {
        mh_step_goto(s, G_DONE);
        return;
    }
    if (!p->x.has_base) return;
    mh_step_wait(s);
    mh_hub_load_manifest(p->op.hub, &p->op.work, p->x.base_snap.s, &p->base_m, mh__manifest_step_cb, s);
}

static void pget_step_head(mh_step_t *s)
{
    pget_t *p = G(s);
    mh_step_wait(s);
    mh_hub_load_manifest(p->op.hub, &p->op.work, p->x.from_snap.s, &p->head_m, mh__manifest_step_cb, s);
}

static void put_paths(mh_vb_t *b, mh_val_t *map, const char *key, const mh_mpath_t *ps, size_t n)
{
    mh_val_t *arr = mh_vb_arr(b);
    for (size_t i = 0; i < n && i < DIFF_MAX; i++) mh_vb_push(b, arr, mh_v_strn(ps[i].path, ps[i].plen));
    mh_vb_put(b, map, key, mh_vb_node(b, arr));
}

static void pget_finish(mh_step_t *s)
{
    pget_t *p = G(s);
    mh_req_t *req = p->op.req;
    if (mh__op_failed(s, NULL)) return;
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = p->x.pval;
    mh_vb_put(b, m, "from_head", p->x.has_from ? mh_v_str(p->x.from_head.s) : mh_v_nil());
    mh_vb_put(b, m, "to_head", p->x.has_to ? mh_v_str(p->x.to_head.s) : mh_v_nil());
    mh_vb_put(b, m, "merge_base", p->x.has_base ? mh_v_str(p->x.base.s) : mh_v_nil());
    mh_val_t diff = mh_v_nil();
    mh_mchanges_t ch;
    if (p->x.has_from && !b->err) {
        mh_val_t *d = mh_vb_map(b);
        if (mh__manifest_changes(&req->arena, &p->base_m, &p->head_m, &ch)) b->err = MH_ENOMEM;
        else {
            put_paths(b, d, "added", ch.added, ch.nadded);
            put_paths(b, d, "changed", ch.changed, ch.nchanged);
            put_paths(b, d, "removed", ch.removed, ch.nremoved);
            mh_vb_put(b, d, "truncated",
                      mh_v_bool(ch.nadded > DIFF_MAX || ch.nchanged > DIFF_MAX || ch.nremoved > DIFF_MAX));
        }
        diff = mh_vb_node(b, d);
    }
    mh_vb_put(b, m, "diff", diff);
    mh_res_val(req, 200, m);
}

static void pget_free(void *arg)
{
    pget_t *p = arg;
    mh_manifest_free(&p->base_m);
    mh_manifest_free(&p->head_m);
}

static const mh_step_def_t pget_steps[] = {
    [G_ROW] = {"row", pget_step_row},    [G_GRAPH] = {"graph", pget_step_graph}, [G_BASE] = {"base", pget_step_base},
    [G_HEAD] = {"head", pget_step_head}, [G_DONE] = {"done", mh_step_done},
};

static const mh__op_def_t pget_def = {"proposal", MH__STEPS(pget_steps), pget_finish, pget_free, WORK_ARENA_LIMIT};

void mh_h_proposal_get(mh_req_t *req)
{
    pget_t *p = MH__OP_NEW(req, pget_t, &pget_def);
    if (!p || !ctx_init(&p->x, &p->op)) return;
    mh_hub_load_repo(req, MH_PERM_READ, mh__op_repo_cb);
}

/* =============================================================== merge */

typedef struct {
    mh__op_t op;
    pctx_t x; /* right after the head, as pget_t's (ctx_of) */
    mh_manifest_t base_m, ours_m, theirs_m, merged;
    mh_mpath_t *conf;
    size_t nconf;
    int64_t ours_depth;
    mh_rw_commit_t c;
    char *author;
    mh_move_t mv;
    bool retried; /* the merge was recomputed once after a branch moved */
} merge_t;

_Static_assert(offsetof(merge_t, x) == offsetof(pget_t, x), "ctx_of reads pctx_t right after the head");

#define M(s) MH_STEP_OP(s, merge_t, op.step)

enum {
    M_PROPOSAL,
    M_GRAPH,
    M_DEPTH,
    M_LOAD_BASE,
    M_LOAD_OURS,
    M_LOAD_THEIRS,
    M_MERGE,
    M_ACQUIRE,
    M_BEGIN,
    M_LOCK,
    M_CHECK,
    M_WRITE,
    M_COMMIT,
    M_DONE
};

/* Forgets everything computed from a graph, before recomputing. */
/* Frees what a merge computed (before a recompute, and as the
 * operation's cleanup). */
static void merge_reset(void *arg)
{
    merge_t *m = arg;
    mh_manifest_free(&m->base_m);
    mh_manifest_free(&m->ours_m);
    mh_manifest_free(&m->theirs_m);
    mh_manifest_free(&m->merged);
    free(m->conf);
    m->conf = NULL;
    m->nconf = 0;
    m->ours_depth = 0;
    mh_rw_commit_free(&m->c);
    m->c = (mh_rw_commit_t){0};
}

static int merge_row(mh_step_t *s, PGresult *res)
{
    pctx_t *x = &M(s)->x;
    if (PQntuples(res) != 1) {
        mh_step_refuse(s, 404, "not_found", "proposal not found");
        return 0;
    }
    int rc = ctx_row(x, res);
    if (!rc && strcmp(x->state, "open") != 0)
        mh_step_refuse(s, 409, "not_open", "proposal #%lld is %s; only an open proposal can be merged",
                       (long long)x->number, x->state);
    return rc;
}

static void step_proposal(mh_step_t *s)
{
    pctx_t *x = &M(s)->x;
    mh_db_pq_t q = {&st_proposal, NULL, 0, (const char *const[]){x->pid, x->op->repo->repo_id}, NULL, NULL};
    mh_step_query(s, &q, merge_row);
}

static void step_graph(mh_step_t *s) { ctx_graph(s, &M(s)->x); }

static int depth_read(mh_step_t *s, PGresult *res)
{
    merge_t *m = M(s);
    if (PQntuples(res) != 1) {
        mh_step_fail(s, MH_EDB, "the snapshot row of to_branch's head is missing");
        return 0;
    }
    m->ours_depth = mh_pq_int(res, 0, 0);
    if (!m->x.has_base) mh_step_goto(s, M_LOAD_OURS);
    return 0;
}

static void step_depth(mh_step_t *s)
{
    pctx_t *x = &M(s)->x;
    if (!x->has_from) {
        mh_step_refuse(s, 409, "unknown_branch", "from_branch '%s' does not exist", x->from);
        return;
    }
    if (x->has_to && x->has_base && strcmp(x->base.s, x->from_head.s) == 0) {
        mh_step_refuse(s, 409, "nothing_to_merge", "'%s' has no commit that '%s' lacks (%s is already in it)", x->from,
                       x->to, x->from_head.s);
        return;
    }
    /* Without a to_branch the merged tree is from_branch's: only its
     * manifest is needed (base and ours stay empty). */
    if (!x->has_to) {
        mh_step_goto(s, M_LOAD_THEIRS);
        return;
    }
    mh_db_pq_t q = {
        NULL, "SELECT depth FROM snapshots WHERE snapshot_id = $1", 1, (const char *const[]){x->to_snap.s}, NULL, NULL};
    mh_step_query(s, &q, depth_read);
}

static void load(mh_step_t *s, const mh_id_t *snap, mh_manifest_t *out)
{
    merge_t *m = M(s);
    mh_step_wait(s);
    mh_hub_load_manifest(m->op.hub, &m->op.work, snap->s, out, mh__manifest_step_cb, s);
}

static void step_load_base(mh_step_t *s) { load(s, &M(s)->x.base_snap, &M(s)->base_m); }
static void step_load_ours(mh_step_t *s) { load(s, &M(s)->x.to_snap, &M(s)->ours_m); }
static void step_load_theirs(mh_step_t *s) { load(s, &M(s)->x.from_snap, &M(s)->theirs_m); }

/* Thread pool: the three-way merge, then the merge commit (always one,
 * parents (to-head, from-head); its snapshot a delta against to-head's). */
static void merge_work(mh_step_t *s)
{
    merge_t *m = M(s);
    pctx_t *x = &m->x;
    if (mh__merge_manifests(&m->base_m, &m->ours_m, &m->theirs_m, &m->merged, &m->conf, &m->nconf)) {
        s->work_err = MH_ENOMEM;
        return;
    }
    if (m->nconf) return;
    mh_rw_commit_t *c = &m->c;
    const mh_graph_t *g = x->g;
    if (x->has_to) {
        c->parents[c->nparents] = x->to_head.s;
        c->parent_gens[c->nparents++] = g->nodes[x->to_node].gen;
    }
    c->parents[c->nparents] = x->from_head.s;
    c->parent_gens[c->nparents++] = g->nodes[x->from_node].gen;
    c->parent_snap = x->has_to ? x->to_snap.s : x->from_snap.s;
    c->parent_depth = m->ours_depth;
    c->parent_m = x->has_to ? &m->ours_m : &m->theirs_m;
    c->m = &m->merged;
    c->author = m->author;
    c->branch = x->to;
    if (mh_rw_commit_build(c)) s->work_err = MH_ENOMEM;
}

static void step_merge(mh_step_t *s)
{
    merge_t *m = M(s);
    pctx_t *x = &m->x;
    m->c.message = mh_sprintf(&m->op.work, "Merge proposal #%lld from %s into %s\n\n%s", (long long)x->number, x->from,
                              x->to, x->title);
    if (!m->c.message) {
        mh_step_fail(s, MH_ENOMEM, "merge");
        return;
    }
    mh_step_work(s, merge_work);
}

static void step_acquire(mh_step_t *s)
{
    if (M(s)->nconf) { /* answered by finish: 409 with the paths */
        mh_step_done(s);
        return;
    }
    mh_step_acquire(s);
}

static void step_begin(mh_step_t *s) { mh_rw_begin(s, M(s)->op.repo->repo_id, NULL, 0); }

/* Starts over from a fresh graph, once: a branch moved since the graph
 * was read (a concurrent push or commit, or a graph this process cached
 * at a state another process already changed, whose invalidation is a
 * NOTIFY away). */
static bool recompute(mh_step_t *s, const char *moved)
{
    merge_t *m = M(s);
    if (m->retried) return false;
    m->retried = true;
    mh_step_rollback(s);
    merge_reset(m);
    mh__graph_cache_drop(m->op.hub, m->op.repo->repo_id);
    mh_info("req %s: merge of proposal %s: '%s' moved meanwhile; recomputing", m->op.req->id, m->x.pid, moved);
    mh_step_goto(s, M_GRAPH);
    return true;
}

/* Rows: the proposal's state (locked), from_branch's head. */
static int locked(mh_step_t *s, PGresult **r, int n)
{
    pctx_t *x = &M(s)->x;
    if (n != 2) return MH_EDB;
    if (PQntuples(r[0]) != 1) {
        mh_step_refuse(s, 404, "not_found", "proposal not found");
        return 0;
    }
    const char *st = mh_pq_str(r[0], 0, 0);
    if (strcmp(st, "open") != 0) {
        mh_step_refuse(s, 409, "not_open", "proposal #%lld is %s; only an open proposal can be merged",
                       (long long)x->number, st);
        return 0;
    }
    const char *from = PQntuples(r[1]) ? mh_pq_str(r[1], 0, 0) : NULL;
    if ((!from || strcmp(from, x->from_head.s) != 0) && !recompute(s, x->from))
        mh_step_refuse(s, 409, "stale_head", "branch '%s' moved while the merge was computed; retry the merge",
                       x->from);
    return 0;
}

static void step_lock(mh_step_t *s)
{
    pctx_t *x = &M(s)->x;
    /* After the repository row, before the branch row: the proposal (two
     * merges of one proposal: one wins), and from_branch's head. */
    mh_db_batch_t b = {0};
    mh_db_batch_add(&b, "SELECT state FROM proposals WHERE proposal_id = $1 AND repo_id = $2 FOR UPDATE", 2, x->pid,
                    x->op->repo->repo_id);
    mh_db_batch_add(&b, "SELECT head_commit_id FROM branches WHERE repo_id = $1 AND name = $2", 2, x->op->repo->repo_id,
                    x->from);
    mh_step_batch(s, &b, locked);
}

static void step_check(mh_step_t *s)
{
    merge_t *m = M(s);
    pctx_t *x = &m->x;
    const char *to = x->has_to ? x->to_head.s : NULL;
    mh_rw_commit_move(s, &m->mv, x->op->repo->repo_id, x->to, MH_MOVE_MERGE, m->c.cid.s, to, to);
}

static void step_write(mh_step_t *s)
{
    merge_t *m = M(s);
    pctx_t *x = &m->x;
    if (m->mv.verdict == MH_MOVE_STALE && recompute(s, x->to)) return;
    if (m->mv.verdict == MH_MOVE_STALE) {
        mh_step_refuse(s, 409, "stale_head", "branch '%s' moved while the merge was computed; retry the merge", x->to);
        return;
    }
    if (m->mv.verdict) {
        mh_rw_move_refuse(s, &m->mv);
        return;
    }
    mh_db_batch_t b = {0};
    mh_rw_commit_rows(&b, x->op->repo->repo_id, &m->c);
    mh_rw_move_rows(&b, &m->mv);
    mh_db_batch_add(&b,
                    "UPDATE proposals SET state = 'merged', merge_commit_id = $3, updated_at = now()"
                    " WHERE proposal_id = $1 AND repo_id = $2",
                    3, x->pid, x->op->repo->repo_id, m->c.cid.s);
    m->op.new_sid = m->c.sid.s;
    m->op.new_m = &m->merged;
    mh_step_batch(s, &b, NULL);
}

static const mh_step_def_t merge_steps[] = {
    [M_PROPOSAL] = {"proposal", step_proposal},
    [M_GRAPH] = {"graph", step_graph},
    [M_DEPTH] = {"depth", step_depth},
    [M_LOAD_BASE] = {"load_base", step_load_base},
    [M_LOAD_OURS] = {"load_ours", step_load_ours},
    [M_LOAD_THEIRS] = {"load_theirs", step_load_theirs},
    [M_MERGE] = {"merge", step_merge},
    [M_ACQUIRE] = {"acquire", step_acquire},
    [M_BEGIN] = {"begin", step_begin},
    [M_LOCK] = {"lock", step_lock},
    [M_CHECK] = {"check", step_check},
    [M_WRITE] = {"write", step_write},
    [M_COMMIT] = {"commit", mh_step_commit},
    [M_DONE] = {"done", mh__op_step_done},
};

/* Answers 409 {"error": "conflict", "detail", "paths": [...]}: SPEC 4.6's
 * error body with the extra key. */
static void answer_conflict(merge_t *m)
{
    mh_req_t *req = m->op.req;
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *v = mh_vb_map(b), *paths = mh_vb_arr(b);
    char *detail = mh_sprintf(&req->arena, "%zu path%s changed differently on '%s' and '%s' since %s", m->nconf,
                              m->nconf == 1 ? "" : "s", m->x.to, m->x.from,
                              m->x.has_base ? m->x.base.s : "their creation (unrelated histories)");
    for (size_t i = 0; i < m->nconf && i < CONFLICTS_MAX; i++)
        mh_vb_push(b, paths, mh_v_strn(m->conf[i].path, m->conf[i].plen));
    mh_vb_put(b, v, "error", mh_v_str("conflict"));
    mh_vb_put(b, v, "detail", detail ? mh_v_str(detail) : mh_vb_node(b, NULL));
    mh_vb_put(b, v, "paths", mh_vb_node(b, paths));
    mh_vb_put(b, v, "truncated", mh_v_bool(m->nconf > CONFLICTS_MAX));
    mh_info("req %s: merge of proposal %s: %zu conflicts", req->id, m->x.pid, m->nconf);
    mh_res_val(req, 409, v);
}

static void merge_finish(mh_step_t *s)
{
    merge_t *m = M(s);
    pctx_t *x = &m->x;
    if (s->err == MH_ECONFLICT) /* a concurrent creator of to_branch won */
        mh_step_refuse(s, 409, "stale_head", "branch '%s' changed concurrently; retry the merge", x->to);
    if (mh__op_failed(s, NULL)) return;
    if (m->nconf) {
        answer_conflict(m);
        return;
    }
    mh_info("req %s: proposal %s #%lld merged: %s -> %s, merge commit %s, %llu ms", x->op->req->id, x->pid,
            (long long)x->number, x->from, x->to, m->c.cid.s, (unsigned long long)((mh_now_us() - s->t0) / 1000));
    mh_vb_t *b = mh_res_build(x->op->req);
    mh_val_t *v = mh_vb_map(b);
    mh_vb_put(b, v, "proposal_id", mh_v_str(x->pid));
    mh_vb_put(b, v, "number", mh_v_int(x->number));
    mh_vb_put(b, v, "state", mh_v_str("merged"));
    mh_vb_put(b, v, "merge_commit_id", mh_v_str(m->c.cid.s));
    mh_vb_put(b, v, "snapshot_id", mh_v_str(m->c.sid.s));
    mh_vb_put(b, v, "to_branch", mh_v_str(x->to));
    mh_vb_put(b, v, "from_branch", mh_v_str(x->from));
    mh_vb_put(b, v, "merge_base", x->has_base ? mh_v_str(x->base.s) : mh_v_nil());
    mh_res_val(x->op->req, 200, v);
}

static const mh__op_def_t merge_def = {"merge", MH__STEPS(merge_steps), merge_finish, merge_reset, WORK_ARENA_LIMIT};

void mh_h_proposal_merge(mh_req_t *req)
{
    merge_t *m = MH__OP_NEW(req, merge_t, &merge_def);
    if (!m || !ctx_init(&m->x, &m->op)) return;
    const mh_caller_t *caller = mh_req_caller(req);
    m->author = (char *)(caller->handle ? caller->handle : "anonymous");
    mh_hub_load_repo(req, MH_PERM_WRITE, mh__op_repo_cb);
}
