/*
 * read.c — the read API (SPEC 4.5): the commit log of a branch, one
 * commit, the tree of a commit or branch, and one object's bytes.
 *
 * Invariants:
 *  - Every lookup goes through this repository's ref rows (commit_refs,
 *    object_refs) or its branches, never through global existence: a
 *    commit or object of another repository is a 404 here.
 *  - The log is computed on the cached commit graph (graph.c), so a page
 *    costs O(position + limit) in memory plus one query for the page's
 *    rows. The cursor is the last commit id of the previous page.
 *  - An object is one ranged read of its source pack (its mpack_index
 *    row); objects are immutable, so they carry a strong ETag (the id)
 *    and immutable cache headers.
 */
#include "hub_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOG_DEFAULT 50
#define LOG_MAX 500

/* Runs st with $1 = the text[] of n ids and, when st takes two, $2 =
 * second; answers 503 when the array does not fit in memory. */
static void exec_ids(mh_req_t *req, const mh_stmt_t *st, const char *const *ids, size_t n, const char *second,
                     mh_db_result_cb cb, void *ud)
{
    mh_hub_t *hub = req->app;
    const char *vals[2] = {mh_pq_array(&req->arena, ids, n, MH_ID_LEN), second};
    if (vals[0]) mh_db_exec(hub->db, st, vals, NULL, NULL, cb, ud);
    else mh_res_fail(req, MH_ENOMEM, st->name);
}

/* ---------------------------------------------------------- commit maps */

#define COMMIT_COLS                                                                                             \
    "c.commit_id, c.parent_commit_id, c.parent2_commit_id, c.snapshot_id, c.message, c.author, c.committed_at," \
    " r.branch, c.generation, r.meta"

static const char *const std_keys[] = {"commit_id", "parent_commit_id", "parent2_commit_id", "parent_ids",
                                       "snapshot_id", "message", "author", "committed_at", "branch", "generation"};

static bool is_std_key(const char *p, size_t n)
{
    for (size_t i = 0; i < sizeof std_keys / sizeof *std_keys; i++)
        if (strlen(std_keys[i]) == n && memcmp(std_keys[i], p, n) == 0) return true;
    return false;
}

static mh_val_t str_or_nil(mh_vb_t *b, PGresult *res, int r, int c)
{
    return mh_pq_isnull(res, r, c) ? mh_v_nil() : mh_vb_str(b, mh_pq_str(res, r, c));
}

/* The optional metadata kept verbatim at push (SPEC 2): its keys join the
 * commit map. */
static void put_meta(mh_vb_t *b, mh_val_t *m, PGresult *res, int r)
{
    uint8_t *mp;
    size_t n;
    mh_val_t meta;
    const char *why;
    if (mh_pq_isnull(res, r, 9) || mh_pq_bytea(b->a, res, r, 9, &mp, &n) ||
        mh_msgpack_decode(b->a, mp, n, &mh_decode_limits_default, &meta, &why) || meta.t != MH_V_MAP)
        return;
    for (uint32_t i = 0; i < meta.v.m.n; i++) {
        const mh_kv_t *kv = &meta.v.m.kv[i];
        if (kv->k.t != MH_V_STR || is_std_key(kv->k.v.s.p, kv->k.v.s.n)) continue;
        char *k = mh_strndup(b->a, kv->k.v.s.p, kv->k.v.s.n);
        mh_vb_put(b, m, k, k ? kv->v : mh_vb_node(b, NULL));
    }
}

/* Row r of a COMMIT_COLS result as the commit map of SPEC 2, plus
 * parent_ids and generation, plus the stored metadata keys. */
static mh_val_t *commit_val(mh_vb_t *b, PGresult *res, int r)
{
    static const char *const keys[8] = {"commit_id", "parent_commit_id", "parent2_commit_id", "snapshot_id",
                                        "message", "author", "committed_at", "branch"};
    mh_val_t *m = mh_vb_map(b), *parents = mh_vb_arr(b);
    for (int c = 1; c <= 2; c++)
        if (!mh_pq_isnull(res, r, c)) mh_vb_push(b, parents, str_or_nil(b, res, r, c));
    for (int c = 0; c < 8; c++) mh_vb_put(b, m, keys[c], str_or_nil(b, res, r, c));
    mh_vb_put(b, m, "parent_ids", mh_vb_node(b, parents));
    mh_vb_put(b, m, "generation", mh_v_int(mh_pq_int(res, r, 8)));
    put_meta(b, m, res, r);
    return m;
}

/* --------------------------------------------------- GET .../commits/{id} */

static const mh_stmt_t st_commit = {
    "hub_read_commit",
    "SELECT " COMMIT_COLS " FROM commit_refs r JOIN commits c ON c.commit_id = r.commit_id"
    " WHERE r.repo_id = $1 AND r.commit_id = $2",
    2};

static void commit_row_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_req_t *req = ud;
    if (!mh__db_one(req, res, err, errmsg, "commit not found in this repository")) return;
    mh_res_val(req, 200, commit_val(mh_res_build(req), res, 0));
}

static void commit_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    const char *vals[2] = {repo->repo_id, req->user};
    mh_db_exec(hub->db, &st_commit, vals, NULL, NULL, commit_row_cb, req);
}

void mh_h_commit(mh_req_t *req)
{
    mh_str_t id = mh_req_param(req, "commit_id");
    if (!id.p || !mh_id_valid(id.p, id.n)) {
        mh_res_error(req, 422, "invalid_id", "commit id must be sha256:<64 hex>");
        return;
    }
    req->user = mh_strndup(&req->arena, id.p, id.n);
    if (!req->user) {
        mh_res_fail(req, MH_ENOMEM, "commit");
        return;
    }
    mh_hub_load_repo(req, MH_PERM_READ, commit_repo_cb);
}

/* ---------------------------------------------------- GET .../commits */

typedef struct {
    mh_req_t *req;
    mh_repo_t *repo;
    const char *branch;
    bool branch_given;
    uint32_t limit;
    const char *cursor;
    mh_graph_t *g;
    bool reloaded;
    uint32_t *page;
    uint32_t npage;
    bool more;
    const char **ids;
} log_t;

static const mh_stmt_t st_commits_page = {
    "hub_read_commits_page",
    "SELECT " COMMIT_COLS " FROM commits c JOIN commit_refs r ON r.commit_id = c.commit_id AND r.repo_id = $2"
    " WHERE c.commit_id = ANY($1::text[])",
    2};

static void log_rows_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    log_t *l = ud;
    mh_req_t *req = l->req;
    if (!mh__db_ok(req, err, errmsg)) return;
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *arr = mh_vb_arr(b), *out = mh_vb_map(b);
    /* Rows come back in any order: place each by its position in the page. */
    int rows = PQntuples(res);
    for (uint32_t i = 0; i < l->npage; i++) {
        int r = 0;
        while (r < rows && strcmp(mh_pq_str(res, r, 0), l->ids[i]) != 0) r++;
        if (r == rows) {
            mh_res_fail(req, MH_EDB, "a commit row of the graph is missing");
            return;
        }
        mh_vb_push(b, arr, mh_vb_node(b, commit_val(b, res, r)));
    }
    const char *next = l->more && l->npage ? l->ids[l->npage - 1] : NULL;
    mh_vb_put(b, out, "commits", mh_vb_node(b, arr));
    mh_vb_put(b, out, "next_cursor", next ? mh_v_str(next) : mh_v_nil());
    mh_res_val(req, 200, out);
}

static void send_empty_log(mh_req_t *req)
{
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *out = mh_vb_map(b);
    mh_vb_put(b, out, "commits", mh_vb_node(b, mh_vb_arr(b)));
    mh_vb_put(b, out, "next_cursor", mh_v_nil());
    mh_res_val(req, 200, out);
}

static void log_graph_cb(void *ud, mh_graph_t *g, int err, const char *errmsg);

static void log_run(log_t *l)
{
    mh_req_t *req = l->req;
    mh_hub_t *hub = req->app;
    mh_arena_t *a = &req->arena;
    mh_graph_t *g = l->g;
    const mh_gbranch_t *b = mh__graph_branch(g, l->branch, strlen(l->branch));
    if (!b) {
        if (l->branch_given) mh_res_error(req, 404, "not_found", "no such branch");
        else send_empty_log(req); /* a repository without commits yet */
        return;
    }
    uint32_t cursor = MH_GNONE;
    if (l->cursor) {
        cursor = mh__graph_find(g, l->cursor);
        if (cursor == MH_GNONE) {
            mh_res_error(req, 422, "invalid_cursor", "cursor is not a commit of this branch");
            return;
        }
    }
    if (b->node == MH_GNONE) {
        /* The head's ref row was added after this graph was read (the
         * state counter did not move): read the graph again once (the
         * load reads the ref rows added since the cached graph). */
        if (!l->reloaded) {
            l->reloaded = true;
            if (mh__graph_load(hub, a, l->repo->repo_id, log_graph_cb, l)) mh_res_fail(req, MH_ENOMEM, "commits");
            return;
        }
        mh_res_fail(req, MH_EDB, "branch head is not among the repository's commits");
        return;
    }
    l->page = mh_alloc(a, (l->limit + 1) * sizeof *l->page);
    if (!l->page) {
        mh_res_fail(req, MH_ENOMEM, "commits");
        return;
    }
    int rc = mh__graph_log(g, b->node, cursor, l->limit, l->page, &l->npage, &l->more);
    if (rc == MH_ENOENT) {
        mh_res_error(req, 422, "invalid_cursor", "cursor is not a commit of this branch");
        return;
    }
    if (rc) {
        mh_res_fail(req, rc, "commits");
        return;
    }
    if (l->npage == 0) {
        send_empty_log(req);
        return;
    }
    l->ids = mh_alloc(a, l->npage * sizeof *l->ids);
    if (!l->ids) {
        mh_res_fail(req, MH_ENOMEM, "commits");
        return;
    }
    for (uint32_t i = 0; i < l->npage; i++) {
        mh_id_t id;
        mh__graph_id(g, l->page[i], &id);
        if (!(l->ids[i] = mh_strndup(a, id.s, MH_ID_LEN))) {
            mh_res_fail(req, MH_ENOMEM, "commits");
            return;
        }
    }
    exec_ids(req, &st_commits_page, l->ids, l->npage, l->repo->repo_id, log_rows_cb, l);
}

static void log_graph_cb(void *ud, mh_graph_t *g, int err, const char *errmsg)
{
    log_t *l = ud;
    if (err) {
        if (err == MH_ENOENT) mh_res_error(l->req, 404, "not_found", "repository not found");
        else mh_res_fail(l->req, err, errmsg);
        return;
    }
    if (mh__graph_hold(&l->req->arena, g)) {
        mh_res_fail(l->req, MH_ENOMEM, "commits");
        return;
    }
    l->g = g;
    log_run(l);
}

static void log_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    log_t *l = req->user;
    mh_hub_t *hub = req->app;
    l->repo = repo;
    if (!l->branch) l->branch = repo->default_branch;
    l->g = mh__graph_cache_get(hub, repo->repo_id, repo->state_seq);
    if (l->g) {
        if (mh__graph_hold(&req->arena, l->g)) {
            mh_res_fail(req, MH_ENOMEM, "commits");
            return;
        }
        log_run(l);
        return;
    }
    if (mh__graph_load(hub, &req->arena, repo->repo_id, log_graph_cb, l)) mh_res_fail(req, MH_ENOMEM, "commits");
}

/* Parses a decimal limit in [1, 10^9]; false when malformed. */
static bool parse_limit(mh_str_t s, uint32_t *out)
{
    if (s.n == 0 || s.n > 9) return false;
    uint32_t v = 0;
    for (size_t i = 0; i < s.n; i++) {
        if (s.p[i] < '0' || s.p[i] > '9') return false;
        v = v * 10 + (uint32_t)(s.p[i] - '0');
    }
    if (v == 0) return false;
    *out = v;
    return true;
}

void mh_h_commits(mh_req_t *req)
{
    mh_arena_t *a = &req->arena;
    log_t *l = mh__req_alloc(req, sizeof *l);
    if (!l) return;
    l->req = req;
    l->limit = LOG_DEFAULT;
    mh_str_t branch = mh_req_query(req, "branch"), limit = mh_req_query(req, "limit"),
             cursor = mh_req_query(req, "cursor");
    if (branch.p && branch.n) {
        l->branch = mh_strndup(a, branch.p, branch.n);
        l->branch_given = true;
        if (!l->branch || memchr(branch.p, 0, branch.n)) {
            mh_res_error(req, 422, "invalid_branch", "bad branch name");
            return;
        }
    }
    if (limit.p) {
        if (!parse_limit(limit, &l->limit)) {
            mh_res_error(req, 422, "invalid_limit", "limit must be a positive integer (at most %d)", LOG_MAX);
            return;
        }
        if (l->limit > LOG_MAX) l->limit = LOG_MAX;
    }
    if (cursor.p && cursor.n) {
        if (!mh_id_valid(cursor.p, cursor.n)) {
            mh_res_error(req, 422, "invalid_cursor", "cursor must be a commit id from next_cursor");
            return;
        }
        l->cursor = mh_strndup(a, cursor.p, cursor.n);
    }
    req->user = l;
    mh_hub_load_repo(req, MH_PERM_READ, log_repo_cb);
}

/* ------------------------------------------------------ GET .../tree/{ref} */

typedef struct {
    mh_req_t *req;
    mh_repo_t *repo;
    char *ref;
    bool tried_branch;
    char *commit_id, *snapshot_id;
    mh_manifest_t m;
} tree_t;

static const mh_stmt_t st_tree_commit = {
    "hub_read_tree_commit",
    "SELECT c.commit_id, c.snapshot_id FROM commit_refs r JOIN commits c ON c.commit_id = r.commit_id"
    " WHERE r.repo_id = $1 AND r.commit_id = $2",
    2};

static const mh_stmt_t st_tree_branch = {
    "hub_read_tree_branch",
    "SELECT c.commit_id, c.snapshot_id FROM branches b JOIN commit_refs r ON r.repo_id = b.repo_id"
    " AND r.commit_id = b.head_commit_id JOIN commits c ON c.commit_id = b.head_commit_id"
    " WHERE b.repo_id = $1 AND b.name = $2",
    2};

static const mh_stmt_t st_sizes = {
    "hub_read_sizes", "SELECT object_id, size_bytes FROM objects WHERE object_id = ANY($1::text[])", 1};

static void free_manifest_cb(void *p) { mh_manifest_free(p); }

typedef struct {
    const char *id;
    int64_t size;
} sz_t;

static int cmp_sz(const void *x, const void *y) { return strcmp(((const sz_t *)x)->id, ((const sz_t *)y)->id); }

static void send_tree(tree_t *t, const sz_t *sz, size_t nsz)
{
    mh_req_t *req = t->req;
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *out = mh_vb_map(b), *entries = mh_vb_arr(b);
    /* The manifest is sorted bytewise by path: entries come out that way. */
    for (size_t i = 0; i < t->m.n && !b->err; i++) {
        const mh_mentry_t *e = &t->m.e[i];
        mh_val_t oid = mh_vb_strn(b, e->id, MH_ID_LEN), *x = mh_vb_map(b);
        sz_t key = {oid.v.s.p, 0};
        const sz_t *hit = nsz && oid.t == MH_V_STR ? bsearch(&key, sz, nsz, sizeof *sz, cmp_sz) : NULL;
        mh_vb_put(b, x, "path", mh_v_strn(e->path, e->plen));
        mh_vb_put(b, x, "object_id", oid);
        mh_vb_put(b, x, "size_bytes", hit ? mh_v_int(hit->size) : mh_v_nil());
        mh_vb_push(b, entries, mh_vb_node(b, x));
    }
    mh_vb_put(b, out, "commit_id", mh_v_str(t->commit_id));
    mh_vb_put(b, out, "snapshot_id", mh_v_str(t->snapshot_id));
    mh_vb_put(b, out, "entries", mh_vb_node(b, entries));
    mh_res_val(req, 200, out);
}

static void sizes_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    tree_t *t = ud;
    mh_req_t *req = t->req;
    mh_arena_t *a = &req->arena;
    if (!mh__db_ok(req, err, errmsg)) return;
    int rows = PQntuples(res);
    sz_t *sz = mh_alloc(a, (size_t)(rows + 1) * sizeof *sz);
    if (!sz) {
        mh_res_fail(req, MH_ENOMEM, "tree");
        return;
    }
    for (int r = 0; r < rows; r++) {
        sz[r].size = mh_pq_int(res, r, 1);
        if (!(sz[r].id = mh_strdup(a, mh_pq_str(res, r, 0)))) {
            mh_res_fail(req, MH_ENOMEM, "tree");
            return;
        }
    }
    qsort(sz, (size_t)rows, sizeof *sz, cmp_sz);
    send_tree(t, sz, (size_t)rows);
}

static void tree_manifest_cb(void *ud, int err, const char *why)
{
    tree_t *t = ud;
    mh_req_t *req = t->req;
    mh_arena_t *a = &req->arena;
    if (err) {
        mh_res_fail(req, mh__manifest_err(err), why ? why : "snapshot cannot be rebuilt");
        return;
    }
    if (t->m.n == 0) {
        send_tree(t, NULL, 0);
        return;
    }
    const char **ids = mh_alloc(a, t->m.n * sizeof *ids);
    if (!ids) {
        mh_res_fail(req, MH_ENOMEM, "tree");
        return;
    }
    for (size_t i = 0; i < t->m.n; i++) ids[i] = t->m.e[i].id;
    exec_ids(req, &st_sizes, ids, t->m.n, NULL, sizes_cb, t);
}

static void tree_ref_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    tree_t *t = ud;
    mh_req_t *req = t->req;
    mh_hub_t *hub = req->app;
    mh_arena_t *a = &req->arena;
    if (!mh__db_ok(req, err, errmsg)) return;
    if (PQntuples(res) != 1) {
        if (!t->tried_branch) {
            /* An id-shaped ref that is no commit here may still be a
             * branch name. */
            t->tried_branch = true;
            const char *vals[2] = {t->repo->repo_id, t->ref};
            mh_db_exec(hub->db, &st_tree_branch, vals, NULL, NULL, tree_ref_cb, t);
            return;
        }
        mh_res_error(req, 404, "not_found", "no such commit or branch in this repository");
        return;
    }
    t->commit_id = mh_strdup(a, mh_pq_str(res, 0, 0));
    t->snapshot_id = mh_strdup(a, mh_pq_str(res, 0, 1));
    if (!t->commit_id || !t->snapshot_id || mh_arena_defer(a, free_manifest_cb, &t->m)) {
        mh_res_fail(req, MH_ENOMEM, "tree");
        return;
    }
    mh_hub_load_manifest(hub, a, t->snapshot_id, &t->m, tree_manifest_cb, t);
}

static void tree_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    tree_t *t = req->user;
    mh_hub_t *hub = req->app;
    t->repo = repo;
    const char *vals[2] = {repo->repo_id, t->ref};
    bool is_id = mh_id_valid(t->ref, strlen(t->ref));
    t->tried_branch = !is_id;
    mh_db_exec(hub->db, is_id ? &st_tree_commit : &st_tree_branch, vals, NULL, NULL, tree_ref_cb, t);
}

void mh_h_tree(mh_req_t *req)
{
    mh_arena_t *a = &req->arena;
    mh_str_t ref = mh_req_param(req, "ref");
    if (!ref.p || ref.n == 0 || ref.n > 1024 || memchr(ref.p, 0, ref.n)) {
        mh_res_error(req, 422, "invalid_ref", "ref must be a commit id or a branch name");
        return;
    }
    tree_t *t = mh_calloc(a, sizeof *t);
    if (!t || !(t->ref = mh_strndup(a, ref.p, ref.n))) {
        mh_res_fail(req, MH_ENOMEM, "tree");
        return;
    }
    t->req = req;
    req->user = t;
    mh_hub_load_repo(req, MH_PERM_READ, tree_repo_cb);
}

/* ------------------------------------------------ GET .../objects/{id} */

typedef struct {
    mh_req_t *req;
    char *oid;
    char etag[MH_ID_SIZE + 2];
} obj_t;

static const mh_stmt_t st_object = {
    "hub_read_object",
    "SELECT i.mpack_id, i.byte_offset, i.byte_length FROM object_refs r"
    " LEFT JOIN LATERAL (SELECT m.mpack_id, m.byte_offset, m.byte_length FROM mpack_index m"
    " LEFT JOIN mpacks p ON p.mpack_id = m.mpack_id WHERE m.object_id = r.object_id"
    " ORDER BY p.superseded_at IS NOT NULL, m.mpack_id COLLATE \"C\" LIMIT 1) i ON true"
    " WHERE r.repo_id = $1 AND r.object_id = $2",
    2};

bool mh__etag_matches(mh_str_t inm, const char *etag)
{
    size_t el = strlen(etag);
    const char *p = inm.p, *end = inm.p + inm.n;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == ',')) p++;
        const char *q = p;
        while (q < end && *q != ',') q++;
        const char *e = q;
        while (e > p && (e[-1] == ' ' || e[-1] == '\t')) e--;
        const char *t = p;
        if (e - t >= 2 && t[0] == 'W' && t[1] == '/') t += 2; /* weak comparison (RFC 9110 13.1.2) */
        if ((e - p == 1 && *p == '*') || ((size_t)(e - t) == el && memcmp(t, etag, el) == 0)) return true;
        p = q;
    }
    return false;
}

static void object_headers(mh_req_t *req, const obj_t *o)
{
    mh_res_header(req, "ETag", o->etag);
    mh_res_header(req, "Cache-Control", "public, max-age=31536000, immutable");
    mh_res_header(req, "Accept-Ranges", "bytes");
}

typedef struct {
    obj_t *o;
    int status;
} objread_t;

static void object_read_cb(void *ud, int err, mh_buf_t *data)
{
    objread_t *r = ud;
    mh_req_t *req = r->o->req;
    if (err || !data) {
        mh_res_fail(req, err == MH_ENOENT ? MH_ESTORE : err, "reading the object's pack");
        return;
    }
    mh_res_send_buf(req, r->status, "application/octet-stream", data);
}

static void object_row_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    obj_t *o = ud;
    mh_req_t *req = o->req;
    mh_hub_t *hub = req->app;
    mh_arena_t *a = &req->arena;
    if (!mh__db_one(req, res, err, errmsg, "object not found in this repository")) return;
    if (mh_pq_isnull(res, 0, 0)) {
        mh_res_header(req, "Retry-After", "2");
        mh_res_error(req, 503, "not_indexed", "the object is not indexed yet; retry shortly");
        return;
    }
    const char *mpack = mh_pq_str(res, 0, 0);
    int64_t base = mh_pq_int(res, 0, 1), size = mh_pq_int(res, 0, 2);
    if (!mh_id_valid(mpack, strlen(mpack)) || base < 0 || size < 0) {
        mh_res_fail(req, MH_EDB, "malformed mpack_index row");
        return;
    }
    mh_str_t inm = mh_req_header(req, "if-none-match");
    if (inm.p && mh__etag_matches(inm, o->etag)) {
        object_headers(req, o);
        mh_res_send(req, 304, NULL, NULL, 0);
        return;
    }
    uint64_t off = 0, len = (uint64_t)size;
    int status = 200;
    mh_str_t range = mh_req_header(req, "range");
    if (range.p) {
        bool unsat = false;
        if (mh_parse_range(range, (uint64_t)size, &off, &len, &unsat)) {
            status = 206;
            char *cr = mh_sprintf(a, "bytes %llu-%llu/%llu", (unsigned long long)off,
                                  (unsigned long long)(off + len - 1), (unsigned long long)size);
            if (cr) mh_res_header(req, "Content-Range", cr);
        } else if (unsat) {
            char *cr = mh_sprintf(a, "bytes */%llu", (unsigned long long)size);
            if (cr) mh_res_header(req, "Content-Range", cr);
            mh_res_header(req, "Accept-Ranges", "bytes");
            mh_res_error(req, 416, "range_not_satisfiable", "range outside the object (%lld bytes)", (long long)size);
            return;
        }
    }
    object_headers(req, o);
    if (len == 0) {
        mh_res_send(req, status, "application/octet-stream", "", 0);
        return;
    }
    objread_t *r = mh_alloc(a, sizeof *r);
    char *key = mh_alloc(a, MH_MPACK_KEY_SIZE);
    if (key) mh_mpack_key(key, mpack);
    if (!r || !key) {
        mh_res_fail(req, MH_ENOMEM, "object");
        return;
    }
    r->o = o;
    r->status = status;
    mh_store_get(hub->store, key, (uint64_t)base + off, len, object_read_cb, r);
}

static void object_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    obj_t *o = req->user;
    mh_hub_t *hub = req->app;
    const char *vals[2] = {repo->repo_id, o->oid};
    mh_db_exec(hub->db, &st_object, vals, NULL, NULL, object_row_cb, o);
}

void mh_h_object(mh_req_t *req)
{
    mh_arena_t *a = &req->arena;
    mh_str_t id = mh_req_param(req, "object_id");
    if (!id.p || !mh_id_valid(id.p, id.n)) {
        mh_res_error(req, 422, "invalid_id", "object id must be sha256:<64 hex>");
        return;
    }
    obj_t *o = mh_calloc(a, sizeof *o);
    if (!o || !(o->oid = mh_strndup(a, id.p, id.n))) {
        mh_res_fail(req, MH_ENOMEM, "object");
        return;
    }
    o->req = req;
    snprintf(o->etag, sizeof o->etag, "\"%s\"", o->oid);
    req->user = o;
    mh_hub_load_repo(req, MH_PERM_READ, object_repo_cb);
}
