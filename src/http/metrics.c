/*
 * metrics.c — whole-server /metrics across worker processes (SPEC 4.8;
 * include/mh/metrics.h): the shared region of per-worker text slots, the
 * wake-up signal, collection with a deadline, the Prometheus text merge
 * and the process family.
 *
 * Invariants:
 *  - A slot is written only by its worker, only on that worker's loop
 *    thread, under a seqlock (seq odd while writing); readers copy and
 *    retry when seq moved. `done` is stored after the text is complete.
 *  - The signal handler is installed by the parent before fork and never
 *    removed, so a worker can never be killed by a scrape's signal (its
 *    default action would terminate). It only calls uv_async_send, which
 *    libuv documents as async-signal-safe, on a handle published with an
 *    atomic store (NULL while there is none).
 *  - A pid is published in a slot only once its worker answers signals,
 *    and cleared before it stops answering.
 */
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <dirent.h>
#include <time.h>
#include <unistd.h>

#include "mh/metrics.h"

#define SLOT_TEXT (4u << 20)      /* bytes of text per worker */
#define MAX_WORKERS 256
#define COLLECT_WAIT_MS 250       /* how long a scrape waits for siblings */
#define COLLECT_POLL_MS 1

typedef struct {
    int32_t pid;       /* 0 until the worker answers signals */
    uint32_t truncated;
    uint64_t want;     /* highest generation asked of this worker */
    uint64_t done;     /* generation of the text in the slot (0: none yet) */
    uint64_t seq;      /* seqlock: odd while the text is being written */
    uint64_t len;
    char text[SLOT_TEXT];
} slot_t;

typedef struct {
    uint64_t gen;
    uint32_t n;
    uint32_t pad;
    slot_t slots[];
} shared_t;

static shared_t *shared;       /* NULL: one process, nothing shared */
static uint32_t self_index;
static uv_async_t wake;
static uv_async_t *wake_live;  /* read by the signal handler */
static bool wake_open;
static mh_metrics_render_fn self_render;
static void *self_arg;
static double start_time_s;

static int metrics_signal(void) { return SIGRTMIN + 4; }

/* ------------------------------------------------------------ helpers */

static uint64_t ld(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static void st(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static void on_signal(int sig)
{
    (void)sig;
    uv_async_t *a = __atomic_load_n(&wake_live, __ATOMIC_ACQUIRE);
    if (a) uv_async_send(a);
}

/* ------------------------------------------------------ shared region */

int mh_metrics_shared_init(uint32_t nworkers)
{
    if (nworkers == 0 || nworkers > MAX_WORKERS) return MH_EINVAL;
    size_t size = sizeof(shared_t) + (size_t)nworkers * sizeof(slot_t);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -errno;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(metrics_signal(), &sa, NULL)) {
        int e = -errno;
        munmap(p, size);
        return e;
    }
    shared = p;
    shared->n = nworkers;
    return 0;
}

/* Renders this worker's text into its slot (seqlock) and records the
 * generation it answers. */
static void publish(void)
{
    slot_t *sl = &shared->slots[self_index];
    uint64_t want = ld(&sl->want);
    mh_buf_t b = {0};
    int rc = self_render(self_arg, &b);
    if (rc) {
        mh_buf_free(&b);
        mh_warn("metrics: out of memory rendering for a sibling's scrape");
        return;
    }
    size_t len = b.len;
    uint32_t trunc = 0;
    if (len > SLOT_TEXT) {
        /* Never expected (a worker's text is ~100 KiB); keep whole lines. */
        len = SLOT_TEXT;
        while (len && b.p[len - 1] != '\n') len--;
        trunc = 1;
    }
    uint64_t seq = ld(&sl->seq);
    st(&sl->seq, seq + 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    memcpy(sl->text, b.p, len);
    sl->truncated = trunc;
    st(&sl->len, len);
    st(&sl->seq, seq + 2);
    st(&sl->done, want);
    mh_buf_free(&b);
}

static void on_wake(uv_async_t *a)
{
    (void)a;
    if (shared && self_render) publish();
}

int mh_metrics_worker_start(uv_loop_t *loop, uint32_t index, mh_metrics_render_fn render, void *arg)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    start_time_s = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    self_index = index;
    self_render = render;
    self_arg = arg;
    if (!shared) return index == 0 ? 0 : MH_EINVAL;
    if (index >= shared->n) return MH_EINVAL;
    int rc = uv_async_init(loop, &wake, on_wake);
    if (rc) return rc;
    wake_open = true;
    __atomic_store_n(&wake_live, &wake, __ATOMIC_RELEASE);
    /* A text right away, so a scrape that catches this worker busy still
     * has its numbers. */
    publish();
    __atomic_store_n(&shared->slots[index].pid, (int32_t)getpid(), __ATOMIC_RELEASE);
    return 0;
}

void mh_metrics_worker_stop(void)
{
    if (!wake_open) return;
    __atomic_store_n(&shared->slots[self_index].pid, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&wake_live, NULL, __ATOMIC_RELEASE);
    uv_close((uv_handle_t *)&wake, NULL);
    wake_open = false;
}

uint32_t mh_metrics_worker_index(void) { return self_index; }

/* Copies a sibling's published text (retrying while it is rewritten);
 * false when it has none. */
static bool read_slot(slot_t *sl, mh_buf_t *out)
{
    for (int tries = 0; tries < 1000; tries++) {
        uint64_t s1 = ld(&sl->seq);
        if (s1 & 1) continue;
        if (!ld(&sl->done)) return false;
        uint64_t len = ld(&sl->len);
        if (len > SLOT_TEXT) len = SLOT_TEXT;
        out->len = 0;
        if (mh_buf_reserve(out, len)) return false;
        memcpy(out->p, sl->text, len);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (ld(&sl->seq) == s1) {
            out->len = len;
            return true;
        }
    }
    return false;
}

/* ----------------------------------------------------------- collect */

typedef struct {
    uv_timer_t timer;
    mh_metrics_collect_cb cb;
    void *ud;
    mh_buf_t own;
    int own_rc;
    uint64_t gen;
    uint64_t deadline;
    uint32_t asked; /* siblings signalled */
} collect_t;

static void collect_closed(uv_handle_t *h)
{
    collect_t *c = h->data;
    mh_buf_free(&c->own);
    free(c);
}

static void collect_finish(collect_t *c)
{
    uv_timer_stop(&c->timer);
    uint32_t n = shared ? shared->n : 1;
    mh_str_t *parts = calloc(n, sizeof *parts);
    mh_buf_t *bufs = calloc(n, sizeof *bufs);
    mh_buf_t *out = calloc(1, sizeof *out);
    mh_metrics_result_t res = {NULL, n, 1, 0};
    size_t np = 0;
    if (parts && bufs && out && !c->own_rc) {
        parts[np++] = (mh_str_t){(const char *)c->own.p, c->own.len};
        for (uint32_t i = 0; shared && i < n; i++) {
            if (i == self_index) continue;
            slot_t *sl = &shared->slots[i];
            bool fresh = ld(&sl->done) >= c->gen;
            if (!read_slot(sl, &bufs[i])) continue;
            parts[np++] = (mh_str_t){(const char *)bufs[i].p, bufs[i].len};
            if (fresh) res.fresh++;
            else res.stale++;
        }
        if (!mh_metrics_merge(parts, np, out)) res.out = out;
    }
    if (!res.out) {
        if (out) mh_buf_free(out);
        free(out);
        out = NULL;
    }
    for (uint32_t i = 0; bufs && i < n; i++) mh_buf_free(&bufs[i]);
    free(bufs);
    free(parts);
    c->cb(c->ud, &res);
    if (out) {
        mh_buf_free(out); /* whatever the callback did not take */
        free(out);
    }
    uv_close((uv_handle_t *)&c->timer, collect_closed);
}

static void collect_tick(uv_timer_t *t)
{
    collect_t *c = t->data;
    bool all = true;
    for (uint32_t i = 0; shared && i < shared->n && all; i++) {
        if (i == self_index) continue;
        slot_t *sl = &shared->slots[i];
        if (__atomic_load_n(&sl->pid, __ATOMIC_ACQUIRE) && ld(&sl->done) < c->gen) all = false;
    }
    if (all || uv_now(t->loop) >= c->deadline) collect_finish(c);
}

void mh_metrics_collect(uv_loop_t *loop, mh_metrics_render_fn render, void *arg, mh_metrics_collect_cb cb, void *ud)
{
    collect_t *c = calloc(1, sizeof *c);
    if (!c) {
        mh_metrics_result_t res = {NULL, shared ? shared->n : 1, 0, 0};
        cb(ud, &res); /* out of memory: nothing to defer with */
        return;
    }
    c->cb = cb;
    c->ud = ud;
    c->own_rc = render(arg, &c->own);
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    c->deadline = uv_now(loop) + COLLECT_WAIT_MS;
    if (shared) {
        c->gen = __atomic_add_fetch(&shared->gen, 1, __ATOMIC_ACQ_REL);
        for (uint32_t i = 0; i < shared->n; i++) {
            if (i == self_index) continue;
            slot_t *sl = &shared->slots[i];
            int32_t pid = __atomic_load_n(&sl->pid, __ATOMIC_ACQUIRE);
            if (!pid) continue;
            uint64_t w = ld(&sl->want);
            while (w < c->gen && !__atomic_compare_exchange_n(&sl->want, &w, c->gen, false, __ATOMIC_ACQ_REL,
                                                              __ATOMIC_ACQUIRE)) {
            }
            if (kill(pid, metrics_signal()) == 0) c->asked++;
        }
    }
    /* Nobody to wait for: answer on the next turn. */
    uv_timer_start(&c->timer, collect_tick, c->asked ? COLLECT_POLL_MS : 0, COLLECT_POLL_MS);
}

/* --------------------------------------------------------------- merge */

typedef struct {
    char *key;       /* "name{labels}" as written */
    size_t klen;
    int family;
    bool is_int;
    long long iv;
    double dv;
    int next;        /* next series of the same family, -1 */
} series_t;

typedef struct {
    char *name;
    char *help, *type; /* whole lines without '\n', or NULL */
    int first, last;   /* series list */
} family_t;

typedef struct {
    mh_arena_t a;
    family_t *fam;
    int nfam;
    size_t capfam;
    series_t *ser;
    int nser;
    size_t capser;
    int *slots;      /* hash of series keys -> index + 1 */
    size_t nslots;
} merge_t;

static uint64_t hash_bytes(const char *p, size_t n)
{
    /* FNV-1a: keys are our own metric names and labels, not client input. */
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)p[i]) * 1099511628211ull;
    return h;
}

static int family_of(merge_t *m, const char *name, size_t n)
{
    for (int i = m->nfam - 1; i >= 0; i--)
        if (strlen(m->fam[i].name) == n && !memcmp(m->fam[i].name, name, n)) return i;
    family_t *v = mh_vec_grow(m->fam, &m->capfam, (size_t)m->nfam + 1, sizeof *v, 64);
    if (!v) return -1;
    m->fam = v;
    family_t *f = &v[m->nfam];
    memset(f, 0, sizeof *f);
    if (!(f->name = mh_strndup(&m->a, name, n))) return -1;
    f->first = f->last = -1;
    return m->nfam++;
}

static int grow_slots(merge_t *m)
{
    size_t ns = m->nslots ? m->nslots * 2 : 1024;
    int *s = calloc(ns, sizeof *s);
    if (!s) return MH_ENOMEM;
    for (int i = 0; i < m->nser; i++) {
        size_t h = hash_bytes(m->ser[i].key, m->ser[i].klen) & (ns - 1);
        while (s[h]) h = (h + 1) & (ns - 1);
        s[h] = i + 1;
    }
    free(m->slots);
    m->slots = s;
    m->nslots = ns;
    return 0;
}

/* The value text: an integer (optionally signed) or anything strtod takes. */
static bool parse_value(const char *p, size_t n, bool *is_int, long long *iv, double *dv)
{
    char tmp[64];
    if (n == 0 || n >= sizeof tmp) return false;
    memcpy(tmp, p, n);
    tmp[n] = 0;
    char *end;
    size_t k = tmp[0] == '-' ? 1 : 0;
    bool digits = k < n && strspn(tmp + k, "0123456789") == n - k && n - k <= 18;
    if (digits) {
        *is_int = true;
        *iv = strtoll(tmp, &end, 10);
        *dv = (double)*iv;
        return true;
    }
    *is_int = false;
    *dv = strtod(tmp, &end);
    return *end == 0;
}

static int add_sample(merge_t *m, int family, const char *key, size_t klen, const char *val, size_t vlen)
{
    bool is_int = false;
    long long iv = 0;
    double dv = 0;
    if (!parse_value(val, vlen, &is_int, &iv, &dv)) return 0; /* dropped */
    if ((size_t)(m->nser + 1) * 2 > m->nslots && grow_slots(m)) return MH_ENOMEM;
    size_t h = hash_bytes(key, klen) & (m->nslots - 1);
    while (m->slots[h]) {
        series_t *s = &m->ser[m->slots[h] - 1];
        if (s->klen == klen && !memcmp(s->key, key, klen)) {
            if (s->is_int && is_int && ((iv > 0 && s->iv > LLONG_MAX - iv) || (iv < 0 && s->iv < LLONG_MIN - iv)))
                s->is_int = false; /* would overflow: continue in floating point */
            s->is_int = s->is_int && is_int;
            s->iv += is_int ? iv : 0;
            s->dv += dv;
            return 0;
        }
        h = (h + 1) & (m->nslots - 1);
    }
    series_t *v = mh_vec_grow(m->ser, &m->capser, (size_t)m->nser + 1, sizeof *v, 256);
    if (!v) return MH_ENOMEM;
    m->ser = v;
    series_t *s = &v[m->nser];
    if (!(s->key = mh_strndup(&m->a, key, klen))) return MH_ENOMEM;
    s->klen = klen;
    s->family = family;
    s->is_int = is_int;
    s->iv = is_int ? iv : 0;
    s->dv = dv;
    s->next = -1;
    family_t *f = &m->fam[family];
    if (f->last >= 0) m->ser[f->last].next = m->nser;
    else f->first = m->nser;
    f->last = m->nser;
    m->slots[h] = ++m->nser;
    return 0;
}

/* End of the series key: after the name and a balanced {labels} block
 * (quotes and escapes inside label values respected). */
static size_t key_end(const char *p, size_t n)
{
    size_t i = 0;
    while (i < n && p[i] != '{' && p[i] != ' ' && p[i] != '\t') i++;
    if (i < n && p[i] == '{') {
        bool inq = false;
        for (i++; i < n; i++) {
            if (inq && p[i] == '\\') i++;
            else if (p[i] == '"') inq = !inq;
            else if (!inq && p[i] == '}') return i + 1;
        }
        return 0;
    }
    return i;
}

static bool sample_of(const char *family, const char *name, size_t n)
{
    static const char *const sfx[] = {"", "_bucket", "_sum", "_count"};
    size_t fl = strlen(family);
    if (n < fl || memcmp(name, family, fl) != 0) return false;
    for (size_t i = 0; i < sizeof sfx / sizeof sfx[0]; i++)
        if (n - fl == strlen(sfx[i]) && !memcmp(name + fl, sfx[i], n - fl)) return true;
    return false;
}

static int merge_line(merge_t *m, const char *p, size_t n, int *cur)
{
    if (n == 0) return 0;
    if (p[0] == '#') {
        /* "# HELP name text" / "# TYPE name type"; other comments dropped. */
        bool help = n > 7 && !memcmp(p, "# HELP ", 7), type = n > 7 && !memcmp(p, "# TYPE ", 7);
        if (!help && !type) return 0;
        const char *name = p + 7;
        size_t nl = strcspn(name, " \n");
        if (nl > (size_t)(p + n - name)) nl = (size_t)(p + n - name);
        int f = family_of(m, name, nl);
        if (f < 0) return MH_ENOMEM;
        char **slot = help ? &m->fam[f].help : &m->fam[f].type;
        if (!*slot && !(*slot = mh_strndup(&m->a, p, n))) return MH_ENOMEM;
        *cur = f;
        return 0;
    }
    size_t ke = key_end(p, n);
    if (ke == 0) return 0;
    size_t nl = strcspn(p, "{ \t");
    if (nl > ke) nl = ke;
    /* The sample belongs to the current family when its name is the
     * family's, or the family's plus a histogram/summary suffix; else to
     * a family of its own name. */
    int f = *cur;
    if (f < 0 || !sample_of(m->fam[f].name, p, nl)) {
        if ((f = family_of(m, p, nl)) < 0) return MH_ENOMEM;
        *cur = f;
    }
    size_t v = ke;
    while (v < n && (p[v] == ' ' || p[v] == '\t')) v++;
    size_t ve = v;
    while (ve < n && p[ve] != ' ' && p[ve] != '\t') ve++; /* a timestamp after it is ignored */
    return add_sample(m, f, p, ke, p + v, ve - v);
}

static int put_value(mh_buf_t *out, const series_t *s)
{
    if (s->is_int) return mh_buf_printf(out, " %lld\n", s->iv);
    if (isnan(s->dv)) return mh_buf_append_str(out, " NaN\n");
    if (isinf(s->dv)) return mh_buf_append_str(out, s->dv > 0 ? " +Inf\n" : " -Inf\n");
    /* Shortest text that reads back as the same double. */
    char tmp[40];
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*g", prec, s->dv);
        if (strtod(tmp, NULL) == s->dv) break;
    }
    return mh_buf_printf(out, " %s\n", tmp);
}

int mh_metrics_merge(const mh_str_t *parts, size_t n, mh_buf_t *out)
{
    merge_t m;
    memset(&m, 0, sizeof m);
    mh_arena_init(&m.a, 0);
    int rc = grow_slots(&m);
    for (size_t i = 0; i < n && !rc; i++) {
        int cur = -1;
        const char *p = parts[i].p, *end = p + parts[i].n;
        while (p < end && !rc) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
            rc = merge_line(&m, p, len, &cur);
            p += len + 1;
        }
    }
    for (int f = 0; f < m.nfam && !rc; f++) {
        family_t *fa = &m.fam[f];
        if (fa->help) rc = mh_buf_append(out, fa->help, strlen(fa->help)) || mh_buf_append_byte(out, '\n');
        if (!rc && fa->type) rc = mh_buf_append(out, fa->type, strlen(fa->type)) || mh_buf_append_byte(out, '\n');
        for (int s = fa->first; s >= 0 && !rc; s = m.ser[s].next) {
            rc = mh_buf_append(out, m.ser[s].key, m.ser[s].klen);
            if (!rc) rc = put_value(out, &m.ser[s]);
        }
    }
    free(m.slots);
    free(m.ser);
    free(m.fam);
    mh_arena_release(&m.a);
    return rc ? MH_ENOMEM : 0;
}

int mh_metrics_label(mh_buf_t *out, const char *v)
{
    int rc = 0;
    for (const char *p = v; *p && !rc; p++) {
        if (*p == '\\' || *p == '"') rc = mh_buf_append_byte(out, '\\') || mh_buf_append_byte(out, (uint8_t)*p);
        else if (*p == '\n') rc = mh_buf_append_str(out, "\\n");
        else rc = mh_buf_append_byte(out, (uint8_t)*p);
    }
    return rc ? MH_ENOMEM : 0;
}

/* ------------------------------------------------------------ process */

static uint64_t count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d) return 0;
    uint64_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n ? n - 1 : 0; /* the directory's own descriptor */
}

static uint64_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long long size = 0, res = 0;
    if (f) {
        if (fscanf(f, "%llu %llu", &size, &res) != 2) res = 0;
        fclose(f);
    }
    return res * (uint64_t)sysconf(_SC_PAGESIZE);
}

int mh_metrics_process_write(mh_buf_t *out)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                 (double)ru.ru_stime.tv_usec / 1e6;
    struct rlimit rl;
    unsigned long long maxfds = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? (unsigned long long)rl.rlim_cur : 0;
    unsigned w = self_index;
    int rc = mh_buf_printf(
        out,
        "# HELP musehub_process_resident_memory_bytes Resident memory of the worker process.\n"
        "# TYPE musehub_process_resident_memory_bytes gauge\n"
        "musehub_process_resident_memory_bytes{worker=\"%u\"} %llu\n"
        "# HELP musehub_process_open_fds Open file descriptors of the worker process.\n"
        "# TYPE musehub_process_open_fds gauge\nmusehub_process_open_fds{worker=\"%u\"} %llu\n"
        "# HELP musehub_process_max_fds File descriptor limit (RLIMIT_NOFILE) of the worker process.\n"
        "# TYPE musehub_process_max_fds gauge\nmusehub_process_max_fds{worker=\"%u\"} %llu\n"
        "# HELP musehub_process_cpu_seconds_total CPU time (user + system, all threads) of the worker process.\n"
        "# TYPE musehub_process_cpu_seconds_total counter\nmusehub_process_cpu_seconds_total{worker=\"%u\"} %.3f\n"
        "# HELP musehub_process_start_time_seconds Start of the worker process, Unix seconds.\n"
        "# TYPE musehub_process_start_time_seconds gauge\nmusehub_process_start_time_seconds{worker=\"%u\"} %.3f\n",
        w, (unsigned long long)rss_bytes(), w, (unsigned long long)count_fds(), w, maxfds, w, cpu, w, start_time_s);
    return rc ? MH_ENOMEM : 0;
}
