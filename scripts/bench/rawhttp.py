"""rawhttp — a minimal HTTP/1.1 client on raw sockets, for latency figures.

Why not httpx: Debian's httpx 0.23 writes a POST's headers and body as two
segments with Nagle's algorithm on, and the second segment then waits for
the server's delayed ACK (~40 ms per POST on loopback).  Every request here
is written with ONE sendall() on a socket with TCP_NODELAY, connections are
kept alive and reused per (host, port), and nothing else happens between
the send and the read, so a measured time is the server's answer time plus
a few tens of microseconds of Python.

  c = Client()                    # a pool of keep-alive connections
  r = c.request("POST", "http://127.0.0.1:8080/x", body=b"...",
                headers={"Content-Type": "application/x-msgpack"})
  r.status, r.headers (lower-case names), r.body (bytes), r.json(), r.msgpack()

Every socket operation has a timeout (Client(timeout=...)); a response is
read by Content-Length, chunked encoding or (Connection: close) to EOF.
"""
from __future__ import annotations

import json
import socket
from typing import Any, Mapping
from urllib.parse import urlsplit


class HTTPError(Exception):
    pass


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def msgpack(self) -> Any:
        import msgpack
        return msgpack.unpackb(self.body, raw=False)

    def decoded(self) -> Any:
        ctype = self.headers.get("content-type", "").split(";")[0].strip()
        if not self.body:
            return None
        if ctype == "application/x-msgpack":
            return self.msgpack()
        if ctype == "application/json":
            return self.json()
        return self.body

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body)} bytes>"


class Connection:
    """One keep-alive connection to host:port (TCP_NODELAY)."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def connect(self) -> None:
        s = socket.create_connection((self.host, self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = s, bytearray()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise HTTPError(f"{self.host}:{self.port}: connection closed mid-response")
        self.buf += chunk

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            self._fill()

    def request(self, method: str, target: str, body: bytes = b"",
                headers: Mapping[str, str] | None = None) -> Response:
        """Send one request (target = path?query) and read the response.
        Retries once on a fresh connection when a reused one was closed by
        the server before the request got an answer (idle timeout)."""
        for attempt in (0, 1):
            fresh = self.sock is None
            if fresh:
                self.connect()
            try:
                return self._roundtrip(method, target, body, headers)
            except (HTTPError, ConnectionError, BrokenPipeError) as e:
                self.close()
                if fresh or attempt:
                    raise HTTPError(f"{method} {self.host}:{self.port}{target}: {e}") from e
            except socket.timeout as e:
                self.close()
                raise HTTPError(f"{method} {self.host}:{self.port}{target}: timed out "
                                f"after {self.timeout} s") from e
        raise AssertionError("unreachable")

    def _roundtrip(self, method: str, target: str, body: bytes,
                   headers: Mapping[str, str] | None) -> Response:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sock.sendall(head + body if body else head)
        status_line = self._read_line().decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise HTTPError(f"bad status line {status_line!r}")
        status = int(parts[1])
        hdrs: dict[str, str] = {}
        while True:
            line = self._read_line()
            if not line:
                break
            k, _, v = line.decode("latin-1").partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            data = b""
        elif "chunked" in hdrs.get("transfer-encoding", "").lower():
            parts_b = []
            while True:
                size = int(self._read_line().split(b";")[0], 16)
                if size == 0:
                    while self._read_line():
                        pass
                    break
                parts_b.append(self._read_exact(size))
                self._read_line()
            data = b"".join(parts_b)
        elif "content-length" in hdrs:
            data = self._read_exact(int(hdrs["content-length"]))
        else:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    break
                self.buf += chunk
            data, self.buf = bytes(self.buf), bytearray()
            self.close()
        if hdrs.get("connection", "").lower() == "close":
            self.close()
        return Response(status, hdrs, data)


class Client:
    """A pool of keep-alive connections, one per (host, port)."""

    def __init__(self, base_url: str = "", timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.conns: dict[tuple[str, int], Connection] = {}

    def conn(self, host: str, port: int) -> Connection:
        key = (host, port)
        if key not in self.conns:
            self.conns[key] = Connection(host, port, self.timeout)
        return self.conns[key]

    def request(self, method: str, url: str, body: bytes = b"",
                headers: Mapping[str, str] | None = None) -> Response:
        if url.startswith("/"):
            url = self.base_url + url
        u = urlsplit(url)
        if u.scheme != "http":
            raise HTTPError(f"only http:// URLs are supported: {url}")
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        return self.conn(u.hostname, u.port or 80).request(method, target, body, headers)

    def close(self) -> None:
        for c in self.conns.values():
            c.close()
        self.conns.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
