"""The backups API over real HTTP against a real server process (reference §3-§8)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid

import pytest

MiB = 1024 * 1024
UUID0 = "00000000-0000-0000-0000-000000000000"


def fault(r, code: int, key: str) -> str:
    assert r.status_code == code, r.text
    body = r.json()
    assert list(body) == [key], body
    assert body[key]["code"] == code
    return body[key]["message"]


def fill(api, vol: str, seed: int = 1) -> bytes:
    """Random data at a few places, zeros and a hole elsewhere."""
    data = os.urandom(3 * MiB)
    api.write(vol, 0, data[:MiB])
    api.write(vol, 10 * MiB, bytes(MiB))  # written zeros
    api.write(vol, 100 * MiB + 4096, data[MiB:])
    return data


# -- create / show / list -------------------------------------------------------------------


def test_create_show_full_backup_and_restore_to_new_volume(server, alice):
    vol = alice.create_volume(1, name="src", metadata={"a": "1", "b": "2"})
    fill(alice, vol)
    src_hash = alice.volume_sha256(vol)
    r = alice.post(
        "/backups", {"backup": {"volume_id": vol, "name": " b1 ", "description": "first"}}
    )
    assert r.status_code == 202
    summary = r.json()["backup"]
    assert set(summary) == {"id", "name", "links"} and summary["name"] == "b1"
    assert summary["links"][0]["rel"] == "self"
    assert summary["links"][0]["href"].endswith(f"/v3/{alice.project}/backups/{summary['id']}")
    assert summary["links"][1]["href"].endswith(f"/{alice.project}/backups/{summary['id']}")
    assert "/v3/" not in summary["links"][1]["href"]
    assert alice.get(f"/volumes/{vol}").json()["volume"]["status"] == "backing-up"
    b = alice.wait("backup", summary["id"], {"available", "error"})
    assert b["status"] == "available", b
    expected = {
        "id",
        "status",
        "size",
        "object_count",
        "availability_zone",
        "container",
        "created_at",
        "updated_at",
        "name",
        "description",
        "fail_reason",
        "volume_id",
        "links",
        "is_incremental",
        "has_dependent_backups",
        "snapshot_id",
        "data_timestamp",
    }
    assert set(b) == expected
    assert b["container"] == server.default_container and b["availability_zone"] == "nova"
    assert b["size"] == 1 and b["object_count"] >= 1 and b["is_incremental"] is False
    assert b["data_timestamp"] == b["created_at"]
    assert alice.get(f"/volumes/{vol}").json()["volume"]["status"] == "available"

    target = alice.restore(summary["id"])
    assert alice.volume_sha256(target) == src_hash
    new = alice.get(f"/volumes/{target}").json()["volume"]
    assert new["metadata"]["a"] == "1" and new["metadata"]["b"] == "2"
    assert new["name"] == "src"


def test_restore_into_existing_volume_overwrites_everything(alice):
    vol = alice.create_volume(1)
    fill(alice, vol)
    src_hash = alice.volume_sha256(vol)
    backup = alice.create_backup(vol)
    target = alice.create_volume(2, name="bigger")
    alice.write(target, 0, os.urandom(2 * MiB))  # must be overwritten with the backup's bytes
    alice.write(target, 10 * MiB, os.urandom(MiB))  # where the source has written zeros
    r = alice.post(f"/backups/{backup}/restore", {"restore": {"volume_id": target}})
    assert r.status_code == 202
    assert r.json() == {
        "restore": {"backup_id": backup, "volume_id": target, "volume_name": "bigger"}
    }
    alice.wait("volume", target, {"available"})
    alice.wait("backup", backup, {"available"})
    # The first GiB equals the source; the rest of the bigger target is zeros.
    h = hashlib.sha256()
    with alice.http.stream("GET", f"{alice.base}/volumes/{target}/data",
                           headers={"Range": f"bytes=0-{1024 * MiB - 1}"}) as r:
        assert r.status_code == 206
        for chunk in r.iter_bytes(4 * MiB):
            h.update(chunk)
    assert h.hexdigest() == src_hash
    tail = alice.get(f"/volumes/{target}/data",
                     headers={"Range": f"bytes={1024 * MiB}-{1024 * MiB + 4 * MiB - 1}"})
    assert tail.content == bytes(4 * MiB)


def test_incremental_backup_chain_and_restore(alice):
    vol = alice.create_volume(1)
    fill(alice, vol)
    full = alice.create_backup(vol)
    alice.write(vol, 5 * MiB, os.urandom(64 * 1024))
    alice.write(vol, 500 * MiB, b"x" * 100_000)
    h2 = alice.volume_sha256(vol)
    inc = alice.create_backup(vol, incremental=True)
    b = alice.get(f"/backups/{inc}").json()["backup"]
    assert b["is_incremental"] is True
    parent = alice.get(f"/backups/{full}").json()["backup"]
    assert parent["has_dependent_backups"] is True
    # parent cannot be deleted while the incremental exists
    msg = fault(alice.delete(f"/backups/{full}"), 400, "badRequest")
    assert msg == "Invalid backup: Incremental backups exist for this backup."
    target = alice.restore(inc)
    assert alice.volume_sha256(target) == h2
    # delete the child, then the parent goes
    assert alice.delete(f"/backups/{inc}").status_code == 202
    alice.wait("backup", inc, {"deleted"})
    assert alice.get(f"/backups/{full}").json()["backup"]["has_dependent_backups"] is False
    assert alice.delete(f"/backups/{full}").status_code == 202
    alice.wait("backup", full, {"deleted"})
    assert alice.get(f"/backups/{full}").status_code == 404


def test_incremental_without_parent_is_400(alice):
    vol = alice.create_volume(1)
    r = alice.post("/backups", {"backup": {"volume_id": vol, "incremental": True}})
    assert fault(r, 400, "badRequest") == (
        "Invalid backup: No backups available to do an incremental backup."
    )
    # and it reserved nothing
    assert alice.get("/backups").json()["backups"] == []


def test_snapshot_backup(alice):
    vol = alice.create_volume(1)
    fill(alice, vol)
    h = alice.volume_sha256(vol)
    r = alice.post("/snapshots", {"snapshot": {"volume_id": vol, "name": "s1"}})
    assert r.status_code == 202
    snap = r.json()["snapshot"]["id"]
    alice.write(vol, 0, os.urandom(MiB))  # changes after the snapshot are not in the backup
    r = alice.post("/backups", {"backup": {"volume_id": vol, "snapshot_id": snap}})
    assert r.status_code == 202
    backup = r.json()["backup"]["id"]
    b = alice.wait("backup", backup, {"available", "error"})
    assert b["status"] == "available" and b["snapshot_id"] == snap and b["volume_id"] == vol
    s = alice.get(f"/snapshots/{snap}").json()["snapshot"]
    assert s["status"] == "available"
    assert b["data_timestamp"] == s["created_at"]
    target = alice.restore(backup)
    assert alice.volume_sha256(target) == h


def test_snapshot_must_match_volume(alice):
    v1, v2 = alice.create_volume(1), alice.create_volume(1)
    snap = alice.post("/snapshots", {"snapshot": {"volume_id": v1}}).json()["snapshot"]["id"]
    r = alice.post("/backups", {"backup": {"volume_id": v2, "snapshot_id": snap}})
    assert fault(r, 400, "badRequest") == (
        f"Invalid volume: Volume {v2} does not match with snapshot.volume_id {v1}."
    )


def test_in_use_volume_needs_force(alice):
    vol = alice.create_volume(1)
    assert alice.post(f"/volumes/{vol}/action", {"os-attach": {}}).status_code == 202
    r = alice.post("/backups", {"backup": {"volume_id": vol}})
    assert fault(r, 400, "badRequest") == (
        "Invalid volume: Backing up an in-use volume must use the force flag."
    )
    backup = alice.create_backup(vol, force=True)
    assert alice.get(f"/volumes/{vol}").json()["volume"]["status"] == "in-use"
    assert alice.get(f"/backups/{backup}").json()["backup"]["status"] == "available"


def test_backing_up_volume_refuses_second_backup(alice):
    vol = alice.create_volume(1)
    alice.create_backup(vol, wait=False)
    r = alice.post("/backups", {"backup": {"volume_id": vol}})
    if r.status_code == 400:  # the first one may already be done on a fast machine
        assert "must be available or in-use" in r.json()["badRequest"]["message"]
        assert '"backing-up"' in r.json()["badRequest"]["message"]


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        (None, "None is not of type 'object'"),
        ({}, "'backup' is a required property"),
        (
            {"backup": {}},
            "Invalid input for field/attribute backup. Value: {}. "
            "'volume_id' is a required property",
        ),
        (
            {"backup": {"volume_id": "nope"}},
            "Invalid input for field/attribute volume_id. Value: nope. 'nope' is not a 'uuid'",
        ),
    ],
)
def test_create_schema_errors(alice, body, message):
    r = alice.req(
        "POST", "/backups", content=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert fault(r, 400, "badRequest") == message


def test_create_unknown_key_and_microversioned_keys(server, alice):
    vol = alice.create_volume(1)
    r = alice.post("/backups", {"backup": {"volume_id": vol, "metadata": {"k": "v"}}})
    assert "Additional properties are not allowed ('metadata' was unexpected)" in fault(
        r, 400, "badRequest"
    )
    api = server.client("alice", alice.project, version="3.43")
    r = api.post("/backups", {"backup": {"volume_id": vol, "metadata": {"k": "v"}}})
    assert r.status_code == 202
    b = api.wait("backup", r.json()["backup"]["id"], {"available"})
    assert b["metadata"] == {"k": "v"}


def test_empty_body_and_missing_content_type(alice):
    r = alice.req("POST", "/backups", content=b"")
    assert fault(r, 400, "badRequest") == "None is not of type 'object'"
    r = alice.req("POST", "/backups", content=b'{"backup": {}}')
    assert fault(r, 415, "badMediaType") == "Unsupported Content-Type"
    r = alice.req(
        "POST", "/backups", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    fault(r, 400, "badRequest")
    r = alice.req("POST", "/backups", content=b"x", headers={"Content-Type": "text/plain"})
    fault(r, 415, "badMediaType")


def test_restore_null_and_bad_bodies_are_400(alice):
    vol = alice.create_volume(1)
    backup = alice.create_backup(vol)
    r = alice.post(f"/backups/{backup}/restore", {"restore": None})  # Cinder: 500
    assert fault(r, 400, "badRequest") == (
        "Invalid input for field/attribute restore. Value: None. None is not of type 'object'"
    )
    r = alice.req(
        "POST",
        f"/backups/{backup}/restore",
        content=b"",
        headers={"Content-Type": "application/json"},
    )
    fault(r, 400, "badRequest")
    r = alice.post(f"/backups/{backup}/restore", {"restore": {"volume_id": "x"}})
    fault(r, 400, "badRequest")


def test_not_found(alice):
    missing = str(uuid.uuid4())
    assert fault(alice.get(f"/backups/{missing}"), 404, "itemNotFound") == (
        f"Backup {missing} could not be found."
    )
    r = alice.post("/backups", {"backup": {"volume_id": missing}})
    assert fault(r, 404, "itemNotFound") == f"Volume {missing} could not be found."
    fault(alice.delete(f"/backups/{missing}"), 404, "itemNotFound")
    fault(alice.post(f"/backups/{missing}/restore", {"restore": {}}), 404, "itemNotFound")


def test_restore_rules(alice):
    vol = alice.create_volume(2)
    backup = alice.create_backup(vol)
    small = alice.create_volume(1)
    r = alice.post(f"/backups/{backup}/restore", {"restore": {"volume_id": small}})
    assert fault(r, 400, "badRequest") == (
        "Invalid volume: volume size 1 is too small to restore backup of size 2."
    )
    inuse = alice.create_volume(2)
    alice.post(f"/volumes/{inuse}/action", {"os-attach": {}})
    r = alice.post(f"/backups/{backup}/restore", {"restore": {"volume_id": inuse}})
    assert fault(r, 400, "badRequest") == (
        "Invalid volume: Volume to be restored to must be available"
    )
    # a backup in error cannot be restored
    admin_reset = alice  # the user cannot reset status: that is admin-only
    r = admin_reset.post(f"/backups/{backup}/action", {"os-reset_status": {"status": "error"}})
    assert fault(r, 403, "forbidden").startswith("Policy doesn't allow")


def test_update_needs_3_9(server, alice):
    vol = alice.create_volume(1)
    backup = alice.create_backup(vol, name="old")
    r = alice.put(f"/backups/{backup}", {"backup": {"name": "new"}})
    assert fault(r, 404, "itemNotFound") == "The resource could not be found."
    api = server.client("alice", alice.project, version="3.9")
    r = api.put(f"/backups/{backup}", {"backup": {"name": "new", "description": "d"}})
    assert r.status_code == 200
    assert r.json()["backup"]["name"] == "new" and set(r.json()["backup"]) == {
        "id",
        "name",
        "links",
    }
    b = api.get(f"/backups/{backup}").json()["backup"]
    assert (b["name"], b["description"]) == ("new", "d")
    assert r.headers["OpenStack-API-Version"] == "volume 3.9"
    r = api.put(f"/backups/{backup}", {"backup": {"status": "x"}})
    fault(r, 400, "badRequest")


def test_delete_rules(alice):
    vol = alice.create_volume(1)
    backup = alice.create_backup(vol)
    r = alice.post(f"/backups/{backup}/restore", {"restore": {}})
    assert r.status_code == 202
    # while restoring, delete is refused (unless it already finished)
    r2 = alice.delete(f"/backups/{backup}")
    if r2.status_code == 400:
        assert r2.json()["badRequest"]["message"] == (
            "Invalid backup: Backup status must be available or error"
        )
    alice.wait("backup", backup, {"available", "deleted"})


# -- listing ---------------------------------------------------------------------------------


def test_list_sort_limit_marker_and_links(server, alice):
    vol = alice.create_volume(1)
    ids = [alice.create_backup(vol, name=f"b{i}") for i in range(4)]
    r = alice.get("/backups")
    assert [b["id"] for b in r.json()["backups"]] == ids[::-1]  # created_at desc
    assert "backups_links" not in r.json()
    r = alice.get("/backups", params={"limit": 2})
    page = r.json()
    assert [b["id"] for b in page["backups"]] == ids[::-1][:2]
    nxt = page["backups_links"][0]
    assert nxt["rel"] == "next" and f"marker={ids[2]}" in nxt["href"]
    assert f"/v3/{alice.project}/backups?" in nxt["href"]
    r = alice.get("/backups/detail", params={"limit": 2, "marker": ids[2]})
    assert [b["id"] for b in r.json()["backups"]] == ids[::-1][2:]
    assert "/backups/detail?" in r.json()["backups_links"][0]["href"]
    r = alice.get("/backups", params={"sort": "created_at:asc", "limit": 3, "offset": 1})
    assert [b["id"] for b in r.json()["backups"]] == ids[1:4]
    r = alice.get("/backups", params={"sort_key": "display_name", "sort_dir": "asc"})
    assert [b["name"] for b in r.json()["backups"]] == ["b0", "b1", "b2", "b3"]
    # filters
    r = alice.get("/backups/detail", params={"name": "b2"})
    assert [b["id"] for b in r.json()["backups"]] == [ids[2]]
    r = alice.get("/backups", params={"volume_id": vol, "status": "available"})
    assert len(r.json()["backups"]) == 4
    # with_count at 3.45 (link also on the last page, as Cinder)
    api = server.client("alice", alice.project, version="3.45")
    r = api.get("/backups", params={"with_count": "true", "limit": 4})
    assert r.json()["count"] == 4 and "backups_links" in r.json()
    r = api.get("/backups", params={"with_count": "true"})
    assert r.json()["count"] == 4 and "backups_links" not in r.json()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"limit": "x"}, "limit param must be an integer"),
        ({"limit": "-1"}, "limit param must be positive"),
        ({"offset": "-1"}, "offset must be >= 0"),
        ({"sort_key": "bogus"}, "Invalid input received: Invalid sort key"),
        ({"sort": "name"}, "Invalid input received: Invalid sort key"),
        (
            {"sort_dir": "up"},
            "Invalid input received: Unknown sort direction, must be 'desc' or 'asc'.",
        ),
        (
            {"sort": "id", "sort_key": "id"},
            "The 'sort_key' and 'sort_dir' parameters are deprecated and cannot be used with the "
            "'sort' parameter.",
        ),
    ],
)
def test_list_errors(alice, params, message):
    assert fault(alice.get("/backups", params=params), 400, "badRequest") == message


def test_list_filters_by_microversion(server, alice, admin):
    # before 3.31 unknown filters are dropped for users; from 3.31 they are 400
    assert alice.get("/backups", params={"host": "x"}).status_code == 200
    api = server.client("alice", alice.project, version="3.31")
    assert fault(api.get("/backups", params={"host": "x", "bogus": "1"}), 400, "badRequest") == (
        "Invalid filters bogus,host are found in query options."
    )
    # an admin's unknown column gives an empty list, not an error
    r = admin.get("/backups", params={"nonexistent": "1"})
    assert r.status_code == 200 and r.json() == {"backups": []}
    fault(admin.get("/backups", params={"all_tenants": "maybe"}), 400, "badRequest")
    marker = str(uuid.uuid4())
    fault(alice.get("/backups", params={"marker": marker}), 404, "itemNotFound")


def test_sort_by_name_from_3_37(server, alice):
    vol = alice.create_volume(1)
    for n in ("c", "a", "b"):
        alice.create_backup(vol, name=n)
    api = server.client("alice", alice.project, version="3.37")
    r = api.get("/backups", params={"sort": "name:asc"})
    assert [b["name"] for b in r.json()["backups"]] == ["a", "b", "c"]


# -- tenancy and admin --------------------------------------------------------------------------


def test_projects_do_not_see_each_other(alice, bob, admin):
    vol = alice.create_volume(1)
    backup = alice.create_backup(vol)
    snap = alice.post("/snapshots", {"snapshot": {"volume_id": vol}}).json()["snapshot"]["id"]
    assert bob.get("/backups").json()["backups"] == []
    assert bob.get("/volumes").json()["volumes"] == []
    assert bob.get("/snapshots").json()["snapshots"] == []
    fault(bob.get(f"/backups/{backup}"), 404, "itemNotFound")
    fault(bob.get(f"/volumes/{vol}"), 404, "itemNotFound")
    fault(bob.get(f"/snapshots/{snap}"), 404, "itemNotFound")
    fault(bob.get(f"/volumes/{vol}/data"), 404, "itemNotFound")
    fault(bob.delete(f"/backups/{backup}"), 404, "itemNotFound")
    fault(bob.post(f"/backups/{backup}/restore", {"restore": {}}), 404, "itemNotFound")
    fault(bob.post("/backups", {"backup": {"volume_id": vol}}), 404, "itemNotFound")
    bob_vol = bob.create_volume(1)
    r = bob.post(f"/backups/{backup}/restore", {"restore": {"volume_id": bob_vol}})
    fault(r, 404, "itemNotFound")
    # the admin sees everything with all_tenants, only its own project without
    assert backup not in [b["id"] for b in admin.get("/backups").json()["backups"]]
    r = admin.get("/backups", params={"all_tenants": "1", "project_id": alice.project})
    assert [b["id"] for b in r.json()["backups"]] == [backup]


def test_url_project_must_be_callers(server, alice):
    other = server.client("alice", alice.project)
    other.base = f"{server.url}/v3/someoneelse"
    assert fault(other.get("/backups"), 400, "badRequest") == "Malformed request url"


def test_no_token_is_401(server):
    import httpx

    r = httpx.get(f"{server.url}/v3/x/backups")
    fault(r, 401, "unauthorized")


def test_admin_fields_by_microversion(server, alice, admin):
    vol = alice.create_volume(1)
    backup = alice.create_backup(vol)
    a56 = server.client("admin", "admin", version="3.56")
    b = a56.get(f"/backups/{backup}").json()["backup"]
    assert b["os-backup-project-attr:project_id"] == alice.project
    assert b["user_id"] == "alice" and b["metadata"] == {}
    u56 = server.client("alice", alice.project, version="3.56")
    b = u56.get(f"/backups/{backup}").json()["backup"]
    assert "os-backup-project-attr:project_id" not in b and "user_id" not in b


def test_reset_status_and_force_delete(alice, admin):
    vol = alice.create_volume(1)
    backup = alice.create_backup(vol)
    r = admin.post(f"/backups/{backup}/action", {"os-reset_status": {"status": "ERROR"}})
    assert r.status_code == 202 and r.content == b""
    assert alice.get(f"/backups/{backup}").json()["backup"]["status"] == "error"
    r = admin.post(f"/backups/{backup}/action", {"os-reset_status": {"status": "creating"}})
    fault(r, 400, "badRequest")
    r = admin.post(f"/backups/{backup}/action", {"os-bogus": {}})
    assert fault(r, 400, "badRequest") == (
        "There is no such action: os-bogus. Verify the request body and Content-Type header "
        "and try again."
    )
    fault(alice.post(f"/backups/{backup}/action", {"os-force_delete": None}), 403, "forbidden")
    r = admin.post(f"/backups/{backup}/action", {"os-force_delete": None})
    assert r.status_code == 202
    alice.wait("backup", backup, {"deleted"})


def test_force_delete_refuses_to_orphan_incremental(alice, admin):
    vol = alice.create_volume(1)
    full = alice.create_backup(vol)
    alice.create_backup(vol, incremental=True)
    r = admin.post(f"/backups/{full}/action", {"os-force_delete": {}})
    assert fault(r, 400, "badRequest") == (
        "Invalid backup: Incremental backups exist for this backup."
    )


# -- export / import -------------------------------------------------------------------------------


def test_export_import_roundtrip_same_deployment(alice, admin):
    vol = alice.create_volume(1)
    fill(alice, vol)
    h = alice.volume_sha256(vol)
    backup = alice.create_backup(vol, name="exp")
    fault(alice.get(f"/backups/{backup}/export_record"), 403, "forbidden")
    r = admin.get(f"/backups/{backup}/export_record")
    assert r.status_code == 200
    rec = r.json()["backup-record"]
    assert rec["backup_service"].startswith("cinder.backup.drivers")
    record = json.loads(base64.b64decode(rec["backup_url"]))
    assert record["id"] == backup and record["size"] == 1 and record["driver_info"] == {}
    new_id = str(uuid.uuid4())
    record["id"] = new_id
    url = base64.b64encode(json.dumps(record).encode()).decode()
    r = admin.post(
        "/backups/import_record",
        {"backup-record": {"backup_service": rec["backup_service"], "backup_url": url}},
    )
    assert r.status_code == 201, r.text
    assert r.json()["backup"]["id"] == new_id and r.json()["backup"]["name"] is None
    b = admin.wait("backup", new_id, {"available", "error"})
    assert b["status"] == "available", b
    assert b["volume_id"] == vol and b["name"] == "exp"
    # importing the same record again is refused
    r = admin.post(
        "/backups/import_record",
        {"backup-record": {"backup_service": rec["backup_service"], "backup_url": url}},
    )
    assert fault(r, 400, "badRequest") == "Invalid backup: Backup already exists in database."
    # deleting the original leaves the imported copy restorable (shared storage, §15)
    assert alice.delete(f"/backups/{backup}").status_code == 202
    alice.wait("backup", backup, {"deleted"})
    target = admin.restore(new_id)
    assert admin.volume_sha256(target) == h


@pytest.mark.parametrize(
    "url, message",
    [
        (
            "!!! not base64 !!!",
            "Invalid input for field/attribute backup_url. Value: !!! not base64 !!!. "
            "'!!! not base64 !!!' is not a 'base64'",
        ),
        (
            base64.b64encode(b"not json").decode(),
            "Invalid input received: Can't parse backup record.",
        ),
        (
            base64.b64encode(b'{"size": 1}').decode(),
            "Invalid input received: Provided backup record is missing an id",
        ),
        (
            # a fixed id: parameters must be the same in every pytest-xdist worker
            base64.b64encode(json.dumps(
                {"id": "6890eaa7-eda6-46cc-9ae3-4322925bf113"}).encode()).decode(),
            "Invalid input received: Provided backup record is missing size attribute",
        ),
        (
            base64.b64encode(b"[1, 2]").decode(),
            "Invalid input received: Can't parse backup record.",
        ),
    ],
)
def test_import_malformed_records(admin, url, message):
    r = admin.post(
        "/backups/import_record",
        {"backup-record": {"backup_service": "cinder.backup.drivers.posix", "backup_url": url}},
    )
    assert fault(r, 400, "badRequest") == message


def test_import_foreign_record_fails_cleanly(admin):
    """A record naming data that is not there ends in error, never touching other objects."""
    bad = {
        "id": str(uuid.uuid4()),
        "size": 1,
        "display_name": "x",
        "display_description": None,
        "container": "../../etc",
        "service_metadata": "../../passwd",
        "object_count": 1,
    }
    url = base64.b64encode(json.dumps(bad).encode()).decode()
    r = admin.post(
        "/backups/import_record",
        {"backup-record": {"backup_service": "cinder.backup.drivers.posix", "backup_url": url}},
    )
    assert r.status_code == 201
    b = admin.wait("backup", bad["id"], {"available", "error"})
    assert b["status"] == "error" and b["fail_reason"]
    assert b["volume_id"] == UUID0


# -- quotas ---------------------------------------------------------------------------------------


def test_backup_quota(alice, admin):
    vol = alice.create_volume(2)
    r = admin.put(f"/os-quota-sets/{alice.project}", {"quota_set": {"backups": 1}})
    assert r.status_code == 200 and r.json()["quota_set"]["backups"] == 1
    alice.create_backup(vol)
    r = alice.post("/backups", {"backup": {"volume_id": vol}})
    assert fault(r, 413, "overLimit") == (
        "BackupLimitExceeded: Maximum number of backups allowed (1) exceeded"
    )
    assert r.json()["overLimit"]["retryAfter"] == "0" and r.headers["Retry-After"] == "0"
    admin.put(
        f"/os-quota-sets/{alice.project}", {"quota_set": {"backups": 10, "backup_gigabytes": 3}}
    )
    r = alice.post("/backups", {"backup": {"volume_id": vol}})
    assert fault(r, 413, "overLimit") == (
        "VolumeBackupSizeExceedsAvailableQuota: Requested backup exceeds allowed Backup "
        "gigabytes quota. Requested 2G, quota is 3G and 2G has been consumed."
    )
    q = alice.get(f"/os-quota-sets/{alice.project}", params={"usage": "true"}).json()
    assert q["quota_set"]["backups"] == {"limit": 10, "in_use": 1, "reserved": 0, "allocated": 0}
    fault(
        alice.put(f"/os-quota-sets/{alice.project}", {"quota_set": {"backups": 99}}),
        403,
        "forbidden",
    )


def test_restore_volume_quota_has_no_prefix(alice, admin):
    vol = alice.create_volume(1)
    backup = alice.create_backup(vol)
    admin.put(f"/os-quota-sets/{alice.project}", {"quota_set": {"volumes": 1}})
    r = alice.post(f"/backups/{backup}/restore", {"restore": {}})
    assert fault(r, 413, "overLimit") == (
        "Maximum number of volumes allowed (1) exceeded for quota 'volumes'."
    )


def test_update_null_body_is_400(server, alice):
    vol = alice.create_volume(1)
    backup = alice.create_backup(vol)
    api = server.client("alice", alice.project, version="3.9")
    r = api.put(f"/backups/{backup}", {"backup": None})
    assert fault(r, 400, "badRequest") == (
        "Invalid input for field/attribute backup. Value: None. None is not of type 'object'"
    )
