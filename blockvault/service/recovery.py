"""Start-up safety net: a row in a transitional status with no job that will move it on
(possible only after manual DB surgery or a crash before the job table existed) is put in
the reference's error state instead of staying stuck forever."""

from __future__ import annotations

import logging

from sqlalchemy import exists, select, update

from blockvault.db.models import Backup, Job, Snapshot, Volume, utcnow
from blockvault.db.session import Database

log = logging.getLogger("blockvault.recovery")


def sweep_orphans(db: Database) -> None:
    active = exists().where(Job.backup_id == Backup.id, Job.state.in_(("queued", "running")))
    with db.session() as s:
        stuck = list(
            s.scalars(
                select(Backup).where(
                    Backup.status.in_(("creating", "restoring", "deleting")),
                    Backup.deleted.is_(False),
                    ~active,
                )
            )
        )
        for b in stuck:
            log.warning("backup %s was left %s with no job; resolving", b.id, b.status)
            if b.status == "creating":
                b.status, b.fail_reason = "error", "incomplete backup reset on restart"
            elif b.status == "restoring":
                b.status = "available"
                if b.restore_volume_id:
                    s.execute(
                        update(Volume)
                        .where(Volume.id == b.restore_volume_id,
                               Volume.status == "restoring-backup")
                        .values(status="error_restoring", updated_at=utcnow())
                    )
            else:
                b.status, b.fail_reason = "error_deleting", "delete interrupted on restart"
            b.updated_at = utcnow()
        busy_vols = exists().where(
            Backup.volume_id == Volume.id, Backup.status == "creating", Backup.deleted.is_(False)
        )
        for vol in s.scalars(select(Volume).where(Volume.status == "backing-up", ~busy_vols)):
            vol.status = vol.previous_status or "available"
            vol.previous_status = "error_backing-up"
        # A write through the data API never outlives its process.
        s.execute(
            update(Volume).where(Volume.status == "uploading")
            .values(status="available", updated_at=utcnow())
        )
        busy_snaps = exists().where(
            Backup.snapshot_id == Snapshot.id, Backup.status == "creating",
            Backup.deleted.is_(False),
        )
        for snap in s.scalars(
            select(Snapshot).where(Snapshot.status == "backing-up", ~busy_snaps)
        ):
            snap.status = "available"
