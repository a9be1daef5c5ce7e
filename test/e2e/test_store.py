"""The object store seen from outside (SPEC 3, 4.3, 4.8): a full or
read-only store answers 507 insufficient_storage and keeps nothing; the
maintenance pass removes abandoned staged uploads of expired push grants
(with their grant rows) and stale store temporaries, in both stores,
without touching live grants; uploads through /_store/ reserve pack memory
and answer 503 + Retry-After when the budget stays spent.

The full-disk tests mount a small tmpfs (root, as in this sandbox); they
are skipped where mounting is not allowed.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

import muselib
from e2e_util import sql_str, unique

OWNER = "gabriel"


def wait_until(cond, timeout=20.0, step=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


def presign(hub, slug, data):
    key = muselib.blob_id(data)
    pre = hub.presign(OWNER, slug, key, len(data))
    assert not pre["already_present"]
    return key, pre["upload_url"]


def staging_key(db, repo_id, key):
    return db.scalar(f"SELECT staging_key FROM push_grants WHERE repo_id = {sql_str(repo_id)}"
                     f" AND mpack_key = {sql_str(key)} ORDER BY created_at DESC LIMIT 1")


def metric(srv, name):
    with srv.hub() as hub:
        text = hub.raw("GET", "/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


# ---------------------------------------------------------------------------
# 507: a full or read-only store (fs; a real small filesystem)
# ---------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs; yields its path; unmounted afterwards."""
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def leftovers(store):
    return sorted(p.name for sub in ("tmp", "incoming") for p in (store / sub).iterdir())


@pytest.mark.store("fs")
def test_full_store_upload_is_507_and_keeps_nothing(start_server, small_fs):
    store = small_fs / "store"
    srv = start_server(store_dir=str(store))
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("full"))
        big = os.urandom(6 * 1024 * 1024)
        key, url = presign(hub, r["slug"], big)
        with pytest.raises(muselib.HubError) as e:
            hub.upload(url, big)
        assert e.value.status == 507
        assert e.value.body["error"] == "insufficient_storage"
        assert leftovers(store) == [], "a refused upload keeps nothing"
        # A second refusal is not logged again: the cause is logged once.
        big2 = os.urandom(5 * 1024 * 1024)
        _, url2 = presign(hub, r["slug"], big2)
        with pytest.raises(muselib.HubError) as e:
            hub.upload(url2, big2)
        assert e.value.status == 507
        log = srv.log_tail(400)
        assert log.count("cannot take more bytes (No space left on device)") == 1, log
        # What fits still goes in, and clears the state.
        small = os.urandom(100 * 1024)
        skey, surl = presign(hub, r["slug"], small)
        assert hub.upload(surl, small) in (200, 204)
        sk = staging_key(srv.db, r["repo_id"], skey)
        assert (store / sk).read_bytes() == small
        assert "accepts writes again" in srv.log_tail(400)
        assert not any((store / "tmp").iterdir())


@pytest.mark.store("fs")
def test_read_only_store_upload_is_507(start_server, small_fs):
    store = small_fs / "store"
    srv = start_server(store_dir=str(store))
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("ro"))
        data = os.urandom(200 * 1024)
        key, url = presign(hub, r["slug"], data)
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
        try:
            with pytest.raises(muselib.HubError) as e:
                hub.upload(url, data)
            assert e.value.status == 507
            assert e.value.body["error"] == "insufficient_storage"
            assert "(Read-only file system)" in srv.log_tail(200)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
        assert leftovers(store) == []
        # Writable again: the same URL works, and the push completes.
        h = muselib.generate(commits=2, files=3, changed=1, blob_size=64, seed=unique("ro"))
        res = hub.push(OWNER, r["slug"], h.pack(), "main", h.head)
        assert res["head"] == h.head


@pytest.mark.store("fs")
def test_full_store_server_side_commit_is_507_and_writes_nothing(start_server, small_fs):
    """A server-side commit whose new pack does not fit the store (SPEC 4.6,
    4.8): 507 insufficient_storage, no commit, the branch unmoved, no pack
    and no temporary left; once space is free the same commit works."""
    store = small_fs / "store"
    srv = start_server(store_dir=str(store))
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("fullc"), initialize=True)
        head0 = hub.refs(OWNER, r["slug"])["branch_heads"]["main"]
        filler = small_fs / "filler"
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        filler.write_bytes(b"\0" * max(free - 512 * 1024, 0))  # leave less than the commit needs
        content = os.urandom(2 * 1024 * 1024)  # incompressible: the pack is larger than what is left
        body = {"branch": "main", "message": "too big", "files": {"big.bin": content}}
        resp = hub.raw("POST", f"/api/repos/{r['repo_id']}/commits", body)
        assert resp.status_code == 507, resp.text
        assert muselib.decode_body(resp)["error"] == "insufficient_storage"
        assert hub.refs(OWNER, r["slug"])["branch_heads"]["main"] == head0
        assert srv.db.count("SELECT count(*) FROM commit_refs WHERE repo_id = "
                            f"{sql_str(r['repo_id'])}") == 1  # the initial commit only
        packs0 = {p.name for p in (store / "mpacks").glob("*")}
        assert not packs0 and not list((store / "tmp").glob("*")), packs0
        filler.unlink()
        res = hub.call("POST", f"/api/repos/{r['repo_id']}/commits", body, expect=(201,))
        assert hub.refs(OWNER, r["slug"])["branch_heads"]["main"] == res["commit_id"]
        assert (store / "mpacks" / res["mpack_id"].split(":", 1)[1]).exists()


@pytest.mark.store("fs")
def test_uploads_that_end_while_the_disk_is_behind_complete(start_server):
    """An upload whose last bytes arrive while the store writer's buffers
    are full is paused on them; it must complete once the disk catches up.
    It used to wait for bytes that never came and end in a 408 after the
    request timeout (CI, a 68 MB push). One thread-pool thread shared by
    four uploads keeps the disk behind the network; sizes of whole MiB
    make the last read fill a 1 MiB buffer. The old server failed 4-6 of
    these 24 uploads in every run."""
    srv = start_server(UV_THREADPOOL_SIZE="1", MUSEHUB_REQUEST_TIMEOUT_MS="5000")
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("tail"))
    failed, errors = [], []

    def uploader(k):
        try:
            with srv.hub() as h:
                for i in range(6):
                    data = os.urandom((4 + k % 3) << 20)
                    key, url = presign(h, r["slug"], data)
                    t0 = time.monotonic()
                    resp = h.client.put(url if not url.startswith("/") else h.base_url + url, content=data)
                    if resp.status_code != 200:
                        failed.append((k, i, resp.status_code, round(time.monotonic() - t0, 2), resp.text[:80]))
                    elif srv.store_path(staging_key(srv.db, r["repo_id"], key)).read_bytes() != data:
                        failed.append((k, i, "stored bytes differ"))
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=uploader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not [t for t in threads if t.is_alive()], "an upload still hangs after 120 s"
    assert not errors, errors[0]
    assert not failed, failed


# ---------------------------------------------------------------------------
# Nothing left behind: the staged-upload and temporaries sweeps
# ---------------------------------------------------------------------------

def test_abandoned_staged_uploads_are_swept(start_server):
    """Once grants are past their expiry and one second of grace, the
    maintenance pass (every second) deletes their staged uploads and their
    rows; a consumed grant's row goes too, its pack stays. The grants are
    aged in SQL after the setup: a 1 s TTL would race the setup itself on a
    loaded machine (presign to unpack, and the checks of all three)."""
    srv = start_server(MUSEHUB_MPACK_GRACE_SECONDS="1", MUSEHUB_JOB_MAINTENANCE_SECONDS="1")
    db = srv.db
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("sweep"))
        # 1. uploaded, never unpacked
        data = os.urandom(300 * 1024)
        key, url = presign(hub, r["slug"], data)
        hub.upload(url, data)
        staged = srv.store_path(staging_key(db, r["repo_id"], key))
        assert staged.exists()
        # 2. presigned, never uploaded
        key2, _ = presign(hub, r["slug"], os.urandom(1000))
        # 3. pushed: its grant is consumed, its pack is kept
        h = muselib.generate(commits=2, files=3, changed=1, blob_size=64, seed=unique("sw"))
        pushed = hub.push(OWNER, r["slug"], h.pack(), "main", h.head)
        n0 = db.count(f"SELECT count(*) FROM push_grants WHERE repo_id = {sql_str(r['repo_id'])}")
        assert n0 == 3
        db.execute("UPDATE push_grants SET expires_at = now() - interval '1 minute'"
                   f" WHERE repo_id = {sql_str(r['repo_id'])}")
        wait_until(lambda: db.count("SELECT count(*) FROM push_grants WHERE repo_id = "
                                    f"{sql_str(r['repo_id'])}") == 0, what="grant rows swept")
        assert not staged.exists(), "the abandoned staged upload is gone"
        assert srv.store_path(pushed["mpack_key"]).exists(), "a pushed pack is never swept"
        assert "abandoned staged upload" in srv.log_tail(200)
        assert metric(srv, "musehub_staged_uploads_swept_total") >= 3
        # The repository is intact: its history still fetches.
        assert hub.refs(OWNER, r["slug"])["branch_heads"]["main"] == h.head


def test_live_grant_survives_sweeps_and_allows_retry(start_server):
    """SPEC 4.3: after a failed unpack the staged pack stays usable under
    its grant until the grant expires, whatever the sweeps do meanwhile."""
    srv = start_server(MUSEHUB_MPACK_GRACE_SECONDS="1", MUSEHUB_JOB_MAINTENANCE_SECONDS="1")
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("retry"))
        a = muselib.generate(commits=2, files=3, changed=1, blob_size=64, seed=unique("a"))
        b = muselib.generate(commits=2, files=3, changed=1, blob_size=64, seed=unique("b"))
        hub.push(OWNER, r["slug"], a.pack(), "main", a.head)
        pack = b.pack()
        key, url = presign(hub, r["slug"], pack)
        hub.upload(url, pack)
        with pytest.raises(muselib.HubError) as e:
            hub.unpack(OWNER, r["slug"], key, "main", b.head)
        assert e.value.status == 409
        time.sleep(3.5)  # three maintenance passes
        res = hub.unpack(OWNER, r["slug"], key, "main", b.head, force=True)
        assert res["head"] == b.head


def put_s3_object(s3emu, key, data):
    import boto3
    c = boto3.client("s3", endpoint_url=s3emu["endpoint"], aws_access_key_id="S3RVER",
                     aws_secret_access_key="S3RVER", region_name="us-east-1")
    c.put_object(Bucket=s3emu["bucket"], Key=key, Body=data)


def test_stale_store_temporaries_are_swept(start_server, store_kind, s3emu):
    """A writer's temporary left by a dead process (older than six hours)
    is removed by the maintenance pass; a young one and foreign names are
    kept."""
    srv = start_server(MUSEHUB_JOB_MAINTENANCE_SECONDS="1")
    old_name, young_name = "0" * 32, "f" * 32
    if store_kind == "fs":
        tmp = Path(srv.store_dir) / "tmp"
        old, young = tmp / f"w-{old_name}", tmp / f"w-{young_name}"
        old.write_bytes(b"left by a crash")
        young.write_bytes(b"being written")
        foreign = None
    else:
        for name in (old_name, young_name):
            put_s3_object(s3emu, f"tmp/{name}", b"x")
        put_s3_object(s3emu, "tmp/not-ours", b"x")
        old, young = srv.store_path(f"tmp/{old_name}"), srv.store_path(f"tmp/{young_name}")
        foreign = srv.store_path("tmp/not-ours")
    seven_hours_ago = time.time() - 7 * 3600
    os.utime(old, (seven_hours_ago, seven_hours_ago))
    wait_until(lambda: not old.exists(), what="stale temporary swept")
    assert young.exists()
    if foreign is not None:
        assert foreign.exists()
    assert metric(srv, "musehub_store_tmp_swept_total") >= 1


# ---------------------------------------------------------------------------
# The pack-memory budget on uploads
# ---------------------------------------------------------------------------

@pytest.mark.store("fs")
def test_uploads_share_the_pack_memory_budget(start_server):
    """With a 1 MiB budget an upload (2 MiB of buffers) runs alone: a
    second one waits for the queue timeout, then gets 503 + Retry-After;
    once the first ends the second goes through."""
    srv = start_server(MUSEHUB_PACK_MEMORY="1048576", MUSEHUB_PACK_QUEUE_TIMEOUT_MS="400")
    with srv.hub() as hub:
        r = hub.create_repo(OWNER, unique("budget"))
        first = os.urandom(3 * 1024 * 1024)
        second = os.urandom(100 * 1024)
        _, url1 = presign(hub, r["slug"], first)
        key2, url2 = presign(hub, r["slug"], second)
        # The first upload sends its headers and half its body, then stalls:
        # it holds its reservation.
        u = urllib.parse.urlsplit(url1)
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Content-Length: {len(first)}\r\n\r\n".encode() + first[:len(first) // 2])
        wait_until(lambda: metric(srv, "musehub_pack_memory_in_use_bytes") == 2 * 1024 * 1024,
                   what="the first upload's reservation")
        t0 = time.monotonic()
        with pytest.raises(muselib.HubError) as e:
            hub.upload(url2, second)
        assert e.value.status == 503
        assert {k.lower(): v for k, v in e.value.headers.items()}.get("retry-after") == "1"
        assert time.monotonic() - t0 >= 0.35, "it waited for the queue timeout"
        assert metric(srv, "musehub_pack_memory_timeouts_total") == 1
        assert metric(srv, "musehub_pack_memory_oversize_total") >= 1
        s.sendall(first[len(first) // 2:])
        f = s.makefile("rb")
        status = int(f.readline().split()[1])
        s.close()
        assert status == 200
        wait_until(lambda: metric(srv, "musehub_pack_memory_in_use_bytes") == 0, what="release")
        assert hub.upload(url2, second) in (200, 204)
        assert (Path(srv.store_dir) / staging_key(srv.db, r["repo_id"], key2)).read_bytes() == second


@pytest.mark.parametrize("env, words", [
    ({"MUSEHUB_PACK_MEMORY": "1048575"}, "MUSEHUB_PACK_MEMORY='1048575': out of range"),
    ({"MUSEHUB_PACK_MEMORY": "lots"}, "MUSEHUB_PACK_MEMORY='lots': not a whole number"),
    ({"MUSEHUB_PACK_QUEUE_TIMEOUT_MS": "600001"}, "MUSEHUB_PACK_QUEUE_TIMEOUT_MS='600001': out of range"),
])
def test_budget_settings_are_validated(env, words):
    """A bad budget setting is refused before anything happens: exit 2,
    one line naming the variable (no database is even needed)."""
    binary = os.environ.get("MUSEHUB_BIN", str(Path(__file__).resolve().parents[2] / "build" / "musehubd"))
    e = {k: v for k, v in os.environ.items() if not k.startswith("MUSEHUB_")}
    e.update(env, MUSEHUB_DATABASE_URL="postgresql:///nowhere?host=/nonexistent")
    r = subprocess.run([binary, "migrate"], env=e, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert words in r.stderr and r.stderr.count("\n") == 1, r.stderr
