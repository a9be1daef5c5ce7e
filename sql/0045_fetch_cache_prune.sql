-- 0045_fetch_cache_prune: the maintenance pass prunes the fetch-answer
-- cache (SPEC 4.4): fetch_packs rows older than MUSEHUB_FETCH_CACHE_SECONDS
-- go, by age, and the packs no remaining row names are superseded; the
-- sweep deletes a pack only while no fetch_packs row names it. Both
-- lookups need an index: by creation time, and by pack.
CREATE INDEX fetch_packs_created ON fetch_packs (created_at);
CREATE INDEX fetch_packs_mpack ON fetch_packs (mpack_id) WHERE mpack_id IS NOT NULL;
