"""Sparse raw files under ``<data_dir>/volumes``: ``<id>.raw`` for volumes and
``snapshots/<id>.raw`` for snapshots."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from blockvault.volume.changes import ChangeMap

GiB = 1024**3
_COPY_BUF = 4 * 1024 * 1024


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
        path = self.volume_path(volume_id)
        with open(path, "wb") as f:
            f.truncate(size_gib * GiB)  # sparse: no blocks allocated
        return path

    def extend(self, volume_id: str, size_gib: int) -> None:
        os.truncate(self.volume_path(volume_id), size_gib * GiB)
        self.changes(volume_id).invalidate()

    def delete(self, volume_id: str) -> None:
        self.volume_path(volume_id).unlink(missing_ok=True)
        self.changes(volume_id).invalidate()

    def write(self, volume_id: str, offset: int, chunks: Iterable[bytes]) -> int:
        """Write ``chunks`` at ``offset``; returns the number of bytes written."""
        written = 0
        fd = os.open(self.volume_path(volume_id), os.O_WRONLY)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(fd, view, offset + written)
                    written += n
                    view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
            if written:
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
        """A new volume holding ``source``'s bytes, grown to ``size_gib``."""
        path = self.volume_path(volume_id)
        copy_sparse(source, path)
        os.truncate(path, size_gib * GiB)
        return path

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.snapshot_path(snapshot_id).unlink(missing_ok=True)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy keeping holes; a reflink (instant, shared blocks) where the filesystem can."""
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)], check=True)
