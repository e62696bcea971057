"""The archiver: one backup run, a read -> hash -> dedup -> compress -> pack -> upload
pipeline that writes a complete manifest."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import os
import queue
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import blake3
import lz4.block
import zstandard

from blockvault.directio import AlignedBuffer
from blockvault.engine.codecs import thread_codecs, zstd_stored_block
from blockvault.engine.config import BackupResult, Progress, Throttle
from blockvault.engine.errors import Cancelled, DataError, EngineError
from blockvault.engine.format import (
    CODEC_LZ4,
    CODEC_NONE,
    CODEC_ZSTD,
    MANIFEST_ENTRY,
    SEGMENT_ENTRIES,
    ContainerConfig,
    ManifestBuilder,
    ManifestReader,
    build_trailer,
    entry_packs,
    pack_object,
)
from blockvault.engine.index import Index
from blockvault.engine.marks import read_marks, write_refs
from blockvault.engine.source import READ_CHUNK, Source, chunks
from blockvault.store import Container, StoreError

if TYPE_CHECKING:
    from blockvault.engine.engine import Engine

log = logging.getLogger(__name__)

ENTRY_SIZE = MANIFEST_ENTRY.size
_ENTRY_INDEX = struct.Struct("<Q")  # an entry's first field: its block index
_ENTRY_PACK_AT = struct.calcsize("<Q32s")  # where an entry's pack name starts
_ENTRY_PACK = struct.Struct("<40x32s9x")  # just an entry's pack name
_INFLIGHT_PACK_BYTES = 32 * 1024 * 1024
_READERS = 2  # threads reading the volume ahead of the hashing/compressing workers

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
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


def block_ranges(changed: Sequence[tuple[int, int]], size: int, bs: int) -> (
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



class ParentEntries:
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
        return _ENTRY_INDEX.unpack_from(self._raw, i * ENTRY_SIZE)[0]

    def take(self, lo: int, hi: int) -> Iterator[memoryview]:
        """Yield runs of packed entries with lo <= index < hi. Errors reading the parent
        (DataError, StoreError) propagate."""
        while True:
            if self._pos >= self._n:
                raw = next(self._segments, None)
                if raw is None:
                    self.close()
                    return
                self._raw, self._pos, self._n = raw, 0, len(raw) // ENTRY_SIZE
            span = range(self._pos, self._n)
            a = self._pos + bisect.bisect_left(span, lo, key=self._index)
            b = a + bisect.bisect_left(range(a, self._n), hi, key=self._index)
            if b > a:
                raw = self._raw
                yield memoryview(raw)[a * ENTRY_SIZE : b * ENTRY_SIZE]
                if self._raw is not raw:
                    # A nested take() while this one was suspended (a block of this range
                    # in a bad pack, read again and compared with the parent) consumed
                    # the rest of that segment and moved on: go on from where it left
                    # off. Setting _pos to ``b`` of the old segment skipped a whole
                    # segment of the new one, and the backup lost those blocks.
                    continue
            self._pos = b
            if b < self._n:  # the next entry is at or past ``hi``
                return



class BackupRun:
    """State of one backup: a read -> hash -> dedup -> compress -> pack -> upload pipeline.

    Reading+hashing and compression+encryption run on a worker pool; dedup decisions and
    pack building happen in the calling thread, in block order, so the manifest comes out
    in index order without sorting. Every queue is bounded.
    """

    def __init__(self, engine: Engine, c: Container, container: str, cfg: ContainerConfig,
                 index: Index, index_writer: Index, cancelled: Callable[[], bool] | None,
                 bad: frozenset[bytes] = frozenset(), started: float | None = None,
                 scope: str | None = None) -> None:
        self.engine = engine
        self.c = c
        self.container = container
        self.cfg = cfg
        self.crypto = cfg.crypto  # sealing (blobs, trailers, manifests, gc objects)
        # Block ids of the run's dedup scope (docs/format.md, "Dedup scopes"): the index
        # holds every scope's ids, but only blocks stored under this scope's key can match.
        self.scope = scope
        self.id_crypto = cfg.crypto.scoped(scope)
        self.bs = cfg.block_size
        self.index = index  # lookups, calling thread only
        self.index_writer = index_writer  # inserts, upload threads under index_mu
        self.cancelled = cancelled
        # Packs not to reference: condemned by garbage collection or known to be gone.
        # Parent entries in them are read again from the volume (a lost pack is not
        # carried on from backup to backup).
        self.bad = bad
        # Packs this run references through the index (old packs; the run's own are in
        # pack_names), published while it runs (see _publish_refs), and every pack its
        # manifest references, for the check against garbage collection at the end.
        self.used: set[bytes] = set()
        self.referenced: set[bytes] = set()
        self.refs_objects: list[tuple[str, float]] = []  # (name, when published)
        # Publish often enough that a fresh list is always visible to a collection:
        # collections honour lists younger than gc_grace, seen up to store_lag late.
        # ``max_gap`` is the longest time the run went without publishing, from the index
        # sync (``started``) to its manifest: the engine's check at the end relies on it.
        self._refs_every = (engine.config.gc_grace - 2 * engine.config.store_lag) / 4
        self._refs_at = time.monotonic() if started is None else started
        self.max_gap = 0.0
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
        # Signalled when an upload thread has named its pack (or given up): the manifest is
        # built while the last packs upload, and waits only for their names.
        self.named = threading.Condition(self.index_mu)
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

    def _read(self, rb: AlignedBuffer, src: Source, offset: int, length: int,
              readable: int) -> None:
        """Reader thread: fill ``rb``. Reads run apart from the CPU workers because direct
        reads are synchronous: a worker that read for itself would leave its core idle
        while the device works."""
        src.read_into(rb, offset, length, readable)

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
        block_id = self.id_crypto.block_id
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
            zs = thread_codecs.compressor(self.level).multi_compress_to_buffer(
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
                raw = zstd_stored_block(z, bs) if codec_c == CODEC_ZSTD else None
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
            bad = self.bad
            for raw in self.parent.take(lo, hi):
                for e in MANIFEST_ENTRY.iter_unpack(raw):
                    if not bad or e[2] not in bad:
                        out[e[0]] = e
        except (DataError, StoreError) as e:
            # These blocks are being read anyway: go on comparing with the index only.
            log.warning("parent manifest unreadable, continuing without it: %s", e)
            self.parent.close()
        return out or None

    def _pack(self, items: list[tuple]) -> None:
        used = self.used
        for it in items:
            kind = it[0]
            if kind == "known":
                self.reused_blocks += 1
                used.add(it[3])
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
            if loc[0]:
                used.add(loc[0])
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
            # Named before it is stored: a reference list or a manifest being built may name
            # it early (that only protects it); the manifest is put after every upload ends.
            with self.named:
                self.pack_names[seq] = name
                self.named.notify_all()
            self.c.put(pack_object(name.hex()), data)  # stores take any bytes-like object
            data.release()
        finally:
            self._pack_bufs.put(buf)
            with self.named:
                self.named.notify_all()  # a failure before naming must wake the waiter too
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

    def _work(self, src: Source, readable: int, nblocks: int,
              ranges: list[tuple[int, int]] | None) -> Iterator[tuple[str, int, int]]:
        """Units of work in block order: ("read", offset, length) or ("copy", first block,
        end block) — the latter taken from the parent manifest without reading."""
        bs = self.bs
        if ranges is None:
            for off, length in chunks(src, readable, bs):
                yield "read", off, length
            return
        prev = 0
        for a, b in ranges:
            if a > prev:
                yield "copy", prev, a
            for off, length in chunks(src, readable, bs, start=a * bs, stop=b * bs):
                yield "read", off, length
            prev = b
        if prev < nblocks:
            yield "copy", prev, nblocks

    def _copy_parent(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Reuse the parent's entries for blocks [lo, hi) (unchanged by promise), as they
        are, except those in a bad pack: yields the block ranges [a, b) of those, in block
        order, for the caller to read before this continues. A parent that turns unreadable
        here cannot be replaced by reading: fail."""
        for raw in self.parent.take(lo, hi):
            for part in self._without_bad(raw):
                if isinstance(part, tuple):
                    yield part
                    continue
                f: Future = Future()
                f.set_result(part)  # in the queue, so that it lands in block order
                self._queue(f)

    def _without_bad(self, raw: memoryview) -> Iterator[memoryview | tuple[int, int]]:
        """Split packed entries into runs of good entries and block ranges in bad packs."""
        data = bytes(raw) if self.bad else b""
        if not any(data.find(p) >= 0 for p in self.bad):
            yield raw  # the common case: no bad pack, no work per entry
            return
        start = 0
        for i, pack in enumerate(_ENTRY_PACK.iter_unpack(data)):
            if pack[0] in self.bad:
                if i > start:
                    yield raw[start * ENTRY_SIZE : i * ENTRY_SIZE]
                idx = _ENTRY_INDEX.unpack_from(data, i * ENTRY_SIZE)[0]
                yield (idx, idx + 1)
                start = i + 1
        if start * ENTRY_SIZE < len(data):
            yield raw[start * ENTRY_SIZE :]

    def _publisher(self, stop: threading.Event) -> None:
        """Publish reference lists on a timer of its own thread, so that a run that is only
        slow (a loaded host, a slow store) stays protected; a process that stops altogether
        (SIGSTOP, a frozen VM) misses its turns, and ``max_gap`` shows it."""
        while not stop.wait(max(0.0, self._refs_every - (time.monotonic() - self._refs_at))):
            try:
                self._refresh_condemned()
                self._publish_refs()
            except Exception as e:  # the gap grows, and the engine's end check sees it
                log.warning("could not publish a reference list in %s: %s", self.container, e)

    def _refresh_condemned(self) -> None:
        """Stop using packs condemned since the index sync: a long run would otherwise go on
        deduplicating against them, and name them in its lists only after a collection may
        have swept them (docs/format.md, "Why a backup is safe")."""
        condemned = frozenset().union(*(m.packs for m in read_marks(self.c, self.crypto)))
        new = condemned - self.bad
        if new:
            with self.index_mu:
                self.index_writer.condemn(new)
            self.bad = self.bad | new  # one assignment: readers see the old or the new set

    def _publish_refs(self) -> None:
        """Publish the packs this run references but no manifest names yet, so a garbage
        collection leaves them alone however long the run takes (docs/format.md)."""
        now = time.monotonic()
        with self.index_mu:
            # Copies made in C with the GIL held: the calling thread adds to ``used`` and
            # upload threads to ``pack_names`` meanwhile.
            packs = self.used.union(self.pack_names.values())
        self.refs_objects.append((write_refs(self.c, self.crypto, packs), now))
        self._gap_ends()
        # A list stays until a newer one is surely visible (a collection may list late);
        # past gc_grace no collection honours it anyway.
        expired = [r for r in self.refs_objects[:-1]
                   if now - r[1] > self.engine.config.gc_grace]
        for name, _t in expired:
            self.c.delete(name)
            self.refs_objects.remove((name, _t))

    def _gap_ends(self) -> None:
        now = time.monotonic()
        self.max_gap = max(self.max_gap, now - self._refs_at)
        self._refs_at = now

    def _queue(self, f: Future) -> None:
        """Results enter the calling thread in block order; at most ``depth`` in flight."""
        self.comp_q.append(f)
        while len(self.comp_q) > self.depth:
            self._accept(self.comp_q.popleft().result())

    def _accept(self, items: list[tuple] | memoryview) -> None:
        if isinstance(items, memoryview):  # packed entries copied from the parent
            n = len(items) // ENTRY_SIZE
            self.nonzero_blocks += n
            self.reused_blocks += n
            self.tmp.write(items)
            return
        self.nonzero_blocks += len(items)
        self._pack(items)

    # -- driver ----------------------------------------------------------------------------
    def run(self, backup_id: str, src: Source, size: int, parent_id: str | None,
            progress: Progress | None,
            changed: Sequence[tuple[int, int]] | None = None) -> BackupResult:
        bs = self.bs
        self._zero = bytes(bs)
        self._zero_chunk = bytes(READ_CHUNK)
        nblocks = -(-size // bs)
        report = Throttle(progress, size, "backup")
        self.parent = ParentEntries()
        ranges: list[tuple[int, int]] | None = None
        comparable = False  # a usable parent of this size: changed ranges apply
        if parent_id is not None:
            try:
                # The newest version: an older one may name packs a repack condemned,
                # whose blocks would be read from the volume again.
                pm = ManifestReader(self.c, parent_id, self.crypto, self.container,
                                    newest=True)
                if pm.scope != self.scope:
                    # Its ids were made with another scope's key (a backup from before
                    # scopes, one imported from another project, or the setting changed):
                    # none can equal this run's, and one manifest must not mix keys. The
                    # volume is read whole and its blocks are stored in this scope.
                    log.info("parent %s was deduplicated in another scope; doing a full "
                             "backup", parent_id)
                elif pm.block_size == bs:
                    self.parent = ParentEntries(pm.raw_segments())
                    comparable = pm.size == size
                else:
                    log.info("parent %s has another block size; doing a full backup", parent_id)
            except DataError as e:
                log.info("parent %s unusable (%s); doing a full backup", parent_id, e)
            if comparable and changed is None:  # the source's own tracking, if it vouches
                try:
                    changed = src.changed_extents()
                except BaseException:
                    src.close()  # it may have connected to answer
                    raise
                if changed is None:
                    log.info("backup %s: %s has no change tracking that covers everything "
                             "since parent %s; reading it whole", backup_id, src.name,
                             parent_id)
            if comparable and changed is not None:
                ranges = block_ranges(changed, size, bs)
        self.comp_q: deque[Future] = deque()
        # Direct reads save the kernel's copy into fresh cache pages: most of the system
        # time of a full backup, which is CPU-bound (it compresses all it reads). An
        # incremental that reads everything mostly hashes and compares and is bound by the
        # device, where the kernel's asynchronous readahead reads ~25% faster than our
        # synchronous direct reads (docs/benchmarks.md); one that reads only changed
        # ranges would have readahead fetch far past each range. So: buffered only for an
        # incremental that reads the whole volume.
        use_direct = self.engine.config.direct_io and (
            not self.parent.usable or ranges is not None)
        src.open(bool(use_direct))
        try:
            self.engine.cache_dir.mkdir(parents=True, exist_ok=True)
            self.tmp = tempfile.TemporaryFile(  # closed in the finally below
                dir=self.engine.cache_dir, prefix="manifest-")
        except BaseException:
            src.close()
            raise
        pool = ThreadPoolExecutor(max_workers=self.engine.workers, thread_name_prefix="bv-cpu")
        readers = ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="bv-read")
        self.upload_pool = ThreadPoolExecutor(max_workers=self.upload_limit,
                                              thread_name_prefix="bv-put")
        # Read buffers: one per worker plus one per reader, so reads run ahead of hashing.
        self._free_bufs: queue.SimpleQueue[AlignedBuffer] = queue.SimpleQueue()
        for _ in range(self.engine.workers + _READERS):
            self._free_bufs.put(AlignedBuffer(READ_CHUNK))
        stop_publishing = threading.Event()
        publishing: threading.Thread | None = None
        try:
            readable = min(size, src.length())
            def read(a: int, b: int) -> None:
                parent = self._parent_slice(a // bs, (a + b) // bs)
                # Blocks while every buffer is being read or digested: bounded memory.
                rb = self._free_bufs.get()
                done = readers.submit(self._read, rb, src, a, b, readable)
                self._queue(pool.submit(self._process, done, rb, a, b, parent))

            publishing = threading.Thread(target=self._publisher, args=(stop_publishing,),
                                          name="bv-refs", daemon=True)
            publishing.start()
            for kind, a, b in self._work(src, readable, nblocks, ranges):
                self._check_cancel()
                if kind == "read":
                    read(a, b)
                    report(a)
                else:
                    for lo, hi in self._copy_parent(a, b):
                        for off, length in chunks(src, readable, bs, start=lo * bs,
                                                  stop=hi * bs):
                            read(off, length)
                    report(b * bs)
            while self.comp_q:
                self._accept(self.comp_q.popleft().result())
            self._check_cancel()
            self._seal()
            manifest_bytes = self._write_manifest(backup_id, size, parent_id)  # reaps uploads
            self.stored_bytes += manifest_bytes
            stop_publishing.set()
            publishing.join()
            self._gap_ends()
            report(size, force=True)
            return BackupResult(
                object_count=self.object_count, stored_bytes=self.stored_bytes,
                logical_bytes=size, new_blocks=self.new_blocks,
                reused_blocks=self.reused_blocks,
                zero_blocks=nblocks - self.nonzero_blocks)
        finally:
            stop_publishing.set()
            if publishing is not None:  # its lists are removed by the caller
                publishing.join()
            readers.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)
            self.upload_pool.shutdown(wait=True, cancel_futures=True)
            src.close()
            self.tmp.close()
            for idx in self._tls_indexes:
                idx.close()

    def _write_manifest(self, backup_id: str, size: int, parent_id: str | None) -> int:
        with self.engine._manifest_builder(backup_id, self.crypto) as builder:
            self._fill_manifest(builder)  # while the last packs upload
            # Every pack the manifest names is stored before the manifest is: a manifest
            # naming a pack that never arrived would be a lost backup.
            self._reap_uploads(block=True)
            self._check_cancel()
            return self.engine._put_manifest(self.c, backup_id, builder, {
                "size": size, "block_size": self.bs, "parent_id": parent_id,
                "dedup_scope": self.scope, "created_at": int(time.time()),
                "stats": {"new_blocks": self.new_blocks, "reused_blocks": self.reused_blocks},
            })

    def _fill_manifest(self, builder: ManifestBuilder) -> None:
        """Copy the pending entries into ``builder``, naming the packs built meanwhile."""
        with self.named:
            while len(self.pack_names) < self.seq and not any(
                    f.done() and f.exception() is not None for f, _seq in self.uploads):
                self.named.wait(1.0)
        if len(self.pack_names) < self.seq:
            self._reap_uploads(block=True)  # raises the upload's error
        self.tmp.flush()
        self.tmp.seek(0)
        names = self.pack_names
        marker = self._marker
        while True:
            buf = bytearray(self.tmp.read(ENTRY_SIZE * SEGMENT_ENTRIES))
            if not buf:
                break
            at = buf.find(marker)
            while at >= 0:
                if (at - _ENTRY_PACK_AT) % ENTRY_SIZE == 0:  # in a pack field: ours
                    seq = int.from_bytes(buf[at + 28 : at + 32], "little")
                    buf[at : at + 32] = names[seq]
                at = buf.find(marker, at + 1)
            self.referenced |= entry_packs(buf)
            builder.add_raw(buf)
