/*
 * http_internal.h — types shared by the files of src/http (not a public
 * header: other modules include only mh/http.h). Also the small driver API
 * the fuzz target uses to push bytes through the parser glue without a
 * socket ("fake" connections).
 *
 * Ownership, in one place:
 *  - The server owns its connections (list s->conns) and a pool of request
 *    structs. A connection is freed only in the close callback of its last
 *    libuv handle, so a caller up the stack may keep using it after
 *    conn_close() (which only marks it and starts the closes).
 *  - A request (req_t, which embeds the public mh_req_t first) is attached to
 *    its connection while the connection lives (list c->reqs). It is freed
 *    by req_maybe_free() once it has responded, its write has completed or
 *    been dropped, the parser is done with it and nobody holds it (hold > 0
 *    while internal code calls into a handler with it). A response written
 *    at once (uv_try_write) outside such a hold completes on the next loop
 *    turn (s->done_list), never under the caller of mh_res_*.
 */
#ifndef MH_HTTP_INTERNAL_H
#define MH_HTTP_INTERNAL_H

#include <llhttp.h>

#include "mh/http.h"

#define MH_HTTP_READ_BUF (64 * 1024)      /* one shared read buffer per server */
#define MH_HTTP_PENDING_MAX (256 * 1024)  /* unparsed pipelined bytes before we stop reading */
/* Output a connection may have queued (answers the client has not read
 * yet) before it stops parsing and reading further requests: a client
 * that pipelines requests and never reads costs at most this much plus
 * MH_HTTP_PENDING_MAX (issue 15 item 1). */
#define MH_HTTP_OUT_MAX_BYTES (1u << 20)
#define MH_HTTP_OUT_MAX_RESPONSES 16
#define MH_HTTP_REQ_ARENA_LIMIT (64u << 20)
#define MH_HTTP_LINGER_MS 2000            /* read-and-discard after a closing response */
#define MH_HTTP_POOL_MAX 1024             /* cached request structs */
#define MH_HTTP_NBUCKETS 14

typedef struct req req_t;
typedef struct res_hdr res_hdr_t;
typedef struct mh__stream mh__stream_t; /* stream.c: a streamed response */

struct res_hdr {
    res_hdr_t *next;
    const char *name, *value;
    size_t nlen, vlen;
};

typedef enum { PH_HEADERS = 0, PH_BODY, PH_DONE } req_phase_t;

struct req {
    mh_req_t r; /* must be first: mh_req_t* and req_t* convert both ways */
    req_t *next, *prev; /* c->reqs while attached */
    req_t *pool_next;
    uv_write_t wreq;
    uv_buf_t bufs[2];
    int hold;            /* > 0 while internal code is calling out with it */
    req_phase_t phase;   /* how far the parser got */
    bool dispatched;     /* the handler has been called */
    bool write_pending;  /* wreq is in flight */
    bool keep_alive;     /* the client allows another request (llhttp) */
    bool expect_continue, continue_sent;
    bool stream;         /* route->stream_body */
    bool head;           /* HEAD: body omitted from the response */
    bool discard;        /* responded before the body ended: ignore the rest */
    bool nolog;          /* dropped without a response (client went mid-headers) */
    bool aborted;        /* on_abort delivered */
    bool gated;          /* req->gate ran; the handler waits for mh_req_continue */
    uint8_t http_minor, http_major;
    uint64_t max_body;
    uint64_t body_seen;
    uint64_t start_ms;   /* loop time of the first byte */
    res_hdr_t *hdrs, **hdrs_tail;
    mh_buf_t owned;      /* mh_res_send_buf body */
    mh_buf_t hdr;        /* request line + headers, the strings r points to;
                            its capacity survives in the pool (no malloc per request) */
    void (*ext_done)(void *);
    void *ext_arg;
    int metric;          /* index into s->metrics */
    mh__stream_t *rs;    /* streamed response (stream.c), in the arena; NULL otherwise */
    bool rs_open;        /* streamed response begun and not ended: the next request waits */
};

typedef struct {
    uint32_t no, nl, vo, vl; /* offsets into cur->hdr of one header's name and value */
} hoff_t;

enum { EV_NONE = 0, EV_HEADERS, EV_MESSAGE };

struct mh_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t sreq;
    llhttp_t parser;
    mh_http_server_t *s;
    mh_conn_t *next, *prev;   /* s->conns */
    mh_conn_t *rnext, *rprev; /* s->ready (deferred drain) */
    req_t *cur;   /* the request being parsed or awaiting its response */
    req_t *reqs;  /* every request attached to this connection */
    int nwriting; /* responses queued and not yet written */

    mh_buf_t pending; /* read but not yet parsed (pipelining) */
    size_t pend_off;

    /* Header accumulation for c->cur (spans may arrive in pieces) into
     * cur->hdr: url NUL name NUL value NUL name NUL value NUL ... */
    uint32_t url_len;
    uint32_t hbytes; /* raw request-target + header bytes, for the limit */
    int nh;
    int hstate; /* 0 url, 1 in field, 2 in value */
    int ev;     /* which callback paused the parser */
    int err_status;
    const char *err_code, *err_detail;

    int handles_open;
    bool fake, in_ready, closing, eof, finishing, shut_done, lingering, stop_parse;
    bool reading, user_paused, timer_armed, kick;
    bool out_full;         /* parsing and reading stopped: too much output queued */
    bool lf_last;          /* header bytes scanned so far end with LF (obs-fold check) */
    int in_drive;
    uint64_t idle_since;   /* loop ms of the last read or write completion */
    uint64_t body_activity;
    uint64_t linger_until;
    uint64_t wq_since;     /* last progress of queued writes */
    size_t wq_sample;
    uint64_t timer_due;
    char peer[46];         /* client IP text, copied into each request */
    hoff_t hoff[];         /* s->cfg.max_headers entries */
};

typedef struct {
    const char *name;
    uint64_t buckets[MH_HTTP_NBUCKETS + 1]; /* last one is +Inf */
    double sum;
    uint64_t count;
    struct {
        int status;
        uint64_t n;
    } *st;
    int nst, capst;
} metric_t;

typedef struct {
    int nseg;
    struct seg {
        const char *p;
        size_t n;
        int kind; /* 0 literal, 1 {name}, 2 {*name} */
    } *segs;
    int rest;     /* index of the {*name} segment, -1 when none */
    char **names; /* capture names, per capture (heap, NUL-terminated) */
    int metric;   /* index into s->metrics */
} route_rt_t;

struct mh_http_server {
    uv_loop_t *loop;
    mh_http_config_t cfg; /* defaults applied */
    uv_tcp_t listener;
    bool listening, listener_open;
    int port;
    llhttp_settings_t settings;
    route_rt_t *rt; /* one per cfg.routes row */
    int nroutes;
    metric_t *metrics; /* distinct route names, then "none" */
    int nmetrics, metric_none;

    mh_conn_t *conns;
    uint64_t nconns, inflight, live_reqs;
    mh_conn_t *ready;
    uv_idle_t idle;
    bool idle_active;
    req_t *done_list; /* writes already done, completed on the next turn */
    req_t *stream_aborts; /* streamed responses whose client left: abort callback next turn */
    mh_buf_t *fake_sink;

    req_t *pool;
    int npool;
    uint64_t id_key, id_ctr;
    int64_t date_sec;
    char date[40];
    size_t date_len;
    uint32_t tick_ms; /* longest single timer arm (see conn_arm) */

    bool stopping, orphaned, own_closing;
    uv_timer_t grace;
    int handles_open;
    void (*done)(void *);
    void *done_arg;
    char rbuf[MH_HTTP_READ_BUF];
};

/* ---- server.c */
void mh__http_schedule_drain(mh_conn_t *c);
void mh__http_wake(mh_http_server_t *s); /* run the idle pass next turn */
void mh__http_defer_done(req_t *q);       /* mh__req_write_done(q, 0) next turn */
void mh__http_conn_freed(mh_http_server_t *s);
void mh__http_req_freed(mh_http_server_t *s);
void mh__http_observe(mh_http_server_t *s, int metric, int status, double secs);
void mh__http_date(mh_http_server_t *s, const char **p, size_t *n);

/* ---- conn.c */
void mh__http_settings(llhttp_settings_t *st);
mh_conn_t *mh__conn_new(mh_http_server_t *s, bool fake);
void mh__conn_feed(mh_conn_t *c, const char *data, size_t len);
void mh__conn_eof(mh_conn_t *c);
void mh__conn_drain(mh_conn_t *c);
void mh__conn_close(mh_conn_t *c);     /* hard close; reqs in flight become gone */
void mh__conn_finish(mh_conn_t *c);    /* close after queued writes (FIN, linger) */
bool mh__conn_idle(const mh_conn_t *c);
void mh__conn_arm(mh_conn_t *c);
/* Writes q->bufs[0..nbufs): 1 when already written (the caller then owes
 * mh__req_write_done), 0 when queued (on_write will), <0 on error. */
int mh__conn_write(mh_conn_t *c, req_t *q, int nbufs);
void mh__req_write_done(req_t *q, int status);
void mh__req_maybe_free(req_t *q);
void mh__conn_response_queued(mh_conn_t *c, req_t *q, bool keep);
bool mh__req_keep_alive(const req_t *q);
void mh__conn_update_reading(mh_conn_t *c);
/* True when the connection has more output queued than the bounds above
 * (responses written but not yet read by the client). */
bool mh__conn_out_full(const mh_conn_t *c);

/* ---- route.c */
int mh__routes_compile(mh_http_server_t *s);
void mh__routes_free(mh_http_server_t *s);
/* Fills q->r.route / params. Returns 0 when routed, else the status to
 * answer (404, 405 with *allow set to an arena string, 400 bad escape). */
int mh__route_match(mh_http_server_t *s, req_t *q, const char **allow);
/* Percent-decodes into the arena, NUL-terminated; plus_space maps '+' to
 * ' ' (query strings). Returns NULL on a bad escape, an encoded NUL or
 * ENOMEM. */
char *mh__pct_decode(mh_arena_t *a, const char *p, size_t n, bool plus_space, size_t *outn);

/* ---- res.c */
void mh__req_log_and_count(req_t *q);
/* Builds the status line and headers into the request arena: Server,
 * Date, Content-Type (when ctype), Content-Length n (when body_allowed),
 * Connection, X-Request-Id, then q->hdrs. NULL on ENOMEM. */
char *mh__res_build_head(req_t *q, int status, const char *ctype, size_t n, bool body_allowed, bool keep,
                         size_t *len);

/* ---- stream.c */
/* The client of q left while its streamed response was open: the
 * producer's abort callback runs on the next loop turn. */
void mh__stream_client_gone(req_t *q);
/* Runs the deferred abort callbacks (server.c's idle pass). */
void mh__stream_run_aborts(mh_http_server_t *s);

/* ---- fuzz / test driver (fake connections, no socket) */
/* A server with no listener: mh__http_fake_server(loop, cfg, &s). */
int mh__http_fake_server(uv_loop_t *loop, const mh_http_config_t *cfg, mh_http_server_t **out);
/* Response bytes of fake connections are appended to sink (may be NULL). */
void mh__http_fake_sink(mh_http_server_t *s, mh_buf_t *sink);

#endif
