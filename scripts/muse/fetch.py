"""Fetch (SPEC 4.4): ask, download to a file while hashing, verify in one
streaming pass, keep, check out.

  fetch_pack(hub, owner, slug, want, have, ...) -> Fetched
  checkout_files(manifest, dest, sources...)     write a tree, each v2 frame
                                                 decompressed once
Memory: the pack is never held whole; commits, snapshots (delta form) and
a bounded number of manifests are.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time

from .history import verify_history
from .hub import Hub, HubError
from .ids import Manifest, valid_path
from .mpack import INMEM_FRAME, PackIndex, check_blobs, read_pack
from .state import LocalState

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms)
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping

FORMATS = [1, 2]


class Fetched:
    """answer (the fetch answer), path (the pack file, None when nothing
    was sent), idx (PackIndex), manifests {sid: Manifest} (those asked
    for), bytes (downloaded), timings {fetch, download, verify} (s)."""

    def __init__(self) -> None:
        self.answer: dict = {}
        self.path: str | None = None
        self.idx: PackIndex | None = None
        self.manifests: dict[str, Manifest] = {}
        self.bytes = 0
        self.timings: dict[str, float] = {}


def fetch_pack(hub: Hub, owner: str, slug: str, want: list[str], have: list[str], *,
               formats: list[int] | None = None, state: LocalState | None = None,
               keep_commit: str | None = None, workdir: str | None = None,
               progress_factory: Callable[[str, int | None], Any] | None = None,
               depth: int | None = None) -> Fetched:
    """POST fetch, GET the pack into a file under `workdir` (or the state's
    directory), check its hash, then read and verify it in one pass:
    every blob against its id, every snapshot rebuilt and its id checked,
    every commit id, completeness (every object a received snapshot adds is
    in the pack or in the state; without a state, only when `have` is
    empty; and without a state and with `have`, snapshots that are deltas
    against the client's own are left unchecked: nothing here holds their
    parents).  The manifest of `keep_commit`'s snapshot, when the pack holds
    it, is kept in .manifests.  depth (SPEC 4.4, shallow fetch): only the
    wanted commits and depth-1 generations of their ancestors; the oldest
    ones' snapshots come as roots, so the pack verifies on its own, and the
    answer's `shallow` lists the commits whose parents were left out.
    Raises HubError, PackError/ValueError."""
    out = Fetched()
    t0 = time.perf_counter()
    for attempt in range(4):
        try:
            ans = hub.fetch(owner, slug, want, have, formats=formats or FORMATS, depth=depth)
            break
        except HubError as e:
            # 503 + Retry-After: the server's pack memory is spent or an
            # index row is not written yet (SPEC 4.4); wait as asked, a few times
            wait = e.headers.get("retry-after") or e.headers.get("Retry-After")
            if e.status != 503 or attempt == 3 or not str(wait or "").isdigit():
                raise
            time.sleep(min(int(wait), 30))
    out.answer = ans
    t1 = time.perf_counter()
    out.timings["fetch"] = t1 - t0
    if not ans.get("mpack_url"):
        return out
    d = workdir or (state.path if state is not None else None)
    fd, path = tempfile.mkstemp(prefix=".fetch-", suffix=".mpack", dir=d)
    ok = False
    try:
        prog = progress_factory("download", None) if progress_factory else None
        with os.fdopen(fd, "wb") as fh:
            n, got = hub.download_to(ans["mpack_url"], fh, progress=prog)
        if prog is not None:
            prog.finish()
        out.bytes = n
        if got != ans.get("mpack_id"):
            raise ValueError(f"downloaded pack hashes to {got}, server said "
                             f"{ans.get('mpack_id')}")
        t2 = time.perf_counter()
        out.timings["download"] = t2 - t1
        with open(path, "rb") as f:
            idx = read_pack(f, verify=False)
        # blobs are hashed (v2: decompressed) in a thread while this one
        # rebuilds the snapshots: both halves of the check run at once
        errors: list[BaseException] = []

        def blobs_check() -> None:
            try:
                with open(path, "rb") as bf:
                    check_blobs(bf, idx)
            except BaseException as e:  # handed to the main thread
                errors.append(e)
        th = threading.Thread(target=blobs_check, name="blob-check")
        th.start()
        known = state.manifests if state is not None else None
        if state is not None:
            objs: Any = state.objects
        else:
            objs = set() if not have else None
        keep = {c["snapshot_id"] for c in idx.commits if c.get("commit_id") == keep_commit}
        try:
            out.manifests = verify_history(idx.commits, idx.snapshots, known_manifests=known,
                                           known_objects=objs, blob_ids=idx.blobs, keep=keep,
                                           skip_unknown_parents=state is None and bool(have))
        finally:
            th.join()
        if errors:
            raise errors[0]
        out.timings["verify"] = time.perf_counter() - t2
        out.idx, out.path = idx, path
        ok = True
        return out
    finally:
        if not ok and os.path.exists(path):
            os.unlink(path)


def dir_is_empty(path: str) -> bool:
    """True when `path` does not exist or is an empty directory."""
    if not os.path.exists(path):
        return True
    return os.path.isdir(path) and not os.listdir(path)


def checkout_files(manifest: Mapping[str, str], dest: str, *,
                   pack_path: str | None = None, idx: PackIndex | None = None,
                   state: LocalState | None = None,
                   progress: Callable[[int], None] | None = None) -> int:
    """Write every file of `manifest` under `dest`, taking blobs from the
    pack (`pack_path`/`idx`) or else the state.  A v2 frame of several
    blobs up to 8 MiB is decompressed once, in memory; any other streams
    into each of its files.  Returns the file count."""
    for p in manifest:
        if not valid_path(p):
            raise ValueError(f"refusing to write bad path {p!r}")
    os.makedirs(dest, exist_ok=True)
    by_frame: dict[int, list[tuple[str, str]]] = {}
    rest: list[tuple[str, str]] = []
    raw: list[tuple[str, str]] = []
    for p, oid in manifest.items():
        loc = idx.blobs.get(oid) if idx is not None else None
        if loc is None:
            rest.append((p, oid))
        elif loc[0] == "raw":
            raw.append((p, oid))
        else:
            by_frame.setdefault(loc[1], []).append((p, oid))
    made: set[str] = set()
    n = 0

    def write(p: str, fill: Callable[[Callable[[Any], Any]], None]) -> None:
        nonlocal n
        full = os.path.join(dest, *p.split("/"))
        d = os.path.dirname(full)
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        with open(full, "wb") as fh:
            fill(fh.write)
        n += 1
        if progress:
            progress(n)

    if raw or by_frame:
        assert idx is not None and pack_path is not None
        with open(pack_path, "rb") as f:
            for p, oid in sorted(raw, key=lambda e: idx.blobs[e[1]][1]):
                write(p, lambda wr, o=oid: idx.copy_blob(f, o, wr))
            for fi in sorted(by_frame):
                size, blobs = idx.frames[fi][1], idx.frames[fi][4]
                if size <= INMEM_FRAME and len(blobs) > 1:
                    contents = idx.frame_blobs(f, fi)
                    for p, oid in by_frame[fi]:
                        write(p, lambda wr, o=oid: wr(contents[o]))
                else:
                    for p, oid in by_frame[fi]:
                        write(p, lambda wr, o=oid: idx.copy_blob(f, o, wr))
    for p, oid in rest:
        if state is None or not state.has_object(oid):
            raise ValueError(f"object {oid} ({p}) is neither in the pack nor held locally")
        write(p, lambda wr, o=oid: state.copy_object(o, wr))
    return n
