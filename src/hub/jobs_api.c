/*
 * jobs_api.c — the job endpoints of SPEC 4.7:
 *   POST /api/repos/{repo_id}/jobs  {job_type, payload?} -> 202 {job_id, status}
 *   GET  /api/jobs/{job_id}         -> {job_id, job_type, status, attempt, result, error}
 *
 * Invariants:
 *  - Only the repository's owner, its admin collaborators and server
 *    admins may enqueue or see a repository's jobs; everyone else gets
 *    what mh_hub_load_repo answers (404 for a repository they cannot read)
 *    and, for GET, 404 (a job's existence is not revealed).
 *  - An mpack.index job may only name a pack this repository already
 *    references (mpack_refs) or holds an unexpired push grant for; the
 *    check and the insert are one statement. Naming a hash never imports
 *    a pack (the job itself re-checks when it runs: src/jobs/index.c).
 *  - The payload stored is rebuilt from the validated fields, never the
 *    client's bytes.
 *  - The runners are woken by the NOTIFY of the insert trigger
 *    (sql/0003_jobs.sql).
 */
#include <libpq-fe.h>
#include <stdio.h>
#include <string.h>

#include "hub_internal.h"
#include "mh/jobs.h"

typedef struct {
    mh_req_t *req;
    const char *type;
    char *payload_json;
    mh_id_t mpack_key; /* mpack.index */
    mh_id_t job_id;
} jcreate_t;

static void create_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    jcreate_t *c = ud;
    mh_req_t *req = c->req;
    if (!mh__db_ok(req, err, errmsg)) return;
    if (PQntuples(res) != 1) {
        mh_res_error(req, 404, "not_found",
                     "this repository neither references mpack %s nor holds an unexpired push grant for it",
                     c->mpack_key.s);
        return;
    }
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b);
    mh_vb_put(b, m, "job_id", mh_v_str(c->job_id.s));
    mh_vb_put(b, m, "status", mh_vb_str(b, mh_pq_str(res, 0, 0)));
    mh_vb_put(b, m, "job_type", mh_v_str(c->type));
    mh_info("req %s: job %s (%s) enqueued", req->id, c->job_id.s, c->type);
    mh_res_val(req, 202, m);
}

static void create_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    jcreate_t *c = req->user;
    uint8_t rnd[32];
    if (mh_random(rnd, sizeof rnd)) {
        mh_res_error(req, 503, "unavailable", "no randomness");
        return;
    }
    mh_id_from_digest(&c->job_id, rnd);
    const char *vals[5] = {c->job_id.s, repo->repo_id, c->type, c->payload_json, c->mpack_key.s};
    if (!strcmp(c->type, "mpack.index")) {
        mh_db_query(hub->db,
                    "INSERT INTO jobs (job_id, repo_id, job_type, payload) SELECT $1, $2, $3, $4::jsonb"
                    " WHERE EXISTS (SELECT 1 FROM mpack_refs WHERE repo_id = $2 AND mpack_id = $5)"
                    " OR EXISTS (SELECT 1 FROM push_grants WHERE repo_id = $2 AND mpack_key = $5"
                    "  AND consumed_at IS NULL AND expires_at > now())"
                    " RETURNING status",
                    5, vals, NULL, NULL, create_cb, c);
    } else {
        mh_db_query(hub->db,
                    "INSERT INTO jobs (job_id, repo_id, job_type, payload) VALUES ($1, $2, $3, $4::jsonb)"
                    " RETURNING status",
                    4, vals, NULL, NULL, create_cb, c);
    }
}

void mh_h_jobs_create(mh_req_t *req)
{
    mh_val_t body;
    if (!mh_req_body_val(req, &body)) return;
    if (body.t != MH_V_MAP) {
        mh_res_error(req, 422, "invalid_body", "the body must be a map");
        return;
    }
    mh_arena_t *a = &req->arena;
    jcreate_t *c = mh_calloc(a, sizeof *c);
    mh_val_t *payload = mh_v_map(a);
    if (!c || !payload) {
        mh_res_fail(req, MH_ENOMEM, "jobs");
        return;
    }
    c->req = req;
    const mh_val_t *t = mh_val_get(&body, "job_type");
    if (!t || t->t != MH_V_STR || !mh_job_type_known(t->v.s.p, t->v.s.n)) {
        mh_res_error(req, 422, "invalid_job_type", "'job_type' must be one of \"mpack.index\", \"mpack.gc\"");
        return;
    }
    c->type = t->v.s.n == 11 ? "mpack.index" : "mpack.gc";
    const mh_val_t *p = mh_val_get(&body, "payload");
    if (p && p->t != MH_V_NIL && p->t != MH_V_MAP) {
        mh_res_error(req, 422, "invalid_payload", "'payload' must be a map");
        return;
    }
    if (!strcmp(c->type, "mpack.index")) {
        const mh_val_t *k = p && p->t == MH_V_MAP ? mh_val_get(p, "mpack_key") : NULL;
        if (!k || k->t != MH_V_STR || !mh_id_valid(k->v.s.p, k->v.s.n)) {
            mh_res_error(req, 422, "invalid_payload", "payload.mpack_key must be sha256:<64 lowercase hex>");
            return;
        }
        memcpy(c->mpack_key.s, k->v.s.p, MH_ID_LEN);
        c->mpack_key.s[MH_ID_LEN] = 0;
        if (mh_map_put(a, payload, "mpack_key", mh_v_str(c->mpack_key.s))) {
            mh_res_fail(req, MH_ENOMEM, "jobs");
            return;
        }
    }
    mh_buf_t out = {0};
    if (mh_encode(payload, MH_FMT_JSON, &out) || !(c->payload_json = mh_strndup(a, (char *)out.p, out.len))) {
        mh_buf_free(&out);
        mh_res_fail(req, MH_ENOMEM, "jobs");
        return;
    }
    mh_buf_free(&out);
    req->user = c;
    mh_hub_load_repo(req, MH_PERM_ADMIN, create_repo_cb);
}

/* ------------------------------------------------------------------ GET */

static void get_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_req_t *req = ud;
    if (!mh__db_ok(req, err, errmsg)) return;
    const mh_caller_t *caller = mh_req_caller(req);
    bool visible = false;
    if (PQntuples(res) == 1 && !caller->anonymous) {
        if (caller->is_admin) visible = true;
        else if (!mh_pq_isnull(res, 0, 6))
            visible = mh_auth_perm(caller, mh_pq_str(res, 0, 6), !strcmp(mh_pq_str(res, 0, 7), "public"),
                                   mh_pq_isnull(res, 0, 8) ? NULL : mh_pq_str(res, 0, 8)) >= MH_PERM_ADMIN;
    }
    if (!visible) {
        mh_res_error(req, 404, "not_found", "job not found");
        return;
    }
    mh_arena_t *a = &req->arena;
    mh_val_t result = mh_v_nil();
    if (!mh_pq_isnull(res, 0, 4)) {
        const char *txt = mh_pq_str(res, 0, 4);
        char *copy = mh_strdup(a, txt);
        const char *why = NULL;
        if (!copy || mh_json_decode(a, (const uint8_t *)copy, strlen(copy), &mh_decode_limits_default, &result, &why)) {
            mh_res_error(req, 500, "internal", "stored job result is not JSON");
            return;
        }
    }
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b);
#define COL(i) (mh_pq_isnull(res, 0, (i)) ? mh_v_nil() : mh_vb_str(b, mh_pq_str(res, 0, (i))))
    mh_vb_put(b, m, "job_id", COL(0));
    mh_vb_put(b, m, "job_type", COL(1));
    mh_vb_put(b, m, "status", COL(2));
    mh_vb_put(b, m, "attempt", mh_v_int(mh_pq_int(res, 0, 3)));
    mh_vb_put(b, m, "max_attempts", mh_v_int(mh_pq_int(res, 0, 9)));
    mh_vb_put(b, m, "result", result);
    mh_vb_put(b, m, "error", COL(5));
    mh_vb_put(b, m, "repo_id", COL(10));
    mh_vb_put(b, m, "created_at", COL(11));
    mh_vb_put(b, m, "updated_at", COL(12));
#undef COL
    mh_res_val(req, 200, m);
}

static const mh_stmt_t st_job_get = {
    "hub_job_get",
    "SELECT j.job_id, j.job_type, j.status, j.attempt, j.result::text, j.error, r.owner_id, r.visibility, c.role,"
    " j.max_attempts, j.repo_id,"
    " to_char(j.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'),"
    " to_char(j.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"
    " FROM jobs j LEFT JOIN repos r ON r.repo_id = j.repo_id"
    " LEFT JOIN collaborators c ON c.repo_id = j.repo_id AND c.identity_id = $2"
    " WHERE j.job_id = $1",
    2};

void mh_h_job_get(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    mh_str_t id = mh_req_param(req, "job_id");
    if (!id.p || !mh_id_valid(id.p, id.n)) {
        mh_res_error(req, 422, "invalid_id", "job_id must be sha256:<64 lowercase hex>");
        return;
    }
    const mh_caller_t *caller = mh_req_caller(req);
    if (caller->anonymous) {
        mh_res_error(req, 404, "not_found", "job not found");
        return;
    }
    const char *vals[2] = {mh_strndup(&req->arena, id.p, id.n), caller->identity_id.s};
    if (!vals[0]) {
        mh_res_fail(req, MH_ENOMEM, "jobs");
        return;
    }
    mh_db_exec(hub->db, &st_job_get, vals, NULL, NULL, get_cb, req);
}
