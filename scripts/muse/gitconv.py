"""git -> Muse conversion, incremental, in memory bounded by the tree size.

  Converter(git_dir, out_dir, version=2, max_pack_bytes=None, max_pack_commits=None, log=...)
  conv.run(refs) -> summary        converts what the state has not seen,
                                   writes new packs and updates push.json
  Git, Trees, parse_commit, split_ident, branch_name

The state (OUT/git2muse-state.msgpack) maps every converted git commit to
its Muse commit id, tree and snapshot id, every git blob to its Muse blob
id, and records the git and Muse heads of every converted branch.  A run
converts only commits the state does not know (`rev-list REF --not
<heads converted before>`), so after one new git commit it writes one
small pack.  No manifest is kept per commit: a small LRU keeps the
manifests of recent commits (in topological order a commit's first
parent is nearly always the one converted just before), and a miss
rebuilds the parent's manifest from its git tree and the blob map.

Mapping (see git2muse --help): parents (octopus extras in metadata),
author, committer date with its offset, message decoded by its encoding
(NUL -> U+FFFD), metadata.git_commit; symlinks are blobs holding the
target, modes are dropped, submodules skipped.  Snapshots are deltas
against the first parent's snapshot.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from collections import OrderedDict

import msgpack

from .ids import Manifest, blob_id, commit_id, valid_path
from .mpack import PackWriter
from .plan import load_plan, save_plan
from .push import PLAN_COMMIT_IDS, pack_closed

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms)
if TYPE_CHECKING:
    from typing import Callable

    Log = Callable[[str], None]

STATE_FILE = "git2muse-state.msgpack"
STATE_VERSION = 2


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr)


class Git:
    """Runs git against one repository; one long-lived `cat-file --batch`."""

    def __init__(self, repo: str) -> None:
        self.repo = repo
        fmt = self.try_out("rev-parse", "--show-object-format")
        if fmt is None:
            raise OSError(f"{repo} is not a git repository")
        fmt = fmt.strip() or "sha1"
        self.hash_len = 32 if fmt == "sha256" else 20
        self._cat = subprocess.Popen(["git", "-C", repo, "cat-file", "--batch"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def out(self, *args: str) -> str:
        r = subprocess.run(["git", "-C", self.repo, *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        if r.returncode != 0:
            raise ConvertError(f"git {args[0]} failed: "
                               f"{r.stderr.decode(errors='replace').strip()}")
        return r.stdout.decode()

    def try_out(self, *args: str) -> str | None:
        r = subprocess.run(["git", "-C", self.repo, *args], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
        return r.stdout.decode() if r.returncode == 0 else None

    def cat(self, oid: str) -> tuple[str, bytes]:
        """(type, raw bytes) of an object through `cat-file --batch`."""
        assert self._cat.stdin and self._cat.stdout
        self._cat.stdin.write(oid.encode() + b"\n")
        self._cat.stdin.flush()
        header = self._cat.stdout.readline().split()
        if len(header) != 3:
            raise RuntimeError(f"git cat-file: {oid}: {b' '.join(header).decode()}")
        size = int(header[2])
        data = self._cat.stdout.read(size)
        self._cat.stdout.read(1)  # the trailing LF
        return header[1].decode(), data

    def close(self) -> None:
        if self._cat.stdin:
            self._cat.stdin.close()
        self._cat.wait()


# -- trees --------------------------------------------------------------------

TREE, BLOB, LINK, GITLINK = "tree", "blob", "link", "gitlink"


class Trees:
    """Parsed tree objects (bounded cache) and tree diffs."""

    def __init__(self, git: Git, log: Log = _stderr_log) -> None:
        self.git = git
        self.log = log
        self.cache: dict[str, list[tuple[bytes, str, str]]] = {}
        self.warned: set[str] = set()

    def entries(self, oid: str) -> list[tuple[bytes, str, str]]:
        """[(name, kind, hex oid)] of a tree."""
        if oid in self.cache:
            return self.cache[oid]
        kind, raw = self.git.cat(oid)
        assert kind == "tree", (oid, kind)
        out, i, hl = [], 0, self.git.hash_len
        while i < len(raw):
            sp = raw.index(b" ", i)
            nul = raw.index(b"\0", sp)
            mode = raw[i:sp]
            name = raw[sp + 1:nul]
            h = raw[nul + 1:nul + 1 + hl].hex()
            i = nul + 1 + hl
            if mode == b"40000":
                k = TREE
            elif mode == b"160000":
                k = GITLINK
            elif mode == b"120000":
                k = LINK
            else:
                k = BLOB
            out.append((name, k, h))
        if len(self.cache) > 4_000:    # bounded: trees are re-read on a miss
            self.cache.clear()
        self.cache[oid] = out
        return out

    def flatten(self, oid: str, prefix: bytes = b"") -> dict[bytes, str]:
        """path -> blob oid of every file under a tree (gitlinks skipped)."""
        out: dict[bytes, str] = {}
        stack = [(oid, prefix)]
        while stack:
            t, pre = stack.pop()
            for name, kind, h in self.entries(t):
                path = pre + name
                if kind == TREE:
                    stack.append((h, path + b"/"))
                elif kind == GITLINK:
                    self.warn_gitlink(path)
                else:
                    out[path] = h
        return out

    def diff(self, old: str, new: str, prefix: bytes = b"") -> tuple[dict, list]:
        """(changed {path: blob oid}, removed [path]) from tree old to new,
        descending only into subtrees whose ids differ."""
        changed: dict[bytes, str] = {}
        removed: list[bytes] = []
        if old == new:
            return changed, removed
        a = {n: (k, h) for n, k, h in self.entries(old)}
        b = {n: (k, h) for n, k, h in self.entries(new)}
        for name in sorted(a.keys() | b.keys()):  # fixed order: same history, same packs
            path = prefix + name
            ea, eb = a.get(name), b.get(name)
            if ea == eb:
                continue
            if ea and eb and ea[0] == TREE and eb[0] == TREE:
                c, r = self.diff(ea[1], eb[1], path + b"/")
                changed.update(c)
                removed.extend(r)
                continue
            if ea:  # gone or replaced by a different kind
                if ea[0] == TREE:
                    removed.extend(self.flatten(ea[1], path + b"/"))
                elif ea[0] != GITLINK:
                    removed.append(path)
            if eb:
                if eb[0] == TREE:
                    changed.update(self.flatten(eb[1], path + b"/"))
                elif eb[0] == GITLINK:
                    self.warn_gitlink(path)
                else:
                    changed[path] = eb[1]
        return changed, removed

    def warn_gitlink(self, path: bytes) -> None:
        p = path.decode("utf-8", "replace")
        if p not in self.warned:
            self.warned.add(p)
            self.log(f"warning: skipping submodule (gitlink) {p}")


# -- commits ------------------------------------------------------------------

def parse_commit(raw: bytes) -> dict:
    """Headers and message of a raw git commit object."""
    sep = raw.find(b"\n\n")
    head, msg = (raw, b"") if sep < 0 else (raw[:sep], raw[sep + 2:])
    hdr: dict[str, list[bytes]] = {}
    last = None
    for line in head.split(b"\n"):
        if line.startswith(b" ") and last:  # continuation (gpgsig, mergetag)
            hdr[last][-1] += b"\n" + line[1:]
            continue
        k, _, v = line.partition(b" ")
        last = k.decode()
        hdr.setdefault(last, []).append(v)
    return {"tree": hdr["tree"][0].decode(),
            "parents": [p.decode() for p in hdr.get("parent", [])],
            "author": hdr.get("author", [b""])[0],
            "committer": hdr.get("committer", [b""])[0],
            "encoding": (hdr.get("encoding", [b"utf-8"])[0].decode() or "utf-8"),
            "message": msg}


def split_ident(line: bytes, enc: str, log: Log = _stderr_log) -> tuple[str, str]:
    """(ident "Name <email>", ISO-8601 date with offset) of an ident line."""
    ident, _, rest = line.rpartition(b"> ")
    ident = ident + b">"
    try:
        ts_s, tz_s = rest.split()
        ts = int(ts_s)
        sign = -1 if tz_s.startswith(b"-") else 1
        tz_s = tz_s.lstrip(b"+-")
        off = datetime.timedelta(hours=int(tz_s[:2]), minutes=int(tz_s[2:4]))
        tz = datetime.timezone(sign * off)
        when = datetime.datetime.fromtimestamp(ts, tz).isoformat()
    except (ValueError, IndexError):
        log(f"warning: unparsable ident date {line!r}; using the epoch")
        when = datetime.datetime.fromtimestamp(0, datetime.timezone.utc).isoformat()
    return decode(ident, enc), when


def decode(b: bytes, enc: str) -> str:
    try:
        return b.decode(enc, "replace")
    except LookupError:
        return b.decode("utf-8", "replace")


def branch_name(git: Git, ref: str) -> str:
    """The Muse branch for a git ref: refs/heads/X -> X, HEAD -> the
    checked-out branch (main when detached), refs/Y -> Y."""
    if ref.startswith("refs/heads/"):
        return ref[len("refs/heads/"):]
    if ref == "HEAD":
        sym = git.try_out("symbolic-ref", "-q", "HEAD")
        return sym.strip()[len("refs/heads/"):] if sym else "main"
    if ref.startswith("refs/"):
        return ref[len("refs/"):]
    full = git.try_out("rev-parse", "--symbolic-full-name", ref)
    if full and full.strip().startswith("refs/heads/"):
        return full.strip()[len("refs/heads/"):]
    return ref


def all_branch_refs(git: Git) -> list[tuple[str, str]]:
    """(ref, branch) of every refs/heads/*, the checked-out branch first."""
    names = git.out("for-each-ref", "--format=%(refname)", "refs/heads/").split()
    cur = (git.try_out("symbolic-ref", "-q", "HEAD") or "").strip()
    names.sort(key=lambda n: (n != cur, n))
    return [(n, branch_name(git, n)) for n in names]


class ConvertError(Exception):
    """A conversion that cannot proceed (bad ref, not a git repository)."""


#: commits per pack by default: a push's server-side metadata (commits,
#: snapshot deltas, blob records) is held whole, ~3.7 KB per commit on a
#: git/git-sized history, so a first conversion of a very long history
#: goes out in packs of at most this many commits (libuv's 5,697: one)
MAX_PACK_COMMITS = 16384


class Converter:
    """Incremental git -> Muse conversion into `out_dir` (module docstring).

    version         mpack format of the packs written (2 or 1)
    max_pack_bytes  split a ref's new commits into packs of about this
                    many bytes (v1: the file; v2: the blobs before
                    compression, an upper bound of the file); default
                    256 MiB (v1) / 2 GiB (v2)
    max_pack_commits  and into packs of at most this many commits
                    (default MAX_PACK_COMMITS): what a server decodes
                    and holds for one push follows its commits
    log             callable(str) for progress and warnings
    progress        callable(commits_done, commits_total) or None
    """

    def __init__(self, repo: str, out_dir: str, version: int = 2,
                 max_pack_bytes: int | None = None, max_pack_commits: int | None = None,
                 log: Log = _stderr_log,
                 progress: Callable[[int, int], None] | None = None,
                 fresh: bool = False) -> None:
        if not os.path.isdir(repo):
            raise ConvertError(f"{repo}: no such directory")
        try:
            self.git = Git(repo)
        except (subprocess.CalledProcessError, OSError) as e:
            raise ConvertError(str(e)) from e
        self.repo = os.path.abspath(repo)
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.version = version
        self.max_bytes = max_pack_bytes or ((2 << 30) if version == 2 else (256 << 20))
        self.max_commits = max_pack_commits or MAX_PACK_COMMITS
        self.log, self.progress = log, progress
        self.trees = Trees(self.git, log)
        self.state_path = os.path.join(out_dir, STATE_FILE)
        self.plan_path = os.path.join(out_dir, "push.json")
        self.commits: dict[str, list] = {}      # git hex -> [muse id, tree hex, sid]
        self.blob_map: dict[bytes, bytes] = {}  # raw git blob id -> raw sha256
        self.git_heads: dict[str, str] = {}
        self.branch_heads: dict[str, str] = {}
        self.extra: dict = {}                   # other tools' records (muse-mirror)
        if fresh:
            for p in (self.state_path, self.plan_path):
                if os.path.exists(p):
                    os.unlink(p)
        self._load()
        self.emitted_snaps = {v[2] for v in self.commits.values()}
        self.emitted_commits = {v[0] for v in self.commits.values()}
        self._lru: OrderedDict[str, Manifest] = OrderedDict()
        self._paths: dict[bytes, str] = {}
        self.stats = {"commits": 0, "blobs": 0, "blob_bytes": 0, "tree_rebuilds": 0}

    # -- state -------------------------------------------------------------

    def _load(self) -> None:
        if not os.path.exists(self.state_path):
            return
        with open(self.state_path, "rb") as fh:
            st = msgpack.unpackb(fh.read(), raw=False, strict_map_key=False)
        if st.get("version") != STATE_VERSION:
            raise ConvertError(f"{self.state_path}: state version {st.get('version')} "
                               f"is not {STATE_VERSION}; convert afresh with --fresh")
        if st.get("format") not in (None, self.version):
            raise ConvertError(f"{self.out_dir} holds v{st.get('format')} packs; use "
                               f"--format {st.get('format')} or --fresh")
        self.commits = st["commits"]
        self.blob_map = st["blobs"]
        self.git_heads = st.get("git_heads", {})
        self.branch_heads = st.get("branch_heads", {})
        self.extra = st.get("extra", {})

    def save_state(self) -> None:
        tmp = self.state_path + ".tmp"
        with open(tmp, "wb") as fh:
            msgpack.pack({"version": STATE_VERSION, "format": self.version,
                          "repo": self.repo, "commits": self.commits,
                          "blobs": self.blob_map, "git_heads": self.git_heads,
                          "branch_heads": self.branch_heads, "extra": self.extra},
                         fh, use_bin_type=True)
        os.replace(tmp, self.state_path)

    def load_plan(self) -> dict:
        if os.path.exists(self.plan_path) and self.commits:
            return load_plan(self.plan_path)
        return {"version": 1, "packs": [], "branch_heads": {}, "git_heads": {}}

    # -- helpers -------------------------------------------------------------

    def path_str(self, p: bytes) -> str | None:
        s = self._paths.get(p)
        if s is None:
            try:
                s = p.decode("utf-8")
            except UnicodeDecodeError:
                s = p.decode("utf-8", "replace")
                self.log(f"warning: path {p!r} is not UTF-8; stored as {s!r}")
            if not valid_path(s):
                self.log(f"warning: skipping path {s!r} (not a valid Muse path)")
                s = ""
            self._paths[p] = s
        return s or None

    def muse_blob(self, goid: str, path: str, w: list) -> tuple[str, int]:
        """(Muse id, new bytes) of a git blob; a blob not seen before is
        read from git and appended to `w` as (id, data, path)."""
        key = bytes.fromhex(goid)
        mid = self.blob_map.get(key)
        if mid is not None:
            return "sha256:" + mid.hex(), 0
        _kind, data = self.git.cat(goid)
        oid = blob_id(data)
        self.blob_map[key] = bytes.fromhex(oid[7:])
        w.append((oid, data, path))
        self.stats["blobs"] += 1
        self.stats["blob_bytes"] += len(data)
        return oid, len(data)

    def manifest_of_tree(self, tree: str, w: list | None) -> tuple[Manifest, int]:
        m = Manifest()
        n = 0
        for p, goid in self.trees.flatten(tree).items():
            ps = self.path_str(p)
            if not ps:
                continue
            if w is None:
                m.set(ps, "sha256:" + self.blob_map[bytes.fromhex(goid)].hex())
            else:
                oid, k = self.muse_blob(goid, ps, w)
                n += k
                m.set(ps, oid)
        return m, n

    def take_manifest(self, g: str, pending: dict[str, int]) -> Manifest:
        """The manifest of converted commit g, to be mutated by a child."""
        pending[g] = pending.get(g, 1) - 1
        m = self._lru.get(g)
        if m is not None:
            if pending[g] > 0:
                self._lru.move_to_end(g)
                return m.copy()
            del self._lru[g]
            return m
        self.stats["tree_rebuilds"] += 1
        m, _ = self.manifest_of_tree(self.commits[g][1], None)
        if pending[g] > 0:
            self._remember(g, m.copy())
        return m

    def _remember(self, g: str, m: Manifest) -> None:
        self._lru[g] = m
        while len(self._lru) > 32:
            self._lru.popitem(last=False)

    def resolve(self, refs: list[str]) -> list[str]:
        """The commit ids of refs: one `git rev-parse` for all of them (one
        per ref only to name the one that does not resolve)."""
        out = None
        if not any(r.startswith("-") for r in refs):
            out = self.git.try_out("rev-parse", *[r + "^{commit}" for r in refs])
        shas = (out or "").split()
        if out is not None and len(shas) == len(refs):
            return shas
        for r in refs:
            if not self.git.try_out("rev-parse", "--verify", "-q", r + "^{commit}"):
                raise ConvertError(f"{r} does not name a commit (an unborn branch?)")
        raise ConvertError(f"git rev-parse could not resolve {' '.join(refs)}")

    def is_ancestor(self, a: str, b: str) -> bool:
        r = subprocess.run(["git", "-C", self.repo, "merge-base", "--is-ancestor", a, b],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return r.returncode == 0

    # -- one commit ----------------------------------------------------------

    def convert_commit(self, g: str, branch: str, w: list,
                       pending: dict[str, int]) -> tuple[dict, dict | None, int]:
        """(commit map, snapshot map or None, new blob bytes) of git commit g;
        its new blobs are appended to `w` as (id, data, path)."""
        _kind, raw = self.git.cat(g)
        c = parse_commit(raw)
        enc = c["encoding"]
        author, _ = split_ident(c["author"], enc, self.log)
        _, committed_at = split_ident(c["committer"], enc, self.log)
        message = decode(c["message"], enc)
        if "\0" in message:
            self.log(f"warning: commit {g}: message contains NUL; replaced by U+FFFD")
            message = message.replace("\0", "\ufffd")
        author = author.replace("\0", "\ufffd")
        parents = c["parents"]
        missing = [p for p in parents if p not in self.commits]
        if missing:
            raise ConvertError(f"commit {g}: parent {missing[0]} was not converted")
        nbytes = 0
        if not parents:
            m, nbytes = self.manifest_of_tree(c["tree"], w)
            parent_sid = None
            upsert, removed = dict(m), []
        else:
            p0 = parents[0]
            parent_sid = self.commits[p0][2]
            m = self.take_manifest(p0, pending)
            changed, gone = self.trees.diff(self.commits[p0][1], c["tree"])
            upsert, removed = {}, []
            for p in gone:
                ps = self.path_str(p)
                if ps and ps in m:
                    m.remove(ps)
                    removed.append(ps)
            for p, goid in changed.items():
                ps = self.path_str(p)
                if not ps:
                    continue
                oid, k = self.muse_blob(goid, ps, w)
                nbytes += k
                if m.get(ps) != oid:
                    m.set(ps, oid)
                    upsert[ps] = oid
            removed = sorted(p for p in removed if p not in upsert)
        for p in parents[1:]:
            pending[p] = pending.get(p, 1) - 1
        sid = m.id()
        snap = None
        if sid not in self.emitted_snaps and sid != parent_sid:
            if parent_sid and sid != parent_sid:
                snap = {"snapshot_id": sid, "parent_snapshot_id": parent_sid,
                        "delta_upsert": upsert, "delta_remove": removed}
            else:
                snap = {"snapshot_id": sid, "parent_snapshot_id": None,
                        "delta_upsert": dict(m), "delta_remove": []}
            self.emitted_snaps.add(sid)
        mparents = [self.commits[p][0] for p in parents]
        meta: dict = {"git_commit": g}
        if len(parents) > 2:
            meta["extra_parents"] = mparents[2:]
            meta["git_extra_parents"] = parents[2:]
        cid = commit_id(mparents[:2], sid, message, committed_at, author)
        commit = {"commit_id": cid,
                  "parent_commit_id": mparents[0] if mparents else None,
                  "parent2_commit_id": mparents[1] if len(mparents) > 1 else None,
                  "snapshot_id": sid, "message": message, "author": author,
                  "committed_at": committed_at, "branch": branch, "metadata": meta}
        self.commits[g] = [cid, c["tree"], sid]
        if pending.get(g, 0) > 0:
            self._remember(g, m)
        return commit, snap, nbytes

    # -- a run ---------------------------------------------------------------

    def run(self, refs: list[tuple[str, str]], default_branch: str | None = None) -> dict:
        """Convert the new commits of `refs` [(git ref, branch)]; write their
        packs and update push.json.  Returns {packs (new entries), plan,
        converted, branch_heads, git_heads, changed_branches}."""
        git = self.git
        plan = self.load_plan()
        old_git_heads = dict(self.git_heads)
        known = [h for h in old_git_heads.values()]
        pending: dict[str, int] = {}
        work = []
        done_refs: list[str] = []
        total = 0
        shas = self.resolve([r for r, _ in refs])
        for (ref, branch), sha in zip(refs, shas):
            if old_git_heads.get(branch) == sha and sha in self.commits:
                work.append((branch, sha, [], set()))    # unchanged: no rev-list
                done_refs.append(sha)
                continue
            lines = git.out("rev-list", "--ignore-missing", "--topo-order", "--reverse",
                            "--parents", sha, "--not", *done_refs, *known).splitlines()
            done_refs.append(sha)
            order = []
            for line in lines:
                g, *ps = line.split()
                if g in self.commits:
                    continue
                order.append(g)
                for p in ps:
                    pending[p] = pending.get(p, 0) + 1
            chain = set(git.out("rev-list", "--ignore-missing", "--first-parent", sha,
                                "--not", *known).split()) if order else set()
            total += len(order)
            if order or old_git_heads.get(branch) != sha:
                self.log(f"{ref} -> branch {branch}: {len(order)} new commits")
            work.append((branch, sha, order, chain))

        new_entries: list[dict] = []
        n_done = 0
        t0 = time.monotonic()
        changed_branches = []
        for branch, sha, order, chain in work:
            old_sha = old_git_heads.get(branch)
            if not order and old_sha == sha and branch in self.branch_heads:
                continue
            changed_branches.append(branch)
            old_muse = self.branch_heads.get(branch)
            rewind = bool(old_sha and old_sha != sha and old_muse
                          and not self.is_ancestor(old_sha, sha))
            st = {"last": old_muse, "provisional": rewind, "first": True}
            chain_head: str | None = None
            chain_muse: set[str] = set()
            w = self._writer()
            size = 64

            def flush(head: str, w: PackWriter) -> None:
                force = st["provisional"]
                exp = st["last"] if st["provisional"] else None
                e = self._close(w, branch, head, force, exp)
                new_entries.append(e)
                st["provisional"] = head not in chain_muse
                st["last"] = head

            for g in order:
                new_blobs: list = []
                commit, snap, nb = self.convert_commit(g, branch, new_blobs, pending)
                cid = commit["commit_id"]
                n_done += 1
                self.stats["commits"] += 1
                if self.progress:
                    self.progress(n_done, total)
                elif n_done % 1000 == 0:
                    rate = n_done / max(time.monotonic() - t0, 1e-6)
                    self.log(f"{n_done}/{total} commits converted ({rate:.0f}/s), "
                             f"{len(new_entries)} packs written")
                if cid in self.emitted_commits:
                    continue
                self.emitted_commits.add(cid)
                n = len(msgpack.packb(commit, use_bin_type=True)) + nb + \
                    (len(msgpack.packb(snap, use_bin_type=True)) if snap else 0)
                if w.commits and (size + n > self.max_bytes or len(w.commits) >= self.max_commits):
                    flush(chain_head or w.commits[-1]["commit_id"], w)
                    w, size = self._writer(), 64
                w.add_commit(commit)
                if snap:
                    w.add_snapshot(snap)
                for oid, data, path in new_blobs:
                    w.add_blob(oid, data, path=path)
                size += n
                if g in chain:
                    chain_muse.add(cid)
                    chain_head = cid
            head = self.commits[sha][0]
            if w.commits or st["last"] != head:
                flush(head, w)
            else:
                w.close_discard()
            self.branch_heads[branch] = head
            self.git_heads[branch] = sha
        plan["packs"].extend(new_entries)
        plan["branch_heads"] = dict(self.branch_heads)
        plan["git_heads"] = dict(self.git_heads)
        plan["repo"] = self.repo
        if default_branch:
            plan["default_branch"] = default_branch
        elif "default_branch" not in plan and refs:
            plan["default_branch"] = refs[0][1]
        self.save_state()
        save_plan(self.plan_path, plan)
        plan["_dir"] = os.path.dirname(os.path.abspath(self.plan_path))
        return {"packs": new_entries, "plan": plan, "converted": n_done,
                "branch_heads": dict(self.branch_heads), "git_heads": dict(self.git_heads),
                "changed_branches": changed_branches}

    def _writer(self) -> PackWriter:
        fd_path = os.path.join(self.out_dir, f".pack-{os.getpid()}-{time.monotonic_ns()}.tmp")
        w = PackWriter(fd_path, self.version, tmpdir=self.out_dir)
        return w

    def _close(self, w: PackWriter, branch: str, head: str, force: bool,
               expected_old_head: str | None) -> dict:
        w.branch_heads[branch] = head
        closed = pack_closed(w.commits, w.snapshots, w.blob_ids())
        ids = [c["commit_id"] for c in w.commits] if len(w.commits) <= PLAN_COMMIT_IDS else None
        info = w.close()
        name = f"pack-{info['mpack_key'][7:23]}.mpack"
        os.replace(w.path, os.path.join(self.out_dir, name))
        e = {"file": name, "mpack_key": info["mpack_key"], "size_bytes": info["size_bytes"],
             "head": head, "branch": branch, "commits": info["commits"],
             "snapshots": info["snapshots"], "blobs": info["blobs"],
             "format": self.version, "closed": closed}
        if ids:
            e["commit_ids"] = ids   # a small pack goes unread (Pusher.push_pack)
        if force:
            e["force"] = True
        if expected_old_head:
            e["expected_old_head"] = expected_old_head
        self.log(f"wrote {name}: {e['commits']} commits, {e['snapshots']} snapshots, "
                 f"{e['blobs']} blobs, {e['size_bytes']} bytes (v{self.version}) -> "
                 f"{branch} @ {head[:19]}")
        return e

    def close(self) -> None:
        self.git.close()
