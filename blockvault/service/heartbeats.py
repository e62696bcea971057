"""Service heartbeats and Cinder's ``os-services`` listing.

Every service process keeps a row in ``runners`` (blockvault.db.models.Runner) fresh: job
runners as ``cinder-backup`` (with the HOST@BACKEND names of the volume backends they
reach, kept for routing jobs by host later), API processes as ``cinder-api``. The listing
shows one entry per (host, binary), as Cinder does: several API processes behind a load
balancer on one host are one ``cinder-api`` service, up while any of them beats. A service
is ``down`` when its newest heartbeat is older than ``service_down_time`` by the
database's clock (never a process's: hosts' clocks may disagree).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session

from blockvault.db.models import Runner, db_now
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
