"""An unset ``host_name`` is kept in ``data_dir/host_name`` (written from the machine's
hostname at the first start), so the embedded default keeps running its volumes' jobs when
the hostname changes, as a container's does at every start."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from blockvault.service.jobs import stable_identity
from blockvault.volume.backends import HOST_NAME_FILE, resolve_host_name
from tests.server import Server
from tests.test_worker_kill import restored_as

MiB = 1024 * 1024


def _with_hostname(name: str) -> list[str]:
    """A command prefix running the server with ``name`` as the machine's hostname: a UTS
    namespace of its own (inside a user namespace, so no privileges are needed) — the
    hostname really changes, as it does for a container started anew."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run(["unshare", "-ru", "sh", "-c", "hostname probe-name && hostname"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "probe-name":
        pytest.skip(f"no private hostname here: {probe.stderr.strip()}")
    return ["unshare", "-ru", "sh", "-c", 'hostname "$0" && exec "$@"', name]


def test_unset_host_name_survives_a_hostname_change(tmp_path):
    """The embedded default (serve, SQLite, local store, no host_name): a volume made under
    hostname ``first-host`` is backed up and restored byte-exact by the same data dir's
    next server, started under hostname ``second-host``. Without the kept name the second
    server would announce second-host@rawfile and the backup would wait for first-host
    forever."""
    env = {"BLOCKVAULT_HOST_NAME": ""}  # unset, whatever the test's environment says
    data = tmp_path / "bv"
    srv = Server(data, env, prefix=_with_hostname("first-host")).start()
    try:
        api = srv.client()
        vol = api.create_volume(1)
        tail = os.urandom(3 * MiB)
        api.write(vol, 5 * MiB, tail)
        first = api.create_backup(vol)
        assert (data / HOST_NAME_FILE).read_text() == "first-host\n"
        shown = srv.client("admin", "admin").get(f"/volumes/{vol}").json()["volume"]
        assert shown["os-vol-host-attr:host"] == "first-host@rawfile#rawfile"
    finally:
        srv.stop()

    srv = Server(data, env, prefix=_with_hostname("second-host")).start()
    try:
        api = srv.client()
        # it runs under a hostname of its own (the probe in _with_hostname showed that
        # hostname(1) sets it there)
        assert os.readlink(f"/proc/{srv.proc.pid}/ns/uts") != os.readlink("/proc/self/ns/uts")
        head = os.urandom(MiB)
        api.write(vol, 0, head)
        image = head + bytes(4 * MiB) + tail  # the volume's bytes; zeros after them
        path = data / "volumes" / f"{vol}.raw"
        assert restored_as(path, image)
        second = api.post("/backups", {"backup": {"volume_id": vol, "incremental": True}})
        assert second.status_code == 202, second.text
        b = api.wait("backup", second.json()["backup"]["id"], {"available", "error"}, 30)
        assert b["status"] == "available", b
        # overwrite the volume, restore the new backup into it: the same bytes again
        api.write(vol, 0, bytes(MiB))
        assert not restored_as(path, image)
        api.restore(b["id"], vol)
        assert restored_as(path, image)
        assert api.get(f"/backups/{first}").json()["backup"]["status"] == "available"
        assert (data / HOST_NAME_FILE).read_text() == "first-host\n"
        # both servers' heartbeats named the kept name, never the new hostname
        services = srv.client("admin", "admin").get("/os-services").json()["services"]
        assert {s["host"] for s in services} == {"first-host"}, services
    finally:
        srv.stop()


def test_configured_host_name_wins_and_is_not_written(tmp_path):
    assert resolve_host_name("explicit", tmp_path) == "explicit"
    assert not (tmp_path / HOST_NAME_FILE).exists()
    (tmp_path / HOST_NAME_FILE).write_text("kept\n")
    assert resolve_host_name("explicit", tmp_path) == "explicit"


def test_kept_host_name_is_written_once_then_read(tmp_path):
    # read-only callers (admin commands) never create it
    assert resolve_host_name("", tmp_path, persist=False) == socket.gethostname()
    assert not (tmp_path / HOST_NAME_FILE).exists()
    assert resolve_host_name("", tmp_path) == socket.gethostname()
    assert (tmp_path / HOST_NAME_FILE).read_text() == socket.gethostname() + "\n"
    assert os.listdir(tmp_path) == [HOST_NAME_FILE]  # no temporary file left behind
    # from now on the file says, whatever the machine's hostname (an operator may set it)
    (tmp_path / HOST_NAME_FILE).write_text("renamed\n")
    assert resolve_host_name("", tmp_path) == "renamed"
    assert resolve_host_name("", tmp_path, persist=False) == "renamed"


@pytest.mark.parametrize("content", ["", "\n", "a@b", "a#b", "two words"])
def test_a_kept_host_name_that_is_no_name_is_refused(tmp_path, content):
    (tmp_path / HOST_NAME_FILE).write_text(content)
    with pytest.raises(ValueError, match="not a host name"):
        resolve_host_name("", tmp_path)
    assert (tmp_path / HOST_NAME_FILE).read_text() == content  # never silently replaced


def test_runner_identity_follows_host_name_not_hostname(tmp_path):
    """A worker's identity is its host_name plus its slot, so the same data dir after a
    hostname change still takes back its own unfinished jobs at once."""
    owner, fd = stable_identity(tmp_path, "kept-name")
    assert owner.startswith("kept-name:")
    os.close(fd)
    again, fd = stable_identity(tmp_path, "kept-name")
    assert again == owner
    os.close(fd)
