"""End-to-end harness: the real musehubd binary, a throwaway PostgreSQL 15,
a real object store.  Every e2e test builds on these fixtures.

Fixtures
  pg              (session) libpq URL of a throwaway cluster started with
                  scripts/pgtmp.py (or $MUSEHUB_TEST_DATABASE_URL, an existing
                  cluster whose user may CREATE DATABASE)
  server          (session) a shared server: Server object (below)
  anon_server     (session) a second server WITHOUT a dev identity sharing
                  `server`'s database and store: its requests are anonymous
  start_server    (function) factory; servers it starts are stopped at the
                  end of the test and must exit 0 on SIGTERM within 35 s
  server_factory  (session) the same factory with session lifetime
  hub / anon_hub  muselib.Hub on server / anon_server
  db              e2e_util.DB on `server`'s database
  repo            a fresh public repo owned by gabriel (the create JSON);
                  deleted afterwards
  make_repo       factory make_repo(name=None, visibility="public",
                  initialize=False, hub=None) -> JSON; all deleted afterwards
  seed000         (session) muselib.History of seed 000 (1031 x 700 x 5 x 512)
  seed_repo       (session) a repo on `server` with seed000 pushed:
                  {"repo": JSON, "push": unpack result, "history": History}
  store_kind      "fs" or "s3" (--store, or $MUSEHUB_TEST_STORE)
  s3emu           (session) in s3 mode, the S3 emulator shared by every server
                  of the session (scripts/s3emu.py): {"endpoint", "bucket",
                  "data_dir"}; None in fs mode

Store modes
  fs   each server gets MUSEHUB_STORE=fs:<store_dir>
  s3   one emulator per session (SigV4 checked; credentials S3RVER/S3RVER);
       every server gets MUSEHUB_STORE=s3:<bucket>, MUSEHUB_S3_ENDPOINT,
       MUSEHUB_S3_ACCESS_KEY/SECRET_KEY, MUSEHUB_S3_PATH_STYLE=1, and all
       servers share the bucket (store_dir is still created, but unused).
  Tests marked @pytest.mark.store("fs") (or "s3") run only in that mode.
  Server.store_path(key) is the file holding an object's bytes in either
  mode (fs: <store_dir>/<key>; s3: the emulator's file for the key).

start_server(*, dev_identity="gabriel", database=None, store_dir=None,
             share=None, log_level="info", listen_host="127.0.0.1",
             start_timeout=15, **env) -> Server
  database   None: a fresh database in the pg cluster; a name; a URL
  store_dir  None: a fresh directory; a path
  share      a Server whose database and store to reuse (for anonymous or
             multi-process checks)
  **env      extra environment, e.g. MUSEHUB_MAX_MPACK_BYTES="1000"
The server runs `build/musehubd serve` ($MUSEHUB_BIN overrides, and
$MUSEHUB_TEST_WRAPPER, e.g. "valgrind -q", prefixes the command) with
MUSEHUB_LISTEN=127.0.0.1:<free port>, MUSEHUB_DATABASE_URL,
MUSEHUB_STORE=fs:<dir> (or the s3 variables above), MUSEHUB_DEV_IDENTITY (unless None),
MUSEHUB_LOG_LEVEL; stderr and stdout go to <tmp>/musehubd.log.
No other MUSEHUB_* variable of the calling environment is passed on.

Server: .url .port .store_dir .log_path .proc .env .database_url .db
        .hub(**kw) .log_tail(n) .stop(check=True, timeout=35) -> exit code
        .store_path(key) -> Path of an object's bytes (see Store modes)
"""
from __future__ import annotations

import http.client
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import muselib  # noqa: E402
import pgtmp  # noqa: E402
import s3emu as s3emu_mod  # noqa: E402
from e2e_util import DB, unique  # noqa: E402

OWNER = "gabriel"


def pytest_addoption(parser):
    parser.addoption("--store", choices=("fs", "s3"),
                     default=os.environ.get("MUSEHUB_TEST_STORE", "fs"),
                     help="object store backend for e2e servers (s3: an emulator "
                          "started once per session)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "store(kind): needs a given store backend")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, attach the log tail of every server the test used."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed or call.when not in ("call", "setup", "teardown"):
        return
    servers: list = []
    for v in getattr(item, "funcargs", {}).values():
        if isinstance(v, Server):
            servers.append(v)
        elif isinstance(v, ServerFactory):
            servers.extend(v.servers)
    for s in dict.fromkeys(servers):
        rep.sections.append((f"musehubd log tail ({s.log_path})", s.log_tail(40)))


@pytest.fixture(scope="session")
def store_kind(request) -> str:
    return request.config.getoption("--store")


def pytest_collection_modifyitems(config, items):
    kind = config.getoption("--store")
    for item in items:
        m = item.get_closest_marker("store")
        if m and m.args and m.args[0] != kind:
            item.add_marker(pytest.mark.skip(reason=f"needs the {m.args[0]} store (running --store {kind})"))


S3_BUCKET = "musehub-e2e"


@pytest.fixture(scope="session")
def s3emu(store_kind, tmp_path_factory):
    """The session's S3 emulator in s3 mode (None in fs mode)."""
    if store_kind != "s3":
        yield None
        return
    why = s3emu_mod.available()
    if why:
        pytest.skip(f"s3 store mode: {why}")
    d = tmp_path_factory.mktemp("s3emu")
    endpoint, proc = s3emu_mod.start(str(d), S3_BUCKET)
    try:
        yield {"endpoint": endpoint, "bucket": S3_BUCKET, "data_dir": str(d / "data"), "proc": proc}
    finally:
        s3emu_mod.stop(proc)


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg():
    ext = os.environ.get("MUSEHUB_TEST_DATABASE_URL")
    if ext:
        yield ext
        return
    d = tempfile.mkdtemp(prefix="musehub-pg-", dir="/tmp")
    try:
        yield pgtmp.start(d)
    finally:
        pgtmp.destroy(d)


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------

def server_binary() -> str:
    return os.environ.get("MUSEHUB_BIN", str(REPO_ROOT / "build" / "musehubd"))


class Server:
    """A running musehubd process (see the module docstring)."""

    def __init__(self, proc, port, env, store_dir, log_path, database_url) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = env
        self.store_dir = store_dir
        self.log_path = log_path
        self.database_url = database_url
        self.db = DB(database_url)
        self.dev_identity = env.get("MUSEHUB_DEV_IDENTITY")
        self.returncode: int | None = None

    def hub(self, **kw) -> muselib.Hub:
        return muselib.Hub(self.url, **kw)

    def store_path(self, key: str) -> Path:
        """The file holding the bytes of store key `key` ("mpacks/<hex>",
        "incoming/<id>"; a "sha256:<hex>" pack id is taken as mpacks/<hex>)."""
        if key.startswith("sha256:"):
            key = "mpacks/" + key[len("sha256:"):]
        emu = getattr(self, "s3emu", None)
        if emu is None:
            return Path(self.store_dir) / key
        *dirs, name = key.split("/")
        return Path(emu["data_dir"], emu["bucket"], *dirs, f"{name}._S3rver_object")

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, check: bool = True, timeout: float = 35.0) -> int:
        """SIGTERM, wait up to `timeout` s; with check, assert exit code 0."""
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    self.returncode = -9
                    if check:
                        raise AssertionError(
                            f"musehubd did not exit within {timeout}s of SIGTERM; "
                            f"killed.  Log tail:\n{self.log_tail()}")
            self.returncode = self.proc.returncode if self.returncode is None \
                else self.returncode
        if check and self.returncode != 0:
            raise AssertionError(f"musehubd exited with {self.returncode}.  "
                                 f"Log tail:\n{self.log_tail()}")
        return self.returncode


class ServerFactory:
    """Starts servers; stop_all() stops those still running."""

    def __init__(self, pg_url: str, base_dir: Path, store_kind: str, s3emu: dict | None = None) -> None:
        self.pg_url = pg_url
        self.base_dir = base_dir
        self.store_kind = store_kind
        self.s3emu = s3emu
        self.servers: list[Server] = []
        self._n = 0

    def _fresh_database(self) -> str:
        name = f"mh_{os.getpid()}_{time.monotonic_ns() % 10**9}_{self._n}"
        return pgtmp.createdb(self.pg_url, name)

    def __call__(self, *, dev_identity: str | None = OWNER, database: str | None = None,
                 store_dir: str | None = None, share: Server | None = None,
                 log_level: str = "info", listen_host: str = "127.0.0.1",
                 start_timeout: float | None = None, **env: str) -> Server:
        if self.store_kind == "s3" and self.s3emu is None:
            pytest.skip("s3 store mode without an emulator")
        binary = server_binary()
        if not os.path.exists(binary):
            pytest.fail(f"server binary {binary} not found: run `make` first "
                        f"(or set MUSEHUB_BIN)")
        self._n += 1
        wdir = self.base_dir / f"server-{self._n}"
        wdir.mkdir(parents=True, exist_ok=True)
        if share is not None:
            database = database or share.database_url
            store_dir = store_dir or share.store_dir
        if database is None:
            database_url = self._fresh_database()
        elif "://" in database:
            database_url = database
        else:
            database_url = pgtmp.createdb(self.pg_url, database, exist_ok=True)
        if store_dir is None:
            store_dir = str(wdir / "store")
        os.makedirs(store_dir, exist_ok=True)
        timeout = start_timeout or float(os.environ.get("MUSEHUB_TEST_START_TIMEOUT", 15))
        wrapper = shlex.split(os.environ.get("MUSEHUB_TEST_WRAPPER", ""))

        last_err = ""
        for _attempt in range(3):  # retry only when the free port got taken
            port = pgtmp.free_port()
            penv = {k: v for k, v in os.environ.items() if not k.startswith("MUSEHUB_")}
            penv.update({
                "MUSEHUB_LISTEN": f"{listen_host}:{port}",
                "MUSEHUB_DATABASE_URL": database_url,
                "MUSEHUB_STORE": f"fs:{store_dir}",
                "MUSEHUB_LOG_LEVEL": log_level,
            })
            if self.s3emu is not None:
                penv.update({
                    "MUSEHUB_STORE": f"s3:{self.s3emu['bucket']}",
                    "MUSEHUB_S3_ENDPOINT": self.s3emu["endpoint"],
                    "MUSEHUB_S3_ACCESS_KEY": s3emu_mod.ACCESS_KEY,
                    "MUSEHUB_S3_SECRET_KEY": s3emu_mod.SECRET_KEY,
                    "MUSEHUB_S3_PATH_STYLE": "1",
                })
            if dev_identity:
                penv["MUSEHUB_DEV_IDENTITY"] = dev_identity
            penv.update({k: str(v) for k, v in env.items()})
            log_path = str(wdir / "musehubd.log")
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(wrapper + [binary, "serve"], env=penv,
                                        stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL, cwd=str(wdir))
            srv = Server(proc, port, penv, store_dir, log_path, database_url)
            srv.s3emu = self.s3emu
            err = self._wait_healthy(srv, timeout)
            if err is None:
                self.servers.append(srv)
                return srv
            srv.stop(check=False, timeout=5)
            last_err = err
            if "in use" not in srv.log_tail().lower():
                break
        raise RuntimeError(last_err)

    @staticmethod
    def _wait_healthy(srv: Server, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if srv.proc.poll() is not None:
                return (f"musehubd exited with {srv.proc.returncode} during start-up."
                        f"  Log tail:\n{srv.log_tail()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=1)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    c.close()
                    return None
                c.close()
            except OSError:
                pass
            time.sleep(0.05)
        return (f"musehubd: GET /healthz not 200 within {timeout}s.  "
                f"Log tail:\n{srv.log_tail()}")

    def stop_all(self) -> None:
        """Stop every running server; raise if one did not exit cleanly."""
        errors = []
        for s in self.servers:
            if s.returncode is None:
                try:
                    s.stop()
                except AssertionError as e:
                    errors.append(str(e))
        self.servers.clear()
        if errors:
            raise AssertionError("\n\n".join(errors))


@pytest.fixture(scope="session")
def server_factory(pg, tmp_path_factory, store_kind, s3emu):
    f = ServerFactory(pg, tmp_path_factory.mktemp("servers"), store_kind, s3emu)
    yield f
    f.stop_all()


@pytest.fixture
def start_server(pg, tmp_path_factory, store_kind, s3emu):
    f = ServerFactory(pg, tmp_path_factory.mktemp("srv"), store_kind, s3emu)
    yield f
    f.stop_all()


@pytest.fixture(scope="session")
def server(server_factory) -> Server:
    return server_factory()


@pytest.fixture(scope="session")
def anon_server(server_factory, server) -> Server:
    return server_factory(dev_identity=None, share=server)


@pytest.fixture
def hub(server):
    h = server.hub()
    yield h
    h.close()


@pytest.fixture
def anon_hub(anon_server):
    h = anon_server.hub()
    yield h
    h.close()


@pytest.fixture
def db(server) -> DB:
    return server.db


# ---------------------------------------------------------------------------
# Repositories and histories
# ---------------------------------------------------------------------------

@pytest.fixture
def make_repo(server):
    made: list[tuple[muselib.Hub, str]] = []
    default_hub = server.hub()

    def make(name: str | None = None, visibility: str = "public",
             initialize: bool = False, hub: muselib.Hub | None = None,
             owner: str = OWNER) -> dict:
        h = hub or default_hub
        r = h.create_repo(owner, name or unique("repo"), visibility=visibility,
                          initialize=initialize)
        made.append((h, r["repo_id"]))
        return r

    yield make
    for h, rid in made:
        try:
            h.raw("DELETE", f"/api/repos/{rid}")
        except Exception:  # the server may be gone already; nothing to clean
            pass
    default_hub.close()


@pytest.fixture
def repo(make_repo) -> dict:
    return make_repo()


@pytest.fixture(scope="session")
def seed000() -> muselib.History:
    return muselib.generate()


@pytest.fixture(scope="session")
def seed_repo(server, seed000) -> dict:
    h = server.hub()
    r = h.create_repo(OWNER, unique("seed000"))
    res = h.push(OWNER, r["slug"], seed000.pack(), "main", seed000.head)
    h.close()
    return {"repo": r, "push": res, "history": seed000}
