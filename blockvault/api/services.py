"""Cinder's services listing (``GET /os-services``, admin only): the API and backup
services per host with their state, ``up`` or ``down`` from their heartbeats
(blockvault.service.heartbeats). Cinder's filters ``host`` and ``binary`` (its deprecated
alias ``service`` too); from 3.7 each entry has ``cluster`` (blockvault has none: null)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from blockvault.api import response_schemas as rs
from blockvault.api.http import Call, Endpoint, json_response
from blockvault.api.views import isotime

CLUSTER_VERSION = (3, 7)

# -- response schema (docs/openapi.json) --------------------------------------------------------

SERVICE_SCHEMA = rs._obj({
    "binary": {"type": "string", "enum": ["cinder-api", "cinder-backup"]},
    "host": {"type": "string"},
    "zone": {"type": "string"},
    "status": {"type": "string", "enum": ["enabled", "disabled"]},
    "state": {"type": "string", "enum": ["up", "down"]},
    "updated_at": rs.DATETIME_OR_NULL,
    "disabled_reason": rs.STRING_OR_NULL,
    "cluster": rs._since("3.7", rs.STRING_OR_NULL),
}, ("binary", "host", "zone", "status", "state", "updated_at", "disabled_reason"))
SERVICE_LIST = rs._obj({"services": {"type": "array", "items": SERVICE_SCHEMA}}, ("services",))


def list_services(call: Call) -> Response:
    """List the API and backup services per host, with their state (admin only)."""
    binary = call.query.get("binary") or call.query.get("service") or None
    rows = call.services.services.list(call.ctx, host=call.query.get("host") or None,
                                       binary=binary)
    zone = call.services.settings.availability_zone
    return json_response({"services": [view(row, zone, call) for row in rows]})


def view(row: dict[str, Any], zone: str, call: Call) -> dict[str, Any]:
    out: dict[str, Any] = {
        "binary": row["binary"],
        "host": row["host"],
        "zone": zone,
        # blockvault has no os-services enable/disable: every service is enabled
        "status": "enabled",
        "state": "up" if row["up"] else "down",
        "updated_at": isotime(row["updated_at"]),
        "disabled_reason": None,
    }
    if call.api == "v3" and call.version >= CLUSTER_VERSION:
        out["cluster"] = None
    return out


ENDPOINTS = [Endpoint("GET", "/os-services", list_services)]
