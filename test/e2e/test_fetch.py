"""SPEC 4.4 fetch and 4.5 reading, black box; seed 003's F01-F10 translated
to HTTP.  Every fetched pack is downloaded, hashed, parsed, and every
manifest rebuilt and every snapshot/commit id checked (muselib)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.parse

import msgpack
import pytest

import muselib
from e2e_util import sql_str, unique

OWNER = "gabriel"
SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")


def small(seed=None, commits=3, **kw) -> muselib.History:
    return muselib.generate(commits=commits, files=4, changed=1, blob_size=16,
                            seed=seed or unique("f"), **kw)


@pytest.fixture(scope="module")
def seed_manifests(seed000) -> dict:
    """snapshot id -> manifest of every seed-000 snapshot (client side)."""
    return muselib.rebuild_and_verify(muselib.parse_mpack(seed000.pack()))


def fetch_raw(hub, slug, body, **kw):
    return hub.raw("POST", f"/{OWNER}/{slug}/fetch", body, **kw)


# ---------------------------------------------------------------------------
# F01 / full clone
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_full_clone_rebuilds_every_id(hub, seed_repo, seed_manifests):
    h = seed_repo["history"]
    slug = seed_repo["repo"]["slug"]
    out = hub.clone(OWNER, slug, [h.head])
    res, pack, data = out["result"], out["pack"], out["data"]
    t = out["timings"]
    print(f"\n seed000 clone: {len(data) // 1024} KiB, fetch {t['fetch'] * 1000:.0f} ms, "
          f"download {t['download'] * 1000:.0f} ms, verify {t['verify'] * 1000:.0f} ms")
    assert (res["commit_count"], res["snapshot_count"], res["blob_count"]) == (1031, 1031, 5855)
    assert res["object_count"] == res["blob_count"]
    assert res["expires_in"] > 0
    assert data[:5] == b"MUSE\x01" and pack["version"] == 1
    # same commits, fields verbatim (optional metadata included)
    sent = {c["commit_id"]: c for c in h.commits}
    got = {c["commit_id"]: c for c in pack["commits"]}
    assert set(got) == set(sent)
    for cid, c in sent.items():
        for k, v in c.items():
            assert got[cid].get(k) == v, (cid, k)
    # parents before children, for commits and snapshots
    pos = {c["commit_id"]: i for i, c in enumerate(pack["commits"])}
    for c in pack["commits"]:
        for p in muselib.commit_parents(c):
            assert pos[p] < pos[c["commit_id"]]
    spos = {s["snapshot_id"]: i for i, s in enumerate(pack["snapshots"])}
    for s in pack["snapshots"]:
        assert "manifest" not in s
        if s["parent_snapshot_id"]:
            assert spos[s["parent_snapshot_id"]] < spos[s["snapshot_id"]]
    assert sum(1 for s in pack["snapshots"] if not s["parent_snapshot_id"]) == 1
    assert out["manifests"] == seed_manifests
    assert {b["object_id"] for b in pack["blobs"]} == {b["object_id"] for b in h.blobs}
    assert set(pack["branch_heads"].values()) <= set(got)   # optional key


def test_f01_small_repo(hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    out = hub.clone(OWNER, repo["slug"], [h.head])
    assert out["result"]["commit_count"] == 3
    assert out["result"]["blob_count"] == len(h.blobs)
    assert out["manifests"][h.commits[-1]["snapshot_id"]] == h.manifest


# ---------------------------------------------------------------------------
# F03 / incremental
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_incremental_fetch(hub, seed_repo, seed_manifests):
    h = seed_repo["history"]
    slug = seed_repo["repo"]["slug"]
    have_c = h.commits[1000]
    have_m = seed_manifests[have_c["snapshot_id"]]
    out = hub.clone(OWNER, slug, [h.head], [have_c["commit_id"]],
                    known_manifests={have_c["snapshot_id"]: have_m})
    res, pack = out["result"], out["pack"]
    newer = h.commits[1001:]
    assert res["commit_count"] == 30 == len(pack["commits"])
    assert {c["commit_id"] for c in pack["commits"]} == {c["commit_id"] for c in newer}
    assert res["snapshot_count"] == 30
    first = next(s for s in pack["snapshots"]
                 if s["snapshot_id"] == newer[0]["snapshot_id"])
    assert first["parent_snapshot_id"] == have_c["snapshot_id"]   # a delta, not a root
    # blobs: only what the new snapshots add and the have commit lacks ...
    sent = {b["object_id"] for b in pack["blobs"]}
    assert res["blob_count"] == len(sent)
    added = set()
    for s in pack["snapshots"]:
        added |= set(s["delta_upsert"].values())
    assert sent <= added
    assert not sent & set(have_m.values())
    # ... and at least what a client holding the whole have history needs
    history_objs = set()
    for c in h.commits[:1001]:
        history_objs |= set(seed_manifests[c["snapshot_id"]].values())
    needed = set()
    for c in newer:
        needed |= set(seed_manifests[c["snapshot_id"]].values())
    assert needed - history_objs <= sent
    assert len(needed - history_objs) == 150


# ---------------------------------------------------------------------------
# F02, F04-F07, F09, F10
# ---------------------------------------------------------------------------

def test_f02_up_to_date(hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    res = hub.fetch(OWNER, repo["slug"], [h.head], [h.head])
    assert res["commit_count"] == 0
    assert res["snapshot_count"] == 0
    assert res["blob_count"] == 0 and res["object_count"] == 0
    assert res["mpack_url"] is None


def test_f04_missing_repo_404(hub):
    r = fetch_raw(hub, unique("none"), {"want": ["sha256:" + "a" * 64], "have": []})
    assert r.status_code == 404


@pytest.mark.parametrize("body", [{"want": [], "have": []}, {"have": []}, {}])
def test_f05_empty_or_missing_want_422(hub, repo, body):
    assert fetch_raw(hub, repo["slug"], body).status_code == 422


@pytest.mark.parametrize("body", [
    {"want": ["not-a-hash"], "have": []},
    {"want": ["sha256:" + "A" * 64], "have": []},
    {"want": ["sha256:" + "a" * 63], "have": []},
    {"want": ["sha256:" + "a" * 64], "have": ["nope"]},
    {"want": "sha256:" + "a" * 64, "have": []},
    {"want": [17], "have": []},
])
def test_f06_malformed_422(hub, repo, body):
    assert fetch_raw(hub, repo["slug"], body).status_code == 422


def test_f06_malformed_body_422(hub, repo):
    r = hub.raw("POST", f"/{OWNER}/{repo['slug']}/fetch", content=b"\xc1\xc1",
                headers={"Content-Type": "application/x-msgpack"})
    assert r.status_code == 422


def test_f07_unknown_want_404(hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    r = fetch_raw(hub, repo["slug"], {"want": ["sha256:" + "b" * 64], "have": []})
    assert r.status_code == 404


def test_want_from_other_repo_404(hub, make_repo):
    a, b = make_repo(), make_repo()
    h = small()
    hub.push(OWNER, a["slug"], h.pack(), "main", h.head)
    assert fetch_raw(hub, b["slug"], {"want": [h.head], "have": []}).status_code == 404


def test_unknown_have_ignored(hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    res = hub.fetch(OWNER, repo["slug"], [h.head], ["sha256:" + "c" * 64])
    assert res["commit_count"] == 3


def test_f09_private_repo_anonymous_404(hub, anon_hub, make_repo):
    priv = make_repo(visibility="private")
    h = small()
    hub.push(OWNER, priv["slug"], h.pack(), "main", h.head)
    assert hub.fetch(OWNER, priv["slug"], [h.head])["commit_count"] == 3
    r = fetch_raw(anon_hub, priv["slug"], {"want": [h.head], "have": []})
    assert r.status_code == 404
    r = fetch_raw(anon_hub, priv["slug"], {"want": ["sha256:" + "c" * 64], "have": []})
    assert r.status_code == 404
    # reading is closed too
    assert anon_hub.raw("GET", f"/{OWNER}/{priv['slug']}/commits/{h.head}").status_code == 404
    oid = h.blobs[0]["object_id"]
    assert anon_hub.object(OWNER, priv["slug"], oid).status_code == 404


def test_anonymous_fetch_of_public_repo(hub, anon_hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    out = anon_hub.clone(OWNER, repo["slug"], [h.head])
    assert out["result"]["commit_count"] == 3


def test_f10_mpack_id_is_sha256_of_bytes(hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    res = hub.fetch(OWNER, repo["slug"], [h.head])
    data = hub.download(res["mpack_url"])
    assert res["mpack_id"] == "sha256:" + hashlib.sha256(data).hexdigest()


def test_same_request_same_mpack_id(hub, repo):
    h = small(commits=5)
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    a = hub.fetch(OWNER, repo["slug"], [h.head], [h.commits[1]["commit_id"]])
    b = hub.fetch(OWNER, repo["slug"], [h.head], [h.commits[1]["commit_id"]])
    assert a["mpack_id"] == b["mpack_id"]
    assert hub.download(a["mpack_url"]) == hub.download(b["mpack_url"])


def test_fetch_response_formats(hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    body = {"want": [h.head], "have": []}
    r = fetch_raw(hub, repo["slug"], body)          # default: msgpack
    assert r.headers["content-type"].startswith("application/x-msgpack")
    assert msgpack.unpackb(r.content, raw=False)["commit_count"] == 3
    r = fetch_raw(hub, repo["slug"], body, accept="application/json", fmt="json")
    assert r.headers["content-type"].startswith("application/json")
    assert json.loads(r.content)["commit_count"] == 3


def test_fetch_error_formats(hub, repo):
    """Regression (hardening 15.8): SPEC 4 makes msgpack fetch's default
    format, and error bodies follow the same rule as answers; they came
    back as JSON when the request had no Accept.  Other endpoints keep
    JSON, and Accept still decides."""
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    for body, status in (({"want": ["sha256:" + "b" * 64], "have": []}, 404), ({"want": []}, 422)):
        r = fetch_raw(hub, repo["slug"], body)
        assert r.status_code == status
        assert r.headers["content-type"].startswith("application/x-msgpack"), r.headers
        err = msgpack.unpackb(r.content, raw=False)
        assert isinstance(err["error"], str) and isinstance(err["detail"], str), err
        r = fetch_raw(hub, repo["slug"], body, accept="application/json", fmt="json")
        assert r.status_code == status
        assert r.headers["content-type"].startswith("application/json")
        assert isinstance(json.loads(r.content)["error"], str)
    r = fetch_raw(hub, unique("none"), {"want": [h.head], "have": []})  # no such repository
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/x-msgpack")
    r = hub.raw("GET", f"/{OWNER}/{repo['slug']}/commits/" + "sha256:" + "b" * 64)
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")


def test_tampered_download_url_refused(hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    url = hub.fetch(OWNER, repo["slug"], [h.head])["mpack_url"]
    u = urllib.parse.urlsplit(url)
    assert u.query, "a presigned URL carries its signature"
    q = u.query[:-1] + ("0" if u.query[-1] != "0" else "1")
    bad = urllib.parse.urlunsplit(u._replace(query=q))
    assert hub.client.get(bad).status_code in (400, 401, 403, 404)


def test_fetch_after_push_sees_push(hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    first = hub.fetch(OWNER, repo["slug"], [h.head])
    h2 = small(commits=2, parent=(h.head, h.manifest), first_index=3)
    hub.push(OWNER, repo["slug"], h2.pack(), "main", h2.head)
    head = hub.refs(OWNER, repo["slug"])["branch_heads"]["main"]
    assert head == h2.head
    out = hub.clone(OWNER, repo["slug"], [head], [h.head],
                    known_manifests={h.commits[-1]["snapshot_id"]: h.manifest})
    assert out["result"]["commit_count"] == 2
    assert out["result"]["mpack_id"] != first["mpack_id"]
    assert {c["commit_id"] for c in out["pack"]["commits"]} == \
        {c["commit_id"] for c in h2.commits}


def test_two_wants(hub, repo):
    a = small(commits=2, keep_manifests=True)
    hub.push(OWNER, repo["slug"], a.pack(), "main", a.head)
    first = a.commits[0]["commit_id"]
    b = small(commits=2, parent=(first, a.manifests[first]), first_index=10)
    hub.push(OWNER, repo["slug"], b.pack(), "side", b.head)
    out = hub.clone(OWNER, repo["slug"], [a.head, b.head])
    assert out["result"]["commit_count"] == 4


# ---------------------------------------------------------------------------
# F08: objects without an index row
# ---------------------------------------------------------------------------

def test_f08_unindexed_objects_503(hub, db, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    db.execute("DELETE FROM mpack_index WHERE object_id IN (SELECT object_id FROM "
               f"object_refs WHERE repo_id = {sql_str(repo['repo_id'])})")
    r = fetch_raw(hub, repo["slug"], {"want": [h.head], "have": []})
    assert r.status_code == 503, muselib.decode_body(r)
    assert "retry-after" in {k.lower() for k in r.headers}


# ---------------------------------------------------------------------------
# Reading (SPEC 4.5)
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_commit_log_paging(hub, seed_repo):
    h = seed_repo["history"]
    slug = seed_repo["repo"]["slug"]
    seen, cursor, pages = [], None, 0
    while True:
        page = hub.commits(OWNER, slug, branch="main", limit=100, cursor=cursor)
        assert len(page["commits"]) <= 100
        seen += [c["commit_id"] for c in page["commits"]]
        pages += 1
        cursor = page.get("next_cursor")
        if not cursor:
            break
        assert pages < 20
    assert seen == [c["commit_id"] for c in reversed(h.commits)]
    assert pages == 11
    first = hub.commits(OWNER, slug, branch="main", limit=1)["commits"][0]
    assert first["commit_id"] == h.head
    assert first["message"] == h.commits[-1]["message"]


def test_commit_log_small(hub, repo):
    h = small(commits=5)
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    page = hub.commits(OWNER, repo["slug"], branch="main", limit=2)
    assert [c["commit_id"] for c in page["commits"]] == \
        [h.commits[4]["commit_id"], h.commits[3]["commit_id"]]
    page2 = hub.commits(OWNER, repo["slug"], branch="main", limit=10,
                        cursor=page["next_cursor"])
    assert [c["commit_id"] for c in page2["commits"]] == \
        [c["commit_id"] for c in reversed(h.commits[:3])]
    assert not page2.get("next_cursor")


def test_one_commit(hub, repo):
    h = small(commits=3)
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    root = hub.commit(OWNER, repo["slug"], h.commits[0]["commit_id"])
    head = hub.commit(OWNER, repo["slug"], h.head)
    assert root["parent_ids"] == []
    assert head["parent_ids"] == [h.commits[1]["commit_id"]]
    assert root["generation"] in (0, 1)
    assert head["generation"] == root["generation"] + 2
    for k, v in h.commits[-1].items():
        assert head.get(k) == v, k
    assert muselib.commit_id_of(head) == h.head
    r = hub.raw("GET", f"/{OWNER}/{repo['slug']}/commits/sha256:{'9' * 64}")
    assert r.status_code == 404


def test_tree_of_commit_and_branch(hub, repo):
    h = small(commits=3)
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    contents = {b["object_id"]: b["content"] for b in h.blobs}
    for ref in (h.head, "main"):
        t = hub.tree(OWNER, repo["slug"], ref)
        assert t["snapshot_id"] == h.commits[-1]["snapshot_id"]
        got = {e["path"]: e for e in t["entries"]}
        assert {p: e["object_id"] for p, e in got.items()} == h.manifest
        for p, e in got.items():
            assert e["size_bytes"] == len(contents[e["object_id"]])
    r = hub.raw("GET", f"/{OWNER}/{repo['slug']}/tree/no-such-branch")
    assert r.status_code == 404


def test_raw_object_and_range(hub, repo):
    h = small()
    hub.push(OWNER, repo["slug"], h.pack(), "main", h.head)
    b = h.blobs[0]
    oid, content = b["object_id"], b["content"]
    r = hub.object(OWNER, repo["slug"], oid)
    assert r.status_code == 200
    assert r.content == content
    assert r.headers["content-type"].startswith("application/octet-stream")
    assert r.headers["etag"].strip('"') == oid
    assert "immutable" in r.headers.get("cache-control", "")
    r = hub.object(OWNER, repo["slug"], oid, headers={"Range": "bytes=2-5"})
    assert r.status_code == 206
    assert r.content == content[2:6]
    assert r.headers["content-range"] == f"bytes 2-5/{len(content)}"
    assert r.headers["etag"].strip('"') == oid
    r = hub.object(OWNER, repo["slug"], muselib.blob_id(b"absent"))
    assert r.status_code == 404


# ---------------------------------------------------------------------------
# the command-line client
# ---------------------------------------------------------------------------

def run_script(name, *args):
    r = subprocess.run(["/usr/bin/python3", os.path.join(SCRIPTS, name), *args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert r.returncode == 0, (r.stdout.decode(), r.stderr.decode())
    return r.stdout.decode()


def test_muse_fetch_cli_with_state(server, hub, repo, tmp_path):
    h = small(commits=4)
    pack = tmp_path / "h.mpack"
    pack.write_bytes(h.pack())
    run_script("muse-push", "--url", server.url, "--owner", OWNER, "--repo",
               repo["slug"], "--head", h.head, str(pack))
    state, wc = tmp_path / "state", tmp_path / "wc"
    out = json.loads(run_script("muse-fetch", "--url", server.url, "--owner", OWNER,
                                "--repo", repo["slug"], "--branch", "main",
                                "--state", str(state), "--checkout", str(wc), "--json"))
    assert out["commit_count"] == 4 and out["have"] == []
    contents = {b["object_id"]: b["content"] for b in h.blobs}
    for p, oid in h.manifest.items():
        assert (wc / p).read_bytes() == contents[oid]
    # push two more, fetch incrementally: have = the state's tip
    h2 = small(commits=2, parent=(h.head, h.manifest), first_index=4)
    hub.push(OWNER, repo["slug"], h2.pack(), "main", h2.head)
    wc2 = tmp_path / "wc2"
    out = json.loads(run_script("muse-fetch", "--url", server.url, "--owner", OWNER,
                                "--repo", repo["slug"], "--state", str(state),
                                "--checkout", str(wc2), "--json"))
    assert out["have"] == [h.head]
    assert out["commit_count"] == 2
    contents.update({b["object_id"]: b["content"] for b in h2.blobs})
    files = {str(p.relative_to(wc2)): p.read_bytes() for p in wc2.rglob("*") if p.is_file()}
    assert files == {p: contents[o] for p, o in h2.manifest.items()}
    # a third fetch: nothing to send
    out = json.loads(run_script("muse-fetch", "--url", server.url, "--owner", OWNER,
                                "--repo", repo["slug"], "--state", str(state), "--json"))
    assert out["commit_count"] == 0
