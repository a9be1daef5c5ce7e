"""SPEC 5 (MSign authentication, identities and keys) and the permission
rules of SPEC 4, black box: a server WITHOUT a dev identity, the first admin
made with `musehubd identity add`, requests signed by scripts/msign.py (an
implementation independent of the server's).

Covers: signed push and fetch through muselib.Hub's signer; anonymous
writes (401); tampered body, path, query and method, stale and future
`created`, unknown and revoked keys, malformed or duplicated signature
headers (all 401, reason never in the body); the identities API; the
private-repository matrix (owner, collaborator read/write/admin, stranger,
anonymous, site admin) for refs and push presign; collaborator
management; rate limits (429 + Retry-After) per identity and per client
address, X-Forwarded-For only from trusted proxies."""
from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest

import msign
import muselib
from conftest import server_binary
from e2e_util import unique


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

class Who:
    """An identity with its key: .handle .key .key_id .priv_pem .pub_pem"""

    def __init__(self, handle: str) -> None:
        self.handle = handle
        self.priv_pem, self.pub_pem, self.key_id = msign.generate_key()
        self.key = msign.load_private_key(self.priv_pem)

    def signer(self):
        return msign.signer_from_key(self.key_id, self.key)

    def hub(self, server) -> muselib.Hub:
        return muselib.Hub(server.url, signer=self.signer())


def identity_add(server, who: Who, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    f = tmp_path / f"{who.handle}.pub"
    f.write_bytes(who.pub_pem)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSEHUB_")}
    env["MUSEHUB_DATABASE_URL"] = server.database_url
    return subprocess.run([server_binary(), "identity", "add", "--handle", who.handle,
                           "--public-key-file", str(f), *flags],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)


def small(seed: str, commits: int = 3) -> muselib.History:
    return muselib.generate(commits=commits, files=4, changed=1, blob_size=16, seed=seed)


def send(server, method: str, path: str, body: bytes = b"", headers=None) -> httpx.Response:
    """One raw request (no muselib encoding, no signer)."""
    h = {"Content-Type": "application/json"} if body else {}
    h.update(headers or {})
    with httpx.Client(timeout=30) as c:
        return c.request(method, server.url + path, content=body or None, headers=h)


def signed(who: Who, method: str, url: str, body: bytes = b"", **kw) -> dict:
    return msign.sign(method, url, body, who.key_id, who.key, **kw)


def assert_401(r: httpx.Response, signature: bool = True) -> None:
    """401 with SPEC's error body; for a refused signature the detail is the
    same whatever the reason (the reason stays in the server log).  The
    body is in the endpoint's format (msgpack for fetch, SPEC 4.4)."""
    assert r.status_code == 401, (r.status_code, r.text)
    body = muselib.decode_body(r)
    assert body["error"] == "unauthorized"
    if signature:
        assert body["detail"] == "the request signature was not accepted", body


# ---------------------------------------------------------------------------
# fixtures: one server without a dev identity and a cast of identities
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cast(server_factory, tmp_path_factory):
    srv = server_factory(dev_identity=None)
    tmp = tmp_path_factory.mktemp("keys")
    admin = Who(unique("admin"))
    res = identity_add(srv, admin, tmp, "--admin")
    assert res.returncode == 0, res.stderr.decode()
    # The CLI prints the key id: sha256 of the DER SubjectPublicKeyInfo.
    assert res.stdout.decode().strip() == admin.key_id
    people = {"admin": admin}
    ah = admin.hub(srv)
    for role in ("alice", "bob", "carol", "dave", "eve"):
        w = Who(unique(role))
        r = ah.call("POST", "/api/identities",
                    {"handle": w.handle, "public_key_pem": w.pub_pem.decode()}, expect=(201,))
        assert r["key_id"] == w.key_id and r["handle"] == w.handle
        assert r["identity_id"] == muselib.blob_id(w.handle.encode())
        assert r["is_admin"] is False and r["is_agent"] is False
        people[role] = w
    ah.close()
    return {"server": srv, "tmp": tmp, **people}


@pytest.fixture
def hubs(cast):
    made = []

    def hub(role: str | None) -> muselib.Hub:
        h = cast[role].hub(cast["server"]) if role else muselib.Hub(cast["server"].url)
        made.append(h)
        return h

    yield hub
    for h in made:
        h.close()


# ---------------------------------------------------------------------------
# signed push and fetch
# ---------------------------------------------------------------------------

def test_signed_create_push_fetch(cast, hubs):
    alice = hubs("alice")
    a = cast["alice"].handle
    repo = alice.create_repo(a, unique("signed"), visibility="private")
    hist = small(unique("s"))
    res = alice.push(a, repo["slug"], hist.pack(), "main", hist.head)
    assert res["head"] == hist.head and res["commits_written"] == 3
    refs = alice.refs(a, repo["slug"])
    assert refs["branch_heads"] == {"main": hist.head}
    got = alice.clone(a, repo["slug"], [hist.head])
    assert got["result"]["commit_count"] == 3
    assert set(got["manifests"]) == {s["snapshot_id"] for s in hist.snapshots}
    # A second, incremental push signed the same way.
    more = muselib.generate(commits=2, files=4, changed=1, blob_size=16, seed=unique("m"),
                            parent=(hist.head, hist.manifest), first_index=3)
    res = alice.push(a, repo["slug"], more.pack(), "main", more.head)
    assert res["head"] == more.head


def test_anonymous_reads_public_but_never_writes(cast, hubs):
    alice, anon = hubs("alice"), hubs(None)
    a = cast["alice"].handle
    pub = alice.create_repo(a, unique("pub"), visibility="public", initialize=True)
    assert anon.refs(a, pub["slug"])["repo_id"] == pub["repo_id"]
    assert anon.get_repo(pub["repo_id"])["repo_id"] == pub["repo_id"]
    r = anon.raw("POST", "/api/repos", {"owner": a, "name": unique("x")}, fmt="json")
    assert_401(r, signature=False)
    r = anon.raw("POST", f"/{a}/{pub['slug']}/push/mpack-presign",
                 {"mpack_key": muselib.blob_id(b"x"), "size_bytes": 1}, fmt="json")
    assert_401(r, signature=False)
    r = anon.raw("DELETE", f"/api/repos/{pub['repo_id']}")
    assert_401(r, signature=False)
    r = anon.raw("POST", "/api/identities", {"handle": unique("h"), "public_key_pem": "x"}, fmt="json")
    assert_401(r, signature=False)


# ---------------------------------------------------------------------------
# every way a signature can be wrong: 401, reason only in the log
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(cast):
    """A public repo of alice with one commit, and a fetch body for it."""
    srv, al = cast["server"], cast["alice"]
    with al.hub(srv) as h:
        repo = h.create_repo(al.handle, unique("target"), initialize=True)
        head = h.refs(al.handle, repo["slug"])["branch_heads"]["main"]
    body = muselib.encode_body({"want": [head], "have": []}, "json")[0]
    return {"repo": repo, "head": head, "fetch_path": f"/{al.handle}/{repo['slug']}/fetch",
            "refs_path": f"/{al.handle}/{repo['slug']}/refs", "body": body}


def test_valid_signature_baseline(cast, target):
    srv, al = cast["server"], cast["alice"]
    url = srv.url + target["fetch_path"]
    r = send(srv, "POST", target["fetch_path"], target["body"], signed(al, "POST", url, target["body"]))
    assert r.status_code == 200, r.text
    r = send(srv, "GET", target["refs_path"], headers=signed(al, "GET", srv.url + target["refs_path"]))
    assert r.status_code == 200, r.text


def test_tampered_body_is_401(cast, target):
    srv, al = cast["server"], cast["alice"]
    url = srv.url + target["fetch_path"]
    h = signed(al, "POST", url, target["body"])
    other = target["body"].replace(b"]", b" ]", 1)
    assert_401(send(srv, "POST", target["fetch_path"], other, h))
    # A matching Content-Digest for the new body does not help: the digest
    # header is covered by the signature.
    h2 = dict(h, **{"Content-Digest": msign.content_digest(other)})
    assert_401(send(srv, "POST", target["fetch_path"], other, h2))
    # Dropping the body entirely.
    assert_401(send(srv, "POST", target["fetch_path"], b"", h))


def test_tampered_path_query_method_are_401(cast, target):
    srv, al = cast["server"], cast["alice"]
    h = signed(al, "GET", srv.url + target["refs_path"])
    assert_401(send(srv, "GET", target["refs_path"].replace("/refs", "x/refs"), headers=h))
    assert_401(send(srv, "GET", target["refs_path"] + "?a=1", headers=h))
    hq = signed(al, "GET", srv.url + target["refs_path"] + "?a=1")
    assert send(srv, "GET", target["refs_path"] + "?a=1", headers=hq).status_code == 200
    assert_401(send(srv, "GET", target["refs_path"] + "?a=2", headers=hq))
    assert_401(send(srv, "GET", target["refs_path"], headers=hq))
    hd = signed(al, "DELETE", srv.url + f"/api/repos/{target['repo']['repo_id']}")
    assert_401(send(srv, "GET", target["refs_path"], headers=hd))
    # The repository was not deleted by any of this.
    assert send(srv, "GET", target["refs_path"]).status_code == 200


def test_stale_and_future_created_are_401(cast, target):
    srv, al = cast["server"], cast["alice"]
    url = srv.url + target["refs_path"]
    now = int(time.time())
    assert_401(send(srv, "GET", target["refs_path"], headers=signed(al, "GET", url, created=now - 400)))
    assert_401(send(srv, "GET", target["refs_path"], headers=signed(al, "GET", url, created=now + 400)))
    r = send(srv, "GET", target["refs_path"], headers=signed(al, "GET", url, created=now - 200))
    assert r.status_code == 200


def test_unknown_key_is_401(cast, target):
    srv = cast["server"]
    stranger = Who("nobody")
    url = srv.url + target["refs_path"]
    assert_401(send(srv, "GET", target["refs_path"], headers=signed(stranger, "GET", url)))
    # A registered key id with someone else's private key.
    forged = msign.sign("GET", url, b"", cast["alice"].key_id, stranger.key)
    assert_401(send(srv, "GET", target["refs_path"], headers=forged))


def test_malformed_signature_headers_are_401(cast, target):
    srv, al = cast["server"], cast["alice"]
    url = srv.url + target["refs_path"]
    good = signed(al, "GET", url)
    si, sg = good["Signature-Input"], good["Signature"]
    cases = [
        {"Signature": sg},                                            # no Signature-Input
        {"Signature-Input": si},                                      # no Signature
        {"Signature-Input": si.replace("msign=", "sig1="), "Signature": sg.replace("msign=", "sig1=")},
        {"Signature-Input": si, "Signature": sg[:-7] + ":"},          # truncated bytes
        {"Signature-Input": si, "Signature": "msign=:AAAA:"},         # not 64 bytes
        {"Signature-Input": si.replace('"@path" ', ""), "Signature": sg},
        {"Signature-Input": si.replace('alg="ecdsa-p256-sha256"', 'alg="rsa-pss-sha512"'), "Signature": sg},
        {"Signature-Input": si + ", other=()", "Signature": sg},
        {"Signature-Input": si.replace("(", "((", 1), "Signature": sg},
        {"Signature-Input": "garbage", "Signature": "garbage"},
    ]
    for h in cases:
        assert_401(send(srv, "GET", target["refs_path"], headers=h))
    # Repeated signature headers are refused (combining would change what
    # was signed).
    with httpx.Client(timeout=10) as c:
        req = c.build_request("GET", url, headers=[("Signature-Input", si), ("Signature", sg),
                                                   ("Signature", sg)])
        assert_401(c.send(req))


def test_empty_post_signs_without_content_digest(cast):
    srv, al = cast["server"], cast["alice"]
    url = srv.url + "/api/repos"
    h = signed(al, "POST", url, b"")
    assert "Content-Digest" not in h and "content-digest" not in h["Signature-Input"]
    r = send(srv, "POST", "/api/repos", b"", h)
    assert r.status_code == 422, r.text  # authenticated; the empty body is what is wrong
    # Covering content-digest on an empty body is refused.
    params = msign.signature_params(msign.COMPONENTS_BODY, int(time.time()), al.key_id)
    dg = msign.content_digest(b"")
    base = msign.signature_base("POST", "/api/repos", "?", dg, params)
    sig = msign.ecdsa_raw(al.key, base)
    r = send(srv, "POST", "/api/repos", b"", {"Content-Digest": dg, "Signature-Input": "msign=" + params,
                                              "Signature": "msign=" + msign.sf_bytes(sig)})
    assert_401(r)


def test_signed_request_on_dev_server_is_still_verified(server, cast, target):
    """A dev-identity server does not let a bad signature fall back to dev."""
    stranger = Who("nobody")
    h = signed(stranger, "GET", server.url + "/api/repos?owner=x")
    assert_401(send(server, "GET", "/api/repos?owner=x", headers=h))


# ---------------------------------------------------------------------------
# identities and keys
# ---------------------------------------------------------------------------

def test_identities_api(cast, hubs):
    admin, bob, anon = hubs("admin"), hubs("bob"), hubs(None)
    w = Who(unique("agent"))
    body = {"handle": w.handle, "public_key_pem": w.pub_pem.decode(), "is_agent": True}
    assert bob.raw("POST", "/api/identities", body, fmt="json").status_code == 403
    assert anon.raw("POST", "/api/identities", body, fmt="json").status_code == 401
    r = admin.call("POST", "/api/identities", body, fmt="json", expect=(201,))
    assert r["is_agent"] is True and r["is_admin"] is False and r["key_id"] == w.key_id
    # Same handle again, same key under another handle: 409.
    assert admin.raw("POST", "/api/identities", body, fmt="json").status_code == 409
    body2 = dict(body, handle=unique("dup"))
    assert admin.raw("POST", "/api/identities", body2, fmt="json").status_code == 409
    # Bad fields: 422.
    for bad in ({"handle": "bad handle", "public_key_pem": w.pub_pem.decode()},
                {"handle": "api", "public_key_pem": w.pub_pem.decode()},
                {"handle": unique("k"), "public_key_pem": "not a key"},
                {"handle": unique("k")},
                {"handle": unique("k"), "public_key_pem": w.pub_pem.decode(), "is_admin": "yes"}):
        assert admin.raw("POST", "/api/identities", bad, fmt="json").status_code == 422, bad
    # A P-384 key is not an MSign key.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert admin.raw("POST", "/api/identities", {"handle": unique("k"), "public_key_pem": p384},
                     fmt="json").status_code == 422
    # The new identity signs.
    with w.hub(cast["server"]) as wh:
        assert wh.call("GET", f"/api/identities/{w.handle}")["is_agent"] is True
    # Reading an identity.
    info = anon.call("GET", f"/api/identities/{w.handle}")
    assert info["identity_id"] == muselib.blob_id(w.handle.encode())
    assert [k["key_id"] for k in info["keys"]] == [w.key_id] and info["keys"][0]["revoked_at"] is None
    assert anon.raw("GET", f"/api/identities/{unique('none')}").status_code == 404


def test_add_and_revoke_keys(cast, hubs, target):
    srv = cast["server"]
    admin, bob = hubs("admin"), hubs("bob")
    carol = cast["carol"]
    second = Who(carol.handle)
    path = f"/api/identities/{carol.handle}/keys"
    body = {"public_key_pem": second.pub_pem.decode()}
    # Someone else (not admin): 403; anonymous: 401.
    assert bob.raw("POST", path, body, fmt="json").status_code == 403
    assert hubs(None).raw("POST", path, body, fmt="json").status_code == 401
    # The identity itself adds a second key.
    with carol.hub(srv) as ch:
        r = ch.call("POST", path, body, fmt="json", expect=(201,))
    assert r["key_id"] == second.key_id and r["handle"] == carol.handle
    assert admin.raw("POST", path, body, fmt="json").status_code == 409
    assert admin.raw("POST", f"/api/identities/{unique('none')}/keys",
                     {"public_key_pem": Who("x").pub_pem.decode()}, fmt="json").status_code == 404
    url = srv.url + target["refs_path"]
    assert send(srv, "GET", target["refs_path"], headers=signed(second, "GET", url)).status_code == 200
    # Revoke it: refused at once (this process dropped it from its cache).
    with second.hub(srv) as sh:
        assert sh.raw("DELETE", f"{path}/{second.key_id}").status_code == 204
    assert_401(send(srv, "GET", target["refs_path"], headers=signed(second, "GET", url)))
    # Revoking again is idempotent; unknown key ids are 404.
    assert admin.raw("DELETE", f"{path}/{second.key_id}").status_code == 204
    assert admin.raw("DELETE", f"{path}/{muselib.blob_id(b'nope')}").status_code == 404
    assert admin.raw("DELETE", f"{path}/not-an-id").status_code == 404
    assert bob.raw("DELETE", f"{path}/{carol.key_id}").status_code == 403
    # The first key still works, and the listing shows the revocation.
    assert send(srv, "GET", target["refs_path"], headers=signed(carol, "GET", url)).status_code == 200
    keys = {k["key_id"]: k for k in admin.call("GET", f"/api/identities/{carol.handle}")["keys"]}
    assert keys[second.key_id]["revoked_at"] is not None and keys[carol.key_id]["revoked_at"] is None


def test_revocation_reaches_other_processes(cast, start_server, tmp_path):
    """Revoked through one server process, refused by another (which had
    the key cached) within the cache lifetime (5 s)."""
    srv = cast["server"]
    other = start_server(dev_identity=None, share=srv)
    admin = cast["admin"]
    w = Who(unique("rev"))
    with admin.hub(srv) as ah:
        ah.call("POST", "/api/identities", {"handle": w.handle, "public_key_pem": w.pub_pem.decode()},
                expect=(201,))
    path = f"/api/identities/{w.handle}"
    assert send(other, "GET", path, headers=signed(w, "GET", other.url + path)).status_code == 200
    with admin.hub(srv) as ah:
        assert ah.raw("DELETE", f"{path}/keys/{w.key_id}").status_code == 204
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        r = send(other, "GET", path, headers=signed(w, "GET", other.url + path))
        if r.status_code == 401:
            break
        time.sleep(0.5)
    assert_401(r)


# ---------------------------------------------------------------------------
# private repositories and collaborators
# ---------------------------------------------------------------------------

EXPECT = {
    # role: (refs, presign)
    "owner": (200, 200),
    "read": (200, 403),
    "write": (200, 200),
    "radmin": (200, 200),
    "stranger": (404, 404),
    "anonymous": (404, 404),
    "siteadmin": (200, 200),
}


def test_private_repo_matrix(cast, hubs):
    a = cast["alice"].handle
    alice = hubs("alice")
    repo = alice.create_repo(a, unique("priv"), visibility="private", initialize=True)
    rid, slug = repo["repo_id"], repo["slug"]
    for who, role in (("bob", "read"), ("carol", "write"), ("dave", "admin")):
        r = alice.call("PUT", f"/api/repos/{rid}/collaborators/{cast[who].handle}", {"role": role},
                       fmt="json")
        assert r["role"] == role and r["handle"] == cast[who].handle
    roles = {"owner": "alice", "read": "bob", "write": "carol", "radmin": "dave", "stranger": "eve",
             "anonymous": None, "siteadmin": "admin"}
    key = muselib.blob_id(b"matrix-" + rid.encode())
    for label, who in roles.items():
        h = hubs(who)
        refs = h.raw("GET", f"/{a}/{slug}/refs").status_code
        pre = h.raw("POST", f"/{a}/{slug}/push/mpack-presign", {"mpack_key": key, "size_bytes": 10},
                    fmt="json").status_code
        get = h.raw("GET", f"/api/repos/{rid}").status_code
        assert (refs, pre) == EXPECT[label], (label, refs, pre)
        assert get == EXPECT[label][0], (label, get)
    # Listing by owner shows the private repo only to those who may read it.
    for label, who in roles.items():
        listed = hubs(who).call("GET", f"/api/repos?owner={a}")["repos"]
        assert (rid in {r["repo_id"] for r in listed}) == (EXPECT[label][0] == 200), label


def test_write_collaborator_pushes_read_collaborator_cannot(cast, hubs):
    a = cast["alice"].handle
    alice = hubs("alice")
    repo = alice.create_repo(a, unique("collab"), visibility="private")
    rid = repo["repo_id"]
    alice.call("PUT", f"/api/repos/{rid}/collaborators/{cast['carol'].handle}", {"role": "write"}, fmt="json")
    alice.call("PUT", f"/api/repos/{rid}/collaborators/{cast['bob'].handle}", {"role": "read"}, fmt="json")
    hist = small(unique("c"))
    res = hubs("carol").push(a, repo["slug"], hist.pack(), "main", hist.head)
    assert res["head"] == hist.head
    bob = hubs("bob")
    assert bob.clone(a, repo["slug"], [hist.head])["result"]["commit_count"] == 3
    with pytest.raises(muselib.HubError) as ei:
        bob.push(a, repo["slug"], small(unique("b")).pack(), "main", hist.head)
    assert ei.value.status == 403


def test_collaborator_management(cast, hubs):
    a = cast["alice"].handle
    alice, bob, dave, eve, anon = hubs("alice"), hubs("bob"), hubs("dave"), hubs("eve"), hubs(None)
    repo = alice.create_repo(a, unique("mgmt"), visibility="private")
    rid = repo["repo_id"]
    base = f"/api/repos/{rid}/collaborators"
    alice.call("PUT", f"{base}/{cast['bob'].handle}", {"role": "read"}, fmt="json")
    alice.call("PUT", f"{base}/{cast['dave'].handle}", {"role": "admin"}, fmt="json")
    carol = cast["carol"].handle
    # Only repository admins manage collaborators.
    assert bob.raw("PUT", f"{base}/{carol}", {"role": "write"}, fmt="json").status_code == 403
    assert eve.raw("PUT", f"{base}/{carol}", {"role": "write"}, fmt="json").status_code == 404
    assert anon.raw("PUT", f"{base}/{carol}", {"role": "write"}, fmt="json").status_code == 404
    assert dave.raw("PUT", f"{base}/{carol}", {"role": "write"}, fmt="json").status_code == 200
    # Unknown handle, bad role, the owner: 404 / 422 / 422.
    assert alice.raw("PUT", f"{base}/{unique('none')}", {"role": "read"}, fmt="json").status_code == 404
    assert alice.raw("PUT", f"{base}/{carol}", {"role": "owner"}, fmt="json").status_code == 422
    assert alice.raw("PUT", f"{base}/{carol}", {}, fmt="json").status_code == 422
    assert alice.raw("PUT", f"{base}/{a}", {"role": "read"}, fmt="json").status_code == 422
    # Changing a role is an update.
    assert alice.call("PUT", f"{base}/{carol}", {"role": "read"}, fmt="json")["role"] == "read"
    listed = {c["handle"]: c["role"] for c in alice.call("GET", base)["collaborators"]}
    assert listed == {cast["bob"].handle: "read", cast["dave"].handle: "admin", carol: "read"}
    assert bob.raw("GET", base).status_code == 403
    # Removing: bob loses access (404: the repository is private).
    assert bob.raw("GET", f"/api/repos/{rid}").status_code == 200
    assert alice.raw("DELETE", f"{base}/{cast['bob'].handle}").status_code == 204
    assert bob.raw("GET", f"/api/repos/{rid}").status_code == 404
    assert alice.raw("DELETE", f"{base}/{cast['bob'].handle}").status_code == 204  # not one any more
    assert alice.raw("DELETE", f"{base}/{unique('none')}").status_code == 404
    assert bob.raw("DELETE", f"{base}/{carol}").status_code == 404


def test_repo_admin_collaborator_may_delete_repo(cast, hubs):
    a = cast["alice"].handle
    alice = hubs("alice")
    repo = alice.create_repo(a, unique("del"), visibility="public")
    rid = repo["repo_id"]
    alice.call("PUT", f"/api/repos/{rid}/collaborators/{cast['carol'].handle}", {"role": "write"}, fmt="json")
    alice.call("PUT", f"/api/repos/{rid}/collaborators/{cast['dave'].handle}", {"role": "admin"}, fmt="json")
    assert hubs("eve").raw("DELETE", f"/api/repos/{rid}").status_code == 403  # public: readable, not writable
    assert hubs("carol").raw("DELETE", f"/api/repos/{rid}").status_code == 403
    assert hubs("dave").raw("DELETE", f"/api/repos/{rid}").status_code == 204


# ---------------------------------------------------------------------------
# rate limits
# ---------------------------------------------------------------------------

def test_rate_limits_per_identity_and_address(cast, start_server):
    srv = start_server(dev_identity=None, share=cast["server"], MUSEHUB_RATE_PUSH="3",
                       MUSEHUB_RATE_FETCH="4")
    al = cast["alice"]
    with al.hub(srv) as h:
        repo = h.create_repo(al.handle, unique("rate"), initialize=True)
        head = h.refs(al.handle, repo["slug"])["branch_heads"]["main"]
        pre = f"/{al.handle}/{repo['slug']}/push/mpack-presign"
        body = {"mpack_key": muselib.blob_id(b"rate"), "size_bytes": 4}
        codes = [h.raw("POST", pre, body, fmt="json").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429], codes
        r = h.raw("POST", pre, body, fmt="json")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"] == "rate_limited"
        # Reads other than fetch are not limited.
        assert all(h.raw("GET", f"/{al.handle}/{repo['slug']}/refs").status_code == 200 for _ in range(10))
    # Another identity has its own budget: bob passes the limiter (and is
    # then refused because he may not write here).
    with cast["bob"].hub(srv) as bh:
        assert bh.raw("POST", pre, body, fmt="json").status_code == 403
    # Anonymous fetches are limited per client address.
    fetch = {"want": [head], "have": []}
    with muselib.Hub(srv.url) as anon:
        codes = [anon.raw("POST", f"/{al.handle}/{repo['slug']}/fetch", fetch, fmt="json").status_code
                 for _ in range(5)]
        assert codes == [200, 200, 200, 200, 429], codes
    # Admins are not limited.
    with cast["admin"].hub(srv) as ah:
        assert all(ah.raw("POST", pre, body, fmt="json").status_code == 200 for _ in range(6))


def test_forwarded_for_only_from_trusted_proxies(cast, start_server):
    al = cast["alice"]
    with al.hub(cast["server"]) as h:
        repo = h.create_repo(al.handle, unique("xff"), initialize=True)
        head = h.refs(al.handle, repo["slug"])["branch_heads"]["main"]
    path = f"/{al.handle}/{repo['slug']}/fetch"
    body = muselib.encode_body({"want": [head], "have": []}, "json")[0]

    def codes(srv, xff, n=3):
        return [send(srv, "POST", path, body, {"X-Forwarded-For": xff}).status_code for _ in range(n)]

    trusting = start_server(dev_identity=None, share=cast["server"], MUSEHUB_RATE_FETCH="2",
                            MUSEHUB_TRUSTED_PROXIES="10.9.9.9, 127.0.0.1")
    assert codes(trusting, "10.0.0.1") == [200, 200, 429]
    assert codes(trusting, "10.0.0.2", 1) == [200]                 # another client behind the proxy
    assert codes(trusting, "10.0.0.2, 10.9.9.9", 2) == [200, 429]  # chain of trusted proxies
    assert codes(trusting, "6.6.6.6, 10.0.0.3", 2) == [200, 200]   # the client's own claim is ignored
    untrusting = start_server(dev_identity=None, share=cast["server"], MUSEHUB_RATE_FETCH="2")
    assert codes(untrusting, "10.0.0.1", 1) + codes(untrusting, "10.0.0.2", 2) == [200, 200, 429]


def test_bad_trusted_proxies_refuse_to_start(start_server, cast):
    with pytest.raises(RuntimeError):
        start_server(dev_identity=None, share=cast["server"], MUSEHUB_TRUSTED_PROXIES="not-an-ip",
                     start_timeout=5)


# ---------------------------------------------------------------------------
# replayed signed writes (SPEC 5, issue 15 item 5)
# ---------------------------------------------------------------------------

def _signed_json(who: Who, srv, method: str, path: str, obj=None) -> tuple[bytes, dict]:
    """A body and the headers that sign it: sent as is, then again (the
    capture an attacker would replay)."""
    import json
    body = json.dumps(obj).encode() if obj is not None else b""
    return body, signed(who, method, srv.url + path, body)


def assert_replayed(r: httpx.Response) -> None:
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.json()["error"] == "replayed", r.text


def test_replayed_collaborator_grant_after_revocation_is_refused(cast, hubs):
    """A captured grant, replayed within its 300 s window after the grant
    was revoked, used to give the access back."""
    srv, al, bob = cast["server"], cast["alice"], cast["bob"]
    alice, bobh = hubs("alice"), hubs("bob")
    repo = alice.create_repo(al.handle, unique("grant"), visibility="private")
    path = f"/api/repos/{repo['repo_id']}/collaborators/{bob.handle}"
    body, h = _signed_json(al, srv, "PUT", path, {"role": "write"})
    assert send(srv, "PUT", path, body, h).status_code == 200
    assert bobh.raw("GET", f"/api/repos/{repo['repo_id']}").status_code == 200
    assert alice.raw("DELETE", path).status_code == 204
    assert bobh.raw("GET", f"/api/repos/{repo['repo_id']}").status_code == 404
    assert_replayed(send(srv, "PUT", path, body, h))
    assert bobh.raw("GET", f"/api/repos/{repo['repo_id']}").status_code == 404
    listed = alice.call("GET", f"/api/repos/{repo['repo_id']}/collaborators")["collaborators"]
    assert bob.handle not in [c["handle"] for c in listed]


def test_replayed_server_side_commit_is_refused(cast, hubs):
    """A replayed server-side commit used to make a duplicate commit."""
    import base64
    srv, al = cast["server"], cast["alice"]
    alice = hubs("alice")
    repo = alice.create_repo(al.handle, unique("commit"), visibility="public", initialize=True)
    path = f"/api/repos/{repo['repo_id']}/commits"
    body, h = _signed_json(al, srv, "POST", path, {"branch": "main", "message": "once",
                                                    "files": {"a.txt": base64.b64encode(b"a").decode()}})
    first = send(srv, "POST", path, body, h)
    assert first.status_code == 201, first.text
    assert_replayed(send(srv, "POST", path, body, h))
    log = alice.commits(al.handle, repo["slug"], branch="main")["commits"]
    assert [c["message"] for c in log] == ["once", "Initial commit"]


def test_replay_is_refused_by_another_server_on_the_same_database(cast, hubs, server_factory):
    """The record lives in PostgreSQL: what one process accepted, another
    (another host) refuses."""
    srv, al = cast["server"], cast["alice"]
    other = server_factory(dev_identity=None, share=srv)
    name = unique("twin")
    body, h = _signed_json(al, srv, "POST", "/api/repos", {"owner": al.handle, "name": name,
                                                           "visibility": "public"})
    assert send(srv, "POST", "/api/repos", body, h).status_code == 201
    assert_replayed(send(other, "POST", "/api/repos", body, h))
    # And the other way round, with a request the second server takes first.
    body2, h2 = _signed_json(al, srv, "POST", "/api/repos", {"owner": al.handle, "name": name + "-b",
                                                             "visibility": "public"})
    assert send(other, "POST", "/api/repos", body2, h2).status_code == 201
    assert_replayed(send(srv, "POST", "/api/repos", body2, h2))
    names = [r["name"] for r in hubs("alice").list_repos(al.handle)["repos"]]
    assert names.count(name) == 1 and names.count(name + "-b") == 1


def test_reads_and_fetch_may_be_repeated(cast, hubs):
    """GET and HEAD change nothing, and the fetch POST is a read: the same
    signed request may be sent again (SPEC 5)."""
    srv, al = cast["server"], cast["alice"]
    alice = hubs("alice")
    repo = alice.create_repo(al.handle, unique("reads"), visibility="private")
    hist = small(unique("r"))
    alice.push(al.handle, repo["slug"], hist.pack(), "main", hist.head)
    rpath = f"/{al.handle}/{repo['slug']}/refs"
    _, h = _signed_json(al, srv, "GET", rpath)
    assert [send(srv, "GET", rpath, headers=h).status_code for _ in range(3)] == [200, 200, 200]
    fpath = f"/{al.handle}/{repo['slug']}/fetch"
    body, h = _signed_json(al, srv, "POST", fpath, {"want": [hist.head], "have": []})
    codes = [send(srv, "POST", fpath, body, {**h, "Accept": "application/json"}).status_code for _ in range(3)]
    assert codes == [200, 200, 200]


def test_identical_writes_in_one_second_are_not_replays(cast, hubs):
    """msign.py puts a random nonce in every signature: a client that sends
    the same write twice within a second (a retry) sends two signatures."""
    srv, al = cast["server"], cast["alice"]
    alice = hubs("alice")
    repo = alice.create_repo(al.handle, unique("twice"), visibility="public")
    key = muselib.blob_id(b"twice-" + repo["repo_id"].encode())
    for _ in range(3):
        r = alice.raw("POST", f"/{al.handle}/{repo['slug']}/push/mpack-presign",
                      {"mpack_key": key, "size_bytes": 10}, fmt="json")
        assert r.status_code == 200, r.text
    # Without a nonce, the second identical request of the same second is a replay.
    path = f"/{al.handle}/{repo['slug']}/push/mpack-presign"
    import json
    body = json.dumps({"mpack_key": key, "size_bytes": 10}).encode()
    h = msign.sign("POST", srv.url + path, body, al.key_id, al.key, nonce="")
    assert "nonce" not in h["Signature-Input"]
    assert send(srv, "POST", path, body, h).status_code == 200
    assert_replayed(send(srv, "POST", path, body, h))


def test_high_s_signature_is_refused(cast, hubs):
    """(r, s) and (r, n - s) both verify; only the low-S half is accepted
    (SPEC 5), so a captured signature cannot be turned into a second one
    without the key — and msign.py signs low-S."""
    import base64
    srv, al = cast["server"], cast["alice"]
    alice = hubs("alice")
    repo = alice.create_repo(al.handle, unique("highs"), visibility="private")
    rpath = f"/{al.handle}/{repo['slug']}/refs"
    n = msign.P256_N
    for _ in range(4):  # several signatures: whatever msign.py made, flip it
        _, h = _signed_json(al, srv, "GET", rpath)
        sig = base64.b64decode(h["Signature"].split(":")[1])
        r, s = sig[:32], int.from_bytes(sig[32:], "big")
        assert s <= n // 2, "msign.py must sign low-S"
        high = dict(h, Signature="msign=:" + base64.b64encode(r + (n - s).to_bytes(32, "big")).decode() + ":")
        assert_401(send(srv, "GET", rpath, headers=high))
        assert send(srv, "GET", rpath, headers=h).status_code == 200
    # A write: the high-S twin of an accepted request is refused too.
    path = f"/api/repos/{repo['repo_id']}/collaborators/{cast['bob'].handle}"
    body, h = _signed_json(al, srv, "PUT", path, {"role": "read"})
    sig = base64.b64decode(h["Signature"].split(":")[1])
    high = dict(h, Signature="msign=:" + base64.b64encode(
        sig[:32] + (n - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")).decode() + ":")
    assert_401(send(srv, "PUT", path, body, high))
    assert send(srv, "PUT", path, body, h).status_code == 200
