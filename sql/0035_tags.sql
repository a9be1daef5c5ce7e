-- 0035_tags: tags (SPEC 4.2), names for commits that never move. A tag
-- names a commit of its repository (commit_refs); creating one that
-- exists is a 409, never an update (tags are immutable). Written only
-- through refwrite (src/hub/refwrite.c), under the repository row lock
-- like every other ref change. Deleting the repository deletes its tags
-- (ON DELETE CASCADE: a repository has few, unlike its ref rows, sql/0007).
CREATE TABLE tags (
    repo_id     text NOT NULL REFERENCES repos ON DELETE CASCADE,
    name        text NOT NULL,                  -- git's ref-name rules (mh_ref_name_valid)
    commit_id   text NOT NULL,
    message     text NOT NULL DEFAULT '',
    tagger      text NOT NULL,                  -- handle of the identity that created it
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo_id, name)
);
