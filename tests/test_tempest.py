"""Tempest's volume backup tests against blockvault behind a real Keystone (issue 10).

A Keystone from PyPI (tools/keystone/start-keystone.sh) with blockvault registered as
``block-storage``/``volumev3`` and two projects with a reader, a member and an admin each
(tools/keystone/setup_blockvault.py); blockvault with ``auth_strategy = "keystone"``; then
tools/tempest/run-tempest.sh, which installs Tempest and cinder-tempest-plugin into their own
cached venv, writes tempest.conf for a volume-only cloud (no compute, image, network or
object store) and runs, with pre-provisioned accounts, the backup tests (suite ``backups``)
and the plugin's backup RBAC tests (suite ``rbac``). Every test that needs no server and no
image must pass; the others are skipped by Tempest's own ``[service_available]``.
docs/clients.md ("Tempest") lists both.

Budget: the whole module in under 10 minutes on two cores, the first run's pip installs of
Keystone and Tempest included (about 40 s each here); the two Tempest runs take ~40 s each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.keystone import ADMIN_PASSWORD, TOOLS, keystone_process
from tests.server import Server

pytest.importorskip("keystonemiddleware.auth_token")
pytest.importorskip("keystoneauth1.session")

ROOT = Path(__file__).resolve().parents[1]

RUN_TEMPEST = ROOT / "tools" / "tempest" / "run-tempest.sh"

B = "tempest.api.volume."
P = "cinder_tempest_plugin.api.volume."
R = "cinder_tempest_plugin.rbac.v3.test_backups."
#: need nothing but the volume API (and Keystone): these must pass
EXPECTED_PASS = {
    B + "test_volumes_backup.VolumesBackupsTest."
        "test_volume_backup_create_get_detailed_list_restore_delete",
    B + "test_volumes_backup.VolumesBackupsV39Test.test_update_backup",
    B + "admin.test_volumes_backup.VolumesBackupsAdminTest.test_volume_backup_export_import",
    B + "admin.test_volumes_backup.VolumesBackupsAdminTest.test_volume_backup_reset_status",
    B + "test_volumes_snapshots.VolumesSnapshotTestJSON.test_snapshot_backup",
    B + "admin.test_volume_quotas.VolumeQuotasAdminTestJSON.test_list_quotas",
    B + "admin.test_volume_quotas.VolumeQuotasAdminTestJSON.test_list_default_quotas",
    B + "admin.test_volume_quotas.VolumeQuotasAdminTestJSON."
        "test_update_all_quota_resources_for_tenant",
    B + "admin.test_volume_quotas.VolumeQuotasAdminTestJSON.test_show_quota_usage",
    # cinder-tempest-plugin
    P + "test_volume_backup.VolumesBackupsTest.test_volume_snapshot_backup",
    P + "test_volume_backup.VolumesBackupsTest."
        "test_backup_create_and_restore_to_an_existing_volume",
    P + "test_volume_backup.VolumesBackupsTest."
        "test_incr_backup_create_and_restore_to_an_existing_volume",
    P + "admin.test_volume_backup.VolumesBackupsTest.test_backup_crossproject_admin_negative",
    P + "admin.test_volume_backup.VolumesBackupsTest.test_backup_crossproject_user_negative",
    P + "admin.test_volume_backup.VolumesBackupsTest."
        "test_incremental_backup_respective_parents",
}
#: need a server (nova) or an image (glance): Tempest skips them, and says why
EXPECTED_SKIP = {
    B + "test_volumes_backup.VolumesBackupsTest.test_backup_create_attached_volume":
        "compute service is not available",
    B + "test_volumes_backup.VolumesBackupsTest.test_bootable_volume_backup_and_restore":
        "image service is not available",
    B + "test_volumes_backup.VolumesBackupsTest.test_volume_backup_incremental":
        "compute service is not available",
}
_RBAC_CALLS = ("list_backups", "list_project_backups", "show_backup", "create_backup",
               "delete_backup", "restore_backup", "export_backup", "import_backup",
               "reset_backup_status")
#: cinder-tempest-plugin's backup RBAC tests: every call as the project's admin and member
#: (allowed or refused as Cinder's default policy says: the tests assert the status), and
#: as its reader but the four the plugin itself skips (launchpad bug 2017110)
RBAC_SKIP = {R + "ProjectReaderTests33.test_" + c
             for c in ("create_backup", "delete_backup", "restore_backup")} | {
    R + "ProjectReaderTests39.test_update_backup"}
RBAC_PASS = ({R + f"Project{who}Tests33.test_{call}" for who in ("Admin", "Member", "Reader")
              for call in _RBAC_CALLS} | {R + f"Project{who}Tests39.test_update_backup"
                                          for who in ("Admin", "Member", "Reader")}) - RBAC_SKIP
#: one whole run of the script, install included (the module's budget is 10 minutes)
TEMPEST_TIMEOUT = 420


def _load_setup_tool():
    spec = importlib.util.spec_from_file_location("setup_blockvault",
                                                  TOOLS / "setup_blockvault.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pypi_unreachable() -> str | None:
    """Why PyPI cannot be reached (pip's own words), or None when it answers."""
    p = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "tempest"],
                       capture_output=True, text=True, timeout=180)
    if p.returncode == 0:
        return None
    text = (p.stderr or p.stdout).strip().splitlines()
    return text[-1] if text else f"pip exited {p.returncode}"


@pytest.fixture(scope="module")
def tempest_venv(tmp_path_factory):
    """The script's venv, installed now (timed) so that the run below measures Tempest."""
    if os.environ.get("BLOCKVAULT_SKIP_TEMPEST") == "1":
        pytest.skip("BLOCKVAULT_SKIP_TEMPEST=1")
    run = tmp_path_factory.mktemp("tempest-install")
    started = time.monotonic()
    p = subprocess.run(["bash", str(RUN_TEMPEST), str(run)], capture_output=True, text=True,
                       env={**os.environ, "TEMPEST_INSTALL_ONLY": "1"}, timeout=TEMPEST_TIMEOUT)
    if p.returncode != 0:
        why = _pypi_unreachable()
        if why is not None:
            pytest.skip(f"PyPI is unreachable, so Tempest cannot be installed: {why}")
        pytest.fail(f"installing Tempest failed:\n{p.stderr[-3000:]}")
    print(f"tempest venv ready in {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def keystone(tmp_path_factory):
    with keystone_process(tmp_path_factory.mktemp("keystone")) as url:
        yield f"{url}/v3"


def _accounts(password: str, suite: str) -> list[dict]:
    """Tempest's pre-provisioned accounts. backups: ``primary`` and ``project_reader`` are
    tempest1's member and reader, the quota tests' ``alt`` tempest2's member, the admin
    the cloud's (project ``admin``: the plugin's cross-project tests need the admin outside
    the primary's project). rbac: tempest1's member, reader and admin (``project_admin``
    must be in the same project)."""
    def user(name: str, project: str, role: str) -> dict:
        return {"username": name, "project_name": project, "password": password,
                "roles": [role]}
    accounts = [user("tempest1-member", "tempest1", "member"),
                user("tempest1-reader", "tempest1", "reader")]
    if suite == "rbac":
        return [*accounts, user("tempest1-admin", "tempest1", "admin")]
    return [*accounts, user("tempest2-member", "tempest2", "member"),
            {"username": "admin", "project_name": "admin", "password": ADMIN_PASSWORD,
             "types": ["admin"]}]


@pytest.fixture(scope="module")
def deployment(tempest_venv, keystone, tmp_path_factory):
    """blockvault with ``auth_strategy = "keystone"``, registered in Keystone's catalog."""
    service_password = "svc-" + secrets.token_urlsafe(12)
    user_password = "usr-" + secrets.token_urlsafe(12)
    data = tmp_path_factory.mktemp("bv-tempest")
    config = data / "blockvault.toml"
    config.write_text("\n".join([
        'auth_strategy = "keystone"',
        "",
        "[keystone_authtoken]",
        f'www_authenticate_uri = "{keystone}"',
        f'auth_url = "{keystone}"',
        'auth_type = "password"',
        'username = "blockvault"',
        f'password = "{service_password}"',
        'user_domain_name = "Default"',
        'project_name = "service"',
        'project_domain_name = "Default"',
        'interface = "public"',
        'region_name = "RegionOne"',
    ]) + "\n")
    server = Server(data, {"BLOCKVAULT_CONFIG": str(config)})
    _load_setup_tool().setup(keystone, ADMIN_PASSWORD, server.url, service_password,
                             ["tempest1", "tempest2"], user_password)
    accounts = {}
    for suite in ("backups", "rbac"):
        accounts[suite] = data / f"accounts-{suite}.yaml"
        # YAML is a superset of JSON: no YAML library needed to write it
        accounts[suite].write_text(json.dumps(_accounts(user_password, suite), indent=1))
    server.start()
    try:
        yield {"server": server, "auth_url": keystone, "accounts": accounts}
    finally:
        server.stop()


def _short(test_id: str) -> str:
    return re.sub(r"\[.*\]$", "", test_id)


def _run(deployment, run_dir: Path, suite: str) -> dict:
    """Runs the script, checks nothing failed and the server logged no error; the results."""
    server = deployment["server"]
    env = {
        **os.environ,
        "OS_AUTH_URL": deployment["auth_url"],
        "TEMPEST_SUITE": suite,
        "TEMPEST_ACCOUNTS_FILE": str(deployment["accounts"][suite]),
        "BLOCKVAULT_URL": server.url,
        # VolumesBackupsTest and VolumesSnapshotTestJSON are gated on neutron as a whole
        # although their volume-only tests never call it (docs/clients.md, "Tempest")
        "TEMPEST_NEUTRON_GATE": "open",
        "TEMPEST_TIMEOUT": str(TEMPEST_TIMEOUT - 60),
    }
    started = time.monotonic()
    p = subprocess.run(["bash", str(RUN_TEMPEST), str(run_dir)], env=env,
                       capture_output=True, text=True, timeout=TEMPEST_TIMEOUT)
    elapsed = time.monotonic() - started
    print(f"tempest run ({suite}): {elapsed:.1f} s, exit {p.returncode}\n{p.stderr[-2000:]}")
    results_file = run_dir / "results.json"
    assert results_file.exists(), (p.stderr[-3000:],
                                   (run_dir / "run.log").read_text()[-5000:])
    results = json.loads(results_file.read_text())
    failed = {k: v["details"][-2500:] for k, v in results.items()
              if v["status"] not in ("success", "skip")}
    assert not failed, "Tempest failures:\n" + "\n\n".join(
        f"{k}:\n{v}" for k, v in failed.items())
    assert p.returncode == 0, p.stderr[-3000:]
    # what Tempest did left no server-side error behind
    log = server.log()
    assert "Traceback" not in log, log[-5000:]
    assert not re.search(r'" 5\d\d ', log), [line for line in log.splitlines()
                                             if re.search(r'" 5\d\d ', line)]
    return results


def _check(results: dict, expect_pass: set[str], expect_skip: dict[str, str]) -> None:
    passed = {_short(k) for k, v in results.items() if v["status"] == "success"}
    assert expect_pass <= passed, f"expected to pass but did not: " \
                                  f"{sorted(expect_pass - passed)}"
    skipped = {_short(k): v["details"] for k, v in results.items() if v["status"] == "skip"}
    assert set(skipped) == set(expect_skip), skipped
    for test, reason in expect_skip.items():
        assert reason in skipped[test], (test, skipped[test])


def test_tempest_backup_tests(deployment, tmp_path):
    _check(_run(deployment, tmp_path, "backups"), EXPECTED_PASS, EXPECTED_SKIP)


def test_tempest_backup_rbac_tests(deployment, tmp_path):
    _check(_run(deployment, tmp_path, "rbac"), RBAC_PASS,
           {test: "2017110" for test in RBAC_SKIP})


# -- what Tempest found, pinned without Tempest (noauth, no Keystone: runs everywhere) ------


@pytest.fixture
def noauth_server(tmp_path):
    srv = Server(tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_snapshot_and_volume_replies_as_tempest_schemas_want(noauth_server):
    """Cinder's extensions add their attributes to show and the detail list only: Tempest's
    create/update schemas (``additionalProperties: false``) refuse them, and its show schema
    requires the snapshot's project for whoever sees it."""
    admin = noauth_server.client("admin", "proja")
    alice = noauth_server.client("alice", "proja")
    r = admin.post("/volumes", {"volume": {"size": 1}})
    assert r.status_code == 202, r.text
    vol = r.json()["volume"]
    assert not [k for k in vol if k.startswith("os-vol-")], vol
    alice.wait("volume", vol["id"], {"available"})
    assert not [k for k in admin.put(f"/volumes/{vol['id']}", {"volume": {"name": "n"}})
                .json()["volume"] if k.startswith("os-vol-")]
    shown = admin.get(f"/volumes/{vol['id']}").json()["volume"]
    assert shown["os-vol-tenant-attr:tenant_id"] == "proja"
    assert "os-vol-tenant-attr:tenant_id" not in alice.get(f"/volumes/{vol['id']}").json()[
        "volume"]  # admin-only, as Cinder

    ext = ("os-extended-snapshot-attributes:progress", "os-extended-snapshot-attributes:project_id")
    r = alice.post("/snapshots", {"snapshot": {"volume_id": vol["id"], "name": "s"}})
    assert r.status_code == 202, r.text
    snap = r.json()["snapshot"]
    assert not set(ext) & set(snap), snap
    alice.wait("snapshot", snap["id"], {"available"})
    r = alice.put(f"/snapshots/{snap['id']}", {"snapshot": {"name": "t"}})
    assert not set(ext) & set(r.json()["snapshot"]), r.text
    assert not set(ext) & set(alice.get("/snapshots").json()["snapshots"][0])
    for body in (alice.get(f"/snapshots/{snap['id']}").json()["snapshot"],
                 alice.get("/snapshots/detail").json()["snapshots"][0]):
        assert (body[ext[0]], body[ext[1]]) == ("100%", "proja"), body
    # a null volume_id passes Cinder's schema and finds no volume
    r = alice.post("/snapshots", {"snapshot": {"volume_id": None, "name": "s"}})
    assert (r.status_code, r.json()) == (404, {"itemNotFound": {
        "code": 404, "message": "Volume None could not be found."}}), r.text


def test_quota_set_has_groups_and_per_volume_gigabytes(noauth_server):
    admin = noauth_server.client("admin", "admin")
    alice = noauth_server.client("alice", "proja")
    d = alice.get("/os-quota-sets/proja/defaults").json()["quota_set"]
    assert (d["groups"], d["per_volume_gigabytes"]) == (10, -1)
    r = admin.put("/os-quota-sets/proja", {"quota_set": {"per_volume_gigabytes": 2,
                                                         "groups": 3}})
    assert r.status_code == 200, r.text
    assert (r.json()["quota_set"]["per_volume_gigabytes"], r.json()["quota_set"]["groups"]) \
        == (2, 3)
    q = alice.get("/os-quota-sets/proja?usage=true").json()["quota_set"]
    assert q["per_volume_gigabytes"] == {"limit": 2, "in_use": 0, "reserved": 0,
                                         "allocated": 0}
    # the cap is Cinder's VolumeSizeExceedsLimit, on create and on extend
    r = alice.post("/volumes", {"volume": {"size": 3}})
    assert r.status_code == 413, r.text
    assert r.json()["overLimit"]["message"] == (
        "VolumeSizeExceedsLimit: Requested volume size 3G is larger than maximum allowed "
        "limit 2G.")
    vol = alice.create_volume(2)
    alice.wait("volume", vol, {"available"})
    r = alice.post(f"/volumes/{vol}/action", {"os-extend": {"new_size": 3}})
    assert r.status_code == 413, r.text
    assert "larger than maximum allowed limit 2G" in r.json()["overLimit"]["message"]
    assert alice.get(f"/volumes/{vol}").json()["volume"]["size"] == 2
