"""The embedded default store: each container is a directory, each object a file.

Writes go to a temporary file in the same directory and are renamed into place, so a
crash never leaves a partial object under its real name. ``put_new`` links the temporary
file into place instead (``link(2)`` fails with EEXIST where ``rename(2)`` would replace),
which makes it atomic against every other creator of the same name, threads and processes
alike, on any filesystem with hard links (local ones, and NFS, where a retransmitted LINK
that answers EEXIST is told apart by comparing inodes; a filesystem without hard links is
a :class:`StorePermanentError` for ``put_new``).

Durability: ``put`` and ``put_new`` return only once the object survives a power loss (the
service then records the backup ``available``): the file is fsynced before the rename (or
link), its directory after it, and the parent of every directory created on the way
(``packs/ab/``, the container's own directory) after creating it. ``delete`` fsyncs the
directory too, so a deleted object does not come back.

Every ``OSError`` becomes a store error: :class:`StoreFull` for ENOSPC/EDQUOT/EFBIG,
:class:`StorePermanentError` for failures a retry will not cure (permissions, read-only
filesystem, a name too long), :class:`StoreUnavailable` for the rest (EIO, ESTALE, EMFILE...),
so the service can say what happened instead of "unexpected OSError".
"""

from __future__ import annotations

import contextlib
import errno
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
    StoreError,
    StoreFull,
    StorePermanentError,
    StoreUnavailable,
    file_pieces,
)

# Container names become directory names: keep them to one safe path component.
# matched with fullmatch: "$" also passes a final newline ("abc\n")
_CONTAINER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_DIRECT_MIN = 1024 * 1024

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# What a retry within seconds cannot cure; anything else (EIO, ESTALE on NFS, EMFILE...) may
# be gone on the next attempt.
_PERMANENT_ERRNOS = frozenset({
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ELOOP,
    errno.EINVAL,
})
# link(2) on a filesystem without hard links (vfat, some FUSE and SMB mounts)
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK})
# Filesystems that cannot fsync a directory (some FUSE and network ones) answer these:
# there is nothing more to do there to make an entry durable.
_NO_DIR_FSYNC_ERRNOS = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EBADF})


def _reason(exc: OSError) -> str:
    """``exc``'s error text with its errno name: ``Input/output error (EIO)``."""
    text = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0)
    return f"{text} ({code})" if code else text


def _store_error(exc: OSError, doing: str, name: str = "", container: str = "") -> StoreError:
    """``exc`` as the store contract's error; ``doing`` says what failed, where."""
    if exc.errno in _FULL_ERRNOS:
        return StoreFull(os.strerror(exc.errno).lower(), name, container)
    if exc.errno in _PERMANENT_ERRNOS:
        return StorePermanentError(f"local store: {doing}: {_reason(exc)}")
    return StoreUnavailable(f"local store: {doing}: {_reason(exc)}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_FSYNC_ERRNOS:
            raise
    finally:
        os.close(fd)


def _make_dirs(path: str) -> None:
    """``mkdir -p path``, durably: the parent of each directory created is fsynced, so the
    new entry survives a power loss."""
    missing: list[str] = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            # another thread may have just created it: its parent is fsynced below all the
            # same, as our object must not be durable before the directory holding it is
            os.mkdir(d)
        _fsync_dir(os.path.dirname(d))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data``: a write short of space returns a count, not an error, and
    only the next one fails (ENOSPC, EFBIG)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # never on Linux for a regular file; do not spin if it ever happens
            raise OSError(errno.EIO, "write() stored no bytes")
        view = view[n:]


class LocalContainer(Container):
    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self._root = root

    def _path(self, name: str) -> Path:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise StorePermanentError(f"invalid object name {name!r}")
        return self._root / name

    def put(self, name: str, data: bytes | memoryview) -> None:
        self._write(name, self._buffer_writer(data), self._rename)

    def put_new(self, name: str, data: bytes | memoryview) -> bool:
        """Create ``name`` unless it exists, atomically: the new file is linked into place
        and link(2) fails with EEXIST if the name is taken, however many threads or
        processes race for it. ``False`` then, and nothing of this call remains. The
        directory is fsynced in both cases: the object found may be this caller's own from
        an attempt whose directory fsync failed (a retry), which must not stay volatile."""
        return self._write(name, self._buffer_writer(data), self._link)

    def put_file(self, name: str, f: BinaryIO, size: int) -> None:
        def write(fd: int, _tmp: str) -> None:
            for piece in file_pieces(f, size):
                _write_all(fd, piece)

        self._write(name, write, self._rename)

    @staticmethod
    def _buffer_writer(data: bytes | memoryview) -> Callable[[int, str], None]:
        mv = memoryview(data).cast("B")

        def write(fd: int, tmp: str) -> None:
            # Packs come in aligned buffers: written with O_DIRECT they skip the page cache
            # copy (see blockvault.directio); small objects are not worth it.
            dfd = (open_direct(tmp, os.O_WRONLY)
                   if len(mv) >= _DIRECT_MIN and is_aligned(mv) else None)
            try:
                pwrite_direct(dfd, fd, mv, 0)  # loops over short writes
            finally:
                if dfd is not None:
                    os.close(dfd)

        return write

    @staticmethod
    def _rename(tmp: str, path: Path) -> bool:
        os.replace(tmp, path)
        return True

    def _link(self, tmp: str, path: Path) -> bool:
        """Give the temporary file ``tmp`` the name ``path`` unless that name exists, then
        drop the temporary name. ``True`` if linked."""
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            st = os.lstat(path)
            if not S_ISREG(st.st_mode):
                # a directory of the layout: not an object, and not one to write (as put)
                raise IsADirectoryError(
                    errno.EISDIR, os.strerror(errno.EISDIR), str(path)
                ) from None
            # On NFS a LINK retransmitted after its answer was lost answers EEXIST although
            # the first transmission linked: the name is then our own file.
            created = os.path.samestat(st, os.lstat(tmp))
        except OSError as exc:
            if exc.errno in _NO_LINK_ERRNOS:
                raise StorePermanentError(
                    f"local store: cannot create {path.relative_to(self._root)} in "
                    f"container {self.name}: "
                    f"the filesystem of {path.parent} does not support hard links, which "
                    f"creating an object only if absent needs: {_reason(exc)}"
                ) from exc
            raise
        # The object is in place (or someone else's is): a temporary name that cannot be
        # removed is a stray hard link that listings skip, not a failed write.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return created

    def _write(self, name: str, write: Callable[[int, str], None],
               publish: Callable[[str, Path], bool]) -> bool:
        """Write a temporary file next to the object with ``write(fd, path)``, fsync it,
        ``publish(tmp, path)`` it (rename or link; it consumes the temporary name) and fsync
        the directory; ``publish``'s answer. On any failure before ``publish`` succeeds the
        temporary file is removed and nothing is in place."""
        path = self._path(name)
        directory = str(path.parent)
        tmp: str | None = None
        try:
            try:
                _make_dirs(directory)
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
                try:
                    write(fd, tmp)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                published = publish(tmp, path)
                tmp = None
                _fsync_dir(directory)
                return published
            except BaseException:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise
        except OSError as exc:
            raise _store_error(
                exc, f"cannot write {name} in container {self.name}", name, self.name
            ) from exc

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            # a path through an object, or a directory of the layout: not an object
            raise ObjectNotFound(name, self.name) from None
        except OSError as exc:
            raise _store_error(exc, f"cannot read {name} in container {self.name}") from exc

    def head(self, name: str) -> int | None:
        info = self.stat(name)
        return None if info is None else info.size

    def stat(self, name: str) -> ObjectInfo | None:
        try:
            st = self._path(name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _store_error(exc, f"cannot stat {name} in container {self.name}") from exc
        if not S_ISREG(st.st_mode):
            return None  # a directory of the layout, not an object
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                path.unlink()  # else no such object (a directory is not one)
            # fsynced even then: this may be the retry of a delete whose fsync failed
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                _fsync_dir(str(path.parent))
        except OSError as exc:
            raise _store_error(exc, f"cannot delete {name} in container {self.name}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        for info in self.list_info(prefix):
            yield info.name

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        yield from self._walk(str(self._root), "", prefix)

    def _walk(self, path: str, rel: str, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under directory ``path`` (``rel`` is its name in the container, with a
        trailing ``/``), skipping subtrees that cannot hold a name starting with ``prefix``.

        A directory that cannot be read raises: garbage collection would take its objects
        for deleted (os.walk skips such a directory silently)."""
        try:
            with os.scandir(path) as it:
                entries = list(it)  # closed before recursing: one descriptor at a time
        except FileNotFoundError:
            if rel:
                return  # removed since its parent was read: its objects are gone too
            raise StorePermanentError(
                f"local store: container {self.name} does not exist ({path})"
            ) from None
        except OSError as exc:
            raise _store_error(
                exc, f"cannot list directory {path} of container {self.name}"
            ) from exc
        for entry in entries:
            name = rel + entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    sub = name + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        yield from self._walk(entry.path, sub, prefix)
                    continue
                if entry.name.startswith(".tmp-") or not name.startswith(prefix):
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since the directory was read
            except OSError as exc:
                raise _store_error(
                    exc, f"cannot stat {entry.path} in container {self.name}"
                ) from exc
            if S_ISREG(st.st_mode):
                yield ObjectInfo(name, st.st_size, st.st_mtime)


class LocalBackend(Backend):
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def validate_container_name(self, container: str) -> str | None:
        if not _CONTAINER_RE.fullmatch(container) or container in (".", ".."):
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
            try:
                _make_dirs(str(path))
            except OSError as exc:
                raise _store_error(
                    exc, f"cannot create container {container} at {path}", "", container
                ) from exc
        return LocalContainer(path, container)
