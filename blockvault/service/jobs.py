"""The job runner: workers claim queued jobs with a lease and keep it alive with a
heartbeat. A job whose lease runs out (its worker crashed or its process was killed) is
taken over by any runner sharing the DB: re-run when it has attempts left (every job is
idempotent), failed cleanly otherwise. Nothing stays ``creating`` forever.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import uuid
from collections.abc import Callable

from sqlalchemy import select, update

from blockvault.db.models import Job, utcnow
from blockvault.db.session import Database

log = logging.getLogger("blockvault.jobs")

MAX_ATTEMPTS = 3

Handler = Callable[[Job], None]
FailHandler = Callable[[Job, str], None]


class JobRunner:
    def __init__(
        self,
        db: Database,
        handlers: dict[str, Handler],
        fail: FailHandler,
        *,
        workers: int = 2,
        lease_seconds: int = 60,
        poll_seconds: float = 1.0,
    ) -> None:
        self.db = db
        self.handlers = handlers
        self.fail = fail
        self.workers = max(1, workers)
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.poll_seconds = poll_seconds
        self.owner = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: set[str] = set()
        self._running_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"bv-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._heartbeat, name="bv-heartbeat", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.wake()
        for t in self._threads:
            t.join(timeout)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # -- recovery -------------------------------------------------------------------------

    def recover(self) -> None:
        """Re-queue or fail jobs whose lease has expired."""
        now = utcnow()
        with self.db.session() as s:
            expired = list(
                s.scalars(select(Job).where(Job.state == "running", Job.lease_expires < now))
            )
            for job in expired:
                if job.attempts >= MAX_ATTEMPTS:
                    reason = (
                        f"{job.kind} did not finish after {job.attempts} attempts; its worker "
                        "stopped each time"
                    )
                    job.state, job.error, job.finished_at = "failed", reason, now
                    log.warning("job %s (%s of backup %s) failed: %s", job.id, job.kind,
                                job.backup_id, reason)
                    self.fail(job, reason)
                else:
                    log.warning("job %s (%s of backup %s) lost its worker; re-queued",
                                job.id, job.kind, job.backup_id)
                    job.state, job.owner, job.lease_expires = "queued", None, None

    # -- work -------------------------------------------------------------------------------

    def _claim(self) -> Job | None:
        with self.db.session() as s:
            busy = select(Job.backup_id).where(Job.state == "running")
            candidates = s.scalars(
                select(Job)
                .where(Job.state == "queued", Job.backup_id.not_in(busy))
                .order_by(Job.created_at)
                .limit(5)
            ).all()
            for job in candidates:
                now = utcnow()
                res = s.execute(
                    update(Job)
                    .where(Job.id == job.id, Job.state == "queued")
                    .values(
                        state="running", owner=self.owner, lease_expires=now + self.lease,
                        attempts=Job.attempts + 1, started_at=now,
                    )
                )
                if res.rowcount == 1:
                    s.flush()
                    s.refresh(job)
                    return job
        return None

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._claim()
            except Exception:  # DB hiccup: log, back off, try again
                log.exception("claiming a job failed")
                job = None
            if job is None:
                with self._wake:
                    self._wake.wait(self.poll_seconds)
                self.recover_quietly()
                continue
            self._run(job)

    def recover_quietly(self) -> None:
        try:
            self.recover()
        except Exception:
            log.exception("job recovery failed")

    def _run(self, job: Job) -> None:
        with self._running_lock:
            self._running.add(job.id)
        log.info("job %s: %s of backup %s started (attempt %d)", job.id, job.kind,
                 job.backup_id, job.attempts)
        state, error = "done", None
        try:
            self.handlers[job.kind](job)
        except Exception as exc:  # the handler records domain failures itself
            log.exception("job %s crashed", job.id)
            state, error = "failed", f"{type(exc).__name__}: {exc}"
            try:
                self.fail(job, error)
            except Exception:
                log.exception("recording the failure of job %s failed", job.id)
        finally:
            with self._running_lock:
                self._running.discard(job.id)
        with self.db.session() as s:
            s.execute(
                update(Job)
                .where(Job.id == job.id, Job.owner == self.owner)
                .values(state=state, error=error, finished_at=utcnow(), lease_expires=None)
            )
        log.info("job %s: %s of backup %s %s", job.id, job.kind, job.backup_id, state)

    def _heartbeat(self) -> None:
        interval = max(0.5, self.lease.total_seconds() / 3)
        while not self._stop.wait(interval):
            with self._running_lock:
                ids = list(self._running)
            if not ids:
                continue
            try:
                with self.db.session() as s:
                    s.execute(
                        update(Job)
                        .where(Job.id.in_(ids), Job.owner == self.owner, Job.state == "running")
                        .values(lease_expires=utcnow() + self.lease)
                    )
            except Exception:
                log.exception("heartbeat failed")
