#!/usr/bin/python3
"""bench_unpack.py — server-side unpack throughput, CPU and peak memory of
one pack, measured from outside (a benchmark, not a test).

    /usr/bin/python3 scripts/bench_unpack.py [--store fs|s3] [--runs N]
        [--pack-memory BYTES] [--env NAME=VALUE ...] PACK [PACK ...]

PACK is an mpack file (any version) with a head: either a git2muse /
musegen output directory's push.json entry (give the .mpack file next to
its push.json) or a file written by `musegen` whose JSON line was saved
as FILE.json. For each pack and run: a fresh database and store, a fresh
musehubd (build/musehubd, or $MUSEHUB_BIN), presign + upload (not
measured), then the unpack request alone: its wall time, the server's CPU
(utime + stime from /proc/<pid>/stat, all threads, over the request), the
elapsed_ms the server reports, and the server's VmHWM (peak RSS) after
the unpack and before it. Throughput = pack bytes / unpack wall time.
Prints one line per run and the median per pack.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import muselib  # noqa: E402
import pgtmp  # noqa: E402
import s3emu  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of the whole process (all threads), seconds."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def pack_head(path: Path) -> str:
    side = path.with_suffix(path.suffix + ".json")
    if side.exists():
        return json.loads(side.read_text())["head"]
    plan = json.loads((path.parent / "push.json").read_text())
    for p in plan["packs"]:
        if p["file"] == path.name:
            return p["head"]
    raise SystemExit(f"{path}: no head (push.json entry or {side.name})")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    import httpx
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit("musehubd exited during start-up")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit("musehubd did not become healthy")


def run_one(args, pg: str, emu: dict | None, pack: Path, head: str, n: int, work: Path) -> dict:
    data = pack.read_bytes()
    key = muselib.blob_id(data)
    db = pgtmp.createdb(pg, f"bench_unpack_{os.getpid()}_{n}")
    store = work / f"store-{n}"
    store.mkdir()
    port = pgtmp.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSEHUB_")}
    env.update({"MUSEHUB_LISTEN": f"127.0.0.1:{port}", "MUSEHUB_DATABASE_URL": db,
                "MUSEHUB_STORE": f"fs:{store}", "MUSEHUB_DEV_IDENTITY": "bench",
                "MUSEHUB_LOG_LEVEL": "warn", "MUSEHUB_JOBS": "0"})
    if emu:
        env.update({"MUSEHUB_STORE": f"s3:{emu['bucket']}", "MUSEHUB_S3_ENDPOINT": emu["endpoint"],
                    "MUSEHUB_S3_ACCESS_KEY": s3emu.ACCESS_KEY, "MUSEHUB_S3_SECRET_KEY": s3emu.SECRET_KEY,
                    "MUSEHUB_S3_PATH_STYLE": "1"})
    if args.pack_memory:
        env["MUSEHUB_PACK_MEMORY"] = str(args.pack_memory)
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v
    binary = os.environ.get("MUSEHUB_BIN", str(ROOT / "build" / "musehubd"))
    log = open(work / f"server-{n}.log", "wb")
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=log, cwd=str(work))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        with muselib.Hub(url, timeout=600) as hub:
            slug = hub.create_repo("bench", f"u{n}")["slug"]
            pre = hub.presign("bench", slug, key, len(data))
            hub.upload(pre["upload_url"], data)
            del data
            hwm0 = proc_kib(proc.pid, "VmHWM")
            cpu0, t0 = proc_cpu(proc.pid), time.monotonic()
            r = hub.raw("POST", f"/bench/{slug}/push/unpack-mpack",
                        {"mpack_key": key, "branch": "main", "head": head})
            wall = time.monotonic() - t0
            cpu = proc_cpu(proc.pid) - cpu0
            res = muselib.decode_body(r)
            if r.status_code != 200:
                raise SystemExit(f"unpack: {r.status_code} {res}")
        return {"wall": wall, "cpu": cpu, "server_ms": res["elapsed_ms"],
                "hwm_before": hwm0 * 1024, "hwm": proc_kib(proc.pid, "VmHWM") * 1024,
                "bytes": pack.stat().st_size, "objects": res["objects_written"]}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            shutil.copy(work / f"server-{n}.log", Path(args.keep_logs) / f"{pack.name}-{n}.log")
        pgtmp.psql(pg, sql=f"DROP DATABASE IF EXISTS bench_unpack_{os.getpid()}_{n}")
        shutil.rmtree(store, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packs", nargs="+", type=Path)
    ap.add_argument("--store", choices=("fs", "s3"), default="fs")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pack-memory", type=int, default=0, help="MUSEHUB_PACK_MEMORY (default: the server's)")
    ap.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the server")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy each run's server log into DIR")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-unpack-", dir="/tmp"))
    work.chmod(0o755)  # the postgres user must reach the cluster's directory
    pgdir = work / "pg"
    pg = pgtmp.start(str(pgdir))
    emu, emu_proc = None, None
    try:
        if args.store == "s3":
            why = s3emu.available()
            if why:
                raise SystemExit(f"s3: {why}")
            endpoint, emu_proc = s3emu.start(str(work / "s3"), "bench-unpack")
            emu = {"endpoint": endpoint, "bucket": "bench-unpack"}
        n = 0
        for pack in args.packs:
            head = pack_head(pack)
            rows = []
            for _ in range(args.runs):
                n += 1
                r = run_one(args, pg, emu, pack, head, n, work)
                rows.append(r)
                print(f"{pack.name}: {r['bytes'] / 1e6:.1f} MB, {r['objects']} objects: unpack {r['wall'] * 1000:.0f} ms"
                      f" ({r['bytes'] / 1e6 / r['wall']:.0f} MB/s; server says {r['server_ms']} ms),"
                      f" server CPU {r['cpu'] * 1000:.0f} ms, VmHWM {r['hwm_before'] / 2**20:.1f} ->"
                      f" {r['hwm'] / 2**20:.1f} MiB", flush=True)
            med = lambda k: statistics.median(x[k] for x in rows)  # noqa: E731
            print(f"== {pack.name} [{args.store}] median of {len(rows)}: {med('bytes') / 1e6 / med('wall'):.0f} MB/s,"
                  f" unpack {med('wall') * 1000:.0f} ms, CPU {med('cpu') * 1000:.0f} ms,"
                  f" VmHWM {med('hwm') / 2**20:.1f} MiB", flush=True)
    finally:
        if emu_proc:
            s3emu.stop(emu_proc)
        pgtmp.destroy(str(pgdir))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
