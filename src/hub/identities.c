/*
 * identities.c — identities, their keys, and repository collaborators
 * (SPEC 5 "Identities and keys", SPEC 4 permission rules).
 *
 *   POST   /api/identities                              admin
 *   GET    /api/identities/{handle}                     anyone
 *   POST   /api/identities/{handle}/keys                the identity or admin
 *   DELETE /api/identities/{handle}/keys/{key_id}       the identity or admin
 *   GET    /api/repos/{repo_id}/collaborators           repository admin
 *   PUT    /api/repos/{repo_id}/collaborators/{handle}  repository admin
 *   DELETE /api/repos/{repo_id}/collaborators/{handle}  repository admin
 *
 * Invariants:
 *  - Each write is one SQL statement, so it is atomic without a held
 *    connection; uniqueness (handle, key id) is the database's to enforce
 *    (a unique violation becomes 409).
 *  - A key is stored as its canonical DER SubjectPublicKeyInfo and named by
 *    its hash (SPEC 1), so the same key always gets the same id whichever
 *    PEM spelling it arrived in.
 *  - Revocation sets revoked_at (rows are never deleted: a key id stays
 *    taken) and drops the key from this process's cache at once; other
 *    processes stop accepting it within the cache lifetime (5 s).
 */
#include <string.h>

#include "hub_internal.h"

#define TS(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"

/* ---------------------------------------------------------------- helpers */

/* The public key of a body (field public_key_pem) in canonical DER (a
 * copy in the request arena) and its key id; NULL after answering 422. */
static const uint8_t *body_key(mh_req_t *req, const mh_val_t *body, size_t *dlen, mh_id_t *key_id)
{
    const mh_val_t *v = mh_val_get(body, "public_key_pem");
    uint8_t der[MH_SPKI_MAX];
    if (!v || v->t != MH_V_STR || v->v.s.n == 0 || v->v.s.n > 4096) {
        mh_res_error(req, 422, "invalid_field", "'public_key_pem' is required: a PEM public key");
        return NULL;
    }
    if (mh_p256_spki(v->v.s.p, v->v.s.n, der, MH_SPKI_MAX, dlen)) {
        mh_res_error(req, 422, "invalid_field", "'public_key_pem' is not an ECDSA P-256 public key in PEM");
        return NULL;
    }
    mh_blob_id(der, *dlen, key_id);
    uint8_t *copy = mh_alloc(&req->arena, *dlen);
    if (!copy) {
        mh_res_fail(req, MH_ENOMEM, "key");
        return NULL;
    }
    return memcpy(copy, der, *dlen);
}

/* The caller may manage `handle`'s keys: itself or an admin. Answers
 * 401/403 otherwise. */
static bool self_or_admin(mh_req_t *req, const char *handle)
{
    const mh_caller_t *c = mh__signed_caller(req, "this call");
    if (!c) return false;
    if (!c->is_admin && strcmp(c->handle, handle) != 0) {
        mh_res_error(req, 403, "forbidden", "only the identity itself or an admin may manage its keys");
        return false;
    }
    return true;
}

/* The answer of a write: {identity_id, handle, key_id?, ...} */
typedef struct ident ident_t;
struct ident {
    mh_req_t *req;
    const char *handle, *repo_id, *role;
    mh_id_t identity_id, key_id;
    bool is_admin, is_agent;
    /* ident_query */
    void (*done)(ident_t *x, PGresult *res);
    const char *absent;   /* 404 message when the statement returns no row (NULL: rows are not checked) */
    const char *conflict; /* 409 message for a unique violation (NULL: the error table's) */
};

static ident_t *ident_new(mh_req_t *req, const char *handle)
{
    ident_t *ic = mh__req_alloc(req, sizeof *ic);
    if (ic) *ic = (ident_t){.req = req, .handle = handle};
    return ic;
}

static void ident_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    ident_t *x = ud;
    if (err == MH_ECONFLICT && x->conflict) {
        mh_res_error(x->req, 409, "conflict", "%s", x->conflict);
        return;
    }
    if (x->absent ? mh__db_one(x->req, res, err, errmsg, x->absent) : mh__db_ok(x->req, err, errmsg)) x->done(x, res);
}

/* One statement of a write; done(x, res) runs when it succeeded. */
static void ident_query(ident_t *x, void (*done)(ident_t *, PGresult *), const char *absent, const char *sql, int n,
                        const char *const *vals, const int *lens, const int *fmts)
{
    mh_hub_t *hub = x->req->app;
    x->done = done;
    x->absent = absent;
    mh_db_query(hub->db, sql, n, vals, lens, fmts, ident_cb, x);
}

/* ----------------------------------------------------- POST /api/identities */

static void ident_create_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    ident_t *ic = ud;
    mh_req_t *req = ic->req;
    if (err == MH_ECONFLICT) {
        if (errmsg && strstr(errmsg, "identity_keys"))
            mh_res_error(req, 409, "conflict", "this public key is already registered");
        else mh_res_error(req, 409, "conflict", "identity '%s' already exists", ic->handle);
        return;
    }
    if (!mh__db_ok(req, err, errmsg)) return;
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b);
    mh_vb_put(b, m, "identity_id", mh_v_str(ic->identity_id.s));
    mh_vb_put(b, m, "handle", mh_v_str(ic->handle));
    mh_vb_put(b, m, "key_id", mh_v_str(ic->key_id.s));
    mh_vb_put(b, m, "is_agent", mh_v_bool(ic->is_agent));
    mh_vb_put(b, m, "is_admin", mh_v_bool(ic->is_admin));
    mh_info("identity created %s (admin=%d agent=%d) key %s by %s", ic->handle, ic->is_admin, ic->is_agent,
            ic->key_id.s, mh_req_caller(req)->handle);
    mh_res_val(req, 201, m);
}

void mh_h_identity_create(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    const mh_caller_t *caller = mh__signed_caller(req, "creating an identity");
    if (!caller) return;
    if (!caller->is_admin) {
        mh_res_error(req, 403, "forbidden", "only an admin may create identities");
        return;
    }
    mh_val_t body;
    if (!mh__body_map(req, &body)) return;
    const mh_val_t *h = mh_val_get(&body, "handle");
    if (!h || h->t != MH_V_STR || !mh_handle_valid(h->v.s.p, h->v.s.n)) {
        mh_res_error(req, 422, "invalid_field",
                     "'handle' must be 1..64 characters of [A-Za-z0-9._-] starting with a letter or digit");
        return;
    }
    ident_t *ic = ident_new(req, mh_val_cstr(&req->arena, h));
    if (!ic || !mh__body_bool(req, &body, "is_agent", &ic->is_agent) ||
        !mh__body_bool(req, &body, "is_admin", &ic->is_admin))
        return;
    size_t dlen = 0;
    const uint8_t *der = body_key(req, &body, &dlen, &ic->key_id);
    if (!der || !ic->handle) {
        if (der) mh_res_fail(req, MH_ENOMEM, "identity");
        return;
    }
    mh_identity_id(ic->handle, strlen(ic->handle), &ic->identity_id);
    const char *vals[6] = {
        ic->identity_id.s, ic->handle,       ic->is_admin ? "true" : "false", ic->is_agent ? "true" : "false",
        ic->key_id.s,      (const char *)der};
    int lens[6] = {0, 0, 0, 0, 0, (int)dlen};
    int fmts[6] = {0, 0, 0, 0, 0, 1};
    mh_db_query(hub->db,
                "WITH i AS (INSERT INTO identities (identity_id, handle, is_admin, is_agent)"
                " VALUES ($1, $2, $3, $4) RETURNING identity_id)"
                " INSERT INTO identity_keys (key_id, identity_id, public_key) SELECT $5, identity_id, $6 FROM i",
                6, vals, lens, fmts, ident_create_cb, ic);
}

/* ------------------------------------------------ GET /api/identities/{h} */

static void ident_get_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_req_t *req = ud;
    if (!mh__db_ok(req, err, errmsg)) return;
    if (PQntuples(res) < 1) {
        mh_res_error(req, 404, "not_found", "no such identity");
        return;
    }
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b), *keys = mh_vb_arr(b);
    for (int i = 0; i < PQntuples(res); i++) {
        if (mh_pq_isnull(res, i, 5)) continue; /* identity without keys */
        mh_val_t *k = mh_vb_map(b);
        mh_vb_put(b, k, "key_id", mh_vb_str(b, mh_pq_str(res, i, 5)));
        mh_vb_put(b, k, "created_at", mh_vb_str(b, mh_pq_str(res, i, 6)));
        mh_vb_put(b, k, "revoked_at", mh_pq_isnull(res, i, 7) ? mh_v_nil() : mh_vb_str(b, mh_pq_str(res, i, 7)));
        mh_vb_push(b, keys, mh_vb_node(b, k));
    }
    mh_vb_put(b, m, "identity_id", mh_vb_str(b, mh_pq_str(res, 0, 0)));
    mh_vb_put(b, m, "handle", mh_vb_str(b, mh_pq_str(res, 0, 1)));
    mh_vb_put(b, m, "is_agent", mh_v_bool(mh_pq_str(res, 0, 2)[0] == 't'));
    mh_vb_put(b, m, "is_admin", mh_v_bool(mh_pq_str(res, 0, 3)[0] == 't'));
    mh_vb_put(b, m, "created_at", mh_vb_str(b, mh_pq_str(res, 0, 4)));
    mh_vb_put(b, m, "keys", mh_vb_node(b, keys));
    mh_res_val(req, 200, m);
}

void mh_h_identity_get(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    char *handle = mh__param_handle(req);
    if (!handle) return;
    const char *vals[1] = {handle};
    mh_db_query(
        hub->db,
        "SELECT i.identity_id, i.handle, i.is_agent, i.is_admin, " TS("i.created_at") ", k.key_id, " TS(
            "k.created_at") ", " TS("k.revoked_at") " FROM identities i LEFT JOIN identity_keys k ON k.identity_id = i.identity_id"
                                                    " WHERE i.handle = $1 ORDER BY k.created_at, k.key_id",
        1, vals, NULL, NULL, ident_get_cb, req);
}

/* --------------------------------------- POST /api/identities/{h}/keys */

static void key_added(ident_t *ka, PGresult *res)
{
    mh_req_t *req = ka->req;
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b);
    mh_vb_put(b, m, "identity_id", mh_vb_str(b, mh_pq_str(res, 0, 0)));
    mh_vb_put(b, m, "handle", mh_v_str(ka->handle));
    mh_vb_put(b, m, "key_id", mh_v_str(ka->key_id.s));
    mh_info("key %s added to %s by %s", ka->key_id.s, ka->handle, mh_req_caller(req)->handle);
    mh_res_val(req, 201, m);
}

void mh_h_identity_key_add(mh_req_t *req)
{
    char *handle = mh__param_handle(req);
    mh_val_t body;
    if (!handle || !self_or_admin(req, handle) || !mh__body_map(req, &body)) return;
    ident_t *ka = ident_new(req, handle);
    size_t dlen = 0;
    const uint8_t *der = ka ? body_key(req, &body, &dlen, &ka->key_id) : NULL;
    if (!der) return;
    const char *vals[3] = {ka->key_id.s, (const char *)der, handle};
    int lens[3] = {0, (int)dlen, 0};
    int fmts[3] = {0, 1, 0};
    ka->conflict = "this public key is already registered";
    ident_query(ka, key_added, "no such identity",
                "INSERT INTO identity_keys (key_id, identity_id, public_key)"
                " SELECT $1, identity_id, $2 FROM identities WHERE handle = $3 RETURNING identity_id",
                3, vals, lens, fmts);
}

/* ----------------------------- DELETE /api/identities/{h}/keys/{key_id} */

static void key_revoked(ident_t *kr, PGresult *res)
{
    (void)res;
    mh_hub_t *hub = kr->req->app;
    mh_auth_forget_key(hub->auth, kr->key_id.s);
    mh_info("key %s revoked by %s", kr->key_id.s, mh_req_caller(kr->req)->handle);
    mh_res_send(kr->req, 204, NULL, NULL, 0);
}

void mh_h_identity_key_revoke(mh_req_t *req)
{
    char *handle = mh__param_handle(req);
    if (!handle || !self_or_admin(req, handle)) return;
    mh_str_t kid = mh_req_param(req, "key_id");
    if (!kid.p || !mh_id_valid(kid.p, kid.n)) {
        mh_res_error(req, 404, "not_found", "no such key for this identity");
        return;
    }
    ident_t *kr = ident_new(req, handle);
    if (!kr) return;
    memcpy(kr->key_id.s, kid.p, MH_ID_LEN);
    /* Revoking twice is not an error: the first revocation time is kept. */
    const char *vals[2] = {handle, kr->key_id.s};
    ident_query(kr, key_revoked, "no such key for this identity",
                "UPDATE identity_keys k SET revoked_at = COALESCE(k.revoked_at, now()) FROM identities i"
                " WHERE i.identity_id = k.identity_id AND i.handle = $1 AND k.key_id = $2 RETURNING k.key_id",
                2, vals, NULL, NULL);
}

/* ------------------------------------------------------ collaborators */

static void collab_put_done(ident_t *co, PGresult *res)
{
    mh_req_t *req = co->req;
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b);
    mh_vb_put(b, m, "repo_id", mh_v_str(co->repo_id));
    mh_vb_put(b, m, "handle", mh_v_str(co->handle));
    mh_vb_put(b, m, "identity_id", mh_vb_str(b, mh_pq_str(res, 0, 0)));
    mh_vb_put(b, m, "role", mh_v_str(co->role));
    /* Our own repository-lookup cache holds the old role: drop it now
     * (other processes get the trigger's NOTIFY). */
    mh_hub_repo_cache_invalidate(req->app, co->repo_id);
    mh_info("repo %s: collaborator %s role %s (by %s)", co->repo_id, co->handle, co->role, mh_req_caller(req)->handle);
    mh_res_val(req, 200, m);
}

static void collab_put_repo(mh_req_t *req, mh_repo_t *repo)
{
    mh_val_t body;
    char *handle = mh__param_handle(req);
    if (!handle || !mh__body_map(req, &body)) return;
    const mh_val_t *r = mh_val_get(&body, "role");
    const char *role = mh_val_streq(r, "read")    ? "read"
                       : mh_val_streq(r, "write") ? "write"
                       : mh_val_streq(r, "admin") ? "admin"
                                                  : NULL;
    if (!role) {
        mh_res_error(req, 422, "invalid_field", "'role' must be \"read\", \"write\" or \"admin\"");
        return;
    }
    mh_id_t iid;
    mh_identity_id(handle, strlen(handle), &iid);
    if (!strcmp(iid.s, repo->owner_id)) {
        mh_res_error(req, 422, "invalid_field", "the owner of a repository cannot be a collaborator on it");
        return;
    }
    ident_t *co = ident_new(req, handle);
    if (!co) return;
    co->repo_id = repo->repo_id;
    co->role = role;
    const char *vals[3] = {repo->repo_id, handle, role};
    ident_query(co, collab_put_done, "no such identity",
                "INSERT INTO collaborators (repo_id, identity_id, role)"
                " SELECT $1, identity_id, $3 FROM identities WHERE handle = $2"
                " ON CONFLICT (repo_id, identity_id) DO UPDATE SET role = EXCLUDED.role RETURNING identity_id",
                3, vals, NULL, NULL);
}

void mh_h_collab_put(mh_req_t *req) { mh_hub_load_repo(req, MH_PERM_ADMIN, collab_put_repo); }

static void collab_deleted(ident_t *co, PGresult *res)
{
    mh_req_t *req = co->req;
    if (PQntuples(res) != 1 || mh_pq_int(res, 0, 0) == 0) {
        mh_res_error(req, 404, "not_found", "no such identity");
        return;
    }
    if (mh_pq_int(res, 0, 1) > 0) {
        mh_hub_repo_cache_invalidate(req->app, co->repo_id);
        mh_info("repo %s: collaborator %s removed (by %s)", co->repo_id, co->handle, mh_req_caller(req)->handle);
    }
    mh_res_send(req, 204, NULL, NULL, 0);
}

static void collab_delete_repo(mh_req_t *req, mh_repo_t *repo)
{
    char *handle = mh__param_handle(req);
    ident_t *co = handle ? ident_new(req, handle) : NULL;
    if (!co) return;
    co->repo_id = repo->repo_id;
    /* Removing someone who is not a collaborator is not an error (204);
     * an unknown handle is 404. */
    const char *vals[2] = {repo->repo_id, handle};
    ident_query(co, collab_deleted, NULL,
                "WITH i AS (SELECT identity_id FROM identities WHERE handle = $2),"
                " d AS (DELETE FROM collaborators c USING i WHERE c.repo_id = $1 AND c.identity_id = i.identity_id"
                " RETURNING 1)"
                " SELECT (SELECT count(*) FROM i), (SELECT count(*) FROM d)",
                2, vals, NULL, NULL);
}

void mh_h_collab_delete(mh_req_t *req) { mh_hub_load_repo(req, MH_PERM_ADMIN, collab_delete_repo); }

static mh_val_t *collab_row(mh_req_t *req, mh_vb_t *b, PGresult *res, int i)
{
    (void)req;
    static const char *const cols[3] = {"handle", "identity_id", "role"};
    mh_val_t *m = mh_vb_map(b);
    for (int c = 0; c < 3; c++) mh_vb_put(b, m, cols[c], mh_vb_str(b, mh_pq_str(res, i, c)));
    return m;
}

static void collab_list_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh__list_answer(ud, res, err, errmsg, "collaborators", collab_row);
}

static void collab_list_repo(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    const char *vals[1] = {repo->repo_id};
    mh_db_query(hub->db,
                "SELECT i.handle, i.identity_id, c.role FROM collaborators c"
                " JOIN identities i ON i.identity_id = c.identity_id WHERE c.repo_id = $1 ORDER BY i.handle",
                1, vals, NULL, NULL, collab_list_cb, req);
}

void mh_h_collab_list(mh_req_t *req) { mh_hub_load_repo(req, MH_PERM_ADMIN, collab_list_repo); }
