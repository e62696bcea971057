"""Authorization with oslo.policy and Cinder's rule names, against a real server: the
reader/member/admin matrix of cinder-tempest-plugin's RBAC tests (reference §7.9) with API
keys made by the real ``blockvault apikey`` CLI, a policy.yaml override taking effect on a
running server, and ``blockvault policy`` listing exactly the rules the code enforces."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from blockvault.service import policy
from tests.server import Api, Server

ROOT = Path(__file__).resolve().parent.parent


def forbidden(rule: str) -> dict:
    return {"forbidden": {"code": 403, "message": f"Policy doesn't allow {rule} to be performed."}}


def bv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockvault.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def key_client(server: Server, project: str, user: str, *roles: str) -> Api:
    """A client whose token is an API key with ``roles`` in ``project``."""
    args = ["apikey", "create", "--data-dir", str(server.data_dir), "--project", project,
            "--user", user]
    for role in roles:
        args += ["--role", role]
    out = bv(*args)
    assert out.returncode == 0, out.stderr
    api = server.client(user, project)
    api.http.headers["X-Auth-Token"] = out.stdout.strip()
    return api


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("bv-policy"),
                 {"BLOCKVAULT_AUTH_STRATEGY": "apikey"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def people(server):
    """A reader and a member of one project, and an admin of another (Keystone-style: the
    admin's project is its own, its role reaches every project)."""
    project = uuid.uuid4().hex
    return {
        "reader": key_client(server, project, "rita", "reader"),
        "member": key_client(server, project, "mona", "member"),
        "admin": key_client(server, "ops", "ada", "admin"),
        "outsider": key_client(server, uuid.uuid4().hex, "otto", "member"),
    }


def _import_body(exported: dict, new_id: str) -> dict:
    """An import of ``exported`` (an export_record reply) under a new id, as Tempest does."""
    record = json.loads(base64.b64decode(exported["backup_url"]))
    record["id"] = new_id
    url = base64.b64encode(json.dumps(record).encode()).decode()
    return {"backup-record": {"backup_service": exported["backup_service"],
                              "backup_url": url}}


#: an import body a non-admin sends: refused by policy before it is even read
ANY_RECORD = {"backup_service": "cinder.backup.drivers.swift", "backup_url": "e30="}


def test_reader_member_admin_matrix(server, people):
    """§7.9: reader lists and shows; member creates, restores and deletes; export, import
    and reset are the admin's. Every refusal is Cinder's 403 body naming the rule."""
    reader, member, admin = people["reader"], people["member"], people["admin"]
    vol = member.create_volume(1)
    backup = member.create_backup(vol)  # member: create 202 (asserted in the helper)

    # reader: list and show 200
    for path in ("/backups", "/backups/detail"):
        r = reader.get(path)
        assert r.status_code == 200, r.text
        assert backup in [b["id"] for b in r.json()["backups"]]
    r = reader.get(f"/backups/{backup}")
    assert r.status_code == 200 and r.json()["backup"]["id"] == backup

    # reader: every write 403, each with its own rule
    refused = [
        (reader.post("/backups", {"backup": {"volume_id": vol}}), "backup:create"),
        (reader.delete(f"/backups/{backup}"), "backup:delete"),
        (reader.post(f"/backups/{backup}/restore", {"restore": {}}), "backup:restore"),
        (reader.get(f"/backups/{backup}/export_record"), "backup:export-import"),
        (reader.post("/backups/import_record", {"backup-record": ANY_RECORD}),
         "backup:backup-import"),
        (reader.post(f"/backups/{backup}/action",
                     {"os-reset_status": {"status": "error"}}),
         "volume_extension:backup_admin_actions:reset_status"),
        (reader.put(f"/backups/{backup}", {"backup": {"name": "x"}},
                    headers={"OpenStack-API-Version": "volume 3.9"}), "backup:update"),
        (reader.post(f"/backups/{backup}/action", {"os-force_delete": {}}),
         "volume_extension:backup_admin_actions:force_delete"),
    ]
    for r, rule in refused:
        assert (r.status_code, r.json()) == (403, forbidden(rule)), (rule, r.text)
    # nothing the reader tried changed the backup
    assert member.get(f"/backups/{backup}").json()["backup"]["status"] == "available"

    # member: export, import and reset 403
    r = member.get(f"/backups/{backup}/export_record")
    assert (r.status_code, r.json()) == (403, forbidden("backup:export-import"))
    r = member.post("/backups/import_record", {"backup-record": ANY_RECORD})
    assert (r.status_code, r.json()) == (403, forbidden("backup:backup-import"))
    r = member.post(f"/backups/{backup}/action", {"os-reset_status": {"status": "error"}})
    assert (r.status_code, r.json()) == (
        403, forbidden("volume_extension:backup_admin_actions:reset_status"))

    # admin (of another project): export 200, import 201, reset 202
    r = admin.get(f"/backups/{backup}/export_record")
    assert r.status_code == 200, r.text
    copy = str(uuid.uuid4())
    r = admin.post("/backups/import_record", _import_body(r.json()["backup-record"], copy))
    assert r.status_code == 201 and r.json()["backup"]["id"] == copy, r.text
    admin.wait("backup", copy, {"available"})

    # member: restore 202, then delete 202
    target = member.restore(backup)
    assert member.get(f"/volumes/{target}").status_code == 200
    r = member.delete(f"/backups/{backup}")
    assert r.status_code == 202, r.text
    member.wait("backup", backup, {"deleted"})
    r = admin.delete(f"/backups/{copy}")
    assert r.status_code == 202, r.text


def test_another_projects_backup_is_404_before_any_policy_check(server, people):
    """A resource of another project is 404 to every non-admin caller and call, never a
    403 that would tell it exists (Cinder looks the backup up before the policy check)."""
    member, outsider = people["member"], people["outsider"]
    backup = member.create_backup(member.create_volume(1))
    missing = f"Backup {backup} could not be found."
    calls = [
        outsider.get(f"/backups/{backup}"),
        outsider.get(f"/backups/{backup}/export_record"),
        outsider.post(f"/backups/{backup}/restore", {"restore": {}}),
        outsider.delete(f"/backups/{backup}"),
        outsider.post(f"/backups/{backup}/action", {"os-reset_status": {"status": "error"}}),
        outsider.post(f"/backups/{backup}/action", {"os-force_delete": {}}),
        people["reader"].get(f"/backups/{str(uuid.uuid4())}/export_record"),
    ]
    for r in calls[:-1]:
        assert (r.status_code, r.json()["itemNotFound"]["message"]) == (404, missing), r.text
    assert calls[-1].status_code == 404


def test_reader_and_member_on_volumes_snapshots_quotas_and_types(server, people):
    """The other resources follow Cinder's defaults too: a reader reads, a member writes,
    quota updates and another project's quotas are the admin's."""
    reader, member, admin = people["reader"], people["member"], people["admin"]
    vol = member.create_volume(1)
    for path in (f"/volumes/{vol}", "/volumes/detail", "/snapshots", "/limits", "/types",
                 f"/os-quota-sets/{member.project}", f"/os-quota-sets/{member.project}/defaults"):
        assert reader.get(path).status_code == 200, path
    r = reader.post("/volumes", {"volume": {"size": 1}})
    assert (r.status_code, r.json()) == (403, forbidden("volume:create"))
    r = reader.post("/snapshots", {"snapshot": {"volume_id": vol}})
    assert (r.status_code, r.json()) == (403, forbidden("volume:create_snapshot"))
    r = reader.put(f"/volumes/{vol}/data", content=b"x",
                   headers={"Content-Type": "application/octet-stream"})
    assert (r.status_code, r.json()) == (403, forbidden("blockvault:volume:write_data"))
    r = reader.delete(f"/volumes/{vol}")
    assert (r.status_code, r.json()) == (403, forbidden("volume:delete"))
    r = member.put(f"/os-quota-sets/{member.project}", {"quota_set": {"backups": 5}})
    assert (r.status_code, r.json()) == (403, forbidden("volume_extension:quotas:update"))
    r = member.get("/os-quota-sets/ops")
    assert (r.status_code, r.json()) == (403, forbidden("volume_extension:quotas:show"))
    r = admin.put(f"/os-quota-sets/{member.project}", {"quota_set": {"backups": 5}})
    assert r.status_code == 200 and r.json()["quota_set"]["backups"] == 5
    snap = member.post("/snapshots", {"snapshot": {"volume_id": vol}})
    assert snap.status_code == 202, snap.text
    r = reader.delete(f"/snapshots/{snap.json()['snapshot']['id']}")
    assert (r.status_code, r.json()) == (403, forbidden("volume:delete_snapshot"))


#: the attach handshake steps a hypervisor drives, and Cinder's rule for each
HANDSHAKE = {
    "os-reserve": "volume_extension:volume_actions:reserve",
    "os-unreserve": "volume_extension:volume_actions:unreserve",
    "os-begin_detaching": "volume_extension:volume_actions:begin_detaching",
    "os-roll_detaching": "volume_extension:volume_actions:roll_detaching",
    "os-initialize_connection": "volume_extension:volume_actions:initialize_connection",
    "os-terminate_connection": "volume_extension:volume_actions:terminate_connection",
}


def test_attach_handshake_actions_are_a_members(server, people):
    """The handshake steps change nothing in blockvault, but a reader is refused them under
    Cinder's rule as Cinder refuses it; another project's volume is 404 first."""
    reader, member, outsider = people["reader"], people["member"], people["outsider"]
    vol = member.create_volume(1)
    for action, rule in HANDSHAKE.items():
        arg = {"connector": {}} if action.endswith("_connection") else {}
        r = reader.post(f"/volumes/{vol}/action", {action: arg})
        assert (r.status_code, r.json()) == (403, forbidden(rule)), action
        r = outsider.post(f"/volumes/{vol}/action", {action: arg})
        assert (r.status_code, r.json()["itemNotFound"]["message"]) == \
            (404, f"Volume {vol} could not be found."), action
        r = member.post(f"/volumes/{vol}/action", {action: arg})
        assert r.status_code == 202, (action, r.text)
    r = reader.post(f"/volumes/{vol}/action", {"os-attach": {"mountpoint": "/dev/vdb"}})
    assert (r.status_code, r.json()) == (403, forbidden("volume_extension:volume_actions:attach"))


def test_create_from_a_snapshot_or_volume_checks_get_on_the_source(server, people):
    """Cinder reads the source with its own get rule after volume:create: an operator who
    makes those admin-only keeps members from cloning what they may no longer read."""
    member = people["member"]
    vol = member.create_volume(1)
    snap = member.post("/snapshots", {"snapshot": {"volume_id": vol}})
    assert snap.status_code == 202, snap.text
    snap_id = snap.json()["snapshot"]["id"]
    member.wait("snapshot", snap_id, {"available"})
    policy_file = server.data_dir / "policy.yaml"
    try:
        time.sleep(0.01)
        policy_file.write_text('"volume:get_snapshot": "rule:admin_api"\n'
                               '"volume:get": "rule:admin_api"\n')
        r = member.post("/volumes", {"volume": {"snapshot_id": snap_id}})
        assert (r.status_code, r.json()) == (403, forbidden("volume:get_snapshot"))
        r = member.post("/volumes", {"volume": {"source_volid": vol}})
        assert (r.status_code, r.json()) == (403, forbidden("volume:get"))
        r = people["admin"].post("/volumes", {"volume": {"source_volid": vol}})
        assert r.status_code == 202, r.text
    finally:
        policy_file.unlink(missing_ok=True)
    for body in ({"snapshot_id": snap_id}, {"source_volid": vol}):
        r = member.post("/volumes", {"volume": body})
        assert r.status_code == 202, r.text


def test_admin_only_fields_and_all_tenants_follow_the_policy(server, people):
    """Project attributes (3.18 ``os-backup-project-attr:project_id``) and all_tenants are
    the admin's: an admin sees them, a member with the same microversion does not."""
    member, admin = people["member"], people["admin"]
    backup = member.create_backup(member.create_volume(1))
    mv = {"OpenStack-API-Version": "volume 3.18"}
    assert "os-backup-project-attr:project_id" not in \
        member.get(f"/backups/{backup}", headers=mv).json()["backup"]
    shown = admin.get(f"/backups/{backup}", headers=mv).json()["backup"]
    assert shown["os-backup-project-attr:project_id"] == member.project
    assert backup in [b["id"] for b in
                      admin.get("/backups", params={"all_tenants": "1"}).json()["backups"]]
    r = people["outsider"].get("/backups", params={"all_tenants": "1"})
    assert r.status_code == 200 and backup not in [b["id"] for b in r.json()["backups"]]


def test_policy_file_override_applies_without_restart(server, people):
    """An operator's Cinder policy.yaml lines work as they are, on the running server: the
    file is re-read when it changes, and removing it brings the defaults back."""
    member, admin = people["member"], people["admin"]
    vol = member.create_volume(1)
    policy_file = server.data_dir / "policy.yaml"
    try:
        policy_file.write_text('"backup:create": "role:admin"\n'
                               '"backup:get_all": "rule:admin_or_owner"\n')
        r = member.post("/backups", {"backup": {"volume_id": vol}})
        assert (r.status_code, r.json()) == (403, forbidden("backup:create"))
        # a Cinder legacy rule name still resolves: admin_or_owner lets the member list
        assert member.get("/backups").status_code == 200
        # a file that does not parse is not half-applied: the rules before it stay, and
        # the log says why
        time.sleep(0.01)
        policy_file.write_text('"backup:create": [unclosed\n')
        r = member.post("/backups", {"backup": {"volume_id": vol}})
        assert (r.status_code, r.json()) == (403, forbidden("backup:create"))
        assert f"policy file {policy_file} not loaded" in server.log()
        # An operator delegates export to project members, and context_is_admin decides
        # who is an admin: a caller no longer one sees other projects' backups as missing.
        time.sleep(0.01)
        policy_file.write_text(
            '"backup:export-import": "rule:xena_system_admin_or_project_member"\n'
            '"context_is_admin": "role:cloud_admin"\n')
        backup = member.create_backup(vol)  # create is back to its default
        r = member.get(f"/backups/{backup}/export_record")
        assert r.status_code == 200, r.text
        r = admin.get(f"/backups/{backup}")
        assert r.status_code == 404, r.text
        r = admin.get("/backups", params={"all_tenants": "1"})
        assert backup not in [b["id"] for b in r.json()["backups"]]
    finally:
        policy_file.unlink(missing_ok=True)
    # the file gone: the defaults again, at once
    r = member.get(f"/backups/{backup}/export_record")
    assert (r.status_code, r.json()) == (403, forbidden("backup:export-import"))
    assert admin.get(f"/backups/{backup}").status_code == 200
    assert "Traceback" not in server.log()


# -- blockvault policy: the sample, and no rule without a check (or check without a rule) ------

_SOURCES = [p for p in (ROOT / "blockvault").rglob("*.py")
            if p.name != "policy.py" or p.parent.name != "service"]
_CALL = re.compile(r"""\.(?:authorize|allowed)\(\s*["']([^"']+)["']|rule=["']([^"']+)["']""")


def _rules_used_in_code() -> set[str]:
    used: set[str] = set()
    for path in _SOURCES:
        for match in _CALL.finditer(path.read_text()):
            used.add(match.group(1) or match.group(2))
    return used


def test_policy_command_prints_every_enforced_rule_and_only_those():
    out = bv("policy")
    assert out.returncode == 0, out.stderr
    # Uncommented, the sample is a policy.yaml of the defaults themselves.
    lines = [line[1:] for line in out.stdout.splitlines() if line.startswith('#"')]
    printed = yaml.safe_load("\n".join(lines))
    registered = {r.name: r.check_str for r in policy.BASE_RULES + policy.API_RULES}
    assert printed == registered
    # Cinder's names and defaults for the calls the RBAC tests exercise (§7.9)
    assert printed["backup:get_all"] == printed["backup:get"] == \
        "rule:xena_system_admin_or_project_reader"
    for name in ("backup:create", "backup:update", "backup:delete", "backup:restore"):
        assert printed[name] == "rule:xena_system_admin_or_project_member"
    for name in ("backup:backup-import", "backup:export-import",
                 "volume_extension:backup_admin_actions:reset_status",
                 "volume_extension:backup_admin_actions:force_delete",
                 "backup:backup_project_attribute", "volume_extension:quotas:update"):
        assert printed[name] == "rule:admin_api"
    assert printed["context_is_admin"] == "role:admin"

    # Every rule printed for an API call is checked somewhere in the code, and every
    # check in the code names a rule that is printed: no dead rules, no unregistered ones.
    used = _rules_used_in_code()
    api_rules = {r.name for r in policy.API_RULES}
    assert used == api_rules, (sorted(api_rules - used), sorted(used - api_rules))
    # Base rules are referred to by some default (context_is_admin decides is_admin),
    # except Cinder's legacy ones, kept only for operators' older files.
    checks = " ".join(registered.values())
    for name in {r.name for r in policy.BASE_RULES} - set(policy.LEGACY_BASE_RULES):
        assert f"rule:{name}" in checks or name == "context_is_admin", name


def test_remembered_decisions_follow_caller_target_and_file(tmp_path):
    """Policy remembers its decisions: each still belongs to its own rule, target and
    caller, and a changed file takes effect at the next check."""
    from types import SimpleNamespace

    from blockvault.service.policy import Policy

    policy_file = tmp_path / "policy.yaml"
    p = Policy(policy_file)

    def caller(project: str, *roles: str) -> SimpleNamespace:
        return SimpleNamespace(user_id="u", project_id=project, roles=list(roles),
                               is_admin="admin" in roles)

    # roles as Keystone gives them: a member is a reader too (implied roles)
    mine = {"project_id": "p1", "user_id": "u"}
    for _ in range(2):  # the second round answers from memory: the same answers
        assert p.allowed(caller("p1", "reader", "member"), "backup:get", mine)
        assert not p.allowed(caller("p2", "reader", "member"), "backup:get", mine)
        assert p.allowed(caller("p2", "admin"), "backup:get", mine)
        assert not p.allowed(caller("p1", "reader"), "backup:create")
        assert p.allowed(caller("p1", "reader", "member"), "backup:create")
    policy_file.write_text('"backup:get": "role:admin"\n')
    assert not p.allowed(caller("p1", "reader", "member"), "backup:get", mine)
    assert p.allowed(caller("p2", "admin"), "backup:get", mine)
    policy_file.unlink()
    assert p.allowed(caller("p1", "reader", "member"), "backup:get", mine)
