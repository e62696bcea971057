"""The Engine: backup, restore, delete (with garbage collection), verify, records."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import queue
import re
import sqlite3
import stat
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import blake3
import lz4.block
import zstandard

from blockvault.directio import AlignedBuffer, open_direct
from blockvault.engine import locks
from blockvault.engine.config import BackupResult, EngineConfig, Progress, VerifyReport
from blockvault.engine.crypto import Crypto, SealError
from blockvault.engine.errors import Cancelled, DataError, EngineError
from blockvault.engine.format import (
    CODEC_LZ4,
    CODEC_NONE,
    CODEC_ZSTD,
    CONFIG_NAME,
    FORMAT_VERSION,
    MANIFEST_ENTRY,
    SEGMENT_ENTRIES,
    ContainerConfig,
    ManifestBuilder,
    ManifestReader,
    build_trailer,
    make_config,
    manifest_object,
    pack_object,
    parse_config,
    record_object,
)
from blockvault.engine.index import Index
from blockvault.engine.source import READ_CHUNK, chunks, read_into, volume_length
from blockvault.store import Backend, Container, ObjectNotFound, StoreError

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_ENTRY_SIZE = MANIFEST_ENTRY.size
_ENTRY_INDEX = struct.Struct("<Q")  # an entry's first field: its block index
_ENTRY_PACK_AT = struct.calcsize("<Q32s")  # where an entry's pack name starts
_RECORD_MAGIC = b"BVRE"
_RESTORE_RUN_MAX = 4 * 1024 * 1024  # largest coalesced range GET (and decoded run) on restore
_RESTORE_GAP_MAX = 256 * 1024  # read through gaps this small instead of splitting a GET
_PROGRESS_EVERY = 0.5  # seconds between progress callbacks
_IOV_MAX = 512
_INFLIGHT_PACK_BYTES = 32 * 1024 * 1024
_READERS = 2  # threads reading the volume ahead of the hashing/compressing workers


class _MissingObject(DataError):
    """A DataError for an object that does not exist (verify reports these apart)."""


def _check_id(backup_id: str) -> None:
    if not _ID_RE.match(backup_id):
        raise ValueError(f"invalid backup id {backup_id!r}")


def _zstd_stored_block(frame: object, size: int) -> memoryview | None:
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


_codecs = _ThreadCodecs()


class _Throttle:
    def __init__(self, progress: Progress | None, total: int, phase: str) -> None:
        self.progress, self.total, self.phase = progress, total, phase
        self.last = 0.0

    def __call__(self, done: int, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if force or now - self.last >= _PROGRESS_EVERY:
            self.last = now
            self.progress(min(done, self.total), self.total, self.phase)


# -- hole punching ------------------------------------------------------------------------
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
except (OSError, AttributeError):
    _fallocate = None

# Read buffers (4 MiB) and packs (up to 16 MiB) are allocated and freed all the time. With
# glibc's default dynamic mmap threshold they end up on the heap, whose freed space is
# kept by the process; a fixed threshold makes every buffer >= 8 MiB its own mapping, given
# back to the OS when freed, so the service's RSS stays near the pipeline's live data.
# (A higher M_TRIM_THRESHOLD saves ~0.3 s of page faults per 2 GiB restore but lets every
# malloc arena keep that much: +80 MiB of service RSS in the 16 GiB benchmark. Not taken.)
_M_MMAP_THRESHOLD = -3
try:
    _libc.mallopt(_M_MMAP_THRESHOLD, 8 * 1024 * 1024)
except (NameError, AttributeError):
    pass

# Restore starts writeback of what it has written as it goes, so the final fsync does not
# find ~all of the volume still dirty in the page cache (the disk then works while we decode).
_SYNC_FILE_RANGE_WRITE = 2
try:
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (NameError, AttributeError):
    _sync_file_range = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # errors: fsync reports

_ZEROS = bytes(1024 * 1024)


def _zero_range(fd: int, offset: int, length: int) -> None:
    if length <= 0:
        return
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate is not None and _fallocate(fd, mode, offset, length) == 0:
        return
    end = offset + length
    while offset < end:
        n = min(len(_ZEROS), end - offset)
        os.pwrite(fd, _ZEROS[:n] if n < len(_ZEROS) else _ZEROS, offset)
        offset += n


# -- reading runs of blobs (restore and verify) --------------------------------------------
class _Run:
    """Consecutive blobs of one pack fetched with one range GET."""

    __slots__ = ("end", "entries", "pack", "start")

    def __init__(self, pack: str, start: int) -> None:
        self.pack = pack
        self.start = start
        self.end = start
        self.entries: list[tuple[int, bytes, int, int, int]] = []  # idx, id, off, len, codec


def _runs(entries: Iterator[tuple], block_size: int,
          on_entry: Callable[[int], None] | None = None) -> Iterator[_Run]:
    # Bound both the bytes fetched and the bytes decoded per run (compressed blobs expand).
    max_entries = max(1, _RESTORE_RUN_MAX // block_size)
    run: _Run | None = None
    for idx, bid, pack, off, length, codec in entries:
        if on_entry is not None:
            on_entry(idx)
        if (run is None or pack != run.pack or off < run.end
                or off - run.end > _RESTORE_GAP_MAX
                or off + length - run.start > _RESTORE_RUN_MAX
                or len(run.entries) >= max_entries):
            if run is not None:
                yield run
            run = _Run(pack, off)
        run.entries.append((idx, bid, off, length, codec))
        run.end = off + length
    if run is not None:
        yield run


def _block_ranges(changed: Sequence[tuple[int, int]], size: int, bs: int) -> (
    list[tuple[int, int]]
):
    """Byte ranges -> sorted, merged [first block, end block) ranges within the volume."""
    rs = sorted((max(0, off) // bs, -(-min(size, off + n) // bs))
                for off, n in changed if n > 0 and off < size and off + n > 0)
    out: list[tuple[int, int]] = []
    for a, b in rs:
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _raw_entries(m: ManifestReader) -> Iterator[tuple]:
    for raw in m.raw_segments():
        yield from MANIFEST_ENTRY.iter_unpack(raw)


class _ParentEntries:
    """A parent manifest's packed entries, consumed once in block order.

    ``take(lo, hi)`` hands out the raw entries of blocks [lo, hi) as slices of the decoded
    segments (found by bisection, no per-entry Python work) and drops every entry before
    them, so blocks an incremental copies unread cost nothing per block.
    """

    def __init__(self, segments: Iterator[bytes] | None = None) -> None:
        self.usable = segments is not None  # there is a parent to compare with
        self._segments = segments if segments is not None else iter(())
        self._raw = b""
        self._pos = self._n = 0  # next entry, entries in ``_raw``

    def close(self) -> None:
        self._segments = iter(())
        self._raw, self._pos, self._n = b"", 0, 0

    def _index(self, i: int) -> int:
        return _ENTRY_INDEX.unpack_from(self._raw, i * _ENTRY_SIZE)[0]

    def take(self, lo: int, hi: int) -> Iterator[memoryview]:
        """Yield runs of packed entries with lo <= index < hi. Errors reading the parent
        (DataError, StoreError) propagate."""
        while True:
            if self._pos >= self._n:
                raw = next(self._segments, None)
                if raw is None:
                    self.close()
                    return
                self._raw, self._pos, self._n = raw, 0, len(raw) // _ENTRY_SIZE
            span = range(self._pos, self._n)
            a = self._pos + bisect.bisect_left(span, lo, key=self._index)
            b = a + bisect.bisect_left(range(a, self._n), hi, key=self._index)
            if b > a:
                yield memoryview(self._raw)[a * _ENTRY_SIZE : b * _ENTRY_SIZE]
            self._pos = b
            if b < self._n:  # the next entry is at or past ``hi``
                return


def _decode_run(c: Container, crypto: Crypto, run: _Run, block_size: int,
                on_bad: Callable[[DataError], None] | None = None) -> list[tuple[int, bytes]]:
    """Fetch a run and return [(index, verified raw block)]. Raises DataError (or reports it
    to ``on_bad`` and skips the block)."""
    obj = pack_object(run.pack.hex())
    try:
        data = c.get(obj, run.start, run.end - run.start)
    except ObjectNotFound:
        raise _MissingObject(f"pack {obj} is missing", obj) from None
    out = []
    dctx = _codecs.dctx
    batch = _decode_zstd_batch(data, run, block_size) if not crypto.encrypted else None
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


def _decode_zstd_batch(data: bytes, run: _Run, block_size: int) -> dict[int, object] | None:
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
        res = _codecs.dctx.multi_decompress_to_buffer(
            zstandard.BufferWithSegments(data, segs),
            decompressed_sizes=struct.pack(f"<{len(pos)}Q", *([block_size] * len(pos))),
            threads=1)
        if len(res) != len(pos):
            return None
        return {k: res[i] for i, k in enumerate(pos)}
    except (zstandard.ZstdError, ValueError):
        return None


_DEFAULT_CONFIG = EngineConfig()


class Engine:
    def __init__(self, backend: Backend, cache_dir: Path,
                 config: EngineConfig = _DEFAULT_CONFIG) -> None:
        self.backend = backend
        self.cache_dir = Path(cache_dir)
        self.config = config
        self.workers = config.workers or os.cpu_count() or 1
        self._config_mu = threading.Lock()

    # -- container plumbing -------------------------------------------------------------
    def _cache_path(self, container: str) -> Path:
        key = hashlib.sha256(f"{self.backend.kind}\0{container}".encode()).hexdigest()[:32]
        return self.cache_dir / key / "index.sqlite"

    def _config(self, c: Container, container: str, create: bool) -> ContainerConfig | None:
        try:
            data = c.get(CONFIG_NAME)
        except ObjectNotFound:
            if not create:
                return None
            with self._config_mu:
                if c.head(CONFIG_NAME) is None:
                    cfg = self.config
                    doc = make_config(cfg.block_size, cfg.compression, cfg.encryption_key)
                    c.put(CONFIG_NAME, json.dumps(doc, indent=2).encode())
                data = c.get(CONFIG_NAME)
        return parse_config(container, data, self.config.encryption_key)

    def _require_config(self, c: Container, container: str) -> ContainerConfig:
        cfg = self._config(c, container, create=False)
        if cfg is None:
            raise DataError(f"container {container} has no config object", CONFIG_NAME)
        return cfg

    # -- records ------------------------------------------------------------------------
    def _encode_record(self, cfg: ContainerConfig, backup_id: str, record: dict) -> bytes:
        body = json.dumps(record, sort_keys=True).encode()
        if not cfg.crypto.encrypted:
            return body
        return (_RECORD_MAGIC + FORMAT_VERSION.to_bytes(2, "little")
                + cfg.crypto.seal(body, b"bv1-record\0" + backup_id.encode()))

    def write_record(self, *, container: str, backup_id: str, record: dict) -> None:
        _check_id(backup_id)
        c = self.backend.open(container)
        cfg = self._config(c, container, create=True)
        assert cfg is not None
        c.put(record_object(backup_id), self._encode_record(cfg, backup_id, record))

    def read_record(self, *, container: str, backup_id: str) -> dict:
        _check_id(backup_id)
        c = self.backend.open(container, create=False)
        name = record_object(backup_id)
        try:
            data = c.get(name)
        except ObjectNotFound:
            raise DataError(f"record {name} is missing", name) from None
        cfg = self._require_config(c, container)
        if cfg.crypto.encrypted:
            if data[:4] != _RECORD_MAGIC:
                raise DataError(f"record {name} is not encrypted in an encrypted container",
                                name)
            try:
                data = cfg.crypto.open(data[6:], b"bv1-record\0" + backup_id.encode())
            except SealError:
                raise DataError(f"record {name} is corrupt", name) from None
        try:
            rec = json.loads(data)
        except ValueError:
            raise DataError(f"record {name} is corrupt", name) from None
        if not isinstance(rec, dict):
            raise DataError(f"record {name} is corrupt", name)
        return rec

    def has_backup(self, *, container: str, backup_id: str) -> bool:
        _check_id(backup_id)
        c = self.backend.open(container, create=False)
        return c.head(manifest_object(backup_id)) is not None

    def clone_backup(self, *, container: str, source_id: str, target_id: str) -> None:
        """Give backup ``target_id`` a manifest of its own with ``source_id``'s content.

        Used when a backup record is imported under a new id: each backup then owns its
        manifest, and the packs both reference live until neither references them. The
        manifest is re-sealed (its id is bound into every segment), streamed segment by
        segment. Packs stay referenced by the source manifest throughout, so a concurrent
        garbage collection cannot free them under the copy.
        """
        _check_id(source_id)
        _check_id(target_id)
        c = self.backend.open(container, create=False)
        cfg = self._require_config(c, container)
        reader = ManifestReader(c, source_id, cfg.crypto, container)
        header = {k: v for k, v in reader.header.items()
                  if k not in ("backup_id", "entries", "segments", "version")}
        header["cloned_from"] = source_id
        with self._manifest_builder(target_id, cfg.crypto) as builder:
            for raw in reader.raw_segments():
                builder.add_raw(raw)
            self._put_manifest(c, target_id, builder, header)

    def _manifest_builder(self, backup_id: str, crypto: Crypto) -> ManifestBuilder:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return ManifestBuilder(backup_id, crypto, self.cache_dir)

    def _put_manifest(self, c: Container, backup_id: str, builder: ManifestBuilder,
                      header: dict) -> int:
        """Finish ``builder`` into a temporary file and upload it (streamed: manifests grow
        with the volume's data). Returns the manifest's size."""
        with tempfile.TemporaryFile(dir=self.cache_dir, prefix="manifest-") as f:
            size = builder.finish(header, f)
            c.put_file(manifest_object(backup_id), f, size)
        return size

    # -- backup -------------------------------------------------------------------------
    def backup(self, *, container: str, backup_id: str, source: Path, size: int,
               parent_id: str | None = None, record: dict | None = None,
               progress: Progress | None = None,
               cancelled: Callable[[], bool] | None = None,
               changed: Sequence[tuple[int, int]] | None = None) -> BackupResult:
        """Back up ``size`` bytes of ``source`` as ``backup_id``.

        ``changed`` (with ``parent_id``) is the caller's promise that only those byte ranges
        (offset, length) may differ from the parent backup's data: every block outside them
        is taken from the parent's manifest without reading the source. It is ignored (a
        normal full read) when the parent is missing, unreadable or of another size or block
        size.
        """
        _check_id(backup_id)
        if parent_id is not None:
            _check_id(parent_id)
        if size < 0:
            raise ValueError("size must not be negative")
        c = self.backend.open(container)
        lock = locks.acquire_backup_lock(c, backup_id, cancelled)
        try:
            cfg = self._config(c, container, create=True)
            assert cfg is not None
            index = Index(self._cache_path(container))
            writer = Index(self._cache_path(container))
            try:
                if progress is not None:
                    progress(0, size, "index")
                index.sync(c, cfg.crypto, self.config.upload_concurrency, cancelled)
                run = _BackupRun(self, c, container, cfg, index, writer, lock, cancelled)
                result = run.run(backup_id, Path(source), size, parent_id, progress, changed)
                if record is not None:
                    rec = self._encode_record(cfg, backup_id, record)
                    c.put(record_object(backup_id), rec)
                    result = BackupResult(
                        object_count=result.object_count,
                        stored_bytes=result.stored_bytes + len(rec),
                        logical_bytes=result.logical_bytes, new_blocks=result.new_blocks,
                        reused_blocks=result.reused_blocks, zero_blocks=result.zero_blocks)
                return result
            finally:
                index.close()
                writer.close()
        finally:
            try:
                lock.release()
            except StoreError as e:  # the lock goes stale on its own; don't mask the result
                log.warning("could not remove backup lock %s: %s", lock.name, e)

    # -- restore ------------------------------------------------------------------------
    def restore(self, *, container: str, backup_id: str, target: Path, target_is_new: bool,
                progress: Progress | None = None,
                cancelled: Callable[[], bool] | None = None) -> None:
        _check_id(backup_id)
        c = self.backend.open(container, create=False)
        name = manifest_object(backup_id)
        if c.head(name) is None:
            raise DataError(f"manifest {name} is missing", name)
        cfg = self._require_config(c, container)
        m = ManifestReader(c, backup_id, cfg.crypto, container)
        size, bs = m.size, m.block_size
        nblocks = -(-size // bs)
        crypto = cfg.crypto
        report = _Throttle(progress, size, "restore")
        fd = os.open(target, os.O_WRONLY)
        pool = ThreadPoolExecutor(max_workers=self.config.upload_concurrency + self.workers,
                                  thread_name_prefix="bv-restore")
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size < size:
                os.ftruncate(fd, size)

            def fetch_and_write(run: _Run) -> None:
                blocks = _decode_run(c, crypto, run, bs)
                # Write runs of consecutive blocks with one pwritev, through the page cache:
                # O_DIRECT writes (gathered into aligned buffers) measured no faster here
                # and held ~12 MiB more; early writeback keeps the final fsync short.
                i = 0
                while i < len(blocks):
                    j = i + 1
                    while (j < len(blocks) and j - i < _IOV_MAX
                           and blocks[j][0] == blocks[j - 1][0] + 1):
                        j += 1
                    first = blocks[i][0]
                    bufs = [b for _, b in blocks[i:j]]
                    if blocks[j - 1][0] == nblocks - 1 and size % bs:
                        bufs[-1] = memoryview(bufs[-1])[: size % bs]
                    n = os.pwritev(fd, bufs, first * bs)
                    _start_writeback(fd, first * bs, n)
                    i = j

            next_idx = 0

            def on_entry(idx: int) -> None:
                nonlocal next_idx
                if idx < next_idx or idx >= nblocks:
                    raise DataError(f"manifest {name} is corrupt (block order)", name)
                if not target_is_new and idx > next_idx:
                    _zero_range(fd, next_idx * bs, min(idx * bs, size) - next_idx * bs)
                next_idx = idx + 1

            pending: deque[Future] = deque()
            limit = self.config.upload_concurrency + self.workers
            for run in _runs(_raw_entries(m), bs, on_entry):
                if cancelled is not None and cancelled():
                    raise Cancelled(f"restore of backup {backup_id} cancelled")
                pending.append(pool.submit(fetch_and_write, run))
                while len(pending) > limit or (pending and pending[0].done()):
                    pending.popleft().result()
                report(run.entries[0][0] * bs)
            while pending:
                pending.popleft().result()
            if not target_is_new and next_idx < nblocks:
                _zero_range(fd, next_idx * bs, size - next_idx * bs)
            os.fsync(fd)
            report(size, force=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            os.close(fd)

    # -- verify -------------------------------------------------------------------------
    def verify(self, *, container: str, backup_id: str | None = None) -> VerifyReport:
        c = self.backend.open(container, create=False)
        rep = VerifyReport()
        missing: set[str] = set()
        corrupt: set[str] = set()
        if backup_id is not None:
            _check_id(backup_id)
            ids: Iterator[str] = iter([backup_id])
        else:
            ids = (n[len("manifests/"):] for n in c.list("manifests/"))
        cfg = self._config(c, container, create=False)
        seen = sqlite3.connect("")  # private on-disk temp db: blobs already checked
        seen.execute("CREATE TABLE seen (pack BLOB, off INTEGER, PRIMARY KEY (pack, off))")
        mu = threading.Lock()

        def on_bad(e: DataError) -> None:
            with mu:
                (missing if isinstance(e, _MissingObject) else corrupt).add(e.object_name)

        def check(run: _Run) -> int:
            try:
                return len(_decode_run(c, crypto, run, bs, on_bad))
            except DataError as e:
                on_bad(e)
                return 0

        with ThreadPoolExecutor(max_workers=self.config.upload_concurrency + self.workers,
                                thread_name_prefix="bv-verify") as pool:
            for bid in ids:
                mname = manifest_object(bid)
                if c.head(mname) is None:
                    missing.add(mname)
                    continue
                if cfg is None:
                    missing.add(CONFIG_NAME)
                    break
                crypto = cfg.crypto
                pending: deque[Future] = deque()
                try:
                    m = ManifestReader(c, bid, crypto, container)
                    bs = m.block_size

                    def fresh(entries: Iterator[tuple]) -> Iterator[tuple]:
                        for e in entries:
                            cur = seen.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)",
                                               (e[2], e[3]))
                            if cur.rowcount:
                                yield e

                    for run in _runs(fresh(_raw_entries(m)), bs):
                        pending.append(pool.submit(check, run))
                        while len(pending) > self.config.upload_concurrency + self.workers:
                            rep.checked_blocks += pending.popleft().result()
                except DataError as e:
                    corrupt.add(e.object_name or mname)
                finally:
                    while pending:
                        rep.checked_blocks += pending.popleft().result()
        seen.close()
        rep.missing = sorted(missing)
        rep.corrupt = sorted(corrupt)
        return rep

    # -- delete and garbage collection --------------------------------------------------
    def delete(self, *, container: str, backup_id: str) -> None:
        _check_id(backup_id)
        c = self.backend.open(container, create=False)
        # Check the key before deleting anything, so a wrong key fails cleanly.
        self._config(c, container, create=False)
        c.delete(manifest_object(backup_id))
        c.delete(record_object(backup_id))
        self.collect_garbage(container=container, _c=c)

    def collect_garbage(self, *, container: str, _c: Container | None = None) -> bool:
        """Delete every pack no manifest references. Returns False if skipped because a
        backup is running (or a manifest could not be read)."""
        c = _c or self.backend.open(container, create=False)
        lock = locks.acquire_gc_lock(c)
        if lock is None:
            log.info("garbage collection in %s skipped: a backup is running", container)
            return False
        try:
            return self._gc_locked(c, container, lock)
        finally:
            try:
                lock.release()
            except StoreError as e:
                log.warning("could not remove gc lock %s: %s", lock.name, e)

    def _gc_locked(self, c: Container, container: str, lock: locks.Lock) -> bool:
        cfg = self._config(c, container, create=False)
        ref = sqlite3.connect("")
        try:
            ref.execute("CREATE TABLE ref (pack BLOB PRIMARY KEY) WITHOUT ROWID")
            for mname in c.list("manifests/"):
                bid = mname[len("manifests/"):]
                lock.refresh()
                if cfg is None:
                    log.warning("gc in %s skipped: manifests exist but no config", container)
                    return False
                try:
                    m = ManifestReader(c, bid, cfg.crypto, container)
                    for raw in m.raw_segments():
                        packs = {e[2] for e in MANIFEST_ENTRY.iter_unpack(raw)}
                        ref.executemany("INSERT OR IGNORE INTO ref VALUES (?)",
                                        ((p,) for p in packs))
                except EngineError as e:  # corrupt, unknown version, sealed with another key
                    if c.head(mname) is None:
                        continue  # deleted meanwhile: its packs are garbage too
                    # We cannot tell what this manifest references: delete nothing.
                    log.warning("gc in %s skipped: %s", container, e)
                    return False
            for obj in c.list("packs/"):
                lock.refresh()
                hexname = obj.rsplit("/", 1)[-1]
                try:
                    key = bytes.fromhex(hexname)
                except ValueError:
                    continue
                if len(key) != 32:
                    continue
                if ref.execute("SELECT 1 FROM ref WHERE pack = ?", (key,)).fetchone() is None:
                    c.delete(obj)
            return True
        finally:
            ref.close()


class _BackupRun:
    """State of one backup: a read -> hash -> dedup -> compress -> pack -> upload pipeline.

    Reading+hashing and compression+encryption run on a worker pool; dedup decisions and
    pack building happen in the calling thread, in block order, so the manifest comes out
    in index order without sorting. Every queue is bounded.
    """

    def __init__(self, engine: Engine, c: Container, container: str, cfg: ContainerConfig,
                 index: Index, index_writer: Index, lock: locks.Lock,
                 cancelled: Callable[[], bool] | None) -> None:
        self.engine = engine
        self.c = c
        self.container = container
        self.cfg = cfg
        self.crypto = cfg.crypto
        self.bs = cfg.block_size
        self.index = index  # lookups, calling thread only
        self.index_writer = index_writer  # inserts, upload threads under index_mu
        self.lock = lock
        self.cancelled = cancelled
        ec = engine.config
        self.level = ec.zstd_level
        self.compression = ec.compression
        self.pack_size = ec.pack_size
        self.upload_limit = ec.upload_concurrency
        # Sealed packs held in memory while uploading: bounded in bytes as well as count, so
        # peak memory does not scale with pack_size x upload_concurrency.
        self.inflight_limit = max(1, min(ec.upload_concurrency,
                                         _INFLIGHT_PACK_BYTES // max(1, ec.pack_size)))
        self.depth = max(2, min(2 * engine.workers, 6))
        # pack being built
        self.seq = 0
        self.open_blobs: list[bytes] = []
        self.open_entries: list[tuple[bytes, int, int, int, int]] = []
        self.open_ids: list[bytes] = []
        self.open_size = 0
        # sealed packs being uploaded: seq -> {id: (off, len, codec)}
        self.inflight: dict[int, list[bytes]] = {}
        # blocks of this backup not yet in the index (open pack + packs being uploaded):
        # id -> (local pack seq, offset, length, codec). Read by workers, written here.
        self.unindexed: dict[bytes, tuple[int, int, int, int]] = {}
        # Manifest entries go to a temporary file in block order, in batches. An entry in
        # a pack still being built names it by a placeholder, this run's random marker +
        # the pack's local seq, replaced by the pack's name when the manifest is built (so
        # nothing per block stays in memory).
        self.out: list[bytes] = []
        self._marker = os.urandom(28)
        self.uploads: deque[tuple[Future, int]] = deque()
        self.pack_names: dict[int, bytes] = {}
        self.index_mu = threading.Lock()
        self._tls = threading.local()
        self._tls_mu = threading.Lock()
        self._tls_indexes: list[Index] = []
        # Reused buffers packs are assembled in (one per pack being uploaded, at most
        # inflight_limit + 1): a fresh 16 MiB bytes per pack meant a new mapping whose pages
        # were faulted in with the GIL held (~0.8 s per 2 GiB).
        # They are aligned so that the local store can write them with O_DIRECT.
        self._pack_bufs: queue.SimpleQueue[AlignedBuffer] = queue.SimpleQueue()
        for _ in range(self.inflight_limit + 1):
            self._pack_bufs.put(AlignedBuffer(0))
        self.new_blocks = self.reused_blocks = self.nonzero_blocks = 0
        self.stored_bytes = self.object_count = 0

    # -- worker-side stage -----------------------------------------------------------------
    def _worker_index(self) -> Index:
        """This worker thread's own read connection to the dedup index."""
        idx = getattr(self._tls, "index", None)
        if idx is None:
            idx = self._tls.index = Index(self.engine._cache_path(self.container))
            with self._tls_mu:
                self._tls_indexes.append(idx)
        return idx

    def _in_flight(self, bid: bytes) -> bool:
        """Is ``bid`` in the pack being built or in one being uploaded (not yet indexed)?"""
        return bid in self.unindexed

    def _read(self, rb: AlignedBuffer, fd: int, offset: int, length: int,
              readable: int) -> None:
        """Reader thread: fill ``rb``. Reads run apart from the CPU workers because direct
        reads are synchronous: a worker that read for itself would leave its core idle
        while the device works."""
        read_into(fd, rb, offset, length, readable, self.direct_fd)

    def _process(self, read: Future, rb: AlignedBuffer, offset: int, length: int,
                 parent: dict[int, tuple] | None) -> list[tuple]:
        """Worker: once ``read`` has filled ``rb``, skip zero blocks, hash, dedup (parent,
        index, this backup's packs not yet indexed) and compress+seal what is new. The
        calling thread only packs, in block order."""
        try:
            read.result()
            return self._digest(rb, offset, length, parent)
        finally:
            # Nothing returned references the buffer: the next read reuses it.
            self._free_bufs.put(rb)

    def _digest(self, rb: AlignedBuffer, offset: int, length: int,
                parent: dict[int, tuple] | None) -> list[tuple]:
        mv = rb.view[:length]
        data = rb.raw
        if length == READ_CHUNK and data.find(self._zero_chunk, 0, length) == 0:
            return []
        bs = self.bs
        zero = self._zero
        block_id = self.crypto.block_id
        first = offset // bs
        out: list[tuple | None] = []
        todo: list[tuple] = []
        for i in range(length // bs):
            a = i * bs
            if data.find(zero, a, a + bs) == a:  # all-zero block (a memcmp, no copy)
                continue
            bid = block_id(mv[a : a + bs])
            idx = first + i
            p = parent.get(idx) if parent else None
            if p is not None and p[1] == bid:
                out.append(("known", idx, bid, p[2], p[3], p[4], p[5], -1))
            else:
                todo.append((len(out), idx, bid, a))
                out.append(None)
        if not todo:
            return out  # type: ignore[return-value]
        known = self._worker_index().lookup_many([t[2] for t in todo])
        here: set[bytes] = set()
        fresh: list[tuple] = []  # (pos, idx, bid, offset in data) to compress and seal
        for t in todo:
            pos, idx, bid, _block = t
            row = known.get(bid)
            if row is not None:
                out[pos] = ("known", idx, bid, row[0], row[1], row[2], row[3], -1)
            elif bid in here or self._in_flight(bid):
                out[pos] = ("ref", idx, bid)  # packed before this block, in block order
            else:
                here.add(bid)
                fresh.append(t)
        if not fresh:
            return out  # type: ignore[return-value]
        if self.compression == "zstd":
            # One call for every new block of the read: zstd compresses them all without
            # the GIL (one release per read instead of one per block), each as its own
            # frame exactly as ZstdCompressor.compress would.
            segs = struct.pack(f"<{2 * len(fresh)}Q", *[x for t in fresh for x in (t[3], bs)])
            zs = _codecs.compressor(self.level).multi_compress_to_buffer(
                zstandard.BufferWithSegments(mv, segs), threads=1)
            # Segments of the call's output buffer, not copies: that buffer holds only this
            # read's new blobs, which all go into the packs being built (a copy per block
            # cost ~0.4 s of GIL-held malloc/page faults per 2 GiB).
            zlist = [zs[k] for k in range(len(fresh))]
        elif self.compression == "lz4":
            zlist = [lz4.block.compress(mv[t[3] : t[3] + bs], store_size=False)
                     for t in fresh]
        else:
            zlist = None
        seal = self.crypto.seal_blob
        codec_c = CODEC_ZSTD if self.compression == "zstd" else CODEC_LZ4
        for k, (pos, idx, bid, a) in enumerate(fresh):
            z = zlist[k] if zlist is not None else None
            if z is not None and len(z) < bs:
                payload, codec = z, codec_c
            else:  # stored raw
                # zstd already copied an incompressible block verbatim into its output:
                # take it from there. Copying it out of the reused read buffer instead
                # cost ~0.2 s of GIL-held malloc and memcpy per 2 GiB.
                raw = _zstd_stored_block(z, bs) if codec_c == CODEC_ZSTD else None
                payload = raw if raw is not None else bytes(mv[a : a + bs])
                codec = CODEC_NONE
            out[pos] = ("new", idx, bid, seal(payload, bid), codec)
        return out  # type: ignore[return-value]

    # -- calling-thread stages ------------------------------------------------------------
    def _emit(self, idx: int, bid: bytes, pack: bytes, off: int, length: int, codec: int,
              seq: int) -> None:
        if seq >= 0:
            pack = self._marker + seq.to_bytes(4, "little")
        self.out.append(MANIFEST_ENTRY.pack(idx, bid, pack, off, length, codec))

    def _find(self, bid: bytes) -> tuple[bytes, int, int, int, int] | None:
        """Where this backup or the container already holds ``bid``: (pack name or b"",
        offset, length, codec, local pack seq or -1)."""
        loc = self.unindexed.get(bid)
        if loc is not None:
            return (b"", loc[1], loc[2], loc[3], loc[0])
        row = self.index.lookup(bid)
        if row is not None:
            return (row[0], row[1], row[2], row[3], -1)
        return None

    def _parent_slice(self, lo: int, hi: int) -> dict[int, tuple] | None:
        """The parent's entries for blocks [lo, hi) (streamed; earlier ones are dropped)."""
        out: dict[int, tuple] = {}
        try:
            for raw in self.parent.take(lo, hi):
                for e in MANIFEST_ENTRY.iter_unpack(raw):
                    out[e[0]] = e
        except (DataError, StoreError) as e:
            # These blocks are being read anyway: go on comparing with the index only.
            log.warning("parent manifest unreadable, continuing without it: %s", e)
            self.parent.close()
        return out or None

    def _pack(self, items: list[tuple]) -> None:
        for it in items:
            kind = it[0]
            if kind == "known":
                self.reused_blocks += 1
                self._emit(*it[1:])
                continue
            if kind == "new":
                _, idx, bid, blob, codec = it
                if not self._in_flight(bid):
                    if self.open_blobs and self.open_size + len(blob) > self.pack_size:
                        self._seal()
                    off = self.open_size
                    self.open_blobs.append(blob)
                    self.open_entries.append((bid, off, len(blob), self.bs, codec))
                    self.open_ids.append(bid)
                    self.unindexed[bid] = (self.seq, off, len(blob), codec)
                    self.open_size += len(blob)
                    self.new_blocks += 1
                    self._emit(idx, bid, b"", off, len(blob), codec, self.seq)
                    continue
                # another worker compressed the same block first: keep that copy
            loc = self._find(it[2])
            if loc is None:  # cannot happen: the first copy was packed before
                raise EngineError(f"internal error: lost block {it[2].hex()}")
            self.reused_blocks += 1
            self._emit(it[1], it[2], *loc)
        self.tmp.write(b"".join(self.out))
        self.out.clear()
        self._reap_uploads(block=False)

    def _seal(self) -> None:
        if not self.open_blobs:
            return
        blobs = self.open_blobs
        blobs.append(build_trailer(self.open_entries, self.crypto))
        seq = self.seq
        self.inflight[seq] = self.open_ids
        idx_entries = [(bid, off, ln, codec) for bid, off, ln, _raw, codec in self.open_entries]
        fut = self.upload_pool.submit(self._upload, seq, blobs, idx_entries)
        self.uploads.append((fut, seq))
        self.open_blobs = []
        self.open_entries = []
        self.open_ids = []
        self.open_size = 0
        self.seq += 1
        while len(self.uploads) > self.inflight_limit:
            self._finish_upload(self.uploads.popleft())

    def _upload(self, seq: int, blobs: list[bytes], idx_entries: list) -> int:
        """Upload thread: assemble, name, put, then publish the pack in the index."""
        size = sum(map(len, blobs))
        buf = self._pack_bufs.get()
        try:
            if len(buf) < size:
                buf = AlignedBuffer(max(size, self.pack_size + self.bs + 64 * 1024))
            data = buf.view[:size]
            o = 0
            for b in blobs:
                n = len(b)
                data[o : o + n] = b
                o += n
            blobs.clear()
            name = blake3.blake3(data).digest()
            self.c.put(pack_object(name.hex()), data)  # stores take any bytes-like object
            data.release()
        finally:
            self._pack_bufs.put(buf)
        self.pack_names[seq] = name
        # Only uploaded packs enter the shared index (other backups may dedup against it).
        # One writer at a time; SQLite releases the GIL so this overlaps the pipeline.
        with self.index_mu:
            self.index_writer.add_pack(name, idx_entries)
        return size

    def _finish_upload(self, up: tuple) -> None:
        fut, seq = up
        nbytes = fut.result()
        for bid in self.inflight.pop(seq):
            loc = self.unindexed.get(bid)
            if loc is not None and loc[0] == seq:
                del self.unindexed[bid]
        self.stored_bytes += nbytes
        self.object_count += 1

    def _reap_uploads(self, block: bool) -> None:
        while self.uploads and (block or self.uploads[0][0].done()):
            self._finish_upload(self.uploads.popleft())

    def _check_cancel(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("backup cancelled")

    def _work(self, fd: int, readable: int, nblocks: int,
              ranges: list[tuple[int, int]] | None) -> Iterator[tuple[str, int, int]]:
        """Units of work in block order: ("read", offset, length) or ("copy", first block,
        end block) — the latter taken from the parent manifest without reading."""
        bs = self.bs
        if ranges is None:
            for off, length in chunks(fd, readable, bs):
                yield "read", off, length
            return
        prev = 0
        for a, b in ranges:
            if a > prev:
                yield "copy", prev, a
            for off, length in chunks(fd, readable, bs, start=a * bs, stop=b * bs):
                yield "read", off, length
            prev = b
        if prev < nblocks:
            yield "copy", prev, nblocks

    def _copy_parent(self, lo: int, hi: int) -> None:
        """Reuse the parent's entries for blocks [lo, hi) (unchanged by promise), as they
        are. A parent that turns unreadable here cannot be replaced by reading: fail."""
        for raw in self.parent.take(lo, hi):
            f: Future = Future()
            f.set_result(raw)  # in the queue, so that it lands in block order
            self._queue(f)

    def _queue(self, f: Future) -> None:
        """Results enter the calling thread in block order; at most ``depth`` in flight."""
        self.comp_q.append(f)
        while len(self.comp_q) > self.depth:
            self._accept(self.comp_q.popleft().result())

    def _accept(self, items: list[tuple] | memoryview) -> None:
        if isinstance(items, memoryview):  # packed entries copied from the parent
            n = len(items) // _ENTRY_SIZE
            self.nonzero_blocks += n
            self.reused_blocks += n
            self.tmp.write(items)
            return
        self.nonzero_blocks += len(items)
        self._pack(items)

    # -- driver ----------------------------------------------------------------------------
    def run(self, backup_id: str, source: Path, size: int, parent_id: str | None,
            progress: Progress | None,
            changed: Sequence[tuple[int, int]] | None = None) -> BackupResult:
        bs = self.bs
        self._zero = bytes(bs)
        self._zero_chunk = bytes(READ_CHUNK)
        nblocks = -(-size // bs)
        report = _Throttle(progress, size, "backup")
        self.parent = _ParentEntries()
        ranges: list[tuple[int, int]] | None = None
        if parent_id is not None:
            try:
                pm = ManifestReader(self.c, parent_id, self.crypto, self.container)
                if pm.block_size == bs:
                    self.parent = _ParentEntries(pm.raw_segments())
                    if changed is not None and pm.size == size:
                        ranges = _block_ranges(changed, size, bs)
                else:
                    log.info("parent %s has another block size; doing a full backup", parent_id)
            except DataError as e:
                log.info("parent %s unusable (%s); doing a full backup", parent_id, e)
        self.comp_q: deque[Future] = deque()
        fd = os.open(source, os.O_RDONLY)
        # Direct reads save the kernel's copy into fresh cache pages: most of the system
        # time of a full backup, which is CPU-bound (it compresses all it reads). An
        # incremental that reads everything mostly hashes and compares and is bound by the
        # device, where the kernel's asynchronous readahead reads ~25% faster than our
        # synchronous direct reads (docs/benchmarks.md); one that reads only changed
        # ranges would have readahead fetch far past each range. So: buffered only for an
        # incremental that reads the whole volume.
        use_direct = self.engine.config.direct_io and (
            not self.parent.usable or ranges is not None)
        self.direct_fd = open_direct(source, os.O_RDONLY) if use_direct else None
        try:
            try:  # doubles the kernel's readahead window (for what is read buffered)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
            self.engine.cache_dir.mkdir(parents=True, exist_ok=True)
            self.tmp = tempfile.TemporaryFile(  # closed in the finally below
                dir=self.engine.cache_dir, prefix="manifest-")
        except BaseException:
            os.close(fd)
            if self.direct_fd is not None:
                os.close(self.direct_fd)
            raise
        pool = ThreadPoolExecutor(max_workers=self.engine.workers, thread_name_prefix="bv-cpu")
        readers = ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="bv-read")
        self.upload_pool = ThreadPoolExecutor(max_workers=self.upload_limit,
                                              thread_name_prefix="bv-put")
        # Read buffers: one per worker plus one per reader, so reads run ahead of hashing.
        self._free_bufs: queue.SimpleQueue[AlignedBuffer] = queue.SimpleQueue()
        for _ in range(self.engine.workers + _READERS):
            self._free_bufs.put(AlignedBuffer(READ_CHUNK))
        try:
            readable = min(size, volume_length(fd))
            for kind, a, b in self._work(fd, readable, nblocks, ranges):
                self._check_cancel()
                self.lock.refresh()
                if kind == "read":
                    parent = self._parent_slice(a // bs, (a + b) // bs)
                    # Blocks while every buffer is being read or digested: bounded memory.
                    rb = self._free_bufs.get()
                    read = readers.submit(self._read, rb, fd, a, b, readable)
                    self._queue(pool.submit(self._process, read, rb, a, b, parent))
                    report(a)
                else:
                    self._copy_parent(a, b)
                    report(b * bs)
            while self.comp_q:
                self._accept(self.comp_q.popleft().result())
            self._check_cancel()
            self._seal()
            self._reap_uploads(block=True)
            self._check_cancel()
            self.stored_bytes += self._write_manifest(backup_id, size, parent_id)
            report(size, force=True)
            return BackupResult(
                object_count=self.object_count, stored_bytes=self.stored_bytes,
                logical_bytes=size, new_blocks=self.new_blocks,
                reused_blocks=self.reused_blocks,
                zero_blocks=nblocks - self.nonzero_blocks)
        finally:
            readers.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)
            self.upload_pool.shutdown(wait=True, cancel_futures=True)
            os.close(fd)
            if self.direct_fd is not None:
                os.close(self.direct_fd)
            self.tmp.close()
            for idx in self._tls_indexes:
                idx.close()

    def _write_manifest(self, backup_id: str, size: int, parent_id: str | None) -> int:
        with self.engine._manifest_builder(backup_id, self.crypto) as builder:
            self._fill_manifest(builder)
            self.lock.refresh()
            return self.engine._put_manifest(self.c, backup_id, builder, {
                "size": size, "block_size": self.bs, "parent_id": parent_id,
                "created_at": int(time.time()),
                "stats": {"new_blocks": self.new_blocks, "reused_blocks": self.reused_blocks},
            })

    def _fill_manifest(self, builder: ManifestBuilder) -> None:
        """Copy the pending entries into ``builder``, naming the packs built meanwhile."""
        self.tmp.flush()
        self.tmp.seek(0)
        names = self.pack_names
        marker = self._marker
        while True:
            buf = bytearray(self.tmp.read(_ENTRY_SIZE * SEGMENT_ENTRIES))
            if not buf:
                break
            at = buf.find(marker)
            while at >= 0:
                if (at - _ENTRY_PACK_AT) % _ENTRY_SIZE == 0:  # in a pack field: ours
                    seq = int.from_bytes(buf[at + 28 : at + 32], "little")
                    buf[at : at + 32] = names[seq]
                at = buf.find(marker, at + 1)
            builder.add_raw(buf)
