"""procs — the processes a benchmark run starts, and the guarantee that
none of them outlives it.

Every child is started in its own session (so a terminal Ctrl-C reaches
only bench.py, which then stops the children in order) with
PR_SET_PDEATHSIG=SIGKILL (so even a SIGKILLed bench.py takes its direct
children with it), and registered; `Reaper.stop_all()` runs from a
`finally`, from atexit and from the SIGTERM/SIGHUP handlers, and sends
SIGTERM to each child's whole process group, then SIGKILL after a grace
period.  PostgreSQL is a daemon (pg_ctl), so it registers its own stop.

Also here: the musehubd server (start, health wait, peak RSS, stop) and
`run()`, subprocess.run with a timeout that kills the process group.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import pgtmp  # noqa: E402
import rawhttp  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """preexec_fn: die with the parent (direct children only)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class BenchError(Exception):
    """A benchmark step failed; the message says which and why."""


class Reaper:
    """Registry of everything to stop at the end (processes, callbacks)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.stoppers: list[tuple[str, Callable[[], None]]] = []
        self._stopping = False
        atexit.register(self.stop_all)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        # Also when started with SIGINT ignored (a background job of a
        # non-interactive shell): Ctrl-C or kill -INT must stop the run.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _on_signal(self, signum: int, _frame) -> None:
        # Raise in the main thread so every `finally` runs; stop_all runs there.
        raise KeyboardInterrupt(f"signal {signum}")

    def attach(self, workdir: Path) -> None:
        """Record this run in workdir (owner pid, then every process group
        it starts) so that a later run can clean up after a SIGKILLed one
        (see janitor())."""
        self.workdir = workdir
        (workdir / "owner.pid").write_text(str(os.getpid()))

    def popen(self, name: str, cmd: Sequence[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(list(cmd), start_new_session=True,
                             preexec_fn=_child_setup, **kw)
        self.procs.append((name, p))
        wd = getattr(self, "workdir", None)
        if wd is not None and name not in ("git", "wrk"):   # short-lived ones need no record
            try:
                with open(wd / "pgids", "a") as fh:
                    fh.write(f"{p.pid} {name}\n")
            except OSError:
                pass
        return p

    def on_stop(self, name: str, fn: Callable[[], None]) -> None:
        self.stoppers.append((name, fn))

    def forget(self, p: subprocess.Popen) -> None:
        self.procs = [(n, q) for n, q in self.procs if q is not p]

    @staticmethod
    def kill_group(p: subprocess.Popen, grace: float = 10.0) -> int | None:
        """SIGTERM the process group, wait `grace` s, then SIGKILL it."""
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while members of its group live on
        # (musehubd's forked workers, nginx's workers, fcgiwrap's CGIs).
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        return p.returncode

    def stop_all(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        try:
            for _name, p in reversed(self.procs):
                self.kill_group(p)
            self.procs.clear()
            for name, fn in reversed(self.stoppers):
                try:
                    fn()
                except Exception as e:  # keep stopping the rest
                    print(f"bench: stopping {name}: {e}", file=sys.stderr)
            self.stoppers.clear()
        finally:
            self._stopping = False


REAPER = Reaper()

WORKDIR_PREFIXES = ("musehub-bench-", "musehub-prof-")


def janitor(tmp: str = "/tmp") -> list[str]:
    """Clean up after earlier runs that died without their `finally`
    (SIGKILL, OOM): for each work directory whose owner process is gone,
    SIGKILL the process groups it recorded (nginx and fcgiwrap workers,
    musehubd's forked workers outlive their killed parent), stop its
    PostgreSQL and remove the directory.  Returns what was cleaned."""
    cleaned = []
    for d in Path(tmp).iterdir():
        if not d.name.startswith(WORKDIR_PREFIXES) or not (d / "owner.pid").exists():
            continue
        try:
            owner = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or os.path.exists(f"/proc/{owner}"):
            continue
        try:
            lines = (d / "pgids").read_text().split("\n")
        except OSError:
            lines = []
        for line in lines:
            if not line.strip():
                continue
            pgid = int(line.split()[0])
            # Only a group whose members still mention this run or are the
            # kinds of process we start (pgids are recycled in time).
            for pid in group_pids(pgid):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if str(d) in cmd or any(k in cmd for k in ("nginx", "fcgiwrap", "musehubd", "valgrind", "node")):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for pg in (d / "pg",):
            if (pg / "data").exists():
                try:
                    pgtmp.stop(str(pg))
                except Exception:
                    pass
        import shutil
        shutil.rmtree(d, ignore_errors=True)
        cleaned.append(str(d))
    return cleaned


def run(cmd: Sequence[str], timeout: float, cwd: str | None = None,
        env: dict | None = None, check: bool = True,
        input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group, killed whole on timeout or
    interruption.  Raises BenchError with the command's output on failure."""
    p = REAPER.popen(cmd[0], cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE,
                     stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL)
    try:
        out, err = p.communicate(input_bytes, timeout=timeout)
    except subprocess.TimeoutExpired:
        Reaper.kill_group(p, grace=2)
        REAPER.forget(p)
        raise BenchError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s")
    except BaseException:
        Reaper.kill_group(p, grace=2)
        REAPER.forget(p)
        raise
    REAPER.forget(p)
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and r.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` exited {r.returncode}:\n"
                         f"{err.decode(errors='replace')[-2000:]}"
                         f"{out.decode(errors='replace')[-1000:]}")
    return r


# --------------------------------------------------------------- memory

def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a process in KiB ({} when it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


# ------------------------------------------------------------ PostgreSQL

def start_postgres(dirname: str) -> str:
    """A throwaway cluster (scripts/pgtmp.py); destroyed by the reaper."""
    REAPER.on_stop("postgresql", lambda: pgtmp.destroy(dirname))
    return pgtmp.start(dirname)


def postgres_version(url: str) -> str:
    try:
        return pgtmp.psql(url, sql="SHOW server_version").strip()
    except Exception as e:  # informative only
        return f"unknown ({e})"


# -------------------------------------------------------------- musehubd

class Musehubd:
    """A musehubd process (with MUSEHUB_WORKERS=N, a parent and N workers).

    env_base: the MUSEHUB_* settings shared by every server of the run
    (database, store); start() adds the listen address and workers."""

    def __init__(self, binary: str, workdir: Path, env_base: dict[str, str],
                 workers: int = 1, wrapper: Sequence[str] = (),
                 start_timeout: float = 30.0, name: str = "musehubd") -> None:
        self.binary, self.workdir, self.env_base = os.path.abspath(binary), workdir, env_base
        self.workers, self.wrapper, self.start_timeout = workers, list(wrapper), start_timeout
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.url = ""
        self.log_path = workdir / f"{name}.log"

    def start(self) -> "Musehubd":
        last = ""
        for _attempt in range(3):      # retry only when the free port got taken
            self.port = pgtmp.free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            env = {k: v for k, v in os.environ.items() if not k.startswith("MUSEHUB_")}
            env.update(self.env_base)
            env.update({"MUSEHUB_LISTEN": f"127.0.0.1:{self.port}",
                        "MUSEHUB_WORKERS": str(self.workers)})
            log = open(self.log_path, "ab")
            self.proc = REAPER.popen(self.name, self.wrapper + [self.binary, "serve"], env=env,
                                     stdout=log, stderr=log, cwd=str(self.workdir))
            log.close()
            err = self._wait_healthy()
            if err is None:
                return self
            self.stop()
            last = err
            if "in use" not in self.log_tail().lower():
                break
        raise BenchError(last)

    def _wait_healthy(self) -> str | None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return (f"{self.name} exited with {self.proc.returncode} during start-up; "
                        f"log tail:\n{self.log_tail()}")
            # Other test servers on this machine also pick free ports: the
            # port must be held by OUR process before its answers count.
            if not listens_on(self.proc.pid, self.port):
                time.sleep(0.05)
                continue
            try:
                c = rawhttp.Connection("127.0.0.1", self.port, timeout=2)
                r = c.request("GET", "/readyz")
                c.close()
                if r.status == 200:
                    return None
            except (rawhttp.HTTPError, OSError):
                pass
            time.sleep(0.05)
        return (f"{self.name}: GET /readyz not 200 within {self.start_timeout:.0f} s; "
                f"log tail:\n{self.log_tail()}")

    def pids(self) -> list[int]:
        """The serving processes (the parent alone, or its workers)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        if self.workers <= 1:
            return [self.proc.pid]
        return children(self.proc.pid) or [self.proc.pid]

    def memory(self) -> dict[str, int]:
        """{'hwm_kib': peak RSS summed over serving processes, 'max_kib':
        the largest single process peak, 'rss_kib': current RSS sum}."""
        st = [proc_status(p) for p in self.pids()]
        return {"hwm_kib": sum(s.get("VmHWM", 0) for s in st),
                "max_kib": max([s.get("VmHWM", 0) for s in st] or [0]),
                "rss_kib": sum(s.get("VmRSS", 0) for s in st)}

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (the server finishes in-flight requests), then SIGKILL."""
        if self.proc is None:
            return None
        p, self.proc = self.proc, None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        rc = Reaper.kill_group(p, grace=2)
        REAPER.forget(p)
        return rc

    def restart(self) -> "Musehubd":
        self.stop()
        return self.start()


def listens_on(pgid: int, port: int) -> bool:
    """True when a process of group `pgid` holds a listening TCP socket on
    `port` (its socket inodes against /proc/net/tcp{,6})."""
    inodes = set()
    for pid in group_pids(pgid):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    if not inodes:
        return False
    want = f"{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    f = line.split()
                    if f[3] == "0A" and f[1].rsplit(":", 1)[1] == want and f[9] in inodes:
                        return True
        except (OSError, StopIteration):
            continue
    return False


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True when host:port accepts a TCP connection."""
    import socket
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(cond: Callable[[], bool], timeout: float, what: str,
             proc: subprocess.Popen | None = None) -> None:
    """Poll cond() every 20 ms; BenchError when `proc` exits first or the
    timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited with {proc.returncode} before it was ready")
        time.sleep(0.02)
    raise BenchError(f"{what} not ready within {timeout:.0f} s")


# ------------------------------------------------------------------ CPU

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            s = fh.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    return s[s.rindex(")") + 2:].split()


def cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of a process (all its threads, and
    its children it has reaped), in clock ticks; 0 when it is gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0
    # After the name: state(0) ppid(1) pgrp(2) ... utime(11) stime(12) cutime(13) cstime(14)
    return sum(int(x) for x in f[11:15])


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f is not None and int(f[2]) == pgid:
                out.append(int(d))
    return out


class CpuMeter:
    """CPU seconds used by a set of processes between start() and stop().
    `pids` is called at both ends (processes may come and go); a process
    that exited in between is counted through its parent's cutime when the
    parent is in the set and reaped it."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.before: dict[int, int] = {}

    def start(self) -> None:
        self.before = {p: cpu_ticks(p) for p in self.pids()}

    def stop(self) -> float:
        after = {p: cpu_ticks(p) for p in self.pids()}
        ticks = sum(t - self.before.get(p, 0) for p, t in after.items())
        return max(0, ticks) / CLK_TCK


def postgres_pids(pgdir: str) -> list[int]:
    """The postmaster of a pgtmp cluster and its children (backends,
    background workers)."""
    try:
        with open(os.path.join(pgdir, "data", "postmaster.pid")) as fh:
            pm = int(fh.readline())
    except (OSError, ValueError):
        return []
    return [pm] + children(pm)
