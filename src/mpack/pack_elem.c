/*
 * pack_elem.c — the checks of one decoded pack element (SPEC 2): a commit
 * map, a snapshot map, the branch_heads map. One copy of them serves every
 * reader: the stream reader decodes each element once it is complete and
 * calls these, and mh_pack_read is the stream reader fed one buffer.
 *
 * Leniency (what a client may send): nil or absent parents; absent
 * `branch` ("") and absent deltas (empty); unknown keys ignored (unknown
 * commit keys are kept in the map as metadata). Strictness (what would
 * be ambiguous or poison storage): a known key twice in one map, an id
 * that is not ^sha256:[0-9a-f]{64}$, a NUL or invalid UTF-8 in message,
 * author, committed_at or branch, an invalid path in a delta, optional
 * metadata of the wrong type.
 */
#include <stdio.h>
#include <string.h>

#include "mpack_internal.h"

static const mh_val_t empty_map = {.t = MH_V_MAP};
static const mh_val_t empty_arr = {.t = MH_V_ARR};

int mh__bad(mh__rd_t *r, int err, const char *field, const char *msg)
{
    char idx[32] = "";
    if (r->idx != MH__NO_IDX) snprintf(idx, sizeof idx, "[%zu]", r->idx);
    const char *w = mh_sprintf(r->a, "%s%s%s%s: %s", r->sect, idx, field ? "." : "", field ? field : "", msg);
    *r->why = w ? w : msg;
    return err;
}

static mh_str_t as_str(const mh_val_t *v)
{
    return (mh_str_t){v->v.s.p, v->v.s.n};
}

/* An id field: required ids must be present; optional ones may be absent
 * or nil (out->p stays NULL). */
static int get_id(mh__rd_t *r, const mh_val_t *v, const char *field, bool required, mh_str_t *out)
{
    *out = (mh_str_t){NULL, 0};
    if (!v || v->t == MH_V_NIL) return required ? mh__bad(r, MH_EPARSE, field, "missing") : 0;
    if (v->t != MH_V_STR || !mh_id_ok(v->v.s.p, v->v.s.n)) return mh__bad(r, MH_EPARSE, field, "not a sha256 id");
    *out = as_str(v);
    return 0;
}

/* A text field that enters the commit id or PostgreSQL: a NUL would make
 * the id ambiguous (SPEC 4.3) and PostgreSQL text refuses bad UTF-8. */
static int get_text(mh__rd_t *r, const mh_val_t *v, const char *field, bool required, mh_str_t *out)
{
    *out = (mh_str_t){"", 0};
    if (!v || (!required && v->t == MH_V_NIL)) return required ? mh__bad(r, MH_EPARSE, field, "missing") : 0;
    if (v->t != MH_V_STR) return mh__bad(r, MH_EPARSE, field, "not a string");
    if (v->v.s.n && memchr(v->v.s.p, 0, v->v.s.n)) return mh__bad(r, MH_EPARSE, field, "contains a NUL byte");
    if (!mh_utf8_valid(v->v.s.p, v->v.s.n)) return mh__bad(r, MH_EPARSE, field, "not valid UTF-8");
    if (v->v.s.n) *out = as_str(v);
    return 0;
}

/* A known key: its name and length (compared first: most keys differ in
 * length, so few memcmp calls are made). */
typedef struct {
    const char *s;
    uint32_t n;
} known_key_t;
#define KEY(lit) {lit, sizeof(lit) - 1}

/* Finds the known keys of a map in one pass. keys[i] names slot i;
 * out[i] receives its value (NULL when absent). A known key present twice
 * is an error (which one would count?); other keys are ignored. */
static int pick(mh__rd_t *r, const mh_val_t *map, const known_key_t *keys, size_t nkeys, const mh_val_t **out)
{
    if (map->t != MH_V_MAP) return mh__bad(r, MH_EPARSE, NULL, "element is not a map");
    for (size_t k = 0; k < nkeys; k++) out[k] = NULL;
    for (uint32_t i = 0; i < map->v.m.n; i++) {
        const mh_val_t *key = &map->v.m.kv[i].k;
        if (key->t != MH_V_STR) continue;
        for (size_t k = 0; k < nkeys; k++) {
            if (key->v.s.n != keys[k].n || memcmp(key->v.s.p, keys[k].s, keys[k].n) != 0) continue;
            if (out[k]) return mh__bad(r, MH_EPARSE, keys[k].s, "key appears twice");
            out[k] = &map->v.m.kv[i].v;
            break;
        }
    }
    return 0;
}

/* ------------------------------------------------------------- commits */

enum {
    C_ID, C_PARENT, C_PARENT2, C_SNAP, C_MSG, C_AUTHOR, C_AT, C_BRANCH, C_NSTD,
    /* optional metadata, type-checked, kept verbatim in the map */
    C_META_STR = C_NSTD, /* 8 string fields follow */
    C_BREAKING = C_META_STR + 8,
    C_METADATA,
    C_NKEYS
};

static const known_key_t commit_keys[C_NKEYS] = {
    KEY("commit_id"),     KEY("parent_commit_id"), KEY("parent2_commit_id"), KEY("snapshot_id"),
    KEY("message"),       KEY("author"),           KEY("committed_at"),      KEY("branch"),
    KEY("agent_id"),      KEY("model_id"),         KEY("toolchain_id"),      KEY("prompt_hash"),
    KEY("signature"),     KEY("signer_key_id"),    KEY("signer_public_key"), KEY("sem_ver_bump"),
    KEY("breaking_changes"), KEY("metadata"),
};

int mh__pack_commit(mh__rd_t *r, const mh_val_t *map, mh_pack_commit_t *c)
{
    const mh_val_t *f[C_NKEYS];
    int rc = pick(r, map, commit_keys, C_NKEYS, f);
    if (rc) return rc;
    c->map = map;
    if ((rc = get_id(r, f[C_ID], "commit_id", true, &c->commit_id))) return rc;
    if ((rc = get_id(r, f[C_PARENT], "parent_commit_id", false, &c->parent))) return rc;
    if ((rc = get_id(r, f[C_PARENT2], "parent2_commit_id", false, &c->parent2))) return rc;
    if ((rc = get_id(r, f[C_SNAP], "snapshot_id", true, &c->snapshot_id))) return rc;
    if ((rc = get_text(r, f[C_MSG], "message", true, &c->message))) return rc;
    if ((rc = get_text(r, f[C_AUTHOR], "author", true, &c->author))) return rc;
    if ((rc = get_text(r, f[C_AT], "committed_at", true, &c->committed_at))) return rc;
    if ((rc = get_text(r, f[C_BRANCH], "branch", false, &c->branch))) return rc;
    for (int k = C_META_STR; k < C_BREAKING; k++)
        if (f[k] && f[k]->t != MH_V_NIL && f[k]->t != MH_V_STR)
            return mh__bad(r, MH_EPARSE, commit_keys[k].s, "not a string");
    if (f[C_BREAKING] && f[C_BREAKING]->t != MH_V_NIL && f[C_BREAKING]->t != MH_V_ARR)
        return mh__bad(r, MH_EPARSE, "breaking_changes", "not an array");
    if (f[C_METADATA] && f[C_METADATA]->t != MH_V_NIL && f[C_METADATA]->t != MH_V_MAP)
        return mh__bad(r, MH_EPARSE, "metadata", "not a map");
    return 0;
}

/* ----------------------------------------------------------- snapshots */

enum { S_ID, S_PARENT, S_UPSERT, S_REMOVE, S_NKEYS };
static const known_key_t snap_keys[S_NKEYS] = {KEY("snapshot_id"), KEY("parent_snapshot_id"), KEY("delta_upsert"),
                                               KEY("delta_remove")};

/* Types, paths and ids of a delta; duplicates are mh_manifest_apply's. */
static int check_delta(mh__rd_t *r, const mh_val_t *up, const mh_val_t *rm)
{
    for (uint32_t i = 0; i < up->v.m.n; i++) {
        const mh_kv_t *kv = &up->v.m.kv[i];
        if (kv->k.t != MH_V_STR || !mh_path_valid(kv->k.v.s.p, kv->k.v.s.n))
            return mh__bad(r, MH_EPARSE, "delta_upsert", "invalid path");
        if (kv->v.t != MH_V_STR || !mh_id_ok(kv->v.v.s.p, kv->v.v.s.n))
            return mh__bad(r, MH_EPARSE, "delta_upsert", "object id is not a sha256 id");
    }
    for (uint32_t i = 0; i < rm->v.a.n; i++) {
        const mh_val_t *p = &rm->v.a.items[i];
        if (p->t != MH_V_STR || !mh_path_valid(p->v.s.p, p->v.s.n))
            return mh__bad(r, MH_EPARSE, "delta_remove", "invalid path");
    }
    return 0;
}

int mh__pack_snapshot(mh__rd_t *r, const mh_val_t *map, mh_pack_snapshot_t *s)
{
    const mh_val_t *f[S_NKEYS];
    int rc = pick(r, map, snap_keys, S_NKEYS, f);
    if (rc) return rc;
    if ((rc = get_id(r, f[S_ID], "snapshot_id", true, &s->snapshot_id))) return rc;
    if ((rc = get_id(r, f[S_PARENT], "parent_snapshot_id", false, &s->parent))) return rc;
    const mh_val_t *up = f[S_UPSERT], *rm = f[S_REMOVE];
    if (!up || up->t == MH_V_NIL) up = &empty_map;
    if (!rm || rm->t == MH_V_NIL) rm = &empty_arr;
    if (up->t != MH_V_MAP) return mh__bad(r, MH_EPARSE, "delta_upsert", "not a map");
    if (rm->t != MH_V_ARR) return mh__bad(r, MH_EPARSE, "delta_remove", "not an array");
    s->upsert = up;
    s->remove = rm;
    return check_delta(r, up, rm);
}

/* -------------------------------------------------------- branch heads */

int mh__pack_heads(mh__rd_t *r, const mh_val_t *v, const mh_val_t **out)
{
    *out = NULL;
    r->idx = MH__NO_IDX;
    if (v->t == MH_V_NIL) return 0;
    if (v->t != MH_V_MAP) return mh__bad(r, MH_EPARSE, NULL, "not a map");
    for (uint32_t i = 0; i < v->v.m.n; i++) {
        const mh_kv_t *kv = &v->v.m.kv[i];
        mh_str_t s;
        int rc;
        r->idx = i;
        if (kv->k.t != MH_V_STR || kv->k.v.s.n == 0) return mh__bad(r, MH_EPARSE, "branch", "not a non-empty string");
        if ((rc = get_text(r, &kv->k, "branch", true, &s))) return rc;
        if ((rc = get_id(r, &kv->v, "commit_id", true, &s))) return rc;
    }
    *out = v;
    return 0;
}
