-- 0009_commit_refs_seq: every commit_refs row gets a number from one
-- sequence at insert, so a process holding a repository's commit graph
-- read up to ref_seq N loads only `ref_seq > N` after a push instead of
-- the whole history (src/hub/graph.c; docs/benchmarks.md, finding 1).
--
-- Why "ref_seq > N" misses nothing: within ONE repository, ref_seq values
-- become visible in increasing order. Every writer of a repository's
-- commit_refs rows holds the repository row lock (SELECT ... FROM repos
-- ... FOR UPDATE) from before its INSERT until it commits: push.c,
-- commits_api.c (server-side commits), proposals.c (merges); repos.c
-- inserts the initial row in the statement that creates the repository
-- row, which no other transaction can see, hence lock, before it commits.
-- nextval() runs during the INSERT, under the lock, and hands out
-- increasing values in call order (CACHE 1, the default: a per-session
-- cache would break this). So if row B of a repository got a higher
-- number than row A of the same repository from another transaction,
-- A's transaction had ended (committed or rolled back) before B's could
-- take the lock: every snapshot that sees B sees A (or A never existed).
-- A graph read in one snapshot therefore holds exactly the repository's
-- rows numbered up to its maximum, and a later read of `ref_seq > max`
-- (one statement, a newer snapshot) holds all the rest.
-- Rows are never deleted except with their repository, whose id is never
-- reused.
--
-- ADD COLUMN with a volatile default rewrites the table and numbers the
-- existing rows (the backfill) under this migration's ACCESS EXCLUSIVE
-- lock: no writer runs meanwhile, and any order is correct for rows that
-- are all committed. The default then numbers every later insert, also
-- from binaries that predate this migration (they list their columns).
CREATE SEQUENCE commit_refs_seq;
ALTER TABLE commit_refs ADD COLUMN ref_seq bigint NOT NULL DEFAULT nextval('commit_refs_seq');
ALTER SEQUENCE commit_refs_seq OWNED BY commit_refs.ref_seq;
CREATE INDEX commit_refs_repo_seq ON commit_refs (repo_id, ref_seq);
