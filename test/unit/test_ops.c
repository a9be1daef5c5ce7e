/*
 * test_ops.c — the operating pieces that need no server: the Prometheus
 * text merge behind whole-server /metrics, the configuration checks,
 * JSON log lines, and fsck's location parser (issue 18; SPEC 4.8, 6).
 */
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../src/admin/admin_internal.h"
#include "mh/config.h"
#include "mh/metrics.h"
#include "tap.h"

/* ---------------------------------------------------------------- merge */

static char *merged(const char *const *texts, size_t n)
{
    mh_str_t parts[8];
    for (size_t i = 0; i < n; i++) parts[i] = (mh_str_t){texts[i], strlen(texts[i])};
    mh_buf_t out = {0};
    if (mh_metrics_merge(parts, n, &out) || mh_buf_append_byte(&out, 0)) {
        mh_buf_free(&out);
        return NULL;
    }
    return (char *)out.p;
}

static void test_merge(void)
{
    static const char *const a =
        "# HELP req_total Requests.\n# TYPE req_total counter\n"
        "req_total{route=\"a\",status=\"200\"} 3\nreq_total{route=\"b\",status=\"200\"} 1\n"
        "# HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n"
        "lat_seconds_bucket{le=\"0.1\"} 1\nlat_seconds_bucket{le=\"+Inf\"} 2\n"
        "lat_seconds_sum 0.25\nlat_seconds_count 2\n"
        "# HELP conns Open connections.\n# TYPE conns gauge\nconns 4\n"
        "# a comment that is dropped\n"
        "rss{worker=\"0\"} 100\n";
    static const char *const b =
        "# HELP req_total Requests.\n# TYPE req_total counter\n"
        "req_total{route=\"b\",status=\"200\"} 5\nreq_total{route=\"a\",status=\"404\"} 2\n"
        "req_total{route=\"a\",status=\"200\"} 4\n"
        "# HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n"
        "lat_seconds_bucket{le=\"0.1\"} 0\nlat_seconds_bucket{le=\"+Inf\"} 3\n"
        "lat_seconds_sum 0.5\nlat_seconds_count 3\n"
        "# HELP conns Open connections.\n# TYPE conns gauge\nconns 1\n"
        "rss{worker=\"1\"} 200\n"
        "this line is not a sample\n";
    const char *const both[] = {a, b};
    char *m = merged(both, 2);
    TAP_OK(m != NULL, "merge: two workers' texts merge");
    if (!m) return;
    TAP_OK(strstr(m, "req_total{route=\"a\",status=\"200\"} 7\n") != NULL, "merge: counters add up");
    TAP_OK(strstr(m, "req_total{route=\"b\",status=\"200\"} 6\n") != NULL, "merge: whatever the order of series");
    TAP_OK(strstr(m, "req_total{route=\"a\",status=\"404\"} 2\n") != NULL, "merge: a series one worker lacks is kept");
    TAP_OK(strstr(m, "lat_seconds_bucket{le=\"+Inf\"} 5\nlat_seconds_sum 0.75\nlat_seconds_count 5\n") != NULL,
           "merge: histogram buckets, sums and counts add up, in place");
    TAP_OK(strstr(m, "conns 5\n") != NULL, "merge: gauges are server totals");
    TAP_OK(strstr(m, "rss{worker=\"0\"} 100\n") && strstr(m, "rss{worker=\"1\"} 200\n"),
           "merge: per-worker series stay apart");
    const char *h = strstr(m, "# HELP req_total");
    TAP_OK(h && !strstr(h + 1, "# HELP req_total") && strstr(m, "# TYPE req_total counter\nreq_total{"),
           "merge: one HELP and TYPE per family, before its samples");
    TAP_OK(!strstr(m, "a comment") && !strstr(m, "not a sample"), "merge: other comments and junk lines dropped");
    TAP_OK(strstr(m, "# HELP lat_seconds") < strstr(m, "# HELP conns"), "merge: families keep their first order");
    free(m);

    static const char *const c = "x{path=\"a b}c\",q=\"say \\\"hi\\\"\"} 1.5\nbig 9007199254740993\ninf +Inf\n";
    static const char *const d = "x{path=\"a b}c\",q=\"say \\\"hi\\\"\"} 2.25\nbig 9007199254740993\ninf 1\n";
    const char *const cd[] = {c, d};
    m = merged(cd, 2);
    TAP_OK(m && strstr(m, "x{path=\"a b}c\",q=\"say \\\"hi\\\"\"} 3.75\n"),
           "merge: label values with spaces, braces and escaped quotes");
    TAP_OK(m && strstr(m, "big 18014398509481986\n"), "merge: integer sums are exact beyond 2^53");
    TAP_OK(m && strstr(m, "inf +Inf\n"), "merge: +Inf stays +Inf");
    free(m);

    const char *const one[] = {a};
    m = merged(one, 1);
    TAP_OK(m && strstr(m, "req_total{route=\"a\",status=\"200\"} 3\n") && strstr(m, "lat_seconds_sum 0.25\n"),
           "merge: one text comes out as it went in");
    free(m);
}

/* --------------------------------------------------------------- config */

static const char *const vars[] = {"MUSEHUB_LOG_LEVEL", "MUSEHUB_WORKERS",       "MUSEHUB_STORE",
                                   "MUSEHUB_DATABASE_URL", "MUSEHUB_S3_ACCESS_KEY", "MUSEHUB_S3_SECRET_KEY",
                                   "MUSEHUB_LISTEN",    "MUSEHUB_LOG_FORMAT",    "MUSEHUB_MAX_MPACK_BYTES"};

static void clear_env(void)
{
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) unsetenv(vars[i]);
}

/* mh_config_load with stderr silenced; returns its result. */
static int load(mh_config_t *cfg, int argc, char **argv)
{
    fflush(stderr);
    int saved = dup(2), null = open("/dev/null", O_WRONLY);
    dup2(null, 2);
    int rc = mh_config_load(cfg, argc, argv);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    close(null);
    return rc;
}

static void test_config(void)
{
    mh_config_t cfg;
    clear_env();
    TAP_EQ_INT(load(&cfg, 0, NULL), 0, "config: the defaults are valid");
    TAP_EQ_STR(cfg.log_level, "info", "config: default log level");
    TAP_EQ_STR(cfg.log_format, "text", "config: default log format");
    TAP_EQ_INT(cfg.workers, 1, "config: default workers");

    setenv("MUSEHUB_LOG_LEVEL", "verbose", 1);
    TAP_EQ_INT(load(&cfg, 0, NULL), MH_EINVAL, "config: MUSEHUB_LOG_LEVEL=verbose is refused");
    char *flags[] = {"--log-level", "debug"};
    TAP_EQ_INT(load(&cfg, 2, flags), MH_EINVAL, "config: a bad value in the environment fails even if a flag fixes it");
    setenv("MUSEHUB_LOG_LEVEL", "warn", 1);
    TAP_EQ_INT(load(&cfg, 2, flags), 0, "config: a flag overrides the environment");
    TAP_EQ_STR(cfg.log_level, "debug", "config: ... with its value");
    char *eqflag[] = {"--log-format=json"};
    TAP_EQ_INT(load(&cfg, 1, eqflag), 0, "config: --name=value");
    TAP_EQ_STR(cfg.log_format, "json", "config: ... sets the value");

    static const struct {
        const char *var, *value;
        int want;
    } cases[] = {
        {"MUSEHUB_WORKERS", "0", MH_EINVAL},       {"MUSEHUB_WORKERS", "257", MH_EINVAL},
        {"MUSEHUB_WORKERS", "4", 0},               {"MUSEHUB_WORKERS", " 4", MH_EINVAL},
        {"MUSEHUB_WORKERS", "4x", MH_EINVAL},      {"MUSEHUB_MAX_MPACK_BYTES", "-1", MH_EINVAL},
        {"MUSEHUB_MAX_MPACK_BYTES", "99999999999999999999", MH_EINVAL},
        {"MUSEHUB_LISTEN", "[::1]:8080", 0},       {"MUSEHUB_LISTEN", "::1:8080", MH_EINVAL},
        {"MUSEHUB_LISTEN", "localhost:80", 0},     {"MUSEHUB_LISTEN", "host:65536", MH_EINVAL},
        {"MUSEHUB_STORE", "fs:", MH_EINVAL},       {"MUSEHUB_STORE", "gs:bucket", MH_EINVAL},
        {"MUSEHUB_DATABASE_URL", "postgresql://u@h:5432/db", 0},
        {"MUSEHUB_DATABASE_URL", "host=/tmp dbname=x", 0},
        {"MUSEHUB_DATABASE_URL", "postgresql://u@h:port/db", MH_EINVAL},
        {"MUSEHUB_DATABASE_URL", "dbname=x nosuchoption=1", MH_EINVAL},
        {"MUSEHUB_LOG_FORMAT", "JSON", MH_EINVAL},
    };
    clear_env();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        setenv(cases[i].var, cases[i].value, 1);
        char name[160];
        snprintf(name, sizeof name, "config: %s='%s' -> %s", cases[i].var, cases[i].value,
                 cases[i].want ? "refused" : "accepted");
        TAP_EQ_INT(load(&cfg, 0, NULL), cases[i].want, name);
        unsetenv(cases[i].var);
    }

    setenv("MUSEHUB_STORE", "s3:musehub", 1);
    TAP_EQ_INT(load(&cfg, 0, NULL), MH_EINVAL, "config: an s3 store needs its keys");
    setenv("MUSEHUB_S3_ACCESS_KEY", "AK", 1);
    setenv("MUSEHUB_S3_SECRET_KEY", "SK", 1);
    TAP_EQ_INT(load(&cfg, 0, NULL), 0, "config: ... and with them it is accepted");
    clear_env();
}

/* ----------------------------------------------------------------- logs */

/* Runs fn with stderr captured; returns what was written (malloc'd). */
static char *capture(void (*fn)(void))
{
    int p[2];
    if (pipe(p)) return NULL;
    fflush(stderr);
    int saved = dup(2);
    dup2(p[1], 2);
    close(p[1]);
    fn();
    dup2(saved, 2);
    close(saved);
    char *buf = calloc(1, 1 << 16);
    ssize_t n = buf ? read(p[0], buf, (1 << 16) - 1) : 0;
    (void)n;
    close(p[0]);
    return buf;
}

static void log_some(void)
{
    mh_log_write(MH_LOG_WARN, "quote \" backslash \\ newline \n tab \t bell \a bad utf8 \xff\xfe end");
    const mh_log_field_t f[] = {MH_LF_S("event", "access"), MH_LF_I("status", 404), MH_LF_N("ms", 1.5),
                                MH_LF_S("user", NULL), MH_LF_S("path", "/caf\xc3\xa9")};
    mh_log_fields(MH_LOG_INFO, f, sizeof f / sizeof f[0], "GET %s", "/caf\xc3\xa9");
    char big[6000];
    memset(big, '"', sizeof big - 1);
    big[sizeof big - 1] = 0;
    mh_log_write(MH_LOG_ERROR, "%s", big);
}

static void test_logs(void)
{
    mh_log_set_format("json");
    char *out = capture(log_some);
    mh_log_set_format("text");
    TAP_OK(out != NULL, "logs: captured");
    if (!out) return;
    int lines = 0, parsed = 0;
    json_t *second = NULL;
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
        lines++;
        json_error_t e;
        json_t *j = json_loads(line, 0, &e);
        if (j && json_is_object(j) && json_string_value(json_object_get(j, "msg")) &&
            json_string_value(json_object_get(j, "ts")) && json_integer_value(json_object_get(j, "pid")) > 0)
            parsed++;
        if (lines == 1 && j) {
            TAP_EQ_STR(json_string_value(json_object_get(j, "level")), "warn", "logs: json level");
            const char *msg = json_string_value(json_object_get(j, "msg"));
            TAP_OK(msg && strstr(msg, "quote \" backslash \\ newline \n tab \t bell \a bad utf8 \xef\xbf\xbd"),
                   "logs: control characters escaped, bad UTF-8 replaced, the message survives");
        }
        if (lines == 2) second = json_incref(j);
        json_decref(j);
    }
    TAP_EQ_INT(lines, 3, "logs: one line per call, newlines inside messages escaped");
    TAP_EQ_INT(parsed, 3, "logs: every line is one JSON object with ts, level, pid, msg");
    TAP_OK(second && json_integer_value(json_object_get(second, "status")) == 404 &&
               json_real_value(json_object_get(second, "ms")) == 1.5 &&
               json_is_null(json_object_get(second, "user")) &&
               !strcmp(json_string_value(json_object_get(second, "path")), "/caf\xc3\xa9") &&
               !strcmp(json_string_value(json_object_get(second, "event")), "access"),
           "logs: fields are members of the object with their types");
    json_decref(second);
    free(out);

    out = capture(log_some);
    TAP_OK(out && strstr(out, " WARN [") && strstr(out, "] GET /caf\xc3\xa9\n") && !strstr(out, "\"status\""),
           "logs: the text format is the message alone");
    free(out);
}

/* ------------------------------------------------------------ locations */

static void test_locations(void)
{
    static const char id[] = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    char uri[256];
    mh__location_t l;
    snprintf(uri, sizeof uri, "mpack://%s#120:33", id);
    TAP_OK(mh__fsck_parse_location(uri, &l) && !strcmp(l.pack, id) && l.file_off == 120 && l.file_len == 33 &&
               l.blob_len == 33,
           "locations: a v1 byte range");
    snprintf(uri, sizeof uri, "mpack://%s#4096:1000/250:77", id);
    TAP_OK(mh__fsck_parse_location(uri, &l) && l.file_off == 4096 && l.file_len == 1000 && l.blob_len == 77,
           "locations: a v2 frame range (the frame's bytes in the file, the blob's length)");
    static const char *const bad[] = {
        "mpack://sha256:0123#1:2",
        "http://x#1:2",
        "mpack://%s",
        "mpack://%s#",
        "mpack://%s#1",
        "mpack://%s#1:",
        "mpack://%s#-1:2",
        "mpack://%s#1:2x",
        "mpack://%s#1:2/3",
        "mpack://%s#1:2/3:4/5:6",
        "mpack://%s#99999999999999999999:1",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(uri, sizeof uri, bad[i], id);
        TAP_OK(!mh__fsck_parse_location(uri, &l), "locations: '%s' is refused", bad[i]);
    }
}

int main(void)
{
    test_merge();
    test_config();
    test_logs();
    test_locations();
    return tap_done();
}
