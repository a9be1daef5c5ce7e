"""clients_bench — the `clients` workload of scripts/bench.py: the
command-line clients a person runs (git2muse, muse-push, muse-fetch,
muse-mirror), as processes, on a real history (libuv's v1.x branch, from
the git bundle named by $BENCH_LIBUV_BUNDLE, by default
../shared/data/libuv-v1.x.bundle beside the repository), next to git over
smart HTTP in the same run.  Skipped when the bundle is absent.

The tools run as a person runs them: one process each, from bytecode
(PYTHONPYCACHEPREFIX under the work directory).

Every row with a target runs the tools' defaults (v2 packs, muse-fetch's
formats [1, 2]), as a person would.  Rows: git2muse of the whole history
(v2 and v1 packs); full push of the v2 plan (target) and, for comparison
only, of the v1 plan; upload throughput on loopback (the v1 plan's 296 MB,
the larger transfer); full clone of the v2 repository into a state
(`muse-fetch --state`, no checkout) vs `git clone --bare`; one new commit:
git2muse incremental, `muse-push --plan`, `muse-mirror` (convert + push in
one), vs `git push`, and the floor under any Python client (the same push
from scripts/bench/floor_push.py, which imports socket and json only);
each tool's peak RSS (VmHWM of its own address space,
read by a wrapper at exit).
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
    rss = work / f".rss-{name.replace('/', '_')}"
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

    # -- full push: v2 (the default) and v1, each to a new repository -----------
    P: dict[int, dict[str, list]] = {f: {"wall": [], "rss": [], "up_b": [], "up_s": []}
                                     for f in (1, 2)}
    theirs: list[float] = []
    gsize = 0
    for k in range(reps):
        def full_push(fmt: int) -> None:
            slug = f"uv{fmt}-{b.token}-{k}"
            args = ["--format", "1"] if fmt == 1 else []
            wall, kib, r = tool(work, "muse-push", *base, "--repo", slug, "--create", "--json",
                                "-q", *args, "--plan", str(plans[fmt]))
            P[fmt]["wall"].append(wall)
            P[fmt]["rss"].append(kib)
            for x in json_lines(r):
                if x.get("uploaded_bytes"):
                    P[fmt]["up_b"].append(x["uploaded_bytes"])
                    P[fmt]["up_s"].append(x["timings"]["upload"])

        def t() -> None:
            slug = f"uvg-{b.token}-{k}"
            bare = git.new_bare(slug, env)
            theirs.append(b.git_cmd("push", "-q", git.repo_url(slug), "v1.x:refs/heads/v1.x",
                                    cwd=str(src)))
            nonlocal gsize
            gsize = sum(p.stat().st_size for p in (bare / "objects" / "pack").glob("*.pack"))
        order = [lambda: full_push(2), lambda: full_push(1), t]
        for f in (order if k % 2 == 0 else order[::-1]):
            f()
    pbytes = {f: sum(e["size_bytes"] for e in json.loads(plans[f].read_text())["packs"])
              for f in (1, 2)}
    rat = ratios(P[2]["wall"], theirs)
    sec.add("full push (muse-push --plan, v2 packs: the default)", Stat(P[2]["wall"]),
            "git push", Stat(theirs), rat, target="<= git", ok=rat.median <= 1,
            note=f"{pbytes[2] / 1e6:.1f} MB of v2 packs; git pack {gsize / 1e6:.1f} MB")
    sec.add("muse-push peak RSS (full push)", Stat(P[2]["rss"], "kib"), note="VmHWM of the client")
    sec.add("  for comparison: v1 packs (--format 1)", Stat(P[1]["wall"]), "git push",
            Stat(theirs), ratios(P[1]["wall"], theirs),
            note=f"{pbytes[1] / 1e6:.0f} MB: raw blobs, the format before SPEC 2.1")
    up_b, up_s = P[1]["up_b"], P[1]["up_s"]
    tput = sum(up_b) / sum(up_s) if up_s and sum(up_s) > 0 else 0.0
    sec.add("upload throughput (loopback, fs store)", Stat([sum(up_s)]),
            target=">= 200 MB/s", ok=tput >= 200e6,
            note=f"{tput / 1e6:.0f} MB/s over {sum(up_b) / 1e6:.0f} MB of v1 packs "
                 f"(upload step only)")
    res["push_v2"] = {"ours": P[2]["wall"], "git": theirs, "rss_kib": P[2]["rss"]}
    res["push_v1"] = {"ours": P[1]["wall"], "git": theirs, "upload_Bps": tput,
                      "rss_kib": P[1]["rss"]}

    # -- full clone of the v2 repository (muse-fetch's default formats) ----------
    slug, gslug = f"uv2-{b.token}-0", f"uvg-{b.token}-0"
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
            theirs.append(b.git_cmd("clone", "-q", "--bare", git.repo_url(gslug), str(dest)))
        for f in ((o, t) if k % 2 == 0 else (t, o)):
            f()
    rat = ratios(ours, theirs)
    sec.add("full clone into a state (muse-fetch --state, v2 repository)", Stat(ours),
            "git clone --bare", Stat(theirs), rat, target="<= git", ok=rat.median <= 1,
            note="first run: the server builds the pack; later runs: its cache")
    sec.add("muse-fetch peak RSS (full clone)", Stat(rss_clone, "kib"), note="VmHWM of the client")
    res["clone"] = {"ours": ours, "git": theirs, "rss_kib": rss_clone}

    # -- one new commit ------------------------------------------------------------
    mslug = f"uvm-{b.token}"
    tool(work, "muse-mirror", *base, "--repo", mslug, "--git", str(src), "--create", "-q",
         "--work", str(work / "mirror"))
    conv, push, mirror, gpush, rss_one = [], [], [], [], []
    n = 3 if b.quick else 5
    for k in range(n):
        conv.append(one_git_commit(b, work, src, k, work / "g2m-v2"))

        def o() -> None:
            wall, kib, r = tool(work, "muse-push", *base, "--repo", slug, "-q", "--json",
                                "--plan", str(plans[2]))
            sent = [x for x in json_lines(r) if not x.get("up_to_date")]
            if len(sent) != 1 or sent[0]["sent"]["commits"] != 1:
                raise BenchError(f"one-commit push sent {sent}")
            push.append(wall)
            rss_one.append(kib)

        def t() -> None:
            gpush.append(b.git_cmd("push", "-q", git.repo_url(gslug), "v1.x:refs/heads/v1.x",
                                   cwd=str(src)))
        for fn in ((o, t) if k % 2 == 0 else (t, o)):
            fn()
        wall, _, r = tool(work, "muse-mirror", *base, "--repo", mslug, "--git", str(src),
                          "--json", "-q", "--work", str(work / "mirror"))
        out = json.loads(r.stdout.decode())
        if [p["commits"] for p in out["pushed"]] != [1]:
            raise BenchError(f"one-commit mirror pushed {out['pushed']}")
        mirror.append(wall)
    # The floor: the same one-commit push from a Python process that imports
    # socket and json only and sends the four requests as bare HTTP/1.1
    # (scripts/bench/floor_push.py): the interpreter's start plus the
    # server's four answers, which no Python client goes under.
    floor = []
    for k in range(n, 2 * n):
        one_git_commit(b, work, src, k, work / "g2m-v2")
        wall, _, r = tool(work, "bench/floor_push.py", srv.url, "bench", slug, str(plans[2]))
        if json.loads(r.stdout.decode()).get("commits_written") != 1:
            raise BenchError(f"floor push wrote {r.stdout.decode()[:200]}")
        floor.append(wall)
    rat = ratios(push, gpush)
    sec.add("one new commit: git2muse (incremental)", Stat(conv))
    ps = Stat(push)
    sec.add("one new commit: muse-push --plan (v2)", ps, "git push", Stat(gpush), rat,
            target="<= 0.3 s and <= git", ok=ps.median <= 0.3 and rat.median <= 1,
            note="whole process: start, refs, presign, upload, unpack")
    # Not back-to-back with git's pushes (they ran in the loop above): the
    # ratio of the medians.
    sec.add("  floor: python3 + the four requests, raw socket", Stat(floor), "git push",
            Stat(gpush), Stat([statistics.median(floor) / statistics.median(gpush)], "x"),
            note="scripts/bench/floor_push.py: no HTTP library, no options, no plan; "
                 "what no Python client goes under; ratio of medians")
    sec.add("one new commit: muse-mirror (convert + push)", Stat(mirror), "git push",
            Stat(gpush), ratios(mirror, gpush))
    sec.add("muse-push peak RSS (one commit)", Stat(rss_one, "kib"))
    res["one_commit"] = {"git2muse": conv, "push": push, "mirror": mirror, "git": gpush,
                         "floor": floor}
    b.results["clients"] = res
    shutil.rmtree(work, ignore_errors=True)
    return sec
