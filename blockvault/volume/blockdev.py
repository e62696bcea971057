"""The ``block`` driver: existing block devices (LVM logical volumes, partitions, loop
devices, multipath maps) whose path matches one of the backend's ``paths`` patterns.

A ``source-name`` is an absolute, normalised device path (no ``..``, no ``//``) that matches
a pattern, where ``*`` and ``?`` never cross a ``/`` (``/dev/vg0/*`` is the LVs of vg0 and
nothing else). The name is kept as given (an LVM name such as ``/dev/vg0/vm1`` is stable
across reboots, the ``/dev/dm-N`` it points at is not); it must be a block device. The
size comes from the device; the engine reads it with O_DIRECT (``direct_io``), bypassing
the page cache the device's users rely on. A device whose size changed since it was
managed, or that is gone, is refused with an error naming it. Blockvault never deletes or
resizes these devices.
"""

from __future__ import annotations

import errno
import glob
import os
import posixpath
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from blockvault.volume.backends import (
    BackupSource,
    Candidate,
    Disk,
    InvalidReference,
    Managed,
    Parent,
    RestoreTarget,
    SourceError,
    VolumeDriver,
)
from blockvault.volume.filedisk import MAX_CANDIDATES, GiB, source_name_of, whole_gib


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class BlockDriver(VolumeDriver):
    kind = "block"

    def __init__(self, name: str, options: dict[str, Any], *, data_dir: Path) -> None:
        super().__init__(name, options, data_dir=data_dir)
        self.unknown_options({"paths"})
        paths = self.options.get("paths")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths or not all(
                isinstance(p, str) and p.startswith("/") for p in paths):
            raise ValueError(f"backends.{name}: driver block needs 'paths', a list of "
                             "absolute device path patterns (e.g. [\"/dev/vg0/*\"])")
        self.patterns = paths

    def matches(self, name: str) -> bool:
        return any(PurePosixPath(name).match(p) for p in self.patterns)

    def check_name(self, name: str) -> None:
        if not name.startswith("/") or posixpath.normpath(name) != name:
            raise InvalidReference(f"Source {name} must be an absolute, normalised device "
                                   "path (no '..', '.' or '//').")
        if not self.matches(name):
            raise InvalidReference(f"Source {name} does not match the device patterns of "
                                   f"backend {self.name} ({', '.join(self.patterns)}).")

    # -- manage ----------------------------------------------------------------------

    def check_ref(self, ref: dict[str, Any], metadata: dict[str, str]) -> Managed:
        name = source_name_of(ref)
        self.check_name(name)
        try:
            st = os.stat(name)
        except FileNotFoundError:
            raise InvalidReference(f"Source {name} does not exist.") from None
        except OSError as exc:
            raise InvalidReference(f"Source {name} cannot be examined: "
                                   f"{exc.strerror}.") from None
        if not stat.S_ISBLK(st.st_mode):
            raise InvalidReference(f"Source {name} is not a block device.")
        try:
            fd = os.open(name, os.O_RDWR)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                os.pread(fd, 4096, 0)
            finally:
                os.close(fd)
        except OSError as exc:
            raise InvalidReference(f"Source {name} cannot be opened for reading and "
                                   f"writing: {exc.strerror}.") from None
        whole_gib(name, size)
        return Managed(name, size, {"rdev": st.st_rdev})

    def manageable(self, managed_locations: set[str]) -> list[Candidate]:
        out: list[Candidate] = []
        seen: set[str] = set()
        for pattern in self.patterns:
            for name in sorted(glob.glob(pattern)):
                if name in seen or not self.matches(name):
                    continue
                seen.add(name)
                try:
                    if not stat.S_ISBLK(os.stat(name).st_mode):
                        continue
                except OSError:
                    continue
                size, reason = 0, None
                try:
                    size = device_size(name)
                except OSError as exc:
                    reason = f"unreadable: {exc.strerror}"
                if reason is None:
                    if name in managed_locations:
                        reason = "already managed"
                    elif size == 0 or size % GiB:
                        reason = "size is not a whole number of GiB"
                    elif _busy(name):
                        reason = "in use (mounted, or held by another device)"
                out.append(Candidate({"source-name": name}, size // GiB, reason is None,
                                     reason, location=name))
                if len(out) >= MAX_CANDIDATES:
                    return out
        return out

    def stats(self) -> dict[str, Any]:
        total = 0
        for cand in self.manageable(set()):
            total += cand.size
        return {"total_capacity_gb": total, "free_capacity_gb": 0}

    def capabilities(self) -> dict[str, Any]:
        return {"paths": list(self.patterns), "thin_provisioning_support": False}

    # -- use ---------------------------------------------------------------------------

    def path(self, disk: Disk) -> str:
        name = disk.location or ""
        try:
            st = os.stat(name)
            size = device_size(name) if stat.S_ISBLK(st.st_mode) else -1
        except OSError:
            raise SourceError(name, f"The source {name} of volume {disk.volume_id} is "
                                    "gone.") from None
        if size < 0:
            raise SourceError(name, f"The source {name} of volume {disk.volume_id} is no "
                                    "longer a block device.")
        if size != disk.size:
            raise SourceError(name, f"The source {name} of volume {disk.volume_id} is "
                                    f"{size} bytes now, not the {disk.size} it had when "
                                    "managed (gone, detached or resized).")
        return name

    def open_backup(self, disk: Disk, parent: Parent | None) -> BackupSource:
        src = BackupSource(Path(self.path(disk)), disk.size, disk.location or "")
        src.finish = lambda: self.path(disk)  # type: ignore[method-assign]
        return src

    def open_restore(self, disk: Disk) -> RestoreTarget:
        target = RestoreTarget(Path(self.path(disk)), disk.location or "")
        target.finish = lambda: self.path(disk)  # type: ignore[method-assign]
        return target


def _busy(name: str) -> bool:
    """Whether the kernel holds the device exclusively (mounted, an LVM PV, a RAID
    member): O_EXCL on a block device fails with EBUSY then."""
    try:
        os.close(os.open(name, os.O_RDONLY | os.O_EXCL))
    except OSError as exc:
        return exc.errno == errno.EBUSY
    return False
