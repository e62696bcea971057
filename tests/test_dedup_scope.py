"""Dedup scopes: a project's backups never deduplicate against another project's blocks
(so counts, sizes and timings reveal nothing about other tenants' data), a single-tenant
deployment can dedup container-wide, and backups written before scopes existed still
restore, verify and serve as parents.

Real files, a real local store; byte-exactness is checked with hashes of the data.

``tests/data/prescope/`` is a store written by the engine before scopes (commit ee7b9f6),
made with ``PYTHONPATH=<that checkout> python tests/test_dedup_scope.py <dir>`` (the
``make_prescope`` function below, which uses only the engine API both versions share).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import blake3
import pytest

from blockvault.engine import Engine, EngineConfig

MiB = 1024 * 1024
BS = 32768
SIZE = 2 * MiB - 1234  # an unaligned tail
KEY = bytes(range(32))
PRESCOPE = Path(__file__).parent / "data" / "prescope"


def volume_bytes(seed: int) -> bytes:
    """Compressible distinct blocks, incompressible blocks, a block repeated, holes and an
    unaligned tail: the same bytes for a seed on every run (random.Random is stable)."""
    rnd = random.Random(seed)
    out = bytearray(SIZE)
    for i in range(16):
        out[i * BS : (i + 1) * BS] = (b"block %d of volume %d; " % (i, seed) * 2000)[:BS]
    out[MiB : MiB + 2 * BS] = rnd.randbytes(2 * BS)
    out[3 * MiB // 2 : 3 * MiB // 2 + BS] = out[:BS]
    out[SIZE - 5000 :] = rnd.randbytes(5000)
    return bytes(out)


def changed(data: bytes) -> bytes:
    """``data`` with one data block rewritten and one hole filled (an incremental's
    worth)."""
    out = bytearray(data)
    out[3 * BS : 4 * BS] = b"rewritten " * (BS // 10) + b"x" * (BS % 10)
    out[40 * BS : 41 * BS] = random.Random(99).randbytes(BS)
    return bytes(out)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_prescope(root: Path) -> None:
    """Write the pre-scope fixture with whatever engine is importable (the old one)."""
    from blockvault.store.local import LocalBackend

    root.mkdir(parents=True, exist_ok=True)
    work = root.parent / "prescope-work"
    work.mkdir(exist_ok=True)
    store = LocalBackend(root / "store")
    v1, v2 = volume_bytes(1), changed(volume_bytes(1))
    src = write(work / "v1", v1)
    for container, key in (("plain", None), ("sealed", KEY)):
        eng = Engine(store, work / f"cache-{container}",
                     EngineConfig(pack_size=MiB, workers=2, encryption_key=key))
        eng.backup(container=container, backup_id="old-full", source=src, size=SIZE,
                   record={"id": "old-full"})
    write(work / "v2", v2)
    eng = Engine(store, work / "cache-plain", EngineConfig(pack_size=MiB, workers=2))
    eng.backup(container="plain", backup_id="old-inc", source=work / "v2", size=SIZE,
               parent_id="old-full", record={"id": "old-inc"})
    (root / "info.json").write_text(json.dumps(
        {"size": SIZE, "old-full": sha(v1), "old-inc": sha(v2)}, indent=1) + "\n")
    shutil.rmtree(work)


# ---------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path):
    from blockvault.store.local import LocalBackend

    return LocalBackend(tmp_path / "store")


def engine(store, tmp_path: Path, **kw) -> Engine:
    return Engine(store, tmp_path / "cache", EngineConfig(pack_size=MiB, workers=2, **kw))


def restored(eng: Engine, container: str, backup_id: str, tmp_path: Path) -> str:
    target = tmp_path / f"restore-{container}-{backup_id}"
    target.touch()
    eng.restore(container=container, backup_id=backup_id, target=target, target_is_new=True)
    data = target.read_bytes()
    assert len(data) == SIZE
    target.unlink()
    return sha(data)


def pack_bytes(store, container: str = "c") -> int:
    root = store.root / container / "packs"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def verified(eng: Engine, container: str, backup_id: str | None = None) -> int:
    rep = eng.verify(container=container, backup_id=backup_id)
    assert rep.ok, rep
    return rep.checked_blocks


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_projects_never_dedup_against_each_other(store, tmp_path: Path, key) -> None:
    eng = engine(store, tmp_path, encryption_key=key)
    data = volume_bytes(1)
    src = write(tmp_path / "vol", data)
    a = eng.backup(container="c", backup_id="a", source=src, size=SIZE, scope="project-a")
    after_a = pack_bytes(store)
    b = eng.backup(container="c", backup_id="b", source=src, size=SIZE, scope="project-b")
    # The second project stores exactly what the first did: nothing it can observe tells
    # it that the first project holds the same blocks.
    assert a.new_blocks == b.new_blocks > 0 and a.reused_blocks == b.reused_blocks
    assert a.object_count == b.object_count >= 1
    assert pack_bytes(store) - after_a == after_a
    # Its packs are byte for byte as large; the manifests differ only by how zstd packs
    # their (random-looking) ids and pack names, which depend on nothing of project-a.
    manifest = {bid: (store.root / "c" / "manifests" / bid).stat().st_size for bid in "ab"}
    assert a.stored_bytes - manifest["a"] == b.stored_bytes - manifest["b"] == after_a
    # Within a project dedup is whole: a second volume with the same data stores nothing.
    a2 = eng.backup(container="c", backup_id="a2", source=src, size=SIZE, scope="project-a")
    assert a2.new_blocks == 0 and a2.object_count == 0
    assert a2.reused_blocks == a.new_blocks + a.reused_blocks
    for bid in ("a", "b", "a2"):
        assert restored(eng, "c", bid, tmp_path) == sha(data)
        assert verified(eng, "c", bid) == a.new_blocks  # each stored blob checked once
    assert eng.manifest_info(container="c", backup_id="b")["dedup_scope"] == "project-b"
    # The whole container at once: each manifest checked with its own scope's ids.
    assert verified(eng, "c") == a.new_blocks + b.new_blocks


def test_container_scope_dedups_across_projects(store, tmp_path: Path) -> None:
    eng = engine(store, tmp_path, dedup_scope="container")
    data = volume_bytes(2)
    src = write(tmp_path / "vol", data)
    a = eng.backup(container="c", backup_id="a", source=src, size=SIZE, scope="project-a")
    b = eng.backup(container="c", backup_id="b", source=src, size=SIZE, scope="project-b")
    assert a.new_blocks > 0 and b.new_blocks == 0 and b.object_count == 0
    # Container-wide manifests are what engines before scopes wrote: version 1, no scope.
    for bid in ("a", "b"):
        raw = (store.root / "c" / "manifests" / bid).read_bytes()
        assert raw[:4] == b"BVMF" and int.from_bytes(raw[4:6], "little") == 1
        assert eng.manifest_info(container="c", backup_id=bid)["dedup_scope"] is None
        assert restored(eng, "c", bid, tmp_path) == sha(data)
        verified(eng, "c", bid)


def test_scoped_manifest_has_its_own_version(store, tmp_path: Path) -> None:
    """Engines from before scopes refuse a scoped manifest (unknown version) rather than
    check its blocks against container-wide ids and call a valid backup corrupt."""
    eng = engine(store, tmp_path)
    src = write(tmp_path / "vol", volume_bytes(3))
    eng.backup(container="c", backup_id="a", source=src, size=SIZE, scope="p")
    raw = (store.root / "c" / "manifests" / "a").read_bytes()
    assert int.from_bytes(raw[4:6], "little") == 2


def test_scope_ids_are_unrelated_and_keyed_by_the_container_key() -> None:
    from blockvault.engine.crypto import Crypto

    block = volume_bytes(1)[:BS]
    plain, sealed = Crypto(None), Crypto(KEY)
    ids = {
        plain.block_id(block),  # container-wide, unencrypted: plain BLAKE3 as before
        sealed.block_id(block),  # container-wide, encrypted: the block id key as before
        plain.scoped("p1").block_id(block),
        plain.scoped("p2").block_id(block),
        sealed.scoped("p1").block_id(block),  # needs the master key to compute
        Crypto(bytes(32)).scoped("p1").block_id(block),
    }
    assert len(ids) == 6
    assert plain.block_id(block) == blake3.blake3(block).digest()
    assert plain.scoped(None) is plain and plain.scoped("p1").scoped(None) is plain
    assert sealed.scoped("p1").scoped("p2").block_id(block) == sealed.scoped("p2").block_id(
        block)


def test_bad_scope_names_are_refused_before_storing(store, tmp_path: Path) -> None:
    eng = engine(store, tmp_path)
    src = write(tmp_path / "vol", volume_bytes(3))
    for bad in ("", "a\0b", "x" * 256, "\ud800"):
        with pytest.raises(ValueError):
            eng.backup(container="c", backup_id="a", source=src, size=SIZE, scope=bad)
    assert not (store.root / "c").exists()


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_parent_of_another_scope_is_not_reused(store, tmp_path: Path, key) -> None:
    """An incremental whose parent was deduplicated in another scope (the setting changed,
    or the parent was imported from another project) reads the whole volume and stores it
    in its own scope: one manifest never mixes two scopes' ids, and a changed-ranges hint
    against such a parent is ignored."""
    eng = engine(store, tmp_path, encryption_key=key)
    v1 = volume_bytes(4)
    src = write(tmp_path / "vol", v1)
    full = eng.backup(container="c", backup_id="full", source=src, size=SIZE, scope="p1")
    v2 = changed(v1)
    write(src, v2)
    # The hint claims nothing changed: honoured, it would restore v1's bytes.
    inc = eng.backup(container="c", backup_id="inc", source=src, size=SIZE, scope="p2",
                     parent_id="full", changed=[])
    # As a first backup would: all new but the volume's own repeated block (v2 has one
    # data block more than v1).
    assert (inc.new_blocks, inc.reused_blocks) == (full.new_blocks + 1, full.reused_blocks)
    assert restored(eng, "c", "inc", tmp_path) == sha(v2)
    verified(eng, "c", "inc")
    # Same scope: the parent is reused as always.
    inc2 = eng.backup(container="c", backup_id="inc2", source=src, size=SIZE, scope="p2",
                      parent_id="inc")
    assert inc2.new_blocks == 0 and inc2.object_count == 0
    assert restored(eng, "c", "inc2", tmp_path) == sha(v2)


def test_switching_to_container_scope_reads_scoped_parents_whole(store, tmp_path: Path) -> None:
    scoped = engine(store, tmp_path)
    v1 = volume_bytes(5)
    src = write(tmp_path / "vol", v1)
    scoped.backup(container="c", backup_id="full", source=src, size=SIZE, scope="p1")
    wide = Engine(store, tmp_path / "cache", EngineConfig(pack_size=MiB, workers=2,
                                                          dedup_scope="container"))
    first = scoped.backup(container="c", backup_id="first", source=src, size=SIZE, scope="p1")
    inc = wide.backup(container="c", backup_id="inc", source=src, size=SIZE, scope="p1",
                      parent_id="full", changed=[])
    assert first.new_blocks == 0  # (the same scope)
    assert (inc.new_blocks, inc.reused_blocks) == (first.reused_blocks - 1, 1)
    assert inc.object_count >= 1
    assert wide.manifest_info(container="c", backup_id="inc")["dedup_scope"] is None
    for eng in (scoped, wide):  # either setting reads both kinds
        for bid in ("full", "inc"):
            assert restored(eng, "c", bid, tmp_path) == sha(v1)
        verified(eng, "c")


def test_clone_keeps_its_scope(store, tmp_path: Path) -> None:
    """An import (clone_backup) keeps the ids its blocks were stored under; the importing
    project's next incremental on it is a full read into its own scope."""
    eng = engine(store, tmp_path, encryption_key=KEY)
    v1 = volume_bytes(6)
    src = write(tmp_path / "vol", v1)
    eng.backup(container="c", backup_id="src", source=src, size=SIZE, scope="exporter")
    eng.clone_backup(container="c", source_id="src", target_id="imported")
    assert eng.manifest_info(container="c", backup_id="imported")["dedup_scope"] == "exporter"
    eng.delete(container="c", backup_id="src")
    assert restored(eng, "c", "imported", tmp_path) == sha(v1)
    verified(eng, "c", "imported")
    v2 = changed(v1)
    write(src, v2)
    inc = eng.backup(container="c", backup_id="inc", source=src, size=SIZE, scope="importer",
                     parent_id="imported")
    assert inc.reused_blocks == 1  # the volume's own repeated block, nothing of "src"
    assert restored(eng, "c", "inc", tmp_path) == sha(v2)
    verified(eng, "c")


# -- backups written before scopes ------------------------------------------------------


@pytest.fixture
def prescope(tmp_path: Path):
    """A copy of the store the engine before scopes wrote (see the module docstring)."""
    from blockvault.store.local import LocalBackend

    shutil.copytree(PRESCOPE / "store", tmp_path / "store")
    info = json.loads((PRESCOPE / "info.json").read_text())
    assert info["old-full"] == sha(volume_bytes(1))  # the fixture matches its generator
    return LocalBackend(tmp_path / "store"), info


@pytest.mark.parametrize("container,key", [("plain", None), ("sealed", KEY)],
                         ids=["plain", "encrypted"])
def test_prescope_backups_restore_verify_and_serve_as_parents(prescope, tmp_path: Path,
                                                              container, key) -> None:
    store, info = prescope
    eng = engine(store, tmp_path, encryption_key=key)
    assert eng.manifest_info(container=container, backup_id="old-full")["dedup_scope"] is None
    assert restored(eng, container, "old-full", tmp_path) == info["old-full"]
    verified(eng, container, "old-full")
    v2 = changed(volume_bytes(1))
    src = write(tmp_path / "vol", v2)
    # A project-scoped incremental on an old parent: a full read, stored in its scope.
    inc = eng.backup(container=container, backup_id="new-inc", source=src, size=SIZE,
                     parent_id="old-full", scope="p1", changed=[(3 * BS, BS), (40 * BS, BS)])
    assert inc.reused_blocks == 1  # the volume's own repeated block, nothing of old-full
    assert restored(eng, container, "new-inc", tmp_path) == sha(v2)
    # And its own next incremental dedups as usual.
    inc2 = eng.backup(container=container, backup_id="new-inc2", source=src, size=SIZE,
                      parent_id="new-inc", scope="p1", changed=[])
    assert inc2.new_blocks == 0 and inc2.object_count == 0
    assert restored(eng, container, "new-inc2", tmp_path) == sha(v2)
    # A single-tenant deployment keeps deduplicating against the old backups.
    wide = Engine(store, tmp_path / "cache", EngineConfig(pack_size=MiB, workers=2,
                                                          encryption_key=key,
                                                          dedup_scope="container"))
    winc = wide.backup(container=container, backup_id="wide-inc", source=src, size=SIZE,
                       parent_id="old-full", scope="p1", changed=[(3 * BS, BS), (40 * BS, BS)])
    assert winc.new_blocks <= 2 and winc.reused_blocks > 0
    assert restored(wide, container, "wide-inc", tmp_path) == sha(v2)
    # Old and new manifests side by side: verify and garbage collection read them all.
    verified(eng, container)
    eng.collect_garbage(container=container)  # raises if it cannot read a manifest
    eng.delete(container=container, backup_id="old-full")
    assert restored(eng, container, "wide-inc", tmp_path) == sha(v2)
    verified(eng, container)


def test_prescope_incremental_still_restores(prescope, tmp_path: Path) -> None:
    store, info = prescope
    eng = engine(store, tmp_path)
    assert restored(eng, "plain", "old-inc", tmp_path) == info["old-inc"]
    assert eng.read_record(container="plain", backup_id="old-inc") == {"id": "old-inc"}


# -- through the API ---------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["project", "container"])
def test_api_object_count_does_not_reveal_other_projects_data(tmp_path: Path, scope) -> None:
    """Two projects back up volumes holding the same bytes: under the default (project)
    scope the second backup's object_count and size are the first's, so it cannot tell
    the other project holds them; a deployment set to "container" deduplicates them."""
    from tests.server import Server

    env = {} if scope == "project" else {"BLOCKVAULT_DEDUP_SCOPE": "container"}
    srv = Server(tmp_path / "srv", env).start()
    try:
        data = volume_bytes(7)
        got = []
        for project in ("tenant-one", "tenant-two"):
            api = srv.client("alice", project)
            vol = api.create_volume(1)
            api.write(vol, 0, data)
            backup = api.create_backup(vol)
            got.append(api.get(f"/backups/{backup}").json()["backup"])
        one, two = got
        assert one["object_count"] >= 1
        if scope == "project":
            assert two["object_count"] == one["object_count"]
        else:
            assert two["object_count"] == 0
        # and the second project's backup restores byte-exact
        api = srv.client("alice", "tenant-two")
        target = api.restore(two["id"])
        h = hashlib.sha256(data)
        h.update(bytes(1024**3 - len(data)))
        assert api.volume_sha256(target) == h.hexdigest()
    finally:
        srv.stop()


if __name__ == "__main__":
    make_prescope(Path(sys.argv[1]))
