/*
 * refs_api.c — branches, tags, protection rules and repository settings
 * over the API (SPEC 4.1 PATCH, 4.2):
 *
 *   PATCH  /api/repos/{repo_id}                                 settings (ADMIN)
 *   GET    /api/repos/{repo_id}/branches                        list (READ)
 *   POST   /api/repos/{repo_id}/branches                        create (WRITE)
 *   GET    /api/repos/{repo_id}/branches/{*name}                one (READ)
 *   PATCH  /api/repos/{repo_id}/branches/{*name}                move (WRITE)
 *   DELETE /api/repos/{repo_id}/branches/{*name}                delete (WRITE)
 *   GET    /api/repos/{repo_id}/branches/{*name}/protection     the rule (READ)
 *   PUT    /api/repos/{repo_id}/branches/{*name}/protection     set it (ADMIN)
 *   DELETE /api/repos/{repo_id}/branches/{*name}/protection     drop it (ADMIN)
 *   GET    /api/repos/{repo_id}/tags                            list (READ)
 *   POST   /api/repos/{repo_id}/tags                            create (WRITE)
 *   GET    /api/repos/{repo_id}/tags/{*name}                    one (READ)
 *   DELETE /api/repos/{repo_id}/tags/{*name}                    delete (WRITE)
 *
 * Names may contain '/': the route's {*name} takes the path up to the
 * literal "/protection" (route.c); a branch whose name itself ends in
 * "/protection" is named with %2F for that slash.
 *
 * Every change is one operation of the step kit with the same steps —
 * ACQUIRE, BEGIN (refwrite: the repository row), ACT (refwrite: the
 * branch move judged, or the one statement of a rule, tag or settings
 * change), WRITE (an accepted move's rows), COMMIT, DONE (this process's
 * cached lookups and fetch answers of the repository go) — so every ref
 * change happens under the one lock order, and the branch moves are
 * judged, protection included, by refwrite's mh_rw_move_check like a push,
 * a server-side commit or a merge. The kinds differ only in their ACT,
 * WRITE and answer (refkind_t). Reads are single queries.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub_internal.h"

#define MAX_TAG_MESSAGE 65536
#define MAX_DESCRIPTION 4096

/* The text of a created_at / updated_at column. */
#define ISO_UTC(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"
#define TAG_COLS "name, commit_id, message, tagger, " ISO_UTC("created_at")
#define RULE_COLS                                                                                                      \
    "p.branch, p.allow_force_push, p.allow_delete, p.require_proposal, p.updated_by, " ISO_UTC("p.updated_at")

typedef struct refop refop_t;

/* One kind of ref change: its operation definition (first: the head's
 * def points at it), the permission it needs, its steps and its answer.
 * ACT is either act (a branch move's check) or, when act is NULL, the one
 * statement rows() builds, whose result goes to done(). */
typedef struct {
    mh__op_def_t def;
    mh_perm_t perm;
    void (*act)(mh_step_t *s);
    void (*rows)(mh_db_batch_t *b, refop_t *o);
    mh_step_pipe_fn done;
    void (*write)(mh_step_t *s); /* NULL: ACT wrote everything */
    void (*answer)(refop_t *o);
} refkind_t;

struct refop {
    mh__op_t op;
    /* request */
    char *name; /* the branch or tag */
    mh_id_t commit, expected;
    bool has_expected, force;
    mh_rule_t rule;
    char *message;
    const char *description, *visibility, *default_branch;
    /* outcome */
    mh_move_t mv;
    char *created_at, *updated_by, *updated_at;
    mh_repo_t repo; /* settings: the row after the change */
};

#define O(s) MH_STEP_OP(s, refop_t, op.step)
#define KIND_OF(o) ((const refkind_t *)(o)->op.def)

/* ============================================================ fields */

/* Fails with 422 invalid_field when the body has a key outside `keys`
 * (NULL-terminated): a misspelt setting must not be ignored silently. */
static bool only_keys(mh_req_t *req, const mh_val_t *body, const char *const *keys)
{
    for (uint32_t i = 0; i < body->v.m.n; i++) {
        const mh_val_t *k = &body->v.m.kv[i].k;
        bool known = false;
        for (const char *const *p = keys; *p && !known; p++)
            known = k->t == MH_V_STR && k->v.s.n == strlen(*p) && !memcmp(k->v.s.p, *p, k->v.s.n);
        if (!known) {
            mh_res_error(req, 422, "invalid_field", "unknown field '%.*s'",
                         k->t == MH_V_STR ? (int)(k->v.s.n > 64 ? 64 : k->v.s.n) : 1,
                         k->t == MH_V_STR ? k->v.s.p : "?");
            return false;
        }
    }
    return true;
}

/* A body field `key` that must be a ref name; NULL after answering 422. */
static char *body_name(mh_req_t *req, const mh_val_t *body, const char *key)
{
    const mh_val_t *v = mh_val_get(body, key);
    if (!v || v->t != MH_V_STR || !mh_ref_name_valid(v->v.s.p, v->v.s.n)) {
        mh_res_error(req, 422, "invalid_name",
                     "'%s' must be a ref name: 1..255 printable ASCII bytes without space or ~^:?*[\\, no '..', "
                     "'//' or '@{', no segment starting with '.' or ending with '.lock', not ending with '/' or '.'",
                     key);
        return NULL;
    }
    char *s = mh_strndup(&req->arena, v->v.s.p, v->v.s.n);
    if (!s) mh_res_fail(req, MH_ENOMEM, key);
    return s;
}

/* The route's {*name}: a name that is not a valid ref name names nothing
 * (404, like an unknown handle). NULL after answering. */
static char *param_name(mh_req_t *req, const char *what)
{
    mh_str_t n = mh_req_param(req, "name");
    if (!n.p || !mh_ref_name_valid(n.p, n.n)) {
        mh_res_error(req, 404, "not_found", "no such %s", what);
        return NULL;
    }
    char *s = mh_strndup(&req->arena, n.p, n.n);
    if (!s) mh_res_fail(req, MH_ENOMEM, what);
    return s;
}

static const char *caller_handle(mh_req_t *req)
{
    const mh_caller_t *c = mh_req_caller(req);
    return c->handle ? c->handle : "anonymous";
}

/* ========================================================= the steps */

static void step_begin(mh_step_t *s) { mh_rw_begin(s, O(s)->op.repo->repo_id, NULL, 0); }
static void step_act(mh_step_t *s)
{
    refop_t *o = O(s);
    const refkind_t *k = KIND_OF(o);
    if (k->act) {
        k->act(s);
        return;
    }
    mh_db_batch_t b = {0};
    k->rows(&b, o);
    mh_step_batch(s, &b, k->done);
}

static void step_write(mh_step_t *s)
{
    refop_t *o = O(s);
    if (KIND_OF(o)->write) KIND_OF(o)->write(s);
}

static const mh_step_def_t ref_steps[] = {
    {"acquire", mh_step_acquire}, {"begin", step_begin},      {"act", step_act},
    {"write", step_write},        {"commit", mh_step_commit}, {"done", mh__op_step_done},
};

static void ref_finish(mh_step_t *s);

/* A branch kind (its ACT judges a move, its WRITE applies it) and a
 * one-statement kind: name in logs, permission, statement, its result's
 * handler, answer. */
#define BRANCH_KIND(what)                                                                                              \
    {                                                                                                                  \
        {what, MH__STEPS(ref_steps), ref_finish, NULL, 0}, MH_PERM_WRITE, branch_act, NULL, NULL, branch_write,        \
            branch_answer                                                                                              \
    }
#define ROWS_KIND(what, perm, rows, done, answer)                                                                      \
    {                                                                                                                  \
        {what, MH__STEPS(ref_steps), ref_finish, NULL, 0}, perm, NULL, rows, done, NULL, answer                        \
    }

static void ref_finish(mh_step_t *s)
{
    refop_t *o = O(s);
    if (mh__op_failed(s, NULL)) return;
    mh_info("req %s: %s on %s/%s%s%s", o->op.req->id, o->op.def->what, o->op.repo->owner, o->op.repo->slug,
            o->name ? ": " : "", o->name ? o->name : "");
    KIND_OF(o)->answer(o);
}

/* A change of kind k (NULL after answering 503); the handler reads the
 * body into it, then ref_start loads the repository with the kind's
 * permission and runs the steps. */
static refop_t *ref_new(mh_req_t *req, const refkind_t *k) { return MH__OP_NEW(req, refop_t, &k->def); }

static void ref_start(refop_t *o) { mh_hub_load_repo(o->op.req, KIND_OF(o)->perm, mh__op_repo_cb); }

/* ===================================================== branch moves */

/* ACT of the branch kinds: the move, judged by refwrite (kind, cas and
 * head set by the handler in o->mv). */
static void branch_act(mh_step_t *s)
{
    refop_t *o = O(s);
    o->mv.repo_id = o->op.repo->repo_id;
    o->mv.branch = o->name;
    o->mv.api = true;
    mh_rw_move_check(s, &o->mv);
}

static void branch_write(mh_step_t *s)
{
    refop_t *o = O(s);
    /* An API move names an existing branch; creation is POST. */
    if (o->mv.kind != MH_MOVE_CREATE && !o->mv.exists) o->mv.verdict = MH_MOVE_ABSENT;
    if (o->mv.verdict) {
        mh_rw_move_refuse(s, &o->mv);
        return;
    }
    mh_db_batch_t b = {0};
    mh_rw_move_rows(&b, &o->mv);
    mh_step_batch(s, &b, NULL);
}

static void branch_answer(refop_t *o)
{
    mh_req_t *req = o->op.req;
    if (o->mv.kind == MH_MOVE_DELETE) {
        mh_res_send(req, 204, NULL, NULL, 0);
        return;
    }
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b);
    mh_vb_put(b, m, "name", mh_v_str(o->name));
    mh_vb_put(b, m, "head", mh_v_str(o->commit.s));
    if (o->mv.kind != MH_MOVE_CREATE) mh_vb_put(b, m, "old_head", mh_v_str(o->mv.old_head));
    mh_res_val(req, o->mv.kind == MH_MOVE_CREATE ? 201 : 200, m);
}

static const refkind_t k_branch_create = BRANCH_KIND("branch create");
static const refkind_t k_branch_move = BRANCH_KIND("branch move");
static const refkind_t k_branch_delete = BRANCH_KIND("branch delete");

void mh_h_branch_create(mh_req_t *req)
{
    refop_t *o = ref_new(req, &k_branch_create);
    mh_val_t body;
    static const char *const keys[] = {"name", "commit_id", NULL};
    if (!o || !mh__body_map(req, &body) || !only_keys(req, &body, keys) || !(o->name = body_name(req, &body, "name")) ||
        !mh__body_id(req, &body, "commit_id", true, &o->commit, NULL))
        return;
    o->mv = (mh_move_t){.kind = MH_MOVE_CREATE, .new_head = o->commit.s};
    ref_start(o);
}

void mh_h_branch_move(mh_req_t *req)
{
    refop_t *o = ref_new(req, &k_branch_move);
    mh_val_t body;
    static const char *const keys[] = {"commit_id", "force", "expected_old_head", NULL};
    if (!o || !(o->name = param_name(req, "branch")) || !mh__body_map(req, &body) || !only_keys(req, &body, keys) ||
        !mh__body_id(req, &body, "commit_id", true, &o->commit, NULL) ||
        !mh__body_id(req, &body, "expected_old_head", false, &o->expected, &o->has_expected) ||
        !mh__body_bool(req, &body, "force", &o->force))
        return;
    o->mv = (mh_move_t){.kind = o->force ? MH_MOVE_FORCE : MH_MOVE_FAST_FORWARD,
                        .new_head = o->commit.s,
                        .cas = o->has_expected,
                        .expected_old = o->has_expected ? o->expected.s : NULL};
    ref_start(o);
}

void mh_h_branch_delete(mh_req_t *req)
{
    refop_t *o = ref_new(req, &k_branch_delete);
    mh_val_t body;
    static const char *const keys[] = {"expected_old_head", NULL};
    if (!o || !(o->name = param_name(req, "branch")) || !mh__body_map(req, &body) || !only_keys(req, &body, keys) ||
        !mh__body_id(req, &body, "expected_old_head", false, &o->expected, &o->has_expected))
        return;
    o->mv = (mh_move_t){.kind = MH_MOVE_DELETE, .cas = o->has_expected, .expected_old = o->expected.s};
    ref_start(o);
}

/* ============================================================ rules */

static mh_val_t *rule_val(mh_vb_t *b, const char *branch, const mh_rule_t *r, const char *by, const char *at)
{
    mh_val_t *m = mh_vb_map(b);
    mh_vb_put(b, m, "branch", mh_vb_str(b, branch));
    mh_vb_put(b, m, "allow_force_push", mh_v_bool(r->allow_force_push));
    mh_vb_put(b, m, "allow_delete", mh_v_bool(r->allow_delete));
    mh_vb_put(b, m, "require_proposal", mh_v_bool(r->require_proposal));
    mh_vb_put(b, m, "updated_by", mh_vb_str(b, by));
    mh_vb_put(b, m, "updated_at", mh_vb_str(b, at));
    return m;
}

static bool col_true(PGresult *res, int r, int c) { return mh_pq_str(res, r, c)[0] == 't'; }

/* Row r of a result with RULE_COLS from column c as the rule's answer. */
static mh_val_t *rule_row_at(mh_req_t *req, mh_vb_t *b, PGresult *res, int r, int c)
{
    (void)req;
    mh_rule_t rule = {col_true(res, r, c + 1), col_true(res, r, c + 2), col_true(res, r, c + 3)};
    return rule_val(b, mh_pq_str(res, r, c), &rule, mh_pq_str(res, r, c + 4), mh_pq_str(res, r, c + 5));
}

static mh_val_t *rule_row(mh_req_t *req, mh_vb_t *b, PGresult *res, int r) { return rule_row_at(req, b, res, r, 0); }

static int rule_set_done(mh_step_t *s, PGresult **res, int n)
{
    refop_t *o = O(s);
    if (n != 1) return MH_EDB;
    if (PQntuples(res[0]) != 1) {
        mh_step_refuse(s, 404, "not_found", "no branch '%s' (a rule protects an existing branch)", o->name);
        return 0;
    }
    o->updated_by = mh_strdup(&o->op.req->arena, mh_pq_str(res[0], 0, 4));
    o->updated_at = mh_strdup(&o->op.req->arena, mh_pq_str(res[0], 0, 5));
    return o->updated_by && o->updated_at ? 0 : MH_ENOMEM;
}

static void rule_set_rows(mh_db_batch_t *b, refop_t *o)
{
    mh_rw_rule_rows(b, o->op.repo->repo_id, o->name, &o->rule, caller_handle(o->op.req));
}

static void rule_set_answer(refop_t *o)
{
    mh_vb_t *b = mh_res_build(o->op.req);
    mh_res_val(o->op.req, 200, rule_val(b, o->name, &o->rule, o->updated_by, o->updated_at));
}

/* The count of a DELETE_BUMP statement: 0 is a 404 with `absent`. */
static int deleted(mh_step_t *s, PGresult **res, int n, const char *absent)
{
    if (n != 1 || PQntuples(res[0]) != 1) return MH_EDB;
    if (mh_pq_int(res[0], 0, 0) == 0) mh_step_refuse(s, 404, "not_found", "%s '%s'", absent, O(s)->name);
    return 0;
}

static int rule_deleted(mh_step_t *s, PGresult **res, int n) { return deleted(s, res, n, "no protection rule for"); }

static void rule_delete_rows(mh_db_batch_t *b, refop_t *o) { mh_rw_rule_delete_rows(b, o->op.repo->repo_id, o->name); }

static void no_content(refop_t *o) { mh_res_send(o->op.req, 204, NULL, NULL, 0); }

static const refkind_t k_rule_set =
    ROWS_KIND("protection set", MH_PERM_ADMIN, rule_set_rows, rule_set_done, rule_set_answer);
static const refkind_t k_rule_delete =
    ROWS_KIND("protection delete", MH_PERM_ADMIN, rule_delete_rows, rule_deleted, no_content);

void mh_h_protection_put(mh_req_t *req)
{
    refop_t *o = ref_new(req, &k_rule_set);
    mh_val_t body;
    static const char *const keys[] = {"allow_force_push", "allow_delete", "require_proposal", NULL};
    if (!o || !(o->name = param_name(req, "branch")) || !mh__body_map(req, &body) || !only_keys(req, &body, keys) ||
        !mh__body_bool(req, &body, "allow_force_push", &o->rule.allow_force_push) ||
        !mh__body_bool(req, &body, "allow_delete", &o->rule.allow_delete) ||
        !mh__body_bool(req, &body, "require_proposal", &o->rule.require_proposal))
        return;
    ref_start(o);
}

void mh_h_protection_delete(mh_req_t *req)
{
    refop_t *o = ref_new(req, &k_rule_delete);
    if (o && (o->name = param_name(req, "branch"))) ref_start(o);
}

/* ============================================================= tags */

static mh_val_t *tag_val(mh_vb_t *b, const char *name, const char *commit, const char *message, const char *tagger,
                         const char *at)
{
    mh_val_t *m = mh_vb_map(b);
    mh_vb_put(b, m, "name", mh_vb_str(b, name));
    mh_vb_put(b, m, "commit_id", mh_vb_str(b, commit));
    mh_vb_put(b, m, "message", mh_vb_str(b, message));
    mh_vb_put(b, m, "tagger", mh_vb_str(b, tagger));
    mh_vb_put(b, m, "created_at", mh_vb_str(b, at));
    return m;
}

/* Row r of a TAG_COLS result. */
static mh_val_t *tag_row(mh_req_t *req, mh_vb_t *b, PGresult *res, int r)
{
    (void)req;
    return tag_val(b, mh_pq_str(res, r, 0), mh_pq_str(res, r, 1), mh_pq_str(res, r, 2), mh_pq_str(res, r, 3),
                   mh_pq_str(res, r, 4));
}

static int tag_done(mh_step_t *s, PGresult **res, int n)
{
    refop_t *o = O(s);
    if (n != 1 || PQntuples(res[0]) != 1) return MH_EDB;
    if (mh_pq_str(res[0], 0, 0)[0] != 't') {
        mh_step_refuse(s, 404, "not_found", "commit %s is not in this repository", o->commit.s);
        return 0;
    }
    if (mh_pq_isnull(res[0], 0, 1)) {
        mh_step_refuse(s, 409, "exists", "tag '%s' exists (tags never move: delete it first)", o->name);
        return 0;
    }
    o->created_at = mh_strdup(&o->op.req->arena, mh_pq_str(res[0], 0, 1));
    return o->created_at ? 0 : MH_ENOMEM;
}

static void tag_rows(mh_db_batch_t *b, refop_t *o)
{
    mh_rw_tag_rows(b, o->op.repo->repo_id, o->name, o->commit.s, o->message, caller_handle(o->op.req));
}

static void tag_answer(refop_t *o)
{
    mh_vb_t *b = mh_res_build(o->op.req);
    mh_res_val(o->op.req, 201, tag_val(b, o->name, o->commit.s, o->message, caller_handle(o->op.req), o->created_at));
}

static int tag_deleted(mh_step_t *s, PGresult **res, int n) { return deleted(s, res, n, "no tag"); }

static void tag_delete_rows(mh_db_batch_t *b, refop_t *o) { mh_rw_tag_delete_rows(b, o->op.repo->repo_id, o->name); }

static const refkind_t k_tag_create = ROWS_KIND("tag create", MH_PERM_WRITE, tag_rows, tag_done, tag_answer);
static const refkind_t k_tag_delete = ROWS_KIND("tag delete", MH_PERM_WRITE, tag_delete_rows, tag_deleted, no_content);

void mh_h_tag_create(mh_req_t *req)
{
    refop_t *o = ref_new(req, &k_tag_create);
    mh_val_t body;
    static const char *const keys[] = {"name", "commit_id", "message", NULL};
    if (!o || !mh__body_map(req, &body) || !only_keys(req, &body, keys) || !(o->name = body_name(req, &body, "name")) ||
        !mh__body_id(req, &body, "commit_id", true, &o->commit, NULL))
        return;
    const mh_val_t *msg = mh_val_get(&body, "message");
    o->message = "";
    if (msg && msg->t != MH_V_NIL && !(o->message = mh__text_field(&req->arena, msg, MAX_TAG_MESSAGE, true))) {
        mh_res_error(req, 422, "invalid_field", "'message' must be a UTF-8 string of at most %d bytes without NUL",
                     MAX_TAG_MESSAGE);
        return;
    }
    ref_start(o);
}

void mh_h_tag_delete(mh_req_t *req)
{
    refop_t *o = ref_new(req, &k_tag_delete);
    if (o && (o->name = param_name(req, "tag"))) ref_start(o);
}

/* ========================================================= settings */

static int settings_done(mh_step_t *s, PGresult **res, int n)
{
    refop_t *o = O(s);
    if (n != 1 || PQntuples(res[0]) != 1) return MH_EDB;
    if (mh_pq_str(res[0], 0, 0)[0] != 't') {
        mh_step_refuse(s, 422, "invalid_field", "'default_branch': no branch '%s' in this repository",
                       o->default_branch);
        return 0;
    }
    /* The row after the change: the nine columns after `ok`. */
    static const int cols = 9;
    char **fields[] = {&o->repo.repo_id,     &o->repo.owner,          &o->repo.owner_id,
                       &o->repo.name,        &o->repo.slug,           &o->repo.visibility,
                       &o->repo.description, &o->repo.default_branch, &o->repo.created_at};
    for (int i = 0; i < cols; i++)
        if (!(*fields[i] = mh_strdup(&o->op.req->arena, mh_pq_str(res[0], 0, i + 1)))) return MH_ENOMEM;
    return 0;
}

static void settings_rows(mh_db_batch_t *b, refop_t *o)
{
    mh_rw_settings_rows(b, o->op.repo->repo_id, o->description, o->visibility, o->default_branch);
}

static void settings_answer(refop_t *o) { mh_res_val(o->op.req, 200, mh_repo_val(o->op.req, &o->repo)); }

static const refkind_t k_settings = ROWS_KIND("settings", MH_PERM_ADMIN, settings_rows, settings_done, settings_answer);

void mh_h_repo_patch(mh_req_t *req)
{
    refop_t *o = ref_new(req, &k_settings);
    mh_val_t body;
    static const char *const keys[] = {"description", "visibility", "default_branch", NULL};
    if (!o || !mh__body_map(req, &body) || !only_keys(req, &body, keys)) return;
    const mh_val_t *d = mh_val_get(&body, "description"), *v = mh_val_get(&body, "visibility"),
                   *db = mh_val_get(&body, "default_branch");
    if (d && d->t != MH_V_NIL && !(o->description = mh__text_field(&req->arena, d, MAX_DESCRIPTION, true))) {
        mh_res_error(req, 422, "invalid_field", "'description' must be a UTF-8 string of at most %d bytes without NUL",
                     MAX_DESCRIPTION);
        return;
    }
    if (v && v->t != MH_V_NIL) {
        o->visibility = mh_val_streq(v, "public") ? "public" : mh_val_streq(v, "private") ? "private" : NULL;
        if (!o->visibility) {
            mh_res_error(req, 422, "invalid_field", "'visibility' must be \"public\" or \"private\"");
            return;
        }
    }
    if (db && db->t != MH_V_NIL && !(o->default_branch = body_name(req, &body, "default_branch"))) return;
    ref_start(o);
}

/* ============================================================ reads */

typedef struct {
    mh_req_t *req;
    const char *sql;  /* $1 the repository, $2 the name when one row is read */
    const char *name; /* NULL: a list */
    const char *what; /* the 404's detail */
    mh__row_fn row;
    const char *list; /* the list's key */
} read_t;

static void read_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    read_t *r = ud;
    if (!r->name) {
        mh__list_answer(r->req, res, err, errmsg, r->list, r->row);
        return;
    }
    if (!mh__db_one(r->req, res, err, errmsg, r->what)) return;
    mh_res_val(r->req, 200, r->row(r->req, mh_res_build(r->req), res, 0));
}

static void read_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    read_t *r = req->user;
    mh_hub_t *hub = req->app;
    const char *vals[2] = {repo->repo_id, r->name};
    mh_db_query(hub->db, r->sql, r->name ? 2 : 1, vals, NULL, NULL, read_cb, r);
}

/* Reads with sql: one row named by the route's {*name} (what: the kind of
 * ref, for the 404) or, with list, every row. */
static void read_start(mh_req_t *req, const char *sql, const char *what, mh__row_fn row, const char *list)
{
    read_t *r = mh__req_alloc(req, sizeof *r);
    if (!r) return;
    *r = (read_t){req, sql, NULL, NULL, row, list};
    if (!list) {
        if (!(r->name = param_name(req, what))) return;
        r->what = mh_sprintf(&req->arena, "no %s '%s'", what, r->name);
        if (!r->what) {
            mh_res_fail(req, MH_ENOMEM, what);
            return;
        }
    }
    req->user = r;
    mh_hub_load_repo(req, MH_PERM_READ, read_repo_cb);
}

/* Row r of a branch query: name, head, then the rule's RULE_COLS (NULL
 * when there is none). */
static mh_val_t *branch_row(mh_req_t *req, mh_vb_t *b, PGresult *res, int r)
{
    mh_val_t *m = mh_vb_map(b);
    mh_vb_put(b, m, "name", mh_vb_str(b, mh_pq_str(res, r, 0)));
    mh_vb_put(b, m, "head", mh_vb_str(b, mh_pq_str(res, r, 1)));
    mh_vb_put(b, m, "protection", mh_pq_isnull(res, r, 2) ? mh_v_nil() : mh_vb_node(b, rule_row_at(req, b, res, r, 2)));
    return m;
}

#define BRANCH_SQL                                                                                                     \
    "SELECT b.name, b.head_commit_id, " RULE_COLS " FROM branches b LEFT JOIN branch_protection p"                     \
    " ON p.repo_id = b.repo_id AND p.branch = b.name WHERE b.repo_id = $1"

void mh_h_branch_list(mh_req_t *req) { read_start(req, BRANCH_SQL " ORDER BY b.name", NULL, branch_row, "branches"); }
void mh_h_branch_get(mh_req_t *req) { read_start(req, BRANCH_SQL " AND b.name = $2", "branch", branch_row, NULL); }

void mh_h_protection_get(mh_req_t *req)
{
    read_start(req, "SELECT " RULE_COLS " FROM branch_protection p WHERE p.repo_id = $1 AND p.branch = $2",
               "protection rule for", rule_row, NULL);
}

void mh_h_tag_list(mh_req_t *req)
{
    read_start(req, "SELECT " TAG_COLS " FROM tags WHERE repo_id = $1 ORDER BY name", NULL, tag_row, "tags");
}

void mh_h_tag_get(mh_req_t *req)
{
    read_start(req, "SELECT " TAG_COLS " FROM tags WHERE repo_id = $1 AND name = $2", "tag", tag_row, NULL);
}
