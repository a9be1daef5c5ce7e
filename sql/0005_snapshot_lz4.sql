-- 0005_snapshot_lz4: compress snapshot deltas and checkpoints with lz4
-- instead of pglz. A seed-sized push writes ~1 MB of checkpoint
-- manifests; pglz spent more time compressing them than PostgreSQL spent
-- on everything else in the snapshot insert. Existing rows keep their
-- compression until rewritten.
ALTER TABLE snapshots ALTER COLUMN checkpoint SET COMPRESSION lz4;
ALTER TABLE snapshots ALTER COLUMN delta_upsert SET COMPRESSION lz4;
ALTER TABLE snapshots ALTER COLUMN delta_remove SET COMPRESSION lz4;
