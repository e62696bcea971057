"""The dashboard's routes in the service's OpenAPI document (blockvault.api.openapi adds
them): pages answer HTML, the poll JSON. Their credential is the dashboard's cookie, set by
``POST /dashboard/login``, not ``X-Auth-Token``."""

from __future__ import annotations

from typing import Any

from blockvault.api import response_schemas as rs
from blockvault.dashboard.assets import FILES

Schema = dict[str, Any]

HTML = {"text/html": {"schema": {"type": "string"}}}
NOTE = ("Web dashboard (blockvault extension, docs/operations.md). The credential is the "
        "cookie POST /dashboard/login sets, not X-Auth-Token.")


def _html(description: str) -> Schema:
    return {"description": description, "content": HTML}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _redirect(description: str) -> Schema:
    return {"description": description,
            "headers": {"Location": {"schema": {"type": "string"}}}}


def _op(op_id: str, summary: str, responses: dict[str, Schema], **extra: Any) -> Schema:
    return {"operationId": op_id, "tags": ["dashboard"], "summary": summary,
            "description": NOTE, "responses": responses, "security": [], **extra}


PROJECT = {"name": "project", "in": "query", "required": False,
           "description": "another project (an admin's), or * for every project",
           "schema": {"type": "string"}}

_NULLABLE_STRING = {"type": ["string", "null"]}
JOB = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "project_id": {"type": "string"},
        "kind": {"type": "string"}, "state": {"type": "string"},
        "backup_id": {"type": "string"}, "backup_name": _NULLABLE_STRING,
        "phase": _NULLABLE_STRING, "bytes_done": {"type": "integer", "minimum": 0},
        "bytes_total": {"type": "integer", "minimum": 0}, "started_at": _NULLABLE_STRING,
    },
    "required": ["id", "project_id", "kind", "state", "backup_id", "backup_name", "phase",
                 "bytes_done", "bytes_total", "started_at"],
    "additionalProperties": False,
}


def paths() -> dict[str, Schema]:
    page_errors = {"403": _html("the credential may not view this project (or all)"),
                   "503": _html("Keystone could not be reached")}
    return {
        "/dashboard": {"get": _op(
            "dashboard", "the dashboard page of a project",
            {"200": _html("the page"), "303": _redirect("no valid credential: to sign in"),
             **page_errors},
            parameters=[PROJECT])},
        "/dashboard/": {"get": _op(
            "dashboard-slash", "redirects to /dashboard",
            {"308": _redirect("to /dashboard")})},
        "/dashboard/login": {
            "get": _op("dashboard-login-form", "the sign-in form",
                       {"200": _html("the form")}),
            "post": _op(
                "dashboard-login", "sign in: checks the token as the API would, sets the cookie",
                {"303": _redirect("signed in: to /dashboard (the cookie is set)"),
                 "401": _html("the credential is not valid (the form again, with why)"),
                 "403": _html("posted from another site's page, or the credential may not "
                              "view the dashboard"),
                 "413": _html("the form is too large"),
                 "415": _html("not a form (application/x-www-form-urlencoded)"),
                 "503": _html("Keystone could not be reached")},
                requestBody={"required": True, "content": {
                    "application/x-www-form-urlencoded": {"schema": {
                        "type": "object",
                        "properties": {"token": {"type": "string"}},
                        "required": ["token"]}}}}),
        },
        "/dashboard/logout": {"post": _op(
            "dashboard-logout", "sign out: clears the cookie",
            {"303": _redirect("to the sign-in form"),
             "403": _html("posted from another site's page")})},
        "/dashboard/api/jobs": {"get": _op(
            "dashboard-jobs", "running and queued jobs with their progress (the page polls it)",
            {"200": _json("the jobs", {"type": "object",
                                       "properties": {"jobs": {"type": "array",
                                                               "items": JOB}},
                                       "required": ["jobs"], "additionalProperties": False}),
             "401": _json("no valid credential", rs.fault(401)),
             "403": _json("the credential may not view this project (or all)", rs.fault(403)),
             "503": _json("Keystone could not be reached", rs.fault(503))},
            parameters=[PROJECT])},
        "/dashboard/static/{name}": {"get": _op(
            "dashboard-static", "the dashboard's script, styles and chart library",
            {"200": {"description": "the file",
                     "content": {"text/javascript": {"schema": {"type": "string"}},
                                 "text/css": {"schema": {"type": "string"}}}},
             "304": {"description": "not modified (If-None-Match)"},
             "404": _json("no such file", rs.fault(404))},
            parameters=[
                {"name": "name", "in": "path", "required": True,
                 "schema": {"type": "string", "enum": sorted(FILES)}},
                {"name": "v", "in": "query", "required": False,
                 "description": "the content's digest: with the current one the file may be "
                                "cached for a year", "schema": {"type": "string"}}])},
    }
