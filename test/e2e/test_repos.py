"""SPEC 4.1 (repositories), 4.2 (refs), 4.8 (service) and the HTTP layer's
limits, written against the contract only (black box)."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import msgpack
import pytest

import muselib
from e2e_util import RawHTTP, slugify, unique

OWNER = "gabriel"
REPO_FIELDS = ("repo_id", "owner", "name", "slug", "visibility",
               "default_branch", "created_at")


# ---------------------------------------------------------------------------
# Service endpoints (SPEC 4.8)
# ---------------------------------------------------------------------------

def test_healthz(hub):
    assert hub.raw("GET", "/healthz").status_code == 200


def test_readyz(hub):
    assert hub.raw("GET", "/readyz").status_code == 200


def test_metrics_counts_requests(hub):
    hub.raw("GET", "/healthz")
    r = hub.raw("GET", "/metrics")
    assert r.status_code == 200
    assert "text/plain" in r.headers.get("content-type", "")
    assert "musehub_http_requests_total" in r.text


def test_unknown_route_is_404_with_error_body(hub):
    r = hub.raw("GET", "/api/no-such-thing", accept="application/json")
    assert r.status_code == 404
    body = r.json()
    assert isinstance(body.get("error"), str) and "detail" in body


# ---------------------------------------------------------------------------
# Create (SPEC 4.1)
# ---------------------------------------------------------------------------

def test_create_returns_201_with_fields_and_aliases(hub, make_repo):
    name = unique("Create")
    r = make_repo(name=name)
    for f in REPO_FIELDS:
        assert f in r, (f, r)
    assert r["owner"] == OWNER
    assert r["name"] == name
    assert r["slug"] == slugify(name)
    assert r["visibility"] == "public"
    assert r["default_branch"] == "main"
    assert r["repoId"] == r["repo_id"]
    assert r["createdAt"] == r["created_at"]
    assert isinstance(r["repo_id"], str) and r["repo_id"]


def test_create_with_json_body(hub, make_repo):
    name = unique("json")
    resp = hub.raw("POST", "/api/repos", {"owner": OWNER, "name": name,
                                          "visibility": "private",
                                          "initialize": False}, fmt="json")
    assert resp.status_code == 201, resp.text
    body = resp.json()  # JSON is the default response format
    assert body["visibility"] == "private"
    hub.delete_repo(body["repo_id"])


@pytest.mark.parametrize("name,slug", [
    ("My Repo!!", "my-repo-"),
    ("Hello_World.v2", "hello_world.v2"),
    ("a  b\tc", "a-b-c"),
    ("ÜNÏcode", "-n-code"),
    ("x--y", "x--y"),
])
def test_slug_rule(hub, name, slug):
    assert slugify(name) == slug          # the test's own reading of SPEC
    r = hub.create_repo(OWNER, name)
    try:
        assert r["slug"] == slug
        assert r["name"] == name
    finally:
        hub.delete_repo(r["repo_id"])


def test_duplicate_is_409(hub, make_repo):
    name = unique("dup")
    make_repo(name=name)
    with pytest.raises(muselib.HubError) as e:
        hub.create_repo(OWNER, name)
    assert e.value.status == 409


def test_duplicate_slug_from_other_name_is_409(hub, make_repo):
    base = unique("Dup")
    make_repo(name=base + " X")
    with pytest.raises(muselib.HubError) as e:
        hub.create_repo(OWNER, base.lower() + "-x")
    assert e.value.status == 409


@pytest.mark.parametrize("body", [
    {"owner": OWNER, "visibility": "public", "initialize": False},          # no name
    {"owner": OWNER, "name": 123, "visibility": "public"},                 # name type
    {"owner": OWNER, "name": "bad-vis", "visibility": "secret"},           # visibility
    {"owner": OWNER, "name": "bad-init", "visibility": "public", "initialize": "yes"},
    {"owner": OWNER, "name": "bad-init2", "visibility": "public", "initialize": 1},
    {"owner": OWNER, "name": "", "visibility": "public"},                   # empty name
    {"owner": OWNER, "name": "no-vis"},                                     # visibility missing
    {"owner": OWNER, "name": "nil-vis", "visibility": None},
    {"owner": OWNER, "name": "case-vis", "visibility": "Public"},
    {"owner": OWNER, "name": "int-vis", "visibility": 1},
    {"owner": OWNER, "name": ".", "visibility": "public"},                  # slug "."
])
@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_bad_fields_422(hub, body, fmt):
    r = hub.raw("POST", "/api/repos", body, fmt=fmt)
    assert r.status_code == 422, r.text
    err = muselib.decode_body(r)
    assert isinstance(err, dict) and "error" in err and "detail" in err


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_visibility_typo_is_422_and_creates_nothing(hub, fmt):
    """Issue 15 item 10: "visiblity": "private" used to give 201 with
    visibility public.  visibility is required (SPEC 4.1), never defaulted."""
    name = unique("typo")
    r = hub.raw("POST", "/api/repos", {"owner": OWNER, "name": name, "visiblity": "private"}, fmt=fmt)
    assert r.status_code == 422, (r.status_code, r.text)
    err = muselib.decode_body(r)
    assert err["error"] == "invalid_field" and "visibility" in err["detail"], err
    listed = [x["name"] for x in hub.list_repos(OWNER)["repos"]]
    assert name not in listed
    assert hub.raw("GET", f"/{OWNER}/{slugify(name)}/refs").status_code == 404


@pytest.mark.parametrize("name", [".", "..", ".hidden", "...", ".git"])
def test_dot_slugs_are_422(hub, name):
    """SPEC 4.1: a slug that is ".", ".." or starts with "." is a 422."""
    r = hub.raw("POST", "/api/repos", {"owner": OWNER, "name": name, "visibility": "public"}, fmt="json")
    assert r.status_code == 422, (r.status_code, r.text)
    assert r.json()["error"] == "invalid_field"
    assert slugify(name) not in [x["slug"] for x in hub.list_repos(OWNER)["repos"]]


@pytest.mark.parametrize("ctype,content", [
    ("application/json", b'{"owner": "gabriel", "name": '),
    ("application/json", b"[1, 2, 3]"),
    ("application/json", b"\xff\xfe not json"),
    ("application/x-msgpack", b"\xc1"),                                   # never-used byte
    ("application/x-msgpack", msgpack.packb({"owner": "gabriel"})[:-3]),  # truncated
    ("application/x-msgpack", msgpack.packb([1, 2])),                     # not a map
    ("application/x-msgpack", msgpack.packb({"owner": OWNER, "name": "t",
                                             "visibility": "public"}) + b"\x00"),  # trailing
], ids=["json-truncated", "json-array", "json-bad-utf8", "mp-never-used", "mp-truncated",
        "mp-array", "mp-trailing"])
def test_malformed_bodies_422(hub, ctype, content):
    r = hub.raw("POST", "/api/repos", content=content,
                headers={"Content-Type": ctype})
    assert r.status_code == 422, (r.status_code, r.text)


# ---------------------------------------------------------------------------
# Get, list, delete
# ---------------------------------------------------------------------------

def test_get_by_id(hub, repo):
    got = hub.get_repo(repo["repo_id"])
    for f in REPO_FIELDS:
        assert got[f] == repo[f], f
    assert got["repoId"] == repo["repo_id"]


def test_get_unknown_is_404(hub, repo):
    rid = repo["repo_id"]
    other = rid[:-1] + ("0" if rid[-1] != "0" else "1")
    assert hub.raw("GET", f"/api/repos/{other}").status_code == 404


def test_private_repo_visible_to_owner(hub, make_repo):
    r = make_repo(visibility="private")
    got = hub.get_repo(r["repo_id"])
    assert got["visibility"] == "private"
    listed = hub.list_repos(OWNER)["repos"]
    assert r["repo_id"] in {x["repo_id"] for x in listed}
    assert hub.refs(OWNER, r["slug"])["branch_heads"] == {}


def test_private_repo_hidden_from_anonymous(anon_hub, make_repo):
    r = make_repo(visibility="private")
    pub = make_repo(visibility="public")
    assert anon_hub.raw("GET", f"/api/repos/{r['repo_id']}").status_code == 404
    assert anon_hub.raw("GET", f"/{OWNER}/{r['slug']}/refs").status_code == 404
    listed = {x["repo_id"] for x in anon_hub.list_repos(OWNER)["repos"]}
    assert r["repo_id"] not in listed
    assert pub["repo_id"] in listed
    assert anon_hub.get_repo(pub["repo_id"])["repo_id"] == pub["repo_id"]


def test_anonymous_writes_are_401(anon_hub, repo):
    r = anon_hub.raw("POST", "/api/repos", {"owner": OWNER, "name": unique("anon"),
                                           "visibility": "public", "initialize": False})
    assert r.status_code == 401
    assert anon_hub.raw("DELETE", f"/api/repos/{repo['repo_id']}").status_code == 401


def test_list_by_owner(hub, make_repo):
    a, b = make_repo(), make_repo()
    body = hub.list_repos(OWNER)
    ids = {x["repo_id"] for x in body["repos"]}
    assert {a["repo_id"], b["repo_id"]} <= ids
    assert all(x["owner"] == OWNER for x in body["repos"])
    assert hub.list_repos(unique("nobody"))["repos"] == []


def test_delete_then_404(hub):
    r = hub.create_repo(OWNER, unique("del"))
    hub.delete_repo(r["repo_id"])
    assert hub.raw("GET", f"/api/repos/{r['repo_id']}").status_code == 404
    assert hub.raw("GET", f"/{OWNER}/{r['slug']}/refs").status_code == 404
    assert hub.raw("DELETE", f"/api/repos/{r['repo_id']}").status_code == 404
    # the name is free again
    r2 = hub.create_repo(OWNER, r["name"])
    hub.delete_repo(r2["repo_id"])


def test_delete_removes_ref_rows(hub, db, make_repo):
    r = make_repo(initialize=True)
    rid = r["repo_id"]
    assert db.count(f"SELECT count(*) FROM branches WHERE repo_id = '{rid}'") == 1
    hub.delete_repo(rid)
    for t in ("branches", "commit_refs", "snapshot_refs", "object_refs"):
        assert db.count(f"SELECT count(*) FROM {t} WHERE repo_id = '{rid}'") == 0, t


# ---------------------------------------------------------------------------
# Refs (SPEC 4.2)
# ---------------------------------------------------------------------------

def test_refs_of_initialized_repo(hub, make_repo):
    r = make_repo(initialize=True)
    refs = hub.refs(OWNER, r["slug"])
    assert refs["repo_id"] == r["repo_id"]
    assert refs["default_branch"] == "main"
    assert set(refs["branch_heads"]) == {"main"}
    head = refs["branch_heads"]["main"]
    assert muselib.valid_id(head)
    # the initial commit is an empty root: readable through the read API
    c = hub.commit(OWNER, r["slug"], head)
    assert c["commit_id"] == head
    assert c.get("parent_commit_id") is None
    assert c["snapshot_id"] == muselib.EMPTY_SNAPSHOT_ID
    assert muselib.commit_id_of(c) == head


def test_refs_of_empty_repo(hub, repo):
    refs = hub.refs(OWNER, repo["slug"])
    assert refs["branch_heads"] == {}
    assert refs["repo_id"] == repo["repo_id"]


def test_refs_unknown_repo_404(hub):
    assert hub.raw("GET", f"/{OWNER}/{unique('nope')}/refs").status_code == 404
    assert hub.raw("GET", f"/{unique('nobody')}/x/refs").status_code == 404


# ---------------------------------------------------------------------------
# Formats (SPEC 4: Accept decides)
# ---------------------------------------------------------------------------

def test_accept_msgpack(hub, repo):
    r = hub.raw("GET", f"/api/repos/{repo['repo_id']}", accept="application/x-msgpack")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-msgpack")
    assert msgpack.unpackb(r.content, raw=False)["repo_id"] == repo["repo_id"]


def test_accept_json_and_default(hub, repo):
    for accept in ("application/json", None, "*/*"):
        r = hub.raw("GET", f"/{OWNER}/{repo['slug']}/refs", accept=accept)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/json"), accept
        assert json.loads(r.content)["repo_id"] == repo["repo_id"]


def test_errors_follow_accept(hub):
    r = hub.raw("GET", f"/{OWNER}/{unique('x')}/refs", accept="application/x-msgpack")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/x-msgpack")
    assert "error" in msgpack.unpackb(r.content, raw=False)


# ---------------------------------------------------------------------------
# HTTP limits and robustness
# ---------------------------------------------------------------------------

def test_oversized_header_431(server):
    with RawHTTP(server.port) as c:
        big = "a" * (256 * 1024)
        try:
            c.send(f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading it all
        status, _, _ = c.response()
        assert status == 431


def test_oversized_body_413(server):
    with RawHTTP(server.port) as c:
        c.send(b"POST /api/repos HTTP/1.1\r\nHost: x\r\n"
               b"Content-Type: application/json\r\n"
               b"Content-Length: 8589934592\r\n\r\n{\"owner\":")
        status, _, _ = c.response()
        assert status == 413
    assert muselib.Hub(server.url).raw("GET", "/healthz").status_code == 200


def test_many_concurrent_keepalive_connections(server):
    n, per = 200, 3
    barrier = threading.Barrier(n)
    errors: list = []

    def worker() -> None:
        try:
            c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            c.connect()
            barrier.wait(30)
            for _ in range(per):
                c.request("GET", "/healthz")
                r = c.getresponse()
                r.read()
                assert r.status == 200
            c.close()
        except Exception as e:  # collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]


def test_half_body_then_disconnect(server):
    for _ in range(5):
        with RawHTTP(server.port) as c:
            c.send(b"POST /api/repos HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                   + b'{"owner": "gabriel", "name": "half' )
    time.sleep(0.2)
    h = muselib.Hub(server.url)
    assert h.raw("GET", "/healthz").status_code == 200
    assert h.raw("GET", "/readyz").status_code == 200


def test_slow_headers_time_out(start_server):
    srv = start_server(MUSEHUB_REQUEST_TIMEOUT_MS="500")
    with RawHTTP(srv.port, timeout=15) as c:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        t0 = time.monotonic()
        outcome = None
        while time.monotonic() - t0 < 10:
            try:
                c.send(b"a")      # one byte every 100 ms: never idle, never done
            except (BrokenPipeError, ConnectionResetError):
                outcome = "closed"
                break
            c.sock.settimeout(0.1)
            try:
                data = c.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                outcome = "closed"
                break
            if data == b"":
                outcome = "closed"
            else:
                assert data.startswith(b"HTTP/1.1 408"), data[:100]
                outcome = "408"
            break
        assert outcome is not None, "the server let a slow client trickle headers for 10 s"
        assert time.monotonic() - t0 < 5
    assert muselib.Hub(srv.url).raw("GET", "/healthz").status_code == 200


def test_idle_connection_survives_short_pause(server):
    with RawHTTP(server.port) as c:
        c.request("GET", "/healthz")
        assert c.response()[0] == 200
        time.sleep(1.0)
        c.request("GET", "/healthz")
        assert c.response()[0] == 200


def test_pipelined_requests_answered_in_order(server, make_repo):
    a, b = make_repo(), make_repo()
    with RawHTTP(server.port) as c:
        reqs = b"".join(
            f"GET {p} HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n".encode()
            for p in (f"/api/repos/{a['repo_id']}", "/healthz",
                      f"/api/repos/{b['repo_id']}", f"/{OWNER}/{a['slug']}/refs"))
        c.send(reqs)
        s1, _, b1 = c.response()
        s2, _, _ = c.response()
        s3, _, b3 = c.response()
        s4, _, b4 = c.response()
    assert (s1, s2, s3, s4) == (200, 200, 200, 200)
    assert json.loads(b1)["repo_id"] == a["repo_id"]
    assert json.loads(b3)["repo_id"] == b["repo_id"]
    assert json.loads(b4)["repo_id"] == a["repo_id"]


def test_chunked_request_body(server, hub):
    name = unique("chunked")
    body = json.dumps({"owner": OWNER, "name": name, "visibility": "public",
                       "initialize": False}).encode()
    pieces = [body[:5], body[5:20], body[20:]]
    chunked = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    with RawHTTP(server.port) as c:
        c.send(b"POST /api/repos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Accept: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(chunked), 7):   # trickle it in small writes
            c.send(chunked[i:i + 7])
        status, _, rbody = c.response()
    assert status == 201, rbody
    r = json.loads(rbody)
    assert r["name"] == name
    hub.delete_repo(r["repo_id"])


def test_expect_100_continue(server, hub):
    name = unique("expect")
    body = json.dumps({"owner": OWNER, "name": name, "visibility": "public",
                       "initialize": False}).encode()
    with RawHTTP(server.port) as c:
        c.send(b"POST /api/repos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Accept: application/json\r\nExpect: 100-continue\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode())
        status, _, _ = c.response()
        assert status == 100
        c.send(body)
        status, _, rbody = c.response()
    assert status == 201, rbody
    hub.delete_repo(json.loads(rbody)["repo_id"])


def test_http10_close(server):
    with RawHTTP(server.port) as c:
        c.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        status, _, _ = c.response()
        assert status == 200
        assert c.closed_by_peer()


def test_garbage_request_line(server):
    with RawHTTP(server.port) as c:
        c.send(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")   # e.g. a TLS hello
        try:
            status, _, _ = c.response()
            assert status == 400
        except ConnectionError:
            pass   # closing without an answer is fine too
    assert muselib.Hub(server.url).raw("GET", "/healthz").status_code == 200


def test_sigterm_exits_zero(start_server):
    srv = start_server()
    assert srv.hub().raw("GET", "/healthz").status_code == 200
    assert srv.stop() == 0
