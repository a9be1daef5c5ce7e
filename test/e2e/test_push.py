"""SPEC 4.3 push: the seed-000 push at full size, re-pushes, incremental
pushes, every rejected input with its status, and racing pushes.

After every refused push the repository must be untouched: refs unchanged,
no ref rows, and none of the pack's commits/snapshots/objects written
globally either (nothing half-written)."""
from __future__ import annotations

import copy
import os
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

import muselib
from e2e_util import RawHTTP, repo_counts, sql_str, unique

OWNER = "gabriel"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def small(seed: str | None = None, commits: int = 3, **kw) -> muselib.History:
    """A small distinct history (4 files of ~30 bytes, 1 change per commit)."""
    return muselib.generate(commits=commits, files=4, changed=1, blob_size=16,
                            seed=seed or unique("h"), **kw)


def stage(hub: muselib.Hub, slug: str, data: bytes) -> str:
    """Presign and upload; returns the key (the pack is staged, not unpacked)."""
    key = muselib.blob_id(data)
    pre = hub.presign(OWNER, slug, key, len(data))
    assert not pre["already_present"]
    hub.upload(pre.get("upload_url") or pre["uploadUrl"], data)
    return key


def try_push(hub, slug, data, head, branch="main", **kw):
    """Stage and unpack; returns the unpack httpx response (any status)."""
    key = stage(hub, slug, data)
    body = {"mpack_key": key, "branch": branch, "head": head}
    body.update(kw)
    return hub.raw("POST", f"/{OWNER}/{slug}/push/unpack-mpack", body)


def rebuild(commits, snapshots, blobs, branch_heads=None, version=1) -> bytes:
    return muselib.build_mpack(commits, snapshots, blobs, branch_heads, version=version)


def reid_commit(c: dict) -> dict:
    c["commit_id"] = muselib.commit_id_of(c)
    return c


def root_pack(manifest: dict, blobs: list, message: str = "root",
              parent: str | None = None, author: str = OWNER,
              committed_at: str = "2026-02-01T00:00:00+00:00") -> tuple[bytes, str]:
    """A one-commit pack whose snapshot is a root with `manifest`; ids are
    computed correctly from whatever it is given.  Returns (bytes, head)."""
    sid = muselib.snapshot_id(manifest)
    snap = {"snapshot_id": sid, "parent_snapshot_id": None,
            "delta_upsert": manifest, "delta_remove": []}
    c = reid_commit({"commit_id": "", "parent_commit_id": parent,
                     "parent2_commit_id": None, "snapshot_id": sid,
                     "message": message, "author": author,
                     "committed_at": committed_at, "branch": "main"})
    return rebuild([c], [snap], blobs), c["commit_id"]


def assert_untouched(hub, db, repo, before_refs=None, pack=None):
    """Refs as before (default: none), no ref rows (when there were none),
    and nothing of `pack` (a parsed mpack dict or bytes) written globally."""
    refs = hub.refs(OWNER, repo["slug"])
    assert refs["branch_heads"] == (before_refs or {})
    if not before_refs:
        assert repo_counts(db, repo["repo_id"]) == {
            "commit_refs": 0, "snapshot_refs": 0, "object_refs": 0, "branches": 0}
    if pack is not None:
        if isinstance(pack, (bytes, bytearray)):
            try:
                pack = muselib.parse_mpack(pack)
            except ValueError:
                return
        for table, col, ids in (
                ("commits", "commit_id", [c.get("commit_id") for c in pack["commits"]]),
                ("snapshots", "snapshot_id", [s.get("snapshot_id") for s in pack["snapshots"]])):
            ids = [i for i in ids if isinstance(i, str)]
            if ids:
                q = ",".join(sql_str(i) for i in ids)
                assert db.count(f"SELECT count(*) FROM {table} WHERE {col} IN ({q})") == 0, table


def expect_refused(hub, db, repo, data, head, status, before=None, **kw):
    r = try_push(hub, repo["slug"], data, head, **kw)
    assert r.status_code == status, (r.status_code, r.text)
    err = muselib.decode_body(r)
    assert isinstance(err, dict) and "error" in err, err
    assert_untouched(hub, db, repo, before, data)
    return r


# ---------------------------------------------------------------------------
# seed 000 at full size
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_seed000_full_push(hub, db, repo, seed000, server):
    data = seed000.pack()
    res = hub.push(OWNER, repo["slug"], data, "main", seed000.head)
    t = res["timings"]
    print(f"\n seed000 push: {len(data) // 1024} KiB, presign {t['presign'] * 1000:.0f} ms, "
          f"upload {t['upload'] * 1000:.0f} ms, unpack {t['unpack'] * 1000:.0f} ms "
          f"(server {res.get('elapsed_ms')} ms)")
    assert res["commits_written"] == 1031
    assert res["snapshots_written"] == 1031
    assert res["objects_written"] == len(seed000.blobs) == 700 + 1031 * 5
    assert res["branch"] == "main"
    assert res["head"] == seed000.head
    assert isinstance(res["elapsed_ms"], (int, float))
    assert sum(t.values()) < 60.0   # seed 000's gate

    refs = hub.refs(OWNER, repo["slug"])
    assert refs["branch_heads"] == {"main": seed000.head}
    rid = sql_str(repo["repo_id"])
    assert repo_counts(db, repo["repo_id"]) == {
        "commit_refs": 1031, "snapshot_refs": 1031, "object_refs": 5855, "branches": 1}
    assert db.scalar(f"SELECT head_commit_id FROM branches WHERE repo_id = {rid} "
                     f"AND name = 'main'") == seed000.head
    # commits and snapshots live in the database only
    assert db.count(f"SELECT count(*) FROM commits c JOIN commit_refs r USING (commit_id) "
                    f"WHERE r.repo_id = {rid} AND c.storage_uri IS NOT NULL") == 0
    assert db.count(f"SELECT count(*) FROM snapshots s JOIN snapshot_refs r "
                    f"USING (snapshot_id) WHERE r.repo_id = {rid} "
                    f"AND s.storage_uri IS NOT NULL") == 0
    # every blob: an mpack:// URI and an index row whose byte range, read
    # from the pack we sent, hashes to the object id
    key = muselib.blob_id(data)
    rows = db.rows(f"SELECT o.object_id, o.storage_uri FROM objects o JOIN object_refs r "
                   f"USING (object_id) WHERE r.repo_id = {rid}")
    assert len(rows) == 5855
    for oid, uri in rows:
        assert uri.startswith(f"mpack://{key}#"), uri
        off, length = map(int, uri.split("#", 1)[1].split(":"))
        assert muselib.blob_id(data[off:off + length]) == oid
    idx = db.rows(f"SELECT object_id, byte_offset, byte_length FROM mpack_index "
                  f"WHERE mpack_id = {sql_str(key)}")
    assert len(idx) == 5855
    for oid, off, length in idx:
        assert muselib.blob_id(data[int(off):int(off) + int(length)]) == oid


def test_pack_stored_under_mpacks_key(hub, repo, server):
    h = small()
    data = h.pack()
    hub.push(OWNER, repo["slug"], data, "main", h.head)
    assert server.store_path(muselib.blob_id(data)).read_bytes() == data
    # nothing left in staging once the grant is consumed
    inc = server.store_path("incoming/x").parent
    for name in (os.listdir(inc) if os.path.isdir(inc) else []):
        with open(os.path.join(inc, name), "rb") as fh:
            assert fh.read() != data, f"staged copy {name} left behind"


@pytest.mark.slow
def test_same_pack_again_writes_zeros(hub, repo, seed000):
    data = seed000.pack()
    hub.push(OWNER, repo["slug"], data, "main", seed000.head)
    again = hub.push(OWNER, repo["slug"], data, "main", seed000.head)
    assert again["already_present"] is True        # no upload on a re-push
    assert (again["commits_written"], again["snapshots_written"],
            again["objects_written"]) == (0, 0, 0)
    assert again["head"] == seed000.head
    # the bare unpack re-run is a no-op too
    res = hub.unpack(OWNER, repo["slug"], again["mpack_key"], "main", seed000.head)
    assert res["commits_written"] == 0 and res["head"] == seed000.head


@pytest.mark.slow
def test_same_history_to_second_repo_full_counts(hub, make_repo, seed000):
    a, b = make_repo(), make_repo()
    data = seed000.pack()
    hub.push(OWNER, a["slug"], data, "main", seed000.head)
    pre = hub.presign(OWNER, b["slug"], muselib.blob_id(data), len(data))
    assert pre["already_present"] is False   # B never referenced it: must upload
    res = hub.push(OWNER, b["slug"], data, "main", seed000.head)
    assert res["already_present"] is False
    assert (res["commits_written"], res["snapshots_written"],
            res["objects_written"]) == (1031, 1031, 5855)


@pytest.mark.slow
def test_incremental_push_on_top(hub, db, repo, seed000):
    hub.push(OWNER, repo["slug"], seed000.pack(), "main", seed000.head)
    inc = muselib.generate(commits=10, parent=(seed000.head, seed000.manifest),
                           first_index=1031)
    assert inc.snapshots[0]["parent_snapshot_id"] == seed000.commits[-1]["snapshot_id"]
    res = hub.push(OWNER, repo["slug"], inc.pack(), "main", inc.head)
    assert (res["commits_written"], res["snapshots_written"],
            res["objects_written"]) == (10, 10, 50)
    assert hub.refs(OWNER, repo["slug"])["branch_heads"]["main"] == inc.head
    assert repo_counts(db, repo["repo_id"])["commit_refs"] == 1041


def test_small_push_and_incremental(hub, repo):
    h = small(commits=5)
    res = hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    assert (res["commits_written"], res["snapshots_written"],
            res["objects_written"]) == (5, 5, len(h.blobs))
    h2 = small(commits=2, parent=(h.head, h.manifest), first_index=5)
    res = hub.push(OWNER, repo["slug"], h2.pack(), "main", h2.head)
    assert (res["commits_written"], res["snapshots_written"]) == (2, 2)
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": h2.head}


def test_pack_listing_commits_and_blobs_twice(hub, db, repo):
    """A pack may list a commit or a blob twice (the same id: the same
    content); each is written once (the server's COPY rows hold each id
    once, in id order, and the inserts rely on it)."""
    h = small(commits=6)
    dup = h.commits + h.commits[::-1][:3]
    data = rebuild(dup, h.snapshots, h.blobs + h.blobs[:2])
    res = hub.push(OWNER, repo["slug"], data, "main", h.head)
    assert (res["commits_written"], res["snapshots_written"], res["objects_written"]) == (6, 6, len(h.blobs))
    counts = repo_counts(db, repo["repo_id"])
    assert (counts["commit_refs"], counts["object_refs"]) == (6, len(h.blobs))
    ids = ",".join(sql_str(c["commit_id"]) for c in h.commits)
    assert db.count(f"SELECT count(*) FROM commits WHERE commit_id IN ({ids})") == 6
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": h.head}


def test_move_5000_files_without_blobs(server, repo):
    """Regression (hardening 15.2): a commit that moves 5,000 files to a new
    directory resends none of their blobs, so its snapshot names 5,000
    objects that are outside the pack.  Unpack collected them in an id set
    of fixed capacity 4096 that probed forever on the 4097th id: the
    request never answered and a thread-pool thread was lost for good
    (four such pushes stopped the pool)."""
    n = 5000
    hub = server.hub(timeout=120)
    try:
        blobs, old = {}, {}
        for i in range(n):
            data = f"file {i}\n".encode()
            oid = muselib.blob_id(data)
            blobs[oid] = data
            old[f"old/f{i:05d}.txt"] = oid
        pack1, head1 = root_pack(old, blobs)
        res = hub.push(OWNER, repo["slug"], pack1, "main", head1)
        assert res["objects_written"] == n
        new = {"new/" + p[len("old/"):]: o for p, o in old.items()}
        sid0, sid1 = muselib.snapshot_id(old), muselib.snapshot_id(new)
        snap = muselib.snapshot_map(sid1, sid0, old, new)
        assert len(snap["delta_upsert"]) == n and len(snap["delta_remove"]) == n
        c = reid_commit({"commit_id": "", "parent_commit_id": head1, "parent2_commit_id": None,
                         "snapshot_id": sid1, "message": "move everything", "author": OWNER,
                         "committed_at": "2026-02-02T00:00:00+00:00", "branch": "main"})
        res = hub.push(OWNER, repo["slug"], rebuild([c], [snap], []), "main", c["commit_id"])
        assert (res["commits_written"], res["snapshots_written"], res["objects_written"]) == (1, 1, 0)
        tree = hub.tree(OWNER, repo["slug"], "main")
        assert tree["snapshot_id"] == sid1 and len(tree["entries"]) == n
        assert all(e["path"].startswith("new/") for e in tree["entries"])
    finally:
        hub.close()


def test_v0_pack(hub, repo):
    h = small(commits=4)
    data = h.pack(version=0)
    assert not data.startswith(b"MUSE")
    res = hub.push(OWNER, repo["slug"], data, "main", h.head)
    assert res["commits_written"] == 4
    assert hub.refs(OWNER, repo["slug"])["branch_heads"]["main"] == h.head


def test_objects_synonym(hub, repo):
    h = small()
    res = hub.push(OWNER, repo["slug"], h.pack(blobs_key="objects"), "main", h.head)
    assert res["objects_written"] == len(h.blobs)


def test_push_to_other_branch(hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "feature/x", h.head)
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"feature/x": h.head}


def test_push_with_metadata_and_merge(hub, repo):
    """A merge commit (two parents) and optional metadata keys are accepted."""
    a = small(commits=2, keep_manifests=True)
    first = a.commits[0]["commit_id"]
    b = small(commits=1, parent=(first, a.manifests[first]), first_index=7)
    merged = dict(a.manifest)
    merged.update(b.manifest)
    sid = muselib.snapshot_id(merged)
    snap = muselib.snapshot_map(sid, a.commits[-1]["snapshot_id"], a.manifest, merged)
    mc = reid_commit({"commit_id": "", "parent_commit_id": a.head,
                      "parent2_commit_id": b.head, "snapshot_id": sid,
                      "message": "merge", "author": OWNER,
                      "committed_at": "2026-03-01T12:00:00+01:00", "branch": "main",
                      "agent_id": "agent-1", "model_id": "m", "toolchain_id": "t",
                      "prompt_hash": "", "signature": "", "signer_key_id": "",
                      "sem_ver_bump": "minor", "breaking_changes": ["x"],
                      "metadata": {"k": "v", "n": 1}})
    data = rebuild(a.commits + b.commits + [mc], a.snapshots + b.snapshots + [snap],
                   a.blobs + b.blobs)
    res = hub.push(OWNER, repo["slug"], data, "main", mc["commit_id"])
    assert res["commits_written"] == 4
    got = hub.commit(OWNER, repo["slug"], mc["commit_id"])
    assert sorted(got["parent_ids"]) == sorted([a.head, b.head])
    assert got["metadata"] == {"k": "v", "n": 1}
    assert got["sem_ver_bump"] == "minor"
    assert got["breaking_changes"] == ["x"]


# ---------------------------------------------------------------------------
# refused inputs
# ---------------------------------------------------------------------------

@pytest.mark.store("fs")  # the fs store checks hash and size while it writes; S3 checks at unpack
def test_upload_bytes_not_hashing_to_key_400(hub, db, repo):
    h = small()
    data = h.pack()
    key = muselib.blob_id(data)
    pre = hub.presign(OWNER, repo["slug"], key, len(data))
    url = pre.get("upload_url") or pre["uploadUrl"]
    assert "mpacks/" not in url     # a staging key, never the final one
    evil = bytearray(data)
    evil[-1] ^= 0xFF
    with pytest.raises(muselib.HubError) as e:
        hub.upload(url, bytes(evil))
    assert e.value.status == 400
    with pytest.raises(muselib.HubError) as e:   # short upload
        hub.upload(url, data[:-10])
    assert e.value.status == 400
    # nothing was staged: unpack finds nothing
    r = hub.raw("POST", f"/{OWNER}/{repo['slug']}/push/unpack-mpack",
                {"mpack_key": key, "branch": "main", "head": h.head})
    assert r.status_code == 404
    assert_untouched(hub, db, repo, pack=data)
    # the grant is still good for the right bytes
    hub.upload(url, data)
    res = hub.unpack(OWNER, repo["slug"], key, "main", h.head)
    assert res["head"] == h.head


@pytest.mark.store("fs")  # the fs store checks hash and size while it writes; S3 checks at unpack
def test_half_upload_then_disconnect(hub, repo):
    h = small()
    data = h.pack()
    key = muselib.blob_id(data)
    pre = hub.presign(OWNER, repo["slug"], key, len(data))
    url = urllib.parse.urlsplit(pre.get("upload_url") or pre["uploadUrl"])
    with RawHTTP(url.port or 80) as c:
        path = url.path + ("?" + url.query if url.query else "")
        c.send(f"PUT {path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
               f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:len(data) // 2])
    time.sleep(0.2)
    r = hub.raw("POST", f"/{OWNER}/{repo['slug']}/push/unpack-mpack",
                {"mpack_key": key, "branch": "main", "head": h.head})
    assert r.status_code == 404, r.text    # the half upload staged nothing
    hub.upload(pre.get("upload_url") or pre["uploadUrl"], data)
    assert hub.unpack(OWNER, repo["slug"], key, "main", h.head)["head"] == h.head


@pytest.mark.parametrize("garbage", [
    b"MUSE\x01" + bytes(range(256)) * 2,
    b"MUSE\x02" + muselib.build_mpack([], [], [], version=0),   # unknown version
    b"\xc1\xc1\xc1 not msgpack",
    b"\x93\x01\x02\x03",                                       # an array, not a map
], ids=["random-v1", "version-2", "not-msgpack", "array-body"])
def test_garbage_pack_422(hub, db, repo, garbage):
    expect_refused(hub, db, repo, garbage, "sha256:" + "1" * 64, 422)


def test_truncated_pack_422(hub, db, repo):
    h = small()
    expect_refused(hub, db, repo, h.pack()[:-10], h.head, 422)


def test_trailing_bytes_422(hub, db, repo):
    h = small()
    expect_refused(hub, db, repo, h.pack() + b"\x00", h.head, 422)


def test_wrong_snapshot_id_422(hub, db, repo):
    h = small()
    commits, snaps = copy.deepcopy(h.commits), copy.deepcopy(h.snapshots)
    fake = muselib.blob_id(b"not this manifest")
    snaps[-1]["snapshot_id"] = fake
    commits[-1]["snapshot_id"] = fake
    reid_commit(commits[-1])          # only the snapshot check can fail
    expect_refused(hub, db, repo, rebuild(commits, snaps, h.blobs),
                   commits[-1]["commit_id"], 422)


def test_wrong_commit_id_422(hub, db, repo):
    h = small()
    commits = copy.deepcopy(h.commits)
    commits[1]["message"] = "tampered"           # id no longer matches
    expect_refused(hub, db, repo, rebuild(commits, h.snapshots, h.blobs), h.head, 422)


def test_commit_id_over_other_fields_422(hub, db, repo):
    h = small()
    commits = copy.deepcopy(h.commits)
    c = commits[-1]
    # an id computed with a different author string
    c["commit_id"] = muselib.commit_id([c["parent_commit_id"]], c["snapshot_id"],
                                       c["message"], c["committed_at"], c["author"] + " ")
    expect_refused(hub, db, repo, rebuild(commits, h.snapshots, h.blobs),
                   c["commit_id"], 422)


def test_ghost_object_422(hub, db, repo):
    ghost = muselib.blob_id(unique("ghost").encode())
    real = unique("real").encode()
    data, head = root_pack({"a.txt": muselib.blob_id(real), "ghost.txt": ghost},
                           [{"object_id": muselib.blob_id(real), "content": real}])
    expect_refused(hub, db, repo, data, head, 422)


def test_ghost_object_known_to_other_repo_422(hub, db, make_repo):
    """An object another repository holds is still a ghost here."""
    a, b = make_repo(), make_repo()
    h = small()
    hub.push(OWNER, a["slug"], h.pack(), "main", h.head)
    oid = h.blobs[0]["object_id"]
    data, head = root_pack({"stolen.txt": oid}, [])
    expect_refused(hub, db, b, data, head, 422)
    # ... and it cannot be read through b either
    assert hub.object(OWNER, b["slug"], oid).status_code == 404


def test_missing_parent_422(hub, db, repo):
    content = unique("c").encode()
    oid = muselib.blob_id(content)
    data, head = root_pack({"a.txt": oid}, [{"object_id": oid, "content": content}],
                           parent=muselib.blob_id(b"no such commit"))
    expect_refused(hub, db, repo, data, head, 422)


def test_parent_in_other_repo_only_422(hub, db, make_repo):
    a, b = make_repo(), make_repo()
    h = small()
    hub.push(OWNER, a["slug"], h.pack(), "main", h.head)
    h2 = small(commits=1, parent=(h.head, h.manifest), first_index=9)
    expect_refused(hub, db, b, h2.pack(), h2.head, 422)


def test_snapshot_parent_missing_422(hub, db, repo):
    """A delta against a snapshot neither in the pack nor in the repo."""
    content = unique("s").encode()
    oid = muselib.blob_id(content)
    sid = muselib.snapshot_id({"a.txt": oid})   # what it would be over {}
    snap = {"snapshot_id": sid, "parent_snapshot_id": muselib.blob_id(b"unknown"),
            "delta_upsert": {"a.txt": oid}, "delta_remove": []}
    c = reid_commit({"commit_id": "", "parent_commit_id": None,
                     "parent2_commit_id": None, "snapshot_id": sid, "message": "m",
                     "author": OWNER, "committed_at": "2026-02-01T00:00:00+00:00",
                     "branch": "main"})
    data = rebuild([c], [snap], [{"object_id": oid, "content": content}])
    expect_refused(hub, db, repo, data, c["commit_id"], 422)


def test_commit_without_snapshot_422(hub, db, repo):
    """A commit naming a snapshot that is neither in the pack nor the repo."""
    h = small()
    expect_refused(hub, db, repo, rebuild(h.commits, h.snapshots[:-1], h.blobs),
                   h.head, 422)


@pytest.mark.parametrize("bad", ["../evil.txt", "a/../../b", "/abs.txt", "a//b",
                                 "a/./b", "dir/", ".", "..", "a\0b", "x" * 4097],
                         ids=["dotdot", "dotdot2", "absolute", "empty-seg", "dot-seg",
                              "trailing-slash", "dot", "dotdot-only", "nul", "too-long"])
def test_bad_path_422(hub, db, repo, bad):
    content = unique("p").encode()
    oid = muselib.blob_id(content)
    assert not muselib.valid_path(bad)
    data, head = root_pack({bad: oid, "ok.txt": oid},
                           [{"object_id": oid, "content": content}])
    expect_refused(hub, db, repo, data, head, 422)


def test_longest_valid_path_accepted(hub, repo):
    content = unique("p").encode()
    oid = muselib.blob_id(content)
    path = "/".join(["d" * 99] * 40) + "/" + "f" * 95     # 4095 bytes
    assert muselib.valid_path(path) and len(path) <= 4096
    data, head = root_pack({path: oid}, [{"object_id": oid, "content": content}])
    assert hub.push(OWNER, repo["slug"], data, "main", head)["commits_written"] == 1


def test_blob_content_not_matching_id_422(hub, db, repo):
    h = small()
    blobs = copy.deepcopy(h.blobs)
    blobs[0]["content"] = blobs[0]["content"] + b"!"    # same declared id
    expect_refused(hub, db, repo, rebuild(h.commits, h.snapshots, blobs), h.head, 422)
    assert db.count(f"SELECT count(*) FROM objects WHERE object_id = "
                    f"{sql_str(blobs[0]['object_id'])}") == 0


@pytest.mark.parametrize("field", ["message", "author", "committed_at"])
def test_nul_in_commit_field_422(hub, db, repo, field):
    content = unique("n").encode()
    oid = muselib.blob_id(content)
    kw = {"message": "ok", "author": OWNER, "committed_at": "2026-02-01T00:00:00+00:00"}
    kw[field] = kw[field] + "\0tail"
    data, head = root_pack({"a": oid}, [{"object_id": oid, "content": content}], **kw)
    expect_refused(hub, db, repo, data, head, 422)


def test_bad_ids_in_pack_422(hub, db, repo):
    h = small()
    commits = copy.deepcopy(h.commits)
    commits[-1]["commit_id"] = "sha256:" + "G" * 64
    expect_refused(hub, db, repo, rebuild(commits, h.snapshots, h.blobs),
                   h.head, 422)


def test_head_not_in_pack_nor_repo_422(hub, db, repo):
    h = small()
    expect_refused(hub, db, repo, h.pack(), muselib.blob_id(b"elsewhere"), 422)


def test_head_malformed_422(hub, db, repo):
    h = small()
    expect_refused(hub, db, repo, h.pack(), "not-an-id", 422)


@pytest.mark.parametrize("body", [
    {"mpack_key": "sha256:xyz", "size_bytes": 10},
    {"mpack_key": "sha256:" + "a" * 64, "size_bytes": -1},
    {"mpack_key": "sha256:" + "a" * 64, "size_bytes": "10"},
    {"mpack_key": "sha256:" + "a" * 64},
    {"size_bytes": 10},
])
def test_presign_bad_fields_422(hub, repo, body):
    r = hub.raw("POST", f"/{OWNER}/{repo['slug']}/push/mpack-presign", body)
    assert r.status_code == 422, r.text


def test_presign_unknown_repo_404(hub):
    r = hub.raw("POST", f"/{OWNER}/{unique('none')}/push/mpack-presign",
                {"mpack_key": "sha256:" + "a" * 64, "size_bytes": 10})
    assert r.status_code == 404


def test_unpack_without_grant_404(hub, db, repo):
    r = hub.raw("POST", f"/{OWNER}/{repo['slug']}/push/unpack-mpack",
                {"mpack_key": "sha256:" + "d" * 64, "branch": "main",
                 "head": "sha256:" + "e" * 64})
    assert r.status_code == 404
    assert_untouched(hub, db, repo)


def test_two_grants_the_uploaded_one_is_used(hub, db, repo):
    """Regression (hardening 15.9): presign, upload, presign again (a second
    grant, nothing uploaded under it), unpack.  SPEC 4.3: any unexpired
    grant with a completed upload is used; the newest grant was picked and
    the unpack answered 404 not_staged."""
    h = small()
    data = h.pack()
    key = stage(hub, repo["slug"], data)
    again = hub.presign(OWNER, repo["slug"], key, len(data))
    assert again["already_present"] is False
    res = hub.unpack(OWNER, repo["slug"], key, "main", h.head)
    assert res["commits_written"] == 3
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": h.head}
    # the grant that had the upload is the one consumed
    q = f"SELECT count(*) FROM push_grants WHERE repo_id = {sql_str(repo['repo_id'])} AND consumed_at IS NOT NULL"
    assert db.count(q) == 1


def test_anonymous_push_401(anon_hub, repo):
    r = anon_hub.raw("POST", f"/{OWNER}/{repo['slug']}/push/mpack-presign",
                     {"mpack_key": "sha256:" + "a" * 64, "size_bytes": 10})
    assert r.status_code == 401


def test_pack_uploaded_by_other_repo_404(hub, db, make_repo):
    """Naming a hash proves nothing: B cannot import A's pack."""
    a, b = make_repo(), make_repo()
    h = small()
    data = h.pack()
    key = muselib.blob_id(data)
    hub.push(OWNER, a["slug"], data, "main", h.head)
    body = {"mpack_key": key, "branch": "main", "head": h.head}
    r = hub.raw("POST", f"/{OWNER}/{b['slug']}/push/unpack-mpack", body)
    assert r.status_code == 404, r.text
    assert_untouched(hub, db, b)
    # a grant without an upload does not help either: the stored pack is
    # not B's staged upload
    pre = hub.presign(OWNER, b["slug"], key, len(data))
    assert pre["already_present"] is False
    r = hub.raw("POST", f"/{OWNER}/{b['slug']}/push/unpack-mpack", body)
    assert r.status_code == 404, r.text
    assert_untouched(hub, db, b)
    # with its own upload B gets it, with full counts
    hub.upload(pre.get("upload_url") or pre["uploadUrl"], data)
    res = hub.unpack(OWNER, b["slug"], key, "main", h.head)
    assert res["commits_written"] == 3


# ---------------------------------------------------------------------------
# branch moves
# ---------------------------------------------------------------------------

def test_non_fast_forward_409_then_force(hub, db, repo):
    a = small()
    hub.push(OWNER, repo["slug"], a.pack(), "main", a.head)
    before = {"main": a.head}
    b = small()                      # unrelated history
    data = b.pack()
    expect_refused(hub, db, repo, data, b.head, 409, before)
    # the staged pack is still usable under its grant: retry with force,
    # no new upload
    res = hub.unpack(OWNER, repo["slug"], muselib.blob_id(data), "main", b.head,
                     force=True)
    assert res["head"] == b.head
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": b.head}


def test_one_connection_reuses_its_staging_tables_empty(start_server):
    """The write path's staging tables (tmp_commits, tmp_objects, ...) live
    as long as the database session, are emptied by every COMMIT and are
    dropped after a ROLLBACK (refwrite.c, pool.c). With a pool of one connection every write below
    runs in the same session: a push refused inside its transaction (409,
    after its rows were staged) leaves no staging table behind (the
    session given back after a ROLLBACK runs DISCARD TEMP: the rolled-back
    rows would otherwise stay on disk until a COMMIT), then a push of
    another history to another repository must write exactly that history,
    and its session keeps one set of tables rather than creating and
    dropping four per write."""
    srv = start_server(MUSEHUB_DB_POOL="1")
    hub, db = srv.hub(), srv.db
    r1 = hub.create_repo(OWNER, unique("stg"))
    r2 = hub.create_repo(OWNER, unique("stg"))
    a = small(commits=3)
    res = hub.push(OWNER, r1["slug"], a.pack(), "main", a.head)
    assert res["commits_written"] == 3
    b = small(commits=4)             # unrelated: refused after its rows were staged
    r = try_push(hub, r1["slug"], b.pack(), b.head)
    assert r.status_code == 409, r.text
    # The ROLLBACK hid the refused rows but would leave them on disk until
    # a COMMIT: the session given back drops its temporary tables.
    deadline = time.monotonic() + 5
    while tmp_tables(db) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tmp_tables(db) == 0, "the refused push's staging tables outlived its transaction"
    c = small(commits=2)
    res = hub.push(OWNER, r2["slug"], c.pack(), "main", c.head)
    assert (res["commits_written"], res["snapshots_written"]) == (2, 2)
    got = {x for (x,) in db.rows("SELECT commit_id FROM commit_refs WHERE repo_id = "
                                 + sql_str(r2["repo_id"]))}
    assert got == {x["commit_id"] for x in c.commits}
    assert db.count(f"SELECT count(*) FROM commits WHERE commit_id IN "
                    f"({', '.join(sql_str(x['commit_id']) for x in b.commits)})") == 0
    assert repo_counts(db, r1["repo_id"])["commit_refs"] == 3
    # one session, one set of staging tables (an ON COMMIT DROP table would be gone)
    assert tmp_tables(db) == 1


def tmp_tables(db) -> int:
    """Sessions holding the write path's staging table tmp_commits."""
    return db.count("SELECT count(*) FROM pg_class WHERE relname = 'tmp_commits' AND relpersistence = 't'")


def test_diverging_child_409(hub, db, repo):
    a = small(commits=3, keep_manifests=True)
    hub.push(OWNER, repo["slug"], a.pack(), "main", a.head)
    first = a.commits[0]["commit_id"]
    b = small(commits=1, parent=(first, a.manifests[first]), first_index=50)
    expect_refused(hub, db, repo, b.pack(), b.head, 409, {"main": a.head})


def test_moving_back_to_ancestor_is_409(hub, repo):
    a = small(commits=3)
    hub.push(OWNER, repo["slug"], a.pack(), "main", a.head)
    r = hub.raw("POST", f"/{OWNER}/{repo['slug']}/push/unpack-mpack",
                {"mpack_key": a.key, "branch": "main", "head": a.commits[0]["commit_id"]})
    assert r.status_code == 409
    res = hub.unpack(OWNER, repo["slug"], a.key, "main", a.commits[0]["commit_id"],
                     force=True)
    assert res["head"] == a.commits[0]["commit_id"]


def test_stale_expected_old_head_409(hub, db, repo):
    a = small()
    hub.push(OWNER, repo["slug"], a.pack(), "main", a.head)
    a2 = small(commits=2, parent=(a.head, a.manifest), first_index=3)
    stale = a.commits[0]["commit_id"]
    expect_refused(hub, db, repo, a2.pack(), a2.head, 409, {"main": a.head},
                   expected_old_head=stale)
    # force does not skip the expected_old_head comparison
    r = hub.raw("POST", f"/{OWNER}/{repo['slug']}/push/unpack-mpack",
                {"mpack_key": a2.key, "branch": "main", "head": a2.head,
                 "force": True, "expected_old_head": stale})
    assert r.status_code == 409
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": a.head}
    res = hub.unpack(OWNER, repo["slug"], a2.key, "main", a2.head,
                     expected_old_head=a.head)
    assert res["head"] == a2.head


def test_max_mpack_bytes_413(start_server):
    srv = start_server(MUSEHUB_MAX_MPACK_BYTES="1000")
    h = srv.hub()
    r = h.create_repo(OWNER, unique("max"))
    resp = h.raw("POST", f"/{OWNER}/{r['slug']}/push/mpack-presign",
                 {"mpack_key": "sha256:" + "a" * 64, "size_bytes": 1001})
    assert resp.status_code == 413
    tiny = muselib.generate(commits=1, files=1, changed=1, blob_size=4, seed=unique("t"))
    data = tiny.pack()
    assert len(data) <= 1000
    assert h.push(OWNER, r["slug"], data, "main", tiny.head)["commits_written"] == 1


# ---------------------------------------------------------------------------
# races
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_concurrent_diverging_pushes(server, repo):
    hub = server.hub()
    base = small(commits=1)
    hub.push(OWNER, repo["slug"], base.pack(), "main", base.head)
    head, manifest = base.head, base.manifest
    seed = unique("race")
    hubs = [server.hub(), server.hub()]
    for i in range(50):
        a = small(commits=1, parent=(head, manifest), seed=f"{seed}-a", first_index=i + 1)
        b = small(commits=1, parent=(head, manifest), seed=f"{seed}-b", first_index=i + 1)
        ka, kb = stage(hub, repo["slug"], a.pack()), stage(hub, repo["slug"], b.pack())
        barrier = threading.Barrier(2)
        status: dict[str, int] = {}

        def go(name, h, key, hd):
            barrier.wait(10)
            r = h.raw("POST", f"/{OWNER}/{repo['slug']}/push/unpack-mpack",
                      {"mpack_key": key, "branch": "main", "head": hd})
            status[name] = r.status_code

        ts = [threading.Thread(target=go, args=("a", hubs[0], ka, a.head)),
              threading.Thread(target=go, args=("b", hubs[1], kb, b.head))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert sorted(status.values()) == [200, 409], (i, status)
        win = a if status["a"] == 200 else b
        assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": win.head}, i
        head, manifest = win.head, win.manifest
    for h in hubs + [hub]:
        h.close()


def packs_in_store(srv) -> set[str]:
    """Pack ids ("sha256:<hex>") of every object under mpacks/ (fs store)."""
    d = Path(srv.store_dir) / "mpacks"
    return {"sha256:" + f.name for f in d.iterdir() if len(f.name) == 64}


@pytest.mark.slow
def test_refused_pushes_leave_no_pack_behind(start_server, store_kind):
    """Issue 15 item 4: rounds of four diverging pushes racing for one
    branch (one wins, three get 409). A refused unpack leaves nothing
    under mpacks/: every pack there has its mpacks row (before: each 409
    left its moved pack behind), and the refused upload stays staged
    under its grant, so a forced retry needs no new upload."""
    srv = start_server()
    hub = srv.hub()
    slug = hub.create_repo(OWNER, unique("orphans"))["slug"]
    base = small(commits=1)
    hub.push(OWNER, slug, base.pack(), "main", base.head)
    head, manifest = base.head, base.manifest
    seed = unique("orph")
    hubs = [srv.hub() for _ in range(4)]
    staged: list[str] = []
    loser = None
    for i in range(10):
        hs = [small(commits=1, parent=(head, manifest), seed=f"{seed}-{k}", first_index=i + 1) for k in range(4)]
        keys = [stage(hub, slug, x.pack()) for x in hs]
        staged += keys
        barrier = threading.Barrier(len(hs))
        status: dict[int, int] = {}

        def go(k):
            barrier.wait(10)
            r = hubs[k].raw("POST", f"/{OWNER}/{slug}/push/unpack-mpack",
                            {"mpack_key": keys[k], "branch": "main", "head": hs[k].head})
            status[k] = r.status_code

        ts = [threading.Thread(target=go, args=(k,)) for k in range(len(hs))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert sorted(status.values()) == [200, 409, 409, 409], (i, status)
        win = next(k for k, v in status.items() if v == 200)
        loser = (keys[(win + 1) % 4], hs[(win + 1) % 4])
        head, manifest = hs[win].head, hs[win].manifest
    rows = {r[0] for r in srv.db.rows("SELECT mpack_id FROM mpacks")}
    for key in staged:
        assert srv.store_path(key).exists() == (key in rows), key
    if store_kind == "fs":
        assert packs_in_store(srv) == rows
    # The last round's refused upload is still staged: a forced retry
    # under the same grant needs no upload.
    r = hub.raw("POST", f"/{OWNER}/{slug}/push/unpack-mpack",
                {"mpack_key": loser[0], "branch": "main", "head": loser[1].head, "force": True})
    assert r.status_code == 200, r.text
    assert hub.refs(OWNER, slug)["branch_heads"] == {"main": loser[1].head}
    assert srv.store_path(loser[0]).exists()
    for h in hubs + [hub]:
        h.close()


def test_musegen_and_muse_push_cli(server, hub, tmp_path):
    import json
    import subprocess
    scripts = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")
    out = tmp_path / "g.mpack"
    gen = subprocess.run(["/usr/bin/python3", os.path.join(scripts, "musegen"),
                          "--commits", "30", "--files", "20", "--seed", unique("cli"),
                          "--out", str(out)], stdout=subprocess.PIPE, check=True)
    info = json.loads(gen.stdout)
    slug = unique("cli")
    r = subprocess.run(["/usr/bin/python3", os.path.join(scripts, "muse-push"),
                        "--url", server.url, "--owner", OWNER, "--repo", slug,
                        "--create", "--json", str(out)],          # head inferred
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout.decode().splitlines()[-1])
    assert res["commits_written"] == 30 and res["head"] == info["head"]
    assert hub.refs(OWNER, slug)["branch_heads"] == {"main": info["head"]}
    hub.delete_repo(hub.refs(OWNER, slug)["repo_id"])
