"""Backup schedules on live servers: the API (CRUD, validation, tenants, policy), the
scheduler making real backups through the engine and pruning them, failures in the last
run, a missed run, and two processes on one PostgreSQL database firing each run once.

Time is moved for real, not mocked: a test sets a schedule's ``next_run_at`` in the
database into the past and the server's scheduler (ticking every 0.2 s here) fires it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update

from blockvault.db.models import Backup, Schedule
from blockvault.db.session import Database
from tests.pg import pg_database
from tests.server import Api, Server

MiB = 1024 * 1024
FAST = {"BLOCKVAULT_SCHEDULER_INTERVAL": "0.2"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("bv-sched"), FAST).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def db(srv):
    database = Database(f"sqlite:///{srv.data_dir / 'blockvault.sqlite'}")
    yield database
    database.dispose()


def project_client(server: Server, user: str = "alice") -> Api:
    return server.client(user, uuid.uuid4().hex)


def make_schedule(api: Api, **fields) -> dict:
    body = {"interval_seconds": 3600, **fields}
    r = api.post("/os-backup-schedules", {"backup_schedule": body})
    assert r.status_code == 200, r.text
    return r.json()["backup_schedule"]


def fire_now(database: Database, schedule_id: str, ago: float = 1.0) -> None:
    """Make a schedule due: its next run a moment ago (the server's scheduler fires it)."""
    when = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=ago)
    with database.session() as s:
        s.execute(update(Schedule).where(Schedule.id == schedule_id)
                  .values(next_run_at=when))


def wait_run(api: Api, schedule_id: str, runs: int, timeout: float = 120) -> dict:
    """The schedule once ``runs`` runs fired and the last one settled."""
    deadline = time.monotonic() + timeout
    while True:
        sched = api.get(f"/os-backup-schedules/{schedule_id}").json()["backup_schedule"]
        if sched["runs_total"] >= runs and sched["last_outcome"] is not None:
            return sched
        assert time.monotonic() < deadline, sched
        time.sleep(0.1)


def schedule_backups(database: Database, schedule_id: str) -> list[Backup]:
    with database.session() as s:
        return list(s.scalars(select(Backup).where(Backup.schedule_id == schedule_id,
                                                   Backup.deleted.is_(False))
                              .order_by(Backup.created_at)))


def wait_backups(database: Database, schedule_id: str, count: int, timeout: float = 60) -> list:
    """The schedule's live backups once there are ``count`` and none is changing."""
    deadline = time.monotonic() + timeout
    while True:
        found = schedule_backups(database, schedule_id)
        if len(found) == count and all(b.status in ("available", "error") for b in found):
            return found
        assert time.monotonic() < deadline, [(b.id, b.status) for b in found]
        time.sleep(0.1)


# -- API ------------------------------------------------------------------------------------


def test_crud_and_views(srv):
    alice = project_client(srv)
    vol = alice.create_volume(1)
    made = make_schedule(alice, name=" nightly ", volume_ids=[vol], interval_seconds=None,
                         cron="30 2 * * *", timezone="Europe/Berlin", keep_daily=7,
                         keep_weekly=4, full_every=7)
    assert made["name"] == "nightly"
    assert (made["cron"], made["interval_seconds"], made["timezone"]) == \
        ("30 2 * * *", None, "Europe/Berlin")
    assert (made["keep_daily"], made["keep_weekly"], made["keep_last"]) == (7, 4, None)
    assert made["runs_total"] == made["failures_total"] == made["misses_total"] == 0
    assert made["last_run_at"] is None and made["last_outcome"] is None
    # next run: the next 02:30 in Berlin, stored and shown as UTC
    nxt = dt.datetime.fromisoformat(made["next_run_at"]).replace(tzinfo=dt.UTC)
    from zoneinfo import ZoneInfo
    local = nxt.astimezone(ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute) == (2, 30), local
    assert dt.timedelta(0) < nxt - dt.datetime.now(dt.UTC) <= dt.timedelta(days=1)

    sid = made["id"]
    assert alice.get(f"/os-backup-schedules/{sid}").json()["backup_schedule"] == made
    assert [s["id"] for s in alice.get("/os-backup-schedules").json()["backup_schedules"]] \
        == [sid]

    # update: an interval replaces the cron, and the next run moves with it
    r = alice.put(f"/os-backup-schedules/{sid}",
                  {"backup_schedule": {"interval_seconds": 600, "keep_last": 3}})
    assert r.status_code == 200, r.text
    upd = r.json()["backup_schedule"]
    assert (upd["cron"], upd["interval_seconds"], upd["keep_last"]) == (None, 600, 3)
    nxt = dt.datetime.fromisoformat(upd["next_run_at"]).replace(tzinfo=dt.UTC)
    assert abs((nxt - dt.datetime.now(dt.UTC)).total_seconds() - 600) < 30

    assert alice.delete(f"/os-backup-schedules/{sid}").status_code == 202
    assert alice.get(f"/os-backup-schedules/{sid}").status_code == 404
    assert alice.get("/os-backup-schedules").json()["backup_schedules"] == []


#: (change to a good body, words of the 400's message, also refused as an update): in an
#: update a cron replaces the interval and a metadata key the volume ids
BAD = [
    ({"cron": "61 * * * *", "interval_seconds": None}, "Invalid cron expression", True),
    ({"cron": "0 0 30 2 *", "interval_seconds": None}, "Bad day-of-month", True),
    ({"cron": "* * * * *"}, "exactly one of cron and interval_seconds", False),
    ({"interval_seconds": None}, "exactly one of cron and interval_seconds", True),
    ({"interval_seconds": 59}, "at least 60", True),
    ({"timezone": "Mars/Olympus_Mons"}, "Unknown time zone", True),
    ({"keep_daily": -1}, "keep_daily", True),
    ({"full_every": -2}, "full_every", True),
    ({"keep_daily": 7}, "needs full_every of 1 or more", True),  # nothing could be pruned
    ({"volume_ids": []}, "at least one volume", True),
    ({"volume_metadata_key": "nightly"}, "exactly one of volume_ids", False),
    ({"volume_ids": None}, "exactly one of volume_ids", True),
    ({"volume_ids": ["not-a-uuid"]}, "not-a-uuid", True),
    ({"colour": "blue"}, "colour", True),
]


@pytest.mark.parametrize(("change", "words", "as_update"), BAD,
                         ids=[str(i) for i in range(len(BAD))])
def test_bad_schedules_are_refused_and_nothing_is_made(srv, change, words, as_update):
    alice = project_client(srv)
    vol = alice.create_volume(1)
    body = {"volume_ids": [vol], "interval_seconds": 3600, **change}
    r = alice.post("/os-backup-schedules", {"backup_schedule": body})
    assert r.status_code == 400, r.text
    assert words in r.json()["badRequest"]["message"], r.text
    assert alice.get("/os-backup-schedules").json()["backup_schedules"] == []
    if as_update:  # refused as an update too, and nothing changes
        sid = make_schedule(alice, volume_ids=[vol])["id"]
        before = alice.get(f"/os-backup-schedules/{sid}").json()
        r = alice.put(f"/os-backup-schedules/{sid}", {"backup_schedule": change})
        assert r.status_code == 400, r.text
        assert words in r.json()["badRequest"]["message"], r.text
        assert alice.get(f"/os-backup-schedules/{sid}").json() == before


def test_tenants_never_see_each_other(srv):
    admin = srv.client("admin", "admin")
    alice, bob = project_client(srv), project_client(srv, "bob")
    vol_a, vol_b = alice.create_volume(1), bob.create_volume(1)
    sid = make_schedule(alice, volume_ids=[vol_a])["id"]
    # bob: another project's schedule is 404 for every call, and its volume unknown
    assert bob.get(f"/os-backup-schedules/{sid}").status_code == 404
    r = bob.put(f"/os-backup-schedules/{sid}", {"backup_schedule": {"keep_last": 1}})
    assert r.status_code == 404
    assert bob.delete(f"/os-backup-schedules/{sid}").status_code == 404
    assert bob.get("/os-backup-schedules").json()["backup_schedules"] == []
    assert bob.get("/os-backup-schedules?all_tenants=1").json()["backup_schedules"] == []
    r = bob.post("/os-backup-schedules",
                 {"backup_schedule": {"volume_ids": [vol_a], "interval_seconds": 60}})
    assert r.status_code == 404 and vol_a in r.text
    r = bob.post("/os-backup-forget", {"forget": {"schedule_id": sid, "keep_last": 1}})
    assert r.status_code == 404
    # nor can an admin schedule another project's volume into its own project
    r = admin.post("/os-backup-schedules",
                   {"backup_schedule": {"volume_ids": [vol_b], "interval_seconds": 60}})
    assert r.status_code == 404
    # the admin lists every project's with all_tenants=1, and sees whose they are
    assert alice.get(f"/os-backup-schedules/{sid}").json()["backup_schedule"]["id"] == sid
    mine = admin.get("/os-backup-schedules").json()["backup_schedules"]
    assert sid not in [s["id"] for s in mine]
    every = admin.get("/os-backup-schedules?all_tenants=1").json()["backup_schedules"]
    found = [s for s in every if s["id"] == sid]
    assert found and found[0]["project_id"] == alice.project
    assert admin.get(f"/os-backup-schedules/{sid}").status_code == 200


def test_v3_only(srv):
    alice = project_client(srv)
    sid = make_schedule(alice, volume_ids=[alice.create_volume(1)])["id"]
    v2 = srv.client("alice", alice.project, api="v2")
    assert v2.get("/os-backup-schedules").status_code == 404
    assert v2.get(f"/os-backup-schedules/{sid}").status_code == 404
    # any v3 microversion
    for version in ("3.0", "3.71"):
        pinned = srv.client("alice", alice.project, version=version)
        assert pinned.get(f"/os-backup-schedules/{sid}").status_code == 200


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    from tests.test_policy import key_client

    server = Server(tmp_path_factory.mktemp("bv-sched-keys"),
                    {**FAST, "BLOCKVAULT_AUTH_STRATEGY": "apikey"}).start()
    project = uuid.uuid4().hex
    yield {"reader": key_client(server, project, "rita", "reader"),
           "member": key_client(server, project, "mona", "member")}
    server.stop()


def test_policy_reader_reads_member_writes(keyed):
    reader, member = keyed["reader"], keyed["member"]
    vol = member.create_volume(1)
    body = {"backup_schedule": {"volume_ids": [vol], "interval_seconds": 3600}}
    r = reader.post("/os-backup-schedules", body)
    assert r.status_code == 403
    assert "blockvault:backup_schedule:create" in r.json()["forbidden"]["message"]
    sid = make_schedule(member, volume_ids=[vol])["id"]
    assert reader.get(f"/os-backup-schedules/{sid}").status_code == 200
    assert [s["id"] for s in reader.get("/os-backup-schedules").json()["backup_schedules"]] \
        == [sid]
    r = reader.put(f"/os-backup-schedules/{sid}", {"backup_schedule": {"keep_last": 1}})
    assert r.status_code == 403
    assert reader.delete(f"/os-backup-schedules/{sid}").status_code == 403
    r = reader.post("/os-backup-forget", {"forget": {"schedule_id": sid, "keep_last": 1}})
    assert r.status_code == 403
    assert member.delete(f"/os-backup-schedules/{sid}").status_code == 202


# -- the scheduler --------------------------------------------------------------------------


def test_runs_make_real_backups_and_prune_children_first(srv, db):
    """full_every=2 and keep_last=1: runs make F1, I1 (on F1), F2, I2 (on F2). After F2,
    I1 and F1 expire: I1 is deleted first, then F1. After I2, F2 is kept as its parent."""
    alice = project_client(srv)
    vol = alice.create_volume(1)
    sched = make_schedule(alice, name="n", volume_ids=[vol], full_every=2, keep_last=1)
    sid = sched["id"]
    made: list[list[Backup]] = []
    digests = []
    for run in range(1, 5):
        alice.write(vol, run * MiB, os.urandom(MiB))
        digests.append(alice.volume_sha256(vol))
        fire_now(db, sid)
        state = wait_run(alice, sid, run)
        assert state["runs_total"] == run and state["last_outcome"] == "success", state
        assert state["last_backups_made"] == 1 and state["last_error"] is None
        assert state["last_success_at"] == state["last_run_at"]
        nxt = dt.datetime.fromisoformat(state["next_run_at"])
        assert nxt - dt.datetime.fromisoformat(state["last_run_at"]) >= dt.timedelta(hours=1)
        made.append(schedule_backups(db, sid))
        if run == 3:
            # wait for the two deletes (I1, then F1) to finish
            made[-1] = wait_backups(db, sid, 1)
    f1 = made[0][0]
    assert f1.parent_id is None
    i1 = [b for b in made[1] if b.id != f1.id][0]
    assert i1.parent_id == f1.id
    assert [b.id for b in made[2]] != [f1.id]
    f2 = made[2][0]
    assert f2.parent_id is None and f2.id not in (f1.id, i1.id)
    state = alice.get(f"/os-backup-schedules/{sid}").json()["backup_schedule"]
    assert state["failures_total"] == state["misses_total"] == 0
    final = wait_backups(db, sid, 2)
    i2 = [b for b in final if b.id != f2.id][0]
    assert i2.parent_id == f2.id and state["last_backups_pruned"] == 0
    # the deletes went through the service: both old backups are gone from the API too
    for gone in (f1.id, i1.id):
        assert alice.get(f"/backups/{gone}").status_code == 404
    # and the survivor restores byte-exact (made by the engine, incremental on F2)
    target = alice.restore(i2.id)
    assert alice.volume_sha256(target) == digests[-1]
    assert alice.get(f"/backups/{i2.id}").json()["backup"]["is_incremental"] is True

    # the forget preview agrees: F2 kept as I2's parent, nothing to remove
    r = alice.post("/os-backup-forget", {"forget": {"schedule_id": sid, "dry_run": True}})
    assert r.status_code == 200, r.text
    preview = r.json()["forget"]
    assert {k["id"]: k["reasons"] for k in preview["kept"]} == {
        i2.id: ["last"], f2.id: [f"parent of {i2.id}"]}
    assert preview["removed"] == []


def test_failures_show_in_the_last_run(srv, db):
    alice = project_client(srv)
    admin = srv.client("admin", "admin")
    vols = [alice.create_volume(1, metadata={"nightly": "yes"}) for _ in range(2)]
    alice.create_volume(1, metadata={"nightly": "no"})  # not selected by key=value
    r = admin.put(f"/os-quota-sets/{alice.project}", {"quota_set": {"backups": 1}})
    assert r.status_code == 200, r.text
    sid = make_schedule(alice, volume_metadata_key="nightly=yes")["id"]
    fire_now(db, sid)
    state = wait_run(alice, sid, 1)
    assert state["last_outcome"] == "partial", state
    assert state["failures_total"] == 1 and state["last_backups_made"] == 1
    assert "exceeded" in state["last_error"], state["last_error"]
    made = wait_backups(db, sid, 1)
    assert made[0].volume_id == vols[0] and made[0].status == "available"

    # a backup whose job fails (its disk is gone) makes the run 'failed'
    r = admin.put(f"/os-quota-sets/{alice.project}", {"quota_set": {"backups": 10}})
    assert r.status_code == 200
    vol = alice.create_volume(1)
    sid2 = make_schedule(alice, volume_ids=[vol])["id"]
    disk = srv.data_dir / "volumes" / f"{vol}.raw"
    hidden = disk.with_suffix(".away")
    disk.rename(hidden)
    try:
        fire_now(db, sid2)
        state = wait_run(alice, sid2, 1)
    finally:
        hidden.rename(disk)
    assert state["last_outcome"] == "failed", state
    assert state["failures_total"] == 1 and state["last_backups_made"] == 0
    bad = wait_backups(db, sid2, 1)[0]
    assert bad.status == "error" and bad.id in state["last_error"]
    assert state["last_success_at"] is None
    # the next run works again, and says so
    fire_now(db, sid2)
    state = wait_run(alice, sid2, 2)
    assert state["last_outcome"] == "success" and state["failures_total"] == 1


def test_forget_preview_and_run_for_a_volume(srv, db):
    alice = project_client(srv)
    vol = alice.create_volume(1)
    ids = [alice.create_backup(vol) for _ in range(3)]  # fulls, made by API calls
    r = alice.post("/os-backup-forget", {"forget": {"volume_id": vol}})
    assert r.status_code == 400 and "keep" in r.text
    body = {"forget": {"volume_id": vol, "keep_last": 1, "dry_run": True}}
    preview = alice.post("/os-backup-forget", body).json()["forget"]
    assert [k["id"] for k in preview["kept"]] == [ids[2]]
    assert [k["id"] for k in preview["removed"]] == [ids[1], ids[0]]
    assert len(alice.get("/backups").json()["backups"]) == 3  # a preview deletes nothing
    body["forget"]["dry_run"] = False
    done = alice.post("/os-backup-forget", body).json()["forget"]
    assert sorted(done["deleted"]) == sorted(ids[:2]) and done["refused"] == []
    for gone in ids[:2]:
        alice.wait("backup", gone, {"deleted"})
    assert [b["id"] for b in alice.get("/backups").json()["backups"]] == [ids[2]]


def test_a_missed_run_runs_once_at_start(tmp_path):
    server = Server(tmp_path / "d", FAST).start()
    database = Database(f"sqlite:///{server.data_dir / 'blockvault.sqlite'}")
    try:
        alice = project_client(server)
        vol = alice.create_volume(1)
        sid = make_schedule(alice, volume_ids=[vol], interval_seconds=600)["id"]
        server.stop()
        # down for a day: 144 slots of 10 minutes went by
        fire_now(database, sid, ago=86400)
        server.start()
        state = wait_run(alice, sid, 1)
        assert state["misses_total"] == 1 and state["last_outcome"] == "success", state
        time.sleep(1.5)  # several passes later: still one run, no catching up
        state = alice.get(f"/os-backup-schedules/{sid}").json()["backup_schedule"]
        assert state["runs_total"] == 1 and state["misses_total"] == 1
        assert len(wait_backups(database, sid, 1)) == 1
        nxt = dt.datetime.fromisoformat(state["next_run_at"])
        assert nxt > dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(minutes=9)
    finally:
        server.stop()
        database.dispose()


def test_two_processes_on_postgresql_fire_each_run_once(tmp_path):
    with pg_database() as url:
        env = {**FAST, "BLOCKVAULT_DATABASE_URL": url, "BLOCKVAULT_SCHEDULER_INTERVAL": "0.05"}
        data = tmp_path / "shared"
        a = Server(data, env).start()
        b = Server(data, env)
        b.log_path = tmp_path / "b.log"
        b.start()
        database = Database(url)
        try:
            alice = project_client(a)
            vols = [alice.create_volume(1) for _ in range(2)]
            sid = make_schedule(alice, volume_ids=vols, full_every=1)["id"]
            for run in range(1, 6):
                fire_now(database, sid)
                state = wait_run(alice, sid, run)
                assert state["runs_total"] == run, state
                assert len(wait_backups(database, sid, 2 * run)) == 2 * run
            time.sleep(0.5)
            state = alice.get(f"/os-backup-schedules/{sid}").json()["backup_schedule"]
            assert state["runs_total"] == 5 and state["failures_total"] == 0, state
            assert len(schedule_backups(database, sid)) == 10
            fired = [s.log().count(f"schedule {sid} fired") for s in (a, b)]
            assert sum(fired) == 5, fired
        finally:
            a.stop()
            b.stop()
            database.dispose()


# -- CLI ------------------------------------------------------------------------------------


def bv(server: Server, project: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLOCKVAULT_URL": server.url, "BLOCKVAULT_TOKEN": f"alice:{project}"}
    return subprocess.run([sys.executable, "-m", "blockvault.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_schedule_and_forget(srv, db):
    alice = project_client(srv)
    vol = alice.create_volume(1)
    out = bv(srv, alice.project, "schedule", "create", "--volume", vol, "--cron", "0 3 * * *",
             "--timezone", "Europe/Berlin", "--keep-daily", "7", "--keep-weekly", "4",
             "--full-every", "7", "--name", "nightly")
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip()
    shown = json.loads(bv(srv, alice.project, "schedule", "show", sid).stdout)
    assert (shown["cron"], shown["keep_daily"], shown["volume_ids"]) == ("0 3 * * *", 7, [vol])
    listed = bv(srv, alice.project, "schedule", "list").stdout
    assert sid in listed and "nightly" in listed
    bad = bv(srv, alice.project, "schedule", "create", "--volume", vol, "--cron", "nope")
    assert bad.returncode != 0 and "Invalid cron expression" in bad.stderr

    ids = [alice.create_backup(vol) for _ in range(3)]
    out = bv(srv, alice.project, "backup", "forget", "--volume", vol, "--keep-last", "2",
             "--dry-run")
    assert out.returncode == 0, out.stderr
    assert f"keep    {ids[2]}" in out.stdout and f"remove  {ids[0]}" in out.stdout
    assert len(alice.get("/backups").json()["backups"]) == 3
    out = bv(srv, alice.project, "backup", "forget", "--volume", vol, "--keep-last", "2")
    assert out.returncode == 0, out.stderr
    alice.wait("backup", ids[0], {"deleted"})
    assert sorted(b["id"] for b in alice.get("/backups").json()["backups"]) == sorted(ids[1:])
    out = bv(srv, alice.project, "backup", "forget", "--schedule", sid, "--dry-run")
    assert out.returncode == 0, out.stderr  # the schedule made none yet: nothing to say
    assert bv(srv, alice.project, "schedule", "delete", sid).returncode == 0
    assert alice.get(f"/os-backup-schedules/{sid}").status_code == 404


def test_docs_name_every_field():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "schedules.md").read_text()
    for column in Schedule.__table__.columns:
        if column.name not in ("id", "deleted", "project_id", "user_id"):
            assert f"`{column.name}`" in doc, column.name
