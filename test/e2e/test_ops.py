"""Operating musehubd (issue 18; SPEC 4.8 and 6): the command line, the
configuration checks, /metrics across worker processes (parsed with
prometheus_client's text parser), log lines (text and JSON), fsck and its
repairs, `make install`, `make run`'s exit status, and a backup/restore
round trip (pg_dump + store copy, destroy, restore, fsck, clone).

Every test runs in both store modes (`--store s3` runs them against the
S3 emulator) unless marked otherwise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from conftest import OWNER, REPO_ROOT, SCRIPTS, server_binary
from e2e_util import sql_str, unique

sys.path.insert(0, str(SCRIPTS))
import msign  # noqa: E402
import muselib  # noqa: E402
import pgtmp  # noqa: E402
import s3emu as s3emu_mod  # noqa: E402

PG_BIN = Path("/usr/lib/postgresql/15/bin")



# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSEHUB_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def server_env(server, **extra: str) -> dict:
    """The environment a command needs to work on `server`'s database and
    store (the server's own MUSEHUB_* settings)."""
    env = clean_env()
    env.update({k: v for k, v in server.env.items() if k.startswith("MUSEHUB_")})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def musehubd(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([server_binary(), *args], env=env if env is not None else clean_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, text=True)


def fsck(server, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return musehubd("fsck", *args, env=server_env(server, **extra))


def small(seed: str, commits: int = 3, files: int = 6) -> muselib.History:
    return muselib.generate(commits=commits, files=files, changed=2, blob_size=64, seed=seed)


def free_port() -> int:
    return pgtmp.free_port()


class Who:
    """An identity with a P-256 key (scripts/msign.py)."""

    def __init__(self, handle: str) -> None:
        self.handle = handle
        self.priv_pem, self.pub_pem, self.key_id = msign.generate_key()
        self.key = msign.load_private_key(self.priv_pem)

    def hub(self, server) -> muselib.Hub:
        return muselib.Hub(server.url, signer=msign.signer_from_key(self.key_id, self.key))

    def add(self, server, tmp_path, *flags: str) -> subprocess.CompletedProcess:
        f = tmp_path / f"{self.handle}.pub"
        f.write_bytes(self.pub_pem)
        return musehubd("identity", "add", "--handle", self.handle, "--public-key-file", str(f), *flags,
                        env=clean_env(MUSEHUB_DATABASE_URL=server.database_url))


class Store:
    """Direct access to a server's store (fs directory or S3 bucket), for
    damaging it and for backups."""

    def __init__(self, server) -> None:
        self.server = server
        self.emu = getattr(server, "s3emu", None)
        if self.emu:
            import boto3
            self.s3 = boto3.client("s3", endpoint_url=self.emu["endpoint"], region_name="us-east-1",
                                   aws_access_key_id=s3emu_mod.ACCESS_KEY,
                                   aws_secret_access_key=s3emu_mod.SECRET_KEY)
            self.bucket = server.env["MUSEHUB_STORE"][3:]

    def keys(self, prefix: str) -> list[str]:
        if self.emu:
            out, token = [], None
            while True:
                kw = {"Bucket": self.bucket, "Prefix": prefix}
                if token:
                    kw["ContinuationToken"] = token
                r = self.s3.list_objects_v2(**kw)
                out += [o["Key"] for o in r.get("Contents", [])]
                if not r.get("IsTruncated"):
                    return sorted(out)
                token = r["NextContinuationToken"]
        d = Path(self.server.store_dir) / prefix.rstrip("/")
        return sorted(f"{prefix}{p.name}" for p in d.iterdir()) if d.exists() else []

    def get(self, key: str) -> bytes:
        if self.emu:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return (Path(self.server.store_dir) / key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        if self.emu:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        else:
            p = Path(self.server.store_dir) / key
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

    def delete(self, key: str) -> None:
        if self.emu:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        else:
            (Path(self.server.store_dir) / key).unlink()


def own_store(s3emu) -> dict:
    """Server settings for a store of its own: in s3 mode the servers of a
    session share one bucket, and store-wide checks (orphans) need one that
    holds only this test's packs. fs mode: nothing (each server has its
    own directory)."""
    if not s3emu:
        return {}
    import boto3
    bucket = unique("fsck").lower()
    boto3.client("s3", endpoint_url=s3emu["endpoint"], region_name="us-east-1",
                 aws_access_key_id=s3emu_mod.ACCESS_KEY,
                 aws_secret_access_key=s3emu_mod.SECRET_KEY).create_bucket(Bucket=bucket)
    return {"MUSEHUB_STORE": f"s3:{bucket}"}


def scrape(url: str) -> tuple[str, dict]:
    """One /metrics scrape on a new connection: (text, families by name),
    parsed by prometheus_client's text parser (Debian's
    python3-prometheus-client, installed by scripts/deps.sh)."""
    prom = pytest.importorskip("prometheus_client.parser")
    with httpx.Client(timeout=30) as c:
        r = c.get(url + "/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in prom.text_string_to_metric_families(r.text)}
    return r.text, fams


def sample(fams: dict, family: str, name: str | None = None, **labels: str) -> float:
    """The value of the sample `name` (default: the family's own) whose
    labels include `labels`; fails when there is not exactly one."""
    name = name or family
    got = [s.value for s in fams[family].samples
           if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(got) == 1, (family, name, labels, fams[family].samples[:5])
    return got[0]


def log_lines(server) -> list[str]:
    return Path(server.log_path).read_text(errors="replace").splitlines()


# ---------------------------------------------------------------------------
# --version, --help
# ---------------------------------------------------------------------------

def test_version_names_the_version_and_commit():
    r = musehubd("--version")
    assert r.returncode == 0 and r.stderr == ""
    m = re.fullmatch(r"musehubd (\S+) \(git (\S+)\)\n", r.stdout)
    assert m, r.stdout
    assert m.group(1) == (REPO_ROOT / "VERSION").read_text().strip()
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                          stdout=subprocess.PIPE, text=True)
    if head.returncode == 0:
        # The binary was built from this checkout (perhaps with changes since).
        assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?", m.group(2)), m.group(2)


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"], ["serve", "--help"], ["migrate", "--help"],
                                  ["worker", "--help"], ["identity", "--help"], ["identity", "list", "--help"],
                                  ["fsck", "--help"], ["help", "fsck"]])
def test_help_goes_to_stdout_and_exits_0(args):
    r = musehubd(*args)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.startswith("Usage:") or r.stdout.startswith("musehubd ")
    if args[0] != "identity":
        assert "MUSEHUB_LOG_FORMAT" in r.stdout  # the configuration table
    if "fsck" in args:
        assert "--repair" in r.stdout and "--repo" in r.stdout


def test_unknown_command_is_usage_error():
    r = musehubd("frobnicate")
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and "frobnicate" in r.stderr


# ---------------------------------------------------------------------------
# every setting is checked before anything happens
# ---------------------------------------------------------------------------

BAD_SETTINGS = [
    ({"MUSEHUB_LOG_LEVEL": "verbose"}, [], "MUSEHUB_LOG_LEVEL"),
    ({}, ["--log-level", "verbose"], "--log-level"),
    ({"MUSEHUB_LOG_FORMAT": "xml"}, [], "MUSEHUB_LOG_FORMAT"),
    ({"MUSEHUB_WORKERS": "0"}, [], "MUSEHUB_WORKERS"),
    ({"MUSEHUB_DB_POOL": "eight"}, [], "MUSEHUB_DB_POOL"),
    ({"MUSEHUB_PRESIGN_TTL": "604801"}, [], "MUSEHUB_PRESIGN_TTL"),
    ({"MUSEHUB_MAX_MPACK_BYTES": "-1"}, [], "MUSEHUB_MAX_MPACK_BYTES"),
    ({"MUSEHUB_JOBS": "maybe"}, [], "MUSEHUB_JOBS"),
    ({"MUSEHUB_LISTEN": "nowhere"}, [], "MUSEHUB_LISTEN"),
    ({"MUSEHUB_LISTEN": "127.0.0.1:99999"}, [], "MUSEHUB_LISTEN"),
    ({"MUSEHUB_STORE": "ftp:/srv"}, [], "MUSEHUB_STORE"),
    ({"MUSEHUB_STORE": "s3:my-bucket"}, [], "MUSEHUB_S3_ACCESS_KEY"),
    ({"MUSEHUB_PUBLIC_URL": "ftp://hub.example.org"}, [], "MUSEHUB_PUBLIC_URL"),
    ({"MUSEHUB_S3_ENDPOINT": "http://minio:9000/prefix"}, [], "MUSEHUB_S3_ENDPOINT"),
    ({"MUSEHUB_TRUSTED_PROXIES": "10.0.0.0/8"}, [], "MUSEHUB_TRUSTED_PROXIES"),
    ({"MUSEHUB_SIGNING_SECRET": "s3cr3t"}, [], "MUSEHUB_SIGNING_SECRET"),
    ({"MUSEHUB_DEV_IDENTITY": "no spaces allowed"}, [], "MUSEHUB_DEV_IDENTITY"),
    ({}, ["--no-such-setting", "1"], "--no-such-setting"),
]


@pytest.mark.parametrize("env,flags,named", BAD_SETTINGS, ids=[b[2] + str(i) for i, b in enumerate(BAD_SETTINGS)])
def test_bad_setting_exits_2_before_migrating_or_binding(pg, tmp_path, env, flags, named):
    url = pgtmp.createdb(pg, f"bad_{unique('cfg').replace('-', '_')}")
    port = free_port()
    base = {"MUSEHUB_DATABASE_URL": url, "MUSEHUB_LISTEN": f"127.0.0.1:{port}",
            "MUSEHUB_STORE": f"fs:{tmp_path / 'store'}"}
    base.update(env)
    r = musehubd("serve", *flags, env=clean_env(**base), timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and named in lines[0], r.stderr
    if named == "MUSEHUB_SIGNING_SECRET":
        assert "s3cr3t" not in lines[0]  # secrets are never echoed
    # Nothing happened: no schema, no store directory, the port was never bound.
    from e2e_util import DB
    assert DB(url).scalar("SELECT to_regclass('schema_migrations')") is None
    assert not (tmp_path / "store").exists()


def test_database_url_is_required_and_checked():
    r = musehubd("migrate")
    assert r.returncode == 2 and "MUSEHUB_DATABASE_URL" in r.stderr
    r = musehubd("migrate", "--database-url", "postgresql://u@h:notaport/db")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert "notaport" not in r.stderr  # the URL may hold a password: never echoed


def test_port_in_use_exits_1_with_a_clear_error(pg, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        url = pgtmp.createdb(pg, f"busy_{unique('p').replace('-', '_')}")
        r = musehubd("serve", env=clean_env(MUSEHUB_DATABASE_URL=url, MUSEHUB_LISTEN=f"127.0.0.1:{port}",
                                            MUSEHUB_STORE=f"fs:{tmp_path / 'store'}"), timeout=60)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "in use" in r.stderr.lower()


@pytest.mark.store("fs")
def test_make_run_fails_when_the_port_is_taken():
    """scripts/run.sh (make run) passes the server's exit status on, and
    stops its PostgreSQL either way."""
    var = Path(tempfile.mkdtemp(prefix="musehub-run-", dir="/tmp"))
    var.chmod(0o755)  # the postgres user must reach it when the tests run as root
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            env = clean_env(MUSEHUB_RUN_DIR=str(var), MUSEHUB_LISTEN=f"127.0.0.1:{port}")
            r = subprocess.run(["sh", str(SCRIPTS / "run.sh")], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, timeout=120)
        assert r.returncode != 0, r.stdout + r.stderr
        assert "cannot listen" in r.stderr
        assert "run: stopped" in r.stdout
        # The throwaway cluster is down: its postmaster.pid is gone.
        assert not (var / "pg" / "data" / "postmaster.pid").exists()
    finally:
        pgtmp.destroy(str(var / "pg"))
        shutil.rmtree(var, ignore_errors=True)


# ---------------------------------------------------------------------------
# identity add / list / revoke
# ---------------------------------------------------------------------------

def test_identity_list_and_revoke(start_server, tmp_path):
    srv = start_server(dev_identity=None)
    alice, bob = Who(unique("alice")), Who(unique("bob"))
    assert alice.add(srv, tmp_path, "--admin").returncode == 0
    assert bob.add(srv, tmp_path, "--agent").returncode == 0
    env = clean_env(MUSEHUB_DATABASE_URL=srv.database_url)

    r = musehubd("identity", "list", env=env)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows[0] == ["HANDLE", "FLAGS", "KEY_ID", "ADDED", "REVOKED"]
    mine = {row[0]: row for row in rows[1:] if row[0] in (alice.handle, bob.handle)}
    assert mine[alice.handle][1:3] == ["admin", alice.key_id] and mine[alice.handle][4] == "-"
    assert mine[bob.handle][1:3] == ["agent", bob.key_id]

    r = musehubd("identity", "list", "--handle", alice.handle, "--json", env=env)
    doc = json.loads(r.stdout)
    assert [i["handle"] for i in doc["identities"]] == [alice.handle]
    ident = doc["identities"][0]
    assert ident["is_admin"] is True and ident["is_agent"] is False
    assert [k["key_id"] for k in ident["keys"]] == [alice.key_id] and ident["keys"][0]["revoked_at"] is None

    # alice can write; after `identity revoke` her key is refused (within
    # the 5 s key cache of the running server).
    with alice.hub(srv) as h:
        h.create_repo(alice.handle, unique("rv"))
    r = musehubd("identity", "revoke", "--key-id", alice.key_id, env=env)
    assert r.returncode == 0 and r.stdout.startswith(f"revoked {alice.key_id} ({alice.handle}) at "), r.stdout
    r2 = musehubd("identity", "revoke", "--key-id", alice.key_id, env=env)
    assert r2.returncode == 0 and r2.stdout.startswith("already revoked")
    assert r2.stdout.split(" at ")[1] == r.stdout.split(" at ")[1]  # the first time is kept
    doc = json.loads(musehubd("identity", "list", "--handle", alice.handle, "--json", env=env).stdout)
    assert doc["identities"][0]["keys"][0]["revoked_at"]
    deadline = time.monotonic() + 10
    with alice.hub(srv) as h:
        while True:
            st = h.raw("POST", "/api/repos", {"owner": alice.handle, "name": unique("rv"),
                                              "visibility": "public"}).status_code
            if st == 401 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert st == 401

    # Errors: unknown handle 1, malformed key id 2, unknown key 1, no subcommand 2.
    assert musehubd("identity", "list", "--handle", "nobody-here", env=env).returncode == 1
    assert musehubd("identity", "revoke", "--key-id", "nope", env=env).returncode == 2
    r = musehubd("identity", "revoke", "--key-id", "sha256:" + "0" * 64, env=env)
    assert r.returncode == 1 and "no key" in r.stderr
    assert musehubd("identity", env=env).returncode == 2
    assert musehubd("identity", "rename", env=env).returncode == 2


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------

REQUIRED_FAMILIES = {
    "musehub_http_requests": "counter",
    "musehub_http_request_duration_seconds": "histogram",
    "musehub_http_connections": "gauge",
    "musehub_http_requests_in_flight": "gauge",
    "musehub_db_pool_size": "gauge",
    "musehub_db_queries": "counter",
    "musehub_store_operations": "counter",
    "musehub_store_bytes_read": "counter",
    "musehub_jobs_claimed": "counter",
    "musehub_jobs_finished": "counter",
    "musehub_jobs_duration_seconds": "histogram",
    "musehub_jobs_queue": "gauge",
    "musehub_jobs_oldest_pending_seconds": "gauge",
    "musehub_process_resident_memory_bytes": "gauge",
    "musehub_process_open_fds": "gauge",
    "musehub_process_max_fds": "gauge",
    "musehub_process_cpu_seconds": "counter",
    "musehub_build_info": "gauge",
    "musehub_uptime_seconds": "gauge",
    "musehub_workers": "gauge",
    "musehub_metrics_workers": "gauge",
}


def test_metric_families_have_help_and_type(server):
    text, fams = scrape(server.url)
    for name, typ in REQUIRED_FAMILIES.items():
        assert name in fams, name
        assert fams[name].type == typ, (name, fams[name].type)
    for f in fams.values():
        assert f.documentation, f"{f.name} has no HELP line"
        assert f.type != "unknown", f"{f.name} has no TYPE line"
    # Every family appears once, with its HELP and TYPE before its samples.
    helps = re.findall(r"^# HELP (\S+)", text, re.M)
    assert len(helps) == len(set(helps))
    version = musehubd("--version").stdout.split()
    info = fams["musehub_build_info"].samples[0]
    assert info.value == 1 and info.labels["version"] == version[1]
    assert version[3].startswith(info.labels["commit"])
    assert sample(fams, "musehub_uptime_seconds") > 0
    assert sample(fams, "musehub_process_resident_memory_bytes", worker="0") > 1 << 20
    assert sample(fams, "musehub_process_open_fds", worker="0") >= 3
    assert sample(fams, "musehub_process_cpu_seconds", "musehub_process_cpu_seconds_total", worker="0") > 0
    for t in ("mpack.index", "mpack.gc"):
        for st in ("pending", "running", "done", "failed"):
            sample(fams, "musehub_jobs_queue", type=t, status=st)


def test_one_scrape_reports_every_worker(start_server):
    """With two workers sharing the port, every scrape — whichever worker
    answers — reports the requests both served (issue 18: a counter read
    1, 2, 1, 3)."""
    srv = start_server(MUSEHUB_WORKERS="2")
    scrapes = 0

    def fresh_scrape():
        # A sibling that does not answer within the scrape's 250 ms wait is
        # reported with its last numbers (stale) or not at all: on a loaded
        # run, scrape again until both are fresh (each scrape counts).
        nonlocal scrapes
        for _ in range(20):
            _, fams = scrape(srv.url)
            scrapes += 1
            if sample(fams, "musehub_metrics_workers", state="fresh") == 2:
                break
        return fams

    # The harness's own start-up probes count too: start from what is there.
    fams = fresh_scrape()
    base = sample(fams, "musehub_http_requests", "musehub_http_requests_total", route="healthz", status="200")
    n = 40
    for _ in range(n):  # a new connection each: the kernel spreads them over the workers
        with httpx.Client(timeout=10) as c:
            assert c.get(srv.url + "/healthz").status_code == 200
    pids = {m.group(1) for line in log_lines(srv)
            for m in [re.search(r"\[(\d+)\] GET /healthz 200 ", line)] if m}
    assert len(pids) == 2, f"both workers should have answered: {pids}"
    for i in range(12):
        fams = fresh_scrape()
        assert sample(fams, "musehub_http_requests", "musehub_http_requests_total",
                      route="healthz", status="200") == base + n
        count = sample(fams, "musehub_http_request_duration_seconds",
                       "musehub_http_request_duration_seconds_count", route="healthz")
        inf = sample(fams, "musehub_http_request_duration_seconds",
                     "musehub_http_request_duration_seconds_bucket", route="healthz", le="+Inf")
        assert count == inf == base + n
        # Earlier scrapes are counted too, whichever worker took them.
        assert sample(fams, "musehub_http_requests", "musehub_http_requests_total",
                      route="metrics", status="200") == scrapes - 1
        assert sample(fams, "musehub_workers") == 2
        assert sample(fams, "musehub_metrics_workers", state="fresh") == 2
        assert sample(fams, "musehub_db_pool_size") == 2 * 8  # summed: the server's connections
        workers = {s.labels["worker"] for s in fams["musehub_process_resident_memory_bytes"].samples}
        assert workers == {"0", "1"}
    with httpx.Client(timeout=10) as c:
        assert c.get(srv.url + "/healthz").status_code == 200
    fams = fresh_scrape()
    assert sample(fams, "musehub_http_requests", "musehub_http_requests_total",
                  route="healthz", status="200") == base + n + 1
    srv.stop()


def test_job_duration_histogram_and_queue_depth(start_server):
    srv = start_server()
    h = srv.hub()
    r = h.create_repo(OWNER, unique("jm"))
    for i in range(2):  # two packs: GC has something to consolidate
        hist = small(f"jm{i}-{r['slug']}")
        h.push(OWNER, r["slug"], hist.pack(), f"b{i}", hist.head)
    job = h.call("POST", f"/api/repos/{r['repo_id']}/jobs", {"job_type": "mpack.gc"}, expect=(202,))
    deadline = time.monotonic() + 60
    while h.call("GET", f"/api/jobs/{job['job_id']}")["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    h.close()
    _, fams = scrape(srv.url)
    fam = fams["musehub_jobs_duration_seconds"]
    assert fam.type == "histogram"
    buckets = [(float(s.labels["le"]), s.value) for s in fam.samples
               if s.name.endswith("_bucket") and s.labels["type"] == "mpack.gc"]
    assert buckets == sorted(buckets) and all(b[1] <= c[1] for b, c in zip(buckets, buckets[1:]))
    count = sample(fams, "musehub_jobs_duration_seconds", "musehub_jobs_duration_seconds_count", type="mpack.gc")
    assert count >= 1 and buckets[-1] == (float("inf"), count)
    assert sample(fams, "musehub_jobs_duration_seconds", "musehub_jobs_duration_seconds_sum", type="mpack.gc") > 0
    assert sample(fams, "musehub_jobs_queue", type="mpack.gc", status="done") >= 1
    # The queue gauge is the database's view, not one worker's: a job
    # inserted directly (no worker picks it up: its run_after is later).
    srv.db.execute("INSERT INTO jobs (job_id, job_type, run_after) VALUES "
                   f"({sql_str(unique('j'))}, 'mpack.index', now() + interval '1 hour')")
    _, fams = scrape(srv.url)
    assert sample(fams, "musehub_jobs_queue", type="mpack.index", status="pending") == 1
    assert sample(fams, "musehub_jobs_oldest_pending_seconds", type="mpack.index", status="pending") == 0


# ---------------------------------------------------------------------------
# logs
# ---------------------------------------------------------------------------

@pytest.mark.store("fs")
def test_json_logs_every_line_with_client_and_caller(start_server, tmp_path):
    srv = start_server(dev_identity=None, MUSEHUB_LOG_FORMAT="json", MUSEHUB_TRUSTED_PROXIES="127.0.0.1")
    alice = Who(unique("alice"))
    assert alice.add(srv, tmp_path, "--admin").returncode == 0
    with alice.hub(srv) as h:
        r = h.create_repo(alice.handle, unique("logs"))
        hist = small("logs")
        h.push(alice.handle, r["slug"], hist.pack(), "main", hist.head)
        url = h.fetch(alice.handle, r["slug"], [hist.head])["mpack_url"]
        assert h.download(url)
    with httpx.Client(timeout=10) as c:
        assert c.get(srv.url + f"/{alice.handle}/{r['slug']}/refs",
                     headers={"X-Forwarded-For": "198.51.100.9, 203.0.113.7"}).status_code == 200
        assert c.get(srv.url + "/no/such/path/at/all").status_code == 404
    srv.stop()
    lines = log_lines(srv)
    objs = [json.loads(line) for line in lines]  # every line is one JSON object
    for o in objs:
        assert set(o) >= {"ts", "level", "pid", "msg"} and o["level"] in ("debug", "info", "warn", "error")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", o["ts"])
    access = [o for o in objs if o.get("event") == "access"]
    assert access and all(set(o) >= {"method", "path", "status", "bytes", "ms", "req_id", "client", "user"}
                          for o in access)
    signed = [o for o in access if o["path"] == "/api/repos" and o["method"] == "POST"]
    assert signed and signed[0]["user"] == alice.handle and signed[0]["client"] == "127.0.0.1"
    fwd = [o for o in access if o["path"].endswith("/refs")]
    assert fwd[0]["client"] == "203.0.113.7" and fwd[0]["user"] == "-"  # rightmost untrusted address
    assert any(o["path"] == "/no/such/path/at/all" and o["status"] == 404 and o["user"] == "-" for o in access)
    store = [o for o in access if o["path"].startswith("/_store/")]
    assert {o["method"] for o in store} == {"PUT", "GET"}
    text = "\n".join(lines)
    sig = re.search(r"X-Muse-Signature=([0-9a-f]+)", url).group(1)
    assert sig not in text and "X-Muse-" not in text and "Signature" not in text


def test_text_access_line_ends_with_client_and_caller(start_server):
    srv = start_server(MUSEHUB_TRUSTED_PROXIES="", dev_identity="gabriel")
    with httpx.Client(timeout=10) as c:
        c.get(srv.url + "/healthz", headers={"X-Forwarded-For": "203.0.113.7"})
        c.get(srv.url + "/readyz")
    line = [x for x in log_lines(srv) if " GET /healthz 200 " in x][0]
    # method path status bytes ms req_id client caller; X-Forwarded-For
    # from an untrusted peer is ignored.
    assert re.search(r" INFO \[\d+\] GET /healthz 200 \d+ \d+\.\d{3} [0-9a-f]{16} 127\.0\.0\.1 gabriel$", line), line


# ---------------------------------------------------------------------------
# fsck
# ---------------------------------------------------------------------------

def pushed_repo(srv, name=None, commits=4):
    h = srv.hub()
    r = h.create_repo(OWNER, name or unique("fk"))
    hist = small(r["slug"], commits=commits)
    res = h.push(OWNER, r["slug"], hist.pack(), "main", hist.head)
    h.close()
    return r, hist, res


def test_migration_0050_keeps_every_object_ref_the_packs_do_not_back(pg):
    """sql/0050 turns object_refs into a view of the packs a repository
    references. Run on a database of the shape before it, every row is
    still there afterwards: rows a referenced pack backs come from the
    view, the others (the blob only in another repository's pack, or in no
    pack at all) are kept in object_refs_kept, which the view includes."""
    from e2e_util import DB
    url = pgtmp.createdb(pg, f"m50_{unique('m').replace('-', '_')}")
    assert musehubd("migrate", env=clean_env(MUSEHUB_DATABASE_URL=url)).returncode == 0
    db = DB(url)
    db.execute("DROP VIEW object_refs; DROP TABLE object_refs_kept;"
               " CREATE TABLE object_refs (repo_id text NOT NULL, object_id text NOT NULL,"
               " PRIMARY KEY (repo_id, object_id))")
    h = lambda c: "sha256:" + c * 64  # noqa: E731
    pa, pb, x, y, z, w = h("a"), h("b"), h("1"), h("2"), h("3"), h("4")
    db.execute(f"INSERT INTO mpack_refs VALUES ('r1', '{pa}'), ('r2', '{pb}');"
               f" INSERT INTO mpack_index (object_id, mpack_id, byte_offset, byte_length) VALUES"
               f" ('{x}', '{pa}', 0, 1), ('{y}', '{pa}', 1, 1), ('{z}', '{pb}', 0, 1);"
               f" INSERT INTO object_refs VALUES ('r1', '{x}'), ('r1', '{y}'), ('r1', '{z}'), ('r1', '{w}'),"
               f" ('r2', '{z}')")
    pgtmp.psql(url, "-f", str(REPO_ROOT / "sql" / "0050_object_refs_from_packs.sql"))
    assert db.scalar("SELECT relkind FROM pg_class WHERE relname = 'object_refs'") == "v"
    held = lambda r: {o for (o,) in db.rows(f"SELECT object_id FROM object_refs WHERE repo_id = '{r}'")}  # noqa: E731
    assert held("r1") == {x, y, z, w} and held("r2") == {z}
    assert set(db.rows("SELECT repo_id, object_id FROM object_refs_kept")) == {("r1", z), ("r1", w)}
    # A blob two referenced packs hold is one row of the view.
    db.execute(f"INSERT INTO mpack_refs VALUES ('r2', '{pa}'); INSERT INTO mpack_index (object_id, mpack_id,"
               f" byte_offset, byte_length) VALUES ('{x}', '{pb}', 1, 1)")
    assert db.count("SELECT count(*) FROM object_refs WHERE repo_id = 'r2'") == 3


def test_commit_ref_probes_use_the_primary_key_whatever_the_statistics(pg):
    """sql/0051: a probe of commit_refs by its primary key is planned on
    the primary key even when the statistics do not know the repository
    (no ANALYZE since its rows came); only the graph's read of the rows
    added since a cached graph, which says `ref_seq > 0`, uses the
    (repo_id, ref_seq) index. Before, the probe could be planned on that
    narrower index and read all of the repository's refs per probe."""
    from e2e_util import DB
    url = pgtmp.createdb(pg, f"m51_{unique('m').replace('-', '_')}")
    assert musehubd("migrate", env=clean_env(MUSEHUB_DATABASE_URL=url)).returncode == 0
    db = DB(url)
    db.execute("INSERT INTO commit_refs (repo_id, commit_id) SELECT 'old', 'sha256:' || md5(g::text) || md5(g::text)"
               " FROM generate_series(1, 20000) g; ANALYZE commit_refs;"
               " INSERT INTO commit_refs (repo_id, commit_id) SELECT 'new', 'sha256:' || md5(g::text) || md5(g::text)"
               " FROM generate_series(1, 20000) g")
    probe = "\n".join(r[0] for r in db.rows(
        "EXPLAIN SELECT 1 FROM commit_refs WHERE repo_id = 'new' AND commit_id = 'sha256:' || md5('7') || md5('7')"))
    assert "commit_refs_pkey" in probe and "commit_refs_repo_seq" not in probe, probe
    since = "\n".join(r[0] for r in db.rows(
        "EXPLAIN SELECT commit_id FROM commit_refs WHERE repo_id = 'new' AND ref_seq > 39990 AND ref_seq > 0"))
    assert "commit_refs_repo_seq" in since, since


def test_fsck_clean_then_finds_what_was_broken(start_server, s3emu):
    srv = start_server(**own_store(s3emu))
    r, hist, res = pushed_repo(srv)
    other, _, _ = pushed_repo(srv)
    ok = fsck(srv)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.rstrip().endswith("fsck: clean")
    assert f"checked: 2 repositories" in ok.stdout

    rid = sql_str(r["repo_id"])
    db = srv.db
    # A branch head that names no commit, a commit ref without its row,
    # an object dropped from the repository (its index row in the
    # repository's pack: object_refs is a view of the packs a repository
    # references, sql/0050), an index row whose bytes lie past the pack's
    # end (its only record: objects is a view of the index rows, sql/0040).
    db.execute(f"UPDATE branches SET head_commit_id = 'sha256:{'e' * 64}' WHERE repo_id = {rid}")
    db.execute(f"DELETE FROM commits WHERE commit_id = {sql_str(hist.commits[0]['commit_id'])}")
    victim = db.scalar(f"SELECT object_id FROM object_refs WHERE repo_id = {rid} ORDER BY object_id LIMIT 1")
    db.execute(f"DELETE FROM mpack_index WHERE object_id = {sql_str(victim)}"
               f" AND mpack_id IN (SELECT mpack_id FROM mpack_refs WHERE repo_id = {rid})")
    assert db.count(f"SELECT count(*) FROM object_refs WHERE repo_id = {rid} AND object_id = {sql_str(victim)}") == 0
    bad = db.scalar(f"SELECT object_id FROM object_refs WHERE repo_id = {rid} ORDER BY object_id DESC LIMIT 1")
    db.execute(f"UPDATE mpack_index SET byte_offset = byte_offset + 1000000000 WHERE object_id = {sql_str(bad)}")

    out = fsck(srv)
    assert out.returncode == 1, out.stdout
    assert f"branch-head: 1" in out.stdout and f"{OWNER}/{r['slug']}: branch main: sha256:{'e' * 64}: no such commit" in out.stdout
    assert "commit-ref: 1" in out.stdout and hist.commits[0]["commit_id"] in out.stdout
    assert "snapshot-object:" in out.stdout and f"object {victim} is not referenced" in out.stdout
    # The offset moved a billion bytes on: the row's bytes always run past
    # the pack's end (a wrong length alone would be found only when the
    # blob ends the pack: nothing else records its size any more).
    assert "location: 1" in out.stdout and re.search(f"object {bad}: index row bytes \\d+\\+\\d+ lie outside pack",
                                                     out.stdout), out.stdout
    assert "fsck: " in out.stdout.splitlines()[-1] and "problem" in out.stdout.splitlines()[-1]

    # --repo limits the report to that repository; the other one is clean.
    assert fsck(srv, "--repo", f"{OWNER}/{other['slug']}").returncode == 0
    scoped = fsck(srv, "--repo", f"{OWNER}/{r['slug']}")
    assert scoped.returncode == 1 and "branch-head: 1" in scoped.stdout
    assert fsck(srv, "--repo", f"{OWNER}/no-such-repo").returncode == 2
    assert fsck(srv, "--repo", "not-a-pair").returncode == 2

    # --repair touches none of these (they are not garbage): still 1.
    rep = fsck(srv, "--repair")
    assert rep.returncode == 1 and "repaired:" not in rep.stdout
    assert db.scalar(f"SELECT head_commit_id FROM branches WHERE repo_id = {rid}") == f"sha256:{'e' * 64}"


def test_fsck_finds_a_pack_missing_from_the_store(start_server, s3emu):
    srv = start_server(**own_store(s3emu))
    r, hist, res = pushed_repo(srv)
    key = "mpacks/" + res["mpack_key"][7:]
    Store(srv).delete(key)
    out = fsck(srv)
    assert out.returncode == 1
    assert "pack-missing: 1" in out.stdout and key in out.stdout
    assert "location:" not in out.stdout  # the pack row is there: locations are fine, the bytes are not
    assert fsck(srv, "--repo", f"{OWNER}/{r['slug']}").returncode == 1


def test_fsck_repairs_orphans_past_the_grace_period(start_server, s3emu):
    srv = start_server(**own_store(s3emu))
    store = Store(srv)
    h = srv.hub()
    # 1. A staged upload whose grant expired: pushed, never unpacked.
    r = h.create_repo(OWNER, unique("orph"))
    hist = small(r["slug"])
    data = hist.pack()
    pre = h.presign(OWNER, r["slug"], hist.key, len(data))
    h.upload(pre["upload_url"], data)
    staged = srv.db.scalar(f"SELECT staging_key FROM push_grants WHERE repo_id = {sql_str(r['repo_id'])}")
    assert staged in store.keys("incoming/")
    # 2. A pack nothing references: the fetch pack built for a repository
    # that was deleted since. (Its pushed pack stays: index rows of its
    # objects still name it; fsck only notes those.)
    gone, ghist, gres = pushed_repo(srv)
    fetched = h.fetch(OWNER, gone["slug"], [ghist.head])["mpack_id"]
    h.delete_repo(gone["repo_id"])
    # 3. A pack in the store that the database never heard of.
    stray = "mpacks/" + "ab" * 32
    store.put(stray, b"not really a pack")
    # 4. A live upload, which must survive everything.
    live = h.create_repo(OWNER, unique("live"))
    lhist = small(live["slug"])
    lpre = h.presign(OWNER, live["slug"], lhist.key, len(lhist.pack()))
    h.upload(lpre["upload_url"], lhist.pack())
    live_key = srv.db.scalar(f"SELECT staging_key FROM push_grants WHERE repo_id = {sql_str(live['repo_id'])}")

    # Within the grace period (default 3600 s) nothing is a problem yet.
    srv.db.execute(f"UPDATE push_grants SET expires_at = now() - interval '1 minute' WHERE staging_key = {sql_str(staged)}")
    out = fsck(srv)
    assert out.returncode == 0, out.stdout
    assert "within the grace period" in out.stdout

    # Past it (grace 1 s): three repairable problems.
    time.sleep(2.1)
    out = fsck(srv, MUSEHUB_MPACK_GRACE_SECONDS="1")
    assert out.returncode == 1, out.stdout
    assert "upload-orphan: 1 (repairable)" in out.stdout and staged in out.stdout
    assert "pack-unreferenced: 1 (repairable)" in out.stdout and fetched[7:] in out.stdout
    assert gres["mpack_key"][7:] not in out.stdout
    assert "1 pack(s) hold only objects no repository references" in out.stdout
    assert "pack-orphan: 1 (repairable)" in out.stdout and stray in out.stdout
    assert "3 of them repairable with --repair" in out.stdout

    rep = fsck(srv, "--repair", MUSEHUB_MPACK_GRACE_SECONDS="1")
    assert rep.returncode == 0, rep.stdout + rep.stderr
    for k in (staged, stray, "mpacks/" + fetched[7:]):
        assert f"repaired: deleted {k}" in rep.stdout
        assert k not in store.keys(k.split("/")[0] + "/")
    assert srv.db.count(f"SELECT count(*) FROM mpacks WHERE mpack_id = {sql_str(fetched)}") == 0
    assert "mpacks/" + gres["mpack_key"][7:] in store.keys("mpacks/")
    assert live_key in store.keys("incoming/")  # a live grant's upload stays
    again = fsck(srv, MUSEHUB_MPACK_GRACE_SECONDS="1")
    assert again.returncode == 0 and again.stdout.rstrip().endswith("fsck: clean"), again.stdout
    # The live push still completes.
    h.unpack(OWNER, live["slug"], lhist.key, "main", lhist.head)
    h.close()
    assert fsck(srv).returncode == 0


# ---------------------------------------------------------------------------
# make install
# ---------------------------------------------------------------------------

HARDENING = ["NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
             "PrivateDevices=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
             "ProtectControlGroups=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
             "RestrictNamespaces=yes", "LockPersonality=yes", "MemoryDenyWriteExecute=yes",
             "SystemCallFilter=@system-service", "CapabilityBoundingSet="]


def unit_file(path: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            keys.setdefault(k, []).append(v)
    return keys


@pytest.mark.store("fs")
def test_make_install_into_destdir(pg, tmp_path):
    dest = tmp_path / "dest"
    r = subprocess.run(["make", "-C", str(REPO_ROOT), "--no-print-directory", "install", f"DESTDIR={dest}",
                        "PREFIX=/usr", "STATEDIR=/var/lib/musehub"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]
    binary = dest / "usr/bin/musehubd"
    unit = dest / "usr/lib/systemd/system/musehubd.service"
    env_file = dest / "etc/musehub/musehubd.env"
    assert os.access(binary, os.X_OK)
    assert subprocess.run([str(binary), "--version"], stdout=subprocess.PIPE).stdout.startswith(b"musehubd ")
    assert (dest / "etc/musehub/musehubd.env.example").exists()
    assert env_file.stat().st_mode & 0o777 == 0o600  # it will hold the database password
    assert (dest / "usr/share/doc/musehubd/operations.md").exists()
    assert (dest / "usr/share/doc/musehubd/protocol.md").exists()

    keys = unit_file(unit)
    assert keys["ExecStart"] == ["/usr/bin/musehubd serve"]
    assert keys["EnvironmentFile"] == ["/etc/musehub/musehubd.env"]
    assert keys["ReadWritePaths"] == ["/var/lib/musehub"]
    assert keys["KillSignal"] == ["SIGTERM"] and keys["RestartPreventExitStatus"] == ["2"]
    text = unit.read_text()
    for opt in HARDENING:
        assert f"\n{opt}\n" in text, opt
    assert "@" not in "".join(v for k, vs in keys.items() for v in vs if k not in ("SystemCallFilter",))

    # The example environment is valid as shipped: with a real database and
    # store in place of the placeholders, `migrate` accepts every setting.
    settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                    if line and not line.startswith("#"))
    assert settings["MUSEHUB_STORE"] == "fs:/var/lib/musehub/store"
    settings.update(MUSEHUB_DATABASE_URL=pgtmp.createdb(pg, f"inst_{unique('i').replace('-', '_')}"),
                    MUSEHUB_STORE=f"fs:{tmp_path / 'store'}")
    m = musehubd("migrate", env=clean_env(**settings))
    assert m.returncode == 0, m.stderr

    # systemd's own check, where systemd-analyze exists (Debian's `systemd`
    # package; nothing is started). Paths rebased into DESTDIR so it finds
    # the binary and the environment file.
    analyze = shutil.which("systemd-analyze")
    if analyze:
        rebased = tmp_path / "musehubd.service"
        rebased.write_text(text.replace("=/usr/bin/", f"={dest}/usr/bin/")
                               .replace("EnvironmentFile=/etc/", f"EnvironmentFile={dest}/etc/"))
        v = subprocess.run([analyze, "verify", str(rebased)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        assert v.returncode == 0 and "musehubd" not in v.stdout, v.stdout
        sec = subprocess.run([analyze, "security", "--offline=yes", str(rebased)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=60)
        level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout)
        assert level and float(level.group(1)) <= 2.0, sec.stdout[-2000:]

    # uninstall keeps the operator's environment file.
    subprocess.run(["make", "-C", str(REPO_ROOT), "--no-print-directory", "uninstall", f"DESTDIR={dest}",
                    "PREFIX=/usr"], check=True, stdout=subprocess.DEVNULL, timeout=120)
    assert not binary.exists() and not unit.exists() and env_file.exists()


# ---------------------------------------------------------------------------
# backup and restore (docs/operations.md, "Backups")
# ---------------------------------------------------------------------------

def pg_tool(tool: str, *args: str) -> None:
    subprocess.run([str(PG_BIN / tool), *args], check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   timeout=300)


@pytest.mark.slow
def test_backup_destroy_restore_round_trip(pg, start_server, tmp_path, s3emu):
    """The documented procedure: dump the database, then copy the store;
    destroy both; restore both; fsck is clean and clones are byte-identical."""
    mine = own_store(s3emu)
    srv = start_server(**mine)
    store = Store(srv)
    h = srv.hub()
    r = h.create_repo(OWNER, unique("bk"))
    base = muselib.generate(commits=30, files=40, changed=3, blob_size=200, seed=r["slug"], keep_manifests=True)
    h.push(OWNER, r["slug"], base.pack(), "main", base.head)
    more = muselib.generate(commits=5, files=40, changed=3, blob_size=200, seed=r["slug"] + "2",
                            parent=(base.head, base.manifest), first_index=30)
    h.push(OWNER, r["slug"], more.pack(), "main", more.head)
    h.call("POST", f"/api/repos/{r['repo_id']}/commits",
           {"branch": "main", "message": "server-side", "files": {"notes/readme.txt": b"hello backups"}},
           expect=(201,))
    head = h.refs(OWNER, r["slug"])["branch_heads"]["main"]
    head_snap = h.commit(OWNER, r["slug"], head)["snapshot_id"]
    before = h.clone(OWNER, r["slug"], [head])
    assert "notes/readme.txt" in before["manifests"][head_snap]
    obj = before["manifests"][head_snap]["notes/readme.txt"]
    obj_bytes = h.object(OWNER, r["slug"], obj).content
    h.close()
    assert fsck(srv).returncode == 0

    # 1. The database (pg_dump, custom format), while the server runs.
    dump = tmp_path / "musehub.dump"
    pg_tool("pg_dump", "-Fc", "-f", str(dump), "-d", srv.database_url)
    # A push lands between the two steps: its pack is in the store copy but
    # not in the dump, which is harmless (an unreferenced pack).
    late = srv.hub()
    lr = late.create_repo(OWNER, unique("late"))
    lh = small(lr["slug"])
    late.push(OWNER, lr["slug"], lh.pack(), "main", lh.head)
    late.close()
    # 2. The store: every pack (immutable, content-addressed: a plain copy).
    backup = tmp_path / "store-backup"
    for key in store.keys("mpacks/"):
        (backup / key).parent.mkdir(parents=True, exist_ok=True)
        (backup / key).write_bytes(store.get(key))
    srv.stop()

    # Destroy both.
    dbname = srv.database_url.rsplit("/", 1)[1]
    subprocess.run([str(PG_BIN / "psql"), "-X", "-q", "-d", pg, "-c", f'DROP DATABASE "{dbname}"'], check=True)
    for key in store.keys("mpacks/") + store.keys("incoming/"):
        store.delete(key)
    assert store.keys("mpacks/") == []

    # Restore: the database first, then the packs.
    url = pgtmp.createdb(pg, dbname)
    pg_tool("pg_restore", "--no-owner", "-d", url, str(dump))
    for p in sorted(backup.rglob("*")):
        if p.is_file():
            store.put(str(p.relative_to(backup)), p.read_bytes())
    restored = start_server(database=url, store_dir=srv.store_dir, **mine)

    out = fsck(restored)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "within the grace period" in out.stdout  # the late push's pack, not in the dump
    with restored.hub() as h2:
        assert h2.refs(OWNER, r["slug"])["branch_heads"]["main"] == head
        after = h2.clone(OWNER, r["slug"], [head])
        assert after["result"]["mpack_id"] == before["result"]["mpack_id"]
        assert after["data"] == before["data"]
        assert h2.object(OWNER, r["slug"], obj).content == obj_bytes
        # A fetch never asked before is built from the restored packs.
        partial = h2.clone(OWNER, r["slug"], [head], have=[base.head],
                           known_manifests={muselib.snapshot_id(base.manifest): base.manifest},
                           known_objects=set(base.manifest.values()))
        assert partial["manifests"][head_snap] == before["manifests"][head_snap]
        assert partial["result"]["commit_count"] == 6
    # Past the grace period, the late pack is the one thing --repair removes.
    time.sleep(2.1)
    g = fsck(restored, MUSEHUB_MPACK_GRACE_SECONDS="1")
    assert g.returncode == 1 and "pack-orphan: 1 (repairable)" in g.stdout, g.stdout
    assert fsck(restored, "--repair", MUSEHUB_MPACK_GRACE_SECONDS="1").returncode == 0
    assert fsck(restored, MUSEHUB_MPACK_GRACE_SECONDS="1").returncode == 0
