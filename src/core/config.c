/*
 * config.c — environment + flag configuration (SPEC section 6).
 * One table lists every setting once: its variable, default, kind and
 * help text; loading, flag parsing and --help all read that table.
 */
#include "mh/config.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { K_STR, K_U32, K_U64, K_BOOL } kind_t;

typedef struct {
    const char *name; /* suffix of MUSEHUB_ */
    kind_t kind;
    size_t off;
    const char *dflt; /* NULL = unset */
    const char *help;
} setting_t;

#define S(name, kind, field, dflt, help) {name, kind, offsetof(mh_config_t, field), dflt, help}
static const setting_t settings[] = {
    S("LISTEN", K_STR, listen, "127.0.0.1:1337", "address and port to serve"),
    S("DATABASE_URL", K_STR, database_url, NULL, "libpq connection string or URI (required)"),
    S("DB_POOL", K_U32, db_pool, "8", "PostgreSQL connections per process"),
    S("STORE", K_STR, store, "fs:./var/store", "object store: fs:<dir> or s3:<bucket>"),
    S("S3_ENDPOINT", K_STR, s3_endpoint, NULL, "S3 endpoint, e.g. http://127.0.0.1:9000"),
    S("S3_REGION", K_STR, s3_region, "us-east-1", "S3 region"),
    S("S3_ACCESS_KEY", K_STR, s3_access_key, NULL, "S3 access key id"),
    S("S3_SECRET_KEY", K_STR, s3_secret_key, NULL, "S3 secret access key"),
    S("S3_PATH_STYLE", K_BOOL, s3_path_style, "1", "S3 path-style addressing (0: virtual-hosted)"),
    S("PUBLIC_URL", K_STR, public_url, NULL, "base of fs presigned URLs and links (default http://<listen>)"),
    S("WORKERS", K_U32, workers, "1", "processes sharing the port (SO_REUSEPORT)"),
    S("JOBS", K_BOOL, jobs, "1", "0: this process runs no jobs"),
    S("PRESIGN_TTL", K_U32, presign_ttl, "3600", "presigned URL lifetime, seconds (at most 604800)"),
    S("MAX_MPACK_BYTES", K_U64, max_mpack_bytes, "2147483648", "largest pack accepted, bytes"),
    S("SIGNING_SECRET", K_STR, signing_secret, NULL, "HMAC key of fs URLs (default: generated into the store dir)"),
    S("DEV_IDENTITY", K_STR, dev_identity, NULL,
      "handle of an admin identity unsigned requests act as (loopback only; development and tests)"),
    S("LOG_LEVEL", K_STR, log_level, "info", "debug, info, warn, error"),
    S("REQUEST_TIMEOUT_MS", K_U32, request_timeout_ms, "30000", "a request's headers and body must arrive within, ms"),
    S("IDLE_TIMEOUT_MS", K_U32, idle_timeout_ms, "60000", "idle keep-alive connections are closed after, ms"),
    S("QUERY_TIMEOUT_MS", K_U32, query_timeout_ms, "30000", "PostgreSQL statement timeout, ms"),
    S("MAX_BODY_BYTES", K_U64, max_body_bytes, "16777216", "largest API request body, bytes"),
    S("TRUSTED_PROXIES", K_STR, trusted_proxies, NULL,
      "comma-separated proxy IPs whose X-Forwarded-For gives the client address (rate limits)"),
    S("RATE_PUSH", K_U32, rate_push, "120", "push calls (presign, unpack) per identity or address per minute; 0 = off"),
    S("RATE_FETCH", K_U32, rate_fetch, "6000", "fetch calls per identity or address per minute; 0 = off"),
    /* Background jobs (SPEC 4.7, src/jobs/). */
    S("JOB_CONCURRENCY", K_U32, job_concurrency, "2", "jobs one process runs at once"),
    S("JOB_LEASE_SECONDS", K_U32, job_lease_seconds, "30",
      "job lease, renewed while the job runs; a dead worker's job is taken over after it"),
    S("JOB_RETENTION_HOURS", K_U32, job_retention_hours, "168", "finished jobs are deleted after, hours"),
    S("JOB_MAINTENANCE_SECONDS", K_U32, job_maintenance_seconds, "60",
      "period of pruning old jobs and sweeping superseded packs, seconds"),
    S("MPACK_GRACE_SECONDS", K_U32, mpack_grace_seconds, "3600",
      "packs superseded by GC stay in the store for, seconds (fetches in flight); also how long after its grant "
      "expired an abandoned staged upload is removed"),
    /* The pack-memory budget (SPEC 4.8, include/mh/budget.h). */
    S("PACK_MEMORY", K_U64, pack_memory, "268435456",
      "bytes of pack work (unpack, pack building, GC, uploads) one process holds at once (1048576 .. 2^48)"),
    S("PACK_QUEUE_TIMEOUT_MS", K_U32, pack_queue_timeout_ms, "10000",
      "pack work that does not fit the budget waits this long, then answers 503 (0: no wait), ms (at most 600000)"),
};
#define NSETTINGS (sizeof settings / sizeof settings[0])

static int set_value(mh_config_t *cfg, const setting_t *s, const char *v)
{
    void *field = (char *)cfg + s->off;
    char *end = NULL;
    switch (s->kind) {
    case K_STR:
        *(const char **)field = (v && *v) ? v : NULL;
        return 0;
    case K_BOOL:
        if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes")) *(bool *)field = true;
        else if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no")) *(bool *)field = false;
        else break;
        return 0;
    case K_U32: {
        unsigned long long x = strtoull(v, &end, 10);
        if (!*v || *end || x > UINT32_MAX) break;
        *(uint32_t *)field = (uint32_t)x;
        return 0;
    }
    case K_U64: {
        unsigned long long x = strtoull(v, &end, 10);
        if (!*v || *end) break;
        *(uint64_t *)field = (uint64_t)x;
        return 0;
    }
    }
    fprintf(stderr, "musehubd: bad value for MUSEHUB_%s: '%s'\n", s->name, v);
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
            char want = name[j];
            if (c == '-') c = '_';
            if (c >= 'a' && c <= 'z') c = (char)(c - 'a' + 'A');
            if (c != want) break;
        }
        if (j == n) return &settings[i];
    }
    return NULL;
}

/* Every comma-separated entry is an IPv4 or IPv6 address (spaces around
 * entries allowed). */
static bool proxies_valid(const char *list)
{
    const char *p = list;
    while (*p) {
        while (*p == ' ') p++;
        const char *e = p;
        while (*e && *e != ',' && *e != ' ') e++;
        char ip[INET6_ADDRSTRLEN];
        size_t n = (size_t)(e - p);
        unsigned char tmp[16];
        if (n == 0 || n >= sizeof ip) return false;
        memcpy(ip, p, n);
        ip[n] = 0;
        if (inet_pton(AF_INET, ip, tmp) != 1 && inet_pton(AF_INET6, ip, tmp) != 1) return false;
        while (*e == ' ') e++;
        if (*e == ',') {
            e++;
            if (!*e) return false;
        } else if (*e) {
            return false;
        }
        p = e;
    }
    return true;
}

int mh_config_load(mh_config_t *cfg, int argc, char **argv)
{
    memset(cfg, 0, sizeof *cfg);
    char var[64];
    for (size_t i = 0; i < NSETTINGS; i++) {
        const setting_t *s = &settings[i];
        snprintf(var, sizeof var, "MUSEHUB_%s", s->name);
        const char *v = getenv(var);
        if (!v && s->dflt) v = s->dflt;
        if (v && set_value(cfg, s, v)) return MH_EINVAL;
    }
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "musehubd: unexpected argument '%s'\n", a);
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
        if (!v) {
            fprintf(stderr, "musehubd: option '--%.*s' needs a value\n", (int)n, a);
            return MH_EINVAL;
        }
        if (set_value(cfg, s, v)) return MH_EINVAL;
    }
    if (cfg->presign_ttl < 1 || cfg->presign_ttl > 604800) {
        fprintf(stderr, "musehubd: MUSEHUB_PRESIGN_TTL must be within 1..604800 seconds\n");
        return MH_EINVAL;
    }
    if (cfg->trusted_proxies && !proxies_valid(cfg->trusted_proxies)) {
        fprintf(stderr, "musehubd: MUSEHUB_TRUSTED_PROXIES must be comma-separated IP addresses\n");
        return MH_EINVAL;
    }
    if (cfg->pack_memory < 1048576ull || cfg->pack_memory > (1ull << 48)) {
        fprintf(stderr, "musehubd: MUSEHUB_PACK_MEMORY must be within 1048576..2^48 bytes\n");
        return MH_EINVAL;
    }
    if (cfg->pack_queue_timeout_ms > 600000) {
        fprintf(stderr, "musehubd: MUSEHUB_PACK_QUEUE_TIMEOUT_MS must be within 0..600000\n");
        return MH_EINVAL;
    }
    if (cfg->db_pool < 1) cfg->db_pool = 1;
    if (cfg->workers < 1) cfg->workers = 1;
    return 0;
}

void mh_config_usage(void)
{
    fprintf(stderr, "Configuration (environment variable, or flag --name value):\n");
    for (size_t i = 0; i < NSETTINGS; i++) {
        const setting_t *s = &settings[i];
        char flag[64];
        size_t j = 0;
        for (; s->name[j] && j < sizeof flag - 1; j++)
            flag[j] = s->name[j] == '_' ? '-' : (char)(s->name[j] - 'A' + 'a');
        for (size_t k = 0; k < j; k++)
            if (s->name[k] >= '0' && s->name[k] <= '9') flag[k] = s->name[k];
        flag[j] = 0;
        fprintf(stderr, "  MUSEHUB_%-20s --%-20s %s%s%s%s\n", s->name, flag, s->help, s->dflt ? " [" : "",
                s->dflt ? s->dflt : "", s->dflt ? "]" : "");
    }
}
