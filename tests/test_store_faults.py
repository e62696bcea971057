"""Object store outages against a real Swift (stopped for real, not mocked)."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from tests.conftest import store_env
from tests.server import Server

MiB = 1024 * 1024


def _server(tmp_path, saio, store: str, budget: float) -> Server:
    env = store_env(store, saio)
    env.update({
        "BLOCKVAULT_DEFAULT_CONTAINER": f"bv-{uuid.uuid4().hex[:12]}",
        "BLOCKVAULT_STORE_RETRY_ATTEMPTS": "30",
        "BLOCKVAULT_STORE_RETRY_BUDGET": str(budget),
    })
    return Server(tmp_path / store, env).start()


def _fill(api, vol: str, mib: int) -> None:
    for i in range(0, mib, 32):
        api.write(vol, i * MiB, os.urandom(32 * MiB))


def _wait_running(api, backup_id: str) -> None:
    """Until the worker has started moving bytes."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        p = api.get(f"/backups/{backup_id}/progress").json()["progress"]
        if p["job_state"] == "running" and p["bytes_done"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"backup never started: {p}")


@pytest.mark.parametrize("store", ["swift", "s3"])
def test_outage_during_backup_and_restore(tmp_path, swift_server, store):
    srv = _server(tmp_path, swift_server, store, budget=3)
    try:
        api = srv.client("alice", uuid.uuid4().hex)
        vol = api.create_volume(1)
        _fill(api, vol, 64)
        h1 = api.volume_sha256(vol)
        first = api.create_backup(vol)
        _fill(api, vol, 512)

        # the store goes away in the middle of a backup
        backup = api.create_backup(vol, wait=False)
        _wait_running(api, backup)
        swift_server.stop()
        try:
            b = api.wait("backup", backup, {"available", "error"}, timeout=120)
            assert b["status"] == "error", b
            assert "unreachable" in b["fail_reason"], b["fail_reason"]
            assert "testing" not in b["fail_reason"]  # never a credential
            v = api.get(f"/volumes/{vol}").json()["volume"]
            assert v["status"] == "available"
        finally:
            swift_server.start()

        # earlier backups still restore byte-exact; a new backup succeeds
        target = api.restore(first)
        assert api.volume_sha256(target) == h1
        h2 = api.volume_sha256(vol)
        second = api.create_backup(vol)

        # the store goes away in the middle of a restore
        r = api.post(f"/backups/{second}/restore", {"restore": {}})
        assert r.status_code == 202
        target2 = r.json()["restore"]["volume_id"]
        deadline = time.monotonic() + 30
        while api.get(f"/backups/{second}/progress").json()["progress"]["bytes_done"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        swift_server.stop()
        try:
            v = api.wait("volume", target2, {"available", "error_restoring"}, timeout=120)
            assert v["status"] == "error_restoring", v
            b = api.wait("backup", second, {"available"})
            assert "unreachable" in b["fail_reason"]
        finally:
            swift_server.start()
        # a retried restore succeeds
        target3 = api.restore(second)
        assert api.volume_sha256(target3) == h2
    finally:
        srv.stop()


def test_short_outage_is_ridden_out(tmp_path, swift_server):
    srv = _server(tmp_path, swift_server, "swift", budget=60)
    try:
        api = srv.client("alice", uuid.uuid4().hex)
        vol = api.create_volume(1)
        # 768 MiB of random data: a backup long enough (~1 s here) for the outage to begin
        # while it runs; with 256 MiB it could end between two polls of its progress
        _fill(api, vol, 768)
        h = api.volume_sha256(vol)
        backup = api.create_backup(vol, wait=False)
        _wait_running(api, backup)
        swift_server.stop()
        restarter = threading.Timer(2.0, swift_server.start)
        restarter.start()
        try:
            b = api.wait("backup", backup, {"available", "error"}, timeout=180)
        finally:
            restarter.join()
            swift_server.start()
        assert b["status"] == "available", b
        target = api.restore(backup)
        assert api.volume_sha256(target) == h
    finally:
        srv.stop()
