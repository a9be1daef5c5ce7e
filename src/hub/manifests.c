/*
 * manifests.c — full manifests rebuilt from the snapshots table's delta
 * rows (SPEC 2/3, DESIGN 4 "bounded delta chains"), with a small
 * per-process LRU of reconstructed manifests.
 *
 * Invariants:
 *  - One query per miss: a recursive CTE walks parent_snapshot_id from the
 *    asked snapshot to the nearest row holding a checkpoint (or a root),
 *    at most CHAIN_MAX links; the deltas are then applied oldest first.
 *  - Every rebuilt manifest is checked against its snapshot id before it
 *    is handed out or cached, so a corrupt chain is an error, not a
 *    silently wrong tree.
 *  - LRU entries own their bytes (one heap pool per entry); manifests
 *    handed to callers borrow a copy of that pool in the caller's arena,
 *    so eviction never invalidates a caller's manifest. Cached manifests
 *    keep mpack's SHA-256 prefix states, so a caller that edits a cached
 *    parent (push) re-hashes only the tail.
 *  - Callbacks always fire on a later loop turn: an LRU hit goes through
 *    a no-op thread-pool job rather than calling back re-entrantly.
 */
#include "hub_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LRU_SLOTS 64
#define LRU_MAX_BYTES ((size_t)96 << 20)
#define LRU_MAX_ONE ((size_t)24 << 20)
#define CHAIN_MAX (4 * MH_CHECKPOINT_INTERVAL)

typedef struct {
    char sid[MH_ID_SIZE]; /* "" = free slot */
    char *pool;           /* paths and ids the entries point into */
    size_t pool_len;
    mh_manifest_t m;
    uint64_t used;
} lru_ent_t;

struct mh__manifest_lru {
    lru_ent_t ent[LRU_SLOTS];
    size_t bytes;
    uint64_t tick;
    uint64_t hits, misses;
};

static mh__manifest_lru_t *lru(mh_hub_t *hub)
{
    mh__manifest_lru_t **l = mh__caches_manifests(hub, true);
    if (!l) return NULL;
    if (!*l) *l = calloc(1, sizeof **l);
    return *l;
}

static size_t ent_bytes(const lru_ent_t *e) { return e->pool_len + e->m.cap * sizeof(mh_mentry_t) + 256; }

static void ent_clear(mh__manifest_lru_t *l, lru_ent_t *e)
{
    if (!e->sid[0]) return;
    l->bytes -= ent_bytes(e);
    mh_manifest_free(&e->m);
    free(e->pool);
    memset(e, 0, sizeof *e);
}

void mh__manifest_lru_free(mh__manifest_lru_t *l)
{
    if (!l) return;
    for (int i = 0; i < LRU_SLOTS; i++) ent_clear(l, &l->ent[i]);
    free(l);
}

static lru_ent_t *lru_find(mh__manifest_lru_t *l, const char *sid)
{
    for (int i = 0; i < LRU_SLOTS; i++)
        if (l->ent[i].sid[0] && memcmp(l->ent[i].sid, sid, MH_ID_LEN) == 0) return &l->ent[i];
    return NULL;
}

/* Points m's entries into `to` instead of `from` (same layout). */
static void rebase(mh_manifest_t *m, const char *from, char *to)
{
    for (size_t i = 0; i < m->n; i++) {
        m->e[i].path = to + (m->e[i].path - from);
        m->e[i].id = to + (m->e[i].id - from);
    }
}

/* Clones the cached manifest into out, its bytes copied into arena a. */
static int lru_copy_out(const lru_ent_t *e, mh_arena_t *a, mh_manifest_t *out)
{
    char *pool = mh_alloc(a, e->pool_len ? e->pool_len : 1);
    if (!pool) return MH_ENOMEM;
    memcpy(pool, e->pool, e->pool_len);
    int rc = mh_manifest_clone(out, &e->m);
    if (rc) return rc;
    rebase(out, e->pool, pool);
    return 0;
}

void mh_hub_manifest_cache_put(mh_hub_t *hub, const char *snapshot_id, const mh_manifest_t *m)
{
    mh__manifest_lru_t *l = lru(hub);
    if (!l || !mh_id_valid(snapshot_id, MH_ID_LEN)) return;
    size_t pool_len = 0;
    for (size_t i = 0; i < m->n; i++) pool_len += m->e[i].plen + MH_ID_LEN;
    if (pool_len > LRU_MAX_ONE) return;
    lru_ent_t *e = lru_find(l, snapshot_id);
    if (e) {
        e->used = ++l->tick;
        return;
    }
    char *pool = malloc(pool_len ? pool_len : 1);
    mh_manifest_t copy = {0};
    if (!pool || mh_manifest_clone(&copy, m)) {
        free(pool);
        mh_manifest_free(&copy);
        return;
    }
    /* Pack paths and ids into one pool: the entries then survive whatever
     * buffers the caller's manifest borrowed from. */
    size_t off = 0;
    for (size_t i = 0; i < copy.n; i++) {
        mh_mentry_t *x = &copy.e[i];
        memcpy(pool + off, x->path, x->plen);
        x->path = pool + off;
        off += x->plen;
        memcpy(pool + off, x->id, MH_ID_LEN);
        x->id = pool + off;
        off += MH_ID_LEN;
    }
    lru_ent_t fresh = {.pool = pool, .pool_len = pool_len, .m = copy};
    size_t need = ent_bytes(&fresh);
    /* Evict least recently used entries until one slot is free and the
     * byte budget holds. */
    for (;;) {
        int free_slot = -1, victim = -1;
        for (int i = 0; i < LRU_SLOTS; i++) {
            if (!l->ent[i].sid[0]) {
                if (free_slot < 0) free_slot = i;
            } else if (victim < 0 || l->ent[i].used < l->ent[victim].used) {
                victim = i;
            }
        }
        if (free_slot >= 0 && l->bytes + need <= LRU_MAX_BYTES) {
            e = &l->ent[free_slot];
            break;
        }
        if (victim < 0) { /* cannot happen: need <= budget */
            mh_manifest_free(&copy);
            free(pool);
            return;
        }
        ent_clear(l, &l->ent[victim]);
    }
    *e = fresh;
    memcpy(e->sid, snapshot_id, MH_ID_LEN);
    e->sid[MH_ID_LEN] = 0;
    e->used = ++l->tick;
    l->bytes += need;
}

/* ---------------------------------------------------------------- load */

typedef struct {
    mh_hub_t *hub;
    mh_arena_t *a;
    char sid[MH_ID_SIZE];
    mh_manifest_t *out;
    mh_manifest_cb cb;
    void *ud;
    uv_work_t work;
    int err;
    const char *why;
} mload_t;

/* Columns: n, snapshot_id, is_root ("true"/"false"), checkpoint,
 * delta_upsert, delta_remove; base (highest n) first. The CTE carries only
 * ids so the bytea columns are read once, by the final join. Results come
 * in binary format: a bytea arrives as its bytes, not twice as many hex
 * digits (a million-entry root delta is ~100 MB); the other columns are
 * text, whose binary form is the text itself. */
static const mh_stmt_t st_chain = {
    "hub_manifest_chain",
    "WITH RECURSIVE chain(snapshot_id, parent_snapshot_id, cp, n) AS ("
    " SELECT snapshot_id, parent_snapshot_id, checkpoint IS NOT NULL, 0 FROM snapshots WHERE snapshot_id = $1"
    " UNION ALL"
    " SELECT s.snapshot_id, s.parent_snapshot_id, s.checkpoint IS NOT NULL, c.n + 1"
    " FROM chain c JOIN snapshots s ON s.snapshot_id = c.parent_snapshot_id"
    " WHERE NOT c.cp AND c.n < $2::int)"
    " SELECT c.n::text, c.snapshot_id, (c.parent_snapshot_id IS NULL)::text, s.checkpoint,"
    " CASE WHEN c.cp THEN NULL ELSE s.delta_upsert END, CASE WHEN c.cp THEN NULL ELSE s.delta_remove END"
    " FROM chain c JOIN snapshots s ON s.snapshot_id = c.snapshot_id ORDER BY c.n DESC",
    2, 1};

static void noop_work(uv_work_t *w) { (void)w; }
static void finish(mload_t *ml, int err, const char *why);

/* Applies the delta of row r (columns 4 and 5) to m. */
static int apply_row(mh_arena_t *a, PGresult *res, int r, mh_manifest_t *m, const char **why)
{
    uint8_t *up, *rm;
    size_t upn, rmn;
    int brc = mh_pq_bytea(a, res, r, 4, &up, &upn);
    if (!brc) brc = mh_pq_bytea(a, res, r, 5, &rm, &rmn);
    if (brc) {
        /* Out of memory is not a parse error: it must not read as a
         * corrupt row (issue 15 item 3). */
        *why = brc == MH_ENOMEM ? "out of memory reading a stored delta" : "stored delta is not bytea";
        return brc == MH_ENOMEM ? MH_ENOMEM : MH_EPARSE;
    }
    mh_val_t upv, rmv;
    int rc = mh_msgpack_decode(a, up, upn, &mh_decode_limits_default, &upv, why);
    if (!rc) rc = mh_msgpack_decode(a, rm, rmn, &mh_decode_limits_default, &rmv, why);
    if (rc) return rc == MH_ENOMEM ? rc : MH_EPARSE;
    rc = mh_manifest_apply(m, &upv, &rmv, why);
    return rc == MH_ENOMEM ? rc : rc ? MH_EPARSE : 0;
}

static int rebuild(mload_t *ml, PGresult *res, mh_manifest_t *m, const char **why)
{
    int rows = PQntuples(res);
    if (rows == 0) {
        *why = "no such snapshot";
        return MH_ENOENT;
    }
    if (strcmp(mh_pq_str(res, rows - 1, 1), ml->sid) != 0) {
        *why = "snapshot chain query returned rows out of order";
        return MH_EDB;
    }
    int start;
    if (!mh_pq_isnull(res, 0, 3)) {
        uint8_t *cp;
        size_t cpn;
        int crc = mh_pq_bytea(ml->a, res, 0, 3, &cp, &cpn);
        if (!crc) crc = mh_manifest_decode(ml->a, cp, cpn, m);
        if (crc) {
            *why = crc == MH_ENOMEM ? "out of memory reading a checkpoint" : "corrupt checkpoint";
            return crc == MH_ENOMEM ? MH_ENOMEM : MH_EPARSE;
        }
        start = 1;
    } else if (strcmp(mh_pq_str(res, 0, 2), "true") == 0) {
        start = 0; /* a root: its delta is the whole manifest */
    } else if (mh_pq_int(res, 0, 0) >= CHAIN_MAX) {
        *why = "delta chain longer than the checkpoint bound";
        return MH_ELIMIT;
    } else {
        *why = "delta chain broken: a parent snapshot row is missing";
        return MH_ENOENT;
    }
    for (int r = start; r < rows; r++) {
        int rc = apply_row(ml->a, res, r, m, why);
        if (rc) return rc;
    }
    mh_id_t got;
    mh_manifest_id(m, &got);
    if (memcmp(got.s, ml->sid, MH_ID_LEN) != 0) {
        *why = "rebuilt manifest does not hash to its snapshot id";
        return MH_EHASH;
    }
    return 0;
}

static void chain_cb(void *ud, PGresult *res, int err, const char *errmsg)
{
    mload_t *ml = ud;
    if (err) {
        finish(ml, err, errmsg);
        return;
    }
    const char *why = NULL;
    uint64_t t0 = mh_now_us();
    int rc = rebuild(ml, res, ml->out, &why);
    if (rc) {
        mh_manifest_free(ml->out);
        mh_warn("manifest %s: %s (%s)", ml->sid, why ? why : "", mh_strerror(rc));
        finish(ml, rc, why);
        return;
    }
    mh_debug("manifest %s: %d rows, %zu entries, rebuilt in %llu us", ml->sid, PQntuples(res), ml->out->n,
             (unsigned long long)(mh_now_us() - t0));
    mh_hub_manifest_cache_put(ml->hub, ml->sid, ml->out);
    finish(ml, 0, NULL);
}

static void finish(mload_t *ml, int err, const char *why)
{
    ml->cb(ml->ud, err, why);
    free(ml);
}

static void deliver_after(uv_work_t *w, int status)
{
    (void)status;
    mload_t *ml = w->data;
    finish(ml, ml->err, ml->why);
}

void mh_hub_load_manifest(mh_hub_t *hub, mh_arena_t *a, const char *snapshot_id, mh_manifest_t *out, mh_manifest_cb cb,
                          void *ud)
{
    *out = (mh_manifest_t){0};
    /* Heap, not arena: it must outlive nothing but this operation, and
     * its uv_work_t may not move. */
    mload_t *ml = calloc(1, sizeof *ml);
    if (!ml) {
        /* No memory for 200 bytes: there is no way to call back later. */
        cb(ud, MH_ENOMEM, "out of memory");
        return;
    }
    *ml = (mload_t){.hub = hub, .a = a, .out = out, .cb = cb, .ud = ud};
    ml->work.data = ml;
    if (!snapshot_id || !mh_id_valid(snapshot_id, strlen(snapshot_id))) {
        ml->err = MH_EINVAL;
        ml->why = "not a snapshot id";
        uv_queue_work(hub->loop, &ml->work, noop_work, deliver_after);
        return;
    }
    memcpy(ml->sid, snapshot_id, MH_ID_SIZE);
    mh__manifest_lru_t *l = lru(hub);
    lru_ent_t *e = l ? lru_find(l, snapshot_id) : NULL;
    if (e) {
        e->used = ++l->tick;
        l->hits++;
        ml->err = lru_copy_out(e, a, out);
        if (ml->err) ml->why = "out of memory";
        uv_queue_work(hub->loop, &ml->work, noop_work, deliver_after);
        return;
    }
    if (l) l->misses++;
    char nbuf[16];
    snprintf(nbuf, sizeof nbuf, "%d", CHAIN_MAX);
    const char *vals[2] = {ml->sid, nbuf};
    mh_db_exec(hub->db, &st_chain, vals, NULL, NULL, chain_cb, ml);
}
