/*
 * bench_store.c — throughput and memory of the store's streams (include/
 * mh/store.h): writes one object of N MiB through the streaming writer
 * (the store hashing it), then reads it back through the sequential
 * reader, and prints MB/s and the process's resident memory during each
 * phase (sampled from /proc/self/status every 5 ms).
 *
 *   bench_store fs:<dir> [MiB]
 *   bench_store s3:<bucket> [MiB]    (MUSEHUB_S3_ENDPOINT, _ACCESS_KEY,
 *                                     _SECRET_KEY from the environment)
 *
 * The bytes come from a xorshift generator filling one 1 MiB buffer per
 * write, so no copy of the object is ever held by the benchmark itself:
 * the RSS growth is the store's. A benchmark, not a test: it asserts
 * nothing about speed (docs/benchmarks.md).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "mh/store.h"

static uv_loop_t *loop;
static uint64_t peak_kb;

static uint64_t rss_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    uint64_t kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) kb = strtoull(line + 6, NULL, 10);
    if (f) fclose(f);
    return kb;
}

static void sample_cb(uv_timer_t *t)
{
    (void)t;
    uint64_t kb = rss_kb();
    if (kb > peak_kb) peak_kb = kb;
}

typedef struct {
    int done, err;
    uint8_t sha[32];
    uint64_t size;
} wait_t;

static void room_cb(void *ud, int err)
{
    wait_t *w = ud;
    w->done = 1;
    w->err = err;
}

static void finished_cb(void *ud, int err, const uint8_t *sha, uint64_t size)
{
    wait_t *w = ud;
    w->done = 1;
    w->err = err;
    if (sha) memcpy(w->sha, sha, 32);
    w->size = size;
}

static void run_until(const int *done)
{
    while (!*done) uv_run(loop, UV_RUN_ONCE);
}

typedef struct {
    mh_store_reader_t *r;
    int done, err, windows;
    uint64_t bytes, sum;
} rd_t;

static void window_cb(void *ud, int err, const mh_store_window_t *w)
{
    rd_t *d = ud;
    if (err) {
        d->err = err;
        d->done = 1;
        return;
    }
    d->windows++;
    d->bytes += w->n;
    for (size_t i = 0; i < w->n; i += 4096) d->sum += w->p[i]; /* touch every page */
    if (w->last) d->done = 1;
    else mh_store_reader_next(d->r);
}

static double now_s(void)
{
    return (double)uv_hrtime() / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_store fs:<dir>|s3:<bucket> [MiB]\n");
        return 2;
    }
    uint64_t mib = argc > 2 ? strtoull(argv[2], NULL, 10) : 512;
    mh_log_set_level("warn");
    loop = uv_default_loop();
    mh_store_config_t cfg = {.spec = argv[1],
                             .public_url = "http://127.0.0.1:1",
                             .s3_endpoint = getenv("MUSEHUB_S3_ENDPOINT"),
                             .s3_region = "us-east-1",
                             .s3_access_key = getenv("MUSEHUB_S3_ACCESS_KEY"),
                             .s3_secret_key = getenv("MUSEHUB_S3_SECRET_KEY"),
                             .s3_path_style = true};
    mh_store_t *s = NULL;
    if (mh_store_open(loop, &cfg, &s) != 0) return 1;
    uv_timer_t sampler;
    uv_timer_init(loop, &sampler);
    uv_timer_start(&sampler, sample_cb, 5, 5);
    uv_unref((uv_handle_t *)&sampler);

    size_t piece = 1024 * 1024;
    uint8_t *buf = malloc(piece);
    uint64_t x = 88172645463325252ull, base_kb = rss_kb();
    peak_kb = base_kb;
    mh_store_writer_opts_t o = {.hash = true};
    mh_store_writer_t *w = NULL;
    if (mh_store_writer_open(s, &o, &w) != 0) return 1;
    double t0 = now_s();
    for (uint64_t i = 0; i < mib; i++) {
        uint64_t *q = (uint64_t *)buf;
        for (size_t k = 0; k < piece / 8; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            q[k] = x;
        }
        wait_t room = {0};
        if (mh_store_writer_write(w, buf, piece, room_cb, &room) != 0) return 1;
        run_until(&room.done);
        if (room.err) {
            fprintf(stderr, "write: %s\n", mh_strerror(room.err));
            return 1;
        }
    }
    wait_t fin = {0};
    mh_store_writer_finish(w, NULL, finished_cb, &fin);
    run_until(&fin.done);
    double tw = now_s() - t0;
    if (fin.err) {
        fprintf(stderr, "finish: %s\n", mh_strerror(fin.err));
        return 1;
    }
    uint64_t wpeak = peak_kb;
    char key[80], hex[65];
    mh_hex_encode(hex, fin.sha, 32);
    snprintf(key, sizeof key, "mpacks/%s", hex);
    printf("%s writer: %" PRIu64 " MiB in %.2f s = %.0f MB/s; RSS %.1f MiB at start, peak +%.1f MiB "
           "(writer holds at most %zu MiB)\n",
           mh_store_kind(s), mib, tw, (double)mib * 1048576 / 1e6 / tw, (double)base_kb / 1024,
           (double)(wpeak - base_kb) / 1024, mh_store_writer_mem(s, &o) >> 20);

    free(buf);
    base_kb = rss_kb();
    peak_kb = base_kb;
    rd_t d = {0};
    t0 = now_s();
    if (mh_store_reader_open(s, key, 0, UINT64_MAX, 0, window_cb, &d, &d.r) != 0) return 1;
    run_until(&d.done);
    double tr = now_s() - t0;
    mh_store_reader_close(d.r);
    if (d.err || d.bytes != mib * 1048576) {
        fprintf(stderr, "read: %s (%" PRIu64 " bytes)\n", mh_strerror(d.err), d.bytes);
        return 1;
    }
    printf("%s reader: %" PRIu64 " MiB in %.2f s = %.0f MB/s in %d windows; RSS %.1f MiB at start, peak +%.1f MiB "
           "(reader holds at most %zu MiB)\n",
           mh_store_kind(s), mib, tr, (double)mib * 1048576 / 1e6 / tr, d.windows, (double)base_kb / 1024,
           (double)(peak_kb - base_kb) / 1024, mh_store_reader_mem(0) >> 20);

    wait_t del = {0};
    mh_store_delete(s, key, room_cb, &del);
    run_until(&del.done);
    uv_close((uv_handle_t *)&sampler, NULL);
    mh_store_close(s);
    uv_run(loop, UV_RUN_DEFAULT);
    return 0;
}
