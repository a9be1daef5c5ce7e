/*
 * gc.c — the mpack.gc job (SPEC 4.7, seed 002): consolidates the packs a
 * repository references into ONE v2 pack (SPEC 2.1) holding only blobs
 * (commits and snapshots live in PostgreSQL), in path order (all versions
 * of a path together, oldest first) at MUSEHUB_GC_ZSTD_LEVEL, built as a
 * stream by the pack builder (mh/packbuild.h): its key depends only on
 * the blobs and the paths the repository's snapshots give them, so a
 * second run produces the same key, and a repository left with at most
 * one pack is skipped.
 *
 *   PACKS   the repository's packs: mpack_refs rows whose pack is not a
 *           fetch cache (kinds push, commit, gc); <= 1: skipped
 *   LOCATE  one source per object the repository references (its own
 *           packs first, then packs not superseded), with the frame of a
 *           v2 source (mpack_frames)
 *   PATHS   every snapshot delta of the repository, oldest commit first
 *   ORDER   thread pool: each object's path and age (the first snapshot
 *           that names it)
 *   BUILD   the builder: ranged reads of the sources, frames recompressed
 *           (never copied: GC's level and path order are the point),
 *           every blob hashed against its id, into a store writer left
 *           open; the pack-memory budget is reserved for it
 *   the transaction, refwrite's lock order (the repository row, then the
 *   new pack's lock, as every ref writer):
 *     RECOUNT the packs read in PACKS are all still referenced (a
 *             concurrent GC of the same repository: retry)
 *     PUT     the writer finished: mpacks/<hex> appears (under the pack's
 *             lock, so a sweep of an identical, long-superseded pack
 *             cannot delete the bytes between the put and the commit)
 *     COPY    the new pack's index rows (tmp_objects) and frames
 *             (tmp_frames)
 *     APPLY   refwrite's pack rows (kind gc, no longer superseded; its
 *             mpack_frames and mpack_index rows; its mpack_refs row), the
 *             old packs' refs removed, and for each old pack that no
 *             repository references any more: its index rows for the
 *             consolidated objects deleted and superseded_at set (the
 *             sweep deletes it, its frames rows with it, after the grace
 *             period); objects.storage_uri (a view, sql/0040) follows
 *   DONE    {packs_before, packs_after, consolidated_key, skipped, objects,
 *            bytes_read, bytes_written, frames, elapsed_ms}
 *
 * Safety while pushes and fetches run:
 *  - A push that lands during the GC adds its own pack and ref; the swap
 *    only removes the refs read in PACKS, so the new pack stays.
 *  - A fetch that located its blobs in an old pack before the swap still
 *    reads them: superseded packs stay in the store for the grace period
 *    and are deleted by the sweep only once no index row and no ref names
 *    them (sweep.c).
 *  - Objects shared with another repository keep working there: an old
 *    pack another repository still references is neither superseded nor
 *    stripped of its index rows.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs_internal.h"

typedef struct gc gc_t;

struct gc {
    mh_step_t step;
    mh_job_t *j;
    char **old; /* the repository's packs (ids) */
    size_t nold;
    char *old_array; /* text[] literal of old */
    bool skipped;
    mh_pb_t *pb;       /* the builder; its blobs in object id order */
    const char **ids;  /* their ids, sorted (bytewise) */
    size_t nblobs, unindexed;
    mh_buf_t deltas;   /* PATHS: per snapshot, oldest first: u32 age, u32 length, the delta_upsert bytes */
    mh_buf_t rows, frows;
    mh_pb_stats_t st;
    char pack_key[MH_MPACK_KEY_SIZE], size[24];
    const char *key;
    bool permanent;
    int64_t packs_after;
};

#define GC(s) MH_STEP_OP(s, gc_t, step)

enum {
    G_PACKS,
    G_LOCATE,
    G_PATHS,
    G_ORDER,
    G_BUILD,
    G_ACQUIRE,
    G_BEGIN,
    G_RECOUNT,
    G_PUT,
    G_COPY,
    G_COPY_FRAMES,
    G_APPLY,
    G_COMMIT,
    G_DONE
};

/* --------------------------------------------------------------- PACKS */

static int packs_read(mh_step_t *s, PGresult *res)
{
    gc_t *g = GC(s);
    mh_arena_t *a = &g->j->arena;
    int n = PQntuples(res);
    g->nold = (size_t)n;
    g->old = mh_alloc(a, (size_t)(n + 1) * sizeof *g->old);
    if (!g->old) return MH_ENOMEM;
    for (int i = 0; i < n; i++)
        if (!(g->old[i] = mh_strdup(a, mh_pq_str(res, i, 0)))) return MH_ENOMEM;
    if (n <= 1) {
        /* Nothing to consolidate: report the single pack as the result so
         * a second run after a real consolidation reports the same key. */
        g->skipped = true;
        g->packs_after = n;
        mh_step_done(s);
        return 0;
    }
    g->old_array = mh_pq_array(a, (const char *const *)g->old, g->nold, 0);
    return g->old_array ? 0 : MH_ENOMEM;
}

/* The repository's packs, fetch caches excluded (a ref without an mpacks
 * row counts: it can only come from a push). */
#define SQL_PACKS                                                                                                    \
    "FROM mpack_refs r LEFT JOIN mpacks m ON m.mpack_id = r.mpack_id"                                               \
    " WHERE r.repo_id = $1 AND coalesce(m.kind, 'push') <> 'fetch'"

static void step_packs(mh_step_t *s)
{
    mh_db_pq_t q = {NULL, "SELECT r.mpack_id " SQL_PACKS " ORDER BY r.mpack_id COLLATE \"C\"", 1,
                    (const char *const[]){GC(s)->j->repo_id}, NULL, NULL};
    mh_step_query(s, &q, packs_read);
}

/* -------------------------------------------------------------- LOCATE */

/* One source row: a v1 byte range, or a blob inside a v2 frame. */
static int add_blob(gc_t *g, PGresult *res, int r)
{
    mh_arena_t *a = &g->j->arena;
    const char *oid = mh_pq_str(res, r, 0), *mp = mh_pq_str(res, r, 1);
    int64_t off = mh_pq_int(res, r, 2), len = mh_pq_int(res, r, 3);
    bool framed = !mh_pq_isnull(res, r, 4);
    if (!mh_id_valid(oid, strlen(oid)) || !mh_id_valid(mp, strlen(mp)) || off < 0 || len < 0) {
        g->permanent = true;
        mh_step_fail(&g->step, MH_EPARSE, "malformed mpack_index row");
        return MH_EPARSE;
    }
    if (framed && mh_pq_isnull(res, r, 5)) {
        g->permanent = true;
        char *why = mh_sprintf(a, "object %s: its index row names frame %s of pack %s, which has no mpack_frames row",
                               oid, mh_pq_str(res, r, 4), mp);
        mh_step_fail(&g->step, MH_EPARSE, why ? why : "an index row names a frame without a row");
        return MH_EPARSE;
    }
    const char *id = mh_strndup(a, oid, MH_ID_LEN);
    size_t ix;
    if (!id || mh_pb_add(g->pb, id, (uint64_t)len, NULL, 0, 0, &ix)) return MH_ENOMEM;
    g->ids[g->nblobs++] = id;
    if (!framed) return mh_pb_src_pack(g->pb, ix, mp, NULL, (uint64_t)off);
    mh_pb_frame_t f = {(uint32_t)mh_pq_int(res, r, 4),  (uint64_t)mh_pq_int(res, r, 5), (uint64_t)mh_pq_int(res, r, 6),
                       (uint64_t)mh_pq_int(res, r, 8),  (uint32_t)mh_pq_int(res, r, 9),
                       strcmp(mh_pq_str(res, r, 7), "zstd") == 0 ? MH_PACK_ZSTD : MH_PACK_NONE};
    return mh_pb_src_pack(g->pb, ix, mp, &f, (uint64_t)off);
}

static int located(mh_step_t *s, PGresult *res)
{
    gc_t *g = GC(s);
    size_t rows = (size_t)PQntuples(res);
    mh_pb_opts_t o = {.version = 2, .level = (int)g->j->cfg->gc_level, .verify = true};
    int rc = mh_pb_new(&o, &g->pb);
    g->ids = rc ? NULL : mh_alloc(&g->j->arena, (rows + 1) * sizeof *g->ids);
    if (rc || !g->ids) return rc ? rc : MH_ENOMEM;
    for (size_t r = 0; r < rows; r++) {
        if (mh_pq_isnull(res, (int)r, 1)) {
            if (!g->unindexed)
                mh_warn("job %s: mpack.gc: object %s has no mpack_index row; left out", g->j->id,
                        mh_pq_str(res, (int)r, 0));
            g->unindexed++;
            continue;
        }
        if ((rc = add_blob(g, res, (int)r))) return rc == MH_EPARSE ? 0 : rc;
    }
    return 0;
}

static void step_locate(mh_step_t *s)
{
    gc_t *g = GC(s);
    /* One source per object: the repository's own packs first, then packs
     * not superseded, then by id so reruns agree. Objects by id
     * (bytewise): ORDER looks them up by bisection. */
    mh_db_pq_t q = {NULL,
                    "SELECT r.object_id, i.mpack_id, i.byte_offset, i.byte_length, i.frame_no, f.data_offset,"
                    " f.data_length, f.codec, f.size, f.blob_count FROM object_refs r"
                    " LEFT JOIN LATERAL (SELECT m.mpack_id, m.byte_offset, m.byte_length, m.frame_no FROM mpack_index m"
                    "  LEFT JOIN mpacks p ON p.mpack_id = m.mpack_id"
                    "  WHERE m.object_id = r.object_id AND coalesce(p.kind, 'push') <> 'fetch'"
                    "  ORDER BY m.mpack_id <> ALL ($2::text[]), p.superseded_at IS NOT NULL,"
                    "  m.mpack_id COLLATE \"C\" LIMIT 1) i ON true"
                    " LEFT JOIN mpack_frames f ON f.mpack_id = i.mpack_id AND f.frame_no = i.frame_no"
                    " WHERE r.repo_id = $1 ORDER BY r.object_id COLLATE \"C\"",
                    2, (const char *const[]){g->j->repo_id, g->old_array}, NULL, NULL};
    mh_step_query(s, &q, located);
}

/* --------------------------------------------------------- PATHS, ORDER */

/* Each snapshot's upserts once, by the oldest commit that has it. Binary
 * results: the deltas arrive as bytes. */
static const mh_stmt_t st_paths = {
    "gc_paths",
    "SELECT s.delta_upsert, x.g::text FROM (SELECT c.snapshot_id, min(c.generation) AS g FROM commit_refs r"
    " JOIN commits c ON c.commit_id = r.commit_id WHERE r.repo_id = $1 GROUP BY c.snapshot_id) x"
    " JOIN snapshots s ON s.snapshot_id = x.snapshot_id ORDER BY x.g, s.snapshot_id COLLATE \"C\"",
    1, 1};

static int paths_read(mh_step_t *s, PGresult *res)
{
    gc_t *g = GC(s);
    for (int r = 0; r < PQntuples(res); r++) {
        if (mh_pq_isnull(res, r, 0)) continue;
        const char *p = PQgetvalue(res, r, 0);
        uint32_t n = (uint32_t)PQgetlength(res, r, 0), age = (uint32_t)mh_pq_int(res, r, 1);
        if (mh_buf_append(&g->deltas, &age, 4) || mh_buf_append(&g->deltas, &n, 4) ||
            mh_buf_append(&g->deltas, p, n))
            return MH_ENOMEM;
    }
    return 0;
}

static void step_paths(mh_step_t *s)
{
    gc_t *g = GC(s);
    if (!g->nblobs) { /* nothing indexed: an empty pack */
        mh_step_goto(s, G_BUILD);
        return;
    }
    mh_db_pq_t q = {&st_paths, NULL, 0, (const char *const[]){g->j->repo_id}, NULL, NULL};
    mh_step_query(s, &q, paths_read);
}

static int cmp_idp(const void *key, const void *elem) { return memcmp(key, *(const char *const *)elem, MH_ID_LEN); }

/* Gives each blob the path and age of the first snapshot (oldest first)
 * whose delta names it; the others keep no path (they go last, by id). */
static void order_work(mh_step_t *s)
{
    gc_t *g = GC(s);
    bool *seen = calloc(g->nblobs + 1, 1);
    if (!seen) {
        s->work_err = MH_ENOMEM;
        return;
    }
    for (size_t at = 0; at + 8 <= g->deltas.len && !s->work_err;) {
        uint32_t age, n;
        memcpy(&age, g->deltas.p + at, 4);
        memcpy(&n, g->deltas.p + at + 4, 4);
        const uint8_t *p = g->deltas.p + at + 8;
        at += 8 + (size_t)n;
        mh_arena_t tmp;
        mh_arena_init(&tmp, 0);
        mh_val_t m;
        const char *why = NULL;
        int rc = mh_msgpack_decode(&tmp, p, n, NULL, &m, &why);
        if (rc == MH_ENOMEM) s->work_err = rc;
        for (uint32_t k = 0; !rc && m.t == MH_V_MAP && k < m.v.m.n; k++) {
            const mh_val_t *kk = &m.v.m.kv[k].k, *v = &m.v.m.kv[k].v;
            if (kk->t != MH_V_STR || v->t != MH_V_STR || v->v.s.n != MH_ID_LEN) continue;
            const char **hit = bsearch(v->v.s.p, g->ids, g->nblobs, sizeof *g->ids, cmp_idp);
            if (!hit || seen[hit - g->ids]) continue;
            seen[hit - g->ids] = true;
            mh_pb_set_path(g->pb, (size_t)(hit - g->ids), kk->v.s.p, kk->v.s.n, age);
        }
        mh_arena_release(&tmp);
    }
    free(seen);
}

static void step_order(mh_step_t *s) { mh_step_work(s, order_work); }

/* --------------------------------------------------------------- BUILD */

static void built_cb(void *ud, int err)
{
    gc_t *g = ud;
    if (err == MH_EHASH || err == MH_EPARSE) {
        /* An index row whose byte range does not hold the object, or a
         * corrupt stored pack: never spread it into a new pack. Retrying
         * will not fix it. */
        g->permanent = true;
    }
    if (!err) {
        mh_pb_stats(g->pb, &g->st);
        err = mh_rw_built_rows(g->pb, &g->rows, &g->frows);
    }
    mh_step_resume(&g->step, err, err ? mh_pb_why(g->pb) : NULL);
}

static void step_build(mh_step_t *s)
{
    gc_t *g = GC(s);
    mh_pb_env_t env = {g->j->loop, g->j->store, g->j->cfg->budget, NULL, true};
    mh_step_wait(s);
    mh_pb_run(g->pb, &env, built_cb, g);
}

/* ------------------------------------------------------------------ TX */

static void step_acquire(mh_step_t *s)
{
    gc_t *g = GC(s);
    mh_buf_free(&g->deltas);
    g->key = mh_pb_id(g->pb)->s;
    mh_mpack_key(g->pack_key, g->key);
    snprintf(g->size, sizeof g->size, "%llu", (unsigned long long)g->st.bytes);
    mh_step_acquire(s);
}

static void step_begin(mh_step_t *s)
{
    gc_t *g = GC(s);
    /* The repository row serialises every GC of one repository (and every
     * other ref writer); then the new pack's lock. */
    mh_rw_begin(s, g->j->repo_id, g->key, MH_RW_OBJECTS | MH_RW_FRAMES);
}

/* Under READ COMMITTED this statement, after the locks, sees what a GC
 * that held the repository row before us committed. */
static int recounted(mh_step_t *s, PGresult *res)
{
    gc_t *g = GC(s);
    if (mh_pq_int(res, 0, 0) != (int64_t)g->nold)
        mh_step_fail(s, MH_ECONFLICT, "the repository's packs changed during the GC (a concurrent GC); retrying");
    return 0;
}

static void step_recount(mh_step_t *s)
{
    gc_t *g = GC(s);
    mh_db_pq_t q = {NULL, "SELECT count(*) FROM mpack_refs WHERE repo_id = $1 AND mpack_id = ANY ($2::text[])", 2,
                    (const char *const[]){g->j->repo_id, g->old_array}, NULL, NULL};
    mh_step_query(s, &q, recounted);
}

static void stored_cb(void *ud, int err)
{
    gc_t *g = ud;
    mh_step_resume(&g->step, err, err ? "storing the consolidated pack" : NULL);
}

/* The writer left open by BUILD is finished: the pack appears. */
static void step_put(mh_step_t *s)
{
    mh_step_wait(s);
    mh_pb_store(GC(s)->pb, stored_cb, GC(s));
}

static void step_copy(mh_step_t *s) { mh_rw_copy(s, MH_RW_OBJECTS, &GC(s)->rows); }

static void step_copy_frames(mh_step_t *s) { mh_rw_copy(s, MH_RW_FRAMES, &GC(s)->frows); }

static int applied(mh_step_t *s, PGresult **res, int n)
{
    gc_t *g = GC(s);
    g->packs_after = mh_pq_int(res[n - 1], 0, 0);
    mh_debug("job %s: mpack.gc: %lld index rows of superseded packs deleted, %lld packs superseded", g->j->id,
             (long long)mh_pq_int(res[n - 3], 0, 0), (long long)mh_pq_int(res[n - 3], 0, 1));
    return 0;
}

static void step_apply(mh_step_t *s)
{
    gc_t *g = GC(s);
    const char *repo = g->j->repo_id, *key = g->key;
    mh_rw_pack_t pack = {repo, key, g->size, "gc", true};
    mh_db_batch_t b = {0};
    /* The old packs' locks first (the new one's is held since BEGIN): a
     * push or job referencing one of them now commits before `gone`
     * below is decided (mh_rw_sql_packs_lock). */
    mh_db_batch_add(&b, mh_rw_sql_packs_lock, 2, g->old_array, key);
    mh_rw_pack_rows(&b, &pack, NULL, NULL);
    /* The repository's refs: old packs out (the new one came in above). */
    mh_db_batch_add(&b, "DELETE FROM mpack_refs WHERE repo_id = $2 AND mpack_id = ANY ($3::text[]) AND mpack_id <> $1",
                    3, key, repo, g->old_array);
    /* Old packs no repository references any more lose the index rows of
     * the objects now in the new pack and are superseded; one still
     * referenced elsewhere is left as it is (its rows serve that
     * repository). */
    mh_db_batch_add(&b,
                    "WITH gone AS (SELECT u.id FROM unnest($2::text[]) AS u(id)"
                    "  WHERE u.id <> $1 AND NOT EXISTS (SELECT 1 FROM mpack_refs r WHERE r.mpack_id = u.id)),"
                    " d AS (DELETE FROM mpack_index i USING gone WHERE i.mpack_id = gone.id"
                    "  AND EXISTS (SELECT 1 FROM tmp_objects t WHERE t.object_id = i.object_id) RETURNING 1),"
                    " s AS (UPDATE mpacks m SET superseded_at = now() FROM gone WHERE m.mpack_id = gone.id RETURNING 1)"
                    " SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM s)",
                    2, key, g->old_array);
    /* The objects' URIs follow by themselves: the view (sql/0040) prefers
     * a pack that is not superseded. */
    /* packs_after (a push landing meanwhile counts). */
    mh_db_batch_add(&b, "SELECT count(*) " SQL_PACKS, 1, repo);
    mh_step_batch(s, &b, applied);
}


static void step_done(mh_step_t *s)
{
    gc_t *g = GC(s);
    mh_info("job %s: mpack.gc of repo %s: %zu packs -> %s (%zu objects, %llu bytes read, %llu written, %u frames, "
            "level %u, %.1f ms)",
            g->j->id, g->j->repo_id, g->nold, g->key, g->nblobs, (unsigned long long)g->st.bytes_read,
            (unsigned long long)g->st.bytes, g->st.frames_built + g->st.frames_large, g->j->cfg->gc_level,
            mh__job_elapsed_ms(g->j));
    mh_step_done(s);
}

static const mh_step_def_t gc_steps[] = {
    [G_PACKS] = {"packs", step_packs},
    [G_LOCATE] = {"locate", step_locate},
    [G_PATHS] = {"paths", step_paths},
    [G_ORDER] = {"order", step_order},
    [G_BUILD] = {"build", step_build},
    [G_ACQUIRE] = {"acquire", step_acquire},
    [G_BEGIN] = {"begin", step_begin},
    [G_RECOUNT] = {"recount", step_recount},
    [G_PUT] = {"put", step_put},
    [G_COPY] = {"copy", step_copy},
    [G_COPY_FRAMES] = {"copy_frames", step_copy_frames},
    [G_APPLY] = {"apply", step_apply},
    [G_COMMIT] = {"commit", mh_step_commit},
    [G_DONE] = {"done", step_done},
};

static void gc_finish(mh_step_t *s)
{
    gc_t *g = GC(s);
    mh_vb_t b;
    mh_vb_init(&b, &g->j->arena);
    mh_val_t *m = mh_vb_map(&b);
    const char *key = g->skipped ? (g->nold == 1 ? g->old[0] : NULL) : g->key;
    mh_vb_put(&b, m, "packs_before", mh_v_int((int64_t)g->nold));
    mh_vb_put(&b, m, "packs_after", mh_v_int(g->packs_after));
    mh_vb_put(&b, m, "consolidated_key", key ? mh_v_str(key) : mh_v_nil());
    mh_vb_put(&b, m, "skipped", mh_v_bool(g->skipped));
    if (!g->skipped) {
        mh_vb_put(&b, m, "objects", mh_v_int((int64_t)g->nblobs));
        mh_vb_put(&b, m, "bytes_read", mh_v_int((int64_t)g->st.bytes_read));
        mh_vb_put(&b, m, "bytes_written", mh_v_int((int64_t)g->st.bytes));
        mh_vb_put(&b, m, "frames", mh_v_int((int64_t)(g->st.frames_built + g->st.frames_large)));
        if (g->unindexed) mh_vb_put(&b, m, "unindexed_objects", mh_v_int((int64_t)g->unindexed));
    }
    mh_vb_put(&b, m, "elapsed_ms", mh_v_int(mh__job_elapsed_ms_int(g->j)));
    mh__job_end(g->j, s, "mpack.gc", g->permanent || s->err == MH_ENOENT, &b, m);
}

static void gc_cleanup_cb(void *arg)
{
    gc_t *g = arg;
    mh_pb_free(g->pb); /* a pack built but not stored is dropped */
    mh_buf_free(&g->deltas);
    mh_buf_free(&g->rows);
    mh_buf_free(&g->frows);
}

void mh__job_gc_start(mh_job_t *j)
{
    gc_t *g = MH__JOB_NEW(j, gc_t, gc_steps, G_DONE, gc_finish, gc_cleanup_cb);
    if (!g) return;
    g->j = j;
    mh_step_run(&g->step);
}
