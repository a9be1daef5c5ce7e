#!/usr/bin/python3
"""Runs the C unit test programs (TAP output) given on the command line.

A throwaway PostgreSQL is started for them (MUSEHUB_TEST_DATABASE_URL) and
stopped afterwards. Prints each program's TAP, then one closing line
'N passed, N failed' counting the individual TAP assertions.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
import pgtmp  # noqa: E402
import s3emu  # noqa: E402


def main() -> int:
    progs = sys.argv[1:]
    passed = failed = 0
    bad_progs = []
    pgdir = tempfile.mkdtemp(prefix="mh-unit-pg-")
    env = dict(os.environ)
    try:
        env["MUSEHUB_TEST_DATABASE_URL"] = pgtmp.start(pgdir)
    except Exception as e:  # the db tests skip themselves without it
        print(f"# no PostgreSQL for unit tests: {e}")
    emu = None
    s3dir = tempfile.mkdtemp(prefix="mh-unit-s3-")
    why = s3emu.available()
    if why:
        print(f"# no S3 emulator for unit tests: {why}")
    else:
        try:
            endpoint, emu = s3emu.start(s3dir, "musehub-test")
            env["MUSEHUB_TEST_S3_ENDPOINT"] = endpoint
        except Exception as e:  # the s3 tests skip themselves without it
            print(f"# no S3 emulator for unit tests: {e}")
    try:
        for prog in progs:
            print(f"# ---- {prog}")
            sys.stdout.flush()
            r = subprocess.run([prog], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
            out = r.stdout.decode(errors="replace")
            sys.stdout.write(out)
            p = len(re.findall(r"^ok \d+", out, re.M))
            f = len(re.findall(r"^not ok \d+", out, re.M))
            if r.returncode != 0 and f == 0:
                f = 1  # crashed or exited non-zero without a failing line
                print(f"not ok - {prog} exited with {r.returncode}")
            passed += p
            failed += f
            if f:
                bad_progs.append(prog)
    finally:
        try:
            pgtmp.destroy(pgdir)
        except Exception:
            pass
        if emu is not None:
            s3emu.stop(emu)
        shutil.rmtree(s3dir, ignore_errors=True)
    if bad_progs:
        print("# failing programs: " + " ".join(bad_progs))
    print(f"unit: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
