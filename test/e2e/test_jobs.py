"""Background jobs (SPEC 4.7): the job API, mpack.index (seed 001), mpack.gc
(seed 002, PG-1..PG-6), the sweep of superseded packs, and crash safety
(a worker killed with SIGKILL in the middle of a GC; a fetch running
across the swap).

Everything goes through the HTTP API and the real binary; SQL is only used
to look at the rows the jobs wrote (and, in two places, to bump a
repository's state_seq so a fetch is rebuilt instead of answered from the
fetch-pack cache).
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zstandard

import muselib
from e2e_util import sql_str, unique

OWNER = "gabriel"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def enqueue(hub, repo_id, job_type, payload=None, expect=(202,)):
    body = {"job_type": job_type}
    if payload is not None:
        body["payload"] = payload
    return hub.call("POST", f"/api/repos/{repo_id}/jobs", body, expect=expect)


def get_job(hub, job_id, expect=(200,)):
    return hub.call("GET", f"/api/jobs/{job_id}", expect=expect)


def wait_job(hub, job_id, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        j = get_job(hub, job_id)
        if j["status"] in ("done", "failed"):
            return j
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not finished after {timeout}s: {j}")
        time.sleep(0.03)


def run_job(hub, repo_id, job_type, payload=None, timeout=60.0):
    j = enqueue(hub, repo_id, job_type, payload)
    assert j["status"] == "pending" and muselib.valid_id(j["job_id"]), j
    return wait_job(hub, j["job_id"], timeout)


def small_history(**kw):
    """Seed 001's shape: 30 files, 15 commits, 3 changed, 256-byte blobs,
    with content unique to the call."""
    args = dict(commits=15, files=30, changed=3, blob_size=256, seed=unique("h"))
    args.update(kw)
    return muselib.generate(**args)


def stage(hub, slug, pack):
    """Presign + upload without unpacking: the pack sits under a grant."""
    key = muselib.blob_id(pack)
    pre = hub.presign(OWNER, slug, key, len(pack))
    assert not pre["already_present"]
    hub.upload(pre["upload_url"], pack)
    return key


def chain(n_pushes, commits=3, files=12, changed=2, blob_size=64, seed=None):
    """n histories, each built on the previous one's head (disjoint new
    blobs per push)."""
    seed = seed or unique("c")
    out = [muselib.generate(commits=commits, files=files, changed=changed,
                            blob_size=blob_size, seed=seed, keep_manifests=True)]
    for k in range(1, n_pushes):
        prev = out[-1]
        out.append(muselib.generate(commits=commits, files=files, changed=changed,
                                    blob_size=blob_size, seed=seed,
                                    parent=(prev.head, prev.manifest),
                                    first_index=k * commits, keep_manifests=True))
    return out


def push_chain(hub, slug, hists):
    keys = []
    for h in hists:
        res = hub.push(OWNER, slug, h.pack(), "main", h.head)
        keys.append(res["mpack_key"])
    return keys


def all_blob_ids(hists):
    return {b["object_id"] for h in hists for b in h.blobs}


def pack_path(server, key):
    """The file holding pack `key` in either store mode (fs or s3)."""
    return server.store_path(key)


def distinct_packs(db, repo_id):
    """Seed 002's measure: distinct packs indexing this repository's objects."""
    return db.count(
        "SELECT count(DISTINCT i.mpack_id) FROM object_refs r JOIN mpack_index i USING (object_id)"
        f" WHERE r.repo_id = {sql_str(repo_id)}")


def repo_packs(db, repo_id):
    return sorted(r[0] for r in db.rows(
        f"SELECT mpack_id FROM mpack_refs WHERE repo_id = {sql_str(repo_id)}"))


def bump_state(db, repo_id):
    """A new repository state: fetches are rebuilt, not served from caches."""
    db.execute(f"UPDATE repos SET state_seq = state_seq + 1 WHERE repo_id = {sql_str(repo_id)}")


def located(server, files, key, file_off, file_len, codec=None, off=0, length=None):
    """The bytes a location names: v1 (codec None): bytes [file_off,
    +file_len) of pack `key`; v2: that range is a frame's data (codec
    "zstd" or "none"), and the blob is [off, +length) of it decompressed."""
    if key not in files:
        p = pack_path(server, key)
        assert p.exists(), f"a location names {key}, absent from the store"
        files[key] = p.read_bytes()
    data = files[key][file_off:file_off + file_len]
    if codec is None:
        return data
    frame = data if codec == "none" else zstandard.ZstdDecompressor().decompress(data)
    return frame[off:off + length]


def frame_codecs(db, keys):
    """{(pack, data_offset): codec} of the packs' mpack_frames rows."""
    if not keys:
        return {}
    rows = db.rows("SELECT mpack_id, data_offset, codec FROM mpack_frames WHERE mpack_id IN ("
                   + ",".join(sql_str(k) for k in keys) + ")")
    return {(k, int(o)): c for k, o, c in rows}


def check_objects_readable(db, server, repo_id, hists):
    """Every object the repository references resolves, through its index
    rows (v1 ranges, or v2 frames and ranges inside them) and
    objects.storage_uri (both URI forms), to bytes in the store that hash
    to it."""
    content = {b["object_id"]: b["content"] for h in hists for b in h.blobs}
    rid = sql_str(repo_id)
    rows = db.rows("SELECT r.object_id, o.storage_uri FROM object_refs r JOIN objects o USING (object_id)"
                   f" WHERE r.repo_id = {rid}")
    assert {r[0] for r in rows} == set(content)
    files: dict[str, bytes] = {}
    codecs = frame_codecs(db, {uri[len("mpack://"):].split("#")[0] for _, uri in rows})
    for oid, uri in rows:
        assert uri.startswith("mpack://"), uri
        key, rng = uri[len("mpack://"):].split("#")
        if "/" in rng:
            fr, br = rng.split("/")
            foff, flen = (int(x) for x in fr.split(":"))
            off, ln = (int(x) for x in br.split(":"))
            got = located(server, files, key, foff, flen, codecs[(key, foff)], off, ln)
        else:
            off, ln = (int(x) for x in rng.split(":"))
            got = located(server, files, key, off, ln)
        assert got == content[oid], (oid, uri)
    idx = db.rows("SELECT i.object_id, i.mpack_id, i.byte_offset, i.byte_length, f.data_offset, f.data_length,"
                  " f.codec, i.frame_no FROM object_refs r JOIN mpack_index i USING (object_id)"
                  " LEFT JOIN mpack_frames f ON f.mpack_id = i.mpack_id AND f.frame_no = i.frame_no"
                  f" WHERE r.repo_id = {rid}")
    assert {r[0] for r in idx} == set(content)
    for oid, key, off, ln, foff, flen, codec, frame_no in idx:
        if frame_no is None:
            got = located(server, files, key, int(off), int(ln))
        else:
            assert codec is not None, f"index row of {oid} names frame {frame_no} of {key}, which has no row"
            got = located(server, files, key, int(foff), int(flen), codec, int(off), int(ln))
        assert got == content[oid], (oid, key)


def clone_blobs(hub, slug, head, have=None, known=None):
    res = hub.clone(OWNER, slug, [head], have or [], known_manifests=known,
                    known_objects=set().union(*[set(m.values()) for m in (known or {}).values()])
                    if known else None)
    pack = res["pack"]
    return res["result"], {b["object_id"] for b in (pack["blobs"] if pack else [])}


# ---------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------

def test_enqueue_and_get_shapes(hub, repo):
    j = enqueue(hub, repo["repo_id"], "mpack.gc")
    assert set(j) >= {"job_id", "status"} and j["status"] == "pending"
    done = wait_job(hub, j["job_id"])
    for k in ("job_id", "job_type", "status", "attempt", "result", "error"):
        assert k in done, k
    assert done["job_type"] == "mpack.gc" and done["status"] == "done"
    assert done["attempt"] == 1 and done["error"] is None
    assert done["result"] == {"packs_before": 0, "packs_after": 0, "consolidated_key": None,
                              "skipped": True, "elapsed_ms": done["result"]["elapsed_ms"]}


def test_enqueue_msgpack_body_and_response(hub, repo):
    r = hub.raw("POST", f"/api/repos/{repo['repo_id']}/jobs", {"job_type": "mpack.gc"},
                accept=muselib.MSGPACK)
    assert r.status_code == 202
    body = muselib.decode_body(r)
    assert body["status"] == "pending"


@pytest.mark.parametrize("body", [
    {},
    {"job_type": "mpack.nope"},
    {"job_type": 7},
    {"job_type": "mpack.gc", "payload": [1]},
    {"job_type": "mpack.index"},
    {"job_type": "mpack.index", "payload": {}},
    {"job_type": "mpack.index", "payload": {"mpack_key": "sha256:ABC"}},
    {"job_type": "mpack.index", "payload": {"mpack_key": 5}},
])
def test_enqueue_bad_body_422(hub, repo, body):
    r = hub.raw("POST", f"/api/repos/{repo['repo_id']}/jobs", body)
    assert r.status_code == 422, r.text


def test_enqueue_unknown_repo_404(hub):
    r = hub.raw("POST", f"/api/repos/sha256:{'0' * 64}/jobs", {"job_type": "mpack.gc"})
    assert r.status_code == 404


def test_get_unknown_and_malformed(hub):
    assert hub.raw("GET", f"/api/jobs/sha256:{'1' * 64}").status_code == 404
    assert hub.raw("GET", "/api/jobs/not-an-id").status_code == 422


def test_anonymous_callers(hub, anon_hub, make_repo):
    pub = make_repo()
    priv = make_repo(visibility="private")
    j = enqueue(hub, pub["repo_id"], "mpack.gc")
    # Writes need a signature; a private repository does not exist for them.
    assert anon_hub.raw("POST", f"/api/repos/{pub['repo_id']}/jobs",
                        {"job_type": "mpack.gc"}).status_code == 401
    assert anon_hub.raw("POST", f"/api/repos/{priv['repo_id']}/jobs",
                        {"job_type": "mpack.gc"}).status_code == 404
    # A job is visible to the repository's owner/admins only.
    assert anon_hub.raw("GET", f"/api/jobs/{j['job_id']}").status_code == 404


def test_index_naming_a_foreign_pack_is_404(hub, make_repo, db):
    """Naming a hash must never import a pack (SPEC 4.7)."""
    a, b = make_repo(), make_repo()
    h = small_history()
    res = hub.push(OWNER, a["slug"], h.pack(), "main", h.head)
    key = res["mpack_key"]
    r = hub.raw("POST", f"/api/repos/{b['repo_id']}/jobs",
                {"job_type": "mpack.index", "payload": {"mpack_key": key}})
    assert r.status_code == 404, r.text
    assert db.count(f"SELECT count(*) FROM object_refs WHERE repo_id = {sql_str(b['repo_id'])}") == 0
    # Unknown everywhere: 404 as well.
    r = hub.raw("POST", f"/api/repos/{b['repo_id']}/jobs",
                {"job_type": "mpack.index", "payload": {"mpack_key": "sha256:" + "2" * 64}})
    assert r.status_code == 404


def test_index_expired_grant_is_404(hub, make_repo, db):
    # The grant is aged in SQL: a 1 s TTL would race the staging itself.
    r = make_repo()
    h = small_history(commits=2, files=3)
    key = stage(hub, r["slug"], h.pack())
    db.execute("UPDATE push_grants SET expires_at = now() - interval '1 second'"
               f" WHERE repo_id = {sql_str(r['repo_id'])}")
    resp = hub.raw("POST", f"/api/repos/{r['repo_id']}/jobs",
                   {"job_type": "mpack.index", "payload": {"mpack_key": key}})
    assert resp.status_code == 404


# ---------------------------------------------------------------------------
# mpack.index (seed 001)
# ---------------------------------------------------------------------------

def test_index_staged_pack_writes_rows(server, hub, repo, db):
    """Invariants 1-3, 7: an objects row per blob with an mpack:// URI whose
    byte range holds the blob, an object ref per blob, result keys."""
    h = small_history()
    pack = h.pack()
    key = stage(hub, repo["slug"], pack)
    done = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})
    assert done["status"] == "done", done
    res = done["result"]
    n = len(h.blobs)
    assert n == 15 * 3 + 30
    assert res["objects_written"] == n and res["object_refs_written"] == n, res
    assert res["elapsed_ms"] > 0
    rid = sql_str(repo["repo_id"])
    ids = "ARRAY[" + ",".join(sql_str(b["object_id"]) for b in h.blobs) + "]"
    rows = db.rows(f"SELECT object_id, storage_uri FROM objects WHERE object_id = ANY({ids})")
    assert len(rows) == n
    stored = pack_path(server, key).read_bytes()
    assert stored == pack
    content = {b["object_id"]: b["content"] for b in h.blobs}
    for oid, uri in rows:
        assert uri.startswith(f"mpack://{key}#"), uri
        off, ln = (int(x) for x in uri.split("#")[1].split(":"))
        assert stored[off:off + ln] == content[oid]
    assert db.count(f"SELECT count(*) FROM object_refs WHERE repo_id = {rid}") == n
    assert db.count(f"SELECT count(*) FROM mpack_index WHERE mpack_id = {sql_str(key)}") == n
    assert repo_packs(db, repo["repo_id"]) == [key]
    # The staged upload was verified (pack hash and every blob) and moved.
    assert db.count(f"SELECT count(*) FROM push_grants WHERE repo_id = {rid}"
                    f" AND mpack_key = {sql_str(key)} AND verified_at IS NOT NULL") == 1


def test_index_two_grants_uses_the_uploaded_one(hub, repo, db):
    """Regression (hardening 15.9), the index job's side of the grant
    lookup it shares with unpack: presign, upload, presign again; the job
    reads the grant that has the upload, not the newest one."""
    h = small_history()
    pack = h.pack()
    key = stage(hub, repo["slug"], pack)
    assert not hub.presign(OWNER, repo["slug"], key, len(pack))["already_present"]
    done = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})
    assert done["status"] == "done", done
    assert done["result"]["objects_written"] == len(h.blobs)
    rid = sql_str(repo["repo_id"])
    assert db.count(f"SELECT count(*) FROM push_grants WHERE repo_id = {rid}"
                    f" AND mpack_key = {sql_str(key)} AND verified_at IS NOT NULL") == 1


def test_index_is_idempotent(hub, repo, db):
    """Invariant 6: a second run writes nothing and reports zeros."""
    h = small_history()
    key = stage(hub, repo["slug"], h.pack())
    first = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})
    second = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})
    assert first["result"]["objects_written"] == len(h.blobs)
    assert second["status"] == "done"
    assert second["result"]["objects_written"] == 0
    assert second["result"]["object_refs_written"] == 0
    rid = sql_str(repo["repo_id"])
    assert db.count(f"SELECT count(*) FROM object_refs WHERE repo_id = {rid}") == len(h.blobs)
    assert db.count(f"SELECT count(*) FROM mpack_index WHERE mpack_id = {sql_str(key)}") == len(h.blobs)


def test_index_of_unpacked_pack_is_noop(hub, repo):
    h = small_history()
    res = hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    done = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": res["mpack_key"]})
    assert done["status"] == "done"
    assert done["result"]["objects_written"] == 0 and done["result"]["object_refs_written"] == 0


def test_ghost_guard_passes_after_index(hub, repo):
    """Invariant 5: once indexed, the objects count as this repository's, so
    a push whose snapshots name them without carrying the blobs passes the
    ghost guard."""
    h = small_history()
    blobs_only = muselib.build_mpack([], [], h.blobs)
    key = stage(hub, repo["slug"], blobs_only)
    assert run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})["status"] == "done"
    history_only = muselib.build_mpack(h.commits, h.snapshots, [])
    res = hub.push(OWNER, repo["slug"], history_only, "main", h.head)
    assert res["head"] == h.head and res["objects_written"] == 0
    assert hub.refs(OWNER, repo["slug"])["branch_heads"]["main"] == h.head
    cl = hub.clone(OWNER, repo["slug"], [h.head])
    assert {b["object_id"] for b in cl["pack"]["blobs"]} == {b["object_id"] for b in h.blobs}


def test_index_trusted_pack_is_not_rehashed(server, hub, repo):
    """Invariant 4: a pack this repository already references was verified
    when it entered; the index job trusts it and hashes nothing (shown by
    corrupting a blob's bytes in the store behind the server's back: the
    job still succeeds, where a re-hash would have failed)."""
    h = small_history()
    res = hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    p = pack_path(server, res["mpack_key"])
    data = bytearray(p.read_bytes())
    victim = h.blobs[0]["content"]
    at = bytes(data).find(victim)
    assert at > 0
    data[at] ^= 0x01
    p.write_bytes(bytes(data))
    try:
        done = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": res["mpack_key"]})
        assert done["status"] == "done", done
    finally:
        data[at] ^= 0x01
        p.write_bytes(bytes(data))


def test_index_unverified_grant_checks_every_blob(hub, repo, db):
    """A staged upload nobody verified yet gets the unpack checks: a blob
    whose content does not hash to its declared id fails the job (for good)
    and writes nothing."""
    liar = [{"object_id": muselib.blob_id(b"what it claims"), "content": b"what it is"}]
    pack = muselib.build_mpack([], [], liar)
    key = stage(hub, repo["slug"], pack)
    done = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})
    assert done["status"] == "failed", done
    assert done["attempt"] == 1  # not retried: it cannot get better
    assert "hash" in done["error"]
    assert db.count(f"SELECT count(*) FROM object_refs WHERE repo_id = {sql_str(repo['repo_id'])}") == 0
    assert db.count(f"SELECT count(*) FROM objects WHERE object_id = {sql_str(liar[0]['object_id'])}") == 0


def test_index_unparsable_staged_pack_fails(hub, repo):
    key = stage(hub, repo["slug"], b"MUSE\x01\xc1 not msgpack")
    done = run_job(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})
    assert done["status"] == "failed" and done["attempt"] == 1


def test_index_before_upload_retries_then_succeeds(hub, repo):
    """Enqueued right after presign, before the bytes arrive: the first
    attempt finds nothing staged and is retried with backoff (1 s)."""
    h = small_history(commits=3, files=5)
    pack = h.pack()
    key = muselib.blob_id(pack)
    pre = hub.presign(OWNER, repo["slug"], key, len(pack))
    j = enqueue(hub, repo["repo_id"], "mpack.index", {"mpack_key": key})
    deadline = time.monotonic() + 10
    while get_job(hub, j["job_id"])["attempt"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    hub.upload(pre["upload_url"], pack)
    done = wait_job(hub, j["job_id"])
    assert done["status"] == "done", done
    assert done["result"]["objects_written"] == len(h.blobs)


# ---------------------------------------------------------------------------
# mpack.gc (seed 002)
# ---------------------------------------------------------------------------

def test_pg1_gc_consolidates_multiple_packs(hub, repo, db):
    hists = chain(3)
    keys = push_chain(hub, repo["slug"], hists)
    assert distinct_packs(db, repo["repo_id"]) == 3
    done = run_job(hub, repo["repo_id"], "mpack.gc")
    assert done["status"] == "done", done
    res = done["result"]
    assert res["packs_before"] == 3 and res["packs_after"] == 1
    assert res["skipped"] is False
    assert muselib.valid_id(res["consolidated_key"]) and res["consolidated_key"] not in keys
    assert res["objects"] == len(all_blob_ids(hists))


def test_pg2_gc_leaves_exactly_one_pack(server, hub, repo, db):
    hists = chain(4)
    push_chain(hub, repo["slug"], hists)
    done = run_job(hub, repo["repo_id"], "mpack.gc")
    key = done["result"]["consolidated_key"]
    assert distinct_packs(db, repo["repo_id"]) == 1
    assert repo_packs(db, repo["repo_id"]) == [key]
    assert db.scalar(f"SELECT kind FROM mpacks WHERE mpack_id = {sql_str(key)}") == "gc"
    check_objects_readable(db, server, repo["repo_id"], hists)


def test_pg3_consolidated_pack_contains_every_object(server, hub, repo, db):
    hists = chain(2, commits=3)
    push_chain(hub, repo["slug"], hists)
    done = run_job(hub, repo["repo_id"], "mpack.gc")
    key = done["result"]["consolidated_key"]
    data = pack_path(server, key).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == key
    assert done["result"]["bytes_written"] == len(data)
    # SPEC 4.7: one v2 pack (SPEC 2.1), blobs only, every blob checked.
    assert data[:5] == b"MUSE\x02"
    pack = muselib.parse_mpack(data)
    assert pack["version"] == 2
    assert pack["commits"] == [] and pack["snapshots"] == [] and pack["branch_heads"] == {}
    ids = [b["object_id"] for b in pack["blobs"]]
    assert set(ids) == all_blob_ids(hists) and len(ids) == len(set(ids))
    for b in pack["blobs"]:
        assert muselib.blob_id(b["content"]) == b["object_id"]
    # Path order: all versions of a path together, oldest first. Each
    # object's path and age: the first commit (oldest first) whose tree
    # gives it that path.
    mans = {cid: m for h in hists for cid, m in h.manifests.items()}
    first: dict[str, tuple] = {}
    for age, c in enumerate(c for h in hists for c in h.commits):
        for path, oid in sorted(mans[c["commit_id"]].items()):
            first.setdefault(oid, (path.encode(), age))
    assert ids == sorted(ids, key=lambda i: (first[i], i)), "blobs in path order, oldest first"
    # Its frames are indexed: one mpack_frames row per frame, every index
    # row names its frame.
    frames = db.rows(f"SELECT frame_no, data_offset, data_length, codec, size, blob_count FROM mpack_frames"
                     f" WHERE mpack_id = {sql_str(key)} ORDER BY frame_no")
    assert frames and [int(f[0]) for f in frames] == list(range(len(frames)))
    assert sum(int(f[5]) for f in frames) == len(ids)
    assert db.count(f"SELECT count(*) FROM mpack_index WHERE mpack_id = {sql_str(key)} AND frame_no IS NULL") == 0
    for f in frames:
        raw = located(server, {key: data}, key, int(f[1]), int(f[2]), f[3], 0, int(f[4]))
        assert len(raw) == int(f[4])
    # objects.storage_uri follows the index to the consolidated pack.
    assert db.count(
        "SELECT count(*) FROM object_refs r JOIN objects o USING (object_id)"
        f" WHERE r.repo_id = {sql_str(repo['repo_id'])}"
        f" AND o.storage_uri NOT LIKE {sql_str('mpack://' + key + '#%/%')}") == 0
    check_objects_readable(db, server, repo["repo_id"], hists)


def test_pg4_gc_is_idempotent(hub, repo, db):
    hists = chain(2)
    push_chain(hub, repo["slug"], hists)
    first = run_job(hub, repo["repo_id"], "mpack.gc")["result"]
    second = run_job(hub, repo["repo_id"], "mpack.gc")["result"]
    assert first["consolidated_key"] == second["consolidated_key"]
    assert second["skipped"] is True
    assert second["packs_before"] == second["packs_after"] == 1
    n = len(all_blob_ids(hists))
    assert db.count(
        "SELECT count(*) FROM object_refs r JOIN mpack_index i USING (object_id)"
        f" WHERE r.repo_id = {sql_str(repo['repo_id'])}") == n, "no duplicate index rows"


def test_pg5_gc_skips_single_pack_repo(hub, repo, db):
    h = small_history()
    key = hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)["mpack_key"]
    res = run_job(hub, repo["repo_id"], "mpack.gc")["result"]
    assert res["skipped"] is True
    assert res["packs_before"] == res["packs_after"] == 1
    assert res["consolidated_key"] == key
    assert distinct_packs(db, repo["repo_id"]) == 1


def test_pg6_fetch_same_objects_before_and_after_gc(hub, repo, db):
    hists = chain(3, commits=4)
    push_chain(hub, repo["slug"], hists)
    head = hists[-1].head
    before_res, before = clone_blobs(hub, repo["slug"], head)
    mid = hists[0].head
    known = {hists[0].commits[-1]["snapshot_id"]: hists[0].manifests[mid]}
    before_inc_res, before_inc = clone_blobs(hub, repo["slug"], head, [mid], known)
    assert distinct_packs(db, repo["repo_id"]) == 3
    assert run_job(hub, repo["repo_id"], "mpack.gc")["status"] == "done"
    assert distinct_packs(db, repo["repo_id"]) == 1
    bump_state(db, repo["repo_id"])  # rebuild, do not answer from the cache
    after_res, after = clone_blobs(hub, repo["slug"], head)
    after_inc_res, after_inc = clone_blobs(hub, repo["slug"], head, [mid], known)
    assert after == before and after_res["object_count"] == before_res["object_count"]
    assert after_res["mpack_id"] == before_res["mpack_id"]
    assert after_inc == before_inc and after_inc_res["object_count"] == before_inc_res["object_count"]
    # Single objects are read from the consolidated pack too.
    oid = next(iter(after))
    r = hub.object(OWNER, repo["slug"], oid)
    assert r.status_code == 200 and muselib.blob_id(r.content) == oid


def test_gc_key_depends_only_on_content(hub, make_repo):
    """The same blobs split into different packs consolidate to the same key."""
    a, b = make_repo(), make_repo()
    hists = chain(3)
    push_chain(hub, a["slug"], hists)
    h01 = muselib.build_mpack(hists[0].commits + hists[1].commits,
                              hists[0].snapshots + hists[1].snapshots,
                              hists[0].blobs + hists[1].blobs)
    hub.push(OWNER, b["slug"], h01, "main", hists[1].head)
    hub.push(OWNER, b["slug"], hists[2].pack(), "main", hists[2].head)
    ka = run_job(hub, a["repo_id"], "mpack.gc")["result"]
    kb = run_job(hub, b["repo_id"], "mpack.gc")["result"]
    assert ka["packs_before"] == 3 and kb["packs_before"] == 2
    assert ka["consolidated_key"] == kb["consolidated_key"]


def test_gc_keeps_packs_other_repositories_reference(server, hub, make_repo, db):
    """Objects shared with another repository keep working there: a pack the
    other repository still references is neither superseded nor stripped of
    its index rows."""
    a, b = make_repo(), make_repo()
    hists = chain(2)
    p0 = hub.push(OWNER, a["slug"], hists[0].pack(), "main", hists[0].head)["mpack_key"]
    p1 = hub.push(OWNER, a["slug"], hists[1].pack(), "main", hists[1].head)["mpack_key"]
    assert hub.push(OWNER, b["slug"], hists[0].pack(), "main", hists[0].head)["mpack_key"] == p0
    res = run_job(hub, a["repo_id"], "mpack.gc")["result"]
    assert res["packs_before"] == 2 and res["packs_after"] == 1
    g = res["consolidated_key"]
    sup = dict(db.rows(f"SELECT mpack_id, superseded_at IS NOT NULL FROM mpacks"
                       f" WHERE mpack_id IN ({sql_str(p0)}, {sql_str(p1)})"))
    assert sup == {p0: "f", p1: "t"}
    assert db.count(f"SELECT count(*) FROM mpack_index WHERE mpack_id = {sql_str(p0)}") == len(hists[0].blobs)
    assert db.count(f"SELECT count(*) FROM mpack_index WHERE mpack_id = {sql_str(p1)}") == 0
    assert repo_packs(db, b["repo_id"]) == [p0]
    check_objects_readable(db, server, b["repo_id"], hists[:1])
    check_objects_readable(db, server, a["repo_id"], hists)
    _, got = clone_blobs(hub, b["slug"], hists[0].head)
    assert got == all_blob_ids(hists[:1])
    # b's own GC: one pack, skipped; a's pack stays as it is.
    assert run_job(hub, b["repo_id"], "mpack.gc")["result"]["skipped"] is True
    assert repo_packs(db, a["repo_id"]) == [g]


def test_gc_waits_for_a_writer_referencing_a_pack_it_replaces(server, hub, make_repo, db):
    """A repository holds the blobs of the packs it references (the
    object_refs view, sql/0050). While another repository's transaction
    is referencing one of the packs a GC replaces (the pack's lock held,
    its mpack_refs row not committed yet: what a push of the same bytes
    does), the GC waits for the pack's lock, then sees the row and leaves
    the pack's index rows alone. Before, GC decided from a snapshot
    without the row and deleted them: the other repository committed a
    reference to a pack that gave it no blobs."""
    a, b = make_repo(), make_repo()
    hists = chain(2)
    p0 = hub.push(OWNER, a["slug"], hists[0].pack(), "main", hists[0].head)["mpack_key"]
    hub.push(OWNER, a["slug"], hists[1].pack(), "main", hists[1].head)
    n0 = len(hists[0].blobs)
    assert db.count(f"SELECT count(*) FROM object_refs WHERE repo_id = {sql_str(b['repo_id'])}") == 0
    # The writer: b's reference to p0, in an open transaction under p0's lock.
    from e2e_util import PSQL
    w = subprocess.Popen([PSQL, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db.url], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        w.stdin.write("BEGIN;\n"
                      f"SELECT pg_advisory_xact_lock(hashtextextended('musehub:mpack:' || {sql_str(p0)}, 0));\n"
                      f"INSERT INTO mpack_refs (repo_id, mpack_id) VALUES ({sql_str(b['repo_id'])}, {sql_str(p0)});\n"
                      "SELECT 1;\n")
        w.stdin.flush()
        deadline = time.monotonic() + 10
        while db.count("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())") == 0:
            assert time.monotonic() < deadline, "the writer never took the pack's lock"
            time.sleep(0.02)
        j = enqueue(hub, a["repo_id"], "mpack.gc")
        # GC reaches the old packs' locks and waits there.
        deadline = time.monotonic() + 20
        while db.count("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())") == 0:
            assert get_job(hub, j["job_id"])["status"] in ("pending", "running"), "GC did not wait for the lock"
            assert time.monotonic() < deadline, "GC never waited for the writer's pack lock"
            time.sleep(0.02)
        w.stdin.write("COMMIT;\n")
        w.stdin.close()
        assert w.wait(timeout=30) == 0, w.stderr.read()
    finally:
        if w.poll() is None:
            w.kill()
    res = wait_job(hub, j["job_id"])
    assert res["status"] == "done" and res["result"]["packs_before"] == 2, res
    assert db.scalar(f"SELECT superseded_at IS NULL FROM mpacks WHERE mpack_id = {sql_str(p0)}") == "t"
    assert db.count(f"SELECT count(*) FROM mpack_index WHERE mpack_id = {sql_str(p0)}") == n0
    assert db.count(f"SELECT count(*) FROM object_refs WHERE repo_id = {sql_str(b['repo_id'])}") == n0


def test_gc_ignores_fetch_packs(hub, repo, db):
    h = small_history()
    key = hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)["mpack_key"]
    res = hub.fetch(OWNER, repo["slug"], [h.head])
    assert res["mpack_id"]
    assert db.scalar(f"SELECT kind FROM mpacks WHERE mpack_id = {sql_str(res['mpack_id'])}") == "fetch"
    out = run_job(hub, repo["repo_id"], "mpack.gc")["result"]
    assert out["skipped"] is True and out["packs_before"] == 1 and out["consolidated_key"] == key


def test_gc_then_push_then_gc(server, hub, repo, db):
    """A push after a GC adds a pack; the next GC folds it in."""
    hists = chain(4)
    push_chain(hub, repo["slug"], hists[:2])
    g1 = run_job(hub, repo["repo_id"], "mpack.gc")["result"]["consolidated_key"]
    push_chain(hub, repo["slug"], hists[2:])
    res = run_job(hub, repo["repo_id"], "mpack.gc")["result"]
    assert res["packs_before"] == 3 and res["packs_after"] == 1
    assert res["consolidated_key"] != g1
    assert db.scalar(f"SELECT superseded_at IS NOT NULL FROM mpacks WHERE mpack_id = {sql_str(g1)}") == "t"
    check_objects_readable(db, server, repo["repo_id"], hists)
    # Within the grace period the superseded packs stay in the store.
    assert pack_path(server, g1).exists()


def test_sweep_deletes_superseded_packs_after_grace(start_server):
    srv = start_server(MUSEHUB_MPACK_GRACE_SECONDS="1", MUSEHUB_JOB_MAINTENANCE_SECONDS="1")
    db = srv.db
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("sweep"))
        hists = chain(3)
        keys = push_chain(hub, r["slug"], hists)
        res = run_job(hub, r["repo_id"], "mpack.gc")["result"]
        g = res["consolidated_key"]
        deadline = time.monotonic() + 15
        while any(pack_path(srv, k).exists() for k in keys) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(pack_path(srv, k).exists() for k in keys)
        assert pack_path(srv, g).exists()
        assert db.count("SELECT count(*) FROM mpacks WHERE mpack_id IN ("
                        + ",".join(sql_str(k) for k in keys) + ")") == 0
        check_objects_readable(db, srv, r["repo_id"], hists)
        bump_state(db, r["repo_id"])
        _, got = clone_blobs(hub, r["slug"], hists[-1].head)
        assert got == all_blob_ids(hists)


def test_finished_jobs_are_pruned(start_server):
    srv = start_server(MUSEHUB_JOB_RETENTION_HOURS="1", MUSEHUB_JOB_MAINTENANCE_SECONDS="1")
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("prune"))
        old = run_job(hub, r["repo_id"], "mpack.gc")
        new = run_job(hub, r["repo_id"], "mpack.gc")
        srv.db.execute("UPDATE jobs SET updated_at = now() - interval '2 hours'"
                       f" WHERE job_id = {sql_str(old['job_id'])}")
        deadline = time.monotonic() + 10
        while hub.raw("GET", f"/api/jobs/{old['job_id']}").status_code != 404:
            assert time.monotonic() < deadline, "old job not pruned"
            time.sleep(0.2)
        assert get_job(hub, new["job_id"])["status"] == "done"


def test_fetch_cache_is_pruned_and_its_packs_swept(start_server):
    """The fetch-answer cache is pruned (issue: fetch_packs rows and fetch
    packs were never deleted): answers older than
    MUSEHUB_FETCH_CACHE_SECONDS lose their row in the maintenance pass, and
    a pack no remaining answer names is superseded, then swept after the
    grace period, in the store too. Never a pack still referenced: one a
    younger answer names (the same request on a newer state builds the
    same bytes), nor one a client pushed into a repository."""
    srv = start_server(MUSEHUB_FETCH_CACHE_SECONDS="3600", MUSEHUB_MPACK_GRACE_SECONDS="1",
                       MUSEHUB_JOB_MAINTENANCE_SECONDS="1")
    db = srv.db
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("fcache"))
        other = hub.create_repo(OWNER, unique("fcache-b"))
        h = small_history()
        hub.push(OWNER, r["slug"], h.pack(), "main", h.head)
        rid = sql_str(r["repo_id"])

        def fetch(want=h.head, **kw):
            res = hub.fetch(OWNER, r["slug"], [want], **kw)
            assert res["mpack_id"] and res["mpack_url"], res
            return res

        def age(mpack_id, seq=None):
            cond = f" AND state_seq = {seq}" if seq is not None else ""
            db.execute(f"UPDATE fetch_packs SET created_at = now() - interval '2 hours'"
                       f" WHERE repo_id = {rid} AND mpack_id = {sql_str(mpack_id)}{cond}")

        kept = fetch(formats=[2])["mpack_id"]        # named again by a younger answer
        old_seq = db.scalar(f"SELECT state_seq FROM repos WHERE repo_id = {rid}")
        bump_state(db, r["repo_id"])
        assert fetch(formats=[2])["mpack_id"] == kept  # same request, new state: the same bytes
        gone = fetch(formats=[1])                       # only this answer names it
        below = h.commits[-2]["commit_id"]
        pushed = fetch(want=below, formats=[2])         # a client pushes these bytes elsewhere
        hub.push(OWNER, other["slug"], hub.download(pushed["mpack_url"]), "main", below)
        assert db.count(f"SELECT count(*) FROM mpack_refs WHERE mpack_id = {sql_str(pushed['mpack_id'])}") == 1
        assert len({kept, gone["mpack_id"], pushed["mpack_id"]}) == 3
        for k in (kept, gone["mpack_id"], pushed["mpack_id"]):
            assert db.scalar(f"SELECT kind FROM mpacks WHERE mpack_id = {sql_str(k)}") == "fetch"
            assert pack_path(srv, k).exists()
        age(kept, old_seq)
        age(gone["mpack_id"])
        age(pushed["mpack_id"])

        deadline = time.monotonic() + 20
        while (pack_path(srv, gone["mpack_id"]).exists()
               or db.count(f"SELECT count(*) FROM mpacks WHERE mpack_id = {sql_str(gone['mpack_id'])}")):
            assert time.monotonic() < deadline, "the pruned answer's pack was not swept"
            time.sleep(0.2)
        assert db.count(f"SELECT count(*) FROM fetch_packs WHERE repo_id = {rid}"
                        " AND created_at < now() - interval '1 hour'") == 0
        # Still referenced: kept, in the store and not superseded.
        for k in (kept, pushed["mpack_id"]):
            assert pack_path(srv, k).exists(), k
            assert db.scalar(f"SELECT superseded_at IS NULL FROM mpacks WHERE mpack_id = {sql_str(k)}") == "t", k
        assert db.count(f"SELECT count(*) FROM fetch_packs WHERE mpack_id = {sql_str(kept)}") == 1
        assert hub.download(fetch(formats=[2])["mpack_url"])  # the younger answer


def test_a_pruned_fetch_answer_is_built_again(start_server):
    """A process's own answer cache expires with the answer's row
    (MUSEHUB_FETCH_CACHE_SECONDS): once the maintenance pass has pruned the
    row and the sweep has deleted the pack, the same request is built
    again, recorded and downloadable, never answered with the deleted
    pack's URL."""
    srv = start_server(MUSEHUB_FETCH_CACHE_SECONDS="2", MUSEHUB_MPACK_GRACE_SECONDS="1",
                       MUSEHUB_JOB_MAINTENANCE_SECONDS="1")
    db = srv.db
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("fcache2"))
        h = small_history()
        hub.push(OWNER, r["slug"], h.pack(), "main", h.head)
        first = hub.fetch(OWNER, r["slug"], [h.head], formats=[2])
        key = sql_str(first["mpack_id"])
        assert pack_path(srv, first["mpack_id"]).exists()
        deadline = time.monotonic() + 30
        while pack_path(srv, first["mpack_id"]).exists() or db.count(f"SELECT count(*) FROM mpacks WHERE mpack_id = {key}"):
            assert time.monotonic() < deadline, "the expired answer's pack was not swept"
            time.sleep(0.2)
        assert db.count(f"SELECT count(*) FROM fetch_packs WHERE mpack_id = {key}") == 0
        again = hub.fetch(OWNER, r["slug"], [h.head], formats=[2])
        assert again["mpack_id"] == first["mpack_id"]  # the same request on the same state: the same bytes
        assert muselib.blob_id(hub.download(again["mpack_url"])) == first["mpack_id"]
        assert db.scalar(f"SELECT superseded_at IS NULL FROM mpacks WHERE mpack_id = {key}") == "t"


# ---------------------------------------------------------------------------
# Workers, crashes, concurrency
# ---------------------------------------------------------------------------

class Worker:
    """A `musehubd worker` process sharing a server's database and store."""

    def __init__(self, srv, log_path, **env):
        e = dict(srv.env)
        e.pop("MUSEHUB_DEV_IDENTITY", None)
        e["MUSEHUB_JOBS"] = "1"
        e.update({k: str(v) for k, v in env.items()})
        from conftest import server_binary
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([server_binary(), "worker"], env=e, stdout=self.log,
                                     stderr=self.log, stdin=subprocess.DEVNULL)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def wait_ready(self, timeout=15.0):
        """Until the worker logged that it runs jobs (a SIGTERM sent while
        the process is still being exec'd would kill it outright)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if b"worker running jobs" in Path(self.log.name).read_bytes():
                return
            time.sleep(0.01)
        raise AssertionError(f"worker not ready: {Path(self.log.name).read_text(errors='replace')[-2000:]}")

    def stop(self):
        self.wait_ready()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(40)
        self.log.close()
        return rc


def test_worker_subcommand_runs_jobs_and_stops_cleanly(start_server, tmp_path):
    srv = start_server(MUSEHUB_JOBS="0")
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("w"))
        push_chain(hub, r["slug"], chain(2))
        j = enqueue(hub, r["repo_id"], "mpack.gc")
        time.sleep(0.5)
        assert get_job(hub, j["job_id"])["status"] == "pending", "MUSEHUB_JOBS=0 runs no jobs"
        w = Worker(srv, tmp_path / "worker.log")
        try:
            done = wait_job(hub, j["job_id"], timeout=20)
            assert done["status"] == "done" and done["result"]["packs_after"] == 1
        finally:
            assert w.stop() == 0


@pytest.mark.slow
def test_gc_survives_sigkill_of_its_worker(start_server, tmp_path):
    """SIGKILL the worker at several moments of a GC: after a restart the job
    completes (the dead worker's lease expires and another run takes over)
    and every object still resolves and fetches, whatever the moment of
    the kill."""
    srv = start_server(MUSEHUB_JOBS="0")
    db = srv.db
    rng = random.Random(int(os.environ.get("MUSEHUB_TEST_SEED", "4242")))
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("kill"))
        hists = chain(20, commits=20, files=400, changed=5, blob_size=512)
        push_chain(hub, r["slug"], hists)
        head = hists[-1].head
        _, before = clone_blobs(hub, r["slug"], head)
        j = enqueue(hub, r["repo_id"], "mpack.gc")
        mid_job_kills = 0
        for i, delay in enumerate((0.005, 0.03, 0.06, 0.1)):
            prev = get_job(hub, j["job_id"])["attempt"]
            log = tmp_path / f"worker-{i}.log"
            w = Worker(srv, log, MUSEHUB_JOB_LEASE_SECONDS=3, MUSEHUB_LOG_LEVEL="debug")
            # Wait for this worker's claim (after the previous worker's
            # lease expired) so the kill lands inside the job.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                cur = get_job(hub, j["job_id"])
                if cur["attempt"] > prev or cur["status"] == "done":
                    break
                time.sleep(0.002)
            time.sleep(delay * rng.uniform(0.5, 1.5))
            w.kill()
            text = log.read_text(errors="replace")
            if "mpack.gc step" in text and " done in " not in text:
                mid_job_kills += 1
            if get_job(hub, j["job_id"])["status"] == "done":
                break
            # Objects stay readable whatever the moment of the kill.
            check_objects_readable(db, srv, r["repo_id"], hists)
        w = Worker(srv, tmp_path / "worker-final.log", MUSEHUB_JOB_LEASE_SECONDS=3)
        try:
            done = wait_job(hub, j["job_id"], timeout=60)
        finally:
            assert w.stop() == 0
        assert done["status"] == "done", done
        assert done["result"]["packs_after"] == 1
        assert mid_job_kills >= 1, "no kill landed inside the GC; make the repository bigger"
        assert len(repo_packs(db, r["repo_id"])) == 1
        assert distinct_packs(db, r["repo_id"]) == 1
        check_objects_readable(db, srv, r["repo_id"], hists)
        bump_state(db, r["repo_id"])
        _, after = clone_blobs(hub, r["slug"], head)
        assert after == before


@pytest.mark.slow
def test_fetch_across_the_swap(hub, repo, db):
    """Fetches run continuously (each with a different `have`, so each is
    built from the source packs) while pushes and GCs swap the packs under
    them: every fetch succeeds and carries exactly what it should."""
    hists = chain(12, commits=4, files=40, changed=3, blob_size=256)
    manifests = {}
    snap_of = {}
    for h in hists:
        manifests.update(h.manifests)
        for c in h.commits:
            snap_of[c["commit_id"]] = c["snapshot_id"]
    push_chain(hub, repo["slug"], hists[:4])
    errors: list = []
    stop = threading.Event()
    done_fetches = [0]
    pushed = [4]

    def fetcher():
        rnd = random.Random(7)
        with muselib.Hub(hub.base_url) as h2:
            while not stop.is_set():
                top = hists[pushed[0] - 1]
                commits = [c["commit_id"] for hh in hists[:pushed[0]] for c in hh.commits]
                have = rnd.choice(commits[:-1])
                known = {snap_of[have]: manifests[have]}
                try:
                    res = h2.clone(OWNER, repo["slug"], [top.head], [have], known_manifests=known,
                                   known_objects=set(manifests[have].values()))
                    assert res["pack"] is not None or top.head == have
                    done_fetches[0] += 1
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(repr(e))
                    return

    t = threading.Thread(target=fetcher)
    t.start()
    try:
        for k in range(4, 12, 2):
            push_chain(hub, repo["slug"], hists[k:k + 2])
            pushed[0] = k + 2
            done = run_job(hub, repo["repo_id"], "mpack.gc")
            assert done["status"] == "done", done
            assert done["result"]["packs_after"] == 1
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors[:3]
    assert done_fetches[0] > 5
