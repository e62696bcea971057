"""The nbd volume driver with real QEMU tools: qemu-img makes a qcow2 with a persistent
dirty bitmap, qemu-io writes scattered changes, qemu-nbd exports it (``-B`` exposes the
bitmap) on a unix socket, and the engine backs it up through libnbd.

Incrementals read only the bitmap's dirty extents (counted on the source), restores are
byte-exact against ``qemu-img convert -O raw``, a missing bitmap means a full read and an
export that goes away mid-backup fails the backup naming the export.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from blockvault.engine import Engine, EngineConfig, TargetError
from blockvault.store.local import LocalBackend
from blockvault.volume.backends import Disk, InvalidReference, Parent, SourceError

MiB = 1024 * 1024
GiB = 1024 * MiB
BS = 32768

_missing = [t for t in ("qemu-img", "qemu-io", "qemu-nbd") if shutil.which(t) is None]
try:
    from blockvault.volume.nbd import NbdDriver, NbdSource, NbdTarget, load_libnbd

    load_libnbd()
except ImportError as e:  # pragma: no cover - .ci/run installs python3-libnbd
    _missing.append(f"libnbd ({e})")
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"missing: {', '.join(_missing)}")


def qemu_io(img: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(img)], check=True, capture_output=True)


class Export:
    """qemu-nbd serving ``img`` on a unix socket until stopped."""

    def __init__(self, img: Path, sock: Path, bitmap: str | None = None,
                 readonly: bool = True, shared: int = 4) -> None:
        self.sock = sock
        sock.unlink(missing_ok=True)
        args = ["qemu-nbd", "-f", "qcow2", "--socket", str(sock), "--persistent",
                "--shared", str(shared)]
        if readonly:
            args.append("--read-only")
        if bitmap:
            args += ["-B", bitmap]
        self.proc = subprocess.Popen([*args, str(img)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd failed: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.02)
        self.uri = f"nbd+unix:///?socket={sock}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def __enter__(self) -> Export:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def raw_sha(img: Path, tmp: Path) -> str:
    out = tmp / "converted.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(out)],
                   check=True)
    try:
        return file_sha(out)
    finally:
        out.unlink()


def file_sha(path: Path, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    if size is not None:
        h.update(bytes(size - path.stat().st_size))
    return h.hexdigest()


SIZE = 64 * MiB
# Scattered writes after the bitmap was added: (offset, length), 64 KiB-aligned (the
# bitmap's granularity is the qcow2 cluster size).
CHANGES = [(1 * MiB, 64 * 1024), (9 * MiB + 128 * 1024, 128 * 1024), (30 * MiB, 64 * 1024),
           (47 * MiB, 256 * 1024), (63 * MiB, 64 * 1024)]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A qcow2 with 12 MiB of data, then a dirty bitmap b0 (added after the data)."""
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)], check=True)
    qemu_io(img, "write -P 0x11 0 8M", "write -P 0x5a 20M 4M")
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    return img


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(LocalBackend(tmp_path / "store"), tmp_path / "cache",
                  EngineConfig(block_size=BS, pack_size=4 * MiB, workers=2))


def write_changes(img: Path) -> None:
    qemu_io(img, *[f"write -P {0x30 + i} {o} {n}" for i, (o, n) in enumerate(CHANGES)])


def test_full_then_incremental_reads_only_dirty_extents(
        engine: Engine, image: Path, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    with Export(image, sock, "b0") as ex:
        full = NbdSource(ex.uri, "b0", trust_bitmap=False)
        engine.backup(container="c", backup_id="full", source=full, size=SIZE)
        # only the allocated 12 MiB are read (base:allocation)
        assert full.bytes_read == 12 * MiB
        assert full.bitmap_seen
    sha_full = raw_sha(image, tmp_path)
    write_changes(image)
    with Export(image, sock, "b0") as ex:
        inc = NbdSource(ex.uri, "b0", trust_bitmap=True)
        r = engine.backup(container="c", backup_id="inc", source=inc, size=SIZE,
                          parent_id="full")
    dirty = sum(n for _, n in CHANGES)
    assert inc.bytes_read == dirty  # the bitmap's extents, nothing else
    assert r.new_blocks == len(CHANGES)  # one pattern per write: its blocks dedup
    sha_inc = raw_sha(image, tmp_path)
    for bid, sha in (("full", sha_full), ("inc", sha_inc)):
        out = tmp_path / f"restore-{bid}.raw"
        out.touch()
        engine.restore(container="c", backup_id=bid, target=out, target_is_new=True)
        assert file_sha(out, SIZE) == sha


def test_missing_or_untrusted_bitmap_reads_everything(
        engine: Engine, image: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sock = tmp_path / "nbd.sock"
    with Export(image, sock, "b0") as ex:
        engine.backup(container="c", backup_id="full", source=NbdSource(ex.uri, "b0"),
                      size=SIZE)
    write_changes(image)
    allocated = 12 * MiB + sum(n for o, n in CHANGES if not (0 <= o < 8 * MiB
                                                           or 20 * MiB <= o < 24 * MiB))
    with Export(image, sock, None) as ex:  # bitmap not exported
        src = NbdSource(ex.uri, "b0", trust_bitmap=True)
        with caplog.at_level("INFO"):
            engine.backup(container="c", backup_id="inc1", source=src, size=SIZE,
                          parent_id="full")
        assert src.bytes_read == allocated
        assert "does not expose dirty bitmap b0" in caplog.text
        src = NbdSource(ex.uri, "nope", trust_bitmap=True)  # a bitmap the image lacks
        engine.backup(container="c", backup_id="inc2", source=src, size=SIZE,
                      parent_id="inc1")
        assert src.bytes_read == allocated
    with Export(image, sock, "b0") as ex:  # exported but not known to cover the parent
        src = NbdSource(ex.uri, "b0", trust_bitmap=False)
        engine.backup(container="c", backup_id="inc3", source=src, size=SIZE,
                      parent_id="inc2")
        assert src.bytes_read == allocated
    sha = raw_sha(image, tmp_path)
    for bid in ("inc1", "inc2", "inc3"):
        out = tmp_path / f"{bid}.raw"
        out.touch()
        engine.restore(container="c", backup_id=bid, target=out, target_is_new=True)
        assert file_sha(out, SIZE) == sha


def _backup_and_check(engine: Engine, image: Path, tmp_path: Path, src: NbdSource,
                      backup_id: str) -> None:
    engine.backup(container="c", backup_id=backup_id, source=src, size=SIZE)
    # the image's 12 MiB and the changes outside them: all of it allocated, read once
    assert src.bytes_read == 12 * MiB + sum(
        n for o, n in CHANGES if not (0 <= o < 8 * MiB or 20 * MiB <= o < 24 * MiB))
    out = tmp_path / f"{backup_id}.raw"
    out.touch()
    engine.restore(container="c", backup_id=backup_id, target=out, target_is_new=True)
    assert file_sha(out, SIZE) == raw_sha(image, tmp_path)


def test_reads_on_connections_of_their_own_where_the_export_allows(
        engine: Engine, image: Path, tmp_path: Path) -> None:
    """libnbd runs one handle's calls one at a time: where the export allows several
    connections (multi-conn), the reader threads get one each."""
    write_changes(image)
    with Export(image, tmp_path / "m.sock", "b0", shared=4) as ex:
        src = NbdSource(ex.uri)
        _backup_and_check(engine, image, tmp_path, src, "multi")
        assert src.read_connections == 2
    # qemu-nbd's default, one client: no second connection is tried (it would wait for
    # the first to end)
    with Export(image, tmp_path / "o.sock", "b0", shared=1) as ex:
        src = NbdSource(ex.uri)
        _backup_and_check(engine, image, tmp_path, src, "one")
        assert src.read_connections == 0


def test_export_at_its_client_limit_is_read_on_one_connection(
        engine: Engine, image: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that advertises multi-conn but has all the clients it takes leaves a new
    connection's handshake unanswered: the backup reads on its one connection instead of
    waiting for ever."""
    from blockvault.volume import nbd as nbd_driver

    monkeypatch.setattr(nbd_driver, "_CONNECT_WAIT", 0.5)
    write_changes(image)
    with Export(image, tmp_path / "l.sock", "b0", shared=2) as ex:
        other = load_libnbd().NBD()  # another client takes the second slot
        other.connect_uri(ex.uri)
        try:
            src = NbdSource(ex.uri)
            with caplog.at_level("INFO"):
                _backup_and_check(engine, image, tmp_path, src, "limit")
            assert src.read_connections == 0
            assert "reading on one connection" in caplog.text
            assert "no handshake within 0.5 s" in caplog.text
        finally:
            other.shutdown()


def test_restore_onto_an_nbd_export_is_byte_exact(
        engine: Engine, image: Path, tmp_path: Path) -> None:
    write_changes(image)
    sock = tmp_path / "nbd.sock"
    with Export(image, sock, "b0") as ex:
        engine.backup(container="c", backup_id="b", source=NbdSource(ex.uri), size=SIZE)
    sha = raw_sha(image, tmp_path)
    # Onto an export holding other data: stale bytes where the backup has zeros must go.
    other = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), str(SIZE)],
                   check=True)
    qemu_io(other, "write -P 0x77 0 64M")
    with Export(other, tmp_path / "w.sock", readonly=False) as ex:
        engine.restore(container="c", backup_id="b", target=NbdTarget(ex.uri),
                       target_is_new=False)
    assert raw_sha(other, tmp_path) == sha
    # A read-only export or a smaller one is refused, naming it.
    small = tmp_path / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(small), "1M"], check=True)
    with Export(small, tmp_path / "s.sock", readonly=False) as ex:
        with pytest.raises(TargetError, match="s.sock"):
            engine.restore(container="c", backup_id="b", target=NbdTarget(ex.uri),
                           target_is_new=False)
    with Export(other, tmp_path / "r.sock") as ex:
        with pytest.raises(TargetError, match="read-only"):
            engine.restore(container="c", backup_id="b", target=NbdTarget(ex.uri),
                           target_is_new=False)


class _Killing(NbdSource):
    """Stops the export after the first read."""

    export: Export

    def read_into(self, buf, offset, length, limit):  # type: ignore[no-untyped-def]
        mv = super().read_into(buf, offset, length, limit)
        self.export.stop(signal.SIGKILL)
        return mv


def test_export_gone_mid_backup_fails_naming_it(
        engine: Engine, image: Path, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    ex = Export(image, sock, "b0")
    try:
        src = _Killing(ex.uri, "b0")
        src.export = ex
        with pytest.raises(SourceError, match=f"NBD export nbd\\+unix:///\\?socket={sock}"):
            engine.backup(container="c", backup_id="b", source=src, size=SIZE)
    finally:
        ex.stop()
    assert not engine.has_backup(container="c", backup_id="b")
    with pytest.raises(SourceError, match="unreachable"):
        engine.backup(container="c", backup_id="b", source=NbdSource(ex.uri), size=SIZE)


def test_driver_trusts_the_bitmap_only_after_a_backup_taken_with_it(tmp_path: Path) -> None:
    """Manage checks (URI, size in whole GiB, reachability) and the driver's trust rule:
    the bitmap is used for an incremental only when the parent is the last backup recorded
    and was taken while the export exposed the same bitmap."""
    img = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    drv = NbdDriver("vms", {"driver": "nbd"}, data_dir=tmp_path / "data")
    with pytest.raises(InvalidReference, match="not an NBD URI"):
        drv.check_ref({"source-name": "/dev/sda"}, {})
    with pytest.raises(InvalidReference, match="unreachable"):
        drv.check_ref({"source-name": f"nbd+unix:///?socket={tmp_path}/none.sock"}, {})
    with Export(img, tmp_path / "vm.sock", "b0") as ex:
        m = drv.check_ref({"source-name": ex.uri, "bitmap": "b0"}, {})
        assert (m.location, m.size, m.info) == (ex.uri, GiB, {"bitmap": "b0"})
        disk = Disk("v1", GiB, m.location, m.info, {}, owned=False)
        with drv.open_backup(disk, None) as b:  # full
            assert not b.source.trust_bitmap
            b.source.changed_extents()
            b.finish()
            b.committed("bk1")
        with drv.open_backup(disk, Parent("bk1")) as b:
            assert b.source.trust_bitmap
        with drv.open_backup(disk, Parent("other")) as b:  # not the recorded parent
            assert not b.source.trust_bitmap
        moved = Disk("v1", GiB, m.location, m.info, {"bitmap": "b1"}, owned=False)
        with drv.open_backup(moved, Parent("bk1")) as b:  # bitmap re-pointed: full
            assert b.source.bitmap == "b1" and not b.source.trust_bitmap
        drv.open_restore(disk).close()  # a restore voids the bitmap's meaning
        with drv.open_backup(disk, Parent("bk1")) as b:
            assert not b.source.trust_bitmap
        b2 = drv.open_backup(disk, None)
        ex.stop(signal.SIGKILL)
        with pytest.raises(SourceError, match="went away"):
            b2.finish()
        b2.close()
    odd = tmp_path / "odd.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(odd), "100M"], check=True)
    with Export(odd, tmp_path / "odd.sock") as ex:
        with pytest.raises(InvalidReference, match="whole number of GiB"):
            drv.check_ref({"source-name": ex.uri}, {})
    assert os.path.isdir(tmp_path / "data" / "nbd" / "vms")


# -- through the API (Cinder's manage existing, backups, restores) ---------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from tests.server import Server

    base = tmp_path_factory.mktemp("nbdapi")
    config = base / "blockvault.toml"
    config.write_text('host_name = "bvtest"\n[backends.vms]\ndriver = "nbd"\n')
    srv = Server(base / "data", {"BLOCKVAULT_CONFIG": str(config)}).start()
    yield srv
    srv.stop()


def test_api_manage_incremental_from_bitmap_restore_and_export_gone(
        service, tmp_path: Path) -> None:
    img = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"], check=True)
    qemu_io(img, "write -P 0x11 0 8M", "write -P 0x5a 700M 4M")
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    sock = tmp_path / "vm.sock"
    admin = service.client("admin", "admin", version="3.8")
    ex = Export(img, sock, "b0", readonly=False)
    try:
        r = admin.post("/manageable_volumes", {"volume": {
            "host": "bvtest@vms#vms", "ref": {"source-name": ex.uri, "bitmap": "b0"},
            "name": "vm1"}})
        assert r.status_code == 202, r.text
        vol = r.json()["volume"]["id"]
        assert admin.wait("volume", vol, {"available", "error"})["size"] == 1
        full = admin.create_backup(vol)
        ex.stop()
        write_changes(img)
        sha = raw_sha(img, tmp_path)
        ex = Export(img, sock, "b0", readonly=False)
        inc = admin.create_backup(vol, incremental=True)
        assert admin.get(f"/backups/{inc}").json()["backup"]["is_incremental"]
        dirty = sum(n for _, n in CHANGES)
        assert f"incremental from dirty bitmap b0: {len(CHANGES)} extents, {dirty} bytes" \
            in service.log()
        # The bitmap re-pointed through the metadata: not trusted until a backup with it.
        r = admin.put(f"/volumes/{vol}", {"volume": {"metadata": {"bitmap": "b1"}}})
        assert r.status_code == 200, r.text
        admin.create_backup(vol, incremental=True)
        assert "bitmap b1 is not known to cover every write" in service.log()
        # Restore the full backup onto the export, then the incremental: byte-exact.
        admin.restore(full, vol)
        ex.stop()
        assert raw_sha(img, tmp_path) != sha
        ex = Export(img, sock, "b0", readonly=False)
        admin.restore(inc, vol)
        ex.stop()
        assert raw_sha(img, tmp_path) == sha
        # The export goes away: the backup ends in error naming it, the volume is back.
        r = admin.post("/backups", {"backup": {"volume_id": vol}})
        assert r.status_code == 202, r.text
        b = admin.wait("backup", r.json()["backup"]["id"], {"available", "error"})
        assert b["status"] == "error"
        # named as the admin named it when managing the volume
        assert b["fail_reason"].startswith(f"NBD export nbd+unix:///?socket={sock}"), b
        assert "is unreachable" in b["fail_reason"], b["fail_reason"]
        assert admin.get(f"/volumes/{vol}").json()["volume"]["status"] == "available"
    finally:
        ex.stop()
