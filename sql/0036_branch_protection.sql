-- 0036_branch_protection: protected branches (SPEC 4.2). One rule per
-- (repository, branch name). refwrite reads it in every branch move's
-- transaction, after the branch row is locked, and refuses with 403
-- protected_branch what it forbids: a move that is not a fast-forward
-- unless allow_force_push; the deletion unless allow_delete; with
-- require_proposal every move but a proposal merge.
--
-- A rule names a branch, not a head: it stays when the branch is deleted
-- (deleting a branch removes only the ref) and applies again if the name
-- is created again; DELETE .../protection removes it. state_seq is the
-- repository's state_seq the rule's change produced (every rule change
-- bumps it, like a branch move): it orders rule changes among branch
-- moves, which is what the e2e race test checks.
CREATE TABLE branch_protection (
    repo_id           text NOT NULL REFERENCES repos ON DELETE CASCADE,
    branch            text NOT NULL,
    allow_force_push  boolean NOT NULL,
    allow_delete      boolean NOT NULL,
    require_proposal  boolean NOT NULL,
    updated_by        text NOT NULL,            -- handle of the identity that set it
    updated_at        timestamptz NOT NULL DEFAULT now(),
    state_seq         bigint NOT NULL,
    PRIMARY KEY (repo_id, branch)
);
