/*
 * push.c — the three push steps of SPEC 4.3: presign (a grant to upload
 * one pack to a private staging key), the upload itself (store_routes.c
 * for fs; the store for s3), and unpack.
 *
 * Unpack is a state machine (DESIGN 3): one `advance()` switch; every
 * libuv / db / store callback records its result and calls advance().
 *
 *   LOAD_REPO -> LOOKUP -> (already referenced: TX, no pack work)
 *             -> READ staged bytes -> VERIFY (thread pool: pack hash,
 *                parse, every blob against its id)
 *             -> CONTEXT (what this repository already has: parent
 *                commits, parent snapshots, objects for the ghost guard)
 *             -> BASES (parent manifests from stored snapshots)
 *             -> REBUILD (thread pool: manifests from deltas, snapshot and
 *                commit ids, ghost guard, parents, generations, COPY rows)
 *             -> MARK_VERIFIED -> MOVE to mpacks/<hex>
 *             -> TX (one transaction: COPY into temp tables, INSERT ...
 *                SELECT ... ON CONFLICT DO NOTHING, ref rows, the branch
 *                compare-and-swap under a row lock) -> DONE
 *
 * Invariants: nothing is written to PostgreSQL before every check passed,
 * and then everything is written in one transaction; the staged pack is
 * never exposed under mpacks/ before its hash was checked; a grant is
 * only consumed by a successful unpack.
 */
#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include "mh/hub.h"
#include "mh/mpack.h"

/* ============================================================ presign */

typedef struct {
    mh_req_t *req;
    mh_repo_t *repo;
    mh_id_t key;
    uint8_t sha[32];
    uint64_t size;
    char grant_id[33];
    char staging_key[48];
} presign_t;

static bool body_id(mh_req_t *req, const mh_val_t *body, const char *name, bool required, mh_id_t *out, bool *present)
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

static void presign_done(void *ud, PGresult *res, int err, const char *errmsg)
{
    presign_t *p = ud;
    mh_req_t *req = p->req;
    mh_hub_t *hub = req->app;
    if (err) {
        mh_res_fail(req, err, errmsg);
        return;
    }
    bool present = mh_pq_str(res, 0, 0)[0] == 't';
    mh_arena_t *a = &req->arena;
    char *url = NULL;
    if (!present) {
        int rc = mh_store_presign(hub->store, a, "PUT", p->staging_key, p->size, p->sha, hub->cfg->presign_ttl, &url);
        if (rc) {
            mh_res_error(req, 500, "internal", "cannot presign: %s", mh_strerror(rc));
            return;
        }
    }
    mh_val_t *m = mh_v_map(a);
    mh_val_t u = url ? mh_v_str(url) : mh_v_nil();
    int rc = m ? 0 : MH_ENOMEM;
    if (!rc) rc = mh_map_put(a, m, "upload_url", u);
    if (!rc) rc = mh_map_put(a, m, "uploadUrl", u);
    if (!rc) rc = mh_map_put(a, m, "mpack_key", mh_v_str(p->key.s));
    if (!rc) rc = mh_map_put(a, m, "expires_in", mh_v_int(hub->cfg->presign_ttl));
    if (!rc) rc = mh_map_put(a, m, "already_present", mh_v_bool(present));
    if (rc) mh_res_error(req, 503, "unavailable", "out of memory");
    else mh_res_val(req, 200, m);
}

static void presign_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    presign_t *p = req->user;
    p->repo = repo;
    /* One statement: a re-push of a pack this repository already
     * references needs no upload (and gets no grant); otherwise record
     * the grant. A pack known only to other repositories must be uploaded
     * again (SPEC 4.3: naming a hash proves nothing). */
    char ttl[16], size[24];
    snprintf(ttl, sizeof ttl, "%u", hub->cfg->presign_ttl);
    snprintf(size, sizeof size, "%llu", (unsigned long long)p->size);
    const mh_caller_t *caller = mh_req_caller(req);
    const char *vals[7] = {repo->repo_id, p->key.s, p->grant_id, caller->identity_id.s, size, p->staging_key, ttl};
    mh_db_query(hub->db,
                "WITH p AS (SELECT 1 FROM mpack_refs WHERE repo_id = $1 AND mpack_id = $2),"
                " g AS (INSERT INTO push_grants (grant_id, repo_id, identity_id, mpack_key, size_bytes, staging_key,"
                "        expires_at)"
                "  SELECT $3, $1, $4, $2, $5::bigint, $6, now() + make_interval(secs => $7::int)"
                "  WHERE NOT EXISTS (SELECT 1 FROM p) RETURNING 1)"
                " SELECT EXISTS (SELECT 1 FROM p), (SELECT count(*) FROM g)",
                7, vals, NULL, NULL, presign_done, p);
}

void mh_h_push_presign(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    mh_val_t body;
    if (!mh_req_body_val(req, &body)) return;
    if (body.t != MH_V_MAP) {
        mh_res_error(req, 422, "invalid_body", "the body must be a map");
        return;
    }
    presign_t *p = mh_calloc(&req->arena, sizeof *p);
    if (!p) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    p->req = req;
    if (!body_id(req, &body, "mpack_key", true, &p->key, NULL)) return;
    mh_hex_decode(p->sha, p->key.s + 7, 32);
    const mh_val_t *sz = mh_val_get(&body, "size_bytes");
    if (!sz || sz->t != MH_V_UINT || sz->v.u == 0) {
        mh_res_error(req, 422, "invalid_field", "'size_bytes' must be a positive integer");
        return;
    }
    p->size = sz->v.u;
    if (p->size > hub->cfg->max_mpack_bytes) {
        mh_res_error(req, 413, "too_large", "pack of %llu bytes exceeds the maximum of %llu bytes",
                     (unsigned long long)p->size, (unsigned long long)hub->cfg->max_mpack_bytes);
        return;
    }
    uint8_t rnd[16];
    if (mh_random(rnd, sizeof rnd)) {
        mh_res_error(req, 503, "unavailable", "no randomness");
        return;
    }
    mh_hex_encode(p->grant_id, rnd, sizeof rnd);
    snprintf(p->staging_key, sizeof p->staging_key, "incoming/%s", p->grant_id);
    req->user = p;
    mh_hub_load_repo(req, MH_PERM_WRITE, presign_repo_cb);
}

/* ============================================================= unpack */

typedef enum {
    U_LOOKUP,
    U_READ,
    U_VERIFY,
    U_CONTEXT,
    U_BASES,
    U_REBUILD,
    U_MARK,
    U_TX_ACQUIRE,
    U_TX_BEGIN,
    U_MOVE,
    U_TX_COPY_COMMITS,
    U_TX_COPY_SNAPSHOTS,
    U_TX_COPY_OBJECTS,
    U_TX_INSERT,
    U_TX_LOCK,
    U_TX_ANCESTRY,
    U_TX_MOVE_BRANCH,
    U_TX_COMMIT,
    U_COMMITTED,
    U_DONE,
} ustate_t;

/* An external (already stored) parent snapshot whose manifest we need. */
typedef struct {
    char id[MH_ID_SIZE];
    int depth;
    mh_manifest_t m;
    bool loaded;
} base_t;

typedef struct {
    mh_req_t *req;
    mh_hub_t *hub;
    mh_repo_t *repo;
    ustate_t state;
    bool busy; /* an async step is in flight */

    /* request */
    mh_id_t key;
    char branch[256];
    mh_id_t head, expected_old;
    bool has_expected_old, force;
    char pack_key[MH_MPACK_KEY_SIZE];

    /* lookup */
    bool already_referenced;
    char *grant_id;
    char *staging_key;
    bool grant_verified;
    uint64_t grant_size;

    /* the pack */
    mh_buf_t bytes;
    mh_pack_t pack;
    mh_arena_t work; /* thread-pool allocations (never touched by the loop meanwhile) */
    uv_work_t uvw;
    int work_err;
    int work_status;
    const char *work_why;

    /* context from PostgreSQL */
    char **ext_parents; size_t n_ext_parents;     /* commit parents outside the pack */
    char **ext_snaps; size_t n_ext_snaps;         /* snapshot ids (parents or commit snapshots) outside the pack */
    char **ext_objects; size_t n_ext_objects;     /* upserted object ids outside the pack */
    char **have_parents; int *have_parent_gen; size_t n_have_parents;
    char **have_snaps; int *have_snap_depth; size_t n_have_snaps;
    char **have_objects; size_t n_have_objects;
    base_t *bases; size_t nbases, next_base;
    bool head_in_pack;

    /* rows for COPY */
    mh_buf_t copy_commits, copy_snapshots, copy_objects;

    /* transaction */
    mh_dbconn_t *conn;
    char *old_head;
    bool branch_exists;
    int64_t commits_written, snapshots_written, objects_written;
    uint64_t t0;
} unpack_t;

static void advance(unpack_t *u);

static void unpack_free(unpack_t *u)
{
    mh_buf_free(&u->bytes);
    mh_buf_free(&u->copy_commits);
    mh_buf_free(&u->copy_snapshots);
    mh_buf_free(&u->copy_objects);
    for (size_t i = 0; i < u->nbases; i++) mh_manifest_free(&u->bases[i].m);
    mh_arena_release(&u->work);
}

static void unpack_cleanup_cb(void *arg) { unpack_free(arg); }

/* Ends the request with an error; a held connection is released (which
 * rolls back an open transaction). */
static void fail(unpack_t *u, int status, const char *code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void fail(unpack_t *u, int status, const char *code, const char *fmt, ...)
{
    char detail[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    if (u->conn) {
        mh_dbconn_release(u->conn);
        u->conn = NULL;
    }
    u->state = U_DONE;
    mh_info("req %s: unpack %s refused: %d %s: %s", u->req->id, u->key.s, status, code, detail);
    if (status == 503) mh_res_header(u->req, "Retry-After", "2");
    mh_res_error(u->req, status, code, "%s", detail);
}

static void fail_db(unpack_t *u, int err, const char *errmsg)
{
    mh_error("req %s: unpack: database: %s (%s)", u->req->id, mh_strerror(err), errmsg ? errmsg : "");
    if (err == MH_ECONFLICT)
        fail(u, 409, "conflict", "a concurrent push changed this branch; fetch and retry");
    else if (err == MH_EDBDOWN || err == MH_ETIMEDOUT)
        fail(u, 503, "unavailable", "the database is unavailable; retry shortly");
    else
        fail(u, 500, "internal", "database error");
}

/* ------------------------------------------------------ id sets */

/* The pack's and the repository's ids, in core's seeded, growing id
 * list (keys borrowed from the pack buffer or the work arena), with a
 * value per id. Do not copy an idset_t once initialised. */
typedef struct {
    mh_idlist_t l;
    uint32_t *vals;
    size_t vcap;
} idset_t;

static int idset_init(idset_t *s, mh_arena_t *a, size_t expected)
{
    mh_idlist_init(&s->l, a);
    s->vals = NULL;
    s->vcap = 0;
    return mh_idmap_reserve(&s->l.map, expected);
}

/* Adds id with value v unless present; true when added. */
static bool idset_add(idset_t *s, const char *id, uint32_t v)
{
    if (mh_idlist_add(&s->l, id) != 1) return false;
    if (s->l.n > s->vcap) {
        uint32_t *nv = mh_alloc(s->l.arena, s->l.cap * sizeof *nv);
        if (!nv) return false;
        if (s->vcap) memcpy(nv, s->vals, s->vcap * sizeof *nv);
        s->vals = nv;
        s->vcap = s->l.cap;
    }
    s->vals[s->l.n - 1] = v;
    return true;
}

static bool idset_get(const idset_t *s, const char *id, uint32_t *v)
{
    uint32_t i = mh_idlist_find(&s->l, id);
    if (i == MH_IDMAP_NONE) return false;
    if (v) *v = s->vals[i];
    return true;
}

/* ============================================ VERIFY (thread pool) */

/* Pack hash, parse, blob hashes; then collects what must be looked up in
 * this repository: commit parents, snapshot parents and commit snapshots
 * not in the pack, and upserted objects not in the pack. */
static void verify_work(uv_work_t *w)
{
    unpack_t *u = w->data;
    mh_arena_t *a = &u->work;
    uint8_t d[32];
    mh_id_t got;
    mh_sha256(u->bytes.p, u->bytes.len, d);
    mh_id_from_digest(&got, d);
    if (memcmp(got.s, u->key.s, MH_ID_LEN) != 0) {
        u->work_status = 422;
        u->work_why = "the pack does not hash to mpack_key";
        return;
    }
    const char *why = NULL;
    int rc = mh_pack_read(a, u->bytes.p, u->bytes.len, &mh_pack_limits_default, &u->pack, &why);
    if (rc) {
        u->work_status = rc == MH_ENOMEM ? 503 : 422;
        u->work_why = why ? why : mh_strerror(rc);
        return;
    }
    size_t bad = 0;
    if (mh_pack_verify_blobs(u->bytes.p, &u->pack, &bad)) {
        u->work_status = 422;
        u->work_why = mh_sprintf(a, "blobs[%zu] (%.*s): content does not hash to its object_id", bad,
                                 (int)u->pack.blobs[bad].object_id.n, u->pack.blobs[bad].object_id.p);
        return;
    }
    mh_pack_t *p = &u->pack;
    idset_t commits, snaps, blobs, ext_p, ext_s, ext_o;
    if (idset_init(&commits, a, p->ncommits) || idset_init(&snaps, a, p->nsnapshots) ||
        idset_init(&blobs, a, p->nblobs) || idset_init(&ext_p, a, p->ncommits) ||
        idset_init(&ext_s, a, p->nsnapshots + p->ncommits) || idset_init(&ext_o, a, 1024)) {
        u->work_status = 503;
        return;
    }
    for (size_t i = 0; i < p->ncommits; i++) idset_add(&commits, p->commits[i].commit_id.p, (uint32_t)i);
    /* A snapshot may appear more than once (two commits with the same
     * tree): every entry is rebuilt and checked on its own, and the rows
     * collapse on insert (ON CONFLICT DO NOTHING). */
    for (size_t i = 0; i < p->nsnapshots; i++) idset_add(&snaps, p->snapshots[i].snapshot_id.p, (uint32_t)i);
    for (size_t i = 0; i < p->nblobs; i++) idset_add(&blobs, p->blobs[i].object_id.p, (uint32_t)i);

    size_t cap_p = 16, cap_s = 16, cap_o = 1024;
    u->ext_parents = mh_alloc(a, cap_p * sizeof(char *));
    u->ext_snaps = mh_alloc(a, cap_s * sizeof(char *));
    u->ext_objects = mh_alloc(a, cap_o * sizeof(char *));
#define PUSH_EXT(arr, n, cap, id)                                                  \
    do {                                                                           \
        if ((n) == (cap)) {                                                        \
            char **g = mh_alloc(a, 2 * (cap) * sizeof(char *));                    \
            if (!g) { u->work_status = 503; return; }                              \
            memcpy(g, (arr), (n) * sizeof(char *));                                \
            (arr) = g;                                                             \
            (cap) *= 2;                                                            \
        }                                                                          \
        (arr)[(n)++] = (char *)(id);                                               \
    } while (0)
    if (!u->ext_parents || !u->ext_snaps || !u->ext_objects) {
        u->work_status = 503;
        return;
    }
    for (size_t i = 0; i < p->ncommits; i++) {
        const mh_pack_commit_t *c = &p->commits[i];
        const mh_str_t ps[2] = {c->parent, c->parent2};
        for (int k = 0; k < 2; k++)
            if (ps[k].p && !idset_get(&commits, ps[k].p, NULL) && idset_add(&ext_p, ps[k].p, 0))
                PUSH_EXT(u->ext_parents, u->n_ext_parents, cap_p, ps[k].p);
        if (!idset_get(&snaps, c->snapshot_id.p, NULL) && idset_add(&ext_s, c->snapshot_id.p, 0))
            PUSH_EXT(u->ext_snaps, u->n_ext_snaps, cap_s, c->snapshot_id.p);
    }
    for (size_t i = 0; i < p->nsnapshots; i++) {
        const mh_pack_snapshot_t *s = &p->snapshots[i];
        if (s->parent.p && !idset_get(&snaps, s->parent.p, NULL) && idset_add(&ext_s, s->parent.p, 0))
            PUSH_EXT(u->ext_snaps, u->n_ext_snaps, cap_s, s->parent.p);
        for (uint32_t k = 0; k < s->upsert->v.m.n; k++) {
            const mh_val_t *v = &s->upsert->v.m.kv[k].v;
            if (v->t != MH_V_STR || !mh_id_valid(v->v.s.p, v->v.s.n)) continue; /* rebuild reports it */
            if (!idset_get(&blobs, v->v.s.p, NULL) && idset_add(&ext_o, v->v.s.p, 0))
                PUSH_EXT(u->ext_objects, u->n_ext_objects, cap_o, v->v.s.p);
        }
    }
    u->head_in_pack = idset_get(&commits, u->head.s, NULL);
#undef PUSH_EXT
}

static void work_done_cb(uv_work_t *w, int status)
{
    unpack_t *u = w->data;
    u->busy = false;
    if (status) u->work_status = 500;
    advance(u);
}

/* ============================================ REBUILD (thread pool) */

static int copy_str(mh_buf_t *b, mh_str_t s, bool last) { return mh_copy_field(b, s.p, s.n, last); }

#define REJECT(...)                                                            \
    do {                                                                       \
        u->work_status = 422;                                                  \
        u->work_why = mh_sprintf(a, __VA_ARGS__);                              \
        goto out;                                                              \
    } while (0)

static void rebuild_work(uv_work_t *w)
{
    unpack_t *u = w->data;
    mh_arena_t *a = &u->work;
    mh_pack_t *p = &u->pack;
    size_t ns = p->nsnapshots, nc = p->ncommits;
    mh_manifest_t *ms = calloc(ns ? ns : 1, sizeof *ms);
    int *children = calloc(ns ? ns : 1, sizeof(int));
    int *depth = calloc(ns ? ns : 1, sizeof(int));
    uint32_t *order = malloc((ns ? ns : 1) * sizeof(uint32_t));
    uint8_t *mark = calloc(ns ? ns : 1, 1);
    int *gen = calloc(nc ? nc : 1, sizeof(int));
    uint32_t *corder = malloc((nc ? nc : 1) * sizeof(uint32_t));
    uint8_t *cmark = calloc(nc ? nc : 1, 1);
    uint32_t *stack = malloc(((ns > nc ? ns : nc) + 1) * sizeof(uint32_t));
    mh_buf_t up = {0}, rm = {0}, cp = {0}, meta = {0};
    idset_t snaps, commits, blobs, have_o, have_s, have_c, bases;
    if (!ms || !children || !depth || !order || !mark || !gen || !corder || !cmark || !stack ||
        idset_init(&snaps, a, ns) || idset_init(&commits, a, nc) || idset_init(&blobs, a, p->nblobs) ||
        idset_init(&have_o, a, u->n_have_objects) || idset_init(&have_s, a, u->n_have_snaps) ||
        idset_init(&have_c, a, u->n_have_parents) || idset_init(&bases, a, u->nbases)) {
        u->work_status = 503;
        u->work_why = "out of memory";
        goto out;
    }
    for (size_t i = 0; i < ns; i++) idset_add(&snaps, p->snapshots[i].snapshot_id.p, (uint32_t)i);
    for (size_t i = 0; i < nc; i++) idset_add(&commits, p->commits[i].commit_id.p, (uint32_t)i);
    for (size_t i = 0; i < p->nblobs; i++) idset_add(&blobs, p->blobs[i].object_id.p, (uint32_t)i);
    for (size_t i = 0; i < u->n_have_objects; i++) idset_add(&have_o, u->have_objects[i], 0);
    for (size_t i = 0; i < u->n_have_snaps; i++) idset_add(&have_s, u->have_snaps[i], (uint32_t)u->have_snap_depth[i]);
    for (size_t i = 0; i < u->n_have_parents; i++) idset_add(&have_c, u->have_parents[i], (uint32_t)u->have_parent_gen[i]);
    for (size_t i = 0; i < u->nbases; i++) idset_add(&bases, u->bases[i].id, (uint32_t)i);

    /* Snapshots: every parent must be in the pack or stored in this
     * repository; order parents first (iterative DFS). */
    for (size_t i = 0; i < ns; i++) {
        const mh_pack_snapshot_t *s = &p->snapshots[i];
        uint32_t pi;
        if (!s->parent.p) continue;
        if (idset_get(&snaps, s->parent.p, &pi)) children[pi]++;
        else if (!idset_get(&have_s, s->parent.p, NULL))
            REJECT("snapshots[%zu]: parent snapshot %.*s is neither in the pack nor in this repository", i, MH_ID_LEN,
                   s->parent.p);
    }
    size_t no = 0;
    for (size_t i = 0; i < ns; i++) {
        if (mark[i]) continue;
        size_t sp = 0;
        uint32_t cur = (uint32_t)i;
        /* Climb to the first ancestor already ordered (or a root). */
        for (;;) {
            if (mark[cur] == 1) REJECT("snapshot %.*s is its own ancestor", MH_ID_LEN, p->snapshots[cur].snapshot_id.p);
            if (mark[cur] == 2) break;
            mark[cur] = 1;
            stack[sp++] = cur;
            uint32_t pi;
            const mh_pack_snapshot_t *s = &p->snapshots[cur];
            if (s->parent.p && idset_get(&snaps, s->parent.p, &pi)) cur = pi;
            else break;
        }
        while (sp) {
            uint32_t x = stack[--sp];
            mark[x] = 2;
            order[no++] = x;
        }
    }

    for (size_t oi = 0; oi < ns; oi++) {
        uint32_t i = order[oi];
        const mh_pack_snapshot_t *s = &p->snapshots[i];
        uint32_t pi;
        int pdepth = -1;
        if (!s->parent.p) {
            ms[i] = (mh_manifest_t){0};
        } else if (idset_get(&snaps, s->parent.p, &pi)) {
            /* The last child takes the parent's manifest over: in a linear
             * history no manifest is ever copied. */
            if (--children[pi] == 0) {
                ms[i] = ms[pi];
                ms[pi] = (mh_manifest_t){0};
            } else if (mh_manifest_clone(&ms[i], &ms[pi])) {
                u->work_status = 503;
                u->work_why = "out of memory";
                goto out;
            }
            pdepth = depth[pi];
        } else {
            uint32_t bi;
            if (!idset_get(&bases, s->parent.p, &bi) || !u->bases[bi].loaded ||
                mh_manifest_clone(&ms[i], &u->bases[bi].m)) {
                u->work_status = 503;
                u->work_why = "parent manifest unavailable";
                goto out;
            }
            pdepth = u->bases[bi].depth;
        }
        const char *why = NULL;
        int rc = mh_manifest_apply(&ms[i], s->upsert, s->remove, &why);
        if (rc == MH_ENOMEM) {
            u->work_status = 503;
            u->work_why = "out of memory";
            goto out;
        }
        if (rc) REJECT("snapshots[%u] (%.*s): %s", i, MH_ID_LEN, s->snapshot_id.p, why ? why : "bad delta");
        mh_id_t sid;
        mh_manifest_id(&ms[i], &sid);
        if (memcmp(sid.s, s->snapshot_id.p, MH_ID_LEN) != 0)
            REJECT("snapshots[%u]: the rebuilt manifest hashes to %s, not to snapshot_id %.*s", i, sid.s, MH_ID_LEN,
                   s->snapshot_id.p);
        /* Ghost guard: every object this snapshot adds is in the pack or
         * already referenced by this repository. */
        for (uint32_t k = 0; k < s->upsert->v.m.n; k++) {
            const mh_val_t *v = &s->upsert->v.m.kv[k].v;
            if (!idset_get(&blobs, v->v.s.p, NULL) && !idset_get(&have_o, v->v.s.p, NULL))
                REJECT("snapshots[%u]: object %.*s (%.*s) is neither in the pack nor in this repository", i,
                       MH_ID_LEN, v->v.s.p, (int)s->upsert->v.m.kv[k].k.v.s.n, s->upsert->v.m.kv[k].k.v.s.p);
        }
        /* Row: delta form; a checkpoint every MH_CHECKPOINT_INTERVAL links. */
        depth[i] = pdepth + 1;
        bool checkpoint = depth[i] >= MH_CHECKPOINT_INTERVAL;
        if (checkpoint) depth[i] = 0;
        up.len = rm.len = cp.len = 0;
        /* One writer per buffer: each keeps its own sticky error (reusing
         * one writer reset the upsert's error and stored a cut delta). */
        mh_mpw_t mw, mr;
        mh_mpw_init(&mw, &up);
        mh_mpw_val(&mw, s->upsert);
        mh_mpw_init(&mr, &rm);
        mh_mpw_val(&mr, s->remove);
        if (mw.err || mr.err || (checkpoint && mh_manifest_encode(&ms[i], &cp))) {
            u->work_status = 503;
            goto out;
        }
        mh_buf_t *b = &u->copy_snapshots;
        rc = copy_str(b, s->snapshot_id, false);
        rc |= mh_copy_field(b, s->parent.p, s->parent.p ? s->parent.n : 0, false);
        rc |= mh_copy_bytea(b, up.p, up.len, false);
        rc |= mh_copy_bytea(b, rm.p, rm.len, false);
        rc |= mh_copy_int(b, (int64_t)ms[i].n, false);
        rc |= mh_copy_int(b, depth[i], false);
        rc |= checkpoint ? mh_copy_bytea(b, cp.p, cp.len, true) : mh_copy_field(b, NULL, 0, true);
        if (rc) {
            u->work_status = 503;
            goto out;
        }
        if (children[i] == 0) mh_manifest_free(&ms[i]);
    }

    /* Commits: ids, parents in the pack or in this repository, snapshot
     * in the pack or in this repository, generation numbers (parents
     * first). */
    no = 0;
    for (size_t i = 0; i < nc; i++) {
        if (cmark[i]) continue;
        size_t sp = 0;
        stack[sp++] = (uint32_t)i;
        while (sp) {
            uint32_t x = stack[sp - 1];
            if (cmark[x] == 2) {
                sp--;
                continue;
            }
            const mh_pack_commit_t *c = &p->commits[x];
            const mh_str_t ps[2] = {c->parent, c->parent2};
            bool pushed = false;
            if (cmark[x] == 0) {
                cmark[x] = 1;
                for (int k = 0; k < 2; k++) {
                    uint32_t pi;
                    if (ps[k].p && idset_get(&commits, ps[k].p, &pi)) {
                        if (cmark[pi] == 1) REJECT("commit %.*s is its own ancestor", MH_ID_LEN, c->commit_id.p);
                        if (cmark[pi] == 0) {
                            stack[sp++] = pi;
                            pushed = true;
                        }
                    }
                }
                if (pushed) continue;
            }
            sp--;
            cmark[x] = 2;
            corder[no++] = x;
        }
    }
    for (size_t oi = 0; oi < nc; oi++) {
        uint32_t i = corder[oi];
        const mh_pack_commit_t *c = &p->commits[i];
        if (!c->parent.p && c->parent2.p) REJECT("commits[%u]: parent2_commit_id without parent_commit_id", i);
        mh_str_t ps[2];
        int np = 0, g = 0;
        const mh_str_t both[2] = {c->parent, c->parent2};
        for (int k = 0; k < 2; k++) {
            if (!both[k].p) continue;
            uint32_t v;
            if (idset_get(&commits, both[k].p, &v)) v = (uint32_t)gen[v];
            else if (!idset_get(&have_c, both[k].p, &v))
                REJECT("commits[%u]: parent %.*s is neither in the pack nor in this repository", i, MH_ID_LEN,
                       both[k].p);
            if ((int)v > g) g = (int)v;
            ps[np++] = both[k];
        }
        gen[i] = g + 1;
        if (!idset_get(&snaps, c->snapshot_id.p, NULL) && !idset_get(&have_s, c->snapshot_id.p, NULL))
            REJECT("commits[%u]: snapshot %.*s is neither in the pack nor in this repository", i, MH_ID_LEN,
                   c->snapshot_id.p);
        mh_id_t cid;
        mh_commit_id(ps, np, c->snapshot_id, c->message, c->committed_at, c->author, &cid);
        if (memcmp(cid.s, c->commit_id.p, MH_ID_LEN) != 0)
            REJECT("commits[%u]: the fields hash to %s, not to commit_id %.*s", i, cid.s, MH_ID_LEN, c->commit_id.p);
        uint32_t nmeta = 0;
        meta.len = 0;
        if (mh_pack_commit_meta(c, &meta, &nmeta)) {
            u->work_status = 503;
            goto out;
        }
        mh_buf_t *b = &u->copy_commits;
        int rc = copy_str(b, c->commit_id, false);
        rc |= mh_copy_field(b, c->parent.p, c->parent.n, false);
        rc |= mh_copy_field(b, c->parent2.p, c->parent2.n, false);
        rc |= copy_str(b, c->snapshot_id, false);
        rc |= copy_str(b, c->message, false);
        rc |= copy_str(b, c->author, false);
        rc |= copy_str(b, c->committed_at, false);
        rc |= mh_copy_field(b, c->branch.p ? c->branch.p : "", c->branch.p ? c->branch.n : 0, false);
        rc |= mh_copy_int(b, gen[i], false);
        rc |= nmeta ? mh_copy_bytea(b, meta.p, meta.len, true) : mh_copy_field(b, NULL, 0, true);
        if (rc) {
            u->work_status = 503;
            goto out;
        }
    }

    /* Objects with their byte ranges inside this pack. */
    for (size_t i = 0; i < p->nblobs; i++) {
        const mh_pack_blob_t *bl = &p->blobs[i];
        mh_buf_t *b = &u->copy_objects;
        int rc = copy_str(b, bl->object_id, false);
        rc |= mh_copy_int(b, (int64_t)bl->offset, false);
        rc |= mh_copy_int(b, (int64_t)bl->length, true);
        if (rc) {
            u->work_status = 503;
            goto out;
        }
    }
out:
    if (ms)
        for (size_t i = 0; i < ns; i++) mh_manifest_free(&ms[i]);
    free(ms);
    free(children);
    free(depth);
    free(order);
    free(mark);
    free(gen);
    free(corder);
    free(cmark);
    free(stack);
    mh_buf_free(&up);
    mh_buf_free(&rm);
    mh_buf_free(&cp);
    mh_buf_free(&meta);
}
#undef REJECT

/* ======================================================= DB callbacks */

static void lookup_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    unpack_t *u = ud;
    u->busy = false;
    if (err) {
        fail_db(u, err, errmsg);
        return;
    }
    mh_arena_t *a = &u->req->arena;
    /* Row 0: whether this repository already references the pack; rows
     * after it: unexpired, unconsumed grants, newest first. */
    u->already_referenced = mh_pq_str(res, 0, 0)[0] == 't';
    if (u->already_referenced && mh_pq_str(res, 0, 6)[0] != 't') {
        /* This repository references the pack (an mpack.index job, say)
         * but not the history in it: unpack it in full, from its final
         * key. No grant is needed: the reference already is the right. */
        u->already_referenced = false;
        u->staging_key = u->pack_key;
        u->state = U_READ;
        advance(u);
        return;
    }
    if (!u->already_referenced) {
        if (PQntuples(res) < 2 || mh_pq_isnull(res, 1, 1)) {
            fail(u, 404, "no_grant", "no push grant for %s in this repository (presign first)", u->key.s);
            return;
        }
        u->grant_id = mh_strdup(a, mh_pq_str(res, 1, 1));
        u->staging_key = mh_strdup(a, mh_pq_str(res, 1, 2));
        u->grant_verified = mh_pq_str(res, 1, 3)[0] == 't';
        u->grant_size = (uint64_t)mh_pq_int(res, 1, 4);
    }
    u->state = u->already_referenced ? U_TX_ACQUIRE : U_READ;
    advance(u);
}

static void read_cb(void *ud, int err, mh_buf_t *data)
{
    unpack_t *u = ud;
    u->busy = false;
    if (err == MH_ENOENT && u->grant_verified && u->staging_key != u->pack_key) {
        /* This grant's own upload was verified by an earlier attempt that
         * moved it into place and then failed: read it from its final
         * key. Only a verified grant may do this — a grant whose upload
         * never hashed to the key must upload (SPEC 4.3). */
        u->staging_key = u->pack_key;
        u->state = U_READ;
        advance(u);
        return;
    }
    if (err == MH_ENOENT) {
        fail(u, 404, "not_staged", "nothing was uploaded for %s under this repository's grant", u->key.s);
        return;
    }
    if (err) {
        fail(u, 503, "store_unavailable", "cannot read the staged pack: %s", mh_strerror(err));
        return;
    }
    u->bytes = *data;
    *data = (mh_buf_t){0};
    u->state = U_VERIFY;
    advance(u);
}

static char **rows_to_ids(mh_arena_t *a, PGresult *res, int col, size_t *n)
{
    int rows = PQntuples(res);
    char **ids = mh_alloc(a, (size_t)(rows ? rows : 1) * sizeof(char *));
    if (!ids) return NULL;
    for (int i = 0; i < rows; i++) ids[i] = mh_strdup(a, mh_pq_str(res, i, col));
    *n = (size_t)rows;
    return ids;
}

static void context_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    unpack_t *u = ud;
    u->busy = false;
    if (err || n != 4) {
        fail_db(u, err ? err : MH_EDB, errmsg);
        return;
    }
    mh_arena_t *a = &u->work;
    /* 0: parents with generation; 1: snapshots with depth; 2: objects; 3: head present */
    u->have_parents = rows_to_ids(a, results[0], 0, &u->n_have_parents);
    u->have_parent_gen = mh_alloc(a, (u->n_have_parents + 1) * sizeof(int));
    u->have_snaps = rows_to_ids(a, results[1], 0, &u->n_have_snaps);
    u->have_snap_depth = mh_alloc(a, (u->n_have_snaps + 1) * sizeof(int));
    u->have_objects = rows_to_ids(a, results[2], 0, &u->n_have_objects);
    if (!u->have_parents || !u->have_parent_gen || !u->have_snaps || !u->have_snap_depth || !u->have_objects) {
        fail(u, 503, "unavailable", "out of memory");
        return;
    }
    for (size_t i = 0; i < u->n_have_parents; i++) u->have_parent_gen[i] = (int)mh_pq_int(results[0], (int)i, 1);
    for (size_t i = 0; i < u->n_have_snaps; i++) u->have_snap_depth[i] = (int)mh_pq_int(results[1], (int)i, 1);
    if (!u->head_in_pack && PQntuples(results[3]) == 0) {
        fail(u, 422, "unknown_head", "head %s is neither in the pack nor in this repository", u->head.s);
        return;
    }
    /* Bases: stored snapshots that pack snapshots are deltas against. */
    mh_pack_t *p = &u->pack;
    idset_t have_s, seen;
    if (idset_init(&have_s, a, u->n_have_snaps) || idset_init(&seen, a, u->n_have_snaps)) {
        fail(u, 503, "unavailable", "out of memory");
        return;
    }
    for (size_t i = 0; i < u->n_have_snaps; i++) idset_add(&have_s, u->have_snaps[i], (uint32_t)i);
    u->bases = mh_calloc(a, (u->n_have_snaps + 1) * sizeof(base_t));
    if (!u->bases) {
        fail(u, 503, "unavailable", "out of memory");
        return;
    }
    for (size_t i = 0; i < p->nsnapshots; i++) {
        const mh_pack_snapshot_t *s = &p->snapshots[i];
        uint32_t hi;
        if (s->parent.p && idset_get(&have_s, s->parent.p, &hi) && idset_add(&seen, s->parent.p, 0)) {
            base_t *b = &u->bases[u->nbases++];
            memcpy(b->id, s->parent.p, MH_ID_LEN);
            b->id[MH_ID_LEN] = 0;
            b->depth = u->have_snap_depth[hi];
        }
    }
    u->state = U_BASES;
    advance(u);
}

static void base_loaded_cb(void *ud, int err, const char *why)
{
    unpack_t *u = ud;
    u->busy = false;
    if (err) {
        fail(u, err == MH_EDBDOWN ? 503 : 500, "internal", "cannot rebuild stored snapshot %s: %s",
             u->bases[u->next_base].id, why ? why : mh_strerror(err));
        return;
    }
    u->bases[u->next_base].loaded = true;
    u->next_base++;
    advance(u);
}

static void step_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    unpack_t *u = ud;
    u->busy = false;
    if (err) {
        fail_db(u, err, errmsg);
        return;
    }
    u->state++;
    advance(u);
}

static void begin_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    unpack_t *u = ud;
    u->busy = false;
    if (err) {
        fail_db(u, err, errmsg);
        return;
    }
    if (mh_pq_int(res, 0, 0) != 1) {
        fail(u, 404, "not_found", "the repository was deleted");
        return;
    }
    /* A re-run that only moves a branch skips the pack work. */
    u->state = u->already_referenced ? U_TX_INSERT : U_MOVE;
    advance(u);
}

static void store_done_cb(void *ud, int err)
{
    unpack_t *u = ud;
    u->busy = false;
    if (err) {
        fail(u, 503, "store_unavailable", "cannot move the pack into place: %s", mh_strerror(err));
        return;
    }
    u->state++;
    advance(u);
}

static void acquire_cb(void *ud, mh_dbconn_t *c, int err)
{
    unpack_t *u = ud;
    u->busy = false;
    if (err) {
        fail_db(u, err, "no connection");
        return;
    }
    u->conn = c;
    u->state = U_TX_BEGIN;
    advance(u);
}

static void insert_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    unpack_t *u = ud;
    u->busy = false;
    if (err) {
        fail_db(u, err, errmsg);
        return;
    }
    /* The last three statements count the new ref rows. */
    u->commits_written = mh_pq_int(results[n - 3], 0, 0);
    u->snapshots_written = mh_pq_int(results[n - 2], 0, 0);
    u->objects_written = mh_pq_int(results[n - 1], 0, 0);
    u->state = U_TX_LOCK;
    advance(u);
}

static void lock_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    unpack_t *u = ud;
    u->busy = false;
    if (err) {
        fail_db(u, err, errmsg);
        return;
    }
    /* Row: (head present in this repository?, current branch head or NULL) */
    if (mh_pq_str(res, 0, 0)[0] != 't') {
        fail(u, 422, "unknown_head", "head %s is neither in the pack nor in this repository", u->head.s);
        return;
    }
    u->branch_exists = !mh_pq_isnull(res, 0, 1);
    u->old_head = u->branch_exists ? mh_strdup(&u->req->arena, mh_pq_str(res, 0, 1)) : NULL;
    if (u->has_expected_old) {
        if (!u->branch_exists || strcmp(u->old_head, u->expected_old.s) != 0) {
            fail(u, 409, "stale_head", "branch '%s' is at %s, not at expected_old_head %s", u->branch,
                 u->branch_exists ? u->old_head : "(no branch)", u->expected_old.s);
            return;
        }
    }
    if (!u->branch_exists || u->force || !strcmp(u->old_head, u->head.s)) u->state = U_TX_MOVE_BRANCH;
    else u->state = U_TX_ANCESTRY;
    advance(u);
}

static void ancestry_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    unpack_t *u = ud;
    u->busy = false;
    if (err) {
        fail_db(u, err, errmsg);
        return;
    }
    if (mh_pq_str(res, 0, 0)[0] != 't') {
        fail(u, 409, "non_fast_forward",
             "moving '%s' from %s to %s is not a fast-forward; fetch and merge, or push with force", u->branch,
             u->old_head, u->head.s);
        return;
    }
    u->state = U_TX_MOVE_BRANCH;
    advance(u);
}

/* ============================================================ advance */

/* Rows a push must add before the ref tables are re-analyzed. */
#define MH_ANALYZE_AFTER_ROWS 2000

static void analyze_done_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)ud;
    (void)res;
    if (err) mh_warn("ANALYZE after a large push failed: %s", errmsg ? errmsg : mh_strerror(err));
}

static const char sql_tx_begin[] =
    "BEGIN;"
    "CREATE TEMP TABLE tmp_commits (commit_id text, parent_commit_id text, parent2_commit_id text,"
    " snapshot_id text, message text, author text, committed_at text, branch text, generation int, meta bytea)"
    " ON COMMIT DROP;"
    "CREATE TEMP TABLE tmp_snapshots (snapshot_id text, parent_snapshot_id text, delta_upsert bytea COMPRESSION lz4,"
    " delta_remove bytea COMPRESSION lz4, entry_count int, depth int, checkpoint bytea COMPRESSION lz4) ON COMMIT DROP;"
    "CREATE TEMP TABLE tmp_objects (object_id text, byte_offset bigint, byte_length bigint) ON COMMIT DROP";

static void advance(unpack_t *u)
{
    mh_req_t *req = u->req;
    mh_hub_t *hub = u->hub;
    while (!u->busy && u->state != U_DONE) {
        if (mh_log_level_current <= MH_LOG_DEBUG)
            mh_debug("req %s: unpack state %d at %.1f ms", req->id, (int)u->state, (double)(mh_now_us() - u->t0) / 1000.0);
        switch (u->state) {
        case U_LOOKUP: {
            u->busy = true;
            const char *vals[3] = {u->repo->repo_id, u->key.s, u->head.s};
            mh_db_query(hub->db,
                        "SELECT EXISTS (SELECT 1 FROM mpack_refs WHERE repo_id = $1 AND mpack_id = $2),"
                        " NULL, NULL, NULL, NULL, 0 AS o,"
                        " EXISTS (SELECT 1 FROM commit_refs WHERE repo_id = $1 AND commit_id = $3)"
                        " UNION ALL (SELECT NULL, grant_id, staging_key, (verified_at IS NOT NULL)::text,"
                        " size_bytes::text, 1, NULL FROM push_grants"
                        " WHERE repo_id = $1 AND mpack_key = $2 AND consumed_at IS NULL AND expires_at > now()"
                        " ORDER BY verified_at IS NOT NULL DESC, created_at DESC LIMIT 1) ORDER BY o",
                        3, vals, NULL, NULL, lookup_cb, u);
            break;
        }
        case U_READ:
            u->busy = true;
            mh_store_get(hub->store, u->staging_key, 0, UINT64_MAX, read_cb, u);
            break;
        case U_VERIFY:
            if (u->bytes.len != u->grant_size && u->staging_key != u->pack_key) {
                fail(u, 422, "size_mismatch", "the staged pack has %zu bytes, the grant says %llu", u->bytes.len,
                     (unsigned long long)u->grant_size);
                return;
            }
            u->busy = true;
            u->uvw.data = u;
            u->state = U_CONTEXT;
            uv_queue_work(hub->loop, &u->uvw, verify_work, work_done_cb);
            break;
        case U_CONTEXT: {
            if (u->work_status) {
                fail(u, u->work_status, u->work_status == 422 ? "invalid_pack" : "unavailable", "%s",
                     u->work_why ? u->work_why : "cannot verify the pack");
                return;
            }
            mh_arena_t *a = &u->work;
            char *parents = mh_pq_array(a, (const char *const *)u->ext_parents, u->n_ext_parents, MH_ID_LEN);
            char *snaps = mh_pq_array(a, (const char *const *)u->ext_snaps, u->n_ext_snaps, MH_ID_LEN);
            char *objs = mh_pq_array(a, (const char *const *)u->ext_objects, u->n_ext_objects, MH_ID_LEN);
            if (!parents || !snaps || !objs) {
                fail(u, 503, "unavailable", "out of memory");
                return;
            }
            const char **v1 = mh_alloc(a, 2 * sizeof(char *)), **v2 = mh_alloc(a, 2 * sizeof(char *)),
                       **v3 = mh_alloc(a, 2 * sizeof(char *)), **v4 = mh_alloc(a, 2 * sizeof(char *));
            mh_db_pq_t *qs = mh_alloc(a, 4 * sizeof *qs);
            if (!v1 || !v2 || !v3 || !v4 || !qs) {
                fail(u, 503, "unavailable", "out of memory");
                return;
            }
            v1[0] = v2[0] = v3[0] = v4[0] = u->repo->repo_id;
            v1[1] = parents;
            v2[1] = snaps;
            v3[1] = objs;
            v4[1] = u->head.s;
            qs[0] = (mh_db_pq_t){NULL,
                                 "SELECT c.commit_id, c.generation FROM commit_refs r JOIN commits c USING (commit_id)"
                                 " WHERE r.repo_id = $1 AND r.commit_id = ANY ($2::text[])",
                                 2, v1, NULL, NULL};
            qs[1] = (mh_db_pq_t){NULL,
                                 "SELECT s.snapshot_id, s.depth FROM snapshot_refs r JOIN snapshots s USING (snapshot_id)"
                                 " WHERE r.repo_id = $1 AND r.snapshot_id = ANY ($2::text[])",
                                 2, v2, NULL, NULL};
            qs[2] = (mh_db_pq_t){NULL,
                                 "SELECT object_id FROM object_refs WHERE repo_id = $1 AND object_id = ANY ($2::text[])",
                                 2, v3, NULL, NULL};
            qs[3] = (mh_db_pq_t){NULL, "SELECT 1 FROM commit_refs WHERE repo_id = $1 AND commit_id = $2", 2, v4,
                                 NULL, NULL};
            u->busy = true;
            mh_db_pipeline(hub->db, qs, 4, context_cb, u);
            break;
        }
        case U_BASES:
            if (u->next_base < u->nbases) {
                u->busy = true;
                mh_hub_load_manifest(hub, &u->work, u->bases[u->next_base].id, &u->bases[u->next_base].m,
                                     base_loaded_cb, u);
                break;
            }
            u->busy = true;
            u->work_status = 0;
            u->state = U_REBUILD;
            uv_queue_work(hub->loop, &u->uvw, rebuild_work, work_done_cb);
            break;
        case U_REBUILD:
            if (u->work_status) {
                fail(u, u->work_status, u->work_status == 422 ? "invalid_pack" : "unavailable", "%s",
                     u->work_why ? u->work_why : "cannot rebuild the pack");
                return;
            }
            u->state = U_MARK;
            break;
        case U_MARK: {
            /* Record that this grant's upload hashed correctly before the
             * pack leaves its staging key (see read_cb). */
            u->busy = true;
            const char *vals[1] = {u->grant_id};
            mh_db_query(hub->db, "UPDATE push_grants SET verified_at = coalesce(verified_at, now()) WHERE grant_id = $1",
                        1, vals, NULL, NULL, step_cb, u);
            break;
        }
        case U_MOVE:
            if (u->staging_key == u->pack_key) { /* already at its final key */
                u->state++;
                break;
            }
            u->busy = true;
            mh_store_move(hub->store, u->staging_key, u->pack_key, store_done_cb, u);
            break;
        case U_TX_ACQUIRE:
            u->busy = true;
            mh_db_acquire(hub->db, acquire_cb, u);
            break;
        case U_TX_BEGIN:
            u->busy = true;
            /* Pushes to one repository serialise on its row for the
             * length of this transaction (the CPU-heavy checks ran
             * before it): ref rows can then be inserted without
             * speculative insertion, and the branch check below sees the
             * previous push's result. Every writer of a repository's ref
             * rows takes this lock first (docs/architecture.md). */
            if (!mh_id_valid(u->repo->repo_id, strlen(u->repo->repo_id))) {
                fail(u, 500, "internal", "bad repository id");
                return;
            }
            /* Then the pack's advisory lock (shared with mpack.index, GC
             * and the sweep, src/jobs): the sweep deletes a superseded
             * pack under it, so moving the pack into place under it means
             * the bytes the new rows point at cannot vanish. */
            char *script = mh_sprintf(&u->work,
                                      "%s;SELECT (SELECT count(*) FROM (SELECT 1 FROM repos WHERE repo_id = '%s'"
                                      " FOR UPDATE) r), pg_advisory_xact_lock(hashtextextended('musehub:mpack:' ||"
                                      " '%s'::text, 0))",
                                      u->already_referenced ? "BEGIN" : sql_tx_begin, u->repo->repo_id, u->key.s);
            if (!script) {
                fail(u, 503, "unavailable", "out of memory");
                return;
            }
            mh_dbconn_script(u->conn, script, begin_cb, u);
            break;
        case U_TX_COPY_COMMITS:
            u->busy = true;
            mh_dbconn_copy_in(u->conn, "COPY tmp_commits FROM STDIN", u->copy_commits.p, u->copy_commits.len, step_cb, u);
            break;
        case U_TX_COPY_SNAPSHOTS:
            u->busy = true;
            mh_dbconn_copy_in(u->conn, "COPY tmp_snapshots FROM STDIN", u->copy_snapshots.p, u->copy_snapshots.len,
                              step_cb, u);
            break;
        case U_TX_COPY_OBJECTS:
            u->busy = true;
            mh_dbconn_copy_in(u->conn, "COPY tmp_objects FROM STDIN", u->copy_objects.p, u->copy_objects.len, step_cb, u);
            break;
        case U_TX_INSERT: {
            u->busy = true;
            if (u->already_referenced) {
                /* Everything is referenced already: a re-run is a no-op
                 * apart from the branch move (counts stay zero). */
                u->state = U_TX_LOCK;
                u->busy = false;
                break;
            }
            mh_arena_t *a = &u->work;
            char *size = mh_sprintf(a, "%zu", u->bytes.len);
            const char **v = mh_alloc(a, 3 * sizeof(char *));
            mh_db_pq_t *qs = mh_alloc(a, 9 * sizeof *qs);
            if (!size || !v || !qs) {
                fail(u, 503, "unavailable", "out of memory");
                return;
            }
            v[0] = u->repo->repo_id;
            v[1] = u->key.s;
            v[2] = size;
            int n = 0;
            qs[n++] = (mh_db_pq_t){NULL,
                                   "INSERT INTO commits (commit_id, parent_commit_id, parent2_commit_id, snapshot_id,"
                                   " message, author, committed_at, branch, generation, meta)"
                                   " SELECT * FROM tmp_commits ORDER BY commit_id ON CONFLICT DO NOTHING",
                                   0, NULL, NULL, NULL};
            qs[n++] = (mh_db_pq_t){NULL,
                                   "INSERT INTO snapshots (snapshot_id, parent_snapshot_id, delta_upsert, delta_remove,"
                                   " entry_count, depth, checkpoint) SELECT * FROM tmp_snapshots ORDER BY snapshot_id"
                                   " ON CONFLICT DO NOTHING",
                                   0, NULL, NULL, NULL};
            qs[n++] = (mh_db_pq_t){NULL,
                                   "INSERT INTO objects (object_id, size_bytes, storage_uri)"
                                   " SELECT object_id, byte_length, 'mpack://' || $1::text || '#' || byte_offset || ':' ||"
                                   " byte_length FROM tmp_objects ORDER BY object_id ON CONFLICT DO NOTHING",
                                   1, v + 1, NULL, NULL};
            qs[n++] = (mh_db_pq_t){NULL,
                                   "INSERT INTO mpack_index (object_id, mpack_id, byte_offset, byte_length)"
                                   " SELECT object_id, $1::text, byte_offset, byte_length FROM tmp_objects"
                                   " ORDER BY object_id ON CONFLICT DO NOTHING",
                                   1, v + 1, NULL, NULL};
            qs[n++] = (mh_db_pq_t){NULL,
                                   "WITH m AS (INSERT INTO mpacks (mpack_id, size_bytes, kind) VALUES ($2, $3::bigint, 'push')"
                                   " ON CONFLICT (mpack_id) DO UPDATE SET superseded_at = NULL)"
                                   " INSERT INTO mpack_refs (repo_id, mpack_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                                   3, v, NULL, NULL};
            qs[n++] = (mh_db_pq_t){NULL,
                                   "WITH x AS (INSERT INTO commit_refs (repo_id, commit_id, branch, meta)"
                                   " SELECT DISTINCT ON (t.commit_id) $1::text, t.commit_id, t.branch, t.meta"
                                   " FROM tmp_commits t WHERE NOT EXISTS (SELECT 1 FROM commit_refs r WHERE r.repo_id = $1"
                                   " AND r.commit_id = t.commit_id) ORDER BY t.commit_id RETURNING 1) SELECT count(*) FROM x",
                                   1, v, NULL, NULL};
            qs[n++] = (mh_db_pq_t){NULL,
                                   "WITH x AS (INSERT INTO snapshot_refs (repo_id, snapshot_id) SELECT DISTINCT $1::text,"
                                   " t.snapshot_id FROM tmp_snapshots t WHERE NOT EXISTS (SELECT 1 FROM snapshot_refs r"
                                   " WHERE r.repo_id = $1 AND r.snapshot_id = t.snapshot_id) ORDER BY 2 RETURNING 1)"
                                   " SELECT count(*) FROM x",
                                   1, v, NULL, NULL};
            qs[n++] = (mh_db_pq_t){NULL,
                                   "WITH x AS (INSERT INTO object_refs (repo_id, object_id) SELECT DISTINCT $1::text, t.object_id"
                                   " FROM tmp_objects t WHERE NOT EXISTS (SELECT 1 FROM object_refs r WHERE r.repo_id = $1"
                                   " AND r.object_id = t.object_id) ORDER BY 2 RETURNING 1) SELECT count(*) FROM x",
                                   1, v, NULL, NULL};
            mh_dbconn_pipeline(u->conn, qs, n, insert_cb, u);
            break;
        }
        case U_TX_LOCK: {
            /* Serialise pushes to this branch on its row: FOR UPDATE waits
             * for a concurrent push and then returns the row's newest
             * version (not this statement's snapshot), so the
             * fast-forward check below sees the winner's head. Two pushes
             * creating the same new branch collide on its primary key
             * instead (plain INSERT below: 409 for the loser). */
            u->busy = true;
            const char *vals[3] = {u->repo->repo_id, u->branch, u->head.s};
            mh_dbconn_query(u->conn,
                            "SELECT EXISTS (SELECT 1 FROM commit_refs WHERE repo_id = $1 AND commit_id = $3),"
                            " (SELECT head_commit_id FROM branches WHERE repo_id = $1 AND name = $2 FOR UPDATE)",
                            3, vals, NULL, NULL, lock_cb, u);
            break;
        }
        case U_TX_ANCESTRY: {
            /* Is the old head an ancestor of the new one? Walk parents
             * from the new head, pruned by generation number so the cost
             * is the number of commits between them. */
            u->busy = true;
            const char *vals[2] = {u->head.s, u->old_head};
            mh_dbconn_query(u->conn,
                            "WITH RECURSIVE g AS (SELECT generation FROM commits WHERE commit_id = $2),"
                            " anc(id) AS (SELECT $1::text UNION"
                            "  SELECT p.id FROM anc JOIN commits c ON c.commit_id = anc.id,"
                            "  LATERAL (VALUES (c.parent_commit_id), (c.parent2_commit_id)) AS p(id)"
                            "  WHERE p.id IS NOT NULL AND c.generation > (SELECT generation FROM g))"
                            " SELECT EXISTS (SELECT 1 FROM anc WHERE id = $2)",
                            2, vals, NULL, NULL, ancestry_cb, u);
            break;
        }
        case U_TX_MOVE_BRANCH: {
            u->busy = true;
            const char *vals[4] = {u->repo->repo_id, u->branch, u->head.s, u->grant_id};
            mh_dbconn_query(u->conn,
                            u->branch_exists
                                ? "WITH b AS (UPDATE branches SET head_commit_id = $3, updated_at = now()"
                                  "  WHERE repo_id = $1 AND name = $2 AND head_commit_id <> $3 RETURNING 1),"
                                  " g AS (UPDATE push_grants SET consumed_at = now() WHERE grant_id = $4)"
                                  " UPDATE repos SET state_seq = state_seq + 1, updated_at = now()"
                                  " WHERE repo_id = $1 AND EXISTS (SELECT 1 FROM b)"
                                : "WITH b AS (INSERT INTO branches (repo_id, name, head_commit_id) VALUES ($1, $2, $3)"
                                  "  RETURNING 1),"
                                  " g AS (UPDATE push_grants SET consumed_at = now() WHERE grant_id = $4)"
                                  " UPDATE repos SET state_seq = state_seq + 1, updated_at = now()"
                                  " WHERE repo_id = $1 AND EXISTS (SELECT 1 FROM b)",
                            4, vals, NULL, NULL, step_cb, u);
            break;
        }
        case U_TX_COMMIT:
            u->busy = true;
            mh_dbconn_script(u->conn, "COMMIT", step_cb, u);
            break;
        case U_DONE:
            break;
        case U_COMMITTED: {
            mh_dbconn_release(u->conn);
            u->conn = NULL;
            u->state = U_DONE;
            mh_fetch_cache_invalidate(hub, u->repo->repo_id);
            /* After a bulk load the ref tables' statistics predate this
             * repository's rows: PostgreSQL then estimates one row for
             * repo_id = X, scans the repository's whole key prefix and
             * filters object_id (52,250 rows read to find 5 right after a
             * 10,310-commit push; EXPLAIN ANALYZE). Refresh them in the
             * background, off the response path; autovacuum would take a
             * minute or more. */
            if (u->objects_written + u->commits_written > MH_ANALYZE_AFTER_ROWS)
                mh_db_query(hub->db, "ANALYZE commit_refs, snapshot_refs, object_refs, mpack_index", 0, NULL, NULL,
                            NULL, analyze_done_cb, NULL);
            mh_arena_t *a = &req->arena;
            mh_val_t *m = mh_v_map(a);
            uint64_t ms = (mh_now_us() - u->t0) / 1000;
            int rc = m ? 0 : MH_ENOMEM;
            if (!rc) rc = mh_map_put(a, m, "commits_written", mh_v_int(u->commits_written));
            if (!rc) rc = mh_map_put(a, m, "snapshots_written", mh_v_int(u->snapshots_written));
            if (!rc) rc = mh_map_put(a, m, "objects_written", mh_v_int(u->objects_written));
            if (!rc) rc = mh_map_put(a, m, "branch", mh_v_str(u->branch));
            if (!rc) rc = mh_map_put(a, m, "head", mh_v_str(u->head.s));
            if (!rc) rc = mh_map_put(a, m, "elapsed_ms", mh_v_int((int64_t)ms));
            mh_info("req %s: unpack %s into %s/%s branch %s -> %s: %lld commits, %lld snapshots, %lld objects in %llu ms",
                    req->id, u->key.s, u->repo->owner, u->repo->slug, u->branch, u->head.s,
                    (long long)u->commits_written, (long long)u->snapshots_written, (long long)u->objects_written,
                    (unsigned long long)ms);
            if (rc) mh_res_error(req, 503, "unavailable", "out of memory");
            else mh_res_val(req, 200, m);
            return;
        }
        }
    }
}

static void unpack_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    unpack_t *u = req->user;
    u->repo = repo;
    u->state = U_LOOKUP;
    advance(u);
}

/* A branch name: 1..255 bytes of printable ASCII other than space and
 * ~^:?*[\, no "..", no leading or trailing '/' or '.', no "//". */
bool mh_branch_valid(const char *p, size_t n)
{
    if (n == 0 || n > 255 || p[0] == '/' || p[n - 1] == '/' || p[0] == '.' || p[n - 1] == '.') return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c <= ' ' || c >= 127 || strchr("~^:?*[\\", c)) return false;
        if (i + 1 < n && ((c == '.' && p[i + 1] == '.') || (c == '/' && p[i + 1] == '/'))) return false;
    }
    return true;
}

void mh_h_push_unpack(mh_req_t *req)
{
    mh_hub_t *hub = req->app;
    mh_val_t body;
    if (!mh_req_body_val(req, &body)) return;
    if (body.t != MH_V_MAP) {
        mh_res_error(req, 422, "invalid_body", "the body must be a map");
        return;
    }
    unpack_t *u = mh_calloc(&req->arena, sizeof *u);
    if (!u || mh_arena_defer(&req->arena, unpack_cleanup_cb, u)) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    u->req = req;
    u->hub = hub;
    u->t0 = mh_now_us();
    mh_arena_init(&u->work, 0);
    if (!body_id(req, &body, "mpack_key", true, &u->key, NULL)) return;
    if (!body_id(req, &body, "head", true, &u->head, NULL)) return;
    if (!body_id(req, &body, "expected_old_head", false, &u->expected_old, &u->has_expected_old)) return;
    const mh_val_t *br = mh_val_get(&body, "branch");
    if (!br || br->t != MH_V_STR || !mh_branch_valid(br->v.s.p, br->v.s.n)) {
        mh_res_error(req, 422, "invalid_field", "'branch' must be a valid branch name");
        return;
    }
    memcpy(u->branch, br->v.s.p, br->v.s.n);
    u->branch[br->v.s.n] = 0;
    const mh_val_t *force = mh_val_get(&body, "force");
    if (force && force->t != MH_V_NIL) {
        if (force->t != MH_V_BOOL) {
            mh_res_error(req, 422, "invalid_field", "'force' must be a boolean");
            return;
        }
        u->force = force->v.b;
    }
    mh_mpack_key(u->pack_key, u->key.s);
    req->user = u;
    mh_hub_load_repo(req, MH_PERM_WRITE, unpack_repo_cb);
}
