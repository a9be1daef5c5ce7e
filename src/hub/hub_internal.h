/*
 * hub_internal.h — private to src/hub/: the per-process caches behind
 * fetch and the read API (commit graphs, reconstructed manifests, built
 * fetch answers), the commit-graph walk, and small helpers shared by
 * fetch.c, read.c, manifests.c and graph.c.
 *
 * Invariants:
 *  - Everything here runs on the loop thread, except the pure functions
 *    marked "thread-safe" (graph walks on an immutable graph).
 *  - Caches are caches (DESIGN 1): nothing is kept only here. A commit
 *    graph is keyed by (repo_id, state_seq) and a push bumps state_seq,
 *    so a stale graph is never used for a newer state; it is kept as the
 *    base the next state's graph extends (graph.c).
 *  - A graph is immutable once sealed and reference counted: a request
 *    holding one keeps it alive even if the cache replaces it.
 */
#ifndef MH_HUB_INTERNAL_H
#define MH_HUB_INTERNAL_H

#include "mh/hub.h"
#include "mh/mpack.h"
#include "mh/refwrite.h"
#include "mh/step.h"

/* ------------------------------------------------ public, for the lead */

/* mh_hub_load_manifest (declared in mh/hub.h) is implemented in
 * manifests.c. Beyond hub.h's comment: out->e is a heap array the CALLER
 * owns (mh_manifest_free), paths and ids borrow arena `a`; `out` must stay
 * valid until cb fires; further errors: MH_EHASH (the rebuilt manifest
 * does not hash to its id), MH_ELIMIT (a chain longer than
 * 4 * MH_CHECKPOINT_INTERVAL without a checkpoint), MH_EINVAL (not an id).
 * A bounded per-process LRU (64 manifests, 96 MiB) answers repeats
 * without a query. */

/* ----------------------------------------------------- request fields */

/* hub.c: reading request bodies. Each answers SPEC's 422 itself and
 * returns false on a bad field. */
/* The body decoded (mh_req_body_val) and a map ("invalid_body"). */
bool mh__body_map(mh_req_t *req, mh_val_t *body);
/* An id field (sha256:<64 hex>) into out; absent is allowed unless
 * required (*present tells, when not NULL). */
bool mh__body_id(mh_req_t *req, const mh_val_t *body, const char *name, bool required, mh_id_t *out, bool *present);
/* A valid branch name (mh_ref_name_valid), NUL-terminated into out. */
bool mh__body_branch(mh_req_t *req, const mh_val_t *body, const char *name, char out[256]);
/* An optional boolean (absent or nil: false). */
bool mh__body_bool(mh_req_t *req, const mh_val_t *body, const char *name, bool *out);
/* Copies the nine text columns every repository query starts with
 * (repo_id, owner, owner_id, name, slug, visibility, description,
 * default_branch, created_at) of row `row` into r; false on ENOMEM. */
bool mh__repo_row(mh_arena_t *a, PGresult *res, int row, mh_repo_t *r);

/* For a database callback: false after answering err (through the error
 * table, errmsg to the log), true when there was none. */
bool mh__db_ok(mh_req_t *req, int err, const char *errmsg);
/* mh__db_ok, and the result has exactly one row: false after answering
 * 404 not_found with `absent` as the detail. */
bool mh__db_one(mh_req_t *req, PGresult *res, int err, const char *errmsg, const char *absent);
/* The request's caller when it signed the request; NULL after answering
 * 401 "<what> needs a signed request". */
const mh_caller_t *mh__signed_caller(mh_req_t *req, const char *what);
/* The answer of a list query: 200 {name: [row(req, b, res, i) for each
 * row i]} (row returns a container built with b; NULL is ENOMEM, which
 * the builder answers), or the query's error. */
typedef mh_val_t *(*mh__row_fn)(mh_req_t *req, mh_vb_t *b, PGresult *res, int i);
void mh__list_answer(mh_req_t *req, PGresult *res, int err, const char *errmsg, const char *name, mh__row_fn row);
/* A route capture that must be an identity's handle (mh_handle_valid),
 * NUL-terminated in the request arena; NULL after answering 404 (a handle
 * that cannot exist names nothing) or 503. */
char *mh__param_handle(mh_req_t *req);
/* A text value: STR, UTF-8, no NUL, at most max bytes (at least one
 * unless allow_empty); a NUL-terminated copy in a, NULL when not. */
char *mh__text_field(mh_arena_t *a, const mh_val_t *v, size_t max, bool allow_empty);

/* ------------------------------------------------ operations (step kit) */

/* An HTTP operation of the hub, defined once (a static const per
 * operation): its name in logs, step table, finish (answers, once, last),
 * cleanup (frees what the operation holds outside its arenas; may be
 * NULL) and the limit of its work arena (bytes, 0 = none). */
typedef struct {
    const char *what;
    const mh_step_def_t *steps;
    int nsteps;
    void (*finish)(mh_step_t *s);
    void (*cleanup)(void *op);
    size_t work_limit;
} mh__op_def_t;
/* A step table and its length, for mh__op_def_t. */
#define MH__STEPS(table) (table), (int)(sizeof(table) / sizeof *(table))

/* The head of every HTTP operation of the hub, its first member: the
 * kit's step (first), the request, the hub, once mh__op_repo_cb ran the
 * repository, and the work arena: the operation's scratch beyond the
 * request (manifests, decoded bodies, what thread-pool steps build),
 * released after cleanup when the request ends. An operation reaches its
 * head with MH_STEP_OP(s, T, op.step) or (mh__op_t *)s. */
typedef struct {
    mh_step_t step;
    mh_req_t *req;
    mh_hub_t *hub;
    mh_repo_t *repo;
    mh_arena_t work;
    const mh__op_def_t *def;
    /* A server-side commit's snapshot id and manifest, which
     * mh__op_step_done keeps for the next commit on top of it. */
    const char *new_sid;
    const mh_manifest_t *new_m;
} mh__op_t;

/* A new operation of `size` bytes that starts with an mh__op_t: zeroed
 * in the request arena, its step set up for hub (loop, database, store,
 * the request id in logs), req and hub set, req->user pointing at it,
 * and cleanup + the work arena's release run with the request arena.
 * NULL after answering 503. MH__OP_NEW checks the layout. */
void *mh__op_new(mh_req_t *req, size_t size, const mh__op_def_t *def);
#define MH__OP_NEW(req, type, def)                                                                                     \
    ((void)sizeof(char[offsetof(type, op) == 0 ? 1 : -1]), (type *)mh__op_new((req), sizeof(type), (def)))
/* The last step of an operation that changed its repository's history
 * (committed): this process's cached fetch answers of the repository go
 * (other processes see state_seq move), op->new_m is kept when set, then
 * mh_step_done. */
void mh__op_step_done(mh_step_t *s);
/* mh_repo_cb for mh_hub_load_repo(req, need, mh__op_repo_cb) when
 * req->user is an operation: sets its repo and runs it. */
void mh__op_repo_cb(mh_req_t *req, mh_repo_t *repo);

/* n zeroed bytes in the request arena; NULL after answering 503. */
void *mh__req_alloc(mh_req_t *req, size_t n);

/* The answer of an HTTP operation that ended in an error: a refusal
 * (s->status, s->code, s->why; a 503 carries Retry-After), or an error
 * through the error table, except malformed input (MH_EPARSE, MH_EHASH),
 * which is the operation's 422 code `invalid` (when not NULL) with its
 * reason. A server error's reason goes to the log, not to the client.
 * mh__op_error fills e (a copy: it outlives the operation) and logs;
 * false when the operation succeeded. */
typedef struct {
    int status;
    const char *code; /* static */
    bool retry;       /* Retry-After: retry_s */
    uint32_t retry_s; /* seconds: 2, or the pack-memory queue timeout for MH_EBUDGET */
    char detail[512];
} mh__err_t;
bool mh__op_error(const mh_step_t *s, const char *invalid, mh__err_t *e);
/* Sends e. */
void mh__res_err(mh_req_t *req, const mh__err_t *e);
/* For an operation's finish: mh__op_error + mh__res_err; false, answering
 * nothing, when the operation succeeded. */
bool mh__op_failed(mh_step_t *s, const char *invalid);

/* A manifest load's error as the operation's: a missing or corrupt stored
 * snapshot is the server's fault (MH_EDB), not the client's. */
int mh__manifest_err(int err);
/* mh_manifest_cb for a step (ud = the mh_step_t) that waits on
 * mh_hub_load_manifest. */
void mh__manifest_step_cb(void *ud, int err, const char *why);

/* ------------------------------------------------------------- caches */

/* caches.c: the per-process caches (see its head comment). Loop thread
 * only. */

/* The container, created on first use (NULL only on ENOMEM). */
mh_fetch_cache_t *mh__caches(mh_hub_t *hub);
/* The slots graph.c and manifests.c keep their caches in; NULL when the
 * container does not exist and create is false (or on ENOMEM). */
typedef struct mh__graph_cache mh__graph_cache_t;   /* graph.c */
typedef struct mh__manifest_lru mh__manifest_lru_t; /* manifests.c */
mh__graph_cache_t **mh__caches_graphs(mh_hub_t *hub, bool create);
mh__manifest_lru_t **mh__caches_manifests(mh_hub_t *hub, bool create);
void mh__graph_cache_free(mh__graph_cache_t *gc);
void mh__manifest_lru_free(mh__manifest_lru_t *l);

/* The refs of (repo->repo_id, repo->state_seq): n names and the commit
 * each names (NUL-terminated), the first nb branches, the others tags. On
 * a hit the arrays stay valid until the next put. */
bool mh__refs_cache_get(mh_hub_t *hub, const mh_repo_t *repo, uint32_t *nb, uint32_t *n, char *const **names,
                        char *const **heads);
/* Remembers them (copied; best effort). */
void mh__refs_cache_put(mh_hub_t *hub, const mh_repo_t *repo, uint32_t nb, uint32_t n, char *const *names,
                        char *const *heads);

/* A fetch answer: the pack ("" when nothing is to be sent), counts, the
 * pack version, and the shallow commits (nshallow ids of MH_ID_SIZE
 * bytes each, NUL-terminated, back to back; the cache keeps a copy);
 * reusable until expires_at (unix s: its fetch_packs row's creation plus
 * MUSEHUB_FETCH_CACHE_SECONDS, when the maintenance pass prunes the row
 * and hands the pack to the sweep). */
typedef struct {
    char mpack_id[MH_ID_SIZE];
    uint32_t commits, snapshots, blobs;
    int version;
    char *shallow;
    uint32_t nshallow;
    int64_t expires_at;
} mh__answer_t;

/* Answers by key "repo_id|state_seq|request key" (FIFO, 8192); an answer
 * past its expires_at is not returned, and a put of a known key with a
 * later expires_at replaces its answer. The pointer from _get is valid
 * until the next put. */
const mh__answer_t *mh__answer_get(mh_hub_t *hub, const char *key);
void mh__answer_put(mh_hub_t *hub, const char *key, const mh__answer_t *ans);

/* Builds in flight, so identical misses build once. _join returns 0 when
 * req is the first with key (it builds; *mine is its record), 1 when it
 * waits behind an earlier one, MH_ENOMEM. _done removes the builder's
 * record and calls each(waiter, arg) for every waiting request. */
typedef struct inflight mh__inflight_t;
int mh__inflight_join(mh_hub_t *hub, const char *key, mh_req_t *req, mh__inflight_t **mine);
void mh__inflight_done(mh_hub_t *hub, mh__inflight_t *x, void (*each)(mh_req_t *waiter, void *arg), void *arg);

/* The lifetime of presigned URLs (MUSEHUB_PRESIGN_TTL, 1 h, at most 7
 * days), and a pack's GET URL (in arena a) with its remaining lifetime in
 * seconds, reused while half its lifetime is left. Store errors. */
uint32_t mh__presign_ttl(const mh_hub_t *hub);
int mh__pack_url(mh_hub_t *hub, mh_arena_t *a, const char *mpack_id, char **url, uint32_t *expires_in);

/* -------------------------------------------------- push unpack checks */

/* push_check.c: the CPU half of unpack (thread pool), between push.c's
 * lookups and its transaction. */

/* A stored snapshot pack snapshots are deltas against. */
typedef struct {
    char id[MH_ID_SIZE];
    int64_t depth;
    mh_manifest_t m; /* loaded by push.c (mh_hub_load_manifest) */
    bool loaded;
} mh__base_t;

/* The repository's side of a check, as maps over the looked-up arrays. */
typedef struct {
    mh_idmap_t objects, snaps, commits;
} mh__have_t;

typedef struct {
    /* in */
    const mh_packr_result_t *pack; /* the pack as read and verified by the stream (mh_rw_upload_stream) */
    const char *key;               /* its id (MH_ID_LEN bytes) */
    const char *head;              /* the head the branch moves to */
    mh_arena_t *a;                 /* everything below (the loop does not touch it while a check runs) */
    /* INDEX out */
    mh_idmap_t commits, snaps;                       /* the pack's entries by id (text) */
    mh_idmap_t blobs;                                /* its blobs by digest (32 bytes) */
    mh_idlist_t ext_parents, ext_snaps, ext_objects; /* ids it names outside itself */
    bool head_in_pack;
    /* in: what the repository holds of those (push.c's CONTEXT) */
    const char **have_commits, **have_snaps, **have_objects;
    int64_t *have_gen, *have_depth; /* per have_commits / have_snaps entry */
    size_t nhave_commits, nhave_snaps, nhave_objects;
    /* BASES out (push.c loads their manifests) */
    mh__base_t *bases;
    size_t nbases;
    mh_idmap_t base_map;
    /* PREPARE out: the maps REBUILD reads too, and refwrite's temporary
     * tables' COPY rows (REBUILD: snapshot_rows) */
    mh__have_t have;
    mh_buf_t commit_rows, snapshot_rows, object_rows, frame_rows;
    const char *why; /* the reason of an MH_EPARSE / MH_EHASH (in a) */
    /* REBUILD's progress from one chunk of snapshot rows to the next */
    struct {
        mh_manifest_t *ms;     /* manifests still needed by a later snapshot (malloc) */
        int *children, *depth; /* per pack snapshot (in a) */
        uint32_t *order;       /* parents first (in a) */
        size_t next;           /* position in order of the next snapshot to rebuild */
        bool done;             /* every row built, or an error (ms freed) */
    } rb;
} mh__unpack_t;

/* Each returns 0, MH_EPARSE (a bad pack: 422 invalid_pack, why set) or
 * MH_ENOMEM. Thread-safe (one check per mh__unpack_t). INDEX: the
 * pack's entries by id and the ids it names outside itself. BASES: which
 * stored manifests snapshots start from. PREPARE: the repository's side
 * as maps, every commit checked (parents, generations, tree known, id)
 * and the commit, object and frame COPY rows. REBUILD, after PREPARE:
 * every snapshot rebuilt and checked (manifest id, ghost guard) and the
 * snapshot COPY rows; it reads the pack, the maps and the bases only and
 * allocates from x->a only, so the loop may run the transaction's first
 * steps meanwhile (push.c) as long as it leaves x->a alone. */
int mh__unpack_index(mh__unpack_t *x);
int mh__unpack_bases(mh__unpack_t *x);
int mh__unpack_prepare(mh__unpack_t *x);
/* REBUILD, one chunk at a time: rebuilds pack snapshots parents first
 * (manifest, id, ghost guard) and appends their tmp_snapshots rows to
 * x->snapshot_rows, which the caller hands in empty, until it holds at
 * least `chunk` bytes or every snapshot is done (x->rb.done); a chunk
 * that holds rows is a whole COPY BINARY stream (header, rows, trailer).
 * SIZE_MAX: everything in one chunk. Returns 0, MH_EPARSE (why set) or
 * MH_ENOMEM; after an error or the last chunk, rb.done and the manifests
 * are freed. Memory: the manifests later snapshots start from and the
 * chunk (a single row may exceed `chunk`: a checkpoint is a whole
 * manifest). */
int mh__unpack_rebuild(mh__unpack_t *x, size_t chunk);
void mh__unpack_free(mh__unpack_t *x);

/* ------------------------------------------------------ commit graphs */

#define MH_GNONE UINT32_MAX /* == MH_IDMAP_NONE */

typedef struct {
    uint8_t id[32];   /* commit id digest */
    uint8_t snap[32]; /* snapshot id digest */
    uint32_t p[2];    /* parent node indices, MH_GNONE when absent or outside this repository */
    uint32_t gen;     /* generation number: 1 for a root, 1 + max(parents) */
} mh_gnode_t;

typedef struct {
    char *name;    /* branch name, NUL-terminated */
    mh_id_t head;  /* head commit id (text) */
    uint32_t node; /* its node index, MH_GNONE when not in the graph */
} mh_gbranch_t;

/* A parent edge whose parent is not (yet) a node of the graph. */
typedef struct {
    uint32_t node; /* the child's node index */
    uint32_t j;    /* which parent: 0 or 1 */
    uint8_t d[32]; /* the parent's commit id digest */
} mh_gpend_t;

typedef struct mh_graph {
    char *repo_id;
    int64_t state_seq;
    int64_t ref_seq; /* highest commit_refs.ref_seq among its commits, 0: none (sql/0009) */
    uint32_t n, cap;
    mh_gnode_t *nodes;
    mh_idmap_t map;         /* node index by commit digest */
    mh_gbranch_t *branches; /* sorted by name (bytewise) once sealed */
    uint32_t nbranches;
    size_t capb;
    uint32_t nsealed;              /* nodes [0, nsealed) have their parents resolved */
    uint8_t (*tmp_parents)[2][32]; /* parent digests of node nsealed + i until sealed */
    uint8_t *tmp_pmask;            /* bit 0/1: parent 1/2 present */
    mh_gpend_t *pend;              /* parents not in the graph: retried by each extension */
    uint32_t npend;
    size_t cappend;
    int refs;
    size_t bytes; /* approximate memory held */
} mh_graph_t;

/* Builder: a graph with room for `ncommits` commits (grows if more are
 * added). NULL on ENOMEM. refs starts at 1 (the caller's). */
mh_graph_t *mh__graph_new(const char *repo_id, int64_t state_seq, uint32_t ncommits);
/* Builder for a later state of the same repository: a new graph holding
 * a copy of sealed graph `base`'s commits (and its ref_seq), relabelled
 * `state_seq`, without branches, with room for `nmore` more commits. Add
 * the commits that are new since base (mh__graph_add), ALL branches of the
 * new state (mh__graph_add_branch), then seal: the result equals the graph
 * built at once from every commit (node indices aside), including parent
 * edges to commits added after their child. base is not modified (requests
 * may be reading it). NULL on ENOMEM. refs starts at 1. */
mh_graph_t *mh__graph_extend(const mh_graph_t *base, int64_t state_seq, uint32_t nmore);
/* Adds one commit (text ids; p1/p2 NULL when absent). Duplicates are
 * ignored. MH_EPARSE for an id that is not sha256:<64 lowercase hex>,
 * MH_ENOMEM. */
int mh__graph_add(mh_graph_t *g, const char *commit_id, const char *p1, const char *p2, const char *snapshot_id,
                  uint32_t gen);
/* Adds one branch (name copied). MH_EPARSE bad head id, MH_ENOMEM. */
int mh__graph_add_branch(mh_graph_t *g, const char *name, const char *head_id);
/* Resolves parent ids to node indices (a parent not in the graph stays
 * MH_GNONE until an extension adds it) and sorts branches; the graph is
 * immutable afterwards. MH_ENOMEM (then only mh__graph_unref is valid). */
int mh__graph_seal(mh_graph_t *g);
void mh__graph_ref(mh_graph_t *g);
void mh__graph_unref(mh_graph_t *g);
/* Unrefs g when arena a is released. MH_ENOMEM (then g is unref'd now:
 * the caller must not use it after an error). */
int mh__graph_hold(mh_arena_t *a, mh_graph_t *g);

/* Node index of a commit (text id, MH_ID_LEN bytes) or MH_GNONE. */
uint32_t mh__graph_find(const mh_graph_t *g, const char *commit_id);
/* Writes the text id of node i into out. */
void mh__graph_id(const mh_graph_t *g, uint32_t i, mh_id_t *out);
void mh__graph_snap_id(const mh_graph_t *g, uint32_t i, mh_id_t *out);
/* The branch named name[0..n), or NULL. */
const mh_gbranch_t *mh__graph_branch(const mh_graph_t *g, const char *name, size_t n);

/* Walk flags (one byte per node). XWANT: a commit the request names in
 * want (mh__graph_walk_ex). 0x10 and up are the caller's. */
enum { MH_GW_WANT = 1, MH_GW_HAVE = 2, MH_GW_QUEUED = 4, MH_GW_SEEN = 8, MH_GW_XWANT = 0x40 };

/* The want/have walk (SPEC 4.4, DESIGN 4): the commits reachable from
 * `want` and not from `have`. A max-heap by generation pops commits
 * newest first; WANT and HAVE flags flow to parents; the walk stops as
 * soon as every queued commit carries HAVE, so its cost depends on what
 * is sent plus the frontier, not on the repository's size.
 * flags: g->n bytes, zeroed by the caller; on return a node with
 *        MH_GW_HAVE is a commit the client has (every one the walk met).
 * out:   room for g->n indices; receives the commits to send, newest
 *        first (generation non-increasing). *nout their number.
 * Thread-safe (reads g only). Returns 0 or MH_ENOMEM. */
int mh__graph_walk(const mh_graph_t *g, const uint32_t *want, size_t nwant, const uint32_t *have, size_t nhave,
                   uint8_t *flags, uint32_t *out, size_t *nout);

/* The fetch walk (SPEC 4.4): mh__graph_walk with two additions.
 *  - A commit named in `want` and not in `have` is sent even when a have
 *    commit descends from it: the HAVE flag does not flow into it, nor
 *    through it (a shallow client lists its shallow commits as haves and
 *    asks for a left-out parent by id to deepen). The cost: a client that
 *    asks for a commit it has without listing it in have gets it again.
 *  - depth (0: no limit; else 1..2^31): only commits fewer than `depth`
 *    parent links from a want (along commits the client lacks) are sent;
 *    the parents of the last ones are left out (flags 0, or HAVE).
 * flags, out, *nout as mh__graph_walk; a sent commit's parent that is
 * neither sent nor marked HAVE was left out by the depth (or is one the
 * walk stopped before reaching: the walk ends once no commit it queued
 * can be sent). Thread-safe. MH_ENOMEM. */
int mh__graph_walk_ex(const mh_graph_t *g, const uint32_t *want, size_t nwant, const uint32_t *have, size_t nhave,
                      uint64_t depth, uint8_t *flags, uint32_t *out, size_t *nout);

/* The commit log (SPEC 4.5): ancestors of `head` (inclusive) ordered
 * newest first: generation descending, then commit id descending
 * (bytewise). With cursor != MH_GNONE the page starts right after that
 * commit; MH_ENOENT when the cursor is not an ancestor of head. Writes
 * up to `limit` indices into out, *nout their number, *more whether
 * commits remain after them. Cost O(k log k), k = position + limit.
 * Thread-safe. MH_ENOMEM. */
int mh__graph_log(const mh_graph_t *g, uint32_t head, uint32_t cursor, uint32_t limit, uint32_t *out, uint32_t *nout,
                  bool *more);

/* The cached graph of (repo_id, state_seq) with a reference for the
 * caller, or NULL. */
mh_graph_t *mh__graph_cache_get(mh_hub_t *hub, const char *repo_id, int64_t state_seq);

/* Loads a repository's graph with one statement (state_seq, branches and
 * commit_refs JOIN commits read in one snapshot), caches it, and calls
 * cb(ud, g, 0, NULL) with a reference for the caller (mh__graph_unref or
 * mh__graph_hold). The graph's state_seq is the one read with it (it may
 * be newer than the caller's). When a graph of this repository is cached
 * (any state), only the commit_refs rows numbered above its ref_seq are
 * read and a copy of it is extended (sql/0009 argues why nothing is
 * missed); otherwise every commit is read. On error g is NULL. cb fires
 * once, on a later loop turn, when this returns 0; MH_ENOMEM (small state
 * in arena `a`, which must outlive the callback) means it was not
 * started. */
typedef void (*mh_graph_cb)(void *ud, mh_graph_t *g, int err, const char *errmsg);
int mh__graph_load(mh_hub_t *hub, mh_arena_t *a, const char *repo_id, mh_graph_cb cb, void *ud);

/* Drops the cached graph(s) of one repository (NULL: all). */
void mh__graph_cache_drop(mh_hub_t *hub, const char *repo_id);

/* ---------------------------------------------------------- helpers */

/* True when an If-None-Match header value (a comma-separated list of
 * entity tags, weak "W/" ones compared weakly, or "*") names `etag` (the
 * quoted tag, e.g. "\"sha256:...\""). RFC 9110 13.1.2. */
bool mh__etag_matches(mh_str_t inm, const char *etag);

#endif
