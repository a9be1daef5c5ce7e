/*
 * manifest_delta.c — deltas and serialisation of manifests (SPEC 2):
 * applying a snapshot's delta_remove/delta_upsert, encoding a manifest as
 * a msgpack map and decoding it back, and diffing two manifests.
 *
 * Costs stay O(n + k log k) for a k-entry delta on an n-entry manifest,
 * whatever k is: removes mark entries and compact once (not one memmove
 * per path), large upserts are sorted and merged in one pass, and a small
 * upsert (the common case: a commit touches a few files) is a binary
 * search and at most one memmove each.
 *
 * Everything is validated before the manifest is touched; only a remove
 * of an absent path is found while applying, and it is undone.
 */
#include <stdlib.h>
#include <string.h>

#include "mpack_internal.h"

#define SMALL_UPSERT 8 /* at most this many: one binary search each */

static int set_why(const char **why, const char *msg)
{
    if (why) *why = msg;
    return MH_EPARSE;
}

static int entry_cmp(const void *a, const void *b)
{
    const mh_mentry_t *x = a, *y = b;
    return mh_path_cmp(x->path, x->plen, y->path, y->plen);
}

/* Sorts e[0..n) by path unless already sorted; false on a duplicate. */
static bool sort_unique(mh_mentry_t *e, size_t n)
{
    bool sorted = true;
    for (size_t i = 1; i < n && sorted; i++) sorted = entry_cmp(&e[i - 1], &e[i]) < 0;
    if (sorted) return true; /* strictly ascending: no duplicates either */
    qsort(e, n, sizeof(*e), entry_cmp);
    for (size_t i = 1; i < n; i++)
        if (entry_cmp(&e[i - 1], &e[i]) == 0) return false;
    return true;
}

/* Checks the upsert map and returns its entries sorted by path (heap
 * array in *out, or NULL for none). */
static int collect_upserts(const mh_val_t *up, mh_mentry_t **out, const char **why)
{
    *out = NULL;
    if (!up || up->v.m.n == 0) return 0;
    mh_mentry_t *u = malloc(up->v.m.n * sizeof(*u));
    if (!u) return MH_ENOMEM;
    for (uint32_t i = 0; i < up->v.m.n; i++) {
        const mh_kv_t *kv = &up->v.m.kv[i];
        int rc = 0;
        if (kv->k.t != MH_V_STR || !mh_path_valid(kv->k.v.s.p, kv->k.v.s.n))
            rc = set_why(why, "delta_upsert: invalid path");
        else if (kv->v.t != MH_V_STR || !mh_id_ok(kv->v.v.s.p, kv->v.v.s.n))
            rc = set_why(why, "delta_upsert: object id is not sha256:<64 hex>");
        if (rc) {
            free(u);
            return rc;
        }
        u[i] = (mh_mentry_t){.path = kv->k.v.s.p, .plen = kv->k.v.s.n, .id = kv->v.v.s.p};
    }
    if (!sort_unique(u, up->v.m.n)) {
        free(u);
        return set_why(why, "delta_upsert: duplicate path");
    }
    *out = u;
    return 0;
}

static int check_removes(const mh_val_t *rm, const char **why)
{
    for (uint32_t i = 0; rm && i < rm->v.a.n; i++) {
        const mh_val_t *p = &rm->v.a.items[i];
        if (p->t != MH_V_STR || !mh_path_valid(p->v.s.p, p->v.s.n)) return set_why(why, "delta_remove: invalid path");
    }
    return 0;
}

/* Removes every path of rm: each is marked (id = NULL) and the array is
 * compacted once. An absent (or repeated) path restores the marks and
 * fails, leaving m unchanged. */
static int apply_removes(mh_manifest_t *m, const mh_val_t *rm, const char **why)
{
    uint32_t r = rm ? rm->v.a.n : 0;
    if (r == 0) return 0;
    struct mark {
        size_t i;
        const char *id;
    } *mk = malloc(r * sizeof(*mk));
    if (!mk) return MH_ENOMEM;
    size_t lowest = SIZE_MAX;
    for (uint32_t j = 0; j < r; j++) {
        const mh_val_t *p = &rm->v.a.items[j];
        size_t i = mh__manifest_lower_bound(m, p->v.s.p, p->v.s.n);
        if (i >= m->n || m->e[i].id == NULL || mh_path_cmp(m->e[i].path, m->e[i].plen, p->v.s.p, p->v.s.n) != 0) {
            while (j-- > 0) m->e[mk[j].i].id = mk[j].id;
            free(mk);
            if (why) *why = "delta_remove: path not in the parent manifest";
            return MH_ENOENT;
        }
        mk[j] = (struct mark){i, m->e[i].id};
        m->e[i].id = NULL;
        if (i < lowest) lowest = i;
    }
    free(mk);
    size_t o = lowest;
    for (size_t i = lowest; i < m->n; i++)
        if (m->e[i].id) m->e[o++] = m->e[i];
    m->n = o;
    mh_manifest_dirty(m, lowest);
    return 0;
}

/* Merges k sorted, unique upserts into m in one pass. */
static int merge_upserts(mh_manifest_t *m, const mh_mentry_t *u, size_t k)
{
    size_t n = m->n, cap = n + k;
    mh_mentry_t *out = malloc(cap * sizeof(*out));
    if (!out) return MH_ENOMEM;
    size_t i = 0, j = 0, o = 0, first = SIZE_MAX;
    while (i < n || j < k) {
        int c = i == n ? 1 : j == k ? -1 : entry_cmp(&m->e[i], &u[j]);
        if (c < 0) {
            out[o++] = m->e[i++];
            continue;
        }
        if (c == 0 && memcmp(m->e[i].id, u[j].id, MH_ID_LEN) == 0) {
            out[o++] = m->e[i++]; /* same id: no change */
            j++;
            continue;
        }
        if (first == SIZE_MAX) first = o;
        out[o] = u[j++];
        if (c == 0) out[o].path = m->e[i++].path; /* keep the old path bytes' owner */
        o++;
    }
    free(m->e);
    m->e = out;
    m->n = o;
    m->cap = cap;
    if (first != SIZE_MAX) mh_manifest_dirty(m, first);
    return 0;
}

int mh_manifest_apply(mh_manifest_t *m, const mh_val_t *upsert, const mh_val_t *remove, const char **why)
{
    if (upsert && upsert->t != MH_V_MAP) return set_why(why, "delta_upsert: not a map");
    if (remove && remove->t != MH_V_ARR) return set_why(why, "delta_remove: not an array");
    int rc = check_removes(remove, why);
    mh_mentry_t *u = NULL;
    if (!rc) rc = collect_upserts(upsert, &u, why);
    if (!rc) rc = apply_removes(m, remove, why);
    size_t k = upsert ? upsert->v.m.n : 0;
    if (!rc && k > SMALL_UPSERT) {
        rc = merge_upserts(m, u, k);
    } else {
        for (size_t i = 0; !rc && i < k; i++) rc = mh_manifest_upsert(m, u[i].path, u[i].plen, u[i].id);
    }
    free(u);
    return rc;
}

/* ------------------------------------------------------ encode / decode */

int mh_manifest_encode(const mh_manifest_t *m, mh_buf_t *out)
{
    if (m->n > UINT32_MAX) return MH_EINVAL;
    size_t mark = out->len;
    mh_mpw_t w;
    mh_mpw_init(&w, out);
    mh_mpw_map(&w, (uint32_t)m->n);
    for (size_t i = 0; i < m->n && !w.err; i++) {
        mh_mpw_str(&w, m->e[i].path, m->e[i].plen);
        mh_mpw_str(&w, m->e[i].id, MH_ID_LEN);
    }
    if (w.err) out->len = mark;
    return w.err;
}

int mh_manifest_decode(mh_arena_t *a, const uint8_t *buf, size_t n, mh_manifest_t *m)
{
    /* A flat map of strings: depth 1; counts are bounded by the bytes. */
    const mh_decode_limits_t lim = {.max_depth = 1, .max_items = UINT32_MAX};
    mh_val_t v;
    const char *why;
    m->n = 0;
    m->dirty = 0;
    int rc = mh_msgpack_decode(a, buf, n, &lim, &v, &why);
    if (rc) return rc == MH_ENOMEM ? rc : MH_EPARSE;
    if (v.t != MH_V_MAP) return MH_EPARSE;
    rc = mh__manifest_reserve(m, v.v.m.n);
    if (rc) return rc;
    for (uint32_t i = 0; i < v.v.m.n; i++) {
        const mh_kv_t *kv = &v.v.m.kv[i];
        if (kv->k.t != MH_V_STR || !mh_path_valid(kv->k.v.s.p, kv->k.v.s.n) || kv->v.t != MH_V_STR ||
            !mh_id_ok(kv->v.v.s.p, kv->v.v.s.n))
            return MH_EPARSE;
        m->e[i] = (mh_mentry_t){.path = kv->k.v.s.p, .plen = kv->k.v.s.n, .id = kv->v.v.s.p};
    }
    if (!sort_unique(m->e, v.v.m.n)) return MH_EPARSE;
    m->n = v.v.m.n;
    return 0;
}

/* ---------------------------------------------------------------- diff */

/* Walks both sorted manifests once; with w == NULL it only counts. */
static void diff_walk(const mh_manifest_t *from, const mh_manifest_t *to, mh_mpw_t *wu, mh_mpw_t *wr,
                      uint32_t *nu, uint32_t *nr)
{
    size_t i = 0, j = 0;
    *nu = *nr = 0;
    while (i < from->n || j < to->n) {
        int c = i == from->n ? 1 : j == to->n ? -1 : entry_cmp(&from->e[i], &to->e[j]);
        if (c < 0) { /* only in from: removed */
            if (wr) mh_mpw_str(wr, from->e[i].path, from->e[i].plen);
            (*nr)++;
            i++;
        } else if (c > 0 || memcmp(from->e[i].id, to->e[j].id, MH_ID_LEN) != 0) {
            if (wu) { /* new in to, or changed id */
                mh_mpw_str(wu, to->e[j].path, to->e[j].plen);
                mh_mpw_str(wu, to->e[j].id, MH_ID_LEN);
            }
            (*nu)++;
            if (c == 0) i++;
            j++;
        } else {
            i++;
            j++;
        }
    }
}

int mh_manifest_diff(const mh_manifest_t *from, const mh_manifest_t *to, mh_buf_t *upsert_mp, uint32_t *nupsert,
                     mh_buf_t *remove_mp, uint32_t *nremove)
{
    if (from->n > UINT32_MAX || to->n > UINT32_MAX) return MH_EINVAL;
    size_t mu = upsert_mp->len, mr = remove_mp->len;
    mh_mpw_t wu, wr;
    mh_mpw_init(&wu, upsert_mp);
    mh_mpw_init(&wr, remove_mp);
    diff_walk(from, to, NULL, NULL, nupsert, nremove);
    mh_mpw_map(&wu, *nupsert);
    mh_mpw_arr(&wr, *nremove);
    diff_walk(from, to, &wu, &wr, nupsert, nremove);
    int rc = wu.err ? wu.err : wr.err;
    if (rc) {
        upsert_mp->len = mu;
        remove_mp->len = mr;
    }
    return rc;
}
