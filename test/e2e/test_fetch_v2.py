"""Fetch of mpack v2 and shallow fetch (SPEC 4.4, 2.1), the packs the
server builds itself (GC, server-side commits: v2), and reading single
objects out of v2 frames (SPEC 4.5), against the real binary on both
stores.

Every pack is downloaded, hashed against its id and read back with the
client library's reader (`muselib.parse_mpack`: v1 and v2, every blob
hashed, every snapshot rebuilt and every commit id recomputed by
`rebuild_and_verify`), so a wrong byte anywhere shows.

  formats/depth   422 for bad values; mpack_version in the answer
  v1 vs v2        the same ids from both versions of the same fetch
  reuse           a clone of a GC'd (v2) history copies its frames byte
                  for byte (and counts them in /metrics); a partial fetch
                  recompresses frames whose blobs are not all wanted
  shallow         depth 1 and 10 of the seed history, an incremental
                  fetch on top, a deepening fetch below
  cache keys      same request -> same mpack_id; other formats or depth
                  -> another pack
  objects         GET /objects with and without Range on v1- and
                  v2-sourced blobs (small: one get; large: streamed)
  memory          (slow) clones of a history of several hundred MB with
                  MUSEHUB_PACK_MEMORY=32MiB: the server's VmHWM stays
                  under the budget plus a fixed overhead; clones beyond
                  the budget wait or get 503 + Retry-After and all finish
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time

import pytest

import muselib
from e2e_util import sql_str, unique
from test_jobs import (all_blob_ids, bump_state, chain, check_objects_readable, push_chain, run_job)

OWNER = "gabriel"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def fetch(hub, slug, want, have=None, formats=None, depth=None, expect=(200,)):
    body = {"want": list(want), "have": list(have or [])}
    if formats is not None:
        body["formats"] = formats
    if depth is not None:
        body["depth"] = depth
    return hub.call("POST", f"/{OWNER}/{slug}/fetch", body, expect=expect)


def get_pack(hub, res):
    """The pack an answer names: (bytes, parsed) or (None, None)."""
    if not res.get("mpack_url"):
        return None, None
    data = hub.download(res["mpack_url"])
    assert muselib.blob_id(data) == res["mpack_id"]
    pack = muselib.parse_mpack(data)
    assert pack["version"] == res["mpack_version"]
    assert len(pack["commits"]) == res["commit_count"]
    assert len(pack["snapshots"]) == res["snapshot_count"]
    assert len(pack["blobs"]) == res["blob_count"] == res["object_count"]
    return data, pack


def clone(hub, slug, want, have=None, known=None, formats=None, depth=None):
    """fetch + download + full verification; returns (answer, pack, manifests)."""
    res = fetch(hub, slug, want, have, formats, depth)
    data, pack = get_pack(hub, res)
    if pack is None:
        return res, None, {}
    known_objects = set().union(*[set(m.values()) for m in known.values()]) if known else set()
    mans = muselib.rebuild_and_verify(pack, known or {}, known_objects if (known or not have) else None)
    return res, pack, mans


def ids_of(pack):
    return ({c["commit_id"] for c in pack["commits"]}, {s["snapshot_id"] for s in pack["snapshots"]},
            {b["object_id"] for b in pack["blobs"]})


def frames_data(data):
    """The `data` bytes of each frame of a v2 pack."""
    import io
    idx = muselib.read_pack(io.BytesIO(data), verify=False)
    return [data[f[2]:f[2] + f[3]] for f in idx.frames]


def metric(hub, name, labels=""):
    text = hub.raw("GET", "/metrics").text
    m = re.search(r"^" + re.escape(name + labels) + r" (\d+)$", text, re.M)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------------
# request fields
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    {"formats": []}, {"formats": "2"}, {"formats": [3]}, {"formats": [0]}, {"formats": [1.5]},
    {"formats": ["1"]}, {"formats": [-1]}, {"formats": list(range(1, 20))},
    {"depth": 0}, {"depth": -1}, {"depth": 2 ** 31 + 1}, {"depth": "1"}, {"depth": 1.5}, {"depth": [1]},
])
def test_bad_formats_or_depth_422(hub, repo, body):
    h = muselib.generate(commits=2, files=3, seed=unique("f"))
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    err = hub.call("POST", f"/{OWNER}/{repo['slug']}/fetch", {"want": [h.head], **body}, expect=(422,),
                   fmt="json", accept="application/json")
    assert err["error"] == "invalid_request"
    assert ("formats" in err["detail"]) == ("formats" in body)


def test_formats_choose_the_highest_version(hub, repo):
    h = muselib.generate(commits=3, files=5, seed=unique("f"))
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    for formats, version in ((None, 1), ([1], 1), ([2], 2), ([1, 2], 2), ([2, 1, 7], 2), ([1, 3], 1)):
        res = fetch(hub, repo["slug"], [h.head], formats=formats)
        assert res["mpack_version"] == version, (formats, res)
        assert res["shallow"] == []
        data, pack = get_pack(hub, res)
        assert data[:5] == b"MUSE" + bytes([version])
    # depth at the upper bound is accepted
    res = fetch(hub, repo["slug"], [h.head], depth=2 ** 31)
    assert res["commit_count"] == 3 and res["shallow"] == []


# ---------------------------------------------------------------------------
# v1 and v2 of the same history
# ---------------------------------------------------------------------------

def test_v1_and_v2_fetch_give_the_same_ids(hub, seed_repo):
    slug, h = seed_repo["repo"]["slug"], seed_repo["history"]
    r1, p1, m1 = clone(hub, slug, [h.head], formats=[1])
    r2, p2, m2 = clone(hub, slug, [h.head], formats=[1, 2])
    assert r1["mpack_version"] == 1 and r2["mpack_version"] == 2
    assert ids_of(p1) == ids_of(p2)
    assert ids_of(p1)[2] == {b["object_id"] for b in h.blobs}
    assert m1 == m2 and m1[h.commits[-1]["snapshot_id"]] == h.manifest
    assert r2["mpack_id"] != r1["mpack_id"]
    # Compressed frames: the v2 clone is much smaller.
    d1, d2 = hub.download(r1["mpack_url"]), hub.download(r2["mpack_url"])
    assert len(d2) * 4 < len(d1), (len(d1), len(d2))
    # Incremental fetches too: v1 and v2 agree (ids; the deltas against
    # the client's snapshot need its manifest to be rebuilt).
    mid = h.commits[500]["commit_id"]
    i1 = fetch(hub, slug, [h.head], [mid], formats=[1])
    i2 = fetch(hub, slug, [h.head], [mid], formats=[2])
    q1, q2 = get_pack(hub, i1)[1], get_pack(hub, i2)[1]
    assert ids_of(q1) == ids_of(q2) and i1["commit_count"] == len(h.commits) - 501


# ---------------------------------------------------------------------------
# v2 sources: GC, frame reuse, partial fetches
# ---------------------------------------------------------------------------

def gc_repo(hub, make_repo, n=4, **kw):
    r = make_repo()
    hists = chain(n, **kw)
    push_chain(hub, r["slug"], hists)
    res = run_job(hub, r["repo_id"], "mpack.gc")
    assert res["status"] == "done", res
    return r, hists, res["result"]["consolidated_key"]


def test_clone_of_gc_pack_copies_frames(server, hub, make_repo, db):
    r, hists, key = gc_repo(hub, make_repo, n=4, commits=6, files=40, changed=4, blob_size=2000)
    gc_data = server.store_path(key).read_bytes()
    assert gc_data[:5] == b"MUSE\x02"
    before = metric(hub, "musehub_pack_build_frames_total", '{kind="reused"}')
    res, pack, mans = clone(hub, r["slug"], [hists[-1].head], formats=[1, 2])
    assert ids_of(pack)[2] == all_blob_ids(hists)
    data = hub.download(res["mpack_url"])
    ours, theirs = frames_data(data), set(frames_data(gc_data))
    copied = [f for f in ours if f in theirs]
    # Every blob of the repository is wanted by a full clone: every frame
    # of the consolidated pack comes over as it is stored.
    assert len(copied) == len(theirs) and len(ours) == len(theirs), (len(copied), len(ours), len(theirs))
    assert metric(hub, "musehub_pack_build_frames_total", '{kind="reused"}') - before == len(theirs)
    # The v1 clone of the same state reads the frames and sends raw blobs.
    r1, p1, m1 = clone(hub, r["slug"], [hists[-1].head], formats=[1])
    assert ids_of(p1) == ids_of(pack) and m1 == mans
    check_objects_readable(db, server, r["repo_id"], hists)


def test_clone_prefers_the_v2_source_to_a_v1_copy(server, hub, make_repo):
    """The same blobs stored twice, raw in a v1 pack another repository
    pushed (its key sorting first) and in this repository's GC pack: the
    builder reads the v2 frames, not the raw copy (a clone of libuv's
    history read 364 MB through 91 v1 packs instead of one 5.6 MB pack)."""
    # Each blob order gives the v1 pack another key. With the GC pack's key
    # uniform, n orders find none before it with probability 1/(n+1): 1/65
    # at 64 orders, which CI met once. A key so small that 4096 orders miss
    # it gets a new history (new seed, new key); three misses in a row
    # would take odds of about 1e-11.
    for _ in range(3):
        r, hists, key = gc_repo(hub, make_repo, n=3, commits=4, files=20, changed=3, blob_size=1500)
        commits = [c for h in hists for c in h.commits]
        snaps = [s for h in hists for s in h.snapshots]
        blobs = list({b["object_id"]: b for h in hists for b in h.blobs}.values())
        rnd = random.Random(7)
        for _ in range(4096):
            rnd.shuffle(blobs)
            raw = muselib.build_mpack(commits, snaps, blobs)
            if "sha256:" + hashlib.sha256(raw).hexdigest() < key:
                break
        else:
            continue
        break
    else:
        pytest.fail("no v1 pack order with a key before the GC pack's, in three histories")
    other = make_repo()
    assert hub.push(OWNER, other["slug"], raw, "main", hists[-1].head)["objects_written"] == len(blobs)
    gc_frames = set(frames_data(server.store_path(key).read_bytes()))
    before = metric(hub, "musehub_pack_build_frames_total", '{kind="reused"}')
    res, pack, _ = clone(hub, r["slug"], [hists[-1].head], formats=[1, 2])
    assert ids_of(pack)[2] == all_blob_ids(hists)
    assert set(frames_data(hub.download(res["mpack_url"]))) == gc_frames
    assert metric(hub, "musehub_pack_build_frames_total", '{kind="reused"}') - before == len(gc_frames)


def test_partial_fetch_recompresses(server, hub, make_repo):
    r, hists, key = gc_repo(hub, make_repo, n=3, commits=5, files=30, changed=3, blob_size=1500)
    mid = hists[0].head
    known = {hists[0].commits[-1]["snapshot_id"]: hists[0].manifests[mid]}
    gc_frames = set(frames_data(server.store_path(key).read_bytes()))
    res, pack, _ = clone(hub, r["slug"], [hists[-1].head], [mid], known, formats=[2])
    want = all_blob_ids(hists[1:]) - set(hists[0].manifests[mid].values())
    assert ids_of(pack)[2] == want
    data = hub.download(res["mpack_url"])
    # The GC pack's frames hold every version of each path: a fetch of the
    # newer ones wants part of each, so none is copied; all verify.
    assert not [f for f in frames_data(data) if f in gc_frames]
    v1, p1, _ = clone(hub, r["slug"], [hists[-1].head], [mid], known, formats=[1])
    assert ids_of(p1) == ids_of(pack)


def test_server_side_commit_pack_is_v2_and_fetchable(server, hub, repo, db):
    import base64
    files = {f"dir/f{i}.txt": (f"line {i}\n" * (50 + i)).encode() for i in range(10)}
    files["big.bin"] = random.Random(7).randbytes(3 << 20)
    enc = {p: base64.b64encode(c).decode() for p, c in files.items()}
    res = hub.call("POST", f"/api/repos/{repo['repo_id']}/commits", {"branch": "main", "message": "m", "files": enc},
                   expect=(201,))
    data = server.store_path(res["mpack_id"]).read_bytes()
    assert data[:5] == b"MUSE\x02"
    assert db.count(f"SELECT count(*) FROM mpack_frames WHERE mpack_id = {sql_str(res['mpack_id'])}") >= 1
    for fmt in ([1], [1, 2]):
        ans, pack, mans = clone(hub, repo["slug"], [res["commit_id"]], formats=fmt)
        assert {b["object_id"]: b["content"] for b in pack["blobs"]} == \
            {muselib.blob_id(c): c for c in files.values()}


# ---------------------------------------------------------------------------
# shallow fetch (SPEC 4.4 depth)
# ---------------------------------------------------------------------------

def test_shallow_clones_incremental_and_deepening(hub, make_repo, seed000, server):
    r = make_repo()
    slug = r["slug"]
    hub.push(OWNER, slug, seed000.pack(), "main", seed000.head)
    commits = seed000.commits
    by_id = {c["commit_id"]: i for i, c in enumerate(commits)}
    n = len(commits)
    for depth in (1, 10):
        for formats in ([1], [1, 2]):
            res, pack, mans = clone(hub, slug, [seed000.head], formats=formats, depth=depth)
            assert res["commit_count"] == depth
            assert {c["commit_id"] for c in pack["commits"]} == {c["commit_id"] for c in commits[n - depth:]}
            # The oldest sent commit's parent was left out.
            assert res["shallow"] == [commits[n - depth]["commit_id"]]
            # Verified on its own: the shallow commit's snapshot is a root,
            # and every object the snapshots name is in the pack.
            roots = [s for s in pack["snapshots"] if s["parent_snapshot_id"] is None]
            assert [s["snapshot_id"] for s in roots] == [commits[n - depth]["snapshot_id"]]
            assert mans[commits[-1]["snapshot_id"]] == seed000.manifest
            # Exactly the objects of the trees sent (rebuild_and_verify
            # checked that nothing is missing).
            assert ids_of(pack)[2] == set().union(*[set(m.values()) for m in mans.values()])
    # The client is now shallow at depth 10: it holds commits[n-10:].
    client = [c["commit_id"] for c in commits[n - 10:]]
    known = dict(mans)
    # Incremental: new commits on top; have = the client's commits
    # (shallow one included): only what is new comes.
    more = muselib.generate(commits=4, files=700, changed=5, seed="", parent=(seed000.head, seed000.manifest),
                            first_index=n)
    hub.push(OWNER, slug, more.pack(), "main", more.head)
    res, pack, mans2 = clone(hub, slug, [more.head], client, known)
    assert res["commit_count"] == 4 and res["shallow"] == []
    assert {c["commit_id"] for c in pack["commits"]} == {c["commit_id"] for c in more.commits}
    assert mans2[more.commits[-1]["snapshot_id"]] == more.manifest
    # Deepening: ask for the left-out parent by id, five more commits.
    parent = commits[n - 11]["commit_id"]
    res, pack, mans3 = clone(hub, slug, [parent], client, known, depth=5)
    assert res["commit_count"] == 5
    assert {c["commit_id"] for c in pack["commits"]} == {c["commit_id"] for c in commits[n - 15:n - 10]}
    assert res["shallow"] == [commits[n - 15]["commit_id"]]
    # ... and without a depth, the whole rest of the history.
    res, pack, _ = clone(hub, slug, [parent], client, known, formats=[2])
    assert res["commit_count"] == n - 10 and res["shallow"] == []
    assert by_id[pack["commits"][0]["commit_id"]] == 0


# ---------------------------------------------------------------------------
# cache keys
# ---------------------------------------------------------------------------

def test_cache_keys_include_version_and_depth(hub, repo, db):
    h = muselib.generate(commits=12, files=20, seed=unique("k"))
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    answers = {}
    for formats in ([1], [1, 2]):
        for depth in (None, 1, 5):
            a = fetch(hub, repo["slug"], [h.head], formats=formats, depth=depth)
            b = fetch(hub, repo["slug"], [h.head], formats=formats, depth=depth)
            assert a["mpack_id"] == b["mpack_id"], "the same request: the same pack"
            answers[(tuple(formats), depth)] = a["mpack_id"]
    assert len(set(answers.values())) == 6, answers
    rows = db.rows(f"SELECT mpack_version, depth, array_length(shallow, 1) FROM fetch_packs"
                   f" WHERE repo_id = {sql_str(repo['repo_id'])} ORDER BY 1, 2")
    assert sorted(rows, key=str) == sorted([(v, d, s) for v in ("1", "2") for d, s in
                                            ((None, None), ("1", "1"), ("5", "1"))], key=str)
    # Another process (the shared table) answers with the same pack.
    bump = fetch(hub, repo["slug"], [h.head], formats=[2], depth=5)
    assert bump["mpack_id"] == answers[((1, 2), 5)]


# ---------------------------------------------------------------------------
# GET /objects with Range on v1- and v2-sourced blobs
# ---------------------------------------------------------------------------

def check_ranges(hub, slug, oid, content):
    r = hub.object(OWNER, slug, oid)
    assert r.status_code == 200 and r.content == content and r.headers["etag"] == f'"{oid}"'
    n = len(content)
    for spec, lo, hi in (("bytes=0-0", 0, 0), (f"bytes={n - 1}-{n - 1}", n - 1, n - 1),
                         (f"bytes={n // 3}-{n // 2}", n // 3, n // 2), ("bytes=-7", n - 7, n - 1),
                         (f"bytes={n - 5}-", n - 5, n - 1), (f"bytes=1-{n + 100}", 1, n - 1)):
        r = hub.object(OWNER, slug, oid, headers={"Range": spec})
        assert r.status_code == 206, (spec, r.status_code)
        assert r.content == content[lo:hi + 1], spec
        assert r.headers["content-range"] == f"bytes {lo}-{hi}/{n}"
    r = hub.object(OWNER, slug, oid, headers={"Range": f"bytes={n}-"})
    assert r.status_code == 416


def test_objects_with_range_v1_and_v2(server, hub, repo, db):
    rnd = random.Random(11)
    files = {"small.txt": b"hello ranges\n" * 40, "tiny": b"0123456789abcdef",
             "text.md": ("".join(f"line {i} of a longer file\n" for i in range(60000))).encode(),  # ~1.6 MB
             "noise.bin": rnd.randbytes(1_500_000)}
    import base64
    c1 = hub.call("POST", f"/api/repos/{repo['repo_id']}/commits",
                  {"branch": "main", "message": "one", "files": {"small.txt": base64.b64encode(files["small.txt"]).decode()}},
                  expect=(201,))
    # A v1 push of the rest (sources of the v1 kind), then GC to one v2 pack.
    h = muselib.History()
    base = {"small.txt": muselib.blob_id(files["small.txt"])}
    man = dict(base)
    for p in ("tiny", "text.md", "noise.bin"):
        man[p] = muselib.blob_id(files[p])
    sid = muselib.snapshot_id(man)
    snap = {"snapshot_id": sid, "parent_snapshot_id": c1["snapshot_id"],
            "delta_upsert": {p: man[p] for p in ("tiny", "text.md", "noise.bin")}, "delta_remove": []}
    ts = "2026-01-01T00:00:00.000000+00:00"
    cid = muselib.commit_id([c1["commit_id"]], sid, "two", ts, "gabriel")
    commit = {"commit_id": cid, "parent_commit_id": c1["commit_id"], "parent2_commit_id": None, "snapshot_id": sid,
              "message": "two", "author": "gabriel", "committed_at": ts, "branch": "main"}
    blobs = [{"object_id": muselib.blob_id(files[p]), "content": files[p]} for p in ("tiny", "text.md", "noise.bin")]
    hub.push(OWNER, repo["slug"], muselib.build_mpack([commit], [snap], blobs), "main", cid)
    for p, c in files.items():  # v1 sources (and the commit's v2 pack)
        check_ranges(hub, repo["slug"], muselib.blob_id(c), c)
    res = run_job(hub, repo["repo_id"], "mpack.gc")["result"]
    assert res["packs_before"] == 2 and res["packs_after"] == 1
    key = res["consolidated_key"]
    for p, c in files.items():  # v2 frames of the GC pack
        oid = muselib.blob_id(c)
        uri = db.scalar(f"SELECT storage_uri FROM objects WHERE object_id = {sql_str(oid)}")
        assert uri.startswith(f"mpack://{key}#") and "/" in uri.split("#")[1]
        check_ranges(hub, repo["slug"], oid, c)
    # HEAD and If-None-Match keep working on v2 objects.
    oid = muselib.blob_id(files["text.md"])
    r = hub.raw("HEAD", f"/{OWNER}/{repo['slug']}/objects/{oid}")
    assert r.status_code == 200 and r.content == b""
    r = hub.object(OWNER, repo["slug"], oid, headers={"If-None-Match": f'"{oid}"'})
    assert r.status_code == 304


# ---------------------------------------------------------------------------
# memory: a history of several hundred MB within a 32 MiB budget
# ---------------------------------------------------------------------------

MiB = 1 << 20
BUDGET = 32 * MiB
# What the server holds beside the budget: the idle process (binary,
# libraries, database pool: about 12 MiB), the fetch's metadata (commits,
# snapshot deltas, index rows), serving the download (fs: 1.3 MiB), and
# what one build that needs more than a small budget holds past it while
# it runs alone (s3: the writer's two 8 MiB parts make a build about
# 40 MiB). Measured: fs 45 MiB, s3 54 MiB at most for a 32 MiB budget.
OVERHEAD = 32 * MiB


def vm(srv, field="VmHWM"):
    for line in open(f"/proc/{srv.proc.pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def is_asan(srv):
    return "libasan" in open(f"/proc/{srv.proc.pid}/maps").read()


def big_history(total, seed):
    """A linear history whose blobs add up to about `total` bytes: 120
    paths, each commit rewriting 8 of them; contents are text that
    compresses (two thirds) or random bytes (one third), from 64 KiB to
    9 MiB (blobs above the 4 MiB frame target get frames of their own).
    Returns [(commits, snapshots, blobs)] in batches of about 60 MB, and
    the head."""
    rnd = random.Random(seed)
    words = [f"w{i:04d}".encode() for i in range(3000)]
    man: dict[str, str] = {}
    parent = psid = None
    batches, cur, size, n = [], ([], [], []), 0, 0
    while size < total:
        new = dict(man)
        blobs = []
        for _ in range(8):
            p = f"dir{rnd.randrange(6)}/file{rnd.randrange(120):03d}.dat"
            ln = int(rnd.choice([64 << 10, 300 << 10, 1 << 20, 2500 << 10, 9 << 20]) * rnd.uniform(0.7, 1.0))
            if rnd.random() < 1 / 3:
                c = rnd.randbytes(ln)
            else:
                c = b" ".join(rnd.choice(words) for _ in range(ln // 5 + 1))[:ln]
            oid = muselib.blob_id(c)
            new[p] = oid
            blobs.append({"object_id": oid, "content": c})
            size += ln
        sid = muselib.snapshot_id(new)
        ts = f"2026-01-01T00:00:{n % 60:02d}.{n:06d}+00:00"
        cid = muselib.commit_id([parent] if parent else [], sid, f"c{n}", ts, "gabriel")
        cur[0].append({"commit_id": cid, "parent_commit_id": parent, "parent2_commit_id": None,
                       "snapshot_id": sid, "message": f"c{n}", "author": "gabriel", "committed_at": ts,
                       "branch": "main"})
        cur[1].append(muselib.snapshot_map(sid, psid, man if psid else None, new))
        cur[2].extend(blobs)
        man, parent, psid, n = new, cid, sid, n + 1
        if sum(len(b["content"]) for b in cur[2]) > 60 * MiB:
            batches.append(cur)
            cur = ([], [], [])
    if cur[0]:
        batches.append(cur)
    return batches, parent, man


def verified_clone(hub, slug, head, formats, have=None):
    res = fetch(hub, slug, [head], have, formats)
    data, pack = get_pack(hub, res)
    muselib.rebuild_and_verify(pack, {}, set())
    return res, len(data), {b["object_id"] for b in pack["blobs"]}


@pytest.mark.slow
def test_clone_of_a_large_history_stays_within_the_budget(start_server):
    a = start_server()  # pushes and GC (its memory is not measured)
    b = start_server(share=a, MUSEHUB_JOBS="0", MUSEHUB_PACK_MEMORY=str(BUDGET),
                     MUSEHUB_PACK_QUEUE_TIMEOUT_MS="60000")
    with a.hub() as ha, b.hub() as hb:
        r = ha.create_repo(OWNER, unique("big"))
        batches, head, man = big_history(300 * MiB, 5)
        for commits, snaps, blobs in batches:
            ha.push(OWNER, r["slug"], muselib.build_mpack(commits, snaps, blobs), "main", commits[-1]["commit_id"])
        want_ids = set().union(*[{b["object_id"] for b in c[2]} for c in batches])
        base = vm(b, "VmRSS")
        sizes, peaks = {}, {}
        for src in ("v1", "v2"):
            if src == "v2":  # one GC pack: v2 sources, frames copied by [1, 2]
                g = run_job(ha, r["repo_id"], "mpack.gc", timeout=300)["result"]
                assert g["packs_after"] == 1
                bump_state(a.db, r["repo_id"])
            for formats in ([1], [1, 2]):
                res, n, ids = verified_clone(hb, r["slug"], head, formats)
                assert ids == want_ids and res["mpack_version"] == formats[-1]
                sizes[f"{src}->v{formats[-1]}"] = round(n / MiB, 1)
                peaks[f"{src}->v{formats[-1]}"] = round(vm(b) / MiB, 1)
        peak = max(peaks.values()) * MiB
        print(f"\n# clones of {sum(len(x['content']) for c in batches for x in c[2]) / MiB:.0f} MiB of blobs "
              f"(sources->output): pack MiB {sizes}; server VmHWM after each, MiB {peaks}; idle RSS "
              f"{base / MiB:.1f} MiB (bound: budget {BUDGET / MiB:.0f} MiB + {OVERHEAD / MiB:.0f} MiB)")
        if not is_asan(b):
            assert peak <= BUDGET + OVERHEAD, f"VmHWM {peak / MiB:.1f} MiB"


@pytest.mark.slow
def test_concurrent_clones_beyond_the_budget_wait_or_retry(start_server):
    a = start_server()
    b = start_server(share=a, MUSEHUB_JOBS="0", MUSEHUB_PACK_MEMORY=str(BUDGET),
                     MUSEHUB_PACK_QUEUE_TIMEOUT_MS="300")
    with a.hub() as ha:
        r = ha.create_repo(OWNER, unique("conc"))
        batches, head, man = big_history(60 * MiB, 9)
        for commits, snaps, blobs in batches:
            ha.push(OWNER, r["slug"], muselib.build_mpack(commits, snaps, blobs), "main", commits[-1]["commit_id"])
        want_ids = set().union(*[{b["object_id"] for b in c[2]} for c in batches])
        commits = [c for bt in batches for c in bt[0]]
    # Six different requests at once (different versions and depths: no
    # two share a build), each holding most of the budget while it builds.
    reqs = [([1], None), ([1, 2], None), ([1], 2), ([1, 2], 2), ([1], 3), ([1, 2], 3)]
    out, busy, errors = {}, [], []

    def one(i, formats, depth):
        try:
            with b.hub() as h:
                for attempt in range(60):
                    resp = h.raw("POST", f"/{OWNER}/{r['slug']}/fetch",
                                 {"want": [head], "have": [], "formats": formats,
                                  **({"depth": depth} if depth else {})})
                    if resp.status_code == 503:
                        assert resp.headers.get("retry-after", "").isdigit(), resp.headers
                        busy.append(i)
                        time.sleep(int(resp.headers["retry-after"]))
                        continue
                    assert resp.status_code == 200, resp.text
                    res = muselib.decode_body(resp)
                    data, pack = get_pack(h, res)
                    muselib.rebuild_and_verify(pack, {}, set())
                    out[i] = (res, {x["object_id"] for x in pack["blobs"]})
                    return
                raise AssertionError("never built")
        except BaseException as e:
            errors.append(e)

    th = [threading.Thread(target=one, args=(i, f, d)) for i, (f, d) in enumerate(reqs)]
    for t in th:
        t.start()
    for t in th:
        t.join(600)
    assert not errors, errors[0]
    assert len(out) == len(reqs)
    for i, (formats, depth) in enumerate(reqs):
        res, ids = out[i]
        assert res["mpack_version"] == formats[-1]
        assert res["commit_count"] == (depth or len(commits))
        if depth is None:
            assert ids == want_ids
    text = b.hub().raw("GET", "/metrics").text
    waits = int(re.search(r"^musehub_pack_memory_waits_total (\d+)$", text, re.M).group(1))
    timeouts = int(re.search(r"^musehub_pack_memory_timeouts_total (\d+)$", text, re.M).group(1))
    # Beyond the budget: builds queued (and, past the 300 ms queue timeout,
    # were answered 503 + Retry-After and retried).
    assert waits >= 1 and timeouts == len(busy), (waits, timeouts, len(busy))
    print(f"\n# {len(reqs)} clones at once: {waits} waited, {len(busy)} answered 503 and retried")
