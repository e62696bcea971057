"""Backup engine tests: real sparse files, a real local store, byte-exact round trips."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blockvault.engine import (
    Cancelled,
    DataError,
    Engine,
    EngineConfig,
    EngineError,
    FormatError,
    KeyMismatch,
)
from blockvault.engine.format import ManifestReader
from blockvault.store.local import LocalBackend

MiB = 1024 * 1024
BS = 32768


def sha256_of(path: Path, size: int | None = None) -> str:
    """sha256 of the first ``size`` bytes of ``path`` (zero-padded past its end)."""
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while size is None or done < size:
            want = 4 * MiB if size is None else min(4 * MiB, size - done)
            b = f.read(want)
            if not b:
                break
            h.update(b)
            done += len(b)
    if size is not None and done < size:
        left = size - done
        while left:
            n = min(left, 4 * MiB)
            h.update(bytes(n))
            left -= n
    return h.hexdigest()


def text(n: int, seed: int) -> bytes:
    """Compressible text in which every 4 KiB block is distinct."""
    rnd = random.Random(seed)
    words = [
        bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 9))) for _ in range(500)
    ]
    base = b" ".join(rnd.choices(words, k=60_000))
    out = bytearray()
    i = 0
    while len(out) < n:
        a = (i * 7919) % (len(base) - 3000)
        out += b"<%d:%d>" % (seed, i) + base[a : a + 3000]
        i += 1
    return bytes(out[:n])


def make_volume(path: Path, size: int = 48 * MiB, seed: int = 1) -> Path:
    """A sparse file with holes, explicit zero runs, compressible and random data and an
    unaligned tail."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(text(300_000, seed))  # unaligned end
        f.seek(3 * MiB)
        f.write(rnd.randbytes(2 * MiB))
        f.seek(8 * MiB)
        f.write(bytes(2 * MiB))  # allocated zeros
        f.seek(12 * MiB + 1234)
        f.write(text(777_777, seed + 1))
        f.seek(20 * MiB)
        f.write(rnd.randbytes(100_000) + bytes(200_000) + rnd.randbytes(50_000))
        f.seek(size - 5000)
        f.write(rnd.randbytes(5000))
        f.truncate(size)
    return path


def new_target(path: Path) -> Path:
    path.touch()
    return path


@pytest.fixture
def store(tmp_path: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "store")


@pytest.fixture
def engine(store: LocalBackend, tmp_path: Path) -> Engine:
    return Engine(store, tmp_path / "cache", EngineConfig(pack_size=1 * MiB, workers=2,
                                                          gc_grace=GRACE, store_lag=0.0))


GRACE = 0.3  # seconds: garbage collection's grace period in these tests


def drain_gc(engine: Engine, container: str = "c") -> None:
    """Collect until nothing waits: condemned packs are deleted a grace period later."""
    for _ in range(60):  # a loaded machine can stretch the grace periods' rounds
        if engine.collect_garbage(container=container):
            return
        time.sleep(GRACE)
    raise AssertionError("garbage collection never finished")


def packs(store: LocalBackend, container: str = "c") -> list[Path]:
    root = store.root / container / "packs"
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp"))


def test_full_backup_round_trip_keeps_holes(
    engine: Engine, store: LocalBackend, tmp_path: Path
) -> None:
    src = make_volume(tmp_path / "vol")
    size = src.stat().st_size
    progress: list[tuple[int, int, str]] = []
    res = engine.backup(
        container="c",
        backup_id="b1",
        source=src,
        size=size,
        progress=lambda d, t, p: progress.append((d, t, p)),
    )
    assert res.logical_bytes == size
    assert res.object_count == len(packs(store)) >= 2
    assert res.new_blocks > 0 and res.zero_blocks > 0
    assert res.new_blocks + res.reused_blocks + res.zero_blocks == -(-size // BS)
    # compressible text is compressed, random data is not inflated
    assert res.stored_bytes < 2 * MiB + 100_000 + 400_000 + 5000 + 300_000
    assert progress[-1] == (size, size, "backup")
    assert engine.has_backup(container="c", backup_id="b1")
    # no mark or reference list outlives the backup (an empty directory the local store
    # leaves behind after deleting a reference list is not an object)
    gc = store.root / "c" / "gc"
    assert not [p for p in gc.rglob("*") if p.is_file()]

    dst = new_target(tmp_path / "restored")
    engine.restore(container="c", backup_id="b1", target=dst, target_is_new=True)
    assert dst.stat().st_size == size
    assert sha256_of(dst) == sha256_of(src)
    # holes and zero runs stay unallocated: well below the source's allocation
    assert dst.stat().st_blocks * 512 < src.stat().st_blocks * 512 - 1 * MiB
    assert engine.verify(container="c", backup_id="b1").ok


def test_restore_over_existing_target_writes_zeros(engine: Engine, tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol", size=24 * MiB + 999)
    size = src.stat().st_size
    engine.backup(container="c", backup_id="b1", source=src, size=size)
    dst = tmp_path / "old"
    with open(dst, "wb") as f:  # a used volume, larger than the backup
        f.write(random.Random(5).randbytes(size + 3 * MiB))
    tail = dst.read_bytes()[size:]
    engine.restore(container="c", backup_id="b1", target=dst, target_is_new=False)
    assert sha256_of(dst, size) == sha256_of(src)
    assert dst.read_bytes()[size:] == tail  # beyond the backup: untouched


def test_size_beyond_and_below_file_length(engine: Engine, tmp_path: Path) -> None:
    src = tmp_path / "vol"
    data = random.Random(3).randbytes(1 * MiB + 100)
    src.write_bytes(data)
    # larger than the file: the rest reads as zeros
    engine.backup(container="c", backup_id="big", source=src, size=5 * MiB)
    dst = new_target(tmp_path / "big.out")
    engine.restore(container="c", backup_id="big", target=dst, target_is_new=True)
    assert dst.stat().st_size == 5 * MiB
    assert sha256_of(dst) == sha256_of(src, 5 * MiB)
    # smaller than the file and not block aligned: bytes past size are not part of it
    engine.backup(container="c", backup_id="small", source=src, size=50_001)
    dst2 = new_target(tmp_path / "small.out")
    engine.restore(container="c", backup_id="small", target=dst2, target_is_new=True)
    assert dst2.read_bytes() == data[:50_001]


def test_incremental_stores_only_changes(engine: Engine, tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol")
    size = src.stat().st_size
    first_digest = sha256_of(src)
    engine.backup(container="c", backup_id="b1", source=src, size=size)
    rnd = random.Random(9)
    touched = set()
    with open(src, "r+b") as f:
        for _ in range(40):
            off = rnd.randrange(0, size - 200)
            f.seek(off)
            f.write(rnd.randbytes(100))
            touched.update({off // BS, (off + 99) // BS})
    res = engine.backup(container="c", backup_id="b2", source=src, size=size, parent_id="b1")
    assert res.new_blocks <= len(touched)
    assert res.new_blocks >= len(touched) - 2  # (a write may land in a block that was data)
    # uploaded: the changed blocks plus a small manifest
    assert res.stored_bytes < len(touched) * BS + 64 * 1024
    for bid, digest in (("b2", sha256_of(src)), ("b1", first_digest)):
        dst = new_target(tmp_path / f"{bid}.out")
        engine.restore(container="c", backup_id=bid, target=dst, target_is_new=True)
        assert sha256_of(dst) == digest
    # every manifest is complete on its own: deleting the parent keeps the child whole
    engine.delete(container="c", backup_id="b1")
    dst = new_target(tmp_path / "b2.again")
    engine.restore(container="c", backup_id="b2", target=dst, target_is_new=True)
    assert sha256_of(dst) == sha256_of(src)
    assert engine.verify(container="c").ok


def test_changed_ranges_read_only_the_hinted_blocks(engine: Engine, tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol")
    size = src.stat().st_size
    engine.backup(container="c", backup_id="b1", source=src, size=size)
    parent = new_target(tmp_path / "b1.out")
    engine.restore(container="c", backup_id="b1", target=parent, target_is_new=True)
    rnd = random.Random(5)
    hinted = [(13 * MiB + 100, 70_000), (3 * MiB, 4096), (size - 3000, 3000),
              (30 * MiB, 200_000)]  # the last one lands in a hole
    with open(src, "r+b") as f:
        for off, n in hinted:
            f.seek(off)
            f.write(rnd.randbytes(n))
        # a change the hint does not cover: a block outside the hint is never read
        f.seek(40 * MiB + 5)
        f.write(b"not in the hint")
        # and a hinted region now all zeros becomes a zero block
        f.seek(8 * MiB - 1 * MiB)
        f.write(bytes(1 * MiB))
    hint = [*hinted, (8 * MiB - 1 * MiB, 1 * MiB)]
    res = engine.backup(container="c", backup_id="b2", source=src, size=size, parent_id="b1",
                        changed=hint)
    hinted_blocks = {i for off, n in hint for i in range(off // BS, -(-(off + n) // BS))}
    assert res.new_blocks <= len(hinted_blocks)
    dst = new_target(tmp_path / "b2.out")
    engine.restore(container="c", backup_id="b2", target=dst, target_is_new=True)
    # hinted blocks hold the source's new data, every other block the parent's
    with open(src, "rb") as fs, open(parent, "rb") as fp, open(dst, "rb") as fd:
        for i in range(-(-size // BS)):
            now, before, got = fs.read(BS), fp.read(BS), fd.read(BS)
            assert got == (now if i in hinted_blocks else before), f"block {i}"
    # so the write outside the hint (into a hole of the parent) is not in b2
    with open(dst, "rb") as f:
        f.seek(40 * MiB + 5)
        assert f.read(15) == bytes(15)
    assert engine.verify(container="c", backup_id="b2").ok


def test_changed_ranges_right_hint_restores_byte_exact(engine: Engine, tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol")
    size = src.stat().st_size
    engine.backup(container="c", backup_id="b1", source=src, size=size)
    rnd = random.Random(11)
    writes = []
    with open(src, "r+b") as f:
        for _ in range(30):
            n = rnd.randrange(1, 300_000)
            off = rnd.randrange(0, size - n)
            data = rnd.randbytes(n) if rnd.random() < 0.5 else text(n, rnd.randrange(1000))
            f.seek(off)
            f.write(data)
            writes.append((off, n))
    full = engine.backup(container="c", backup_id="b2", source=src, size=size, parent_id="b1")
    res = engine.backup(container="c", backup_id="b3", source=src, size=size, parent_id="b1",
                        changed=writes)
    assert res.zero_blocks == full.zero_blocks
    assert res.new_blocks == 0  # b2 already stored every changed block
    for bid in ("b2", "b3"):
        dst = new_target(tmp_path / f"{bid}.out")
        engine.restore(container="c", backup_id=bid, target=dst, target_is_new=True)
        assert sha256_of(dst) == sha256_of(src)


def test_changed_ranges_across_manifest_segments(store: LocalBackend, tmp_path: Path) -> None:
    """Blocks copied unread from a parent whose entries span several manifest segments
    (4096 entries each): hints on, just before and just after segment borders, a hint in
    a hole and one past the last block give the same manifest as a full read."""
    eng = Engine(store, tmp_path / "cache", EngineConfig(block_size=4096, pack_size=2 * MiB))
    bs = 4096
    src = tmp_path / "vol"
    nblocks = 10_000
    size = nblocks * bs
    with open(src, "wb") as f:
        f.truncate(size)
        f.write(text(6000 * bs, 7))
        f.seek(6500 * bs)  # blocks 6000-6499 stay a hole
        f.write(text(3500 * bs, 8))
    eng.backup(container="c", backup_id="b1", source=src, size=size)
    rnd = random.Random(3)
    # Entry i is block i below the hole and block i + 500 above it, so segments end at
    # blocks 4095 and 8691: copies start on the last entry of a segment and reads on the
    # first one.
    writes = [(4094 * bs + 10, 5), (4096 * bs, 1), (8690 * bs, bs), (8692 * bs, 2 * bs),
              (6100 * bs, 2 * bs), (0, 100), ((nblocks - 1) * bs, bs), (5000 * bs, 0)]
    with open(src, "r+b") as f:
        for off, n in writes:
            f.seek(off)
            f.write(rnd.randbytes(n))
    hinted = eng.backup(container="c", backup_id="b2", source=src, size=size,
                        parent_id="b1", changed=[*writes, (size + bs, bs)])
    full = eng.backup(container="c", backup_id="b3", source=src, size=size, parent_id="b1")
    assert hinted.new_blocks == 9  # the written blocks, read and stored once
    assert full.new_blocks == 0  # the full read finds them all stored by b2
    assert hinted.zero_blocks == full.zero_blocks == 498  # two hole blocks were written
    cfg = eng._require_config(store.open("c"), "c")
    entries = {b: list(ManifestReader(store.open("c"), b, cfg.crypto).entries())
               for b in ("b2", "b3")}
    assert entries["b2"] == entries["b3"]
    assert len(entries["b2"]) == nblocks - 498 > 2 * 4096
    dst = new_target(tmp_path / "out")
    eng.restore(container="c", backup_id="b2", target=dst, target_is_new=True)
    assert sha256_of(dst) == sha256_of(src)


def test_changed_ranges_ignored_without_a_usable_parent(engine: Engine, tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol", size=8 * MiB)
    engine.backup(container="c", backup_id="b1", source=src, size=8 * MiB)
    with open(src, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"x" * 5000)
    # parent of another size: the hint is ignored and everything is read
    for bid, parent, size in (("b2", "b1", 9 * MiB), ("b3", "nosuch", 8 * MiB),
                              ("b4", None, 8 * MiB)):
        engine.backup(container="c", backup_id=bid, source=src, size=size, parent_id=parent,
                      changed=[])
        dst = new_target(tmp_path / f"{bid}.out")
        engine.restore(container="c", backup_id=bid, target=dst, target_is_new=True)
        assert sha256_of(dst, size) == sha256_of(src, size)


def test_missing_parent_means_full_backup(engine: Engine, tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol", size=8 * MiB)
    res = engine.backup(container="c", backup_id="b1", source=src, size=8 * MiB, parent_id="nosuch")
    dst = new_target(tmp_path / "out")
    engine.restore(container="c", backup_id="b1", target=dst, target_is_new=True)
    assert sha256_of(dst) == sha256_of(src)
    assert res.new_blocks > 0


def test_dedup_across_volumes_and_rebuilt_cache(store: LocalBackend, tmp_path: Path) -> None:
    e1 = Engine(store, tmp_path / "cache1", EngineConfig(pack_size=4 * MiB))
    a = make_volume(tmp_path / "a", seed=1)
    size = a.stat().st_size
    r1 = e1.backup(container="c", backup_id="a1", source=a, size=size)
    b = tmp_path / "b"
    b.write_bytes(a.read_bytes())
    with open(b, "r+b") as f:
        f.seek(3 * MiB)
        f.write(os.urandom(BS))
    # another host: empty cache, the index is rebuilt from pack trailers
    e2 = Engine(store, tmp_path / "cache2", EngineConfig(pack_size=4 * MiB))
    r2 = e2.backup(container="c", backup_id="b1", source=b, size=size)
    assert r2.new_blocks == 1
    assert r2.reused_blocks == r1.new_blocks + r1.reused_blocks - 1
    assert r2.stored_bytes < BS + 64 * 1024
    for bid, src in (("a1", a), ("b1", b)):
        dst = new_target(tmp_path / f"{bid}.out")
        e1.restore(container="c", backup_id=bid, target=dst, target_is_new=True)
        assert sha256_of(dst) == sha256_of(src)


def test_index_cache_not_checkpointed_at_every_backups_end(
        store: LocalBackend, tmp_path: Path) -> None:
    """The engine holds its index cache open: SQLite's checkpoint and log removal at the
    last connection's close (fsyncs, ~6 ms) no longer end every backup. The cache stays
    valid for whoever opens it next, and is checkpointed when the engine goes."""
    e1 = Engine(store, tmp_path / "cache", EngineConfig(pack_size=4 * MiB))
    a = make_volume(tmp_path / "a", size=8 * MiB, seed=3)
    e1.backup(container="c", backup_id="a1", source=a, size=8 * MiB)
    (wal,) = (tmp_path / "cache").rglob("index.sqlite-wal")
    assert wal.stat().st_size > 0  # the backup's packs, not yet checkpointed
    # another engine on the same cache (another process would be the same): all deduped
    e2 = Engine(store, tmp_path / "cache", EngineConfig(pack_size=4 * MiB))
    r = e2.backup(container="c", backup_id="a2", source=a, size=8 * MiB)
    assert r.new_blocks == 0 and r.reused_blocks > 0
    del e1, e2
    gc.collect()
    assert not wal.exists()  # the last connection's close checkpointed it


def test_duplicate_blocks_within_one_backup(
    engine: Engine, store: LocalBackend, tmp_path: Path
) -> None:
    block = os.urandom(BS)
    src = tmp_path / "vol"
    src.write_bytes(block * 300 + os.urandom(BS) + block * 5)
    size = src.stat().st_size
    res = engine.backup(container="c", backup_id="b1", source=src, size=size)
    assert res.new_blocks == 2
    assert res.reused_blocks == 304
    assert res.stored_bytes < 3 * BS + 16 * 1024
    dst = new_target(tmp_path / "out")
    engine.restore(container="c", backup_id="b1", target=dst, target_is_new=True)
    assert dst.read_bytes() == src.read_bytes()


def test_many_manifest_segments(store: LocalBackend, tmp_path: Path) -> None:
    eng = Engine(store, tmp_path / "cache", EngineConfig(block_size=4096, pack_size=2 * MiB))
    src = tmp_path / "vol"
    src.write_bytes(text(9000 * 4096, 4))  # > 2 segments of 4096 entries
    size = src.stat().st_size
    r1 = eng.backup(container="c", backup_id="b1", source=src, size=size)
    with open(src, "r+b") as f:
        f.seek(8500 * 4096)
        f.write(b"changed")
    r2 = eng.backup(container="c", backup_id="b2", source=src, size=size, parent_id="b1")
    assert r2.new_blocks == 1
    assert r1.new_blocks + r1.reused_blocks == 9000
    dst = new_target(tmp_path / "out")
    eng.restore(container="c", backup_id="b2", target=dst, target_is_new=True)
    assert sha256_of(dst) == sha256_of(src)
    # the container keeps its block size even for an engine configured otherwise
    other = Engine(store, tmp_path / "cache", EngineConfig(block_size=65536))
    r3 = other.backup(container="c", backup_id="b3", source=src, size=size, parent_id="b2")
    assert r3.new_blocks == 0 and r3.reused_blocks == 9000


def test_corrupt_pack_is_detected(engine: Engine, store: LocalBackend, tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol", size=8 * MiB)
    engine.backup(container="c", backup_id="b1", source=src, size=8 * MiB)
    victim = packs(store)[0]
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0xFF
    victim.write_bytes(bytes(raw))
    name = f"packs/{victim.parent.name}/{victim.name}"
    with pytest.raises(DataError) as ei:
        engine.restore(
            container="c", backup_id="b1", target=new_target(tmp_path / "o"), target_is_new=True
        )
    assert ei.value.object_name == name
    assert name in str(ei.value) and "hash check" in str(ei.value)
    rep = engine.verify(container="c", backup_id="b1")
    assert not rep.ok and rep.corrupt == [name] and rep.missing == []
    assert rep.checked_blocks > 0
    assert engine.verify(container="c").corrupt == [name]


def test_missing_pack_is_detected(engine: Engine, store: LocalBackend, tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol", size=16 * MiB)
    engine.backup(container="c", backup_id="b1", source=src, size=16 * MiB)
    victim = packs(store)[-1]
    victim.unlink()
    name = f"packs/{victim.parent.name}/{victim.name}"
    with pytest.raises(DataError) as ei:
        engine.restore(
            container="c", backup_id="b1", target=new_target(tmp_path / "o"), target_is_new=True
        )
    assert ei.value.object_name == name and "missing" in str(ei.value)
    rep = engine.verify(container="c")
    assert rep.missing == [name] and not rep.ok
    # a later backup must not dedup against the vanished pack
    engine.backup(container="c", backup_id="b2", source=src, size=16 * MiB)
    dst = new_target(tmp_path / "o2")
    engine.restore(container="c", backup_id="b2", target=dst, target_is_new=True)
    assert sha256_of(dst) == sha256_of(src)


def test_missing_backup_and_records(engine: Engine, tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol", size=4 * MiB)
    rec = {"id": "b1", "volume_id": "v", "size": 1, "nested": {"a": [1, 2]}}
    engine.backup(container="c", backup_id="b1", source=src, size=4 * MiB, record=rec)
    assert engine.read_record(container="c", backup_id="b1") == rec
    engine.write_record(container="c", backup_id="b1", record={"x": 2})
    assert engine.read_record(container="c", backup_id="b1") == {"x": 2}
    with pytest.raises(DataError) as ei:
        engine.read_record(container="c", backup_id="nope")
    assert ei.value.object_name == "records/nope"
    with pytest.raises(DataError) as ei:
        engine.restore(
            container="c", backup_id="nope", target=new_target(tmp_path / "o"), target_is_new=True
        )
    assert ei.value.object_name == "manifests/nope"
    assert not engine.has_backup(container="c", backup_id="nope")


def test_delete_collects_garbage(engine: Engine, store: LocalBackend, tmp_path: Path) -> None:
    a = make_volume(tmp_path / "a", size=16 * MiB, seed=1)
    b = make_volume(tmp_path / "b", size=16 * MiB, seed=2)
    engine.backup(container="c", backup_id="a1", source=a, size=16 * MiB, record={"a": 1})
    engine.backup(container="c", backup_id="b1", source=b, size=16 * MiB)
    with open(a, "r+b") as f:
        f.write(b"new")
    engine.backup(container="c", backup_id="a2", source=a, size=16 * MiB, parent_id="a1")
    n = len(packs(store))
    engine.delete(container="c", backup_id="a1")
    assert not engine.has_backup(container="c", backup_id="a1")
    with pytest.raises(DataError):
        engine.read_record(container="c", backup_id="a1")
    assert len(packs(store)) <= n
    for bid, src in (("a2", a), ("b1", b)):
        dst = new_target(tmp_path / f"{bid}.out")
        engine.restore(container="c", backup_id=bid, target=dst, target_is_new=True)
        assert sha256_of(dst) == sha256_of(src)
    engine.delete(container="c", backup_id="b1")
    engine.delete(container="c", backup_id="a2")
    engine.delete(container="c", backup_id="a2")  # idempotent
    drain_gc(engine)
    assert packs(store) == []
    assert engine.verify(container="c").ok


def test_cancel_leaves_no_manifest(engine: Engine, store: LocalBackend, tmp_path: Path) -> None:
    src = tmp_path / "vol"
    src.write_bytes(os.urandom(24 * MiB))
    polls = 0

    def cancelled() -> bool:
        nonlocal polls
        polls += 1
        return polls > 3

    with pytest.raises(Cancelled):
        engine.backup(container="c", backup_id="b1", source=src, size=24 * MiB, cancelled=cancelled)
    assert not engine.has_backup(container="c", backup_id="b1")
    assert list(store.open("c").list("gc/")) == []
    # garbage collection removes what the cancelled backup uploaded
    drain_gc(engine)
    assert packs(store) == []
    with pytest.raises(Cancelled):
        engine.backup(
            container="c", backup_id="b2", source=src, size=24 * MiB, cancelled=lambda: True
        )


def test_concurrent_backups_in_threads(store: LocalBackend, tmp_path: Path) -> None:
    eng = Engine(store, tmp_path / "cache", EngineConfig(pack_size=2 * MiB, workers=2))
    vols = [make_volume(tmp_path / f"v{i}", size=12 * MiB, seed=i % 2) for i in range(4)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            eng.backup(
                container="c" if i < 3 else "d", backup_id=f"b{i}", source=vols[i], size=12 * MiB
            )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i in range(4):
        dst = new_target(tmp_path / f"o{i}")
        eng.restore(
            container="c" if i < 3 else "d", backup_id=f"b{i}", target=dst, target_is_new=True
        )
        assert sha256_of(dst) == sha256_of(vols[i])
    assert eng.verify(container="c").ok and eng.verify(container="d").ok


def test_encryption_round_trip_and_wrong_key(store: LocalBackend, tmp_path: Path) -> None:
    key = os.urandom(32)
    eng = Engine(store, tmp_path / "cache", EngineConfig(encryption_key=key, pack_size=2 * MiB,
                                                         gc_grace=GRACE, store_lag=0.0))
    src = make_volume(tmp_path / "vol", size=8 * MiB)
    marker = b"PLAINTEXT-MARKER-" * 100
    with open(src, "r+b") as f:
        f.seek(5 * MiB)
        f.write(marker)
    eng.backup(
        container="c", backup_id="b1", source=src, size=8 * MiB, record={"secret": "volume-name"}
    )
    cfg = json.loads((store.root / "c" / "config").read_bytes())
    assert cfg["encryption"]["cipher"] == "aes-256-gcm" and key.hex() not in json.dumps(cfg)
    for p in (store.root / "c").rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"PLAINTEXT-MARKER" not in data and b"volume-name" not in data
    with open(src, "r+b") as f:
        f.seek(6 * MiB)
        f.write(b"changed")
    r2 = eng.backup(container="c", backup_id="b2", source=src, size=8 * MiB, parent_id="b1")
    assert r2.new_blocks == 1
    dst = new_target(tmp_path / "out")
    eng.restore(container="c", backup_id="b2", target=dst, target_is_new=True)
    assert sha256_of(dst) == sha256_of(src)
    assert eng.read_record(container="c", backup_id="b1") == {"secret": "volume-name"}
    assert eng.verify(container="c").ok

    for bad in (os.urandom(32), None):
        other = Engine(store, tmp_path / "cache", EngineConfig(encryption_key=bad))
        with pytest.raises(KeyMismatch, match="container c is encrypted"):
            other.restore(
                container="c", backup_id="b1", target=new_target(tmp_path / "x"), target_is_new=True
            )
        with pytest.raises(KeyMismatch):
            other.backup(container="c", backup_id="b3", source=src, size=8 * MiB)
        with pytest.raises(KeyMismatch):
            other.read_record(container="c", backup_id="b1")
        with pytest.raises(KeyMismatch):
            other.delete(container="c", backup_id="b1")
    assert eng.has_backup(container="c", backup_id="b1")

    # a tampered blob fails authentication and is reported as corrupt
    victim = packs(store)[-1]
    raw = bytearray(victim.read_bytes())
    raw[20] ^= 1
    victim.write_bytes(bytes(raw))
    assert not eng.verify(container="c").ok
    eng.delete(container="c", backup_id="b1")
    eng.delete(container="c", backup_id="b2")
    drain_gc(eng)
    assert packs(store) == []


_HUGE_SCRIPT = r"""
import os, sys, time
from pathlib import Path
from blockvault.engine import Engine, EngineConfig
from blockvault.store.local import LocalBackend

tmp = Path(sys.argv[1])
MiB = 1024 * 1024
size = 16 * 1024 * MiB
src = tmp / "huge"
with open(src, "wb") as f:
    f.truncate(size)
    for i in range(16):
        f.seek(i * 1024 * MiB + 12345)
        f.write(os.urandom(256 * 1024))
eng = Engine(LocalBackend(tmp / "store"), tmp / "cache", EngineConfig())
t = time.monotonic()
res = eng.backup(container="c", backup_id="b1", source=src, size=size)
took = time.monotonic() - t
assert res.logical_bytes == size and res.new_blocks == 16 * 9, res
dst = tmp / "out"
dst.touch()
eng.restore(container="c", backup_id="b1", target=dst, target_is_new=True)
assert dst.stat().st_size == size and dst.stat().st_blocks * 512 < 16 * MiB
with open(src, "rb") as a, open(dst, "rb") as b:
    for i in range(16):
        a.seek(i * 1024 * MiB)
        b.seek(i * 1024 * MiB)
        assert a.read(32768 * 10) == b.read(32768 * 10)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork+exec.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(took, int(hwm.split()[1]))
"""


def test_huge_sparse_volume_bounded_memory(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _HUGE_SCRIPT, str(tmp_path)],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    took, maxrss_kib = out.stdout.split()
    assert float(took) < 20
    assert int(maxrss_kib) < 256 * 1024


def test_unknown_format_and_corrupt_manifest(engine: Engine, store: LocalBackend,
                                             tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol", size=4 * MiB)
    engine.backup(container="c", backup_id="b1", source=src, size=4 * MiB)
    engine.backup(container="c", backup_id="b2", source=src, size=4 * MiB)
    mpath = store.root / "c" / "manifests" / "b2"
    raw = bytearray(mpath.read_bytes())
    raw[-30] ^= 0x55  # inside the last segment
    mpath.write_bytes(bytes(raw))
    with pytest.raises(DataError) as ei:
        engine.restore(container="c", backup_id="b2", target=new_target(tmp_path / "o"),
                       target_is_new=True)
    assert ei.value.object_name == "manifests/b2"
    rep = engine.verify(container="c")
    assert rep.corrupt == ["manifests/b2"] and rep.checked_blocks > 0
    # GC cannot know what a corrupt manifest references: it deletes nothing
    n = len(packs(store))
    assert engine.delete(container="c", backup_id="b1") is False  # to be collected again
    time.sleep(GRACE)
    with pytest.raises(EngineError, match="nothing deleted"):
        engine.collect_garbage(container="c")
    assert len(packs(store)) == n
    cfg_path = store.root / "c" / "config"
    cfg = json.loads(cfg_path.read_bytes())
    cfg["version"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError):
        engine.backup(container="c", backup_id="b3", source=src, size=4 * MiB)


def test_restore_progress_and_cancel(engine: Engine, tmp_path: Path) -> None:
    src = tmp_path / "vol"
    src.write_bytes(os.urandom(6 * MiB))
    engine.backup(container="c", backup_id="b1", source=src, size=6 * MiB)
    seen: list[tuple[int, int, str]] = []
    dst = new_target(tmp_path / "o")
    engine.restore(container="c", backup_id="b1", target=dst, target_is_new=True,
                   progress=lambda d, t, p: seen.append((d, t, p)))
    assert seen[-1] == (6 * MiB, 6 * MiB, "restore")
    assert dst.read_bytes() == src.read_bytes()
    with pytest.raises(Cancelled):
        engine.restore(container="c", backup_id="b1", target=new_target(tmp_path / "o2"),
                       target_is_new=True, cancelled=lambda: True)


def _backup_in_thread(eng: Engine, bid: str, src: Path) -> tuple[threading.Thread,
                                                                 list[BaseException]]:
    started = threading.Event()
    errors: list[BaseException] = []

    def slow_cancelled() -> bool:
        started.set()
        time.sleep(0.01)  # widen the window in which a concurrent GC runs
        return False

    def run() -> None:
        try:
            eng.backup(container="c", backup_id=bid, source=src, size=src.stat().st_size,
                       cancelled=slow_cancelled)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    started.wait(10)
    return t, errors


def test_delete_during_backup_never_loses_referenced_packs(store: LocalBackend,
                                                           tmp_path: Path) -> None:
    """A backup deduplicating against a backup that is deleted meanwhile stays whole."""
    eng = Engine(store, tmp_path / "cache", EngineConfig(pack_size=1 * MiB))
    src = make_volume(tmp_path / "vol", size=16 * MiB)
    for round_ in range(3):
        eng.backup(container="c", backup_id="old", source=src, size=16 * MiB)
        t, errors = _backup_in_thread(eng, f"new{round_}", src)
        eng.delete(container="c", backup_id="old")
        t.join(60)
        assert not errors
        dst = new_target(tmp_path / f"o{round_}")
        eng.restore(container="c", backup_id=f"new{round_}", target=dst, target_is_new=True)
        assert sha256_of(dst) == sha256_of(src)
    eng.delete(container="c", backup_id="old")  # now nothing runs: garbage goes
    assert eng.verify(container="c").ok


def test_clone_backup_survives_deleting_the_source(tmp_path):
    """An imported copy under a new id keeps its data when the original is deleted."""
    from blockvault.engine import Engine
    from blockvault.store.local import LocalBackend

    src = tmp_path / "vol.raw"
    with open(src, "wb") as f:
        f.truncate(8 * 1024 * 1024)
        f.seek(1024 * 1024)
        f.write(os.urandom(3 * 1024 * 1024))
    engine = Engine(LocalBackend(tmp_path / "store"), tmp_path / "cache",
                    EngineConfig(gc_grace=GRACE, store_lag=0.0))
    engine.backup(container="c", backup_id="orig", source=src, size=src.stat().st_size)
    engine.clone_backup(container="c", source_id="orig", target_id="copy")
    engine.delete(container="c", backup_id="orig")
    out = tmp_path / "out.raw"
    with open(out, "wb") as f:
        f.truncate(src.stat().st_size)
    engine.restore(container="c", backup_id="copy", target=out, target_is_new=True)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    engine.delete(container="c", backup_id="copy")
    drain_gc(engine)
    assert list((tmp_path / "store" / "c").rglob("packs/*/*")) == []


def test_lz4_and_no_compression_round_trip(tmp_path: Path) -> None:
    src = make_volume(tmp_path / "vol")
    stored = {}
    for compression in ("lz4", "none"):
        store = LocalBackend(tmp_path / f"store-{compression}")
        eng = Engine(store, tmp_path / f"cache-{compression}",
                     EngineConfig(compression=compression, workers=2))
        eng.backup(container="c", backup_id="b1", source=src, size=48 * MiB)
        dst = new_target(tmp_path / f"out-{compression}")
        eng.restore(container="c", backup_id="b1", target=dst, target_is_new=True)
        assert sha256_of(dst) == sha256_of(src)
        assert eng.verify(container="c", backup_id="b1").ok
        stored[compression] = sum(p.stat().st_size for p in packs(store))
    assert stored["none"] > 3 * MiB  # the ~3.3 MiB of non-zero data, raw
    assert stored["lz4"] < 0.9 * stored["none"]  # the ~1 MiB of text compresses


def test_batched_zstd_blobs_are_plain_frames(engine: Engine, store: LocalBackend,
                                              tmp_path: Path) -> None:
    """Blocks compressed a read at a time (multi_compress_to_buffer) are still one ordinary
    zstd frame per blob, as format version 1 describes."""
    import zstandard

    from blockvault.engine.crypto import Crypto
    from blockvault.engine.format import CODEC_NONE, CODEC_ZSTD, read_pack_entries

    src = make_volume(tmp_path / "vol", size=8 * MiB)
    engine.backup(container="c", backup_id="b1", source=src, size=8 * MiB)
    c = store.open("c")
    seen = set()
    for p in packs(store):
        data = p.read_bytes()
        for e in read_pack_entries(c, p.name, Crypto(None)):
            blob = data[e.offset : e.offset + e.length]
            seen.add(e.codec)
            if e.codec == CODEC_ZSTD:
                raw = zstandard.ZstdDecompressor().decompress(blob)
                assert len(raw) == BS and e.length < BS
            else:  # incompressible: the raw block (taken from zstd's stored block)
                assert e.codec == CODEC_NONE and e.length == BS
                raw = blob
            assert Crypto(None).block_id(raw) == e.block_id
    assert seen == {CODEC_ZSTD, CODEC_NONE}


def test_corrupt_blob_in_a_batched_run_loses_only_that_block(
        engine: Engine, store: LocalBackend, tmp_path: Path) -> None:
    """Restore/verify decode a run's zstd blobs with one call; one bad blob must fall back to
    block-by-block decoding, so only that block is reported and the rest still check."""
    src = make_volume(tmp_path / "vol", size=8 * MiB)
    engine.backup(container="c", backup_id="b1", source=src, size=8 * MiB)
    total = engine.verify(container="c", backup_id="b1").checked_blocks
    victim = packs(store)[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # inside some blob in the middle of the pack
    victim.write_bytes(bytes(raw))
    rep = engine.verify(container="c", backup_id="b1")
    name = f"packs/{victim.parent.name}/{victim.name}"
    assert rep.corrupt == [name] and rep.checked_blocks == total - 1
    with pytest.raises(DataError) as ei:
        engine.restore(container="c", backup_id="b1", target=new_target(tmp_path / "o"),
                       target_is_new=True)
    assert ei.value.object_name == name and "hash check" in str(ei.value)


def test_zstd_stored_block_is_found_exactly() -> None:
    """Incompressible blocks are taken verbatim out of zstd's frame (no copy): only a frame
    that is exactly one raw block of the whole input qualifies."""
    import zstandard

    from blockvault.engine.codecs import zstd_stored_block as _zstd_stored_block

    plain = zstandard.ZstdCompressor(level=1)
    for size in (4096, BS, 65536, 131072):
        data = random.Random(size).randbytes(size)
        got = _zstd_stored_block(plain.compress(data), size)
        assert got is not None and bytes(got) == data
        assert _zstd_stored_block(plain.compress(data), size // 2) is None
    assert _zstd_stored_block(plain.compress(text(BS, 1)), BS) is None  # compressed block
    big = random.Random(1).randbytes(4 * MiB)  # several blocks: not one raw block
    assert _zstd_stored_block(plain.compress(big), len(big)) is None
    summed = zstandard.ZstdCompressor(level=1, write_checksum=True)
    assert _zstd_stored_block(summed.compress(random.Random(2).randbytes(BS)), BS) is None
    assert _zstd_stored_block(None, BS) is None


def test_two_deployments_creating_one_container_at_once(tmp_path: Path) -> None:
    """Two engines with different keys race to create a container: one config wins, the
    other engine refuses the container (KeyMismatch) and writes no backup there."""
    store = LocalBackend(tmp_path / "store")
    src = make_volume(tmp_path / "vol", size=4 * MiB)
    engines = [Engine(store, tmp_path / f"cache{i}",
                      EngineConfig(encryption_key=bytes([i + 1]) * 32)) for i in range(2)]
    barrier = threading.Barrier(2)
    outcome: dict[int, object] = {}

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcome[i] = engines[i].backup(container="c", backup_id=f"b{i}", source=src,
                                           size=4 * MiB)
        except KeyMismatch as e:
            outcome[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [i for i in range(2) if not isinstance(outcome[i], KeyMismatch)]
    assert len(won) == 1, outcome
    (w,) = won
    dst = new_target(tmp_path / "out")
    engines[w].restore(container="c", backup_id=f"b{w}", target=dst, target_is_new=True)
    assert sha256_of(dst) == sha256_of(src)
    assert not engines[w].has_backup(container="c", backup_id=f"b{1 - w}")


def test_parent_entries_survive_a_nested_take_at_a_segment_end() -> None:
    """An incremental copies the parent's entries of unchanged blocks; one in a bad pack
    (condemned, or gone) is read again from the volume, and that read compares with the
    parent too: a take() nested in the copying one. When the bad entry was the last of a
    segment, the nested take moved on to the next segment, and the copying one then
    skipped that whole segment: the backup lost its blocks (zeros on restore), found by
    test_repack's sixty days once superseded manifest versions stayed a while."""
    from blockvault.engine.archiver import ParentEntries
    from blockvault.engine.format import MANIFEST_ENTRY

    def segment(indices: range) -> bytes:
        return b"".join(MANIFEST_ENTRY.pack(i, bytes(32), bytes(32), 0, 1, 0) for i in indices)

    parent = ParentEntries(iter([segment(range(0, 4)), segment(range(4, 8))]))
    seen: list[int] = []
    for raw in parent.take(0, 8):
        for (idx, *_rest) in MANIFEST_ENTRY.iter_unpack(raw):
            seen.append(idx)
            if idx == 3:  # the last of the first segment is re-read: a nested take
                inner = [bytes(r) for r in parent.take(3, 4)]
                assert [e[0] for r in inner for e in MANIFEST_ENTRY.iter_unpack(r)] == [3]
    assert seen == list(range(8))
