"""The one retry layer for every backend.

Backends (and the client libraries under them: swiftclient ``retries=0``, botocore
``total_max_attempts=1``) do not retry themselves; :class:`RetryingBackend` retries
:class:`StoreUnavailable` with exponential backoff and full jitter until ``attempts`` calls
have failed or the time ``budget`` is spent, then raises :class:`StoreUnavailable` saying
the store was unreachable. :class:`StorePermanentError`, :class:`StoreFull` and
:class:`ObjectNotFound` are never retried. Retrying is safe because every operation of the
contract is idempotent (puts write the same bytes under a content-addressed name; deleting a
missing object is not an error).

``put_new`` is retried like ``put``, but its answer is not idempotent: an attempt whose
object was stored but whose answer was lost (a timeout, a reset after the store committed)
is followed by one that finds that object and answers ``False``, although it was this
caller's. Acceptable for what put_new is for (a container's ``config``): the caller re-reads
the object after a ``False`` and finds the bytes it wrote.

``list`` and ``list_info`` are retried while fetching the first page; once names have been
handed to the caller a failure propagates (restarting would hand out names twice).

Every attempt, failure, retry and byte moved is told to a :class:`StoreObserver` (the
service's metrics, blockvault.metrics): this layer is the one place every store call passes.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from blockvault.store.base import Backend, Container, ObjectInfo, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class StoreObserver:
    """Hears what the retry layer does, per operation (``put``, ``get``, ``head``,
    ``delete``, ``list``, ``open``). Called on the data path: implementations must be cheap
    and must not raise. This one ignores everything."""

    def attempted(self, op: str) -> None:
        """An attempt of ``op`` is about to reach the store."""

    def failed(self, op: str, exc: BaseException, retrying: bool) -> None:
        """An attempt raised ``exc``; ``retrying``: another attempt follows."""

    def exhausted(self, op: str) -> None:
        """``op`` failed for good after its retries (the caller gets StoreUnavailable)."""

    def moved(self, op: str, nbytes: int) -> None:
        """``op`` succeeded, carrying ``nbytes`` of object data (puts and gets)."""


NO_OBSERVER = StoreObserver()


class RetryPolicy:
    def __init__(
        self,
        kind: str,
        attempts: int = 5,
        base_delay: float = 0.2,
        max_delay: float = 10.0,
        budget: float = 60.0,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        observer: StoreObserver = NO_OBSERVER,
    ) -> None:
        self.kind = kind
        self.observer = observer
        self.attempts = max(1, int(attempts))
        self.base_delay = max(0.0, float(base_delay))
        self.max_delay = max(0.0, float(max_delay))
        self.budget = max(0.0, float(budget))
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()

    def run(self, what: str, fn: Callable[[], T], op: str = "other") -> T:
        start = self._clock()
        attempt = 0
        observer = self.observer
        while True:
            attempt += 1
            observer.attempted(op)
            try:
                return fn()
            except StoreUnavailable as exc:
                last = exc
            except BaseException as exc:  # never retried; counted, then the caller's
                observer.failed(op, exc, False)
                raise
            elapsed = self._clock() - start
            # full jitter: sleep uniformly in [0, min(max_delay, base * 2**(n-1))]
            cap = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
            delay = self._rng.uniform(0.0, cap)
            giving_up = attempt >= self.attempts or elapsed + delay > self.budget
            observer.failed(op, last, not giving_up)
            if giving_up:
                observer.exhausted(op)
                raise StoreUnavailable(
                    f"the {self.kind} object store was unreachable: {what} failed "
                    f"{attempt} time(s) over {elapsed:.1f}s "
                    f"(retry limit {self.attempts} attempts / {self.budget:g}s); "
                    f"last error: {last}"
                ) from last
            log.warning(
                "%s store: %s failed (attempt %d/%d): %s; retrying in %.2fs",
                self.kind,
                what,
                attempt,
                self.attempts,
                last,
                delay,
            )
            self._sleep(delay)


class RetryingContainer(Container):
    def __init__(self, inner: Container, policy: RetryPolicy) -> None:
        self.inner = inner
        self.name = inner.name
        self._policy = policy

    def put(self, name: str, data: bytes) -> None:
        self._policy.run(f"PUT {self.name}/{name}", lambda: self.inner.put(name, data), "put")
        self._policy.observer.moved("put", len(data))

    def put_new(self, name: str, data: bytes) -> bool:
        # a retry after a lost answer may see this call's own object: False (module docstring)
        created = self._policy.run(
            f"PUT (if absent) {self.name}/{name}", lambda: self.inner.put_new(name, data), "put"
        )
        if created:
            self._policy.observer.moved("put", len(data))
        return created

    def put_file(self, name: str, f: BinaryIO, size: int) -> None:
        self._policy.run(f"PUT {self.name}/{name}", lambda: self.inner.put_file(name, f, size),
                         "put")
        self._policy.observer.moved("put", size)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self._policy.run(
            f"GET {self.name}/{name}", lambda: self.inner.get(name, offset, length), "get"
        )
        self._policy.observer.moved("get", len(data))
        return data

    def head(self, name: str) -> int | None:
        return self._policy.run(f"HEAD {self.name}/{name}", lambda: self.inner.head(name),
                                "head")

    def stat(self, name: str) -> ObjectInfo | None:
        return self._policy.run(f"HEAD {self.name}/{name}", lambda: self.inner.stat(name),
                                "head")

    def delete(self, name: str) -> None:
        self._policy.run(f"DELETE {self.name}/{name}", lambda: self.inner.delete(name),
                         "delete")

    def list(self, prefix: str = "") -> Iterator[str]:
        return self._list(prefix, self.inner.list)

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._list(prefix, self.inner.list_info)

    def _list(self, prefix: str, listing: Callable[[str], Iterator[T]]) -> Iterator[T]:
        def first() -> tuple[Iterator[T], list[T]]:
            it = iter(listing(prefix))
            head: list[T] = []
            for item in it:  # pull the first item so the first page is fetched here
                head.append(item)
                break
            return it, head

        it, head = self._policy.run(f"LIST {self.name}/{prefix}*", first, "list")
        yield from head
        yield from it


class RetryingBackend(Backend):
    """Wrap ``inner`` and every container it opens with the retry policy."""

    def __init__(
        self,
        inner: Backend,
        attempts: int = 5,
        base_delay: float = 0.2,
        max_delay: float = 10.0,
        budget: float = 60.0,
        *,
        sleep: Callable[[float], None] = time.sleep,
        observer: StoreObserver = NO_OBSERVER,
    ) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.policy = RetryPolicy(inner.kind, attempts, base_delay, max_delay, budget,
                                  sleep=sleep, observer=observer)

    def __repr__(self) -> str:
        return f"RetryingBackend({self.inner!r})"

    def open(self, container: str, create: bool = True) -> Container:
        inner = self.policy.run(
            f"open container {container}", lambda: self.inner.open(container, create), "open"
        )
        return RetryingContainer(inner, self.policy)

    def validate_container_name(self, container: str) -> str | None:
        return self.inner.validate_container_name(container)

    def close(self) -> None:
        self.inner.close()
