"""Read-only views for the dashboard: a project's backups, running jobs, schedules, storage
and history, always scoped by project (an admin may ask for another project, or for all).

Nothing here writes. Each function takes the caller's context and the ``Scope`` that
``resolve_scope`` authorized, so a query can never forget the project filter: every
statement goes through ``_in_scope``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from blockvault.db.models import Backup, Job, Schedule, utcnow
from blockvault.db.session import Database
from blockvault.service.context import RequestContext

GiB = 1024**3

#: rows shown per table: the page stays fast whatever the history
MAX_BACKUPS = 200
MAX_VERIFIES = 20
MAX_SCHEDULES = 100
#: points per chart: one per backup event up to half of this, else one per day
MAX_POINTS = 1000

#: the jobs a person watches move (verify_container is an admin's, in its own project)
WATCHED_KINDS = ("create", "restore", "delete", "import", "verify", "verify_container")


@dataclass(frozen=True)
class Scope:
    """Which project the dashboard shows; ``project_id`` None means every project."""

    project_id: str | None

    @property
    def all_projects(self) -> bool:
        return self.project_id is None


def resolve_scope(ctx: RequestContext, requested: str | None) -> Scope:
    """The scope a caller asked for (None or "": its own project; "*": every project),
    or ``Forbidden``: another project, or all of them, is for whom policy allows it."""
    if requested == "*":
        ctx.authorize("blockvault:dashboard:all_projects")
        return Scope(None)
    project = requested or ctx.project_id
    ctx.authorize("blockvault:dashboard:view", {"project_id": project})
    return Scope(project)


def _in_scope(stmt: Select, column: Any, scope: Scope) -> Select:
    return stmt if scope.all_projects else stmt.where(column == scope.project_id)


# -- what the page shows --------------------------------------------------------------------


@dataclass(frozen=True)
class BackupRow:
    id: str
    project_id: str
    name: str | None
    volume_id: str
    status: str
    incremental: bool
    #: the volume's size in bytes (the API's ``size`` is GiB)
    size_bytes: int
    stored_bytes: int | None
    created_at: dt.datetime
    fail_reason: str | None


@dataclass(frozen=True)
class JobRow:
    id: str
    project_id: str
    kind: str
    state: str
    backup_id: str
    backup_name: str | None
    phase: str | None
    bytes_done: int
    bytes_total: int
    created_at: dt.datetime
    started_at: dt.datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "project_id": self.project_id, "kind": self.kind,
            "state": self.state, "backup_id": self.backup_id,
            "backup_name": self.backup_name, "phase": self.phase,
            "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
            "started_at": _iso(self.started_at),
        }


@dataclass(frozen=True)
class ScheduleRow:
    id: str
    project_id: str
    name: str | None
    #: the cron expression, or "every 6 h"
    when: str
    timezone: str
    enabled: bool
    last_run_at: dt.datetime | None
    next_run_at: dt.datetime | None
    last_outcome: str | None
    last_error: str | None
    last_backups_made: int
    runs_total: int
    failures_total: int


@dataclass(frozen=True)
class VerifyRow:
    job_id: str
    project_id: str
    backup_id: str
    backup_name: str | None
    finished_at: dt.datetime | None
    ok: bool
    checked_blocks: int
    missing: int
    corrupt: int
    error: str | None


@dataclass(frozen=True)
class Storage:
    backups: int
    #: bytes the backups added to the object store (deduplicated, compressed)
    stored_bytes: int
    #: bytes the backed-up volumes hold (their sizes)
    logical_bytes: int

    @property
    def ratio(self) -> float | None:
        """logical / stored: how many times smaller the store is than the volumes."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else None


@dataclass
class Overview:
    scope: Scope
    backups: list[BackupRow]
    #: how many live backups the scope has (the table shows at most MAX_BACKUPS)
    backups_total: int
    jobs: list[JobRow]
    schedules: list[ScheduleRow]
    verifies: list[VerifyRow]
    storage: Storage
    #: (unix seconds, cumulative stored bytes)
    stored_series: list[tuple[float, int]] = field(default_factory=list)
    #: (unix seconds when it finished, seconds a backup took)
    duration_series: list[tuple[float, float]] = field(default_factory=list)
    #: projects an admin may switch to (empty for everyone else)
    projects: list[str] = field(default_factory=list)


def overview(db: Database, ctx: RequestContext, scope: Scope) -> Overview:
    """Everything the dashboard page shows, read in one transaction."""
    with db.reader() as s:
        return Overview(
            scope=scope,
            backups=_backups(s, scope),
            backups_total=s.scalar(_in_scope(
                select(func.count()).select_from(Backup).where(Backup.deleted.is_(False)),
                Backup.project_id, scope)) or 0,
            jobs=_jobs(s, scope),
            schedules=_schedules(s, scope),
            verifies=_verifies(s, scope),
            storage=_storage(s, scope),
            stored_series=_stored_series(s, scope),
            duration_series=_duration_series(s, scope),
            projects=_projects(s) if ctx.is_admin else [],
        )


def running_jobs(db: Database, scope: Scope) -> list[JobRow]:
    """Queued and running jobs with their progress (what the page polls)."""
    with db.reader() as s:
        return _jobs(s, scope)


# -- queries -----------------------------------------------------------------------------------


def _backups(s: Session, scope: Scope) -> list[BackupRow]:
    stmt = _in_scope(select(Backup).where(Backup.deleted.is_(False)), Backup.project_id, scope)
    # the order of the list indexes (ix_backups_list, _all): no sort of the whole scope
    rows = s.scalars(stmt.order_by(Backup.created_at.desc().nulls_last(),
                                   Backup.id.desc().nulls_last()).limit(MAX_BACKUPS))
    return [
        BackupRow(
            id=b.id, project_id=b.project_id, name=b.display_name, volume_id=b.volume_id,
            status=b.status, incremental=b.parent_id is not None,
            size_bytes=(b.size or 0) * GiB, stored_bytes=b.stored_bytes,
            created_at=b.created_at, fail_reason=b.fail_reason,
        )
        for b in rows
    ]


def _jobs(s: Session, scope: Scope) -> list[JobRow]:
    stmt = (
        select(Job, Backup.display_name)
        .outerjoin(Backup, Backup.id == Job.backup_id)
        .where(Job.state.in_(("queued", "running")), Job.kind.in_(WATCHED_KINDS))
    )
    stmt = _in_scope(stmt, Job.project_id, scope).order_by(Job.created_at, Job.id)
    return [
        JobRow(
            id=j.id, project_id=j.project_id, kind=j.kind, state=j.state,
            backup_id=j.backup_id, backup_name=name, phase=j.phase,
            bytes_done=j.bytes_done or 0, bytes_total=j.bytes_total or 0,
            created_at=j.created_at, started_at=j.started_at,
        )
        for j, name in s.execute(stmt.limit(MAX_BACKUPS))
    ]


def _schedules(s: Session, scope: Scope) -> list[ScheduleRow]:
    stmt = _in_scope(select(Schedule).where(Schedule.deleted.is_(False)),
                     Schedule.project_id, scope)
    rows = s.scalars(stmt.order_by(Schedule.next_run_at, Schedule.id).limit(MAX_SCHEDULES))
    return [
        ScheduleRow(
            id=r.id, project_id=r.project_id, name=r.name,
            when=r.cron if r.cron else _every(r.interval_seconds), timezone=r.timezone,
            enabled=bool(r.enabled), last_run_at=r.last_run_at,
            next_run_at=r.next_run_at if r.enabled else None,
            last_outcome=r.last_outcome, last_error=r.last_error,
            last_backups_made=r.last_backups_made or 0,
            runs_total=r.runs_total or 0, failures_total=r.failures_total or 0,
        )
        for r in rows
    ]


def _verifies(s: Session, scope: Scope) -> list[VerifyRow]:
    stmt = (
        select(Job, Backup.display_name)
        .outerjoin(Backup, Backup.id == Job.backup_id)
        .where(Job.kind == "verify", Job.state.in_(("done", "failed")))
    )
    stmt = _in_scope(stmt, Job.project_id, scope)
    rows = s.execute(stmt.order_by(Job.finished_at.desc(), Job.id).limit(MAX_VERIFIES))
    out = []
    for job, name in rows:
        report = job.result if isinstance(job.result, dict) else {}
        out.append(VerifyRow(
            job_id=job.id, project_id=job.project_id, backup_id=job.backup_id,
            backup_name=name, finished_at=job.finished_at,
            ok=bool(report.get("ok")) and job.state == "done",
            checked_blocks=int(report.get("checked_blocks") or 0),
            missing=len(report.get("missing") or ()),
            corrupt=len(report.get("corrupt") or ()),
            # a failed job has no report; its error is the runner's scrubbed reason
            error=report.get("error") or (job.error if job.state == "failed" else None),
        ))
    return out


def _storage(s: Session, scope: Scope) -> Storage:
    stmt = select(func.count(), func.coalesce(func.sum(Backup.stored_bytes), 0),
                  func.coalesce(func.sum(Backup.size), 0)).where(Backup.deleted.is_(False))
    count, stored, size_gib = s.execute(_in_scope(stmt, Backup.project_id, scope)).one()
    return Storage(backups=int(count), stored_bytes=int(stored),
                   logical_bytes=int(size_gib) * GiB)


def _stored_series(s: Session, scope: Scope) -> list[tuple[float, int]]:
    """Stored bytes over time: each backup adds its bytes when made and takes them away
    when deleted (its unshared chunks are collected then, so this is what the store holds,
    within the garbage collector's grace). One point per backup made or deleted while
    there are few; past that, one per UTC day, summed in the database, so a page over a
    long history reads a few hundred rows, not every backup ever made."""
    counted = select(func.count()).select_from(Backup).where(Backup.stored_bytes.is_not(None))
    events: list[tuple[float, int]] = []
    if (s.scalar(_in_scope(counted, Backup.project_id, scope)) or 0) <= MAX_POINTS // 2:
        stmt = select(Backup.created_at, Backup.deleted_at, Backup.stored_bytes).where(
            Backup.stored_bytes.is_not(None))
        for created, deleted_at, stored in s.execute(_in_scope(stmt, Backup.project_id,
                                                               scope)):
            events.append((_unix(created), stored))
            if deleted_at is not None:
                events.append((_unix(deleted_at), -stored))
    else:
        for column, sign in ((Backup.created_at, 1), (Backup.deleted_at, -1)):
            day = func.date(column)
            stmt = (select(day, func.sum(Backup.stored_bytes))
                    .where(Backup.stored_bytes.is_not(None), column.is_not(None))
                    .group_by(day))
            now = _unix(utcnow())
            for when, total in s.execute(_in_scope(stmt, Backup.project_id, scope)):
                # SQLite answers date() with text, PostgreSQL with a date; the day's point
                # is at its end (or now, for today)
                start = dt.datetime.fromisoformat(str(when)[:10])
                end = _unix(start + dt.timedelta(days=1)) - 1
                events.append((min(end, now), sign * int(total)))
    events.sort()
    points: list[tuple[float, int]] = []
    total = 0
    for t, delta in events:
        total += delta
        if points and points[-1][0] == t:
            points[-1] = (t, total)
        else:
            points.append((t, total))
    return points[-MAX_POINTS:]


def _duration_series(s: Session, scope: Scope) -> list[tuple[float, float]]:
    """How long each finished backup took, from its job (finished jobs are kept for
    ``job_retention``, so this covers that window)."""
    stmt = select(Job.started_at, Job.finished_at).where(
        Job.kind == "create", Job.state == "done",
        Job.started_at.is_not(None), Job.finished_at.is_not(None))
    stmt = _in_scope(stmt, Job.project_id, scope).order_by(Job.finished_at.desc())
    rows = list(s.execute(stmt.limit(MAX_POINTS)))
    return [(_unix(end), round((end - start).total_seconds(), 3))
            for start, end in reversed(rows)]


def _projects(s: Session) -> list[str]:
    stmt = select(Backup.project_id).where(Backup.deleted.is_(False)).distinct()
    return sorted(p for p in s.scalars(stmt.limit(1000)) if p)


# -- helpers -------------------------------------------------------------------------------


def _every(seconds: int | None) -> str:
    if not seconds:
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"every {seconds // size} {unit}"
    return f"every {seconds} s"


def _unix(when: dt.datetime) -> float:
    # stored naive UTC (models.utcnow); milliseconds, so backups a moment apart stay apart
    return round(when.replace(tzinfo=dt.UTC).timestamp(), 3)


def _iso(when: dt.datetime | None) -> str | None:
    return None if when is None else when.replace(tzinfo=dt.UTC).isoformat()
