"""Volumes, snapshots, volume data, versions and microversion negotiation over real HTTP."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from tests.server import Server

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Volumes and versions do not depend on the object store: local only."""
    srv = Server(tmp_path_factory.mktemp("bv")).start()
    yield srv
    srv.stop()


def test_versions_documents(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 300
    v = r.json()["versions"][0]
    assert (v["id"], v["min_version"], v["version"], v["status"]) == ("v3.0", "3.0", "3.71",
                                                                       "CURRENT")
    assert v["links"][1] == {"href": f"{server.url}/v3/", "rel": "self"}
    r = httpx.get(server.url + "/v3/")
    assert r.status_code == 200 and r.json() == httpx.get(server.url + "/").json()
    r = httpx.get(server.url + "/v3", follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"].endswith("/v3/")


@pytest.mark.parametrize(
    "header, status, message, echoed",
    [
        ("volume 3.x", 400,
         "API Version String 3.x is of invalid format. Must be of format MajorNum.MinorNum.",
         None),
        ("volume 3.99", 406,
         "Version 3.99 is not supported by the API. Minimum is 3.0 and maximum is 3.71.",
         "volume 3.99"),
    ],
)
def test_bad_microversions(alice, header, status, message, echoed):
    r = alice.get("/backups", headers={"OpenStack-API-Version": header})
    assert r.status_code == status
    key = "badRequest" if status == 400 else "computeFault"
    assert r.json() == {key: {"code": status, "message": message}}
    assert r.headers.get("OpenStack-API-Version") == echoed


def test_version_headers(alice):
    r = alice.get("/backups")
    assert r.headers["OpenStack-API-Version"] == "volume 3.0"
    assert r.headers["Vary"] == "OpenStack-API-Version"
    assert r.headers["x-openstack-request-id"].startswith("req-")
    r = alice.get("/backups", headers={"OpenStack-API-Version": "volume latest"})
    assert r.headers["OpenStack-API-Version"] == "volume 3.71"
    r = alice.get("/backups", headers={"OpenStack-API-Version": "compute 2.1, volume 3.45"})
    assert r.headers["OpenStack-API-Version"] == "volume 3.45"


def test_v2_behaves_as_3_0(server, alice):
    v2 = server.client("alice", alice.project, api="v2")
    vol = v2.create_volume(1)
    backup = v2.create_backup(vol)
    r = v2.get(f"/backups/{backup}", headers={"OpenStack-API-Version": "volume 3.71"})
    assert "OpenStack-API-Version" not in r.headers
    b = r.json()["backup"]
    assert "metadata" not in b
    assert b["links"][0]["href"] == f"{server.url}/v2/{alice.project}/backups/{backup}"
    assert b["links"][1]["href"] == f"{server.url}/{alice.project}/backups/{backup}"


def test_project_less_urls(server, alice):
    vol = alice.create_volume(1)
    api = server.client("alice", alice.project, version="3.67")
    api.base = f"{server.url}/v3"
    r = api.get(f"/volumes/{vol}")
    assert r.status_code == 200
    assert r.json()["volume"]["links"][0]["href"] == f"{server.url}/v3/volumes/{vol}"


def test_volume_lifecycle(alice):
    r = alice.post("/volumes", {"volume": {"size": 2, "name": "v", "metadata": {"k": "v"}}})
    assert r.status_code == 202
    vol = r.json()["volume"]
    assert (vol["status"], vol["size"], vol["name"], vol["metadata"]) == (
        "available", 2, "v", {"k": "v"})
    vid = vol["id"]
    assert [v["id"] for v in alice.get("/volumes").json()["volumes"]] == [vid]
    assert alice.get("/volumes/detail").json()["volumes"][0]["status"] == "available"
    r = alice.put(f"/volumes/{vid}", {"volume": {"name": "renamed"}})
    assert r.json()["volume"]["name"] == "renamed"
    assert alice.post(f"/volumes/{vid}/action", {"os-extend": {"new_size": 3}}).status_code == 202
    assert alice.get(f"/volumes/{vid}").json()["volume"]["size"] == 3
    assert alice.post(f"/volumes/{vid}/action", {"os-attach": {}}).status_code == 202
    assert alice.get(f"/volumes/{vid}").json()["volume"]["status"] == "in-use"
    r = alice.delete(f"/volumes/{vid}")
    assert r.status_code == 400
    assert alice.post(f"/volumes/{vid}/action", {"os-detach": {}}).status_code == 202
    assert alice.delete(f"/volumes/{vid}").status_code == 202
    assert alice.get(f"/volumes/{vid}").status_code == 404


@pytest.mark.parametrize("size", [0, -1, "abc", None, True])
def test_volume_bad_size(alice, size):
    r = alice.post("/volumes", {"volume": {"size": size}})
    assert r.status_code == 400 and "badRequest" in r.json()


def test_volume_data_roundtrip_and_ranges(alice):
    vol = alice.create_volume(1)
    data = os.urandom(3 * MiB + 17)
    alice.write(vol, 5 * MiB, data)
    r = alice.get(f"/volumes/{vol}/data",
                  headers={"Range": f"bytes={5 * MiB}-{5 * MiB + len(data) - 1}"})
    assert r.status_code == 206 and r.content == data
    assert r.headers["Content-Range"] == f"bytes {5 * MiB}-{5 * MiB + len(data) - 1}/{1024 * MiB}"
    # the whole volume over HTTP equals the file on disk
    assert alice.volume_sha256_http(vol) == alice.volume_sha256(vol)
    # past the end
    r = alice.put(f"/volumes/{vol}/data", params={"offset": 1024 * MiB - 10}, content=b"x" * 11,
                  headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and "past the end" in r.json()["badRequest"]["message"]
    # not available -> 409
    alice.post(f"/volumes/{vol}/action", {"os-attach": {}})
    r = alice.put(f"/volumes/{vol}/data", params={"offset": 0}, content=b"x",
                  headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 409 and "conflictingRequest" in r.json()


def test_snapshot_lifecycle_and_volume_from_snapshot(alice):
    vol = alice.create_volume(1)
    data = os.urandom(MiB)
    alice.write(vol, 0, data)
    r = alice.post("/snapshots", {"snapshot": {"volume_id": vol, "name": "s"}})
    assert r.status_code == 202
    snap = r.json()["snapshot"]
    assert snap["status"] == "available" and snap["volume_id"] == vol and snap["size"] == 1
    alice.write(vol, 0, bytes(MiB))
    r = alice.post("/volumes", {"volume": {"snapshot_id": snap["id"]}})
    assert r.status_code == 202, r.text
    clone = r.json()["volume"]["id"]
    r = alice.get(f"/volumes/{clone}/data", headers={"Range": f"bytes=0-{MiB - 1}"})
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(data).digest()
    assert alice.get("/snapshots/detail").json()["snapshots"][0]["id"] == snap["id"]
    # a volume with snapshots cannot be deleted
    assert alice.delete(f"/volumes/{vol}").status_code == 400
    assert alice.delete(f"/snapshots/{snap['id']}").status_code == 202
    assert alice.get(f"/snapshots/{snap['id']}").status_code == 404


def test_quota_defaults_and_limits(alice):
    q = alice.get(f"/os-quota-sets/{alice.project}").json()["quota_set"]
    assert {k: q[k] for k in ("volumes", "gigabytes", "snapshots", "backups",
                              "backup_gigabytes")} == {
        "volumes": 10, "gigabytes": 1000, "snapshots": 10, "backups": 10,
        "backup_gigabytes": 1000}
    alice.create_volume(2)
    lim = alice.get("/limits").json()["limits"]["absolute"]
    assert lim["maxTotalBackups"] == 10 and lim["totalGigabytesUsed"] == 2
    r = alice.get("/os-quota-sets/someoneelse")
    assert r.status_code == 403


def test_volume_quota(alice, admin):
    admin.put(f"/os-quota-sets/{alice.project}", {"quota_set": {"gigabytes": 3}})
    alice.create_volume(2)
    r = alice.post("/volumes", {"volume": {"size": 2}})
    assert r.status_code == 413
    assert r.json()["overLimit"]["message"] == (
        "VolumeSizeExceedsAvailableQuota: Requested volume or snapshot exceeds allowed "
        "gigabytes quota. Requested 2G, quota is 3G and 2G has been consumed.")


def test_unknown_routes_and_methods_are_cinder_faults(alice):
    r = alice.get("/nonexistent", headers={"OpenStack-API-Version": "volume 3.50"})
    assert r.status_code == 404
    assert r.json() == {"itemNotFound": {"code": 404,
                                         "message": "The resource could not be found."}}
    assert r.headers["OpenStack-API-Version"] == "volume 3.50"
    r = alice.req("PATCH", "/backups")
    assert r.status_code == 405 and r.json()["badMethod"]["code"] == 405
    assert r.headers["OpenStack-API-Version"] == "volume 3.0"
