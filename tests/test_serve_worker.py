"""``blockvault serve`` runs its jobs in a child ``blockvault worker``
(blockvault.worker_process), not in the API's interpreter: the child runs them, is started
again when it dies and takes its jobs back at once, and never outlives ``serve``;
``/healthcheck`` says while it is down."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import httpx

from tests.server import Server
from tests.test_roles import wait_for

MiB = 1024 * 1024


def worker_pids(server_pid: int) -> list[int]:
    """The serve process's ``blockvault worker`` children."""
    found = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"worker" in cmdline:
                found.append(int(pid))
    return found


def health(srv: Server) -> tuple[int, dict]:
    r = httpx.get(srv.url + "/healthcheck", timeout=60)
    return r.status_code, r.json()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_jobs_run_in_a_worker_process_started_again_when_killed(tmp_path):
    # a 10-minute lease: the backup finishing soon after the kill shows the new worker took
    # it back at once (same data dir, same runner identity), not after the lease
    srv = Server(tmp_path / "bv", {"BLOCKVAULT_JOB_LEASE_SECONDS": "600"}).start()
    try:
        (child,) = wait_for(lambda: worker_pids(srv.proc.pid), 30, "the worker process")
        wait_for(lambda: health(srv)[0] == 200, 30, "the worker to be healthy")
        assert health(srv)[1] == {"status": "ok", "workers_alive": 2, "workers": 2}

        api = srv.client("alice", "p1")
        vol = api.create_volume(1)
        for i in range(0, 192, 32):  # incompressible: the backup takes a moment
            api.write(vol, i * 2 * MiB, os.urandom(32 * MiB))
        before = api.volume_sha256(vol)
        backup = api.create_backup(vol, wait=False)
        wait_for(lambda: api.get(f"/backups/{backup}/progress").json()["progress"]
                 ["job_state"] == "running", 30, "the backup to run")
        with sqlite3.connect(srv.data_dir / "blockvault.sqlite") as db:
            ran_by = db.execute("SELECT r.pid FROM jobs j JOIN runners r ON r.owner = j.owner "
                                "WHERE j.backup_id = ? AND j.kind = 'create'",
                                (backup,)).fetchall()
        assert ran_by == [(child,)], (ran_by, child, srv.proc.pid)

        os.kill(child, signal.SIGKILL)
        code, body = wait_for(lambda: (h := health(srv))[0] == 503 and h, 10,
                              "the health check to see the worker gone")
        assert body["problems"] == ["the worker process is not running (restarting)"], body
        (again,) = wait_for(lambda: [p for p in worker_pids(srv.proc.pid) if p != child],
                            30, "a new worker process")
        final = api.wait("backup", backup, {"available", "error"}, timeout=120)
        assert final["status"] == "available", final
        assert health(srv) == (200, {"status": "ok", "workers_alive": 2, "workers": 2})
        target = api.restore(backup)
        assert api.volume_sha256(target) == before
        assert f"worker process {child} exited (killed by SIGKILL)" in srv.log()
        assert f"worker process {again} started" in srv.log()
    finally:
        srv.stop()


def test_the_worker_process_never_outlives_serve(tmp_path):
    srv = Server(tmp_path / "bv").start()
    (child,) = wait_for(lambda: worker_pids(srv.proc.pid), 30, "the worker process")
    wait_for(lambda: "blockvault worker" in srv.log() and "running (" in srv.log(), 30,
             "the worker to run")
    srv.stop()  # SIGTERM: serve stops its worker, which drains, then exits itself
    assert not alive(child)
    assert "blockvault worker stopped" in srv.log()

    srv.start()  # SIGKILL: nothing of serve runs its cleanup, the kernel ends the worker
    (child,) = wait_for(lambda: worker_pids(srv.proc.pid), 30, "the worker process")
    srv.stop(kill=True)
    wait_for(lambda: not alive(child), 10, "the worker to die with serve")
