/*
 * route.c — the route table: patterns compiled once at start into
 * segment arrays, matched per request against the raw path; captures are
 * percent-decoded into the request arena; also query-string lookup.
 *
 * Invariants: literal segments compare raw bytes (no decoding), "{name}"
 * takes exactly one non-empty segment, "{*name}" (at most one per
 * pattern, followed by literal segments only) takes one or more segments
 * including the '/' between them, as many as leave the pattern's literal
 * segments after it to match the path's last ones: "/b/{*name}/protection"
 * on "/b/x/y/protection" captures "x/y". A '/' written %2F is part of a
 * segment (matching runs on the raw path), so it never ends one. First
 * match in table order wins; a GET route also serves HEAD unless a HEAD
 * route matches first.
 */
#include <stdlib.h>
#include <string.h>

#include "http_internal.h"

#define MAX_SEGS 64

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

char *mh__pct_decode(mh_arena_t *a, const char *p, size_t n, bool plus_space, size_t *outn)
{
    char *out = mh_alloc(a, n + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == '%') {
            if (i + 2 >= n) return NULL;
            int hi = hexval(p[i + 1]);
            int lo = hexval(p[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) return NULL;
            *o++ = (char)(hi * 16 + lo);
            i += 2;
        } else if (ch == '+' && plus_space) {
            *o++ = ' ';
        } else {
            *o++ = ch;
        }
    }
    *o = 0;
    if (outn) *outn = (size_t)(o - out);
    return out;
}

/* True when every '%' in p[0..n) starts a valid escape other than %00
 * (the rules of mh__pct_decode), so that a NULL from it means ENOMEM. */
static bool pct_ok(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] != '%') continue;
        if (i + 2 >= n) return false;
        int hi = hexval(p[i + 1]), lo = hexval(p[i + 2]);
        if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) return false;
        i += 2;
    }
    return true;
}

/* ------------------------------------------------------------- compile */

static int compile_one(route_rt_t *rt, const char *pat)
{
    if (!pat || pat[0] != '/') return MH_EINVAL;
    int n = 1;
    for (const char *p = pat + 1; *p; p++) n += *p == '/';
    if (n > MAX_SEGS) return MH_EINVAL;
    rt->segs = calloc((size_t)n, sizeof *rt->segs);
    rt->names = calloc((size_t)n, sizeof *rt->names);
    if (!rt->segs || !rt->names) return MH_ENOMEM;
    rt->nseg = n;
    rt->rest = -1;
    const char *p = pat + 1;
    int ncap = 0;
    for (int i = 0; i < n; i++) {
        const char *e = strchr(p, '/');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        struct seg *sg = &rt->segs[i];
        sg->p = p;
        sg->n = len;
        sg->kind = 0;
        if (len >= 2 && p[0] == '{' && p[len - 1] == '}') {
            bool rest = len >= 3 && p[1] == '*';
            if (rest && rt->rest >= 0) return MH_EINVAL; /* one rest capture per pattern */
            if (rest) rt->rest = i;
            const char *nm = p + (rest ? 2 : 1);
            size_t nl = len - (rest ? 3 : 2);
            if (!nl || ncap >= MH_MAX_PARAMS) return MH_EINVAL;
            rt->names[ncap] = strndup(nm, nl);
            if (!rt->names[ncap]) return MH_ENOMEM;
            ncap++;
            sg->kind = rest ? 2 : 1;
        }
        if (rt->rest >= 0 && rt->rest < i && sg->kind) return MH_EINVAL; /* only literals after {*name} */
        p += len + 1;
    }
    return 0;
}

int mh__routes_compile(mh_http_server_t *s)
{
    int n = 0;
    while (s->cfg.routes && s->cfg.routes[n].method) n++;
    s->nroutes = n;
    s->rt = calloc((size_t)n + 1, sizeof *s->rt);
    if (!s->rt) return MH_ENOMEM;
    for (int i = 0; i < n; i++) {
        int rc = compile_one(&s->rt[i], s->cfg.routes[i].pattern);
        if (rc) {
            mh_error("http: bad route pattern '%s'", s->cfg.routes[i].pattern ? s->cfg.routes[i].pattern : "(null)");
            return rc;
        }
        if (!s->cfg.routes[i].handler) return MH_EINVAL;
    }
    return 0;
}

void mh__routes_free(mh_http_server_t *s)
{
    if (!s->rt) return;
    for (int i = 0; i < s->nroutes; i++) {
        route_rt_t *rt = &s->rt[i];
        if (rt->names)
            for (int k = 0; k < rt->nseg; k++) free(rt->names[k]);
        free(rt->names);
        free(rt->segs);
    }
    free(s->rt);
    s->rt = NULL;
}

/* --------------------------------------------------------------- match */

typedef struct {
    const char *p;
    size_t n;
} pseg_t;

/* The path segments a {*name} at pattern segment i takes when the path
 * has nps segments: [i, i + span); span < 1 means no match. */
static int rest_span(const route_rt_t *rt, int nps) { return nps - (rt->nseg - 1); }

/* True when the split path (segments after the leading '/') matches rt. */
static bool seg_match(const route_rt_t *rt, const pseg_t *ps, int nps)
{
    int span = rt->rest >= 0 ? rest_span(rt, nps) : 1;
    if (span < 1 || (rt->rest < 0 && rt->nseg != nps)) return false;
    for (int i = 0, j = 0; i < rt->nseg; i++, j++) {
        const struct seg *sg = &rt->segs[i];
        if (sg->kind == 2) {
            /* The rest: one or more segments; not just a trailing '/'. */
            if (span == 1 && ps[j].n == 0) return false;
            j += span - 1;
        } else if (sg->kind == 1) {
            if (ps[j].n == 0) return false;
        } else if (sg->n != ps[j].n || memcmp(sg->p, ps[j].p, sg->n) != 0) {
            return false;
        }
    }
    return true;
}

static int fill_params(req_t *q, const route_rt_t *rt, const pseg_t *ps, int nps)
{
    mh_req_t *r = &q->r;
    int k = 0, span = rt->rest >= 0 ? rest_span(rt, nps) : 1;
    for (int i = 0, j = 0; i < rt->nseg; i++, j++) {
        const struct seg *sg = &rt->segs[i];
        const char *p = ps[j].p;
        size_t n = ps[j].n;
        if (sg->kind == 2) {
            j += span - 1;
            n = (size_t)(ps[j].p + ps[j].n - p); /* through the rest's last segment */
        }
        if (!sg->kind) continue;
        size_t on = n;
        bool pct = memchr(p, '%', n) != NULL;
        char *v = pct ? mh__pct_decode(&r->arena, p, n, false, &on) : mh_strndup(&r->arena, p, n);
        /* NULL is a bad escape (400) or out of memory (503): a client must
         * not be told its valid request was malformed. */
        if (!v) return pct && !pct_ok(p, n) ? 400 : 503;
        r->params[k] = (mh_str_t){v, on};
        r->param_names[k] = rt->names[k];
        k++;
    }
    r->nparams = k;
    return 0;
}

int mh__route_match(mh_http_server_t *s, req_t *q, const char **allow)
{
    mh_req_t *r = &q->r;
    *allow = NULL;
    const char *path = r->path.p, *end = path + r->path.n;
    if (r->path.n == 0 || path[0] != '/') return 404;
    pseg_t ps[MAX_SEGS];
    int nps = 0;
    for (const char *p = path + 1;;) {
        if (nps == MAX_SEGS) return 404;
        const char *e = memchr(p, '/', (size_t)(end - p));
        ps[nps].p = p;
        ps[nps].n = e ? (size_t)(e - p) : (size_t)(end - p);
        nps++;
        if (!e) break;
        p = e + 1;
    }

    bool is_head = strcmp(r->method, "HEAD") == 0;
    int exact = -1, get_fallback = -1;
    /* Methods of every matching route, for Allow. */
    const char *methods[16];
    int nm = 0;
    bool has_get = false, has_head = false;
    for (int i = 0; i < s->nroutes; i++) {
        if (!seg_match(&s->rt[i], ps, nps)) continue;
        const char *m = s->cfg.routes[i].method;
        if (exact < 0 && strcmp(m, r->method) == 0) exact = i;
        if (is_head && get_fallback < 0 && strcmp(m, "GET") == 0) get_fallback = i;
        has_get |= strcmp(m, "GET") == 0;
        has_head |= strcmp(m, "HEAD") == 0;
        bool dup = false;
        for (int k = 0; k < nm; k++) dup |= strcmp(methods[k], m) == 0;
        if (!dup && nm < 15) methods[nm++] = m;
    }
    int pick = exact >= 0 ? exact : get_fallback;
    if (pick < 0) {
        if (nm == 0) return 404;
        if (has_get && !has_head) methods[nm++] = "HEAD";
        size_t len = 1;
        for (int k = 0; k < nm; k++) len += strlen(methods[k]) + 2;
        char *a = mh_alloc(&r->arena, len);
        if (a) {
            char *o = a;
            for (int k = 0; k < nm; k++) {
                if (k) *o++ = ',', *o++ = ' ';
                size_t ml = strlen(methods[k]);
                memcpy(o, methods[k], ml);
                o += ml;
            }
            *o = 0;
            *allow = a;
        }
        return 405;
    }
    r->route = &s->cfg.routes[pick];
    q->metric = s->rt[pick].metric;
    return fill_params(q, &s->rt[pick], ps, nps);
}

/* ---------------------------------------------------------- accessors */

mh_str_t mh_req_param(const mh_req_t *r, const char *name)
{
    for (int i = 0; i < r->nparams; i++)
        if (strcmp(r->param_names[i], name) == 0) return r->params[i];
    return (mh_str_t){NULL, 0};
}

mh_str_t mh_req_query(mh_req_t *r, const char *name)
{
    const char *p = r->query.p, *end = p + r->query.n;
    size_t want = strlen(name);
    while (p && p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *e = amp ? amp : end;
        const char *eq = memchr(p, '=', (size_t)(e - p));
        const char *ke = eq ? eq : e;
        size_t kn = 0;
        char *k = memchr(p, '%', (size_t)(ke - p)) || memchr(p, '+', (size_t)(ke - p))
                      ? mh__pct_decode(&r->arena, p, (size_t)(ke - p), true, &kn)
                      : NULL;
        bool hit = k ? (kn == want && memcmp(k, name, want) == 0)
                     : ((size_t)(ke - p) == want && memcmp(p, name, want) == 0);
        if (hit) {
            const char *v = eq ? eq + 1 : e;
            size_t vn = 0;
            char *d = mh__pct_decode(&r->arena, v, (size_t)(e - v), true, &vn);
            return d ? (mh_str_t){d, vn} : (mh_str_t){NULL, 0};
        }
        p = amp ? amp + 1 : end;
    }
    return (mh_str_t){NULL, 0};
}
