-- 0008_commit_metadata_per_repo: a commit's `branch` and optional metadata
-- (agent_id, signature, ... SPEC 2) are not covered by its id, so two
-- repositories may push the same commit with different metadata. Kept on
-- the global row, the first repository to push a commit decided what
-- every other tenant's fetch and read API returned for it (a cross-tenant
-- leak, docs/security.md). They now live on the repository's ref row;
-- commits.branch/meta stay as the first pusher's copy, never served.
ALTER TABLE commit_refs ADD COLUMN branch text NOT NULL DEFAULT '';
ALTER TABLE commit_refs ADD COLUMN meta bytea;
UPDATE commit_refs r SET branch = c.branch, meta = c.meta FROM commits c WHERE c.commit_id = r.commit_id;
