"""The job runner's safety: fencing of stale attempts, leases on the DB's clock, storage ids
per attempt, imports that own their data, workers that survive a failing DB, a restarted
process taking its own jobs back, and parent/child decisions that serialise (DESIGN "Jobs
and states")."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
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
from tests.pg import pg_database
from tests.server import Server

MiB = 1024 * 1024
GiB = 1024**3
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite'}"
        return
    with pg_database() as url:
        yield url


@pytest.fixture
def pg_url():
    with pg_database() as url:
        yield url


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


def test_a_queued_job_wakes_an_idle_worker_while_another_is_busy(tmp_path):
    """With a 30 s poll, only wake() can start a job soon. The first job wakes one worker
    (which then stays busy); the second wakes the other, which must not sleep through it.
    One worker is woken per job (not every worker, which would only race the first for
    the same row), so a wake that reached no idle worker would leave the job queued."""
    services = Services(load_settings(data_dir=tmp_path / "d"))
    started: dict[str, str] = {}
    release = threading.Event()

    def hold(job: Job) -> None:
        started[job.id] = threading.current_thread().name
        assert release.wait(60)

    runner = JobRunner(services.db, {"verify": hold}, lambda s, j, r: None, workers=2,
                       poll_seconds=30, name="W")

    def queue() -> str:
        with services.db.session() as s:
            job = Job(kind="verify", backup_id=str(uuid.uuid4()), params={})
            s.add(job)
            s.flush()
            job_id = job.id
        runner.wake()
        return job_id

    try:
        runner.start()
        time.sleep(0.5)  # both workers found the queue empty and sleep (up to 30 s)
        first = queue()
        _wait(lambda: first in started, 5, "a worker to take the first job")
        second = queue()
        _wait(lambda: second in started, 5, "the idle worker to take the second job")
        assert started[first] != started[second]
        release.set()

        def ended() -> bool:
            with services.db.reader() as s:
                return all(s.get(Job, j).state == "done" for j in (first, second))

        _wait(ended, 10, "both jobs to finish")
    finally:
        release.set()
        runner.stop()
        services.db.dispose()


def test_a_short_backup_records_its_progress_with_its_outcome(tmp_path):
    """A job writes no progress in its first second (a dirty-bitmap incremental is over
    sooner); what it last reported is written with its outcome, so the progress resource
    of a finished backup or restore shows all of it done."""
    srv = Server(tmp_path / "bv").start()
    try:
        api = srv.client("alice", "p1")
        vol = api.create_volume(1)
        api.write(vol, 3 * MiB, os.urandom(MiB))
        backup = api.create_backup(vol)
        p = api.get(f"/backups/{backup}/progress").json()["progress"]
        assert (p["operation"], p["job_state"], p["phase"]) == ("create", "done", "backup")
        assert p["bytes_done"] == p["bytes_total"] == GiB
        api.restore(backup, vol)
        p = api.get(f"/backups/{backup}/progress").json()["progress"]
        assert (p["operation"], p["job_state"], p["phase"]) == ("restore", "done", "restore")
        assert p["bytes_done"] == p["bytes_total"] == GiB
    finally:
        srv.stop()


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


# -- workers survive a DB that refuses writes ------------------------------------------------


def _private_tmpfs(mountpoint: Path, size: str) -> list[str]:
    """A command prefix running the server in a mount namespace of its own, with a small
    tmpfs at ``mountpoint`` (no privileges needed: a user namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {mountpoint}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private tmpfs here: {probe.stderr.decode().strip()}")
    return ["unshare", "-rm", "sh", "-c",
            f'mount -t tmpfs -o size={size} tmpfs {mountpoint} && exec "$@"', "sh"]


def _health(srv: Server) -> tuple[int, dict]:
    r = httpx.get(srv.url + "/healthcheck", timeout=60)
    return r.status_code, r.json()


def test_workers_survive_a_full_disk(tmp_path):
    """The DB's filesystem fills up while two backups run, so their outcome writes fail.
    The workers live on: /healthcheck says 503 while the DB refuses writes, both backups
    end in a final status once space is freed, their volumes go back to available, and new
    jobs run."""
    mnt = tmp_path / "dbfs"
    mnt.mkdir()
    prefix = _private_tmpfs(mnt, "24m")
    env = {"BLOCKVAULT_DATABASE_URL": f"sqlite:///{mnt}/bv.sqlite"}
    srv = Server(tmp_path / "bv", env, prefix=prefix).start()
    try:
        assert _health(srv) == (200, {"status": "ok", "workers_alive": 2, "workers": 2})
        api = srv.client("alice", "p1")
        vols = [_busy_volume(api, 160) for _ in range(2)]
        backups = [api.create_backup(v, wait=False) for v in vols]
        _wait(lambda: all(_job_state(api, b) == "running" for b in backups), 30,
              "both backups to run")
        # Fill the DB's filesystem. Emptying the WAL first makes every write need space.
        root = Path(f"/proc/{srv.proc.pid}/root")
        db = sqlite3.connect(root / str(mnt).lstrip("/") / "bv.sqlite", timeout=30)
        _wait(lambda: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0,
              30, "a WAL checkpoint")
        db.close()
        filler = root / str(mnt).lstrip("/") / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(bytes(MiB))
                    f.flush()
            except OSError:
                pass
        # Both backups' work ends and their outcome cannot be written.
        _wait(lambda: _health(srv)[0] == 503, 60, "the health check to see the fault")
        code, body = _health(srv)
        assert body["status"] == "unhealthy"
        assert any("database" in p for p in body["problems"]), body
        time.sleep(8)  # past the backups' engine work and the test lease (6 s)
        for b in backups:
            assert api.get(f"/backups/{b}").json()["backup"]["status"] == "creating"
        assert "ERROR" in srv.log()
        filler.unlink()
        for b, v in zip(backups, vols, strict=True):
            final = api.wait("backup", b, {"available", "error"}, timeout=60)
            if final["status"] == "error":
                assert final["fail_reason"], final
            assert api.get(f"/volumes/{v}").json()["volume"]["status"] == "available"
        _wait(lambda: _health(srv)[0] == 200, 30, "the health check to recover")
        assert _health(srv)[1]["workers_alive"] == 2
        # new jobs run
        more = api.create_backup(vols[0])
        assert api.get(f"/backups/{more}").json()["backup"]["status"] == "available"
    finally:
        srv.stop()


# -- imports own their data ------------------------------------------------------------------


def _verified(api, backup: str) -> dict:
    assert api.post(f"/backups/{backup}/verify").status_code == 202
    return _wait(lambda: (v := api.get(f"/backups/{backup}/verify").json()["verification"])
                 ["state"] in ("ok", "failed") and v, 60, "the verification")


def test_an_import_under_the_original_id_owns_its_data(tmp_path):
    """A DR drill: deployment B (its own DB) imports A's backup under its original id from
    the same store, then deletes it. A's backup still restores byte-exact and verifies."""
    env = {"BLOCKVAULT_LOCAL_STORE_DIR": str(tmp_path / "store")}
    a = Server(tmp_path / "a", env).start()
    b = Server(tmp_path / "b", env).start()
    try:
        api = a.client("alice", "p1")
        vol = api.create_volume(1)
        api.write(vol, 0, os.urandom(3 * MiB))
        api.write(vol, 500 * MiB, os.urandom(MiB))
        h = api.volume_sha256(vol)
        backup = api.create_backup(vol, name="drill")
        rec = a.client("admin", "admin").get(f"/backups/{backup}/export_record").json()
        admin_b = b.client("admin", "admin")
        r = admin_b.post("/backups/import_record", {"backup-record": rec["backup-record"]})
        assert r.status_code == 201, r.text
        assert admin_b.wait("backup", backup, {"available", "error"})["status"] == "available"
        assert admin_b.volume_sha256(admin_b.restore(backup)) == h
        assert admin_b.delete(f"/backups/{backup}").status_code == 202
        admin_b.wait("backup", backup, {"deleted"})
        # A is untouched
        assert _verified(api, backup)["state"] == "ok"
        assert api.volume_sha256(api.restore(backup)) == h
    finally:
        a.stop()
        b.stop()


def test_an_imported_size_is_the_data_s_not_the_record_s(server, admin):
    """A record claiming another size than its data covers is refused with a reason (a
    restore would otherwise write past the volume it creates); the size an import takes is
    the manifest's, rounded up to GiB."""
    vol = admin.create_volume(2)
    admin.write(vol, 0, os.urandom(MiB))
    backup = admin.create_backup(vol)
    rec = admin.get(f"/backups/{backup}/export_record").json()["backup-record"]
    record = json.loads(base64.b64decode(rec["backup_url"]))
    for size in (1, 3):
        record.update(id=str(uuid.uuid4()), size=size)
        url = base64.b64encode(json.dumps(record).encode()).decode()
        r = admin.post("/backups/import_record", {"backup-record": {
            "backup_service": rec["backup_service"], "backup_url": url}})
        assert r.status_code == 201, r.text
        b = admin.wait("backup", record["id"], {"available", "error"})
        assert b["status"] == "error", b
        assert "size" in b["fail_reason"] and "does not match" in b["fail_reason"], b
    record.update(id=str(uuid.uuid4()), size=2)
    url = base64.b64encode(json.dumps(record).encode()).decode()
    r = admin.post("/backups/import_record", {"backup-record": {
        "backup_service": rec["backup_service"], "backup_url": url}})
    b = admin.wait("backup", record["id"], {"available", "error"})
    assert (b["status"], b["size"]) == ("available", 2), b


# -- a parent and its incremental ----------------------------------------------------------------


def test_a_parent_cannot_be_deleted_under_a_new_incremental(tmp_path, pg_url):
    """Two processes on PostgreSQL: deleting a backup and creating an incremental on it at
    the same moment. Exactly one of them wins; never a child whose parent is deleted."""
    env = {"BLOCKVAULT_DATABASE_URL": pg_url}
    a = Server(tmp_path / "shared", env).start()  # one host: volumes and store shared
    b = Server(tmp_path / "shared", env)
    b.log_path = tmp_path / "b.log"
    b.start()
    try:
        outcomes = []
        for i in range(16):
            # a project and volume of its own each round: the parent is the only candidate
            project = uuid.uuid4().hex
            api_a, api_b = a.client("alice", project), b.client("alice", project)
            vol = api_a.create_volume(1)
            api_a.write(vol, 0, os.urandom(64 * 1024))
            parent = api_a.create_backup(vol)
            go = threading.Barrier(2)
            res: dict[str, httpx.Response] = {}

            def delete(api=api_a, parent=parent, go=go, res=res, lag=i * 0.002) -> None:
                go.wait()
                time.sleep(lag)  # a create takes longer: sweep the delete across it
                res["delete"] = api.delete(f"/backups/{parent}")

            def child(api=api_b, vol=vol, go=go, res=res) -> None:
                go.wait()
                res["create"] = api.post("/backups", {"backup": {
                    "volume_id": vol, "incremental": True}})

            threads = [threading.Thread(target=delete), threading.Thread(target=child)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            codes = (res["delete"].status_code, res["create"].status_code)
            outcomes.append(codes)
            assert codes in ((202, 400), (400, 202)), [r.text for r in res.values()]
            if codes == (400, 202):
                assert res["delete"].json()["badRequest"]["message"] == (
                    "Invalid backup: Incremental backups exist for this backup.")
                new = res["create"].json()["backup"]["id"]
                child_b = api_a.wait("backup", new, {"available", "error"})
                assert child_b["status"] == "available", child_b
                assert api_a.get(f"/backups/{parent}").json()["backup"]["has_dependent_backups"]
            else:
                assert "No backups available" in res["create"].text
                api_a.wait("backup", parent, {"deleted"})
    finally:
        a.stop()
        b.stop()


# -- garbage collection is owed, not skipped ----------------------------------------------------


def test_a_cancelled_backup_s_packs_are_collected(tmp_path):
    """A backup force-deleted while it runs leaves packs nobody references; the container
    is owed a collection and the maintenance timer collects it (condemned, then swept a
    grace period later) without anything else happening."""
    env = {"BLOCKVAULT_GC_GRACE": "10", "BLOCKVAULT_STORE_LAG": "1",
           "BLOCKVAULT_MAINTENANCE_INTERVAL": "0.5"}
    srv = Server(tmp_path / "bv", env).start()
    try:
        api, admin = srv.client("alice", "p1"), srv.client("admin", "admin")
        vol = _busy_volume(api, 256)
        backup = api.create_backup(vol, wait=False)
        packs_dir = tmp_path / "bv" / "store" / "volumebackups"
        _wait(lambda: list(packs_dir.rglob("packs/*/*")), 60, "the backup to upload packs")
        r = admin.post(f"/backups/{backup}/action", {"os-force_delete": {}})
        assert r.status_code == 202, r.text
        api.wait("backup", backup, {"deleted"}, timeout=60)
        assert api.get(f"/volumes/{vol}").json()["volume"]["status"] == "available"
        _wait(lambda: not list(packs_dir.rglob("packs/*/*")), 90, "the packs to be collected")
        assert list(packs_dir.rglob("manifests/*")) == []
    finally:
        srv.stop()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_health_names_a_dead_worker_pool(tmp_path):
    """No worker thread alive: 503 with the problem named (and an ERROR logged); the
    maintenance timer starts new workers and the check is 200 again."""
    from starlette.testclient import TestClient

    from blockvault.server import create_app

    settings = load_settings(data_dir=tmp_path / "d", backup_workers=2,
                             maintenance_interval=3600)
    services = Services(settings)
    services.start()
    try:
        client = TestClient(create_app(services, manage_lifecycle=False))
        assert client.get("/healthcheck").status_code == 200
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        alive = services.runner._workers
        services.runner._workers = [dead, dead]  # as if both workers had died
        r = client.get("/healthcheck")
        assert r.status_code == 503
        assert r.json()["problems"] == ["no worker thread is alive"]
        assert r.json()["workers_alive"] == 0
        services.runner.maintain_once()  # what the maintenance timer does
        assert client.get("/healthcheck").status_code == 200
        assert services.runner.alive_workers() == 2
        services.runner._workers += alive  # let stop() join the originals too
    finally:
        services.stop()


def test_a_lease_extension_racing_the_end_of_its_job_loses_nothing(tmp_path, caplog):
    """The heartbeat copies the running attempts, then extends their leases: an attempt
    that finished in between matches no row, and is not a lost lease (no warning, not
    marked lost). One whose job another attempt took over is."""
    services = Services(load_settings(data_dir=tmp_path / "d"))
    runner = JobRunner(services.db, {}, lambda s, j, r: None, workers=1)
    try:
        with services.db.session() as s:
            finished = Job(kind="verify", backup_id=str(uuid.uuid4()), params={},
                           state="done", token="mine")
            taken = Job(kind="verify", backup_id=str(uuid.uuid4()), params={},
                        state="running", token="theirs")
            s.add_all([finished, taken])
            s.flush()
            ids = finished.id, taken.id
        flags = {job_id: threading.Event() for job_id in ids}
        runner._running.update({job_id: ("mine", flags[job_id]) for job_id in ids})
        with caplog.at_level("WARNING", logger="blockvault.jobs"):
            runner.extend_leases()
        assert not flags[ids[0]].is_set()
        assert flags[ids[1]].is_set()
        warned = [r.getMessage() for r in caplog.records if "lost its lease" in r.getMessage()]
        assert warned == [f"job {ids[1]}: this attempt lost its lease"], warned
    finally:
        services.db.dispose()
