/*
 * main.c — argument parsing, subcommands and wiring (SPEC section 6); no
 * product logic lives here.
 *
 *   musehubd [serve]   migrations, then HTTP + jobs until SIGTERM/SIGINT
 *   musehubd migrate   migrations, then exit
 *   musehubd worker    jobs only
 *   musehubd identity add|list|revoke ...   identities and keys (src/admin/)
 *   musehubd fsck [--repo OWNER/SLUG] [--repair]   consistency check (src/admin/)
 *   musehubd --version | --help | CMD --help
 *
 * Every command loads and checks the whole configuration first (a bad
 * value: one line on stderr, exit 2) before it touches the database, the
 * store or the port. Exit status: 0 success, 1 failure (or fsck found
 * problems), 2 bad usage or configuration.
 *
 * With MUSEHUB_WORKERS=N > 1 the parent maps the shared metrics region
 * (include/mh/metrics.h), forks N serving children that share the port
 * with SO_REUSEPORT, forwards SIGTERM/SIGINT to them and exits 0 when all
 * have exited cleanly.
 */
#include <arpa/inet.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mh/admin.h"
#include "mh/auth.h"
#include "mh/config.h"
#include "mh/db.h"
#include "mh/hub.h"
#include "mh/jobs.h"
#include "mh/metrics.h"

/* ------------------------------------------------------------------ help */

typedef struct {
    const char *name;
    const char *synopsis; /* after "musehubd " */
    const char *text;     /* what it does, options */
    bool config;          /* list the configuration after the text */
} cmd_help_t;

static const cmd_help_t helps[] = {
    {"serve", "[serve] [--name value ...]",
     "Applies pending migrations, serves HTTP on MUSEHUB_LISTEN and runs background jobs\n"
     "(MUSEHUB_JOBS=1) until SIGTERM/SIGINT: then it stops accepting, finishes in-flight\n"
     "requests (up to 30 s), hands running jobs back to the queue and exits 0.\n"
     "MUSEHUB_WORKERS=N forks N processes sharing the port.\n",
     true},
    {"migrate", "migrate [--name value ...]", "Applies pending database migrations and exits.\n", true},
    {"worker", "worker [--name value ...]",
     "Runs background jobs only (no HTTP), until SIGTERM/SIGINT. Any number of workers may\n"
     "share the database and store with the servers.\n",
     true},
    {"identity", "identity add|list|revoke ...",
     "Identities and their keys, on the database directly (no server needed):\n"
     "  identity add --handle H --public-key-file F [--admin] [--agent]\n"
     "      registers identity H with an ECDSA P-256 public key in PEM (the first admin is\n"
     "      made this way) and prints its key id: sha256:<hex of SHA-256 of the DER\n"
     "      SubjectPublicKeyInfo>. Flags only ever gain; a key of another identity is refused.\n"
     "  identity list [--handle H] [--json]\n"
     "      every identity (or H) and its keys, one line per key:\n"
     "      HANDLE FLAGS KEY_ID ADDED REVOKED; --json prints one JSON document.\n"
     "  identity revoke --key-id K\n"
     "      revokes key K (servers refuse it within 5 s); revoking twice keeps the first time.\n",
     true},
    {"fsck", "fsck [--repo OWNER/SLUG] [--repair] [--name value ...]",
     "Checks that the database and the object store agree: every branch head, ref row,\n"
     "snapshot delta and object location points at something that exists (database and\n"
     "store), every pack under mpacks/ is referenced or within MUSEHUB_MPACK_GRACE_SECONDS,\n"
     "and every staged upload under incoming/ belongs to a live push grant. Prints a report;\n"
     "exit 0 clean, 1 problems found (or the check could not complete), 2 bad usage.\n"
     "  --repo OWNER/SLUG  only that repository (its refs, locations, packs and uploads)\n"
     "  --repair           delete orphaned staged uploads and unreferenced packs past the\n"
     "                     grace period (nothing else); exit 0 when everything found was repaired\n"
     "Safe to run against a live server (one database snapshot; the store is listed after it).\n",
     true},
};

static const cmd_help_t *find_help(const char *name)
{
    for (size_t i = 0; i < sizeof helps / sizeof helps[0]; i++)
        if (!strcmp(helps[i].name, name)) return &helps[i];
    return NULL;
}

static void usage(FILE *out)
{
    fprintf(out, "musehubd %s — MuseHub server: push, fetch and collaborate on Muse repositories.\n\nUsage:\n",
            mh_version);
    for (size_t i = 0; i < sizeof helps / sizeof helps[0]; i++) fprintf(out, "  musehubd %s\n", helps[i].synopsis);
    fprintf(out, "  musehubd --version\n  musehubd --help | musehubd CMD --help\n\n");
    mh_config_usage(out);
    fprintf(out, "\nLogs go to stderr (MUSEHUB_LOG_FORMAT=json: one JSON object per line).\n"
                 "Exit status: 0 success, 1 failure (fsck: problems found), 2 bad usage or configuration.\n"
                 "Documentation: README.md and docs/ (operations.md, protocol.md) in the source tree.\n");
}

static void cmd_usage(const cmd_help_t *h, FILE *out)
{
    fprintf(out, "Usage: musehubd %s\n\n%s", h->synopsis, h->text);
    if (h->config) {
        fputc('\n', out);
        mh_config_usage(out);
    }
}

static bool wants_help(int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return true;
    return false;
}

/* Loads and checks the configuration and applies the log settings: 0,
 * or 2 (the one-line message is printed). */
static int load_config(mh_config_t *cfg, int argc, char **argv)
{
    if (mh_config_load(cfg, argc, argv)) return 2;
    mh_log_set_level(cfg->log_level);
    mh_log_set_format(cfg->log_format);
    return 0;
}

/* Commands that need the database refuse to start without its URL. */
static int need_database(const mh_config_t *cfg)
{
    if (cfg->database_url) return 0;
    fprintf(stderr, "musehubd: MUSEHUB_DATABASE_URL (or --database-url) is required\n");
    return 2;
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
    mh_metrics_worker_stop();
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
    jc->fetch_cache_s = cfg->fetch_cache_seconds;
    jc->max_pack_bytes = cfg->max_mpack_bytes;
    jc->max_unpacked = cfg->max_unpacked_bytes;
    jc->gc_level = cfg->gc_zstd_level;
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

/* One serving process: worker `index` of cfg->workers. */
static int serve_process(const mh_config_t *cfg, uint32_t index)
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
        .log_who = mh_hub_log_who,
    };
    rc = mh_http_start(loop, &hc, &hub->http);
    if (rc) {
        mh_error("cannot listen on %s: %s", cfg->listen, mh_strerror(rc));
        return 1;
    }
    if (cfg->jobs && start_jobs(&p, cfg)) return 1;
    rc = mh_metrics_worker_start(loop, index, mh_hub_metrics_render, hub);
    if (rc) {
        mh_error("metrics: %s", mh_strerror(rc));
        return 1;
    }
    uv_signal_init(loop, &p.sigterm);
    uv_signal_init(loop, &p.sigint);
    p.sigterm.data = p.sigint.data = &p;
    uv_signal_start(&p.sigterm, on_signal, SIGTERM);
    uv_signal_start(&p.sigint, on_signal, SIGINT);
    mh_info("musehubd %s (%s) serving on %s (worker %u of %u, store %s, public url %s, db pool %u)", mh_version,
            mh_git_commit, cfg->listen, index + 1, cfg->workers, cfg->store, hub->public_url, cfg->db_pool);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    mh_info("musehubd stopped");
    return 0;
}

static int run_migrations(const mh_config_t *cfg)
{
    return mh_db_migrate(cfg->database_url, mh_migrations, mh_migrations_count);
}

static volatile sig_atomic_t parent_signal;
static void parent_on_signal(int sig) { parent_signal = sig; }

static int cmd_serve(int argc, char **argv)
{
    mh_config_t cfg;
    int bad = load_config(&cfg, argc, argv);
    if (!bad) bad = need_database(&cfg);
    if (bad) return bad;
    if (cfg.dev_identity) {
        if (!mh_handle_valid(cfg.dev_identity, strlen(cfg.dev_identity))) {
            fprintf(stderr, "musehubd: MUSEHUB_DEV_IDENTITY='%s': not a handle (1-64 of A-Z a-z 0-9 . _ -)\n",
                    cfg.dev_identity);
            return 2;
        }
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
    if (cfg.workers <= 1) return serve_process(&cfg, 0);

    /* N processes sharing the port (nginx-style workers), and the region
     * through which a scrape of any of them reports all of them. */
    int rc = mh_metrics_shared_init(cfg.workers);
    if (rc) {
        mh_error("metrics: cannot map the region shared by the workers: %s", mh_strerror(rc));
        return 1;
    }
    pid_t *kids = calloc(cfg.workers, sizeof *kids);
    if (!kids) return 1;
    for (uint32_t i = 0; i < cfg.workers; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            mh_error("fork: %s", strerror(errno));
            return 1;
        }
        if (pid == 0) _exit(serve_process(&cfg, i));
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
    int bad = load_config(&cfg, argc, argv);
    if (!bad) bad = need_database(&cfg);
    if (bad) return bad;
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
    int bad = load_config(&cfg, argc, argv);
    if (!bad) bad = need_database(&cfg);
    if (bad) return bad;
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

/* ------------------------------------------------ identity and fsck */

/* Splits a command's own options from configuration flags: each of
 * `flags` (NULL-terminated) is a boolean, each of `opts` takes a value
 * (stored in *vals[i]); everything else goes to rest for mh_config_load.
 * Returns 0 or 2 (message printed). */
static int split_args(const char *cmd, int argc, char **argv, const char *const *flags, bool *const *set,
                      const char *const *opts, const char **const *vals, char **rest, int *nrest)
{
    *nrest = 0;
    for (int i = 0; i < argc; i++) {
        bool mine = false;
        for (int k = 0; flags && flags[k] && !mine; k++)
            if (!strcmp(argv[i], flags[k])) *set[k] = mine = true;
        for (int k = 0; opts && opts[k] && !mine; k++) {
            size_t n = strlen(opts[k]);
            if (!strncmp(argv[i], opts[k], n) && argv[i][n] == '=') {
                *vals[k] = argv[i] + n + 1;
                mine = true;
            } else if (!strcmp(argv[i], opts[k])) {
                if (i + 1 >= argc) {
                    fprintf(stderr, "musehubd %s: %s needs a value\n", cmd, opts[k]);
                    return 2;
                }
                *vals[k] = argv[++i];
                mine = true;
            }
        }
        if (!mine) rest[(*nrest)++] = argv[i];
    }
    return 0;
}

static int cmd_identity(int argc, char **argv)
{
    const cmd_help_t *h = find_help("identity");
    if (argc < 1 || wants_help(argc, argv)) {
        cmd_usage(h, argc < 1 ? stderr : stdout);
        return argc < 1 ? 2 : 0;
    }
    const char *sub = argv[0];
    char **rest = calloc((size_t)argc + 1, sizeof *rest);
    if (!rest) return 1;
    int nrest = 0, rc = 2;
    bool admin = false, agent = false, json = false;
    const char *handle = NULL, *keyfile = NULL, *key_id = NULL;
    mh_config_t cfg;
    if (!strcmp(sub, "add")) {
        rc = split_args("identity add", argc - 1, argv + 1, (const char *const[]){"--admin", "--agent", NULL},
                        (bool *const[]){&admin, &agent}, (const char *const[]){"--handle", "--public-key-file", NULL},
                        (const char **const[]){&handle, &keyfile}, rest, &nrest);
        if (!rc && (!handle || !*handle || !keyfile)) {
            fprintf(stderr, "musehubd identity add: --handle and --public-key-file are required\n");
            rc = 2;
        }
        if (!rc && !(rc = load_config(&cfg, nrest, rest)) && !(rc = need_database(&cfg)))
            rc = mh_admin_identity_add(&cfg, handle, keyfile, admin, agent, stdout);
    } else if (!strcmp(sub, "list")) {
        rc = split_args("identity list", argc - 1, argv + 1, (const char *const[]){"--json", NULL},
                        (bool *const[]){&json}, (const char *const[]){"--handle", NULL},
                        (const char **const[]){&handle}, rest, &nrest);
        if (!rc && !(rc = load_config(&cfg, nrest, rest)) && !(rc = need_database(&cfg)))
            rc = mh_admin_identity_list(&cfg, handle, json, stdout);
    } else if (!strcmp(sub, "revoke")) {
        rc = split_args("identity revoke", argc - 1, argv + 1, NULL, NULL, (const char *const[]){"--key-id", NULL},
                        (const char **const[]){&key_id}, rest, &nrest);
        if (!rc && !key_id) {
            fprintf(stderr, "musehubd identity revoke: --key-id is required\n");
            rc = 2;
        }
        if (!rc && !(rc = load_config(&cfg, nrest, rest)) && !(rc = need_database(&cfg)))
            rc = mh_admin_identity_revoke(&cfg, key_id, stdout);
    } else {
        fprintf(stderr, "musehubd identity: unknown subcommand '%s' (add, list, revoke; see musehubd identity --help)\n",
                sub);
    }
    free(rest);
    return rc;
}

static int cmd_fsck(int argc, char **argv)
{
    char **rest = calloc((size_t)argc + 1, sizeof *rest);
    if (!rest) return 1;
    int nrest = 0;
    mh_fsck_opts_t o = {NULL, false};
    mh_config_t cfg;
    int rc = split_args("fsck", argc, argv, (const char *const[]){"--repair", NULL}, (bool *const[]){&o.repair},
                        (const char *const[]){"--repo", NULL}, (const char **const[]){&o.repo}, rest, &nrest);
    if (!rc && !(rc = load_config(&cfg, nrest, rest)) && !(rc = need_database(&cfg))) rc = mh_fsck(&cfg, &o, stdout);
    free(rest);
    return rc;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    /* Buffers of 1 MiB and more (pack frames, read windows, writer chunks,
     * zstd contexts) are mapped and unmapped, so memory freed after pack
     * work goes back to the system at once. glibc's default threshold
     * grows with the first large buffers freed, after which they come
     * from the heap of the thread-pool thread that allocated them and
     * stay there: each pack build then left its frames' worth behind in
     * another thread's heap (docs/architecture.md, "The pack builder").
     * Setting it fixes it at 1 MiB. */
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
    if (argc > 1 && (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V") || !strcmp(argv[1], "version"))) {
        printf("musehubd %s (git %s)\n", mh_version, mh_git_commit);
        return 0;
    }
    if (argc > 1 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        usage(stdout);
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "help")) {
        const cmd_help_t *h = argc > 2 ? find_help(argv[2]) : NULL;
        if (h) cmd_usage(h, stdout);
        else usage(stdout);
        return 0;
    }
    bool named = argc > 1 && argv[1][0] != '-';
    const char *cmd = named ? argv[1] : "serve";
    int sub_argc = argc - (named ? 2 : 1);
    char **sub_argv = argv + (named ? 2 : 1);
    const cmd_help_t *h = find_help(cmd);
    if (!h) {
        fprintf(stderr, "musehubd: unknown command '%s' (see musehubd --help)\n", cmd);
        return 2;
    }
    if (!strcmp(cmd, "identity")) return cmd_identity(sub_argc, sub_argv);
    if (wants_help(sub_argc, sub_argv)) {
        cmd_usage(h, stdout);
        return 0;
    }
    if (!strcmp(cmd, "serve")) return cmd_serve(sub_argc, sub_argv);
    if (!strcmp(cmd, "migrate")) return cmd_migrate(sub_argc, sub_argv);
    if (!strcmp(cmd, "worker")) return cmd_worker(sub_argc, sub_argv);
    return cmd_fsck(sub_argc, sub_argv);
}
