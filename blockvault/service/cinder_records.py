"""Cinder's own backup records (issue 13): which ``backup_service`` names are Cinder's
chunked drivers, what such a record must hold to be imported, and the record exported
again for a backup imported from one.

A backup imported from a Cinder record keeps Cinder's driver name in its ``service`` column:
that is how every later call (restore, verify, delete, export, incrementals on top) knows
that its data is in Cinder's chunked format, in Cinder's container, under the object prefix
kept in ``service_metadata`` (see :mod:`blockvault.service.cinder_import`). This module knows
rows and rules only; nothing here reads the store.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from blockvault.db.models import Backup
from blockvault.engine.cinder import CinderBackup
from blockvault.service.context import RequestContext
from blockvault.service.errors import invalid_backup, invalid_input

#: Cinder's chunked backup drivers, as its records name them (``backup_service``).
CINDER_DRIVERS = frozenset({
    "cinder.backup.drivers.posix.PosixBackupDriver",
    "cinder.backup.drivers.nfs.NFSBackupDriver",
    "cinder.backup.drivers.swift.SwiftBackupDriver",
    "cinder.backup.drivers.s3.S3BackupDriver",
})

#: The fields of Cinder's exported record (``objects.Backup.encode_record`` with the
#: driver's ``export_record`` info first), in Cinder's order.
CINDER_RECORD_FIELDS = (
    "driver_info", "id", "user_id", "project_id", "volume_id", "host", "availability_zone",
    "container", "parent_id", "status", "fail_reason", "size", "display_name",
    "display_description", "service_metadata", "service", "object_count", "temp_volume_id",
    "temp_snapshot_id", "num_dependent_backups", "snapshot_id", "data_timestamp",
    "restore_volume_id", "metadata", "encryption_key_id", "created_at", "updated_at",
    "deleted_at", "deleted",
)
#: What Cinder's chunked driver requires of a record it imports (chunkeddriver.import_record
#: via the backup manager's check of the decoded record).
REQUIRED = ("display_name", "display_description", "container", "size", "service_metadata",
            "service", "object_count", "id")

# A container is a directory under backup_posix_path (posix/nfs: one or more components,
# Cinder's default being ab/cd/<id>) or a bucket/Swift container; a prefix is a name
# without "..", Swift's and S3's holding "/". Both are kept to characters Cinder makes.
_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}"
_CONTAINER_RE = re.compile(rf"{_PART}(?:/{_PART})*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:/-]{0,400}")


def is_cinder_service(backup_service: Any) -> bool:
    """Whether an import_record's ``backup_service`` names one of Cinder's chunked drivers."""
    return isinstance(backup_service, str) and backup_service in CINDER_DRIVERS


def is_cinder(backup: Backup | None) -> bool:
    """Whether a backup row's data is in Cinder's format (imported from a Cinder record)."""
    return backup is not None and backup.service in CINDER_DRIVERS


def check_record(backup_service: str, record: dict[str, Any]) -> None:
    """A Cinder record's fields, checked before anything is stored (400 otherwise)."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise invalid_input("Driver successfully decoded imported backup data, but there "
                            f"are missing fields ({', '.join(missing)}).")
    if record["service"] != backup_service:
        raise invalid_input(f"Backup record service {str(record['service'])[:80]!r} does not "
                            f"match backup_service {backup_service}.")
    container, prefix = record["container"], record["service_metadata"]
    if not isinstance(container, str) or not _CONTAINER_RE.fullmatch(container) or any(
            part in (".", "..") for part in container.split("/")):
        raise invalid_input(f"Backup record container {str(container)[:80]!r} is not a "
                            "Cinder container name.")
    if (not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix)
            or ".." in prefix.split("/") or "//" in prefix):
        raise invalid_input(f"Backup record service_metadata {str(prefix)[:80]!r} is not "
                            "a Cinder object prefix.")
    count = record["object_count"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise invalid_input(f"Backup record object_count {str(count)[:20]!r} is not a "
                            "count.")


def check_parent(s: Session, ctx: RequestContext, record: dict[str, Any]) -> None:
    """An incremental's parent must have been imported first (chain order): a row of the
    caller's project, available, itself from a Cinder record."""
    parent_id = record.get("parent_id")
    if not parent_id:
        return
    parent = s.scalars(select(Backup).where(
        Backup.id == parent_id, Backup.deleted.is_(False),
        Backup.project_id == ctx.project_id)).first()
    if parent is None:
        raise invalid_backup(
            f"Backup {record['id']} is an incremental whose parent backup {parent_id} has "
            "not been imported: import its parent first (full backup first, in chain "
            "order).")
    if not is_cinder(parent):
        raise invalid_backup(f"Backup {record['id']}'s parent backup {parent_id} was not "
                             "imported from a Cinder record.")
    if parent.status != "available":
        raise invalid_backup(f"Backup {record['id']}'s parent backup {parent_id} is "
                             f"{parent.status}, not available.")


def volume_meta(cinder_meta: Any) -> dict[str, Any] | None:
    """Cinder's ``volume_meta`` (a JSON string in the backup's ``_metadata``: the volume's
    row and its metadata) as blockvault's ``volume_meta``, which a restore applies to its
    target as Cinder's does (name, description, bootable, metadata)."""
    try:
        meta = json.loads(cinder_meta) if isinstance(cinder_meta, str) else cinder_meta
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    base = meta.get("volume-base-metadata")
    base = base if isinstance(base, dict) else {}
    user = meta.get("volume-metadata")
    if isinstance(user, list):  # version 1 wrote a list of {key, value}
        user = {str(i.get("key")): str(i.get("value")) for i in user if isinstance(i, dict)}
    return {
        "display_name": base.get("display_name"),
        "display_description": base.get("display_description"),
        "metadata": {str(k): str(v) for k, v in user.items()} if isinstance(user, dict)
        else {},
        "bootable": bool(base.get("bootable", False)),
    }


def _cinder_time(value: dt.datetime | None) -> str | None:
    # oslo.versionedobjects' DateTime field: ISO 8601 without sub-seconds, "Z"
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def export_record(backup: Backup) -> dict[str, str]:
    """The record of a backup imported from Cinder, as Cinder's export_record makes it
    (the same fields, order and formats), so Cinder itself can import it back. Values are
    this service's row: the owner is the project it was imported into, ``updated_at`` and
    ``num_dependent_backups`` are current, and ``data_timestamp`` is set (from Cinder's
    metadata) where Cinder's record had none."""
    record: dict[str, Any] = {}
    for name in CINDER_RECORD_FIELDS:
        if name == "driver_info":
            value: Any = {}  # what Cinder's chunked drivers' export_record returns
        elif name == "metadata":
            value = dict(backup.metadata_ or {})
        else:
            value = getattr(backup, name)
        if isinstance(value, dt.datetime):
            value = _cinder_time(value)
        record[name] = value
    url = base64.b64encode(json.dumps(record).encode()).decode("ascii")
    return {"backup_service": str(backup.service), "backup_url": url}


def driver_for_store(kind: str) -> str:
    """Cinder's chunked driver that writes the layout a store of ``kind`` holds."""
    return {"local": "cinder.backup.drivers.posix.PosixBackupDriver",
            "swift": "cinder.backup.drivers.swift.SwiftBackupDriver",
            "s3": "cinder.backup.drivers.s3.S3BackupDriver"}[kind]


def record_from_metadata(b: CinderBackup, backup_service: str) -> dict[str, str]:
    """The record Cinder's ``encode_record`` would make for ``b``, from what its
    ``_metadata`` says (``blockvault import-cinder``, for backups whose records were not
    exported). What the metadata does not hold is left empty: owner and host (the import
    takes the caller's), data_timestamp (the import takes the metadata's created_at)."""
    try:
        created = dt.datetime.fromisoformat(b.created_at)
    except ValueError:
        created = None
    if created is not None and created.tzinfo is not None:
        created = created.astimezone(dt.UTC).replace(tzinfo=None)
    row: dict[str, Any] = {
        "driver_info": {}, "id": b.id, "user_id": None, "project_id": None,
        "volume_id": b.volume_id or None, "host": None, "availability_zone": None,
        "container": b.container, "parent_id": b.parent_id, "status": "available",
        "fail_reason": None, "size": b.size, "display_name": b.name,
        "display_description": b.description, "service_metadata": b.prefix,
        "service": backup_service, "object_count": len(b.objects), "temp_volume_id": None,
        "temp_snapshot_id": None, "num_dependent_backups": 0, "snapshot_id": None,
        "data_timestamp": None, "restore_volume_id": None, "metadata": {},
        "encryption_key_id": None, "created_at": _cinder_time(created),
        "updated_at": _cinder_time(created), "deleted_at": None, "deleted": False,
    }
    url = base64.b64encode(json.dumps(row).encode()).decode("ascii")
    return {"backup_service": backup_service, "backup_url": url}
