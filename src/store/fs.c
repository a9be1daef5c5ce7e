/*
 * fs.c — the `fs` object store backend (SPEC 3, 4.3 step 2; DESIGN 4, 5):
 * a local directory, shared by every process that names it.
 *
 *   <dir>/mpacks/<64 hex>      immutable content-addressed packs
 *   <dir>/incoming/<id>        staged uploads of push grants
 *   <dir>/tmp/                 temporary files (same filesystem, so the
 *                              final rename/link is atomic)
 *   <dir>/.signing-secret      HMAC key of presigned URLs (0600), unless
 *                              the configuration gives one
 *
 * Invariants:
 *  - Every path is built from a key that passed mh_store_key_valid(), and
 *    resolved relative to the directory fd opened at start-up (openat &
 *    co.), so no key can name anything outside the store.
 *  - A reader sees a whole object or none: objects are written to tmp/,
 *    fsynced, then renamed (put) or hard-linked (uploads) into place, and
 *    the parent directory is fsynced.
 *  - A streamed upload can never overwrite a key: link(2) fails with
 *    EEXIST when the name exists, and only bytes whose length and SHA-256
 *    match the grant are ever linked.
 *  - Async operations run their file I/O on the libuv thread pool; the
 *    callback runs on the loop in the after-work callback, exactly once,
 *    never from inside the call that started it (even for a bad key).
 *  - Worker threads touch only their own op and the read-only fds of the
 *    store; counters and logging happen on the loop thread.
 */
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store_int.h"

#define SECRET_FILE ".signing-secret"
/* Ranges closer than this are read with one pread: reading a few KiB of
 * gap costs less than another system call and disk seek. */
#define RANGE_GAP (64u * 1024u)
/* A coalesced run is never longer than this, so the scratch buffer of a
 * get_ranges stays bounded whatever the caller asks. */
#define RUN_MAX (8u * 1024u * 1024u)
/* tmp/ files untouched for this long are leftovers of a crash. */
#define TMP_STALE_S (6 * 3600)

typedef struct {
    mh_store_t base;
    int dirfd, mpacksfd, incomingfd, tmpfd;
    char *dir;
    char *public_url; /* without a trailing '/'; NULL: presign disabled */
    uint8_t *secret;
    size_t secret_len;
    unsigned pending; /* ops queued + uploads open */
    bool closing;
} fs_store_t;

/* ----------------------------------------------------------------- utils */

static fs_store_t *as_fs(mh_store_t *s)
{
    return (s && s->ops == &mh_store_fs_ops) ? (fs_store_t *)s : NULL;
}

static void fs_free(fs_store_t *fs)
{
    int fds[] = {fs->dirfd, fs->mpacksfd, fs->incomingfd, fs->tmpfd};
    for (size_t i = 0; i < 4; i++)
        if (fds[i] >= 0) close(fds[i]);
    if (fs->secret) {
        memset(fs->secret, 0, fs->secret_len);
        free(fs->secret);
    }
    free(fs->dir);
    free(fs->public_url);
    free(fs);
}

/* Called after an op or upload is finished: frees a closed store once the
 * last user is gone. */
static void fs_release(fs_store_t *fs)
{
    fs->pending--;
    if (fs->closing && fs->pending == 0) fs_free(fs);
}

static int err_of_errno(int e)
{
    return (e == ENOENT || e == ENOTDIR) ? MH_ENOENT : MH_EIO;
}

/* The fd of the directory that holds a (valid) key, to fsync after a
 * rename or link into it. */
static int parent_fd(const fs_store_t *fs, const char *key)
{
    return key[0] == 'm' ? fs->mpacksfd : fs->incomingfd;
}

/* Writes a random file name "<prefix><32 hex>" into out (size >= 48). */
static int random_name(char *out, size_t size, const char *prefix)
{
    uint8_t r[16];
    char hex[33];
    if (mh_random(r, sizeof r) != 0) return MH_EIO;
    mh_hex_encode(hex, r, sizeof r);
    snprintf(out, size, "%s%s", prefix, hex);
    return 0;
}

static int write_full(int fd, const void *data, size_t n)
{
    const uint8_t *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads exactly n bytes at off; a short file (truncated underneath us) is
 * an I/O error, never silently short data. */
static int pread_full(int fd, void *buf, size_t n, uint64_t off)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (r == 0) return -EIO;
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

/* ----------------------------------------------------------- async ops */

typedef enum { OP_GET, OP_RANGES, OP_PUT, OP_MOVE, OP_DELETE, OP_HEAD } op_kind_t;

typedef struct {
    uv_work_t req;
    fs_store_t *fs;
    op_kind_t kind;
    int err;             /* MH_E* result */
    int sys_errno;       /* errno behind an MH_EIO, for the log line */
    const char *sys_what; /* which call failed */
    char key[MH_STORE_KEY_MAX + 1], key2[MH_STORE_KEY_MAX + 1];
    uint64_t off, len; /* get */
    const mh_range_t *ranges; /* get_ranges (borrowed until cb) */
    size_t nranges;
    const void *data; /* put (borrowed until cb) */
    size_t n;
    mh_buf_t buf;  /* get result, handed to the callback */
    uint64_t size; /* head */
    union {
        mh_store_get_cb get;
        mh_store_done_cb done;
        mh_store_head_cb head;
    } cb;
    void *ud;
} fs_op_t;

static const mh_store_op_t op_metric[] = {
    [OP_GET] = MH_STORE_OP_GET,         [OP_RANGES] = MH_STORE_OP_GET_RANGES, [OP_PUT] = MH_STORE_OP_PUT,
    [OP_MOVE] = MH_STORE_OP_MOVE,       [OP_DELETE] = MH_STORE_OP_DELETE,     [OP_HEAD] = MH_STORE_OP_HEAD,
};
static const char *const op_label[] = {
    [OP_GET] = "get", [OP_RANGES] = "get_ranges", [OP_PUT] = "put",
    [OP_MOVE] = "move", [OP_DELETE] = "delete", [OP_HEAD] = "head",
};

/* Records a system-call failure (worker thread; logged on the loop). */
static int op_fail(fs_op_t *op, const char *what, int neg_errno)
{
    op->sys_errno = -neg_errno;
    op->sys_what = what;
    op->err = err_of_errno(-neg_errno);
    return op->err;
}

static void copy_key(fs_op_t *op, char *dst, const char *key)
{
    size_t n = key ? strnlen(key, MH_STORE_KEY_MAX + 1) : 0;
    if (!key || n > MH_STORE_KEY_MAX || !mh_store_key_valid(key, n)) {
        op->err = MH_EINVAL;
        dst[0] = 0;
        return;
    }
    memcpy(dst, key, n + 1);
}

static fs_op_t *op_new(mh_store_t *s, op_kind_t kind, void *ud)
{
    fs_op_t *op = calloc(1, sizeof *op);
    if (!op) {
        /* Without the op there is no way to call back later, and calling
         * back now would break the never-re-entrant rule; a ~400-byte
         * allocation failing means the process is done anyway. */
        mh_error("store: out of memory queuing a %s", op_label[kind]);
        abort();
    }
    op->fs = (fs_store_t *)s;
    op->kind = kind;
    op->ud = ud;
    return op;
}

static void do_get(fs_op_t *op)
{
    int fd = openat(op->fs->dirfd, op->key, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        op_fail(op, "open", -errno);
        return;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        op_fail(op, "fstat", -errno);
        goto out;
    }
    uint64_t size = (uint64_t)st.st_size, len = op->len;
    if (op->off > size) {
        op->err = MH_EINVAL;
        goto out;
    }
    if (len == UINT64_MAX) len = size - op->off;
    if (len > size - op->off || len > SIZE_MAX) {
        op->err = MH_EINVAL;
        goto out;
    }
    if (len > 0) {
        if (mh_buf_reserve(&op->buf, (size_t)len) != 0) {
            op->err = MH_ENOMEM;
            goto out;
        }
        int rc = pread_full(fd, op->buf.p, (size_t)len, op->off);
        if (rc != 0) {
            op_fail(op, "pread", rc);
            goto out;
        }
        op->buf.len = (size_t)len;
    }
out:
    close(fd);
}

/* One requested range, with where its bytes go in the result. */
typedef struct {
    uint64_t off, len;
    size_t out;
} seg_t;

static int seg_cmp(const void *a, const void *b)
{
    const seg_t *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* Reads the sorted segs [i, j) that form one run covering [rs, re). A
 * single-segment run goes straight into the output; otherwise the run is
 * read once into scratch and each segment copied to its place. */
static int read_run(int fd, const seg_t *segs, size_t i, size_t j, uint64_t rs, uint64_t re, uint8_t *out,
                    mh_buf_t *scratch)
{
    if (j - i == 1) return pread_full(fd, out + segs[i].out, (size_t)segs[i].len, segs[i].off);
    size_t rl = (size_t)(re - rs);
    if (scratch->cap < rl && mh_buf_reserve(scratch, rl - scratch->len) != 0) return -ENOMEM;
    int rc = pread_full(fd, scratch->p, rl, rs);
    if (rc != 0) return rc;
    for (size_t k = i; k < j; k++) memcpy(out + segs[k].out, scratch->p + (segs[k].off - rs), (size_t)segs[k].len);
    return 0;
}

/* Checks every range against the file size, records output positions in
 * the caller's order and sorts by offset. */
static int plan_ranges(fs_op_t *op, uint64_t size, seg_t *segs, size_t *total)
{
    size_t pos = 0;
    for (size_t k = 0; k < op->nranges; k++) {
        uint64_t off = op->ranges[k].off, len = op->ranges[k].len;
        if (off > size || len > size - off || len > SIZE_MAX - pos) return MH_EINVAL;
        segs[k] = (seg_t){off, len, pos};
        pos += (size_t)len;
    }
    if (op->nranges > 1) qsort(segs, op->nranges, sizeof *segs, seg_cmp);
    *total = pos;
    return 0;
}

static void read_ranges(fs_op_t *op, int fd, uint64_t size)
{
    size_t n = op->nranges, total = 0;
    seg_t *segs = n ? malloc(n * sizeof *segs) : NULL;
    mh_buf_t scratch = {0};
    if (n && !segs) {
        op->err = MH_ENOMEM;
        return;
    }
    if ((op->err = plan_ranges(op, size, segs, &total)) != 0) goto out;
    if (total && mh_buf_reserve(&op->buf, total) != 0) {
        op->err = MH_ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < n;) {
        uint64_t rs = segs[i].off, re = rs + segs[i].len;
        size_t j = i + 1;
        for (; j < n; j++) {
            uint64_t end = segs[j].off + segs[j].len, ne = end > re ? end : re;
            if (segs[j].off > re + RANGE_GAP || ne - rs > RUN_MAX) break;
            re = ne;
        }
        int rc = read_run(fd, segs, i, j, rs, re, op->buf.p, &scratch);
        if (rc == -ENOMEM) op->err = MH_ENOMEM;
        else if (rc != 0) op_fail(op, "pread", rc);
        if (rc != 0) goto out;
        i = j;
    }
    op->buf.len = total;
out:
    if (op->err) mh_buf_free(&op->buf);
    mh_buf_free(&scratch);
    free(segs);
}

static void do_ranges(fs_op_t *op)
{
    int fd = openat(op->fs->dirfd, op->key, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        op_fail(op, "open", -errno);
        return;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) op_fail(op, "fstat", -errno);
    else read_ranges(op, fd, (uint64_t)st.st_size);
    close(fd);
}

/* Writes data to a new file in tmp/ and fsyncs it; the name goes to
 * tmpname. On failure nothing is left behind. */
static int write_tmp(fs_op_t *op, char *tmpname, size_t tnsize)
{
    if (random_name(tmpname, tnsize, "put-") != 0) return op->err = MH_EIO;
    int fd = openat(op->fs->tmpfd, tmpname, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return op_fail(op, "create tmp", -errno);
    int rc = write_full(fd, op->data, op->n);
    if (rc != 0) op_fail(op, "write", rc);
    else if (fsync(fd) != 0) op_fail(op, "fsync", -errno);
    if (close(fd) != 0 && !op->err) op_fail(op, "close", -errno);
    if (op->err) unlinkat(op->fs->tmpfd, tmpname, 0);
    return op->err;
}

static void do_put(fs_op_t *op)
{
    char tmpname[48];
    if (write_tmp(op, tmpname, sizeof tmpname) != 0) return;
    if (renameat(op->fs->tmpfd, tmpname, op->fs->dirfd, op->key) != 0) {
        op_fail(op, "rename", -errno);
        /* A put has no "absent" outcome (store.h): a missing or replaced
         * mpacks/ directory is a store failure, not MH_ENOENT. */
        if (op->err == MH_ENOENT) op->err = MH_EIO;
        unlinkat(op->fs->tmpfd, tmpname, 0);
        return;
    }
    if (fsync(parent_fd(op->fs, op->key)) != 0) op_fail(op, "fsync dir", -errno);
}

/* Moves without ever replacing dst: if dst exists it holds the same bytes
 * (content addressing), so src is simply dropped. RENAME_NOREPLACE where
 * the filesystem has it, link+unlink otherwise. */
static void do_move(fs_op_t *op)
{
    fs_store_t *fs = op->fs;
    struct stat st;
    if (strcmp(op->key, op->key2) == 0) {
        if (fstatat(fs->dirfd, op->key, &st, 0) != 0) op_fail(op, "stat", -errno);
        return;
    }
    int rc = renameat2(fs->dirfd, op->key, fs->dirfd, op->key2, RENAME_NOREPLACE);
    if (rc != 0 && errno == EINVAL) {
        rc = linkat(fs->dirfd, op->key, fs->dirfd, op->key2, 0);
        if (rc == 0 || errno == EEXIST) {
            if (unlinkat(fs->dirfd, op->key, 0) != 0 && errno != ENOENT) {
                op_fail(op, "unlink src", -errno);
                return;
            }
            rc = 0;
        }
    }
    if (rc != 0 && errno == EEXIST) {
        if (unlinkat(fs->dirfd, op->key, 0) != 0) op_fail(op, "unlink src", -errno);
        return;
    }
    if (rc != 0) {
        op_fail(op, "rename", -errno);
        return;
    }
    if (fsync(parent_fd(fs, op->key2)) != 0) op_fail(op, "fsync dir", -errno);
    else if (parent_fd(fs, op->key) != parent_fd(fs, op->key2) && fsync(parent_fd(fs, op->key)) != 0)
        op_fail(op, "fsync dir", -errno);
}

/* Deleting an absent key succeeds (GC may race another process). The
 * directory is not fsynced: a delete undone by a crash is harmless. */
static void do_delete(fs_op_t *op)
{
    if (unlinkat(op->fs->dirfd, op->key, 0) != 0 && errno != ENOENT) op_fail(op, "unlink", -errno);
}

static void do_head(fs_op_t *op)
{
    struct stat st;
    if (fstatat(op->fs->dirfd, op->key, &st, 0) != 0) op_fail(op, "stat", -errno);
    else if (!S_ISREG(st.st_mode)) op->err = MH_ENOENT;
    else op->size = (uint64_t)st.st_size;
}

static void op_work_cb(uv_work_t *req)
{
    fs_op_t *op = req->data;
    if (op->err) return; /* refused at submit; only the callback is left */
    switch (op->kind) {
    case OP_GET: do_get(op); break;
    case OP_RANGES: do_ranges(op); break;
    case OP_PUT: do_put(op); break;
    case OP_MOVE: do_move(op); break;
    case OP_DELETE: do_delete(op); break;
    case OP_HEAD: do_head(op); break;
    }
}

static void op_after_cb(uv_work_t *req, int status)
{
    fs_op_t *op = req->data;
    fs_store_t *fs = op->fs;
    if (status != 0 && !op->err) op->err = MH_ECANCELED;
    /* A missing key is an ordinary answer (the caller decides), not a
     * store problem worth a warning. */
    if (op->sys_what && op->sys_errno == ENOENT)
        mh_debug("store: fs %s %s: %s: not found", op_label[op->kind], op->key, op->sys_what);
    else if (op->sys_what)
        mh_warn("store: fs %s %s: %s failed: %s", op_label[op->kind], op->key, op->sys_what, strerror(op->sys_errno));
    mh_store_note(&fs->base, op_metric[op->kind], op->err);
    switch (op->kind) {
    case OP_GET:
    case OP_RANGES:
        if (!op->err) fs->base.bytes_read += op->buf.len;
        op->cb.get(op->ud, op->err, op->err ? NULL : &op->buf);
        break;
    case OP_PUT:
        if (!op->err) fs->base.bytes_written += op->n;
        op->cb.done(op->ud, op->err);
        break;
    case OP_MOVE:
    case OP_DELETE: op->cb.done(op->ud, op->err); break;
    case OP_HEAD: op->cb.head(op->ud, op->err, op->err ? 0 : op->size); break;
    }
    /* The callback took the bytes (or freed them); we never touch them. */
    free(op);
    fs_release(fs);
}

static void op_submit(fs_op_t *op)
{
    op->fs->pending++;
    op->req.data = op;
    /* uv_queue_work fails only for a NULL work callback. */
    uv_queue_work(op->fs->base.loop, &op->req, op_work_cb, op_after_cb);
}

static void fs_get(mh_store_t *s, const char *key, uint64_t off, uint64_t len, mh_store_get_cb cb, void *ud)
{
    fs_op_t *op = op_new(s, OP_GET, ud);
    copy_key(op, op->key, key);
    op->off = off;
    op->len = len;
    op->cb.get = cb;
    op_submit(op);
}

static void fs_get_ranges(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n, mh_store_get_cb cb,
                          void *ud)
{
    fs_op_t *op = op_new(s, OP_RANGES, ud);
    copy_key(op, op->key, key);
    if (n && !ranges) op->err = MH_EINVAL;
    op->ranges = ranges;
    op->nranges = n;
    op->cb.get = cb;
    op_submit(op);
}

static void fs_put(mh_store_t *s, const char *key, const void *data, size_t n, mh_store_done_cb cb, void *ud)
{
    fs_op_t *op = op_new(s, OP_PUT, ud);
    copy_key(op, op->key, key);
    if (n && !data) op->err = MH_EINVAL;
    op->data = data;
    op->n = n;
    op->cb.done = cb;
    op_submit(op);
}

static void fs_move(mh_store_t *s, const char *src, const char *dst, mh_store_done_cb cb, void *ud)
{
    fs_op_t *op = op_new(s, OP_MOVE, ud);
    copy_key(op, op->key, src);
    copy_key(op, op->key2, dst);
    op->cb.done = cb;
    op_submit(op);
}

static void fs_delete(mh_store_t *s, const char *key, mh_store_done_cb cb, void *ud)
{
    fs_op_t *op = op_new(s, OP_DELETE, ud);
    copy_key(op, op->key, key);
    op->cb.done = cb;
    op_submit(op);
}

static void fs_head(mh_store_t *s, const char *key, mh_store_head_cb cb, void *ud)
{
    fs_op_t *op = op_new(s, OP_HEAD, ud);
    copy_key(op, op->key, key);
    op->cb.head = cb;
    op_submit(op);
}

/* ------------------------------------------------------- presigned URLs */

/* The string the HMAC covers: "METHOD\nkey\nexpires\nsize\nsha256hex";
 * for GET size and sha256 are empty. Every part is a whitelisted token
 * (method, validated key, digits, hex), so no part can contain '\n' and
 * the split is unambiguous. */
static void url_mac(const fs_store_t *fs, const char *method, mh_str_t key, mh_str_t expires, mh_str_t size,
                    mh_str_t sha, uint8_t mac[32])
{
    char canon[256];
    int n = snprintf(canon, sizeof canon, "%s\n%.*s\n%.*s\n%.*s\n%.*s", method, (int)key.n, key.p, (int)expires.n,
                     expires.p, (int)size.n, size.p, (int)sha.n, sha.p);
    mh_hmac_sha256(fs->secret, fs->secret_len, canon, (size_t)n, mac);
}

static mh_str_t str_of(const char *p)
{
    return (mh_str_t){p, strlen(p)};
}

static int fs_presign(mh_store_t *s, mh_arena_t *a, const char *method, const char *key, uint64_t size,
                      const uint8_t *sha256, uint32_t ttl_s, char **url)
{
    fs_store_t *fs = (fs_store_t *)s;
    if (!fs->public_url) {
        mh_error("store: fs presign needs a public URL (MUSEHUB_PUBLIC_URL)");
        return MH_EINVAL;
    }
    bool put = strcmp(method, "PUT") == 0;
    char exp[24], sz[24] = "", sha[65] = "", sig[65];
    uint8_t mac[32];
    snprintf(exp, sizeof exp, "%" PRId64, mh_unix_time() + (int64_t)ttl_s);
    if (put) {
        snprintf(sz, sizeof sz, "%" PRIu64, size);
        mh_hex_encode(sha, sha256, 32);
    }
    url_mac(fs, method, str_of(key), str_of(exp), str_of(sz), str_of(sha), mac);
    mh_hex_encode(sig, mac, sizeof mac);
    if (put)
        *url = mh_sprintf(a, "%s/_store/%s?X-Muse-Method=PUT&X-Muse-Expires=%s&X-Muse-Size=%s&X-Muse-Sha256=%s"
                             "&X-Muse-Signature=%s",
                          fs->public_url, key, exp, sz, sha, sig);
    else
        *url = mh_sprintf(a, "%s/_store/%s?X-Muse-Method=GET&X-Muse-Expires=%s&X-Muse-Signature=%s", fs->public_url,
                          key, exp, sig);
    return *url ? 0 : MH_ENOMEM;
}

enum { Q_METHOD, Q_EXPIRES, Q_SIZE, Q_SHA, Q_SIG, Q_COUNT };
static const char *const q_names[Q_COUNT] = {"X-Muse-Method", "X-Muse-Expires", "X-Muse-Size", "X-Muse-Sha256",
                                             "X-Muse-Signature"};

/* Splits the query into the five known parameters. Strict: an unknown
 * name, a repeated one, an empty part or a part without '=' is refused,
 * so there is exactly one reading of any URL we accept. */
static int parse_query(mh_str_t q, mh_str_t vals[Q_COUNT], bool seen[Q_COUNT])
{
    const char *p = q.p, *end = q.p + q.n;
    if (q.n == 0) return MH_EAUTH;
    while (p <= end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *pe = amp ? amp : end;
        const char *eq = memchr(p, '=', (size_t)(pe - p));
        if (!eq) return MH_EAUTH;
        size_t nl = (size_t)(eq - p);
        int which = -1;
        for (int i = 0; i < Q_COUNT; i++)
            if (strlen(q_names[i]) == nl && memcmp(q_names[i], p, nl) == 0) which = i;
        if (which < 0 || seen[which]) return MH_EAUTH;
        seen[which] = true;
        vals[which] = (mh_str_t){eq + 1, (size_t)(pe - eq - 1)};
        if (!amp) break;
        p = amp + 1;
    }
    return 0;
}

static bool all_digits(mh_str_t v, size_t maxlen)
{
    if (v.n < 1 || v.n > maxlen) return false;
    for (size_t i = 0; i < v.n; i++)
        if (v.p[i] < '0' || v.p[i] > '9') return false;
    return true;
}

/* Parses decimal digits (checked by all_digits) without overflow. */
static bool parse_u64(mh_str_t v, uint64_t *out)
{
    uint64_t x = 0;
    for (size_t i = 0; i < v.n; i++) {
        uint64_t d = (uint64_t)(v.p[i] - '0');
        if (x > (UINT64_MAX - d) / 10) return false;
        x = x * 10 + d;
    }
    *out = x;
    return true;
}

static bool lower_hex64(mh_str_t v)
{
    if (v.n != 64) return false;
    for (size_t i = 0; i < 64; i++)
        if (!((v.p[i] >= '0' && v.p[i] <= '9') || (v.p[i] >= 'a' && v.p[i] <= 'f'))) return false;
    return true;
}

static int check_url(fs_store_t *fs, const char *method, mh_str_t key, mh_str_t query, uint64_t *size,
                     uint8_t sha256[32])
{
    mh_str_t v[Q_COUNT] = {{0}};
    bool seen[Q_COUNT] = {0};
    bool put = method && strcmp(method, "PUT") == 0;
    uint64_t exp = 0, sz = 0;
    uint8_t want[32], got[32];
    if (!put && !(method && strcmp(method, "GET") == 0)) return MH_EAUTH;
    if (!key.p || key.n > MH_STORE_KEY_MAX || !mh_store_key_valid(key.p, key.n)) return MH_EAUTH;
    if (parse_query(query, v, seen) != 0) return MH_EAUTH;
    if (!seen[Q_METHOD] || !mh_str_eq(v[Q_METHOD], method) || !seen[Q_EXPIRES] || !seen[Q_SIG]) return MH_EAUTH;
    if (seen[Q_SIZE] != put || seen[Q_SHA] != put) return MH_EAUTH;
    if (!all_digits(v[Q_EXPIRES], 18) || !parse_u64(v[Q_EXPIRES], &exp)) return MH_EAUTH;
    if (put && (!all_digits(v[Q_SIZE], 20) || !parse_u64(v[Q_SIZE], &sz) || !lower_hex64(v[Q_SHA])))
        return MH_EAUTH;
    if (!lower_hex64(v[Q_SIG]) || mh_hex_decode(got, v[Q_SIG].p, 32) != 0) return MH_EAUTH;
    url_mac(fs, method, key, v[Q_EXPIRES], v[Q_SIZE], v[Q_SHA], want);
    if (!mh_ct_equal(want, got, 32)) return MH_EAUTH;
    /* Expiry only after the signature: an unsigned URL learns nothing. */
    if ((int64_t)exp < mh_unix_time()) return MH_ETIMEDOUT;
    if (size) *size = sz;
    if (sha256) {
        if (put) mh_hex_decode(sha256, v[Q_SHA].p, 32);
        else memset(sha256, 0, 32);
    }
    return 0;
}

int mh_store_fs_check_url(mh_store_t *s, const char *method, mh_str_t key, mh_str_t query, uint64_t *size,
                          uint8_t sha256[32])
{
    fs_store_t *fs = as_fs(s);
    if (!fs) return MH_EINVAL;
    int rc = check_url(fs, method, key, query, size, sha256);
    mh_store_note(s, MH_STORE_OP_CHECK_URL, rc);
    return rc;
}

/* ------------------------------------------------------ streamed upload */

struct mh_fs_upload {
    fs_store_t *fs;
    int fd;
    int err; /* sticky: the first failure of a write */
    char tmpname[48];
    char key[MH_STORE_KEY_MAX + 1];
    uint64_t size, written;
    uint8_t sha[32];
    mh_sha256_t *h;
    /* async finish */
    uv_work_t req;
    mh_store_done_cb cb;
    void *ud;
    int sys_errno;
    const char *sys_what;
};

int mh_store_fs_upload_open(mh_store_t *s, const char *key, uint64_t size, const uint8_t sha256[32],
                            mh_fs_upload_t **out)
{
    fs_store_t *fs = as_fs(s);
    *out = NULL;
    if (!fs) return MH_EINVAL;
    size_t kn = key ? strnlen(key, MH_STORE_KEY_MAX + 1) : 0;
    /* Only staging keys: a presigned PUT never names a final pack key. */
    int rc = (!key || kn > MH_STORE_KEY_MAX || !mh_store_key_is_staging(key, kn) || !sha256) ? MH_EINVAL : 0;
    struct stat st;
    if (rc == 0 && fstatat(fs->dirfd, key, &st, AT_SYMLINK_NOFOLLOW) == 0) rc = MH_EEXIST;
    mh_fs_upload_t *u = rc ? NULL : calloc(1, sizeof *u);
    if (rc == 0 && (!u || !(u->h = mh_sha256_new()))) rc = MH_ENOMEM;
    if (rc == 0 && random_name(u->tmpname, sizeof u->tmpname, "up-") != 0) rc = MH_EIO;
    if (rc == 0 && (u->fd = openat(fs->tmpfd, u->tmpname, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644)) < 0) {
        mh_warn("store: fs upload %s: create tmp failed: %s", key, strerror(errno));
        rc = MH_EIO;
    }
    if (rc != 0) {
        if (u) mh_sha256_free(u->h);
        free(u);
        mh_store_note(s, MH_STORE_OP_UPLOAD, rc);
        return rc;
    }
    u->fs = fs;
    memcpy(u->key, key, kn + 1);
    u->size = size;
    memcpy(u->sha, sha256, 32);
    fs->pending++;
    *out = u;
    return 0;
}

int mh_store_fs_upload_write(mh_fs_upload_t *u, const void *data, size_t n)
{
    if (u->err) return u->err;
    if (n > u->size - u->written) return u->err = MH_ELIMIT;
    int rc = write_full(u->fd, data, n);
    if (rc != 0) {
        mh_warn("store: fs upload %s: write failed: %s", u->key, strerror(-rc));
        return u->err = MH_EIO;
    }
    mh_sha256_update(u->h, data, n);
    u->written += n;
    return 0;
}

/* Loop side, before any I/O: are these the promised bytes? */
static int upload_verify(mh_fs_upload_t *u)
{
    if (u->err) return u->err;
    if (u->written != u->size) return MH_EHASH;
    uint8_t got[32];
    mh_sha256_final(u->h, got);
    return memcmp(got, u->sha, 32) == 0 ? 0 : MH_EHASH;
}

/* fsync, link into place (never replacing), drop the tmp name, fsync the
 * directory. Thread-safe: touches only u and the store's fds. */
static int upload_commit(mh_fs_upload_t *u)
{
    fs_store_t *fs = u->fs;
    int rc = 0;
    if (fsync(u->fd) != 0) {
        u->sys_what = "fsync", u->sys_errno = errno, rc = MH_EIO;
    } else if (linkat(fs->tmpfd, u->tmpname, fs->dirfd, u->key, 0) != 0) {
        if (errno == EEXIST) rc = MH_EEXIST;
        else u->sys_what = "link", u->sys_errno = errno, rc = MH_EIO;
    }
    unlinkat(fs->tmpfd, u->tmpname, 0);
    if (rc == 0 && fsync(fs->incomingfd) != 0) u->sys_what = "fsync dir", u->sys_errno = errno, rc = MH_EIO;
    return rc;
}

/* Loop side, last step of every upload: counts, logs, frees. The tmp
 * name is always dropped (a no-op when the commit already did): whatever
 * happened, nothing is left in tmp/. */
static int upload_end(mh_fs_upload_t *u, int rc)
{
    fs_store_t *fs = u->fs;
    unlinkat(fs->tmpfd, u->tmpname, 0);
    close(u->fd);
    if (u->sys_what) mh_warn("store: fs upload %s: %s failed: %s", u->key, u->sys_what, strerror(u->sys_errno));
    else if (rc == MH_EHASH)
        mh_info("store: fs upload %s refused: %" PRIu64 " of %" PRIu64 " bytes or SHA-256 differ", u->key,
                u->written, u->size);
    if (rc == 0) fs->base.bytes_written += u->size;
    mh_store_note(&fs->base, MH_STORE_OP_UPLOAD, rc);
    mh_sha256_free(u->h);
    free(u);
    fs_release(fs);
    return rc;
}

int mh_store_fs_upload_finish(mh_fs_upload_t *u)
{
    int rc = upload_verify(u);
    return upload_end(u, rc != 0 ? rc : upload_commit(u));
}

static void upload_work_cb(uv_work_t *req)
{
    mh_fs_upload_t *u = req->data;
    if (!u->err) u->err = upload_commit(u);
}

static void upload_after_cb(uv_work_t *req, int status)
{
    mh_fs_upload_t *u = req->data;
    mh_store_done_cb cb = u->cb;
    void *ud = u->ud;
    int rc = u->err ? u->err : status ? MH_ECANCELED : 0;
    /* Keep the store alive across the callback (it may close the store). */
    fs_store_t *fs = u->fs;
    fs->pending++;
    upload_end(u, rc);
    cb(ud, rc);
    fs_release(fs);
}

void mh_store_fs_upload_finish_async(mh_fs_upload_t *u, mh_store_done_cb cb, void *ud)
{
    u->cb = cb;
    u->ud = ud;
    u->err = upload_verify(u);
    u->req.data = u;
    uv_queue_work(u->fs->base.loop, &u->req, upload_work_cb, upload_after_cb);
}

void mh_store_fs_upload_abort(mh_fs_upload_t *u)
{
    if (u) upload_end(u, MH_ECANCELED);
}

/* --------------------------------------------------------- direct reads */

int mh_store_fs_open_read(mh_store_t *s, const char *key, int *fd, uint64_t *size)
{
    fs_store_t *fs = as_fs(s);
    *fd = -1;
    if (!fs) return MH_EINVAL;
    size_t kn = key ? strnlen(key, MH_STORE_KEY_MAX + 1) : 0;
    int rc = 0;
    struct stat st;
    if (!key || kn > MH_STORE_KEY_MAX || !mh_store_key_valid(key, kn)) {
        rc = MH_EINVAL;
    } else if ((*fd = openat(fs->dirfd, key, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)) < 0) {
        rc = err_of_errno(errno);
        if (rc != MH_ENOENT) mh_warn("store: fs open %s failed: %s", key, strerror(errno));
    } else if (fstat(*fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(*fd);
        *fd = -1;
        rc = MH_ENOENT;
    } else {
        *size = (uint64_t)st.st_size;
        /* Counted as read when opened: the hub streams it from here. */
        fs->base.bytes_read += *size;
    }
    mh_store_note(s, MH_STORE_OP_OPEN_READ, rc);
    return rc;
}

/* ------------------------------------------------------- open and close */

/* mkdir -p: creates dir and its missing parents with mode 0755. */
static int mkdir_p(const char *dir)
{
    char *p = strdup(dir);
    if (!p) return MH_ENOMEM;
    int rc = 0;
    for (char *c = p + 1; *c && rc == 0; c++) {
        if (*c != '/') continue;
        *c = 0;
        if (mkdir(p, 0755) != 0 && errno != EEXIST) rc = -errno;
        *c = '/';
    }
    if (rc == 0 && mkdir(p, 0755) != 0 && errno != EEXIST) rc = -errno;
    free(p);
    return rc;
}

static int open_subdir(int dirfd, const char *name, int *out)
{
    if (mkdirat(dirfd, name, 0755) != 0 && errno != EEXIST) return -errno;
    *out = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    return *out < 0 ? -errno : 0;
}

static int read_secret(fs_store_t *fs, int fd)
{
    char buf[1024];
    ssize_t n;
    do n = read(fd, buf, sizeof buf);
    while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' || buf[n - 1] == '\t')) n--;
    if (n < 32 || n == (ssize_t)sizeof buf) {
        mh_error("store: %s/" SECRET_FILE " must hold 32 to 1023 characters", fs->dir);
        return MH_EINVAL;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && (st.st_mode & 077))
        mh_warn("store: %s/" SECRET_FILE " is readable by others (mode %03o)", fs->dir, st.st_mode & 0777);
    fs->secret = malloc((size_t)n);
    if (!fs->secret) return MH_ENOMEM;
    memcpy(fs->secret, buf, (size_t)n);
    fs->secret_len = (size_t)n;
    memset(buf, 0, sizeof buf);
    return 0;
}

/* Writes a fresh secret to tmp/ (0600, fsynced) and links it into place.
 * link(2) is the O_EXCL of a complete file: if another process won the
 * race, ours is dropped and theirs is read, and no process can ever read
 * a half-written secret. */
static int create_secret(fs_store_t *fs)
{
    uint8_t r[32];
    char hex[66], name[48];
    int rc = mh_random(r, sizeof r);
    if (rc == 0) rc = random_name(name, sizeof name, "secret-");
    if (rc != 0) return MH_EIO;
    mh_hex_encode(hex, r, sizeof r);
    memset(r, 0, sizeof r);
    strcat(hex, "\n");
    int fd = openat(fs->tmpfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    if (fchmod(fd, 0600) != 0 || write_full(fd, hex, 65) != 0 || fsync(fd) != 0) rc = -errno;
    close(fd);
    memset(hex, 0, sizeof hex);
    if (rc == 0 && linkat(fs->tmpfd, name, fs->dirfd, SECRET_FILE, 0) != 0 && errno != EEXIST) rc = -errno;
    unlinkat(fs->tmpfd, name, 0);
    if (rc == 0 && fsync(fs->dirfd) != 0) rc = -errno;
    return rc;
}

static int load_secret(fs_store_t *fs, const mh_store_config_t *cfg)
{
    if (cfg->signing_secret && *cfg->signing_secret) {
        fs->secret_len = strlen(cfg->signing_secret);
        fs->secret = malloc(fs->secret_len);
        if (!fs->secret) return MH_ENOMEM;
        memcpy(fs->secret, cfg->signing_secret, fs->secret_len);
        return 0;
    }
    int fd = openat(fs->dirfd, SECRET_FILE, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0 && errno == ENOENT) {
        int rc = create_secret(fs);
        if (rc != 0) return rc;
        mh_info("store: created signing secret %s/" SECRET_FILE, fs->dir);
        fd = openat(fs->dirfd, SECRET_FILE, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    }
    if (fd < 0) return -errno;
    int rc = read_secret(fs, fd);
    close(fd);
    return rc;
}

/* Removes tmp/ files left by a crash. Only stale ones: other processes
 * sharing the directory may be writing theirs right now. */
static void sweep_tmp(fs_store_t *fs)
{
    int fd = dup(fs->tmpfd);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) {
        if (fd >= 0) close(fd);
        return;
    }
    int64_t cutoff = mh_unix_time() - TMP_STALE_S;
    unsigned removed = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        struct stat st;
        if (e->d_name[0] == '.') continue;
        if (fstatat(fs->tmpfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) continue;
        if ((int64_t)st.st_mtime < cutoff && unlinkat(fs->tmpfd, e->d_name, 0) == 0) removed++;
    }
    closedir(d);
    if (removed) mh_info("store: removed %u stale temporary files from %s/tmp", removed, fs->dir);
}

/* Opens the directory tree; tmp/ must share a filesystem with the key
 * directories or rename/link would not be atomic (or possible). */
static int open_dirs(fs_store_t *fs)
{
    int rc = mkdir_p(fs->dir);
    if (rc != 0) return rc;
    fs->dirfd = open(fs->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fs->dirfd < 0) return -errno;
    if ((rc = open_subdir(fs->dirfd, "mpacks", &fs->mpacksfd)) != 0 ||
        (rc = open_subdir(fs->dirfd, "incoming", &fs->incomingfd)) != 0 ||
        (rc = open_subdir(fs->dirfd, "tmp", &fs->tmpfd)) != 0)
        return rc;
    struct stat a, b, c;
    if (fstat(fs->tmpfd, &a) != 0 || fstat(fs->mpacksfd, &b) != 0 || fstat(fs->incomingfd, &c) != 0) return -errno;
    if (a.st_dev != b.st_dev || a.st_dev != c.st_dev) {
        mh_error("store: %s/tmp, mpacks and incoming must be on one filesystem", fs->dir);
        return MH_EINVAL;
    }
    return 0;
}

static int fs_init(fs_store_t *fs, const mh_store_config_t *cfg, const char *dir)
{
    int rc;
    fs->dir = strdup(dir);
    if (!fs->dir) return MH_ENOMEM;
    if (cfg->public_url && *cfg->public_url) {
        size_t n = strlen(cfg->public_url);
        while (n > 0 && cfg->public_url[n - 1] == '/') n--;
        if (!(fs->public_url = strndup(cfg->public_url, n))) return MH_ENOMEM;
    }
    if ((rc = open_dirs(fs)) != 0) {
        mh_error("store: cannot open fs store %s: %s", dir, mh_strerror(rc));
        return rc;
    }
    if ((rc = load_secret(fs, cfg)) != 0) {
        mh_error("store: no signing secret for %s: %s", dir, mh_strerror(rc));
        return rc;
    }
    sweep_tmp(fs);
    return 0;
}

int mh_store_fs_open(uv_loop_t *loop, const mh_store_config_t *cfg, const char *dir, mh_store_t **out)
{
    fs_store_t *fs = calloc(1, sizeof *fs);
    if (!fs) return MH_ENOMEM;
    fs->base.ops = &mh_store_fs_ops;
    fs->base.loop = loop;
    fs->dirfd = fs->mpacksfd = fs->incomingfd = fs->tmpfd = -1;
    int rc = fs_init(fs, cfg, dir);
    if (rc != 0) {
        fs_free(fs);
        return rc;
    }
    *out = &fs->base;
    return 0;
}

/* Frees now, or after the last in-flight op / open upload finishes. */
static void fs_close(mh_store_t *s)
{
    fs_store_t *fs = (fs_store_t *)s;
    fs->closing = true;
    if (fs->pending == 0) fs_free(fs);
}

const mh_store_ops_t mh_store_fs_ops = {
    .kind = "fs",
    .get = fs_get,
    .get_ranges = fs_get_ranges,
    .put = fs_put,
    .move = fs_move,
    .del = fs_delete,
    .head = fs_head,
    .presign = fs_presign,
    .close = fs_close,
};
