"""Restore into a target that cannot take the data: a full filesystem, a file size limit,
short writes, a refused hole punch, a failing fsync. A restore either writes every byte or
raises TargetError naming the target, the cause and the offset; it never reports success
over wrong bytes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvault.engine import Engine, EngineConfig, EngineError, restorer
from blockvault.engine.restorer import TargetError
from blockvault.store.local import LocalBackend

KiB = 1024
MiB = 1024 * 1024
BS = 64 * KiB
ROOT = Path(__file__).resolve().parent.parent


def make_engine(tmp_path: Path, cache: str = "cache") -> Engine:
    # One pack for the whole backup: the restore is a single run, written with a single
    # pwritev, so a short count on it is the restore's last write (nothing after it would
    # fail and give the short write away).
    return Engine(LocalBackend(tmp_path / "store"), tmp_path / cache,
                  EngineConfig(block_size=BS, pack_size=16 * MiB, workers=2))


def backup(engine: Engine, tmp_path: Path, data: bytes) -> Path:
    src = tmp_path / "vol"
    src.write_bytes(data)
    engine.backup(container="c", backup_id="b1", source=src, size=len(data))
    return src


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the engine's store and cache stay outside it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=True)  # still busy: detach


def test_full_filesystem_fails_the_restore(tmp_path: Path, small_fs: Path) -> None:
    engine = make_engine(tmp_path)
    backup(engine, tmp_path, os.urandom(3 * MiB))  # incompressible, 3x the free space
    dst = small_fs / "target"
    dst.touch()
    with pytest.raises(TargetError) as ei:
        engine.restore(container="c", backup_id="b1", target=dst, target_is_new=True)
    e = ei.value
    assert isinstance(e, EngineError) and e.errno == errno.ENOSPC and e.target == str(dst)
    msg = str(e)
    assert msg.startswith(f"restore target {dst} is full (no space left on device) at offset ")
    # it failed where the filesystem filled up: past what fit, not at the start
    offset = int(msg.rsplit(" ", 1)[1])
    assert 0 < offset <= 1 * MiB


def test_full_filesystem_while_zeroing(tmp_path: Path, small_fs: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Punching holes refused: zero ranges are written out, and run out of space."""
    engine = make_engine(tmp_path)
    data = os.urandom(BS) + bytes(3 * MiB)  # one data block, the rest zero blocks
    backup(engine, tmp_path, data)
    dst = small_fs / "target"
    with open(dst, "wb") as f:  # an old volume of the right size, nothing allocated
        f.truncate(len(data))
    monkeypatch.setattr(restorer, "_fallocate", lambda *a: -1)
    with pytest.raises(TargetError) as ei:
        engine.restore(container="c", backup_id="b1", target=dst, target_is_new=False)
    assert ei.value.errno == errno.ENOSPC
    assert f"restore target {dst} is full (no space left on device) at offset " in str(ei.value)


# A child process with a file size limit: writes past it fail with EFBIG (SIGXFSZ, which
# would kill the process, is ignored), and a write across it is cut short.
_CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    from blockvault.engine import Engine, EngineConfig
    from blockvault.engine.restorer import TargetError
    from blockvault.store.local import LocalBackend

    tmp, target, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    engine = Engine(LocalBackend(tmp / "store"), tmp / "child-cache",
                    EngineConfig(block_size=65536, pack_size=16 * 1024 * 1024, workers=2))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        engine.restore(container="c", backup_id="b1", target=target, target_is_new=True)
    except TargetError as e:
        print(json.dumps({"error": str(e), "errno": e.errno}))
    else:
        print(json.dumps({"error": None}))
""")


def restore_in_child(tmp_path: Path, target: Path, limit: int) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), str(target), str(limit)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_file_size_limit_cuts_a_write_short(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    backup(engine, tmp_path, os.urandom(2 * MiB))
    dst = tmp_path / "target"
    with open(dst, "wb") as f:  # already full size: no growing, the writes hit the limit
        f.truncate(2 * MiB)
    limit = 1 * MiB + 1000  # inside a block: the one pwritev writes up to here
    got = restore_in_child(tmp_path, dst, limit)
    assert got["errno"] == errno.EFBIG
    assert got["error"] == (f"restore target {dst} is full (file too large for the filesystem "
                            f"or the file size limit) at offset {limit}")


def test_file_size_limit_refuses_to_grow_the_target(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    backup(engine, tmp_path, os.urandom(2 * MiB))
    dst = tmp_path / "target"
    dst.touch()
    got = restore_in_child(tmp_path, dst, 1 * MiB)
    assert got["errno"] == errno.EFBIG
    assert got["error"] == (f"restore target {dst} is full (file too large for the filesystem "
                            f"or the file size limit) growing it to {2 * MiB} bytes")


class _ShortOS:
    """``os`` for the restorer, with pwritev/pwrite that write at most ``cap`` bytes per
    call, as a filesystem may (a short count is legal and is not an error)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.calls: dict[str, int] = {"pwritev": 0, "pwrite": 0, "short": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def pwritev(self, fd: int, bufs: Any, offset: int) -> int:
        self.calls["pwritev"] += 1
        out, left = [], self.cap
        for b in bufs:
            v = memoryview(b)[:left]
            out.append(v)
            left -= len(v)
            if not left:
                break
        self.calls["short"] += sum(len(memoryview(b)) for b in bufs) > self.cap
        return os.pwritev(fd, out, offset)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self.calls["pwrite"] += 1
        self.calls["short"] += len(data) > self.cap
        return os.pwrite(fd, memoryview(data)[: self.cap], offset)


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pwritev and every zero-filling pwrite (hole punching refused) is short: the
    restore still writes every byte, over an old volume full of other bytes."""
    engine = make_engine(tmp_path)
    data = (os.urandom(5 * BS + 123) + bytes(2 * MiB)  # zero blocks: zero_range
            + os.urandom(3 * BS) + bytes(BS + 7) + os.urandom(1000))
    backup(engine, tmp_path, data)
    dst = tmp_path / "target"
    dst.write_bytes(b"\xa5" * (len(data) + 100))
    fake = _ShortOS(cap=40_000)  # not a multiple of anything: splits inside buffers
    monkeypatch.setattr(restorer, "os", fake)
    monkeypatch.setattr(restorer, "_fallocate", lambda *a: -1)
    engine.restore(container="c", backup_id="b1", target=dst, target_is_new=False)
    assert fake.calls["pwritev"] > 1 and fake.calls["pwrite"] > 1 and fake.calls["short"] > 2
    got = dst.read_bytes()
    assert sha(got[: len(data)]) == sha(data)
    assert got[len(data) :] == b"\xa5" * 100


def test_zero_fill_short_write_then_full(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero fill writes part of a range, then the device is full: TargetError at the
    offset where writing stopped, not a success and not a bare OSError."""
    engine = make_engine(tmp_path)
    data = os.urandom(BS) + bytes(2 * MiB)
    backup(engine, tmp_path, data)
    dst = tmp_path / "target"
    dst.write_bytes(b"\xa5" * len(data))

    class FillingOS(_ShortOS):
        def pwrite(self, fd: int, data: Any, offset: int) -> int:
            if self.calls["pwrite"] >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().pwrite(fd, data, offset)

    monkeypatch.setattr(restorer, "os", FillingOS(cap=300_000))
    monkeypatch.setattr(restorer, "_fallocate", lambda *a: -1)
    with pytest.raises(TargetError) as ei:
        engine.restore(container="c", backup_id="b1", target=dst, target_is_new=False)
    assert str(ei.value) == (f"restore target {dst} is full (no space left on device) "
                             f"at offset {BS + 600_000}")


def test_other_errors_name_the_errno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(tmp_path)
    backup(engine, tmp_path, os.urandom(MiB))
    dst = tmp_path / "target"
    dst.touch()

    class FailingOS(_ShortOS):
        def fsync(self, fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(restorer, "os", FailingOS(cap=1 << 30))
    with pytest.raises(TargetError) as ei:
        engine.restore(container="c", backup_id="b1", target=dst, target_is_new=True)
    assert str(ei.value) == (f"restore target {dst} failed flushing it to disk: "
                             "EIO (Input/output error)")
    assert ei.value.errno == errno.EIO
    monkeypatch.undo()
    with pytest.raises(TargetError) as ei:
        engine.restore(container="c", backup_id="b1", target=tmp_path / "nothing",
                       target_is_new=True)
    assert str(ei.value) == (f"restore target {tmp_path / 'nothing'} failed opening it: "
                             "ENOENT (No such file or directory)")
