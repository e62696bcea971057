"""The Engine: the engine's one face. Container plumbing and records live here; each
stage has its own module, as restic splits them: ``archiver`` (backup), ``restorer``,
``checker`` (verify) and ``prune`` (delete and garbage collection)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from blockvault.engine import checker, prune, restorer
from blockvault.engine.archiver import BackupRun
from blockvault.engine.config import BackupResult, EngineConfig, Progress, VerifyReport
from blockvault.engine.crypto import Crypto, SealError, scope_key
from blockvault.engine.errors import DataError, EngineError
from blockvault.engine.format import (
    CONFIG_NAME,
    CONFIG_VERSION,
    FORMAT_VERSION,
    ContainerConfig,
    ManifestBuilder,
    ManifestReader,
    check_id,
    entry_packs,
    make_config,
    manifest_exists,
    manifest_object,
    parse_config,
    record_object,
)
from blockvault.engine.index import Index
from blockvault.engine.source import Source, Target, as_source
from blockvault.store import Backend, Container, ObjectNotFound, StoreError

log = logging.getLogger(__name__)

_RECORD_MAGIC = b"BVRE"
_PASSES = 3  # backup passes before giving up on data that collections keep condemning


_DEFAULT_CONFIG = EngineConfig()


class Engine:
    def __init__(self, backend: Backend, cache_dir: Path,
                 config: EngineConfig = _DEFAULT_CONFIG) -> None:
        self.backend = backend
        self.cache_dir = Path(cache_dir)
        self.config = config
        self.workers = config.workers or os.cpu_count() or 1
        self._config_mu = threading.Lock()
        #: index caches this engine has backed up to, each with a connection held open for
        #: the engine's life (Index.hold_open)
        self._held: dict[Path, sqlite3.Connection | None] = {}
        self._held_mu = threading.Lock()

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
                    # Two deployments may create the container at once: only one config
                    # may win (with another key, the loser's backups would be unreadable),
                    # and both go on with the winner's, read back below.
                    c.put_new(CONFIG_NAME, json.dumps(doc, indent=2).encode())
                data = c.get(CONFIG_NAME)
        parsed = parse_config(container, data, self.config.encryption_key)
        if create and parsed.raw.get("version") != CONFIG_VERSION:
            # This engine writes version 2 packs and gc objects: an older engine must
            # refuse the container rather than misread them.
            doc = dict(parsed.raw, version=CONFIG_VERSION)
            c.put(CONFIG_NAME, json.dumps(doc, indent=2).encode())
            parsed = dataclasses.replace(parsed, raw=doc)
        return parsed

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
        return manifest_exists(c, backup_id)

    def clone_backup(self, *, container: str, source_id: str, target_id: str) -> None:
        """Give backup ``target_id`` a manifest of its own with ``source_id``'s content.

        Used when a backup record is imported: each backup then owns its manifest, and the
        packs both reference live until neither references them. The manifest is re-sealed
        (its id is bound into every segment), streamed segment by segment. If the source
        is deleted meanwhile and garbage collection condemned its packs before the copy
        became visible, the copy is removed again and DataError raised.
        """
        check_id(source_id)
        check_id(target_id)
        started = time.monotonic()
        c = self.backend.open(container, create=False)
        cfg = self._require_config(c, container)
        reader = ManifestReader(c, source_id, cfg.crypto, container)
        header = {k: v for k, v in reader.header.items()
                  if k not in ("backup_id", "entries", "segments", "version")}
        header["cloned_from"] = source_id
        referenced: set[bytes] = set()
        with self._manifest_builder(target_id, cfg.crypto) as builder:
            for raw in reader.raw_segments():
                referenced |= entry_packs(raw)
                builder.add_raw(raw)
            self._put_manifest(c, target_id, builder, header)
        took = time.monotonic() - started
        lost = prune.lost_references(self, c, cfg, referenced, took, took)
        if lost or lost is None:
            prune.discard(c, target_id)
            raise DataError(f"the data of backup {source_id} may have been deleted while it "
                            "was being copied (garbage collection condemned it); try again",
                            manifest_object(source_id))

    def manifest_info(self, *, container: str, backup_id: str) -> dict:
        """What a backup's manifest says about it: ``size`` (bytes), ``block_size``,
        ``parent_id``, ``created_at``, ``dedup_scope`` (None: container-wide). DataError
        if it is missing or unreadable."""
        check_id(backup_id)
        c = self.backend.open(container, create=False)
        cfg = self._require_config(c, container)
        m = ManifestReader(c, backup_id, cfg.crypto, container)
        return {"size": m.size, "block_size": m.block_size,
                "parent_id": m.header.get("parent_id"),
                "created_at": m.header.get("created_at"), "dedup_scope": m.scope}

    def _manifest_builder(self, backup_id: str, crypto: Crypto) -> ManifestBuilder:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return ManifestBuilder(backup_id, crypto, self.cache_dir)

    def _put_manifest(self, c: Container, backup_id: str, builder: ManifestBuilder,
                      header: dict, name: str | None = None) -> int:
        """Finish ``builder`` into a temporary file and upload it (streamed: manifests grow
        with the volume's data) as ``name``, by default the backup's version 0. Returns the
        manifest's size."""
        with tempfile.TemporaryFile(dir=self.cache_dir, prefix="manifest-") as f:
            size = builder.finish(header, f)
            c.put_file(name or manifest_object(backup_id), f, size)
        return size

    # -- backup -------------------------------------------------------------------------
    def backup(self, *, container: str, backup_id: str, source: Path | str | Source,
               size: int,
               parent_id: str | None = None, record: dict | None = None,
               progress: Progress | None = None,
               cancelled: Callable[[], bool] | None = None,
               changed: Sequence[tuple[int, int]] | None = None,
               scope: str | None = None) -> BackupResult:
        """Back up ``size`` bytes of ``source`` as ``backup_id``.

        ``source`` is a :class:`~blockvault.engine.source.Source` or the path of a file or
        block device (read as a ``FileSource``). Errors reading it propagate, and no
        manifest is written.

        ``scope`` is the dedup scope the backup belongs to (the service passes the
        backup's project id): with ``dedup_scope = "project"`` its blocks are deduplicated
        only against blocks stored under the same scope, so its counts, sizes and timings
        do not depend on what other scopes stored. None, or ``dedup_scope = "container"``,
        deduplicates across the whole container (the ids of backups from before scopes).
        A parent of another scope is only named as the parent: the volume is read whole.

        ``changed`` (with ``parent_id``) is the caller's promise that only those byte ranges
        (offset, length) may differ from the parent backup's data: every block outside them
        is taken from the parent's manifest without reading the source. It is ignored (a
        normal full read) when the parent is missing, unreadable or of another size or block
        size. Without it, an incremental asks the source for its own changed extents
        (``Source.changed_extents``, e.g. a dirty bitmap) and reads it whole without them.
        """
        check_id(backup_id)
        if parent_id is not None:
            check_id(parent_id)
        if size < 0:
            raise ValueError("size must not be negative")
        if self.config.dedup_scope == "container":
            scope = None
        elif scope is not None:
            scope_key(None, scope)  # a bad name fails here, before anything is stored
        c = self.backend.open(container)
        cfg = self._config(c, container, create=True)
        assert cfg is not None
        cache = self._cache_path(container)
        index = Index(cache)
        writer = Index(cache)
        with self._held_mu:
            if cache not in self._held:
                self._held[cache] = Index.hold_open(cache)
        runs: list[BackupRun] = []
        try:
            bad: frozenset[bytes] = frozenset()
            for _ in range(_PASSES):
                if progress is not None:
                    progress(0, size, "index")
                started = time.monotonic()
                bad |= index.sync(c, cfg.crypto, self.config.upload_concurrency, cancelled,
                                  self.config.store_lag)
                run = BackupRun(self, c, container, cfg, index, writer, cancelled, bad,
                                started, scope)
                runs.append(run)
                result = run.run(backup_id, as_source(source), size, parent_id, progress,
                                 changed)
                lost = self._lost_references(c, cfg, index, run, time.monotonic() - started)
                if lost is not None and not lost:
                    break
                # Rare: a collection condemned (or the store lost) packs this backup
                # references, or it was paused too long to tell. Another pass, from a fresh
                # index sync, reads those blocks again and stores them anew.
                log.warning("backup %s: %s; backing it up again", backup_id,
                            "paused too long to check its data against garbage collection"
                            if lost is None else
                            f"packs it references are condemned or missing: "
                            f"{', '.join(sorted(p.hex()[:12] for p in lost))}")
                prune.discard(c, backup_id)
                bad |= lost or frozenset()
            else:
                raise DataError(f"backup {backup_id} could not be completed: garbage "
                                "collection kept condemning the data it references")
            if record is not None:
                rec = self._encode_record(cfg, backup_id, record)
                c.put(record_object(backup_id), rec)
                result = dataclasses.replace(result, stored_bytes=result.stored_bytes + len(rec))
            return result
        finally:
            index.close()
            writer.close()
            for run in runs:  # the manifest (or the failure) has made them moot
                for name, _published in run.refs_objects:
                    try:
                        c.delete(name)
                    except StoreError as e:  # expires by itself (gc_grace)
                        log.warning("could not remove reference list %s: %s", name, e)

    def _lost_references(self, c: Container, cfg: ContainerConfig, index: Index,
                         run: BackupRun, elapsed: float) -> set[bytes] | None:
        """Packs the run's manifest references that a collection may delete unseen, or
        that the index does not know (gone from the store; not uploaded by this run).
        None: the run cannot tell (prune.lost_references)."""
        lost = prune.lost_references(self, c, cfg, run.referenced, elapsed, run.max_gap)
        if lost is None:
            return None
        own = set(run.pack_names.values())
        return lost | (run.referenced - own - index.known(run.referenced - own))

    def discard(self, *, container: str, backup_id: str) -> None:
        """Remove a backup's manifest and record without collecting garbage (an attempt
        that lost to another one). Idempotent."""
        check_id(backup_id)
        prune.discard(self.backend.open(container, create=False), backup_id)

    # -- stages -------------------------------------------------------------------------
    def restore(self, *, container: str, backup_id: str, target: Path | str | Target,
                target_is_new: bool,
                progress: Progress | None = None,
                cancelled: Callable[[], bool] | None = None) -> None:
        restorer.restore(self, container=container, backup_id=backup_id, target=target,
                         target_is_new=target_is_new, progress=progress, cancelled=cancelled)

    def verify(self, *, container: str, backup_id: str | None = None) -> VerifyReport:
        return checker.verify(self, container=container, backup_id=backup_id)

    def delete(self, *, container: str, backup_id: str) -> bool:
        """Remove a backup, then collect garbage. Returns what ``collect_garbage`` returns;
        a collection that fails is logged and reported as False (to be run again): the
        backup itself is gone either way."""
        check_id(backup_id)
        c = self.backend.open(container, create=False)
        # Check the key before deleting anything, so a wrong key fails cleanly.
        self._config(c, container, create=False)
        prune.discard(c, backup_id)
        try:
            # No repacking here: the delete returns soon, and the collection it owes (a
            # repack being due makes this False) repacks.
            return prune.collect_garbage(self, container, c, repack=False)
        except (EngineError, StoreError) as e:
            log.warning("garbage collection in %s after deleting %s failed: %s",
                        container, backup_id, e)
            return False

    def collect_garbage(self, *, container: str) -> bool:
        """Sweep and condemn unreferenced packs (docs/format.md). True when nothing waits
        for a later collection; False when one is due ``gc_grace`` seconds from now."""
        return prune.collect_garbage(self, container, self.backend.open(container, create=False))
