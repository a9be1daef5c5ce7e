/*
 * hub.h — the product: repositories, refs, push, fetch, the read API and
 * the fs store's own routes, orchestrating http, db and store.
 *
 * One mh_hub_t per process, owned by main. Handlers find it through
 * req->app. Every handler responds exactly once (see http.h).
 */
#ifndef MH_HUB_H
#define MH_HUB_H

#include <uv.h>

#include "mh/auth.h"
#include "mh/budget.h"
#include "mh/config.h"
#include "mh/db.h"
#include "mh/http.h"
#include "mh/mpack.h"
#include "mh/refwrite.h"
#include "mh/store.h"

typedef struct mh_fetch_cache mh_fetch_cache_t; /* the per-process caches (src/hub/caches.c) */

typedef struct mh_hub {
    uv_loop_t *loop;
    const mh_config_t *cfg;
    mh_db_t *db;
    mh_store_t *store;
    mh_http_server_t *http;
    mh_caller_t dev_caller;  /* valid when cfg->dev_identity */
    bool has_dev_caller;
    char public_url[256];    /* no trailing '/' */
    mh_fetch_cache_t *fetch_cache; /* per-process caches: lookups, refs, fetch answers, graphs, manifests */
    mh_auth_t *auth;         /* key cache and rate limits (MSign, SPEC 5) */
    mh_budget_t *budget;     /* the process's pack-memory budget (SPEC 4.8); NULL: unlimited */
    uint64_t started_ms;
} mh_hub_t;

/* The route table (terminated by a row with method NULL). */
extern const mh_route_t mh_hub_routes[];

/* http pre-route hook: attaches the caller (req->caller, a mh_caller_t*)
 * from the MSign signature or MUSEHUB_DEV_IDENTITY; answers 401 itself on
 * a bad signature. */
void mh_hub_pre_route(mh_req_t *req);

/* Creates the dev identity row when MUSEHUB_DEV_IDENTITY is set
 * (blocking libpq; start-up only). */
int mh_hub_ensure_dev_identity(const char *url, const char *handle);

/* The caller of a request (never NULL). */
const mh_caller_t *mh_req_caller(const mh_req_t *req);

/* ------------------------------------------------ repository resolution */

/* A repository row as the handlers need it (strings in req->arena). */
typedef struct {
    char *repo_id, *owner, *owner_id, *name, *slug, *visibility, *description, *default_branch, *created_at;
    int64_t state_seq;
    mh_perm_t perm; /* the caller's */
} mh_repo_t;

typedef void (*mh_repo_cb)(mh_req_t *req, mh_repo_t *repo);

/* Loads the repository named by the route captures "owner"+"slug" (or
 * "repo_id") and checks the caller has at least `need`. On failure it
 * responds itself (404 unknown or unreadable; 401 anonymous write; 403
 * readable but not enough permission; 503 database down) and cb is not
 * called. */
void mh_hub_load_repo(mh_req_t *req, mh_perm_t need, mh_repo_cb cb);

/* The slug of a repository name (SPEC 4.1): lowercased (ASCII), every
 * run of bytes outside [a-z0-9._-] replaced by one '-'. NUL-terminated,
 * allocated in `a`; NULL on ENOMEM. */
char *mh_repo_slug(mh_arena_t *a, const char *name, size_t n);

/* True when a slug (NUL-terminated, from mh_repo_slug) may name a
 * repository: not empty, not "." or "..", not starting with '.' (SPEC
 * 4.1; a creation whose name gives such a slug is a 422). */
bool mh_repo_slug_valid(const char *slug);

/* Serialises a repository row as SPEC 4.1's object (with aliases). */
mh_val_t *mh_repo_val(mh_req_t *req, const mh_repo_t *r);

/* Parses an HTTP Range header value ("bytes=a-b", "bytes=a-",
 * "bytes=-n"; one range only) against an object of `size` bytes. Returns
 * true with off and len set for a satisfiable range; false otherwise, with
 * *unsat true when the range was well-formed but unsatisfiable (answer
 * 416) and false when malformed (serve the whole object, RFC 9110 14.2). */
bool mh_parse_range(mh_str_t h, uint64_t size, uint64_t *off, uint64_t *len, bool *unsat);

/* ----------------------------------------- repository lookup cache */

/* Per-process cache of mh_hub_load_repo's query result, keyed by
 * (owner/slug or repo_id, caller identity); invalidated across processes
 * by NOTIFY musehub_repo (a trigger on repos and collaborators), entries
 * expire after 2 s regardless. See caches.c for the invariants. */

/* Drops every entry of repo_id (NULL: all) and bumps the epoch. */
void mh_hub_repo_cache_invalidate(mh_hub_t *hub, const char *repo_id);
/* The current epoch (creates the cache and its LISTEN on first use);
 * read it before a lookup query and pass it to _put. */
uint64_t mh_hub_repo_cache_epoch(mh_hub_t *hub);
/* On a hit fills *out and *role (copies in arena a) and returns true. */
bool mh_hub_repo_cache_lookup(mh_hub_t *hub, const char *key, size_t klen, mh_arena_t *a, mh_repo_t *out,
                              const char **role);
/* Caches a looked-up row unless an invalidation happened since `epoch`. */
void mh_hub_repo_cache_put(mh_hub_t *hub, uint64_t epoch, const char *key, size_t klen, const mh_repo_t *r,
                           const char *role);
/* Empties the cache (shutdown; mh_fetch_cache_free does it too). */
void mh_hub_repo_cache_free(mh_hub_t *hub);

/* Kept for callers: the branch-head cache is freed by mh_fetch_cache_free. */
void mh_hub_refs_cache_free(void);

/* Fetch-pack cache invalidation after a branch move in this process
 * (other processes see the new repos.state_seq). */
void mh_fetch_cache_invalidate(mh_hub_t *hub, const char *repo_id);

/* ------------------------------------------------------------- handlers */

/* Every handler takes the request (route captures in req->params, body
 * in req->body), answers exactly once (see http.h) with the SPEC's status
 * codes and error body, and owns nothing beyond req->arena. */

/* SPEC 4.8: GET /healthz -> 200 {"status":"ok"} while the process runs;
 * GET /readyz -> 200 when a query reaches PostgreSQL, else 503 +
 * Retry-After; GET /metrics -> 200 Prometheus text for the whole server
 * (every worker's requests by route and status, latency histograms,
 * database pools, store operations, jobs run, process resources, summed
 * across workers; the job queue by type and status from the database;
 * build info, uptime, workers), 503 when out of memory. The families are
 * listed in docs/operations.md ("Metrics"). */
void mh_h_healthz(mh_req_t *req);
void mh_h_readyz(mh_req_t *req);
void mh_h_metrics(mh_req_t *req);

/* Appends this process's metric lines (every module's: http, db, store,
 * jobs, process) to out; arg is the process's mh_hub_t. The
 * mh_metrics_render_fn given to mh_metrics_worker_start and used by
 * /metrics. Returns 0 or MH_ENOMEM. */
int mh_hub_metrics_render(void *arg, mh_buf_t *out);

/* The http access-log hook (mh_http_config_t.log_who): the client
 * address after MUSEHUB_TRUSTED_PROXIES (mh_auth_client_addr, in the
 * request's arena) and the caller's handle, "-" when anonymous or not
 * authenticated. */
void mh_hub_log_who(mh_req_t *req, const char **client, const char **user);

/* SPEC 4.1: POST /api/repos {owner, name, visibility, initialize,
 * description?} -> 201 repository object (401 anonymous, 403 owner is
 * not the caller unless admin, 409 owner/slug exists, 422 bad fields);
 * GET /api/repos/{repo_id} -> 200 (404 also for unreadable private);
 * GET /api/repos?owner=H -> {repos: [...]} readable by the caller;
 * DELETE /api/repos/{repo_id} -> 204 (ADMIN permission; ref rows,
 * branches, tags and protection rules go, global rows and packs are left
 * to GC). SPEC 4.2: GET /{owner}/{slug}/refs -> {repo_id, default_branch,
 * branch_heads: {name: head}, tags: {name: commit_id}}. */
void mh_h_repo_create(mh_req_t *req);
void mh_h_repo_get(mh_req_t *req);
void mh_h_repo_list(mh_req_t *req);
void mh_h_repo_delete(mh_req_t *req);
void mh_h_refs(mh_req_t *req);

/* Repository settings, branches, protection rules and tags
 * (src/hub/refs_api.c). Every change runs under refwrite's lock order
 * and is judged there (branch moves by mh_rw_move_check, protection
 * included); names follow mh_ref_name_valid (422 invalid_name in a body;
 * a URL naming an invalid name is a 404); a body key the call does not
 * know is a 422 invalid_field. Permissions (SPEC 5): READ for reads,
 * WRITE for branches and tags, ADMIN (owner, administrators, collaborator
 * role admin) for settings and rules; 401 anonymous writes, 403 too
 * little permission, 404 unknown or unreadable repository.
 *
 * SPEC 4.1 PATCH /api/repos/{repo_id} {description?, visibility?,
 *   default_branch?} -> 200 the repository object; 422 a bad field or a
 *   default_branch naming no branch.
 * GET /api/repos/{repo_id}/branches -> {branches: [{name, head,
 *   protection: rule|nil}]} by name; GET .../branches/{name} -> one (404).
 * POST /api/repos/{repo_id}/branches {name, commit_id} -> 201 {name,
 *   head}; 404 the commit is not in this repository, 409 exists, 403
 *   protected (a rule with require_proposal outlived the branch).
 * PATCH .../branches/{name} {commit_id, force?, expected_old_head?} ->
 *   200 {name, head, old_head}: moves an existing branch (404 none; 404
 *   unknown commit; 409 non_fast_forward without force, stale_head; 403
 *   protected_branch).
 * DELETE .../branches/{name} {expected_old_head?} -> 204 (404; 409
 *   default_branch, stale_head; 403 protected_branch); only the ref goes.
 * GET|PUT|DELETE .../branches/{name}/protection: the rule {branch,
 *   allow_force_push, allow_delete, require_proposal, updated_by,
 *   updated_at}; PUT {allow_force_push?, allow_delete?,
 *   require_proposal?} (booleans, absent = false) -> 200 the rule (404 no
 *   such branch); DELETE -> 204 (404 no rule); GET -> 200 (404 no rule).
 * POST /api/repos/{repo_id}/tags {name, commit_id, message?} -> 201
 *   {name, commit_id, message, tagger, created_at} (404 commit, 409
 *   exists: tags never move); GET .../tags -> {tags: [...]} by name; GET
 *   .../tags/{name} -> one (404); DELETE .../tags/{name} -> 204 (404). */
void mh_h_repo_patch(mh_req_t *req);
void mh_h_branch_list(mh_req_t *req);
void mh_h_branch_get(mh_req_t *req);
void mh_h_branch_create(mh_req_t *req);
void mh_h_branch_move(mh_req_t *req);
void mh_h_branch_delete(mh_req_t *req);
void mh_h_protection_get(mh_req_t *req);
void mh_h_protection_put(mh_req_t *req);
void mh_h_protection_delete(mh_req_t *req);
void mh_h_tag_list(mh_req_t *req);
void mh_h_tag_get(mh_req_t *req);
void mh_h_tag_create(mh_req_t *req);
void mh_h_tag_delete(mh_req_t *req);

/* SPEC 4.3 steps 1 and 3 (push.c): POST .../push/mpack-presign
 * {mpack_key, size_bytes} -> {upload_url, mpack_key, expires_in,
 * already_present} (413 over MUSEHUB_MAX_MPACK_BYTES, 422 bad key or
 * size); POST .../push/unpack-mpack {mpack_key, branch, head, force?,
 * expected_old_head?} -> {commits_written, snapshots_written,
 * objects_written, branch, head, elapsed_ms} (404 no grant / nothing
 * staged, 409 not a fast-forward or stale expected_old_head, 422 any
 * failed check of a v0, v1 or v2 pack, 503 busy + Retry-After when the
 * pack-memory budget stayed spent, 507 a full store; the staged pack is
 * read as a stream, nothing is written unless every check passed, and
 * nothing is placed under mpacks/ unless the push succeeds). */
void mh_h_push_presign(mh_req_t *req);
void mh_h_push_unpack(mh_req_t *req);

/* SPEC 4.4 (fetch.c): POST .../fetch {want, have} -> {mpack_url, mpack_id,
 * commit_count, snapshot_count, blob_count, object_count, expires_in}
 * (msgpack unless Accept asks for JSON; 404 unknown repo/want, 422 bad
 * ids, 503 + Retry-After when an object has no index row yet).
 * SPEC 4.5 (read.c): GET .../commits?branch&limit&cursor -> {commits,
 * next_cursor}; GET .../commits/{id} -> commit map + parent_ids,
 * generation; GET .../tree/{commit or branch} -> {commit_id, snapshot_id,
 * entries: [{path, object_id, size_bytes}]}; GET .../objects/{id} -> the
 * raw bytes with Range (206/416), ETag and immutable cache headers. */
void mh_h_fetch(mh_req_t *req);
void mh_h_commits(mh_req_t *req);
void mh_h_commit(mh_req_t *req);
void mh_h_tree(mh_req_t *req);
void mh_h_object(mh_req_t *req);

/* Jobs (SPEC 4.7, src/hub/jobs_api.c): POST /api/repos/{repo_id}/jobs
 * {job_type, payload?} -> 202 {job_id, status, job_type} (owner or admin;
 * 422 unknown job_type or bad payload; 404 when an mpack.index names a
 * pack the repository neither references nor holds an unexpired push
 * grant for); GET /api/jobs/{job_id} -> {job_id, job_type, status,
 * attempt, max_attempts, result, error, repo_id, created_at, updated_at}
 * (404 unless the caller is an admin or the repository's owner/admin). */
void mh_h_jobs_create(mh_req_t *req);
void mh_h_job_get(mh_req_t *req);

/* SPEC 5 and docs/auth.md (identities.c): POST /api/identities (admin)
 * {handle, public_key_pem, is_agent?, is_admin?} -> 201 {identity_id,
 * handle, key_id, ...}; GET /api/identities/{handle}; POST
 * /api/identities/{handle}/keys {public_key_pem} (the identity or an
 * admin) -> 201 {key_id}; DELETE .../keys/{key_id} -> 204 (revocation);
 * GET/PUT/DELETE /api/repos/{repo_id}/collaborators[/{handle}] {role:
 * read|write|admin} (repository admin; 404 unknown handle, 422 bad role
 * or the owner). */
void mh_h_identity_create(mh_req_t *req);
void mh_h_identity_get(mh_req_t *req);
void mh_h_identity_key_add(mh_req_t *req);
void mh_h_identity_key_revoke(mh_req_t *req);
void mh_h_collab_list(mh_req_t *req);
void mh_h_collab_put(mh_req_t *req);
void mh_h_collab_delete(mh_req_t *req);

/* Server-side commits (SPEC 4.6, src/hub/commits_api.c):
 * POST /api/repos/{repo_id}/commits {branch, message, author?, files:
 * {path: bytes}, remove?: [paths], expected_head?} (JSON: contents are
 * base64 strings; msgpack: bin, or base64 str) -> 201 {commit_id,
 * snapshot_id, mpack_id (nil when no new blob), branch, parent_ids,
 * author, committed_at, generation, blobs_written}. WRITE permission.
 * Parent: the branch head; a branch that does not exist yet starts at
 * the default branch's head (a root commit when that is absent too).
 * 422 bad field, path or base64, a path both written and removed, a
 * removed path absent from the parent; 409 stale_head (expected_head is
 * not the head, or the branch moved meanwhile: nothing written); 413 body
 * over 64 MiB or new contents over MUSEHUB_MAX_MPACK_BYTES. */
void mh_h_repo_commit_create(mh_req_t *req);

/* Proposals (SPEC 4.6, src/hub/proposals.c); a proposal is {proposal_id,
 * repo_id, number, state: open|closed|merged, title, body, from_branch,
 * to_branch, created_by, created_at, updated_at, merge_commit_id}.
 * create: POST /api/repos/{repo_id}/proposals {title, from_branch,
 *   to_branch, body?} -> 201 the proposal (WRITE; 422 bad fields, same
 *   branches, or from_branch absent; to_branch may be absent);
 * list: GET .../proposals[?state=] -> {proposals: [...]} newest first, at
 *   most 1000 (READ; 422 bad state);
 * get: GET .../proposals/{proposal_id} -> the proposal plus from_head,
 *   to_head, merge_base and diff {added, changed, removed, truncated}
 *   (paths from the merge base to from_branch's head; nil when from_branch
 *   is gone) (READ; 404);
 * close: POST .../close -> 200 the proposal (WRITE; 404; 409 not open);
 * merge: POST .../merge -> 200 {proposal_id, number, state: "merged",
 *   merge_commit_id, snapshot_id, from_branch, to_branch, merge_base}
 *   (WRITE; 404; 409 not_open, nothing_to_merge, stale_head (a branch
 *   moved twice while the merge was computed: it is recomputed once), or
 *   {"error": "conflict", "detail", "paths": [...], "truncated"}). */
void mh_h_proposal_create(mh_req_t *req);
void mh_h_proposal_list(mh_req_t *req);
void mh_h_proposal_get(mh_req_t *req);
void mh_h_proposal_close(mh_req_t *req);
void mh_h_proposal_merge(mh_req_t *req);

/* SPEC 3, 4.3 step 2 (store_routes.c): the fs backend's presigned URLs.
 * PUT /_store/incoming/<id>?<signed query> streams the body to disk while
 * hashing it and keeps it only when length and SHA-256 equal what the URL
 * signs (200; 400 mismatch, nothing kept; 403 bad or expired signature;
 * 409 already uploaded). GET /_store/mpacks/<hex>?<signed query> serves a
 * pack (Range honoured). */
void mh_h_store_put(mh_req_t *req);
void mh_h_store_get(mh_req_t *req);

/* --------------------------------------------------- snapshot manifests */

typedef void (*mh_manifest_cb)(void *ud, int err, const char *why);

/* Rebuilds the full manifest of a stored snapshot: walks parent links
 * back to the nearest checkpoint or root (at most MH_CHECKPOINT_INTERVAL
 * rows, one query) and applies the deltas forward. Entries borrow bytes
 * allocated in `a`. cb fires once, on a later loop turn; err MH_ENOENT
 * when the snapshot is unknown, MH_EDB/MH_EDBDOWN, MH_EPARSE (corrupt
 * row). The caller checks the snapshot belongs to the repository. */
void mh_hub_load_manifest(mh_hub_t *hub, mh_arena_t *a, const char *snapshot_id, mh_manifest_t *out,
                          mh_manifest_cb cb, void *ud);

/* Offers a manifest the caller has just verified (it hashes to
 * snapshot_id) to the per-process LRU, so the next load of that snapshot
 * (typically the parent of the next push) needs no query. The bytes are
 * copied; m is unchanged. Best effort: silently ignored on ENOMEM or when
 * the manifest is too large to cache. Loop thread only. */
void mh_hub_manifest_cache_put(mh_hub_t *hub, const char *snapshot_id, const mh_manifest_t *m);

/* Frees every per-process cache of hub (repository lookups, branch heads,
 * fetch answers and URLs, graphs, manifests); call once at shutdown after
 * the last request finished. Safe when nothing was ever cached, and to
 * call twice. */
void mh_fetch_cache_free(mh_hub_t *hub);

#endif
