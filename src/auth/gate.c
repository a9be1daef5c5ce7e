/*
 * gate.c — who is calling: the pre-route step and the request gate of
 * SPEC 5, the per-process cache of verified keys, rate limits.
 *
 * Flow of a signed request on a buffered route:
 *   pre_route (headers complete; synchronous): strict parse of
 *     Signature-Input / Signature, time window; 401 at once on failure;
 *     otherwise installs the gate (req->gate) and returns.
 *   gate (body complete; before the handler): Content-Digest against the
 *     body, key lookup (cache hit: synchronous; miss: one query), ECDSA
 *     over the rebuilt signature base, req->caller, for a state-changing
 *     request the replay record (one INSERT; 401 replayed when the base
 *     was accepted before), rate limit, then mh_req_continue runs the
 *     handler.
 * Unsigned requests get the dev identity or stay anonymous; their rate
 * limit is applied in pre_route already (the caller is known there).
 *
 * Invariants:
 *  - Every authentication failure answers a bare 401; the reason goes to
 *    the log only (never the signature or key bytes).
 *  - The key cache is a cache (DESIGN 1): entries live key_ttl_ms, so a
 *    revocation or an identity change made by any process is honoured
 *    here within that time; revocations made by this process drop the
 *    entry at once (mh_auth_forget_*).
 *  - A cache entry is used only synchronously; the caller copied into the
 *    request arena never points into the cache.
 *  - A state-changing signed request (any method but GET and HEAD; the
 *    fetch POST is a read) is accepted once per signature base, in every
 *    process and host: the record is a row of msign_replay (sql/0010),
 *    written before the handler runs, so a failure after it still
 *    consumes the signature (the client signs again, with a new created
 *    or nonce). If the record cannot be written the request is a 503:
 *    never accepted unchecked.
 */
#include <arpa/inet.h>
#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include "mh/auth.h"

#define NBUCKETS 1024 /* key-cache hash buckets (power of two) */

typedef struct key_entry key_entry_t;
struct key_entry {
    key_entry_t *next;
    char key_id[MH_ID_SIZE];
    mh_id_t identity_id;
    char *handle; /* heap */
    bool is_admin, is_agent;
    mh_p256_key_t *key;
    uint64_t fetched_ms;
    /* SHA-256 of (signature base || signature) of the last few requests
     * this key verified: an identical request (a retry, a load generator
     * replaying fixed headers) skips the ECDSA check. Replaying a signed
     * request within its time window is accepted anyway, so this changes
     * nothing about what is accepted, only what it costs. */
    uint8_t seen[8][32];
    unsigned nseen;
};

typedef struct {
    int af;
    uint8_t addr[16];
} ipaddr_t;

struct mh_auth {
    mh_db_t *db;
    uint32_t ttl_ms, max_keys;
    key_entry_t *buckets[NBUCKETS];
    uint32_t nkeys;
    mh_ratelimit_t *rl_push, *rl_fetch;
    ipaddr_t *proxies;
    size_t nproxies;
};

/* ----------------------------------------------------------- addresses */

/* Parses an IP address text; IPv4-mapped IPv6 addresses become IPv4 so a
 * dual-stack listener and a v4 proxy list agree. */
static bool ip_parse(const char *p, size_t n, ipaddr_t *out)
{
    char s[INET6_ADDRSTRLEN];
    if (n == 0 || n >= sizeof s) return false;
    memcpy(s, p, n);
    s[n] = 0;
    memset(out, 0, sizeof *out);
    if (inet_pton(AF_INET, s, out->addr) == 1) {
        out->af = AF_INET;
        return true;
    }
    if (inet_pton(AF_INET6, s, out->addr) != 1) return false;
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (!memcmp(out->addr, mapped, 12)) {
        memmove(out->addr, out->addr + 12, 4);
        memset(out->addr + 4, 0, 12);
        out->af = AF_INET;
    } else {
        out->af = AF_INET6;
    }
    return true;
}

static bool is_trusted(const mh_auth_t *au, const ipaddr_t *ip)
{
    for (size_t i = 0; i < au->nproxies; i++)
        if (au->proxies[i].af == ip->af && !memcmp(au->proxies[i].addr, ip->addr, 16)) return true;
    return false;
}

static int parse_proxies(mh_auth_t *au, const char *list)
{
    size_t cap = 1;
    for (const char *c = list; *c; c++) cap += *c == ',';
    au->proxies = calloc(cap, sizeof *au->proxies);
    if (!au->proxies) return MH_ENOMEM;
    const char *p = list;
    while (*p) {
        while (*p == ' ' || *p == ',') p++;
        const char *e = p;
        while (*e && *e != ',' && *e != ' ') e++;
        if (e == p) break;
        if (!ip_parse(p, (size_t)(e - p), &au->proxies[au->nproxies])) {
            mh_error("MUSEHUB_TRUSTED_PROXIES: '%.*s' is not an IP address", (int)(e - p), p);
            return MH_EINVAL;
        }
        au->nproxies++;
        p = e;
    }
    return 0;
}

const char *mh_auth_client_addr(mh_auth_t *au, mh_req_t *req)
{
    const char *peer = req->peer[0] ? req->peer : "unknown";
    ipaddr_t ip;
    if (!au || !au->nproxies || !ip_parse(req->peer, strlen(req->peer), &ip) || !is_trusted(au, &ip)) return peer;
    mh_str_t xff = mh_req_header(req, "x-forwarded-for");
    if (!xff.p) return peer;
    /* Right to left: each trusted proxy appended the address it saw, so
     * the first entry that is not a trusted proxy is the client as seen
     * by the outermost proxy we trust. Entries left of it are the
     * client's own claims and are ignored. */
    const char *end = xff.p + xff.n;
    while (end > xff.p) {
        const char *start = end;
        while (start > xff.p && start[-1] != ',') start--;
        const char *a = start, *b = end;
        while (a < b && (*a == ' ' || *a == '\t')) a++;
        while (b > a && (b[-1] == ' ' || b[-1] == '\t')) b--;
        if (!ip_parse(a, (size_t)(b - a), &ip)) return peer; /* garbage: do not trust anything further */
        if (!is_trusted(au, &ip)) {
            char *s = mh_strndup(&req->arena, a, (size_t)(b - a));
            return s ? s : peer;
        }
        end = start > xff.p ? start - 1 : start;
    }
    return peer;
}

/* ------------------------------------------------------------ key cache */

static uint32_t bucket_of(const char *key_id)
{
    /* Key ids are SHA-256 digests of keys an admin or the identity
     * registered: their hex is uniformly spread, so 8 hex digits suffice. */
    uint32_t h = 0;
    for (int i = 7; i < 15; i++) h = h * 16 + (uint32_t)(key_id[i] <= '9' ? key_id[i] - '0' : key_id[i] - 'a' + 10);
    return h & (NBUCKETS - 1);
}

static void entry_free(key_entry_t *e)
{
    mh_p256_key_free(e->key);
    free(e->handle);
    free(e);
}

static void cache_clear(mh_auth_t *au)
{
    for (int b = 0; b < NBUCKETS; b++) {
        while (au->buckets[b]) {
            key_entry_t *e = au->buckets[b];
            au->buckets[b] = e->next;
            entry_free(e);
        }
    }
    au->nkeys = 0;
}

/* Removes entries matching (key_id or identity_id) or, with both NULL,
 * expired entries. */
static void cache_drop(mh_auth_t *au, const char *key_id, const char *identity_id, uint64_t now)
{
    for (int b = 0; b < NBUCKETS; b++) {
        if (key_id && (uint32_t)b != bucket_of(key_id)) continue;
        key_entry_t **pp = &au->buckets[b];
        while (*pp) {
            key_entry_t *e = *pp;
            bool drop = key_id ? !strcmp(e->key_id, key_id)
                        : identity_id ? !strcmp(e->identity_id.s, identity_id)
                        : now - e->fetched_ms >= au->ttl_ms;
            if (drop) {
                *pp = e->next;
                entry_free(e);
                au->nkeys--;
            } else {
                pp = &e->next;
            }
        }
    }
}

static key_entry_t *cache_get(mh_auth_t *au, const char *key_id, uint64_t now)
{
    for (key_entry_t *e = au->buckets[bucket_of(key_id)]; e; e = e->next) {
        if (strcmp(e->key_id, key_id) != 0) continue;
        if (now - e->fetched_ms >= au->ttl_ms) {
            cache_drop(au, key_id, NULL, now);
            return NULL;
        }
        return e;
    }
    return NULL;
}

static void cache_put(mh_auth_t *au, key_entry_t *e, uint64_t now)
{
    cache_drop(au, e->key_id, NULL, now); /* a concurrent lookup may have put it already */
    if (au->nkeys >= au->max_keys) cache_drop(au, NULL, NULL, now);
    if (au->nkeys >= au->max_keys) cache_clear(au); /* all fresh: it is only a cache */
    uint32_t b = bucket_of(e->key_id);
    e->next = au->buckets[b];
    au->buckets[b] = e;
    au->nkeys++;
}

void mh_auth_forget_key(mh_auth_t *au, const char *key_id)
{
    if (au && key_id && mh_id_valid(key_id, strlen(key_id))) cache_drop(au, key_id, NULL, mh_now_ms());
}

void mh_auth_forget_identity(mh_auth_t *au, const char *identity_id)
{
    if (au && identity_id) cache_drop(au, NULL, identity_id, mh_now_ms());
}

/* ------------------------------------------------------------- lifecycle */

int mh_auth_new(mh_db_t *db, const mh_auth_config_t *cfg, mh_auth_t **out)
{
    mh_auth_t *au = calloc(1, sizeof *au);
    if (!au) return MH_ENOMEM;
    au->db = db;
    au->ttl_ms = cfg->key_ttl_ms ? cfg->key_ttl_ms : 5000;
    au->max_keys = cfg->max_keys ? cfg->max_keys : 4096;
    au->rl_push = mh_ratelimit_new(cfg->rate_push, 0);
    au->rl_fetch = mh_ratelimit_new(cfg->rate_fetch, 0);
    int rc = (!au->rl_push || !au->rl_fetch) ? MH_ENOMEM : 0;
    if (!rc && cfg->trusted_proxies) rc = parse_proxies(au, cfg->trusted_proxies);
    if (rc) {
        mh_auth_free(au);
        return rc;
    }
    *out = au;
    return 0;
}

void mh_auth_free(mh_auth_t *au)
{
    if (!au) return;
    cache_clear(au);
    mh_ratelimit_free(au->rl_push);
    mh_ratelimit_free(au->rl_fetch);
    free(au->proxies);
    free(au);
}

int mh_auth_open(mh_db_t *db, const mh_config_t *cfg, mh_auth_t **out)
{
    mh_auth_config_t ac = {
        .rate_push = cfg ? cfg->rate_push : 0,
        .rate_fetch = cfg ? cfg->rate_fetch : 0,
        .trusted_proxies = cfg ? cfg->trusted_proxies : NULL,
    };
    return mh_auth_new(db, &ac, out);
}

/* ------------------------------------------------------------ responses */

static void deny(mh_req_t *req, const char *why, const char *keyid)
{
    mh_info("req %s: 401 %s %.*s: %s%s%s", req->id, req->method, (int)req->path.n, req->path.p, why,
            keyid ? " keyid=" : "", keyid ? keyid : "");
    mh_res_error(req, 401, "unauthorized", "the request signature was not accepted");
}

/* Applies the route's rate limit to the caller; true when it answered 429. */
static bool rate_limited(mh_auth_t *au, mh_req_t *req, const mh_caller_t *caller)
{
    if (!au || !req->route || !req->route->name) return false;
    const char *rn = req->route->name;
    mh_ratelimit_t *rl = NULL;
    if (!strcmp(rn, "push_presign") || !strcmp(rn, "push_unpack")) rl = au->rl_push;
    else if (!strcmp(rn, "fetch")) rl = au->rl_fetch;
    if (!rl) return false;
    /* Admins (operators, CI, the dev identity) are not limited. */
    if (caller && !caller->anonymous && caller->is_admin) return false;
    const char *key = caller && !caller->anonymous ? caller->identity_id.s : mh_auth_client_addr(au, req);
    uint32_t wait = mh_ratelimit_take(rl, key, mh_now_ms());
    if (!wait) return false;
    char ra[16];
    snprintf(ra, sizeof ra, "%u", wait);
    mh_info("req %s: 429 %s for %s (retry after %s s)", req->id, rn,
            caller && !caller->anonymous ? caller->handle : key, ra);
    mh_res_header(req, "Retry-After", ra);
    mh_res_error(req, 429, "rate_limited", "too many requests; retry after %s seconds", ra);
    return true;
}

/* ------------------------------------------------------------ the gate */

typedef struct {
    mh_auth_t *au;
    mh_req_t *req;
    mh_msign_t sig;
    uint8_t base_hash[32]; /* SHA-256 of the signature base (replay record) */
} gate_t;

static mh_str_t content_digest(const mh_req_t *req) { return mh_req_header(req, "content-digest"); }

/* A database failure while authenticating: 503, never a 401. */
static void db_unavailable(mh_req_t *req, const char *what, int err, const char *errmsg)
{
    mh_error("req %s: %s: %s (%s)", req->id, what, mh_strerror(err), errmsg ? errmsg : "");
    mh_res_header(req, "Retry-After", "2");
    mh_res_error(req, 503, "unavailable", "the database is unavailable; retry shortly");
}

/* SPEC 5: GET and HEAD change nothing, and the fetch POST is a read. */
static bool changes_state(const mh_req_t *req)
{
    if (!strcmp(req->method, "GET") || !strcmp(req->method, "HEAD")) return false;
    return !(req->route && req->route->name && !strcmp(req->route->name, "fetch"));
}

/* The record, and a few expired ones swept on the way (index on
 * expires_at; the row being written is never among them). An existing
 * row for the base blocks the insert unless it has expired, in which case
 * it is reused: RETURNING yields a row exactly when this request is the
 * first within the window. */
static const mh_stmt_t st_replay = {
    "auth_replay_record",
    "WITH gone AS (DELETE FROM msign_replay WHERE base_hash IN (SELECT base_hash FROM msign_replay"
    " WHERE expires_at < now() AND base_hash <> decode($1, 'hex') ORDER BY expires_at LIMIT 8))"
    " INSERT INTO msign_replay (base_hash, key_id, expires_at) VALUES (decode($1, 'hex'), $2, to_timestamp($3))"
    " ON CONFLICT (base_hash) DO UPDATE SET key_id = EXCLUDED.key_id, expires_at = EXCLUDED.expires_at"
    " WHERE msign_replay.expires_at < now() RETURNING 1",
    3};

/* Seconds a record is kept past created + MH_MSIGN_MAX_SKEW: hosts'
 * clocks may differ from the database's by this much. */
#define REPLAY_MARGIN_S 120

static void replay_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    gate_t *g = ud;
    mh_req_t *req = g->req;
    if (err) {
        db_unavailable(req, "replay record", err, errmsg);
        return;
    }
    if (PQntuples(res) != 1) {
        mh_info("req %s: 401 %s %.*s: replayed keyid=%s", req->id, req->method, (int)req->path.n, req->path.p,
                g->sig.keyid);
        mh_res_error(req, 401, "replayed", "this signed request was accepted before; sign it again to repeat it");
        return;
    }
    if (rate_limited(g->au, req, req->caller)) return;
    mh_req_continue(req);
}

static void replay_record(gate_t *g)
{
    char hex[65], exp[24];
    mh_hex_encode(hex, g->base_hash, sizeof g->base_hash);
    snprintf(exp, sizeof exp, "%lld", (long long)(g->sig.created + MH_MSIGN_MAX_SKEW + REPLAY_MARGIN_S));
    const char *vals[3] = {hex, g->sig.keyid, exp};
    mh_db_exec(g->au->db, &st_replay, vals, NULL, NULL, replay_cb, g);
}

/* Verifies with a cached or freshly loaded key and lets the request on. */
static void finish(gate_t *g, key_entry_t *e)
{
    mh_req_t *req = g->req;
    mh_buf_t base = {0};
    int rc = mh_msign_base(&base, &g->sig, (mh_str_t){req->method, strlen(req->method)}, req->path, req->query,
                           content_digest(req));
    if (rc) {
        mh_buf_free(&base);
        if (rc == MH_ENOMEM) mh_res_error(req, 503, "unavailable", "out of memory");
        else deny(req, "a covered component contains a line break", g->sig.keyid);
        return;
    }
    uint8_t h[32];
    bool hashed = false, seen = false;
    mh_sha256(base.p, base.len, g->base_hash);
    if (!mh_buf_append(&base, g->sig.sig, sizeof g->sig.sig)) {
        mh_sha256(base.p, base.len, h);
        base.len -= sizeof g->sig.sig;
        hashed = true;
        for (unsigned i = 0; i < 8 && !seen; i++) seen = mh_ct_equal(e->seen[i], h, 32);
    }
    rc = seen ? 0 : mh_p256_verify(e->key, base.p, base.len, g->sig.sig);
    mh_buf_free(&base);
    if (rc) {
        deny(req, "bad signature", g->sig.keyid);
        return;
    }
    if (hashed && !seen) memcpy(e->seen[e->nseen++ % 8], h, 32);
    mh_caller_t *c = mh_calloc(&req->arena, sizeof *c);
    char *handle = mh_strdup(&req->arena, e->handle);
    if (!c || !handle) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    c->anonymous = false;
    c->identity_id = e->identity_id;
    c->handle = handle;
    c->is_admin = e->is_admin;
    c->is_agent = e->is_agent;
    req->caller = c;
    if (changes_state(req)) {
        replay_record(g); /* then the rate limit and the handler */
        return;
    }
    if (rate_limited(g->au, req, c)) return;
    mh_req_continue(req);
}

static const mh_stmt_t st_key = {
    "auth_key",
    "SELECT k.public_key, i.identity_id, i.handle, i.is_admin, i.is_agent"
    " FROM identity_keys k JOIN identities i ON i.identity_id = k.identity_id"
    " WHERE k.key_id = $1 AND k.revoked_at IS NULL",
    1};

static void key_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    gate_t *g = ud;
    mh_req_t *req = g->req;
    if (err) {
        db_unavailable(req, "key lookup", err, errmsg);
        return;
    }
    if (PQntuples(res) != 1) {
        deny(req, "unknown or revoked key", g->sig.keyid);
        return;
    }
    uint8_t *der = NULL;
    size_t dlen = 0;
    key_entry_t *e = calloc(1, sizeof *e);
    if (!e || mh_pq_bytea(&req->arena, res, 0, 0, &der, &dlen)) {
        free(e);
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    int rc = mh_p256_key_new(der, dlen, &e->key);
    e->handle = strdup(mh_pq_str(res, 0, 2));
    if (rc || !e->handle) {
        entry_free(e);
        if (rc == MH_EPARSE) deny(req, "stored key does not parse as P-256", g->sig.keyid);
        else mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    memcpy(e->key_id, g->sig.keyid, sizeof e->key_id);
    snprintf(e->identity_id.s, sizeof e->identity_id.s, "%s", mh_pq_str(res, 0, 1));
    e->is_admin = mh_pq_str(res, 0, 3)[0] == 't';
    e->is_agent = mh_pq_str(res, 0, 4)[0] == 't';
    e->fetched_ms = mh_now_ms();
    cache_put(g->au, e, e->fetched_ms);
    finish(g, e);
}

static void gate_cb(mh_req_t *req, void *arg)
{
    gate_t *g = arg;
    const char *why = NULL;
    int rc = mh_msign_check_body(&req->arena, &g->sig, content_digest(req), req->body.p, req->body.len, &why);
    if (rc == MH_ENOMEM) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    if (rc) {
        deny(req, why, g->sig.keyid);
        return;
    }
    key_entry_t *e = cache_get(g->au, g->sig.keyid, mh_now_ms());
    if (e) {
        finish(g, e);
        return;
    }
    const char *vals[1] = {g->sig.keyid};
    mh_db_exec(g->au->db, &st_key, vals, NULL, NULL, key_cb, g);
}

/* More than one field line of a header: SPEC 5 headers must appear once
 * (combining lines would change what was signed). */
static bool repeated(const mh_req_t *req, const char *lname)
{
    int n = 0;
    for (int i = 0; i < req->nheaders; i++)
        if (mh_str_eq(req->headers[i].name, lname)) n++;
    return n > 1;
}

void mh_auth_pre_route(mh_auth_t *au, mh_req_t *req, const mh_caller_t *dev)
{
    const mh_route_t *rt = req->route;
    /* Unrouted requests are answered 404/405 by the http layer; the fs
     * store's streaming PUT is authorised by its presigned URL. */
    if (!rt || rt->stream_body) return;
    mh_str_t si = mh_req_header(req, "signature-input"), sg = mh_req_header(req, "signature");
    if (!si.p && !sg.p) {
        if (dev) req->caller = (void *)dev;
        rate_limited(au, req, dev);
        return;
    }
    if (!au) {
        mh_res_error(req, 503, "unavailable", "authentication is unavailable");
        return;
    }
    if (repeated(req, "signature-input") || repeated(req, "signature") || repeated(req, "content-digest")) {
        deny(req, "a signature header appears more than once", NULL);
        return;
    }
    gate_t *g = mh_calloc(&req->arena, sizeof *g);
    if (!g) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    g->au = au;
    g->req = req;
    const char *why = NULL;
    int rc = mh_msign_parse(&req->arena, si, sg, &g->sig, &why);
    if (rc == MH_ENOMEM) {
        mh_res_error(req, 503, "unavailable", "out of memory");
        return;
    }
    if (!rc) rc = mh_msign_check_time(&g->sig, mh_unix_time(), &why);
    if (rc) {
        deny(req, why, g->sig.keyid[0] ? g->sig.keyid : NULL);
        return;
    }
    req->gate = gate_cb;
    req->gate_arg = g;
}
