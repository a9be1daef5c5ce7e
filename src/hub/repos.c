/*
 * repos.c — repositories and refs (SPEC 4.1, 4.2).
 *
 * Creating a repository (with its optional empty root commit on `main`)
 * is one SQL statement of data-modifying CTEs, so it is atomic without a
 * held connection; (owner, slug) uniqueness is the database's to enforce
 * (a unique violation becomes 409).
 */
#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include "hub_internal.h"
#include "mh/hub.h"
#include "mh/mpack.h"

char *mh_repo_slug(mh_arena_t *a, const char *name, size_t n)
{
    char *out = mh_alloc(a, n + 1);
    if (!out) return NULL;
    size_t j = 0;
    bool in_run = false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c >= 'A' && c <= 'Z') c = (unsigned char)(c - 'A' + 'a');
        bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
        if (ok) {
            out[j++] = (char)c;
            in_run = false;
        } else if (!in_run) {
            out[j++] = '-';
            in_run = true;
        }
    }
    out[j] = 0;
    return out;
}

bool mh_repo_slug_valid(const char *slug)
{
    /* SPEC 4.1: empty, ".", ".." and anything starting with "." would be
     * a hidden or relative path segment in /{owner}/{slug}/... URLs. */
    return slug && slug[0] && slug[0] != '.';
}

/* A string field of the body: present, a STR, 1..max bytes, no NUL. */
static const char *body_str(mh_req_t *req, const mh_val_t *body, const char *key, size_t max, bool required, bool *bad)
{
    const mh_val_t *v = mh_val_get(body, key);
    if (!v || v->t == MH_V_NIL) {
        if (required) {
            mh_res_error(req, 422, "invalid_field", "'%s' is required", key);
            *bad = true;
        }
        return NULL;
    }
    if (v->t != MH_V_STR || (required && v->v.s.n == 0) || v->v.s.n > max || memchr(v->v.s.p, 0, v->v.s.n)) {
        mh_res_error(req, 422, "invalid_field", "'%s' must be a string of 1..%zu bytes", key, max);
        *bad = true;
        return NULL;
    }
    return mh_val_cstr(&req->arena, v);
}

/* ---------------------------------------------------------------- create */

static const char sql_create[] =
    "WITH r AS ("
    "  INSERT INTO repos (repo_id, owner, owner_id, name, slug, visibility, description)"
    "  VALUES ($1, $2, $3, $4, $5, $6, $7)"
    "  RETURNING repo_id, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') AS created),"
    " s AS ("
    "  INSERT INTO snapshots (snapshot_id, parent_snapshot_id, delta_upsert, delta_remove, entry_count, depth)"
    "  SELECT $8, NULL, '\\x80'::bytea, '\\x90'::bytea, 0, 0 WHERE $10::boolean ON CONFLICT DO NOTHING),"
    " c AS ("
    "  INSERT INTO commits (commit_id, snapshot_id, message, author, committed_at, branch, generation)"
    "  SELECT $9, $8, $11, $2, $12, 'main', 1 WHERE $10::boolean ON CONFLICT DO NOTHING),"
    " cr AS (INSERT INTO commit_refs (repo_id, commit_id, branch) SELECT repo_id, $9, 'main' FROM r WHERE $10::boolean),"
    " sr AS (INSERT INTO snapshot_refs (repo_id, snapshot_id) SELECT repo_id, $8 FROM r WHERE $10::boolean),"
    " b AS (INSERT INTO branches (repo_id, name, head_commit_id) SELECT repo_id, 'main', $9 FROM r WHERE $10::boolean)"
    " SELECT created FROM r";

static void create_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_req_t *req = ud;
    mh_repo_t *repo = req->user;
    if (err == MH_ECONFLICT) {
        mh_res_error(req, 409, "conflict", "repository %s/%s already exists", repo->owner, repo->slug);
        return;
    }
    if (!mh__db_ok(req, err, errmsg)) return;
    repo->created_at = mh_strdup(&req->arena, mh_pq_str(res, 0, 0));
    mh_info("repo created %s/%s id=%s", repo->owner, repo->slug, repo->repo_id);
    mh_res_val(req, 201, mh_repo_val(req, repo));
}

void mh_h_repo_create(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    const mh_caller_t *caller = mh__signed_caller(req, "creating a repository");
    if (!caller) return;
    mh_val_t body;
    if (!mh__body_map(req, &body)) return;
    bool bad = false;
    const char *owner = body_str(req, &body, "owner", 100, true, &bad);
    if (bad) return;
    const char *name = body_str(req, &body, "name", 100, true, &bad);
    if (bad) return;
    const char *description = body_str(req, &body, "description", 4096, false, &bad);
    if (bad) return;
    /* Required, never defaulted (SPEC 4.1): a misspelt key must not make
     * a repository public (issue 15 item 10). */
    const mh_val_t *vis = mh_val_get(&body, "visibility");
    const char *visibility = mh_val_streq(vis, "public") ? "public" : mh_val_streq(vis, "private") ? "private" : NULL;
    if (!visibility) {
        mh_res_error(req, 422, "invalid_field", "'visibility' is required: \"public\" or \"private\"");
        return;
    }
    bool initialize;
    if (!mh__body_bool(req, &body, "initialize", &initialize)) return;
    if (!caller->is_admin && strcmp(owner, caller->handle) != 0) {
        mh_res_error(req, 403, "forbidden", "you may only create repositories you own");
        return;
    }

    mh_repo_t *r = mh_calloc(&req->arena, sizeof *r);
    char *slug = mh_repo_slug(&req->arena, name, strlen(name));
    uint8_t rnd[32];
    mh_id_t repo_id, owner_id, snap_id, commit_id;
    if (!r || !slug || mh_random(rnd, sizeof rnd)) {
        mh_res_error(req, 503, "unavailable", "out of resources");
        return;
    }
    if (!mh_repo_slug_valid(slug)) {
        mh_res_error(req, 422, "invalid_field",
                     "the name gives the slug '%s': a slug may not be empty or start with '.'", slug);
        return;
    }
    mh_id_from_digest(&repo_id, rnd);
    mh_identity_id(owner, strlen(owner), &owner_id);

    /* The empty root commit (SPEC 4.1 initialize): empty manifest. */
    char now[48];
    mh_iso_now(now, sizeof now);
    static const char msg[] = "Initial commit";
    mh_manifest_t empty = {0};
    mh_manifest_id(&empty, &snap_id);
    mh_commit_id(NULL, 0, (mh_str_t){snap_id.s, MH_ID_LEN}, MH_STR(msg), (mh_str_t){now, strlen(now)},
                 (mh_str_t){owner, strlen(owner)}, &commit_id);

    r->repo_id = mh_strdup(&req->arena, repo_id.s);
    r->owner = (char *)owner;
    r->name = (char *)name;
    r->slug = slug;
    r->visibility = (char *)visibility;
    r->description = (char *)(description ? description : "");
    r->default_branch = "main";
    req->user = r;
    const char *vals[12] = {r->repo_id,
                            owner,
                            owner_id.s,
                            name,
                            slug,
                            visibility,
                            r->description,
                            snap_id.s,
                            commit_id.s,
                            initialize ? "true" : "false",
                            msg,
                            now};
    mh_db_query(hub->db, sql_create, 12, vals, NULL, NULL, create_cb, req);
}

/* ------------------------------------------------------------ get, delete */

static void repo_get_cb(mh_req_t *req, mh_repo_t *repo) { mh_res_val(req, 200, mh_repo_val(req, repo)); }

void mh_h_repo_get(mh_req_t *req) { mh_hub_load_repo(req, MH_PERM_READ, repo_get_cb); }

/* Deleting a repository is a ref writer like any other: refwrite's lock
 * order and statements (the ref tables explicitly, sql/0007; branches,
 * grants and cached fetch answers by ON DELETE CASCADE; global rows and
 * packs are left to GC, SPEC 4.1). */
typedef struct {
    mh__op_t op;
} delete_t;

#define D(s) (&MH_STEP_OP(s, delete_t, op.step)->op)

static void del_begin(mh_step_t *s) { mh_rw_begin(s, D(s)->repo->repo_id, NULL, 0); }

static void del_rows(mh_step_t *s)
{
    mh_db_batch_t b = {0};
    mh_rw_repo_delete_rows(&b, D(s)->repo->repo_id);
    mh_step_batch(s, &b, NULL);
}

static const mh_step_def_t delete_steps[] = {
    {"acquire", mh_step_acquire}, {"begin", del_begin},   {"rows", del_rows},
    {"commit", mh_step_commit},   {"done", mh_step_done},
};

static void delete_finish(mh_step_t *s)
{
    mh__op_t *d = D(s);
    if (mh__op_failed(s, NULL)) return;
    mh_info("repo deleted %s/%s id=%s", d->repo->owner, d->repo->slug, d->repo->repo_id);
    mh_fetch_cache_invalidate(d->hub, d->repo->repo_id);
    mh__graph_cache_drop(d->hub, d->repo->repo_id); /* graphs outlive states, not the repository */
    mh_res_send(d->req, 204, NULL, NULL, 0);
}

static const mh__op_def_t delete_def = {"delete", MH__STEPS(delete_steps), delete_finish, NULL, 0};

void mh_h_repo_delete(mh_req_t *req)
{
    if (MH__OP_NEW(req, delete_t, &delete_def)) mh_hub_load_repo(req, MH_PERM_ADMIN, mh__op_repo_cb);
}

/* ------------------------------------------------------------------ list */

static mh_val_t *repo_row(mh_req_t *req, mh_vb_t *b, PGresult *res, int i)
{
    (void)b;
    mh_repo_t r = {0};
    mh__repo_row(&req->arena, res, i, &r);
    return mh_repo_val(req, &r);
}

static void repo_list_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh__list_answer(ud, res, err, errmsg, "repos", repo_row);
}

void mh_h_repo_list(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    const mh_caller_t *caller = mh_req_caller(req);
    mh_str_t owner = mh_req_query(req, "owner");
    const char *vals[3] = {owner.p ? mh_strndup(&req->arena, owner.p, owner.n) : "",
                           caller->anonymous ? "" : caller->identity_id.s,
                           (!caller->anonymous && caller->is_admin) ? "true" : "false"};
    mh_db_query(hub->db,
                "SELECT r.repo_id, r.owner, r.owner_id, r.name, r.slug, r.visibility, r.description, r.default_branch,"
                " to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"
                " FROM repos r LEFT JOIN collaborators c ON c.repo_id = r.repo_id AND c.identity_id = $2"
                " WHERE ($1 = '' OR r.owner = $1)"
                "   AND (r.visibility = 'public' OR $3::boolean OR r.owner_id = $2 OR c.role IS NOT NULL)"
                " ORDER BY r.created_at, r.repo_id LIMIT 1000",
                3, vals, NULL, NULL, repo_list_cb, req);
}

/* ------------------------------------------------------------------ refs */

static const mh_stmt_t st_branches = {"branches_of_repo",
                                      "SELECT name, head_commit_id FROM branches WHERE repo_id = $1 ORDER BY name", 1};

/* Clients read refs before every push and fetch, so the branch heads are
 * cached per process by (repository, state_seq) (caches.c): every branch
 * move bumps repos.state_seq in the same transaction (push, server-side
 * commits, merges), so an entry can never be served for a state it was
 * not read in, and no invalidation is needed. state_seq itself comes
 * from the repository lookup (NOTIFY-invalidated). */

/* Answers from borrowed name/head arrays (the cache entry or the rows). */
static void refs_send(mh_req_t *req, const mh_repo_t *repo, uint32_t n, char *const *names, char *const *heads)
{
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *out = mh_vb_map(b), *map = mh_vb_map(b);
    for (uint32_t i = 0; i < n; i++) {
        char *k = mh_strdup(&req->arena, names[i]);
        mh_vb_put(b, map, k, k ? mh_vb_str(b, heads[i]) : mh_vb_node(b, NULL));
    }
    mh_vb_put(b, out, "repo_id", mh_v_str(repo->repo_id));
    mh_vb_put(b, out, "default_branch", mh_v_str(repo->default_branch));
    mh_vb_put(b, out, "branch_heads", mh_vb_node(b, map));
    mh_res_val(req, 200, out);
}

typedef struct {
    mh_req_t *req;
    mh_repo_t *repo;
} refs_t;

static void refs_rows_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    refs_t *r = ud;
    mh_req_t *req = r->req;
    if (!mh__db_ok(req, err, errmsg)) return;
    uint32_t n = (uint32_t)PQntuples(res);
    char **names = mh_alloc(&req->arena, (n + 1) * sizeof(char *));
    char **heads = mh_alloc(&req->arena, (n + 1) * sizeof(char *));
    if (!names || !heads) {
        mh_res_fail(req, MH_ENOMEM, "refs");
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        names[i] = (char *)mh_pq_str(res, (int)i, 0);
        heads[i] = (char *)mh_pq_str(res, (int)i, 1);
    }
    mh__refs_cache_put(req->app, r->repo, n, names, heads);
    refs_send(req, r->repo, n, names, heads);
}

static void refs_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    uint32_t n;
    char *const *names, *const *heads;
    if (mh__refs_cache_get(hub, repo, &n, &names, &heads)) {
        refs_send(req, repo, n, names, heads);
        return;
    }
    refs_t *r = mh__req_alloc(req, sizeof *r);
    if (!r) return;
    r->req = req;
    r->repo = repo;
    const char *vals[1] = {repo->repo_id};
    mh_db_exec(hub->db, &st_branches, vals, NULL, NULL, refs_rows_cb, r);
}

void mh_h_refs(mh_req_t *req) { mh_hub_load_repo(req, MH_PERM_READ, refs_repo_cb); }
