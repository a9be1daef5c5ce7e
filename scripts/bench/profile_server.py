"""profile_server — `scripts/bench.py --profile`: where musehubd's
instructions go in a push, a cold full fetch and cached fetches, measured
with valgrind's callgrind.  Instruction counts do not depend on the other
load of a shared machine, so two profiles can be compared across runs.

The server runs under `valgrind --tool=callgrind` (all threads, the libuv
thread pool included, summed into one profile).  For each phase the
counters are zeroed with `callgrind_control -z` and dumped with
`callgrind_control -d` afterwards, so a dump holds that phase only:

  push          GET refs, presign, PUT (5 MB), unpack of the seed history
  cold-fetch    one fetch of the whole history (builds and stores the pack)
  cached-fetch  N fetches answered from the per-process cache

Each dump is summarised with callgrind_annotate (exclusive and inclusive
instruction counts per function); files are kept in --profile-dir
(default /tmp/musehub-profile).  Only PostgreSQL's work is not in these
counts: it runs in other processes.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

import muselib
import pgtmp
import procs
import rawhttp
from museclient import MSGPACK, OWNER, Muse
from procs import REAPER, BenchError, Musehubd, run

ROOT = Path(__file__).resolve().parents[2]


def ctl(pid: int, *args: str) -> None:
    """callgrind_control, poking the server with a request meanwhile: a
    process blocked in epoll_wait only answers once it runs again."""
    p = REAPER.popen("callgrind_control", ["callgrind_control", *args, str(pid)],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    port = ctl.port
    while p.poll() is None and time.monotonic() < deadline:
        try:
            c = rawhttp.Connection("127.0.0.1", port, timeout=5)
            c.request("GET", "/healthz")
            c.close()
        except (rawhttp.HTTPError, OSError):
            pass
        time.sleep(0.2)
    if p.poll() is None:
        procs.Reaper.kill_group(p)
        raise BenchError(f"callgrind_control {' '.join(args)} did not answer")
    out = p.stdout.read().decode(errors="replace")
    REAPER.forget(p)
    if p.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)} failed: {out}")


ctl.port = 0


def annotate(path: Path, top: int, inclusive: bool) -> str:
    """The `top` costliest functions of a dump (callgrind_annotate)."""
    args = ["callgrind_annotate", "--threshold=100", "--auto=no"]
    if inclusive:
        args.append("--inclusive=yes")
    r = run(args + [str(path)], timeout=300)
    out, started = [], False
    for ln in r.stdout.decode(errors="replace").splitlines():
        if ln.strip().endswith("PROGRAM TOTALS"):
            out.append(ln)
        elif "file:function" in ln:
            started = True
        elif started and ln.strip() and not ln.startswith("---"):
            out.append(ln)
            if len(out) > top:
                break
    return "\n".join(out)


def pg_summary(text: str, top: int = 8) -> str:
    """PostgreSQL's statement log (log_min_duration_statement = 0) summed
    per statement text, longest first."""
    acc: dict[str, list[float]] = {}
    for m in re.finditer(r"duration: ([0-9.]+) ms\s+(?:statement|execute [^:]*|bind [^:]*|parse [^:]*): (.*)", text):
        acc.setdefault(m.group(2)[:160], []).append(float(m.group(1)))
    rows = sorted(acc.items(), key=lambda kv: -sum(kv[1]))
    total = sum(sum(v) for v in acc.values())
    out = [f"{total:9.2f} ms  all ({sum(len(v) for v in acc.values())} log lines)"]
    out += [f"{sum(v):9.2f} ms  {len(v):4d}x  {k}" for k, v in rows[:top]]
    return "\n".join(out)


def find_dump(outdir: Path, before: set[Path]) -> Path:
    new = sorted(set(outdir.glob("callgrind.out*")) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise BenchError(f"no new callgrind dump in {outdir}")
    return new[-1]


def main(a) -> int:
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if not shutil.which(tool):
            print(f"bench --profile: {tool} missing: run `sh scripts/deps.sh --bench`", file=sys.stderr)
            return 1
    outdir = Path(os.environ.get("BENCH_PROFILE_DIR", "/tmp/musehub-profile"))
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    procs.janitor()
    work = Path(tempfile.mkdtemp(prefix="musehub-prof-", dir="/tmp"))
    os.chmod(work, 0o755)
    REAPER.attach(work)
    binary = os.environ.get("MUSEHUB_BIN", str(ROOT / "build" / "musehubd"))
    n_fetch = 200 if a.quick else 2000
    commits = int(os.environ.get("BENCH_COMMITS") or 1031)
    files = int(os.environ.get("BENCH_FILES") or 700)
    changed = int(os.environ.get("BENCH_CHANGED") or 5)
    blob = int(os.environ.get("BENCH_BLOB") or 512)
    srv = None
    try:
        db = pgtmp.createdb(procs.start_postgres(str(work / "pg")), "prof")
        (work / "store").mkdir()
        env = {"MUSEHUB_DATABASE_URL": db, "MUSEHUB_STORE": f"fs:{work / 'store'}",
               "MUSEHUB_DEV_IDENTITY": OWNER, "MUSEHUB_LOG_LEVEL": "warn",
               "MUSEHUB_RATE_PUSH": "0", "MUSEHUB_RATE_FETCH": "0",
               # valgrind runs everything ~50x slower
               "MUSEHUB_REQUEST_TIMEOUT_MS": "600000", "MUSEHUB_QUERY_TIMEOUT_MS": "600000"}
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={outdir}/callgrind.out.%p",
                   "--dump-line=no", "--separate-threads=no"]
        h = muselib.generate(commits=commits, files=files, changed=changed, blob_size=blob)
        pack = h.pack()
        srv = Musehubd(binary, work, env, wrapper=wrapper, start_timeout=300, name="musehubd-callgrind").start()
        ctl.port = srv.port
        pid = srv.proc.pid
        mu = Muse(srv.url)
        mu.create_repo("prof")
        results = []

        pglog = work / "pg" / "postgres.log"
        pgtmp.psql(db, sql="ALTER SYSTEM SET log_min_duration_statement = 0")
        pgtmp.psql(db, sql="SELECT pg_reload_conf()")
        pg_stmts: dict[str, str] = {}

        def phase(name: str, fn) -> None:
            before = set(outdir.glob("callgrind.out*"))
            ctl(pid, "-z")
            off = pglog.stat().st_size
            t = time.perf_counter()
            fn()
            wall = time.perf_counter() - t
            time.sleep(0.2)
            pg_stmts[name] = pg_summary(pglog.read_bytes()[off:].decode(errors="replace"))
            ctl(pid, "-d", name)
            dump = find_dump(outdir, before)
            target = outdir / f"{name}.callgrind"
            dump.rename(target)
            results.append((name, target, wall))
            print(f"profile: {name} done ({wall:.1f} s under callgrind) -> {target}", file=sys.stderr)

        phase("push", lambda: mu.push("prof", pack, h.head))
        phase("cold-fetch", lambda: mu.pull("prof", [], expect_commits=commits))
        body = msgpack.packb({"want": [h.head], "have": []}, use_bin_type=True)

        def cached() -> None:
            c = rawhttp.Connection("127.0.0.1", srv.port, timeout=60)
            for _ in range(n_fetch):
                r = c.request("POST", f"/{OWNER}/prof/fetch", body,
                              {"Content-Type": MSGPACK, "Accept": MSGPACK})
                if r.status != 200:
                    raise BenchError(f"cached fetch -> {r.status}")
            c.close()
        phase("cached-fetch", cached)
        # One more commit: what an incremental push and fetch cost, and
        # whether that grows with the history (compare BENCH_COMMITS=10310).
        c = muselib.generate(commits=1, files=files, changed=changed, blob_size=blob,
                             parent=(h.head, h.manifest), first_index=commits)
        cpack = c.pack()
        phase("incr-push", lambda: mu.push("prof", cpack, c.head))
        phase("incr-fetch", lambda: mu.pull("prof", [h.head], expect_commits=1))
        mu.close()
        report = []
        for name, path, wall in results:
            per = f" (per request: divide by {n_fetch})" if name == "cached-fetch" else ""
            report.append(f"=== {name}{per}: {path}\n--- exclusive\n{annotate(path, 25, False)}\n"
                          f"--- inclusive\n{annotate(path, 25, True)}\n"
                          f"--- PostgreSQL statements (duration, native)\n{pg_stmts.get(name, '')}\n")
        text = "\n".join(report)
        (outdir / "summary.txt").write_text(text)
        print(text)
        return 0
    except KeyboardInterrupt:
        print("profile: interrupted", file=sys.stderr)
        return 130
    except (BenchError, rawhttp.HTTPError, OSError) as e:
        print(f"profile: {e}", file=sys.stderr)
        if srv is not None:
            print(srv.log_tail(), file=sys.stderr)
        return 1
    finally:
        if srv is not None:
            srv.stop(timeout=120)
        REAPER.stop_all()
        shutil.rmtree(work, ignore_errors=True)
