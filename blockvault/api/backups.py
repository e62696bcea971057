"""Backup routes (reference §4)."""

from __future__ import annotations

from starlette.responses import Response

from blockvault.api import schemas
from blockvault.api.faults import HTTPFault
from blockvault.api.http import Call, Endpoint, accepted, json_response, list_response
from blockvault.api.views import backup_detail, backup_summary, isotime
from blockvault.db.models import Job


def _summary(call: Call, backup) -> dict:
    return {"backup": backup_summary(backup, call.links)}


def list_summary(call: Call) -> Response:
    return _list(call, detail=False)


def list_detail(call: Call) -> Response:
    return _list(call, detail=True)


def _list(call: Call, detail: bool) -> Response:
    page = call.services.backups.list(call.ctx, call.query, call.version)
    if detail:
        attrs = call.ctx.allowed("backup:backup_project_attribute")
        items = [backup_detail(b, call.links, call.version, attrs) for b in page.items]
    else:
        items = [backup_summary(b, call.links) for b in page.items]
    return list_response(call, "backups", page, items, detail)


def show(call: Call) -> Response:
    backup = call.services.backups.get(call.ctx, call.path["backup_id"])
    attrs = call.ctx.allowed("backup:backup_project_attribute", backup)
    return json_response({"backup": backup_detail(backup, call.links, call.version, attrs)})


def create(call: Call) -> Response:
    schemas.validate(schemas.backup_create(call.version), call.body)
    b = call.body["backup"]
    backup = call.services.backups.create(
        call.ctx,
        b["volume_id"],
        container=b.get("container"),
        name=schemas.strip(b.get("name")),
        description=schemas.strip(b.get("description")),
        incremental=schemas.is_true(b.get("incremental", False)),
        force=schemas.is_true(b.get("force", False)),
        snapshot_id=b.get("snapshot_id"),
        metadata=b.get("metadata"),
        availability_zone=b.get("availability_zone"),
    )
    return json_response(_summary(call, backup), 202)


def update(call: Call) -> Response:
    schemas.validate(schemas.backup_update(call.version), call.body)
    b = call.body["backup"]
    changes = {}
    if "name" in b:
        changes["display_name"] = schemas.strip(b["name"])
    if "description" in b:
        changes["display_description"] = schemas.strip(b["description"])
    if "metadata" in b:
        changes["metadata_"] = dict(b["metadata"])
    backup = call.services.backups.update(call.ctx, call.path["backup_id"], changes)
    return json_response(_summary(call, backup))


def delete(call: Call) -> Response:
    call.services.backups.delete(call.ctx, call.path["backup_id"])
    return accepted()


def restore(call: Call) -> Response:
    schemas.validate(schemas.restore, call.body)
    r = call.body["restore"]
    target = call.services.backups.restore(
        call.ctx, call.path["backup_id"], r.get("volume_id"), schemas.strip(r.get("name"))
    )
    return json_response(
        {"restore": {"backup_id": target.backup_id, "volume_id": target.volume_id,
                     "volume_name": target.volume_name}},
        202,
    )


def export_record(call: Call) -> Response:
    record = call.services.backups.export_record(call.ctx, call.path["backup_id"])
    return json_response({"backup-record": record})


def import_record(call: Call) -> Response:
    schemas.validate(schemas.import_record, call.body)
    rec = call.body["backup-record"]
    backup = call.services.backups.import_record(
        call.ctx, rec["backup_service"], rec["backup_url"]
    )
    return json_response(_summary(call, backup), 201)


def action(call: Call) -> Response:
    body = call.body
    schemas.validate(schemas.single_action, body)
    key = next(iter(body))
    backup_id = call.path["backup_id"]
    if key == "os-reset_status":
        schemas.validate(schemas.reset_status, body)
        call.services.backups.reset_status(call.ctx, backup_id, body[key]["status"])
    elif key == "os-force_delete":
        call.services.backups.delete(call.ctx, backup_id, force=True)
    else:
        raise HTTPFault(
            400,
            f"There is no such action: {key}. Verify the request body and Content-Type "
            "header and try again.",
        )
    return accepted()


def progress(call: Call) -> Response:
    """blockvault extension: how far a running backup or restore has got."""
    return json_response({"progress": call.services.backups.progress(
        call.ctx, call.path["backup_id"])})


def start_verify(call: Call) -> Response:
    """blockvault extension: check every block of a backup in the background."""
    call.services.backups.verify(call.ctx, call.path["backup_id"])
    return accepted()


def show_verify(call: Call) -> Response:
    backup_id = call.path["backup_id"]
    job = call.services.backups.verification(call.ctx, backup_id)
    if job is None:
        raise HTTPFault(404, f"Backup {backup_id} has not been verified.")
    return json_response({"verification": {"backup_id": backup_id, **_verification(job)}})


def _verification(job: Job) -> dict:
    report = job.result or {}
    state = {"queued": "queued", "running": "running"}.get(job.state)
    if state is None:
        state = "ok" if report.get("ok") else "failed"
    return {
        "state": state,
        "checked_blocks": report.get("checked_blocks", 0),
        "missing": report.get("missing", []),
        "corrupt": report.get("corrupt", []),
        "error": report.get("error") or job.error,
        "started_at": isotime(job.started_at),
        "finished_at": isotime(job.finished_at),
    }


def start_container_verify(call: Call) -> Response:
    """blockvault extension (admin): check every block of every backup in a container."""
    schemas.validate(schemas.container_verification, call.body)
    container = call.body["verification"]["container"]
    job = call.services.backups.verify_container(call.ctx, container)
    return json_response(_container_verification(job), 202)


def show_container_verify(call: Call) -> Response:
    job = call.services.backups.container_verification(call.ctx, call.path["verification_id"])
    return json_response(_container_verification(job))


def _container_verification(job: Job) -> dict:
    return {"verification": {"id": job.id, "container": job.params["container"],
                             **_verification(job)}}


ENDPOINTS = [
    Endpoint("GET", "/backups", list_summary, page=True),
    Endpoint("GET", "/backups/detail", list_detail, page=True),
    Endpoint("POST", "/backups", create, body="json"),
    Endpoint("POST", "/backups/import_record", import_record, body="json"),
    Endpoint("GET", "/backups/{backup_id}", show),
    Endpoint("PUT", "/backups/{backup_id}", update, min_version=(3, 9), body="json"),
    Endpoint("DELETE", "/backups/{backup_id}", delete),
    Endpoint("POST", "/backups/{backup_id}/restore", restore, body="json", quota_prefix=False),
    Endpoint("GET", "/backups/{backup_id}/export_record", export_record),
    Endpoint("POST", "/backups/{backup_id}/action", action, body="json"),
    Endpoint("GET", "/backups/{backup_id}/progress", progress),
    Endpoint("POST", "/backups/{backup_id}/verify", start_verify),
    Endpoint("GET", "/backups/{backup_id}/verify", show_verify),
    Endpoint("POST", "/os-container-verifications", start_container_verify, body="json"),
    Endpoint("GET", "/os-container-verifications/{verification_id}", show_container_verify),
]
