/*
 * store.h — the object store interface (SPEC section 3) and its backends:
 * `fs` (a local directory; presigned URLs point at the server itself under
 * /_store/, HMAC-signed, expiring) and `s3` (any S3-compatible store, AWS
 * Signature V4, libcurl multi on the loop).
 *
 * Keys: "mpacks/<64 hex>" (immutable, content-addressed packs),
 * "incoming/<upload id>" (private staging keys of push grants).
 *
 * Invariants:
 *  - Every operation is asynchronous: the callback fires on a later loop
 *    turn, exactly once. fs does its file I/O on the libuv thread pool.
 *  - A presigned PUT names a staging key bound to a size and a SHA-256;
 *    it can never overwrite an existing object.
 *  - Writes are atomic: a reader sees the whole object or none (fs:
 *    temporary file, fsync, rename).
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
 * key), MH_EIO, MH_ESTORE. */
typedef void (*mh_store_done_cb)(void *ud, int err);
void mh_store_put(mh_store_t *s, const char *key, const void *data, size_t n, mh_store_done_cb cb, void *ud);

/* Moves src to dst (fs: rename that never replaces; s3: server-side copy
 * then delete). If dst exists already the bytes are identical by hash:
 * src is deleted and the move succeeds. Errors: MH_EINVAL (bad key),
 * MH_ENOENT (src absent, even if dst exists), MH_EIO, MH_ESTORE. */
void mh_store_move(mh_store_t *s, const char *src, const char *dst, mh_store_done_cb cb, void *ud);

/* Deletes a key (absent is success). Errors: MH_EINVAL, MH_EIO, MH_ESTORE. */
void mh_store_delete(mh_store_t *s, const char *key, mh_store_done_cb cb, void *ud);

/* Size of a key in bytes; MH_ENOENT when absent, MH_EINVAL bad key. */
typedef void (*mh_store_head_cb)(void *ud, int err, uint64_t size);
void mh_store_head(mh_store_t *s, const char *key, mh_store_head_cb cb, void *ud);

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

/* A streaming upload into a staging key: bytes go to a temporary file
 * while SHA-256 runs over them; finish keeps the file only if the length
 * equals `size` and the hash equals `sha256`. Writes are synchronous
 * write(2) calls to the local file (page cache). */
typedef struct mh_fs_upload mh_fs_upload_t;
/* Starts an upload into a staging key ("incoming/<id>"; others:
 * MH_EINVAL) of exactly `size` bytes hashing to `sha256`. Creates
 * tmp/<random> (O_EXCL). *out is freed by finish or abort, which must be
 * called exactly once. MH_EEXIST when the key exists (a presigned PUT
 * never overwrites), MH_EIO, MH_ENOMEM. */
int mh_store_fs_upload_open(mh_store_t *s, const char *key, uint64_t size, const uint8_t sha256[32],
                            mh_fs_upload_t **out);
/* Appends n bytes. MH_ELIMIT when more than `size` bytes arrive; MH_EIO
 * on write error. An error is sticky: later writes and finish return it. */
int mh_store_fs_upload_write(mh_fs_upload_t *u, const void *data, size_t n);
/* Verifies, fsyncs and links into place (never replacing: link(2));
 * frees u. MH_EHASH (hash or length mismatch; nothing kept), MH_EEXIST
 * (the key appeared meanwhile; nothing changed), a sticky write error,
 * MH_EIO. Nothing is left in tmp/ whatever the result. Runs fsync on the
 * calling thread: prefer the _async form on the loop for large uploads. */
int mh_store_fs_upload_finish(mh_fs_upload_t *u);
/* As mh_store_fs_upload_finish, but the length/hash check runs now and
 * the fsync + link run on the thread pool; cb(ud, err) fires once on a
 * later loop turn with the same error codes. Frees u. */
void mh_store_fs_upload_finish_async(mh_fs_upload_t *u, mh_store_done_cb cb, void *ud);
/* Discards the temporary file; frees u. */
void mh_store_fs_upload_abort(mh_fs_upload_t *u);

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
