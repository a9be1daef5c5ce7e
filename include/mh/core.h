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
char *mh_vsprintf(mh_arena_t *a, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));

/* Registers fn(arg) to run when the arena is released (PGresult, fds,
 * curl handles). Returns MH_ENOMEM if it cannot be recorded, in which case
 * the caller still owns the resource. */
int mh_arena_defer(mh_arena_t *a, void (*fn)(void *), void *arg);

/* ----------------------------------------------------------- heap arrays */

/* Room for `need` (>= 1) elements of `size` bytes in the heap array p (NULL: none
 * yet) whose capacity is *cap elements: p itself when it has room, else
 * the array realloc()ed to double the capacity (at least `first`, at
 * least need) with *cap updated. NULL on ENOMEM or overflow, p and *cap
 * then unchanged (the caller still owns p). The caller keeps the count:
 *   T *v = mh_vec_grow(x->v, &x->cap, x->n + 1, sizeof *v, 16);
 *   if (!v) return MH_ENOMEM;
 *   x->v = v; */
void *mh_vec_grow(void *p, size_t *cap, size_t need, size_t size, size_t first);

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
/* Decodes 2*n hex digits (either case) into n bytes; MH_EPARSE on a
 * non-hex digit (out is then partly written). The one hex decoder. */
int mh_hex_decode(uint8_t *out, const char *in, size_t n);

/* Base64, standard alphabet (RFC 4648 section 4). Encoding writes
 * padded output, NUL-terminated (*outlen excludes the NUL); decoding is
 * strict (padding optional but exact when present, no whitespace, about
 * 1 GB/s: not constant-time, so not for secrets; unused bits of the last
 * digit are not checked, as RFC 8941 4.2.7 asks) and NUL-terminates its
 * output too (*outlen excludes the NUL). Output allocated in the arena.
 * MH_EPARSE / MH_ENOMEM. The one base64 of the program. */
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
/* Checks and decodes an id in one pass: 0 and its 32-byte digest in out
 * when p[0..n) is a valid id (as mh_id_valid), else MH_EPARSE. */
int mh_id_digest(const char *p, size_t n, uint8_t out[32]);

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

/* -------------------------------------------------------- keyed hashing */

/* SipHash-c-d (Aumasson and Bernstein, 2012) of n bytes under a 128-bit
 * key: a keyed 64-bit hash that an attacker who does not know the key
 * cannot make collide. crounds/drounds: 2 and 4 for the reference
 * SipHash-2-4, 1 and 3 for the faster SipHash-1-3. Thread-safe. */
uint64_t mh_siphash(const uint8_t key[16], const void *p, size_t n, int crounds, int drounds);

/* SipHash-1-3 of n bytes under this process's key (128 random bits drawn
 * once, on first use, from the OS). The one hash of every table whose
 * keys a client can choose (ids, request keys, names). Thread-safe. */
uint64_t mh_hash64(const void *p, size_t n);

/* ---------------------------------------------------------------- id map */

/* One hash map for the whole program (redis dict.c's idea), from keys of
 * a fixed length (an id's MH_ID_LEN text bytes, a 32-byte digest, ...)
 * to the uint32 index of that key in the CALLER's array: the map stores
 * indices only (8 bytes a slot) and asks key(ctx, index) for a key's
 * bytes, so keys stay where they are and per-key data lives in the
 * caller's parallel arrays. Hashed with mh_hash64, so chosen keys cannot
 * pile up; open addressing with linear probing, at most 3/4 full: it
 * doubles before that, so it never fills up, whatever the number of
 * keys. Memory comes from an arena (released with it; a grown-out table
 * stays in the arena until then) or, with arena NULL, from the heap
 * (mh_idmap_free). Not thread-safe: one map, one thread at a time. */

#define MH_IDMAP_NONE UINT32_MAX

/* The key bytes (keylen of them) of the caller's entry v. */
typedef const void *(*mh_idmap_key_fn)(const void *ctx, uint32_t v);

typedef struct {
    uint32_t v1; /* the entry's index + 1; 0: an empty slot */
    uint32_t h;  /* low 32 bits of the key's hash */
} mh_idmap_slot_t;

typedef struct {
    mh_idmap_slot_t *slots;
    size_t cap; /* slots, a power of two; 0 until the first reserve/add */
    size_t n;   /* entries held */
    size_t keylen;
    mh_idmap_key_fn key;
    const void *ctx;
    mh_arena_t *arena; /* NULL: heap */
} mh_idmap_t;

/* An empty map (allocates nothing yet). */
void mh_idmap_init(mh_idmap_t *m, mh_arena_t *a, size_t keylen, mh_idmap_key_fn key, const void *ctx);
/* Makes room for n entries in all without growing again. MH_ENOMEM. */
int mh_idmap_reserve(mh_idmap_t *m, size_t n);
/* The index of the entry whose key equals key[0..keylen), or
 * MH_IDMAP_NONE. */
uint32_t mh_idmap_find(const mh_idmap_t *m, const void *key);
/* Adds entry v (its key: key(ctx, v)) unless an entry with an equal key
 * is held. Returns 1 when added, 0 when one was held (its index in
 * *found when found is not NULL), MH_ENOMEM (map unchanged). */
int mh_idmap_add(mh_idmap_t *m, uint32_t v, uint32_t *found);
/* A heap copy of src whose keys are looked up through ctx (the caller's
 * copy of the entries, same indices). MH_ENOMEM. */
int mh_idmap_clone(mh_idmap_t *dst, const mh_idmap_t *src, const void *ctx);
/* Frees a heap map's table and empties it (no-op for an arena map). */
void mh_idmap_free(mh_idmap_t *m);
/* A key function for ctx = an array of key pointers (const char *const *)
 * that does not move while the map is used. */
const void *mh_idmap_key_strv(const void *ctx, uint32_t v);

/* Distinct ids (MH_ID_LEN text bytes, borrowed) in first-seen order: an
 * arena array and its id map. Do not move the struct once used (the map
 * refers to it). */
typedef struct {
    const char **ids;
    size_t n, cap;
    mh_arena_t *arena;
    mh_idmap_t map;
} mh_idlist_t;

void mh_idlist_init(mh_idlist_t *l, mh_arena_t *a);
/* Appends id unless held: 1 added (at index l->n - 1), 0 held, MH_ENOMEM. */
int mh_idlist_add(mh_idlist_t *l, const char *id);
/* The index of id, or MH_IDMAP_NONE. */
uint32_t mh_idlist_find(const mh_idlist_t *l, const char *id);

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
