"""The client of musehubd's HTTP API, on the standard library's http.client.

One keep-alive connection per host (the API, and the store behind presigned
URLs when it lives elsewhere), large socket writes, streaming both ways:

  Hub(base_url, signer=None, timeout=300)
  hub.call(method, path, body)       -> decoded answer (HubError otherwise)
  hub.raw(method, path, body)        -> Response (any status)
  hub.upload_file(url, path, progress=None)     PUT a file, streamed
  hub.download_to(url, fileobj, progress=None)  GET into a file while
                                                hashing -> (bytes, sha256 id)
  hub.refs / create_repo / patch_repo / delete_branch / create_tag /
  delete_tag / presign / unpack / fetch / ...

Request bodies are msgpack (or JSON with fmt="json"); answers are decoded
by their Content-Type.  Every API request is signed with `signer` (MSign,
SPEC 5) when one is given; presigned store URLs carry their own
authorisation and are never signed.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse

import msgpack

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms)
if TYPE_CHECKING:  # annotations only
    import ssl
    from typing import Any, BinaryIO, Callable, Iterable, Mapping

    Signer = Callable[[str, str, bytes], Mapping[str, str]]
    Progress = Callable[[int], None]

MSGPACK = "application/x-msgpack"
JSON = "application/json"
BLOCK = 1 << 20          # socket write/read size for transfers


class TransportError(ConnectionError):
    """The request did not get an answer (refused, reset, timed out); the
    message names the URL."""


class HubError(Exception):
    """An unexpected HTTP status.  .status, .body (decoded when possible),
    .headers, .method, .url."""

    def __init__(self, method: str, url: str, status: int, body: Any,
                 headers: Mapping[str, str] | None = None) -> None:
        self.method, self.url, self.status, self.body = method, url, status, body
        self.headers = dict(headers or {})
        text = body if isinstance(body, (str, dict, list)) else repr(body)[:500]
        super().__init__(f"{method} {url} -> {status}: {text}")

    @property
    def code(self) -> str | None:
        """The `error` code of a SPEC error body, if any."""
        return self.body.get("error") if isinstance(self.body, dict) else None

    def brief(self) -> str:
        """One line for a person: status, error code and detail."""
        if isinstance(self.body, dict):
            detail = self.body.get("detail") or ""
            return f"{self.status} {self.body.get('error', '')}" + (f": {detail}" if detail else "")
        text = self.body.decode("utf-8", "replace") if isinstance(self.body, bytes) \
            else str(self.body or "")
        return f"{self.status}" + (f": {text.strip()[:200]}" if text.strip() else "")


def decode_payload(ctype: str, data: bytes) -> Any:
    """Decode a body by its Content-Type: msgpack, JSON, text for text/*,
    None for an empty body, bytes otherwise."""
    ctype = (ctype or "").split(";")[0].strip().lower()
    if not data:
        return None
    if ctype == MSGPACK:
        return msgpack.unpackb(data, raw=False)
    if ctype == JSON or ctype.endswith("+json"):
        return json.loads(data)
    if ctype.startswith("text/"):
        return data.decode("utf-8", "replace")
    return data


def encode_body(body: Any, fmt: str = "msgpack") -> tuple[bytes, str]:
    """(bytes, content type) for a request body in msgpack or json."""
    if fmt == "json":
        return json.dumps(body).encode(), JSON
    return msgpack.packb(body, use_bin_type=True), MSGPACK


class Response:
    """A complete answer: .status (.status_code), .headers (case-insensitive
    get), .content, .url; .json(), .text, .decoded()."""

    def __init__(self, status: int, headers: Any, content: bytes, url: str) -> None:
        self.status = self.status_code = status
        self.headers, self.content, self.url = headers, content, url

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    def decoded(self) -> Any:
        try:
            return decode_payload(self.headers.get("content-type", ""), self.content)
        except Exception:
            return self.content


class _CountingReader:
    """A file body for http.client that reports progress."""

    def __init__(self, fh: BinaryIO, left: int, progress: Progress | None) -> None:
        self.fh, self.left, self.progress, self.sent = fh, left, progress, 0

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        b = self.fh.read(n) if n else b""
        self.left -= len(b)
        self.sent += len(b)
        if self.progress and b:
            self.progress(self.sent)
        return b


def _create_connection(address: tuple, *args: Any, **kw: Any) -> socket.socket:
    """socket.create_connection with an ASCII host given as bytes, so that
    getaddrinfo does not load the idna codec (encodings.idna and
    stringprep, ~1-5 ms at start-up).  A non-ASCII name stays a str, which
    the socket module encodes with idna: internationalised names work."""
    host, port = address[0], address[1]
    if isinstance(host, str) and host.isascii():
        host = host.encode("ascii")
    return socket.create_connection((host, port), *args, **kw)


class Api:
    """The API's endpoints (SPEC 4), on top of a subclass's raw()/call()
    transport; muse.Hub (http.client) and muselib.Hub (httpx, the e2e
    suite's) share them."""

    base_url: str
    signer: Signer | None
    headers: dict

    def _prepare(self, method: str, path: str, body: Any, fmt: str,
                 content: bytes | None, accept: str | None,
                 headers: Mapping[str, str] | None,
                 params: Mapping[str, Any] | None) -> tuple[str, bytes | None, dict]:
        """(url, body bytes, headers) of one API request, signed."""
        hdrs = dict(self.headers)
        hdrs.update(headers or {})
        if content is None and body is not None:
            content, ctype = encode_body(body, fmt)
            hdrs.setdefault("Content-Type", ctype)
        if accept:
            hdrs["Accept"] = accept
        url = path if path.startswith("http") else self.base_url + path
        if params:
            # The query is part of what MSign signs (@query): fold it into
            # the URL before signing, never after.
            query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
            if query:
                url += ("&" if "?" in url else "?") + query
        if self.signer is not None:
            hdrs.update(self.signer(method, url, content or b""))
        return url, content, hdrs

    def raw(self, method: str, path: str, body: Any = None, *,
            fmt: str = "msgpack", content: bytes | None = None,
            accept: str | None = None, headers: Mapping[str, str] | None = None,
            params: Mapping[str, Any] | None = None) -> Any:
        """Send one API request and return the response (the transport's
        type: muse.hub.Response, or httpx's), whatever its status.  `body`
        is encoded as msgpack/json; `content` is sent as is."""
        url, content, hdrs = self._prepare(method, path, body, fmt, content, accept,
                                           headers, params)
        return self._transport(method, url, content, hdrs)

    def _transport(self, method: str, url: str, content: bytes | None, headers: dict) -> Any:
        raise NotImplementedError

    @staticmethod
    def _decoded(resp: Any) -> Any:
        try:
            return decode_payload(resp.headers.get("content-type", ""), resp.content)
        except Exception:
            return resp.content

    def call(self, method: str, path: str, body: Any = None, *,
             expect: Iterable[int] = (200,), **kw: Any) -> Any:
        """raw() + status check + decoded body."""
        resp = self.raw(method, path, body, **kw)
        decoded = self._decoded(resp)
        if resp.status_code not in tuple(expect):
            raise HubError(method, str(resp.url), resp.status_code, decoded, resp.headers)
        return decoded

    # -- repositories (SPEC 4.1, 4.2) ---------------------------------------

    def create_repo(self, owner: str, name: str, visibility: str = "public",
                    initialize: bool = False, description: str | None = None,
                    **kw: Any) -> dict:
        body: dict[str, Any] = {"owner": owner, "name": name, "visibility": visibility,
                                "initialize": initialize}
        if description is not None:
            body["description"] = description
        return self.call("POST", "/api/repos", body, expect=(201,), **kw)

    def get_repo(self, repo_id: str, **kw: Any) -> dict:
        return self.call("GET", f"/api/repos/{repo_id}", **kw)

    def patch_repo(self, repo_id: str, **fields: Any) -> dict:
        """PATCH /api/repos/{id} (SPEC 4.1): description, visibility,
        default_branch."""
        return self.call("PATCH", f"/api/repos/{repo_id}", fields)

    def list_repos(self, owner: str, **kw: Any) -> dict:
        return self.call("GET", "/api/repos", params={"owner": owner}, **kw)

    def delete_repo(self, repo_id: str, **kw: Any) -> None:
        self.call("DELETE", f"/api/repos/{repo_id}", expect=(204,), **kw)

    def refs(self, owner: str, slug: str, **kw: Any) -> dict:
        return self.call("GET", f"/{owner}/{slug}/refs", **kw)

    def delete_branch(self, repo_id: str, name: str,
                      expected_old_head: str | None = None) -> None:
        """DELETE /api/repos/{id}/branches/{name} (SPEC 4.2): only the ref
        goes; with expected_old_head only if the branch points there."""
        body = {"expected_old_head": expected_old_head} if expected_old_head else None
        self.call("DELETE", f"/api/repos/{repo_id}/branches/"
                  f"{urllib.parse.quote(name, safe='')}", body, expect=(204,))

    def create_tag(self, repo_id: str, name: str, commit_id: str,
                   message: str | None = None) -> dict:
        """POST /api/repos/{id}/tags (SPEC 4.2) -> {name, commit_id,
        message, tagger, created_at}; a tag never moves (409 if it exists)."""
        body: dict[str, Any] = {"name": name, "commit_id": commit_id}
        if message is not None:
            body["message"] = message
        return self.call("POST", f"/api/repos/{repo_id}/tags", body, expect=(201,))

    def delete_tag(self, repo_id: str, name: str) -> None:
        """DELETE /api/repos/{id}/tags/{name} (SPEC 4.2)."""
        self.call("DELETE", f"/api/repos/{repo_id}/tags/{urllib.parse.quote(name, safe='')}",
                  expect=(204,))

    # -- push (SPEC 4.3) -----------------------------------------------------

    def presign(self, owner: str, slug: str, mpack_key: str, size_bytes: int,
                **kw: Any) -> dict:
        return self.call("POST", f"/{owner}/{slug}/push/mpack-presign",
                         {"mpack_key": mpack_key, "size_bytes": size_bytes}, **kw)

    def unpack(self, owner: str, slug: str, mpack_key: str, branch: str,
               head: str, force: bool = False,
               expected_old_head: str | None = None, **kw: Any) -> dict:
        body: dict[str, Any] = {"mpack_key": mpack_key, "branch": branch,
                                "head": head, "force": force}
        if expected_old_head is not None:
            body["expected_old_head"] = expected_old_head
        return self.call("POST", f"/{owner}/{slug}/push/unpack-mpack", body, **kw)

    def push_steps(self, owner: str, slug: str, mpack_key: str, size_bytes: int,
                   upload: Callable[[str], Any], branch: str, head: str,
                   force: bool = False, expected_old_head: str | None = None) -> dict:
        """Presign, upload(url) unless the server already holds the pack,
        unpack.  Returns the unpack answer plus `already_present`,
        `mpack_key` and `timings` {presign, upload, unpack} in seconds."""
        t0 = time.perf_counter()
        pre = self.presign(owner, slug, mpack_key, size_bytes)
        t1 = time.perf_counter()
        present = bool(pre.get("already_present"))
        if not present:
            url = pre.get("upload_url") or pre.get("uploadUrl")
            if not url:
                raise HubError("POST", "mpack-presign", 200, pre)
            upload(url)
        t2 = time.perf_counter()
        res = dict(self.unpack(owner, slug, mpack_key, branch, head, force,
                               expected_old_head) or {})
        t3 = time.perf_counter()
        res.update(already_present=present, mpack_key=mpack_key,
                   timings={"presign": t1 - t0, "upload": t2 - t1, "unpack": t3 - t2})
        return res

    # -- fetch and reading (SPEC 4.4, 4.5) -----------------------------------

    def fetch(self, owner: str, slug: str, want: list[str],
              have: list[str] | None = None, formats: list[int] | None = None,
              depth: int | None = None, **kw: Any) -> dict:
        body: dict[str, Any] = {"want": list(want), "have": list(have or [])}
        if formats is not None:
            body["formats"] = list(formats)
        if depth is not None:
            body["depth"] = depth
        return self.call("POST", f"/{owner}/{slug}/fetch", body, **kw)

    def commits(self, owner: str, slug: str, branch: str | None = None,
                limit: int | None = None, cursor: str | None = None,
                **kw: Any) -> dict:
        params = {k: v for k, v in (("branch", branch), ("limit", limit),
                                    ("cursor", cursor)) if v is not None}
        return self.call("GET", f"/{owner}/{slug}/commits", params=params, **kw)

    def commit(self, owner: str, slug: str, cid: str, **kw: Any) -> dict:
        return self.call("GET", f"/{owner}/{slug}/commits/{cid}", **kw)

    def tree(self, owner: str, slug: str, ref: str, **kw: Any) -> dict:
        return self.call("GET", f"/{owner}/{slug}/tree/{ref}", **kw)



class Hub(Api):
    """Synchronous client of musehubd's API (see the module docstring).

    base_url  e.g. "http://127.0.0.1:1337"
    headers   extra headers sent with every API request
    signer    optional (method, url, body) -> headers (MSign, SPEC 5)
    timeout   seconds for connecting and for each socket read/write
    """

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None,
                 signer: Signer | None = None, timeout: float = 300.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self.timeout = timeout
        self.headers = dict(headers or {})
        self._ssl = ssl_context
        self._conns: dict[tuple[str, str, int], http.client.HTTPConnection] = {}
        u = urllib.parse.urlsplit(self.base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.bytes_sent = 0      # transfer bodies (uploads), for reports
        self.bytes_received = 0  # transfer bodies (downloads)

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()

    def __enter__(self) -> "Hub":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------

    def absolute(self, url: str) -> str:
        return self.base_url + url if url.startswith("/") else url

    def _conn(self, url: str) -> tuple[http.client.HTTPConnection, str, tuple]:
        u = urllib.parse.urlsplit(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        key = (u.scheme, u.hostname or "", port)
        c = self._conns.get(key)
        if c is None:
            if u.scheme == "https":
                if self._ssl is None:
                    import ssl
                    self._ssl = ssl.create_default_context()
                c = http.client.HTTPSConnection(u.hostname, port, timeout=self.timeout,
                                                context=self._ssl, blocksize=BLOCK)
            else:
                c = http.client.HTTPConnection(u.hostname, port, timeout=self.timeout,
                                               blocksize=BLOCK)
            # the hook connect() calls (set by __init__): the host resolved
            # as bytes; timeouts, TCP_NODELAY, Host and TLS stay http.client's
            c._create_connection = _create_connection
            self._conns[key] = c
        target = u.path or "/"
        if u.query:
            target += "?" + u.query
        return c, target, key

    def _send(self, method: str, url: str, body: Any, headers: dict,
              sink: Callable[[http.client.HTTPResponse], bytes] | None = None,
              rewind: Callable[[], Any] | None = None) -> Response:
        """One request on the host's keep-alive connection.  A connection
        the server closed while idle is reopened once (only when the
        request did not get as far as an answer)."""
        for attempt in (0, 1):
            c, target, key = self._conn(url)
            reused = c.sock is not None
            try:
                c.request(method, target, body=body, headers=headers)
                r = c.getresponse()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                    http.client.CannotSendRequest, http.client.ResponseNotReady) as e:
                c.close()
                self._conns.pop(key, None)
                if attempt == 0 and reused and (rewind is None or rewind() is not False):
                    continue
                raise TransportError(connect_error(url, e)) from e
            except (OSError, http.client.HTTPException) as e:
                c.close()
                self._conns.pop(key, None)
                raise TransportError(connect_error(url, e)) from e
            try:
                if sink is not None and r.status in (200, 206):
                    content = sink(r)
                else:
                    content = r.read()
            except BaseException:
                c.close()
                self._conns.pop(key, None)
                raise
            if r.will_close:
                c.close()
                self._conns.pop(key, None)
            return Response(r.status, r.headers, content, url)
        raise AssertionError("unreachable")

    def _transport(self, method: str, url: str, content: bytes | None,
                   headers: dict) -> Response:
        return self._send(method, url, content, headers)

    # -- transfers (presigned URLs: never signed) ------------------------------

    def upload_file(self, url: str, path: str, progress: Progress | None = None,
                    expect: Iterable[int] = (200, 204)) -> int:
        """PUT a file to a presigned URL, streamed from the file in blocks
        of 1 MiB (never read whole).  Returns the status."""
        url = self.absolute(url)
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(0)
            reader = _CountingReader(fh, size, progress)

            def rewind() -> None:
                fh.seek(0)
                reader.left, reader.sent = size, 0
            r = self._send("PUT", url, reader,
                           {"Content-Length": str(size),
                            "Content-Type": "application/octet-stream"},
                           rewind=rewind)
        if r.status not in tuple(expect):
            raise HubError("PUT", url, r.status, r.decoded(), r.headers)
        self.bytes_sent += size
        return r.status

    def upload(self, url: str, data: bytes, expect: Iterable[int] = (200, 204)) -> int:
        """PUT bytes to a presigned URL; returns the status."""
        url = self.absolute(url)
        r = self._send("PUT", url, bytes(data),
                       {"Content-Length": str(len(data)),
                        "Content-Type": "application/octet-stream"})
        if r.status not in tuple(expect):
            raise HubError("PUT", url, r.status, r.decoded(), r.headers)
        self.bytes_sent += len(data)
        return r.status

    def push_file(self, owner: str, slug: str, path: str, mpack_key: str,
                  size_bytes: int, branch: str, head: str, force: bool = False,
                  expected_old_head: str | None = None,
                  progress: Progress | None = None) -> dict:
        """The three push steps for a pack file (uploaded streaming).
        Returns push_steps()'s answer plus `size_bytes` and
        `uploaded_bytes`."""
        res = self.push_steps(owner, slug, mpack_key, size_bytes,
                              lambda url: self.upload_file(url, path, progress),
                              branch, head, force, expected_old_head)
        res.update(size_bytes=size_bytes,
                   uploaded_bytes=0 if res["already_present"] else size_bytes)
        return res

    def download_to(self, url: str, out: BinaryIO,
                    progress: Progress | None = None) -> tuple[int, str]:
        """GET a presigned URL into an open binary file, hashing as it
        goes, in blocks of 1 MiB.  Returns (bytes, "sha256:<hex>")."""
        import hashlib
        url = self.absolute(url)
        h = hashlib.sha256()
        got = [0]

        def sink(r: http.client.HTTPResponse) -> bytes:
            length = r.getheader("content-length")
            if length and getattr(progress, "total", 0) is None:
                progress.total = int(length)  # type: ignore[union-attr]
            buf = bytearray(BLOCK)
            mv = memoryview(buf)
            while True:
                n = r.readinto(mv)
                if not n:
                    break
                h.update(mv[:n])
                out.write(mv[:n])
                got[0] += n
                if progress:
                    progress(got[0])
            return b""
        r = self._send("GET", url, None, {}, sink=sink)
        if r.status != 200:
            raise HubError("GET", url, r.status, r.decoded(), r.headers)
        length = r.headers.get("content-length")
        if length is not None and int(length) != got[0]:
            raise ConnectionError(f"GET {url}: {got[0]} of {length} bytes arrived")
        self.bytes_received += got[0]
        return got[0], "sha256:" + h.hexdigest()

    def download(self, url: str) -> bytes:
        """GET a presigned URL (absolute, or relative to the server), in memory."""
        url = self.absolute(url)
        r = self._send("GET", url, None, {})
        if r.status != 200:
            raise HubError("GET", url, r.status, r.decoded(), r.headers)
        return r.content

def connect_error(url: str, e: BaseException) -> str:
    """A one-line message for a connection failure."""
    if isinstance(e, socket.timeout):
        return f"{url}: timed out"
    if isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        return f"{url}: the server closed the connection ({type(e).__name__})"
    if isinstance(e, ConnectionRefusedError):
        return f"cannot connect to {url}: connection refused (is the server running?)"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host of {url}: {e.strerror or e}"
    return f"{url}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
