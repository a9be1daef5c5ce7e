/*
 * mpack.h — the storage model of SPEC sections 1 and 2: blob, snapshot
 * and commit ids; paths and manifests; delta application; the mpack
 * reader (v0, v1 and v2, streaming: fed in chunks of any size, it keeps
 * only metadata and one record per blob, never blob contents), the
 * writer (v1 and v2, streaming into a buffer the caller drains), the
 * byte-range URIs of blobs, and the bounded frame decompressor that
 * serves one blob of a v2 pack (SPEC 2.1).
 *
 * Invariants:
 *  - A manifest is a sorted array of entries (path bytewise ascending,
 *    unique). Entries borrow their path and id bytes from buffers that
 *    must outlive the manifest (the pack buffer, a PGresult copy in an
 *    arena, ...). Sorting by path is the same as sorting the SPEC's
 *    "path 0x00 object_id" strings, since paths contain no NUL.
 *  - The reader never trusts counts: every count is checked against the
 *    limits (and the bytes left, when the pack's length is known) before
 *    anything is allocated, and nothing is sized from a count: arrays
 *    grow as their elements actually arrive.
 *  - The reader never decompresses past a frame's declared `size` (the
 *    zip-bomb guard) and holds a bounded amount whatever the pack size:
 *    metadata (bounded by a limit), blob and frame records, one zstd
 *    context and small fixed buffers (mh_packr_mem).
 *  - No globals: readers and writers on different threads are independent.
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

/* ------------------------------------------------------- pack: records */

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

/* How a blob's bytes are stored (SPEC 2, 2.1). */
enum {
    MH_PACK_RAW = 0,  /* v0/v1: the content bytes themselves, in the pack file */
    MH_PACK_NONE = 1, /* v2 frame with codec "none": data = the bytes */
    MH_PACK_ZSTD = 2, /* v2 frame with codec "zstd": data = one Zstandard frame */
};

/* SPEC 2.1: the largest `size` of a frame holding several blobs (64 MiB). */
#define MH_PACK_FRAME_MAX ((uint64_t)64 << 20)
/* No frame: the frame index of a v0/v1 blob. */
#define MH_PACK_NOFRAME UINT32_MAX

/* One v2 frame as read (or the meta frame): where its `data` bytes are in
 * the pack file, how they decompress, and which blob records it holds. */
typedef struct {
    uint64_t data_offset, data_length; /* the `data` bin's payload, bytes in the pack file */
    uint64_t size;                     /* decompressed bytes (SPEC `size`) */
    uint32_t first_blob, nblobs;       /* its blobs: blobs[first_blob .. first_blob + nblobs) */
    uint8_t codec;                     /* MH_PACK_NONE or MH_PACK_ZSTD */
} mh_pack_frame_t;

/* ------------------------------------------------------- pack: limits */

/* Bounds applied while reading untrusted packs. Start from
 * mh_pack_limits_default and change fields. The fields added with v2
 * (max_frames and below) take their default when zero, so limit structs
 * filled in before they existed keep working; the others mean what they
 * say. */
typedef struct {
    uint32_t max_depth;      /* msgpack nesting; default 16 */
    uint32_t max_items;      /* total array elements + map pairs; default 64M */
    uint32_t max_commits, max_snapshots, max_blobs; /* default 16M each (blobs: over all frames) */
    uint32_t max_frames;     /* v2 frames; default 16M */
    uint64_t max_meta_bytes; /* bytes of metadata kept (element bytes + decoded values); default 1 GiB */
    uint64_t max_unpacked;   /* total decompressed bytes of a v2 pack, frames + meta
                                (MUSEHUB_MAX_UNPACKED_BYTES); default 16 GiB */
    uint64_t max_frame_size; /* `size` of a frame of several blobs; default MH_PACK_FRAME_MAX */
    uint64_t max_reorder;    /* compressed `data` bytes buffered for a frame whose `data` comes
                                before `codec`/`size`/`blobs`; default 64 MiB */
    uint32_t max_window_log; /* largest zstd window accepted (log2 bytes): bounds the
                                decompressor's memory; default 24 (16 MiB; zstd levels
                                1..19 never exceed 8 MiB) */
} mh_pack_limits_t;

extern const mh_pack_limits_t mh_pack_limits_default;

/* ------------------------------------------------ pack: stream reader */

/* A streaming pack reader (SPEC 2 and 2.1; DESIGN 4 "Push"): fed the
 * pack's bytes in chunks of any size (1 byte to many MiB, on any thread,
 * one thread at a time per reader), it parses as the bytes pass and keeps:
 *  - commits, snapshots and branch heads: each element's bytes are held
 *    only until the element is complete, then decoded into the arena and
 *    checked exactly as mh_pack_read documents;
 *  - one mh_packr_blob_t per blob and one mh_pack_frame_t per v2 frame;
 *  - nothing of blob contents: v1 content bytes and v2 `data` bytes are
 *    hashed / decompressed as they pass (a frame whose `data` comes
 *    before its `codec`, `size` or `blobs` is the one exception: its
 *    compressed bytes are buffered, up to limits.max_reorder, and
 *    counted in result.reorder_peak).
 * Errors are sticky: after one, every call returns it again. */
typedef struct mh_packr mh_packr_t;

/* Flags of mh_packr_new. */
enum {
    /* SHA-256 of every byte fed, in result.pack_digest: the pack's id.
     * Leave it off to hash on another thread over the same chunks. */
    MH_PACKR_HASH_PACK = 1u << 0,
    /* Hash every blob against its id as its bytes pass (v1: the content
     * bytes; v2: the decompressed bytes, split at the `blobs` lengths):
     * MH_EHASH on the first mismatch. Required for untrusted packs
     * (SPEC 4.3). Because every id is checked against its content, the
     * same id appearing twice is necessarily the same content (SPEC 2.1
     * "accepted only with identical content") and needs no other check. */
    MH_PACKR_VERIFY = 1u << 1,
    /* Trusted packs only (built by this server): do not decompress blob
     * frames (their sizes and blob lists are still checked; the meta
     * frame is always decompressed). Ignored with MH_PACKR_VERIFY. */
    MH_PACKR_NO_DECOMPRESS = 1u << 2,
    /* The caller promises that every fed chunk stays valid and unchanged
     * until the arena is released (the whole pack in one buffer, a
     * mapping): metadata then points into the chunks instead of being
     * copied. Without it, nothing of a chunk is kept after feed returns. */
    MH_PACKR_BORROW = 1u << 3,
    /* With MH_PACKR_VERIFY: hash the blobs of v2 frames on a second
     * thread the reader starts at the first blob frame, while this one
     * decompresses the next bytes (about 2 MiB more memory, counted in
     * mh_packr_mem; joined by finish or free). Verdicts and messages are
     * the same as without it; worth it for packs of many MiB. */
    MH_PACKR_PARALLEL = 1u << 4,
};

/* One blob as read. The id is kept as its 32-byte digest (the id text is
 * "sha256:" + hex(id); mh_id_from_digest). */
typedef struct {
    uint8_t id[32];
    uint64_t offset, length; /* v0/v1: the content bytes in the pack file;
                                v2: the blob's bytes inside its frame's
                                decompressed data (SPEC 2.1) */
    uint32_t frame;          /* v2: index into result.frames; v0/v1: MH_PACK_NOFRAME */
} mh_packr_blob_t;

/* What a reader has read. Arrays grow while the pack is fed; they are
 * complete only once mh_packr_finish returned 0. */
typedef struct {
    int version;                  /* 0, 1 or 2; -1 until the header is read */
    mh_pack_commit_t *commits;    /* owned by the reader; their values are in the arena */
    size_t ncommits;
    mh_pack_snapshot_t *snapshots; /* owned by the reader; their values are in the arena */
    size_t nsnapshots;
    const mh_val_t *branch_heads; /* MAP (checked: branch -> commit id) or NULL; in the arena */
    mh_packr_blob_t *blobs;       /* owned by the reader (freed by mh_packr_free) */
    size_t nblobs;
    mh_pack_frame_t *frames;      /* owned by the reader */
    size_t nframes;
    bool has_meta;                /* v2: metadata came as the `meta` frame */
    mh_pack_frame_t meta;         /* ... that frame (nblobs 0) */
    uint8_t pack_digest[32];      /* MH_PACKR_HASH_PACK: SHA-256 of the bytes fed, after finish */
    uint64_t bytes;               /* bytes fed */
    uint64_t unpacked;            /* v2: sum of the frames' and meta's `size` */
    uint64_t meta_bytes;          /* metadata bytes held in the arena (limits.max_meta_bytes) */
    uint64_t reorder_peak;        /* largest `data` buffered for key order (0 when writers' order) */
    size_t mem_peak;              /* largest mh_packr_mem seen at the end of a feed */
} mh_packr_result_t;

/* Creates a reader. `a` receives the metadata (decoded values, element
 * bytes, error messages) and must outlive every
 * use of them; the reader adds to it, so charge it to the pack's budget
 * (result.meta_bytes counts what the reader put there). lim NULL = the
 * defaults. flags: MH_PACKR_*. total_len: the pack's length when known
 * (0 = unknown), which lets counts be checked against the bytes left
 * exactly as mh_pack_read does (feeding more than total_len is then
 * MH_EPARSE). *out is freed with mh_packr_free.
 * MH_ENOMEM. */
int mh_packr_new(mh_arena_t *a, const mh_pack_limits_t *lim, unsigned flags, uint64_t total_len, mh_packr_t **out);

/* Feeds the next n bytes of the pack (n may be 0). Pure CPU: call it on
 * the thread pool. Returns 0, or the reader's sticky error: MH_EPARSE
 * (malformed, with mh_packr_why naming the problem, e.g.
 * "frames[3]: data decompresses to more than size (4194304) bytes"),
 * MH_ELIMIT (a limit, including the metadata and unpacked limits),
 * MH_EHASH (MH_PACKR_VERIFY: a blob whose bytes do not hash to its id),
 * MH_ENOMEM. */
int mh_packr_feed(mh_packr_t *r, const void *p, size_t n);

/* Declares the end of the pack: checks that the body is complete (else
 * MH_EPARSE "...truncated"), that a v2 pack has `frames`, and fills
 * pack_digest. Returns 0 or the sticky error. Calling feed afterwards is
 * MH_EINVAL. */
int mh_packr_finish(mh_packr_t *r);

/* The reason of the reader's error (NULL when none): a static string or
 * one allocated in the arena. */
const char *mh_packr_why(const mh_packr_t *r);

/* What has been read so far (complete after mh_packr_finish returned 0).
 * The arrays are valid until mh_packr_free; the values the commits,
 * snapshots and branch heads point to, until the arena's release. */
const mh_packr_result_t *mh_packr_result(const mh_packr_t *r);

/* Bytes the reader holds now: its heap (blob and frame records, element
 * and reorder buffers, the zstd context and window, fixed buffers) plus
 * the metadata it put in the arena. What a caller charges against
 * MUSEHUB_PACK_MEMORY (SPEC 4.8). */
size_t mh_packr_mem(const mh_packr_t *r);

/* Frees the reader's heap (not the metadata in the arena). NULL is fine. */
void mh_packr_free(mh_packr_t *r);

/* --------------------------------------------- pack: whole-buffer read */

typedef struct {
    mh_str_t object_id;      /* "sha256:<hex>" (in the arena) */
    uint64_t offset, length; /* v0/v1: content bytes inside the pack buffer;
                                v2: the blob inside its frame's decompressed data */
    uint64_t frame_offset, frame_length; /* v2: the frame's `data` bytes in the pack; 0 for v0/v1 */
    uint32_t frame;          /* v2: index into frames; MH_PACK_NOFRAME for v0/v1 */
    uint8_t codec;           /* MH_PACK_RAW (v0/v1), MH_PACK_NONE or MH_PACK_ZSTD */
} mh_pack_blob_t;

typedef struct {
    int version; /* 0, 1 or 2 */
    mh_pack_commit_t *commits;
    size_t ncommits;
    mh_pack_snapshot_t *snapshots;
    size_t nsnapshots;
    mh_pack_blob_t *blobs;
    size_t nblobs;
    const mh_val_t *branch_heads; /* MAP or NULL */
    mh_pack_frame_t *frames;      /* v2 (in the arena) */
    size_t nframes;
} mh_pack_t;

/* Parses a whole pack held in buf (v2 "MUSE" 0x02, v1 "MUSE" 0x01, or a
 * v0 body, told apart by the first four bytes; "MUSE" with another
 * version byte is an error) with the stream reader (MH_PACKR_BORROW and
 * `flags`, one feed). Checks types of every field, ids
 * (^sha256:[0-9a-f]{64}$), that message, author, committed_at and branch
 * are UTF-8 without NUL, and limits.
 * Accepted leniencies: any section absent or nil; `objects` as a synonym
 * of `blobs` (both present: error); unknown keys ignored (in a commit map
 * they stay in ->map as metadata; in v0/v1, `frames` and `meta` are such
 * unknown keys); parents and parent_snapshot_id absent or nil; `branch`
 * absent (""); delta_upsert/delta_remove absent or nil (empty); blob
 * content bin or str. Refused besides type errors: a known key twice in
 * one map; an invalid path or id inside a delta; optional metadata of
 * the wrong type (agent_id, model_id, toolchain_id, prompt_hash,
 * signature, signer_key_id, signer_public_key, sem_ver_bump: str or nil;
 * breaking_changes: array or nil; metadata: map or nil).
 * v2 (SPEC 2.1) refuses besides: no `frames`; `blobs`/`objects`; `meta`
 * together with any of commits/snapshots/branch_heads; blobs-carrying
 * keys inside meta; a frame without codec ("zstd"|"none"), size, data
 * (bin) or (not meta) blobs; blobs in the meta frame; a blob entry that
 * is not [id, length]; lengths that do not add up to size; size above
 * limits.max_frame_size unless the frame holds exactly one blob (or is
 * meta); data decompressing to more or fewer than size bytes (never
 * decompressed past size), not one complete zstd frame, or a zstd window
 * above limits.max_window_log; total sizes above limits.max_unpacked
 * (MH_ELIMIT). Frames are decompressed and checked unless
 * MH_PACKR_NO_DECOMPRESS; blobs are hashed only with MH_PACKR_VERIFY
 * (flags 0 hashes nothing, as mh_pack_read always did).
 * Duplicate paths inside one delta are left to mh_manifest_apply.
 * Values are allocated in `a` and borrow `buf`. On error *why is a
 * human-readable reason (static or in `a`), e.g.
 * "commits[3].snapshot_id: not a sha256 id". Errors: MH_EPARSE,
 * MH_ELIMIT, MH_EHASH (VERIFY only), MH_ENOMEM. */
int mh_pack_read_flags(mh_arena_t *a, const uint8_t *buf, size_t len, const mh_pack_limits_t *lim, unsigned flags,
                       mh_pack_t *out, const char **why);
/* mh_pack_read_flags with flags 0. */
int mh_pack_read(mh_arena_t *a, const uint8_t *buf, size_t len, const mh_pack_limits_t *lim, mh_pack_t *out,
                 const char **why);

/* Hashes every v0/v1 blob's content (buf + offset, length) and compares
 * with its object_id (SPEC 4.3). Returns 0, or MH_EHASH with *bad = index
 * of the first mismatching blob. A blob inside a v2 frame cannot be
 * checked from the file bytes: it is MH_EHASH too (read v2 packs with
 * MH_PACKR_VERIFY instead, which hashes them as they are decompressed).
 * Pure CPU: call it on the thread pool. */
int mh_pack_verify_blobs(const uint8_t *buf, const mh_pack_t *p, size_t *bad);

/* The metadata of a read commit: its map minus the 8 standard keys
 * (commit_id, parent_commit_id, parent2_commit_id, snapshot_id, message,
 * author, committed_at, branch), encoded as a msgpack map and appended to
 * out, ready to store and to pass back to mh_packw_commit as `meta`.
 * *count (may be NULL) receives its number of pairs. MH_ENOMEM. */
int mh_pack_commit_meta(const mh_pack_commit_t *c, mh_buf_t *out, uint32_t *count);

/* ---------------------------------------------------------- pack write */

/* A pack writer (SPEC 2, 2.1) appending to a heap buffer `out`. The
 * caller may drain `out` between any two writer calls (take the bytes,
 * hash and store them, set out->len = 0): the writer keeps no pointer
 * into it, and w->pos counts every byte written, drained or not, so the
 * offsets it reports are offsets in the whole pack.
 * Sections come in a fixed order, all of them even when empty, each
 * begun with its element count and then given exactly that many
 * elements: v1: commits, snapshots, blobs, branch_heads; v2: commits,
 * snapshots, branch_heads, frames (as plain keys, or the first three
 * inside the `meta` frame). The same calls give the same bytes (fetch
 * packs are cached by their hash; zstd output depends on the level and
 * the libzstd version only).
 * Errors are sticky in w->err: MH_ENOMEM, or MH_EINVAL for a misuse
 * (section out of order, wrong element or byte count, a level out of
 * range, `meta`/delta bytes that do not start with a map/array header,
 * a compressed length that differs from the one announced). */
typedef struct mh__packw_z mh__packw_z_t; /* v2 state (internal) */
typedef struct {
    mh_mpw_t mp;
    mh_buf_t *out;
    int err;
    int state;      /* last section opened (internal) */
    uint32_t left;  /* elements still due in it (internal) */
    int version;    /* 1 or 2 */
    uint64_t pos;   /* bytes written so far (drained ones included) */
    uint64_t blob_left; /* v1 streamed blob: content bytes still due (internal) */
    /* After mh_packw_frame_end: the frame's `data` bytes in the pack
     * (offset, length) and its decompressed size, for index rows. */
    uint64_t frame_offset, frame_length, frame_size;
    int frame_codec;  /* ... and its codec (MH_PACK_ZSTD or MH_PACK_NONE) */
    mh__packw_z_t *z; /* v2: compression state (internal; freed by finish/free) */
} mh_packw_t;

/* Starts a v1 pack in out (appending): writes "MUSE" 0x01 and the body's
 * 4-key map header (SPEC 2). Then call, in order: _commits(n) + n
 * _commit, _snapshots(n) + n _snapshot, _blobs(n) + n _blob (or
 * _blob_begin + _blob_data), _branch_heads(n) + n _branch_head, and
 * _finish. */
void mh_packw_init(mh_packw_t *w, mh_buf_t *out);

/* Options of a v2 pack. */
typedef struct {
    int level;       /* zstd level for built, large and meta frames: 1..19 (0 = 3) */
    bool meta_frame; /* true: commits, snapshots and branch heads go in one
                        zstd `meta` frame (SPEC 2.1); false: plain keys */
} mh_packw_opts_t;

/* Starts a v2 pack in out: "MUSE" 0x02 and the body map header (4 keys
 * commits, snapshots, branch_heads, frames; or 2: meta, frames). Then:
 * _commits(n) + n _commit, _snapshots(n) + n _snapshot, _branch_heads(n)
 * + n _branch_head, _frames(n) + n frames (each one of the three kinds
 * below, ended by _frame_end), _finish. With meta_frame the metadata is
 * compressed as it is written and only its compressed bytes are held
 * (the `data` length precedes the bytes), until _frames writes it.
 * Errors (sticky): MH_ENOMEM, MH_EINVAL (opts->level out of range). */
void mh_packw_init_v2(mh_packw_t *w, mh_buf_t *out, const mh_packw_opts_t *opts);

/* Opens the commits section: n commit maps follow (v1 and v2). */
void mh_packw_commits(mh_packw_t *w, uint32_t n);
/* One commit map: the 8 standard keys, then the pairs of `meta` (a
 * msgpack map of optional metadata keys, spliced verbatim; NULL/0 = none;
 * the map header count becomes 8 + meta's count). `meta` must not contain
 * the standard keys (mh_pack_commit_meta strips them; the reader refuses
 * a known key twice). parent/parent2 with p == NULL are written as nil. */
void mh_packw_commit(mh_packw_t *w, mh_str_t commit_id, mh_str_t parent, mh_str_t parent2, mh_str_t snapshot_id,
                     mh_str_t message, mh_str_t author, mh_str_t committed_at, mh_str_t branch,
                     const uint8_t *meta, size_t meta_len);
/* Opens the snapshots section: n snapshot maps follow. */
void mh_packw_snapshots(mh_packw_t *w, uint32_t n);
/* One snapshot in delta form, keys snapshot_id, parent_snapshot_id,
 * delta_upsert, delta_remove; upsert_mp is a msgpack map and remove_mp a
 * msgpack array (e.g. from mh_manifest_diff), spliced verbatim; a length
 * of 0 writes an empty map/array. parent.p == NULL writes nil (root). */
void mh_packw_snapshot(mh_packw_t *w, mh_str_t snapshot_id, mh_str_t parent, const uint8_t *upsert_mp,
                       size_t upsert_len, const uint8_t *remove_mp, size_t remove_len);
/* v1 only: opens the blobs section, n blob maps follow. */
void mh_packw_blobs(mh_packw_t *w, uint32_t n);
/* v1: one blob map {"object_id": id, "content": bin}; the content bytes
 * are copied from `content`. Its content starts at w->pos - len after
 * the call. */
void mh_packw_blob(mh_packw_t *w, mh_str_t object_id, const void *content, size_t len);
/* v1: the same blob streamed: _blob_begin writes everything up to the
 * content (which starts at w->pos after the call), then _blob_data
 * appends pieces until exactly len bytes were given. */
void mh_packw_blob_begin(mh_packw_t *w, mh_str_t object_id, uint64_t len);
void mh_packw_blob_data(mh_packw_t *w, const void *p, size_t n);
/* Opens the branch_heads map (n pairs), then one pair per call: branch
 * name -> commit id, written as given. */
void mh_packw_branch_heads(mh_packw_t *w, uint32_t n);
void mh_packw_branch_head(mh_packw_t *w, mh_str_t branch, mh_str_t commit_id);

/* v2: the frames section, n frames. With meta_frame, first writes the
 * `meta` frame (codec zstd; its data offset/length are then in
 * w->frame_offset/frame_length). */
void mh_packw_frames(mh_packw_t *w, uint32_t n);

/* v2 frame, kind (a), built: _frame_begin(codec), then for each blob
 * _frame_blob(id, len) followed by its content in _frame_data pieces
 * (exactly len bytes), then _frame_end, which compresses the frame at
 * the writer's level in one call (the decompressed bytes are held until
 * then: keep frames to a few MiB; more than MH_PACK_FRAME_MAX with
 * several blobs is MH_EINVAL) and writes the frame map {codec, size,
 * blobs, data}. codec: MH_PACK_ZSTD or MH_PACK_NONE. */
void mh_packw_frame_begin(mh_packw_t *w, int codec);
void mh_packw_frame_blob(mh_packw_t *w, mh_str_t object_id, uint64_t len);
void mh_packw_frame_data(mh_packw_t *w, const void *p, size_t n);

/* One blob of a frame, for _frame_copy_begin. */
typedef struct {
    mh_str_t object_id;
    uint64_t length;
} mh_packw_blobref_t;

/* v2 frame, kind (a'), built from the caller's buffer in one call: the
 * blobs (ids and lengths, in order; the lengths must add up to len) and
 * their contents raw[0..len) (borrowed for the call). Compressed with
 * zstd at the writer's level; when that does not make it smaller
 * (already-compressed content) the frame is written with codec "none"
 * and data = raw. The frame is complete when the call returns (no
 * _frame_end); w->frame_* describe it. Holds one compressed copy while
 * it runs (ZSTD_compressBound(len)). More than MH_PACK_FRAME_MAX with
 * several blobs, or lengths that do not add up: MH_EINVAL. */
void mh_packw_frame_put(mh_packw_t *w, const mh_packw_blobref_t *blobs, uint32_t nblobs, const void *raw, size_t len);

/* v2 frame, kind (b), copied verbatim from a source v2 pack (git's pack
 * reuse): codec, size and the blob list as read (their lengths must add
 * up to size), and the `data` length; the map up to the data is written
 * now, then _frame_copy_data appends the compressed bytes in pieces
 * (exactly data_len in all), then _frame_end. Nothing is decompressed or
 * checked against the data: the source was verified when it entered. */
void mh_packw_frame_copy_begin(mh_packw_t *w, int codec, uint64_t size, const mh_packw_blobref_t *blobs,
                               uint32_t nblobs, uint64_t data_len);
void mh_packw_frame_copy_data(mh_packw_t *w, const void *p, size_t n);

/* v2 frame, kind (c), one large blob streamed without holding it: the
 * `data` bin header needs the compressed length before the bytes, so
 * the caller first runs the content through an mh_zsizer_t (same level,
 * same size) to learn data_len, then calls _frame_large_begin and gives
 * the same content again in _frame_large_data pieces (any split); the
 * writer compresses it with the same parameters straight into out, and
 * _frame_end checks the compressed length came out as announced
 * (MH_EINVAL otherwise). The trade-off: the blob is compressed twice (2x
 * CPU) and read twice, but memory stays one zstd context whatever its
 * size. codec MH_PACK_NONE needs no sizer: data_len must equal size. */
void mh_packw_frame_large_begin(mh_packw_t *w, int codec, mh_str_t object_id, uint64_t size, uint64_t data_len);
void mh_packw_frame_large_data(mh_packw_t *w, const void *p, size_t n);

/* Ends the current frame (any kind); afterwards w->frame_offset,
 * frame_length and frame_size describe it. */
void mh_packw_frame_end(mh_packw_t *w);

/* Returns w->err, or MH_EINVAL when a section, element or byte is
 * missing; frees the v2 state (the writer is then spent). */
int mh_packw_finish(mh_packw_t *w);
/* Frees the v2 state of a writer abandoned before _finish (no-op
 * otherwise). */
void mh_packw_free(mh_packw_t *w);

/* Learns the compressed length of one stream of `size` bytes at `level`
 * (kind (c) frames above): compresses with exactly the parameters of
 * mh_packw_frame_large_data and only counts the output. Feed the content
 * in any pieces; _final gives the length (exactly size bytes must have
 * been fed, else MH_EINVAL). Holds one zstd context (~1-10 MiB by
 * level). MH_ENOMEM, MH_EINVAL (level out of range). */
typedef struct mh_zsizer mh_zsizer_t;
int mh_zsizer_new(int level, uint64_t size, mh_zsizer_t **out);
int mh_zsizer_update(mh_zsizer_t *s, const void *p, size_t n);
int mh_zsizer_final(mh_zsizer_t *s, uint64_t *compressed_len);
void mh_zsizer_free(mh_zsizer_t *s);

/* ------------------------------------------------ serving one blob */

/* A bounded frame decompressor for the read API and the fetch builder
 * (SPEC 2.1, "Serving one blob is one ranged read and one frame
 * decompression"): fed a frame's `data` bytes in pieces, it calls out_cb
 * with the decompressed bytes of [off, off + len) only, in pieces of at
 * most 128 KiB (never the whole frame at once), and stops decompressing
 * once that range is out. Never produces more than `size` bytes (more is
 * MH_EPARSE, like a truncated or malformed frame); zstd windows above
 * max_window_log (0 = 24) are MH_ELIMIT. out_cb's pointer is valid
 * during the call only; a nonzero return from it stops the reader and
 * is returned by feed. */
typedef int (*mh_frame_out_cb)(void *ud, const uint8_t *p, size_t n);
typedef struct mh_framer mh_framer_t;

/* codec: MH_PACK_ZSTD or MH_PACK_NONE; [off, off + len) must lie in
 * [0, size] (MH_EINVAL). MH_ENOMEM. */
int mh_framer_new(int codec, uint64_t size, uint64_t off, uint64_t len, uint32_t max_window_log,
                  mh_framer_t **out);
/* Feeds the next n `data` bytes; 0, or a sticky MH_EPARSE / MH_ELIMIT /
 * MH_ENOMEM / the callback's code. Bytes after the range was delivered
 * are ignored. */
int mh_framer_feed(mh_framer_t *f, const void *p, size_t n, mh_frame_out_cb out_cb, void *ud);
/* mh_framer_feed with a bound on the work of one call: stops once about
 * max_out decompressed bytes (128 KiB units; codec none: exactly max_out
 * input bytes) were produced, range or not, and sets *used to the input
 * bytes consumed (all n once the range is out or the frame ended). The
 * caller feeds p + *used later. For producers that must not queue more
 * than a bound per step (a streamed response, a pack build whose output
 * is drained between steps): a small `data` can decompress to up to
 * `size` bytes. Errors as mh_framer_feed. */
int mh_framer_feed_some(mh_framer_t *f, const void *p, size_t n, uint64_t max_out, mh_frame_out_cb out_cb, void *ud,
                        size_t *used);
/* True once the whole range was delivered (the caller may stop reading). */
bool mh_framer_done(const mh_framer_t *f);
/* End of the data: 0 when the range was delivered, else MH_EPARSE
 * (the frame was truncated or shorter than size). */
int mh_framer_finish(mh_framer_t *f);
/* A static reason for the last error (NULL when none). */
const char *mh_framer_why(const mh_framer_t *f);
/* Bytes held (zstd context and window, buffer). */
size_t mh_framer_mem(const mh_framer_t *f);
void mh_framer_free(mh_framer_t *f);

/* One-shot: appends bytes [off, off + len) of the frame (data, dlen) to
 * out. Errors as above (out unchanged on error). */
int mh_frame_extract(int codec, const uint8_t *data, size_t dlen, uint64_t size, uint64_t off, uint64_t len,
                     mh_buf_t *out);

/* ------------------------------------------------ blob byte ranges */

/* Where a blob is (SPEC 2 "Blob byte ranges", 2.1): in pack `mpack`, v1:
 * content bytes [offset, offset + length) of the file; v2 (framed):
 * the frame's data bytes [frame_offset, + frame_length) of the file,
 * and the blob [offset, + length) of its decompressed data. */
typedef struct {
    mh_id_t mpack;
    bool framed;
    uint64_t frame_offset, frame_length;
    uint64_t offset, length;
} mh_blob_loc_t;

/* Longest URI: "mpack://" + id + "#" + 4 numbers of 20 digits + 3 separators. */
#define MH_BLOB_URI_MAX (8 + MH_ID_LEN + 1 + 4 * 20 + 3 + 1)

/* Writes "mpack://<id>#<offset>:<length>" (v1) or
 * "mpack://<id>#<frame_offset>:<frame_length>/<offset>:<length>" (v2),
 * NUL-terminated, into out (size >= MH_BLOB_URI_MAX is always enough).
 * Returns the length, or MH_EINVAL (bad id, size too small). */
int mh_blob_uri_format(const mh_blob_loc_t *loc, char *out, size_t size);
/* Parses either form (numbers in canonical decimal: no sign, no leading
 * zero, no overflow; ranges that do not overflow 64 bits); MH_EPARSE. */
int mh_blob_uri_parse(const char *s, size_t n, mh_blob_loc_t *out);

#endif
