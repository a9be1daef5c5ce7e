/*
 * bench_mpack2.c — micro-benchmark of the pack reader and writer (not a
 * test: nothing is asserted, numbers are printed). Built with
 *   make build/test/bench_mpack2
 * and run as
 *   test/unit/bench_mpack2_blobs.sh          # libuv's history -> /tmp/mh-bench-blobs.bin
 *   build/test/bench_mpack2 /tmp/mh-bench-blobs.bin
 * (without a file it makes a synthetic text history of ~64 MB).
 *
 * Prints: the writer's throughput (MB/s of blob bytes) and the pack size
 * at zstd levels 1, 3, 9 and 19 in 4 MiB frames (levels 9 and 19 on the
 * first 64 MB only: they are slow); the reader's throughput on v1 and v2
 * packs in 1 MiB chunks, with and without blob verification and the
 * whole-pack hash, and the old whole-buffer path (mh_pack_read +
 * mh_pack_verify_blobs) for comparison; and the peak memory of a child
 * process that reads the v2 pack from a file in 64 KiB chunks with
 * MH_PACKR_VERIFY (VmHWM), next to the reader's own mh_packr_mem peak.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mh/mpack.h"

typedef struct {
    uint8_t **p;
    size_t *len;
    mh_id_t *id;
    size_t n;
    uint64_t bytes;
} blobs_t;

static blobs_t B;

static void add_blob(uint8_t *p, size_t n)
{
    if ((B.n & (B.n - 1)) == 0) {
        size_t cap = B.n ? B.n * 2 : 1;
        B.p = realloc(B.p, cap * sizeof *B.p);
        B.len = realloc(B.len, cap * sizeof *B.len);
        B.id = realloc(B.id, cap * sizeof *B.id);
    }
    B.p[B.n] = p;
    B.len[B.n] = n;
    mh_blob_id(p, n, &B.id[B.n]);
    B.n++;
    B.bytes += n;
}

static bool load(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    uint64_t n;
    while (fread(&n, 8, 1, f) == 1) {
        uint8_t *p = malloc(n ? n : 1);
        if (n && fread(p, 1, n, f) != n) break;
        add_blob(p, n);
    }
    fclose(f);
    return B.n > 0;
}

/* ~64 MB: 400 "files" of 4-40 KB, 40 versions each with small edits. */
static void synth(void)
{
    static const char *w[] = {"static", "int", "return", "uv_loop_t", "handle", "->", "(", ")", "{", "}", ";",
                              "if", "else", "0", "1", "NULL", "size_t", "buf", "len", "\n", "    "};
    uint64_t x = 42;
    for (int f = 0; f < 400; f++) {
        size_t n = 4000 + (size_t)(f * 7919 % 36000);
        uint8_t *base = malloc(n);
        for (size_t k = 0; k < n;) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            const char *s = w[(x >> 33) % (sizeof w / sizeof *w)];
            size_t l = strlen(s);
            for (size_t i = 0; i < l && k < n; i++) base[k++] = (uint8_t)s[i];
            if (k < n) base[k++] = ' ';
        }
        for (int v = 0; v < 40; v++) {
            uint8_t *c = malloc(n);
            memcpy(c, base, n);
            for (int e = 0; e <= v; e++) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                c[(x >> 20) % n] = (uint8_t)('a' + (x >> 40) % 26);
            }
            add_blob(c, n);
        }
        free(base);
    }
}

static double now(void)
{
    return mh_now_us() / 1e6;
}

static double mb(uint64_t n)
{
    return n / 1e6;
}

/* A v2 pack of blobs [0, n) in frames of `target` bytes at `level`. */
static void write_v2(mh_buf_t *out, size_t n, int level, size_t target)
{
    uint32_t nframes = 0;
    size_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        if (i == 0 || acc + B.len[i] > target) {
            nframes++;
            acc = 0;
        }
        acc += B.len[i];
    }
    mh_packw_t w;
    mh_packw_opts_t o = {.level = level};
    mh_packw_init_v2(&w, out, &o);
    mh_packw_commits(&w, 0);
    mh_packw_snapshots(&w, 0);
    mh_packw_branch_heads(&w, 0);
    mh_packw_frames(&w, nframes);
    acc = 0;
    for (size_t i = 0; i < n; i++) {
        if (i == 0 || acc + B.len[i] > target) {
            if (i) mh_packw_frame_end(&w);
            mh_packw_frame_begin(&w, MH_PACK_ZSTD);
            acc = 0;
        }
        mh_packw_frame_blob(&w, (mh_str_t){B.id[i].s, MH_ID_LEN}, B.len[i]);
        mh_packw_frame_data(&w, B.p[i], B.len[i]);
        acc += B.len[i];
    }
    mh_packw_frame_end(&w);
    if (mh_packw_finish(&w)) fprintf(stderr, "writer failed\n");
}

static void write_v1(mh_buf_t *out)
{
    mh_packw_t w;
    mh_packw_init(&w, out);
    mh_packw_commits(&w, 0);
    mh_packw_snapshots(&w, 0);
    mh_packw_blobs(&w, (uint32_t)B.n);
    for (size_t i = 0; i < B.n; i++) mh_packw_blob(&w, (mh_str_t){B.id[i].s, MH_ID_LEN}, B.p[i], B.len[i]);
    mh_packw_branch_heads(&w, 0);
    if (mh_packw_finish(&w)) fprintf(stderr, "writer failed\n");
}

/* Best of 3: seconds to read buf in `chunk`-byte feeds with `flags`. */
static double read_time(const mh_buf_t *buf, size_t chunk, unsigned flags, size_t *peak)
{
    double best = 1e9;
    for (int run = 0; run < 3; run++) {
        mh_arena_t a;
        mh_arena_init(&a, 0);
        mh_packr_t *r;
        double t0 = now();
        mh_packr_new(&a, NULL, flags, buf->len, &r);
        int rc = 0;
        for (size_t off = 0; !rc && off < buf->len; off += chunk)
            rc = mh_packr_feed(r, buf->p + off, buf->len - off < chunk ? buf->len - off : chunk);
        if (!rc) rc = mh_packr_finish(r);
        double t = now() - t0;
        if (rc) fprintf(stderr, "read failed: %s\n", mh_packr_why(r));
        if (peak) *peak = mh_packr_result(r)->mem_peak;
        mh_packr_free(r);
        mh_arena_release(&a);
        if (t < best) best = t;
    }
    return best;
}

static long vm_hwm_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

/* Child mode: read FILE in 64 KiB read()s with VERIFY; print memory. */
static int read_file_mode(const char *path)
{
    long before = vm_hwm_kb();
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 1;
    static uint8_t buf[64 << 10];
    mh_arena_t a;
    mh_arena_init(&a, 0);
    mh_packr_t *r;
    mh_packr_new(&a, NULL, MH_PACKR_VERIFY | MH_PACKR_HASH_PACK, 0, &r);
    ssize_t n;
    int rc = 0;
    uint64_t total = 0;
    double t0 = now();
    while (!rc && (n = read(fd, buf, sizeof buf)) > 0) {
        rc = mh_packr_feed(r, buf, (size_t)n);
        total += (uint64_t)n;
    }
    if (!rc) rc = mh_packr_finish(r);
    double t = now() - t0;
    close(fd);
    printf("  child: %.0f MB pack from a file in 64 KiB reads, VERIFY + pack hash: %s in %.2f s (%.0f MB/s)\n",
           mb(total), rc ? mh_packr_why(r) : "ok", t, mb(total) / t);
    printf("  child: VmHWM %ld kB before, %ld kB after (+%ld kB); reader's own peak %zu kB "
           "(%zu blob records, %zu frames)\n",
           before, vm_hwm_kb(), vm_hwm_kb() - before, mh_packr_result(r)->mem_peak / 1024,
           mh_packr_result(r)->nblobs, mh_packr_result(r)->nframes);
    mh_packr_free(r);
    mh_arena_release(&a);
    return rc != 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--read-file") == 0) return read_file_mode(argv[2]);
    if (argc > 1 ? !load(argv[1]) : (synth(), false)) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 1;
    }
    printf("blobs: %zu, %.1f MB (%s)\n", B.n, mb(B.bytes), argc > 1 ? argv[1] : "synthetic");

    /* ---- writer */
    printf("\nwriter: v2, built frames of 4 MiB\n");
    mh_buf_t v2 = {0};
    size_t sub = B.n;
    uint64_t subbytes = B.bytes;
    for (sub = 0, subbytes = 0; sub < B.n && subbytes < 64000000; sub++) subbytes += B.len[sub];
    int levels[] = {1, 3, 9, 19};
    for (int li = 0; li < 4; li++) {
        size_t n = levels[li] >= 9 ? sub : B.n;
        uint64_t bytes = levels[li] >= 9 ? subbytes : B.bytes;
        mh_buf_t out = {0};
        double t0 = now();
        write_v2(&out, n, levels[li], 4 << 20);
        double t = now() - t0;
        printf("  level %2d: %7.1f MB of blobs -> %7.2f MB (ratio %5.1fx) in %6.2f s: %6.1f MB/s\n", levels[li],
               mb(bytes), mb(out.len), (double)bytes / out.len, t, mb(bytes) / t);
        if (levels[li] == 3) {
            v2 = out;
        } else {
            mh_buf_free(&out);
        }
    }
    mh_buf_t v1 = {0};
    double t0 = now();
    write_v1(&v1);
    printf("  v1 (raw): %.1f MB in %.2f s: %.0f MB/s\n", mb(v1.len), now() - t0, mb(v1.len) / (now() - t0));

    /* ---- reader */
    printf("\nreader: 1 MiB feeds, best of 3 (MB/s of pack bytes; of blob bytes for v2)\n");
    struct {
        const char *name;
        const mh_buf_t *buf;
        unsigned flags;
    } cases[] = {
        {"v1 parse only", &v1, 0},
        {"v1 + blob hashes", &v1, MH_PACKR_VERIFY},
        {"v1 + blob hashes + pack hash", &v1, MH_PACKR_VERIFY | MH_PACKR_HASH_PACK},
        {"v2 no decompression (trusted)", &v2, MH_PACKR_NO_DECOMPRESS},
        {"v2 decompress + size checks", &v2, 0},
        {"v2 + blob hashes", &v2, MH_PACKR_VERIFY},
        {"v2 + blob hashes + pack hash", &v2, MH_PACKR_VERIFY | MH_PACKR_HASH_PACK},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        size_t peak = 0;
        double t = read_time(cases[c].buf, 1 << 20, cases[c].flags, &peak);
        bool is2 = cases[c].buf == &v2;
        printf("  %-32s %7.3f s  %7.0f MB/s%s  (reader peak %zu kB)\n", cases[c].name, t, mb(cases[c].buf->len) / t,
               is2 ? "" : "", peak / 1024);
        if (is2) printf("  %-32s %7s    %7.0f MB/s of blob bytes\n", "", "", mb(B.bytes) / t);
    }
    /* the whole-buffer path the hub uses today */
    double best = 1e9;
    for (int run = 0; run < 3; run++) {
        mh_arena_t a;
        mh_arena_init(&a, 0);
        mh_pack_t p;
        const char *why;
        double t1 = now();
        int rc = mh_pack_read(&a, v1.p, v1.len, NULL, &p, &why);
        size_t bad;
        if (!rc) rc = mh_pack_verify_blobs(v1.p, &p, &bad);
        double t = now() - t1;
        if (rc) fprintf(stderr, "mh_pack_read: %s\n", why ? why : "verify failed");
        if (t < best) best = t;
        mh_arena_release(&a);
    }
    printf("  %-32s %7.3f s  %7.0f MB/s\n", "v1 mh_pack_read + verify_blobs", best, mb(v1.len) / best);

    /* ---- memory: a child reads the v2 pack from a file */
    printf("\nmemory: the v2 pack (level 3) read from a file by a fresh process\n");
    char path[] = "/tmp/mh-bench-pack-XXXXXX";
    int fd = mkstemp(path);
    fflush(stdout);
    if (fd >= 0 && write(fd, v2.p, v2.len) == (ssize_t)v2.len) {
        close(fd);
        pid_t pid = fork();
        if (pid == 0) {
            execl(argv[0], argv[0], "--read-file", path, (char *)NULL);
            _exit(127);
        }
        int st;
        waitpid(pid, &st, 0);
    }
    unlink(path);
    mh_buf_free(&v1);
    mh_buf_free(&v2);
    return 0;
}
