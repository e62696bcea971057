"""The OpenAPI document: current, valid OpenAPI 3.1, complete (every mounted route), built
from the very schemas that validate requests, and served without a token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openapi_spec_validator import validate
from starlette.routing import Route
from starlette.testclient import TestClient

from blockvault.api import openapi, schemas
from blockvault.api.versions import MAX_VERSION, MIN_VERSION, fmt
from blockvault.config import load_settings
from blockvault.server import Services, create_app

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
REGENERATE = "regenerate with: python -m blockvault.api.openapi docs/openapi.json"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    services = Services(load_settings(data_dir=tmp_path_factory.mktemp("openapi")))
    yield services
    services.stop()


@pytest.fixture(scope="module")
def app(services):
    return create_app(services, manage_lifecycle=False)


def node_path(ref: str) -> list[str]:
    return ref.removeprefix("#/").split("/")


def resolve(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        target = doc
        for part in node_path(node["$ref"]):
            target = target[part]
        node = target
    return node


def test_checked_in_document_is_current():
    assert DOC_PATH.read_text() == openapi.render(openapi.build_document()), REGENERATE


def test_document_is_valid_openapi_3_1():
    doc = json.loads(DOC_PATH.read_text())
    assert doc["openapi"].startswith("3.1.")
    validate(doc)  # picks the 3.1 validator from the "openapi" field


def test_every_mounted_route_is_documented_and_nothing_else(app):
    doc = openapi.build_document()
    mounted = set()
    for route in app.routes:
        assert isinstance(route, Route), route
        for method in route.methods or {"GET"}:
            if method != "HEAD":
                mounted.add((route.path, method.lower()))
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert mounted - documented == set(), "mounted but not in the OpenAPI document"
    assert documented - mounted == set(), "documented but not mounted"
    # the three prefixes of every endpoint (reference §1.1)
    assert ("/v3/{project_id}/backups/{backup_id}", "get") in documented
    assert ("/v3/backups/{backup_id}", "get") in documented
    assert ("/v2/{project_id}/backups/{backup_id}", "get") in documented


def test_every_route_has_responses_and_json_bodies_their_schema():
    for ep in openapi.ENDPOINTS:
        assert ep.handler in openapi.SUCCESS, f"no responses documented for {ep}"
        if ep.body == "json":
            assert ep.handler in openapi.REQUEST_BODIES, f"no request schema for {ep}"


def _variant_for(body_schema: dict, version: tuple[int, int]) -> dict:
    if "anyOf" not in body_schema or "x-microversions" not in body_schema["anyOf"][0]:
        return body_schema
    for variant in body_schema["anyOf"]:
        lo, hi = variant["x-microversions"]["min"], variant["x-microversions"]["max"]
        as_tuple = [tuple(int(x) for x in v.split(".")) for v in (lo, hi)]
        if as_tuple[0] <= version <= as_tuple[1]:
            return {k: v for k, v in variant.items()
                    if k != "title" and not k.startswith("x-")}
    raise AssertionError(f"no variant for {fmt(version)}")


def test_request_bodies_are_the_validating_schemas_at_every_microversion():
    doc = openapi.build_document()
    op = doc["paths"]["/v3/{project_id}/backups"]["post"]
    body = resolve(doc, op["requestBody"]["content"]["application/json"]["schema"])
    for minor in range(MIN_VERSION[1], MAX_VERSION[1] + 1):
        version = (3, minor)
        assert _variant_for(body, version) == schemas.backup_create(version), fmt(version)
    titles = [v["x-microversions"] for v in body["anyOf"]]
    assert titles[0]["min"] == "3.0" and titles[-1]["max"] == fmt(MAX_VERSION)
    assert {"min": "3.43", "max": "3.50"} in titles  # metadata from 3.43, AZ from 3.51
    op = doc["paths"]["/v3/{project_id}/backups/{backup_id}"]["put"]
    body = resolve(doc, op["requestBody"]["content"]["application/json"]["schema"])
    for version in [(3, 9), (3, 42), (3, 43), MAX_VERSION]:
        assert _variant_for(body, version) == schemas.backup_update(version)
    assert op["x-min-microversion"] == "3.9"
    op = doc["paths"]["/v3/{project_id}/backups/{backup_id}/restore"]["post"]
    assert resolve(doc, op["requestBody"]["content"]["application/json"]["schema"]) == \
        schemas.restore


def test_served_without_a_token_and_equal_to_the_checked_in_copy(app):
    with TestClient(app) as client:
        r = client.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == json.loads(DOC_PATH.read_text())


def test_security_is_the_auth_token_header():
    doc = openapi.build_document()
    scheme = doc["components"]["securitySchemes"]["authToken"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "X-Auth-Token"}
    assert doc["paths"]["/v3/{project_id}/volumes"]["get"]["security"] == [{"authToken": []}]
    for path in ("/", "/v3/", "/v2/", "/healthcheck", "/openapi.json"):
        assert doc["paths"][path]["get"]["security"] == []
