/*
 * config.c — environment + flag configuration (SPEC section 6).
 *
 * One table lists every setting once: its variable, kind, default, help
 * text and what a valid value is (a numeric range, a list of words, or a
 * syntax check). Loading, flag parsing, validation and --help all read
 * that table, so a new setting is one line. Rules that tie several
 * settings together are a second, short table.
 *
 * Invariant: mh_config_load either returns a configuration in which every
 * value passed its check, or prints exactly one line and returns
 * MH_EINVAL; it has no other effect (no file, socket or database is
 * touched), so commands call it first and exit 2 on failure.
 *
 * The database URL is checked with libpq's own parser (PQconninfoParse:
 * no connection is made), so "bad URL" is found here rather than by the
 * first query.
 */
#include "mh/config.h"

#include <arpa/inet.h>
#include <libpq-fe.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

typedef enum { K_STR, K_U32, K_U64, K_BOOL, K_WORD } kind_t;

/* A syntax check of a non-empty string value: NULL when valid, else why
 * (a static phrase completing "musehubd: MUSEHUB_X='v': ..."). */
typedef const char *(*check_fn)(const char *v);

typedef struct {
    const char *name; /* suffix of MUSEHUB_ */
    kind_t kind;
    size_t off;
    const char *dflt; /* NULL = unset */
    const char *help;
    uint64_t min, max; /* K_U32/K_U64: inclusive; max 0 = the kind's maximum */
    const char *words; /* K_WORD: the allowed values, "a, b, c" */
    check_fn check;    /* K_STR: NULL = any value */
} setting_t;

static const char *check_listen(const char *v);
static const char *check_database_url(const char *v);
static const char *check_store(const char *v);
static const char *check_http_url(const char *v);
static const char *check_s3_endpoint(const char *v);
static const char *check_secret(const char *v);
static const char *check_proxies(const char *v);

#define OFF(field) offsetof(mh_config_t, field)
/* Plain: any value of the kind. */
#define S(name, kind, field, dflt, help) {name, kind, OFF(field), dflt, help, 0, 0, NULL, NULL}
/* A number within [min, max]. */
#define S_RANGE(name, kind, field, dflt, min, max, help) {name, kind, OFF(field), dflt, help, min, max, NULL, NULL}
/* One of a list of words (stored as the string). */
#define S_WORD(name, field, dflt, words, help) {name, K_WORD, OFF(field), dflt, help, 0, 0, words, NULL}
/* A string with a syntax check. */
#define S_CHECK(name, field, dflt, check, help) {name, K_STR, OFF(field), dflt, help, 0, 0, NULL, check}

static const setting_t settings[] = {
    S_CHECK("LISTEN", listen, "127.0.0.1:1337", check_listen, "address and port to serve"),
    S_CHECK("DATABASE_URL", database_url, NULL, check_database_url, "libpq connection string or URI (required)"),
    S_RANGE("DB_POOL", K_U32, db_pool, "8", 1, 1000, "PostgreSQL connections per process"),
    S_CHECK("STORE", store, "fs:./var/store", check_store, "object store: fs:<dir> or s3:<bucket>"),
    S_CHECK("S3_ENDPOINT", s3_endpoint, NULL, check_s3_endpoint, "S3 endpoint, e.g. http://127.0.0.1:9000"),
    S("S3_REGION", K_STR, s3_region, "us-east-1", "S3 region"),
    S("S3_ACCESS_KEY", K_STR, s3_access_key, NULL, "S3 access key id"),
    S("S3_SECRET_KEY", K_STR, s3_secret_key, NULL, "S3 secret access key"),
    S("S3_PATH_STYLE", K_BOOL, s3_path_style, "1", "S3 path-style addressing (0: virtual-hosted)"),
    S_CHECK("PUBLIC_URL", public_url, NULL, check_http_url,
            "base of fs presigned URLs and links (default http://<listen>)"),
    S_RANGE("WORKERS", K_U32, workers, "1", 1, 256, "processes sharing the port (SO_REUSEPORT)"),
    S("JOBS", K_BOOL, jobs, "1", "0: this process runs no jobs"),
    S_RANGE("PRESIGN_TTL", K_U32, presign_ttl, "3600", 1, 604800, "presigned URL lifetime, seconds (at most 604800)"),
    S_RANGE("MAX_MPACK_BYTES", K_U64, max_mpack_bytes, "2147483648", 1, 0, "largest pack accepted, bytes"),
    S_RANGE("MAX_UNPACKED_BYTES", K_U64, max_unpacked_bytes, "17179869184", 1, 0,
            "largest total decompressed size of one v2 pack (frames and meta), bytes"),
    S_CHECK("SIGNING_SECRET", signing_secret, NULL, check_secret,
            "HMAC key of fs URLs, at least 16 characters (default: generated into the store dir)"),
    S("DEV_IDENTITY", K_STR, dev_identity, NULL,
      "handle of an admin identity unsigned requests act as (loopback only; development and tests)"),
    S_WORD("LOG_LEVEL", log_level, "info", "debug, info, warn, error", "least severe log lines written"),
    S_WORD("LOG_FORMAT", log_format, "text", "text, json", "log lines as text, or one JSON object per line"),
    S_RANGE("REQUEST_TIMEOUT_MS", K_U32, request_timeout_ms, "30000", 1, 0,
            "a request's headers and body must arrive within, ms"),
    S_RANGE("IDLE_TIMEOUT_MS", K_U32, idle_timeout_ms, "60000", 1, 0, "idle keep-alive connections are closed after, ms"),
    S_RANGE("QUERY_TIMEOUT_MS", K_U32, query_timeout_ms, "30000", 1, 2147483647, "PostgreSQL statement timeout, ms"),
    S_RANGE("MAX_BODY_BYTES", K_U64, max_body_bytes, "16777216", 1, 0, "largest API request body, bytes"),
    S_CHECK("TRUSTED_PROXIES", trusted_proxies, NULL, check_proxies,
            "comma-separated proxy IPs whose X-Forwarded-For gives the client address (logs, rate limits)"),
    S("RATE_PUSH", K_U32, rate_push, "120", "push calls (presign, unpack) per identity or address per minute; 0 = off"),
    S("RATE_FETCH", K_U32, rate_fetch, "6000", "fetch calls per identity or address per minute; 0 = off"),
    /* Background jobs (SPEC 4.7, src/jobs/). */
    S_RANGE("JOB_CONCURRENCY", K_U32, job_concurrency, "2", 1, 1024, "jobs one process runs at once"),
    S_RANGE("JOB_LEASE_SECONDS", K_U32, job_lease_seconds, "30", 1, 86400,
            "job lease, renewed while the job runs; a dead worker's job is taken over after it"),
    S_RANGE("JOB_RETENTION_HOURS", K_U32, job_retention_hours, "168", 1, 0, "finished jobs are deleted after, hours"),
    S_RANGE("JOB_MAINTENANCE_SECONDS", K_U32, job_maintenance_seconds, "60", 1, 0,
            "period of pruning old jobs and sweeping superseded packs, seconds"),
    S_RANGE("MPACK_GRACE_SECONDS", K_U32, mpack_grace_seconds, "3600", 1, 0,
            "packs superseded by GC (and orphans found by fsck) stay in the store for, seconds; also how long after "
            "its grant expired an abandoned staged upload is removed"),
    S_RANGE("FETCH_CACHE_SECONDS", K_U32, fetch_cache_seconds, "86400", 1, 0,
            "built fetch answers are reused for, seconds; then the maintenance pass drops them and their packs "
            "follow after the grace period"),
    /* The pack-memory budget (SPEC 4.8, include/mh/budget.h). */
    S_RANGE("PACK_MEMORY", K_U64, pack_memory, "268435456", 1048576, 1ull << 48,
            "bytes of pack work (unpack, pack building, GC, uploads) one process holds at once"),
    S_RANGE("PACK_QUEUE_TIMEOUT_MS", K_U32, pack_queue_timeout_ms, "10000", 0, 600000,
            "pack work that does not fit the budget waits this long, then answers 503 (0: no wait), ms"),
    /* mpack v2 frames (SPEC 2.1): levels 1..19 (above, zstd's windows
     * outgrow what readers accept). */
    S_RANGE("ZSTD_LEVEL", K_U32, zstd_level, "3", 1, 19,
            "zstd level of the frames the server compresses for fetch packs and server-side commits"),
    S_RANGE("GC_ZSTD_LEVEL", K_U32, gc_zstd_level, "9", 1, 19,
            "zstd level of the frames of the packs GC consolidates (higher: smaller, slower, more memory)"),
};
#define NSETTINGS (sizeof settings / sizeof settings[0])

/* --------------------------------------------------------- syntax checks */

static bool all_digits(const char *p, size_t n)
{
    if (!n) return false;
    for (size_t i = 0; i < n; i++)
        if (p[i] < '0' || p[i] > '9') return false;
    return true;
}

static bool ip_literal(const char *p, size_t n)
{
    char ip[INET6_ADDRSTRLEN];
    unsigned char tmp[16];
    if (n == 0 || n >= sizeof ip) return false;
    memcpy(ip, p, n);
    ip[n] = 0;
    return inet_pton(AF_INET, ip, tmp) == 1 || inet_pton(AF_INET6, ip, tmp) == 1;
}

/* host:port, [v6]:port or :port; host names are resolved at bind time. */
static const char *check_listen(const char *v)
{
    const char *colon;
    if (v[0] == '[') {
        const char *rb = strchr(v, ']');
        if (!rb || rb[1] != ':' || !ip_literal(v + 1, (size_t)(rb - v - 1))) return "not [IPv6 address]:port";
        colon = rb + 1;
    } else {
        colon = strrchr(v, ':');
        if (!colon) return "not host:port";
        if (memchr(v, ':', (size_t)(colon - v))) return "an IPv6 address needs brackets: [addr]:port";
        for (const char *p = v; p < colon; p++)
            if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '.' ||
                  *p == '-'))
                return "not host:port";
    }
    const char *port = colon + 1;
    if (!all_digits(port, strlen(port)) || strlen(port) > 5 || atol(port) > 65535) return "the port is not 0..65535";
    return NULL;
}

static const char *check_database_url(const char *v)
{
    char *err = NULL;
    PQconninfoOption *o = PQconninfoParse(v, &err);
    bool ok = o != NULL;
    /* libpq checks the syntax, not the values: a port is checked here
     * (libpq would refuse it only when connecting). */
    for (PQconninfoOption *x = o; ok && x->keyword; x++)
        if (x->val && !strcmp(x->keyword, "port") && (!*x->val || strspn(x->val, "0123456789,") != strlen(x->val)))
            ok = false;
    PQconninfoFree(o);
    PQfreemem(err); /* libpq's message may quote the value (a password): not printed */
    return ok ? NULL : "not a libpq connection string or postgresql:// URI";
}

/* Bucket names: 3..63 of [a-z0-9.-] (plus A-Z and _ which path-style
 * stores accept); the s3 backend re-checks with the addressing style. */
static bool bucket_ok(const char *b)
{
    size_t n = strlen(b);
    if (n < 3 || n > 63) return false;
    for (size_t i = 0; i < n; i++) {
        char c = b[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '-' ||
              c == '_'))
            return false;
    }
    return true;
}

static const char *check_store(const char *v)
{
    if (!strncmp(v, "fs:", 3)) return v[3] ? NULL : "fs: needs a directory (fs:<dir>)";
    if (!strncmp(v, "s3:", 3)) return bucket_ok(v + 3) ? NULL : "s3: needs a bucket name (3-63 of a-z 0-9 . -)";
    return "not fs:<dir> or s3:<bucket>";
}

/* http[s]://host[:port] then anything; returns the end of the authority
 * in *rest, or NULL for another shape. */
static const char *authority(const char *v, const char **rest)
{
    const char *p;
    if (!strncmp(v, "http://", 7)) p = v + 7;
    else if (!strncmp(v, "https://", 8)) p = v + 8;
    else return NULL;
    size_t n = strcspn(p, "/?#");
    if (n == 0) return NULL;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '-' ||
              c == ':' || c == '[' || c == ']'))
            return NULL;
    }
    *rest = p + n;
    return p;
}

static const char *check_http_url(const char *v)
{
    const char *rest;
    if (!authority(v, &rest)) return "not an http:// or https:// URL";
    if (*rest && *rest != '/') return "a query or fragment is not allowed";
    return NULL;
}

static const char *check_s3_endpoint(const char *v)
{
    const char *rest;
    if (!authority(v, &rest)) return "not http[s]://host[:port]";
    if (*rest && strcmp(rest, "/") != 0) return "a path is not supported: http[s]://host[:port]";
    return NULL;
}

static const char *check_secret(const char *v)
{
    return strlen(v) >= 16 ? NULL : "shorter than 16 characters";
}

/* Every comma-separated entry is an IPv4 or IPv6 address (spaces around
 * entries allowed). */
static const char *check_proxies(const char *list)
{
    const char *p = list;
    while (*p) {
        while (*p == ' ') p++;
        const char *e = p;
        while (*e && *e != ',' && *e != ' ') e++;
        if (!ip_literal(p, (size_t)(e - p))) return "not comma-separated IP addresses";
        while (*e == ' ') e++;
        if (*e == ',') {
            e++;
            if (!*e) return "not comma-separated IP addresses";
        } else if (*e) {
            return "not comma-separated IP addresses";
        }
        p = e;
    }
    return NULL;
}

/* ------------------------------------------------------ rules across settings */

typedef const char *(*rule_fn)(const mh_config_t *c);

static const char *rule_s3_credentials(const mh_config_t *c)
{
    if (strncmp(c->store, "s3:", 3) != 0) return NULL;
    if (!c->s3_access_key || !c->s3_secret_key)
        return "MUSEHUB_STORE=s3:... needs MUSEHUB_S3_ACCESS_KEY and MUSEHUB_S3_SECRET_KEY";
    return NULL;
}

static const rule_fn rules[] = {rule_s3_credentials};

/* ------------------------------------------------------------- loading */

static int refuse(const char *src, const char *v, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int refuse(const char *src, const char *v, const char *fmt, ...)
{
    char why[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    /* Secrets are never echoed. */
    bool secret = strstr(src, "SECRET") || strstr(src, "secret") || strstr(src, "DATABASE_URL") ||
                  strstr(src, "database-url") || strstr(src, "database_url");
    if (secret || !v) fprintf(stderr, "musehubd: %s: %s\n", src, why);
    else fprintf(stderr, "musehubd: %s='%s': %s\n", src, v, why);
    return MH_EINVAL;
}

static bool word_in(const char *v, const char *words)
{
    size_t n = strlen(v);
    for (const char *p = words; *p;) {
        size_t k = strcspn(p, ",");
        if (k == n && !memcmp(p, v, n)) return true;
        p += k;
        while (*p == ',' || *p == ' ') p++;
    }
    return false;
}

/* Parses and checks one value; src names where it came from. */
static int set_value(mh_config_t *cfg, const setting_t *s, const char *src, const char *v)
{
    void *field = (char *)cfg + s->off;
    switch (s->kind) {
    case K_STR: {
        const char *why = (*v && s->check) ? s->check(v) : NULL;
        if (why) return refuse(src, v, "%s", why);
        *(const char **)field = *v ? v : NULL;
        return 0;
    }
    case K_WORD:
        if (!word_in(v, s->words)) return refuse(src, v, "not one of %s", s->words);
        *(const char **)field = v;
        return 0;
    case K_BOOL:
        if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes")) *(bool *)field = true;
        else if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no")) *(bool *)field = false;
        else return refuse(src, v, "not a boolean (1, true, yes, 0, false, no)");
        return 0;
    case K_U32:
    case K_U64: {
        uint64_t kmax = s->kind == K_U32 ? UINT32_MAX : UINT64_MAX;
        uint64_t lo = s->min, hi = s->max ? s->max : kmax;
        /* Digits only: strtoull would take "-1" as 2^64-1 and " 7" as 7. */
        errno = 0;
        unsigned long long x = all_digits(v, strlen(v)) ? strtoull(v, NULL, 10) : 0;
        if (!all_digits(v, strlen(v)) || errno == ERANGE || x > kmax)
            return refuse(src, v, "not a whole number (%llu..%llu)", (unsigned long long)lo, (unsigned long long)hi);
        if (x < lo || x > hi)
            return refuse(src, v, "out of range %llu..%llu", (unsigned long long)lo, (unsigned long long)hi);
        if (s->kind == K_U32) *(uint32_t *)field = (uint32_t)x;
        else *(uint64_t *)field = (uint64_t)x;
        return 0;
    }
    }
    return MH_EINVAL;
}

/* "--db-pool" / "--db_pool" -> setting "DB_POOL". */
static const setting_t *find_flag(const char *flag, size_t n)
{
    for (size_t i = 0; i < NSETTINGS; i++) {
        const char *name = settings[i].name;
        if (strlen(name) != n) continue;
        size_t j = 0;
        for (; j < n; j++) {
            char c = flag[j];
            if (c == '-') c = '_';
            if (c >= 'a' && c <= 'z') c = (char)(c - 'a' + 'A');
            if (c != name[j]) break;
        }
        if (j == n) return &settings[i];
    }
    return NULL;
}

int mh_config_load(mh_config_t *cfg, int argc, char **argv)
{
    memset(cfg, 0, sizeof *cfg);
    char var[64];
    for (size_t i = 0; i < NSETTINGS; i++) {
        const setting_t *s = &settings[i];
        snprintf(var, sizeof var, "MUSEHUB_%s", s->name);
        const char *v = getenv(var);
        if (v) {
            if (set_value(cfg, s, var, v)) return MH_EINVAL;
        } else if (s->dflt && set_value(cfg, s, var, s->dflt)) {
            return MH_EINVAL;
        }
    }
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "musehubd: unexpected argument '%s' (see --help)\n", a);
            return MH_EINVAL;
        }
        a += 2;
        const char *eq = strchr(a, '=');
        size_t n = eq ? (size_t)(eq - a) : strlen(a);
        const setting_t *s = find_flag(a, n);
        if (!s) {
            fprintf(stderr, "musehubd: unknown option '--%.*s' (see --help)\n", (int)n, a);
            return MH_EINVAL;
        }
        const char *v = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        char src[72];
        snprintf(src, sizeof src, "--%.*s", (int)n, a);
        if (!v) {
            fprintf(stderr, "musehubd: option '%s' needs a value\n", src);
            return MH_EINVAL;
        }
        if (set_value(cfg, s, src, v)) return MH_EINVAL;
    }
    for (size_t i = 0; i < sizeof rules / sizeof rules[0]; i++) {
        const char *why = rules[i](cfg);
        if (why) {
            fprintf(stderr, "musehubd: %s\n", why);
            return MH_EINVAL;
        }
    }
    return 0;
}

void mh_config_usage(FILE *out)
{
    fprintf(out, "Configuration (environment variable, or flag --name value):\n");
    for (size_t i = 0; i < NSETTINGS; i++) {
        const setting_t *s = &settings[i];
        char flag[64];
        size_t j = 0;
        for (; s->name[j] && j < sizeof flag - 1; j++) {
            char c = s->name[j];
            flag[j] = c == '_' ? '-' : (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
        }
        flag[j] = 0;
        fprintf(out, "  MUSEHUB_%-24s --%-24s %s", s->name, flag, s->help);
        if (s->kind == K_WORD) fprintf(out, " (%s)", s->words);
        if ((s->kind == K_U32 || s->kind == K_U64) && (s->min || s->max)) {
            if (s->max) fprintf(out, " (%llu..%llu)", (unsigned long long)s->min, (unsigned long long)s->max);
            else fprintf(out, " (at least %llu)", (unsigned long long)s->min);
        }
        if (s->dflt) fprintf(out, " [%s]", s->dflt);
        fputc('\n', out);
    }
}
