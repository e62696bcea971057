"""The object store contract every backend implements.

A *container* is a flat namespace of objects (a directory, an S3 bucket, a Swift
container). Object names use ``/`` as a separator but backends must not depend on it.

Contract of each method (modelled on restic's backend interface):

- ``put(name, data)``: store ``data`` under ``name``, replacing any object of that name.
  Atomic: a reader sees the old object, the new one, or nothing, never a partial one.
  Idempotent: the engine only ever writes the same bytes under a content-addressed name,
  so a retried put is harmless. ``data`` is any bytes-like object (the engine passes
  memoryviews over buffers it reuses): a backend must not keep a reference to it after
  ``put`` returns.
- ``put_file(name, f, size)``: ``put`` of the whole content of the seekable binary file
  ``f``, which holds exactly ``size`` bytes, streamed so that memory does not grow with the
  object (manifests grow with a volume's data). The backend seeks ``f`` to 0 itself, so a
  retried call sends the same bytes.
- ``put_new(name, data)``: create the object only if no object of that name exists:
  ``True`` if this call created it, ``False`` if one existed already (nothing of this call
  is stored then). For objects that must never be silently replaced, such as a container's
  ``config``. Each backend says how atomic it is against other writers creating the same
  name at the same moment (local: atomic; Swift and S3 stores without atomic conditional
  writes: a small window remains, see their ``put_new``), so a caller re-reads the object
  after a ``True`` as after a ``False``. Through :class:`~blockvault.store.retry.RetryingBackend`
  a call retried after a lost answer may find the object its own first attempt wrote and
  answer ``False``: the re-read shows the same bytes either way.
- ``get(name, offset=0, length=None)``: the object's bytes, or ``length`` bytes from
  ``offset`` (a range read). Raises :class:`ObjectNotFound` if the object does not exist.
  A range past the end returns what exists (possibly ``b""``).
- ``head(name)``: the object's size in bytes, or ``None`` if it does not exist.
- ``delete(name)``: remove the object. Deleting a missing object is not an error.
- ``list(prefix)``: the names of all objects whose name starts with ``prefix``, in any
  order. Must return every object, paginating as the backend needs. A listing that could not
  be read whole raises; it never returns fewer names (garbage collection would take the
  missing ones for deleted). It may lag behind writes and deletes (Swift's listings are
  eventually consistent): callers that delete rely on ``docs/format.md``'s grace periods,
  never on a listing being up to date.
- ``list_info(prefix)``: as ``list``, with each object's size and modification time.
- ``stat(name)``: the object's :class:`ObjectInfo`, or ``None`` if it does not exist.

Modification times (``ObjectInfo.mtime``, seconds since the epoch as a float) are the
*store's* clock: the time the store gave the object when it was last written. They are
comparable with each other and with :meth:`Container.clock`, never with a worker's clock.

Errors: :class:`StoreUnavailable` for transient failures (connection refused/reset, timeout,
5xx, throttling) that a retry may cure; :class:`StorePermanentError` for failures a retry
will not cure (authentication, access denied, invalid container name); :class:`StoreFull`
when the store has no room for an object (not retried); :class:`ObjectNotFound` for a
missing object on ``get``. Backends raise only these (and subclasses), never library
exceptions (nor ``OSError``), so the engine and the service can tell a person what happened
without knowing which backend ran.
"""

from __future__ import annotations

import abc
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO


class StoreError(Exception):
    """Base of every object store failure."""


class StoreUnavailable(StoreError):
    """A transient failure: the store could not be reached or answered 5xx/throttled."""


class StorePermanentError(StoreError):
    """A failure a retry will not cure: bad credentials, access denied, invalid name."""


class StoreFull(StoreError):
    """The store has no room for an object: no space left, quota exceeded, file too large.

    Deliberately not a :class:`StoreUnavailable`: space comes back only when someone deletes
    backups or grows the store, not within the seconds of a retry budget. Retrying would
    re-send the object for a minute and then report the store "unreachable", hiding the
    cause; failing at once names it. Nor a :class:`StorePermanentError`, which means
    misconfiguration (credentials, names): a later backup may succeed with no change to
    the configuration once space is freed.
    """

    def __init__(self, reason: str, name: str = "", container: str = "") -> None:
        what = f" while writing {name}" if name else ""
        where = f" in container {container}" if container else ""
        super().__init__(f"the object store is full ({reason}){what}{where}")
        self.reason = reason
        self.name = name
        self.container = container


class ObjectNotFound(StoreError):
    """The object does not exist."""

    def __init__(self, name: str, container: str = "") -> None:
        where = f" in container {container}" if container else ""
        super().__init__(f"object {name} not found{where}")
        self.name = name
        self.container = container


def file_pieces(f: BinaryIO, size: int) -> Iterator[bytes]:
    """The ``size`` bytes of ``f`` from offset 0, in pieces of at most 1 MiB (for
    ``put_file``); ValueError if the file holds fewer."""
    f.seek(0)
    left = size
    while left:
        piece = f.read(min(left, 1024 * 1024))
        if not piece:
            raise ValueError(f"file holds fewer than the {size} bytes to store")
        left -= len(piece)
        yield piece


def file_md5(f: BinaryIO, size: int) -> hashlib._Hash:
    """MD5 of the ``size`` bytes of ``f`` (for the integrity headers of a streamed put).
    Leaves ``f`` at offset 0."""
    md5 = hashlib.md5(usedforsecurity=False)
    for piece in file_pieces(f, size):
        md5.update(piece)
    f.seek(0)
    return md5


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    mtime: float  # store's clock, seconds since the epoch


class Container(abc.ABC):
    """One container (bucket, directory) of a backend. Thread-safe."""

    name: str

    @abc.abstractmethod
    def put(self, name: str, data: bytes | memoryview) -> None: ...

    @abc.abstractmethod
    def put_file(self, name: str, f: BinaryIO, size: int) -> None: ...

    def put_new(self, name: str, data: bytes | memoryview) -> bool:
        """Create ``name`` holding ``data`` unless an object of that name exists: ``True``
        if this call created it, ``False`` if not (see the module docstring).

        Not abstract so that wrappers written before it existed still load; a container
        that cannot create an object conditionally must not fake it with ``head`` then
        ``put`` behind the caller's back, so the default refuses."""
        raise NotImplementedError(f"{type(self).__name__} does not implement put_new")

    @abc.abstractmethod
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    @abc.abstractmethod
    def head(self, name: str) -> int | None: ...

    @abc.abstractmethod
    def delete(self, name: str) -> None: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]: ...

    @abc.abstractmethod
    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    @abc.abstractmethod
    def stat(self, name: str) -> ObjectInfo | None: ...

    def clock(self) -> float:
        """The store's current time: the modification time of a probe object written now.
        Time comparisons that decide a deletion use this clock and object mtimes only."""
        name = f"clock/{uuid.uuid4().hex}"
        self.put(name, b"")
        try:
            info = self.stat(name)
        finally:
            self.delete(name)
        if info is None:
            raise StoreUnavailable(f"the store lost probe object {name} right after writing it")
        return info.mtime


class Backend(abc.ABC):
    """A connection to one object store deployment. Thread-safe."""

    #: short name used in configuration and in export records (``local``, ``s3``, ``swift``)
    kind: str

    @abc.abstractmethod
    def open(self, container: str, create: bool = True) -> Container:
        """Open ``container``, creating it when ``create`` is true and it does not exist.

        Raises :class:`StorePermanentError` for a name the backend rejects or a container
        the credentials cannot access, :class:`StoreUnavailable` if the store is down.
        """

    def validate_container_name(self, container: str) -> str | None:
        """Return a human-readable reason why ``container`` is unusable, or ``None``.

        Called synchronously at backup-create time so a bad name is a 400, not a failed
        backup later. Must not contact the store.
        """
        return None

    def close(self) -> None:
        """Release connections. Optional."""
