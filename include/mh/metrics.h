/*
 * metrics.h — one /metrics scrape for the whole server (SPEC 4.8), however
 * many worker processes (MUSEHUB_WORKERS) share the port. Part of the
 * http module (src/http/metrics.c).
 *
 * How: every module keeps its own counters and writes its own Prometheus
 * text (mh_http_metrics_write, mh_db_metrics_write, ...). The worker that
 * receives a scrape asks its siblings to write theirs, and merges all the
 * texts: samples with the same name and labels are added up (counters,
 * histogram buckets/sums/counts and gauges such as open connections are
 * all totals of the server), anything else is kept as it is. So any
 * module's lines — including ones added later — are whole-server with no
 * change here.
 *
 * The exchange is the one exception to "workers share no memory"
 * (DESIGN 1), as nginx's stub_status counters are: before forking, the
 * parent maps one shared region (mh_metrics_shared_init) with a slot per
 * worker. A scraping worker bumps a generation number, writes it into
 * each sibling's slot and sends it a signal; the sibling renders its text
 * into its slot (a seqlock guards the copy) and records the generation.
 * The scraper waits up to 250 ms, then merges whatever each sibling has
 * published (a sibling too busy to answer contributes its previous text,
 * so totals never go backwards). With one worker there is no region and
 * no signal: the scrape is the process's own text.
 *
 * Threads: everything here runs on the loop thread, except the signal
 * handler (async-signal-safe: it only wakes the loop with uv_async_send).
 */
#ifndef MH_METRICS_H
#define MH_METRICS_H

#include <uv.h>

#include "mh/core.h"

/* Writes one process's metrics text into out (appending); returns 0 or
 * MH_ENOMEM. */
typedef int (*mh_metrics_render_fn)(void *arg, mh_buf_t *out);

/* In the parent, before forking `nworkers` (> 1) serving processes: maps
 * the shared region (MAP_SHARED | MAP_ANONYMOUS, 4 MiB of text per
 * worker, committed only as used) and installs the wake-up signal's
 * handler, which the children inherit. Returns 0, MH_EINVAL (nworkers 0
 * or > 256), or a negative errno from mmap/sigaction. */
int mh_metrics_shared_init(uint32_t nworkers);

/* In a serving process (a forked worker, or the only process): this
 * process is worker `index` (0-based). With a shared region, starts
 * answering siblings' scrapes on `loop` (render(arg, ...) is called for
 * each) and publishes its pid. Returns 0, MH_EINVAL (index out of range),
 * or a libuv error. */
int mh_metrics_worker_start(uv_loop_t *loop, uint32_t index, mh_metrics_render_fn render, void *arg);

/* Stops answering (unpublishes the pid, closes the loop handle); call
 * when the process starts stopping. No-op when not started. */
void mh_metrics_worker_stop(void);

/* This process's worker index (0 when there is only one process). */
uint32_t mh_metrics_worker_index(void);

/* What a collection produced: the merged text of every worker that has
 * ever published (out, owned by the callback: mh_buf_free it or take it),
 * the number of workers the server runs, how many answered this scrape
 * (this one included) and how many contributed an older text because
 * they did not answer within 250 ms. out is NULL on ENOMEM. */
typedef struct {
    mh_buf_t *out;
    uint32_t workers, fresh, stale;
} mh_metrics_result_t;
typedef void (*mh_metrics_collect_cb)(void *ud, mh_metrics_result_t *res);

/* Collects the whole server's metrics: this process's text from
 * render(arg), its siblings' from their slots (after asking them), merged
 * with mh_metrics_merge. cb fires exactly once, on a later loop turn
 * (within about 250 ms). */
void mh_metrics_collect(uv_loop_t *loop, mh_metrics_render_fn render, void *arg, mh_metrics_collect_cb cb, void *ud);

/* Merges Prometheus text-format documents (version 0.0.4) into one:
 * families in order of first appearance, each with its first HELP and
 * TYPE line; samples with identical name and labels are added (exact
 * integer sums when every value is an integer). Comment lines other than
 * HELP/TYPE are dropped; a sample line that does not parse is dropped.
 * Appends to out. Returns 0 or MH_ENOMEM. */
int mh_metrics_merge(const mh_str_t *parts, size_t n, mh_buf_t *out);

/* Appends v as the inside of a Prometheus label value (\, " and newline
 * escaped). Returns 0 or MH_ENOMEM. */
int mh_metrics_label(mh_buf_t *out, const char *v);

/* Appends the process family lines of this process, labelled
 * worker="<index>": musehub_process_resident_memory_bytes,
 * musehub_process_open_fds, musehub_process_max_fds,
 * musehub_process_cpu_seconds_total (user + system, all threads),
 * musehub_process_start_time_seconds. Values come from /proc/self and
 * getrusage. Returns 0 or MH_ENOMEM. */
int mh_metrics_process_write(mh_buf_t *out);

#endif
