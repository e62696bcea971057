"""Real OpenStack clients, unmodified, against a real blockvault server.

python-cinderclient (its ``noauth`` keystoneauth plugin, library and ``cinder`` shell),
openstacksdk (``auth_type='none'`` and ``admin_token``) and the ``openstack`` CLI
(python-openstackclient) as a subprocess. See docs/clients.md for the configuration these
tests use. The whole module is skipped when a client package is not installed.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.server import Server

cinder_client = pytest.importorskip(
    "cinderclient.client", reason="python-cinderclient is not installed (pip install "
    "python-cinderclient)")
api_versions = pytest.importorskip("cinderclient.api_versions")
cinder_exc = pytest.importorskip("cinderclient.exceptions")
openstack = pytest.importorskip(
    "openstack", reason="openstacksdk is not installed (pip install openstacksdk)")
pytest.importorskip(
    "openstackclient.shell",
    reason="python-openstackclient is not installed (pip install python-openstackclient)")
ks_loading = pytest.importorskip("keystoneauth1.loading")
ks_session = pytest.importorskip("keystoneauth1.session")

from openstack import connection as os_connection  # noqa: E402  (after the importorskips)
from openstack import exceptions as os_exc  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Clients do not care about the object store: local only."""
    srv = Server(tmp_path_factory.mktemp("bv-clients")).start()
    yield srv
    srv.stop()


def _project() -> str:
    return uuid.uuid4().hex


# -- helpers -----------------------------------------------------------------------------------


def cinder(server: Server, user: str, project: str, version: str = "3.71"):
    """A cinderclient Client authenticated by its own ``noauth`` keystoneauth plugin, with the
    endpoint ``{url}/v3`` (the plugin appends ``/{project}``), and the contrib extensions
    (``list_extensions``) loaded as the ``cinder`` shell loads them."""
    auth = ks_loading.get_plugin_loader("noauth").load_from_options(
        user_id=user, project_id=project, endpoint=f"{server.url}/v3")
    return cinder_client.Client(version, session=ks_session.Session(auth=auth),
                                extensions=cinder_client.discover_extensions("3"))


def wait_status(get, item_id: str, wanted: set[str], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        item = get(item_id)
        if item.status in wanted:
            return item
        assert time.monotonic() < deadline, f"{item_id} stuck in {item.status}"
        time.sleep(0.1)


def wait_gone(get, item_id: str, not_found: type[Exception], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            item = get(item_id)
        except not_found:
            return
        assert time.monotonic() < deadline, f"{item_id} not deleted: {item.status}"
        time.sleep(0.1)


def cc_volume(cc, size: int = 1, **kw):
    vol = cc.volumes.create(size, **kw)
    return wait_status(cc.volumes.get, vol.id, {"available", "error"})


def cc_backup(cc, volume_id: str, **kw):
    b = cc.backups.create(volume_id, **kw)
    b = wait_status(cc.backups.get, b.id, {"available", "error"})
    assert b.status == "available", b.fail_reason
    return b


# -- python-cinderclient ------------------------------------------------------------------------


def test_cinderclient_negotiates_3_71(server):
    cc = cinder(server, "alice", _project(), "3.0")
    versions = cc.services.server_api_version()
    assert [(v.min_version, v.version, v.status) for v in versions] == [
        ("3.0", "3.71", "CURRENT")]
    assert api_versions.discover_version(cc, api_versions.APIVersion("3.71")) == \
        api_versions.APIVersion("3.71")
    # what the shell does before every command: asks the naked endpoint
    assert cinder_client.get_highest_client_server_version(f"{server.url}/v3") == "3.71"
    # and the server answers at the version the client then sends
    cc = cinder(server, "alice", _project())
    resp, _ = cc.client.get("/backups")
    assert resp.headers["OpenStack-API-Version"] == "volume 3.71"


def test_cinderclient_backup_lifecycle(server):
    project = _project()
    cc = cinder(server, "alice", project)
    api = server.client("alice", project)
    vol = cc_volume(cc, 1, name="src", metadata={"k": "v"})
    api.write(vol.id, 0, b"cinderclient" * 1000)
    source_sha = api.volume_sha256(vol.id)

    b = cc.backups.create(vol.id, name="b1", description="first", metadata={"m": "1"})
    assert b.name == "b1"
    assert cc.volumes.get(vol.id).status in ("backing-up", "available")
    b = wait_status(cc.backups.get, b.id, {"available", "error"})
    assert b.status == "available", b.fail_reason
    assert (b.volume_id, b.size, b.is_incremental, b.has_dependent_backups) == (
        vol.id, 1, False, False)
    assert b.metadata == {"m": "1"}
    assert b.description == "first"
    assert wait_status(cc.volumes.get, vol.id, {"available"}).status == "available"

    # list (summary and detail), search options, show
    summary = cc.backups.list(detailed=False)
    assert [(x.id, x.name) for x in summary] == [(b.id, "b1")]
    detail = cc.backups.list(search_opts={"status": "available", "name": "b1"})
    assert [x.id for x in detail] == [b.id] and detail[0].status == "available"
    assert cc.backups.list(search_opts={"name": "nope"}) == []
    assert cc.backups.list(search_opts={"all_tenants": 1}) == detail  # dropped for non-admin

    # update (3.9)
    updated = cc.backups.update(b.id, name="b1-renamed", description="renamed")
    assert updated["backup"]["id"] == b.id and updated["backup"]["name"] == "b1-renamed"
    shown = cc.backups.get(b.id)
    assert (shown.name, shown.description) == ("b1-renamed", "renamed")
    with pytest.raises(cinder_exc.VersionNotFoundForAPIMethod):
        cinder(server, "alice", project, "3.8").backups.update(b.id, name="x")

    # restore into a new volume
    r = cc.restores.restore(b.id, name="restored")
    assert r.backup_id == b.id and r.volume_name == "restored"
    new = wait_status(cc.volumes.get, r.volume_id, {"available", "error", "error_restoring"})
    assert new.status == "available" and new.size == 1
    assert wait_status(cc.backups.get, b.id, {"available"}).status == "available"
    assert api.volume_sha256(new.id) == source_sha

    # restore into an existing volume
    target = cc_volume(cc, 2, name="target")
    r = cc.restores.restore(b.id, volume_id=target.id)
    assert (r.backup_id, r.volume_id, r.volume_name) == (b.id, target.id, "target")
    target = wait_status(cc.volumes.get, target.id, {"available", "error_restoring"})
    assert target.status == "available"
    wait_status(cc.backups.get, b.id, {"available"})

    # a backup that is in use cannot be deleted; afterwards it can
    cc.backups.delete(b.id)
    wait_gone(cc.backups.get, b.id, cinder_exc.NotFound)
    assert cc.backups.list() == []
    with pytest.raises(cinder_exc.NotFound):
        cc.backups.get(b.id)


def test_cinderclient_incremental_and_snapshot_backup(server):
    project = _project()
    cc = cinder(server, "alice", project)
    api = server.client("alice", project)
    vol = cc_volume(cc, 1)
    api.write(vol.id, 0, b"A" * MiB)
    full = cc_backup(cc, vol.id, name="full")
    api.write(vol.id, 4 * MiB, b"B" * MiB)
    incr = cc_backup(cc, vol.id, name="incr", incremental=True)
    assert incr.is_incremental is True
    assert cc.backups.get(full.id).has_dependent_backups is True
    with pytest.raises(cinder_exc.BadRequest) as err:
        cc.backups.delete(full.id)
    assert "Incremental backups exist for this backup" in str(err.value)

    # restore the incremental: the data of both layers
    want = api.volume_sha256(vol.id)
    r = cc.restores.restore(incr.id, name="from-incr")
    assert wait_status(cc.volumes.get, r.volume_id, {"available", "error"}).status == \
        "available"
    wait_status(cc.backups.get, incr.id, {"available"})
    assert api.volume_sha256(r.volume_id) == want

    # a backup of a snapshot
    snap = cc.volume_snapshots.create(vol.id, name="snap")
    snap = wait_status(cc.volume_snapshots.get, snap.id, {"available", "error"})
    assert snap.status == "available"
    sb = cc_backup(cc, vol.id, snapshot_id=snap.id, name="from-snap")
    assert (sb.snapshot_id, sb.volume_id) == (snap.id, vol.id)
    assert wait_status(cc.volume_snapshots.get, snap.id, {"available"}).status == "available"

    for b in (incr, sb):
        cc.backups.delete(b.id)
        wait_gone(cc.backups.get, b.id, cinder_exc.NotFound)
    cc.backups.delete(full.id)
    wait_gone(cc.backups.get, full.id, cinder_exc.NotFound)


def test_cinderclient_admin_export_import_reset_force_delete(server):
    project = _project()
    cc = cinder(server, "alice", project)
    admin = cinder(server, "admin", "admin")
    vol = cc_volume(cc, 1)
    b = cc_backup(cc, vol.id, name="exported")

    with pytest.raises(cinder_exc.Forbidden):
        cc.backups.export_record(b.id)
    record = admin.backups.export_record(b.id)
    assert record["backup_service"].startswith("cinder.backup.drivers.")
    # what tempest does: decode, give the record a new id, import it
    decoded = json.loads(base64.b64decode(record["backup_url"]))
    new_id = str(uuid.uuid4())
    decoded["id"] = new_id
    url = base64.b64encode(json.dumps(decoded).encode()).decode()
    imported = admin.backups.import_record(record["backup_service"], url)
    assert imported["id"] == new_id and imported["name"] is None
    imported = wait_status(admin.backups.get, new_id, {"available", "error"})
    assert imported.status == "available", imported.fail_reason
    assert new_id in [x.id for x in admin.backups.list()]
    assert new_id in [x.id for x in admin.backups.list(search_opts={"all_tenants": 1})]
    # all tenants: the admin sees alice's backup too, alice does not see the import
    assert b.id in [x.id for x in admin.backups.list(search_opts={"all_tenants": 1})]
    assert [x.id for x in cc.backups.list()] == [b.id]

    # reset-status as admin; the user sees it
    with pytest.raises(cinder_exc.Forbidden):
        cc.backups.reset_state(b.id, "error")
    admin.backups.reset_state(b.id, "error")
    assert cc.backups.get(b.id).status == "error"
    admin.backups.reset_state(b.id, "available")
    assert cc.backups.get(b.id).status == "available"

    # the original is still restorable by the user
    r = cc.restores.restore(b.id, name="after-import")
    assert wait_status(cc.volumes.get, r.volume_id, {"available", "error"}).status == \
        "available"
    wait_status(cc.backups.get, b.id, {"available"})

    # force-delete as admin (also out of a non-final status)
    admin.backups.reset_state(b.id, "error")
    with pytest.raises(cinder_exc.Forbidden):
        cc.backups.delete(b.id, force=True)
    admin.backups.delete(b.id, force=True)
    wait_gone(cc.backups.get, b.id, cinder_exc.NotFound)
    admin.backups.delete(new_id)
    wait_gone(admin.backups.get, new_id, cinder_exc.NotFound)


def test_cinderclient_types_zones_extensions_volume_from_backup(server):
    project = _project()
    cc = cinder(server, "alice", project)
    [vt] = cc.volume_types.list()
    assert (vt.name, vt.is_public, vt.extra_specs) == ("__DEFAULT__", True, {})
    assert cc.volume_types.default().id == vt.id == cc.volume_types.get(vt.id).id
    with pytest.raises(cinder_exc.NotFound):
        cc.volume_types.get("nope")
    [az] = cc.availability_zones.list()
    assert (az.zoneName, az.zoneState) == ("nova", {"available": True})
    aliases = {e.alias for e in cc.list_extensions.show_all()}
    assert {"backups", "os-availability-zone", "os-quota-sets", "os-admin-actions"} <= aliases

    vol = cc_volume(cc, 1, volume_type="__DEFAULT__")
    assert (vol.volume_type, vol.volume_type_id) == ("__DEFAULT__", vt.id)
    with pytest.raises(cinder_exc.NotFound):
        cc.volumes.create(1, volume_type="gold")
    api = server.client("alice", project)
    api.write(vol.id, 0, b"from-backup" * 999)
    b = cc_backup(cc, vol.id)
    # 3.47: create a volume from a backup
    new = cc.volumes.create(None, backup_id=b.id, name="from-backup")
    new = wait_status(cc.volumes.get, new.id, {"available", "error", "error_restoring"})
    assert (new.status, new.size) == ("available", 1)
    assert api.volume_sha256(new.id) == api.volume_sha256(vol.id)
    wait_status(cc.backups.get, b.id, {"available"})
    with pytest.raises(cinder_exc.BadRequest):  # smaller than the backup
        cinder(server, "alice", project).volumes.create(0, backup_id=b.id)


def _env() -> dict[str, str]:
    """The test's environment without any OS_* / Cinder_* settings of the machine."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("OS_", "Cinder_", "CINDER_"))}


def test_cinder_shell_noauth(server):
    project = _project()
    base = [sys.executable, "-m", "cinderclient.shell", "--os-auth-type", "noauth",
            "--os-user-id", "alice", "--os-project-id", project,
            "--os-endpoint", f"{server.url}/v3"]

    def cinder_cli(*args: str) -> str:
        p = subprocess.run(base + list(args), check=False, capture_output=True, text=True,
                           env=_env(), timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout

    out = cinder_cli("api-version")
    assert "3.71" in out
    cinder_cli("create", "1", "--name", "shellvol")
    cinder_cli("backup-create", "shellvol", "--name", "shellbackup")
    cc = cinder(server, "alice", project)
    [b] = cc.backups.list()
    wait_status(cc.backups.get, b.id, {"available"})
    assert "shellbackup" in cinder_cli("backup-list")
    assert "available" in cinder_cli("backup-show", "shellbackup")
    cinder_cli("backup-delete", "shellbackup")
    wait_gone(cc.backups.get, b.id, cinder_exc.NotFound)


# -- openstacksdk --------------------------------------------------------------------------------


def sdk_none(server: Server):
    """``auth_type: none`` as in a clouds.yaml: the SDK sends ``X-Auth-Token: notused``, so
    blockvault sees user and project ``notused``; URLs carry no project id (3.67 style)."""
    return os_connection.Connection(
        auth_type="none", block_storage_endpoint_override=f"{server.url}/v3",
        region_name="RegionOne")


def sdk_token(server: Server, user: str, project: str):
    """``auth_type: admin_token`` with a ``user:project`` token: any user, and admins."""
    return os_connection.Connection(
        auth_type="admin_token", auth={"endpoint": f"{server.url}/v3",
                                       "token": f"{user}:{project}"},
        region_name="RegionOne")


def test_sdk_noauth_backup_lifecycle(server):
    conn = sdk_none(server)
    bs = conn.block_storage
    assert bs.get_endpoint().rstrip("/") == f"{server.url}/v3"
    vol = bs.create_volume(size=1, name="sdkvol")
    vol = bs.wait_for_status(vol, "available", wait=60, interval=0.1)
    assert vol.user_id == "notused"
    b = bs.create_backup(volume_id=vol.id, name="sdkbackup", description="by the SDK")
    assert b.name == "sdkbackup"
    b = bs.wait_for_status(b, "available", failures=["error"], wait=120, interval=0.1)
    assert (b.volume_id, b.size, b.is_incremental) == (vol.id, 1, False)

    got = bs.get_backup(b.id)
    assert (got.id, got.name, got.description, got.status) == (
        b.id, "sdkbackup", "by the SDK", "available")
    assert b.id in [x.id for x in bs.backups()]
    assert b.id in [x.id for x in bs.backups(details=False)]
    assert [x.id for x in bs.backups(name="sdkbackup")] == [b.id]
    assert bs.find_backup("sdkbackup").id == b.id

    bs.update_backup(b, name="sdkbackup2")
    assert bs.get_backup(b.id).name == "sdkbackup2"

    bs.restore_backup(b, name="sdk-restored")
    bs.wait_for_status(bs.get_backup(b.id), "available", wait=120, interval=0.1)
    [new] = [v for v in bs.volumes() if v.name == "sdk-restored"]
    assert bs.wait_for_status(new, "available", failures=["error", "error_restoring"],
                              wait=120, interval=0.1).size == 1

    target = bs.wait_for_status(bs.create_volume(size=1, name="sdk-target"), "available",
                                wait=60, interval=0.1)
    bs.restore_backup(b, volume=target)
    bs.wait_for_status(bs.get_backup(b.id), "available", wait=120, interval=0.1)
    bs.wait_for_status(bs.get_volume(target.id), "available", failures=["error_restoring"],
                       wait=120, interval=0.1)

    bs.delete_backup(b)
    bs.wait_for_delete(b, interval=0.1, wait=120)
    with pytest.raises(os_exc.NotFoundException):
        bs.get_backup(b.id)


def test_sdk_admin_token_admin_actions(server):
    project = _project()
    user = sdk_token(server, "alice", project).block_storage
    admin = sdk_token(server, "admin", "admin").block_storage
    vol = user.wait_for_status(user.create_volume(size=1), "available", wait=60, interval=0.1)
    b = user.wait_for_status(user.create_backup(volume_id=vol.id, name="adm"), "available",
                             failures=["error"], wait=120, interval=0.1)
    record = admin.export_backup(b)["backup-record"]
    assert record["backup_service"].startswith("cinder.backup.drivers.")
    with pytest.raises(os_exc.ForbiddenException):
        user.export_backup(b)

    with pytest.raises(os_exc.ForbiddenException):
        user.reset_backup_status(b, "error")
    admin.reset_backup_status(b, "error")
    assert user.get_backup(b.id).status == "error"
    assert b.id in [x.id for x in admin.backups(all_projects=True)]
    admin.delete_backup(b, force=True)
    user.wait_for_delete(b, interval=0.1, wait=120)


def test_sdk_types_and_availability_zones(server):
    bs = sdk_none(server).block_storage
    assert [t.name for t in bs.types()] == ["__DEFAULT__"]
    assert bs.find_type("__DEFAULT__").id == bs.get_type(next(iter(bs.types())).id).id
    assert [(z.name, z.state) for z in bs.availability_zones()] == [
        ("nova", {"available": True})]


def test_sdk_incremental_and_snapshot(server):
    bs = sdk_token(server, "alice", _project()).block_storage
    vol = bs.wait_for_status(bs.create_volume(size=1), "available", wait=60, interval=0.1)
    full = bs.wait_for_status(bs.create_backup(volume_id=vol.id), "available",
                              failures=["error"], wait=120, interval=0.1)
    incr = bs.wait_for_status(bs.create_backup(volume_id=vol.id, is_incremental=True),
                              "available", failures=["error"], wait=120, interval=0.1)
    assert incr.is_incremental is True
    assert bs.get_backup(full.id).has_dependent_backups is True
    snap = bs.wait_for_status(bs.create_snapshot(volume_id=vol.id), "available", wait=60,
                              interval=0.1)
    sb = bs.wait_for_status(bs.create_backup(volume_id=vol.id, snapshot_id=snap.id),
                            "available", failures=["error"], wait=120, interval=0.1)
    assert sb.snapshot_id == snap.id
    for b in (incr, sb, full):
        bs.delete_backup(b)
        bs.wait_for_delete(b, interval=0.1, wait=120)


# -- the openstack CLI (python-openstackclient) ----------------------------------------------


def osc(server: Server, *args: str, token: str | None = None, fmt: bool = True):
    """``openstack ...`` as a subprocess. With ``token`` (``user:project``) it uses
    ``--os-auth-type admin_token``, otherwise ``--os-auth-type none`` (user ``notused``)."""
    cmd = [sys.executable, "-m", "openstackclient.shell"]
    if token:
        cmd += ["--os-auth-type", "admin_token", "--os-token", token]
    else:
        cmd += ["--os-auth-type", "none"]
    cmd += ["--os-endpoint", f"{server.url}/v3", *args]
    if fmt:
        cmd += ["-f", "json"]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, f"{args}: {p.stderr}"
    return json.loads(p.stdout) if fmt and p.stdout.strip() else p.stdout


def osc_wait(server: Server, kind: str, item_id: str, wanted: set[str],
             token: str = "notused:notused") -> dict:
    """Polls over plain HTTP (one CLI run costs about 2 s)."""
    user, _, project = token.partition(":")
    return server.client(user, project).wait(kind, item_id, wanted)


def test_openstack_cli_noauth(server):
    vol = osc(server, "volume", "create", "--size", "1", "oscvol")
    assert vol["name"] == "oscvol" and vol["size"] == 1
    b = osc(server, "volume", "backup", "create", "--name", "oscbackup",
            "--description", "via OSC", "oscvol")
    assert b["name"] == "oscbackup" and b["volume_id"] == vol["id"]
    assert osc_wait(server, "backup", b["id"], {"available", "error"})["status"] == "available"
    shown = osc(server, "volume", "backup", "show", "oscbackup")
    assert (shown["name"], shown["description"], shown["volume_id"]) == (
        "oscbackup", "via OSC", vol["id"])
    listed = osc(server, "volume", "backup", "list")
    assert [(x["ID"], x["Status"]) for x in listed if x["ID"] == b["id"]] == [
        (b["id"], "available")]
    assert any(x["ID"] == b["id"] for x in osc(server, "volume", "backup", "list", "--long"))
    assert [x["Name"] for x in osc(server, "volume", "type", "list")] == ["__DEFAULT__"]
    assert [x["Zone Name"] for x in osc(server, "availability", "zone", "list", "--volume")
            ] == ["nova"]

    r = osc(server, "volume", "backup", "restore", "oscbackup", "oscrestored")
    assert r["id"] == b["id"] and r["volume_name"] == "oscrestored"
    assert osc_wait(server, "volume", r["volume_id"], {"available", "error"})["status"] == \
        "available"
    osc_wait(server, "backup", b["id"], {"available"})
    r = osc(server, "volume", "backup", "restore", "--force", "oscbackup", "oscvol")
    assert r["volume_id"] == vol["id"]
    assert osc_wait(server, "volume", vol["id"], {"available", "error_restoring"})[
        "status"] == "available"
    osc_wait(server, "backup", b["id"], {"available"})

    osc(server, "volume", "backup", "delete", "oscbackup", fmt=False)
    osc_wait(server, "backup", b["id"], {"deleted"})


def test_openstack_cli_admin_token(server):
    user = f"alice:{_project()}"
    osc(server, "volume", "create", "--size", "1", "v", token=user)
    b = osc(server, "volume", "backup", "create", "--name", "bk", "v", token=user)
    osc_wait(server, "backup", b["id"], {"available"}, token=user)
    osc(server, "volume", "backup", "set", "--name", "bk2", "--description", "d", "bk",
        fmt=False, token=user)
    shown = osc(server, "volume", "backup", "show", b["id"], token=user)
    assert (shown["name"], shown["description"]) == ("bk2", "d")
    osc(server, "volume", "backup", "set", "--state", "error", b["id"], fmt=False,
        token="admin:admin")
    assert osc(server, "volume", "backup", "show", b["id"], token=user)["status"] == "error"
    listed = osc(server, "volume", "backup", "list", "--all-projects", token="admin:admin")
    assert b["id"] in [x["ID"] for x in listed]
    osc(server, "volume", "backup", "delete", "--force", b["id"], fmt=False,
        token="admin:admin")
    osc_wait(server, "backup", b["id"], {"deleted"}, token=user)
