"""The ``file`` driver: existing raw image files under a configured ``root``.

A volume's location is the file's path relative to the root, with symlinks and ``..``
resolved: a name that resolves outside the root is refused, at manage time and again at
every open (a directory swapped for a symlink later is caught too). The file's device and
inode are recorded at manage time; a file replaced behind the service's back (a copy
renamed over it, a restore by another tool) no longer matches and is refused with an
error naming its source-name. Holes are skipped by the engine (SEEK_DATA/SEEK_HOLE).
Blockvault never deletes these files: deleting or unmanaging the volume leaves them.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

from blockvault.volume.backends import (
    BackupSource,
    Candidate,
    Disk,
    GiB,
    InvalidReference,
    Managed,
    Parent,
    RestoreTarget,
    SourceError,
    VolumeDriver,
    same_file,
)

#: candidates listed at most (a root with more files lists the first ones by name)
MAX_CANDIDATES = 10000


def source_name_of(ref: Any) -> str:
    if not isinstance(ref, dict) or not isinstance(ref.get("source-name"), str) \
            or not ref["source-name"]:
        raise InvalidReference("Manage existing volume failed due to invalid backend "
                               "reference: ref must hold a non-empty 'source-name'.")
    return ref["source-name"]


def whole_gib(name: str, size: int) -> None:
    if size <= 0 or size % GiB:
        raise InvalidReference(
            f"Source {name} is {size} bytes, not a whole number of GiB: blockvault only "
            "manages sources whose size is a multiple of 1 GiB (grow it, e.g. with "
            "truncate or lvextend, and try again).")


class FileDriver(VolumeDriver):
    kind = "file"

    def __init__(self, name: str, options: dict[str, Any], *, data_dir: Path) -> None:
        super().__init__(name, options, data_dir=data_dir)
        self.unknown_options({"root"})
        root = self.options.get("root")
        if not isinstance(root, str) or not root:
            raise ValueError(f"backends.{name}: driver file needs 'root' (a directory)")
        self.root = Path(root).expanduser()

    def _real_root(self) -> Path:
        return Path(os.path.realpath(self.root))

    def resolve(self, name: str) -> tuple[str, Path]:
        """(location relative to the root, real path) of ``name``; InvalidReference if it
        resolves outside the root."""
        root = self._real_root()
        given = Path(name)
        real = Path(os.path.realpath(given if given.is_absolute() else root / given))
        if real == root or not real.is_relative_to(root):
            raise InvalidReference(
                f"Source {name} is outside the root of backend {self.name} (after "
                "resolving symlinks and '..'); only files under it can be managed.")
        return str(real.relative_to(root)), real

    # -- manage ----------------------------------------------------------------------

    def check_ref(self, ref: dict[str, Any], metadata: dict[str, str]) -> Managed:
        name = source_name_of(ref)
        location, real = self.resolve(name)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise InvalidReference(f"Source {name} does not exist in backend "
                                   f"{self.name}.") from None
        except OSError as exc:
            raise InvalidReference(f"Source {name} cannot be examined: "
                                   f"{exc.strerror}.") from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidReference(f"Source {name} is not a regular file.")
        try:
            os.close(os.open(real, os.O_RDWR))
        except OSError as exc:
            raise InvalidReference(f"Source {name} cannot be opened for reading and "
                                   f"writing: {exc.strerror}.") from None
        whole_gib(name, st.st_size)
        return Managed(location, st.st_size, {"dev": st.st_dev, "ino": st.st_ino})

    def manageable(self, managed_locations: set[str]) -> list[Candidate]:
        root = self._real_root()
        out: list[Candidate] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fname in sorted(filenames):
                path = Path(dirpath) / fname
                rel = str(path.relative_to(root))
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # symlinks are managed by the name they point to
                reason = None
                if rel in managed_locations:
                    reason = "already managed"
                elif not os.access(path, os.R_OK | os.W_OK):
                    reason = "not readable and writable"
                elif st.st_size == 0 or st.st_size % GiB:
                    reason = "size is not a whole number of GiB"
                out.append(Candidate({"source-name": rel}, st.st_size // GiB, reason is None,
                                     reason, location=rel))
                if len(out) >= MAX_CANDIDATES:
                    return out
        return out

    def stats(self) -> dict[str, Any]:
        try:
            usage = shutil.disk_usage(self.root)
        except OSError:
            return super().stats()
        return {"total_capacity_gb": round(usage.total / GiB, 2),
                "free_capacity_gb": round(usage.free / GiB, 2)}

    def capabilities(self) -> dict[str, Any]:
        return {"root": str(self.root), "thin_provisioning_support": True}

    # -- use ---------------------------------------------------------------------------

    def path(self, disk: Disk) -> Path:
        """The file now, if it is still the one managed; SourceError otherwise."""
        name = self.source_name(disk)
        try:
            location, real = self.resolve(disk.location or "")
        except InvalidReference:
            raise SourceError(name, f"The source {name} of volume {disk.volume_id} now "
                                    "resolves outside its backend's root.") from None
        try:
            st = os.stat(real)
        except OSError:
            raise SourceError(name, f"The source {name} of volume {disk.volume_id} is "
                                    "gone.") from None
        if location != disk.location or not same_file(st, disk.info):
            raise SourceError(name, f"The source {name} of volume {disk.volume_id} was "
                                    "replaced behind the service's back; it is not the file "
                                    "that was managed (manage it again to use it).")
        if st.st_size < disk.size:
            raise SourceError(name, f"The source {name} of volume {disk.volume_id} shrank "
                                    f"to {st.st_size} bytes (the volume has {disk.size}).")
        return real

    def open_backup(self, disk: Disk, parent: Parent | None) -> BackupSource:
        return _Checked(self, disk, self.path(disk), disk.size)

    def open_restore(self, disk: Disk) -> RestoreTarget:
        target = RestoreTarget(self.path(disk), self.source_name(disk))
        target.finish = lambda: self.path(disk)  # type: ignore[method-assign]
        return target


class _Checked(BackupSource):
    def __init__(self, driver: FileDriver, disk: Disk, path: Path, size: int) -> None:
        super().__init__(path, size, driver.source_name(disk))
        self.driver, self.disk = driver, disk

    def finish(self) -> None:
        # The engine read through its own descriptor: if the name now points at another
        # file (or none), what it read may not be what the volume is any more.
        self.driver.path(self.disk)
