"""Generated requests against a live server (schemathesis, from the OpenAPI document).

Every operation of the document (each route under /v3/{project_id}, /v3 and
/v2/{project_id}, and the unauthenticated documents) gets a bounded number of generated
requests, valid and invalid ones (schemathesis' examples, coverage and fuzzing phases),
sent over real HTTP to a ``blockvault serve`` process. Each response must be no 5xx, have a
documented status code and content type, and a body that matches the documented schema;
afterwards the server's log must hold no traceback and no ERROR line.

Deterministic: the seed is fixed (BLOCKVAULT_FUZZ_SEED, default 9) and derived per
operation by schemathesis. Budget: BLOCKVAULT_FUZZ_EXAMPLES fuzzing examples per operation
(default 12; four times that for the lists, a quarter under /v3 and /v2/{project_id},
which share /v3/{project_id}'s handlers; about 4,500 requests in all, coverage phase
included, in about two minutes).

The token is ``admin:fuzz`` (an admin of project ``fuzz``), so admin-only routes run their
full course; ``project_id`` in paths is always ``fuzz`` (another project is a 400 before any
handler runs). A volume with data, a snapshot, a backup and a container verification are
created first, and id path parameters (and list markers) name one of them about half the
time; deletes and backup actions get a new object of their own instead, so the shared ones
live through the run.

test_hostile_requests sends, as such, the classes of bad request issue 9 found that a
generator rarely builds (nesting 5,000 deep, lone surrogates, numbers past 64 bits,
Infinity and 1e400, sizes past the filesystem's limit, unsatisfiable and multiple ranges,
bodies over the limit) and checks each answer against the same document.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from blockvault.api import openapi
from tests.server import Server

SEED = int(os.environ.get("BLOCKVAULT_FUZZ_SEED", "9"))
EXAMPLES = int(os.environ.get("BLOCKVAULT_FUZZ_EXAMPLES", "12"))
PROJECT = "fuzz"
TOKEN = f"admin:{PROJECT}"
#: real objects, by path parameter name (filled by the ``live`` fixture)
REAL: dict[str, list[str]] = {}

CONFIG = SchemathesisConfig.from_dict({
    "seed": SEED,
    "suppress-health-check": ["all"],
    "generation": {
        "mode": "all",
        "max-examples": EXAMPLES,
        "deterministic": True,
        # no example database: a run depends on the seed alone, not on earlier runs
        "database": "none",
        # a NUL in a header cannot be sent; everywhere else it is fair game
        "exclude-header-characters": "\x00\r\n",
    },
    "phases": {"stateful": {"enabled": False}},
    "checks": {
        "enabled": False,
        "not_a_server_error": {"enabled": True},
        "status_code_conformance": {"enabled": True},
        "content_type_conformance": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
    },
    "auth": {"openapi": {"authToken": {"api_key": TOKEN}}},
    "request-timeout": 30,
    "operations": [
        # The same handlers under /v3 (no project) and /v2/{project_id}: only the URL
        # parsing differs from /v3/{project_id}, so a quarter of the examples and no
        # coverage phase there (it keeps the module within its few minutes).
        {
            "include-path-regex": r"^/(v2/|v3/(?!\{project_id\}))",
            "phases": {"coverage": {"enabled": False}},
            "generation": {"max-examples": max(2, EXAMPLES // 4)},
        },
        # lists take the most parameters (sort keys, markers, filters, counts)
        {
            "include-method": "GET",
            "include-path-regex": r"/(backups|volumes|snapshots)(/detail)?$",
            "generation": {"max-examples": EXAMPLES * 4},
        },
    ],
})

# The document as the code builds it (test_openapi checks that the server serves the same
# one and that docs/openapi.json is it); loaded here so that each operation is a test item.
schema = schemathesis.openapi.from_dict(openapi.build_document(), config=CONFIG)


_BOUNDED_RANGE = re.compile(r"^bytes=(?:(\d{1,18})-(\d{1,18})|-(\d{1,5}))$")


def _prepare(case) -> None:
    """The token's project in every project path, and a real object's id in about half of
    the id parameters. Done here rather than in generation hooks because the coverage
    phase builds its cases when the tests are collected, before the server exists; the
    choice is a function of the generated case, so a run is still reproducible."""
    params = dict(case.path_parameters or {})
    if "project_id" in params:
        params["project_id"] = PROJECT
    rnd = random.Random(f"{SEED}:{case.operation.label}:{sorted(params.items())!r}:"
                        f"{case.query!r}")
    destructive = case.operation.method.upper() == "DELETE" or case.operation.path.endswith(
        "/backups/{backup_id}/action")
    for name in sorted(params):
        if REAL.get(name) and rnd.random() < 0.5:
            # a delete gets an object of its own, so the shared ones live through the run
            params[name] = FRESH[name]() if destructive and name in FRESH else rnd.choice(
                REAL[name])
    case.path_parameters = params
    if isinstance(case.query, dict) and "sort" in case.query and rnd.random() < 0.5:
        # sort with sort_key/sort_dir is a 400 before any SQL (a rule OpenAPI cannot state)
        case.query = {k: v for k, v in case.query.items() if k not in ("sort_key", "sort_dir")}
    if isinstance(case.query, dict) and "marker" in case.query and rnd.random() < 0.5:
        kind = case.operation.path.split("/")[-2 if case.operation.path.endswith("/detail")
                                              else -1]
        pool = {"backups": "backup_id", "volumes": "volume_id", "snapshots": "snapshot_id"}
        if kind in pool and REAL.get(pool[kind]):
            case.query = {**case.query, "marker": rnd.choice(REAL[pool[kind]])}
    _bounded_read(case)


def _bounded_read(case) -> None:
    """Reads of a real volume stay small: a 1 GiB body per request would be the whole budget.
    A bounded range (at most 64 KiB, or a suffix) is kept; anything else is replaced."""
    op = case.operation
    if not (op.method.upper() == "GET" and op.path.endswith("/volumes/{volume_id}/data")):
        return
    if case.path_parameters.get("volume_id") not in REAL.get("volume_id", []):
        return
    headers = dict(case.headers or {})
    rng = next((v for k, v in headers.items() if k.lower() == "range"), None)
    m = _BOUNDED_RANGE.match(rng.strip()) if isinstance(rng, str) else None
    ok = m is not None and (m.group(3) is not None
                            or 0 <= int(m.group(2)) - int(m.group(1)) < 65536)
    if not ok:
        headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        headers["Range"] = "bytes=0-4095"
        case.headers = headers


#: makers of a new object, by path parameter name (set by the ``live`` fixture)
FRESH: dict = {}
UNLIMITED = {"quota_set": {r: -1 for r in ("volumes", "gigabytes", "snapshots", "backups",
                                           "backup_gigabytes")}}


def _makers(srv: Server) -> None:
    api = srv.client("admin", PROJECT)

    def unlimited() -> None:  # generated quota updates may have set a limit meanwhile
        r = api.put(f"/os-quota-sets/{PROJECT}", UNLIMITED)
        assert r.status_code == 200, r.text

    def volume() -> str:
        unlimited()
        vol = api.create_volume(1, name="fuzz-doomed")
        api.wait("volume", vol, {"available"})
        return vol

    def snapshot() -> str:
        vol = volume()
        r = api.post("/snapshots", {"snapshot": {"volume_id": vol, "name": "fuzz-doomed"}})
        assert r.status_code == 202, r.text
        snap = r.json()["snapshot"]["id"]
        api.wait("snapshot", snap, {"available"})
        return snap

    def backup() -> str:
        return api.create_backup(volume(), name="fuzz-doomed")

    FRESH.update(volume_id=volume, snapshot_id=snapshot, backup_id=backup)


def _seed(srv: Server) -> None:
    api = srv.client("admin", PROJECT)
    r = api.put(f"/os-quota-sets/{PROJECT}", UNLIMITED)
    assert r.status_code == 200, r.text
    _makers(srv)
    vol = api.create_volume(1, name="fuzz-source")
    api.wait("volume", vol, {"available"})
    api.write(vol, 0, b"blockvault fuzz " * 4096)
    spare = api.create_volume(1, name="fuzz-spare")
    api.wait("volume", spare, {"available"})
    r = api.post("/snapshots", {"snapshot": {"volume_id": vol, "name": "fuzz-snap"}})
    assert r.status_code == 202, r.text
    snap = r.json()["snapshot"]["id"]
    api.wait("snapshot", snap, {"available"})
    backup = api.create_backup(vol, name="fuzz-backup")
    r = api.post(f"/backups/{backup}/verify")
    assert r.status_code == 202, r.text
    r = api.post("/os-container-verifications",
                 {"verification": {"container": srv.default_container}})
    assert r.status_code == 202, r.text
    REAL.update({
        "volume_id": [vol, spare],
        "snapshot_id": [snap],
        "backup_id": [backup],
        "verification_id": [r.json()["verification"]["id"]],
        "target_project_id": [PROJECT],
        "type_id": ["default"],
    })


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("bv-fuzz")).start()
    try:
        _seed(srv)
        yield srv
    finally:
        srv.stop()


@schema.parametrize()
def test_generated_requests(case, live):
    _prepare(case)
    case.call_and_validate(base_url=live.url)


# -- the classes of request a generator rarely hits, sent as such ---------------------------

DOC = openapi.build_document()


def _hostile() -> list[tuple[str, str, str, dict]]:
    """(id, method, path below /v3/fuzz, httpx keywords); {vol}/{backup} are real ids."""
    big = "[" * 5000 + "]" * 5000
    return [
        ("sort-bool-marker", "GET", "/volumes?sort=bootable:asc&marker={vol}", {}),
        ("sort-deleted-marker", "GET", "/volumes/detail?sort=deleted&marker={vol}", {}),
        ("sort-bool-marker-snap", "GET", "/snapshots?sort=deleted:desc&marker={snap}", {}),
        ("filter-beyond-64-bits", "GET", "/backups?size=1e20", {}),
        ("filter-huge-int", "GET", "/backups/detail?size=" + "9" * 40, {}),
        ("limit-huge", "GET", "/backups?limit=" + "9" * 40, {}),
        ("offset-huge", "GET", "/volumes?offset=" + "9" * 40, {}),
        ("quota-beyond-64-bits", "PUT", "/os-quota-sets/{tp}",
         {"json": {"quota_set": {"volumes": 10**30}}}),
        ("quota-fraction", "PUT", "/os-quota-sets/{tp}", {"json": {"quota_set": {"volumes": 1.9}}}),
        ("quota-boolean", "PUT", "/os-quota-sets/{tp}", {"json": {"quota_set": {"volumes": True}}}),
        ("quota-infinity", "PUT", "/os-quota-sets/{tp}",
         {"content": b'{"quota_set": {"volumes": Infinity}}', "headers": _JSON}),
        ("quota-1e400", "PUT", "/os-quota-sets/{tp}",
         {"content": b'{"quota_set": {"gigabytes": 1e400}}', "headers": _JSON}),
        ("deep-json", "POST", "/backups", {"content": big.encode(), "headers": _JSON}),
        ("surrogate-value", "POST", "/backups",
         {"content": b'{"backup": {"volume_id": "\\ud800"}}', "headers": _JSON}),
        ("surrogate-name", "POST", "/volumes",
         {"content": b'{"volume": {"size": 1, "name": "\\ud800"}}', "headers": _JSON}),
        ("surrogate-container", "POST", "/backups",
         {"content": b'{"backup": {"volume_id": "{vol}", "container": "a\\udfff"}}',
          "headers": _JSON}),
        ("volume-too-large", "POST", "/volumes", {"json": {"volume": {"size": 100000}}}),
        ("volume-beyond-64-bits", "POST", "/volumes", {"json": {"volume": {"size": 10**30}}}),
        ("extend-2**31", "POST", "/volumes/{vol}/action",
         {"json": {"os-extend": {"new_size": 2**31}}}),
        ("backup-size-filter-infinity", "GET", "/backups?size=Infinity", {}),
        ("body-too-large", "POST", "/volumes",
         {"json": {"volume": {"size": 1, "name": "x" * 300_000}}}),
        ("range-unsatisfiable", "GET", "/volumes/{vol}/data",
         {"headers": {"Range": "bytes=99999999999999-99999999999999"}}),
        ("range-suffix", "GET", "/volumes/{vol}/data", {"headers": {"Range": "bytes=-10"}}),
        ("range-multiple", "GET", "/volumes/{spare}/data",
         {"headers": {"Range": "bytes=0-1,5-6"}}),
        ("container-newline", "POST", "/backups",
         {"json": {"backup": {"volume_id": "{vol}", "container": "abc\n"}}}),
        ("import-upper-case-id", "POST", "/backups/import_record",
         {"json": {"backup-record": {"backup_service": "x", "backup_url": "e30="}}}),
    ]


_JSON = {"Content-Type": "application/json"}


def _documented(method: str, path: str) -> dict:
    return DOC["paths"][path][method.lower()]["responses"]


def _check_against_document(method: str, template: str, response) -> None:
    import jsonschema

    assert response.status_code < 500, response.text[:500]
    responses = _documented(method, template)
    assert str(response.status_code) in responses, (response.status_code, response.text[:300])
    spec = responses[str(response.status_code)]
    if "$ref" in spec:
        spec = DOC["components"]["responses"][spec["$ref"].rsplit("/", 1)[-1]]
    content = spec.get("content", {})
    media = response.headers.get("content-type", "").split(";")[0]
    if not content:
        return
    assert media in content, (media, list(content))
    if media == "application/json":
        schema = {**content[media]["schema"], "components": DOC["components"]}
        jsonschema.Draft202012Validator(schema).validate(response.json())


@pytest.mark.parametrize("name,method,path,kw", _hostile(), ids=[h[0] for h in _hostile()])
def test_hostile_requests(live, name, method, path, kw):
    """Each class of bad request found by fuzzing (issue 9) answers as documented: a 4xx
    with a fault body, or a documented success; never a 5xx or a traceback."""
    import httpx

    ids = {"vol": REAL["volume_id"][0], "spare": REAL["volume_id"][1],
           "snap": REAL["snapshot_id"][0], "backup": REAL["backup_id"][0], "tp": PROJECT}
    template = "/v3/{project_id}" + path.split("?")[0]
    for key, value in ids.items():
        path = path.replace("{" + key + "}", value)
        template = template.replace("{" + key + "}", {"vol": "{volume_id}",
                                                      "spare": "{volume_id}",
                                                      "snap": "{snapshot_id}",
                                                      "backup": "{backup_id}",
                                                      "tp": "{target_project_id}"}[key])
    kw = dict(kw)
    if "content" in kw:
        for key, value in ids.items():
            kw["content"] = kw["content"].replace(b"{" + key.encode() + b"}", value.encode())
    if "json" in kw:
        kw["json"] = _fill(kw["json"], ids)
    headers = {"X-Auth-Token": TOKEN, **kw.pop("headers", {})}
    r = httpx.request(method, f"{live.url}/v3/{PROJECT}{path}", headers=headers, timeout=60,
                      **kw)
    _check_against_document(method, template, r)


def _fill(value, ids):
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, str):
        for key, real in ids.items():
            value = value.replace("{" + key + "}", real)
    return value


_BAD_LOG_LINE = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b")


def test_server_log_has_no_traceback(live):
    """Runs after the generated requests (same module, later): nothing the fuzzer sent may
    have made the server log a traceback or an error."""
    text = Path(live.log_path).read_text(errors="replace")
    bad = [line for line in text.splitlines() if _BAD_LOG_LINE.search(line)]
    assert not bad, "server log:\n" + "\n".join(bad[:50])
