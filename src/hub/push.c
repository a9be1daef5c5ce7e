/*
 * push.c — the three push steps of SPEC 4.3: presign (a grant to upload
 * one pack to a private staging key), the upload itself (store_routes.c
 * for fs; the store for s3), and unpack.
 *
 * Unpack is an operation of the step kit (mh/step.h); its step table is
 * the protocol:
 *
 *   LOOKUP  the grants (upload.c): a pack this repository references whose
 *           head it knows needs no pack work (a re-push): straight to the
 *           transaction
 *   LOCATE  which staged bytes: any grant with a completed upload
 *   STREAM  the pack read in store windows through the pack reader on the
 *           thread pool, the pack hash beside it on a second thread, every
 *           blob against its id, every v2 frame within its bounds, within
 *           the pack-memory budget (upload.c); only metadata and blob
 *           records are kept
 *   INDEX   thread pool: the pack's entries by id, the ids it names outside
 *           itself (push_check.c)
 *   CONTEXT what this repository holds of those: commits (generations),
 *           snapshots (depths), objects (the ghost guard), the head
 *   BASES   the stored manifests pack snapshots are deltas against
 *   PREPARE thread pool: commit ids, parents, generations; the commit,
 *           object and frame COPY rows
 *   CHARGE  those rows reserved from the budget too
 *   MARK    the grant's upload is verified (before it leaves its key)
 *   REBUILD thread pool, in the background: manifests, snapshot ids,
 *           ghost guard, the snapshot COPY rows, in chunks: the first work
 *           item builds up to 1/8 of the budget (most pushes: all of it),
 *           each later one a chunk of 1/256, queued once the last is
 *           handed to its COPY: at most three chunks exist (being built,
 *           built, being copied), whatever the history's length
 *   the transaction (refwrite's lock order), meanwhile: ACQUIRE, BEGIN
 *           (repository row, pack lock, temporary tables), COPY commits,
 *           objects, frames, INSERT (commit rows and refs, the pack's
 *           index, frames and object refs); then CHARGE_SNAPSHOTS (the
 *           first chunk as built, plus six chunks if more follow,
 *           reserved without waiting, else the transaction is rolled
 *           back, the memory waited for and the transaction started
 *           over), COPY_SNAPSHOTS (a COPY per
 *           chunk, as each is built), JOIN (the rebuild's verdict),
 *           INSERT_SNAPSHOTS, CHECK (the branch row locked and the move
 *           judged: compare-and-swap, fast-forward, protection), PLACE
 *           (the pack to mpacks/<hex>, under its lock, once the move is
 *           accepted), WRITE (the move, state_seq, the grant consumed),
 *           COMMIT -> DONE
 *
 * Invariants: nothing is committed to PostgreSQL unless every check
 * passed (the transaction's first statements, and the COPY of the first
 * chunks of snapshot rows, run while the snapshots are still being
 * checked; a failed check rolls them back), and everything is
 * written in one transaction; the operation never ends (answers, frees)
 * while REBUILD runs on its thread; the staged pack is
 * never exposed under mpacks/ before its hash was checked, nor before the
 * transaction holds the branch and has judged the move (a refused push
 * leaves its upload staged, for a retry under the grant); an operation
 * that fails after the move takes the upload back (mh_rw_upload_unplace);
 * a grant is only consumed by the transaction that moves the branch.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub_internal.h"

/* ============================================================ presign */

typedef struct {
    mh_req_t *req;
    mh_id_t key;
    uint8_t sha[32];
    uint64_t size;
    char size_s[24];
    char grant_id[33];
    char staging_key[48];
} presign_t;

static void presign_done(void *ud, PGresult *res, int err, const char *errmsg)
{
    presign_t *p = ud;
    mh_req_t *req = p->req;
    mh_hub_t *hub = req->app;
    if (!mh__db_ok(req, err, errmsg)) return;
    bool present = mh_pq_str(res, 0, 0)[0] == 't';
    char *url = NULL;
    if (!present) {
        int rc = mh_store_presign(hub->store, &req->arena, "PUT", p->staging_key, p->size, p->sha,
                                  hub->cfg->presign_ttl, &url);
        if (rc) {
            mh_res_fail(req, rc, "presigning the upload");
            return;
        }
    }
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b), u = url ? mh_v_str(url) : mh_v_nil();
    mh_vb_put(b, m, "upload_url", u);
    mh_vb_put(b, m, "uploadUrl", u);
    mh_vb_put(b, m, "mpack_key", mh_v_str(p->key.s));
    mh_vb_put(b, m, "expires_in", mh_v_int(hub->cfg->presign_ttl));
    mh_vb_put(b, m, "already_present", mh_v_bool(present));
    mh_res_val(req, 200, m);
}

static void presign_repo_cb(mh_req_t *req, mh_repo_t *repo)
{
    mh_hub_t *hub = req->app;
    presign_t *p = req->user;
    /* One statement: a re-push of a pack this repository already
     * references needs no upload (and gets no grant); otherwise record
     * the grant. A pack known only to other repositories must be uploaded
     * again (SPEC 4.3: naming a hash proves nothing). */
    char ttl[16];
    snprintf(ttl, sizeof ttl, "%u", hub->cfg->presign_ttl);
    const char *vals[7] = {repo->repo_id, p->key.s,       p->grant_id, mh_req_caller(req)->identity_id.s,
                           p->size_s,     p->staging_key, ttl};
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
    presign_t *p = mh__req_alloc(req, sizeof *p);
    if (!p) return;
    p->req = req;
    if (!mh__body_map(req, &body) || !mh__body_id(req, &body, "mpack_key", true, &p->key, NULL)) return;
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
    snprintf(p->size_s, sizeof p->size_s, "%llu", (unsigned long long)p->size);
    uint8_t rnd[16];
    if (mh_random(rnd, sizeof rnd)) {
        mh_res_fail(req, MH_EIO, "no randomness");
        return;
    }
    mh_hex_encode(p->grant_id, rnd, sizeof rnd);
    snprintf(p->staging_key, sizeof p->staging_key, "incoming/%s", p->grant_id);
    req->user = p;
    mh_hub_load_repo(req, MH_PERM_WRITE, presign_repo_cb);
}

/* ============================================================= unpack */

typedef struct {
    mh__op_t op;
    /* request */
    mh_id_t key, head, expected_old;
    bool has_expected_old, force;
    char branch[256];
    /* the pack and its checks */
    mh_upload_t up;
    bool rerun; /* a re-push of a referenced pack whose head is known: no pack work */
    bool v2;    /* the pack has frames (mpack_frames rows) */
    mh_pack_limits_t lim;
    mh__unpack_t x;
    size_t next_base;
    /* REBUILD on the thread pool beside the transaction's first steps, one
     * chunk of snapshot rows per work item (push_check.c) */
    mh_arena_t rebuild_arena; /* REBUILD's allocations: the loop keeps to op.work meanwhile */
    uv_work_t rebuild;
    size_t rows_limit;    /* bytes of snapshot rows the next work item may build */
    size_t rows_chunk;    /* the limit of every item after the first */
    size_t first_cap;     /* the first chunk's reservation, given back once it is copied */
    int work_err;         /* the work item's result (written by the thread) */
    mh_buf_t ready;       /* a chunk built, waiting for its COPY */
    mh_buf_t copying;     /* the chunk the COPY in flight reads */
    bool rebuilding;      /* a REBUILD work item is on the thread pool */
    bool waiting;         /* a step waits for it (its rows, or its end) */
    bool finish_deferred; /* the operation ended first: finish once it is back */
    bool snaps_charged;   /* the snapshot rows are reserved from the budget */
    int rebuild_err;
    /* the transaction */
    mh_move_t mv;
    int64_t commits_written, snapshots_written;
    int i_commits, i_snapshots;
} unpack_t;

#define U(s) MH_STEP_OP(s, unpack_t, op.step)

enum {
    U_LOOKUP,
    U_LOCATE,
    U_STREAM,
    U_INDEX,
    U_CONTEXT,
    U_BASES,
    U_PREPARE,
    U_CHARGE,
    U_MARK,
    U_REBUILD,
    U_ACQUIRE,
    U_BEGIN,
    U_COPY_COMMITS,
    U_COPY_OBJECTS,
    U_COPY_FRAMES,
    U_INSERT,
    U_CHARGE_SNAPSHOTS,
    U_COPY_SNAPSHOTS,
    U_JOIN,
    U_INSERT_SNAPSHOTS,
    U_CHECK,
    U_PLACE,
    U_WRITE,
    U_COMMIT,
    U_DONE,
};

/* --- LOOKUP, LOCATE, STREAM: which bytes this repository may import */

static void step_lookup(mh_step_t *s)
{
    unpack_t *u = U(s);
    mh_rw_upload_init(&u->up, &u->op.work, u->op.repo->repo_id, u->key.s);
    u->up.head = u->head.s;
    mh_rw_upload_lookup(s, &u->up);
}

static void step_locate(mh_step_t *s)
{
    unpack_t *u = U(s);
    if (u->up.referenced && u->up.head_known) {
        /* Everything is referenced already: a re-run is a no-op apart from
         * the branch move (counts stay zero). */
        u->rerun = true;
        mh_step_goto(s, U_ACQUIRE);
        return;
    }
    /* A referenced pack whose history this repository lacks (an
     * mpack.index job ran, say) is unpacked in full from its final key:
     * the reference already is the right. */
    mh_rw_upload_locate(s, &u->up);
}

static void step_stream(mh_step_t *s)
{
    unpack_t *u = U(s);
    switch (u->up.outcome) {
    case MH_UPLOAD_READ:
        break;
    case MH_UPLOAD_NO_GRANT:
        mh_step_refuse(s, 404, "no_grant", "no push grant for %s in this repository (presign first)", u->key.s);
        return;
    case MH_UPLOAD_NOT_STAGED:
        mh_step_refuse(s, 404, "not_staged", "nothing was uploaded for %s under this repository's grant", u->key.s);
        return;
    case MH_UPLOAD_SIZE_MISMATCH:
        mh_step_refuse(s, 422, "size_mismatch", "the staged pack has %llu bytes, the grant says %llu",
                       (unsigned long long)u->up.size, (unsigned long long)u->up.grant->size);
        return;
    }
    mh_hub_t *hub = u->op.hub;
    u->lim = mh_pack_limits_default;
    u->lim.max_unpacked = hub->cfg->max_unpacked_bytes;
    mh_rw_stream_opts_t o = {hub->budget, &u->lim, 0};
    mh_rw_upload_stream(s, &u->up, &o);
}

/* --- INDEX (thread pool) */

static void index_work(mh_step_t *s)
{
    unpack_t *u = U(s);
    s->work_err = mh__unpack_index(&u->x);
    s->work_why = u->x.why;
}

static void step_index(mh_step_t *s)
{
    unpack_t *u = U(s);
    u->x.pack = u->up.pack;
    u->v2 = u->up.pack->version == 2;
    mh_step_work(s, index_work);
}

/* --- CONTEXT: what this repository holds of the ids outside the pack */

/* Column 0 of every row as ids (and column 1 as integers when out2). */
static const char **column(mh_arena_t *a, PGresult *res, size_t *n, int64_t **out2)
{
    int rows = PQntuples(res);
    const char **ids = mh_alloc(a, (size_t)(rows + 1) * sizeof *ids);
    int64_t *v = out2 ? mh_alloc(a, (size_t)(rows + 1) * sizeof *v) : NULL;
    if (!ids || (out2 && !v)) return NULL;
    for (int i = 0; i < rows; i++) {
        if (!(ids[i] = mh_strdup(a, mh_pq_str(res, i, 0)))) return NULL;
        if (v) v[i] = mh_pq_int(res, i, 1);
    }
    *n = (size_t)rows;
    if (out2) *out2 = v;
    return ids;
}

static int context_read(mh_step_t *s, PGresult **res, int n)
{
    unpack_t *u = U(s);
    mh__unpack_t *x = &u->x;
    if (n != 4) return MH_EDB;
    x->have_commits = column(&u->op.work, res[0], &x->nhave_commits, &x->have_gen);
    x->have_snaps = column(&u->op.work, res[1], &x->nhave_snaps, &x->have_depth);
    x->have_objects = column(&u->op.work, res[2], &x->nhave_objects, NULL);
    if (!x->have_commits || !x->have_snaps || !x->have_objects) return MH_ENOMEM;
    if (!x->head_in_pack && PQntuples(res[3]) == 0) {
        mh_step_refuse(s, 422, "unknown_head", "head %s is neither in the pack nor in this repository", u->head.s);
        return 0;
    }
    return mh__unpack_bases(x);
}

static void step_context(mh_step_t *s)
{
    unpack_t *u = U(s);
    mh__unpack_t *x = &u->x;
    mh_arena_t *a = &u->op.work;
    const char *parents = mh_pq_array(a, x->ext_parents.ids, x->ext_parents.n, MH_ID_LEN);
    const char *snaps = mh_pq_array(a, x->ext_snaps.ids, x->ext_snaps.n, MH_ID_LEN);
    const char *objs = mh_pq_array(a, x->ext_objects.ids, x->ext_objects.n, MH_ID_LEN);
    if (!parents || !snaps || !objs) {
        mh_step_fail(s, MH_ENOMEM, "context");
        return;
    }
    const char *repo = u->op.repo->repo_id;
    mh_db_batch_t b = {0};
    /* The ids are looked up one by one in the global table, then probed
     * in the repository's refs by their whole key (OFFSET 0: no join the
     * planner could turn into a scan of all the repository's refs when
     * its statistics are stale): the cost follows the ids asked, not the
     * repository (issue 20). */
    mh_db_batch_add(&b,
                    "SELECT c.commit_id, c.generation FROM commits c WHERE c.commit_id = ANY ($2::text[])"
                    " AND EXISTS (SELECT 1 FROM commit_refs r WHERE r.repo_id = $1 AND r.commit_id = c.commit_id"
                    " OFFSET 0)",
                    2, repo, parents);
    mh_db_batch_add(&b,
                    "SELECT s.snapshot_id, s.depth FROM snapshots s WHERE s.snapshot_id = ANY ($2::text[])"
                    " AND EXISTS (SELECT 1 FROM snapshot_refs r WHERE r.repo_id = $1 AND r.snapshot_id = s.snapshot_id"
                    " OFFSET 0)",
                    2, repo, snaps);
    mh_db_batch_add(&b,
                    "SELECT u.id FROM unnest ($2::text[]) AS u(id) WHERE " MH_SQL_HOLDS_BLOB("$1", "u.id"),
                    2, repo, objs);
    mh_db_batch_add(&b, "SELECT 1 FROM commit_refs WHERE repo_id = $1 AND commit_id = $2", 2, repo, u->head.s);
    mh_step_batch(s, &b, context_read);
}

/* --- BASES: one stored manifest at a time */

static void step_bases(mh_step_t *s)
{
    unpack_t *u = U(s);
    if (u->next_base >= u->x.nbases) return;
    mh__base_t *b = &u->x.bases[u->next_base++];
    b->loaded = true; /* the step fails if the load does */
    mh_step_goto(s, U_BASES);
    mh_step_wait(s);
    mh_hub_load_manifest(u->op.hub, &u->op.work, b->id, &b->m, mh__manifest_step_cb, s);
}

/* --- PREPARE (thread pool), CHARGE, MARK */

static void prepare_work(mh_step_t *s)
{
    unpack_t *u = U(s);
    s->work_err = mh__unpack_prepare(&u->x);
    s->work_why = u->x.why;
}

static void step_prepare(mh_step_t *s) { mh_step_work(s, prepare_work); }

/* Snapshot rows (a long history's checkpoints are whole manifests: 448 MB
 * of rows for 82,000 commits of a 6,500-file tree) are built and copied
 * in chunks. The first work item, which runs beside the transaction's
 * first steps, may build up to 1/8 of the pack-memory budget (16 KiB to
 * 32 MiB): most pushes end there, in one piece, as before; a longer one
 * goes on in chunks of 1/256 of the budget (16 KiB to 1 MiB), one built
 * while the last is copied. CHARGE_SNAPSHOTS reserves the first chunk as
 * built plus, when more follow, six chunks (three buffers at most, each
 * up to twice the chunk). */
#define ROWS_MIN (16u << 10)

static size_t rows_share(const unpack_t *u, uint64_t div, size_t max)
{
    uint64_t c = max;
    if (u->up.budget) {
        mh_budget_stats_t st;
        mh_budget_stats(u->up.budget, &st);
        c = st.total / div;
    }
    return c < ROWS_MIN ? ROWS_MIN : c > max ? max : (size_t)c;
}

static void step_charge(mh_step_t *s)
{
    unpack_t *u = U(s);
    mh__unpack_t *x = &u->x;
    u->rows_limit = rows_share(u, 8, 32u << 20);
    u->rows_chunk = rows_share(u, 256, 1u << 20);
    mh_rw_upload_charge(s, &u->up, x->commit_rows.cap + x->object_rows.cap + x->frame_rows.cap);
}

static void step_mark(mh_step_t *s) { mh_rw_upload_verified(s, &U(s)->up); }

/* --- REBUILD: on the thread pool while the loop runs the transaction
 * from ACQUIRE to INSERT (PostgreSQL inserting the commit, index and ref
 * rows on one core, the manifests rebuilt on the other), then beside
 * COPY_SNAPSHOTS, a chunk ahead of it; JOIN gives its verdict. Nothing is
 * visible before COMMIT, so a snapshot that fails its check rolls
 * everything back like any other refusal, chunks already copied
 * included. */

static void unpack_finish(mh_step_t *s);

static void rebuild_work(uv_work_t *w)
{
    unpack_t *u = w->data;
    u->work_err = mh__unpack_rebuild(&u->x, u->rows_limit);
}

static void rebuilt_cb(uv_work_t *w, int status);

/* Queues the next chunk's work when there is room for its rows: none in
 * flight, the last one's rows handed to a COPY (ready empty). */
static int rows_more(unpack_t *u)
{
    if (u->rebuilding || u->rebuild_err || u->x.rb.done || u->ready.len) return 0;
    u->x.snapshot_rows.len = 0; /* the thread's buffer: emptied, its capacity kept */
    u->rebuild.data = u;
    if (uv_queue_work(u->op.step.loop, &u->rebuild, rebuild_work, rebuilt_cb) != 0) return MH_ENOMEM;
    u->rebuilding = true;
    return 0;
}

/* A step that needs REBUILD further (its rows or its end) waits here;
 * rebuilt_cb runs it again. */
static void wait_rebuild(mh_step_t *s, int state)
{
    U(s)->waiting = true;
    mh_step_goto(s, state);
    mh_step_wait(s);
}

/* The reason that goes with the rebuild's verdict (an MH_EPARSE is 422
 * invalid_pack with the check's reason). */
static const char *rebuild_why(const unpack_t *u)
{
    return u->rebuild_err == MH_ECANCELED ? "cancelled" : u->x.why;
}

static void rebuilt_cb(uv_work_t *w, int status)
{
    unpack_t *u = w->data;
    mh_step_t *s = &u->op.step;
    u->rebuilding = false;
    /* The loop reads the verdict only from here (the thread wrote work_err). */
    if (u->work_err && !u->rebuild_err) u->rebuild_err = u->work_err;
    if (status && !u->rebuild_err) u->rebuild_err = MH_ECANCELED;
    u->rows_limit = u->rows_chunk;
    if (u->x.snapshot_rows.len) { /* the chunk built: ready for its COPY */
        mh_buf_t t = u->ready;
        u->ready = u->x.snapshot_rows;
        u->x.snapshot_rows = t;
    }
    if (u->finish_deferred) {
        /* The operation ended while the rebuild ran (a failed statement,
         * a refusal): its finish waited for the thread to let go. */
        unpack_finish(s);
        return;
    }
    if (!u->waiting) return;
    u->waiting = false;
    mh_step_resume(s, 0, NULL); /* the waiting step runs again */
}

static void step_rebuild(mh_step_t *s)
{
    unpack_t *u = U(s);
    /* From here on the loop leaves x->a to the thread. */
    u->x.a = &u->rebuild_arena;
    if (rows_more(u)) mh_step_fail(s, MH_ENOMEM, "cannot queue thread-pool work");
}

/* Ends the operation with the rebuild's verdict when it is a failure. */
static bool rebuild_failed(mh_step_t *s)
{
    unpack_t *u = U(s);
    if (u->rebuild_err) mh_step_fail(s, u->rebuild_err, rebuild_why(u));
    return u->rebuild_err != 0;
}

/* The rebuild's verdict, once every chunk is built and copied. */
static void step_join(mh_step_t *s) { rebuild_failed(s); }

/* The first chunk as built, and six chunks more unless it was the last:
 * reserved without waiting (see below). */
static void step_charge_snapshots(mh_step_t *s)
{
    unpack_t *u = U(s);
    if (u->rebuilding) {
        wait_rebuild(s, U_CHARGE_SNAPSHOTS);
        return;
    }
    if (rebuild_failed(s)) return;
    size_t need = u->ready.cap + (u->x.rb.done ? 0 : 6 * u->rows_chunk);
    if (u->snaps_charged || !u->up.budget || !need) return;
    u->first_cap = u->ready.cap;
    int rc = mh_budget_try_acquire(&u->up.mem, u->up.budget, need);
    if (rc != MH_EBUDGET) {
        u->snaps_charged = rc == 0;
        if (rc) mh_step_fail(s, rc, "the pack-memory budget");
        return;
    }
    /* Nothing waits for memory while holding the repository's row: the
     * transaction is given up, the memory waited for, and the
     * transaction started over (the first chunk stays built, in ready;
     * no chunk was copied yet). */
    mh_info("req %s: unpack: the snapshot rows (%zu bytes) wait for the pack-memory budget outside the transaction",
            u->op.req->id, need);
    mh_step_rollback(s);
    u->snaps_charged = true;
    mh_step_goto(s, U_ACQUIRE);
    mh_rw_upload_charge(s, &u->up, need);
}

/* --- the transaction */

static void step_begin(mh_step_t *s)
{
    unpack_t *u = U(s);
    /* Pushes to one repository serialise on its row for the length of
     * this transaction (the CPU-heavy checks ran before it); then the
     * pack's lock, which the sweep deletes superseded packs under. */
    unsigned tmp = MH_RW_COMMITS | MH_RW_SNAPSHOTS | MH_RW_OBJECTS | (u->v2 ? MH_RW_FRAMES : 0);
    mh_rw_begin(s, u->op.repo->repo_id, u->key.s, u->rerun ? 0 : tmp);
}

static void step_copy_commits(mh_step_t *s)
{
    unpack_t *u = U(s);
    if (u->rerun) { /* nothing to copy or insert: straight to the move */
        mh_step_goto(s, U_CHECK);
        return;
    }
    mh_rw_copy(s, MH_RW_COMMITS, &u->x.commit_rows);
}

static void step_copy_objects(mh_step_t *s) { mh_rw_copy(s, MH_RW_OBJECTS, &U(s)->x.object_rows); }

static void step_copy_frames(mh_step_t *s)
{
    if (U(s)->v2) mh_rw_copy(s, MH_RW_FRAMES, &U(s)->x.frame_rows);
}

/* A buffer whose chunk was copied goes back into the rotation, unless it
 * grew past two chunks (the first chunk, or a row larger than a chunk: a
 * checkpoint of a large tree): then it is freed, and the first chunk's
 * reservation given back. */
static void recycle(unpack_t *u)
{
    if (u->ready.cap <= 2 * u->rows_chunk) return;
    size_t give = u->ready.cap < u->first_cap ? u->ready.cap : u->first_cap;
    if (u->up.budget && give) mh_budget_shrink(&u->up.mem, give);
    u->first_cap -= give;
    mh_buf_free(&u->ready);
}

/* One COPY per chunk, in the order built, while the thread builds the
 * next: at most three chunks exist (being built, built, being copied). */
static void step_copy_snapshots(mh_step_t *s)
{
    unpack_t *u = U(s);
    if (rebuild_failed(s)) return;
    bool chunk = u->ready.len != 0;
    if (chunk) {
        mh_buf_t t = u->copying;
        u->copying = u->ready;
        u->ready = t;
        u->ready.len = 0;
        recycle(u);
    }
    if (rows_more(u)) { /* the next chunk is built while this one is copied */
        mh_step_fail(s, MH_ENOMEM, "cannot queue thread-pool work");
        return;
    }
    if (chunk) {
        mh_step_goto(s, U_COPY_SNAPSHOTS);
        mh_rw_copy(s, MH_RW_SNAPSHOTS, &u->copying);
    } else if (u->rebuilding) {
        wait_rebuild(s, U_COPY_SNAPSHOTS);
    } /* else every chunk is in tmp_snapshots: on to JOIN */
}

static int inserted(mh_step_t *s, PGresult **res, int n)
{
    unpack_t *u = U(s);
    (void)n;
    /* What this repository newly references. */
    u->commits_written = mh_pq_int(res[u->i_commits], 0, 0);
    mh_rw_upload_written(&u->up, res);
    return 0;
}

/* The commit rows and the pack's (index, frames, refs): what does not
 * wait for the manifests. */
static void step_insert(mh_step_t *s)
{
    unpack_t *u = U(s);
    mh_db_batch_t b = {0};
    mh_rw_history_rows(&b, u->op.repo->repo_id, MH_RW_COMMITS, &u->i_commits, NULL);
    mh_rw_upload_rows(&b, &u->up);
    mh_step_batch(s, &b, inserted);
}

static int snapshots_inserted(mh_step_t *s, PGresult **res, int n)
{
    unpack_t *u = U(s);
    (void)n;
    u->snapshots_written = mh_pq_int(res[u->i_snapshots], 0, 0);
    return 0;
}

static void step_insert_snapshots(mh_step_t *s)
{
    unpack_t *u = U(s);
    mh_db_batch_t b = {0};
    mh_rw_history_rows(&b, u->op.repo->repo_id, MH_RW_SNAPSHOTS, NULL, &u->i_snapshots);
    mh_step_batch(s, &b, snapshots_inserted);
}

static void step_check(mh_step_t *s)
{
    unpack_t *u = U(s);
    u->mv = (mh_move_t){.repo_id = u->op.repo->repo_id,
                        .branch = u->branch,
                        .new_head = u->head.s,
                        .kind = u->force ? MH_MOVE_FORCE : MH_MOVE_FAST_FORWARD,
                        .cas = u->has_expected_old,
                        .expected_old = u->has_expected_old ? u->expected_old.s : NULL};
    mh_rw_move_check(s, &u->mv);
}

/* Only an accepted move places the pack: a refused push leaves nothing
 * under mpacks/ (the transaction rolls back, the staged upload stays for
 * a retry under its grant). */
static void step_place(mh_step_t *s)
{
    unpack_t *u = U(s);
    if (u->mv.verdict) {
        /* Refused: the upload stays staged (a retry may use it). */
        mh_rw_move_refuse(s, &u->mv);
        return;
    }
    /* Nothing refuses the push any more: the pack goes to its final key
     * under the pack's lock, in the transaction that references it. */
    if (!u->rerun) mh_rw_upload_place(s, &u->up);
}

static void step_write(mh_step_t *s)
{
    unpack_t *u = U(s);
    mh_db_batch_t b = {0};
    mh_rw_move_rows(&b, &u->mv);
    mh_rw_upload_consume(&b, &u->up);
    mh_step_batch(s, &b, NULL);
}

static const mh_step_def_t unpack_steps[] = {
    [U_LOOKUP] = {"lookup", step_lookup},
    [U_LOCATE] = {"locate", step_locate},
    [U_STREAM] = {"stream", step_stream},
    [U_INDEX] = {"index", step_index},
    [U_CONTEXT] = {"context", step_context},
    [U_BASES] = {"bases", step_bases},
    [U_PREPARE] = {"prepare", step_prepare},
    [U_CHARGE] = {"charge", step_charge},
    [U_MARK] = {"mark", step_mark},
    [U_REBUILD] = {"rebuild", step_rebuild},
    [U_ACQUIRE] = {"acquire", mh_step_acquire},
    [U_BEGIN] = {"begin", step_begin},
    [U_COPY_COMMITS] = {"copy_commits", step_copy_commits},
    [U_COPY_OBJECTS] = {"copy_objects", step_copy_objects},
    [U_COPY_FRAMES] = {"copy_frames", step_copy_frames},
    [U_INSERT] = {"insert", step_insert},
    [U_CHARGE_SNAPSHOTS] = {"charge_snapshots", step_charge_snapshots},
    [U_COPY_SNAPSHOTS] = {"copy_snapshots", step_copy_snapshots},
    [U_JOIN] = {"join", step_join},
    [U_INSERT_SNAPSHOTS] = {"insert_snapshots", step_insert_snapshots},
    [U_CHECK] = {"check", step_check},
    [U_PLACE] = {"place", step_place},
    [U_WRITE] = {"write", step_write},
    [U_COMMIT] = {"commit", mh_step_commit},
    [U_DONE] = {"done", mh__op_step_done},
};

/* --- the end */

static void unpack_finish(mh_step_t *s)
{
    unpack_t *u = U(s);
    mh_req_t *req = u->op.req;
    if (u->rebuilding) {
        /* The thread still reads the pack and writes x: answer (and free)
         * once it is back (rebuilt_cb). */
        u->finish_deferred = true;
        return;
    }
    /* Failed after the pack went to its final key (the write or the
     * COMMIT): it goes back unless a row references it. */
    if (s->err || s->status) mh_rw_upload_unplace(s, &u->up);
    if (mh__op_failed(s, "invalid_pack")) return;
    uint64_t ms = (mh_now_us() - s->t0) / 1000;
    mh_info("req %s: unpack %s into %s/%s branch %s -> %s: %lld commits, %lld snapshots, %lld objects in %llu ms",
            req->id, u->key.s, u->op.repo->owner, u->op.repo->slug, u->branch, u->head.s, (long long)u->commits_written,
            (long long)u->snapshots_written, (long long)u->up.referenced_new, (unsigned long long)ms);
    mh_vb_t *b = mh_res_build(req);
    mh_val_t *m = mh_vb_map(b);
    mh_vb_put(b, m, "commits_written", mh_v_int(u->commits_written));
    mh_vb_put(b, m, "snapshots_written", mh_v_int(u->snapshots_written));
    mh_vb_put(b, m, "objects_written", mh_v_int(u->up.referenced_new));
    mh_vb_put(b, m, "branch", mh_v_str(u->branch));
    mh_vb_put(b, m, "head", mh_v_str(u->head.s));
    mh_vb_put(b, m, "elapsed_ms", mh_v_int((int64_t)ms));
    mh_res_val(req, 200, m);
}

static void unpack_free(void *arg)
{
    unpack_t *u = arg;
    mh_buf_free(&u->ready);
    mh_buf_free(&u->copying);
    mh__unpack_free(&u->x);
    mh_rw_upload_free(&u->up);
    mh_arena_release(&u->rebuild_arena);
}

static const mh__op_def_t unpack_def = {"unpack", MH__STEPS(unpack_steps), unpack_finish, unpack_free, 0};

void mh_h_push_unpack(mh_req_t *req)
{
    mh_val_t body;
    unpack_t *u = MH__OP_NEW(req, unpack_t, &unpack_def);
    if (!u) return;
    mh_arena_init(&u->rebuild_arena, 0);
    if (!mh__body_map(req, &body) || !mh__body_id(req, &body, "mpack_key", true, &u->key, NULL) ||
        !mh__body_id(req, &body, "head", true, &u->head, NULL) ||
        !mh__body_id(req, &body, "expected_old_head", false, &u->expected_old, &u->has_expected_old) ||
        !mh__body_branch(req, &body, "branch", u->branch) || !mh__body_bool(req, &body, "force", &u->force))
        return;
    u->x = (mh__unpack_t){.key = u->key.s, .head = u->head.s, .a = &u->op.work};
    mh_hub_load_repo(req, MH_PERM_WRITE, mh__op_repo_cb);
}
