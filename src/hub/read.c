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

#define COMMIT_COLS                                                                                                    \
    "c.commit_id, c.parent_commit_id, c.parent2_commit_id, c.snapshot_id, c.message, c.author, c.committed_at,"        \
    " r.branch, c.generation, r.meta"

static const char *const std_keys[] = {
    "commit_id", "parent_commit_id", "parent2_commit_id", "parent_ids", "snapshot_id",
    "message",   "author",           "committed_at",      "branch",     "generation"};

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
                                        "message",   "author",           "committed_at",      "branch"};
    mh_val_t *m = mh_vb_map(b), *parents = mh_vb_arr(b);
    for (int c = 1; c <= 2; c++)
        if (!mh_pq_isnull(res, r, c)) mh_vb_push(b, parents, str_or_nil(b, res, r, c));
    for (int c = 0; c < 8; c++) mh_vb_put(b, m, keys[c], str_or_nil(b, res, r, c));
    mh_vb_put(b, m, "parent_ids", mh_vb_node(b, parents));
    mh_vb_put(b, m, "generation", mh_v_int(mh_pq_int(res, r, 8)));
    put_meta(b, m, res, r);
    return m;
}

/* The rows (COMMIT_COLS, any order) of this repository's commits among
 * the ids of $1 (a text[]); $2 the repository. One commit or a page. */
static const mh_stmt_t st_commits = {
    "hub_read_commits",
    "SELECT " COMMIT_COLS " FROM commits c JOIN commit_refs r ON r.commit_id = c.commit_id AND r.repo_id = $2"
    " WHERE c.commit_id = ANY($1::text[])",
    2};

/* --------------------------------------------------- GET .../commits/{id} */

static void commit_row_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mh_req_t *req = ud;
    if (!mh__db_one(req, res, err, errmsg, "commit not found in this repository")) return;
    mh_res_val(req, 200, commit_val(mh_res_build(req), res, 0));
}

static void commit_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    exec_ids(req, &st_commits, (const char *const[]){req->user}, 1, repo->repo_id, commit_row_cb, req);
}

/* The route capture `name` as an id, NUL-terminated in the request
 * arena; NULL after answering 422 invalid_id ("<what> id must be ...")
 * or 503. */
static char *param_id(mh_req_t *req, const char *name, const char *what)
{
    mh_str_t id = mh_req_param(req, name);
    if (!id.p || !mh_id_valid(id.p, id.n)) {
        mh_res_error(req, 422, "invalid_id", "%s id must be sha256:<64 hex>", what);
        return NULL;
    }
    char *s = mh_strndup(&req->arena, id.p, id.n);
    if (!s) mh_res_fail(req, MH_ENOMEM, what);
    return s;
}

void mh_h_commit(mh_req_t *req)
{
    if ((req->user = param_id(req, "commit_id", "commit"))) mh_hub_load_repo(req, MH_PERM_READ, commit_repo_cb);
}

/* ---------------------------------------------------- GET .../commits */

typedef struct {
    mh_req_t *req;
    mh_repo_t *repo;
    const char *branch;
    bool branch_given;
    bool tag_read;        /* no branch of that name: the tag was looked up */
    const char *tag_head; /* its commit (NULL: no tag either) */
    uint32_t limit;
    const char *cursor;
    mh_graph_t *g;
    bool reloaded;
    uint32_t *page;
    uint32_t npage;
    bool more;
    const char **ids;
} log_t;

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
static void log_run(log_t *l);

static const mh_stmt_t st_tag = {"hub_read_tag", "SELECT commit_id FROM tags WHERE repo_id = $1 AND name = $2", 2};

static void log_tag_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    log_t *l = ud;
    if (!mh__db_ok(l->req, err, errmsg)) return;
    l->tag_read = true;
    if (PQntuples(res) == 1 && !(l->tag_head = mh_strdup(&l->req->arena, mh_pq_str(res, 0, 0)))) {
        mh_res_fail(l->req, MH_ENOMEM, "commits");
        return;
    }
    log_run(l);
}

static void log_run(log_t *l)
{
    mh_req_t *req = l->req;
    mh_hub_t *hub = req->app;
    mh_arena_t *a = &req->arena;
    mh_graph_t *g = l->g;
    /* The branch, else the tag of that name (SPEC 4.5). */
    const mh_gbranch_t *b = mh__graph_branch(g, l->branch, strlen(l->branch));
    uint32_t head = b ? b->node : MH_GNONE;
    if (!b && !l->branch_given) {
        send_empty_log(req); /* a repository without commits yet */
        return;
    }
    if (!b && !l->tag_read) {
        mh_db_exec(hub->db, &st_tag, (const char *[]){l->repo->repo_id, l->branch}, NULL, NULL, log_tag_cb, l);
        return;
    }
    if (!b && !l->tag_head) {
        mh_res_error(req, 404, "not_found", "no such branch or tag");
        return;
    }
    if (!b) head = mh__graph_find(g, l->tag_head);
    uint32_t cursor = MH_GNONE;
    if (l->cursor) {
        cursor = mh__graph_find(g, l->cursor);
        if (cursor == MH_GNONE) {
            mh_res_error(req, 422, "invalid_cursor", "cursor is not a commit of this branch");
            return;
        }
    }
    if (head == MH_GNONE) {
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
    int rc = mh__graph_log(g, head, cursor, l->limit, l->page, &l->npage, &l->more);
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
    exec_ids(req, &st_commits, l->ids, l->npage, l->repo->repo_id, log_rows_cb, l);
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

/* The tree is streamed (SPEC 4.5: a snapshot of any size, a million
 * entries, within the process's memory bounds). Only the manifest itself
 * is held whole: it is rebuilt (manifests.c) into a work arena of its own,
 * sized by the snapshot and bounded by TREE_WORK_MAX, not into the 64 MiB
 * request arena (which made a 100k-entry tree a 503 and a 1M-entry one a
 * 500). The answer is written TREE_BATCH entries at a time: each batch's
 * sizes come from one query, its encoding goes to the streamed response,
 * and the next batch starts when the client has taken enough of it
 * (mh_res_stream_*), so neither the answer nor the sizes are ever held
 * whole. Errors before the first batch are ordinary error answers; one
 * after the head is out cuts the chunked body (the client sees it
 * incomplete). */
#define TREE_BATCH 2048
#define TREE_WORK_MAX ((size_t)1 << 30)
/* Rebuilding a manifest costs about this much per entry at its peak
 * (measured: ~410 MB for a million entries of ~28-byte paths, libpq's
 * result and the decoded delta included). Trees of more than TREE_SMALL
 * entries reserve entries * TREE_BYTES_PER_ENTRY from a per-process
 * budget of TREE_MEMORY bytes before they load, waiting at most
 * TREE_WAIT_MS in FIFO order (then 503 + Retry-After): concurrent large
 * trees cannot add up to more than the budget (one that alone exceeds it
 * runs when nothing else holds any). */
#define TREE_BYTES_PER_ENTRY 400u
#define TREE_SMALL 20000
#define TREE_MEMORY ((size_t)512 << 20)
#define TREE_WAIT_MS 10000

typedef struct {
    const char *id;
    int64_t size;
} sz_t;

typedef struct tree_t {
    mh_req_t *req;
    mh_repo_t *repo;
    char *ref;
    bool tried_branch;
    char *commit_id, *snapshot_id;
    mh_manifest_t m;
    mh_arena_t work;  /* the manifest's bytes */
    mh_arena_t batch; /* one batch: ids, sizes; released per batch */
    mh_buf_t out;     /* one batch's encoding */
    mh_format_t fmt;
    size_t next;   /* first entry of the next batch */
    size_t lo, hi; /* the batch being sized or written */
    bool streaming, querying, ended;
    size_t want, reserved;  /* bytes of the tree budget asked for / held */
    struct tree_wait *wait; /* while queued for the budget */
    struct tree_t *wnext;
} tree_t;

static const mh_stmt_t st_tree_commit = {
    "hub_read_tree_commit2",
    "SELECT c.commit_id, c.snapshot_id, s.entry_count FROM commit_refs r JOIN commits c ON c.commit_id = r.commit_id"
    " LEFT JOIN snapshots s ON s.snapshot_id = c.snapshot_id WHERE r.repo_id = $1 AND r.commit_id = $2",
    2};

/* A name: the branch, else the tag of that name (SPEC 4.5). */
static const mh_stmt_t st_tree_branch = {
    "hub_read_tree_ref",
    "SELECT c.commit_id, c.snapshot_id, s.entry_count FROM (SELECT head_commit_id AS id, 0 AS k FROM branches"
    " WHERE repo_id = $1 AND name = $2 UNION ALL SELECT commit_id, 1 FROM tags WHERE repo_id = $1 AND name = $2"
    " ORDER BY k LIMIT 1) x JOIN commit_refs r ON r.repo_id = $1 AND r.commit_id = x.id"
    " JOIN commits c ON c.commit_id = x.id LEFT JOIN snapshots s ON s.snapshot_id = c.snapshot_id",
    2};

static const mh_stmt_t st_sizes = {"hub_read_sizes",
                                   "SELECT object_id, size_bytes FROM objects WHERE object_id = ANY($1::text[])", 1};

/* ------------------------------------- the per-process budget for trees */

typedef struct tree_wait {
    uv_timer_t timer; /* the wait's deadline, or 0 ms once granted */
    tree_t *t;        /* NULL once detached (granted or timed out) */
    bool granted;
} tree_wait_t;

static struct {
    size_t used;
    tree_t *head, *tail; /* FIFO of waiters */
} tree_budget;

static void tree_load(tree_t *t);

static void tree_wait_closed(uv_handle_t *h) { free(h->data); }

static void tree_wait_fire(uv_timer_t *tm)
{
    tree_wait_t *w = tm->data;
    tree_t *t = w->t;
    bool granted = w->granted;
    uv_close((uv_handle_t *)tm, tree_wait_closed);
    if (!t) return;
    t->wait = NULL;
    if (granted) {
        tree_load(t);
        return;
    }
    /* Timed out: leave the queue. */
    tree_t **pp = &tree_budget.head, *prev = NULL;
    while (*pp && *pp != t) prev = *pp, pp = &(*pp)->wnext;
    if (*pp) {
        *pp = t->wnext;
        if (tree_budget.tail == t) tree_budget.tail = prev;
    }
    mh_info("req %s: tree of ~%zu MiB waited %d ms for memory", t->req->id, t->want >> 20, TREE_WAIT_MS);
    mh_res_header(t->req, "Retry-After", "5");
    mh_res_error(t->req, 503, "busy", "the server is listing other large trees; retry shortly");
}

/* Grants queued waiters (in order) while the budget allows; each starts
 * from its own timer on the next loop turn, never from under the caller. */
static void tree_budget_wake(void)
{
    while (tree_budget.head) {
        tree_t *t = tree_budget.head;
        if (tree_budget.used && tree_budget.used + t->want > TREE_MEMORY) break;
        tree_budget.head = t->wnext;
        if (!tree_budget.head) tree_budget.tail = NULL;
        t->wnext = NULL;
        t->reserved = t->want;
        tree_budget.used += t->want;
        t->wait->granted = true;
        uv_timer_start(&t->wait->timer, tree_wait_fire, 0, 0);
    }
}

/* Reserves t->want bytes, then loads (now or once granted). */
static void tree_budget_take(tree_t *t)
{
    mh_hub_t *hub = t->req->app;
    if (!tree_budget.head && (tree_budget.used == 0 || tree_budget.used + t->want <= TREE_MEMORY)) {
        t->reserved = t->want;
        tree_budget.used += t->want;
        tree_load(t);
        return;
    }
    tree_wait_t *w = calloc(1, sizeof *w);
    if (!w) {
        mh_res_fail(t->req, MH_ENOMEM, "tree");
        return;
    }
    w->t = t;
    w->timer.data = w;
    uv_timer_init(hub->loop, &w->timer);
    uv_timer_start(&w->timer, tree_wait_fire, TREE_WAIT_MS, 0);
    t->wait = w;
    if (tree_budget.tail) tree_budget.tail->wnext = t;
    else tree_budget.head = t;
    tree_budget.tail = t;
}

static void tree_cleanup(void *p)
{
    tree_t *t = p;
    if (t->reserved) {
        tree_budget.used -= t->reserved;
        t->reserved = 0;
        tree_budget_wake();
    }
    mh_manifest_free(&t->m);
    mh_arena_release(&t->work);
    mh_arena_release(&t->batch);
    mh_buf_free(&t->out);
}

static int cmp_sz(const void *x, const void *y) { return strcmp(((const sz_t *)x)->id, ((const sz_t *)y)->id); }

static void tree_batch(tree_t *t);

/* Ends the streamed answer once (err != 0 cuts it). */
static void tree_end(tree_t *t, int err)
{
    if (t->ended) return;
    t->ended = true;
    mh_res_stream_end(t->req, err);
}

static void tree_drain(mh_req_t *req, void *arg)
{
    (void)req;
    tree_batch(arg);
}

static void tree_abort(mh_req_t *req, void *arg)
{
    (void)req;
    tree_t *t = arg;
    if (!t->querying) tree_end(t, 0); /* else when the sizes query returns */
}

/* The document around the entries: {"commit_id", "snapshot_id",
 * "entries": [ ... ]}, the entries' count known up front in msgpack. */
static int tree_prefix(tree_t *t)
{
    if (t->fmt == MH_FMT_MSGPACK) {
        mh_mpw_t w;
        mh_mpw_init(&w, &t->out);
        mh_mpw_map(&w, 3);
        mh_mpw_cstr(&w, "commit_id");
        mh_mpw_cstr(&w, t->commit_id);
        mh_mpw_cstr(&w, "snapshot_id");
        mh_mpw_cstr(&w, t->snapshot_id);
        mh_mpw_cstr(&w, "entries");
        mh_mpw_arr(&w, (uint32_t)t->m.n);
        return w.err;
    }
    int rc = mh_buf_append_str(&t->out, "{\"commit_id\":");
    if (!rc)
        rc = mh_encode(&(mh_val_t){.t = MH_V_STR, .v.s = {t->commit_id, (uint32_t)strlen(t->commit_id)}}, MH_FMT_JSON,
                       &t->out);
    if (!rc) rc = mh_buf_append_str(&t->out, ",\"snapshot_id\":");
    if (!rc)
        rc = mh_encode(&(mh_val_t){.t = MH_V_STR, .v.s = {t->snapshot_id, (uint32_t)strlen(t->snapshot_id)}},
                       MH_FMT_JSON, &t->out);
    if (!rc) rc = mh_buf_append_str(&t->out, ",\"entries\":[");
    return rc;
}

/* Encodes entries [lo, hi) with the sizes found (sorted by id). */
static int tree_encode(tree_t *t, const sz_t *sz, size_t nsz)
{
    int rc = 0;
    for (size_t i = t->lo; i < t->hi && !rc; i++) {
        const mh_mentry_t *e = &t->m.e[i];
        char oid[MH_ID_SIZE];
        memcpy(oid, e->id, MH_ID_LEN);
        oid[MH_ID_LEN] = 0;
        sz_t key = {oid, 0};
        const sz_t *hit = nsz ? bsearch(&key, sz, nsz, sizeof *sz, cmp_sz) : NULL;
        mh_kv_t kv[3] = {
            {mh_v_str("path"), mh_v_strn(e->path, e->plen)},
            {mh_v_str("object_id"), mh_v_strn(oid, MH_ID_LEN)},
            {mh_v_str("size_bytes"), hit ? mh_v_int(hit->size) : mh_v_nil()},
        };
        mh_val_t entry = {.t = MH_V_MAP, .v.m = {kv, 3}};
        if (t->fmt == MH_FMT_JSON && i > 0) rc = mh_buf_append_byte(&t->out, ',');
        if (!rc) rc = mh_encode(&entry, t->fmt, &t->out);
    }
    if (!rc && t->hi == t->m.n && t->fmt == MH_FMT_JSON) rc = mh_buf_append_str(&t->out, "]}");
    return rc;
}

/* A batch's sizes are in: start the answer (first batch), write the
 * batch, go on while the client keeps up. */
static void tree_write(tree_t *t, const sz_t *sz, size_t nsz)
{
    mh_req_t *req = t->req;
    if (!t->streaming) {
        t->streaming = true;
        int rc = mh_res_stream_begin(req, 200, t->fmt == MH_FMT_MSGPACK ? "application/x-msgpack" : "application/json",
                                     MH_LEN_UNKNOWN, tree_drain, tree_abort, t);
        if (rc) {
            t->ended = true; /* never begun: nothing to end */
            mh_res_fail(req, rc, "tree");
            return;
        }
        if (!mh_res_stream_wants_body(req)) { /* HEAD */
            tree_end(t, 0);
            return;
        }
        if (tree_prefix(t)) {
            tree_end(t, MH_ENOMEM);
            return;
        }
    }
    if (tree_encode(t, sz, nsz)) {
        mh_error("req %s: cannot encode tree entries %zu..%zu", req->id, t->lo, t->hi);
        tree_end(t, MH_ENOMEM);
        return;
    }
    t->next = t->hi;
    bool more = mh_res_stream_write(req, t->out.p, t->out.len);
    t->out.len = 0;
    if (t->next >= t->m.n) tree_end(t, 0);
    else if (more) tree_batch(t);
    /* else tree_drain asks for the next batch */
}

static void sizes_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    tree_t *t = ud;
    mh_req_t *req = t->req;
    mh_arena_t *a = &t->batch;
    t->querying = false;
    if (mh_req_gone(req)) {
        if (t->streaming) tree_end(t, 0);
        else mh_res_error(req, 499, "gone", "client left"); /* dropped */
        return;
    }
    if (err) {
        if (t->streaming) {
            mh_error("req %s: tree sizes: %s (%s)", req->id, mh_strerror(err), errmsg ? errmsg : "");
            tree_end(t, err);
        } else {
            mh_res_fail(req, err, errmsg);
        }
        return;
    }
    int rows = PQntuples(res);
    sz_t *sz = mh_alloc(a, (size_t)(rows + 1) * sizeof *sz);
    for (int r = 0; sz && r < rows; r++) {
        sz[r].size = mh_pq_int(res, r, 1);
        if (!(sz[r].id = mh_strdup(a, mh_pq_str(res, r, 0)))) sz = NULL;
    }
    if (!sz) {
        if (t->streaming) tree_end(t, MH_ENOMEM);
        else mh_res_fail(req, MH_ENOMEM, "tree");
        return;
    }
    qsort(sz, (size_t)rows, sizeof *sz, cmp_sz);
    tree_write(t, sz, (size_t)rows);
}

/* Sizes the next TREE_BATCH entries (one query), then writes them. */
static void tree_batch(tree_t *t)
{
    mh_req_t *req = t->req;
    mh_hub_t *hub = req->app;
    if (t->ended || t->querying) return;
    mh_arena_release(&t->batch);
    t->lo = t->next;
    t->hi = t->lo + TREE_BATCH < t->m.n ? t->lo + TREE_BATCH : t->m.n;
    if (t->lo == t->hi) {
        tree_write(t, NULL, 0); /* an empty tree */
        return;
    }
    mh_arena_t *a = &t->batch;
    const char **ids = mh_alloc(a, (t->hi - t->lo) * sizeof *ids), **vals = mh_alloc(a, sizeof *vals);
    for (size_t i = t->lo; ids && i < t->hi; i++)
        if (!(ids[i - t->lo] = mh_strndup(a, t->m.e[i].id, MH_ID_LEN))) ids = NULL;
    if (ids && vals) vals[0] = mh_pq_array(a, ids, t->hi - t->lo, MH_ID_LEN);
    if (!ids || !vals || !vals[0]) {
        if (t->streaming) tree_end(t, MH_ENOMEM);
        else mh_res_fail(req, MH_ENOMEM, "tree");
        return;
    }
    t->querying = true;
    mh_db_exec(hub->db, &st_sizes, vals, NULL, NULL, sizes_cb, t);
}

static void tree_manifest_cb(void *ud, int err, const char *why)
{
    tree_t *t = ud;
    mh_req_t *req = t->req;
    if (err) {
        /* A memory failure stays one (503, retry later); a snapshot that
         * does not rebuild is the server's data problem (500), never the
         * other way round. */
        mh_res_fail(req, mh__manifest_err(err), why ? why : "snapshot cannot be rebuilt");
        return;
    }
    t->fmt = mh_req_format(req);
    tree_batch(t);
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
             * branch or tag name. */
            t->tried_branch = true;
            const char *vals[2] = {t->repo->repo_id, t->ref};
            mh_db_exec(hub->db, &st_tree_branch, vals, NULL, NULL, tree_ref_cb, t);
            return;
        }
        mh_res_error(req, 404, "not_found", "no such commit, branch or tag in this repository");
        return;
    }
    t->commit_id = mh_strdup(a, mh_pq_str(res, 0, 0));
    t->snapshot_id = mh_strdup(a, mh_pq_str(res, 0, 1));
    if (!t->commit_id || !t->snapshot_id) {
        mh_res_fail(req, MH_ENOMEM, "tree");
        return;
    }
    int64_t entries = mh_pq_int(res, 0, 2);
    if (entries > TREE_SMALL) {
        t->want = (size_t)entries * TREE_BYTES_PER_ENTRY;
        tree_budget_take(t);
        return;
    }
    tree_load(t);
}

static void tree_load(tree_t *t)
{
    mh_req_t *req = t->req;
    if (mh_req_gone(req)) {
        mh_res_error(req, 499, "gone", "client left"); /* dropped; frees the reservation */
        return;
    }
    mh_hub_load_manifest(req->app, &t->work, t->snapshot_id, &t->m, tree_manifest_cb, t);
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
        mh_res_error(req, 422, "invalid_ref", "ref must be a commit id, a branch or a tag name");
        return;
    }
    tree_t *t = mh_calloc(a, sizeof *t);
    if (!t || !(t->ref = mh_strndup(a, ref.p, ref.n))) {
        mh_res_fail(req, MH_ENOMEM, "tree");
        return;
    }
    mh_arena_init(&t->work, TREE_WORK_MAX);
    mh_arena_init(&t->batch, 0);
    if (mh_arena_defer(a, tree_cleanup, t)) {
        mh_res_fail(req, MH_ENOMEM, "tree");
        return;
    }
    t->req = req;
    req->user = t;
    mh_hub_load_repo(req, MH_PERM_READ, tree_repo_cb);
}

/* ------------------------------------------------ GET .../objects/{id} */

/* Reads of at most SMALL_READ file bytes (whose decompressed output is at
 * most SMALL_OUT) are one store get and one buffer; larger ones stream:
 * windows of OBJ_WINDOW bytes, decompressed (v2) OBJ_STEP bytes at a time
 * into the streamed response, the memory reserved from the pack-memory
 * budget (SPEC 4.8). */
#define SMALL_READ ((uint64_t)1 << 20)
#define SMALL_OUT ((uint64_t)8 << 20)
#define OBJ_WINDOW ((size_t)256 << 10)
#define OBJ_STEP ((uint64_t)256 << 10)

typedef struct {
    mh_req_t *req;
    char *oid;
    char etag[MH_ID_SIZE + 2];
} obj_t;

/* Where the requested bytes are: v1 (codec MH_PACK_RAW): file bytes
 * [foff, foff + flen); v2: the frame's data [foff, foff + flen), size
 * fsize decompressed, and the bytes [boff, boff + blen) of it. */
typedef struct {
    obj_t *o;
    int status;
    char key[MH_MPACK_KEY_SIZE];
    int codec;
    uint64_t foff, flen, fsize, boff, blen;
    /* streaming */
    mh_store_reader_t *rd;
    mh_store_window_t win;
    bool have_win;
    size_t wat;
    mh_framer_t *fr;
    mh_budget_res_t res;
    bool writable, ended;
} objread_t;

static const mh_stmt_t st_object = {
    "hub_read_object",
    "SELECT i.mpack_id, i.byte_offset, i.byte_length, i.frame_no, f.data_offset, f.data_length, f.codec, f.size"
    " FROM object_refs r"
    " LEFT JOIN LATERAL (SELECT m.mpack_id, m.byte_offset, m.byte_length, m.frame_no FROM mpack_index m"
    " LEFT JOIN mpacks p ON p.mpack_id = m.mpack_id WHERE m.object_id = r.object_id"
    " ORDER BY p.superseded_at IS NOT NULL, m.mpack_id COLLATE \"C\" LIMIT 1) i ON true"
    " LEFT JOIN mpack_frames f ON f.mpack_id = i.mpack_id AND f.frame_no = i.frame_no"
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

/* --- one get: small reads */

static void object_read_cb(void *ud, int err, mh_buf_t *data)
{
    objread_t *r = ud;
    mh_req_t *req = r->o->req;
    if (err || !data) {
        mh_res_fail(req, err == MH_ENOENT ? MH_ESTORE : err, "reading the object's pack");
        return;
    }
    if (r->codec == MH_PACK_RAW) {
        mh_res_send_buf(req, r->status, "application/octet-stream", data);
        return;
    }
    mh_buf_t out = {0};
    int rc = mh_frame_extract(r->codec, data->p, data->len, r->fsize, r->boff, r->blen, &out);
    mh_buf_free(data);
    if (rc) {
        mh_res_fail(req, rc == MH_ENOMEM ? rc : MH_EDB, "the object's frame does not decompress as indexed");
        return;
    }
    mh_res_send_buf(req, r->status, "application/octet-stream", &out);
}

/* --- streamed reads */

static void ostream_end(objread_t *r, int err)
{
    if (r->ended) return;
    r->ended = true;
    mh_store_reader_close(r->rd);
    r->rd = NULL;
    mh_framer_free(r->fr);
    r->fr = NULL;
    mh_budget_release(&r->res);
    if (err) mh_warn("req %s: object %s: streaming: %s", r->o->req->id, r->o->oid, mh_strerror(err));
    mh_res_stream_end(r->o->req, err);
}

static int ostream_out_cb(void *ud, const uint8_t *p, size_t n)
{
    objread_t *r = ud;
    if (!mh_res_stream_write(r->o->req, p, n)) r->writable = false;
    return 0;
}

/* Moves window bytes into the response until the client's queue is full,
 * the window is used up (then the next one is asked for) or the range is
 * out. */
static void ostream_pump(objread_t *r)
{
    r->writable = true;
    while (r->have_win && r->writable && !r->ended) {
        const uint8_t *p = r->win.p + r->wat;
        size_t n = r->win.n - r->wat;
        if (r->codec == MH_PACK_RAW) {
            size_t take = n < OBJ_STEP ? n : (size_t)OBJ_STEP;
            ostream_out_cb(r, p, take);
            r->wat += take;
        } else if (n) {
            size_t used = 0;
            int rc = mh_framer_feed_some(r->fr, p, n, OBJ_STEP, ostream_out_cb, r, &used);
            if (rc) {
                ostream_end(r, rc == MH_ENOMEM ? rc : MH_EDB);
                return;
            }
            r->wat += used;
            if (mh_framer_done(r->fr)) {
                ostream_end(r, 0);
                return;
            }
        }
        if (r->wat < r->win.n) continue;
        r->have_win = false;
        if (!r->win.last) {
            mh_store_reader_next(r->rd);
            return;
        }
        int rc = r->codec == MH_PACK_RAW ? 0 : mh_framer_finish(r->fr);
        /* The request, and r in its arena, may be gone once ended. */
        ostream_end(r, rc == MH_ENOMEM ? rc : rc ? MH_EDB : 0);
        return;
    }
}

static void ostream_window_cb(void *ud, int err, const mh_store_window_t *w)
{
    objread_t *r = ud;
    if (err) {
        ostream_end(r, err == MH_ENOENT ? MH_ESTORE : err);
        return;
    }
    r->win = *w;
    r->have_win = true;
    r->wat = 0;
    if (mh_res_stream_wants_body(r->o->req)) ostream_pump(r);
    else ostream_end(r, 0); /* HEAD */
}

static void ostream_drain_cb(mh_req_t *req, void *arg)
{
    (void)req;
    ostream_pump(arg);
}

static void ostream_abort_cb(mh_req_t *req, void *arg)
{
    (void)req;
    ostream_end(arg, MH_ECANCELED);
}

static void ostream_start_cb(void *ud, int err)
{
    objread_t *r = ud;
    mh_req_t *req = r->o->req;
    int rc = err;
    if (!rc && r->codec != MH_PACK_RAW) rc = mh_framer_new(r->codec, r->fsize, r->boff, r->blen, 0, &r->fr);
    if (rc) {
        mh_budget_release(&r->res);
        mh_res_fail(req, rc == MH_EINVAL ? MH_EDB : rc, "reading the object");
        return;
    }
    rc = mh_res_stream_begin(req, r->status, "application/octet-stream", r->blen, ostream_drain_cb, ostream_abort_cb, r);
    if (rc) {
        mh_framer_free(r->fr);
        r->fr = NULL;
        mh_budget_release(&r->res);
        mh_res_fail(req, rc, "reading the object");
        return;
    }
    rc = mh_store_reader_open(((mh_hub_t *)req->app)->store, r->key, r->foff, r->flen,
                              OBJ_WINDOW, ostream_window_cb, r, &r->rd);
    if (rc) ostream_end(r, rc);
}

/* A large object (or range): the reader's windows and the framer, within
 * the budget. */
static void object_stream(objread_t *r)
{
    mh_hub_t *hub = r->o->req->app;
    uint64_t window = r->codec == MH_PACK_RAW ? 0 : (r->fsize < ((uint64_t)1 << 24) ? r->fsize : (uint64_t)1 << 24);
    uint64_t mem = mh_store_reader_mem(OBJ_WINDOW) + window + ((uint64_t)256 << 10);
    if (!hub->budget) {
        ostream_start_cb(r, 0);
        return;
    }
    mh_budget_acquire(&r->res, hub->budget, mem, ostream_start_cb, r);
}

/* The row's location and the requested range [off, off + len) of the
 * object into r; false after answering a malformed row. */
static bool object_where(mh_req_t *req, PGresult *res, objread_t *r, uint64_t off, uint64_t len)
{
    const char *mpack = mh_pq_str(res, 0, 0);
    int64_t base = mh_pq_int(res, 0, 1);
    mh_mpack_key(r->key, mpack);
    r->blen = len;
    if (mh_pq_isnull(res, 0, 3)) {
        r->codec = MH_PACK_RAW;
        r->foff = (uint64_t)base + off;
        r->flen = len;
        return true;
    }
    int64_t foff = mh_pq_int(res, 0, 4), flen = mh_pq_int(res, 0, 5), fsize = mh_pq_int(res, 0, 7);
    if (mh_pq_isnull(res, 0, 4) || foff < 0 || flen < 0 || fsize < 0) {
        mh_res_fail(req, MH_EDB, "an index row names a frame without a row");
        return false;
    }
    r->codec = strcmp(mh_pq_str(res, 0, 6), "zstd") == 0 ? MH_PACK_ZSTD : MH_PACK_NONE;
    r->foff = (uint64_t)foff;
    r->flen = (uint64_t)flen;
    r->fsize = (uint64_t)fsize;
    r->boff = (uint64_t)base + off;
    return true;
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
    objread_t *r = mh_calloc(a, sizeof *r);
    if (!r) {
        mh_res_fail(req, MH_ENOMEM, "object");
        return;
    }
    r->o = o;
    r->status = status;
    if (!object_where(req, res, r, off, len)) return;
    /* v2: one ranged read of the frame, one bounded decompression. */
    if (r->flen <= SMALL_READ && (r->codec == MH_PACK_RAW || (r->fsize <= SMALL_OUT && r->blen <= SMALL_OUT)))
        mh_store_get(hub->store, r->key, r->foff, r->flen, object_read_cb, r);
    else object_stream(r);
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
    char *oid = param_id(req, "object_id", "object");
    obj_t *o = oid ? mh__req_alloc(req, sizeof *o) : NULL;
    if (!o) return;
    o->req = req;
    o->oid = oid;
    snprintf(o->etag, sizeof o->etag, "\"%s\"", o->oid);
    req->user = o;
    mh_hub_load_repo(req, MH_PERM_READ, object_repo_cb);
}
