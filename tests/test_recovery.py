"""A killed server loses no backup and leaves nothing stuck (DESIGN "Jobs and states")."""

from __future__ import annotations

import os
import time

from tests.server import Server

MiB = 1024 * 1024


def _busy_volume(api) -> str:
    vol = api.create_volume(1)
    for i in range(6):  # 192 MiB of incompressible data: a backup takes a moment
        api.write(vol, i * 64 * MiB, os.urandom(32 * MiB))
    return vol


def test_backup_survives_kill_9(tmp_path):
    srv = Server(tmp_path / "bv").start()
    try:
        api = srv.client("alice", "p1")
        vol = _busy_volume(api)
        h = api.volume_sha256(vol)
        backup = api.create_backup(vol, wait=False)
        time.sleep(0.3)
        srv.stop(kill=True)  # SIGKILL: no cleanup of any kind
        srv.start()
        b = api.wait("backup", backup, {"available", "error"}, timeout=120)
        assert b["status"] == "available", b
        assert api.get(f"/volumes/{vol}").json()["volume"]["status"] == "available"
        target = api.restore(backup)
        assert api.volume_sha256(target) == h
    finally:
        srv.stop()


def test_restore_survives_kill_9(tmp_path):
    srv = Server(tmp_path / "bv").start()
    try:
        api = srv.client("alice", "p1")
        vol = _busy_volume(api)
        h = api.volume_sha256(vol)
        backup = api.create_backup(vol)
        target = api.restore(backup, wait=False)
        time.sleep(0.2)
        srv.stop(kill=True)
        srv.start()
        api.wait("backup", backup, {"available"}, timeout=120)
        v = api.wait("volume", target, {"available", "error_restoring"}, timeout=120)
        assert v["status"] == "available", v
        assert api.volume_sha256(target) == h
    finally:
        srv.stop()


#: garbage collection's grace period shortened so that a test sees packs go
FAST_GC = {"BLOCKVAULT_GC_GRACE": "10", "BLOCKVAULT_STORE_LAG": "1",
           "BLOCKVAULT_MAINTENANCE_INTERVAL": "0.5"}


def test_delete_survives_kill_9(tmp_path):
    srv = Server(tmp_path / "bv", FAST_GC).start()
    try:
        api = srv.client("alice", "p1")
        vol = _busy_volume(api)
        backup = api.create_backup(vol)
        assert api.delete(f"/backups/{backup}").status_code == 202
        srv.stop(kill=True)
        srv.start()
        api.wait("backup", backup, {"deleted"}, timeout=120)
        # Condemned, then swept a grace period later by the maintenance timer (also after a
        # restart: the owed collections are not lost with the process).
        deadline = time.monotonic() + 90
        while packs := list((tmp_path / "bv" / "store" / "volumebackups").rglob("packs/*/*")):
            assert time.monotonic() < deadline, f"{len(packs)} packs never collected"
            time.sleep(0.2)
        assert list((tmp_path / "bv" / "store" / "volumebackups").rglob("manifests/*")) == []
    finally:
        srv.stop()
