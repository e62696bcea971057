"""Swift behind a real Keystone v3: blockvault authenticates with a Keystone user and
project and finds its Swift account in the catalog (issue 3)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.keystone import ADMIN_PASSWORD, keystone_process
from tests.server import Server
from tests.swift_fixture import start_swift_server

ks_session = pytest.importorskip("keystoneauth1.session")
ks_v3 = pytest.importorskip("keystoneauth1.identity.v3")

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def keystone_swift(tmp_path_factory):
    """Keystone + a Swift all-in-one whose proxy also accepts Keystone tokens."""
    if os.environ.get("BLOCKVAULT_SKIP_SWIFT") == "1":
        pytest.skip("BLOCKVAULT_SKIP_SWIFT=1")
    with keystone_process(tmp_path_factory.mktemp("keystone")) as url:
        yield from _with_swift(tmp_path_factory, url)


def _with_swift(tmp_path_factory, url: str):
    """The Swift half of ``keystone_swift``: started against the Keystone at ``url``, a
    project and user of its own, Swift in the catalog; yields what the tests use."""
    saved = {k: os.environ.get(k) for k in ("SWIFT_KEYSTONE_URL", "SWIFT_VENV",
                                            "SWIFT_EXTRA_DAEMONS")}
    os.environ.update(SWIFT_KEYSTONE_URL=url, SWIFT_EXTRA_DAEMONS="0",
                      SWIFT_VENV=str(Path.home() / ".cache/blockvault/swift-ks-venv"))
    swift = None
    try:
        swift = start_swift_server(tmp_path_factory.mktemp("swift-ks"))
        admin = ks_session.Session(auth=ks_v3.Password(
            auth_url=f"{url}/v3", username="admin", password=ADMIN_PASSWORD, project_name="admin",
            user_domain_id="default", project_domain_id="default"))
        project = admin.post(f"{url}/v3/projects", json={"project": {
            "name": f"bv-{uuid.uuid4().hex[:8]}", "domain_id": "default"}}).json()["project"]
        user = admin.post(f"{url}/v3/users", json={"user": {
            "name": f"bvuser-{uuid.uuid4().hex[:8]}", "password": "bvpass",
            "domain_id": "default"}}).json()["user"]
        roles = admin.get(f"{url}/v3/roles", params={"name": "member"}).json()["roles"]
        admin.put(f"{url}/v3/projects/{project['id']}/users/{user['id']}/roles/"
                  f"{roles[0]['id']}")
        service = admin.post(f"{url}/v3/services", json={"service": {
            "type": "object-store", "name": "swift"}}).json()["service"]
        admin.post(f"{url}/v3/endpoints", json={"endpoint": {
            "service_id": service["id"], "interface": "public", "region_id": "RegionOne",
            "url": f"{swift.url}/v1/KEY_$(project_id)s"}})
        yield {"auth_url": f"{url}/v3", "user": user["name"], "project": project["name"]}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if swift is not None:
            swift.stop_all()


def _env(ks: dict, key: str) -> dict[str, str]:
    return {
        "BLOCKVAULT_STORE": "swift",
        "BLOCKVAULT_SWIFT_AUTH_VERSION": "3",
        "BLOCKVAULT_SWIFT_AUTH_URL": ks["auth_url"],
        "BLOCKVAULT_SWIFT_USER": ks["user"],
        "BLOCKVAULT_SWIFT_KEY": key,
        "BLOCKVAULT_SWIFT_PROJECT_NAME": ks["project"],
        "BLOCKVAULT_SWIFT_REGION_NAME": "RegionOne",
        "BLOCKVAULT_STORE_RETRY_BUDGET": "5",
    }


def test_backup_and_restore_through_keystone_v3(tmp_path, keystone_swift):
    srv = Server(tmp_path / "ok", _env(keystone_swift, "bvpass")).start()
    try:
        api = srv.client("alice", "p1")
        vol = api.create_volume(1)
        api.write(vol, 0, os.urandom(3 * MiB))
        h = api.volume_sha256(vol)
        backup = api.create_backup(vol)
        assert api.volume_sha256(api.restore(backup)) == h
    finally:
        srv.stop()

    bad = Server(tmp_path / "bad", _env(keystone_swift, "wrong-password")).start()
    try:
        api = bad.client("alice", "p1")
        vol = api.create_volume(1)
        api.write(vol, 0, os.urandom(MiB))
        api.post("/backups", {"backup": {"volume_id": vol}})
        b = api.get("/backups/detail").json()["backups"][0]
        b = api.wait("backup", b["id"], {"available", "error"})
        assert b["status"] == "error"
        assert "authentication failed" in b["fail_reason"]
        assert "wrong-password" not in b["fail_reason"]
    finally:
        bad.stop()
