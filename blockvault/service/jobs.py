"""The job runner: workers claim queued jobs with a lease and keep it alive with a
heartbeat. A job whose lease runs out (its worker crashed, its process was killed or
paused) is taken over by any runner sharing the DB: re-run when it has attempts left (every
job is idempotent), failed cleanly otherwise. Nothing stays ``creating`` forever.

Fencing: every claim gives the attempt a fresh token, and every write that finishes an
attempt is conditional on the job row still being ``running`` with that token, in the same
transaction as the backup and volume status it writes (:func:`finish_job`). A stale attempt
(its lease ran out and another attempt took over) therefore changes nothing, however late
it wakes up. Leases are set and compared with the database's clock, never a worker's.

Routing: a job on a volume (a backup reads it, a restore writes it) carries the volume's
``HOST@BACKEND`` (``Job.route``); a runner claims it only if it announces that name (the
backends configured where it runs, ``routes``). A block device or an NBD socket is
reachable from one host only; a backend that several hosts reach alike (a shared file
system) is given one ``backend_host`` on all of them, and its jobs go to any of their
runners. Jobs on no volume (delete, verify, import) go to any runner. A job no live runner
announces waits, queued (see blockvault.service.heartbeats.unroutable_jobs).

Identity: a runner's owner name is stable across restarts of a process on the same data
directory (host name + a slot id kept in ``data_dir/runner``, held with an exclusive file
lock so two live processes never share it). At start a runner takes back at once the jobs
its previous incarnation left ``running``, instead of waiting for their leases.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import and_, case, delete, exists, func, or_, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, aliased

from blockvault.db.models import Backup, Job, Runner, db_now, new_id, utcnow
from blockvault.db.session import Database

log = logging.getLogger("blockvault.jobs")

MAX_ATTEMPTS = 3

Handler = Callable[[Job], None]
#: records a failed job's domain outcome (backup/volume status) inside the caller's
#: transaction, after the caller won the conditional update of the job row
FailHandler = Callable[[Session, Job, str], None]
#: called (outside any transaction) once a job reached a final state
EndHandler = Callable[[Job], None]

T = TypeVar("T")

_BACKOFF_FIRST, _BACKOFF_MAX = 0.2, 5.0
#: finished jobs are kept this long by default (seconds): 3 days
DEFAULT_RETENTION = 3 * 86400.0
_PRUNE_BATCH = 500
_ACTIVE = ("queued", "running")


def internal_error(exc: BaseException) -> str:
    """What a job's record says about a handler that crashed, by default: the exception's
    text may name server paths or endpoints, so it goes to the log only."""
    return f"internal error ({type(exc).__name__}); the service log has the details"


# -- queueing -----------------------------------------------------------------------------------


def enqueue_once(s: Session, kind: str, backup_id: str, key: str, *,
                 project_id: str | None = None, **params: Any) -> Job:
    """Queue a ``kind`` job keyed ``key``, or return the one of that kind and key that is
    already queued or running.

    Race-free: the partial unique index ``ux_jobs_active_once`` admits one active job per
    (kind, key), and the insert yields to it (``ON CONFLICT DO NOTHING``; on PostgreSQL it
    waits for a concurrent insert of the same key to commit or roll back first). A job
    that ended between the insert and the look-up frees its key: try again.
    """
    insert = postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert
    for _ in range(5):
        job_id = new_id()
        values: dict[str, Any] = dict(
            id=job_id, kind=kind, backup_id=backup_id, once_key=key, params=params,
            state="queued", attempts=0, bytes_done=0, bytes_total=0, created_at=utcnow(),
            project_id=project_id if project_id is not None else func.coalesce(
                select(Backup.project_id).where(Backup.id == backup_id).scalar_subquery(), ""),
        )
        s.connection().execute(insert(Job).values(**values).on_conflict_do_nothing())
        job = s.scalars(select(Job).where(
            Job.kind == kind, Job.once_key == key, Job.state.in_(_ACTIVE))).first()
        if job is not None:
            return job
    raise RuntimeError(f"could not queue or find an active {kind} job keyed {key}")


# -- fencing primitives (used by the runner and the handlers) --------------------------------


def finish_job(s: Session, job: Job, state: str, error: str | None = None,
               **values: Any) -> bool:
    """End ``job``'s current attempt as ``state`` if it still is the current attempt
    (``values``: further columns of the job row to write with it, e.g. its last progress).

    Call it first in the transaction that writes the attempt's outcome, and write nothing
    else when it returns False: another attempt owns the job now (on PostgreSQL the row
    lock it takes also serialises the outcome against a concurrent take-over).
    """
    res = s.execute(
        update(Job)
        .where(Job.id == job.id, Job.token == job.token, Job.state == "running")
        .values(state=state, error=error, finished_at=db_now(), lease_expires=None, **values)
    )
    return res.rowcount == 1


def attempt_is_current(s: Session, job: Job) -> bool:
    return s.scalar(
        select(Job.id).where(Job.id == job.id, Job.token == job.token, Job.state == "running")
    ) is not None


def storage_id(job: Job) -> str:
    """The name under which this attempt writes a backup's objects in the store: two
    attempts of one backup never share (or delete) each other's manifest."""
    assert job.token, "only a claimed job has a storage id"
    return f"{job.backup_id}.{job.token[:12]}"


def attempt_storage_ids(backup_id: str, tokens: str | None) -> list[str]:
    """The storage ids of every attempt a job has had (from its token log)."""
    return [f"{backup_id}.{t[:12]}" for t in (tokens or "").split() if t]


class Stopping(Exception):
    """The runner is stopping while a write still failed; the job row stays ``running``
    with this runner's identity and is taken back at the next start."""


def db_unavailable(exc: BaseException) -> bool:
    """A failure of the DB (full, read-only, unreachable, failing over), which a retry
    may cure, as opposed to a bug or a constraint, which it never will."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class DurableWriter:
    """Runs a transaction until it commits: retried with backoff while the DB refuses
    writes (a full disk, a read-only file, a failover), so a job's outcome is recorded once
    the DB is writable again instead of being lost with the thread that carried it."""

    def __init__(self, db: Database, stopping: threading.Event) -> None:
        self.db = db
        self.stopping = stopping
        self._mu = threading.Lock()
        self.failing_since: float | None = None
        self.last_error: str | None = None

    def __call__(self, fn: Callable[[Session], T], what: str) -> T:
        delay = _BACKOFF_FIRST
        failures = 0
        while True:
            try:
                with self.db.session() as s:
                    result = fn(s)
            except Exception as exc:
                if not db_unavailable(exc):
                    raise
                failures += 1
                with self._mu:
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                    self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                if failures == 1 or failures % 20 == 0:
                    log.error("writing %s failed (attempt %d, retrying in %.1fs): %s",
                              what, failures, delay, self.last_error)
                if self.stopping.wait(delay):
                    raise Stopping(what) from exc
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            if failures:
                log.warning("writing %s succeeded after %d failed attempts", what, failures)
                self.ok()
            return result

    def ok(self) -> None:
        with self._mu:
            self.failing_since, self.last_error = None, None

    def failure(self) -> str | None:
        with self._mu:
            if self.failing_since is None:
                return None
            return (f"database writes failing for {time.monotonic() - self.failing_since:.0f}s:"
                    f" {self.last_error}")


# -- identity -----------------------------------------------------------------------------------


def stable_identity(data_dir: Path | None, host: str | None = None) -> tuple[str, int | None]:
    """(owner name, fd of the held slot lock). The same data dir gives the same name after a
    restart; two live processes on one data dir get different slots. ``host``: the runner's
    host_name (default the machine's hostname), so a restart that finds a new hostname but
    the same host_name (kept in data_dir when unset) still takes back its own jobs."""
    host = host or socket.gethostname()
    if data_dir is None:
        return f"{host}:{uuid.uuid4().hex[:12]}", None
    slots = Path(data_dir) / "runner"
    slots.mkdir(parents=True, exist_ok=True)
    for n in range(256):
        fd = os.open(slots / f"slot-{n}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        ident = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if not ident.isalnum():
            ident = uuid.uuid4().hex[:12]
            os.ftruncate(fd, 0)
            os.pwrite(fd, ident.encode(), 0)
            os.fsync(fd)
        return f"{host}:{ident}", fd
    return f"{host}:{uuid.uuid4().hex[:12]}", None


# -- the runner -------------------------------------------------------------------------------


class JobRunner:
    def __init__(
        self,
        db: Database,
        handlers: dict[str, Handler],
        fail: FailHandler,
        *,
        workers: int = 2,
        lease_seconds: float = 60,
        poll_seconds: float = 1.0,
        data_dir: Path | None = None,
        on_end: EndHandler | None = None,
        maintenance: list[Callable[[], None]] | None = None,
        maintenance_interval: float = 60.0,
        retention: float = DEFAULT_RETENTION,
        name: str = "bv",
        host: str | None = None,
        routes: list[str] | None = None,
    ) -> None:
        self.db = db
        self.handlers = handlers
        self.fail = fail
        self.on_end = on_end
        self.maintenance = list(maintenance or [])
        self.maintenance_interval = max(0.05, maintenance_interval)
        self.workers = max(1, workers)
        self.lease = float(lease_seconds)
        self.poll_seconds = poll_seconds
        self.name = name
        #: the host its heartbeat row names (Cinder's ``host``; os-services lists it)
        self.host = host or socket.gethostname()
        #: the HOST@BACKEND names of the volumes this runner reaches; None: every volume
        #: (a runner built without backends, as tests of the runner alone do)
        self.routes = None if routes is None else list(routes)
        self.data_dir = data_dir
        #: seconds a finished job is kept (see prune); <= 0 keeps every job
        self.retention = float(retention)
        #: what a crashed handler's job records as its error (and its backup's fail_reason)
        self.describe: Callable[[BaseException], str] = internal_error
        # The stable identity is taken (and its slot locked) at start.
        self.owner, self._identity_fd = f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}", None
        self._wake = threading.Condition()
        #: wake() calls so far (under _wake): a worker that saw a new one since it last
        #: looked at the queue looks again instead of sleeping through it
        self._wakes = 0
        #: time.monotonic() of the last lease recovery (see _recover_due)
        self._recovered_at = 0.0
        self.stopping = threading.Event()
        #: set by drain(): workers claim nothing more (running jobs go on)
        self.draining = threading.Event()
        self.write = DurableWriter(db, self.stopping)
        self._workers: list[threading.Thread | None] = [None] * self.workers
        self._threads: list[threading.Thread] = []
        #: job id -> (token, lost): the attempts this process runs
        self._running: dict[str, tuple[str, threading.Event]] = {}
        self._running_lock = threading.Lock()
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self.data_dir is not None:
            self.owner, self._identity_fd = stable_identity(self.data_dir, self.host)
        self._register()
        self.recover_own()
        self.recover_quietly()
        for i in range(self.workers):
            self._start_worker(i)
        for target, label in ((self._heartbeat, "heartbeat"), (self._maintain, "maintenance")):
            t = threading.Thread(target=target, name=f"{self.name}-{label}", daemon=True)
            t.start()
            self._threads.append(t)
        self._started = True

    def _start_worker(self, i: int) -> None:
        t = threading.Thread(target=self._work, name=f"{self.name}-worker-{i}", daemon=True)
        t.start()
        self._workers[i] = t

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.wake(everyone=True)
        deadline = time.monotonic() + timeout
        for t in [*self._workers, *self._threads]:
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))
        if self._identity_fd is not None:
            os.close(self._identity_fd)
            self._identity_fd = None

    def drain(self, timeout: float, grace: float = 10.0) -> list[str]:
        """Graceful stop (SIGTERM): claim nothing more, let running jobs finish for up to
        ``timeout`` seconds, then hand back what still runs (:meth:`hand_back`) and stop,
        giving the handed-back attempts ``grace`` seconds to notice and clean up after
        themselves. Returns the ids of the jobs handed back."""
        self.draining.set()
        self.wake(everyone=True)
        deadline = time.monotonic() + max(0.0, timeout)
        while self.running_jobs() and time.monotonic() < deadline:
            time.sleep(0.05)
        handed = self.hand_back()
        self.stop(timeout=grace)
        # a claim that was already under way when draining began
        return handed + self.hand_back()

    def running_jobs(self) -> dict[str, str]:
        """job id -> token of the attempts this process runs now."""
        with self._running_lock:
            return {job_id: token for job_id, (token, _) in self._running.items()}

    def hand_back(self) -> list[str]:
        """Re-queue the jobs this process still runs, so that another runner takes them
        over at once instead of after their lease. Each is a conditional update on the
        attempt's fencing token: a job that finished or was taken over meanwhile is left
        alone. Attempts are not failed for it (an operator stopped them; the next claim
        counts a new attempt), then told their attempt is lost, so they stop at their
        next check and write nothing (their outcome is fenced anyway)."""
        running = self.running_jobs()
        handed: list[str] = []
        if running:
            try:
                with self.db.session() as s:
                    for job_id, token in running.items():
                        res = s.execute(
                            update(Job).where(Job.id == job_id, Job.token == token,
                                              Job.state == "running")
                            .values(state="queued", owner=None, token=None,
                                    lease_expires=None))
                        if res.rowcount == 1:
                            handed.append(job_id)
            except Exception:  # the leases then run out and recovery takes them over
                log.exception("handing back running jobs failed")
        with self._running_lock:
            for _, lost in self._running.values():
                lost.set()
        for job_id in handed:
            log.warning("job %s handed back to the queue: this runner is stopping", job_id)
        return handed

    def wake(self, everyone: bool = False) -> None:
        """A job was queued (or re-queued): one idle worker looks at the queue now instead
        of at its next poll. One, not all: a job is claimed by one worker, and every
        other one woken would only race it for the same row (on SQLite, for the write
        lock) while the claim is on the request's critical path. ``everyone``: stopping."""
        with self._wake:
            self._wakes += 1
            if everyone:
                self._wake.notify_all()
            else:
                self._wake.notify()

    def _register(self) -> None:
        def register(s: Session) -> None:
            row = s.get(Runner, self.owner)
            if row is None:
                s.add(Runner(owner=self.owner, host=self.host, pid=os.getpid(),
                             started_at=db_now(), seen_at=db_now()))
            else:
                row.pid, row.started_at, row.seen_at = os.getpid(), db_now(), db_now()
        try:
            with self.db.session() as s:
                register(s)
        except Exception:
            log.exception("registering runner %s failed", self.owner)

    # -- health -------------------------------------------------------------------------------

    def alive_workers(self) -> int:
        return sum(1 for t in self._workers if t is not None and t.is_alive())

    def probe_db(self) -> str | None:
        """Write this runner's row: None when the DB took the write, else the problem."""
        try:
            with self.db.session() as s:
                res = s.execute(update(Runner).where(Runner.owner == self.owner)
                                .values(seen_at=db_now()))
                if res.rowcount == 0:
                    s.add(Runner(owner=self.owner, host=self.host, pid=os.getpid(),
                                 started_at=db_now(), seen_at=db_now()))
        except Exception as exc:
            return f"the database is not writable: {type(exc).__name__}: {exc}"[:300]
        return None

    def health(self) -> list[str]:
        """What stops jobs from running, in words; empty when nothing does."""
        problems = []
        if self._started and self.alive_workers() == 0:
            problems.append("no worker thread is alive")
        failing = self.write.failure()
        if failing:
            problems.append(failing)
        probe = self.probe_db()
        if probe:
            problems.append(probe)
        return problems

    # -- recovery -------------------------------------------------------------------------

    def _give_back(self, s: Session, job: Job, extra: Any, reason_when_out: str) -> bool:
        """Re-queue (or fail, when out of attempts) a running job whose attempt is dead,
        if it still is that attempt (``extra``: further conditions). True if it was
        failed."""
        if job.attempts >= MAX_ATTEMPTS:
            res = s.execute(
                update(Job).where(Job.id == job.id, Job.token == job.token,
                                  Job.state == "running", *extra)
                .values(state="failed", error=reason_when_out, finished_at=db_now(),
                        lease_expires=None)
            )
            if res.rowcount == 1:
                log.warning("job %s (%s of backup %s) failed: %s", job.id, job.kind,
                            job.backup_id, reason_when_out)
                self.fail(s, job, reason_when_out)
                return True
            return False
        res = s.execute(
            update(Job).where(Job.id == job.id, Job.token == job.token,
                              Job.state == "running", *extra)
            .values(state="queued", owner=None, token=None, lease_expires=None)
        )
        if res.rowcount == 1:
            log.warning("job %s (%s of backup %s) lost its worker; re-queued", job.id,
                        job.kind, job.backup_id)
        return False

    def _recover(self, where: list[Any], extra: list[Any]) -> None:
        failed: list[Job] = []
        with self.db.session() as s:
            found = list(s.scalars(select(Job).where(Job.state == "running", *where)))
            for job in found:
                reason = (f"{job.kind} did not finish after {job.attempts} attempts; its "
                          "worker stopped each time")
                if self._give_back(s, job, extra, reason):
                    failed.append(job)
        for job in failed:
            self._ended(job)
        # Only when jobs went back to the queue: a wake for nothing would set the other
        # idle workers recovering and claiming in turn, each waking the next.
        for _ in found:
            self.wake()

    def recover(self) -> None:
        """Re-queue or fail jobs whose lease ran out (by the DB's clock)."""
        self._recover([Job.lease_expires < db_now()], [Job.lease_expires < db_now()])

    def recover_own(self) -> None:
        """Take back at once what this runner's previous incarnation left running (nobody
        else can be running it: the identity's file lock proves the old process is gone)."""
        try:
            self._recover([Job.owner == self.owner], [Job.owner == self.owner])
        except Exception:
            log.exception("taking back this runner's unfinished jobs failed")

    def recover_quietly(self) -> None:
        try:
            self.recover()
        except Exception:
            log.exception("job recovery failed")

    # -- work -------------------------------------------------------------------------------

    def _claim(self) -> Job | None:
        """Claim a queued job, taking turns across projects (see :func:`projects_in_turn`):
        one project's hundred queued jobs make another's wait for at most one job per
        worker. The claim itself stays one conditional UPDATE, so two workers never both
        win a job; a worker that loses one tries the next."""
        with self.db.session() as s:
            busy = select(Job.backup_id).where(Job.state == "running")
            # a volume's job only where its disk is (jobs on no volume: anywhere)
            routed = self._routed()
            for project in projects_in_turn(s):
                candidates = s.scalars(
                    select(Job)
                    .where(Job.state == "queued", Job.project_id == project,
                           Job.backup_id.not_in(busy), routed)
                    .order_by(Job.created_at)
                    .limit(5)
                ).all()
                for job in candidates:
                    if self._take(s, job):
                        return job
        return None

    def _routed(self) -> Any:
        """The jobs this runner may claim: on no volume, or on a volume it reaches."""
        if self.routes is None:
            return true()
        if not self.routes:
            return Job.route.is_(None)
        return or_(Job.route.is_(None), Job.route.in_(self.routes))

    def _take(self, s: Session, job: Job) -> bool:
        token = uuid.uuid4().hex
        res = s.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == "queued")
            .values(
                state="running", owner=self.owner, token=token,
                tokens=func.coalesce(Job.tokens, "") + token + " ",
                lease_expires=db_now(self.lease), attempts=Job.attempts + 1,
                started_at=db_now(),
            )
        )
        if res.rowcount != 1:
            return False
        s.flush()
        s.refresh(job)
        return True

    def _recover_due(self) -> None:
        """Lease recovery at most once per poll interval per process, not after every
        wake-up: a wake means a job was queued, and the claim it calls for should not wait
        behind a scan (and a write transaction) that found nothing the last time."""
        now = time.monotonic()
        if now - self._recovered_at >= self.poll_seconds:
            self._recovered_at = now
            self.recover()

    def _work(self) -> None:
        delay = _BACKOFF_FIRST
        while not self.stopping.is_set() and not self.draining.is_set():
            try:
                with self._wake:
                    seen = self._wakes
                job = self._claim()
                if job is None:
                    with self._wake:
                        if self._wakes == seen:  # no job queued since the claim began
                            self._wake.wait(self.poll_seconds)
                    self._recover_due()
                else:
                    self._run(job)
                delay = _BACKOFF_FIRST
            except Stopping:
                return
            except Exception:  # a worker outlives any failure: log, back off, go on
                log.exception("worker loop failed; retrying in %.1fs", delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    def _run(self, job: Job) -> None:
        lost = threading.Event()
        with self._running_lock:
            self._running[job.id] = (job.token or "", lost)
        log.info("job %s: %s of backup %s started (attempt %d)", job.id, job.kind,
                 job.backup_id, job.attempts)
        try:
            error = None
            try:
                self.handlers[job.kind](job)
            except Stopping:
                raise
            except Exception as exc:  # the handler records domain failures itself
                log.exception("job %s crashed", job.id)
                error = self.describe(exc)[:255]

            def finish(s: Session) -> bool:
                if error is None:
                    return finish_job(s, job, "done")
                if finish_job(s, job, "failed", error):
                    self.fail(s, job, error)
                    return True
                return False

            self.write(finish, f"the outcome of job {job.id}")
        finally:
            with self._running_lock:
                self._running.pop(job.id, None)
        self._ended(job)

    def _ended(self, job: Job) -> None:
        try:
            with self.db.reader() as s:  # a read: no write lock for it
                row = s.get(Job, job.id)
                state = row.state if row is not None else "gone"
                current = row is not None and row.token == job.token
        except Exception:
            log.exception("reading the outcome of job %s failed", job.id)
            return
        if state in ("done", "failed"):
            log.info("job %s: %s of backup %s %s", job.id, job.kind, job.backup_id, state)
            if self.on_end is not None:
                try:
                    self.on_end(row)
                except Exception:
                    log.exception("cleaning up after job %s failed", job.id)
        elif not current:
            log.warning("job %s: attempt %s of %s of backup %s was superseded; its outcome "
                        "was not recorded", job.id, (job.token or "")[:12], job.kind,
                        job.backup_id)

    def _heartbeat(self) -> None:
        interval = max(0.2, self.lease / 3)
        while not self.stopping.wait(interval):
            try:
                self.extend_leases()
            except Exception:
                log.exception("heartbeat failed")

    def extend_leases(self) -> None:
        """Extend the lease of every attempt this process runs; mark those that lost it."""
        with self._running_lock:
            running = dict(self._running)
        if not running:
            return
        with self.db.session() as s:
            for job_id, (token, lost) in running.items():
                res = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.token == token, Job.state == "running")
                    .values(lease_expires=db_now(self.lease))
                )
                if res.rowcount == 0 and not lost.is_set():
                    ended = s.scalar(select(Job.state).where(Job.id == job_id,
                                                             Job.token == token))
                    if ended not in (None, "running", "queued"):
                        continue  # this attempt finished since the copy: nothing lost
                    lost.set()
                    log.warning("job %s: this attempt lost its lease", job_id)

    def attempt_lost(self, job: Job) -> bool:
        with self._running_lock:
            entry = self._running.get(job.id)
        return entry is not None and entry[0] == job.token and entry[1].is_set()

    # -- maintenance ----------------------------------------------------------------------

    def _maintain(self) -> None:
        while not self.stopping.wait(self.maintenance_interval):
            try:
                self.maintain_once()
            except Exception:
                log.exception("maintenance failed")

    def maintain_once(self) -> None:
        """Restart dead workers, then run the maintenance tasks (owed collections)."""
        for i, t in enumerate(self._workers):
            if (t is not None and not t.is_alive() and not self.stopping.is_set()
                    and not self.draining.is_set()):
                log.error("worker thread %s died; starting a new one", t.name)
                self._start_worker(i)
        if self._started and self.alive_workers() == 0:
            log.error("no job worker thread is alive: no backup, restore or delete runs")
        try:
            self.prune()
        except Exception:
            log.exception("pruning finished jobs failed")
        for task in self.maintenance:
            if self.stopping.is_set():
                return
            try:
                task()
            except Exception:
                log.exception("maintenance task failed")

    def prune(self) -> int:
        """Delete finished jobs older than the retention, in batches; returns how many."""
        if self.retention <= 0:
            return 0
        pruned = 0
        while not self.stopping.is_set():
            with self.db.session() as s:
                ids = list(s.scalars(select(Job.id).where(prunable(self.retention))
                                     .limit(_PRUNE_BATCH)))
                if ids:
                    # re-checked in the DELETE: nothing that became needed meanwhile goes
                    s.execute(delete(Job).where(Job.id.in_(ids), prunable(self.retention)))
            pruned += len(ids)
            if len(ids) < _PRUNE_BATCH:
                break
        if pruned:
            log.info("pruned %d jobs finished more than %gs ago", pruned, self.retention)
        return pruned


# -- turns and retention (queries) --------------------------------------------------------------


def projects_in_turn(s: Session) -> list[str]:
    """The projects with queued jobs, whose turn first: fewest jobs running, then served
    least recently (the latest claim of any of its jobs; never served first), then the one
    waiting longest. Successive claims thus go round the projects, whatever each queued."""
    running = func.sum(case((Job.state == "running", 1), else_=0))
    served = func.max(Job.started_at)
    waiting = func.min(case((Job.state == "queued", Job.created_at)))
    queued = select(Job.project_id).where(Job.state == "queued").distinct()
    rows = s.execute(
        select(Job.project_id)
        .where(Job.project_id.in_(queued))
        .group_by(Job.project_id)
        .order_by(running, served.asc().nulls_first(), waiting, Job.project_id)
    )
    return [p for (p,) in rows]


def prunable(retention: float) -> Any:
    """Which jobs retention removes: finished more than ``retention`` seconds ago (by the
    DB's clock), and needed by nobody. Kept whatever their age:

    - create and import jobs of a backup not deleted: their token log names every
      attempt's storage id, which deleting the backup cleans up (Tasks.delete);
    - a backup's latest create/restore/delete/import (the progress resource shows it) and
      its latest verify (the verification resource shows it).
    """
    newer = aliased(Job)
    live = select(Backup.id).where(Backup.deleted.is_(False))
    shown = Job.kind.not_in(("verify", "record"))

    def superseded(same_kind: Any) -> Any:
        return exists().where(newer.backup_id == Job.backup_id,
                              newer.created_at > Job.created_at, same_kind)

    return and_(
        Job.state.in_(("done", "failed")),
        Job.finished_at < db_now(-retention),
        ~and_(Job.kind.in_(("create", "import")), Job.backup_id.in_(live)),
        or_(
            Job.backup_id.not_in(live),
            Job.kind == "record",
            and_(Job.kind == "verify", superseded(newer.kind == "verify")),
            and_(shown, superseded(newer.kind.not_in(("verify", "record")))),
        ),
    )
