"""The command-line clients against the real server: incremental push,
git2muse's incremental conversion, muse-mirror, streaming transfers in
bounded memory, and every error path ending in one line and a non-zero
exit (no traceback).

The tools send mpack v2 by default; tests that pin a format say so
(--format 1 or 2)."""
from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest

import muse
from e2e_util import unique
from test_git2muse import commit as git_commit
from test_git2muse import git, git_files, make_git_repo

OWNER = "gabriel"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
PY = "/usr/bin/python3"

def tool(name: str, *args: str, ok: bool = True, rss_out: Path | None = None,
         timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    cmd = [PY, str(SCRIPTS / name), *args]
    env = dict(os.environ)
    if rss_out is not None:
        cmd = [PY, str(SCRIPTS / "rsswrap.py"), str(SCRIPTS / name), *args]
        env["RSS_OUT"] = str(rss_out)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, env=env, **kw)
    if ok:
        assert r.returncode == 0, (r.stdout, r.stderr)
    return r


@pytest.fixture(scope="module")
def gsrv(server_factory):
    """A server with a database of its own, for the tests that push git
    histories.  Objects are global: a blob those histories share with other
    suites (the empty file, say) would otherwise be stored first in one of
    our packs, and a later suite on the shared server that asserts which
    pack holds its blob would see ours."""
    return server_factory()


@pytest.fixture
def ghub(gsrv):
    h = gsrv.hub()
    yield h
    h.close()


def one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The tool failed with `code` and exactly one line on stderr, no
    traceback, mentioning every needle."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def push_args(server, slug: str, *more: str) -> list[str]:
    return ["--url", server.url, "--owner", OWNER, "--repo", slug, *more]


def json_lines(out: str) -> list[dict]:
    return [json.loads(ln) for ln in out.splitlines() if ln.strip()]


def write_pack(h: muse.History, path: Path, version: int) -> Path:
    path.write_bytes(h.pack(version) if version < 2 else muse.build_mpack(
        h.commits, h.snapshots, h.blobs, version=2))
    return path


# ---------------------------------------------------------------------------
# incremental push
# ---------------------------------------------------------------------------

def incremental_push(server, repo, tmp_path, fmt: str):
    seed = unique("inc")
    base = muse.generate(commits=20, files=30, changed=3, blob_size=400, seed=seed)
    more = muse.generate(commits=21, files=30, changed=3, blob_size=400, seed=seed)
    assert more.commits[:20] == base.commits
    first = write_pack(base, tmp_path / "base.mpack", 1)
    r = tool("muse-push", *push_args(server, repo["slug"], "--json", "--format", fmt, str(first)))
    (res,) = json_lines(r.stdout)
    assert res["sent"]["commits"] == 20 and res["commits_written"] == 20
    # the whole history plus one commit: only that commit travels
    full = write_pack(more, tmp_path / "full.mpack", 1)
    r = tool("muse-push", *push_args(server, repo["slug"], "--json", "--format", fmt, str(full)))
    (res,) = json_lines(r.stdout)
    new_blobs = {b["object_id"] for b in more.blobs} - {b["object_id"] for b in base.blobs}
    assert len(new_blobs) == 3
    assert res["sent"] == {"commits": 1, "snapshots": 1, "blobs": 3,
                           "bytes": res["uploaded_bytes"], "version": int(fmt)}
    assert res["commits_written"] == 1 and res["head"] == more.head
    assert res["uploaded_bytes"] < full.stat().st_size / 20
    # what the server stored is exactly that commit, its snapshot, its blobs
    stored = muse.parse_mpack(server.store_path(res["mpack_key"]).read_bytes())
    assert [c["commit_id"] for c in stored["commits"]] == [more.head]
    assert {b["object_id"] for b in stored["blobs"]} == new_blobs
    assert stored["version"] == int(fmt)
    # pushing it again: up to date, nothing sent
    r = tool("muse-push", *push_args(server, repo["slug"], "--json", "--format", fmt, str(full)))
    (res,) = json_lines(r.stdout)
    assert res["up_to_date"] is True and res["uploaded_bytes"] == 0
    return more


def test_incremental_push_v1(server, hub, repo, tmp_path):
    more = incremental_push(server, repo, tmp_path, "1")
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": more.head}


def test_incremental_push_v2(server, hub, repo, tmp_path):
    more = incremental_push(server, repo, tmp_path, "2")
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": more.head}


def test_default_format_is_v2(server, hub, repo, db, tmp_path):
    """Without --format the pack sent is v2 (a v1 file is re-encoded) and
    the server keeps it as sent: frames rows, no warning, no second
    format."""
    h = muse.generate(commits=5, files=10, changed=2, blob_size=100, seed=unique("fmt"))
    pack = write_pack(h, tmp_path / "h.mpack", 1)
    r = tool("muse-push", *push_args(server, repo["slug"], "--json", str(pack)))
    (res,) = json_lines(r.stdout)
    assert res["commits_written"] == 5 and res["sent"]["version"] == 2
    assert "warning" not in r.stderr, r.stderr
    assert hub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": h.head}
    rid = repo["repo_id"]
    (key,) = [k for (k,) in db.rows(f"SELECT mpack_id FROM mpack_refs WHERE repo_id = '{rid}'")]
    assert db.count(f"SELECT count(*) FROM mpack_frames WHERE mpack_id = '{key}'") >= 1


def test_refused_v2_pack_is_an_error(server, repo, tmp_path):
    """A pack the server refuses is reported as refused (one line, exit 1),
    never sent again in another format."""
    h = muse.generate(commits=2, files=3, changed=1, blob_size=50, seed=unique("bad2"))
    bad = {"commit_id": "sha256:" + "0" * 64}  # ids are recomputed: a lie is refused
    commits = [dict(c, **bad) if i == 1 else c for i, c in enumerate(h.commits)]
    data = muse.build_mpack(commits, h.snapshots, h.blobs, version=2)
    pack = tmp_path / "bad.mpack"
    pack.write_bytes(data)
    r = tool("muse-push", *push_args(server, repo["slug"], "--head", bad["commit_id"], str(pack)),
             ok=False)
    line = one_line_error(r, 1, "422")
    assert "v1" not in line and "sent" not in r.stderr.lower()


def test_musegen_writes_v2_by_default(tmp_path):
    r = tool("musegen", "--commits", "6", "--files", "10", "--out", str(tmp_path / "g.mpack"))
    info = json.loads(r.stdout)
    data = (tmp_path / "g.mpack").read_bytes()
    assert data[:5] == b"MUSE\x02" and info["format"] == 2
    assert info["mpack_key"] == muse.blob_id(data) and info["size_bytes"] == len(data)
    p = muse.parse_mpack(data)
    assert muse.pack_tips(p["commits"]) == [info["head"]]
    assert info["head"] == muse.generate(commits=6, files=10).head


# ---------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------

def test_fetch_checkout_and_formats(server, hub, repo, tmp_path):
    h = muse.generate(commits=8, files=12, changed=2, blob_size=200, seed=unique("f"))
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    contents = {b["object_id"]: b["content"] for b in h.blobs}
    wc = tmp_path / "wc"
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--checkout", str(wc), "--json"))
    out = json.loads(r.stdout)
    assert out["commit_count"] == 8 and out["checked_out_files"] == 12
    assert out["mpack_version"] in (1, 2)
    files = {str(p.relative_to(wc)): p.read_bytes() for p in wc.rglob("*") if p.is_file()}
    assert files == {p: contents[o] for p, o in h.manifest.items()}
    # --format 1 asks for formats [1]: the answer is v1
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--format", "1", "--json",
                                      "--out", str(tmp_path / "p.mpack")))
    out = json.loads(r.stdout)
    assert (out["mpack_version"] or 1) == 1
    assert (tmp_path / "p.mpack").read_bytes()[:5] == b"MUSE\x01"


def two_more_into_state(server, hub, repo, h: muse.History, seed: str, st: Path,
                        wc: Path) -> dict:
    """Pushes two commits on top of h (8 commits of 12 files), then
    muse-fetch --state st --checkout wc: checks that only those two came
    and that wc holds the new head's files; returns the tool's JSON."""
    h2 = muse.generate(commits=2, files=12, changed=2, blob_size=200, seed=seed,
                       parent=(h.head, h.manifest), first_index=8)
    hub.push(OWNER, repo["slug"], h2.pack(), "main", h2.head)
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--state", str(st), "--json",
                                      "--checkout", str(wc)))
    out = json.loads(r.stdout)
    assert out["commit_count"] == 2
    contents = {x["object_id"]: x["content"] for x in h.blobs + h2.blobs}
    got = {str(p.relative_to(wc)): p.read_bytes() for p in wc.rglob("*") if p.is_file()}
    assert got == {p: contents[o] for p, o in h2.manifest.items()}
    return out


def test_fetch_v2_same_ids_as_v1(server, hub, repo, tmp_path):
    seed = unique("f2")
    h = muse.generate(commits=8, files=12, changed=2, blob_size=200, seed=seed)
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    outs = {}
    for fmt in ("1", "2"):
        p = tmp_path / f"p{fmt}.mpack"
        r = tool("muse-fetch", *push_args(server, repo["slug"], "--format", fmt, "--json",
                                          "--out", str(p)))
        outs[fmt] = (json.loads(r.stdout), muse.parse_mpack(p.read_bytes()))
    assert outs["2"][0]["mpack_version"] == 2 and outs["2"][1]["version"] == 2
    a, b = outs["1"][1], outs["2"][1]
    assert a["commits"] == b["commits"] and a["snapshots"] == b["snapshots"]
    assert {x["object_id"]: x["content"] for x in a["blobs"]} == \
        {x["object_id"]: x["content"] for x in b["blobs"]}
    # a v2 state: an incremental fetch, then a checkout from pack + state
    st = tmp_path / "st"
    tool("muse-fetch", *push_args(server, repo["slug"], "--state", str(st)))
    out = two_more_into_state(server, hub, repo, h, seed, st, tmp_path / "wc")
    assert out["mpack_version"] == 2


def test_fetch_depth(server, hub, repo, tmp_path):
    """muse-fetch --depth N: a shallow clone (SPEC 4.4) that verifies on its
    own and checks out, then an incremental fetch into its state."""
    seed = unique("d")
    h = muse.generate(commits=8, files=12, changed=2, blob_size=200, seed=seed)
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    contents = {b["object_id"]: b["content"] for b in h.blobs}
    wc = tmp_path / "wc"
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--depth", "1", "--checkout",
                                      str(wc), "--json"))
    out = json.loads(r.stdout)
    assert out["commit_count"] == 1 and out["shallow"] == [h.head]
    files = {str(p.relative_to(wc)): p.read_bytes() for p in wc.rglob("*") if p.is_file()}
    assert files == {p: contents[o] for p, o in h.manifest.items()}
    st = tmp_path / "st"
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--depth", "3", "--state", str(st),
                                      "--json"))
    out = json.loads(r.stdout)
    assert out["commit_count"] == 3 and out["shallow"] == [h.commits[-3]["commit_id"]]
    out = two_more_into_state(server, hub, repo, h, seed, st, tmp_path / "wc2")
    assert out["have"] == [h.head]
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--depth", "0"), ok=False)
    assert r.returncode == 2 and "--depth must be at least 1" in r.stderr


def test_fetch_have_without_state(server, hub, repo, tmp_path):
    """--have without --state saves what is new (--out) after verifying
    what the pack alone proves; with --checkout, or without --out, it is
    refused up front with a message that says why."""
    a = muse.generate(commits=4, files=6, changed=2, blob_size=50, seed=unique("hv"))
    hub.push(OWNER, repo["slug"], a.pack(), "main", a.head)
    b = muse.generate(commits=2, files=6, changed=2, blob_size=50, seed=unique("hv"),
                      parent=(a.head, a.manifest), first_index=4)
    hub.push(OWNER, repo["slug"], b.pack(), "main", b.head)
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--have", a.head, "--json",
                                      "--out", str(tmp_path / "new.mpack")))
    out = json.loads(r.stdout)
    assert out["commit_count"] == 2 and out["have"] == [a.head]
    saved = muse.parse_mpack((tmp_path / "new.mpack").read_bytes())
    assert [c["commit_id"] for c in saved["commits"]] == [c["commit_id"] for c in b.commits]
    for extra in (["--checkout", str(tmp_path / "wc")], []):
        r = tool("muse-fetch", *push_args(server, repo["slug"], "--have", a.head, *extra),
                 ok=False)
        one_line_error(r, 2, "--state")
    assert not (tmp_path / "wc").exists()
    # with a state it all works: the state supplies the --have commits
    st = tmp_path / "st"
    tool("muse-fetch", *push_args(server, repo["slug"], "--want", a.head, "--state", str(st)))
    wc = tmp_path / "wc3"
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--have", a.head, "--state", str(st),
                                      "--checkout", str(wc), "--json"))
    assert json.loads(r.stdout)["commit_count"] == 2


# ---------------------------------------------------------------------------
# error paths: one line, non-zero exit, no traceback
# ---------------------------------------------------------------------------

def test_checkout_refuses_non_empty_dir(server, hub, repo, tmp_path):
    h = muse.generate(commits=2, files=3, changed=1, blob_size=10, seed=unique("ne"))
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    wc = tmp_path / "wc"
    wc.mkdir()
    (wc / "mine.txt").write_text("keep me")
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--checkout", str(wc)), ok=False)
    one_line_error(r, 2, "not an empty directory")
    assert [p.name for p in wc.iterdir()] == ["mine.txt"]
    # an empty directory is fine
    (wc / "mine.txt").unlink()
    tool("muse-fetch", *push_args(server, repo["slug"], "--checkout", str(wc)))
    assert len(list(wc.rglob("*.py"))) == 3


def test_error_paths(server, repo, tmp_path):
    # no server
    r = tool("muse-push", "--url", "http://127.0.0.1:9", "--owner", OWNER, "--repo", "x",
             "--plan", str(tmp_path / "nothing.json"), ok=False)
    one_line_error(r, 1, "nothing.json")
    junk = tmp_path / "junk.mpack"
    junk.write_bytes(b"MUSE\x01\xc1garbage")
    r = tool("muse-fetch", "--url", "http://127.0.0.1:9", "--owner", OWNER, "--repo", "x",
             ok=False)
    one_line_error(r, 1, "127.0.0.1:9", "refused")
    # unknown repository
    r = tool("muse-fetch", *push_args(server, unique("nope")), ok=False)
    one_line_error(r, 1, "404")
    # an unknown branch names the ones there are
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--branch", "nope"), ok=False)
    one_line_error(r, 1, "'nope' does not exist")
    # a pack that is not one
    r = tool("muse-push", *push_args(server, repo["slug"], str(junk)), ok=False)
    one_line_error(r, 1, "bad pack")
    r = tool("muse-push", *push_args(server, repo["slug"], str(tmp_path / "missing.mpack")),
             ok=False)
    one_line_error(r, 2, "missing.mpack")
    # a bad id
    r = tool("muse-fetch", *push_args(server, repo["slug"], "--want", "abc"), ok=False)
    one_line_error(r, 2, "not a commit id")
    # git2muse outside a git repository
    r = tool("git2muse", "--repo", str(tmp_path), "--out-dir", str(tmp_path / "o"), ok=False)
    one_line_error(r, 1, "not a git repository")
    # a refused push (not a fast-forward) is the server's one-line answer
    a = muse.generate(commits=2, files=3, changed=1, blob_size=10, seed=unique("a"))
    b = muse.generate(commits=2, files=3, changed=1, blob_size=10, seed=unique("b"))
    pa, pb = write_pack(a, tmp_path / "a.mpack", 1), write_pack(b, tmp_path / "b.mpack", 1)
    tool("muse-push", *push_args(server, repo["slug"], "--format", "1", str(pa)))
    r = tool("muse-push", *push_args(server, repo["slug"], "--format", "1", str(pb)), ok=False)
    one_line_error(r, 1, "409")
    # --debug adds the traceback
    r = tool("muse-push", *push_args(server, repo["slug"], "--debug", str(junk)), ok=False)
    assert r.returncode == 1 and "Traceback" in r.stderr and "bad pack" in r.stderr


def test_create_plan_sets_default_branch(gsrv, ghub, tmp_path):
    """--create --plan makes the plan's branch the default, or says why it
    could not (a server without PATCH /api/repos)."""
    g = make_git_repo(tmp_path / "g")
    git(g, "branch", "-m", "main", "trunk")
    out = tmp_path / "o"
    tool("git2muse", "--repo", str(g), "--out-dir", str(out), "--format", "1", "-q")
    slug = unique("dflt")
    r = tool("muse-push", *push_args(gsrv, slug, "--create", "--plan", str(out / "push.json")))
    repo = ghub.get_repo(ghub.refs(OWNER, slug)["repo_id"])
    if repo["default_branch"] != "trunk":
        warns = [ln for ln in r.stderr.splitlines() if "default branch" in ln]
        assert len(warns) == 1 and "could not set the default branch to 'trunk'" in warns[0]
    ghub.delete_repo(repo["repo_id"])


def test_progress_on_a_terminal(server, repo, tmp_path):
    """Progress (bytes, rate) goes to stderr when it is a terminal, and
    nowhere with --quiet or when it is not."""
    h = muse.generate(commits=3, files=40, changed=2, blob_size=20_000, seed=unique("tty"))
    pack = write_pack(h, tmp_path / "p.mpack", 1)
    master, slave = pty.openpty()
    p = subprocess.Popen([PY, str(SCRIPTS / "muse-push"),
                          *push_args(server, repo["slug"], "--format", "1", str(pack))],
                         stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 4096)
        except OSError:
            break
        if not b:
            break
        chunks.append(b)
    assert p.wait(60) == 0
    os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert "upload" in tty and "MB/s" in tty and "\r" in tty
    q = tool("muse-fetch", *push_args(server, repo["slug"], "--quiet",
                                      "--checkout", str(tmp_path / "wc")))
    assert q.stderr == "" and q.stdout == ""
    n = tool("muse-fetch", *push_args(server, repo["slug"], "--checkout", str(tmp_path / "wc2")))
    assert "MB/s" not in n.stderr and "fetched 3 commits" in n.stderr


# ---------------------------------------------------------------------------
# git2muse incremental, muse-mirror
# ---------------------------------------------------------------------------

def test_git2muse_incremental_push(gsrv, ghub, tmp_path):
    repo = ghub.create_repo(OWNER, unique("g2m"))
    g = make_git_repo(tmp_path / "g")
    out = tmp_path / "o"
    first = json.loads(tool("git2muse", "--repo", str(g), "--out-dir", str(out),
                            "--ref", "main", "--format", "1").stdout)
    assert first["converted"] > 5
    tool("muse-push", *push_args(gsrv, repo["slug"], "--format", "1", "--plan", str(out / "push.json")))
    # nothing new in git: nothing converted, nothing pushed
    again = json.loads(tool("git2muse", "--repo", str(g), "--out-dir", str(out),
                            "--ref", "main", "--format", "1").stdout)
    assert again["converted"] == 0 and again["packs"] == 0
    # one new git commit: one new small pack with that commit only
    (g / "new.txt").write_text("a new file\n")
    git(g, "add", "-A")
    git_commit(g, "one more", 1700001000)
    inc = json.loads(tool("git2muse", "--repo", str(g), "--out-dir", str(out),
                          "--ref", "main", "--format", "1").stdout)
    assert inc["converted"] == 1 and inc["packs"] == 1
    plan = json.loads((out / "push.json").read_text())
    last = plan["packs"][-1]
    assert (last["commits"], last["snapshots"], last["blobs"]) == (1, 1, 1)
    r = tool("muse-push", *push_args(gsrv, repo["slug"], "--json", "--format", "1",
                                     "--plan", str(out / "push.json")))
    results = json_lines(r.stdout)
    assert len(results) == 1 and results[0]["commits_written"] == 1
    assert results[0]["uploaded_bytes"] == last["size_bytes"] < 4096
    assert ghub.refs(OWNER, repo["slug"])["branch_heads"]["main"] == inc["branch_heads"]["main"]
    # the fetched head is git's tree
    wc = tmp_path / "wc"
    tool("muse-fetch", *push_args(gsrv, repo["slug"], "--checkout", str(wc)))
    got = {str(p.relative_to(wc)): p.read_bytes() for p in wc.rglob("*") if p.is_file()}
    assert got == git_files(g, "main")


def imported(name: str, *args: str, ok: bool = True) -> tuple[subprocess.CompletedProcess, set]:
    """Run a tool under -X importtime: (its result, the modules it imported)."""
    r = subprocess.run([PY, "-X", "importtime", str(SCRIPTS / name), *args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    mods = {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines()
            if ln.startswith("import time:") and "|" in ln}
    if ok:
        assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    return r, mods


def test_start_up_imports(gsrv, ghub, tmp_path):
    """Issue 19: a one-commit push of a git2muse plan loads neither the
    idna codec (an ASCII host name is resolved as bytes, and a name like
    `localhost` still connects) nor zstandard and tempfile (the entry
    lists its commit and the server knows none of it: the pack goes
    unread); --help and usage errors load no HTTP client and no
    zstandard.  An internationalised host name still goes through idna
    (it is resolved, not refused)."""
    for t in ("muse-push", "muse-fetch"):
        r, mods = imported(t, "--help")
        assert "usage:" in r.stdout
        assert not mods & {"http.client", "ssl", "zstandard", "muse.hub", "tempfile"}, t
    r, mods = imported("muse-push", "--owner", OWNER, ok=False)
    assert r.returncode == 2 and "http.client" not in mods
    repo = ghub.create_repo(OWNER, unique("boot"))
    g = make_git_repo(tmp_path / "g")
    out = tmp_path / "o"
    tool("git2muse", "--repo", str(g), "--out-dir", str(out), "--ref", "main")
    url = gsrv.url.replace("127.0.0.1", "localhost")
    args = ["--url", url, "--owner", OWNER, "--repo", repo["slug"], "--json", "-q",
            "--plan", str(out / "push.json")]
    tool("muse-push", *args)
    (g / "boot.txt").write_text("one more line\n")
    git(g, "add", "-A")
    git_commit(g, "boot", 1700002000)
    tool("git2muse", "--repo", str(g), "--out-dir", str(out), "--ref", "main")
    r, mods = imported("muse-push", *args)
    (res,) = json_lines(r.stdout)
    assert res["commits_written"] == 1 and res["sent"]["version"] == 2
    plan = json.loads((out / "push.json").read_text())
    last = plan["packs"][-1]
    assert last["closed"] is True and last["commit_ids"] == [res["head"]]
    assert res["uploaded_bytes"] == last["size_bytes"] and res["mpack_key"] == last["mpack_key"]
    assert "http.client" in mods and "muse.push" in mods  # the test sees imports
    assert not mods & {"encodings.idna", "stringprep", "zstandard", "tempfile"}, mods
    assert ghub.refs(OWNER, repo["slug"])["branch_heads"]["main"] == res["head"]
    # a non-ASCII host is looked up through idna, not refused as bytes
    r, mods = imported("muse-push", "--url", "http://b\u00fccher.invalid:9", "--owner", OWNER,
                       "--repo", "x", "--tag", "t", ok=False)
    assert "encodings.idna" in mods
    errs = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")]
    assert r.returncode == 1 and len(errs) == 1 and "cannot resolve the host" in errs[0], errs


def test_plan_entry_read_when_the_server_knows_a_commit(gsrv, ghub, tmp_path):
    """A plan entry that lists its commits goes unread only while the
    server knows none of them: here the new commit reached the server on
    another branch first, so muse-push reads the pack and sends no
    commit again (only main moves), as it does without the list."""
    repo = ghub.create_repo(OWNER, unique("known"))
    g = make_git_repo(tmp_path / "g")
    out = tmp_path / "o"
    tool("git2muse", "--repo", str(g), "--out-dir", str(out), "--ref", "main")
    tool("muse-push", *push_args(gsrv, repo["slug"], "--plan", str(out / "push.json")))
    (g / "known.txt").write_text("known\n")
    git(g, "add", "-A")
    git_commit(g, "known", 1700003000)
    tool("git2muse", "--repo", str(g), "--out-dir", str(out), "--ref", "main")
    last = json.loads((out / "push.json").read_text())["packs"][-1]
    assert last["commit_ids"] == [last["head"]] and last["closed"] is True
    r = tool("muse-push", *push_args(gsrv, repo["slug"], "--json", "--branch", "side",
                                     str(out / last["file"])))
    assert json_lines(r.stdout)[0]["commits_written"] == 1
    r, mods = imported("muse-push", *push_args(gsrv, repo["slug"], "--json",
                                               "--plan", str(out / "push.json")))
    (res,) = json_lines(r.stdout)
    assert "zstandard" in mods                  # the pack was read
    assert res["sent"]["commits"] == 0 and res["skipped_known"] == {"commits": 1}
    assert ghub.refs(OWNER, repo["slug"])["branch_heads"] == {"main": last["head"],
                                                             "side": last["head"]}


def test_pack_closed():
    """git2muse's `closed`: a pack whose every snapshot a commit needs and
    whose every blob a snapshot upserts; an extra blob opens it."""
    from muse.push import pack_closed
    h = muse.generate(commits=3, files=4, changed=1, blob_size=20, seed=unique("closed"))
    ids = [b["object_id"] for b in h.blobs]
    assert pack_closed(h.commits, h.snapshots, ids)
    assert not pack_closed(h.commits, h.snapshots, ids + ["sha256:" + "0" * 64])
    assert not pack_closed(h.commits[:1], h.snapshots, ids)   # snapshots no commit needs


def test_git2muse_is_deterministic(tmp_path, monkeypatch):
    """The same git history converts to the same packs byte for byte,
    whatever the interpreter's hash seed: the tree diff walks names in a
    fixed order (it iterated a set, so the order of a commit's changed
    paths, and with it the packs' bytes and keys, changed from run to run)."""
    src = make_git_repo(tmp_path / "g")
    for d in ("x", "y/z"):
        (src / d).mkdir(parents=True)
        for i in range(24):
            (src / d / f"f{i:02d}.txt").write_text(f"{d} {i}\n")
    git(src, "add", "-A")
    git_commit(src, "many files", "2026-01-03T00:00:00")
    keys = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"out{seed}"
        monkeypatch.setenv("PYTHONHASHSEED", seed)
        tool("git2muse", "--repo", str(src), "--out-dir", str(out), "--format", "1", "-q")
        keys.append([p["mpack_key"] for p in json.loads((out / "push.json").read_text())["packs"]])
    assert keys[0] == keys[1] == keys[2]


def test_git2muse_state_is_tree_bounded(tmp_path):
    """A long history converts with the state, not manifests, growing: the
    converter keeps a bounded number of manifests (32)."""
    g = tmp_path / "g"
    g.mkdir()
    git(g, "init", "-q", "-b", "main")
    git(g, "config", "user.name", "A")
    git(g, "config", "user.email", "a@example.com")
    for i in range(60):
        (g / f"f{i % 7}.txt").write_text(f"{i}\n")
        git(g, "add", "-A")
        git_commit(g, f"c{i}", 1700000000 + i)
        if i % 10 == 9:
            git(g, "checkout", "-q", "-b", f"side{i}")
            (g / "side.txt").write_text(f"side {i}\n")
            git(g, "add", "-A")
            git_commit(g, f"s{i}", 1700000000 + i)
            git(g, "checkout", "-q", "main")
            git(g, "merge", "-q", "--no-ff", f"side{i}", "-m", f"m{i}",
                env={"GIT_AUTHOR_DATE": f"{1700000000 + i} +0000",
                     "GIT_COMMITTER_DATE": f"{1700000000 + i} +0000"})
    from muse.gitconv import Converter, all_branch_refs
    conv = Converter(str(g), str(tmp_path / "o"), log=lambda m: None)
    res = conv.run(all_branch_refs(conv.git))
    assert res["converted"] == len(git(g, "rev-list", "--all").split())
    assert len(conv._lru) <= 32
    conv.close()


def mirror(server, g, slug, *more, ok=True):
    r = tool("muse-mirror", *push_args(server, slug, "--git", str(g), "--json", *more), ok=ok)
    return r, (json.loads(r.stdout) if ok else None)


def test_mirror(gsrv, ghub, tmp_path):
    g = make_git_repo(tmp_path / "g")
    slug = unique("mirror")
    r, out = mirror(gsrv, g, slug, "--create", "--format", "1")
    branches = {"main", "feature", "b2", "b3", "odd"}
    refs = ghub.refs(OWNER, slug)
    assert set(refs["branch_heads"]) == branches
    assert out["converted"] == len(git(g, "rev-list", "--all").split())
    repo = ghub.get_repo(refs["repo_id"])
    if repo["default_branch"] != "main":
        assert "default branch" in r.stderr
    # nothing new: nothing sent
    _, out = mirror(gsrv, g, slug, "--format", "1")
    assert out["converted"] == 0 and out["pushed"] == [] and out["uploaded_bytes"] == 0
    # one new commit on main: one small pack
    git(g, "checkout", "-q", "main")
    (g / "src" / "renamed.txt").write_text("changed\n")
    git(g, "add", "-A")
    git_commit(g, "edit", 1700002000)
    _, out = mirror(gsrv, g, slug, "--format", "1")
    assert out["converted"] == 1
    assert [(p["branch"], p["commits"], p["blobs"]) for p in out["pushed"]] == [("main", 1, 1)]
    assert out["uploaded_bytes"] < 4096
    wc = tmp_path / "wc"
    tool("muse-fetch", *push_args(gsrv, slug, "--branch", "main", "--checkout", str(wc)))
    got = {str(p.relative_to(wc)): p.read_bytes() for p in wc.rglob("*") if p.is_file()}
    assert got == git_files(g, "main")
    # a rewritten branch is force-pushed, guarded by the head mirrored before
    git(g, "checkout", "-q", "feature")
    git(g, "reset", "-q", "--hard", "HEAD~1")
    (g / "feature2.txt").write_text("rewritten\n")
    git(g, "add", "-A")
    git_commit(g, "rewrite", 1700003000)
    git(g, "checkout", "-q", "main")
    _, out = mirror(gsrv, g, slug, "--format", "1")
    state = json.loads((g / ".git" / "muse-mirror" / OWNER / slug / "push.json").read_text())
    assert ghub.refs(OWNER, slug)["branch_heads"]["feature"] == state["branch_heads"]["feature"]
    wc2 = tmp_path / "wc2"
    tool("muse-fetch", *push_args(gsrv, slug, "--branch", "feature", "--checkout", str(wc2)))
    got = {str(p.relative_to(wc2)): p.read_bytes() for p in wc2.rglob("*") if p.is_file()}
    assert got == git_files(g, "feature")
    # a deleted git branch: deleted on the hub, or kept with a warning
    git(g, "branch", "-q", "-D", "b3")
    r, out = mirror(gsrv, g, slug, "--format", "1")
    heads = ghub.refs(OWNER, slug)["branch_heads"]
    if "b3" in heads:
        assert out["kept_branches"] == ["b3"] and "b3" in r.stderr and "warning" in r.stderr
    else:
        assert out["deleted_branches"] == ["b3"]
    # and the next run says nothing more about it
    r, out = mirror(gsrv, g, slug, "--format", "1")
    assert out["kept_branches"] == [] and out["deleted_branches"] == []
    ghub.delete_repo(ghub.refs(OWNER, slug)["repo_id"])


def test_mirror_v2(gsrv, tmp_path):
    g = make_git_repo(tmp_path / "g")
    slug = unique("mirror2")
    _, out = mirror(gsrv, g, slug, "--create", "--format", "2")
    assert {p["version"] for p in out["pushed"]} == {2}
    wc = tmp_path / "wc"
    tool("muse-fetch", *push_args(gsrv, slug, "--branch", "main", "--checkout", str(wc)))
    got = {str(p.relative_to(wc)): p.read_bytes() for p in wc.rglob("*") if p.is_file()}
    assert got == git_files(g, "main")


# ---------------------------------------------------------------------------
# streaming: 1 GB each way in bounded memory
# ---------------------------------------------------------------------------

def big_history(tmp_path: Path, n: int = 16, size: int = 64 << 20) -> tuple[dict, str]:
    """A root commit of n files of `size` pseudo-random bytes; returns
    ({path: (id, sha256 hex)}, head) and writes src.bin holding them."""
    src = tmp_path / "src.bin"
    files = {}
    with open(src, "wb") as fh:
        for i in range(n):
            data = os.urandom(size)
            fh.write(data)
            files[f"big/file{i:02d}.bin"] = (muse.blob_id(data), i * size, size)
    return files, str(src)


def big_pack(files: dict, src: str, out: Path, version: int) -> str:
    """One root commit whose snapshot holds `files` ({path: (id, offset,
    length)} of file `src`), as a pack of `version` at `out`; returns the
    commit id."""
    manifest = {p: v[0] for p, v in files.items()}
    sid = muse.snapshot_id(manifest)
    c = {"commit_id": muse.commit_id([], sid, "big", "2026-01-01T00:00:00+00:00", "g"),
         "parent_commit_id": None, "parent2_commit_id": None, "snapshot_id": sid,
         "message": "big", "author": "g", "committed_at": "2026-01-01T00:00:00+00:00",
         "branch": "main", "metadata": {}}
    w = muse.PackWriter(str(out), version)
    w.add_commit(c)
    w.add_snapshot({"snapshot_id": sid, "parent_snapshot_id": None,
                    "delta_upsert": manifest, "delta_remove": []})
    with open(src, "rb") as sf:
        for p, (oid, off, n) in files.items():
            w.add_blob_from(oid, sf, off, n, path=p)
        w.close()
    return c["commit_id"]


def streaming_round_trip(server, hub, tmp_path, fmt: int):
    files, src = big_history(tmp_path)
    pack = tmp_path / "big.mpack"
    head = big_pack(files, src, pack, 1)
    assert pack.stat().st_size > 1 << 30
    slug = unique("big")
    rss_push, rss_fetch = tmp_path / "rss-push", tmp_path / "rss-fetch"
    r = tool("muse-push", *push_args(server, slug, "--create", "--json", "--format", str(fmt),
                                     str(pack)), rss_out=rss_push, timeout=1200)
    (res,) = json_lines(r.stdout)
    assert res["head"] == head and res["objects_written"] == 16
    assert res["uploaded_bytes"] > 1 << 30
    os.unlink(pack)
    wc = tmp_path / "wc"
    r = tool("muse-fetch", *push_args(server, slug, "--checkout", str(wc), "--json",
                                      "--format", str(fmt)), rss_out=rss_fetch, timeout=1200)
    out = json.loads(r.stdout)
    assert out["checked_out_files"] == 16 and out["bytes"] > 1 << 30
    for p, (oid, _off, _n) in files.items():
        assert muse.blob_id((wc / p).read_bytes()) == oid
    peak_push, peak_fetch = int(rss_push.read_text()), int(rss_fetch.read_text())
    print(f"1 GB v{fmt}: muse-push peak RSS {peak_push} KiB, muse-fetch {peak_fetch} KiB")
    assert peak_push < 100 * 1024, f"muse-push peak RSS {peak_push} KiB"
    assert peak_fetch < 100 * 1024, f"muse-fetch peak RSS {peak_fetch} KiB"
    hub.delete_repo(hub.refs(OWNER, slug)["repo_id"])


@pytest.mark.slow
def test_streaming_1gb_v1(server, hub, tmp_path):
    streaming_round_trip(server, hub, tmp_path, 1)


@pytest.mark.slow
def test_streaming_1gb_v2(server, hub, tmp_path):
    streaming_round_trip(server, hub, tmp_path, 2)


# ---------------------------------------------------------------------------
# signed requests (MSign) from the command line
# ---------------------------------------------------------------------------

def test_signed_push_and_fetch(anon_server, tmp_path):
    """With --key every API request is signed: a server without a dev
    identity accepts the push as the key's owner and refuses it unsigned."""
    from test_auth import Who, identity_add
    who = Who(unique("signer"))
    assert identity_add(anon_server, who, tmp_path).returncode == 0
    key = tmp_path / "k.pem"
    key.write_bytes(who.priv_pem)
    h = muse.generate(commits=3, files=4, changed=1, blob_size=16, seed=unique("sig"))
    pack = write_pack(h, tmp_path / "h.mpack", 1)
    args = ["--url", anon_server.url, "--owner", who.handle, "--repo", "signed"]
    r = tool("muse-push", *args, "--create", "--format", "1", str(pack), ok=False)
    one_line_error(r, 1, "401")
    r = tool("muse-push", *args, "--create", "--format", "1", "--json", "--key", str(key),
             str(pack))
    assert json_lines(r.stdout)[0]["head"] == h.head
    wc = tmp_path / "wc"
    r = tool("muse-fetch", *args, "--key", str(key), "--checkout", str(wc), "--json")
    assert json.loads(r.stdout)["commit_count"] == 3
    r = tool("muse-push", *args, "--key", str(tmp_path / "nokey.pem"), str(pack), ok=False)
    one_line_error(r, 2, "nokey.pem")
