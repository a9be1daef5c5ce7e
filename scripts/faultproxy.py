#!/usr/bin/python3
"""faultproxy — a small HTTP/1.1-aware TCP fault proxy for the tests.

It sits between musehubd and an object store (the S3 emulator) and, per
request, either forwards it or injects a fault:

  pass            forward the request and the response unchanged
  500, 503        answer with that status and an S3-style XML error body
                  (<Code>InternalError</Code> / <Code>SlowDown</Code>)
                  without contacting the store
  stall:N         hold the connection N seconds without answering, then
                  close it (N may be fractional)
  close_mid_body  forward the request, then send the response head and
                  half of its body and close the connection (a response
                  without a body is dropped whole: the store did the work,
                  the client never hears of it)
  reset           close the client connection at once (RST)

Faults can be limited to the next `times` matching requests (then the
proxy passes again) and to requests matching a regular expression over
"METHOD /path?query" — e.g. only GETs of staged packs.  Keep-alive
connections are followed request by request, so a fault applies to the
next request even on a connection the client keeps in its pool.
Expect: 100-continue, Content-Length and chunked bodies are relayed.

Library use (what the e2e tests do):

    from faultproxy import FaultProxy
    p = FaultProxy("127.0.0.1", emulator_port).start()
    ... point the client at p.url ...
    p.set_mode("503", times=2, match=r"^GET /bucket/incoming/")
    p.set_mode("pass")
    p.stats()        # {"pass": 12, "503": 2}
    p.stop()

Command line (foreground; reads mode commands on stdin, one per line:
"MODE [times=N] [match=REGEX]"):

    /usr/bin/python3 scripts/faultproxy.py --upstream 127.0.0.1:9000 [--port 0]

prints "listening <url>" once ready.
"""
from __future__ import annotations

import argparse
import re
import socket
import struct
import sys
import threading

MODES = ("pass", "500", "503", "stall", "close_mid_body", "reset")
_ERR_CODES = {500: "InternalError", 503: "SlowDown"}


class _Peer:
    """A socket with a read buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """Bytes up to and including the blank line; None on EOF first."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > 1 << 20 or not self.fill():
                return None
        i = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:i], self.buf[i:]
        return head

    def read_line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self.fill():
                return None
        i = self.buf.index(b"\r\n") + 2
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def take(self, n: int) -> bytes | None:
        """Up to n bytes (at least one), from the buffer first."""
        if not self.buf and not self.fill():
            return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def close(self, rst: bool = False) -> None:
        try:
            if rst:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return lines[0], hdrs


def _copy_body(src: _Peer, dst: socket.socket | None, hdrs: dict[str, str],
               limit: int | None = None, until_close: bool = False) -> bool:
    """Relays one message body (Content-Length, chunked, or until EOF when
    until_close) from src to dst (None: discard).  With `limit`, stops
    after that many body bytes and returns False.  Returns True when the
    whole body was relayed."""
    def send(b: bytes) -> None:
        if dst is not None and b:
            dst.sendall(b)

    sent = 0
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        while True:
            line = src.read_line()
            if line is None:
                return False
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if limit is not None and sent + size >= limit:
                part = src.take(max(1, limit - sent)) or b""
                send(line + part)
                return False
            send(line)
            left = size + 2  # data + CRLF
            while left:
                b = src.take(left)
                if b is None:
                    return False
                send(b)
                left -= len(b)
                sent += len(b)
            if size == 0:
                # trailers up to the blank line
                while True:
                    t = src.read_line()
                    if t is None:
                        return False
                    send(t)
                    if t == b"\r\n":
                        return True
    if "content-length" in hdrs:
        left = int(hdrs["content-length"])
        if limit is not None:
            left = min(left, limit)
            whole = False
        else:
            whole = True
        while left:
            b = src.take(left)
            if b is None:
                return False
            send(b)
            left -= len(b)
        return whole
    if until_close:
        while True:
            b = src.take(65536)
            if b is None:
                return True
            if limit is not None and sent + len(b) >= limit:
                send(b[:max(0, limit - sent)])
                return False
            send(b)
            sent += len(b)
    return True


class FaultProxy:
    """See the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int,
                 listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind((listen_host, listen_port))
        self._lsock.listen(256)
        self.port = self._lsock.getsockname()[1]
        self.url = f"http://{listen_host}:{self.port}"
        self._lock = threading.Lock()
        self._mode = "pass"
        self._times: int | None = None
        self._match: re.Pattern | None = None
        self._stats: dict[str, int] = {}
        self._log: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._conns: set[_Peer] = set()
        self._thread: threading.Thread | None = None

    # -- control -------------------------------------------------------------

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="faultproxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._lsock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()

    def set_mode(self, mode: str, times: int | None = None, match: str | None = None) -> None:
        """Fault for the next `times` requests matching `match` (None: all,
        for ever); requests that do not match pass."""
        kind = mode.split(":")[0]
        if kind not in MODES:
            raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        with self._lock:
            self._mode, self._times = mode, times
            self._match = re.compile(match) if match else None

    def stats(self) -> dict[str, int]:
        """Requests seen per applied mode since start (or reset_stats)."""
        with self._lock:
            return dict(self._stats)

    def requests(self) -> list[tuple[str, str]]:
        """(request line, applied mode) of every request, in order."""
        with self._lock:
            return list(self._log)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()
            self._log.clear()

    def _take_mode(self, reqline: str) -> str:
        method, _, rest = reqline.partition(" ")
        target = rest.rsplit(" ", 1)[0]
        with self._lock:
            mode = "pass"
            if self._mode != "pass" and (self._match is None or self._match.search(f"{method} {target}")):
                if self._times is None or self._times > 0:
                    mode = self._mode
                    if self._times is not None:
                        self._times -= 1
            self._stats[mode.split(":")[0]] = self._stats.get(mode.split(":")[0], 0) + 1
            self._log.append((f"{method} {target}", mode))
            return mode

    # -- serving -------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                s, _ = self._lsock.accept()
            except OSError:
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(_Peer(s),), daemon=True).start()

    def _track(self, p: _Peer, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(p)

    def _serve(self, client: _Peer) -> None:
        up: _Peer | None = None
        self._track(client, True)
        try:
            while not self._stop.is_set():
                head = client.read_head()
                if head is None:
                    return
                reqline, hdrs = _parse_head(head)
                method = reqline.split(" ")[0]
                expect = hdrs.get("expect", "").lower() == "100-continue"
                mode = self._take_mode(reqline)
                kind = mode.split(":")[0]
                if kind == "reset":
                    client.close(rst=True)
                    return
                if kind == "stall":
                    self._stop.wait(float(mode.split(":")[1]) if ":" in mode else 30.0)
                    return
                if kind in ("500", "503"):
                    if not expect and not _copy_body(client, None, hdrs):
                        return
                    self._send_error(client.sock, int(kind), close=expect)
                    if expect:
                        return
                    continue
                if up is None:
                    try:
                        up = _Peer(socket.create_connection(self.upstream, timeout=60))
                    except OSError:
                        self._send_error(client.sock, 502, close=True)
                        return
                    self._track(up, True)
                up.sock.sendall(head)
                if expect:
                    interim = up.read_head()
                    if interim is None:
                        return
                    client.sock.sendall(interim)
                    if not interim.split(b" ", 2)[1].startswith(b"100"):
                        # a final answer instead of 100: no body follows
                        self._relay_body(up, client, interim, method, kind)
                        return
                if not _copy_body(client, up.sock, hdrs):
                    return
                rhead = up.read_head()
                while rhead is not None and rhead.split(b" ", 2)[1].startswith(b"1"):
                    client.sock.sendall(rhead)
                    rhead = up.read_head()
                if rhead is None:
                    return
                if not self._relay_body(up, client, rhead, method, kind):
                    return
        except OSError:
            return
        finally:
            client.close()
            self._track(client, False)
            if up is not None:
                up.close()
                self._track(up, False)

    def _relay_body(self, up: _Peer, client: _Peer, rhead: bytes, method: str, kind: str) -> bool:
        """Sends the response (or half of it in close_mid_body); True when
        the connection may carry another request."""
        status_line, rh = _parse_head(rhead)
        status = int(status_line.split(" ")[1])
        bodiless = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        until_close = not bodiless and "content-length" not in rh and \
            "chunked" not in rh.get("transfer-encoding", "").lower()
        if kind == "close_mid_body":
            if bodiless or rh.get("content-length") == "0":
                return False  # dropped whole
            total = int(rh.get("content-length", "0") or 0)
            client.sock.sendall(rhead)
            _copy_body(up, client.sock, rh, limit=max(1, total // 2) if total else 1,
                       until_close=until_close)
            return False
        client.sock.sendall(rhead)
        if not bodiless and not _copy_body(up, client.sock, rh, until_close=until_close):
            return False
        return not until_close and rh.get("connection", "").lower() != "close"

    @staticmethod
    def _send_error(sock: socket.socket, status: int, close: bool) -> None:
        code = _ERR_CODES.get(status, "BadGateway")
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>injected by faultproxy</Message></Error>").encode()
        reason = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode()
        sock.sendall(head + body)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="host:port of the store")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mode", default="pass")
    a = ap.parse_args(argv)
    host, port = a.upstream.rsplit(":", 1)
    p = FaultProxy(host, int(port), a.host, a.port).start()
    p.set_mode(a.mode)
    print(f"listening {p.url}", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        kw = dict(x.split("=", 1) for x in parts[1:] if "=" in x)
        try:
            p.set_mode(parts[0], int(kw["times"]) if "times" in kw else None, kw.get("match"))
            print(f"mode {parts[0]} {kw}", flush=True)
        except ValueError as e:
            print(f"error: {e}", flush=True)
    p.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
