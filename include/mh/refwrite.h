/*
 * refwrite.h — the one write path of the repository refs (src/hub/
 * refwrite.c): every writer of a repository's ref rows and branches goes
 * through it — push, server-side commits, proposal merges, the
 * mpack.index and mpack.gc jobs, repository deletion, the branch, tag
 * and protection API and repository settings. It alone owns:
 *
 *   - the transaction's lock order: (1) the repository row FOR UPDATE,
 *     (2) the pack's advisory lock, (3) rows of the operation's own (a
 *     proposal), (4) the branch row FOR UPDATE; every ref writer holds the
 *     repository row, so writers of one repository are serialised and
 *     cannot deadlock (docs/architecture.md);
 *   - the ref rows (commit_refs, snapshot_refs, mpack_refs; object_refs
 *     is a view: a repository holds the blobs of the packs it references,
 *     sql/0050), the global rows they name (commits, snapshots,
 *     mpack_index, mpacks; objects is a view of mpack_index, sql/0040),
 *     the temporary tables bulk writers COPY into;
 *   - every branch move: ONE judgement (mh_rw_move_check: compare-and-swap,
 *     fast-forward, the kind of move; protection rules belong there) and
 *     one way to apply it with the state_seq bump (mh_rw_move_rows);
 *   - building a server-side commit (delta against the parent manifest,
 *     the checkpoint rule, ids, generation);
 *   - the staged-upload grant protocol of push and mpack.index, and the
 *     streaming read of the upload both share (src/hub/upload.c).
 *
 * Everything here runs as steps of the caller's operation (mh/step.h): a
 * function that takes the mh_step_t starts one asynchronous call and the
 * operation goes on with its next step when it completes; errors end the
 * operation (MH_E* through its finish, SPEC refusals through
 * mh_step_refuse). Loop thread only, except mh_rw_commit_build.
 *
 * Depends on core, db, store, budget and mpack only, so jobs and hub both
 * use it.
 */
#ifndef MH_REFWRITE_H
#define MH_REFWRITE_H

#include "mh/budget.h"
#include "mh/mpack.h"
#include "mh/packbuild.h"
#include "mh/step.h"

/* SQL text: true when repository REPO holds blob OBJ (both SQL
 * expressions, e.g. "$1" and "u.id"): a pack it references indexes the
 * blob, or a row kept by sql/0050 names it. The same answer as
 * `EXISTS (SELECT 1 FROM object_refs ...)` without the view's UNION: the
 * blob's index rows by object id (the inner OFFSET 0 keeps the planner
 * from reaching them through the index on mpack_id, a read of the whole
 * pack per probe when its statistics are stale), then mpack_refs by its
 * key; a correlated subquery, never a join that reads all of the
 * repository's blobs (docs/benchmarks.md, issue 20). SPEC 3. */
#define MH_SQL_HOLDS_BLOB(REPO, OBJ)                                                                         \
    "(EXISTS (SELECT 1 FROM (SELECT hi.mpack_id FROM mpack_index hi WHERE hi.object_id = " OBJ " OFFSET 0) hi" \
    " JOIN mpack_refs hr ON hr.mpack_id = hi.mpack_id AND hr.repo_id = " REPO ") OR EXISTS (SELECT 1 FROM"    \
    " object_refs_kept hk WHERE hk.repo_id = " REPO " AND hk.object_id = " OBJ "))"

/* Every MH_CHECKPOINT_INTERVAL links a snapshot row keeps its full
 * manifest (DESIGN section 4: bounded delta chains). */
#define MH_CHECKPOINT_INTERVAL 64

/* True when p[0..n) may name a branch or a tag (SPEC 4.2, git's ref-name
 * rules): 1..255 bytes of printable ASCII (0x21..0x7e: no space, no
 * control byte), none of ~^:?*[\, no "..", "//" or "@{", not starting or
 * ending with '/' or '.', no '/'-separated segment starting with '.' or
 * ending with ".lock". The one check of every ref name: push, server-side
 * commits, proposals, the branch and tag API. Pure. */
bool mh_ref_name_valid(const char *p, size_t n);

/* --------------------------------------------- transaction, lock order */

/* The temporary tables a bulk writer COPYs into, and their COPY
 * text-format columns. They belong to the database session: the first
 * writer on a pooled connection creates them (CREATE TEMP TABLE IF NOT
 * EXISTS), every COMMIT empties them (ON COMMIT DELETE ROWS), a ROLLBACK
 * hides what its transaction put in, and a connection given back after a
 * ROLLBACK drops them (DISCARD TEMP, mh_dbconn_release: the hidden rows
 * would stay on disk until a COMMIT), so each transaction starts with
 * them empty. Creating and dropping four tables per write
 * cost ~2 ms of catalog work (docs/benchmarks.md). Their columns:
 *   tmp_commits   commit_id, parent_commit_id, parent2_commit_id,
 *                 snapshot_id, message, author, committed_at, branch,
 *                 generation (int), meta (bytea: the msgpack map of the
 *                 commit's other keys, NULL when none)
 *   tmp_snapshots snapshot_id, parent_snapshot_id, delta_upsert (bytea,
 *                 msgpack map), delta_remove (bytea, msgpack array),
 *                 entry_count, depth (int), checkpoint (bytea or NULL);
 *                 in COPY BINARY format (mh_copyb_*, db.h), whole: header,
 *                 rows, trailer (the deltas and checkpoints are most of a
 *                 push's bytes: raw, not hex)
 *   tmp_objects   object_id, byte_offset, byte_length, frame_no (a
 *                 pack's blobs: v1 the content bytes in the file and
 *                 frame_no NULL (\N); v2 the blob inside its frame's
 *                 decompressed data and the frame's index;
 *                 mh_rw_index_rows and mh_rw_built_rows write them)
 *   tmp_frames    frame_no, data_offset, data_length, codec ("zstd" or
 *                 "none"), size, blob_count (a v2 pack's frames, sql/0030;
 *                 only with MH_RW_FRAMES) */
enum { MH_RW_COMMITS = 1, MH_RW_SNAPSHOTS = 2, MH_RW_OBJECTS = 4, MH_RW_FRAMES = 8 };

/* On the operation's held connection (mh_step_acquire first), one round
 * trip: BEGIN, the temporary tables in `tmp` (created unless the session
 * has them), then the first two locks of
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

/* The advisory locks of several packs as one statement, in pack id order
 * (so two holders of several cannot wait on each other in a cycle):
 * every id of the text[] $1 except $2 (a pack the caller locked already,
 * mh_rw_begin). GC takes the locks of the packs it replaces before it
 * decides which no repository references any more: a writer that is
 * referencing one of them right now (its lock held, its mpack_refs row
 * not yet committed) finishes first, and GC's next statement sees its
 * row; a writer that comes later finds the rows GC deleted missing and
 * inserts them again (mh_rw_pack_rows). Without it a repository could
 * commit a reference to a pack whose index rows GC was deleting, and
 * hold none of its blobs (the object_refs view, sql/0050). */
extern const char mh_rw_sql_packs_lock[];

/* -------------------------------------------------------- rows, refs */

/* Statement builders: each appends its statements to the caller's batch
 * (mh_db_batch_t), for a pipeline on the held connection. Where a count
 * is noted, the statement returns one row with one integer, and its index
 * in the batch is stored through the pointer (which may be NULL). */

/* From tmp_commits (tables has MH_RW_COMMITS) and tmp_snapshots
 * (MH_RW_SNAPSHOTS): the global commit and snapshot rows (ON CONFLICT DO
 * NOTHING, in key order: other repositories race for the same rows), and
 * this repository's commit_refs (count: refs added) and snapshot_refs
 * (count). Ref rows are inserted with a sorted anti-join: the repository
 * row lock makes ON CONFLICT unnecessary; each pushed row is probed by
 * its whole key (none when the repository has no ref of that kind), so
 * the cost follows the rows written, not the repository. */
void mh_rw_history_rows(mh_db_batch_t *b, const char *repo_id, unsigned tables, int *i_commits, int *i_snapshots);

/* A pack and its blobs (tmp_objects, tmp_frames): the pack's mpacks row
 * (kind "push", "commit" or "gc"; a superseded pack is live again), its
 * mpack_frames rows (v2), its mpack_index rows (count: rows added; the
 * `objects` view reads its sizes and mpack:// URIs from them, sql/0040)
 * and this repository's mpack_refs row, which gives the repository the
 * pack's blobs (the object_refs view, sql/0050). With i_refs, also how
 * many of tmp_objects' blobs the repository did not hold before (the
 * count SPEC 4.3 reports as objects_written; *i_refs is its statement):
 * every blob when the repository referenced no pack, else one probe per
 * blob; GC and server-side commits, which report no such count, pass
 * NULL. `size` is the pack's byte count as text. The caller holds the
 * pack's lock (mh_rw_begin with mpack_id): the index rows are inserted
 * without ON CONFLICT. */
typedef struct {
    const char *repo_id, *mpack_id, *size, *kind;
    bool frames;      /* tmp_frames exists (mh_rw_begin with MH_RW_FRAMES): mpack_frames rows */
} mh_rw_pack_t;
void mh_rw_pack_rows(mh_db_batch_t *b, const mh_rw_pack_t *p, int *i_index, int *i_refs);

/* The COPY rows of a pack read by mh_packr (SPEC 2, 2.1): tmp_objects
 * rows of its blobs, one per distinct object id (the first occurrence
 * wins), appended to `objects`, *nrows their number; for a v2 pack also
 * one tmp_frames row per frame (index order), appended to `frames`.
 * Pure CPU. MH_ENOMEM. */
int mh_rw_index_rows(const mh_packr_result_t *p, mh_buf_t *objects, mh_buf_t *frames, size_t *nrows);

/* The tmp_objects and tmp_frames COPY rows of a pack the builder wrote
 * (mh_pb_place, mh_pb_frames after a successful run), appended to
 * objects and frames. MH_ENOMEM. */
int mh_rw_built_rows(const mh_pb_t *pb, mh_buf_t *objects, mh_buf_t *frames);

/* Deleting a repository: the ref rows and the repository row (branches,
 * tags, protection rules, grants, proposals, collaborators and cached
 * fetch answers go with it by ON DELETE CASCADE). Global rows and packs
 * are left to GC (SPEC 4.1). */
void mh_rw_repo_delete_rows(mh_db_batch_t *b, const char *repo_id);

/* ------------------------------------------------------- branch moves */

typedef enum {
    MH_MOVE_FAST_FORWARD, /* push, API move: the new head must descend from the old one (or create the branch) */
    MH_MOVE_FORCE,        /* push or API move with force: any head (a protected branch: a fast-forward) */
    MH_MOVE_COMMIT,       /* a server-side commit on top of the old head (or creating the branch) */
    MH_MOVE_MERGE,        /* a proposal merge: a merge commit on top of the old head (or creating it) */
    MH_MOVE_CREATE,       /* a new branch only (the branch API) */
    MH_MOVE_DELETE,       /* the branch goes (new_head NULL; the branch API) */
} mh_move_kind_t;

typedef enum {
    MH_MOVE_OK = 0,
    MH_MOVE_STALE,        /* cas: the branch is not at expected_old -> 409 stale_head */
    MH_MOVE_NOT_FF,       /* -> 409 non_fast_forward */
    MH_MOVE_UNKNOWN_HEAD, /* the new head is no commit of this repository -> 422 unknown_head (api: 404) */
    MH_MOVE_EXISTS,       /* MH_MOVE_CREATE of an existing branch -> 409 exists */
    MH_MOVE_ABSENT,       /* MH_MOVE_DELETE of a missing branch -> 404 not_found */
    MH_MOVE_DEFAULT,      /* MH_MOVE_DELETE of the default branch -> 409 default_branch */
    MH_MOVE_PROTECTED,    /* the branch's protection rule forbids it -> 403 protected_branch */
} mh_move_verdict_t;

/* A branch's protection rule (SPEC 4.2; sql/0036). */
typedef struct {
    bool allow_force_push; /* a move that is not a fast-forward is allowed */
    bool allow_delete;     /* deleting the branch is allowed */
    bool require_proposal; /* no move but a proposal merge (MH_MOVE_MERGE) */
} mh_rule_t;

typedef struct {
    /* in */
    const char *repo_id, *branch;
    mh_move_kind_t kind;
    const char *new_head;     /* NULL for a delete */
    const char *new_parent;   /* the new head's first parent when known (a commit this transaction writes) */
    bool cas;                 /* compare the current head with expected_old */
    const char *expected_old; /* with cas: NULL means "the branch does not exist" */
    bool head_written_here;   /* the new head's commit_refs row is written later in this transaction */
    bool api;                 /* a move of the branch API: an unknown commit is 404 (SPEC 4.2), push's is 422 */
    /* out */
    bool exists;               /* the branch existed (locked) */
    char old_head[MH_ID_SIZE]; /* its head then ("" when it did not) */
    bool is_default;           /* it is the repository's default branch */
    bool has_rule;             /* a protection rule names it */
    mh_rule_t rule;            /* that rule */
    mh_move_verdict_t verdict;
} mh_move_t;

/* The one judgement of every branch move: locks the branch row (the last
 * lock of the order), then, in a statement of its own (so it sees what
 * the lock's previous holder committed), reads whether the new head is a
 * commit of this repository, whether the branch is the default one and
 * its protection rule; decides per kind, in this order:
 *   - the new head is a commit of this repository (unless written here);
 *   - DELETE of a missing branch: ABSENT;
 *   - cas: STALE;
 *   - CREATE of an existing branch: EXISTS; DELETE of the default: DEFAULT;
 *   - the rule (SPEC 4.2): DELETE unless allow_delete; with
 *     require_proposal any kind but MERGE that changes the head (creating
 *     the branch included); FORCE unless allow_force_push or a
 *     fast-forward: PROTECTED;
 *   - the other kinds but FORCE, CREATE and DELETE need a fast-forward:
 *     creation, the same head, new_parent == old head, or else a walk of
 *     parents from the new head pruned by generation (its cost is the
 *     commits between the two heads).
 * Because the rule is read inside the move's transaction after the
 * repository row and the branch row are held, and every rule change takes
 * the repository row first (mh_rw_rule_rows), a rule set while a move is
 * in flight either applies to it or was set after it committed. The
 * verdict is left in mv->verdict; the operation goes on either way
 * (mh_rw_move_refuse turns a verdict into SPEC's answer). mv must live
 * until the step after. */
void mh_rw_move_check(mh_step_t *s, mh_move_t *mv);

/* mh_rw_move_check of a commit the server writes in this transaction
 * (kind MH_MOVE_COMMIT or MH_MOVE_MERGE, head new_head) onto branch: a
 * compare-and-swap from expected_old (NULL: the branch must not exist),
 * new_parent the commit's first parent (NULL: a root). */
void mh_rw_commit_move(mh_step_t *s, mh_move_t *mv, const char *repo_id, const char *branch, mh_move_kind_t kind,
                       const char *new_head, const char *new_parent, const char *expected_old);

/* Ends the operation with SPEC's refusal for a verdict (the detail names
 * the branch and heads, or the rule that refused). */
void mh_rw_move_refuse(mh_step_t *s, const mh_move_t *mv);

/* The statement that applies a judged move, for the operation's write
 * pipeline: the branch row updated, inserted (a new branch) or deleted,
 * and repos.state_seq bumped in the same statement unless nothing changed
 * (the same head). Every branch move bumps it, which is what keeps the
 * per-process caches keyed by state_seq exact. */
void mh_rw_move_rows(mh_db_batch_t *b, const mh_move_t *mv);

/* ------------------------------------- protection, tags, settings */

/* Statement builders for a transaction that holds the repository row
 * (mh_rw_begin). Each is one statement; its result columns are listed. */

/* Sets (inserts or replaces) the rule of branch `branch`, which must
 * exist (its row is locked FOR UPDATE: the last lock of the order), and
 * bumps state_seq; by = the caller's handle. Result: no row when the
 * branch does not exist, else one: branch, allow_force_push,
 * allow_delete, require_proposal ("t"/"f"), updated_by, updated_at
 * (ISO-8601 UTC), state_seq. */
void mh_rw_rule_rows(mh_db_batch_t *b, const char *repo_id, const char *branch, const mh_rule_t *r, const char *by);
/* Deletes the rule of `branch` (the branch need not exist), bumping
 * state_seq when there was one. Result: one row, the count deleted. */
void mh_rw_rule_delete_rows(mh_db_batch_t *b, const char *repo_id, const char *branch);

/* Creates tag `name` on commit_id (a commit of this repository) with
 * message and tagger, bumping state_seq. Tags never move: an existing
 * name is left alone. Result: one row: known ("t" when commit_id is this
 * repository's), created_at (ISO-8601 UTC; NULL when nothing was
 * inserted: unknown commit, or the tag exists). */
void mh_rw_tag_rows(mh_db_batch_t *b, const char *repo_id, const char *name, const char *commit_id,
                    const char *message, const char *tagger);
/* Deletes tag `name` (only the ref: its commit stays), bumping state_seq
 * when it existed. Result: one row, the count deleted. */
void mh_rw_tag_delete_rows(mh_db_batch_t *b, const char *repo_id, const char *name);

/* Repository settings (SPEC 4.1 PATCH): each of description, visibility
 * and default_branch that is not NULL replaces the current value;
 * default_branch must name an existing branch (read after the repository
 * row lock, so a concurrent branch delete cannot slip between). Result:
 * one row: ok ("f" when default_branch names no branch: nothing
 * changed), then, when ok, the nine columns of a repository row in
 * mh__repo_row's order (repo_id, owner, owner_id, name, slug, visibility,
 * description, default_branch, created_at). */
void mh_rw_settings_rows(mh_db_batch_t *b, const char *repo_id, const char *description, const char *visibility,
                         const char *default_branch);

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

/* The grant protocol of push and mpack.index (src/hub/upload.c): which
 * bytes a repository may import under mpack_id, and reading, checking and
 * placing them. In order:
 *   lookup    does the repository reference the pack? its unexpired,
 *             unconsumed grants for it, verified first, then newest;
 *   locate    the pack key when referenced; else each grant in that order
 *             until one has a completed upload (SPEC 4.3: any grant with a
 *             completed upload, not just the newest): its staged key, or,
 *             for a verified grant whose staged key is gone (an earlier
 *             attempt moved it), the pack key; an unverified grant never
 *             reads the pack key (naming a hash imports nothing). One HEAD
 *             per candidate: nothing is read yet;
 *   stream    reads the located bytes through the pack reader in windows
 *             (never the whole pack), on the thread pool, within the
 *             pack-memory budget (below);
 *   verified  records that the server hashed the upload (before it leaves
 *             its staging key, so a retry may read it from its final key);
 *   place     moves the upload to mpacks/<hex> (inside the transaction,
 *             under the pack's lock, once nothing can refuse the
 *             operation any more); when the staged key is gone, the pack
 *             must already be in place with the same size;
 *   unplace   after an operation that placed its upload failed anyway: the
 *             upload goes back to its staging key unless a committed row
 *             references the pack (issue 15 item 4: nothing is left under
 *             mpacks/ without a row). */
typedef struct mh__upstream mh__upstream_t; /* a stream in flight (internal) */
typedef struct {
    /* in */
    const char *repo_id, *mpack_id;
    const char *head;  /* optional: lookup also tells whether this commit is the repository's */
    mh_arena_t *arena; /* grants, keys, and the metadata of the pack read (the reader's arena) */
    /* out */
    char pack_key[MH_MPACK_KEY_SIZE];
    bool referenced; /* the repository references the pack (mpack_refs) */
    bool head_known; /* head is one of the repository's commits */
    mh_grant_t *grants;
    size_t ngrants, next;    /* next: the grant locate tries next */
    const mh_grant_t *grant; /* the grant whose upload was located (NULL: the pack key, as referenced) */
    const char *src;         /* the key the bytes are read from */
    bool trusted;            /* referenced, or a verified grant: the bytes were hashed when they entered */
    uint64_t size;           /* the pack's byte count (HEAD of src) */
    enum {
        MH_UPLOAD_READ = 0,     /* located */
        MH_UPLOAD_NO_GRANT,     /* not referenced and no grant -> 404 no_grant */
        MH_UPLOAD_NOT_STAGED,   /* grants, none with a completed upload -> 404 not_staged */
        MH_UPLOAD_SIZE_MISMATCH /* the staged upload's size is not the grant's -> 422 size_mismatch */
    } outcome;                  /* of locate */
    /* stream out: the reader, its result valid until mh_rw_upload_free */
    mh_packr_t *reader;
    const mh_packr_result_t *pack;
    mh_budget_t *budget; /* the budget charged (NULL: none) */
    mh_budget_res_t mem; /* what this operation holds of it: the reader's records and metadata, rows */
    bool placed;         /* place moved the upload from its staging key to the pack key */
    /* rows */
    char size_s[24];        /* the byte count as text (mh_rw_upload_rows) */
    int i_index, i_refs;    /* where mh_rw_upload_rows put its two counts */
    int64_t indexed;        /* mh_rw_upload_written: mpack_index rows added */
    int64_t referenced_new; /* mh_rw_upload_written: blobs the repository did not hold before */
    mh__upstream_t *st;
} mh_upload_t;

void mh_rw_upload_init(mh_upload_t *up, mh_arena_t *a, const char *repo_id, const char *mpack_id);
void mh_rw_upload_lookup(mh_step_t *s, mh_upload_t *up);
/* Locates as above; the outcome goes to up->outcome (the operation goes
 * on; store errors end it). */
void mh_rw_upload_locate(mh_step_t *s, mh_upload_t *up);

/* How mh_rw_upload_stream reads. */
typedef struct {
    mh_budget_t *budget;         /* the process's pack-memory budget; NULL: unmetered */
    const mh_pack_limits_t *lim; /* NULL: mh_pack_limits_default */
    size_t window;               /* store reader window, bytes; 0: MH_STORE_WINDOW_DEFAULT */
} mh_rw_stream_opts_t;

/* Reads the located pack (outcome MH_UPLOAD_READ) as a stream, SPEC 4.3
 * and 4.8: the store reader delivers windows of up->src (fs: pread,
 * s3: ranged GETs; the next window is read while this one is worked on);
 * each window is fed to an mh_packr on the thread pool while, for an
 * untrusted upload, a second thread-pool job runs the whole-pack SHA-256
 * over the same window (the two big CPU costs on two cores). Untrusted
 * bytes are read with MH_PACKR_VERIFY (every blob hashed against its id,
 * every v2 frame decompressed within its bounds) and the pack's hash is
 * compared with mpack_id; trusted bytes (referenced, or a verified grant)
 * with MH_PACKR_NO_DECOMPRESS and no hashing. Nothing of the pack is kept
 * but its metadata (in up->arena) and the reader's records.
 * Memory: before opening, the two windows plus a little are reserved
 * from opts->budget (in up->mem); after each window the reservation grows
 * to cover mh_packr_mem (waiting for the budget while the store reader
 * holds its next window); at the end the windows are given back and the
 * reader's memory stays reserved until mh_rw_upload_free.
 * Ends the step with: 0 (up->reader and up->pack set); MH_EPARSE with
 * the reader's reason (malformed pack, a limit of opts->lim: all 422 at
 * push), MH_EHASH ("the pack does not hash to mpack_key", or a blob that
 * does not hash to its id), MH_EBUDGET (the budget stayed spent: 503 with
 * Retry-After), MH_ENOMEM, store errors (MH_ESTORE also when the staged
 * key vanished under the read: a concurrent unpack of the same upload). */
void mh_rw_upload_stream(mh_step_t *s, mh_upload_t *up, const mh_rw_stream_opts_t *opts);
/* Grows up->mem by `bytes` (rows built from the pack), waiting for the
 * budget as the stream does (MH_EBUDGET); nothing without a budget. */
void mh_rw_upload_charge(mh_step_t *s, mh_upload_t *up, size_t bytes);

void mh_rw_upload_verified(mh_step_t *s, const mh_upload_t *up);
void mh_rw_upload_place(mh_step_t *s, mh_upload_t *up);
/* For an operation's finish when it failed after mh_rw_upload_place moved
 * the upload (up->placed): starts, on its own, a transaction that takes
 * the pack's lock and, unless an mpacks row references the pack (a
 * concurrent operation committed it meanwhile), moves the pack back to
 * its staging key, where a retry under the grant finds it until the grant
 * expires (SPEC 4.3). Nothing when the upload was not placed. Logs its
 * own failures (fsck --repair covers a crash). */
void mh_rw_upload_unplace(const mh_step_t *s, const mh_upload_t *up);
/* The rows of the pack read (mh_rw_pack_rows, kind "push", with its new
 * objects; with frames when it is v2). up must stay in place until the
 * batch is sent (its size text); mh_rw_upload_written then reads the two
 * counts from the batch's results into up->indexed and
 * up->referenced_new. */
void mh_rw_upload_rows(mh_db_batch_t *b, mh_upload_t *up);
void mh_rw_upload_written(mh_upload_t *up, PGresult **res);
/* The statement that consumes the grant read from (none: nothing), for
 * the transaction that moves the branch (SPEC 4.3). */
void mh_rw_upload_consume(mh_db_batch_t *b, const mh_upload_t *up);
/* Frees the reader and gives back the budget (the metadata stays in the
 * arena). */
void mh_rw_upload_free(mh_upload_t *up);

#endif
