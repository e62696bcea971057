"""JSON Schemas (2020-12, as OpenAPI 3.1 uses them) of the bodies blockvault answers with,
written from the wire contract (reference §1.3, §3, §4, §8) and ``docs/api.md``.

They are strict on purpose (``additionalProperties: false``, as Tempest's schemas are): a
view that grows or loses a key must change here too, and the fuzzer (tests/test_fuzz.py)
checks every response it gets against them. Keys that only appear at some microversions or
only for admins are listed but not required; ``x-microversion`` says from which version a
key exists and ``x-admin-only`` that only admins see it."""

from __future__ import annotations

from typing import Any

from blockvault.api.faults import FAULT_NAMES
from blockvault.service.quotas import RESOURCES

Schema = dict[str, Any]


def _obj(props: Schema, required: tuple[str, ...] | list[str] = (), *, closed: bool = True,
         description: str | None = None) -> Schema:
    schema: Schema = {"type": "object", "properties": props, "required": list(required)}
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def _nullable(schema: Schema) -> Schema:
    kind = schema["type"]
    kinds = kind if isinstance(kind, list) else [kind]
    return {**schema, "type": [*kinds, "null"]}


def _since(version: str, schema: Schema, admin: bool = False) -> Schema:
    out = {**schema, "x-microversion": version}
    if admin:
        out["x-admin-only"] = True
    return out


# -- scalars ----------------------------------------------------------------------------------

#: Cinder's datetime form: no timezone, always six fractional digits (reference §1.2)
DATETIME: Schema = {
    "type": "string",
    "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}$",
    "description": "%Y-%m-%dT%H:%M:%S.%f, UTC, no timezone",
}
DATETIME_OR_NULL = _nullable(DATETIME)
UUID: Schema = {"type": "string", "format": "uuid"}
UUID_OR_NULL: Schema = {"type": ["string", "null"], "format": "uuid"}
STRING_OR_NULL: Schema = {"type": ["string", "null"]}
COUNT: Schema = {"type": "integer", "minimum": 0}
METADATA: Schema = {"type": "object", "additionalProperties": {"type": "string"}}

LINK: Schema = _obj({"href": {"type": "string"}, "rel": {"type": "string"},
                     "type": {"type": "string"}}, ("href", "rel"))
#: self and bookmark links of a resource (reference §3.1)
RESOURCE_LINKS: Schema = {"type": "array", "items": LINK, "minItems": 2, "maxItems": 2}
#: ``<collection>_links``: one ``next`` link when a page is full (reference §6.3)
NEXT_LINKS: Schema = {
    "type": "array", "minItems": 1, "maxItems": 1,
    "items": _obj({"href": {"type": "string"}, "rel": {"const": "next"}}, ("href", "rel")),
}

# -- faults (reference §8) --------------------------------------------------------------------


def fault(status: int) -> Schema:
    """``{"<faultName>": {"code": N, "message": "..."}}``; 413 adds ``retryAfter``."""
    name = FAULT_NAMES.get(status, "computeFault")
    props: Schema = {"code": {"const": status}, "message": {"type": "string"}}
    required = ["code", "message"]
    if status == 413:
        props["retryAfter"] = {"type": "string"}
    return _obj({name: _obj(props, required)}, (name,))


# -- backups ----------------------------------------------------------------------------------

BACKUP_STATUS: Schema = {
    "type": "string",
    "enum": ["creating", "available", "deleting", "error", "error_deleting", "restoring"],
}
BACKUP_SUMMARY: Schema = _obj(
    {"id": UUID, "name": STRING_OR_NULL, "links": RESOURCE_LINKS}, ("id", "name", "links"),
)
BACKUP_DETAIL: Schema = _obj(
    {
        "id": UUID,
        "status": BACKUP_STATUS,
        "size": COUNT,
        "object_count": COUNT,
        "availability_zone": STRING_OR_NULL,
        "container": STRING_OR_NULL,
        "created_at": DATETIME,
        "updated_at": DATETIME_OR_NULL,
        "name": STRING_OR_NULL,
        "description": STRING_OR_NULL,
        "fail_reason": STRING_OR_NULL,
        "volume_id": UUID,
        "links": RESOURCE_LINKS,
        "is_incremental": {"type": "boolean"},
        "has_dependent_backups": {"type": "boolean"},
        "snapshot_id": UUID_OR_NULL,
        # null while an imported record is being applied (reference §15)
        "data_timestamp": DATETIME_OR_NULL,
        "os-backup-project-attr:project_id": _since("3.18", {"type": "string"}, admin=True),
        "metadata": _since("3.43", METADATA),
        "user_id": _since("3.56", STRING_OR_NULL, admin=True),
        "encryption_key_id": _since("3.64", UUID),
    },
    ("id", "status", "size", "object_count", "availability_zone", "container", "created_at",
     "updated_at", "name", "description", "fail_reason", "volume_id", "links",
     "is_incremental", "has_dependent_backups", "snapshot_id", "data_timestamp"),
)


def _list(collection: str, item: Schema) -> Schema:
    return _obj(
        {
            collection: {"type": "array", "items": item},
            "count": _since("3.45", COUNT),
            f"{collection}_links": NEXT_LINKS,
        },
        (collection,),
    )


BACKUP_LIST = _list("backups", BACKUP_SUMMARY)
BACKUP_DETAIL_LIST = _list("backups", BACKUP_DETAIL)
ONE_BACKUP_SUMMARY = _obj({"backup": BACKUP_SUMMARY}, ("backup",))
ONE_BACKUP = _obj({"backup": BACKUP_DETAIL}, ("backup",))
RESTORE = _obj(
    {"restore": _obj({"backup_id": UUID, "volume_id": UUID, "volume_name": STRING_OR_NULL},
                     ("backup_id", "volume_id", "volume_name"))},
    ("restore",),
)
BACKUP_RECORD = _obj(
    {"backup-record": _obj({"backup_service": {"type": "string"},
                            "backup_url": {"type": "string"}},
                           ("backup_service", "backup_url"))},
    ("backup-record",),
)
PROGRESS = _obj(
    {"progress": _obj(
        {
            "backup_id": UUID,
            "status": BACKUP_STATUS,
            "operation": {"type": ["string", "null"],
                          "enum": ["create", "restore", "delete", "import", None]},
            "job_state": STRING_OR_NULL,
            "phase": STRING_OR_NULL,
            "bytes_done": COUNT,
            "bytes_total": COUNT,
            "bytes_per_second": COUNT,
        },
        ("backup_id", "status", "operation", "job_state", "phase", "bytes_done", "bytes_total",
         "bytes_per_second"),
    )},
    ("progress",),
)
_VERIFICATION_FIELDS: Schema = {
    "state": {"type": "string", "enum": ["queued", "running", "ok", "failed"]},
    "checked_blocks": COUNT,
    "missing": {"type": "array", "items": {"type": "string"}},
    "corrupt": {"type": "array", "items": {"type": "string"}},
    "error": STRING_OR_NULL,
    "started_at": DATETIME_OR_NULL,
    "finished_at": DATETIME_OR_NULL,
}
_VERIFICATION_REQUIRED = tuple(_VERIFICATION_FIELDS)
VERIFICATION = _obj(
    {"verification": _obj({"backup_id": UUID, **_VERIFICATION_FIELDS},
                          ("backup_id", *_VERIFICATION_REQUIRED))},
    ("verification",),
)
CONTAINER_VERIFICATION = _obj(
    {"verification": _obj({"id": {"type": "string"}, "container": {"type": "string"},
                           **_VERIFICATION_FIELDS},
                          ("id", "container", *_VERIFICATION_REQUIRED))},
    ("verification",),
)

# -- volumes and snapshots --------------------------------------------------------------------

VOLUME_SUMMARY: Schema = _obj(
    {"id": UUID, "name": STRING_OR_NULL, "links": RESOURCE_LINKS}, ("id", "name", "links"),
)
_ALWAYS_NULL: Schema = {"type": "null"}
VOLUME_DETAIL: Schema = _obj(
    {
        "id": UUID,
        "name": STRING_OR_NULL,
        "description": STRING_OR_NULL,
        "size": COUNT,
        "status": {"type": "string"},
        "availability_zone": STRING_OR_NULL,
        "created_at": DATETIME,
        "updated_at": DATETIME_OR_NULL,
        "attachments": {"type": "array"},
        "links": RESOURCE_LINKS,
        "metadata": METADATA,
        "bootable": {"type": "string", "enum": ["true", "false"]},
        "encrypted": {"type": "boolean"},
        "multiattach": {"type": "boolean"},
        "replication_status": STRING_OR_NULL,
        "consistencygroup_id": UUID_OR_NULL,
        "source_volid": UUID_OR_NULL,
        "snapshot_id": UUID_OR_NULL,
        "volume_type": STRING_OR_NULL,
        "user_id": STRING_OR_NULL,
        "migration_status": STRING_OR_NULL,
        "os-vol-tenant-attr:tenant_id": _since("3.0", {"type": "string"}, admin=True),
        "os-vol-host-attr:host": _since("3.0", STRING_OR_NULL, admin=True),
        "os-vol-mig-status-attr:migstat": _since("3.0", STRING_OR_NULL, admin=True),
        "os-vol-mig-status-attr:name_id": _since("3.0", UUID_OR_NULL, admin=True),
        "group_id": _since("3.13", UUID_OR_NULL),
        "provider_id": _since("3.21", STRING_OR_NULL),
        "shared_targets": _since("3.48", {"type": "boolean"}),
        "service_uuid": _since("3.48", UUID_OR_NULL),
        "volume_type_id": _since("3.63", UUID_OR_NULL),
        "consumes_quota": _since("3.65", {"type": "boolean"}),
    },
    ("id", "name", "description", "size", "status", "availability_zone", "created_at",
     "updated_at", "attachments", "links", "metadata", "bootable", "encrypted", "multiattach",
     "replication_status", "consistencygroup_id", "source_volid", "snapshot_id", "volume_type",
     "user_id", "migration_status"),
)
VOLUME_LIST = _list("volumes", VOLUME_SUMMARY)
VOLUME_DETAIL_LIST = _list("volumes", VOLUME_DETAIL)
ONE_VOLUME = _obj({"volume": VOLUME_DETAIL}, ("volume",))
VOLUME_METADATA = _obj({"metadata": METADATA}, ("metadata",))
VOLUME_METADATA_ITEM = _obj(
    {"meta": {**METADATA, "minProperties": 1, "maxProperties": 1}}, ("meta",))

# -- volume backends: manageable volumes, pools -------------------------------------------------

_MANAGEABLE_SUMMARY: Schema = {
    "reference": _obj({"source-name": {"type": "string"}}, ("source-name",), closed=False,
                      description="what to pass as the manage request's ref"),
    "size": {"type": "integer", "minimum": 0, "description": "GiB, rounded down"},
    "safe_to_manage": {"type": "boolean"},
}
MANAGEABLE_LIST = _obj({"manageable-volumes": {"type": "array", "items": _obj(
    _MANAGEABLE_SUMMARY, tuple(_MANAGEABLE_SUMMARY))}}, ("manageable-volumes",))
_MANAGEABLE_DETAIL: Schema = {
    **_MANAGEABLE_SUMMARY,
    "reason_not_safe": STRING_OR_NULL,
    "cinder_id": UUID_OR_NULL,
    "extra_info": STRING_OR_NULL,
}
MANAGEABLE_DETAIL_LIST = _obj({"manageable-volumes": {"type": "array", "items": _obj(
    _MANAGEABLE_DETAIL, tuple(_MANAGEABLE_DETAIL))}}, ("manageable-volumes",))
POOLS = _obj({"pools": {"type": "array", "items": _obj(
    {"name": {"type": "string", "description": "HOST@BACKEND#POOL"},
     "capabilities": {"type": "object", "description": "with detail=true"}},
    ("name",))}}, ("pools",))

_SNAPSHOT_PROPS: Schema = {
    "id": UUID,
    "name": STRING_OR_NULL,
    "description": STRING_OR_NULL,
    "volume_id": UUID,
    "size": COUNT,
    "status": {"type": "string"},
    "created_at": DATETIME,
    "updated_at": DATETIME_OR_NULL,
    "metadata": METADATA,
    "group_snapshot_id": _since("3.14", UUID_OR_NULL),
    "user_id": _since("3.41", STRING_OR_NULL),
    "consumes_quota": _since("3.65", {"type": "boolean"}),
}
_SNAPSHOT_REQUIRED = ("id", "name", "description", "volume_id", "size", "status",
                      "created_at", "updated_at", "metadata")
#: create, update and the summary list
SNAPSHOT: Schema = _obj(_SNAPSHOT_PROPS, _SNAPSHOT_REQUIRED)
#: show and the detail list: with Cinder's os-extended-snapshot-attributes
SNAPSHOT_DETAIL: Schema = _obj(
    {**_SNAPSHOT_PROPS,
     "os-extended-snapshot-attributes:progress": {"type": "string"},
     "os-extended-snapshot-attributes:project_id": {"type": "string"}},
    (*_SNAPSHOT_REQUIRED, "os-extended-snapshot-attributes:progress",
     "os-extended-snapshot-attributes:project_id"),
)
SNAPSHOT_SUMMARY_LIST = _list("snapshots", SNAPSHOT)
SNAPSHOT_LIST = _list("snapshots", SNAPSHOT_DETAIL)
ONE_SNAPSHOT_SUMMARY = _obj({"snapshot": SNAPSHOT}, ("snapshot",))
ONE_SNAPSHOT = _obj({"snapshot": SNAPSHOT_DETAIL}, ("snapshot",))

# -- quotas, limits, types, zones, extensions, filters ------------------------------------------

QUOTA_LIMIT: Schema = {"type": "integer", "minimum": -1}
QUOTA_USAGE: Schema = _obj(
    {"limit": QUOTA_LIMIT, "in_use": COUNT, "reserved": COUNT, "allocated": COUNT},
    ("limit", "in_use", "reserved", "allocated"),
)
QUOTA_SET = _obj(
    {"quota_set": _obj(
        {"id": {"type": "string"},
         **{r: {"oneOf": [QUOTA_LIMIT, QUOTA_USAGE]} for r in RESOURCES}},
        ("id", *RESOURCES),
        description="limits, or with ?usage=true {limit, in_use, reserved, allocated} each",
    )},
    ("quota_set",),
)
#: the reply to PUT: the limits alone, no id
QUOTA_SET_UPDATED = _obj(
    {"quota_set": _obj({r: QUOTA_LIMIT for r in RESOURCES}, RESOURCES)}, ("quota_set",),
)
_ABSOLUTE_LIMITS = ("maxTotalVolumes", "maxTotalSnapshots", "maxTotalVolumeGigabytes",
                    "maxTotalBackups", "maxTotalBackupGigabytes")
_ABSOLUTE_USED = ("totalVolumesUsed", "totalSnapshotsUsed", "totalGigabytesUsed",
                  "totalBackupsUsed", "totalBackupGigabytesUsed")
LIMITS = _obj(
    {"limits": _obj(
        {"rate": {"type": "array"},
         "absolute": _obj({**{k: QUOTA_LIMIT for k in _ABSOLUTE_LIMITS},
                           **{k: COUNT for k in _ABSOLUTE_USED}},
                          (*_ABSOLUTE_LIMITS, *_ABSOLUTE_USED))},
        ("rate", "absolute"),
    )},
    ("limits",),
)
VOLUME_TYPE: Schema = _obj(
    {
        "id": UUID,
        "name": {"type": "string"},
        "is_public": {"type": "boolean"},
        "description": STRING_OR_NULL,
        "extra_specs": METADATA,
        "os-volume-type-access:is_public": {"type": "boolean"},
        "qos_specs_id": _since("3.0", UUID_OR_NULL, admin=True),
    },
    ("id", "name", "is_public", "description", "extra_specs", "os-volume-type-access:is_public"),
)
VOLUME_TYPES = _obj({"volume_types": {"type": "array", "items": VOLUME_TYPE}}, ("volume_types",))
ONE_VOLUME_TYPE = _obj({"volume_type": VOLUME_TYPE}, ("volume_type",))
AVAILABILITY_ZONES = _obj(
    {"availabilityZoneInfo": {"type": "array", "items": _obj(
        {"zoneName": {"type": "string"},
         "zoneState": _obj({"available": {"type": "boolean"}}, ("available",))},
        ("zoneName", "zoneState"),
    )}},
    ("availabilityZoneInfo",),
)
EXTENSIONS = _obj(
    {"extensions": {"type": "array", "items": _obj(
        {"alias": {"type": "string"}, "description": {"type": "string"},
         "links": {"type": "array"}, "name": {"type": "string"}, "updated": {"type": "string"}},
        ("alias", "description", "links", "name", "updated"),
    )}},
    ("extensions",),
)
RESOURCE_FILTERS = _obj(
    {"resource_filters": {"type": "array", "items": _obj(
        {"resource": {"type": "string"},
         "filters": {"type": "array", "items": {"type": "string"}}},
        ("resource", "filters"),
    )}},
    ("resource_filters",),
)

# -- unauthenticated documents ----------------------------------------------------------------

VERSIONS = _obj(
    {"versions": {"type": "array", "minItems": 1, "items": _obj(
        {
            "id": {"type": "string", "pattern": r"^v\d+\.\d+$"},
            "links": {"type": "array", "items": LINK},
            "media-types": {"type": "array", "items": _obj(
                {"base": {"type": "string"}, "type": {"type": "string"}}, ("base", "type"))},
            "min_version": {"type": "string"},
            "status": {"type": "string", "enum": ["CURRENT", "SUPPORTED", "DEPRECATED"]},
            "updated": {"type": "string"},
            "version": {"type": "string"},
        },
        ("id", "links", "media-types", "min_version", "status", "updated", "version"),
    )}},
    ("versions",),
)
HEALTH = _obj(
    {"status": {"type": "string", "enum": ["ok", "unhealthy"]},
     "workers_alive": COUNT, "workers": COUNT,
     "problems": {"type": "array", "items": {"type": "string"}}},
    ("status", "workers_alive", "workers"),
)
