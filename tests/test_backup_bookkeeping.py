"""A backup's bookkeeping reads only what it needs (issue 11: the fixed cost of an
incremental from a dirty bitmap), and still decides what it decided before.

The service as `blockvault serve` builds it (no job runner), on a real SQLite file and a
real PostgreSQL (tests/pg.py): the backup quota check against the general limits and
usage the quota API shows, an incremental's parent chosen from column rows, and a failed
backup's volume put back by one conditional UPDATE.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update

from blockvault.config import load_settings
from blockvault.db.models import Backup, Job, Snapshot, Volume
from blockvault.server import Services
from blockvault.service.context import RequestContext
from blockvault.service.errors import Invalid, OverQuota
from tests.pg import pg_database


@pytest.fixture(params=("sqlite", "postgresql"))
def svc(request, tmp_path) -> Iterator[Services]:
    def build(url: str = "") -> Services:
        return Services(load_settings(None, data_dir=tmp_path / "bv", database_url=url,
                                      quota_backups=4, quota_backup_gigabytes=10),
                        run_jobs=False)

    if request.param == "sqlite":
        services = build()
        yield services
        services.db.dispose()
    else:
        with pg_database() as url:
            services = build(url)
            yield services
            services.db.dispose()


def _ctx() -> RequestContext:
    return RequestContext(user_id="u", project_id=uuid.uuid4().hex)


def _volume(svc: Services, ctx: RequestContext, size: int, status: str = "available") -> str:
    vol = svc.volumes.create(ctx, size)
    with svc.db.session() as s:  # data setup: what attach or the create job would leave
        s.execute(update(Volume).where(Volume.id == vol.id).values(status=status))
    return vol.id


def _settle(svc: Services, backup_id: str, status: str = "available",
            at: dt.datetime | None = None) -> None:
    """What a finished create job leaves: the backup in ``status``, its volume back."""
    with svc.db.session() as s:
        b = s.get(Backup, backup_id)
        b.status = status
        if at is not None:
            b.data_timestamp = at
        s.execute(update(Volume).where(Volume.id == b.volume_id)
                  .values(status=Volume.previous_status))


def _general(svc: Services, project: str) -> tuple[dict, dict]:
    """Limits and usage as the quota API reports them (every resource)."""
    with svc.db.reader() as s:
        return svc.quotas.limits(s, project), svc.quotas.usage(s, project)


def _backup_view(svc: Services, project: str) -> tuple[dict, dict]:
    with svc.db.reader() as s:
        return svc.quotas._backup_limits_and_usage(s, project)


def _agrees(svc: Services, project: str) -> None:
    limits, used = _general(svc, project)
    keys = ("backups", "backup_gigabytes")
    assert _backup_view(svc, project) == ({k: limits[k] for k in keys},
                                          {k: used[k] for k in keys})


def test_backup_quota_counts_what_the_quota_api_counts(svc):
    alice, bob = _ctx(), _ctx()
    _agrees(svc, alice.project_id)  # nothing yet: the defaults, nothing used
    vol = _volume(svc, alice, 3)
    other = _volume(svc, bob, 2)
    first = svc.backups.create(alice, vol).id
    _settle(svc, first)
    svc.backups.create(bob, other)  # another project's backup is not alice's usage
    gone = svc.backups.create(alice, vol, incremental=True).id  # deleted: not counted
    with svc.db.session() as s:
        s.execute(update(Backup).where(Backup.id == gone).values(deleted=True, status="deleted"))
        s.execute(update(Volume).where(Volume.id == vol).values(status="available"))
    assert _backup_view(svc, alice.project_id)[1] == {"backups": 1, "backup_gigabytes": 3}
    _agrees(svc, alice.project_id)
    with svc.db.session() as s:  # an override of one limit; the other stays the default
        svc.quotas.set_limits(s, alice.project_id, {"backups": -1})
    assert _backup_view(svc, alice.project_id)[0] == {"backups": -1, "backup_gigabytes": 10}
    _agrees(svc, alice.project_id)
    with svc.db.session() as s:
        svc.quotas.set_limits(s, alice.project_id, {"backup_gigabytes": 0})
    assert _backup_view(svc, alice.project_id)[0] == {"backups": -1, "backup_gigabytes": 0}
    _agrees(svc, alice.project_id)
    _agrees(svc, bob.project_id)


def test_backup_quota_limits_and_messages(svc):
    ctx = _ctx()
    vol = _volume(svc, ctx, 3)
    for _ in range(3):  # 3 backups, 9 GiB of the defaults' 4 and 10
        _settle(svc, svc.backups.create(ctx, vol).id)
    with pytest.raises(OverQuota) as exc:  # 9 + 3 > 10
        svc.backups.create(ctx, vol)
    assert (exc.value.kind, str(exc.value)) == (
        "VolumeBackupSizeExceedsAvailableQuota",
        "Requested backup exceeds allowed Backup gigabytes quota. Requested 3G, quota is "
        "10G and 9G has been consumed.")
    with svc.db.session() as s:
        svc.quotas.set_limits(s, ctx.project_id, {"backup_gigabytes": 12, "backups": 3})
    with pytest.raises(OverQuota) as exc:  # the count is checked first, as Cinder
        svc.backups.create(ctx, vol)
    assert (exc.value.kind, str(exc.value)) == (
        "BackupLimitExceeded", "Maximum number of backups allowed (3) exceeded")
    with svc.db.session() as s:
        svc.quotas.set_limits(s, ctx.project_id, {"backups": 4})
    _settle(svc, svc.backups.create(ctx, vol).id)  # exactly at both limits: allowed
    assert _backup_view(svc, ctx.project_id)[1] == {"backups": 4, "backup_gigabytes": 12}
    with svc.db.session() as s:  # volumes and snapshots over their own quotas: no matter
        svc.quotas.set_limits(s, ctx.project_id, {"volumes": 0, "gigabytes": 0,
                                                   "snapshots": 0, "backups": -1,
                                                   "backup_gigabytes": -1})
    assert svc.backups.create(ctx, vol).status == "creating"


def test_incremental_parent_from_column_rows(svc):
    ctx = _ctx()
    vol = _volume(svc, ctx, 1)
    with svc.db.session() as s:
        svc.quotas.set_limits(s, ctx.project_id, {"backups": -1})
    with pytest.raises(Invalid, match="No backups available to do an incremental backup"):
        svc.backups.create(ctx, vol, incremental=True)
    t0 = dt.datetime(2026, 11, 29, 12, 0, 0)
    old = svc.backups.create(ctx, vol).id
    _settle(svc, old, at=t0)
    new = svc.backups.create(ctx, vol).id
    _settle(svc, new, at=t0 + dt.timedelta(hours=2))
    failed = svc.backups.create(ctx, vol).id  # newest, but in error: never a parent
    _settle(svc, failed, status="error", at=t0 + dt.timedelta(hours=3))
    inc = svc.backups.create(ctx, vol, incremental=True)
    assert inc.parent_id == new
    _settle(svc, inc.id, status="error")
    snap = svc.volumes.create_snapshot(ctx, vol, None, None)
    with svc.db.session() as s:  # a snapshot taken between the two backups' data
        s.execute(update(Snapshot).where(Snapshot.id == snap.id).values(
            status="available", created_at=t0 + dt.timedelta(hours=1)))
    inc = svc.backups.create(ctx, vol, incremental=True, snapshot_id=snap.id)
    assert inc.parent_id == old  # the newest backup older than the snapshot's data


@pytest.mark.parametrize("before,after", [("in-use", "in-use"), (None, "available"),
                                          ("", "available")])
def test_failed_backup_puts_the_volume_back(svc, before, after):
    """The runner's failure entry (the job's backup and volume read by columns, then one
    conditional UPDATE of the volume)."""
    ctx = _ctx()
    vol = _volume(svc, ctx, 1, status=before or "available")
    backup = svc.backups.create(ctx, vol, force=True).id
    with svc.db.session() as s:
        s.execute(update(Volume).where(Volume.id == vol).values(previous_status=before))
        job = s.scalars(select(Job).where(Job.backup_id == backup)).one()
        svc.tasks.fail(s, job, "the export went away")
    with svc.db.reader() as s:
        v = s.get(Volume, vol)
        b = s.get(Backup, backup)
        assert (v.status, v.previous_status) == (after, "error_backing-up")
        assert (b.status, b.fail_reason) == ("error", "the export went away")
    with svc.db.session() as s:  # the volume is no longer backing-up: nothing changes
        svc.tasks.fail(s, job, "again")
    with svc.db.reader() as s:
        assert s.get(Volume, vol).status == after
