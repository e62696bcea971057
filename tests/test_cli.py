"""The README walk-through, as a user runs it: the blockvault CLI against a real server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from tests.server import Server

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("bv")).start()
    yield srv
    srv.stop()


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without the machine's OS_* / BLOCKVAULT_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "BLOCKVAULT_"))}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockvault.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def cli(server: Server, *args: str) -> str:
    # what the README tells a newcomer to export
    out = run_cli(*args, env=clean_env(OS_ENDPOINT=f"{server.url}/v3",
                                       OS_AUTH_TOKEN="demo:demo"))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_walkthrough(server, tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:  # data, a hole, more data
        f.write(os.urandom(5 * MiB))
        f.seek(200 * MiB)
        f.write(b"hello blockvault\n" * 100_000)
    vol = cli(server, "volume", "create", "--size", "1", "--name", "disk1")
    cli(server, "volume", "upload", vol, str(image))
    backup = cli(server, "backup", "create", vol, "--name", "nightly", "--wait")
    new = cli(server, "backup", "restore", backup, "--wait")
    restored = tmp_path / "restored.img"
    cli(server, "volume", "download", new, str(restored))
    os.truncate(image, 1024 * MiB)
    assert hashlib.sha256(restored.read_bytes()).hexdigest() == hashlib.sha256(
        image.read_bytes()).hexdigest()
    assert restored.stat().st_blocks * 512 < 64 * MiB  # zero runs came back as holes
    listing = cli(server, "backup", "list")
    assert backup in listing and "available" in listing and "nightly" in listing


def test_cli_errors_are_readable(server):
    env = clean_env(BLOCKVAULT_URL=server.url, BLOCKVAULT_TOKEN="demo:demo")
    out = run_cli("backup", "show", "00000000-0000-0000-0000-000000000001", env=env)
    assert out.returncode != 0
    assert "404: Backup 00000000-0000-0000-0000-000000000001 could not be found." in out.stderr


def test_verify_commands_find_corruption(server, tmp_path):
    vol = cli(server, "volume", "create", "--size", "1")
    image = tmp_path / "d.img"
    image.write_bytes(os.urandom(3 * MiB))
    cli(server, "volume", "upload", vol, str(image))
    backup = cli(server, "backup", "create", vol, "--wait")
    assert '"state": "ok"' in cli(server, "backup", "verify", backup)
    out = cli(server, "verify-container", "--data-dir", str(server.data_dir))
    assert "blocks checked" in out and "corrupt" not in out
    pack = sorted((server.data_dir / "store" / "volumebackups").rglob("packs/*/*"))[-1]
    data = bytearray(pack.read_bytes())
    data[10] ^= 0x55
    pack.write_bytes(bytes(data))
    env = clean_env(BLOCKVAULT_URL=server.url, BLOCKVAULT_TOKEN="demo:demo")
    run = subprocess.run([sys.executable, "-m", "blockvault.cli", "verify-container",
                          "--data-dir", str(server.data_dir)], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 1 and f"corrupt: {pack.relative_to(pack.parents[2])}" in run.stdout
    # the same check through the API, as an admin
    env["BLOCKVAULT_TOKEN"] = "admin:admin"
    run = subprocess.run([sys.executable, "-m", "blockvault.cli", "backup", "verify-container",
                          "volumebackups"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 1 and str(pack.relative_to(pack.parents[2])) in run.stdout
    assert '"state": "failed"' in run.stdout


def test_no_credentials_no_admin(server, tmp_path):
    """Without credentials the client refuses to guess (it used to send admin:admin) and
    tells a newcomer what to export; no request reaches the server."""
    before = server.log().count('"GET /v3')
    out = run_cli("backup", "list", env=clean_env(HOME=str(tmp_path),
                                                  OS_ENDPOINT=f"{server.url}/v3"),
                  cwd=tmp_path)
    assert out.returncode != 0
    assert "no credentials" in out.stderr
    assert "export OS_AUTH_TOKEN=demo:demo" in out.stderr and "OS_CLOUD" in out.stderr
    assert server.log().count('"GET /v3') == before
    # --help needs no credentials
    assert run_cli("backup", "list", "--help", env=clean_env()).returncode == 0


def test_os_token_names_the_caller(server):
    """OS_TOKEN works as OS_AUTH_TOKEN does, and the token is the caller: a project's
    backup list is its own."""
    mine = cli(server, "volume", "create", "--size", "1", "--name", "mine")
    other = run_cli("volume", "show", mine, env=clean_env(
        OS_ENDPOINT=server.url, OS_TOKEN="eve:evil"))
    assert other.returncode != 0 and "404" in other.stderr
    same = run_cli("volume", "show", mine, env=clean_env(
        OS_ENDPOINT=server.url, OS_TOKEN="demo:demo"))
    assert same.returncode == 0 and '"name": "mine"' in same.stdout


def test_clouds_yaml_in_the_users_config(server, tmp_path):
    """OS_CLOUD picks an entry of ~/.config/openstack/clouds.yaml (the standard place),
    auth_type admin_token with token and endpoint, as the openstack CLI reads it."""
    vol = cli(server, "volume", "create", "--size", "1", "--name", "cloudy")
    config = tmp_path / ".config" / "openstack"
    config.mkdir(parents=True)
    (config / "clouds.yaml").write_text(
        "clouds:\n  dev:\n    auth_type: admin_token\n    auth:\n"
        f"      token: demo:demo\n      endpoint: {server.url}/v3/demo\n")
    env = clean_env(HOME=str(tmp_path), OS_CLOUD="dev")
    out = run_cli("volume", "show", vol, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert '"name": "cloudy"' in out.stdout
    # an entry that is not there is named
    out = run_cli("volume", "show", vol, env={**env, "OS_CLOUD": "prod"}, cwd=tmp_path)
    assert out.returncode != 0 and "has no cloud named 'prod'" in out.stderr
