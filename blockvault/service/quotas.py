"""Quotas. Usage is counted from the rows themselves, so it can never drift from the
truth; limits are the configured defaults unless a project has an override."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.orm import Session

from blockvault.db.models import Backup, QuotaLimit, Snapshot, Volume
from blockvault.service.errors import Invalid, OverQuota
from blockvault.service.inputs import DB_MAX_INT, excerpt, validate_integer

#: Cinder's quota set (less its per-volume-type keys): ``groups`` is shown and settable
#: though blockvault has no groups; ``per_volume_gigabytes`` caps one volume's size (-1:
#: no cap). Tempest's schemas require both.
RESOURCES = ("volumes", "gigabytes", "snapshots", "backups", "backup_gigabytes", "groups",
             "per_volume_gigabytes")
#: keys a quota update may carry that are not limits (cinderclient sends ``tenant_id``);
#: Cinder skips them (its ``NON_QUOTA_KEYS``)
NON_QUOTA_KEYS = ("tenant_id", "id")


def _override(resource: str):  # type: ignore[no-untyped-def]
    """A project's override of one limit (NULL without one), as a scalar subquery."""
    return (select(QuotaLimit.hard_limit)
            .where(QuotaLimit.project_id == bindparam("project_id"),
                   QuotaLimit.resource == resource)
            .scalar_subquery())


#: Everything a backup is checked against and nothing else, in one statement: the
#: project's live backups (count, GiB) and its overrides of those two limits. A backup
#: needs no volume or snapshot sums (usage() reads them for the quota resource). Built
#: once: the statement is the same for every project, only ``project_id`` is bound.
_BACKUP_QUOTA = select(
    func.count(), func.coalesce(func.sum(Backup.size), 0),
    _override("backups"), _override("backup_gigabytes"),
).where(Backup.project_id == bindparam("project_id"), Backup.deleted.is_(False))


@dataclass(frozen=True)
class QuotaDefaults:
    volumes: int = 10
    gigabytes: int = 1000
    snapshots: int = 10
    backups: int = 10
    backup_gigabytes: int = 1000
    groups: int = 10
    per_volume_gigabytes: int = -1


class Quotas:
    def __init__(self, defaults: QuotaDefaults) -> None:
        self.defaults = defaults

    @staticmethod
    def _serialize(s: Session, project_id: str) -> None:
        """Make check-then-insert atomic per project across processes. SQLite already
        serialises writers (BEGIN IMMEDIATE); PostgreSQL needs a transaction-scoped lock."""
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:p))"), {"p": project_id})

    def limits(self, s: Session, project_id: str) -> dict[str, int]:
        limits = {r: getattr(self.defaults, r) for r in RESOURCES}
        rows = s.scalars(select(QuotaLimit).where(QuotaLimit.project_id == project_id))
        for row in rows:
            limits[row.resource] = row.hard_limit
        return limits

    def usage(self, s: Session, project_id: str) -> dict[str, int]:
        vols = s.execute(
            select(func.count(), func.coalesce(func.sum(Volume.size), 0)).where(
                Volume.project_id == project_id, Volume.deleted.is_(False)
            )
        ).one()
        snaps = s.execute(
            select(func.count(), func.coalesce(func.sum(Snapshot.size), 0)).where(
                Snapshot.project_id == project_id, Snapshot.deleted.is_(False)
            )
        ).one()
        backups = s.execute(
            select(func.count(), func.coalesce(func.sum(Backup.size), 0)).where(
                Backup.project_id == project_id, Backup.deleted.is_(False)
            )
        ).one()
        return {
            "volumes": int(vols[0]),
            "gigabytes": int(vols[1]) + int(snaps[1]),
            "snapshots": int(snaps[0]),
            "backups": int(backups[0]),
            "backup_gigabytes": int(backups[1]),
            "groups": 0,
            "per_volume_gigabytes": 0,  # a cap, not a count: nothing is ever "in use"
        }

    def set_limits(self, s: Session, project_id: str, values: dict[str, object]) -> None:
        # Every value is checked before any is stored: a bad one changes nothing.
        bad = [excerpt(k, 60) for k in values if k not in RESOURCES and k not in NON_QUOTA_KEYS]
        if bad:  # Cinder's words, every bad key named
            raise Invalid(excerpt(f"Bad key(s) in quota set: {','.join(bad)}", 300))
        limits = {}
        for key, value in values.items():
            if key in NON_QUOTA_KEYS:
                continue
            # -1 (unlimited) .. the DB's int; 1.9, true, 1e400 and 10**30 are refused as
            # Cinder refuses them, never truncated or passed on to overflow the column.
            limits[key] = validate_integer(value, key, min_value=-1, max_value=DB_MAX_INT)
        for key, limit in limits.items():
            row = s.get(QuotaLimit, (project_id, key))
            if row is None:
                s.add(QuotaLimit(project_id=project_id, resource=key, hard_limit=limit))
            else:
                row.hard_limit = limit

    # -- checks: called inside the transaction that inserts the counted row -------------

    def check_backup(self, s: Session, project_id: str, size: int) -> None:
        self._serialize(s, project_id)
        limits, used = self._backup_limits_and_usage(s, project_id)
        if _over(limits["backups"], used["backups"], 1):
            raise OverQuota(
                f"Maximum number of backups allowed ({limits['backups']}) exceeded",
                "BackupLimitExceeded",
            )
        if _over(limits["backup_gigabytes"], used["backup_gigabytes"], size):
            raise OverQuota(
                "Requested backup exceeds allowed Backup gigabytes quota. "
                f"Requested {size}G, quota is {limits['backup_gigabytes']}G and "
                f"{used['backup_gigabytes']}G has been consumed.",
                "VolumeBackupSizeExceedsAvailableQuota",
            )

    def _backup_limits_and_usage(self, s: Session, project_id: str
                                 ) -> tuple[dict[str, int], dict[str, int]]:
        """What limits() and usage() say of ``backups`` and ``backup_gigabytes``, in one
        query (a backup's create is latency: issue 11's incremental from a dirty bitmap)."""
        count, gigabytes, backups, backup_gigabytes = s.execute(
            _BACKUP_QUOTA, {"project_id": project_id}).one()
        limits = {
            "backups": self.defaults.backups if backups is None else backups,
            "backup_gigabytes": (self.defaults.backup_gigabytes if backup_gigabytes is None
                                 else backup_gigabytes),
        }
        return limits, {"backups": int(count), "backup_gigabytes": int(gigabytes)}

    def check_volume(self, s: Session, project_id: str, size: int) -> None:
        self._serialize(s, project_id)
        limits, used = self.limits(s, project_id), self.usage(s, project_id)
        self._check_volume_size(limits, size)
        if _over(limits["volumes"], used["volumes"], 1):
            raise OverQuota(
                f"Maximum number of volumes allowed ({limits['volumes']}) exceeded for "
                "quota 'volumes'.",
                "VolumeLimitExceeded",
            )
        self._check_gigabytes(limits, used, size)

    def check_snapshot(self, s: Session, project_id: str, size: int) -> None:
        self._serialize(s, project_id)
        limits, used = self.limits(s, project_id), self.usage(s, project_id)
        if _over(limits["snapshots"], used["snapshots"], 1):
            raise OverQuota(
                f"Maximum number of snapshots allowed ({limits['snapshots']}) exceeded",
                "SnapshotLimitExceeded",
            )
        self._check_gigabytes(limits, used, size)

    def check_extend(self, s: Session, project_id: str, delta: int,
                     new_size: int | None = None) -> None:
        self._serialize(s, project_id)
        limits = self.limits(s, project_id)
        if new_size is not None:
            self._check_volume_size(limits, new_size)
        self._check_gigabytes(limits, self.usage(s, project_id), delta)

    @staticmethod
    def _check_volume_size(limits: dict[str, int], size: int) -> None:
        # Cinder checks it first, before the volumes and gigabytes reservations
        if _over(limits["per_volume_gigabytes"], 0, size):
            raise OverQuota(
                f"Requested volume size {size}G is larger than maximum allowed limit "
                f"{limits['per_volume_gigabytes']}G.",
                "VolumeSizeExceedsLimit",
            )

    @staticmethod
    def _check_gigabytes(limits: dict[str, int], used: dict[str, int], size: int) -> None:
        if _over(limits["gigabytes"], used["gigabytes"], size):
            raise OverQuota(
                "Requested volume or snapshot exceeds allowed gigabytes quota. "
                f"Requested {size}G, quota is {limits['gigabytes']}G and "
                f"{used['gigabytes']}G has been consumed.",
                "VolumeSizeExceedsAvailableQuota",
            )


def _over(limit: int, used: int, requested: int) -> bool:
    return limit >= 0 and used + requested > limit
