#!/usr/bin/python3
"""pgtmp — a throwaway PostgreSQL 15 cluster in a directory.

Used by the e2e test harness (test/e2e/conftest.py), `make run` and
`make bench`.  Importable (start/stop/url/createdb/psql) and a command:

  pgtmp.py start DIR [--port N]   init (first time) and start; prints the URL
  pgtmp.py stop DIR               stop (immediate) — the data stays
  pgtmp.py destroy DIR            stop and remove DIR
  pgtmp.py url DIR                print the URL of a started cluster
  pgtmp.py createdb DIR NAME      create a database, print its URL
  pgtmp.py psql DIR [ARGS...]     run psql against the cluster's musehub db

Layout: DIR/data (cluster), DIR/postgres.log, DIR/port, DIR is also the
unix socket directory.  The cluster listens on 127.0.0.1:PORT (a free port
unless --port), trusts every local connection, has the superuser
`musehub` and a database `musehub`: URL postgresql://musehub@127.0.0.1:PORT/musehub.

PostgreSQL refuses to run as root: when euid is 0, initdb and pg_ctl run as
the `postgres` OS user (through runuser) and DIR is chowned to it; DIR's
parents must then be traversable by that user (/tmp is).
fsync, synchronous_commit and full_page_writes are off: test data only.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time

PG_BIN = os.environ.get("MUSEHUB_PG_BIN", "/usr/lib/postgresql/15/bin")
USER = "musehub"
DBNAME = "musehub"


def _bin(name: str) -> str:
    return os.path.join(PG_BIN, name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_pg(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run cmd as the postgres OS user when we are root."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _check(r: subprocess.CompletedProcess, what: str) -> None:
    if r.returncode != 0:
        raise RuntimeError(f"pgtmp: {what} failed ({r.returncode}):\n"
                           f"{r.stdout.decode(errors='replace')}")


def url(dirname: str, db: str = DBNAME) -> str:
    with open(os.path.join(dirname, "port")) as fh:
        port = int(fh.read())
    return f"postgresql://{USER}@127.0.0.1:{port}/{db}"


def _log_tail(dirname: str, n: int = 30) -> str:
    try:
        with open(os.path.join(dirname, "postgres.log"), errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return "(no log)"


def _check_reachable(dirname: str, uid: int) -> None:
    """As root: fail early and clearly when the postgres user cannot
    traverse one of dirname's parents (initdb's own error is cryptic)."""
    d = os.path.dirname(dirname)
    while True:
        try:
            st = os.stat(d)
        except FileNotFoundError:   # will be created by us, mode 0777 & ~umask
            d = os.path.dirname(d)
            continue
        if st.st_uid != uid and not st.st_mode & 0o001:
            raise RuntimeError(f"pgtmp: the postgres user cannot reach {dirname}: "
                               f"{d} is not searchable by others (mode "
                               f"{st.st_mode & 0o777:o}); use a directory under /tmp")
        if d == "/":
            return
        d = os.path.dirname(d)


def start(dirname: str, port: int | None = None) -> str:
    """Initialise (once) and start the cluster in dirname; return its URL."""
    dirname = os.path.abspath(dirname)
    data = os.path.join(dirname, "data")
    if os.geteuid() == 0:
        _check_reachable(dirname, pwd.getpwnam("postgres").pw_uid)
    os.makedirs(dirname, exist_ok=True)
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        os.chown(dirname, pg.pw_uid, pg.pw_gid)
        os.chmod(dirname, 0o700)
    fresh = not os.path.exists(os.path.join(data, "PG_VERSION"))
    if fresh:
        r = _as_pg([_bin("initdb"), "-D", data, "-A", "trust", "-U", USER,
                    "-E", "UTF8", "--locale=C", "--no-sync"])
        _check(r, "initdb")
    last = None
    for _attempt in range(5):   # a "free" port can be taken before we bind it
        p = port or free_port()
        opts = (f"-c unix_socket_directories={dirname} -c listen_addresses=127.0.0.1 "
                f"-p {p} -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c max_connections=300")
        last = _as_pg([_bin("pg_ctl"), "-D", data, "-l",
                       os.path.join(dirname, "postgres.log"), "-w", "-t", "60",
                       "-o", opts, "start"])
        if last.returncode == 0:
            with open(os.path.join(dirname, "port"), "w") as fh:
                fh.write(str(p))
            break
        if port:
            break
        time.sleep(0.2)
    if last is None or last.returncode != 0:
        raise RuntimeError(f"pgtmp: pg_ctl start failed:\n"
                           f"{last.stdout.decode(errors='replace') if last else ''}\n"
                           f"{_log_tail(dirname)}")
    if fresh:
        createdb(dirname, DBNAME, exist_ok=True)
    return url(dirname)


def running(dirname: str) -> bool:
    data = os.path.join(os.path.abspath(dirname), "data")
    if not os.path.exists(os.path.join(data, "PG_VERSION")):
        return False
    return _as_pg([_bin("pg_ctl"), "-D", data, "status"]).returncode == 0


def stop(dirname: str) -> None:
    """Stop the cluster at once (pg_ctl stop -m immediate); data stays."""
    data = os.path.join(os.path.abspath(dirname), "data")
    if running(dirname):
        r = _as_pg([_bin("pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"])
        _check(r, "pg_ctl stop")
    try:
        os.unlink(os.path.join(dirname, "port"))
    except FileNotFoundError:
        pass


def destroy(dirname: str) -> None:
    """Stop the cluster and remove its directory."""
    if os.path.isdir(dirname):
        stop(dirname)
        shutil.rmtree(dirname, ignore_errors=True)


def psql(target: str, *args: str, sql: str | None = None,
         check: bool = True) -> str:
    """Run psql (-X -A -t, ON_ERROR_STOP) against a URL or a cluster dir."""
    u = target if "://" in target else url(target)
    cmd = [_bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", u, *args]
    if sql is not None:
        cmd += ["-c", sql]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check and r.returncode != 0:
        raise RuntimeError(f"psql failed: {r.stderr.decode(errors='replace')}")
    return r.stdout.decode()


def createdb(target: str, name: str, exist_ok: bool = False) -> str:
    """Create database `name` in the cluster at target (dir or any URL of
    the cluster); returns the new database's URL."""
    base = target if "://" in target else url(target)
    admin = base.rsplit("/", 1)[0] + "/postgres"
    exists = psql(admin, sql=f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
    if not exists:
        psql(admin, sql=f'CREATE DATABASE "{name}"')
    elif not exist_ok:
        raise RuntimeError(f"database {name} exists")
    return base.rsplit("/", 1)[0] + "/" + name


def main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="init (once) and start; prints the URL")
    s.add_argument("dir")
    s.add_argument("--port", type=int)
    for name in ("stop", "destroy", "url"):
        sub.add_parser(name).add_argument("dir")
    c = sub.add_parser("createdb", help="create a database; prints its URL")
    c.add_argument("dir")
    c.add_argument("name")
    q = sub.add_parser("psql", help="psql against the musehub database")
    q.add_argument("dir")
    q.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "start":
            print(start(a.dir, a.port))
        elif a.cmd == "stop":
            stop(a.dir)
        elif a.cmd == "destroy":
            destroy(a.dir)
        elif a.cmd == "url":
            print(url(a.dir))
        elif a.cmd == "createdb":
            print(createdb(a.dir, a.name, exist_ok=True))
        elif a.cmd == "psql":
            os.execv(_bin("psql"), [_bin("psql"), "-X", "-d", url(a.dir), *a.args])
    except (RuntimeError, OSError) as e:
        print(str(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
