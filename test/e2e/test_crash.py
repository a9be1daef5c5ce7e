"""Crash safety (DESIGN 6, issue 10): musehubd is killed with SIGKILL at
random moments while a stream of pushes, fetches and GC jobs runs, then
restarted on the same database and store, ROUNDS times.

After every restart:
  * every acknowledged push (a 200 from unpack-mpack) is intact: the branch
    is at the last acknowledged head or at the one push that was in flight
    (committed, answer lost), never behind;
  * the branch head is whole: a full fetch of it succeeds and muselib
    re-derives every snapshot, commit and blob id from the pack;
  * a fetch answered before the crash (same request, possibly cached in
    fetch_packs) still downloads and verifies;
and at the end every enqueued job has resumed and finished ("done"), and
the history still verifies after the GCs.

Every pack a fetcher downloads during a round is verified too: a crash
must never make the server hand out a corrupt or missing pack.

Environment:
  MUSEHUB_CRASH_ROUNDS  kill/restart rounds (default 20)
  MUSEHUB_CRASH_SEED    seed of the kill moments and the job choices
                        (default 1010; printed on failure)
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import httpx
import pytest

import muselib
from e2e_util import unique
from fault_util import CLEAN_5XX, OWNER, Pusher, chain, clone_verify

ROUNDS = int(os.environ.get("MUSEHUB_CRASH_ROUNDS", "20"))
SEED = int(os.environ.get("MUSEHUB_CRASH_SEED", "1010"))
COMMITS_PER_PUSH = 3


class Stream:
    """The pusher's view: hs[0..acked] acknowledged, hs[next] the one being
    pushed (next == acked + 1 always)."""

    def __init__(self, hs: list[muselib.History]) -> None:
        self.hs = hs
        self.acked = -1
        self.lock = threading.Lock()
        # What a client holding any of these heads knows (for incremental
        # fetches, whose deltas start from the have tip's snapshot).
        self.known = {muselib.snapshot_id(h.manifest): h.manifest for h in hs}

    @property
    def next(self) -> int:
        return self.acked + 1

    def acked_heads(self) -> list[str]:
        with self.lock:
            return [h.head for h in self.hs[: self.acked + 1]]


def _pusher(url: str, slug: str, st: Stream, stop: threading.Event, errors: list) -> None:
    p = Pusher(url, timeout=30)
    try:
        while not stop.is_set() and st.next < len(st.hs):
            h = st.hs[st.next]
            code, detail = p.stage(slug, h.pack())
            if code in CLEAN_5XX:
                continue
            if code != 200:
                errors.append(f"stage {st.next}: {code} {detail}")
                return
            r = p.unpack(slug, h.pack(), h.head)
            if r.status_code == 200:
                with st.lock:
                    st.acked += 1
            elif r.status_code not in CLEAN_5XX:
                errors.append(f"unpack {st.next}: {r.status_code} {r.text[:300]}")
                return
    except httpx.TransportError:
        pass  # the server was killed
    finally:
        p.close()


def _fetcher(url: str, slug: str, st: Stream, rng: random.Random, stop: threading.Event,
             errors: list, stats: dict) -> None:
    hub = muselib.Hub(url, timeout=30)
    try:
        while not stop.is_set():
            heads = st.acked_heads()
            if not heads:
                time.sleep(0.02)
                continue
            want = rng.choice(heads)
            have = [rng.choice(heads)] if rng.random() < 0.5 else []
            try:
                hub.clone(OWNER, slug, [want], have, known_manifests=st.known)  # downloads, verifies
                stats["fetches"] = stats.get("fetches", 0) + 1
            except muselib.HubError as e:
                if e.status not in CLEAN_5XX:
                    errors.append(f"fetch {want} have {have}: {e}")
                    return
            except ValueError as e:  # the pack did not verify
                errors.append(f"fetch {want} have {have}: corrupt pack: {e}")
                return
    except httpx.TransportError:
        pass
    finally:
        hub.close()


def _wait_jobs(hub: muselib.Hub, job_ids: list[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    out: dict[str, dict] = {}
    while time.monotonic() < deadline:
        out = {j: hub.call("GET", f"/api/jobs/{j}") for j in job_ids}
        if all(v["status"] in ("done", "failed") for v in out.values()):
            return out
        time.sleep(0.2)
    return out


@pytest.mark.slow
def test_sigkill_during_pushes_fetches_and_gc(start_server):
    rng = random.Random(SEED)
    env = {"MUSEHUB_JOB_LEASE_SECONDS": "2", "MUSEHUB_DB_POOL": "4"}
    srv = start_server(**env)
    db_url, store_dir = srv.database_url, srv.store_dir
    hub = srv.hub(timeout=30)
    a = hub.create_repo(OWNER, unique("crash"))
    b = hub.create_repo(OWNER, unique("crashb"))
    # B: a fixed history, fetched and garbage-collected while A grows.
    hb = chain(3, commits=4, files=80, seed=unique("cb"))
    for h in hb:
        hub.push(OWNER, b["slug"], h.pack(), "main", h.head)
    # About 15 pushes a second get through: enough histories never to run dry.
    st = Stream(chain(ROUNDS * 20 + 20, commits=COMMITS_PER_PUSH, files=80, seed=unique("ca")))
    gc = hub.raw("POST", f"/api/repos/{b['repo_id']}/jobs", {"job_type": "mpack.gc"})
    gc_supported = gc.status_code == 202
    jobs = [gc.json()["job_id"]] if gc_supported else []
    pre_crash_fetch = None  # (want, mpack_id) of a fetch answered before a kill
    log: list[str] = []
    unacked_commits = 0  # kills between an unpack's COMMIT and its answer
    t0 = time.monotonic()
    try:
        for rnd in range(ROUNDS):
            stop = threading.Event()
            errors: list[str] = []
            stats: dict = {}
            if gc_supported and rng.random() < 0.5:
                target = rng.choice([a, b])
                r = hub.raw("POST", f"/api/repos/{target['repo_id']}/jobs", {"job_type": "mpack.gc"})
                assert r.status_code == 202, r.text
                jobs.append(r.json()["job_id"])
            if st.acked >= 0 and pre_crash_fetch is None:
                want = st.hs[st.acked].head
                res = hub.fetch(OWNER, a["slug"], [want])
                pre_crash_fetch = (want, res["mpack_id"])
            threads = [threading.Thread(target=_pusher, args=(srv.url, a["slug"], st, stop, errors)),
                       threading.Thread(target=_fetcher, args=(srv.url, a["slug"], st, random.Random(rng.random()),
                                                               stop, errors, stats)),
                       threading.Thread(target=_fetcher, args=(srv.url, b["slug"],
                                                               _static_stream(hb), random.Random(rng.random()),
                                                               stop, errors, stats))]
            for t in threads:
                t.start()
            delay = rng.uniform(0.1, 1.2)
            time.sleep(delay)
            acked_before_kill = st.acked
            os.kill(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(10)
            srv.stop(check=False)
            stop.set()
            for t in threads:
                t.join(40)
                assert not t.is_alive(), "a client thread hung after the kill"
            assert not errors, f"round {rnd} (seed {SEED}): " + "\n".join(errors)
            hub.close()

            srv = start_server(database=db_url, store_dir=store_dir, **env)
            hub = srv.hub(timeout=30)
            head = hub.refs(OWNER, a["slug"])["branch_heads"].get("main")
            acked = st.acked
            allowed = {st.hs[acked].head if acked >= 0 else None}
            if acked + 1 < len(st.hs):
                allowed.add(st.hs[acked + 1].head)  # in flight: committed, answer lost
            assert head in allowed, (f"round {rnd} (seed {SEED}): branch at {head}, last acknowledged push "
                                     f"{acked} ({st.hs[acked].head if acked >= 0 else None})")
            if acked + 1 < len(st.hs) and head == st.hs[acked + 1].head:
                with st.lock:
                    st.acked += 1
                unacked_commits += 1
            if head:
                clone_verify(hub, a["slug"], head, expect_commits=COMMITS_PER_PUSH * (st.acked + 1))
            clone_verify(hub, b["slug"], hb[-1].head, expect_commits=sum(len(h.commits) for h in hb))
            if pre_crash_fetch:
                want, mpack_id = pre_crash_fetch
                out = hub.clone(OWNER, a["slug"], [want])
                assert out["pack"] is not None
            log.append(f"round {rnd}: killed after {delay:.2f}s, pushes acked {acked_before_kill + 1}->"
                       f"{st.acked + 1}, fetches {stats.get('fetches', 0)}")
        assert st.acked >= ROUNDS // 2, f"too few pushes got through: {st.acked + 1}\n" + "\n".join(log)
        # Jobs resume after the kills (lease 2 s) and finish.
        if jobs:
            final = _wait_jobs(hub, jobs, 60)
            bad = {j: v for j, v in final.items() if v["status"] != "done"}
            assert not bad, f"jobs did not finish after the restarts: {bad}"
        head = st.hs[st.acked].head
        clone_verify(hub, a["slug"], head, expect_commits=COMMITS_PER_PUSH * (st.acked + 1))
        clone_verify(hub, b["slug"], hb[-1].head)
        # Incremental fetches across the whole acknowledged history.
        for i in range(0, st.acked, max(1, st.acked // 5)):
            out = hub.clone(OWNER, a["slug"], [head], [st.hs[i].head], known_manifests=st.known)
            assert out["result"]["commit_count"] == COMMITS_PER_PUSH * (st.acked - i)
    finally:
        print(f"crash test (seed {SEED}, {time.monotonic() - t0:.1f}s, gc jobs {len(jobs)}, "
              f"{unacked_commits} pushes committed but unanswered):\n" + "\n".join(log))
        hub.close()


def _static_stream(hs: list[muselib.History]) -> Stream:
    s = Stream(hs)
    s.acked = len(hs) - 1
    return s
