#!/usr/bin/python3
"""rsswrap.py — run a Python tool and record its own peak memory.

  RSS_OUT=FILE rsswrap.py TOOL [ARGS...]

runs TOOL (a Python script, e.g. scripts/muse-push) in this process as
`__main__` and, however it exits, writes its VmHWM (peak resident set of
this address space, KiB) to FILE.  VmHWM starts afresh at exec, unlike
getrusage's ru_maxrss, which carries the forking parent's peak across
exec; so this measures the tool, not whoever started it.  Used by the
end-to-end tests and the benchmark of the clients.
"""
import os
import runpy
import sys

if __name__ == "__main__":
    tool = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(tool)))
    try:
        runpy.run_path(tool, run_name="__main__")
    finally:
        with open("/proc/self/status") as fh:
            hwm = next(ln for ln in fh if ln.startswith("VmHWM")).split()[1]
        with open(os.environ["RSS_OUT"], "w") as out:
            out.write(hwm)
