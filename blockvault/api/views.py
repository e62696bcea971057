"""JSON views of volumes, snapshots and backups, with Cinder's keys and links."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from blockvault.db.models import Backup, Snapshot, Volume
from blockvault.service.volumes import DEFAULT_VOLUME_TYPE, DEFAULT_VOLUME_TYPE_ID
from blockvault.volume.backends import Candidate


def isotime(value: dt.datetime | None) -> str | None:
    """Cinder's ``%Y-%m-%dT%H:%M:%S.%f`` (microseconds always, no zone), by isoformat: the
    same string at a third of strftime's cost, three times per listed item."""
    if value is None:
        return None
    if value.tzinfo is not None:  # the database's are naive UTC already
        value = value.replace(tzinfo=None)
    return value.isoformat("T", "microseconds")


@dataclass(frozen=True)
class Links:
    """Builds self/bookmark/next links the way Cinder does (reference §3.1, §6.3)."""

    base: str  # scheme://host[:port][/prefix], no trailing slash
    api: str  # "v2" or "v3"
    project_id: str | None  # present only if the request URL carried it
    _prefix_cache: dict[str, tuple[str, str]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def _path(self, collection: str, *rest: str, versioned: bool = True) -> str:
        parts = [self.base]
        if versioned:
            parts.append(self.api)
        if self.project_id:
            parts.append(self.project_id)
        parts.append(collection)
        parts.extend(rest)
        return "/".join(parts)

    def resource(self, collection: str, item_id: str) -> list[dict[str, str]]:
        versioned, bookmark = self._prefixes(collection)
        return [
            {"href": f"{versioned}/{item_id}", "rel": "self"},
            {"href": f"{bookmark}/{item_id}", "rel": "bookmark"},
        ]

    def _prefixes(self, collection: str) -> tuple[str, str]:
        """The self and bookmark links of ``collection`` without the id: built once for
        the thousand items of a page, not twice per item."""
        found = self._prefix_cache.get(collection)
        if found is None:
            found = (self._path(collection), self._path(collection, versioned=False))
            self._prefix_cache[collection] = found
        return found

    def next(self, collection: str, detail: bool, params: dict[str, str], marker: str) -> dict:
        query = {k: v for k, v in params.items() if k != "marker"}
        query["marker"] = marker
        path = self._path(collection, "detail") if detail else self._path(collection)
        return {"rel": "next", "href": f"{path}?{urlencode(query)}"}


# -- backups ----------------------------------------------------------------------------------


def backup_summary(b: Backup, links: Links) -> dict[str, Any]:
    return {"id": b.id, "name": b.display_name, "links": links.resource("backups", b.id)}


def backup_detail(
    b: Backup, links: Links, version: tuple[int, int], is_admin: bool
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": b.id,
        "status": b.status,
        "size": b.size,
        "object_count": b.object_count or 0,
        "availability_zone": b.availability_zone,
        "container": b.container,
        "created_at": isotime(b.created_at),
        "updated_at": isotime(b.updated_at),
        "name": b.display_name,
        "description": b.display_description,
        "fail_reason": b.fail_reason,
        "volume_id": b.volume_id,
        "links": links.resource("backups", b.id),
        "is_incremental": bool(b.parent_id),
        "has_dependent_backups": (b.num_dependent_backups or 0) > 0,
        "snapshot_id": b.snapshot_id,
        "data_timestamp": isotime(b.data_timestamp),
    }
    if version >= (3, 18) and is_admin:
        view["os-backup-project-attr:project_id"] = b.project_id
    if version >= (3, 43):
        view["metadata"] = dict(b.metadata_ or {})
    if version >= (3, 56) and is_admin:
        view["user_id"] = b.user_id
    if (
        version >= (3, 64)
        and b.encryption_key_id
        and b.encryption_key_id != "00000000-0000-0000-0000-000000000000"
    ):
        view["encryption_key_id"] = b.encryption_key_id
    return view


# -- volumes ----------------------------------------------------------------------------------


def volume_summary(v: Volume, links: Links) -> dict[str, Any]:
    return {"id": v.id, "name": v.display_name, "links": links.resource("volumes", v.id)}


def volume_detail(
    v: Volume, links: Links, version: tuple[int, int], is_admin: bool,
    extended: bool = True, host: str | None = None,
) -> dict[str, Any]:
    """A volume as Cinder shows it. ``extended``: with the admin-only attributes of Cinder's
    tenant, host and migration-status extensions, which extend show and the detail list only
    (not create or update; Tempest's schemas refuse them there)."""
    view: dict[str, Any] = {
        "id": v.id,
        "name": v.display_name,
        "description": v.display_description,
        "size": v.size,
        "status": v.status,
        "availability_zone": v.availability_zone,
        "created_at": isotime(v.created_at),
        "updated_at": isotime(v.updated_at),
        "attachments": [],
        "links": links.resource("volumes", v.id),
        "metadata": dict(v.metadata_ or {}),
        "bootable": "true" if v.bootable else "false",
        "encrypted": False,
        "multiattach": False,
        "replication_status": None,
        "consistencygroup_id": None,
        "source_volid": v.source_volid,
        "snapshot_id": v.snapshot_id,
        "volume_type": v.volume_type,
        "user_id": v.user_id,
        "migration_status": None,
    }
    if is_admin and extended:
        view["os-vol-tenant-attr:tenant_id"] = v.project_id
        view["os-vol-host-attr:host"] = host
        view["os-vol-mig-status-attr:migstat"] = None
        view["os-vol-mig-status-attr:name_id"] = None
    if version >= (3, 13):
        view["group_id"] = None
    if version >= (3, 21):
        view["provider_id"] = None
    if version >= (3, 48):
        view["shared_targets"] = False
        view["service_uuid"] = None
    if version >= (3, 63):
        view["volume_type_id"] = (
            DEFAULT_VOLUME_TYPE_ID if v.volume_type == DEFAULT_VOLUME_TYPE else None
        )
    if version >= (3, 65):
        view["consumes_quota"] = True
    return view


def manageable_volume(c: Candidate, volume_id: str | None, detail: bool) -> dict[str, Any]:
    """One entry of Cinder's ``manageable-volumes`` list."""
    view: dict[str, Any] = {"reference": dict(c.reference), "size": c.size,
                            "safe_to_manage": c.safe_to_manage}
    if detail:
        view.update(reason_not_safe=c.reason_not_safe, cinder_id=volume_id,
                    extra_info=c.extra_info)
    return view


def pool_view(name: str, capabilities: dict[str, Any], detail: bool) -> dict[str, Any]:
    """One entry of Cinder's get_pools: ``name`` (HOST@BACKEND#POOL) and, in detail, its
    capabilities."""
    view: dict[str, Any] = {"name": name}
    if detail:
        view["capabilities"] = dict(capabilities)
    return view


# -- volume types -----------------------------------------------------------------------------

#: Cinder's default volume type, the only one blockvault has. Cinder gives it a random id at
#: install time; blockvault has no type table, so its id is fixed.


def default_volume_type(is_admin: bool) -> dict[str, Any]:
    """Cinder's v3 type view: extra specs are shown (none here), ``qos_specs_id`` only to
    admins, ``os-volume-type-access:is_public`` from the type-access extension."""
    view: dict[str, Any] = {
        "id": DEFAULT_VOLUME_TYPE_ID,
        "name": DEFAULT_VOLUME_TYPE,
        "is_public": True,
        "description": "Default Volume Type",
        "extra_specs": {},
        "os-volume-type-access:is_public": True,
    }
    if is_admin:
        view["qos_specs_id"] = None
    return view


# -- snapshots --------------------------------------------------------------------------------


def snapshot_detail(
    sn: Snapshot, links: Links, version: tuple[int, int], is_admin: bool,
    extended: bool = True,
) -> dict[str, Any]:
    """A snapshot as Cinder shows it. ``extended``: with the two attributes of Cinder's
    ``os-extended-snapshot-attributes`` extension, which extends show and the detail list
    only (not create, update or the summary list; Tempest's schemas refuse them there) and
    shows the project to whoever may see the snapshot (rule ``admin_or_owner``)."""
    view: dict[str, Any] = {
        "id": sn.id,
        "name": sn.display_name,
        "description": sn.display_description,
        "volume_id": sn.volume_id,
        "size": sn.size,
        "status": sn.status,
        "created_at": isotime(sn.created_at),
        "updated_at": isotime(sn.updated_at),
        "metadata": dict(sn.metadata_ or {}),
    }
    if extended:
        view["os-extended-snapshot-attributes:progress"] = "100%"
        view["os-extended-snapshot-attributes:project_id"] = sn.project_id
    if version >= (3, 14):
        view["group_snapshot_id"] = None
    if version >= (3, 41):
        view["user_id"] = sn.user_id
    if version >= (3, 65):
        view["consumes_quota"] = True
    return view
