"""Server-side commits (SPEC 4.6), black box: POST /api/repos/{id}/commits.

Seed 004's BOS tests translated to the HTTP API and the store directory:
  BOS-1  a server-side commit's row has storage_uri NULL
  BOS-2  its snapshot row has storage_uri NULL (and is stored in delta form)
  BOS-3  its blobs get mpack:// storage URIs with byte ranges that are
         right inside the stored pack
  BOS-4  fetch serves those commits and snapshots from the database: the
         store holds no object per commit or snapshot, only the one pack
         of new blobs per commit (and the fetch's own pack)
(BOS-6, the merge commit, is in test_proposals.py.)

Every id the server returns is recomputed here with muselib (a second
implementation of SPEC 1), and every fetched pack is rebuilt and checked.
"""
from __future__ import annotations

import base64
import os
import threading

import pytest
import zstandard

import muselib
from e2e_util import packs_in_store, sql_str, unique

OWNER = "gabriel"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def commit(hub, repo, branch, files=None, remove=None, message="change", fmt="json",
           expect=(201,), **extra):
    """POST a server-side commit; files maps path -> bytes."""
    files = files or {}
    if fmt == "json":
        enc = {p: base64.b64encode(c).decode() for p, c in files.items()}
    else:
        enc = dict(files)
    body = {"branch": branch, "message": message, "files": enc, **extra}
    if remove is not None:
        body["remove"] = remove
    return hub.call("POST", f"/api/repos/{repo['repo_id']}/commits", body, fmt=fmt, expect=expect)


def tree(hub, repo, ref) -> dict[str, str]:
    t = hub.tree(OWNER, repo["slug"], ref)
    return {e["path"]: e["object_id"] for e in t["entries"]}


def manifest_of(files: dict[str, bytes]) -> dict[str, str]:
    return {p: muselib.blob_id(c) for p, c in files.items()}


def check_ids(res, parents, manifest, message, author="gabriel"):
    sid = muselib.snapshot_id(manifest)
    assert res["snapshot_id"] == sid
    cid = muselib.commit_id(parents, sid, message, res["committed_at"], author)
    assert res["commit_id"] == cid
    assert sorted(res["parent_ids"]) == sorted(parents)


# ---------------------------------------------------------------------------
# BOS-1..3: rows and the one pack
# ---------------------------------------------------------------------------

def test_root_commit_rows_and_pack(hub, db, repo, server):
    before = packs_in_store(server)
    files = {"a.py": b"x=1", "src/b.py": b"y=2\n", "empty.txt": b""}
    res = commit(hub, repo, "main", files, message="first")
    check_ids(res, [], manifest_of(files), "first")
    assert res["generation"] == 1 and res["branch"] == "main" and res["author"] == "gabriel"
    assert res["blobs_written"] == 3
    # committed_at: UTC ISO-8601 with microseconds, exactly as hashed
    assert res["committed_at"].endswith("+00:00") and "T" in res["committed_at"]
    assert len(res["committed_at"]) == len("2026-11-21T07:00:00.123456+00:00")

    cid, sid, mid = res["commit_id"], res["snapshot_id"], res["mpack_id"]
    # BOS-1 / BOS-2: database only
    # (NULLs are tested in SQL: e2e_util.DB.rows splits lines on its NULL marker)
    assert db.rows(f"SELECT storage_uri IS NULL, parent_commit_id IS NULL, generation, branch, message"
                   f" FROM commits WHERE commit_id = {sql_str(cid)}") == [("t", "t", "1", "main", "first")]
    assert db.rows(f"SELECT storage_uri IS NULL, parent_snapshot_id IS NULL, depth, entry_count FROM snapshots"
                   f" WHERE snapshot_id = {sql_str(sid)}") == [("t", "t", "0", "3")]
    rid = sql_str(repo["repo_id"])
    assert db.count(f"SELECT count(*) FROM commit_refs WHERE repo_id = {rid}") == 1
    assert db.count(f"SELECT count(*) FROM snapshot_refs WHERE repo_id = {rid}") == 1
    assert db.count(f"SELECT count(*) FROM object_refs WHERE repo_id = {rid}") == 3
    assert db.scalar(f"SELECT kind FROM mpacks WHERE mpack_id = {sql_str(mid)}") == "commit"
    assert db.count(f"SELECT count(*) FROM mpack_refs WHERE repo_id = {rid} AND mpack_id = {sql_str(mid)}") == 1

    # exactly one new pack in the store, named by its hash: a v2 pack
    # (SPEC 2.1, 4.6) of blobs only, in path order
    after = packs_in_store(server)
    assert after - before == {mid[len("sha256:"):]}
    data = server.store_path(mid).read_bytes()
    assert muselib.blob_id(data) == mid and data[:5] == b"MUSE\x02"
    pack = muselib.parse_mpack(data)
    assert pack["version"] == 2 and pack["commits"] == [] and pack["snapshots"] == []
    ids = [b["object_id"] for b in pack["blobs"]]
    assert ids == [muselib.blob_id(files[p]) for p in sorted(files)]
    frames = db.rows(f"SELECT frame_no, data_offset, data_length, codec, size, blob_count FROM mpack_frames"
                     f" WHERE mpack_id = {sql_str(mid)} ORDER BY frame_no")
    assert len(frames) == 1 and frames[0][0] == "0" and frames[0][5] == "3"
    foff, flen, codec, fsize = int(frames[0][1]), int(frames[0][2]), frames[0][3], int(frames[0][4])
    fdata = data[foff:foff + flen]
    frame = fdata if codec == "none" else zstandard.ZstdDecompressor().decompress(fdata)
    assert len(frame) == fsize == sum(len(c) for c in files.values())
    # BOS-3: mpack:// URIs (SPEC 2.1's frame form) whose ranges hold the content
    for p, content in files.items():
        oid = muselib.blob_id(content)
        uri = db.scalar(f"SELECT storage_uri FROM objects WHERE object_id = {sql_str(oid)}")
        assert uri.startswith(f"mpack://{mid}#{foff}:{flen}/"), uri
        off, ln = map(int, uri.split("/", 3)[3].split(":"))
        assert frame[off:off + ln] == content
        assert db.rows(f"SELECT byte_offset, byte_length, frame_no FROM mpack_index WHERE object_id = {sql_str(oid)}"
                       f" AND mpack_id = {sql_str(mid)}") == [(str(off), str(ln), "0")]
        r = hub.object(OWNER, repo["slug"], oid)
        assert r.status_code == 200 and r.content == content
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": cid}
    assert tree(hub, repo, "main") == manifest_of(files)


def test_second_commit_delta_and_only_new_blobs(hub, db, repo, server):
    first = {"a.py": b"x=1", "b.py": b"y=2", "c.py": b"z=3"}
    r1 = commit(hub, repo, "main", first, message="one")
    before = packs_in_store(server)
    # msgpack body: contents as bin
    r2 = commit(hub, repo, "main", {"a.py": b"x=100", "d/e.py": b"y=2"}, remove=["c.py"],
                message="two", fmt="msgpack")
    m2 = {"a.py": muselib.blob_id(b"x=100"), "b.py": muselib.blob_id(b"y=2"),
          "d/e.py": muselib.blob_id(b"y=2")}
    check_ids(r2, [r1["commit_id"]], m2, "two")
    assert r2["generation"] == 2
    # only x=100 is new (y=2 is already referenced): one blob in one pack
    assert r2["blobs_written"] == 1
    assert packs_in_store(server) - before == {r2["mpack_id"][len("sha256:"):]}
    pack = muselib.parse_mpack(server.store_path(r2["mpack_id"]).read_bytes())
    assert [b["content"] for b in pack["blobs"]] == [b"x=100"]
    # the snapshot row is a delta against the parent's
    row = db.rows(f"SELECT parent_snapshot_id, depth, entry_count, storage_uri IS NULL, checkpoint IS NULL"
                  f" FROM snapshots WHERE snapshot_id = {sql_str(r2['snapshot_id'])}")
    assert row == [(r1["snapshot_id"], "1", "3", "t", "t")]
    assert db.scalar(f"SELECT parent_commit_id FROM commits WHERE commit_id = {sql_str(r2['commit_id'])}") \
        == r1["commit_id"]
    assert tree(hub, repo, "main") == m2
    c = hub.commit(OWNER, repo["slug"], r2["commit_id"])
    assert c["generation"] == 2 and c["parent_ids"] == [r1["commit_id"]]


def test_commit_without_new_blobs_writes_no_pack(hub, db, repo, server):
    r1 = commit(hub, repo, "main", {"a": b"1", "b": b"2"}, message="one")
    before = packs_in_store(server)
    packs_before = db.count("SELECT count(*) FROM mpacks")
    # remove only; then re-add known content at a new path
    r2 = commit(hub, repo, "main", remove=["b"], message="two")
    r3 = commit(hub, repo, "main", {"c": b"2"}, message="three")
    for r in (r2, r3):
        assert r["mpack_id"] is None and r["blobs_written"] == 0
    assert packs_in_store(server) == before
    assert db.count("SELECT count(*) FROM mpacks") == packs_before
    assert tree(hub, repo, "main") == {"a": muselib.blob_id(b"1"), "c": muselib.blob_id(b"2")}
    assert r3["generation"] == 3 and r3["parent_ids"] == [r2["commit_id"]]
    assert r2["parent_ids"] == [r1["commit_id"]]


def test_empty_change_reuses_snapshot(hub, db, repo):
    content = unique("same").encode()
    r1 = commit(hub, repo, "main", {"a": content}, message="one")
    n = db.count("SELECT count(*) FROM snapshots")
    r2 = commit(hub, repo, "main", {"a": content}, message="same tree")
    assert r2["snapshot_id"] == r1["snapshot_id"] and r2["commit_id"] != r1["commit_id"]
    assert r2["parent_ids"] == [r1["commit_id"]] and r2["mpack_id"] is None
    assert db.count("SELECT count(*) FROM snapshots") == n
    # the row was not rewritten into a delta against itself
    assert db.scalar(f"SELECT parent_snapshot_id IS NULL FROM snapshots"
                     f" WHERE snapshot_id = {sql_str(r1['snapshot_id'])}") == "t"
    assert db.count("SELECT count(*) FROM snapshots WHERE parent_snapshot_id = snapshot_id") == 0


def test_blob_known_to_other_repo_is_packed_again(hub, db, make_repo, server):
    """Objects are deduplicated globally but reached through ref rows: a blob
    another repository holds is still new for this one (and gets a ref)."""
    content = unique("shared").encode()
    a, b = make_repo(), make_repo()
    ra = commit(hub, a, "main", {"x": content, "y": b"a-only" + content})
    before = packs_in_store(server)
    rb = commit(hub, b, "main", {"x": content})
    assert rb["blobs_written"] == 1 and rb["mpack_id"] not in (None, ra["mpack_id"])
    assert packs_in_store(server) - before == {rb["mpack_id"][len("sha256:"):]}
    oid = muselib.blob_id(content)
    assert db.count(f"SELECT count(*) FROM object_refs WHERE object_id = {sql_str(oid)}") == 2
    assert db.count(f"SELECT count(*) FROM mpack_index WHERE object_id = {sql_str(oid)}") == 2
    assert hub.object(OWNER, b["slug"], oid).content == content


def test_checkpoint_every_64_links(hub, db, repo):
    heads = []
    for i in range(66):
        heads.append(commit(hub, repo, "main", {"f": f"v{i}".encode(), "g": b"same"},
                            message=f"c{i}", fmt="msgpack"))
    depth = {r["snapshot_id"]: db.rows(f"SELECT depth, checkpoint IS NOT NULL FROM snapshots"
                                       f" WHERE snapshot_id = {sql_str(r['snapshot_id'])}")[0]
             for r in heads}
    seq = [depth[r["snapshot_id"]] for r in heads]
    assert seq[0] == ("0", "f")                     # root
    assert seq[63] == ("63", "f")
    assert seq[64] == ("0", "t")                    # 64th link: a checkpoint
    assert seq[65] == ("1", "f")
    assert tree(hub, repo, "main") == {"f": muselib.blob_id(b"v65"), "g": muselib.blob_id(b"same")}
    out = hub.clone(OWNER, repo["slug"], [heads[-1]["commit_id"]])
    assert out["manifests"][heads[-1]["snapshot_id"]] == tree(hub, repo, "main")


# ---------------------------------------------------------------------------
# BOS-4: commit then fetch
# ---------------------------------------------------------------------------

def test_commit_then_fetch(hub, db, repo, server):
    files1 = {f"src/f{i}.txt": f"content {i}".encode() for i in range(20)}
    r1 = commit(hub, repo, "main", files1, message="import")
    r2 = commit(hub, repo, "main", {"src/f3.txt": b"changed", "new.txt": b"new"}, remove=["src/f7.txt"],
                message="edit", fmt="msgpack")
    before = packs_in_store(server)
    out = hub.clone(OWNER, repo["slug"], [r2["commit_id"]])
    res, pack = out["result"], out["pack"]
    assert (res["commit_count"], res["snapshot_count"]) == (2, 2)
    assert res["blob_count"] == 22
    # the commits come back verbatim (ids recomputed by muselib.rebuild_and_verify)
    got = {c["commit_id"]: c for c in pack["commits"]}
    assert set(got) == {r1["commit_id"], r2["commit_id"]}
    c2 = got[r2["commit_id"]]
    assert (c2["parent_commit_id"], c2["message"], c2["author"], c2["committed_at"], c2["branch"]) == \
        (r1["commit_id"], "edit", "gabriel", r2["committed_at"], "main")
    m2 = dict(manifest_of(files1))
    m2.update(manifest_of({"src/f3.txt": b"changed", "new.txt": b"new"}))
    del m2["src/f7.txt"]
    assert out["manifests"][r2["snapshot_id"]] == m2
    contents = {b["object_id"]: b["content"] for b in pack["blobs"]}
    assert contents[muselib.blob_id(b"changed")] == b"changed"
    # BOS-4: the only object the fetch added to the store is its own pack
    assert packs_in_store(server) - before == {res["mpack_id"][len("sha256:"):]}
    for cid in (r1["commit_id"], r2["commit_id"]):
        assert not server.store_path(f"mpacks/{cid[len('sha256:'):]}").exists()
    assert db.count("SELECT count(*) FROM commits WHERE storage_uri IS NOT NULL") == 0
    assert db.count("SELECT count(*) FROM snapshots WHERE storage_uri IS NOT NULL") == 0
    # incremental fetch from the first commit: a delta snapshot, only new blobs
    inc = hub.clone(OWNER, repo["slug"], [r2["commit_id"]], have=[r1["commit_id"]],
                    known_manifests={r1["snapshot_id"]: manifest_of(files1)})
    assert inc["result"]["commit_count"] == 1 and inc["result"]["blob_count"] == 2
    assert inc["manifests"][r2["snapshot_id"]] == m2


def test_commit_packs_consolidate_with_gc(hub, db, repo):
    """Packs of server-side commits are ordinary packs (kind `commit`): the
    GC job consolidates them and everything still fetches."""
    import time
    rs = [commit(hub, repo, "main", {f"f{i}": f"v{i}".encode()}, message=f"c{i}") for i in range(3)]
    rid = sql_str(repo["repo_id"])
    assert db.count(f"SELECT count(*) FROM mpack_refs WHERE repo_id = {rid}") == 3
    job = hub.call("POST", f"/api/repos/{repo['repo_id']}/jobs", {"job_type": "mpack.gc"}, expect=(202,))
    deadline = time.monotonic() + 60
    while True:
        j = hub.call("GET", f"/api/jobs/{job['job_id']}")
        if j["status"] in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert j["status"] == "done", j
    assert (j["result"]["packs_before"], j["result"]["packs_after"]) == (3, 1)
    out = hub.clone(OWNER, repo["slug"], [rs[-1]["commit_id"]])
    assert out["manifests"][rs[-1]["snapshot_id"]] == {f"f{i}": muselib.blob_id(f"v{i}".encode()) for i in range(3)}
    # a commit after the GC packs only its own new blob
    r = commit(hub, repo, "main", {"f0": b"v1", "g": b"new after gc"})
    assert r["blobs_written"] == 1


def test_push_then_server_commit_then_push(hub, repo):
    """Server-side commits and pushed history mix: a client builds on a
    server-made commit and pushes on top of it."""
    h = muselib.generate(commits=2, files=3, changed=1, blob_size=8, seed=unique("p"))
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    r = commit(hub, repo, "main", {"src/file_0000.py": b"server edit"}, message="server")
    assert r["parent_ids"] == [h.head]
    m = dict(h.manifest)
    m["src/file_0000.py"] = muselib.blob_id(b"server edit")
    assert tree(hub, repo, "main") == m
    nxt = muselib.generate(commits=1, files=3, changed=1, blob_size=8, seed=unique("q"),
                           parent=(r["commit_id"], m), first_index=5)
    res = hub.push(OWNER, repo["slug"], nxt.pack(), "main", nxt.head)
    assert res["head"] == nxt.head


# ---------------------------------------------------------------------------
# branches, compare-and-swap, races
# ---------------------------------------------------------------------------

def test_new_branch_starts_at_default_head(hub, db, repo):
    r1 = commit(hub, repo, "main", {"a": b"1"})
    r2 = commit(hub, repo, "feature/x", {"b": b"2"}, message="on feature")
    assert r2["parent_ids"] == [r1["commit_id"]] and r2["branch"] == "feature/x"
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": r1["commit_id"],
                                                             "feature/x": r2["commit_id"]}
    assert tree(hub, repo, "feature/x") == manifest_of({"a": b"1", "b": b"2"})
    assert db.scalar(f"SELECT branch FROM commits WHERE commit_id = {sql_str(r2['commit_id'])}") == "feature/x"


def test_initialized_repo_builds_on_initial_commit(hub, make_repo):
    r = make_repo(initialize=True)
    init = hub.refs(OWNER, r["slug"])["branch_heads"]["main"]
    res = commit(hub, r, "main", {"README": b"hi"})
    assert res["parent_ids"] == [init] and res["generation"] == 2


def test_expected_head(hub, db, repo, server):
    r1 = commit(hub, repo, "main", {"a": b"1"})
    r2 = commit(hub, repo, "main", {"a": b"2"}, expected_head=r1["commit_id"])
    assert r2["parent_ids"] == [r1["commit_id"]]
    n = db.count("SELECT count(*) FROM commits")
    before = packs_in_store(server)
    err = commit(hub, repo, "main", {"a": b"3"}, expected_head=r1["commit_id"], expect=(409,))
    assert err["error"] == "stale_head"
    # on a branch that does not exist
    err = commit(hub, repo, "nobranch", {"a": b"4"}, expected_head=r1["commit_id"], expect=(409,))
    assert err["error"] == "stale_head"
    assert db.count("SELECT count(*) FROM commits") == n
    assert packs_in_store(server) == before
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": r2["commit_id"]}


def race(server, repo, bodies):
    """POST the bodies at once (one client each); returns [(status, json)]."""
    hubs = [server.hub() for _ in bodies]
    barrier = threading.Barrier(len(bodies))
    out: list = [None] * len(bodies)

    def go(i):
        barrier.wait(10)
        r = hubs[i].raw("POST", f"/api/repos/{repo['repo_id']}/commits", bodies[i], fmt="json")
        out[i] = (r.status_code, r.json())

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for h in hubs:
        h.close()
    return out


def b64(c: bytes) -> str:
    return base64.b64encode(c).decode()


def test_concurrent_commits_one_wins(hub, db, repo, server):
    head = commit(hub, repo, "main", {"a": b"0"})["commit_id"]
    for rnd in range(10):
        before_packs = packs_in_store(server)
        n_commits = db.count("SELECT count(*) FROM commits")
        bodies = [{"branch": "main", "message": f"r{rnd}-{i}", "expected_head": head,
                   "files": {"a": b64(f"{rnd}-{i}".encode())}} for i in range(6)]
        out = race(server, repo, bodies)
        codes = sorted(s for s, _ in out)
        assert codes == [201] + [409] * 5, (rnd, out)
        win = next(j for s, j in out if s == 201)
        assert all(j["error"] == "stale_head" for s, j in out if s == 409)
        assert win["parent_ids"] == [head]
        # nothing of the losers was written: one commit, one pack
        assert db.count("SELECT count(*) FROM commits") == n_commits + 1
        assert packs_in_store(server) - before_packs == {win["mpack_id"][len("sha256:"):]}
        head = win["commit_id"]
        assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": head}


def test_concurrent_commits_without_expected_head_chain(hub, db, repo, server):
    """Without expected_head a commit that overlaps a winner loses (409); one
    that runs after it builds on it. Either way the history is a chain."""
    r0 = commit(hub, repo, "main", {"a": b"0"})
    bodies = [{"branch": "main", "message": f"m{i}", "files": {f"f{i}": b64(b"x%d" % i)}} for i in range(8)]
    out = race(server, repo, bodies)
    wins = [j for s, j in out if s == 201]
    assert all(s in (201, 409) for s, _ in out) and wins, out
    by_parent = {j["parent_ids"][0]: j for j in wins}
    assert len(by_parent) == len(wins)        # no two winners share a parent
    cur, chain = r0["commit_id"], 0
    while cur in by_parent:
        cur = by_parent[cur]["commit_id"]
        chain += 1
    assert chain == len(wins)
    assert hub.refs(OWNER, repo["slug"])["branch_heads"]["main"] == cur
    out2 = hub.clone(OWNER, repo["slug"], [cur])
    assert out2["result"]["commit_count"] == 1 + len(wins)


def test_concurrent_new_branch_creation(hub, db, repo, server):
    commit(hub, repo, "main", {"a": b"0"})
    bodies = [{"branch": "fresh", "message": f"n{i}", "files": {"b": b64(b"%d" % i)}} for i in range(5)]
    out = race(server, repo, bodies)
    codes = [s for s, _ in out]
    assert codes.count(201) >= 1 and set(codes) <= {201, 409}, out
    head = hub.refs(OWNER, repo["slug"])["branch_heads"]["fresh"]
    assert head in {j["commit_id"] for s, j in out if s == 201}


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/abs", "a//b", "a/../b", "./a", "trail/", "", "a/./b", "x" * 4097])
def test_bad_path_422(hub, repo, path):
    err = commit(hub, repo, "main", {path: b"1"}, expect=(422,))
    assert err["error"] == "invalid_path"


def test_validation_422(hub, db, repo, server):
    commit(hub, repo, "main", {"a": b"1"})
    before = packs_in_store(server)
    n = db.count("SELECT count(*) FROM commits")
    rid = repo["repo_id"]
    cases = [
        {"message": "m", "files": {}},                                         # no branch
        {"branch": "bad..name", "message": "m", "files": {}},
        {"branch": "main", "files": {}},                                       # no message
        {"branch": "main", "message": "a\u0000b", "files": {}},                # NUL
        {"branch": "main", "message": "m"},                                    # no files
        {"branch": "main", "message": "m", "files": []},
        {"branch": "main", "message": "m", "files": {"a": "not base64!!"}},
        {"branch": "main", "message": "m", "files": {"a": 5}},
        {"branch": "main", "message": "m", "files": {}, "remove": ["nope"]},   # absent path
        {"branch": "main", "message": "m", "files": {"a": b64(b"2")}, "remove": ["a"]},
        {"branch": "main", "message": "m", "files": {}, "remove": "a"},
        {"branch": "main", "message": "m", "files": {}, "remove": ["a", "a"]},
        {"branch": "main", "message": "m", "files": {}, "expected_head": "sha256:xyz"},
        {"branch": "main", "message": "m", "files": {}, "author": ""},
    ]
    for body in cases:
        r = hub.raw("POST", f"/api/repos/{rid}/commits", body, fmt="json")
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert r.json()["error"] and r.json()["detail"]
    # duplicate path in a msgpack map (JSON rejects duplicate keys itself)
    import msgpack
    raw = (b"\x83" + msgpack.packb("branch") + msgpack.packb("main") + msgpack.packb("message")
           + msgpack.packb("m") + msgpack.packb("files") + b"\x82"
           + msgpack.packb("d") + msgpack.packb(b"1", use_bin_type=True)
           + msgpack.packb("d") + msgpack.packb(b"2", use_bin_type=True))
    r = hub.raw("POST", f"/api/repos/{rid}/commits", content=raw,
                headers={"Content-Type": "application/x-msgpack"})
    assert r.status_code == 422, r.text
    assert db.count("SELECT count(*) FROM commits") == n
    assert packs_in_store(server) == before


def test_base64_lengths_and_padding(hub, repo):
    """Every content length mod 3, padded and unpadded base64; bytes come
    back exactly through the object endpoint."""
    files = {f"len{n}": bytes(range(256))[:n] + b"\xff" * (n // 7) for n in range(12)}
    body = {"branch": "main", "message": "lengths", "files": {p: b64(c) for p, c in files.items()}}
    body["files"]["unpadded"] = b64(b"ab").rstrip("=")
    files["unpadded"] = b"ab"
    res = hub.call("POST", f"/api/repos/{repo['repo_id']}/commits", body, fmt="json", expect=(201,))
    check_ids(res, [], manifest_of(files), "lengths")
    for p, c in files.items():
        assert hub.object(OWNER, repo["slug"], muselib.blob_id(c)).content == c, p
    for bad in ("QUJD=", "Q===", "QU=J", "QUJD\n", "QUJ-"):
        r = hub.raw("POST", f"/api/repos/{repo['repo_id']}/commits",
                    {"branch": "main", "message": "m", "files": {"x": bad}}, fmt="json")
        assert r.status_code == 422, (bad, r.text)


def test_author_and_msgpack_base64_string(hub, repo):
    res = commit(hub, repo, "main", {"a": b64(b"hello")}, fmt="msgpack", author="someone else",
                 message="by someone")
    check_ids(res, [], manifest_of({"a": b"hello"}), "by someone", author="someone else")


def test_unknown_repo_and_anonymous(hub, anon_hub, repo):
    body = {"branch": "main", "message": "m", "files": {}}
    r = hub.raw("POST", f"/api/repos/sha256:{'0' * 64}/commits", body)
    assert r.status_code == 404
    r = anon_hub.raw("POST", f"/api/repos/{repo['repo_id']}/commits", body)
    assert r.status_code == 401


def test_new_contents_over_max_mpack_bytes_413(start_server):
    srv = start_server(MUSEHUB_MAX_MPACK_BYTES="1000")
    h = srv.hub()
    r = h.create_repo(OWNER, unique("big"))
    commit(h, r, "main", {"small": b"x" * 500})
    err = commit(h, r, "main", {"big": b"y" * 2000}, expect=(413,))
    assert err["error"] == "too_large"
    h.close()


@pytest.mark.slow
def test_large_commit(hub, repo, server):
    """A commit near the body limit (JSON base64: ~40 MiB of contents)."""
    files = {f"blob{i}.bin": os.urandom(1 << 20) for i in range(40)}
    res = commit(hub, repo, "main", files, message="large")
    assert res["blobs_written"] == 40
    data = server.store_path(res["mpack_id"]).read_bytes()
    assert muselib.blob_id(data) == res["mpack_id"]
    assert hub.object(OWNER, repo["slug"], muselib.blob_id(files["blob7.bin"])).content == files["blob7.bin"]
