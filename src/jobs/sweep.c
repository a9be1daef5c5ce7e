/*
 * sweep.c — the maintenance pass's deletions.
 *
 * 1. Superseded packs (GitHub's cruft-pack idea, SPEC 4.7 "mpack.gc"):
 * a pack GC replaced stays readable for a
 * grace period, so a fetch or object read that located its bytes before
 * the swap still finds them; afterwards, once no mpack_index row points at
 * it and no mpack_refs or fetch_packs row names it, its row and its bytes
 * go. Fetch packs (kind 'fetch') get there through the fetch-cache prune
 * (4. below).
 *
 * Per pack, one transaction on a held connection:
 *   BEGIN; the pack's advisory lock; DELETE its mpacks row if it is still
 *   superseded past the grace period and unreferenced (re-checked under
 *   the lock: a GC or an index job recreating the same pack takes the same
 *   lock and clears superseded_at); delete mpacks/<hex> from the store;
 *   COMMIT. A store failure rolls the row back, so the next sweep retries.
 * Several processes may sweep at once: the lock and the conditional
 * DELETE make each pack's deletion happen once.
 *
 * 2. Abandoned staged uploads (SPEC 4.3, issue "nothing left behind"): a
 * push grant whose expiry is more than the grace period past has no use
 * any more (every lookup asks for unexpired grants, so a failed unpack
 * could be retried under it until it expired, SPEC 4.3); its staging key
 * incoming/<grant id> is deleted from the store, then the grant row. The
 * grace period after expiry covers an unpack that looked its grant up
 * just before it expired and is still reading the staged bytes. Only
 * keys of the incoming/ form are ever deleted here; a pack an unpack
 * already moved to mpacks/ is never touched (its rows may be committed
 * any moment by another push of the same bytes). A store error keeps the
 * row, so the next pass retries; deleting twice is harmless.
 *
 * 3. Then the store's own temporaries older than six hours
 * (mh_store_sweep_tmp: fs tmp/ files, s3 tmp/ objects and incomplete
 * multipart uploads of writers whose process died).
 *
 * 4. The fetch-answer cache (SPEC 4.4: fetch may answer from built
 * packs): fetch_packs rows older than MUSEHUB_FETCH_CACHE_SECONDS are
 * deleted, a batch per pass, in one statement that also supersedes each
 * fetch pack (kind 'fetch') none of the remaining rows names and no
 * mpack_refs or mpack_index row holds (a client may have pushed the same
 * bytes). The sweep (1.) then deletes the pack one grace period later,
 * re-checking every reference under the pack's lock; a fetch that
 * rebuilds the same bytes meanwhile revives it (fetch.c takes the same
 * lock and clears superseded_at). Rows of older ref states are never hit
 * again (answers are keyed by state_seq) and go the same way.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs_internal.h"

#define SWEEP_BATCH 100

/* SQL over a pack `m`: no index row locates an object in it and no
 * repository references it ... */
#define PACK_UNHELD                                                                                                    \
    " NOT EXISTS (SELECT 1 FROM mpack_index i WHERE i.mpack_id = m.mpack_id)"                                          \
    " AND NOT EXISTS (SELECT 1 FROM mpack_refs r WHERE r.mpack_id = m.mpack_id)"
/* ... and, superseded more than the grace period (the text of a $n
 * parameter, seconds) ago, no fetch answer names it either: what the
 * sweep deletes. The candidates' query and the re-check under the pack's
 * lock share it. */
#define PACK_SWEEPABLE(grace)                                                                                          \
    " m.superseded_at < now() - make_interval(secs => " grace "::int) AND" PACK_UNHELD                                 \
    " AND NOT EXISTS (SELECT 1 FROM fetch_packs fp WHERE fp.mpack_id = m.mpack_id)"
/* Temporaries untouched this long belong to no live stream (fs.c keeps
 * the same bound for its sweep at start-up). */
#define TMP_STALE_S (6u * 3600u)

typedef struct {
    mh_db_t *db;
    mh_store_t *store;
    char grace[16];
    bool (*stopping)(void *arg);
    void (*done)(void *arg, int deleted);
    void *arg;
    char **ids;
    size_t n, next;
    int deleted;
    mh_dbconn_t *conn;
    char key[MH_MPACK_KEY_SIZE];
    mh_arena_t arena;
} sweep_t;

static void next_pack(sweep_t *s);

static void sweep_end(sweep_t *s)
{
    if (s->conn) mh_dbconn_release(s->conn);
    mh__jobs_count_swept(s->deleted);
    void (*done)(void *, int) = s->done;
    void *arg = s->arg;
    int deleted = s->deleted;
    mh_arena_release(&s->arena);
    free(s);
    done(arg, deleted);
}

/* Ends the current pack's transaction (rolled back when still open) and
 * moves to the next one. */
static void pack_over(sweep_t *s)
{
    if (s->conn) {
        mh_dbconn_release(s->conn);
        s->conn = NULL;
    }
    next_pack(s);
}

static void commit_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    sweep_t *s = ud;
    if (err) mh_warn("sweep: commit for %s: %s (%s)", s->key, mh_strerror(err), errmsg ? errmsg : "");
    else s->deleted++;
    pack_over(s);
}

static void store_deleted_cb(void *ud, int err)
{
    sweep_t *s = ud;
    if (err) {
        mh_warn("sweep: deleting %s from the store: %s; kept for the next sweep", s->key, mh_strerror(err));
        pack_over(s); /* rolls the row back */
        return;
    }
    mh_dbconn_script(s->conn, "COMMIT", commit_cb, s);
}

static void delete_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    sweep_t *s = ud;
    if (err || n != 2) {
        mh_warn("sweep: %s: %s (%s)", s->key, mh_strerror(err ? err : MH_EDB), errmsg ? errmsg : "");
        pack_over(s);
        return;
    }
    if (PQntuples(results[1]) != 1) { /* revived or already swept */
        pack_over(s);
        return;
    }
    mh_store_delete(s->store, s->key, store_deleted_cb, s);
}

static void begin_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    sweep_t *s = ud;
    if (err) {
        mh_warn("sweep: begin: %s (%s)", mh_strerror(err), errmsg ? errmsg : "");
        pack_over(s);
        return;
    }
    const char *id = s->ids[s->next - 1];
    const char **v = mh_alloc(&s->arena, 2 * sizeof *v);
    if (!v) {
        pack_over(s);
        return;
    }
    v[0] = id;
    v[1] = s->grace;
    /* The pack's frames rows (v2, sql/0030) go with its row. */
    mh_db_pq_t qs[2] = {
        {NULL, mh_rw_sql_pack_lock, 1, v, NULL, NULL},
        {NULL,
         "WITH d AS (DELETE FROM mpacks m WHERE m.mpack_id = $1 AND" PACK_SWEEPABLE("$2") " RETURNING m.mpack_id),"
         " f AS (DELETE FROM mpack_frames x USING d WHERE x.mpack_id = d.mpack_id)"
         " SELECT 1 FROM d",
         2, v, NULL, NULL},
    };
    mh_dbconn_pipeline(s->conn, qs, 2, delete_cb, s);
}

static void acquire_cb(void *ud, mh_dbconn_t *c, int err)
{
    sweep_t *s = ud;
    if (err) {
        mh_warn("sweep: no database connection: %s", mh_strerror(err));
        sweep_end(s);
        return;
    }
    s->conn = c;
    mh_dbconn_script(c, "BEGIN", begin_cb, s);
}

static void next_pack(sweep_t *s)
{
    if (s->next >= s->n || (s->stopping && s->stopping(s->arg))) {
        sweep_end(s);
        return;
    }
    const char *id = s->ids[s->next++];
    mh_mpack_key(s->key, id);
    mh_db_acquire(s->db, acquire_cb, s);
}

/* The rows of a sweep's listing query, -1 when it failed (logged unless
 * the pool is closing). */
static int listed(PGresult *res, int err, const char *errmsg, const char *what)
{
    if (!err) return PQntuples(res);
    if (err != MH_ECANCELED) mh_warn("sweep: listing %s: %s (%s)", what, mh_strerror(err), errmsg ? errmsg : "");
    return -1;
}

static void candidates_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    sweep_t *s = ud;
    int n = listed(res, err, errmsg, "candidates");
    if (n < 0 || !(s->ids = mh_alloc(&s->arena, (size_t)(n ? n : 1) * sizeof *s->ids))) {
        sweep_end(s);
        return;
    }
    for (int i = 0; i < n; i++) {
        const char *id = mh_pq_str(res, i, 0);
        if (!mh_id_valid(id, strlen(id))) continue;
        if (!(s->ids[s->n] = mh_strdup(&s->arena, id))) break;
        s->n++;
    }
    next_pack(s);
}

void mh__jobs_sweep(mh_db_t *db, mh_store_t *store, uint32_t grace_s, bool (*stopping)(void *arg),
                    void (*done)(void *arg, int deleted), void *arg)
{
    sweep_t *s = calloc(1, sizeof *s);
    if (!s) {
        done(arg, 0); /* called from a db callback: already a later turn */
        return;
    }
    *s = (sweep_t){.db = db, .store = store, .stopping = stopping, .done = done, .arg = arg};
    mh_arena_init(&s->arena, 0);
    snprintf(s->grace, sizeof s->grace, "%u", grace_s);
    const char *vals[2] = {s->grace, NULL};
    char batch[16];
    snprintf(batch, sizeof batch, "%d", SWEEP_BATCH);
    vals[1] = batch;
    mh_db_query(db,
                "SELECT m.mpack_id FROM mpacks m WHERE" PACK_SWEEPABLE("$1") " ORDER BY m.superseded_at LIMIT $2::int",
                2, vals, NULL, NULL, candidates_cb, s);
}

/* ------------------------------------------------ the fetch-answer cache */

#define FETCH_PRUNE_BATCH 10000

typedef struct {
    void (*done)(void *arg, int rows, int packs);
    void *arg;
} fprune_t;

static void fetch_pruned_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    fprune_t p = *(fprune_t *)ud;
    free(ud);
    int n = listed(res, err, errmsg, "old fetch answers");
    p.done(p.arg, n > 0 ? (int)mh_pq_int(res, 0, 0) : 0, n > 0 ? (int)mh_pq_int(res, 0, 1) : 0);
}

void mh__jobs_prune_fetch(mh_db_t *db, uint32_t age_s, void (*done)(void *arg, int rows, int packs), void *arg)
{
    fprune_t *p = malloc(sizeof *p);
    if (!p) {
        done(arg, 0, 0); /* called from a db callback: already a later turn */
        return;
    }
    *p = (fprune_t){done, arg};
    char age[16], batch[16];
    snprintf(age, sizeof age, "%u", age_s);
    snprintf(batch, sizeof batch, "%d", FETCH_PRUNE_BATCH);
    const char *vals[2] = {age, batch};
    /* One snapshot: "the remaining rows" are those younger than the
     * cutoff; a row committed meanwhile is seen by the sweep's re-check
     * under the pack's lock, which never deletes a named pack. */
    mh_db_query(db,
                "WITH d AS (DELETE FROM fetch_packs WHERE ctid = ANY (ARRAY(SELECT ctid FROM fetch_packs"
                "   WHERE created_at < now() - make_interval(secs => $1::int) LIMIT $2::int)) RETURNING mpack_id),"
                " s AS (UPDATE mpacks m SET superseded_at = now() WHERE m.kind = 'fetch'"
                "   AND m.mpack_id IN (SELECT mpack_id FROM d WHERE mpack_id IS NOT NULL)"
                "   AND NOT EXISTS (SELECT 1 FROM fetch_packs fp WHERE fp.mpack_id = m.mpack_id"
                "     AND fp.created_at >= now() - make_interval(secs => $1::int))"
                "   AND" PACK_UNHELD " RETURNING 1)"
                " SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM s)",
                2, vals, NULL, NULL, fetch_pruned_cb, p);
}

/* ------------------------------------------------ abandoned staged uploads */

typedef struct {
    mh_db_t *db;
    mh_store_t *store;
    char grace[16];
    bool (*stopping)(void *arg);
    void (*done)(void *arg, int uploads, unsigned tmp);
    void *arg;
    char **ids, **keys;
    size_t n, next;
    int removed;
    unsigned tmp_removed;
    mh_arena_t arena;
} gsweep_t;

static void next_grant(gsweep_t *g);

static void gsweep_end(gsweep_t *g)
{
    void (*done)(void *, int, unsigned) = g->done;
    void *arg = g->arg;
    int removed = g->removed;
    unsigned tmp = g->tmp_removed;
    mh__jobs_count_staged_swept(removed, tmp);
    mh_arena_release(&g->arena);
    free(g);
    done(arg, removed, tmp);
}

static void tmp_swept_cb(void *ud, int err, unsigned removed)
{
    gsweep_t *g = ud;
    if (err) mh_warn("sweep: store temporaries: %s", mh_strerror(err));
    g->tmp_removed = removed;
    gsweep_end(g);
}

static void grant_deleted_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    gsweep_t *g = ud;
    if (err) mh_warn("sweep: grant %s: %s (%s)", g->ids[g->next - 1], mh_strerror(err), errmsg ? errmsg : "");
    else if (PQntuples(res) == 1) g->removed++;
    next_grant(g);
}

static void staged_deleted_cb(void *ud, int err)
{
    gsweep_t *g = ud;
    const char *id = g->ids[g->next - 1];
    if (err) {
        mh_warn("sweep: deleting %s from the store: %s; kept for the next sweep", g->keys[g->next - 1],
                mh_strerror(err));
        next_grant(g);
        return;
    }
    const char *vals[2] = {id, g->grace};
    mh_db_query(g->db,
                "DELETE FROM push_grants WHERE grant_id = $1"
                " AND expires_at < now() - make_interval(secs => $2::int) RETURNING 1",
                2, vals, NULL, NULL, grant_deleted_cb, g);
}

static void next_grant(gsweep_t *g)
{
    if (g->stopping && g->stopping(g->arg)) {
        gsweep_end(g);
        return;
    }
    if (g->next >= g->n) {
        mh_store_sweep_tmp(g->store, TMP_STALE_S, tmp_swept_cb, g);
        return;
    }
    const char *key = g->keys[g->next++];
    mh_store_delete(g->store, key, staged_deleted_cb, g);
}

static void grants_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    gsweep_t *g = ud;
    int n = listed(res, err, errmsg, "expired grants");
    size_t cap = n > 0 ? (size_t)n : 1;
    if (n < 0 || !(g->ids = mh_alloc(&g->arena, cap * sizeof *g->ids)) ||
        !(g->keys = mh_alloc(&g->arena, cap * sizeof *g->keys))) {
        gsweep_end(g);
        return;
    }
    for (int i = 0; i < n; i++) {
        const char *id = mh_pq_str(res, i, 0), *key = mh_pq_str(res, i, 1);
        /* Only ever a staging key: never anything under mpacks/. */
        if (!mh_store_staging_key_valid(key)) {
            mh_warn("sweep: grant %s names staging key '%s', not incoming/<id>; left alone", id, key);
            continue;
        }
        g->ids[g->n] = mh_strdup(&g->arena, id);
        g->keys[g->n] = mh_strdup(&g->arena, key);
        if (!g->ids[g->n] || !g->keys[g->n]) break;
        g->n++;
    }
    next_grant(g);
}

void mh__jobs_sweep_staged(mh_db_t *db, mh_store_t *store, uint32_t grace_s, bool (*stopping)(void *arg),
                          void (*done)(void *arg, int uploads, unsigned tmp), void *arg)
{
    gsweep_t *g = calloc(1, sizeof *g);
    if (!g) {
        done(arg, 0, 0); /* called from a db callback: already a later turn */
        return;
    }
    g->db = db;
    g->store = store;
    g->stopping = stopping;
    g->done = done;
    g->arg = arg;
    mh_arena_init(&g->arena, 0);
    snprintf(g->grace, sizeof g->grace, "%u", grace_s);
    char batch[16];
    snprintf(batch, sizeof batch, "%d", SWEEP_BATCH);
    const char *vals[2] = {g->grace, batch};
    mh_db_query(db,
                "SELECT grant_id, staging_key FROM push_grants"
                " WHERE expires_at < now() - make_interval(secs => $1::int) ORDER BY expires_at LIMIT $2::int",
                2, vals, NULL, NULL, grants_cb, g);
}
