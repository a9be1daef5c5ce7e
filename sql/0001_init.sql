-- 0001_init: the whole storage model of SPEC sections 3-5.
--
-- Global, deduplicated rows: commits, snapshots, objects, mpacks,
-- mpack_index. A repository sees them only through its ref rows
-- (commit_refs, snapshot_refs, object_refs, mpack_refs); every access
-- check goes through those, never through global existence (SPEC 3).
-- Ids are text "sha256:<64 hex>" (SPEC 1).

CREATE TABLE identities (
    identity_id  text PRIMARY KEY,               -- sha256(handle)
    handle       text NOT NULL UNIQUE,
    is_agent     boolean NOT NULL DEFAULT false,
    is_admin     boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identity_keys (
    key_id       text PRIMARY KEY,               -- sha256(DER SubjectPublicKeyInfo)
    identity_id  text NOT NULL REFERENCES identities ON DELETE CASCADE,
    public_key   bytea NOT NULL,                 -- DER SubjectPublicKeyInfo
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX identity_keys_identity ON identity_keys (identity_id);

CREATE TABLE repos (
    repo_id         text PRIMARY KEY,
    owner           text NOT NULL,               -- owner handle
    owner_id        text NOT NULL,               -- identity id of the owner
    name            text NOT NULL,
    slug            text NOT NULL,
    visibility      text NOT NULL CHECK (visibility IN ('public', 'private')),
    description     text NOT NULL DEFAULT '',
    default_branch  text NOT NULL DEFAULT 'main',
    -- Bumped by every branch move: part of the fetch-pack cache key.
    state_seq       bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner, slug)
);

CREATE TABLE collaborators (
    repo_id      text NOT NULL REFERENCES repos ON DELETE CASCADE,
    identity_id  text NOT NULL REFERENCES identities ON DELETE CASCADE,
    role         text NOT NULL CHECK (role IN ('read', 'write', 'admin')),
    PRIMARY KEY (repo_id, identity_id)
);

CREATE TABLE branches (
    repo_id         text NOT NULL REFERENCES repos ON DELETE CASCADE,
    name            text NOT NULL,
    head_commit_id  text NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo_id, name)
);

-- Commits live only here (storage_uri is always NULL, SPEC 3). `meta` is a
-- msgpack map of the optional metadata keys, kept verbatim for fetch.
-- `generation` is the commit-graph generation number: 1 for a root, else
-- 1 + max(generation of parents).
CREATE TABLE commits (
    commit_id          text PRIMARY KEY,
    parent_commit_id   text,
    parent2_commit_id  text,
    snapshot_id        text NOT NULL,
    message            text NOT NULL,
    author             text NOT NULL,
    committed_at       text NOT NULL,            -- exactly as sent (part of the id)
    branch             text NOT NULL DEFAULT '',
    generation         integer NOT NULL,
    meta               bytea,
    storage_uri        text,
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- Snapshots in delta form (SPEC 2/3): delta_upsert is a msgpack map
-- path -> object id, delta_remove a msgpack array of paths. Every
-- CHECKPOINT_INTERVAL links a full manifest is kept in `checkpoint` to
-- bound the delta-chain walk (`depth` = links since the last full
-- manifest: a root or a checkpoint has depth 0).
CREATE TABLE snapshots (
    snapshot_id         text PRIMARY KEY,
    parent_snapshot_id  text,
    delta_upsert        bytea NOT NULL,
    delta_remove        bytea NOT NULL,
    entry_count         integer NOT NULL,
    depth               integer NOT NULL,
    checkpoint          bytea,
    storage_uri         text,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE objects (
    object_id    text PRIMARY KEY,
    size_bytes   bigint NOT NULL,
    storage_uri  text NOT NULL,                  -- mpack://<mpack id>#<offset>:<length>
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- kind: push (uploaded by a client), commit (server-side commit), gc
-- (consolidated), fetch (built to answer a fetch: a cache, never counted
-- by GC).
CREATE TABLE mpacks (
    mpack_id     text PRIMARY KEY,
    size_bytes   bigint NOT NULL,
    kind         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    superseded_at timestamptz                    -- set by GC; deleted after a grace period
);

-- Where each blob's bytes are: one row per (object, pack) holding it.
CREATE TABLE mpack_index (
    object_id    text NOT NULL,
    mpack_id     text NOT NULL,
    byte_offset  bigint NOT NULL,
    byte_length  bigint NOT NULL,
    PRIMARY KEY (object_id, mpack_id)
);
CREATE INDEX mpack_index_mpack ON mpack_index (mpack_id);

CREATE TABLE commit_refs (
    repo_id    text NOT NULL REFERENCES repos ON DELETE CASCADE,
    commit_id  text NOT NULL,
    PRIMARY KEY (repo_id, commit_id)
);
CREATE TABLE snapshot_refs (
    repo_id      text NOT NULL REFERENCES repos ON DELETE CASCADE,
    snapshot_id  text NOT NULL,
    PRIMARY KEY (repo_id, snapshot_id)
);
CREATE TABLE object_refs (
    repo_id    text NOT NULL REFERENCES repos ON DELETE CASCADE,
    object_id  text NOT NULL,
    PRIMARY KEY (repo_id, object_id)
);
-- Packs this repository references (pushed, built for it, or GC'd for it).
CREATE TABLE mpack_refs (
    repo_id   text NOT NULL REFERENCES repos ON DELETE CASCADE,
    mpack_id  text NOT NULL,
    PRIMARY KEY (repo_id, mpack_id)
);

-- Push grants (SPEC 4.3 step 1): the right to upload one pack's bytes to
-- a private staging key, and to unpack it into this repository.
CREATE TABLE push_grants (
    grant_id     text PRIMARY KEY,               -- also the staging key's id
    repo_id      text NOT NULL REFERENCES repos ON DELETE CASCADE,
    identity_id  text NOT NULL,
    mpack_key    text NOT NULL,
    size_bytes   bigint NOT NULL,
    staging_key  text NOT NULL,
    expires_at   timestamptz NOT NULL,
    -- Set once the server has hashed this grant's staged upload against
    -- mpack_key: from then on the pack may already sit at its final key
    -- (an unpack that failed after the move can be retried without a new
    -- upload, SPEC 4.3) — and only this grant may use it from there.
    verified_at  timestamptz,
    consumed_at  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX push_grants_lookup ON push_grants (repo_id, mpack_key);

-- Packs built to answer fetches, by (repository, ref state, request).
CREATE TABLE fetch_packs (
    repo_id         text NOT NULL REFERENCES repos ON DELETE CASCADE,
    state_seq       bigint NOT NULL,
    request_key     text NOT NULL,               -- sha256 of sorted want + have
    mpack_id        text,                        -- NULL when nothing is to be sent
    commit_count    integer NOT NULL,
    snapshot_count  integer NOT NULL,
    blob_count      integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo_id, request_key, state_seq)
);

-- Background jobs (SPEC 4.7), claimed with FOR UPDATE SKIP LOCKED.
CREATE TABLE jobs (
    job_id        text PRIMARY KEY,
    repo_id       text REFERENCES repos ON DELETE CASCADE,
    job_type      text NOT NULL,
    payload       jsonb NOT NULL DEFAULT '{}',
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempt       integer NOT NULL DEFAULT 0,
    max_attempts  integer NOT NULL DEFAULT 5,
    run_after     timestamptz NOT NULL DEFAULT now(),
    lease_until   timestamptz,
    locked_by     text,
    result        jsonb,
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_runnable ON jobs (run_after) WHERE status IN ('pending', 'running');

CREATE TABLE proposals (
    proposal_id      text PRIMARY KEY,
    repo_id          text NOT NULL REFERENCES repos ON DELETE CASCADE,
    number           integer NOT NULL,
    title            text NOT NULL,
    body             text NOT NULL DEFAULT '',
    from_branch      text NOT NULL,
    to_branch        text NOT NULL,
    state            text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed', 'merged')),
    merge_commit_id  text,
    created_by       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (repo_id, number)
);
