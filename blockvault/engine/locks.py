"""Lock objects that keep garbage collection from deleting packs a running backup uses.

Both sides write their lock first and then list ``locks/``, so of a backup and a GC that
overlap at least one sees the other: the GC then skips deletion, the backup waits for the
GC to finish. Locks carry a timestamp; running backups refresh theirs, and a lock older
than ``STALE_AFTER`` is ignored (its owner crashed).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from blockvault.engine.errors import Cancelled, EngineError
from blockvault.store import Container, ObjectNotFound

STALE_AFTER = 3600.0  # seconds after which a lock is considered abandoned
REFRESH_EVERY = 300.0  # how often a running backup/GC re-writes its lock
GC_WAIT_POLL = 0.5
GC_WAIT_MAX = 3600.0  # a backup gives up waiting for a GC after this long

BACKUP_PREFIX = "locks/backup-"
GC_PREFIX = "locks/gc-"


def _body(kind: str, ident: str) -> bytes:
    return json.dumps({"kind": kind, "id": ident, "time": time.time(),
                       "host": socket.gethostname(), "pid": os.getpid()}).encode()


class Lock:
    def __init__(self, c: Container, name: str, kind: str, ident: str) -> None:
        self.c, self.name, self.kind, self.ident = c, name, kind, ident
        self._written = 0.0
        self._mu = threading.Lock()
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._mu:
            if force or now - self._written >= REFRESH_EVERY:
                self.c.put(self.name, _body(self.kind, self.ident))
                self._written = now

    def release(self) -> None:
        self.c.delete(self.name)


def _fresh_locks(c: Container, prefix: str, exclude: str = "") -> list[str]:
    out = []
    now = time.time()
    for name in c.list(prefix):
        if name == exclude:
            continue
        try:
            doc = json.loads(c.get(name))
            t = float(doc["time"])
        except ObjectNotFound:
            continue  # released meanwhile
        except (ValueError, KeyError, TypeError):
            t = now  # unreadable: treat as fresh, the safe side
        if now - t < STALE_AFTER:
            out.append(name)
    return out


def acquire_backup_lock(c: Container, backup_id: str,
                        cancelled: Callable[[], bool] | None = None) -> Lock:
    """Write our backup lock, then wait while a GC is running."""
    lock = Lock(c, BACKUP_PREFIX + backup_id, "backup", backup_id)
    try:
        deadline = time.monotonic() + GC_WAIT_MAX
        while _fresh_locks(c, GC_PREFIX):
            if cancelled is not None and cancelled():
                raise Cancelled("backup cancelled while waiting for garbage collection")
            if time.monotonic() > deadline:
                raise EngineError(
                    f"garbage collection in container {c.name} did not finish in time")
            time.sleep(GC_WAIT_POLL)
    except BaseException:
        lock.release()
        raise
    return lock


def acquire_gc_lock(c: Container) -> Lock | None:
    """Write a GC lock; return None (lock removed) if any backup is running."""
    lock = Lock(c, f"{GC_PREFIX}{uuid.uuid4().hex}", "gc", "")
    try:
        if _fresh_locks(c, BACKUP_PREFIX):
            lock.release()
            return None
    except BaseException:
        lock.release()
        raise
    return lock
