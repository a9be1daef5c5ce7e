/*
 * hub.c — the route table, the caller of a request, and repository
 * resolution with permission checks (SPEC sections 4 and 5).
 *
 * Invariant: every repository-scoped handler goes through
 * mh_hub_load_repo, which decides visibility from the repository row and
 * the caller's collaborator role in ONE query, and answers 404 for a
 * private repository the caller may not read (never 403: that would leak
 * its existence).
 */
#include "hub_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MiB (1024u * 1024u)

/* The one route table: method, pattern, handler, metrics name, body limit,
 * streaming. Order matters only where patterns overlap (first wins). */
const mh_route_t mh_hub_routes[] = {
    {"GET", "/healthz", mh_h_healthz, "healthz", 0, false},
    {"GET", "/readyz", mh_h_readyz, "readyz", 0, false},
    {"GET", "/metrics", mh_h_metrics, "metrics", 0, false},

    {"POST", "/api/repos", mh_h_repo_create, "repo_create", 0, false},
    {"GET", "/api/repos", mh_h_repo_list, "repo_list", 0, false},
    {"GET", "/api/repos/{repo_id}", mh_h_repo_get, "repo_get", 0, false},
    {"PATCH", "/api/repos/{repo_id}", mh_h_repo_patch, "repo_patch", 0, false},
    {"DELETE", "/api/repos/{repo_id}", mh_h_repo_delete, "repo_delete", 0, false},
    {"POST", "/api/repos/{repo_id}/jobs", mh_h_jobs_create, "jobs_create", 0, false},
    {"GET", "/api/jobs/{job_id}", mh_h_job_get, "job_get", 0, false},

    /* Server-side commits, proposals and merges (SPEC 4.6; commits_api.c,
     * proposals.c). A commit carries file contents: up to 64 MiB. */
    {"POST", "/api/repos/{repo_id}/commits", mh_h_repo_commit_create, "repo_commit_create", 64 * MiB, false},
    {"POST", "/api/repos/{repo_id}/proposals", mh_h_proposal_create, "proposal_create", 0, false},
    {"GET", "/api/repos/{repo_id}/proposals", mh_h_proposal_list, "proposal_list", 0, false},
    {"GET", "/api/repos/{repo_id}/proposals/{proposal_id}", mh_h_proposal_get, "proposal_get", 0, false},
    {"POST", "/api/repos/{repo_id}/proposals/{proposal_id}/close", mh_h_proposal_close, "proposal_close", 0, false},
    {"POST", "/api/repos/{repo_id}/proposals/{proposal_id}/merge", mh_h_proposal_merge, "proposal_merge", 0, false},

    /* Branches, protection rules and tags (SPEC 4.2; refs_api.c). A name
     * may contain '/': {*name} takes the path up to a final literal
     * "/protection"; a branch whose own name ends in "/protection" is
     * named with %2F for that slash. The protection routes come first. */
    {"GET", "/api/repos/{repo_id}/branches", mh_h_branch_list, "branch_list", 0, false},
    {"POST", "/api/repos/{repo_id}/branches", mh_h_branch_create, "branch_create", 0, false},
    {"GET", "/api/repos/{repo_id}/branches/{*name}/protection", mh_h_protection_get, "protection_get", 0, false},
    {"PUT", "/api/repos/{repo_id}/branches/{*name}/protection", mh_h_protection_put, "protection_put", 0, false},
    {"DELETE", "/api/repos/{repo_id}/branches/{*name}/protection", mh_h_protection_delete, "protection_delete", 0,
     false},
    {"GET", "/api/repos/{repo_id}/branches/{*name}", mh_h_branch_get, "branch_get", 0, false},
    {"PATCH", "/api/repos/{repo_id}/branches/{*name}", mh_h_branch_move, "branch_move", 0, false},
    {"DELETE", "/api/repos/{repo_id}/branches/{*name}", mh_h_branch_delete, "branch_delete", 0, false},
    {"GET", "/api/repos/{repo_id}/tags", mh_h_tag_list, "tag_list", 0, false},
    {"POST", "/api/repos/{repo_id}/tags", mh_h_tag_create, "tag_create", 0, false},
    {"GET", "/api/repos/{repo_id}/tags/{*name}", mh_h_tag_get, "tag_get", 0, false},
    {"DELETE", "/api/repos/{repo_id}/tags/{*name}", mh_h_tag_delete, "tag_delete", 0, false},

    /* Identities, keys and collaborators (SPEC 5, 4; identities.c). */
    {"POST", "/api/identities", mh_h_identity_create, "identity_create", 0, false},
    {"GET", "/api/identities/{handle}", mh_h_identity_get, "identity_get", 0, false},
    {"POST", "/api/identities/{handle}/keys", mh_h_identity_key_add, "identity_key_add", 0, false},
    {"DELETE", "/api/identities/{handle}/keys/{key_id}", mh_h_identity_key_revoke, "identity_key_revoke", 0, false},
    {"GET", "/api/repos/{repo_id}/collaborators", mh_h_collab_list, "collab_list", 0, false},
    {"PUT", "/api/repos/{repo_id}/collaborators/{handle}", mh_h_collab_put, "collab_put", 0, false},
    {"DELETE", "/api/repos/{repo_id}/collaborators/{handle}", mh_h_collab_delete, "collab_delete", 0, false},

    /* The fs store serves its own presigned URLs. The PUT body is streamed
     * to disk while it is hashed; its size limit is the signed size. */
    {"PUT", "/_store/{*key}", mh_h_store_put, "store_put", UINT64_MAX, true},
    {"GET", "/_store/{*key}", mh_h_store_get, "store_get", 0, false},

    {"GET", "/{owner}/{slug}/refs", mh_h_refs, "refs", 0, false},
    {"POST", "/{owner}/{slug}/push/mpack-presign", mh_h_push_presign, "push_presign", 0, false},
    {"POST", "/{owner}/{slug}/push/unpack-mpack", mh_h_push_unpack, "push_unpack", 0, false},
    {"POST", "/{owner}/{slug}/fetch", mh_h_fetch, "fetch", 0, false, MH_FMT_MSGPACK},
    {"GET", "/{owner}/{slug}/commits", mh_h_commits, "commits", 0, false},
    {"GET", "/{owner}/{slug}/commits/{commit_id}", mh_h_commit, "commit", 0, false},
    {"GET", "/{owner}/{slug}/tree/{*ref}", mh_h_tree, "tree", 0, false},
    {"GET", "/{owner}/{slug}/objects/{object_id}", mh_h_object, "object", 0, false},
    {NULL, NULL, NULL, NULL, 0, false},
};

/* ---------------------------------------------------------------- caller */

const mh_caller_t *mh_req_caller(const mh_req_t *req)
{
    return req->caller ? (const mh_caller_t *)req->caller : mh_caller_anonymous();
}

void mh_hub_pre_route(mh_req_t *req)
{
    /* MSign (SPEC 5): parses and checks the signature now, installs the
     * gate that looks the key up and verifies once the body is complete;
     * unsigned requests act as MUSEHUB_DEV_IDENTITY or anonymously. */
    mh_hub_t *hub = req->app;
    mh_auth_pre_route(hub->auth, req, hub->has_dev_caller ? &hub->dev_caller : NULL);
}

/* --------------------------------------------------------- request fields */

bool mh__body_map(mh_req_t *req, mh_val_t *body)
{
    if (!mh_req_body_val(req, body)) return false;
    if (body->t != MH_V_MAP) {
        mh_res_error(req, 422, "invalid_body", "the body must be a map");
        return false;
    }
    return true;
}

bool mh__body_id(mh_req_t *req, const mh_val_t *body, const char *name, bool required, mh_id_t *out, bool *present)
{
    const mh_val_t *v = mh_val_get(body, name);
    if (present) *present = false;
    if (!v || v->t == MH_V_NIL) {
        if (!required) return true;
        mh_res_error(req, 422, "invalid_field", "'%s' is required", name);
        return false;
    }
    if (v->t != MH_V_STR || !mh_id_valid(v->v.s.p, v->v.s.n)) {
        mh_res_error(req, 422, "invalid_id", "'%s' must be sha256:<64 lowercase hex>", name);
        return false;
    }
    memcpy(out->s, v->v.s.p, MH_ID_LEN);
    out->s[MH_ID_LEN] = 0;
    if (present) *present = true;
    return true;
}

bool mh__body_branch(mh_req_t *req, const mh_val_t *body, const char *name, char out[256])
{
    const mh_val_t *v = mh_val_get(body, name);
    if (!v || v->t != MH_V_STR || !mh_ref_name_valid(v->v.s.p, v->v.s.n)) {
        mh_res_error(req, 422, "invalid_field", "'%s' must be a valid branch name", name);
        return false;
    }
    memcpy(out, v->v.s.p, v->v.s.n);
    out[v->v.s.n] = 0;
    return true;
}

bool mh__body_bool(mh_req_t *req, const mh_val_t *body, const char *name, bool *out)
{
    const mh_val_t *v = mh_val_get(body, name);
    *out = false;
    if (!v || v->t == MH_V_NIL) return true;
    if (v->t != MH_V_BOOL) {
        mh_res_error(req, 422, "invalid_field", "'%s' must be a boolean", name);
        return false;
    }
    *out = v->v.b;
    return true;
}

bool mh__db_ok(mh_req_t *req, int err, const char *errmsg)
{
    if (err) mh_res_fail(req, err, errmsg);
    return !err;
}

bool mh__db_one(mh_req_t *req, PGresult *res, int err, const char *errmsg, const char *absent)
{
    if (!mh__db_ok(req, err, errmsg)) return false;
    if (PQntuples(res) == 1) return true;
    mh_res_error(req, 404, "not_found", "%s", absent);
    return false;
}

const mh_caller_t *mh__signed_caller(mh_req_t *req, const char *what)
{
    const mh_caller_t *c = mh_req_caller(req);
    if (!c->anonymous) return c;
    mh_res_error(req, 401, "unauthorized", "%s needs a signed request", what);
    return NULL;
}

void mh__list_answer(mh_req_t *req, PGresult *res, int err, const char *errmsg, const char *name, mh__row_fn row)
{
    if (!mh__db_ok(req, err, errmsg)) return;
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *arr = mh_vb_arr(b), *out = mh_vb_map(b);
    for (int i = 0; i < PQntuples(res); i++) mh_vb_push(b, arr, mh_vb_node(b, row(req, b, res, i)));
    mh_vb_put(b, out, name, mh_vb_node(b, arr));
    mh_res_val(req, 200, out);
}

void *mh__req_alloc(mh_req_t *req, size_t n)
{
    void *p = mh_calloc(&req->arena, n);
    if (!p) mh_res_fail(req, MH_ENOMEM, "request state");
    return p;
}

char *mh__param_handle(mh_req_t *req)
{
    mh_str_t h = mh_req_param(req, "handle");
    if (!h.p || !mh_handle_valid(h.p, h.n)) {
        mh_res_error(req, 404, "not_found", "no such identity");
        return NULL;
    }
    char *s = mh_strndup(&req->arena, h.p, h.n);
    if (!s) mh_res_fail(req, MH_ENOMEM, "handle");
    return s;
}

char *mh__text_field(mh_arena_t *a, const mh_val_t *v, size_t max, bool allow_empty)
{
    if (!v || v->t != MH_V_STR || v->v.s.n > max || (!allow_empty && v->v.s.n == 0)) return NULL;
    if (memchr(v->v.s.p, 0, v->v.s.n) || !mh_utf8_valid(v->v.s.p, v->v.s.n)) return NULL;
    return mh_strndup(a, v->v.s.p, v->v.s.n);
}

/* ------------------------------------------------- operations' ends */

static void op_release(void *p)
{
    mh__op_t *op = p;
    if (op->def->cleanup) op->def->cleanup(op);
    mh_arena_release(&op->work);
}

void *mh__op_new(mh_req_t *req, size_t size, const mh__op_def_t *def)
{
    mh_hub_t *hub = req->app;
    mh__op_t *op = mh_calloc(&req->arena, size);
    if (op) {
        op->def = def;
        mh_arena_init(&op->work, def->work_limit);
    }
    if (!op || mh_arena_defer(&req->arena, op_release, op)) {
        mh_res_fail(req, MH_ENOMEM, def->what);
        return NULL;
    }
    mh_step_init(&op->step, def->steps, def->nsteps, def->what, req->id,
                 &(mh_step_env_t){hub->loop, hub->db, hub->store}, def->finish);
    op->req = req;
    op->hub = hub;
    req->user = op;
    return op;
}

void mh__op_step_done(mh_step_t *s)
{
    mh__op_t *op = (mh__op_t *)s;
    mh_fetch_cache_invalidate(op->hub, op->repo->repo_id);
    if (op->new_sid) mh_hub_manifest_cache_put(op->hub, op->new_sid, op->new_m);
    mh_step_done(s);
}

void mh__op_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh__op_t *op = req->user;
    op->repo = repo;
    mh_step_run(&op->step);
}

bool mh__op_error(const mh_step_t *s, const char *invalid, mh__err_t *e)
{
    if (!s->status && !s->err) return false;
    const char *why = s->why[0] ? s->why : s->err ? mh_strerror(s->err) : "";
    if (s->status) {
        *e = (mh__err_t){s->status, s->code, s->status == 503};
    } else if (invalid && (s->err == MH_EPARSE || s->err == MH_EHASH)) {
        *e = (mh__err_t){422, invalid, false};
    } else {
        const mh_http_err_t *t = mh_http_err_of(s->err);
        *e = (mh__err_t){t->status, t->code, t->retry};
        /* Busy: come back once the queue of pack work could have moved. */
        const mh_hub_t *hub = ((const mh__op_t *)s)->hub;
        if (s->err == MH_EBUDGET && hub && hub->budget) e->retry_s = mh_budget_retry_after_s(hub->budget);
        if (t->status >= 500) mh_error("req %s: %s failed: %s (%s)", s->id, s->what, mh_strerror(s->err), why);
        if (!t->explain) why = t->detail;
    }
    if (e->status < 500) mh_info("req %s: %s refused: %d %s: %s", s->id, s->what, e->status, e->code, why);
    snprintf(e->detail, sizeof e->detail, "%s", why);
    return true;
}

void mh__res_err(mh_req_t *req, const mh__err_t *e)
{
    char ra[16];
    snprintf(ra, sizeof ra, "%u", e->retry_s ? e->retry_s : 2);
    if (e->retry) mh_res_header(req, "Retry-After", ra);
    mh_res_error(req, e->status, e->code, "%s", e->detail);
}

bool mh__op_failed(mh_step_t *s, const char *invalid)
{
    mh__err_t e;
    if (!mh__op_error(s, invalid, &e)) return false;
    mh__res_err(((mh__op_t *)s)->req, &e);
    return true;
}

int mh__manifest_err(int err)
{
    /* Missing or corrupt stored history is the server's fault. */
    if (err == MH_ENOENT || err == MH_EHASH || err == MH_EPARSE || err == MH_ELIMIT || err == MH_EINVAL) return MH_EDB;
    return err;
}

void mh__manifest_step_cb(void *ud, int err, const char *why) { mh_step_resume(ud, mh__manifest_err(err), why); }

/* ---------------------------------------------------- repo resolution */

typedef struct {
    mh_req_t *req;
    mh_perm_t need;
    mh_repo_cb cb;
    char *key; /* repo cache key */
    size_t klen;
    uint64_t epoch;
} load_repo_t;

static const mh_stmt_t st_repo_by_slug = {
    "repo_by_slug",
    "SELECT r.repo_id, r.owner, r.owner_id, r.name, r.slug, r.visibility, r.description, r.default_branch,"
    " to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), r.state_seq, c.role"
    " FROM repos r LEFT JOIN collaborators c ON c.repo_id = r.repo_id AND c.identity_id = $3"
    " WHERE r.owner = $1 AND r.slug = $2",
    3};

static const mh_stmt_t st_repo_by_id = {
    "repo_by_id",
    "SELECT r.repo_id, r.owner, r.owner_id, r.name, r.slug, r.visibility, r.description, r.default_branch,"
    " to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), r.state_seq, c.role"
    " FROM repos r LEFT JOIN collaborators c ON c.repo_id = r.repo_id AND c.identity_id = $2"
    " WHERE r.repo_id = $1",
    2};

/* The permission checks shared by a cache hit and a fresh row. */
static void load_repo_finish(load_repo_t *lr, mh_repo_t *r, const char *role)
{
    mh_req_t *req = lr->req;
    const mh_caller_t *caller = mh_req_caller(req);
    r->perm = mh_auth_perm(caller, r->owner_id, strcmp(r->visibility, "public") == 0, role);
    if (r->perm < MH_PERM_READ) {
        mh_res_error(req, 404, "not_found", "repository not found");
        return;
    }
    if (r->perm < lr->need) {
        if (mh__signed_caller(req, "this call"))
            mh_res_error(req, 403, "forbidden", "you may read this repository but not change it");
        return;
    }
    lr->cb(req, r);
}

static void load_repo_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    load_repo_t *lr = ud;
    mh_req_t *req = lr->req;
    if (!mh__db_one(req, res, err, errmsg, "repository not found")) return;
    mh_arena_t *a = &req->arena;
    mh_repo_t *r = mh_calloc(a, sizeof *r);
    bool ok = r && mh__repo_row(a, res, 0, r);
    if (ok) r->state_seq = mh_pq_int(res, 0, 9);
    const char *role = mh_pq_isnull(res, 0, 10) ? NULL : mh_strdup(a, mh_pq_str(res, 0, 10));
    /* A field (or the role) lost to ENOMEM must neither reach the handler
     * nor be cached: a missing role would read as "no permission". */
    if (!ok || (!role && !mh_pq_isnull(res, 0, 10))) {
        mh_res_fail(req, MH_ENOMEM, "repository");
        return;
    }
    mh_hub_repo_cache_put(req->app, lr->epoch, lr->key, lr->klen, r, role);
    load_repo_finish(lr, r, role);
}

bool mh__repo_row(mh_arena_t *a, PGresult *res, int row, mh_repo_t *r)
{
    char **fields[] = {&r->repo_id,    &r->owner,       &r->owner_id,       &r->name,      &r->slug,
                       &r->visibility, &r->description, &r->default_branch, &r->created_at};
    bool ok = true;
    for (int i = 0; i < 9; i++) ok &= (*fields[i] = mh_strdup(a, mh_pq_str(res, row, i))) != NULL;
    return ok;
}

/* Cache key: kind byte, the route captures and the caller, NUL-separated. */
static char *repo_key(mh_arena_t *a, char kind, const char *x, const char *y, const char *who, size_t *klen)
{
    size_t lx = strlen(x), ly = strlen(y), lw = strlen(who);
    char *k = mh_alloc(a, 1 + lx + 1 + ly + 1 + lw);
    if (!k) return NULL;
    char *p = k;
    *p++ = kind;
    memcpy(p, x, lx + 1);
    p += lx + 1;
    memcpy(p, y, ly + 1);
    p += ly + 1;
    memcpy(p, who, lw);
    *klen = 1 + lx + 1 + ly + 1 + lw;
    return k;
}

void mh_hub_load_repo(mh_req_t *req, mh_perm_t need, mh_repo_cb cb)
{
    mh_hub_t *hub = req->app;
    load_repo_t *lr = mh__req_alloc(req, sizeof *lr);
    if (!lr) return;
    lr->req = req;
    lr->need = need;
    lr->cb = cb;
    const mh_caller_t *caller = mh_req_caller(req);
    const char *who = caller->anonymous ? "" : caller->identity_id.s;
    mh_arena_t *a = &req->arena;
    mh_str_t id = mh_req_param(req, "repo_id");
    mh_str_t owner = mh_req_param(req, "owner"), slug = mh_req_param(req, "slug");
    const char *x = id.p ? mh_strndup(a, id.p, id.n) : mh_strndup(a, owner.p, owner.n);
    const char *y = id.p ? "" : mh_strndup(a, slug.p, slug.n);
    if (!x || !y || !(lr->key = repo_key(a, id.p ? 'i' : 'o', x, y, who, &lr->klen))) {
        mh_res_fail(req, MH_ENOMEM, "repository");
        return;
    }
    mh_repo_t *r = mh_calloc(a, sizeof *r);
    const char *role = NULL;
    if (r && mh_hub_repo_cache_lookup(hub, lr->key, lr->klen, a, r, &role)) {
        load_repo_finish(lr, r, role);
        return;
    }
    lr->epoch = mh_hub_repo_cache_epoch(hub);
    if (id.p) {
        const char *vals[2] = {x, who};
        mh_db_exec(hub->db, &st_repo_by_id, vals, NULL, NULL, load_repo_cb, lr);
        return;
    }
    const char *vals[3] = {x, y, who};
    mh_db_exec(hub->db, &st_repo_by_slug, vals, NULL, NULL, load_repo_cb, lr);
}

mh_val_t *mh_repo_val(mh_req_t *req, const mh_repo_t *r)
{
    /* SPEC 4.1's object with its camelCase aliases. */
    static const char *const keys[] = {"repo_id",       "repoId",     "owner",       "name",
                                       "slug",          "visibility", "description", "default_branch",
                                       "defaultBranch", "created_at", "createdAt"};
    const char *vals[] = {r->repo_id,        r->repo_id,    r->owner,       r->name,
                          r->slug,           r->visibility, r->description, r->default_branch,
                          r->default_branch, r->created_at, r->created_at};
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b);
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        mh_vb_put(b, m, keys[i], vals[i] ? mh_v_str(vals[i]) : mh_vb_node(b, NULL));
    return b->err ? NULL : m;
}

/* Blocking: start-up only, before the loop runs. */
int mh_hub_ensure_dev_identity(const char *url, const char *handle)
{
    PGconn *c = PQconnectdb(url);
    if (PQstatus(c) != CONNECTION_OK) {
        mh_error("dev identity: cannot connect: %s", PQerrorMessage(c));
        PQfinish(c);
        return MH_EDB;
    }
    mh_id_t id;
    mh_identity_id(handle, strlen(handle), &id);
    const char *vals[2] = {id.s, handle};
    PGresult *res = PQexecParams(c,
                                 "INSERT INTO identities (identity_id, handle, is_admin) VALUES ($1, $2, true)"
                                 " ON CONFLICT (handle) DO UPDATE SET is_admin = true",
                                 2, NULL, vals, NULL, NULL, 0);
    int rc = PQresultStatus(res) == PGRES_COMMAND_OK ? 0 : MH_EDB;
    if (rc) mh_error("dev identity: %s", PQresultErrorMessage(res));
    PQclear(res);
    PQfinish(c);
    return rc;
}

/* ----------------------------------------------------------------- Range */

static bool parse_u64(const char *p, const char *end, uint64_t *out)
{
    if (p == end) return false;
    uint64_t v = 0;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9') return false;
        if (v > (UINT64_MAX - 9) / 10) return false;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    *out = v;
    return true;
}

bool mh_parse_range(mh_str_t h, uint64_t size, uint64_t *off, uint64_t *len, bool *unsat)
{
    *unsat = false;
    if (h.n < 7 || memcmp(h.p, "bytes=", 6) != 0) return false;
    const char *p = h.p + 6, *end = h.p + h.n;
    const char *dash = memchr(p, '-', (size_t)(end - p));
    if (!dash || memchr(p, ',', (size_t)(end - p))) return false; /* one range only */
    uint64_t a, b;
    if (dash == p) { /* suffix: last n bytes */
        if (!parse_u64(dash + 1, end, &b)) return false;
        if (b == 0 || size == 0) {
            *unsat = true;
            return false;
        }
        if (b > size) b = size;
        *off = size - b;
        *len = b;
        return true;
    }
    if (!parse_u64(p, dash, &a)) return false;
    if (dash + 1 == end) b = size ? size - 1 : 0;
    else if (!parse_u64(dash + 1, end, &b) || b < a) return false;
    if (a >= size) {
        *unsat = true;
        return false;
    }
    if (b >= size) b = size - 1;
    *off = a;
    *len = b - a + 1;
    return true;
}
