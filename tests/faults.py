"""Fault-injection wrappers around real object stores, for tests.

:class:`LaggingBackend` / :class:`LaggingContainer` model Swift's eventually consistent
container listings (the store contract allows a listing to lag behind writes and deletes):

- an object written less than ``lag`` seconds ago is missing from ``list``/``list_info``
  (an overwritten one too, which is harsher than Swift, where the old entry may still show);
- an object deleted less than ``lag`` seconds ago still appears in ``list``/``list_info``
  (with the size and mtime it had), while ``get`` raises :class:`ObjectNotFound` and
  ``head``/``stat`` answer ``None``;
- ``get``/``head``/``stat`` of a known name always see the latest write (read-after-write).

Ages are measured on the wrapper's own clock (``time.monotonic`` unless a test passes a fake
one to step time without sleeping), from when a put or delete *returned*; a name is hidden
(or kept) from the moment the call starts. ``clock()`` is the inner store's, and its probe
object is not subject to the lag.

Usage::

    backend = LaggingBackend(LocalBackend(tmp_path / "store"), lag_seconds=2.0)
    engine = Engine(backend, ...)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from blockvault.store.base import Backend, Container, ObjectInfo

Clock = Callable[[], float]


class LagRecord:
    """Recent writes and deletes of one container, shared by every wrapper that opens it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.written: dict[str, float] = {}  # name -> when its last put returned
        self.deleted: dict[str, tuple[float, ObjectInfo]] = {}  # name -> (when, last info)

    def prune(self, now: float, lag: float) -> None:
        """Forget what is older than ``lag`` (caller holds ``lock``)."""
        for name in [n for n, t in self.written.items() if now - t >= lag]:
            del self.written[name]
        for name in [n for n, (t, _) in self.deleted.items() if now - t >= lag]:
            del self.deleted[name]


class LaggingContainer(Container):
    """``inner`` whose listings lag ``lag_seconds`` behind its writes and deletes."""

    def __init__(
        self,
        inner: Container,
        lag_seconds: float,
        *,
        clock: Clock = time.monotonic,
        record: LagRecord | None = None,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.lag = float(lag_seconds)
        self._clock = clock
        self._record = record or LagRecord()

    # ---- writes: hide the name from listings while the write runs and for ``lag`` after

    def _writing(self, name: str, write: Callable[[], None]) -> None:
        rec = self._record
        with rec.lock:
            rec.deleted.pop(name, None)
            rec.written[name] = float("inf")  # hidden from the start of the write
        try:
            write()
        finally:
            with rec.lock:
                rec.written[name] = self._clock()

    def put(self, name: str, data: bytes | memoryview) -> None:
        self._writing(name, lambda: self.inner.put(name, data))

    def put_file(self, name: str, f: BinaryIO, size: int) -> None:
        self._writing(name, lambda: self.inner.put_file(name, f, size))

    def put_new(self, name: str, data: bytes | memoryview) -> bool:
        created: list[bool] = []
        self._writing(name, lambda: created.append(self.inner.put_new(name, data)))
        return created[0]

    def delete(self, name: str) -> None:
        info = self.inner.stat(name)
        rec = self._record
        if info is not None:
            with rec.lock:
                rec.written.pop(name, None)
                rec.deleted[name] = (float("inf"), info)  # a ghost from the start
        try:
            self.inner.delete(name)
        finally:
            if info is not None:
                with rec.lock:
                    rec.deleted[name] = (self._clock(), info)

    # ---- reads of a known name: up to date

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(name, offset, length)

    def head(self, name: str) -> int | None:
        return self.inner.head(name)

    def stat(self, name: str) -> ObjectInfo | None:
        return self.inner.stat(name)

    def clock(self) -> float:
        return self.inner.clock()

    # ---- listings: behind

    def list(self, prefix: str = "") -> Iterator[str]:
        for info in self.list_info(prefix):
            yield info.name

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        rec = self._record
        with rec.lock:
            rec.prune(self._clock(), self.lag)
            hidden = set(rec.written)
            ghosts = {n: info for n, (_, info) in rec.deleted.items() if n.startswith(prefix)}
        for info in self.inner.list_info(prefix):
            ghosts.pop(info.name, None)  # listed for real (re-created): not twice
            if info.name not in hidden:
                yield info
        yield from ghosts.values()


class LaggingBackend(Backend):
    """``inner`` whose containers are :class:`LaggingContainer`; every open of one container
    name shares one record of recent writes and deletes, as a store's listing would."""

    def __init__(
        self, inner: Backend, lag_seconds: float, *, clock: Clock = time.monotonic
    ) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.lag = float(lag_seconds)
        self._clock = clock
        self._records: dict[str, LagRecord] = {}
        self._lock = threading.Lock()

    def open(self, container: str, create: bool = True) -> Container:
        inner = self.inner.open(container, create)
        with self._lock:
            record = self._records.setdefault(container, LagRecord())
        return LaggingContainer(inner, self.lag, clock=self._clock, record=record)

    def validate_container_name(self, container: str) -> str | None:
        return self.inner.validate_container_name(container)

    def close(self) -> None:
        self.inner.close()
