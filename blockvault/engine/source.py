"""Reading a sparse volume: which aligned ranges hold data, and reading one of them."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from blockvault.directio import ALIGN, AlignedBuffer

READ_CHUNK = 4 * 1024 * 1024  # one read = one unit of parallel work


def volume_length(fd: int) -> int:
    """Length of a regular file or a block device."""
    return os.lseek(fd, 0, os.SEEK_END)


def _data_regions(fd: int, end: int, pos: int = 0) -> Iterator[tuple[int, int]]:
    """Yield (start, stop) of regions of [pos, end) that may hold data, skipping holes; the
    whole range if the filesystem cannot tell."""
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            yield pos, end  # SEEK_DATA unsupported here
            return
        if start >= end:
            return
        try:
            stop = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            stop = end
        stop = min(stop, end)
        if stop <= start:  # defensive: never loop forever
            stop = end
        yield start, stop
        pos = stop


def chunks(fd: int, readable: int, block_size: int, chunk: int = READ_CHUNK,
           start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) pieces, block-aligned and at most ``chunk`` long, covering every
    block of [start, min(stop, readable)) that may hold data (``start`` and ``stop`` are
    block-aligned). Blocks are never yielded twice."""
    end = readable if stop is None else min(stop, readable)
    done = start  # everything below this offset has been yielded or is a hole
    for rstart, rstop in _data_regions(fd, end, start):
        a = max(rstart - rstart % block_size, done)
        b = -(-rstop // block_size) * block_size
        while a < b:
            n = min(chunk - a % chunk, b - a)  # keep reads aligned to the chunk grid
            yield a, n
            a += n
        done = max(done, b)


def read_into(fd: int, buf: AlignedBuffer, offset: int, length: int, readable: int,
              direct_fd: int | None = None) -> memoryview:
    """Read [offset, offset+length) into ``buf`` and return a view of it; bytes at or past
    ``readable`` read as zeros. With ``direct_fd`` (an O_DIRECT descriptor of the same file,
    see blockvault.directio) aligned reads go through it; anything it refuses is read
    through ``fd``."""
    mv = buf.view[:length]
    want = max(0, min(length, readable - offset))
    got = 0
    if direct_fd is not None and offset % ALIGN == 0:
        # Round up: reading past ``want`` (past EOF gives a short read) is overwritten below.
        ask = min(length, -(-want // ALIGN) * ALIGN)
        try:
            while got < want:
                n = os.preadv(direct_fd, [mv[got:ask]], offset + got)
                if not n:
                    break
                got += n
                if got % ALIGN:  # short read at EOF; the rest is zeros anyway
                    break
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        got = min(got, want)
    while got < want:
        n = os.preadv(fd, [mv[got:want]], offset + got)
        if not n:
            break
        got += n
    if got < length:
        mv[got:] = bytes(length - got)
    return mv
