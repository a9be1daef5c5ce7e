/*
 * pack_rewrite.h — shared by fuzz_mpack.c and fuzz_mpack2.c: writes a read
 * pack's commits, snapshots and branch heads back with the pack writer
 * (metadata verbatim), so each target can check that what the reader
 * returned re-writes and reads back the same.
 */
#ifndef MH_FUZZ_PACK_REWRITE_H
#define MH_FUZZ_PACK_REWRITE_H

#include <stdlib.h>

#include "mh/mpack.h"

/* The commits and snapshots sections. Aborts when a commit's metadata
 * cannot be extracted. */
static void rewrite_commits_snapshots(mh_packw_t *w, const mh_pack_commit_t *cs, size_t nc,
                                      const mh_pack_snapshot_t *ss, size_t ns)
{
    mh_packw_commits(w, (uint32_t)nc);
    for (size_t i = 0; i < nc; i++) {
        const mh_pack_commit_t *c = &cs[i];
        mh_buf_t meta = {0};
        if (mh_pack_commit_meta(c, &meta, NULL) != 0) abort();
        mh_packw_commit(w, c->commit_id, c->parent, c->parent2, c->snapshot_id, c->message, c->author,
                        c->committed_at, c->branch, meta.p, meta.len);
        mh_buf_free(&meta);
    }
    mh_packw_snapshots(w, (uint32_t)ns);
    for (size_t i = 0; i < ns; i++) {
        const mh_pack_snapshot_t *s = &ss[i];
        mh_buf_t u = {0}, r = {0};
        mh_mpw_t mw;
        mh_mpw_init(&mw, &u);
        mh_mpw_val(&mw, s->upsert);
        mh_mpw_init(&mw, &r);
        mh_mpw_val(&mw, s->remove);
        mh_packw_snapshot(w, s->snapshot_id, s->parent, u.p, u.len, r.p, r.len);
        mh_buf_free(&u);
        mh_buf_free(&r);
    }
}

/* The branch_heads section (heads: a checked MAP or NULL). */
static void rewrite_heads(mh_packw_t *w, const mh_val_t *heads)
{
    uint32_t nh = heads ? heads->v.m.n : 0;
    mh_packw_branch_heads(w, nh);
    for (uint32_t i = 0; i < nh; i++) {
        const mh_kv_t *kv = &heads->v.m.kv[i];
        mh_packw_branch_head(w, (mh_str_t){kv->k.v.s.p, kv->k.v.s.n}, (mh_str_t){kv->v.v.s.p, kv->v.v.s.n});
    }
}

#endif
