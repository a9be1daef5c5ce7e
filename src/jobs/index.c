/*
 * index.c — the mpack.index job (SPEC 4.7): records, for every blob of one
 * pack, an objects row (mpack://<key>#<offset>:<length>), an mpack_index
 * row and an object ref for the job's repository, plus the pack's mpacks
 * and mpack_refs rows, in one transaction written with COPY.
 *
 * Which bytes it may read, and what it must check (DESIGN 5: bytes are
 * verified once, where they enter), is push's grant protocol (refwrite's
 * mh_rw_upload_*, the same code unpack runs):
 *  - the repository references the pack (mpack_refs): the pack was
 *    verified when it entered or the server built it -> mpacks/<hex>, no
 *    hashing at all;
 *  - the repository holds an unexpired grant with a completed upload the
 *    server has already verified -> the staged key, or mpacks/<hex> when
 *    an unpack already moved it there; no hashing;
 *  - an unexpired grant never verified, with a completed upload -> the
 *    staged key only; the whole pack is hashed against its key AND every
 *    blob against its id (the unpack checks: a false id would poison
 *    every repository sharing the object); then the grant is marked
 *    verified and the pack moved to mpacks/<hex>;
 *  - none of these: permanent failure (the API refuses such jobs with
 *    404; this covers a grant that expired before the job ran).
 *
 * Idempotent: every insert is ON CONFLICT DO NOTHING or an anti-join, so a
 * second run (a retry after a crash, a duplicate job) writes nothing and
 * reports 0. objects_written counts the blobs this run newly indexed in
 * this pack (mpack_index rows inserted; their objects rows are inserted
 * alongside when the object was unknown), object_refs_written the object
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
    mh_pack_t pack;
    mh_buf_t rows;
    size_t nrows;
    bool permanent; /* the failure cannot get better: no retry */
} index_t;

#define X(s) MH_STEP_OP(s, index_t, step)

enum { I_LOOKUP, I_READ, I_PARSE, I_MARK, I_ACQUIRE, I_BEGIN, I_PLACE, I_COPY, I_INSERT, I_COMMIT, I_DONE };

static void step_lookup(mh_step_t *s) { mh_rw_upload_lookup(s, &X(s)->up); }

static void step_read(mh_step_t *s)
{
    index_t *x = X(s);
    if (!x->up.referenced && !x->up.ngrants) {
        x->permanent = true;
        mh_step_fail(s, MH_ENOENT, "the repository neither references this pack nor holds an unexpired push grant for it");
        return;
    }
    mh_rw_upload_read(s, &x->up);
}

/* Thread pool: (untrusted only) pack hash and blob hashes; parse; rows. */
static void parse_work(mh_step_t *s)
{
    index_t *x = X(s);
    mh_arena_t *a = &x->j->arena; /* not touched by the loop meanwhile */
    const mh_buf_t *b = &x->up.bytes;
    if (!x->up.trusted) {
        mh_id_t got;
        mh_blob_id(b->p, b->len, &got);
        if (memcmp(got.s, x->key.s, MH_ID_LEN) != 0) {
            s->work_err = MH_EHASH;
            s->work_why = "the staged upload does not hash to mpack_key";
            return;
        }
    }
    const char *why = NULL;
    int rc = mh_pack_read(a, b->p, b->len, &mh_pack_limits_default, &x->pack, &why);
    if (rc) {
        s->work_err = rc == MH_ENOMEM ? rc : MH_EPARSE;
        s->work_why = why;
        return;
    }
    size_t bad = 0;
    if (!x->up.trusted && mh_pack_verify_blobs(b->p, &x->pack, &bad)) {
        s->work_err = MH_EHASH;
        s->work_why = mh_sprintf(a, "blobs[%zu] (%.*s): content does not hash to its object_id", bad,
                                 (int)x->pack.blobs[bad].object_id.n, x->pack.blobs[bad].object_id.p);
        return;
    }
    s->work_err = mh_index_copy_rows(&x->pack, &x->rows, &x->nrows);
}

static void step_parse(mh_step_t *s)
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
    if (x->up.bytes.len > x->j->cfg->max_pack_bytes) {
        mh_step_fail(s, MH_ELIMIT, "pack too large");
        return;
    }
    mh_step_work(s, parse_work);
}

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
    mh_rw_begin(s, x->j->repo_id, x->key.s, MH_RW_OBJECTS);
}

static void step_place(mh_step_t *s) { mh_rw_upload_place(s, &X(s)->up); }

static void step_copy(mh_step_t *s) { mh_rw_copy(s, MH_RW_OBJECTS, &X(s)->rows); }

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


static const mh_step_def_t index_steps[] = {
    [I_LOOKUP] = {"lookup", step_lookup}, [I_READ] = {"read", step_read},       [I_PARSE] = {"parse", step_parse},
    [I_MARK] = {"mark", step_mark},       [I_ACQUIRE] = {"acquire", mh_step_acquire}, [I_BEGIN] = {"begin", step_begin},
    [I_PLACE] = {"place", step_place},    [I_COPY] = {"copy", step_copy},       [I_INSERT] = {"insert", step_insert},
    [I_COMMIT] = {"commit", mh_step_commit}, [I_DONE] = {"done", mh_step_done},
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
    bool permanent = x->permanent || s->err == MH_EPARSE || s->err == MH_EHASH || s->err == MH_ELIMIT ||
                     s->err == MH_ENOENT;
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
