/*
 * core.h — the foundation every module builds on: error codes, logging,
 * arenas, byte buffers, hex/base64, SHA-256 / HMAC, ids, clocks.
 *
 * Invariants:
 *  - Functions return int: 0 on success, a negative MH_E* code otherwise.
 *  - An arena owns everything a request allocates; it is released once,
 *    after the access-log line. Heap buffers (mh_buf_t) are for data whose
 *    size the client chooses and that may outlive a request (packs).
 *  - Ids are text "sha256:" + 64 lowercase hex digits (SPEC section 1),
 *    MH_ID_LEN (71) bytes, NUL-terminated when stored in char[MH_ID_SIZE].
 */
#ifndef MH_CORE_H
#define MH_CORE_H

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- errors */

/* Error codes: negative errno values plus our own range below -10000. */
enum {
    MH_OK = 0,
    MH_ENOMEM = -ENOMEM,
    MH_EINVAL = -EINVAL,
    MH_EIO = -EIO,
    MH_ENOENT = -ENOENT,
    MH_EEXIST = -EEXIST,
    MH_ETIMEDOUT = -ETIMEDOUT,
    MH_ECANCELED = -ECANCELED,
    MH_EPARSE = -10001,    /* malformed input (msgpack, JSON, mpack, header) */
    MH_ELIMIT = -10002,    /* input exceeds a configured bound */
    MH_EHASH = -10003,     /* bytes do not hash to the id they claim */
    MH_EDB = -10004,       /* PostgreSQL error (message kept by the db module) */
    MH_ESTORE = -10005,    /* object store error */
    MH_ECONFLICT = -10006, /* compare-and-swap lost, unique violation */
    MH_EAUTH = -10007,     /* authentication failed */
    MH_EDBDOWN = -10008,   /* no database connection could be had */
    MH_ENOSPC = -10009,    /* no space left in the object store (ENOSPC, EDQUOT, EROFS; S3 507): HTTP 507 */
    MH_EBUDGET = -10010,   /* the process's pack-memory budget stayed spent for the whole queue
                              timeout (MUSEHUB_PACK_QUEUE_TIMEOUT_MS): HTTP 503 + Retry-After */
};

/* Returns a static English description of an MH_E* code (never NULL). */
const char *mh_strerror(int err);

/* --------------------------------------------------------------- logging */

typedef enum { MH_LOG_DEBUG = 0, MH_LOG_INFO, MH_LOG_WARN, MH_LOG_ERROR } mh_log_level_t;
typedef enum { MH_LOG_TEXT = 0, MH_LOG_JSON } mh_log_format_t;

extern mh_log_level_t mh_log_level_current;
extern mh_log_format_t mh_log_format_current;

/* Sets the level from "debug"|"info"|"warn"|"error"; returns MH_EINVAL on
 * an unknown name (level unchanged). */
int mh_log_set_level(const char *name);

/* Sets the line format from "text"|"json" (MUSEHUB_LOG_FORMAT); MH_EINVAL
 * on an unknown name (format unchanged). */
int mh_log_set_format(const char *name);

/* Writes one line to stderr with ONE write(2), so lines of several
 * processes never interleave:
 *   text: "<iso time> <LEVEL> [pid] message\n"
 *   json: {"ts":"<iso time>","level":"info","pid":N,"msg":"message"}\n
 * JSON strings are escaped (control characters, quotes, backslash) and
 * bytes that are not UTF-8 become U+FFFD, so every line parses; a
 * message longer than about 4 KiB is cut. Use the MH_LOG macro so
 * arguments are not built below the level. */
void mh_log_write(mh_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A named value carried by a structured log line (mh_log_fields). */
typedef enum { MH_LF_STR, MH_LF_INT, MH_LF_NUM } mh_log_field_type_t;
typedef struct {
    const char *key;          /* JSON member name (plain ASCII, not escaped) */
    mh_log_field_type_t type;
    const char *s;            /* MH_LF_STR; NULL is written as null */
    long long i;              /* MH_LF_INT */
    double d;                 /* MH_LF_NUM (written with 3 decimals) */
} mh_log_field_t;
#define MH_LF_S(k, v) ((mh_log_field_t){(k), MH_LF_STR, (v), 0, 0})
#define MH_LF_I(k, v) ((mh_log_field_t){(k), MH_LF_INT, NULL, (long long)(v), 0})
#define MH_LF_N(k, v) ((mh_log_field_t){(k), MH_LF_NUM, NULL, 0, (double)(v)})

/* As mh_log_write, plus fields: in the text format only the message is
 * written (it should already say what the fields say); in the JSON format
 * each field becomes a member of the object after "msg". The caller
 * checks the level (MH_LOG does it for mh_log_write). */
void mh_log_fields(mh_log_level_t level, const mh_log_field_t *fields, size_t n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define MH_LOG(lvl, ...)                                                       \
    do {                                                                       \
        if ((lvl) >= mh_log_level_current) mh_log_write((lvl), __VA_ARGS__);   \
    } while (0)
#define mh_debug(...) MH_LOG(MH_LOG_DEBUG, __VA_ARGS__)
#define mh_info(...) MH_LOG(MH_LOG_INFO, __VA_ARGS__)
#define mh_warn(...) MH_LOG(MH_LOG_WARN, __VA_ARGS__)
#define mh_error(...) MH_LOG(MH_LOG_ERROR, __VA_ARGS__)

/* ------------------------------------------------------- build identity */

/* Baked in at build time (Makefile: the VERSION file and `git rev-parse`;
 * build/gen/version.c): e.g. "0.1.0" and "1a2b3c4d5e6f" (with "-dirty"
 * when the tree had uncommitted changes, "unknown" outside git). */
extern const char mh_version[];
extern const char mh_git_commit[];

/* ----------------------------------------------------------------- arena */

typedef struct mh_arena_chunk mh_arena_chunk_t;
typedef struct mh_arena_cleanup mh_arena_cleanup_t;

/* A bump allocator with registered cleanups. Embed it and _init it.
 * `limit` caps the total bytes handed out (0 = no cap); past it mh_alloc
 * returns NULL so client-sized growth becomes a 413/503, not an abort. */
typedef struct {
    mh_arena_chunk_t *head;
    mh_arena_cleanup_t *cleanups;
    size_t used;  /* bytes handed out so far */
    size_t limit; /* 0 = unlimited */
} mh_arena_t;

/* Initialises an empty arena (allocates nothing yet). */
void mh_arena_init(mh_arena_t *a, size_t limit);

/* Runs cleanups in reverse registration order, then frees every chunk.
 * The arena is left empty and reusable. */
void mh_arena_release(mh_arena_t *a);

/* Returns `n` bytes aligned to 16, or NULL when out of memory or past the
 * limit. Memory is owned by the arena. */
void *mh_alloc(mh_arena_t *a, size_t n);

/* As mh_alloc, zero-filled. */
void *mh_calloc(mh_arena_t *a, size_t n);

/* Copies `n` bytes of `s` and appends a NUL; NULL on failure. */
char *mh_strndup(mh_arena_t *a, const char *s, size_t n);
char *mh_strdup(mh_arena_t *a, const char *s);

/* printf into the arena; NULL on failure. */
char *mh_sprintf(mh_arena_t *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Registers fn(arg) to run when the arena is released (PGresult, fds,
 * curl handles). Returns MH_ENOMEM if it cannot be recorded, in which case
 * the caller still owns the resource. */
int mh_arena_defer(mh_arena_t *a, void (*fn)(void *), void *arg);

/* ---------------------------------------------------------------- buffer */

/* A growable heap byte buffer. Zero-initialise ({0}) to start empty.
 * `p` is owned by the buffer; mh_buf_free releases it. */
typedef struct {
    uint8_t *p;
    size_t len;
    size_t cap;
} mh_buf_t;

/* Ensures room for `extra` more bytes; MH_ENOMEM on failure. */
int mh_buf_reserve(mh_buf_t *b, size_t extra);
/* Appends bytes; MH_ENOMEM on failure (buffer unchanged). */
int mh_buf_append(mh_buf_t *b, const void *data, size_t n);
int mh_buf_append_str(mh_buf_t *b, const char *s);
int mh_buf_append_byte(mh_buf_t *b, uint8_t c);
int mh_buf_printf(mh_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Frees the memory and zeroes the struct. */
void mh_buf_free(mh_buf_t *b);
/* Hands the bytes to the caller (who must free() them) and zeroes b. */
uint8_t *mh_buf_steal(mh_buf_t *b, size_t *len);

/* A borrowed byte string (not NUL-terminated unless stated). */
typedef struct {
    const char *p;
    size_t n;
} mh_str_t;

#define MH_STR(lit) ((mh_str_t){(lit), sizeof(lit) - 1})
/* True when a is non-NULL and has exactly the bytes of the NUL-terminated
 * string lit. */
bool mh_str_eq(mh_str_t a, const char *lit);

/* ----------------------------------------------------------- hex, base64 */

/* Writes 2*n lowercase hex digits and a NUL into out (size >= 2n+1). */
void mh_hex_encode(char *out, const uint8_t *in, size_t n);
/* Decodes 2*n hex digits into n bytes; MH_EPARSE on a non-hex digit. */
int mh_hex_decode(uint8_t *out, const char *in, size_t n);

/* Base64, standard alphabet (RFC 4648 section 4). Encoding writes
 * padded output, NUL-terminated (*outlen excludes the NUL); decoding is
 * strict (padding optional but exact when present, no whitespace, about
 * 1 GB/s: not constant-time, so not for secrets). Output allocated in the
 * arena. MH_EPARSE / MH_ENOMEM. */
int mh_base64_encode(mh_arena_t *a, const uint8_t *in, size_t n, char **out, size_t *outlen);
int mh_base64_decode(mh_arena_t *a, const char *in, size_t n, uint8_t **out, size_t *outlen);

/* ------------------------------------------------------ hashing and ids */

#define MH_ID_LEN 71  /* strlen("sha256:") + 64 */
#define MH_ID_SIZE 72 /* with the NUL */

/* An id held by value: "sha256:<64 hex>\0". */
typedef struct {
    char s[MH_ID_SIZE];
} mh_id_t;

/* True when p[0..n) is exactly ^sha256:[0-9a-f]{64}$ (SPEC 1). */
bool mh_id_valid(const char *p, size_t n);

/* Formats a 32-byte digest as an id. */
void mh_id_from_digest(mh_id_t *out, const uint8_t digest[32]);

/* Streaming SHA-256 through OpenSSL libcrypto (bulk speed, see
 * ENVIRONMENT.md). Opaque; mh_sha256_new returns NULL on ENOMEM. */
typedef struct mh_sha256 mh_sha256_t;
mh_sha256_t *mh_sha256_new(void);
void mh_sha256_update(mh_sha256_t *h, const void *data, size_t n);
/* Writes the digest and resets the context for reuse. */
void mh_sha256_final(mh_sha256_t *h, uint8_t out[32]);
void mh_sha256_free(mh_sha256_t *h);

/* One-shot SHA-256 of n bytes. */
void mh_sha256(const void *data, size_t n, uint8_t out[32]);
/* One-shot: the blob id of n bytes (SPEC 1). */
void mh_blob_id(const void *data, size_t n, mh_id_t *out);

/* HMAC-SHA256 (mbedTLS). */
void mh_hmac_sha256(const void *key, size_t klen, const void *data, size_t n, uint8_t out[32]);

/* Fills n bytes from the OS CSPRNG (getrandom); MH_EIO on failure. */
int mh_random(void *out, size_t n);

/* Constant-time comparison of n bytes; true when equal. */
bool mh_ct_equal(const void *a, const void *b, size_t n);

/* ----------------------------------------------------------------- clock */

/* Monotonic milliseconds / microseconds (for durations). */
uint64_t mh_now_ms(void);
uint64_t mh_now_us(void);
/* Wall-clock seconds since the epoch. */
int64_t mh_unix_time(void);
/* Writes the current UTC time as "YYYY-MM-DDTHH:MM:SS.ffffff+00:00"
 * into out (size >= 40). */
void mh_iso_now(char *out, size_t size);

#endif
