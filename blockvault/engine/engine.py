"""The Engine: the engine's one face. Container plumbing and records live here; each
stage has its own module, as restic splits them: ``archiver`` (backup), ``restorer``,
``checker`` (verify) and ``prune`` (delete and garbage collection)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from blockvault.engine import checker, locks, restorer
from blockvault.engine.archiver import BackupRun
from blockvault.engine.config import BackupResult, EngineConfig, Progress, VerifyReport
from blockvault.engine.crypto import Crypto, SealError
from blockvault.engine.errors import DataError, EngineError
from blockvault.engine.format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    MANIFEST_ENTRY,
    ContainerConfig,
    ManifestBuilder,
    ManifestReader,
    check_id,
    make_config,
    manifest_object,
    parse_config,
    record_object,
)
from blockvault.engine.index import Index
from blockvault.store import Backend, Container, ObjectNotFound, StoreError

log = logging.getLogger(__name__)

_RECORD_MAGIC = b"BVRE"


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
        check_id(backup_id)
        c = self.backend.open(container)
        cfg = self._config(c, container, create=True)
        assert cfg is not None
        c.put(record_object(backup_id), self._encode_record(cfg, backup_id, record))

    def read_record(self, *, container: str, backup_id: str) -> dict:
        check_id(backup_id)
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
        check_id(backup_id)
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
        check_id(source_id)
        check_id(target_id)
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
        check_id(backup_id)
        if parent_id is not None:
            check_id(parent_id)
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
                run = BackupRun(self, c, container, cfg, index, writer, lock, cancelled)
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

    # -- stages -------------------------------------------------------------------------
    def restore(self, *, container: str, backup_id: str, target: Path, target_is_new: bool,
                progress: Progress | None = None,
                cancelled: Callable[[], bool] | None = None) -> None:
        restorer.restore(self, container=container, backup_id=backup_id, target=target,
                         target_is_new=target_is_new, progress=progress, cancelled=cancelled)

    def verify(self, *, container: str, backup_id: str | None = None) -> VerifyReport:
        return checker.verify(self, container=container, backup_id=backup_id)

    def delete(self, *, container: str, backup_id: str) -> None:
        check_id(backup_id)
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
