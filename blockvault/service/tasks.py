"""What workers do for each job kind: drive the engine and record the outcome with
conditional updates. Every handler is idempotent, so a job re-run after a crash is safe.

Each create or import attempt writes its objects under a storage id of its own
(``<backup id>.<token>``, :func:`blockvault.service.jobs.storage_id`); only the attempt that
wins the fenced outcome write records it in ``backups.service_metadata``, and every other
attempt's objects are discarded. Every engine call about an existing backup uses that
storage id (rows from before storage ids have ``service_metadata == id``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from blockvault.db.models import Backup, Job, Snapshot, Volume, utcnow
from blockvault.db.session import Database
from blockvault.engine import Engine
from blockvault.engine.errors import Cancelled, EngineError, KeyMismatch, TargetError
from blockvault.metrics.instruments import JobMetrics
from blockvault.service.backups import (
    backup_record,
    parse_record_datetime,
    set_backup_status,
)
from blockvault.service.cinder_import import CinderBackups, CinderStore, is_dedup_parent
from blockvault.service.cinder_records import CINDER_DRIVERS, is_cinder, is_cinder_service
from blockvault.service.jobs import (
    DurableWriter,
    attempt_is_current,
    attempt_storage_ids,
    finish_job,
    internal_error,
    storage_id,
)
from blockvault.service.volumes import as_backends, disk_of, set_volume_status
from blockvault.store import (
    Backend,
    ObjectNotFound,
    StoreError,
    StoreFull,
    StorePermanentError,
    StoreUnavailable,
)
from blockvault.volume import RawFileDriver
from blockvault.volume.backends import Backends, BackupSource, Parent, SourceError

log = logging.getLogger("blockvault.tasks")

GiB = 1024**3
#: DB columns are String(255); Cinder cuts fail_reason there too.
FAIL_REASON_MAX = 255
_CHECK_EVERY = 1.0
#: what the store accepts as an object id (a storage id names a backup's objects)
_STORAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


# What must never reach a user: endpoints (any scheme://…, host:port, a driver's
# host='…'), and absolute paths of the server (data, cache and store directories, volume
# files). Object, pack and container names are the user's own and stay, and so do device
# names (/dev/...): a managed block volume's source-name is one, and the error that its
# disk went away must say which.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_HOST = re.compile(r"\bhost=(['\"]).*?\1|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"
                   r"|\[[0-9A-Fa-f:]*:[0-9A-Fa-f:]*\](?::\d+)?|\blocalhost:\d+\b")
_PATH = re.compile(r"(?<![\w.:/~-])/(?!dev/)(?:[^\s'\"<>()]*)")
_NOTHING = re.compile(r"\s*\((?:<path>|<endpoint>)\)|,?\s*port=\d+")


def scrub(text: str) -> str:
    """``text`` without endpoints or server paths (the safety net under fail_reason)."""
    text = _URL.sub("<endpoint>", text)
    text = _HOST.sub("<endpoint>", text)
    text = _PATH.sub("<path>", text)
    return _NOTHING.sub("", text)


def fail_reason(exc: BaseException) -> str:
    """What a user is told about a failed job (a backup's or restore's ``fail_reason``, a
    verify report's error): what went wrong with their data, in a sentence, never a server
    path, an internal endpoint or a credential. Callers log ``exc`` itself, detail and all.
    """
    if isinstance(exc, SourceError):
        # Names the volume's source as its manager gave it (a device or a name under the
        # backend's root): the user's own word for it, so kept whole.
        return str(exc)[:FAIL_REASON_MAX]
    if isinstance(exc, StoreUnavailable):
        text = "The object store was unreachable; try again later."
    elif isinstance(exc, StoreFull):
        where = f" while writing {exc.name}" if exc.name else ""
        text = f"The object store is full ({exc.reason}){where}."
    elif isinstance(exc, ObjectNotFound):
        where = f" in container {exc.container}" if exc.container else ""
        text = f"Object {exc.name} is missing{where}."
    elif isinstance(exc, StorePermanentError):
        text = f"The object store refused the request: {exc}"
    elif isinstance(exc, TargetError):
        why = os.strerror(exc.errno) if exc.errno else "the device failed"
        text = f"Writing the restored data to the volume failed: {why}."
    elif isinstance(exc, EngineError | ValueError | LookupError):
        text = str(exc)  # about the user's data (objects, containers, records)
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"unexpected {type(exc).__name__}: {exc.strerror}"
    else:
        text = internal_error(exc)
    return scrub(text)[:FAIL_REASON_MAX]


def backup_storage_id(backup: Backup) -> str:
    """The name of a backup's objects in the store (rows from before storage ids have
    ``service_metadata == id``)."""
    return backup.service_metadata or backup.id


class Progress:
    """A job's progress callback for the engine (the progress resource reads the job row).

    Written at most once a second and at the end of each phase, but nothing during the
    job's first second: a backup from a dirty bitmap is over in a fraction of one, and two
    write transactions for it (the start of the index phase, the end of the read) cost
    more than the rest of its bookkeeping while nobody could watch them. What it last
    reported is written with the job's outcome instead (:meth:`Tasks._final`)."""

    def __init__(self, db: Database, job: Job) -> None:
        self.db, self.job = db, job
        self.at = time.monotonic()  # the first write is due a second after the start
        self.wrote = False
        self.last: tuple[int, int, str] | None = None

    def __call__(self, done: int, total: int, phase: str) -> None:
        self.last = (done, total, phase)
        now = time.monotonic()
        if now - self.at < _CHECK_EVERY and (done < total or not self.wrote):
            return
        self.at, self.wrote = now, True
        try:
            with self.db.session() as s:
                s.execute(
                    update(Job)
                    .where(Job.id == self.job.id, Job.token == self.job.token)
                    .values(bytes_done=done, bytes_total=total, phase=phase)
                )
        except Exception:  # progress is advisory; never fail a backup over it
            log.debug("progress update failed", exc_info=True)

    def values(self) -> dict[str, Any]:
        """The job row's progress columns as last reported (none if nothing was)."""
        if self.last is None:
            return {}
        done, total, phase = self.last
        return {"bytes_done": done, "bytes_total": total, "phase": phase}


class Tasks:
    def __init__(
        self,
        db: Database,
        engine: Engine,
        backends: Backends | RawFileDriver,
        *,
        default_container: str,
        availability_zone: str,
        service_name: str,
        host: str,
        gc_grace: float = 3600.0,
        metrics: JobMetrics | None = None,
        cinder_store: Backend | None = None,
    ) -> None:
        self.db = db
        #: backups imported from Cinder's records, read where Cinder wrote them
        #: (``cinder_store``: the [cinder_store] setting's backend; default the engine's)
        self.cinder = CinderBackups(db, CinderStore(cinder_store or engine.backend),
                                    availability_zone)
        #: counts what the handlers do (GET /metrics); an unregistered one by default
        self.metrics = metrics or JobMetrics(None)
        self.engine = engine
        self.backends = as_backends(backends)
        self.driver = self.backends.raw.files
        self.default_container = default_container
        self.availability_zone = availability_zone
        self.service_name = service_name
        self.host = host
        self.gc_grace = gc_grace
        # Containers owed a garbage collection (after deletes, failed or cancelled backups
        # and discarded attempts), with when it is due (time.monotonic()); collected by the
        # runner's maintenance timer until collect_garbage reports nothing left waiting.
        self._gc_owed: dict[str, float] = {}
        self._gc_mu = threading.Lock()
        self.write: DurableWriter = DurableWriter(db, threading.Event())
        self.attempt_lost: Callable[[Job], bool] = lambda job: False

    def bind(self, runner: Any) -> None:
        """Use the runner's durable writer (retries stop with the runner) and its view of
        lost leases."""
        self.write = runner.write
        self.attempt_lost = runner.attempt_lost
        runner.describe = fail_reason

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

    def _watch(self, job: Job, expected: str) -> Callable[[], bool]:
        """A cheap ``cancelled()`` for the engine: re-reads the backup's status and whether
        this attempt still owns the job at most once a second (a worker that wakes up from a
        pause past its lease stops at its next check)."""
        state = {"at": 0.0, "cancelled": False}

        def cancelled() -> bool:
            if state["cancelled"]:
                return True
            if self.attempt_lost(job):
                state["cancelled"] = True
                return True
            now = time.monotonic()
            if now - state["at"] >= _CHECK_EVERY:
                state["at"] = now
                try:
                    with self.db.reader() as s:  # a read: no write lock for it
                        status = s.scalar(select(Backup.status)
                                          .where(Backup.id == job.backup_id))
                        current = attempt_is_current(s, job)
                except Exception:  # a DB hiccup is no reason to stop; the outcome is fenced
                    log.debug("cancel check failed", exc_info=True)
                    return False
                state["cancelled"] = status != expected or not current
            return state["cancelled"]

        return cancelled

    def _progress(self, job: Job) -> Progress:
        return Progress(self.db, job)

    def _final(self, job: Job, fn: Callable[[Session], Any] | None = None,
               state: str = "done", error: str | None = None,
               progress: Progress | None = None) -> Any:
        """End this attempt: ``fn``'s writes and the job's ``state`` in one transaction,
        retried until the DB takes it, and only while the attempt still owns the job
        (with ``progress``: the job's last progress too, which a short job never wrote).
        Returns None for a stale attempt (nothing written), else ``fn``'s result (True
        without ``fn``)."""
        values = progress.values() if progress is not None else {}

        def tx(s: Session) -> Any:
            if not finish_job(s, job, state, error, **values):
                return None
            return True if fn is None else fn(s)

        return self.write(tx, f"the outcome of job {job.id} ({job.kind} of {job.backup_id})")

    def _failed(self, job: Job, reason: str) -> Any:
        """End ``job`` as failed with ``reason``, a user's text already (fail_reason or a
        fixed sentence): not scrubbed again, so a source error keeps the source's name."""
        reason = reason[:FAIL_REASON_MAX]
        return self._final(job, lambda s: self._record_failure(s, job, reason), "failed",
                           reason)

    def _discard_unless_winner(self, container: str, backup_id: str, sid: str) -> bool:
        """Remove an attempt's objects unless that attempt's storage id is the one the
        backup's row records. True if discarded."""
        try:
            with self.db.reader() as s:  # a read: no write lock for it
                winner = s.scalar(select(Backup.service_metadata)
                                  .where(Backup.id == backup_id))
        except Exception:
            log.warning("not discarding %s: could not read backup %s", sid, backup_id,
                        exc_info=True)
            return False
        if winner == sid:
            return False
        try:
            self.engine.discard(container=container, backup_id=sid)
        except (StoreError, EngineError, ValueError) as exc:
            log.warning("discarding %s in %s failed: %s", sid, container, exc)
            return False
        log.info("discarded attempt %s of backup %s in %s", sid, backup_id, container)
        return True

    def on_end(self, job: Job) -> None:
        """A job reached a final state: discard what its other attempts wrote."""
        if job.kind not in ("create", "import") or not job.tokens:
            return
        if is_cinder_service(job.params.get("backup_service")):
            return  # nothing was written: a Cinder import reads Cinder's objects in place
        with self.db.reader() as s:  # a read: no write lock for it, nor the whole row
            row = s.execute(select(Backup.container, Backup.service_metadata)
                            .where(Backup.id == job.backup_id)).first()
        container, winner = row if row is not None else (None, None)
        if job.kind == "import":
            record = job.params.get("record") or {}
            container = container or record.get("container") or self.default_container
        if not isinstance(container, str) or not container:
            return
        dropped = False
        for sid in attempt_storage_ids(job.backup_id, job.tokens):
            if sid != winner:
                dropped |= self._discard_unless_winner(container, job.backup_id, sid)
        if dropped or job.state == "failed":
            self._owe_gc(container)

    # -- create -----------------------------------------------------------------------------

    def create(self, job: Job) -> None:
        sid = storage_id(job)
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            if backup is None or backup.status != "creating":
                backup = None
            else:
                vol = s.get(Volume, backup.volume_id)
                container = backup.container or self.default_container
                if attempt_is_current(s, job):
                    backup.container = container
                    backup.host, backup.service = self.host, self.service_name
                    backup.availability_zone = backup.availability_zone or self.availability_zone
                snapshot_path = (
                    self.driver.snapshot_path(backup.snapshot_id) if backup.snapshot_id
                    else None
                )
                disk = disk_of(vol) if vol is not None else None
                backend_name = vol.backend if vol is not None else None
                dependent_of = backup.parent_id
                source = (backup.volume_id, backup.snapshot_id)  # for _release_source
                parent = s.get(Backup, backup.parent_id) if backup.parent_id else None
                parent_ref = parent_sid = None
                if (is_dedup_parent(parent) and parent.container == container
                        and not parent.deleted):
                    parent_ref = Parent(parent.id, parent.data_timestamp or parent.created_at)
                    parent_sid = backup_storage_id(parent)
                size = backup.size * GiB
                volume_size = vol.size if vol is not None else backup.size
                whole_volume = backup.snapshot_id is None
                project = backup.project_id  # the dedup scope (engine: dedup_scope)
                record = backup_record(backup)
                record.update(container=container, host=self.host, service=self.service_name,
                              status="available", size=volume_size, service_metadata=sid,
                              fail_reason=None)
        if backup is None:
            self._final(job, lambda s: self._release_source(s, job))
            return
        opened: BackupSource | None = None
        started, progress = time.monotonic(), self._progress(job)
        try:
            # Changed-region hints only for a backup of the live volume against its parent
            # (the backend's: tracked writes, a dirty bitmap).
            if whole_volume:
                if disk is None:
                    raise LookupError(f"Volume {backup.volume_id} could not be found.")
                opened = self.backends.get(backend_name).open_backup(disk, parent_ref)
            else:
                opened = BackupSource(snapshot_path, size, backup.snapshot_id)
            try:
                result = self.engine.backup(
                    container=container,
                    backup_id=sid,
                    source=opened.source,
                    size=size,
                    parent_id=parent_sid,
                    record=record,
                    progress=progress,
                    cancelled=self._watch(job, "creating"),
                    scope=project,
                )
            except (OSError, EngineError):
                # A device or export that went away fails reads in its own words: say
                # which source it was, if that is what happened.
                opened.finish()
                raise
            opened.finish()  # still the disk that was managed? (SourceError if not)
        except Cancelled:
            log.info("backup %s (attempt %s) cancelled", job.backup_id, sid)
            self.metrics.backup_ended("cancelled")
            self._final(job, lambda s: self._release_source(s, job, source=source))
            self._discard_unless_winner(container, job.backup_id, sid)
            self._owe_gc(container)  # packs it uploaded are garbage now
            return
        except Exception as exc:
            log.warning("backup %s failed: %s", job.backup_id, exc, exc_info=not isinstance(
                exc, StoreError | EngineError | SourceError))
            self.metrics.backup_ended("failed")
            self._failed(job, fail_reason(exc))
            self._discard_unless_winner(container, job.backup_id, sid)
            self._owe_gc(container)
            return
        finally:
            if opened is not None:
                opened.close()

        def won(s: Session) -> bool:
            ok = set_backup_status(
                s, job.backup_id, ("creating",), status="available", service_metadata=sid,
                object_count=result.object_count, stored_bytes=result.stored_bytes,
                size=volume_size, fail_reason=None,
            )
            if ok and dependent_of:
                s.execute(
                    update(Backup)
                    .where(Backup.id == dependent_of)
                    .values(num_dependent_backups=Backup.num_dependent_backups + 1)
                )
            self._release_source(s, job, source=source)
            return ok

        if self._final(job, won, progress=progress):
            self.metrics.backup_succeeded(
                time.monotonic() - started, result.logical_bytes, result.stored_bytes,
                result.new_blocks, result.reused_blocks, result.zero_blocks)
            if whole_volume and opened is not None:
                opened.committed(job.backup_id)
            return
        # Superseded (or the backup was force-deleted meanwhile): not this attempt's data.
        log.warning("backup %s: attempt %s finished but does not own the job any more; "
                    "its objects are discarded", job.backup_id, sid)
        if self._discard_unless_winner(container, job.backup_id, sid):
            self._owe_gc(container)

    def _release_source(self, s: Any, job: Job, failed: bool = False,
                        source: tuple[str, str | None] | None = None) -> None:
        """Put the volume (or snapshot) back to the status it had before the backup.

        ``source``: the backup's (volume_id, snapshot_id), when the caller read them
        already (neither ever changes); else they are read here. Writes only, no reads
        of whole rows: this runs in a backup's outcome transaction, which holds SQLite's
        write lock (issue 11: a short incremental's fixed cost)."""
        if source is None:
            source = s.execute(select(Backup.volume_id, Backup.snapshot_id)
                               .where(Backup.id == job.backup_id)).first()
            if source is None:
                return
        volume_id, snapshot_id = source
        if snapshot_id:
            s.execute(
                update(Snapshot)
                .where(Snapshot.id == snapshot_id, Snapshot.status == "backing-up")
                .values(status="available", updated_at=utcnow())
            )
            return
        # One conditional UPDATE: the status it had (an empty or missing previous_status
        # is 'available'); SET reads the row's values from before the update.
        set_volume_status(
            s, volume_id, ("backing-up",),
            status=func.coalesce(func.nullif(Volume.previous_status, ""), "available"),
            previous_status="error_backing-up" if failed else "backing-up",
        )

    # -- restore ----------------------------------------------------------------------------

    def restore(self, job: Job) -> None:
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            vol = s.get(Volume, job.volume_id)
            ready = backup is not None and backup.status == "restoring" and vol is not None
            if ready:
                container = backup.container or self.default_container
                sid = backup_storage_id(backup)
                disk, backend_name = disk_of(vol), vol.backend
                # Cinder's format: read by the backup's id (its chain is in the DB)
                engine: Any = self.cinder if is_cinder(backup) else self.engine
                sid = backup.id if is_cinder(backup) else sid
        if not ready:
            self.driver.changes(job.volume_id).invalidate()  # as a raw restore would
            self._final(job, lambda s: set_volume_status(
                s, job.volume_id, ("restoring-backup",), status="error_restoring"))
            return
        started, progress = time.monotonic(), self._progress(job)
        written = [0]

        def progress_and_size(done: int, total: int, phase: str) -> None:
            written[0] = total  # the restore's size, for the metrics
            progress(done, total, phase)

        try:
            # (raw: the target's bytes are about to change behind its change map)
            with self.backends.get(backend_name).open_restore(disk) as target:
                try:
                    engine.restore(
                        container=container,
                        backup_id=sid,
                        target=target.target,
                        target_is_new=bool(job.params.get("target_is_new")),
                        progress=progress_and_size,
                        cancelled=self._watch(job, "restoring"),
                    )
                except (OSError, EngineError):
                    target.finish()
                    raise
                target.finish()
        except Exception as exc:
            if not isinstance(exc, Cancelled):
                log.warning("restore of backup %s failed: %s", job.backup_id, exc)
            self.metrics.restore_ended("cancelled" if isinstance(exc, Cancelled) else "failed")
            self._failed(job, "restore cancelled" if isinstance(exc, Cancelled)
                         else fail_reason(exc))
            return

        seconds = time.monotonic() - started

        def restored(s: Session) -> bool:
            backup = s.get(Backup, job.backup_id)
            vol = s.get(Volume, job.volume_id)
            if backup is None or vol is None:
                return False
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
            return True

        if self._final(job, restored, progress=progress):
            self.metrics.restore_succeeded(seconds, written[0])

    # -- delete -----------------------------------------------------------------------------

    def delete(self, job: Job) -> None:
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            ready = backup is not None and backup.status == "deleting"
            if ready:
                container = backup.container
                sid = backup_storage_id(backup)
                engine: Any = self.cinder if is_cinder(backup) else self.engine
                sid = backup.id if is_cinder(backup) else sid
                # What earlier attempts of this backup's create/import may have left.
                leftovers: set[str] = set()
                for tokens in s.scalars(select(Job.tokens).where(
                        Job.backup_id == job.backup_id, Job.kind.in_(("create", "import")))):
                    leftovers.update(attempt_storage_ids(job.backup_id, tokens))
                leftovers.discard(sid)
                if is_cinder(backup):  # an import of a Cinder record wrote nothing
                    leftovers.clear()
        if not ready:
            self._final(job)
            return
        try:
            if container:
                collected = engine.delete(container=container, backup_id=sid)
                for other in sorted(leftovers):
                    self.engine.discard(container=container, backup_id=other)
                if collected is not True:  # condemned packs wait for the grace period
                    self._owe_gc(container, self.gc_grace)
        except Exception as exc:
            log.warning("delete of backup %s failed: %s", job.backup_id, exc)
            self._failed(job, fail_reason(exc))
            return

        def deleted(s: Session) -> None:
            backup = s.get(Backup, job.backup_id)
            won = set_backup_status(
                s, job.backup_id, ("deleting",), status="deleted", deleted=True,
                deleted_at=utcnow(),
            )
            if won and backup is not None and backup.parent_id:
                s.execute(
                    update(Backup)
                    .where(Backup.id == backup.parent_id, Backup.num_dependent_backups > 0)
                    .values(num_dependent_backups=Backup.num_dependent_backups - 1)
                )

        self._final(job, deleted)

    # -- garbage collection -------------------------------------------------------------------

    def _owe_gc(self, container: str, delay: float = 0.0) -> None:
        """Remember that ``container`` holds (or may hold) garbage. An entry already waiting
        keeps its due time: collect_garbage wants a grace period between its calls."""
        with self._gc_mu:
            self._gc_owed.setdefault(container, time.monotonic() + delay)

    def owe_gc_everywhere(self) -> None:
        """At start-up: a collection before the restart may have left packs condemned."""
        with self.db.session() as s:
            containers = set(s.scalars(select(Backup.container).where(
                Backup.container.is_not(None),
                # Cinder's containers hold no blockvault data to collect
                Backup.service.is_(None) | Backup.service.not_in(CINDER_DRIVERS)).distinct()))
        for c in containers:
            self._owe_gc(c, self.gc_grace)

    def gc_owed(self) -> dict[str, float]:
        with self._gc_mu:
            return dict(self._gc_owed)

    def collect_owed(self) -> None:
        """Collect every container whose collection is due (the maintenance timer)."""
        now = time.monotonic()
        with self._gc_mu:
            due = sorted(c for c, at in self._gc_owed.items() if at <= now)
        for container in due:
            try:
                done = self.engine.collect_garbage(container=container)
            except (StoreError, EngineError) as exc:
                log.warning("garbage collection in %s failed: %s", container, exc)
                done = False
            with self._gc_mu:
                if done:
                    self._gc_owed.pop(container, None)
                else:
                    self._gc_owed[container] = time.monotonic() + self.gc_grace
            log.info("garbage collection in %s: %s", container,
                     "done" if done else f"again in {self.gc_grace:g}s")

    # -- import -----------------------------------------------------------------------------

    def import_record(self, job: Job) -> None:
        record: dict[str, Any] = job.params["record"]
        service = job.params.get("backup_service") or ""
        if is_cinder_service(service):  # Cinder's own record: its objects are used in place
            self.cinder.import_record(job, self._final, self._failed, fail_reason)
            return
        if not self.service_name.startswith(service):
            self._failed(job, "Import record failed, cannot find backup service to perform "
                              f"the import. Request service {service}.")
            return
        required = ("display_name", "display_description", "container", "size",
                    "service_metadata", "object_count", "id")
        missing = [k for k in required if k not in record]
        if missing:
            self._failed(job, "Driver successfully decoded imported backup data, but there "
                              f"are missing fields ({', '.join(missing)}).")
            return
        container = record["container"] or self.default_container
        source_id = record.get("service_metadata") or record["id"]
        sid = storage_id(job)
        cloned = False
        try:
            if not isinstance(source_id, str) or not _STORAGE_ID.fullmatch(source_id):
                raise ValueError(f"Import record failed: invalid service_metadata "
                                 f"{str(source_id)[:60]!r}.")
            if not isinstance(container, str):
                raise ValueError("Import record failed: container is not a string.")
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
            # Always a manifest of its own, whatever the API id: deleting the backup here
            # must never remove what another deployment (or the exporter) restores from.
            cloned = True
            self.engine.clone_backup(container=container, source_id=source_id, target_id=sid)
            data_bytes = int(self.engine.manifest_info(container=container,
                                                       backup_id=sid)["size"])
            size = math.ceil(data_bytes / GiB)
            if record["size"] != size:
                raise ValueError(
                    f"Import record failed: the record's size ({record['size']} GiB) does not "
                    f"match its backup data ({data_bytes} bytes, {size} GiB)."
                )
        except (ValueError, LookupError, StoreError, EngineError) as exc:
            log.warning("import of backup %s failed: %s", job.backup_id, exc)
            self._failed(job, fail_reason(exc))
            if cloned:
                self._discard_unless_winner(container, job.backup_id, sid)
            return

        def won(s: Session) -> bool:
            backup = s.get(Backup, job.backup_id, with_for_update=True)
            if backup is None or backup.status != "creating" or backup.deleted:
                return False
            backup.volume_id = record.get("volume_id") or backup.volume_id
            backup.parent_id = record.get("parent_id")
            backup.display_name = record.get("display_name")
            backup.display_description = record.get("display_description")
            backup.container = container
            backup.size = size
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
            backup.service_metadata = sid
            backup.num_dependent_backups = s.scalar(
                select(func.count()).where(
                    Backup.parent_id == job.backup_id,
                    Backup.deleted.is_(False),
                    Backup.status == "available",
                )
            )
            backup.fail_reason = None
            backup.status, backup.updated_at = "available", utcnow()
            if backup.parent_id:
                s.execute(
                    update(Backup)
                    .where(Backup.id == backup.parent_id, Backup.deleted.is_(False))
                    .values(num_dependent_backups=Backup.num_dependent_backups + 1)
                )
            s.flush()
            return backup_record(backup)

        rec = self._final(job, won)
        if not rec:
            self._discard_unless_winner(container, job.backup_id, sid)
            return
        try:  # the clone's own record: what `blockvault recover` finds for this deployment
            self.engine.write_record(container=container, backup_id=sid, record=rec)
        except (StoreError, EngineError) as exc:
            log.warning("record of imported backup %s not written: %s", job.backup_id, exc)

    # -- record -----------------------------------------------------------------------------

    def write_record(self, job: Job) -> None:
        """Rewrite a backup's record in the store after its name, description or metadata
        changed. Best effort: the DB stays the truth and export_record reads it."""
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            if (backup is None or backup.status != "available" or not backup.container
                    or is_cinder(backup)):  # Cinder's container is not written to
                return
            record = backup_record(backup)
            container, sid = backup.container, backup_storage_id(backup)
        try:
            self.engine.write_record(container=container, backup_id=sid, record=record)
        except (StoreError, EngineError) as exc:
            log.warning("record of backup %s not updated: %s", job.backup_id, exc)

    # -- verify -----------------------------------------------------------------------------

    def verify(self, job: Job) -> None:
        """Check every block of a backup: present, decrypts, hash matches. The backup's
        status is not touched; the report is the job's result."""
        with self.db.session() as s:
            backup = s.get(Backup, job.backup_id)
            container = backup.container if backup is not None else None
            sid = backup_storage_id(backup) if backup is not None else job.backup_id
            cinder = is_cinder(backup)
        if not container:
            report = {"ok": False, "checked_blocks": 0, "missing": [], "corrupt": [],
                      "error": "the backup holds no data to verify"}
        elif cinder:  # Cinder's format: md5 per object, SHA-256 per block
            report = self._verify_report(container, job.backup_id, self.cinder)
        else:
            report = self._verify_report(container, sid)
        self.metrics.verified("backup", bool(report["ok"]))
        self._final(job, lambda s: s.execute(
            update(Job).where(Job.id == job.id).values(result=report)))

    def verify_container(self, job: Job) -> None:
        """Check every block every backup of a container references."""
        report = self._verify_report(job.params["container"], None)
        self.metrics.verified("container", bool(report["ok"]))
        self._final(job, lambda s: s.execute(
            update(Job).where(Job.id == job.id).values(result=report)))

    def _verify_report(self, container: str, backup_id: str | None,
                       engine: Any = None) -> dict:
        try:
            rep = (engine or self.engine).verify(container=container, backup_id=backup_id)
        except (StoreError, EngineError) as exc:
            log.warning("verify of %s in %s failed: %s", backup_id or "every backup",
                        container, exc)
            return {"ok": False, "checked_blocks": 0, "missing": [], "corrupt": [],
                    "error": fail_reason(exc)}
        return {"ok": rep.ok, "checked_blocks": rep.checked_blocks,
                "missing": rep.missing, "corrupt": rep.corrupt, "error": None}

    # -- failure ----------------------------------------------------------------------------

    def fail(self, s: Session, job: Job, reason: str) -> None:
        """Record a failed job in the reference's error states, inside the transaction that
        won the job row's conditional update: the job runner's entry, for reasons of its
        own (a crashed handler, a job out of attempts), so scrubbed whoever wrote them."""
        self._record_failure(s, job, scrub(reason)[:FAIL_REASON_MAX])

    def _record_failure(self, s: Session, job: Job, reason: str) -> None:
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
