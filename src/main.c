/*
 * main.c — argument parsing, subcommands and wiring (SPEC section 6); no
 * product logic lives here.
 *
 *   musehubd [serve]   migrations, then HTTP + jobs until SIGTERM/SIGINT
 *   musehubd migrate   migrations, then exit
 *   musehubd worker    jobs only
 *   musehubd identity add --handle H --public-key-file F [--admin] [--agent]
 *
 * With MUSEHUB_WORKERS=N > 1 the parent forks N serving children that
 * share the port with SO_REUSEPORT, forwards SIGTERM/SIGINT to them and
 * exits 0 when all have exited cleanly.
 */
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mh/auth.h"
#include "mh/config.h"
#include "mh/db.h"
#include "mh/hub.h"
#include "mh/jobs.h"


static void usage(void)
{
    fprintf(stderr,
            "musehubd — MuseHub server: push, fetch and collaborate on Muse repositories.\n"
            "\n"
            "Usage:\n"
            "  musehubd [serve] [--name value ...]   apply pending migrations, serve HTTP, run jobs\n"
            "  musehubd migrate [--name value ...]   apply pending migrations and exit\n"
            "  musehubd worker [--name value ...]    run background jobs only\n"
            "  musehubd identity add --handle H --public-key-file F [--admin] [--agent]\n"
            "                                        register an identity and its P-256 public key (PEM),\n"
            "                                        print the key id\n"
            "  musehubd --help | musehubd CMD --help\n"
            "\n");
    mh_config_usage();
    fprintf(stderr, "\nLogs go to stderr. SIGTERM/SIGINT: stop accepting, finish in-flight requests\n"
                    "(up to 30 s), release everything, exit 0.\n");
}

static bool wants_help(int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return true;
    return false;
}

/* ----------------------------------------------------------------- serve */

typedef struct {
    mh_hub_t hub;
    mh_jobs_t *jobs;   /* NULL when this process runs no jobs */
    int pending_stops; /* http and jobs still stopping */
    uv_signal_t sigterm, sigint;
    bool stopping;
} proc_t;

static void db_closed_cb(void *arg)
{
    proc_t *p = arg;
    /* The LISTEN callback keeps the runner until the pool is closed. */
    mh_jobs_free(p->jobs);
    p->jobs = NULL;
}

/* Once HTTP and the job runner have stopped: close the pool and the
 * store, and the signal handles, so the loop ends. */
static void part_stopped(proc_t *p)
{
    if (--p->pending_stops > 0) return;
    mh_fetch_cache_free(&p->hub);
    mh_hub_repo_cache_free(&p->hub);
    mh_hub_refs_cache_free();
    mh_auth_free(p->hub.auth);
    p->hub.auth = NULL;
    mh_db_close(p->hub.db, db_closed_cb, p);
    mh_store_close(p->hub.store);
    mh_budget_close(p->hub.budget);
    uv_close((uv_handle_t *)&p->sigterm, NULL);
    uv_close((uv_handle_t *)&p->sigint, NULL);
}

static void http_stopped_cb(void *arg)
{
    proc_t *p = arg;
    p->hub.http = NULL;
    part_stopped(p);
}

static void jobs_stopped_cb(void *arg)
{
    part_stopped(arg);
}

static void on_signal(uv_signal_t *h, int signum)
{
    proc_t *p = h->data;
    if (p->stopping) return;
    p->stopping = true;
    p->pending_stops = 1 + (p->hub.http ? 1 : 0);
    if (p->hub.http) {
        mh_info("signal %d: stopping (in-flight requests get up to 30 s)", signum);
        mh_http_stop(p->hub.http, 30000, http_stopped_cb, p);
    } else {
        mh_info("signal %d: stopping", signum);
    }
    if (p->jobs) mh_jobs_stop(p->jobs, jobs_stopped_cb, p);
    else part_stopped(p);
}

/* The job runner's settings from the configuration (SPEC 4.7, 6). */
static void jobs_config(const mh_config_t *cfg, mh_jobs_config_t *jc)
{
    memset(jc, 0, sizeof *jc);
    jc->concurrency = cfg->job_concurrency;
    jc->lease_s = cfg->job_lease_seconds;
    jc->retention_hours = cfg->job_retention_hours;
    jc->grace_s = cfg->mpack_grace_seconds;
    jc->maintenance_s = cfg->job_maintenance_seconds;
    jc->max_pack_bytes = cfg->max_mpack_bytes;
}

/* The budget is created with the store (open_store), before the runner. */
static void jobs_config_budget(proc_t *p, mh_jobs_config_t *jc)
{
    jc->budget = p->hub.budget;
}

static int start_jobs(proc_t *p, const mh_config_t *cfg)
{
    mh_jobs_config_t jc;
    jobs_config(cfg, &jc);
    jobs_config_budget(p, &jc);
    int rc = mh_jobs_start(p->hub.loop, p->hub.db, p->hub.store, &jc, &p->jobs);
    if (rc) mh_error("job runner: %s", mh_strerror(rc));
    return rc;
}

/* A loopback listen address: 127.0.0.0/8, ::1 or localhost. */
static bool is_loopback(const char *listen)
{
    if (!strncmp(listen, "localhost:", 10) || !strncmp(listen, "[::1]:", 6)) return true;
    char host[64];
    const char *colon = strrchr(listen, ':');
    size_t n = colon ? (size_t)(colon - listen) : strlen(listen);
    if (n >= sizeof host) return false;
    memcpy(host, listen, n);
    host[n] = 0;
    struct in_addr a;
    if (inet_pton(AF_INET, host, &a) != 1) return false;
    return (ntohl(a.s_addr) >> 24) == 127;
}

/* The database pool and the object store of a serving or worker process,
 * from the configuration; errors are logged, 1 is returned. */
static int open_db(mh_hub_t *hub, const mh_config_t *cfg)
{
    mh_db_config_t dbc = {.url = cfg->database_url, .pool_size = cfg->db_pool, .query_timeout_ms = cfg->query_timeout_ms};
    int rc = mh_db_open(hub->loop, &dbc, &hub->db);
    if (rc) mh_error("database pool: %s", mh_strerror(rc));
    return rc ? 1 : 0;
}

static int open_store(mh_hub_t *hub, const mh_config_t *cfg)
{
    mh_store_config_t sc = {
        .spec = cfg->store,
        .public_url = hub->public_url,
        .signing_secret = cfg->signing_secret,
        .s3_endpoint = cfg->s3_endpoint,
        .s3_region = cfg->s3_region,
        .s3_access_key = cfg->s3_access_key,
        .s3_secret_key = cfg->s3_secret_key,
        .s3_path_style = cfg->s3_path_style,
    };
    int rc = mh_store_open(hub->loop, &sc, &hub->store);
    if (rc) mh_error("object store '%s': %s", cfg->store, mh_strerror(rc));
    /* The process's pack-memory budget (SPEC 4.8), shared by HTTP and jobs. */
    if (!rc) rc = mh_budget_new(hub->loop, cfg->pack_memory, cfg->pack_queue_timeout_ms, &hub->budget);
    return rc ? 1 : 0;
}

static int serve_process(const mh_config_t *cfg)
{
    proc_t p;
    memset(&p, 0, sizeof p);
    uv_loop_t *loop = uv_default_loop();
    mh_hub_t *hub = &p.hub;
    hub->loop = loop;
    hub->cfg = cfg;
    hub->started_ms = mh_now_ms();
    if (cfg->public_url) snprintf(hub->public_url, sizeof hub->public_url, "%s", cfg->public_url);
    else snprintf(hub->public_url, sizeof hub->public_url, "http://%s", cfg->listen);
    size_t ul = strlen(hub->public_url);
    while (ul && hub->public_url[ul - 1] == '/') hub->public_url[--ul] = 0;

    if (cfg->dev_identity) {
        hub->has_dev_caller = true;
        hub->dev_caller.anonymous = false;
        hub->dev_caller.handle = cfg->dev_identity;
        hub->dev_caller.is_admin = true;
        mh_identity_id(cfg->dev_identity, strlen(cfg->dev_identity), &hub->dev_caller.identity_id);
    }

    if (open_db(hub, cfg)) return 1;
    int rc;
    rc = mh_auth_open(hub->db, cfg, &hub->auth);
    if (rc) {
        mh_error("authentication state: %s", mh_strerror(rc));
        return 1;
    }
    if (open_store(hub, cfg)) return 1;
    mh_http_config_t hc = {
        .listen = cfg->listen,
        .routes = mh_hub_routes,
        .app = hub,
        .default_max_body = cfg->max_body_bytes,
        .request_timeout_ms = cfg->request_timeout_ms,
        .idle_timeout_ms = cfg->idle_timeout_ms,
        .reuseport = cfg->workers > 1,
        .pre_route = mh_hub_pre_route,
    };
    rc = mh_http_start(loop, &hc, &hub->http);
    if (rc) {
        mh_error("cannot listen on %s: %s", cfg->listen, mh_strerror(rc));
        return 1;
    }
    if (cfg->jobs && start_jobs(&p, cfg)) return 1;
    uv_signal_init(loop, &p.sigterm);
    uv_signal_init(loop, &p.sigint);
    p.sigterm.data = p.sigint.data = &p;
    uv_signal_start(&p.sigterm, on_signal, SIGTERM);
    uv_signal_start(&p.sigint, on_signal, SIGINT);
    mh_info("musehubd serving on %s (store %s, public url %s, db pool %u)", cfg->listen, cfg->store,
            hub->public_url, cfg->db_pool);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    mh_info("musehubd stopped");
    return 0;
}

static int run_migrations(const mh_config_t *cfg)
{
    if (!cfg->database_url) {
        fprintf(stderr, "musehubd: MUSEHUB_DATABASE_URL (or --database-url) is required\n");
        return MH_EINVAL;
    }
    return mh_db_migrate(cfg->database_url, mh_migrations, mh_migrations_count);
}

static volatile sig_atomic_t parent_signal;
static void parent_on_signal(int sig) { parent_signal = sig; }

static int cmd_serve(int argc, char **argv)
{
    mh_config_t cfg;
    if (mh_config_load(&cfg, argc, argv)) return 2;
    mh_log_set_level(cfg.log_level);
    if (cfg.dev_identity) {
        if (!is_loopback(cfg.listen)) {
            mh_error("MUSEHUB_DEV_IDENTITY is only allowed on a loopback listen address (listen is %s)", cfg.listen);
            return 2;
        }
        /* Behind a reverse proxy the listener is loopback too, yet every
         * unsigned request from the internet would be this admin. */
        if (cfg.trusted_proxies && *cfg.trusted_proxies) {
            mh_error("MUSEHUB_DEV_IDENTITY is refused when MUSEHUB_TRUSTED_PROXIES is set: "
                     "requests arrive through a proxy, not from this machine");
            return 2;
        }
        mh_warn("MUSEHUB_DEV_IDENTITY=%s: unsigned requests act as this admin identity (development only)",
                cfg.dev_identity);
    }
    if (run_migrations(&cfg)) return 1;
    if (cfg.dev_identity && mh_hub_ensure_dev_identity(cfg.database_url, cfg.dev_identity)) return 1;
    if (cfg.workers <= 1) return serve_process(&cfg);

    /* N processes sharing the port (nginx-style workers). */
    pid_t *kids = calloc(cfg.workers, sizeof *kids);
    if (!kids) return 1;
    for (uint32_t i = 0; i < cfg.workers; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            mh_error("fork: %s", strerror(errno));
            return 1;
        }
        if (pid == 0) _exit(serve_process(&cfg));
        kids[i] = pid;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = parent_on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int failed = 0, alive = (int)cfg.workers;
    bool forwarded = false;
    while (alive > 0) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR) {
                if (parent_signal && !forwarded) {
                    forwarded = true;
                    for (uint32_t i = 0; i < cfg.workers; i++)
                        if (kids[i] > 0) kill(kids[i], SIGTERM);
                }
                continue;
            }
            break;
        }
        for (uint32_t i = 0; i < cfg.workers; i++)
            if (kids[i] == pid) kids[i] = 0;
        alive--;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            failed = 1;
            if (!forwarded) { /* one worker died: take the rest down cleanly */
                mh_error("worker %d ended abnormally; stopping", (int)pid);
                forwarded = true;
                for (uint32_t i = 0; i < cfg.workers; i++)
                    if (kids[i] > 0) kill(kids[i], SIGTERM);
            }
        }
    }
    free(kids);
    return failed;
}

static int cmd_migrate(int argc, char **argv)
{
    mh_config_t cfg;
    if (mh_config_load(&cfg, argc, argv)) return 2;
    mh_log_set_level(cfg.log_level);
    return run_migrations(&cfg) ? 1 : 0;
}

static sigset_t *worker_sigmask; /* the mask to restore once handlers are installed */

/* `musehubd worker`: the job runner alone (no HTTP), until SIGTERM/SIGINT;
 * any number of them may share a database and store with the servers. */
static int worker_process(const mh_config_t *cfg)
{
    proc_t p;
    memset(&p, 0, sizeof p);
    uv_loop_t *loop = uv_default_loop();
    mh_hub_t *hub = &p.hub;
    hub->loop = loop;
    hub->cfg = cfg;
    if (cfg->public_url) snprintf(hub->public_url, sizeof hub->public_url, "%s", cfg->public_url);
    else snprintf(hub->public_url, sizeof hub->public_url, "http://%s", cfg->listen);
    if (open_db(hub, cfg)) return 1;
    if (open_store(hub, cfg)) return 1;
    if (start_jobs(&p, cfg)) return 1;
    uv_signal_init(loop, &p.sigterm);
    uv_signal_init(loop, &p.sigint);
    p.sigterm.data = p.sigint.data = &p;
    uv_signal_start(&p.sigterm, on_signal, SIGTERM);
    uv_signal_start(&p.sigint, on_signal, SIGINT);
    if (worker_sigmask) sigprocmask(SIG_SETMASK, worker_sigmask, NULL); /* pending ones now reach the loop */
    mh_info("musehubd worker running jobs (store %s, db pool %u)", cfg->store, cfg->db_pool);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    mh_info("musehubd worker stopped");
    return 0;
}

static int cmd_worker(int argc, char **argv)
{
    mh_config_t cfg;
    if (mh_config_load(&cfg, argc, argv)) return 2;
    mh_log_set_level(cfg.log_level);
    /* A SIGTERM that arrives while starting up (migrations, connecting)
     * waits until the loop's handlers are installed, so a worker stopped
     * early still exits cleanly (0) instead of dying by the signal. */
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigprocmask(SIG_BLOCK, &set, &old);
    worker_sigmask = &old;
    if (run_migrations(&cfg)) return 1;
    return worker_process(&cfg);
}

/* -------------------------------------------------------------- identity */

static int cmd_identity(int argc, char **argv)
{
    if (argc < 1 || strcmp(argv[0], "add") != 0 || wants_help(argc, argv)) {
        fprintf(stderr, "Usage: musehubd identity add --handle H --public-key-file F [--admin] [--agent]\n"
                        "  Registers identity H (the first admin is made this way) with an ECDSA P-256\n"
                        "  public key in PEM (SubjectPublicKeyInfo) and prints the key id:\n"
                        "  sha256:<hex of SHA-256 of the DER SubjectPublicKeyInfo> (SPEC 1, 5).\n");
        return argc >= 1 && !strcmp(argv[0], "add") ? 0 : 2;
    }
    const char *handle = NULL, *keyfile = NULL;
    bool admin = false, agent = false;
    char *rest[64];
    int nrest = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--handle") && i + 1 < argc) handle = argv[++i];
        else if (!strcmp(argv[i], "--public-key-file") && i + 1 < argc) keyfile = argv[++i];
        else if (!strcmp(argv[i], "--admin")) admin = true;
        else if (!strcmp(argv[i], "--agent")) agent = true;
        else if (nrest < 64) rest[nrest++] = argv[i];
    }
    mh_config_t cfg;
    if (mh_config_load(&cfg, nrest, rest)) return 2;
    mh_log_set_level(cfg.log_level);
    if (!handle || !*handle || !keyfile) {
        fprintf(stderr, "musehubd identity add: --handle and --public-key-file are required\n");
        return 2;
    }
    if (!mh_handle_valid(handle, strlen(handle))) {
        fprintf(stderr, "musehubd identity add: bad handle '%s' (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)\n",
                handle);
        return 2;
    }
    /* The key file: read whole (a PEM is tiny), canonicalised to the DER
     * SubjectPublicKeyInfo whose hash is the key id (SPEC 1). */
    FILE *f = fopen(keyfile, "rb");
    char pem[8192];
    size_t pem_len = f ? fread(pem, 1, sizeof pem, f) : 0;
    if (f) fclose(f);
    uint8_t der[MH_SPKI_MAX];
    size_t der_len = 0;
    if (!pem_len || pem_len == sizeof pem || mh_p256_spki(pem, pem_len, der, sizeof der, &der_len)) {
        fprintf(stderr, "musehubd identity add: %s is not an ECDSA P-256 public key in PEM\n", keyfile);
        return 2;
    }
    mh_id_t key_id, ident_id;
    mh_blob_id(der, der_len, &key_id);
    mh_identity_id(handle, strlen(handle), &ident_id);
    if (run_migrations(&cfg)) return 1;
    PGconn *c = PQconnectdb(cfg.database_url);
    if (PQstatus(c) != CONNECTION_OK) {
        fprintf(stderr, "musehubd identity add: %s", PQerrorMessage(c));
        PQfinish(c);
        return 1;
    }
    /* Re-running is safe: flags only ever gain (an existing admin or agent
     * stays one); a key already registered to another identity is an
     * error, never silently re-bound. */
    const char *vals[6] = {ident_id.s, handle, admin ? "true" : "false", agent ? "true" : "false", key_id.s,
                           (const char *)der};
    int lens[6] = {0, 0, 0, 0, 0, (int)der_len};
    int fmts[6] = {0, 0, 0, 0, 0, 1};
    PGresult *res = PQexecParams(
        c,
        "WITH i AS (INSERT INTO identities (identity_id, handle, is_admin, is_agent) VALUES ($1, $2, $3, $4)"
        "  ON CONFLICT (handle) DO UPDATE SET is_admin = identities.is_admin OR EXCLUDED.is_admin,"
        "  is_agent = identities.is_agent OR EXCLUDED.is_agent RETURNING identity_id),"
        " k AS (INSERT INTO identity_keys (key_id, identity_id, public_key) SELECT $5, identity_id, $6 FROM i"
        "  ON CONFLICT (key_id) DO NOTHING RETURNING 1)"
        " SELECT (SELECT identity_id FROM identity_keys WHERE key_id = $5)",
        6, NULL, vals, lens, fmts, 0);
    int rc = 1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "musehubd identity add: %s", PQresultErrorMessage(res));
    } else if (!PQgetisnull(res, 0, 0) && strcmp(PQgetvalue(res, 0, 0), ident_id.s) != 0) {
        fprintf(stderr, "musehubd identity add: key %s already belongs to another identity\n", key_id.s);
    } else {
        printf("%s\n", key_id.s);
        rc = 0;
    }
    PQclear(res);
    PQfinish(c);
    return rc;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    const char *cmd = argc > 1 && strncmp(argv[1], "--", 2) != 0 ? argv[1] : "serve";
    int first = argc > 1 && strncmp(argv[1], "--", 2) != 0 ? 2 : 1;
    if (argc > 1 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help"))) {
        usage();
        return 0;
    }
    int sub_argc = argc - first;
    char **sub_argv = argv + first;
    if (!strcmp(cmd, "identity")) return cmd_identity(sub_argc, sub_argv);
    if (wants_help(sub_argc, sub_argv)) {
        usage();
        return 0;
    }
    if (!strcmp(cmd, "serve")) return cmd_serve(sub_argc, sub_argv);
    if (!strcmp(cmd, "migrate")) return cmd_migrate(sub_argc, sub_argv);
    if (!strcmp(cmd, "worker")) return cmd_worker(sub_argc, sub_argv);
    fprintf(stderr, "musehubd: unknown command '%s' (see musehubd --help)\n", cmd);
    return 2;
}
