/*
 * http.h — the HTTP/1.1 server on libuv + llhttp: listener (SO_REUSEPORT),
 * connections with keep-alive and pipelining, a route table, buffered or
 * streamed request bodies (also chunked, Expect: 100-continue), limits
 * answered with 400/408/413/431, a writev response writer, streamed
 * responses with back-pressure (mh_res_stream_*), one access-log line per
 * request, Prometheus counters, graceful stop.
 *
 * Invariants:
 *  - Every request gets exactly one response: a handler (or the callbacks
 *    it starts) must call exactly one mh_res_* function, on the loop
 *    thread. If the client has gone meanwhile the response is dropped and
 *    the request freed; mh_req_gone() lets long work stop early.
 *  - Everything a request allocates lives in req->arena, released after
 *    the response is written and the access-log line printed.
 *  - Pipelined requests are answered in order; the next request on a
 *    connection is not parsed until the current response is queued (a
 *    streamed one: ended), nor while the connection has more than 1 MiB or
 *    16 answers queued that the client has not read.
 *  - Framing: obsolete line folding, an HTTP/1.1 request without Host,
 *    two Host lines or an invalid Host are answered 400 and the
 *    connection closes (RFC 9112 3.2, 5.2).
 *
 * Knows nothing of the database or the store (DESIGN section 2).
 */
#ifndef MH_HTTP_H
#define MH_HTTP_H

#include <uv.h>

#include "mh/codec.h"
#include "mh/core.h"

typedef struct mh_http_server mh_http_server_t;
typedef struct mh_req mh_req_t;
typedef struct mh_conn mh_conn_t;

typedef void (*mh_handler_fn)(mh_req_t *req);

/* One row of the route table. Patterns are '/'-separated segments;
 * "{name}" captures one non-empty segment; a final "{*name}" captures the
 * non-empty rest of the path (may contain '/'). Captures are
 * percent-decoded. Literal segments match exactly (raw bytes). First match
 * in table order wins. HEAD is served by the first matching GET route
 * unless a HEAD route matches (the handler sees method "HEAD"; the body
 * it sends is dropped, Content-Length kept). No pattern matches: 404
 * {"error":"not_found"}; a pattern matches but not the method: 405 with
 * an Allow header. The table must outlive the server. At most
 * MH_MAX_PARAMS captures per pattern. */
typedef struct {
    const char *method;  /* "GET", "POST", "PUT", "DELETE", "HEAD" */
    const char *pattern; /* e.g. "/api/repos/{repo_id}" */
    mh_handler_fn handler;
    const char *name;    /* metrics label, e.g. "repo_get" */
    uint64_t max_body;   /* bytes; 0 = the server default (1 MiB) */
    /* When true the handler runs as soon as the headers are complete and
     * must install req->on_body / req->on_body_end to receive the body as
     * it arrives (no buffering); otherwise the whole body is buffered in
     * req->body (up to max_body, else 413) before the handler runs. */
    bool stream_body;
    /* The endpoint's answer format when Accept names none (SPEC 4):
     * MH_FMT_JSON (0, the default) or MH_FMT_MSGPACK (fetch). Answers and
     * error bodies alike follow it. */
    mh_format_t format;
} mh_route_t;

typedef struct {
    mh_str_t name;  /* lowercased */
    mh_str_t value; /* leading/trailing whitespace trimmed */
} mh_header_t;

#define MH_MAX_PARAMS 8

struct mh_req {
    mh_arena_t arena;        /* owns everything below */
    mh_http_server_t *server;
    void *app;               /* the server's app pointer (mh_http_config_t.app) */
    const mh_route_t *route; /* NULL until routed */
    /* All mh_str_t below (target, path, query, params, header names and
     * values) live as long as the request (in its arena or a buffer it
     * owns) and are also NUL-terminated. */
    const char *method;      /* "GET", ... (static string) */
    mh_str_t target;         /* raw request-target */
    mh_str_t path;           /* raw path (before '?'), not decoded */
    mh_str_t query;          /* after '?', without it; empty when none */
    mh_str_t params[MH_MAX_PARAMS];
    const char *param_names[MH_MAX_PARAMS];
    int nparams;
    mh_header_t *headers;
    int nheaders;
    mh_buf_t body;           /* buffered body (routes without stream_body) */
    uint64_t content_length; /* UINT64_MAX when unknown (chunked) */
    char id[17];             /* request id: 16 hex digits, NUL-terminated */
    uint64_t start_us;

    /* Streaming body callbacks (stream_body routes). on_body may be
     * called many times; on_body_end once when the body is complete. If
     * the client disconnects first, on_abort is called instead (then the
     * handler must still respond; the response is dropped). Once the
     * handler has responded, neither on_body nor on_body_end is called
     * again (the rest of the body is discarded). on_body runs inside the
     * parser: it must not block; it may respond or call mh_req_pause,
     * which takes effect before the next on_body. */
    void (*on_body)(mh_req_t *req, const uint8_t *data, size_t n);
    void (*on_body_end)(mh_req_t *req);
    void (*on_abort)(mh_req_t *req);
    void *user; /* for the handler */

    /* Filled by auth (opaque to http). */
    void *caller;

    /* The client's IP address as text, no port ("" when unknown); an
     * IPv4-mapped IPv6 peer is written as plain IPv4. */
    char peer[46];

    /* A gate, installed by pre_route when authorising needs more than the
     * headers (e.g. a signature over the body). When set, it runs instead
     * of the route's handler: for buffered routes once the body is
     * complete, for stream_body routes at once with the body held back.
     * It must then either respond (the handler never runs) or call
     * mh_req_continue(req) exactly once, synchronously or from a later
     * callback. If the client leaves meanwhile, the gate still must do one
     * of the two (both then just clean up). */
    void (*gate)(mh_req_t *req, void *arg);
    void *gate_arg;

    /* The answer under construction (mh_res_build): its first failure is
     * kept here and checked once, by mh_res_val. */
    mh_vb_t out;

    mh_conn_t *conn; /* internal */
    int status;      /* set when the response is sent */
    uint64_t bytes_out;
    bool responded;
    bool gone;       /* the client disconnected */
};

/* Server configuration. Zero fields take the defaults noted. */
typedef struct {
    const char *listen;           /* "host:port"; default "127.0.0.1:1337" */
    const mh_route_t *routes;     /* table, terminated by a row with method NULL */
    void *app;                    /* copied into every req->app */
    uint64_t default_max_body;    /* bytes; default 1 MiB */
    uint32_t max_header_bytes;    /* all header bytes of one request; default 16 KiB -> 431 */
    uint32_t max_headers;         /* default 64 -> 431 */
    uint32_t idle_timeout_ms;     /* keep-alive idle; default 60000 (close silently); also the
                                     longest a queued response may make no write progress */
    uint32_t request_timeout_ms;  /* headers + body must arrive within; default 30000 -> 408.
                                     For stream_body routes the clock restarts with every body
                                     chunk (uploads of GiBs) and stops while paused. */
    bool reuseport;               /* SO_REUSEPORT (MUSEHUB_WORKERS > 1) */
    /* Called once headers are complete (authentication), after the path
     * was matched (req->route and params are set, route NULL when nothing
     * matched) and before 404/405/413 are answered; may respond (then the
     * route is not run). May be NULL. The hook must return synchronously. */
    void (*pre_route)(mh_req_t *req);
    /* Who a request came from, for its access-log line: the client
     * address (after trusted proxies) and the caller's name ("-" when
     * anonymous). Called once per logged request, just before the line is
     * written; the strings must live as long as the request (its arena or
     * static storage). May be NULL: the TCP peer and "-". */
    void (*log_who)(mh_req_t *req, const char **client, const char **user);
} mh_http_config_t;

/* Creates a server on `loop` and starts listening. *out is owned by the
 * caller until mh_http_stop's callback fires (which frees it).
 * Errors: MH_EINVAL bad listen address, negative errno from bind/listen. */
int mh_http_start(uv_loop_t *loop, const mh_http_config_t *cfg, mh_http_server_t **out);

/* Stops accepting, lets in-flight requests finish for up to `grace_ms`
 * (their responses carry Connection: close), closes idle keep-alive
 * connections now, then closes everything and calls done(arg) (may be
 * NULL) on a later loop turn, once every handle of the server is closed.
 * The server is freed before done runs, except when a handler still owes
 * a response to a request whose connection was force-closed: then the
 * struct is freed when that (dropped) response arrives. Either way the
 * caller must not use `s` after calling this. */
void mh_http_stop(mh_http_server_t *s, uint32_t grace_ms, void (*done)(void *arg), void *arg);

/* The bound TCP port (useful with "host:0"), or -1. */
int mh_http_port(mh_http_server_t *s);

/* Number of connections and of requests in flight. */
void mh_http_counts(mh_http_server_t *s, uint64_t *conns, uint64_t *inflight);

/* Appends Prometheus text for this server: musehub_http_requests_total
 * {route,status}, musehub_http_request_duration_seconds histogram {route}
 * (first byte to response written; buckets 0.5 ms .. 10 s), gauges
 * musehub_http_connections and musehub_http_requests_in_flight. Route
 * label: the route's name; "none" for requests no route matched. A client
 * that left before its answer counts as status 499. MH_ENOMEM on failure. */
int mh_http_metrics_write(mh_http_server_t *s, mh_buf_t *out);

/* ------------------------------------------------------------- requests */

/* Header value by lowercased name, or NULL (mh_str_t with p == NULL).
 * Repeated headers: the first. */
mh_str_t mh_req_header(const mh_req_t *r, const char *lname);

/* Route capture by name (percent-decoded; %00 or a bad escape in the
 * path is answered 400 before routing); p == NULL when absent. */
mh_str_t mh_req_param(const mh_req_t *r, const char *name);

/* Query parameter by name, percent-decoded into the arena; p == NULL when
 * absent. */
mh_str_t mh_req_query(mh_req_t *r, const char *name);

/* Response format (SPEC 4): msgpack when Accept names
 * application/x-msgpack, JSON when it names application/json, else the
 * route's default (JSON when no route matched). */
mh_format_t mh_req_format(const mh_req_t *r);

/* Decodes the buffered body as msgpack or JSON by Content-Type (msgpack
 * for application/x-msgpack or application/msgpack, JSON for anything
 * else, including none). An empty body decodes as an empty map. Values
 * live in req->arena (msgpack strings point into req->body). On failure
 * it responds 422 {"error":"invalid_body",...} (503 on ENOMEM) itself and
 * returns false. */
bool mh_req_body_val(mh_req_t *r, mh_val_t *out);

/* Called by a gate (see mh_req_t.gate) once the request may proceed:
 * runs the route's handler now (for stream_body routes the body then
 * starts to flow). A request whose client has gone is answered (dropped)
 * and freed instead. No-op when there is no pending gate. */
void mh_req_continue(mh_req_t *req);

/* True when the client has disconnected (reset, or EOF before the
 * request was complete; an EOF after a complete request is treated as a
 * half-close and the response is still sent). */
bool mh_req_gone(const mh_req_t *r);

/* Stops / resumes reading the connection (back-pressure for streaming
 * bodies whose consumer is slower than the network). Only meaningful
 * while the body is arriving; cleared when the request completes.
 * Bytes already read wait until resume; resume never calls back into the
 * caller (parsing restarts on the next loop turn). */
void mh_req_pause(mh_req_t *r);
void mh_req_resume(mh_req_t *r);

/* ------------------------------------------------------------ responses */

/* Adds a response header; both strings are copied into the arena.
 * Ignored after the response was sent, for names with CR/LF/':'/space or
 * values with CR/LF, and for Content-Length, Connection and
 * Transfer-Encoding (framing is the server's). The server always sends
 * Server, Date, Content-Length (not for 1xx/204/304), Connection and
 * X-Request-Id (req->id). */
void mh_res_header(mh_req_t *r, const char *name, const char *value);

/* Sends status + body. `body` is borrowed until the write completes: it
 * must live in req->arena or be static. Content-Length is set; for HEAD
 * the body is omitted. */
void mh_res_send(mh_req_t *r, int status, const char *content_type, const void *body, size_t n);

/* As mh_res_send, taking ownership of a heap buffer (freed after write). */
void mh_res_send_buf(mh_req_t *r, int status, const char *content_type, mh_buf_t *body);

/* As mh_res_send with a body the caller frees in done(arg) once written
 * (or dropped): mmap'ed files, cached packs. */
void mh_res_send_ext(mh_req_t *r, int status, const char *content_type, const void *body, size_t n,
                     void (*done)(void *arg), void *arg);

/* The builder of this request's answer: values built with it live in
 * req->arena and its failures are sticky (codec.h, mh_vb_t). */
mh_vb_t *mh_res_build(mh_req_t *r);

/* Ends the request with v (nginx's finalize_request: the one way an
 * answer leaves): when the answer's builder recorded a failure, or v is
 * NULL, answers that error through mh_res_fail instead; otherwise encodes
 * v in mh_req_format(r) and sends it. */
void mh_res_val(mh_req_t *r, int status, const mh_val_t *v);

/* Sends SPEC's error body {"error": code, "detail": text} in
 * mh_req_format(r) with the status SPEC gives that refusal. */
void mh_res_error(mh_req_t *r, int status, const char *code, const char *detail_fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* The one error-to-HTTP table (res.c): what a client sees for an MH_E*
 * code, whichever module it came from (SQLSTATE classes arrive as the db
 * module's codes, store and codec failures as theirs, limits as
 * MH_ELIMIT). Unknown codes get the 500 row. */
typedef struct {
    int err;            /* MH_E* */
    int status;         /* HTTP status */
    const char *code;   /* SPEC's "error" */
    const char *detail; /* what a client reads, unless explain */
    bool retry;         /* Retry-After: 2 */
    bool explain;       /* a client error: the caller's reason is the detail */
} mh_http_err_t;
const mh_http_err_t *mh_http_err_of(int err);

/* Ends the request with the table's answer for err. A client error whose
 * row explains (malformed input, limits, not found) carries `what` as its
 * detail; every other row carries its fixed detail, and `what` goes to
 * the log with the request id (a server error's reason is never sent). */
void mh_res_fail(mh_req_t *r, int err, const char *what);

/* Standard reason phrase for a status code ("Not Found"). */
const char *mh_http_reason(int status);

/* ---------------------------------------------------- streamed responses */

/* A response whose body is produced piece by piece while it is sent
 * (src/http/stream.c): answers larger than memory should hold (a tree of
 * a million entries, SPEC 4.5; a pack file of GiBs). The headers go out at
 * mh_res_stream_begin, the body follows through mh_res_stream_write*, the
 * producer finishes with mh_res_stream_end. Back-pressure, Node.js style:
 * a write returns false once this response has MH_RES_STREAM_HIGH bytes
 * queued that the socket has not taken yet; the producer then stops, and
 * drain(req, arg) is called once the queue has fallen to
 * MH_RES_STREAM_LOW, after which it writes again. A producer may also
 * write from its own callbacks (a thread-pool read completing): writes
 * are accepted at any time before end, the bound is advisory.
 *
 * Framing: length = the body size in bytes when known (Content-Length;
 * writing more is refused, and ending short cuts the response), or
 * MH_LEN_UNKNOWN: chunked transfer coding for HTTP/1.1 clients, the end
 * of the connection for HTTP/1.0 ones. HEAD, 204 and 304 send no body:
 * writes are accepted and discarded (mh_res_stream_wants_body is false,
 * so a producer can end at once).
 *
 * Ending: mh_res_stream_end(req, 0) completes the body (the last chunk);
 * a non-zero MH_E* err cuts it instead (no last chunk / short of
 * Content-Length, then the connection closes): the status line is gone
 * already, so an incomplete body is how a client learns of a failure
 * mid-stream. The producer must call end exactly once, also after abort.
 *
 * Client gone: when the connection ends before mh_res_stream_end (reset,
 * write error, no write progress for the idle timeout, server stop),
 * abort(req, arg) (may be NULL) is called once, on a later loop turn;
 * drain is never called after it, writes are dropped (they return false),
 * mh_req_gone(req) is true; the producer releases what it holds and calls
 * mh_res_stream_end. The request (its arena) lives until then.
 *
 * Pipelining: the connection parses no further request until end, so
 * answers never interleave. drain and abort run on the loop thread, never
 * from inside an mh_res_stream_* call. */
#define MH_RES_STREAM_HIGH (1u << 20)  /* bytes queued: write returns false */
#define MH_RES_STREAM_LOW (256u << 10) /* bytes queued: drain is called */
#define MH_LEN_UNKNOWN UINT64_MAX

typedef void (*mh_res_drain_cb)(mh_req_t *req, void *arg);
typedef void (*mh_res_abort_cb)(mh_req_t *req, void *arg);

/* Sends the status line and headers (those set with mh_res_header, plus
 * the server's own and the framing) and opens the body. status 200..999.
 * The request counts as answered from now on. Returns 0 (also when the
 * client has gone already: abort then follows on a later turn), MH_EINVAL
 * (already answered, no drain callback, bad status: nothing was sent, the
 * caller still owes nothing more) or MH_ENOMEM (nothing sent; the caller
 * may still answer with mh_res_error). */
int mh_res_stream_begin(mh_req_t *req, int status, const char *content_type, uint64_t length,
                        mh_res_drain_cb drain, mh_res_abort_cb abort, void *arg);

/* Appends data[0..n) to the body, copied (what the socket does not take
 * at once is kept in a heap piece until written). Returns true while the
 * producer may go on, false when it should wait for drain (or the stream
 * is aborted, failed or ended: then the bytes were dropped). */
bool mh_res_stream_write(mh_req_t *req, const void *data, size_t n);

/* As mh_res_stream_write without a copy: data is lent until done(arg)
 * (may be NULL) is called — after the bytes are written, or dropped; done
 * may run before this returns when the bytes are dropped at once. */
bool mh_res_stream_write_ext(mh_req_t *req, const void *data, size_t n, void (*done)(void *arg), void *arg);

/* False when writes would be discarded (HEAD, 204/304, aborted, ended). */
bool mh_res_stream_wants_body(const mh_req_t *req);

/* Ends the body: err 0 completes it, an MH_E* code cuts it (see above).
 * Exactly once per successful mh_res_stream_begin. */
void mh_res_stream_end(mh_req_t *req, int err);

#endif
