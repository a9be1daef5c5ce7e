#!/usr/bin/python3
"""bench.py — `make bench`: musehubd's speed, measured side by side with
its peers in one run, printed as one table (docs/benchmarks.md explains it).

It starts a throwaway PostgreSQL (scripts/pgtmp.py), musehubd (fs store;
BENCH_STORE=s3 uses the S3 emulator of scripts/s3emu.py), nginx with
fcgiwrap + git-http-backend (git smart HTTP, and a fixed ~200-byte body),
runs each workload, and stops everything it started, also on Ctrl-C or
failure.

Workloads (--only takes a comma-separated subset, in this order):
  push     full push of a history: musehubd (refs, presign, upload, unpack)
           vs `git push` of the same history over smart HTTP
  clone    full clone: musehubd refs + fetch + download, cold (fresh server
           process, never-asked want/have) vs `git clone --bare`
  incr     one new commit: push, fetch, and a no-op fetch, vs git's
  stores   the seed push and full fetch on the s3 store (S3 emulator) next
           to the fs store: one server on each, same run, ratio s3 / fs
  latency  cached fetch answer: 2000 sequential requests on one keep-alive
           connection (raw socket, TCP_NODELAY), median and p99
  wrk      the fetch endpoint (cached answer), /healthz and /refs under wrk
           at 16 and 64 connections vs nginx's fixed body and git's info/refs
  workers  MUSEHUB_WORKERS=2 vs 1 under the same wrk load
  jobs     scripts/bench_jobs.py (mpack.index, mpack.gc), when present
  clients  the command-line clients (git2muse, muse-push, muse-fetch,
           muse-mirror) as processes on libuv's real history, next to git:
           full push and clone, one new commit, upload throughput, client
           peak RSS (scripts/bench/clients_bench.py; skipped without the
           libuv bundle, $BENCH_LIBUV_BUNDLE)
  real     libuv's real history on the run's store: git2muse, push as v1 and
           v2, GC, clone with formats [1] and [1, 2], depth-1 clone, one new
           commit, next to git push / git clone / git clone --depth 1 over
           smart HTTP (scripts/bench/real_bench.py; skipped without the bundle)
  memory   (opt-in: --only memory or --large) the server's VmHWM pushing and
           cloning 2 GiB packs (v1, v2) and 8 concurrent 1 GiB first clones,
           fs and s3 stores, default MUSEHUB_PACK_MEMORY
           (scripts/bench/memory_bench.py; needs ~14 GiB free disk)
Peak RSS (VmHWM) of the server is recorded in each workload; the server is
restarted at the start of each one.

History dimensions (seed 000 by default): BENCH_COMMITS=1031 BENCH_FILES=700
BENCH_CHANGED=5 BENCH_BLOB=512.  BENCH_LARGE=1 (or --large) also runs push,
clone and incr on a 10x longer history and prints the growth.

Every figure is the median of repeated runs with its min-max spread; every
ratio is taken per pair of runs made back to back (ours, then the peer's,
alternating which goes first) and its median is printed.

  /usr/bin/python3 scripts/bench.py [--quick] [--only push,clone] [--large]
      [--store fs|s3] [--json FILE] [--keep] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.dont_write_bytecode = True      # no __pycache__ left in scripts/
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import msgpack  # noqa: E402

import muselib  # noqa: E402
import pgtmp  # noqa: E402
import procs  # noqa: E402
import rawhttp  # noqa: E402
import gitpeer  # noqa: E402
from museclient import MSGPACK, OWNER, Muse  # noqa: E402
from procs import REAPER, BenchError, Musehubd, run  # noqa: E402

WORKLOADS = ("push", "clone", "incr", "stores", "latency", "wrk", "workers", "jobs", "clients",
             "real", "memory")
# Heavy (2 GiB packs, ~14 GiB of disk): only with --only memory or --large.
OPT_IN = ("memory",)


# =================================================================== stats

@dataclass
class Stat:
    """Samples of one figure.  kind: "s" (seconds), "rate" (per second),
    "x" (ratio), "kib" (memory)."""
    samples: list[float]
    kind: str = "s"

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def lo(self) -> float:
        return min(self.samples)

    @property
    def hi(self) -> float:
        return max(self.samples)

    def pct(self, p: float) -> float:
        xs = sorted(self.samples)
        k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
        return xs[k]

    def fmt(self, spread: bool = True) -> str:
        unit = pick_unit(self.median, self.kind)
        m = fmt_value(self.median, self.kind, unit=unit)
        if not spread or len(self.samples) < 2:
            return m
        lo = fmt_value(self.lo, self.kind, bare=True, unit=unit)
        hi = fmt_value(self.hi, self.kind, bare=True, unit=unit)
        return f"{m} ({lo}-{hi})"

    def to_json(self) -> dict:
        return {"median": self.median, "min": self.lo, "max": self.hi, "n": len(self.samples),
                "kind": self.kind}


def pick_unit(v: float, kind: str) -> tuple[float, str]:
    """(scale, suffix) for showing v: times in us/ms/s, rates in /s or k/s."""
    if kind == "s":
        return (1e6, "us") if v < 1e-3 else (1e3, "ms") if v < 1 else (1.0, "s")
    if kind == "rate":
        return (1e-3, "k/s") if v >= 10000 else (1.0, "/s")
    if kind == "kib":
        return (1 / 1024, "MiB")
    if kind == "x":
        return (1.0, "x")
    return (1.0, "")


def fmt_value(v: float, kind: str, bare: bool = False,
              unit: tuple[float, str] | None = None) -> str:
    scale, suffix = unit or pick_unit(v, kind)
    n = v * scale
    if kind in ("kib", "x") or (kind == "rate" and suffix == "k/s"):
        s = f"{n:.1f}" if kind != "x" else f"{n:.2f}"
    elif abs(n) >= 100:
        s = f"{n:.0f}"
    else:
        s = f"{n:.3g}"
    if bare:
        return s
    sep = "" if suffix in ("x", "/s", "k/s") else " "
    return f"{s}{sep}{suffix}"


@dataclass
class Row:
    label: str
    ours: Stat | None = None
    peer_label: str = ""
    peer: Stat | None = None
    ratio: Stat | None = None
    target: str = ""
    ok: bool | None = None
    note: str = ""


@dataclass
class Section:
    title: str
    rows: list[Row] = field(default_factory=list)
    error: str = ""

    def add(self, *a, **kw) -> Row:
        r = Row(*a, **kw)
        self.rows.append(r)
        return r


def ratios(a: list[float], b: list[float]) -> Stat:
    return Stat([x / y for x, y in zip(a, b) if y > 0], "x")


# ============================================================ dimensions

@dataclass(frozen=True)
class Dims:
    commits: int
    files: int
    changed: int
    blob: int

    def label(self) -> str:
        return f"{self.commits} commits x {self.files} files x {self.changed} changed x {self.blob} B"

    def key(self) -> str:
        return f"{self.commits}x{self.files}x{self.changed}x{self.blob}"


SEED_000 = Dims(1031, 700, 5, 512)


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    try:
        return int(v) if v.strip() else default
    except ValueError:
        raise SystemExit(f"bench: {name}={v!r} is not an integer")


# ============================================================= the bench

class Bench:
    """One benchmark run: its work directory, PostgreSQL database, servers
    and peers, the workloads (w_*), and the sections of the table they
    return.  Figures also go to self.results (the --json output)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.quick = args.quick
        self.sections: list[Section] = []
        self.failed = False
        for d in procs.janitor():
            print(f"bench: cleaned up after an earlier run that was killed: {d}", file=sys.stderr)
        self.work = Path(tempfile.mkdtemp(prefix="musehub-bench-", dir="/tmp"))
        os.chmod(self.work, 0o755)   # the postgres user traverses it
        REAPER.attach(self.work)
        self.binary = os.environ.get("MUSEHUB_BIN", str(ROOT / "build" / "musehubd"))
        self.token = f"{random.getrandbits(32):08x}"
        self.env_base: dict[str, str] = {}
        self.store_envs: dict[str, dict[str, str]] = {}
        self.server: Musehubd | None = None
        self.git: gitpeer.GitHTTP | None = None
        self.git_env = gitpeer.git_env(self.work / "githome")
        (self.work / "githome").mkdir()
        self.git_src: dict[Dims, gitpeer.GitRepo] = {}
        self.pushed: dict[Dims, list[tuple[str, muselib.History]]] = {}
        self.results: dict[str, Any] = {}
        self.machine: dict[str, str] = {}
        self.seed_dims = Dims(env_int("BENCH_COMMITS", 1031), env_int("BENCH_FILES", 700),
                              env_int("BENCH_CHANGED", 5), env_int("BENCH_BLOB", 512))
        self.reps = args.reps or (2 if self.quick else 5)
        self.wrk_duration = args.duration or (1.0 if self.quick else 5.0)
        self.wrk_reps = 1 if self.quick else 3
        self.latency_n = 300 if self.quick else 2000

    # ------------------------------------------------------------ set-up

    def log(self, msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    def setup(self) -> None:
        if not os.path.exists(self.binary):
            raise BenchError(f"{self.binary} not found: run `make` first (or set MUSEHUB_BIN)")
        self.log(f"work directory {self.work}")
        db_base = os.environ.get("MUSEHUB_BENCH_DATABASE_URL")
        self.own_pg = not db_base
        if not db_base:
            db_base = procs.start_postgres(str(self.work / "pg"))
        self.db_base = db_base
        db_url = pgtmp.createdb(db_base, f"bench_{os.getpid()}_{self.token}")
        self.pg_version = procs.postgres_version(db_url)
        store = self.a.store
        self.env_base = {
            "MUSEHUB_DATABASE_URL": db_url,
            "MUSEHUB_DEV_IDENTITY": OWNER,
            "MUSEHUB_LOG_LEVEL": "warn",
            # wrk sends ~10^5 requests/s from one address: the limits would
            # answer 429 and the figures would measure the limiter.
            "MUSEHUB_RATE_PUSH": "0",
            "MUSEHUB_RATE_FETCH": "0",
        }
        self.env_base.update(self.store_env(store))
        self.machine = machine_info()
        self.machine["postgresql"] = self.pg_version
        self.machine["store"] = store

    def store_env(self, kind: str) -> dict[str, str]:
        """The MUSEHUB_STORE settings of an fs store (under the work
        directory) or of the S3 emulator (started once per run, on first
        use).  Raises BenchError when the emulator cannot run."""
        if kind not in self.store_envs:
            if kind == "s3":
                import s3emu
                why = s3emu.available()
                if why:
                    raise BenchError(f"s3 store: {why}")
                try:
                    endpoint, proc = s3emu.start(str(self.work / "s3emu"), "musehub-bench")
                except RuntimeError as e:
                    raise BenchError(str(e))
                REAPER.on_stop("s3emu", lambda: s3emu.stop(proc))
                self.store_envs[kind] = {
                    "MUSEHUB_STORE": "s3:musehub-bench",
                    "MUSEHUB_S3_ENDPOINT": endpoint,
                    "MUSEHUB_S3_ACCESS_KEY": s3emu.ACCESS_KEY,
                    "MUSEHUB_S3_SECRET_KEY": s3emu.SECRET_KEY,
                    "MUSEHUB_S3_PATH_STYLE": "1",
                }
            else:
                (self.work / "store").mkdir(exist_ok=True)
                self.store_envs[kind] = {"MUSEHUB_STORE": f"fs:{self.work / 'store'}"}
        return self.store_envs[kind]

    def new_server(self, workers: int = 1, name: str = "musehubd",
                   store: str | None = None) -> Musehubd:
        """A started server; store "fs"/"s3" overrides the run's store."""
        env = self.env_base
        if store is not None:
            env = {k: v for k, v in env.items() if not k.startswith(("MUSEHUB_STORE", "MUSEHUB_S3_"))}
            env.update(self.store_env(store))
        return Musehubd(self.binary, self.work, env, workers=workers, name=name).start()

    def fresh_server(self) -> Musehubd:
        """Restart the main server: a new process (empty caches, RSS from zero)."""
        if self.server is not None:
            self.server.stop()
        self.server = self.new_server()
        return self.server

    def git_http(self) -> gitpeer.GitHTTP:
        if self.git is None:
            self.git = gitpeer.GitHTTP(self.work / "nginx").start()
            REAPER.on_stop("nginx", self.git.stop)
        return self.git

    def git_source(self, dims: Dims) -> gitpeer.GitRepo:
        """The history as a local git repository, plus `reps` extra commits
        for the incremental pushes."""
        if dims not in self.git_src:
            t = time.perf_counter()
            self.git_src[dims] = gitpeer.GitRepo.build(
                self.work / f"git-src-{dims.key()}", self.git_env, dims.commits, dims.files,
                dims.changed, dims.blob, extra=self.reps_for(dims))
            self.log(f"git repository of {dims.label()} built in {time.perf_counter() - t:.1f} s")
        return self.git_src[dims]

    def reps_for(self, dims: Dims) -> int:
        return self.reps if dims == self.seed_dims else max(2, min(self.reps, 3))

    def history(self, dims: Dims, seed: str) -> muselib.History:
        return muselib.generate(commits=dims.commits, files=dims.files, changed=dims.changed,
                                blob_size=dims.blob, seed=seed)

    def git_cmd(self, *args: str, cwd: str | None = None, timeout: float = 600) -> float:
        """Run git; returns its wall time in seconds."""
        t = time.perf_counter()
        run(["git", *args], timeout=timeout, cwd=cwd, env=self.git_env)
        return time.perf_counter() - t

    def memory_row(self, sec: Section, srv: Musehubd | None = None, label: str = "server peak RSS") -> None:
        srv = srv or self.server
        m = srv.memory()
        if m["hwm_kib"]:
            sec.add(label, Stat([m["hwm_kib"]], "kib"),
                    note=f"{len(srv.pids())} process(es); VmHWM")
            self.results.setdefault("rss_kib", {})[f"{sec.title}: {label}"] = m["hwm_kib"]

    # --------------------------------------------------------- workloads

    def w_push(self, dims: Dims) -> Section:
        sec = Section(f"full push, {dims.label()}")
        n = self.reps_for(dims)
        git = self.git_http()
        src = self.git_source(dims)
        srv = self.fresh_server()
        mu = Muse(srv.url)
        steps: dict[str, list[float]] = {k: [] for k in ("refs", "presign", "upload", "unpack",
                                                          "server", "total", "elapsed_ms")}
        gits: list[float] = []
        cpu_srv: list[float] = []
        cpu_pg: list[float] = []
        pushed = []
        size = 0
        for k in range(n):
            h = self.history(dims, f"push-{self.token}-{k}")
            pack = h.pack()
            size = len(pack)
            name = f"push-{dims.key()}-{k}"
            mu.create_repo(name)
            bare = git.new_bare(name, self.git_env)

            def ours() -> None:
                m_srv, m_pg = self.meters(srv)
                t = mu.push(name, pack, h.head)
                cpu_srv.append(m_srv.stop())
                cpu_pg.append(m_pg.stop())
                for key in steps:
                    steps[key].append(t[key])

            def theirs() -> None:
                gits.append(self.git_cmd("push", "-q", git.repo_url(name),
                                         f"{src.commits[dims.commits - 1]}:refs/heads/main",
                                         cwd=str(src.path)))
            for f in ((ours, theirs) if k % 2 == 0 else (theirs, ours)):
                f()
            pushed.append((name, h))
            if k == 0:
                gsize = sum(p.stat().st_size for p in (bare / "objects" / "pack").glob("*.pack"))
                first = (pack, h.head)
        self.pushed[dims] = pushed
        # The first history's pack pushed again, into a repository of its
        # own: the pack is stored and indexed already, so the unpack
        # probes its index rows instead of inserting them (SPEC 4.3: full
        # counts for the second repository).
        again: list[float] = []
        for k in range(n):
            name = f"push-{dims.key()}-again-{k}"
            mu.create_repo(name)
            again.append(mu.push(name, *first)["server"])
        mu.close()
        sec.add("refs", Stat(steps["refs"]))
        sec.add("presign", Stat(steps["presign"]))
        sec.add(f"upload ({size / 1e6:.1f} MB)", Stat(steps["upload"]))
        sec.add("unpack", Stat(steps["unpack"]), note=f"server's elapsed_ms {statistics.median(steps['elapsed_ms']):.0f}")
        sv = Stat(steps["server"])
        sec.add("server time (refs + presign + unpack)", sv, target="<= 0.25 s",
                ok=sv.median <= 0.25 if dims == SEED_000 else None)
        tot, gs = Stat(steps["total"]), Stat(gits)
        rat = ratios(steps["total"], gits)
        sec.add("whole push", tot, "git push", gs, rat, target="<= git",
                ok=rat.median <= 1.0, note=f"git pack {gsize / 1e6:.1f} MB")
        srat = ratios(steps["server"], gits)
        sec.add("server time vs git's whole push", sv, "git push", gs, srat, target="<= 0.5x",
                ok=srat.median <= 0.5, note="issue 20")
        sec.add("same pack, second repository: server time", Stat(again),
                note="stored and indexed already: its index rows are probed, not inserted")
        sec.add("CPU during the push: musehubd", Stat(cpu_srv),
                note="all threads; 10 ms clock-tick resolution")
        sec.add("CPU during the push: PostgreSQL", Stat(cpu_pg))
        self.memory_row(sec)
        self.results[f"push {dims.key()}"] = {"steps": {k: Stat(v).to_json() for k, v in steps.items()},
                                              "git": gs.to_json(), "ratio": rat.to_json(),
                                              "pack_bytes": size, "git_pack_bytes": gsize}
        return sec

    def meters(self, srv: Musehubd) -> tuple[procs.CpuMeter, procs.CpuMeter]:
        """Started CPU meters of the server's processes and of PostgreSQL."""
        m_srv = procs.CpuMeter(lambda: procs.group_pids(srv.proc.pid))
        m_pg = procs.CpuMeter(self.pg_pids)
        m_srv.start()
        m_pg.start()
        return m_srv, m_pg

    def push_breakdown(self, dims: Dims) -> Section:
        """Where one push's time goes: a push of a fresh history to a server
        at MUSEHUB_LOG_LEVEL=debug, whose unpack logs "<id>: unpack step
        <name> (<ms> ms)" on entering each step (the step kit's debug
        line), with PostgreSQL logging every statement's
        duration meanwhile (our throwaway cluster only).  COPY durations
        include the time musehubd takes to stream the rows."""
        sec = Section(f"where one push's time goes ({dims.commits} commits; debug log, one run)")
        env = dict(self.env_base, MUSEHUB_LOG_LEVEL="debug")
        srv = Musehubd(self.binary, self.work, env, name=f"musehubd-debug-{dims.key()}").start()
        pglog = self.work / "pg" / "postgres.log"
        pg_from = pglog.stat().st_size if self.own_pg and pglog.exists() else None
        try:
            mu = Muse(srv.url)
            h = self.history(dims, f"phases-{self.token}")
            name = f"phases-{dims.key()}"
            mu.create_repo(name)
            if pg_from is not None:
                pgtmp.psql(self.db_base, sql="ALTER SYSTEM SET log_min_duration_statement = 0")
                pgtmp.psql(self.db_base, sql="SELECT pg_reload_conf()")
                time.sleep(0.2)
                pg_from = pglog.stat().st_size
            try:
                t = mu.push(name, h.pack(), h.head)
            finally:
                if pg_from is not None:
                    pgtmp.psql(self.db_base, sql="ALTER SYSTEM RESET log_min_duration_statement")
                    pgtmp.psql(self.db_base, sql="SELECT pg_reload_conf()")
            mu.close()
        finally:
            srv.stop()
        sec.add("unpack (this run)", Stat([t["unpack"]]))
        by_req: dict[str, list[tuple[str, float]]] = {}
        for line in srv.log_path.read_text(errors="replace").splitlines():
            # The step kit's debug line: "<request id>: unpack step <name> (<ms> ms)".
            mm = re.search(r"(\S+): unpack step (\w+) \(([0-9.]+) ms\)", line)
            if mm:
                by_req.setdefault(mm.group(1), []).append((mm.group(2), float(mm.group(3))))
        marks = list(by_req.values())[-1] if by_req else []     # the push's unpack
        if len(marks) >= 2:
            acc: dict[str, float] = {}
            for (st, t0), (st2, t1) in zip(marks, marks[1:]):
                # From entering one step to entering the next.
                label = f"{st} -> {st2}"
                acc[label] = acc.get(label, 0.0) + (t1 - t0)
            total = marks[-1][1]
            rest = 0.0
            for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
                if v >= 0.03 * total:
                    sec.add(f"unpack {k}", Stat([v / 1000]), note=f"{v / total * 100:.0f}%")
                else:
                    rest += v
            sec.add("unpack, the other states", Stat([rest / 1000]), note=f"{rest / total * 100:.0f}%")
        else:
            sec.error = "the server logged no unpack states at debug level"
        if pg_from is not None:
            text = pglog.read_bytes()[pg_from:].decode(errors="replace")
            stm: dict[str, list[float]] = {}
            for mm in re.finditer(r"duration: ([0-9.]+) ms\s+(?:statement|execute [^:]*): (.*)", text):
                sql = mm.group(2)
                k = re.search(r"\b(INSERT INTO \w+|COPY \w+|UPDATE \w+|DELETE FROM \w+|SELECT)", sql)
                stm.setdefault(k.group(1) if k else sql[:30], []).append(float(mm.group(1)))
            tot = sum(sum(v) for v in stm.values())
            sec.add("PostgreSQL statements, all", Stat([tot / 1000]),
                    note=f"{sum(len(v) for v in stm.values())} statements")
            for k, v in sorted(stm.items(), key=lambda kv: -sum(kv[1]))[:6]:
                sec.add(f"  {k}", Stat([sum(v) / 1000]), note=f"{len(v)}x")
        return sec

    def ensure_pushed(self, dims: Dims, n: int) -> list[tuple[str, muselib.History]]:
        """Repositories holding distinct histories (the push workload's, or
        pushed now, untimed), with the same history in git."""
        have = self.pushed.get(dims, [])
        if len(have) >= n:
            return have[:n]
        git = self.git_http()
        src = self.git_source(dims)
        srv = self.server or self.fresh_server()
        mu = Muse(srv.url)
        for k in range(len(have), n):
            h = self.history(dims, f"push-{self.token}-{k}")
            name = f"push-{dims.key()}-{k}"
            mu.create_repo(name)
            mu.push(name, h.pack(), h.head)
            git.new_bare(name, self.git_env)
            self.git_cmd("push", "-q", git.repo_url(name),
                         f"{src.commits[dims.commits - 1]}:refs/heads/main", cwd=str(src.path))
            have.append((name, h))
        mu.close()
        self.pushed[dims] = have
        return have

    def w_clone(self, dims: Dims) -> Section:
        sec = Section(f"full clone, {dims.label()}")
        n = self.reps_for(dims)
        repos = self.ensure_pushed(dims, n)
        git = self.git_http()
        cold: dict[str, list[float]] = {k: [] for k in ("refs", "fetch", "download", "total")}
        warm: list[float] = []
        gits: list[float] = []
        hwm = []
        size = 0.0
        for k, (name, h) in enumerate(repos):
            dest = self.work / "git-clone"

            def ours() -> None:
                nonlocal size
                srv = self.fresh_server()       # cold: a new process ...
                mu = Muse(srv.url)              # ... and a never-asked want/have
                t = mu.pull(name, [], expect_commits=dims.commits)
                size = t["bytes"]
                for key in cold:
                    cold[key].append(t[key])
                t0 = time.perf_counter()
                mu.fetch(name, [h.head], [])
                warm.append(time.perf_counter() - t0)
                hwm.append(srv.memory()["hwm_kib"])
                mu.close()

            def theirs() -> None:
                shutil.rmtree(dest, ignore_errors=True)
                gits.append(self.git_cmd("clone", "-q", "--bare", git.repo_url(name), str(dest)))
            for f in ((ours, theirs) if k % 2 == 0 else (theirs, ours)):
                f()
        # A shallow clone (SPEC 4.4, depth 1) next to git's, the same way:
        # a fresh process, refs + fetch + download against git clone --depth 1.
        d1: list[float] = []
        gd1: list[float] = []
        d1_size = 0.0
        for k, (name, h) in enumerate(repos):
            dest = self.work / "git-clone"

            def ours_d1() -> None:
                nonlocal d1_size
                mu = Muse(self.fresh_server().url)
                t = mu.pull(name, [], expect_commits=1, depth=1)
                d1_size = t["bytes"]
                d1.append(t["total"])
                mu.close()

            def theirs_d1() -> None:
                shutil.rmtree(dest, ignore_errors=True)
                gd1.append(self.git_cmd("clone", "-q", "--bare", "--depth", "1", git.repo_url(name), str(dest)))
            for f in ((ours_d1, theirs_d1) if k % 2 == 0 else (theirs_d1, ours_d1)):
                f()
        shutil.rmtree(self.work / "git-clone", ignore_errors=True)
        sec.add("refs", Stat(cold["refs"]))
        fs = Stat(cold["fetch"])
        sec.add("fetch, cold (request to answer)", fs, note="fresh process, new want/have")
        sec.add(f"download ({size / 1e6:.1f} MB)", Stat(cold["download"]))
        tot, gs = Stat(cold["total"]), Stat(gits)
        rat = ratios(cold["total"], gits)
        seed = dims == SEED_000     # the absolute targets are for seed 000's history
        sec.add("whole clone (refs + fetch + download)", tot, target="<= 0.2 s",
                ok=tot.median <= 0.2 if seed else None)
        sec.add("whole clone vs git", tot, "git clone --bare", gs, rat, target="<= git",
                ok=rat.median <= 1.0)
        rd1 = ratios(d1, gd1)
        sec.add(f"depth-1 clone ({d1_size / 1e6:.2f} MB) vs git", Stat(d1), "git clone --depth 1", Stat(gd1), rd1,
                target="<= git", ok=rd1.median <= 1.0, note="fresh process; refs + fetch (depth 1) + download")
        sec.add("fetch again, cached answer", Stat(warm), note="same process, same request")
        sec.add("server peak RSS", Stat(hwm, "kib"), note="VmHWM, one fresh process per run")
        self.results[f"clone {dims.key()}"] = {"cold": {k: Stat(v).to_json() for k, v in cold.items()},
                                               "warm_fetch": Stat(warm).to_json(), "git": gs.to_json(),
                                               "ratio": rat.to_json(), "pack_bytes": size,
                                               "depth1": {"ours": Stat(d1).to_json(), "git": Stat(gd1).to_json(),
                                                          "ratio": rd1.to_json(), "pack_bytes": d1_size}}
        return sec

    def w_incr(self, dims: Dims) -> Section:
        sec = Section(f"one new commit on {dims.commits} commits")
        n = self.reps_for(dims)
        git = self.git_http()
        src = self.git_source(dims)
        srv = self.fresh_server()
        mu = Muse(srv.url)
        name = f"incr-{dims.key()}"
        # The base history (seed 000's own contents), untimed.
        h = self.history(dims, "")
        mu.create_repo(name)
        mu.push(name, h.pack(), h.head)
        git.new_bare(name, self.git_env)
        url = git.repo_url(name)
        self.git_cmd("push", "-q", url, f"{src.commits[dims.commits - 1]}:refs/heads/main",
                     cwd=str(src.path))
        clone = self.work / f"git-incr-{dims.key()}"
        shutil.rmtree(clone, ignore_errors=True)
        self.git_cmd("clone", "-q", "--bare", url, str(clone))
        refspec = "+refs/heads/main:refs/heads/main"
        # The new commits, built before the clock starts.
        chain, head, manifest = [], h.head, h.manifest
        for k in range(n):
            c = muselib.generate(commits=1, files=dims.files, changed=dims.changed,
                                 blob_size=dims.blob, parent=(head, manifest),
                                 first_index=dims.commits + k)
            chain.append((c.pack(), c.head, head))
            head, manifest = c.head, c.manifest
        m: dict[str, list[float]] = {k: [] for k in ("push", "push_server", "fetch", "fetch_req", "noop")}
        g: dict[str, list[float]] = {k: [] for k in ("push", "fetch", "noop")}
        mu_b = Muse(srv.url)      # a second client, one commit behind
        for k, (pack, new, old) in enumerate(chain):
            t = mu.push(name, pack, new)
            m["push"].append(t["total"])
            m["push_server"].append(t["server"])
            g["push"].append(self.git_cmd("push", "-q", url, f"{src.commits[dims.commits + k]}:refs/heads/main",
                                          cwd=str(src.path)))
            t = mu_b.pull(name, [old], expect_commits=1)
            m["fetch"].append(t["total"])
            m["fetch_req"].append(t["fetch"])
            g["fetch"].append(self.git_cmd("fetch", "-q", "origin", refspec, cwd=str(clone)))
            t0 = time.perf_counter()
            cur = mu_b.refs(name)["branch_heads"]["main"]
            ans = mu_b.fetch(name, [cur], [cur])
            m["noop"].append(time.perf_counter() - t0)
            if ans.get("mpack_url") or ans.get("commit_count"):
                raise BenchError(f"no-op fetch sent something: {ans}")
            g["noop"].append(self.git_cmd("fetch", "-q", "origin", refspec, cwd=str(clone)))
        mu.close()
        mu_b.close()
        sec.add("push: refs + presign + upload + unpack", Stat(m["push"]), "git push", Stat(g["push"]),
                ratios(m["push"], g["push"]), target="<= git", ok=ratios(m["push"], g["push"]).median <= 1)
        sec.add("  of which server time", Stat(m["push_server"]))
        sec.add("fetch: refs + fetch + download", Stat(m["fetch"]), "git fetch", Stat(g["fetch"]),
                ratios(m["fetch"], g["fetch"]), target="<= git", ok=ratios(m["fetch"], g["fetch"]).median <= 1)
        sec.add("  of which fetch (request to answer)", Stat(m["fetch_req"]), note="new want/have")
        sec.add("no-op fetch: refs + fetch(want = have)", Stat(m["noop"]), "git fetch", Stat(g["noop"]),
                ratios(m["noop"], g["noop"]), target="<= git", ok=ratios(m["noop"], g["noop"]).median <= 1)
        self.memory_row(sec)
        self.results[f"incr {dims.key()}"] = {
            "ours": {k: Stat(v).to_json() for k, v in m.items()},
            "git": {k: Stat(v).to_json() for k, v in g.items()}}
        return sec

    def hot_repo(self, srv: Musehubd) -> tuple[str, str]:
        """A repository with the seed history, its fetch answer cached in
        this process; returns (slug, head)."""
        mu = Muse(srv.url)
        name = "hot"
        h = self.history(self.seed_dims, "")
        try:
            mu.create_repo(name)
            mu.push(name, h.pack(), h.head)
        except BenchError:
            if mu.refs(name)["branch_heads"].get("main") != h.head:
                raise
        mu.fetch(name, [h.head], [])   # build once: later answers are cached
        mu.close()
        return name, h.head

    def w_latency(self) -> Section:
        sec = Section(f"sequential latency, {self.latency_n} requests on one keep-alive connection")
        srv = self.fresh_server()
        slug, head = self.hot_repo(srv)
        git = self.git_http()
        body = msgpack.packb({"want": [head], "have": []}, use_bin_type=True)
        hdrs = {"Content-Type": MSGPACK, "Accept": MSGPACK}

        def series(url: str, method: str, path: str, data: bytes = b"") -> list[float]:
            u = url.split("//", 1)[1]
            host, port = u.split(":")
            c = rawhttp.Connection(host, int(port), timeout=30)
            out = []
            for _ in range(50):                    # warm the connection
                c.request(method, path, data, hdrs if data else None)
            for _ in range(self.latency_n):
                t = time.perf_counter()
                r = c.request(method, path, data, hdrs if data else None)
                out.append(time.perf_counter() - t)
                if r.status != 200:
                    raise BenchError(f"{method} {path} -> {r.status}")
            c.close()
            return out

        fetch = Stat(series(srv.url, "POST", f"/{OWNER}/{slug}/fetch", body))
        healthz = Stat(series(srv.url, "GET", "/healthz"))
        static = Stat(series(git.url, "GET", "/static"))
        for label, st, target in (("fetch, cached answer", fetch, "p99 <= 2 ms"),
                                  ("GET /healthz", healthz, ""),
                                  ("nginx fixed body (client floor)", static, "")):
            r = sec.add(f"{label}: median", Stat([st.median]))
            sec.add(f"{label}: p99", Stat([st.pct(99)]), target=target,
                    ok=(st.pct(99) <= 0.002) if target else None,
                    note=f"p90 {fmt_value(st.pct(90), 's')}, max {fmt_value(st.hi, 's')}")
            del r
        self.memory_row(sec)
        self.results["latency"] = {"fetch": {"median": fetch.median, "p90": fetch.pct(90), "p99": fetch.pct(99)},
                                   "healthz": {"median": healthz.median, "p99": healthz.pct(99)},
                                   "nginx": {"median": static.median, "p99": static.pct(99)}}
        return sec

    def wrk(self, url: str, conns: int, method: str = "GET", path: str = "/",
            body: bytes | None = None, serving: Callable[[], list[int]] | None = None) -> dict[str, float]:
        """One wrk run; returns requests/s, errors, latency percentiles (us),
        and the CPU seconds used meanwhile by the serving processes
        (`serving`), by PostgreSQL and by wrk itself."""
        env = dict(os.environ)
        env.update({"BENCH_METHOD": method, "BENCH_PATH": path, "BENCH_BODY_FILE": "",
                    "BENCH_CTYPE": ""})
        if body is not None:
            bf = self.work / "wrk-body.bin"
            bf.write_bytes(body)
            env.update({"BENCH_BODY_FILE": str(bf), "BENCH_CTYPE": MSGPACK})
        # wrk shares the 2 cores with the server: one thread for 16
        # connections, two for 64 (what the nginx figures in
        # ENVIRONMENT.md were measured with).
        threads = 1 if conns <= 16 else 2
        cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{max(1, round(self.wrk_duration))}s",
               "--timeout", "10s", "-s", str(ROOT / "scripts" / "bench" / "wrk.lua"), url + path]
        m_srv = procs.CpuMeter(serving or (lambda: []))
        m_pg = procs.CpuMeter(self.pg_pids)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        m_srv.start()
        m_pg.start()
        r = run(cmd, timeout=self.wrk_duration + 60, env=env)
        cpu_srv, cpu_pg = m_srv.stop(), m_pg.stop()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        line = next((ln for ln in r.stdout.decode().splitlines() if ln.startswith("BENCH ")), None)
        if line is None:
            raise BenchError(f"wrk printed no BENCH line:\n{r.stdout.decode()[-1000:]}")
        kv = dict(p.split("=") for p in line.split()[1:])
        out = {k: float(v) for k, v in kv.items()}
        secs = out["duration_us"] / 1e6
        out["rate"] = out["requests"] / secs
        out["errors"] = sum(out[k] for k in ("connect", "read", "write", "status", "timeout"))
        n = max(1.0, out["requests"])
        out["cpu_server_us"] = cpu_srv / n * 1e6
        out["cpu_pg_us"] = cpu_pg / n * 1e6
        cpu_wrk = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        out["cores_server"] = cpu_srv / secs
        out["cores_pg"] = cpu_pg / secs
        out["cores_wrk"] = cpu_wrk / secs
        return out

    def pg_pids(self) -> list[int]:
        return procs.postgres_pids(str(self.work / "pg")) if self.own_pg else []

    def w_wrk(self) -> Section:
        sec = Section(f"under wrk ({max(1, round(self.wrk_duration))} s per run, {self.wrk_reps} run(s) each)")
        srv = self.fresh_server()
        slug, head = self.hot_repo(srv)
        git = self.git_http()
        gname = "hot"
        if not (git.root / f"{gname}.git").exists():
            src = self.git_source(self.seed_dims)
            git.new_bare(gname, self.git_env)
            self.git_cmd("push", "-q", git.repo_url(gname),
                         f"{src.commits[self.seed_dims.commits - 1]}:refs/heads/main", cwd=str(src.path))
        body = msgpack.packb({"want": [head], "have": []}, use_bin_type=True)
        ours = lambda: procs.group_pids(srv.proc.pid)          # noqa: E731
        nginx = lambda: procs.group_pids(git.nginx.pid)        # noqa: E731
        gitcgi = lambda: nginx() + procs.group_pids(git.fcgiwrap.pid)  # noqa: E731
        targets = {
            "fetch": (srv.url, "POST", f"/{OWNER}/{slug}/fetch", body, ours),
            "nginx": (git.url, "GET", "/static", None, nginx),
            "healthz": (srv.url, "GET", "/healthz", None, ours),
            "refs": (srv.url, "GET", f"/{OWNER}/{slug}/refs", None, ours),
            "git": (git.url, "GET", f"/git/{gname}.git/info/refs?service=git-upload-pack", None, gitcgi),
        }
        res: dict[int, dict[str, list[dict]]] = {}
        errors = []
        for conns in (16, 64):
            res[conns] = {k: [] for k in targets}
            for rep in range(self.wrk_reps):
                order = list(targets)
                if rep % 2:
                    order.reverse()
                for k in order:
                    url, method, path, b, serving = targets[k]
                    r = self.wrk(url, conns, method, path, b, serving)
                    res[conns][k].append(r)
                    if r["errors"]:
                        errors.append(f"{k} c{conns}: {r['errors']:.0f} errors")
        for conns in (16, 64):
            rate = {k: [r["rate"] for r in v] for k, v in res[conns].items()}
            p99 = {k: statistics.median(r["p99"] for r in v) / 1e6 for k, v in res[conns].items()}
            rat = ratios(rate["fetch"], rate["nginx"])
            sec.add(f"fetch (cached), {conns} conn., req/s", Stat(rate["fetch"], "rate"),
                    "nginx fixed body", Stat(rate["nginx"], "rate"), rat,
                    target=">= 0.5x nginx", ok=rat.median >= 0.5,
                    note=f"p99 {fmt_value(p99['fetch'], 's')} vs {fmt_value(p99['nginx'], 's')}")
            sec.add("  the same fetch vs git's ref advertisement", Stat(rate["fetch"], "rate"),
                    "git info/refs", Stat(rate["git"], "rate"), ratios(rate["fetch"], rate["git"]),
                    note=f"git p99 {fmt_value(p99['git'], 's')}")
            sec.add(f"GET /healthz, {conns} conn., req/s", Stat(rate["healthz"], "rate"),
                    "nginx fixed body", Stat(rate["nginx"], "rate"), ratios(rate["healthz"], rate["nginx"]))
            sec.add(f"GET /{{owner}}/{{slug}}/refs, {conns} conn.", Stat(rate["refs"], "rate"),
                    "nginx fixed body", Stat(rate["nginx"], "rate"), ratios(rate["refs"], rate["nginx"]),
                    note=f"p99 {fmt_value(p99['refs'], 's')}")
        # CPU per request: what each answer costs, whatever the machine's
        # other load (all runs of both connection counts pooled).
        allr = {k: res[16][k] + res[64][k] for k in targets}
        cpu = {k: [(r["cpu_server_us"] + r["cpu_pg_us"]) / 1e6 for r in v] for k, v in allr.items()}
        cpu["nginx"] = [r["cpu_server_us"] / 1e6 for r in allr["nginx"]]
        cpu["git"] = [r["cpu_server_us"] / 1e6 for r in allr["git"]]

        def split(k: str) -> str:
            s_ = statistics.median(r["cpu_server_us"] for r in allr[k])
            p_ = statistics.median(r["cpu_pg_us"] for r in allr[k])
            return f"musehubd {s_:.1f} us + PostgreSQL {p_:.1f} us"
        for k, label in (("fetch", "fetch (cached)"), ("healthz", "GET /healthz"), ("refs", "GET refs")):
            sec.add(f"CPU per request: {label}", Stat(cpu[k]), "nginx fixed body", Stat(cpu["nginx"]),
                    ratios(cpu[k], cpu["nginx"]), note=split(k))
        sec.add("CPU per request: git info/refs (peer)", Stat(cpu["git"]),
                note="nginx + fcgiwrap + git-http-backend")
        wc = statistics.median(r["cores_wrk"] for r in allr["fetch"])
        sc = statistics.median(r["cores_server"] for r in allr["fetch"])
        pc = statistics.median(r["cores_pg"] for r in allr["fetch"])
        sec.add("cores busy during fetch runs", Stat([sc + pc + wc], "n"),
                note=f"musehubd {sc:.2f} + PostgreSQL {pc:.2f} + wrk {wc:.2f} of {os.cpu_count()}")
        if errors:
            sec.error = "wrk saw errors: " + "; ".join(errors)
        self.memory_row(sec)
        self.results["wrk"] = {str(c): d for c, d in res.items()}
        return sec

    def w_workers(self) -> Section:
        sec = Section("MUSEHUB_WORKERS=2 vs 1, same wrk load (64 connections), requests/s")
        one = self.fresh_server()
        slug, head = self.hot_repo(one)
        two = self.new_server(workers=2, name="musehubd-w2")
        try:
            body = msgpack.packb({"want": [head], "have": []}, use_bin_type=True)
            # Each worker builds its own answer cache: warm both (the kernel
            # spreads new connections over the SO_REUSEPORT sockets).
            for _ in range(8):
                c = Muse(two.url)
                c.fetch(slug, [head], [])
                c.close()
            targets = {"fetch": (f"/{OWNER}/{slug}/fetch", "POST", body),
                       "healthz": ("/healthz", "GET", None)}
            r1: dict[str, list[dict]] = {k: [] for k in targets}
            r2: dict[str, list[dict]] = {k: [] for k in targets}
            for rep in range(self.wrk_reps):
                for k, (path, method, b) in targets.items():
                    pair = ((one, r1), (two, r2)) if rep % 2 == 0 else ((two, r2), (one, r1))
                    for srv, acc in pair:
                        acc[k].append(self.wrk(srv.url, 64, method, path, b,
                                               lambda srv=srv: procs.group_pids(srv.proc.pid)))
            for k in targets:
                a1 = [r["rate"] for r in r1[k]]
                a2 = [r["rate"] for r in r2[k]]
                rat = ratios(a2, a1)
                eff1 = statistics.median(r["rate"] / max(1e-9, r["cores_server"]) for r in r1[k])
                eff2 = statistics.median(r["rate"] / max(1e-9, r["cores_server"]) for r in r2[k])
                sec.add(f"{k}: requests per server CPU-second, 2 workers", Stat([eff2], "rate"),
                        "1 worker", Stat([eff1], "rate"), Stat([eff2 / eff1], "x"),
                        note="equal = the workers would scale with free cores")
                cores = (f"cores busy: 1 worker {statistics.median(r['cores_server'] for r in r1[k]):.2f}"
                         f" / 2 workers {statistics.median(r['cores_server'] for r in r2[k]):.2f}"
                         f" (+ PostgreSQL {statistics.median(r['cores_pg'] for r in r2[k]):.2f},"
                         f" wrk {statistics.median(r['cores_wrk'] for r in r2[k]):.2f})")
                sec.add(f"{k}: 2 workers", Stat(a2, "rate"), "1 worker", Stat(a1, "rate"), rat,
                        target=">= 1.6x" if k == "fetch" else "",
                        ok=(rat.median >= 1.6) if k == "fetch" else None, note=cores)
            self.memory_row(sec, one, "peak RSS, 1 worker")
            self.memory_row(sec, two, "peak RSS, 2 workers (sum)")
            self.results["workers"] = {"one": r1, "two": r2}
        finally:
            two.stop()
        return sec

    def w_stores(self) -> Section:
        """The seed push and full fetch on each store, one server per store
        (same database), runs alternated; the fetches run on restarted
        servers, each on a repository never fetched (cold, like clone)."""
        dims = self.seed_dims
        sec = Section(f"s3 store (S3 emulator) vs fs store, {dims.label()}, 3 runs each "
                      "(musehubd = s3, peer = fs, ratio = s3 / fs)")
        kinds = ("s3", "fs")
        try:
            for kind in kinds:
                self.store_env(kind)
        except BenchError as e:
            sec.error = f"skipped: {e}"
            return sec
        n = 3
        hist = {(kind, k): self.history(dims, f"stores-{self.token}-{kind}-{k}")
                for kind in kinds for k in range(n)}
        packs = {key: h.pack() for key, h in hist.items()}
        push: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}
        pull: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}
        size = {kind: 0.0 for kind in kinds}

        def each(step: Callable[[str, int, Muse], dict[str, float]],
                 acc: dict[str, dict[str, list[float]]]) -> None:
            srvs = {kind: self.new_server(name=f"musehubd-{kind}", store=kind) for kind in kinds}
            try:
                cl = {kind: Muse(srvs[kind].url) for kind in kinds}
                for k in range(n):
                    for kind in (kinds if k % 2 == 0 else kinds[::-1]):
                        for key, v in step(kind, k, cl[kind]).items():
                            acc[kind].setdefault(key, []).append(v)
                for c in cl.values():
                    c.close()
            finally:
                for s in srvs.values():
                    s.stop()

        def push_one(kind: str, k: int, mu: Muse) -> dict[str, float]:
            mu.create_repo(f"stores-{kind}-{k}")
            return mu.push(f"stores-{kind}-{k}", packs[kind, k], hist[kind, k].head)

        def pull_one(kind: str, k: int, mu: Muse) -> dict[str, float]:
            t = mu.pull(f"stores-{kind}-{k}", [], expect_commits=dims.commits)
            size[kind] = t["bytes"]
            return t
        each(push_one, push)
        each(pull_one, pull)    # new processes: nothing of these repositories cached
        rows = [(push, "push: presign", "presign"), (push, "push: upload", "upload"),
                (push, "push: unpack", "unpack"),
                (push, "push: server time (refs + presign + unpack)", "server"),
                (push, "push: whole", "total"),
                (pull, "fetch: request to answer (cold)", "fetch"),
                (pull, f"fetch: download ({size['s3'] / 1e6:.1f} MB)", "download"),
                (pull, "fetch: whole (refs + fetch + download)", "total")]
        for acc, label, key in rows:
            s3, fs = acc["s3"][key], acc["fs"][key]
            sec.add(label, Stat(s3), "fs", Stat(fs), ratios(s3, fs))
        self.results["stores"] = {kind: {"push": {k: Stat(v).to_json() for k, v in push[kind].items()},
                                         "fetch": {k: Stat(v).to_json() for k, v in pull[kind].items()}}
                                  for kind in kinds}
        return sec

    def w_jobs(self) -> Section:
        sec = Section("background jobs (scripts/bench_jobs.py)")
        script = ROOT / "scripts" / "bench_jobs.py"
        if not script.exists():
            sec.error = "skipped: scripts/bench_jobs.py not present"
            return sec
        env = dict(os.environ)
        env["MUSEHUB_BENCH_DATABASE_URL"] = self.db_base
        env["MUSEHUB_BIN"] = self.binary
        cmd = [sys.executable, str(script), "--json", "--repeat", "1" if self.quick else "3"]
        r = run(cmd, timeout=900, env=env)
        try:
            res = json.loads(r.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError(f"bench_jobs.py printed no JSON:\n{r.stdout.decode()[-1000:]}")
        self.results["jobs"] = res
        for k, v in res.items():
            if "elapsed_ms" in v:
                note = f"{v.get('objects', '')} objects" + (f", {v['objects_per_s']:.0f} objects/s"
                                                            if "objects_per_s" in v else "")
                sec.add(f"{k} (job time)", Stat([v["elapsed_ms"] / 1000]), note=note)
            elif "seconds" in v:
                sec.add(f"{k} (job time)", Stat([v["seconds"]]),
                        note=f"read {v.get('bytes_read', 0) / 1e6:.1f} MB, wrote {v.get('bytes_written', 0) / 1e6:.1f} MB")
        return sec

    def growth(self, small: Dims, large: Dims) -> Section:
        """How cost grows from the seed history to the 10x one."""
        f = large.commits / small.commits
        sec = Section(f"growth from {small.commits} to {large.commits} commits ({f:g}x history; best run of each)")
        R = self.results

        def g(key: str, path: list[str]) -> tuple[float, float] | None:
            a, b = R.get(f"{key} {small.key()}"), R.get(f"{key} {large.key()}")
            if not a or not b:
                return None
            for p in path:
                a, b = a[p], b[p]
            # Best of N: the run least disturbed by the machine's other
            # load is the closest estimate of the cost itself.
            return a["min"], b["min"]

        rows = [("push: server time", "push", ["steps", "server"], f"<= {1.2 * f:g}x (linear)", 1.2 * f),
                ("push: whole", "push", ["steps", "total"], f"<= {1.2 * f:g}x (linear)", 1.2 * f),
                ("git push", "push", ["git"], "", None),
                ("clone: whole, cold", "clone", ["cold", "total"], f"<= {1.2 * f:g}x (linear)", 1.2 * f),
                ("git clone", "clone", ["git"], "", None),
                ("one-commit push", "incr", ["ours", "push"], "<= 1.5x (flat)", 1.5),
                ("one-commit fetch", "incr", ["ours", "fetch"], "<= 1.5x (flat)", 1.5),
                ("git one-commit fetch", "incr", ["git", "fetch"], "", None),
                ("no-op fetch", "incr", ["ours", "noop"], "<= 1.5x (flat)", 1.5)]
        for label, key, path, target, limit in rows:
            v = g(key, path)
            if v is None:
                continue
            a, b = v
            sec.add(label, Stat([b]), f"at {small.commits}", Stat([a]), Stat([b / a], "x"),
                    target=target, ok=(b / a <= limit) if limit else None)
        return sec

    def w_clients(self) -> Section:
        import clients_bench
        return clients_bench.w_clients(self, Section, Stat, ratios)

    def w_real(self) -> Section:
        import real_bench
        from muse.hub import HubError
        try:
            return real_bench.w_real(self, Section, Stat, ratios)
        except HubError as e:       # the client library's errors: a failed workload
            raise BenchError(str(e)) from e

    def w_memory(self) -> Section:
        import memory_bench
        from muse.hub import HubError
        try:
            return memory_bench.w_memory(self, Section, Stat, ratios)
        except HubError as e:
            raise BenchError(str(e)) from e

    # ------------------------------------------------------------ driver

    def run(self, only: list[str]) -> None:
        self.setup()
        plan: list[tuple[str, Callable[[], Section]]] = []
        large = Dims(self.seed_dims.commits * 10, *[getattr(self.seed_dims, k) for k in ("files", "changed", "blob")])
        for dims in ([self.seed_dims, large] if self.a.large else [self.seed_dims]):
            for w in ("push", "clone", "incr"):
                if w in only:
                    plan.append((f"{w} {dims.commits}", (lambda w=w, d=dims: getattr(self, f"w_{w}")(d))))
                if w == "push" and w in only:
                    plan.append((f"push breakdown {dims.commits}", (lambda d=dims: self.push_breakdown(d))))
        for w in ("stores", "latency", "wrk", "workers", "jobs", "clients", "real", "memory"):
            if w in only:
                plan.append((w, getattr(self, f"w_{w}")))
        if self.a.large and any(w in only for w in ("push", "clone", "incr")):
            plan.append(("growth", lambda: self.growth(self.seed_dims, large)))
        t_all = time.perf_counter()
        for name, fn in plan:
            self.log(f"{name} ...")
            t = time.perf_counter()
            try:
                sec = fn()
            except (BenchError, rawhttp.HTTPError, OSError, KeyError, ValueError) as e:
                self.failed = True
                tail = self.server.log_tail(15) if self.server else ""
                why = str(e)
                if self.server and self.server.proc and self.server.proc.poll() is not None:
                    why += f" (musehubd exited with {self.server.proc.returncode}; log {self.server.log_path})"
                sec = Section(name, error=f"FAILED: {type(e).__name__}: {why}")
                self.log(f"{name} FAILED: {e}\n{traceback.format_exc(limit=3)}"
                         f"{'server log tail:' + chr(10) + tail if tail else ''}")
            self.sections.append(sec)
            self.log(f"{name} done in {time.perf_counter() - t:.1f} s")
        self.elapsed = time.perf_counter() - t_all

    def cleanup(self) -> None:
        if self.server is not None:
            self.server.stop()
        REAPER.stop_all()
        if not self.a.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            self.log(f"kept {self.work}")

    # ------------------------------------------------------------ report

    def table(self) -> str:
        m = self.machine
        lines = [
            f"musehubd benchmarks  {time.strftime('%Y-%m-%d %H:%M')}  "
            f"({'quick' if self.quick else 'default'} run, {self.elapsed:.0f} s)",
            f"machine: {m.get('cores')} cores, {m.get('cpu')}, kernel {m.get('kernel')}, "
            f"PostgreSQL {m.get('postgresql')}, store {m.get('store')}",
            f"load average (1, 5, 15 min) at start {m.get('load')}, at end {machine_info()['load']}",
            f"history: {self.seed_dims.label()}; {self.reps} runs per figure unless noted;",
            "figures: median (min-max); ratio = ours / peer, median of back-to-back pairs",
            "",
        ]
        w = [44, 22, 36, 19, 17]
        head = (f"{'':{w[0]}} {'musehubd':>{w[1]}}  {'peer':<{w[2]}} {'ratio':>{w[3]}}  target")
        for sec in self.sections:
            lines.append(sec.title)
            if sec.rows:
                lines.append(head)
            for r in sec.rows:
                ours = r.ours.fmt() if r.ours else ""
                peer = f"{r.peer_label} {r.peer.fmt()}" if r.peer else r.peer_label
                rat = r.ratio.fmt() if r.ratio else ""
                verdict = "" if r.ok is None else ("ok" if r.ok else "MISS")
                tgt = f"{r.target} {verdict}".strip()
                line = (f"  {r.label:<{w[0] - 2}} {ours:>{w[1]}}  {peer:<{w[2]}} {rat:>{w[3]}}  {tgt:<{w[4]}}")
                if r.note:
                    line += f"  [{r.note}]"
                lines.append(line.rstrip())
            if sec.error:
                lines.append(f"  ! {sec.error}")
            lines.append("")
        return "\n".join(lines)

    def json_report(self) -> dict:
        def row(r: Row) -> dict:
            return {"label": r.label, "ours": r.ours.to_json() if r.ours else None,
                    "peer_label": r.peer_label, "peer": r.peer.to_json() if r.peer else None,
                    "ratio": r.ratio.to_json() if r.ratio else None, "target": r.target,
                    "ok": r.ok, "note": r.note}
        return {"machine": self.machine, "dims": self.seed_dims.__dict__, "quick": self.quick,
                "sections": [{"title": s.title, "error": s.error, "rows": [row(r) for r in s.rows]}
                             for s in self.sections], "raw": self.results}


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        load = "?"
    return {"cores": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(), "load": load}


def check_tools(only: list[str]) -> None:
    need = {"git"} if any(w in only for w in ("push", "clone", "incr", "latency", "wrk",
                                              "clients", "real")) else set()
    if any(w in only for w in ("push", "clone", "incr", "latency", "wrk", "clients", "real")):
        need |= {"nginx", "fcgiwrap"}
    if any(w in only for w in ("wrk", "workers")):
        need.add("wrk")
    missing = [t for t in sorted(need) if not shutil.which(t) and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)}: run `sh scripts/deps.sh --bench` "
                         f"(make bench does)")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="See the module docstring and docs/benchmarks.md.")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                    help="smoke run: 2 runs per figure, 1 s wrk runs (BENCH_QUICK=1)")
    ap.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                    help=f"comma-separated workloads among {','.join(WORKLOADS)} (BENCH_ONLY)")
    ap.add_argument("--large", action="store_true", default=os.environ.get("BENCH_LARGE") == "1",
                    help="also run push/clone/incr on a 10x history, and the memory "
                         "workload (BENCH_LARGE=1)")
    ap.add_argument("--store", choices=("fs", "s3"), default=os.environ.get("BENCH_STORE", "fs"),
                    help="musehubd's object store (BENCH_STORE)")
    ap.add_argument("--reps", type=int, default=env_int("BENCH_REPS", 0),
                    help="runs per figure (default 5, quick 2; BENCH_REPS)")
    ap.add_argument("--duration", type=float, default=0.0, help="seconds per wrk run (default 5, quick 1)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, repos)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the benchmarks: callgrind profiles of a push and of cached "
                         "fetches (scripts/bench/profile.py)")
    a = ap.parse_args(argv)
    if a.profile:
        import profile_server
        return profile_server.main(a)
    only = [w.strip() for w in a.only.split(",") if w.strip()] or \
        [w for w in WORKLOADS if w not in OPT_IN or a.large]
    bad = [w for w in only if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {', '.join(bad)}; choose among {', '.join(WORKLOADS)}")
    check_tools(only)
    b = Bench(a)
    code = 0
    try:
        b.run(only)
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything", file=sys.stderr)
        code = 130
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        code = 1
    finally:
        b.cleanup()
    if code:
        return code
    table = b.table()
    print(table)
    if a.json:
        rep = b.json_report()
        rep["table"] = table
        Path(a.json).write_text(json.dumps(rep, indent=1, default=str))
    if b.failed:
        print("bench: some workloads FAILED (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
