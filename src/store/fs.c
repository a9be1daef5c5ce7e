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
 *  - Streams (writers, uploads, readers) have at most one thread-pool job
 *    in flight each, so a stream's bytes, hash and file offset are only
 *    ever touched by one thread at a time, in order; their memory is two
 *    chunks or two windows.
 *  - A full or read-only filesystem is MH_ENOSPC on every write path
 *    (err_of_errno), logged once when it starts and once when writes
 *    succeed again (note_space).
 */
#include <dirent.h>
#include <stddef.h>
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

/* Streams default to 4 MiB chunks and windows: large enough that a
 * pwrite/pread per chunk costs nothing next to the bytes, small enough
 * that two of them per stream stay far below the pack-memory budget. */
#define CHUNK_DEFAULT (4u * 1024u * 1024u)
/* Uploads through /_store/ (one per HTTP connection). */
#define UPLOAD_CHUNK (1u * 1024u * 1024u)

typedef struct fs_defer fs_defer_t;
/* A piece of work to run on a later loop turn (a stream's callback). */
struct fs_defer {
    fs_defer_t *next;
    void (*fn)(fs_defer_t *d);
    bool queued;
};

typedef struct {
    mh_store_t base;
    int dirfd, mpacksfd, incomingfd, tmpfd;
    char *dir;
    char *public_url; /* without a trailing '/'; NULL: presign disabled */
    uint8_t *secret;
    size_t secret_len;
    unsigned pending; /* ops queued + streams open + deferred work */
    bool closing;
    bool full;        /* the last write failed for want of space (logged) */
    uv_idle_t idle;   /* runs deferred work */
    bool idle_init;
    fs_defer_t *defer_head, *defer_tail;
} fs_store_t;

/* ----------------------------------------------------------------- utils */

static fs_store_t *as_fs(mh_store_t *s)
{
    return (s && s->ops == &mh_store_fs_ops) ? (fs_store_t *)s : NULL;
}

static void fs_free_now(fs_store_t *fs)
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

static void idle_closed_cb(uv_handle_t *h)
{
    fs_free_now(h->data);
}

/* The last user of a closed store is gone: close the idle handle, free
 * in its close callback. */
static void fs_free(fs_store_t *fs)
{
    if (!fs->idle_init) {
        fs_free_now(fs);
        return;
    }
    fs->idle_init = false;
    uv_close((uv_handle_t *)&fs->idle, idle_closed_cb);
}

/* Called after an op or upload is finished: frees a closed store once the
 * last user is gone. */
static void fs_release(fs_store_t *fs)
{
    fs->pending--;
    if (fs->closing && fs->pending == 0) fs_free(fs);
}

/* ENOSPC, EDQUOT and EROFS mean the same to a client: the store cannot
 * take more bytes (SPEC 4.8: 507). */
static int err_of_errno(int e)
{
    if (e == ENOENT || e == ENOTDIR) return MH_ENOENT;
    if (e == ENOSPC || e == EDQUOT || e == EROFS) return MH_ENOSPC;
    return MH_EIO;
}

/* After every write path (loop thread): one error line when the store
 * becomes full or read-only, one info line when writes succeed again,
 * nothing in between however many requests fail. */
static void note_space(fs_store_t *fs, int err, int sys_errno)
{
    if (err == MH_ENOSPC && !fs->full) {
        fs->full = true;
        mh_error("store: fs %s cannot take more bytes (%s): writes are refused with 507 until space is freed",
                 fs->dir, strerror(sys_errno ? sys_errno : ENOSPC));
    } else if (err == 0 && fs->full) {
        fs->full = false;
        mh_info("store: fs %s accepts writes again", fs->dir);
    }
}

/* --------------------------------------------------------------- defer */

static void idle_cb(uv_idle_t *h)
{
    fs_store_t *fs = h->data;
    fs_defer_t *list = fs->defer_head, *last = fs->defer_tail;
    fs->defer_head = fs->defer_tail = NULL;
    uv_idle_stop(h);
    fs->pending++; /* the store outlives this loop even if a callback closes it */
    while (list) {
        fs_defer_t *d = list, *nx = d->next;
        bool end = d == last;
        d->queued = false;
        d->next = NULL;
        d->fn(d); /* may free d */
        fs_release(fs);
        if (end) break;
        list = nx;
    }
    fs_release(fs);
}

/* Runs d->fn(d) on a later loop turn (once, however often it is asked
 * before that). The store stays alive until it ran. */
static void fs_defer(fs_store_t *fs, fs_defer_t *d, void (*fn)(fs_defer_t *d))
{
    if (d->queued) return;
    d->queued = true;
    d->fn = fn;
    d->next = NULL;
    if (fs->defer_tail) fs->defer_tail->next = d;
    else fs->defer_head = d;
    fs->defer_tail = d;
    fs->pending++;
    uv_idle_start(&fs->idle, idle_cb);
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

static int sweep_tmp_dir(const fs_store_t *fs, uint32_t older_than_s, unsigned *removed);

/* ----------------------------------------------------------- async ops */

typedef enum { OP_GET, OP_RANGES, OP_PUT, OP_MOVE, OP_DELETE, OP_HEAD, OP_LIST, OP_SWEEP } op_kind_t;

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
    /* list: the page (names in `buf`, entries point into it) */
    char after[MH_STORE_KEY_MAX + 1];
    mh_store_entry_t *entries;
    size_t nentries;
    bool more;
    /* sweep */
    uint32_t older_than_s;
    unsigned removed;
    union {
        mh_store_get_cb get;
        mh_store_done_cb done;
        mh_store_head_cb head;
        mh_store_list_cb list;
        mh_store_count_cb count;
    } cb;
    void *ud;
} fs_op_t;

static const mh_store_op_t op_metric[] = {
    [OP_GET] = MH_STORE_OP_GET,         [OP_RANGES] = MH_STORE_OP_GET_RANGES, [OP_PUT] = MH_STORE_OP_PUT,
    [OP_MOVE] = MH_STORE_OP_MOVE,       [OP_DELETE] = MH_STORE_OP_DELETE,     [OP_HEAD] = MH_STORE_OP_HEAD,
    [OP_LIST] = MH_STORE_OP_LIST,       [OP_SWEEP] = MH_STORE_OP_SWEEP_TMP,
};
static const char *const op_label[] = {
    [OP_GET] = "get", [OP_RANGES] = "get_ranges", [OP_PUT] = "put",
    [OP_MOVE] = "move", [OP_DELETE] = "delete", [OP_HEAD] = "head",
    [OP_LIST] = "list", [OP_SWEEP] = "sweep_tmp",
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

/* Page size of a listing (S3's ListObjectsV2 maximum). */
#define LIST_PAGE 1000

typedef struct {
    char name[MH_STORE_KEY_MAX + 1];
    uint64_t size;
    int64_t mtime;
} list_ent_t;

static int ent_cmp(const void *a, const void *b)
{
    return strcmp(((const list_ent_t *)a)->name, ((const list_ent_t *)b)->name);
}

/* Keeps the LIST_PAGE smallest keys above `after`: a bounded array that
 * is sorted and cut whenever it doubles, so memory stays O(page) for a
 * directory of any size. */
static void do_list(fs_op_t *op)
{
    const char *sub = op->key[0] == 'm' ? "mpacks" : "incoming";
    int dfd = openat(op->fs->dirfd, sub, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!d) {
        op_fail(op, "opendir", -errno);
        if (dfd >= 0) close(dfd);
        return;
    }
    size_t cap = 2 * LIST_PAGE, n = 0, plen = strlen(op->key);
    list_ent_t *ents = malloc(cap * sizeof *ents);
    struct dirent *e;
    while (ents && (e = readdir(d)) != NULL) {
        list_ent_t *x = &ents[n];
        struct stat st;
        int kn = snprintf(x->name, sizeof x->name, "%s%s", op->key, e->d_name);
        if (kn < 0 || (size_t)kn > MH_STORE_KEY_MAX || !mh_store_key_valid(x->name, (size_t)kn)) continue;
        if (op->after[0] && strcmp(x->name, op->after) <= 0) continue;
        if (fstatat(dfd, x->name + plen, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) continue;
        x->size = (uint64_t)st.st_size;
        x->mtime = (int64_t)st.st_mtime;
        if (++n == cap) {
            qsort(ents, n, sizeof *ents, ent_cmp);
            n = LIST_PAGE + 1; /* one more than a page tells "more follow" */
        }
    }
    closedir(d);
    if (!ents) {
        op->err = MH_ENOMEM;
        return;
    }
    qsort(ents, n, sizeof *ents, ent_cmp);
    op->more = n > LIST_PAGE;
    if (op->more) n = LIST_PAGE;
    op->entries = n ? malloc(n * sizeof *op->entries) : NULL;
    if (n && (!op->entries || mh_buf_reserve(&op->buf, n * sizeof *ents) != 0)) {
        op->err = MH_ENOMEM;
    } else if (n) {
        memcpy(op->buf.p, ents, n * sizeof *ents);
        const list_ent_t *kept = (const list_ent_t *)op->buf.p;
        for (size_t i = 0; i < n; i++)
            op->entries[i] = (mh_store_entry_t){kept[i].name, kept[i].size, kept[i].mtime};
        op->nentries = n;
    }
    free(ents);
}

static void do_sweep(fs_op_t *op)
{
    int rc = sweep_tmp_dir(op->fs, op->older_than_s, &op->removed);
    if (rc != 0) op_fail(op, "sweep tmp", rc);
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
    case OP_LIST: do_list(op); break;
    case OP_SWEEP: do_sweep(op); break;
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
    if (op->kind == OP_PUT || op->kind == OP_MOVE) note_space(fs, op->err, op->sys_errno);
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
    case OP_LIST:
        op->cb.list(op->ud, op->err, op->err ? NULL : op->entries, op->err ? 0 : op->nentries,
                    !op->err && op->more ? op->entries[op->nentries - 1].key : NULL);
        free(op->entries);
        mh_buf_free(&op->buf);
        break;
    case OP_SWEEP:
        if (op->removed) mh_info("store: removed %u stale temporary files from %s/tmp", op->removed, fs->dir);
        op->cb.count(op->ud, op->err, op->removed);
        break;
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

static void fs_list(mh_store_t *s, const char *prefix, const char *after, mh_store_list_cb cb, void *ud)
{
    fs_op_t *op = op_new(s, OP_LIST, ud);
    op->cb.list = cb;
    if (!prefix || (strcmp(prefix, "mpacks/") != 0 && strcmp(prefix, "incoming/") != 0)) op->err = MH_EINVAL;
    else memcpy(op->key, prefix, strlen(prefix) + 1);
    if (after && strlen(after) > MH_STORE_KEY_MAX) op->err = MH_EINVAL;
    else if (after) memcpy(op->after, after, strlen(after) + 1);
    op_submit(op);
}

static void fs_sweep_tmp(mh_store_t *s, uint32_t older_than_s, mh_store_count_cb cb, void *ud)
{
    fs_op_t *op = op_new(s, OP_SWEEP, ud);
    op->cb.count = cb;
    op->older_than_s = older_than_s;
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

/* ----------------------------------------------------- streaming writer */

/* A writer (mh_store_writer_*) or an upload (the presigned PUT route):
 * bytes fill `fill`; a full chunk moves to `flight` and one thread-pool
 * job creates the temporary file if needed, hashes and writes it while
 * the next chunk fills. finish runs one last job: the rest of the bytes,
 * fsync, the hash, the checks, link(2) into place, unlink of the
 * temporary name, fsync of the directory. At most one job is in flight. */
typedef enum { W_WRITER, W_UPLOAD } w_mode_t;
typedef enum { J_FLUSH, J_FINAL, J_CLEANUP } w_job_t;

typedef struct {
    struct mh_store_writer head;
    fs_store_t *fs;
    w_mode_t mode;
    int fd;           /* -1 until a job creates the temporary file */
    char tmpname[48];
    mh_buf_t flight;  /* the chunk on the thread pool (head.fill fills) */
    mh_sha256_t *h;   /* NULL: the caller hashes */
    uint8_t sha[32];  /* final digest (J_FINAL) */
    bool busy, ended;
    w_job_t job;
    int job_err, sys_errno; /* of the job that just ran (pool side) */
    const char *sys_what;
    uint64_t flushed;       /* bytes on disk */
    fs_defer_t wdefer; /* the write callback, on a later turn */
    uint8_t up_sha[32]; /* upload: the signed hash (the length is head.limit) */
    uv_work_t req;
} fs_writer_t;

static fs_writer_t *as_writer(mh_store_writer_t *w)
{
    return (fs_writer_t *)w;
}

static void w_pump(fs_writer_t *w);

/* Records a failed system call of a job (pool thread). A missing
 * directory is a store failure here, never "not found". */
static int w_fail(fs_writer_t *w, const char *what, int neg_errno)
{
    int rc = err_of_errno(-neg_errno);
    w->sys_what = what;
    w->sys_errno = -neg_errno;
    return w->job_err = rc == MH_ENOENT ? MH_EIO : rc;
}

/* Pool: creates the temporary file on first use, hashes and appends b. */
static int w_write_buf(fs_writer_t *w, mh_buf_t *b)
{
    if (w->fd < 0) {
        if (random_name(w->tmpname, sizeof w->tmpname, w->mode == W_UPLOAD ? "up-" : "w-") != 0)
            return w->job_err = MH_EIO;
        w->fd = openat(w->fs->tmpfd, w->tmpname, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (w->fd < 0) {
            w->tmpname[0] = 0;
            return w_fail(w, "create tmp", -errno);
        }
    }
    if (b->len == 0) return 0;
    if (w->h) mh_sha256_update(w->h, b->p, b->len);
    int rc = write_full(w->fd, b->p, b->len);
    if (rc != 0) return w_fail(w, "write", rc);
    w->flushed += b->len;
    b->len = 0;
    return 0;
}

/* Pool: the last job of a finish. */
static void w_final(fs_writer_t *w)
{
    fs_store_t *fs = w->fs;
    if (w_write_buf(w, &w->head.fill) != 0) return;
    if (fsync(w->fd) != 0) {
        w_fail(w, "fsync", -errno);
        return;
    }
    if (w->h) mh_sha256_final(w->h, w->sha);
    if (w->mode == W_UPLOAD) {
        if (w->flushed != w->head.limit || memcmp(w->sha, w->up_sha, 32) != 0) {
            w->job_err = MH_EHASH;
            return;
        }
    } else if (!w->head.key_given) {
        char hex[65];
        mh_hex_encode(hex, w->sha, 32);
        snprintf(w->head.key, sizeof w->head.key, "mpacks/%s", hex);
    } else if (w->h) {
        uint8_t want[32];
        if (mh_hex_decode(want, w->head.key + 7, 32) != 0 || memcmp(want, w->sha, 32) != 0) {
            w->job_err = MH_EHASH;
            return;
        }
    }
    /* link(2) never replaces: an upload finds its staging key taken
     * (MH_EEXIST); a content-addressed pack that exists holds these very
     * bytes, so ours are simply dropped. */
    if (linkat(fs->tmpfd, w->tmpname, fs->dirfd, w->head.key, 0) != 0) {
        if (errno != EEXIST) w_fail(w, "link", -errno);
        else if (w->mode == W_UPLOAD) w->job_err = MH_EEXIST;
        return;
    }
    if (fsync(parent_fd(fs, w->head.key)) != 0) w_fail(w, "fsync dir", -errno);
}

static void w_work_cb(uv_work_t *req)
{
    fs_writer_t *w = req->data;
    switch (w->job) {
    case J_FLUSH: w_write_buf(w, &w->flight); break;
    case J_FINAL: w_final(w); break;
    case J_CLEANUP: break;
    }
    /* Every job that ends the stream drops the temporary name and the fd. */
    if (w->job != J_FLUSH || w->job_err) {
        if (w->fd >= 0) close(w->fd);
        w->fd = -1;
        if (w->tmpname[0]) unlinkat(w->fs->tmpfd, w->tmpname, 0);
        w->tmpname[0] = 0;
    }
}

static void w_free(fs_writer_t *w)
{
    fs_store_t *fs = w->fs;
    mh_buf_free(&w->head.fill);
    mh_buf_free(&w->flight);
    mh_sha256_free(w->h);
    free(w);
    fs_release(fs);
}

static void w_wcb_defer_cb(fs_defer_t *d)
{
    fs_writer_t *w = (fs_writer_t *)((char *)d - offsetof(fs_writer_t, wdefer));
    if (w->head.aborted) {
        w_pump(w); /* may free w */
        return;
    }
    mh_store_writer_fire(&w->head);
}

/* Loop: the end of a finish (or of an abort's cleanup): logs, counts,
 * calls back (unless aborted), then frees — or, while a deferred write
 * callback is still queued, lets that deferred call come back here. */
static void w_end(fs_writer_t *w, int rc)
{
    fs_store_t *fs = w->fs;
    if (!w->ended) {
        w->ended = true;
        if (w->sys_what)
            mh_warn("store: fs %s %s: %s failed: %s", w->mode == W_UPLOAD ? "upload" : "writer",
                    w->head.key[0] ? w->head.key : "(unnamed)", w->sys_what, strerror(w->sys_errno));
        else if (rc == MH_EHASH && w->mode == W_UPLOAD)
            mh_info("store: fs upload %s refused: %" PRIu64 " of %" PRIu64 " bytes or SHA-256 differ", w->head.key,
                    w->head.size, w->head.limit);
        if (rc == 0 || rc == MH_ENOSPC) note_space(fs, rc, w->sys_errno);
        if (rc == 0) fs->base.bytes_written += w->head.size;
        mh_store_note(&fs->base, w->mode == W_UPLOAD ? MH_STORE_OP_UPLOAD : MH_STORE_OP_WRITER,
                      w->head.aborted ? MH_ECANCELED : rc);
        if (!w->head.aborted) {
            if (!w->head.err) w->head.err = rc;
            mh_store_writer_fire(&w->head); /* an outstanding write callback goes first */
            if (w->head.fcb) w->head.fcb(w->head.fud, rc, rc == 0 && w->h ? w->sha : NULL, w->head.size);
        }
    }
    if (w->wdefer.queued) {
        w->head.aborted = true;
        w->head.fcb = NULL;
        w->head.wcb = NULL;
        return;
    }
    w_free(w);
}

static void w_after_cb(uv_work_t *req, int status)
{
    fs_writer_t *w = req->data;
    w->busy = false;
    int rc = w->job_err ? w->job_err : status ? MH_ECANCELED : 0;
    w->job_err = 0;
    if (w->job == J_FLUSH) {
        if (rc && !w->head.err) {
            w->head.err = rc;
            /* Logged now: an upload answers 507 and aborts right away. */
            if (rc == MH_ENOSPC) note_space(w->fs, rc, w->sys_errno);
        }
        w_pump(w);
        return;
    }
    w_end(w, w->job == J_CLEANUP ? (w->head.err ? w->head.err : MH_ECANCELED) : rc);
}

static void w_submit(fs_writer_t *w, w_job_t job)
{
    w->busy = true;
    w->job = job;
    w->req.data = w;
    uv_queue_work(w->fs->base.loop, &w->req, w_work_cb, w_after_cb);
}

/* Loop: decides the next job, and whether the write callback may fire. */
static void w_pump(fs_writer_t *w)
{
    if (w->busy) return;
    if (w->head.aborted) {
        if (w->wdefer.queued) return; /* the deferred callback comes back here */
        if (!w->ended && (w->fd >= 0 || w->tmpname[0])) w_submit(w, J_CLEANUP);
        else w_end(w, MH_ECANCELED);
        return;
    }
    if (mh_store_writer_full(&w->head)) {
        mh_store_writer_swap(&w->head, &w->flight);
        w_submit(w, J_FLUSH);
    } else if (w->head.finishing) {
        w_submit(w, w->head.err ? J_CLEANUP : J_FINAL);
        return;
    }
    if (mh_store_writer_room_due(&w->head)) fs_defer(w->fs, &w->wdefer, w_wcb_defer_cb);
}

static fs_writer_t *w_new(fs_store_t *fs, w_mode_t mode, size_t chunk, bool hash)
{
    fs_writer_t *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    if (hash && !(w->h = mh_sha256_new())) {
        free(w);
        return NULL;
    }
    mh_store_writer_init(&w->head, &fs->base, chunk, hash);
    w->fs = fs;
    w->mode = mode;
    w->fd = -1;
    fs->pending++;
    return w;
}

static int fs_writer_open(mh_store_t *s, size_t chunk, bool hash, mh_store_writer_t **out)
{
    fs_store_t *fs = (fs_store_t *)s;
    if (fs->closing) return MH_EINVAL;
    fs_writer_t *w = w_new(fs, W_WRITER, chunk, hash);
    if (!w) return MH_ENOMEM;
    *out = &w->head;
    return 0;
}

static void fs_writer_pump(mh_store_writer_t *ww)
{
    w_pump(as_writer(ww));
}

int mh_store_fs_upload_open(mh_store_t *s, const char *key, uint64_t size, const uint8_t sha256[32],
                            mh_store_writer_t **out)
{
    fs_store_t *fs = as_fs(s);
    *out = NULL;
    if (!fs || fs->closing) return MH_EINVAL;
    size_t kn = key ? strnlen(key, MH_STORE_KEY_MAX + 1) : 0;
    /* Only staging keys: a presigned PUT never names a final pack key. */
    int rc = (!key || kn > MH_STORE_KEY_MAX || !mh_store_key_is_staging(key, kn) || !sha256) ? MH_EINVAL : 0;
    struct stat st;
    if (rc == 0 && fstatat(fs->dirfd, key, &st, AT_SYMLINK_NOFOLLOW) == 0) rc = MH_EEXIST;
    fs_writer_t *w = rc ? NULL : w_new(fs, W_UPLOAD, UPLOAD_CHUNK, true);
    if (rc == 0 && !w) rc = MH_ENOMEM;
    if (rc != 0) {
        mh_store_note(s, MH_STORE_OP_UPLOAD, rc);
        return rc;
    }
    memcpy(w->head.key, key, kn + 1);
    w->head.limit = size;
    w->head.key_fixed = true;
    memcpy(w->up_sha, sha256, 32);
    *out = &w->head;
    return 0;
}

/* ----------------------------------------------------- streaming reader */

/* The head (store_int.h) holds the plan and the two buffers; this adds
 * the file and the job. The first job opens the file, learns its size and
 * builds the plan; every job reads one run into a free buffer. */
typedef struct {
    struct mh_store_reader head;
    fs_store_t *fs;
    char key[MH_STORE_KEY_MAX + 1];
    mh_range_t single;        /* sequential: the one range */
    mh_range_t *ranges;       /* a copy: the planning job may still run after close */
    size_t nranges;           /* sequential: 1 */
    int fd;
    bool busy, closed;
    int job_buf, job_err, sys_errno;
    const char *sys_what;
    uv_work_t req;
    fs_defer_t defer;
} fs_reader_t;

static void r_pump(fs_reader_t *r, bool may_call);

static void r_read_job(fs_reader_t *r)
{
    mh_store_reader_t *h = &r->head;
    if (r->fd < 0) {
        r->fd = openat(r->fs->dirfd, r->key, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        struct stat st;
        if (r->fd < 0 || fstat(r->fd, &st) != 0) {
            r->sys_what = "open", r->sys_errno = errno, r->job_err = err_of_errno(errno);
            return;
        }
        if (!S_ISREG(st.st_mode)) {
            r->job_err = MH_ENOENT;
            return;
        }
        h->size = (uint64_t)st.st_size;
    }
    if (!h->planned) {
        const mh_range_t *rg = r->ranges ? r->ranges : &r->single;
        if ((r->job_err = mh_store_plan_build(rg, r->nranges, h->size, h->window, &h->plan)) != 0)
            return;
        h->planned = true;
    }
    const mh_store_run_t *run = &h->plan.runs[h->next_read];
    mh_buf_t *b = &h->buf[r->job_buf];
    b->len = 0;
    if (run->len == 0) return;
    if (b->cap < run->len && mh_buf_reserve(b, (size_t)run->len) != 0) {
        r->job_err = MH_ENOMEM;
        return;
    }
    int rc = pread_full(r->fd, b->p, (size_t)run->len, run->off);
    if (rc != 0) {
        r->sys_what = "pread", r->sys_errno = -rc, r->job_err = MH_EIO;
        return;
    }
    b->len = (size_t)run->len;
}

static void r_work_cb(uv_work_t *req)
{
    r_read_job(req->data);
}

static void r_free(fs_reader_t *r)
{
    fs_store_t *fs = r->fs;
    if (r->fd >= 0) close(r->fd);
    mh_store_note(&fs->base, MH_STORE_OP_READER, r->head.err);
    mh_store_reader_fini(&r->head);
    free(r->ranges);
    free(r);
    fs_release(fs);
}

static void r_after_cb(uv_work_t *req, int status)
{
    fs_reader_t *r = req->data;
    mh_store_reader_t *h = &r->head;
    r->busy = false;
    int rc = r->job_err ? r->job_err : status ? MH_ECANCELED : 0;
    if (rc && !h->err) {
        h->err = rc;
        if (r->sys_what && r->sys_errno != ENOENT)
            mh_warn("store: fs reader %s: %s failed: %s", r->key, r->sys_what, strerror(r->sys_errno));
    }
    if (!rc) {
        r->fs->base.bytes_read += h->buf[r->job_buf].len;
        mh_store_reader_filled(h, r->job_buf);
    } else {
        h->bstate[r->job_buf] = MH_RBUF_FREE;
    }
    r_pump(r, true);
}

static void r_defer_cb(fs_defer_t *d)
{
    r_pump((fs_reader_t *)((char *)d - offsetof(fs_reader_t, defer)), true);
}

/* Delivers what is due (only where calling back is allowed: may_call),
 * then starts the next read ahead. */
static void r_pump(fs_reader_t *r, bool may_call)
{
    mh_store_reader_t *h = &r->head;
    if (r->closed) {
        if (!r->busy && !r->defer.queued) r_free(r);
        return;
    }
    if (mh_store_reader_due(h)) {
        if (!may_call) {
            fs_defer(r->fs, &r->defer, r_defer_cb);
            return;
        }
        mh_store_window_t win;
        int k = mh_store_reader_take(h, &win);
        if (k < 0) {
            h->cb(h->ud, k, NULL); /* the consumer closes */
            return;
        }
        r_pump(r, false); /* read ahead before handing the window over */
        if (!r->closed) h->cb(h->ud, 0, &win);
        return;
    }
    if (h->err || r->busy || (h->planned && h->next_read >= h->plan.nruns)) return;
    int fb = mh_store_reader_free_buf(h);
    if (fb < 0) return;
    r->busy = true;
    r->job_buf = fb;
    h->bstate[fb] = MH_RBUF_READING;
    r->req.data = r;
    uv_queue_work(r->fs->base.loop, &r->req, r_work_cb, r_after_cb);
}

static int fs_reader_open(mh_store_t *s, const char *key, const mh_range_t *ranges, size_t n, bool sequential,
                          size_t window, mh_store_window_cb cb, void *ud, mh_store_reader_t **out)
{
    fs_store_t *fs = (fs_store_t *)s;
    fs_reader_t *r = calloc(1, sizeof *r);
    if (!r) return MH_ENOMEM;
    r->head = (mh_store_reader_t){.s = s, .cb = cb, .ud = ud, .window = window};
    r->fs = fs;
    r->fd = -1;
    if (sequential) {
        r->single = ranges[0], r->nranges = 1;
    } else {
        /* The caller may free its ranges once it closed the reader, while
         * the job that plans with them is still on the thread pool. */
        r->nranges = n;
        if (!(r->ranges = malloc((n ? n : 1) * sizeof *r->ranges))) r->head.err = MH_ENOMEM;
        else if (n) memcpy(r->ranges, ranges, n * sizeof *ranges);
    }
    size_t kn = key ? strnlen(key, MH_STORE_KEY_MAX + 1) : 0;
    if (r->head.err) {
        /* reported through the callback */
    } else if (!key || kn > MH_STORE_KEY_MAX || !mh_store_key_valid(key, kn) || fs->closing) {
        r->head.err = MH_EINVAL;
    }
    else memcpy(r->key, key, kn + 1);
    fs->pending++;
    *out = &r->head;
    r_pump(r, false);
    return 0;
}

static void fs_reader_next(mh_store_reader_t *rr)
{
    fs_reader_t *r = (fs_reader_t *)rr;
    mh_store_reader_release(rr, false);
    if (!r->closed && !rr->done) r_pump(r, false);
}

static void fs_reader_close(mh_store_reader_t *rr)
{
    fs_reader_t *r = (fs_reader_t *)rr;
    r->closed = true;
    r_pump(r, false);
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

/* Removes tmp/ files older than older_than_s seconds (leftovers of a
 * crash: other processes sharing the directory may be writing younger
 * ones right now). Thread-safe; returns how many went, or -errno. */
static int sweep_tmp_dir(const fs_store_t *fs, uint32_t older_than_s, unsigned *removed)
{
    *removed = 0;
    int fd = openat(fs->dirfd, "tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) {
        int e = errno;
        if (fd >= 0) close(fd);
        return -e;
    }
    int64_t cutoff = mh_unix_time() - (int64_t)older_than_s;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        struct stat st;
        if (e->d_name[0] == '.') continue;
        if (fstatat(fs->tmpfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) continue;
        if ((int64_t)st.st_mtime < cutoff && unlinkat(fs->tmpfd, e->d_name, 0) == 0) (*removed)++;
    }
    closedir(d);
    return 0;
}

static void sweep_tmp(fs_store_t *fs)
{
    unsigned removed = 0;
    sweep_tmp_dir(fs, TMP_STALE_S, &removed);
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
        fs_free_now(fs);
        return rc;
    }
    uv_idle_init(loop, &fs->idle);
    fs->idle.data = fs;
    fs->idle_init = true;
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
    .writer_chunk_default = CHUNK_DEFAULT,
    .writer_chunk_min = MH_STORE_WINDOW_MIN,
    .writer_open = fs_writer_open,
    .writer_pump = fs_writer_pump,
    .reader_open = fs_reader_open,
    .reader_next = fs_reader_next,
    .reader_close = fs_reader_close,
    .list = fs_list,
    .sweep_tmp = fs_sweep_tmp,
};
