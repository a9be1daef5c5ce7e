"""Fault injection (DESIGN 6 "Fault tests", issue 10): PostgreSQL dropping
the connection mid-transaction, the object store failing (fs: directories
gone or unusable; s3: a fault proxy in front of the emulator), clients
vanishing mid-upload, mid-download and mid-unpack, and allocation failures
inside a running server (FAILALLOC=1 build, `make unit-failalloc`).

Every fault must end in a correct result or a clean error (a 5xx with an
error body, never a hang, never a crash), with nothing half-written: after
a refused unpack the repository's ref rows and branch heads are exactly
what they were (or, for an ambiguous COMMIT, exactly the pushed state),
and a retry of the same unpack succeeds without uploading again (SPEC 4.3:
the grant stays usable until it expires).

Environment:
  MUSEHUB_FAILALLOC_BIN  a musehubd built with FAILALLOC=1 (and ASan):
                         enables test_failalloc_server_push_fetch
  MUSEHUB_FAILALLOC_SAMPLES  N values sampled per phase there (default 24;
                             "all": every N, a few minutes, what make
                             unit-failalloc runs, with --store fs and s3)
  MUSEHUB_FAILALLOC_ONLY     replay given runs only, e.g. "fetch:89,unpack:163"
                             (with MH_FAILALLOC_TRACE=1 the server prints the
                             stack of each injected failure)
  MUSEHUB_FAULT_SLOW=1   also runs the minute-long permanent S3 stall test
"""
from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

import muselib
import s3emu as s3emu_mod
from e2e_util import PSQL, sql_str, unique
from fault_util import (CLEAN_5XX, OWNER, Pusher, chain, clone_verify, ledger, proc_fd_targets,
                        wait_fds_at_most)
from faultproxy import FaultProxy


def _new_repo(hub: muselib.Hub, prefix: str) -> tuple[str, str]:
    r = hub.create_repo(OWNER, unique(prefix))
    return r["slug"], r["repo_id"]


def _status(r) -> str:
    try:
        return f"{r.status_code} {r.text[:300]}"
    except Exception:  # noqa: BLE001
        return repr(r)


def _assert_clean_error(r, allowed=CLEAN_5XX) -> None:
    """A clean error: an allowed status with SPEC's {error, detail} body."""
    assert r.status_code in allowed, f"expected one of {allowed}, got {_status(r)}"
    body = r.json()
    assert isinstance(body, dict) and "error" in body and "detail" in body, body


def _pushed_or_untouched(before: dict, after: dict, h: muselib.History, branch: str = "main") -> bool:
    """After a refused unpack: untouched, or (an ambiguous COMMIT) fully pushed."""
    if after == before:
        return False
    assert after["heads"].get(branch) == h.head, \
        f"half-written: the ref rows changed but the branch did not move\nbefore {before}\nafter  {after}"
    assert after["commit_refs"] == before["commit_refs"] + len(h.commits), (before, after)
    return True


# ===========================================================================
# PostgreSQL dropping the connection mid-transaction
# ===========================================================================

class PgSession:
    """A long-lived psql session (application_name `appname`) fed on stdin."""

    def __init__(self, url: str, appname: str) -> None:
        env = dict(os.environ, PGAPPNAME=appname)
        self.p = subprocess.Popen([PSQL, "-X", "-q", "-A", "-t", "-d", url], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def send(self, sql: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(sql.encode() + b"\n")
        self.p.stdin.flush()

    def close(self) -> str:
        try:
            if self.p.stdin:
                self.p.stdin.close()
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        return self.p.stderr.read().decode(errors="replace") if self.p.stderr else ""


def _wait_for(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _second_push_staged(start_server, prefix: str):
    """A server, a repository holding h1, and h2 on top of it staged (not
    unpacked): (srv, hub, pusher, slug, repo_id, h1, h2, ledger before)."""
    srv = start_server()
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url)
    slug, rid = _new_repo(hub, prefix)
    h1, h2 = chain(2, seed=unique(prefix))
    hub.push(OWNER, slug, h1.pack(), "main", h1.head)
    before = ledger(srv.db, rid)
    assert p.stage(slug, h2.pack())[0] == 200
    return srv, hub, p, slug, rid, h1, h2, before


def _hold(srv, appname: str, sql: str) -> PgSession:
    """A psql session that takes row locks with `sql` and keeps them."""
    s = PgSession(srv.database_url, appname)
    s.send(f"BEGIN; {sql};")
    _wait_for(lambda: srv.db.count(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{appname}'"
                                   " AND state = 'idle in transaction'"), 10, f"{appname} to hold its rows")
    return s


def _release(s: PgSession) -> None:
    s.send("ROLLBACK;")
    s.close()


def _lock_waiter(srv):
    """The pid of a musehubd backend waiting for a lock, or None."""
    return srv.db.scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                         " AND application_name = 'musehubd' AND wait_event_type = 'Lock'")


def _unpack_dropped_while_waiting(srv, p, slug, h, appname: str, what: str, rows_sql: str):
    """Unpacks h while a psql session holds the rows of `rows_sql` FOR
    UPDATE; once the unpack's backend waits for them it is terminated.
    Returns the unpack's answer (within 60 s of the drop)."""
    locker = _hold(srv, appname, rows_sql + " FOR UPDATE")
    res: dict = {}
    try:
        t = threading.Thread(target=lambda: res.update(r=p.unpack(slug, h.pack(), h.head)))
        t.start()
        pid = _wait_for(lambda: _lock_waiter(srv), 30, f"the unpack to wait for {what}")
        assert srv.db.scalar(f"SELECT pg_terminate_backend({pid})") == "t"
        t.join(60)
        assert not t.is_alive(), "unpack did not answer within 60 s of its connection being dropped"
    finally:
        _release(locker)
    return res["r"]


def _retry_succeeds(srv, hub, p, slug, rid, h1, h2) -> None:
    """The same unpack again, without a new presign or upload, succeeds."""
    r = p.unpack(slug, h2.pack(), h2.head)
    assert r.status_code == 200, _status(r)
    assert r.json()["commits_written"] == len(h2.commits)
    after = ledger(srv.db, rid)
    assert after["heads"]["main"] == h2.head
    assert after["commit_refs"] == len(h1.commits) + len(h2.commits)
    clone_verify(hub, slug, h2.head, expect_commits=len(h1.commits) + len(h2.commits))
    p.close()
    hub.close()


def test_pg_connection_dropped_mid_unpack_transaction(start_server):
    """Deterministic: the unpack's transaction has written every row and
    waits for the branch row lock (held by us); its backend is terminated.
    The push gets a clean 503, nothing of it is visible, and the same
    unpack succeeds afterwards without a new upload."""
    srv, hub, p, slug, rid, h1, h2, before = _second_push_staged(start_server, "pgdrop")
    # Its transaction holds the COPY'd and inserted rows when it waits.
    r = _unpack_dropped_while_waiting(srv, p, slug, h2, "fault-locker", "the branch lock",
                                      f"SELECT 1 FROM branches WHERE repo_id = {sql_str(rid)} AND name = 'main'")
    _assert_clean_error(r, (503,))
    assert ledger(srv.db, rid) == before, "the dropped transaction left rows behind"
    assert srv.db.count(f"SELECT count(*) FROM commits WHERE commit_id = {sql_str(h2.head)}") == 0
    _retry_succeeds(srv, hub, p, slug, rid, h1, h2)


def test_pg_connection_dropped_after_the_pack_was_placed(start_server):
    """Issue 15 item 4, the failure after the move: the unpack's
    transaction has judged the move and placed the pack under mpacks/, and
    waits for its grant's row (held by us) to consume it; its backend is
    terminated. The push gets a clean 503, the pack goes back to its
    staging key (nothing under mpacks/ without a row), and the same unpack
    succeeds afterwards without a new upload."""
    srv, hub, p, slug, rid, h1, h2, before = _second_push_staged(start_server, "placed")
    key = muselib.blob_id(h2.pack())
    grant, staging = srv.db.rows(f"SELECT grant_id, staging_key FROM push_grants WHERE mpack_key = {sql_str(key)}")[0]
    # The branch row first (the unpack has marked its grant verified and
    # waits in its transaction to judge the move), then the grant's row,
    # then the branch goes: the unpack places the pack and waits to
    # consume the grant.
    branch = _hold(srv, "fault-locker", f"SELECT 1 FROM branches WHERE repo_id = {sql_str(rid)} AND name = 'main'"
                   " FOR UPDATE")
    grants = None
    res: dict = {}
    try:
        t = threading.Thread(target=lambda: res.update(r=p.unpack(slug, h2.pack(), h2.head)))
        t.start()
        _wait_for(lambda: _lock_waiter(srv), 30, "the unpack to wait for the branch row")
        assert not srv.store_path(key).exists(), "not placed before the move is judged"
        grants = _hold(srv, "fault-locker2", f"SELECT 1 FROM push_grants WHERE grant_id = {sql_str(grant)} FOR UPDATE")
        _release(branch)
        branch = None
        _wait_for(lambda: srv.store_path(key).exists() and _lock_waiter(srv), 30, "the pack placed, the unpack waiting")
        assert not srv.store_path(staging).exists()
        assert srv.db.scalar(f"SELECT pg_terminate_backend({_lock_waiter(srv)})") == "t"
        t.join(60)
        assert not t.is_alive(), "unpack did not answer within 60 s of its connection being dropped"
    finally:
        for s in (branch, grants):
            if s is not None:
                _release(s)
    _assert_clean_error(res["r"], (503,))
    assert ledger(srv.db, rid) == before, "the dropped transaction left rows behind"
    assert srv.db.count(f"SELECT count(*) FROM mpacks WHERE mpack_id = {sql_str(key)}") == 0
    _wait_for(lambda: not srv.store_path(key).exists() and srv.store_path(staging).exists(), 10,
              "the pack to go back to its staging key")
    _retry_succeeds(srv, hub, p, slug, rid, h1, h2)
    assert srv.store_path(key).exists() and not srv.store_path(staging).exists()


# A killer running inside PostgreSQL: every ~2 ms it terminates this
# database's musehubd sessions that are inside a transaction, either idle
# in it between two statements or running one that has written (has an
# xid); after a kill it rests a random 0-500 ms so that some transactions
# get through (an unpack's takes a few ms). pg_stat_clear_snapshot()
# because pg_stat_activity is otherwise read once per transaction.
# Bounded by `secs`; also stopped by terminating its own session
# (application_name fault-killer).
KILLER_SQL = """
DO $$
DECLARE n int; total int := 0; deadline timestamptz := clock_timestamp() + interval '{secs} seconds';
BEGIN
  WHILE clock_timestamp() < deadline LOOP
    PERFORM pg_stat_clear_snapshot();
    SELECT count(pg_terminate_backend(pid)) INTO n FROM pg_stat_activity
     WHERE datname = current_database() AND application_name = 'musehubd'
       AND (state = 'idle in transaction' OR (state = 'active' AND backend_xid IS NOT NULL));
    total := total + n;
    IF n > 0 THEN
      RAISE NOTICE 'killed %', total;
      PERFORM pg_sleep(random() * 0.5);
    END IF;
    PERFORM pg_sleep(0.002);
  END LOOP;
END $$;
"""


def test_pg_terminate_loop_during_pushes(start_server):
    """Random: a stream of fast-forward pushes while a killer terminates
    every musehubd backend caught inside a transaction. Every unpack ends
    200 or a clean 5xx; after each attempt the repository is either
    untouched or fully pushed; retries (no re-upload) converge; the final
    history is complete and verifies."""
    srv = start_server()
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url)
    slug, rid = _new_repo(hub, "pgloop")
    hs = chain(14, commits=4, files=60, seed=unique("pl"))
    # The killer stops by itself after 30 s: from then on every retry must
    # succeed, so the retry loops below are bounded in time.
    killer = subprocess.Popen([PSQL, "-X", "-q", "-d", srv.database_url, "-c", KILLER_SQL.format(secs=30)],
                              env=dict(os.environ, PGAPPNAME="fault-killer"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    statuses: dict[int, int] = {}
    ambiguous = 0
    total = 0
    try:
        for h in hs:
            for attempt in range(400):  # presign + upload, retried through the kills
                st, detail = p.stage(slug, h.pack())
                if st == 200:
                    break
                assert st in CLEAN_5XX, f"staging: {st} {detail}"
                time.sleep(0.05)
            else:
                raise AssertionError("could not stage a pack in 400 attempts")
            for attempt in range(400):
                before = ledger(srv.db, rid)
                r = p.unpack(slug, h.pack(), h.head)
                after = ledger(srv.db, rid)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    assert after["heads"]["main"] == h.head
                    assert after["commit_refs"] == total + len(h.commits)
                    break
                _assert_clean_error(r)
                if _pushed_or_untouched(before, after, h):
                    ambiguous += 1  # COMMIT went through, its answer did not
                time.sleep(0.02)
            else:
                raise AssertionError(f"unpack never succeeded in 400 attempts: {statuses}")
            total += len(h.commits)
    finally:
        srv.db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'fault-killer'")
        killer.wait(30)
    kills = re.findall(r"killed (\d+)", killer.stderr.read().decode(errors="replace")) if killer.stderr else []
    print(f"pg killer: {kills[-1] if kills else 0} sessions terminated; unpack statuses {statuses}; "
          f"{ambiguous} ambiguous commits")
    assert srv.alive()
    final = ledger(srv.db, rid)
    assert final["heads"]["main"] == hs[-1].head and final["commit_refs"] == total
    clone_verify(hub, slug, hs[-1].head, expect_commits=total)
    p.close()
    hub.close()


# ===========================================================================
# The fs store failing
# ===========================================================================

def _swap_for_file(d: Path) -> Path:
    """Moves directory d aside and puts an empty regular file in its place
    (works as root, where chmod does not stop writes). Returns the aside path."""
    aside = d.with_name(d.name + ".aside")
    d.rename(aside)
    d.write_bytes(b"")
    return aside


def _restore(d: Path, aside: Path) -> None:
    if d.is_file():
        d.unlink()
    aside.rename(d)


@pytest.mark.store("fs")
def test_fs_mpacks_dir_gone(start_server):
    """mpacks/ replaced by a file: an unpack cannot move its pack into
    place (503, nothing written) and a fetch that must read a stored pack
    fails cleanly; once mpacks/ is back the same unpack succeeds without a
    new upload and everything verifies."""
    srv = start_server()
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url, timeout=60)
    slug, rid = _new_repo(hub, "fsgone")
    h1, h2 = chain(2, seed=unique("fg"))
    hub.push(OWNER, slug, h1.pack(), "main", h1.head)
    assert p.stage(slug, h2.pack())[0] == 200
    before = ledger(srv.db, rid)
    mp = Path(srv.store_dir) / "mpacks"
    aside = _swap_for_file(mp)
    try:
        r = p.unpack(slug, h2.pack(), h2.head)
        _assert_clean_error(r, (503,))
        assert ledger(srv.db, rid) == before
        # A want never fetched before: the server must read h1's pack.
        r = p.fetch(slug, [h1.commits[1]["commit_id"]])
        _assert_clean_error(r, (503,))
        assert srv.alive()
    finally:
        _restore(mp, aside)
    r = p.unpack(slug, h2.pack(), h2.head)
    assert r.status_code == 200, _status(r)
    assert r.json()["commits_written"] == len(h2.commits)
    clone_verify(hub, slug, h1.commits[1]["commit_id"], expect_commits=2)
    clone_verify(hub, slug, h2.head, expect_commits=len(h1.commits) + len(h2.commits))
    p.close()
    hub.close()


@pytest.mark.store("fs")
def test_fs_staged_pack_removed(start_server):
    """The staged upload disappears before unpack: 404 not_staged, nothing
    written; a new presign + upload then succeeds."""
    srv = start_server()
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url)
    slug, rid = _new_repo(hub, "fsstaged")
    (h,) = chain(1, seed=unique("fs"))
    assert p.stage(slug, h.pack())[0] == 200
    incoming = Path(srv.store_dir) / "incoming"
    staged = list(incoming.iterdir())
    assert len(staged) == 1, staged
    staged[0].unlink()
    r = p.unpack(slug, h.pack(), h.head)
    _assert_clean_error(r, (404,))
    assert ledger(srv.db, rid)["commit_refs"] == 0
    assert p.stage(slug, h.pack())[0] == 200
    r = p.unpack(slug, h.pack(), h.head)
    assert r.status_code == 200, _status(r)
    clone_verify(hub, slug, h.head, expect_commits=len(h.commits))
    p.close()
    hub.close()


@pytest.mark.store("fs")
def test_fs_incoming_dir_unusable_during_upload(start_server):
    """incoming/ replaced by a file while a presigned PUT streams: the bytes
    land in tmp/ (opened by fd at start-up) but cannot be linked into
    place, so the PUT fails cleanly and nothing is kept; with incoming/
    back the same URL works. (Swapping tmp/ itself changes nothing: the
    store writes there through a directory fd, which is the point.)"""
    srv = start_server()
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url)
    slug, rid = _new_repo(hub, "fsinc")
    (h,) = chain(1, seed=unique("ft"))
    pre = p.presign(slug, h.pack()).json()
    incoming = Path(srv.store_dir) / "incoming"
    tmp = Path(srv.store_dir) / "tmp"
    aside = _swap_for_file(incoming)
    try:
        r = p.upload(pre["upload_url"], h.pack())
        _assert_clean_error(r)
        assert not list(aside.iterdir())
        assert not list(tmp.iterdir()), "upload temporaries left in tmp/"
    finally:
        _restore(incoming, aside)
    r = p.upload(pre["upload_url"], h.pack())
    assert r.status_code in (200, 204), _status(r)
    r = p.unpack(slug, h.pack(), h.head)
    assert r.status_code == 200, _status(r)
    assert not list(tmp.iterdir()), "upload temporaries left in tmp/"
    p.close()
    hub.close()


@pytest.mark.store("fs")
def test_fs_store_readonly(start_server):
    """The store made read-only (chmod; not meaningful as root, where the
    swap tests above stand in for it)."""
    if os.geteuid() == 0:
        pytest.skip("root ignores file modes; covered by the directory-swap tests")
    srv = start_server()
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url)
    slug, rid = _new_repo(hub, "fsro")
    (h,) = chain(1, seed=unique("ro"))
    assert p.stage(slug, h.pack())[0] == 200
    mp = Path(srv.store_dir) / "mpacks"
    mode = mp.stat().st_mode
    mp.chmod(0o555)
    try:
        r = p.unpack(slug, h.pack(), h.head)
        _assert_clean_error(r, (503,))
        assert ledger(srv.db, rid)["commit_refs"] == 0
    finally:
        mp.chmod(mode)
    r = p.unpack(slug, h.pack(), h.head)
    assert r.status_code == 200, _status(r)
    p.close()
    hub.close()


@pytest.mark.store("fs")
def test_fs_store_churn_during_pushes_and_fetches(start_server):
    """mpacks/ disappears and comes back every 40 ms while pushes and
    fetches run: each request ends 200 or a clean 5xx; once the store is
    stable every push is retried to success (no re-upload) and every
    acknowledged head is fetchable and verifies."""
    srv = start_server()
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url, timeout=60)
    slug, rid = _new_repo(hub, "fschurn")
    hs = chain(8, seed=unique("fc"))
    hub.push(OWNER, slug, hs[0].pack(), "main", hs[0].head)
    mp = Path(srv.store_dir) / "mpacks"
    stop = threading.Event()
    flips = [0]

    def churn() -> None:
        while not stop.is_set():
            aside = _swap_for_file(mp)
            time.sleep(0.02)
            _restore(mp, aside)
            flips[0] += 1
            time.sleep(0.02)

    t = threading.Thread(target=churn)
    statuses: dict[str, int] = {}
    acked = [hs[0]]
    t.start()
    try:
        for h in hs[1:]:
            assert p.stage(slug, h.pack())[0] == 200  # incoming/ and tmp/ are untouched
            for attempt in range(100):
                r = p.unpack(slug, h.pack(), h.head)
                statuses[f"unpack {r.status_code}"] = statuses.get(f"unpack {r.status_code}", 0) + 1
                if r.status_code == 200:
                    acked.append(h)
                    break
                _assert_clean_error(r, (503,))
            for i in range(8):
                want = random.choice(acked).commits[random.randrange(3)]["commit_id"]
                r = p.fetch(slug, [want])
                statuses[f"fetch {r.status_code}"] = statuses.get(f"fetch {r.status_code}", 0) + 1
                if r.status_code != 200:
                    # 503 store_unavailable, whether reading the source
                    # packs or storing the new one failed (the latter was
                    # a 500: the fs put reported a missing mpacks/ as
                    # MH_ENOENT)
                    _assert_clean_error(r, (503,))
    finally:
        stop.set()
        t.join()
        if mp.is_file():
            mp.unlink()
    print(f"store churn: {flips[0]} flips, {statuses}")
    assert srv.alive()
    assert [h.head for h in acked] == [h.head for h in hs], "some push never succeeded while the store churned"
    total = sum(len(h.commits) for h in hs)
    assert ledger(srv.db, rid)["commit_refs"] == total
    for h in hs:
        clone_verify(hub, slug, h.head)
    p.close()
    hub.close()


# ===========================================================================
# The S3 store failing: a fault proxy between musehubd and the emulator
# ===========================================================================

S3_BUCKET = "musehub-faults"


@pytest.fixture(scope="module")
def s3f(server_factory, tmp_path_factory):
    """An S3 emulator, a FaultProxy in front of it, and a server whose
    store is the proxy (independent of --store)."""
    why = s3emu_mod.available()
    if why:
        pytest.skip(f"S3 emulator unavailable: {why}")
    d = tmp_path_factory.mktemp("s3faults")
    endpoint, proc = s3emu_mod.start(str(d), S3_BUCKET)
    u = urllib.parse.urlsplit(endpoint)
    proxy = FaultProxy(u.hostname, u.port).start()
    srv = server_factory(MUSEHUB_STORE=f"s3:{S3_BUCKET}", MUSEHUB_S3_ENDPOINT=proxy.url,
                         MUSEHUB_S3_ACCESS_KEY=s3emu_mod.ACCESS_KEY, MUSEHUB_S3_SECRET_KEY=s3emu_mod.SECRET_KEY,
                         MUSEHUB_S3_PATH_STYLE="1")
    try:
        yield {"srv": srv, "proxy": proxy}
    finally:
        try:
            srv.stop()
        finally:
            proxy.stop()
            s3emu_mod.stop(proc)


@pytest.fixture
def s3ctx(s3f):
    """Per test: a fresh repo, clients, and the proxy back to pass after."""
    srv, proxy = s3f["srv"], s3f["proxy"]
    proxy.set_mode("pass")
    proxy.reset_stats()
    hub = srv.hub(timeout=120)
    p = Pusher(srv.url, timeout=120)
    slug, rid = _new_repo(hub, "s3f")
    yield {"srv": srv, "proxy": proxy, "hub": hub, "p": p, "slug": slug, "rid": rid}
    proxy.set_mode("pass")
    p.close()
    hub.close()
    assert srv.alive(), "the server died during an S3 fault test"


def _timed_unpack(p: Pusher, slug: str, h: muselib.History, limit: float):
    t0 = time.monotonic()
    r = p.unpack(slug, h.pack(), h.head)
    dt = time.monotonic() - t0
    assert dt < limit, f"unpack took {dt:.1f}s (limit {limit}s): {_status(r)}"
    return r


def test_s3_pass_through(s3ctx):
    c = s3ctx
    (h,) = chain(1, seed=unique("s3p"))
    c["hub"].push(OWNER, c["slug"], h.pack(), "main", h.head)
    clone_verify(c["hub"], c["slug"], h.head, expect_commits=len(h.commits))
    assert c["proxy"].stats().get("pass", 0) >= 3


def test_s3_transient_503_is_retried(s3ctx):
    """Two 503 SlowDown answers are absorbed by the backend's retries."""
    c = s3ctx
    (h,) = chain(1, seed=unique("s3t"))
    assert c["p"].stage(c["slug"], h.pack())[0] == 200
    c["proxy"].set_mode("503", times=2)
    r = _timed_unpack(c["p"], c["slug"], h, 30)
    assert r.status_code == 200, _status(r)
    assert c["proxy"].stats().get("503") == 2
    clone_verify(c["hub"], c["slug"], h.head, expect_commits=len(h.commits))


@pytest.mark.parametrize("mode", ["500", "503", "reset"])
def test_s3_persistent_failure_unpack(s3ctx, mode):
    """The store fails every request: the unpack ends in a clean 502/503
    within the retry budget, nothing is written; when the store is back
    the same unpack succeeds without a new upload."""
    c = s3ctx
    (h,) = chain(1, seed=unique("s3e"))
    assert c["p"].stage(c["slug"], h.pack())[0] == 200
    before = ledger(c["srv"].db, c["rid"])
    c["proxy"].set_mode(mode)
    r = _timed_unpack(c["p"], c["slug"], h, 40)
    _assert_clean_error(r, (502, 503))
    assert c["proxy"].stats().get(mode, 0) >= 4, c["proxy"].requests()  # the first try and 3 retries
    assert ledger(c["srv"].db, c["rid"]) == before
    c["proxy"].set_mode("pass")
    r = _timed_unpack(c["p"], c["slug"], h, 30)
    assert r.status_code == 200, _status(r)
    clone_verify(c["hub"], c["slug"], h.head, expect_commits=len(h.commits))


def test_s3_close_mid_body(s3ctx):
    """Responses cut in the middle of their body: once is retried; always
    is a clean error; afterwards everything works."""
    c = s3ctx
    h1, h2 = chain(2, files=200, blob_size=512, seed=unique("s3c"))
    assert c["p"].stage(c["slug"], h1.pack())[0] == 200
    c["proxy"].set_mode("close_mid_body", times=1, match=r"^GET ")
    r = _timed_unpack(c["p"], c["slug"], h1, 30)
    assert r.status_code == 200, _status(r)
    assert c["proxy"].stats().get("close_mid_body") == 1
    assert c["p"].stage(c["slug"], h2.pack())[0] == 200
    before = ledger(c["srv"].db, c["rid"])
    c["proxy"].set_mode("close_mid_body")
    r = _timed_unpack(c["p"], c["slug"], h2, 40)
    _assert_clean_error(r, (502, 503))
    assert c["proxy"].stats().get("close_mid_body", 0) >= 4, c["proxy"].requests()
    assert ledger(c["srv"].db, c["rid"]) == before
    c["proxy"].set_mode("pass")
    r = _timed_unpack(c["p"], c["slug"], h2, 30)
    assert r.status_code == 200, _status(r)
    clone_verify(c["hub"], c["slug"], h2.head, expect_commits=len(h1.commits) + len(h2.commits))


def test_s3_short_stall_recovers(s3ctx):
    """One request stalls 2 s and is then dropped: the unpack still succeeds."""
    c = s3ctx
    (h,) = chain(1, seed=unique("s3s"))
    assert c["p"].stage(c["slug"], h.pack())[0] == 200
    c["proxy"].set_mode("stall:2", times=1)
    r = _timed_unpack(c["p"], c["slug"], h, 30)
    assert r.status_code == 200, _status(r)
    clone_verify(c["hub"], c["slug"], h.head, expect_commits=len(h.commits))


@pytest.mark.parametrize("mode", ["503", "close_mid_body"])
def test_s3_fetch_faults(s3ctx, mode):
    """A fetch that must read stored packs and store a new one, against a
    failing store: a clean error; once the store is back the same fetch
    succeeds and its pack verifies."""
    c = s3ctx
    (h,) = chain(1, commits=6, seed=unique("s3f"))
    c["hub"].push(OWNER, c["slug"], h.pack(), "main", h.head)
    want = h.commits[2]["commit_id"]
    c["proxy"].set_mode(mode)
    t0 = time.monotonic()
    r = c["p"].fetch(c["slug"], [want])
    assert time.monotonic() - t0 < 40
    _assert_clean_error(r, (502, 503))
    assert c["proxy"].stats().get(mode, 0) >= 1, c["proxy"].requests()
    c["proxy"].set_mode("pass")
    clone_verify(c["hub"], c["slug"], want, expect_commits=3)


@pytest.mark.skipif(os.environ.get("MUSEHUB_FAULT_SLOW") != "1", reason="set MUSEHUB_FAULT_SLOW=1 (takes ~70 s)")
def test_s3_permanent_stall_is_not_a_hang(s3ctx):
    """The store accepts connections and never answers: the unpack ends in
    a clean error once the low-speed limit and the retries run out."""
    c = s3ctx
    (h,) = chain(1, seed=unique("s3h"))
    assert c["p"].stage(c["slug"], h.pack())[0] == 200
    c["proxy"].set_mode("stall:300")
    r = _timed_unpack(c["p"], c["slug"], h, 110)
    _assert_clean_error(r, (502, 503))


# ===========================================================================
# Clients vanishing
# ===========================================================================

def _split_url(url: str) -> tuple[str, str]:
    u = urllib.parse.urlsplit(url)
    return u.path, u.query


def _vanish(sock: socket.socket, rst: bool) -> None:
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def _settle_fds(srv, base: int) -> None:
    """Call with every client of ours closed: the server must be back to
    the fds it held before (its listener, pool, store dirs, loop)."""
    n = wait_fds_at_most(srv.proc.pid, base, 10)
    assert n <= base, f"fd leak: {n} open, {base} before\n" + "\n".join(proc_fd_targets(srv.proc.pid))


def _warm_base(srv) -> int:
    """One push and one clone with throw-away clients, so pools and caches
    are at their steady size; returns the server's fd count with no client
    connected."""
    hub = srv.hub(timeout=60)
    slug, _ = _new_repo(hub, "warm")
    (h,) = chain(1, seed=unique("w"))
    hub.push(OWNER, slug, h.pack(), "main", h.head)
    clone_verify(hub, slug, h.head)
    hub.close()
    time.sleep(0.3)
    return wait_fds_at_most(srv.proc.pid, 0, 0.5)


@pytest.mark.store("fs")
def test_client_vanishes_mid_upload(start_server):
    """PUT to the presigned /_store/ URL, half the bytes, then close (FIN or
    RST): the server stays up, keeps nothing in incoming/ or tmp/, holds no
    extra fd, and a full upload to the same URL still works."""
    srv = start_server()
    base = _warm_base(srv)
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url)
    slug, rid = _new_repo(hub, "vanup")
    (h,) = chain(1, files=300, blob_size=2048, seed=unique("vu"))
    data = h.pack()
    store = Path(srv.store_dir)
    urls = []
    for i in range(12):
        pre = p.presign(slug, data).json()
        urls.append(pre["upload_url"])
        path, query = _split_url(pre["upload_url"])
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(f"PUT {path}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(data)}\r\n"
                  f"Content-Type: application/octet-stream\r\n\r\n".encode())
        s.sendall(data[: len(data) // 2])
        time.sleep(0.05)
        _vanish(s, rst=i % 2 == 1)
    _wait_for(lambda: not list((store / "tmp").iterdir()), 10, "tmp/ to be emptied")
    assert not list((store / "incoming").iterdir()), "a half upload was kept"
    assert srv.alive()
    assert httpx.get(srv.url + "/healthz", timeout=10).status_code == 200
    r = p.upload(urls[-1], data)
    assert r.status_code in (200, 204), _status(r)
    r = p.unpack(slug, data, h.head)
    assert r.status_code == 200, _status(r)
    p.close()
    hub.close()
    _settle_fds(srv, base)


def test_client_vanishes_mid_download(start_server):
    """GET the fetched pack, read a little, close: the server stays up, no
    fd is left behind, and the pack still downloads whole."""
    srv = start_server()
    base = _warm_base(srv)
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url)
    slug, rid = _new_repo(hub, "vandown")
    (h,) = chain(1, commits=20, files=400, changed=40, blob_size=4096, seed=unique("vd"))
    hub.push(OWNER, slug, h.pack(), "main", h.head)
    res = p.fetch(slug, [h.head]).json()
    url = res["mpack_url"]
    if url.startswith("/"):
        url = srv.url + url
    u = urllib.parse.urlsplit(url)
    for i in range(12):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect((u.hostname, u.port))
        s.sendall(f"GET {u.path}?{u.query} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode())
        got = s.recv(1000)
        assert got.startswith(b"HTTP/1.1 200"), got[:100]
        _vanish(s, rst=i % 2 == 0)
    assert srv.alive()
    clone_verify(hub, slug, h.head, expect_commits=len(h.commits))
    p.close()
    hub.close()
    _settle_fds(srv, base)


def test_client_vanishes_during_unpack(start_server):
    """The client sends unpack-mpack and leaves at once: the server finishes
    or abandons the unpack on its own; either way the repository is
    consistent and the same unpack then answers 200 with the pushed head."""
    srv = start_server()
    base = _warm_base(srv)
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url)
    slug, rid = _new_repo(hub, "vanunpack")
    (h,) = chain(1, commits=30, files=300, seed=unique("vx"))
    assert p.stage(slug, h.pack())[0] == 200
    body, ctype = muselib.encode_body({"mpack_key": h.key, "branch": "main", "head": h.head}, "json")
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(f"POST /{OWNER}/{slug}/push/unpack-mpack HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    _vanish(s, rst=True)
    # Wait for the abandoned unpack to end (its access-log line; 499 when
    # it answered into the void), so the retry below does not race it.
    _wait_for(lambda: re.search(rf"POST /{OWNER}/{slug}/push/unpack-mpack \d+ ",
                                Path(srv.log_path).read_text(errors="replace")), 30, "the abandoned unpack")
    assert srv.alive()
    r = p.unpack(slug, h.pack(), h.head)
    assert r.status_code == 200, _status(r)
    assert r.json()["head"] == h.head
    led = ledger(srv.db, rid)
    assert led["heads"]["main"] == h.head and led["commit_refs"] == len(h.commits)
    clone_verify(hub, slug, h.head, expect_commits=len(h.commits))
    p.close()
    hub.close()
    _settle_fds(srv, base)


# ===========================================================================
# Allocation failures inside a running server (FAILALLOC=1 build)
# ===========================================================================

FAILALLOC_BIN = os.environ.get("MUSEHUB_FAILALLOC_BIN")

# Places that abort on a failed allocation by design (each is commented in
# its source): with no record of the operation there is no way to call its
# callback later, and calling it at once would break the never-re-entrant
# rule. A server killed there is expected; anything else is a bug.
DOCUMENTED_ABORTS = {
    "store: out of memory queuing": "src/store/fs.c op_new",
    "store: s3: out of memory queuing": "src/store/s3.c op_new",
    "db: out of memory": "src/db/pool.c op_bare",
}


class _FailallocServer:
    """Drives the MH_FAILALLOC_CTL signals of a FAILALLOC=1 server."""

    def __init__(self, start, ctl: Path, database: str | None = None, store_dir: str | None = None) -> None:
        kw = {}
        if database:
            kw["database"] = database
        if store_dir:
            kw["store_dir"] = store_dir
        self.srv = start(MH_FAILALLOC_CTL=str(ctl), start_timeout=60,
                         ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:handle_abort=0",
                         MUSEHUB_DB_POOL="4", **kw)
        self.ctl = ctl
        self.seq = 0

    def _wait_line(self, pattern: str, timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = None
            for m in rx.finditer(Path(self.srv.log_path).read_text(errors="replace")):
                pass
            if m:
                return m
            if not self.srv.alive():
                raise AssertionError("server died waiting for " + pattern)
            time.sleep(0.01)
        raise AssertionError(f"no '{pattern}' in the log within {timeout}s")

    def arm(self, n: int) -> None:
        self.ctl.write_text(f"{n}\n")
        self.seq += 1
        os.kill(self.srv.proc.pid, signal.SIGUSR2)
        self._wait_line(rf"failalloc: armed seq={self.seq} n={n} ")

    def disarm(self) -> tuple[int, int]:
        os.kill(self.srv.proc.pid, signal.SIGUSR1)
        m = self._wait_line(rf"failalloc: disarmed seq={self.seq} count=(\d+) failed=(\d+)")
        return int(m.group(1)), int(m.group(2))


def _sample(total: int, k: int, rng: random.Random) -> list[int]:
    """k values of N in 1..total: the first few, evenly spaced, and random."""
    vals = {1, 2, 3, 5, 8, 13}
    vals.update(max(1, round(total * i / (k // 2))) for i in range(1, k // 2 + 1))
    while len(vals) < k + 6 and len(vals) < total:
        vals.add(rng.randint(1, total))
    return sorted(v for v in vals if v <= total)


@pytest.mark.skipif(not FAILALLOC_BIN, reason="needs MUSEHUB_FAILALLOC_BIN (make unit-failalloc)")
def test_failalloc_server_push_fetch(start_server, tmp_path, monkeypatch):
    """A FAILALLOC=1 + ASan server: the Nth allocation during an unpack,
    then during a fetch + download, fails (one-shot), for a sample of N.
    Each request ends 200 or a clean 5xx (never a crash, never a hang);
    the server keeps serving; the same unpack then succeeds without a new
    upload and the fetch verifies. A server that dies must have died in
    one of DOCUMENTED_ABORTS (it is then restarted on the same state)."""
    monkeypatch.setenv("MUSEHUB_BIN", FAILALLOC_BIN)
    ctl = tmp_path / "failalloc.ctl"
    fs = _FailallocServer(start_server, ctl)
    db_url, store_dir = fs.srv.database_url, fs.srv.store_dir
    rng = random.Random(int(os.environ.get("MUSEHUB_FAILALLOC_SEED", "10")))
    samples = os.environ.get("MUSEHUB_FAILALLOC_SAMPLES", "24")
    k = 10**9 if samples == "all" else int(samples)
    found: dict[str, list] = {"documented_aborts": [], "errors": []}

    def clients():
        return fs.srv.hub(timeout=60), Pusher(fs.srv.url, timeout=60)

    hub, p = clients()

    def restart_if_dead(phase: str, n: int, grace: float = 0.0) -> bool:
        nonlocal fs, hub, p
        try:  # an aborting ASan process may take a moment to exit
            fs.srv.proc.wait(grace)
        except subprocess.TimeoutExpired:
            return False
        log = Path(fs.srv.log_path).read_text(errors="replace")
        where = [v for k_, v in DOCUMENTED_ABORTS.items() if k_ in log.split("failalloc: armed")[-1]]
        assert where, f"server died at N={n} during {phase} outside the documented aborts:\n" + \
            "\n".join(log.splitlines()[-80:])
        found["documented_aborts"].append((phase, n, where[0]))
        fs.srv.stop(check=False)  # reaped: its abort is accounted for
        hub.close()
        p.close()
        fs = _FailallocServer(start_server, tmp_path / f"failalloc{n}.ctl", database=db_url, store_dir=store_dir)
        hub, p = clients()
        return True

    # Calibrate: how many allocations one unpack and one fetch make.
    slug, rid = _new_repo(hub, "fa")
    (h,) = chain(1, commits=4, files=30, seed=unique("fa"))
    assert p.stage(slug, h.pack())[0] == 200
    fs.arm(0)
    assert p.unpack(slug, h.pack(), h.head).status_code == 200
    n_unpack, _ = fs.disarm()
    fs.arm(0)
    r = p.fetch(slug, [h.commits[1]["commit_id"]])
    assert r.status_code == 200
    hub.download(r.json()["mpack_url"])
    n_fetch, _ = fs.disarm()
    print(f"failalloc: an unpack counts {n_unpack} allocations, a fetch + download {n_fetch}")
    assert n_unpack > 10 and n_fetch > 10

    only = os.environ.get("MUSEHUB_FAILALLOC_ONLY")  # "phase:N,..." to replay given runs
    plan = [(ph, int(v)) for ph, v in (x.split(":") for x in only.split(","))] if only else \
        [(ph, n) for ph, total in (("unpack", n_unpack), ("fetch", n_fetch)) for n in _sample(total, k, rng)]
    for phase, n in plan:
        if True:
            slug, rid = _new_repo(hub, "fa")
            (h,) = chain(1, commits=4, files=30, seed=unique("fa"))
            assert p.stage(slug, h.pack())[0] == 200
            if phase == "fetch":
                assert p.unpack(slug, h.pack(), h.head).status_code == 200
            fs.arm(n)
            try:
                if phase == "unpack":
                    r = p.unpack(slug, h.pack(), h.head)
                else:
                    r = p.fetch(slug, [h.commits[1]["commit_id"]])
                    if r.status_code == 200 and r.json().get("mpack_url"):
                        d = p.c.get(fs.srv.url + r.json()["mpack_url"]
                                    if r.json()["mpack_url"].startswith("/") else r.json()["mpack_url"])
                        assert d.status_code in (200,) + CLEAN_5XX, _status(d)
            except httpx.TimeoutException:
                raise AssertionError(f"{phase} hung at N={n} (no answer within 60 s)")
            except httpx.TransportError as e:
                if restart_if_dead(phase, n, grace=15):
                    continue
                raise AssertionError(f"{phase} at N={n}: connection error {e!r} with the server alive")
            if restart_if_dead(phase, n):
                continue
            count, failed = fs.disarm()
            if r.status_code != 200:
                _assert_clean_error(r)
                found["errors"].append((phase, n, r.status_code))
                assert failed, f"{phase} failed at N={n} without an injected failure: {_status(r)}"
            # The server keeps serving, and the state is whole.
            r2 = p.unpack(slug, h.pack(), h.head)
            assert r2.status_code == 200, f"retry after N={n}: {_status(r2)}"
            assert ledger(fs.srv.db, rid)["commit_refs"] == len(h.commits)
            clone_verify(hub, slug, h.commits[1]["commit_id"], expect_commits=2)
    print(f"failalloc: {len(found['errors'])} clean errors, documented aborts {found['documented_aborts']}")
    hub.close()
    p.close()
    fs.srv.stop()  # SIGTERM: exit 0, and LeakSanitizer finds nothing at exit


# ---------------------------------------------------------------------------
# PostgreSQL down (issue 15 item 6, SPEC 4.8)
# ---------------------------------------------------------------------------

def test_pg_down_answers_503_fast_and_recovers(start_server):
    """With its own throwaway cluster stopped, /readyz and a request that
    needs the database answer 503 (with Retry-After) within 5 s — the
    pool's 1 s wait for a connection plus room for a loaded ASan run, not
    the 30 s query timeout — and the server recovers by itself once
    the cluster is back."""
    import tempfile
    import pgtmp
    d = tempfile.mkdtemp(prefix="musehub-pgdown-", dir="/tmp")
    try:
        pg_url = pgtmp.start(d)
        port = int(urllib.parse.urlsplit(pg_url).port)
        srv = start_server(database=pg_url)
        hub = srv.hub()
        assert hub.raw("GET", "/readyz").status_code == 200
        hub.create_repo(OWNER, unique("before"), visibility="public")
        pgtmp.stop(d)
        for path, method, body in [("/readyz", "GET", None), ("/readyz", "GET", None),
                                   ("/api/repos", "POST", {"owner": OWNER, "name": unique("down"),
                                                          "visibility": "public"}),
                                   ("/api/repos?owner=" + OWNER, "GET", None)]:
            t0 = time.monotonic()
            r = hub.raw(method, path, body, fmt="json")
            dt = time.monotonic() - t0
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.headers.get("retry-after"), path
            assert dt < 5.0, f"{method} {path}: 503 after {dt:.2f} s"
        assert srv.alive()
        pgtmp.start(d, port=port)  # the same address: the server's URL names it
        _wait_for(lambda: hub.raw("GET", "/readyz").status_code == 200, 15, "readyz 200 after the restart")
        r = hub.create_repo(OWNER, unique("after"), visibility="public")
        assert r["visibility"] == "public"
        assert hub.raw("GET", f"/{OWNER}/{r['slug']}/refs").status_code == 200
    finally:
        pgtmp.destroy(d)


# ===========================================================================
# The snapshot rebuild beside the transaction (issue 20)
# ===========================================================================

def _metric(srv, name: str) -> float:
    text = srv.hub().raw("GET", "/metrics").text
    return float(next(l.split()[1] for l in text.splitlines() if l.startswith(name + " ")))


def test_snapshot_rows_wait_for_the_budget_outside_the_transaction(start_server):
    """The snapshots are rebuilt while the transaction inserts the other
    rows, so their COPY rows are reserved inside the transaction, where
    nothing may wait for memory (the repository row is held). Deterministic:
    push A waits for its repository row (held by us) with its pack's
    records and rows reserved; push B then queues for the budget (its two
    stream windows do not fit beside A's); A's row is released. A's
    snapshot rows cannot be reserved without waiting (B is first in line),
    so A rolls its transaction back, waits for the memory without a lock,
    and starts the transaction over: B gives up (503 busy, memory-queue
    timeout), A lands whole, B's retry lands, nothing stays reserved."""
    mib = 1 << 20
    # 9 MiB: one stream's two 4 MiB windows and A's ~1 MiB, not two streams.
    srv = start_server(MUSEHUB_PACK_MEMORY=str(9 * mib), MUSEHUB_PACK_QUEUE_TIMEOUT_MS="3000")
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url)
    slug_a, rid_a = _new_repo(hub, "snapsa")
    slug_b, _ = _new_repo(hub, "snapsb")
    # 130 commits over 3,000 files: two checkpoint manifests (~0.6 MB of
    # snapshot rows), ~1 MB of records and rows held before them.
    a = muselib.generate(commits=130, files=3000, changed=3, blob_size=16, seed=unique("snapsa"))
    (b,) = chain(1, seed=unique("snapsb"))
    assert p.stage(slug_a, a.pack())[0] == 200 and p.stage(slug_b, b.pack())[0] == 200
    locker = _hold(srv, "snaps-locker", f"SELECT 1 FROM repos WHERE repo_id = {sql_str(rid_a)} FOR UPDATE")
    res: dict = {}
    ta = threading.Thread(target=lambda: res.update(a=p.unpack(slug_a, a.pack(), a.head)))
    tb = None
    try:
        ta.start()
        _wait_for(lambda: _lock_waiter(srv), 30, "push A to wait for its repository row")
        pb = Pusher(srv.url)
        tb = threading.Thread(target=lambda: res.update(b=pb.unpack(slug_b, b.pack(), b.head)))
        tb.start()
        _wait_for(lambda: _metric(srv, "musehub_pack_memory_waiting") >= 1, 30, "push B to queue for the budget")
    finally:
        _release(locker)
    ta.join(60)
    if tb:
        tb.join(60)
    assert res["a"].status_code == 200, _status(res["a"])
    assert res["a"].json()["commits_written"] == 130 and res["a"].json()["snapshots_written"] == 130
    assert hub.refs(OWNER, slug_a)["branch_heads"] == {"main": a.head}
    log = Path(srv.log_path).read_text(errors="replace")
    assert "wait for the pack-memory budget outside the transaction" in log, "A never started over"
    assert res["b"].status_code in (200, 503), _status(res["b"])
    if res["b"].status_code == 503:
        assert res["b"].json()["error"] == "busy"
        r = p.unpack(slug_b, b.pack(), b.head)
        assert r.status_code == 200, _status(r)
    assert hub.refs(OWNER, slug_b)["branch_heads"] == {"main": b.head}
    assert _metric(srv, "musehub_pack_memory_in_use_bytes") == 0
    p.close()
    hub.close()


def test_transaction_fails_while_the_snapshots_are_rebuilt(start_server):
    """The transaction's first statements run while the thread pool
    rebuilds the snapshots: a transaction that fails then (its backend
    terminated while it waits for the repository row) ends the push only
    once the rebuild let go of the pack (the answer waits for it): a
    clean 503, nothing written, and the same unpack succeeds afterwards."""
    srv = start_server()
    hub = srv.hub(timeout=60)
    p = Pusher(srv.url)
    slug, rid = _new_repo(hub, "rebuilding")
    h = muselib.generate(commits=400, files=2000, changed=5, blob_size=16, seed=unique("rebuilding"))
    before = ledger(srv.db, rid)
    assert p.stage(slug, h.pack())[0] == 200
    r = _unpack_dropped_while_waiting(srv, p, slug, h, "rebuild-locker", "its repository row",
                                      f"SELECT 1 FROM repos WHERE repo_id = {sql_str(rid)}")
    _assert_clean_error(r, (503,))
    assert ledger(srv.db, rid) == before, "the dropped transaction left rows behind"
    r = p.unpack(slug, h.pack(), h.head)
    assert r.status_code == 200, _status(r)
    assert r.json()["snapshots_written"] == 400
    assert hub.refs(OWNER, slug)["branch_heads"] == {"main": h.head}
    p.close()
    hub.close()
