"""What a client keeps between fetches (muse-fetch --state DIR).

  DIR/state.msgpack   {"commits": {id: commit map},
                       "snapshots": {id: delta-form snapshot},
                       "branch_heads": {branch: id},
                       "packs": {name: {"version", "frames": [[codec, size,
                                 data offset, data length]], "blobs":
                                 {object id: location}}}}
  DIR/packs/<hex>.mpack  fetched packs, kept as they arrived (verified)
  DIR/objects/<hex>      loose blobs (from add_pack of an in-memory pack)

Snapshots are kept in delta form, as received; manifest(sid) walks the
chain to a root and applies the deltas (a small LRU keeps recent ones).
Blobs are read back from the packs by their recorded location (a v2 blob
decompresses its frame).
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict

import msgpack

from .history import pack_tips
from .ids import Manifest, valid_id
from .mpack import PackIndex, inflate

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms)
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping


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
    """A client's store of commits, snapshots and blobs (module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.join(path, "objects"), exist_ok=True)
        os.makedirs(os.path.join(path, "packs"), exist_ok=True)
        self.commits: dict[str, dict] = {}
        self.snapshots: dict[str, dict] = {}
        self.branch_heads: dict[str, str] = {}
        self.packs: dict[str, dict] = {}
        self._where: dict[str, str] = {}
        self._cache: OrderedDict[str, Manifest] = OrderedDict()
        f = os.path.join(path, "state.msgpack")
        if os.path.exists(f):
            with open(f, "rb") as fh:
                st = msgpack.unpackb(fh.read(), raw=False, strict_map_key=False)
            self.commits = st.get("commits", {})
            self.snapshots = st.get("snapshots", {})
            self.branch_heads = st.get("branch_heads", {})
            self.packs = st.get("packs", {})
            for name, p in self.packs.items():
                for oid in p.get("blobs", {}):
                    self._where.setdefault(oid, name)
        self.manifests = _ManifestView(self)

    def manifest(self, sid: str) -> Manifest:
        """The full manifest of a known snapshot (a fresh copy)."""
        if sid in self._cache:
            self._cache.move_to_end(sid)
            return self._cache[sid].copy()
        chain, cur = [], sid
        while cur and cur not in self._cache:
            if cur not in self.snapshots:
                raise KeyError(f"snapshot {cur} not in local state")
            chain.append(cur)
            cur = self.snapshots[cur].get("parent_snapshot_id")
        m = self._cache[cur].copy() if cur else Manifest()
        for s_id in reversed(chain):
            s = self.snapshots[s_id]
            m.apply(s.get("delta_upsert") or {}, s.get("delta_remove") or [])
        self._cache[sid] = m.copy()
        while len(self._cache) > 16:
            self._cache.popitem(last=False)
        return m

    # -- objects ---------------------------------------------------------------

    def object_path(self, oid: str) -> str:
        return os.path.join(self.path, "objects", oid.split(":", 1)[1])

    def pack_path(self, name: str) -> str:
        return os.path.join(self.path, "packs", name + ".mpack")

    def has_object(self, oid: str) -> bool:
        return oid in self._where or os.path.exists(self.object_path(oid))

    def copy_object(self, oid: str, write: Callable[[Any], Any]) -> None:
        """Hand a blob's content to `write` in pieces (from its pack, or
        its loose file), in bounded memory."""
        name = self._where.get(oid)
        if name is None:
            with open(self.object_path(oid), "rb") as fh:
                while True:
                    b = fh.read(1 << 20)
                    if not b:
                        return
                    write(b)
        p = self.packs[name]
        idx = PackIndex()
        idx.version = p["version"]
        idx.frames = [tuple(fr) + ([],) for fr in p.get("frames", [])]
        idx.blobs = {oid: tuple(p["blobs"][oid])}
        with open(self.pack_path(name), "rb") as fh:
            idx.copy_blob(fh, oid, write)

    def read_object(self, oid: str) -> bytes:
        parts: list[bytes] = []
        self.copy_object(oid, lambda b: parts.append(bytes(b)))
        return b"".join(parts)

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
        """Record a verified in-memory pack (call rebuild_and_verify first):
        blobs become loose objects."""
        for b in pack.get("blobs") or []:
            p = self.object_path(b["object_id"])
            if not self.has_object(b["object_id"]):
                _atomic_write(p, b["content"])
        self._add_meta(pack.get("commits") or [], pack.get("snapshots") or [])

    def _add_meta(self, commits: list, snapshots: list) -> None:
        for s in snapshots:
            self.snapshots.setdefault(s["snapshot_id"], s)
        for c in commits:
            self.commits.setdefault(c["commit_id"], c)

    def add_pack_file(self, src: str, mpack_id: str, idx: PackIndex) -> str:
        """Keep a verified pack file (moved into DIR/packs) and record its
        commits, snapshots and blob locations.  Returns its new path."""
        name = mpack_id.split(":", 1)[1]
        dst = self.pack_path(name)
        os.replace(src, dst)
        self.packs[name] = {
            "version": idx.version,
            "frames": [list(fr[:4]) for fr in idx.frames],
            "blobs": {oid: list(loc) for oid, loc in idx.blobs.items()},
        }
        for oid in idx.blobs:
            self._where.setdefault(oid, name)
        self._add_meta(idx.commits, idx.snapshots)
        return dst

    def save(self) -> None:
        _atomic_write(os.path.join(self.path, "state.msgpack"),
                      msgpack.packb({"commits": self.commits,
                                     "snapshots": self.snapshots,
                                     "branch_heads": self.branch_heads,
                                     "packs": self.packs},
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


def inflate_frame(path: str, frame: list) -> bytes:
    """The decompressed bytes of one frame [codec, size, offset, length]
    of the pack at `path`."""
    codec, size, off, length = frame[:4]
    parts: list[bytes] = []
    with open(path, "rb") as fh:
        inflate(fh, off, length, codec, size, lambda mv: parts.append(bytes(mv)))
    return b"".join(parts)
