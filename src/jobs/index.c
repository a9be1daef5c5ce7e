/*
 * index.c — the mpack.index job (SPEC 4.7): records, for every blob of one
 * pack, an objects row (mpack://<key>#<offset>:<length>), an mpack_index
 * row and an object ref for the job's repository, plus the pack's mpacks
 * and mpack_refs rows, in one transaction written with COPY.
 *
 * Which bytes it may read, and what it must check (DESIGN 5: bytes are
 * verified once, where they enter):
 *  - the repository references the pack (mpack_refs): the pack was
 *    verified when it entered (unpack hashed the pack and every blob) or
 *    the server built it (GC, server-side commits) -> read mpacks/<hex>,
 *    no hashing at all;
 *  - the repository holds an unexpired grant whose upload the server has
 *    already verified (verified_at) -> read the staged key, or
 *    mpacks/<hex> when an unpack already moved it there; no hashing;
 *  - an unexpired grant never verified -> read the staged key only, hash
 *    the whole pack against its key AND every blob against its id (the
 *    same checks as unpack: the pack hash proves the bytes arrived as the
 *    sender made them, not that the sender named its blobs truthfully, and
 *    a false id would poison every repository sharing the object); then
 *    mark the grant verified and move the pack to mpacks/<hex>;
 *  - neither: permanent failure (the API refuses such jobs with 404; this
 *    covers a grant that expired before the job ran).
 *
 * Idempotent: every insert is ON CONFLICT DO NOTHING, so a second run (a
 * retry after a crash, a duplicate job) writes nothing and reports 0.
 * objects_written counts the blobs this run newly indexed in this pack
 * (mpack_index rows inserted; their objects rows are inserted alongside
 * when the object was unknown), object_refs_written the object refs the
 * repository newly gained.
 */
#include <stdlib.h>
#include <string.h>

#include "jobs_internal.h"

typedef enum {
    I_LOOKUP,
    I_READ,
    I_PARSE,
    I_MARK,
    I_ACQUIRE,
    I_BEGIN,
    I_LOCK,
    I_MOVE,
    I_COPY,
    I_INSERT,
    I_COMMIT,
    I_COMMITTED,
    I_DONE,
} istate_t;

typedef struct {
    mh_job_t *j;
    istate_t state;
    bool busy;
    mh_id_t key;
    char pack_key[MH_MPACK_KEY_SIZE];
    char *grant_id, *staging_key;
    const char *src;       /* the key read */
    bool trusted;          /* verified at entry or built by the server */
    mh_buf_t bytes;
    mh_pack_t pack;
    mh_buf_t rows;
    size_t nrows;
    uv_work_t uvw;
    int work_err;
    const char *work_why;
    mh_dbconn_t *conn;
    int64_t objects_written, refs_written;
} index_t;

static void advance(index_t *x);

static void index_cleanup_cb(void *arg)
{
    index_t *x = arg;
    if (x->conn) mh_dbconn_release(x->conn); /* rolls back an open transaction */
    x->conn = NULL;
    mh_buf_free(&x->bytes);
    mh_buf_free(&x->rows);
}

static void end_fail(index_t *x, bool permanent, const char *what, int err, const char *detail)
{
    x->state = I_DONE;
    if (x->conn) {
        mh_dbconn_release(x->conn);
        x->conn = NULL;
    }
    mh_job_fail(x->j, permanent, "mpack.index %s: %s: %s%s%s", x->key.s, what, mh_strerror(err),
                detail && *detail ? ": " : "", detail ? detail : "");
}

/* -------------------------------------------------------------- steps */

static void lookup_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    index_t *x = ud;
    x->busy = false;
    if (err) {
        end_fail(x, false, "lookup", err, errmsg);
        return;
    }
    mh_arena_t *a = &x->j->arena;
    bool referenced = mh_pq_str(res, 0, 0)[0] == 't';
    bool has_grant = !mh_pq_isnull(res, 0, 1);
    if (referenced) {
        x->src = x->pack_key;
        x->trusted = true;
    } else if (has_grant) {
        x->grant_id = mh_strdup(a, mh_pq_str(res, 0, 1));
        x->staging_key = mh_strdup(a, mh_pq_str(res, 0, 2));
        x->trusted = mh_pq_str(res, 0, 3)[0] == 't';
        x->src = x->staging_key;
        if (!x->grant_id || !x->staging_key) {
            end_fail(x, false, "lookup", MH_ENOMEM, NULL);
            return;
        }
    } else {
        x->state = I_DONE;
        mh_job_fail(x->j, true,
                    "mpack.index %s: the repository neither references this pack nor holds an unexpired push grant "
                    "for it",
                    x->key.s);
        return;
    }
    x->state = I_READ;
    advance(x);
}

static void read_cb(void *ud, int err, mh_buf_t *data)
{
    index_t *x = ud;
    x->busy = false;
    if (err == MH_ENOENT && x->trusted && x->grant_id && x->src != x->pack_key) {
        /* A verified grant's upload that an unpack (or an earlier run)
         * already moved into place. Only a verified grant may read from
         * there: an unverified one must have uploaded the bytes itself. */
        x->src = x->pack_key;
        x->state = I_READ;
        advance(x);
        return;
    }
    if (err) {
        /* Retried: an upload may still be in flight, the store may be
         * down. */
        end_fail(x, false, x->src == x->pack_key ? "reading the pack" : "reading the staged upload", err, x->src);
        return;
    }
    x->bytes = *data;
    *data = (mh_buf_t){0};
    if (x->bytes.len > x->j->cfg->max_pack_bytes) {
        end_fail(x, true, "pack too large", MH_ELIMIT, NULL);
        return;
    }
    x->state = I_PARSE;
    advance(x);
}

/* Thread pool: (untrusted only) pack hash and blob hashes; parse; rows. */
static void parse_work(uv_work_t *w)
{
    index_t *x = w->data;
    mh_arena_t *a = &x->j->arena; /* not touched by the loop meanwhile */
    if (!x->trusted) {
        uint8_t d[32];
        mh_id_t got;
        mh_sha256(x->bytes.p, x->bytes.len, d);
        mh_id_from_digest(&got, d);
        if (memcmp(got.s, x->key.s, MH_ID_LEN) != 0) {
            x->work_err = MH_EHASH;
            x->work_why = "the staged upload does not hash to mpack_key";
            return;
        }
    }
    const char *why = NULL;
    int rc = mh_pack_read(a, x->bytes.p, x->bytes.len, &mh_pack_limits_default, &x->pack, &why);
    if (rc) {
        x->work_err = rc;
        x->work_why = why;
        return;
    }
    if (!x->trusted) {
        size_t bad = 0;
        if (mh_pack_verify_blobs(x->bytes.p, &x->pack, &bad)) {
            x->work_err = MH_EHASH;
            x->work_why = mh_sprintf(a, "blobs[%zu] (%.*s): content does not hash to its object_id", bad,
                                     (int)x->pack.blobs[bad].object_id.n, x->pack.blobs[bad].object_id.p);
            return;
        }
    }
    x->work_err = mh_index_copy_rows(&x->pack, &x->rows, &x->nrows);
}

static void parse_done_cb(uv_work_t *w, int status)
{
    index_t *x = w->data;
    x->busy = false;
    if (status) x->work_err = MH_ECANCELED;
    if (x->work_err) {
        /* A pack that does not parse or hash will not on a retry either. */
        bool permanent = x->work_err == MH_EPARSE || x->work_err == MH_EHASH || x->work_err == MH_ELIMIT;
        end_fail(x, permanent, "checking the pack", x->work_err, x->work_why);
        return;
    }
    x->state = x->trusted ? I_ACQUIRE : I_MARK;
    advance(x);
}

static void step_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    (void)res;
    index_t *x = ud;
    x->busy = false;
    if (err) {
        end_fail(x, false, "database", err, errmsg);
        return;
    }
    x->state++;
    advance(x);
}

static void acquire_cb(void *ud, mh_dbconn_t *c, int err)
{
    index_t *x = ud;
    x->busy = false;
    if (err) {
        end_fail(x, false, "no database connection", err, NULL);
        return;
    }
    x->conn = c;
    x->state = I_BEGIN;
    advance(x);
}

static void head_cb(void *ud, int err, uint64_t size)
{
    index_t *x = ud;
    x->busy = false;
    if (!err && size != x->bytes.len) err = MH_ESTORE;
    if (err) {
        end_fail(x, false, "the staged upload vanished and the pack is not in place", err, x->pack_key);
        return;
    }
    x->state = I_COPY;
    advance(x);
}

static void move_cb(void *ud, int err)
{
    index_t *x = ud;
    x->busy = false;
    if (err == MH_ENOENT) {
        /* The staged key is gone: the grant's own unpack moved it into
         * place meanwhile. Make sure it is there before referencing it. */
        x->busy = true;
        mh_store_head(x->j->store, x->pack_key, head_cb, x);
        return;
    }
    if (err) {
        end_fail(x, false, "moving the pack into place", err, NULL);
        return;
    }
    x->state = I_COPY;
    advance(x);
}

static void insert_cb(void *ud, PGresult **results, int n, int err, const char *errmsg)
{
    index_t *x = ud;
    x->busy = false;
    if (err || n != 5) {
        end_fail(x, false, "writing the index", err ? err : MH_EDB, errmsg);
        return;
    }
    x->objects_written = mh_pq_int(results[1], 0, 0);
    x->refs_written = mh_pq_int(results[4], 0, 0);
    x->state = I_COMMIT;
    advance(x);
}

static void finish_ok(index_t *x)
{
    mh_job_t *j = x->j;
    mh_dbconn_release(x->conn);
    x->conn = NULL;
    x->state = I_DONE;
    mh_arena_t *a = &j->arena;
    mh_val_t *m = mh_v_map(a);
    int rc = m ? 0 : MH_ENOMEM;
    if (!rc) rc = mh_map_put(a, m, "objects_written", mh_v_int(x->objects_written));
    if (!rc) rc = mh_map_put(a, m, "object_refs_written", mh_v_int(x->refs_written));
    if (!rc) rc = mh_map_put(a, m, "elapsed_ms", mh_v_int(mh_job_elapsed_ms_int(j)));
    if (!rc) rc = mh_map_put(a, m, "mpack_key", mh_v_str(x->key.s));
    if (!rc) rc = mh_map_put(a, m, "blobs", mh_v_int((int64_t)x->nrows));
    if (rc) mh_job_fail(j, false, "out of memory");
    else mh_job_done(j, m);
}

static const char sql_begin[] =
    "BEGIN;"
    "CREATE TEMP TABLE tmp_index (object_id text, byte_offset bigint, byte_length bigint) ON COMMIT DROP";

static const char *const istate_names[] = {"lookup", "read", "parse",  "mark",   "acquire",   "begin", "lock",
                                           "move",   "copy", "insert", "commit", "committed", "done"};

static void advance(index_t *x)
{
    mh_job_t *j = x->j;
    while (!x->busy && x->state != I_DONE) {
        /* Once committed the work is done: report it even when stopping. */
        if (x->state != I_COMMITTED && mh_job_cancelled(j)) {
            end_fail(x, false, "stopped", MH_ECANCELED, "cancelled");
            return;
        }
        mh_debug("job %s: mpack.index step %s (%.1f ms)", j->id, istate_names[x->state], mh_job_elapsed_ms(j));
        switch (x->state) {
        case I_LOOKUP: {
            x->busy = true;
            const char *vals[2] = {j->repo_id, x->key.s};
            mh_db_query(j->db,
                        "SELECT EXISTS (SELECT 1 FROM mpack_refs WHERE repo_id = $1 AND mpack_id = $2),"
                        " g.grant_id, g.staging_key, (g.verified_at IS NOT NULL)::text"
                        " FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT grant_id, staging_key, verified_at"
                        "  FROM push_grants WHERE repo_id = $1 AND mpack_key = $2 AND consumed_at IS NULL"
                        "  AND expires_at > now() ORDER BY verified_at IS NOT NULL DESC, created_at DESC LIMIT 1)"
                        " g ON true",
                        2, vals, NULL, NULL, lookup_cb, x);
            break;
        }
        case I_READ:
            x->busy = true;
            mh_store_get(j->store, x->src, 0, UINT64_MAX, read_cb, x);
            break;
        case I_PARSE:
            x->busy = true;
            x->uvw.data = x;
            uv_queue_work(j->loop, &x->uvw, parse_work, parse_done_cb);
            break;
        case I_MARK: {
            /* Durable before the pack leaves its staging key: a retry
             * after a later failure must be allowed to read it from
             * mpacks/ (the same rule as unpack's). */
            x->busy = true;
            const char *vals[1] = {x->grant_id};
            mh_db_query(j->db, "UPDATE push_grants SET verified_at = coalesce(verified_at, now()) WHERE grant_id = $1",
                        1, vals, NULL, NULL, step_cb, x);
            break;
        }
        case I_ACQUIRE:
            x->busy = true;
            mh_db_acquire(j->db, acquire_cb, x);
            break;
        case I_BEGIN:
            x->busy = true;
            mh_dbconn_script(x->conn, sql_begin, step_cb, x);
            break;
        case I_LOCK: {
            /* The sweep deletes a superseded pack's row and bytes under
             * this lock; holding it while the pack is moved into place and
             * referenced means the sweep either finished before (and the
             * move recreates the bytes) or sees the new refs after. */
            x->busy = true;
            /* The repository row first, as push does: every writer of a
             * repository's ref rows holds it (docs/architecture.md), in
             * the same order (repository, then pack) so none deadlock. */
            const char *vals[2] = {x->key.s, x->j->repo_id};
            mh_dbconn_query(x->conn,
                            "SELECT (SELECT count(*) FROM (SELECT 1 FROM repos WHERE repo_id = $2 FOR UPDATE) r), "
                            MH_SQL_LOCK_MPACK("$1::text"),
                            2, vals, NULL, NULL, step_cb, x);
            break;
        }
        case I_MOVE:
            if (x->src == x->pack_key) {
                x->state = I_COPY;
                break;
            }
            x->busy = true;
            mh_store_move(j->store, x->src, x->pack_key, move_cb, x);
            break;
        case I_COPY:
            x->busy = true;
            mh_dbconn_copy_in(x->conn, "COPY tmp_index FROM STDIN", x->rows.p, x->rows.len, step_cb, x);
            break;
        case I_INSERT: {
            x->busy = true;
            mh_arena_t *a = &j->arena;
            const char **v = mh_alloc(a, 3 * sizeof *v);
            char *size = mh_sprintf(a, "%zu", x->bytes.len);
            if (!v || !size) {
                end_fail(x, false, "writing the index", MH_ENOMEM, NULL);
                return;
            }
            v[0] = j->repo_id;
            v[1] = x->key.s;
            v[2] = size;
            mh_db_pq_t qs[5] = {
                {NULL,
                 "WITH x AS (INSERT INTO objects (object_id, size_bytes, storage_uri)"
                 " SELECT object_id, byte_length, 'mpack://' || $1::text || '#' || byte_offset || ':' || byte_length"
                 " FROM tmp_index ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM x",
                 1, v + 1, NULL, NULL},
                {NULL,
                 "WITH x AS (INSERT INTO mpack_index (object_id, mpack_id, byte_offset, byte_length)"
                 " SELECT object_id, $1::text, byte_offset, byte_length FROM tmp_index ON CONFLICT DO NOTHING"
                 " RETURNING 1) SELECT count(*) FROM x",
                 1, v + 1, NULL, NULL},
                /* Referenced again: no longer a candidate for the sweep. */
                {NULL,
                 "INSERT INTO mpacks (mpack_id, size_bytes, kind) VALUES ($1, $2::bigint, 'push')"
                 " ON CONFLICT (mpack_id) DO UPDATE SET superseded_at = NULL WHERE mpacks.superseded_at IS NOT NULL",
                 2, v + 1, NULL, NULL},
                {NULL, "INSERT INTO mpack_refs (repo_id, mpack_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", 2, v, NULL,
                 NULL},
                {NULL,
                 "WITH x AS (INSERT INTO object_refs (repo_id, object_id) SELECT $1, object_id FROM tmp_index"
                 " ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM x",
                 1, v, NULL, NULL},
            };
            mh_dbconn_pipeline(x->conn, qs, 5, insert_cb, x);
            break;
        }
        case I_COMMIT:
            x->busy = true;
            mh_dbconn_script(x->conn, "COMMIT", step_cb, x);
            break;
        case I_COMMITTED:
            finish_ok(x);
            return;
        case I_DONE:
            break;
        }
    }
}

void mh_job_index_start(mh_job_t *j)
{
    index_t *x = mh_calloc(&j->arena, sizeof *x);
    if (!x || mh_arena_defer(&j->arena, index_cleanup_cb, x)) {
        mh_job_fail(j, false, "out of memory");
        return;
    }
    x->j = j;
    j->state = x;
    const mh_val_t *k = mh_val_get(&j->payload, "mpack_key");
    if (!k || k->t != MH_V_STR || !mh_id_valid(k->v.s.p, k->v.s.n)) {
        mh_job_fail(j, true, "payload.mpack_key must be sha256:<64 lowercase hex>");
        return;
    }
    memcpy(x->key.s, k->v.s.p, MH_ID_LEN);
    x->key.s[MH_ID_LEN] = 0;
    mh_mpack_key(x->pack_key, x->key.s);
    x->state = I_LOOKUP;
    advance(x);
}

/* ------------------------------------------------------------ helpers */
