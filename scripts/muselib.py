#!/usr/bin/python3
"""muselib — a second, independent Python implementation of the Muse wire
format (SPEC sections 1 and 2) plus a small HTTP client for musehubd.

It exists so that the C server can be checked against code that shares
nothing with it: ids, the mpack layout and the delta rebuild are written
here from SPEC.md alone.  Only the standard library and the Debian packages
python3-msgpack and python3-httpx are used (run with /usr/bin/python3).

Contents
  ids          blob_id, snapshot_id, commit_id, valid_id, valid_path
  mpack        build_mpack, parse_mpack, manifest_delta, rebuild_and_verify
  generator    generate() — synthetic histories shaped like seed 000
  client       Hub (httpx, sync), HubError
  local store  LocalState — what muse-fetch keeps between fetches
  plans        push_plan() — pushes a git2muse push.json in order

Invariants
  * ids are "sha256:" + 64 lowercase hex digits, nothing else.
  * A manifest is dict[path, object_id]; snapshots travel in delta form only.
  * Every function that checks something raises ValueError with a message
    naming the offending id/path; nothing is silently repaired.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import tempfile
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

import msgpack

# --------------------------------------------------------------------------
# Identifiers (SPEC 1)
# --------------------------------------------------------------------------

ID_PREFIX = "sha256:"
_ID_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_PATH_BYTES = 4096
EMPTY_SNAPSHOT_ID = ("sha256:e3b0c44298fc1c149afbf4c8996fb924"
                     "27ae41e4649b934ca495991b7852b855")


def _sha(data: bytes) -> str:
    return ID_PREFIX + hashlib.sha256(data).hexdigest()


def blob_id(content: bytes) -> str:
    """Object id of a blob: sha256 of the content bytes."""
    return _sha(bytes(content))


def valid_id(s: Any) -> bool:
    """True when s is exactly `sha256:` + 64 lowercase hex digits."""
    return isinstance(s, str) and _ID_RE.fullmatch(s) is not None


def valid_path(p: Any) -> bool:
    """SPEC 1 path rule: UTF-8, 1..4096 bytes, relative, '/'-separated, no
    empty / '.' / '..' segment, no NUL, no leading or trailing '/'."""
    if not isinstance(p, str):
        return False
    try:
        raw = p.encode("utf-8")  # fails on lone surrogates
    except UnicodeEncodeError:
        return False
    if not 1 <= len(raw) <= MAX_PATH_BYTES or b"\0" in raw:
        return False
    return all(seg not in ("", ".", "..") for seg in p.split("/"))


def snapshot_payload(manifest: Mapping[str, str]) -> bytes:
    """The bytes a snapshot id hashes: entries `path\\0object_id`, sorted
    bytewise by the UTF-8 entry, joined with a single NUL."""
    entries = sorted((p + "\0" + o).encode("utf-8") for p, o in manifest.items())
    return b"\0".join(entries)


def snapshot_id(manifest: Mapping[str, str]) -> str:
    """Snapshot id of a full manifest; the empty manifest hashes b''."""
    return _sha(snapshot_payload(manifest))


def commit_payload(parent_ids: Iterable[str], snapshot_id: str, message: str,
                   committed_at: str, author: str) -> bytes:
    """The bytes a commit id hashes (five NUL-joined fields, parents sorted)."""
    parents = "\0".join(sorted(p for p in parent_ids if p))
    fields = [parents, snapshot_id, message, committed_at, author]
    return "\0".join(fields).encode("utf-8")


def commit_id(parent_ids: Iterable[str], snapshot_id: str, message: str,
              committed_at: str, author: str) -> str:
    """Commit id per SPEC 1.  Parent ids are sorted bytewise (they are ASCII,
    so str ordering is byte ordering).  None/empty parents are dropped."""
    return _sha(commit_payload(parent_ids, snapshot_id, message,
                               committed_at, author))


def commit_parents(c: Mapping[str, Any]) -> list[str]:
    """Parent ids of a commit map (first, then second), without nils."""
    return [p for p in (c.get("parent_commit_id"), c.get("parent2_commit_id")) if p]


def commit_id_of(c: Mapping[str, Any]) -> str:
    """Recompute the id of a commit map."""
    return commit_id(commit_parents(c), c["snapshot_id"], c["message"],
                     c["committed_at"], c["author"])


# --------------------------------------------------------------------------
# mpack (SPEC 2)
# --------------------------------------------------------------------------

MPACK_MAGIC = b"MUSE"


def _blob_list(blobs: Any) -> list[dict]:
    """Accept a list of {object_id, content} maps or a dict id -> bytes."""
    if isinstance(blobs, Mapping):
        return [{"object_id": k, "content": bytes(v)} for k, v in blobs.items()]
    return list(blobs or [])


def build_mpack(commits: list[dict], snapshots: list[dict], blobs: Any,
                branch_heads: Mapping[str, str] | None = None,
                version: int = 1, blobs_key: str = "blobs") -> bytes:
    """Serialise an mpack.  version 1 = b"MUSE\\x01" + msgpack body, version 0
    = body only.  Blob contents must be bytes (they become msgpack bin).
    `blobs_key="objects"` writes the push-side synonym."""
    body: dict[str, Any] = {
        "commits": list(commits),
        "snapshots": list(snapshots),
        blobs_key: _blob_list(blobs),
    }
    if branch_heads is not None:
        body["branch_heads"] = dict(branch_heads)
    packed = msgpack.packb(body, use_bin_type=True)
    if version == 1:
        return MPACK_MAGIC + b"\x01" + packed
    if version == 0:
        return packed
    raise ValueError(f"unknown mpack version {version}")


def parse_mpack(data: bytes) -> dict:
    """Parse v0 or v1 bytes into {version, commits, snapshots, blobs,
    branch_heads}.  `objects` is folded into `blobs`.  Raises ValueError on
    anything that is not exactly one msgpack map (trailing bytes included)."""
    data = bytes(data)
    if data[:4] == MPACK_MAGIC:
        if len(data) < 5 or data[4] != 1:
            raise ValueError(f"unsupported mpack version byte {data[4:5]!r}")
        version, body = 1, data[5:]
    else:
        version, body = 0, data
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"mpack body is not one msgpack value: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"mpack body is a {type(obj).__name__}, not a map")
    blobs = list(obj.get("blobs") or []) + list(obj.get("objects") or [])
    for b in blobs:
        if not isinstance(b, dict) or not isinstance(b.get("content"), bytes):
            raise ValueError("blob entry without bin content")
    return {
        "version": version,
        "commits": list(obj.get("commits") or []),
        "snapshots": list(obj.get("snapshots") or []),
        "blobs": blobs,
        "branch_heads": dict(obj.get("branch_heads") or {}),
    }


def manifest_delta(old: Mapping[str, str] | None,
                   new: Mapping[str, str]) -> tuple[dict, list]:
    """(delta_upsert, delta_remove) taking `old` to `new` (old None = root)."""
    if old is None:
        return dict(new), []
    upsert = {p: o for p, o in new.items() if old.get(p) != o}
    remove = sorted(p for p in old if p not in new)
    return upsert, remove


def snapshot_map(sid: str, parent_sid: str | None,
                 old: Mapping[str, str] | None, new: Mapping[str, str]) -> dict:
    """A delta-form snapshot map (SPEC 2)."""
    up, rm = manifest_delta(old if parent_sid else None, new)
    return {"snapshot_id": sid, "parent_snapshot_id": parent_sid,
            "delta_upsert": up, "delta_remove": rm}


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def rebuild_and_verify(pack: Mapping[str, Any],
                       known_manifests: Mapping[str, Mapping[str, str]] | None = None,
                       known_objects: Any = None,
                       check_blobs: bool = True) -> dict[str, dict[str, str]]:
    """Rebuild every snapshot of a parsed pack from its deltas and check ids.

    pack             a dict as returned by parse_mpack (or the same shape).
    known_manifests  snapshot_id -> manifest for parents outside the pack
                     (anything with `in` and `[]`, e.g. LocalState.manifests).
    known_objects    optional container of object ids the caller already
                     holds; when given, every object an in-pack snapshot
                     upserts must be in the pack or in it (completeness).
    check_blobs      hash every blob and compare with its object_id.

    Returns {snapshot_id: manifest} for the snapshots in the pack.  Raises
    ValueError naming the first problem found.
    """
    known = known_manifests if known_manifests is not None else {}
    by_id: dict[str, dict] = {}
    for s in pack.get("snapshots") or []:
        sid = s.get("snapshot_id")
        _need(valid_id(sid), f"snapshot with bad id {sid!r}")
        _need("manifest" not in s, f"snapshot {sid} carries a full manifest")
        by_id[sid] = s

    blob_ids: set[str] = set()
    for b in pack.get("blobs") or []:
        oid = b.get("object_id")
        _need(valid_id(oid), f"blob with bad id {oid!r}")
        if check_blobs:
            got = blob_id(b["content"])
            _need(got == oid, f"blob {oid} content hashes to {got}")
        blob_ids.add(oid)

    out: dict[str, dict[str, str]] = {}

    def parent_manifest(pid: str, child: str) -> Mapping[str, str]:
        if pid in out:
            return out[pid]
        if pid in known:
            return known[pid]
        raise ValueError(f"snapshot {child}: parent {pid} is neither in the "
                         f"pack nor known")

    def build(sid: str) -> None:
        # Iterative: collect the chain of not-yet-built in-pack ancestors.
        chain, cur, seen = [], sid, set()
        while cur in by_id and cur not in out:
            _need(cur not in seen, f"snapshot parent cycle through {cur}")
            seen.add(cur)
            chain.append(cur)
            cur = by_id[cur].get("parent_snapshot_id")
            if not cur:
                break
        for s_id in reversed(chain):
            s = by_id[s_id]
            pid = s.get("parent_snapshot_id")
            upsert = s.get("delta_upsert") or {}
            remove = s.get("delta_remove") or []
            _need(isinstance(upsert, dict) and isinstance(remove, list),
                  f"snapshot {s_id}: malformed delta")
            if pid:
                _need(valid_id(pid), f"snapshot {s_id}: bad parent id {pid!r}")
                m = dict(parent_manifest(pid, s_id))
            else:
                m = {}
            for p in remove:
                _need(valid_path(p), f"snapshot {s_id}: bad removed path {p!r}")
                m.pop(p, None)
            for p, o in upsert.items():
                _need(valid_path(p), f"snapshot {s_id}: bad path {p!r}")
                _need(valid_id(o), f"snapshot {s_id}: bad object id {o!r} at {p!r}")
                if known_objects is not None:
                    _need(o in blob_ids or o in known_objects,
                          f"snapshot {s_id}: object {o} ({p}) is neither in "
                          f"the pack nor held locally")
                m[p] = o
            got = snapshot_id(m)
            _need(got == s_id, f"snapshot {s_id}: rebuilt manifest "
                               f"({len(m)} entries) hashes to {got}")
            out[s_id] = m

    for sid in by_id:
        build(sid)

    commit_ids: set[str] = set()
    for c in pack.get("commits") or []:
        cid = c.get("commit_id")
        _need(valid_id(cid), f"commit with bad id {cid!r}")
        for f in ("message", "committed_at", "author"):
            _need(isinstance(c.get(f), str), f"commit {cid}: {f} is not a string")
        sid = c.get("snapshot_id")
        _need(valid_id(sid), f"commit {cid}: bad snapshot id {sid!r}")
        for p in commit_parents(c):
            _need(valid_id(p), f"commit {cid}: bad parent id {p!r}")
        got = commit_id_of(c)
        _need(got == cid, f"commit {cid}: fields hash to {got}")
        _need(sid in out or sid in known,
              f"commit {cid}: snapshot {sid} is neither in the pack nor known")
        commit_ids.add(cid)
    return out


def topo_commits(commits: list[dict]) -> list[dict]:
    """Commits ordered parents-first (parents outside the list are ignored)."""
    by_id = {c["commit_id"]: c for c in commits}
    done: set[str] = set()
    order: list[dict] = []
    for c in commits:
        stack = [(c["commit_id"], False)]
        while stack:
            cid, expanded = stack.pop()
            if cid in done or cid not in by_id:
                continue
            if expanded:
                done.add(cid)
                order.append(by_id[cid])
                continue
            stack.append((cid, True))
            for p in commit_parents(by_id[cid]):
                if p not in done:
                    stack.append((p, False))
    return order


def pack_tips(commits: list[dict]) -> list[str]:
    """Commit ids in the list that no other commit in the list names as parent."""
    parents = {p for c in commits for p in commit_parents(c)}
    return [c["commit_id"] for c in commits if c["commit_id"] not in parents]


# --------------------------------------------------------------------------
# Synthetic histories (seed 000's _populate)
# --------------------------------------------------------------------------

SEED_EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


class History:
    """A generated history: commits, delta snapshots and blobs, parents first.

    Attributes: commits, snapshots, blobs (list of {object_id, content}),
    head (tip commit id), manifest (head's manifest), branch, parent (the
    commit id the history was built on, or None), and, when generate() was
    asked with keep_manifests=True, manifests (commit id -> manifest).
    """

    def __init__(self) -> None:
        self.commits: list[dict] = []
        self.snapshots: list[dict] = []
        self.blobs: list[dict] = []
        self.head: str = ""
        self.manifest: dict[str, str] = {}
        self.branch = "main"
        self.parent: str | None = None
        self.manifests: dict[str, dict[str, str]] = {}
        self._packs: dict[tuple, bytes] = {}

    def pack(self, version: int = 1, branch_heads: bool = False,
             blobs_key: str = "blobs") -> bytes:
        """The mpack bytes (cached per argument set)."""
        k = (version, branch_heads, blobs_key)
        if k not in self._packs:
            bh = {self.branch: self.head} if branch_heads else None
            self._packs[k] = build_mpack(self.commits, self.snapshots, self.blobs,
                                         bh, version=version, blobs_key=blobs_key)
        return self._packs[k]

    @property
    def key(self) -> str:
        """mpack_key of the default (v1) pack."""
        return blob_id(self.pack())

    def summary(self, version: int = 1) -> dict:
        data = self.pack(version)
        return {"head": self.head, "mpack_key": blob_id(data),
                "size_bytes": len(data), "commits": len(self.commits),
                "snapshots": len(self.snapshots), "blobs": len(self.blobs)}


def generate(commits: int = 1031, files: int = 700, changed: int = 5,
             blob_size: int = 512, branch: str = "main",
             parent: tuple[str, Mapping[str, str]] | None = None,
             seed: str = "", first_index: int = 0, author: str = "gabriel",
             keep_manifests: bool = False) -> History:
    """Generate a history exactly like seed 000's `_populate`.

    Without `parent` and with seed="" the output is byte-for-byte the seed's
    history: base blobs f"base-{i:06d}" + b"x"*blob_size at
    src/file_{i:04d}.py; commit i changes files (i*changed+j) % files to
    f"commit-{i:05d}-file-{j}" + b"y"*blob_size on top of the *base*
    manifest (so the previous commit's changes revert), message
    f"commit-{i:05d}", committed_at = 2026-01-01T00:00:00+00:00 + 60 s * i.

    parent=(commit_id, manifest) builds on an existing commit: its manifest
    replaces the base manifest, the first snapshot is a delta against it and
    no base blobs are emitted (the receiver already holds them).
    seed prefixes every generated content and message so that two seeds
    give disjoint histories.  first_index offsets i (timestamps, messages,
    variant contents), useful for incremental pushes on top of a history.
    """
    h = History()
    h.branch = branch
    pre = f"{seed}:" if seed else ""
    seen_blobs: set[str] = set()

    def add_blob(data: bytes) -> str:
        oid = blob_id(data)
        if oid not in seen_blobs:
            seen_blobs.add(oid)
            h.blobs.append({"object_id": oid, "content": data})
        return oid

    if parent is None:
        base = {}
        for i in range(files):
            data = f"{pre}base-{i:06d}".encode() + b"x" * blob_size
            base[f"src/file_{i:04d}.py"] = add_blob(data)
        prev_commit, prev_manifest, prev_sid = None, None, None
    else:
        prev_commit, pm = parent
        base = dict(pm)
        prev_manifest, prev_sid = base, snapshot_id(base)
        h.parent = prev_commit
        seen_blobs.update(base.values())

    seen_snaps: set[str] = set()
    for n in range(commits):
        i = first_index + n
        manifest = dict(base)
        for j in range(changed):
            idx = (i * changed + j) % files
            data = f"{pre}commit-{i:05d}-file-{j}".encode() + b"y" * blob_size
            manifest[f"src/file_{idx:04d}.py"] = add_blob(data)
        sid = snapshot_id(manifest)
        if sid not in seen_snaps and sid != prev_sid:
            h.snapshots.append(snapshot_map(sid, prev_sid, prev_manifest, manifest))
            seen_snaps.add(sid)
        ts = SEED_EPOCH + datetime.timedelta(seconds=60 * i)
        msg = f"{pre}commit-{i:05d}"
        parents = [prev_commit] if prev_commit else []
        cid = commit_id(parents, sid, msg, ts.isoformat(), author)
        h.commits.append({
            "commit_id": cid,
            "parent_commit_id": prev_commit,
            "parent2_commit_id": None,
            "snapshot_id": sid,
            "message": msg,
            "author": author,
            "committed_at": ts.isoformat(),
            "branch": branch,
            "metadata": {},
            "sem_ver_bump": "none",
            "breaking_changes": [],
        })
        if keep_manifests:
            h.manifests[cid] = manifest
        prev_commit, prev_manifest, prev_sid = cid, manifest, sid
    h.head = prev_commit or ""
    h.manifest = dict(prev_manifest or {})
    return h


# --------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------

MSGPACK = "application/x-msgpack"
JSON = "application/json"


class HubError(Exception):
    """An unexpected HTTP status.  .status, .body (decoded when possible),
    .headers, .method, .url."""

    def __init__(self, method: str, url: str, status: int, body: Any,
                 headers: Mapping[str, str] | None = None) -> None:
        self.method, self.url, self.status, self.body = method, url, status, body
        self.headers = dict(headers or {})
        text = body if isinstance(body, (str, dict, list)) else repr(body)[:500]
        super().__init__(f"{method} {url} -> {status}: {text}")


def decode_body(resp: Any) -> Any:
    """Decode an httpx response by its Content-Type: msgpack, JSON, text for
    text/*, None for an empty body, bytes otherwise."""
    ctype = (resp.headers.get("content-type") or "").split(";")[0].strip().lower()
    data = resp.content
    if not data:
        return None
    if ctype == MSGPACK:
        return msgpack.unpackb(data, raw=False)
    if ctype == JSON or ctype.endswith("+json"):
        return json.loads(data)
    if ctype.startswith("text/"):
        return data.decode("utf-8", "replace")
    return data


def encode_body(body: Any, fmt: str = "msgpack") -> tuple[bytes, str]:
    """(bytes, content type) for a request body in msgpack or json."""
    if fmt == "json":
        return json.dumps(body).encode(), JSON
    return msgpack.packb(body, use_bin_type=True), MSGPACK


Signer = Callable[[str, str, bytes], Mapping[str, str]]


class Hub:
    """Synchronous client of musehubd's HTTP API.

    base_url  e.g. "http://127.0.0.1:1337"
    headers   extra headers sent with every API request
    signer    optional callable (method, url, body) -> extra headers; the
              hook for MSign request signing (SPEC 5).  Not applied to
              presigned store URLs (upload/download), which carry their own
              authorisation.
    Request bodies are msgpack unless fmt="json"; responses are decoded per
    their Content-Type.  Methods raise HubError on an unexpected status.
    """

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None,
                 signer: Signer | None = None, timeout: float = 300.0) -> None:
        import httpx  # imported lazily so offline users need no httpx
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self.client = httpx.Client(base_url=self.base_url,
                                   headers=dict(headers or {}), timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Hub":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------

    def raw(self, method: str, path: str, body: Any = None, *,
            fmt: str = "msgpack", content: bytes | None = None,
            accept: str | None = None, headers: Mapping[str, str] | None = None,
            params: Mapping[str, Any] | None = None) -> Any:
        """Send one request and return the httpx.Response, whatever its
        status.  `body` is encoded as msgpack/json; `content` is sent as is."""
        hdrs = dict(headers or {})
        if content is None and body is not None:
            content, ctype = encode_body(body, fmt)
            hdrs.setdefault("Content-Type", ctype)
        if accept:
            hdrs["Accept"] = accept
        url = path if path.startswith("http") else self.base_url + path
        if params:
            # The query is part of what MSign signs (@query): fold it into
            # the URL before signing, never after.
            from urllib.parse import urlencode
            query = urlencode({k: v for k, v in params.items() if v is not None})
            if query:
                url += ("&" if "?" in url else "?") + query
        if self.signer is not None:
            hdrs.update(self.signer(method, url, content or b""))
        return self.client.request(method, url, content=content, headers=hdrs)

    def call(self, method: str, path: str, body: Any = None, *,
             expect: Iterable[int] = (200,), **kw: Any) -> Any:
        """raw() + status check + decoded body."""
        resp = self.raw(method, path, body, **kw)
        decoded = _safe_decode(resp)
        if resp.status_code not in tuple(expect):
            raise HubError(method, str(resp.url), resp.status_code, decoded,
                           resp.headers)
        return decoded

    # -- repositories (SPEC 4.1, 4.2) ---------------------------------------

    def create_repo(self, owner: str, name: str, visibility: str = "public",
                    initialize: bool = False, description: str | None = None,
                    **kw: Any) -> dict:
        body = {"owner": owner, "name": name, "visibility": visibility,
                "initialize": initialize}
        if description is not None:
            body["description"] = description
        return self.call("POST", "/api/repos", body, expect=(201,), **kw)

    def get_repo(self, repo_id: str, **kw: Any) -> dict:
        return self.call("GET", f"/api/repos/{repo_id}", **kw)

    def list_repos(self, owner: str, **kw: Any) -> dict:
        return self.call("GET", "/api/repos", params={"owner": owner}, **kw)

    def delete_repo(self, repo_id: str, **kw: Any) -> None:
        self.call("DELETE", f"/api/repos/{repo_id}", expect=(204,), **kw)

    def refs(self, owner: str, slug: str, **kw: Any) -> dict:
        return self.call("GET", f"/{owner}/{slug}/refs", **kw)

    # -- push (SPEC 4.3) -----------------------------------------------------

    def presign(self, owner: str, slug: str, mpack_key: str, size_bytes: int,
                **kw: Any) -> dict:
        return self.call("POST", f"/{owner}/{slug}/push/mpack-presign",
                         {"mpack_key": mpack_key, "size_bytes": size_bytes}, **kw)

    def upload(self, url: str, data: bytes, expect: Iterable[int] = (200, 204)) -> int:
        """PUT bytes to a presigned URL; returns the status."""
        if url.startswith("/"):
            url = self.base_url + url
        resp = self.client.put(url, content=data)
        if resp.status_code not in tuple(expect):
            raise HubError("PUT", url, resp.status_code, _safe_decode(resp),
                           resp.headers)
        return resp.status_code

    def unpack(self, owner: str, slug: str, mpack_key: str, branch: str,
               head: str, force: bool = False,
               expected_old_head: str | None = None, **kw: Any) -> dict:
        body: dict[str, Any] = {"mpack_key": mpack_key, "branch": branch,
                                "head": head, "force": force}
        if expected_old_head is not None:
            body["expected_old_head"] = expected_old_head
        return self.call("POST", f"/{owner}/{slug}/push/unpack-mpack", body, **kw)

    def push(self, owner: str, slug: str, pack_bytes: bytes, branch: str,
             head: str, force: bool = False,
             expected_old_head: str | None = None) -> dict:
        """The three push steps.  Returns the unpack result plus
        `timings` {presign, upload, unpack} in seconds (upload 0.0 when the
        server said already_present) and `already_present`."""
        key = blob_id(pack_bytes)
        t0 = time.perf_counter()
        pre = self.presign(owner, slug, key, len(pack_bytes))
        t1 = time.perf_counter()
        present = bool(pre.get("already_present"))
        if not present:
            url = pre.get("upload_url") or pre.get("uploadUrl")
            if not url:
                raise HubError("POST", "mpack-presign", 200, pre)
            self.upload(url, pack_bytes)
        t2 = time.perf_counter()
        res = self.unpack(owner, slug, key, branch, head, force, expected_old_head)
        t3 = time.perf_counter()
        res = dict(res or {})
        res["already_present"] = present
        res["mpack_key"] = key
        res["timings"] = {"presign": t1 - t0, "upload": t2 - t1, "unpack": t3 - t2}
        return res

    # -- fetch and reading (SPEC 4.4, 4.5) -----------------------------------

    def fetch(self, owner: str, slug: str, want: list[str],
              have: list[str] | None = None, **kw: Any) -> dict:
        body = {"want": list(want), "have": list(have or [])}
        return self.call("POST", f"/{owner}/{slug}/fetch", body, **kw)

    def download(self, url: str) -> bytes:
        """GET a presigned URL (absolute, or relative to the server)."""
        if url.startswith("/"):
            url = self.base_url + url
        resp = self.client.get(url)
        if resp.status_code != 200:
            raise HubError("GET", url, resp.status_code, _safe_decode(resp),
                           resp.headers)
        return resp.content

    def commits(self, owner: str, slug: str, branch: str | None = None,
                limit: int | None = None, cursor: str | None = None,
                **kw: Any) -> dict:
        params = {k: v for k, v in (("branch", branch), ("limit", limit),
                                    ("cursor", cursor)) if v is not None}
        return self.call("GET", f"/{owner}/{slug}/commits", params=params, **kw)

    def commit(self, owner: str, slug: str, cid: str, **kw: Any) -> dict:
        return self.call("GET", f"/{owner}/{slug}/commits/{cid}", **kw)

    def tree(self, owner: str, slug: str, ref: str, **kw: Any) -> dict:
        return self.call("GET", f"/{owner}/{slug}/tree/{ref}", **kw)

    def object(self, owner: str, slug: str, oid: str, **kw: Any) -> Any:
        """The raw httpx.Response of GET /objects/{oid} (no status check)."""
        return self.raw("GET", f"/{owner}/{slug}/objects/{oid}", **kw)

    def clone(self, owner: str, slug: str, want: list[str],
              have: list[str] | None = None,
              known_manifests: Mapping[str, Mapping[str, str]] | None = None,
              known_objects: Any = None) -> dict:
        """fetch + download + verify.  Returns {result, data, pack, manifests,
        timings{fetch, download, verify}}; pack/data are None when the
        server had nothing to send."""
        t0 = time.perf_counter()
        res = self.fetch(owner, slug, want, have)
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
# Local client state (muse-fetch --state DIR)
# --------------------------------------------------------------------------

class _ManifestView:
    """Read-only mapping snapshot_id -> manifest backed by a LocalState."""

    def __init__(self, state: "LocalState") -> None:
        self._s = state

    def __contains__(self, sid: object) -> bool:
        return sid in self._s.snapshots

    def __getitem__(self, sid: str) -> dict[str, str]:
        return self._s.manifest(sid)

    def get(self, sid: str, default: Any = None) -> Any:
        return self[sid] if sid in self else default


class LocalState:
    """What a client keeps between fetches, in a directory:

      DIR/state.msgpack   {"commits": {id: commit map},
                           "snapshots": {id: delta-form snapshot},
                           "branch_heads": {branch: id}}
      DIR/objects/<hex>   blob contents, named by the hex of their id

    Snapshots are kept in delta form, as received; manifest(sid) walks the
    chain to a root and applies the deltas (a small LRU keeps recent ones).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.join(path, "objects"), exist_ok=True)
        self.commits: dict[str, dict] = {}
        self.snapshots: dict[str, dict] = {}
        self.branch_heads: dict[str, str] = {}
        self._cache: OrderedDict[str, dict[str, str]] = OrderedDict()
        f = os.path.join(path, "state.msgpack")
        if os.path.exists(f):
            with open(f, "rb") as fh:
                st = msgpack.unpackb(fh.read(), raw=False)
            self.commits = st.get("commits", {})
            self.snapshots = st.get("snapshots", {})
            self.branch_heads = st.get("branch_heads", {})
        self.manifests = _ManifestView(self)

    def manifest(self, sid: str) -> dict[str, str]:
        if sid in self._cache:
            self._cache.move_to_end(sid)
            return dict(self._cache[sid])
        chain, cur = [], sid
        while cur and cur not in self._cache:
            if cur not in self.snapshots:
                raise KeyError(f"snapshot {cur} not in local state")
            chain.append(cur)
            cur = self.snapshots[cur].get("parent_snapshot_id")
        m = dict(self._cache[cur]) if cur else {}
        for s_id in reversed(chain):
            s = self.snapshots[s_id]
            for p in s.get("delta_remove") or []:
                m.pop(p, None)
            m.update(s.get("delta_upsert") or {})
        self._cache[sid] = dict(m)
        while len(self._cache) > 16:
            self._cache.popitem(last=False)
        return m

    def object_path(self, oid: str) -> str:
        return os.path.join(self.path, "objects", oid.split(":", 1)[1])

    def has_object(self, oid: str) -> bool:
        return os.path.exists(self.object_path(oid))

    def read_object(self, oid: str) -> bytes:
        with open(self.object_path(oid), "rb") as fh:
            return fh.read()

    class _Objects:
        def __init__(self, st: "LocalState") -> None:
            self.st = st

        def __contains__(self, oid: object) -> bool:
            return isinstance(oid, str) and valid_id(oid) and self.st.has_object(oid)

    @property
    def objects(self) -> "LocalState._Objects":
        return LocalState._Objects(self)

    def tips(self) -> list[str]:
        """Known commits that no known commit names as a parent."""
        return pack_tips(list(self.commits.values()))

    def add_pack(self, pack: Mapping[str, Any]) -> None:
        """Record a verified pack (call rebuild_and_verify first)."""
        for b in pack.get("blobs") or []:
            p = self.object_path(b["object_id"])
            if not os.path.exists(p):
                _atomic_write(p, b["content"])
        for s in pack.get("snapshots") or []:
            self.snapshots.setdefault(s["snapshot_id"], s)
        for c in pack.get("commits") or []:
            self.commits.setdefault(c["commit_id"], c)

    def save(self) -> None:
        _atomic_write(os.path.join(self.path, "state.msgpack"),
                      msgpack.packb({"commits": self.commits,
                                     "snapshots": self.snapshots,
                                     "branch_heads": self.branch_heads},
                                    use_bin_type=True))


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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

def load_plan(path: str) -> dict:
    with open(path) as fh:
        plan = json.load(fh)
    plan["_dir"] = os.path.dirname(os.path.abspath(path))
    return plan


def plan_resume_point(plan: Mapping[str, Any], branch_heads: Mapping[str, str]) -> set[int]:
    """Indexes of plan entries that a previous run already pushed.

    For each branch the server already has, the entries of that branch
    before the first entry whose head is the server's current head are
    done (a plan is pushed in order); that entry itself is pushed again,
    which is a no-op (the pack is already present, the head unchanged).
    Re-pushing from the start would move the branch back through older
    intermediate heads, which the server rightly refuses (409)."""
    skip: set[int] = set()
    entries = plan["packs"]
    for branch, head in branch_heads.items():
        idx = [i for i, e in enumerate(entries) if e["branch"] == branch]
        first = next((i for i in idx if entries[i]["head"] == head), None)
        if first is not None:
            skip.update(i for i in idx if i < first)
    return skip


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
