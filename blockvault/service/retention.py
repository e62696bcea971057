"""Retention: which backups a keep-policy keeps, with restic's ``forget`` semantics.

Pure and clock-free: it sees only (id, time) pairs and a policy, so the scheduler's prune, the
``os-forget`` preview and the tests all ask the very same function.

The rules, as restic (>= 0.14) applies them and Proxmox Backup Server documents them:
items are walked newest first. ``keep_last`` keeps the N newest. Each calendar rule
(hourly, daily, weekly = ISO week, monthly, yearly; calendars read in the policy's time zone)
keeps the newest item of each of its buckets, for up to N buckets; while a rule still has
buckets left when the walk reaches the very oldest item, that item is kept too ("oldest"),
which keeps the history as long as the policy allows. An item is kept if any rule keeps it;
the reasons list every rule that did. An empty policy keeps everything (restic refuses to
forget with no policy; a schedule with no keep-rule never prunes).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from zoneinfo import ZoneInfo

#: rule name -> (bucket key of a local time, label of that bucket in reasons)
_Bucketer = Callable[[dt.datetime], str]

_CALENDAR: tuple[tuple[str, _Bucketer], ...] = (
    ("hourly", lambda t: t.strftime("%Y-%m-%d %Hh")),
    ("daily", lambda t: t.strftime("%Y-%m-%d")),
    ("weekly", lambda t: f"{t.isocalendar()[0]:04d}-W{t.isocalendar()[1]:02d}"),
    ("monthly", lambda t: t.strftime("%Y-%m")),
    ("yearly", lambda t: t.strftime("%Y")),
)


@dataclass(frozen=True)
class RetentionPolicy:
    """How many to keep per rule; None or 0 = the rule is off."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    tz: str = "UTC"

    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self) if f.name.startswith("keep_"))

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("keep_") and value is not None and value < 0:
                raise ValueError(f"{f.name} must be 0 or more, not {value}")
        ZoneInfo(self.tz)  # an unknown zone fails here, not halfway through a prune


def _aware(when: dt.datetime) -> dt.datetime:
    # the DB stores naive UTC
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when


def select_kept(items: Sequence[tuple[str, dt.datetime]],
                policy: RetentionPolicy) -> dict[str, list[str]]:
    """Map each kept id to the reasons it is kept; ids absent from the result are expired."""
    # newest first; equal times fall back to the id so the answer never depends on input order
    ordered = sorted(items, key=lambda it: (_aware(it[1]), it[0]), reverse=True)
    if policy.empty():
        return {item_id: ["no policy"] for item_id, _ in ordered}
    zone = ZoneInfo(policy.tz)
    kept: dict[str, list[str]] = {}
    for nr, (item_id, _when) in enumerate(ordered):
        if policy.keep_last and nr < policy.keep_last:
            kept.setdefault(item_id, []).append("last")
    counts = {name: getattr(policy, f"keep_{name}") or 0 for name, _ in _CALENDAR}
    for name, bucket_of in _CALENDAR:
        left = counts[name]
        previous: str | None = None
        for nr, (item_id, when) in enumerate(ordered):
            if left <= 0:
                break
            bucket = bucket_of(_aware(when).astimezone(zone))
            oldest = nr == len(ordered) - 1
            if bucket != previous or oldest:
                label = f"{name} {bucket}"
                if bucket == previous:  # restic: the oldest item while buckets are left
                    label = f"oldest {label}"
                kept.setdefault(item_id, []).append(label)
                previous = bucket
                left -= 1
    return kept
