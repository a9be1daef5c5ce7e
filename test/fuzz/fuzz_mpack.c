/*
 * fuzz_mpack.c — libFuzzer target for the mpack reader (mpack.h:
 * mh_pack_read, mh_pack_verify_blobs, mh_pack_commit_meta) and what the
 * hub does next with a parsed pack: apply every snapshot's delta onto its
 * parent's manifest, hash it, and recompute every commit id.
 *
 * Input: the pack bytes (v0, v1 or v2). Invariants checked (abort on
 * violation): every refusal has a reason; every v0/v1 blob's byte range
 * lies in the input, and every v2 blob lies in its frame, whose data lies
 * in the input; every id the reader returns is valid; re-writing a parsed
 * v0/v1 pack with the writer and reading it back gives the same counts
 * and ids. (fuzz_mpack2 fuzzes the stream reader on v2 packs in pieces.)
 */
#include <stdlib.h>
#include <string.h>

#include "mh/mpack.h"
#include "pack_rewrite.h"

static bool same(mh_str_t a, mh_str_t b)
{
    return a.n == b.n && (a.n == 0 || (a.p && b.p && memcmp(a.p, b.p, a.n) == 0));
}

/* Rebuilds manifests: a snapshot whose parent appears earlier is cloned
 * from it; others start empty (as if the parent were absent). */
static void rebuild(const mh_pack_t *p)
{
    mh_manifest_t *ms = calloc(p->nsnapshots + 1, sizeof(*ms));
    if (!ms) return;
    for (size_t i = 0; i < p->nsnapshots; i++) {
        const mh_pack_snapshot_t *s = &p->snapshots[i];
        for (size_t j = 0; s->parent.p && j < i; j++)
            if (same(p->snapshots[j].snapshot_id, s->parent)) {
                mh_manifest_clone(&ms[i], &ms[j]);
                break;
            }
        const char *why;
        (void)mh_manifest_apply(&ms[i], s->upsert, s->remove, &why);
        mh_id_t a, b;
        mh_manifest_id(&ms[i], &a);
        mh_manifest_id_nocache(&ms[i], &b);
        if (strcmp(a.s, b.s) != 0) abort();
    }
    for (size_t i = 0; i < p->nsnapshots; i++) mh_manifest_free(&ms[i]);
    free(ms);
    for (size_t i = 0; i < p->ncommits; i++) {
        const mh_pack_commit_t *c = &p->commits[i];
        mh_str_t ps[2] = {c->parent, c->parent2};
        int np = (ps[0].p != NULL) + (ps[1].p != NULL);
        mh_id_t id;
        mh_commit_id(ps[0].p ? ps : ps + 1, np, c->snapshot_id, c->message, c->committed_at, c->author, &id);
    }
}

static void rewrite(const uint8_t *data, const mh_pack_t *p, mh_arena_t *a)
{
    mh_buf_t out = {0};
    mh_packw_t w;
    mh_packw_init(&w, &out);
    rewrite_commits_snapshots(&w, p->commits, p->ncommits, p->snapshots, p->nsnapshots);
    mh_packw_blobs(&w, (uint32_t)p->nblobs);
    for (size_t i = 0; i < p->nblobs; i++)
        mh_packw_blob(&w, p->blobs[i].object_id, data + p->blobs[i].offset, p->blobs[i].length);
    rewrite_heads(&w, p->branch_heads);
    if (mh_packw_finish(&w) != 0) abort();
    mh_pack_t q;
    const char *why;
    if (mh_pack_read(a, out.p, out.len, NULL, &q, &why) != 0) abort();
    if (q.version != 1 || q.ncommits != p->ncommits || q.nsnapshots != p->nsnapshots || q.nblobs != p->nblobs) abort();
    for (size_t i = 0; i < q.ncommits; i++)
        if (!same(q.commits[i].commit_id, p->commits[i].commit_id) || !same(q.commits[i].parent, p->commits[i].parent) ||
            !same(q.commits[i].message, p->commits[i].message) || !same(q.commits[i].branch, p->commits[i].branch))
            abort();
    for (size_t i = 0; i < q.nblobs; i++)
        if (q.blobs[i].length != p->blobs[i].length ||
            memcmp(out.p + q.blobs[i].offset, data + p->blobs[i].offset, q.blobs[i].length) != 0)
            abort();
    mh_buf_free(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mh_arena_t a;
    mh_arena_init(&a, 64u << 20);
    mh_pack_t p;
    const char *why = NULL;
    int rc = mh_pack_read(&a, data, size, NULL, &p, &why);
    if (rc) {
        if (!why && rc != MH_ENOMEM) abort();
        mh_arena_release(&a);
        return 0;
    }
    for (size_t i = 0; i < p.nblobs; i++) {
        const mh_pack_blob_t *b = &p.blobs[i];
        uint64_t room = size;
        if (b->frame != MH_PACK_NOFRAME) {
            if (p.version != 2 || b->frame >= p.nframes || b->codec == MH_PACK_RAW) abort();
            const mh_pack_frame_t *f = &p.frames[b->frame];
            if (f->data_offset > size || f->data_length > size - f->data_offset) abort();
            if (b->frame_offset != f->data_offset || b->frame_length != f->data_length) abort();
            room = f->size;
        } else if (p.version == 2 || b->codec != MH_PACK_RAW) {
            abort();
        }
        if (b->offset > room || b->length > room - b->offset) abort();
        if (!mh_id_valid(b->object_id.p, b->object_id.n)) abort();
    }
    for (size_t i = 0; i < p.ncommits; i++) {
        const mh_pack_commit_t *c = &p.commits[i];
        if (!mh_id_valid(c->commit_id.p, c->commit_id.n) || !mh_id_valid(c->snapshot_id.p, c->snapshot_id.n)) abort();
        if (c->parent.p && !mh_id_valid(c->parent.p, c->parent.n)) abort();
        if (memchr(c->message.p, 0, c->message.n) || !c->branch.p) abort();
    }
    size_t bad;
    int vrc = mh_pack_verify_blobs(data, &p, &bad);
    if (p.version == 2 && p.nblobs && vrc != MH_EHASH) abort(); /* v2 blobs are not checkable from the file */
    rebuild(&p);
    if (p.version < 2) rewrite(data, &p, &a);
    mh_arena_release(&a);
    return 0;
}
