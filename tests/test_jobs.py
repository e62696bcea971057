"""The job runner's safety: fencing of stale attempts, leases on the DB's clock, storage ids
per attempt, imports that own their data, workers that survive a failing DB, a restarted
process taking its own jobs back, and parent/child decisions that serialise (DESIGN "Jobs
and states")."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

import blockvault.service.jobs as jobs_mod
import blockvault.service.tasks as tasks_mod
from blockvault.config import load_settings
from blockvault.db.models import Backup, Job, Volume, utcnow
from blockvault.engine import Engine, EngineConfig
from blockvault.server import Services
from blockvault.service.context import RequestContext
from blockvault.service.jobs import JobRunner
from blockvault.service.tasks import Tasks
from tests.server import Server

MiB = 1024 * 1024
GiB = 1024**3
PG = os.environ.get("BLOCKVAULT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_database() -> tuple[str, object]:
    psycopg = pytest.importorskip("psycopg")
    name = f"bv_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG}: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)

    def drop() -> None:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()

    return f"{base}/{name}", drop


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite'}"
        return
    url, drop = _pg_database()
    yield url
    drop()


@pytest.fixture
def pg_url():
    url, drop = _pg_database()
    yield url
    drop()


def _wait(cond, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- a clock that is wrong for one runner only ---------------------------------------------------


@pytest.fixture
def skew(monkeypatch):
    """``skew(prefix, seconds)``: the wall clock of every thread whose name starts with
    ``prefix`` (one runner's threads) is off by ``seconds``. Whatever a runner would take
    from its own clock (``utcnow`` in the job code) is then wrong for that runner."""
    offsets: dict[str, float] = {}
    real = utcnow

    def clock() -> dt.datetime:
        name = threading.current_thread().name
        for prefix, off in offsets.items():
            if name.startswith(prefix):
                return real() + dt.timedelta(seconds=off)
        return real()

    for mod in (jobs_mod, tasks_mod):
        monkeypatch.setattr(mod, "utcnow", clock, raising=False)

    def set_skew(prefix: str, seconds: float) -> None:
        offsets[prefix] = seconds

    return set_skew


def test_a_skewed_clock_never_steals_a_live_lease(db_url, tmp_path, skew):
    """Runner B's clock is 40 s fast: it must not take a job whose lease runner A keeps
    renewing (leases are judged by the database's clock)."""
    services = Services(load_settings(data_dir=tmp_path / "d", database_url=db_url))
    calls: list[str] = []

    def slow(job: Job) -> None:
        calls.append(threading.current_thread().name)
        time.sleep(4)

    def runner(name: str) -> JobRunner:
        return JobRunner(services.db, {"verify": slow}, lambda s, j, r: None, workers=1,
                         lease_seconds=1, poll_seconds=0.05, name=name)

    skew("B-", 40)
    a, b = runner("A"), runner("B")
    try:
        with services.db.session() as s:
            job = Job(kind="verify", backup_id=str(uuid.uuid4()), params={})
            s.add(job)
            s.flush()
            job_id = job.id
        a.start()
        _wait(lambda: calls, what="A to claim the job")
        b.start()

        def finished():
            with services.db.session() as s:
                return s.get(Job, job_id).state in ("done", "failed")

        _wait(finished, 30, "the job to finish")
        with services.db.session() as s:
            row = s.get(Job, job_id)
            assert (row.state, row.attempts) == ("done", 1)
        assert calls == ["A-worker-0"]
    finally:
        a.stop()
        b.stop()
        services.db.dispose()


class PausingEngine:
    """An engine whose backups stop after their work, before returning (the worker was
    paused, e.g. SIGSTOP or a long GC pause, right before recording the outcome)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.finished = threading.Event()
        self.resume = threading.Event()
        self.ids: list[str] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def backup(self, **kw):
        self.ids.append(kw["backup_id"])
        result = self._engine.backup(**kw)
        self.finished.set()
        assert self.resume.wait(120)
        return result


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def test_a_stale_attempt_changes_nothing(db_url, tmp_path, skew):
    """Attempt A's worker is paused past its lease (no heartbeat) with its backup done; B
    takes over. When A wakes up — while B's attempt is still running — its outcome write
    changes nothing: the backup stays creating, the job stays B's, A's objects are
    discarded. B then records its own backup, which restores byte-exact. A's clock is off
    by 40 s too, which must not matter."""
    settings = load_settings(data_dir=tmp_path / "d", database_url=db_url)
    services = Services(settings)
    ctx = RequestContext("alice", "p1")
    vol = services.volumes.create(ctx, 1)
    data = os.urandom(6 * MiB)
    with open(services.driver.volume_path(vol.id), "r+b") as f:
        f.write(data)
        f.seek(700 * MiB)
        f.write(data[:MiB])
    want = _sha256(services.driver.volume_path(vol.id))

    engines = {}

    def runner(name: str, heartbeat: bool) -> JobRunner:
        engine = PausingEngine(Engine(services.backend, tmp_path / f"cache-{name}",
                                      EngineConfig()))
        engines[name] = engine
        tasks = Tasks(services.db, engine, services.driver, default_container="volumebackups",
                      availability_zone="nova", service_name="svc", host=name)
        r = JobRunner(services.db, tasks.handlers(), tasks.fail, workers=1, lease_seconds=1,
                      poll_seconds=0.05, on_end=tasks.on_end, name=name)
        tasks.bind(r)
        if not heartbeat:
            r._heartbeat = lambda: None  # a paused process renews nothing
        return r

    skew("A-", -40)
    a, b = runner("A", heartbeat=False), runner("B", heartbeat=True)
    try:
        backup = services.backups.create(ctx, vol.id)
        a.start()
        assert engines["A"].finished.wait(60)
        b.start()
        assert engines["B"].finished.wait(60)
        sid_a, sid_b = engines["A"].ids[0], engines["B"].ids[0]
        assert sid_a != sid_b
        with services.db.session() as s:
            job = s.scalars(select(Job).where(Job.backup_id == backup.id)).one()
            b_token = job.token
            assert job.attempts == 2 and job.state == "running" and job.owner == b.owner
        # A wakes up and tries to record its outcome.
        engines["A"].resume.set()
        _wait(lambda: not a._running, 30, "A's attempt to end")
        with services.db.session() as s:
            row = s.get(Backup, backup.id)
            job = s.get(Job, job.id)
            assert (row.status, row.service_metadata) == ("creating", None)
            assert (job.state, job.token) == ("running", b_token)
            assert s.get(Volume, vol.id).status == "backing-up"
        c = services.backend.open("volumebackups", create=False)
        assert not services.engine.has_backup(container="volumebackups", backup_id=sid_a)
        assert c.head(f"records/{sid_a}") is None
        # B records its own backup.
        engines["B"].resume.set()
        _wait(lambda: services.backups.get(ctx, backup.id).status != "creating", 30,
              "B's outcome")
        row = services.backups.get(ctx, backup.id)
        assert (row.status, row.service_metadata) == ("available", sid_b)
        with services.db.session() as s:
            assert s.get(Volume, vol.id).status == "available"
            assert s.get(Job, job.id).state == "done"
        target = tmp_path / "restored.raw"
        with open(target, "wb") as f:
            f.truncate(GiB)
        services.engine.restore(container="volumebackups", backup_id=sid_b, target=target,
                                target_is_new=True)
        assert _sha256(target) == want
    finally:
        for e in engines.values():
            e.resume.set()
        a.stop()
        b.stop()
        services.db.dispose()


# -- a restarted process takes its own jobs back at once -------------------------------------


def _busy_volume(api, mib: int = 192) -> str:
    vol = api.create_volume(1)
    for i in range(0, mib, 32):  # incompressible data: a backup takes a moment
        api.write(vol, i * 2 * MiB, os.urandom(32 * MiB))
    return vol


def _job_state(api, backup: str) -> str | None:
    return api.get(f"/backups/{backup}/progress").json()["progress"]["job_state"]


def test_a_restarted_process_takes_its_jobs_back_at_once(tmp_path):
    """With a 10-minute lease, a job killed with its process is re-run right after the
    restart (the runner's identity is stable), not 10 minutes later."""
    srv = Server(tmp_path / "bv", {"BLOCKVAULT_JOB_LEASE_SECONDS": "600"}).start()
    try:
        api = srv.client("alice", "p1")
        vol = _busy_volume(api)
        h = api.volume_sha256(vol)
        backup = api.create_backup(vol, wait=False)
        _wait(lambda: _job_state(api, backup) == "running", 30, "the backup to start")
        srv.stop(kill=True)
        srv.start()
        b = api.wait("backup", backup, {"available", "error"}, timeout=60)
        assert b["status"] == "available", b
        assert api.get(f"/volumes/{vol}").json()["volume"]["status"] == "available"
        assert api.volume_sha256(api.restore(backup)) == h
    finally:
        srv.stop()


def test_two_processes_on_one_data_dir_have_distinct_identities(tmp_path):
    from blockvault.service.jobs import stable_identity

    first, fd1 = stable_identity(tmp_path)
    second, fd2 = stable_identity(tmp_path)
    assert first != second
    os.close(fd1)
    again, fd3 = stable_identity(tmp_path)  # the first one's slot, free again
    assert again == first
    os.close(fd2)
    os.close(fd3)
