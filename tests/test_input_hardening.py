"""Hostile input at the HTTP edge: bounded bodies, bounded error messages, deep nesting,
lone surrogates, numbers past 64 bits, boolean sort keys with markers, whole-name matching,
forwarded headers from untrusted peers, and error bodies without server paths or URLs.

Each test sends what a hostile or careless client sends to a real server, and checks the
Cinder-style answer and that the server neither failed (no 5xx, no traceback) nor changed
anything."""

from __future__ import annotations

import json
import socket
import time
import uuid

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from blockvault.api import schemas
from blockvault.api.faults import fault_response
from blockvault.api.http import Endpoint, make_routes
from blockvault.config import load_settings
from blockvault.db.models import Backup, Snapshot, Volume
from blockvault.store import StoreUnavailable
from tests.server import Server

LIMIT = 114688
MiB = 1024 * 1024
FAKE_ID = str(uuid.uuid4())


def fault(r: httpx.Response, code: int, key: str) -> str:
    assert r.status_code == code, r.text
    body = r.json()
    assert list(body) == [key], body
    assert body[key]["code"] == code
    return body[key]["message"]


def rss(server: Server) -> int:
    """The server process's resident memory, in bytes."""
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def no_traceback(server: Server) -> None:
    assert "Traceback" not in server.log(), server.log()[-3000:]


def post_raw(api, path: str, raw: bytes) -> httpx.Response:
    return api.post(path, content=raw, headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """One local-store server for the checks that do not depend on the store."""
    srv = Server(tmp_path_factory.mktemp("bv-input")).start()
    yield srv
    srv.stop()


@pytest.fixture
def user(local):
    return local.client("alice", uuid.uuid4().hex)


@pytest.fixture
def root(local):
    """An admin in a fresh project (admins list their own project without all_tenants)."""
    return local.client("admin", uuid.uuid4().hex)


# -- 1. bounded bodies -----------------------------------------------------------------------


def test_announced_huge_body_is_refused_before_it_is_read(local, user):
    """300 MiB announced: 413 at once, and the server does not take the body in memory
    (before: it read all of it, 3.5 GB of RSS, and answered with a 629 MB error)."""
    before = rss(local)
    announced = 300 * MiB
    sock = socket.create_connection(("127.0.0.1", local.port))
    sock.settimeout(10)
    started = time.monotonic()
    sock.sendall(
        (f"POST /v3/{user.project}/backups HTTP/1.1\r\nHost: 127.0.0.1\r\n"
         f"X-Auth-Token: alice:{user.project}\r\nContent-Type: application/json\r\n"
         f"Content-Length: {announced}\r\n\r\n").encode()
    )
    # keep sending while no answer has come, up to 64 MiB, as a client pushing its body
    sock.setblocking(False)
    sent, reply = 0, b""
    chunk = b'{"backup": ' + b" " * (MiB - 11)
    while sent < 64 * MiB and time.monotonic() - started < 20:
        try:
            reply += sock.recv(65536)
            if b"\r\n\r\n" in reply:
                break
        except BlockingIOError:
            pass
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            break
    sock.settimeout(10)
    sock.setblocking(True)
    try:
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
        while True:  # the rest of the (small) body, up to the close
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    elapsed = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert elapsed < 5, elapsed
    fault_body = json.loads(body)
    assert fault_body["overLimit"]["code"] == 413
    assert "Request is too large." in fault_body["overLimit"]["message"]
    assert rss(local) - before < 32 * MiB
    # the server goes on serving
    assert user.get("/backups").status_code == 200


def chunked(data: bytes, piece: int = 8192):
    """A body with no Content-Length (httpx sends a generator chunked)."""
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


def test_chunked_body_over_the_limit_is_413_and_at_the_limit_is_read(user):
    head = json.dumps({"backup": {"volume_id": FAKE_ID}}).encode()
    at_limit = head + b" " * (LIMIT - len(head))
    over = at_limit + b" "
    r = user.post("/backups", content=chunked(over),
                  headers={"Content-Type": "application/json"})
    assert "Request is too large." in fault(r, 413, "overLimit")
    # exactly the limit is a body like any other (here: the volume does not exist)
    r = user.post("/backups", content=chunked(at_limit),
                  headers={"Content-Type": "application/json"})
    assert fault(r, 404, "itemNotFound") == f"Volume {FAKE_ID} could not be found."
    # and with a Content-Length over the limit
    r = post_raw(user, "/backups", over)
    assert "Request is too large." in fault(r, 413, "overLimit")


def test_the_limit_is_a_setting(tmp_path):
    srv = Server(tmp_path, {"BLOCKVAULT_MAX_REQUEST_BODY_SIZE": "1000"}).start()
    try:
        api = srv.client("alice", "p1")
        body = {"backup": {"volume_id": FAKE_ID, "description": "x" * 200}}
        r = api.post("/backups", body)
        assert fault(r, 404, "itemNotFound")
        body["backup"]["description"] = "x" * 1000
        assert "at most 1000 bytes" in fault(api.post("/backups", body), 413, "overLimit")
    finally:
        srv.stop()


# -- 2. error messages quote excerpts ----------------------------------------------------------


def test_a_huge_bad_value_gives_a_short_message_naming_the_field(user):
    vol = user.create_volume(1)
    r = user.post("/backups", {"backup": {"volume_id": vol, "name": "n" * 100_000}})
    message = fault(r, 400, "badRequest")
    assert len(r.content) < 2000, len(r.content)
    assert message.startswith("Invalid input for field/attribute name. Value: nnnn")
    assert "is too long" in message
    # the same for a huge key the schema does not allow, and for a query value
    r = user.post("/backups", {"backup": {"volume_id": vol, "k" * 100_000: 1}})
    assert len(r.content) < 2000 and fault(r, 400, "badRequest")
    r = user.get("/backups", params={"marker": "m" * 8000})
    assert len(r.content) < 2000 and fault(r, 404, "itemNotFound")


# -- 3. deep nesting -------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100, 1000, 100_000])
def test_deeply_nested_json_is_a_400(local, user, depth):
    vol = user.create_volume(1)
    if depth * 2 < LIMIT:
        nested = "[" * depth + "]" * depth
    else:  # as deep as a body within the limit can open (and never closes)
        nested = "[" * depth
    for raw in (
        f'{{"backup": {{"volume_id": "{vol}", "name": {nested}}}}}',
        f'{{"backup": {{"volume_id": "{vol}", "metadata": {{"k": {nested}}}}}}}',
        nested,
    ):
        r = post_raw(user, "/backups", raw.encode())
        assert fault(r, 400, "badRequest").startswith("Malformed request body"), raw[:80]
    assert user.get("/backups").json()["backups"] == []
    no_traceback(local)


def test_nesting_within_the_limit_is_still_validated_as_usual(user):
    nested = {"a": {"b": {"c": "d"}}}
    r = user.post("/backups", {"backup": {"volume_id": FAKE_ID, "name": nested}})
    assert "is not of type 'string', 'null'" in fault(r, 400, "badRequest")


# -- 4. lone surrogates --------------------------------------------------------------------------


def test_lone_surrogate_values_are_refused_with_a_json_400(local, user):
    vol = user.create_volume(1, name="before")
    for path, raw in [
        # a value the schema quotes in its message (this 400 used to fail to render)
        ("/backups", '{"backup": {"volume_id": "\\ud800"}}'),
        # values that are valid for the schema (saving them used to fail)
        ("/backups", f'{{"backup": {{"volume_id": "{vol}", "name": "a\\udfffb"}}}}'),
        ("/volumes", '{"volume": {"size": 1, "description": "\\ud83d"}}'),
        ("/volumes", '{"volume": {"size": 1, "metadata": {"k": "\\ud800"}}}'),
        ("/volumes", '{"volume": {"size": 1, "metadata": {"\\ud800": "v"}}}'),
        ("/volumes", '{"volume": {"size": 1, "name": "nul\\u0000"}}'),
        ("/volumes", '{"volume": {"size": 1, "name": "\\u00e9\\u0000"}}'),
    ]:
        r = post_raw(user, path, raw.encode())
        assert fault(r, 400, "badRequest").startswith("Malformed request body"), raw
    r = user.req("PUT", f"/volumes/{vol}", content=b'{"volume": {"name": "\\udc00"}}',
                 headers={"Content-Type": "application/json"})
    assert fault(r, 400, "badRequest").startswith("Malformed request body")
    assert user.get(f"/volumes/{vol}").json()["volume"]["name"] == "before"
    assert len(user.get("/volumes").json()["volumes"]) == 1
    assert user.get("/backups").json()["backups"] == []
    # a surrogate pair is a proper character and is kept
    r = post_raw(user, "/volumes", b'{"volume": {"size": 1, "name": "\\ud83d\\ude00"}}')
    assert r.status_code == 202 and r.json()["volume"]["name"] == "\U0001f600"
    no_traceback(local)


def test_any_fault_message_renders_as_a_json_body():
    """The renderer itself: a message holding a lone surrogate (from anywhere) is a Cinder
    body that parses back to the same text, not a plain-text 500."""
    r = fault_response(400, "Invalid input for field/attribute name. Value: \ud800.")
    assert r.status_code == 400
    assert json.loads(r.body) == {
        "badRequest": {"code": 400,
                       "message": "Invalid input for field/attribute name. Value: \ud800."}
    }


# -- 5. numbers past 64 bits ------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "1e20", str(10**20), str(10**30), str(-10**30), "Infinity", "1e400", "nan",
    str(2**63), str(2**31),
])
def test_huge_numbers_in_list_filters_match_nothing(local, root, value):
    vol = root.create_volume(1)
    for path, key in [("/backups", "size"), ("/backups", "object_count"),
                      ("/backups/detail", "num_dependent_backups"), ("/volumes", "size"),
                      ("/snapshots", "size")]:
        r = root.get(path, params={key: value})
        assert r.status_code == 200, (path, key, r.text)
        assert r.json()[path.split("/")[1]] == [], (path, key)
    assert [v["id"] for v in root.get("/volumes", params={"size": "1"}).json()["volumes"]
            ] == [vol] or vol in [v["id"] for v in root.get("/volumes").json()["volumes"]]
    root.delete(f"/volumes/{vol}")
    no_traceback(local)


@pytest.mark.parametrize("key, value", [
    ("bootable", "maybe"), ("deleted", "perhaps"), ("created_at", "yesterday"),
    ("created_at", "9999-99-99"), ("name", "nul\x00"), ("size~", "1"),
])
def test_filter_values_a_column_cannot_hold_match_nothing(local, root, key, value):
    root.create_volume(1, name="x")
    r = root.get("/volumes", params={key: value})
    assert r.status_code == 200 and r.json()["volumes"] == [], r.text
    no_traceback(local)


def test_a_filter_matching_the_column_type_still_matches(root):
    vol = root.create_volume(3, name="typed")
    created = root.get(f"/volumes/{vol}").json()["volume"]["created_at"]
    for params in ({"size": "3", "name": "typed"}, {"bootable": "false", "name": "typed"},
                   {"created_at": created, "name": "typed"}):
        r = root.get("/volumes", params=params)
        assert [v["id"] for v in r.json()["volumes"]] == [vol], params


@pytest.mark.parametrize("params, message", [
    ({"offset": str(10**30)}, "offset must be <= 2147483647"),
    ({"offset": "1e3"}, "offset must be an integer"),
    ({"limit": "Infinity"}, "limit param must be an integer"),
    ({"limit": "1" * 5000}, "limit param must be an integer"),
])
def test_pagination_numbers_are_bounded(user, params, message):
    assert fault(user.get("/backups", params=params), 400, "badRequest") == message


def test_huge_limit_is_capped_like_any_other(user):
    assert user.get("/backups", params={"limit": str(10**30)}).status_code == 200


@pytest.mark.parametrize("raw, message", [
    ("1.9", "backups must be an integer"),
    ("2.0", "backups must be an integer"),
    ("true", "backups must be an integer"),
    ('"1.9"', "backups must be an integer"),
    ("null", "backups must be an integer"),
    ("[1]", "backups must be an integer"),
    (str(10**30), "backups must be <= 2147483647"),
    ("2147483648", "backups must be <= 2147483647"),
    ("-2", "backups must be >= -1"),
    ("1e400", "Malformed request body"),
    ("Infinity", "Malformed request body"),
    ("NaN", "Malformed request body"),
])
def test_bad_quota_values_are_refused_and_change_nothing(local, root, raw, message):
    project = uuid.uuid4().hex
    before = root.get(f"/os-quota-sets/{project}").json()["quota_set"]
    body = f'{{"quota_set": {{"volumes": 5, "backups": {raw}}}}}'
    r = root.req("PUT", f"/os-quota-sets/{project}", content=body.encode(),
                 headers={"Content-Type": "application/json"})
    assert fault(r, 400, "badRequest") == message
    assert root.get(f"/os-quota-sets/{project}").json()["quota_set"] == before
    no_traceback(local)


@pytest.mark.parametrize("raw, stored", [
    ("2147483647", 2147483647), ("-1", -1), ("0", 0), ('"7"', 7),
])
def test_good_quota_values_are_stored(root, raw, stored):
    project = uuid.uuid4().hex
    r = root.req("PUT", f"/os-quota-sets/{project}",
                 content=f'{{"quota_set": {{"backups": {raw}}}}}'.encode(),
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["quota_set"]["backups"] == stored
    assert root.get(f"/os-quota-sets/{project}").json()["quota_set"]["backups"] == stored


def test_quota_update_as_cinderclient_sends_it(root):
    """cinderclient puts ``tenant_id`` in the body; Cinder skips it (and ``id``), and
    still refuses a key that is neither a limit nor one of those."""
    project = uuid.uuid4().hex
    r = root.put(f"/os-quota-sets/{project}",
                 {"quota_set": {"tenant_id": project, "id": project, "backups": 3}})
    assert r.status_code == 200, r.text
    assert r.json()["quota_set"]["backups"] == 3
    r = root.put(f"/os-quota-sets/{project}",
                 {"quota_set": {"bogus": 1, "backups": 4, "x" * 10_000: 1}})
    message = fault(r, 400, "badRequest")
    assert message.startswith("Bad key(s) in quota set: bogus,xxx") and len(message) < 400
    assert root.get(f"/os-quota-sets/{project}").json()["quota_set"]["backups"] == 3


# -- 6. validators built once --------------------------------------------------------------------


def test_versioned_schemas_and_validators_are_built_once():
    for minor in range(0, 72):
        assert schemas.backup_create((3, minor)) is schemas.backup_create((3, minor))
        assert schemas.backup_update((3, minor)) is schemas.backup_update((3, minor))
    size = len(schemas._validators)
    for i in range(2000):
        for build in (schemas.backup_create, schemas.backup_update):
            with pytest.raises(schemas.Invalid):
                schemas.validate(build((3, i % 72)), {"backup": {"bogus": i}})
    grown = len(schemas._validators) - size
    assert grown <= 2 * 72, grown
    assert len(schemas._validators) <= schemas._MAX_VALIDATORS


def test_bad_requests_do_not_grow_the_server(local, user):
    """5,000 bad backup creates cost 12 MB that was never freed; 2,000 now cost nothing
    that lasts (measured after a warm-up, with a margin for the allocator's noise)."""
    body = {"backup": {"volume_id": "not-a-uuid"}}
    for _ in range(300):
        user.post("/backups", body)
    before = rss(local)
    for _ in range(2000):
        assert user.post("/backups", body).status_code == 400
    assert rss(local) - before < 3 * MiB


# -- 7. sorting on every column with a marker ---------------------------------------------------


def sortable(model) -> list[str]:
    from sqlalchemy import JSON

    return [c.name for c in model.__table__.columns if not isinstance(c.type, JSON)]


def walk(api, path: str, collection: str, sort: str, limit: int) -> list[str]:
    """Every id of a listing, page by page through the markers the pages give."""
    ids: list[str] = []
    params = {"sort": sort, "limit": limit}
    for _ in range(50):
        r = api.get(path, params=params)
        assert r.status_code == 200, (sort, r.text)
        page = [item["id"] for item in r.json()[collection]]
        ids += page
        if len(page) < limit:
            return ids
        params["marker"] = page[-1]
    raise AssertionError("pagination does not end")


def test_every_sort_key_pages_completely_with_a_marker(local, root):
    admin = local.client("admin", root.project, version="3.71")
    vols = [admin.create_volume(1 + i % 2, name=None if i == 0 else f"v{i % 3}")
            for i in range(5)]
    backups = [admin.create_backup(vols[i % 2], name=f"b{i % 2}") for i in range(3)]
    admin.post(f"/backups/{backups[0]}/action",
               {"os-reset_status": {"status": "error"}})
    snaps = []
    for i in range(3):
        r = admin.post("/snapshots", {"snapshot": {"volume_id": vols[2 + i],
                                                   "name": None if i else "s"}})
        assert r.status_code == 202, r.text
        snaps.append(r.json()["snapshot"]["id"])
    for model, collection, expected in [(Volume, "volumes", vols), (Backup, "backups", backups),
                                        (Snapshot, "snapshots", snaps)]:
        for key in sortable(model):
            for direction in ("asc", "desc"):
                sort = f"{key}:{direction}"
                whole = [i["id"] for i in admin.get(
                    f"/{collection}", params={"sort": sort}).json()[collection]]
                assert sorted(whole) == sorted(expected), sort
                for limit in (1, 2):
                    paged = walk(admin, f"/{collection}", collection, sort, limit)
                    assert paged == whole, (sort, limit)
    r = admin.get("/volumes", params={"sort": "metadata"})
    assert fault(r, 400, "badRequest") == "Invalid input received: Invalid sort key"
    no_traceback(local)


# -- 8. names matched whole ---------------------------------------------------------------------


def test_container_name_with_a_trailing_newline_is_refused(server, alice):
    vol = alice.create_volume(1)
    good = "abc" if server.store != "s3" else "abc-" + uuid.uuid4().hex[:8]
    for container in (good + "\n", good + "\r\n"):
        r = alice.post("/backups", {"backup": {"volume_id": vol, "container": container}})
        assert fault(r, 400, "badRequest").startswith("Invalid input received: Container name")
    assert alice.get("/backups").json()["backups"] == []
    assert alice.get(f"/volumes/{vol}").json()["volume"]["status"] == "available"


def test_metadata_key_and_project_id_with_a_trailing_newline_are_refused(user):
    vol = user.create_volume(1)
    r = user.post("/backups", {"backup": {"volume_id": vol, "metadata": {"key\n": "v"}}},
                  headers={"OpenStack-API-Version": "volume 3.43"})
    assert fault(r, 400, "badRequest").startswith(
        "Invalid input for field/attribute metadata.")
    r = user.http.get(f"{user.url}/v3/{user.project}%0A/backups")
    assert fault(r, 400, "badRequest") == "Malformed request url"


def test_project_id_regex_is_matched_whole(tmp_path):
    settings = load_settings(data_dir=tmp_path, project_id_regex=r"[a-z]+|admin")

    def ok(call):
        from blockvault.api.http import json_response

        return json_response({"ok": True})

    services = type("S", (), {"settings": settings})()
    app = Starlette(routes=make_routes([Endpoint("GET", "/ping", ok)], services))
    client = TestClient(app)
    for project, status in [("abc", 200), ("admin", 200), ("abc1", 400), ("1admin", 400)]:
        r = client.get(f"/v3/{project}/ping", headers={"X-Auth-Token": f"u:{project}"})
        assert r.status_code == status, project


# -- 9. forwarded headers ------------------------------------------------------------------------

FORWARDED = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https",
             "X-Forwarded-For": "203.0.113.9"}


def links(api) -> list[str]:
    vol = api.create_volume(1)
    r = api.get(f"/volumes/{vol}", headers=FORWARDED)
    hrefs = [link["href"] for link in r.json()["volume"]["links"]]
    r = httpx.get(api.url + "/", headers=FORWARDED)
    hrefs += [link["href"] for v in r.json()["versions"] for link in v["links"]
              if link["rel"] == "self"]
    return hrefs


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(local, user):
    hrefs = links(user)
    assert hrefs and all(h.startswith(f"http://127.0.0.1:{local.port}/") for h in hrefs), hrefs
    assert "203.0.113.9" not in local.log()


def test_forwarded_headers_from_a_trusted_proxy_are_used(tmp_path):
    srv = Server(tmp_path, {"BLOCKVAULT_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1"}).start()
    try:
        hrefs = links(srv.client("alice", "p1"))
        assert hrefs and all(h.startswith("https://evil.example/") for h in hrefs), hrefs
        assert "203.0.113.9" in srv.log()  # the client, as the proxy says, is logged
    finally:
        srv.stop()


def test_a_bad_trusted_proxy_setting_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="not an IP address or network"):
        load_settings(data_dir=tmp_path, trusted_proxies="10.0.0.0/8,proxy.example")


# -- 10. error bodies without server paths or URLs -------------------------------------------------


def test_fault_messages_carry_no_server_paths_or_urls():
    for message in (
        "cannot open /var/lib/blockvault/store/volumebackups/config: Permission denied",
        "swift: GET http://10.1.2.3:8080/v1/AUTH_test/c/o: 401 Unauthorized",
        "s3: https://rgw.internal:7480/bucket failed",
    ):
        text = json.loads(fault_response(400, message).body)["badRequest"]["message"]
        assert "/var/lib" not in text and "://" not in text and "10.1.2.3" not in text, text
        assert "rgw.internal" not in text, text
    # a message with no such thing is left as it is
    plain = "Invalid input received: Container name a/b is not valid: no '/' please"
    assert json.loads(fault_response(400, plain).body)["badRequest"]["message"] == plain


def test_a_store_failure_is_a_503_without_the_store_detail(tmp_path, caplog):
    """An object-store error reaching the API (injected: no request touches the store
    synchronously today) is a 503 in words, its detail in the log only."""
    settings = load_settings(data_dir=tmp_path)

    def fails(call):
        raise StoreUnavailable("swift: GET http://10.1.2.3:8080/v1/AUTH_t/c/o: timed out")

    services = type("S", (), {"settings": settings})()
    app = Starlette(routes=make_routes([Endpoint("GET", "/ping", fails)], services))
    r = TestClient(app).get("/v3/p/ping", headers={"X-Auth-Token": "u:p"})
    message = fault(r, 503, "serviceUnavailable")
    assert "10.1.2.3" not in r.text and "://" not in message
    assert "10.1.2.3" in caplog.text
