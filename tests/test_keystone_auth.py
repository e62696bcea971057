"""``auth_strategy = keystone`` against a real Keystone (issue 10): keystonemiddleware's
``auth_token`` validates tokens, the token's project and roles make the context, and the
``openstack`` CLI finds blockvault through Keystone's catalog with password auth.

One Keystone (tools/keystone/start-keystone.sh, from PyPI) and one blockvault server per
module, configured by the TOML example of docs/auth.md; blockvault, its service user and
the test users are registered by tools/keystone/setup_blockvault.py.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.keystone import ADMIN_PASSWORD, TOOLS, keystone_process
from tests.server import Api, Server, free_port

pytest.importorskip("keystonemiddleware.auth_token")
pytest.importorskip("keystoneauth1.session")

from blockvault.api.keystone import AUTH_REQUIRED, KeystoneAuthenticator, build_conf

MiB = 1024 * 1024


def _load_setup_tool():
    spec = importlib.util.spec_from_file_location("setup_blockvault",
                                                  TOOLS / "setup_blockvault.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Keystone:
    def __init__(self, url: str, run: Path) -> None:
        self.url = url
        self.auth_url = f"{url}/v3"
        self.run = run
        #: every token handed out in this module: none may ever reach a log
        self.issued: set[str] = set()
        self._tokens: dict[tuple[str, str], str] = {}

    def issue(self, user: str, password: str, project: str, url: str | None = None) -> str:
        """A fresh project-scoped token for ``user`` (a plain POST, no keystoneauth cache)."""
        r = httpx.post(f"{url or self.url}/v3/auth/tokens?nocatalog", json={"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "domain": {"id": "default"}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}}}},
            timeout=30)
        assert r.status_code == 201, r.text
        token = r.headers["X-Subject-Token"]
        self.issued.add(token)
        return token

    def token(self, user: str, password: str, project: str) -> str:
        """A token for ``user``, reused within the module (Keystone's default is 1 h)."""
        key = (user, project)
        if key not in self._tokens:
            self._tokens[key] = self.issue(user, password, project)
        return self._tokens[key]

    def revoke(self, token: str) -> None:
        admin = self.token("admin", ADMIN_PASSWORD, "admin")
        r = httpx.delete(f"{self.auth_url}/auth/tokens",
                         headers={"X-Auth-Token": admin, "X-Subject-Token": token})
        assert r.status_code == 204, r.text


@pytest.fixture(scope="module")
def keystone(tmp_path_factory):
    run = tmp_path_factory.mktemp("keystone")
    with keystone_process(run) as url:
        yield Keystone(url, run)


def toml_config(auth_url: str, service_password: str | None, **extra: str | int) -> str:
    """The ``[keystone_authtoken]`` example of docs/auth.md, with this test's values
    (without the password when it is None: BLOCKVAULT_KEYSTONE_AUTHTOKEN__PASSWORD)."""
    lines = [
        'auth_strategy = "keystone"',
        "",
        "[keystone_authtoken]",
        f'www_authenticate_uri = "{auth_url}"',
        f'auth_url = "{auth_url}"',
        'auth_type = "password"',
        'username = "blockvault"',
        *([f'password = "{service_password}"'] if service_password is not None else []),
        'user_domain_name = "Default"',
        'project_name = "service"',
        'project_domain_name = "Default"',
        'interface = "public"',
        'region_name = "RegionOne"',
        'service_type = "block-storage"',
    ]
    for key, value in extra.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class Deployment:
    def __init__(self, ks: Keystone, server: Server, info: dict, user_password: str,
                 service_password: str) -> None:
        self.ks = ks
        self.server = server
        self.info = info
        self.user_password = user_password
        self.service_password = service_password

    def project_id(self, project: str) -> str:
        return self.info["projects"][project]

    def token(self, project: str, role: str) -> str:
        return self.ks.token(f"{project}-{role}", self.user_password, project)

    def api(self, project: str, role: str | None = None, token: str | None = None,
            version: str | None = None) -> Api:
        """The test HTTP client on ``/v3/<project id>``, with a Keystone token."""
        api = Api(self.server.url, "unused", self.project_id(project), version=version,
                  data_dir=self.server.data_dir)
        api.http.headers["X-Auth-Token"] = token or self.token(project, role or "member")
        return api


@pytest.fixture(scope="module")
def deployment(keystone, tmp_path_factory):
    """blockvault in ``auth_strategy = keystone``, registered in Keystone's catalog; projects
    ``bva`` to ``bvd`` with a reader, a member and an admin each (bvc and bvd are the
    policy matrix's, so its leftovers never show in the other tests' listings)."""
    service_password = "svc-" + secrets.token_urlsafe(12)
    user_password = "usr-" + secrets.token_urlsafe(12)
    data = tmp_path_factory.mktemp("bv-keystone")
    config = data / "blockvault.toml"
    # the token cache off, so a revocation counts at once (docs/auth.md: token_cache_time)
    config.write_text(toml_config(keystone.auth_url, None, token_cache_time=-1))
    # the password from the environment, as docs/auth.md advises, the rest from the file
    server = Server(data, {"BLOCKVAULT_CONFIG": str(config),
                           "BLOCKVAULT_KEYSTONE_AUTHTOKEN__PASSWORD": service_password})
    info = _load_setup_tool().setup(keystone.auth_url, ADMIN_PASSWORD, server.url,
                                    service_password, ["bva", "bvb", "bvc", "bvd"],
                                    user_password)
    server.start()
    try:
        yield Deployment(keystone, server, info, user_password, service_password)
    finally:
        server.stop()


# -- configuration --------------------------------------------------------------------------


def test_config_refuses_unknown_and_missing_options():
    base = {"auth_type": "password", "www_authenticate_uri": "http://ks/v3",
            "auth_url": "http://ks/v3", "username": "blockvault", "password": "pw-XYZZY"}
    conf = build_conf({**base, "token_cache_time": "10", "memcached_servers": ["m1:11211"]})
    group = conf["keystone_authtoken"]
    assert (group.token_cache_time, group.memcached_servers, group.username) == (
        10, ["m1:11211"], "blockvault")
    with pytest.raises(ValueError, match="unknown option.*auth_urll"):
        build_conf({**base, "auth_urll": "http://ks/v3"})
    with pytest.raises(ValueError, match="www_authenticate_uri is required"):
        build_conf({k: v for k, v in base.items() if k != "www_authenticate_uri"})
    with pytest.raises(ValueError, match="auth_type is required"):
        build_conf({k: v for k, v in base.items() if k != "auth_type"})
    with pytest.raises(ValueError, match="token_cache_time = 'soon'"):
        build_conf({**base, "token_cache_time": "soon"})
    # what only the middleware and its auth plugin check, at start-up too
    with pytest.raises(ValueError, match="requires parameters.*auth_url") as exc:
        KeystoneAuthenticator(SimpleNamespace(keystone_authtoken={
            k: v for k, v in base.items() if k != "auth_url"}))
    assert "pw-XYZZY" not in str(exc.value)
    with pytest.raises(ValueError, match="memcache_secret_key must be defined"):
        KeystoneAuthenticator(SimpleNamespace(keystone_authtoken={
            **base, "memcache_security_strategy": "ENCRYPT"}))


def test_settings_table_from_file_forms_and_environment(tmp_path, monkeypatch):
    """``[keystone_authtoken]`` in a flat file or beside ``[blockvault]``; single options
    from BLOCKVAULT_KEYSTONE_AUTHTOKEN__<OPTION> override the file's; no password in repr."""
    from blockvault.config import load_settings

    flat = tmp_path / "flat.toml"
    flat.write_text(toml_config("http://ks/v3", "pw-XYZZY"))
    nested = tmp_path / "nested.toml"
    nested.write_text("[blockvault]\nport = 9876\n\n" + toml_config(
        "http://ks/v3", "pw-XYZZY").replace('auth_strategy = "keystone"\n', ""))
    for path in (flat, nested):
        settings = load_settings(path)
        assert settings.keystone_authtoken["auth_url"] == "http://ks/v3"
        assert settings.keystone_authtoken["password"] == "pw-XYZZY"
        assert "pw-XYZZY" not in repr(settings)
    assert load_settings(nested).port == 9876
    monkeypatch.setenv("BLOCKVAULT_KEYSTONE_AUTHTOKEN__PASSWORD", "from-env")
    monkeypatch.setenv("BLOCKVAULT_KEYSTONE_AUTHTOKEN__TOKEN_CACHE_TIME", "-1")
    table = load_settings(flat).keystone_authtoken
    assert (table["password"], table["token_cache_time"], table["username"]) == (
        "from-env", "-1", "blockvault")
    assert build_conf(table)["keystone_authtoken"].token_cache_time == -1


def test_server_refuses_to_start_with_a_bad_option(tmp_path):
    config = tmp_path / "blockvault.toml"
    config.write_text(toml_config("http://127.0.0.1:9/v3", "pw-PLUGH", bogus_option="x"))
    srv = Server(tmp_path / "d", {"BLOCKVAULT_CONFIG": str(config)})
    with pytest.raises(RuntimeError, match="bogus_option"):
        srv.start()
    assert "pw-PLUGH" not in srv.log()


# -- tokens ---------------------------------------------------------------------------------


def test_valid_token_lists(deployment):
    api = deployment.api("bva", "reader")
    r = api.get("/backups")
    assert r.status_code == 200, r.text
    assert r.json() == {"backups": []}
    # the 3.67 form without a project in the URL: the token's project
    r = api.http.get(f"{deployment.server.url}/v3/backups")
    assert r.status_code == 200 and r.json() == {"backups": []}


def _assert_401(deployment, r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == f'Keystone uri="{deployment.ks.auth_url}"'
    assert r.json() == {"unauthorized": {"code": 401, "message": AUTH_REQUIRED}}


def test_missing_token_is_401_with_keystone_challenge(deployment):
    pid = deployment.project_id("bva")
    _assert_401(deployment, httpx.get(f"{deployment.server.url}/v3/{pid}/backups"))
    _assert_401(deployment, httpx.post(f"{deployment.server.url}/v3/{pid}/backups",
                                       json={"backup": {"volume_id": str(uuid.uuid4())}}))


def test_garbage_token_is_401(deployment):
    for token in ("garbage", "bva-member:" + deployment.project_id("bva"),
                  "gAAAAAB" + "x" * 180):
        _assert_401(deployment, deployment.api("bva", token=token).get("/backups"))


def test_spoofed_identity_headers_are_not_believed(deployment):
    """keystonemiddleware's own headers sent by a caller count for nothing."""
    pid = deployment.project_id("bva")
    r = httpx.get(f"{deployment.server.url}/v3/{pid}/backups", headers={
        "X-Identity-Status": "Confirmed", "X-User-Id": "u", "X-Project-Id": pid,
        "X-Roles": "admin"})
    _assert_401(deployment, r)
    # with a reader's valid token: still the reader (no admin's all_tenants, no writes)
    reader = deployment.api("bva", "reader")
    reader.http.headers.update({"X-Roles": "admin,member", "X-Is-Admin-Project": "True",
                                "X-Project-Id": deployment.project_id("bvb")})
    r = reader.post("/volumes", {"volume": {"size": 1}})
    assert r.status_code == 403, r.text
    assert reader.get("/backups").status_code == 200


def test_revoked_token_is_401(deployment):
    token = deployment.ks.issue("bva-member", deployment.user_password, "bva")
    api = deployment.api("bva", token=token)
    assert api.get("/backups").status_code == 200
    deployment.ks.revoke(token)
    _assert_401(deployment, api.get("/backups"))


def test_expired_token_is_401(deployment, tmp_path):
    """A second Keystone process on the same database and fernet keys, whose tokens live 8
    seconds: they are real tokens of this Keystone, valid until they expire."""
    ks = deployment.ks
    conf = (ks.run / "keystone.conf").read_text()
    assert "[token]\n" in conf
    short = tmp_path / "keystone-short.conf"
    short.write_text(conf.replace("[token]\n", "[token]\nexpiration = 8\n").replace(
        str(ks.run / "keystone.log"), str(tmp_path / "keystone-short.log")))
    venv = os.environ.get("KEYSTONE_VENV") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "blockvault" / "keystone-venv")
    port = free_port()
    proc = subprocess.Popen(
        [f"{venv}/bin/python", str(TOOLS / "serve.py"), str(port)],
        env={**os.environ, "OS_KEYSTONE_CONFIG_FILES": str(short)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v3", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "short-lived keystone did not start"
            time.sleep(0.3)
        token = ks.issue("bva-member", deployment.user_password, "bva", url=url)
        issued = time.monotonic()
        api = deployment.api("bva", token=token)
        assert api.get("/backups").status_code == 200
        assert time.monotonic() - issued < 8, "too slow to see the token valid first"
        time.sleep(max(0.0, 9.5 - (time.monotonic() - issued)))
        _assert_401(deployment, api.get("/backups"))
    finally:
        proc.terminate()
        proc.wait(10)


def test_application_credential_access_rules(deployment):
    """An application credential limited to ``GET /v3/*/backups`` of ``block-storage``
    (blockvault's ``service_type``): that call works, any other is 401 — keystonemiddleware
    checks the rules against the request's method and path."""
    ks = deployment.ks
    token = ks.issue("bva-member", deployment.user_password, "bva")
    user_id = httpx.get(f"{ks.auth_url}/auth/tokens", headers={
        "X-Auth-Token": token, "X-Subject-Token": token}).json()["token"]["user"]["id"]
    r = httpx.post(f"{ks.auth_url}/users/{user_id}/application_credentials",
                   headers={"X-Auth-Token": token}, json={"application_credential": {
                       "name": f"list-backups-{uuid.uuid4().hex[:6]}", "access_rules": [
                           {"service": "block-storage", "method": "GET",
                            "path": "/v3/*/backups"}]}})
    assert r.status_code == 201, r.text
    cred = r.json()["application_credential"]
    r = httpx.post(f"{ks.auth_url}/auth/tokens", json={"auth": {"identity": {
        "methods": ["application_credential"], "application_credential": {
            "id": cred["id"], "secret": cred["secret"]}}}}, timeout=30)
    assert r.status_code == 201, r.text
    limited = r.headers["X-Subject-Token"]
    ks.issued.add(limited)
    api = deployment.api("bva", token=limited)
    assert api.get("/backups").status_code == 200
    _assert_401(deployment, api.get("/backups/detail"))
    _assert_401(deployment, api.post("/volumes", {"volume": {"size": 1}}))


def test_token_without_a_project_is_403(deployment):
    """An unscoped token is a valid token that names no project: no call is for it."""
    r = httpx.post(f"{deployment.ks.auth_url}/auth/tokens", json={"auth": {"identity": {
        "methods": ["password"], "password": {"user": {
            "name": "bva-member", "domain": {"id": "default"},
            "password": deployment.user_password}}}}}, timeout=30)
    assert r.status_code == 201 and "project" not in r.json()["token"], r.text
    token = r.headers["X-Subject-Token"]
    deployment.ks.issued.add(token)
    r = httpx.get(f"{deployment.server.url}/v3/backups", headers={"X-Auth-Token": token})
    assert (r.status_code, r.json()) == (
        403, {"forbidden": {"code": 403, "message": "A project-scoped token is required."}})
    r = httpx.get(f"{deployment.server.url}/v3/{deployment.project_id('bva')}/backups",
                  headers={"X-Auth-Token": token})
    assert r.status_code == 403


def test_token_of_another_project_is_refused(deployment):
    """Cinder's answer to a URL project that is not the token's: 400 Malformed request url.
    Another project's backup through the token's own project URL is 404."""
    a = deployment.api("bva", "member")
    b_id = deployment.project_id("bvb")
    r = a.http.get(f"{deployment.server.url}/v3/{b_id}/backups")
    assert r.status_code == 400
    assert r.json() == {"badRequest": {"code": 400, "message": "Malformed request url"}}
    r = a.http.post(f"{deployment.server.url}/v3/{b_id}/volumes",
                    json={"volume": {"size": 1}})
    assert r.status_code == 400
    b = deployment.api("bvb", "member")
    vol = b.create_volume(1)
    assert a.get(f"/volumes/{vol}").status_code == 404
    assert b.get(f"/volumes/{vol}").status_code == 200
    assert b.delete(f"/volumes/{vol}").status_code == 202


def test_roles_come_from_the_token(deployment):
    """The admin role makes an admin (all_tenants, export); member and reader do not."""
    member = deployment.api("bvb", "member")
    vol = member.create_volume(1)
    backup = member.create_backup(vol)
    try:
        for role in ("reader", "member"):
            api = deployment.api("bvb", role)
            assert api.get(f"/backups/{backup}").status_code == 200
            r = api.get(f"/backups/{backup}/export_record")
            assert r.status_code == 403, (role, r.text)
            assert "backup:export" in r.json()["forbidden"]["message"]
        admin = deployment.api("bva", "admin")
        listed = admin.get("/backups", params={"all_tenants": "1"}).json()["backups"]
        assert backup in [b["id"] for b in listed]
        # another project's admin exports through the admin's own project URL
        assert admin.get(f"/backups/{backup}/export_record").status_code == 200
    finally:
        assert member.delete(f"/backups/{backup}").status_code == 202
        member.wait("backup", backup, {"deleted"})
        assert member.delete(f"/volumes/{vol}").status_code == 202


# -- the policy matrix, with Keystone's tokens -----------------------------------------------

#: tests/test_policy.py's checks of Cinder's defaults (reference §7.9), written against
#: API keys; here the same checks run with Keystone tokens, whose roles Keystone lists
#: (implied ones included) and keystonemiddleware passes on
POLICY_CHECKS = ("test_reader_member_admin_matrix",
                 "test_another_projects_backup_is_404_before_any_policy_check",
                 "test_reader_and_member_on_volumes_snapshots_quotas_and_types",
                 "test_admin_only_fields_and_all_tenants_follow_the_policy")


@pytest.fixture(scope="module")
def keystone_people(deployment):
    """test_policy's cast: a reader and a member of one project, an admin of another
    (Keystone's admin role reaches every project), and an outsider project's member."""
    return {"reader": deployment.api("bvc", "reader"),
            "member": deployment.api("bvc", "member"),
            "admin": deployment.api("bvd", "admin"),
            "outsider": deployment.api("bvd", "member")}


@pytest.mark.parametrize("check", POLICY_CHECKS)
def test_policy_matrix_with_keystone_tokens(deployment, keystone_people, check):
    policy_tests = pytest.importorskip("tests.test_policy")
    getattr(policy_tests, check)(deployment.server, keystone_people)


# -- failures of the service user or of Keystone: 503, never a secret in the log ------------


def test_wrong_service_password_is_503_and_never_logged(deployment, tmp_path):
    config = tmp_path / "blockvault.toml"
    config.write_text(toml_config(deployment.ks.auth_url, "wrong-pw-FROBOZZ",
                                  token_cache_time=-1, http_request_max_retries=0))
    srv = Server(tmp_path / "d", {"BLOCKVAULT_CONFIG": str(config)}).start()
    try:
        pid = deployment.project_id("bva")
        token = deployment.token("bva", "member")
        r = httpx.get(f"{srv.url}/v3/{pid}/backups", headers={"X-Auth-Token": token},
                      timeout=60)
        assert r.status_code == 503, r.text
        assert r.json() == {"serviceUnavailable": {
            "code": 503, "message": "The Keystone service is temporarily unavailable."}}
    finally:
        srv.stop()
    log = srv.log()
    assert "wrong-pw-FROBOZZ" not in log
    assert token not in log


def test_keystone_unreachable_is_503(deployment, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v3"
    config = tmp_path / "blockvault.toml"
    config.write_text(toml_config(dead, "pw", http_request_max_retries=0,
                                  http_connect_timeout=2))
    srv = Server(tmp_path / "d", {"BLOCKVAULT_CONFIG": str(config)}).start()
    try:
        r = httpx.get(f"{srv.url}/v3/{deployment.project_id('bva')}/backups",
                      headers={"X-Auth-Token": "gAAAAAB" + "y" * 180}, timeout=60)
        assert r.status_code == 503, r.text
        # without a token the answer needs no Keystone: 401, challenge included
        r = httpx.get(f"{srv.url}/v3/{deployment.project_id('bva')}/backups", timeout=60)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == f'Keystone uri="{dead}"'
    finally:
        srv.stop()


# -- the openstack CLI, password auth, blockvault found in Keystone's catalog --------------


def _osc_env(deployment, project: str, role: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OS_", "Cinder_", "CINDER_"))}
    env.update(
        OS_AUTH_URL=deployment.ks.auth_url,
        OS_IDENTITY_API_VERSION="3",
        OS_USERNAME=f"{project}-{role}",
        OS_PASSWORD=deployment.user_password,
        OS_PROJECT_NAME=project,
        OS_USER_DOMAIN_NAME="Default",
        OS_PROJECT_DOMAIN_NAME="Default",
        OS_REGION_NAME="RegionOne",
        OS_VOLUME_API_VERSION="3.64",
    )
    return env


def osc(deployment, project: str, role: str, *args: str, fmt: bool = True):
    cmd = [sys.executable, "-m", "openstackclient.shell", *args]
    if fmt:
        cmd += ["-f", "json"]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180,
                       env=_osc_env(deployment, project, role))
    assert p.returncode == 0, f"{args}: {p.stderr[-3000:]}"
    assert deployment.user_password not in p.stdout + p.stderr
    return json.loads(p.stdout) if fmt and p.stdout.strip() else p.stdout


def test_openstack_cli_password_auth_through_catalog(deployment):
    pytest.importorskip("openstackclient.shell")
    member = deployment.api("bva", "member")  # HTTP polling: one CLI run costs ~2 s

    catalog = osc(deployment, "bva", "member", "catalog", "list")
    types = {entry["Type"] for entry in catalog}
    assert {"block-storage", "volumev3", "identity"} <= types

    vol = osc(deployment, "bva", "member", "volume", "create", "--size", "1", "ksvol")
    assert vol["name"] == "ksvol" and vol["size"] == 1
    member.wait("volume", vol["id"], {"available"})
    data = os.urandom(2 * MiB)
    member.write(vol["id"], MiB, data)
    digest = member.volume_sha256(vol["id"])

    b = osc(deployment, "bva", "member", "volume", "backup", "create", "--name", "ksbackup",
            "--description", "through keystone", "ksvol")
    assert b["name"] == "ksbackup" and b["volume_id"] == vol["id"]
    assert member.wait("backup", b["id"], {"available", "error"})["status"] == "available"
    listed = osc(deployment, "bva", "member", "volume", "backup", "list")
    assert [(x["ID"], x["Name"], x["Status"]) for x in listed] == [
        (b["id"], "ksbackup", "available")]
    # the reader sees it too; the other project does not
    assert [x["ID"] for x in osc(deployment, "bva", "reader", "volume", "backup", "list")] \
        == [b["id"]]
    assert osc(deployment, "bvb", "member", "volume", "backup", "list") == []
    shown = osc(deployment, "bva", "reader", "volume", "backup", "show", "ksbackup")
    assert (shown["id"], shown["description"], shown["volume_id"], shown["size"]) == (
        b["id"], "through keystone", vol["id"], 1)

    r = osc(deployment, "bva", "member", "volume", "backup", "restore", "ksbackup",
            "ksrestored")
    assert r["id"] == b["id"] and r["volume_name"] == "ksrestored"
    assert member.wait("volume", r["volume_id"], {"available", "error"})["status"] == \
        "available"
    member.wait("backup", b["id"], {"available"})
    assert member.volume_sha256(r["volume_id"]) == digest

    # export / import: admin only (a member's export is refused by the CLI's 403)
    p = subprocess.run([sys.executable, "-m", "openstackclient.shell", "volume", "backup",
                        "record", "export", b["id"]], capture_output=True, text=True,
                       timeout=180, env=_osc_env(deployment, "bva", "member"))
    assert p.returncode != 0 and "403" in p.stderr
    record = osc(deployment, "bva", "admin", "volume", "backup", "record", "export", b["id"])
    assert record["backup_service"].startswith("cinder.backup.drivers.")
    decoded = json.loads(base64.b64decode(record["backup_url"]))
    assert decoded["id"] == b["id"]
    new_id = str(uuid.uuid4())
    decoded["id"] = new_id
    url = base64.b64encode(json.dumps(decoded).encode()).decode()
    # openstacksdk's import_record POSTs to /backups/export_record (reference §14.9), so
    # ``openstack volume backup record import`` fails against Cinder too; the ``cinder``
    # shell, with the same password auth, finds blockvault as ``volumev3`` in the catalog
    p = subprocess.run([sys.executable, "-m", "cinderclient.shell", "backup-import",
                        record["backup_service"], url], capture_output=True, text=True,
                       timeout=180, env=_osc_env(deployment, "bva", "admin"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in p.stdout.splitlines() if line.startswith("|")}
    assert rows["id"] == new_id
    admin = deployment.api("bva", "admin")
    assert admin.wait("backup", new_id, {"available", "error"})["status"] == "available"
    r = osc(deployment, "bva", "admin", "volume", "backup", "restore", new_id, "fromimport")
    assert admin.wait("volume", r["volume_id"], {"available", "error"})["status"] == \
        "available"
    admin.wait("backup", new_id, {"available"})
    assert admin.volume_sha256(r["volume_id"]) == digest

    # the imported record took the original's name: by id from here on
    assert osc(deployment, "bva", "member", "volume", "backup", "show", new_id)["name"] == \
        "ksbackup"
    osc(deployment, "bva", "member", "volume", "backup", "delete", b["id"], fmt=False)
    member.wait("backup", b["id"], {"deleted"})
    osc(deployment, "bva", "admin", "volume", "backup", "delete", new_id, fmt=False)
    admin.wait("backup", new_id, {"deleted"})
    assert osc(deployment, "bva", "member", "volume", "backup", "list") == []


# -- last: what the server wrote -------------------------------------------------------------


def test_no_password_or_token_in_the_server_log(deployment):
    log = deployment.server.log()
    assert "blockvault.keystone" in log or "keystonemiddleware" in log
    assert deployment.service_password not in log
    assert deployment.user_password not in log
    for token in deployment.ks.issued:
        assert token not in log
    assert "Traceback" not in log

