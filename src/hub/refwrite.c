/*
 * refwrite.c — the one write path of a repository's refs (mh/refwrite.h):
 * the transaction's lock order, the ref rows and the global rows they
 * name, every branch move and server-side commits (the staged-upload
 * grant protocol is in upload.c). Push, server-side commits, merges, mpack.index,
 * mpack.gc and repository deletion all write through here; the SQL that
 * touches ref rows or branches exists nowhere else.
 *
 * Invariants:
 *  - Lock order, each lock its own statement: (1) the repository row FOR
 *    UPDATE (mh_rw_begin), (2) the pack's advisory lock (mh_rw_begin, and
 *    the sweep's own transaction), (3) rows an operation adds (a
 *    proposal), (4) the branch row FOR UPDATE (mh_rw_move_check). Under
 *    READ COMMITTED every statement after a lock sees what the previous
 *    holder committed; a locked row is re-read at its newest version.
 *  - Every writer of a repository's ref rows holds its repository row, so
 *    ref rows are inserted with a sorted anti-join and a plain INSERT
 *    (ON CONFLICT doubled the cost), and commit_refs.ref_seq numbers
 *    become visible in order (graph.c relies on it, sql/0009).
 *  - Every branch move bumps repos.state_seq in its statement: the caches
 *    keyed by (repository, state_seq) never serve a state they were not
 *    built for.
 *  - Parameters only: no SQL is built from ids.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mh/refwrite.h"

/* ================================================ transaction, lock order */

/* The staging tables live as long as the session (mh/refwrite.h): IF NOT
 * EXISTS makes the first writer on a connection create them (a NOTICE,
 * logged at debug level, the other times), ON COMMIT DELETE ROWS empties
 * them at every COMMIT that touches a temporary table, a ROLLBACK hides
 * its rows (or takes the tables, when it created them), and the pool
 * drops them from a session given back after a ROLLBACK (DISCARD TEMP,
 * mh/db.h). */
#define TMP_TABLE(name, cols) "CREATE TEMP TABLE IF NOT EXISTS " name " (" cols ") ON COMMIT DELETE ROWS"
static const char sql_tmp_commits[] =
    TMP_TABLE("tmp_commits", "commit_id text, parent_commit_id text, parent2_commit_id text, snapshot_id text,"
                             " message text, author text, committed_at text, branch text, generation int, meta bytea");
static const char sql_tmp_snapshots[] =
    TMP_TABLE("tmp_snapshots", "snapshot_id text, parent_snapshot_id text, delta_upsert bytea COMPRESSION lz4,"
                               " delta_remove bytea COMPRESSION lz4, entry_count int, depth int,"
                               " checkpoint bytea COMPRESSION lz4");
static const char sql_tmp_objects[] =
    TMP_TABLE("tmp_objects", "object_id text, byte_offset bigint, byte_length bigint, frame_no int");
static const char sql_tmp_frames[] = TMP_TABLE(
    "tmp_frames", "frame_no int, data_offset bigint, data_length bigint, codec text, size bigint, blob_count int");
#undef TMP_TABLE

const char mh_rw_sql_pack_lock[] = "SELECT pg_advisory_xact_lock(hashtextextended('musehub:mpack:' || $1::text, 0))";
const char mh_rw_sql_packs_lock[] =
    "SELECT pg_advisory_xact_lock(hashtextextended('musehub:mpack:' || p.id, 0)) FROM (SELECT DISTINCT"
    " u.id COLLATE \"C\" AS id FROM unnest($1::text[]) AS u(id) WHERE u.id <> $2::text ORDER BY 1) p";

/* The repository row: the first lock of every ref writer. Its count tells
 * whether the repository still exists. */
static const char sql_repo_lock[] = "SELECT count(*) FROM (SELECT 1 FROM repos WHERE repo_id = $1 FOR UPDATE) r";

static int repo_locked(mh_step_t *s, PGresult **res, int n)
{
    /* The repository lock is the statement after BEGIN and the tables. */
    for (int i = 0; i < n; i++)
        if (PQnfields(res[i]) == 1 && PQntuples(res[i]) == 1 && !strcmp(PQfname(res[i], 0), "count")) {
            if (mh_pq_int(res[i], 0, 0) == 1) return 0;
            mh_step_fail(s, MH_ENOENT, "the repository was deleted");
            return MH_ENOENT;
        }
    return MH_EDB;
}

void mh_rw_begin(mh_step_t *s, const char *repo_id, const char *mpack_id, unsigned tmp)
{
    mh_db_batch_t b = {0};
    mh_db_batch_add(&b, "BEGIN", 0);
    if (tmp & MH_RW_COMMITS) mh_db_batch_add(&b, sql_tmp_commits, 0);
    if (tmp & MH_RW_SNAPSHOTS) mh_db_batch_add(&b, sql_tmp_snapshots, 0);
    if (tmp & MH_RW_OBJECTS) mh_db_batch_add(&b, sql_tmp_objects, 0);
    if (tmp & MH_RW_FRAMES) mh_db_batch_add(&b, sql_tmp_frames, 0);
    mh_db_batch_add(&b, sql_repo_lock, 1, repo_id);
    if (mpack_id) mh_db_batch_add(&b, mh_rw_sql_pack_lock, 1, mpack_id);
    mh_step_batch(s, &b, repo_locked);
}

void mh_rw_copy(mh_step_t *s, unsigned table, const mh_buf_t *rows)
{
    const char *sql = table == MH_RW_COMMITS     ? "COPY tmp_commits FROM STDIN"
                      : table == MH_RW_SNAPSHOTS ? "COPY tmp_snapshots FROM STDIN (FORMAT binary)"
                      : table == MH_RW_FRAMES    ? "COPY tmp_frames FROM STDIN"
                                                 : "COPY tmp_objects FROM STDIN";
    mh_step_copy(s, sql, rows->p, rows->len);
}

/* ============================================================ rows, refs */

static void store_index(int *where, int i)
{
    if (where) *where = i;
}

/* Ends a NOT EXISTS subquery that looks one row up by its whole primary
 * key: OFFSET 0 keeps PostgreSQL from turning it into an anti join (whose
 * plan follows the statistics: right after a bulk load they say the
 * repository has no rows, and a hash or merge anti join then reads all of
 * them, 52,250 rows to insert 5), so it stays one index probe per row
 * tested — a cost that grows with the rows written, not with the
 * repository (docs/benchmarks.md, issue 20). */
#define PROBE " OFFSET 0"

/* The ref anti-joins probe the primary key once per pushed row (PROBE),
 * unless the repository has no such ref at all (the uncorrelated NOT
 * EXISTS first, evaluated once: a first push): their cost follows the
 * push, whatever the statistics say about the repository. tmp_commits
 * holds each commit once, in id order (push_check.c rebuild_commits): no
 * DISTINCT, no sort (see mh_rw_pack_rows). */
static const char sql_commit_refs[] =
    "WITH x AS (INSERT INTO commit_refs (repo_id, commit_id, branch, meta)"
    " SELECT $1::text, t.commit_id, t.branch, t.meta FROM tmp_commits t"
    " WHERE NOT EXISTS (SELECT 1 FROM commit_refs WHERE repo_id = $1)"
    " OR NOT EXISTS (SELECT 1 FROM commit_refs r WHERE r.repo_id = $1 AND r.commit_id = t.commit_id" PROBE ")"
    " RETURNING 1)"
    " SELECT count(*) FROM x";
static const char sql_snapshot_refs[] =
    "WITH x AS (INSERT INTO snapshot_refs (repo_id, snapshot_id)"
    " SELECT DISTINCT $1::text, t.snapshot_id FROM tmp_snapshots t"
    " WHERE NOT EXISTS (SELECT 1 FROM snapshot_refs WHERE repo_id = $1)"
    " OR NOT EXISTS (SELECT 1 FROM snapshot_refs r WHERE r.repo_id = $1 AND r.snapshot_id = t.snapshot_id" PROBE ")"
    " ORDER BY 2 RETURNING 1)"
    " SELECT count(*) FROM x";
/* How many of tmp_objects' blobs repository $1 does not hold yet (SPEC
 * 4.3's objects_written), asked before its mpack_refs row for the pack is
 * written (the pack's index rows may already be in: without the ref they
 * give the repository nothing). A repository that references no pack
 * holds none of them (a first push: no probe at all); otherwise one
 * MH_SQL_HOLDS_BLOB per blob. */
static const char sql_objects_new[] =
    "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM mpack_refs WHERE repo_id = $1)"
    " AND NOT EXISTS (SELECT 1 FROM object_refs_kept WHERE repo_id = $1)"
    " THEN (SELECT count(*) FROM tmp_objects)"
    " ELSE (SELECT count(*) FROM tmp_objects t WHERE NOT " MH_SQL_HOLDS_BLOB("$1", "t.object_id") ") END";

void mh_rw_history_rows(mh_db_batch_t *b, const char *repo_id, unsigned tables, int *i_commits, int *i_snapshots)
{
    if (tables & MH_RW_COMMITS) {
        mh_db_batch_add(b,
                        "INSERT INTO commits (commit_id, parent_commit_id, parent2_commit_id, snapshot_id, message,"
                        " author, committed_at, branch, generation, meta)"
                        " SELECT * FROM tmp_commits ON CONFLICT DO NOTHING",
                        0);
        store_index(i_commits, mh_db_batch_add(b, sql_commit_refs, 1, repo_id));
    }
    if (tables & MH_RW_SNAPSHOTS) {
        mh_db_batch_add(b,
                        "INSERT INTO snapshots (snapshot_id, parent_snapshot_id, delta_upsert, delta_remove,"
                        " entry_count, depth, checkpoint) SELECT * FROM tmp_snapshots ORDER BY snapshot_id"
                        " ON CONFLICT DO NOTHING",
                        0);
        store_index(i_snapshots, mh_db_batch_add(b, sql_snapshot_refs, 1, repo_id));
    }
}

void mh_rw_pack_rows(mh_db_batch_t *b, const mh_rw_pack_t *p, int *i_index, int *i_refs)
{
    /* objects is a view over mpack_index (sql/0040): the index rows below
     * are the objects' only rows. A v2 pack's frames (shared decision
     * sql/0030): with its index rows. */
    if (p->frames)
        mh_db_batch_add(b,
                        "INSERT INTO mpack_frames (mpack_id, frame_no, data_offset, data_length, codec, size,"
                        " blob_count) SELECT $1::text, frame_no, data_offset, data_length, codec, size, blob_count"
                        " FROM tmp_frames ORDER BY frame_no ON CONFLICT DO NOTHING",
                        1, p->mpack_id);
    /* Every writer of a pack's index rows holds the pack's lock
     * (mh_rw_begin), so a plain INSERT cannot collide (ON CONFLICT cost a
     * third more): a pack with no index row yet (every first write; the
     * uncorrelated NOT EXISTS is evaluated once) takes all of tmp_objects,
     * one already indexed (a re-run; GC may have deleted some of its
     * rows) only the rows it lacks, each probed by its object id (the
     * inner OFFSET 0: with the statistics a bulk load leaves, a probe by
     * both columns took the index on mpack_id and read the whole pack for
     * every row, 2.3 s for the seed's 5,855 blobs pushed to a second
     * repository). tmp_objects holds each id once, in
     * id order (mh_rw_index_rows, mh_rw_built_rows): no DISTINCT and no
     * sort here (a fresh temporary table is read back in the order it was
     * written; the order matters only for the index's locality). */
    store_index(i_index,
                mh_db_batch_add(b,
                                "WITH x AS (INSERT INTO mpack_index (object_id, mpack_id, byte_offset, byte_length,"
                                " frame_no) SELECT t.object_id, $1::text, t.byte_offset, t.byte_length, t.frame_no FROM"
                                " tmp_objects t WHERE NOT EXISTS (SELECT 1 FROM mpack_index WHERE mpack_id = $1)"
                                " OR NOT EXISTS (SELECT 1 FROM (SELECT i.mpack_id FROM mpack_index i WHERE"
                                " i.object_id = t.object_id" PROBE ") i WHERE i.mpack_id = $1) RETURNING 1)"
                                " SELECT count(*) FROM x",
                                1, p->mpack_id));
    if (i_refs) store_index(i_refs, mh_db_batch_add(b, sql_objects_new, 1, p->repo_id));
    /* Referenced again: a superseded pack is live again, out of the
     * sweep's reach. */
    mh_db_batch_add(b,
                    "INSERT INTO mpacks (mpack_id, size_bytes, kind) VALUES ($1, $2::bigint, $3)"
                    " ON CONFLICT (mpack_id) DO UPDATE SET superseded_at = NULL WHERE mpacks.superseded_at IS NOT NULL",
                    3, p->mpack_id, p->size, p->kind);
    /* The repository's blobs are its packs' (the object_refs view,
     * sql/0050): this row is what gives it the pack's blobs. */
    mh_db_batch_add(b, "INSERT INTO mpack_refs (repo_id, mpack_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", 2,
                    p->repo_id, p->mpack_id);
}

static const void *blob_key(const void *ctx, uint32_t v) { return ((const mh_packr_result_t *)ctx)->blobs[v].id; }

static int cmp_place(const void *a, const void *b, void *ctx)
{
    const mh_pb_place_t *pa = (const mh_pb_place_t *)ctx + *(const uint32_t *)a;
    const mh_pb_place_t *pb = (const mh_pb_place_t *)ctx + *(const uint32_t *)b;
    return memcmp(pa->id, pb->id, MH_ID_LEN);
}

int mh_rw_built_rows(const mh_pb_t *pb, mh_buf_t *objects, mh_buf_t *frames)
{
    size_t n = mh_pb_count(pb), nf = 0;
    /* In id order (see mh_rw_pack_rows). */
    mh_pb_place_t *pls = malloc((n ? n : 1) * sizeof *pls);
    uint32_t *ord = malloc((n ? n : 1) * sizeof *ord);
    int rc = pls && ord ? mh_buf_reserve(objects, n * (MH_ID_LEN + 32)) : MH_ENOMEM;
    for (size_t i = 0; i < n && !rc; i++) {
        mh_pb_place(pb, i, &pls[i]);
        ord[i] = (uint32_t)i;
    }
    if (!rc) qsort_r(ord, n, sizeof *ord, cmp_place, pls);
    for (size_t i = 0; i < n && !rc; i++) {
        const mh_pb_place_t pl = pls[ord[i]];
        rc = mh_copy_field(objects, pl.id, MH_ID_LEN, false);
        if (!rc) rc = mh_copy_int(objects, (int64_t)pl.offset, false);
        if (!rc) rc = mh_copy_int(objects, (int64_t)pl.length, false);
        if (!rc && pl.frame == MH_PACK_NOFRAME) rc = mh_copy_field(objects, NULL, 0, true);
        else if (!rc) rc = mh_copy_int(objects, (int64_t)pl.frame, true);
    }
    free(pls);
    free(ord);
    const mh_pb_outframe_t *of = mh_pb_frames(pb, &nf);
    for (size_t i = 0; i < nf && !rc; i++) {
        const char *codec = of[i].codec == MH_PACK_ZSTD ? "zstd" : "none";
        rc = mh_copy_int(frames, (int64_t)i, false);
        if (!rc) rc = mh_copy_int(frames, (int64_t)of[i].data_offset, false);
        if (!rc) rc = mh_copy_int(frames, (int64_t)of[i].data_length, false);
        if (!rc) rc = mh_copy_field(frames, codec, strlen(codec), false);
        if (!rc) rc = mh_copy_int(frames, (int64_t)of[i].size, false);
        if (!rc) rc = mh_copy_int(frames, (int64_t)of[i].nblobs, true);
    }
    return rc;
}

/* One tmp_frames row per v2 frame, in index order. */
static int frame_rows(const mh_packr_result_t *p, mh_buf_t *out)
{
    int rc = mh_buf_reserve(out, p->nframes * 64);
    for (size_t i = 0; i < p->nframes && !rc; i++) {
        const mh_pack_frame_t *f = &p->frames[i];
        const char *codec = f->codec == MH_PACK_NONE ? "none" : "zstd";
        rc = mh_copy_int(out, (int64_t)i, false);
        if (!rc) rc = mh_copy_int(out, (int64_t)f->data_offset, false);
        if (!rc) rc = mh_copy_int(out, (int64_t)f->data_length, false);
        if (!rc) rc = mh_copy_field(out, codec, strlen(codec), false);
        if (!rc) rc = mh_copy_int(out, (int64_t)f->size, false);
        if (!rc) rc = mh_copy_int(out, (int64_t)f->nblobs, true);
    }
    return rc;
}

static int cmp_blob(const void *a, const void *b, void *ctx)
{
    const mh_packr_blob_t *bl = ctx;
    return memcmp(bl[*(const uint32_t *)a].id, bl[*(const uint32_t *)b].id, 32);
}

int mh_rw_index_rows(const mh_packr_result_t *p, mh_buf_t *objects, mh_buf_t *frames, size_t *nrows)
{
    *nrows = 0;
    /* Ids come from the pack as sent: core's seeded map, never a table a
     * client could fill with colliding ids. */
    mh_idmap_t seen;
    mh_idmap_init(&seen, NULL, 32, blob_key, p);
    uint32_t *ord = malloc((p->nblobs ? p->nblobs : 1) * sizeof *ord);
    size_t n = 0;
    int rc = ord ? mh_idmap_reserve(&seen, p->nblobs) : MH_ENOMEM;
    if (!rc) rc = mh_buf_reserve(objects, p->nblobs * (MH_ID_LEN + 32));
    for (size_t i = 0; i < p->nblobs && !rc; i++) {
        int added = mh_idmap_add(&seen, (uint32_t)i, NULL);
        if (added < 0) rc = added;
        else if (added) ord[n++] = (uint32_t)i;
    }
    /* Each id once, in id order (see mh_rw_pack_rows): a digest's byte
     * order is its hex text's order. */
    if (!rc) qsort_r(ord, n, sizeof *ord, cmp_blob, p->blobs);
    for (size_t k = 0; k < n && !rc; k++) {
        const mh_packr_blob_t *bl = &p->blobs[ord[k]];
        mh_id_t id;
        mh_id_from_digest(&id, bl->id);
        rc = mh_copy_field(objects, id.s, MH_ID_LEN, false);
        if (!rc) rc = mh_copy_int(objects, (int64_t)bl->offset, false);
        if (!rc) rc = mh_copy_int(objects, (int64_t)bl->length, false);
        if (!rc)
            rc = bl->frame == MH_PACK_NOFRAME ? mh_copy_field(objects, NULL, 0, true)
                                              : mh_copy_int(objects, (int64_t)bl->frame, true);
        if (!rc) (*nrows)++;
    }
    free(ord);
    mh_idmap_free(&seen);
    if (!rc && p->version == 2) rc = frame_rows(p, frames);
    return rc;
}

void mh_rw_repo_delete_rows(mh_db_batch_t *b, const char *repo_id)
{
    /* Each its own statement after the lock (mh_rw_begin): a fresh
     * snapshot that sees the refs of a writer that held the lock before. */
    static const char *const sql[] = {
        "DELETE FROM commit_refs WHERE repo_id = $1", "DELETE FROM snapshot_refs WHERE repo_id = $1",
        "DELETE FROM object_refs_kept WHERE repo_id = $1", "DELETE FROM mpack_refs WHERE repo_id = $1",
        "DELETE FROM repos WHERE repo_id = $1"};
    for (size_t i = 0; i < sizeof sql / sizeof *sql; i++) mh_db_batch_add(b, sql[i], 1, repo_id);
}

/* ============================================================ ref names */

bool mh_ref_name_valid(const char *p, size_t n)
{
    if (n == 0 || n > 255 || p[0] == '/' || p[n - 1] == '/' || p[0] == '.' || p[n - 1] == '.') return false;
    size_t seg = 0; /* where the current '/'-separated segment starts */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i], next = i + 1 < n ? (unsigned char)p[i + 1] : 0;
        if (c <= ' ' || c >= 127 || strchr("~^:?*[\\", c)) return false;
        if ((c == '.' && next == '.') || (c == '/' && next == '/') || (c == '@' && next == '{')) return false;
        if (i == seg && c == '.') return false; /* a hidden segment */
        if (c == '/' || i + 1 == n) {
            size_t end = c == '/' ? i : n; /* the segment is [seg, end) */
            if (end - seg >= 5 && memcmp(p + end - 5, ".lock", 5) == 0) return false;
            seg = i + 1;
        }
    }
    return true;
}

/* ========================================================= branch moves */

static int ancestry_done(mh_step_t *s, PGresult *res);

/* The rule's verdict on a move that changes the head, before any
 * fast-forward walk: PROTECTED, OK, or (FORCE under a rule without
 * allow_force_push) NOT_FF meaning "only a fast-forward may pass". */
static mh_move_verdict_t rule_verdict(const mh_move_t *mv)
{
    if (!mv->has_rule) return MH_MOVE_OK;
    if (mv->kind == MH_MOVE_DELETE) return mv->rule.allow_delete ? MH_MOVE_OK : MH_MOVE_PROTECTED;
    if (mv->rule.require_proposal && mv->kind != MH_MOVE_MERGE) return MH_MOVE_PROTECTED;
    if (mv->kind == MH_MOVE_FORCE && !mv->rule.allow_force_push && mv->exists) return MH_MOVE_NOT_FF;
    return MH_MOVE_OK;
}

/* Judges mv once the branch row is locked; MH_STEP_WAIT when a walk of
 * the history must decide. */
static int judge(mh_step_t *s, mh_move_t *mv, bool head_known)
{
    if (mv->new_head && !mv->head_written_here && !head_known) return mv->verdict = MH_MOVE_UNKNOWN_HEAD, 0;
    if (mv->kind == MH_MOVE_DELETE && !mv->exists) return mv->verdict = MH_MOVE_ABSENT, 0;
    if (mv->cas && (mv->expected_old ? !mv->exists || strcmp(mv->old_head, mv->expected_old) != 0 : mv->exists))
        return mv->verdict = MH_MOVE_STALE, 0;
    if (mv->kind == MH_MOVE_CREATE && mv->exists) return mv->verdict = MH_MOVE_EXISTS, 0;
    if (mv->kind == MH_MOVE_DELETE && mv->is_default) return mv->verdict = MH_MOVE_DEFAULT, 0;
    /* The same head is no move: nothing for a rule to refuse. */
    bool same = mv->exists && mv->new_head && !strcmp(mv->old_head, mv->new_head);
    mh_move_verdict_t rv = same ? MH_MOVE_OK : rule_verdict(mv);
    if (rv == MH_MOVE_PROTECTED) return mv->verdict = rv, 0;
    switch (mv->kind) {
    case MH_MOVE_CREATE:
    case MH_MOVE_DELETE:
        mv->verdict = MH_MOVE_OK;
        return 0;
    case MH_MOVE_FORCE:
        if (rv == MH_MOVE_OK) { /* no rule asks for a fast-forward */
            mv->verdict = MH_MOVE_OK;
            return 0;
        }
        break;
    case MH_MOVE_FAST_FORWARD:
    case MH_MOVE_COMMIT:
    case MH_MOVE_MERGE:
        break;
    }
    /* A fast-forward: creation, no move, or a commit built on the head. */
    if (!mv->exists || same || (mv->new_parent && !strcmp(mv->old_head, mv->new_parent))) {
        mv->verdict = MH_MOVE_OK;
        return 0;
    }
    /* Is the old head an ancestor of the new one? Walk parents from the new
     * head, pruned by generation number: the cost is the number of commits
     * between them. */
    s->on.res = NULL;
    mh_db_pq_t q = {NULL,
                    "WITH RECURSIVE g AS (SELECT generation FROM commits WHERE commit_id = $2),"
                    " anc(id) AS (SELECT $1::text UNION"
                    "  SELECT p.id FROM anc JOIN commits c ON c.commit_id = anc.id,"
                    "  LATERAL (VALUES (c.parent_commit_id), (c.parent2_commit_id)) AS p(id)"
                    "  WHERE p.id IS NOT NULL AND c.generation > (SELECT generation FROM g))"
                    " SELECT EXISTS (SELECT 1 FROM anc WHERE id = $2)",
                    2,
                    (const char *const[]){mv->new_head, mv->old_head},
                    NULL,
                    NULL};
    mh_step_query(s, &q, ancestry_done);
    return MH_STEP_WAIT;
}

static int ancestry_done(mh_step_t *s, PGresult *res)
{
    mh_move_t *mv = s->arg;
    if (!mv) return MH_EINVAL;
    /* A force move walks only when its rule allows fast-forwards alone. */
    bool ff = mh_pq_str(res, 0, 0)[0] == 't';
    mv->verdict = ff ? MH_MOVE_OK : mv->kind == MH_MOVE_FORCE ? MH_MOVE_PROTECTED : MH_MOVE_NOT_FF;
    return 0;
}

static bool pq_true(PGresult *res, int row, int col)
{
    return !mh_pq_isnull(res, row, col) && mh_pq_str(res, row, col)[0] == 't';
}

static int branch_locked(mh_step_t *s, PGresult **res, int n)
{
    mh_move_t *mv = s->arg;
    if (!mv || n != 2 || PQntuples(res[0]) != 1 || PQntuples(res[1]) != 1) return MH_EDB;
    /* res[0]: the current head or NULL (locked); res[1]: the new head a
     * commit of this repository?, the default branch?, the rule (NULLs
     * when none). */
    mv->exists = !mh_pq_isnull(res[0], 0, 0);
    snprintf(mv->old_head, sizeof mv->old_head, "%s", mv->exists ? mh_pq_str(res[0], 0, 0) : "");
    mv->is_default = pq_true(res[1], 0, 1);
    mv->has_rule = !mh_pq_isnull(res[1], 0, 2);
    mv->rule = (mh_rule_t){pq_true(res[1], 0, 2), pq_true(res[1], 0, 3), pq_true(res[1], 0, 4)};
    return judge(s, mv, pq_true(res[1], 0, 0));
}

void mh_rw_move_check(mh_step_t *s, mh_move_t *mv)
{
    s->arg = mv;
    mv->verdict = MH_MOVE_OK;
    const char *head = mv->new_head ? mv->new_head : "";
    mh_db_batch_t b = {0};
    /* FOR UPDATE waits for a concurrent holder and returns the row's
     * newest version, not this statement's snapshot: the judgement sees
     * the winner's head. */
    mh_db_batch_add(&b, "SELECT (SELECT head_commit_id FROM branches WHERE repo_id = $1 AND name = $2 FOR UPDATE)", 2,
                    mv->repo_id, mv->branch);
    /* A statement of its own, after the lock: its snapshot holds whatever
     * the previous holder of the repository row committed, rules
     * included. */
    mh_db_batch_add(&b,
                    "SELECT EXISTS (SELECT 1 FROM commit_refs WHERE repo_id = $1 AND commit_id = $3),"
                    " r.default_branch = $2, p.allow_force_push, p.allow_delete, p.require_proposal"
                    " FROM repos r LEFT JOIN branch_protection p ON p.repo_id = r.repo_id AND p.branch = $2"
                    " WHERE r.repo_id = $1",
                    3, mv->repo_id, mv->branch, head);
    mh_step_batch(s, &b, branch_locked);
}

void mh_rw_commit_move(mh_step_t *s, mh_move_t *mv, const char *repo_id, const char *branch, mh_move_kind_t kind,
                       const char *new_head, const char *new_parent, const char *expected_old)
{
    /* The "in" members in their order: cas, and the head is written here. */
    *mv = (mh_move_t){repo_id, branch, kind, new_head, new_parent, true, expected_old, true};
    mh_rw_move_check(s, mv);
}

/* Which part of the rule refused a move. */
static const char *rule_refusal(const mh_move_t *mv)
{
    if (mv->kind == MH_MOVE_DELETE) return "deleting it is not allowed (allow_delete is false)";
    if (mv->rule.require_proposal) return "only a proposal merge may move it (require_proposal)";
    return "a move that is not a fast-forward is not allowed (allow_force_push is false)";
}

void mh_rw_move_refuse(mh_step_t *s, const mh_move_t *mv)
{
    const char *old = mv->exists ? mv->old_head : "(no branch)";
    switch (mv->verdict) {
    case MH_MOVE_OK:
        return;
    case MH_MOVE_STALE:
        mh_step_refuse(s, 409, "stale_head", "branch '%s' is at %s, not at %s; fetch and retry", mv->branch, old,
                       mv->expected_old ? mv->expected_old : "(no branch)");
        return;
    case MH_MOVE_NOT_FF:
        mh_step_refuse(s, 409, "non_fast_forward",
                       "moving '%s' from %s to %s is not a fast-forward; fetch and merge, or push with force",
                       mv->branch, old, mv->new_head);
        return;
    case MH_MOVE_UNKNOWN_HEAD:
        if (mv->api) mh_step_refuse(s, 404, "not_found", "commit %s is not in this repository", mv->new_head);
        else
            mh_step_refuse(s, 422, "unknown_head", "head %s is neither in the pack nor in this repository",
                           mv->new_head);
        return;
    case MH_MOVE_EXISTS:
        mh_step_refuse(s, 409, "exists", "branch '%s' exists", mv->branch);
        return;
    case MH_MOVE_ABSENT:
        mh_step_refuse(s, 404, "not_found", "no branch '%s'", mv->branch);
        return;
    case MH_MOVE_DEFAULT:
        mh_step_refuse(s, 409, "default_branch",
                       "'%s' is the repository's default branch; make another branch the default first", mv->branch);
        return;
    case MH_MOVE_PROTECTED:
        mh_step_refuse(s, 403, "protected_branch", "branch '%s' is protected: %s", mv->branch, rule_refusal(mv));
        return;
    }
}

void mh_rw_move_rows(mh_db_batch_t *b, const mh_move_t *mv)
{
    /* The branch statement and the state_seq bump are one statement; no
     * change (the same head) bumps nothing. */
#define BUMP                                                                                                           \
    " UPDATE repos SET state_seq = state_seq + 1, updated_at = now() WHERE repo_id = $1 AND EXISTS (SELECT 1 FROM b)"
    if (mv->kind == MH_MOVE_DELETE)
        mh_db_batch_add(b, "WITH b AS (DELETE FROM branches WHERE repo_id = $1 AND name = $2 RETURNING 1)" BUMP, 2,
                        mv->repo_id, mv->branch);
    else if (mv->exists)
        mh_db_batch_add(b,
                        "WITH b AS (UPDATE branches SET head_commit_id = $3, updated_at = now()"
                        " WHERE repo_id = $1 AND name = $2 AND head_commit_id <> $3 RETURNING 1)" BUMP,
                        3, mv->repo_id, mv->branch, mv->new_head);
    else
        mh_db_batch_add(b,
                        "WITH b AS (INSERT INTO branches (repo_id, name, head_commit_id) VALUES ($1, $2, $3)"
                        " RETURNING 1)" BUMP,
                        3, mv->repo_id, mv->branch, mv->new_head);
#undef BUMP
}

/* ========================================= protection, tags, settings */

#define ISO_UTC(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"
/* A repository row's nine columns in mh__repo_row's order. */
#define REPO_COLS                                                                                                      \
    "repo_id, owner, owner_id, name, slug, visibility, description, default_branch, " ISO_UTC("created_at")
#define CREATED_AT ISO_UTC("created_at")
#define RULE_COLS "branch, allow_force_push, allow_delete, require_proposal, updated_by, " ISO_UTC("updated_at")

void mh_rw_rule_rows(mh_db_batch_t *b, const char *repo_id, const char *branch, const mh_rule_t *r, const char *by)
{
    /* The branch row is the last lock of the order; the rule records the
     * state_seq its change makes (the bump below, same snapshot). */
    mh_db_batch_add(b,
                    "WITH br AS (SELECT 1 FROM branches WHERE repo_id = $1 AND name = $2 FOR UPDATE),"
                    " p AS (INSERT INTO branch_protection (repo_id, branch, allow_force_push, allow_delete,"
                    "  require_proposal, updated_by, state_seq)"
                    "  SELECT $1, $2, $3::boolean, $4::boolean, $5::boolean, $6,"
                    "   (SELECT state_seq + 1 FROM repos WHERE repo_id = $1) FROM br"
                    "  ON CONFLICT (repo_id, branch) DO UPDATE SET allow_force_push = EXCLUDED.allow_force_push,"
                    "   allow_delete = EXCLUDED.allow_delete, require_proposal = EXCLUDED.require_proposal,"
                    "   updated_by = EXCLUDED.updated_by, updated_at = now(), state_seq = EXCLUDED.state_seq"
                    "  RETURNING *),"
                    " s AS (UPDATE repos SET state_seq = state_seq + 1, updated_at = now()"
                    "  WHERE repo_id = $1 AND EXISTS (SELECT 1 FROM p))"
                    " SELECT " RULE_COLS ", state_seq FROM p",
                    6, repo_id, branch, r->allow_force_push ? "true" : "false", r->allow_delete ? "true" : "false",
                    r->require_proposal ? "true" : "false", by);
}

/* DELETE ... RETURNING 1 as `d`, the state_seq bump when it deleted
 * anything, and the count. */
#define DELETE_BUMP(table, keycol)                                                                                     \
    "WITH d AS (DELETE FROM " table " WHERE repo_id = $1 AND " keycol " = $2 RETURNING 1),"                            \
    " s AS (UPDATE repos SET state_seq = state_seq + 1, updated_at = now()"                                            \
    "  WHERE repo_id = $1 AND EXISTS (SELECT 1 FROM d))"                                                               \
    " SELECT count(*) FROM d"

void mh_rw_rule_delete_rows(mh_db_batch_t *b, const char *repo_id, const char *branch)
{
    mh_db_batch_add(b, DELETE_BUMP("branch_protection", "branch"), 2, repo_id, branch);
}

void mh_rw_tag_rows(mh_db_batch_t *b, const char *repo_id, const char *name, const char *commit_id, const char *message,
                    const char *tagger)
{
    /* Tags never move: an existing name is left as it is (ON CONFLICT DO
     * NOTHING inserts nothing, and the caller answers 409). */
    mh_db_batch_add(
        b,
        "WITH c AS (SELECT EXISTS (SELECT 1 FROM commit_refs WHERE repo_id = $1 AND commit_id = $3) AS known),"
        " t AS (INSERT INTO tags (repo_id, name, commit_id, message, tagger)"
        "  SELECT $1, $2, $3, $4, $5 FROM c WHERE c.known ON CONFLICT DO NOTHING RETURNING created_at),"
        " s AS (UPDATE repos SET state_seq = state_seq + 1, updated_at = now()"
        "  WHERE repo_id = $1 AND EXISTS (SELECT 1 FROM t))"
        " SELECT (SELECT known FROM c), (SELECT " CREATED_AT " FROM t)",
        5, repo_id, name, commit_id, message, tagger);
}

void mh_rw_tag_delete_rows(mh_db_batch_t *b, const char *repo_id, const char *name)
{
    mh_db_batch_add(b, DELETE_BUMP("tags", "name"), 2, repo_id, name);
}

void mh_rw_settings_rows(mh_db_batch_t *b, const char *repo_id, const char *description, const char *visibility,
                         const char *default_branch)
{
    mh_db_batch_add(b,
                    "WITH k AS (SELECT $4::text IS NULL OR EXISTS (SELECT 1 FROM branches WHERE repo_id = $1"
                    "  AND name = $4) AS ok),"
                    " u AS (UPDATE repos SET description = coalesce($2, description),"
                    "  visibility = coalesce($3, visibility), default_branch = coalesce($4, default_branch),"
                    "  updated_at = now() WHERE repo_id = $1 AND (SELECT ok FROM k) RETURNING " REPO_COLS ")"
                    " SELECT k.ok, u.* FROM k LEFT JOIN u ON true",
                    4, repo_id, description, visibility, default_branch);
}

/* ================================================== server-side commits */

int mh_rw_commit_build(mh_rw_commit_t *c)
{
    static const mh_manifest_t empty = {0};
    mh_manifest_id(c->m, &c->sid);
    snprintf(c->entries, sizeof c->entries, "%zu", c->m->n);
    /* An unchanged tree reuses the first parent's row. */
    c->new_snapshot = !c->parent_snap || strcmp(c->sid.s, c->parent_snap) != 0;
    c->depth = 0;
    if (c->new_snapshot) {
        uint32_t nu, nr;
        c->up.len = c->rm.len = c->cp.len = 0;
        if (mh_manifest_diff(c->parent_m ? c->parent_m : &empty, c->m, &c->up, &nu, &c->rm, &nr)) return MH_ENOMEM;
        c->depth = c->parent_snap ? c->parent_depth + 1 : 0;
        c->checkpoint = c->depth >= MH_CHECKPOINT_INTERVAL;
        if (c->checkpoint) {
            c->depth = 0;
            if (mh_manifest_encode(c->m, &c->cp)) return MH_ENOMEM;
        }
    }
    mh_iso_now(c->committed_at, sizeof c->committed_at);
    mh_str_t parents[2];
    int64_t g = 0;
    for (int i = 0; i < c->nparents; i++) {
        parents[i] = (mh_str_t){c->parents[i], MH_ID_LEN};
        if (c->parent_gens[i] > g) g = c->parent_gens[i];
    }
    mh_commit_id(parents, c->nparents, (mh_str_t){c->sid.s, MH_ID_LEN}, (mh_str_t){c->message, strlen(c->message)},
                 (mh_str_t){c->committed_at, strlen(c->committed_at)}, (mh_str_t){c->author, strlen(c->author)},
                 &c->cid);
    c->gen = g + 1;
    snprintf(c->depth_s, sizeof c->depth_s, "%lld", (long long)c->depth);
    snprintf(c->gen_s, sizeof c->gen_s, "%lld", (long long)c->gen);
    return 0;
}

void mh_rw_commit_rows(mh_db_batch_t *b, const char *repo_id, const mh_rw_commit_t *c)
{
    if (c->new_snapshot) {
        /* Deltas are binary parameters: no hex round trip. */
        mh_db_batch_add(b,
                        "INSERT INTO snapshots (snapshot_id, parent_snapshot_id, delta_upsert, delta_remove,"
                        " entry_count, depth, checkpoint) VALUES ($1, $2, $3, $4, $5::int, $6::int, $7)"
                        " ON CONFLICT DO NOTHING",
                        7, c->sid.s, c->parent_snap, NULL, NULL, c->entries, c->depth_s, NULL);
        mh_db_batch_bin(b, 2, c->up.p ? c->up.p : (const uint8_t *)"", c->up.len);
        mh_db_batch_bin(b, 3, c->rm.p ? c->rm.p : (const uint8_t *)"", c->rm.len);
        mh_db_batch_bin(b, 6, c->checkpoint ? c->cp.p : NULL, c->checkpoint ? c->cp.len : 0);
    }
    mh_db_batch_add(b,
                    "INSERT INTO commits (commit_id, parent_commit_id, parent2_commit_id, snapshot_id, message, author,"
                    " committed_at, branch, generation) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::int)"
                    " ON CONFLICT DO NOTHING",
                    9, c->cid.s, c->nparents > 0 ? c->parents[0] : NULL, c->nparents > 1 ? c->parents[1] : NULL,
                    c->sid.s, c->message, c->author, c->committed_at, c->branch, c->gen_s);
    /* The branch is this repository's own (per-repository metadata,
     * sql/0008). */
    mh_db_batch_add(b,
                    "INSERT INTO commit_refs (repo_id, commit_id, branch) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    3, repo_id, c->cid.s, c->branch);
    mh_db_batch_add(b, "INSERT INTO snapshot_refs (repo_id, snapshot_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", 2,
                    repo_id, c->sid.s);
}

void mh_rw_commit_free(mh_rw_commit_t *c)
{
    mh_buf_free(&c->up);
    mh_buf_free(&c->rm);
    mh_buf_free(&c->cp);
}
