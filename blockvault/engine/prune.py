"""Prune: delete a backup's objects, and collect the packs no backup references any more.

Collection is two-phase (docs/format.md, "Garbage collection"): a pack found unreferenced
and older than the grace period is *condemned* (a mark object names it); a later collection,
at least the grace period after the mark, deletes it if it is still unreferenced. Backups
never deduplicate against condemned packs, publish what they use while they run, and check
their finished manifest against the marks (``lost_references``), so no timing of locks,
listings or clocks lets a collection delete what a backup references. All times are the
store's clock.

A collection also repacks (``blockvault.engine.repack``): packs only partly referenced have
their live blobs copied into new packs, the manifests pointed at the copies, and are then
condemned like any other garbage.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

from blockvault.engine import repack as repacking
from blockvault.engine.errors import EngineError
from blockvault.engine.format import (
    ContainerConfig,
    ManifestReader,
    ManifestVersion,
    ManifestVersions,
    entry_packs,
    group_manifests,
    manifest_object,
    manifest_versions,
    pack_object,
    record_object,
)
from blockvault.engine.marks import read_live_refs, read_marks, write_mark
from blockvault.store import Container, ObjectInfo

if TYPE_CHECKING:
    from blockvault.engine.engine import Engine

log = logging.getLogger(__name__)

def discard(c: Container, backup_id: str) -> None:
    """Remove a backup's manifest (every version of it) and record. Its packs become
    garbage for a collection."""
    listed = manifest_versions(c, backup_id)
    for v in sorted(listed.versions | listed.commits, reverse=True):
        if v.generation:
            c.delete(v.commit_name)
            c.delete(v.name)
    c.delete(manifest_object(backup_id))
    c.delete(record_object(backup_id))


def lost_references(engine: Engine, c: Container, cfg: ContainerConfig,
                    referenced: Iterable[bytes], elapsed: float,
                    max_gap: float) -> set[bytes] | None:
    """Of the packs a manifest just written references, those a collection may delete
    without having seen that manifest (docs/format.md, "Why a backup is safe"). Call after
    the manifest's put returned. ``elapsed``: seconds since the writer synced its index
    (or read its source manifest); ``max_gap``: the longest it went without a visible
    reason for collections to keep its packs (a published reference list).

    Returns None when that cannot be told any more (the writer was paused so long that
    the marks it would have to check may be gone): the caller starts over."""
    grace, lag = engine.config.gc_grace, engine.config.store_lag
    if max_gap < grace - 2 * lag:
        return set()  # its manifest or a reference list was visible to every collection
    if elapsed >= 2 * grace - lag:
        return None
    ref = set(referenced)
    now = c.clock()
    found: set[bytes] = set()
    for mark in read_marks(c, cfg.crypto):
        # Only a mark made before now + lag - grace can be swept before this manifest is
        # visible; all such marks were written more than lag ago, so the listing shows
        # them, and none is deleted before 2 * grace after it was made.
        if mark.time < now + lag - grace:
            found |= ref & mark.packs
    return found


def collect_garbage(engine: Engine, container: str, c: Container,
                    repack: bool = True) -> bool:
    """Sweep marks older than the grace period, condemn what is newly unreferenced, then
    repack partly referenced packs (docs/format.md, "Repacking"). With ``repack`` False
    (a delete, which should not wait for copying) a repack that is due only makes the
    result False, so that the service collects again later.

    A mark's packs are deleted by the collections from ``gc_grace`` to ``2 * gc_grace -
    store_lag`` after the mark (those still unreferenced); the mark itself stays until
    ``2 * gc_grace``, so that a backup's index sync and end check still see it after its
    packs are gone — also for the ``store_lag`` a listing may still show a deleted pack.

    Returns True when nothing waits for a later collection (no mark pending, no young
    unreferenced pack), False when one is due ``gc_grace`` seconds from now. Raises
    EngineError when a manifest cannot be read: nothing is deleted then, since what it
    references is unknown."""
    cfg = engine._config(c, container, create=False)
    if cfg is None:
        return True  # nothing was ever backed up here
    grace = engine.config.gc_grace
    now = c.clock()
    ref = sqlite3.connect("")  # private temporary database: bounded memory
    live = repacking.LiveBlobs() if engine.config.repack else None
    try:
        ref.execute("CREATE TABLE ref (pack BLOB PRIMARY KEY) WITHOUT ROWID")
        tidied = _referenced(c, cfg, container, ref, live, now, grace, engine.config.store_lag)
        # Reference lists of running backups count as references while they are fresh.
        in_use = set(read_live_refs(c, cfg.crypto, now, grace))
        ref.executemany("INSERT OR IGNORE INTO ref VALUES (?)", ((p,) for p in in_use))

        def unreferenced(pack: bytes) -> bool:
            return ref.execute("SELECT 1 FROM ref WHERE pack = ?", (pack,)).fetchone() is None

        waiting = tidied  # packs only deleted versions named: garbage for the next one
        condemned: set[bytes] = set()
        for mark in read_marks(c, cfg.crypto):
            age = now - mark.time
            if age >= 2 * grace:
                c.delete(mark.name)  # swept by collections for a whole grace period
                continue
            waiting = True
            condemned |= mark.packs
            # Not in the last store_lag of the mark's life: a listing may show a pack for
            # that long after its delete, and once the mark is gone an index sync would
            # take a pack so listed for one it may deduplicate against. A pack left here
            # is condemned again by a later collection.
            if age < grace or age >= 2 * grace - engine.config.store_lag:
                continue
            for pack in mark.packs:
                obj = pack_object(pack.hex())
                info = c.stat(obj) if unreferenced(pack) else None
                # A pack written after its mark (a v1 pack uploaded again) is not the pack
                # that was found unreferenced.
                if info is not None and info.mtime <= mark.time:
                    c.delete(obj)

        for info in c.list_info("clock/"):  # probes of processes killed mid-probe
            if now - info.mtime >= grace:
                c.delete(info.name)

        fresh = []
        for info in c.list_info("packs/"):
            try:
                pack = bytes.fromhex(info.name.rsplit("/", 1)[-1])
            except ValueError:
                continue
            if len(pack) != 32 or pack in condemned:
                continue
            if not unreferenced(pack):
                if live is not None:
                    live.add_listed(info, pack)
                continue
            if now - info.mtime < grace:
                waiting = True  # perhaps a running backup's, not referenced yet
                continue
            fresh.append(pack)
        if fresh:
            write_mark(c, cfg.crypto, fresh)
            log.info("garbage collection in %s condemned %d unreferenced packs",
                     container, len(fresh))
            waiting = True
        if live is not None:
            # Packs a running backup uses may hold blobs no manifest names yet: not judged.
            # Nor packs a manifest names that no round rewrites (of a backup without a
            # record): copied, they would stay named, and be copied again every round.
            excluded = condemned | set(fresh) | in_use | live.unmovable
            chosen = repacking.plan(engine, live, now, excluded)
            if chosen and (not repack or repacking.repack(engine, container, c, cfg, live,
                                                          chosen, excluded)):
                waiting = True  # a repack is due, or its old packs are condemned now
        return not waiting
    finally:
        ref.close()
        if live is not None:
            live.close()


def _referenced(c: Container, cfg: ContainerConfig, container: str,
                ref: sqlite3.Connection, live: repacking.LiveBlobs | None,
                now: float, grace: float, lag: float) -> bool:
    """Every pack some listed manifest version names goes into ``ref`` — committed or not,
    current or superseded: a version is read until it is deleted. ``live`` gets the blobs of
    each backup's newest committed version, the one repacking rewrites. Then, all of them
    read, superseded versions are deleted (docs/format.md, "Manifest versions"): True if
    any was (what only they named is garbage for the next collection)."""
    infos = {i.name: i for i in c.list_info("manifests/")}
    groups = group_manifests(infos)
    # Repacking rewrites only finished backups' manifests (with a record: see
    # repack.Round.rewrite); a record a lagging listing does not show yet only defers it.
    recorded = ({n[len("records/"):] for n in c.list("records/")} if live is not None
                else set())
    current: dict[str, ManifestVersion | None] = {}
    for bid, listed in groups.items():
        committed = listed.committed()
        current[bid] = committed[0] if committed else None
        for v in sorted(listed.versions, reverse=True):
            try:
                m = ManifestReader(c, bid, cfg.crypto, container, v.name)
                for raw in m.raw_segments():
                    ref.executemany("INSERT OR IGNORE INTO ref VALUES (?)",
                                    ((p,) for p in entry_packs(raw)))
                    if live is None:
                        continue
                    if bid not in recorded:
                        live.unmovable |= entry_packs(raw)
                    elif v == current[bid]:
                        live.add_segment(bid, m, raw)
            except EngineError as e:  # corrupt, unknown version, sealed with another key
                if c.stat(v.name) is None:
                    continue  # deleted meanwhile: its packs are garbage too
                raise EngineError(
                    f"garbage collection in {container} stopped, nothing deleted: {e}") from e
    tidied = False
    for bid, listed in groups.items():
        tidied |= _tidy(c, bid, listed, current[bid], infos, now, grace, lag)
    return tidied


def _tidy(c: Container, bid: str, listed: ManifestVersions, current: ManifestVersion | None,
          infos: dict[str, ObjectInfo], now: float, grace: float, lag: float) -> bool:
    """Delete the versions older than the newest committed one once that one's commit is
    store_lag old, so every listing shows it (a repack that committed a newer one deletes
    them itself as soon as its listing shows it, unless it was stopped first or its
    listing lagged), and commits left without their version (a late commit of a version
    already superseded and deleted).

    Repacking writes versions only for backups with a record, and only a delete removes a
    record: versions of a backup without one are what a delete missed in a listing that
    did not show them yet, and go too (version 0 stays: it may be a running backup's)."""
    later = {v for v in listed.versions | listed.commits if v.generation}
    if later and c.head(record_object(bid)) is None:
        for v in sorted(later, reverse=True):
            c.delete(v.commit_name)
            c.delete(v.name)
        return True
    tidied = False
    committed = infos.get(current.commit_name) if current and current.generation else None
    if committed is not None and now - committed.mtime >= lag:
        for v in listed.versions | listed.commits:
            if v < current:
                if v.generation:
                    c.delete(v.commit_name)
                c.delete(v.name)
                tidied = True
    for v in listed.commits - listed.versions:
        info = infos.get(v.commit_name)
        if info is not None and now - info.mtime >= grace:
            c.delete(v.commit_name)
    return tidied
