"""git2muse: git history -> mpacks -> push -> fetch -> checkout == git.

The offline tests (no server) check the conversion itself: every id
recomputed, every branch head's files equal to git's.  The online tests
push the packs, compare the server's refs with push.json and check out the
fetched head."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import muselib

OWNER = "gabriel"
ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
PY = "/usr/bin/python3"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def git(repo, *args, env=None, input=None) -> str:
    e = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=str(repo))
    e.update(env or {})
    r = subprocess.run(["git", "-C", str(repo), *args], env=e, input=input,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert r.returncode == 0, (args, r.stderr.decode())
    return r.stdout.decode()


def commit(repo, msg, when, tz="+0000"):
    d = f"{when} {tz}"
    git(repo, "commit", "-q", "--allow-empty", "-m", msg,
        env={"GIT_AUTHOR_DATE": d, "GIT_COMMITTER_DATE": d})


def make_git_repo(path: Path) -> Path:
    """A small repository with the awkward cases: binary, empty and
    executable files, a symlink, a rename, a delete, a file replaced by a
    directory, a merge, an octopus merge, a submodule gitlink, a commit in
    ISO-8859-1 and one whose message holds a NUL byte."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "Ann Example")
    git(path, "config", "user.email", "ann@example.com")
    (path / "src").mkdir()
    (path / "src" / "a.txt").write_text("hello\n")
    (path / "src" / "bin.dat").write_bytes(bytes(range(256)) * 4 + b"\0\0\xff")
    (path / "docs").mkdir()
    (path / "docs" / "readme.md").write_text("# readme\n")
    (path / "ünï cödé.txt").write_text("utf-8 name\n")
    git(path, "add", "-A")
    commit(path, "root commit", 1700000000, "+0530")
    git(path, "mv", "src/a.txt", "src/renamed.txt")
    commit(path, "rename", 1700000100, "-0800")
    git(path, "rm", "-q", "docs/readme.md")
    commit(path, "delete", 1700000200)
    os.symlink("src/renamed.txt", path / "link")
    (path / "empty").write_bytes(b"")
    (path / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(path / "run.sh", 0o755)
    git(path, "add", "-A")
    commit(path, "symlink, empty, exec\n\nwith a body\n", 1700000300)
    # a file becomes a directory
    (path / "thing").write_text("file\n")
    git(path, "add", "-A")
    commit(path, "thing file", 1700000350)
    git(path, "rm", "-q", "thing")
    (path / "thing").mkdir()
    (path / "thing" / "inner.txt").write_text("now a dir\n")
    git(path, "add", "-A")
    commit(path, "thing dir", 1700000360)
    # branches and merges
    for b, n in (("feature", 1), ("b2", 2), ("b3", 3)):
        git(path, "checkout", "-q", "-b", b, "main")
        (path / f"{b}.txt").write_text(f"{b}\n")
        git(path, "add", "-A")
        commit(path, f"{b} work", 1700000400 + n)
    git(path, "checkout", "-q", "main")
    (path / "main-only.txt").write_text("main\n")
    git(path, "add", "-A")
    commit(path, "main work", 1700000500)
    d = "1700000600 +0200"
    git(path, "merge", "-q", "--no-ff", "feature", "-m", "merge feature",
        env={"GIT_AUTHOR_DATE": d, "GIT_COMMITTER_DATE": d})
    d = "1700000700 +0000"
    git(path, "merge", "-q", "--no-ff", "b2", "b3", "-m", "octopus",
        env={"GIT_AUTHOR_DATE": d, "GIT_COMMITTER_DATE": d})
    # a submodule gitlink (skipped by git2muse)
    head = git(path, "rev-parse", "HEAD").strip()
    git(path, "update-index", "--add", "--cacheinfo", f"160000,{head},vendor/sub")
    commit(path, "add submodule", 1700000800)
    # a latin-1 commit with a NUL in its message (git refuses it in
    # `commit`, so write the object by hand), on its own branch
    tree = git(path, "rev-parse", "HEAD^{tree}").strip()
    parent = git(path, "rev-parse", "HEAD").strip()
    raw = (f"tree {tree}\nparent {parent}\n"
           f"author Bj\xf6rn <b@example.com> 1700000900 -0330\n"
           f"committer Bj\xf6rn <b@example.com> 1700000900 -0330\n"
           f"encoding ISO-8859-1\n\nnul\0inside caf\xe9\n").encode("latin-1")
    oid = git(path, "hash-object", "-t", "commit", "--literally", "-w", "--stdin",
              input=raw).strip()
    git(path, "update-ref", "refs/heads/odd", oid)
    return path


def git_files(repo, rev) -> dict[str, bytes]:
    """path -> content of every blob (files and symlinks) at rev."""
    out = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "-z", rev],
                         stdout=subprocess.PIPE, check=True).stdout
    files = {}
    for ent in out.split(b"\0"):
        if not ent:
            continue
        meta, path = ent.split(b"\t", 1)
        _mode, typ, oid = meta.split()
        if typ != b"blob":
            continue
        files[path.decode()] = subprocess.run(
            ["git", "-C", str(repo), "cat-file", "blob", oid.decode()],
            stdout=subprocess.PIPE, check=True).stdout
    return files


def git2muse(repo, out_dir, *args) -> dict:
    r = subprocess.run([PY, str(SCRIPTS / "git2muse"), "--repo", str(repo),
                        "--out-dir", str(out_dir), *args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    plan = muselib.load_plan(str(Path(out_dir) / "push.json"))
    plan["_stderr"] = r.stderr.decode()
    return plan


def verify_plan(plan) -> tuple[dict, dict, dict]:
    """Check every pack of a plan offline, in push order: hashes, parents
    in earlier packs, snapshot and commit ids, blob ids, completeness.
    Returns (manifests by snapshot id, commits by id, blobs by id)."""
    manifests, commits, blobs = {}, {}, {}
    for e in plan["packs"]:
        data = (Path(plan["_dir"]) / e["file"]).read_bytes()
        assert muselib.blob_id(data) == e["mpack_key"]
        assert len(data) == e["size_bytes"]
        pack = muselib.parse_mpack(data)
        assert pack["version"] == e.get("format", 1) and pack["version"] in (1, 2)
        mine = {c["commit_id"] for c in pack["commits"]}
        for c in pack["commits"]:
            for p in muselib.commit_parents(c):
                assert p in commits or p in mine, "parent after child"
        manifests.update(muselib.rebuild_and_verify(pack, manifests, known_objects=blobs))
        commits.update({c["commit_id"]: c for c in pack["commits"]})
        blobs.update({b["object_id"]: b["content"] for b in pack["blobs"]})
        assert e["head"] in commits
    return manifests, commits, blobs


def files_of(manifests, commits, blobs, head) -> dict[str, bytes]:
    m = manifests[commits[head]["snapshot_id"]]
    return {p: blobs[o] for p, o in m.items()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_git_repo(tmp_path_factory.mktemp("git") / "repo")


# ---------------------------------------------------------------------------
# offline
# ---------------------------------------------------------------------------

def test_convert_synthetic(synth, tmp_path):
    plan = git2muse(synth, tmp_path / "out", "--all")
    manifests, commits, blobs = verify_plan(plan)
    branches = {"main", "feature", "b2", "b3", "odd"}
    assert set(plan["branch_heads"]) == branches
    n_git = len(git(synth, "rev-list", "--all").split())
    assert len(commits) == n_git
    for br, head in plan["branch_heads"].items():
        assert plan["git_heads"][br] == git(synth, "rev-parse", br).strip()
        assert files_of(manifests, commits, blobs, head) == git_files(synth, br), br
    by_git = {c["metadata"]["git_commit"]: c for c in commits.values()}
    # merges
    merge = by_git[git(synth, "rev-parse", "main~1").strip()]   # octopus
    assert merge["message"] == "octopus\n"
    assert merge["parent2_commit_id"]
    assert len(merge["metadata"]["extra_parents"]) == 1
    assert merge["metadata"]["extra_parents"][0] in commits
    fm = by_git[git(synth, "rev-parse", "main~2").strip()]
    assert fm["message"] == "merge feature\n" and fm["parent2_commit_id"]
    assert fm["committed_at"] == "2023-11-15T00:23:20+02:00"
    # authors, dates, odd messages
    root = by_git[git(synth, "rev-list", "--max-parents=0", "main").strip()]
    assert root["author"] == "Ann Example <ann@example.com>"
    assert root["committed_at"] == "2023-11-15T03:43:20+05:30"
    assert root["parent_commit_id"] is None
    odd = commits[plan["branch_heads"]["odd"]]
    assert odd["message"] == "nul\ufffdinside caf\u00e9\n"
    assert odd["author"] == "Bj\u00f6rn <b@example.com>"
    assert odd["committed_at"] == "2023-11-14T18:58:20-03:30"
    assert "message contains NUL" in plan["_stderr"]
    assert "submodule" in plan["_stderr"] and "vendor/sub" in plan["_stderr"]
    # the symlink is its target, the file->dir change is right
    head_files = files_of(manifests, commits, blobs, plan["branch_heads"]["main"])
    assert head_files["link"] == b"src/renamed.txt"
    assert "thing/inner.txt" in head_files and "thing" not in head_files
    assert "vendor/sub" not in head_files


def test_split_packs_same_ids(synth, tmp_path):
    whole = git2muse(synth, tmp_path / "whole", "--all")
    split = git2muse(synth, tmp_path / "split", "--all", "--max-pack-bytes", "1500")
    assert len(split["packs"]) > len(whole["packs"]) + 3
    assert split["branch_heads"] == whole["branch_heads"]
    _, c1, _ = verify_plan(whole)
    _, c2, _ = verify_plan(split)
    assert c1 == c2
    # branch moves in a plan are fast-forwards unless marked force
    for e in split["packs"]:
        if e.get("force"):
            assert e.get("expected_old_head")


def test_split_packs_by_commits(synth, tmp_path):
    """--max-pack-commits N: no pack holds more than N commits (a server
    holds a pushed pack's metadata whole), the same commits and heads as
    one conversion; 0 is a usage error."""
    whole = git2muse(synth, tmp_path / "whole", "--all")
    split = git2muse(synth, tmp_path / "split", "--all", "--max-pack-commits", "3")
    assert max(e["commits"] for e in whole["packs"]) > 3
    assert all(e["commits"] <= 3 for e in split["packs"]), [e["commits"] for e in split["packs"]]
    assert sum(e["commits"] for e in split["packs"]) == sum(e["commits"] for e in whole["packs"])
    assert split["branch_heads"] == whole["branch_heads"]
    assert verify_plan(whole)[1] == verify_plan(split)[1]
    r = subprocess.run([PY, str(SCRIPTS / "git2muse"), "--repo", str(synth), "--out-dir",
                        str(tmp_path / "bad"), "--max-pack-commits", "0"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 2 and b"--max-pack-commits must be at least 1" in r.stderr, r.stderr


def test_single_ref_rename(synth, tmp_path):
    plan = git2muse(synth, tmp_path / "o", "--ref", "feature:imported")
    assert set(plan["branch_heads"]) == {"imported"}
    verify_plan(plan)


# ---------------------------------------------------------------------------
# online
# ---------------------------------------------------------------------------

def push_and_check(server, hub, repo, plan, git_repo, use_cli=False):
    if use_cli:
        r = subprocess.run([PY, str(SCRIPTS / "muse-push"), "--url", server.url,
                            "--owner", OWNER, "--repo", repo["slug"], *V1, "--plan",
                            str(Path(plan["_dir"]) / "push.json")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
        assert r.returncode == 0, (r.stdout.decode(), r.stderr.decode())
    else:
        muselib.push_plan(hub, OWNER, repo["slug"], plan)
    refs = hub.refs(OWNER, repo["slug"])
    assert refs["branch_heads"] == plan["branch_heads"]
    for br, head in plan["branch_heads"].items():
        out = hub.clone(OWNER, repo["slug"], [head])
        pack = out["pack"]
        blobs = {b["object_id"]: b["content"] for b in pack["blobs"]}
        c = next(c for c in pack["commits"] if c["commit_id"] == head)
        files = {p: blobs[o] for p, o in out["manifests"][c["snapshot_id"]].items()}
        assert files == git_files(git_repo, plan["git_heads"][br]), br


# The online tests convert and push with --format 1: they check out what
# they pushed through a fetch, and the fetch builder reads v1 source packs
# only until it reads v2 ones too (test_push_v2.py covers v2 pushes).
V1 = ("--format", "1")


def test_push_synthetic(server, hub, repo, synth, tmp_path):
    plan = git2muse(synth, tmp_path / "out", "--all", *V1)
    push_and_check(server, hub, repo, plan, synth)
    # checkout through the command-line client equals git's tree
    wc = tmp_path / "wc"
    r = subprocess.run([PY, str(SCRIPTS / "muse-fetch"), "--url", server.url,
                        "--owner", OWNER, "--repo", repo["slug"], "--branch", "main",
                        "--checkout", str(wc)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    got = {str(p.relative_to(wc)): p.read_bytes() for p in wc.rglob("*") if p.is_file()}
    assert got == git_files(synth, "main")


def test_push_split_plan_with_cli(server, hub, repo, synth, tmp_path):
    plan = git2muse(synth, tmp_path / "out", "--all", "--max-pack-bytes", "1500", *V1)
    push_and_check(server, hub, repo, plan, synth, use_cli=True)
    # pushing the same plan again changes nothing
    again = muselib.push_plan(hub, OWNER, repo["slug"], plan)
    assert all(r["commits_written"] == 0 for r in again)


def test_push_plan_split_by_commits(server, hub, repo, synth, tmp_path):
    plan = git2muse(synth, tmp_path / "out", "--all", "--max-pack-commits", "4", *V1)
    assert len(plan["packs"]) > 3
    push_and_check(server, hub, repo, plan, synth, use_cli=True)


def test_own_repository(server, hub, repo, tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q", "HEAD"],
                      stdout=subprocess.PIPE).returncode != 0:
        pytest.skip("this checkout has no commits yet")
    plan = git2muse(ROOT, tmp_path / "out", "--ref", "HEAD:main", *V1)
    verify_plan(plan)
    push_and_check(server, hub, repo, plan, ROOT)


def test_interrupted_plan_resumes(server, hub, repo, synth, tmp_path):
    plan = git2muse(synth, tmp_path / "out", "--all", "--max-pack-bytes", "1500", *V1)
    k = len(plan["packs"]) // 2
    part = dict(plan, packs=plan["packs"][:k])
    muselib.push_plan(hub, OWNER, repo["slug"], part)     # "crashes" half-way
    done = muselib.plan_resume_point(plan, hub.refs(OWNER, repo["slug"])["branch_heads"])
    assert done and max(done) < k
    muselib.push_plan(hub, OWNER, repo["slug"], plan)
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == plan["branch_heads"]
