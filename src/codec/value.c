/*
 * value.c — the value view: lookups, constructors and growing containers.
 *
 * Invariant: every ARR/MAP node with n items owns storage for exactly
 * mh_val_cap(n) slots (decoded or built), so push/put can tell from n
 * alone when the storage is full. Growth copies into a new arena block
 * (the old one is simply abandoned: arenas do not free), doubling, so the
 * total cost stays linear.
 */
#include <math.h>
#include <string.h>

#include "codec_internal.h"

const mh_val_t *mh_val_get(const mh_val_t *map, const char *key)
{
    if (!map || map->t != MH_V_MAP) return NULL;
    size_t klen = strlen(key);
    for (uint32_t i = 0; i < map->v.m.n; i++) {
        const mh_val_t *k = &map->v.m.kv[i].k;
        if (k->t == MH_V_STR && k->v.s.n == klen && memcmp(k->v.s.p, key, klen) == 0) return &map->v.m.kv[i].v;
    }
    return NULL;
}

bool mh_val_streq(const mh_val_t *v, const char *lit)
{
    if (!v || v->t != MH_V_STR) return false;
    size_t n = strlen(lit);
    return v->v.s.n == n && memcmp(v->v.s.p, lit, n) == 0;
}

bool mh_val_equal(const mh_val_t *a, const mh_val_t *b)
{
    if (a->t != b->t) return false;
    switch (a->t) {
    case MH_V_NIL: return true;
    case MH_V_BOOL: return a->v.b == b->v.b;
    case MH_V_INT: return a->v.i == b->v.i;
    case MH_V_UINT: return a->v.u == b->v.u;
    case MH_V_FLOAT: return a->v.f == b->v.f || (isnan(a->v.f) && isnan(b->v.f));
    case MH_V_STR:
    case MH_V_BIN: return a->v.s.n == b->v.s.n && (a->v.s.n == 0 || memcmp(a->v.s.p, b->v.s.p, a->v.s.n) == 0);
    case MH_V_ARR:
        if (a->v.a.n != b->v.a.n) return false;
        for (uint32_t i = 0; i < a->v.a.n; i++)
            if (!mh_val_equal(&a->v.a.items[i], &b->v.a.items[i])) return false;
        return true;
    case MH_V_MAP:
        if (a->v.m.n != b->v.m.n) return false;
        for (uint32_t i = 0; i < a->v.m.n; i++)
            if (!mh_val_equal(&a->v.m.kv[i].k, &b->v.m.kv[i].k) || !mh_val_equal(&a->v.m.kv[i].v, &b->v.m.kv[i].v))
                return false;
        return true;
    }
    return false;
}

char *mh_val_cstr(mh_arena_t *a, const mh_val_t *v)
{
    if (!v || v->t != MH_V_STR) return NULL;
    /* A C string cannot hold a NUL: refusing it here stops "abc\0def"
     * from silently becoming "abc" in a name or a path. */
    if (v->v.s.n && memchr(v->v.s.p, 0, v->v.s.n)) return NULL;
    return mh_strndup(a, v->v.s.p ? v->v.s.p : "", v->v.s.n);
}

/* ---------------------------------------------------------- constructors */

mh_val_t mh_v_nil(void)
{
    return (mh_val_t){.t = MH_V_NIL};
}

mh_val_t mh_v_bool(bool b)
{
    return (mh_val_t){.t = MH_V_BOOL, .v.b = b};
}

mh_val_t mh_v_int(int64_t i)
{
    if (i >= 0) return (mh_val_t){.t = MH_V_UINT, .v.u = (uint64_t)i};
    return (mh_val_t){.t = MH_V_INT, .v.i = i};
}

mh_val_t mh_v_uint(uint64_t u)
{
    return (mh_val_t){.t = MH_V_UINT, .v.u = u};
}

mh_val_t mh_v_float(double f)
{
    return (mh_val_t){.t = MH_V_FLOAT, .v.f = f};
}

mh_val_t mh_v_str(const char *s)
{
    return mh_v_strn(s, s ? strlen(s) : 0);
}

mh_val_t mh_v_strn(const char *s, size_t n)
{
    return (mh_val_t){.t = MH_V_STR, .v.s = {s, (uint32_t)n}};
}

mh_val_t mh_v_bin(const void *p, size_t n)
{
    return (mh_val_t){.t = MH_V_BIN, .v.s = {(const char *)p, (uint32_t)n}};
}

mh_val_t mh_v_ref(const mh_val_t *v)
{
    return v ? *v : mh_v_nil();
}

mh_val_t *mh_v_map(mh_arena_t *a)
{
    mh_val_t *v = mh_alloc(a, sizeof(*v));
    if (v) *v = (mh_val_t){.t = MH_V_MAP};
    return v;
}

mh_val_t *mh_v_arr(mh_arena_t *a)
{
    mh_val_t *v = mh_alloc(a, sizeof(*v));
    if (v) *v = (mh_val_t){.t = MH_V_ARR};
    return v;
}

/* Makes room for item n (0-based) in storage of `size`-byte slots;
 * returns the (possibly moved) storage or NULL on ENOMEM. */
static void *grow(mh_arena_t *a, void *items, uint32_t n, size_t size)
{
    if (n == UINT32_MAX) return NULL;
    size_t cap = mh_val_cap(n);
    if (n < cap) return items;
    void *nitems = mh_alloc(a, mh_val_cap((size_t)n + 1) * size);
    if (nitems && n) memcpy(nitems, items, (size_t)n * size);
    return nitems;
}

/* A STR/BIN value with a NULL pointer is what mh_v_str(mh_strdup(...))
 * gives when the copy failed: refusing it here checks every such call
 * site at once (an answer must never carry a silently emptied field). */
static bool lost_alloc(const mh_val_t *v)
{
    return v->t == MH_V_STR && v->v.s.p == NULL; /* an empty BIN may legitimately be NULL */
}

int mh_map_put(mh_arena_t *a, mh_val_t *map, const char *key, mh_val_t v)
{
    if (!map || map->t != MH_V_MAP) return MH_EINVAL;
    if (!key || lost_alloc(&v)) return MH_ENOMEM;
    mh_kv_t *kv = grow(a, map->v.m.kv, map->v.m.n, sizeof(mh_kv_t));
    if (!kv) return MH_ENOMEM;
    map->v.m.kv = kv;
    kv[map->v.m.n].k = mh_v_str(key);
    kv[map->v.m.n].v = v;
    map->v.m.n++;
    return 0;
}

int mh_arr_push(mh_arena_t *a, mh_val_t *arr, mh_val_t v)
{
    if (!arr || arr->t != MH_V_ARR) return MH_EINVAL;
    if (lost_alloc(&v)) return MH_ENOMEM;
    mh_val_t *items = grow(a, arr->v.a.items, arr->v.a.n, sizeof(mh_val_t));
    if (!items) return MH_ENOMEM;
    arr->v.a.items = items;
    items[arr->v.a.n++] = v;
    return 0;
}

/* ------------------------------------------------------ sticky builder */

void mh_vb_init(mh_vb_t *b, mh_arena_t *a) { *b = (mh_vb_t){a, 0}; }

static mh_val_t *vb_check(mh_vb_t *b, mh_val_t *v)
{
    if (!v && !b->err) b->err = MH_ENOMEM;
    return b->err ? NULL : v;
}

mh_val_t *mh_vb_map(mh_vb_t *b) { return b->err ? NULL : vb_check(b, mh_v_map(b->a)); }

mh_val_t *mh_vb_arr(mh_vb_t *b) { return b->err ? NULL : vb_check(b, mh_v_arr(b->a)); }

void mh_vb_put(mh_vb_t *b, mh_val_t *map, const char *key, mh_val_t v)
{
    if (b->err) return;
    int rc = map ? mh_map_put(b->a, map, key, v) : MH_ENOMEM;
    if (rc) b->err = rc;
}

void mh_vb_push(mh_vb_t *b, mh_val_t *arr, mh_val_t v)
{
    if (b->err) return;
    int rc = arr ? mh_arr_push(b->a, arr, v) : MH_ENOMEM;
    if (rc) b->err = rc;
}

mh_val_t mh_vb_strn(mh_vb_t *b, const char *s, size_t n)
{
    if (!s || b->err) return mh_v_nil();
    char *c = mh_strndup(b->a, s, n);
    if (!c) {
        b->err = MH_ENOMEM;
        return mh_v_nil();
    }
    return mh_v_strn(c, n);
}

mh_val_t mh_vb_str(mh_vb_t *b, const char *s) { return s ? mh_vb_strn(b, s, strlen(s)) : mh_v_nil(); }

mh_val_t mh_vb_node(mh_vb_t *b, const mh_val_t *node)
{
    if (!node) {
        if (!b->err) b->err = MH_ENOMEM;
        return mh_v_nil();
    }
    return *node;
}
