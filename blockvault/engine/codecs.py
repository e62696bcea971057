"""zstd contexts per thread, and taking a stored block out of a zstd frame."""

from __future__ import annotations

import threading

import zstandard


def zstd_stored_block(frame: object, size: int) -> memoryview | None:
    """The input of a zstd frame that holds it as one raw block of ``size`` bytes (what zstd
    makes of incompressible input), as a view into the frame; None for any other frame.

    By the zstd format (RFC 8878) a frame without a content checksum ends with its last
    block, whose 3-byte header is Last_Block (bit 0), Block_Type (bits 1-2, 0 = Raw) and
    Block_Size (bits 3-23); a last raw block as large as the whole input is the only block
    and holds the input verbatim."""
    if frame is None:
        return None
    mv = memoryview(frame)  # type: ignore[arg-type]
    n = len(mv)
    if n < size + 3 + 5 or mv[4] & 0x04:  # too short for magic+header+block, or checksummed
        return None
    if int.from_bytes(mv[n - size - 3 : n - size], "little") != (size << 3) | 1:
        return None
    return mv[n - size :]


class _ThreadCodecs(threading.local):
    """One zstd compressor/decompressor per thread (they are not thread-safe)."""

    def __init__(self) -> None:
        self.cctx: dict[int, zstandard.ZstdCompressor] = {}
        self.dctx = zstandard.ZstdDecompressor()

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        c = self.cctx.get(level)
        if c is None:
            c = self.cctx[level] = zstandard.ZstdCompressor(level=level)
        return c


thread_codecs = _ThreadCodecs()
