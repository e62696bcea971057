"""Repacking: copy the live blobs of partly referenced packs into new packs, point the
manifests at the copies, and leave the old packs to garbage collection, so that stored bytes
follow the live data (docs/format.md, "Repacking").

A round, run by a collection after its sweep and condemnation:

1. *plan*: from the blobs the collection found referenced (``LiveBlobs``), choose packs
   emptiest first until the unused bytes left are at most ``repack_max_unused`` x the live
   bytes; only packs older than the grace period, in no mark and in no live reference list;
2. *copy* their live blobs, as stored (still compressed and encrypted), each checked against
   its id first, into new packs, uploaded; a blob whose block another live pack already
   holds (checked too) is not copied but pointed there, so duplicates merge;
3. *rewrite* every manifest that references them: a new version, entries moved to the
   copies, put next to the old one only if none of its packs is condemned and within
   ``gc_grace - 2 * store_lag`` of the round's start (so no collection can condemn or sweep
   what it names before it is visible), committed once that is known, then the old
   versions removed;
4. *condemn* the old packs that no rewritten manifest still names, with an ordinary mark:
   the sweep a grace period later deletes them only if no manifest or reference list names
   them then, exactly as for any garbage.

A crash anywhere leaves every committed manifest version valid (each naming packs that
exist); the next collection finds what is still partly referenced and does it again.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import blake3
import lz4.block
import zstandard

from blockvault.engine import prune
from blockvault.engine.codecs import thread_codecs
from blockvault.engine.crypto import Crypto, SealError
from blockvault.engine.errors import DataError
from blockvault.engine.format import (
    CODEC_LZ4,
    CODEC_NONE,
    CODEC_ZSTD,
    MANIFEST_ENTRY,
    TRAILER_ENTRY,
    ContainerConfig,
    ManifestReader,
    ManifestVersion,
    build_trailer,
    entry_packs,
    group_manifests,
    manifest_exists,
    manifest_versions,
    pack_object,
    record_object,
    version_object,
)
from blockvault.engine.index import Index
from blockvault.engine.marks import read_marks, write_mark
from blockvault.store import Container, ObjectInfo, ObjectNotFound

if TYPE_CHECKING:
    from blockvault.engine.engine import Engine

log = logging.getLogger(__name__)

_RUN_MAX = 4 * 1024 * 1024  # largest range GET while copying a pack's live blobs
_PACK_OVERHEAD = 64  # footer, trailer salt and seal tag, roughly: not reclaimable
_ENTRY = MANIFEST_ENTRY.size

# One round per container at a time in this process (two would copy the same blobs twice;
# across processes that is wasteful but safe: see docs/format.md, "Repacking").
_busy: set[str] = set()
_busy_mu = threading.Lock()


class LiveBlobs:
    """What a collection found referenced, blob by blob, in a private temporary SQLite
    database (bounded memory): every blob some manifest names, which manifests name which
    packs, and the listed packs' sizes and ages."""

    def __init__(self) -> None:
        #: packs named by manifests no round rewrites (of backups without a record)
        self.unmovable: set[bytes] = set()
        self.db = sqlite3.connect("")
        # A scratch database thrown away after the collection: no journal, no syncs.
        self.db.executescript("""
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -32768;
            CREATE TABLE blobs (pack BLOB, off INTEGER, len INTEGER, id BLOB, codec INTEGER,
                                scope TEXT, bs INTEGER, PRIMARY KEY (pack, off)) WITHOUT ROWID;
            CREATE INDEX blobs_id ON blobs (id);
            CREATE TABLE uses (pack BLOB, manifest TEXT, PRIMARY KEY (pack, manifest))
                WITHOUT ROWID;
            CREATE TABLE listed (pack BLOB PRIMARY KEY, size INTEGER, mtime REAL)
                WITHOUT ROWID;
            CREATE TABLE avoid (pack BLOB PRIMARY KEY) WITHOUT ROWID;
        """)

    def close(self) -> None:
        self.db.close()

    def add_segment(self, backup_id: str, m: ManifestReader, raw: bytes) -> None:
        scope, bs = m.scope or "", m.block_size
        self.db.executemany(
            "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((pack, off, ln, bid, codec, scope, bs)
             for _i, bid, pack, off, ln, codec in MANIFEST_ENTRY.iter_unpack(raw)))
        self.db.executemany("INSERT OR IGNORE INTO uses VALUES (?, ?)",
                            ((p, backup_id) for p in entry_packs(raw)))

    def add_listed(self, info: ObjectInfo, pack: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO listed VALUES (?, ?, ?)",
                        (pack, info.size, info.mtime))

    def manifests_using(self, packs: Iterable[bytes]) -> list[str]:
        out: set[str] = set()
        for p in packs:
            out.update(r[0] for r in self.db.execute(
                "SELECT manifest FROM uses WHERE pack = ?", (p,)))
        return sorted(out)


def plan(engine: Engine, live: LiveBlobs, now: float, excluded: set[bytes]) -> list[bytes]:
    """The packs worth repacking now, emptiest first (see the module docstring)."""
    cfg = engine.config
    if not cfg.repack:
        return []
    rows = live.db.execute(f"""
        SELECT l.pack, l.size, l.mtime, SUM(b.len) + COUNT(*) * {TRAILER_ENTRY.size}
               + {_PACK_OVERHEAD}
        FROM listed l JOIN blobs b ON b.pack = l.pack GROUP BY l.pack""").fetchall()
    total_live = sum(r[3] for r in rows)
    eligible = sorted(
        ((min(used, size), size, pack) for pack, size, mtime, used in rows
         if pack not in excluded and now - mtime >= cfg.gc_grace and used < size),
        key=lambda t: t[0] / max(1, t[1]))
    unused = sum(size - used for used, size, _p in eligible)
    chosen: list[bytes] = []
    freed = 0
    for used, size, pack in eligible:
        if unused <= cfg.repack_max_unused * total_live:
            break
        chosen.append(pack)
        freed += size - used
        unused -= size - used
    return chosen if freed >= cfg.pack_size else []


def repack(engine: Engine, container: str, c: Container, cfg: ContainerConfig,
           live: LiveBlobs, packs: list[bytes], excluded: set[bytes]) -> int:
    """Run one round over ``packs`` (from ``plan``; ``excluded`` as given to it). Returns
    how many old packs it condemned."""
    key = str(engine._cache_path(container))
    with _busy_mu:
        if key in _busy:
            return 0
        _busy.add(key)
    try:
        live.db.executemany("INSERT OR IGNORE INTO avoid VALUES (?)",
                            ((p,) for p in (*packs, *excluded)))
        return Round(engine, container, c, cfg, live).run(packs)
    finally:
        with _busy_mu:
            _busy.discard(key)


class Round:
    def __init__(self, engine: Engine, container: str, c: Container, cfg: ContainerConfig,
                 live: LiveBlobs) -> None:
        self.engine, self.container, self.c, self.cfg, self.live = (
            engine, container, c, cfg, live)
        ec = engine.config
        self.started = time.monotonic()
        # Until this deadline nothing the round writes can be condemned unseen: its new
        # packs are younger than gc_grace (no collection condemns them), and a manifest
        # put before it was checked against marks at most gc_grace - 2 * store_lag before
        # (docs/format.md, "Repacking"). Copying stops at half of it.
        self.budget = ec.gc_grace - 2 * ec.store_lag
        self.deadline = self.started + self.budget
        self.db = live.db
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS moved (pack BLOB, off INTEGER, new BLOB,
                new_off INTEGER, PRIMARY KEY (pack, off)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS copied (id BLOB PRIMARY KEY, new BLOB,
                new_off INTEGER) WITHOUT ROWID;
        """)
        self.crypto: dict[str, Crypto] = {}
        self.copied_from: set[bytes] = set()  # old packs whose live blobs all have copies
        #: (backup id, committed version, the versions it supersedes), deleted at the end
        self.superseded: list[tuple[str, ManifestVersion, set[ManifestVersion]]] = []
        self.new_packs: set[bytes] = set()
        self.index = Index(engine._cache_path(container))
        # The pack being built: stored blobs, trailer entries, moves waiting for its name.
        self.blobs: list[bytes] = []
        self.entries: list[tuple[bytes, int, int, int, int]] = []
        self.pending: list[tuple[bytes, int, int]] = []  # old pack, old offset, new offset
        self.ids: dict[bytes, int] = {}
        self.size = 0

    def run(self, packs: list[bytes]) -> int:
        try:
            for pack in packs:
                if time.monotonic() - self.started >= self.budget / 2:
                    break
                self._copy_pack(pack)
            self._seal()
            still = self._rewrite_all()
            self._drop_superseded()
            done = sorted(self.copied_from - still)
            if done:
                write_mark(self.c, self.cfg.crypto, done)
                log.info("repacking in %s: %d packs copied into %d and condemned",
                         self.container, len(done), len(self.new_packs))
            return len(done)
        finally:
            self.index.close()

    # -- copy ------------------------------------------------------------------------------
    def _copy_pack(self, pack: bytes) -> None:
        rows = self.db.execute("SELECT off, len, id, codec, scope, bs FROM blobs "
                               "WHERE pack = ? ORDER BY off", (pack,)).fetchall()
        obj = pack_object(pack.hex())
        good: list[tuple[int, bytes, bytes, int, int]] = []  # off, id, blob, codec, bs
        elsewhere: list[tuple[int, bytes, int]] = []  # off, pack, offset there
        try:
            for start, end, run in _runs(rows):
                data = self.c.get(obj, start, end - start)
                for off, ln, bid, codec, scope, bs in run:
                    blob = data[off - start : off - start + ln]
                    if len(blob) != ln or not self._valid(blob, bid, codec, scope, bs):
                        # Left where it is, for verify to report; the pack stays whole.
                        log.warning("repacking in %s: block %s in pack %s fails its check; "
                                    "pack left alone", self.container, bid.hex()[:12], obj)
                        return
                    there = self._held_elsewhere(bid, scope)
                    if there is not None:
                        elsewhere.append((off, *there))
                    else:
                        good.append((off, bid, blob, codec, bs))
        except ObjectNotFound:
            return  # swept meanwhile: nothing names it any more
        self.db.executemany("INSERT OR REPLACE INTO moved VALUES (?, ?, ?, ?)",
                            ((pack, off, other, at) for off, other, at in elsewhere))
        for off, bid, blob, codec, bs in good:
            self._append(pack, off, bid, blob, codec, bs)
        self.copied_from.add(pack)
        if self.size >= self.engine.config.pack_size:
            self._seal()

    def _held_elsewhere(self, bid: bytes, scope: str) -> tuple[bytes, int] | None:
        """A checked copy of block ``bid`` in a live pack that stays (listed, referenced,
        not condemned, not being repacked), if there is one: pointing there merges
        duplicates (e.g. what an earlier round copied before it was interrupted)."""
        for pack, off, ln, codec, bs in self.db.execute(
                "SELECT pack, off, len, codec, bs FROM blobs WHERE id = ? AND pack IN "
                "(SELECT pack FROM listed) AND pack NOT IN (SELECT pack FROM avoid) "
                "LIMIT 4", (bid,)).fetchall():
            try:
                blob = self.c.get(pack_object(pack.hex()), off, ln)
            except ObjectNotFound:
                continue
            if len(blob) == ln and self._valid(blob, bid, codec, scope, bs):
                return pack, off
        return None

    def _valid(self, blob: bytes, bid: bytes, codec: int, scope: str, bs: int) -> bool:
        """The blob decrypts (its tag binds it to its id) and decodes to its id."""
        crypto = self.crypto.get(scope)
        if crypto is None:
            crypto = self.crypto[scope] = self.cfg.crypto.scoped(scope or None)
        try:
            plain = crypto.open_blob(blob, bid)
            if codec == CODEC_ZSTD:
                raw = thread_codecs.dctx.decompress(plain, max_output_size=bs)
            elif codec == CODEC_LZ4:
                raw = lz4.block.decompress(plain, uncompressed_size=bs)
            elif codec == CODEC_NONE:
                raw = plain
            else:
                return False
        except (SealError, zstandard.ZstdError, lz4.block.LZ4BlockError, ValueError):
            return False
        return len(raw) == bs and crypto.block_id(raw) == bid

    def _append(self, pack: bytes, off: int, bid: bytes, blob: bytes, codec: int,
                bs: int) -> None:
        at = self.ids.get(bid)
        if at is None:  # the same block from another old pack: one copy
            row = self.db.execute("SELECT new, new_off FROM copied WHERE id = ?",
                                  (bid,)).fetchone()
            if row is not None:
                self.db.execute("INSERT OR REPLACE INTO moved VALUES (?, ?, ?, ?)",
                                (pack, off, row[0], row[1]))
                return
            at = self.ids[bid] = self.size
            self.blobs.append(blob)
            self.entries.append((bid, at, len(blob), bs, codec))
            self.size += len(blob)
        self.pending.append((pack, off, at))

    def _seal(self) -> None:
        if not self.blobs:
            return
        data = b"".join(self.blobs) + build_trailer(self.entries, self.cfg.crypto)
        name = blake3.blake3(data).digest()
        self.c.put(pack_object(name.hex()), data)
        self.new_packs.add(name)
        # Backups on this host may use it at once (and do not take it for gone while the
        # listing lags); elsewhere their next index sync finds it.
        self.index.add_pack(name, [(e[0], e[1], e[2], e[4]) for e in self.entries])
        self.db.executemany("INSERT OR REPLACE INTO moved VALUES (?, ?, ?, ?)",
                            ((p, off, name, at) for p, off, at in self.pending))
        self.db.executemany("INSERT OR IGNORE INTO copied VALUES (?, ?, ?)",
                            ((bid, name, at) for bid, at in self.ids.items()))
        self.blobs, self.entries, self.pending, self.ids, self.size = [], [], [], {}, 0

    # -- rewrite ---------------------------------------------------------------------------
    def _rewrite_all(self) -> set[bytes]:
        """Rewrite the manifests naming copied packs. Returns the copied packs some
        manifest still names (not rewritten, or naming a blob the copy does not hold)."""
        still: set[bytes] = set()
        for backup_id in self.live.manifests_using(self.copied_from):
            kept = self.rewrite(backup_id)
            if kept is None:
                still |= self._packs_of(backup_id)
            else:
                still |= kept & self.copied_from
        return still

    def _packs_of(self, backup_id: str) -> set[bytes]:
        return {r[0] for r in self.db.execute(
            "SELECT pack FROM uses WHERE manifest = ?", (backup_id,))}

    def rewrite(self, backup_id: str) -> set[bytes] | None:
        """Write a new version of one backup's manifest with its entries in copied packs
        moved to the copies, and commit it once it is known to be safe. Returns the packs
        the version names, or None if none was committed (the previous version stands).

        Safety (docs/format.md, "Manifest versions"): a version is never written over
        another; it is committed (``<name>.ok``) only once no collection can have deleted
        a pack it names without having seen it, so readers, which take committed versions
        only, never meet one naming a deleted pack. Marks older than store_lag at the check
        are seen, and a manifest naming a condemned pack is left alone; marks made later
        are swept only gc_grace after them, later than the put plus store_lag if the put
        returns before the deadline. A put that returns later (the process was paused in
        it) is checked against the marks, and its version deleted uncommitted if one of
        them may have been swept."""
        if time.monotonic() >= self.deadline:
            return None
        # Finished backups only: before its record a backup may still discard its
        # manifest and write another (a pass after its end check), which a version
        # derived from the first must not outlive.
        if self.c.head(record_object(backup_id)) is None:
            return None
        condemned = frozenset().union(*(m.packs for m in read_marks(self.c, self.cfg.crypto)))
        listed = manifest_versions(self.c, backup_id)
        try:
            m = ManifestReader(self.c, backup_id, self.cfg.crypto, self.container,
                               newest=True)
            older = listed.versions | listed.commits | {m.version}
            new = version_object(backup_id, 1 + max(v.generation for v in older),
                                 secrets.token_hex(8))
            with self.engine._manifest_builder(backup_id, self.cfg.crypto) as builder:
                names, moved = self._moved_entries(m, builder)
                if not moved:
                    return names  # nothing of it was copied (a newer version, perhaps)
                if names & condemned:
                    log.info("repacking in %s: backup %s names condemned packs; left as "
                             "it is", self.container, backup_id)
                    return None
                if time.monotonic() >= self.deadline:
                    return None
                header = {k: v for k, v in m.header.items()
                          if k not in ("backup_id", "entries", "segments", "version")}
                self.engine._put_manifest(self.c, backup_id, builder, header, new.name)
        except DataError:
            if not manifest_exists(self.c, backup_id):
                return None  # deleted meanwhile
            raise
        took = time.monotonic() - self.started
        lost = prune.lost_references(self.engine, self.c, self.cfg, names, took, took)
        if lost or lost is None:
            # Only a put that returned after the deadline gets here, and only when another
            # collection condemned one of its packs in that window. Nobody has read this
            # version: it goes, and the one it was made from stays in use.
            log.warning("repacking in %s: the new manifest version of backup %s was put "
                        "after a pause of %.0f s and may name packs deleted meanwhile; "
                        "removed uncommitted, the previous version stands",
                        self.container, backup_id, took)
            self.c.delete(new.name)
            return None
        self.c.put(new.commit_name, b"")
        if self.c.head(record_object(backup_id)) is None:
            # Deleted while rewritten: the new version must not bring the backup back (a
            # listing may not show it yet, so it is named; a delete that came after this
            # check and missed it in a lagging listing leaves it to the next collection).
            self.c.delete(new.commit_name)
            self.c.delete(new.name)
            prune.discard(self.c, backup_id)
            return set()
        self.superseded.append((backup_id, new, older))
        return names

    def _drop_superseded(self) -> None:
        """Delete the versions the round's new ones supersede, once listings show the new
        ones (a reader that found neither the old versions nor the new one in its listing
        would find no manifest at all). Waits for that up to store_lag, at most a few
        seconds; a slower listing leaves them to a later collection (prune._tidy)."""
        until = time.monotonic() + min(self.engine.config.store_lag, 5.0)
        while self.superseded:
            shown = group_manifests(self.c.list("manifests/"))
            waiting = []
            for backup_id, new, older in self.superseded:
                listed = shown.get(backup_id)
                if listed is None or new not in listed.versions or new not in listed.commits:
                    waiting.append((backup_id, new, older))
                    continue
                for v in older:  # a reader still streaming one reads on from `new`
                    if v.generation:
                        self.c.delete(v.commit_name)
                    self.c.delete(v.name)
            self.superseded = waiting
            if not waiting or time.monotonic() >= until:
                return
            time.sleep(0.05)

    def _moved_entries(self, m: ManifestReader, builder) -> tuple[set[bytes], bool]:
        names: set[bytes] = set()
        moved = False
        for raw in m.raw_segments():
            if entry_packs(raw) & self.copied_from:
                buf = bytearray(raw)
                for i in range(len(raw) // _ENTRY):
                    idx, bid, pack, off, ln, codec = MANIFEST_ENTRY.unpack_from(raw, i * _ENTRY)
                    if pack not in self.copied_from:
                        continue
                    row = self.db.execute("SELECT new, new_off FROM moved WHERE pack = ? "
                                          "AND off = ?", (pack, off)).fetchone()
                    if row is not None:
                        MANIFEST_ENTRY.pack_into(buf, i * _ENTRY, idx, bid, row[0], row[1],
                                                 ln, codec)
                        moved = True
                raw = bytes(buf)
            names |= entry_packs(raw)
            builder.add_raw(raw)
        return names, moved


def _runs(rows: list[tuple]) -> Iterator[tuple[int, int, list[tuple]]]:
    """Group (off, len, ...) rows sorted by offset into range GETs of at most _RUN_MAX."""
    run: list[tuple] = []
    start = end = 0
    for row in rows:
        off, ln = row[0], row[1]
        if run and (off + ln - start > _RUN_MAX or off < end):
            yield start, end, run
            run = []
        if not run:
            start = off
        run.append(row)
        end = max(end, off + ln)
    if run:
        yield start, end, run
