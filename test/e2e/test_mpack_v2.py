"""mpack v2 (SPEC 2.1) on the client side, no server: the writer checked
against a decoder written here from the SPEC (whole-file msgpack +
zstandard, nothing shared with muse.mpack), the streaming reader checked
against hand-built packs, every malformed pack refused with a message
that names the problem, and the streaming walker's bounded memory."""
from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import subprocess
from pathlib import Path

import msgpack
import pytest
import zstandard

import muse
from muse.mpack import PackError, PackWriter, read_pack

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def h(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def spec_decode(data: bytes) -> dict:
    """An independent v2 reader: the whole body with msgpack, every frame
    with zstandard.decompress; returns {meta, blobs {id: bytes}, frames}."""
    assert data[:5] == b"MUSE\x02"
    body = msgpack.unpackb(data[5:], raw=False)
    assert "blobs" not in body and "objects" not in body

    def inflate(fr):
        if fr["codec"] == "none":
            out = fr["data"]
        else:
            assert fr["codec"] == "zstd"
            out = zstandard.ZstdDecompressor().decompress(fr["data"], max_output_size=fr["size"])
        assert len(out) == fr["size"]
        return out
    if "meta" in body:
        meta = msgpack.unpackb(inflate(body["meta"]), raw=False)
    else:
        meta = {k: body[k] for k in ("commits", "snapshots", "branch_heads") if k in body}
    blobs, order = {}, []
    for fr in body["frames"]:
        raw = inflate(fr)
        assert sum(n for _, n in fr["blobs"]) == fr["size"]
        at = 0
        for oid, n in fr["blobs"]:
            blobs[oid] = raw[at:at + n]
            order.append(oid)
            at += n
    return {"meta": meta, "blobs": blobs, "frames": body["frames"], "order": order}


@pytest.fixture(scope="module")
def hist():
    return muse.generate(commits=40, files=30, changed=3, blob_size=300)


def write(hist, **kw) -> bytes:
    bio = io.BytesIO()
    w = PackWriter(version=2, fileobj=bio, **kw)
    for c in hist.commits:
        w.add_commit(c)
    for s in hist.snapshots:
        w.add_snapshot(s)
    w.branch_heads["main"] = hist.head
    for b in hist.blobs:
        w.add_blob(b["object_id"], b["content"])
    info = w.close()
    data = bio.getvalue()
    assert info["mpack_key"] == h(data) and info["size_bytes"] == len(data)
    return data


def test_writer_matches_spec(hist):
    data = write(hist, frame_bytes=4096)
    d = spec_decode(data)
    assert d["meta"]["commits"] == hist.commits
    assert d["meta"]["snapshots"] == hist.snapshots
    assert d["meta"]["branch_heads"] == {"main": hist.head}
    assert d["blobs"] == {b["object_id"]: b["content"] for b in hist.blobs}
    assert all(h(c) == oid for oid, c in d["blobs"].items())
    # several frames of about frame_bytes, every one compressed
    assert len(d["frames"]) > 3
    assert all(fr["size"] <= 4096 for fr in d["frames"])
    assert all(fr["codec"] == "zstd" for fr in d["frames"])
    # path order: all versions of a path together, oldest first
    first_path = {}
    for s in hist.snapshots:
        for p, o in s["delta_upsert"].items():
            first_path.setdefault(o, p)
    paths = [first_path[o] for o in d["order"]]
    assert paths == sorted(paths)
    seq = {b["object_id"]: i for i, b in enumerate(hist.blobs)}
    for a, b in zip(d["order"], d["order"][1:]):
        if first_path[a] == first_path[b]:
            assert seq[a] < seq[b]
    # smaller than v1
    assert len(data) < len(hist.pack(1)) / 3


def test_writer_plain_keys_and_large_blob():
    big = os.urandom(300_000)           # incompressible: codec none, own frame
    small = b"abc" * 1000
    bio = io.BytesIO()
    w = PackWriter(version=2, fileobj=bio, frame_bytes=100_000, meta=False)
    w.add_blob(h(small), small, path="a.txt")
    w.add_blob(h(big), big, path="b.bin")
    w.close()
    d = spec_decode(bio.getvalue())
    body = msgpack.unpackb(bio.getvalue()[5:], raw=False)
    assert "meta" not in body and body["commits"] == [] and body["snapshots"] == []
    assert [len(fr["blobs"]) for fr in d["frames"]] == [1, 1]
    codecs = {fr["blobs"][0][0]: fr["codec"] for fr in d["frames"]}
    assert codecs == {h(small): "zstd", h(big): "none"}
    assert d["blobs"][h(big)] == big


def test_reader_v0_v1_v2_agree(hist):
    for data in (hist.pack(0), hist.pack(1), write(hist), write(hist, meta=False)):
        idx = read_pack(io.BytesIO(data))
        assert idx.commits == hist.commits and idx.snapshots == hist.snapshots
        assert set(idx.blobs) == {b["object_id"] for b in hist.blobs}
        f = io.BytesIO(data)
        for b in hist.blobs[:50]:
            assert idx.read_blob(f, b["object_id"]) == b["content"]
        p = muse.parse_mpack(data)
        assert p["commits"] == hist.commits
        assert {b["object_id"]: b["content"] for b in p["blobs"]} == \
            {b["object_id"]: b["content"] for b in hist.blobs}
        ms = muse.verify_history(idx.commits, idx.snapshots, known_objects=set(),
                                 blob_ids=idx.blobs)
        assert ms[hist.commits[-1]["snapshot_id"]] == hist.manifest


# -- malformed packs --------------------------------------------------------

def frame(blobs: list[tuple[str, bytes]], codec="zstd", size=None, data=None, ids=None):
    raw = b"".join(c for _, c in blobs)
    if data is None:
        data = zstandard.ZstdCompressor().compress(raw) if codec == "zstd" else raw
    return {"codec": codec, "size": len(raw) if size is None else size,
            "blobs": ids if ids is not None else [[o, len(c)] for o, c in blobs],
            "data": data}


def v2(body: dict) -> bytes:
    return b"MUSE\x02" + msgpack.packb(body, use_bin_type=True)


A, B = b"first blob " * 20, b"second blob " * 30
GOOD = [(h(A), A), (h(B), B)]


def bad(body: dict, why: str, **kw):
    with pytest.raises(PackError, match=why):
        read_pack(io.BytesIO(v2(body)), **kw)


def test_v2_hand_built_good():
    idx = read_pack(io.BytesIO(v2({"commits": [], "snapshots": [], "frames": [frame(GOOD)]})))
    assert set(idx.blobs) == {h(A), h(B)}
    # the same id twice with identical content is fine
    read_pack(io.BytesIO(v2({"frames": [frame(GOOD), frame(GOOD[:1], codec="none")]})))


def test_v2_refusals():
    bad({"frames": [frame(GOOD, size=len(A + B) + 1)]}, "add up")
    ids = [[h(A), len(A)], [h(B), len(B) + 5]]
    bad({"frames": [frame(GOOD, ids=ids, size=len(A + B) + 5)]}, "decompresses to")
    more = zstandard.ZstdCompressor().compress(A + B + b"extra")
    bad({"frames": [frame(GOOD, data=more)]}, "more than its size")
    less = zstandard.ZstdCompressor().compress(A)
    bad({"frames": [frame(GOOD, data=less)]}, "decompresses to")
    bad({"frames": [frame(GOOD)], "blobs": []}, "v2 pack carries `blobs`")
    bad({"frames": [frame(GOOD)], "objects": []}, "v2 pack carries `objects`")
    meta = frame([], size=1, data=zstandard.ZstdCompressor().compress(b"\x80"))
    del meta["blobs"]
    bad({"frames": [], "meta": meta, "commits": []}, "both `meta` and plain")
    swapped = [(h(A), B), (h(B), A)]
    bad({"frames": [frame(swapped)]}, "hashes to")
    good = frame(GOOD)
    bad({"frames": [dict(good, data=good["data"][:-3])]}, "truncated")
    bad({"frames": [dict(good, data=good["data"] + b"\0\0")]}, "after its Zstandard frame")
    bad({"frames": [dict(good, data=b"not zstd at all")]}, "not a Zstandard frame")
    bad({"frames": [frame(GOOD, codec="none", data=A + B + b"x")]}, "codec none")
    bad({"frames": [dict(good, codec="lz4")]}, "codec")
    huge = frame(GOOD, size=65 << 20,
                 ids=[[h(A), 64 << 20], [h(B), 1 << 20]])
    bad({"frames": [huge]}, "over")
    bad({"frames": [frame(GOOD)]}, "more than 100 bytes", max_unpacked=100)
    bad({"commits": []}, "without `frames`")
    fr = frame(GOOD)
    del fr["blobs"]
    bad({"frames": [fr]}, "without blobs")
    data = v2({"frames": [frame(GOOD)]})
    for cut in (len(data) - 1, len(data) // 2, 7):
        with pytest.raises(PackError):
            read_pack(io.BytesIO(data[:cut]))
    with pytest.raises(PackError, match="after the pack"):
        read_pack(io.BytesIO(data + b"\0"))


def test_zip_bomb_is_bounded():
    """A frame that claims 1 KiB and inflates to 1 GiB is refused without
    the gigabyte ever being in memory."""
    co = zstandard.ZstdCompressor(level=19).compressobj(size=1 << 30)
    zeros = bytes(1 << 20)
    bomb = b"".join(co.compress(zeros) for _ in range(1024)) + co.flush()
    assert len(bomb) < 100_000
    body = {"frames": [{"codec": "zstd", "size": 1024, "blobs": [[h(b"\0" * 1024), 1024]],
                        "data": bomb}]}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PackError, match="more than its size"):
        read_pack(io.BytesIO(v2(body)))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024


def test_streaming_reader_memory(tmp_path):
    """A 600 MB v1 pack (blobs of 50 MB) is indexed and hashed by a child
    process whose peak RSS stays far below the pack's size."""
    path = tmp_path / "big.mpack"
    blobs = []
    with open(path, "wb") as fh:
        w = PackWriter(version=1, fileobj=fh)
        src = tmp_path / "src"
        with open(src, "wb") as s:
            for i in range(12):
                chunk = hashlib.sha256(str(i).encode()).digest() * (50_000_000 // 32)
                s.write(chunk)
                blobs.append((h(chunk), i * len(chunk), len(chunk)))
        sf = open(src, "rb")
        for oid, off, n in blobs:
            w.add_blob_from(oid, sf, off, n)
        w.close()
        sf.close()
    code = ("import sys; sys.path.insert(0, %r); import muse\n"
            "idx = muse.read_pack(open(%r, 'rb'))\n"
            "print(len(idx.blobs), idx.blob_bytes)\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')))"
            ) % (str(SCRIPTS), str(path))
    out = subprocess.run(["/usr/bin/python3", "-c", code], stdout=subprocess.PIPE,
                         check=True).stdout.decode().split()
    assert out[:2] == ["12", str(sum(n for _, _, n in blobs))]
    assert out[2] == "VmHWM:" and int(out[3]) < 100 * 1024, out


def test_v2_large_blobs_stream(tmp_path):
    """A v2 pack with blobs larger than a frame (own frames, codec none for
    random bytes) and many small ones is verified and checked out by a
    child process in bounded memory."""
    src = tmp_path / "src"
    files = {}
    with open(src, "wb") as s:
        at = 0
        for i in range(3):
            data = os.urandom(80 << 20)
            s.write(data)
            files[f"big/{i}.bin"] = (h(data), at, len(data))
            at += len(data)
        for i in range(200):
            data = (f"small file {i}\n" * (i + 1)).encode()
            s.write(data)
            files[f"small/{i:03d}.txt"] = (h(data), at, len(data))
            at += len(data)
    from test_clients import big_pack
    pack = tmp_path / "p.mpack"
    big_pack(files, str(src), pack, 2)
    manifest = {p: v[0] for p, v in files.items()}
    wc = tmp_path / "wc"
    code = (f"import sys; sys.path.insert(0, {str(SCRIPTS)!r})\n"
            "import muse, json\n"
            "from muse.fetch import checkout_files\n"
            f"f = open({str(pack)!r}, 'rb')\n"
            "idx = muse.read_pack(f)\n"
            f"m = json.load(open({str(tmp_path / 'm.json')!r}))\n"
            f"print(checkout_files(m, {str(wc)!r}, pack_path={str(pack)!r}, idx=idx))\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    out = subprocess.run(["/usr/bin/python3", "-c", code], stdout=subprocess.PIPE,
                         check=True).stdout.decode().split()
    assert out[0] == str(len(files))
    assert out[1] == "VmHWM:" and int(out[2]) < 100 * 1024, out
    for p, (oid, _off, _n) in files.items():
        assert h((wc / p).read_bytes()) == oid


def test_local_state_keeps_v2_packs(tmp_path, hist):
    """A verified v2 pack kept by LocalState serves every blob back, its
    snapshots rebuild, and the state survives a reload."""
    pack = tmp_path / "in.mpack"
    pack.write_bytes(write(hist, frame_bytes=2048))
    with open(pack, "rb") as f:
        idx = read_pack(f)
    st = muse.LocalState(str(tmp_path / "st"))
    key = h(pack.read_bytes())
    st.add_pack_file(str(pack), key, idx)
    st.save()
    st2 = muse.LocalState(str(tmp_path / "st"))
    assert st2.tips() == [hist.head]
    assert st2.manifest(hist.commits[-1]["snapshot_id"]) == hist.manifest
    for b in hist.blobs:
        assert b["object_id"] in st2.objects
        assert st2.read_object(b["object_id"]) == b["content"]
    from muse.fetch import checkout_files
    n = checkout_files(hist.manifest, str(tmp_path / "wc"), state=st2)
    assert n == len(hist.manifest)
    contents = {b["object_id"]: b["content"] for b in hist.blobs}
    for p, oid in hist.manifest.items():
        assert (tmp_path / "wc" / p).read_bytes() == contents[oid]


def test_outgoing_reuses_whole_frames(tmp_path, hist):
    """Filtering a v2 pack for a server that has the first half of its
    history: the new pack holds exactly the new commits' blobs, frames
    whose every blob goes are copied byte for byte, and it verifies."""
    from muse.push import outgoing, write_outgoing
    src = tmp_path / "all.mpack"
    src.write_bytes(write(hist, frame_bytes=1500))
    f = open(src, "rb")
    idx = read_pack(f)
    known_head = hist.commits[19]["commit_id"]
    out = outgoing(idx, [known_head])
    assert [c["commit_id"] for c in out.commits] == [c["commit_id"] for c in hist.commits[20:]]
    dst = tmp_path / "out.mpack"
    info = write_outgoing(idx, f, out, str(dst), 2)
    data = dst.read_bytes()
    assert info["mpack_key"] == h(data) and info["blobs"] == len(out.blobs)
    d = spec_decode(data)
    assert set(d["blobs"]) == set(out.blobs)
    src_frames = {bytes(fr["data"]) for fr in spec_decode(src.read_bytes())["frames"]}
    copied = [fr for fr in d["frames"] if bytes(fr["data"]) in src_frames]
    assert copied, "no frame was reused"
    known = muse.verify_history(hist.commits[:20], hist.snapshots[:20])
    idx2 = read_pack(io.BytesIO(data))
    muse.verify_history(idx2.commits, idx2.snapshots, known_manifests=known,
                        blob_ids=idx2.blobs)
    f.close()
