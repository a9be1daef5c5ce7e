/*
 * mpack_internal.h — helpers shared by the mpack module's .c files only.
 */
#ifndef MH_MPACK_INTERNAL_H
#define MH_MPACK_INTERNAL_H

#include <string.h>

#ifndef OPENSSL_SUPPRESS_DEPRECATED
#define OPENSSL_SUPPRESS_DEPRECATED 1 /* SHA256_Init & co., as everywhere here */
#endif
#include <openssl/sha.h>

#include "mh/mpack.h"

/* Bytewise path order, a proper prefix first. Since paths hold no NUL,
 * this is also the order of SPEC's "path 0x00 object_id" strings. */
static inline int mh_path_cmp(const char *a, size_t an, const char *b, size_t bn)
{
    size_t m = an < bn ? an : bn;
    int c = memcmp(a, b, m);
    if (c) return c;
    return an < bn ? -1 : an > bn;
}

/* mh_id_valid without branches: core's version exits on the first bad
 * digit, which makes it mispredict on random hex (~100 ns an id, 40% of
 * parsing a pack); this one checks all 64 digits and vectorises. */
static inline bool mh_id_ok(const char *p, size_t n)
{
    if (!p || n != MH_ID_LEN || memcmp(p, "sha256:", 7) != 0) return false;
    unsigned bad = 0;
    for (int i = 7; i < MH_ID_LEN; i++) {
        uint8_t c = (uint8_t)p[i];
        bad |= (unsigned)((uint8_t)(c - '0') > 9) & (unsigned)((uint8_t)(c - 'a') > 5);
    }
    return bad == 0;
}

/* Index of the first entry whose path is >= (path, plen). */
size_t mh__manifest_lower_bound(const mh_manifest_t *m, const char *path, size_t plen);

/* Records that entries from index i on may have changed (cache upkeep). */
static inline void mh_manifest_dirty(mh_manifest_t *m, size_t i)
{
    if (i < m->dirty) m->dirty = i;
}

/* Makes room for at least `need` entries. MH_ENOMEM. */
int mh__manifest_reserve(mh_manifest_t *m, size_t need);

/* Decodes the 64 hex digits of an id that passed mh_id_ok into its
 * digest (lowercase only, without the branches of a general decoder). */
static inline void mh__id_digest(const char *id, uint8_t out[32])
{
    const uint8_t *h = (const uint8_t *)id + 7;
    for (int k = 0; k < 32; k++) {
        uint8_t hi = h[2 * k], lo = h[2 * k + 1];
        out[k] = (uint8_t)((((hi & 15) + 9 * (hi >> 6)) << 4) | ((lo & 15) + 9 * (lo >> 6)));
    }
}

/* ---------------------------------------- pack element checks (pack_elem.c) */

/* Where a reader is, for messages: "<sect>[<idx>].<field>: <msg>". */
typedef struct {
    mh_arena_t *a;      /* for the message (static fallback without memory) */
    const char **why;   /* receives the message */
    const char *sect;   /* "commits", "meta.snapshots", "frames", ... */
    size_t idx;         /* element index, or MH__NO_IDX */
} mh__rd_t;
#define MH__NO_IDX SIZE_MAX

/* Sets *r->why to "<sect>[<idx>].<field>: <msg>" (field may be NULL) and
 * returns err. */
int mh__bad(mh__rd_t *r, int err, const char *field, const char *msg);

/* The checks of one decoded element, exactly those documented at
 * mh_pack_read: a commit map, a snapshot map, the branch_heads value
 * (nil accepted: *out NULL). Values borrow the decoded bytes. MH_EPARSE. */
int mh__pack_commit(mh__rd_t *r, const mh_val_t *map, mh_pack_commit_t *c);
int mh__pack_snapshot(mh__rd_t *r, const mh_val_t *map, mh_pack_snapshot_t *s);
int mh__pack_heads(mh__rd_t *r, const mh_val_t *v, const mh_val_t **out);

/* The fewest bytes a valid element can take: a map header plus its
 * required keys, with 71-byte ids and empty strings. A section claiming
 * more elements than the pack could hold is refused up front. */
#define MH__MIN_COMMIT_BYTES 200  /* commit_id, snapshot_id, message, author, committed_at */
#define MH__MIN_SNAPSHOT_BYTES 86 /* snapshot_id */
#define MH__MIN_BLOB_BYTES 93     /* object_id, content */
#define MH__MIN_FRAME_BYTES 20    /* codec, size, blobs, data (empty) */

/* ------------------------------------------ zstd parameters (zstd_util.c) */

/* Checks a writer level: 0 -> 3, 1..19 accepted (above 19 zstd's window
 * outgrows what readers accept by default). MH_EINVAL. */
int mh__zlevel(int level, int *out);
/* Sets up a compression context for one frame of `size` bytes (pledged:
 * the frame header carries the size, and small frames get small
 * windows). The one place every writer path and the sizer take their
 * parameters from, so the sizer's count and the writer's bytes agree.
 * Returns 0 or MH_ENOMEM/MH_EINVAL. `cctx` is a ZSTD_CCtx *. */
int mh__zcctx_frame(void *cctx, int level, uint64_t size);

/* ------------------------------------------ blob hashing (blob_hash.c) */

/* A walk over one v2 frame's blobs as its decompressed bytes pass: each
 * blob's bytes hashed and compared with its id, empty blobs with the
 * empty digest. Used by the reader on its own thread and by the hasher
 * thread (MH_PACKR_PARALLEL). */
typedef struct {
    const mh_packr_blob_t *b; /* the frame's blobs (not owned) */
    uint32_t n, cur;          /* cur: the blob being hashed; after a false
                                 return, the blob that does not hash to its
                                 id, or n when bytes came past the last blob */
    uint64_t left;            /* bytes of blob cur still to come */
    SHA256_CTX sha;
} mh__bcur_t;

/* Starts at the frame's first blob (past the empty ones). False when an
 * empty blob's id is not the empty digest (c->cur names it). */
bool mh__bcur_start(mh__bcur_t *c, const mh_packr_blob_t *b, uint32_t n);
/* The frame's next n decompressed bytes. False on a mismatch (c->cur <
 * c->n names the blob) or on bytes past the last blob (c->cur == c->n). */
bool mh__bcur_feed(mh__bcur_t *c, const uint8_t *p, size_t n);

/* The first mismatch the hasher found: frame index, blob index within
 * the frame, the id the bytes did not hash to. */
typedef struct {
    size_t frame_idx;
    uint32_t blob;
    uint8_t id[32];
} mh__bhash_bad_t;

typedef struct mh__bhash mh__bhash_t;

/* Starts a hasher thread with its chunk buffers (2 MiB). MH_ENOMEM. The
 * caller frees it with mh__bhash_free. */
int mh__bhash_new(mh__bhash_t **out);
/* A blob frame starts: its blob records are copied. MH_EHASH when
 * a mismatch was found already, MH_ENOMEM. May wait for queue room. */
int mh__bhash_frame(mh__bhash_t *h, size_t frame_idx, const mh_packr_blob_t *blobs, uint32_t n);
/* The frame's next decompressed bytes (copied). MH_EHASH when a mismatch
 * was found already. May wait for a free chunk buffer. */
int mh__bhash_data(mh__bhash_t *h, const uint8_t *p, size_t n);
/* Waits until everything handed over is hashed; true (and *bad filled
 * when bad is not NULL) when a mismatch was found. */
bool mh__bhash_sync(mh__bhash_t *h, mh__bhash_bad_t *bad);
/* Bytes the hasher holds (its buffers and the frames queued). */
size_t mh__bhash_mem(mh__bhash_t *h);
/* Stops the thread (what is queued is dropped) and frees everything.
 * NULL is a no-op. */
void mh__bhash_free(mh__bhash_t *h);

#endif
