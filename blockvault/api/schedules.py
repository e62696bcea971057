"""Backup schedule routes (blockvault extension ``os-backup-schedules``, docs/schedules.md):
create, list, show, update, delete, and ``os-backup-forget`` (preview or apply a
keep-policy). v3 only, at every microversion; under v2 they do not exist (404)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from blockvault.api import response_schemas as rs
from blockvault.api import schemas
from blockvault.api.faults import HTTPFault
from blockvault.api.http import Call, Endpoint, accepted, json_response
from blockvault.api.views import isotime
from blockvault.db.models import Schedule
from blockvault.service.errors import Invalid
from blockvault.service.listing import parse_bool
from blockvault.service.schedules import KEEP_FIELDS

_count = {"type": ["integer", "null"], "minimum": 0, "maximum": 1000000}
_PROPS: dict[str, Any] = {
    "name": schemas.name,
    "description": schemas.description,
    "volume_ids": {"type": ["array", "null"], "items": schemas.uuid_, "maxItems": 100},
    "volume_metadata_key": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
    "cron": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
    "interval_seconds": {"type": ["integer", "null"], "minimum": 1,
                         "maximum": 366 * 86400},
    "timezone": {"type": "string", "minLength": 1, "maxLength": 64},
    "full_every": {"type": "integer", "minimum": 0, "maximum": 1000000},
    "container": schemas.nullable_string,
    "enabled": {"type": "boolean"},
    **{k: _count for k in KEEP_FIELDS},
}
CREATE = {"type": "object", "properties": {"backup_schedule": {
    "type": "object", "properties": _PROPS, "additionalProperties": False}},
    "required": ["backup_schedule"], "additionalProperties": False}
UPDATE = {"type": "object", "properties": {"backup_schedule": {
    "type": "object", "properties": _PROPS, "additionalProperties": False,
    "minProperties": 1}},
    "required": ["backup_schedule"], "additionalProperties": False}
FORGET = {"type": "object", "properties": {"forget": {
    "type": "object",
    "properties": {"schedule_id": schemas.uuid_, "volume_id": schemas.uuid_,
                   "timezone": {"type": "string", "minLength": 1, "maxLength": 64},
                   "dry_run": {"type": "boolean"}, **{k: _count for k in KEEP_FIELDS}},
    "additionalProperties": False}},
    "required": ["forget"], "additionalProperties": False}


# -- response schemas (docs/openapi.json) ------------------------------------------------------

_INT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
SCHEDULE_SCHEMA = rs._obj({
    "id": rs.UUID, "name": rs.STRING_OR_NULL, "description": rs.STRING_OR_NULL,
    "volume_ids": {"type": ["array", "null"], "items": rs.UUID},
    "volume_metadata_key": rs.STRING_OR_NULL, "cron": rs.STRING_OR_NULL,
    "interval_seconds": _INT_OR_NULL, "timezone": {"type": "string"}, "full_every": rs.COUNT,
    "container": rs.STRING_OR_NULL, **{k: _INT_OR_NULL for k in KEEP_FIELDS},
    "enabled": {"type": "boolean"}, "next_run_at": rs.DATETIME,
    "last_run_at": rs.DATETIME_OR_NULL, "last_success_at": rs.DATETIME_OR_NULL,
    "last_outcome": {"enum": ["success", "partial", "failed", None],
                     "description": "null before the first run and while a run's backups "
                                    "are still being made"},
    "last_error": rs.STRING_OR_NULL, "last_backups_made": rs.COUNT,
    "last_backups_pruned": rs.COUNT, "last_run_backup_ids": {"type": "array", "items": rs.UUID},
    "runs_total": rs.COUNT, "failures_total": rs.COUNT, "misses_total": rs.COUNT,
    "created_at": rs.DATETIME, "updated_at": rs.DATETIME_OR_NULL,
    "project_id": {**rs.STRING_OR_NULL, "x-admin-only": True},
    "user_id": {**rs.STRING_OR_NULL, "x-admin-only": True},
}, [k for k in ("id", "name", "description", "volume_ids", "volume_metadata_key", "cron",
                "interval_seconds", "timezone", "full_every", "container", *KEEP_FIELDS,
                "enabled", "next_run_at", "last_run_at", "last_success_at", "last_outcome",
                "last_error", "last_backups_made", "last_backups_pruned",
                "last_run_backup_ids", "runs_total", "failures_total", "misses_total",
                "created_at", "updated_at")])
ONE_SCHEDULE = rs._obj({"backup_schedule": SCHEDULE_SCHEMA}, ("backup_schedule",))
SCHEDULE_LIST = rs._obj({"backup_schedules": {"type": "array", "items": SCHEDULE_SCHEMA}},
                        ("backup_schedules",))
_FORGET_ITEM = rs._obj({"id": rs.UUID, "volume_id": rs.UUID, "created_at": rs.DATETIME,
                        "parent_id": rs.UUID_OR_NULL,
                        "reasons": {"type": "array", "items": {"type": "string"}}},
                       ("id", "volume_id", "created_at", "parent_id"))
_IDS = {"type": "array", "items": rs.UUID}
FORGET_RESULT = rs._obj({"forget": rs._obj({
    "dry_run": {"type": "boolean"},
    "policy": rs._obj({**{k: _INT_OR_NULL for k in KEEP_FIELDS}, "timezone": {"type": "string"}},
                      (*KEEP_FIELDS, "timezone")),
    "kept": {"type": "array", "items": _FORGET_ITEM},
    "removed": {"type": "array", "items": _FORGET_ITEM},
    "deleted": _IDS, "pending": _IDS, "refused": _IDS,
}, ("dry_run", "policy", "kept", "removed"))}, ("forget",))


def view(schedule: Schedule, call: Call) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": schedule.id,
        "name": schedule.name,
        "description": schedule.description,
        "volume_ids": schedule.volume_ids,
        "volume_metadata_key": schedule.volume_metadata_key,
        "cron": schedule.cron,
        "interval_seconds": schedule.interval_seconds,
        "timezone": schedule.timezone,
        "full_every": schedule.full_every,
        "container": schedule.container,
        **{k: getattr(schedule, k) for k in KEEP_FIELDS},
        "enabled": schedule.enabled,
        "next_run_at": isotime(schedule.next_run_at),
        "last_run_at": isotime(schedule.last_run_at),
        "last_success_at": isotime(schedule.last_success_at),
        # null after a run fired and before all its backups ended
        "last_outcome": schedule.last_outcome,
        "last_error": schedule.last_error,
        "last_backups_made": schedule.last_backups_made,
        "last_backups_pruned": schedule.last_backups_pruned,
        "last_run_backup_ids": schedule.last_run_backup_ids or [],
        "runs_total": schedule.runs_total,
        "failures_total": schedule.failures_total,
        "misses_total": schedule.misses_total,
        "created_at": isotime(schedule.created_at),
        "updated_at": isotime(schedule.updated_at),
    }
    if call.ctx.is_admin:
        out["project_id"], out["user_id"] = schedule.project_id, schedule.user_id
    return out


def _v3(call: Call) -> None:
    if call.api != "v3":
        raise HTTPFault(404, "The resource could not be found.")


def list_(call: Call) -> Response:
    """List the project's backup schedules (admins: all_tenants=1 for every project)."""
    _v3(call)
    all_tenants = False
    if "all_tenants" in call.query and call.ctx.is_admin:
        parsed = parse_bool(call.query["all_tenants"])
        if parsed is None:
            raise Invalid(f"all_tenants must be a boolean, got '{call.query['all_tenants']}'.")
        all_tenants = parsed
    found = call.services.schedules.list(call.ctx, all_tenants)
    return json_response({"backup_schedules": [view(s, call) for s in found]})


def show(call: Call) -> Response:
    """Show a backup schedule, with its last run and next run."""
    _v3(call)
    found = call.services.schedules.get(call.ctx, call.path["schedule_id"])
    return json_response({"backup_schedule": view(found, call)})


def create(call: Call) -> Response:
    """Create a backup schedule (200 with the schedule: nothing is queued)."""
    _v3(call)
    schemas.validate(CREATE, call.body)
    made = call.services.schedules.create(call.ctx, _values(call.body["backup_schedule"]))
    call.services.scheduler.wake()
    return json_response({"backup_schedule": view(made, call)})


def update(call: Call) -> Response:
    """Update a backup schedule; a new timing moves its next run."""
    _v3(call)
    schemas.validate(UPDATE, call.body)
    changed = call.services.schedules.update(call.ctx, call.path["schedule_id"],
                                             _values(call.body["backup_schedule"]))
    call.services.scheduler.wake()
    return json_response({"backup_schedule": view(changed, call)})


def delete(call: Call) -> Response:
    """Delete a backup schedule; the backups it made stay."""
    _v3(call)
    call.services.schedules.delete(call.ctx, call.path["schedule_id"])
    return accepted()


def forget(call: Call) -> Response:
    """Preview (dry_run) or apply a keep-policy to a schedule's or a volume's backups."""
    _v3(call)
    schemas.validate(FORGET, call.body)
    f = call.body["forget"]
    result = call.services.schedules.forget(
        call.ctx, schedule_id=f.get("schedule_id"), volume_id=f.get("volume_id"),
        keep={k: f.get(k) for k in KEEP_FIELDS}, tz=f.get("timezone"),
        dry_run=f.get("dry_run", True))
    return json_response({"forget": result})


def _values(body: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    for key in ("name", "description"):
        if key in out:
            out[key] = schemas.strip(out[key])
    return out


ENDPOINTS = [
    Endpoint("GET", "/os-backup-schedules", list_),
    Endpoint("POST", "/os-backup-schedules", create, body="json"),
    Endpoint("GET", "/os-backup-schedules/{schedule_id}", show),
    Endpoint("PUT", "/os-backup-schedules/{schedule_id}", update, body="json"),
    Endpoint("DELETE", "/os-backup-schedules/{schedule_id}", delete),
    Endpoint("POST", "/os-backup-forget", forget, body="json"),
]
