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


def cli(server: Server, *args: str) -> str:
    env = {**os.environ, "BLOCKVAULT_URL": server.url, "BLOCKVAULT_TOKEN": "demo:demo"}
    out = subprocess.run([sys.executable, "-m", "blockvault.cli", *args], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
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
    env = {**os.environ, "BLOCKVAULT_URL": server.url, "BLOCKVAULT_TOKEN": "demo:demo"}
    out = subprocess.run([sys.executable, "-m", "blockvault.cli", "backup", "show",
                          "00000000-0000-0000-0000-000000000001"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
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
    env = {**os.environ, "BLOCKVAULT_URL": server.url, "BLOCKVAULT_TOKEN": "demo:demo"}
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
