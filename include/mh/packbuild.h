/*
 * packbuild.h — the one pack builder (SPEC 2, 2.1, 4.4, 4.6, 4.7, 4.8):
 * every pack the server writes (fetch packs, GC's consolidated pack,
 * the pack of a server-side commit) is built here, as a stream.
 *
 * The caller lists the blobs (id, length, the path and age that place it
 * in path order, and where its bytes are: a byte range of a v1 source
 * pack, a blob inside a frame of a v2 source pack, or memory) and gives
 * a callback that writes the metadata (commits, snapshots, branch heads).
 * The builder plans the output, then streams it. Blobs go in path order
 * (all versions of a path together, oldest first; blobs without a path
 * last, by id) in both versions, so the output depends on the blobs and
 * not on where they are stored (a v1 clone is the same pack before and
 * after GC):
 *
 *   - v1 output: each blob raw;
 *   - v2 output: frames of MH_PB_FRAME_TARGET bytes: a source frame whose
 *     blobs are all wanted is copied verbatim (git's pack reuse;
 *     opts.reuse_frames: the output then depends on the sources too), a
 *     blob of at least MH_PB_FRAME_TARGET gets a frame of its own,
 *     compressed in two passes (mh_zsizer_t, then the writer) so it is
 *     never held; the others are gathered into built frames. A frame
 *     zstd cannot shrink is written with codec "none".
 *
 * Source bytes come from bounded ranged reads of the source packs
 * (mh_store_reader_open_ranges, one reader at a time, ranges in the order
 * the output needs them); the output goes through mh_packw into the
 * store's streaming writer (fs: temporary file; s3: multipart upload) or
 * into a memory buffer, hashed as it is written, so the pack's id is
 * known when the last byte is out. CPU work (decompression, compression,
 * hashing) runs on the libuv thread pool, one piece at a time; the loop
 * moves the bytes.
 *
 * Memory: what a build holds is bounded by configuration, never by the
 * pack: two read windows, one frame's content and its compressed copy,
 * a bounded output buffer, the zstd contexts (their size depends on the
 * level) and the writer's two chunks. mh_pb_mem tells the total, which
 * the build reserves from the pack-memory budget before it holds any of
 * it (waiting in the budget's queue; MH_EBUDGET when it stayed spent).
 * Not counted: the caller's blob list and metadata.
 *
 * Determinism: the same inputs (blobs, their sources, metadata, options)
 * give the same bytes.
 *
 * Threads: every function is for the loop thread; the metadata callback
 * runs on the thread pool (it must only touch what the caller does not
 * touch while the build runs).
 */
#ifndef MH_PACKBUILD_H
#define MH_PACKBUILD_H

#include <uv.h>

#include "mh/budget.h"
#include "mh/core.h"
#include "mh/mpack.h"
#include "mh/store.h"

/* Decompressed bytes per built frame of a v2 output, and the size from
 * which a blob gets a frame of its own (docs/architecture.md, "The pack
 * builder": 4 MiB frames of libuv's history at level 3 are 5.5 MB, 2 MiB
 * ones 6.1 MB, 8 MiB ones 5.1 MB). A constant: the bytes of a pack must
 * not depend on the configuration of the process that built it beyond
 * the level. */
#define MH_PB_FRAME_TARGET ((uint64_t)4 << 20)

/* Bytes of the source packs read per window (two are held). */
#define MH_PB_READ_WINDOW ((size_t)2 << 20)

/* The pack index of a blob given in memory (mh_pb_src_mem). */
#define MH_PB_MEM UINT32_MAX

typedef struct mh_pb mh_pb_t;

/* Writes part of the metadata into w: part MH_PB_META_HEAD is, for v1,
 * the commits and snapshots sections and, for v2, the commits, snapshots
 * and branch_heads sections; MH_PB_META_TAIL is v1's branch_heads (v2:
 * nothing). The callback may stop at any element once w->out->len >=
 * room (so the output stays bounded: the builder drains it and calls
 * again) and sets *done when the part is complete. Runs on the thread
 * pool. Returns 0 or an MH_E* error (which ends the build). */
enum { MH_PB_META_HEAD = 0, MH_PB_META_TAIL = 1 };
typedef int (*mh_pb_meta_fn)(void *ud, mh_packw_t *w, int part, size_t room, bool *done);

typedef struct {
    int version;       /* 1 or 2 */
    int level;         /* zstd level of the frames the builder compresses (v2): 1..19, 0 = 3 */
    bool reuse_frames; /* v2: copy a source frame whose blobs are all wanted verbatim
                          (ignored with verify: a copied frame is never decompressed) */
    bool meta_frame;   /* v2: the metadata goes in one zstd `meta` frame */
    bool verify;       /* hash every blob against its id as it passes: MH_EHASH (with
                          mh_pb_why naming the object) on a mismatch */
    mh_pb_meta_fn meta; /* NULL: empty commits, snapshots and branch heads */
    void *meta_ud;
} mh_pb_opts_t;

/* A frame of a v2 source pack (its mpack_frames row). */
typedef struct {
    uint32_t frame_no;
    uint64_t data_offset, data_length; /* its `data` bytes in the pack file */
    uint64_t size;                     /* decompressed bytes */
    uint32_t blob_count;               /* entries of its `blobs` array */
    int codec;                         /* MH_PACK_ZSTD or MH_PACK_NONE */
} mh_pb_frame_t;

/* A frame of the pack built (v2), in pack order. */
typedef struct {
    uint64_t data_offset, data_length, size;
    uint32_t nblobs;
    int codec;      /* MH_PACK_ZSTD or MH_PACK_NONE */
    uint8_t kind;   /* MH_PB_BUILT, MH_PB_REUSED, MH_PB_LARGE */
} mh_pb_outframe_t;
enum { MH_PB_BUILT = 0, MH_PB_REUSED = 1, MH_PB_LARGE = 2 };

/* Where a blob landed in the pack built: v1: its content bytes
 * [offset, offset + length) of the file (frame MH_PACK_NOFRAME); v2: the
 * frame (index into mh_pb_frames) and its bytes inside the decompressed
 * frame. */
typedef struct {
    const char *id; /* MH_ID_LEN bytes (the caller's) */
    uint32_t frame;
    uint64_t offset, length;
} mh_pb_place_t;

/* Counts of a finished build. */
typedef struct {
    uint64_t bytes;       /* the pack's size */
    uint64_t bytes_read;  /* source bytes read from the store */
    uint32_t frames_built, frames_reused, frames_large, frames_none; /* none: codec "none" */
    uint64_t blob_bytes;  /* content bytes of all blobs */
    size_t mem;           /* bytes reserved from the budget */
} mh_pb_stats_t;

/* A new build. opts is copied. MH_EINVAL (bad version or level),
 * MH_ENOMEM. Freed by mh_pb_free. */
int mh_pb_new(const mh_pb_opts_t *opts, mh_pb_t **out);

/* Adds a blob: id (MH_ID_LEN bytes, borrowed until mh_pb_free), its
 * length in bytes, and its place in path order: path[0..plen) (borrowed;
 * NULL when unknown: such blobs go last, by id) and age (smaller is
 * older: the versions of one path are written oldest first). Then give
 * its source with exactly one of the two calls below. Ids must be
 * distinct (the caller de-duplicates). *index (may be NULL) receives
 * its index. MH_ENOMEM, MH_EINVAL (after the run started). */
int mh_pb_add(mh_pb_t *b, const char *id, uint64_t len, const char *path, uint32_t plen, uint32_t age,
              size_t *index);
/* Sets (or replaces) blob `index`'s place in path order, as mh_pb_add
 * (for callers that learn paths after the blobs). */
void mh_pb_set_path(mh_pb_t *b, size_t index, const char *path, uint32_t plen, uint32_t age);
/* Blob `index`'s bytes are content[0..len) (borrowed until mh_pb_free). */
void mh_pb_src_mem(mh_pb_t *b, size_t index, const void *content);
/* Blob `index`'s bytes are in pack mpack_id (MH_ID_LEN bytes, copied):
 * frame NULL: a v0/v1 pack, bytes [off, off + len) of the file; else a
 * v2 pack's frame (copied) and bytes [off, off + len) of its
 * decompressed data. MH_ENOMEM. */
int mh_pb_src_pack(mh_pb_t *b, size_t index, const char *mpack_id, const mh_pb_frame_t *frame, uint64_t off);

/* Where a build runs and where its bytes go. */
typedef struct {
    uv_loop_t *loop;
    mh_store_t *store;   /* sources (and the output unless `mem`) */
    mh_budget_t *budget; /* NULL: no reservation */
    /* The output: appended to *mem when set (nothing is stored);
     * otherwise a store writer whose key is mpacks/<hex of the pack's
     * hash>, finished at the end unless keep_open. */
    mh_buf_t *mem;
    bool keep_open; /* leave the writer open: mh_pb_store finishes it */
} mh_pb_env_t;

/* Runs the build: plans, reserves mh_pb_mem bytes from the budget
 * (waiting in its queue), streams the pack out. cb(ud, err) fires once on
 * a later loop turn: 0 (the results below are valid), MH_EBUDGET (the
 * budget stayed spent), MH_EHASH (verify: a blob whose bytes do not hash
 * to its id), MH_EPARSE (a source frame that does not decompress to its
 * size: a corrupt pack), MH_ESTORE/MH_EIO/MH_ENOSPC/MH_ENOENT (the
 * store), MH_ENOMEM, or the metadata callback's error; mh_pb_why gives
 * the reason. env is copied. A build runs once. */
typedef void (*mh_pb_cb)(void *ud, int err);
void mh_pb_run(mh_pb_t *b, const mh_pb_env_t *env, mh_pb_cb cb, void *ud);

/* With keep_open: makes the stored pack visible under mpacks/<hex>
 * (mh_store_writer_finish). cb(ud, err) fires once on a later turn
 * (errors of the store's finish). Only after a successful run. */
void mh_pb_store(mh_pb_t *b, mh_pb_cb cb, void *ud);

/* Results of a successful run (valid until mh_pb_free). */
const mh_id_t *mh_pb_id(const mh_pb_t *b);
void mh_pb_stats(const mh_pb_t *b, mh_pb_stats_t *st);
/* v2: the frames written, in order (n via *n; NULL/0 for v1). */
const mh_pb_outframe_t *mh_pb_frames(const mh_pb_t *b, size_t *n);
/* Where blob `index` (mh_pb_add's order) landed. */
void mh_pb_place(const mh_pb_t *b, size_t index, mh_pb_place_t *out);
/* Number of blobs added. */
size_t mh_pb_count(const mh_pb_t *b);

/* The reason of the last error (static or owned by b), NULL when none. */
const char *mh_pb_why(const mh_pb_t *b);

/* The bytes the build reserves (valid once planned: after mh_pb_run
 * started; for tests and logs). */
size_t mh_pb_mem(const mh_pb_t *b);

/* Ends a build at any time: a build in flight stops (no callback fires
 * after this call; work already on the thread pool finishes first and
 * is dropped), a writer still open is aborted (nothing is kept), the
 * reservation is released. NULL is fine. */
void mh_pb_free(mh_pb_t *b);

/* Appends Prometheus text for the process's builds:
 * musehub_pack_builds_total{result}, musehub_pack_build_frames_total{kind}
 * (built, reused, large), musehub_pack_build_bytes_total (bytes written),
 * musehub_pack_build_read_bytes_total (source bytes read). MH_ENOMEM. */
int mh_pb_metrics_write(mh_buf_t *out);

#endif
