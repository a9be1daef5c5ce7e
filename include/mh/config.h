/*
 * config.h — server configuration (SPEC section 6): read from the
 * environment (MUSEHUB_<NAME>), each overridable by a flag --<name> value
 * (lowercase, '_' or '-' accepted: --db-pool 4 == MUSEHUB_DB_POOL=4).
 *
 * Every value is checked when it is loaded (syntax, range, allowed words,
 * and the few rules that tie settings together), so a command refuses a
 * bad configuration with one line on stderr before it touches the
 * database, the store or the port.
 */
#ifndef MH_CONFIG_H
#define MH_CONFIG_H

#include <stdio.h>

#include "mh/core.h"

typedef struct {
    const char *listen;          /* MUSEHUB_LISTEN, "127.0.0.1:1337" */
    const char *database_url;    /* MUSEHUB_DATABASE_URL, required by serve/migrate/worker/identity/fsck */
    uint32_t db_pool;            /* MUSEHUB_DB_POOL, 8 */
    const char *store;           /* MUSEHUB_STORE, "fs:./var/store" */
    const char *s3_endpoint;     /* MUSEHUB_S3_ENDPOINT */
    const char *s3_region;       /* MUSEHUB_S3_REGION, "us-east-1" */
    const char *s3_access_key;   /* MUSEHUB_S3_ACCESS_KEY */
    const char *s3_secret_key;   /* MUSEHUB_S3_SECRET_KEY */
    bool s3_path_style;          /* MUSEHUB_S3_PATH_STYLE, 1 */
    const char *public_url;      /* MUSEHUB_PUBLIC_URL, "http://<listen>" */
    uint32_t workers;            /* MUSEHUB_WORKERS, 1 */
    bool jobs;                   /* MUSEHUB_JOBS, 1 */
    uint32_t presign_ttl;        /* MUSEHUB_PRESIGN_TTL seconds, 3600, at most 604800 */
    uint64_t max_mpack_bytes;    /* MUSEHUB_MAX_MPACK_BYTES, 2 GiB */
    uint64_t max_unpacked_bytes; /* MUSEHUB_MAX_UNPACKED_BYTES, 16 GiB: a v2 pack's decompressed total (SPEC 2.1) */
    const char *signing_secret;  /* MUSEHUB_SIGNING_SECRET, NULL = generated into the store dir */
    const char *dev_identity;    /* MUSEHUB_DEV_IDENTITY, NULL */
    const char *log_level;       /* MUSEHUB_LOG_LEVEL, "info": debug, info, warn, error */
    const char *log_format;      /* MUSEHUB_LOG_FORMAT, "text": text, json */
    uint32_t request_timeout_ms; /* MUSEHUB_REQUEST_TIMEOUT_MS, 30000 */
    uint32_t idle_timeout_ms;    /* MUSEHUB_IDLE_TIMEOUT_MS, 60000 */
    uint32_t query_timeout_ms;   /* MUSEHUB_QUERY_TIMEOUT_MS, 30000 */
    uint64_t max_body_bytes;     /* MUSEHUB_MAX_BODY_BYTES (API bodies), 16 MiB */
    const char *trusted_proxies; /* MUSEHUB_TRUSTED_PROXIES, comma-separated IPs whose X-Forwarded-For is honoured */
    uint32_t rate_push;          /* MUSEHUB_RATE_PUSH, push calls per identity/address per minute, 120; 0 = off */
    uint32_t rate_fetch;         /* MUSEHUB_RATE_FETCH, fetch calls per identity/address per minute, 6000; 0 = off */
    uint32_t job_concurrency;         /* MUSEHUB_JOB_CONCURRENCY, jobs run at once per process, 2 */
    uint32_t job_lease_seconds;       /* MUSEHUB_JOB_LEASE_SECONDS, 30 */
    uint32_t job_retention_hours;     /* MUSEHUB_JOB_RETENTION_HOURS, finished jobs kept for, 168 */
    uint32_t job_maintenance_seconds; /* MUSEHUB_JOB_MAINTENANCE_SECONDS, prune + sweep period, 60 */
    uint32_t mpack_grace_seconds;     /* MUSEHUB_MPACK_GRACE_SECONDS, superseded packs kept for, 3600 */
    uint32_t fetch_cache_seconds;     /* MUSEHUB_FETCH_CACHE_SECONDS, fetch answers kept for, 86400 */
    uint64_t pack_memory;             /* MUSEHUB_PACK_MEMORY, bytes of pack work per process, 256 MiB (SPEC 4.8) */
    uint32_t pack_queue_timeout_ms;   /* MUSEHUB_PACK_QUEUE_TIMEOUT_MS, longest wait for pack memory, 10000 */
    uint32_t zstd_level;              /* MUSEHUB_ZSTD_LEVEL, frames of fetch packs and server-side commits, 3 */
    uint32_t gc_zstd_level;           /* MUSEHUB_GC_ZSTD_LEVEL, frames of GC's consolidated packs, 9 */
} mh_config_t;

/* Fills cfg from the environment, then applies flags from argv[0..argc)
 * ("--name value" or "--name=value"), then checks every value: its
 * syntax, its range, its allowed words, and the rules between settings
 * (an s3 store needs both S3 keys). Strings point into the environment,
 * argv or static storage (never freed). Returns 0, or MH_EINVAL after
 * printing ONE line to stderr ("musehubd: MUSEHUB_X: ...", or "--x" when
 * the value came from a flag). SPEC 6. */
int mh_config_load(mh_config_t *cfg, int argc, char **argv);

/* Prints the variables, flags, defaults and meanings (for --help) to out. */
void mh_config_usage(FILE *out);

#endif
