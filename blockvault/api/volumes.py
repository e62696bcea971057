"""Volume and snapshot routes (what backups need), the volume data extension, quotas and
limits."""

from __future__ import annotations

import re
from typing import Any

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.responses import Response, StreamingResponse

from blockvault.api import schemas
from blockvault.api.faults import HTTPFault
from blockvault.api.http import Call, Endpoint, accepted, json_response, list_response
from blockvault.api.views import (
    default_volume_type,
    manageable_volume,
    pool_view,
    snapshot_detail,
    volume_detail,
    volume_summary,
)
from blockvault.service.errors import Invalid, NotFound, invalid_input
from blockvault.service.volumes import (
    DB_MAX_INT,
    DEFAULT_VOLUME_TYPE_ID,
    check_size,
    metadata_not_found,
)

# Volume bodies are checked field by field rather than with additionalProperties=false:
# clients send many keys this service has no use for (imageRef, multiattach, ...).
_volume_create = {
    "type": "object",
    "properties": {
        "volume": {
            "type": "object",
            "properties": {
                "size": {"type": ["integer", "string", "null"]},
                "name": schemas.name,
                "display_name": schemas.name,
                "description": schemas.description,
                "display_description": schemas.description,
                "metadata": schemas.metadata_allows_null,
                "availability_zone": schemas.nullable_string,
                "volume_type": schemas.nullable_string,
                "snapshot_id": schemas.uuid_allow_null,
                "source_volid": schemas.uuid_allow_null,
                "backup_id": schemas.uuid_allow_null,
            },
        }
    },
    "required": ["volume"],
}
_volume_update = {
    "type": "object",
    "properties": {
        "volume": {
            "type": "object",
            "properties": {
                "name": schemas.name, "description": schemas.description,
                "display_name": schemas.name, "display_description": schemas.description,
                "metadata": schemas.metadata,
            },
        }
    },
    "required": ["volume"],
}
_snapshot_create = {
    "type": "object",
    "properties": {
        "snapshot": {
            "type": "object",
            "properties": {
                # null passes, as in Cinder's schema, and finds no volume: 404 (Tempest's
                # test_create_snapshot_without_passing_volume_id)
                "volume_id": schemas.uuid_allow_null,
                "name": schemas.name, "display_name": schemas.name,
                "description": schemas.description, "display_description": schemas.description,
                "force": schemas.boolean,
                "metadata": schemas.metadata_allows_null,
            },
            "required": ["volume_id"],
        }
    },
    "required": ["snapshot"],
}
_snapshot_update = {
    "type": "object",
    "properties": {
        "snapshot": {
            "type": "object",
            "properties": {"name": schemas.name, "description": schemas.description,
                           "display_name": schemas.name,
                           "display_description": schemas.description},
        }
    },
    "required": ["snapshot"],
}


def _name_changes(body: dict) -> dict[str, Any]:
    """Name and description columns from a body using either the current keys or the
    v1-era ``display_`` ones (clients still send both)."""
    changes: dict[str, Any] = {}
    for key, column in (("name", "display_name"), ("display_name", "display_name"),
                        ("description", "display_description"),
                        ("display_description", "display_description")):
        if key in body:
            changes[column] = schemas.strip(body[key])
    return changes


def _size(value: Any, field: str = "size") -> int:
    """A size as Cinder's ``volume_size`` schema takes it: an integer, or a string of
    digits, from 1 to DB_MAX_INT (2147483647) GiB."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
        if len(value) > 20:  # past any 64-bit number; int() refuses past 4300 digits
            raise Invalid(
                f"Invalid input for field/attribute {field}. Value: {_excerpt(value)}. "
                f"{_excerpt(value)} is greater than the maximum of {DB_MAX_INT}"
            )
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid_input(
            f"Volume size '{_excerpt(value)}' must be an integer and greater than 0."
        )
    return check_size(value, field)


def _bounded_int(digits: str) -> int:
    """``int(digits)``, except that a number too long to matter (Python refuses to parse
    past 4300 digits) is read as one larger than any size or offset this service holds."""
    return int(digits) if len(digits) <= 20 else 1 << 70


def _excerpt(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:40] + "..."


# -- volumes ----------------------------------------------------------------------------


def _volume(call: Call, vol, extended: bool = True) -> dict:
    return {"volume": volume_detail(vol, call.links, call.version, call.is_admin, extended,
                                    host=call.services.volumes.host_of(vol))}


def create_volume(call: Call) -> Response:
    body = call.body
    schemas.validate(_volume_create, body)
    v = body["volume"]
    size = v.get("size")
    fields = dict(
        name=schemas.strip(v.get("name", v.get("display_name"))),
        description=schemas.strip(v.get("description", v.get("display_description"))),
        metadata=v.get("metadata"),
        availability_zone=v.get("availability_zone"),
        volume_type=v.get("volume_type"),
    )
    if call.version >= (3, 47) and v.get("backup_id"):  # Cinder ignores the key below 3.47
        volume_id = call.services.backups.create_volume_from_backup(
            call.ctx, v["backup_id"], None if size is None else _size(size), **fields
        )
        vol = call.services.volumes.get(call.ctx, volume_id)  # restoring-backup until done
        return json_response(_volume(call, vol, extended=False), 202)
    if size is None and not (v.get("snapshot_id") or v.get("source_volid")):
        raise invalid_input("Volume size 'None' must be an integer and greater than 0.")
    vol = call.services.volumes.create(
        call.ctx,
        _size(size) if size is not None else 0,
        snapshot_id=v.get("snapshot_id"),
        source_volid=v.get("source_volid"),
        **fields,
    )
    return json_response(_volume(call, vol, extended=False), 202)


def list_volumes(call: Call) -> Response:
    return _list_volumes(call, False)


def list_volumes_detail(call: Call) -> Response:
    return _list_volumes(call, True)


def _list_volumes(call: Call, detail: bool) -> Response:
    page = call.services.volumes.list(call.ctx, call.query, call.version)
    if detail:
        host_of = call.services.volumes.host_of
        items = [volume_detail(v, call.links, call.version, call.is_admin, host=host_of(v))
                 for v in page.items]
    else:
        items = [volume_summary(v, call.links) for v in page.items]
    return list_response(call, "volumes", page, items, detail)


def show_volume(call: Call) -> Response:
    return json_response(_volume(call, call.services.volumes.get(call.ctx, call.path["volume_id"])))


def update_volume(call: Call) -> Response:
    body = call.body
    schemas.validate(_volume_update, body)
    v = body["volume"]
    changes = _name_changes(v)
    if "metadata" in v:
        changes["metadata_"] = dict(v["metadata"])
    vol = call.services.volumes.update(call.ctx, call.path["volume_id"], changes)
    return json_response(_volume(call, vol, extended=False))


def delete_volume(call: Call) -> Response:
    cascade = schemas.is_true(call.query.get("cascade", "false"))
    call.services.volumes.delete(call.ctx, call.path["volume_id"], cascade=cascade)
    return accepted()


#: The attach handshake steps a hypervisor drives: blockvault has no connection to set up,
#: so each is the volume's lookup (another project's is 404) and Cinder's policy check.
_HANDSHAKE = {
    "os-reserve": dict(rule="volume_extension:volume_actions:reserve"),
    "os-unreserve": dict(rule="volume_extension:volume_actions:unreserve"),
    "os-begin_detaching": dict(rule="volume_extension:volume_actions:begin_detaching"),
    "os-roll_detaching": dict(rule="volume_extension:volume_actions:roll_detaching"),
    "os-initialize_connection": dict(
        rule="volume_extension:volume_actions:initialize_connection"),
    "os-terminate_connection": dict(rule="volume_extension:volume_actions:terminate_connection"),
}


def volume_action(call: Call) -> Response:
    body = call.body
    schemas.validate(schemas.single_action, body)
    key = next(iter(body))
    volume_id = call.path["volume_id"]
    volumes = call.services.volumes
    if key == "os-attach":
        volumes.attach(call.ctx, volume_id)
    elif key == "os-detach":
        volumes.detach(call.ctx, volume_id)
    elif key == "os-extend":
        arg = body[key] if isinstance(body[key], dict) else {}
        if "new_size" not in arg:
            raise Invalid("Invalid input for field/attribute os-extend. Value: "
                          f"{body[key]}. 'new_size' is a required property")
        volumes.extend(call.ctx, volume_id, _size(arg["new_size"], "new_size"))
    elif key == "os-unmanage":
        volumes.unmanage(call.ctx, volume_id)
    elif key == "os-reset_status":
        schemas.validate(schemas.volume_reset_status, body)
        volumes.reset_status(call.ctx, volume_id, body[key]["status"])
    elif key in _HANDSHAKE:
        volumes.get(call.ctx, volume_id, **_HANDSHAKE[key])
    else:
        raise HTTPFault(
            400,
            f"There is no such action: {key}. Verify the request body and Content-Type "
            "header and try again.",
        )
    return accepted()


# -- volume metadata (Cinder's volume_metadata API) ----------------------------------------
# Cinder's schemas (cinder/api/schemas/volume_metadata.py): keys and values as a volume's
# ``metadata``; an item update carries exactly one key.

_metadata_body = {
    "type": "object",
    "properties": {"metadata": schemas.metadata},
    "required": ["metadata"],
    "additionalProperties": False,
}
_meta_item_body = {
    "type": "object",
    "properties": {"meta": {**schemas.metadata, "minProperties": 1, "maxProperties": 1}},
    "required": ["meta"],
    "additionalProperties": False,
}


def show_volume_metadata(call: Call) -> Response:
    """A volume's metadata."""
    return json_response(
        {"metadata": call.services.volumes.get_metadata(call.ctx, call.path["volume_id"])})


def create_volume_metadata(call: Call) -> Response:
    """Merge items into a volume's metadata; the answer is the whole metadata."""
    body = call.body
    schemas.validate(_metadata_body, body)
    merged = call.services.volumes.create_metadata(
        call.ctx, call.path["volume_id"], body["metadata"])
    return json_response({"metadata": merged})


def replace_volume_metadata(call: Call) -> Response:
    """Replace the whole of a volume's metadata."""
    body = call.body
    schemas.validate(_metadata_body, body)
    new = call.services.volumes.update_metadata(
        call.ctx, call.path["volume_id"], body["metadata"], replace=True)
    return json_response({"metadata": new})


def show_volume_metadata_item(call: Call) -> Response:
    """One item of a volume's metadata."""
    volume_id, key = call.path["volume_id"], call.path["key"]
    metadata = call.services.volumes.get_metadata(call.ctx, volume_id)
    if key not in metadata:
        raise metadata_not_found(volume_id, key)
    return json_response({"meta": {key: metadata[key]}})


def update_volume_metadata_item(call: Call) -> Response:
    """Set one item of a volume's metadata."""
    body = call.body
    schemas.validate(_meta_item_body, body)
    item = body["meta"]
    if call.path["key"] not in item:
        raise HTTPFault(400, "Request body and URI mismatch")
    if len(item) > 1:  # Cinder's check; its schema (maxProperties) refuses this first
        raise HTTPFault(400, "Request body contains too many items")
    call.services.volumes.update_metadata(call.ctx, call.path["volume_id"], item)
    return json_response({"meta": item})


def delete_volume_metadata_item(call: Call) -> Response:
    """Delete one item of a volume's metadata (200 with an empty body, as Cinder)."""
    call.services.volumes.delete_metadata(call.ctx, call.path["volume_id"], call.path["key"])
    return Response(status_code=200)


# -- volume backends: manage existing, pools -------------------------------------------------

_volume_manage = {
    "type": "object",
    "properties": {
        "volume": {
            "type": "object",
            "properties": {
                "host": schemas.nullable_string,
                "cluster": schemas.nullable_string,
                "ref": {"type": "object"},
                "name": schemas.name,
                "display_name": schemas.name,
                "description": schemas.description,
                "display_description": schemas.description,
                "metadata": schemas.metadata_allows_null,
                "availability_zone": schemas.nullable_string,
                "volume_type": schemas.nullable_string,
                # null too: openstacksdk (`openstack volume create --remote-source`)
                # sends "bootable": null when not given
                "bootable": {**schemas.boolean, "type": ["boolean", "string", "null"],
                             "enum": [*schemas.boolean["enum"], None]},
            },
            "required": ["ref"],
        }
    },
    "required": ["volume"],
}


def manage_volume(call: Call) -> Response:
    """Cinder's manage existing: the disk ``ref`` names on backend ``host`` becomes an
    ``available`` volume of the caller's project."""
    body = call.body
    schemas.validate(_volume_manage, body)
    v = body["volume"]
    if v.get("cluster") and not v.get("host"):
        raise invalid_input("blockvault has no clusters; give host as HOST@BACKEND#POOL.")
    vol = call.services.volumes.manage(
        call.ctx, v.get("host"), v["ref"],
        name=schemas.strip(v.get("name", v.get("display_name"))),
        description=schemas.strip(v.get("description", v.get("display_description"))),
        metadata=v.get("metadata"),
        bootable=schemas.is_true(v.get("bootable") or False),
        availability_zone=v.get("availability_zone"),
        volume_type=v.get("volume_type"),
    )
    return json_response(_volume(call, vol, extended=False), 202)


def os_volume_manage(call: Call) -> Response:
    """The same, under its older (v2) name."""
    return manage_volume(call)


def list_manageable(call: Call) -> Response:
    return _list_manageable(call, False)


def list_manageable_detail(call: Call) -> Response:
    return _list_manageable(call, True)


def _list_manageable(call: Call, detail: bool) -> Response:
    q = call.query
    if q.get("cluster") and not q.get("host"):
        raise invalid_input("blockvault has no clusters; give host as HOST@BACKEND#POOL.")
    found = call.services.volumes.list_manageable(call.ctx, q.get("host"))
    # Cinder's paging of manageable lists: sort by reference (default) or size, desc by
    # default; offset and limit.
    key = q.get("sort_key", "reference")
    direction = q.get("sort_dir", "desc")
    if "sort" in q:
        key, _, direction = q["sort"].partition(":")
        direction = direction or "desc"
    if key not in ("reference", "size") or direction not in ("asc", "desc"):
        raise invalid_input(f"Invalid sort key or direction {key}:{direction} "
                            "(keys: reference, size; directions: asc, desc).")
    found.sort(key=(lambda c: c[0].size) if key == "size"
               else (lambda c: str(c[0].reference.get("source-name"))),
               reverse=direction == "desc")
    try:
        offset = int(q.get("offset", "0"))
        limit = int(q["limit"]) if "limit" in q else None
    except ValueError:
        raise invalid_input("offset and limit must be integers.") from None
    if offset < 0 or (limit is not None and limit < 0):
        raise invalid_input("offset and limit must not be negative.")
    found = found[offset:] if limit is None else found[offset:offset + limit]
    return json_response({"manageable-volumes": [
        manageable_volume(c, volume_id, detail) for c, volume_id in found]})


def get_pools(call: Call) -> Response:
    detail = schemas.is_true(call.query.get("detail", "false"))
    pools = call.services.volumes.pools(call.ctx)
    name = call.query.get("name")
    return json_response({"pools": [pool_view(host, caps, detail) for host, caps in pools
                                    if name is None or host == name]})


# -- volume data (blockvault extension) ------------------------------------------------------

#: One byte-range-spec (``a-b``, ``a-``) or suffix-range (``-n``); a list does not match.
_RANGE_RE = re.compile(r"([0-9]*)-([0-9]*)")  # ASCII digits only, as RFC 9110


async def write_data(call: Call) -> Response:
    try:
        offset = int(call.query.get("offset", "0"))
    except ValueError:
        raise invalid_input("offset must be an integer") from None
    ctype = call.request.headers.get("content-type", "application/octet-stream")
    if ctype.split(";")[0].strip().lower() != "application/octet-stream":
        raise HTTPFault(415, "Unsupported Content-Type")
    length = call.request.headers.get("content-length")
    if length is not None and not re.fullmatch(r"[0-9]+", length.strip()):
        raise HTTPFault(400, "Content-Length must be a non-negative integer.")
    chunks = _SyncStream(call.request.stream())
    await run_in_threadpool(
        call.services.volumes.write_data, call.ctx, call.path["volume_id"], offset,
        _bounded_int(length.strip()) if length is not None else None, chunks,
    )
    return Response(status_code=204)


class _SyncStream:
    """Bridges the async request body to the driver's blocking writes (run in a thread)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream.__aiter__()
        import anyio.from_thread

        self._from_thread = anyio.from_thread

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        try:
            return self._from_thread.run(self._stream.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range (start, end exclusive) a ``Range`` header asks of ``size`` bytes, by
    RFC 9110 §14: None means "send the whole body" (no header, another unit, a header that
    does not parse, e.g. an inverted ``bytes=10-5``, or several ranges: the server may
    ignore a Range, and a multipart answer buys a volume reader nothing). An end past the
    last byte is clamped; ``bytes=-N`` is the last N bytes. A well-formed range that starts
    past the end (or ``bytes=-0``) raises 416 with ``Content-Range: bytes */SIZE``."""
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    m = _RANGE_RE.fullmatch(spec.strip(" \t"))
    if m is None:
        return None  # malformed, or a list of ranges
    first, last = m.group(1), m.group(2)
    if first:
        start = _bounded_int(first)
        if last and _bounded_int(last) < start:
            return None  # inverted: invalid, so ignored
        end = size if not last else min(_bounded_int(last) + 1, size)
        if start >= size:
            raise _unsatisfiable(header, size)
        return start, end
    if not last:
        return None  # "bytes=-"
    n = _bounded_int(last)
    if n == 0:
        raise _unsatisfiable(header, size)
    return max(0, size - n), size


def _unsatisfiable(header: str, size: int) -> HTTPFault:
    return HTTPFault(
        416, f"Range {_excerpt(header)} is not satisfiable: the volume holds {size} bytes.",
        headers={"Content-Range": f"bytes */{size}"},
    )


async def read_data(call: Call) -> Response:
    header = call.request.headers.get("range")
    chosen: list[bool] = []

    def choose(size: int) -> tuple[int, int]:
        byte_range = parse_range(header, size)
        chosen.append(byte_range is not None)
        return byte_range or (0, size)

    start, end, total, chunks = await run_in_threadpool(
        call.services.volumes.read_data, call.ctx, call.path["volume_id"], choose
    )
    headers = {"Content-Length": str(end - start), "Accept-Ranges": "bytes"}
    status = 200
    if chosen[0]:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
    return StreamingResponse(iterate_in_threadpool(chunks), status, headers=headers,
                             media_type="application/octet-stream")


# -- snapshots ---------------------------------------------------------------------------


def _snapshot(call: Call, snap, extended: bool = True) -> dict:
    return {"snapshot": snapshot_detail(snap, call.links, call.version, call.is_admin,
                                        extended)}


def create_snapshot(call: Call) -> Response:
    body = call.body
    schemas.validate(_snapshot_create, body)
    sn = body["snapshot"]
    snap = call.services.volumes.create_snapshot(
        call.ctx,
        sn["volume_id"],
        schemas.strip(sn.get("name", sn.get("display_name"))),
        schemas.strip(sn.get("description", sn.get("display_description"))),
        force=schemas.is_true(sn.get("force", False)),
        metadata=sn.get("metadata"),
    )
    return json_response(_snapshot(call, snap, extended=False), 202)


def list_snapshots(call: Call) -> Response:
    return _list_snapshots(call, False)


def list_snapshots_detail(call: Call) -> Response:
    return _list_snapshots(call, True)


def _list_snapshots(call: Call, detail: bool) -> Response:
    page = call.services.volumes.list_snapshots(call.ctx, call.query, call.version)
    items = [snapshot_detail(s, call.links, call.version, call.is_admin, detail)
             for s in page.items]
    return list_response(call, "snapshots", page, items, detail)


def show_snapshot(call: Call) -> Response:
    snap = call.services.volumes.get_snapshot(call.ctx, call.path["snapshot_id"])
    return json_response(_snapshot(call, snap))


def update_snapshot(call: Call) -> Response:
    body = call.body
    schemas.validate(_snapshot_update, body)
    sn = body["snapshot"]
    changes = _name_changes(sn)
    snap = call.services.volumes.update_snapshot(call.ctx, call.path["snapshot_id"], changes)
    return json_response(_snapshot(call, snap, extended=False))


def delete_snapshot(call: Call) -> Response:
    call.services.volumes.delete_snapshot(call.ctx, call.path["snapshot_id"])
    return accepted()


# -- quotas and limits -------------------------------------------------------------------------


def show_quotas(call: Call) -> Response:
    target = call.path["target_project_id"]
    usage = schemas.is_true(call.query.get("usage", "false"))
    limits, used = call.services.quota_view(call.ctx, target)
    if usage:
        quota_set = {k: {"limit": limits[k], "in_use": used[k], "reserved": 0, "allocated": 0}
                     for k in limits}
    else:
        quota_set = dict(limits)
    quota_set["id"] = target
    return json_response({"quota_set": quota_set})


def show_default_quotas(call: Call) -> Response:
    defaults = call.services.quota_defaults(call.ctx, call.path["target_project_id"])
    return json_response({"quota_set": {**defaults, "id": call.path["target_project_id"]}})


def update_quotas(call: Call) -> Response:
    body = call.body
    schemas.validate(schemas.quota_set, body)
    limits = call.services.set_quotas(call.ctx, call.path["target_project_id"], body["quota_set"])
    return json_response({"quota_set": limits})


def limits(call: Call) -> Response:
    limits_, used = call.services.used_limits(call.ctx)
    absolute = {
        "maxTotalVolumes": limits_["volumes"],
        "maxTotalSnapshots": limits_["snapshots"],
        "maxTotalVolumeGigabytes": limits_["gigabytes"],
        "maxTotalBackups": limits_["backups"],
        "maxTotalBackupGigabytes": limits_["backup_gigabytes"],
        "totalVolumesUsed": used["volumes"],
        "totalSnapshotsUsed": used["snapshots"],
        "totalGigabytesUsed": used["gigabytes"],
        "totalBackupsUsed": used["backups"],
        "totalBackupGigabytesUsed": used["backup_gigabytes"],
    }
    return json_response({"limits": {"rate": [], "absolute": absolute}})


# -- volume types, availability zones, extensions ---------------------------------------------


def list_types(call: Call) -> Response:
    call.ctx.authorize("volume_extension:type_get_all")
    return json_response({"volume_types": [default_volume_type(call.is_admin)]})


def show_type(call: Call) -> Response:
    call.ctx.authorize("volume_extension:type_get")
    type_id = call.path["type_id"]
    if type_id not in ("default", DEFAULT_VOLUME_TYPE_ID):
        raise NotFound(f"Volume type {type_id} could not be found.")
    return json_response({"volume_type": default_volume_type(call.is_admin)})


def availability_zones(call: Call) -> Response:
    zone = call.services.settings.availability_zone
    return json_response(
        {"availabilityZoneInfo": [{"zoneName": zone, "zoneState": {"available": True}}]}
    )


#: Cinder's extension descriptors (name, alias, description, updated) for the surfaces
#: blockvault serves; Cinder lists more, for APIs that are not here.
_EXTENSIONS = [
    ("AdminActions", "os-admin-actions", "Enable admin actions.", "2012-08-25T00:00:00+00:00"),
    ("AvailabilityZones", "os-availability-zone", "Describe Availability Zones.",
     "2013-06-27T00:00:00+00:00"),
    ("Backups", "backups", "Backups support.", "2012-12-12T00:00:00+00:00"),
    ("ExtendedSnapshotAttributes", "os-extended-snapshot-attributes",
     "Extended SnapshotAttributes support.", "2012-06-19T00:00:00+00:00"),
    ("Quotas", "os-quota-sets", "Quota management support.", "2011-08-08T00:00:00+00:00"),
    ("UsedLimits", "os-used-limits", "Provide data on limited resources that are being used.",
     "2013-10-03T00:00:00+00:00"),
    ("VolumeActions", "os-volume-actions", "Enable volume actions.",
     "2012-05-31T00:00:00+00:00"),
    ("VolumeHostAttribute", "os-vol-host-attr", "Expose host as an attribute of a volume.",
     "2011-11-03T00:00:00+00:00"),
    ("VolumeMigStatusAttribute", "os-vol-mig-status-attr",
     "Expose migration_status as an attribute of a volume.", "2013-08-08T00:00:00+00:00"),
    ("VolumeTenantAttribute", "os-vol-tenant-attr",
     "Expose the internal project_id as an attribute of a volume.",
     "2011-11-03T00:00:00+00:00"),
    ("VolumeTypeAccess", "os-volume-type-access", "Volume type access support.",
     "2014-06-26T00:00:00Z"),
]


def extensions(call: Call) -> Response:
    return json_response({"extensions": [
        {"alias": alias, "description": description, "links": [], "name": name,
         "updated": updated}
        for name, alias, description, updated in _EXTENSIONS
    ]})


def resource_filters(call: Call) -> Response:
    filters = [
        {"resource": "backup", "filters": ["name", "status", "volume_id"]},
        {"resource": "volume", "filters": ["name", "status", "metadata", "bootable",
                                           "availability_zone", "volume_type"]},
        {"resource": "snapshot", "filters": ["name", "status", "volume_id", "metadata",
                                             "availability_zone"]},
    ]
    wanted = call.query.get("resource")
    if wanted:
        filters = [f for f in filters if f["resource"] == wanted]
    return json_response({"resource_filters": filters})


ENDPOINTS = [
    Endpoint("GET", "/volumes", list_volumes, page=True),
    Endpoint("GET", "/volumes/detail", list_volumes_detail, page=True),
    Endpoint("POST", "/volumes", create_volume, body="json"),
    Endpoint("GET", "/volumes/{volume_id}", show_volume),
    Endpoint("PUT", "/volumes/{volume_id}", update_volume, body="json"),
    Endpoint("DELETE", "/volumes/{volume_id}", delete_volume),
    Endpoint("POST", "/volumes/{volume_id}/action", volume_action, body="json"),
    Endpoint("GET", "/volumes/{volume_id}/metadata", show_volume_metadata),
    Endpoint("POST", "/volumes/{volume_id}/metadata", create_volume_metadata, body="json"),
    Endpoint("PUT", "/volumes/{volume_id}/metadata", replace_volume_metadata, body="json"),
    Endpoint("GET", "/volumes/{volume_id}/metadata/{key}", show_volume_metadata_item),
    Endpoint("PUT", "/volumes/{volume_id}/metadata/{key}", update_volume_metadata_item,
             body="json"),
    Endpoint("DELETE", "/volumes/{volume_id}/metadata/{key}", delete_volume_metadata_item),
    Endpoint("PUT", "/volumes/{volume_id}/data", write_data, body="raw", is_async=True),
    Endpoint("GET", "/volumes/{volume_id}/data", read_data, is_async=True),
    Endpoint("POST", "/manageable_volumes", manage_volume, body="json"),
    Endpoint("POST", "/os-volume-manage", os_volume_manage, body="json"),
    Endpoint("GET", "/manageable_volumes", list_manageable, min_version=(3, 8)),
    Endpoint("GET", "/manageable_volumes/detail", list_manageable_detail, min_version=(3, 8)),
    Endpoint("GET", "/scheduler-stats/get_pools", get_pools),
    Endpoint("GET", "/snapshots", list_snapshots, page=True),
    Endpoint("GET", "/snapshots/detail", list_snapshots_detail, page=True),
    Endpoint("POST", "/snapshots", create_snapshot, body="json"),
    Endpoint("GET", "/snapshots/{snapshot_id}", show_snapshot),
    Endpoint("PUT", "/snapshots/{snapshot_id}", update_snapshot, body="json"),
    Endpoint("DELETE", "/snapshots/{snapshot_id}", delete_snapshot),
    Endpoint("GET", "/os-quota-sets/{target_project_id}", show_quotas),
    Endpoint("GET", "/os-quota-sets/{target_project_id}/defaults", show_default_quotas),
    Endpoint("PUT", "/os-quota-sets/{target_project_id}", update_quotas, body="json"),
    Endpoint("GET", "/limits", limits),
    Endpoint("GET", "/resource_filters", resource_filters, min_version=(3, 33)),
    Endpoint("GET", "/types", list_types),
    Endpoint("GET", "/types/{type_id}", show_type),
    Endpoint("GET", "/os-availability-zone", availability_zones),
    Endpoint("GET", "/extensions", extensions),
]
