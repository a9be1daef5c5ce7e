#!/usr/bin/python3
"""floor_push.py — a measuring instrument, not a client: the least a
Python process can do to push one plan entry, so that the benchmark of
the clients can show how much of `muse-push`'s time is the interpreter
and the server rather than the client's own code.

  floor_push.py URL OWNER SLUG PLAN

starts, imports only socket and json, and sends the four requests of a
push on one keep-alive connection, as bare HTTP/1.1 with JSON bodies:
GET refs, POST mpack-presign, PUT the last entry's pack to the presigned
URL, POST unpack-mpack (SPEC 4.3).  No argument parsing, no signing, no
progress, no plan resume, no error handling beyond a non-zero exit with
the failing answer: everything `muse-push` adds is left out.  The pack
goes as the plan entry's file (git2muse's one-commit packs are sent
whole by muse-push too).  It only speaks to a dev-mode server (unsigned
requests, no TLS), which is all the benchmark runs.
"""
import json
import socket
import sys


def main() -> int:
    url, owner, slug, plan_path = sys.argv[1:5]
    hostport = url.split("://", 1)[1].rstrip("/")
    host, port = hostport.rsplit(":", 1)
    with open(plan_path, "rb") as fh:
        plan = json.load(fh)
    e = plan["packs"][-1]
    path = e["file"] if e["file"].startswith("/") else plan_path.rsplit("/", 1)[0] + "/" + e["file"]
    s = socket.create_connection((host.encode(), int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""

    def request(method: str, target: str, body: bytes = b"",
                ctype: str = "application/json") -> dict | None:
        nonlocal buf
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit(f"{method} {target}: connection closed")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        n = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                n = int(v)
        while len(buf) < n:
            buf += s.recv(65536)
        data, buf = buf[:n], buf[n:]
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 204")):
            status = head.split(b"\r\n", 1)[0].decode()
            raise SystemExit(f"{method} {target}: {status} {data[:200]!r}")
        return json.loads(data) if data else None

    request("GET", f"/{owner}/{slug}/refs")
    pre = request("POST", f"/{owner}/{slug}/push/mpack-presign",
                  json.dumps({"mpack_key": e["mpack_key"], "size_bytes": e["size_bytes"]}).encode())
    if not pre["already_present"]:
        up = pre["upload_url"]
        target = up[up.index("/", up.index("://") + 3):] if "://" in up else up
        with open(path, "rb") as fh:
            request("PUT", target, fh.read(), "application/octet-stream")
    res = request("POST", f"/{owner}/{slug}/push/unpack-mpack",
                  json.dumps({"mpack_key": e["mpack_key"], "branch": e["branch"],
                              "head": e["head"]}).encode())
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
