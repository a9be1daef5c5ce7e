"""memory_bench — the `memory` workload of scripts/bench.py (opt-in: --only
memory, or --large): the server's peak RSS (VmHWM from /proc/<pid>/status)
while it takes and serves 2 GiB packs, with the default pack-memory budget
(MUSEHUB_PACK_MEMORY, 256 MiB), on the fs store and on the S3 emulator.

Data (generated with the clients' PackWriter, streamed to files: blob
contents are written to a source file as they are made and the writer
copies them from it, never holding the history): 8 commits, each adding 8
files of 32 MiB (hex text of random bytes: zstd halves it) = 2 GiB of raw
blobs; once as a v1 pack (raw blobs) and, with other contents, as a v2
pack (zstd frames).  Per store, each case on a fresh server process:
  push v1   muse-push --format 1 of the 2 GiB v1 pack to a new repository
  clone v1  fetch with formats [1] of that repository (the server builds a
            2 GiB v1 pack from the pushed one), the pack downloaded and its
            hash checked
  push v2   muse-push of the v2 pack
  clone v2  fetch with formats [1, 2] of the v2 repository (frames copied)
  clone v2 as v1  formats [1] of the v2 repository (every frame decompressed)
  8 clones  8 clients at once fetching the first 4 commits (1 GiB) of the
            v1 repository with formats [1, 2], none cached: a 503 +
            Retry-After is waited out as the clients do
Target: VmHWM <= MUSEHUB_PACK_MEMORY + 64 MiB in every case.  Also the
unpack and pack-build rates (pack bytes / the server's step as the client
timed it).  Needs about 14 GiB free on the work directory's file system
(checked first, skipped otherwise); everything is deleted afterwards.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from clients_bench import json_lines, tool
from museclient import OWNER
from procs import REAPER, BenchError, Musehubd

MIB = 1 << 20
BUDGET = 256 * MIB            # musehubd's default MUSEHUB_PACK_MEMORY
OVERHEAD = 64 * MIB           # the fixed allowance
NEED_FREE = 14 << 30


class _Sink:
    """A write-only file that keeps nothing."""

    def write(self, b: Any) -> int:
        return len(b)


def make_pack(work: Path, version: int, seed: str, commits: int = 8, files: int = 8,
              size: int = 32 * MIB) -> dict:
    """Writes the history's blobs to a source file, then the pack from it
    (PackWriter.add_blob_from); returns {path, bytes, raw, heads (commit ids
    oldest first)}.  The source file is removed."""
    import muse
    src = work / f"src-v{version}.bin"
    blobs = []                               # (path, oid, offset)
    with open(src, "wb") as fh:
        off = 0
        for c in range(commits):
            for f in range(files):
                data = (seed.encode() + os.urandom(size // 2).hex().encode())[:size]
                oid = "sha256:" + hashlib.sha256(data).hexdigest()
                fh.write(data)
                blobs.append((f"big/c{c:02d}/file{f:02d}.bin", oid, off))
                off += size
    out = work / f"big-v{version}.mpack"
    w = muse.PackWriter(str(out), version, tmpdir=str(work))
    heads, parent, psid, manifest = [], None, None, {}
    ts = "2026-01-01T00:00:00+00:00"
    for c in range(commits):
        add = {p: oid for p, oid, _ in blobs[c * files:(c + 1) * files]}
        manifest.update(add)
        sid = muse.snapshot_id(manifest)
        msg = f"{seed} commit {c}"
        cid = muse.commit_id([parent] if parent else [], sid, msg, ts, "bench")
        w.add_commit({"commit_id": cid, "parent_commit_id": parent, "parent2_commit_id": None,
                      "snapshot_id": sid, "message": msg, "author": "bench",
                      "committed_at": ts, "branch": "main", "metadata": {}})
        w.add_snapshot({"snapshot_id": sid, "parent_snapshot_id": psid,
                        "delta_upsert": add, "delta_remove": []})
        heads.append(cid)
        parent, psid = cid, sid
    with open(src, "rb") as sf:
        for p, oid, o in blobs:
            w.add_blob_from(oid, sf, o, size, path=p)
        w.close()
    src.unlink()
    return {"path": out, "bytes": out.stat().st_size, "raw": commits * files * size,
            "heads": heads}


def fetch_download(url: str, slug: str, want: str, formats: list[int],
                   depth: int | None = None) -> dict:
    """POST fetch (503 + Retry-After waited out, up to 20 times), GET the
    pack into nothing while hashing; {bytes, fetch_s, download_s, wall_s,
    retries}.  Raises BenchError when the hash is not mpack_id."""
    from muse.hub import Hub, HubError
    hub = Hub(url, timeout=1800)
    t0 = time.perf_counter()
    retries = 0
    while True:
        t1 = time.perf_counter()
        try:
            ans = hub.fetch(OWNER, slug, [want], [], formats=formats, depth=depth)
            break
        except HubError as e:
            wait = e.headers.get("retry-after") or e.headers.get("Retry-After")
            if e.status != 503 or retries >= 20:
                raise
            retries += 1
            time.sleep(min(int(wait or 1), 30))
    t2 = time.perf_counter()
    n, got = hub.download_to(ans["mpack_url"], _Sink())
    t3 = time.perf_counter()
    hub.close()
    if got != ans["mpack_id"]:
        raise BenchError(f"fetched pack hashes to {got}, not {ans['mpack_id']}")
    return {"bytes": n, "fetch_s": t2 - t1, "download_s": t3 - t2, "wall_s": t3 - t0,
            "retries": retries, "version": ans.get("mpack_version")}


def w_memory(b: Any, Section: Any, Stat: Any, ratios: Any) -> Any:
    sec = Section(f"server peak RSS (VmHWM, a fresh process per case): "
                  f"{'256 MiB (--quick)' if b.quick else '2 GiB'} packs, "
                  f"MUSEHUB_PACK_MEMORY = 256 MiB (default)")
    work = b.work / "memory"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    st = os.statvfs(work)
    free = st.f_bavail * st.f_frsize
    if free < NEED_FREE:
        sec.add("skipped", note=f"{free / (1 << 30):.1f} GiB free on {work}, need "
                                f"{NEED_FREE >> 30} GiB")
        return sec
    limit_kib = (BUDGET + OVERHEAD) // 1024
    res: dict[str, Any] = {"budget": BUDGET, "limit_kib": limit_kib}
    try:
        t = time.perf_counter()
        size = 4 * MIB if b.quick else 32 * MIB     # --quick: 256 MiB packs (a smoke run)
        packs = {v: make_pack(work, v, f"mem{v}-{b.token}", size=size) for v in (1, 2)}
        b.log(f"memory: v1 and v2 packs written in {time.perf_counter() - t:.0f} s "
              f"({packs[1]['bytes'] / 1e9:.2f} GB, {packs[2]['bytes'] / 1e9:.2f} GB)")
        sec.add("packs", note=f"v1 {packs[1]['bytes'] / MIB:.0f} MiB; v2 {packs[2]['bytes'] / MIB:.0f} "
                              f"MiB of {packs[2]['raw'] / MIB:.0f} MiB raw blobs; 8 commits x 8 "
                              f"files x {size // MIB} MiB")
        for store in ("fs", "s3"):
            try:
                one_store(b, sec, Stat, work, store, packs, res, limit_kib)
            except BenchError as e:
                sec.add(f"{store}: FAILED", note=str(e)[:300])
                b.failed = True
        b.results["memory"] = res
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sec


def one_store(b: Any, sec: Any, Stat: Any, work: Path, store: str, packs: dict,
              res: dict, limit_kib: int) -> None:
    env = {k: v for k, v in b.env_base.items() if not k.startswith(("MUSEHUB_STORE", "MUSEHUB_S3_"))}
    env.update({"MUSEHUB_MAX_MPACK_BYTES": str(3 << 30),
                "MUSEHUB_REQUEST_TIMEOUT_MS": "600000",
                "MUSEHUB_QUERY_TIMEOUT_MS": "600000"})
    env.pop("MUSEHUB_PACK_MEMORY", None)
    # A database of its own per store: packs are content-addressed, and a
    # server would take the other store's rows for packs it holds.
    import pgtmp
    env["MUSEHUB_DATABASE_URL"] = pgtmp.createdb(b.db_base, f"mem_{store}_{os.getpid()}_{b.token}")
    sdir = work / f"store-{store}"
    emu = None
    if store == "s3":
        import s3emu
        why = s3emu.available()
        if why:
            sec.add("s3: skipped", note=why)
            return
        try:
            endpoint, emu = s3emu.start(str(sdir), "musehub-mem")
        except RuntimeError as e:
            raise BenchError(str(e))
        REAPER.on_stop("s3emu-mem", lambda: s3emu.stop(emu))
        env.update({"MUSEHUB_STORE": "s3:musehub-mem", "MUSEHUB_S3_ENDPOINT": endpoint,
                    "MUSEHUB_S3_ACCESS_KEY": s3emu.ACCESS_KEY,
                    "MUSEHUB_S3_SECRET_KEY": s3emu.SECRET_KEY, "MUSEHUB_S3_PATH_STYLE": "1"})
    else:
        sdir.mkdir()
        env["MUSEHUB_STORE"] = f"fs:{sdir}"
    out: dict[str, Any] = {}
    res[store] = out
    srv: Musehubd | None = None
    slug = {1: f"mem1-{b.token}", 2: f"mem2-{b.token}"}

    def fresh() -> Musehubd:
        nonlocal srv
        if srv is not None:
            srv.stop()
        srv = Musehubd(b.binary, b.work, env, name=f"musehubd-mem-{store}").start()
        return srv

    def hwm(s: Musehubd) -> int:
        return s.memory()["hwm_kib"]

    def row(label: str, kib: int, note: str) -> None:
        sec.add(f"{store} {label}", Stat([kib], "kib"), target="<= 320 MiB",
                ok=kib <= limit_kib, note=note)

    try:
        for v in (1, 2):
            s = fresh()
            base_kib = hwm(s)
            p = packs[v]
            t = time.perf_counter()
            _w, ckib, r = tool(work, "muse-push", "--url", s.url, "--owner", OWNER, "--repo",
                               slug[v], "--create", "--json", "-q", "--full", "--format", str(v),
                               str(p["path"]), timeout=3600)
            wall = time.perf_counter() - t
            (x,) = [y for y in json_lines(r) if y.get("timings")]
            tm = x["timings"]
            kib = hwm(s)
            out[f"push_v{v}"] = {"hwm_kib": kib, "start_kib": base_kib, "wall_s": wall,
                                 "timings": tm, "client_kib": ckib, "bytes": p["bytes"]}
            row(f"push v{v} ({p['bytes'] / MIB:.0f} MiB)", kib,
                f"at start {base_kib / 1024:.0f} MiB; unpack {tm['unpack']:.1f} s = "
                f"{p['bytes'] / MIB / tm['unpack']:.0f} MiB/s of pack"
                + (f" ({p['raw'] / MIB / tm['unpack']:.0f} MiB/s raw)" if v == 2 else "")
                + f"; upload {p['bytes'] / MIB / max(tm['upload'], 1e-9):.0f} MiB/s; "
                  f"whole {wall:.1f} s; muse-push RSS {ckib / 1024:.0f} MiB")
        for v, formats, label in ((1, [1], "clone v1, formats [1]"),
                                  (2, [1, 2], "clone v2, formats [1, 2]"),
                                  (2, [1], "clone v2 as v1, formats [1]")):
            s = fresh()
            f = fetch_download(s.url, slug[v], packs[v]["heads"][-1], formats)
            kib = hwm(s)
            out[label] = {**f, "hwm_kib": kib}
            row(label, kib, f"pack built in {f['fetch_s']:.1f} s = "
                f"{f['bytes'] / MIB / f['fetch_s']:.0f} MiB/s ({f['bytes'] / MIB:.0f} MiB, "
                f"v{f['version']}); download {f['bytes'] / MIB / max(f['download_s'], 1e-9):.0f} MiB/s")
        # 8 concurrent first clones of a 1 GiB history: the same request
        # (the server may build it once for all), then 8 different ones
        # (depth 1-4 x formats [1] / [1, 2]: the same 1 GiB of blobs, since
        # every commit adds files, but 8 packs to build at once)
        want = packs[1]["heads"][3]
        for kind, reqs in (("same", [(None, [1, 2])] * 8),
                           ("distinct", [(d, f) for d in (1, 2, 3, 4) for f in ([1], [1, 2])])):
            s = fresh()
            got: list[dict] = []
            errs: list[BaseException] = []

            def one(depth: int | None, formats: list[int]) -> None:
                try:
                    got.append(fetch_download(s.url, slug[1], want, formats, depth))
                except BaseException as e:    # reported below
                    errs.append(e)
            th = [threading.Thread(target=one, args=r) for r in reqs]
            t = time.perf_counter()
            for x in th:
                x.start()
            for x in th:
                x.join()
            wall = time.perf_counter() - t
            kib = hwm(s)
            out[f"8 clones {kind}"] = {"clients": got, "hwm_kib": kib, "wall_s": wall,
                                       "errors": [str(e)[:300] for e in errs]}
            retries = sum(g["retries"] for g in got)
            sizes = sorted({round(g["bytes"] / MIB) for g in got})
            if errs:      # the figure stands; the failures are said (and fail the run)
                b.failed = True
            row(f"8 first clones at once, {kind}", kib,
                f"{packs[1]['raw'] // 2 // MIB} MiB history; {len(got)} of 8 done in {wall:.1f} s"
                + (f" (each {min(g['wall_s'] for g in got):.1f}-{max(g['wall_s'] for g in got):.1f} s)"
                   if got else "")
                + (f"; {len(errs)} FAILED: {str(errs[0])[:160]}" if errs else "")
                + f"; {retries} 503 + Retry-After waited out; packs {'/'.join(map(str, sizes))} MiB"
                + ("; identical misses in flight are coalesced (fetch.c): one build" if kind == "same" else
                   "; depth 1-4 x formats [1] / [1, 2]"))
    finally:
        if srv is not None:
            srv.stop()
        if emu is not None:
            import s3emu
            s3emu.stop(emu)
        shutil.rmtree(sdir, ignore_errors=True)
