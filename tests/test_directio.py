"""O_DIRECT data path: aligned reads and writes are byte-exact at every unaligned edge, see
data still in the page cache, and fall back to buffered I/O where direct I/O is refused."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from blockvault.directio import ALIGN, AlignedBuffer, is_aligned, open_direct, pwrite_direct
from blockvault.engine import Engine, EngineConfig
from blockvault.engine.source import read_into
from blockvault.store.local import LocalBackend

MiB = 1024 * 1024


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    probe = tmp_path / "probe"
    probe.touch()
    fd = open_direct(probe, os.O_RDONLY)
    if fd is None:
        pytest.skip(f"{tmp_path} does not support O_DIRECT: the direct path is not exercised")
    os.close(fd)
    return tmp_path


def test_aligned_buffer_is_aligned() -> None:
    for size in (0, 1, 4096, 3 * MiB + 7):
        b = AlignedBuffer(size)
        assert len(b) == size
        if size:
            assert is_aligned(b.view)
            assert not is_aligned(b.view[1:])
    assert not is_aligned(b"read-only bytes" * 1000)


@pytest.mark.parametrize("readable_cut", [0, 1, 511, 4095, 4096, 70_001])
def test_read_into_unaligned_end_reads_zeros_past_readable(direct_dir: Path,
                                                          readable_cut: int) -> None:
    path = direct_dir / "vol"
    data = random.Random(readable_cut).randbytes(4 * MiB + 12_345)
    path.write_bytes(data)
    readable = len(data) - readable_cut
    fd = os.open(path, os.O_RDONLY)
    dfd = open_direct(path, os.O_RDONLY)
    buf = AlignedBuffer(4 * MiB)
    try:
        buf.view[:] = b"\xff" * len(buf)  # stale bytes from an earlier read must not leak
        tail_off = 4 * MiB
        mv = read_into(fd, buf, tail_off, 32 * 1024, readable, dfd)
        want = data[tail_off:readable].ljust(32 * 1024, b"\0")
        assert bytes(mv) == want
        mv = read_into(fd, buf, 0, 4 * MiB, readable, dfd)
        assert hashlib.sha256(mv).digest() == hashlib.sha256(
            data[: min(4 * MiB, readable)].ljust(4 * MiB, b"\0")).digest()
    finally:
        os.close(fd)
        assert dfd is not None
        os.close(dfd)


@pytest.mark.parametrize(("offset", "length"), [(0, 16 * MiB + 123), (4096, 8192),
                                                (100, 9000), (8192, 4095)])
def test_pwrite_direct_any_offset_and_length(direct_dir: Path, offset: int,
                                             length: int) -> None:
    path = direct_dir / "out"
    path.write_bytes(b"")
    buf = AlignedBuffer(length)
    payload = random.Random(length).randbytes(length)
    buf.view[:] = payload
    fd = os.open(path, os.O_WRONLY)
    dfd = open_direct(path, os.O_WRONLY)
    try:
        pwrite_direct(dfd, fd, buf.view, offset)
        pwrite_direct(dfd, fd, memoryview(payload), offset + length)  # bytes: buffered
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)
    got = path.read_bytes()
    assert got[:offset] == bytes(offset)
    assert got[offset:] == payload + payload


def test_local_store_put_of_aligned_pack_is_byte_exact(direct_dir: Path) -> None:
    c = LocalBackend(direct_dir / "store").open("c")
    buf = AlignedBuffer(16 * MiB + 777)
    buf.view[:] = random.Random(9).randbytes(len(buf))
    c.put("packs/ab/x", buf.view)
    assert c.head("packs/ab/x") == len(buf)
    assert hashlib.sha256(c.get("packs/ab/x")).digest() == hashlib.sha256(buf.view).digest()
    assert c.get("packs/ab/x", 16 * MiB, 777) == bytes(buf.view[16 * MiB :])
    leftovers = [p.name for p in (direct_dir / "store" / "c" / "packs" / "ab").iterdir()]
    assert leftovers == ["x"]  # no temporary file left behind


def test_backup_sees_writes_still_in_the_page_cache(direct_dir: Path) -> None:
    """A direct read must see data written (buffered, not fsynced) just before the backup."""
    src = direct_dir / "vol"
    size = 12 * MiB + 4321
    with open(src, "wb") as f:
        f.truncate(size)
    rnd = random.Random(4)
    expected = bytearray(size)
    with open(src, "r+b") as f:
        for off in (0, 5 * MiB + 100, size - 3000):
            chunk = rnd.randbytes(3000)
            f.seek(off)
            f.write(chunk)  # dirty in the page cache: no fsync
            expected[off : off + 3000] = chunk
    eng = Engine(LocalBackend(direct_dir / "store"), direct_dir / "cache",
                 EngineConfig(workers=2))
    eng.backup(container="c", backup_id="b", source=src, size=size)
    dst = direct_dir / "restored"
    dst.touch()
    eng.restore(container="c", backup_id="b", target=dst, target_is_new=True)
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(expected).digest()


@pytest.mark.parametrize("direct_io", [True, False])
def test_round_trip_with_and_without_direct_io(direct_dir: Path, direct_io: bool) -> None:
    src = direct_dir / "vol"
    size = 9 * MiB + ALIGN + 17
    rnd = random.Random(11)
    data = (rnd.randbytes(3 * MiB) + bytes(2 * MiB) + b"blockvault " * 300_000)[:size]
    data = data.ljust(size, b"\x07")
    src.write_bytes(data)
    eng = Engine(LocalBackend(direct_dir / "store"), direct_dir / "cache",
                 EngineConfig(workers=2, pack_size=2 * MiB, direct_io=direct_io))
    eng.backup(container="c", backup_id="b", source=src, size=size)
    for target_is_new in (True, False):
        dst = direct_dir / f"restored-{target_is_new}"
        with open(dst, "wb") as f:
            if not target_is_new:
                f.write(rnd.randbytes(size))
        eng.restore(container="c", backup_id="b", target=dst, target_is_new=target_is_new)
        assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_direct_io_setting_reaches_the_engine(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    from blockvault.config import load_settings
    from blockvault.server import make_engine

    backend = LocalBackend(tmp_path / "store")
    monkeypatch.setenv("BLOCKVAULT_DIRECT_IO", "off")
    assert make_engine(load_settings(data_dir=tmp_path), backend).config.direct_io is False
    monkeypatch.setenv("BLOCKVAULT_DIRECT_IO", "TRUE")
    assert make_engine(load_settings(data_dir=tmp_path), backend).config.direct_io is True
    monkeypatch.setenv("BLOCKVAULT_DIRECT_IO", "sometimes")
    with pytest.raises(ValueError, match="direct_io must be true or false"):
        load_settings(data_dir=tmp_path)
