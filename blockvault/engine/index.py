"""The container-wide dedup index: a local SQLite cache of every pack's trailer.

The store is the truth; the cache only saves reading trailers again. ``sync`` lists
``packs/``, reads the trailers of packs it has not seen (range GETs of footer+trailer) and
drops packs that no longer exist, so an entry in the cache always names a pack that was
present at the last sync and not condemned by garbage collection: a backup never
deduplicates against a pack that a collection is about to delete. Each backup opens its own
connection (WAL mode), so concurrent backups in threads or processes can share one file.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blockvault.engine.crypto import Crypto
from blockvault.engine.errors import Cancelled, DataError, FormatError
from blockvault.engine.format import PackEntry, read_pack_entries
from blockvault.engine.marks import read_marks
from blockvault.store import Container, StoreError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (name BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    id BLOB NOT NULL, pack BLOB NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, codec INTEGER NOT NULL,
    PRIMARY KEY (id, pack)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_pack ON blobs (pack);
CREATE TABLE IF NOT EXISTS condemned (name BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uploaded (name BLOB PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
"""


class Index:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._connect(path)
        except sqlite3.DatabaseError as e:
            # Only a cache: a damaged file is thrown away and rebuilt from pack trailers.
            log.warning("index cache %s unusable (%s); rebuilding it", path, e)
            for suffix in ("", "-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            self.db = self._connect(path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # A cache rebuilt from the store needs no durability, but it must stay
            # consistent across a power loss: with synchronous=OFF a torn write could leave
            # rows naming the wrong pack or offset. NORMAL in WAL mode syncs only at
            # checkpoints, so it costs next to nothing here.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM packs").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def hold_open(path: Path) -> sqlite3.Connection | None:
        """A connection to the cache at ``path`` that only stays open (no transaction, so
        it never holds a checkpoint back), or None if it cannot be opened.

        SQLite checkpoints a WAL database and removes its log, with fsyncs, when the last
        connection to it closes: each backup's own connections were the last, ~6 ms at the
        end of every backup that added packs. With one held open, checkpoints happen as the
        log grows (every 1000 pages), in whichever commit crosses that."""
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("SELECT count(*) FROM packs").fetchall()  # joins the WAL index
        except sqlite3.Error as e:
            log.debug("index cache %s not held open: %s", path, e)
            return None
        return db

    # Pack names are stored as their 32 raw bytes (half the size of hex: inserts into a
    # B-tree keyed by random ids dirty many pages, so row size matters).
    def lookup(self, block_id: bytes) -> tuple[bytes, int, int, int] | None:
        return self.db.execute(
            "SELECT pack, offset, length, codec FROM blobs WHERE id = ? LIMIT 1", (block_id,)
        ).fetchone()

    def lookup_many(self, ids: list[bytes]) -> dict[bytes, tuple[bytes, int, int, int]]:
        """Batch lookup: one statement per few hundred ids instead of one per id."""
        out: dict[bytes, tuple[bytes, int, int, int]] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = ("SELECT id, pack, offset, length, codec FROM blobs WHERE id IN ("
                 + ",".join("?" * len(part)) + ")")
            for bid, pack, off, ln, codec in self.db.execute(q, part):
                out.setdefault(bid, (pack, off, ln, codec))
        return out

    def add_pack(self, name: bytes, entries: list[tuple[bytes, int, int, int]]) -> None:
        """Record an uploaded pack: entries are (block id, offset, length, codec)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            # One statement for the whole pack: executemany would release and re-take the
            # GIL once per row, which stalls behind the hashing/compressing threads.
            db.execute(
                "INSERT OR IGNORE INTO blobs (id, pack, offset, length, codec) "
                "SELECT substr(?1, key * 32 + 1, 32), ?2, value ->> 0, value ->> 1, "
                "value ->> 2 FROM json_each(?3)",
                (b"".join(e[0] for e in entries), name,
                 json.dumps([[off, ln, codec] for _bid, off, ln, codec in entries])),
            )
            db.execute("INSERT OR IGNORE INTO packs (name) VALUES (?)", (name,))
            db.execute("INSERT OR REPLACE INTO uploaded VALUES (?, ?)", (name, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def condemn(self, names: Iterable[bytes]) -> None:
        """Stop offering ``names`` for dedup at once (marks a running backup saw after its
        sync); the next sync replaces the set with the marks it reads."""
        rows = [(n,) for n in names]
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR IGNORE INTO condemned VALUES (?)", rows)
            db.executemany("DELETE FROM blobs WHERE pack = ?", rows)
            db.executemany("DELETE FROM packs WHERE name = ?", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def known(self, names: Iterable[bytes]) -> set[bytes]:
        """Which of ``names`` the cache holds (listed at the last sync or added since, and
        not condemned)."""
        names = list(names)
        out: set[bytes] = set()
        for i in range(0, len(names), 500):
            part = names[i : i + 500]
            q = "SELECT name FROM packs WHERE name IN (" + ",".join("?" * len(part)) + ")"
            out.update(r[0] for r in self.db.execute(q, part))
        return out

    def sync(self, c: Container, crypto: Crypto, concurrency: int,
             cancelled: Callable[[], bool] | None = None,
             lag: float = 0.0) -> frozenset[bytes]:
        """Bring the cache up to the store's listing and condemnations. Returns the packs
        known to be unusable: condemned, or cached before and gone from the store now.

        A pack uploaded through this cache less than ``lag`` seconds ago may be missing from
        the listing (Swift's lag behind writes): it is kept, not taken for gone. No
        collection can have deleted it (collections leave packs younger than their grace
        period alone); a pack the store lost is dropped by a later sync."""
        db = self.db
        condemned = frozenset().union(*(m.packs for m in read_marks(c, crypto)))
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM condemned")
            db.executemany("INSERT INTO condemned VALUES (?)", ((p,) for p in condemned))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("CREATE TEMP TABLE IF NOT EXISTS listed (name BLOB PRIMARY KEY) WITHOUT ROWID")
        db.execute("DELETE FROM listed")
        batch: list[tuple[bytes]] = []
        db.execute("BEGIN")
        try:
            for obj in c.list("packs/"):
                try:
                    name = bytes.fromhex(obj.rsplit("/", 1)[-1])
                except ValueError:
                    continue
                if len(name) == 32:
                    batch.append((name,))
                if len(batch) >= 10000:
                    db.executemany("INSERT OR IGNORE INTO listed VALUES (?)", batch)
                    batch = []
            db.executemany("INSERT OR IGNORE INTO listed VALUES (?)", batch)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

        db.execute("DELETE FROM uploaded WHERE at < ?", (time.time() - lag,))
        gone = [r[0] for r in db.execute(
            "SELECT name FROM packs WHERE name NOT IN (SELECT name FROM listed) "
            "AND name NOT IN (SELECT name FROM uploaded) "
            "OR name IN (SELECT name FROM condemned)")]
        if gone:
            db.execute("BEGIN IMMEDIATE")
            for name in gone:
                db.execute("DELETE FROM blobs WHERE pack = ?", (name,))
                db.execute("DELETE FROM packs WHERE name = ?", (name,))
            db.execute("COMMIT")

        def fetch(name: bytes) -> tuple[bytes, list[PackEntry] | None]:
            try:
                return name, read_pack_entries(c, name.hex(), crypto)
            except (DataError, FormatError, StoreError) as e:
                # An unreadable pack is never used for dedup; it stays out of the cache and
                # is retried at the next sync.
                log.warning("skipping pack %s while syncing the index: %s", name, e)
                return name, None

        last = b""
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            while True:
                names = [r[0] for r in db.execute(
                    "SELECT name FROM listed WHERE name > ? AND name NOT IN "
                    "(SELECT name FROM packs) AND name NOT IN (SELECT name FROM condemned) "
                    "ORDER BY name LIMIT 256", (last,))]
                if not names:
                    break
                if cancelled is not None and cancelled():
                    raise Cancelled("backup cancelled while syncing the index")
                last = names[-1]
                for name, entries in pool.map(fetch, names):
                    if entries is not None:
                        self.add_pack(name, [(e.block_id, e.offset, e.length, e.codec)
                                             for e in entries])
        db.execute("DELETE FROM listed")
        return condemned | frozenset(gone)
