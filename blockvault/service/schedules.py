"""Backup schedule rules (blockvault extension ``os-backup-schedules``): what a schedule may
say, when it fires next, which of its backups a keep-policy lets go, and pruning them.

Firing and settling runs is blockvault.service.scheduler's; this module owns the rules both it
and the API apply: validation (cron, time zone, selector, keep counts), the next run time
(always computed from the DB clock and strictly after the previous one, so a slot never fires
twice), and forget plans. Pruning goes through BackupService.delete like an API call, leaves
first: Cinder refuses to delete a backup with live incrementals, so a kept backup's parent is
kept too, and a parent is deleted only once its expired children are gone.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from sqlalchemy import select
from sqlalchemy.orm import Session

from blockvault.db.models import Backup, Schedule, Volume, db_now, utcnow
from blockvault.db.session import Database
from blockvault.service.backups import BackupService
from blockvault.service.context import RequestContext
from blockvault.service.errors import NotFound, ServiceError, invalid_input
from blockvault.service.retention import RetentionPolicy, select_kept
from blockvault.service.volumes import visible_volume

KEEP_FIELDS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly",
               "keep_yearly")
#: fields a create or update may set
FIELDS = ("name", "description", "volume_ids", "volume_metadata_key", "cron",
          "interval_seconds", "timezone", "full_every", "container", "enabled", *KEEP_FIELDS)
MIN_INTERVAL = 60
MAX_VOLUMES = 100
#: a cron expression that never fires in this long is refused (e.g. "0 0 30 2 *")
_CRON_HORIZON = dt.timedelta(days=366 * 5)


def db_clock(s: Session) -> dt.datetime:
    """The database's current naive UTC time (the clock every process agrees on)."""
    value = s.scalar(select(db_now()))
    if isinstance(value, str):  # SQLite without a type round trip
        value = dt.datetime.fromisoformat(value)
    return value


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise invalid_input(f"Unknown time zone {name!r}: use an IANA name such as "
                            "'Europe/Berlin' or 'UTC'.") from None


def next_run(cron: str | None, interval: int | None, tz: str, after: dt.datetime) -> dt.datetime:
    """The first run strictly after ``after`` (naive UTC), as naive UTC."""
    if interval:
        return after + dt.timedelta(seconds=interval)
    assert cron is not None
    zone = _zone(tz)
    local = after.replace(tzinfo=dt.UTC).astimezone(zone)
    try:
        fire = next(iter(CronSim(cron, local)))
    except (CronSimError, StopIteration) as exc:
        raise invalid_input(f"Invalid cron expression {cron!r}: {exc or 'never fires'}.") from None
    # cronsim answers in the zone it was given, wall-clock aware (DST gaps and folds)
    return fire.astimezone(dt.UTC).replace(tzinfo=None)


def policy_of(schedule: Schedule | dict[str, Any]) -> RetentionPolicy:
    get = schedule.get if isinstance(schedule, dict) else lambda k: getattr(schedule, k)
    return RetentionPolicy(**{k: get(k) for k in KEEP_FIELDS}, tz=get("timezone") or "UTC")


def schedule_context(schedule: Schedule) -> RequestContext:
    """Who a schedule's backups are made and pruned as: its creator, as a member of its
    project (quota, policy and statuses apply as to an API call)."""
    return RequestContext(user_id=schedule.user_id, project_id=schedule.project_id)


def visible_schedule(s: Session, ctx: RequestContext, schedule_id: str,
                     lock: bool = False) -> Schedule:
    stmt = select(Schedule).where(Schedule.id == schedule_id, Schedule.deleted.is_(False))
    if not ctx.is_admin:
        stmt = stmt.where(Schedule.project_id == ctx.project_id)
    if lock:
        stmt = stmt.with_for_update()
    found = s.scalars(stmt).first()
    if found is None:
        raise NotFound(f"Backup schedule {schedule_id} could not be found.")
    return found


def selected_volumes(s: Session, schedule: Schedule) -> list[str]:
    """The live volumes of the schedule's project it backs up now (ids in the schedule's
    order; a metadata selector in creation order)."""
    base = select(Volume).where(Volume.project_id == schedule.project_id,
                                Volume.deleted.is_(False))
    if schedule.volume_ids:
        found = {v.id for v in s.scalars(base.where(Volume.id.in_(schedule.volume_ids)))}
        return [v for v in schedule.volume_ids if v in found]
    key, _, value = (schedule.volume_metadata_key or "").partition("=")
    want_value = "=" in (schedule.volume_metadata_key or "")
    out = []
    for vol in s.scalars(base.order_by(Volume.created_at, Volume.id)):
        meta = vol.metadata_ or {}
        if key in meta and (not want_value or meta[key] == value):
            out.append(vol.id)
    return out


# -- forget plans -------------------------------------------------------------------------


@dataclass
class ForgetPlan:
    """What a keep-policy does to a set of backups: kept (with reasons) and removed."""

    kept: dict[str, list[str]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    #: id -> (volume_id, created_at, parent_id) of every candidate
    info: dict[str, tuple[str, dt.datetime, str | None]] = field(default_factory=dict)


def plan_forget(s: Session, candidates: list[Backup], policy: RetentionPolicy) -> ForgetPlan:
    """Apply ``policy`` per volume to ``candidates`` (available backups), then keep every
    expired backup a live backup outside the removal set still depends on."""
    plan = ForgetPlan()
    by_volume: dict[str, list[Backup]] = {}
    for b in candidates:
        by_volume.setdefault(b.volume_id, []).append(b)
        plan.info[b.id] = (b.volume_id, b.created_at, b.parent_id)
    for backups in by_volume.values():
        plan.kept.update(select_kept([(b.id, b.created_at) for b in backups], policy))
    expired = {b.id for b in candidates if b.id not in plan.kept}
    if expired:
        # live children of expired backups (any project: Cinder's rule is about the row)
        children: dict[str, list[str]] = {}
        for child_id, parent_id in s.execute(
            select(Backup.id, Backup.parent_id).where(Backup.parent_id.in_(expired),
                                                      Backup.deleted.is_(False))
        ):
            children.setdefault(parent_id, []).append(child_id)
        changed = True
        while changed:  # keeping a parent may make its own parent needed: to a fixpoint
            changed = False
            for bid in sorted(expired):
                holders = [c for c in children.get(bid, ()) if c not in expired]
                if holders:
                    expired.discard(bid)
                    plan.kept[bid] = [f"parent of {c}" for c in sorted(holders)]
                    changed = True
    plan.removed = sorted(expired, key=lambda b: plan.info[b][1], reverse=True)
    return plan


def prune(backups: BackupService, db: Database, ctx: RequestContext, plan: ForgetPlan,
          deadline: float) -> tuple[list[str], list[str], list[str]]:
    """Delete ``plan.removed`` through the service path, children before parents: a parent
    is asked for only once every child being removed is gone (deletes are jobs). Returns
    (deleted, still pending at ``deadline`` (monotonic), refused with a reason)."""
    left = set(plan.removed)
    done: list[str] = []
    refused: list[str] = []
    waiting: set[str] = set()
    while left or waiting:
        if waiting:
            with db.reader() as s:
                gone = set(s.scalars(select(Backup.id).where(Backup.id.in_(waiting),
                                                             Backup.deleted.is_(True))))
            waiting -= gone
        parents_left = {plan.info[b][2] for b in left | waiting}
        leaves = sorted(b for b in left if b not in parents_left)
        for bid in leaves:
            left.discard(bid)
            try:
                backups.delete(ctx, bid)
            except ServiceError:
                # a new child, a status change since the plan: the next run plans again
                refused.append(bid)
                # its parent must not be deleted under it
                _keep_ancestors(plan, bid, left)
                continue
            done.append(bid)
            waiting.add(bid)
        if not left and not waiting:
            break
        if time.monotonic() > deadline:
            break
        if not leaves:
            time.sleep(0.2)
    pending = sorted(left | waiting) if (left or waiting) else []
    return done, [p for p in pending if p not in done], refused


def _keep_ancestors(plan: ForgetPlan, bid: str, left: set[str]) -> None:
    parent = plan.info[bid][2]
    while parent in left:
        left.discard(parent)
        parent = plan.info[parent][2]


# -- the service --------------------------------------------------------------------------


class ScheduleService:
    def __init__(self, db: Database, backups: BackupService, max_limit: int = 1000) -> None:
        self.db = db
        self.backups = backups
        self.max_limit = max_limit

    # -- read ---------------------------------------------------------------------------

    def get(self, ctx: RequestContext, schedule_id: str) -> Schedule:
        with self.db.reader() as s:
            found = visible_schedule(s, ctx, schedule_id)
            ctx.authorize("blockvault:backup_schedule:get", found)
            return found

    def list(self, ctx: RequestContext, all_tenants: bool = False) -> list[Schedule]:
        ctx.authorize("blockvault:backup_schedule:get_all")
        with self.db.reader() as s:
            stmt = select(Schedule).where(Schedule.deleted.is_(False))
            if not (ctx.is_admin and all_tenants):
                stmt = stmt.where(Schedule.project_id == ctx.project_id)
            # ties newest id first: the order ix_backup_schedules_list holds
            stmt = stmt.order_by(Schedule.created_at.desc().nulls_last(),
                                 Schedule.id.desc().nulls_last()).limit(self.max_limit)
            return list(s.scalars(stmt))

    # -- write --------------------------------------------------------------------------

    def create(self, ctx: RequestContext, values: dict[str, Any]) -> Schedule:
        ctx.authorize("blockvault:backup_schedule:create")
        fields_ = {k: None for k in FIELDS}
        fields_.update(timezone="UTC", full_every=0, enabled=True)
        fields_.update(values)
        self._check(fields_)
        with self.db.session() as s:
            self._check_volumes(s, ctx, fields_.get("volume_ids"))
            schedule = Schedule(project_id=ctx.project_id, user_id=ctx.user_id, **fields_)
            schedule.next_run_at = next_run(schedule.cron, schedule.interval_seconds,
                                            schedule.timezone, db_clock(s))
            schedule.created_at = utcnow()
            s.add(schedule)
            s.flush()
            return schedule

    def update(self, ctx: RequestContext, schedule_id: str, values: dict[str, Any]) -> Schedule:
        with self.db.session() as s:
            schedule = visible_schedule(s, ctx, schedule_id, lock=True)
            ctx.authorize("blockvault:backup_schedule:update", schedule)
            merged = {k: getattr(schedule, k) for k in FIELDS}
            # a new timing replaces the old one: cron and interval are one choice
            if values.get("cron") is not None:
                merged["interval_seconds"] = None
            if values.get("interval_seconds") is not None:
                merged["cron"] = None
            if values.get("volume_ids") is not None:
                merged["volume_metadata_key"] = None
            if values.get("volume_metadata_key") is not None:
                merged["volume_ids"] = None
            merged.update(values)
            self._check(merged)
            if values.get("volume_ids") is not None:
                self._check_volumes(s, ctx, merged["volume_ids"])
            timing = ("cron", "interval_seconds", "timezone")
            retime = any(merged[k] != getattr(schedule, k) for k in timing) or (
                merged["enabled"] and not schedule.enabled)
            for key, value in merged.items():
                setattr(schedule, key, value)
            if retime:
                schedule.next_run_at = next_run(schedule.cron, schedule.interval_seconds,
                                                schedule.timezone, db_clock(s))
            schedule.updated_at = utcnow()
            s.flush()
            return schedule

    def delete(self, ctx: RequestContext, schedule_id: str) -> None:
        """The schedule stops; the backups it made stay (their schedule_id says whose)."""
        with self.db.session() as s:
            schedule = visible_schedule(s, ctx, schedule_id, lock=True)
            ctx.authorize("blockvault:backup_schedule:delete", schedule)
            schedule.deleted, schedule.enabled, schedule.updated_at = True, False, utcnow()

    # -- forget -------------------------------------------------------------------------

    def forget(self, ctx: RequestContext, *, schedule_id: str | None, volume_id: str | None,
               keep: dict[str, int | None], tz: str | None, dry_run: bool,
               wait_seconds: float = 30.0) -> dict[str, Any]:
        """Preview (``dry_run``) or apply a keep-policy to a schedule's backups or to every
        available backup of a volume. With a schedule and no keep-rule given, the schedule's
        own policy; a volume needs one (an empty policy would keep everything anyway)."""
        ctx.authorize("blockvault:backup:forget")
        if (schedule_id is None) == (volume_id is None):
            raise invalid_input("Give exactly one of schedule_id and volume_id.")
        for name, value in keep.items():
            if value is not None and value < 0:
                raise invalid_input(f"{name} must be 0 or more.")
        if tz is not None:
            _zone(tz)
        with self.db.session() as s:
            stmt = select(Backup).where(Backup.deleted.is_(False), Backup.status == "available",
                                        Backup.project_id == ctx.project_id)
            if schedule_id is not None:
                schedule = visible_schedule(s, ctx, schedule_id)
                ctx.authorize("blockvault:backup_schedule:get", schedule)
                policy = policy_of(schedule)
                if any(v is not None for v in keep.values()):
                    policy = RetentionPolicy(**keep, tz=tz or schedule.timezone)
                elif tz is not None:
                    policy = RetentionPolicy(**{k: getattr(schedule, k) for k in KEEP_FIELDS},
                                             tz=tz)
                stmt = select(Backup).where(Backup.deleted.is_(False),
                                            Backup.status == "available",
                                            Backup.schedule_id == schedule.id)
            else:
                visible_volume(s, ctx, volume_id)  # 404 for another project's
                policy = RetentionPolicy(**keep, tz=tz or "UTC")
                if policy.empty():
                    raise invalid_input("No keep rule given: forget needs at least one "
                                        "keep-* count above 0.")
                stmt = stmt.where(Backup.volume_id == volume_id)
            plan = plan_forget(s, list(s.scalars(stmt)), policy)
        if policy.empty():
            plan.removed = []  # a schedule without keep-rules never prunes
        result: dict[str, Any] = {"dry_run": dry_run, "policy": policy_view(policy)}
        result["kept"] = [_item(plan, b, reasons=plan.kept[b]) for b in
                          sorted(plan.kept, key=lambda b: plan.info[b][1], reverse=True)]
        result["removed"] = [_item(plan, b) for b in plan.removed]
        if not dry_run:
            done, pending, refused = prune(self.backups, self.db, ctx, plan,
                                           time.monotonic() + wait_seconds)
            result["deleted"], result["pending"], result["refused"] = done, pending, refused
        return result

    # -- validation ---------------------------------------------------------------------

    @staticmethod
    def _check(v: dict[str, Any]) -> None:
        if (v.get("cron") is None) == (v.get("interval_seconds") is None):
            raise invalid_input("Give exactly one of cron and interval_seconds.")
        if v.get("interval_seconds") is not None and v["interval_seconds"] < MIN_INTERVAL:
            raise invalid_input(f"interval_seconds must be at least {MIN_INTERVAL}.")
        tz = v.get("timezone") or "UTC"
        _zone(tz)
        if v.get("cron") is not None:
            now = utcnow()
            first = next_run(v["cron"], None, tz, now)
            if first - now > _CRON_HORIZON:
                raise invalid_input(f"Invalid cron expression {v['cron']!r}: it does not fire "
                                    "within five years.")
        if (v.get("volume_ids") is None) == (v.get("volume_metadata_key") is None):
            raise invalid_input("Give exactly one of volume_ids and volume_metadata_key.")
        ids = v.get("volume_ids")
        if ids is not None:
            if not ids:
                raise invalid_input("volume_ids must name at least one volume.")
            if len(ids) > MAX_VOLUMES:
                raise invalid_input(f"volume_ids may name at most {MAX_VOLUMES} volumes.")
            if len(set(ids)) != len(ids):
                raise invalid_input("volume_ids must not repeat a volume.")
        key = v.get("volume_metadata_key")
        if key is not None and not key.partition("=")[0]:
            raise invalid_input("volume_metadata_key must be 'key' or 'key=value'.")
        if v.get("full_every") is None or v["full_every"] < 0:
            raise invalid_input("full_every must be 0 or more.")
        for name in KEEP_FIELDS:
            if v.get(name) is not None and v[name] < 0:
                raise invalid_input(f"{name} must be 0 or more.")
        if v["full_every"] == 0 and any(v.get(name) for name in KEEP_FIELDS):
            # Every backup would be the parent of the next: none could ever be pruned, and
            # the policy would silently keep everything.
            raise invalid_input("A retention policy needs full_every of 1 or more: with "
                                "full_every 0 every backup is the parent of the next, so "
                                "none could ever be deleted.")

    @staticmethod
    def _check_volumes(s: Session, ctx: RequestContext, ids: Iterable[str] | None) -> None:
        for volume_id in ids or ():
            # a volume of another project is 404, exactly like one that does not exist
            visible_volume(s, RequestContext(ctx.user_id, ctx.project_id), volume_id)


def policy_view(policy: RetentionPolicy) -> dict[str, Any]:
    return {**{k: getattr(policy, k) for k in KEEP_FIELDS}, "timezone": policy.tz}


def _item(plan: ForgetPlan, backup_id: str, reasons: list[str] | None = None) -> dict[str, Any]:
    volume_id, created, parent = plan.info[backup_id]
    out: dict[str, Any] = {"id": backup_id, "volume_id": volume_id,
                           "created_at": created.strftime("%Y-%m-%dT%H:%M:%S.%f"),
                           "parent_id": parent}
    if reasons is not None:
        out["reasons"] = reasons
    return out


