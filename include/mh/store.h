/*
 * store.h — the object store interface (SPEC section 3) and its backends:
 * `fs` (a local directory; presigned URLs point at the server itself under
 * /_store/, HMAC-signed, expiring) and `s3` (any S3-compatible store, AWS
 * Signature V4, libcurl multi on the loop).
 *
 * Keys: "mpacks/<64 hex>" (immutable, content-addressed packs),
 * "incoming/<upload id>" (private staging keys of push grants). Each
 * backend also keeps private temporaries under "tmp/" (fs: files of
 * writers and uploads in flight; s3: multipart uploads and their
 * completed objects until the server-side copy), never visible as keys.
 *
 * Two families of calls: whole-object calls (get, get_ranges, put, move,
 * delete, head) that hold the bytes in memory, for small objects; and
 * streams (writer, reader) whose memory is bounded by their chunk or
 * window size whatever the object's size (SPEC 4.8), for packs. Stream
 * owners reserve what mh_store_writer_mem / 2 x the window from the
 * process's pack-memory budget (include/mh/budget.h); the store itself
 * never reserves. Design: docs/architecture.md, "Streaming store I/O and
 * the pack-memory budget".
 *
 * Invariants:
 *  - Every operation is asynchronous: the callback fires on a later loop
 *    turn, exactly once. fs does its file I/O on the libuv thread pool.
 *  - A presigned PUT names a staging key bound to a size and a SHA-256;
 *    it can never overwrite an existing object.
 *  - Writes are atomic: a reader sees the whole object or none (fs:
 *    temporary file, fsync, rename).
 *  - A full or read-only store is MH_ENOSPC on every write path (fs:
 *    ENOSPC, EDQUOT, EROFS; s3: HTTP 507 and the "storage full / quota"
 *    error codes), never a generic I/O error: the hub answers 507
 *    insufficient_storage (SPEC 4.8).
 */
#ifndef MH_STORE_H
#define MH_STORE_H

#include <uv.h>

#include "mh/core.h"

typedef struct mh_store mh_store_t;

typedef struct {
    const char *spec;        /* MUSEHUB_STORE: "fs:<dir>" or "s3:<bucket>" */
    const char *public_url;  /* base of fs presigned URLs, e.g. "http://127.0.0.1:1337" */
    const char *signing_secret; /* fs HMAC key; NULL = read or create <dir>/.signing-secret */
    /* s3 */
    const char *s3_endpoint, *s3_region, *s3_access_key, *s3_secret_key;
    bool s3_path_style;
} mh_store_config_t;

/* Opens a backend (SPEC 3, 6). cfg and its strings are copied. fs: creates
 * <dir>/{mpacks,incoming,tmp}, reads or creates <dir>/.signing-secret
 * (0600) unless cfg->signing_secret is set, removes stale tmp/ files.
 * public_url may be NULL (then presign fails with MH_EINVAL).
 * Errors: MH_EINVAL (bad spec; "s3:" until the s3 backend is built),
 * negative errno (fs dir cannot be created). *out freed by mh_store_close. */
int mh_store_open(uv_loop_t *loop, const mh_store_config_t *cfg, mh_store_t **out);
/* Releases the store. Operations still in flight complete normally (their
 * callbacks fire) and the memory is freed after the last one; no new
 * operation may be started. NULL is a no-op. */
void mh_store_close(mh_store_t *s);

/* "fs" or "s3". */
const char *mh_store_kind(const mh_store_t *s);

/* True when key (NUL-terminated) is a staging key "incoming/<1..64 of
 * [A-Za-z0-9_-]>" (SPEC 4.3), the only keys the staged-upload sweep may
 * delete. */
bool mh_store_staging_key_valid(const char *key);

/* Reads [off, off+len) of key (len UINT64_MAX = to the end). On success
 * cb gets `data`, a struct valid only during the callback whose bytes
 * (data->p, data->len; p may be NULL when len is 0) belong to the caller:
 * mh_buf_free(data) them, or take them (copy the struct, or
 * mh_buf_steal) and free later; the store never frees them. data is NULL
 * on error. Errors: MH_EINVAL (bad key, or the range is not inside the
 * object), MH_ENOENT, MH_ENOMEM, MH_ESTORE, MH_EIO. */
typedef void (*mh_store_get_cb)(void *ud, int err, mh_buf_t *data);
void mh_store_get(mh_store_t *s, const char *key, uint64_t off, uint64_t len, mh_store_get_cb cb, void *ud);

/* Reads several byte ranges of one key and returns their bytes
 * concatenated in the order given (ranges may be unsorted, overlapping or
 * repeated; n == 0 gives an empty buffer). Ranges whose gap is below
 * 64 KiB are coalesced into one read (fs: one pread per run of at most
 * 8 MiB; s3: one ranged GET per run, a bounded window in flight).
 * `ranges` is borrowed until cb. Result and errors as mh_store_get. */
typedef struct {
    uint64_t off, len;
} mh_range_t;
void mh_store_get_ranges(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n,
                         mh_store_get_cb cb, void *ud);

/* Writes an object atomically (data borrowed until cb; fs: tmp file,
 * fsync, rename, fsync dir). Overwriting is allowed only for
 * content-addressed keys the server itself built. Errors: MH_EINVAL (bad
 * key), MH_ENOSPC (store full or read-only), MH_EIO, MH_ESTORE. */
typedef void (*mh_store_done_cb)(void *ud, int err);
void mh_store_put(mh_store_t *s, const char *key, const void *data, size_t n, mh_store_done_cb cb, void *ud);

/* Moves src to dst (fs: rename that never replaces; s3: server-side copy
 * then delete). If dst exists already the bytes are identical by hash:
 * src is deleted and the move succeeds. Errors: MH_EINVAL (bad key),
 * MH_ENOENT (src absent, even if dst exists), MH_ENOSPC, MH_EIO,
 * MH_ESTORE. */
void mh_store_move(mh_store_t *s, const char *src, const char *dst, mh_store_done_cb cb, void *ud);

/* Deletes a key (absent is success). Errors: MH_EINVAL, MH_EIO, MH_ESTORE. */
void mh_store_delete(mh_store_t *s, const char *key, mh_store_done_cb cb, void *ud);

/* Size of a key in bytes; MH_ENOENT when absent, MH_EINVAL bad key. */
typedef void (*mh_store_head_cb)(void *ud, int err, uint64_t size);
void mh_store_head(mh_store_t *s, const char *key, mh_store_head_cb cb, void *ud);

/* ------------------------------------------------- streaming writer */

/* Writes one object of any size as a stream, with memory bounded by two
 * chunks, when its final key is known only at the end (a content hash):
 *   fs: a temporary file tmp/w-<random> written and fsynced on the thread
 *       pool, then link(2)ed to the final key (never replacing);
 *   s3: one PUT at finish when the object is smaller than one chunk;
 *       otherwise a multipart upload (CreateMultipartUpload, UploadPart of
 *       `chunk_bytes` each, CompleteMultipartUpload) to tmp/<random>,
 *       then CopyObject to the final key and DeleteObject of the
 *       temporary (an existing final key skips the copy: the multipart
 *       upload is aborted instead).
 * Either way the final key appears whole or not at all, and nothing is
 * left under tmp/ after finish or abort (a crash leaves leftovers that
 * mh_store_sweep_tmp removes). SPEC 2, 3, 4.4 (fetch packs), 4.7 (GC). */
typedef struct mh_store_writer mh_store_writer_t;

typedef struct {
    /* The store computes SHA-256 of the bytes as they pass (on the thread
     * pool) and reports it at finish; without it the caller hashes and
     * names the key itself. */
    bool hash;
    /* Bytes per chunk (fs: one pwrite; s3: one part). 0 = the backend's
     * default: fs 4 MiB, s3 8 MiB. s3 raises anything below 5 MiB to
     * 5 MiB (S3's smallest part but the last). Must be <= 64 MiB. */
    size_t chunk_bytes;
} mh_store_writer_opts_t;

/* The most bytes of memory a writer opened with `o` (NULL = defaults)
 * holds at once: two chunks (one filling, one being written). Reserve
 * this from the pack-memory budget before opening. */
size_t mh_store_writer_mem(const mh_store_t *s, const mh_store_writer_opts_t *o);

/* Opens a writer (no I/O yet: the temporary file or the multipart upload
 * is created by the first chunk that fills). *out is ended by exactly one
 * of mh_store_writer_finish or mh_store_writer_abort. Errors: MH_EINVAL
 * (chunk_bytes above 64 MiB, store closing), MH_ENOMEM. */
int mh_store_writer_open(mh_store_t *s, const mh_store_writer_opts_t *o, mh_store_writer_t **out);

/* Appends n bytes, copied before the call returns (data is the caller's
 * again at once). When a chunk fills it is handed to the thread pool
 * (fs) or uploaded (s3) while the next one fills. cb (may be NULL) fires
 * once on a later loop turn when the writer has room for more (the
 * filling chunk is below chunk_bytes): 0, or the first error of the
 * stream (MH_ENOSPC, MH_EIO, MH_ESTORE, MH_ENOMEM). A caller that waits
 * for cb before writing again holds at most mh_store_writer_mem() + n
 * bytes in the writer. n may be 0: "tell me when there is room".
 * At most one write with a callback may be outstanding; writes without
 * one may be issued any time. Returns 0, or synchronously (cb then never
 * fires): the stream's sticky error, MH_ELIMIT (fs uploads: more bytes
 * than the signed size), MH_EINVAL (a second callback outstanding, or
 * after finish). */
int mh_store_writer_write(mh_store_writer_t *w, const void *data, size_t n, mh_store_done_cb cb, void *ud);

/* True when the filling chunk is full: a write callback (or an n = 0
 * write) would wait for a chunk to be written. For producers that must
 * consume their input (an HTTP body): pause the input while this is true. */
bool mh_store_writer_full(const mh_store_writer_t *w);

/* Bytes written so far (accepted, not necessarily stored yet). */
uint64_t mh_store_writer_size(const mh_store_writer_t *w);

/* Ends the stream: flushes, makes the object durable and visible under
 * `key`, frees w. key must be "mpacks/<64 hex>" (content-addressed), or
 * NULL when the writer hashes (the key is then mpacks/<hex of the
 * SHA-256>). With hash on and a key given, the key must match the hash
 * (else MH_EHASH, nothing kept). If the key exists already its bytes are
 * identical by hash: success, ours are dropped. For an fs upload
 * (mh_store_fs_upload_open) key must be NULL: the staging key of the
 * upload is used, and the length and SHA-256 must equal what the URL
 * signed. cb(ud, err, sha256, size) fires once on a later loop turn;
 * sha256 (32 bytes, valid during the call) is NULL unless the writer
 * hashed; size in bytes. Errors: MH_EINVAL (bad key), MH_EHASH, MH_EEXIST
 * (fs upload only: the staging key appeared meanwhile), MH_ENOSPC,
 * MH_EIO, MH_ESTORE, or the stream's sticky error; on error nothing is
 * kept. An outstanding write callback fires before this one. */
typedef void (*mh_store_writer_done_cb)(void *ud, int err, const uint8_t *sha256, uint64_t size);
void mh_store_writer_finish(mh_store_writer_t *w, const char *key, mh_store_writer_done_cb cb, void *ud);

/* Drops the stream at any time before finish: no callback of w fires
 * after this call (an outstanding write callback included); the
 * temporary data is removed in the background (fs: unlink on the thread
 * pool; s3: AbortMultipartUpload and DeleteObject of the temporary). w
 * is freed by the store. NULL is a no-op. */
void mh_store_writer_abort(mh_store_writer_t *w);

/* ------------------------------------------------- streaming reader */

/* Reads a byte range of one key, or a list of byte ranges, as a
 * sequence of windows delivered in order, with the next window read
 * ahead while the consumer works on the current one (fs: pread on the
 * thread pool; s3: one ranged GET per window). Memory: at most two
 * windows of `window` bytes (ranged readers: two runs of at most
 * `window` bytes) whatever the object's size. The consumer says when it
 * is done with a window (mh_store_reader_next): backpressure. SPEC 4.3
 * (unpack reads the staged pack), 4.4 (fetch packs from byte ranges),
 * 4.7 (GC). */
typedef struct mh_store_reader mh_store_reader_t;

/* One requested range (or a piece of one) inside a delivered window. */
typedef struct {
    size_t index;     /* the range's position in the caller's array */
    uint64_t at;      /* offset of these bytes inside that range */
    const uint8_t *p; /* the bytes (inside the window) */
    size_t n;
} mh_store_piece_t;

/* A delivered window. Valid until mh_store_reader_next or _close. */
typedef struct {
    const uint8_t *p; /* bytes [off, off + n) of the object (NULL when n is 0) */
    size_t n;
    uint64_t off;
    /* Ranged readers: the requested ranges inside this window, in the
     * caller's order; a range longer than the window is split into
     * pieces over several windows (at grows). Sequential readers: one
     * piece, the whole window (index 0, at = off - start). */
    const mh_store_piece_t *pieces;
    size_t npieces;
    uint64_t size; /* the object's size in bytes */
    bool last;     /* no window follows */
} mh_store_window_t;

/* cb(ud, 0, w) per window in order, or cb(ud, err, NULL) once and then
 * nothing more. Errors: MH_ENOENT (absent key), MH_EINVAL (bad key, or a
 * range not inside the object), MH_EIO, MH_ESTORE, MH_ENOMEM. Fires on a
 * later loop turn, never inside a call of this API. */
typedef void (*mh_store_window_cb)(void *ud, int err, const mh_store_window_t *w);

/* Smallest and largest window (bytes); 0 asks for the default, 4 MiB. */
#define MH_STORE_WINDOW_MIN (64u * 1024u)
#define MH_STORE_WINDOW_MAX (64u * 1024u * 1024u)
#define MH_STORE_WINDOW_DEFAULT (4u * 1024u * 1024u)

/* Sequential reader of [off, off + len) of key (len UINT64_MAX = to the
 * end) in windows of `window` bytes (clamped to [MIN, MAX]); the first
 * window is delivered without a call to next. An empty range delivers
 * one empty window (last). *out is freed by mh_store_reader_close, which
 * must be called exactly once (also after an error or the last window).
 * Returns MH_ENOMEM or 0 (other errors arrive through cb). */
int mh_store_reader_open(mh_store_t *s, const char *key, uint64_t off, uint64_t len, size_t window,
                         mh_store_window_cb cb, void *ud, mh_store_reader_t **out);

/* Ranged reader: reads ranges[0..n) of key (borrowed until close),
 * delivering them in the caller's order. Consecutive ranges that ascend
 * and lie within 64 KiB of each other share one window (one pread or one
 * ranged GET: coalescing), never more than `window` bytes; a range
 * longer than `window` is split. n == 0 delivers one empty window.
 * Memory beyond the windows: about 48 bytes per range (the plan).
 * Returns MH_ENOMEM, MH_EINVAL (n > 0 and ranges NULL) or 0. */
int mh_store_reader_open_ranges(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n, size_t window,
                                mh_store_window_cb cb, void *ud, mh_store_reader_t **out);

/* The consumer is done with the window last delivered: its memory may be
 * reused; the next window is delivered (on a later turn) as soon as it
 * has been read. No-op after the last window or an error. */
void mh_store_reader_next(mh_store_reader_t *r);

/* Ends the reader at any time: no callback fires afterwards; a read in
 * flight completes in the background and is dropped. NULL is a no-op. */
void mh_store_reader_close(mh_store_reader_t *r);

/* The most bytes of memory a reader with this window holds (two windows). */
size_t mh_store_reader_mem(size_t window);

/* ------------------------------------------------ listing and sweeps */

/* One key of a listing. key is NUL-terminated, valid during the callback. */
typedef struct {
    const char *key;
    uint64_t size;     /* bytes */
    int64_t mtime;     /* last modification, unix seconds */
} mh_store_entry_t;

/* Lists the keys under `prefix` ("mpacks/" or "incoming/"), one page of
 * at most 1000 in ascending byte order, each greater than `after` (NULL:
 * from the first). cb(ud, 0, entries, n, next) fires once on a later
 * turn; `next` is the key to pass as `after` for the following page, or
 * NULL when this page is the last. fs: readdir on the thread pool; s3:
 * ListObjectsV2 with start-after. Errors: MH_EINVAL (other prefix),
 * MH_EIO, MH_ESTORE, MH_ENOMEM. For fsck and the sweeps. */
typedef void (*mh_store_list_cb)(void *ud, int err, const mh_store_entry_t *entries, size_t n, const char *next);
void mh_store_list(mh_store_t *s, const char *prefix, const char *after, mh_store_list_cb cb, void *ud);

/* Removes the backend's temporaries older than `older_than_s` seconds:
 * leftovers of writers and uploads whose process died (fs: files in
 * tmp/; s3: objects under tmp/ and, where the store supports listing
 * them, incomplete multipart uploads under tmp/). Temporaries younger
 * than that may belong to a stream in flight in any process and are
 * kept. cb(ud, err, removed) fires once on a later turn (removed: how
 * many were deleted). Errors: MH_EIO, MH_ESTORE (partial progress is
 * kept). Run by the jobs maintenance pass. */
typedef void (*mh_store_count_cb)(void *ud, int err, unsigned removed);
void mh_store_sweep_tmp(mh_store_t *s, uint32_t older_than_s, mh_store_count_cb cb, void *ud);

/* --------------------------------------------------------- presigning */

/* Presigned URLs (synchronous: an HMAC). method is "GET" or "PUT". For
 * PUT, `size` and `sha256` (32 bytes) bind the upload (fs verifies both
 * while writing; s3 signs Content-Length and x-amz-content-sha256 where
 * supported). For GET they are ignored (pass 0/NULL). ttl_s is clamped to
 * [1, 604800]. The URL is allocated in `a`. fs form:
 *   <public_url>/_store/<key>?X-Muse-Method=PUT&X-Muse-Expires=<unix s>
 *     &X-Muse-Size=<n>&X-Muse-Sha256=<hex>&X-Muse-Signature=<hex>
 * (GET: no Size/Sha256), the signature being HMAC-SHA256 over
 * "METHOD\nkey\nexpires\nsize\nsha256hex" (GET: size, sha empty).
 * Errors: MH_EINVAL (bad method/key, no sha256 for PUT, no public URL),
 * MH_ENOMEM. Never log the URL. */
int mh_store_presign(mh_store_t *s, mh_arena_t *a, const char *method, const char *key, uint64_t size,
                     const uint8_t *sha256, uint32_t ttl_s, char **url);

/* --------------------------------------------- fs backend's own routes */

/* The fs backend serves its presigned URLs itself (hub routes
 * PUT/GET /_store/{*key}). These functions check the signature and do the
 * file work; they are no-ops returning MH_EINVAL on the s3 backend. */

/* Checks a /_store/ request: method ("GET"/"PUT"), key (the path after
 * /_store/, undecoded) and the raw query string carrying expiry, size,
 * sha256 and signature, each exactly once and nothing else. On success
 * fills size/sha256 for PUT (zeros for GET); either may be NULL.
 * Errors: MH_EAUTH (bad key, malformed query, bad or missing signature,
 * method differs), MH_ETIMEDOUT (expired, signature valid), MH_EINVAL
 * (not an fs store). */
int mh_store_fs_check_url(mh_store_t *s, const char *method, mh_str_t key, mh_str_t query,
                          uint64_t *size, uint8_t sha256[32]);

/* A streamed upload into a staging key (the PUT /_store/incoming/<id>
 * route): a writer (see mh_store_writer_*) whose bytes go to tmp/ on the
 * thread pool while SHA-256 runs over them, whose destination is fixed
 * and whose finish (with key NULL) keeps the file only if its length is
 * exactly `size` and its hash `sha256`, then link(2)s it to the staging
 * key (never replacing). Opens a staging key ("incoming/<id>"; others:
 * MH_EINVAL) for exactly `size` bytes hashing to `sha256` (32 bytes,
 * copied). chunk_bytes is 1 MiB (one HTTP body never holds more than
 * two, mh_store_writer_mem). Writes beyond `size` fail with MH_ELIMIT.
 * Errors: MH_EEXIST when the key exists (a presigned PUT never
 * overwrites), MH_EINVAL (not an fs store, bad key), MH_ENOMEM. */
int mh_store_fs_upload_open(mh_store_t *s, const char *key, uint64_t size, const uint8_t sha256[32],
                            mh_store_writer_t **out);
/* The most bytes an upload's writer holds (two 1 MiB chunks), what the
 * route reserves from the pack-memory budget. */
#define MH_STORE_FS_UPLOAD_MEM (2u * 1024u * 1024u)

/* Opens a key for a GET served by the server: returns an fd (O_CLOEXEC,
 * read-only) and its size in bytes (the caller closes fd). Synchronous
 * (open + fstat). MH_ENOENT when absent, MH_EINVAL bad key or not fs. */
int mh_store_fs_open_read(mh_store_t *s, const char *key, int *fd, uint64_t *size);

/* Appends Prometheus text: musehub_store_operations_total{backend,op,
 * result} (result: ok, not_found, rejected, error),
 * musehub_store_bytes_read_total, musehub_store_bytes_written_total.
 * MH_ENOMEM. */
int mh_store_metrics_write(mh_store_t *s, mh_buf_t *out);

#endif
