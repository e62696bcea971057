"""Raw volumes' change tracking as an engine Source: the writes the data API recorded since
the parent backup are the source's changed extents, so an incremental reads only them,
and anything done to the file behind the service's back makes it read everything."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from blockvault.engine import Engine, EngineConfig
from blockvault.store.local import LocalBackend
from blockvault.volume.backends import Disk, Parent, RawDriver

GiB = 1024**3
BS = 32 * 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def setup(tmp_path: Path):
    driver = RawDriver("rawfile", {}, data_dir=tmp_path)
    engine = Engine(LocalBackend(tmp_path / "store"), tmp_path / "cache",
                    EngineConfig(block_size=BS, gc_grace=30, store_lag=1))
    vid = "11111111-2222-3333-4444-555555555555"
    driver.files.create(vid, 1)
    # data spread over the volume, so a whole read would read far more than the writes
    driver.files.write(vid, 0, [os.urandom(4 * 1024 * 1024)])
    driver.files.write(vid, 512 * 1024 * 1024, [os.urandom(4 * 1024 * 1024)])
    return driver, engine, vid, Disk(volume_id=vid, size=GiB)


def backup(driver: RawDriver, engine: Engine, disk: Disk, bid: str,
           parent: str | None) -> int:
    """Back ``disk`` up as ``bid`` the way the service does; returns the bytes read."""
    with driver.open_backup(disk, Parent(parent) if parent else None) as opened:
        engine.backup(container="c", backup_id=bid, source=opened.source, size=disk.size,
                      parent_id=parent)
        opened.finish()
        opened.committed(bid)
        return opened.source.bytes_read


def restored(engine: Engine, bid: str, tmp_path: Path) -> str:
    out = tmp_path / f"restore-{bid}"
    out.touch()
    engine.restore(container="c", backup_id=bid, target=out, target_is_new=True)
    return sha256(out)


def test_incremental_reads_only_tracked_writes(setup, tmp_path: Path) -> None:
    driver, engine, vid, disk = setup
    assert backup(driver, engine, disk, "full", None) >= 8 * 1024 * 1024
    # two small writes through the data path, one unaligned across a block boundary
    driver.files.write(vid, 3 * BS + 100, [b"x" * BS])
    driver.files.write(vid, 700 * 1024 * 1024, [b"y" * 10])
    read = backup(driver, engine, disk, "inc", "full")
    assert read == 3 * BS  # two blocks for the first write, one for the second
    assert restored(engine, "inc", tmp_path) == sha256(driver.files.volume_path(vid))


def test_write_behind_the_service_reads_everything(setup, tmp_path: Path) -> None:
    driver, engine, vid, disk = setup
    backup(driver, engine, disk, "full", None)
    path = driver.files.volume_path(vid)
    with open(path, "r+b") as f:  # not through the data API: the map cannot know
        f.seek(600 * 1024 * 1024)
        f.write(b"z" * 5000)
    read = backup(driver, engine, disk, "inc", "full")
    assert read >= 8 * 1024 * 1024  # every allocated region read again
    assert restored(engine, "inc", tmp_path) == sha256(path)


def test_tracking_is_relative_to_the_parent(setup) -> None:
    driver, engine, vid, disk = setup
    backup(driver, engine, disk, "full", None)
    driver.files.write(vid, 0, [b"a" * BS])
    backup(driver, engine, disk, "inc1", "full")
    # the map now counts from inc1: an incremental against the older full cannot use it
    opened = driver.open_backup(disk, Parent("full"))
    assert opened.source.changed_extents() is None
    opened = driver.open_backup(disk, Parent("inc1"))
    assert opened.source.changed_extents() == []
