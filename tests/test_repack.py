"""Repacking (docs/format.md, "Repacking"): packs only partly referenced are copied and
freed, every remaining backup restores byte-exact and verifies, whatever runs at the same
time and wherever a collection dies.

Every test drives the real engine on a real local store (with Swift-like lagging listings
where that matters); crashes are real SIGKILLs of a collecting child process.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from blockvault.engine import Engine, EngineConfig
from blockvault.engine.format import ManifestReader
from blockvault.engine.marks import read_marks
from blockvault.service.retention import RetentionPolicy, select_kept
from blockvault.store import Container
from blockvault.store.local import LocalBackend
from tests.faults import LaggingBackend

KiB, MiB = 1024, 1024 * 1024
BS = 4096
GRACE = 1.0
LAG = 0.1
KEY = bytes(range(32))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config(**kw) -> EngineConfig:
    return EngineConfig(block_size=BS, pack_size=256 * KiB, workers=2, gc_grace=GRACE,
                        store_lag=LAG, **{"repack": True, **kw})


def stored(root: Path, container: str = "c") -> int:
    return sum(p.stat().st_size for p in (root / container / "packs").rglob("*")
               if p.is_file() and not p.name.startswith(".tmp"))


def pack_names(root: Path, container: str = "c") -> set[str]:
    return {p.name for p in (root / container / "packs").rglob("*")
            if p.is_file() and not p.name.startswith(".tmp")}


def restored(eng: Engine, backup_id: str, out: Path) -> str:
    out.unlink(missing_ok=True)
    out.touch()
    eng.restore(container="c", backup_id=backup_id, target=out, target_is_new=True)
    return sha(out.read_bytes())


def drain(eng: Engine, rounds: int = 20) -> None:
    for _ in range(rounds):
        if eng.collect_garbage(container="c"):
            return
        time.sleep(GRACE * 1.1)
    raise AssertionError("garbage collection never settled")


class Volume:
    """A volume file whose blocks change at random, remembering what it held."""

    def __init__(self, path: Path, size: int, seed: int = 0) -> None:
        self.path, self.size = path, size
        self.rnd = random.Random(seed)
        self.data = bytearray(self.rnd.randbytes(size))
        path.write_bytes(self.data)

    def change(self, fraction: float) -> list[tuple[int, int]]:
        """Rewrite ``fraction`` of the blocks; the changed byte ranges."""
        blocks = self.rnd.sample(range(self.size // BS), int(self.size // BS * fraction))
        for b in blocks:
            self.data[b * BS : (b + 1) * BS] = self.rnd.randbytes(BS)
        self.path.write_bytes(self.data)
        return [(b * BS, BS) for b in sorted(blocks)]


def three_backups(eng: Engine, tmp_path: Path, size: int = 8 * MiB,
                  scope: str | None = None) -> tuple[Volume, dict[str, str]]:
    """b1 full; b2 with half the blocks rewritten; b3 with a few more. Deleting b1 leaves
    its packs half referenced, by both b2 and b3."""
    vol = Volume(tmp_path / "v", size)
    digests = {}
    parent = None
    for bid, frac in (("b1", 0.0), ("b2", 0.5), ("b3", 0.02)):
        changed = vol.change(frac) if frac else None
        eng.backup(container="c", backup_id=bid, source=vol.path, size=size,
                   parent_id=parent, changed=changed, scope=scope, record={"id": bid})
        digests[bid] = sha(bytes(vol.data))
        parent = bid
    return vol, digests


def manifest_packs(eng: Engine, backup_id: str) -> set[bytes]:
    c = eng.backend.open("c", create=False)
    cfg = eng._require_config(c, "c")
    return {bytes.fromhex(e.pack)
            for e in ManifestReader(c, backup_id, cfg.crypto, "c").entries()}


def condemned(eng: Engine) -> set[bytes]:
    c = eng.backend.open("c", create=False)
    cfg = eng._require_config(c, "c")
    return set().union(*(m.packs for m in read_marks(c, cfg.crypto)))


@pytest.mark.parametrize("encrypted", [False, True])
def test_partly_referenced_packs_are_repacked(tmp_path: Path, encrypted: bool) -> None:
    """Deleting b1 leaves its packs half referenced: the collection the service runs
    after the delete copies what is live, and stored bytes follow the live data. With
    encryption (and a project's dedup scope) the blobs are copied still sealed."""
    root = tmp_path / "store"
    kw = {"encryption_key": KEY} if encrypted else {}
    eng = Engine(LaggingBackend(LocalBackend(root), LAG), tmp_path / "cache", config(**kw))
    vol, digests = three_backups(eng, tmp_path, scope="project-a" if encrypted else None)
    before = stored(root)
    old = pack_names(root)
    time.sleep(GRACE * 1.1)  # the packs are past the grace period
    # The delete itself does not copy, but owes a collection (False).
    assert eng.delete(container="c", backup_id="b1") is False
    assert pack_names(root) == old
    drain(eng)
    after = stored(root)
    live = 8 * MiB  # b2 and b3 share all but 2% of their blocks
    assert after < before * 0.8, (before, after)
    assert after <= 1.2 * (live * 1.02), after
    assert old - pack_names(root), "no old pack was freed"
    for bid in ("b2", "b3"):
        assert restored(eng, bid, tmp_path / "o") == digests[bid]
        assert eng.verify(container="c", backup_id=bid).ok
        assert {p.hex() for p in manifest_packs(eng, bid)} <= pack_names(root)
    if encrypted:  # nothing readable leaked into the copies
        sample = bytes(vol.data[:64])
        assert all(sample not in p.read_bytes()
                   for p in (root / "c" / "packs").rglob("*") if p.is_file())
    assert eng.verify(container="c").ok


def test_nothing_to_repack_leaves_the_container_alone(tmp_path: Path) -> None:
    """Packs that are all live (or nearly) are never copied: no churn."""
    root = tmp_path / "store"
    eng = Engine(LocalBackend(root), tmp_path / "cache", config())
    vol = Volume(tmp_path / "v", 4 * MiB)
    eng.backup(container="c", backup_id="b1", source=vol.path, size=vol.size,
               record={"id": "b1"})
    vol.change(0.02)
    eng.backup(container="c", backup_id="b2", source=vol.path, size=vol.size, parent_id="b1",
               record={"id": "b2"})
    before = pack_names(root)
    time.sleep(GRACE * 1.1)
    assert eng.collect_garbage(container="c") is True
    assert pack_names(root) == before


@pytest.mark.parametrize("running", [("b3",), ("b2", "b3")])
def test_packs_of_backups_without_a_record_are_left_alone(tmp_path: Path,
                                                          running: tuple[str, ...]) -> None:
    """Only finished backups' manifests are rewritten (a backup writes its record last).
    Packs that a manifest without a record (a running backup's, debris of a killed one)
    names are not copied: the copies could never replace them there, so the copying is
    wasted, and every round would copy them again (collections then never settled: the
    soak test, when its backups had no records)."""
    root = tmp_path / "store"
    eng = Engine(LocalBackend(root), tmp_path / "cache", config())
    _vol, digests = three_backups(eng, tmp_path)
    c = eng.backend.open("c", create=False)
    for bid in running:  # as if still running; b1's packs are named by b2 and b3
        c.delete(f"records/{bid}")
    time.sleep(GRACE * 1.1)
    before = pack_names(root)
    eng.delete(container="c", backup_id="b1")
    drain(eng)
    assert pack_names(root) <= before  # nothing copied
    for bid in ("b2", "b3"):
        assert restored(eng, bid, tmp_path / "o") == digests[bid]


class GatedGets(LocalBackend):
    """A store whose pack GETs (of engines built on it) wait at ``gate`` once ``armed``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.armed, self.reached, self.gate = False, threading.Event(), threading.Event()

    def open(self, container: str, create: bool = True) -> Container:
        c = super().open(container, create)
        get = c.get

        def gated(name: str, offset: int = 0, length: int | None = None) -> bytes:
            if self.armed and name.startswith("packs/"):
                self.reached.set()
                assert self.gate.wait(60)
            return get(name, offset, length)

        c.get = gated  # type: ignore[method-assign]
        return c


def test_restore_running_during_a_repack(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore that read the manifest before the repack rewrote it still finds the old
    packs (condemned, not swept before the grace period); its manifest, rewritten under
    it, is read on from the new version (small read windows make it span many GETs)."""
    from blockvault.engine import format as fmt

    monkeypatch.setattr(fmt._RangeReader.__init__, "__defaults__", (16 * KiB,))
    reopened: list[int] = []
    real_reopen = fmt.ManifestReader._reopen

    def reopen(self, seq: int) -> None:
        reopened.append(seq)
        real_reopen(self, seq)

    monkeypatch.setattr(fmt.ManifestReader, "_reopen", reopen)
    root = tmp_path / "store"
    eng = Engine(LocalBackend(root), tmp_path / "cache", config())
    size = 40 * MiB  # 10240 entries: three manifest segments
    _vol, digests = three_backups(eng, tmp_path, size=size)
    time.sleep(GRACE * 1.1)
    eng.delete(container="c", backup_id="b1")
    gated = GatedGets(root)
    reader = Engine(gated, tmp_path / "cache-r", config())
    gated.armed = True
    out = tmp_path / "o"
    out.touch()
    result: list = []

    def restore() -> None:
        try:
            reader.restore(container="c", backup_id="b2", target=out, target_is_new=True)
            result.append(sha(out.read_bytes()))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=restore)
    t.start()
    assert gated.reached.wait(30)  # it streams the old manifest and waits on a pack
    old = manifest_packs(eng, "b2")
    assert eng.collect_garbage(container="c") is False  # repacked: b2 rewritten
    assert manifest_packs(eng, "b2") != old
    assert condemned(eng) & old  # old packs condemned, still there
    gated.gate.set()
    t.join(120)
    assert result == [digests["b2"]]
    assert reopened  # it did read on from the rewritten manifest
    drain(eng)
    assert restored(eng, "b2", tmp_path / "o2") == digests["b2"]
    assert restored(eng, "b3", tmp_path / "o3") == digests["b3"]


class Pause:
    """A ``cancelled`` callback stopping a backup at its 2nd poll (after its index sync)."""

    def __init__(self) -> None:
        self.calls = 0
        self.paused, self.go = threading.Event(), threading.Event()

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls == 2:
            self.paused.set()
            assert self.go.wait(60)
        return False


def test_backup_running_during_a_repack(tmp_path: Path) -> None:
    """A backup that synced its index before the repack deduplicates against packs the
    repack then condemns: it finishes, and its data survives every later sweep."""
    root = tmp_path / "store"
    eng = Engine(LocalBackend(root), tmp_path / "cache", config())
    vol, digests = three_backups(eng, tmp_path)
    time.sleep(GRACE * 1.1)
    eng.delete(container="c", backup_id="b1")
    pause = Pause()
    out: list = []
    t = threading.Thread(target=lambda: out.append(eng.backup(
        container="c", backup_id="b4", source=vol.path, size=vol.size, cancelled=pause,
        record={"id": "b4"})))
    t.start()
    assert pause.paused.wait(30)
    assert eng.collect_garbage(container="c") is False  # repacked under the backup
    marked = condemned(eng)
    assert marked
    deadline = time.monotonic() + 2.5 * GRACE  # sweeps run while it is paused
    while time.monotonic() < deadline:
        eng.collect_garbage(container="c")
        time.sleep(GRACE / 4)
    pause.go.set()
    t.join(60)
    assert out and out[0].new_blocks == 0
    drain(eng)
    for bid in ("b2", "b3", "b4"):
        want = digests["b3"] if bid == "b4" else digests[bid]
        assert restored(eng, bid, tmp_path / "o") == want
    assert eng.verify(container="c").ok


def test_packs_condemned_by_a_repack_are_not_deduplicated_against(tmp_path: Path) -> None:
    """Between the repack's mark and its sweep, a new backup of the same data uses the
    copies, never the condemned packs."""
    root = tmp_path / "store"
    eng = Engine(LocalBackend(root), tmp_path / "cache", config())
    vol, digests = three_backups(eng, tmp_path)
    time.sleep(GRACE * 1.1)
    eng.delete(container="c", backup_id="b1")
    assert eng.collect_garbage(container="c") is False
    marked = condemned(eng)
    assert marked
    # Another host too: its index is built from the store, not from this one's cache.
    for n, cache in (("b4", tmp_path / "cache"), ("b5", tmp_path / "cache-2")):
        other = Engine(LocalBackend(root), cache, config())
        res = other.backup(container="c", backup_id=n, source=vol.path, size=vol.size,
                           record={"id": n})
        assert res.new_blocks == 0  # all found, in the copies
        assert not manifest_packs(other, n) & marked
    drain(eng)
    for bid in ("b3", "b4", "b5"):
        assert restored(eng, bid, tmp_path / "o") == digests["b3"]


class PausedManifestPut(LocalBackend):
    """A store whose first manifest upload (of engines built on it) stops until ``go``: a
    process paused inside the put (SIGSTOP, a frozen VM), for as long as the test likes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reached, self.go = threading.Event(), threading.Event()

    def open(self, container: str, create: bool = True) -> Container:
        c = super().open(container, create)
        put_file = c.put_file

        def paused(name: str, f, size: int) -> None:
            if name.startswith("manifests/") and not self.reached.is_set():
                self.reached.set()
                assert self.go.wait(60)
            put_file(name, f, size)

        c.put_file = paused  # type: ignore[method-assign]
        return c


def test_a_rewrite_paused_in_its_put_never_names_a_swept_pack(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes repack at once, each its own half of b1's old packs (both halves
    named by b2). A's put of b2's rewritten manifest stalls; meanwhile B rewrites b2 without
    B's half, condemns that half, and a sweep a grace period later deletes it. Then A's put
    lands, holding b2's entries in B's half as A read them. Written over the manifest (as
    before manifest versions), b2 then named deleted packs (docs/format.md, "Repacking",
    the soak test's seed 3513336388); as a new version it is found unsafe and never
    committed: b2 restores byte-exact from B's version."""
    from blockvault.engine import repack as repacking

    root = tmp_path / "store"
    eng = Engine(LocalBackend(root), tmp_path / "cache", config())
    _vol, digests = three_backups(eng, tmp_path)
    time.sleep(GRACE * 1.1)
    eng.delete(container="c", backup_id="b1")
    b2_packs = manifest_packs(eng, "b2")
    paused = PausedManifestPut(root)
    a = Engine(paused, tmp_path / "cache-a", config())
    b = Engine(LocalBackend(root), tmp_path / "cache-b", config())
    real_plan = repacking.plan
    halves: dict[int, set[bytes]] = {}

    def plan(engine: Engine, live, now: float, excluded: set[bytes]) -> list[bytes]:
        # Both would choose the same packs (the plan is deterministic); give each process
        # its own half of those b2 names, so that each rewrite keeps the other's half.
        chosen = sorted(set(real_plan(engine, live, now, excluded)) & b2_packs)
        if not halves:
            halves[id(a)], halves[id(b)] = set(chosen[::2]), set(chosen[1::2])
        return sorted(halves.get(id(engine), set()) & set(chosen))

    monkeypatch.setattr(repacking, "plan", plan)
    errors: list[BaseException] = []

    def collect_a() -> None:
        try:
            a.collect_garbage(container="c")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=collect_a)
    t.start()
    assert paused.reached.wait(60)  # A copied its half and is inside b2's put
    assert halves[id(a)] and halves[id(b)]
    b.collect_garbage(container="c")  # B rewrites b2 and b3 and condemns its half
    swept_half = {p.hex() for p in halves[id(b)]}
    assert halves[id(b)] <= condemned(eng)
    deadline = time.monotonic() + 3 * GRACE  # then a sweep deletes B's half
    while swept_half & pack_names(root) and time.monotonic() < deadline:
        time.sleep(GRACE / 4)
        b.collect_garbage(container="c")
    assert not swept_half & pack_names(root), "the sweep never came"
    paused.go.set()  # A's put lands, long after its deadline
    t.join(60)
    for bid in ("b2", "b3"):
        assert restored(eng, bid, tmp_path / "o") == digests[bid]
    assert not errors, errors
    versions = sorted(p.name for p in (root / "c" / "manifests").iterdir()
                      if p.name.startswith("b2"))
    # B's committed version only: A's was removed uncommitted.
    assert len(versions) == 2 and versions[1] == versions[0] + ".ok", versions
    assert not {p.hex() for p in manifest_packs(eng, "b2")} & swept_half
    assert eng.verify(container="c").ok
    drain(eng)
    for bid in ("b2", "b3"):
        assert restored(eng, bid, tmp_path / "o") == digests[bid]
    assert eng.verify(container="c").ok


def test_a_version_a_delete_did_not_list_is_removed_by_the_next_collection(
        tmp_path: Path) -> None:
    """A repack commits a new version of b2's manifest; b2 is deleted before the listing
    shows that version, so the delete removes version 0 and the record but not it. The
    next collection removes it (versions exist only for backups with a record, and only a
    delete removes one): b2 is gone for good and its data is freed."""
    root = tmp_path / "store"
    frozen: list[float] = []  # the listing's clock stops while the round and delete run
    lagging = LaggingBackend(LocalBackend(root), LAG,
                             clock=lambda: frozen[0] if frozen else time.monotonic())
    eng = Engine(lagging, tmp_path / "cache", config())
    _vol, digests = three_backups(eng, tmp_path)
    time.sleep(GRACE * 1.1)
    eng.delete(container="c", backup_id="b1")
    time.sleep(LAG * 1.1)
    frozen.append(time.monotonic())
    assert eng.collect_garbage(container="c") is False  # b2 and b3 get new versions
    eng.discard(container="c", backup_id="b2")  # its listing does not show b2's version
    frozen.clear()
    time.sleep(LAG * 1.1)  # now it does
    assert eng.has_backup(container="c", backup_id="b2")  # a leftover, without its record
    eng.collect_garbage(container="c")
    assert not eng.has_backup(container="c", backup_id="b2")
    assert not [p for p in (root / "c" / "manifests").iterdir() if p.name.startswith("b2")]
    drain(eng)
    assert restored(eng, "b3", tmp_path / "o") == digests["b3"]
    assert eng.verify(container="c").ok


_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from blockvault.engine import Engine, EngineConfig
    from blockvault.store.local import LocalBackend

    root, cache, method, prefix, nth = sys.argv[1:6]
    calls = 0

    class Dying(LocalBackend):
        def open(self, container, create=True):
            c = super().open(container, create)
            real = getattr(c, method)

            def dying(name, *args, **kw):
                global calls
                if name.startswith(prefix):
                    calls += 1
                    if calls == int(nth):
                        os.kill(os.getpid(), signal.SIGKILL)
                return real(name, *args, **kw)

            setattr(c, method, dying)
            return c

    cfg = EngineConfig(block_size=4096, pack_size=256 * 1024, workers=2, gc_grace=%r,
                       store_lag=%r, repack=True)
    Engine(Dying(Path(root)), Path(cache), cfg).collect_garbage(container="c")
    print("finished")
""") % (GRACE, LAG)


@pytest.mark.parametrize("step", [
    ("put", "packs/", 1),  # copying: the first new pack
    ("put", "packs/", 2),  # copying: between two new packs
    ("put_file", "manifests/", 1),  # copied, no manifest rewritten
    ("put_file", "manifests/", 2),  # one manifest rewritten, the other not
    ("put", "manifests/", 1),  # a new version put, not committed
    ("delete", "manifests/", 1),  # committed, the old version not yet removed
    ("put", "gc/condemned/", 1),  # every manifest rewritten, nothing condemned
    ("delete", "packs/", 1),  # the sweep, a grace period later
], ids=lambda s: f"{s[0]}-{s[1].rstrip('/').replace('/', '-')}-{s[2]}")
def test_a_collection_killed_at_any_step_of_a_repack(tmp_path: Path,
                                                     step: tuple[str, str, int]) -> None:
    """SIGKILL a collecting process at each step of a repack: every backup still restores
    and verifies, and the next collections finish the work."""
    root = tmp_path / "store"
    eng = Engine(LocalBackend(root), tmp_path / "cache", config())
    _vol, digests = three_backups(eng, tmp_path)
    before = stored(root)
    time.sleep(GRACE * 1.1)
    eng.delete(container="c", backup_id="b1")
    method, prefix, nth = step
    if (method, prefix) == ("delete", "packs/"):  # the round completes; kill its sweep
        assert eng.collect_garbage(container="c") is False
        time.sleep(GRACE * 1.1)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), str(tmp_path / "cache"), method, prefix,
         str(nth)], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[1])
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    for bid in ("b2", "b3"):  # right after the crash
        assert restored(eng, bid, tmp_path / "o") == digests[bid]
    assert eng.verify(container="c").ok
    drain(eng)
    for bid in ("b2", "b3"):
        assert restored(eng, bid, tmp_path / "o") == digests[bid]
    assert eng.verify(container="c").ok
    assert stored(root) < before * 0.8
    assert not list((root / "c" / "gc" / "condemned").glob("*"))


def test_sixty_days_of_retention_follow_the_live_data(tmp_path: Path) -> None:
    """60 simulated days of daily backups of a volume changing 2% a day, pruned to
    keep-daily 7 + keep-weekly 4: stored bytes end within 1.2x the stored size of the
    kept backups' distinct blocks."""
    root = tmp_path / "store"
    eng = Engine(LocalBackend(root), tmp_path / "cache", config())
    vol = Volume(tmp_path / "v", 32 * MiB, seed=7)
    policy = RetentionPolicy(keep_daily=7, keep_weekly=4)
    day0 = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.UTC)
    backups: list[tuple[str, dt.datetime]] = []
    digests: dict[str, str] = {}
    for day in range(60):
        started = time.monotonic()
        bid = f"day{day:02d}"
        parent = backups[-1][0] if backups else None
        changed = vol.change(0.02) if parent else None
        eng.backup(container="c", backup_id=bid, source=vol.path, size=vol.size,
                   parent_id=parent, changed=changed, record={"id": bid})
        digests[bid] = sha(bytes(vol.data))
        backups.append((bid, day0 + dt.timedelta(days=day)))
        kept = set(select_kept(backups, policy))
        for old, _when in [b for b in backups if b[0] not in kept]:
            eng.delete(container="c", backup_id=old)
        backups = [b for b in backups if b[0] in kept]
        eng.collect_garbage(container="c")
        time.sleep(max(0.0, GRACE * 1.1 - (time.monotonic() - started)))  # a day > grace
    drain(eng)
    distinct: dict[bytes, int] = {}
    c = eng.backend.open("c", create=False)
    cfg = eng._require_config(c, "c")
    for bid, _when in backups:
        for e in ManifestReader(c, bid, cfg.crypto, "c").entries():
            distinct[e.block_id] = e.length
    live = sum(distinct.values())
    total = stored(root)
    assert total <= 1.2 * live, (total, live, total / live)
    assert 7 <= len(backups) <= 11
    for bid, _when in backups[:: 3] + backups[-1:]:
        assert restored(eng, bid, tmp_path / "o") == digests[bid]
    assert eng.verify(container="c").ok

