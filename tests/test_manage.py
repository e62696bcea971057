"""Volume backends and Cinder's manage-existing API over real HTTP: image files under a
root (``file``), loop devices as real block devices (``block``), get_pools, manageable
lists, unmanage, and the admin-only policy."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.server import Server

GiB = 1024**3
MiB = 1024**2
HOST = "bvtest"
FILE_HOST = f"{HOST}@images#images"
BLOCK_HOST = f"{HOST}@disks#disks"


def sha256_path(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(8 * MiB):
            h.update(data)
    return h.hexdigest()


def write_at(path: str | Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def sparse_image(path: Path, size: int = GiB, writes: dict[int, bytes] | None = None) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    for offset, data in (writes or {}).items():
        write_at(path, offset, data)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("manage")
    images = base / "images"
    images.mkdir()
    (base / "outside").mkdir()
    config = base / "blockvault.toml"
    config.write_text(
        f'host_name = "{HOST}"\n'
        "[backends.images]\n"
        'driver = "file"\n'
        f'root = "{images}"\n'
        "[backends.disks]\n"
        'driver = "block"\n'
        'paths = ["/dev/loop*"]\n'
    )
    srv = Server(base / "data", {"BLOCKVAULT_CONFIG": str(config),
                                 "BLOCKVAULT_QUOTA_VOLUMES": "1000",
                                 "BLOCKVAULT_QUOTA_GIGABYTES": "100000"}).start()
    srv.images, srv.base = images, base
    yield srv
    srv.stop()


@pytest.fixture
def admin(world):
    return world.client("admin", "admin", version="3.8")


@pytest.fixture
def member(world):
    return world.client("alice", "proja", version="3.8")


@pytest.fixture
def loops(tmp_path, admin):
    """Make loop devices of sparse images: ``loops(size)`` returns /dev/loopN; all are
    detached at the end, and the volumes managing them are let go (the next test may be
    given the same device names)."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    made: list[str] = []

    def make(size: int = GiB) -> str:
        img = sparse_image(tmp_path / f"loop{len(made)}.img", size)
        out = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True,
                             text=True)
        if out.returncode != 0:
            pytest.skip(f"this machine gives no loop devices: {out.stderr.strip()}")
        made.append(out.stdout.strip())
        return made[-1]

    yield make
    vols = admin.get("/volumes/detail", params={"all_tenants": "1"}).json()["volumes"]
    for v in vols:
        if v["os-vol-host-attr:host"] == BLOCK_HOST:
            admin.post(f"/volumes/{v['id']}/action",
                       {"os-reset_status": {"status": "available"}})
            r = admin.post(f"/volumes/{v['id']}/action", {"os-unmanage": {}})
            assert r.status_code == 202, r.text
    for dev in made:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def manage(api, host: str, source: str, **extra):
    return api.post("/manageable_volumes", {"volume": {"host": host,
                                                       "ref": {"source-name": source},
                                                       **extra}})


def managed(api, host: str, source: str, **extra) -> dict:
    r = manage(api, host, source, **extra)
    assert r.status_code == 202, r.text
    return r.json()["volume"]


def count_volumes(api) -> int:
    return len(api.get("/volumes", params={"all_tenants": "1"}).json()["volumes"])


def bad_request(r) -> str:
    assert r.status_code == 400, r.text
    return r.json()["badRequest"]["message"]


# -- pools --------------------------------------------------------------------------------


def test_get_pools_lists_every_backend_with_capabilities(admin, member):
    r = admin.get("/scheduler-stats/get_pools")
    assert r.status_code == 200, r.text
    names = [p["name"] for p in r.json()["pools"]]
    assert names == [f"{HOST}@rawfile#rawfile", FILE_HOST, BLOCK_HOST]
    assert all(set(p) == {"name"} for p in r.json()["pools"])
    pools = admin.get("/scheduler-stats/get_pools", params={"detail": "true"}).json()["pools"]
    caps = {p["name"]: p["capabilities"] for p in pools}
    assert caps[FILE_HOST]["volume_backend_name"] == "images"
    assert caps[FILE_HOST]["driver"] == "file"
    assert caps[FILE_HOST]["total_capacity_gb"] > 0
    assert caps[BLOCK_HOST]["pool_name"] == "disks"
    assert member.get("/scheduler-stats/get_pools").status_code == 403


def test_existing_raw_volumes_keep_working_on_the_default_backend(admin):
    vol = admin.create_volume(1)
    shown = admin.get(f"/volumes/{vol}").json()["volume"]
    assert shown["os-vol-host-attr:host"] == f"{HOST}@rawfile#rawfile"
    admin.write(vol, 0, b"x" * 4096)
    admin.create_backup(vol)
    assert admin.delete(f"/volumes/{vol}").status_code == 202


# -- file backend -------------------------------------------------------------------------


def test_sparse_image_manage_backup_restore_byte_exact(world, admin):
    img = sparse_image(world.images / "disk1.raw", GiB, {
        0: os.urandom(MiB), 300 * MiB: os.urandom(3 * MiB), GiB - 64 * 1024: os.urandom(65536)
    })
    ino = img.stat().st_ino
    vol = managed(admin, FILE_HOST, "disk1.raw", name="img1", metadata={"k": "v"})
    assert (vol["status"], vol["size"], vol["name"]) == ("available", 1, "img1")
    shown = admin.get(f"/volumes/{vol['id']}").json()["volume"]
    assert shown["os-vol-host-attr:host"] == FILE_HOST
    full_sha = sha256_path(img)
    full = admin.create_backup(vol["id"])
    # scattered writes in place (the same file), then an incremental
    write_at(img, 5 * MiB, os.urandom(40000))
    write_at(img, 700 * MiB, os.urandom(MiB))
    incr_sha = sha256_path(img)
    incr = admin.create_backup(vol["id"], incremental=True)
    assert admin.get(f"/backups/{incr}").json()["backup"]["is_incremental"] is True

    # the incremental onto a new volume (blockvault's own raw file)
    copy = admin.restore(incr)
    assert admin.volume_sha256(copy) == incr_sha
    # the full one back onto the managed image itself
    admin.restore(full, vol["id"])
    assert sha256_path(img) == full_sha
    assert img.stat().st_ino == ino  # written in place, never replaced
    # and onto another managed image at least as large
    sparse_image(world.images / "disk1-copy.raw", 2 * GiB)
    other = managed(admin, FILE_HOST, "disk1-copy.raw")
    assert other["size"] == 2
    admin.restore(incr, other["id"])
    with open(world.images / "disk1-copy.raw", "rb") as f:
        h = hashlib.sha256()
        left = GiB
        while left:
            data = f.read(min(8 * MiB, left))
            h.update(data)
            left -= len(data)
    assert h.hexdigest() == incr_sha


def test_paths_escaping_the_root_are_refused(world, admin):
    outside = sparse_image(world.base / "outside" / "secret.raw", GiB)
    (world.images / "sub").mkdir(exist_ok=True)
    os.symlink(outside, world.images / "sub" / "link.raw")
    before = count_volumes(admin)
    msg = bad_request(manage(admin, FILE_HOST, "../outside/secret.raw"))
    assert "outside the root" in msg and "../outside/secret.raw" in msg
    msg = bad_request(manage(admin, FILE_HOST, "sub/link.raw"))
    assert "outside the root" in msg and "sub/link.raw" in msg
    msg = bad_request(manage(admin, FILE_HOST, str(outside)))
    assert "outside the root" in msg
    assert count_volumes(admin) == before


def test_bad_manage_requests_name_the_problem(world, admin):
    sparse_image(world.images / "odd.raw", GiB + 512)
    before = count_volumes(admin)
    assert "not a whole number of GiB" in bad_request(manage(admin, FILE_HOST, "odd.raw"))
    assert "does not exist" in bad_request(manage(admin, FILE_HOST, "nope.raw"))
    assert "Backend nosuch" in bad_request(manage(admin, f"{HOST}@nosuch#x", "odd.raw"))
    assert "not this service's host" in bad_request(manage(admin, "other@images#images",
                                                           "odd.raw"))
    assert "Pool p2" in bad_request(manage(admin, f"{HOST}@images#p2", "odd.raw"))
    r = admin.post("/manageable_volumes", {"volume": {"host": FILE_HOST}})
    assert r.status_code == 400
    assert "does not manage existing" in bad_request(
        manage(admin, f"{HOST}@rawfile#rawfile", "x"))
    assert count_volumes(admin) == before


def test_a_file_replaced_behind_the_service_is_refused(world, admin):
    img = sparse_image(world.images / "disk2.raw", GiB, {0: os.urandom(MiB)})
    vol = managed(admin, FILE_HOST, "disk2.raw")
    replacement = sparse_image(world.images / ".disk2.new", GiB, {0: os.urandom(MiB)})
    os.replace(replacement, img)
    r = admin.post("/backups", {"backup": {"volume_id": vol["id"]}})
    assert r.status_code == 202, r.text
    b = admin.wait("backup", r.json()["backup"]["id"], {"available", "error"})
    assert b["status"] == "error"
    assert "disk2.raw" in b["fail_reason"] and "replaced" in b["fail_reason"]
    assert str(world.images) not in b["fail_reason"]
    assert admin.get(f"/volumes/{vol['id']}").json()["volume"]["status"] == "available"


def test_v2_os_volume_manage_and_duplicates(world, admin):
    sparse_image(world.images / "disk3.raw", GiB)
    v2 = world.client("admin", "admin", api="v2")
    r = v2.post("/os-volume-manage", {"volume": {"host": FILE_HOST,
                                                "ref": {"source-name": "disk3.raw"}}})
    assert r.status_code == 202, r.text
    vol_id = r.json()["volume"]["id"]
    msg = bad_request(manage(admin, FILE_HOST, "./disk3.raw"))
    assert f"already managed by volume {vol_id}" in msg


def test_manageable_list_shows_candidates_in_cinders_shape(world, admin, member):
    sparse_image(world.images / "m-free.raw", 2 * GiB)
    sparse_image(world.images / "m-odd.raw", 1000)
    sparse_image(world.images / "m-taken.raw", GiB)
    taken = managed(admin, FILE_HOST, "m-taken.raw")
    r = admin.get("/manageable_volumes", params={"host": FILE_HOST})
    assert r.status_code == 200, r.text
    summary = {e["reference"]["source-name"]: e for e in r.json()["manageable-volumes"]}
    assert summary["m-free.raw"] == {"reference": {"source-name": "m-free.raw"}, "size": 2,
                                     "safe_to_manage": True}
    detail = admin.get("/manageable_volumes/detail", params={"host": FILE_HOST}).json()
    entries = {e["reference"]["source-name"]: e for e in detail["manageable-volumes"]}
    assert entries["m-taken.raw"]["safe_to_manage"] is False
    assert entries["m-taken.raw"]["reason_not_safe"] == "already managed"
    assert entries["m-taken.raw"]["cinder_id"] == taken["id"]
    assert entries["m-odd.raw"]["safe_to_manage"] is False
    assert "GiB" in entries["m-odd.raw"]["reason_not_safe"]
    assert entries["m-free.raw"]["reason_not_safe"] is None
    names = [e["reference"]["source-name"] for e in detail["manageable-volumes"]]
    assert names == sorted(names, reverse=True)  # Cinder's default: reference, desc
    page = admin.get("/manageable_volumes", params={
        "host": FILE_HOST, "sort": "reference:asc", "limit": "1", "offset": "1"}).json()
    assert [e["reference"]["source-name"] for e in page["manageable-volumes"]] == \
        sorted(names)[1:2]
    assert "host" in bad_request(admin.get("/manageable_volumes"))
    assert member.get("/manageable_volumes", params={"host": FILE_HOST}).status_code == 403
    old = world.client("admin", "admin", version="3.7")
    assert old.get("/manageable_volumes", params={"host": FILE_HOST}).status_code == 404


def test_unmanage_and_delete_leave_the_disk(world, admin):
    img = sparse_image(world.images / "keep.raw", GiB, {4096: b"keep me" * 100})
    sha = sha256_path(img)
    vol = managed(admin, FILE_HOST, "keep.raw")
    r = admin.post(f"/volumes/{vol['id']}/action", {"os-unmanage": {}})
    assert r.status_code == 202, r.text
    assert admin.get(f"/volumes/{vol['id']}").status_code == 404
    assert img.exists() and sha256_path(img) == sha
    again = managed(admin, FILE_HOST, "keep.raw")  # free to manage again
    assert admin.delete(f"/volumes/{again['id']}").status_code == 202
    admin.wait("volume", again["id"], {"deleted"})
    assert img.exists() and sha256_path(img) == sha


def test_manage_and_unmanage_are_admin_only(world, admin, member):
    sparse_image(world.images / "adm.raw", GiB)
    r = manage(member, FILE_HOST, "adm.raw")
    assert r.status_code == 403, r.text
    own = member.create_volume(1)
    assert member.post(f"/volumes/{own}/action", {"os-unmanage": {}}).status_code == 403
    assert member.get(f"/volumes/{own}").json()["volume"]["status"] == "available"


def test_managed_disks_refuse_what_only_owned_ones_can_do(world, admin):
    sparse_image(world.images / "fixed.raw", GiB)
    vol = managed(admin, FILE_HOST, "fixed.raw")["id"]
    r = admin.post(f"/volumes/{vol}/action", {"os-extend": {"new_size": 2}})
    assert "does not own" in bad_request(r)
    r = admin.post("/snapshots", {"snapshot": {"volume_id": vol}})
    assert "does not own" in bad_request(r)


# -- block backend (loop devices) ---------------------------------------------------------


def test_loop_devices_manage_backup_restore_byte_exact(admin, loops):
    src, dst = loops(GiB), loops(GiB)
    for offset in (0, 123 * MiB, 512 * MiB + 4096, GiB - MiB):
        write_at(src, offset, os.urandom(MiB))
    vol = managed(admin, BLOCK_HOST, src, name="lv1")
    assert vol["size"] == 1
    assert admin.get(f"/volumes/{vol['id']}").json()["volume"]["os-vol-host-attr:host"] \
        == BLOCK_HOST
    full_sha = sha256_path(src)
    full = admin.create_backup(vol["id"])
    for offset in (7 * MiB, 900 * MiB):
        write_at(src, offset, os.urandom(200000))
    incr_sha = sha256_path(src)
    incr = admin.create_backup(vol["id"], incremental=True)

    target = managed(admin, BLOCK_HOST, dst)
    admin.restore(incr, target["id"])
    assert sha256_path(dst) == incr_sha
    admin.restore(full, target["id"])
    assert sha256_path(dst) == full_sha
    # the source itself, back to the full backup's bytes
    admin.restore(full, vol["id"])
    assert sha256_path(src) == full_sha
    # in use: Cinder's force
    assert admin.post(f"/volumes/{vol['id']}/action", {"os-attach": {
        "mountpoint": "/dev/vdb", "instance_uuid": "0" * 8 + "-0000-0000-0000-" + "0" * 12,
    }}).status_code == 202
    r = admin.post("/backups", {"backup": {"volume_id": vol["id"]}})
    assert "force" in bad_request(r)
    admin.create_backup(vol["id"], force=True)
    # unmanage leaves the device as it is
    admin.post(f"/volumes/{vol['id']}/action", {"os-detach": {}})
    assert admin.post(f"/volumes/{vol['id']}/action", {"os-unmanage": {}}).status_code == 202
    assert sha256_path(src) == full_sha


def test_devices_outside_the_patterns_are_refused(admin, loops, tmp_path):
    dev = loops(GiB)
    link = tmp_path / "disk-link"
    os.symlink(dev, link)
    before = count_volumes(admin)
    assert "does not match the device patterns" in bad_request(
        manage(admin, BLOCK_HOST, str(link)))
    assert "normalised" in bad_request(manage(admin, BLOCK_HOST, f"{dev}/../sda"))
    assert "normalised" in bad_request(manage(admin, BLOCK_HOST, "loop0"))
    assert "not a block device" in bad_request(manage(admin, BLOCK_HOST, "/dev/loop-control"))
    assert count_volumes(admin) == before
    listed = admin.get("/manageable_volumes/detail", params={"host": BLOCK_HOST}).json()
    mine = [e for e in listed["manageable-volumes"] if e["reference"]["source-name"] == dev]
    assert mine and mine[0]["size"] == 1 and mine[0]["safe_to_manage"] is True


def test_a_device_that_goes_away_fails_the_backup_naming_it(admin, loops):
    dev = loops(GiB)
    write_at(dev, 0, os.urandom(MiB))
    vol = managed(admin, BLOCK_HOST, dev)
    subprocess.run(["losetup", "-d", dev], check=True)
    r = admin.post("/backups", {"backup": {"volume_id": vol["id"]}})
    assert r.status_code == 202, r.text
    b = admin.wait("backup", r.json()["backup"]["id"], {"available", "error"})
    assert b["status"] == "error"
    assert dev in b["fail_reason"], b["fail_reason"]
    assert admin.get(f"/volumes/{vol['id']}").json()["volume"]["status"] == "available"


def test_a_file_replaced_during_the_backup_fails_it_naming_the_source(world, admin):
    """The engine reads through its own descriptor, so a file renamed over the source while
    it reads does not disturb the reads; the check when they are done catches it."""
    img = sparse_image(world.images / "busy.raw", GiB)
    with open(img, "r+b") as f:
        for _ in range(96):  # 768 MiB of incompressible data: a backup of a few seconds
            f.write(os.urandom(8 * MiB))
    vol = managed(admin, FILE_HOST, "busy.raw")
    r = admin.post("/backups", {"backup": {"volume_id": vol["id"]}})
    assert r.status_code == 202, r.text
    backup_id = r.json()["backup"]["id"]
    while True:
        p = admin.get(f"/backups/{backup_id}/progress").json()["progress"]
        if p["status"] != "creating":
            pytest.skip("the backup finished before the test could replace its source")
        if p["phase"] == "backup" and 0 < p["bytes_done"] < GiB:
            break
        time.sleep(0.01)
    os.replace(sparse_image(world.images / ".busy.new", GiB), img)
    b = admin.wait("backup", backup_id, {"available", "error"})
    assert b["status"] == "error", b
    assert "busy.raw" in b["fail_reason"] and "replaced" in b["fail_reason"]
    assert admin.get(f"/volumes/{vol['id']}").json()["volume"]["status"] == "available"


def test_a_device_detached_during_the_backup_fails_it_naming_the_source(admin, loops):
    """``losetup -d`` of a device in use detaches it when the last user closes it: the
    reads finish, then the device is empty, and the check after them says which source."""
    dev = loops(GiB)
    with open(dev, "r+b") as f:
        for _ in range(96):
            f.write(os.urandom(8 * MiB))
    vol = managed(admin, BLOCK_HOST, dev)
    r = admin.post("/backups", {"backup": {"volume_id": vol["id"]}})
    assert r.status_code == 202, r.text
    backup_id = r.json()["backup"]["id"]
    while True:
        p = admin.get(f"/backups/{backup_id}/progress").json()["progress"]
        if p["status"] != "creating":
            pytest.skip("the backup finished before the test could detach its source")
        if p["phase"] == "backup" and 0 < p["bytes_done"] < GiB:
            break
        time.sleep(0.01)
    subprocess.run(["losetup", "-d", dev], check=True)
    b = admin.wait("backup", backup_id, {"available", "error"})
    assert b["status"] == "error", b
    assert dev in b["fail_reason"], b["fail_reason"]
    assert admin.get(f"/volumes/{vol['id']}").json()["volume"]["status"] == "available"


# -- migration 0006 -----------------------------------------------------------------------


def _migrate(url: str, revision: str, down: bool = False) -> None:
    from alembic import command
    from alembic.config import Config

    from blockvault.db.session import MIGRATIONS, Database

    db = Database(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection_url"] = url
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)
    db.engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migration_0006_puts_existing_volumes_on_the_default_backend(kind, tmp_path):
    import contextlib

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import IntegrityError

    from tests.pg import pg_database

    ctx = pg_database() if kind == "postgresql" else contextlib.nullcontext(
        f"sqlite:///{tmp_path / 'bv.sqlite'}")
    with ctx as url:
        _migrate(url, "0005")
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO volumes (id, project_id, user_id, size, metadata, status, "
                "attach_status, availability_zone, bootable, created_at, deleted) VALUES "
                "('v1', 'p', 'u', 1, '{}', 'available', 'detached', 'nova', false, "
                "CURRENT_TIMESTAMP, false)"))
        _migrate(url, "head")
        with engine.begin() as conn:
            row = conn.execute(text(
                "SELECT backend, provider_location, owns_disk FROM volumes")).one()
        assert tuple(row) == ("rawfile", None, True)
        # one live volume per disk; deleted ones and raw ones (no location) do not count
        insert = text(
            "INSERT INTO volumes (id, project_id, user_id, size, metadata, status, "
            "attach_status, availability_zone, bootable, created_at, deleted, backend, "
            "provider_location, owns_disk) VALUES (:id, 'p', 'u', 1, '{}', 'available', "
            "'detached', 'nova', false, CURRENT_TIMESTAMP, :deleted, :backend, :loc, false)")
        with engine.begin() as conn:
            conn.execute(insert, dict(id="v2", deleted=True, backend="images", loc="a.raw"))
            conn.execute(insert, dict(id="v3", deleted=False, backend="images", loc="a.raw"))
            conn.execute(insert, dict(id="v4", deleted=False, backend="rawfile", loc=None))
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert, dict(id="v5", deleted=False, backend="images", loc="a.raw"))
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM volumes WHERE id IN ('v2', 'v3', 'v4')"))
        _migrate(url, "0005", down=True)  # and back
        _migrate(url, "head")
        engine.dispose()


# -- python-cinderclient (what `cinder manage` and `openstack volume create --remote-source`
# -- use) ------------------------------------------------------------------------------------


def test_cinderclient_manage_list_pools_unmanage(world):
    cinder_client = pytest.importorskip("cinderclient.client")
    ks_loading = pytest.importorskip("keystoneauth1.loading")
    ks_session = pytest.importorskip("keystoneauth1.session")
    auth = ks_loading.get_plugin_loader("noauth").load_from_options(
        user_id="admin", project_id="admin", endpoint=f"{world.url}/v3")
    cc = cinder_client.Client("3.71", session=ks_session.Session(auth=auth))
    img = sparse_image(world.images / "cc.raw", GiB, {0: b"cinderclient" * 100})
    sha = sha256_path(img)
    pools = {p.name: p for p in cc.pools.list(detailed=True)}
    assert pools[FILE_HOST].volume_backend_name == "images"  # lifted from capabilities
    listed = {m.reference["source-name"]: m for m in cc.volumes.list_manageable(FILE_HOST)}
    assert listed["cc.raw"].safe_to_manage is True
    vol = cc.volumes.manage(FILE_HOST, {"source-name": "cc.raw"}, name="cc")
    assert (vol.status, vol.size, vol.name) == ("available", 1, "cc")
    assert getattr(cc.volumes.get(vol.id), "os-vol-host-attr:host") == FILE_HOST
    listed = {m.reference["source-name"]: m for m in cc.volumes.list_manageable(FILE_HOST)}
    assert listed["cc.raw"].safe_to_manage is False and listed["cc.raw"].cinder_id == vol.id
    cc.volumes.unmanage(vol)
    assert sha256_path(img) == sha


def test_openstack_cli_commands_of_the_docs(world):
    """The commands docs/volumes.md shows an operator."""
    pytest.importorskip("openstackclient.shell")
    import json
    import sys

    def osc(*args: str):
        cmd = [sys.executable, "-m", "openstackclient.shell", "--os-auth-type", "admin_token",
               "--os-token", "admin:admin", "--os-endpoint", f"{world.url}/v3", *args,
               "-f", "json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"{args}: {p.stderr}"
        return json.loads(p.stdout)

    img = sparse_image(world.images / "osc.raw", GiB, {0: b"osc" * 1000})
    sha = sha256_path(img)
    listed = osc("--os-volume-api-version", "3.8", "block", "storage", "volume",
                 "manageable", "list", FILE_HOST)
    assert any(x["reference"] == {"source-name": "osc.raw"} for x in listed)
    vol = osc("volume", "create", "--remote-source", "source-name=osc.raw", "--host",
              FILE_HOST, "oscvol")
    assert (vol["name"], vol["size"], vol["status"]) == ("oscvol", 1, "available")
    pools = osc("--os-volume-api-version", "3.8", "volume", "backend", "pool", "list")
    assert FILE_HOST in [p["Name"] for p in pools]
    assert sha256_path(img) == sha


def test_racing_managers_of_one_source_make_one_volume(world, admin):
    from concurrent.futures import ThreadPoolExecutor

    sparse_image(world.images / "race.raw", GiB)
    clients = [world.client("admin", "admin") for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(lambda c: manage(c, FILE_HOST, "race.raw").status_code,
                                clients))
    assert codes == [202, 400, 400, 400, 400, 400]
