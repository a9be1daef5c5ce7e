"""real_bench — the `real` workload of scripts/bench.py: libuv's v1.x branch
(the git bundle of $BENCH_LIBUV_BUNDLE, by default
../shared/data/libuv-v1.x.bundle beside the repository; skipped when it is
absent) through the command-line clients as a person runs them, next to
git over smart HTTP in the same run, on the run's store (--store).

Per run, in this order:
  convert   git2muse of the branch, v2 packs (the default) and v1 (--format 1)
  push      muse-push --plan of the v1 plan and of the v2 plan, each to a new
            repository, and `git push` of the branch to a new bare
            repository, alternated (reps pairs)
  GC        mpack.gc on the v1-pushed repository (its packs -> one v2 pack
            at MUSEHUB_GC_ZSTD_LEVEL) and on the v2-pushed one (one pack:
            skipped by design); the bytes the store keeps afterwards
  clone     muse-fetch --state (no checkout) with formats [1] (--format 1)
            and [1, 2] (default) of the GC'd repository, vs `git clone --bare`;
            the first fetch of each format builds the pack, later ones are
            the server's cache
  depth 1   muse-fetch --depth 1 --checkout vs `git clone --depth 1` (with its
            checkout); the two work trees are compared file by file
  one new commit  git commit, git2muse (incremental), muse-push --plan vs
            git push
Figures: client wall (the whole process), server wall (the server's part as
the client timed it: presign + unpack for a push, the fetch request for a
clone), server CPU (musehubd's threads; PostgreSQL's apart), pack bytes, the
bytes stored, client peak RSS, and the ratios to git's.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import procs
from clients_bench import json_lines, libuv_clone, one_git_commit, tool
from museclient import OWNER
from procs import BenchError


def _git_pack_bytes(bare: Path) -> int:
    return sum(p.stat().st_size for p in (bare / "objects" / "pack").glob("*.pack"))


def _run_gc(hub: Any, repo_id: str, timeout: float = 600) -> tuple[dict, float]:
    """POST an mpack.gc job and wait for it; (result, wall seconds)."""
    t0 = time.perf_counter()
    j = hub.call("POST", f"/api/repos/{repo_id}/jobs", {"job_type": "mpack.gc"}, expect=(202,))
    while True:
        g = hub.call("GET", f"/api/jobs/{j['job_id']}")
        if g["status"] in ("done", "failed"):
            break
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"mpack.gc still {g['status']} after {timeout:.0f} s")
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if g["status"] != "done":
        raise BenchError(f"mpack.gc failed: {g.get('error')}")
    return g.get("result") or {}, wall


def pack_size(b: Any, key: str) -> int:
    """size_bytes of a pack the server keeps (mpacks row), 0 when unknown."""
    import pgtmp
    if not key or "'" in key:
        return 0
    out = pgtmp.psql(b.env_base["MUSEHUB_DATABASE_URL"],
                     sql=f"SELECT size_bytes FROM mpacks WHERE mpack_id = '{key}'").strip()
    return int(out) if out else 0


class SampledCpu:
    """CPU seconds of the git peer's server side (nginx, fcgiwrap and the
    git-http-backend / git processes under them) between start() and
    stop(): fcgiwrap does not leave its children's times in its own
    (cutime), so each process of the groups is sampled every 20 ms and its
    last utime + stime counted (up to 20 ms of a process's life may be
    missed)."""

    def __init__(self, git: Any) -> None:
        import threading
        self.groups = [x.pid for x in (git.nginx, git.fcgiwrap) if x is not None]
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.done = threading.Event()
        self.th = threading.Thread(target=self._loop, daemon=True)
        self._sample(initial=True)
        self.th.start()

    def _sample(self, initial: bool = False) -> None:
        for g in self.groups:
            for p in procs.group_pids(g):
                f = procs._stat_fields(p)
                if f is None:
                    continue
                t = int(f[11]) + int(f[12])
                if initial:
                    self.first[p] = t
                self.last[p] = t

    def _loop(self) -> None:
        while not self.done.wait(0.02):
            self._sample()

    def stop(self) -> float:
        self.done.set()
        self.th.join()
        self._sample()
        ticks = sum(t - self.first.get(p, 0) for p, t in self.last.items())
        return max(0, ticks) / procs.CLK_TCK


def store_read(url: str) -> tuple[int, int]:
    """(bytes read from the store, readers opened) so far: the server's
    /metrics counters (musehub_store_bytes_read_total, and the get, open_read,
    reader and get_ranges operations)."""
    import re
    import urllib.request
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        t = r.read().decode()
    m = re.search(r"^musehub_store_bytes_read_total\{[^}]*\} (\d+)", t, re.M)
    ops = sum(int(x) for x in re.findall(
        r'^musehub_store_operations_total\{[^}]*op="(?:get|reader|get_ranges|open_read)"[^}]*\} (\d+)', t, re.M))
    return (int(m.group(1)) if m else 0), ops


def compare_trees(ours: Path, git_wc: Path) -> tuple[int, list[str]]:
    """Files of git's work tree (symlinks as their target, as git2muse stores
    them) against muse's checkout: (files compared, differences)."""
    diffs: list[str] = []
    n = 0
    for dirpath, dirnames, filenames in os.walk(git_wc):
        if ".git" in dirnames:
            dirnames.remove(".git")
        for fn in filenames:
            p = Path(dirpath) / fn
            rel = p.relative_to(git_wc)
            want = os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
            q = ours / rel
            n += 1
            if not q.exists():
                diffs.append(f"{rel}: missing")
            elif q.read_bytes() != want:
                diffs.append(f"{rel}: differs")
    for dirpath, _d, filenames in os.walk(ours):
        for fn in filenames:
            rel = (Path(dirpath) / fn).relative_to(ours)
            if not (git_wc / rel).exists() and not (git_wc / rel).is_symlink():
                diffs.append(f"{rel}: extra")
    return n, diffs


def w_real(b: Any, Section: Any, Stat: Any, ratios: Any) -> Any:
    store = b.a.store
    sec = Section(f"real history: libuv v1.x, store {store}")
    got = libuv_clone(b, sec, "real")
    if got is None:
        return sec
    work, src, n_commits = got
    env = b.git_env
    from muse.hub import Hub
    res: dict[str, Any] = {"commits": n_commits, "store": store}
    reps = 1 if b.quick else 2

    # -- convert -------------------------------------------------------------
    plans, pbytes, npacks = {}, {}, {}
    for fmt in (2, 1):
        out = work / f"g2m-v{fmt}"
        wall, kib, r = tool(work, "git2muse", "--repo", str(src), "--out-dir", str(out),
                            "--format", str(fmt), "-q", "--json")
        info = json.loads(r.stdout.decode().splitlines()[-1])
        plans[fmt] = out / "push.json"
        pbytes[fmt], npacks[fmt] = info["bytes"], info["packs"]
        sec.add(f"git2muse, whole history, v{fmt} packs", Stat([wall]),
                note=f"{info['bytes'] / 1e6:.1f} MB in {info['packs']} pack(s); "
                     f"peak RSS {kib / 1024:.0f} MiB")
        res[f"git2muse_v{fmt}"] = {"s": wall, "bytes": info["bytes"], "packs": info["packs"],
                                   "rss_kib": kib}

    git = b.git_http()
    srv = b.fresh_server()
    base = ["--url", srv.url, "--owner", OWNER]
    hub = Hub(srv.url)

    # -- full push: v1, v2, git ------------------------------------------------
    P: dict[str, dict[str, list[float]]] = {
        k: {"wall": [], "server": [], "cpu": [], "pg": [], "rss": [], "up_b": [], "up_s": []}
        for k in ("v1", "v2", "git")}
    gsize = 0
    for k in range(reps):
        def muse_push(fmt: int) -> None:
            slug = f"uv{fmt}-{k}"
            m_srv, m_pg = b.meters(srv)
            wall, kib, r = tool(work, "muse-push", *base, "--repo", slug, "--create", "--json",
                                "-q", "--format", str(fmt), "--plan", str(plans[fmt]))
            d = P[f"v{fmt}"]
            d["cpu"].append(m_srv.stop())
            d["pg"].append(m_pg.stop())
            d["wall"].append(wall)
            d["rss"].append(kib)
            lines = json_lines(r)
            d["server"].append(sum(x["timings"].get("presign", 0) + x["timings"].get("unpack", 0)
                                   for x in lines if x.get("timings")))
            d["up_b"].append(sum(x.get("uploaded_bytes") or 0 for x in lines))
            d["up_s"].append(sum(x["timings"].get("upload", 0) for x in lines if x.get("timings")))

        def git_push() -> None:
            nonlocal gsize
            slug = f"uvg-{k}"
            bare = git.new_bare(slug, env)
            gm = SampledCpu(git)
            t = b.git_cmd("push", "-q", git.repo_url(slug), "v1.x:refs/heads/v1.x", cwd=str(src))
            P["git"]["cpu"].append(gm.stop())
            P["git"]["wall"].append(t)
            gsize = _git_pack_bytes(bare)
        order = [lambda: muse_push(1), lambda: muse_push(2), git_push]
        for f in (order if k % 2 == 0 else order[::-1]):
            f()
    res["git_pack_bytes"] = gsize
    for v in ("v1", "v2"):
        d = P[v]
        rat = ratios(d["wall"], P["git"]["wall"])
        fmt = int(v[1])
        sec.add(f"full push, {v} packs (muse-push --plan)", Stat(d["wall"]), "git push",
                Stat(P["git"]["wall"]), rat, target="<= git", ok=rat.median <= 1,
                note=f"client wall; {pbytes[fmt] / 1e6:.1f} MB in {npacks[fmt]} pack(s)")
        sec.add(f"  {v}: server wall (presign + unpack)", Stat(d["server"]),
                note=f"unpack {pbytes[fmt] / 1e6 / statistics.median(d['server']):.0f} MB/s of pack")
        sec.add(f"  {v}: server CPU, musehubd / PostgreSQL", Stat(d["cpu"]),
                note=f"PostgreSQL {statistics.median(d['pg']):.2f} s; 10 ms ticks")
        sec.add(f"  {v}: muse-push peak RSS", Stat(d["rss"], "kib"))
        tput = sum(d["up_b"]) / sum(d["up_s"]) if sum(d["up_s"]) > 0 else 0.0
        if v == "v1":
            sec.add("  v1: upload throughput (loopback)", Stat([sum(d["up_s"]) / reps]),
                    target=">= 200 MB/s", ok=tput >= 200e6,
                    note=f"{tput / 1e6:.0f} MB/s; {store} store")
        else:
            sec.add("  v2: upload", Stat(d["up_s"]), note=f"{tput / 1e6:.0f} MB/s")
        res[f"push_{v}"] = {**d, "pack_bytes": pbytes[fmt], "upload_Bps": tput}
    res["push_git"] = P["git"]
    sec.add("  git push: server CPU (nginx + fcgiwrap + git)", Stat(P["git"]["cpu"]),
            note="sampled every 20 ms")
    sec.add("git's pack of the branch", note=f"{gsize / 1e6:.1f} MB (the bare repository after git push)")
    r2 = pbytes[2] / gsize
    sec.add("v2 push pack / git's pack", Stat([r2], "x"), target="<= 0.6x", ok=r2 <= 0.6,
            note=f"{pbytes[2] / 1e6:.1f} MB / {gsize / 1e6:.1f} MB (v1: {pbytes[1] / gsize:.1f}x)")

    # -- GC ----------------------------------------------------------------------
    # Blobs are content-addressed across repositories: the v1 and v2
    # repositories hold the same objects, so "stored" is the size of the
    # pack GC leaves the repository's objects in (its consolidated_key).
    gc_res = {}
    for fmt in (1, 2):
        slug = f"uv{fmt}-0"
        rid = hub.refs(OWNER, slug)["repo_id"]
        m_srv, m_pg = b.meters(srv)
        out, wall = _run_gc(hub, rid)
        cpu, pg = m_srv.stop(), m_pg.stop()
        after = pack_size(b, out.get("consolidated_key") or "")
        gc_res[fmt] = {"result": out, "wall": wall, "cpu": cpu, "pg": pg, "stored": after}
        rat = after / gsize if gsize else 0.0
        what = ("skipped: the repository has one pack" if out.get("skipped") else
                f"{out.get('packs_before')} packs -> {out.get('packs_after')}, read "
                f"{(out.get('bytes_read') or 0) / 1e6:.1f} MB, wrote "
                f"{(out.get('bytes_written') or 0) / 1e6:.1f} MB, job {out.get('elapsed_ms')} ms, "
                f"CPU {cpu:.2f} s + PostgreSQL {pg:.2f} s")
        sec.add(f"GC of the v{fmt}-pushed repository (mpack.gc)", Stat([wall]), note=what)
        sec.add(f"  stored after GC (v{fmt} push) / git's pack", Stat([rat], "x"),
                target="<= 0.5x", ok=rat <= 0.5,
                note=f"{after / 1e6:.2f} MB / {gsize / 1e6:.1f} MB (pushed {pbytes[fmt] / 1e6:.1f} MB)")
    res["gc"] = gc_res

    # -- full clone: formats [1] and [1, 2] vs git clone --bare ------------------
    slug = "uv1-0"
    C: dict[str, dict[str, list[float]]] = {
        k: {"wall": [], "server": [], "cpu": [], "rss": [], "bytes": [], "read": [], "reads": []}
        for k in ("f1", "f12", "git")}
    gdest = work / "git-clone"
    for k in range(reps):
        def muse_clone(fmts: str) -> None:
            st = work / f"state-{fmts}-{k}"
            shutil.rmtree(st, ignore_errors=True)
            m_srv, _ = b.meters(srv)
            r0 = store_read(srv.url)
            args = ["--format", "1"] if fmts == "f1" else []
            wall, kib, r = tool(work, "muse-fetch", *base, "--repo", slug, "--state", str(st),
                                "--branch", "v1.x", "--json", "-q", *args)
            d = C[fmts]
            d["cpu"].append(m_srv.stop())
            r1 = store_read(srv.url)
            d["read"].append(r1[0] - r0[0])
            d["reads"].append(r1[1] - r0[1])
            d["wall"].append(wall)
            d["rss"].append(kib)
            out = json.loads(r.stdout.decode())
            d["server"].append(out["timings_ms"].get("fetch", 0) / 1000)
            d["bytes"].append(out["bytes"])
            if out["commit_count"] != n_commits:
                raise BenchError(f"clone {fmts}: {out['commit_count']} commits, want {n_commits}")
            shutil.rmtree(st, ignore_errors=True)

        def git_clone() -> None:
            shutil.rmtree(gdest, ignore_errors=True)
            gm = SampledCpu(git)
            C["git"]["wall"].append(b.git_cmd("clone", "-q", "--bare", git.repo_url("uvg-0"),
                                              str(gdest)))
            C["git"]["cpu"].append(gm.stop())
        order = [lambda: muse_clone("f1"), lambda: muse_clone("f12"), git_clone]
        for f in (order if k % 2 == 0 else order[::-1]):
            f()
    shutil.rmtree(gdest, ignore_errors=True)
    sec.add("  git clone --bare: server CPU (nginx + fcgiwrap + git)", Stat(C["git"]["cpu"]),
            note="sampled every 20 ms")
    for fmts, label in (("f1", "formats [1]"), ("f12", "formats [1, 2]")):
        d = C[fmts]
        rat = ratios(d["wall"], C["git"]["wall"])
        sec.add(f"full clone, {label} (muse-fetch --state)", Stat(d["wall"]), "git clone --bare",
                Stat(C["git"]["wall"]), rat, target="<= git", ok=rat.median <= 1,
                note=f"client wall; {statistics.median(d['bytes']) / 1e6:.1f} MB pack; "
                     f"first run builds the pack, then the cache")
        sec.add(f"  {label}: server wall (fetch request), first / cached",
                Stat(d["server"][:1]),
                note=(("cached " + ", ".join(f"{x * 1e3:.1f} ms" for x in d["server"][1:]) + "; ")
                      if len(d["server"]) > 1 else "")
                + f"first build read {d['read'][0] / 1e6:.1f} MB from the store "
                  f"({d['reads'][0]} reader(s))")
        sec.add(f"  {label}: server CPU", Stat(d["cpu"]), note="musehubd, 10 ms ticks")
        sec.add(f"  {label}: muse-fetch peak RSS", Stat(d["rss"], "kib"))
    res["clone"] = C

    # -- depth 1 -----------------------------------------------------------------
    D: dict[str, list[float]] = {"wall": [], "server": [], "git": [], "bytes": []}
    diffs: list[str] = []
    n_cmp = 0
    for k in range(reps):
        wc = work / f"wc-{k}"
        gwc = work / f"gwc-{k}"

        def muse_d1() -> None:
            shutil.rmtree(wc, ignore_errors=True)
            wall, _kib, r = tool(work, "muse-fetch", *base, "--repo", slug, "--branch", "v1.x",
                                 "--depth", "1", "--checkout", str(wc), "--json", "-q")
            out = json.loads(r.stdout.decode())
            D["wall"].append(wall)
            D["server"].append(out["timings_ms"].get("fetch", 0) / 1000)
            D["bytes"].append(out["bytes"])
            if out["commit_count"] != 1:
                raise BenchError(f"depth-1 clone got {out['commit_count']} commits")

        def git_d1() -> None:
            shutil.rmtree(gwc, ignore_errors=True)
            D["git"].append(b.git_cmd("clone", "-q", "--depth", "1", "-b", "v1.x",
                                      git.repo_url("uvg-0"), str(gwc)))
        for f in ((muse_d1, git_d1) if k % 2 == 0 else (git_d1, muse_d1)):
            f()
        if k == 0:
            n_cmp, diffs = compare_trees(wc, gwc)
        shutil.rmtree(wc, ignore_errors=True)
        shutil.rmtree(gwc, ignore_errors=True)
    rat = ratios(D["wall"], D["git"])
    sec.add("depth-1 clone + checkout (muse-fetch --depth 1)", Stat(D["wall"]),
            "git clone --depth 1", Stat(D["git"]), rat, target="<= git", ok=rat.median <= 1,
            note=f"client wall; {statistics.median(D['bytes']) / 1e6:.2f} MB pack; "
                 f"server {statistics.median(D['server']) * 1e3:.0f} ms")
    sec.add("  checkout vs git's work tree", note=f"{n_cmp} files compared, "
            f"{len(diffs)} differ{': ' + ', '.join(diffs[:5]) if diffs else ' (byte-identical)'}")
    res["depth1"] = {**D, "files_compared": n_cmp, "diffs": diffs}
    if diffs:
        raise BenchError(f"depth-1 checkout differs from git's: {diffs[:5]}")

    # -- one new commit ------------------------------------------------------------
    O: dict[str, list[float]] = {"conv": [], "push": [], "server": [], "git": [],
                                 "client": []}
    n = 3 if b.quick else 5
    for k in range(n):
        O["conv"].append(one_git_commit(b, work, src, k, work / "g2m-v2"))

        def o() -> None:
            wall, _kib, r = tool(work, "muse-push", *base, "--repo", "uv2-0", "-q", "--json",
                                 "--plan", str(plans[2]))
            sent = [x for x in json_lines(r) if not x.get("up_to_date")]
            if len(sent) != 1 or sent[0]["sent"]["commits"] != 1:
                raise BenchError(f"one-commit push sent {sent}")
            t = sent[0]["timings"]
            O["push"].append(wall)
            O["server"].append(t.get("presign", 0) + t.get("unpack", 0))
            # what the process spent outside its timed steps (interpreter
            # start, imports, GET refs, exit)
            O["client"].append(wall - sum(t.values()))

        def t() -> None:
            O["git"].append(b.git_cmd("push", "-q", git.repo_url("uvg-0"), "v1.x:refs/heads/v1.x",
                                      cwd=str(src)))
        for fn in ((o, t) if k % 2 == 0 else (t, o)):
            fn()
    ps = Stat(O["push"])
    rat = ratios(O["push"], O["git"])
    sec.add("one new commit: git2muse (incremental)", Stat(O["conv"]))
    sec.add("one new commit: muse-push --plan (v2)", ps, "git push", Stat(O["git"]), rat,
            target="<= 0.3 s and <= git", ok=ps.median <= 0.3 and rat.median <= 1,
            note=f"client wall; server (presign + unpack) {statistics.median(O['server']) * 1e3:.0f} "
                 f"ms; outside the steps (start, imports, refs) "
                 f"{statistics.median(O['client']) * 1e3:.0f} ms")
    res["one_commit"] = O
    # One server process served every step above (pushes of 296 MB, GC,
    # clones): its peak RSS is the whole workload's.
    b.memory_row(sec, srv, "server peak RSS (whole workload)")
    b.results[f"real {store}"] = res
    hub.close()
    shutil.rmtree(work, ignore_errors=True)
    return sec
