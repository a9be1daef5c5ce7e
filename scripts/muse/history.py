"""Histories: delta rebuild and verification of commits and snapshots,
ordering helpers, and the synthetic generator (seed 000's shape).

  verify_history(commits, snapshots, ...)   rebuild every snapshot from its
        delta, check every snapshot and commit id, bounded memory (a small
        cache of manifests, rebuilt from the delta chain on a miss)
  rebuild_and_verify(pack, ...)             the same on a parsed pack,
        returning every manifest (compat API of muselib)
  topo_commits, pack_tips, manifest_delta, snapshot_map
  generate(...) -> History                  seed 000's _populate
"""
from __future__ import annotations

import datetime
from collections import OrderedDict

from .ids import (Manifest, blob_id, commit_id, commit_id_of, commit_parents,
                  snapshot_id, valid_id, valid_path)
from .mpack import build_mpack

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms)
if TYPE_CHECKING:
    from typing import Any, Iterable, Mapping


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


def verify_history(commits: Iterable[dict], snapshots: Iterable[dict], *,
                   known_manifests: Any = None, known_objects: Any = None,
                   blob_ids: Any = (), keep: Any = None,
                   cache_size: int = 32, skip_unknown_parents: bool = False) -> dict[str, Manifest]:
    """Rebuild every snapshot from its delta and check every id (SPEC 1, 2).

    known_manifests  container of snapshot_id -> manifest for parents
                     outside these snapshots (`in` and `[]`)
    known_objects    optional container of object ids held elsewhere; when
                     given, every object a snapshot upserts must be in
                     `blob_ids` (this pack's) or in it (completeness)
    keep             snapshot ids whose manifest to return (None: all)
    skip_unknown_parents  snapshots whose delta chain reaches a parent that
                     is neither here nor known are left unchecked (a pack
                     fetched with `have` by a client that keeps no state);
                     otherwise that is an error
    Memory: at most `cache_size` manifests besides the returned ones.
    Raises ValueError naming the first problem."""
    known = known_manifests if known_manifests is not None else {}
    by_id: dict[str, dict] = {}
    for s in snapshots:
        sid = s.get("snapshot_id")
        _need(valid_id(sid), f"snapshot with bad id {sid!r}")
        _need("manifest" not in s, f"snapshot {sid} carries a full manifest")
        pid = s.get("parent_snapshot_id")
        _need(pid is None or valid_id(pid), f"snapshot {sid}: bad parent id {pid!r}")
        up, rm = s.get("delta_upsert") or {}, s.get("delta_remove") or []
        _need(isinstance(up, dict) and isinstance(rm, list), f"snapshot {sid}: malformed delta")
        by_id[sid] = s
    children: dict[str, int] = {}
    for s in by_id.values():
        pid = s.get("parent_snapshot_id")
        if pid in by_id:
            children[pid] = children.get(pid, 0) + 1

    done: set[str] = set()
    good_paths: set[str] = set()     # checked once each (they repeat a lot)
    good_ids: set[str] = set()
    out: dict[str, Manifest] = {}
    cache: OrderedDict[str, Manifest] = OrderedDict()

    def base_of(pid: str, child: str) -> Manifest:
        """The parent's manifest as a Manifest the caller may mutate."""
        m = cache.pop(pid, None)
        if m is not None:
            children[pid] -= 1
            if children[pid] > 0:
                cache[pid] = m
                return m.copy()
            return m
        if pid in out:
            children[pid] = children.get(pid, 1) - 1
            return out[pid].copy()
        if pid in by_id and pid in done:
            # evicted: rebuild from the chain
            children[pid] -= 1
            return chain_manifest(pid)
        if pid in known:
            return Manifest(known[pid])
        raise ValueError(f"snapshot {child}: parent {pid} is neither in the "
                         f"pack nor known")

    def chain_manifest(sid: str) -> Manifest:
        chain, cur = [], sid
        while cur and cur in by_id and cur not in cache and cur not in out:
            chain.append(cur)
            cur = by_id[cur].get("parent_snapshot_id")
        if not cur:
            m = Manifest()
        elif cur in cache:
            m = cache[cur].copy()
        elif cur in out:
            m = out[cur].copy()
        else:
            m = Manifest(known[cur])
        for s_id in reversed(chain):
            s = by_id[s_id]
            m.apply(s.get("delta_upsert") or {}, s.get("delta_remove") or [])
        return m

    def build_one(s_id: str) -> None:
        s = by_id[s_id]
        pid = s.get("parent_snapshot_id")
        upsert = s.get("delta_upsert") or {}
        remove = s.get("delta_remove") or []
        m = base_of(pid, s_id) if pid else Manifest()
        for p in remove:
            if p not in good_paths:
                _need(valid_path(p), f"snapshot {s_id}: bad removed path {p!r}")
                good_paths.add(p)
            m.remove(p)
        for p, o in upsert.items():
            if p not in good_paths:
                _need(valid_path(p), f"snapshot {s_id}: bad path {p!r}")
                good_paths.add(p)
            if o not in good_ids:
                _need(valid_id(o), f"snapshot {s_id}: bad object id {o!r} at {p!r}")
                good_ids.add(o)
            if known_objects is not None:
                _need(o in blob_ids or o in known_objects,
                      f"snapshot {s_id}: object {o} ({p}) is neither in "
                      f"the pack nor held locally")
            m.set(p, o)
        got = m.id()
        _need(got == s_id, f"snapshot {s_id}: rebuilt manifest "
                           f"({len(m)} entries) hashes to {got}")
        done.add(s_id)
        if keep is None or s_id in keep:
            out[s_id] = m
        if children.get(s_id, 0) > 0 and s_id not in out:
            cache[s_id] = m
            while len(cache) > cache_size:
                cache.popitem(last=False)

    skipped: set[str] = set()
    for sid in by_id:
        if sid in done or sid in skipped:
            continue
        # parents first: the chain of not-yet-built in-pack ancestors
        chain, cur, seen = [], sid, set()
        while cur in by_id and cur not in done:
            _need(cur not in seen, f"snapshot parent cycle through {cur}")
            seen.add(cur)
            chain.append(cur)
            cur = by_id[cur].get("parent_snapshot_id")
            if not cur:
                break
        if skip_unknown_parents and cur and cur not in by_id and cur not in known \
                or cur in skipped:
            skipped.update(chain)
            continue
        for s_id in reversed(chain):
            build_one(s_id)

    for c in commits:
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
        _need(sid in done or sid in known or sid in skipped or
              (skip_unknown_parents and sid not in by_id),
              f"commit {cid}: snapshot {sid} is neither in the pack nor known")
    return out


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
    blob_ids: set[str] = set()
    for b in pack.get("blobs") or []:
        oid = b.get("object_id")
        _need(valid_id(oid), f"blob with bad id {oid!r}")
        if check_blobs:
            got = blob_id(b["content"])
            _need(got == oid, f"blob {oid} content hashes to {got}")
        blob_ids.add(oid)
    return verify_history(pack.get("commits") or [], pack.get("snapshots") or [],
                          known_manifests=known_manifests, known_objects=known_objects,
                          blob_ids=blob_ids)


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

