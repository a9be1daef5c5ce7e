"""clients_bench — the `clients` workload of scripts/bench.py: the
command-line clients a person runs (git2muse, muse-push, muse-fetch,
muse-mirror), as processes, on a real history (libuv's v1.x branch, from
the git bundle named by $BENCH_LIBUV_BUNDLE, by default
../shared/data/libuv-v1.x.bundle beside the repository), next to git over
smart HTTP in the same run.  Skipped when the bundle is absent.

The tools run as a person runs them: one process each, from bytecode
(PYTHONPYCACHEPREFIX under the work directory).

Rows: git2muse of the whole history (v2 and v1 packs); full push (v1 until
the server reads v2; v2 tried and reported); full clone into a state
(`muse-fetch --state`, no checkout) vs `git clone --bare`; one new commit:
git2muse incremental, `muse-push --plan`, `muse-mirror` (convert + push in
one), vs `git push`; upload throughput on loopback; each tool's peak RSS
(VmHWM of its own address space, read by a wrapper at exit).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from procs import BenchError, run

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
PY = "/usr/bin/python3"

def bundle_path() -> Path:
    return Path(os.environ.get("BENCH_LIBUV_BUNDLE") or
                ROOT.parent / "shared" / "data" / "libuv-v1.x.bundle")


def tool(work: Path, name: str, *args: str, check: bool = True,
         timeout: float = 1800) -> tuple[float, int, Any]:
    """Run a client tool; (wall s, peak RSS KiB, CompletedProcess)."""
    rss = work / f".rss-{name}"
    # Installed tools run from bytecode; the cache goes under the work
    # directory so that scripts/ stays clean.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(RSS_OUT=str(rss), PYTHONPYCACHEPREFIX=str(work.parent / "pycache"))
    t = time.perf_counter()
    r = run([PY, str(SCRIPTS / "rsswrap.py"), str(SCRIPTS / name), *args], timeout=timeout,
            env=env, check=check)
    wall = time.perf_counter() - t
    kib = int(rss.read_text()) if rss.exists() else 0
    return wall, kib, r


def libuv_clone(b: Any, sec: Any, name: str) -> tuple[Path, Path, int] | None:
    """A fresh work directory b.work/name holding a clone of the bundle's
    v1.x branch; (work directory, clone, number of commits), its commit
    count added to sec's title.  None, with a `skipped` row in sec, when
    the bundle is absent."""
    bundle = bundle_path()
    if not bundle.exists():
        sec.add("skipped", note=f"{bundle} is absent")
        return None
    work = b.work / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    src = work / "libuv"
    run(["git", "clone", "-q", "-b", "v1.x", str(bundle), str(src)], timeout=600, env=b.git_env)
    n = len(run(["git", "-C", str(src), "rev-list", "HEAD"], timeout=60,
                env=b.git_env).stdout.split())
    sec.title += f" ({n} commits)"
    return work, src, n


def one_git_commit(b: Any, work: Path, src: Path, k: int, out: Path, *g2m: str) -> float:
    """Commit number k (one file changed) in the git clone src, then
    convert it with git2muse (incremental, into out; g2m: more options);
    returns git2muse's wall time in seconds."""
    f = src / "bench-one-commit.txt"
    f.write_text(f"one more line {k}\n" * (k + 1))
    run(["git", "-C", str(src), "add", "-A"], timeout=60, env=b.git_env)
    run(["git", "-C", str(src), "commit", "-q", "-m", f"bench commit {k}"], timeout=60,
        env=b.git_env)
    wall, _, _ = tool(work, "git2muse", "--repo", str(src), "--out-dir", str(out), *g2m, "-q")
    return wall


def json_lines(r: Any) -> list[dict]:
    return [json.loads(ln) for ln in r.stdout.decode().splitlines() if ln.strip().startswith("{")]


def w_clients(b: Any, Section: Any, Stat: Any, ratios: Any) -> Any:
    """The workload (b: the Bench; the table types are passed in)."""
    sec = Section("clients on a real history: libuv v1.x")
    got = libuv_clone(b, sec, "clients")
    if got is None:
        return sec
    work, src, n_commits = got
    env = b.git_env
    res: dict[str, Any] = {"commits": n_commits}
    reps = 1 if b.quick else 2

    # -- conversion ------------------------------------------------------------
    plans = {}
    for fmt in (2, 1):
        out = work / f"g2m-v{fmt}"
        wall, kib, r = tool(work, "git2muse", "--repo", str(src), "--out-dir", str(out),
                            "--format", str(fmt), "-q")
        info = json.loads(r.stdout.decode().splitlines()[-1])
        plans[fmt] = out / "push.json"
        sec.add(f"git2muse, whole history, v{fmt} packs", Stat([wall]),
                note=f"{info['bytes'] / 1e6:.1f} MB in {info['packs']} pack(s); "
                     f"peak RSS {kib / 1024:.0f} MiB")
        res[f"git2muse_v{fmt}"] = {"s": wall, "bytes": info["bytes"], "rss_kib": kib}

    git = b.git_http()
    srv = b.fresh_server()
    base = ["--url", srv.url, "--owner", "bench"]

    # -- full push ---------------------------------------------------------------
    ours, theirs, up_s, up_b, rss_push = [], [], [], [], []
    gsize = 0
    for k in range(reps):
        slug = f"uv-{b.token}-{k}"

        def o() -> None:
            wall, kib, r = tool(work, "muse-push", *base, "--repo", slug, "--create", "--json",
                                "-q", "--format", "1", "--plan", str(plans[1]))
            ours.append(wall)
            rss_push.append(kib)
            for x in json_lines(r):
                if x.get("uploaded_bytes"):
                    up_b.append(x["uploaded_bytes"])
                    up_s.append(x["timings"]["upload"])

        def t() -> None:
            bare = git.new_bare(slug, env)
            theirs.append(b.git_cmd("push", "-q", git.repo_url(slug), "v1.x:refs/heads/v1.x",
                                    cwd=str(src)))
            nonlocal gsize
            gsize = sum(p.stat().st_size for p in (bare / "objects" / "pack").glob("*.pack"))
        for f in ((o, t) if k % 2 == 0 else (t, o)):
            f()
    v1_bytes = json.loads(plans[1].read_text())
    v1_bytes = sum(e["size_bytes"] for e in v1_bytes["packs"])
    rat = ratios(ours, theirs)
    sec.add("full push, v1 packs (muse-push --plan)", Stat(ours), "git push", Stat(theirs), rat,
            target="<= git", ok=rat.median <= 1,
            note=f"{v1_bytes / 1e6:.0f} MB of v1 packs; git pack {gsize / 1e6:.1f} MB")
    tput = sum(up_b) / sum(up_s) if up_s and sum(up_s) > 0 else 0.0
    sec.add("upload throughput (loopback, fs store)", Stat([sum(up_s)]),
            target=">= 200 MB/s", ok=tput >= 200e6,
            note=f"{tput / 1e6:.0f} MB/s over {sum(up_b) / 1e6:.0f} MB (upload step only)")
    sec.add("muse-push peak RSS (full push)", Stat(rss_push, "kib"), note="VmHWM of the client")
    res["push_v1"] = {"ours": ours, "git": theirs, "upload_Bps": tput, "rss_kib": rss_push}
    # v2, when the server reads it
    slug2 = f"uv2-{b.token}"
    wall, kib, r = tool(work, "muse-push", *base, "--repo", slug2, "--create", "--json", "-q",
                        "--format", "2", "--plan", str(plans[2]), check=False)
    if r.returncode == 0:
        rat2 = ratios([wall], [statistics.median(theirs)])
        sec.add("full push, v2 packs", Stat([wall]), "git push", Stat([statistics.median(theirs)]),
                rat2, target="<= git", ok=rat2.median <= 1,
                note=f"{res['git2muse_v2']['bytes'] / 1e6:.1f} MB; peak RSS {kib / 1024:.0f} MiB")
        res["push_v2"] = {"ours": wall, "rss_kib": kib}
    else:
        why = r.stderr.decode(errors="replace").strip().splitlines()[-1:]
        sec.add("full push, v2 packs", note=f"not run: {why[0] if why else r.returncode}")

    # -- full clone --------------------------------------------------------------
    slug = f"uv-{b.token}-0"
    ours, theirs, rss_clone = [], [], []
    for k in range(reps):
        st = work / f"state-{k}"
        dest = work / "git-clone"

        def o() -> None:
            shutil.rmtree(st, ignore_errors=True)
            wall, kib, r = tool(work, "muse-fetch", *base, "--repo", slug, "--state", str(st),
                                "--branch", "v1.x", "--json", "-q")
            ours.append(wall)
            rss_clone.append(kib)

        def t() -> None:
            shutil.rmtree(dest, ignore_errors=True)
            theirs.append(b.git_cmd("clone", "-q", "--bare", git.repo_url(slug), str(dest)))
        for f in ((o, t) if k % 2 == 0 else (t, o)):
            f()
    rat = ratios(ours, theirs)
    sec.add("full clone into a state (muse-fetch --state)", Stat(ours), "git clone --bare",
            Stat(theirs), rat, target="<= git", ok=rat.median <= 1,
            note="first run: the server builds the pack; later runs: its cache")
    sec.add("muse-fetch peak RSS (full clone)", Stat(rss_clone, "kib"), note="VmHWM of the client")
    res["clone"] = {"ours": ours, "git": theirs, "rss_kib": rss_clone}

    # -- one new commit ------------------------------------------------------------
    slug = f"uv-{b.token}-0"
    mslug = f"uvm-{b.token}"
    tool(work, "muse-mirror", *base, "--repo", mslug, "--git", str(src), "--create", "-q",
         "--format", "1", "--work", str(work / "mirror"))
    conv, push, mirror, gpush, rss_one = [], [], [], [], []
    n = 3 if b.quick else 5
    for k in range(n):
        conv.append(one_git_commit(b, work, src, k, work / "g2m-v1", "--format", "1"))

        def o() -> None:
            wall, kib, r = tool(work, "muse-push", *base, "--repo", slug, "-q", "--json",
                                "--format", "1", "--plan", str(plans[1]))
            sent = [x for x in json_lines(r) if not x.get("up_to_date")]
            if len(sent) != 1 or sent[0]["sent"]["commits"] != 1:
                raise BenchError(f"one-commit push sent {sent}")
            push.append(wall)
            rss_one.append(kib)

        def t() -> None:
            gpush.append(b.git_cmd("push", "-q", git.repo_url(slug), "v1.x:refs/heads/v1.x",
                                   cwd=str(src)))
        for fn in ((o, t) if k % 2 == 0 else (t, o)):
            fn()
        wall, _, r = tool(work, "muse-mirror", *base, "--repo", mslug, "--git", str(src),
                          "--json", "-q", "--format", "1", "--work", str(work / "mirror"))
        out = json.loads(r.stdout.decode())
        if [p["commits"] for p in out["pushed"]] != [1]:
            raise BenchError(f"one-commit mirror pushed {out['pushed']}")
        mirror.append(wall)
    rat = ratios(push, gpush)
    sec.add("one new commit: git2muse (incremental)", Stat(conv))
    ps = Stat(push)
    sec.add("one new commit: muse-push --plan", ps, "git push", Stat(gpush), rat,
            target="<= 0.3 s and <= git", ok=ps.median <= 0.3 and rat.median <= 1,
            note="whole process: start, refs, presign, upload, unpack")
    sec.add("one new commit: muse-mirror (convert + push)", Stat(mirror), "git push",
            Stat(gpush), ratios(mirror, gpush))
    sec.add("muse-push peak RSS (one commit)", Stat(rss_one, "kib"))
    res["one_commit"] = {"git2muse": conv, "push": push, "mirror": mirror, "git": gpush}
    b.results["clients"] = res
    shutil.rmtree(work, ignore_errors=True)
    return sec
