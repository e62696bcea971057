"""Engine configuration and result types (the engine's public data shapes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: (bytes_done, bytes_total, phase)
Progress = Callable[[int, int, str], None]

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 32768  # change-detection and dedup grain (power of two, 4 KiB..4 MiB)
    pack_size: int = 16 * 1024 * 1024  # target pack object size
    compression: str = "zstd"  # "zstd", "lz4" or "none"
    zstd_level: int = 1  # measured: ~30% less CPU than 3 for <1% more bytes (docs/benchmarks.md)
    workers: int = 0  # hashing/compression threads; 0 = os.cpu_count()
    upload_concurrency: int = 4  # concurrent puts/gets
    # Read volumes for full backups with O_DIRECT where the filesystem allows it: no
    # page-cache copies, no eviction of the volume users' cache (measured in
    # docs/benchmarks.md). Falls back to buffered I/O by itself where refused.
    direct_io: bool = True
    # Garbage collection (docs/format.md): a pack found unreferenced is condemned, and
    # deleted by a collection at least ``gc_grace`` seconds later if still unreferenced.
    # ``store_lag`` bounds how long the store's listings and reads may lag behind its
    # writes (and how far apart its servers' clocks may be); Swift's listings are
    # eventually consistent. Safety needs gc_grace > 2 * store_lag.
    gc_grace: float = 3600.0
    store_lag: float = 300.0
    # Repacking (docs/format.md, "Repacking"): a collection copies the live blobs of partly
    # referenced packs into new ones, emptiest packs first, until the unused bytes left in
    # packs are at most ``repack_max_unused`` x the live bytes (restic's --max-unused), so
    # stored bytes follow the live data; a round that would free less than one pack_size
    # is not worth its copying and is skipped.
    repack: bool = True
    repack_max_unused: float = 0.1
    # Which backups deduplicate against each other (docs/format.md, "Dedup scopes"):
    # "project" — only those given the same ``scope`` (the service passes the project id),
    # so nothing a tenant observes depends on another tenant's data; "container" — all
    # backups of a container (single-tenant deployments: more dedup, the pre-scope ids).
    dedup_scope: str = "project"
    # 32 bytes -> encryption on for NEW containers; required to read encrypted ones
    encryption_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        bs = self.block_size
        if bs & (bs - 1) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be a power of two between 4 KiB and 4 MiB, not {bs}")
        if not 1 <= self.pack_size <= 1024 * 1024 * 1024:
            raise ValueError("pack_size must be between 1 byte and 1 GiB")
        if self.compression not in ("zstd", "lz4", "none"):
            raise ValueError(
                f"compression must be 'zstd', 'lz4' or 'none', not {self.compression!r}")
        if self.workers < 0 or self.upload_concurrency < 1:
            raise ValueError("workers must be >= 0 and upload_concurrency >= 1")
        if self.store_lag < 0 or self.gc_grace <= 2 * self.store_lag:
            raise ValueError("gc_grace must be more than twice store_lag (docs/format.md)")
        if not 0 <= self.repack_max_unused <= 100:
            raise ValueError("repack_max_unused must be between 0 and 100")
        if self.dedup_scope not in ("project", "container"):
            raise ValueError(
                f"dedup_scope must be 'project' or 'container', not {self.dedup_scope!r}")
        if self.encryption_key is not None and len(self.encryption_key) != 32:
            raise ValueError("encryption_key must be exactly 32 bytes")


@dataclass(frozen=True)
class BackupResult:
    object_count: int  # pack objects this backup uploaded
    stored_bytes: int  # bytes this backup uploaded (packs + manifest + record)
    logical_bytes: int  # size of the source read
    new_blocks: int
    reused_blocks: int
    zero_blocks: int  # holes + all-zero blocks


@dataclass
class VerifyReport:
    checked_blocks: int = 0
    missing: list[str] = field(default_factory=list)  # names of missing objects
    corrupt: list[str] = field(default_factory=list)  # names of objects holding corrupt data

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


_PROGRESS_EVERY = 0.5  # seconds between progress callbacks


class Throttle:
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
