"""museclient — musehubd's client flows for the benchmarks (push in its
three steps, refs + fetch + download), timed step by step, over rawhttp:
one keep-alive connection per host, TCP_NODELAY, one write per request.
Every call has a timeout (HTTP_TIMEOUT) and raises BenchError on an
unexpected status."""
from __future__ import annotations

import time
from typing import Any

import msgpack

import muselib
import rawhttp
from procs import BenchError

OWNER = "bench"
MSGPACK = "application/x-msgpack"
HTTP_TIMEOUT = 300.0


class Muse:
    """musehubd's client flows over rawhttp (one keep-alive connection per
    host, TCP_NODELAY, one write per request)."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url
        self.http = rawhttp.Client(base_url, timeout=HTTP_TIMEOUT)

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: Any = None,
             expect: tuple[int, ...] = (200,)) -> Any:
        data = msgpack.packb(body, use_bin_type=True) if body is not None else b""
        hdrs = {"Accept": MSGPACK}
        if body is not None:
            hdrs["Content-Type"] = MSGPACK
        r = self.http.request(method, path, data, hdrs)
        if r.status not in expect:
            raise BenchError(f"{method} {path} -> {r.status}: {r.body[:300]!r}")
        return r.decoded()

    def create_repo(self, name: str) -> dict:
        return self.call("POST", "/api/repos", {"owner": OWNER, "name": name,
                                                "visibility": "public", "initialize": False},
                         expect=(201,))

    def refs(self, slug: str) -> dict:
        return self.call("GET", f"/{OWNER}/{slug}/refs")

    def push(self, slug: str, pack: bytes, head: str) -> dict[str, float]:
        """GET refs, presign, PUT, unpack.  Returns the step times (s),
        server = refs + presign + unpack, total, and unpack's elapsed_ms."""
        key = muselib.blob_id(pack)
        t0 = time.perf_counter()
        self.refs(slug)
        t1 = time.perf_counter()
        pre = self.call("POST", f"/{OWNER}/{slug}/push/mpack-presign",
                        {"mpack_key": key, "size_bytes": len(pack)})
        t2 = time.perf_counter()
        if not pre.get("already_present"):
            r = self.http.request("PUT", pre["upload_url"], pack,
                                  {"Content-Type": "application/octet-stream"})
            if r.status not in (200, 204):
                raise BenchError(f"PUT upload -> {r.status}: {r.body[:300]!r}")
        t3 = time.perf_counter()
        res = self.call("POST", f"/{OWNER}/{slug}/push/unpack-mpack",
                        {"mpack_key": key, "branch": "main", "head": head})
        t4 = time.perf_counter()
        if res.get("head") != head:
            raise BenchError(f"unpack answered head {res.get('head')}, pushed {head}")
        return {"refs": t1 - t0, "presign": t2 - t1, "upload": t3 - t2, "unpack": t4 - t3,
                "server": (t1 - t0) + (t2 - t1) + (t4 - t3), "total": t4 - t0,
                "elapsed_ms": float(res.get("elapsed_ms") or 0)}

    def fetch(self, slug: str, want: list[str], have: list[str], **extra: object) -> dict:
        """POST fetch; extra adds request fields (depth, formats)."""
        return self.call("POST", f"/{OWNER}/{slug}/fetch", {"want": want, "have": have, **extra})

    def pull(self, slug: str, have: list[str], want: str | None = None,
             expect_commits: int | None = None, **extra: object) -> dict[str, float]:
        """GET refs, fetch (want = the branch head), download the pack.
        The pack's hash is checked after the clock stops."""
        t0 = time.perf_counter()
        head = want or self.refs(slug)["branch_heads"]["main"]
        t1 = time.perf_counter()
        ans = self.fetch(slug, [head], have, **extra)
        t2 = time.perf_counter()
        data = b""
        if ans.get("mpack_url"):
            r = self.http.request("GET", ans["mpack_url"])
            if r.status != 200:
                raise BenchError(f"GET pack -> {r.status}: {r.body[:200]!r}")
            data = r.body
        t3 = time.perf_counter()
        if data and muselib.blob_id(data) != ans["mpack_id"]:
            raise BenchError("downloaded pack does not hash to mpack_id")
        if expect_commits is not None and ans.get("commit_count") != expect_commits:
            raise BenchError(f"fetch sent {ans.get('commit_count')} commits, expected {expect_commits}")
        return {"refs": t1 - t0, "fetch": t2 - t1, "download": t3 - t2, "total": t3 - t0,
                "bytes": float(len(data))}
