"""The embedded default store: each container is a directory, each object a file.

Writes go to a temporary file in the same directory and are renamed into place, so a
crash never leaves a partial object under its real name.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from blockvault.directio import is_aligned, open_direct, pwrite_direct
from blockvault.store.base import (
    Backend,
    Container,
    ObjectInfo,
    ObjectNotFound,
    StorePermanentError,
    file_pieces,
)

# Container names become directory names: keep them to one safe path component.
_CONTAINER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_DIRECT_MIN = 1024 * 1024


class LocalContainer(Container):
    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self._root = root

    def _path(self, name: str) -> Path:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise StorePermanentError(f"invalid object name {name!r}")
        return self._root / name

    def put(self, name: str, data: bytes) -> None:
        mv = memoryview(data).cast("B")

        def write(fd: int, tmp: str) -> None:
            # Packs come in aligned buffers: written with O_DIRECT they skip the page cache
            # copy (see blockvault.directio); small objects are not worth it.
            dfd = (open_direct(tmp, os.O_WRONLY)
                   if len(mv) >= _DIRECT_MIN and is_aligned(mv) else None)
            try:
                pwrite_direct(dfd, fd, mv, 0)
            finally:
                if dfd is not None:
                    os.close(dfd)

        self._replace(name, write)

    def put_file(self, name: str, f: BinaryIO, size: int) -> None:
        def write(fd: int, _tmp: str) -> None:
            for piece in file_pieces(f, size):
                os.write(fd, piece)  # a regular file: written whole

        self._replace(name, write)

    def _replace(self, name: str, write: Callable[[int, str], None]) -> None:
        """Write a temporary file next to the object with ``write(fd, path)``, fsync it and
        rename it into place."""
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            try:
                write(fd, tmp)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(name, self.name) from None

    def head(self, name: str) -> int | None:
        info = self.stat(name)
        return None if info is None else info.size

    def stat(self, name: str) -> ObjectInfo | None:
        try:
            st = self._path(name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not S_ISREG(st.st_mode):
            return None  # a directory of the layout, not an object
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass

    def list(self, prefix: str = "") -> Iterator[str]:
        for info in self.list_info(prefix):
            yield info.name

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        yield from self._walk(str(self._root), "", prefix)

    def _walk(self, path: str, rel: str, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under directory ``path`` (``rel`` is its name in the container, with a
        trailing ``/``), skipping subtrees that cannot hold a name starting with ``prefix``."""
        with os.scandir(path) as it:
            entries = list(it)
        for entry in entries:
            name = rel + entry.name
            if entry.is_dir(follow_symlinks=False):
                sub = name + "/"
                if sub.startswith(prefix) or prefix.startswith(sub):
                    yield from self._walk(entry.path, sub, prefix)
                continue
            if entry.name.startswith(".tmp-") or not name.startswith(prefix):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since the directory was read
            if S_ISREG(st.st_mode):
                yield ObjectInfo(name, st.st_size, st.st_mtime)


class LocalBackend(Backend):
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def validate_container_name(self, container: str) -> str | None:
        if not _CONTAINER_RE.match(container) or container in (".", ".."):
            return (
                "container names for the local store must be 1-255 characters of letters, "
                "digits, '.', '_' and '-', starting with a letter or digit"
            )
        return None

    def open(self, container: str, create: bool = True) -> Container:
        reason = self.validate_container_name(container)
        if reason:
            raise StorePermanentError(f"invalid container {container!r}: {reason}")
        path = self.root / container
        if not path.is_dir():
            if not create:
                raise StorePermanentError(f"container {container} does not exist")
            path.mkdir(parents=True, exist_ok=True)
        return LocalContainer(path, container)
