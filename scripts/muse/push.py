"""Incremental push: send only what the server's branch heads do not reach.

  outgoing(idx, server_heads) -> Outgoing     what of a pack the server lacks
  write_outgoing(idx, f, out, path, version)  the pack to upload (v2 default)
  Pusher(hub, owner, slug, ...)               the whole flow for one pack
                                              file or a git2muse plan

How the server's knowledge is computed (no server call beyond `refs`):
a commit of the pack is known when it is an ancestor (inside the pack) of
a branch head the server reported; a snapshot is known when a known commit
names it; a blob is known when a known snapshot upserts it (it is in that
snapshot's manifest, which the server holds).  Everything else of the
pack that the new commits need is sent: their snapshots (with every
in-pack delta parent the server does not know) and the blobs those
snapshots upsert.  Blobs no sent snapshot names are dropped.
"""
from __future__ import annotations

import hashlib
import os
import time

from .history import pack_tips
from .ids import commit_parents
from .mpack import DEFAULT_LEVEL, INMEM_FRAME, PackIndex, PackWriter, read_pack

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms)
if TYPE_CHECKING:
    from typing import Any, BinaryIO, Callable

    from .hub import Hub

#: a plan entry lists its pack's commit ids (`commit_ids`) up to this many
PLAN_COMMIT_IDS = 64


class Outgoing:
    """commits/snapshots (maps, pack order) and blob ids to send; `known`
    commit ids; `complete` when nothing of the pack was left out."""

    def __init__(self) -> None:
        self.commits: list[dict] = []
        self.snapshots: list[dict] = []
        self.blobs: list[str] = []
        self.known: set[str] = set()
        self.complete = True


def outgoing(idx: PackIndex, server_heads: Any) -> Outgoing:
    """What of pack `idx` the server, with branch heads `server_heads`
    (ids), lacks (see the module docstring)."""
    out = Outgoing()
    by_id = {c["commit_id"]: c for c in idx.commits}
    stack = [h for h in server_heads if h in by_id]
    known = out.known
    while stack:
        cid = stack.pop()
        if cid in known:
            continue
        known.add(cid)
        stack.extend(p for p in commit_parents(by_id[cid]) if p in by_id and p not in known)
    snaps = {s["snapshot_id"]: s for s in idx.snapshots}
    known_snaps = {by_id[c]["snapshot_id"] for c in known}
    out.commits = [c for c in idx.commits if c["commit_id"] not in known]
    need: set[str] = set()
    for c in out.commits:
        sid = c["snapshot_id"]
        while sid and sid in snaps and sid not in known_snaps and sid not in need:
            need.add(sid)
            sid = snaps[sid].get("parent_snapshot_id")
    out.snapshots = [s for s in idx.snapshots if s["snapshot_id"] in need]
    known_blobs: set[str] = set()
    for sid in known_snaps:
        s = snaps.get(sid)
        if s is not None:
            known_blobs.update((s.get("delta_upsert") or {}).values())
    want: set[str] = set()
    for s in out.snapshots:
        for o in (s.get("delta_upsert") or {}).values():
            if o in idx.blobs and o not in known_blobs:
                want.add(o)
    out.blobs = [o for o in idx.blobs if o in want]
    out.complete = (len(out.commits) == len(idx.commits)
                    and len(out.snapshots) == len(idx.snapshots)
                    and len(out.blobs) == len(idx.blobs))
    return out


def pack_closed(commits: list[dict], snapshots: list[dict], blob_ids: Any) -> bool:
    """True when a pack of these commits, snapshots and blobs goes whole
    to a server that knows none of its commits: outgoing(pack, [])
    leaves nothing out (every snapshot is needed by a commit, every blob
    upserted by a snapshot).  git2muse records it in each plan entry
    (`closed`)."""
    idx = PackIndex()
    idx.commits, idx.snapshots = list(commits), list(snapshots)
    idx.blobs = dict.fromkeys(blob_ids)
    return outgoing(idx, []).complete


def write_outgoing(idx: PackIndex, f: BinaryIO, out: Outgoing, path: str,
                   version: int, branch_heads: dict | None = None,
                   level: int = DEFAULT_LEVEL) -> dict:
    """Write the pack of `out` (taken from pack `idx` in open file `f`) to
    `path` in format `version`.  v2 into v2: a frame whose every blob goes
    is copied as it is (no decompression, no recompression); the others
    are decompressed and their wanted blobs re-framed.  Returns
    PackWriter.close()'s summary."""
    w = PackWriter(path, version, level=level, tmpdir=os.path.dirname(path) or None)
    for c in out.commits:
        w.add_commit(c)
    for s in out.snapshots:
        w.add_snapshot(s)
    if branch_heads:
        w.branch_heads.update(branch_heads)
    want = set(out.blobs)
    by_frame: dict[int, list[str]] = {}
    for oid in out.blobs:
        loc = idx.blobs[oid]
        if loc[0] == "raw":
            w.add_blob_from(oid, f, loc[1], loc[2])
        else:
            by_frame.setdefault(loc[1], []).append(oid)
    for fi in sorted(by_frame):
        codec, size, _o, _l, blobs = idx.frames[fi]
        if version == 2 and len({o for o, _ in blobs}) == len(blobs) == len(by_frame[fi]):
            w.add_frame_copy(f, idx.frames[fi])   # every blob wanted: as it is
        elif size <= INMEM_FRAME and len(blobs) > 1:
            contents = idx.frame_blobs(f, fi)
            for oid in by_frame[fi]:
                w.add_blob(oid, contents[oid])
        else:
            for oid in by_frame[fi]:
                if oid in want:
                    w.add_blob_stream(oid, lambda wr, o=oid: idx.copy_blob(f, o, wr))
    return w.close()


def infer_head(idx: PackIndex, branch: str) -> str | None:
    """Head of a pack: branch_heads[branch], else its single tip commit."""
    if branch in idx.branch_heads:
        return idx.branch_heads[branch]
    tips = pack_tips(idx.commits)
    return tips[0] if len(tips) == 1 else None


class Pusher:
    """Pushes pack files to one repository, incrementally.

    hub, owner, slug    where
    version             format of the packs sent (2, or 1 on request); a
                        pack already in that format that needs no
                        filtering is sent as it is; a pack the server
                        refuses is an error (never re-sent in another
                        format)
    full                send every pack whole (no filtering)
    progress_factory    (label, total) -> callable(bytes) or None
    say                 callable(str) for a person's messages
    """

    def __init__(self, hub: Hub, owner: str, slug: str, version: int = 2,
                 full: bool = False, tmpdir: str | None = None,
                 progress_factory: Callable[[str, int], Any] | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.hub, self.owner, self.slug = hub, owner, slug
        self.version, self.full, self.tmpdir = version, full, tmpdir
        self.progress_factory = progress_factory
        self.say = say or (lambda m: None)
        self.server_heads: dict[str, str] | None = None
        self.refs_answer: dict | None = None
        self.warn: Callable[[str], None] = self.say

    def refresh(self) -> dict[str, str]:
        self.refs_answer = self.hub.refs(self.owner, self.slug)
        self.server_heads = dict(self.refs_answer.get("branch_heads") or {})
        return self.server_heads

    def push_pack(self, path: str, branch: str, head: str | None = None,
                  force: bool = False, expected_old_head: str | None = None,
                  label: str | None = None, entry: dict | None = None) -> dict:
        """Push one pack file; head None: inferred.  `entry`, a git2muse
        plan entry ({mpack_key, size_bytes, format, commits, snapshots,
        blobs}), lets a pack go out unread when the repository has no
        branch at all (nothing to leave out): the server checks the key.
        An entry that also lists its pack's commit ids (`commit_ids`) and
        says the pack is `closed` goes out unread too when no branch head
        of the server is one of those commits: outgoing() would then
        leave nothing out (no commit of the pack is known), so the pack is
        sent as it is, as its file.
        Returns a result dict: the unpack answer (or `up_to_date`), what
        was sent (`sent` {commits, snapshots, blobs, bytes, version}),
        `timings`."""
        return self._push_pack(path, branch, head, force, expected_old_head, label, entry)

    def _push_pack(self, path: str, branch: str, head: str | None,
                   force: bool, expected_old_head: str | None,
                   label: str | None, entry: dict | None = None) -> dict:
        t0 = time.perf_counter()
        if self.server_heads is None:
            self.refresh()
        heads = self.server_heads or {}
        label = label or os.path.basename(path)
        as_is = bool(entry and head and entry.get("format", 1) == self.version
                     and entry.get("mpack_key") and entry.get("size_bytes"))
        ids = entry.get("commit_ids") if as_is and entry else None
        if as_is and (not heads or (ids and entry.get("closed")
                                    and not set(heads.values()).intersection(ids))):
            # an empty repository, or one that knows no commit of a closed
            # pack: the whole pack goes, as it is (the server checks the key)
            info = {"mpack_key": entry["mpack_key"], "size_bytes": entry["size_bytes"],
                    "version": self.version, "commits": entry.get("commits"),
                    "snapshots": entry.get("snapshots"), "blobs": entry.get("blobs")}
            return self._send(path, None, info, branch, head, force, expected_old_head,
                              label, {"file": path, "branch": branch, "head": head},
                              t0, t0, 0)
        with open(path, "rb") as f:
            idx = read_pack(f, verify=False)
            t_read = time.perf_counter()
            head = head or infer_head(idx, branch)
            if not head:
                raise ValueError(f"{path}: cannot infer the head of branch {branch!r} "
                                 f"({len(pack_tips(idx.commits))} tips); pass --head")
            out = outgoing(idx, [] if self.full else heads.values())
            result: dict[str, Any] = {"file": path, "branch": branch, "head": head}
            if not out.commits and heads.get(branch) == head:
                result.update(up_to_date=True, commits_written=0, snapshots_written=0,
                              objects_written=0, uploaded_bytes=0,
                              sent={"commits": 0, "snapshots": 0, "blobs": 0, "bytes": 0},
                              timings={"read": t_read - t0})
                return result
            if out.complete and idx.version == self.version:
                send_path, tmp = path, None
                f.seek(0, 2)
                size = f.tell()
                f.seek(0)
                h = hashlib.sha256()
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
                info = {"mpack_key": "sha256:" + h.hexdigest(), "size_bytes": size,
                        "version": idx.version, "commits": len(idx.commits),
                        "snapshots": len(idx.snapshots), "blobs": len(idx.blobs)}
            else:
                import tempfile
                fd, tmp = tempfile.mkstemp(prefix="muse-push-", suffix=".mpack",
                                           dir=self.tmpdir)
                os.close(fd)
                send_path = tmp
                info = write_outgoing(idx, f, out, tmp, self.version, {branch: head})
        return self._send(send_path, tmp, info, branch, head, force, expected_old_head, label,
                          result, t0, t_read, len(idx.commits) - len(out.commits))

    def _send(self, send_path: str, tmp: str | None, info: dict, branch: str, head: str,
              force: bool, expected_old_head: str | None, label: str, result: dict,
              t0: float, t_read: float, skipped: int) -> dict:
        """Upload and unpack a pack file (removing `tmp` afterwards)."""
        heads = self.server_heads if self.server_heads is not None else {}
        t_pack = time.perf_counter()
        try:
            prog = self.progress_factory(f"{label}: upload", info["size_bytes"]) \
                if self.progress_factory else None
            res = self.hub.push_file(self.owner, self.slug, send_path, info["mpack_key"],
                                     info["size_bytes"], branch, head, force=force,
                                     expected_old_head=expected_old_head, progress=prog)
            if prog is not None:
                prog.finish()
        finally:
            if tmp:
                os.unlink(tmp)
        heads[branch] = res.get("head") or head
        self.server_heads = heads
        result.update(res)
        result["sent"] = {"commits": info["commits"], "snapshots": info["snapshots"],
                          "blobs": info["blobs"], "bytes": info["size_bytes"],
                          "version": info["version"]}
        result["skipped_known"] = {"commits": skipped}
        result["timings"] = dict(res["timings"], read=t_read - t0, pack=t_pack - t_read)
        return result

    def entry_done(self, entry: dict) -> bool:
        """A plan entry the server provably has: its head is where the
        branch points and the repository references its pack."""
        heads = self.server_heads or {}
        if heads.get(entry["branch"]) != entry["head"]:
            return False
        from .hub import HubError
        try:
            pre = self.hub.presign(self.owner, self.slug, entry["mpack_key"],
                                   entry["size_bytes"])
        except HubError:
            return False
        return bool(pre.get("already_present"))
