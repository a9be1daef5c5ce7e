"""Branches, tags, protected branches and repository settings (SPEC 4.1
PATCH, 4.2, 4.5's tag names), black box, on both stores.

  - refs: `tags` beside `branch_heads`
  - the branch API: every row of SPEC 4.2's table (create, delete) plus
    moves (PATCH), names with '/' in URLs (raw and %2F)
  - tags: create (immutable), list, get, delete; bad names; unknown commits
  - protection: PUT/GET/DELETE of a rule, and each rule on each path that
    moves a branch: push, the branch API, server-side commits, proposal
    merges (the one move require_proposal allows); every refusal is a 403
    protected_branch with nothing written (no rows, no pack in the store)
  - the concurrency race: a rule set while a force push is in flight
    either refuses the push or was set after it (many rounds)
  - reading: commits?branch= and tree/{ref} take tag names (a name that is
    both means the branch)
  - PATCH /api/repos/{id}: each field, permissions, a default branch that
    does not exist; deleting the default branch
  - repository delete removes tags and rules; fsck checks tags
"""
from __future__ import annotations

import base64
import random
import threading
import time
import urllib.parse

import pytest

import muselib
from e2e_util import sql_str, unique
from test_auth import Who
from test_commits_api import packs_in_store

OWNER = "gabriel"
RULE_KEYS = ("allow_force_push", "allow_delete", "require_proposal")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def small(seed: str | None = None, commits: int = 2, **kw) -> muselib.History:
    return muselib.generate(commits=commits, files=4, changed=1, blob_size=16,
                            seed=seed or unique("h"), **kw)


def api(repo, *parts: str) -> str:
    return "/".join([f"/api/repos/{repo['repo_id']}", *parts])


def q(name: str) -> str:
    """A name as one URL segment (its '/' as %2F)."""
    return urllib.parse.quote(name, safe="")


def status(hub, method, path, body=None, **kw):
    """(status, decoded body) of one request, whatever the status."""
    r = hub.raw(method, path, body, fmt="json", **kw)
    return r.status_code, muselib.decode_body(r)


def expect_error(hub, method, path, body, code_status, code):
    st, b = status(hub, method, path, body)
    assert (st, b.get("error") if isinstance(b, dict) else b) == (code_status, code), b
    return b


def heads(hub, repo) -> dict:
    return hub.refs(OWNER, repo["slug"])["branch_heads"]


def pushed(hub, make_repo, commits=2, **kw):
    """A fresh repository with a small history pushed to main."""
    repo = make_repo()
    h = small(commits=commits, keep_manifests=True, **kw)
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    return repo, h


def commit_files(hub, repo, branch, files, expect=(201,)):
    body = {"branch": branch, "message": "change",
            "files": {p: base64.b64encode(c).decode() for p, c in files.items()}}
    return hub.call("POST", api(repo, "commits"), body, fmt="json", expect=expect)


def protect(hub, repo, branch, expect=(200,), **rule):
    return hub.call("PUT", api(repo, "branches", q(branch), "protection"),
                    {k: rule.get(k, False) for k in RULE_KEYS}, fmt="json", expect=expect)


class Snapshot:
    """What a refused operation must leave unchanged: the repository's ref
    rows, branches, tags, state counter and the store's packs."""

    TABLES = ("commit_refs", "snapshot_refs", "object_refs", "mpack_refs", "branches", "tags")

    def __init__(self, server, repo) -> None:
        self.server, self.rid = server, sql_str(repo["repo_id"])
        self.before = self.take()

    def take(self):
        db = self.server.db
        rows = {t: db.rows(f"SELECT * FROM {t} WHERE repo_id = {self.rid} ORDER BY 2")
                for t in self.TABLES}
        rows["seq"] = db.scalar(f"SELECT state_seq FROM repos WHERE repo_id = {self.rid}")
        rows["packs"] = packs_in_store(self.server)
        return rows

    def unchanged(self) -> None:
        after = self.take()
        for k, v in self.before.items():
            assert after[k] == v, f"{k} changed: {v} -> {after[k]}"


def diverging(h: muselib.History, seed=None, first_index=50) -> muselib.History:
    """One commit on h's first commit: never a fast-forward of h's head."""
    first = h.commits[0]["commit_id"]
    return small(commits=1, parent=(first, h.manifests[first]), seed=seed, first_index=first_index)


def on_top(h: muselib.History, seed=None, first_index=80) -> muselib.History:
    return small(commits=1, parent=(h.head, h.manifest), seed=seed, first_index=first_index)


# ---------------------------------------------------------------------------
# people: signed identities on the dev server (collaborator roles)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def people(server):
    h = server.hub()
    out = {}
    for role in ("writer", "radmin", "reader", "stranger"):
        w = Who(unique(role))
        h.call("POST", "/api/identities", {"handle": w.handle, "public_key_pem": w.pub_pem.decode()},
               expect=(201,))
        out[role] = w
    h.close()
    return out


@pytest.fixture
def as_(server, people):
    made = []

    def hub(role: str) -> muselib.Hub:
        x = people[role].hub(server)
        made.append(x)
        return x

    yield hub
    for x in made:
        x.close()


def grant(hub, repo, people, **roles):
    for who, role in roles.items():
        hub.call("PUT", api(repo, "collaborators", people[who].handle), {"role": role}, fmt="json")


# ---------------------------------------------------------------------------
# refs and tags
# ---------------------------------------------------------------------------

def test_tags_create_list_get_delete(hub, make_repo, server):
    repo, h = pushed(hub, make_repo, commits=3)
    first = h.commits[0]["commit_id"]
    assert hub.refs(OWNER, repo["slug"])["tags"] == {}
    t = hub.call("POST", api(repo, "tags"), {"name": "v1.0", "commit_id": first, "message": "first release"},
                 fmt="json", expect=(201,))
    assert {k: t[k] for k in ("name", "commit_id", "message", "tagger")} == \
        {"name": "v1.0", "commit_id": first, "message": "first release", "tagger": OWNER}
    assert t["created_at"].endswith("+00:00")
    t2 = hub.call("POST", api(repo, "tags"), {"name": "release/2.0", "commit_id": h.head}, expect=(201,))
    assert t2["message"] == ""
    refs = hub.refs(OWNER, repo["slug"])
    assert refs["tags"] == {"v1.0": first, "release/2.0": h.head}
    assert refs["branch_heads"] == {"main": h.head}
    listed = hub.call("GET", api(repo, "tags"))["tags"]
    assert [x["name"] for x in listed] == ["release/2.0", "v1.0"]
    assert listed[1] == t
    assert hub.call("GET", api(repo, "tags", "release/2.0")) == t2
    assert hub.call("GET", api(repo, "tags", q("release/2.0"))) == t2

    # Tags never move: the same name again is 409, whatever the commit.
    snap = Snapshot(server, repo)
    for c in (first, h.head):
        b = expect_error(hub, "POST", api(repo, "tags"), {"name": "v1.0", "commit_id": c}, 409, "exists")
        assert "v1.0" in b["detail"]
    snap.unchanged()

    hub.call("DELETE", api(repo, "tags", "v1.0"), expect=(204,))
    expect_error(hub, "DELETE", api(repo, "tags", "v1.0"), None, 404, "not_found")
    expect_error(hub, "GET", api(repo, "tags", "v1.0"), None, 404, "not_found")
    assert hub.refs(OWNER, repo["slug"])["tags"] == {"release/2.0": h.head}
    # Only the ref went: the commit is still the repository's.
    assert hub.commit(OWNER, repo["slug"], first)["commit_id"] == first
    # A deleted tag may be created again, on another commit.
    hub.call("POST", api(repo, "tags"), {"name": "v1.0", "commit_id": h.head}, expect=(201,))
    assert hub.refs(OWNER, repo["slug"])["tags"]["v1.0"] == h.head


def test_tag_refusals_write_nothing(hub, make_repo, server):
    repo, h = pushed(hub, make_repo)
    other, oh = pushed(hub, make_repo)
    snap = Snapshot(server, repo)
    # A commit of another repository is not this one's (SPEC 3).
    expect_error(hub, "POST", api(repo, "tags"), {"name": "x", "commit_id": oh.head}, 404, "not_found")
    expect_error(hub, "POST", api(repo, "tags"), {"name": "x", "commit_id": "sha256:" + "0" * 64}, 404, "not_found")
    expect_error(hub, "POST", api(repo, "tags"), {"name": "x", "commit_id": "nope"}, 422, "invalid_id")
    expect_error(hub, "POST", api(repo, "tags"), {"name": "x"}, 422, "invalid_field")
    expect_error(hub, "POST", api(repo, "tags"), {"name": "x", "commit_id": h.head, "message": 7}, 422,
                 "invalid_field")
    expect_error(hub, "POST", api(repo, "tags"), {"name": "x", "commit_id": h.head, "mesage": "typo"}, 422,
                 "invalid_field")
    for bad in ("", "a..b", "x.lock", "a@{b", "a/.b", "/a", "a/", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[",
                "a\\b", ".x", "x.", "a//b", "v1\n", "\u00e9", "x" * 256):
        expect_error(hub, "POST", api(repo, "tags"), {"name": bad, "commit_id": h.head}, 422, "invalid_name")
    snap.unchanged()
    # A URL naming what cannot be a tag names nothing.
    expect_error(hub, "DELETE", api(repo, "tags", "a..b"), None, 404, "not_found")


def test_tag_names_in_commits_and_tree(hub, make_repo):
    repo, h = pushed(hub, make_repo, commits=3)
    first, second = h.commits[0]["commit_id"], h.commits[1]["commit_id"]
    hub.call("POST", api(repo, "tags"), {"name": "v1", "commit_id": first}, expect=(201,))
    hub.call("POST", api(repo, "tags"), {"name": "rel/v2", "commit_id": second}, expect=(201,))
    log = hub.commits(OWNER, repo["slug"], branch="v1")["commits"]
    assert [c["commit_id"] for c in log] == [first]
    log = hub.commits(OWNER, repo["slug"], branch="rel/v2")["commits"]
    assert [c["commit_id"] for c in log] == [second, first]
    t = hub.tree(OWNER, repo["slug"], "rel/v2")
    assert t["snapshot_id"] == h.commits[1]["snapshot_id"]
    assert {e["path"]: e["object_id"] for e in t["entries"]} == h.manifests[second]
    assert hub.tree(OWNER, repo["slug"], "v1")["snapshot_id"] == h.commits[0]["snapshot_id"]
    # A name that is both a branch and a tag means the branch.
    hub.call("POST", api(repo, "tags"), {"name": "main", "commit_id": first}, expect=(201,))
    assert hub.tree(OWNER, repo["slug"], "main")["snapshot_id"] == h.commits[-1]["snapshot_id"]
    assert hub.commits(OWNER, repo["slug"], branch="main")["commits"][0]["commit_id"] == h.head
    # Neither: 404.
    expect_error(hub, "GET", f"/{OWNER}/{repo['slug']}/commits?branch=nope", None, 404, "not_found")
    expect_error(hub, "GET", f"/{OWNER}/{repo['slug']}/tree/nope", None, 404, "not_found")


def test_one_name_rule_on_every_path(hub, make_repo, server):
    """Push, server-side commits and proposals refuse the names the API
    refuses (one validator), and accept the ones it accepts."""
    repo, h = pushed(hub, make_repo)
    up = on_top(h)
    snap = Snapshot(server, repo)
    for bad in ("x.lock", "a/b.lock", "a@{1}", "a/.b", ".a", "a..b", "a b"):
        with pytest.raises(muselib.HubError) as e:
            hub.push(OWNER, repo["slug"], up.pack(), bad, up.head)
        assert (e.value.status, e.value.code) == (422, "invalid_field"), bad
        assert commit_files(hub, repo, bad, {"f": b"x"}, expect=(422,))["error"] == "invalid_field"
        r = hub.raw("POST", api(repo, "proposals"), {"title": "t", "from_branch": "main", "to_branch": bad})
        assert r.status_code == 422, bad
    snap.unchanged()
    for good in ("x.locked", "a/b@c", "rel/v1.0"):
        assert hub.push(OWNER, repo["slug"], up.pack(), good, up.head)["branch"] == good
    assert commit_files(hub, repo, "feat/a.b", {"f": b"x"})["branch"] == "feat/a.b"


# ---------------------------------------------------------------------------
# the branch API (SPEC 4.2's table)
# ---------------------------------------------------------------------------

def test_branch_create(hub, make_repo, server):
    repo, h = pushed(hub, make_repo, commits=3)
    first = h.commits[0]["commit_id"]
    r = hub.call("POST", api(repo, "branches"), {"name": "feature/x", "commit_id": first}, expect=(201,))
    assert r == {"name": "feature/x", "head": first}
    assert heads(hub, repo) == {"main": h.head, "feature/x": first}
    assert hub.call("GET", api(repo, "branches", "feature/x")) == \
        {"name": "feature/x", "head": first, "protection": None}
    listed = hub.call("GET", api(repo, "branches"))["branches"]
    assert [b["name"] for b in listed] == ["feature/x", "main"]
    assert hub.commits(OWNER, repo["slug"], branch="feature/x")["commits"][0]["commit_id"] == first

    _, oh = pushed(hub, make_repo)
    snap = Snapshot(server, repo)
    expect_error(hub, "POST", api(repo, "branches"), {"name": "feature/x", "commit_id": h.head}, 409, "exists")
    expect_error(hub, "POST", api(repo, "branches"), {"name": "main", "commit_id": first}, 409, "exists")
    expect_error(hub, "POST", api(repo, "branches"), {"name": "y", "commit_id": oh.head}, 404, "not_found")
    expect_error(hub, "POST", api(repo, "branches"), {"name": "y", "commit_id": "sha256:" + "1" * 64}, 404,
                 "not_found")
    expect_error(hub, "POST", api(repo, "branches"), {"name": "y", "commit_id": "x"}, 422, "invalid_id")
    expect_error(hub, "POST", api(repo, "branches"), {"commit_id": h.head}, 422, "invalid_name")
    for bad in ("a..b", "x.lock", "x/y.lock", "a@{1}", "a/.hidden", ".a", "a.", "/a", "a/", "a//b", "a b",
                "a\tb", "a~b", "a^b", "a:b", "a?b", "a*b", "a[b", "a\\b", "", "y" * 256):
        expect_error(hub, "POST", api(repo, "branches"), {"name": bad, "commit_id": h.head}, 422, "invalid_name")
    snap.unchanged()


def test_branch_delete(hub, make_repo, server):
    repo, h = pushed(hub, make_repo, commits=3)
    first = h.commits[0]["commit_id"]
    for name in ("gone", "a/b/c", "x/protection"):
        hub.call("POST", api(repo, "branches"), {"name": name, "commit_id": first}, expect=(201,))
    snap = Snapshot(server, repo)
    expect_error(hub, "DELETE", api(repo, "branches", "main"), None, 409, "default_branch")
    expect_error(hub, "DELETE", api(repo, "branches", "nope"), None, 404, "not_found")
    expect_error(hub, "DELETE", api(repo, "branches", "gone"), {"expected_old_head": h.head}, 409, "stale_head")
    expect_error(hub, "DELETE", api(repo, "branches", "gone"), {"expected_old_head": "bad"}, 422, "invalid_id")
    snap.unchanged()
    hub.call("DELETE", api(repo, "branches", "gone"), {"expected_old_head": first}, expect=(204,))
    # A raw '/' and a %2F name the same branch; "/protection" at the end is
    # the rule, so a branch named x/protection is sent with %2F.
    hub.call("DELETE", api(repo, "branches", "a/b/c"), expect=(204,))
    expect_error(hub, "DELETE", api(repo, "branches", "x/protection"), None, 404, "not_found")  # no rule
    hub.call("DELETE", api(repo, "branches", q("x/protection")), expect=(204,))
    assert heads(hub, repo) == {"main": h.head}
    # Only the refs went: the commits stay (until GC).
    assert hub.commit(OWNER, repo["slug"], first)["commit_id"] == first
    expect_error(hub, "DELETE", api(repo, "branches", "gone"), None, 404, "not_found")


def test_branch_move(hub, make_repo, server):
    repo, h = pushed(hub, make_repo, commits=3)
    c0, c1 = h.commits[0]["commit_id"], h.commits[1]["commit_id"]
    hub.call("POST", api(repo, "branches"), {"name": "dev", "commit_id": c0}, expect=(201,))
    assert hub.call("PATCH", api(repo, "branches", "dev"), {"commit_id": c1}) == \
        {"name": "dev", "head": c1, "old_head": c0}
    snap = Snapshot(server, repo)
    # Backwards is not a fast-forward.
    expect_error(hub, "PATCH", api(repo, "branches", "dev"), {"commit_id": c0}, 409, "non_fast_forward")
    expect_error(hub, "PATCH", api(repo, "branches", "dev"), {"commit_id": h.head, "expected_old_head": c0}, 409,
                 "stale_head")
    expect_error(hub, "PATCH", api(repo, "branches", "nope"), {"commit_id": c0}, 404, "not_found")
    expect_error(hub, "PATCH", api(repo, "branches", "dev"), {"commit_id": "sha256:" + "2" * 64}, 404,
                 "not_found")
    expect_error(hub, "PATCH", api(repo, "branches", "dev"), {"commit_id": c0, "forse": True}, 422,
                 "invalid_field")
    snap.unchanged()
    hub.call("PATCH", api(repo, "branches", "dev"), {"commit_id": c0, "force": True, "expected_old_head": c1})
    assert heads(hub, repo)["dev"] == c0


def test_branch_api_permissions(hub, anon_hub, make_repo, people, as_):
    repo, h = pushed(hub, make_repo)
    grant(hub, repo, people, writer="write", reader="read", radmin="admin")
    body = {"name": "w", "commit_id": h.head}
    for who, st in (("reader", 403), ("stranger", 403)):
        assert status(as_(who), "POST", api(repo, "branches"), body)[0] == st
        assert status(as_(who), "POST", api(repo, "tags"), body)[0] == st
    assert status(anon_hub, "POST", api(repo, "branches"), body)[0] == 401
    assert status(anon_hub, "DELETE", api(repo, "branches", "main"))[0] == 401
    w = as_("writer")
    w.call("POST", api(repo, "branches"), body, fmt="json", expect=(201,))
    t = w.call("POST", api(repo, "tags"), {"name": "wt", "commit_id": h.head}, fmt="json", expect=(201,))
    assert t["tagger"] == people["writer"].handle
    w.call("DELETE", api(repo, "tags", "wt"), expect=(204,))
    w.call("DELETE", api(repo, "branches", "w"), expect=(204,))
    # Rules are the owner's or an admin's: a writer may not set one.
    assert status(w, "PUT", api(repo, "branches", "main", "protection"), {})[0] == 403
    assert status(w, "PATCH", api(repo), {"description": "x"})[0] == 403
    ra = as_("radmin")
    ra.call("PUT", api(repo, "branches", "main", "protection"), {"allow_delete": True}, fmt="json")
    assert status(w, "DELETE", api(repo, "branches", "main", "protection"))[0] == 403
    ra.call("DELETE", api(repo, "branches", "main", "protection"), expect=(204,))


# ---------------------------------------------------------------------------
# protection rules: the API
# ---------------------------------------------------------------------------

def test_protection_api(hub, make_repo, server):
    repo, h = pushed(hub, make_repo)
    path = api(repo, "branches", "main", "protection")
    expect_error(hub, "GET", path, None, 404, "not_found")
    expect_error(hub, "DELETE", path, None, 404, "not_found")
    seq0 = int(server.db.scalar(f"SELECT state_seq FROM repos WHERE repo_id = {sql_str(repo['repo_id'])}"))
    r = protect(hub, repo, "main", allow_delete=True)
    assert {k: r[k] for k in ("branch", *RULE_KEYS, "updated_by")} == \
        {"branch": "main", "allow_force_push": False, "allow_delete": True, "require_proposal": False,
         "updated_by": OWNER}
    assert hub.call("GET", path) == r
    assert hub.call("GET", api(repo, "branches", "main"))["protection"] == r
    # A rule change is ordered among ref changes: it bumps state_seq and
    # records the value it made.
    rid = sql_str(repo["repo_id"])
    assert server.db.rows(f"SELECT state_seq FROM branch_protection WHERE repo_id = {rid}") == [(str(seq0 + 1),)]
    # PUT replaces the whole rule (absent keys are false).
    r2 = hub.call("PUT", path, {"require_proposal": True}, fmt="json")
    assert (r2["allow_delete"], r2["require_proposal"]) == (False, True)
    expect_error(hub, "PUT", path, {"allow_delete": "yes"}, 422, "invalid_field")
    expect_error(hub, "PUT", path, {"allow_deletes": True}, 422, "invalid_field")
    expect_error(hub, "PUT", api(repo, "branches", "nope", "protection"), {}, 404, "not_found")
    expect_error(hub, "PUT", api(repo, "branches", "a..b", "protection"), {}, 404, "not_found")
    hub.call("DELETE", path, expect=(204,))
    expect_error(hub, "GET", path, None, 404, "not_found")
    assert server.db.count(f"SELECT count(*) FROM branch_protection WHERE repo_id = {rid}") == 0


# ---------------------------------------------------------------------------
# protection rules on every path that moves a branch
# ---------------------------------------------------------------------------

def push_refused(hub, server, repo, hist, branch="main", force=False, code="protected_branch", st=403):
    """Pushes hist and expects a refusal that wrote nothing: no rows, no
    pack under mpacks/, the staged upload still usable (the grant is not
    consumed)."""
    snap = Snapshot(server, repo)
    with pytest.raises(muselib.HubError) as e:
        hub.push(OWNER, repo["slug"], hist.pack(), branch, hist.head, force=force)
    assert (e.value.status, e.value.code) == (st, code), e.value.body
    snap.unchanged()
    assert not server.store_path(hist.key).exists()
    rid = sql_str(repo["repo_id"])
    assert server.db.count(f"SELECT count(*) FROM push_grants WHERE repo_id = {rid}"
                           f" AND mpack_key = {sql_str(hist.key)} AND consumed_at IS NULL") >= 1
    return e.value.body


def test_push_protection(hub, make_repo, server):
    repo, h = pushed(hub, make_repo, commits=2)
    protect(hub, repo, "main")
    # A force push that is not a fast-forward: 403, nothing written.
    div = diverging(h)
    b = push_refused(hub, server, repo, div, force=True)
    assert "allow_force_push" in b["detail"] and "main" in b["detail"]
    # Without force it is the usual 409 (fetch and merge), still nothing.
    push_refused(hub, server, repo, div, force=False, code="non_fast_forward", st=409)
    # A fast-forward passes, with or without force.
    up = on_top(h)
    assert hub.push(OWNER, repo["slug"], up.pack(), "main", up.head, force=True)["head"] == up.head
    # The rule allows force pushes: the refused pack goes in now (from its
    # staged upload: no second upload needed).
    protect(hub, repo, "main", allow_force_push=True)
    res = hub.unpack(OWNER, repo["slug"], div.key, "main", div.head, force=True)
    assert res["head"] == div.head and heads(hub, repo)["main"] == div.head
    # Other branches are not protected by main's rule.
    protect(hub, repo, "main")
    other = diverging(h, first_index=60)
    hub.push(OWNER, repo["slug"], other.pack(), "other", other.head)
    top = on_top(h, first_index=90)
    assert hub.push(OWNER, repo["slug"], top.pack(), "other", top.head, force=True)["head"] == top.head


def test_push_require_proposal(hub, make_repo, server):
    repo, h = pushed(hub, make_repo, commits=2)
    protect(hub, repo, "main", require_proposal=True, allow_force_push=True)
    b = push_refused(hub, server, repo, on_top(h))
    assert "require_proposal" in b["detail"]
    push_refused(hub, server, repo, diverging(h), force=True)
    # Pushing the head it already has moves nothing: accepted.
    again = hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    assert again["head"] == h.head and again["commits_written"] == 0


def test_branch_api_protection_moves(hub, make_repo, server):
    repo, h = pushed(hub, make_repo, commits=3)
    c0, c1 = h.commits[0]["commit_id"], h.commits[1]["commit_id"]
    hub.call("POST", api(repo, "branches"), {"name": "rel/1", "commit_id": c1}, expect=(201,))
    protect(hub, repo, "rel/1")
    snap = Snapshot(server, repo)
    b = expect_error(hub, "DELETE", api(repo, "branches", "rel/1"), None, 403, "protected_branch")
    assert "allow_delete" in b["detail"]
    expect_error(hub, "PATCH", api(repo, "branches", "rel/1"), {"commit_id": c0, "force": True}, 403,
                 "protected_branch")
    expect_error(hub, "PATCH", api(repo, "branches", "rel/1"), {"commit_id": c0}, 409, "non_fast_forward")
    snap.unchanged()
    # A fast-forward and a same-head "move" pass.
    hub.call("PATCH", api(repo, "branches", "rel/1"), {"commit_id": h.head, "force": True})
    hub.call("PATCH", api(repo, "branches", "rel/1"), {"commit_id": h.head})
    # require_proposal: no API move, not even a fast-forward.
    protect(hub, repo, "rel/1", require_proposal=True, allow_delete=True, allow_force_push=True)
    hub.call("PATCH", api(repo, "branches", "rel/1"), {"commit_id": c1, "force": True}, expect=(403,))
    # allow_delete governs deletion: allowed here.
    hub.call("DELETE", api(repo, "branches", "rel/1"), expect=(204,))
    # The rule names the branch and outlives it: creating it again is a
    # move other than a proposal merge.
    snap = Snapshot(server, repo)
    b = expect_error(hub, "POST", api(repo, "branches"), {"name": "rel/1", "commit_id": c0}, 403,
                     "protected_branch")
    assert "require_proposal" in b["detail"]
    snap.unchanged()
    assert hub.call("GET", api(repo, "branches", "rel/1", "protection"))["require_proposal"] is True
    hub.call("DELETE", api(repo, "branches", "rel/1", "protection"), expect=(204,))
    hub.call("POST", api(repo, "branches"), {"name": "rel/1", "commit_id": c0}, expect=(201,))


def test_commit_protection(hub, make_repo, server):
    repo, h = pushed(hub, make_repo)
    # Without require_proposal a commit (a fast-forward) passes.
    protect(hub, repo, "main")
    commit_files(hub, repo, "main", {"a.txt": b"one"})
    protect(hub, repo, "main", require_proposal=True, allow_force_push=True, allow_delete=True)
    snap = Snapshot(server, repo)
    r = hub.raw("POST", api(repo, "commits"),
                {"branch": "main", "message": "x", "files": {"new.bin": base64.b64encode(b"fresh bytes").decode()}},
                fmt="json")
    assert r.status_code == 403 and muselib.decode_body(r)["error"] == "protected_branch"
    snap.unchanged()  # no rows, no pack of the new blob in the store
    assert server.db.count(f"SELECT count(*) FROM objects WHERE object_id = "
                           f"{sql_str(muselib.blob_id(b'fresh bytes'))}") == 0
    # Another branch is not protected.
    commit_files(hub, repo, "side", {"b.txt": b"two"})


def test_merge_is_the_move_require_proposal_allows(hub, make_repo, server):
    repo, h = pushed(hub, make_repo)
    commit_files(hub, repo, "feat", {"feature.txt": b"new feature"})
    protect(hub, repo, "main", require_proposal=True)
    p = hub.call("POST", api(repo, "proposals"), {"title": "feat", "from_branch": "feat", "to_branch": "main"},
                 expect=(201,))
    m = hub.call("POST", api(repo, "proposals", p["proposal_id"], "merge"))
    assert heads(hub, repo)["main"] == m["merge_commit_id"]
    tree = {e["path"] for e in hub.tree(OWNER, repo["slug"], "main")["entries"]}
    assert "feature.txt" in tree
    # ... and only it: the merged branch still refuses a commit.
    expect_error(hub, "POST", api(repo, "commits"), {"branch": "main", "message": "x", "files": {}}, 403,
                 "protected_branch")


# ---------------------------------------------------------------------------
# the race: a rule set while a force push is in flight
# ---------------------------------------------------------------------------

def test_rule_set_during_force_push_race(server, make_repo):
    """Each round: main is at a head that the round's pack does not
    descend from; the pack is uploaded; then a force unpack and a PUT of a
    rule refusing force pushes are sent concurrently (the PUT after a
    random delay spanning the unpack). Whatever the timing, either the
    push is refused (403, nothing written, the rule's change came first)
    or the push landed before the rule: the rule's state_seq is the last
    change and the push's the one before it."""
    h0 = server.hub()
    repo, base = pushed(h0, make_repo, commits=2)
    rid = sql_str(repo["repo_id"])
    db = server.db
    path = api(repo, "branches", "main", "protection")
    # Calibrate the delays with one force push of a pack like the rounds'.
    cal = diverging(base, first_index=900)
    t0 = time.monotonic()
    h0.push(OWNER, repo["slug"], cal.pack(), "main", cal.head, force=True)
    span = max(0.05, (time.monotonic() - t0) * 1.5)
    rounds, landed, refused, overlapped = 30, 0, 0, 0
    rng = random.Random(17)
    hp, hr = server.hub(), server.hub()
    for i in range(rounds):
        h0.raw("DELETE", path)
        hist = diverging(base, first_index=1000 + i)
        pre = hp.presign(OWNER, repo["slug"], hist.key, len(hist.pack()))
        hp.upload(pre["upload_url"], hist.pack())
        old_head = heads(h0, repo)["main"]
        seq0 = int(db.scalar(f"SELECT state_seq FROM repos WHERE repo_id = {rid}"))
        out: dict = {}
        go = threading.Barrier(2)

        def push():
            go.wait()
            out["push_sent"] = time.monotonic()
            r = hp.raw("POST", f"/{OWNER}/{repo['slug']}/push/unpack-mpack",
                       {"mpack_key": hist.key, "branch": "main", "head": hist.head, "force": True})
            out["push_done"] = time.monotonic()
            out["push"] = (r.status_code, muselib.decode_body(r))

        def rule():
            go.wait()
            time.sleep(rng.uniform(0, span))
            out["rule_sent"] = time.monotonic()
            r = hr.raw("PUT", path, {"allow_force_push": False}, fmt="json")
            out["rule"] = r.status_code

        ts = [threading.Thread(target=push), threading.Thread(target=rule)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert out["rule"] == 200
        overlapped += out["push_sent"] <= out["rule_sent"] <= out["push_done"]
        st, body = out["push"]
        rule_seq = int(db.scalar(f"SELECT state_seq FROM branch_protection WHERE repo_id = {rid}"))
        final = int(db.scalar(f"SELECT state_seq FROM repos WHERE repo_id = {rid}"))
        head = heads(h0, repo)["main"]
        if st == 200:
            landed += 1
            # The push's move (seq0 + 1) came first, then the rule (seq0 + 2).
            assert (head, rule_seq, final) == (hist.head, seq0 + 2, seq0 + 2), (i, body)
        else:
            refused += 1
            assert (st, body["error"]) == (403, "protected_branch"), (i, body)
            assert (head, rule_seq, final) == (old_head, seq0 + 1, seq0 + 1), i
            assert db.count(f"SELECT count(*) FROM commit_refs WHERE repo_id = {rid}"
                            f" AND commit_id = {sql_str(hist.head)}") == 0
            assert not server.store_path(hist.key).exists()
    print(f"race: {rounds} rounds, {landed} pushes landed first, {refused} refused, "
          f"{overlapped} rules sent while the unpack was in flight")
    assert landed + refused == rounds
    assert overlapped >= 1, "no round raced: the delays never fell inside an unpack"
    for x in (h0, hp, hr):
        x.close()


# ---------------------------------------------------------------------------
# PATCH /api/repos/{id}: settings
# ---------------------------------------------------------------------------

def test_patch_repo_fields(hub, anon_hub, make_repo, server):
    repo, h = pushed(hub, make_repo)
    hub.call("POST", api(repo, "branches"), {"name": "trunk", "commit_id": h.head}, expect=(201,))
    r = hub.call("PATCH", api(repo), {"description": "a fine repo"}, fmt="json")
    assert r["description"] == "a fine repo" and r["visibility"] == "public" and r["default_branch"] == "main"
    assert r["repo_id"] == repo["repo_id"] and r["repoId"] == repo["repo_id"]
    assert hub.get_repo(repo["repo_id"])["description"] == "a fine repo"
    # Default branch: must exist; then refs, the log and deletes follow it.
    r = hub.call("PATCH", api(repo), {"default_branch": "trunk"}, fmt="json")
    assert r["default_branch"] == "trunk" == hub.refs(OWNER, repo["slug"])["default_branch"]
    expect_error(hub, "DELETE", api(repo, "branches", "trunk"), None, 409, "default_branch")
    hub.call("DELETE", api(repo, "branches", "main"), expect=(204,))
    assert hub.commits(OWNER, repo["slug"])["commits"][0]["commit_id"] == h.head
    snap = Snapshot(server, repo)
    b = expect_error(hub, "PATCH", api(repo), {"default_branch": "main"}, 422, "invalid_field")
    assert "main" in b["detail"]
    expect_error(hub, "PATCH", api(repo), {"default_branch": "a..b"}, 422, "invalid_name")
    expect_error(hub, "PATCH", api(repo), {"visibility": "secret"}, 422, "invalid_field")
    expect_error(hub, "PATCH", api(repo), {"visibility": None, "visiblity": "private"}, 422, "invalid_field")
    expect_error(hub, "PATCH", api(repo), {"description": 5}, 422, "invalid_field")
    expect_error(hub, "PATCH", api(repo), {"description": "x" * 4097}, 422, "invalid_field")
    expect_error(hub, "PATCH", api(repo), [1, 2], 422, "invalid_body")
    snap.unchanged()
    assert hub.get_repo(repo["repo_id"])["default_branch"] == "trunk"
    # Visibility: private hides the repository from anonymous readers at
    # once (this process drops its lookup cache; others on NOTIFY).
    assert anon_hub.raw("GET", f"/{OWNER}/{repo['slug']}/refs").status_code == 200
    r = hub.call("PATCH", api(repo), {"visibility": "private", "description": ""}, fmt="json")
    assert (r["visibility"], r["description"]) == ("private", "")
    deadline = time.monotonic() + 5
    while anon_hub.raw("GET", f"/{OWNER}/{repo['slug']}/refs").status_code != 404:
        assert time.monotonic() < deadline, "the other server still shows the private repository"
        time.sleep(0.05)
    assert hub.raw("GET", f"/{OWNER}/{repo['slug']}/refs").status_code == 200
    hub.call("PATCH", api(repo), {"visibility": "public"}, fmt="json")
    # An empty body changes nothing and answers the object.
    assert hub.call("PATCH", api(repo), {}, fmt="json")["visibility"] == "public"


def test_patch_repo_permissions(hub, make_repo, people, as_):
    repo = make_repo(visibility="private")
    grant(hub, repo, people, writer="write", reader="read", radmin="admin")
    body = {"description": "by someone"}
    assert status(as_("stranger"), "PATCH", api(repo), body)[0] == 404  # private: not even seen
    assert status(as_("reader"), "PATCH", api(repo), body)[0] == 403
    assert status(as_("writer"), "PATCH", api(repo), body)[0] == 403
    pub = make_repo()
    assert as_("radmin").call("PATCH", api(repo), body, fmt="json")["description"] == "by someone"
    assert hub.call("PATCH", api(pub), body, fmt="json")["description"] == "by someone"
    expect_error(hub, "PATCH", "/api/repos/sha256:" + "3" * 64, body, 404, "not_found")


def test_anonymous_changes_are_401(anon_hub, make_repo):
    repo = make_repo()
    st, b = status(anon_hub, "PATCH", api(repo), {"description": "x"})
    assert (st, b["error"]) == (401, "unauthorized")
    private = make_repo(visibility="private")
    assert status(anon_hub, "PATCH", api(private), {"description": "x"})[0] == 404
    st, b = status(anon_hub, "POST", api(repo, "tags"), {"name": "x", "commit_id": "sha256:" + "0" * 64})
    assert st == 401
    st, b = status(anon_hub, "PUT", api(repo, "branches", "main", "protection"), {})
    assert st == 401


# ---------------------------------------------------------------------------
# repository delete, fsck
# ---------------------------------------------------------------------------

def test_repo_delete_removes_tags_and_rules(hub, make_repo, server):
    repo, h = pushed(hub, make_repo)
    hub.call("POST", api(repo, "tags"), {"name": "v1", "commit_id": h.head}, expect=(201,))
    protect(hub, repo, "main")
    rid = sql_str(repo["repo_id"])
    assert server.db.count(f"SELECT count(*) FROM tags WHERE repo_id = {rid}") == 1
    hub.delete_repo(repo["repo_id"])
    for t in ("tags", "branch_protection", "branches", "commit_refs"):
        assert server.db.count(f"SELECT count(*) FROM {t} WHERE repo_id = {rid}") == 0, t


def test_fsck_checks_tags(hub, make_repo, server):
    from test_ops import fsck
    repo, h = pushed(hub, make_repo)
    hub.call("POST", api(repo, "tags"), {"name": "v1", "commit_id": h.head}, expect=(201,))
    scope = f"{OWNER}/{repo['slug']}"
    ok = fsck(server, "--repo", scope)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    _, other = pushed(hub, make_repo)
    server.db.execute(f"UPDATE tags SET commit_id = {sql_str(other.head)} WHERE repo_id = {sql_str(repo['repo_id'])}")
    out = fsck(server, "--repo", scope)
    assert out.returncode == 1, out.stdout
    assert "tag-commit: 1" in out.stdout
    assert f"{scope}: tag v1: {other.head}: not a commit of the repository" in out.stdout


# ---------------------------------------------------------------------------
# the client: muse-push --tag / --delete / --delete-tag
# ---------------------------------------------------------------------------

def test_muse_push_tags_and_deletes(hub, make_repo, server, tmp_path):
    from test_clients import json_lines, one_line_error, push_args, tool, write_pack
    repo = make_repo()
    h = small(commits=2, keep_manifests=True)
    pack = write_pack(h, tmp_path / "h.mpack", 1)
    r = tool("muse-push", *push_args(server, repo["slug"], "--json", "--tag", "v1", "--tag-message", "one",
                                     str(pack)))
    out = json_lines(r.stdout)
    assert out[0]["head"] == h.head
    assert {k: out[-1]["tag"][k] for k in ("name", "commit_id", "message")} == \
        {"name": "v1", "commit_id": h.head, "message": "one"}
    assert hub.refs(OWNER, repo["slug"])["tags"] == {"v1": h.head}
    # --tag alone: at --branch's head on the server, or at --head.
    first = h.commits[0]["commit_id"]
    tool("muse-push", *push_args(server, repo["slug"], "--tag", "rel/2"))
    tool("muse-push", *push_args(server, repo["slug"], "--tag", "old", "--head", first))
    assert hub.refs(OWNER, repo["slug"])["tags"] == {"v1": h.head, "rel/2": h.head, "old": first}
    # Tags never move: a one-line refusal.
    one_line_error(tool("muse-push", *push_args(server, repo["slug"], "--tag", "v1", "--head", first), ok=False),
                   1, "409", "exists")
    one_line_error(tool("muse-push", *push_args(server, repo["slug"], "--tag", "x", "--branch", "nope"),
                        ok=False), 1, "no branch 'nope'")
    # Deletes.
    hub.call("POST", api(repo, "branches"), {"name": "feature/x", "commit_id": first}, expect=(201,))
    r = tool("muse-push", *push_args(server, repo["slug"], "--json", "--delete", "feature/x"))
    assert json_lines(r.stdout) == [{"deleted_branch": "feature/x"}]
    assert heads(hub, repo) == {"main": h.head}
    one_line_error(tool("muse-push", *push_args(server, repo["slug"], "--delete", "main"), ok=False),
                   1, "409", "default_branch")
    one_line_error(tool("muse-push", *push_args(server, repo["slug"], "--delete", "gone"), ok=False), 1, "404")
    tool("muse-push", *push_args(server, repo["slug"], "--delete-tag", "rel/2"))
    assert set(hub.refs(OWNER, repo["slug"])["tags"]) == {"v1", "old"}
    # Protected: refused with the server's reason.
    hub.call("POST", api(repo, "branches"), {"name": "keep", "commit_id": first}, expect=(201,))
    protect(hub, repo, "keep")
    one_line_error(tool("muse-push", *push_args(server, repo["slug"], "--delete", "keep"), ok=False),
                   1, "403", "protected_branch")
    # Usage: the deletes stand alone; --help says how.
    for bad in (["--delete", "x", str(pack)], ["--delete", "x", "--tag", "y"], ["--tag-message", "m", str(pack)],
                ["--delete", "x", "--delete-tag", "y"], []):
        assert tool("muse-push", *push_args(server, repo["slug"], *bad), ok=False).returncode == 2, bad
    help_text = tool("muse-push", "--help").stdout
    assert "--delete BRANCH" in help_text and "--tag NAME" in help_text and "--delete-tag NAME" in help_text
