"""The Jinja2 environment of the dashboard: templates loaded from the package (so a wheel
install has them), autoescaping on (names and descriptions are tenants' text), and the
filters that turn bytes, times and durations into what a person reads."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import jinja2
from starlette.templating import Jinja2Templates


def human_bytes(n: int | None) -> str:
    """1536 -> "1.5 KiB"; None -> "—" (not known yet, e.g. a backup still running)."""
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def utc(when: dt.datetime | None) -> str:
    """Naive UTC (as stored) -> "2026-11-29 16:41 UTC"."""
    return "—" if when is None else when.strftime("%Y-%m-%d %H:%M UTC")


def iso(when: dt.datetime | None) -> str:
    return "" if when is None else when.replace(tzinfo=dt.UTC).isoformat()


def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}×"


def percent(done: int, total: int) -> str:
    return f"{100 * done / total:.0f} %" if total else "—"


def make_templates(asset_url: Callable[[str], str]) -> Jinja2Templates:
    """``asset_url(name)``: a static file's URL below ``/dashboard/static/``."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("blockvault.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a typo in a template fails the test, not silently
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(bytes=human_bytes, utc=utc, iso=iso, ratio=ratio)
    env.globals.update(percent=percent, asset=asset_url)
    return Jinja2Templates(env=env)
