"""Volume backends: where a volume's disk lives, behind one small driver interface.

A *backend* is a named, configured driver. Cinder names it in a volume's ``host`` as
``HOST@BACKEND#POOL`` (HOST: the ``host_name`` setting; POOL: the backend's ``pool``,
default its name). The embedded default is one backend, ``rawfile`` (driver ``raw``):
the sparse raw files blockvault creates itself, as before backends existed. Operators add
more in TOML::

    [backends.images]
    driver = "file"            # existing raw image files under root
    root = "/var/lib/images"

    [backends.disks]
    driver = "block"           # block devices matching the patterns
    paths = ["/dev/vg0/*", "/dev/loop*"]

    [backends.vms]
    driver = "nbd"             # NBD exports (blockvault/volume/nbd.py)

Every backend also takes ``pool`` and ``backend_host`` (Cinder's option: the HOST of its
volumes instead of ``host_name``, the same on every host that reaches the same storage).
A volume keeps its HOST (``volumes.host``); jobs on it are routed to workers announcing
its ``HOST@BACKEND`` (:meth:`Backends.reachable`, blockvault.service.jobs).

The driver interface (what the service uses; one class per driver, registered in
:data:`DRIVERS`)::

    class MyDriver(VolumeDriver):
        kind = "mine"                       # the ``driver =`` word
        def __init__(self, name, options, *, data_dir): ...   # ValueError: bad config
        def stats(self) -> dict                                # capacities for get_pools
        def capabilities(self) -> dict                         # extra capability keys
        def check_ref(self, ref, metadata) -> Managed          # InvalidReference -> 400
        def manageable(self, managed_locations) -> list[Candidate]
        def open_backup(self, disk, parent) -> BackupSource    # SourceError on failure
        def open_restore(self, disk) -> RestoreTarget          # SourceError on failure
        def delete(self, disk) -> None      # called only for disks the backend owns

* A :class:`Disk` is what the driver knows of one volume: its id, its size in bytes, its
  ``location`` (the ``provider_location`` column: a path relative to a file root, a device
  path, an NBD URI; None for raw volumes, which are found by id), its ``info`` (the
  driver's private JSON, ``provider_info``: e.g. the inode recorded at manage time), the
  volume's user ``metadata`` (the nbd driver reads its ``bitmap`` key there) and whether
  blockvault ``owned`` the disk (made it, so may delete it).
* :meth:`VolumeDriver.check_ref` validates a manage request's ``ref`` (Cinder's
  ``{"source-name": ...}``, plus driver keys such as ``bitmap``) and returns the
  :class:`Managed` facts to store: location, size in bytes, info. It must not change the
  disk. Any problem is an :class:`InvalidReference` whose message names it (it becomes the
  400's text, so no server path beyond what the caller sent).
* :meth:`VolumeDriver.open_backup` returns a :class:`BackupSource`: ``source`` is what
  ``Engine.backup`` reads: an engine Source (``blockvault.engine.source``) or the ``Path``
  of a file or device. Its ``changed_extents()`` answers what may differ since ``parent``
  (a :class:`Parent`, None for a full backup): the data API's tracked writes for raw
  volumes (:class:`blockvault.volume.changes.TrackedFileSource`), a dirty bitmap for nbd,
  None when unknown (the engine then reads all allocated data). After the engine returns,
  the service calls ``finish()`` — which re-checks that the source is still the disk that
  was managed and raises :class:`SourceError` if it vanished or was replaced meanwhile,
  failing the backup — and,
  once the backup is recorded, ``committed(backup_id)`` (raw: restart its change map; nbd:
  clear or rotate the bitmap). ``close()`` always runs last (it is a context manager).
* :meth:`VolumeDriver.open_restore` returns a :class:`RestoreTarget` whose ``target`` is
  what ``Engine.restore`` writes (a ``Path``, or an engine Source object), same protocol.
* Problems reading or finding a disk are :class:`SourceError`: ``source`` is the
  user-visible name (the ``source-name`` it was managed by, or the volume id for raw) and
  the message is safe to show in a backup's ``fail_reason``.

Sizes: a volume's size is whole GiB (Cinder's API has no other unit). A source whose size
is not a multiple of 1 GiB is refused at manage time with a 400 saying so, rather than
rounded: a rounded-up volume would claim bytes the disk does not have, and a restore onto
it would fail past the disk's end.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockvault.volume.changes import TrackedFileSource
from blockvault.volume.rawfile import RawFileDriver

GiB = 1024**3

#: The embedded default backend: today's managed raw files.
DEFAULT_BACKEND = "rawfile"


class InvalidReference(ValueError):
    """A manage request's ``ref`` (or host) is not acceptable; the message says why and is
    shown to the caller (400)."""


class SourceError(Exception):
    """The disk behind a volume cannot be used (gone, replaced, unreadable). ``source`` is
    its user-visible name; ``str(exc)`` is safe for a ``fail_reason``."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(message)
        self.source = source


@dataclass(frozen=True)
class Disk:
    volume_id: str
    size: int  # bytes (the volume's size in GiB * GiB)
    location: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    owned: bool = True


@dataclass(frozen=True)
class Parent:
    """The backup an incremental is relative to."""

    backup_id: str
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class Managed:
    """What :meth:`VolumeDriver.check_ref` found: stored on the volume row."""

    location: str
    size: int  # bytes, a multiple of GiB
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidate:
    """A disk a backend could manage (Cinder's manageable-volume entry)."""

    reference: dict[str, Any]
    size: int  # GiB, rounded down (0 for a disk smaller than 1 GiB)
    safe_to_manage: bool
    reason_not_safe: str | None = None
    extra_info: str | None = None
    location: str = ""  # compared with managed volumes' locations (not shown)


class BackupSource:
    """An opened volume for one backup. Subclass or use as is."""

    def __init__(self, source: Any, size: int, name: str = "") -> None:
        self.source = source
        self.size = size
        self.name = name

    def finish(self) -> None:
        """The engine is done reading: raise SourceError if the source went away."""

    def committed(self, backup_id: str) -> None:
        """The backup ``backup_id`` of the whole volume is recorded."""

    def close(self) -> None:
        pass

    def __enter__(self) -> BackupSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RestoreTarget:
    def __init__(self, target: Any, name: str = "") -> None:
        self.target = target
        self.name = name

    def finish(self) -> None:
        """The engine is done writing: raise SourceError if the target went away."""

    def close(self) -> None:
        pass

    def __enter__(self) -> RestoreTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VolumeDriver:
    """Base of every driver. ``name`` is the backend's name, ``pool`` its one pool."""

    kind = ""
    #: whether new, empty volumes (POST /volumes) can be made on this backend
    creates_volumes = False

    def __init__(self, name: str, options: dict[str, Any], *, data_dir: Path) -> None:
        self.name = name
        options = dict(options)
        options.pop("driver", None)
        self.pool = str(options.pop("pool", name))
        #: Cinder's ``backend_host``: the HOST its volumes are on, instead of the host's
        #: own name; several hosts that reach the same storage (a shared file system)
        #: give it one value, so any of their workers may run those volumes' jobs
        self.backend_host = str(options.pop("backend_host", "") or "")
        if any(c in self.backend_host for c in "@# "):
            raise ValueError(f"backends.{name}: backend_host {self.backend_host!r} may not "
                             "contain '@', '#' or spaces")
        self.options = options

    def unknown_options(self, allowed: set[str]) -> None:
        extra = sorted(set(self.options) - allowed)
        if extra:
            raise ValueError(f"backend {self.name} (driver {self.kind}): unknown option(s) "
                             f"{', '.join(extra)}")

    # -- what every driver answers -----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"total_capacity_gb": "unknown", "free_capacity_gb": "unknown"}

    def capabilities(self) -> dict[str, Any]:
        return {}

    def check_ref(self, ref: dict[str, Any], metadata: dict[str, str]) -> Managed:
        raise InvalidReference(f"Backend {self.name} does not manage existing volumes.")

    def manageable(self, managed_locations: set[str]) -> list[Candidate]:
        return []

    def open_backup(self, disk: Disk, parent: Parent | None) -> BackupSource:
        raise NotImplementedError

    def open_restore(self, disk: Disk) -> RestoreTarget:
        raise NotImplementedError

    def delete(self, disk: Disk) -> None:
        """Remove an owned disk (never called for one blockvault did not make)."""

    def source_name(self, disk: Disk) -> str:
        """How users know the disk (the ``source-name`` it was managed by)."""
        return disk.location or disk.volume_id


class RawDriver(VolumeDriver):
    """Sparse raw files blockvault creates itself under ``root`` (default
    ``<data_dir>/volumes``); changes written through the data API are tracked
    (:class:`blockvault.volume.changes.ChangeMap`) and hinted to incrementals."""

    kind = "raw"
    creates_volumes = True

    def __init__(self, name: str, options: dict[str, Any], *, data_dir: Path) -> None:
        super().__init__(name, options, data_dir=data_dir)
        self.unknown_options({"root"})
        root = self.options.get("root")
        self.files = RawFileDriver(Path(root).expanduser() if root else data_dir / "volumes")

    def stats(self) -> dict[str, Any]:
        usage = shutil.disk_usage(self.files.root)
        return {"total_capacity_gb": round(usage.total / GiB, 2),
                "free_capacity_gb": round(usage.free / GiB, 2)}

    def capabilities(self) -> dict[str, Any]:
        return {"thin_provisioning_support": True, "thick_provisioning_support": False}

    def open_backup(self, disk: Disk, parent: Parent | None) -> BackupSource:
        changes = self.files.changes(disk.volume_id)
        stamp = changes.stamp()
        hint = changes.hint(parent.backup_id) if parent is not None else None
        src = _RawBackup(TrackedFileSource(self.files.volume_path(disk.volume_id), hint),
                         disk.size, disk.volume_id)
        src.changes, src.stamp = changes, stamp
        return src

    def open_restore(self, disk: Disk) -> RestoreTarget:
        # The target's bytes are about to change behind its change map.
        self.files.changes(disk.volume_id).invalidate()
        return RestoreTarget(self.files.volume_path(disk.volume_id), disk.volume_id)

    def delete(self, disk: Disk) -> None:
        self.files.delete(disk.volume_id)


class _RawBackup(BackupSource):
    changes: Any
    stamp: Any

    def committed(self, backup_id: str) -> None:
        self.changes.reset(backup_id, self.stamp)


#: ``driver =`` word -> "module:Class" (imported when a backend uses it, so a driver whose
#: library is missing only matters where it is configured)
DRIVERS: dict[str, str] = {
    "raw": "blockvault.volume.backends:RawDriver",
    "file": "blockvault.volume.filedisk:FileDriver",
    "block": "blockvault.volume.blockdev:BlockDriver",
    "nbd": "blockvault.volume.nbd:NbdDriver",
}


def driver_class(kind: str) -> type[VolumeDriver]:
    target = DRIVERS.get(kind)
    if target is None:
        raise ValueError(f"unknown volume driver {kind!r} (known: {', '.join(sorted(DRIVERS))})")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


class Backends:
    """The configured backends by name, and Cinder's ``HOST@BACKEND#POOL`` names for them."""

    def __init__(self, host_name: str, drivers: dict[str, VolumeDriver],
                 default: str = DEFAULT_BACKEND) -> None:
        self.host_name = host_name
        self.drivers = drivers
        self.default = default
        if default not in drivers or not drivers[default].creates_volumes:
            raise ValueError(f"the default backend {default!r} must exist and create volumes")

    @classmethod
    def from_config(cls, config: dict[str, dict[str, Any]], *, data_dir: Path,
                    host_name: str = "") -> Backends:
        """``config``: the ``[backends.NAME]`` tables. ``rawfile`` (driver raw) is always
        there unless configured otherwise."""
        tables = {DEFAULT_BACKEND: {"driver": "raw"}, **(config or {})}
        drivers: dict[str, VolumeDriver] = {}
        for name, table in tables.items():
            if not isinstance(table, dict):
                raise ValueError(f"backends.{name} must be a table of options")
            if not name or any(c in name for c in "@#/ ") or len(name) > 64:
                raise ValueError(f"backend name {name!r}: 1-64 characters, none of '@#/ '")
            kind = table.get("driver")
            if not isinstance(kind, str):
                raise ValueError(f"backends.{name}: 'driver' is required "
                                 f"({', '.join(sorted(DRIVERS))})")
            drivers[name] = driver_class(kind)(name, table, data_dir=data_dir)
        return cls(host_name or socket.gethostname(), drivers)

    @classmethod
    def of_files(cls, files: RawFileDriver, host_name: str = "") -> Backends:
        """The embedded default alone, over an existing RawFileDriver."""
        raw = RawDriver(DEFAULT_BACKEND, {"driver": "raw", "root": str(files.root)},
                        data_dir=files.root)
        raw.files = files
        return cls(host_name or socket.gethostname(), {DEFAULT_BACKEND: raw})

    @property
    def raw(self) -> RawDriver:
        """The default backend (new volumes, snapshots)."""
        return self.drivers[self.default]  # type: ignore[return-value]

    def get(self, name: str | None) -> VolumeDriver:
        """The backend a volume row names (None: rows from before backends, the default)."""
        driver = self.drivers.get(name or self.default)
        if driver is None:
            raise SourceError(name or "", f"Volume backend {name} is not configured.")
        return driver

    def backend_host(self, name: str | None) -> str:
        """The HOST of a backend's volumes: its ``backend_host``, else this host's name."""
        driver = self.drivers.get(name or self.default)
        return (driver.backend_host if driver is not None else "") or self.host_name

    def host(self, name: str | None, host: str | None = None) -> str:
        """Cinder's ``HOST@BACKEND#POOL`` of a backend (of a volume on ``host``, if given:
        volumes of other hosts are shown with their own)."""
        name = name or self.default
        driver = self.drivers.get(name)
        pool = driver.pool if driver is not None else name
        return f"{host or self.backend_host(name)}@{name}#{pool}"

    def route(self, name: str | None, host: str | None = None) -> str:
        """``HOST@BACKEND``: which workers may run a job on a volume of this backend (on
        ``host``, default this one): those announcing it (:meth:`reachable`)."""
        name = name or self.default
        return f"{host or self.backend_host(name)}@{name}"

    def reachable(self) -> list[str]:
        """What a worker here announces: ``HOST@BACKEND`` of every configured backend."""
        return [self.route(name) for name in self.drivers]

    def parse_host(self, host: Any) -> VolumeDriver:
        """The backend ``host`` (``HOST@BACKEND[#POOL]``) names; InvalidReference if none."""
        if not isinstance(host, str) or not host:
            raise InvalidReference("host must be given as HOST@BACKEND#POOL.")
        rest, _, pool = host.partition("#")
        hostname, at, name = rest.partition("@")
        if not at:
            raise InvalidReference(f"Host {host} is not of the form HOST@BACKEND#POOL.")
        driver = self.drivers.get(name)
        if hostname != self.backend_host(name):
            # the disk is checked here, in this process: another host's disks are not
            raise InvalidReference(f"Host {hostname} is not this service's host "
                                   f"({self.backend_host(name)}).")
        if driver is None:
            raise InvalidReference(f"Backend {name} of host {host} does not exist "
                                   f"(backends: {', '.join(sorted(self.drivers))}).")
        if pool and pool != driver.pool:
            raise InvalidReference(f"Pool {pool} of host {host} does not exist (backend "
                                   f"{name} has pool {driver.pool}).")
        return driver

    def __iter__(self):
        return iter(self.drivers.values())


#: where an unset ``host_name`` is kept, in the data directory (resolve_host_name)
HOST_NAME_FILE = "host_name"


def resolve_host_name(configured: str, data_dir: Path, *, persist: bool = True) -> str:
    """The HOST this process's volumes, jobs and heartbeats name.

    A configured ``host_name`` wins (and nothing is written). Otherwise the name kept in
    ``data_dir/host_name``: the first start writes the machine's hostname there and every
    later start reads it back, so volumes keep reaching their workers when the hostname
    changes (a container gets a new one at every start; docs/deployment.md, "Routing").
    ``persist=False`` (admin commands) reads the file but never creates it."""
    if configured:
        return configured
    path = Path(data_dir) / HOST_NAME_FILE
    try:
        return _persisted_name(path)
    except FileNotFoundError:
        pass
    name = socket.gethostname()
    if not persist:
        return name
    # Atomic: written whole under a private name, then linked into place. link() never
    # replaces, so of two processes starting at once on one data dir, the first one's
    # name is the one both use.
    tmp = path.with_name(f".{HOST_NAME_FILE}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, f"{name}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the link itself survives a power loss
    finally:
        os.close(dir_fd)
    return _persisted_name(path)


def _persisted_name(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not text or any(c in text for c in "@# \t\n"):
        raise ValueError(
            f"{path} holds {text!r}, not a host name (no '@', '#' or spaces). Put this "
            "host's name there, or set host_name; volumes made under another name move "
            "with 'blockvault volume update-host'.")
    return text


def same_file(st: os.stat_result, info: dict[str, Any]) -> bool:
    """Whether ``st`` is the file recorded in ``info`` (device and inode)."""
    return st.st_dev == info.get("dev") and st.st_ino == info.get("ino")


__all__ = [
    "DEFAULT_BACKEND", "DRIVERS", "HOST_NAME_FILE", "Backends", "BackupSource", "Candidate",
    "Disk", "InvalidReference", "Managed", "Parent", "RawDriver", "RestoreTarget", "SourceError",
    "VolumeDriver", "driver_class", "resolve_host_name", "same_file"
]
