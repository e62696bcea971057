"""Deployments with different object-store credentials cannot reach each other's backups."""

from __future__ import annotations

import base64
import json
import os
import uuid

import pytest

from tests.conftest import store_env
from tests.server import Server

MiB = 1024 * 1024


@pytest.mark.parametrize("store", ["swift", "s3"])
def test_import_into_deployment_without_access(tmp_path, swift_server, store):
    container = f"iso-{uuid.uuid4().hex[:10]}"
    env_a = {**store_env(store, swift_server), "BLOCKVAULT_DEFAULT_CONTAINER": container}
    env_b = dict(env_a)
    user2, key2 = "test2:tester2", swift_server.users["test2:tester2"]
    if store == "swift":
        env_b.update(BLOCKVAULT_SWIFT_USER=user2, BLOCKVAULT_SWIFT_KEY=key2)
    else:
        env_b.update(BLOCKVAULT_S3_ACCESS_KEY=user2, BLOCKVAULT_S3_SECRET_KEY=key2)
    a = Server(tmp_path / "a", env_a).start()
    b = Server(tmp_path / "b", env_b).start()
    try:
        api_a = a.client("alice", "p1")
        vol = api_a.create_volume(1)
        api_a.write(vol, 0, os.urandom(2 * MiB))
        backup = api_a.create_backup(vol)
        rec = a.client("admin", "admin").get(f"/backups/{backup}/export_record").json()[
            "backup-record"]

        admin_b = b.client("admin", "admin")
        r = admin_b.post("/backups/import_record", {"backup-record": rec})
        assert r.status_code == 201
        got = admin_b.wait("backup", backup, {"available", "error"})
        # the other account has no such container: a clear error, nothing restorable
        assert got["status"] == "error", got
        assert container in got["fail_reason"] and "does not exist" in got["fail_reason"]
        fault = admin_b.post(f"/backups/{backup}/restore", {"restore": {}})
        assert fault.status_code == 400

        # and a record naming a container of the other account in B's own name is no key
        record = json.loads(base64.b64decode(rec["backup_url"]))
        record["id"] = str(uuid.uuid4())
        url = base64.b64encode(json.dumps(record).encode()).decode()
        r = admin_b.post("/backups/import_record",
                         {"backup-record": {"backup_service": rec["backup_service"],
                                            "backup_url": url}})
        assert r.status_code == 201
        assert admin_b.wait("backup", record["id"], {"available", "error"})["status"] == "error"
    finally:
        a.stop()
        b.stop()
