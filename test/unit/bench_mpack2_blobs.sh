#!/bin/sh
# Extracts every distinct blob content of a git branch into one file for
# test/unit/bench_mpack2.c, in the order writers put blobs in v2 packs
# (SPEC 2.1): by path, all versions of a path together, oldest first. Each
# blob is an 8-byte little-endian length followed by its bytes.
#   test/unit/bench_mpack2_blobs.sh [BUNDLE [BRANCH [OUT]]]
# Defaults: ../shared/data/libuv-v1.x.bundle, v1.x, /tmp/mh-bench-blobs.bin
set -e
BUNDLE=${1:-$(dirname "$0")/../../../shared/data/libuv-v1.x.bundle}
BRANCH=${2:-v1.x}
OUT=${3:-/tmp/mh-bench-blobs.bin}
[ -f "$BUNDLE" ] || { echo "no bundle at $BUNDLE" >&2; exit 1; }
TMP=$(mktemp -d /tmp/mh-bench-git-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
git clone -q --bare -b "$BRANCH" "$BUNDLE" "$TMP/repo" 2>/dev/null
# rev-list lists newest first; each object once, with the path it was first seen at.
git -C "$TMP/repo" rev-list --objects "$BRANCH" > "$TMP/objs"
cut -d' ' -f1 "$TMP/objs" | git -C "$TMP/repo" cat-file --batch-check='%(objectname) %(objecttype)' |
  awk '$2 == "blob" { print $1 }' > "$TMP/blobs"
/usr/bin/python3 - "$TMP" "$OUT" <<'PY'
import struct, subprocess, sys, threading
tmp, out = sys.argv[1], sys.argv[2]
blobs = set(open(f"{tmp}/blobs").read().split())
order = []  # (path, -index) so that within a path the oldest (seen last) comes first
for i, line in enumerate(open(f"{tmp}/objs")):
    parts = line.rstrip("\n").split(" ", 1)
    if parts[0] in blobs:
        order.append((parts[1] if len(parts) > 1 else "", -i, parts[0]))
order.sort()
p = subprocess.Popen(["git", "-C", f"{tmp}/repo", "cat-file", "--batch"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE)


def ask():  # from a thread: git answers while we still ask
    p.stdin.write("".join(o[2] + "\n" for o in order).encode())
    p.stdin.close()


threading.Thread(target=ask, daemon=True).start()
total = 0
with open(out, "wb") as f:
    for _ in order:
        header = p.stdout.readline().split()
        n = int(header[2])
        data = p.stdout.read(n)
        p.stdout.read(1)
        f.write(struct.pack("<Q", n) + data)
        total += n
p.wait()
print(f"{len(order)} blobs, {total} bytes -> {out}")
PY
