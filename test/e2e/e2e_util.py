"""Helpers shared by the e2e tests (imported as `e2e_util`).

  unique(prefix)         a fresh name
  slugify(name)          SPEC 4.1 slug rule (second implementation)
  sql_str(s)             an SQL string literal
  DB                     psql-based assertions against a server's database
  RawHTTP                a raw socket client for protocol-level tests
  read_response(f)       parse one HTTP/1.1 response from a binary file object
  repo_counts(db, id)    ref-row counts of a repository
  packs_in_store(srv)    hex names of the packs a server's store holds (fs or s3)
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import uuid
from typing import Any

PSQL = "/usr/lib/postgresql/15/bin/psql"


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def slugify(name: str) -> str:
    """Lowercase (ASCII letters only, as a C server would), then every run of
    characters outside [a-z0-9._-] becomes one '-'."""
    low = "".join(c.lower() if "A" <= c <= "Z" else c for c in name)
    return re.sub(r"[^a-z0-9._-]+", "-", low)


def sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


class DB:
    """Runs SQL through psql (-X -A -t, ON_ERROR_STOP).  Values come back
    as strings (NULL as None)."""

    SEP = "\x1f"

    def __init__(self, url: str) -> None:
        self.url = url

    def _run(self, sql: str) -> str:
        r = subprocess.run([PSQL, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                            "-P", "null=\x1e", "-F", self.SEP, "-d", self.url,
                            "-c", sql],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if r.returncode != 0:
            raise RuntimeError(f"psql: {sql!r}: {r.stderr.decode(errors='replace')}")
        return r.stdout.decode()

    def execute(self, sql: str) -> None:
        self._run(sql)

    def rows(self, sql: str) -> list[tuple]:
        out = []
        # split("\n"), not splitlines(): the NULL marker \x1e is itself a
        # line boundary for splitlines() and would cut rows holding a NULL.
        for line in self._run(sql).split("\n"):
            if line == "":
                continue
            out.append(tuple(None if v == "\x1e" else v for v in line.split(self.SEP)))
        return out

    def scalar(self, sql: str) -> Any:
        rows = self.rows(sql)
        return rows[0][0] if rows else None

    def count(self, sql: str) -> int:
        return int(self.scalar(sql) or 0)


def repo_counts(db: DB, repo_id: str) -> dict[str, int]:
    """Ref rows and branches of one repository."""
    rid = sql_str(repo_id)
    return {t: db.count(f"SELECT count(*) FROM {t} WHERE repo_id = {rid}")
            for t in ("commit_refs", "snapshot_refs", "object_refs", "branches")}


# ---------------------------------------------------------------------------
# Raw HTTP
# ---------------------------------------------------------------------------

def read_response(f, method: str = "GET") -> tuple[int, dict, bytes]:
    """One response from a buffered binary stream: (status, headers with
    lower-case names, body).  Handles Content-Length, chunked, bodiless
    statuses and close-delimited bodies.  Raises ConnectionError on EOF
    before a status line."""
    line = f.readline()
    if not line:
        raise ConnectionError("connection closed before a status line")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {line[:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        h = f.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        k = k.strip().lower()
        headers[k] = (headers[k] + ", " if k in headers else "") + v.strip()
    if status < 200 or status in (204, 304) or method == "HEAD":
        return status, headers, b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int(f.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return status, headers, body
            body += f.read(size)
            f.readline()
    if "content-length" in headers:
        return status, headers, f.read(int(headers["content-length"]))
    return status, headers, f.read()


class RawHTTP:
    """A plain TCP connection to the server for protocol tests."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict | None = None) -> None:
        h = {"Host": "127.0.0.1"}
        if body or method in ("POST", "PUT"):
            h["Content-Length"] = str(len(body))
        h.update(headers or {})
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        self.send(head.encode("latin-1") + body)

    def response(self, method: str = "GET") -> tuple[int, dict, bytes]:
        return read_response(self.f, method)

    def closed_by_peer(self) -> bool:
        """True when the server has closed (EOF or reset) — consumes input."""
        try:
            return self.sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawHTTP":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def packs_in_store(server) -> set[str]:
    """Hex names of the packs under mpacks/ (fs: one file each; s3: the
    emulator's object file, its metadata beside it)."""
    d = server.store_path("mpacks/x").parent
    if not d.exists():
        return set()
    names = set()
    for f in os.listdir(d):
        if f.endswith("._S3rver_object"):
            f = f[:-len("._S3rver_object")]
        if len(f) == 64 and all(ch in "0123456789abcdef" for ch in f):
            names.add(f)
    return names
