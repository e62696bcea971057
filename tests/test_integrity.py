"""Verify, corruption detection and changed-region tracking, end to end (local store)."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import FAST_GC
from tests.server import Server, verify_backup

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("bv"), FAST_GC).start()
    yield srv
    srv.stop()


def _packs(server) -> list:
    return sorted((server.data_dir / "store" / "volumebackups").rglob("packs/*/*"))


def test_verify_then_corruption_is_named(server, alice):
    vol = alice.create_volume(1)
    alice.write(vol, 0, os.urandom(4 * MiB))
    backup = alice.create_backup(vol)
    assert alice.get(f"/backups/{backup}/verify").status_code == 404
    v = verify_backup(alice, backup)
    assert v["state"] == "ok" and v["checked_blocks"] == 128 and v["corrupt"] == []

    packs = [p for p in _packs(server)]
    victim = packs[0]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # one flipped bit-pattern inside the first blob
    victim.write_bytes(bytes(data))
    name = str(victim.relative_to(server.data_dir / "store" / "volumebackups"))

    v = verify_backup(alice, backup)
    assert v["state"] == "failed" and name in v["corrupt"]
    assert alice.get(f"/backups/{backup}").json()["backup"]["status"] == "available"

    # a restore meets the bad block: it fails loudly, naming the pack, and writes no lie
    r = alice.post(f"/backups/{backup}/restore", {"restore": {}})
    target = r.json()["restore"]["volume_id"]
    vol_after = alice.wait("volume", target, {"available", "error_restoring"})
    assert vol_after["status"] == "error_restoring"
    b = alice.wait("backup", backup, {"available"})
    assert name.split("/")[-1][:16] in b["fail_reason"], b["fail_reason"]


def test_missing_pack_is_named(server, alice):
    vol = alice.create_volume(1)
    alice.write(vol, 0, os.urandom(2 * MiB))
    before = set(_packs(server))
    backup = alice.create_backup(vol)
    new = sorted(set(_packs(server)) - before)
    assert new
    new[0].unlink()
    v = verify_backup(alice, backup)
    assert v["state"] == "failed" and v["missing"]
    target = alice.post(f"/backups/{backup}/restore", {"restore": {}}).json()["restore"][
        "volume_id"]
    assert alice.wait("volume", target, {"available", "error_restoring"})["status"] == (
        "error_restoring")
    assert "missing" in alice.wait("backup", backup, {"available"})["fail_reason"]


def test_incremental_after_writes_behind_the_services_back(server, alice):
    """Changed-region hints are dropped when the file changed outside the data API, so the
    incremental still captures every byte."""
    vol = alice.create_volume(1)
    alice.write(vol, 0, os.urandom(8 * MiB))
    alice.create_backup(vol)
    alice.write(vol, 100 * MiB, os.urandom(MiB))  # tracked
    path = server.data_dir / "volumes" / f"{vol}.raw"
    with open(path, "r+b") as f:  # not tracked: a write the service never saw
        f.seek(300 * MiB)
        f.write(os.urandom(MiB))
    h = alice.volume_sha256(vol)
    inc = alice.create_backup(vol, incremental=True)
    target = alice.restore(inc)
    assert alice.volume_sha256(target) == h


def test_incremental_with_tracked_writes_is_exact(server, alice):
    vol = alice.create_volume(1)
    alice.write(vol, 0, os.urandom(8 * MiB))
    alice.create_backup(vol)
    for i in range(10):
        alice.write(vol, i * 50 * MiB + 4096 * i, os.urandom(100_000))
    h = alice.volume_sha256(vol)
    inc = alice.create_backup(vol, incremental=True)
    inc2_writes = os.urandom(70_000)
    alice.write(vol, 5 * MiB + 3, inc2_writes)
    h2 = alice.volume_sha256(vol)
    inc2 = alice.create_backup(vol, incremental=True)
    assert alice.volume_sha256(alice.restore(inc)) == h
    assert alice.volume_sha256(alice.restore(inc2)) == h2


def test_delete_during_running_backup_then_everything_is_freed(server, alice):
    """A delete while another backup (deduplicating against it) runs frees nothing that
    backup needs; once all backups are gone, so is every pack."""
    before = set(_packs(server))
    shared = os.urandom(48 * MiB)
    v1, v2 = alice.create_volume(1), alice.create_volume(1)
    alice.write(v1, 0, shared)
    b1 = alice.create_backup(v1)
    alice.write(v2, 0, shared)  # same content: v2's backup reuses b1's packs
    for i in range(1, 8):
        alice.write(v2, i * 64 * MiB, os.urandom(32 * MiB))
    h2 = alice.volume_sha256(v2)
    b2 = alice.create_backup(v2, wait=False)
    deadline = time.monotonic() + 30
    while alice.get(f"/backups/{b2}/progress").json()["progress"]["job_state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert alice.delete(f"/backups/{b1}").status_code == 202
    alice.wait("backup", b1, {"deleted"})
    assert alice.wait("backup", b2, {"available", "error"})["status"] == "available"
    assert alice.volume_sha256(alice.restore(b2)) == h2
    assert alice.delete(f"/backups/{b2}").status_code == 202
    alice.wait("backup", b2, {"deleted"})
    # condemned once a grace period old, deleted a grace period later (docs/format.md)
    deadline = time.monotonic() + 60
    while set(_packs(server)) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(_packs(server)) - before == set()


def _verify_container(api, container: str) -> dict:
    r = api.post("/os-container-verifications", {"verification": {"container": container}})
    assert r.status_code == 202, r.text
    started = r.json()["verification"]
    assert started["container"] == container and started["state"] in ("queued", "running")
    deadline = time.monotonic() + 60
    while True:
        v = api.get(f"/os-container-verifications/{started['id']}").json()["verification"]
        if v["state"] in ("ok", "failed"):
            assert v["id"] == started["id"]
            return v
        assert time.monotonic() < deadline, v
        time.sleep(0.1)


def test_container_verification_is_admin_only_and_names_bad_packs(server, alice, bob, admin):
    container = f"cv-{os.urandom(4).hex()}"
    blocks = 0
    for user, mib in ((alice, 2), (bob, 1)):  # two projects share one container
        vol = user.create_volume(1)
        user.write(vol, 0, os.urandom(mib * MiB))
        user.create_backup(vol, container=container)
        blocks += mib * MiB // 32768
    v = _verify_container(admin, container)
    assert (v["state"], v["checked_blocks"], v["missing"], v["corrupt"], v["error"]) == (
        "ok", blocks, [], [], None)

    # a tenant may not check (or read the report of) a container others' backups share
    r = alice.post("/os-container-verifications", {"verification": {"container": container}})
    assert r.status_code == 403 and "Policy doesn't allow" in r.json()["forbidden"]["message"]
    r = alice.get(f"/os-container-verifications/{v['id']}")
    assert r.status_code == 403
    assert admin.get("/os-container-verifications/no-such-id").status_code == 404
    r = admin.post("/os-container-verifications", {"verification": {}})
    assert r.status_code == 400 and "badRequest" in r.json()

    root = server.data_dir / "store" / container
    victim = sorted(root.rglob("packs/*/*"))[0]
    data = bytearray(victim.read_bytes())
    data[50] ^= 0xFF
    victim.write_bytes(bytes(data))
    v = _verify_container(admin, container)
    assert v["state"] == "failed" and v["corrupt"] == [str(victim.relative_to(root))]

    v = _verify_container(admin, f"never-used-{os.urandom(4).hex()}")
    assert v["state"] == "failed" and v["error"], v
