"""Block sizes from 4 KiB to 4 MiB: zstd raw-block extraction (zstd splits input into blocks
of at most 128 KiB) and byte-exact engine round trips for every codec."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import zstandard

from blockvault.engine import Engine, EngineConfig
from blockvault.engine.codecs import zstd_stored_block
from blockvault.store.local import LocalBackend

KiB = 1024
MiB = 1024 * 1024
SIZES = [4 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB]


# -- zstd frames, walked independently of the code under test ----------------------------
def frame_blocks(frame: bytes) -> tuple[int, list[tuple[int, int, int, int]]]:
    """(frame header length, [(header offset, block type, block size, content length)])."""
    assert frame[:4] == b"\x28\xb5\x2f\xfd"
    fhd = frame[4]
    single = fhd >> 5 & 1
    fcs = (0, 2, 4, 8)[fhd >> 6] or single
    pos = 5 + (not single) + (0, 1, 2, 4)[fhd & 3] + fcs
    header = pos
    blocks = []
    while True:
        h = int.from_bytes(frame[pos : pos + 3], "little")
        btype, bsize = h >> 1 & 3, h >> 3
        content = 1 if btype == 1 else bsize  # an RLE block stores one byte
        blocks.append((pos, btype, bsize, content))
        pos += 3 + content
        if h & 1:
            break
    assert pos + (4 if fhd & 4 else 0) == len(frame)
    return header, blocks


def tail_lookup(frame: bytes, size: int) -> memoryview | None:
    """The old extraction: the block header found by counting back from the frame's end."""
    mv = memoryview(frame)
    n = len(mv)
    if n < size + 3 + 5 or mv[4] & 0x04:
        return None
    if int.from_bytes(mv[n - size - 3 : n - size], "little") != (size << 3) | 1:
        return None
    return mv[n - size :]


def check(frame: bytes, data: bytes) -> memoryview | None:
    got = zstd_stored_block(frame, len(data))
    if got is not None:
        assert got.obj is frame  # a view into the frame, not a copy
        assert bytes(got) == data
    return got


@pytest.mark.parametrize("size", SIZES)
def test_incompressible_blocks_of_every_size(size: int) -> None:
    z = zstandard.ZstdCompressor(level=1)
    for _ in range(3):
        data = os.urandom(size)
        frame = z.compress(data)
        got = check(frame, data)
        _, blocks = frame_blocks(frame)
        # taken out of the frame exactly when zstd made it one raw block
        assert (got is not None) == (len(blocks) == 1 and blocks[0][1] == 0)
        assert (got is not None) == (size <= 128 * KiB)
        assert zstd_stored_block(frame, size // 2) is None
        assert zstd_stored_block(frame, size + 1) is None


def test_batch_segments_are_taken_as_views() -> None:
    """What the archiver passes: segments of multi_compress_to_buffer's output."""
    import struct

    bs = 64 * KiB
    data = os.urandom(3 * bs)
    segs = struct.pack("<6Q", 0, bs, bs, bs, 2 * bs, bs)
    out = zstandard.ZstdCompressor(level=1).multi_compress_to_buffer(
        zstandard.BufferWithSegments(data, segs), threads=1)
    for k in range(3):
        got = zstd_stored_block(out[k], bs)
        assert got is not None and bytes(got) == data[k * bs : (k + 1) * bs]


def lookalike(size: int) -> tuple[bytes, bytes]:
    """Incompressible data of ``size`` bytes (> 128 KiB, so zstd makes several raw blocks)
    in which the 3 bytes ``size + 3`` from the frame's end, inside the first block's data,
    read as "last raw block of ``size`` bytes"; and its frame (zstd level 1, as the
    archiver compresses by default)."""
    z = zstandard.ZstdCompressor(level=1)
    data = bytearray(os.urandom(size))
    frame = z.compress(bytes(data))
    _, blocks = frame_blocks(frame)
    p = len(frame) - size - 3  # where the tail lookup reads its "header"
    hdr, btype, _, _ = next(b for b in blocks if b[0] + 3 <= p < b[0] + 3 + b[3] - 3)
    assert btype == 0
    # data offset of frame offset p: the contents of the raw blocks before, then into this one
    off = sum(b[3] for b in blocks if b[0] < hdr) + p - (hdr + 3)
    data[off : off + 3] = ((size << 3) | 1).to_bytes(3, "little")
    frame = z.compress(bytes(data))
    assert len(frame) - size - 3 == p and frame_blocks(frame)[1][0][1] == 0  # same layout
    return bytes(data), frame


@pytest.mark.parametrize("size", [256 * KiB, 512 * KiB, 1 * MiB])
def test_data_that_looks_like_a_raw_last_block_header(size: int) -> None:
    """Counting back from the frame's end takes data bytes for the block header and returns
    the wrong bytes; parsing the frame does not."""
    data, frame = lookalike(size)
    wrong = tail_lookup(frame, size)
    assert wrong is not None and len(wrong) == size and bytes(wrong) != data  # the old bug
    assert check(frame, data) is None


def test_lookalike_block_round_trips(tmp_path: Path) -> None:
    """The same block in a backup: stored as its own bytes, restored byte-exact (a wrong
    view would be stored under the block's id and fail every restore)."""
    bs = 256 * KiB
    data, _ = lookalike(bs)
    src = tmp_path / "vol"
    src.write_bytes(os.urandom(bs) + data + os.urandom(bs))
    engine = Engine(LocalBackend(tmp_path / "store"), tmp_path / "cache",
                    EngineConfig(block_size=bs, compression="zstd", workers=2))
    engine.backup(container="c", backup_id="b1", source=src, size=3 * bs)
    assert engine.verify(container="c", backup_id="b1").ok
    dst = tmp_path / "out"
    dst.touch()
    engine.restore(container="c", backup_id="b1", target=dst, target_is_new=True)
    assert dst.read_bytes() == src.read_bytes()


def test_other_frames_are_refused() -> None:
    data = os.urandom(64 * KiB)
    frame = zstandard.ZstdCompressor(level=1).compress(data)
    assert check(frame, data) is not None
    assert check(frame + b"\0", data) is None  # trailing bytes
    assert check(frame[:-1], data[:-1]) is None
    assert check(b"\0" + frame[1:], data) is None  # not zstd's magic
    summed = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)
    assert check(summed, data) is None
    no_size = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(data)
    check(no_size, data)  # no content size field: still found exactly, if at all
    text = b"compressible " * 5000
    assert check(zstandard.ZstdCompressor(level=1).compress(text), text) is None
    assert zstd_stored_block(None, 4096) is None
    assert zstd_stored_block(b"", 4096) is None


def test_header_fields_are_parsed() -> None:
    """Frames with a window descriptor, a dictionary id and every content size width."""

    def frame(fhd: int, fields: bytes, data: bytes) -> bytes:
        return (b"\x28\xb5\x2f\xfd" + bytes([fhd]) + fields
                + ((len(data) << 3) | 1).to_bytes(3, "little") + data)

    small, raw = os.urandom(200), os.urandom(300)
    n = len(raw)
    cases = [
        (0x00, b"\x50", raw),  # window descriptor, no content size
        (0x20, bytes([len(small)]), small),  # single segment: 1-byte content size
        (0x21, b"\x07" + bytes([len(small)]), small),  # 1-byte dictionary id first
        (0x60, (n - 256).to_bytes(2, "little"), raw),  # a 2-byte size is stored minus 256
        (0x80, b"\x50" + n.to_bytes(4, "little"), raw),  # window descriptor + 4-byte size
        (0xE0, n.to_bytes(8, "little"), raw),
        (0x02, b"\x50\x07\x00", raw),  # window descriptor, 2-byte dictionary id
        (0x83, b"\x50\x07\x00\x00\x00" + n.to_bytes(4, "little"), raw),
    ]
    for fhd, fields, data in cases:
        f = frame(fhd, fields, data)
        params = zstandard.get_frame_parameters(f)  # zstd reads the header as meant
        assert params.dict_id == (7 if fhd & 3 else 0)
        assert params.content_size in (len(data), zstandard.CONTENTSIZE_UNKNOWN)
        if not fhd & 3:
            assert zstandard.ZstdDecompressor().decompress(f, max_output_size=n) == data
        assert check(f, data) is not None, hex(fhd)
    # a content size that disagrees with the block, a reserved bit, a checksum flag
    assert check(frame(0x80, b"\x50" + (n + 1).to_bytes(4, "little"), raw), raw) is None
    assert check(frame(0x08, b"\x50", raw), raw) is None
    assert check(frame(0x04, b"\x50", raw) + b"\0\0\0\0", raw) is None
    # not the last block, or not a raw block
    f = bytearray(frame(0x00, b"\x50", raw))
    f[6] &= 0xFE
    assert check(bytes(f), raw) is None
    f[6] |= 0x03  # last + RLE
    assert check(bytes(f), raw) is None


# -- engine round trips ------------------------------------------------------------------
def text(n: int, seed: int) -> bytes:
    """Compressible text in which every 4 KiB stretch is distinct."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 9)))
             for _ in range(300)]
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"<%d:%d>" % (seed, i) + b" ".join(rnd.choices(words, k=600))
        i += 1
    return bytes(out[:n])


def volume(path: Path, kind: str, bs: int) -> int:
    """Write a volume of ``kind`` for block size ``bs``; return its size."""
    # a few MiB; "mixed" needs four blocks for its layout
    size = max(4 * bs, 2 * MiB) if bs < 4 * MiB or kind == "mixed" else 2 * bs
    with open(path, "wb") as f:
        if kind == "random":
            f.write(os.urandom(size))
        elif kind == "text":
            f.write(text(size, bs))
        elif kind == "mixed":
            # whole-block zero runs (written and holes), zeros inside blocks, data in each
            f.truncate(size)
            f.write(os.urandom(bs // 2) + bytes(bs // 4) + text(bs // 4, 1))
            f.seek(bs)
            f.write(bytes(bs))  # allocated zero block
            f.seek(3 * bs - 1000)  # straddles a block boundary
            f.write(text(2000, 2) + bytes(bs // 3) + os.urandom(bs // 3))
            f.seek(size - 1)
            f.write(b"\1")
            assert f.tell() == size
        elif kind == "unaligned":
            size += bs // 2 + 4321
            f.write(os.urandom(size - 100_000) + text(100_000, 3))
        else:
            raise AssertionError(kind)
    return size


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(4 * MiB):
            h.update(b)
    return h.hexdigest()


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
@pytest.mark.parametrize("bs", [64 * KiB, 128 * KiB, 256 * KiB, 1 * MiB, 4 * MiB])
@pytest.mark.parametrize("kind", ["random", "text", "mixed", "unaligned"])
def test_round_trip(tmp_path: Path, kind: str, bs: int, compression: str) -> None:
    store = LocalBackend(tmp_path / "store")
    engine = Engine(store, tmp_path / "cache",
                    EngineConfig(block_size=bs, compression=compression,
                                 pack_size=4 * MiB, workers=2))
    src = tmp_path / "vol"
    size = volume(src, kind, bs)
    res = engine.backup(container="c", backup_id="b1", source=src, size=size)
    assert res.logical_bytes == size
    assert res.new_blocks + res.reused_blocks + res.zero_blocks == -(-size // bs)
    if kind == "random":  # incompressible: stored raw, never inflated
        assert res.stored_bytes < size + 64 * KiB
    if kind == "text" and compression != "none":
        assert res.stored_bytes < size // 2
    dst = tmp_path / "out"
    dst.touch()
    engine.restore(container="c", backup_id="b1", target=dst, target_is_new=True)
    assert dst.stat().st_size == size
    assert sha256(dst) == sha256(src)
    if kind == "mixed":  # over a used target: zero blocks are zeroed, not left as they were
        with open(dst, "wb") as f:
            f.write(b"\xa5" * (size + 1000))
        engine.restore(container="c", backup_id="b1", target=dst, target_is_new=False)
        with open(dst, "rb") as f:
            assert hashlib.sha256(f.read(size)).hexdigest() == sha256(src)
            assert f.read() == b"\xa5" * 1000  # beyond the backup: untouched
    assert engine.verify(container="c", backup_id="b1").ok
