-- 0051_commit_refs_seq_partial: the (repo_id, ref_seq) index only for
-- statements that name ref_seq (issue 20: plans that do not depend on the
-- statistics).
--
-- Right after a repository is created and pushed, PostgreSQL's statistics
-- do not know its repo_id and estimate about one row for `repo_id = X`.
-- A probe of commit_refs by its whole primary key (repo_id, commit_id)
-- then costs the same on either index, and the planner took this one,
-- the narrower: an index range of all the repository's refs filtered by
-- commit_id, 3 ms per probe at 10,310 commits, five probes in a one-commit
-- push (12 -> 24 ms of server time; docs/benchmarks.md). Partial on a
-- predicate every row satisfies (ref_seq comes from a sequence starting
-- at 1), the index can only serve a statement that says `ref_seq > 0`
-- itself: the graph's read of the rows added since a cached graph
-- (src/hub/graph.c st_graph_since) does; the probes use the primary key.
DROP INDEX commit_refs_repo_seq;
CREATE INDEX commit_refs_repo_seq ON commit_refs (repo_id, ref_seq) WHERE ref_seq > 0;
