-- 0031_fetch_packs_v2: fetch answers of mpack v2 and shallow fetches
-- (SPEC 4.4). The request key already hashes the pack version and the
-- depth with want and have; the answer now carries the version written
-- and the shallow commits, so a cached answer needs them both.
ALTER TABLE fetch_packs
    ADD COLUMN mpack_version smallint NOT NULL DEFAULT 1,   -- the version of the pack built (1 or 2)
    ADD COLUMN depth bigint,                                -- the request's depth; NULL: a full fetch
    ADD COLUMN shallow text[];                              -- sent commits whose parents were left out; NULL: none
