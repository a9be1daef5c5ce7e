"""Proposals and merges (SPEC 4.6), black box.

  - create / list / get (with the diff summary) / close; numbers per
    repository, allocated race-free
  - merge: a clean three-way merge, conflicts (409 + paths, nothing
    written), an already merged or closed proposal (409), a fast-forward
    situation (still a merge commit), nothing to merge (409), a to_branch
    that does not exist yet (seed 004's BOS-6 setup), unrelated histories
  - BOS-6: the merge commit lives in the database only (storage_uri NULL)
    and adds nothing to the store
  - fetch after a merge returns the merge commit, and its manifest
    rebuilds client-side (muselib)
  - races: concurrent merges of one proposal, a merge racing a push to
    the same branch (one wins, no corruption)
"""
from __future__ import annotations

import base64
import threading
import time

import pytest

import muselib
from e2e_util import packs_in_store, sql_str, unique

OWNER = "gabriel"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def b64(c: bytes) -> str:
    return base64.b64encode(c).decode()


def commit(hub, repo, branch, files=None, remove=None, message="change", expect=(201,), **extra):
    body = {"branch": branch, "message": message,
            "files": {p: b64(c) for p, c in (files or {}).items()}, **extra}
    if remove is not None:
        body["remove"] = remove
    return hub.call("POST", f"/api/repos/{repo['repo_id']}/commits", body, fmt="json", expect=expect)


def propose(hub, repo, frm, to, title="A change", expect=(201,), **extra):
    body = {"title": title, "from_branch": frm, "to_branch": to, **extra}
    return hub.call("POST", f"/api/repos/{repo['repo_id']}/proposals", body, expect=expect)


def merge(hub, repo, pid, expect=(200,)):
    return hub.call("POST", f"/api/repos/{repo['repo_id']}/proposals/{pid}/merge", expect=expect)


def get(hub, repo, pid, expect=(200,)):
    return hub.call("GET", f"/api/repos/{repo['repo_id']}/proposals/{pid}", expect=expect)


def heads(hub, repo) -> dict:
    return hub.refs(OWNER, repo["slug"])["branch_heads"]


def tree(hub, repo, ref) -> dict[str, str]:
    return {e["path"]: e["object_id"] for e in hub.tree(OWNER, repo["slug"], ref)["entries"]}


def ids(files: dict[str, bytes]) -> dict[str, str]:
    return {p: muselib.blob_id(c) for p, c in files.items()}


def written(db) -> tuple:
    """Global row counts a failed merge must leave alone."""
    return tuple(db.count(f"SELECT count(*) FROM {t}") for t in
                 ("commits", "snapshots", "commit_refs", "snapshot_refs", "objects", "mpacks"))


def diverged(hub, repo, base=None, ours=None, theirs=None, remove_ours=None, remove_theirs=None):
    """main <- base; feature from main + theirs; main + ours. Returns the
    three commit results."""
    b = commit(hub, repo, "main", base or {"a.txt": b"a0", "b.txt": b"b0", "c.txt": b"c0"}, message="base")
    t = commit(hub, repo, "feature", theirs or {}, remove=remove_theirs, message="theirs")
    o = commit(hub, repo, "main", ours or {}, remove=remove_ours, message="ours")
    return b, o, t


# ---------------------------------------------------------------------------
# create, list, get, close
# ---------------------------------------------------------------------------

def test_create_list_get_close(hub, repo):
    commit(hub, repo, "main", {"a": b"1"})
    commit(hub, repo, "dev", {"b": b"2"})
    p1 = propose(hub, repo, "dev", "main", title="First", body="details")
    assert p1["state"] == "open" and p1["number"] == 1 and muselib.valid_id(p1["proposal_id"])
    assert (p1["title"], p1["body"], p1["from_branch"], p1["to_branch"], p1["created_by"]) == \
        ("First", "details", "dev", "main", "gabriel")
    assert p1["merge_commit_id"] is None and p1["repo_id"] == repo["repo_id"]
    assert p1["created_at"].endswith("+00:00")
    p2 = propose(hub, repo, "main", "dev", title="Second")
    assert p2["number"] == 2 and p2["body"] == ""

    lst = hub.call("GET", f"/api/repos/{repo['repo_id']}/proposals")["proposals"]
    assert [p["number"] for p in lst] == [2, 1]
    closed = hub.call("POST", f"/api/repos/{repo['repo_id']}/proposals/{p2['proposal_id']}/close")
    assert closed["state"] == "closed" and closed["number"] == 2
    err = hub.call("POST", f"/api/repos/{repo['repo_id']}/proposals/{p2['proposal_id']}/close", expect=(409,))
    assert err["error"] == "not_open"
    for st, want in (("open", [1]), ("closed", [2]), ("merged", [])):
        lst = hub.call("GET", f"/api/repos/{repo['repo_id']}/proposals", params={"state": st})["proposals"]
        assert [p["number"] for p in lst] == want, st
    r = hub.raw("GET", f"/api/repos/{repo['repo_id']}/proposals", params={"state": "bogus"})
    assert r.status_code == 422

    g = get(hub, repo, p1["proposal_id"])
    assert g["number"] == 1 and g["state"] == "open"
    assert g["from_head"] == heads(hub, repo)["dev"] and g["to_head"] == heads(hub, repo)["main"]
    assert g["diff"] == {"added": ["b"], "changed": [], "removed": [], "truncated": False}
    # numbers are per repository
    other = hub.create_repo(OWNER, unique("other"))
    try:
        commit(hub, other, "x", {"z": b"1"})
        assert propose(hub, other, "x", "main")["number"] == 1
    finally:
        hub.delete_repo(other["repo_id"])


def test_get_diff_summary(hub, repo):
    b, o, t = diverged(hub, repo, theirs={"a.txt": b"a1", "new/d.txt": b"d"}, remove_theirs=["c.txt"],
                       ours={"b.txt": b"b1"})
    p = propose(hub, repo, "feature", "main")
    g = get(hub, repo, p["proposal_id"])
    assert g["merge_base"] == b["commit_id"]
    assert g["from_head"] == t["commit_id"] and g["to_head"] == o["commit_id"]
    # between the merge base and from_branch's head (main's own change is not in it)
    assert g["diff"] == {"added": ["new/d.txt"], "changed": ["a.txt"], "removed": ["c.txt"], "truncated": False}


def test_create_validation(hub, anon_hub, repo):
    commit(hub, repo, "main", {"a": b"1"})
    commit(hub, repo, "dev", {"b": b"1"})
    rid = repo["repo_id"]
    for body in ({"from_branch": "dev", "to_branch": "main"},
                 {"title": "", "from_branch": "dev", "to_branch": "main"},
                 {"title": "t", "from_branch": "dev"},
                 {"title": "t", "from_branch": "dev", "to_branch": "dev"},
                 {"title": "t", "from_branch": "de..v", "to_branch": "main"},
                 {"title": "t", "from_branch": "dev", "to_branch": "main", "body": 5},
                 {"title": "t", "from_branch": "nope", "to_branch": "main"}):
        r = hub.raw("POST", f"/api/repos/{rid}/proposals", body)
        assert r.status_code == 422, (body, r.text)
    r = anon_hub.raw("POST", f"/api/repos/{rid}/proposals", {"title": "t", "from_branch": "dev", "to_branch": "main"})
    assert r.status_code == 401
    # anonymous may read a public repository's proposals
    p = propose(hub, repo, "dev", "main")
    assert anon_hub.call("GET", f"/api/repos/{rid}/proposals/{p['proposal_id']}")["number"] == p["number"]
    r = anon_hub.raw("POST", f"/api/repos/{rid}/proposals/{p['proposal_id']}/merge")
    assert r.status_code == 401
    for bad in ("sha256:" + "0" * 64, "nope"):
        assert hub.raw("GET", f"/api/repos/{rid}/proposals/{bad}").status_code == 404
        assert hub.raw("POST", f"/api/repos/{rid}/proposals/{bad}/merge").status_code == 404
        assert hub.raw("POST", f"/api/repos/{rid}/proposals/{bad}/close").status_code == 404


def test_proposal_of_other_repo_is_404(hub, make_repo):
    a, b = make_repo(), make_repo()
    commit(hub, a, "main", {"x": b"1"})
    commit(hub, a, "dev", {"y": b"1"})
    p = propose(hub, a, "dev", "main")
    for method, suffix in (("GET", ""), ("POST", "/merge"), ("POST", "/close")):
        r = hub.raw(method, f"/api/repos/{b['repo_id']}/proposals/{p['proposal_id']}{suffix}")
        assert r.status_code == 404, (method, suffix)


def test_concurrent_creation_numbers(server, repo):
    hub = server.hub()
    commit(hub, repo, "main", {"a": b"1"})
    commit(hub, repo, "dev", {"b": b"1"})
    hubs = [server.hub() for _ in range(12)]
    barrier = threading.Barrier(len(hubs))
    got: list = []

    def go(h, i):
        barrier.wait(10)
        got.append(propose(h, repo, "dev", "main", title=f"p{i}")["number"])

    ts = [threading.Thread(target=go, args=(h, i)) for i, h in enumerate(hubs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert sorted(got) == list(range(1, 13))
    for h in hubs + [hub]:
        h.close()


# ---------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------

def test_merge_clean(hub, db, repo, server):
    b, o, t = diverged(hub, repo, theirs={"a.txt": b"a-theirs", "t.txt": b"t"}, remove_theirs=["c.txt"],
                       ours={"b.txt": b"b-ours", "o.txt": b"o"})
    p = propose(hub, repo, "feature", "main", title="Feature")
    before_packs = packs_in_store(server)
    n_objects = db.count("SELECT count(*) FROM objects")
    res = merge(hub, repo, p["proposal_id"])
    assert res["state"] == "merged" and res["proposal_id"] == p["proposal_id"]
    mc = res["merge_commit_id"]
    expect = ids({"a.txt": b"a-theirs", "b.txt": b"b-ours", "t.txt": b"t", "o.txt": b"o"})
    assert tree(hub, repo, "main") == expect
    assert heads(hub, repo) == {"main": mc, "feature": t["commit_id"]}
    # parents (to-head, from-head), generation, id recomputed from its fields
    c = hub.commit(OWNER, repo["slug"], mc)
    assert (c["parent_commit_id"], c["parent2_commit_id"]) == (o["commit_id"], t["commit_id"])
    assert c["generation"] == 3 and c["branch"] == "main" and c["author"] == "gabriel"
    assert c["snapshot_id"] == muselib.snapshot_id(expect) == res["snapshot_id"]
    assert muselib.commit_id_of(c) == mc
    # BOS-6: database only, nothing added to the store, no new object
    assert db.scalar(f"SELECT storage_uri IS NULL FROM commits WHERE commit_id = {sql_str(mc)}") == "t"
    assert db.scalar(f"SELECT storage_uri IS NULL FROM snapshots WHERE snapshot_id = {sql_str(c['snapshot_id'])}") \
        == "t"
    assert db.scalar(f"SELECT parent_snapshot_id FROM snapshots WHERE snapshot_id = {sql_str(c['snapshot_id'])}") \
        == o["snapshot_id"]
    assert packs_in_store(server) == before_packs
    assert db.count("SELECT count(*) FROM objects") == n_objects
    g = get(hub, repo, p["proposal_id"])
    assert g["state"] == "merged" and g["merge_commit_id"] == mc
    # merging again, or closing, is 409; nothing changes
    err = merge(hub, repo, p["proposal_id"], expect=(409,))
    assert err["error"] == "not_open"
    hub.call("POST", f"/api/repos/{repo['repo_id']}/proposals/{p['proposal_id']}/close", expect=(409,))
    assert heads(hub, repo)["main"] == mc

    # fetch after the merge: the merge commit comes back and its manifest rebuilds
    out = hub.clone(OWNER, repo["slug"], [mc])
    got = {x["commit_id"]: x for x in out["pack"]["commits"]}
    assert mc in got and len(got) == 4
    assert (got[mc]["parent_commit_id"], got[mc]["parent2_commit_id"]) == (o["commit_id"], t["commit_id"])
    assert out["manifests"][c["snapshot_id"]] == expect
    # and incrementally, from the two heads
    inc = hub.clone(OWNER, repo["slug"], [mc], have=[o["commit_id"], t["commit_id"]],
                    known_manifests={o["snapshot_id"]: tree(hub, repo, o["commit_id"]),
                                     t["snapshot_id"]: tree(hub, repo, t["commit_id"])})
    assert inc["result"]["commit_count"] == 1 and inc["result"]["blob_count"] == 0
    assert inc["manifests"][c["snapshot_id"]] == expect


def test_merge_identical_changes_and_both_deleted(hub, repo):
    diverged(hub, repo, theirs={"a.txt": b"same", "n.txt": b"n"}, remove_theirs=["c.txt"],
             ours={"a.txt": b"same", "n.txt": b"n"}, remove_ours=["c.txt"])
    p = propose(hub, repo, "feature", "main")
    merge(hub, repo, p["proposal_id"])
    assert tree(hub, repo, "main") == ids({"a.txt": b"same", "b.txt": b"b0", "n.txt": b"n"})


@pytest.mark.parametrize("case", ["modify-modify", "add-add", "modify-delete", "delete-modify"])
def test_merge_conflict_409_nothing_written(hub, db, repo, server, case):
    kw = {
        "modify-modify": dict(theirs={"a.txt": b"T", "ok.txt": b"x"}, ours={"a.txt": b"O"}),
        "add-add": dict(theirs={"new.txt": b"T", "ok.txt": b"x"}, ours={"new.txt": b"O"}),
        "modify-delete": dict(theirs={"ok.txt": b"x"}, remove_theirs=["a.txt"], ours={"a.txt": b"O"}),
        "delete-modify": dict(theirs={"a.txt": b"T", "ok.txt": b"x"}, remove_ours=["a.txt"]),
    }[case]
    b, o, t = diverged(hub, repo, **kw)
    p = propose(hub, repo, "feature", "main")
    before = (written(db), packs_in_store(server), heads(hub, repo))
    r = hub.raw("POST", f"/api/repos/{repo['repo_id']}/proposals/{p['proposal_id']}/merge")
    assert r.status_code == 409, r.text
    body = r.json()
    want = "new.txt" if case == "add-add" else "a.txt"
    assert body["error"] == "conflict" and body["paths"] == [want] and body["detail"]
    assert (written(db), packs_in_store(server), heads(hub, repo)) == before
    assert get(hub, repo, p["proposal_id"])["state"] == "open"
    # msgpack answers carry the same keys
    r = hub.raw("POST", f"/api/repos/{repo['repo_id']}/proposals/{p['proposal_id']}/merge",
                accept="application/x-msgpack")
    assert r.status_code == 409 and muselib.decode_body(r)["paths"] == [want]
    # resolved on the branch, the proposal merges
    fix = {"a.txt": b"O"} if case == "modify-modify" else {"new.txt": b"O"} if case == "add-add" else {}
    if case == "modify-delete":
        commit(hub, repo, "feature", {"a.txt": b"O"})
    elif case == "delete-modify":
        commit(hub, repo, "feature", {}, remove=["a.txt"])
    else:
        commit(hub, repo, "feature", fix)
    merge(hub, repo, p["proposal_id"])


def test_merge_many_conflicts_listed_in_order(hub, repo):
    base = {f"d/f{i:03d}": b"0" for i in range(50)}
    diverged(hub, repo, base=base, theirs={f"d/f{i:03d}": b"T" for i in range(0, 50, 2)},
             ours={f"d/f{i:03d}": b"O" for i in range(0, 50, 5)})
    p = propose(hub, repo, "feature", "main")
    err = merge(hub, repo, p["proposal_id"], expect=(409,))
    assert err["paths"] == [f"d/f{i:03d}" for i in range(0, 50, 10)]


def test_fast_forward_still_makes_a_merge_commit(hub, db, repo):
    b = commit(hub, repo, "main", {"a": b"1"})
    t = commit(hub, repo, "feature", {"b": b"2"})
    p = propose(hub, repo, "feature", "main")
    res = merge(hub, repo, p["proposal_id"])
    c = hub.commit(OWNER, repo["slug"], res["merge_commit_id"])
    assert (c["parent_commit_id"], c["parent2_commit_id"]) == (b["commit_id"], t["commit_id"])
    assert c["snapshot_id"] == t["snapshot_id"]           # the tree is from_branch's
    assert muselib.commit_id_of(c) == res["merge_commit_id"]
    assert tree(hub, repo, "main") == ids({"a": b"1", "b": b"2"})
    out = hub.clone(OWNER, repo["slug"], [res["merge_commit_id"]])
    assert out["manifests"][t["snapshot_id"]] == ids({"a": b"1", "b": b"2"})


def test_nothing_to_merge_409(hub, db, repo):
    commit(hub, repo, "main", {"a": b"1"})
    commit(hub, repo, "feature", {"b": b"2"})
    commit(hub, repo, "main", {"c": b"3"})
    p1 = propose(hub, repo, "feature", "main")
    merge(hub, repo, p1["proposal_id"])
    # feature is now fully in main; so is an identical branch
    p2 = propose(hub, repo, "feature", "main")
    n = written(db)
    err = merge(hub, repo, p2["proposal_id"], expect=(409,))
    assert err["error"] == "nothing_to_merge" and written(db) == n
    commit(hub, repo, "same", {}, message="x", expected_head=None)  # same starts at main's head + 1
    p3 = propose(hub, repo, "main", "same")
    assert merge(hub, repo, p3["proposal_id"], expect=(409,))["error"] == "nothing_to_merge"


def test_merge_into_absent_to_branch(hub, db, repo, server):
    """Seed 004 BOS-6's setup: only `feat` exists; merging into `main`
    creates it at a merge commit (one parent) in the database only."""
    t = commit(hub, repo, "feat", {"f.py": b"feat"})
    p = propose(hub, repo, "feat", "main", title="Merge feat")
    g = get(hub, repo, p["proposal_id"])
    assert g["to_head"] is None and g["merge_base"] is None
    assert g["diff"]["added"] == ["f.py"]
    before = packs_in_store(server)
    res = merge(hub, repo, p["proposal_id"])
    mc = res["merge_commit_id"]
    c = hub.commit(OWNER, repo["slug"], mc)
    assert c["parent_ids"] == [t["commit_id"]] and c["snapshot_id"] == t["snapshot_id"]
    assert muselib.commit_id_of(c) == mc
    assert heads(hub, repo) == {"feat": t["commit_id"], "main": mc}
    assert db.scalar(f"SELECT storage_uri IS NULL FROM commits WHERE commit_id = {sql_str(mc)}") == "t"
    assert packs_in_store(server) == before


def test_merge_unrelated_histories(hub, repo):
    commit(hub, repo, "main", {"a": b"1", "shared": b"same"})
    # a root commit on an orphan branch: the default branch does not exist in
    # another repository, so build it there and push it over
    other = hub.create_repo(OWNER, unique("orphan"))
    try:
        r = commit(hub, other, "main", {"b": b"2", "shared": b"same"})
        out = hub.clone(OWNER, other["slug"], [r["commit_id"]])
        hub.push(OWNER, repo["slug"], out["data"], "orphan", r["commit_id"])
    finally:
        hub.delete_repo(other["repo_id"])
    p = propose(hub, repo, "orphan", "main")
    assert get(hub, repo, p["proposal_id"])["merge_base"] is None
    merge(hub, repo, p["proposal_id"])
    assert tree(hub, repo, "main") == ids({"a": b"1", "b": b"2", "shared": b"same"})


def test_merge_base_is_best_common_ancestor(hub, repo):
    """Criss-cross-free but repeated merges: the base moves to the last
    merged commit, so a second round only brings the new changes."""
    commit(hub, repo, "main", {"a": b"0", "b": b"0"})
    t1 = commit(hub, repo, "feature", {"a": b"1"})
    p = propose(hub, repo, "feature", "main")
    merge(hub, repo, p["proposal_id"])
    commit(hub, repo, "main", {"b": b"2"})
    t2 = commit(hub, repo, "feature", {"c": b"3"})   # feature still has b = 0
    p2 = propose(hub, repo, "feature", "main")
    g = get(hub, repo, p2["proposal_id"])
    assert g["merge_base"] == t1["commit_id"]
    assert g["diff"] == {"added": ["c"], "changed": [], "removed": [], "truncated": False}
    merge(hub, repo, p2["proposal_id"])
    assert tree(hub, repo, "main") == ids({"a": b"1", "b": b"2", "c": b"3"})
    assert t2["commit_id"] in hub.commit(OWNER, repo["slug"], heads(hub, repo)["main"])["parent_ids"]


def test_closed_proposal_cannot_merge(hub, repo):
    diverged(hub, repo, theirs={"x": b"1"})
    p = propose(hub, repo, "feature", "main")
    hub.call("POST", f"/api/repos/{repo['repo_id']}/proposals/{p['proposal_id']}/close")
    err = merge(hub, repo, p["proposal_id"], expect=(409,))
    assert err["error"] == "not_open"


def test_deep_branch_checkpoint_on_merge_snapshot(hub, db, repo):
    """A merge snapshot is a delta against to-head's; past 64 links it is a
    checkpoint like any other."""
    commit(hub, repo, "main", {"m": b"0"})
    for i in range(63):
        commit(hub, repo, "main", {"m": b"%d" % (i + 1)})
    commit(hub, repo, "feature", {"f": b"x"})
    p = propose(hub, repo, "feature", "main")
    # feature was created from main's head (depth 63): main's head is at depth 63,
    # so the merge snapshot is the 64th link: a checkpoint
    res = merge(hub, repo, p["proposal_id"])
    assert db.rows(f"SELECT depth, checkpoint IS NOT NULL FROM snapshots WHERE snapshot_id = "
                   f"{sql_str(res['snapshot_id'])}") == [("0", "t")]
    out = hub.clone(OWNER, repo["slug"], [res["merge_commit_id"]])
    assert out["manifests"][res["snapshot_id"]] == ids({"m": b"63", "f": b"x"})


# ---------------------------------------------------------------------------
# races
# ---------------------------------------------------------------------------

def run_together(fns):
    barrier = threading.Barrier(len(fns))
    out: list = [None] * len(fns)

    def go(i):
        barrier.wait(10)
        out[i] = fns[i]()

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return out


def test_concurrent_merges_of_one_proposal(server, db, repo):
    hub = server.hub()
    diverged(hub, repo, theirs={"x": b"1"}, ours={"y": b"2"})
    p = propose(hub, repo, "feature", "main")
    n = db.count("SELECT count(*) FROM commits")
    hubs = [server.hub() for _ in range(6)]
    url = f"/api/repos/{repo['repo_id']}/proposals/{p['proposal_id']}/merge"
    res = run_together([lambda h=h: h.raw("POST", url) for h in hubs])
    codes = sorted(r.status_code for r in res)
    assert codes == [200] + [409] * 5, [(r.status_code, r.text) for r in res]
    win = next(r.json() for r in res if r.status_code == 200)
    assert db.count("SELECT count(*) FROM commits") == n + 1
    assert heads(hub, repo)["main"] == win["merge_commit_id"]
    for h in hubs + [hub]:
        h.close()


def push_on(hub, repo, branch, head, manifest, tag):
    """A client-built commit on `head` changing one file, pushed to branch.
    Returns (status, commit id)."""
    content = f"pushed {tag}".encode()
    new = dict(manifest)
    new["pushed.txt"] = muselib.blob_id(content)
    parent_sid = muselib.snapshot_id(manifest)
    sid = muselib.snapshot_id(new)
    at = "2026-11-21T08:00:00+00:00"
    cid = muselib.commit_id([head], sid, f"push {tag}", at, "gabriel")
    c = {"commit_id": cid, "parent_commit_id": head, "parent2_commit_id": None, "snapshot_id": sid,
         "message": f"push {tag}", "author": "gabriel", "committed_at": at, "branch": branch}
    s = muselib.snapshot_map(sid, parent_sid, manifest, new)
    data = muselib.build_mpack([c], [s], [{"object_id": new["pushed.txt"], "content": content}])
    key = muselib.blob_id(data)
    pre = hub.presign(OWNER, repo["slug"], key, len(data))
    if not pre.get("already_present"):
        hub.upload(pre["upload_url"], data)
    return key, cid


def test_merge_races_push_to_same_branch(server, db, repo):
    hub = server.hub()
    outcomes: dict[tuple, int] = {}
    for rnd in range(12):
        # fresh divergence each round, on top of whatever main is now
        tag = unique("r")
        commit(hub, repo, "main", {f"base-{tag}": b"b"})
        commit(hub, repo, f"feat-{rnd}", {f"theirs-{tag}": b"t"})
        o = commit(hub, repo, "main", {f"ours-{tag}": b"o"})
        p = propose(hub, repo, f"feat-{rnd}", "main")
        key, pushed = push_on(hub, repo, "main", o["commit_id"], tree(hub, repo, "main"), tag)
        h1, h2 = server.hub(), server.hub()
        url = f"/api/repos/{repo['repo_id']}/proposals/{p['proposal_id']}/merge"
        # jitter: sometimes the merge starts first, sometimes the push
        delay = (rnd % 4) * 0.004
        m, u = run_together([
            lambda: (time.sleep(delay), h1.raw("POST", url))[1],
            lambda: h2.raw("POST", f"/{OWNER}/{repo['slug']}/push/unpack-mpack",
                           {"mpack_key": key, "branch": "main", "head": pushed}),
        ])
        h1.close()
        h2.close()
        assert m.status_code in (200, 409) and u.status_code in (200, 409), (m.text, u.text)
        assert 200 in (m.status_code, u.status_code)
        k = (m.status_code, u.status_code)
        outcomes[k] = outcomes.get(k, 0) + 1
        head = heads(hub, repo)["main"]
        if m.status_code == 200 and u.status_code == 200:
            # the push landed first and the merge ran on top of it (having
            # been recomputed if it had read main's head before the push)
            mc = m.json()["merge_commit_id"]
            assert head == mc
            assert hub.commit(OWNER, repo["slug"], mc)["parent_commit_id"] == pushed
        elif m.status_code == 200:
            assert head == m.json()["merge_commit_id"] and u.json()["error"] in ("non_fast_forward", "conflict")
        else:
            assert head == pushed and m.json()["error"] == "stale_head"
            assert get(hub, repo, p["proposal_id"])["state"] == "open"
        # no corruption: the whole history fetches and every id rebuilds
        out = hub.clone(OWNER, repo["slug"], [head])
        assert out["manifests"][hub.commit(OWNER, repo["slug"], head)["snapshot_id"]] == tree(hub, repo, "main")
    print(f"\n merge/push race outcomes (merge, push): {outcomes}")
    hub.close()
