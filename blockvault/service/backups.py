"""Backup rules (reference §4 and §7): what may be backed up, restored, deleted,
exported and imported, and the status transitions each call makes.

Every decision is one transaction; long work is queued as a job in the same transaction,
so a backup row never exists without the work that will finish it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, bindparam, func, select, update
from sqlalchemy.orm import Session

from blockvault.db.models import Backup, Job, utcnow
from blockvault.db.session import Database
from blockvault.service.cinder_records import check_parent as check_cinder_parent
from blockvault.service.cinder_records import check_record as check_cinder_record
from blockvault.service.cinder_records import export_record as cinder_export_record
from blockvault.service.cinder_records import is_cinder, is_cinder_service
from blockvault.service.context import RequestContext
from blockvault.service.errors import (
    Invalid,
    NotFound,
    invalid_backup,
    invalid_input,
    invalid_volume,
)
from blockvault.service.jobs import enqueue_once
from blockvault.service.listing import ListSpec, Page, list_resources
from blockvault.service.quotas import Quotas
from blockvault.service.volumes import (
    DB_MAX_INT,
    VolumeService,
    visible_snapshot,
    visible_volume,
)

NULL_UUID = "00000000-0000-0000-0000-000000000000"

BACKUP_LIST = ListSpec(
    Backup,
    ("name", "status", "volume_id"),
    {"name": "display_name", "description": "display_description"},
    "Backup",
    # what api.views.backup_detail shows, and the page's marker (id)
    columns=("id", "user_id", "project_id", "volume_id", "availability_zone", "container",
             "parent_id", "status", "fail_reason", "size", "object_count", "display_name",
             "display_description", "num_dependent_backups", "snapshot_id", "data_timestamp",
             "encryption_key_id", "metadata_", "created_at", "updated_at"),
)

#: Every Backup object field of Cinder's export record (reference §4.8), in its order.
RECORD_FIELDS = (
    "id", "user_id", "project_id", "volume_id", "host", "availability_zone", "container",
    "parent_id", "status", "fail_reason", "size", "display_name", "display_description",
    "service_metadata", "service", "object_count", "temp_volume_id", "temp_snapshot_id",
    "num_dependent_backups", "snapshot_id", "data_timestamp", "restore_volume_id", "metadata",
    "encryption_key_id", "created_at", "updated_at", "deleted_at", "deleted",
)
_DATETIME_FIELDS = {"data_timestamp", "created_at", "updated_at", "deleted_at"}
#: Record fields holding ids of this service's rows. They are stored in canonical form
#: (lowercase, hyphenated): the DB compares ids exactly, so ``ABC…`` and ``abc…`` would be
#: two backups, and a parent link in the wrong case would point at nothing.
_RECORD_ID_FIELDS = ("id", "volume_id", "parent_id", "snapshot_id", "restore_volume_id",
                     "temp_volume_id", "temp_snapshot_id")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


@dataclass(frozen=True)
class RestoreTarget:
    backup_id: str
    volume_id: str
    volume_name: str | None


def visible_backup(s: Session, ctx: RequestContext, backup_id: str, lock: bool = False) -> Backup:
    stmt = select(Backup).where(Backup.id == backup_id, Backup.deleted.is_(False))
    if not ctx.is_admin:
        stmt = stmt.where(Backup.project_id == ctx.project_id)
    if lock:
        stmt = stmt.with_for_update()
    backup = s.scalars(stmt).first()
    if backup is None:
        raise NotFound(f"Backup {backup_id} could not be found.")
    return backup


def set_backup_status(s: Session, backup_id: str, expected: tuple[str, ...], **values: Any) -> bool:
    """One conditional UPDATE, so two workers or requests can never both win."""
    res = s.execute(
        update(Backup)
        .where(Backup.id == backup_id, Backup.status.in_(expected), Backup.deleted.is_(False))
        .values(updated_at=utcnow(), **values)
    )
    return res.rowcount == 1


def queue_job(
    s: Session, kind: str, backup_id: str, volume_id: str | None = None, *,
    route: str | None = None, **params: Any
) -> None:
    """Queue a job; ``route`` (HOST@BACKEND of the volume it reads or writes) keeps it for
    the workers that reach that volume (blockvault.service.jobs)."""
    s.add(Job(kind=kind, backup_id=backup_id, volume_id=volume_id, route=route,
              params=params))


def export_datetime(value: dt.datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_record_datetime(value: Any) -> dt.datetime | None:
    if value in (None, ""):
        return None
    text = str(value).replace(" ", "T")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


def backup_record(backup: Backup) -> dict[str, Any]:
    """The self-describing record of a backup (export_record's JSON, also kept in the store)."""
    record: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        value = backup.metadata_ if name == "metadata" else getattr(backup, name)
        if name in _DATETIME_FIELDS:
            value = export_datetime(value)
        record[name] = value
    record["driver_info"] = {}
    record["volume_meta"] = backup.volume_meta
    return record


#: An incremental's parent candidates: every live backup of the volume in the project,
#: locked (see BackupService._parent_candidates). Built once, only the ids are bound.
_PARENT_CANDIDATES = select(Backup.id, Backup.status, Backup.data_timestamp).where(
    Backup.volume_id == bindparam("volume_id"),
    Backup.project_id == bindparam("project_id"),
    Backup.deleted.is_(False),
).with_for_update()


class BackupService:
    def __init__(
        self,
        db: Database,
        volumes: VolumeService,
        quotas: Quotas,
        *,
        default_container: str,
        service_name: str,
        validate_container: Any,
        max_limit: int,
        wake_workers: Any = lambda: None,
    ) -> None:
        self.db = db
        self.volumes = volumes
        self.quotas = quotas
        self.default_container = default_container
        self.service_name = service_name
        self.validate_container = validate_container
        self.max_limit = max_limit
        self.wake_workers = wake_workers

    # -- read ---------------------------------------------------------------------------

    def get(self, ctx: RequestContext, backup_id: str) -> Backup:
        with self.db.reader() as s:
            backup = visible_backup(s, ctx, backup_id)
            ctx.authorize("backup:get", backup)
            return backup

    def list(self, ctx: RequestContext, params: dict[str, str], version: tuple[int, int]) -> Page:
        ctx.authorize("backup:get_all")
        with self.db.reader() as s:
            return list_resources(s, ctx, BACKUP_LIST, params, version, self.max_limit)

    def progress(self, ctx: RequestContext, backup_id: str) -> dict[str, Any]:
        """How far the latest create/restore/delete/import of a backup has got."""
        with self.db.reader() as s:
            backup = visible_backup(s, ctx, backup_id)
            ctx.authorize("backup:get", backup)
            job = s.scalars(
                select(Job)
                .where(Job.backup_id == backup_id, Job.kind.not_in(("verify", "record")))
                .order_by(Job.created_at.desc())
            ).first()
        rate = 0
        if job and job.started_at and job.bytes_done:
            seconds = ((job.finished_at or utcnow()) - job.started_at).total_seconds()
            rate = int(job.bytes_done / max(seconds, 1e-3))
        return {
            "backup_id": backup.id,
            "status": backup.status,
            "operation": job.kind if job else None,
            "job_state": job.state if job else None,
            "phase": job.phase if job else None,
            "bytes_done": job.bytes_done if job else 0,
            "bytes_total": job.bytes_total if job else 0,
            "bytes_per_second": rate,
        }

    def verify(self, ctx: RequestContext, backup_id: str) -> None:
        """Queue a check of every block of a backup (blockvault extension)."""
        with self.db.session() as s:
            backup = visible_backup(s, ctx, backup_id)
            ctx.authorize("blockvault:backup:verify", backup)
            if backup.status not in ("available", "error"):
                raise invalid_backup(
                    f"Backup status must be available or error to verify, not {backup.status}."
                )
            enqueue_once(s, "verify", backup_id, backup_id)  # one at a time per backup
        self.wake_workers()

    def verification(self, ctx: RequestContext, backup_id: str) -> Job | None:
        """The latest verify job of a backup, if any."""
        with self.db.reader() as s:
            ctx.authorize("backup:get", visible_backup(s, ctx, backup_id))
            return s.scalars(
                select(Job)
                .where(Job.backup_id == backup_id, Job.kind == "verify")
                .order_by(Job.created_at.desc())
            ).first()

    def verify_container(self, ctx: RequestContext, container: str) -> Job:
        """Queue a check of every block every backup of ``container`` references
        (blockvault extension, admin only: a container may hold several projects' backups,
        so its report is not a tenant's to see)."""
        ctx.authorize("blockvault:container:verify")
        reason = self.validate_container(container)
        if reason:
            raise invalid_input(f"Container name {container} is not valid: {reason}")
        with self.db.session() as s:
            # Jobs are keyed by backup; a container check belongs to none.
            job = enqueue_once(s, "verify_container", "", container,
                               project_id=ctx.project_id, container=container)
        self.wake_workers()
        return job

    def container_verification(self, ctx: RequestContext, verification_id: str) -> Job:
        ctx.authorize("blockvault:container:verify")
        with self.db.reader() as s:
            job = s.get(Job, verification_id)
            if job is None or job.kind != "verify_container":
                raise NotFound(f"Container verification {verification_id} could not be found.")
            return job

    # -- create -------------------------------------------------------------------------

    def create(
        self,
        ctx: RequestContext,
        volume_id: str,
        *,
        container: str | None = None,
        name: str | None = None,
        description: str | None = None,
        incremental: bool = False,
        force: bool = False,
        snapshot_id: str | None = None,
        metadata: dict[str, str] | None = None,
        availability_zone: str | None = None,
        schedule_id: str | None = None,
    ) -> Backup:
        # Before any lookup, as Cinder: the rule is on the caller's own project, so a 403
        # here says nothing about the volume.
        ctx.authorize("backup:create")
        if container:
            reason = self.validate_container(container)
            if reason:
                raise invalid_input(f"Container name {container} is not valid: {reason}")
        with self.db.session() as s:
            candidates: list[Backup] = []
            if incremental:
                # Parent candidates first, then the volume: the order a restore locks them
                # in (backup, then volume), so the two never deadlock. Locked, they are
                # still what they were when the parent is chosen below: not read twice.
                candidates = self._parent_candidates(s, ctx, volume_id)
            vol = visible_volume(s, ctx, volume_id, lock=True)
            snap = None
            if snapshot_id:
                snap = visible_snapshot(s, ctx, snapshot_id)
                if snap.volume_id != volume_id:
                    raise invalid_volume(
                        f"Volume {volume_id} does not match with snapshot.volume_id "
                        f"{snap.volume_id}."
                    )
                if snap.status != "available":
                    raise Invalid(
                        "Invalid snapshot: Snapshot to be backed up must be available, but the "
                        f'current status is "{snap.status}".'
                    )
            else:
                if vol.status not in ("available", "in-use"):
                    raise invalid_volume(
                        "Volume to be backed up must be available or in-use, but the current "
                        f'status is "{vol.status}".'
                    )
                if vol.status == "in-use" and not force:
                    raise invalid_volume("Backing up an in-use volume must use the force flag.")
            self.quotas.check_backup(s, ctx.project_id, vol.size)

            parent_id = None
            if incremental:
                parent_id = self._choose_parent(candidates, snap)

            backup = Backup(
                id=str(uuid.uuid4()),
                user_id=ctx.user_id,
                project_id=ctx.project_id,
                volume_id=volume_id,
                snapshot_id=snapshot_id,
                parent_id=parent_id,
                status="creating",
                display_name=name,
                display_description=description,
                container=container,
                availability_zone=availability_zone,
                schedule_id=schedule_id,
                size=vol.size,
                object_count=0,
                metadata_=dict(metadata or {}),
                volume_meta={
                    "display_name": vol.display_name,
                    "display_description": vol.display_description,
                    "metadata": dict(vol.metadata_ or {}),
                    "bootable": vol.bootable,
                },
            )
            backup.created_at = utcnow()
            backup.data_timestamp = snap.created_at if snap else backup.created_at
            s.add(backup)
            if snap is not None:
                snap.status = "backing-up"
            else:
                vol.previous_status, vol.status = vol.status, "backing-up"
            vol.updated_at = utcnow()
            s.flush()
            queue_job(s, "create", backup.id, volume_id, route=self.volumes.route_of(vol))
        self.wake_workers()
        return backup

    @staticmethod
    def _parent_candidates(s: Session, ctx: RequestContext, volume_id: str) -> list[Row]:
        # Locked (SELECT ... FOR UPDATE): a concurrent delete of the parent, which locks
        # the same row and then looks for children, either commits first (the parent is no
        # longer 'available' here) or waits and then sees this new child and refuses.
        # Only the columns the choice reads: a volume's chain grows with every backup, and
        # whole ORM objects (metadata and volume_meta JSON each) made this read the
        # costliest part of an incremental's create (FOR UPDATE still locks whole rows).
        return list(s.execute(_PARENT_CANDIDATES, {"volume_id": volume_id,
                                                   "project_id": ctx.project_id}))

    @staticmethod
    def _choose_parent(candidates: list[Row], snap: Any) -> str:
        usable = [
            b
            for b in candidates
            if b.status == "available"
            and b.data_timestamp is not None
            and (snap is None or b.data_timestamp < snap.created_at)
        ]
        if not usable:
            raise invalid_backup("No backups available to do an incremental backup.")
        return max(usable, key=lambda b: b.data_timestamp).id

    # -- update ---------------------------------------------------------------------------

    def update(self, ctx: RequestContext, backup_id: str, changes: dict[str, Any]) -> Backup:
        with self.db.session() as s:
            backup = visible_backup(s, ctx, backup_id, lock=True)
            ctx.authorize("backup:update", backup)
            for key, value in changes.items():
                setattr(backup, key, value)
            backup.updated_at = utcnow()
            if backup.status == "available" and backup.container:
                # keep the record in the store (what `blockvault recover` reads) current
                queue_job(s, "record", backup_id)
        self.wake_workers()
        return backup

    # -- delete ---------------------------------------------------------------------------

    def delete(self, ctx: RequestContext, backup_id: str, force: bool = False) -> None:
        with self.db.session() as s:
            backup = visible_backup(s, ctx, backup_id, lock=True)
            # Lookup first (another project's backup is 404, whatever the policy), then
            # Cinder's checks: force delete is its own admin rule, and runs the delete too.
            if force:
                ctx.authorize("volume_extension:backup_admin_actions:force_delete", backup)
            ctx.authorize("backup:delete", backup)
            if not force and backup.status not in ("available", "error"):
                raise invalid_backup("Backup status must be available or error")
            # Any project: an incremental is never orphaned (stricter than Cinder, §15).
            child = s.scalar(
                select(Backup.id).where(Backup.parent_id == backup_id, Backup.deleted.is_(False))
            )
            if child:
                raise invalid_backup("Incremental backups exist for this backup.")
            backup.status, backup.updated_at = "deleting", utcnow()
            queue_job(s, "delete", backup_id)
        self.wake_workers()

    # -- restore --------------------------------------------------------------------------

    def restore(
        self, ctx: RequestContext, backup_id: str, volume_id: str | None, name: str | None
    ) -> RestoreTarget:
        if volume_id is not None:
            return self._start_restore(ctx, backup_id, volume_id)
        # A new target (reference §7.5): made in the same transaction that moves the backup
        # to 'restoring', so a restore that loses the race for the backup (it is no longer
        # 'available') rolls its volume back too: no orphan row, quota or file.
        with self.volumes.new_files() as made, self.db.session() as s:
            backup = visible_backup(s, ctx, backup_id, lock=True)
            ctx.authorize("backup:restore", backup)
            ctx.authorize("volume:create")  # Cinder's restore creates the target as a volume
            self._check_restorable(backup)
            vol = self.volumes.new_volume(
                s, made, ctx, backup.size, name=name or f"restore_backup_{backup_id}",
                description="auto-created_from_restore_from_backup",
            )
            result = self._begin_restore(s, backup, vol, target_is_new=True)
        self.wake_workers()
        return result

    def _start_restore(self, ctx: RequestContext, backup_id: str, volume_id: str) -> RestoreTarget:
        with self.db.session() as s:
            backup = visible_backup(s, ctx, backup_id, lock=True)
            ctx.authorize("backup:restore", backup)
            self._check_restorable(backup)
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume:get", vol)
            result = self._begin_restore(s, backup, vol, target_is_new=False)
        self.wake_workers()
        return result

    def _begin_restore(
        self, s: Session, backup: Backup, vol: Any, target_is_new: bool
    ) -> RestoreTarget:
        """The target's checks and both transitions, inside the caller's transaction."""
        volume_id, backup_id = vol.id, backup.id
        if vol.status != "available":
            raise invalid_volume("Volume to be restored to must be available")
        if backup.size > vol.size:
            raise invalid_volume(
                f"volume size {vol.size} is too small to restore backup of size "
                f"{backup.size}."
            )
        backup.status, backup.restore_volume_id = "restoring", volume_id
        backup.updated_at = utcnow()
        vol.previous_status, vol.status = vol.status, "restoring-backup"
        vol.updated_at = utcnow()
        queue_job(s, "restore", backup_id, volume_id, route=self.volumes.route_of(vol),
                  target_is_new=target_is_new)
        return RestoreTarget(backup_id, volume_id, vol.display_name)

    def create_volume_from_backup(
        self, ctx: RequestContext, backup_id: str, size: int | None, **volume: Any
    ) -> str:
        """A new volume holding a backup's data (volume create with ``backup_id``, 3.47):
        created at once, then restored into like any restore target. Returns its id."""
        backup = self.get(ctx, backup_id)  # backup:get, then volume:create, as Cinder
        ctx.authorize("volume:create")
        if backup.status != "available":
            raise invalid_backup(f"Backup status must be available and not {backup.status}.")
        self._check_restorable(backup)
        size = backup.size if size is None else size
        if size < backup.size:
            raise invalid_volume(
                f"volume size {size} is too small to restore backup of size {backup.size}."
            )
        self.volumes.check_placement(volume.pop("volume_type", None),
                                     volume.pop("availability_zone", None))
        # One transaction, as for a restore without volume_id: the volume exists only if
        # the backup was still available when it moved to 'restoring'.
        with self.volumes.new_files() as made, self.db.session() as s:
            backup = visible_backup(s, ctx, backup_id, lock=True)
            if backup.status != "available":
                raise invalid_backup(f"Backup status must be available and not {backup.status}.")
            self._check_restorable(backup)
            vol = self.volumes.new_volume(s, made, ctx, size, **volume)
            self._begin_restore(s, backup, vol, target_is_new=True)
        self.wake_workers()
        return vol.id

    @staticmethod
    def _check_restorable(backup: Backup) -> None:
        if backup.status != "available":
            raise invalid_backup("Backup status must be available")
        if backup.size is None:
            raise invalid_backup("Backup to be restored has invalid size")

    # -- admin actions ----------------------------------------------------------------------

    def reset_status(self, ctx: RequestContext, backup_id: str, status: str) -> None:
        status = status.lower()
        if status not in ("available", "error"):
            raise Invalid(
                f"Invalid input for field/attribute status. Value: {status}. "
                f"'{status}' is not a 'backup_status'"
            )
        with self.db.session() as s:
            # Lookup before policy (Cinder's order, after the body's schema): another
            # project's backup is 404 to a non-admin, exactly like an id that does not
            # exist; a 403 would tell them it exists.
            backup = visible_backup(s, ctx, backup_id, lock=True)
            ctx.authorize("volume_extension:backup_admin_actions:reset_status", backup)
            backup.status, backup.updated_at = status, utcnow()

    def export_record(self, ctx: RequestContext, backup_id: str) -> dict[str, str]:
        with self.db.reader() as s:
            # Lookup, then policy, then status, in Cinder's order (see reset_status).
            backup = visible_backup(s, ctx, backup_id)
            ctx.authorize("backup:export-import", backup)
            if backup.status != "available":
                raise invalid_backup(
                    f"Backup status must be available and not {backup.status}."
                )
            if is_cinder(backup):  # Cinder's record again, as Cinder exports it
                return cinder_export_record(backup)
            record = backup_record(backup)
        url = base64.b64encode(json.dumps(record).encode()).decode("ascii")
        return {"backup_service": backup.service or self.service_name, "backup_url": url}

    def import_record(self, ctx: RequestContext, backup_service: str, backup_url: str) -> Backup:
        ctx.authorize("backup:backup-import")
        try:
            raw = base64.b64decode(backup_url.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise Invalid(
                f"Invalid input for field/attribute backup_url. Value: {backup_url}. "
                f"'{backup_url}' is not a 'base64'"
            ) from None
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise invalid_input("Can't parse backup record.") from None
        if not isinstance(record, dict):
            raise invalid_input("Can't parse backup record.")
        if not record.get("id"):
            raise invalid_input("Provided backup record is missing an id")
        record = _canonical_ids(record)
        backup_id = record["id"]
        if "size" not in record:
            raise invalid_input("Provided backup record is missing size attribute")
        size = record["size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= DB_MAX_INT:
            raise invalid_input(
                f"Backup record size must be an integer from 0 to {DB_MAX_INT}."
            )
        cinder = is_cinder_service(backup_service)
        if cinder:  # a record Cinder's chunked driver wrote (blockvault.service.cinder_import)
            check_cinder_record(backup_service, record)
        with self.db.session() as s:
            if cinder:
                check_cinder_parent(s, ctx, record)
            # Case-insensitive, as Cinder's MySQL compares: a row stored in another case
            # before ids were made canonical is still this backup.
            existing = s.scalars(
                select(Backup).where(func.lower(Backup.id) == backup_id)
            ).first()
            if existing is not None and not existing.deleted:
                raise invalid_backup("Backup already exists in database.")
            self.quotas.check_backup(s, ctx.project_id, size)
            if existing is not None:
                s.delete(existing)
                s.flush()
            backup = Backup(
                id=backup_id,
                user_id=ctx.user_id,
                project_id=ctx.project_id,
                volume_id=NULL_UUID,
                status="creating",
                size=size,
                object_count=0,
                metadata_={},
                created_at=utcnow(),
            )
            s.add(backup)
            s.flush()
            queue_job(s, "import", backup_id, backup_service=backup_service, record=record)
        self.wake_workers()
        return backup


def _canonical_ids(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its ids in canonical form (lowercase). Upper- or mixed-case ids are
    the same ids (Cinder's MySQL compares them case-insensitively), so they are normalised,
    not refused; anything that is not a hyphenated UUID is refused (400)."""
    out = dict(record)
    for name in _RECORD_ID_FIELDS:
        value = out.get(name)
        if value is None or (name != "id" and value == ""):
            continue
        if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
            shown = str(value)[:60]
            raise invalid_input(f"Backup record {name} {shown!r} is not a UUID.")
        out[name] = value.lower()
    return out
