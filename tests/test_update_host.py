"""``blockvault volume update-host`` (Cinder's ``cinder-manage volume update_host``): a host's
volumes and their unfinished jobs move to another ``HOST@BACKEND`` in the database, a new
host that no configured backend names is refused, and the moved jobs then run on a worker
of the new host. Real processes on PostgreSQL and SQLite (tests/test_roles.py's pattern)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text

from blockvault.db import Database
from blockvault.db.models import Job, Runner, Volume, utcnow
from blockvault.service.rehoming import UpdateHostError, update_host
from blockvault.volume.backends import Backends
from tests.pg import pg_database
from tests.server import Api
from tests.test_roles import Role, db_rows
from tests.test_worker_kill import restored_as

MiB = 1024 * 1024


def execute(url: str, sql: str, **params) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as c:
            c.execute(text(sql), params)
    finally:
        engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.sqlite'}"  # processes of one host only
        return
    with pg_database() as url:
        yield url


def update_host_cli(tmp_path, url: str, shared, *args: str) -> subprocess.CompletedProcess:
    """The command as an operator runs it on host B: host B's configuration (its host_name,
    its backends), a data dir of its own, the shared database."""
    config = tmp_path / "admin.toml"
    config.write_text(f'host_name = "hostb"\ndatabase_url = "{url}"\n'
                      f'[backends.rawfile]\ndriver = "raw"\nroot = "{shared / "volumes"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    return subprocess.run(
        [sys.executable, "-m", "blockvault.cli", "volume", "update-host", "--config",
         str(config), "--data-dir", str(tmp_path / "admin"), *args],
        env=env, capture_output=True, text=True, timeout=60, check=False)


def test_update_host_moves_volumes_and_their_waiting_jobs(tmp_path, db_url):
    """Host A's volume has a backup queued and no worker of host A; host B's worker is up
    and leaves it alone. update-host refuses a host nothing names (changing nothing), then
    moves host A's volume and the job to hostb@rawfile (another host's volume stays): the
    backup runs on host B's worker, and a restore into the moved volume is byte-exact."""
    shared = tmp_path / "shared"
    api = Role("api", tmp_path / "api", shared, db_url, BLOCKVAULT_HOST_NAME="hosta")
    worker = Role("worker", tmp_path / "worker", shared, db_url, BLOCKVAULT_HOST_NAME="hostb",
                  BLOCKVAULT_MAINTENANCE_INTERVAL="0.3")
    try:
        for p in (api, worker):  # two interpreters start side by side
            p.launch()
        api.ready(), worker.ready()
        client: Api = api.client()
        vol, other = client.create_volume(1), client.create_volume(1)
        data = os.urandom(2 * MiB)
        client.write(vol, 0, data)
        backup = client.create_backup(vol, wait=False)
        # ``other`` stands for a volume of a third host: it must not move
        execute(db_url, "UPDATE volumes SET host = 'hostc' WHERE id = :v", v=other)

        refused = update_host_cli(tmp_path, db_url, shared, "--current-host", "hosta@rawfile",
                                  "--new-host", "nowhere@rawfile")
        assert refused.returncode == 1, refused
        assert "No configured backend can name nowhere@rawfile" in refused.stderr
        assert "workers announce: hostb@rawfile" in refused.stderr  # host B's worker
        # nothing changed, and host B's worker (up for a while now) did not take the job
        assert db_rows(db_url, "SELECT route, state FROM jobs WHERE backup_id = :b",
                       b=backup) == [("hosta@rawfile", "queued")]
        assert client.get(f"/backups/{backup}").json()["backup"]["status"] == "creating"

        moved = update_host_cli(tmp_path, db_url, shared, "--current-host", "hosta@rawfile",
                                "--new-host", "hostb@rawfile")
        assert moved.returncode == 0, moved
        assert moved.stdout.strip() == ("moved 1 volume(s) and 1 unfinished job(s) from "
                                        "hosta@rawfile to hostb@rawfile")
        assert sorted(db_rows(db_url, "SELECT id, host, backend FROM volumes")) == sorted(
            [(vol, "hostb", "rawfile"), (other, "hostc", "rawfile")])

        b = client.wait("backup", backup, {"available", "error"}, 30)
        assert b["status"] == "available", b
        assert db_rows(db_url, "SELECT j.route, r.host FROM jobs j JOIN runners r "
                               "ON r.owner = j.owner WHERE j.backup_id = :b",
                       b=backup) == [("hostb@rawfile", "hostb")]
        admin = Api(api.url, "admin", "admin")
        assert admin.get(f"/volumes/{vol}").json()["volume"]["os-vol-host-attr:host"] \
            == "hostb@rawfile#rawfile"
        # a restore into the moved volume is routed to host B too, and gives the bytes back
        path = shared / "volumes" / f"{vol}.raw"
        client.write(vol, 0, bytes(MiB))
        assert not restored_as(path, data)
        client.restore(backup, vol)
        assert restored_as(path, data)
    finally:
        api.stop()
        worker.stop()


# -- the rules, on a real database without processes -------------------------------------------


@pytest.fixture
def db(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'bv.sqlite'}")
    db.upgrade()
    yield db
    db.dispose()


def _volume(s, host: str | None, backend: str | None, **extra) -> str:
    vol = Volume(project_id="p", user_id="u", size=1, status="available",
                 availability_zone="nova", host=host, backend=backend, **extra)
    s.add(vol)
    s.flush()
    return vol.id


def test_update_host_rules(tmp_path, db):
    tables = {"disks": {"driver": "file", "root": str(tmp_path)}}
    backends = Backends.from_config(tables, data_dir=tmp_path, host_name="here")
    with db.session() as s:
        old = _volume(s, "gone", "rawfile")
        legacy = _volume(s, "gone", None)  # from before backends: the default one
        deleted = _volume(s, "gone", "rawfile", deleted=True)
        image = _volume(s, "gone", "disks", provider_location="a.img")
        for state in ("queued", "running", "done"):
            s.add(Job(kind="create", backup_id=state, volume_id=old, route="gone@rawfile",
                      state=state))
        # a worker elsewhere announces what this configuration cannot name
        s.add(Runner(owner="w", host="there", pid=1, started_at=utcnow(), seen_at=utcnow(),
                     backends=["there@rawfile"]))

    for current, new, why in [
        ("gone", "here@rawfile", "not of the form HOST@BACKEND"),
        ("gone@rawfile", "here@rawfile#rawfile", "without '#POOL'"),
        ("gone@rawfile", "gone@rawfile", "nothing to move"),
        ("gone@rawfile", "here@nosuch", "No configured backend can name here@nosuch"),
        ("gone@rawfile", "here@disks", "find disks differently"),
    ]:
        with pytest.raises(UpdateHostError, match=why):
            update_host(db, backends, current, new)

    # to a host only a worker's heartbeat names (another host's configuration)
    moved = update_host(db, backends, "gone@rawfile", "there@rawfile")
    assert (moved.volumes, moved.jobs) == (2, 2)  # not the deleted volume, not a done job
    with db.reader() as s:
        hosts = {v.id: (v.host, v.backend) for v in s.query(Volume)}
        routes = {j.backup_id: j.route for j in s.query(Job)}
    assert hosts == {old: ("there", "rawfile"), legacy: ("there", "rawfile"),
                     deleted: ("gone", "rawfile"), image: ("gone", "disks")}
    assert routes == {"queued": "there@rawfile", "running": "there@rawfile",
                      "done": "gone@rawfile"}
    # a backend's volumes to this configuration's own name for it
    assert update_host(db, backends, "gone@disks", "here@disks").volumes == 1
    assert update_host(db, backends, "gone@rawfile", "here@rawfile").volumes == 0
