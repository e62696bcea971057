"""Garbage collection against the timings that used to lose backups: listings that lag,
backups paused past every grace period, imports racing deletes, lost packs, a worker
clock that is wrong, unreadable directories, a collection that dies half-way.

Every test drives the real engine on a real local store; faults come in at the edge they
come from (tests/faults.py for listing lag, a paused callback for a paused process).
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from blockvault.engine import DataError, Engine, EngineConfig, archiver
from blockvault.engine.marks import read_marks
from blockvault.store import Container, StoreError
from blockvault.store.local import LocalBackend
from tests.faults import LaggingBackend

MiB = 1024 * 1024
GRACE = 1.0
LAG = 0.3


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def volume(path: Path, size: int = 6 * MiB, seed: int = 0) -> Path:
    rnd = __import__("random").Random(seed)
    path.write_bytes(rnd.randbytes(size))
    return path


def restored(engine: Engine, backup_id: str, out: Path, container: str = "c") -> str:
    out.unlink(missing_ok=True)
    out.touch()
    engine.restore(container=container, backup_id=backup_id, target=out, target_is_new=True)
    return sha(out)


def packs(root: Path, container: str = "c") -> set[str]:
    d = root / container / "packs"
    return {p.name for p in d.rglob("*") if p.is_file() and not p.name.startswith(".tmp")}


def engine_on(backend, cache: Path, **kw) -> Engine:
    return Engine(backend, cache, EngineConfig(pack_size=1 * MiB, workers=2, gc_grace=GRACE,
                                               store_lag=LAG, **kw))


def drain(engine: Engine, container: str = "c", rounds: int = 12) -> None:
    for _ in range(rounds):
        if engine.collect_garbage(container=container):
            return
        time.sleep(GRACE / 2)
    raise AssertionError("garbage collection never settled")


class Pause:
    """A ``cancelled`` callback that stops the backup's calling thread at its ``at``-th
    poll until released; with ``whole_process`` (see ``stop_publishing``) its reference
    lists stop too: a process paused (SIGSTOP, a VM migration) mid-backup."""

    def __init__(self, at: int = 3) -> None:
        self.at, self.calls = at, 0
        self.paused, self.go = threading.Event(), threading.Event()

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls == self.at:
            self.paused.set()
            assert self.go.wait(60)
        return False

    def stop_publishing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Hold the backup's reference-list thread while paused, as SIGSTOP would."""
        real = archiver.write_refs

        def write_refs(*args):
            if self.paused.is_set():
                assert self.go.wait(60)
            return real(*args)

        monkeypatch.setattr(archiver, "write_refs", write_refs)


def in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_collection_right_after_a_backup_with_lagging_listings(tmp_path: Path) -> None:
    """Swift-style listings: a collection that cannot see a new manifest yet must not
    delete the old packs it deduplicated against."""
    root = tmp_path / "store"
    eng = engine_on(LaggingBackend(LocalBackend(root), LAG), tmp_path / "cache")
    src = volume(tmp_path / "v")
    eng.backup(container="c", backup_id="old", source=src, size=src.stat().st_size)
    time.sleep(GRACE + LAG)  # its packs are past the grace period
    eng.discard(container="c", backup_id="old")  # unreferenced now, not yet collected
    res = eng.backup(container="c", backup_id="new", source=src, size=src.stat().st_size)
    assert res.new_blocks == 0  # everything deduplicated against the old packs
    eng.collect_garbage(container="c")  # the listing does not show "new" yet
    time.sleep(GRACE + LAG)
    drain(eng)
    assert restored(eng, "new", tmp_path / "o") == sha(src)
    assert eng.verify(container="c").ok


def _paused_backup_over_condemned_packs(tmp_path: Path, pause_for: float,
                                        monkeypatch: pytest.MonkeyPatch | None = None):
    """Back up a volume whose blocks an old backup holds, pause it, delete the old backup
    and collect for ``pause_for`` seconds, resume; the backup's result. With
    ``monkeypatch`` the whole process pauses, reference lists included."""
    root = tmp_path / "store"
    eng = engine_on(LocalBackend(root), tmp_path / "cache")
    src = volume(tmp_path / "v", size=8 * MiB)
    size = src.stat().st_size
    eng.backup(container="c", backup_id="old", source=src, size=size)
    time.sleep(GRACE + 0.1)  # file mtimes are coarse: a margin
    pause = Pause()
    if monkeypatch is not None:
        pause.stop_publishing(monkeypatch)
    t, out = in_thread(lambda: eng.backup(container="c", backup_id="new", source=src,
                                          size=size, cancelled=pause))
    assert pause.paused.wait(30)  # "new" has synced its index and references old packs
    time.sleep((GRACE - 2 * LAG) / 2)  # a reference list is out (unless paused too)
    eng.delete(container="c", backup_id="old")  # condemns them at once (old enough)
    deadline = time.monotonic() + pause_for
    while time.monotonic() < deadline:  # sweeps; with a long pause the marks go too
        eng.collect_garbage(container="c")
        time.sleep(GRACE / 4)
    pause.go.set()
    t.join(60)
    assert out and not isinstance(out[0], BaseException), out
    assert restored(eng, "new", tmp_path / "o") == sha(src)
    assert eng.verify(container="c", backup_id="new").ok
    return out[0]


def test_backup_paused_while_its_packs_are_condemned_and_swept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paused past the sweep but not past the marks: the end check finds the marks."""
    _paused_backup_over_condemned_packs(tmp_path, 1.5 * GRACE, monkeypatch)


def test_backup_paused_past_every_grace_period(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paused so long that the marks are gone too: the backup cannot tell and starts over
    from a fresh index, never reporting success over deleted packs."""
    _paused_backup_over_condemned_packs(tmp_path, 2 * GRACE + 1.0, monkeypatch)


def test_backup_whose_thread_stalls_keeps_its_packs_by_its_lists(tmp_path: Path) -> None:
    """Only the backup's main thread stalls (a slow disk, a loaded host): its reference
    lists keep coming, so collections leave its packs alone and one pass suffices."""
    res = _paused_backup_over_condemned_packs(tmp_path, 2 * GRACE + 1.0)
    assert res.new_blocks == 0  # nothing was read again: its packs were never lost


def test_long_running_backup_keeps_its_packs_by_publishing_them(tmp_path: Path) -> None:
    """A backup slower than the grace period, with collections running all along, keeps
    its own new packs (unreferenced until its manifest exists) and needs no second pass."""
    root = tmp_path / "store"
    eng = engine_on(LocalBackend(root), tmp_path / "cache")
    src = volume(tmp_path / "v", size=8 * MiB)
    size = src.stat().st_size
    eng.backup(container="c", backup_id="old", source=src, size=size)
    with open(src, "r+b") as f:  # half new data, half the old backup's
        f.write(os.urandom(4 * MiB))
    time.sleep(GRACE + 0.1)  # file mtimes are coarse: a margin
    calls = 0

    def slow() -> bool:
        nonlocal calls
        calls += 1
        time.sleep(0.15)  # 8 MiB in 4 MiB reads plus checks: several grace periods
        return False

    stop = threading.Event()
    published: set[str] = set()

    def collector() -> None:
        while not stop.is_set():
            eng.collect_garbage(container="c")
            published.update(p.name for p in (root / "c" / "gc" / "refs").glob("*"))
            time.sleep(0.05)

    t = threading.Thread(target=collector)
    t.start()
    try:
        res = eng.backup(container="c", backup_id="new", source=src, size=size, cancelled=slow)
    finally:
        stop.set()
        t.join()
    assert res.reused_blocks > 0
    assert published  # it did publish reference lists...
    assert not list((root / "c" / "gc" / "refs").glob("*"))  # ...and removed them
    assert restored(eng, "new", tmp_path / "o") == sha(src)
    assert eng.verify(container="c").ok


def test_clone_racing_the_delete_of_its_source(tmp_path: Path) -> None:
    """An import copies a manifest while its source is deleted and collected: the copy is
    refused, never left pointing at deleted packs."""
    root = tmp_path / "store"
    gate = threading.Event()
    reached = threading.Event()

    class SlowManifestPut(LocalBackend):
        def open(self, container: str, create: bool = True) -> Container:
            c = super().open(container, create)
            put_file = c.put_file

            def slow_put_file(name, f, size):  # the copy is paused before it is written
                if name == "manifests/copy":
                    reached.set()
                    assert gate.wait(60)
                put_file(name, f, size)

            c.put_file = slow_put_file  # type: ignore[method-assign]
            return c

    eng = engine_on(SlowManifestPut(root), tmp_path / "cache")
    src = volume(tmp_path / "v")
    eng.backup(container="c", backup_id="orig", source=src, size=src.stat().st_size)
    time.sleep(GRACE + 0.1)  # file mtimes are coarse: a margin
    t, out = in_thread(lambda: eng.clone_backup(container="c", source_id="orig",
                                                target_id="copy"))
    assert reached.wait(30)
    eng.delete(container="c", backup_id="orig")  # condemned now
    time.sleep(GRACE + 0.1)
    eng.collect_garbage(container="c")  # swept: the copy's packs are gone
    gate.set()
    t.join(60)
    assert isinstance(out[0], DataError), out
    assert not eng.has_backup(container="c", backup_id="copy")


@pytest.mark.parametrize("cold_cache", [False, True])
def test_incremental_does_not_carry_a_lost_pack(tmp_path: Path, cold_cache: bool) -> None:
    """A pack of the parent is lost from the store: an incremental that copies the
    parent's entries unread reads those blocks again instead of referencing it."""
    root = tmp_path / "store"
    eng = engine_on(LocalBackend(root), tmp_path / "cache")
    src = volume(tmp_path / "v", size=8 * MiB)
    size = src.stat().st_size
    eng.backup(container="c", backup_id="b1", source=src, size=size)
    victim = sorted((root / "c" / "packs").rglob("*"))[-1]
    assert victim.is_file()
    victim.unlink()
    # A cache keeps packs it uploaded itself for store_lag even when the listing lacks
    # them (Swift lists new objects late); past that, a missing pack is gone.
    time.sleep(LAG)
    with open(src, "r+b") as f:
        f.write(b"changed")
    if cold_cache:  # another host: the index never knew the pack
        eng = engine_on(LocalBackend(root), tmp_path / "cache2")
    eng.backup(container="c", backup_id="b2", source=src, size=size, parent_id="b1",
               changed=[(0, 7)])
    assert restored(eng, "b2", tmp_path / "o") == sha(src)
    assert eng.verify(container="c", backup_id="b2").ok


def test_a_wrong_worker_clock_changes_nothing(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Collections judge ages by the store's clock: a worker two hours ahead does not
    make a running backup's young packs look old."""
    root = tmp_path / "store"
    eng = engine_on(LocalBackend(root), tmp_path / "cache")
    src = volume(tmp_path / "v")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 7200)
    pause = Pause()
    t, out = in_thread(lambda: eng.backup(container="c", backup_id="b", source=src,
                                          size=src.stat().st_size, cancelled=pause))
    assert pause.paused.wait(30)
    before = packs(root)
    # Young packs wait (False), unless the backup's reference list already names every
    # pack it uploaded (True): either way nothing is condemned or deleted.
    eng.collect_garbage(container="c")
    assert before <= packs(root) and not list((root / "c").glob("gc/condemned/*"))
    pause.go.set()
    t.join(60)
    assert restored(eng, "b", tmp_path / "o") == sha(src)


def test_unreadable_manifest_directory_deletes_nothing(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    eng = engine_on(LocalBackend(root), tmp_path / "cache")
    src = volume(tmp_path / "v")
    eng.backup(container="c", backup_id="b", source=src, size=src.stat().st_size)
    time.sleep(GRACE + 0.1)  # file mtimes are coarse: a margin
    before = packs(root)
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("manifests"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(StoreError):
        eng.collect_garbage(container="c")
    monkeypatch.setattr(os, "scandir", real)
    assert packs(root) == before
    assert not list((root / "c").glob("gc/condemned/*"))
    assert restored(eng, "b", tmp_path / "o") == sha(src)


def test_a_collection_that_dies_blocks_no_backup(tmp_path: Path) -> None:
    """A collection killed half-way (here: its store fails mid-sweep) leaves nothing a
    backup waits for; the next collection finishes the job."""
    root = tmp_path / "store"

    class FailingDeletes(LocalBackend):
        fail = False

        def open(self, container: str, create: bool = True) -> Container:
            c = super().open(container, create)
            delete = c.delete

            def failing_delete(name):
                if FailingDeletes.fail and name.startswith("packs/"):
                    raise StoreError("store went away")
                delete(name)

            c.delete = failing_delete  # type: ignore[method-assign]
            return c

    eng = engine_on(FailingDeletes(root), tmp_path / "cache")
    a, b = volume(tmp_path / "a", seed=1), volume(tmp_path / "b", seed=2)
    eng.backup(container="c", backup_id="a", source=a, size=a.stat().st_size)
    time.sleep(GRACE + 0.1)  # file mtimes are coarse: a margin
    eng.delete(container="c", backup_id="a")  # condemned
    time.sleep(GRACE + 0.1)  # file mtimes are coarse: a margin
    FailingDeletes.fail = True
    with pytest.raises(StoreError):
        eng.collect_garbage(container="c")
    FailingDeletes.fail = False
    started = time.monotonic()
    eng.backup(container="c", backup_id="b", source=b, size=b.stat().st_size)
    assert time.monotonic() - started < 10
    drain(eng)
    assert restored(eng, "b", tmp_path / "o") == sha(b)
    assert eng.verify(container="c").ok
    assert packs(root) and len(packs(root)) <= 10  # a's packs are gone


def test_deleted_backups_are_collected_and_everything_else_kept(tmp_path: Path) -> None:
    root = tmp_path / "store"
    eng = engine_on(LaggingBackend(LocalBackend(root), LAG), tmp_path / "cache")
    vols = {n: volume(tmp_path / n, seed=i) for i, n in enumerate("abc")}
    for n, v in vols.items():
        eng.backup(container="c", backup_id=n, source=v, size=v.stat().st_size)
    keep = packs(root)
    eng.delete(container="c", backup_id="b")
    time.sleep(GRACE + LAG)
    drain(eng)
    assert packs(root) < keep  # b's own packs went
    for n in "ac":
        assert restored(eng, n, tmp_path / "o") == sha(vols[n])
    assert not list((root / "c").glob("gc/refs/*"))


def test_packs_not_listed_yet_are_not_taken_for_gone(tmp_path: Path) -> None:
    """Swift lists new objects late: a backup right after another must still deduplicate
    against the packs that one just uploaded, and must not fail its end check on them."""
    root = tmp_path / "store"
    eng = engine_on(LaggingBackend(LocalBackend(root), LAG), tmp_path / "cache")
    src = volume(tmp_path / "v")
    size = src.stat().st_size
    first = eng.backup(container="c", backup_id="a", source=src, size=size)
    again = eng.backup(container="c", backup_id="b", source=src, size=size)
    assert first.new_blocks > 0 and again.new_blocks == 0
    assert restored(eng, "b", tmp_path / "o") == sha(src)


def test_a_pack_swept_late_is_not_offered_after_its_mark_is_gone(tmp_path: Path) -> None:
    """A sweep late in its mark's life, then the mark's removal, then a backup whose index
    cache predates the mark: the listing still shows the swept pack (it lags deletes by
    up to store_lag), and without the mark nothing says it is gone. Sweeps stop store_lag
    before marks go, so the pack is either still there or no longer listed."""
    grace, lag = 4.0, 1.5
    root = tmp_path / "store"
    backend = LaggingBackend(LocalBackend(root), lag)
    eng = Engine(backend, tmp_path / "cache", EngineConfig(
        pack_size=1 * MiB, workers=2, gc_grace=grace, store_lag=lag))
    src = volume(tmp_path / "v")
    size = src.stat().st_size
    eng.backup(container="c", backup_id="a", source=src, size=size)  # the cache learns P
    eng.delete(container="c", backup_id="a")
    time.sleep(grace + 0.1)
    eng.collect_garbage(container="c")  # condemns a's packs
    time.sleep(lag)  # the mark is listed
    c = backend.open("c", create=False)
    crypto = eng._config(c, "c", create=False).crypto
    (mark,) = read_marks(c, crypto)

    def at_age(age: float) -> None:
        time.sleep(max(0.0, mark.time + age - c.clock()))

    at_age(2 * grace - lag + 0.4)  # late in the mark's life: a sweep here is the danger
    eng.collect_garbage(container="c")
    at_age(2 * grace + 0.05)
    eng.collect_garbage(container="c")  # the mark goes
    assert not read_marks(c, crypto)
    eng.backup(container="c", backup_id="b", source=src, size=size)  # dedups if it may
    assert restored(eng, "b", tmp_path / "o") == sha(src)
