#!/usr/bin/python3
"""big_history.py — a git history the size of git/git's, for measuring
what a long history costs (docs/benchmarks.md, "A git/git-sized
history"); not part of `make bench` (the whole measurement takes minutes).

  big_history.py [COMMITS] | git fast-import --quiet

writes a `git fast-import` stream to standard output: COMMITS commits
(default 82,000, git/git's count), about a sixth of them merges of a
one-commit side branch, on a tree of 3,000 C files in 60 directories
growing to ~6,500, each commit changing 1 to 4 files (2 % of the changes
add a file). Deterministic (a fixed seed): the same stream every run.
Refs: refs/heads/main (and refs/heads/side).
"""
import random
import sys


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 82000
    rng = random.Random(82)
    w = sys.stdout.buffer.write
    files = [f"d{i % 60:02d}/s{(i // 60) % 7}/f{i:05d}.c" for i in range(3000)]
    mark = 0
    t0 = 1100000000

    def content(path: str, i: int) -> bytes:
        name = path.replace("/", "_").replace(".", "_")
        return (f"/* {path} rev {i} */\n".encode() +
                b"".join(f"int {name}_{i}_{k}(void) {{ return {k * i}; }}\n".encode()
                         for k in range(rng.randint(8, 60))))

    def changes(i: int) -> bytes:
        out = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.02:
                files.append(f"d{rng.randrange(60):02d}/s{rng.randrange(7)}/n{len(files):05d}.c")
                p = files[-1]
            else:
                p = files[rng.randrange(len(files))]
            data = content(p, i)
            out.append(b"M 100644 inline %s\ndata %d\n%s\n" % (p.encode(), len(data), data))
        return b"".join(out)

    def commit(ref: str, i: int, frm: int | None, merge: int | None, body: bytes) -> int:
        nonlocal mark
        mark += 1
        ts = t0 + 600 * i
        msg = f"commit {i}\n\nsome words about change {i}\n".encode()
        w(b"commit %s\nmark :%d\n" % (ref.encode(), mark))
        w(b"author A U Thor <a@example.com> %d +0000\n"
          b"committer C O Mitter <c@example.com> %d +0000\n" % (ts, ts))
        w(b"data %d\n%s" % (len(msg), msg))
        if frm is not None:
            w(b"from :%d\n" % frm)
        if merge is not None:
            w(b"merge :%d\n" % merge)
        w(body)
        w(b"\n")
        return mark

    root = b"".join(b"M 100644 inline %s\ndata %d\n%s\n" % (p.encode(), len(d), d)
                    for p in files for d in [content(p, 0)])
    tip = commit("refs/heads/main", 0, None, None, root)
    i = 1
    while i < n:
        if rng.random() < 0.2 and i + 1 < n:
            body = changes(i)
            side = commit("refs/heads/side", i, tip, None, body)
            i += 1
            tip = commit("refs/heads/main", i, tip, side, body)  # the merge takes the side's files
        else:
            tip = commit("refs/heads/main", i, tip, None, changes(i))
        i += 1
    w(b"done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
