"""Where a backup reads from and a restore writes to: the engine's two I/O interfaces.

The engine never needs a file path. A backup reads a :class:`Source`; a restore writes a
:class:`Target` (``blockvault.engine.restorer`` has the file implementation). A ``Path``
given to ``Engine.backup``/``Engine.restore`` is wrapped in the file implementations, so
callers that have a file or a block device change nothing. Volume drivers (for example
``blockvault.volume.nbd``) implement both for what they reach.

``Source`` contract (every offset and length in bytes):

- ``name``: how errors and logs name the source (a path, an NBD URI — never a secret).
- ``open(direct)`` / ``close()``: ``open`` is called before reading, from the calling
  thread, and ``close`` after, always, even after a failure; a backup that must run a
  second pass (docs/format.md) opens the source again. ``direct`` says the caller will
  read most data once (a full backup, or only changed ranges), so a source that can
  bypass caches should.
- ``length()``: the bytes the source holds now. The engine backs up ``size`` bytes given
  by its caller; bytes past ``length()`` read as zeros.
- ``extents(start, stop)``: sorted, non-overlapping ``(start, stop)`` regions within
  ``[start, stop)`` that *may* hold data; anything outside them must read as zeros (holes,
  unallocated or known-zero extents). Yielding the whole range is always correct.
- ``read_into(buf, offset, length, limit)``: fill ``buf.view[:length]`` with the bytes at
  ``offset`` and return that view; bytes at or past ``limit`` read as zeros. Called from
  several reader threads at once, for disjoint ranges. Errors raise (an ``OSError``, or
  the driver's own exception naming the source) and fail the backup: it never stores a
  guess.
- ``changed_extents()``: byte ranges ``(offset, length)`` that may differ from the data of
  the parent backup the caller names, from the source's own change tracking (a dirty
  bitmap); ``None`` when the source cannot vouch that its tracking covers every write
  since that parent was taken — the engine then reads the whole source. Only called for
  an incremental whose parent is usable, and before ``open`` (the engine decides how to
  read from the answer): a source that must connect to answer does so itself, and
  ``close`` ends that too.
- ``bytes_read``: bytes read from the source so far (for logs, tests and benchmarks).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from blockvault.directio import ALIGN, AlignedBuffer, open_direct

READ_CHUNK = 4 * 1024 * 1024  # one read = one unit of parallel work


@runtime_checkable
class Source(Protocol):
    name: str
    bytes_read: int

    def open(self, direct: bool) -> None: ...
    def close(self) -> None: ...
    def length(self) -> int: ...
    def extents(self, start: int, stop: int) -> Iterator[tuple[int, int]]: ...
    def read_into(self, buf: AlignedBuffer, offset: int, length: int,
                  limit: int) -> memoryview: ...
    def changed_extents(self) -> Sequence[tuple[int, int]] | None: ...


@runtime_checkable
class Target(Protocol):
    """Where a restore writes (contract in ``blockvault.engine.restorer``)."""

    name: str

    def open(self, size: int) -> None: ...
    def close(self) -> None: ...
    def write(self, bufs: list, offset: int) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...


class FileSource:
    """A regular file or a block device: holes from SEEK_DATA/SEEK_HOLE, reads with
    O_DIRECT where the filesystem allows it (see blockvault.directio). It has no change
    tracking of its own (raw volumes' tracked writes: blockvault.volume.changes)."""

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)
        self.name = str(path)
        self.bytes_read = 0
        self.fd = -1
        self.direct_fd: int | None = None

    def open(self, direct: bool) -> None:
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            self.direct_fd = open_direct(self.path, os.O_RDONLY) if direct else None
            try:  # doubles the kernel's readahead window (for what is read buffered)
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def length(self) -> int:
        return volume_length(self.fd)

    def extents(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        return _data_regions(self.fd, stop, start)

    def read_into(self, buf: AlignedBuffer, offset: int, length: int,
                  limit: int) -> memoryview:
        mv = read_into(self.fd, buf, offset, length, limit, self.direct_fd)
        self.bytes_read += max(0, min(length, limit - offset))  # GIL: no lost updates
        return mv

    def changed_extents(self) -> Sequence[tuple[int, int]] | None:
        return None


def as_source(source: Source | os.PathLike | str) -> Source:
    return source if isinstance(source, Source) else FileSource(source)


def volume_length(fd: int) -> int:
    """Length of a regular file or a block device."""
    return os.lseek(fd, 0, os.SEEK_END)


def _data_regions(fd: int, end: int, pos: int = 0) -> Iterator[tuple[int, int]]:
    """Yield (start, stop) of regions of [pos, end) that may hold data, skipping holes; the
    whole range if the filesystem cannot tell."""
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            yield pos, end  # SEEK_DATA unsupported here
            return
        if start >= end:
            return
        try:
            stop = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            stop = end
        stop = min(stop, end)
        if stop <= start:  # defensive: never loop forever
            stop = end
        yield start, stop
        pos = stop


def chunks(src: Source, readable: int, block_size: int, chunk: int = READ_CHUNK,
           start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) pieces, block-aligned and at most ``chunk`` long, covering every
    block of [start, min(stop, readable)) that may hold data in ``src`` (``start`` and
    ``stop`` are block-aligned). Blocks are never yielded twice."""
    end = readable if stop is None else min(stop, readable)
    done = start  # everything below this offset has been yielded or is a hole
    for rstart, rstop in src.extents(start, end):
        a = max(rstart - rstart % block_size, done)
        b = -(-rstop // block_size) * block_size
        while a < b:
            n = min(chunk - a % chunk, b - a)  # keep reads aligned to the chunk grid
            yield a, n
            a += n
        done = max(done, b)


def read_into(fd: int, buf: AlignedBuffer, offset: int, length: int, readable: int,
              direct_fd: int | None = None) -> memoryview:
    """Read [offset, offset+length) into ``buf`` and return a view of it; bytes at or past
    ``readable`` read as zeros. With ``direct_fd`` (an O_DIRECT descriptor of the same file,
    see blockvault.directio) aligned reads go through it; anything it refuses is read
    through ``fd``."""
    mv = buf.view[:length]
    want = max(0, min(length, readable - offset))
    got = 0
    if direct_fd is not None and offset % ALIGN == 0:
        # Round up: reading past ``want`` (past EOF gives a short read) is overwritten below.
        ask = min(length, -(-want // ALIGN) * ALIGN)
        try:
            while got < want:
                n = os.preadv(direct_fd, [mv[got:ask]], offset + got)
                if not n:
                    break
                got += n
                if got % ALIGN:  # short read at EOF; the rest is zeros anyway
                    break
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        got = min(got, want)
    while got < want:
        n = os.preadv(fd, [mv[got:want]], offset + got)
        if not n:
            break
        got += n
    if got < length:
        mv[got:] = bytes(length - got)
    return mv
