/*
 * upload.c — the staged-upload grant protocol of push and mpack.index
 * (mh/refwrite.h, "staged uploads"): which bytes a repository may import
 * under a pack id, reading them as a stream through the pack reader
 * within the pack-memory budget, placing them under mpacks/, and taking
 * them back when the operation that placed them failed anyway.
 *
 * The stream (mh_rw_upload_stream), one store window at a time:
 *
 *   reserve     the windows (+ a little) from the budget, then open the reader
 *   window_cb   a window arrived; the store already reads the next one
 *   parse_work  thread pool: mh_packr_feed (blob hashes, frame bounds)
 *   hash_work   thread pool, beside it: the pack's SHA-256 (untrusted bytes)
 *   worked_cb   both done: the reader's error, or the budget grown to what
 *               the reader holds now, then mh_store_reader_next
 *   finish      the last window: mh_packr_finish, the pack hash against
 *               its id, the windows given back
 *
 * Invariants:
 *  - Nothing of the pack is held but two store windows, the reader's
 *    records and the metadata it decoded (in up->arena); every byte of
 *    that is reserved from the budget before or right after it is held
 *    (SPEC 4.8), and everything is given back by mh_rw_upload_free.
 *  - The loop thread never touches up->arena or the reader while a
 *    window's work is on the thread pool.
 *  - The upload leaves its staging key only inside a transaction that
 *    holds the pack's lock (place), and comes back under the same lock
 *    when that operation failed and no row references the pack
 *    (unplace): nothing under mpacks/ is left without an mpacks row by a
 *    failed operation (issue 15 item 4).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mh/refwrite.h"

#define MAX_GRANTS 64 /* tried per unpack: a client presigning more is asking for trouble */

/* Reserved beside the two windows before the first byte (the reader's
 * fixed state); the reservation then follows mh_packr_mem. */
#define STREAM_START ((size_t)256 << 10)
/* Growth asks for at least this much more than it needs, so that a pack
 * whose metadata grows steadily does not wait for the budget per window. */
#define GROW_MIN ((size_t)1 << 20)
/* From this pack size on, v2 blobs are hashed on a second thread
 * (MH_PACKR_PARALLEL). */
#define PARALLEL_HASH_MIN ((uint64_t)1 << 20)
/* The largest window read from S3 (see default_window). */
#define S3_WINDOW ((size_t)16 << 20)

/* ============================================================== lookup */

void mh_rw_upload_init(mh_upload_t *up, mh_arena_t *a, const char *repo_id, const char *mpack_id)
{
    memset(up, 0, sizeof *up);
    up->arena = a;
    up->repo_id = repo_id;
    up->mpack_id = mpack_id;
    mh_mpack_key(up->pack_key, mpack_id);
}

static int grants_read(mh_step_t *s, PGresult *res)
{
    mh_upload_t *up = s->arg;
    int rows = PQntuples(res);
    if (!up || rows < 1) return MH_EDB;
    /* Every row repeats the two flags; grant columns are NULL without one. */
    up->referenced = mh_pq_str(res, 0, 0)[0] == 't';
    up->head_known = mh_pq_str(res, 0, 1)[0] == 't';
    up->grants = mh_calloc(up->arena, (size_t)rows * sizeof *up->grants);
    if (!up->grants) return MH_ENOMEM;
    for (int r = 0; r < rows; r++) {
        if (mh_pq_isnull(res, r, 2)) continue;
        mh_grant_t *g = &up->grants[up->ngrants++];
        g->grant_id = mh_strdup(up->arena, mh_pq_str(res, r, 2));
        g->staging_key = mh_strdup(up->arena, mh_pq_str(res, r, 3));
        g->verified = mh_pq_str(res, r, 4)[0] == 't';
        g->size = (uint64_t)mh_pq_int(res, r, 5);
        if (!g->grant_id || !g->staging_key) return MH_ENOMEM;
    }
    return 0;
}

void mh_rw_upload_lookup(mh_step_t *s, mh_upload_t *up)
{
    s->arg = up;
    char limit[8];
    snprintf(limit, sizeof limit, "%d", MAX_GRANTS);
    mh_db_pq_t q = {NULL,
                    "SELECT EXISTS (SELECT 1 FROM mpack_refs WHERE repo_id = $1 AND mpack_id = $2),"
                    " EXISTS (SELECT 1 FROM commit_refs WHERE repo_id = $1 AND commit_id = $3),"
                    " g.grant_id, g.staging_key, (g.verified_at IS NOT NULL)::text, g.size_bytes"
                    " FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT grant_id, staging_key, verified_at, size_bytes"
                    "  FROM push_grants WHERE repo_id = $1 AND mpack_key = $2 AND consumed_at IS NULL"
                    "  AND expires_at > now() ORDER BY verified_at IS NOT NULL DESC, created_at DESC LIMIT $4::int) g"
                    " ON true",
                    4,
                    (const char *const[]){up->repo_id, up->mpack_id, up->head ? up->head : "", limit},
                    NULL,
                    NULL};
    mh_step_query(s, &q, grants_read);
}

/* ============================================================== locate */

static int located(mh_step_t *s, int err, uint64_t size);

/* Looks at the next candidate: the pack key when referenced, else the
 * next grant's staged key; MH_STEP_WAIT, or 0 when none is left. */
static int locate_next(mh_step_t *s, mh_upload_t *up)
{
    if (up->referenced && !up->src) {
        up->src = up->pack_key;
        up->trusted = true;
    } else if (up->next < up->ngrants) {
        up->grant = &up->grants[up->next++];
        up->src = up->grant->staging_key;
        up->trusted = up->grant->verified;
    } else {
        up->outcome = up->ngrants || up->referenced ? MH_UPLOAD_NOT_STAGED : MH_UPLOAD_NO_GRANT;
        up->grant = NULL;
        return 0;
    }
    mh_step_head(s, up->src, located);
    return MH_STEP_WAIT;
}

static int located(mh_step_t *s, int err, uint64_t size)
{
    mh_upload_t *up = s->arg;
    if (!up) return MH_EINVAL;
    if (err == MH_ENOENT && up->grant && up->grant->verified && up->src != up->pack_key) {
        /* This grant's upload was verified by an earlier attempt that moved
         * it into place and then failed: read it from its final key. Only
         * a verified grant may (an unverified one must upload: SPEC 4.3). */
        up->src = up->pack_key;
        mh_step_head(s, up->src, located);
        return MH_STEP_WAIT;
    }
    if (err == MH_ENOENT && up->grant) return locate_next(s, up); /* nothing uploaded under this grant */
    if (err) {
        mh_step_fail(s, err == MH_ENOENT ? MH_ESTORE : err, up->src);
        return err;
    }
    up->size = size;
    up->outcome = MH_UPLOAD_READ;
    if (up->grant && up->src != up->pack_key && size != up->grant->size) up->outcome = MH_UPLOAD_SIZE_MISMATCH;
    return 0;
}

void mh_rw_upload_locate(mh_step_t *s, mh_upload_t *up)
{
    s->arg = up;
    up->next = 0;
    up->src = NULL;
    up->grant = NULL;
    locate_next(s, up); /* none to look at: no call, the outcome says why */
}

/* ============================================================== stream */

struct mh__upstream {
    mh_step_t *s;
    mh_upload_t *up;
    size_t window;
    mh_store_reader_t *rd;
    mh_store_window_t w; /* the window being worked on (a copy: the reader's is on its stack) */
    uv_work_t parse, hash;
    int pending;      /* thread-pool jobs of this window still running */
    int parse_err;    /* mh_packr_feed's */
    bool cancelled;   /* a job was cancelled (the loop is closing) */
    mh_sha256_t *sha; /* the pack's hash; NULL for trusted bytes */
};

/* The bytes the stream holds beside the reader. */
static size_t windows_mem(const mh__upstream_t *st) { return mh_store_reader_mem(st->window); }

/* Ends the stream and resumes the operation with err (0: up->pack set). */
static void stream_end(mh__upstream_t *st, int err, const char *why)
{
    mh_upload_t *up = st->up;
    mh_step_t *s = st->s;
    mh_store_reader_close(st->rd);
    mh_sha256_free(st->sha);
    up->st = NULL;
    free(st);
    if (err) {
        mh_packr_free(up->reader);
        up->reader = NULL;
        mh_budget_release(&up->mem);
    } else {
        up->pack = mh_packr_result(up->reader);
        /* The windows go back; the reader's records and metadata stay
         * reserved while the operation uses them. */
        uint64_t keep = mh_packr_mem(up->reader);
        if (mh_budget_held(&up->mem) > keep) mh_budget_shrink(&up->mem, mh_budget_held(&up->mem) - keep);
    }
    mh_step_resume(s, err, why);
}

/* The reader's error as the operation's: a limit of a client's pack is a
 * malformed pack (SPEC 2.1: 422), with the reader's reason. */
static void reader_failed(mh__upstream_t *st, int rc)
{
    const char *why = mh_packr_why(st->up->reader);
    stream_end(st, rc == MH_ELIMIT ? MH_EPARSE : rc, why ? why : mh_strerror(rc));
}

static void finish(mh__upstream_t *st)
{
    mh_upload_t *up = st->up;
    int rc = mh_packr_finish(up->reader);
    if (rc) {
        reader_failed(st, rc);
        return;
    }
    if (st->sha) {
        uint8_t d[32];
        mh_id_t got;
        mh_sha256_final(st->sha, d);
        mh_id_from_digest(&got, d);
        if (memcmp(got.s, up->mpack_id, MH_ID_LEN) != 0) {
            stream_end(st, MH_EHASH, "the pack does not hash to mpack_key");
            return;
        }
    }
    stream_end(st, 0, NULL);
}

static void budget_cb(void *ud, int err);

/* After a window: the reservation grown to what the reader holds now
 * (the windows + mh_packr_mem), waiting for it before the next window. */
static void next_window(mh__upstream_t *st)
{
    mh_upload_t *up = st->up;
    if (up->budget) {
        uint64_t need = windows_mem(st) + mh_packr_mem(up->reader), held = mh_budget_held(&up->mem);
        if (need > held) {
            uint64_t more = need - held, slack = need / 8 > GROW_MIN ? need / 8 : GROW_MIN;
            mh_budget_acquire(&up->mem, up->budget, more + slack, budget_cb, st);
            return;
        }
    }
    mh_store_reader_next(st->rd);
}

static void worked_cb(uv_work_t *w, int status)
{
    mh__upstream_t *st = w->data;
    if (status) st->cancelled = true;
    if (--st->pending) return;
    if (st->cancelled) {
        stream_end(st, MH_ECANCELED, "thread-pool work cancelled");
        return;
    }
    if (st->parse_err) {
        reader_failed(st, st->parse_err);
        return;
    }
    if (st->w.last) finish(st);
    else next_window(st);
}

static void parse_work(uv_work_t *w)
{
    mh__upstream_t *st = w->data;
    st->parse_err = mh_packr_feed(st->up->reader, st->w.p, st->w.n);
}

static void hash_work(uv_work_t *w)
{
    mh__upstream_t *st = w->data;
    mh_sha256_update(st->sha, st->w.p, st->w.n);
}

static void queue(mh__upstream_t *st, uv_work_t *w, uv_work_cb fn)
{
    w->data = st;
    st->pending++;
    if (uv_queue_work(st->s->loop, w, fn, worked_cb) != 0) {
        st->pending--;
        st->cancelled = true;
    }
}

static void window_cb(void *ud, int err, const mh_store_window_t *w)
{
    mh__upstream_t *st = ud;
    if (err) {
        /* HEAD found it a moment ago: a concurrent unpack of the same
         * upload moved it (its retry reads it from the pack key). */
        stream_end(st, err == MH_ENOENT ? MH_ESTORE : err,
                   err == MH_ENOENT ? "the staged upload moved while it was read (a concurrent unpack of it); retry"
                                    : "reading the staged pack");
        return;
    }
    st->w = *w;
    if (w->n == 0) {
        if (w->last) finish(st);
        else mh_store_reader_next(st->rd);
        return;
    }
    queue(st, &st->parse, parse_work);
    if (st->sha) queue(st, &st->hash, hash_work);
    /* A job that could not be queued counts as cancelled: the one that
     * was ends the stream when it is over. */
    if (!st->pending) stream_end(st, MH_ENOMEM, "cannot queue thread-pool work");
}

static void open_reader(mh__upstream_t *st)
{
    mh_upload_t *up = st->up;
    int rc = mh_store_reader_open(st->s->store, up->src, 0, UINT64_MAX, st->window, window_cb, st, &st->rd);
    if (rc) stream_end(st, rc, "opening the staged pack");
}

static void budget_cb(void *ud, int err)
{
    mh__upstream_t *st = ud;
    if (err) {
        stream_end(st, err, err == MH_EBUDGET ? "the pack-memory budget stayed spent" : "the pack-memory budget");
        return;
    }
    if (!st->rd) open_reader(st);
    else mh_store_reader_next(st->rd);
}

/* The store reader's window when the caller leaves it open: on fs a
 * window is one pread and the default (4 MiB) is plenty; on S3 each
 * window is one ranged GET whose fixed cost (a request's round trips,
 * signing, the store's own per-request work) is paid per window, so
 * windows are larger there: 16 MiB, but at most a sixteenth of the
 * budget (two are held), and never below the default. */
static size_t default_window(const mh_store_t *store, const mh_budget_t *budget)
{
    if (strcmp(mh_store_kind(store), "s3") != 0) return MH_STORE_WINDOW_DEFAULT;
    size_t w = S3_WINDOW;
    if (budget) {
        mh_budget_stats_t bs;
        mh_budget_stats(budget, &bs);
        if (bs.total / 16 < w) w = (size_t)(bs.total / 16);
    }
    return w < MH_STORE_WINDOW_DEFAULT ? MH_STORE_WINDOW_DEFAULT : w;
}

void mh_rw_upload_stream(mh_step_t *s, mh_upload_t *up, const mh_rw_stream_opts_t *opts)
{
    mh_step_wait(s);
    mh__upstream_t *st = calloc(1, sizeof *st);
    if (!st) {
        mh_step_resume(s, MH_ENOMEM, "stream");
        return;
    }
    st->s = s;
    st->up = up;
    up->st = st;
    up->budget = opts->budget;
    st->window = opts->window ? opts->window : default_window(s->store, opts->budget);
    /* Bytes verified when they entered are only parsed (their frames'
     * structure still checked); a new upload is hashed whole and blob by
     * blob (SPEC 4.3). */
    unsigned flags = up->trusted ? MH_PACKR_NO_DECOMPRESS : MH_PACKR_VERIFY;
    /* A pack of some size has its v2 blobs hashed on a second thread
     * while this one decompresses (docs/benchmarks.md, issue 20); a small
     * push does not pay for the thread. */
    if (!up->trusted && up->size >= PARALLEL_HASH_MIN) flags |= MH_PACKR_PARALLEL;
    int rc = mh_packr_new(up->arena, opts->lim, flags, up->size, &up->reader);
    if (!rc && !up->trusted && !(st->sha = mh_sha256_new())) rc = MH_ENOMEM;
    if (rc) {
        stream_end(st, rc, "stream");
        return;
    }
    if (up->budget) mh_budget_acquire(&up->mem, up->budget, windows_mem(st) + STREAM_START, budget_cb, st);
    else open_reader(st);
}

static void charged_cb(void *ud, int err)
{
    mh_step_resume(ud, err, err == MH_EBUDGET ? "the pack-memory budget stayed spent" : "the pack-memory budget");
}

void mh_rw_upload_charge(mh_step_t *s, mh_upload_t *up, size_t bytes)
{
    if (!up->budget || !bytes) return;
    mh_step_wait(s);
    mh_budget_acquire(&up->mem, up->budget, bytes, charged_cb, s);
}

/* ========================================================= mark, place */

void mh_rw_upload_verified(mh_step_t *s, const mh_upload_t *up)
{
    if (!up->grant) return; /* read as referenced: nothing to record */
    mh_db_pq_t q = {NULL, "UPDATE push_grants SET verified_at = coalesce(verified_at, now()) WHERE grant_id = $1",
                    1,    (const char *const[]){up->grant->grant_id},
                    NULL, NULL};
    mh_step_query(s, &q, NULL);
}

static int placed_check(mh_step_t *s, int err, uint64_t size)
{
    mh_upload_t *up = s->arg;
    if (!up) return MH_EINVAL;
    /* Whatever the store says, a pack that is not in place is its fault. */
    if (err || size != up->size) {
        mh_step_fail(s, err == MH_ENOSPC ? err : MH_ESTORE, "the staged upload vanished and the pack is not in place");
        return MH_ESTORE;
    }
    return 0;
}

static int moved(mh_step_t *s, int err)
{
    mh_upload_t *up = s->arg;
    if (!up) return MH_EINVAL;
    if (err == MH_ENOENT) {
        /* The staged key is gone: another attempt under this grant moved it
         * meanwhile. Make sure it is in place before referencing it. */
        mh_step_head(s, up->pack_key, placed_check);
        return MH_STEP_WAIT;
    }
    if (err) mh_step_fail(s, err, "moving the pack into place");
    else up->placed = true;
    return err;
}

void mh_rw_upload_place(mh_step_t *s, mh_upload_t *up)
{
    if (up->src == up->pack_key) return; /* already at its final key */
    s->arg = up;
    mh_step_move(s, up->src, up->pack_key, moved);
}

/* ============================================================= unplace */

/* A small operation of its own: the pack's lock, and the upload back to
 * its staging key unless a committed row references the pack. */
typedef struct {
    mh_step_t step;
    char mpack_id[MH_ID_SIZE], pack_key[MH_MPACK_KEY_SIZE], staging_key[80];
    char op_id[48];
    bool referenced;
} unplace_t;

#define UP(s) MH_STEP_OP(s, unplace_t, step)

static int unplace_locked(mh_step_t *s, PGresult **res, int n)
{
    /* BEGIN, the lock, then the row's existence (a statement after the
     * lock: it sees what the previous holder committed). */
    if (n != 3) return MH_EDB;
    UP(s)->referenced = mh_pq_str(res[2], 0, 0)[0] == 't';
    return 0;
}

static void unplace_lock(mh_step_t *s)
{
    unplace_t *u = UP(s);
    mh_db_batch_t b = {0};
    mh_db_batch_add(&b, "BEGIN", 0);
    mh_db_batch_add(&b, mh_rw_sql_pack_lock, 1, u->mpack_id);
    mh_db_batch_add(&b, "SELECT EXISTS (SELECT 1 FROM mpacks WHERE mpack_id = $1)", 1, u->mpack_id);
    mh_step_batch(s, &b, unplace_locked);
}

static int unplaced(mh_step_t *s, int err)
{
    (void)s;
    return err == MH_ENOENT ? 0 : err; /* gone already: another attempt took it back */
}

static void unplace_move(mh_step_t *s)
{
    unplace_t *u = UP(s);
    if (!u->referenced) mh_step_move(s, u->pack_key, u->staging_key, unplaced);
}

static const mh_step_def_t unplace_steps[] = {
    {"acquire", mh_step_acquire},
    {"lock", unplace_lock},
    {"move", unplace_move},
    {"commit", mh_step_commit},
};

static void unplace_finish(mh_step_t *s)
{
    unplace_t *u = UP(s);
    if (s->err)
        mh_warn("%s: taking %s back to %s failed: %s (%s); `musehubd fsck --repair` removes it if no row names it",
                u->op_id, u->pack_key, u->staging_key, mh_strerror(s->err), s->why);
    else if (!u->referenced)
        mh_info("%s: the failed operation's upload %s went back to %s", u->op_id, u->pack_key, u->staging_key);
    free(u);
}

void mh_rw_upload_unplace(const mh_step_t *s, const mh_upload_t *up)
{
    if (!up->placed || !up->grant) return;
    unplace_t *u = calloc(1, sizeof *u);
    if (!u) {
        mh_warn("%s: out of memory: %s stays in place without a row (fsck --repair)", s->id, up->pack_key);
        return;
    }
    snprintf(u->mpack_id, sizeof u->mpack_id, "%s", up->mpack_id);
    snprintf(u->pack_key, sizeof u->pack_key, "%s", up->pack_key);
    snprintf(u->staging_key, sizeof u->staging_key, "%s", up->grant->staging_key);
    snprintf(u->op_id, sizeof u->op_id, "%s", s->id ? s->id : "-");
    mh_step_env_t env = {s->loop, s->db, s->store};
    mh_step_init(&u->step, unplace_steps, (int)(sizeof unplace_steps / sizeof *unplace_steps), "unplace", u->op_id,
                 &env, unplace_finish);
    mh_step_run(&u->step);
}

/* ================================================================ rows */

void mh_rw_upload_rows(mh_db_batch_t *b, mh_upload_t *up)
{
    snprintf(up->size_s, sizeof up->size_s, "%llu", (unsigned long long)up->size);
    mh_rw_pack_t pack = {up->repo_id, up->mpack_id, up->size_s, "push", up->pack && up->pack->version == 2};
    mh_rw_pack_rows(b, &pack, &up->i_index, &up->i_refs);
}

void mh_rw_upload_written(mh_upload_t *up, PGresult **res)
{
    up->indexed = mh_pq_int(res[up->i_index], 0, 0);
    up->referenced_new = mh_pq_int(res[up->i_refs], 0, 0);
}

void mh_rw_upload_consume(mh_db_batch_t *b, const mh_upload_t *up)
{
    if (up->grant)
        mh_db_batch_add(b, "UPDATE push_grants SET consumed_at = now() WHERE grant_id = $1", 1, up->grant->grant_id);
}

void mh_rw_upload_free(mh_upload_t *up)
{
    /* A stream is never in flight here: the operation waits for it. */
    mh_packr_free(up->reader);
    up->reader = NULL;
    up->pack = NULL;
    mh_budget_release(&up->mem);
}
