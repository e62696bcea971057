"""Metrics read from the metadata database at scrape time: what every process sharing the
database agrees on (backups and volumes by status, the job queue, per-container bytes,
schedules, verify results). Every process exports the same values, so dashboards and
alerts aggregate them across instances with ``max``, not ``sum``.

A scrape is a handful of aggregate queries in one transaction (GROUP BY in the database,
never a Python loop over backups), so it stays cheap with a hundred thousand backups. The
only per-row loops are over containers (capped, see ``max_containers``) and schedules.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, func, select, true
from sqlalchemy.orm import Session, aliased

from blockvault.db.models import Backup, Job, Schedule, Volume, db_now
from blockvault.db.session import Database
from blockvault.service.heartbeats import live_routes, queued_by_route

log = logging.getLogger("blockvault.metrics")

GiB = 1024**3
#: always exported (0 when none), so graphs and alerts see a zero, not a missing series
BACKUP_STATUSES = ("creating", "available", "deleting", "restoring", "error")
VOLUME_STATUSES = ("creating", "available", "in-use", "backing-up", "restoring-backup",
                   "deleting", "error", "error_restoring", "uploading")
JOB_STATES = ("queued", "running")
#: the label of the containers past ``max_containers``, summed
OTHER_CONTAINERS = "_other"

Metric = GaugeMetricFamily | CounterMetricFamily


def _datetime(value: dt.datetime | str | None) -> dt.datetime | None:
    # SQLite hands an aggregate or db_now() back as text when it loses the column's type
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def _epoch(when: dt.datetime | str | None) -> float:
    """Seconds since the epoch of a naive-UTC DB time; 0 for none."""
    when = _datetime(when)
    if when is None:
        return 0.0
    return when.replace(tzinfo=dt.UTC).timestamp()


class StateCollector(Collector):
    """A prometheus_client collector over the metadata DB (registered once per Services)."""

    def __init__(self, db: Database, job_kinds: Sequence[str] = (), max_containers: int = 100,
                 down_time: float = 60.0) -> None:
        self.db = db
        self.job_kinds = tuple(job_kinds)
        self.max_containers = max(1, int(max_containers))
        #: a worker whose heartbeat is older is not live (the service_down_time setting)
        self.down_time = float(down_time)

    def describe(self) -> list[Metric]:
        # Nothing up front: describing would mean querying the DB at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        families: list[Metric] = []
        try:
            with self.db.reader() as s:
                families += self._backups_and_volumes(s)
                families += self._containers(s)
                families += self._jobs(s)
                families += self._verifies(s)
                families += self._schedules(s)
            up = 1.0
        except Exception:  # a scrape reports the DB down; it never fails the whole page
            log.exception("reading the metrics' database state failed")
            families, up = [], 0.0
        yield from families
        yield GaugeMetricFamily(
            "blockvault_metrics_database_up", "1 if this scrape read the database state "
            "(the blockvault_backups, _volumes, _jobs, _container_*, _verify_* and "
            "_schedule_* metrics), 0 if the database could not be read.", value=up)
        yield GaugeMetricFamily(
            "blockvault_metrics_database_seconds", "Time this scrape spent reading the "
            "database state.", value=time.perf_counter() - started)

    # -- backups, volumes, containers --------------------------------------------------------

    def _backups_and_volumes(self, s: Session) -> list[Metric]:
        out = []
        for name, model, statuses, what in (
                ("blockvault_backups", Backup, BACKUP_STATUSES, "Backups"),
                ("blockvault_volumes", Volume, VOLUME_STATUSES, "Volumes")):
            counts = dict.fromkeys(statuses, 0)
            counts.update(s.execute(
                select(model.status, func.count())
                .where(model.deleted.is_(False)).group_by(model.status)).all())
            family = GaugeMetricFamily(name, f"{what} not deleted, by status.",
                                       labels=["status"])
            for status, n in sorted(counts.items()):
                family.add_metric([status], n)
            out.append(family)
        return out

    def _containers(self, s: Session) -> list[Metric]:
        logical = func.coalesce(func.sum(Backup.size), 0) * GiB
        uploaded = func.coalesce(func.sum(Backup.stored_bytes), 0)
        rows = s.execute(
            select(Backup.container, func.count(), logical, uploaded)
            .where(Backup.deleted.is_(False), Backup.status == "available",
                   Backup.container.is_not(None))
            .group_by(Backup.container)
            .order_by(logical.desc(), Backup.container)).all()
        # Tenants name containers: past the cap, the rest is one series, not thousands.
        shown, rest = rows[:self.max_containers], rows[self.max_containers:]
        if rest:
            shown.append((OTHER_CONTAINERS, sum(r[1] for r in rest), sum(r[2] for r in rest),
                          sum(r[3] for r in rest)))
        count = GaugeMetricFamily(
            "blockvault_container_backups", "Available backups, by container.",
            labels=["container"])
        logical_f = GaugeMetricFamily(
            "blockvault_container_logical_bytes", "Sum of the sizes of a container's "
            "available backups (each backup's volume size, as the API reports it, in "
            "bytes): what restoring each of them would write.", labels=["container"])
        uploaded_f = GaugeMetricFamily(
            "blockvault_container_uploaded_bytes", "Bytes a container's available backups "
            "uploaded when they were made (compressed, deduplicated: blocks already "
            "stored are counted with the backup that uploaded them, and no more once that "
            "one is deleted). logical / uploaded is the space saved by deduplication, "
            "compression and skipped zeros together.", labels=["container"])
        for container, n, lb, ub in shown:
            count.add_metric([container], n)
            logical_f.add_metric([container], lb)
            uploaded_f.add_metric([container], ub)
        return [count, logical_f, uploaded_f]

    # -- jobs --------------------------------------------------------------------------------

    def _jobs(self, s: Session) -> list[Metric]:
        counts = {(k, st): 0 for k in self.job_kinds for st in JOB_STATES}
        for kind, state, n in s.execute(
                select(Job.kind, Job.state, func.count())
                .where(Job.state.in_(JOB_STATES)).group_by(Job.kind, Job.state)):
            counts[kind, state] = n
        jobs = GaugeMetricFamily(
            "blockvault_jobs", "Jobs waiting for a worker (queued) or being worked on "
            "(running), by kind.", labels=["kind", "state"])
        for (kind, state), n in sorted(counts.items()):
            jobs.add_metric([kind, state], n)
        oldest, now = s.execute(
            select(func.min(Job.created_at), db_now()).where(Job.state == "queued")).one()
        oldest, now = _datetime(oldest), _datetime(now)
        age = max(0.0, (now - oldest).total_seconds()) if oldest and now else 0.0
        return [jobs, GaugeMetricFamily(
            "blockvault_jobs_oldest_queued_age_seconds", "How long the oldest queued job "
            "has waited (since it was queued, by the database's clock), 0 when none "
            "waits.", value=age), *self._routes(s)]

    def _routes(self, s: Session) -> list[Metric]:
        # One series per HOST@BACKEND a live worker announces or a queued job needs, so a
        # host's series is there (at 0) before its worker goes away.
        live = live_routes(s, self.down_time)
        queued = queued_by_route(s)
        unroutable = GaugeMetricFamily(
            "blockvault_jobs_unroutable", "Queued jobs on volumes of a HOST@BACKEND that no "
            "live backup worker reaches (none announced it within service_down_time): "
            "they wait, their backups and volumes keep their status, until a worker "
            "reaching it runs again.", labels=["host"])
        oldest = GaugeMetricFamily(
            "blockvault_jobs_unroutable_oldest_age_seconds", "How long the oldest of "
            "those jobs has waited (by the database's clock), 0 when none waits.",
            labels=["host"])
        for route in sorted(live | set(queued)):
            n, age = queued.get(route, (0, 0.0)) if route not in live else (0, 0.0)
            unroutable.add_metric([route], n)
            oldest.add_metric([route], age)
        return [unroutable, oldest]

    # -- verify ------------------------------------------------------------------------------

    def _verifies(self, s: Session) -> list[Metric]:
        # A verify's outcome: failed if the job failed, or its report is not ok.
        ok = and_(Job.state == "done", Job.result["ok"].as_boolean().is_(true()))
        result = case((ok, "ok"), else_="failed")
        finished = Job.state.in_(("done", "failed"))

        # Each live backup's latest finished verify (kept whatever the job retention).
        latest = (select(Job.backup_id, func.max(Job.finished_at).label("at"))
                  .where(Job.kind == "verify", finished).group_by(Job.backup_id).subquery())
        backups = dict.fromkeys(("ok", "failed"), 0)
        backups.update(s.execute(
            select(result, func.count(func.distinct(Job.backup_id)))
            .join(latest, and_(Job.backup_id == latest.c.backup_id,
                               Job.finished_at == latest.c.at))
            .join(Backup, and_(Backup.id == Job.backup_id, Backup.deleted.is_(False)))
            .where(Job.kind == "verify", finished)
            .group_by(result)).all())

        # Each container's latest finished container check (within the job retention).
        other = aliased(Job)
        newer = (select(other.id).where(
            other.kind == "verify_container", other.once_key == Job.once_key,
            other.state.in_(("done", "failed")), other.finished_at > Job.finished_at)
            .exists())
        containers = dict.fromkeys(("ok", "failed"), 0)
        containers.update(s.execute(
            select(result, func.count(func.distinct(Job.once_key)))
            .where(Job.kind == "verify_container", finished, ~newer)
            .group_by(result)).all())

        last = dict(s.execute(
            select(result, func.max(Job.finished_at))
            .where(Job.kind.in_(("verify", "verify_container")), finished)
            .group_by(result)).all())

        b = GaugeMetricFamily(
            "blockvault_verify_backups", "Backups not deleted, by the result of their "
            "latest verify (ok: every block present and intact; failed: a block missing "
            "or corrupt, or the check could not run). Never-verified backups are not "
            "counted.", labels=["result"])
        c = GaugeMetricFamily(
            "blockvault_verify_containers", "Containers by the result of their latest "
            "container verify still on record (finished jobs are kept job_retention "
            "seconds).", labels=["result"])
        t = GaugeMetricFamily(
            "blockvault_verify_last_timestamp_seconds", "When the latest verify (of a "
            "backup or a container) with this result finished, 0 if none is on record.",
            labels=["result"])
        for r in ("failed", "ok"):
            b.add_metric([r], backups[r])
            c.add_metric([r], containers[r])
            t.add_metric([r], _epoch(last.get(r)))
        return [b, c, t]

    # -- schedules ---------------------------------------------------------------------------

    def _schedules(self, s: Session) -> list[Metric]:
        labels = ["schedule_id", "project_id"]
        runs = CounterMetricFamily(
            "blockvault_schedule_runs", "Runs of a backup schedule (on time or late).",
            labels=labels)
        failures = CounterMetricFamily(
            "blockvault_schedule_failures", "Runs of a backup schedule that failed (wholly "
            "or in part).", labels=labels)
        misses = CounterMetricFamily(
            "blockvault_schedule_misses", "Times a backup schedule was found overdue (no "
            "process ran it when due) and was run once, late.", labels=labels)
        enabled = GaugeMetricFamily(
            "blockvault_schedule_enabled", "1 if the schedule is enabled, else 0.",
            labels=labels)
        created = GaugeMetricFamily(
            "blockvault_schedule_created_timestamp_seconds", "When the schedule was made.",
            labels=labels)
        success = GaugeMetricFamily(
            "blockvault_schedule_last_success_timestamp_seconds", "When the schedule's "
            "latest wholly successful run happened, 0 if it never had one.", labels=labels)
        next_run = GaugeMetricFamily(
            "blockvault_schedule_next_run_timestamp_seconds", "When the schedule fires next.",
            labels=labels)
        period = GaugeMetricFamily(
            "blockvault_schedule_period_seconds", "Seconds between the schedule's runs: its "
            "interval, or for a cron schedule the gap between its last run (or creation) "
            "and its next one.", labels=labels)
        rows = s.execute(select(
            Schedule.id, Schedule.project_id, Schedule.runs_total, Schedule.failures_total,
            Schedule.misses_total, Schedule.enabled, Schedule.created_at,
            Schedule.last_success_at, Schedule.last_run_at, Schedule.next_run_at,
            Schedule.interval_seconds).where(Schedule.deleted.is_(False)))
        for (sid, project, n_runs, n_failures, n_misses, on, created_at, success_at,
             run_at, next_at, interval) in rows:
            key = [sid, project]
            runs.add_metric(key, n_runs or 0)
            failures.add_metric(key, n_failures or 0)
            misses.add_metric(key, n_misses or 0)
            enabled.add_metric(key, 1 if on else 0)
            created.add_metric(key, _epoch(created_at))
            success.add_metric(key, _epoch(success_at))
            next_run.add_metric(key, _epoch(next_at))
            period.add_metric(key, _period(interval, run_at or created_at, next_at))
        return [runs, failures, misses, enabled, created, success, next_run, period]


def _period(interval: int | None, since: dt.datetime | None, next_at: dt.datetime | None
            ) -> float:
    if interval:
        return float(interval)
    if since is None or next_at is None:
        return 0.0
    return max(0.0, (next_at - since).total_seconds())

