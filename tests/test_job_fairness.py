"""Jobs under load from one tenant (issue 9): verifies are not queued twice, claims take
turns across projects, finished jobs are pruned after a retention, and a failed job tells
its user what went wrong without the server's paths or endpoints. Against a real database
(SQLite and PostgreSQL) through the real claim, enqueue and maintenance functions."""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from blockvault.config import load_settings
from blockvault.db.models import Backup, Job, utcnow
from blockvault.db.session import Database
from blockvault.server import Services
from blockvault.service.backups import queue_job
from blockvault.service.context import RequestContext
from blockvault.service.jobs import JobRunner, finish_job
from tests.pg import pg_database
from tests.server import Server, free_port

MiB = 1024 * 1024
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite'}"
        return
    with pg_database() as url:
        yield url


def _db(url: str) -> Database:
    db = Database(url)
    db.upgrade()
    return db


def _backups(db: Database, project: str, n: int, **values) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with db.session() as s:
        for bid in ids:
            s.add(Backup(id=bid, user_id="u", project_id=project, volume_id=str(uuid.uuid4()),
                         status="available", size=1, container="volumebackups", **values))
    return ids


def _queue(db: Database, kind: str, backup_ids: list[str]) -> None:
    for bid in backup_ids:  # one transaction each: created_at orders them
        with db.session() as s:
            queue_job(s, kind, bid)


def _runner(db: Database, **kw) -> JobRunner:
    return JobRunner(db, {}, lambda s, job, reason: None, **kw)  # claims only, never started


def _project_of(db: Database, job: Job) -> str:
    with db.session() as s:
        return s.scalar(select(Backup.project_id).where(Backup.id == job.backup_id))


# -- fair claims ----------------------------------------------------------------------------------


def test_a_project_with_one_job_waits_for_one_claim_only(db_url):
    """A queues 50 verifies, then B one backup: B's job is among the first 2 claims (with
    both claims still running, as with two workers)."""
    db = _db(db_url)
    _queue(db, "verify", _backups(db, "A", 50))
    _queue(db, "create", _backups(db, "B", 1))
    runner = _runner(db)
    first, second = runner._claim(), runner._claim()
    assert first is not None and second is not None
    assert "B" in {_project_of(db, first), _project_of(db, second)}


def test_claims_go_round_the_projects(db_url):
    """One worker (each claim finished before the next): A, B, C, then A again — not A's 50
    first, in the order they were queued."""
    db = _db(db_url)
    _queue(db, "verify", _backups(db, "A", 50))
    _queue(db, "verify", _backups(db, "B", 2))
    _queue(db, "verify", _backups(db, "C", 1))
    runner = _runner(db)
    order = []
    for _ in range(6):
        job = runner._claim()
        assert job is not None
        order.append(_project_of(db, job))
        with db.session() as s:
            assert finish_job(s, job, "done")
    assert order == ["A", "B", "C", "A", "B", "A"]


def test_jobs_know_their_project_after_the_upgrade(tmp_path):
    """Jobs queued before migration 0004 take their backup's project from the backups
    table (container checks, with no backup, get '')."""
    from alembic import command
    from alembic.config import Config

    from blockvault.db.session import MIGRATIONS

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    db = Database(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection_url"] = url
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        conn.exec_driver_sql(
            "INSERT INTO backups (id, user_id, project_id, volume_id, status, metadata, "
            "num_dependent_backups, deleted, created_at) VALUES ('b1', 'u', 'P', 'v', "
            "'available', '{}', 0, 0, '2026-01-01 00:00:00')")
        for jid, bid in (("j1", "b1"), ("j2", "")):
            conn.exec_driver_sql(
                "INSERT INTO jobs (id, kind, backup_id, params, state, attempts, bytes_done, "
                f"bytes_total, created_at) VALUES ('{jid}', 'verify', '{bid}', '{{}}', "
                "'queued', 0, 0, 0, '2026-01-01 00:00:00')")
    db.upgrade()
    with db.session() as s:
        assert dict(s.execute(select(Job.id, Job.project_id)).all()) == {"j1": "P", "j2": ""}


# -- one verify at a time per backup ------------------------------------------------------------


def _services(tmp_path: Path, db_url: str) -> Services:
    return Services(load_settings(data_dir=tmp_path / "d", database_url=db_url))


def _count(db: Database, kind: str, **where) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Job).where(
            Job.kind == kind, *[getattr(Job, k) == v for k, v in where.items()]))


def test_a_queued_or_running_verify_is_not_queued_again(tmp_path, db_url):
    services = _services(tmp_path, db_url)
    db, api = services.db, services.backups
    ctx = RequestContext("u", "A")
    (bid,) = _backups(db, "A", 1)
    api.verify(ctx, bid)
    api.verify(ctx, bid)
    assert _count(db, "verify", backup_id=bid) == 1
    job = _runner(db)._claim()
    assert job is not None and job.backup_id == bid
    api.verify(ctx, bid)  # running: still the one job
    assert _count(db, "verify", backup_id=bid) == 1
    with db.session() as s:
        assert finish_job(s, job, "done")
    api.verify(ctx, bid)  # the last one finished: a new check is queued
    assert _count(db, "verify", backup_id=bid) == 2
    assert _count(db, "verify", backup_id=bid, state="queued") == 1


def _at_once(n: int, fn) -> list:
    go = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        go.wait()
        try:
            results[i] = fn()
        except Exception as exc:  # the assertion below shows it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_verifies_queue_one_job(tmp_path, db_url):
    services = _services(tmp_path, db_url)
    db, api = services.db, services.backups
    (bid,) = _backups(db, "A", 1)
    results = _at_once(8, lambda: api.verify(RequestContext("u", "A"), bid))
    assert results == [None] * 8
    assert _count(db, "verify", backup_id=bid) == 1

    admin = RequestContext("admin", "ops", is_admin=True)
    jobs = _at_once(8, lambda: api.verify_container(admin, "volumebackups"))
    assert all(isinstance(j, Job) for j in jobs), jobs
    assert {j.id for j in jobs} == {jobs[0].id}
    assert {j.params["container"] for j in jobs} == {"volumebackups"}
    assert _count(db, "verify_container") == 1
    # another container is another check
    api.verify_container(admin, "other")
    assert _count(db, "verify_container") == 2


# -- retention ------------------------------------------------------------------------------


def test_finished_jobs_are_pruned_after_the_retention(tmp_path, db_url):
    db = _db(db_url)
    (live,) = _backups(db, "A", 1)
    (gone,) = _backups(db, "A", 1, deleted=True)
    old = utcnow() - dt.timedelta(days=10)
    ids: dict[str, str] = {}

    def job(name: str, kind: str, backup: str, state: str = "done", age: int = 0,
            finished: bool = True) -> None:
        j = Job(kind=kind, backup_id=backup, state=state, tokens="t1 t2 ",
                created_at=old + dt.timedelta(seconds=age),
                finished_at=(old + dt.timedelta(seconds=age + 1)) if finished else None)
        with db.session() as s:
            s.add(j)
            s.flush()
            ids[name] = j.id

    job("queued", "verify", live, "queued", finished=False)  # queued long ago
    job("running", "restore", live, "running", finished=False)
    job("create", "create", live)                   # token log: delete cleans up with it
    job("verify_old", "verify", live, age=1)
    job("verify_last", "verify", live, age=2)        # shown by GET .../verify
    job("restore_old", "restore", live, age=3)
    job("delete_last", "delete", live, "failed", age=4)  # shown by .../progress
    job("record", "record", live, age=5)
    job("gone_create", "create", gone, age=6)
    job("gone_delete", "delete", gone, age=7)
    job("container", "verify_container", "", age=8)
    (recent,) = _backups(db, "A", 1)
    for name in ("recent_1", "recent_2"):
        with db.session() as s:
            j = Job(kind="restore", backup_id=recent, state="done", finished_at=utcnow())
            s.add(j)
            s.flush()
            ids[name] = j.id

    runner = _runner(db, retention=3 * 86400)
    runner.maintain_once()  # what the maintenance timer runs
    with db.session() as s:
        left = set(s.scalars(select(Job.id)))
    kept = {n for n, i in ids.items() if i in left}
    assert kept == {"create", "verify_last", "delete_last", "queued", "running",
                    "recent_1", "recent_2"}


def test_job_retention_is_a_setting(tmp_path, monkeypatch):
    assert load_settings(data_dir=tmp_path / "e").job_retention == 3 * 86400
    monkeypatch.setenv("BLOCKVAULT_JOB_RETENTION", "120")
    services = Services(load_settings(data_dir=tmp_path / "d"))
    assert services.runner.retention == 120


# -- fail_reason: no server paths, no endpoints -------------------------------------------------


def _leaks(text: str, *secrets: str) -> list[str]:
    found = [s for s in secrets if s and s in text]
    if "http" in text.lower():
        found.append("http")
    if any(w.startswith("/") for w in text.replace("'", " ").replace("(", " ").split()):
        found.append("an absolute path")
    return found


def _with_data(api) -> tuple[str, str]:
    vol = api.create_volume(1)
    api.write(vol, 0, os.urandom(2 * MiB))
    backup = api.create_backup(vol)
    return vol, backup


def test_server_faults_fail_without_server_paths(tmp_path):
    """The engine's cache directory is a file (a backup fails), a restore target's file is a
    directory (the restore fails): both fail_reasons say what failed, not where."""
    data = tmp_path / "data"
    srv = Server(data, {"BLOCKVAULT_GC_GRACE": "3", "BLOCKVAULT_STORE_LAG": "1"}).start()
    try:
        api = srv.client("alice", "p1")
        vol, first = _with_data(api)
        target = api.create_volume(1)
        target_file = data / "volumes" / f"{target}.raw"
        target_file.unlink()
        target_file.mkdir()
        r = api.post(f"/backups/{first}/restore", {"restore": {"volume_id": target}})
        assert r.status_code == 202, r.text
        restored = api.wait("backup", first, {"available"})
        assert api.get(f"/volumes/{target}").json()["volume"]["status"] == "error_restoring"
        assert restored["fail_reason"], restored
        assert not _leaks(restored["fail_reason"], str(tmp_path)), restored

        shutil.rmtree(data / "cache")
        (data / "cache").write_text("not a directory")
        second = api.create_backup(vol, wait=False)
        b = api.wait("backup", second, {"available", "error"})
        assert b["status"] == "error"
        assert b["fail_reason"] and not _leaks(b["fail_reason"], str(tmp_path)), b
        assert str(data / "cache") in srv.log()  # the detail went to the log
    finally:
        srv.stop()


def test_a_dead_swift_endpoint_fails_without_its_url(tmp_path):
    port = free_port()  # nothing listens there
    env = {"BLOCKVAULT_STORE": "swift",
           "BLOCKVAULT_SWIFT_AUTH_URL": f"http://127.0.0.1:{port}/auth/v1.0",
           "BLOCKVAULT_SWIFT_USER": "test:tester", "BLOCKVAULT_SWIFT_KEY": "testing",
           "BLOCKVAULT_STORE_RETRY_ATTEMPTS": "2", "BLOCKVAULT_STORE_RETRY_BUDGET": "1"}
    srv = Server(tmp_path / "data", env).start()
    try:
        api = srv.client("alice", "p1")
        vol = api.create_volume(1)
        api.write(vol, 0, os.urandom(MiB))
        backup = api.create_backup(vol, wait=False)
        b = api.wait("backup", backup, {"available", "error"}, timeout=120)
        assert b["status"] == "error"
        assert b["fail_reason"], b
        assert not _leaks(b["fail_reason"], str(port), "127.0.0.1", str(tmp_path)), b
        assert "object store" in b["fail_reason"]
    finally:
        srv.stop()


def test_a_crashing_handler_records_no_server_path(tmp_path):
    """An error outside what a handler expects (here the volume's change map cannot be
    read) still gives a fail_reason without the path, and the job's error is as clean."""
    services = Services(load_settings(data_dir=tmp_path / "d", backup_workers=1))
    ctx = RequestContext("u", "A")
    vol = services.volumes.create(ctx, 1)
    secret = str(tmp_path / "d" / "volumes" / vol.id)

    def unreadable(volume_id: str):
        raise PermissionError(errno.EACCES, "Permission denied", secret)

    services.driver.changes = unreadable
    backup = services.backups.create(ctx, vol.id)
    services.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            with services.db.session() as s:
                row = s.get(Backup, backup.id)
                job = s.scalars(select(Job).where(Job.backup_id == backup.id)).one()
            if row.status != "creating" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert row.status == "error", row.status
        assert row.fail_reason and "Permission denied" in row.fail_reason
        assert not _leaks(row.fail_reason, secret), row.fail_reason
        assert job.error and not _leaks(job.error, secret), job.error
    finally:
        services.stop()


def test_fail_reason_keeps_object_names_and_drops_endpoints():
    from blockvault.engine.errors import DataError, TargetError
    from blockvault.service.tasks import fail_reason
    from blockvault.store import StorePermanentError, StoreUnavailable

    assert "packs/1a/1a2b3c" in fail_reason(DataError("pack packs/1a/1a2b3c is missing"))
    unreachable = fail_reason(StoreUnavailable(
        "swift: GET x: HTTPConnectionPool(host='10.1.2.3', port=8080): url: /v1/AUTH_a"))
    assert unreachable == "The object store was unreachable; try again later."
    denied = fail_reason(StorePermanentError(
        "swift: GET x: 401 from https://keystone.internal:5000/v3/auth/tokens"))
    assert not _leaks(denied, "keystone.internal", "5000"), denied
    full = fail_reason(TargetError("restore target /var/lib/bv/volumes/v is full", "/var/lib",
                                   errno.ENOSPC))
    assert full == "Writing the restored data to the volume failed: No space left on device."


def test_a_stale_fail_reason_writer_is_scrubbed_too(tmp_path):
    """Whatever text reaches Tasks.fail (the runner's own reasons included) is scrubbed."""
    services = Services(load_settings(data_dir=tmp_path / "d"))
    (bid,) = _backups(services.db, "A", 1)
    with services.db.session() as s:
        s.execute(update(Backup).where(Backup.id == bid).values(status="deleting"))
        job = Job(kind="delete", backup_id=bid)
        s.add(job)
        s.flush()
        services.tasks.fail(s, job, "could not open /srv/blockvault/store/c at http://x:1/")
    with services.db.session() as s:
        reason = s.get(Backup, bid).fail_reason
    assert reason and not _leaks(reason, "/srv", "x:1"), reason
