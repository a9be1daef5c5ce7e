"""The Python side on its own (no server): SPEC 1 test vectors, the mpack
format, the delta rebuild and its failure modes, seed 000's shape, musegen
and the local state of muse-fetch.  If these fail, the e2e verdicts on the
server mean nothing."""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from pathlib import Path

import msgpack
import pytest

import muselib

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def h(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def test_id_vectors():
    assert muselib.blob_id(b"hello fetch world") == h(b"hello fetch world")
    assert muselib.snapshot_id({}) == \
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    a, b = h(b"a"), h(b"b")
    m = {"z.txt": a, "a/b.txt": b, "a.txt": a}
    payload = b"\0".join(sorted(f"{p}\0{o}".encode() for p, o in m.items()))
    assert muselib.snapshot_id(m) == h(payload)
    # bytewise order of UTF-8 entries ("a.txt" < "a/b.txt" since '.' < '/')
    assert payload.startswith(b"a.txt\0")
    sid = muselib.snapshot_id(m)
    c = muselib.commit_id([b, a], sid, "msg", "2026-01-01T00:00:00+00:00", "gabriel")
    lo, hi = sorted([a, b])
    assert c == h("\0".join([lo + "\0" + hi, sid, "msg", "2026-01-01T00:00:00+00:00",
                             "gabriel"]).encode())
    root = muselib.commit_id([], sid, "m", "t", "x")
    assert root == h(("\0" + sid + "\0m\0t\0x").encode())


@pytest.mark.parametrize("s,ok", [
    ("sha256:" + "a" * 64, True), ("sha256:" + "A" * 64, False),
    ("sha256:" + "a" * 63, False), ("sha256:" + "a" * 64 + "\n", False),
    ("sha1:" + "a" * 64, False), (None, False), (b"sha256:" + b"a" * 64, False),
])
def test_valid_id(s, ok):
    assert muselib.valid_id(s) is ok


@pytest.mark.parametrize("p,ok", [
    ("a", True), ("a/b/c.txt", True), (".hidden", True), ("a/...", True),
    ("ü/日本", True), ("x" * 4096, True), ("é" * 2048, True),
    ("", False), ("/a", False), ("a/", False), ("a//b", False), ("./a", False),
    ("a/./b", False), ("..", False), ("a/../b", False), ("a\0b", False),
    ("x" * 4097, False), ("é" * 2049, False), ("\udcff", False),
])
def test_valid_path(p, ok):
    assert muselib.valid_path(p) is ok


def test_mpack_roundtrip_v1_v0_and_objects():
    blobs = [{"object_id": muselib.blob_id(b"x"), "content": b"x"}]
    v1 = muselib.build_mpack([], [], blobs, {"main": "sha256:" + "0" * 64})
    assert v1[:5] == b"MUSE\x01"
    p = muselib.parse_mpack(v1)
    assert p["version"] == 1 and p["blobs"] == blobs
    assert p["branch_heads"] == {"main": "sha256:" + "0" * 64}
    v0 = muselib.build_mpack([], [], blobs, version=0, blobs_key="objects")
    assert v0 == msgpack.packb({"commits": [], "snapshots": [], "objects": blobs},
                               use_bin_type=True)
    p0 = muselib.parse_mpack(v0)
    assert p0["version"] == 0 and p0["blobs"] == blobs
    assert isinstance(msgpack.unpackb(v1[5:], raw=False)["blobs"][0]["content"], bytes)


@pytest.mark.parametrize("bad", [b"", b"MUSE", b"MUSE\x02\x80", b"\xc1",
                                 b"\x91\x01", muselib.build_mpack([], [], []) + b"\0",
                                 muselib.build_mpack([], [], [])[:-1]])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        muselib.parse_mpack(bad)


@pytest.fixture(scope="module")
def seed():
    return muselib.generate()


def test_seed000_shape(seed):
    """seed 000's test_mpack_is_delta_encoded, on our generator."""
    assert (len(seed.commits), len(seed.snapshots), len(seed.blobs)) == (1031, 1031, 5855)
    snaps = seed.snapshots
    assert len(snaps[0]["delta_upsert"]) == 700 and snaps[0]["parent_snapshot_id"] is None
    assert all(len(s["delta_upsert"]) <= 10 and "manifest" not in s for s in snaps[1:])
    delta = sum(len(msgpack.packb(s, use_bin_type=True)) for s in snaps)
    assert delta / (1031 * 700 * 80) < 0.05
    c0 = seed.commits[0]
    assert c0["message"] == "commit-00000" and c0["author"] == "gabriel"
    assert c0["committed_at"] == "2026-01-01T00:00:00+00:00"
    assert seed.commits[1]["committed_at"] == "2026-01-01T00:01:00+00:00"
    assert seed.commits[1]["parent_commit_id"] == c0["commit_id"]
    for k in ("commit_id", "parent_commit_id", "parent2_commit_id", "snapshot_id",
              "message", "author", "committed_at", "branch", "metadata",
              "sem_ver_bump", "breaking_changes"):
        assert k in c0
    ms = muselib.rebuild_and_verify(muselib.parse_mpack(seed.pack()))
    assert len(ms) == 1031
    assert ms[seed.commits[-1]["snapshot_id"]] == seed.manifest
    # the seed's _populate: base manifest + this commit's 5 variants
    m5 = ms[seed.commits[5]["snapshot_id"]]
    changed = {p for p, o in m5.items()
               if not p.endswith(".py") or o != muselib.blob_id(
                   f"base-{int(p[9:13]):06d}".encode() + b"x" * 512)}
    assert changed == {f"src/file_{i:04d}.py" for i in range(25, 30)}


def tamper(seed, fn):
    pack = copy.deepcopy(muselib.parse_mpack(seed.pack()))
    fn(pack)
    with pytest.raises(ValueError):
        muselib.rebuild_and_verify(pack)


def test_rebuild_detects_tampering(seed):
    tamper(seed, lambda p: p["commits"][7].update(message="x"))
    tamper(seed, lambda p: p["snapshots"][7]["delta_upsert"].update({"new": "sha256:" + "1" * 64}))
    tamper(seed, lambda p: p["snapshots"][7]["delta_remove"].append("src/file_0000.py"))
    tamper(seed, lambda p: p["blobs"][3].update(content=b"other"))
    tamper(seed, lambda p: p["snapshots"].pop(0))                    # parent unknown
    tamper(seed, lambda p: p["snapshots"].pop())                     # commit's snapshot
    tamper(seed, lambda p: p["snapshots"][0]["delta_upsert"].update({"../x": "sha256:" + "1" * 64}))
    tamper(seed, lambda p: p["commits"][0].update(commit_id="sha256:xyz"))


def test_incremental_and_known_objects(seed):
    inc = muselib.generate(commits=3, parent=(seed.head, seed.manifest), first_index=1031)
    pack = muselib.parse_mpack(inc.pack())
    with pytest.raises(ValueError):
        muselib.rebuild_and_verify(pack)                 # parent manifest unknown
    known = {seed.commits[-1]["snapshot_id"]: seed.manifest}
    ms = muselib.rebuild_and_verify(pack, known)
    assert ms[inc.commits[-1]["snapshot_id"]] == inc.manifest
    # completeness: the reverted base blobs are not in this pack
    with pytest.raises(ValueError):
        muselib.rebuild_and_verify(pack, known, known_objects=set())
    muselib.rebuild_and_verify(pack, known, known_objects=set(seed.manifest.values()) |
                               {b["object_id"] for b in seed.blobs})


def test_distinct_seeds_disjoint():
    a = muselib.generate(commits=3, files=4, changed=1, blob_size=8, seed="a")
    b = muselib.generate(commits=3, files=4, changed=1, blob_size=8, seed="b")
    assert not {x["object_id"] for x in a.blobs} & {x["object_id"] for x in b.blobs}
    assert not {x["commit_id"] for x in a.commits} & {x["commit_id"] for x in b.commits}


def test_musegen_cli(tmp_path):
    out = tmp_path / "p.mpack"
    r = subprocess.run(["/usr/bin/python3", str(SCRIPTS / "musegen"), "--commits", "20",
                        "--files", "30", "--version", "0", "--out", str(out)],
                       stdout=subprocess.PIPE, check=True)
    info = json.loads(r.stdout)
    data = out.read_bytes()
    assert info["mpack_key"] == muselib.blob_id(data) and info["size_bytes"] == len(data)
    assert (info["commits"], info["snapshots"], info["blobs"]) == (20, 20, 130)
    p = muselib.parse_mpack(data)
    assert p["version"] == 0
    muselib.rebuild_and_verify(p)
    assert muselib.pack_tips(p["commits"]) == [info["head"]]
    ref = muselib.generate(commits=20, files=30)
    assert info["head"] == ref.head


@pytest.mark.parametrize("cmd", ["musegen", "muse-push", "muse-fetch", "git2muse",
                                 "muse-mirror", "msign.py", "pgtmp.py"])
def test_help(cmd):
    r = subprocess.run([str(SCRIPTS / cmd), "--help"], stdout=subprocess.PIPE, check=True)
    assert b"usage" in r.stdout.lower()


def test_local_state(tmp_path, seed):
    st = muselib.LocalState(str(tmp_path / "st"))
    pack = muselib.parse_mpack(seed.pack())
    muselib.rebuild_and_verify(pack, st.manifests)
    st.add_pack(pack)
    st.save()
    st2 = muselib.LocalState(str(tmp_path / "st"))
    assert st2.tips() == [seed.head]
    assert st2.manifest(seed.commits[-1]["snapshot_id"]) == seed.manifest
    assert st2.manifest(seed.commits[500]["snapshot_id"]) == \
        muselib.rebuild_and_verify(pack)[seed.commits[500]["snapshot_id"]]
    oid = seed.blobs[10]["object_id"]
    assert oid in st2.objects and st2.read_object(oid) == seed.blobs[10]["content"]
    inc = muselib.generate(commits=2, parent=(seed.head, seed.manifest), first_index=1031)
    muselib.rebuild_and_verify(muselib.parse_mpack(inc.pack()), st2.manifests,
                               known_objects=st2.objects)
