/*
 * gc.c — the mpack.gc job (SPEC 4.7, seed 002): consolidates the packs a
 * repository references into one v1 pack holding only blobs (commits and
 * snapshots live in PostgreSQL), sorted by object id so its key depends
 * only on the set of blobs: a second run produces the same key, and a
 * repository left with at most one pack is skipped.
 *
 *   PACKS   the repository's packs: mpack_refs rows whose pack is not a
 *           fetch cache (kinds push, commit, gc); <= 1: skipped
 *   LOCATE  one source byte range per object the repository references,
 *           preferring its own packs, then packs not superseded
 *   READ    one ranged read per source pack (ranges coalesced by the store)
 *   BUILD   thread pool: sort, drop duplicates, check every blob against
 *           its id, write the pack, record the new byte ranges, hash
 *   TX      one transaction on a held connection:
 *             LOCK   the repository's GC lock and the new pack's lock;
 *                    check the packs read in PACKS are all still referenced
 *                    (a concurrent GC of the same repository: retry)
 *             PUT    the pack to mpacks/<hex> (under the pack's lock, so a
 *                    sweep of an identical, long-superseded pack cannot
 *                    delete the bytes between the put and the commit)
 *             APPLY  mpacks row (kind gc, no longer superseded), its
 *                    mpack_index rows, mpack_refs swapped (old packs out,
 *                    new in), and for each old pack that no repository
 *                    references any more: its index rows for the
 *                    consolidated objects deleted and superseded_at set;
 *                    objects.storage_uri repointed
 *   DONE    {packs_before, packs_after, consolidated_key, skipped, objects,
 *            bytes_read, bytes_written, elapsed_ms}
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
#include <stdlib.h>
#include <string.h>

#include "jobs_internal.h"

#define READS_IN_FLIGHT 2

typedef enum {
    G_PACKS,
    G_LOCATE,
    G_READ,
    G_BUILD,
    G_ACQUIRE,
    G_BEGIN,
    G_LOCK,
    G_PUT,
    G_COPY,
    G_APPLY,
    G_COMMIT,
    G_COMMITTED,
    G_DONE,
} gstate_t;

typedef struct gc gc_t;

typedef struct {
    gc_t *g;
    char key[MH_MPACK_KEY_SIZE];
    size_t first, n;    /* blobs[first .. first+n) in read order */
    mh_range_t *ranges;
    mh_buf_t buf;
} src_t;

struct gc {
    mh_job_t *j;
    gstate_t state;
    bool busy;
    char **old;         /* the repository's packs (ids) */
    size_t nold;
    char *old_array;    /* text[] literal of old */
    mh_gc_blob_t *blobs;
    size_t nblobs, unindexed;
    src_t *srcs;
    size_t nsrcs, next_src, inflight;
    int read_err;
    uint64_t bytes_read;
    mh_buf_t pack;
    mh_id_t key;
    char pack_key[MH_MPACK_KEY_SIZE];
    mh_buf_t rows;
    uv_work_t uvw;
    int work_err;
    size_t bad;
    mh_dbconn_t *conn;
    int64_t packs_after;
    const char *lock_vals[3], *lock_vals2[2]; /* G_LOCK's pipeline */
    mh_db_pq_t lock_qs[2];
};

static void advance(gc_t *g);

static void gc_cleanup_cb(void *arg)
{
    gc_t *g = arg;
    if (g->conn) mh_dbconn_release(g->conn);
    g->conn = NULL;
    for (size_t i = 0; i < g->nsrcs; i++) mh_buf_free(&g->srcs[i].buf);
    mh_buf_free(&g->pack);
    mh_buf_free(&g->rows);
    free(g->blobs);
}

static void end_fail(gc_t *g, bool permanent, const char *what, int err, const char *detail)
{
    g->state = G_DONE;
    if (g->conn) {
        mh_dbconn_release(g->conn); /* rolls back */
        g->conn = NULL;
    }
    mh_job_fail(g->j, permanent, "mpack.gc: %s: %s%s%s", what, mh_strerror(err), detail && *detail ? ": " : "",
                detail ? detail : "");
}

static void respond(gc_t *g, bool skipped, int64_t before, int64_t after, const char *key)
{
    mh_job_t *j = g->j;
    mh_arena_t *a = &j->arena;
    g->state = G_DONE;
    mh_val_t *m = mh_v_map(a);
    int rc = m ? 0 : MH_ENOMEM;
    if (!rc) rc = mh_map_put(a, m, "packs_before", mh_v_int(before));
    if (!rc) rc = mh_map_put(a, m, "packs_after", mh_v_int(after));
    if (!rc) rc = mh_map_put(a, m, "consolidated_key", key ? mh_v_str(key) : mh_v_nil());
    if (!rc) rc = mh_map_put(a, m, "skipped", mh_v_bool(skipped));
    if (!skipped) {
        if (!rc) rc = mh_map_put(a, m, "objects", mh_v_int((int64_t)g->nblobs));
        if (!rc) rc = mh_map_put(a, m, "bytes_read", mh_v_int((int64_t)g->bytes_read));
        if (!rc) rc = mh_map_put(a, m, "bytes_written", mh_v_int((int64_t)g->pack.len));
        if (!rc && g->unindexed) rc = mh_map_put(a, m, "unindexed_objects", mh_v_int((int64_t)g->unindexed));
    }
    if (!rc) rc = mh_map_put(a, m, "elapsed_ms", mh_v_int(mh_job_elapsed_ms_int(j)));
    if (rc) mh_job_fail(j, false, "out of memory");
    else mh_job_done(j, m);
}

/* --------------------------------------------------------------- PACKS */

static void packs_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    gc_t *g = ud;
    g->busy = false;
    if (err) {
        end_fail(g, false, "listing the repository's packs", err, errmsg);
        return;
    }
    mh_arena_t *a = &g->j->arena;
    int n = PQntuples(res);
    g->nold = (size_t)n;
    g->old = mh_alloc(a, (size_t)(n ? n : 1) * sizeof *g->old);
    if (!g->old) {
        end_fail(g, false, "listing the repository's packs", MH_ENOMEM, NULL);
        return;
    }
    for (int i = 0; i < n; i++)
        if (!(g->old[i] = mh_strdup(a, mh_pq_str(res, i, 0)))) {
            end_fail(g, false, "listing the repository's packs", MH_ENOMEM, NULL);
            return;
        }
    if (n <= 1) {
        /* Nothing to consolidate: report the single pack as the result so
         * a second run after a real consolidation reports the same key. */
        respond(g, true, n, n, n == 1 ? g->old[0] : NULL);
        return;
    }
    if (!(g->old_array = mh_pq_array(a, (const char *const *)g->old, g->nold, 0))) {
        end_fail(g, false, "listing the repository's packs", MH_ENOMEM, NULL);
        return;
    }
    g->state = G_LOCATE;
    advance(g);
}

/* -------------------------------------------------------------- LOCATE */

static void locate_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    gc_t *g = ud;
    g->busy = false;
    if (err) {
        end_fail(g, false, "locating the repository's objects", err, errmsg);
        return;
    }
    mh_arena_t *a = &g->j->arena;
    size_t rows = (size_t)PQntuples(res);
    g->blobs = calloc(rows ? rows : 1, sizeof *g->blobs);
    mh_range_t *ranges = mh_alloc(a, (rows ? rows : 1) * sizeof *ranges);
    g->srcs = mh_calloc(a, (rows ? rows : 1) * sizeof *g->srcs);
    if (!g->blobs || !ranges || !g->srcs) {
        end_fail(g, false, "locating the repository's objects", MH_ENOMEM, NULL);
        return;
    }
    /* Rows come ordered by (source pack, offset): one source per run. */
    const char *prev = NULL;
    uint64_t total = 0;
    for (size_t r = 0; r < rows; r++) {
        const char *oid = mh_pq_str(res, (int)r, 0);
        if (mh_pq_isnull(res, (int)r, 1)) {
            if (!g->unindexed) mh_warn("job %s: mpack.gc: object %s has no mpack_index row; left out", g->j->id, oid);
            g->unindexed++;
            continue;
        }
        const char *mp = mh_pq_str(res, (int)r, 1);
        int64_t off = mh_pq_int(res, (int)r, 2), len = mh_pq_int(res, (int)r, 3);
        if (!mh_id_valid(oid, strlen(oid)) || !mh_id_valid(mp, strlen(mp)) || off < 0 || len < 0) {
            end_fail(g, true, "locating the repository's objects", MH_EPARSE, "malformed mpack_index row");
            return;
        }
        if (!prev || strcmp(prev, mp) != 0) {
            src_t *s = &g->srcs[g->nsrcs++];
            s->g = g;
            mh_mpack_key(s->key, mp);
            s->first = g->nblobs;
            s->ranges = &ranges[g->nblobs];
            prev = mp;
        }
        src_t *s = &g->srcs[g->nsrcs - 1];
        mh_gc_blob_t *b = &g->blobs[g->nblobs];
        if (!(b->id = mh_strndup(a, oid, MH_ID_LEN))) {
            end_fail(g, false, "locating the repository's objects", MH_ENOMEM, NULL);
            return;
        }
        b->len = (uint64_t)len;
        ranges[g->nblobs] = (mh_range_t){(uint64_t)off, (uint64_t)len};
        s->n++;
        g->nblobs++;
        total += (uint64_t)len;
    }
    if (total > g->j->cfg->max_pack_bytes) {
        end_fail(g, true, "consolidating", MH_ELIMIT, "the repository's blobs exceed the largest pack allowed");
        return;
    }
    g->state = G_READ;
    advance(g);
}

/* ---------------------------------------------------------------- READ */

static void start_reads(gc_t *g);

static void read_cb(void *ud, int err, mh_buf_t *data)
{
    src_t *s = ud;
    gc_t *g = s->g;
    g->inflight--;
    if (!err) {
        s->buf = *data;
        *data = (mh_buf_t){0};
        uint64_t pos = 0;
        for (size_t k = 0; k < s->n; k++) {
            mh_gc_blob_t *b = &g->blobs[s->first + k];
            if (pos + b->len > s->buf.len) {
                err = MH_ESTORE;
                break;
            }
            b->content = s->buf.p + pos;
            pos += b->len;
        }
        if (!err && pos != s->buf.len) err = MH_ESTORE;
        g->bytes_read += s->buf.len;
    }
    if (err && !g->read_err) {
        g->read_err = err;
        mh_warn("job %s: mpack.gc: reading %s: %s", g->j->id, s->key, mh_strerror(err));
    }
    start_reads(g);
}

static void start_reads(gc_t *g)
{
    while (!g->read_err && !mh_job_cancelled(g->j) && g->next_src < g->nsrcs && g->inflight < READS_IN_FLIGHT) {
        src_t *s = &g->srcs[g->next_src++];
        g->inflight++;
        mh_store_get_ranges(g->j->store, s->key, s->ranges, s->n, read_cb, s);
    }
    if (g->inflight) return;
    g->busy = false;
    if (g->read_err) {
        end_fail(g, false, "reading the source packs", g->read_err, NULL);
        return;
    }
    g->state = G_BUILD; /* cancellation is noticed by advance() */
    advance(g);
}

/* --------------------------------------------------------------- BUILD */

static void build_work(uv_work_t *w)
{
    gc_t *g = w->data;
    g->work_err = mh_gc_build_pack(g->blobs, &g->nblobs, &g->pack, &g->key, &g->bad);
    if (g->work_err) return;
    for (size_t i = 0; i < g->nblobs && !g->work_err; i++) {
        const mh_gc_blob_t *b = &g->blobs[i];
        g->work_err = mh_copy_field(&g->rows, b->id, MH_ID_LEN, false);
        if (!g->work_err) g->work_err = mh_copy_int(&g->rows, (int64_t)b->new_off, false);
        if (!g->work_err) g->work_err = mh_copy_int(&g->rows, (int64_t)b->len, true);
    }
}

static void build_done_cb(uv_work_t *w, int status)
{
    gc_t *g = w->data;
    g->busy = false;
    if (status) g->work_err = MH_ECANCELED;
    if (g->work_err == MH_EHASH) {
        /* An index row whose byte range does not hold the object: never
         * spread it into a new pack. Retrying will not fix it. */
        char detail[160];
        snprintf(detail, sizeof detail, "object %.*s: the indexed byte range does not hash to its id", MH_ID_LEN,
                 g->blobs[g->bad].id);
        end_fail(g, true, "building the pack", MH_EHASH, detail);
        return;
    }
    if (g->work_err) {
        end_fail(g, false, "building the pack", g->work_err, NULL);
        return;
    }
    /* The sources are no longer needed: free them before the transaction. */
    for (size_t i = 0; i < g->nsrcs; i++) mh_buf_free(&g->srcs[i].buf);
    mh_mpack_key(g->pack_key, g->key.s);
    g->state = G_ACQUIRE;
    advance(g);
}

/* ------------------------------------------------------------------ TX */

static void step_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    gc_t *g = ud;
    g->busy = false;
    if (err) {
        end_fail(g, false, "database", err, errmsg);
        return;
    }
    g->state++;
    advance(g);
}

static void acquire_cb(void *ud, mh_dbconn_t *c, int err)
{
    gc_t *g = ud;
    g->busy = false;
    if (err) {
        end_fail(g, false, "no database connection", err, NULL);
        return;
    }
    g->conn = c;
    g->state = G_BEGIN;
    advance(g);
}

static void lock_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    gc_t *g = ud;
    g->busy = false;
    if (err) {
        end_fail(g, false, "locking", err, errmsg);
        return;
    }
    int64_t still = mh_pq_int(res, 0, 2);
    if (still != (int64_t)g->nold) {
        end_fail(g, false, "consolidating", MH_ECONFLICT,
                 "the repository's packs changed during the GC (a concurrent GC); retrying");
        return;
    }
    g->state = G_PUT;
    advance(g);
}

/* G_LOCK's two statements: the locks, then the recount (results[1]). */
static void lock_pipeline_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    lock_cb(ud, err || n < 2 ? NULL : results[1], err ? err : (n < 2 ? MH_EDB : 0), errmsg);
}

static void put_cb(void *ud, int err)
{
    gc_t *g = ud;
    g->busy = false;
    if (err) {
        end_fail(g, false, "storing the consolidated pack", err, g->pack_key);
        return;
    }
    g->state = G_COPY;
    advance(g);
}

static void apply_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    gc_t *g = ud;
    g->busy = false;
    if (err || n != 7) {
        end_fail(g, false, "repointing the index", err ? err : MH_EDB, errmsg);
        return;
    }
    g->packs_after = mh_pq_int(results[6], 0, 0);
    mh_debug("job %s: mpack.gc: %lld index rows of superseded packs deleted, %lld packs superseded", g->j->id,
             (long long)mh_pq_int(results[4], 0, 0), (long long)mh_pq_int(results[4], 0, 1));
    g->state = G_COMMIT;
    advance(g);
}

static const char sql_begin[] =
    "BEGIN;"
    "CREATE TEMP TABLE tmp_gc (object_id text, byte_offset bigint, byte_length bigint) ON COMMIT DROP";

/* The repository's packs, fetch caches excluded (a ref without an mpacks
 * row counts: it can only come from a push). */
static const char sql_packs[] =
    "SELECT r.mpack_id FROM mpack_refs r LEFT JOIN mpacks m ON m.mpack_id = r.mpack_id"
    " WHERE r.repo_id = $1 AND coalesce(m.kind, 'push') <> 'fetch' ORDER BY r.mpack_id COLLATE \"C\"";

static void apply(gc_t *g)
{
    mh_arena_t *a = &g->j->arena;
    /* Parameter sets: (key, size), (key, repo, old packs), (key, old packs), (repo). */
    const char **v = mh_alloc(a, 2 * sizeof *v), **v3 = mh_alloc(a, 3 * sizeof *v3),
               **vko = mh_alloc(a, 2 * sizeof *vko), **vr = mh_alloc(a, sizeof *vr);
    char *size = mh_sprintf(a, "%zu", g->pack.len);
    if (!v || !v3 || !vko || !vr || !size) {
        end_fail(g, false, "repointing the index", MH_ENOMEM, NULL);
        return;
    }
    v[0] = v3[0] = vko[0] = g->key.s;
    v[1] = size;
    v3[1] = vr[0] = g->j->repo_id;
    v3[2] = vko[1] = g->old_array;
    mh_db_pq_t qs[7] = {
        /* 0: the pack row; a pack GC recreates is live again. */
        {NULL,
         "INSERT INTO mpacks (mpack_id, size_bytes, kind) VALUES ($1, $2::bigint, 'gc')"
         " ON CONFLICT (mpack_id) DO UPDATE SET superseded_at = NULL WHERE mpacks.superseded_at IS NOT NULL",
         2, v, NULL, NULL},
        /* 1: where each blob now is. */
        {NULL,
         "INSERT INTO mpack_index (object_id, mpack_id, byte_offset, byte_length)"
         " SELECT object_id, $1::text, byte_offset, byte_length FROM tmp_gc ON CONFLICT DO NOTHING",
         1, v, NULL, NULL},
        /* 2, 3: the repository's refs: old packs out, the new one in. */
        {NULL, "DELETE FROM mpack_refs WHERE repo_id = $2 AND mpack_id = ANY ($3::text[]) AND mpack_id <> $1", 3, v3,
         NULL, NULL},
        {NULL, "INSERT INTO mpack_refs (repo_id, mpack_id) VALUES ($2, $1) ON CONFLICT DO NOTHING", 2, v3, NULL,
         NULL},
        /* 4: old packs no repository references any more lose the index
         * rows of the objects now in the new pack and are superseded; one
         * still referenced elsewhere is left as it is (its index rows
         * serve that repository). */
        {NULL,
         "WITH gone AS (SELECT u.id FROM unnest($2::text[]) AS u(id)"
         "  WHERE u.id <> $1 AND NOT EXISTS (SELECT 1 FROM mpack_refs r WHERE r.mpack_id = u.id)),"
         " d AS (DELETE FROM mpack_index i USING gone WHERE i.mpack_id = gone.id"
         "  AND EXISTS (SELECT 1 FROM tmp_gc t WHERE t.object_id = i.object_id) RETURNING 1),"
         " s AS (UPDATE mpacks m SET superseded_at = now() FROM gone WHERE m.mpack_id = gone.id RETURNING 1)"
         " SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM s)",
         2, vko, NULL, NULL},
        /* 5: the objects' informational URI follows the index. */
        {NULL,
         "UPDATE objects o SET storage_uri = 'mpack://' || $1::text || '#' || t.byte_offset || ':' || t.byte_length"
         " FROM tmp_gc t WHERE o.object_id = t.object_id"
         " AND o.storage_uri IS DISTINCT FROM ('mpack://' || $1::text || '#' || t.byte_offset || ':' || t.byte_length)",
         1, v, NULL, NULL},
        /* 6: packs_after (a push landing meanwhile counts). */
        {NULL,
         "SELECT count(*) FROM mpack_refs r LEFT JOIN mpacks m ON m.mpack_id = r.mpack_id"
         " WHERE r.repo_id = $1 AND coalesce(m.kind, 'push') <> 'fetch'",
         1, vr, NULL, NULL},
    };
    g->busy = true;
    mh_dbconn_pipeline(g->conn, qs, 7, apply_cb, g);
}

/* ------------------------------------------------------------- advance */

static const char *const gstate_names[] = {"packs", "locate", "read",   "build",  "acquire",   "begin", "lock",
                                           "put",   "copy",   "apply", "commit", "committed", "done"};

static void advance(gc_t *g)
{
    mh_job_t *j = g->j;
    while (!g->busy && g->state != G_DONE) {
        if (g->state != G_COMMITTED && mh_job_cancelled(j)) {
            end_fail(g, false, "stopped", MH_ECANCELED, "cancelled");
            return;
        }
        mh_debug("job %s: mpack.gc step %s (%.1f ms)", j->id, gstate_names[g->state], mh_job_elapsed_ms(j));
        switch (g->state) {
        case G_PACKS: {
            g->busy = true;
            const char *vals[1] = {j->repo_id};
            mh_db_query(j->db, sql_packs, 1, vals, NULL, NULL, packs_cb, g);
            break;
        }
        case G_LOCATE: {
            /* One source per object: the repository's own packs first,
             * then packs not superseded, then by id so reruns agree. */
            g->busy = true;
            const char *vals[2] = {j->repo_id, g->old_array};
            mh_db_query(j->db,
                        "SELECT r.object_id, i.mpack_id, i.byte_offset, i.byte_length FROM object_refs r"
                        " LEFT JOIN LATERAL (SELECT m.mpack_id, m.byte_offset, m.byte_length FROM mpack_index m"
                        "  LEFT JOIN mpacks p ON p.mpack_id = m.mpack_id"
                        "  WHERE m.object_id = r.object_id AND coalesce(p.kind, 'push') <> 'fetch'"
                        "  ORDER BY m.mpack_id <> ALL ($2::text[]), p.superseded_at IS NOT NULL,"
                        "  m.mpack_id COLLATE \"C\" LIMIT 1) i ON true"
                        " WHERE r.repo_id = $1 ORDER BY i.mpack_id COLLATE \"C\", i.byte_offset",
                        2, vals, NULL, NULL, locate_cb, g);
            break;
        }
        case G_READ:
            g->busy = true;
            start_reads(g);
            break;
        case G_BUILD:
            g->busy = true;
            g->uvw.data = g;
            uv_queue_work(j->loop, &g->uvw, build_work, build_done_cb);
            break;
        case G_ACQUIRE:
            g->busy = true;
            mh_db_acquire(j->db, acquire_cb, g);
            break;
        case G_BEGIN:
            g->busy = true;
            mh_dbconn_script(g->conn, sql_begin, step_cb, g);
            break;
        case G_LOCK: {
            g->busy = true;
            /* Locks first (GC's own, the repository row like every ref
             * writer, then the pack: the order push and index use too),
             * and the recount in a second statement: under READ COMMITTED
             * a statement reads the snapshot taken when it started, so a
             * count in the locking statement could predate a concurrent
             * GC that held the lock meanwhile. */
            g->lock_vals[0] = j->repo_id;
            g->lock_vals[1] = g->key.s;
            g->lock_vals[2] = g->old_array;
            g->lock_qs[0] = (mh_db_pq_t){NULL,
                                         "SELECT pg_advisory_xact_lock(hashtextextended('musehub:gc:' || $1::text, 0)),"
                                         " (SELECT count(*) FROM (SELECT 1 FROM repos WHERE repo_id = $1 FOR UPDATE) r), "
                                         MH_SQL_LOCK_MPACK("$2::text"),
                                         2, g->lock_vals, NULL, NULL};
            g->lock_vals2[0] = j->repo_id;
            g->lock_vals2[1] = g->old_array;
            g->lock_qs[1] = (mh_db_pq_t){NULL,
                                         "SELECT NULL, NULL, (SELECT count(*) FROM mpack_refs WHERE repo_id = $1"
                                         " AND mpack_id = ANY ($2::text[]))",
                                         2, g->lock_vals2, NULL, NULL};
            mh_dbconn_pipeline(g->conn, g->lock_qs, 2, lock_pipeline_cb, g);
            break;
        }
        case G_PUT:
            g->busy = true;
            mh_store_put(j->store, g->pack_key, g->pack.p, g->pack.len, put_cb, g);
            break;
        case G_COPY:
            g->busy = true;
            mh_dbconn_copy_in(g->conn, "COPY tmp_gc FROM STDIN", g->rows.p, g->rows.len, step_cb, g);
            break;
        case G_APPLY:
            apply(g);
            break;
        case G_COMMIT:
            g->busy = true;
            mh_dbconn_script(g->conn, "COMMIT", step_cb, g);
            break;
        case G_COMMITTED:
            mh_dbconn_release(g->conn);
            g->conn = NULL;
            mh_info("job %s: mpack.gc of repo %s: %zu packs -> %s (%zu objects, %llu bytes read, %zu written)", j->id,
                    j->repo_id, g->nold, g->key.s, g->nblobs, (unsigned long long)g->bytes_read, g->pack.len);
            respond(g, false, (int64_t)g->nold, g->packs_after, g->key.s);
            return;
        case G_DONE:
            break;
        }
    }
}

void mh_job_gc_start(mh_job_t *j)
{
    gc_t *g = mh_calloc(&j->arena, sizeof *g);
    if (!g || mh_arena_defer(&j->arena, gc_cleanup_cb, g)) {
        mh_job_fail(j, false, "out of memory");
        return;
    }
    g->j = j;
    j->state = g;
    g->state = G_PACKS;
    advance(g);
}

/* ------------------------------------------------------- pack building */

int mh_gc_build_pack(mh_gc_blob_t *blobs, size_t *n, mh_buf_t *out, mh_id_t *key, size_t *bad)
{
    return mh_rw_blob_pack(blobs, n, true, out, key, bad);
}
