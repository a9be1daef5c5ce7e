"""Answers larger than memory should hold, and clients that never read them
(issue 15 items 1 and 3, SPEC 4.5 and 4.8), and pushes larger than the
pack-memory budget (issue 14, SPEC 4.3 and 4.8), black box on a fresh
server each, its memory read from /proc/<pid>/status:

  - a push of a few hundred MB (v1 and v2) with MUSEHUB_PACK_MEMORY=32MiB:
    the staged pack is read in windows, the server's VmHWM stays under
    the budget plus PUSH_OVERHEAD (before: the whole pack was held);
    several pushes beyond the budget wait or get 503 + Retry-After and
    all succeed on retry;

  - GET /tree of a snapshot of 100k and of a million entries: 200, chunked,
    every entry right, the server's peak RSS bounded (before: 503 "out of
    memory" at 100k, 500 "stored delta is not bytea" at a million);
  - GET /_store/mpacks/<hex> of a 1 GiB pack, whole and ranged: the file is
    read in pieces, never mapped (before: RSS grew by the bytes sent);
  - a client that pipelines cheap GETs and never reads the answers: the
    server stops reading it (before: 1.5 GiB of RSS for 10 MB of requests).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import msgpack
import pytest

import muselib
from e2e_util import sql_str, unique

OWNER = "gabriel"
MiB = 1 << 20


def rss(srv, field: str = "VmRSS") -> int:
    """The server process's VmRSS / VmHWM in bytes."""
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{srv.proc.pid}/status")


def is_asan(srv) -> bool:
    """ASan's quarantine keeps freed memory: RSS bounds mean nothing there."""
    return "libasan" in Path(f"/proc/{srv.proc.pid}/maps").read_text()


def in_flight(srv) -> int:
    """musehub_http_requests_in_flight from /metrics (this request included)."""
    text = srv.hub().raw("GET", "/metrics").text
    return int(next(l.split()[1] for l in text.splitlines() if l.startswith("musehub_http_requests_in_flight ")))


def big_root(n: int) -> tuple[bytes, str, str, dict]:
    """A pack with one commit whose root snapshot has n paths (all the same
    one-byte blob): (pack, head, snapshot_id, manifest)."""
    content = b"x"
    oid = muselib.blob_id(content)
    man = {f"d{i // 1000:04d}/s{(i // 100) % 10}/f{i:07d}.txt": oid for i in range(n)}
    sid = muselib.snapshot_id(man)
    when = "2026-01-01T00:00:00+00:00"
    cid = muselib.commit_id([], sid, "big", when, OWNER)
    commit = {"commit_id": cid, "parent_commit_id": None, "parent2_commit_id": None, "snapshot_id": sid,
              "message": "big", "author": OWNER, "committed_at": when, "branch": "main"}
    snap = muselib.snapshot_map(sid, None, None, man)
    return muselib.build_mpack([commit], [snap], [{"object_id": oid, "content": content}]), cid, sid, man


def check_tree(body: dict, sid: str, head: str, man: dict) -> None:
    assert body["snapshot_id"] == sid and body["commit_id"] == head
    ents = body["entries"]
    assert len(ents) == len(man)
    paths = [e["path"] for e in ents]
    assert paths == sorted(man, key=lambda p: p.encode()), "entries in bytewise path order"
    assert all(e["object_id"] == man[e["path"]] and e["size_bytes"] == 1 for e in ents)


def test_tree_of_100k_entries_is_streamed(start_server):
    srv = start_server()
    hub = srv.hub()
    repo = hub.create_repo(OWNER, unique("t100k"), visibility="public")
    pack, head, sid, man = big_root(100_000)
    hub.push(OWNER, repo["slug"], pack, "main", head)
    for accept in ("application/json", "application/x-msgpack"):
        with httpx.Client(timeout=120) as c:
            r = c.get(f"{srv.url}/{OWNER}/{repo['slug']}/tree/main", headers={"Accept": accept})
        assert r.status_code == 200, r.text[:300]
        assert r.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.headers
        assert r.headers["content-type"] == accept
        body = r.json() if accept.endswith("json") else msgpack.unpackb(r.content, raw=False)
        check_tree(body, sid, head, man)
    # By commit id too, and HEAD has no body.
    with httpx.Client(timeout=120) as c:
        r = c.get(f"{srv.url}/{OWNER}/{repo['slug']}/tree/{head}")
        assert r.status_code == 200 and len(r.json()["entries"]) == 100_000
        h = c.head(f"{srv.url}/{OWNER}/{repo['slug']}/tree/main")
        assert h.status_code == 200 and h.content == b""


@pytest.mark.slow
def test_tree_of_a_million_entries_within_memory(start_server):
    """SPEC 4.5: a snapshot of a million entries is served within the
    process's memory bounds. The rebuild holds the manifest (about 410 MB
    at its peak here, reserved from the 512 MiB tree budget); the answer
    (139 MB of JSON) is streamed, never held."""
    srv = start_server()
    hub = srv.hub()
    repo = hub.create_repo(OWNER, unique("t1m"), visibility="public")
    pack, head, sid, man = big_root(1_000_000)
    hub.push(OWNER, repo["slug"], pack, "main", head)
    del pack
    base = rss(srv)
    t0 = time.monotonic()
    with httpx.Client(timeout=300) as c:
        with c.stream("GET", f"{srv.url}/{OWNER}/{repo['slug']}/tree/main") as r:
            assert r.status_code == 200
            assert r.headers.get("transfer-encoding") == "chunked"
            raw = b"".join(r.iter_bytes())
    elapsed = time.monotonic() - t0
    peak = rss(srv, "VmHWM")
    check_tree(json.loads(raw), sid, head, man)
    print(f"1M-entry tree: {len(raw) / MiB:.0f} MiB in {elapsed:.1f} s, peak RSS {peak / MiB:.0f} MiB "
          f"(before the request {base / MiB:.0f} MiB)")
    assert peak < 768 * MiB, f"peak RSS {peak / MiB:.0f} MiB"
    # The pooled connection that read the 100 MB delta was reopened: its
    # libpq buffer does not stay behind.
    time.sleep(1)
    assert rss(srv) < base + 256 * MiB, f"RSS after {rss(srv) / MiB:.0f} MiB"


def store_url(srv, key: str, ttl: int = 600) -> str:
    """A presigned GET URL for key, made the way the fs store makes them
    (HMAC-SHA256 over METHOD, key, expiry with the store's secret): lets the
    test serve a file it put in the store itself."""
    secret = (Path(srv.store_dir) / ".signing-secret").read_bytes().strip()
    exp = str(int(time.time()) + ttl)
    mac = hmac.new(secret, f"GET\n{key}\n{exp}\n\n".encode(), hashlib.sha256).hexdigest()
    return f"{srv.url}/_store/{key}?X-Muse-Method=GET&X-Muse-Expires={exp}&X-Muse-Signature={mac}"


@pytest.mark.store("fs")
@pytest.mark.slow
def test_gib_pack_download_is_not_mapped(start_server):
    """A 1 GiB pack, whole and with Range, downloaded with the server's
    RSS bounded: read in 256 KiB pieces on the thread pool, not mmap'ed."""
    srv = start_server()
    size = 1 << 30
    hexkey = hashlib.sha256(b"a GiB of bytes" + os.urandom(8)).hexdigest()
    path = Path(srv.store_dir) / "mpacks" / hexkey
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:            # sparse but not all zeros: marks every 64 MiB
        for off in range(0, size, 64 * MiB):
            fh.seek(off)
            fh.write(off.to_bytes(8, "big"))
        fh.truncate(size)
    url = store_url(srv, f"mpacks/{hexkey}")
    base = rss(srv)
    want = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(16 * MiB), b""):
            want.update(chunk)
    got, n = hashlib.sha256(), 0
    with httpx.Client(timeout=300) as c:
        with c.stream("GET", url) as r:
            assert r.status_code == 200 and int(r.headers["content-length"]) == size
            for chunk in r.iter_raw(1 * MiB):
                got.update(chunk)
                n += len(chunk)
        assert n == size and got.hexdigest() == want.hexdigest()
        # Ranges: the second half, and 17 bytes across a mark.
        lo = size // 2
        with c.stream("GET", url, headers={"Range": f"bytes={lo}-"}) as r:
            assert r.status_code == 206 and r.headers["content-range"] == f"bytes {lo}-{size - 1}/{size}"
            n = sum(len(ch) for ch in r.iter_raw(1 * MiB))
        assert n == size - lo
        r = c.get(url, headers={"Range": f"bytes={64 * MiB - 5}-{64 * MiB + 11}"})
        assert r.status_code == 206 and r.content == b"\0" * 5 + (64 * MiB).to_bytes(8, "big") + b"\0" * 4
    peak = rss(srv, "VmHWM")
    print(f"1.5 GiB served, peak RSS {peak / MiB:.0f} MiB (before {base / MiB:.0f} MiB)")
    assert peak < base + 64 * MiB, f"peak RSS {peak / MiB:.0f} MiB, before {base / MiB:.0f} MiB"


def test_pipelining_client_that_never_reads_is_bounded(start_server):
    """Issue 15 item 1: one connection pipelining cheap GETs without ever
    reading grew the server to 1.5 GiB. Now the server stops reading it
    once 1 MiB or 16 answers are queued; its RSS stays where it was."""
    srv = start_server()
    base = rss(srv)
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    block = one * (64 * 1024 // len(one))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", srv.port))
    s.settimeout(0.5)
    sent, deadline = 0, time.monotonic() + 4
    try:
        while sent < 10 * MiB and time.monotonic() < deadline:
            try:
                sent += s.send(block)
            except socket.timeout:
                time.sleep(0.1)     # the server stopped reading: keep pushing a little
        time.sleep(0.5)
        peak = rss(srv, "VmHWM")
        held = in_flight(srv)
        print(f"{sent / MiB:.1f} MiB of pipelined requests accepted; peak RSS {peak / MiB:.0f} MiB "
              f"(before {base / MiB:.0f} MiB); {held} requests in flight")
        assert held <= 16 + 2, f"{held} requests held for one connection"
        if not is_asan(srv):
            assert peak < base + 32 * MiB, f"peak RSS {peak / MiB:.0f} MiB, before {base / MiB:.0f} MiB"
        # Everyone else is served meanwhile.
        assert srv.hub().raw("GET", "/healthz").status_code == 200
    finally:
        s.close()


# ---------------------------------------------------------------------------
# pushes larger than the pack-memory budget (issue 14)
# ---------------------------------------------------------------------------

# What the server holds beside its pack-memory budget, stated: the
# process itself (about 14 MiB at rest: code, libpq, libcurl, the thread
# pool's stacks), its database and HTTP buffers and the arenas of a push.
PUSH_OVERHEAD = 48 * MiB


def big_files(tmp_path: Path, n: int, size: int) -> tuple[dict, Path]:
    """n blobs of `size` bytes in one file, alternately incompressible
    (random) and compressible (hex text): {path: (id, offset, length)}."""
    src = tmp_path / "src.bin"
    files = {}
    with open(src, "wb") as fh:
        for i in range(n):
            if i % 2:
                data = os.urandom(size)
            else:
                block = os.urandom(2048).hex().encode()
                data = b"".join(block[k % 97:] + b"%d\n" % k for k in range(size // 4000 + 2))[:size]
            fh.write(data)
            files[f"big/f{i:03d}.bin"] = (muselib.blob_id(data), i * size, size)
    return files, src


def files_pack(files: dict, src: Path, out: Path, version: int, message: str = "big") -> str:
    """One root commit holding `files`, as a pack of `version`; its head."""
    import muse
    manifest = {p: v[0] for p, v in files.items()}
    sid = muse.snapshot_id(manifest)
    when = "2026-01-01T00:00:00+00:00"
    c = {"commit_id": muse.commit_id([], sid, message, when, OWNER), "parent_commit_id": None,
         "parent2_commit_id": None, "snapshot_id": sid, "message": message, "author": OWNER,
         "committed_at": when, "branch": "main"}
    w = muse.PackWriter(str(out), version)
    w.add_commit(c)
    w.add_snapshot({"snapshot_id": sid, "parent_snapshot_id": None, "delta_upsert": manifest,
                    "delta_remove": []})
    with open(src, "rb") as sf:
        for p, (oid, off, n) in files.items():
            w.add_blob_from(oid, sf, off, n, path=p)
        w.close()
    return c["commit_id"]


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_push_of_hundreds_of_mb_within_the_pack_budget(start_server, tmp_path, version):
    """320 MiB of blobs (v1: a 320 MiB pack; v2: about half, the random
    blobs in frames of their own) pushed to a server whose pack work may
    hold 32 MiB: the unpack reads the pack in windows and keeps only its
    records, so the server's peak stays under budget + PUSH_OVERHEAD
    (before: the whole v1 pack was held, ~340 MiB)."""
    budget = 32 * MiB
    srv = start_server(MUSEHUB_PACK_MEMORY=str(budget))
    if is_asan(srv):
        pytest.skip("RSS bounds mean nothing under ASan")
    files, src = big_files(tmp_path, 80, 4 * MiB)
    pack = tmp_path / "big.mpack"
    head = files_pack(files, src, pack, version)
    src.unlink()
    data = pack.read_bytes()
    assert data[:5] == b"MUSE" + bytes([version])
    hub = srv.hub(timeout=300)
    slug = hub.create_repo(OWNER, unique("bigpush"))["slug"]
    res = hub.push(OWNER, slug, data, "main", head)
    assert res["objects_written"] == 80 and res["head"] == head
    peak = rss(srv, "VmHWM")
    print(f"v{version} push of {len(data) / MiB:.0f} MiB: server peak {peak / MiB:.1f} MiB")
    assert peak < budget + PUSH_OVERHEAD, f"peak RSS {peak / MiB:.0f} MiB"
    # Whole and correct: the pack is stored as sent, every blob indexed.
    assert srv.store_path(muselib.blob_id(data)).stat().st_size == len(data)
    assert srv.db.count("SELECT count(*) FROM mpack_index") == 80
    hub.close()


def metric_value(srv, name: str) -> float:
    text = srv.hub().raw("GET", "/metrics").text
    return float(next(l.split()[1] for l in text.splitlines() if l.startswith(name + " ")))


@pytest.mark.slow
def test_concurrent_pushes_beyond_the_budget_wait_or_retry(start_server, tmp_path):
    """Six 40 MiB pushes at once on a 16 MiB budget (each unpack reserves
    its two 4 MiB windows and what its reader holds): they queue; those
    that wait longer than the queue timeout get 503 busy with Retry-After
    and succeed when retried; every push ends written and whole."""
    srv = start_server(MUSEHUB_PACK_MEMORY=str(16 * MiB), MUSEHUB_PACK_QUEUE_TIMEOUT_MS="300")
    hub = srv.hub(timeout=120)
    pushes = []
    for i in range(6):
        files, src = big_files(tmp_path, 10, 4 * MiB)
        pack = tmp_path / f"p{i}.mpack"
        head = files_pack(files, src, pack, 1 + i % 2, message=f"push {i}")
        src.unlink()
        data = pack.read_bytes()
        slug = hub.create_repo(OWNER, unique("busy"))["slug"]
        key = muselib.blob_id(data)
        pre = hub.presign(OWNER, slug, key, len(data))
        hub.upload(pre["upload_url"], data)
        pushes.append((slug, key, head))
    barrier = threading.Barrier(len(pushes))
    outcome: dict[int, list] = {}

    def go(i):
        slug, key, head = pushes[i]
        seen = outcome.setdefault(i, [])
        with srv.hub(timeout=120) as h:
            barrier.wait(10)
            for _ in range(60):
                r = h.raw("POST", f"/{OWNER}/{slug}/push/unpack-mpack",
                          {"mpack_key": key, "branch": "main", "head": head})
                seen.append((r.status_code, r.headers.get("retry-after"), muselib.decode_body(r)))
                if r.status_code != 503:
                    return
                time.sleep(float(r.headers["retry-after"]) / 10)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(pushes))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    for i, seen in outcome.items():
        assert seen[-1][0] == 200, (i, seen[-1])
        for status, retry_after, body in seen[:-1]:
            assert status == 503 and body["error"] == "busy" and retry_after == "1", (status, body)
    busy = sum(len(seen) - 1 for seen in outcome.values())
    waits = metric_value(srv, "musehub_pack_memory_waits_total")
    print(f"{busy} answers 503 busy, {waits:.0f} waits for the budget")
    assert waits + busy > 0, "the pushes never contended for the budget"
    assert metric_value(srv, "musehub_pack_memory_in_use_bytes") == 0
    for slug, key, head in pushes:
        assert hub.refs(OWNER, slug)["branch_heads"] == {"main": head}
        assert srv.db.count(f"SELECT count(*) FROM mpack_index WHERE mpack_id = '{key}'") == 10
    hub.close()


def chunked_history(seed: str) -> muselib.History:
    """400 delta snapshots of a 60-file tree (six checkpoints): ~240 KB of
    snapshot rows, which a 1 MiB budget's 16 KiB chunks split in ~15."""
    return muselib.generate(commits=400, files=60, changed=2, blob_size=16, seed=seed)


def copy_steps(srv) -> int:
    """How many times the unpack ran its COPY_SNAPSHOTS step (debug log)."""
    return Path(srv.log_path).read_text().count("unpack step copy_snapshots")


def test_snapshot_rows_of_a_long_history_go_in_chunks(start_server):
    """Beyond a first chunk (1/8 of the budget: 128 KiB here) the
    tmp_snapshots rows are built and copied a chunk at a time (1/256 of the
    budget, at least 16 KiB), so the checkpoints of a long history (whole manifests: 448 MB for 82,000
    commits of a 6,500-file tree) are never held at once. Every snapshot
    arrives, with its checkpoints, and a clone rebuilds and verifies the
    whole history."""
    srv = start_server(MUSEHUB_PACK_MEMORY=str(MiB), log_level="debug")
    hub = srv.hub(timeout=60)
    h = chunked_history(unique("chunk"))
    repo = hub.create_repo(OWNER, unique("chunk"))
    res = hub.push(OWNER, repo["slug"], h.pack(version=2), "main", h.head)
    assert (res["commits_written"], res["snapshots_written"]) == (400, 400)
    assert copy_steps(srv) >= 5, "the rows went in one piece"
    rows = srv.db.rows(f"SELECT count(*), count(checkpoint), max(depth) FROM snapshots s JOIN snapshot_refs r"
                       f" USING (snapshot_id) WHERE r.repo_id = {sql_str(repo['repo_id'])}")
    assert rows == [("400", "6", "63")]
    ans = hub.fetch(OWNER, repo["slug"], [h.head])
    pack = muselib.parse_mpack(hub.download(ans["mpack_url"]))
    mans = muselib.rebuild_and_verify(pack, {}, set())
    assert len(mans) == 400 and mans[h.snapshots[-1]["snapshot_id"]] == h.manifest
    hub.close()


def test_a_bad_snapshot_after_chunks_were_copied_writes_nothing(start_server):
    """The 351st snapshot's delta does not rebuild to its id: the rows of
    the chunks before it are already in tmp_snapshots when the rebuild
    finds it, and the push is still a 422 that leaves nothing behind."""
    srv = start_server(MUSEHUB_PACK_MEMORY=str(MiB), log_level="debug")
    hub = srv.hub(timeout=60)
    h = chunked_history(unique("chunkbad"))
    snaps = [dict(s) for s in h.snapshots]
    bad = snaps[350] = dict(snaps[350], delta_upsert=dict(snaps[350]["delta_upsert"]))
    bad["delta_upsert"]["zz/extra.txt"] = h.blobs[0]["object_id"]
    data = muselib.build_mpack(h.commits, snaps, h.blobs, version=2)
    repo = hub.create_repo(OWNER, unique("chunkbad"))
    key = muselib.blob_id(data)
    pre = hub.presign(OWNER, repo["slug"], key, len(data))
    hub.upload(pre["upload_url"], data)
    r = hub.raw("POST", f"/{OWNER}/{repo['slug']}/push/unpack-mpack",
                {"mpack_key": key, "branch": "main", "head": h.head})
    assert r.status_code == 422 and muselib.decode_body(r)["error"] == "invalid_pack", r.text
    detail = muselib.decode_body(r)["detail"]
    assert "snapshots[" in detail and bad["snapshot_id"] in detail, detail
    assert copy_steps(srv) >= 3, "no chunk was copied before the bad snapshot"
    ids = ", ".join(sql_str(c["commit_id"]) for c in h.commits)
    sids = ", ".join(sql_str(s["snapshot_id"]) for s in h.snapshots)
    assert srv.db.count(f"SELECT count(*) FROM commits WHERE commit_id IN ({ids})") == 0
    assert srv.db.count(f"SELECT count(*) FROM snapshots WHERE snapshot_id IN ({sids})") == 0
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {}
    hub.close()
