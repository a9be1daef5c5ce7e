-- 0040_objects_from_index: one row per blob and pack, not two (issue 20).
--
-- An objects row said nothing an mpack_index row does not: its size is
-- the index row's byte_length (v1: the content bytes in the file; v2: the
-- blob inside its decompressed frame), and its storage_uri is the index
-- row's location written as a URI (SPEC 2, 2.1). Every writer inserted
-- both, row for row, in the same transaction: a push of 5,855 blobs paid
-- two inserts of 5,855 rows (28 + 33 ms at the seed's dimensions, 257 +
-- 336 ms at 10,310 commits; docs/benchmarks.md). `objects` is now a view
-- over mpack_index: writers insert the index rows only, and readers see
-- the same columns as before.
--
-- Which index row an object's storage_uri names when several packs hold
-- it: a pack that is not superseded before one that is (GC's swap makes
-- the consolidated pack win at once, as its repointing UPDATE did), then
-- the newest pack, then the smallest pack id (a stable answer).

-- An objects row without an index row (fsck reported it as
-- object-unindexed: none is written by this code) keeps its location as
-- an index row parsed from its URI: mpack://<id>#<off>:<len> (v1) or
-- mpack://<id>#<frame off>:<frame len>/<off>:<len> (v2, the frame found
-- by its data offset). A URI that names no known frame cannot be kept.
INSERT INTO mpack_index (object_id, mpack_id, byte_offset, byte_length, frame_no)
SELECT o.object_id, u[1],
       CASE WHEN u[4] IS NULL THEN u[2] ELSE u[4] END::bigint,
       CASE WHEN u[4] IS NULL THEN u[3] ELSE u[5] END::bigint,
       f.frame_no
FROM objects o
CROSS JOIN LATERAL regexp_match(o.storage_uri, '^mpack://([^#]+)#([0-9]+):([0-9]+)(?:/([0-9]+):([0-9]+))?$') AS u
LEFT JOIN mpack_frames f ON u[4] IS NOT NULL AND f.mpack_id = u[1] AND f.data_offset = u[2]::bigint
WHERE NOT EXISTS (SELECT 1 FROM mpack_index i WHERE i.object_id = o.object_id)
  AND (u[4] IS NULL OR f.frame_no IS NOT NULL)
ON CONFLICT DO NOTHING;

DROP TABLE objects;

CREATE VIEW objects AS
SELECT DISTINCT ON (i.object_id)
       i.object_id,
       i.byte_length AS size_bytes,
       'mpack://' || i.mpack_id || '#' ||
       CASE WHEN i.frame_no IS NULL THEN i.byte_offset || ':' || i.byte_length
            ELSE f.data_offset || ':' || f.data_length || '/' || i.byte_offset || ':' || i.byte_length END
           AS storage_uri
FROM mpack_index i
LEFT JOIN mpacks p ON p.mpack_id = i.mpack_id
LEFT JOIN mpack_frames f ON f.mpack_id = i.mpack_id AND f.frame_no = i.frame_no
ORDER BY i.object_id, p.superseded_at IS NOT NULL, p.created_at DESC, i.mpack_id;
