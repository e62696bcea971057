"""Roles (issue 14): ``blockvault api`` and ``blockvault worker`` as separate real processes
sharing one database (PostgreSQL, and SQLite on one host), the object store and the volume
files; ``os-services`` from their heartbeats; graceful shutdown on real signals."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.pg import pg_database
from tests.server import Api, free_port, sha256_of_file

MiB = 1024 * 1024


class Role:
    """One ``blockvault api``/``worker`` process: its own data dir (cache, runner slot),
    the shared database, store and volume files as every host of a deployment has."""

    def __init__(self, role: str, data_dir: Path, shared: Path, db_url: str,
                 **env: str) -> None:
        self.role, self.data_dir, self.shared = role, data_dir, shared
        self.port = free_port()
        self.env = {
            "BLOCKVAULT_DATABASE_URL": db_url,
            "BLOCKVAULT_LOCAL_STORE_DIR": str(shared / "store"),
            "BLOCKVAULT_JOB_LEASE_SECONDS": "30",
            "BLOCKVAULT_REPORT_INTERVAL": "0.3",
            "BLOCKVAULT_SERVICE_DOWN_TIME": "3",
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / f"{role}.log"
        self._log_from = 0

    def config_text(self) -> str:
        # every process reaches the same volume files: one host, or a volume directory
        # shared by all (docs/deployment.md, "Routing")
        return (f'[blockvault]\n[backends.rawfile]\ndriver = "raw"\n'
                f'root = "{self.shared / "volumes"}"\n')

    def start(self) -> Role:
        return self.launch().ready()

    def launch(self) -> Role:
        """Start the process (without waiting for it: see ready())."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "blockvault.toml"
        config.write_text(self.config_text())
        args = ["--config", str(config), "--data-dir", str(self.data_dir)]
        if self.role == "api":
            args += ["--port", str(self.port)]
        # a restart appends to the same log: only what this process writes counts
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blockvault.cli", self.role, *args],
            env={**os.environ, **self.env}, stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT)
        return self

    def ready(self) -> Role:
        assert self.proc is not None
        deadline = time.monotonic() + 30
        ready = "listening on" if self.role == "api" else "running ("
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            if ready in self.log()[self._log_from:]:
                if self.role == "worker":
                    return self
                try:
                    if httpx.get(self.url + "/", timeout=1).status_code == 300:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"{self.role} did not start:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, user: str = "alice", project: str = "proja") -> Api:
        return Api(self.url, user, project, data_dir=self.shared)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        # several processes on one SQLite file: one host only (docs/deployment.md)
        yield f"sqlite:///{tmp_path / 'shared.sqlite'}"
        return
    with pg_database() as url:
        yield url


@pytest.fixture
def deployment(tmp_path, db_url):
    started: list[Role] = []

    def start(role: str, name: str, **env: str) -> Role:
        proc = Role(role, tmp_path / name, tmp_path / "shared", db_url, **env).start()
        started.append(proc)
        return proc

    start.db_url = db_url  # type: ignore[attr-defined]
    yield start
    for proc in started:
        proc.stop()


def db_rows(url: str, sql: str, **params) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return list(c.execute(text(sql), params))
    finally:
        engine.dispose()


def volume_path(api: Api, volume_id: str) -> Path:
    return api.data_dir / "volumes" / f"{volume_id}.raw"


def fill(api: Api, volume_id: str, mib: int, seed: int) -> None:
    """Compressible but not trivially so: zstd at a high level works hard on it."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(3, 9)))
             for _ in range(4000)]
    for i in range(mib):
        chunk = b" ".join(rng.choice(words) for _ in range(MiB // 5))[:MiB]
        api.write(volume_id, i * MiB, chunk.ljust(MiB, b"."))


def services(admin: Api, **params: str) -> dict[tuple[str, str], dict]:
    r = admin.get("/os-services", params=params)
    assert r.status_code == 200, r.text
    return {(s["binary"], s["host"]): s for s in r.json()["services"]}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_api_and_worker_split(deployment):
    api = deployment("api", "api")
    worker = deployment("worker", "worker1")
    alice, admin = api.client(), api.client("admin", "admin")

    vol = alice.create_volume(1)
    fill(alice, vol, 4, seed=1)
    before = sha256_of_file(volume_path(alice, vol))
    backup = alice.create_backup(vol)
    # run by the worker process: the job's owner is the runner whose pid is the worker's
    owners = db_rows(deployment.db_url,
                     "SELECT j.owner, r.pid, r.host, r.binary FROM jobs j JOIN runners r "
                     "ON r.owner = j.owner WHERE j.backup_id = :b AND j.kind = 'create'",
                     b=backup)
    assert len(owners) == 1 and owners[0][1] == worker.proc.pid, owners
    assert owners[0][3] == "cinder-backup"
    target = alice.restore(backup)
    assert sha256_of_file(volume_path(alice, target)) == before

    # os-services: both, up; the worker's row names the backends it reaches
    listed = services(admin)
    host = owners[0][2]
    assert listed[("cinder-api", host)]["state"] == "up"
    assert listed[("cinder-backup", host)]["state"] == "up"
    entry = listed[("cinder-backup", host)]
    assert entry["status"] == "enabled" and entry["disabled_reason"] is None
    assert entry["zone"] == "nova" and entry["updated_at"]
    backends = db_rows(deployment.db_url, "SELECT backends FROM runners WHERE owner = :o",
                       o=owners[0][0])[0][0]
    assert f"{host}@rawfile" in (backends if isinstance(backends, list) else str(backends))
    # Cinder's filters
    assert set(services(admin, binary="cinder-api")) == {("cinder-api", host)}
    assert services(admin, host="no-such-host") == {}
    # v2 too; admins only (Cinder's volume_extension:services:index)
    v2 = Api(api.url, "admin", "admin", "v2")
    assert v2.get("/os-services").status_code == 200
    r = alice.get("/os-services")
    assert r.status_code == 403, r.text
    assert "forbidden" in r.json()

    # an idle worker stops promptly on SIGTERM, exit status 0; then it is listed down
    worker.signal(signal.SIGTERM)
    started = time.monotonic()
    assert worker.wait(15) == 0, worker.log()
    assert time.monotonic() - started < 10
    assert "blockvault worker stopped" in worker.log()
    wait_for(lambda: services(admin)[("cinder-backup", host)]["state"] == "down", 10,
             "the stopped worker to be listed down")
    assert services(admin)[("cinder-api", host)]["state"] == "up"


def test_sigterm_hands_back_a_running_backup(deployment):
    slow = {"BLOCKVAULT_ZSTD_LEVEL": "19", "BLOCKVAULT_ENGINE_WORKERS": "1",
            "BLOCKVAULT_SHUTDOWN_TIMEOUT": "1"}
    api = deployment("api", "api")
    first = deployment("worker", "worker1", **slow)
    alice = api.client()
    vol = alice.create_volume(1)
    fill(alice, vol, 48, seed=2)
    before = sha256_of_file(volume_path(alice, vol))
    backup = alice.create_backup(vol, wait=False)

    def running():
        rows = db_rows(deployment.db_url,
                       "SELECT state, owner, attempts FROM jobs WHERE backup_id = :b",
                       b=backup)
        return rows and rows[0][0] == "running" and rows[0]

    wait_for(running, 30, "the backup to start")
    time.sleep(1.0)  # well into the volume
    assert alice.get(f"/backups/{backup}").json()["backup"]["status"] == "creating"
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0, first.log()
    assert "handed back to the queue" in first.log()
    state = db_rows(deployment.db_url,
                    "SELECT state, owner, attempts FROM jobs WHERE backup_id = :b", b=backup)
    assert state == [("queued", None, 1)], state
    # never stuck: a second worker takes it over at once and finishes it
    second = deployment("worker", "worker2")
    b = alice.wait("backup", backup, {"available", "error"}, timeout=180)
    assert b["status"] == "available", b
    rows = db_rows(deployment.db_url,
                   "SELECT j.state, j.attempts, r.pid FROM jobs j JOIN runners r "
                   "ON r.owner = j.owner WHERE j.backup_id = :b AND j.kind = 'create'",
                   b=backup)
    assert rows == [("done", 2, second.proc.pid)], rows
    target = alice.restore(backup)
    assert sha256_of_file(volume_path(alice, target)) == before
