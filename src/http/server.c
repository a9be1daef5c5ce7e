/*
 * server.c — the listener (host:port, IPv4/IPv6, SO_REUSEPORT), accepting
 * connections, the deferred-work idle pass, graceful stop, metrics and
 * the cached Date header.
 *
 * Invariants:
 *  - The server struct outlives every connection and every request: it is
 *    freed once its own handles are closed, all connections are freed and
 *    no request is alive. mh_http_stop's done callback runs when all
 *    handles are closed; if a handler still owes a (dropped) response then,
 *    the struct lingers "orphaned" until that request is freed.
 *  - Deferred work (resuming a connection after an asynchronous response,
 *    fake write completions) runs from one uv_idle handle that is active
 *    only while there is work, so an idle server costs nothing. Deferred
 *    write completions are processed in order of arrival per turn.
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "http_internal.h"
#include "mh/metrics.h"

static const double bucket_le[MH_HTTP_NBUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                   0.1,    0.25,  0.5,    1,     2.5,   5,    10};

/* ------------------------------------------------------------ deferred */

static void on_idle(uv_idle_t *h)
{
    mh_http_server_t *s = h->data;
    req_t *fd = s->done_list; /* LIFO: order does not matter here */
    s->done_list = NULL;
    while (fd) {
        req_t *n = fd->pool_next;
        fd->pool_next = NULL;
        mh__req_write_done(fd, 0);
        fd = n;
    }
    mh__stream_run_aborts(s);
    while (s->ready) {
        mh_conn_t *c = s->ready;
        s->ready = c->rnext;
        if (s->ready) s->ready->rprev = NULL;
        c->rnext = c->rprev = NULL;
        c->in_ready = false;
        mh__conn_drain(c);
    }
    if (!s->ready && !s->done_list && !s->stream_aborts) {
        uv_idle_stop(&s->idle);
        s->idle_active = false;
        mh__http_conn_freed(s); /* a stop may have waited for fake writes */
    }
}

void mh__http_wake(mh_http_server_t *s)
{
    if (s->idle_active) return;
    uv_idle_start(&s->idle, on_idle);
    s->idle_active = true;
}

void mh__http_defer_done(req_t *q)
{
    mh_http_server_t *s = q->r.server;
    q->pool_next = s->done_list;
    s->done_list = q;
    mh__http_wake(s);
}

void mh__http_schedule_drain(mh_conn_t *c)
{
    mh_http_server_t *s = c->s;
    if (c->in_ready || c->closing) return;
    c->rprev = NULL;
    c->rnext = s->ready;
    if (s->ready) s->ready->rprev = c;
    s->ready = c;
    c->in_ready = true;
    mh__http_wake(s);
}

/* ---------------------------------------------------------- lifetime */

static void server_free(mh_http_server_t *s)
{
    while (s->pool) {
        req_t *q = s->pool;
        s->pool = q->pool_next;
        mh_buf_free(&q->hdr);
        free(q);
    }
    for (int i = 0; i < s->nmetrics; i++) free(s->metrics[i].st);
    free(s->metrics);
    mh__routes_free(s);
    free((char *)s->cfg.listen);
    free(s);
}

static void own_closed(uv_handle_t *h)
{
    mh_http_server_t *s = h->data;
    if (--s->handles_open > 0) return;
    void (*done)(void *) = s->done;
    void *arg = s->done_arg;
    if (s->live_reqs == 0) server_free(s);
    else s->orphaned = true;
    if (done) done(arg);
}

/* Once stopping and nothing network-facing is left, close our own handles. */
static void check_done(mh_http_server_t *s)
{
    if (!s->stopping || s->nconns || s->listener_open || s->done_list || s->stream_aborts || s->own_closing) return;
    s->own_closing = true;
    uv_close((uv_handle_t *)&s->grace, own_closed);
    uv_close((uv_handle_t *)&s->idle, own_closed);
    s->idle_active = true; /* never restart it */
}

void mh__http_conn_freed(mh_http_server_t *s) { check_done(s); }

void mh__http_req_freed(mh_http_server_t *s)
{
    s->live_reqs--;
    if (s->orphaned && s->live_reqs == 0) server_free(s);
}

static void on_listener_closed(uv_handle_t *h)
{
    mh_http_server_t *s = h->data;
    s->listener_open = false;
    check_done(s);
}

static void on_grace(uv_timer_t *t)
{
    mh_http_server_t *s = t->data;
    if (s->nconns) mh_warn("http: stop grace period over, closing %llu connection(s)", (unsigned long long)s->nconns);
    for (mh_conn_t *c = s->conns; c; c = c->next) mh__conn_close(c);
}

void mh_http_stop(mh_http_server_t *s, uint32_t grace_ms, void (*done)(void *arg), void *arg)
{
    if (!s || s->stopping) return;
    s->stopping = true;
    s->done = done;
    s->done_arg = arg;
    if (s->listener_open && !uv_is_closing((uv_handle_t *)&s->listener))
        uv_close((uv_handle_t *)&s->listener, on_listener_closed);
    for (mh_conn_t *c = s->conns; c; c = c->next) {
        if (!mh__conn_idle(c)) continue; /* answers with Connection: close, then ends */
        if (c->nwriting) mh__conn_finish(c);
        else mh__conn_close(c);
    }
    uv_timer_start(&s->grace, on_grace, grace_ms, 0);
    check_done(s);
}

/* ------------------------------------------------------------ listen */

/* Splits "host:port" / "[v6]:port" / ":port"; host "" means any. */
static int parse_listen(const char *spec, char *host, size_t hsz, char *port, size_t psz)
{
    const char *colon;
    const char *h = spec;
    size_t hl;
    if (spec[0] == '[') {
        const char *rb = strchr(spec, ']');
        if (!rb || rb[1] != ':') return MH_EINVAL;
        h = spec + 1;
        hl = (size_t)(rb - h);
        colon = rb + 1;
    } else {
        colon = strrchr(spec, ':');
        if (!colon) return MH_EINVAL;
        hl = (size_t)(colon - spec);
        if (memchr(spec, ':', hl)) return MH_EINVAL; /* bare IPv6 needs brackets */
    }
    const char *p = colon + 1;
    size_t pl = strlen(p);
    if (hl >= hsz || pl == 0 || pl >= psz || strspn(p, "0123456789") != pl || atol(p) > 65535) return MH_EINVAL;
    memcpy(host, h, hl);
    host[hl] = 0;
    memcpy(port, p, pl + 1);
    return 0;
}

/* Creates, binds and listens on a socket ourselves so SO_REUSEPORT can be
 * set before bind (libuv has no option for it). Returns the fd or <0. */
static int open_listener(const mh_http_config_t *cfg)
{
    char host[256], port[8];
    if (parse_listen(cfg->listen, host, sizeof host, port, sizeof port)) return MH_EINVAL;
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int gr = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (gr || !res) return MH_EINVAL;
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int e = -errno;
        freeaddrinfo(res);
        return e;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (cfg->reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one)) {
        int e = -errno;
        close(fd);
        freeaddrinfo(res);
        return e;
    }
    int rc = bind(fd, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    if (rc || listen(fd, 1024)) {
        int e = -errno;
        close(fd);
        return e;
    }
    return fd;
}

/* The peer address as text, once per connection (requests copy it). */
static void conn_peer(mh_conn_t *c)
{
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len)) return;
    if (ss.ss_family == AF_INET) {
        uv_ip4_name((struct sockaddr_in *)&ss, c->peer, sizeof c->peer);
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
        if (IN6_IS_ADDR_V4MAPPED(&a6->sin6_addr)) inet_ntop(AF_INET, &a6->sin6_addr.s6_addr[12], c->peer, sizeof c->peer);
        else uv_ip6_name(a6, c->peer, sizeof c->peer);
    }
}

static void on_connection(uv_stream_t *ls, int status)
{
    mh_http_server_t *s = ls->data;
    if (status < 0) {
        mh_warn("http: accept: %s", uv_strerror(status));
        return;
    }
    mh_conn_t *c = mh__conn_new(s, false);
    if (!c) {
        mh_error("http: out of memory accepting a connection");
        return;
    }
    if (uv_accept(ls, (uv_stream_t *)&c->tcp) || s->stopping) {
        mh__conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    conn_peer(c);
    mh__conn_update_reading(c);
    mh__conn_arm(c);
}

/* --------------------------------------------------------------- start */

static int metrics_init(mh_http_server_t *s)
{
    s->metrics = calloc((size_t)s->nroutes + 1, sizeof *s->metrics);
    if (!s->metrics) return MH_ENOMEM;
    for (int i = 0; i < s->nroutes; i++) {
        const mh_route_t *rt = &s->cfg.routes[i];
        const char *name = rt->name ? rt->name : rt->pattern;
        int k = 0;
        while (k < s->nmetrics && strcmp(s->metrics[k].name, name) != 0) k++;
        if (k == s->nmetrics) s->metrics[s->nmetrics++].name = name;
        s->rt[i].metric = k;
    }
    s->metric_none = s->nmetrics;
    s->metrics[s->nmetrics++].name = "none";
    return 0;
}

static int server_new(uv_loop_t *loop, const mh_http_config_t *cfg, mh_http_server_t **out)
{
    mh_http_server_t *s = calloc(1, sizeof *s);
    if (!s) return MH_ENOMEM;
    s->loop = loop;
    s->cfg = *cfg;
    mh_http_config_t *c = &s->cfg;
    c->listen = strdup(cfg->listen ? cfg->listen : "127.0.0.1:1337");
    if (!c->default_max_body) c->default_max_body = 1u << 20;
    if (!c->max_header_bytes) c->max_header_bytes = 16 * 1024;
    if (!c->max_headers) c->max_headers = 64;
    if (!c->idle_timeout_ms) c->idle_timeout_ms = 60000;
    if (!c->request_timeout_ms) c->request_timeout_ms = 30000;
    s->tick_ms = c->idle_timeout_ms < c->request_timeout_ms ? c->idle_timeout_ms : c->request_timeout_ms;
    mh__http_settings(&s->settings);
    int rc = c->listen ? mh__routes_compile(s) : MH_ENOMEM;
    if (!rc) rc = metrics_init(s);
    if (rc) {
        server_free(s);
        return rc;
    }
    if (mh_random(&s->id_key, sizeof s->id_key)) s->id_key = (uint64_t)mh_now_us() ^ ((uint64_t)getpid() << 32);
    uv_idle_init(loop, &s->idle);
    s->idle.data = s;
    uv_timer_init(loop, &s->grace);
    s->grace.data = s;
    s->handles_open = 2;
    *out = s;
    return 0;
}

int mh_http_start(uv_loop_t *loop, const mh_http_config_t *cfg, mh_http_server_t **out)
{
    *out = NULL;
    const char *spec = cfg->listen ? cfg->listen : "127.0.0.1:1337";
    mh_http_config_t tmp = *cfg;
    tmp.listen = spec;
    int fd = open_listener(&tmp);
    if (fd < 0) return fd;
    mh_http_server_t *s;
    int rc = server_new(loop, cfg, &s);
    if (rc) {
        close(fd);
        return rc;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0)
        s->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
    uv_tcp_init(loop, &s->listener);
    s->listener.data = s;
    s->listener_open = true;
    rc = uv_tcp_open(&s->listener, fd);
    if (rc) close(fd); /* not adopted by the handle */
    else rc = uv_listen((uv_stream_t *)&s->listener, 1024, on_connection);
    if (rc) {
        /* Handles exist now: unwind through the normal stop path, which
         * frees the server on a later loop turn. */
        mh_http_stop(s, 0, NULL, NULL);
        return rc;
    }
    *out = s;
    return 0;
}

int mh_http_port(mh_http_server_t *s) { return s ? s->port : -1; }

void mh_http_counts(mh_http_server_t *s, uint64_t *conns, uint64_t *inflight)
{
    if (conns) *conns = s->nconns;
    if (inflight) *inflight = s->inflight;
}

int mh__http_fake_server(uv_loop_t *loop, const mh_http_config_t *cfg, mh_http_server_t **out)
{
    return server_new(loop, cfg, out);
}

void mh__http_fake_sink(mh_http_server_t *s, mh_buf_t *sink) { s->fake_sink = sink; }

/* ------------------------------------------------------------ metrics */

void mh__http_observe(mh_http_server_t *s, int metric, int status, double secs)
{
    if (metric < 0 || metric >= s->nmetrics) metric = s->metric_none;
    metric_t *m = &s->metrics[metric];
    int b = 0;
    while (b < MH_HTTP_NBUCKETS && secs > bucket_le[b]) b++;
    m->buckets[b]++;
    m->sum += secs;
    m->count++;
    for (int i = 0; i < m->nst; i++) {
        if (m->st[i].status == status) {
            m->st[i].n++;
            return;
        }
    }
    if (m->nst == m->capst) {
        int nc = m->capst ? m->capst * 2 : 4;
        void *p = realloc(m->st, (size_t)nc * sizeof *m->st);
        if (!p) return;
        m->st = p;
        m->capst = nc;
    }
    m->st[m->nst].status = status;
    m->st[m->nst].n = 1;
    m->nst++;
}

int mh_http_metrics_write(mh_http_server_t *s, mh_buf_t *out)
{
    int rc = mh_buf_append_str(out, "# HELP musehub_http_requests_total HTTP requests answered, by route and status.\n"
                                    "# TYPE musehub_http_requests_total counter\n");
    for (int i = 0; i < s->nmetrics && !rc; i++) {
        metric_t *m = &s->metrics[i];
        for (int k = 0; k < m->nst && !rc; k++) {
            rc = mh_buf_append_str(out, "musehub_http_requests_total{route=\"");
            rc = rc ? rc : mh_metrics_label(out, m->name);
            rc = rc ? rc : mh_buf_printf(out, "\",status=\"%d\"} %llu\n", m->st[k].status, (unsigned long long)m->st[k].n);
        }
    }
    rc = rc ? rc
            : mh_buf_append_str(out, "# HELP musehub_http_request_duration_seconds HTTP request latency, first byte "
                                     "to response written.\n# TYPE musehub_http_request_duration_seconds histogram\n");
    for (int i = 0; i < s->nmetrics && !rc; i++) {
        metric_t *m = &s->metrics[i];
        uint64_t cum = 0;
        for (int b = 0; b <= MH_HTTP_NBUCKETS && !rc; b++) {
            cum += m->buckets[b];
            rc = mh_buf_append_str(out, "musehub_http_request_duration_seconds_bucket{route=\"");
            rc = rc ? rc : mh_metrics_label(out, m->name);
            if (rc) break;
            if (b < MH_HTTP_NBUCKETS) rc = mh_buf_printf(out, "\",le=\"%g\"} %llu\n", bucket_le[b], (unsigned long long)cum);
            else rc = mh_buf_printf(out, "\",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
        }
        rc = rc ? rc : mh_buf_append_str(out, "musehub_http_request_duration_seconds_sum{route=\"");
        rc = rc ? rc : mh_metrics_label(out, m->name);
        rc = rc ? rc : mh_buf_printf(out, "\"} %.6f\n", m->sum);
        rc = rc ? rc : mh_buf_append_str(out, "musehub_http_request_duration_seconds_count{route=\"");
        rc = rc ? rc : mh_metrics_label(out, m->name);
        rc = rc ? rc : mh_buf_printf(out, "\"} %llu\n", (unsigned long long)m->count);
    }
    rc = rc ? rc
            : mh_buf_printf(out,
                            "# HELP musehub_http_connections Open HTTP connections.\n"
                            "# TYPE musehub_http_connections gauge\nmusehub_http_connections %llu\n"
                            "# HELP musehub_http_requests_in_flight Requests received and not yet answered.\n"
                            "# TYPE musehub_http_requests_in_flight gauge\nmusehub_http_requests_in_flight %llu\n",
                            (unsigned long long)s->nconns, (unsigned long long)s->inflight);
    return rc ? MH_ENOMEM : 0;
}

/* --------------------------------------------------------------- date */

void mh__http_date(mh_http_server_t *s, const char **p, size_t *n)
{
    /* Formatted once per second: strftime per response would show up in
     * the profile at 50k req/s. */
    time_t now = time(NULL);
    if (now != s->date_sec) {
        struct tm tm;
        gmtime_r(&now, &tm);
        static const char *wd[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
        static const char *mo[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                   "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
        int k = snprintf(s->date, sizeof s->date, "%s, %02d %s %04d %02d:%02d:%02d GMT", wd[tm.tm_wday % 7],
                         tm.tm_mday, mo[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
        s->date_len = k > 0 && (size_t)k < sizeof s->date ? (size_t)k : 0;
        s->date_sec = now;
    }
    *p = s->date;
    *n = s->date_len;
}
