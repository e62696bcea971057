"""Reading runs of blobs out of packs, shared by restore and verify: consecutive blobs of
one pack are fetched with one range GET, decoded and checked against their ids."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import lz4.block
import zstandard

from blockvault.engine.codecs import thread_codecs
from blockvault.engine.crypto import Crypto, SealError
from blockvault.engine.errors import DataError, MissingObject
from blockvault.engine.format import (
    CODEC_LZ4,
    CODEC_NONE,
    CODEC_ZSTD,
    MANIFEST_ENTRY,
    ManifestReader,
    pack_object,
)
from blockvault.store import Container, ObjectNotFound

RUN_MAX = 4 * 1024 * 1024  # largest coalesced range GET (and decoded run) on restore
GAP_MAX = 256 * 1024  # read through gaps this small instead of splitting a GET


class Run:
    """Consecutive blobs of one pack fetched with one range GET."""

    __slots__ = ("end", "entries", "pack", "start")

    def __init__(self, pack: str, start: int) -> None:
        self.pack = pack
        self.start = start
        self.end = start
        self.entries: list[tuple[int, bytes, int, int, int]] = []  # idx, id, off, len, codec


def runs(entries: Iterator[tuple], block_size: int,
          on_entry: Callable[[int], None] | None = None) -> Iterator[Run]:
    # Bound both the bytes fetched and the bytes decoded per run (compressed blobs expand).
    max_entries = max(1, RUN_MAX // block_size)
    run: Run | None = None
    for idx, bid, pack, off, length, codec in entries:
        if on_entry is not None:
            on_entry(idx)
        if (run is None or pack != run.pack or off < run.end
                or off - run.end > GAP_MAX
                or off + length - run.start > RUN_MAX
                or len(run.entries) >= max_entries):
            if run is not None:
                yield run
            run = Run(pack, off)
        run.entries.append((idx, bid, off, length, codec))
        run.end = off + length
    if run is not None:
        yield run


def raw_entries(m: ManifestReader) -> Iterator[tuple]:
    for raw in m.raw_segments():
        yield from MANIFEST_ENTRY.iter_unpack(raw)


def decode_run(c: Container, crypto: Crypto, run: Run, block_size: int,
                on_bad: Callable[[DataError], None] | None = None) -> list[tuple[int, bytes]]:
    """Fetch a run and return [(index, verified raw block)]. Raises DataError (or reports it
    to ``on_bad`` and skips the block)."""
    obj = pack_object(run.pack.hex())
    try:
        data = c.get(obj, run.start, run.end - run.start)
    except ObjectNotFound:
        raise MissingObject(f"pack {obj} is missing", obj) from None
    out = []
    dctx = thread_codecs.dctx
    batch = decode_zstd_batch(data, run, block_size) if not crypto.encrypted else None
    for k, (idx, bid, off, length, codec) in enumerate(run.entries):
        try:
            a = off - run.start
            if batch is not None and codec == CODEC_ZSTD:
                raw = batch[k]
                if len(raw) != block_size or crypto.block_id(raw) != bid:
                    raise DataError(f"block at offset {idx * block_size} in pack {obj} "
                                    "failed its hash check", obj)
                out.append((idx, raw))
                continue
            blob = data[a : a + length]
            if len(blob) != length:
                raise DataError(f"pack {obj} is truncated (block at offset "
                                f"{idx * block_size} lies past its end)", obj)
            try:
                plain = crypto.open_blob(blob, bid)
                if codec == CODEC_ZSTD:
                    raw = dctx.decompress(plain, max_output_size=block_size)
                elif codec == CODEC_LZ4:
                    raw = lz4.block.decompress(plain, uncompressed_size=block_size)
                elif codec == CODEC_NONE:
                    raw = plain
                else:
                    raise ValueError(f"unknown codec {codec}")
            except (SealError, zstandard.ZstdError, lz4.block.LZ4BlockError, ValueError):
                raw = b""
            if len(raw) != block_size or crypto.block_id(raw) != bid:
                raise DataError(f"block at offset {idx * block_size} in pack {obj} "
                                "failed its hash check", obj)
        except DataError as e:
            if on_bad is None:
                raise
            on_bad(e)
            continue
        out.append((idx, raw))
    return out


def decode_zstd_batch(data: bytes, run: Run, block_size: int) -> dict[int, object] | None:
    """Decompress every zstd blob of an unencrypted run with one call (no GIL, no per-block
    call overhead): {position in run.entries: decoded block}. None when the run has none or
    anything about it is off (truncated, corrupt, wrong size): the caller then decodes block
    by block, which reports the bad one precisely."""
    pos = [k for k, e in enumerate(run.entries) if e[4] == CODEC_ZSTD]
    if not pos:
        return None
    ents = run.entries
    if ents[pos[-1]][2] + ents[pos[-1]][3] - run.start > len(data):
        return None
    try:
        segs = struct.pack(f"<{2 * len(pos)}Q",
                           *[x for k in pos for x in (ents[k][2] - run.start, ents[k][3])])
        res = thread_codecs.dctx.multi_decompress_to_buffer(
            zstandard.BufferWithSegments(data, segs),
            decompressed_sizes=struct.pack(f"<{len(pos)}Q", *([block_size] * len(pos))),
            threads=1)
        if len(res) != len(pos):
            return None
        return {k: res[i] for i, k in enumerate(pos)}
    except (zstandard.ZstdError, ValueError):
        return None
