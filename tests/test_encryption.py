"""Encryption at rest, configured on the service (issue: keys never in the store)."""

from __future__ import annotations

import os

from tests.server import Server

MiB = 1024 * 1024


def test_encrypted_container_end_to_end(tmp_path):
    key = os.urandom(32)
    key_file = tmp_path / "key"
    key_file.write_bytes(key)
    store = tmp_path / "store"
    env = {"BLOCKVAULT_LOCAL_STORE_DIR": str(store),
           "BLOCKVAULT_ENCRYPTION_KEY_FILE": str(key_file)}
    srv = Server(tmp_path / "a", env).start()
    try:
        api = srv.client("alice", "p1")
        vol = api.create_volume(1)
        secret = b"TOP-SECRET-PAYLOAD-" * 50_000
        api.write(vol, 0, secret)
        h = api.volume_sha256(vol)
        backup = api.create_backup(vol)
        assert api.volume_sha256(api.restore(backup)) == h
        record = srv.client("admin", "admin").get(
            f"/backups/{backup}/export_record").json()["backup-record"]
        # nothing readable lands in the store: not the data, not the key
        for path in store.rglob("*"):
            if path.is_file():
                blob = path.read_bytes()
                assert b"TOP-SECRET" not in blob and key not in blob
                assert key.hex().encode() not in blob
        assert key.hex() not in srv.log()
    finally:
        srv.stop()

    # a deployment with a wrong key fails cleanly, naming the container
    wrong = tmp_path / "wrong"
    wrong.write_bytes(os.urandom(32))
    bad = Server(tmp_path / "b", {**env, "BLOCKVAULT_ENCRYPTION_KEY_FILE": str(wrong)}).start()
    try:
        admin = bad.client("admin", "admin")
        assert admin.post("/backups/import_record", {"backup-record": record}).status_code == 201
        b = admin.wait("backup", backup, {"available", "error"})
        assert b["status"] == "error"
        assert b["fail_reason"] == (
            "container volumebackups is encrypted and the configured key does not open it")
    finally:
        bad.stop()

    # a fresh deployment with the same key imports and restores byte-exact
    good = Server(tmp_path / "c", env).start()
    try:
        admin = good.client("admin", "admin")
        assert admin.post("/backups/import_record", {"backup-record": record}).status_code == 201
        assert admin.wait("backup", backup, {"available", "error"})["status"] == "available"
        assert admin.volume_sha256(admin.restore(backup)) == h
    finally:
        good.stop()
