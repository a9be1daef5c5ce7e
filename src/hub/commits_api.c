/*
 * commits_api.c — POST /api/repos/{repo_id}/commits (SPEC 4.6): a commit
 * made by the server from file contents sent in the request.
 *
 * The commit and its snapshot live in PostgreSQL only (storage_uri NULL,
 * snapshot in delta form against its parent's, with a checkpoint every
 * MH_CHECKPOINT_INTERVAL links as push does). The blobs this repository
 * does not reference yet go into ONE new v1 mpack (blobs only, sorted by
 * object id, so the same new contents always make the same pack), stored
 * under mpacks/<hex> and indexed with the byte ranges known from writing
 * it. That pack is the only store write; none when every blob is known.
 *
 * A state machine (DESIGN 3), one advance() switch:
 *
 *   LOAD_REPO (WRITE permission) -> PARSE (thread pool: decode and
 *                validate the body; large JSON bodies take a while)
 *             -> HEADS (branch head, else the default branch's head, with
 *                its snapshot, generation and depth)
 *             -> MANIFEST (the parent's manifest, mh_hub_load_manifest)
 *             -> BUILD (thread pool: decode and hash the files, the new
 *                manifest, its id and delta, the commit id)
 *             -> KNOWN (which blobs this repository already references)
 *             -> PACK (thread pool: the pack of the new blobs, its id)
 *             -> TX: ACQUIRE, BEGIN, LOCK (the repository row, as every
 *                writer of its refs takes it first; the pack's advisory
 *                lock; the branch row FOR UPDATE, compared with the parent
 *                built on; a new branch is INSERTed here, so concurrent
 *                creators collide on its key), PUT (the pack, inside the
 *                locks: a loser never writes to the store),
 *                WRITE (every row, the branch move, the state_seq bump),
 *                COMMIT -> DONE
 *
 * Invariants: nothing is written anywhere before every check passed and
 * the branch is locked, so a request that loses the compare-and-swap
 * (stale expected_head, a concurrent commit or push) writes nothing, not
 * even to the store; all rows go in one transaction.
 */
#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hub_internal.h"
#include "mh/hub.h"
#include "mh/mpack.h"

/* Decoded bodies and file contents live in a per-request work arena: the
 * request arena's cap (64 MiB) is sized for ordinary API bodies, and a
 * 64 MiB JSON body holds its strings twice (JSON text, base64 decoded). */
#define WORK_ARENA_LIMIT ((size_t)320 << 20)
#define MAX_MESSAGE 65536
#define MAX_AUTHOR 255

typedef enum {
    C_PARSE,
    C_HEADS,
    C_MANIFEST,
    C_BUILD,
    C_KNOWN,
    C_PACK,
    C_ACQUIRE,
    C_BEGIN,
    C_LOCK,
    C_PUT,
    C_WRITE,
    C_COMMIT,
    C_COMMITTED,
    C_DONE,
} cstate_t;

typedef struct {
    const char *id;      /* MH_ID_LEN bytes (arena) */
    const uint8_t *data; /* content */
    size_t len;
    bool known;          /* already referenced by this repository */
    uint64_t off;        /* content offset inside the new pack */
} cblob_t;

typedef struct {
    mh_req_t *req;
    mh_hub_t *hub;
    mh_repo_t *repo;
    cstate_t state;
    bool busy;
    uint64_t t0;
    mh_arena_t work; /* decoded body, contents, manifests; see WORK_ARENA_LIMIT */
    uv_work_t uvw;
    int work_status;
    const char *work_code; /* error code for a 4xx from the thread pool */
    const char *work_why;

    /* request */
    bool msgpack; /* the body's Content-Type */
    const mh_val_t *files;  /* MAP path -> bin | base64 str */
    const mh_val_t *remove; /* ARR of str, or NULL */
    char branch[256];
    char *message, *author;
    mh_id_t expected;
    bool has_expected;

    /* heads */
    bool branch_exists, has_parent;
    mh_id_t parent, parent_snap;
    int64_t parent_gen, parent_depth;

    /* build */
    mh_manifest_t base, m;
    cblob_t *blobs; /* distinct, sorted by id */
    size_t nblobs;
    mh_id_t sid, cid;
    char committed_at[48];
    int64_t gen, depth;
    bool new_snapshot, checkpoint;
    mh_buf_t up, rm, cp;
    size_t entry_count;

    /* pack */
    size_t npack;
    mh_buf_t pack;
    mh_id_t pack_id;
    char pack_key[MH_MPACK_KEY_SIZE];
    char *arr_ids, *arr_off, *arr_len; /* text[] / bigint[] literals of the packed blobs */

    /* transaction */
    mh_dbconn_t *conn;
} commit_t;

static void advance(commit_t *c);
static void parse_work(uv_work_t *w);

static void commit_free(commit_t *c)
{
    if (c->conn) mh_dbconn_release(c->conn);
    c->conn = NULL;
    mh_manifest_free(&c->base);
    mh_manifest_free(&c->m);
    mh_buf_free(&c->up);
    mh_buf_free(&c->rm);
    mh_buf_free(&c->cp);
    mh_buf_free(&c->pack);
    mh_arena_release(&c->work);
}

static void commit_cleanup_cb(void *arg) { commit_free(arg); }

static void fail(commit_t *c, int status, const char *code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void fail(commit_t *c, int status, const char *code, const char *fmt, ...)
{
    char detail[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    if (c->conn) {
        mh_dbconn_release(c->conn); /* rolls back an open transaction */
        c->conn = NULL;
    }
    c->state = C_DONE;
    mh_info("req %s: commit to '%s' refused: %d %s: %s", c->req->id, c->branch, status, code, detail);
    if (status == 503) mh_res_header(c->req, "Retry-After", "2");
    mh_res_error(c->req, status, code, "%s", detail);
}

static void fail_db(commit_t *c, int err, const char *errmsg)
{
    if (err == MH_ECONFLICT) {
        /* A unique violation (another request created the branch first)
         * or a deadlock with a concurrent writer: the branch moved. */
        fail(c, 409, "stale_head", "branch '%s' changed concurrently; retry on its new head", c->branch);
        return;
    }
    mh_error("req %s: commit: database: %s (%s)", c->req->id, mh_strerror(err), errmsg ? errmsg : "");
    if (err == MH_EDBDOWN || err == MH_ETIMEDOUT) fail(c, 503, "unavailable", "the database is unavailable; retry shortly");
    else fail(c, 500, "internal", "database error");
}

/* ------------------------------------------------------------ helpers */


/* True when the Content-Type names msgpack (same rule as
 * mh_req_body_val: anything else is read as JSON). */
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

/* A text string field: STR, UTF-8, no NUL, 0..max bytes (1.. when
 * !allow_empty); copied NUL-terminated into a. */
static char *text_field(mh_arena_t *a, const mh_val_t *v, size_t max, bool allow_empty)
{
    if (!v || v->t != MH_V_STR || v->v.s.n > max || (!allow_empty && v->v.s.n == 0)) return NULL;
    if (memchr(v->v.s.p, 0, v->v.s.n) || !mh_utf8_valid(v->v.s.p, v->v.s.n)) return NULL;
    return mh_strndup(a, v->v.s.p, v->v.s.n);
}

static int cmp_blob(const void *x, const void *y)
{
    return memcmp(((const cblob_t *)x)->id, ((const cblob_t *)y)->id, MH_ID_LEN);
}

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

/* ================================================ BUILD (thread pool) */

#define REJECT(...)                                                            \
    do {                                                                       \
        c->work_status = 422;                                                  \
        c->work_why = mh_sprintf(a, __VA_ARGS__);                              \
        return;                                                                \
    } while (0)
#define NOMEM()                                                                \
    do {                                                                       \
        c->work_status = 503;                                                  \
        c->work_why = "out of memory";                                         \
        return;                                                                \
    } while (0)

static void build_work(uv_work_t *w)
{
    commit_t *c = w->data;
    mh_arena_t *a = &c->work;
    const mh_val_t *files = c->files;
    uint32_t nf = files->v.m.n;

    /* Contents and their blob ids; the upsert map path -> id. */
    cblob_t *blobs = mh_alloc(a, (nf + 1) * sizeof *blobs);
    mh_kv_t *kv = mh_alloc(a, (nf + 1) * sizeof *kv);
    pstr_t *paths = mh_alloc(a, (nf + 1) * sizeof *paths);
    if (!blobs || !kv || !paths) NOMEM();
    for (uint32_t i = 0; i < nf; i++) {
        const mh_kv_t *f = &files->v.m.kv[i];
        const uint8_t *data;
        size_t len;
        if (f->v.t == MH_V_BIN) {
            data = (const uint8_t *)f->v.v.s.p;
            len = f->v.v.s.n;
        } else {
            uint8_t *d;
            int rc = mh_base64_decode(a, f->v.v.s.p, f->v.v.s.n, &d, &len);
            if (rc == MH_ENOMEM) NOMEM();
            if (rc) REJECT("files['%.*s']: not valid base64", (int)f->k.v.s.n, f->k.v.s.p);
            data = d;
        }
        char *id = mh_alloc(a, MH_ID_SIZE);
        if (!id) NOMEM();
        mh_id_t bid;
        static const uint8_t none[1] = {0};
        mh_blob_id(len ? data : none, len, &bid);
        memcpy(id, bid.s, MH_ID_SIZE);
        blobs[i] = (cblob_t){.id = id, .data = data, .len = len};
        kv[i].k = f->k;
        kv[i].v = mh_v_strn(id, MH_ID_LEN);
        paths[i] = (pstr_t){f->k.v.s.p, f->k.v.s.n};
    }

    /* A path may not be both written and removed, nor written twice. */
    if (nf > 1) qsort(paths, nf, sizeof *paths, cmp_pstr);
    for (uint32_t i = 1; i < nf; i++)
        if (!cmp_pstr(&paths[i - 1], &paths[i])) REJECT("files: path '%.*s' appears twice", (int)paths[i].n, paths[i].p);
    uint32_t nrm = c->remove ? c->remove->v.a.n : 0;
    for (uint32_t i = 0; i < nrm; i++) {
        const mh_val_t *r = &c->remove->v.a.items[i];
        pstr_t key = {r->v.s.p, r->v.s.n};
        if (nf && bsearch(&key, paths, nf, sizeof *paths, cmp_pstr))
            REJECT("path '%.*s' is both in files and in remove", (int)r->v.s.n, r->v.s.p);
        if (!mh_manifest_find(&c->base, r->v.s.p, r->v.s.n))
            REJECT("remove: '%.*s' is not in the manifest of %s", (int)r->v.s.n, r->v.s.p,
                   c->has_parent ? c->parent.s : "the (empty) branch");
    }

    /* The new manifest: the parent's, minus remove, plus files. */
    mh_val_t upsert = {.t = MH_V_MAP};
    upsert.v.m.kv = kv;
    upsert.v.m.n = nf;
    if (mh_manifest_clone(&c->m, &c->base)) NOMEM();
    const char *why = NULL;
    int rc = mh_manifest_apply(&c->m, &upsert, c->remove, &why);
    if (rc == MH_ENOMEM) NOMEM();
    if (rc) REJECT("%s", why ? why : "cannot apply the changes");
    mh_manifest_id(&c->m, &c->sid);
    c->entry_count = c->m.n;

    /* The snapshot row, in delta form against the parent's snapshot. An
     * unchanged tree reuses the parent's row (a delta against itself
     * would make the row its own parent). */
    c->new_snapshot = !c->has_parent || strcmp(c->sid.s, c->parent_snap.s) != 0;
    if (c->new_snapshot) {
        uint32_t nu, nr;
        if (mh_manifest_diff(&c->base, &c->m, &c->up, &nu, &c->rm, &nr)) NOMEM();
        c->depth = c->has_parent ? c->parent_depth + 1 : 0;
        c->checkpoint = c->depth >= MH_CHECKPOINT_INTERVAL;
        if (c->checkpoint) {
            c->depth = 0;
            if (mh_manifest_encode(&c->m, &c->cp)) NOMEM();
        }
    }

    /* The commit (SPEC 1). */
    mh_iso_now(c->committed_at, sizeof c->committed_at);
    mh_str_t parents[1] = {{c->parent.s, MH_ID_LEN}};
    mh_commit_id(parents, c->has_parent ? 1 : 0, (mh_str_t){c->sid.s, MH_ID_LEN},
                 (mh_str_t){c->message, strlen(c->message)}, (mh_str_t){c->committed_at, strlen(c->committed_at)},
                 (mh_str_t){c->author, strlen(c->author)}, &c->cid);
    c->gen = c->has_parent ? c->parent_gen + 1 : 1;

    /* Distinct blobs by id. */
    if (nf > 1) qsort(blobs, nf, sizeof *blobs, cmp_blob);
    size_t k = 0;
    for (uint32_t i = 0; i < nf; i++)
        if (!k || memcmp(blobs[k - 1].id, blobs[i].id, MH_ID_LEN) != 0) blobs[k++] = blobs[i];
    c->blobs = blobs;
    c->nblobs = k;
}

/* ================================================= PACK (thread pool) */

/* The pack of the blobs not yet referenced: v1, blobs only, sorted by
 * object id (they are), so its bytes depend only on the set of new
 * contents. Records each blob's content offset as it is written, and
 * builds the array literals the index rows are inserted from. */
static void pack_work(uv_work_t *w)
{
    commit_t *c = w->data;
    mh_arena_t *a = &c->work;
    uint64_t bytes = 0;
    for (size_t i = 0; i < c->nblobs; i++)
        if (!c->blobs[i].known) bytes += c->blobs[i].len;
    if (bytes > SIZE_MAX / 2 || mh_buf_reserve(&c->pack, (size_t)bytes + c->npack * (MH_ID_LEN + 32) + 64)) NOMEM();
    mh_packw_t pw;
    mh_packw_init(&pw, &c->pack);
    mh_packw_commits(&pw, 0);
    mh_packw_snapshots(&pw, 0);
    mh_packw_blobs(&pw, (uint32_t)c->npack);
    static const uint8_t empty[1] = {0};
    for (size_t i = 0; i < c->nblobs; i++) {
        cblob_t *b = &c->blobs[i];
        if (b->known) continue;
        mh_packw_blob(&pw, (mh_str_t){b->id, MH_ID_LEN}, b->len ? b->data : empty, b->len);
        /* The writer ends each blob map with its content bytes. */
        b->off = c->pack.len - b->len;
    }
    mh_packw_branch_heads(&pw, 0);
    if (mh_packw_finish(&pw)) NOMEM();
    uint8_t d[32];
    mh_sha256(c->pack.p, c->pack.len, d);
    mh_id_from_digest(&c->pack_id, d);
    mh_mpack_key(c->pack_key, c->pack_id.s);

    mh_buf_t ids = {0}, offs = {0}, lens = {0};
    int rc = mh_buf_append_byte(&ids, '{') | mh_buf_append_byte(&offs, '{') | mh_buf_append_byte(&lens, '{');
    bool first = true;
    for (size_t i = 0; i < c->nblobs && !rc; i++) {
        const cblob_t *b = &c->blobs[i];
        if (b->known) continue;
        const char *sep = first ? "" : ",";
        first = false;
        rc |= mh_buf_printf(&ids, "%s%.*s", sep, MH_ID_LEN, b->id);
        rc |= mh_buf_printf(&offs, "%s%llu", sep, (unsigned long long)b->off);
        rc |= mh_buf_printf(&lens, "%s%zu", sep, b->len);
    }
    if (!rc) rc = mh_buf_append(&ids, "}", 2) | mh_buf_append(&offs, "}", 2) | mh_buf_append(&lens, "}", 2);
    if (!rc) {
        c->arr_ids = mh_strdup(a, (char *)ids.p);
        c->arr_off = mh_strdup(a, (char *)offs.p);
        c->arr_len = mh_strdup(a, (char *)lens.p);
    }
    mh_buf_free(&ids);
    mh_buf_free(&offs);
    mh_buf_free(&lens);
    if (rc || !c->arr_ids || !c->arr_off || !c->arr_len) NOMEM();
}
#undef REJECT
#undef NOMEM

static void work_done_cb(uv_work_t *w, int status)
{
    commit_t *c = w->data;
    c->busy = false;
    if (status) c->work_status = 500;
    if (c->work_status) {
        const char *code = c->work_code ? c->work_code : c->work_status == 422 ? "invalid_field" : "unavailable";
        fail(c, c->work_status, code, "%s", c->work_why ? c->work_why : "cannot build the commit");
        return;
    }
    c->state++;
    advance(c);
}

/* ======================================================= DB callbacks */

static void heads_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    commit_t *c = ud;
    c->busy = false;
    if (err) {
        fail_db(c, err, errmsg);
        return;
    }
    /* Rows: (is the asked branch?, head, snapshot_id, generation, depth)
     * for the asked branch and the default branch. */
    int pick = -1;
    for (int r = 0; r < PQntuples(res); r++) {
        bool mine = mh_pq_str(res, r, 0)[0] == 't';
        if (mine) {
            c->branch_exists = true;
            pick = r;
        } else if (pick < 0) {
            pick = r;
        }
    }
    if (c->has_expected) {
        const char *head = c->branch_exists ? mh_pq_str(res, pick, 1) : NULL;
        if (!head || strcmp(head, c->expected.s) != 0) {
            fail(c, 409, "stale_head", "branch '%s' is at %s, not at expected_head %s", c->branch,
                 head ? head : "(no branch)", c->expected.s);
            return;
        }
    }
    if (pick >= 0) {
        const char *head = mh_pq_str(res, pick, 1), *snap = mh_pq_str(res, pick, 2);
        if (mh_pq_isnull(res, pick, 2) || mh_pq_isnull(res, pick, 4) || !mh_id_valid(head, strlen(head)) ||
            !mh_id_valid(snap, strlen(snap))) {
            mh_error("req %s: commit: head %s of %s has no commit or snapshot row", c->req->id, head, c->repo->repo_id);
            fail(c, 500, "internal", "the branch head's commit or snapshot is missing");
            return;
        }
        c->has_parent = true;
        memcpy(c->parent.s, head, MH_ID_SIZE);
        memcpy(c->parent_snap.s, snap, MH_ID_SIZE);
        c->parent_gen = mh_pq_int(res, pick, 3);
        c->parent_depth = mh_pq_int(res, pick, 4);
    }
    c->state = c->has_parent ? C_MANIFEST : C_BUILD;
    advance(c);
}

static void manifest_cb(void *ud, int err, const char *why)
{
    commit_t *c = ud;
    c->busy = false;
    if (err) {
        mh_error("req %s: commit: manifest of %s: %s (%s)", c->req->id, c->parent_snap.s, mh_strerror(err),
                 why ? why : "");
        fail(c, err == MH_EDBDOWN || err == MH_ETIMEDOUT || err == MH_ENOMEM ? 503 : 500,
             err == MH_ENOMEM || err == MH_EDBDOWN || err == MH_ETIMEDOUT ? "unavailable" : "internal",
             "cannot rebuild the manifest of the branch head");
        return;
    }
    c->state = C_BUILD;
    advance(c);
}

static int cmp_id_key(const void *key, const void *elem)
{
    return memcmp(key, ((const cblob_t *)elem)->id, MH_ID_LEN);
}

static void known_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    commit_t *c = ud;
    c->busy = false;
    if (err) {
        fail_db(c, err, errmsg);
        return;
    }
    for (int r = 0; r < PQntuples(res); r++) {
        const char *id = mh_pq_str(res, r, 0);
        if (strlen(id) != MH_ID_LEN) continue;
        cblob_t *b = bsearch(id, c->blobs, c->nblobs, sizeof *c->blobs, cmp_id_key);
        if (b) b->known = true;
    }
    c->npack = 0;
    uint64_t bytes = 0;
    for (size_t i = 0; i < c->nblobs; i++)
        if (!c->blobs[i].known) {
            c->npack++;
            bytes += c->blobs[i].len;
        }
    if (c->npack && bytes > c->hub->cfg->max_mpack_bytes) {
        fail(c, 413, "too_large", "the new contents (%llu bytes) exceed the largest pack (%llu bytes)",
             (unsigned long long)bytes, (unsigned long long)c->hub->cfg->max_mpack_bytes);
        return;
    }
    c->state = c->npack ? C_PACK : C_ACQUIRE;
    advance(c);
}

static void acquire_cb(void *ud, mh_dbconn_t *conn, int err)
{
    commit_t *c = ud;
    c->busy = false;
    if (err) {
        fail_db(c, err, "no connection");
        return;
    }
    c->conn = conn;
    c->state = C_BEGIN;
    advance(c);
}

static void step_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    commit_t *c = ud;
    c->busy = false;
    if (err) {
        fail_db(c, err, errmsg);
        return;
    }
    c->state++;
    advance(c);
}

static void lock_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    commit_t *c = ud;
    c->busy = false;
    if (err) {
        fail_db(c, err, errmsg);
        return;
    }
    if (mh_pq_int(results[0], 0, 0) != 1) {
        fail(c, 404, "not_found", "the repository was deleted");
        return;
    }
    if (c->branch_exists) {
        /* The last statement read the branch row FOR UPDATE: under READ
         * COMMITTED a row a concurrent writer changed is re-read at its
         * newest version once that writer commits. */
        PGresult *r = results[n - 1];
        const char *head = PQntuples(r) ? mh_pq_str(r, 0, 0) : NULL;
        if (!head || strcmp(head, c->parent.s) != 0) {
            fail(c, 409, "stale_head", "branch '%s' moved to %s while this commit was built on %s; retry", c->branch,
                 head ? head : "(deleted)", c->parent.s);
            return;
        }
    }
    c->state = c->npack ? C_PUT : C_WRITE;
    advance(c);
}

static void put_cb(void *ud, int err)
{
    commit_t *c = ud;
    c->busy = false;
    if (err) {
        mh_error("req %s: commit: storing %s: %s", c->req->id, c->pack_key, mh_strerror(err));
        fail(c, 503, "store_unavailable", "cannot store the pack: %s", mh_strerror(err));
        return;
    }
    c->state = C_WRITE;
    advance(c);
}

static void write_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    commit_t *c = ud;
    c->busy = false;
    if (err) {
        fail_db(c, err, errmsg);
        return;
    }
    /* The last statement bumps state_seq (the row is locked: it exists). */
    if (PQntuples(results[n - 1]) != 1) {
        fail(c, 404, "not_found", "repository not found");
        return;
    }
    c->state = C_COMMIT;
    advance(c);
}

/* ========================================================== TX writes */

/* The same key space as the jobs module's pack lock (GC, index, sweep
 * take it before they put, move or delete a pack): a sweep can never
 * delete the bytes of a pack this transaction is about to reference. */
#define SQL_LOCK_MPACK "SELECT pg_advisory_xact_lock(hashtextextended('musehub:mpack:' || $1::text, 0))"

static void start_lock(commit_t *c)
{
    mh_arena_t *a = &c->work;
    mh_db_pq_t *qs = mh_alloc(a, 3 * sizeof *qs);
    const char **v = mh_alloc(a, 4 * sizeof *v);
    if (!qs || !v) {
        fail(c, 503, "unavailable", "out of memory");
        return;
    }
    v[0] = c->pack_id.s;
    v[1] = c->repo->repo_id;
    v[2] = c->branch;
    v[3] = c->cid.s;
    int n = 0;
    /* The repository row first, as every writer of ref rows does (push,
     * the jobs, repository deletion: sql/0007): it serialises writers of
     * one repository in one lock order, and proves the row still exists. */
    qs[n++] = (mh_db_pq_t){NULL, "SELECT count(*) FROM (SELECT 1 FROM repos WHERE repo_id = $1 FOR UPDATE) r", 1,
                           v + 1, NULL, NULL};
    if (c->npack) qs[n++] = (mh_db_pq_t){NULL, SQL_LOCK_MPACK, 1, v, NULL, NULL};
    if (c->branch_exists)
        qs[n++] = (mh_db_pq_t){NULL, "SELECT head_commit_id FROM branches WHERE repo_id = $1 AND name = $2 FOR UPDATE",
                               2, v + 1, NULL, NULL};
    else /* concurrent creators collide on the primary key: 409 for the loser */
        qs[n++] = (mh_db_pq_t){NULL, "INSERT INTO branches (repo_id, name, head_commit_id) VALUES ($1, $2, $3)", 3,
                               v + 1, NULL, NULL};
    c->busy = true;
    mh_dbconn_pipeline(c->conn, qs, n, lock_cb, c);
}

static void start_write(commit_t *c)
{
    mh_arena_t *a = &c->work;
    mh_db_pq_t *qs = mh_alloc(a, 12 * sizeof *qs);
    const char **vs = mh_alloc(a, 7 * sizeof *vs), **vc = mh_alloc(a, 9 * sizeof *vc),
               **vp = mh_alloc(a, 4 * sizeof *vp), **vr = mh_alloc(a, 3 * sizeof *vr);
    int *ls = mh_calloc(a, 7 * sizeof *ls), *fs = mh_calloc(a, 7 * sizeof *fs);
    char *entries = mh_sprintf(a, "%zu", c->entry_count), *depth = mh_sprintf(a, "%lld", (long long)c->depth);
    char *gen = mh_sprintf(a, "%lld", (long long)c->gen), *psize = mh_sprintf(a, "%zu", c->pack.len);
    if (!qs || !vs || !vc || !vp || !vr || !ls || !fs || !entries || !depth || !gen || !psize) {
        fail(c, 503, "unavailable", "out of memory");
        return;
    }
    int n = 0;
    if (c->new_snapshot) {
        /* Deltas are binary parameters: no hex round trip. */
        vs[0] = c->sid.s;
        vs[1] = c->has_parent ? c->parent_snap.s : NULL;
        vs[2] = (const char *)c->up.p;
        ls[2] = (int)c->up.len;
        fs[2] = 1;
        vs[3] = (const char *)c->rm.p;
        ls[3] = (int)c->rm.len;
        fs[3] = 1;
        vs[4] = entries;
        vs[5] = depth;
        vs[6] = c->checkpoint ? (const char *)c->cp.p : NULL;
        ls[6] = c->checkpoint ? (int)c->cp.len : 0;
        fs[6] = 1;
        qs[n++] = (mh_db_pq_t){NULL,
                               "INSERT INTO snapshots (snapshot_id, parent_snapshot_id, delta_upsert, delta_remove,"
                               " entry_count, depth, checkpoint) VALUES ($1, $2, $3, $4, $5::int, $6::int, $7)"
                               " ON CONFLICT DO NOTHING",
                               7, vs, ls, fs};
    }
    vc[0] = c->cid.s;
    vc[1] = c->has_parent ? c->parent.s : NULL;
    vc[2] = c->sid.s;
    vc[3] = c->message;
    vc[4] = c->author;
    vc[5] = c->committed_at;
    vc[6] = c->branch;
    vc[7] = gen;
    vc[8] = c->repo->repo_id;
    qs[n++] = (mh_db_pq_t){NULL,
                           "INSERT INTO commits (commit_id, parent_commit_id, snapshot_id, message, author,"
                           " committed_at, branch, generation) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::int)"
                           " ON CONFLICT DO NOTHING",
                           8, vc, NULL, NULL};
    /* ref rows (repo, commit, snapshot) */
    /* Every vector holds exactly the parameters its statement names:
     * PostgreSQL cannot type a parameter a statement never uses. */
    vr[0] = c->repo->repo_id;
    vr[1] = c->cid.s;
    vr[2] = c->branch;
    const char **vsr = mh_alloc(a, 2 * sizeof *vsr);
    if (!vsr) {
        fail(c, 503, "unavailable", "out of memory");
        return;
    }
    vsr[0] = c->repo->repo_id;
    vsr[1] = c->sid.s;
    /* The branch is this repository's own (per-repository metadata,
     * sql/0008). */
    qs[n++] = (mh_db_pq_t){NULL,
                           "INSERT INTO commit_refs (repo_id, commit_id, branch) VALUES ($1, $2, $3)"
                           " ON CONFLICT DO NOTHING",
                           3, vr, NULL, NULL};
    qs[n++] = (mh_db_pq_t){NULL,
                           "INSERT INTO snapshot_refs (repo_id, snapshot_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", 2,
                           vsr, NULL, NULL};
    if (c->npack) {
        vp[0] = c->pack_id.s;
        vp[1] = psize;
        vp[2] = c->pack_id.s;
        vp[3] = c->repo->repo_id;
        /* A pack GC superseded earlier is live again once referenced. */
        qs[n++] = (mh_db_pq_t){NULL,
                               "INSERT INTO mpacks (mpack_id, size_bytes, kind) VALUES ($1, $2::bigint, 'commit')"
                               " ON CONFLICT (mpack_id) DO UPDATE SET superseded_at = NULL"
                               " WHERE mpacks.superseded_at IS NOT NULL",
                               2, vp, NULL, NULL};
        qs[n++] = (mh_db_pq_t){NULL,
                               "INSERT INTO mpack_refs (repo_id, mpack_id) VALUES ($2, $1) ON CONFLICT DO NOTHING", 2,
                               vp + 2, NULL, NULL};
        const char **vo = mh_alloc(a, 4 * sizeof *vo);
        if (!vo) {
            fail(c, 503, "unavailable", "out of memory");
            return;
        }
        vo[0] = c->pack_id.s;
        vo[1] = c->arr_ids;
        vo[2] = c->arr_off;
        vo[3] = c->arr_len;
        qs[n++] = (mh_db_pq_t){NULL,
                               "INSERT INTO objects (object_id, size_bytes, storage_uri)"
                               " SELECT t.id, t.len, 'mpack://' || $1::text || '#' || t.off || ':' || t.len"
                               " FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS t(id, off, len)"
                               " ON CONFLICT DO NOTHING",
                               4, vo, NULL, NULL};
        qs[n++] = (mh_db_pq_t){NULL,
                               "INSERT INTO mpack_index (object_id, mpack_id, byte_offset, byte_length)"
                               " SELECT t.id, $1::text, t.off, t.len"
                               " FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS t(id, off, len)"
                               " ON CONFLICT DO NOTHING",
                               4, vo, NULL, NULL};
        const char **vor = mh_alloc(a, 2 * sizeof *vor);
        if (!vor) {
            fail(c, 503, "unavailable", "out of memory");
            return;
        }
        vor[0] = c->repo->repo_id;
        vor[1] = c->arr_ids;
        qs[n++] = (mh_db_pq_t){NULL,
                               "INSERT INTO object_refs (repo_id, object_id) SELECT $1::text, unnest($2::text[])"
                               " ON CONFLICT DO NOTHING",
                               2, vor, NULL, NULL};
    }
    if (c->branch_exists) /* locked FOR UPDATE in LOCK; a new branch was inserted there */
        qs[n++] = (mh_db_pq_t){NULL,
                               "UPDATE branches SET head_commit_id = $2, updated_at = now() WHERE repo_id = $1 AND name = $3",
                               3, vr, NULL, NULL};
    qs[n++] = (mh_db_pq_t){NULL,
                           "UPDATE repos SET state_seq = state_seq + 1, updated_at = now() WHERE repo_id = $1"
                           " RETURNING state_seq",
                           1, vr, NULL, NULL};
    c->busy = true;
    mh_dbconn_pipeline(c->conn, qs, n, write_cb, c);
}

/* ============================================================ advance */

static void respond(commit_t *c)
{
    mh_req_t *req = c->req;
    mh_arena_t *a = &req->arena;
    mh_val_t *m = mh_v_map(a), *parents = mh_v_arr(a);
    int rc = m && parents ? 0 : MH_ENOMEM;
    if (!rc && c->has_parent) rc = mh_arr_push(a, parents, mh_v_str(c->parent.s));
    if (!rc) rc = mh_map_put(a, m, "commit_id", mh_v_str(c->cid.s));
    if (!rc) rc = mh_map_put(a, m, "snapshot_id", mh_v_str(c->sid.s));
    if (!rc) rc = mh_map_put(a, m, "mpack_id", c->npack ? mh_v_str(c->pack_id.s) : mh_v_nil());
    if (!rc) rc = mh_map_put(a, m, "branch", mh_v_str(c->branch));
    if (!rc) rc = mh_map_put(a, m, "parent_ids", *parents);
    if (!rc) rc = mh_map_put(a, m, "author", mh_v_str(c->author));
    if (!rc) rc = mh_map_put(a, m, "committed_at", mh_v_str(c->committed_at));
    if (!rc) rc = mh_map_put(a, m, "generation", mh_v_int(c->gen));
    if (!rc) rc = mh_map_put(a, m, "blobs_written", mh_v_uint(c->npack));
    if (rc) mh_res_error(req, 503, "unavailable", "out of memory");
    else mh_res_val(req, 201, m);
}

static void advance(commit_t *c)
{
    mh_req_t *req = c->req;
    mh_hub_t *hub = c->hub;
    while (!c->busy && c->state != C_DONE) {
        if (mh_log_level_current <= MH_LOG_DEBUG)
            mh_debug("req %s: commit state %d at %.1f ms", req->id, (int)c->state, (double)(mh_now_us() - c->t0) / 1000.0);
        switch (c->state) {
        case C_PARSE:
            c->busy = true;
            c->uvw.data = c;
            uv_queue_work(hub->loop, &c->uvw, parse_work, work_done_cb); /* -> C_HEADS */
            break;
        case C_HEADS: {
            if (!c->author) {
                const mh_caller_t *caller = mh_req_caller(req);
                c->author = (char *)(caller->handle ? caller->handle : "anonymous");
            }
            c->busy = true;
            const char *vals[3] = {c->repo->repo_id, c->branch, c->repo->default_branch};
            mh_db_query(hub->db,
                        "SELECT b.name = $2, b.head_commit_id, c.snapshot_id, c.generation, s.depth"
                        " FROM branches b LEFT JOIN commits c ON c.commit_id = b.head_commit_id"
                        " LEFT JOIN snapshots s ON s.snapshot_id = c.snapshot_id"
                        " WHERE b.repo_id = $1 AND b.name IN ($2, $3)",
                        3, vals, NULL, NULL, heads_cb, c);
            break;
        }
        case C_MANIFEST:
            c->busy = true;
            mh_hub_load_manifest(hub, &c->work, c->parent_snap.s, &c->base, manifest_cb, c);
            break;
        case C_BUILD:
            c->busy = true;
            c->uvw.data = c;
            uv_queue_work(hub->loop, &c->uvw, build_work, work_done_cb); /* -> C_KNOWN */
            break;
        case C_KNOWN: {
            if (!c->nblobs) {
                c->state = C_ACQUIRE;
                break;
            }
            const char **ids = mh_alloc(&c->work, c->nblobs * sizeof *ids);
            if (!ids) {
                fail(c, 503, "unavailable", "out of memory");
                return;
            }
            for (size_t i = 0; i < c->nblobs; i++) ids[i] = c->blobs[i].id;
            const char *vals[2] = {c->repo->repo_id, mh_pq_array(&c->work, ids, c->nblobs, MH_ID_LEN)};
            if (!vals[1]) {
                fail(c, 503, "unavailable", "out of memory");
                return;
            }
            c->busy = true;
            mh_db_query(hub->db, "SELECT object_id FROM object_refs WHERE repo_id = $1 AND object_id = ANY ($2::text[])",
                        2, vals, NULL, NULL, known_cb, c);
            break;
        }
        case C_PACK:
            c->busy = true;
            c->uvw.data = c;
            uv_queue_work(hub->loop, &c->uvw, pack_work, work_done_cb); /* -> C_ACQUIRE */
            break;
        case C_ACQUIRE:
            c->busy = true;
            mh_db_acquire(hub->db, acquire_cb, c);
            break;
        case C_BEGIN:
            c->busy = true;
            mh_dbconn_script(c->conn, "BEGIN", step_cb, c); /* -> C_LOCK */
            break;
        case C_LOCK:
            start_lock(c);
            if (c->state == C_DONE) return;
            break;
        case C_PUT:
            c->busy = true;
            mh_store_put(hub->store, c->pack_key, c->pack.p, c->pack.len, put_cb, c);
            break;
        case C_WRITE:
            start_write(c);
            if (c->state == C_DONE) return;
            break;
        case C_COMMIT:
            c->busy = true;
            mh_dbconn_script(c->conn, "COMMIT", step_cb, c); /* -> C_COMMITTED */
            break;
        case C_COMMITTED:
            mh_dbconn_release(c->conn);
            c->conn = NULL;
            c->state = C_DONE;
            mh_fetch_cache_invalidate(hub, c->repo->repo_id);
            /* The next commit on this branch starts from this manifest. */
            mh_hub_manifest_cache_put(hub, c->sid.s, &c->m);
            mh_info("req %s: commit %s on %s/%s branch %s: %zu files, %zu new blobs%s%s, %llu ms", req->id, c->cid.s,
                    c->repo->owner, c->repo->slug, c->branch, c->entry_count, c->npack, c->npack ? " in " : "",
                    c->npack ? c->pack_id.s : "", (unsigned long long)((mh_now_us() - c->t0) / 1000));
            respond(c);
            return;
        case C_DONE:
            break;
        }
    }
}

/* ============================================ PARSE (thread pool) */

/* Decoding a large body takes a while (jansson reads ~65 MB/s of JSON
 * strings), so it runs on the thread pool, after the permission check:
 * an anonymous or read-only caller never costs a parse. */

#define BAD(code, ...)                                                         \
    do {                                                                       \
        c->work_status = 422;                                                  \
        c->work_code = (code);                                                 \
        c->work_why = mh_sprintf(a, __VA_ARGS__);                              \
        return;                                                                \
    } while (0)

static void parse_work(uv_work_t *w)
{
    commit_t *c = w->data;
    mh_req_t *req = c->req;
    mh_arena_t *a = &c->work;
    mh_val_t *body = mh_alloc(a, sizeof *body);
    if (!body) {
        c->work_status = 503;
        return;
    }
    const char *why = NULL;
    int rc = 0;
    if (req->body.len == 0) *body = (mh_val_t){.t = MH_V_MAP};
    else if (c->msgpack) rc = mh_msgpack_decode(a, req->body.p, req->body.len, NULL, body, &why);
    else rc = mh_json_decode(a, req->body.p, req->body.len, NULL, body, &why);
    if (rc == MH_ENOMEM) {
        c->work_status = 413;
        c->work_code = "too_large";
        c->work_why = "the body is too large to decode";
        return;
    }
    if (rc)
        BAD("invalid_body", "cannot decode the %s body: %s", c->msgpack ? "msgpack" : "JSON",
            why ? why : mh_strerror(rc));
    if (body->t != MH_V_MAP) BAD("invalid_body", "the body must be a map");

    const mh_val_t *br = mh_val_get(body, "branch");
    if (!br || br->t != MH_V_STR || !mh_branch_valid(br->v.s.p, br->v.s.n))
        BAD("invalid_field", "'branch' must be a valid branch name");
    memcpy(c->branch, br->v.s.p, br->v.s.n);
    c->branch[br->v.s.n] = 0;

    c->message = text_field(a, mh_val_get(body, "message"), MAX_MESSAGE, true);
    if (!c->message)
        BAD("invalid_field", "'message' must be a UTF-8 string of at most %d bytes without NUL", MAX_MESSAGE);
    const mh_val_t *au = mh_val_get(body, "author");
    if (au && au->t != MH_V_NIL && !(c->author = text_field(a, au, MAX_AUTHOR, false)))
        BAD("invalid_field", "'author' must be a UTF-8 string of 1..%d bytes without NUL", MAX_AUTHOR);

    const mh_val_t *ex = mh_val_get(body, "expected_head");
    if (ex && ex->t != MH_V_NIL) {
        if (ex->t != MH_V_STR || !mh_id_valid(ex->v.s.p, ex->v.s.n))
            BAD("invalid_id", "'expected_head' must be sha256:<64 lowercase hex>");
        memcpy(c->expected.s, ex->v.s.p, MH_ID_LEN);
        c->expected.s[MH_ID_LEN] = 0;
        c->has_expected = true;
    }

    c->files = mh_val_get(body, "files");
    if (!c->files || c->files->t != MH_V_MAP) BAD("invalid_field", "'files' must be a map of path -> contents");
    for (uint32_t i = 0; i < c->files->v.m.n; i++) {
        const mh_kv_t *f = &c->files->v.m.kv[i];
        if (f->k.t != MH_V_STR || !mh_path_valid(f->k.v.s.p, f->k.v.s.n))
            BAD("invalid_path", "files: '%.*s' is not a valid path",
                f->k.t == MH_V_STR ? (int)(f->k.v.s.n > 200 ? 200 : f->k.v.s.n) : 0,
                f->k.t == MH_V_STR ? f->k.v.s.p : "");
        if (f->v.t != MH_V_BIN && f->v.t != MH_V_STR)
            BAD("invalid_field", "files['%.*s']: contents must be bytes (msgpack bin) or a base64 string",
                (int)f->k.v.s.n, f->k.v.s.p);
    }
    const mh_val_t *rm = mh_val_get(body, "remove");
    if (rm && rm->t != MH_V_NIL) {
        if (rm->t != MH_V_ARR) BAD("invalid_field", "'remove' must be an array of paths");
        for (uint32_t i = 0; i < rm->v.a.n; i++) {
            const mh_val_t *pv = &rm->v.a.items[i];
            if (pv->t != MH_V_STR || !mh_path_valid(pv->v.s.p, pv->v.s.n))
                BAD("invalid_path", "remove[%u] is not a valid path", i);
        }
        c->remove = rm;
    }
}
#undef BAD

/* ============================================================ handler */

static void commit_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    commit_t *c = req->user;
    c->repo = repo;
    c->state = C_PARSE;
    advance(c);
}

void mh_h_repo_commit_create(mh_req_t *req)
{
    commit_t *c = mh_calloc(&req->arena, sizeof *c);
    if (!c || mh_arena_defer(&req->arena, commit_cleanup_cb, c)) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    c->req = req;
    c->hub = req->app;
    c->t0 = mh_now_us();
    mh_arena_init(&c->work, WORK_ARENA_LIMIT);
    c->msgpack = body_is_msgpack(req);
    req->user = c;
    mh_hub_load_repo(req, MH_PERM_WRITE, commit_repo_cb);
}
