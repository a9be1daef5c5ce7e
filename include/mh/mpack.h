/*
 * mpack.h — the storage model of SPEC sections 1 and 2: blob, snapshot
 * and commit ids; paths and manifests; delta application; the mpack
 * reader (v0 and v1, recording each blob's byte range, never copying blob
 * contents) and writer (v1).
 *
 * Invariants:
 *  - A manifest is a sorted array of entries (path bytewise ascending,
 *    unique). Entries borrow their path and id bytes from buffers that
 *    must outlive the manifest (the pack buffer, a PGresult copy in an
 *    arena, ...). Sorting by path is the same as sorting the SPEC's
 *    "path 0x00 object_id" strings, since paths contain no NUL.
 *  - The reader never trusts counts: every count is checked against the
 *    bytes left and the limits before anything is allocated.
 */
#ifndef MH_MPACK_H
#define MH_MPACK_H

#include "mh/codec.h"
#include "mh/core.h"

/* ------------------------------------------------------------------ ids */

/* True when p[0..n) is a valid manifest path (SPEC 1): 1..4096 bytes,
 * relative, '/'-separated, no empty, "." or ".." segment, no NUL, no
 * leading or trailing '/'. UTF-8 validity is checked too. */
bool mh_path_valid(const char *p, size_t n);

/* Commit id (SPEC 1): SHA-256 of the parent ids sorted bytewise and
 * joined with NUL, then NUL snapshot_id NUL message NUL committed_at NUL
 * author. parents: 0..2 ids (text; at most 8 are used), sorted here (the
 * caller's order does not matter). Allocates nothing; cannot fail. */
void mh_commit_id(const mh_str_t *parents, int nparents, mh_str_t snapshot_id, mh_str_t message,
                  mh_str_t committed_at, mh_str_t author, mh_id_t *out);

/* The store key of a pack (SPEC 3): "mpacks/<64 hex>" for the pack id
 * "sha256:<64 hex>" (MH_ID_LEN bytes at mpack_id), NUL-terminated into
 * out. The one place that spells the layout. */
#define MH_MPACK_KEY_SIZE 80
void mh_mpack_key(char out[MH_MPACK_KEY_SIZE], const char *mpack_id);

/* ------------------------------------------------------------ manifests */

typedef struct {
    const char *path;
    uint32_t plen;
    const char *id; /* MH_ID_LEN bytes, not NUL-terminated */
} mh_mentry_t;

typedef struct mh_mhash mh_mhash_t; /* opaque: saved SHA-256 states */

/* Read e[0..n) freely. Change entries only through the functions below,
 * or call mh_manifest_touch() after editing e[] directly: the id cache
 * relies on knowing the lowest changed index. A read-only view over
 * entries held elsewhere may be set up as {.e = entries, .n = n} (cap 0):
 * find and id work on it without allocating; do not modify or free it. */
typedef struct {
    mh_mentry_t *e; /* heap array, sorted by path */
    size_t n, cap;
    size_t dirty;   /* lowest index changed since the cached states (internal) */
    mh_mhash_t *hc; /* id cache, NULL until the first mh_manifest_id (internal) */
} mh_manifest_t;

/* Zero-initialise ({0}) for an empty manifest. Frees the entry array and
 * the id cache and leaves m empty ({0}). */
void mh_manifest_free(mh_manifest_t *m);
/* Deep copy of the entry array and of the id cache (paths/ids still
 * borrowed), so ids of a clone that is then changed a little stay cheap.
 * dst must be initialised (zeroed or a manifest); its old entries are
 * replaced, its memory reused. MH_ENOMEM. */
int mh_manifest_clone(mh_manifest_t *dst, const mh_manifest_t *src);
/* Binary search; NULL when absent. */
const mh_mentry_t *mh_manifest_find(const mh_manifest_t *m, const char *path, size_t plen);
/* Inserts or replaces (binary search + one memmove). The path and id
 * bytes are borrowed. Does not validate them. MH_ENOMEM. */
int mh_manifest_upsert(mh_manifest_t *m, const char *path, uint32_t plen, const char *id);
/* Removes; MH_ENOENT when absent. */
int mh_manifest_remove(mh_manifest_t *m, const char *path, size_t plen);
/* Declares that entries from index `from` on were changed by direct
 * writes to e[] (invalidates the cached hash states past it). */
void mh_manifest_touch(mh_manifest_t *m, size_t from);
/* Snapshot id of the manifest (SPEC 1): SHA-256 over the entries
 * "path 0x00 id" in order, joined with 0x00; the empty manifest hashes "".
 * Incremental: the manifest caches the SHA-256 state every 16 entries and
 * only re-hashes from the first entry changed since the last call (and a
 * clone inherits the cache), so rebuilding a chain of snapshots that each
 * change a few files hashes about half the bytes. Updates that cache
 * (hence not thread-safe on one manifest; the cache is freed by
 * mh_manifest_free); otherwise const. A manifest whose e[] the caller
 * set up itself (cap == 0, e.g. a view over arena memory) is hashed from
 * scratch and nothing is allocated or written. Never fails (without
 * memory for the cache it hashes from scratch). */
void mh_manifest_id(const mh_manifest_t *m, mh_id_t *out);
/* The same id computed from scratch, through core's SHA-256 wrapper and
 * without touching the cache (the reference for tests; all-zero on ENOMEM). */
void mh_manifest_id_nocache(const mh_manifest_t *m, mh_id_t *out);

/* Applies a delta: removes `remove` (array of STR paths), then upserts
 * `upsert` (map STR path -> STR id); either may be NULL (empty). Validates
 * every path (mh_path_valid) and id (mh_id_valid) and rejects a path that
 * appears twice in `upsert`, all before changing anything. A remove of an
 * absent path (or the same path removed twice) is MH_ENOENT and leaves m
 * unchanged. Costs O(n + k log k) for k delta entries. The upsert's path
 * and id bytes are borrowed. On error *why names the problem (static);
 * only MH_ENOMEM may leave m partially changed.
 * Errors: MH_EPARSE (bad type/path/id, duplicate), MH_ENOENT, MH_ENOMEM. */
int mh_manifest_apply(mh_manifest_t *m, const mh_val_t *upsert, const mh_val_t *remove, const char **why);

/* Encodes as a msgpack map path -> id in path order (for checkpoints and
 * deltas kept in PostgreSQL), appending to out (unchanged on error).
 * MH_ENOMEM. */
int mh_manifest_encode(const mh_manifest_t *m, mh_buf_t *out);
/* Decodes a msgpack map path -> id into m (initialised: zeroed or a
 * manifest, whose old entries are replaced); entries borrow from buf
 * (which must outlive m); `a` holds temporary decode nodes. Validates
 * paths and ids; any key order is accepted (sorted here), a duplicate
 * path is an error. MH_EPARSE (m is then empty), MH_ENOMEM. */
int mh_manifest_decode(mh_arena_t *a, const uint8_t *buf, size_t n, mh_manifest_t *m);

/* Computes the delta from `from` to `to`: upsert map (paths new in `to`
 * or whose id changed, path order) and remove array (paths only in
 * `from`), each encoded as msgpack and appended to the two buffers, with
 * counts. Applying the result to `from` gives `to`. MH_ENOMEM. */
int mh_manifest_diff(const mh_manifest_t *from, const mh_manifest_t *to, mh_buf_t *upsert_mp,
                     uint32_t *nupsert, mh_buf_t *remove_mp, uint32_t *nremove);

/* ----------------------------------------------------------- pack read */

typedef struct {
    mh_str_t commit_id, parent, parent2; /* parent.p == NULL for nil */
    mh_str_t snapshot_id, message, author, committed_at, branch; /* branch "" when absent */
    const mh_val_t *map; /* the whole commit map (metadata kept verbatim) */
} mh_pack_commit_t;

typedef struct {
    mh_str_t snapshot_id, parent; /* parent.p == NULL: a root */
    const mh_val_t *upsert;       /* MAP (possibly empty), never NULL */
    const mh_val_t *remove;       /* ARR (possibly empty), never NULL */
} mh_pack_snapshot_t;

typedef struct {
    mh_str_t object_id;
    uint64_t offset, length; /* content bytes inside the pack buffer */
} mh_pack_blob_t;

typedef struct {
    int version; /* 0 or 1 */
    mh_pack_commit_t *commits;
    size_t ncommits;
    mh_pack_snapshot_t *snapshots;
    size_t nsnapshots;
    mh_pack_blob_t *blobs;
    size_t nblobs;
    const mh_val_t *branch_heads; /* MAP or NULL */
} mh_pack_t;

typedef struct {
    uint32_t max_depth;      /* msgpack nesting; default 16 */
    uint32_t max_items;      /* total array elements + map pairs; default 64M */
    uint32_t max_commits, max_snapshots, max_blobs; /* default 16M each */
} mh_pack_limits_t;

extern const mh_pack_limits_t mh_pack_limits_default;

/* Parses a whole pack (v1 "MUSE" 0x01 + body, or v0 body, told apart by
 * the first four bytes; "MUSE" with another version byte is an error).
 * Checks types of every field, ids (^sha256:[0-9a-f]{64}$), that message,
 * author, committed_at and branch are UTF-8 without NUL, and limits.
 * Accepted leniencies: any section absent or nil; `objects` as a synonym
 * of `blobs` (both present: error); unknown keys ignored (in a commit map
 * they stay in ->map as metadata); parents and parent_snapshot_id absent
 * or nil; `branch` absent (""); delta_upsert/delta_remove absent or nil
 * (empty); blob content bin or str. Refused besides type errors: a known
 * key twice in one map; an invalid path or id inside a delta; optional
 * metadata of the wrong type (agent_id, model_id, toolchain_id,
 * prompt_hash, signature, signer_key_id, signer_public_key, sem_ver_bump:
 * str or nil; breaking_changes: array or nil; metadata: map or nil).
 * Duplicate paths inside one delta are left to mh_manifest_apply.
 * Does not hash anything. Values are allocated in `a` and borrow `buf`.
 * On error *why is a human-readable reason allocated in `a` (e.g.
 * "commits[3].snapshot_id: not a sha256 id"). Errors: MH_EPARSE,
 * MH_ELIMIT, MH_ENOMEM. */
int mh_pack_read(mh_arena_t *a, const uint8_t *buf, size_t len, const mh_pack_limits_t *lim, mh_pack_t *out,
                 const char **why);

/* Hashes every blob's content (buf + offset, length) and compares with
 * its object_id (SPEC 4.3). Returns 0, or MH_EHASH with *bad = index of
 * the first mismatching blob. Pure CPU: call it on the thread pool. */
int mh_pack_verify_blobs(const uint8_t *buf, const mh_pack_t *p, size_t *bad);

/* The metadata of a read commit: its map minus the 8 standard keys
 * (commit_id, parent_commit_id, parent2_commit_id, snapshot_id, message,
 * author, committed_at, branch), encoded as a msgpack map and appended to
 * out, ready to store and to pass back to mh_packw_commit as `meta`.
 * *count (may be NULL) receives its number of pairs. MH_ENOMEM. */
int mh_pack_commit_meta(const mh_pack_commit_t *c, mh_buf_t *out, uint32_t *count);

/* ---------------------------------------------------------- pack write */

/* A v1 pack writer appending to a heap buffer. Sections are written in
 * the fixed order commits, snapshots, blobs, branch_heads (all four, even
 * when empty); each begins with its element count and must then get
 * exactly that many elements. Errors are sticky in w->err: MH_ENOMEM, or
 * MH_EINVAL for a misuse (section out of order, wrong element count,
 * `meta`/delta bytes that do not start with a map/array header). */
typedef struct {
    mh_mpw_t mp;
    mh_buf_t *out;
    int err;
    int state;     /* last section opened (internal) */
    uint32_t left; /* elements still due in it (internal) */
} mh_packw_t;

/* Starts a v1 pack in out (appending): writes "MUSE" 0x01 and the body's
 * 4-key map header (SPEC 2). Then call, in order: _commits(n) + n
 * _commit, _snapshots(n) + n _snapshot, _blobs(n) + n _blob,
 * _branch_heads(n) + n _branch_head, and _finish. */
void mh_packw_init(mh_packw_t *w, mh_buf_t *out);
void mh_packw_commits(mh_packw_t *w, uint32_t n);
/* One commit map: the 8 standard keys, then the pairs of `meta` (a
 * msgpack map of optional metadata keys, spliced verbatim; NULL/0 = none;
 * the map header count becomes 8 + meta's count). `meta` must not contain
 * the standard keys (mh_pack_commit_meta strips them; the reader refuses
 * a known key twice). parent/parent2 with p == NULL are written as nil. */
void mh_packw_commit(mh_packw_t *w, mh_str_t commit_id, mh_str_t parent, mh_str_t parent2, mh_str_t snapshot_id,
                     mh_str_t message, mh_str_t author, mh_str_t committed_at, mh_str_t branch,
                     const uint8_t *meta, size_t meta_len);
void mh_packw_snapshots(mh_packw_t *w, uint32_t n);
/* One snapshot in delta form, keys snapshot_id, parent_snapshot_id,
 * delta_upsert, delta_remove; upsert_mp is a msgpack map and remove_mp a
 * msgpack array (e.g. from mh_manifest_diff), spliced verbatim; a length
 * of 0 writes an empty map/array. parent.p == NULL writes nil (root). */
void mh_packw_snapshot(mh_packw_t *w, mh_str_t snapshot_id, mh_str_t parent, const uint8_t *upsert_mp,
                       size_t upsert_len, const uint8_t *remove_mp, size_t remove_len);
void mh_packw_blobs(mh_packw_t *w, uint32_t n);
/* One blob map {"object_id": id, "content": bin}; the content bytes are
 * copied from `content`. */
void mh_packw_blob(mh_packw_t *w, mh_str_t object_id, const void *content, size_t len);
void mh_packw_branch_heads(mh_packw_t *w, uint32_t n);
void mh_packw_branch_head(mh_packw_t *w, mh_str_t branch, mh_str_t commit_id);
/* Returns w->err, or MH_EINVAL when a section or element is missing. */
int mh_packw_finish(mh_packw_t *w);

#endif
