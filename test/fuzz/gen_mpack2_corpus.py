#!/usr/bin/python3
"""Writes the seed corpus of fuzz_mpack2 (test/fuzz/corpus/mpack2/): small
v0/v1/v2 packs (plain keys, meta frame, data-first key order, none and zstd
frames, an empty blob, the same id twice) and a few broken ones (a frame
decompressing past its size, lengths that do not add up, blobs in v2, meta
with plain keys), each behind the target's two leading bytes (chunking
seed, flags); and three v2 packs for fuzz_mpack (corpus/mpack/v2_*). Uses Debian's python3-msgpack and python3-zstandard; run it
again after changing it (the files are committed).
"""
import hashlib
import os

import msgpack
import zstandard

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "mpack2")


def bid(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def snap(manifest):
    items = sorted((p.encode(), i.encode()) for p, i in manifest.items())
    return "sha256:" + hashlib.sha256(b"\0".join(p + b"\0" + i for p, i in items)).hexdigest()


def commit(parents, s, msg, at, author):
    f = [b"\0".join(sorted(p.encode() for p in parents)), s.encode(), msg.encode(), at.encode(), author.encode()]
    return "sha256:" + hashlib.sha256(b"\0".join(f)).hexdigest()


BLOBS = [b"", b"hello fetch world", b"int main(void) { return 0; }\n" * 3, b"hello fetch world"]
M = {"a.txt": bid(BLOBS[1]), "src/main.c": bid(BLOBS[2]), "empty": bid(BLOBS[0])}
SID = snap(M)
CID = commit([], SID, "first", "2026-01-01T00:00:00Z", "fz")
META = {
    "commits": [{"commit_id": CID, "parent_commit_id": None, "snapshot_id": SID, "message": "first",
                 "author": "fz", "committed_at": "2026-01-01T00:00:00Z", "branch": "main"}],
    "snapshots": [{"snapshot_id": SID, "parent_snapshot_id": None, "delta_upsert": M, "delta_remove": []}],
    "branch_heads": {"main": CID},
}


def frame(codec, blobs, order="csbd", size=None, data=None):
    raw = b"".join(blobs)
    d = data if data is not None else (zstandard.ZstdCompressor(level=3).compress(raw) if codec == "zstd" else raw)
    f = {"c": ("codec", codec), "s": ("size", len(raw) if size is None else size),
         "b": ("blobs", [[bid(b), len(b)] for b in blobs]), "d": ("data", d)}
    return dict(f[k] for k in order)


def pack(version, body):
    head = b"" if version == 0 else b"MUSE" + bytes([version])
    return head + msgpack.packb(body, use_bin_type=True)


def meta_frame(m=META):
    raw = msgpack.packb(m, use_bin_type=True)
    return {"codec": "zstd", "size": len(raw), "data": zstandard.ZstdCompressor(level=3).compress(raw)}


SEEDS = {
    "v2_plain": pack(2, {**META, "frames": [frame("zstd", BLOBS[:3]), frame("none", BLOBS[3:])]}),
    "v2_meta": pack(2, {"meta": meta_frame(), "frames": [frame("zstd", BLOBS)]}),
    "v2_reorder": pack(2, {**META, "frames": [frame("zstd", BLOBS[1:3], order="dbsc")]}),
    "v2_empty": pack(2, {"frames": []}),
    "v2_empty_frame": pack(2, {"frames": [frame("zstd", [BLOBS[0]])]}),
    "v1_blobs": pack(1, {**META, "blobs": [{"object_id": bid(b), "content": b} for b in BLOBS]}),
    "v0_objects": pack(0, {"objects": [{"object_id": bid(BLOBS[1]), "content": BLOBS[1]}]}),
    "bad_more": pack(2, {"frames": [frame("zstd", BLOBS[1:2], size=5)]}),
    "bad_sum": pack(2, {"frames": [{"codec": "none", "size": 17, "blobs": [[bid(BLOBS[1]), 16]], "data": BLOBS[1]}]}),
    "bad_blobs_v2": pack(2, {"blobs": [], "frames": []}),
    "bad_meta_plain": pack(2, {"meta": meta_frame(), "commits": [], "frames": []}),
    "bad_hash": pack(2, {"frames": [{"codec": "none", "size": 17, "blobs": [[bid(BLOBS[2]), 17]],
                                     "data": BLOBS[1]}]}),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for i, (name, body) in enumerate(sorted(SEEDS.items())):
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(bytes([i * 37 % 256, i % 4]) + body)
    # v2 seeds for fuzz_mpack (the whole-buffer reader) too, without the prefix
    for name in ("v2_plain", "v2_meta", "v2_reorder"):
        with open(os.path.join(OUT, "..", "mpack", name), "wb") as f:
            f.write(SEEDS[name])


if __name__ == "__main__":
    main()
