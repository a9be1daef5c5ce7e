/*
 * fsck.c — `musehubd fsck [--repo OWNER/SLUG] [--repair]` (SPEC 6): does
 * the database agree with itself and with the object store?
 *
 * What is checked (docs/operations.md, "Checking: fsck", lists the kinds):
 *  - ref rows: branch heads, tags, commit_refs, snapshot_refs,
 *    object_refs_kept and mpack_refs name rows that exist (heads and
 *    tags: commits of their repository); a commit's parents and snapshot are
 *    in its repository; a snapshot's delta parent exists; every object a
 *    snapshot's delta names is referenced by the repository; every
 *    referenced object has an index row; no ref rows of deleted
 *    repositories. These are SQL anti-joins (sql_checks[]), plus one pass
 *    over the snapshot deltas (msgpack, decoded here).
 *  - locations: every mpack_index row, read as a URI and parsed by the
 *    form it has (uri_forms[]: today mpack v1 byte ranges and mpack v2
 *    frame ranges), names a pack that has an `mpacks` row and is in the
 *    store, and a byte range inside that pack. (objects.storage_uri is a
 *    view of these rows since sql/0040: checking it too would report
 *    every bad row twice.) A new kind of index row is one new expression in
 *    INDEX_ROW_URI and, for a new URI shape, one row in uri_forms[].
 *  - packs: every `mpacks` row is in the store with its size; (whole
 *    server) every pack in the store has a row, and every row is
 *    referenced (mpack_refs, mpack_index, fetch_packs) unless it
 *    is younger than MUSEHUB_MPACK_GRACE_SECONDS.
 *  - staged uploads (whole server, or the repository's grants): every key
 *    under incoming/ belongs to a live push grant (not consumed, not
 *    expired), or stopped belonging to one less than the grace period ago.
 *
 * Consistency with a running server: the database is read in ONE
 * REPEATABLE READ snapshot (a second session imports it for the lookups
 * made while the first streams rows), and the store is listed after the
 * snapshot was taken. So a push that commits meanwhile shows up, at
 * worst, as a young pack without a row (left alone: within the grace
 * period), and a pack the sweep deletes meanwhile was superseded and
 * unreferenced in the snapshot (not counted as missing).
 *
 * Repair (--repair) removes only what is garbage by construction: staged
 * uploads without a live grant and packs nothing references, both past
 * the grace period, each re-checked under the pack's advisory lock (the
 * lock GC, the index job, push and the sweep take) before the store
 * delete, with the row deleted in the same transaction (the sweep's
 * protocol, src/jobs/sweep.c). Nothing else is ever changed.
 */
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "admin_internal.h"
#include "mh/codec.h"
#include "mh/db.h"
#include "mh/jobs.h"
#include "mh/refwrite.h"
#include "mh/store.h"

#define EXAMPLES 20         /* lines printed per kind */
#define MAX_FINDINGS 100000 /* per kind; more are counted, not kept */
#define BATCH 4096          /* object ids per lookup of the snapshot pass */

/* ------------------------------------------------------------- findings */

typedef enum {
    K_SCHEMA,
    K_BRANCH_HEAD,
    K_TAG_COMMIT,
    K_COMMIT_REF,
    K_COMMIT_PARENT,
    K_COMMIT_SNAPSHOT,
    K_SNAPSHOT_REF,
    K_SNAPSHOT_PARENT,
    K_SNAPSHOT_OBJECT,
    K_OBJECT_REF,
    K_REF_ORPHAN,
    K_LOCATION,
    K_PACK_REF,
    K_PACK_MISSING,
    K_PACK_SIZE,
    K_PACK_ORPHAN,
    K_PACK_UNREFERENCED,
    K_UPLOAD_ORPHAN,
    NKINDS
} kind_t;

static const struct {
    const char *name;
    const char *what;
    bool repairable;
} kinds[NKINDS] = {
    [K_SCHEMA] = {"schema", "the database schema is not the one this binary expects", false},
    [K_BRANCH_HEAD] = {"branch-head", "a branch head is not a commit of its repository", false},
    [K_TAG_COMMIT] = {"tag-commit", "a tag does not name a commit of its repository", false},
    [K_COMMIT_REF] = {"commit-ref", "a commit_refs row names a commit that does not exist", false},
    [K_COMMIT_PARENT] = {"commit-parent", "a commit's parent is not in its repository", false},
    [K_COMMIT_SNAPSHOT] = {"commit-snapshot", "a commit's snapshot is not in its repository", false},
    [K_SNAPSHOT_REF] = {"snapshot-ref", "a snapshot_refs row names a snapshot that does not exist", false},
    [K_SNAPSHOT_PARENT] = {"snapshot-parent", "a snapshot's delta parent does not exist", false},
    [K_SNAPSHOT_OBJECT] = {"snapshot-object", "a snapshot's delta names an object its repository does not reference",
                           false},
    [K_OBJECT_REF] = {"object-ref", "an object_refs_kept row names an object that does not exist", false},
    [K_REF_ORPHAN] = {"ref-orphan", "ref rows of a repository that does not exist", false},
    [K_LOCATION] = {"location", "an mpack_index row (the objects view's storage_uri) does not point at its bytes",
                    false},
    [K_PACK_REF] = {"pack-ref", "an mpack_refs row names a pack without an mpacks row", false},
    [K_PACK_MISSING] = {"pack-missing", "a pack has an mpacks row but is not in the store", false},
    [K_PACK_SIZE] = {"pack-size", "a pack's size in the store differs from its mpacks row", false},
    [K_PACK_ORPHAN] = {"pack-orphan", "a pack in the store has no mpacks row and nothing points at it", true},
    [K_PACK_UNREFERENCED] = {"pack-unreferenced", "a pack nothing references any more, past the grace period", true},
    [K_UPLOAD_ORPHAN] = {"upload-orphan", "a staged upload has no live push grant, past the grace period", true},
};

typedef struct finding {
    struct finding *next;
    char *text;
    char key[80]; /* the store key a repair deletes */
} finding_t;

typedef struct {
    finding_t *head, *tail;
    size_t n, kept, repaired;
} bucket_t;

/* One pack, from the database, the store, or both. */
typedef struct {
    char id[MH_ID_SIZE];
    bool row, in_store, superseded, referenced, in_scope;
    int64_t row_size, age;   /* age: seconds since created (or superseded) */
    uint64_t store_size;
    int64_t mtime;
    uint64_t locations;      /* locations pointing here */
} pack_t;

typedef struct {
    const mh_config_t *cfg;
    const mh_fsck_opts_t *o;
    FILE *out;
    PGconn *db, *db2;
    char repo_id[MH_ID_SIZE + 8];
    bool scoped;
    int64_t now;
    bucket_t found[NKINDS];
    pack_t *packs;
    size_t npacks, cappacks;
    mh__store_list_t uploads;
    uint64_t n_locations, n_snapshots, waiting_packs, waiting_uploads, kept_packs;
    bool incomplete;
    mh_arena_t a;
    /* repair */
    uv_loop_t loop;
    bool loop_open;
    mh_store_t *store;
} fsck_t;

static bool list_store(fsck_t *f, const char *prefix, mh__store_list_t *out);

static void add(fsck_t *f, kind_t k, const char *key, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void add(fsck_t *f, kind_t k, const char *key, const char *fmt, ...)
{
    bucket_t *b = &f->found[k];
    b->n++;
    if (b->kept >= MAX_FINDINGS) return;
    finding_t *x = mh_calloc(&f->a, sizeof *x);
    va_list ap;
    va_start(ap, fmt);
    char line[1024];
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (!x || !(x->text = mh_strdup(&f->a, line))) return;
    if (key) snprintf(x->key, sizeof x->key, "%s", key);
    if (b->tail) b->tail->next = x;
    else b->head = x;
    b->tail = x;
    b->kept++;
}

/* ------------------------------------------------------------ database */

PGconn *mh__admin_connect(const mh_config_t *cfg, const char *what)
{
    if (!cfg->database_url) {
        fprintf(stderr, "musehubd %s: MUSEHUB_DATABASE_URL (or --database-url) is required\n", what);
        return NULL;
    }
    const char *keys[] = {"dbname", "application_name", NULL};
    const char *vals[] = {cfg->database_url, "musehubd-admin", NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(c) != CONNECTION_OK) {
        const char *m = PQerrorMessage(c);
        size_t n = strlen(m);
        while (n && m[n - 1] == '\n') n--;
        fprintf(stderr, "musehubd %s: cannot connect to the database: %.*s\n", what, (int)n, m);
        PQfinish(c);
        return NULL;
    }
    return c;
}

/* Runs a statement; NULL (message printed, check marked incomplete) on
 * failure. */
static PGresult *q(fsck_t *f, PGconn *c, const char *sql, int n, const char *const *vals)
{
    PGresult *r = PQexecParams(c, sql, n, NULL, vals, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) return r;
    const char *m = PQresultErrorMessage(r);
    size_t len = strlen(m);
    while (len && m[len - 1] == '\n') len--;
    fprintf(stderr, "musehubd fsck: %.*s\n", (int)len, m);
    PQclear(r);
    f->incomplete = true;
    return NULL;
}

static bool exec_ok(fsck_t *f, PGconn *c, const char *sql)
{
    PGresult *r = q(f, c, sql, 0, NULL);
    PQclear(r);
    return r != NULL;
}

/* The repository scope ($1 of every check): NULL or the repo id. */
static const char *scope(fsck_t *f) { return f->scoped ? f->repo_id : NULL; }

/* --------------------------------------------------------- schema check */

static bool check_schema(fsck_t *f)
{
    PGresult *r = q(f, f->db, "SELECT name FROM schema_migrations", 0, NULL);
    if (!r) {
        f->incomplete = false; /* reported as a finding instead */
        add(f, K_SCHEMA, NULL, "no schema_migrations table: not a musehubd database, or never migrated");
        return false;
    }
    size_t missing = 0;
    for (size_t i = 0; i < mh_migrations_count; i++) {
        bool have = false;
        for (int k = 0; k < PQntuples(r) && !have; k++) have = !strcmp(PQgetvalue(r, k, 0), mh_migrations[i].name);
        if (!have) {
            add(f, K_SCHEMA, NULL, "migration %s is not applied: run `musehubd migrate`", mh_migrations[i].name);
            missing++;
        }
    }
    for (int k = 0; k < PQntuples(r); k++) {
        bool known = false;
        for (size_t i = 0; i < mh_migrations_count && !known; i++) known = !strcmp(PQgetvalue(r, k, 0), mh_migrations[i].name);
        if (!known)
            fprintf(f->out, "note: migration %s is applied but unknown to this binary (a newer musehubd?)\n",
                    PQgetvalue(r, k, 0));
    }
    PQclear(r);
    return missing == 0;
}

/* ------------------------------------------------------------ SQL checks */

#define REPO_NAME "coalesce(r.owner || '/' || r.slug, '(repository ' || x.repo_id || ')')"

/* Each query returns (repository, subject, detail) rows; $1 is the
 * repository id or NULL for all. */
static const struct {
    kind_t kind;
    const char *sql;
} sql_checks[] = {
    {K_BRANCH_HEAD,
     "SELECT " REPO_NAME ", 'branch ' || x.name, x.head_commit_id ||"
     " CASE WHEN NOT EXISTS (SELECT 1 FROM commits c WHERE c.commit_id = x.head_commit_id)"
     " THEN ': no such commit' ELSE ': not a commit of the repository' END"
     " FROM branches x LEFT JOIN repos r ON r.repo_id = x.repo_id"
     " WHERE ($1::text IS NULL OR x.repo_id = $1) AND NOT EXISTS (SELECT 1 FROM commit_refs cr"
     "  JOIN commits c ON c.commit_id = cr.commit_id WHERE cr.repo_id = x.repo_id AND cr.commit_id = x.head_commit_id)"},
    {K_TAG_COMMIT,
     "SELECT " REPO_NAME ", 'tag ' || x.name, x.commit_id ||"
     " CASE WHEN NOT EXISTS (SELECT 1 FROM commits c WHERE c.commit_id = x.commit_id)"
     " THEN ': no such commit' ELSE ': not a commit of the repository' END"
     " FROM tags x LEFT JOIN repos r ON r.repo_id = x.repo_id"
     " WHERE ($1::text IS NULL OR x.repo_id = $1) AND NOT EXISTS (SELECT 1 FROM commit_refs cr"
     "  JOIN commits c ON c.commit_id = cr.commit_id WHERE cr.repo_id = x.repo_id AND cr.commit_id = x.commit_id)"},
    {K_COMMIT_REF,
     "SELECT " REPO_NAME ", 'commit ' || x.commit_id, 'no commits row'"
     " FROM commit_refs x LEFT JOIN repos r ON r.repo_id = x.repo_id"
     " WHERE ($1::text IS NULL OR x.repo_id = $1)"
     " AND NOT EXISTS (SELECT 1 FROM commits c WHERE c.commit_id = x.commit_id)"},
    {K_COMMIT_PARENT,
     "SELECT " REPO_NAME ", 'commit ' || c.commit_id, 'parent ' || p.id || ' is not in the repository'"
     " FROM commit_refs x JOIN commits c ON c.commit_id = x.commit_id LEFT JOIN repos r ON r.repo_id = x.repo_id"
     " CROSS JOIN LATERAL (VALUES (c.parent_commit_id), (c.parent2_commit_id)) AS p(id)"
     " WHERE ($1::text IS NULL OR x.repo_id = $1) AND p.id IS NOT NULL"
     " AND NOT EXISTS (SELECT 1 FROM commit_refs y WHERE y.repo_id = x.repo_id AND y.commit_id = p.id)"},
    {K_COMMIT_SNAPSHOT,
     "SELECT " REPO_NAME ", 'commit ' || c.commit_id, 'snapshot ' || c.snapshot_id ||"
     " CASE WHEN NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.snapshot_id = c.snapshot_id)"
     " THEN ' does not exist' ELSE ' is not in the repository' END"
     " FROM commit_refs x JOIN commits c ON c.commit_id = x.commit_id LEFT JOIN repos r ON r.repo_id = x.repo_id"
     " WHERE ($1::text IS NULL OR x.repo_id = $1) AND NOT EXISTS (SELECT 1 FROM snapshot_refs y"
     "  JOIN snapshots s ON s.snapshot_id = y.snapshot_id WHERE y.repo_id = x.repo_id AND y.snapshot_id = c.snapshot_id)"},
    {K_SNAPSHOT_REF,
     "SELECT " REPO_NAME ", 'snapshot ' || x.snapshot_id, 'no snapshots row'"
     " FROM snapshot_refs x LEFT JOIN repos r ON r.repo_id = x.repo_id"
     " WHERE ($1::text IS NULL OR x.repo_id = $1)"
     " AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.snapshot_id = x.snapshot_id)"},
    {K_SNAPSHOT_PARENT,
     "SELECT " REPO_NAME ", 'snapshot ' || s.snapshot_id, 'delta parent ' || s.parent_snapshot_id || ' does not exist'"
     " FROM snapshot_refs x JOIN snapshots s ON s.snapshot_id = x.snapshot_id LEFT JOIN repos r ON r.repo_id = x.repo_id"
     " WHERE ($1::text IS NULL OR x.repo_id = $1) AND s.parent_snapshot_id IS NOT NULL"
     " AND NOT EXISTS (SELECT 1 FROM snapshots p WHERE p.snapshot_id = s.parent_snapshot_id)"},
    {K_OBJECT_REF,
     "SELECT " REPO_NAME ", 'object ' || x.object_id, 'no objects row'"
     " FROM object_refs_kept x LEFT JOIN repos r ON r.repo_id = x.repo_id"
     " WHERE ($1::text IS NULL OR x.repo_id = $1)"
     " AND NOT EXISTS (SELECT 1 FROM objects o WHERE o.object_id = x.object_id)"},
    {K_PACK_REF,
     "SELECT " REPO_NAME ", 'pack ' || x.mpack_id, 'no mpacks row'"
     " FROM mpack_refs x LEFT JOIN repos r ON r.repo_id = x.repo_id"
     " WHERE ($1::text IS NULL OR x.repo_id = $1)"
     " AND NOT EXISTS (SELECT 1 FROM mpacks m WHERE m.mpack_id = x.mpack_id)"},
    {K_REF_ORPHAN,
     "SELECT '(repository ' || x.repo_id || ')', x.t, x.n || ' rows left behind'"
     " FROM (SELECT 'commit_refs' t, repo_id, count(*) n FROM commit_refs GROUP BY repo_id"
     "  UNION ALL SELECT 'snapshot_refs', repo_id, count(*) FROM snapshot_refs GROUP BY repo_id"
     "  UNION ALL SELECT 'object_refs_kept', repo_id, count(*) FROM object_refs_kept GROUP BY repo_id"
     "  UNION ALL SELECT 'mpack_refs', repo_id, count(*) FROM mpack_refs GROUP BY repo_id) x"
     " WHERE $1::text IS NULL AND NOT EXISTS (SELECT 1 FROM repos r WHERE r.repo_id = x.repo_id)"},
};

static void run_sql_checks(fsck_t *f)
{
    const char *v[1] = {scope(f)};
    for (size_t i = 0; i < sizeof sql_checks / sizeof sql_checks[0]; i++) {
        PGresult *r = q(f, f->db, sql_checks[i].sql, 1, v);
        if (!r) continue;
        for (int k = 0; k < PQntuples(r); k++)
            add(f, sql_checks[i].kind, NULL, "%s: %s: %s", PQgetvalue(r, k, 0), PQgetvalue(r, k, 1),
                PQgetvalue(r, k, 2));
        PQclear(r);
    }
}

/* ---------------------------------------------- objects named by deltas */

typedef struct {
    char repo[MH_ID_SIZE + 8];
    char name[256];                    /* owner/slug */
    char (*obj)[MH_ID_SIZE], (*snap)[MH_ID_SIZE];
    size_t n;
    mh_buf_t arr;                      /* the text[] literal */
} batch_t;

/* Asks which of the batch's objects the repository does not reference. */
static void batch_flush(fsck_t *f, batch_t *b)
{
    if (!b->n) return;
    b->arr.len = 0;
    int rc = mh_buf_append_byte(&b->arr, '{');
    for (size_t i = 0; i < b->n && !rc; i++) {
        if (i) rc = mh_buf_append_byte(&b->arr, ',');
        rc = rc ? rc : mh_buf_append_str(&b->arr, b->obj[i]);
    }
    rc = rc ? rc : mh_buf_append(&b->arr, "}", 2);
    if (rc) {
        f->incomplete = true;
        b->n = 0;
        return;
    }
    const char *v[2] = {b->repo, (const char *)b->arr.p};
    PGresult *r = q(f, f->db2,
                    "SELECT u.i FROM unnest($2::text[]) WITH ORDINALITY AS u(x, i)"
                    " WHERE NOT " MH_SQL_HOLDS_BLOB("$1", "u.x"),
                    2, v);
    if (r) {
        for (int k = 0; k < PQntuples(r); k++) {
            long i = strtol(PQgetvalue(r, k, 0), NULL, 10) - 1;
            if (i >= 0 && (size_t)i < b->n)
                add(f, K_SNAPSHOT_OBJECT, NULL, "%s: snapshot %s: object %s is not referenced by the repository",
                    b->name, b->snap[i], b->obj[i]);
        }
        PQclear(r);
    }
    b->n = 0;
}

/* Streams the scope's snapshots (single-row mode) and checks every
 * object their delta_upsert names. */
static void check_snapshot_objects(fsck_t *f)
{
    batch_t b;
    memset(&b, 0, sizeof b);
    b.obj = malloc(BATCH * sizeof *b.obj);
    b.snap = malloc(BATCH * sizeof *b.snap);
    if (!b.obj || !b.snap) {
        f->incomplete = true;
        free(b.obj);
        free(b.snap);
        return;
    }
    const char *v[1] = {scope(f)};
    int ok = PQsendQueryParams(f->db,
                               "SELECT x.repo_id, coalesce(r.owner || '/' || r.slug, x.repo_id), s.snapshot_id,"
                               " s.delta_upsert FROM snapshot_refs x JOIN snapshots s ON s.snapshot_id = x.snapshot_id"
                               " LEFT JOIN repos r ON r.repo_id = x.repo_id"
                               " WHERE $1::text IS NULL OR x.repo_id = $1 ORDER BY x.repo_id",
                               1, NULL, v, NULL, NULL, 1);
    if (!ok || !PQsetSingleRowMode(f->db)) {
        fprintf(stderr, "musehubd fsck: %s", PQerrorMessage(f->db));
        f->incomplete = true;
    }
    PGresult *r;
    mh_arena_t a;
    mh_arena_init(&a, 0);
    while (ok && (r = PQgetResult(f->db))) {
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_SINGLE_TUPLE) {
            f->n_snapshots++;
            const char *repo = PQgetvalue(r, 0, 0);
            if (strcmp(repo, b.repo) != 0) {
                batch_flush(f, &b);
                snprintf(b.repo, sizeof b.repo, "%.*s", PQgetlength(r, 0, 0), repo);
                snprintf(b.name, sizeof b.name, "%.*s", PQgetlength(r, 0, 1), PQgetvalue(r, 0, 1));
            }
            char snap[MH_ID_SIZE];
            snprintf(snap, sizeof snap, "%.*s", PQgetlength(r, 0, 2), PQgetvalue(r, 0, 2));
            mh_val_t m;
            const char *why = NULL;
            mh_arena_release(&a);
            int rc = mh_msgpack_decode(&a, (const uint8_t *)PQgetvalue(r, 0, 3), (size_t)PQgetlength(r, 0, 3), NULL,
                                       &m, &why);
            if (rc || m.t != MH_V_MAP) {
                add(f, K_SNAPSHOT_OBJECT, NULL, "%s: snapshot %s: delta_upsert is not a msgpack map (%s)", b.name,
                    snap, why ? why : "not a map");
            } else {
                for (uint32_t i = 0; i < m.v.m.n; i++) {
                    const mh_val_t *id = &m.v.m.kv[i].v;
                    if (id->t != MH_V_STR || !mh_id_valid(id->v.s.p, id->v.s.n)) {
                        add(f, K_SNAPSHOT_OBJECT, NULL, "%s: snapshot %s: delta_upsert holds a value that is not an id",
                            b.name, snap);
                        continue;
                    }
                    memcpy(b.obj[b.n], id->v.s.p, MH_ID_LEN);
                    b.obj[b.n][MH_ID_LEN] = 0;
                    memcpy(b.snap[b.n], snap, MH_ID_SIZE);
                    if (++b.n == BATCH) batch_flush(f, &b);
                }
            }
        } else if (st != PGRES_TUPLES_OK) {
            fprintf(stderr, "musehubd fsck: reading snapshots: %s", PQresultErrorMessage(r));
            f->incomplete = true;
        }
        PQclear(r);
    }
    batch_flush(f, &b);
    mh_arena_release(&a);
    mh_buf_free(&b.arr);
    free(b.obj);
    free(b.snap);
}

/* --------------------------------------------------------------- packs */

/* What names a pack `m` (SQL): a repository, an index row, a fetch answer. */
#define PACK_HAS_REFS "EXISTS (SELECT 1 FROM mpack_refs x WHERE x.mpack_id = m.mpack_id)"
#define PACK_HAS_INDEX "EXISTS (SELECT 1 FROM mpack_index i WHERE i.mpack_id = m.mpack_id)"
#define PACK_IN_FETCH "m.mpack_id IN (SELECT fp.mpack_id FROM fetch_packs fp WHERE fp.mpack_id IS NOT NULL)"

static int cmp_pack(const void *a, const void *b)
{
    return strcmp(((const pack_t *)a)->id, ((const pack_t *)b)->id);
}

static pack_t *find_pack(fsck_t *f, const char *id)
{
    pack_t k;
    if (!f->npacks) return NULL;
    snprintf(k.id, sizeof k.id, "%s", id);
    return bsearch(&k, f->packs, f->npacks, sizeof *f->packs, cmp_pack);
}

static pack_t *new_pack(fsck_t *f, const char *id)
{
    pack_t *v = mh_vec_grow(f->packs, &f->cappacks, f->npacks + 1, sizeof *v, 256);
    if (!v) return NULL;
    f->packs = v;
    pack_t *p = &f->packs[f->npacks++];
    memset(p, 0, sizeof *p);
    snprintf(p->id, sizeof p->id, "%s", id);
    return p;
}

/* Every mpacks row, then every pack in the store (listed after the
 * database snapshot was taken), in one array sorted by id. */
static void load_packs(fsck_t *f)
{
    PGresult *r = q(f, f->db,
                    "SELECT m.mpack_id, m.size_bytes, m.superseded_at IS NOT NULL,"
                    " floor(extract(epoch FROM now() - coalesce(m.superseded_at, m.created_at)))::bigint,"
                    " " PACK_HAS_REFS " OR " PACK_HAS_INDEX " OR " PACK_IN_FETCH " FROM mpacks m",
                    0, NULL);
    if (!r) return;
    for (int k = 0; k < PQntuples(r); k++) {
        pack_t *p = new_pack(f, PQgetvalue(r, k, 0));
        if (!p) {
            f->incomplete = true;
            break;
        }
        p->row = true;
        p->row_size = strtoll(PQgetvalue(r, k, 1), NULL, 10);
        p->superseded = PQgetvalue(r, k, 2)[0] == 't';
        p->age = strtoll(PQgetvalue(r, k, 3), NULL, 10);
        p->referenced = PQgetvalue(r, k, 4)[0] == 't';
    }
    PQclear(r);
    if (f->npacks) qsort(f->packs, f->npacks, sizeof *f->packs, cmp_pack);
    size_t nrows = f->npacks;

    mh__store_list_t l = {0};
    if (!list_store(f, "mpacks/", &l)) return;
    for (size_t i = 0; i < l.n; i++) {
        char id[MH_ID_SIZE];
        snprintf(id, sizeof id, "sha256:%s", l.v[i].key + 7);
        pack_t k;
        memcpy(k.id, id, sizeof k.id);
        pack_t *p = nrows ? bsearch(&k, f->packs, nrows, sizeof *f->packs, cmp_pack) : NULL;
        if (!p && !(p = new_pack(f, id))) {
            f->incomplete = true;
            break;
        }
        p->in_store = true;
        p->store_size = l.v[i].size;
        p->mtime = l.v[i].mtime;
    }
    mh__store_list_free(&l);
    if (f->npacks) qsort(f->packs, f->npacks, sizeof *f->packs, cmp_pack);
}

/* ----------------------------------------------------------- locations */

typedef mh__location_t loc_t;

static bool num(const char **p, char stop, uint64_t *out)
{
    const char *s = *p;
    uint64_t v = 0;
    if (*s < '0' || *s > '9') return false;
    while (*s >= '0' && *s <= '9') {
        if (v > (UINT64_MAX - 9) / 10) return false;
        v = v * 10 + (uint64_t)(*s++ - '0');
    }
    if (*s != stop) return false;
    *p = stop ? s + 1 : s;
    *out = v;
    return true;
}

/* "<off>:<len>" (SPEC 2: the blob's bytes in the file). */
static bool form_v1(const char *p, loc_t *l)
{
    if (!num(&p, ':', &l->file_off) || !num(&p, 0, &l->file_len)) return false;
    l->blob_len = l->file_len;
    return true;
}

/* "<frame off>:<frame len>/<off>:<len>" (SPEC 2.1: the frame's data in
 * the file, then the blob inside the decompressed frame). */
static bool form_v2(const char *p, loc_t *l)
{
    uint64_t off;
    if (!num(&p, ':', &l->file_off) || !num(&p, '/', &l->file_len) || !num(&p, ':', &off) ||
        !num(&p, 0, &l->blob_len))
        return false;
    return off <= UINT64_MAX - l->blob_len;
}

/* The URI forms a location may have, after "mpack://<id>#". A new form
 * is one row; the first that parses wins. */
static const struct {
    const char *name;
    bool (*parse)(const char *rest, loc_t *l);
} uri_forms[] = {
    {"mpack v1 byte range", form_v1},
    {"mpack v2 frame range", form_v2},
};

bool mh__fsck_parse_location(const char *uri, loc_t *l)
{
    if (strncmp(uri, "mpack://", 8) != 0 || strlen(uri) < 8 + MH_ID_LEN + 1 || uri[8 + MH_ID_LEN] != '#' ||
        !mh_id_valid(uri + 8, MH_ID_LEN))
        return false;
    memcpy(l->pack, uri + 8, MH_ID_LEN);
    l->pack[MH_ID_LEN] = 0;
    for (size_t i = 0; i < sizeof uri_forms / sizeof uri_forms[0]; i++)
        if (uri_forms[i].parse(uri + 8 + MH_ID_LEN + 1, l)) return true;
    return false;
}

/* How an mpack_index row reads as a location: v1 rows are byte ranges;
 * v2 rows (frame_no set, sql/0030) with their frame f are
 * mpack://<id>#<foff>:<flen>/<off>:<len> (NULL, hence reported, when the
 * frame has no mpack_frames row). */
#define INDEX_ROW_URI                                                                                                  \
    "'mpack://' || i.mpack_id || '#' || CASE WHEN i.frame_no IS NULL THEN i.byte_offset || ':' || i.byte_length"      \
    " ELSE f.data_offset || ':' || f.data_length || '/' || i.byte_offset || ':' || i.byte_length END"

/* One index row's location: it parses, names a pack with an mpacks row,
 * and its byte range lies inside that pack. (Its length is the row's
 * byte_length, the object's size_bytes in the objects view: nothing to
 * compare it with.) */
static void check_location(fsck_t *f, const char *object, const char *uri)
{
    f->n_locations++;
    loc_t l;
    if (!mh__fsck_parse_location(uri, &l)) {
        add(f, K_LOCATION, NULL, "object %s: index row '%.200s' is not an mpack:// location", object, uri);
        return;
    }
    pack_t *p = find_pack(f, l.pack);
    if (p) {
        p->locations++;
        p->in_scope = true;
        p->referenced = true;
    }
    if (!p || !p->row) {
        add(f, K_LOCATION, NULL, "object %s: index row points into pack %s, which has no mpacks row", object, l.pack);
        return;
    }
    uint64_t psize = p->in_store ? p->store_size : (uint64_t)p->row_size;
    if (l.file_off > psize || l.file_len > psize - l.file_off)
        add(f, K_LOCATION, NULL, "object %s: index row bytes %llu+%llu lie outside pack %s (%llu bytes)", object,
            (unsigned long long)l.file_off, (unsigned long long)l.file_len, l.pack, (unsigned long long)psize);
}

/* Streams every index row in scope. */
static void check_locations(fsck_t *f)
{
    static const char sql[] =
        "SELECT i.object_id, coalesce(" INDEX_ROW_URI ", '')"
        " FROM mpack_index i LEFT JOIN mpack_frames f ON f.mpack_id = i.mpack_id AND f.frame_no = i.frame_no"
        " WHERE $1::text IS NULL OR " MH_SQL_HOLDS_BLOB("$1", "i.object_id");
    const char *v[1] = {scope(f)};
    if (!PQsendQueryParams(f->db, sql, 1, NULL, v, NULL, NULL, 0) || !PQsetSingleRowMode(f->db)) {
        fprintf(stderr, "musehubd fsck: %s", PQerrorMessage(f->db));
        f->incomplete = true;
        return;
    }
    PGresult *r;
    while ((r = PQgetResult(f->db))) {
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_SINGLE_TUPLE) {
            check_location(f, PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1));
        } else if (st != PGRES_TUPLES_OK) {
            fprintf(stderr, "musehubd fsck: reading locations: %s", PQresultErrorMessage(r));
            f->incomplete = true;
        }
        PQclear(r);
    }
}

/* Packs no repository references whose index rows only locate objects
 * no repository references (what deleting a repository leaves behind):
 * not a problem and not repaired (objects rows would have to go with
 * them, racing pushes of the same objects); counted for the report. */
static void count_kept_packs(fsck_t *f)
{
    PGresult *r = q(f, f->db,
                    "SELECT count(*) FROM mpacks m WHERE NOT " PACK_HAS_REFS " AND NOT (" PACK_IN_FETCH ")"
                    " AND " PACK_HAS_INDEX " AND NOT EXISTS (SELECT 1 FROM mpack_index i WHERE i.mpack_id = m.mpack_id"
                    "  AND (EXISTS (SELECT 1 FROM mpack_index j JOIN mpack_refs r ON r.mpack_id = j.mpack_id"
                    "  WHERE j.object_id = i.object_id) OR EXISTS (SELECT 1 FROM object_refs_kept k"
                    "  WHERE k.object_id = i.object_id)))",
                    0, NULL);
    if (r) f->kept_packs = strtoull(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
}

static void check_packs(fsck_t *f)
{
    uint32_t grace = f->cfg->mpack_grace_seconds;
    if (!f->scoped) count_kept_packs(f);
    if (f->scoped) {
        /* The repository's own packs are in scope too. */
        const char *v[1] = {f->repo_id};
        PGresult *r = q(f, f->db, "SELECT mpack_id FROM mpack_refs WHERE repo_id = $1", 1, v);
        for (int k = 0; r && k < PQntuples(r); k++) {
            pack_t *p = find_pack(f, PQgetvalue(r, k, 0));
            if (p) p->in_scope = true;
        }
        PQclear(r);
    }
    for (size_t i = 0; i < f->npacks; i++) {
        pack_t *p = &f->packs[i];
        char key[80];
        snprintf(key, sizeof key, "mpacks/%s", p->id + 7);
        if (f->scoped && !p->in_scope) continue;
        /* Superseded and unreferenced past the grace period: the sweep may
         * delete it at any moment, so absence is not a problem. */
        bool sweepable = p->superseded && !p->referenced && p->age > (int64_t)grace;
        if (p->row && !p->in_store && !sweepable)
            add(f, K_PACK_MISSING, NULL, "%s (%s, %llu location(s) point into it)", key,
                p->superseded ? "superseded" : "current", (unsigned long long)p->locations);
        if (p->row && p->in_store && (uint64_t)p->row_size != p->store_size)
            add(f, K_PACK_SIZE, NULL, "%s: %llu bytes in the store, %lld in its mpacks row", key,
                (unsigned long long)p->store_size, (long long)p->row_size);
        if (f->scoped) continue;
        if (!p->row && p->in_store && !p->locations) {
            if (f->now - p->mtime > (int64_t)grace)
                add(f, K_PACK_ORPHAN, key, "%s (%llu bytes, stored %lld s ago)", key,
                    (unsigned long long)p->store_size, (long long)(f->now - p->mtime));
            else f->waiting_packs++;
        }
        if (p->row && !p->referenced) {
            if (p->age > (int64_t)grace)
                add(f, K_PACK_UNREFERENCED, key, "%s (%s %lld s ago, %s)", key,
                    p->superseded ? "superseded" : "created", (long long)p->age,
                    p->in_store ? "in the store" : "already gone from the store");
            else f->waiting_packs++;
        }
    }
}

/* ------------------------------------------------------- staged uploads */

static int cmp_obj(const void *a, const void *b)
{
    return strcmp(((const mh__store_obj_t *)a)->key, ((const mh__store_obj_t *)b)->key);
}

static void check_uploads(fsck_t *f)
{
    if (!list_store(f, "incoming/", &f->uploads)) return;
    if (!f->uploads.n) return;
    mh_buf_t arr = {0};
    int rc = mh_buf_append_byte(&arr, '{');
    for (size_t i = 0; i < f->uploads.n && !rc; i++) {
        if (i) rc = mh_buf_append_byte(&arr, ',');
        rc = rc ? rc : mh_buf_append_str(&arr, f->uploads.v[i].key);
    }
    rc = rc ? rc : mh_buf_append(&arr, "}", 2);
    if (rc) {
        mh_buf_free(&arr);
        f->incomplete = true;
        return;
    }
    /* Per key: does a grant exist, is it live, since when is it not. */
    const char *v[1] = {(const char *)arr.p};
    PGresult *r = q(f, f->db,
                    "SELECT k.key, g.grant_id IS NOT NULL, g.repo_id, g.consumed_at IS NULL AND g.expires_at > now(),"
                    " floor(extract(epoch FROM now() - coalesce(g.consumed_at, g.expires_at)))::bigint,"
                    " g.consumed_at IS NOT NULL"
                    " FROM unnest($1::text[]) AS k(key) LEFT JOIN push_grants g ON g.staging_key = k.key",
                    1, v);
    mh_buf_free(&arr);
    if (!r) return;
    uint32_t grace = f->cfg->mpack_grace_seconds;
    for (int k = 0; k < PQntuples(r); k++) {
        const char *key = PQgetvalue(r, k, 0);
        bool has = PQgetvalue(r, k, 1)[0] == 't';
        if (f->scoped && (!has || strcmp(PQgetvalue(r, k, 2), f->repo_id) != 0)) continue;
        if (has && PQgetvalue(r, k, 3)[0] == 't') continue; /* live */
        mh__store_obj_t kk, *o;
        snprintf(kk.key, sizeof kk.key, "%s", key);
        o = bsearch(&kk, f->uploads.v, f->uploads.n, sizeof kk, cmp_obj);
        int64_t since = has ? strtoll(PQgetvalue(r, k, 4), NULL, 10) : (o ? f->now - o->mtime : 0);
        if (since <= (int64_t)grace) {
            f->waiting_uploads++;
            continue;
        }
        const char *why = !has ? "no push grant" : PQgetvalue(r, k, 5)[0] == 't' ? "its grant was consumed"
                                                                                  : "its grant expired";
        add(f, K_UPLOAD_ORPHAN, key, "%s: %s %lld s ago (%llu bytes)", key, why, (long long)since,
            o ? (unsigned long long)o->size : 0ULL);
    }
    PQclear(r);
}

/* -------------------------------------------------------------- repair */

typedef struct {
    bool done;
    int err;
} wait_t;

static void deleted_cb(void *ud, int err)
{
    wait_t *w = ud;
    w->err = err;
    w->done = true;
}

/* The store, opened on the command's private loop at first use (listing,
 * repair). */
static int open_store(fsck_t *f)
{
    if (f->store) return 0;
    if (!f->loop_open) {
        if (uv_loop_init(&f->loop)) return MH_ENOMEM;
        f->loop_open = true;
    }
    mh_store_config_t sc = {
        .spec = f->cfg->store,
        .public_url = NULL,
        .signing_secret = f->cfg->signing_secret,
        .s3_endpoint = f->cfg->s3_endpoint,
        .s3_region = f->cfg->s3_region,
        .s3_access_key = f->cfg->s3_access_key,
        .s3_secret_key = f->cfg->s3_secret_key,
        .s3_path_style = f->cfg->s3_path_style,
    };
    return mh_store_open(&f->loop, &sc, &f->store);
}

/* Every key under prefix, sorted; false (and the check incomplete) when
 * the store could not be listed. */
static bool list_store(fsck_t *f, const char *prefix, mh__store_list_t *out)
{
    int rc = open_store(f);
    if (rc) {
        fprintf(stderr, "musehubd fsck: opening the store %s: %s\n", f->cfg->store, mh_strerror(rc));
    } else if (mh__store_list(f->store, &f->loop, prefix, out) == 0) {
        return true;
    }
    f->incomplete = true;
    return false;
}

static int store_delete(fsck_t *f, const char *key)
{
    int rc = open_store(f);
    if (rc) return rc;
    wait_t w = {false, 0};
    mh_store_delete(f->store, key, deleted_cb, &w);
    while (!w.done) uv_run(&f->loop, UV_RUN_ONCE);
    return w.err;
}

/* One repairable finding, in its own transaction under the pack's lock
 * (packs) or after re-checking the grant (uploads). True when removed. */
static bool repair_one(fsck_t *f, kind_t k, const char *key)
{
    char grace[16];
    snprintf(grace, sizeof grace, "%u", f->cfg->mpack_grace_seconds);
    if (k == K_UPLOAD_ORPHAN) {
        const char *v[1] = {key};
        PGresult *r = q(f, f->db,
                        "SELECT 1 FROM push_grants WHERE staging_key = $1 AND consumed_at IS NULL AND expires_at > now()",
                        1, v);
        bool live = !r || PQntuples(r) > 0;
        PQclear(r);
        return !live && store_delete(f, key) == 0;
    }
    char id[MH_ID_SIZE];
    snprintf(id, sizeof id, "sha256:%s", key + 7);
    const char *v[2] = {id, grace};
    if (!exec_ok(f, f->db, "BEGIN")) return false;
    PGresult *r = q(f, f->db, "SELECT " MH_SQL_LOCK_MPACK("$1::text"), 1, v);
    PQclear(r);
    bool gone = false;
    if (r) {
        /* Re-checked under the lock: still nothing points at it. */
        static const char unref[] =
            " NOT EXISTS (SELECT 1 FROM mpack_refs x WHERE x.mpack_id = $1)"
            " AND NOT EXISTS (SELECT 1 FROM mpack_index i WHERE i.mpack_id = $1)"
            " AND NOT EXISTS (SELECT 1 FROM fetch_packs fp WHERE fp.mpack_id = $1)";
        /* objects.storage_uri names a pack only through an mpack_index
         * row of it (objects is a view over them, sql/0040). */
        char sql[1024];
        if (k == K_PACK_ORPHAN)
            snprintf(sql, sizeof sql,
                     "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM mpacks m WHERE m.mpack_id = $1) AND $2::int >= 0 AND%s",
                     unref);
        else
            snprintf(sql, sizeof sql,
                     "WITH d AS (DELETE FROM mpacks m WHERE m.mpack_id = $1"
                     " AND coalesce(m.superseded_at, m.created_at) < now() - make_interval(secs => $2::int) AND%s"
                     " RETURNING m.mpack_id), fr AS (DELETE FROM mpack_frames x USING d WHERE x.mpack_id = d.mpack_id)"
                     " SELECT 1 FROM d",
                     unref);
        r = q(f, f->db, sql, 2, v);
        if (r && PQntuples(r) == 1) gone = store_delete(f, key) == 0;
        PQclear(r);
    }
    exec_ok(f, f->db, gone ? "COMMIT" : "ROLLBACK");
    return gone;
}

static void repair(fsck_t *f)
{
    for (int k = 0; k < NKINDS; k++) {
        if (!kinds[k].repairable) continue;
        for (finding_t *x = f->found[k].head; x; x = x->next) {
            if (!x->key[0]) continue;
            if (repair_one(f, (kind_t)k, x->key)) {
                f->found[k].repaired++;
                fprintf(f->out, "repaired: deleted %s\n", x->key);
            } else {
                fprintf(f->out, "not repaired: %s (changed meanwhile, or the delete failed)\n", x->key);
            }
        }
    }
}

/* -------------------------------------------------------------- report */

static void count_line(fsck_t *f, const char *what, const char *sql)
{
    const char *v[1] = {scope(f)};
    PGresult *r = q(f, f->db, sql, 1, v);
    if (r) fprintf(f->out, " %s %s,", PQgetvalue(r, 0, 0), what);
    PQclear(r);
}

static void summary_counts(fsck_t *f)
{
    fprintf(f->out, "checked:");
    count_line(f, "repositories", "SELECT count(*) FROM repos WHERE $1::text IS NULL OR repo_id = $1");
    count_line(f, "branches", "SELECT count(*) FROM branches WHERE $1::text IS NULL OR repo_id = $1");
    count_line(f, "commit refs", "SELECT count(*) FROM commit_refs WHERE $1::text IS NULL OR repo_id = $1");
    count_line(f, "object refs", "SELECT count(*) FROM object_refs WHERE $1::text IS NULL OR repo_id = $1");
    size_t rows = 0, stored = 0;
    for (size_t i = 0; i < f->npacks; i++) {
        if (f->scoped && !f->packs[i].in_scope) continue;
        rows += f->packs[i].row;
        stored += f->packs[i].in_store;
    }
    fprintf(f->out, " %llu snapshots, %llu object locations, %zu pack rows, %zu packs in the store, %zu staged uploads\n",
            (unsigned long long)f->n_snapshots, (unsigned long long)f->n_locations, rows, stored, f->uploads.n);
}

static int report(fsck_t *f)
{
    size_t problems = 0, repairable = 0, repaired = 0;
    for (int k = 0; k < NKINDS; k++) {
        bucket_t *b = &f->found[k];
        if (!b->n) continue;
        problems += b->n;
        if (kinds[k].repairable) repairable += b->n;
        repaired += b->repaired;
        fprintf(f->out, "\n%s: %zu%s — %s\n", kinds[k].name, b->n, kinds[k].repairable ? " (repairable)" : "",
                kinds[k].what);
        size_t shown = 0;
        for (finding_t *x = b->head; x && shown < EXAMPLES; x = x->next, shown++) fprintf(f->out, "  %s\n", x->text);
        if (b->n > shown) fprintf(f->out, "  ... and %zu more\n", b->n - shown);
    }
    if (f->waiting_packs || f->waiting_uploads)
        fprintf(f->out, "\nnote: %llu pack(s) and %llu staged upload(s) are unreferenced but within the grace period "
                        "(%u s): left alone\n",
                (unsigned long long)f->waiting_packs, (unsigned long long)f->waiting_uploads,
                f->cfg->mpack_grace_seconds);
    if (f->kept_packs)
        fprintf(f->out, "\nnote: %llu pack(s) hold only objects no repository references (left by deleted "
                        "repositories); kept\n",
                (unsigned long long)f->kept_packs);
    size_t left = problems - repaired;
    if (f->incomplete) {
        fprintf(f->out, "\nfsck: INCOMPLETE: some checks could not run (see the errors above); %zu problem(s) found\n",
                problems);
        return 1;
    }
    if (!problems) {
        fprintf(f->out, "\nfsck: clean\n");
        return 0;
    }
    if (f->o->repair)
        fprintf(f->out, "\nfsck: %zu problem(s), %zu repaired, %zu left\n", problems, repaired, left);
    else if (repairable)
        fprintf(f->out, "\nfsck: %zu problem(s), %zu of them repairable with --repair\n", problems, repairable);
    else fprintf(f->out, "\nfsck: %zu problem(s)\n", problems);
    return left ? 1 : 0;
}

/* ----------------------------------------------------------------- run */

/* Both sessions in one snapshot: db exports it, db2 imports it. */
static bool begin_snapshot(fsck_t *f)
{
    if (!exec_ok(f, f->db, "SET statement_timeout = 0") || !exec_ok(f, f->db2, "SET statement_timeout = 0") ||
        !exec_ok(f, f->db, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        return false;
    PGresult *r = q(f, f->db, "SELECT pg_export_snapshot(), floor(extract(epoch FROM now()))::bigint", 0, NULL);
    if (!r) return false;
    char set[128];
    snprintf(set, sizeof set, "SET TRANSACTION SNAPSHOT '%s'", PQgetvalue(r, 0, 0));
    f->now = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
    PQclear(r);
    return exec_ok(f, f->db2, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") && exec_ok(f, f->db2, set);
}

static int resolve_repo(fsck_t *f)
{
    const char *slash = strchr(f->o->repo, '/');
    if (!slash || slash == f->o->repo || !slash[1] || strchr(slash + 1, '/')) {
        fprintf(stderr, "musehubd fsck: --repo wants OWNER/SLUG, not '%s'\n", f->o->repo);
        return 2;
    }
    char *owner = mh_strndup(&f->a, f->o->repo, (size_t)(slash - f->o->repo));
    const char *v[2] = {owner, slash + 1};
    PGresult *r = q(f, f->db, "SELECT repo_id FROM repos WHERE owner = $1 AND slug = $2", 2, v);
    if (!r) return 1;
    int rc = 0;
    if (PQntuples(r) != 1) {
        fprintf(stderr, "musehubd fsck: no repository %s\n", f->o->repo);
        rc = 2;
    } else {
        snprintf(f->repo_id, sizeof f->repo_id, "%s", PQgetvalue(r, 0, 0));
        f->scoped = true;
    }
    PQclear(r);
    return rc;
}

static void fsck_release(fsck_t *f)
{
    if (f->db) PQfinish(f->db);
    if (f->db2) PQfinish(f->db2);
    if (f->store) {
        mh_store_close(f->store);
        uv_run(&f->loop, UV_RUN_DEFAULT);
    }
    if (f->loop_open) uv_loop_close(&f->loop);
    free(f->packs);
    mh__store_list_free(&f->uploads);
    mh_arena_release(&f->a);
}

int mh_fsck(const mh_config_t *cfg, const mh_fsck_opts_t *opts, FILE *out)
{
    fsck_t f;
    memset(&f, 0, sizeof f);
    f.cfg = cfg;
    f.o = opts;
    f.out = out;
    mh_arena_init(&f.a, 0);
    int rc = 1;
    if (!(f.db = mh__admin_connect(cfg, "fsck")) || !(f.db2 = mh__admin_connect(cfg, "fsck"))) goto done;
    if (!begin_snapshot(&f)) goto done;
    fprintf(out, "musehubd fsck %s: store %s, grace period %u s\n", mh_version, cfg->store, cfg->mpack_grace_seconds);
    if (!check_schema(&f)) {
        rc = report(&f);
        goto done;
    }
    if (opts->repo && (rc = resolve_repo(&f)) != 0) goto done;
    fprintf(out, "scope: %s\n", f.scoped ? opts->repo : "the whole server");
    run_sql_checks(&f);
    check_snapshot_objects(&f);
    load_packs(&f);
    check_locations(&f);
    check_packs(&f);
    check_uploads(&f);
    summary_counts(&f);
    exec_ok(&f, f.db2, "COMMIT");
    exec_ok(&f, f.db, "COMMIT");
    if (opts->repair && !f.incomplete) repair(&f);
    rc = report(&f);
done:
    fsck_release(&f);
    return rc;
}
