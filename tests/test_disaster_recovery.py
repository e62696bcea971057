"""Losing the metadata DB never means losing the backups: export records import into a
fresh deployment (empty database) pointed at the same object store and restore byte-exact."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid

import pytest

from tests.conftest import store_env
from tests.server import Server

MiB = 1024 * 1024


@pytest.mark.parametrize("store", ["local", "swift", "s3"])
def test_import_into_fresh_deployment(tmp_path, request, store):
    env = {"BLOCKVAULT_DEFAULT_CONTAINER": f"dr-{uuid.uuid4().hex[:10]}"}
    if store == "local":
        env["BLOCKVAULT_LOCAL_STORE_DIR"] = str(tmp_path / "shared-store")
    else:
        env.update(store_env(store, request.getfixturevalue("swift_server")))
    old = Server(tmp_path / "old", env).start()
    try:
        api = old.client("alice", "p1")
        vol = api.create_volume(1)
        api.write(vol, 0, os.urandom(3 * MiB))
        api.write(vol, 600 * MiB, os.urandom(MiB))
        h_full = api.volume_sha256(vol)
        full = api.create_backup(vol, name="full")
        api.write(vol, 601 * MiB, os.urandom(MiB))
        h_inc = api.volume_sha256(vol)
        inc = api.create_backup(vol, name="inc", incremental=True)
        admin = old.client("admin", "admin")
        records = [admin.get(f"/backups/{b}/export_record").json()["backup-record"]
                   for b in (full, inc)]
    finally:
        old.stop()

    new = Server(tmp_path / "new", env).start()  # empty database, same store
    try:
        admin = new.client("admin", "admin")
        for rec in records:
            assert admin.post("/backups/import_record", {"backup-record": rec}).status_code == 201
        admin.wait("backup", full, {"available", "error"})
        admin.wait("backup", inc, {"available", "error"})
        b_full = admin.get(f"/backups/{full}").json()["backup"]
        b_inc = admin.get(f"/backups/{inc}").json()["backup"]
        assert (b_full["status"], b_inc["status"]) == ("available", "available"), (b_full, b_inc)
        assert b_inc["is_incremental"] and b_full["has_dependent_backups"]
        assert (b_full["name"], b_inc["name"], b_full["volume_id"]) == ("full", "inc", vol)
        assert admin.volume_sha256(admin.restore(inc)) == h_inc
        assert admin.volume_sha256(admin.restore(full)) == h_full
    finally:
        new.stop()


def test_recover_command_reimports_a_lost_database(tmp_path):
    """The metadata DB is gone and nobody kept export records: ``blockvault recover``
    finds every backup's record in the store and imports it."""
    import subprocess
    import sys

    env = {"BLOCKVAULT_LOCAL_STORE_DIR": str(tmp_path / "store")}
    old = Server(tmp_path / "old", env).start()
    try:
        api = old.client("alice", "p1")
        vol = api.create_volume(1)
        api.write(vol, 0, os.urandom(2 * MiB))
        h = api.volume_sha256(vol)
        backups = {api.create_backup(vol, name=f"b{i}") for i in range(2)}
        renamed = next(iter(backups))
        v39 = old.client("alice", "p1", version="3.9")
        assert v39.put(f"/backups/{renamed}", {"backup": {"name": "renamed"}}).status_code == 200
        # the record is named by the backup's storage id (its service_metadata)
        admin_old = old.client("admin", "admin")
        rec = admin_old.get(f"/backups/{renamed}/export_record").json()["backup-record"]
        sid = json.loads(base64.b64decode(rec["backup_url"]))["service_metadata"]
        record = tmp_path / "store" / "volumebackups" / "records" / sid
        deadline = time.monotonic() + 30  # the record in the store follows the rename
        while b'"renamed"' not in record.read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        old.stop()
    new = Server(tmp_path / "new", env).start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "blockvault.cli", "recover", "--data-dir",
             str(tmp_path / "new"), "--url", new.url, "--token", "admin:admin"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "2 imported, 0 skipped" in out.stderr
        admin = new.client("admin", "admin")
        for b in backups:
            assert admin.wait("backup", b, {"available", "error"})["status"] == "available"
        assert admin.get(f"/backups/{renamed}").json()["backup"]["name"] == "renamed"
        assert admin.volume_sha256(admin.restore(next(iter(backups)))) == h
        # running it again changes nothing
        again = subprocess.run(
            [sys.executable, "-m", "blockvault.cli", "recover", "--data-dir",
             str(tmp_path / "new"), "--url", new.url, "--token", "admin:admin"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        # the store holds both backups' records from the old deployment and the records of
        # the copies this one imported (each import owns its data): all known, all skipped
        assert "0 imported, 4 skipped" in again.stderr
    finally:
        new.stop()
