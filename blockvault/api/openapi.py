"""The OpenAPI 3.1 document of every route blockvault serves (``GET /openapi.json``, and
``docs/openapi.json``, which a test keeps equal to what this module builds).

Nothing here restates a rule the server applies: the paths come from the real route table
(each Endpoint mounted by :func:`blockvault.api.http.make_routes`, so a new prefix or route
shows up by itself), the request bodies are the very schema objects the handlers validate
with, and the response bodies are :mod:`blockvault.api.response_schemas`.

Microversioned request bodies: when the schema that validates a body changes with the
microversion (e.g. ``metadata`` from 3.43, ``availability_zone`` from 3.51 on backup
create), the body schema is an ``anyOf`` of one variant per range of versions, each
variant titled with its range and carrying ``x-microversions: {"min": "3.43", "max":
"3.50"}``. Operations that exist only from some version on carry ``x-min-microversion``;
response keys that appear from some version on carry ``x-microversion`` (see
response_schemas).

Regenerate the checked-in copy with ``python -m blockvault.api.openapi docs/openapi.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from blockvault import __version__ as _package_version
from blockvault.api import backups, schedules, schemas, services, volumes
from blockvault.api import response_schemas as rs
from blockvault.api.http import Endpoint, make_routes
from blockvault.api.versions import MAX_VERSION, MIN_VERSION, fmt
from blockvault.dashboard import openapi as dashboard_openapi
from blockvault.service.backups import BACKUP_LIST
from blockvault.service.listing import FALSE_STRINGS, TRUE_STRINGS
from blockvault.service.volumes import SNAPSHOT_LIST, VOLUME_LIST

Schema = dict[str, Any]

#: the Endpoints the server mounts (server.create_app mounts exactly this list)
ENDPOINTS: list[Endpoint] = (backups.ENDPOINTS + volumes.ENDPOINTS + schedules.ENDPOINTS
                              + services.ENDPOINTS)
SECURITY_SCHEME = "authToken"
JSON = "application/json"
OCTETS = "application/octet-stream"

# -- request bodies: the schema objects the handlers validate with --------------------------

#: a body schema, or a function of the microversion returning one
BodySchema = Schema | Callable[[tuple[int, int]], Schema]

_force_delete: Schema = {
    "type": "object",
    "properties": {"os-force_delete": {"description": "any value; clients send null"}},
    "required": ["os-force_delete"],
    "additionalProperties": False,
}


def _volume_action_body() -> Schema:
    # Only os-reset_status has a schema object in the code; the handler reads os-extend's
    # new_size itself and ignores the other actions' values.
    simple = ["os-attach", "os-detach", "os-unmanage", "os-reserve", "os-unreserve",
              "os-begin_detaching", "os-roll_detaching", "os-initialize_connection",
              "os-terminate_connection"]
    variants: list[Schema] = [
        schemas.volume_reset_status,
        {"type": "object",
         "properties": {"os-extend": {"type": "object",
                                      "properties": {"new_size": {"type": ["integer", "string"]}},
                                      "required": ["new_size"]}},
         "required": ["os-extend"], "additionalProperties": False},
    ]
    variants += [{"type": "object", "properties": {a: {}}, "required": [a],
                  "additionalProperties": False} for a in simple]
    return {"allOf": [schemas.single_action, {"anyOf": variants}]}


#: handler -> the schema its JSON body is validated with
REQUEST_BODIES: dict[Callable, Callable[[], BodySchema]] = {
    backups.create: lambda: schemas.backup_create,
    backups.update: lambda: schemas.backup_update,
    backups.restore: lambda: schemas.restore,
    backups.import_record: lambda: schemas.import_record,
    backups.action: lambda: {"allOf": [schemas.single_action,
                                       {"anyOf": [schemas.reset_status, _force_delete]}]},
    backups.start_container_verify: lambda: schemas.container_verification,
    schedules.create: lambda: schedules.CREATE,
    schedules.update: lambda: schedules.UPDATE,
    schedules.forget: lambda: schedules.FORGET,
    volumes.create_volume: lambda: volumes._volume_create,
    volumes.update_volume: lambda: volumes._volume_update,
    volumes.volume_action: _volume_action_body,
    volumes.create_snapshot: lambda: volumes._snapshot_create,
    volumes.update_snapshot: lambda: volumes._snapshot_update,
    volumes.update_quotas: lambda: schemas.quota_set,
    volumes.manage_volume: lambda: volumes._volume_manage,
    volumes.os_volume_manage: lambda: volumes._volume_manage,
    volumes.create_volume_metadata: lambda: volumes._metadata_body,
    volumes.replace_volume_metadata: lambda: volumes._metadata_body,
    volumes.update_volume_metadata_item: lambda: volumes._meta_item_body,
}


def _all_versions() -> list[tuple[int, int]]:
    return [(MIN_VERSION[0], minor) for minor in range(MIN_VERSION[1], MAX_VERSION[1] + 1)]


def _body_schema(source: BodySchema) -> Schema:
    """One schema, or an ``anyOf`` of one variant per microversion range."""
    if not callable(source):
        return copy.deepcopy(source)
    ranges: list[tuple[tuple[int, int], tuple[int, int], Schema]] = []
    for version in _all_versions():
        schema = source(version)
        if ranges and ranges[-1][2] == schema:
            ranges[-1] = (ranges[-1][0], version, schema)
        else:
            ranges.append((version, version, schema))
    if len(ranges) == 1:
        return copy.deepcopy(ranges[0][2])
    return {
        "description": "The accepted body depends on the microversion "
                       "(OpenStack-API-Version); one variant per range of versions.",
        "anyOf": [
            {"title": f"microversions {fmt(lo)} to {fmt(hi)}",
             "x-microversions": {"min": fmt(lo), "max": fmt(hi)},
             **copy.deepcopy(schema)}
            for lo, hi, schema in ranges
        ],
    }


# -- query parameters -----------------------------------------------------------------------


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    param: Schema = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        param["description"] = description
    return param


#: what the list parser takes for a boolean (anything else is a 400)
_BOOL_STRING: Schema = {"type": "string", "enum": [*TRUE_STRINGS, *FALSE_STRINGS],
                        "description": "a boolean string, any case"}

#: schemas.is_true's values; anything else reads as false
_IS_TRUE: Schema = {"type": "string", "description": "true if one of "
                    + ", ".join(sorted(v for v in schemas.TRUE_VALUES if isinstance(v, str)))}


def _list_params(spec: Any) -> list[Schema]:
    # sort keys: the columns of the listed table, and "name" (3.37+)
    keys = "|".join(sorted({*(c.key for c in spec.model.__table__.columns), *spec.renames}))
    key_dir = rf"({keys})(:(asc|desc))?"
    params = [
        _query("limit", {"type": "integer", "minimum": 0},
               "page size; capped at osapi_max_limit"),
        _query("marker", {"type": "string"}, "id of the last item of the previous page"),
        _query("offset", {"type": "integer", "minimum": 0, "maximum": 2147483647}),
        _query("sort", {"type": "string", "pattern": rf"^{key_dir}(,{key_dir})*$"},
               "key[:asc|desc][,key[:dir]...]; keys are the resource's columns"),
        _query("sort_key", {"type": "string", "pattern": rf"^({keys})$"},
               "deprecated; not with sort"),
        _query("sort_dir", {"type": "string", "enum": ["asc", "desc"]},
               "deprecated; not with sort"),
        _query("all_tenants", _BOOL_STRING, "admin only; ignored for others"),
        _query("with_count", _BOOL_STRING, "3.45+: add the total as count"),
    ]
    params += [_query(f, {"type": "string"}, "filter (resource_filters)")
               for f in spec.user_filters]
    return params


_MANAGEABLE_QUERY: list[Schema] = [
    _query("host", {"type": "string"}, "HOST@BACKEND#POOL (required)"),
    _query("sort", {"type": "string"}, "reference or size, with :asc or :desc"),
    _query("sort_key", {"type": "string"}), _query("sort_dir", {"type": "string"}),
    _query("offset", {"type": "integer", "minimum": 0}),
    _query("limit", {"type": "integer", "minimum": 0}),
]


QUERY_PARAMS: dict[Callable, list[Schema]] = {
    backups.list_summary: _list_params(BACKUP_LIST),
    backups.list_detail: _list_params(BACKUP_LIST),
    volumes.list_volumes: _list_params(VOLUME_LIST),
    volumes.list_volumes_detail: _list_params(VOLUME_LIST),
    volumes.list_snapshots: _list_params(SNAPSHOT_LIST),
    volumes.list_snapshots_detail: _list_params(SNAPSHOT_LIST),
    volumes.delete_volume: [_query("cascade", _IS_TRUE, "also delete its snapshots")],
    schedules.list_: [_query("all_tenants", _BOOL_STRING, "admin only; ignored for others")],
    services.list_services: [_query("host", {"type": "string"}, "only this host's services"),
                             _query("binary", {"type": "string"},
                                    "only this binary's (cinder-api, cinder-backup)")],
    volumes.show_quotas: [_query("usage", _IS_TRUE, "limits with usage")],
    volumes.resource_filters: [_query("resource", {"type": "string"})],
    volumes.list_manageable: _MANAGEABLE_QUERY,
    volumes.list_manageable_detail: _MANAGEABLE_QUERY,
    volumes.get_pools: [_query("detail", _IS_TRUE, "with capabilities"),
                        _query("name", {"type": "string"}, "only this pool")],
    volumes.write_data: [_query("offset", {"type": "integer", "minimum": 0},
                                "byte offset to write at")],
}
HEADER_PARAMS: dict[Callable, list[Schema]] = {
    volumes.read_data: [{
        "name": "Range", "in": "header", "required": False,
        "schema": {"type": "string", "pattern": r"^bytes=(\d*-\d*)(, ?\d*-\d*)*$"},
        "description": "RFC 9110 byte range, e.g. bytes=0-4095, bytes=4096-, bytes=-512; "
                       "an invalid one is ignored",
    }],
}

# -- responses ------------------------------------------------------------------------------


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _empty(description: str) -> Schema:
    return {"description": description}


def _bytes(description: str, headers: dict[str, Schema] | None = None) -> Schema:
    out: Schema = {"description": description,
                   "content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}}}
    if headers:
        out["headers"] = headers
    return out


_RANGE_HEADERS = {
    "Content-Range": {"schema": {"type": "string"}, "description": "bytes a-b/size"},
}

#: handler -> its success responses
SUCCESS: dict[Callable, dict[str, Schema]] = {
    backups.list_summary: {"200": _json("backups (summary view)", rs.BACKUP_LIST)},
    backups.list_detail: {"200": _json("backups (detail view)", rs.BACKUP_DETAIL_LIST)},
    backups.create: {"202": _json("the new backup, creating", rs.ONE_BACKUP_SUMMARY)},
    backups.import_record: {"201": _json("the imported backup", rs.ONE_BACKUP_SUMMARY)},
    backups.show: {"200": _json("the backup", rs.ONE_BACKUP)},
    backups.update: {"200": _json("the updated backup (summary view)", rs.ONE_BACKUP_SUMMARY)},
    backups.delete: {"202": _empty("deletion queued")},
    backups.restore: {"202": _json("restore queued", rs.RESTORE)},
    backups.export_record: {"200": _json("the backup's record", rs.BACKUP_RECORD)},
    backups.action: {"202": _empty("action accepted")},
    backups.progress: {"200": _json("progress of the latest job", rs.PROGRESS)},
    backups.start_verify: {"202": _empty("verification queued")},
    backups.show_verify: {"200": _json("the latest verification", rs.VERIFICATION)},
    backups.start_container_verify: {
        "202": _json("the container check, queued", rs.CONTAINER_VERIFICATION)},
    backups.show_container_verify: {
        "200": _json("the container check", rs.CONTAINER_VERIFICATION)},
    schedules.list_: {"200": _json("backup schedules", schedules.SCHEDULE_LIST)},
    services.list_services: {"200": _json("services per host and binary, with their state",
                                          services.SERVICE_LIST)},
    schedules.show: {"200": _json("the backup schedule", schedules.ONE_SCHEDULE)},
    schedules.create: {"200": _json("the new backup schedule", schedules.ONE_SCHEDULE)},
    schedules.update: {"200": _json("the updated backup schedule", schedules.ONE_SCHEDULE)},
    schedules.delete: {"202": _empty("schedule deleted; its backups stay")},
    schedules.forget: {"200": _json("kept and removed backups (and, applied, what was "
                                    "deleted)", schedules.FORGET_RESULT)},
    volumes.list_volumes: {"200": _json("volumes (summary view)", rs.VOLUME_LIST)},
    volumes.list_volumes_detail: {"200": _json("volumes (detail view)", rs.VOLUME_DETAIL_LIST)},
    volumes.create_volume: {"202": _json("the new volume", rs.ONE_VOLUME)},
    volumes.show_volume: {"200": _json("the volume", rs.ONE_VOLUME)},
    volumes.update_volume: {"200": _json("the updated volume", rs.ONE_VOLUME)},
    volumes.delete_volume: {"202": _empty("volume deleted")},
    volumes.volume_action: {"202": _empty("action accepted")},
    volumes.show_volume_metadata: {"200": _json("the volume's metadata", rs.VOLUME_METADATA)},
    volumes.create_volume_metadata: {
        "200": _json("the volume's whole metadata, merged", rs.VOLUME_METADATA)},
    volumes.replace_volume_metadata: {
        "200": _json("the volume's new metadata", rs.VOLUME_METADATA)},
    volumes.show_volume_metadata_item: {"200": _json("one item", rs.VOLUME_METADATA_ITEM)},
    volumes.update_volume_metadata_item: {"200": _json("the item set", rs.VOLUME_METADATA_ITEM)},
    volumes.delete_volume_metadata_item: {"200": _empty("item deleted (empty body)")},
    volumes.write_data: {"204": _empty("bytes written")},
    volumes.read_data: {
        "200": _bytes("the volume's bytes"),
        "206": _bytes("the requested range", _RANGE_HEADERS),
        "416": {"description": "range not satisfiable",
                "headers": {"Content-Range": {"schema": {"type": "string"},
                                              "description": "bytes */size"}},
                "content": {JSON: {"schema": rs.fault(416)}, OCTETS: {"schema": {}}}},
    },
    volumes.list_snapshots: {"200": _json("snapshots", rs.SNAPSHOT_SUMMARY_LIST)},
    volumes.list_snapshots_detail: {"200": _json("snapshots", rs.SNAPSHOT_LIST)},
    volumes.create_snapshot: {"202": _json("the new snapshot", rs.ONE_SNAPSHOT_SUMMARY)},
    volumes.show_snapshot: {"200": _json("the snapshot", rs.ONE_SNAPSHOT)},
    volumes.update_snapshot: {"200": _json("the updated snapshot", rs.ONE_SNAPSHOT_SUMMARY)},
    volumes.delete_snapshot: {"202": _empty("snapshot deleted")},
    volumes.show_quotas: {"200": _json("the project's quotas", rs.QUOTA_SET)},
    volumes.show_default_quotas: {"200": _json("the default quotas", rs.QUOTA_SET)},
    volumes.update_quotas: {"200": _json("the project's limits", rs.QUOTA_SET_UPDATED)},
    volumes.limits: {"200": _json("absolute limits and usage", rs.LIMITS)},
    volumes.resource_filters: {"200": _json("filters per resource", rs.RESOURCE_FILTERS)},
    volumes.list_types: {"200": _json("volume types", rs.VOLUME_TYPES)},
    volumes.show_type: {"200": _json("a volume type", rs.ONE_VOLUME_TYPE)},
    volumes.availability_zones: {"200": _json("availability zones", rs.AVAILABILITY_ZONES)},
    volumes.extensions: {"200": _json("API extensions", rs.EXTENSIONS)},
    volumes.manage_volume: {"202": _json("the managed volume", rs.ONE_VOLUME)},
    volumes.os_volume_manage: {"202": _json("the managed volume", rs.ONE_VOLUME)},
    volumes.list_manageable: {"200": _json("candidate disks", rs.MANAGEABLE_LIST)},
    volumes.list_manageable_detail: {
        "200": _json("candidate disks (detail)", rs.MANAGEABLE_DETAIL_LIST)},
    volumes.get_pools: {"200": _json("backend pools", rs.POOLS)},
}

_ERROR_TEXT = {
    400: "bad request: body, query, URL (project) or microversion string",
    401: "no or bad X-Auth-Token",
    403: "policy does not allow the call",
    404: "no such resource, or the route is above the requested microversion",
    405: "operation not supported",
    406: "microversion out of range (fault key computeFault)",
    409: "the resource is not in a state that allows it",
    413: "over quota (with Retry-After), or request body too large",
    415: "unsupported Content-Type",
}


def _error_codes(ep: Endpoint) -> list[int]:
    codes = [400, 401, 403, 404, 406]
    if ep.method in ("POST", "PUT", "DELETE"):
        codes.append(409)
    if ep.method in ("POST", "PUT"):
        codes.append(413)
    if ep.body is not None:
        codes.append(415)
    if ep.handler is backups.action:
        codes.append(405)
    return sorted(codes)


# -- operations -----------------------------------------------------------------------------


def _project_regex(settings: Any) -> str:
    if settings is None:
        from blockvault.config import Settings

        settings = Settings()
    return settings.project_id_regex


def mounted(ep: Endpoint, settings: Any = None) -> list[tuple[str, str]]:
    """(path, method) of every route make_routes mounts for one endpoint."""
    from blockvault.config import Settings

    base = settings if isinstance(settings, Settings) else Settings()
    # the routes are the same whatever the authentication; noauth needs no DB or Keystone
    fields = {"project_id_regex": _project_regex(settings)}
    if any(f.name == "auth_strategy" for f in dataclasses.fields(Settings)):
        fields["auth_strategy"] = "noauth"
    stub = SimpleNamespace(settings=dataclasses.replace(base, **fields), db=None)
    out = []
    for route in make_routes([ep], stub):
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                out.append((route.path, method))
    return out


def _path_params(path: str, project_regex: str) -> list[Schema]:
    params = []
    for piece in path.split("/"):
        if piece.startswith("{") and piece.endswith("}"):
            name = piece[1:-1]
            schema: Schema = {"type": "string"}
            description = ""
            if name == "project_id":
                schema = {"type": "string", "pattern": f"^{project_regex}$"}
                description = "must be the token's project"
            param: Schema = {"name": name, "in": "path", "required": True, "schema": schema}
            if description:
                param["description"] = description
            params.append(param)
    return params


_VERSION_HEADER: Schema = {
    "name": "OpenStack-API-Version", "in": "header", "required": False,
    "schema": {
        "type": "string",
        "pattern": "^volume (latest|{}\\.({}))$".format(
            MIN_VERSION[0], "|".join(str(m) for m in range(MIN_VERSION[1], MAX_VERSION[1] + 1))),
    },
    "description": f"microversion, 'volume {fmt(MIN_VERSION)}' to 'volume {fmt(MAX_VERSION)}' "
                   "or 'volume latest'; 3.0 without it",
}


def _operation(ep: Endpoint, path: str, project_regex: str, comp: _Components) -> Schema:
    handler = ep.handler
    module = handler.__module__.rsplit(".", 1)[-1]
    api = path.split("/")[1]
    scope = "project" if "{project_id}" in path else "noproject"
    doc = (handler.__doc__ or "").strip().splitlines()
    op: Schema = {
        "operationId": f"{api}-{scope}-{module}-{handler.__name__}",
        "tags": [module],
        "summary": doc[0] if doc else f"{ep.method} {ep.path}",
    }
    params = _path_params(path, project_regex)
    if api == "v3":
        params.append(copy.deepcopy(_VERSION_HEADER))
    params += copy.deepcopy(QUERY_PARAMS.get(handler, []))
    params += copy.deepcopy(HEADER_PARAMS.get(handler, []))
    if params:
        op["parameters"] = [comp.parameter(p) for p in params]
    if ep.min_version > MIN_VERSION:
        op["x-min-microversion"] = fmt(ep.min_version)
        if api == "v2":
            op["description"] = "v2 is 3.0, below this route's minimum version: always 404"
    if api == "v2" and handler.__module__ == schedules.__name__:
        op["description"] = "a v3 extension (docs/schedules.md): under v2 always 404"
    if ep.body == "json":
        body = comp.schema(f"{_camel(module)}{_camel(handler.__name__)}Request",
                           _body_schema(REQUEST_BODIES[handler]()))
        op["requestBody"] = {"required": False, "content": {JSON: {"schema": body}}}
    elif ep.body == "raw":
        op["requestBody"] = {"required": True,
                             "content": {OCTETS: {"schema": {"type": "string",
                                                             "format": "binary"}}}}
    elif handler is volumes.write_data:
        op["requestBody"] = {"required": True,
                             "content": {OCTETS: {"schema": {"type": "string",
                                                             "format": "binary"}}}}
    op["responses"] = comp.responses_of(handler, ep)
    op["security"] = [{SECURITY_SCHEME: []}]
    return op


# -- routes outside the project API -----------------------------------------------------------


def _static_paths() -> dict[str, Schema]:
    """server.create_app's own routes (a test checks every mounted route is documented)."""
    def get(op_id: str, summary: str, responses: dict[str, Schema]) -> Schema:
        return {"get": {"operationId": op_id, "tags": ["service"], "summary": summary,
                        "responses": responses, "security": []}}

    return {
        "/": get("versions", "API versions (300 Multiple Choices)",
                 {"300": _json("the versions document", rs.VERSIONS)}),
        "/v3": get("v3-redirect", "redirects to /v3/",
                   {"302": {"description": "to /v3/",
                            "headers": {"Location": {"schema": {"type": "string"}}}}}),
        "/v3/": get("v3-versions", "the v3 versions document",
                    {"200": _json("the versions document", rs.VERSIONS)}),
        "/v2/": get("v2-versions", "the v2 versions document",
                    {"200": _json("the versions document", rs.VERSIONS)}),
        "/healthcheck": get("healthcheck", "whether jobs can run",
                            {"200": _json("healthy", rs.HEALTH),
                             "503": _json("unhealthy, with the problems", rs.HEALTH)}),
        "/openapi.json": get("openapi", "this document",
                             {"200": _json("the OpenAPI document", {"type": "object"})}),
        # blockvault extension: Prometheus metrics (blockvault.api.metrics). No token from
        # this machine or with metrics_allow_remote; otherwise an admin's.
        "/metrics": {"get": {
            "operationId": "metrics", "tags": ["service"],
            "summary": "Prometheus metrics (blockvault extension, docs/operations.md)",
            "responses": {
                "200": {"description": "the Prometheus text format (OpenMetrics when the "
                                       "Accept header asks for it)",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": _json("a remote caller's token is not valid", rs.fault(401)),
                "403": _json("a remote caller without a token, or not an admin",
                             rs.fault(403))},
            "security": [{}, {SECURITY_SCHEME: []}]}},
        # blockvault extension: the web dashboard (blockvault.dashboard)
        **dashboard_openapi.paths(),
    }


# -- shared components ------------------------------------------------------------------------


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.lower().split("_"))


#: id of each response schema object of response_schemas -> its component name
_RESPONSE_NAMES = {id(v): _camel(k) for k, v in vars(rs).items()
                   if k.isupper() and isinstance(v, dict)}


class _Components:
    """Collects named schemas and responses so each is written once and referenced."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}
        self.responses: dict[str, Schema] = {}
        self.parameters: dict[str, Schema] = {}

    def schema(self, name: str, schema: Schema) -> Schema:
        known = self.schemas.setdefault(name, schema)
        assert known == schema, f"two different schemas named {name}"
        return {"$ref": f"#/components/schemas/{name}"}

    def parameter(self, param: Schema) -> Schema:
        """A reference to a shared parameter; inline if another one has its name."""
        name = _camel(param["name"].replace("-", "_")) + _camel(param["in"])
        known = self.parameters.setdefault(name, param)
        if known != param:
            return param
        return {"$ref": f"#/components/parameters/{name}"}

    def response(self, name: str, response: Schema) -> Schema:
        self.responses.setdefault(name, response)
        return {"$ref": f"#/components/responses/{name}"}

    def responses_of(self, handler: Callable, ep: Endpoint) -> dict[str, Schema]:
        out: dict[str, Schema] = {}
        for code, response in SUCCESS[handler].items():
            response = copy.deepcopy(response)
            for media in response.get("content", {}).values():
                name = _RESPONSE_NAMES.get(id(_original(handler, code, media)))
                if name:
                    media["schema"] = self.schema(name, media["schema"])
            out[code] = response
        for code in _error_codes(ep):
            if str(code) not in out:
                out[str(code)] = self.response(
                    f"Error{code}", _json(_ERROR_TEXT[code], self.schema(f"Fault{code}",
                                                                           rs.fault(code))))
        return dict(sorted(out.items()))


def _original(handler: Callable, code: str, media: Schema) -> Schema | None:
    """The response_schemas object a (deep-copied) media entry was made from."""
    for original in SUCCESS[handler][code].get("content", {}).values():
        if original["schema"] == media["schema"]:
            return original["schema"]
    return None


# -- the document ---------------------------------------------------------------------------


def build_document(settings: Any = None) -> Schema:
    project_regex = _project_regex(settings)
    paths: dict[str, Schema] = _static_paths()
    comp = _Components()
    for ep in ENDPOINTS:
        for path, method in mounted(ep, settings):
            paths.setdefault(path, {})[method.lower()] = _operation(ep, path, project_regex, comp)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "blockvault",
            "version": _package_version,
            "summary": "OpenStack Block Storage (Cinder) backups API, standalone",
            "description": (
                "The Cinder v3 backups API with microversions "
                f"{fmt(MIN_VERSION)} to {fmt(MAX_VERSION)}, the legacy v2 API (= 3.0), the "
                "volume, snapshot, quota and limits surfaces backups need, and blockvault's "
                "extensions (volume data, backup progress and verification). Every route "
                "exists as /v3/{project_id}/..., /v3/... (3.67 style, no project) and "
                "/v2/{project_id}/.... Errors are Cinder fault bodies "
                '{"<faultName>": {"code": N, "message": "..."}}. Microversioned request '
                "bodies are an anyOf with one variant per range of versions "
                "(x-microversions); versioned response keys carry x-microversion."
            ),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "backups", "description": "backups and blockvault's backup extensions"},
            {"name": "volumes", "description": "volumes, snapshots, quotas, limits, types"},
            {"name": "service", "description": "versions, health, this document"},
            {"name": "dashboard", "description": "the web dashboard (HTML pages, its poll)"},
        ],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(comp.schemas.items())),
            "responses": dict(sorted(comp.responses.items())),
            "parameters": dict(sorted(comp.parameters.items())),
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "apiKey", "in": "header", "name": "X-Auth-Token",
                    "description": "a Keystone token, an API key, or user:project in noauth "
                                   "mode",
                },
            },
        },
        "security": [{SECURITY_SCHEME: []}],
    }


def render(document: Schema) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


_cached: dict[str, bytes] = {}


def routes(settings: Any) -> list:
    """``GET /openapi.json`` (no token), built once per process."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def openapi(request: Request) -> Response:
        body = _cached.get("doc")
        if body is None:
            body = _cached["doc"] = render(build_document(settings)).encode()
        return Response(body, media_type=JSON)

    return [Route("/openapi.json", openapi, methods=["GET"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write blockvault's OpenAPI document.")
    parser.add_argument("output", nargs="?", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    text = render(build_document())
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
