"""Service heartbeats and Cinder's ``os-services`` listing.

Every service process keeps a row in ``runners`` (blockvault.db.models.Runner) fresh: job
runners as ``cinder-backup`` (with the HOST@BACKEND names of the volume backends they
reach: jobs on a volume are routed by them), API processes as ``cinder-api``. The listing
shows one entry per (host, binary), as Cinder does: several API processes behind a load
balancer on one host are one ``cinder-api`` service, up while any of them beats. A service
is ``down`` when its newest heartbeat is older than ``service_down_time`` by the
database's clock (never a process's: hosts' clocks may disagree).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session

from blockvault.db.models import Job, Runner, db_now
from blockvault.db.session import Database
from blockvault.service.context import RequestContext

log = logging.getLogger("blockvault.heartbeats")

BINARY_API = "cinder-api"
BINARY_BACKUP = "cinder-backup"
BINARIES = (BINARY_API, BINARY_BACKUP)
#: rows of a (host, binary) unseen this long are forgotten when a process of that host
#: and binary starts: restarted API processes (a new row each) do not pile up
_FORGET_AFTER = 7 * 86400.0


def beat(s: Session, owner: str, host: str, binary: str, backends: list[str] | None) -> None:
    """Record that ``owner`` is alive now (insert its row the first time)."""
    values: dict[str, Any] = dict(host=host, binary=binary, backends=backends,
                                  pid=os.getpid(), seen_at=db_now())
    res = s.execute(update(Runner).where(Runner.owner == owner).values(**values))
    if res.rowcount == 0:
        s.add(Runner(owner=owner, started_at=db_now(), **values))


class Heartbeat:
    """A thread that beats for one process every ``interval`` seconds until stopped."""

    def __init__(self, db: Database, owner: str, host: str, binary: str,
                 backends: list[str] | None = None, interval: float = 10.0) -> None:
        self.db, self.owner, self.host, self.binary = db, owner, host, binary
        self.backends = backends
        self.interval = max(0.05, interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat_once(self) -> str | None:
        """Beat now: None when the DB took the write, else the problem in words."""
        try:
            with self.db.session() as s:
                beat(s, self.owner, self.host, self.binary, self.backends)
        except Exception as exc:
            return f"the database is not writable: {type(exc).__name__}: {exc}"[:300]
        return None

    def start(self) -> None:
        try:
            with self.db.session() as s:
                s.execute(delete(Runner).where(
                    Runner.host == self.host, Runner.binary == self.binary,
                    Runner.owner != self.owner, Runner.seen_at < db_now(-_FORGET_AFTER)))
        except Exception:
            log.exception("forgetting stale %s heartbeats failed", self.binary)
        self.beat_once()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.binary}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            problem = self.beat_once()
            if problem:
                log.error("heartbeat of %s failed: %s", self.owner, problem)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def list_services(s: Session, down_time: float, host: str | None = None,
                  binary: str | None = None) -> list[dict[str, Any]]:
    """One entry per (host, binary), ordered by both: its newest heartbeat and whether that
    is within ``down_time`` seconds of the DB's now."""
    newest = func.max(Runner.seen_at)
    up = func.max(case((Runner.seen_at >= db_now(-down_time), 1), else_=0))
    query = (select(Runner.host, Runner.binary, newest, up)
             .group_by(Runner.host, Runner.binary).order_by(Runner.host, Runner.binary))
    if host is not None:
        query = query.where(Runner.host == host)
    if binary is not None:
        query = query.where(Runner.binary == binary)
    return [{"host": h, "binary": b, "updated_at": seen, "up": bool(alive)}
            for h, b, seen, alive in s.execute(query)]


class ServiceListing:
    """The rule of ``os-services``: admins only (Cinder's ``volume_extension:services:index``)."""

    def __init__(self, db: Database, down_time: float) -> None:
        self.db = db
        self.down_time = float(down_time)

    def list(self, ctx: RequestContext, host: str | None = None,
             binary: str | None = None) -> list[dict[str, Any]]:
        ctx.authorize("volume_extension:services:index")
        with self.db.reader() as s:
            return list_services(s, self.down_time, host, binary)


# -- routing: jobs no live worker reaches ----------------------------------------------------


@dataclass(frozen=True)
class Waiting:
    """The queued jobs of one HOST@BACKEND that no live ``cinder-backup`` announces."""

    route: str
    jobs: int
    oldest_seconds: float


def live_routes(s: Session, down_time: float) -> set[str]:
    """The HOST@BACKEND names announced by job runners that beat within ``down_time``
    seconds (the DB's clock): the ``up`` ``cinder-backup`` services of os-services."""
    routes: set[str] = set()
    for (backends,) in s.execute(
            select(Runner.backends).where(Runner.binary == BINARY_BACKUP,
                                          Runner.seen_at >= db_now(-down_time))):
        routes.update(b for b in (backends or []) if isinstance(b, str))
    return routes


def queued_by_route(s: Session) -> dict[str, tuple[int, float]]:
    """route -> (queued jobs, seconds the oldest has waited) over routed queued jobs."""
    out: dict[str, tuple[int, float]] = {}
    for route, n, oldest, now in s.execute(
            select(Job.route, func.count(), func.min(Job.created_at), db_now())
            .where(Job.state == "queued", Job.route.is_not(None)).group_by(Job.route)):
        oldest, now = _datetime(oldest), _datetime(now)
        age = max(0.0, (now - oldest).total_seconds()) if oldest and now else 0.0
        out[route] = (n, age)
    return out


def unroutable_jobs(s: Session, down_time: float) -> list[Waiting]:
    """Queued jobs whose volume's HOST@BACKEND no live worker reaches: they wait (queued,
    their backup or volume status unchanged) until a worker announcing it beats again."""
    live = live_routes(s, down_time)
    return [Waiting(route, n, age) for route, (n, age) in sorted(queued_by_route(s).items())
            if route not in live]


def _datetime(value: Any) -> dt.datetime | None:
    # SQLite hands an aggregate or db_now() back as text when it loses the column's type
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


class RouteWatch:
    """A maintenance task of workers: says in the log which jobs wait for a host no live
    worker serves (at once, then every ``repeat`` seconds while they wait, and once when
    they can run again). Every worker logs it; the metric
    ``blockvault_jobs_unroutable`` shows the same from any process."""

    def __init__(self, db: Database, down_time: float, repeat: float = 300.0) -> None:
        self.db, self.down_time, self.repeat = db, float(down_time), repeat
        #: route -> when (monotonic) it was last logged as waiting
        self._said: dict[str, float] = {}

    def __call__(self) -> list[Waiting]:
        with self.db.reader() as s:
            waiting = unroutable_jobs(s, self.down_time)
        now = time.monotonic()
        for w in waiting:
            said = self._said.get(w.route)
            if said is None or now - said >= self.repeat:
                self._said[w.route] = now
                log.warning("%d job(s) on volumes of %s wait (the oldest for %.0fs): no live "
                            "backup worker reaches %s", w.jobs, w.route, w.oldest_seconds,
                            w.route)
        for route in set(self._said) - {w.route for w in waiting}:
            del self._said[route]
            log.info("jobs on volumes of %s are no longer waiting for a worker", route)
        return waiting
