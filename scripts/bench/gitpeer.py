"""gitpeer — the git side of `make bench`: the same history as a git
repository, and git smart HTTP (git-http-backend behind nginx + fcgiwrap)
to push it to and clone it from.

The history is muselib.generate's (seed 000's `_populate`) written as a
`git fast-import` stream: FILES base files src/file_NNNN.py whose content
is f"{seed}base-{i:06d}" + b"x"*BLOB, then commit i sets CHANGED files
((i*CHANGED + j) % FILES) to f"{seed}commit-{i:05d}-file-{j}" + b"y"*BLOB
on top of the *base* tree (so the previous commit's files revert), message
f"{seed}commit-{i:05d}", author gabriel, time 2026-01-01 + 60 s * i.
Same files, same contents, same changes per commit as the mpack.

One nginx serves both peers (scripts/bench/nginx.conf.in): the static
body and /git/.  All git commands run with an empty HOME and no system
config, so nothing on the machine changes what they do.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import procs
from procs import REAPER, BenchError, run

HERE = Path(__file__).resolve().parent
EPOCH = 1767225600          # 2026-01-01T00:00:00Z, muselib.SEED_EPOCH
STATIC_BODY_BYTES = 200


def fast_import_stream(commits: int, files: int, changed: int, blob: int,
                       seed: str = "", branch: str = "main", extra: int = 0) -> bytes:
    """The fast-import stream of the history (marks :1.. are blobs of the
    base files, commit i has mark :(files + 1 + i)), then `extra` commits
    for incremental pushes, shaped like muselib.generate(commits=1,
    parent=...) builds them: CHANGED files on top of the previous commit's
    tree (no revert), so muse and git change the same files."""
    pre = f"{seed}:" if seed else ""
    out: list[bytes] = []
    for i in range(files):
        data = f"{pre}base-{i:06d}".encode() + b"x" * blob
        out.append(b"blob\nmark :%d\ndata %d\n%s\n" % (i + 1, len(data), data))
    prev: list[int] = []
    for i in range(commits + extra):
        idxs = [(i * changed + j) % files for j in range(changed)]
        ts = EPOCH + 60 * i
        msg = f"{pre}commit-{i:05d}".encode()
        out.append(b"commit refs/heads/%s\nmark :%d\n" % (branch.encode(), files + 1 + i))
        out.append(b"author gabriel <gabriel@muse.invalid> %d +0000\n" % ts)
        out.append(b"committer gabriel <gabriel@muse.invalid> %d +0000\n" % ts)
        out.append(b"data %d\n%s\n" % (len(msg), msg))
        if i == 0:
            reset = range(files)
        else:
            out.append(b"from :%d\n" % (files + i))
            reset = [k for k in prev if k not in idxs] if i < commits else []
        for k in reset:
            if k not in idxs:
                out.append(b"M 100644 :%d src/file_%04d.py\n" % (k + 1, k))
        for j, k in enumerate(idxs):
            data = f"{pre}commit-{i:05d}-file-{j}".encode() + b"y" * blob
            out.append(b"M 100644 inline src/file_%04d.py\ndata %d\n%s\n" % (k, len(data), data))
        out.append(b"\n")
        prev = idxs
    out.append(b"done\n")
    return b"".join(out)


def git_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
                "GIT_AUTHOR_NAME": "gabriel", "GIT_AUTHOR_EMAIL": "gabriel@muse.invalid",
                "GIT_COMMITTER_NAME": "gabriel", "GIT_COMMITTER_EMAIL": "gabriel@muse.invalid",
                "LC_ALL": "C"})
    return env


class GitRepo:
    """A local repository holding the history (the pushing client)."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path, self.env = path, env
        self.commits: list[str] = []      # commit ids, oldest first

    def git(self, *args: str, timeout: float = 300) -> str:
        r = run(["git", *args], timeout=timeout, cwd=str(self.path), env=self.env)
        return r.stdout.decode()

    @classmethod
    def build(cls, path: Path, env: dict[str, str], commits: int, files: int,
              changed: int, blob: int, extra: int = 0) -> "GitRepo":
        """git init + fast-import + one repack (a client repository in its
        normal, packed state)."""
        path.mkdir(parents=True)
        repo = cls(path, env)
        run(["git", "init", "-q", "-b", "main", str(path)], timeout=30, env=env)
        stream = fast_import_stream(commits, files, changed, blob, extra=extra)
        marks = path / "marks"
        run(["git", "fast-import", "--quiet", f"--export-marks={marks}"], timeout=600,
            cwd=str(path), env=env, input_bytes=stream)
        ids = {}
        for line in marks.read_text().split("\n"):
            if line:
                m, sha = line.split()
                ids[int(m[1:])] = sha
        repo.commits = [ids[files + 1 + i] for i in range(commits + extra)]
        repo.git("repack", "-a", "-d", "-q", timeout=600)
        return repo


class GitHTTP:
    """nginx (static body + /git/) and fcgiwrap running git-http-backend."""

    def __init__(self, workdir: Path, workers: int = 1, fcgi_children: int = 2) -> None:
        self.dir = workdir
        self.root = workdir / "repos"
        self.workers, self.fcgi_children = workers, fcgi_children
        self.port = 0
        self.nginx = self.fcgiwrap = None
        self.static_body = b""

    def start(self) -> "GitHTTP":
        for tool in ("nginx", "fcgiwrap", "git"):
            if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
                raise BenchError(f"{tool} is not installed: run `sh scripts/deps.sh --bench`")
        if not Path("/usr/lib/git-core/git-http-backend").exists():
            raise BenchError("/usr/lib/git-core/git-http-backend not found (package git)")
        self.root.mkdir(parents=True, exist_ok=True)
        for d in ("client_body", "fastcgi", "proxy", "uwsgi", "scgi"):
            (self.dir / d).mkdir(exist_ok=True)
        sock = self.dir / "fcgiwrap.sock"
        if sock.exists():
            sock.unlink()
        fcgi = shutil.which("fcgiwrap") or "/usr/sbin/fcgiwrap"
        log = open(self.dir / "fcgiwrap.log", "ab")
        self.fcgiwrap = REAPER.popen("fcgiwrap", [fcgi, "-c", str(self.fcgi_children),
                                                  "-s", f"unix:{sock}"],
                                     stdout=log, stderr=log)
        log.close()
        procs.wait_for(lambda: sock.exists(), 10, "fcgiwrap socket", self.fcgiwrap)
        # ~200 bytes of msgpack-looking text, no quote or newline.
        body = ("mpack_url=http://127.0.0.1/_store/mpacks/" + "0" * 64 +
                "?x=" + "a" * 200)[:STATIC_BODY_BYTES]
        self.static_body = body.encode()
        last = ""
        for _attempt in range(3):
            self.port = procs.pgtmp.free_port()
            conf = (HERE / "nginx.conf.in").read_text()
            for k, v in {"DIR": str(self.dir), "PORT": str(self.port), "GITROOT": str(self.root),
                         "WORKERS": str(self.workers), "STATIC_BODY": body,
                         "USER": "user root root;" if os.geteuid() == 0 else ""}.items():
                conf = conf.replace(f"@{k}@", v)
            cpath = self.dir / "nginx.conf"
            cpath.write_text(conf)
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            log = open(self.dir / "nginx.out", "ab")
            self.nginx = REAPER.popen("nginx", [nginx, "-p", str(self.dir), "-c", str(cpath),
                                                "-e", str(self.dir / "error.log")],
                                      stdout=log, stderr=log)
            log.close()
            try:
                procs.wait_for(lambda: procs.listens_on(self.nginx.pid, self.port), 10, "nginx",
                               self.nginx)
                return self
            except BenchError as e:
                last = str(e) + "\n" + self._tail("error.log") + self._tail("nginx.out")
                kill_proc(self.nginx)
                if "in use" not in last:
                    break
        raise BenchError(f"nginx did not start: {last}")

    def _tail(self, name: str) -> str:
        try:
            return (self.dir / name).read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def repo_url(self, name: str) -> str:
        return f"{self.url}/git/{name}.git"

    def new_bare(self, name: str, env: dict[str, str]) -> Path:
        """An empty bare repository accepting pushes over HTTP."""
        p = self.root / f"{name}.git"
        if p.exists():
            shutil.rmtree(p)
        run(["git", "init", "-q", "--bare", "-b", "main", str(p)], timeout=30, env=env)
        run(["git", "-C", str(p), "config", "http.receivepack", "true"], timeout=30, env=env)
        return p

    def stop(self) -> None:
        for p in (self.nginx, self.fcgiwrap):
            if p is not None:
                kill_proc(p)
        self.nginx = self.fcgiwrap = None


def kill_proc(p) -> None:
    procs.Reaper.kill_group(p, grace=5)
    REAPER.forget(p)
