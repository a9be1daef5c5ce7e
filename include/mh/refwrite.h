/*
 * refwrite.h — the one write path of the repository refs (src/hub/
 * refwrite.c): every writer of a repository's ref rows and branches goes
 * through it — push, server-side commits, proposal merges, the
 * mpack.index and mpack.gc jobs, repository deletion (and, next, the
 * branch API). It alone owns:
 *
 *   - the transaction's lock order: (1) the repository row FOR UPDATE,
 *     (2) the pack's advisory lock, (3) rows of the operation's own (a
 *     proposal), (4) the branch row FOR UPDATE; every ref writer holds the
 *     repository row, so writers of one repository are serialised and
 *     cannot deadlock (docs/architecture.md);
 *   - the ref rows (commit_refs, snapshot_refs, object_refs, mpack_refs),
 *     the global rows they name (commits, snapshots, objects, mpack_index,
 *     mpacks), the temporary tables bulk writers COPY into;
 *   - every branch move: ONE judgement (mh_rw_move_check: compare-and-swap,
 *     fast-forward, the kind of move; protection rules belong there) and
 *     one way to apply it with the state_seq bump (mh_rw_move_rows);
 *   - building a server-side commit (delta against the parent manifest,
 *     the checkpoint rule, ids, generation);
 *   - the staged-upload grant protocol of push and mpack.index.
 *
 * Everything here runs as steps of the caller's operation (mh/step.h): a
 * function that takes the mh_step_t starts one asynchronous call and the
 * operation goes on with its next step when it completes; errors end the
 * operation (MH_E* through its finish, SPEC refusals through
 * mh_step_refuse). Loop thread only, except mh_rw_commit_build.
 *
 * Depends on core, db, store and mpack only, so jobs and hub both use it.
 */
#ifndef MH_REFWRITE_H
#define MH_REFWRITE_H

#include "mh/mpack.h"
#include "mh/packbuild.h"
#include "mh/step.h"

/* Every MH_CHECKPOINT_INTERVAL links a snapshot row keeps its full
 * manifest (DESIGN section 4: bounded delta chains). */
#define MH_CHECKPOINT_INTERVAL 64

/* --------------------------------------------- transaction, lock order */

/* The temporary tables a bulk writer COPYs into (dropped at COMMIT), and
 * their COPY text-format columns:
 *   tmp_commits   commit_id, parent_commit_id, parent2_commit_id,
 *                 snapshot_id, message, author, committed_at, branch,
 *                 generation (int), meta (bytea: the msgpack map of the
 *                 commit's other keys, NULL when none)
 *   tmp_snapshots snapshot_id, parent_snapshot_id, delta_upsert (bytea,
 *                 msgpack map), delta_remove (bytea, msgpack array),
 *                 entry_count, depth (int), checkpoint (bytea or NULL)
 *   tmp_objects   object_id, byte_offset, byte_length, frame_no (a pack's
 *                 blobs: mh_index_copy_rows and mh_rw_built_rows write
 *                 them; frame_no NULL (\N) for a v1 pack, else the
 *                 blob's frame and its range inside the decompressed
 *                 frame, sql/0030)
 *   tmp_frames    frame_no, data_offset, data_length, codec ("zstd" or
 *                 "none"), size, blob_count (a v2 pack's frames; created
 *                 with tmp_objects, filled through MH_RW_FRAMES) */
enum { MH_RW_COMMITS = 1, MH_RW_SNAPSHOTS = 2, MH_RW_OBJECTS = 4, MH_RW_FRAMES = 8 };

/* On the operation's held connection (mh_step_acquire first), one round
 * trip: BEGIN, the temporary tables in `tmp`, then the first two locks of
 * the order: the repository row, and the advisory lock of pack mpack_id
 * (NULL: none). A repository deleted meanwhile ends the operation with
 * MH_ENOENT ("the repository was deleted"). */
void mh_rw_begin(mh_step_t *s, const char *repo_id, const char *mpack_id, unsigned tmp);

/* COPY rows (in the format above) into one temporary table. */
void mh_rw_copy(mh_step_t *s, unsigned table, const mh_buf_t *rows);

/* The advisory lock of a pack as a statement of its own, for the sweep,
 * which deletes superseded packs under it and holds no repository:
 * "SELECT pg_advisory_xact_lock(hashtextextended('musehub:mpack:' || $1, 0))". */
extern const char mh_rw_sql_pack_lock[];

/* -------------------------------------------------------- rows, refs */

/* Statement builders: each appends its statements to the caller's batch
 * (mh_db_batch_t), for a pipeline on the held connection. Where a count
 * is noted, the statement returns one row with one integer, and its index
 * in the batch is stored through the pointer (which may be NULL). */

/* From tmp_commits and tmp_snapshots: the global commit and snapshot rows
 * (ON CONFLICT DO NOTHING, in key order: other repositories race for the
 * same rows), and this repository's commit_refs (count: refs added) and
 * snapshot_refs (count). Ref rows are inserted with a sorted anti-join:
 * the repository row lock makes ON CONFLICT unnecessary. */
void mh_rw_history_rows(mh_db_batch_t *b, const char *repo_id, int *i_commits, int *i_snapshots);

/* A pack and its blobs (tmp_objects, tmp_frames): the pack's mpacks row
 * (kind "push", "commit" or "gc"; a superseded pack is live again), its
 * mpack_frames rows (v2), its mpack_index rows (count: rows added) and
 * this repository's mpack_refs row; with new_objects also the objects
 * rows (mpack:// URIs, the v2 form for framed blobs; a known object keeps
 * its URI) and the object_refs rows (count: refs added). `size` is the
 * pack's byte count as text. */
typedef struct {
    const char *repo_id, *mpack_id, *size, *kind;
    bool new_objects; /* false for GC: the repository references them already */
} mh_rw_pack_t;
void mh_rw_pack_rows(mh_db_batch_t *b, const mh_rw_pack_t *p, int *i_index, int *i_refs);

/* The COPY rows (tmp_objects) of a parsed pack's blobs, one per distinct
 * object id (the first occurrence wins), appended to out; *nrows their
 * number. MH_ENOMEM. */
int mh_index_copy_rows(const mh_pack_t *p, mh_buf_t *out, size_t *nrows);

/* The tmp_objects and tmp_frames COPY rows of a pack the builder wrote
 * (mh_pb_place, mh_pb_frames after a successful run), appended to
 * objects and frames. MH_ENOMEM. */
int mh_rw_built_rows(const mh_pb_t *pb, mh_buf_t *objects, mh_buf_t *frames);

/* The statement that repoints objects.storage_uri at pack mpack_id for
 * the objects in tmp_objects (GC's swap). */
void mh_rw_objects_repoint(mh_db_batch_t *b, const char *mpack_id);

/* Deleting a repository: the ref rows and the repository row (branches,
 * grants, proposals, collaborators and cached fetch answers go with it by
 * ON DELETE CASCADE). Global rows and packs are left to GC (SPEC 4.1). */
void mh_rw_repo_delete_rows(mh_db_batch_t *b, const char *repo_id);

/* ------------------------------------------------------- branch moves */

typedef enum {
    MH_MOVE_FAST_FORWARD, /* push: the new head must descend from the old one (or create the branch) */
    MH_MOVE_FORCE,        /* push with force: any head */
    MH_MOVE_COMMIT,       /* a server-side commit on top of the old head (or creating the branch) */
    MH_MOVE_MERGE,        /* a proposal merge: a merge commit on top of the old head (or creating it) */
    MH_MOVE_CREATE,       /* a new branch only */
    MH_MOVE_DELETE,       /* the branch goes (new_head NULL) */
} mh_move_kind_t;

typedef enum {
    MH_MOVE_OK = 0,
    MH_MOVE_STALE,        /* cas: the branch is not at expected_old -> 409 stale_head */
    MH_MOVE_NOT_FF,       /* -> 409 non_fast_forward */
    MH_MOVE_UNKNOWN_HEAD, /* the new head is no commit of this repository -> 422 unknown_head */
    MH_MOVE_EXISTS,       /* MH_MOVE_CREATE of an existing branch -> 409 exists */
    MH_MOVE_ABSENT,       /* MH_MOVE_DELETE of a missing branch -> 404 not_found */
} mh_move_verdict_t;

typedef struct {
    /* in */
    const char *repo_id, *branch;
    mh_move_kind_t kind;
    const char *new_head;     /* NULL for a delete */
    const char *new_parent;   /* the new head's first parent when known (a commit this transaction writes) */
    bool cas;                 /* compare the current head with expected_old */
    const char *expected_old; /* with cas: NULL means "the branch does not exist" */
    bool head_written_here;   /* the new head's commit_refs row is written later in this transaction */
    /* out */
    bool exists;               /* the branch existed (locked) */
    char old_head[MH_ID_SIZE]; /* its head then ("" when it did not) */
    mh_move_verdict_t verdict;
} mh_move_t;

/* The one judgement of every branch move: locks the branch row (the last
 * lock of the order), reads its head, and decides per kind, in this
 * order: the new head is a commit of this repository (unless written
 * here); cas; CREATE/DELETE preconditions; FORCE passes; the other kinds
 * need a fast-forward: creation, the same head, new_parent == old head, or
 * else a walk of parents from the new head pruned by generation (its cost
 * is the commits between the two heads). Protected-branch rules (SPEC
 * 4.2) belong here. The verdict is left in mv->verdict; the operation
 * goes on either way (mh_rw_move_refuse turns a verdict into SPEC's
 * answer). mv must live until the step after. */
void mh_rw_move_check(mh_step_t *s, mh_move_t *mv);

/* mh_rw_move_check of a commit the server writes in this transaction
 * (kind MH_MOVE_COMMIT or MH_MOVE_MERGE, head new_head) onto branch: a
 * compare-and-swap from expected_old (NULL: the branch must not exist),
 * new_parent the commit's first parent (NULL: a root). */
void mh_rw_commit_move(mh_step_t *s, mh_move_t *mv, const char *repo_id, const char *branch, mh_move_kind_t kind,
                       const char *new_head, const char *new_parent, const char *expected_old);

/* Ends the operation with SPEC's refusal for a verdict (the detail names
 * the branch and heads). */
void mh_rw_move_refuse(mh_step_t *s, const mh_move_t *mv);

/* The statement that applies a judged move, for the operation's write
 * pipeline: the branch row updated, inserted (a new branch) or deleted,
 * and repos.state_seq bumped in the same statement unless nothing changed
 * (the same head). Every branch move bumps it, which is what keeps the
 * per-process caches keyed by state_seq exact. */
void mh_rw_move_rows(mh_db_batch_t *b, const mh_move_t *mv);

/* ------------------------------------------------ server-side commits */

/* A commit the server makes (SPEC 4.6: a commit over the API, a merge).
 * In: the parents (the first one's snapshot, depth and manifest give the
 * delta), generation of each, the new manifest, message, author, branch.
 * Out: snapshot and commit ids, committed_at (now, UTC, microseconds),
 * generation (1 + the highest parent's, 1 for a root), and the snapshot
 * row in delta form against the first parent's snapshot (depth = its
 * depth + 1; a checkpoint with the full manifest when that reaches
 * MH_CHECKPOINT_INTERVAL, depth then 0; a root's delta is its whole
 * manifest). A tree equal to the first parent's reuses its row
 * (new_snapshot false: a delta against itself would make the row its own
 * parent). */
typedef struct {
    /* in */
    int nparents; /* 0..2 */
    const char *parents[2];
    int64_t parent_gens[2];
    const char *parent_snap;       /* the first parent's snapshot (NULL for a root) */
    int64_t parent_depth;          /* its depth */
    const mh_manifest_t *parent_m; /* its manifest (NULL or empty for a root) */
    const mh_manifest_t *m;        /* the new tree */
    const char *message, *author, *branch;
    /* out */
    mh_id_t sid, cid;
    char committed_at[48];
    int64_t gen, depth;
    bool new_snapshot, checkpoint;
    mh_buf_t up, rm, cp;                      /* delta_upsert, delta_remove, checkpoint (msgpack); mh_rw_commit_free */
    char entries[24], depth_s[24], gen_s[24]; /* as text, for the statements */
} mh_rw_commit_t;

/* Computes the outputs (CPU only: thread-safe, for the thread pool).
 * MH_ENOMEM. */
int mh_rw_commit_build(mh_rw_commit_t *c);
/* Its statements: the snapshot row (when new), the commit row, this
 * repository's commit_refs and snapshot_refs rows (ON CONFLICT DO
 * NOTHING: a commit may exist already). */
void mh_rw_commit_rows(mh_db_batch_t *b, const char *repo_id, const mh_rw_commit_t *c);
void mh_rw_commit_free(mh_rw_commit_t *c);

/* --------------------------------------------------- staged uploads */

/* A push grant (SPEC 4.3): the right to import one uploaded pack. */
typedef struct {
    char *grant_id, *staging_key;
    bool verified; /* its upload was hashed by the server already */
    uint64_t size; /* the size it promised */
} mh_grant_t;

/* The grant protocol of push and mpack.index: which bytes a repository
 * may import under mpack_id, and reading, checking and placing them.
 *   lookup    does the repository reference the pack? its unexpired,
 *             unconsumed grants for it, verified first, then newest;
 *   read      the pack key when referenced; else each grant in that order
 *             until one has a completed upload (SPEC 4.3: any grant with a
 *             completed upload, not just the newest): its staged key, or,
 *             for a verified grant whose staged key is gone (an earlier
 *             attempt moved it), the pack key; an unverified grant never
 *             reads the pack key (naming a hash imports nothing);
 *   verified  records that the server hashed the upload (before it leaves
 *             its staging key, so a retry may read it from its final key);
 *   place     moves the upload to mpacks/<hex> (inside the transaction,
 *             under the pack's lock); when the staged key is gone, the
 *             pack must already be in place with the same size. */
typedef struct {
    /* in */
    const char *repo_id, *mpack_id;
    const char *head;  /* optional: lookup also tells whether this commit is the repository's */
    mh_arena_t *arena; /* grants and keys */
    /* out */
    char pack_key[MH_MPACK_KEY_SIZE];
    bool referenced; /* the repository references the pack (mpack_refs) */
    bool head_known; /* head is one of the repository's commits */
    mh_grant_t *grants;
    size_t ngrants, next;    /* next: the grant read tries next */
    const mh_grant_t *grant; /* the grant whose upload was read (NULL: read from the pack key as referenced) */
    const char *src;         /* the key the bytes came from */
    bool trusted;            /* referenced, or a verified grant: the bytes were hashed when they entered */
    mh_buf_t bytes;          /* the pack (mh_rw_upload_free) */
    char size[24];           /* its byte count as text (mh_rw_upload_rows) */
    int i_index, i_refs;     /* where mh_rw_upload_rows put its two counts */
    int64_t indexed;         /* mh_rw_upload_written: mpack_index rows added */
    int64_t referenced_new;  /* mh_rw_upload_written: object_refs rows added */
    enum {
        MH_UPLOAD_READ = 0,     /* bytes read */
        MH_UPLOAD_NO_GRANT,     /* not referenced and no grant -> 404 no_grant */
        MH_UPLOAD_NOT_STAGED,   /* grants, none with a completed upload -> 404 not_staged */
        MH_UPLOAD_SIZE_MISMATCH /* the staged upload's size is not the grant's -> 422 size_mismatch */
    } outcome;                  /* of read */
} mh_upload_t;

void mh_rw_upload_init(mh_upload_t *up, mh_arena_t *a, const char *repo_id, const char *mpack_id);
void mh_rw_upload_lookup(mh_step_t *s, mh_upload_t *up);
/* Reads as above; the outcome goes to up->outcome (the operation goes
 * on; store errors end it). */
void mh_rw_upload_read(mh_step_t *s, mh_upload_t *up);
void mh_rw_upload_verified(mh_step_t *s, const mh_upload_t *up);
void mh_rw_upload_place(mh_step_t *s, mh_upload_t *up);
/* The rows of the pack read (mh_rw_pack_rows, kind "push", with its new
 * objects). up must stay in place until the batch is sent (its size
 * text); mh_rw_upload_written then reads the two counts from the
 * batch's results into up->indexed and up->referenced_new. */
void mh_rw_upload_rows(mh_db_batch_t *b, mh_upload_t *up);
void mh_rw_upload_written(mh_upload_t *up, PGresult **res);
/* The statement that consumes the grant read from (none: nothing), for
 * the transaction that moves the branch (SPEC 4.3). */
void mh_rw_upload_consume(mh_db_batch_t *b, const mh_upload_t *up);
void mh_rw_upload_free(mh_upload_t *up);

#endif
