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

/* Longest valid key: "incoming/" + 64 id characters. Backends' private
 * temporaries ("tmp/<32 hex>", ...) are shorter. */
#define MH_STORE_KEY_MAX 73

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
    MH_STORE_OP_WRITER,    /* streaming writers (counted at finish/abort) */
    MH_STORE_OP_READER,    /* streaming readers (counted at close) */
    MH_STORE_OP_LIST,
    MH_STORE_OP_SWEEP_TMP,
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
    /* Streams (store.h "streaming writer/reader"); store.c has checked
     * the arguments it can check without the backend. */
    size_t writer_chunk_default, writer_chunk_min;
    /* Allocates a writer whose head store.c fills (writer_init). */
    int (*writer_open)(mh_store_t *s, size_t chunk, bool hash, mh_store_writer_t **out);
    /* Something changed (bytes written, finish or abort asked): the
     * backend decides its next step. Never calls back inside. */
    void (*writer_pump)(mh_store_writer_t *w);
    /* src: the ranges to read (sequential readers pass one range whose
     * len may be UINT64_MAX); copied or borrowed as store.h says. */
    int (*reader_open)(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n, bool sequential,
                       size_t window, mh_store_window_cb cb, void *ud, mh_store_reader_t **out);
    void (*reader_next)(mh_store_reader_t *r);
    void (*reader_close)(mh_store_reader_t *r);
    void (*list)(mh_store_t *s, const char *prefix, const char *after, mh_store_list_cb cb, void *ud);
    void (*sweep_tmp)(mh_store_t *s, uint32_t older_than_s, mh_store_count_cb cb, void *ud);
} mh_store_ops_t;

/* The common head of every backend's writer: the filling chunk and the
 * caller's side of the protocol (store.c does the checks and the copy,
 * the backend moves full chunks out of `fill` and decides what runs). */
struct mh_store_writer {
    mh_store_t *s;
    uint64_t size;  /* bytes accepted */
    uint64_t limit; /* most bytes accepted (fs uploads: the signed size), else UINT64_MAX */
    size_t chunk;   /* bytes per chunk */
    mh_buf_t fill;  /* the filling chunk */
    int err;        /* sticky: the stream's first failure */
    bool hash;      /* the store hashes the bytes */
    bool key_fixed; /* the destination was fixed at open (fs uploads) */
    bool finishing, aborted;
    mh_store_done_cb wcb; /* the outstanding write callback */
    void *wud;
    char key[MH_STORE_KEY_MAX + 1]; /* the destination, once known */
    bool key_given;
    mh_store_writer_done_cb fcb;
    void *fud;
};

/* Sets up a writer's head (store, chunk, hash; no limit). */
void mh_store_writer_init(mh_store_writer_t *w, mh_store_t *s, size_t chunk, bool hash);
/* True when the outstanding write callback may fire: there is room in the
 * filling chunk, or the stream failed. */
bool mh_store_writer_room_due(const mh_store_writer_t *w);
/* Fires the outstanding write callback if it is due (loop turn where
 * calling back is allowed). */
void mh_store_writer_fire(mh_store_writer_t *w);
/* Moves the full filling chunk to *flight (which must be empty) and
 * gives `fill` the flight buffer's memory: the two buffers swap. */
void mh_store_writer_swap(mh_store_writer_t *w, mh_buf_t *flight);

struct mh_store {
    const mh_store_ops_t *ops;
    uv_loop_t *loop;
    uint64_t ops_total[MH_STORE_OP_COUNT_][MH_STORE_RES_COUNT_];
    uint64_t bytes_read, bytes_written;
};


/* True when key[0..n) is "mpacks/<64 lowercase hex>" or
 * "incoming/<1..64 of [A-Za-z0-9_-]>" (SPEC 3, 4.3). */
bool mh_store_key_valid(const char *key, size_t n);
/* True for a valid "incoming/..." key. */
bool mh_store_key_is_staging(const char *key, size_t n);

/* Records one finished operation (loop thread only). */
void mh_store_note(mh_store_t *s, mh_store_op_t op, int err);
/* Maps an MH_E* code to its result label. */
mh_store_res_t mh_store_res_of(int err);

/* ------------------------------------------------------ read plans */

/* How a reader turns the caller's ranges into windows ("runs"): each run
 * is one contiguous read of at most `window` bytes; its pieces are the
 * parts of the caller's ranges inside it, in the caller's order. Built
 * once the object's size is known; pure (runs on the thread pool). */
typedef struct {
    uint64_t off, len;
    size_t first, count; /* pieces[first .. first+count) */
} mh_store_run_t;

typedef struct {
    size_t index; /* range index */
    uint64_t at;  /* offset inside the range */
    size_t rel;   /* offset inside the run */
    size_t n;
} mh_store_plan_piece_t;

typedef struct {
    mh_store_run_t *runs;
    size_t nruns;
    mh_store_plan_piece_t *pieces;
    size_t npieces;
} mh_store_plan_t;

/* Ranges closer than this share one run (a few KiB of gap cost less
 * than another system call or round trip). */
#define MH_STORE_RANGE_GAP (64u * 1024u)

/* Builds the plan of ranges[0..n) over an object of `size` bytes; a
 * range with len UINT64_MAX runs to the end (sequential readers).
 * Consecutive ranges share a run when the next starts at or after the
 * run's start, within MH_STORE_RANGE_GAP of its end, and the run stays
 * within `window`; longer ranges are split. No range at all gives one
 * empty run. Errors: MH_EINVAL (a range not inside the object),
 * MH_ENOMEM. Free with mh_store_plan_free. */
int mh_store_plan_build(const mh_range_t *ranges, size_t n, uint64_t size, size_t window, mh_store_plan_t *out);
void mh_store_plan_free(mh_store_plan_t *p);

/* Fills out[0..run->count) (the caller's view of a delivered run whose
 * bytes are at base) and the window w. */
void mh_store_plan_window(const mh_store_plan_t *p, size_t run, const uint8_t *base, uint64_t size,
                          mh_store_piece_t *out, mh_store_window_t *w);

/* The common head of every backend's reader: the plan and the two
 * window buffers (one the consumer holds, one read ahead). The backend
 * reads runs into free buffers; store.c decides what is delivered. */
enum { MH_RBUF_FREE = 0, MH_RBUF_READING, MH_RBUF_FULL, MH_RBUF_DELIVERED };
struct mh_store_reader {
    mh_store_t *s;
    mh_store_window_cb cb;
    void *ud;
    size_t window;
    uint64_t size; /* the object's, once known */
    mh_store_plan_t plan;
    bool planned;
    mh_buf_t buf[2];
    int bstate[2];
    size_t brun[2];
    size_t next_read, next_deliver;
    int err;
    bool err_told, done;
    mh_store_piece_t *out; /* the delivered run's pieces */
    size_t out_cap;
};


/* True when a delivery is due: an error not yet told, or the next window
 * read while the consumer holds none. */
bool mh_store_reader_due(const mh_store_reader_t *r);
/* Takes the due delivery: returns 1 with *win filled (its buffer is now
 * the consumer's), or the error to deliver (told once), or 0. */
int mh_store_reader_take(mh_store_reader_t *r, mh_store_window_t *win);
/* A free buffer for the next read (0 or 1), or -1. */
int mh_store_reader_free_buf(const mh_store_reader_t *r);
/* Buffer b now holds run next_read. */
void mh_store_reader_filled(mh_store_reader_t *r, int b);
/* The consumer is done with its window: the buffer is free again (its
 * memory dropped when drop, kept for reuse otherwise). */
void mh_store_reader_release(mh_store_reader_t *r, bool drop);
/* Frees the head's memory (buffers, plan, pieces). */
void mh_store_reader_fini(mh_store_reader_t *r);

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
