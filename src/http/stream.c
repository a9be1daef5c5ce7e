/*
 * stream.c — streamed responses: the status line and headers first, then
 * the body in pieces a producer hands over as it makes them, with
 * back-pressure (mh_res_stream_* in mh/http.h). Framing: Content-Length
 * when the producer knows the length, chunked transfer coding when it
 * does not (HTTP/1.1), end of connection for an HTTP/1.0 client.
 *
 * Invariants:
 *  - The request counts as responded from mh_res_stream_begin on (a
 *    handler answers once), but it stays its connection's current request
 *    (q->rs_open) until mh_res_stream_end: the next pipelined request is
 *    not parsed before then, so two answers never interleave. After end,
 *    every piece is already queued in libuv, whose writes are FIFO, so the
 *    next answer may queue behind them at once.
 *  - Every piece is one uv_write_t in a heap block of its own (with its
 *    chunk framing, and a copy of the bytes unless borrowed): pieces may
 *    outlive the connection (cancelled writes report after uv_close) but
 *    never the request, which is freed only once no piece is in flight
 *    and the producer has called end (q->write_pending covers both).
 *  - Callbacks into the producer (drain, abort) run from libuv callbacks
 *    or the server's idle pass, never from inside an mh_res_stream_* call,
 *    with the request held so that an end() inside them cannot free it
 *    under us. abort runs at most once, and drain never after it.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http_internal.h"

#define Q(r) ((req_t *)(r))

struct mh__stream {
    mh_res_drain_cb drain;
    mh_res_abort_cb abort;
    void *arg;
    uint64_t length; /* MH_LEN_UNKNOWN: chunked or close-delimited */
    uint64_t sent;   /* body bytes accepted from the producer */
    size_t queued;   /* bytes handed to libuv and not yet written */
    int pieces;      /* writes in flight */
    bool chunked, nobody, keep;
    bool want_drain, ended, aborted, abort_queued, failed;
    req_t *next_abort; /* s->stream_aborts */
};

typedef struct {
    uv_write_t w;
    req_t *q;
    size_t wire; /* bytes of this write, framing included */
    void (*done)(void *);
    void *done_arg;
    char pre[24]; /* chunk size line */
    uint8_t data[];
} piece_t;

static const char chunk_crlf[] = "\r\n";
static const char chunk_last[] = "0\r\n\r\n";

/* ------------------------------------------------------------ completion */

/* The producer has ended and nothing is in flight: the write of this
 * response is complete (or dropped), the request may be freed. Callers
 * hold q (q->hold) across this call and free it after. */
static void stream_maybe_done(req_t *q)
{
    mh__stream_t *st = q->rs;
    if (!st->ended || st->pieces || st->abort_queued || !q->write_pending) return;
    mh__req_write_done(q, 0);
}

static void call_drain(req_t *q)
{
    mh__stream_t *st = q->rs;
    if (!st->want_drain || st->ended || st->aborted || st->queued > MH_RES_STREAM_LOW) return;
    st->want_drain = false;
    q->hold++;
    st->drain(&q->r, st->arg);
    q->hold--;
}

static void on_piece(uv_write_t *w, int status)
{
    piece_t *p = (piece_t *)w;
    req_t *q = p->q;
    mh__stream_t *st = q->rs;
    st->queued -= p->wire;
    st->pieces--;
    if (p->done) p->done(p->done_arg);
    free(p);
    q->hold++;
    if (status < 0 && q->r.conn && !q->r.conn->closing) mh__conn_close(q->r.conn); /* delivers abort */
    if (q->r.conn && !q->r.conn->closing) {
        q->r.conn->idle_since = uv_now(q->r.server->loop);
        call_drain(q);
    }
    stream_maybe_done(q);
    q->hold--;
    mh__req_maybe_free(q);
}

/* ---------------------------------------------------------------- aborts */

void mh__stream_client_gone(req_t *q)
{
    mh__stream_t *st = q->rs;
    if (!st || st->ended || st->aborted) return;
    st->aborted = true;
    q->r.gone = true;
    if (st->abort_queued) return;
    st->abort_queued = true;
    mh_http_server_t *s = q->r.server;
    st->next_abort = s->stream_aborts;
    s->stream_aborts = q;
    mh__http_wake(s);
}

void mh__stream_run_aborts(mh_http_server_t *s)
{
    req_t *q = s->stream_aborts;
    s->stream_aborts = NULL;
    while (q) {
        mh__stream_t *st = q->rs;
        req_t *next = st->next_abort;
        st->next_abort = NULL;
        st->abort_queued = false;
        q->hold++;
        if (!st->ended && st->abort) st->abort(&q->r, st->arg);
        stream_maybe_done(q);
        q->hold--;
        mh__req_maybe_free(q);
        q = next;
    }
}

/* ---------------------------------------------------------------- writes */

/* Queues bufs[0..nb) (wire bytes in total) for q; the piece p (may be
 * NULL: allocated here for a copy of whatever try_write left) carries the
 * borrowed data when the producer lent it. Returns 0 or a libuv error. */
static int queue_write(req_t *q, uv_buf_t *bufs, int nb, piece_t *p)
{
    mh__stream_t *st = q->rs;
    mh_conn_t *c = q->r.conn;
    size_t total = 0;
    for (int i = 0; i < nb; i++) total += bufs[i].len;
    q->r.bytes_out += total;
    if (c->fake) {
        for (int i = 0; i < nb && c->s->fake_sink; i++) mh_buf_append(c->s->fake_sink, bufs[i].base, bufs[i].len);
        if (p) {
            if (p->done) p->done(p->done_arg);
            free(p);
        }
        return 0;
    }
    if (!p) {
        /* Copied bytes: try the socket first, keep only the rest. */
        int n = st->pieces ? UV_EAGAIN : uv_try_write((uv_stream_t *)&c->tcp, bufs, (unsigned)nb);
        if (n < 0 && n != UV_EAGAIN) return n;
        size_t done = n > 0 ? (size_t)n : 0;
        if (done == total) return 0;
        p = malloc(sizeof *p + (total - done));
        if (!p) return UV_ENOMEM;
        memset(p, 0, sizeof *p);
        size_t off = 0;
        for (int i = 0; i < nb; i++) {
            size_t skip = done < bufs[i].len ? done : bufs[i].len;
            done -= skip;
            memcpy(p->data + off, bufs[i].base + skip, bufs[i].len - skip);
            off += bufs[i].len - skip;
        }
        bufs[0] = uv_buf_init((char *)p->data, (unsigned)off);
        nb = 1;
        total = off;
    }
    p->q = q;
    p->wire = total;
    int rc = uv_write(&p->w, (uv_stream_t *)&c->tcp, bufs, (unsigned)nb, on_piece);
    if (rc) {
        if (p->done) p->done(p->done_arg);
        free(p);
        return rc;
    }
    st->queued += total;
    st->pieces++;
    return 0;
}

/* Common path of write and write_ext: p is the borrowed piece or NULL. */
static bool stream_write(mh_req_t *r, const void *data, size_t n, piece_t *p)
{
    req_t *q = Q(r);
    mh__stream_t *st = q->rs;
    const char *bad = !st ? "not a streamed response" : st->ended ? "write after end" : NULL;
    if (bad) {
        mh_error("req %s: stream write ignored: %s", r->id, bad);
        goto drop;
    }
    if (st->aborted || st->failed || !r->conn || r->conn->closing) goto drop;
    if (st->length != MH_LEN_UNKNOWN && n > st->length - st->sent) {
        mh_error("req %s: streamed body longer than its Content-Length (%" PRIu64 ")", r->id, st->length);
        st->failed = true;
        goto drop;
    }
    st->sent += n;
    if (st->nobody || n == 0) {
        if (p) {
            if (p->done) p->done(p->done_arg);
            free(p);
        }
        return true;
    }
    uv_buf_t bufs[3];
    int nb = 0;
    char pre[24];
    if (st->chunked) {
        int k = snprintf(p ? p->pre : pre, sizeof pre, "%zx\r\n", n);
        bufs[nb++] = uv_buf_init(p ? p->pre : pre, (unsigned)k);
    }
    bufs[nb].base = (char *)data; /* may exceed UINT_MAX: set the fields directly */
    bufs[nb++].len = n;
    if (st->chunked) bufs[nb++] = uv_buf_init((char *)chunk_crlf, 2);
    int rc = queue_write(q, bufs, nb, p);
    if (rc) {
        mh_warn("req %s: streamed write failed: %s", r->id, uv_strerror(rc));
        st->failed = true;
        if (r->conn && !r->conn->closing) mh__conn_close(r->conn);
        return false;
    }
    if (st->queued < MH_RES_STREAM_HIGH) return true;
    st->want_drain = true;
    return false;
drop:
    if (p) {
        if (p->done) p->done(p->done_arg);
        free(p);
    }
    return false;
}

bool mh_res_stream_write(mh_req_t *r, const void *data, size_t n) { return stream_write(r, data, n, NULL); }

bool mh_res_stream_wants_body(const mh_req_t *r)
{
    const mh__stream_t *st = Q(r)->rs;
    return st && !st->ended && !st->aborted && !st->failed && !st->nobody;
}

bool mh_res_stream_write_ext(mh_req_t *r, const void *data, size_t n, void (*done)(void *arg), void *arg)
{
    piece_t *p = calloc(1, sizeof *p);
    if (!p) {
        if (done) done(arg);
        mh_error("req %s: out of memory for a streamed write", r->id);
        if (Q(r)->rs) Q(r)->rs->failed = true;
        if (r->conn && !r->conn->closing) mh__conn_close(r->conn);
        return false;
    }
    p->done = done;
    p->done_arg = arg;
    return stream_write(r, data, n, p);
}

/* ------------------------------------------------------------ begin, end */

int mh_res_stream_begin(mh_req_t *r, int status, const char *content_type, uint64_t length, mh_res_drain_cb drain,
                        mh_res_abort_cb abort, void *arg)
{
    req_t *q = Q(r);
    if (r->responded || !drain || status < 200 || status > 999) {
        mh_error("req %s: stream begin refused (%s)", r->id, r->responded ? "already answered" : "bad arguments");
        return MH_EINVAL;
    }
    mh__stream_t *st = mh_calloc(&r->arena, sizeof *st);
    if (!st) return MH_ENOMEM;
    *st = (mh__stream_t){.drain = drain, .abort = abort, .arg = arg, .length = length};
    mh_conn_t *c = r->conn;
    r->responded = true;
    r->status = status;
    q->rs = st;
    q->rs_open = true;
    q->write_pending = true; /* until end + the last piece: keeps the request */
    if (r->gone || !c || c->closing) {
        r->status = 499;
        mh__stream_client_gone(q);
        return 0;
    }
    bool body_allowed = !(status == 204 || status == 304);
    st->nobody = !body_allowed || q->head;
    bool v11 = q->http_major > 1 || (q->http_major == 1 && q->http_minor >= 1);
    bool known = length != MH_LEN_UNKNOWN;
    st->keep = mh__req_keep_alive(q) && (known || v11 || !body_allowed);
    /* Unknown length: chunked for HTTP/1.1, the end of the connection for
     * HTTP/1.0 (which has no chunked coding). The framing header is ours:
     * mh_res_header refuses it, so it joins the list here. */
    if (body_allowed && !known && v11) {
        st->chunked = !st->nobody;
        res_hdr_t *h = mh_alloc(&r->arena, sizeof *h);
        if (!h) return MH_ENOMEM;
        *h = (res_hdr_t){NULL, "Transfer-Encoding", "chunked", 17, 7};
        *q->hdrs_tail = h;
        q->hdrs_tail = &h->next;
    }
    size_t hl = 0;
    char *head = mh__res_build_head(q, status, content_type, known ? (size_t)length : 0, body_allowed && known,
                                    st->keep, &hl);
    if (!head) return MH_ENOMEM;
    if (q->phase != PH_DONE) q->discard = true; /* answered before the body ended: ignore the rest */
    if (c->nwriting++ == 0) {
        c->wq_since = uv_now(c->s->loop);
        c->wq_sample = 0;
    }
    uv_buf_t b = uv_buf_init(head, (unsigned)hl);
    int rc = queue_write(q, &b, 1, NULL);
    if (rc) {
        mh_warn("req %s: writing the head failed: %s", r->id, uv_strerror(rc));
        mh__conn_close(c); /* delivers abort */
    }
    return 0;
}

void mh_res_stream_end(mh_req_t *r, int err)
{
    req_t *q = Q(r);
    mh__stream_t *st = q->rs;
    if (!st || st->ended) {
        mh_error("req %s: stream end ignored (%s)", r->id, st ? "ended twice" : "not a streamed response");
        return;
    }
    mh_conn_t *c = r->conn;
    bool live = !st->aborted && c && !c->closing;
    q->hold++;
    if (!err && st->failed) err = MH_EIO;
    if (!err && live && !st->nobody && st->length != MH_LEN_UNKNOWN && st->sent != st->length) {
        mh_error("req %s: streamed body is %" PRIu64 " bytes, its Content-Length said %" PRIu64, r->id, st->sent,
                 st->length);
        err = MH_EIO;
    }
    if (!err && live && st->chunked) {
        uv_buf_t b = uv_buf_init((char *)chunk_last, sizeof chunk_last - 1);
        if (queue_write(q, &b, 1, NULL)) err = MH_EIO;
    }
    st->ended = true;
    q->rs_open = false;
    /* On an error the head is gone already: the only way left to tell
     * the client is an incomplete body (no last chunk, or short of its
     * length), then the end of the connection. */
    if (err && live) mh_warn("req %s: streamed response cut: %s", r->id, mh_strerror(err));
    if (live) {
        bool keep = st->keep && !err && (st->length != MH_LEN_UNKNOWN || st->chunked || st->nobody);
        mh__conn_response_queued(c, q, keep);
    }
    stream_maybe_done(q);
    q->hold--;
    mh__req_maybe_free(q);
}
