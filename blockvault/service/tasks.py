"""What workers do for each job kind: drive the engine and record the outcome with
conditional updates. Every handler is idempotent, so a job re-run after a crash is safe.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select, update

from blockvault.db.models import Backup, Job, Snapshot, Volume, utcnow
from blockvault.db.session import Database
from blockvault.engine import Engine
from blockvault.engine.errors import Cancelled, EngineError, KeyMismatch
from blockvault.service.backups import (
    backup_record,
    parse_record_datetime,
    set_backup_status,
)
from blockvault.service.volumes import set_volume_status
from blockvault.store import StoreError
from blockvault.volume import RawFileDriver

log = logging.getLogger("blockvault.tasks")

GiB = 1024**3
#: DB columns are String(255); Cinder cuts fail_reason there too.
FAIL_REASON_MAX = 255
_CHECK_EVERY = 1.0


def fail_reason(exc: BaseException) -> str:
    """A sentence a person understands, never a credential (store errors are scrubbed at
    the source)."""
    if isinstance(exc, StoreError | EngineError):
        text = str(exc)
    else:
        text = f"unexpected {type(exc).__name__}: {exc}"
    return text[:FAIL_REASON_MAX]


class Tasks:
    def __init__(
        self,
        db: Database,
        engine: Engine,
        driver: RawFileDriver,
        *,
        default_container: str,
        availability_zone: str,
        service_name: str,
        host: str,
    ) -> None:
        self.db = db
        self.engine = engine
        self.driver = driver
        self.default_container = default_container
        self.availability_zone = availability_zone
        self.service_name = service_name
        self.host = host
        # Containers whose garbage collection was (or may have been) skipped because a
        # backup was running there; collected once no backup runs in them any more.
        self._gc_owed: set[str] = set()
        self._gc_mu = threading.Lock()

    def handlers(self) -> dict[str, Callable[[Job], None]]:
        return {
            "create": self.create,
            "restore": self.restore,
            "delete": self.delete,
            "import": self.import_record,
            "verify": self.verify,
            "verify_container": self.verify_container,
            "record": self.write_record,
        }

    # -- helpers ----------------------------------------------------------------------------

    def _watch(self, backup_id: str, expected: str) -> Callable[[], bool]:
        """A cheap ``cancelled()`` for the engine: re-reads the status at most once a second."""
        state = {"at": 0.0, "cancelled": False}

        def cancelled() -> bool:
            now = time.monotonic()
            if now - state["at"] >= _CHECK_EVERY:
                state["at"] = now
                with self.db.session() as s:
                    status = s.scalar(select(Backup.status).where(Backup.id == backup_id))
                state["cancelled"] = status != expected
            return state["cancelled"]

        return cancelled

    def _progress(self, job_id: str) -> Callable[[int, int, str], None]:
        state = {"at": 0.0}

        def progress(done: int, total: int, phase: str) -> None:
            now = time.monotonic()
            if now - state["at"] < _CHECK_EVERY and done < total:
                return
            state["at"] = now
            try:
                with self.db.session() as s:
                    s.execute(
                        update(Job)
                        .where(Job.id == job_id)
                        .values(bytes_done=done, bytes_total=total, phase=phase)
                    )
            except Exception:  # progress is advisory; never fail a backup over it
                log.debug("progress update failed", exc_info=True)

        return progress

    # -- create -----------------------------------------------------------------------------

    def create(self, job: Job) -> None:
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            if backup is None or backup.status != "creating":
                self._release_source(s, job)
                return
            vol = s.get(Volume, backup.volume_id)
            container = backup.container or self.default_container
            backup.container = container
            backup.host, backup.service = self.host, self.service_name
            backup.service_metadata = backup.id
            backup.availability_zone = backup.availability_zone or self.availability_zone
            source = (
                self.driver.snapshot_path(backup.snapshot_id)
                if backup.snapshot_id
                else self.driver.volume_path(backup.volume_id)
            )
            parent = s.get(Backup, backup.parent_id) if backup.parent_id else None
            parent_id = parent.id if parent is not None and parent.container == container else None
            size = backup.size * GiB
            volume_size = vol.size if vol is not None else backup.size
            whole_volume = backup.snapshot_id is None
        # Changed-region hints only for a backup of the live volume against its parent.
        changes = self.driver.changes(backup.volume_id) if whole_volume else None
        stamp = changes.stamp() if changes else None
        hint = changes.hint(parent_id) if changes and parent_id else None
        try:
            result = self.engine.backup(
                container=container,
                backup_id=job.backup_id,
                source=source,
                size=size,
                parent_id=parent_id,
                progress=self._progress(job.id),
                cancelled=self._watch(job.backup_id, "creating"),
                changed=hint,
            )
            with self.db.session() as s:
                backup = s.get(Backup, job.backup_id)
                record = backup_record(backup)
                record.update(status="available", object_count=result.object_count,
                              size=volume_size)
            self.engine.write_record(container=container, backup_id=job.backup_id, record=record)
            if changes is not None:
                changes.reset(job.backup_id, stamp)
        except Cancelled:
            log.info("backup %s cancelled", job.backup_id)
            with self.db.session() as s:
                self._release_source(s, job)
            self._collect_garbage(container, owed=True)  # packs it uploaded are garbage now
            return
        except Exception as exc:
            log.warning("backup %s failed: %s", job.backup_id, exc, exc_info=not isinstance(
                exc, StoreError | EngineError))
            self.fail(job, fail_reason(exc))
            self._collect_garbage(container, owed=True)
            return
        with self.db.session() as s:
            won = set_backup_status(
                s, job.backup_id, ("creating",), status="available",
                object_count=result.object_count, stored_bytes=result.stored_bytes,
                size=volume_size, fail_reason=None,
            )
            if won and backup.parent_id:
                s.execute(
                    update(Backup)
                    .where(Backup.id == backup.parent_id)
                    .values(num_dependent_backups=Backup.num_dependent_backups + 1)
                )
            self._release_source(s, job)
        self._collect_garbage(container)

    def _release_source(self, s: Any, job: Job, failed: bool = False) -> None:
        """Put the volume (or snapshot) back to the status it had before the backup."""
        backup = s.get(Backup, job.backup_id)
        if backup is None:
            return
        if backup.snapshot_id:
            s.execute(
                update(Snapshot)
                .where(Snapshot.id == backup.snapshot_id, Snapshot.status == "backing-up")
                .values(status="available", updated_at=utcnow())
            )
            return
        vol = s.get(Volume, backup.volume_id)
        if vol is not None and vol.status == "backing-up":
            set_volume_status(
                s, vol.id, ("backing-up",),
                status=vol.previous_status or "available",
                previous_status="error_backing-up" if failed else "backing-up",
            )

    # -- restore ----------------------------------------------------------------------------

    def restore(self, job: Job) -> None:
        # The target's bytes are about to change behind its change map.
        self.driver.changes(job.volume_id).invalidate()
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            if backup is None or backup.status != "restoring":
                set_volume_status(s, job.volume_id, ("restoring-backup",), status="error_restoring")
                return
            container = backup.container or self.default_container
        try:
            self.engine.restore(
                container=container,
                backup_id=job.backup_id,
                target=self.driver.volume_path(job.volume_id),
                target_is_new=bool(job.params.get("target_is_new")),
                progress=self._progress(job.id),
                cancelled=self._watch(job.backup_id, "restoring"),
            )
        except Exception as exc:
            if not isinstance(exc, Cancelled):
                log.warning("restore of backup %s failed: %s", job.backup_id, exc)
            self.fail(job, "restore cancelled" if isinstance(exc, Cancelled) else fail_reason(exc))
            return
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            vol = s.get(Volume, job.volume_id)
            meta = backup.volume_meta or {}
            values: dict[str, Any] = {
                "status": "available",
                "previous_status": "restoring-backup",
                "metadata_": {**(vol.metadata_ or {}), **meta.get("metadata", {})},
                "bootable": bool(meta.get("bootable", vol.bootable)),
            }
            if backup.volume_id != vol.id:
                values["metadata_"]["src_backup_id"] = backup.id
            if (vol.display_name or "").startswith("restore_backup_") and meta:
                values["display_name"] = meta.get("display_name") or vol.display_name
                values["display_description"] = meta.get("display_description")
            set_volume_status(s, vol.id, ("restoring-backup",), **values)
            set_backup_status(s, job.backup_id, ("restoring",), status="available",
                              fail_reason=None)

    # -- delete -----------------------------------------------------------------------------

    def delete(self, job: Job) -> None:
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            if backup is None or backup.status != "deleting":
                return
            container = backup.container
        try:
            if container:
                self.engine.delete(container=container, backup_id=job.backup_id)
                # The engine skips collection while a backup runs in the container.
                if self._backup_running_in(container):
                    with self._gc_mu:
                        self._gc_owed.add(container)
        except Exception as exc:
            log.warning("delete of backup %s failed: %s", job.backup_id, exc)
            self.fail(job, fail_reason(exc))
            return
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            won = set_backup_status(
                s, job.backup_id, ("deleting",), status="deleted", deleted=True,
                deleted_at=utcnow(),
            )
            if won and backup.parent_id:
                s.execute(
                    update(Backup)
                    .where(Backup.id == backup.parent_id, Backup.num_dependent_backups > 0)
                    .values(num_dependent_backups=Backup.num_dependent_backups - 1)
                )

    # -- garbage collection -------------------------------------------------------------------

    def _backup_running_in(self, container: str) -> bool:
        with self.db.session() as s:
            return s.scalar(
                select(Backup.id).where(Backup.container == container,
                                        Backup.status == "creating").limit(1)
            ) is not None

    def _collect_garbage(self, container: str, owed: bool = False) -> None:
        """Collect ``container`` if a collection is owed and no backup runs there now.
        Best effort: garbage only costs space, and the next attempt collects it."""
        with self._gc_mu:
            if owed:
                self._gc_owed.add(container)
            if container not in self._gc_owed:
                return
        if self._backup_running_in(container):
            return
        try:
            done = self.engine.collect_garbage(container=container)
        except (StoreError, EngineError) as exc:
            log.warning("garbage collection in %s failed: %s", container, exc)
            return
        if done:
            with self._gc_mu:
                self._gc_owed.discard(container)

    # -- import -----------------------------------------------------------------------------

    def import_record(self, job: Job) -> None:
        record: dict[str, Any] = job.params["record"]
        service = job.params.get("backup_service") or ""
        if not self.service_name.startswith(service):
            self.fail(job, "Import record failed, cannot find backup service to perform the "
                           f"import. Request service {service}.")
            return
        required = ("display_name", "display_description", "container", "size",
                    "service_metadata", "object_count", "id")
        missing = [k for k in required if k not in record]
        if missing:
            self.fail(job, "Driver successfully decoded imported backup data, but there are "
                           f"missing fields ({', '.join(missing)}).")
            return
        container = record["container"] or self.default_container
        source_id = record.get("service_metadata") or record["id"]
        try:
            uuid.UUID(str(source_id))
            if not isinstance(container, str):
                raise ValueError("container is not a string")
            if not self.engine.has_backup(container=container, backup_id=source_id):
                raise LookupError(
                    f"Import record failed: no backup data for {source_id} in container "
                    f"{container}."
                )
            try:  # proves the configured key opens the container, before claiming success
                self.engine.read_record(container=container, backup_id=source_id)
            except KeyMismatch:
                raise
            except EngineError:
                pass  # a missing record is no reason to refuse: the manifest is what restores
            if source_id != job.backup_id:
                # Each backup owns its own manifest, so deleting one copy of an
                # export/import pair never breaks the other (packs are shared by reference).
                self.engine.clone_backup(
                    container=container, source_id=source_id, target_id=job.backup_id
                )
        except (ValueError, LookupError, StoreError, EngineError) as exc:
            self.fail(job, str(exc)[:FAIL_REASON_MAX])
            return
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            if backup is None or backup.status != "creating":
                return
            backup.volume_id = record.get("volume_id") or backup.volume_id
            backup.parent_id = record.get("parent_id")
            backup.display_name = record.get("display_name")
            backup.display_description = record.get("display_description")
            backup.container = container
            backup.size = record["size"]
            backup.object_count = record.get("object_count") or 0
            backup.snapshot_id = record.get("snapshot_id")
            backup.encryption_key_id = record.get("encryption_key_id")
            backup.metadata_ = record.get("metadata") or {}
            backup.volume_meta = record.get("volume_meta")
            backup.created_at = parse_record_datetime(record.get("created_at")) or backup.created_at
            backup.data_timestamp = (
                parse_record_datetime(record.get("data_timestamp")) or backup.created_at
            )
            backup.service, backup.host = self.service_name, self.host
            backup.availability_zone = self.availability_zone
            backup.service_metadata = job.backup_id
            backup.num_dependent_backups = s.scalar(
                select(func.count()).where(
                    Backup.parent_id == job.backup_id,
                    Backup.deleted.is_(False),
                    Backup.status == "available",
                )
            )
            backup.status, backup.updated_at = "available", utcnow()
            if backup.parent_id:
                s.execute(
                    update(Backup)
                    .where(Backup.id == backup.parent_id, Backup.deleted.is_(False))
                    .values(num_dependent_backups=Backup.num_dependent_backups + 1)
                )

    # -- record -----------------------------------------------------------------------------

    def write_record(self, job: Job) -> None:
        """Rewrite a backup's record in the store after its name, description or metadata
        changed. Best effort: the DB stays the truth and export_record reads it."""
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            if backup is None or backup.status != "available" or not backup.container:
                return
            record = backup_record(backup)
            container = backup.container
        try:
            self.engine.write_record(container=container, backup_id=job.backup_id,
                                     record=record)
        except (StoreError, EngineError) as exc:
            log.warning("record of backup %s not updated: %s", job.backup_id, exc)

    # -- verify -----------------------------------------------------------------------------

    def verify(self, job: Job) -> None:
        """Check every block of a backup: present, decrypts, hash matches. The backup's
        status is not touched; the report is the job's result."""
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            container = backup.container if backup is not None else None
        if not container:
            report = {"ok": False, "checked_blocks": 0, "missing": [], "corrupt": [],
                      "error": "the backup holds no data to verify"}
        else:
            report = self._verify_report(container, job.backup_id)
        with self.db.session() as s:
            s.execute(update(Job).where(Job.id == job.id).values(result=report))

    def verify_container(self, job: Job) -> None:
        """Check every block every backup of a container references."""
        report = self._verify_report(job.params["container"], None)
        with self.db.session() as s:
            s.execute(update(Job).where(Job.id == job.id).values(result=report))

    def _verify_report(self, container: str, backup_id: str | None) -> dict:
        try:
            rep = self.engine.verify(container=container, backup_id=backup_id)
        except (StoreError, EngineError) as exc:
            return {"ok": False, "checked_blocks": 0, "missing": [], "corrupt": [],
                    "error": fail_reason(exc)}
        return {"ok": rep.ok, "checked_blocks": rep.checked_blocks,
                "missing": rep.missing, "corrupt": rep.corrupt, "error": None}

    # -- failure ----------------------------------------------------------------------------

    def fail(self, job: Job, reason: str) -> None:
        """Record a failed job in the reference's error states."""
        reason = reason[:FAIL_REASON_MAX]
        with self.db.session() as s:
            if job.kind in ("create", "import"):
                set_backup_status(s, job.backup_id, ("creating",), status="error",
                                  fail_reason=reason)
                if job.kind == "create":
                    self._release_source(s, job, failed=True)
            elif job.kind == "restore":
                set_backup_status(s, job.backup_id, ("restoring",), status="available",
                                  fail_reason=reason)
                set_volume_status(s, job.volume_id, ("restoring-backup",),
                                  status="error_restoring")
            elif job.kind == "delete":
                set_backup_status(s, job.backup_id, ("deleting",), status="error",
                                  fail_reason=reason)
