#!/usr/bin/python3
"""An independent mpack v2 implementation (SPEC 2, 2.1) on Python's
zstandard and msgpack (Debian python3-zstandard, python3-msgpack), used by
test/unit/test_mpack2.c to cross-check the C reader and writer:

  mpack_xcheck.py gen OUT [--meta]   write a v2 pack; print what it holds
  mpack_xcheck.py check IN           read a v2 pack strictly; print a summary

`gen` builds a small history with real ids (blob ids, snapshot ids from
the manifests, commit ids from SPEC 1), in frames of several blobs (zstd),
one `none` frame, an empty blob, a frame whose `data` comes first, and the
metadata as plain keys or (--meta) in a `meta` frame. It prints one line
per blob ("blob <id> <length>"), commit and snapshot, for the C test to
compare with what it read.

`check` applies every rule of SPEC 2.1: header, body keys, frames (codec,
size within bounds, blob lengths adding up to size, data decompressing to
exactly size bytes and one zstd frame), every blob hashed against its id,
every snapshot id rebuilt from the deltas and every commit id recomputed.
It prints "ok frames=F blobs=B commits=C snapshots=S meta=M" or exits 1
with the problem. Exit 77 when a module is missing (the C test skips).
"""
import hashlib
import sys

try:
    import msgpack
    import zstandard
except ImportError as e:  # pragma: no cover
    print(f"missing module: {e}")
    sys.exit(77)

FRAME_MAX = 64 << 20
EMPTY_SNAPSHOT = "sha256:" + hashlib.sha256(b"").hexdigest()


def blob_id(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def snapshot_id(manifest: dict) -> str:
    items = sorted((p.encode(), i.encode()) for p, i in manifest.items())
    return "sha256:" + hashlib.sha256(b"\0".join(p + b"\0" + i for p, i in items)).hexdigest()


def commit_id(parents, snap, message, at, author) -> str:
    ps = b"\0".join(sorted(p.encode() for p in parents))
    fields = [ps, snap.encode(), message.encode(), at.encode(), author.encode()]
    return "sha256:" + hashlib.sha256(b"\0".join(fields)).hexdigest()


# ------------------------------------------------------------------ gen


def history():
    """Blobs (bytes), and commits/snapshots in delta form with real ids."""
    words = [b"def", b"return", b"self", b"(", b")", b":", b"\n", b"    ", b"import", b"x", b"=", b"1", b"# note"]
    seed = 12345

    def rnd():
        nonlocal seed
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        return seed

    blobs = [b""]
    for i in range(1, 40):
        n = 100 + rnd() % 9000
        out = bytearray()
        while len(out) < n:
            out += words[rnd() % len(words)] + b" "
        blobs.append(bytes(out[:n]))
    paths = [f"pkg/mod{i:02d}.py" for i in range(len(blobs))]
    commits, snapshots = [], []
    manifest, parent_snap, parent_commit = {}, None, None
    for k in range(4):
        upsert = {}
        for i in range(k, len(blobs), 4):
            upsert[paths[i]] = blob_id(blobs[i])
        remove = [paths[1]] if k == 2 else []
        for p in remove:
            manifest.pop(p, None)
        manifest.update(upsert)
        sid = snapshot_id(manifest)
        snapshots.append({"snapshot_id": sid, "parent_snapshot_id": parent_snap,
                          "delta_upsert": upsert, "delta_remove": remove})
        msg, at = f"python commit {k}", f"2026-02-0{k + 1}T12:00:00Z"
        cid = commit_id([parent_commit] if parent_commit else [], sid, msg, at, "py")
        commits.append({"commit_id": cid, "parent_commit_id": parent_commit, "parent2_commit_id": None,
                        "snapshot_id": sid, "message": msg, "author": "py", "committed_at": at,
                        "branch": "main", "model_id": "m-1"})
        parent_snap, parent_commit = sid, cid
    return blobs, commits, snapshots


def frame(codec, blobs, order=("codec", "size", "blobs", "data"), level=3):
    raw = b"".join(blobs)
    data = zstandard.ZstdCompressor(level=level).compress(raw) if codec == "zstd" else raw
    f = {"codec": codec, "size": len(raw), "blobs": [[blob_id(b), len(b)] for b in blobs], "data": data}
    return {k: f[k] for k in order}


def gen(path, meta):
    blobs, commits, snapshots = history()
    heads = {"main": commits[-1]["commit_id"]}
    frames = [frame("zstd", blobs[0:12]), frame("zstd", blobs[12:25], level=19),
              frame("none", blobs[25:30]),
              frame("zstd", blobs[30:40], order=("data", "blobs", "size", "codec"))]
    body = {}
    if meta:
        m = msgpack.packb({"commits": commits, "snapshots": snapshots, "branch_heads": heads}, use_bin_type=True)
        body["meta"] = {"codec": "zstd", "size": len(m), "data": zstandard.ZstdCompressor(level=3).compress(m)}
    else:
        body.update({"commits": commits, "snapshots": snapshots, "branch_heads": heads})
    body["frames"] = frames
    with open(path, "wb") as f:
        f.write(b"MUSE\x02" + msgpack.packb(body, use_bin_type=True))
    for b in blobs:
        print("blob", blob_id(b), len(b))
    for c in commits:
        print("commit", c["commit_id"])
    for s in snapshots:
        print("snapshot", s["snapshot_id"])


# ---------------------------------------------------------------- check


class Bad(Exception):
    pass


def unpack_frame(name, f, is_meta):
    if not isinstance(f, dict):
        raise Bad(f"{name}: not a map")
    for k in ("codec", "size", "data") + (() if is_meta else ("blobs",)):
        if k not in f:
            raise Bad(f"{name}.{k}: missing")
    if is_meta and "blobs" in f:
        raise Bad(f"{name}.blobs: not allowed in the meta frame")
    codec, size, data = f["codec"], f["size"], f["data"]
    if codec not in ("zstd", "none") or not isinstance(size, int) or size < 0 or not isinstance(data, bytes):
        raise Bad(f"{name}: bad codec, size or data")
    entries = [] if is_meta else f["blobs"]
    if not is_meta and len(entries) != 1 and size > FRAME_MAX:
        raise Bad(f"{name}.size: {size} above 64 MiB for {len(entries)} blobs")
    if not is_meta and sum(e[1] for e in entries) != size:
        raise Bad(f"{name}.blobs: lengths do not add up to size")
    if codec == "none":
        raw = data
    else:
        d = zstandard.ZstdDecompressor().decompressobj()
        raw = d.decompress(data)  # one frame; trailing bytes land in unused_data
        if not d.eof or d.unused_data:
            raise Bad(f"{name}.data: not exactly one complete zstd frame")
    if len(raw) != size:
        raise Bad(f"{name}: data decompresses to {len(raw)} bytes, size says {size}")
    out, start = [], 0
    for oid, n in entries:
        b = raw[start:start + n]
        start += n
        if blob_id(b) != oid:
            raise Bad(f"{name}: blob {oid} does not hash to its id")
        out.append((oid, n))
    return raw, out


def check(path):
    buf = open(path, "rb").read()
    if buf[:5] != b"MUSE\x02":
        raise Bad("not a v2 pack")
    body = msgpack.unpackb(buf[5:], raw=False, strict_map_key=False)
    if "frames" not in body or "blobs" in body or "objects" in body:
        raise Bad("frames missing, or blobs/objects present")
    plain = [k for k in ("commits", "snapshots", "branch_heads") if k in body]
    meta = "meta" in body
    if meta and plain:
        raise Bad("both meta and plain keys")
    md = body
    if meta:
        raw, _ = unpack_frame("meta", body["meta"], True)
        md = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    blobs = []
    for i, f in enumerate(body["frames"]):
        blobs += unpack_frame(f"frames[{i}]", f, False)[1]
    commits, snapshots = md.get("commits") or [], md.get("snapshots") or []
    manifests = {EMPTY_SNAPSHOT: {}}
    for s in snapshots:  # parents first (as writers write them)
        m = dict(manifests[s["parent_snapshot_id"]]) if s["parent_snapshot_id"] else {}
        for p in s["delta_remove"]:
            del m[p]
        m.update(s["delta_upsert"])
        if snapshot_id(m) != s["snapshot_id"]:
            raise Bad(f"snapshot {s['snapshot_id']} does not rebuild to its id")
        manifests[s["snapshot_id"]] = m
    for c in commits:
        parents = [p for p in (c["parent_commit_id"], c["parent2_commit_id"]) if p]
        if commit_id(parents, c["snapshot_id"], c["message"], c["committed_at"], c["author"]) != c["commit_id"]:
            raise Bad(f"commit {c['commit_id']} does not hash to its id")
    for b, cid in (md.get("branch_heads") or {}).items():
        if cid not in {c["commit_id"] for c in commits}:
            raise Bad(f"branch head {b} not in the pack")
    print(f"ok frames={len(body['frames'])} blobs={len(blobs)} commits={len(commits)} "
          f"snapshots={len(snapshots)} meta={int(meta)}")


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "gen":
        gen(sys.argv[2], "--meta" in sys.argv[3:])
    elif len(sys.argv) == 3 and sys.argv[1] == "check":
        try:
            check(sys.argv[2])
        except (Bad, KeyError, TypeError, ValueError, zstandard.ZstdError) as e:
            print(f"bad pack: {e}")
            sys.exit(1)
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
