"""Volumes and snapshots: what backups read from and restore into.

Volumes are created synchronously (a sparse file is instant), so ``creating`` is only
ever seen inside the transaction that makes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from blockvault.db.models import Backup, Snapshot, Volume, utcnow
from blockvault.db.session import Database
from blockvault.service.context import RequestContext
from blockvault.service.errors import Conflict, Invalid, NotFound, invalid_input, invalid_volume
from blockvault.service.listing import ListSpec, Page, list_resources
from blockvault.service.quotas import Quotas
from blockvault.volume import CapacityError, RawFileDriver
from blockvault.volume.backends import (
    Backends,
    Candidate,
    Disk,
    InvalidReference,
    SourceError,
    VolumeDriver,
)

GiB = 1024**3
#: Cinder's DB_MAX_INT: the largest size (GiB) its schemas accept and its columns hold.
DB_MAX_INT = 2147483647

#: The one volume type, as Cinder names its default type.
DEFAULT_VOLUME_TYPE = "__DEFAULT__"
DEFAULT_VOLUME_TYPE_ID = "e53eb586-12c6-5cbe-b26d-d3f849618c8b"

VOLUME_LIST = ListSpec(
    Volume,
    ("name", "status", "metadata", "bootable", "availability_zone", "volume_type"),
    {"name": "display_name", "description": "display_description"},
    "Volume",
)
SNAPSHOT_LIST = ListSpec(
    Snapshot,
    ("name", "status", "volume_id", "metadata", "availability_zone"),
    {"name": "display_name", "description": "display_description"},
    "Snapshot",
)


_NOT_DELETABLE = (
    "Volume status must be available or error or error_restoring or error_extending or "
    "error_managing and must not be migrating, attached, belong to a group, have snapshots or "
    "be disassociated from snapshots after volume transfer."
)


def visible_volume(s: Session, ctx: RequestContext, volume_id: str, lock: bool = False) -> Volume:
    stmt = select(Volume).where(Volume.id == volume_id, Volume.deleted.is_(False))
    if not ctx.is_admin:
        stmt = stmt.where(Volume.project_id == ctx.project_id)
    if lock:
        stmt = stmt.with_for_update()
    vol = s.scalars(stmt).first()
    if vol is None:
        raise NotFound(f"Volume {volume_id} could not be found.")
    return vol


def visible_snapshot(s: Session, ctx: RequestContext, snapshot_id: str,
                     lock: bool = True) -> Snapshot:
    stmt = select(Snapshot).where(Snapshot.id == snapshot_id, Snapshot.deleted.is_(False))
    if not ctx.is_admin:
        stmt = stmt.where(Snapshot.project_id == ctx.project_id)
    if lock:  # a read-only transaction may not lock (PostgreSQL refuses FOR UPDATE there)
        stmt = stmt.with_for_update()
    snap = s.scalars(stmt).first()
    if snap is None:
        raise NotFound(f"Snapshot {snapshot_id} could not be found.")
    return snap


def check_size(size: Any, field: str = "size") -> int:
    """A volume size in GiB as Cinder's ``volume_size`` schema takes it: an integer
    1..DB_MAX_INT (a larger one could not even be stored in Cinder's column)."""
    try:
        shown = str(size)
    except ValueError:  # an int past Python's 4300-digit conversion limit
        shown = "a number of more than 4300 digits"
    shown = shown if len(shown) <= 40 else shown[:40] + "..."
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise invalid_input(f"Volume size '{shown}' must be an integer and greater than 0.")
    if size > DB_MAX_INT:
        raise Invalid(
            f"Invalid input for field/attribute {field}. Value: {shown}. {shown} is greater "
            f"than the maximum of {DB_MAX_INT}"
        )
    return size


def too_large(exc: CapacityError) -> Invalid:
    """The answer when the backend's filesystem cannot hold a volume that large (400, like
    any other size the service cannot honour; the system's reason, never a path)."""
    return invalid_input(
        f"A volume of {exc.size_gib} GiB is larger than the volume backend can hold "
        f"({exc.reason})."
    )


def disk_of(vol: Volume) -> Disk:
    """What a volume driver knows of ``vol`` (blockvault.volume.backends)."""
    return Disk(
        volume_id=vol.id, size=vol.size * GiB, location=vol.provider_location,
        info=dict(vol.provider_info or {}), metadata=dict(vol.metadata_ or {}),
        owned=vol.owns_disk is not False,
    )


def as_backends(volumes: Backends | RawFileDriver) -> Backends:
    """``volumes`` as a registry (a bare RawFileDriver: the embedded default alone)."""
    return volumes if isinstance(volumes, Backends) else Backends.of_files(volumes)


def set_volume_status(s: Session, volume_id: str, expected: Iterable[str], **values: Any) -> bool:
    """One conditional UPDATE: change the row only if its status is one of ``expected``."""
    res = s.execute(
        update(Volume)
        .where(Volume.id == volume_id, Volume.status.in_(list(expected)))
        .values(updated_at=utcnow(), **values)
    )
    return res.rowcount == 1


class VolumeService:
    def __init__(
        self, db: Database, backends: Backends | RawFileDriver, quotas: Quotas,
        availability_zone: str, max_limit: int,
    ) -> None:
        self.db = db
        self.backends = as_backends(backends)
        #: the default backend's raw files: new volumes, their snapshots, the data API
        self.driver = self.backends.raw.files
        self.quotas = quotas
        self.availability_zone = availability_zone
        self.max_limit = max_limit

    # -- volumes --------------------------------------------------------------------------

    def create(
        self,
        ctx: RequestContext,
        size: int,
        name: str | None = None,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
        availability_zone: str | None = None,
        volume_type: str | None = None,
        snapshot_id: str | None = None,
        source_volid: str | None = None,
    ) -> Volume:
        ctx.authorize("volume:create")  # first, as Cinder: on the caller's own project
        self.check_placement(volume_type, availability_zone)
        with self.new_files() as made, self.db.session() as s:
            src_path = None
            if snapshot_id:
                snap = visible_snapshot(s, ctx, snapshot_id)
                ctx.authorize("volume:get_snapshot", snap)  # Cinder's get_snapshot on it
                if snap.status != "available":
                    raise invalid_input(f"Snapshot {snapshot_id} must be available.")
                size = size or snap.size
                if size < snap.size:
                    raise invalid_input("Volume size must not be smaller than the snapshot size.")
                src_path = self.driver.snapshot_path(snap.id)
            if source_volid:
                src = visible_volume(s, ctx, source_volid)
                ctx.authorize("volume:get", src)  # Cinder's get_volume on it
                if src.status not in ("available", "in-use"):
                    raise invalid_volume("Source volume must be available or in-use.")
                size = size or src.size
                if size < src.size:
                    raise invalid_input("Volume size must not be smaller than the source volume.")
                src_path = self.source_path(src)
            return self.new_volume(
                s, made, ctx, size, name=name, description=description, metadata=metadata,
                snapshot_id=snapshot_id, source_volid=source_volid, src_path=src_path,
            )

    def check_placement(self, volume_type: str | None, availability_zone: str | None) -> None:
        """The one volume type and the one zone this service has."""
        if volume_type not in (None, DEFAULT_VOLUME_TYPE, DEFAULT_VOLUME_TYPE_ID):
            raise NotFound(f"Volume type with name {volume_type} could not be found.")
        if availability_zone and availability_zone != self.availability_zone:
            raise invalid_input(f"Availability zone '{availability_zone}' is invalid.")

    @contextmanager
    def new_files(self) -> Iterator[list[str]]:
        """Volume files made by :meth:`new_volume` inside a transaction; enter this before
        the transaction's session, so that if it does not commit (a later check fails, the
        commit itself fails) the files go too and nothing is left behind."""
        made: list[str] = []
        try:
            yield made
        except BaseException:
            for volume_id in made:
                self.driver.delete(volume_id)
            raise

    def new_volume(
        self,
        s: Session,
        made: list[str],
        ctx: RequestContext,
        size: Any,
        *,
        name: str | None = None,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
        snapshot_id: str | None = None,
        source_volid: str | None = None,
        src_path: Any = None,
    ) -> Volume:
        """An ``available`` volume inside the caller's transaction ``s``: quota checked, row
        added, file made (its id appended to ``made``, see :meth:`new_files`)."""
        vol = self._new_row(s, ctx, check_size(size), name, description, metadata,
                            status="creating", snapshot_id=snapshot_id,
                            source_volid=source_volid, backend=self.backends.default,
                            host=self.backends.backend_host(self.backends.default),
                            owns_disk=True)
        s.flush()
        try:
            if src_path is None:
                self.driver.create(vol.id, size)
            else:
                self.driver.create_from(vol.id, size, src_path)
        except CapacityError as exc:
            raise too_large(exc) from None  # the driver left no file; the row rolls back
        made.append(vol.id)
        vol.status = "available"
        vol.updated_at = utcnow()
        return vol

    def raw_only(self, vol: Volume, what: str) -> None:
        """Refuse what only blockvault's own raw files can do on a managed disk."""
        if (vol.backend or self.backends.default) != self.backends.default:
            kind = self.backends.drivers.get(vol.backend or "")
            raise invalid_volume(
                f"Volume {vol.id} is on backend {vol.backend}"
                f"{f' (driver {kind.kind})' if kind else ''}, whose disks blockvault does "
                f"not own: it cannot be {what}."
            )

    def source_path(self, vol: Volume) -> Any:
        """A path to ``vol``'s bytes, to copy a new volume from."""
        if (vol.backend or self.backends.default) == self.backends.default:
            return self.driver.volume_path(vol.id)
        try:
            with self.backends.get(vol.backend).open_backup(disk_of(vol), None) as src:
                if isinstance(src.source, str | Path):
                    return src.source
        except SourceError as exc:
            raise invalid_volume(str(exc)) from None
        raise invalid_volume(f"Volume {vol.id} (backend {vol.backend}) cannot be cloned.")

    # -- backends: manage existing, pools (Cinder's manageable_volumes, get_pools) --------

    def backend_of(self, host: Any) -> VolumeDriver:
        try:
            return self.backends.parse_host(host)
        except InvalidReference as exc:
            raise invalid_input(str(exc)) from None

    def manage(
        self, ctx: RequestContext, host: Any, ref: Any, *, name: str | None = None,
        description: str | None = None, metadata: dict[str, str] | None = None,
        bootable: bool = False, availability_zone: str | None = None,
        volume_type: str | None = None,
    ) -> Volume:
        """Bring an existing disk under blockvault: an ``available`` volume whose size is
        the disk's. The disk is examined, never changed; any problem is a 400 naming it."""
        ctx.authorize("volume_extension:volume_manage")
        self.check_placement(volume_type, availability_zone)
        backend = self.backend_of(host)
        try:
            found = backend.check_ref(ref if isinstance(ref, dict) else {},
                                      dict(metadata or {}))
        except InvalidReference as exc:
            raise invalid_input(str(exc)) from None
        size = check_size(found.size // GiB)
        try:
            return self._add_managed(ctx, backend, found, ref, size, name=name,
                                     description=description, metadata=metadata,
                                     bootable=bootable)
        except IntegrityError:
            # another request managed it between our check and our insert
            raise invalid_input(
                f"Source {ref.get('source-name')} is already managed by another volume."
            ) from None

    def _add_managed(
        self, ctx: RequestContext, backend: VolumeDriver, found: Any, ref: dict, size: int,
        *, name: str | None, description: str | None, metadata: dict[str, str] | None,
        bootable: bool,
    ) -> Volume:
        with self.db.session() as s:
            other = s.scalar(
                select(Volume.id).where(
                    Volume.backend == backend.name,
                    Volume.provider_location == found.location,
                    Volume.deleted.is_(False),
                )
            )
            if other:
                raise invalid_input(
                    f"Source {ref.get('source-name')} is already managed by volume {other}."
                )
            vol = self._new_row(s, ctx, size, name, description, metadata,
                                status="available", bootable=bool(bootable),
                                backend=backend.name, host=self.backends.backend_host(
                                    backend.name), provider_location=found.location,
                                provider_info=dict(found.info), owns_disk=False,
                                updated_at=utcnow())
        return vol

    def _new_row(self, s: Session, ctx: RequestContext, size: int, name: str | None,
                 description: str | None, metadata: dict[str, str] | None,
                 **fields: Any) -> Volume:
        """A volume row of the caller's project, added to ``s`` once its size fits the
        project's quota; ``fields`` are what differs between a new disk and a managed one."""
        self.quotas.check_volume(s, ctx.project_id, size)
        vol = Volume(
            project_id=ctx.project_id, user_id=ctx.user_id, size=size,
            display_name=name, display_description=description,
            metadata_=dict(metadata or {}), availability_zone=self.availability_zone,
            volume_type=DEFAULT_VOLUME_TYPE, **fields,
        )
        s.add(vol)
        return vol

    def unmanage(self, ctx: RequestContext, volume_id: str) -> None:
        """The volume leaves blockvault; its disk is left exactly as it is (Cinder's
        os-unmanage, with delete's status rules). Its backups stay."""
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume_extension:volume_unmanage", vol)
            snaps = s.scalar(
                select(Snapshot.id).where(
                    Snapshot.volume_id == volume_id, Snapshot.deleted.is_(False)
                )
            )
            if vol.status not in ("available", "error", "error_restoring") or snaps:
                raise invalid_volume(_NOT_DELETABLE)
            vol.deleted, vol.deleted_at, vol.status = True, utcnow(), "deleted"

    def list_manageable(self, ctx: RequestContext, host: Any) -> list[tuple[Candidate, str | None]]:
        """The candidate disks of a backend, with the id of the volume managing each."""
        ctx.authorize("volume_extension:list_manageable")
        if not host:
            raise invalid_input("Missing required host parameter (HOST@BACKEND#POOL).")
        backend = self.backend_of(host)
        with self.db.reader() as s:
            managed = dict(
                s.execute(
                    select(Volume.provider_location, Volume.id).where(
                        Volume.backend == backend.name, Volume.deleted.is_(False),
                        Volume.provider_location.is_not(None),
                    )
                ).all()
            )
        return [(c, managed.get(c.location)) for c in backend.manageable(set(managed))]

    def pools(self, ctx: RequestContext) -> list[tuple[str, dict[str, Any]]]:
        """Each backend's one pool as Cinder's get_pools shows it: name and capabilities."""
        ctx.authorize("scheduler_extension:scheduler_stats:get_pools")
        with self.db.reader() as s:
            allocated = dict(
                s.execute(
                    select(Volume.backend, func.coalesce(func.sum(Volume.size), 0))
                    .where(Volume.deleted.is_(False))
                    .group_by(Volume.backend)
                ).all()
            )
        if None in allocated:
            allocated[self.backends.default] = (
                allocated.get(self.backends.default, 0) + allocated.pop(None)
            )
        out = []
        for backend in self.backends:
            caps: dict[str, Any] = {
                "pool_name": backend.pool,
                "volume_backend_name": backend.name,
                "driver": backend.kind,
                "vendor_name": "blockvault",
                "driver_version": "1.0",
                "storage_protocol": backend.kind,
                "reserved_percentage": 0,
                "QoS_support": False,
                "multiattach": False,
                "allocated_capacity_gb": int(allocated.get(backend.name, 0)),
                "timestamp": utcnow().isoformat(),
            }
            try:
                caps.update(backend.stats())
            except OSError:
                caps.update(total_capacity_gb="unknown", free_capacity_gb="unknown")
            caps.update(backend.capabilities())
            out.append((self.backends.host(backend.name), caps))
        return out

    def host_of(self, vol: Volume) -> str:
        return self.backends.host(vol.backend, vol.host)

    def route_of(self, vol: Volume) -> str:
        """``HOST@BACKEND`` of a volume: which workers may run its backups and restores."""
        return self.backends.route(vol.backend, vol.host)

    def get(self, ctx: RequestContext, volume_id: str, rule: str = "volume:get") -> Volume:
        with self.db.reader() as s:
            vol = visible_volume(s, ctx, volume_id)
            ctx.authorize(rule, vol)
            return vol

    def list(self, ctx: RequestContext, params: dict[str, str], version: tuple[int, int]) -> Page:
        ctx.authorize("volume:get_all")
        with self.db.reader() as s:
            return list_resources(s, ctx, VOLUME_LIST, params, version, self.max_limit)

    def update(self, ctx: RequestContext, volume_id: str, changes: dict[str, Any]) -> Volume:
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume:update", vol)
            for key, value in changes.items():
                setattr(vol, key, value)
            vol.updated_at = utcnow()
        return vol

    def delete(self, ctx: RequestContext, volume_id: str, cascade: bool = False) -> None:
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume:delete", vol)
            snaps = list(
                s.scalars(
                    select(Snapshot).where(
                        Snapshot.volume_id == volume_id, Snapshot.deleted.is_(False)
                    )
                )
            )
            deletable = ("available", "error", "error_restoring", "error_extending")
            if vol.status not in deletable or (snaps and not cascade):
                raise invalid_volume(_NOT_DELETABLE)
            # Cascade takes the snapshots only if each could be deleted on its own (Cinder's
            # volume_has_undeletable_snapshots_filter): one being backed up, or in any other
            # status but available/error, keeps the volume, so no backup loses its source.
            if any(snap.status not in ("available", "error") for snap in snaps) or (
                snaps and s.scalar(
                    select(Backup.id).where(
                        Backup.snapshot_id.in_([snap.id for snap in snaps]),
                        Backup.status == "creating",
                        Backup.deleted.is_(False),
                    )
                )
            ):
                raise invalid_volume(_NOT_DELETABLE)
            now = utcnow()
            for snap in snaps:
                snap.deleted, snap.deleted_at, snap.status = True, now, "deleted"
                self.driver.delete_snapshot(snap.id)
            vol.deleted, vol.deleted_at, vol.status = True, now, "deleted"
            disk, backend = disk_of(vol), vol.backend
        if disk.owned:  # a managed disk is never deleted, only forgotten
            self.backends.get(backend).delete(disk)

    def attach(self, ctx: RequestContext, volume_id: str) -> None:
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume_extension:volume_actions:attach", vol)
            if vol.status != "available":
                raise invalid_volume("status must be available")
            vol.status, vol.attach_status, vol.updated_at = "in-use", "attached", utcnow()

    def detach(self, ctx: RequestContext, volume_id: str) -> None:
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume_extension:volume_actions:detach", vol)
            if vol.status != "in-use":
                raise invalid_volume("Unable to detach volume. Volume status must be 'in-use'.")
            vol.status, vol.attach_status, vol.updated_at = "available", "detached", utcnow()

    def extend(self, ctx: RequestContext, volume_id: str, new_size: Any) -> None:
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume:extend", vol)
            if vol.status != "available":
                raise invalid_volume(
                    f"Volume {volume_id} status must be available or in-use, but current "
                    f"status is: {vol.status}."
                )
            if not isinstance(new_size, int) or isinstance(new_size, bool) or new_size <= vol.size:
                raise invalid_input(
                    f"New size for extend must be greater than current size. (current: "
                    f"{vol.size}, extended: {new_size})."
                )
            check_size(new_size, "new_size")
            self.raw_only(vol, "extended")
            self.quotas.check_extend(s, ctx.project_id, new_size - vol.size, new_size)
            try:
                self.driver.extend(vol.id, new_size)
            except CapacityError as exc:
                raise too_large(exc) from None  # file unchanged; the transaction rolls back
            vol.size, vol.updated_at = new_size, utcnow()

    def reset_status(self, ctx: RequestContext, volume_id: str, status: str) -> None:
        with self.db.session() as s:
            # Lookup before policy, as Cinder: another project's id is 404 to a non-admin,
            # exactly like an id that does not exist, so the 403 cannot reveal it.
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume_extension:volume_admin_actions:reset_status", vol)
            vol.status, vol.updated_at = status, utcnow()

    # -- volume metadata (Cinder's volume_metadata API) ------------------------------------
    # As Cinder: the volume is looked up (another project's is 404) and ``volume:get``
    # checked, then the metadata rule; changes are refused while the volume is uploading
    # (blockvault: a data write runs) or in maintenance. Metadata counts against no quota.

    def get_metadata(self, ctx: RequestContext, volume_id: str) -> dict[str, str]:
        with self.db.reader() as s:
            vol = visible_volume(s, ctx, volume_id)
            ctx.authorize("volume:get", vol)
            ctx.authorize("volume:get_volume_metadata", vol)
            return dict(vol.metadata_ or {})

    def create_metadata(
        self, ctx: RequestContext, volume_id: str, metadata: dict[str, str]
    ) -> dict[str, str]:
        """Merge ``metadata`` into the volume's (Cinder's create_volume_metadata)."""
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume:get", vol)
            ctx.authorize("volume:create_volume_metadata", vol)
            return _write_metadata(vol, {**(vol.metadata_ or {}), **metadata})

    def update_metadata(
        self, ctx: RequestContext, volume_id: str, metadata: dict[str, str],
        replace: bool = False,
    ) -> dict[str, str]:
        """Merge ``metadata`` into the volume's, or with ``replace`` make it the whole of
        it (Cinder's update_volume_metadata, ``delete=True``)."""
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume:get", vol)
            ctx.authorize("volume:update_volume_metadata", vol)
            new = dict(metadata) if replace else {**(vol.metadata_ or {}), **metadata}
            return _write_metadata(vol, new)

    def delete_metadata(self, ctx: RequestContext, volume_id: str, key: str) -> None:
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id, lock=True)
            # Cinder reads the metadata first (get rule), so an absent key is 404 even to
            # a caller the delete rule refuses.
            ctx.authorize("volume:get", vol)
            ctx.authorize("volume:get_volume_metadata", vol)
            current = dict(vol.metadata_ or {})
            if key not in current:
                raise metadata_not_found(volume_id, key)
            ctx.authorize("volume:delete_volume_metadata", vol)
            if vol.status in _METADATA_FROZEN:
                raise invalid_volume(
                    f"Deleting volume metadata is not allowed for volumes in {vol.status} "
                    "status."
                )
            del current[key]
            vol.metadata_ = current

    # -- volume data (blockvault extension) ---------------------------------------------

    def write_data(
        self, ctx: RequestContext, volume_id: str, offset: int, length: int | None,
        chunks: Iterable[bytes],
    ) -> int:
        """Write bytes into an ``available`` volume at ``offset``.

        The volume is ``uploading`` while the write runs (one conditional UPDATE), so a
        backup can never start halfway through a write, nor two writes interleave.
        """
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id)
            ctx.authorize("blockvault:volume:write_data", vol)
            size = vol.size * GiB
            if offset < 0 or offset > size or (length is not None and offset + length > size):
                raise invalid_input(
                    f"Write of {length if length is not None else 'unknown'} bytes at offset "
                    f"{offset} is past the end of volume {volume_id} ({size} bytes)."
                )
            self.raw_only(vol, "written through the data API")
            if not set_volume_status(s, volume_id, ("available",), status="uploading"):
                raise Conflict(
                    f"Volume {volume_id} must be available to write data, but its status is "
                    f"{vol.status}."
                )
        try:
            if length is not None:
                # Checked up front above; the bound only guards a body longer than declared.
                return self.driver.write(
                    volume_id, offset, _bounded(chunks, size - offset, volume_id)
                )
            # No length (chunked transfer): the end is known only when the stream reaches
            # it. The chunk that would pass the volume's end is refused unwritten, and the
            # ones before it are rolled back, so a refused write changes no byte.
            return self.driver.write(
                volume_id, offset, _bounded(chunks, size - offset, volume_id), atomic=True
            )
        finally:
            with self.db.session() as s:
                set_volume_status(s, volume_id, ("uploading",), status="available")

    def read_data(
        self, ctx: RequestContext, volume_id: str,
        choose: Callable[[int], tuple[int, int]] = lambda size: (0, size),
    ) -> tuple[int, int, int, Iterator[bytes]]:
        """Returns (start, end exclusive, volume size in bytes, chunks). ``choose`` picks
        the byte range from the volume's size (or raises, e.g. for an unsatisfiable one)."""
        vol = self.get(ctx, volume_id, rule="blockvault:volume:read_data")
        self.raw_only(vol, "read through the data API")
        size = vol.size * GiB
        start, end = choose(size)
        if start < 0 or end > size or end < start:
            raise Invalid(f"Range {start}-{end} is outside volume {volume_id} ({size} bytes).")
        return start, end, size, self.driver.read(volume_id, start, end)

    # -- snapshots ------------------------------------------------------------------------

    def create_snapshot(
        self, ctx: RequestContext, volume_id: str, name: str | None, description: str | None,
        force: bool = False, metadata: dict[str, str] | None = None,
    ) -> Snapshot:
        with self.db.session() as s:
            vol = visible_volume(s, ctx, volume_id, lock=True)
            ctx.authorize("volume:create_snapshot", vol)
            if vol.status not in ("available", "in-use") or (vol.status == "in-use" and not force):
                raise invalid_volume(
                    f"Volume {volume_id} status must be available, but current status is: "
                    f"{vol.status}."
                )
            self.raw_only(vol, "snapshotted")
            self.quotas.check_snapshot(s, ctx.project_id, vol.size)
            snap = Snapshot(
                project_id=ctx.project_id,
                user_id=ctx.user_id,
                volume_id=volume_id,
                size=vol.size,
                display_name=name,
                display_description=description,
                metadata_=dict(metadata or {}),
                status="creating",
            )
            s.add(snap)
            s.flush()
            self.driver.snapshot(volume_id, snap.id)
            snap.status = "available"
            snap.updated_at = utcnow()
        return snap

    def get_snapshot(self, ctx: RequestContext, snapshot_id: str) -> Snapshot:
        with self.db.reader() as s:
            snap = visible_snapshot(s, ctx, snapshot_id, lock=False)
            ctx.authorize("volume:get_snapshot", snap)
            return snap

    def list_snapshots(
        self, ctx: RequestContext, params: dict[str, str], version: tuple[int, int]
    ) -> Page:
        ctx.authorize("volume:get_all_snapshots")
        with self.db.reader() as s:
            return list_resources(s, ctx, SNAPSHOT_LIST, params, version, self.max_limit)

    def update_snapshot(self, ctx: RequestContext, snapshot_id: str, changes: dict) -> Snapshot:
        with self.db.session() as s:
            snap = visible_snapshot(s, ctx, snapshot_id)
            ctx.authorize("volume:update_snapshot", snap)
            for key, value in changes.items():
                setattr(snap, key, value)
            snap.updated_at = utcnow()
        return snap

    def delete_snapshot(self, ctx: RequestContext, snapshot_id: str) -> None:
        with self.db.session() as s:
            snap = visible_snapshot(s, ctx, snapshot_id)
            ctx.authorize("volume:delete_snapshot", snap)
            if snap.status not in ("available", "error"):
                raise Invalid(
                    f"Invalid snapshot: Volume Snapshot status must be available or error, "
                    f"but current status is: {snap.status}."
                )
            running = s.scalar(
                select(Backup.id).where(
                    Backup.snapshot_id == snapshot_id, Backup.status == "creating"
                )
            )
            if running:
                raise Invalid("Invalid snapshot: a backup of this snapshot is running.")
            snap.status, snap.deleted, snap.deleted_at = "deleted", True, utcnow()
        self.driver.delete_snapshot(snapshot_id)


#: Cinder refuses metadata changes in these statuses (blockvault's data writes are
#: ``uploading``; ``maintenance`` is reachable through os-reset_status).
_METADATA_FROZEN = ("maintenance", "uploading")


def metadata_not_found(volume_id: str, key: str) -> NotFound:
    return NotFound(f"Volume {volume_id} has no metadata with key {key}.")


def _write_metadata(vol: Volume, new: dict[str, str]) -> dict[str, str]:
    if vol.status in _METADATA_FROZEN:
        raise invalid_volume(
            f"Updating volume metadata is not allowed for volumes in {vol.status} status."
        )
    vol.metadata_ = new  # a new dict: the JSON column notices assignment, not mutation
    return dict(new)


def _bounded(chunks: Iterable[bytes], limit: int, volume_id: str) -> Iterator[bytes]:
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise invalid_input(f"Data written is past the end of volume {volume_id}.")
        yield chunk

