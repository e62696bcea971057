"""The all-in-one's worker process: ``blockvault serve`` serves HTTP in its own interpreter
and runs its jobs (backups, restores, deletes, verifications, the scheduler, maintenance) in
a child ``blockvault worker``, so a backup's Python time never holds the GIL the API needs.

Parent and child share a ``SOCK_SEQPACKET`` socket pair, the *link* (one message per send,
so a wake never tears a health request, whichever threads send them):

- ``wake``: a job was queued; the child's runner looks at the queue at once instead of at
  its next poll (without it, every backup would wait up to ``poll_seconds`` to start);
- ``health N``: ``GET /healthcheck``; the child answers ``{"seq": N, "ok": ..., "body": ...}``,
  its runner's own health (worker threads alive, the database taking writes).

The child dies with the parent (``PR_SET_PDEATHSIG``): a SIGKILLed ``serve`` is one crash,
as it was when jobs ran in its interpreter, and the next ``serve`` on the data dir takes its
jobs back at once (same runner identity). If the link closes some other way the child stops
gracefully. A child that exits on its own is started again after ``restart_delay``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("blockvault.worker_process")

PR_SET_PDEATHSIG = 1
#: seconds /healthcheck waits for the child's answer (its probe writes to the database)
HEALTH_TIMEOUT = 15.0
GONE = "the worker process is not running (restarting)"
#: seconds a stopping child may take beyond shutdown_timeout before it is killed
STOP_GRACE = 15.0


class WorkerProcess:
    """The parent's side: starts the child, keeps it running, wakes it, asks its health,
    stops it."""

    def __init__(self, args: list[str], workers: int, *, restart_delay: float = 1.0) -> None:
        #: ``blockvault worker`` options (config, data dir, log level) the child runs with
        self.args = list(args)
        #: job threads the child runs (for /healthcheck while it is down)
        self.workers = workers
        self.restart_delay = restart_delay
        self._proc: subprocess.Popen | None = None
        self._link: socket.socket | None = None
        self._spawn_lock = threading.Lock()
        self._ask_lock = threading.Lock()
        self._seq = 0
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        # Children are started by one long-lived thread: PR_SET_PDEATHSIG fires when the
        # *thread* that forked the child ends, not only the process.
        started = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, args=(started,),
                                            name="bv-worker-process", daemon=True)
        self._supervisor.start()
        started.wait(30)

    def _spawn(self) -> subprocess.Popen | None:
        with self._spawn_lock:
            if self._stopping.is_set():
                return None
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "blockvault.cli", "worker", *self.args,
                     "--link-fd", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            old, self._link, self._proc = self._link, ours, proc
            if old is not None:
                old.close()
            log.info("worker process %d started", proc.pid)
            return proc

    def _supervise(self, started: threading.Event) -> None:
        while not self._stopping.is_set():
            try:
                proc = self._spawn()
            except OSError:
                log.exception("could not start the worker process")
                proc = None
            started.set()
            if proc is None:
                if self._stopping.wait(self.restart_delay):
                    return
                continue
            code = proc.wait()
            if self._stopping.is_set():
                return
            log.error("worker process %d exited (%s); starting another in %.0f s",
                      proc.pid, _exit_status(code), self.restart_delay)
            self._stopping.wait(self.restart_delay)

    def wake(self) -> None:
        """Never blocks the request that queued a job: a wake the link has no room for is
        dropped, and the child finds the job at its next poll."""
        link = self._link
        if link is None:
            return
        with contextlib.suppress(OSError):
            link.send(b"wake", socket.MSG_DONTWAIT)

    def health(self) -> tuple[bool, dict[str, Any]]:
        with self._ask_lock:
            proc, link = self._proc, self._link
            if proc is None or link is None or proc.poll() is not None:
                return self._unhealthy(GONE)
            self._seq += 1
            seq = self._seq
            try:
                link.send(f"health {seq}".encode(), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return self._unhealthy("the worker process does not read its link")
            except OSError:  # it died, not reaped yet
                return self._unhealthy(GONE)
            deadline = time.monotonic() + HEALTH_TIMEOUT
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([link], [], [], left)[0]:
                    break
                try:
                    data = link.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    return self._unhealthy(GONE)
                answer = json.loads(data)
                if answer.get("seq") == seq:  # an older, timed-out question's answer: skip
                    return bool(answer["ok"]), answer["body"]
            return self._unhealthy(
                f"the worker process did not answer within {HEALTH_TIMEOUT:.0f} s")

    def _unhealthy(self, problem: str) -> tuple[bool, dict[str, Any]]:
        log.error("health check failed: %s", problem)
        return False, {"status": "unhealthy", "workers_alive": 0, "workers": self.workers,
                       "problems": [problem]}

    def stop(self, timeout: float) -> None:
        """SIGTERM: the child drains (running jobs get ``timeout`` seconds, then go back
        to the queue); killed if it takes ``STOP_GRACE`` seconds longer."""
        with self._spawn_lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout + STOP_GRACE)
            except subprocess.TimeoutExpired:
                log.error("worker process %d did not stop in time: killed", proc.pid)
                proc.kill()
                proc.wait()
        if self._supervisor is not None:
            self._supervisor.join(5)
        if self._link is not None:
            self._link.close()


def _exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


# -- the child's side ---------------------------------------------------------------------


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that started it ends (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ParentLink:
    """The child's side of the link: wakes its runner, answers health questions, and calls
    ``closed`` when the parent is gone."""

    def __init__(self, fd: int, wake: Callable[[], None],
                 health: Callable[[], tuple[bool, dict[str, Any]]],
                 closed: Callable[[], None]) -> None:
        self._sock = socket.socket(fileno=fd)
        self._wake = wake
        self._health = health
        self._closed = closed
        self._send_lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._listen, name="bv-parent-link", daemon=True).start()

    def _listen(self) -> None:
        while True:
            try:
                data = self._sock.recv(256)
            except OSError:
                data = b""
            if not data:
                log.warning("the serve process is gone: stopping")
                self._closed()
                return
            if data == b"wake":
                self._wake()
            elif data.startswith(b"health "):
                # answered on a thread of its own: a slow database must not delay wakes
                threading.Thread(target=self._answer, args=(int(data.split()[1]),),
                                 name="bv-health", daemon=True).start()

    def _answer(self, seq: int) -> None:
        ok, body = self._health()
        with self._send_lock, contextlib.suppress(OSError):
            self._sock.send(json.dumps({"seq": seq, "ok": ok, "body": body}).encode())
