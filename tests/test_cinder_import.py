"""Backups Cinder itself wrote, imported into a live blockvault and used through its API
(issue 13): import_record with Cinder's own exported records, list/show, restore to new and
existing volumes, a corrupt object, a missing parent, verify, export_record, delete, a
blockvault incremental on top of an imported backup, and ``blockvault import-cinder``.

The data is real: the module fixture runs tools/cinder/make-cinder-backups.sh, which drives
Cinder's unmodified PosixBackupDriver (cinder from PyPI in a cached venv): per codec a full
backup and two incrementals (zlib and zstd in the named container ``volumebackups``, bz2 in
Cinder's default per-backup containers ``ab/cd/<id>``). Every test gets its own copy of
Cinder's ``backup_posix_path`` as the server's local store root (or as a separate
``[cinder_store]``). Without the cinder venv the tests skip, except under CI.

The last tests do the same with Cinder's SwiftBackupDriver and S3BackupDriver writing into
the project's real Swift all-in-one (tests/swift_fixture.py), through its Swift API and its
S3 API (s3api): the server's store is then that Swift account or that S3 bucket.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cinder import written_by_cinder
from tests.server import Api, Server, verify_backup

STEPS = ("full", "inc1", "inc2")
GiB = 1024**3
MiB = 1024**2


@pytest.fixture(scope="module")
def cinder_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return written_by_cinder(tmp_path_factory.mktemp("cinder-written"),
                             "--algorithms", "zlib,zstd,bz2")


@pytest.fixture
def posix(cinder_data: dict, tmp_path: Path) -> Path:
    """This test's copy of Cinder's backup_posix_path (tests corrupt and delete objects)."""
    dst = tmp_path / "cinder-posix"
    shutil.copytree(cinder_data["backup_posix_path"], dst)
    return dst


@pytest.fixture
def server(posix: Path, tmp_path: Path):
    """A server whose local store is Cinder's backup_posix_path (blockvault's own backups
    land beside Cinder's, in the same directories)."""
    srv = Server(tmp_path / "bv", {"BLOCKVAULT_LOCAL_STORE_DIR": str(posix)}).start()
    yield srv
    srv.stop()


@pytest.fixture
def admin(server: Server) -> Api:
    """import_record is admin-only: an admin of a fresh project (noauth's admin user)."""
    return server.client("admin", os.urandom(8).hex())


def rec(cinder_data: dict, algo: str, step: str) -> dict:
    return cinder_data["chains"][algo][STEPS.index(step)]


def decoded(record: dict) -> dict:
    return json.loads(base64.b64decode(record["backup_url"]))


def encoded(row: dict, service: str) -> dict:
    return {"backup_service": service,
            "backup_url": base64.b64encode(json.dumps(row).encode()).decode()}


def import_record(api: Api, record: dict, wait: bool = True) -> dict:
    r = api.post("/backups/import_record", {"backup-record": record})
    assert r.status_code == 201, r.text
    backup_id = r.json()["backup"]["id"]
    if not wait:
        return r.json()["backup"]
    return api.wait("backup", backup_id, {"available", "error"})


def import_chain(api: Api, cinder_data: dict, algo: str) -> list[dict]:
    out = []
    for step in STEPS:
        b = import_record(api, rec(cinder_data, algo, step)["record"])
        assert b["status"] == "available", b
        out.append(b)
    return out


def image_sha(cinder_data: dict, b: dict, size: int = GiB) -> str:
    """sha256 of the volume Cinder backed up, padded with zeros to ``size`` bytes."""
    h = hashlib.sha256()
    data = (cinder_data["out"] / "images" / f"{b['id']}.img").read_bytes()
    h.update(data)
    pad = size - len(data)
    zeros = bytes(4 * MiB)
    while pad > 0:
        h.update(zeros[: min(pad, len(zeros))])
        pad -= len(zeros)
    return h.hexdigest()


def volume_path(api: Api, volume_id: str) -> Path:
    assert api.data_dir is not None
    return api.data_dir / "volumes" / f"{volume_id}.raw"


def volume_sha(api: Api, volume_id: str, size: int = GiB) -> str:
    """sha256 of the first ``size`` bytes of a volume's file, skipping its holes."""
    h = hashlib.sha256()
    zeros = bytes(4 * MiB)
    with open(volume_path(api, volume_id), "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                data_at = min(os.lseek(fd, pos, os.SEEK_DATA), size)
            except OSError as e:
                assert e.errno == errno.ENXIO
                data_at = size
            while pos < data_at:  # a hole reads as zeros
                n = min(data_at - pos, len(zeros))
                h.update(zeros[:n])
                pos += n
            if pos >= size:
                break
            hole_at = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
            f.seek(pos)
            while pos < hole_at:
                piece = f.read(min(hole_at - pos, 4 * MiB))
                h.update(piece)
                pos += len(piece)
    return h.hexdigest()


def files(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cinder_objects(posix: Path, b: dict) -> set[str]:
    return {f"{b['container']}/{p.name}" for p in (posix / b["container"]).iterdir()
            if p.name.startswith(b["service_metadata"])}


verify = verify_backup  # a backup's verification, waited for (tests/server.py)


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x5A
    path.write_bytes(bytes(data))


# -- import, list, show, restore -------------------------------------------------------------

@pytest.mark.parametrize("algo", ["zlib", "zstd"])
def test_chain_imported_listed_and_restored_byte_exact(cinder_data, server, admin, algo):
    chain = import_chain(admin, cinder_data, algo)
    by_id = {b["id"]: b for b in chain}
    listed = admin.get("/backups/detail").json()["backups"]
    assert {b["id"] for b in listed} == set(by_id)
    for step, b in zip(STEPS, chain, strict=True):
        c = rec(cinder_data, algo, step)
        shown = admin.get(f"/backups/{b['id']}").json()["backup"]
        assert shown["status"] == "available"
        assert shown["size"] == c["size"] == 1
        assert shown["object_count"] == c["object_count"]
        assert shown["container"] == "volumebackups"
        assert shown["name"] == f"{algo}-{step}"
        assert shown["volume_id"] == c["volume_id"]
        assert shown["is_incremental"] is (step != "full")
        assert shown["has_dependent_backups"] is (step != "inc2")
        assert shown == next(x for x in listed if x["id"] == b["id"])  # one body, two calls
    for step, b in zip(STEPS, chain, strict=True):
        vol = admin.restore(b["id"])
        assert volume_sha(admin, vol) == image_sha(cinder_data, rec(cinder_data, algo, step))
        v = admin.get(f"/volumes/{vol}").json()["volume"]
        # Cinder's volume_meta is applied to the new volume, as Cinder's restore does
        assert v["name"] == f"vol-{algo}"
        assert v["metadata"]["algorithm"] == algo
    assert admin.volume_sha256_http(vol) == image_sha(cinder_data, rec(cinder_data, algo, "inc2"))


def test_default_nested_containers(cinder_data, server, admin):
    """bz2's chain lies in Cinder's default containers, one directory ab/cd/<id> each."""
    chain = import_chain(admin, cinder_data, "bz2")
    assert all(b["container"].count("/") == 2 for b in
               (admin.get(f"/backups/{x['id']}").json()["backup"] for x in chain))
    vol = admin.restore(chain[-1]["id"])
    assert volume_sha(admin, vol) == image_sha(cinder_data, rec(cinder_data, "bz2", "inc2"))
    assert verify(admin, chain[-1]["id"])["state"] == "ok"


def test_restore_onto_existing_larger_volume(cinder_data, server, admin):
    chain = import_chain(admin, cinder_data, "zstd")
    vol = admin.create_volume(2)
    junk = os.urandom(MiB)
    for off in (0, 3 * MiB, GiB - MiB, GiB + 5 * MiB):  # over data, past it, past the GiB
        admin.write(vol, off, junk)
    admin.restore(chain[1]["id"], vol)
    assert volume_sha(admin, vol) == image_sha(cinder_data, rec(cinder_data, "zstd", "inc1"))
    with open(volume_path(admin, vol), "rb") as f:  # what lies past the backup's size stays
        f.seek(GiB + 5 * MiB)
        assert f.read(MiB) == junk


def test_corrupt_object_fails_restore_naming_it(cinder_data, posix, server, admin):
    chain = import_chain(admin, cinder_data, "zlib")
    inc1 = rec(cinder_data, "zlib", "inc1")
    name = f"{inc1['service_metadata']}-00002"
    flip(posix / "volumebackups" / name)
    r = admin.post(f"/backups/{chain[1]['id']}/restore", {"restore": {}})
    assert r.status_code == 202, r.text
    vol = r.json()["restore"]["volume_id"]
    v = admin.wait("volume", vol, {"available", "error_restoring"})
    assert v["status"] == "error_restoring"
    b = admin.wait("backup", chain[1]["id"], {"available"})
    assert name in b["fail_reason"], b["fail_reason"]
    assert name in server.log()
    # the backup is still usable: the other chain members restore
    vol = admin.restore(chain[0]["id"])
    assert volume_sha(admin, vol) == image_sha(cinder_data, rec(cinder_data, "zlib", "full"))


def test_incremental_without_its_parent_is_refused(cinder_data, server, admin):
    inc1 = rec(cinder_data, "zstd", "inc1")
    r = admin.post("/backups/import_record", {"backup-record": inc1["record"]})
    assert r.status_code == 400, r.text
    msg = r.json()["badRequest"]["message"]
    assert inc1["parent_id"] in msg and "not been imported" in msg
    assert admin.get("/backups").json()["backups"] == []
    # and another project's copy of the parent is not this project's parent
    other = Api(admin.url, "admin", os.urandom(8).hex(), data_dir=admin.data_dir)
    assert import_record(other, rec(cinder_data, "zstd", "full")["record"])["status"] == \
        "available"
    assert admin.post("/backups/import_record",
                      {"backup-record": inc1["record"]}).status_code == 400


def test_bad_cinder_records_are_400(cinder_data, server, admin):
    full = rec(cinder_data, "zlib", "full")
    row = decoded(full["record"])
    service = full["record"]["backup_service"]
    for change, word in (({"container": "../etc"}, "container"),
                         ({"service_metadata": "../x"}, "service_metadata"),
                         ({"service": "cinder.backup.drivers.nfs.NFSBackupDriver"}, "service"),
                         ({"object_count": "many"}, "object_count")):
        r = admin.post("/backups/import_record",
                       {"backup-record": encoded({**row, **change}, service)})
        assert r.status_code == 400 and word in r.json()["badRequest"]["message"], r.text
    missing = {k: v for k, v in row.items() if k != "service_metadata"}
    r = admin.post("/backups/import_record", {"backup-record": encoded(missing, service)})
    assert r.status_code == 400 and "service_metadata" in r.text
    # a prefix with no _metadata: the import fails (error), naming the object
    b = import_record(admin, encoded({**row, "service_metadata": row["service_metadata"] +
                                      "x"}, service))
    assert b["status"] == "error" and "_metadata" in b["fail_reason"], b
    assert [x["status"] for x in admin.get("/backups/detail").json()["backups"]] == ["error"]


# -- verify, export, delete ---------------------------------------------------------------------

def test_verify_ok_then_corrupt_and_missing(cinder_data, posix, server, admin):
    chain = import_chain(admin, cinder_data, "zstd")
    v = verify(admin, chain[2]["id"])
    assert v["state"] == "ok" and v["checked_blocks"] == -(-2109440 // 32768), v
    full = rec(cinder_data, "zstd", "full")
    bad = f"volumebackups/{full['service_metadata']}-00005"
    flip(posix / bad)
    gone = f"volumebackups/{rec(cinder_data, 'zstd', 'inc2')['service_metadata']}-00001"
    (posix / gone).unlink()
    v = verify(admin, chain[2]["id"])
    assert v["state"] == "failed"
    assert v["corrupt"] == [bad] and v["missing"] == [gone], v
    v = verify(admin, chain[0]["id"])
    assert v["corrupt"] == [bad] and v["missing"] == [], v


def test_export_record_round_trip(cinder_data, server, admin):
    chain = import_chain(admin, cinder_data, "zlib")
    for step, b in zip(STEPS, chain, strict=True):
        cinder_rec = rec(cinder_data, "zlib", step)["record"]
        r = admin.get(f"/backups/{b['id']}/export_record")
        assert r.status_code == 200, r.text
        out = r.json()["backup-record"]
        assert out["backup_service"] == cinder_rec["backup_service"]
        mine, theirs = decoded(out), decoded(cinder_rec)
        assert list(mine) == list(theirs)  # Cinder's fields, in Cinder's order
        # what differs is the owner (the importing project), when the row last changed,
        # the dependents counted now (Cinder's record was exported before its
        # incrementals existed), and data_timestamp, which blockvault takes from Cinder's
        # _metadata where the record has none
        assert mine["project_id"] == admin.project
        assert mine["num_dependent_backups"] == (0 if step == "inc2" else 1)
        differ = {"user_id", "project_id", "updated_at", "data_timestamp",
                  "num_dependent_backups"}
        assert {k: v for k, v in mine.items() if k not in differ} == \
               {k: v for k, v in theirs.items() if k not in differ}
        assert mine["data_timestamp"][:19] == theirs["created_at"][:19]
    # imported again elsewhere (another server: ids are unique per deployment), it is the
    # same backup


def test_delete_refused_while_incrementals_depend_then_newest_first(cinder_data, posix,
                                                                     server, admin):
    before = files(posix)
    chain = import_chain(admin, cinder_data, "zlib")
    for b in chain[:2]:
        r = admin.delete(f"/backups/{b['id']}")
        assert r.status_code == 400, r.text
        assert r.json()["badRequest"]["message"] == \
            "Invalid backup: Incremental backups exist for this backup."
    removed: set[str] = set()
    for step, b in reversed(list(zip(STEPS, chain, strict=True))):
        mine = cinder_objects(posix, rec(cinder_data, "zlib", step))
        assert len(mine) == rec(cinder_data, "zlib", step)["object_count"] + 2
        assert admin.delete(f"/backups/{b['id']}").status_code == 202
        admin.wait("backup", b["id"], {"deleted"})
        removed |= mine
        after = files(posix)
        assert set(before) - set(after) == removed  # exactly its objects, nothing else
        assert all(after[k] == before[k] for k in after)
    # a deleted backup's record can be imported again only if its objects are back: fails
    b = import_record(admin, rec(cinder_data, "zlib", "full")["record"])
    assert b["status"] == "error" and "missing" in b["fail_reason"]


# -- a blockvault incremental on top of an imported backup -------------------------------------

def test_blockvault_incremental_on_top_of_imported(cinder_data, server, admin):
    vol = admin.create_volume(1)
    # the Cinder volume now lives here as `vol`: inc2's record says so (its volume_id)
    import_record(admin, rec(cinder_data, "zstd", "full")["record"])
    import_record(admin, rec(cinder_data, "zstd", "inc1")["record"])
    inc2 = rec(cinder_data, "zstd", "inc2")
    row = decoded(inc2["record"])
    assert import_record(admin, encoded({**row, "volume_id": vol},
                                        inc2["record"]["backup_service"]))["status"] == \
        "available"
    admin.restore(inc2["id"], vol)
    admin.write(vol, 12345, b"written after the migration" * 1000)
    admin.write(vol, GiB - 4096, b"\x01" * 4096)
    want = admin.volume_sha256(vol)
    new = admin.create_backup(vol, incremental=True)
    shown = admin.get(f"/backups/{new}").json()["backup"]
    assert shown["is_incremental"] is True
    assert admin.get(f"/backups/{inc2['id']}").json()["backup"]["has_dependent_backups"]
    restored = admin.restore(new)
    assert admin.volume_sha256(restored) == want
    assert verify(admin, new)["state"] == "ok"
    # the imported parent cannot go while the blockvault incremental depends on it
    assert admin.delete(f"/backups/{inc2['id']}").status_code == 400
    assert admin.delete(f"/backups/{new}").status_code == 202
    admin.wait("backup", new, {"deleted"})
    assert admin.delete(f"/backups/{inc2['id']}").status_code == 202
    admin.wait("backup", inc2["id"], {"deleted"})


# -- a separate, read-only [cinder_store] ------------------------------------------------------

def test_separate_cinder_store_is_only_read(cinder_data, posix, tmp_path):
    before = files(posix)
    srv = Server(tmp_path / "bv2", {"BLOCKVAULT_CINDER_STORE": json.dumps(
        {"store": "local", "local_store_dir": str(posix)})}).start()
    try:
        api = srv.client("admin", os.urandom(8).hex())
        chain = import_chain(api, cinder_data, "zlib")
        vol = api.restore(chain[2]["id"])
        assert volume_sha(api, vol) == image_sha(cinder_data, rec(cinder_data, "zlib", "inc2"))
        assert verify(api, chain[2]["id"])["state"] == "ok"
        api.put(f"/backups/{chain[0]['id']}", {"backup": {"name": "renamed"}})
        own = api.create_backup(vol)  # blockvault's own data goes to the main store
        assert api.get(f"/backups/{own}").json()["backup"]["status"] == "available"
        time.sleep(1)  # a record job (the rename) would have run by now
        assert files(posix) == before
        assert (srv.data_dir / "store" / "volumebackups").is_dir()
    finally:
        srv.stop()


# -- blockvault import-cinder --------------------------------------------------------------------

def cli(server: Server, token: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **server.env, "BLOCKVAULT_URL": server.url, "BLOCKVAULT_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "blockvault.cli", "import-cinder", *args],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


def test_import_cinder_cli_container(cinder_data, posix, server, admin):
    token = f"admin:{admin.project}"
    ids = {rec(cinder_data, a, s)["id"] for a in ("zlib", "zstd") for s in STEPS}
    dry = cli(server, token, "volumebackups", "--data-dir", str(server.data_dir),
              "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert {line.split()[0] for line in dry.stdout.splitlines()} == ids
    assert admin.get("/backups").json()["backups"] == []
    done = cli(server, token, "volumebackups", "--data-dir", str(server.data_dir))
    assert done.returncode == 0, done.stderr
    assert "6 imported, 0 not imported" in done.stderr
    listed = {b["id"]: b for b in admin.get("/backups/detail").json()["backups"]}
    assert set(listed) == ids and all(b["status"] == "available" for b in listed.values())
    inc2 = rec(cinder_data, "zstd", "inc2")
    assert listed[inc2["id"]]["object_count"] == inc2["object_count"]
    vol = admin.restore(inc2["id"])
    assert volume_sha(admin, vol) == image_sha(cinder_data, inc2)
    # the records it built are Cinder's shape: exported, they match Cinder's own
    mine = decoded(admin.get(f"/backups/{inc2['id']}/export_record").json()["backup-record"])
    theirs = decoded(inc2["record"])
    for key in ("id", "volume_id", "container", "parent_id", "size", "service_metadata",
                "service", "object_count", "display_name", "display_description"):
        assert mine[key] == theirs[key], key
    again = cli(server, token, "volumebackups", "--data-dir", str(server.data_dir))
    assert again.returncode == 1 and "already exists" in again.stderr


def test_import_cinder_cli_posix_tree_reports_broken(cinder_data, posix, server, admin):
    """The whole backup_posix_path, Cinder's nested default containers included; a backup
    whose _metadata is broken is reported, and so is its incremental."""
    bz = [rec(cinder_data, "bz2", s) for s in STEPS]
    broken = posix / bz[1]["container"] / f"{bz[1]['service_metadata']}_metadata"
    broken.write_text("{not json")
    token = f"admin:{admin.project}"
    done = cli(server, token, "--posix-path", str(posix))
    assert done.returncode == 1, done.stderr
    listed = {b["id"]: b for b in admin.get("/backups/detail").json()["backups"]}
    want = {rec(cinder_data, a, s)["id"] for a in ("zlib", "zstd") for s in STEPS}
    assert set(listed) == want | {bz[0]["id"]}
    assert f"{bz[1]['container']}/{broken.name}" in done.stderr  # the broken object named
    assert f"{bz[2]['id']}: not imported" in done.stderr and bz[1]["id"] in done.stderr
    assert "7 imported, 2 not imported" in done.stderr
    vol = admin.restore(bz[0]["id"])
    assert volume_sha(admin, vol) == image_sha(cinder_data, bz[0])


# -- the same through Swift: Cinder's SwiftBackupDriver against the project's real Swift ------

@pytest.fixture(scope="module")
def swift_cinder(swift_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Chains written by Cinder's unmodified SwiftBackupDriver (tempauth, single_user) into
    a Swift container of their own; the data a test changes is put back by the test."""
    container = f"cinder-{os.urandom(6).hex()}"
    data = written_by_cinder(
        tmp_path_factory.mktemp("cinder-swift"), "--algorithms", "zlib,zstd",
        "--driver", "swift", "--swift-auth-url", swift_server.auth_url,
        "--swift-user", "test:tester", "--swift-key", swift_server.users["test:tester"],
        "--swift-container", container)
    data["swift"] = swift_server
    return data


def swift_conn(saio):
    import swiftclient

    return swiftclient.Connection(saio.auth_url, "test:tester", saio.users["test:tester"],
                                  auth_version="1")


def test_swift_chain_imported_restored_verified_deleted(swift_cinder, tmp_path):
    saio = swift_cinder["swift"]
    container = swift_cinder["swift_container"]
    env = {"BLOCKVAULT_STORE": "swift", "BLOCKVAULT_SWIFT_AUTH_URL": saio.auth_url,
           "BLOCKVAULT_SWIFT_USER": "test:tester",
           "BLOCKVAULT_SWIFT_KEY": saio.users["test:tester"],
           "BLOCKVAULT_DEFAULT_CONTAINER": f"bv-{os.urandom(6).hex()}"}
    srv = Server(tmp_path / "bv", env).start()
    conn = swift_conn(saio)
    try:
        api = srv.client("admin", os.urandom(8).hex())
        for algo in ("zlib", "zstd"):
            chain = import_chain(api, swift_cinder, algo)
            for step, b in zip(STEPS, chain, strict=True):
                shown = api.get(f"/backups/{b['id']}").json()["backup"]
                assert shown["container"] == container
                vol = api.restore(b["id"])
                assert volume_sha(api, vol) == image_sha(swift_cinder,
                                                         rec(swift_cinder, algo, step))
            assert verify(api, chain[2]["id"])["state"] == "ok"
            out = api.get(f"/backups/{chain[1]['id']}/export_record").json()["backup-record"]
            assert out["backup_service"] == "cinder.backup.drivers.swift.SwiftBackupDriver"
            assert decoded(out)["service_metadata"] == \
                rec(swift_cinder, algo, "inc1")["service_metadata"]
        # a flipped byte in a Swift object: the restore fails naming it, verify names it
        inc1 = rec(swift_cinder, "zstd", "inc1")
        name = f"{inc1['service_metadata']}-00003"
        _, good = conn.get_object(container, name)
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x5A
        conn.put_object(container, name, bytes(bad))
        try:
            r = api.post(f"/backups/{inc1['id']}/restore", {"restore": {}})
            assert r.status_code == 202
            v = api.wait("volume", r.json()["restore"]["volume_id"],
                         {"available", "error_restoring"})
            assert v["status"] == "error_restoring"
            b = api.wait("backup", inc1["id"], {"available"})
            assert name in b["fail_reason"], b
            assert verify(api, inc1["id"])["corrupt"] == [name]
        finally:
            conn.put_object(container, name, good)
        # delete the zlib chain newest first: exactly its objects leave the container
        before = {o["name"] for o in conn.get_container(container, full_listing=True)[1]}
        zlib = [rec(swift_cinder, "zlib", s) for s in STEPS]
        assert api.delete(f"/backups/{zlib[0]['id']}").status_code == 400
        for b in reversed(zlib):
            assert api.delete(f"/backups/{b['id']}").status_code == 202
            api.wait("backup", b["id"], {"deleted"})
        after = {o["name"] for o in conn.get_container(container, full_listing=True)[1]}
        assert before - after == {n for n in before
                                  if any(n.startswith(b["service_metadata"]) for b in zlib)}
        assert len(before - after) == sum(b["object_count"] + 2 for b in zlib)
        # blockvault wrote nothing into Cinder's container
        assert after <= before
    finally:
        srv.stop()
        conn.close()


def test_swift_import_cinder_cli(swift_cinder, tmp_path):
    """import-cinder finds the backups in a Swift container from their _metadata alone."""
    saio = swift_cinder["swift"]
    container = swift_cinder["swift_container"]
    env = {"BLOCKVAULT_STORE": "swift", "BLOCKVAULT_SWIFT_AUTH_URL": saio.auth_url,
           "BLOCKVAULT_SWIFT_USER": "test:tester",
           "BLOCKVAULT_SWIFT_KEY": saio.users["test:tester"],
           "BLOCKVAULT_DEFAULT_CONTAINER": f"bv-{os.urandom(6).hex()}"}
    srv = Server(tmp_path / "bv", env).start()
    try:
        project = os.urandom(8).hex()
        api = srv.client("admin", project)
        done = cli(srv, f"admin:{project}", container, "--data-dir", str(srv.data_dir))
        # the zlib chain may have been deleted by the test before: what is there is imported
        assert done.returncode == 0, done.stderr
        zstd = [rec(swift_cinder, "zstd", s) for s in STEPS]
        listed = {b["id"]: b for b in api.get("/backups/detail").json()["backups"]}
        assert {b["id"] for b in zstd} <= set(listed)
        shown = listed[zstd[2]["id"]]
        assert shown["status"] == "available" and shown["object_count"] == 7
        vol = api.restore(zstd[2]["id"])
        assert volume_sha(api, vol) == image_sha(swift_cinder, zstd[2])
    finally:
        srv.stop()


# -- the same through S3: Cinder's S3BackupDriver against the project's Swift s3api ----------

@pytest.fixture(scope="module")
def s3_cinder(swift_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Chains written by Cinder's unmodified S3BackupDriver (boto3) into a bucket of their own
    on the Swift all-in-one's S3 API; the data a test changes is put back by the test."""
    bucket = f"cinder-{os.urandom(6).hex()}"
    data = written_by_cinder(
        tmp_path_factory.mktemp("cinder-s3"), "--algorithms", "zlib,zstd", "--driver", "s3",
        "--s3-endpoint-url", swift_server.s3_endpoint, "--s3-access-key", "test:tester",
        "--s3-secret-key", swift_server.users["test:tester"], "--s3-bucket", bucket)
    data["swift"] = swift_server
    return data


def s3_client(saio):
    import boto3

    return boto3.client("s3", endpoint_url=saio.s3_endpoint, region_name=saio.region,
                        aws_access_key_id="test:tester",
                        aws_secret_access_key=saio.users["test:tester"])


def s3_keys(client, bucket: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_s3_chain_imported_restored_verified_deleted(s3_cinder, tmp_path):
    """A server whose store is the S3 bucket Cinder wrote into imports Cinder's own records,
    restores every backup byte-exact, verifies, names a flipped byte, deletes a chain."""
    saio = s3_cinder["swift"]
    bucket = s3_cinder["s3_bucket"]
    service = "cinder.backup.drivers.s3.S3BackupDriver"
    env = {"BLOCKVAULT_STORE": "s3", "BLOCKVAULT_S3_ENDPOINT_URL": saio.s3_endpoint,
           "BLOCKVAULT_S3_REGION": saio.region, "BLOCKVAULT_S3_ACCESS_KEY": "test:tester",
           "BLOCKVAULT_S3_SECRET_KEY": saio.users["test:tester"],
           "BLOCKVAULT_DEFAULT_CONTAINER": f"bv-{os.urandom(6).hex()}"}
    srv = Server(tmp_path / "bv", env).start()
    client = s3_client(saio)
    try:
        api = srv.client("admin", os.urandom(8).hex())
        for algo in ("zlib", "zstd"):
            assert all(rec(s3_cinder, algo, s)["record"]["backup_service"] == service
                       for s in STEPS)
            chain = import_chain(api, s3_cinder, algo)
            for step, b in zip(STEPS, chain, strict=True):
                c = rec(s3_cinder, algo, step)
                shown = api.get(f"/backups/{b['id']}").json()["backup"]
                assert shown["container"] == bucket
                assert shown["object_count"] == c["object_count"]
                assert shown["has_dependent_backups"] is (step != "inc2")
                vol = api.restore(b["id"])
                assert volume_sha(api, vol) == image_sha(s3_cinder, c)
            assert verify(api, chain[2]["id"])["state"] == "ok"
            out = api.get(f"/backups/{chain[1]['id']}/export_record").json()["backup-record"]
            assert out["backup_service"] == service
            assert decoded(out)["service_metadata"] == \
                rec(s3_cinder, algo, "inc1")["service_metadata"]
        # a flipped byte in an S3 object: the restore fails naming it, verify names it
        inc1 = rec(s3_cinder, "zlib", "inc1")
        name = f"{inc1['service_metadata']}-00002"
        good = client.get_object(Bucket=bucket, Key=name)["Body"].read()
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x5A
        client.put_object(Bucket=bucket, Key=name, Body=bytes(bad))
        try:
            r = api.post(f"/backups/{inc1['id']}/restore", {"restore": {}})
            assert r.status_code == 202, r.text
            v = api.wait("volume", r.json()["restore"]["volume_id"],
                         {"available", "error_restoring"})
            assert v["status"] == "error_restoring"
            b = api.wait("backup", inc1["id"], {"available"})
            assert name in b["fail_reason"], b
            assert name in srv.log()
            assert verify(api, inc1["id"])["corrupt"] == [name]
        finally:
            client.put_object(Bucket=bucket, Key=name, Body=good)
        vol = api.restore(inc1["id"])  # put back, it restores again
        assert volume_sha(api, vol) == image_sha(s3_cinder, inc1)
        # delete the zstd chain newest first: exactly its objects leave the bucket
        before = s3_keys(client, bucket)
        zstd = [rec(s3_cinder, "zstd", s) for s in STEPS]
        assert api.delete(f"/backups/{zstd[0]['id']}").status_code == 400
        for b in reversed(zstd):
            assert api.delete(f"/backups/{b['id']}").status_code == 202
            api.wait("backup", b["id"], {"deleted"})
        after = s3_keys(client, bucket)
        assert after <= before  # blockvault wrote nothing into Cinder's bucket
        assert before - after == {k for k in before
                                  if any(k.startswith(b["service_metadata"]) for b in zstd)}
        assert len(before - after) == sum(b["object_count"] + 2 for b in zstd)
    finally:
        srv.stop()
        client.close()


def test_s3_import_cinder_cli(s3_cinder, tmp_path):
    """import-cinder finds the backups in Cinder's S3 bucket from their _metadata alone."""
    saio = s3_cinder["swift"]
    env = {"BLOCKVAULT_STORE": "s3", "BLOCKVAULT_S3_ENDPOINT_URL": saio.s3_endpoint,
           "BLOCKVAULT_S3_REGION": saio.region, "BLOCKVAULT_S3_ACCESS_KEY": "test:tester",
           "BLOCKVAULT_S3_SECRET_KEY": saio.users["test:tester"],
           "BLOCKVAULT_DEFAULT_CONTAINER": f"bv-{os.urandom(6).hex()}"}
    srv = Server(tmp_path / "bv", env).start()
    try:
        project = os.urandom(8).hex()
        api = srv.client("admin", project)
        done = cli(srv, f"admin:{project}", s3_cinder["s3_bucket"], "--data-dir",
                   str(srv.data_dir))
        # the zstd chain may have been deleted by the test before: what is there is imported
        assert done.returncode == 0, done.stderr
        zlib = [rec(s3_cinder, "zlib", s) for s in STEPS]
        listed = {b["id"]: b for b in api.get("/backups/detail").json()["backups"]}
        assert {b["id"] for b in zlib} <= set(listed)
        shown = listed[zlib[2]["id"]]
        assert shown["status"] == "available"
        assert shown["object_count"] == zlib[2]["object_count"]
        vol = api.restore(zlib[2]["id"])
        assert volume_sha(api, vol) == image_sha(s3_cinder, zlib[2])
    finally:
        srv.stop()
