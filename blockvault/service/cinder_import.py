"""Backups imported from Cinder's own records, used in place (issue 13).

A Cinder record (``backup_service`` one of Cinder's chunked drivers, see
:mod:`blockvault.service.cinder_records`) is imported without copying anything: the row
keeps Cinder's driver name in ``service``, Cinder's container in ``container`` and the
objects' prefix in ``service_metadata``, and every later call reads Cinder's objects where
Cinder wrote them, through :mod:`blockvault.engine.cinder`:

- import: the ``_metadata`` must exist and parse, name this backup and the record's parent,
  and the ``_sha256file`` must exist; the parent's row must be imported first (chain order).
- restore: the chain of rows (this backup and its parents) composed in one pass onto the
  volume backend's restore target, every 32 KiB block checked.
- verify: md5 of every object, SHA-256 of every block (the same report as blockvault's).
- delete: the backup's objects removed as Cinder removes them (the service refuses while
  incrementals depend on it, as for every backup).

:class:`CinderStore` says where Cinder's containers are: by default the store blockvault is
configured with (a local store whose root is Cinder's ``backup_posix_path``; the same Swift
account; the same S3 bucket), or the separate ``[cinder_store]`` (same keys as the main
store's settings). Either way it is opened read-only: blockvault writes nothing there, and
deletes only the objects of an imported backup that is deleted.

A blockvault incremental whose parent is an imported backup is an ordinary blockvault
backup of the whole volume that names the imported one as its parent: the engine cannot
deduplicate against a Cinder chain (see :func:`is_dedup_parent`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from blockvault.db.models import Backup, Job, utcnow
from blockvault.db.session import Database
from blockvault.engine import cinder
from blockvault.engine.config import Progress, VerifyReport
from blockvault.engine.errors import DataError, EngineError, FormatError
from blockvault.engine.restorer import FileTarget
from blockvault.engine.source import Target
from blockvault.service.backups import parse_record_datetime
from blockvault.service.cinder_records import is_cinder, volume_meta
from blockvault.store import Backend, StoreError
from blockvault.store.base import Container, ObjectInfo, StorePermanentError
from blockvault.store.local import LocalBackend

GiB = 1024**3


def is_dedup_parent(parent: Backup | None) -> bool:
    """Whether the engine can use ``parent``'s manifest for an incremental: not for a
    Cinder backup (it has no blockvault manifest; the volume is read whole and the
    imported backup is only recorded as the parent)."""
    return parent is not None and not is_cinder(parent)


class ReadOnlyContainer(Container):
    """Cinder's container as blockvault sees it: read, list, and delete (of an imported
    backup's own objects); never written."""

    def __init__(self, inner: Container) -> None:
        self.inner = inner
        self.name = inner.name

    def _refuse(self, name: str) -> StorePermanentError:
        return StorePermanentError(f"Cinder's container {self.name} is read-only to "
                                   f"blockvault (not writing {name})")

    def put(self, name: str, data: bytes | memoryview) -> None:
        raise self._refuse(name)

    def put_file(self, name: str, f: BinaryIO, size: int) -> None:
        raise self._refuse(name)

    def put_new(self, name: str, data: bytes | memoryview) -> bool:
        raise self._refuse(name)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(name, offset, length)

    def head(self, name: str) -> int | None:
        return self.inner.head(name)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list_info(prefix)

    def stat(self, name: str) -> ObjectInfo | None:
        return self.inner.stat(name)


def _local_root(backend: Backend) -> Path | None:
    while not isinstance(backend, LocalBackend):
        inner = getattr(backend, "inner", None)
        if inner is None:
            return None
        backend = inner
    return backend.root


class CinderStore:
    """Where Cinder's containers are read (module docstring)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def locate(self, container: str) -> tuple[Container, str]:
        """(store container, directory of Cinder's ``container`` in it). A local store is
        Cinder's ``backup_posix_path``: one tree in which each container is a directory
        (``volumebackups/``, Cinder's default ``ab/cd/<id>/``); in Swift and S3 a
        container is a container."""
        root = _local_root(self.backend)
        if root is not None:
            return ReadOnlyContainer(cinder.posix_tree(root)), container + "/"
        return ReadOnlyContainer(self.backend.open(container, create=False)), ""

    def backup(self, row: Backup) -> tuple[Container, cinder.CinderBackup]:
        """The backup a row names, read from its ``_metadata`` and checked to be that
        backup (a prefix naming another backup's objects is refused)."""
        c, directory = self.locate(str(row.container))
        b = cinder.read_backup(c, str(row.service_metadata), directory,
                               cinder_container=row.container)
        if b.id != row.id:
            raise FormatError(f"object {b.metadata_name} describes backup {b.id}, "
                              f"not {row.id}")
        if (b.parent_id or None) != (row.parent_id or None):
            raise FormatError(f"object {b.metadata_name} names parent {b.parent_id}, the "
                              f"backup's record {row.parent_id}")
        return c, b


def chain_rows(s: Session, backup_id: str) -> list[Backup]:
    """A Cinder backup's row and its parents' rows, full backup first."""
    rows: list[Backup] = []
    current: str | None = backup_id
    while current is not None:
        row = s.get(Backup, current)
        if row is None or row.deleted or not is_cinder(row):
            child = rows[-1].id if rows else backup_id
            raise DataError(f"backup {child}'s parent backup {current} is not an imported "
                            "Cinder backup any more", "")
        if any(r.id == row.id for r in rows):
            raise FormatError(f"the parent links of backup {backup_id} form a cycle")
        rows.append(row)
        current = row.parent_id
    rows.reverse()
    return rows


@dataclass
class _Chain:
    container: Container
    backups: list[cinder.CinderBackup]
    size: int  # bytes: the newest backup's size in GiB


class CinderBackups:
    """The engine's restore/verify/delete, for backups imported from Cinder records (the
    service's tasks call these with the backup's id where they call the Engine with its
    storage id), and the import job."""

    def __init__(self, db: Database, store: CinderStore,
                 availability_zone: str = "nova") -> None:
        self.db = db
        self.store = store
        self.availability_zone = availability_zone

    def _chain(self, backup_id: str) -> _Chain:
        with self.db.session() as s:
            rows = chain_rows(s, backup_id)
            for r in rows:
                s.expunge(r)
        backups: list[cinder.CinderBackup] = []
        container: Container | None = None
        for row in rows:
            c, b = self.store.backup(row)
            if container is not None and c.name != container.name:
                raise FormatError(f"backup {rows[-1].id}'s chain spans containers "
                                  f"{container.name} and {c.name}: blockvault restores a "
                                  "chain from one")
            container = c if container is None else container
            backups.append(b)
        assert container is not None
        return _Chain(container, backups, int(rows[-1].size or 0) * GiB)

    # -- the Engine's calls ---------------------------------------------------------------

    def restore(self, *, container: str, backup_id: str, target: Path | str | Target,
                target_is_new: bool, progress: Progress | None = None,
                cancelled: Callable[[], bool] | None = None) -> None:
        chain = self._chain(backup_id)
        if not isinstance(target, Target):  # a raw volume's file, as Engine.restore takes
            target = FileTarget(target)
        cinder.restore_chain(chain.container, chain.backups, target,
                             target_is_new=target_is_new, size=chain.size or None,
                             progress=progress, cancelled=cancelled)

    def verify(self, *, container: str, backup_id: str | None = None) -> VerifyReport:
        if backup_id is None:
            raise FormatError("a container of Cinder backups is verified backup by backup")
        try:
            chain = self._chain(backup_id)
        except cinder.MissingObject as e:
            return VerifyReport(missing=[e.object_name])
        return cinder.verify_chain(chain.container, chain.backups)

    def delete(self, *, container: str, backup_id: str) -> bool:
        """Remove the backup's objects (all under its prefix, ``_metadata`` last); no
        garbage collection is owed. Idempotent: a second run finds nothing to delete."""
        with self.db.session() as s:
            row = s.get(Backup, backup_id)
            if row is None or not is_cinder(row):
                raise FormatError(f"backup {backup_id} is not an imported Cinder backup")
            prefix, parent_id = str(row.service_metadata), row.parent_id
        c, directory = self.store.locate(container)
        cinder.delete_backup(c, cinder.CinderBackup(
            id=backup_id, prefix=prefix, directory=directory, container=container,
            parent_id=parent_id, volume_id="", created_at=""))
        return True

    # -- import ---------------------------------------------------------------------------

    def import_record(self, job: Job, final: Callable[..., Any],
                      failed: Callable[[Job, str], Any],
                      describe: Callable[[BaseException], str]) -> None:
        """The import job of a Cinder record: check Cinder's objects, then make the row
        ``available`` with the record's size, object count, container and parent."""
        record: dict[str, Any] = job.params["record"]
        parent_id = record.get("parent_id") or None
        try:
            with self.db.session() as s:
                parent = s.get(Backup, parent_id) if parent_id else None
                if parent_id and (parent is None or parent.deleted or not is_cinder(parent)
                                  or parent.status != "available"):
                    raise LookupError(f"Import record failed: backup {job.backup_id}'s parent "
                                      f"backup {parent_id} has not been imported.")
            row = Backup(id=job.backup_id, container=record["container"],
                         service_metadata=record["service_metadata"], parent_id=parent_id)
            c, b = self.store.backup(row)
            if c.head(b.sha256_name) is None:
                raise cinder.MissingObject(f"object {b.sha256_name} is missing",
                                           b.sha256_name)
            if math.ceil(b.end / GiB) > record["size"]:
                raise ValueError(f"Import record failed: the record's size "
                                 f"({record['size']} GiB) is smaller than its backup data "
                                 f"({b.end} bytes).")
        except (ValueError, LookupError, StoreError, EngineError) as exc:
            failed(job, describe(exc))
            return
        taken = parse_record_datetime(_created(b.created_at))

        def won(s: Session) -> bool:
            backup = s.get(Backup, job.backup_id, with_for_update=True)
            if backup is None or backup.status != "creating" or backup.deleted:
                return False
            backup.volume_id = record.get("volume_id") or backup.volume_id
            backup.parent_id = parent_id
            backup.display_name = record.get("display_name")
            backup.display_description = record.get("display_description")
            backup.container = record["container"]
            backup.service_metadata = record["service_metadata"]
            backup.service = record["service"]  # the mark of Cinder's format
            backup.host = record.get("host")
            backup.availability_zone = (record.get("availability_zone")
                                         or self.availability_zone)
            backup.size = record["size"]
            backup.object_count = record["object_count"]
            backup.snapshot_id = record.get("snapshot_id")
            backup.encryption_key_id = record.get("encryption_key_id")
            backup.metadata_ = record.get("metadata") or {}
            backup.volume_meta = volume_meta(b.volume_meta)
            backup.created_at = (parse_record_datetime(record.get("created_at"))
                                 or taken or backup.created_at)
            # Cinder's rows have one; where a record has none, when the data was taken
            # is the _metadata's created_at (to the microsecond: it orders a chain)
            backup.data_timestamp = (parse_record_datetime(record.get("data_timestamp"))
                                     or taken or backup.created_at)
            backup.num_dependent_backups = s.scalar(select(func.count()).where(
                Backup.parent_id == job.backup_id, Backup.deleted.is_(False),
                Backup.status == "available"))
            backup.fail_reason = None
            backup.status, backup.updated_at = "available", utcnow()
            if parent_id:
                s.execute(update(Backup).where(Backup.id == parent_id,
                                               Backup.deleted.is_(False))
                          .values(num_dependent_backups=Backup.num_dependent_backups + 1))
            return True

        final(job, won)


def _created(value: str) -> str | None:
    """Cinder's ``_metadata`` created_at (``2026-01-02 03:04:05.123456+00:00``) as an ISO
    text :func:`parse_record_datetime` reads, or None."""
    try:
        return dt.datetime.fromisoformat(value).isoformat() if value else None
    except ValueError:
        return None
