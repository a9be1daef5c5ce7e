-- 0050_object_refs_from_packs: a repository's blobs are the blobs of the
-- packs it references (issue 20).
--
-- Every writer that gave a repository a blob also gave it the pack that
-- holds the blob, in the same transaction: a push, a server-side commit
-- and an mpack.index job insert the pack's mpack_index rows and the
-- repository's mpack_refs row; GC inserts its consolidated pack's rows and
-- ref before it drops the repository's refs to the packs it replaces; a
-- fetch pack is built from blobs the repository already holds. An
-- object_refs row therefore said nothing that mpack_refs joined to
-- mpack_index does not, and a push of 52,250 blobs paid 250 ms of
-- PostgreSQL to insert it (docs/benchmarks.md). object_refs is now a view
-- with the same columns: readers (and SPEC 3's "a repository sees an
-- object only through its ref rows") are unchanged, writers insert the
-- index rows and the pack ref only.
--
-- Rows the packs do not back (none is written by this code; an older
-- database could hold one whose pack ref a bug dropped, or one fsck
-- reports as object-ref, naming no stored object) are kept, not lost, in
-- object_refs_kept, which the view includes. Nothing adds to that table;
-- deleting a repository deletes its rows.
CREATE TABLE object_refs_kept (
    repo_id    text NOT NULL,
    object_id  text NOT NULL,
    PRIMARY KEY (repo_id, object_id)
);

INSERT INTO object_refs_kept (repo_id, object_id)
SELECT x.repo_id, x.object_id FROM object_refs x
WHERE NOT EXISTS (SELECT 1 FROM mpack_refs r JOIN mpack_index i ON i.mpack_id = r.mpack_id
                  WHERE r.repo_id = x.repo_id AND i.object_id = x.object_id);

DROP TABLE object_refs;

-- UNION, not UNION ALL: a blob two referenced packs hold (a thin push's
-- base and a fetch pack, say) is one row. A query that names repo_id and
-- object_id probes mpack_index by object id and mpack_refs by its key.
CREATE VIEW object_refs AS
SELECT r.repo_id, i.object_id FROM mpack_refs r JOIN mpack_index i ON i.mpack_id = r.mpack_id
UNION
SELECT repo_id, object_id FROM object_refs_kept;
