/*
 * s3_int.h — private to the s3 backend (s3.c: transport and whole-object
 * operations; s3_stream.c: streaming writer and reader, listings, the tmp
 * sweep): the store, operation and transfer structs and the transport
 * functions both files use.
 *
 * Invariants (see s3.c for the transport's): everything runs on the loop
 * thread except thread-pool hash jobs, which touch only their own
 * buffers; every API entry point and uv callback brackets itself with
 * mh__s3_enter/mh__s3_leave.
 */
#ifndef MH_S3_INT_H
#define MH_S3_INT_H

#include <curl/curl.h>

#include "sigv4.h"
#include "store_int.h"

/* Transfers in flight at once (ENVIRONMENT.md: ~16 ran 34k req/s where
 * adding 20k at once ran 4.5k). */
#define WINDOW 16
/* Attempts per transfer: the first plus three retries. */
#define MAX_ATTEMPTS 4
#define CONNECT_TIMEOUT_MS 5000
/* An attempt slower than LOW_SPEED_LIMIT bytes/s for LOW_SPEED_TIME s is
 * abandoned (then retried): a stalled store becomes an error, not a hang. */
#define LOW_SPEED_LIMIT 1024
#define LOW_SPEED_TIME_S 15
/* ... and for the calls that answer only when the store has done the work
 * (CopyObject, CompleteMultipartUpload), SLOW_ANSWER_TIME_S s. */
#define SLOW_ANSWER_TIME_S 120
/* Error bodies are only read for <Code>/<Message>. */
#define ERRBODY_MAX 16384
/* get_ranges: ranges closer than RANGE_GAP share one ranged GET (a few KiB
 * of gap cost less than a round trip); a run never exceeds RUN_MAX. */
#define RANGE_GAP (64u * 1024u)
#define RUN_MAX (8u * 1024u * 1024u)
/* PUT bodies above this are hashed on the thread pool (libcrypto runs at
 * ~1.7 GiB/s: 256 KiB is ~150 us on the loop). */
#define HASH_INLINE_MAX (256u * 1024u)

typedef struct s3_store s3_store_t;
typedef struct s3_op s3_op_t;
typedef struct xfer xfer_t;
typedef struct sock_ctx sock_ctx_t;

/* Work to run on a later loop turn (a stream's intermediate callback). */
typedef struct s3_defer s3_defer_t;
struct s3_defer {
    s3_defer_t *next;
    void (*fn)(s3_defer_t *d);
    bool queued;
};

/* A socket curl asked us to watch. */
struct sock_ctx {
    uv_poll_t poll;
    curl_socket_t fd;
    s3_store_t *s3;
    sock_ctx_t *prev, *next;
};

struct s3_store {
    mh_store_t base;
    CURLM *multi;
    uv_timer_t curl_timer; /* curl's timeout (CURLMOPT_TIMERFUNCTION) */
    uv_timer_t kick;       /* retries that are due */
    uv_async_t defer;      /* deferred completions (ref'd only while some wait) */
    char *origin;          /* "http://127.0.0.1:9000" or "https://bucket.s3.amazonaws.com" */
    char *host;            /* Host header and signed host: origin without the scheme */
    char *path_prefix;     /* "/bucket" (path style) or "" (virtual-hosted) */
    char *bucket, *region, *access_key, *secret_key;
    mh_sigv4_cred_t cred;
    xfer_t *queue_head, *queue_tail; /* waiting for a window slot */
    xfer_t *delayed;                 /* retries waiting for their time */
    xfer_t *doomed;                  /* to fail once curl has returned (socket_cb) */
    s3_op_t *deferred;               /* completions waiting for the next loop turn */
    s3_defer_t *dwork_head, *dwork_tail; /* deferred stream work (mh__s3_defer) */
    sock_ctx_t *socks;
    unsigned active;    /* easy handles in the multi */
    unsigned pending;   /* ops not completed */
    unsigned busy;      /* >0 inside an API call or a uv callback of ours */
    unsigned api_depth; /* >0 inside an API call */
    unsigned open_handles;
    bool path_style;
    bool closing, shut;
    bool full; /* the last write was refused for want of space (logged) */
    bool no_abort_logged; /* the store refused AbortMultipartUpload (said once) */
    /* tunables (mh_store_s3_tune; tests shorten them) */
    long connect_ms, low_speed_s;
    uint64_t backoff_base_ms;
};

typedef enum { H_GET, H_HEAD, H_PUT, H_COPY, H_DELETE, H_POST } http_kind_t;


/* One HTTP request (and its retries). */
struct xfer {
    xfer_t *next; /* queue / delayed list */
    s3_op_t *op;
    http_kind_t kind;
    const char *key;  /* points into op */
    bool ranged;      /* GET with a Range header */
    uint64_t off, len; /* ranged: bytes off..off+len-1; len UINT64_MAX = to the end */
    size_t run;       /* get_ranges: which run */
    CURL *easy;
    struct curl_slist *hdrs;
    long status;
    CURLcode cc;
    int attempt; /* 0-based */
    uint64_t due; /* loop time of a delayed retry */
    size_t up_pos; /* PUT: bytes handed to curl */
    mh_buf_t body; /* response body (bounded, see write_cb) */
    uint64_t seen;  /* body bytes received (200 to a ranged GET: position) */
    bool started_body, nomem, overflow, range_done;
    bool doomed;        /* on s3->doomed: its socket could not be watched */
    xfer_t *doom_next;
    uint64_t content_length; /* HEAD */
    /* Request details beyond key and range (streams, listings). */
    const uint8_t *up_data; /* PUT/POST body (borrowed from the op) */
    size_t up_n;
    char payload_hex[65];   /* SHA-256 of the body ("" = the empty body) */
    bool bucket_level;      /* the request names the bucket, not a key */
    const char *copy_src;   /* H_COPY source key (default: op->key) */
    mh_sigv4_kv_t query[4]; /* unencoded query parameters */
    size_t nquery;
    char qbuf[1024];        /* their text */
    size_t qlen;
    char etag[128];         /* ETag of the answer (UploadPart) */
    int setup_err;          /* the request could not be built: fail it unsent */
    char errbuf[CURL_ERROR_SIZE];
};

typedef enum { OP_GET, OP_RANGES, OP_PUT, OP_MOVE, OP_DELETE, OP_HEAD, OP_WRITER, OP_READER, OP_LIST, OP_SWEEP } op_kind_t;

typedef enum {
    S_GET,         /* GET (maybe ranged) in flight */
    S_GET_HEAD,    /* HEAD to check a zero-length read or an empty tail */
    S_RANGES,      /* ranged GETs of the runs in flight */
    S_RANGES_HEAD, /* HEAD: get_ranges with nothing to read */
    S_PUT_HASH,    /* payload hash on the thread pool */
    S_PUT,
    S_MV_SAME,     /* move onto itself: HEAD src */
    S_MV_HEAD_DST,
    S_MV_HEAD_SRC,
    S_MV_COPY,
    S_MV_DELETE,
    S_DELETE,
    S_HEAD,
    S_STREAM, /* streams (s3_stream.c) keep their own state */
    S_DONE,
} op_state_t;

typedef struct {
    uint64_t off, len;
    size_t out; /* position in the result */
} seg_t;

typedef struct {
    uint64_t off, end;
    size_t i, j; /* segs [i, j) */
} run_t;

struct s3_op {
    s3_op_t *next; /* deferred list */
    s3_store_t *s3;
    op_kind_t kind;
    op_state_t state;
    int err;
    unsigned xfers_out; /* transfers created and not finished */
    char key[MH_STORE_KEY_MAX + 1], key2[MH_STORE_KEY_MAX + 1];
    uint64_t off, len, size;
    const uint8_t *data; /* put (borrowed until cb) */
    size_t n;
    char sha_hex[65];
    uv_work_t work;
    seg_t *segs;
    size_t nsegs;
    run_t *runs;
    size_t nruns;
    mh_buf_t out;
    union {
        mh_store_get_cb get;
        mh_store_done_cb done;
        mh_store_head_cb head;
    } cb;
    void *ud;
    bool embedded; /* part of a stream's struct: the stream frees it */
};


/* ------------------------------------------------ shared by s3*.c */

/* Brackets an API call (api) or a uv callback: completions are deferred
 * while an API call is on the stack; the store shuts down only when
 * nothing of ours is. */
void mh__s3_enter(s3_store_t *s3, bool api);
void mh__s3_leave(s3_store_t *s3, bool api);

/* Sets up an op embedded in a stream (counts as pending until
 * completed; mh__s3_stream_complete frees the stream). */
void mh__s3_op_init(s3_op_t *op, s3_store_t *s3, op_kind_t kind, void *ud);

/* Ends an op with err once its last transfer is back (completion never
 * inside an API call). */
void mh__s3_op_finish(s3_op_t *op, int err);

/* Queues a transfer of op (setup, if given, fills the xfer before it is
 * queued); an allocation failure ends the op with MH_ENOMEM. */
void mh__s3_submit(s3_op_t *op, http_kind_t kind, const char *key, void (*setup)(xfer_t *, void *), void *arg);

/* Adds a query parameter to x (copied). MH_EINVAL when there is no room. */
int mh__s3_xfer_query(xfer_t *x, const char *name, const char *value);

/* set_range setup: arg is uint64_t[3] {off, len, run}. */
void mh__s3_set_range(xfer_t *x, void *arg);

/* Copies a valid key (store_int.h) into dst; false when invalid. */
bool mh__s3_copy_key(char *dst, const char *key);

/* Runs d->fn(d) on a later loop turn, once however often asked. */
void mh__s3_defer(s3_store_t *s3, s3_defer_t *d, void (*fn)(s3_defer_t *d));

/* s3_stream.c: a transfer of a stream op finished (x, err), or a hash
 * job did (x NULL); and the completion of a stream op (callback, free). */
void mh__s3_stream_step(s3_op_t *op, xfer_t *x, int err);
void mh__s3_stream_complete(s3_op_t *op);

/* s3_stream.c: the streaming entries of the backend's vtable. */
int mh__s3_writer_open(mh_store_t *s, size_t chunk, bool hash, mh_store_writer_t **out);
void mh__s3_writer_pump(mh_store_writer_t *w);
int mh__s3_reader_open(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n, bool sequential,
                       size_t window, mh_store_window_cb cb, void *ud, mh_store_reader_t **out);
void mh__s3_reader_next(mh_store_reader_t *r);
void mh__s3_reader_close(mh_store_reader_t *r);
void mh__s3_list(mh_store_t *s, const char *prefix, const char *after, mh_store_list_cb cb, void *ud);
void mh__s3_sweep_tmp(mh_store_t *s, uint32_t older_than_s, mh_store_count_cb cb, void *ud);

/* ------------------------------------------------- listing (s3_stream.c) */

/* Keys per ListObjectsV2 page (S3's max-keys limit). */
#define MH__S3_LIST_PAGE 1000

/* One page of a listing, read from a ListObjectsV2 answer. */
typedef struct {
    const char *prefix;                  /* keys kept start with it ("mpacks/", "incoming/") */
    mh_store_entry_t *entries;           /* n of them, pointing into names */
    char (*names)[MH_STORE_KEY_MAX + 1]; /* MH__S3_LIST_PAGE slots */
    size_t n;
    char next[1024]; /* the page's last key, kept or not: start-after of the next page */
    bool more;       /* <IsTruncated>true */
} mh__s3_page_t;

/* Reads a ListObjectsV2 answer body (untrusted bytes: every scan stays
 * within body->len) into pg: each <Contents> whose <Key> is a valid store
 * key under pg->prefix (others are passed over), at most
 * MH__S3_LIST_PAGE; `next` and `more` as above. Allocates entries and
 * names on first use (free with mh__s3_page_free). 0, MH_ESTORE (not a
 * ListBucketResult, a <Contents> without <Key>), MH_ENOMEM. Used by
 * mh_store_list (fsck, the sweeps) and test/fuzz/fuzz_s3list.c. */
int mh__s3_list_page(const mh_buf_t *body, mh__s3_page_t *pg);
void mh__s3_page_free(mh__s3_page_t *pg);

#endif
