/*
 * pack_write.c — the v1 mpack writer (SPEC section 2), streaming into a
 * heap buffer, and the helper that extracts a commit's metadata.
 *
 * The body map always has the 4 keys commits, snapshots, blobs,
 * branch_heads in that order, so the bytes of a pack depend only on what
 * is put in it: the same fetch gives the same mpack id. The writer checks
 * its own protocol (section order, element counts) and turns a misuse
 * into a sticky MH_EINVAL, because a short count would silently produce a
 * pack whose map headers lie about what follows.
 */
#include <string.h>

#include "mpack_internal.h"

enum { W_HEADER, W_COMMITS, W_SNAPSHOTS, W_BLOBS, W_HEADS };

static void wfail(mh_packw_t *w, int err)
{
    if (!w->err) w->err = err;
}

/* Syncs the sticky error of the inner msgpack writer. */
static void wsync(mh_packw_t *w)
{
    if (w->mp.err) wfail(w, w->mp.err);
}

void mh_packw_init(mh_packw_t *w, mh_buf_t *out)
{
    memset(w, 0, sizeof(*w));
    w->out = out;
    mh_mpw_init(&w->mp, out);
    mh_mpw_raw(&w->mp, "MUSE\x01", 5);
    mh_mpw_map(&w->mp, 4);
    w->state = W_HEADER;
    wsync(w);
}

/* Opens the next section: it must follow `prev` with all its elements. */
static void open_section(mh_packw_t *w, int prev, const char *key, uint32_t n, bool is_map)
{
    if (w->err) return;
    if (w->state != prev || w->left) {
        wfail(w, MH_EINVAL);
        return;
    }
    mh_mpw_cstr(&w->mp, key);
    if (is_map) mh_mpw_map(&w->mp, n);
    else mh_mpw_arr(&w->mp, n);
    w->state = prev + 1;
    w->left = n;
    wsync(w);
}

/* Accounts for one element of the current section. */
static bool take(mh_packw_t *w, int state)
{
    if (w->err) return false;
    if (w->state != state || w->left == 0) {
        wfail(w, MH_EINVAL);
        return false;
    }
    w->left--;
    return true;
}

static void put_kv(mh_packw_t *w, const char *key, mh_str_t v)
{
    mh_mpw_cstr(&w->mp, key);
    mh_mpw_str(&w->mp, v.p, v.n);
}

static void put_kv_opt_id(mh_packw_t *w, const char *key, mh_str_t v)
{
    mh_mpw_cstr(&w->mp, key);
    if (v.p) mh_mpw_str(&w->mp, v.p, v.n);
    else mh_mpw_nil(&w->mp);
}

/* Reads a msgpack map (want_map) or array header: count and header size.
 * false when p does not start with one. */
static bool container_header(const uint8_t *p, size_t n, bool want_map, uint32_t *count, size_t *hlen)
{
    if (n == 0) return false;
    uint8_t c = p[0], fix = want_map ? 0x80 : 0x90, w16 = want_map ? 0xde : 0xdc;
    if ((c & 0xf0) == fix) {
        *count = c & 0x0f;
        *hlen = 1;
    } else if (c == w16 && n >= 3) {
        *count = (uint32_t)p[1] << 8 | p[2];
        *hlen = 3;
    } else if (c == w16 + 1 && n >= 5) {
        *count = (uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 8 | p[4];
        *hlen = 5;
    } else {
        return false;
    }
    return true;
}

void mh_packw_commits(mh_packw_t *w, uint32_t n)
{
    open_section(w, W_HEADER, "commits", n, false);
}

void mh_packw_commit(mh_packw_t *w, mh_str_t commit_id, mh_str_t parent, mh_str_t parent2, mh_str_t snapshot_id,
                     mh_str_t message, mh_str_t author, mh_str_t committed_at, mh_str_t branch,
                     const uint8_t *meta, size_t meta_len)
{
    uint32_t nmeta = 0;
    size_t hlen = 0;
    if (meta && meta_len && (!container_header(meta, meta_len, true, &nmeta, &hlen) || nmeta > UINT32_MAX - 8)) {
        wfail(w, MH_EINVAL);
        return;
    }
    if (!take(w, W_COMMITS)) return;
    mh_mpw_map(&w->mp, 8 + nmeta);
    put_kv(w, "commit_id", commit_id);
    put_kv_opt_id(w, "parent_commit_id", parent);
    put_kv_opt_id(w, "parent2_commit_id", parent2);
    put_kv(w, "snapshot_id", snapshot_id);
    put_kv(w, "message", message);
    put_kv(w, "author", author);
    put_kv(w, "committed_at", committed_at);
    put_kv(w, "branch", branch);
    if (nmeta) mh_mpw_raw(&w->mp, meta + hlen, meta_len - hlen); /* the pairs, verbatim */
    wsync(w);
}

void mh_packw_snapshots(mh_packw_t *w, uint32_t n)
{
    open_section(w, W_COMMITS, "snapshots", n, false);
}

void mh_packw_snapshot(mh_packw_t *w, mh_str_t snapshot_id, mh_str_t parent, const uint8_t *upsert_mp,
                       size_t upsert_len, const uint8_t *remove_mp, size_t remove_len)
{
    uint32_t cnt;
    size_t hlen;
    if ((upsert_len && !container_header(upsert_mp, upsert_len, true, &cnt, &hlen)) ||
        (remove_len && !container_header(remove_mp, remove_len, false, &cnt, &hlen))) {
        wfail(w, MH_EINVAL);
        return;
    }
    if (!take(w, W_SNAPSHOTS)) return;
    mh_mpw_map(&w->mp, 4);
    put_kv(w, "snapshot_id", snapshot_id);
    put_kv_opt_id(w, "parent_snapshot_id", parent);
    mh_mpw_cstr(&w->mp, "delta_upsert");
    if (upsert_len) mh_mpw_raw(&w->mp, upsert_mp, upsert_len);
    else mh_mpw_map(&w->mp, 0);
    mh_mpw_cstr(&w->mp, "delta_remove");
    if (remove_len) mh_mpw_raw(&w->mp, remove_mp, remove_len);
    else mh_mpw_arr(&w->mp, 0);
    wsync(w);
}

void mh_packw_blobs(mh_packw_t *w, uint32_t n)
{
    open_section(w, W_SNAPSHOTS, "blobs", n, false);
}

void mh_packw_blob(mh_packw_t *w, mh_str_t object_id, const void *content, size_t len)
{
    if (!take(w, W_BLOBS)) return;
    mh_mpw_map(&w->mp, 2);
    put_kv(w, "object_id", object_id);
    mh_mpw_cstr(&w->mp, "content");
    mh_mpw_bin(&w->mp, content, len);
    wsync(w);
}

void mh_packw_branch_heads(mh_packw_t *w, uint32_t n)
{
    open_section(w, W_BLOBS, "branch_heads", n, true);
}

void mh_packw_branch_head(mh_packw_t *w, mh_str_t branch, mh_str_t commit_id)
{
    if (!take(w, W_HEADS)) return;
    mh_mpw_str(&w->mp, branch.p, branch.n);
    mh_mpw_str(&w->mp, commit_id.p, commit_id.n);
    wsync(w);
}

int mh_packw_finish(mh_packw_t *w)
{
    if (!w->err && (w->state != W_HEADS || w->left)) wfail(w, MH_EINVAL);
    return w->err;
}

/* ------------------------------------------------------------ metadata */

static const char *const std_keys[8] = {"commit_id", "parent_commit_id", "parent2_commit_id", "snapshot_id",
                                        "message",   "author",           "committed_at",      "branch"};

static bool is_std_key(const mh_val_t *k)
{
    if (k->t != MH_V_STR) return false;
    for (int i = 0; i < 8; i++) {
        size_t n = strlen(std_keys[i]);
        if (k->v.s.n == n && memcmp(k->v.s.p, std_keys[i], n) == 0) return true;
    }
    return false;
}

int mh_pack_commit_meta(const mh_pack_commit_t *c, mh_buf_t *out, uint32_t *count)
{
    const mh_val_t *m = c->map;
    uint32_t n = 0;
    for (uint32_t i = 0; m && i < m->v.m.n; i++) n += !is_std_key(&m->v.m.kv[i].k);
    if (count) *count = n;
    size_t mark = out->len;
    mh_mpw_t w;
    mh_mpw_init(&w, out);
    mh_mpw_map(&w, n);
    for (uint32_t i = 0; m && i < m->v.m.n && !w.err; i++) {
        if (is_std_key(&m->v.m.kv[i].k)) continue;
        mh_mpw_val(&w, &m->v.m.kv[i].k);
        mh_mpw_val(&w, &m->v.m.kv[i].v);
    }
    if (w.err) out->len = mark;
    return w.err;
}
