/*
 * store_int.h — private to src/store/: the backend vtable every backend
 * (fs.c, later s3.c) fills in, the common head of a store object, key
 * validation and the shared metrics counters.
 *
 * Invariants:
 *  - A backend's store struct starts with an mh_store_t (`base`), so the
 *    dispatch in store.c can cast between the two.
 *  - Counters are touched on the loop thread only (backends call
 *    mh_store_note() just before they call the user's callback), so they
 *    need no atomics: one process, one loop, one set of counters.
 *  - Keys are checked by mh_store_key_valid() before any backend uses
 *    them to build a path or an URL (defence against traversal via
 *    /_store/ URLs).
 */
#ifndef MH_STORE_INT_H
#define MH_STORE_INT_H

#include "mh/store.h"

/* The operations counted in musehub_store_operations_total{op=...}. */
typedef enum {
    MH_STORE_OP_GET = 0,
    MH_STORE_OP_GET_RANGES,
    MH_STORE_OP_PUT,
    MH_STORE_OP_MOVE,
    MH_STORE_OP_DELETE,
    MH_STORE_OP_HEAD,
    MH_STORE_OP_PRESIGN,
    MH_STORE_OP_CHECK_URL, /* fs: /_store/ signature checks */
    MH_STORE_OP_UPLOAD,    /* fs: streamed presigned PUTs (counted at finish/abort) */
    MH_STORE_OP_OPEN_READ, /* fs: /_store/ GETs */
    MH_STORE_OP_COUNT_
} mh_store_op_t;

/* The result label: ok, not_found, rejected (bad input, signature,
 * hash, size, exists), error (I/O or remote store failure). */
typedef enum {
    MH_STORE_RES_OK = 0,
    MH_STORE_RES_NOT_FOUND,
    MH_STORE_RES_REJECTED,
    MH_STORE_RES_ERROR,
    MH_STORE_RES_COUNT_
} mh_store_res_t;

typedef struct {
    const char *kind; /* "fs", "s3" */
    void (*get)(mh_store_t *s, const char *key, uint64_t off, uint64_t len, mh_store_get_cb cb, void *ud);
    void (*get_ranges)(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n, mh_store_get_cb cb,
                       void *ud);
    void (*put)(mh_store_t *s, const char *key, const void *data, size_t n, mh_store_done_cb cb, void *ud);
    void (*move)(mh_store_t *s, const char *src, const char *dst, mh_store_done_cb cb, void *ud);
    void (*del)(mh_store_t *s, const char *key, mh_store_done_cb cb, void *ud);
    void (*head)(mh_store_t *s, const char *key, mh_store_head_cb cb, void *ud);
    int (*presign)(mh_store_t *s, mh_arena_t *a, const char *method, const char *key, uint64_t size,
                   const uint8_t *sha256, uint32_t ttl_s, char **url);
    /* Releases the backend once no operation is in flight (the backend
     * decides when; it may free the store later, from a callback). */
    void (*close)(mh_store_t *s);
} mh_store_ops_t;

struct mh_store {
    const mh_store_ops_t *ops;
    uv_loop_t *loop;
    uint64_t ops_total[MH_STORE_OP_COUNT_][MH_STORE_RES_COUNT_];
    uint64_t bytes_read, bytes_written;
};

/* Longest valid key: "incoming/" + 64 id characters. */
#define MH_STORE_KEY_MAX 73

/* True when key[0..n) is "mpacks/<64 lowercase hex>" or
 * "incoming/<1..64 of [A-Za-z0-9_-]>" (SPEC 3, 4.3). */
bool mh_store_key_valid(const char *key, size_t n);
/* True for a valid "incoming/..." key. */
bool mh_store_key_is_staging(const char *key, size_t n);

/* Records one finished operation (loop thread only). */
void mh_store_note(mh_store_t *s, mh_store_op_t op, int err);
/* Maps an MH_E* code to its result label. */
mh_store_res_t mh_store_res_of(int err);

/* Backend constructors (called by mh_store_open with the part of the spec
 * after "fs:" / "s3:"). On success *out is a fully initialised store. */
int mh_store_fs_open(uv_loop_t *loop, const mh_store_config_t *cfg, const char *dir, mh_store_t **out);

extern const mh_store_ops_t mh_store_fs_ops;

/* The s3 backend (s3.c): arg is the bucket name. */
int mh_store_s3_open(uv_loop_t *loop, const mh_store_config_t *cfg, const char *bucket, mh_store_t **out);
extern const mh_store_ops_t mh_store_s3_ops;
/* Test hook: overrides the s3 backend's connect timeout (ms), low-speed
 * window (s, below 1 KiB/s for that long aborts an attempt) and the base
 * of its retry backoff (ms; delays are base, 4x, 16x). 0 keeps a value.
 * No-op on other backends. */
void mh_store_s3_tune(mh_store_t *s, unsigned connect_ms, unsigned low_speed_s, unsigned backoff_base_ms);

#endif
