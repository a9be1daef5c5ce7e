/*
 * index.c — the mpack.index job (SPEC 4.7): records, for every blob of one
 * pack, an objects row (mpack:// URI: v1 the content's byte range, v2 its
 * frame and its place inside it), an mpack_index row and an object ref
 * for the job's repository, plus the pack's mpacks, mpack_refs and (v2)
 * mpack_frames rows, in one transaction written with COPY.
 *
 * Which bytes it may read, how it reads them and what it must check
 * (DESIGN 5: bytes are verified once, where they enter) is push's grant
 * protocol and stream (upload.c, mh_rw_upload_*: the same code unpack
 * runs):
 *  - the repository references the pack (mpack_refs): the pack was
 *    verified when it entered or the server built it -> mpacks/<hex>, read
 *    as a stream without hashing or decompressing anything
 *    (MH_PACKR_NO_DECOMPRESS: the frames' structure is still checked);
 *  - the repository holds an unexpired grant with a completed upload the
 *    server has already verified -> the staged key, or mpacks/<hex> when
 *    an unpack already moved it there; read the same way;
 *  - an unexpired grant never verified, with a completed upload -> the
 *    staged key only; the whole pack is hashed against its key AND every
 *    blob against its id, v2 frames decompressed within their bounds (the
 *    unpack checks: a false id would poison every repository sharing the
 *    object); then the grant is marked verified and the pack moved to
 *    mpacks/<hex> in the transaction (and back, should that fail);
 *  - none of these: permanent failure (the API refuses such jobs with
 *    404; this covers a grant that expired before the job ran).
 * What it holds is reserved from the pack-memory budget (the stream's
 * windows, the reader's records, the rows).
 *
 * Idempotent: every insert is ON CONFLICT DO NOTHING or an anti-join, so a
 * second run (a retry after a crash, a duplicate job) writes nothing and
 * reports 0. objects_written counts the blobs this run newly indexed in
 * this pack (mpack_index rows inserted: the objects view reads them,
 * sql/0040), object_refs_written the object
 * refs the repository newly gained.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs_internal.h"

typedef struct {
    mh_step_t step;
    mh_job_t *j;
    mh_id_t key;
    mh_upload_t up;
    mh_pack_limits_t lim;
    bool v2;
    mh_buf_t rows, frames;
    size_t nrows;
    bool permanent; /* the failure cannot get better: no retry */
} index_t;

#define X(s) MH_STEP_OP(s, index_t, step)

enum {
    I_LOOKUP,
    I_LOCATE,
    I_STREAM,
    I_ROWS,
    I_CHARGE,
    I_MARK,
    I_ACQUIRE,
    I_BEGIN,
    I_COPY,
    I_COPY_FRAMES,
    I_INSERT,
    I_PLACE,
    I_COMMIT,
    I_DONE
};

static void step_lookup(mh_step_t *s) { mh_rw_upload_lookup(s, &X(s)->up); }

static void step_locate(mh_step_t *s)
{
    index_t *x = X(s);
    if (!x->up.referenced && !x->up.ngrants) {
        x->permanent = true;
        mh_step_fail(s, MH_ENOENT,
                     "the repository neither references this pack nor holds an unexpired push grant for it");
        return;
    }
    mh_rw_upload_locate(s, &x->up);
}

static void step_stream(mh_step_t *s)
{
    index_t *x = X(s);
    /* Retried when nothing is staged yet: an upload may still be in flight. */
    if (x->up.outcome == MH_UPLOAD_NOT_STAGED) {
        mh_step_fail(s, MH_ESTORE, "reading the staged upload: nothing uploaded under this repository's grants");
        return;
    }
    if (x->up.outcome == MH_UPLOAD_SIZE_MISMATCH) {
        mh_step_fail(s, MH_EHASH, "the staged upload's size is not the grant's");
        return;
    }
    if (x->up.size > x->j->cfg->max_pack_bytes) {
        mh_step_fail(s, MH_ELIMIT, "pack too large");
        return;
    }
    x->lim = mh_pack_limits_default;
    if (x->j->cfg->max_unpacked) x->lim.max_unpacked = x->j->cfg->max_unpacked;
    mh_rw_stream_opts_t o = {x->j->cfg->budget, &x->lim, 0};
    mh_rw_upload_stream(s, &x->up, &o);
}

/* Thread pool: the COPY rows of the pack read. */
static void rows_work(mh_step_t *s)
{
    index_t *x = X(s);
    s->work_err = mh_rw_index_rows(x->up.pack, &x->rows, &x->frames, &x->nrows);
}

static void step_rows(mh_step_t *s)
{
    X(s)->v2 = X(s)->up.pack->version == 2;
    mh_step_work(s, rows_work);
}

static void step_charge(mh_step_t *s) { mh_rw_upload_charge(s, &X(s)->up, X(s)->rows.cap + X(s)->frames.cap); }

static void step_mark(mh_step_t *s)
{
    index_t *x = X(s);
    /* Durable before the pack leaves its staging key: a retry after a later
     * failure may then read it from mpacks/ (the rule unpack follows). */
    if (!x->up.trusted) mh_rw_upload_verified(s, &x->up);
}

static void step_begin(mh_step_t *s)
{
    index_t *x = X(s);
    /* The repository row, then the pack's lock: the sweep deletes a
     * superseded pack's row and bytes under it, so it either finished
     * before (and the move recreates the bytes) or sees the new refs. */
    mh_rw_begin(s, x->j->repo_id, x->key.s, MH_RW_OBJECTS | (x->v2 ? MH_RW_FRAMES : 0));
}

static void step_copy(mh_step_t *s) { mh_rw_copy(s, MH_RW_OBJECTS, &X(s)->rows); }

static void step_copy_frames(mh_step_t *s)
{
    if (X(s)->v2) mh_rw_copy(s, MH_RW_FRAMES, &X(s)->frames);
}

static int inserted(mh_step_t *s, PGresult **res, int n)
{
    (void)n;
    mh_rw_upload_written(&X(s)->up, res);
    return 0;
}

static void step_insert(mh_step_t *s)
{
    mh_db_batch_t b = {0};
    mh_rw_upload_rows(&b, &X(s)->up);
    mh_step_batch(s, &b, inserted);
}

/* Last before COMMIT: nothing can fail in between but the COMMIT itself,
 * after which index_finish takes the upload back. */
static void step_place(mh_step_t *s) { mh_rw_upload_place(s, &X(s)->up); }

static const mh_step_def_t index_steps[] = {
    [I_LOOKUP] = {"lookup", step_lookup},
    [I_LOCATE] = {"locate", step_locate},
    [I_STREAM] = {"stream", step_stream},
    [I_ROWS] = {"rows", step_rows},
    [I_CHARGE] = {"charge", step_charge},
    [I_MARK] = {"mark", step_mark},
    [I_ACQUIRE] = {"acquire", mh_step_acquire},
    [I_BEGIN] = {"begin", step_begin},
    [I_COPY] = {"copy", step_copy},
    [I_COPY_FRAMES] = {"copy_frames", step_copy_frames},
    [I_INSERT] = {"insert", step_insert},
    [I_PLACE] = {"place", step_place},
    [I_COMMIT] = {"commit", mh_step_commit},
    [I_DONE] = {"done", mh_step_done},
};

static void index_finish(mh_step_t *s)
{
    index_t *x = X(s);
    mh_job_t *j = x->j;
    mh_arena_t *a = &j->arena;
    char what[96];
    snprintf(what, sizeof what, "mpack.index %s", x->key.s);
    /* A pack that does not parse or hash, or is too large, will not do
     * better on a retry; nor will a repository that was deleted. */
    bool permanent =
        x->permanent || s->err == MH_EPARSE || s->err == MH_EHASH || s->err == MH_ELIMIT || s->err == MH_ENOENT;
    if (s->err) mh_rw_upload_unplace(s, &x->up);
    mh_vb_t b;
    mh_vb_init(&b, a);
    mh_val_t *m = mh_vb_map(&b);
    mh_vb_put(&b, m, "objects_written", mh_v_int(x->up.indexed));
    mh_vb_put(&b, m, "object_refs_written", mh_v_int(x->up.referenced_new));
    mh_vb_put(&b, m, "elapsed_ms", mh_v_int(mh__job_elapsed_ms_int(j)));
    mh_vb_put(&b, m, "mpack_key", mh_v_str(x->key.s));
    mh_vb_put(&b, m, "blobs", mh_v_int((int64_t)x->nrows));
    mh__job_end(j, s, what, permanent, &b, m);
}

static void index_cleanup_cb(void *arg)
{
    index_t *x = arg;
    mh_rw_upload_free(&x->up);
    mh_buf_free(&x->rows);
    mh_buf_free(&x->frames);
}

void mh__job_index_start(mh_job_t *j)
{
    index_t *x = MH__JOB_NEW(j, index_t, index_steps, I_DONE, index_finish, index_cleanup_cb);
    if (!x) return;
    x->j = j;
    const mh_val_t *k = mh_val_get(&j->payload, "mpack_key");
    if (!k || k->t != MH_V_STR || !mh_id_valid(k->v.s.p, k->v.s.n)) {
        mh__job_fail(j, true, "payload.mpack_key must be sha256:<64 lowercase hex>");
        return;
    }
    memcpy(x->key.s, k->v.s.p, MH_ID_LEN);
    x->key.s[MH_ID_LEN] = 0;
    mh_rw_upload_init(&x->up, &j->arena, j->repo_id, x->key.s);
    mh_step_run(&x->step);
}
