/*
 * commits_api.c — POST /api/repos/{repo_id}/commits (SPEC 4.6): a commit
 * made by the server from file contents sent in the request.
 *
 * The commit and its snapshot live in PostgreSQL only (refwrite builds
 * them: delta against the parent's snapshot, checkpoints, ids,
 * generation). The blobs this repository does not reference yet go into
 * ONE new v2 mpack (SPEC 2.1: blobs only, in path order, in zstd frames
 * at MUSEHUB_ZSTD_LEVEL), built in memory by the pack builder
 * (mh/packbuild.h; the same new contents at the same paths always make
 * the same pack), stored under mpacks/<hex> and indexed with the frames
 * and byte ranges known from writing it. That pack is the only store
 * write; none when every blob is known.
 *
 * An operation of the step kit:
 *
 *   PARSE    thread pool: decode and validate the body (large JSON bodies
 *            take a while; after the permission check)
 *   HEADS    the branch head, else the default branch's head, with its
 *            snapshot, generation and depth; expected_head
 *   MANIFEST the parent's manifest
 *   BUILD    thread pool: decode and hash the files, the new manifest,
 *            the commit (mh_rw_commit_build)
 *   KNOWN    which blobs this repository already references
 *   PACK     the builder (thread pool): the pack of the new blobs, its
 *            id, its index and frames rows
 *   the transaction: ACQUIRE, BEGIN (the repository row, the pack's
 *            lock), CHECK (the branch row; the move judged: it must still
 *            be at the parent the commit was built on), PUT (the pack,
 *            inside the locks: a loser never writes to the store), COPY
 *            (index rows), COPY_FRAMES,
 *            WRITE (rows, refs, index, the move, state_seq), COMMIT
 *
 * Invariants: nothing is written anywhere before every check passed and
 * the branch is locked, so a request that loses the compare-and-swap
 * (stale expected_head, a concurrent commit or push) writes nothing, not
 * even to the store; all rows go in one transaction.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hub_internal.h"

/* Decoded bodies and file contents live in a per-request work arena: the
 * request arena's cap (64 MiB) is sized for ordinary API bodies, and a
 * 64 MiB JSON body holds its strings twice (JSON text, base64 decoded). */
#define WORK_ARENA_LIMIT ((size_t)320 << 20)
#define MAX_MESSAGE 65536
#define MAX_AUTHOR 255

typedef struct {
    const char *id; /* MH_ID_LEN bytes */
    const uint8_t *content;
    uint64_t len;
    mh_str_t path; /* a path it is written at (the first, in path order) */
    bool known;    /* already referenced by this repository */
} cblob_t;

typedef struct {
    mh__op_t op;
    /* request */
    bool msgpack;           /* the body's Content-Type */
    const mh_val_t *files;  /* MAP path -> bin | base64 str */
    const mh_val_t *remove; /* ARR of str, or NULL */
    char branch[256];
    char *message, *author;
    mh_id_t expected;
    bool has_expected;
    /* the parent */
    bool branch_exists, has_parent;
    mh_id_t parent, parent_snap;
    mh_manifest_t base, m;
    /* the commit, its blobs and pack */
    mh_rw_commit_t c;
    cblob_t *blobs; /* distinct, sorted by id */
    size_t nblobs;
    size_t npack;   /* blobs not known: the pack's */
    mh_pb_t *pb;
    mh_buf_t pack, rows, frows;
    mh_id_t pack_id;
    char pack_key[MH_MPACK_KEY_SIZE], pack_size[24];
    /* the transaction */
    mh_move_t mv;
} commit_t;

#define C(s) MH_STEP_OP(s, commit_t, op.step)

enum {
    C_PARSE,
    C_HEADS,
    C_MANIFEST,
    C_BUILD,
    C_KNOWN,
    C_PACK,
    C_ACQUIRE,
    C_BEGIN,
    C_CHECK,
    C_PUT,
    C_COPY,
    C_COPY_FRAMES,
    C_WRITE,
    C_COMMIT,
    C_DONE
};

/* The thread pool's refusals: 422 with a code and a reason. */
static void bad(mh_step_t *s, const char *code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void bad(mh_step_t *s, const char *code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char detail[512];
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    /* Recorded now, answered by finish: thread-safe (only this op's state). */
    mh_step_refuse(s, 422, code, "%s", detail);
}

/* ============================================================ PARSE */

/* True when the Content-Type names msgpack (mh_req_body_val's rule:
 * anything else is read as JSON). */
static bool body_is_msgpack(const mh_req_t *req)
{
    mh_str_t ct = mh_req_header(req, "content-type");
    if (!ct.p) return false;
    size_t n = ct.n;
    const char *semi = memchr(ct.p, ';', n);
    if (semi) n = (size_t)(semi - ct.p);
    while (n && (ct.p[n - 1] == ' ' || ct.p[n - 1] == '\t')) n--;
    static const char *const types[] = {"application/x-msgpack", "application/msgpack"};
    for (int i = 0; i < 2; i++)
        if (n == strlen(types[i]) && strncasecmp(ct.p, types[i], n) == 0) return true;
    return false;
}

/* files: a map of valid paths to bin or base64 str; remove: paths. */
static void parse_paths(mh_step_t *s, const mh_val_t *body)
{
    commit_t *c = C(s);
    c->files = mh_val_get(body, "files");
    if (!c->files || c->files->t != MH_V_MAP) {
        bad(s, "invalid_field", "'files' must be a map of path -> contents");
        return;
    }
    for (uint32_t i = 0; i < c->files->v.m.n; i++) {
        const mh_kv_t *f = &c->files->v.m.kv[i];
        if (f->k.t != MH_V_STR || !mh_path_valid(f->k.v.s.p, f->k.v.s.n)) {
            bad(s, "invalid_path", "files: '%.*s' is not a valid path",
                f->k.t == MH_V_STR ? (int)(f->k.v.s.n > 200 ? 200 : f->k.v.s.n) : 0,
                f->k.t == MH_V_STR ? f->k.v.s.p : "");
            return;
        }
        if (f->v.t != MH_V_BIN && f->v.t != MH_V_STR) {
            bad(s, "invalid_field", "files['%.*s']: contents must be bytes (msgpack bin) or a base64 string",
                (int)f->k.v.s.n, f->k.v.s.p);
            return;
        }
    }
    const mh_val_t *rm = mh_val_get(body, "remove");
    if (!rm || rm->t == MH_V_NIL) return;
    if (rm->t != MH_V_ARR) {
        bad(s, "invalid_field", "'remove' must be an array of paths");
        return;
    }
    for (uint32_t i = 0; i < rm->v.a.n; i++) {
        const mh_val_t *pv = &rm->v.a.items[i];
        if (pv->t != MH_V_STR || !mh_path_valid(pv->v.s.p, pv->v.s.n)) {
            bad(s, "invalid_path", "remove[%u] is not a valid path", i);
            return;
        }
    }
    c->remove = rm;
}

/* Decoding a large body takes a while (jansson reads ~65 MB/s of JSON
 * strings), so it runs on the thread pool, after the permission check: an
 * anonymous or read-only caller never costs a parse. */
static void parse_work(mh_step_t *s)
{
    commit_t *c = C(s);
    mh_req_t *req = c->op.req;
    mh_arena_t *a = &c->op.work;
    mh_val_t body = {.t = MH_V_MAP};
    const char *why = NULL;
    int rc = 0;
    if (req->body.len && c->msgpack) rc = mh_msgpack_decode(a, req->body.p, req->body.len, NULL, &body, &why);
    else if (req->body.len) rc = mh_json_decode(a, req->body.p, req->body.len, NULL, &body, &why);
    if (rc == MH_ENOMEM) {
        mh_step_refuse(s, 413, "too_large", "the body is too large to decode");
        return;
    }
    if (rc) {
        bad(s, "invalid_body", "cannot decode the %s body: %s", c->msgpack ? "msgpack" : "JSON",
            why ? why : mh_strerror(rc));
        return;
    }
    if (body.t != MH_V_MAP) {
        bad(s, "invalid_body", "the body must be a map");
        return;
    }
    const mh_val_t *br = mh_val_get(&body, "branch");
    if (!br || br->t != MH_V_STR || !mh_ref_name_valid(br->v.s.p, br->v.s.n)) {
        bad(s, "invalid_field", "'branch' must be a valid branch name");
        return;
    }
    memcpy(c->branch, br->v.s.p, br->v.s.n);
    c->branch[br->v.s.n] = 0;
    if (!(c->message = mh__text_field(a, mh_val_get(&body, "message"), MAX_MESSAGE, true))) {
        bad(s, "invalid_field", "'message' must be a UTF-8 string of at most %d bytes without NUL", MAX_MESSAGE);
        return;
    }
    const mh_val_t *au = mh_val_get(&body, "author");
    if (au && au->t != MH_V_NIL && !(c->author = mh__text_field(a, au, MAX_AUTHOR, false))) {
        bad(s, "invalid_field", "'author' must be a UTF-8 string of 1..%d bytes without NUL", MAX_AUTHOR);
        return;
    }
    const mh_val_t *ex = mh_val_get(&body, "expected_head");
    if (ex && ex->t != MH_V_NIL) {
        if (ex->t != MH_V_STR || !mh_id_valid(ex->v.s.p, ex->v.s.n)) {
            bad(s, "invalid_id", "'expected_head' must be sha256:<64 lowercase hex>");
            return;
        }
        memcpy(c->expected.s, ex->v.s.p, MH_ID_LEN);
        c->expected.s[MH_ID_LEN] = 0;
        c->has_expected = true;
    }
    parse_paths(s, &body);
}

static void step_parse(mh_step_t *s) { mh_step_work(s, parse_work); }

/* ============================================================ HEADS */

/* Rows: (is the asked branch?, head, snapshot_id, generation, depth) for
 * the asked branch and the default branch. */
static int heads_read(mh_step_t *s, PGresult *res)
{
    commit_t *c = C(s);
    int pick = -1;
    for (int r = 0; r < PQntuples(res); r++) {
        if (mh_pq_str(res, r, 0)[0] == 't') {
            c->branch_exists = true;
            pick = r;
        } else if (pick < 0) {
            pick = r;
        }
    }
    const char *head = pick >= 0 ? mh_pq_str(res, pick, 1) : NULL;
    if (c->has_expected && (!c->branch_exists || strcmp(head, c->expected.s) != 0)) {
        mh_step_refuse(s, 409, "stale_head", "branch '%s' is at %s, not at expected_head %s", c->branch,
                       c->branch_exists ? head : "(no branch)", c->expected.s);
        return 0;
    }
    if (pick < 0) { /* no branch and no default branch: a root commit */
        mh_step_goto(s, C_BUILD);
        return 0;
    }
    const char *snap = mh_pq_str(res, pick, 2);
    if (mh_pq_isnull(res, pick, 2) || mh_pq_isnull(res, pick, 4) || !mh_id_valid(head, strlen(head)) ||
        !mh_id_valid(snap, strlen(snap))) {
        mh_step_fail(s, MH_EDB, "the branch head's commit or snapshot is missing");
        return 0;
    }
    c->has_parent = true;
    memcpy(c->parent.s, head, MH_ID_SIZE);
    memcpy(c->parent_snap.s, snap, MH_ID_SIZE);
    c->c.parent_gens[0] = mh_pq_int(res, pick, 3);
    c->c.parent_depth = mh_pq_int(res, pick, 4);
    return 0;
}

static void step_heads(mh_step_t *s)
{
    commit_t *c = C(s);
    if (!c->author) {
        const mh_caller_t *caller = mh_req_caller(c->op.req);
        c->author = (char *)(caller->handle ? caller->handle : "anonymous");
    }
    mh_db_pq_t q = {NULL,
                    "SELECT b.name = $2, b.head_commit_id, c.snapshot_id, c.generation, s.depth"
                    " FROM branches b LEFT JOIN commits c ON c.commit_id = b.head_commit_id"
                    " LEFT JOIN snapshots s ON s.snapshot_id = c.snapshot_id"
                    " WHERE b.repo_id = $1 AND b.name IN ($2, $3)",
                    3,
                    (const char *const[]){c->op.repo->repo_id, c->branch, c->op.repo->default_branch},
                    NULL,
                    NULL};
    mh_step_query(s, &q, heads_read);
}

static void step_manifest(mh_step_t *s)
{
    commit_t *c = C(s);
    mh_step_wait(s);
    mh_hub_load_manifest(c->op.hub, &c->op.work, c->parent_snap.s, &c->base, mh__manifest_step_cb, s);
}

/* ============================================================ BUILD */

typedef struct {
    const char *p;
    uint32_t n;
} pstr_t;

static int cmp_pstr(const void *x, const void *y)
{
    const pstr_t *a = x, *b = y;
    size_t m = a->n < b->n ? a->n : b->n;
    int r = memcmp(a->p, b->p, m);
    return r ? r : (a->n > b->n) - (a->n < b->n);
}

/* By id; the same content at several paths: the first path wins. */
static int cmp_blob(const void *x, const void *y)
{
    const cblob_t *a = x, *b = y;
    int c = memcmp(a->id, b->id, MH_ID_LEN);
    if (c) return c;
    size_t m = a->path.n < b->path.n ? a->path.n : b->path.n;
    c = memcmp(a->path.p, b->path.p, m);
    return c ? c : (a->path.n > b->path.n) - (a->path.n < b->path.n);
}

/* The contents, their blob ids and the upsert map path -> id; false after
 * refusing or failing. */
static bool decode_files(mh_step_t *s, mh_kv_t *kv, pstr_t *paths)
{
    commit_t *c = C(s);
    mh_arena_t *a = &c->op.work;
    for (uint32_t i = 0; i < c->files->v.m.n; i++) {
        const mh_kv_t *f = &c->files->v.m.kv[i];
        const uint8_t *data = (const uint8_t *)f->v.v.s.p;
        size_t len = f->v.v.s.n;
        if (f->v.t == MH_V_STR) {
            uint8_t *d;
            int rc = mh_base64_decode(a, f->v.v.s.p, f->v.v.s.n, &d, &len);
            if (rc == MH_ENOMEM) return mh_step_fail(s, rc, "decoding the contents"), false;
            if (rc)
                return bad(s, "invalid_field", "files['%.*s']: not valid base64", (int)f->k.v.s.n, f->k.v.s.p), false;
            data = d;
        }
        char *id = mh_alloc(a, MH_ID_SIZE);
        if (!id) return mh_step_fail(s, MH_ENOMEM, "hashing the contents"), false;
        mh_id_t bid;
        mh_blob_id(len ? data : (const uint8_t *)"", len, &bid);
        memcpy(id, bid.s, MH_ID_SIZE);
        c->blobs[i] = (cblob_t){.id = id, .content = data, .len = len, .path = {f->k.v.s.p, f->k.v.s.n}};
        kv[i].k = f->k;
        kv[i].v = mh_v_strn(id, MH_ID_LEN);
        paths[i] = (pstr_t){f->k.v.s.p, f->k.v.s.n};
    }
    return true;
}

/* A path may not be written twice, nor both written and removed; a
 * removed path must exist. */
static bool check_paths(mh_step_t *s, pstr_t *paths, uint32_t nf)
{
    commit_t *c = C(s);
    if (nf > 1) qsort(paths, nf, sizeof *paths, cmp_pstr);
    for (uint32_t i = 1; i < nf; i++)
        if (!cmp_pstr(&paths[i - 1], &paths[i]))
            return bad(s, "invalid_field", "files: path '%.*s' appears twice", (int)paths[i].n, paths[i].p), false;
    uint32_t nrm = c->remove ? c->remove->v.a.n : 0;
    for (uint32_t i = 0; i < nrm; i++) {
        const mh_val_t *r = &c->remove->v.a.items[i];
        pstr_t key = {r->v.s.p, r->v.s.n};
        if (nf && bsearch(&key, paths, nf, sizeof *paths, cmp_pstr))
            return bad(s, "invalid_field", "path '%.*s' is both in files and in remove", (int)r->v.s.n, r->v.s.p),
                   false;
        if (!mh_manifest_find(&c->base, r->v.s.p, r->v.s.n))
            return bad(s, "invalid_field", "remove: '%.*s' is not in the manifest of %s", (int)r->v.s.n, r->v.s.p,
                       c->has_parent ? c->parent.s : "the (empty) branch"),
                   false;
    }
    return true;
}

static void build_work(mh_step_t *s)
{
    commit_t *c = C(s);
    mh_arena_t *a = &c->op.work;
    uint32_t nf = c->files->v.m.n;
    mh_kv_t *kv = mh_alloc(a, (nf + 1) * sizeof *kv);
    pstr_t *paths = mh_alloc(a, (nf + 1) * sizeof *paths);
    c->blobs = mh_alloc(a, (nf + 1) * sizeof *c->blobs);
    if (!kv || !paths || !c->blobs) {
        mh_step_fail(s, MH_ENOMEM, "build");
        return;
    }
    if (!decode_files(s, kv, paths) || !check_paths(s, paths, nf)) return;
    /* The new manifest: the parent's, minus remove, plus files. */
    mh_val_t upsert = {.t = MH_V_MAP, .v.m = {kv, nf}};
    if (mh_manifest_clone(&c->m, &c->base)) {
        mh_step_fail(s, MH_ENOMEM, "build");
        return;
    }
    const char *why = NULL;
    int rc = mh_manifest_apply(&c->m, &upsert, c->remove, &why);
    if (rc == MH_ENOMEM) {
        mh_step_fail(s, rc, "build");
        return;
    }
    if (rc) {
        bad(s, "invalid_field", "%s", why ? why : "cannot apply the changes");
        return;
    }
    /* The commit (SPEC 1), its snapshot in delta form (refwrite). */
    c->c.nparents = c->has_parent;
    c->c.parents[0] = c->parent.s;
    c->c.parent_snap = c->has_parent ? c->parent_snap.s : NULL;
    c->c.parent_m = &c->base;
    c->c.m = &c->m;
    c->c.message = c->message;
    c->c.author = c->author;
    c->c.branch = c->branch;
    if (mh_rw_commit_build(&c->c)) {
        mh_step_fail(s, MH_ENOMEM, "build");
        return;
    }
    /* Distinct blobs by id. */
    if (nf > 1) qsort(c->blobs, nf, sizeof *c->blobs, cmp_blob);
    size_t k = 0;
    for (uint32_t i = 0; i < nf; i++)
        if (!k || memcmp(c->blobs[k - 1].id, c->blobs[i].id, MH_ID_LEN) != 0) c->blobs[k++] = c->blobs[i];
    c->nblobs = k;
}

static void step_build(mh_step_t *s) { mh_step_work(s, build_work); }

/* ============================================================ KNOWN */

static int cmp_id_key(const void *key, const void *elem)
{
    return memcmp(key, ((const cblob_t *)elem)->id, MH_ID_LEN);
}

static int known_read(mh_step_t *s, PGresult *res)
{
    commit_t *c = C(s);
    for (int r = 0; r < PQntuples(res); r++) {
        const char *id = mh_pq_str(res, r, 0);
        cblob_t *b = strlen(id) == MH_ID_LEN ? bsearch(id, c->blobs, c->nblobs, sizeof *c->blobs, cmp_id_key) : NULL;
        if (b) b->known = true;
    }
    uint64_t bytes = 0;
    for (size_t i = 0; i < c->nblobs; i++)
        if (!c->blobs[i].known) {
            c->npack++;
            bytes += c->blobs[i].len;
        }
    if (c->npack && bytes > c->op.hub->cfg->max_mpack_bytes) {
        mh_step_refuse(s, 413, "too_large", "the new contents (%llu bytes) exceed the largest pack (%llu bytes)",
                       (unsigned long long)bytes, (unsigned long long)c->op.hub->cfg->max_mpack_bytes);
        return 0;
    }
    if (!c->npack) mh_step_goto(s, C_ACQUIRE);
    return 0;
}

static void step_known(mh_step_t *s)
{
    commit_t *c = C(s);
    const char **ids = mh_alloc(&c->op.work, (c->nblobs + 1) * sizeof *ids);
    if (!ids) {
        mh_step_fail(s, MH_ENOMEM, "known");
        return;
    }
    for (size_t i = 0; i < c->nblobs; i++) ids[i] = c->blobs[i].id;
    const char *arr = mh_pq_array(&c->op.work, ids, c->nblobs, MH_ID_LEN);
    if (!arr) {
        mh_step_fail(s, MH_ENOMEM, "known");
        return;
    }
    mh_db_pq_t q = {NULL, "SELECT u.id FROM unnest ($2::text[]) AS u(id) WHERE " MH_SQL_HOLDS_BLOB("$1", "u.id"),
                    2,    (const char *const[]){c->op.repo->repo_id, arr},
                    NULL, NULL};
    mh_step_query(s, &q, known_read);
}

/* ============================================================ PACK */

/* The pack of the blobs not yet referenced, built by the pack builder
 * in memory (v2, path order: its bytes depend only on the new contents
 * and their paths), and its index and frames rows. */
static void packed_cb(void *ud, int err)
{
    commit_t *c = ud;
    if (!err) {
        c->pack_id = *mh_pb_id(c->pb);
        mh_mpack_key(c->pack_key, c->pack_id.s);
        snprintf(c->pack_size, sizeof c->pack_size, "%zu", c->pack.len);
        err = mh_rw_built_rows(c->pb, &c->rows, &c->frows);
    }
    mh_step_resume(&c->op.step, err, err ? mh_pb_why(c->pb) : NULL);
}

static void step_pack(mh_step_t *s)
{
    commit_t *c = C(s);
    mh_hub_t *hub = c->op.hub;
    mh_pb_opts_t o = {.version = 2, .level = (int)hub->cfg->zstd_level};
    int rc = mh_pb_new(&o, &c->pb);
    for (size_t i = 0; i < c->nblobs && !rc; i++) {
        const cblob_t *x = &c->blobs[i];
        size_t ix;
        if (x->known) continue;
        if (!(rc = mh_pb_add(c->pb, x->id, x->len, x->path.p, (uint32_t)x->path.n, 0, &ix)))
            mh_pb_src_mem(c->pb, ix, x->content);
    }
    if (rc) {
        mh_step_fail(s, rc, "building the pack");
        return;
    }
    mh_pb_env_t env = {hub->loop, hub->store, hub->budget, &c->pack, false};
    mh_step_wait(s);
    mh_pb_run(c->pb, &env, packed_cb, c);
}

/* ====================================================== transaction */

static void step_begin(mh_step_t *s)
{
    commit_t *c = C(s);
    mh_rw_begin(s, c->op.repo->repo_id, c->npack ? c->pack_id.s : NULL, c->npack ? MH_RW_OBJECTS | MH_RW_FRAMES : 0);
}

static void step_check(mh_step_t *s)
{
    commit_t *c = C(s);
    /* The branch must still be where the commit was built: at its parent,
     * or absent when it did not exist (it then starts at the default
     * branch's head, or as a root). */
    const char *parent = c->has_parent ? c->parent.s : NULL;
    mh_rw_commit_move(s, &c->mv, c->op.repo->repo_id, c->branch, MH_MOVE_COMMIT, c->c.cid.s, parent,
                      c->branch_exists ? parent : NULL);
}

static int put_done(mh_step_t *s, int err)
{
    if (err) mh_step_fail(s, err, "storing the pack");
    return err;
}

static void step_put(mh_step_t *s)
{
    commit_t *c = C(s);
    if (c->mv.verdict) {
        mh_rw_move_refuse(s, &c->mv);
        return;
    }
    if (!c->npack) {
        mh_step_goto(s, C_WRITE);
        return;
    }
    mh_step_put(s, c->pack_key, c->pack.p, c->pack.len, put_done);
}

static void step_copy(mh_step_t *s) { mh_rw_copy(s, MH_RW_OBJECTS, &C(s)->rows); }

static void step_copy_frames(mh_step_t *s) { mh_rw_copy(s, MH_RW_FRAMES, &C(s)->frows); }

static void step_write(mh_step_t *s)
{
    commit_t *c = C(s);
    mh_db_batch_t b = {0};
    mh_rw_commit_rows(&b, c->op.repo->repo_id, &c->c);
    if (c->npack) {
        /* A blob another repository holds is packed again for this one:
         * objects are reached only through ref rows. */
        mh_rw_pack_t pack = {c->op.repo->repo_id, c->pack_id.s, c->pack_size, "commit", true};
        mh_rw_pack_rows(&b, &pack, NULL, NULL);
    }
    mh_rw_move_rows(&b, &c->mv);
    /* The next commit on this branch starts from this manifest. */
    c->op.new_sid = c->c.sid.s;
    c->op.new_m = &c->m;
    mh_step_batch(s, &b, NULL);
}

static const mh_step_def_t commit_steps[] = {
    [C_PARSE] = {"parse", step_parse},
    [C_HEADS] = {"heads", step_heads},
    [C_MANIFEST] = {"manifest", step_manifest},
    [C_BUILD] = {"build", step_build},
    [C_KNOWN] = {"known", step_known},
    [C_PACK] = {"pack", step_pack},
    [C_ACQUIRE] = {"acquire", mh_step_acquire},
    [C_BEGIN] = {"begin", step_begin},
    [C_CHECK] = {"check", step_check},
    [C_PUT] = {"put", step_put},
    [C_COPY] = {"copy", step_copy},
    [C_COPY_FRAMES] = {"copy_frames", step_copy_frames},
    [C_WRITE] = {"write", step_write},
    [C_COMMIT] = {"commit", mh_step_commit},
    [C_DONE] = {"done", mh__op_step_done},
};

/* ============================================================ the end */

static void commit_finish(mh_step_t *s)
{
    commit_t *c = C(s);
    mh_req_t *req = c->op.req;
    if (s->err == MH_ECONFLICT) /* a concurrent creator of the branch won */
        mh_step_refuse(s, 409, "stale_head", "branch '%s' changed concurrently; retry on its new head", c->branch);
    if (mh__op_failed(s, "invalid_field")) return;
    mh_info("req %s: commit %s on %s/%s branch %s: %zu files, %zu new blobs%s%s, %llu ms", req->id, c->c.cid.s,
            c->op.repo->owner, c->op.repo->slug, c->branch, c->m.n, c->npack, c->npack ? " in " : "",
            c->npack ? c->pack_id.s : "", (unsigned long long)((mh_now_us() - s->t0) / 1000));
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b), *parents = mh_vb_arr(b);
    if (c->has_parent) mh_vb_push(b, parents, mh_v_str(c->parent.s));
    mh_vb_put(b, m, "commit_id", mh_v_str(c->c.cid.s));
    mh_vb_put(b, m, "snapshot_id", mh_v_str(c->c.sid.s));
    mh_vb_put(b, m, "mpack_id", c->npack ? mh_v_str(c->pack_id.s) : mh_v_nil());
    mh_vb_put(b, m, "branch", mh_v_str(c->branch));
    mh_vb_put(b, m, "parent_ids", mh_vb_node(b, parents));
    mh_vb_put(b, m, "author", mh_v_str(c->author));
    mh_vb_put(b, m, "committed_at", mh_v_str(c->c.committed_at));
    mh_vb_put(b, m, "generation", mh_v_int(c->c.gen));
    mh_vb_put(b, m, "blobs_written", mh_v_uint(c->npack));
    mh_res_val(req, 201, m);
}

static void commit_free(void *arg)
{
    commit_t *c = arg;
    mh_manifest_free(&c->base);
    mh_manifest_free(&c->m);
    mh_rw_commit_free(&c->c);
    mh_pb_free(c->pb);
    mh_buf_free(&c->pack);
    mh_buf_free(&c->rows);
    mh_buf_free(&c->frows);
}

/* The work arena holds the decoded body, contents and manifests. */
static const mh__op_def_t commit_def = {"commit", MH__STEPS(commit_steps), commit_finish, commit_free,
                                        WORK_ARENA_LIMIT};

void mh_h_repo_commit_create(mh_req_t *req)
{
    commit_t *c = MH__OP_NEW(req, commit_t, &commit_def);
    if (!c) return;
    c->msgpack = body_is_msgpack(req);
    mh_hub_load_repo(req, MH_PERM_WRITE, mh__op_repo_cb);
}
