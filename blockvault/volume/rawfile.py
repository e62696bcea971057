"""Sparse raw files under ``<data_dir>/volumes``: ``<id>.raw`` for volumes and
``snapshots/<id>.raw`` for snapshots."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from blockvault.volume.changes import ChangeMap

GiB = 1024**3
_COPY_BUF = 4 * 1024 * 1024
#: An undo log this small stays in memory; past it, it spills to a file beside the volumes.
_UNDO_IN_MEMORY = 16 * 1024 * 1024

#: What the filesystem answers when a file of the asked size cannot exist on it: past its
#: largest file (EFBIG; ext4 stops at 16 TiB), or out of space or quota (copies).
_CAPACITY_ERRNOS = {errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EOVERFLOW}


class CapacityError(Exception):
    """The backend cannot hold a volume of the asked size. ``reason`` is the system's word
    for it (e.g. "File too large"), never a path: it goes into the API's error body."""

    def __init__(self, size_gib: int, err: OSError) -> None:
        self.size_gib = size_gib
        self.reason = os.strerror(err.errno) if err.errno else "no room"
        super().__init__(f"cannot hold {size_gib} GiB: {self.reason}")


class RawFileDriver:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)

    def volume_path(self, volume_id: str) -> Path:
        return self.root / f"{volume_id}.raw"

    def snapshot_path(self, snapshot_id: str) -> Path:
        return self.root / "snapshots" / f"{snapshot_id}.raw"

    def changes(self, volume_id: str) -> ChangeMap:
        """Writes through :meth:`write` since the last full-volume backup."""
        return ChangeMap(self.root / f"{volume_id}.changes", self.volume_path(volume_id))

    def create(self, volume_id: str, size_gib: int) -> Path:
        """A sparse file of ``size_gib``; :class:`CapacityError` (and no file) if the
        filesystem cannot hold one that large."""
        path = self.volume_path(volume_id)
        try:
            with open(path, "wb") as f:
                f.truncate(size_gib * GiB)  # sparse: no blocks allocated
        except OSError as exc:
            path.unlink(missing_ok=True)  # open() made it before truncate() failed
            if exc.errno in _CAPACITY_ERRNOS:
                raise CapacityError(size_gib, exc) from exc
            raise
        return path

    def extend(self, volume_id: str, size_gib: int) -> None:
        """Grow to ``size_gib``; on :class:`CapacityError` the file is as it was (a failed
        ftruncate changes nothing)."""
        try:
            os.truncate(self.volume_path(volume_id), size_gib * GiB)
        except OSError as exc:
            if exc.errno in _CAPACITY_ERRNOS:
                raise CapacityError(size_gib, exc) from exc
            raise
        self.changes(volume_id).invalidate()

    def delete(self, volume_id: str) -> None:
        self.volume_path(volume_id).unlink(missing_ok=True)
        self.changes(volume_id).invalidate()

    def write(
        self, volume_id: str, offset: int, chunks: Iterable[bytes], atomic: bool = False
    ) -> int:
        """Write ``chunks`` at ``offset``; returns the number of bytes written.

        With ``atomic``, the bytes each chunk overwrites are kept in an undo log first, and
        if ``chunks`` raises (a stream that turns out to pass the volume's end, a client
        that goes away) they are put back: the volume is left exactly as it was. That costs
        a read and a write of the same size per chunk, so it is only asked for when the
        length was not known before the first byte (chunked transfer).
        """
        written = 0
        undo = tempfile.SpooledTemporaryFile(_UNDO_IN_MEMORY, dir=self.root) if atomic else None
        fd = os.open(self.volume_path(volume_id), os.O_RDWR if atomic else os.O_WRONLY)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                if undo is not None:
                    undo.write(_pread_full(fd, len(view), offset + written))
                while view:
                    n = os.pwrite(fd, view, offset + written)
                    written += n
                    view = view[n:]
            os.fsync(fd)
        except BaseException:
            if undo is not None and written:
                undo.seek(0)
                pos = offset
                while data := undo.read(_COPY_BUF):
                    _pwrite_full(fd, data, pos)
                    pos += len(data)
                os.fsync(fd)
            raise
        finally:
            os.close(fd)
            if undo is not None:
                undo.close()
            if written:
                # Also after a rollback: the bytes are the old ones again, but the file's
                # mtime moved, and a change map that over-reports is only slower, never wrong.
                self.changes(volume_id).record_write(offset, written)
        return written

    def read(self, volume_id: str, start: int, end: int) -> Iterator[bytes]:
        """Yield the bytes ``start`` .. ``end`` (exclusive) of a volume."""
        with open(self.volume_path(volume_id), "rb") as f:
            f.seek(start)
            remaining = end - start
            while remaining > 0:
                data = f.read(min(_COPY_BUF, remaining))
                if not data:
                    # A file shorter than its volume size reads as zeros past its end.
                    data = bytes(min(_COPY_BUF, remaining))
                remaining -= len(data)
                yield data

    def snapshot(self, volume_id: str, snapshot_id: str) -> Path:
        """Point-in-time copy of a volume."""
        dst = self.snapshot_path(snapshot_id)
        copy_sparse(self.volume_path(volume_id), dst)
        return dst

    def create_from(self, volume_id: str, size_gib: int, source: Path) -> Path:
        """A new volume holding ``source``'s bytes, grown to ``size_gib``; no file is left
        if either step fails."""
        path = self.volume_path(volume_id)
        try:
            copy_sparse(source, path)
            os.truncate(path, size_gib * GiB)
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno in _CAPACITY_ERRNOS:
                raise CapacityError(size_gib, exc) from exc
            raise
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.snapshot_path(snapshot_id).unlink(missing_ok=True)


def _pread_full(fd: int, n: int, pos: int) -> bytes:
    """``n`` bytes at ``pos``; zeros where the file ends early (it reads as zeros there)."""
    parts, got = [], 0
    while got < n:
        data = os.pread(fd, n - got, pos + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts) + bytes(n - got)


def _pwrite_full(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        pos += n
        view = view[n:]


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy keeping holes; a reflink (instant, shared blocks) where the filesystem can."""
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)], check=True)
