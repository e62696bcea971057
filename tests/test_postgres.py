"""PostgreSQL as the metadata DB, and two service processes sharing it (DESIGN "Scale")."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from tests.pg import pg_database
from tests.server import Server

psycopg = pytest.importorskip("psycopg")
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pg_url():
    with pg_database() as url:
        yield url


def test_two_processes_share_one_database(tmp_path, pg_url):
    env = {"BLOCKVAULT_DATABASE_URL": pg_url}
    data = tmp_path / "shared"
    a = Server(data, env).start()
    b = Server(data, env)
    b.log_path = tmp_path / "b.log"
    b.start()
    try:
        api_a, api_b = a.client("alice", "pg1"), b.client("alice", "pg1")
        vol = api_a.create_volume(1)
        for i in range(4):
            api_a.write(vol, i * 64 * MiB, os.urandom(32 * MiB))
        h = api_a.volume_sha256(vol)
        # created through A, visible and restorable through B
        backup = api_a.create_backup(vol, wait=False)
        assert api_b.wait("backup", backup, {"available", "error"})["status"] == "available"
        listed = [x["id"] for x in api_b.get("/backups").json()["backups"]]
        assert listed == [backup]
        target = api_b.restore(backup)
        assert api_a.volume_sha256(target) == h

        # A dies mid-backup: B's workers take the job over once A's lease runs out
        api_a.write(vol, 0, os.urandom(64 * MiB))
        h2 = api_a.volume_sha256(vol)
        second = api_a.create_backup(vol, wait=False)
        time.sleep(0.2)
        a.stop(kill=True)
        b2 = api_b.wait("backup", second, {"available", "error"}, timeout=120)
        assert b2["status"] == "available", b2
        assert api_b.volume_sha256(api_b.restore(second)) == h2
    finally:
        a.stop()
        b.stop()


def test_quota_holds_under_concurrent_creates(tmp_path, pg_url):
    """Two processes racing to create backups never exceed the quota together."""
    import threading

    env = {"BLOCKVAULT_DATABASE_URL": pg_url, "BLOCKVAULT_QUOTA_BACKUPS": "3"}
    a = Server(tmp_path / "d", env).start()
    b = Server(tmp_path / "d", env)
    b.log_path = tmp_path / "b.log"
    b.start()
    try:
        project = uuid.uuid4().hex
        vols = [a.client("alice", project).create_volume(1) for _ in range(6)]
        codes: list[int] = []

        def create(srv: Server, vol: str) -> None:
            r = srv.client("alice", project).post("/backups", {"backup": {"volume_id": vol}})
            codes.append(r.status_code)

        threads = [threading.Thread(target=create, args=((a, b)[i % 2], v))
                   for i, v in enumerate(vols)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [202, 202, 202, 413, 413, 413]
    finally:
        a.stop()
        b.stop()


def test_simultaneous_start_on_a_fresh_database(tmp_path):
    """Two processes migrating one empty database at once: one migrates, both serve."""
    import threading

    with pg_database() as url:
        env = {"BLOCKVAULT_DATABASE_URL": url}
        servers = [Server(tmp_path / f"s{i}", env) for i in range(2)]
        errors: list[BaseException] = []

        def start(srv: Server) -> None:
            try:
                srv.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(s,)) for s in servers]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert errors == []
            vol = servers[0].client("alice", "p").create_volume(1)
            r = servers[1].client("alice", "p").get(f"/volumes/{vol}")
            assert r.status_code == 200
        finally:
            for s in servers:
                s.stop()
