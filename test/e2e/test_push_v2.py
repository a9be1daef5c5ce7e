"""mpack v2 (SPEC 2.1) through push (SPEC 4.3) and the mpack.index job
(SPEC 4.7), on both stores: a v2 pack is read as a stream, verified blob
by blob, and indexed with its frames (sql/0030: mpack_frames rows,
mpack_index.frame_no, objects.storage_uri in the v2 form); every
malformed v2 pack of issue 13 is a 422 naming the problem with nothing
written to PostgreSQL and nothing placed under mpacks/.

The packs are written by the client library (muse.PackWriter) or, for
the malformed ones, built here by hand with msgpack and zstandard."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import msgpack
import pytest
import zstandard

import muselib
from e2e_util import sql_str, unique
from test_jobs import run_job

OWNER = "gabriel"
ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
PY = "/usr/bin/python3"
BUNDLE = ROOT.parent / "shared" / "data" / "libuv-v1.x.bundle"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def hist(commits: int = 30, files: int = 20, **kw) -> muselib.History:
    return muselib.generate(commits=commits, files=files, changed=3, blob_size=300,
                            seed=unique("v2"), **kw)


def v2pack(h: muselib.History, **opts) -> bytes:
    return muselib.build_mpack(h.commits, h.snapshots, h.blobs, version=2, **opts)


def stage(hub, slug: str, data: bytes) -> str:
    key = muselib.blob_id(data)
    pre = hub.presign(OWNER, slug, key, len(data))
    assert not pre["already_present"]
    hub.upload(pre["upload_url"], data)
    return key


def unpack(hub, slug: str, key: str, head: str, **kw):
    body = {"mpack_key": key, "branch": "main", "head": head}
    body.update(kw)
    return hub.raw("POST", f"/{OWNER}/{slug}/push/unpack-mpack", body)


def body_of(data: bytes) -> dict:
    assert data[:5] == b"MUSE\x02"
    return msgpack.unpackb(data[5:], raw=False)


def inflate(codec: str, data: bytes, size: int) -> bytes:
    if codec == "none":
        return data
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)


def check_v2_rows(db, data: bytes, h: muselib.History) -> None:
    """The pack's rows say where each of h's blobs is, in the v2 form, and
    the pack file at those places holds exactly their bytes."""
    key = muselib.blob_id(data)
    frames = body_of(data)["frames"]
    rows = db.rows(f"SELECT frame_no, data_offset, data_length, codec, size, blob_count FROM mpack_frames"
                   f" WHERE mpack_id = {sql_str(key)} ORDER BY frame_no")
    assert len(rows) == len(frames) > 0
    for (no, off, ln, codec, size, count), fr in zip(rows, frames):
        off, ln = int(off), int(ln)
        assert data[off:off + ln] == fr["data"], no
        assert (codec, int(size), int(count)) == (fr["codec"], fr["size"], len(fr["blobs"]))
    content = {b["object_id"]: b["content"] for b in h.blobs}
    idx = db.rows(f"SELECT object_id, frame_no, byte_offset, byte_length FROM mpack_index"
                  f" WHERE mpack_id = {sql_str(key)}")
    assert {r[0] for r in idx} == set(content)
    for oid, no, off, ln in idx:
        assert no is not None, oid
        fr = frames[int(no)]
        raw = inflate(fr["codec"], fr["data"], fr["size"])
        assert raw[int(off):int(off) + int(ln)] == content[oid]
    ids = ",".join(sql_str(o) for o in content)
    for oid, uri in db.rows(f"SELECT object_id, storage_uri FROM objects WHERE object_id IN ({ids})"):
        # mpack://<id>#<frame offset>:<frame length>/<offset>:<length>
        assert uri.startswith(f"mpack://{key}#"), uri
        frame_part, blob_part = uri.split("#")[1].split("/")
        fo, fl = (int(x) for x in frame_part.split(":"))
        bo, bl = (int(x) for x in blob_part.split(":"))
        fr = next(f for f in frames if f["data"] == data[fo:fo + fl])
        assert inflate(fr["codec"], data[fo:fo + fl], fr["size"])[bo:bo + bl] == content[oid]


def history_ids(db, repo_id: str) -> tuple[set, set, set]:
    rid = sql_str(repo_id)
    return tuple({r[0] for r in db.rows(f"SELECT {col} FROM {t} WHERE repo_id = {rid}")}
                 for t, col in (("commit_refs", "commit_id"), ("snapshot_refs", "snapshot_id"),
                                ("object_refs", "object_id")))


# ---------------------------------------------------------------------------
# pushes that work
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("meta", [True, False], ids=["meta-frame", "plain-keys"])
def test_v2_push_writes_frames_and_v2_rows(server, hub, repo, db, meta):
    h = hist()
    data = v2pack(h, frame_bytes=2048, meta=meta)
    res = hub.push(OWNER, repo["slug"], data, "main", h.head)
    assert (res["commits_written"], res["snapshots_written"], res["objects_written"]) == \
        (len(h.commits), len(h.snapshots), len(h.blobs))
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": h.head}
    key = muselib.blob_id(data)
    assert server.store_path(key).read_bytes() == data
    check_v2_rows(db, data, h)
    # the same pack again: nothing new
    again = hub.push(OWNER, repo["slug"], data, "main", h.head)
    assert (again["commits_written"], again["snapshots_written"], again["objects_written"]) == (0, 0, 0)


def test_v1_and_v2_push_of_one_history_agree(hub, make_repo, db):
    """The same history pushed as v1 to one repository and as v2 (several
    frames, one blob larger than a frame in a frame of its own) to
    another: the same commits, snapshots and objects."""
    h = hist(commits=20)
    big = os.urandom(300_000)
    extra = {"object_id": muselib.blob_id(big), "content": big}
    a, b = make_repo(), make_repo()
    blobs = h.blobs + [extra]
    r1 = hub.push(OWNER, a["slug"], muselib.build_mpack(h.commits, h.snapshots, blobs), "main", h.head)
    data = muselib.build_mpack(h.commits, h.snapshots, blobs, version=2, frame_bytes=4096)
    assert any(fr["codec"] == "none" and len(fr["blobs"]) == 1 for fr in body_of(data)["frames"])
    r2 = hub.push(OWNER, b["slug"], data, "main", h.head)
    for k in ("commits_written", "snapshots_written", "objects_written"):
        assert r1[k] == r2[k], k
    assert history_ids(db, a["repo_id"]) == history_ids(db, b["repo_id"])
    # The big blob's index row names its frame (v2), not a file range.
    assert db.scalar(f"SELECT frame_no FROM mpack_index WHERE object_id = {sql_str(extra['object_id'])}"
                     f" AND mpack_id = {sql_str(muselib.blob_id(data))}") is not None


def test_v2_incremental_push_on_a_v1_base(hub, repo, db):
    base = hist(commits=5)
    hub.push(OWNER, repo["slug"], base.pack(1), "main", base.head)
    more = muselib.generate(commits=4, files=20, changed=3, blob_size=300, seed=unique("v2m"),
                            parent=(base.head, base.manifest), first_index=5)
    res = hub.push(OWNER, repo["slug"], v2pack(more), "main", more.head)
    assert res["commits_written"] == 4 and res["objects_written"] == len(more.blobs)
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": more.head}


def test_v1_fetch_of_a_v2_push_gives_the_same_ids(hub, repo):
    """The fetch side reads the v2 pack's frames (fetch builder) and sends
    the history as v1: every id and every blob's bytes as pushed."""
    h = hist(commits=12)
    hub.push(OWNER, repo["slug"], v2pack(h, frame_bytes=1500), "main", h.head)
    out = hub.clone(OWNER, repo["slug"], [h.head], formats=[1])
    assert out["data"][:5] == b"MUSE\x01"
    pack = out["pack"]
    assert {c["commit_id"] for c in pack["commits"]} == {c["commit_id"] for c in h.commits}
    assert {s["snapshot_id"] for s in pack["snapshots"]} == {s["snapshot_id"] for s in h.snapshots}
    assert {b["object_id"]: b["content"] for b in pack["blobs"]} == \
        {b["object_id"]: b["content"] for b in h.blobs}


@pytest.mark.slow
def test_real_history_v2_push(server, make_repo, db, tmp_path):
    """libuv's v1.x branch (5,697 commits) through git2muse: pushed as v2
    (one pack, 289 MB of blobs in a few MB of frames) and as v1 to
    another repository, the two hold the same ids."""
    if not BUNDLE.exists():
        pytest.skip(f"{BUNDLE} not present")
    git = tmp_path / "libuv"
    subprocess.run(["git", "clone", "-q", "-b", "v1.x", str(BUNDLE), str(git)], check=True)
    repos = {}
    for fmt in ("2", "1"):
        out = tmp_path / f"out{fmt}"
        subprocess.run([PY, str(SCRIPTS / "git2muse"), "--repo", str(git), "--out-dir", str(out),
                        "--ref", "v1.x:main", "--format", fmt, "--max-pack-bytes", str(1 << 31), "-q"],
                       check=True)
        plan = json.loads((out / "push.json").read_text())
        assert {p["format"] for p in plan["packs"]} == {int(fmt)}
        r = make_repo()
        repos[fmt] = r
        p = subprocess.run([PY, str(SCRIPTS / "muse-push"), "--url", server.url, "--owner", OWNER,
                            "--repo", r["slug"], "--format", fmt, "--json", "--plan", str(out / "push.json")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=1200)
        assert p.returncode == 0, p.stderr
        results = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
        assert sum(x["commits_written"] for x in results) == sum(e["commits"] for e in plan["packs"])
    a, b = (history_ids(db, repos[f]["repo_id"]) for f in ("1", "2"))
    assert a == b and len(a[0]) > 5000
    rid = sql_str(repos["2"]["repo_id"])
    assert db.count(f"SELECT count(*) FROM mpack_frames f JOIN mpack_refs r USING (mpack_id)"
                    f" WHERE r.repo_id = {rid}") > 1
    assert db.count(f"SELECT count(*) FROM mpack_index i JOIN mpack_refs r USING (mpack_id)"
                    f" WHERE r.repo_id = {rid} AND i.frame_no IS NULL") == 0


# ---------------------------------------------------------------------------
# every malformed v2 pack: 422, nothing written, nothing placed
# ---------------------------------------------------------------------------

def frame(blobs, codec="zstd", size=None, data=None, ids=None) -> dict:
    raw = b"".join(c for _, c in blobs)
    if data is None:
        data = zstandard.ZstdCompressor().compress(raw) if codec == "zstd" else raw
    return {"codec": codec, "size": len(raw) if size is None else size,
            "blobs": ids if ids is not None else [[o, len(c)] for o, c in blobs], "data": data}


def raw_v2(body: dict) -> bytes:
    return b"MUSE\x02" + msgpack.packb(body, use_bin_type=True)


def bad_bodies(h: muselib.History) -> dict:
    """Issue 13's bad inputs: name -> (pack body, words the 422 must name)."""
    pairs = [(b["object_id"], b["content"]) for b in h.blobs]
    half = len(pairs) // 2
    A, B = pairs[:half], pairs[half:]
    raw_a = b"".join(c for _, c in A)
    meta = {"commits": h.commits, "snapshots": h.snapshots}
    good_a, good_b = frame(A), frame(B)
    lying = [(B[0][0], A[0][1])] + A[1:]
    meta_frame = frame([], data=zstandard.ZstdCompressor().compress(msgpack.packb(meta, use_bin_type=True)))
    meta_frame["size"] = len(msgpack.packb(meta, use_bin_type=True))
    del meta_frame["blobs"]
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    return {
        "size not the lengths' sum": (dict(meta, frames=[frame(A, size=len(raw_a) + 1), good_b]),
                                      ["lengths add up to", "size says"]),
        "lengths over size": (dict(meta, frames=[frame(A, ids=[[o, len(c) + 7] for o, c in A]), good_b]),
                              ["lengths add up to"]),
        "several blobs over 64 MiB": (dict(meta, frames=[frame(A, size=65 << 20, ids=[[A[0][0], 64 << 20],
                                                                                   [A[1][0], 1 << 20]]), good_b]),
                                      ["is above the limit", "for a frame of 2 blobs"]),
        "decompresses to more": (dict(meta, frames=[frame(A, data=zstandard.ZstdCompressor().compress(
            raw_a + b"more")), good_b]), ["decompresses to more than size"]),
        "decompresses to fewer": (dict(meta, frames=[frame(A, data=zstandard.ZstdCompressor().compress(
            raw_a[:-5])), good_b]), ["decompresses to fewer than size"]),
        "zip bomb": (dict(meta, frames=[frame(A, data=bomb), good_b]), ["decompresses to more than size"]),
        "blobs in a v2 pack": (dict(meta, frames=[good_a, good_b], blobs=[]), ["blobs", "not allowed in a v2 pack"]),
        "both meta and plain keys": (dict(meta, meta=meta_frame, frames=[good_a, good_b]),
                                     ["both `meta` and plain"]),
        "blob not hashing to its id": (dict(meta, frames=[frame(lying), good_b]),
                                       ["does not hash to its object_id"]),
        "truncated frame data": (dict(meta, frames=[dict(good_a, data=good_a["data"][:-4]), good_b]),
                                 ["truncated"]),
        "not one zstd frame": (dict(meta, frames=[dict(good_a, data=good_a["data"] + b"\0\0\0\0"), good_b]),
                               ["frames[0]"]),
        "unknown codec": (dict(meta, frames=[dict(good_a, codec="lz4"), good_b]), ["codec"]),
        "no frames": (dict(meta), ["frames", "missing"]),
    }


CASES = list(bad_bodies(muselib.generate(commits=2, files=4, changed=1, blob_size=10)).keys())


def assert_nothing_written(server, db, repo, h, key):
    rid = sql_str(repo["repo_id"])
    for t in ("commit_refs", "snapshot_refs", "object_refs", "mpack_refs", "branches"):
        assert db.count(f"SELECT count(*) FROM {t} WHERE repo_id = {rid}") == 0, t
    for t, col, ids in (("commits", "commit_id", [c["commit_id"] for c in h.commits]),
                        ("snapshots", "snapshot_id", [s["snapshot_id"] for s in h.snapshots]),
                        ("objects", "object_id", [b["object_id"] for b in h.blobs])):
        q = ",".join(sql_str(i) for i in ids)
        assert db.count(f"SELECT count(*) FROM {t} WHERE {col} IN ({q})") == 0, t
    for t in ("mpacks", "mpack_frames", "mpack_index"):
        assert db.count(f"SELECT count(*) FROM {t} WHERE mpack_id = {sql_str(key)}") == 0, t
    assert not server.store_path(key).exists(), "placed under mpacks/"


@pytest.mark.parametrize("case", CASES)
def test_malformed_v2_pack_is_422_and_writes_nothing(server, hub, repo, db, case):
    h = hist(commits=4, files=6)
    body, words = bad_bodies(h)[case]
    data = raw_v2(body)
    key = stage(hub, repo["slug"], data)
    r = unpack(hub, repo["slug"], key, h.head)
    assert r.status_code == 422, (r.status_code, r.text)
    err = muselib.decode_body(r)
    assert err["error"] == "invalid_pack", err
    for w in words:
        assert w in err["detail"], (w, err["detail"])
    assert_nothing_written(server, db, repo, h, key)
    # the upload stays staged under its grant (a retry may use it)
    staging = db.scalar(f"SELECT staging_key FROM push_grants WHERE mpack_key = {sql_str(key)}")
    assert server.store_path(staging).exists()


def test_large_v2_pack_with_a_late_lying_blob_is_422_and_writes_nothing(server, hub, repo, db):
    """From 1 MiB on, the server hashes a v2 pack's blobs on a second
    thread while it decompresses the next ones (MH_PACKR_PARALLEL). A blob
    that lies in a late frame is still refused, named as a read on one
    thread names it, with nothing written; the honest pack is accepted."""
    h = muselib.generate(commits=4, files=40, changed=3, blob_size=50000, seed=unique("v2"))
    pairs = [(b["object_id"], b["content"]) for b in h.blobs]
    groups = [pairs[i:i + 4] for i in range(0, len(pairs), 4)]
    meta = {"commits": h.commits, "snapshots": h.snapshots}
    k = len(groups) - 2
    g = groups[k]
    flipped = g[1][1][:-1] + bytes([g[1][1][-1] ^ 1])
    frames = [frame(x, codec="zstd" if i % 4 == 0 else "none") for i, x in enumerate(groups)]
    frames[k] = frame([g[0], (g[1][0], flipped)] + g[2:], codec="none")
    data = raw_v2(dict(meta, frames=frames))
    assert len(data) > 1 << 20
    key = stage(hub, repo["slug"], data)
    r = unpack(hub, repo["slug"], key, h.head)
    assert r.status_code == 422, (r.status_code, r.text)
    err = muselib.decode_body(r)
    assert err["error"] == "invalid_pack", err
    assert f"frames[{k}].blobs[1] ({g[1][0]}): content does not hash to its object_id" in err["detail"], err
    assert_nothing_written(server, db, repo, h, key)
    frames[k] = frame(g, codec="none")
    good = raw_v2(dict(meta, frames=frames))
    key = stage(hub, repo["slug"], good)
    r = unpack(hub, repo["slug"], key, h.head)
    assert r.status_code == 200, (r.status_code, r.text)
    check_v2_rows(db, good, h)


def test_v2_over_max_unpacked_bytes_is_422(start_server):
    """MUSEHUB_MAX_UNPACKED_BYTES bounds a pack's decompressed total; the
    sizes are added as they are read, so nothing is decompressed."""
    srv = start_server(MUSEHUB_MAX_UNPACKED_BYTES="4096")
    hub = srv.hub()
    repo = hub.create_repo(OWNER, unique("unpacked"))
    h = hist(commits=6, files=20)
    data = v2pack(h)
    assert sum(fr["size"] for fr in body_of(data)["frames"]) > 4096
    key = stage(hub, repo["slug"], data)
    r = unpack(hub, repo["slug"], key, h.head)
    assert r.status_code == 422, r.text
    assert "limit" in r.json()["detail"], r.text
    assert_nothing_written(srv, srv.db, repo, h, key)
    hub.close()


# ---------------------------------------------------------------------------
# mpack.index on v2 packs
# ---------------------------------------------------------------------------

def test_index_job_on_a_staged_v2_pack(server, hub, repo, db):
    """An upload nobody verified: the job decompresses and hashes every
    blob, writes the v2 rows and places the pack."""
    h = hist(commits=10)
    data = v2pack(h, frame_bytes=2048)
    key = stage(hub, repo["slug"], data)
    done = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})
    assert done["status"] == "done", done
    assert done["result"]["objects_written"] == len(h.blobs)
    check_v2_rows(db, data, h)
    assert server.store_path(key).read_bytes() == data
    # the history itself can follow without the blobs (ghost guard passes)
    res = hub.push(OWNER, repo["slug"], muselib.build_mpack(h.commits, h.snapshots, []), "main", h.head)
    assert res["head"] == h.head and res["objects_written"] == 0


def test_index_job_refuses_a_v2_blob_that_lies(hub, repo, db):
    h = hist(commits=3, files=4)
    pairs = [(b["object_id"], b["content"]) for b in h.blobs]
    lying = [(pairs[1][0], pairs[0][1])] + pairs[1:]
    data = raw_v2({"frames": [frame(lying)]})
    key = stage(hub, repo["slug"], data)
    done = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})
    assert done["status"] == "failed" and done["attempt"] == 1, done
    assert "hash" in done["error"]
    for t in ("mpacks", "mpack_frames", "mpack_index"):
        assert db.count(f"SELECT count(*) FROM {t} WHERE mpack_id = {sql_str(key)}") == 0, t


def test_index_job_trusts_a_referenced_v2_pack(server, hub, repo, db):
    """A pack this repository references was verified when it entered:
    the job reads its structure and decompresses nothing (shown by
    corrupting a frame's compressed bytes behind the server's back)."""
    h = hist(commits=6)
    data = v2pack(h, frame_bytes=2048)
    hub.push(OWNER, repo["slug"], data, "main", h.head)
    key = muselib.blob_id(data)
    p = server.store_path(key)
    fr = body_of(data)["frames"][0]
    at = data.find(fr["data"]) + len(fr["data"]) // 2
    spoiled = bytearray(data)
    spoiled[at] ^= 0xFF
    p.write_bytes(bytes(spoiled))
    try:
        done = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})
        assert done["status"] == "done", done
        assert done["result"]["objects_written"] == 0
    finally:
        p.write_bytes(data)
