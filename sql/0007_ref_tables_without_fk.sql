-- 0007_ref_tables_without_fk: the per-repository ref tables are the
-- largest and hottest tables (one row per repository x object); their
-- foreign key to repos cost ~20 ms per 5,855 rows inserted (a RI trigger
-- per row), most of a push's ref-insert time. Every writer of ref rows
-- holds the repository row lock (SELECT ... FOR UPDATE) and checks the
-- row still exists, and deleting a repository removes its ref rows in the
-- same statement (src/hub/repos.c), so the constraint adds nothing.
ALTER TABLE commit_refs DROP CONSTRAINT commit_refs_repo_id_fkey;
ALTER TABLE snapshot_refs DROP CONSTRAINT snapshot_refs_repo_id_fkey;
ALTER TABLE object_refs DROP CONSTRAINT object_refs_repo_id_fkey;
ALTER TABLE mpack_refs DROP CONSTRAINT mpack_refs_repo_id_fkey;
