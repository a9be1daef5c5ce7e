-- 0030_mpack_frames: mpack v2 (SPEC 2.1). A v2 pack's blobs live in frames;
-- one row per frame, and index rows name their frame.
CREATE TABLE mpack_frames (
    mpack_id     text NOT NULL,
    frame_no     integer NOT NULL,          -- 0-based index in the pack's `frames` array
    data_offset  bigint NOT NULL,           -- the frame's `data` bytes in the pack file
    data_length  bigint NOT NULL,
    codec        text NOT NULL CHECK (codec IN ('zstd', 'none')),
    size         bigint NOT NULL,           -- decompressed length (SPEC 2.1 `size`)
    blob_count   integer NOT NULL,          -- entries of the frame's `blobs` array
    PRIMARY KEY (mpack_id, frame_no)
);
-- v1 rows: frame_no NULL, byte_offset/byte_length = the content bytes in the file.
-- v2 rows: frame_no set, byte_offset/byte_length = the blob inside the
-- decompressed frame (its place in the frame's `blobs` order).
ALTER TABLE mpack_index ADD COLUMN frame_no integer;
