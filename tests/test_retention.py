"""retention.select_kept against restic's ``forget`` rules, on hand-worked calendars.

Each case was worked out on paper from restic's algorithm (newest first; per rule, a new
bucket is kept while the rule has counts left; the oldest item is kept too while counts
are left) with real dates; the comments give the calendar facts the answer rests on.
"""

from __future__ import annotations

import datetime as dt
import random

import pytest

from blockvault.service.retention import RetentionPolicy, select_kept


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args)  # naive UTC, as the DB stores it


def daily_november() -> list[tuple[str, dt.datetime]]:
    """One backup a day at 12:00 UTC, 2026-11-01 .. 2026-11-30, named by the day."""
    return [(f"n{d:02d}", utc(2026, 11, d, 12)) for d in range(1, 31)]


CASES = [
    pytest.param(
        daily_november(), RetentionPolicy(keep_last=3),
        {"n30": ["last"], "n29": ["last"], "n28": ["last"]},
        id="keep-last"),
    pytest.param(
        # 2026-11-30 is a Monday (ISO 2026-W49); 23..29 is W48, 16..22 W47, 9..15 W46.
        # Daily keeps 24..30; weekly the newest of W49, W48, W47, W46 = 30, 29, 22, 15;
        # monthly keeps 30 (2026-11) and, with a count left at the oldest, 01.
        daily_november(),
        RetentionPolicy(keep_daily=7, keep_weekly=4, keep_monthly=2),
        {
            "n30": ["daily 2026-11-30", "weekly 2026-W49", "monthly 2026-11"],
            "n29": ["daily 2026-11-29", "weekly 2026-W48"],
            "n28": ["daily 2026-11-28"], "n27": ["daily 2026-11-27"],
            "n26": ["daily 2026-11-26"], "n25": ["daily 2026-11-25"],
            "n24": ["daily 2026-11-24"],
            "n22": ["weekly 2026-W47"], "n15": ["weekly 2026-W46"],
            "n01": ["oldest monthly 2026-11"],
        },
        id="daily-weekly-monthly"),
    pytest.param(
        # Counts larger than the buckets there are: every day kept, and the oldest is
        # the newest of its own day already (no "oldest" reason).
        daily_november()[:3], RetentionPolicy(keep_daily=10),
        {"n03": ["daily 2026-11-03"], "n02": ["daily 2026-11-02"],
         "n01": ["daily 2026-11-01"]},
        id="more-counts-than-days"),
    pytest.param(
        # Berlin: 21:30Z on the 24th is 23:30 CEST that day, 22:30Z is 00:30 on the 25th.
        # In Berlin time b and c share the 25th: daily=2 keeps c and a; in UTC (next case)
        # b and a share the 24th and daily=2 keeps c and b.
        [("a", utc(2026, 10, 24, 21, 30)), ("b", utc(2026, 10, 24, 22, 30)),
         ("c", utc(2026, 10, 25, 12))],
        RetentionPolicy(keep_daily=2, tz="Europe/Berlin"),
        {"c": ["daily 2026-10-25"], "a": ["daily 2026-10-24"]},
        id="days-of-the-policy-zone"),
    pytest.param(
        [("a", utc(2026, 10, 24, 21, 30)), ("b", utc(2026, 10, 24, 22, 30)),
         ("c", utc(2026, 10, 25, 12))],
        RetentionPolicy(keep_daily=2),
        {"c": ["daily 2026-10-25"], "b": ["daily 2026-10-24"]},
        id="days-of-utc"),
    pytest.param(
        # DST ends in Berlin 2026-10-25 at 03:00 CEST -> 02:00 CET: 00:30Z and 01:30Z are
        # both 02:30 local, one hour bucket (restic buckets by the local hour). z (02:30Z)
        # is 03:30 CET. hourly=3: z, y, and x only as the oldest with a count left.
        [("x", utc(2026, 10, 25, 0, 30)), ("y", utc(2026, 10, 25, 1, 30)),
         ("z", utc(2026, 10, 25, 2, 30))],
        RetentionPolicy(keep_hourly=3, tz="Europe/Berlin"),
        {"z": ["hourly 2026-10-25 03h"], "y": ["hourly 2026-10-25 02h"],
         "x": ["oldest hourly 2026-10-25 02h"]},
        id="dst-fold-hour"),
    pytest.param(
        # 2026 starts on a Thursday, so it has an ISO week 53, which holds 2027-01-01 (a
        # Friday) and 2026-12-28 (its Monday); 2027-01-04 opens 2027-W01. Yearly buckets are
        # calendar years: 2027 is the 4th (newest), 2026 the 28th.
        [("d28", utc(2026, 12, 28, 12)), ("j01", utc(2027, 1, 1, 12)),
         ("j04", utc(2027, 1, 4, 12))],
        RetentionPolicy(keep_weekly=2, keep_yearly=2),
        {"j04": ["weekly 2027-W01", "yearly 2027"], "j01": ["weekly 2026-W53"],
         "d28": ["yearly 2026"]},
        id="iso-week-53"),
    pytest.param(
        # Two an hour for a day (48 items, the newest 2026-03-01 23:30): hourly=5 keeps the
        # :30 of hours 23..19, last=2 the two newest, and the :00 of 23 is kept by "last".
        [(f"h{h:02d}{m:02d}", utc(2026, 3, 1, h, m)) for h in range(24) for m in (0, 30)],
        RetentionPolicy(keep_last=2, keep_hourly=5),
        {"h2330": ["last", "hourly 2026-03-01 23h"], "h2300": ["last"],
         "h2230": ["hourly 2026-03-01 22h"], "h2130": ["hourly 2026-03-01 21h"],
         "h2030": ["hourly 2026-03-01 20h"], "h1930": ["hourly 2026-03-01 19h"]},
        id="last-and-hourly"),
]


@pytest.mark.parametrize(("items", "policy", "expected"), CASES)
def test_select_kept_matches_restic(items, policy, expected):
    assert select_kept(items, policy) == expected
    # the answer never depends on the order the items come in
    shuffled = list(items)
    random.Random(7).shuffle(shuffled)
    assert select_kept(shuffled, policy) == expected


def test_aware_times_are_the_same_instants_as_naive_utc():
    berlin = dt.timezone(dt.timedelta(hours=2))
    items = [("a", dt.datetime(2026, 10, 24, 23, 30, tzinfo=berlin)),  # 21:30Z
             ("b", utc(2026, 10, 24, 22, 30)), ("c", utc(2026, 10, 25, 12))]
    assert select_kept(items, RetentionPolicy(keep_daily=2)) == {
        "c": ["daily 2026-10-25"], "b": ["daily 2026-10-24"]}


def test_an_empty_policy_keeps_everything():
    items = daily_november()
    assert RetentionPolicy().empty() and RetentionPolicy(keep_daily=0).empty()
    assert not RetentionPolicy(keep_yearly=1).empty()
    assert set(select_kept(items, RetentionPolicy())) == {i for i, _ in items}
    assert select_kept([], RetentionPolicy(keep_last=3)) == {}


def test_zero_turns_a_rule_off():
    assert select_kept(daily_november(), RetentionPolicy(keep_last=1, keep_daily=0)) == {
        "n30": ["last"]}


@pytest.mark.parametrize("bad", [dict(keep_last=-1), dict(keep_weekly=-3),
                                 dict(tz="Mars/Olympus_Mons")])
def test_bad_policies_are_refused(bad):
    with pytest.raises(Exception) as exc:
        RetentionPolicy(**bad)
    assert isinstance(exc.value, ValueError | KeyError)
