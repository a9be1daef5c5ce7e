/*
 * sweep.c — deletes superseded packs from the store (GitHub's cruft-pack
 * idea, SPEC 4.7 "mpack.gc"): a pack GC replaced stays readable for a
 * grace period, so a fetch or object read that located its bytes before
 * the swap still finds them; afterwards, once no mpack_index row points at
 * it and no mpack_refs row names it, its row and its bytes go.
 *
 * Per pack, one transaction on a held connection:
 *   BEGIN; the pack's advisory lock; DELETE its mpacks row if it is still
 *   superseded past the grace period and unreferenced (re-checked under
 *   the lock: a GC or an index job recreating the same pack takes the same
 *   lock and clears superseded_at); delete mpacks/<hex> from the store;
 *   COMMIT. A store failure rolls the row back, so the next sweep retries.
 * Several processes may sweep at once: the lock and the conditional
 * DELETE make each pack's deletion happen once.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs_internal.h"

#define SWEEP_BATCH 100

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
    mh_db_pq_t qs[2] = {
        {NULL, mh_rw_sql_pack_lock, 1, v, NULL, NULL},
        {NULL,
         "DELETE FROM mpacks m WHERE m.mpack_id = $1 AND m.superseded_at < now() - make_interval(secs => $2::int)"
         " AND NOT EXISTS (SELECT 1 FROM mpack_index i WHERE i.mpack_id = m.mpack_id)"
         " AND NOT EXISTS (SELECT 1 FROM mpack_refs r WHERE r.mpack_id = m.mpack_id) RETURNING 1",
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

static void candidates_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    sweep_t *s = ud;
    if (err) {
        if (err != MH_ECANCELED) mh_warn("sweep: listing candidates: %s (%s)", mh_strerror(err), errmsg ? errmsg : "");
        sweep_end(s);
        return;
    }
    int n = PQntuples(res);
    s->ids = mh_alloc(&s->arena, (size_t)(n ? n : 1) * sizeof *s->ids);
    if (!s->ids) {
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
                "SELECT m.mpack_id FROM mpacks m"
                " WHERE m.superseded_at < now() - make_interval(secs => $1::int)"
                " AND NOT EXISTS (SELECT 1 FROM mpack_index i WHERE i.mpack_id = m.mpack_id)"
                " AND NOT EXISTS (SELECT 1 FROM mpack_refs r WHERE r.mpack_id = m.mpack_id)"
                " ORDER BY m.superseded_at LIMIT $2::int",
                2, vals, NULL, NULL, candidates_cb, s);
}
