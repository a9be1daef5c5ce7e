#!/usr/bin/python3
"""Start and stop the S3 emulator used by the tests (scripts/s3emu.js,
@20minutes/s3rver 5.0.0: verifies SigV4 header and presigned signatures,
expiry and access keys; credentials S3RVER / S3RVER).

    import s3emu
    endpoint, proc = s3emu.start("/tmp/somedir", "musehub-test")
    ...  # MUSEHUB_S3_ENDPOINT=endpoint, MUSEHUB_STORE=s3:musehub-test
    s3emu.stop(proc)

Command line (foreground, Ctrl-C stops):
    /usr/bin/python3 scripts/s3emu.py DIR BUCKET   prints the endpoint

Needs `node` and the npm package installed by `scripts/deps.sh --s3emu-only` into
third_party/s3emu/node_modules.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "scripts" / "s3emu.js"
MODULE = ROOT / "third_party" / "s3emu" / "node_modules" / "@20minutes" / "s3rver" / "package.json"
ACCESS_KEY = SECRET_KEY = "S3RVER"


def available() -> str | None:
    """None when the emulator can run here, else the reason it cannot."""
    if not shutil.which("node"):
        return "node is not installed"
    if not MODULE.exists():
        return f"{MODULE.parent} missing: run `make deps-s3emu` (scripts/deps.sh --s3emu-only)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start(dirname: str, bucket: str, timeout: float = 15.0) -> tuple[str, subprocess.Popen]:
    """Starts the emulator storing under `dirname` with `bucket` created;
    returns (endpoint URL, process) once its port accepts connections.
    Output goes to <dirname>/s3emu.log. Raises RuntimeError on failure."""
    why = available()
    if why:
        raise RuntimeError(f"s3 emulator unavailable: {why}")
    os.makedirs(dirname, exist_ok=True)
    data = os.path.join(dirname, "data")
    os.makedirs(data, exist_ok=True)
    last = ""
    for _attempt in range(3):  # retry only if the free port got taken
        port = _free_port()
        log = open(os.path.join(dirname, "s3emu.log"), "ab")
        proc = subprocess.Popen(["node", str(LAUNCHER), "--port", str(port), "--dir", data,
                                 "--bucket", bucket], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _accepts(port):
                return f"http://127.0.0.1:{port}", proc
            time.sleep(0.05)
        stop(proc)
        try:
            with open(os.path.join(dirname, "s3emu.log"), errors="replace") as fh:
                last = fh.read()[-2000:]
        except OSError:
            last = "(no log)"
        if "EADDRINUSE" not in last:
            break
    raise RuntimeError(f"s3 emulator did not start. Log tail:\n{last}")


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    endpoint, proc = start(sys.argv[1], sys.argv[2])
    print(endpoint, flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
