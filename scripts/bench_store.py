#!/usr/bin/python3
"""Runs build/bench/bench_store (test/bench/bench_store.c) on an fs store in
a temporary directory and, when the S3 emulator can run, on the emulator:
throughput of the streaming writer and reader and the resident memory
they add, for one object of MIB mebibytes.

    /usr/bin/python3 scripts/bench_store.py build/bench/bench_store [MIB]
"""
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3emu  # noqa: E402


def main() -> int:
    prog, mib = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "512"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSEHUB_")}
    d = tempfile.mkdtemp(prefix="mh-bench-store-", dir="/var/tmp")
    rc = 0
    try:
        rc |= subprocess.run([prog, f"fs:{d}/fs", mib], env=env).returncode
        why = s3emu.available()
        if why:
            print(f"# s3: skipped ({why})")
            return rc
        endpoint, proc = s3emu.start(os.path.join(d, "s3"), "bench")
        try:
            e = dict(env, MUSEHUB_S3_ENDPOINT=endpoint, MUSEHUB_S3_ACCESS_KEY=s3emu.ACCESS_KEY,
                     MUSEHUB_S3_SECRET_KEY=s3emu.SECRET_KEY)
            rc |= subprocess.run([prog, "s3:bench", mib], env=e).returncode
        finally:
            s3emu.stop(proc)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
