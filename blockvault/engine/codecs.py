"""zstd contexts per thread, and taking a stored block out of a zstd frame."""

from __future__ import annotations

import threading

import zstandard

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # 0xFD2FB528, little endian
_DID_SIZE = (0, 1, 2, 4)  # Dictionary_ID field size by Dictionary_ID_flag
_FCS_SIZE = (0, 2, 4, 8)  # Frame_Content_Size field size by FCS_Field_Size flag


def zstd_stored_block(frame: object, size: int) -> memoryview | None:
    """The input of a zstd frame that holds it as one raw block of ``size`` bytes (what zstd
    makes of incompressible input up to its 128 KiB block maximum), as a view into the
    frame; None for any other frame (the caller then copies the input itself).

    The frame header is parsed (RFC 8878 section 3.1.1) rather than the block header being
    found by counting back from the frame's end: a larger input becomes several raw blocks,
    and the 3 bytes ``size + 3`` from the end then lie inside the data, where they can read
    as a plausible header and would hand back the wrong bytes. Only a frame that is exactly
    header + one last raw block of ``size`` bytes (no checksum, nothing after) qualifies."""
    if frame is None:
        return None
    mv = memoryview(frame)  # type: ignore[arg-type]
    n = len(mv)
    if n < 6 + size + 3 or mv[:4] != _ZSTD_MAGIC:  # magic, descriptor, block header
        return None
    fhd = mv[4]  # Frame_Header_Descriptor
    if fhd & 0x0C:  # reserved bit set, or a content checksum follows the last block
        return None
    fcs_flag, single_segment, did_flag = fhd >> 6, fhd >> 5 & 1, fhd & 3
    fcs_size = _FCS_SIZE[fcs_flag] or single_segment  # flag 0: 1 byte if single segment
    pos = 5 + (not single_segment) + _DID_SIZE[did_flag]  # past the window descriptor, dict id
    if fcs_size:
        fcs = int.from_bytes(mv[pos : pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
        if fcs != size:  # the frame says it holds some other amount of content
            return None
        pos += fcs_size
    if n != pos + 3 + size:  # exactly one block of ``size`` bytes and nothing after it
        return None
    if int.from_bytes(mv[pos : pos + 3], "little") != (size << 3) | 1:  # last, raw, size
        return None
    return mv[pos + 3 :]


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
