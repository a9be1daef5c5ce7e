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
 *   BUILD   thread pool: refwrite's server pack with every blob checked
 *           against its id, the new byte ranges, the key
 *   the transaction, refwrite's lock order (the repository row, then the
 *   new pack's lock, as every ref writer):
 *     RECOUNT the packs read in PACKS are all still referenced (a
 *             concurrent GC of the same repository: retry)
 *     PUT     the pack to mpacks/<hex> (under the pack's lock, so a sweep
 *             of an identical, long-superseded pack cannot delete the
 *             bytes between the put and the commit)
 *     COPY, APPLY  refwrite's pack rows (kind gc, no longer superseded;
 *             its mpack_index rows; its mpack_refs row), the old packs'
 *             refs removed, and for each old pack that no repository
 *             references any more: its index rows for the consolidated
 *             objects deleted and superseded_at set; objects.storage_uri
 *             repointed
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs_internal.h"

#define READS_IN_FLIGHT 2

typedef struct gc gc_t;

typedef struct {
    gc_t *g;
    char key[MH_MPACK_KEY_SIZE];
    size_t first, n; /* blobs[first .. first+n) in read order */
    mh_range_t *ranges;
    mh_buf_t buf;
} src_t;

struct gc {
    mh_step_t step;
    mh_job_t *j;
    char **old; /* the repository's packs (ids) */
    size_t nold;
    char *old_array; /* text[] literal of old */
    bool skipped;
    mh_rw_blob_t *blobs;
    size_t nblobs, unindexed;
    src_t *srcs;
    size_t nsrcs, next_src, inflight;
    int read_err;
    uint64_t bytes_read;
    mh_buf_t pack, rows;
    mh_id_t key;
    char pack_key[MH_MPACK_KEY_SIZE], size[24];
    size_t bad;
    bool permanent;
    int64_t packs_after;
};

#define GC(s) MH_STEP_OP(s, gc_t, step)

enum { G_PACKS, G_LOCATE, G_READ, G_BUILD, G_ACQUIRE, G_BEGIN, G_RECOUNT, G_PUT, G_COPY, G_APPLY, G_COMMIT, G_DONE };

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

/* Rows come ordered by (source pack, offset): one source per run. */
static int add_blob(gc_t *g, PGresult *res, int r, mh_range_t *ranges, const char **prev)
{
    mh_arena_t *a = &g->j->arena;
    const char *oid = mh_pq_str(res, r, 0), *mp = mh_pq_str(res, r, 1);
    int64_t off = mh_pq_int(res, r, 2), len = mh_pq_int(res, r, 3);
    if (!mh_id_valid(oid, strlen(oid)) || !mh_id_valid(mp, strlen(mp)) || off < 0 || len < 0) {
        g->permanent = true;
        return MH_EPARSE;
    }
    if (!*prev || strcmp(*prev, mp) != 0) {
        src_t *src = &g->srcs[g->nsrcs++];
        src->g = g;
        mh_mpack_key(src->key, mp);
        src->first = g->nblobs;
        src->ranges = &ranges[g->nblobs];
        *prev = mp;
    }
    mh_rw_blob_t *b = &g->blobs[g->nblobs];
    if (!(b->id = mh_strndup(a, oid, MH_ID_LEN))) return MH_ENOMEM;
    b->len = (uint64_t)len;
    ranges[g->nblobs++] = (mh_range_t){(uint64_t)off, (uint64_t)len};
    g->srcs[g->nsrcs - 1].n++;
    return 0;
}

static int located(mh_step_t *s, PGresult *res)
{
    gc_t *g = GC(s);
    mh_arena_t *a = &g->j->arena;
    size_t rows = (size_t)PQntuples(res);
    g->blobs = calloc(rows + 1, sizeof *g->blobs);
    mh_range_t *ranges = mh_alloc(a, (rows + 1) * sizeof *ranges);
    g->srcs = mh_calloc(a, (rows + 1) * sizeof *g->srcs);
    if (!g->blobs || !ranges || !g->srcs) return MH_ENOMEM;
    const char *prev = NULL;
    uint64_t total = 0;
    for (size_t r = 0; r < rows; r++) {
        if (mh_pq_isnull(res, (int)r, 1)) {
            if (!g->unindexed)
                mh_warn("job %s: mpack.gc: object %s has no mpack_index row; left out", g->j->id,
                        mh_pq_str(res, (int)r, 0));
            g->unindexed++;
            continue;
        }
        int rc = add_blob(g, res, (int)r, ranges, &prev);
        if (rc) {
            mh_step_fail(s, rc, "malformed mpack_index row");
            return rc;
        }
        total += g->blobs[g->nblobs - 1].len;
    }
    if (total > g->j->cfg->max_pack_bytes) {
        g->permanent = true;
        mh_step_fail(s, MH_ELIMIT, "the repository's blobs exceed the largest pack allowed");
    }
    return 0;
}

static void step_locate(mh_step_t *s)
{
    gc_t *g = GC(s);
    /* One source per object: the repository's own packs first, then packs
     * not superseded, then by id so reruns agree. */
    mh_db_pq_t q = {NULL,
                    "SELECT r.object_id, i.mpack_id, i.byte_offset, i.byte_length FROM object_refs r"
                    " LEFT JOIN LATERAL (SELECT m.mpack_id, m.byte_offset, m.byte_length FROM mpack_index m"
                    "  LEFT JOIN mpacks p ON p.mpack_id = m.mpack_id"
                    "  WHERE m.object_id = r.object_id AND coalesce(p.kind, 'push') <> 'fetch'"
                    "  ORDER BY m.mpack_id <> ALL ($2::text[]), p.superseded_at IS NOT NULL,"
                    "  m.mpack_id COLLATE \"C\" LIMIT 1) i ON true"
                    " WHERE r.repo_id = $1 ORDER BY i.mpack_id COLLATE \"C\", i.byte_offset",
                    2, (const char *const[]){g->j->repo_id, g->old_array}, NULL, NULL};
    mh_step_query(s, &q, located);
}

/* ---------------------------------------------------------------- READ */

static void start_reads(gc_t *g);

static void read_cb(void *ud, int err, mh_buf_t *data)
{
    src_t *src = ud;
    gc_t *g = src->g;
    g->inflight--;
    if (!err) {
        src->buf = *data;
        *data = (mh_buf_t){0};
        uint64_t pos = 0;
        for (size_t k = 0; k < src->n && !err; k++) {
            mh_rw_blob_t *b = &g->blobs[src->first + k];
            if (pos + b->len > src->buf.len) err = MH_ESTORE;
            b->content = src->buf.p + pos;
            pos += b->len;
        }
        if (!err && pos != src->buf.len) err = MH_ESTORE;
        g->bytes_read += src->buf.len;
    }
    if (err && !g->read_err) {
        g->read_err = err;
        mh_warn("job %s: mpack.gc: reading %s: %s", g->j->id, src->key, mh_strerror(err));
    }
    start_reads(g);
}

static void start_reads(gc_t *g)
{
    while (!g->read_err && !mh__job_cancelled(g->j) && g->next_src < g->nsrcs && g->inflight < READS_IN_FLIGHT) {
        src_t *src = &g->srcs[g->next_src++];
        g->inflight++;
        mh_store_get_ranges(g->j->store, src->key, src->ranges, src->n, read_cb, src);
    }
    /* Cancellation is noticed by the kit before the next step. */
    if (!g->inflight) mh_step_resume(&g->step, g->read_err, "reading the source packs");
}

static void step_read(mh_step_t *s)
{
    gc_t *g = GC(s);
    mh_step_wait(s);
    start_reads(g);
}

/* --------------------------------------------------------------- BUILD */

static void build_work(mh_step_t *s)
{
    gc_t *g = GC(s);
    int rc = mh_gc_build_pack(g->blobs, &g->nblobs, &g->pack, &g->key, &g->bad);
    if (!rc) rc = mh_rw_blob_rows(g->blobs, g->nblobs, &g->rows);
    if (rc == MH_EHASH) {
        /* An index row whose byte range does not hold the object: never
         * spread it into a new pack. Retrying will not fix it. */
        g->permanent = true;
        s->work_why = mh_sprintf(&g->j->arena, "object %.*s: the indexed byte range does not hash to its id",
                                 MH_ID_LEN, g->blobs[g->bad].id);
    }
    s->work_err = rc;
}

static void step_build(mh_step_t *s) { mh_step_work(s, build_work); }

/* ------------------------------------------------------------------ TX */

static void step_acquire(mh_step_t *s)
{
    gc_t *g = GC(s);
    /* The sources are no longer needed: free them before the transaction. */
    for (size_t i = 0; i < g->nsrcs; i++) mh_buf_free(&g->srcs[i].buf);
    mh_mpack_key(g->pack_key, g->key.s);
    snprintf(g->size, sizeof g->size, "%zu", g->pack.len);
    mh_step_acquire(s);
}

static void step_begin(mh_step_t *s)
{
    gc_t *g = GC(s);
    /* The repository row serialises every GC of one repository (and every
     * other ref writer); then the new pack's lock. */
    mh_rw_begin(s, g->j->repo_id, g->key.s, MH_RW_OBJECTS);
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

static int put_done(mh_step_t *s, int err)
{
    if (err) mh_step_fail(s, err, "storing the consolidated pack");
    return err;
}

static void step_put(mh_step_t *s) { mh_step_put(s, GC(s)->pack_key, GC(s)->pack.p, GC(s)->pack.len, put_done); }

static void step_copy(mh_step_t *s) { mh_rw_copy(s, MH_RW_OBJECTS, &GC(s)->rows); }

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
    const char *repo = g->j->repo_id, *key = g->key.s;
    mh_rw_pack_t pack = {repo, key, g->size, "gc", false};
    mh_db_batch_t b = {0};
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
    /* The objects' informational URI follows the index. */
    mh_db_batch_add(&b,
                    "UPDATE objects o SET storage_uri = 'mpack://' || $1::text || '#' || t.byte_offset || ':' ||"
                    " t.byte_length FROM tmp_objects t WHERE o.object_id = t.object_id AND o.storage_uri IS DISTINCT"
                    " FROM ('mpack://' || $1::text || '#' || t.byte_offset || ':' || t.byte_length)",
                    1, key);
    /* packs_after (a push landing meanwhile counts). */
    mh_db_batch_add(&b, "SELECT count(*) " SQL_PACKS, 1, repo);
    mh_step_batch(s, &b, applied);
}


static void step_done(mh_step_t *s)
{
    gc_t *g = GC(s);
    mh_info("job %s: mpack.gc of repo %s: %zu packs -> %s (%zu objects, %llu bytes read, %zu written)", g->j->id,
            g->j->repo_id, g->nold, g->key.s, g->nblobs, (unsigned long long)g->bytes_read, g->pack.len);
    mh_step_done(s);
}

static const mh_step_def_t gc_steps[] = {
    [G_PACKS] = {"packs", step_packs},       [G_LOCATE] = {"locate", step_locate}, [G_READ] = {"read", step_read},
    [G_BUILD] = {"build", step_build},       [G_ACQUIRE] = {"acquire", step_acquire},
    [G_BEGIN] = {"begin", step_begin},       [G_RECOUNT] = {"recount", step_recount},
    [G_PUT] = {"put", step_put},             [G_COPY] = {"copy", step_copy},       [G_APPLY] = {"apply", step_apply},
    [G_COMMIT] = {"commit", mh_step_commit},    [G_DONE] = {"done", step_done},
};

static void gc_finish(mh_step_t *s)
{
    gc_t *g = GC(s);
    mh_vb_t b;
    mh_vb_init(&b, &g->j->arena);
    mh_val_t *m = mh_vb_map(&b);
    const char *key = g->skipped ? (g->nold == 1 ? g->old[0] : NULL) : g->key.s;
    mh_vb_put(&b, m, "packs_before", mh_v_int((int64_t)g->nold));
    mh_vb_put(&b, m, "packs_after", mh_v_int(g->packs_after));
    mh_vb_put(&b, m, "consolidated_key", key ? mh_v_str(key) : mh_v_nil());
    mh_vb_put(&b, m, "skipped", mh_v_bool(g->skipped));
    if (!g->skipped) {
        mh_vb_put(&b, m, "objects", mh_v_int((int64_t)g->nblobs));
        mh_vb_put(&b, m, "bytes_read", mh_v_int((int64_t)g->bytes_read));
        mh_vb_put(&b, m, "bytes_written", mh_v_int((int64_t)g->pack.len));
        if (g->unindexed) mh_vb_put(&b, m, "unindexed_objects", mh_v_int((int64_t)g->unindexed));
    }
    mh_vb_put(&b, m, "elapsed_ms", mh_v_int(mh__job_elapsed_ms_int(g->j)));
    mh__job_end(g->j, s, "mpack.gc", g->permanent || s->err == MH_ENOENT, &b, m);
}

static void gc_cleanup_cb(void *arg)
{
    gc_t *g = arg;
    for (size_t i = 0; i < g->nsrcs; i++) mh_buf_free(&g->srcs[i].buf);
    mh_buf_free(&g->pack);
    mh_buf_free(&g->rows);
    free(g->blobs);
}

void mh__job_gc_start(mh_job_t *j)
{
    gc_t *g = MH__JOB_NEW(j, gc_t, gc_steps, G_DONE, gc_finish, gc_cleanup_cb);
    if (!g) return;
    g->j = j;
    mh_step_run(&g->step);
}

/* ------------------------------------------------------- pack building */

int mh_gc_build_pack(mh_gc_blob_t *blobs, size_t *n, mh_buf_t *out, mh_id_t *key, size_t *bad)
{
    return mh_rw_blob_pack(blobs, n, true, out, key, bad);
}
