"""Metrics this process counts as it works: object store requests (through the retry layer's
:class:`~blockvault.store.retry.StoreObserver` hook) and the backups, restores and verifies
its workers run. They start at zero when the process starts, like any Prometheus counter;
what every process must agree on comes from the database instead (``state``).

Label children are bound once, here, so the data path pays one locked add per event.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from blockvault.store.base import ObjectNotFound, StoreFull, StorePermanentError, StoreUnavailable
from blockvault.store.retry import StoreObserver

#: the retry layer's operation names (blockvault.store.retry)
STORE_OPERATIONS = ("put", "get", "head", "delete", "list", "open")
OUTCOMES = ("success", "failed", "cancelled")

MiB = 1024**2
#: seconds: a small volume's incremental to a large one's full backup over a slow store
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
#: bytes per second, 1 MiB/s to 4 GiB/s by fours
THROUGHPUT_BUCKETS = tuple(MiB * 4**k for k in range(7))


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, StoreUnavailable):
        return "unavailable"
    if isinstance(exc, ObjectNotFound):
        return "not_found"
    if isinstance(exc, StoreFull):
        return "full"
    if isinstance(exc, StorePermanentError):
        return "permanent"
    return "other"


def _children(metric: Any, names: Iterable[str]) -> dict[str, Any]:
    return {name: metric.labels(name) for name in names}


class StoreMetrics(StoreObserver):
    """Store requests, errors, retries and bytes, by operation (the retry layer's hook)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        requests = Counter(
            "blockvault_store_requests", "Attempts of object store requests (retries "
            "included), by operation.", ["operation"], registry=registry)
        self._errors = Counter(
            "blockvault_store_errors", "Object store request attempts that failed, by "
            "operation and kind (unavailable: transient, retried; not_found, full, "
            "permanent: answered by the store, not retried; other: anything else).",
            ["operation", "kind"], registry=registry)
        retries = Counter(
            "blockvault_store_retries", "Object store requests attempted again after a "
            "transient failure, by operation.", ["operation"], registry=registry)
        exhausted = Counter(
            "blockvault_store_retries_exhausted", "Object store requests that failed for "
            "good after their retries (the store was unreachable), by operation.",
            ["operation"], registry=registry)
        self._bytes = Counter(
            "blockvault_store_bytes", "Object data moved to (put) or from (get) the object "
            "store by successful requests, by operation.", ["operation"], registry=registry)
        self._counters = requests, retries, exhausted
        self._requests = _children(requests, STORE_OPERATIONS)
        self._retries = _children(retries, STORE_OPERATIONS)
        self._exhausted = _children(exhausted, STORE_OPERATIONS)
        self._moved = _children(self._bytes, ("put", "get"))

    def attempted(self, op: str) -> None:
        child = self._requests.get(op)
        (child or self._counters[0].labels(op)).inc()

    def failed(self, op: str, exc: BaseException, retrying: bool) -> None:
        # failures are rare: their (operation, kind) children are made when first seen
        self._errors.labels(op, error_kind(exc)).inc()
        if retrying:
            (self._retries.get(op) or self._counters[1].labels(op)).inc()

    def exhausted(self, op: str) -> None:
        (self._exhausted.get(op) or self._counters[2].labels(op)).inc()

    def moved(self, op: str, nbytes: int) -> None:
        child = self._moved.get(op)
        if child is not None:
            child.inc(nbytes)


class JobMetrics:
    """What this process's workers did: backups and restores (how many, how long, how
    fast, how many bytes) and verifies (passed or not). Called by the job handlers
    (blockvault.service.tasks) once per job attempt."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        backups = Counter(
            "blockvault_backup_attempts", "Backup attempts run by this process's workers, "
            "by outcome (success: recorded as the backup's data).", ["outcome"],
            registry=registry)
        restores = Counter(
            "blockvault_restore_attempts", "Restore attempts run by this process's "
            "workers, by outcome.", ["outcome"], registry=registry)
        self._backups = _children(backups, OUTCOMES)
        self._restores = _children(restores, OUTCOMES)
        self._backup_logical = Counter(
            "blockvault_backup_logical_bytes", "Volume bytes covered by successful "
            "backups (each backup's whole volume size, holes and unchanged blocks "
            "included).", registry=registry)
        self._backup_stored = Counter(
            "blockvault_backup_stored_bytes", "Bytes successful backups uploaded to the "
            "object store (new packs, manifest and record; deduplicated blocks are not "
            "uploaded again).", registry=registry)
        blocks = Counter(
            "blockvault_backup_blocks", "Blocks of successful backups, by what the backup "
            "did with them (new: stored; reused: already in the store; zero: holes and "
            "all-zero blocks, stored in the manifest only).", ["disposition"],
            registry=registry)
        self._blocks = _children(blocks, ("new", "reused", "zero"))
        self._restored = Counter(
            "blockvault_restore_bytes", "Bytes successful restores wrote to volumes.",
            registry=registry)
        self._backup_seconds = Histogram(
            "blockvault_backup_duration_seconds", "Wall time of successful backups.",
            buckets=DURATION_BUCKETS, registry=registry)
        self._backup_rate = Histogram(
            "blockvault_backup_throughput_bytes_per_second", "Volume bytes covered per "
            "second of wall time, of successful backups.", buckets=THROUGHPUT_BUCKETS,
            registry=registry)
        self._restore_seconds = Histogram(
            "blockvault_restore_duration_seconds", "Wall time of successful restores.",
            buckets=DURATION_BUCKETS, registry=registry)
        self._restore_rate = Histogram(
            "blockvault_restore_throughput_bytes_per_second", "Bytes written to the "
            "volume per second of wall time, of successful restores.",
            buckets=THROUGHPUT_BUCKETS, registry=registry)
        verifies = Counter(
            "blockvault_verify_runs", "Verifies run by this process's workers, by what "
            "they checked (backup, container) and result (ok: every block present and "
            "intact; failed: a block missing or corrupt, or the check could not run).",
            ["target", "result"], registry=registry)
        self._verifies = {(t, r): verifies.labels(t, r)
                          for t in ("backup", "container") for r in ("ok", "failed")}

    def backup_succeeded(self, seconds: float, logical_bytes: int, stored_bytes: int,
                         new_blocks: int, reused_blocks: int, zero_blocks: int) -> None:
        self._backups["success"].inc()
        self._backup_logical.inc(logical_bytes)
        self._backup_stored.inc(stored_bytes)
        self._blocks["new"].inc(new_blocks)
        self._blocks["reused"].inc(reused_blocks)
        self._blocks["zero"].inc(zero_blocks)
        self._backup_seconds.observe(seconds)
        if seconds > 0:
            self._backup_rate.observe(logical_bytes / seconds)

    def backup_ended(self, outcome: str) -> None:
        """A backup attempt that did not succeed: ``failed`` or ``cancelled``."""
        self._backups[outcome].inc()

    def restore_succeeded(self, seconds: float, nbytes: int) -> None:
        self._restores["success"].inc()
        self._restored.inc(nbytes)
        self._restore_seconds.observe(seconds)
        if seconds > 0:
            self._restore_rate.observe(nbytes / seconds)

    def restore_ended(self, outcome: str) -> None:
        self._restores[outcome].inc()

    def verified(self, target: str, ok: bool) -> None:
        self._verifies[target, "ok" if ok else "failed"].inc()
