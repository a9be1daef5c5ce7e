"""musehubd behind nginx, with the configuration of docs/nginx.conf.

nginx (Debian package `nginx`, installed by scripts/deps.sh) runs in the
foreground in a temporary directory with docs/nginx.conf, of which only
the lines marked "site:" are substituted (listen addresses on free
127.0.0.1 ports, the upstream address of the test server, a throwaway
CA-signed certificate for 127.0.0.1, log and pid paths, `user`); every
other directive is tested as written.  musehubd runs without a dev
identity, with MUSEHUB_PUBLIC_URL = nginx's https address and
MUSEHUB_TRUSTED_PROXIES = 127.0.0.1 (nginx's address); callers sign with
MSign (scripts/msign.py), so signatures are checked after nginx forwarded
the request line and headers.

Covers, all through nginx over TLS: signed create and push of a
seed-shaped history (100 commits x 50 files), fetch + verify (full and
incremental), the read API (paging by cursor, commit, tree, objects with
Range / ETag / If-None-Match), presigned upload and download through
/_store/ (bad bytes refused, ranges, tampered URL), a 72 MiB pack
streamed both ways without nginx temp files, body limits (nginx's JSON
413, musehubd's own 413, a 60 MiB body reaching the 64 MiB route), the
http -> https redirect, /metrics restricted by address, upstream
keep-alive (a handful of upstream connections serve many client
connections), X-Forwarded-Proto / X-Forwarded-Host ignored, and rate
limits keyed by the X-Forwarded-For client address when nginx is
trusted and by nginx's own address when it is not.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import msign
import muselib
import pgtmp
from conftest import REPO_ROOT, server_binary
from e2e_util import read_response, unique

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CONF = REPO_ROOT / "docs" / "nginx.conf"

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX),
                                reason="nginx is not installed (scripts/deps.sh installs it)")


# ---------------------------------------------------------------------------
# TLS: a throwaway CA and a certificate for 127.0.0.1
# ---------------------------------------------------------------------------

def make_tls(d: Path) -> dict:
    """Writes ca.pem, cert.pem, key.pem under d; returns their paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "musehub e2e CA")])
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       **usage), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         **usage), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    out = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    out["ca"].write_bytes(ca.public_bytes(pem))
    out["cert"].write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    out["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return {k: str(v) for k, v in out.items()}


# ---------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------

def site_config(text: str, *, d: Path, upstream_port: int, https_port: int, http_port: int,
                tls: dict) -> str:
    """docs/nginx.conf with its "site:" lines adapted to this test; every
    "site:" line must be one this function knows (so the test fails when
    the documented file grows a site-specific line it does not handle)."""
    out = []
    for line in text.splitlines():
        if "# site:" not in line:
            out.append(line)
            continue
        indent = line[:len(line) - len(line.lstrip())]
        words = line.split()
        directive, arg = words[0], (words[1] if len(words) > 1 else "")
        if directive == "user":
            new = "user root;" if os.geteuid() == 0 else None  # workers must read our temp dir
        elif directive == "pid":
            new = f"pid {d}/nginx.pid;"
        elif directive == "error_log":
            new = f"error_log {d}/error.log warn;"
        elif directive == "access_log":
            new = f"access_log {d}/access.log musehub;"
        elif directive == "server" and re.fullmatch(r"[\d.]+:\d+;", arg):
            new = f"server 127.0.0.1:{upstream_port};"
        elif directive == "listen" and arg.startswith("[::]"):
            new = None
        elif directive == "listen" and arg == "80;":
            new = f"listen 127.0.0.1:{http_port};"
        elif directive == "listen" and arg == "443":
            new = f"listen 127.0.0.1:{https_port} " + " ".join(words[2:]).split(";")[0] + ";"
        elif directive == "ssl_certificate":
            new = f"ssl_certificate {tls['cert']};"
        elif directive == "ssl_certificate_key":
            new = f"ssl_certificate_key {tls['key']};"
        elif directive in ("server_name", "allow"):
            new = line.strip()
        else:
            raise AssertionError(f"docs/nginx.conf: unknown site-specific line {line!r}")
        if new is not None:
            out.append(indent + new)
    conf = "\n".join(out) + "\n"
    # nginx's temporary files go to the test directory (the Debian defaults
    # are under /var/lib/nginx); test_large_pack checks /_store/ never uses them.
    temps = "".join(f"    {k}_temp_path {d}/{k}_temp;\n"
                    for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf, n = re.subn(r"^http \{\n", "http {\n" + temps, conf, count=1, flags=re.M)
    assert n == 1, "docs/nginx.conf has no top-level http block"
    return conf


class Nginx:
    """nginx in the foreground (-g 'daemon off;') on a generated config."""

    def __init__(self, d: Path, upstream_port: int, tls: dict, https_port: int | None = None,
                 http_port: int | None = None) -> None:
        self.dir = d
        self.tls = tls
        self.https_port = https_port or pgtmp.free_port()
        self.http_port = http_port or pgtmp.free_port()
        self.url = f"https://127.0.0.1:{self.https_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.conf = d / "nginx.conf"
        self.conf.write_text(site_config(CONF.read_text(), d=d, upstream_port=upstream_port,
                                         https_port=self.https_port, http_port=self.http_port, tls=tls))
        self.cmd = [NGINX, "-p", str(d), "-e", str(d / "error.log"), "-c", str(self.conf)]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "Nginx":
        t = subprocess.run(self.cmd + ["-t", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert t.returncode == 0, f"nginx -t: {t.stdout.decode(errors='replace')}"
        self.proc = subprocess.Popen(self.cmd + ["-g", "daemon off;"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.error_log()}")
            try:
                with httpx.Client(verify=self.tls["ca"], timeout=2) as c:
                    if c.get(self.url + "/healthz").status_code == 200:
                        return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx: /healthz through it not 200 within {timeout}s:\n{self.error_log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def error_log(self) -> str:
        p = self.dir / "error.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def access_log(self) -> list[str]:
        p = self.dir / "access.log"
        return p.read_text(errors="replace").splitlines() if p.exists() else []

    def client(self, local_address: str | None = None, **kw) -> httpx.Client:
        """An httpx client for nginx's https address, optionally from a
        given source address (127.0.0.0/8 all reaches loopback)."""
        tr = httpx.HTTPTransport(verify=self.tls["ca"], local_address=local_address)
        return httpx.Client(base_url=self.url, transport=tr, timeout=kw.pop("timeout", 120), **kw)

    def hub(self, signer=None) -> muselib.Hub:
        """A muselib.Hub on nginx's https address (httpx reads
        SSL_CERT_FILE when the client is made)."""
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = self.tls["ca"]
        try:
            return muselib.Hub(self.url, signer=signer)
        finally:
            if old is None:
                del os.environ["SSL_CERT_FILE"]
            else:
                os.environ["SSL_CERT_FILE"] = old


def upstream_sources(port: int) -> set[int]:
    """Local ports of established IPv4 TCP connections to 127.0.0.1:port
    (nginx's side of its connections to musehubd)."""
    out = set()
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            f = line.split()
            local, remote, state = f[1], f[2], f[3]
            if state == "01" and remote == f"0100007F:{port:04X}":
                out.add(int(local.split(":")[1], 16))
    return out


# ---------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------

class Who:
    def __init__(self, handle: str) -> None:
        self.handle = handle
        self.priv_pem, self.pub_pem, self.key_id = msign.generate_key()
        self.key = msign.load_private_key(self.priv_pem)

    def signer(self):
        return msign.signer_from_key(self.key_id, self.key)


def add_admin(server, who: Who, d: Path) -> None:
    f = d / f"{who.handle}.pub"
    f.write_bytes(who.pub_pem)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSEHUB_")}
    env["MUSEHUB_DATABASE_URL"] = server.database_url
    r = subprocess.run([server_binary(), "identity", "add", "--handle", who.handle,
                        "--public-key-file", str(f), "--admin"],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, r.stderr.decode()


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def front(server_factory, tmp_path_factory, tls):
    """musehubd (no dev identity, trusting nginx) behind nginx, an admin
    and a plain identity: {server, nginx, admin, alice, hub (admin via
    nginx), alice_hub}."""
    d = tmp_path_factory.mktemp("nginx")
    https_port, http_port = pgtmp.free_port(), pgtmp.free_port()
    srv = server_factory(dev_identity=None, MUSEHUB_PUBLIC_URL=f"https://127.0.0.1:{https_port}",
                         MUSEHUB_TRUSTED_PROXIES="127.0.0.1")
    ng = Nginx(d, srv.port, tls, https_port, http_port).start()
    admin, alice = Who(unique("admin")), Who(unique("alice"))
    add_admin(srv, admin, d)
    hub = ng.hub(admin.signer())
    hub.call("POST", "/api/identities", {"handle": alice.handle, "public_key_pem": alice.pub_pem.decode()},
             expect=(201,))
    alice_hub = ng.hub(alice.signer())
    try:
        yield {"server": srv, "nginx": ng, "admin": admin, "alice": alice, "hub": hub,
               "alice_hub": alice_hub, "dir": d}
    finally:
        hub.close()
        alice_hub.close()
        ng.stop()


@pytest.fixture(scope="module")
def pushed(front):
    """A public repo of alice's with a seed-shaped history (100 commits x 50
    files, 5 changed per commit) pushed through nginx."""
    h = front["alice_hub"]
    owner = front["alice"].handle
    repo = h.create_repo(owner, unique("behind-nginx"))
    hist = muselib.generate(commits=100, files=50, changed=5, blob_size=512, author=owner,
                            keep_manifests=True)
    pre = h.presign(owner, repo["slug"], hist.key, len(hist.pack()))
    res = h.push(owner, repo["slug"], hist.pack(), "main", hist.head)
    return {"repo": repo, "owner": owner, "slug": repo["slug"], "history": hist, "push": res,
            "presign": pre}


# ---------------------------------------------------------------------------
# the configuration itself
# ---------------------------------------------------------------------------

def test_documented_config_has_the_essentials():
    text = CONF.read_text()
    for needle in ("keepalive 64;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                   "proxy_set_header X-Forwarded-For $remote_addr;",
                   "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_request_buffering off;",
                   "client_max_body_size 2g;", "client_max_body_size 65m;", "proxy_read_timeout 300s;"):
        assert needle in text, needle
    store = text[text.index("location /_store/"):]
    store = store[:store.index("}")]
    assert "proxy_request_buffering off;" in store and "client_max_body_size 2g;" in store
    # The upstream lets idle connections go before musehubd's 60 s idle timeout.
    m = re.search(r"upstream musehubd \{.*?keepalive_timeout (\d+)s;", text, re.S)
    assert m and int(m.group(1)) < 60


# ---------------------------------------------------------------------------
# main flows through nginx
# ---------------------------------------------------------------------------

def store_base(front, store_kind) -> str:
    """Where presigned URLs point: nginx (fs, MUSEHUB_PUBLIC_URL) or the store (s3)."""
    if store_kind == "s3":
        return front["server"].env["MUSEHUB_S3_ENDPOINT"]
    return front["nginx"].url + "/_store"


def test_push_through_nginx(front, pushed, store_kind):
    ng = front["nginx"]
    hist, res = pushed["history"], pushed["push"]
    # With the fs store the presigned URL names nginx (MUSEHUB_PUBLIC_URL),
    # not musehubd.
    assert pushed["presign"]["upload_url"].startswith(store_base(front, store_kind) + "/")
    assert res["commits_written"] == 100
    assert res["snapshots_written"] == len(hist.snapshots)
    assert res["objects_written"] == len(hist.blobs)
    assert res["head"] == hist.head
    refs = front["alice_hub"].refs(pushed["owner"], pushed["slug"])
    assert refs["branch_heads"] == {"main": hist.head}
    # Every step went through nginx and was answered by musehubd (its
    # request id is in nginx's log line).
    log = ng.access_log()
    pats = [r'"POST /[^ ]+/push/mpack-presign HTTP/[\d.]+" 200 .* mh=[0-9a-f]',
            r'"POST /[^ ]+/push/unpack-mpack HTTP/[\d.]+" 200 .* mh=[0-9a-f]']
    if store_kind == "fs":
        pats.append(r'"PUT /_store/incoming/[0-9a-f]+\?\(redacted\) HTTP/[\d.]+" 200 .* mh=[0-9a-f]')
    for pat in pats:
        assert any(re.search(pat, line) for line in log), (pat, log[-5:])
    # Presigned URLs are credentials: their signatures never reach the log.
    assert not [line for line in log if "X-Muse-" in line]


def test_fetch_and_verify_through_nginx(front, pushed, store_kind):
    ng, h = front["nginx"], front["alice_hub"]
    hist, owner, slug = pushed["history"], pushed["owner"], pushed["slug"]
    out = h.clone(owner, slug, [hist.head])
    res = out["result"]
    assert res["mpack_url"].startswith(store_base(front, store_kind) + "/")
    assert res["commit_count"] == 100 and res["blob_count"] == len(hist.blobs)
    assert out["manifests"][hist.commits[-1]["snapshot_id"]] == hist.manifest
    # Incremental: have commit 59, want the head: 40 commits, and only the
    # blobs those commits add that commit 59's snapshot does not hold.
    have = hist.commits[59]["commit_id"]
    inc = h.clone(owner, slug, [hist.head], [have],
                  known_manifests={hist.commits[59]["snapshot_id"]: hist.manifests[have]},
                  known_objects=set(hist.manifests[have].values()))
    assert inc["result"]["commit_count"] == 40
    assert inc["manifests"][hist.commits[-1]["snapshot_id"]] == hist.manifest
    # Anonymous read of a public repo through nginx.
    with ng.hub() as anon:
        assert anon.fetch(owner, slug, [hist.head])["mpack_id"] == res["mpack_id"]


def test_read_api_with_range_through_nginx(front, pushed):
    h = front["alice_hub"]
    hist, owner, slug = pushed["history"], pushed["owner"], pushed["slug"]
    # Paging: the cursor travels in the signed query string.
    seen, cursor = [], None
    while True:
        page = h.commits(owner, slug, branch="main", limit=30, cursor=cursor)
        seen += [c["commit_id"] for c in page["commits"]]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seen == [c["commit_id"] for c in reversed(hist.commits)]
    c = h.commit(owner, slug, hist.commits[10]["commit_id"])
    assert c["parent_ids"] == [hist.commits[9]["commit_id"]]
    tree = h.tree(owner, slug, "main")
    assert {e["path"]: e["object_id"] for e in tree["entries"]} == hist.manifest
    path, oid = sorted(hist.manifest.items())[3]
    content = next(b["content"] for b in hist.blobs if b["object_id"] == oid)
    r = h.object(owner, slug, oid)
    assert r.status_code == 200 and r.content == content
    etag = r.headers["etag"]
    assert etag.strip('"') == oid
    r = h.object(owner, slug, oid, headers={"Range": "bytes=5-20"})
    assert r.status_code == 206, r.text
    assert r.content == content[5:21]
    assert r.headers["content-range"] == f"bytes 5-20/{len(content)}"
    r = h.object(owner, slug, oid, headers={"Range": "bytes=-7"})
    assert r.status_code == 206 and r.content == content[-7:]
    r = h.object(owner, slug, oid, headers={"Range": f"bytes={len(content) + 10}-"})
    assert r.status_code == 416
    r = h.object(owner, slug, oid, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""


@pytest.mark.store("fs")
def test_presigned_upload_and_download_through_nginx(front):
    ng, h = front["nginx"], front["alice_hub"]
    owner = front["alice"].handle
    repo = h.create_repo(owner, unique("presign"))
    hist = muselib.generate(commits=3, files=4, changed=1, blob_size=64, seed=unique("p"), author=owner)
    data = hist.pack()
    pre = h.presign(owner, repo["slug"], hist.key, len(data))
    url = pre["upload_url"]
    assert url.startswith(ng.url + "/_store/incoming/") and not pre["already_present"]
    with ng.client() as c:
        # Same length, wrong bytes: musehubd hashes while nginx streams and
        # keeps nothing (its JSON error comes back through nginx).
        bad = c.put(url, content=bytes(len(data)))
        assert bad.status_code == 400 and bad.json()["error"] == "digest_mismatch"
        assert "x-request-id" in bad.headers
    # A tampered signature, refused from its headers: musehubd answers
    # before the body has all arrived, and nginx may then close the
    # client's connection after the answer (HTTP allows it), so this
    # request and the next each get their own connection.
    forged = re.sub(r"X-Muse-Signature=[^&]+", "X-Muse-Signature=" + "0" * 64, url)
    with ng.client() as c:
        assert c.put(forged, content=data).status_code == 403
    with ng.client() as c:
        # The real bytes, sent chunked (no Content-Length): nginx passes the
        # stream on and musehubd checks the signed length at the end.
        ok = c.put(url, content=iter([data[:100], data[100:]]))
        assert ok.status_code in (200, 204), ok.text
    res = h.unpack(owner, repo["slug"], hist.key, "main", hist.head)
    assert res["commits_written"] == 3
    f = h.fetch(owner, repo["slug"], [hist.head])
    assert f["mpack_url"].startswith(ng.url + "/_store/mpacks/")
    with ng.client() as c:
        r = c.get(f["mpack_url"])
        assert r.status_code == 200 and muselib.blob_id(r.content) == f["mpack_id"]
        r = c.get(f["mpack_url"], headers={"Range": "bytes=0-4"})
        assert r.status_code == 206 and r.content == b"MUSE\x01"
        assert r.headers["content-range"].startswith("bytes 0-4/")
        expired = re.sub(r"X-Muse-Expires=\d+", "X-Muse-Expires=1", f["mpack_url"])
        assert c.get(expired).status_code == 403


@pytest.mark.store("fs")
@pytest.mark.slow
def test_large_pack_streams_through_nginx(front):
    """A 72 MiB pack (more than the 65 MiB API limit) goes up through
    /_store/ and comes back down, and nginx never spools it to a file."""
    ng, h = front["nginx"], front["alice_hub"]
    owner = front["alice"].handle
    repo = h.create_repo(owner, unique("large"))
    big = os.urandom(72 << 20)
    oid = muselib.blob_id(big)
    manifest = {"big.bin": oid}
    sid = muselib.snapshot_id(manifest)
    ts = "2026-01-01T00:00:00+00:00"
    cid = muselib.commit_id([], sid, "big", ts, owner)
    commit = {"commit_id": cid, "parent_commit_id": None, "parent2_commit_id": None,
              "snapshot_id": sid, "message": "big", "author": owner, "committed_at": ts,
              "branch": "main"}
    pack = muselib.build_mpack([commit], [muselib.snapshot_map(sid, None, None, manifest)],
                               [{"object_id": oid, "content": big}])
    assert len(pack) > 65 << 20
    res = h.push(owner, repo["slug"], pack, "main", cid)
    assert res["objects_written"] == 1 and not res["already_present"]
    out = h.clone(owner, repo["slug"], [cid])
    assert out["manifests"][sid] == manifest
    assert out["pack"]["blobs"][0]["content"] == big
    # nginx warns for every body it spools to a file ("a client request
    # body is buffered to a temporary file", "an upstream response is
    # buffered to a temporary file"), naming the request.
    spooled = [line for line in ng.error_log().splitlines()
               if "buffered to a temporary file" in line and "/_store/" in line]
    assert not spooled, spooled


def tls_raw(ng: Nginx, data: bytes) -> tuple[int, dict, bytes]:
    """Sends raw bytes over TLS to nginx and reads one response."""
    ctx = ssl.create_default_context(cafile=ng.tls["ca"])
    with socket.create_connection(("127.0.0.1", ng.https_port), timeout=30) as s:
        with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            t.sendall(data)
            return read_response(t.makefile("rb"), "POST")


def test_body_limits_through_nginx(front):
    ng = front["nginx"]
    # Over nginx's API limit: refused from the headers, with a JSON body
    # in SPEC's error shape, without reaching musehubd (no request id).
    st, hd, body = tls_raw(ng, b"POST /api/repos HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 73400320\r\n\r\n")
    assert st == 413 and b'"error":"payload_too_large"' in body, (st, body)
    assert "x-request-id" not in hd
    with ng.client() as c:
        # Between musehubd's 16 MiB and nginx's 65 MiB: musehubd answers.
        r = c.post("/api/repos", content=b" " * (20 << 20), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large", r.text
        assert "x-request-id" in r.headers
        # A 60 MiB body reaches the 64 MiB route (server-side commits): it
        # is refused for being anonymous, not for its size.
        repo_id = front["hub"].create_repo(front["admin"].handle, unique("big-body"))["repo_id"]
        r = c.post(f"/api/repos/{repo_id}/commits", content=b" " * (60 << 20),
                   headers={"Content-Type": "application/json"})
        assert "x-request-id" in r.headers and r.status_code != 413, (r.status_code, r.text[:200])


def test_http_redirects_to_https(front):
    ng = front["nginx"]
    with httpx.Client(timeout=10) as c:
        r = c.get(ng.http_url + "/healthz?x=1")
    assert r.status_code == 301
    assert r.headers["location"] == "https://127.0.0.1/healthz?x=1"


def test_metrics_only_for_allowed_addresses(front):
    ng = front["nginx"]
    with ng.client() as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and "musehub_http_requests_total" in r.text
    with ng.client(local_address="127.0.0.3") as c:
        assert c.get("/metrics").status_code == 403
        assert c.get("/healthz").status_code == 200


def test_upstream_keepalive(front):
    """Thirty client connections, each one request, are served over a few
    kept-alive upstream connections (without keep-alive each would open,
    and close, its own)."""
    ng, srv = front["nginx"], front["server"]
    seen: set[int] = set()
    for _ in range(30):
        with ng.client() as c:  # a fresh TLS connection per request
            assert c.get("/healthz").status_code == 200
        now = upstream_sources(srv.port)
        assert now, "no idle upstream connection left open after a request"
        seen |= now
    # One pool per nginx worker (worker_processes auto).
    assert 1 <= len(seen) <= 2 * (os.cpu_count() or 1), seen


@pytest.mark.store("fs")
def test_forwarded_proto_and_host_are_ignored(front):
    """Presigned URLs come from MUSEHUB_PUBLIC_URL, whatever a client (or
    a proxy) says in X-Forwarded-Proto / X-Forwarded-Host, directly or
    through nginx."""
    owner = front["alice"].handle
    h = front["alice_hub"]
    repo = h.create_repo(owner, unique("xfp"))
    body = {"mpack_key": muselib.blob_id(b"xfp"), "size_bytes": 3}
    evil = {"X-Forwarded-Proto": "http", "X-Forwarded-Host": "evil.example", "Forwarded": "host=evil.example"}
    via_nginx = h.call("POST", f"/{owner}/{repo['slug']}/push/mpack-presign", body, headers=evil)
    assert via_nginx["upload_url"].startswith(front["nginx"].url + "/_store/")
    with muselib.Hub(front["server"].url, signer=front["alice"].signer()) as direct:
        d = direct.call("POST", f"/{owner}/{repo['slug']}/push/mpack-presign", body, headers=evil)
    assert d["upload_url"].startswith(front["nginx"].url + "/_store/")


# ---------------------------------------------------------------------------
# rate limits: by the client address when nginx is trusted, else by nginx's
# ---------------------------------------------------------------------------

def rate_setup(front, start_server, tmp_path, trusted: bool):
    """A server sharing front's database and store with a fetch budget of 2
    a minute, behind its own nginx; returns (nginx, fetch path, body)."""
    env = {"MUSEHUB_RATE_FETCH": "2"}
    if trusted:
        env["MUSEHUB_TRUSTED_PROXIES"] = "127.0.0.1"
    srv = start_server(dev_identity=None, share=front["server"], **env)
    ng = Nginx(tmp_path, srv.port, front["nginx"].tls).start()
    owner = front["alice"].handle
    h = front["alice_hub"]
    repo = h.create_repo(owner, unique("rate"), initialize=True)
    head = h.refs(owner, repo["slug"])["branch_heads"]["main"]
    return ng, srv, f"/{owner}/{repo['slug']}/fetch", muselib.encode_body({"want": [head], "have": []}, "json")[0]


def fetches(ng: Nginx, src: str, path: str, body: bytes, n: int, headers=None) -> list[int]:
    """n anonymous fetches from source address src, through nginx."""
    h = {"Content-Type": "application/json", **(headers or {})}
    with ng.client(local_address=src) as c:
        return [c.post(path, content=body, headers=h).status_code for _ in range(n)]


def test_rate_limit_by_client_address_when_nginx_is_trusted(front, start_server, tmp_path):
    ng, srv, path, body = rate_setup(front, start_server, tmp_path, trusted=True)
    try:
        assert fetches(ng, "127.0.0.3", path, body, 3) == [200, 200, 429]
        # Another client behind the same nginx has its own budget.
        assert fetches(ng, "127.0.0.4", path, body, 1) == [200]
        # A client cannot pick its address: nginx replaces X-Forwarded-For.
        assert fetches(ng, "127.0.0.3", path, body, 1, {"X-Forwarded-For": "10.1.2.3"}) == [429]
        assert "429 fetch for 127.0.0.3" in srv.log_tail(200)
    finally:
        ng.stop()


def test_rate_limit_by_nginx_address_when_not_trusted(front, start_server, tmp_path):
    ng, srv, path, body = rate_setup(front, start_server, tmp_path, trusted=False)
    try:
        # musehubd ignores X-Forwarded-For from an untrusted peer: every
        # client behind nginx shares nginx's budget.
        assert fetches(ng, "127.0.0.3", path, body, 2) == [200, 200]
        assert fetches(ng, "127.0.0.4", path, body, 1) == [429]
        assert "429 fetch for 127.0.0.1" in srv.log_tail(200)
    finally:
        ng.stop()
