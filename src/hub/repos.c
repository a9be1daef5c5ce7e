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
static const char *body_str(mh_req_t *req, const mh_val_t *body, const char *key, size_t max, bool required,
                            bool *bad)
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

typedef struct {
    mh_req_t *req;
    mh_repo_t repo;
} create_t;

static void create_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    create_t *c = ud;
    mh_req_t *req = c->req;
    if (err == MH_ECONFLICT) {
        mh_res_error(req, 409, "conflict", "repository %s/%s already exists", c->repo.owner, c->repo.slug);
        return;
    }
    if (err) {
        mh_hub_db_fail(req, err, errmsg);
        return;
    }
    c->repo.created_at = mh_strdup(&req->arena, mh_pq_str(res, 0, 0));
    mh_val_t *v = mh_repo_val(req, &c->repo);
    if (!v) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    mh_info("repo created %s/%s id=%s", c->repo.owner, c->repo.slug, c->repo.repo_id);
    mh_res_val(req, 201, v, MH_FMT_JSON);
}

void mh_h_repo_create(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    const mh_caller_t *caller = mh_req_caller(req);
    if (caller->anonymous) {
        mh_res_error(req, 401, "unauthorized", "creating a repository needs a signed request");
        return;
    }
    mh_val_t body;
    if (!mh_req_body_val(req, &body)) return;
    if (body.t != MH_V_MAP) {
        mh_res_error(req, 422, "invalid_body", "the body must be a map");
        return;
    }
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
    const mh_val_t *init = mh_val_get(&body, "initialize");
    bool initialize = false;
    if (init && init->t != MH_V_NIL) {
        if (init->t != MH_V_BOOL) {
            mh_res_error(req, 422, "invalid_field", "'initialize' must be a boolean");
            return;
        }
        initialize = init->v.b;
    }
    if (!caller->is_admin && strcmp(owner, caller->handle) != 0) {
        mh_res_error(req, 403, "forbidden", "you may only create repositories you own");
        return;
    }

    create_t *c = mh_calloc(&req->arena, sizeof *c);
    char *slug = mh_repo_slug(&req->arena, name, strlen(name));
    uint8_t rnd[32];
    mh_id_t repo_id, owner_id, snap_id, commit_id;
    if (!c || !slug || mh_random(rnd, sizeof rnd)) {
        mh_res_error(req, 503, "unavailable", "out of resources");
        return;
    }
    if (!mh_repo_slug_valid(slug)) {
        mh_res_error(req, 422, "invalid_field", "the name gives the slug '%s': a slug may not be empty or start with '.'",
                     slug);
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

    c->req = req;
    c->repo.repo_id = mh_strdup(&req->arena, repo_id.s);
    c->repo.owner = (char *)owner;
    c->repo.name = (char *)name;
    c->repo.slug = slug;
    c->repo.visibility = (char *)visibility;
    c->repo.description = (char *)(description ? description : "");
    c->repo.default_branch = "main";
    const char *vals[12] = {c->repo.repo_id, owner, owner_id.s, name, slug, visibility, c->repo.description,
                            snap_id.s, commit_id.s, initialize ? "true" : "false", msg, now};
    mh_db_query(hub->db, sql_create, 12, vals, NULL, NULL, create_cb, c);
}

/* ------------------------------------------------------------ get, delete */

static void repo_get_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_val_t *v = mh_repo_val(req, repo);
    if (!v) mh_res_error(req, 503, "unavailable", "out of memory");
    else mh_res_val(req, 200, v, MH_FMT_JSON);
}

void mh_h_repo_get(mh_req_t *req) { mh_hub_load_repo(req, MH_PERM_READ, repo_get_cb); }

typedef struct {
    mh_req_t *req;
    mh_repo_t *repo;
    mh_dbconn_t *conn;
} delete_t;

static void repo_delete_done(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    delete_t *d = ud;
    mh_dbconn_release(d->conn); /* rolls back if the script failed midway */
    if (err) {
        mh_hub_db_fail(d->req, err, errmsg);
        return;
    }
    mh_info("repo deleted %s/%s id=%s", d->repo->owner, d->repo->slug, d->repo->repo_id);
    mh_fetch_cache_invalidate(d->req->app, d->repo->repo_id);
    mh_graph_cache_drop(d->req->app, d->repo->repo_id); /* graphs outlive states, not the repository */
    mh_res_send(d->req, 204, NULL, NULL, 0);
}

static void repo_delete_conn_cb(void *ud, mh_dbconn_t *c, int err)
{
    delete_t *d = ud;
    if (err) {
        mh_hub_db_fail(d->req, err, "no connection");
        return;
    }
    d->conn = c;
    /* Ref rows, branches, grants and cached fetch answers go with the
     * repository (ref tables explicitly, sql/0007; the rest by ON DELETE
     * CASCADE); global rows and packs are left to GC (SPEC 4.1). The row
     * lock is its own statement so the deletes that follow (each with a
     * fresh snapshot under READ COMMITTED) see the refs of a push that
     * held the lock before us. The id is ours (checked format), safe to
     * inline in this parameterless script. */
    const char *id = d->repo->repo_id;
    char *sql = mh_sprintf(&d->req->arena,
                           "BEGIN;"
                           "SELECT 1 FROM repos WHERE repo_id = '%s' FOR UPDATE;"
                           "DELETE FROM commit_refs WHERE repo_id = '%s';"
                           "DELETE FROM snapshot_refs WHERE repo_id = '%s';"
                           "DELETE FROM object_refs WHERE repo_id = '%s';"
                           "DELETE FROM mpack_refs WHERE repo_id = '%s';"
                           "DELETE FROM repos WHERE repo_id = '%s';"
                           "COMMIT",
                           id, id, id, id, id, id);
    if (!sql) {
        mh_dbconn_release(c);
        mh_res_error(d->req, 503, "unavailable", "out of memory");
        return;
    }
    mh_dbconn_script(c, sql, repo_delete_done, d);
}

static void repo_delete_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    delete_t *d = mh_calloc(&req->arena, sizeof *d);
    if (!d || !mh_id_valid(repo->repo_id, strlen(repo->repo_id))) {
        mh_res_error(req, 503, "unavailable", "cannot delete");
        return;
    }
    d->req = req;
    d->repo = repo;
    mh_db_acquire(hub->db, repo_delete_conn_cb, d);
}

void mh_h_repo_delete(mh_req_t *req) { mh_hub_load_repo(req, MH_PERM_ADMIN, repo_delete_cb); }

/* ------------------------------------------------------------------ list */

static void repo_list_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_req_t *req = ud;
    if (err) {
        mh_hub_db_fail(req, err, errmsg);
        return;
    }
    mh_arena_t *a = &req->arena;
    mh_val_t *arr = mh_v_arr(a), *out = mh_v_map(a);
    int rc = (!arr || !out) ? MH_ENOMEM : 0;
    for (int i = 0; !rc && i < PQntuples(res); i++) {
        mh_repo_t r = {0};
        char **fields[] = {&r.repo_id, &r.owner, &r.owner_id, &r.name, &r.slug,
                           &r.visibility, &r.description, &r.default_branch, &r.created_at};
        for (int f = 0; f < 9; f++) *fields[f] = mh_strdup(a, mh_pq_str(res, i, f));
        mh_val_t *v = mh_repo_val(req, &r);
        rc = v ? mh_arr_push(a, arr, *v) : MH_ENOMEM;
    }
    if (!rc) rc = mh_map_put(a, out, "repos", *arr);
    if (rc) mh_res_error(req, 503, "unavailable", "out of memory");
    else mh_res_val(req, 200, out, MH_FMT_JSON);
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

static const mh_stmt_t st_branches = {
    "branches_of_repo", "SELECT name, head_commit_id FROM branches WHERE repo_id = $1 ORDER BY name", 1};

/* Clients read refs before every push and fetch, so the branch heads are
 * cached per process by (repository, state_seq): every branch move bumps
 * repos.state_seq in the same transaction (push, server-side commits,
 * merges), so an entry can never be served for a state it was not read
 * in, and no invalidation is needed. state_seq itself comes from the
 * repository lookup (repo_cache.c: NOTIFY-invalidated). */
#define REFS_SLOTS 1024 /* power of two, direct-mapped */

typedef struct {
    char *repo_id;
    int64_t state_seq;
    uint32_t n;
    char **names, **heads; /* all in one heap block with the entry */
} refs_entry_t;

static refs_entry_t *refs_slots[REFS_SLOTS];

static uint32_t refs_slot(const char *repo_id)
{
    uint32_t h = 2166136261u;
    for (const char *p = repo_id; *p; p++) h = (h ^ (uint8_t)*p) * 16777619u;
    return h & (REFS_SLOTS - 1);
}

void mh_hub_refs_cache_free(void)
{
    for (uint32_t i = 0; i < REFS_SLOTS; i++) {
        free(refs_slots[i]);
        refs_slots[i] = NULL;
    }
}

static void refs_cache_put(const mh_repo_t *repo, PGresult *res)
{
    uint32_t n = (uint32_t)PQntuples(res);
    size_t bytes = sizeof(refs_entry_t) + 2 * n * sizeof(char *) + strlen(repo->repo_id) + 1;
    for (uint32_t i = 0; i < n; i++) bytes += strlen(mh_pq_str(res, (int)i, 0)) + strlen(mh_pq_str(res, (int)i, 1)) + 2;
    refs_entry_t *e = malloc(bytes);
    if (!e) return; /* a cache: best effort */
    e->names = (char **)(e + 1);
    e->heads = e->names + n;
    char *p = (char *)(e->heads + n);
    e->repo_id = p;
    p = stpcpy(p, repo->repo_id) + 1;
    for (uint32_t i = 0; i < n; i++) {
        e->names[i] = p;
        p = stpcpy(p, mh_pq_str(res, (int)i, 0)) + 1;
        e->heads[i] = p;
        p = stpcpy(p, mh_pq_str(res, (int)i, 1)) + 1;
    }
    e->n = n;
    e->state_seq = repo->state_seq;
    uint32_t k = refs_slot(repo->repo_id);
    free(refs_slots[k]);
    refs_slots[k] = e;
}

/* Answers from borrowed name/head arrays (the cache entry or the rows). */
static void refs_send(mh_req_t *req, const mh_repo_t *repo, uint32_t n, char *const *names, char *const *heads)
{
    mh_arena_t *a = &req->arena;
    mh_val_t *out = mh_v_map(a), *map = mh_v_map(a);
    int rc = (!out || !map) ? MH_ENOMEM : 0;
    for (uint32_t i = 0; !rc && i < n; i++) {
        char *k = mh_strdup(a, names[i]), *v = mh_strdup(a, heads[i]);
        rc = k && v ? mh_map_put(a, map, k, mh_v_str(v)) : MH_ENOMEM;
    }
    if (!rc) rc = mh_map_put(a, out, "repo_id", mh_v_str(repo->repo_id));
    if (!rc) rc = mh_map_put(a, out, "default_branch", mh_v_str(repo->default_branch));
    if (!rc) rc = mh_map_put(a, out, "branch_heads", *map);
    if (rc) mh_res_error(req, 503, "unavailable", "out of memory");
    else mh_res_val(req, 200, out, MH_FMT_JSON);
}

typedef struct {
    mh_req_t *req;
    mh_repo_t *repo;
} refs_t;

static void refs_rows_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    refs_t *r = ud;
    mh_req_t *req = r->req;
    if (err) {
        mh_hub_db_fail(req, err, errmsg);
        return;
    }
    refs_cache_put(r->repo, res);
    uint32_t n = (uint32_t)PQntuples(res);
    char **names = mh_alloc(&req->arena, (n + 1) * sizeof(char *));
    char **heads = mh_alloc(&req->arena, (n + 1) * sizeof(char *));
    if (!names || !heads) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        names[i] = (char *)mh_pq_str(res, (int)i, 0);
        heads[i] = (char *)mh_pq_str(res, (int)i, 1);
    }
    refs_send(req, r->repo, n, names, heads);
}

static void refs_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    refs_entry_t *e = refs_slots[refs_slot(repo->repo_id)];
    if (e && e->state_seq == repo->state_seq && strcmp(e->repo_id, repo->repo_id) == 0) {
        refs_send(req, repo, e->n, e->names, e->heads);
        return;
    }
    refs_t *r = mh_alloc(&req->arena, sizeof *r);
    if (!r) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    r->req = req;
    r->repo = repo;
    const char *vals[1] = {repo->repo_id};
    mh_db_exec(hub->db, &st_branches, vals, NULL, NULL, refs_rows_cb, r);
}

void mh_h_refs(mh_req_t *req) { mh_hub_load_repo(req, MH_PERM_READ, refs_repo_cb); }
