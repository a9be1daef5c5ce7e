"""Helpers shared by the reliability tests (test_faults.py, test_crash.py,
test_load.py).

  proc_fds(pid) / proc_rss_kib(pid)   what a process holds (Linux /proc)
  wait_fds_at_most(pid, n, timeout)   polls until the fd count is <= n
  chain(n, ...)                       n incremental histories, each built
                                      on the previous one's head
  Pusher                              the three push steps, step by step,
                                      with any status returned (never raises
                                      on a 4xx/5xx)
  clone_verify(hub, owner, slug, head)  fetch + download + muselib check of
                                      every id; returns the clone summary
  ledger(db, repo_id)                 ref-row counts and branch heads
"""
from __future__ import annotations

import os
import time
from typing import Any

import httpx

import muselib
from e2e_util import repo_counts, sql_str

OWNER = "gabriel"

# Statuses a fault may legitimately turn a request into: a clean error.
CLEAN_5XX = (500, 502, 503, 504)


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_fds_at_most(pid: int, n: int, timeout: float = 10.0) -> int:
    """Polls until the process holds at most n fds; returns the last count."""
    deadline = time.monotonic() + timeout
    while True:
        c = proc_fds(pid)
        if c <= n or time.monotonic() > deadline:
            return c
        time.sleep(0.1)


def chain(n: int, commits: int = 3, files: int = 40, changed: int = 3,
          blob_size: int = 64, seed: str = "c") -> list[muselib.History]:
    """n histories; history i+1 is built on history i's head (so pushing
    them in order is a sequence of fast-forwards of one branch)."""
    out: list[muselib.History] = []
    parent = None
    for i in range(n):
        h = muselib.generate(commits=commits, files=files, changed=changed, blob_size=blob_size,
                             seed=f"{seed}{i}", first_index=i * commits, parent=parent)
        out.append(h)
        parent = (h.head, h.manifest)
    return out


class Pusher:
    """The push steps with any status returned, for tests that expect
    errors.  Uses its own httpx client with a bounded timeout so that a
    hang shows up as a failure, not as a stuck test."""

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        self.base = base_url.rstrip("/")
        self.c = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self.c.close()

    def post(self, path: str, body: dict) -> httpx.Response:
        data, ctype = muselib.encode_body(body, "json")
        return self.c.post(self.base + path, content=data,
                           headers={"Content-Type": ctype, "Accept": "application/json"})

    def presign(self, slug: str, data: bytes) -> httpx.Response:
        return self.post(f"/{OWNER}/{slug}/push/mpack-presign",
                         {"mpack_key": muselib.blob_id(data), "size_bytes": len(data)})

    def upload(self, url: str, data: bytes) -> httpx.Response:
        if url.startswith("/"):
            url = self.base + url
        return self.c.put(url, content=data)

    def stage(self, slug: str, data: bytes) -> tuple[int, Any]:
        """presign + upload: (status of the failing step or 200, detail)."""
        r = self.presign(slug, data)
        if r.status_code != 200:
            return r.status_code, r.text
        j = r.json()
        if j.get("already_present"):
            return 200, j
        u = self.upload(j["upload_url"], data)
        return (200 if u.status_code in (200, 204) else u.status_code), u.text

    def unpack(self, slug: str, data: bytes, head: str, branch: str = "main",
               **kw: Any) -> httpx.Response:
        body = {"mpack_key": muselib.blob_id(data), "branch": branch, "head": head}
        body.update(kw)
        return self.post(f"/{OWNER}/{slug}/push/unpack-mpack", body)

    def fetch(self, slug: str, want: list[str], have: list[str] | None = None) -> httpx.Response:
        return self.post(f"/{OWNER}/{slug}/fetch", {"want": want, "have": have or []})


def clone_verify(hub: muselib.Hub, slug: str, head: str,
                 expect_commits: int | None = None) -> dict:
    """Full clone of `head`: the pack hashes to its id and muselib rebuilds
    and checks every snapshot, commit and blob id.  Returns the fetch
    answer."""
    out = hub.clone(OWNER, slug, [head])
    res = out["result"]
    assert out["pack"] is not None, f"fetch of {head} sent nothing: {res}"
    ids = {c["commit_id"] for c in out["pack"]["commits"]}
    assert head in ids, f"the pack for {head} does not contain it"
    if expect_commits is not None:
        assert res["commit_count"] == expect_commits, res
    return res


def ledger(db, repo_id: str) -> dict:
    """Ref-row counts and branch heads of one repository."""
    out: dict[str, Any] = dict(repo_counts(db, repo_id))
    out["heads"] = dict(db.rows(f"SELECT name, head_commit_id FROM branches WHERE repo_id = {sql_str(repo_id)}"))
    out["mpack_refs"] = db.count(f"SELECT count(*) FROM mpack_refs WHERE repo_id = {sql_str(repo_id)}")
    return out
