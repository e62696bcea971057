"""The backup scheduler: a thread in every service process that fires due schedules and
settles their runs. Several processes may share one database; a lease on the schedule's
row (one conditional UPDATE, compared with the DB clock) lets exactly one of them act.

A run has two steps, each under the lease:

- fire: create one backup per selected volume through BackupService.create (as the
  schedule's user, a project member: quota, policy and statuses apply) and move
  ``next_run_at`` past the DB clock and past the slot that fired, so no slot fires twice.
  A run found overdue on this process's first pass (the service was down) runs once and
  counts in ``misses_total``; the slots missed are not replayed.
- settle: once every backup of the run ended (a later pass), the outcome: ``success`` if all
  ended available and none failed to start, ``failed`` if none did, ``partial`` otherwise;
  then volumes whose new backup is available are pruned per the keep-policy. Until then
  ``last_outcome`` is null (running). The run does not block on its jobs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from blockvault.db.models import Backup, Schedule, db_now
from blockvault.db.session import Database
from blockvault.service.backups import BackupService
from blockvault.service.errors import ServiceError
from blockvault.service.schedules import (
    db_clock,
    next_run,
    plan_forget,
    policy_of,
    prune,
    schedule_context,
    selected_volumes,
)

log = logging.getLogger("blockvault.scheduler")

#: statuses a backup of a run may be in once its create job ended well
_MADE = ("available", "deleting", "restoring", "deleted")
_MAX_ERROR = 2000


def _lease_free() -> Any:
    return or_(Schedule.lease_owner.is_(None), Schedule.lease_expires < db_now())


class Scheduler:
    def __init__(self, db: Database, backups: BackupService, *, interval: float = 30.0,
                 lease_seconds: int = 300, owner: str | None = None) -> None:
        self.db = db
        self.backups = backups
        self.interval = max(0.05, interval)
        self.lease_seconds = lease_seconds
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._first_pass = True

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self.stopping.clear()
        self._first_pass = True
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("scheduler pass failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    # -- one pass ---------------------------------------------------------------------

    def tick(self) -> None:
        """Fire every due schedule this process wins the lease of, then settle runs."""
        at_start, self._first_pass = self._first_pass, False
        with self.db.session() as s:
            due = list(s.scalars(select(Schedule.id).where(
                Schedule.deleted.is_(False), Schedule.enabled.is_(True),
                Schedule.next_run_at <= db_now(), _lease_free())))
            open_runs = list(s.scalars(select(Schedule.id).where(
                Schedule.deleted.is_(False), Schedule.last_run_at.is_not(None),
                Schedule.last_outcome.is_(None), _lease_free())))
        for schedule_id in due:
            if self.stopping.is_set():
                return
            if self._claim(schedule_id, Schedule.next_run_at <= db_now()):
                self._guarded(self._fire, schedule_id, at_start)
        for schedule_id in open_runs:
            if self.stopping.is_set():
                return
            if self._claim(schedule_id, and_(Schedule.last_run_at.is_not(None),
                                             Schedule.last_outcome.is_(None))):
                self._guarded(self._settle, schedule_id)

    def _claim(self, schedule_id: str, condition: Any) -> bool:
        """The lease, in one conditional UPDATE: of several processes, one wins."""
        with self.db.session() as s:
            res = s.execute(
                update(Schedule)
                .where(Schedule.id == schedule_id, Schedule.deleted.is_(False),
                       _lease_free(), condition)
                .values(lease_owner=self.owner, lease_expires=db_now(self.lease_seconds))
                .execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    def _guarded(self, step: Any, schedule_id: str, *args: Any) -> None:
        try:
            step(schedule_id, *args)
        except Exception:
            log.exception("schedule %s: %s failed", schedule_id, step.__name__)
        finally:
            self._release(schedule_id)

    def _release(self, schedule_id: str) -> None:
        with self.db.session() as s:
            s.execute(update(Schedule)
                      .where(Schedule.id == schedule_id, Schedule.lease_owner == self.owner)
                      .values(lease_owner=None, lease_expires=None)
                      .execution_options(synchronize_session=False))

    def _mine(self, s: Session, schedule_id: str) -> Schedule | None:
        return s.scalars(select(Schedule).where(Schedule.id == schedule_id,
                                                Schedule.lease_owner == self.owner)).first()

    # -- fire -------------------------------------------------------------------------

    def _fire(self, schedule_id: str, at_start: bool) -> None:
        with self.db.session() as s:
            schedule = self._mine(s, schedule_id)
            if schedule is None:
                return
            now = db_clock(s)
            # overdue by more than a pass at this process's start: the service was down
            missed = at_start and (now - schedule.next_run_at).total_seconds() > self.interval
            upcoming = next_run(schedule.cron, schedule.interval_seconds, schedule.timezone,
                                max(now, schedule.next_run_at))
            volumes = selected_volumes(s, schedule)
            s.expunge(schedule)
        made: list[str] = []
        errors: list[str] = []
        ctx = schedule_context(schedule)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        for volume_id in volumes:
            try:
                backup = self._create(ctx, schedule, volume_id, stamp)
            except ServiceError as exc:
                errors.append(f"volume {volume_id}: {exc.message}")
                continue
            made.append(backup.id)
        if schedule.volume_ids:
            for gone in sorted(set(schedule.volume_ids) - set(volumes)):
                errors.append(f"volume {gone}: Volume {gone} could not be found.")
        values: dict[str, Any] = dict(
            next_run_at=upcoming, last_run_at=now, last_error=_clip(errors),
            last_backups_made=len(made), last_backups_pruned=0, last_run_backup_ids=made,
            runs_total=Schedule.runs_total + 1,
            misses_total=Schedule.misses_total + (1 if missed else 0),
            last_outcome=None,
        )
        if not made:  # nothing to wait for: the run is settled now
            values["last_outcome"] = "failed" if errors else "success"
            if errors:
                values["failures_total"] = Schedule.failures_total + 1
            else:
                values["last_success_at"] = now
        with self.db.session() as s:
            s.execute(update(Schedule)
                      .where(Schedule.id == schedule_id, Schedule.lease_owner == self.owner)
                      .values(**values).execution_options(synchronize_session=False))
        log.info("schedule %s fired: %d backup(s) started, %d error(s)%s", schedule_id,
                 len(made), len(errors), " (missed run)" if missed else "")

    def _create(self, ctx: Any, schedule: Schedule, volume_id: str, stamp: str) -> Any:
        incremental = self._incremental(schedule, volume_id)
        kwargs = dict(container=schedule.container,
                      name=f"{schedule.name or 'schedule'}-{stamp}",
                      description=f"made by backup schedule {schedule.id}",
                      force=True, schedule_id=schedule.id)
        try:
            return self.backups.create(ctx, volume_id, incremental=incremental, **kwargs)
        except ServiceError as exc:
            if incremental and "No backups available" in exc.message:
                return self.backups.create(ctx, volume_id, incremental=False, **kwargs)
            raise

    def _incremental(self, schedule: Schedule, volume_id: str) -> bool:
        """Full every ``full_every`` scheduled backups of the volume (0: first only)."""
        with self.db.session() as s:
            if schedule.full_every == 0:
                return s.scalar(select(Backup.id).where(
                    Backup.volume_id == volume_id, Backup.project_id == schedule.project_id,
                    Backup.deleted.is_(False), Backup.status == "available").limit(1)) is not None
            recent = s.execute(
                select(Backup.parent_id).where(
                    Backup.schedule_id == schedule.id, Backup.volume_id == volume_id,
                    Backup.deleted.is_(False), Backup.status.in_(("available", "creating")))
                .order_by(Backup.created_at.desc()).limit(schedule.full_every)).all()
        since_full = 0
        for (parent_id,) in recent:
            since_full += 1
            if parent_id is None:
                return since_full < schedule.full_every
        return False  # no full among the last N (or none at all): time for one

    # -- settle -----------------------------------------------------------------------

    def _settle(self, schedule_id: str) -> None:
        with self.db.session() as s:
            schedule = self._mine(s, schedule_id)
            if schedule is None or schedule.last_outcome is not None:
                return
            ids = list(schedule.last_run_backup_ids or [])
            rows = list(s.execute(select(Backup.id, Backup.volume_id, Backup.status,
                                         Backup.fail_reason, Backup.deleted)
                                  .where(Backup.id.in_(ids))))
            if any(r.status == "creating" and not r.deleted for r in rows):
                return  # jobs still running: a later pass settles
            s.expunge(schedule)
        errors = [schedule.last_error] if schedule.last_error else []
        good = [r for r in rows if r.status in _MADE or r.deleted]
        for r in rows:
            if r not in good:
                errors.append(f"backup {r.id} of volume {r.volume_id}: "
                              f"{r.fail_reason or r.status}")
        missing = set(ids) - {r.id for r in rows}
        errors += [f"backup {m}: no longer exists" for m in sorted(missing)]
        outcome = "success" if not errors else ("partial" if good else "failed")
        pruned = 0
        if good and not policy_of(schedule).empty():
            pruned = self._prune(schedule, {r.volume_id for r in good if r.status == "available"})
        values: dict[str, Any] = dict(last_outcome=outcome, last_error=_clip(errors),
                                      last_backups_made=len(good), last_backups_pruned=pruned)
        if outcome == "success":
            values["last_success_at"] = schedule.last_run_at
        else:
            values["failures_total"] = Schedule.failures_total + 1
        with self.db.session() as s:
            s.execute(update(Schedule)
                      .where(Schedule.id == schedule_id, Schedule.lease_owner == self.owner)
                      .values(**values).execution_options(synchronize_session=False))
        log.info("schedule %s run settled: %s, %d made, %d pruned", schedule_id, outcome,
                 len(good), pruned)

    def _prune(self, schedule: Schedule, volumes: set[str]) -> int:
        if not volumes:
            return 0
        with self.db.session() as s:
            candidates = list(s.scalars(select(Backup).where(
                Backup.schedule_id == schedule.id, Backup.volume_id.in_(volumes),
                Backup.deleted.is_(False), Backup.status == "available")))
            plan = plan_forget(s, candidates, policy_of(schedule))
        if not plan.removed:
            return 0
        # deletes are jobs; wait for children to go before their parents, within the lease
        deadline = time.monotonic() + self.lease_seconds / 2
        done, pending, refused = prune(self.backups, self.db, schedule_context(schedule),
                                       plan, deadline)
        if pending or refused:
            log.info("schedule %s: %d backup(s) left for the next run's prune", schedule.id,
                     len(pending) + len(refused))
        return len(done)


def _clip(errors: list[str]) -> str | None:
    if not errors:
        return None
    text = "; ".join(errors)
    return text if len(text) <= _MAX_ERROR else text[:_MAX_ERROR - 1] + "…"
