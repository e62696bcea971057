"""Authentication strategies against real servers: noauth kept to loopback, API keys made
by the real ``blockvault apikey`` CLI and used by httpx, the ``openstack`` CLI, the
``cinder`` CLI and blockvault's own client, exactly as docs/auth.md shows them."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from blockvault.api.auth import is_loopback
from tests.pg import pg_database
from tests.server import Server, free_port

KEY_RE = re.compile(r"bvk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")
UNAUTHORIZED = {"unauthorized": {
    "code": 401, "message": "The request you have made requires authentication."}}


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without the machine's OS_* / BLOCKVAULT_* settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OS_", "Cinder_", "CINDER_", "BLOCKVAULT_"))}
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=env or _env(), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


def bv(*args: str, **kw) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "blockvault.cli", *args, **kw)


# -- noauth: loopback only ------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "[::1]", "localhost"])
def test_loopback_addresses(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "192.0.2.1"])
def test_non_loopback_addresses(host):
    assert not is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_noauth_refuses_to_listen_beyond_loopback(tmp_path, host):
    port = free_port()
    out = bv("serve", "--host", host, "--port", str(port), "--data-dir", str(tmp_path),
             timeout=60)
    assert out.returncode != 0
    assert f"auth_strategy = noauth refuses to listen on '{host}'" in out.stderr
    assert "noauth_allow_remote = true" in out.stderr
    # it never got as far as listening
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)


def test_noauth_allow_remote_starts_and_warns(tmp_path):
    srv = Server(tmp_path, {"BLOCKVAULT_HOST": "0.0.0.0",
                            "BLOCKVAULT_NOAUTH_ALLOW_REMOTE": "true"}).start()
    try:
        assert srv.client("alice", "proja").get("/backups").status_code == 200
        log = srv.log()
        warning = next(line for line in log.splitlines() if "NO AUTHENTICATION" in line)
        assert " WARNING " in warning and "0.0.0.0" in warning
        assert "auth: noauth" in log
    finally:
        srv.stop()


def test_unknown_strategy_refused_at_start(tmp_path):
    out = bv("serve", "--port", str(free_port()), "--data-dir", str(tmp_path),
             env=_env(BLOCKVAULT_AUTH_STRATEGY="ldap"), timeout=60)
    assert out.returncode != 0
    assert "auth_strategy must be noauth, apikey or keystone, not 'ldap'" in out.stderr


# -- API keys ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An apikey server, on every interface: unlike noauth, apikey may listen anywhere."""
    srv = Server(tmp_path_factory.mktemp("bv-apikey"), {
        "BLOCKVAULT_AUTH_STRATEGY": "apikey", "BLOCKVAULT_HOST": "0.0.0.0"}).start()
    srv.keys = []  # every secret handed out, to check none leaks into the log
    yield srv
    srv.stop()
    log = srv.log()
    for key in srv.keys:
        assert key.split("_", 2)[2] not in log


def create_key(server: Server, project: str, *roles: str, user: str = "alice",
               expires: str | None = None) -> str:
    args = ["apikey", "create", "--data-dir", str(server.data_dir), "--project", project,
            "--user", user]
    for role in roles or ("member",):
        args += ["--role", role]
    if expires:
        args += ["--expires", expires]
    out = bv(*args)
    assert out.returncode == 0, out.stderr
    # the key alone on stdout, so KEY=$(blockvault apikey create ...) captures it
    key = out.stdout.removesuffix("\n")
    assert KEY_RE.fullmatch(key), out.stdout
    assert "created API key" in out.stderr and key not in out.stderr
    server.keys.append(key)
    return key


def key_id(key: str) -> str:
    return key.split("_")[1]


def list_keys(server: Server, *extra: str) -> list[dict]:
    out = bv("apikey", "list", "--data-dir", str(server.data_dir), "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def api(server: Server, key: str | None, project: str | None = None) -> httpx.Client:
    base = f"{server.url}/v3" + (f"/{project}" if project else "")
    headers = {"OpenStack-API-Version": "volume 3.71"}
    if key is not None:
        headers["X-Auth-Token"] = key
    return httpx.Client(base_url=base, headers=headers, timeout=60)


def _project() -> str:
    return uuid.uuid4().hex


def assert_401(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.json() == UNAUTHORIZED
    assert resp.headers["WWW-Authenticate"] == 'X-Auth-Token realm="blockvault"'


def test_key_works_for_its_project_only(server):
    project = _project()
    key = create_key(server, project, "member")
    with api(server, key, project) as c:
        r = c.post("/volumes", json={"volume": {"size": 1, "name": "k1"}})
        assert r.status_code == 202, r.text
        assert r.json()["volume"]["user_id"] == "alice"
        assert c.get("/volumes").json()["volumes"][0]["name"] == "k1"
    # project-less URLs (3.67) take the key's project
    with api(server, key) as c:
        assert [v["name"] for v in c.get("/volumes").json()["volumes"]] == ["k1"]
    # another project's URL: refused as Cinder refuses a token of another project
    with api(server, key, _project()) as c:
        r = c.get("/volumes")
        assert r.status_code == 400 and r.json()["badRequest"]["message"] == \
            "Malformed request url"


def test_bad_credentials_get_401(server):
    project = _project()
    key = create_key(server, project)
    tampered = key[:-2] + ("AA" if not key.endswith("AA") else "BB")
    unknown = f"bvk_{'0' * 16}_{key.split('_', 2)[2]}"
    for token in [None, "", "admin:admin", project, tampered, unknown, key + "x", "bvk_"]:
        with api(server, token, project) as c:
            assert_401(c.get("/backups"))
    # the error never echoes what was sent
    with api(server, tampered, project) as c:
        assert tampered not in c.get("/backups").text
    # the operator's log says which key and why, without its secret
    log = server.log()
    assert f"wrong secret for key {key_id(key)}" in log
    assert f"unknown key {'0' * 16}" in log


def test_revocation_is_immediate(server):
    project = _project()
    key = create_key(server, project, "reader")
    with api(server, key, project) as c:
        assert c.get("/backups").status_code == 200
        out = bv("apikey", "revoke", "--data-dir", str(server.data_dir), key_id(key))
        assert out.returncode == 0, out.stderr
        assert f"API key {key_id(key)}: revoked" in out.stderr
        # the very next request, no waiting: the service looks keys up per request
        assert_401(c.get("/backups"))
    [row] = list_keys(server, "--project", project)
    assert row["state"] == "revoked" and row["revoked_at"]
    assert f"key {key_id(key)} revoked" in server.log()
    # again: nothing to do, still success; an unknown id is an error
    again = bv("apikey", "revoke", "--data-dir", str(server.data_dir), key_id(key))
    assert again.returncode == 0 and "already revoked" in again.stderr
    missing = bv("apikey", "revoke", "--data-dir", str(server.data_dir), "0123456789abcdef")
    assert missing.returncode != 0 and "no API key 0123456789abcdef" in missing.stderr


def test_expired_key(server):
    project = _project()
    # Long enough for two CLI processes to start on a loaded machine (3 s was not).
    key = create_key(server, project, expires="8s")
    [row] = list_keys(server, "--project", project)
    assert row["state"] == "active" and row["expires_at"]
    expires_at = datetime.datetime.strptime(row["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC)
    with api(server, key, project) as c:
        assert c.get("/backups").status_code == 200
        time.sleep(max(0.0, (expires_at - datetime.datetime.now(datetime.UTC))
                       .total_seconds()) + 1.5)  # expires_at has whole seconds
        assert_401(c.get("/backups"))
    [row] = list_keys(server, "--project", project)
    assert row["state"] == "expired"
    assert f"key {key_id(key)} expired" in server.log()


@pytest.mark.parametrize("expires,message", [
    ("2020-01-01T00:00Z", "expires must be in the future"),
    ("tomorrow", "expires must be an ISO 8601 time"),
])
def test_bad_expiry_refused(server, expires, message):
    out = bv("apikey", "create", "--data-dir", str(server.data_dir), "--project", "p",
             "--user", "u", "--role", "member", "--expires", expires)
    assert out.returncode != 0 and message in out.stderr and out.stdout == ""


def test_create_checks_its_input(server):
    base = ["apikey", "create", "--data-dir", str(server.data_dir), "--user", "u"]
    out = bv(*base, "--project", "a/b", "--role", "member")
    assert out.returncode != 0 and "does not match project_id_regex" in out.stderr
    out = bv(*base, "--project", "p", "--role", "mem ber")
    assert out.returncode != 0 and "role names are" in out.stderr
    out = bv(*base, "--project", "p")
    assert out.returncode != 0 and "--role" in out.stderr


def test_list_never_shows_secrets(server):
    project = _project()
    key = create_key(server, project, "reader", "member", user="carol", expires="30d")
    [row] = list_keys(server, "--project", project)
    assert row["id"] == key_id(key) and row["user_id"] == "carol"
    assert row["project_id"] == project and row["roles"] == ["reader", "member"]
    assert row["state"] == "active" and row["revoked_at"] is None
    table = bv("apikey", "list", "--data-dir", str(server.data_dir))
    assert table.returncode == 0
    assert key_id(key) in table.stdout and project in table.stdout
    everything = table.stdout + table.stderr + json.dumps(list_keys(server))
    for k in server.keys:
        assert k.split("_", 2)[2] not in everything
    # only a hash is stored
    for db in server.data_dir.glob("blockvault.sqlite*"):  # the WAL too
        assert key.split("_", 2)[2].encode() not in db.read_bytes()


def test_roles_come_from_the_key(server):
    project, ops = _project(), _project()
    member = create_key(server, project, "member")
    admin = create_key(server, ops, "admin", user="operator")
    with api(server, member, project) as c:
        vol = c.post("/volumes", json={"volume": {"size": 1}}).json()["volume"]["id"]
        mine = {v["id"] for v in c.get("/volumes", params={"all_tenants": "1"}).json()[
            "volumes"]}
        assert mine == {vol}  # all_tenants is an admin's
    with api(server, admin, ops) as c:
        seen = {v["id"] for v in c.get("/volumes", params={"all_tenants": "1"}).json()[
            "volumes"]}
        assert vol in seen


# -- the OpenStack clients and blockvault's own, with a key -------------------------------------


def openstack_cli(server: Server, key: str, endpoint: str, *args: str):
    out = run(sys.executable, "-m", "openstackclient.shell", "--os-auth-type", "admin_token",
              "--os-token", key, "--os-endpoint", endpoint, *args)
    return out


def test_openstack_cli_with_a_key(server):
    pytest.importorskip("openstackclient.shell")
    project = _project()
    key = create_key(server, project, "member")
    with api(server, key, project) as c:
        vol = c.post("/volumes", json={"volume": {"size": 1, "name": "oscvol"}}).json()[
            "volume"]["id"]
    endpoint = f"{server.url}/v3/{project}"
    out = openstack_cli(server, key, endpoint, "volume", "backup", "create", vol,
                        "--name", "oscb", "-f", "json")
    assert out.returncode == 0, out.stderr
    backup = json.loads(out.stdout)["id"]
    with api(server, key, project) as c:
        deadline = time.monotonic() + 60
        while c.get(f"/backups/{backup}").json()["backup"]["status"] != "available":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    # the endpoint without a project works as well (project-less URLs)
    for ep in (endpoint, f"{server.url}/v3"):
        out = openstack_cli(server, key, ep, "volume", "backup", "list", "-f", "json")
        assert out.returncode == 0, out.stderr
        assert [(b["ID"], b["Name"], b["Status"]) for b in json.loads(out.stdout)] == [
            (backup, "oscb", "available")]
    out = bv("apikey", "revoke", "--data-dir", str(server.data_dir), key_id(key))
    assert out.returncode == 0
    out = openstack_cli(server, key, endpoint, "volume", "backup", "list")
    assert out.returncode != 0
    assert "requires authentication" in out.stderr or "401" in out.stderr, out.stderr


def test_cinder_cli_with_a_key(server):
    pytest.importorskip("cinderclient.shell")
    project = _project()
    key = create_key(server, project, "member")
    with api(server, key, project) as c:
        vol = c.post("/volumes", json={"volume": {"size": 1, "name": "cvol"}}).json()[
            "volume"]["id"]
    endpoint = f"{server.url}/v3/{project}"
    # cinder registers only the password plugin's options, so the token goes in --os_token
    # (or OS_TOKEN); admin_token itself is keystoneauth's, and --os-project-id is required
    base = [sys.executable, "-m", "cinderclient.shell", "--os-auth-type", "admin_token",
            "--os-endpoint", endpoint, "--os-project-id", project]
    out = run(*base, "--os_token", key, "backup-create", vol, "--name", "cb")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 60
    while True:
        out = run(*base, "--os_token", key, "backup-list")
        assert out.returncode == 0, out.stderr
        row = next(line for line in out.stdout.splitlines() if " cb " in line)
        if " available " in row:
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert vol in row
    out = run(*base, "backup-list", env=_env(OS_TOKEN=key))
    assert out.returncode == 0 and " cb " in out.stdout, out.stderr
    bv("apikey", "revoke", "--data-dir", str(server.data_dir), key_id(key))
    out = run(*base, "--os_token", key, "backup-list")
    assert out.returncode != 0


def test_blockvault_client_with_a_key(server, tmp_path):
    project = _project()
    key = create_key(server, project, "member")
    env = _env(OS_AUTH_TOKEN=key, OS_ENDPOINT=f"{server.url}/v3")
    out = bv("volume", "create", "--size", "1", "--name", "cli", env=env)
    assert out.returncode == 0, out.stderr
    vol = out.stdout.strip()
    with api(server, key, project) as c:
        assert c.get(f"/volumes/{vol}").json()["volume"]["name"] == "cli"
    # a clouds.yaml entry in the working directory, as openstack's own tools read it
    (tmp_path / "clouds.yaml").write_text(
        "clouds:\n  bv:\n    auth_type: admin_token\n"
        f"    auth:\n      token: {key}\n      endpoint: {server.url}/v3/{project}\n")
    out = bv("volume", "show", vol, env=_env(OS_CLOUD="bv"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["name"] == "cli"
    # the same entry drives the openstack CLI
    out = run(sys.executable, "-m", "openstackclient.shell", "volume", "show", vol,
              "-f", "json", env=_env(OS_CLOUD="bv"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["name"] == "cli"


# -- PostgreSQL: keys shared by several processes -------------------------------------------


@pytest.fixture
def pg_url():
    with pg_database() as url:
        yield url


def test_keys_on_postgresql_count_in_every_process(tmp_path, pg_url):
    """Two API processes sharing PostgreSQL (migration 0005 there): a key made by the CLI
    with the servers' --config works on both, and its revocation stops it on both at once."""
    config = tmp_path / "blockvault.toml"
    config.write_text(f'auth_strategy = "apikey"\ndatabase_url = "{pg_url}"\n')
    env = {"BLOCKVAULT_CONFIG": str(config)}
    a = Server(tmp_path / "a", env).start()
    b = Server(tmp_path / "b", env).start()
    try:
        project = _project()
        out = bv("apikey", "create", "--config", str(config), "--project", project,
                 "--user", "alice", "--role", "member")
        assert out.returncode == 0, out.stderr
        key = out.stdout.strip()
        with api(a, key, project) as ca, api(b, key, project) as cb:
            vol = ca.post("/volumes", json={"volume": {"size": 1}}).json()["volume"]["id"]
            assert cb.get(f"/volumes/{vol}").status_code == 200
            out = bv("apikey", "revoke", "--config", str(config), key_id(key))
            assert out.returncode == 0, out.stderr
            assert_401(ca.get("/volumes"))
            assert_401(cb.get("/volumes"))
        listed = bv("apikey", "list", "--config", str(config), "--json")
        assert [k["state"] for k in json.loads(listed.stdout)] == ["revoked"]
    finally:
        a.stop()
        b.stop()
