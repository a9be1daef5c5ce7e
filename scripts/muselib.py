#!/usr/bin/python3
"""muselib — the compatibility face of the `muse` package for the e2e tests
and older scripts.

Everything but the HTTP client is re-exported from `muse` unchanged (ids,
the mpack v0/v1/v2 format, the delta rebuild, the generator, LocalState,
push plans).  `Hub` here keeps the httpx-based client the e2e suite was
written against (its `raw()` returns an httpx.Response, its `client` is an
httpx.Client, transport errors are httpx's), so the tests that poke at
raw HTTP keep working.  The command-line tools do not use it: they use
`muse.Hub` (http.client, streamed transfers).

Only the standard library and Debian's python3-msgpack, python3-zstandard
and python3-httpx (for this Hub) are used (run with /usr/bin/python3).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Mapping

from muse.ids import (EMPTY_SNAPSHOT_ID, ID_PREFIX, MAX_PATH_BYTES, Manifest,  # noqa: F401
                      blob_id, commit_id, commit_id_of, commit_parents, commit_payload,
                      snapshot_id, snapshot_payload, valid_id, valid_path)
from muse.mpack import (FRAME_MAX, MPACK_MAGIC, PackIndex, PackWriter,  # noqa: F401
                        _blob_list, build_mpack, parse_mpack, read_pack)
from muse.mpwalk import PackError  # noqa: F401
from muse.history import (SEED_EPOCH, History, _need, generate,  # noqa: F401
                          manifest_delta, pack_tips, rebuild_and_verify, snapshot_map,
                          topo_commits, verify_history)
from muse.hub import (JSON, MSGPACK, Api, HubError,  # noqa: F401
                      decode_payload, encode_body)
from muse.state import LocalState, _atomic_write  # noqa: F401
from muse.plan import load_plan, plan_resume_point  # noqa: F401

#: (method, url, body) -> headers: an MSign request signer (SPEC 5)
Signer = Callable[[str, str, bytes], Mapping[str, str]]

__all__ = [
    "EMPTY_SNAPSHOT_ID", "ID_PREFIX", "MAX_PATH_BYTES", "Manifest", "blob_id",
    "commit_id", "commit_id_of", "commit_parents", "commit_payload", "snapshot_id",
    "snapshot_payload", "valid_id", "valid_path", "FRAME_MAX", "MPACK_MAGIC",
    "PackIndex", "PackWriter", "_blob_list", "build_mpack", "parse_mpack", "read_pack",
    "PackError", "SEED_EPOCH", "History", "_need", "generate", "manifest_delta",
    "pack_tips", "rebuild_and_verify", "snapshot_map", "topo_commits", "verify_history",
    "JSON", "MSGPACK", "Api", "HubError", "Signer", "decode_payload", "encode_body",
    "LocalState", "_atomic_write", "load_plan", "plan_resume_point", "decode_body",
    "Hub", "checkout", "push_plan",
]


# --------------------------------------------------------------------------
# HTTP client (httpx; the e2e suite's)
# --------------------------------------------------------------------------

def decode_body(resp: Any) -> Any:
    """Decode an httpx response by its Content-Type: msgpack, JSON, text for
    text/*, None for an empty body, bytes otherwise."""
    return decode_payload(resp.headers.get("content-type") or "", resp.content)


class Hub(Api):
    """Synchronous client of musehubd's HTTP API on httpx (the endpoints
    are muse.hub.Api's, shared with the tools' muse.Hub).

    base_url  e.g. "http://127.0.0.1:1337"
    headers   extra headers sent with every API request
    signer    optional callable (method, url, body) -> extra headers; the
              hook for MSign request signing (SPEC 5).  Not applied to
              presigned store URLs (upload/download), which carry their own
              authorisation.
    Request bodies are msgpack unless fmt="json"; responses are decoded per
    their Content-Type.  Methods raise HubError on an unexpected status;
    raw() returns the httpx.Response and `client` is the httpx.Client.
    """

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None,
                 signer: Signer | None = None, timeout: float = 300.0) -> None:
        import httpx  # imported lazily so offline users need no httpx
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self.headers = dict(headers or {})
        self.client = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Hub":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _transport(self, method: str, url: str, content: bytes | None, headers: dict) -> Any:
        return self.client.request(method, url, content=content, headers=headers)

    @staticmethod
    def _decoded(resp: Any) -> Any:
        return _safe_decode(resp)

    def upload(self, url: str, data: bytes, expect: Iterable[int] = (200, 204)) -> int:
        """PUT bytes to a presigned URL; returns the status."""
        if url.startswith("/"):
            url = self.base_url + url
        resp = self.client.put(url, content=data)
        if resp.status_code not in tuple(expect):
            raise HubError("PUT", url, resp.status_code, _safe_decode(resp),
                           resp.headers)
        return resp.status_code

    def push(self, owner: str, slug: str, pack_bytes: bytes, branch: str,
             head: str, force: bool = False,
             expected_old_head: str | None = None) -> dict:
        """The three push steps.  Returns the unpack result plus
        `timings` {presign, upload, unpack} in seconds (upload 0.0 when the
        server said already_present) and `already_present`."""
        return self.push_steps(owner, slug, blob_id(pack_bytes), len(pack_bytes),
                               lambda url: self.upload(url, pack_bytes), branch, head,
                               force, expected_old_head)

    def download(self, url: str) -> bytes:
        """GET a presigned URL (absolute, or relative to the server)."""
        if url.startswith("/"):
            url = self.base_url + url
        resp = self.client.get(url)
        if resp.status_code != 200:
            raise HubError("GET", url, resp.status_code, _safe_decode(resp),
                           resp.headers)
        return resp.content

    def object(self, owner: str, slug: str, oid: str, **kw: Any) -> Any:
        """The raw httpx.Response of GET /objects/{oid} (no status check)."""
        return self.raw("GET", f"/{owner}/{slug}/objects/{oid}", **kw)

    def clone(self, owner: str, slug: str, want: list[str],
              have: list[str] | None = None,
              known_manifests: Mapping[str, Mapping[str, str]] | None = None,
              known_objects: Any = None, formats: list[int] | None = None) -> dict:
        """fetch + download + verify (v0, v1 or v2 packs).  Returns {result, data, pack, manifests,
        timings{fetch, download, verify}}; pack/data are None when the
        server had nothing to send."""
        t0 = time.perf_counter()
        res = self.fetch(owner, slug, want, have, formats=formats)
        t1 = time.perf_counter()
        out = {"result": res, "data": None, "pack": None, "manifests": {},
               "timings": {"fetch": t1 - t0, "download": 0.0, "verify": 0.0}}
        if not res.get("mpack_url"):
            return out
        data = self.download(res["mpack_url"])
        t2 = time.perf_counter()
        got = blob_id(data)
        if got != res.get("mpack_id"):
            raise ValueError(f"downloaded pack hashes to {got}, server said "
                             f"{res.get('mpack_id')}")
        pack = parse_mpack(data)
        out["manifests"] = rebuild_and_verify(pack, known_manifests, known_objects)
        out.update(data=data, pack=pack)
        out["timings"].update(download=t2 - t1, verify=time.perf_counter() - t2)
        return out


def _safe_decode(resp: Any) -> Any:
    try:
        return decode_body(resp)
    except Exception:
        return resp.content



# --------------------------------------------------------------------------
# Checkout and push plans (git2muse's push.json)
# --------------------------------------------------------------------------

def checkout(manifest: Mapping[str, str], dest: str,
             get_blob: Callable[[str], bytes]) -> int:
    """Write the files of a manifest under dest; returns the file count."""
    n = 0
    for path, oid in sorted(manifest.items()):
        if not valid_path(path):
            raise ValueError(f"refusing to write bad path {path!r}")
        full = os.path.join(dest, *path.split("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as fh:
            fh.write(get_blob(oid))
        n += 1
    return n


# --------------------------------------------------------------------------
# Push plans (git2muse's push.json)
# --------------------------------------------------------------------------

def push_plan(hub: Hub, owner: str, slug: str, plan: Mapping[str, Any],
              force: bool = False, resume: bool = True,
              progress: Callable[[dict, dict], None] | None = None) -> list[dict]:
    """Push every pack of a git2muse plan in order; returns the results of
    the packs pushed.  Each entry: {file, mpack_key, size_bytes, head,
    branch[, force, expected_old_head]}; files are relative to the plan's
    directory.  With resume, packs a previous run pushed are skipped (see
    plan_resume_point)."""
    results = []
    base = plan.get("_dir", ".")
    skip: set[int] = set()
    if resume:
        skip = plan_resume_point(plan, hub.refs(owner, slug).get("branch_heads") or {})
    for i, entry in enumerate(plan["packs"]):
        if i in skip:
            continue
        fpath = entry["file"]
        if not os.path.isabs(fpath):
            fpath = os.path.join(base, fpath)
        with open(fpath, "rb") as fh:
            data = fh.read()
        if blob_id(data) != entry["mpack_key"]:
            raise ValueError(f"{fpath} does not hash to {entry['mpack_key']}")
        res = hub.push(owner, slug, data, entry["branch"], entry["head"],
                       force=force or bool(entry.get("force")),
                       expected_old_head=entry.get("expected_old_head"))
        results.append(res)
        if progress:
            progress(entry, res)
    return results
