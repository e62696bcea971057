"""blockvault reads backups that Cinder itself wrote (blockvault/engine/cinder.py).

The data is real: the module fixture runs tools/cinder/make-cinder-backups.sh, which drives
Cinder's own, unmodified PosixBackupDriver (the ``cinder`` package from PyPI, in a cached
venv) on image files: per codec (zlib, zstd, bz2, none) a full backup and two incrementals
whose writes are unaligned, cross an object boundary, turn data into zeros and touch the
volume's last block; bz2's chain lies in Cinder's default per-backup containers
(``ab/cd/<id>``), the others in a named container. Every test works on its own copy of
Cinder's ``backup_posix_path``, read through blockvault's local store.

Without the cinder venv (no network to PyPI, say) the tests skip, except under CI
(``CI`` set), where that is a failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from blockvault.engine import cinder
from blockvault.engine.errors import DataError, FormatError
from blockvault.engine.restorer import FileTarget
from blockvault.store.base import Container, ObjectInfo
from blockvault.store.local import LocalBackend
from tests.cinder import written_by_cinder

ALGORITHMS = ("zlib", "zstd", "bz2", "none")
STEPS = ("full", "inc1", "inc2")


@pytest.fixture(scope="module")
def cinder_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return written_by_cinder(tmp_path_factory.mktemp("cinder-written"))


@pytest.fixture
def tree(cinder_data: dict, tmp_path: Path) -> Path:
    """A private copy of Cinder's backup_posix_path (tests corrupt and delete objects)."""
    dst = tmp_path / "posix"
    shutil.copytree(cinder_data["backup_posix_path"], dst)
    return dst


def record(cinder_data: dict, algo: str, step: str) -> dict:
    return cinder_data["chains"][algo][STEPS.index(step)]


def backup_of(root: Container, rec: dict) -> cinder.CinderBackup:
    """The backup as part 2 will know it: from its exported record's container + prefix."""
    row = json.loads(base64.b64decode(rec["record"]["backup_url"]))
    return cinder.read_backup(root, row["service_metadata"], row["container"] + "/")


def restore_to_file(root: Container, chain: list[cinder.CinderBackup], path: Path,
                    **kw) -> list[str]:
    if not path.exists():
        path.touch()
    return cinder.restore_chain(root, chain, FileTarget(path), **kw)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


class CountingContainer(Container):
    """A store container that records every get (name, offset, bytes returned)."""

    def __init__(self, inner: Container) -> None:
        self.inner = inner
        self.name = inner.name
        self.gets: list[tuple[str, int, int]] = []

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(name, offset, length)
        self.gets.append((name, offset, len(data)))
        return data

    def put(self, name: str, data: bytes | memoryview) -> None:
        raise AssertionError("a restore must not write to the store")

    def put_file(self, name: str, f: BinaryIO, size: int) -> None:
        raise AssertionError("a restore must not write to the store")

    def head(self, name: str) -> int | None:
        return self.inner.head(name)

    def delete(self, name: str) -> None:
        raise AssertionError("a restore must not delete from the store")

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list_info(prefix)

    def stat(self, name: str) -> ObjectInfo | None:
        return self.inner.stat(name)


class RecordingTarget(FileTarget):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes: list[tuple[int, int]] = []

    def write(self, bufs: list, offset: int) -> None:
        self.writes.append((offset, sum(len(b) for b in bufs)))
        super().write(bufs, offset)


# -- what Cinder wrote ---------------------------------------------------------------------

def test_cinder_wrote_what_the_tests_need(cinder_data: dict) -> None:
    """The fixture's data has the shapes the reader must handle: several objects per
    backup, per-object compression (compressible and incompressible objects in one backup),
    incrementals holding only some blocks, Cinder's nested default containers."""
    assert cinder_data["cinder_version"].startswith("29.")
    root = cinder.posix_tree(cinder_data["backup_posix_path"])
    for algo in ALGORITHMS:
        full, inc1, inc2 = (backup_of(root, record(cinder_data, algo, s)) for s in STEPS)
        assert len(full.objects) > 8 and full.objects[0].offset == 0
        codecs = {o.compression for o in full.objects}
        assert codecs == ({"none"} if algo == "none" else {algo, "none"})
        assert inc1.parent_id == full.id and inc2.parent_id == inc1.id
        assert 0 < len(inc1.objects) < len(full.objects)
        # the write across the boundary of two data objects became two objects
        bs = cinder_data["file_size"]
        assert any(o.offset + o.length == 2 * bs for o in inc1.objects)
        assert any(o.offset == 2 * bs for o in inc1.objects)
        # the last block changed in both incrementals
        assert inc1.end == inc2.end == full.end == record(cinder_data, algo, "full")[
            "image_size"]
        assert full.volume_meta and inc2.volume_meta  # Cinder's volume metadata came along
    bz2 = backup_of(root, record(cinder_data, "bz2", "full"))
    assert bz2.container == f"{bz2.id[0:2]}/{bz2.id[2:4]}/{bz2.id}"


# -- discovery -----------------------------------------------------------------------------

def test_discover_finds_every_backup_in_chain_order(cinder_data: dict, tree: Path) -> None:
    problems: list[tuple[str, str]] = []
    found = cinder.discover(cinder.posix_tree(tree), nested=True,
                            on_problem=lambda n, r: problems.append((n, r)))
    assert problems == []
    by_id = {b.id: b for b in found}
    order = [b.id for b in found]
    recs = [r for algo in ALGORITHMS for r in cinder_data["chains"][algo]]
    assert sorted(by_id) == sorted(r["id"] for r in recs)
    for rec in recs:
        b = by_id[rec["id"]]
        row = json.loads(base64.b64decode(rec["record"]["backup_url"]))
        # what the metadata alone says agrees with the row Cinder exported
        assert (b.prefix, b.container, b.parent_id, b.volume_id, b.size) == (
            row["service_metadata"], row["container"], row["parent_id"], row["volume_id"],
            row["size"])
        assert b.name == row["display_name"]
        if b.parent_id:
            assert order.index(b.parent_id) < order.index(b.id)


def test_discover_in_one_named_container(cinder_data: dict, tree: Path) -> None:
    """A local store rooted at backup_posix_path sees a named container's objects under
    Cinder's own names."""
    c = LocalBackend(tree).open("volumebackups", create=False)
    found = cinder.discover(c)
    named = [r for a in ("zlib", "zstd", "none") for r in cinder_data["chains"][a]]
    assert sorted(b.id for b in found) == sorted(r["id"] for r in named)
    assert {b.directory for b in found} == {""}
    assert {b.container for b in found} == {"volumebackups"}
    inc2 = next(b for b in found if b.id == record(cinder_data, "zstd", "inc2")["id"])
    chain = cinder.chain_of(c, inc2)
    assert [b.id for b in chain] == [record(cinder_data, "zstd", s)["id"] for s in STEPS]


def test_discover_reports_what_it_cannot_read(cinder_data: dict, tree: Path) -> None:
    full = record(cinder_data, "zlib", "full")
    meta = tree / full["container"] / (full["service_metadata"] + "_metadata")
    meta.write_bytes(meta.read_bytes()[:100])  # cut short: not JSON
    problems: list[tuple[str, str]] = []
    found = cinder.discover(cinder.posix_tree(tree), nested=True,
                            on_problem=lambda n, r: problems.append((n, r)))
    assert [n for n, _ in problems] == [f"{full['container']}/{meta.name}"]
    assert full["id"] not in {b.id for b in found}
    # its incrementals are still listed, their size unknown without the full backup
    inc1 = next(b for b in found if b.id == record(cinder_data, "zlib", "inc1")["id"])
    assert inc1.size == 0


# -- restore -------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("step", STEPS)
def test_restore_is_byte_exact(cinder_data: dict, tree: Path, tmp_path: Path, algo: str,
                               step: str) -> None:
    root = cinder.posix_tree(tree)
    rec = record(cinder_data, algo, step)
    chain = cinder.chain_of(root, backup_of(root, rec), nested=True)
    assert len(chain) == STEPS.index(step) + 1
    out = tmp_path / "restored.img"
    restore_to_file(root, chain, out)
    assert out.stat().st_size == rec["image_size"]
    assert sha256_file(out) == rec["image_sha256"]


@pytest.mark.parametrize("algo", ["zlib", "bz2"])
def test_restore_onto_an_existing_volume(cinder_data: dict, tree: Path, tmp_path: Path,
                                         algo: str) -> None:
    """Over old data (and larger than the backup, as a volume of ``size`` GiB is), zero
    blocks and the tail are written as zeros, not left as holes."""
    root = cinder.posix_tree(tree)
    rec = record(cinder_data, algo, "inc2")
    chain = cinder.chain_of(root, backup_of(root, rec), nested=True)
    out = tmp_path / "existing.img"
    size = rec["image_size"] + 300_000
    out.write_bytes(os.urandom(size))
    restore_to_file(root, chain, out, target_is_new=False, size=size)
    data = out.read_bytes()
    assert len(data) == size
    assert hashlib.sha256(data[: rec["image_size"]]).hexdigest() == rec["image_sha256"]
    assert data[rec["image_size"]:] == bytes(300_000)


def test_restore_of_inc2_reads_each_object_once(cinder_data: dict, tree: Path,
                                                tmp_path: Path) -> None:
    """One pass: each object the composed volume needs is fetched once, front to back;
    objects that newer backups replaced whole are not fetched; no volume byte is written
    twice (the chain is not laid down link after link)."""
    root = cinder.posix_tree(tree)
    rec = record(cinder_data, "zlib", "inc2")
    chain = cinder.chain_of(root, backup_of(root, rec), nested=True)
    counting = CountingContainer(root)
    out = tmp_path / "restored.img"
    out.touch()
    target = RecordingTarget(out)
    read = cinder.restore_chain(counting, chain, target)
    assert sha256_file(out) == rec["image_sha256"]

    per_object: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for name, off, n in counting.gets:
        per_object[name].append((off, n))
    data_objects = {b.store_name(o.name) for b in chain for o in b.objects}
    assert set(read) <= data_objects and len(read) == len(set(read))
    for name, ranges in per_object.items():
        size = (tree / name).stat().st_size
        pos = 0
        for off, n in ranges:
            assert off == pos, f"{name} read again or out of order: {ranges}"
            pos += n
        assert pos == size, f"{name}: {pos} of {size} bytes read"
    assert set(per_object) == set(read) | {chain[-1].sha256_name}
    # objects wholly covered by newer ones: e.g. inc1's first object (block 3), which
    # inc2 rewrote whole
    inc1, inc2 = chain[1], chain[2]
    superseded = [o for o in inc1.objects
                  if any(n.offset <= o.offset and o.offset + o.length <= n.offset + n.length
                         for n in inc2.objects)]
    assert superseded
    assert not {inc1.store_name(o.name) for o in superseded} & set(per_object)
    # some full-backup objects are read although inc1/inc2 cover parts of them
    assert {chain[0].store_name(o.name) for o in chain[0].objects} & set(read)

    written = sorted(target.writes)
    for (a, n), (b, _) in zip(written, written[1:], strict=False):
        assert a + n <= b, "a volume byte written twice"


def test_restore_in_small_pieces(cinder_data: dict, tree: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Range reads of 1000 bytes and windows of two blocks: hashes split across reads,
    objects across windows, a stream paused while newer objects fill its middle."""
    monkeypatch.setattr(cinder, "_READ_SIZE", 1000)
    monkeypatch.setattr(cinder, "_WINDOW", 2 * cinder_data["sha_block_size"])
    root = cinder.posix_tree(tree)
    for algo in ALGORITHMS:
        rec = record(cinder_data, algo, "inc2")
        chain = cinder.chain_of(root, backup_of(root, rec), nested=True)
        out = tmp_path / f"{algo}.img"
        restore_to_file(root, chain, out)
        assert sha256_file(out) == rec["image_sha256"], algo


# -- faults --------------------------------------------------------------------------------

def _object(tree: Path, b: cinder.CinderBackup, compression: str) -> tuple[Path, str]:
    o = next(o for o in b.objects if o.compression == compression)
    return tree / b.store_name(o.name), b.store_name(o.name)


@pytest.mark.parametrize(("algo", "step", "compression"), [
    ("zlib", "inc2", "zlib"),  # compressed: fails to inflate or its md5 differs
    ("zstd", "full", "zstd"),  # an object of the oldest link
    ("zlib", "full", "none"),  # stored as is (incompressible): a block SHA-256 catches it
])
def test_flipped_byte_fails_naming_the_object(cinder_data: dict, tree: Path, tmp_path: Path,
                                              algo: str, step: str, compression: str) -> None:
    root = cinder.posix_tree(tree)
    inc2 = backup_of(root, record(cinder_data, algo, "inc2"))
    chain = cinder.chain_of(root, inc2, nested=True)
    victim_backup = chain[STEPS.index(step)]
    plan, _ = cinder._plan(chain)
    used = [p.obj for p in plan if p.backup is victim_backup and p.obj.compression == compression]
    assert used, "the test needs an object the restore reads"
    name = victim_backup.store_name(used[0].name)
    flip_byte(tree / name)
    out = tmp_path / "restored.img"
    with pytest.raises(DataError) as exc:
        restore_to_file(root, chain, out)
    assert exc.value.object_name == name
    assert name in str(exc.value)
    # the window holding the bad block was never written (the whole volume fits in one)
    assert out.read_bytes().count(0) == out.stat().st_size


def test_missing_object_fails_naming_it(cinder_data: dict, tree: Path, tmp_path: Path) -> None:
    root = cinder.posix_tree(tree)
    chain = cinder.chain_of(root, backup_of(root, record(cinder_data, "zstd", "inc1")),
                            nested=True)
    name = chain[1].store_name(chain[1].objects[-1].name)
    (tree / name).unlink()
    with pytest.raises(cinder.MissingObject) as exc:
        restore_to_file(root, chain, tmp_path / "r.img")
    assert exc.value.object_name == name and name in str(exc.value)


def test_corrupt_sha256file_fails_the_restore(cinder_data: dict, tree: Path,
                                              tmp_path: Path) -> None:
    """A hash that matches no data, or a list of the wrong length: the hash file is named
    (the data objects' md5s hold, so they are not blamed)."""
    root = cinder.posix_tree(tree)
    inc2 = backup_of(root, record(cinder_data, "zlib", "inc2"))
    chain = cinder.chain_of(root, inc2, nested=True)
    path = tree / inc2.sha256_name
    good = json.loads(path.read_bytes())
    for n, change in enumerate([
        lambda h: h.__setitem__(5, hashlib.sha256(b"not this block").hexdigest()),
        lambda h: h.pop(),  # one hash short of the volume
        lambda h: h.append(h[0]),  # one too many
    ]):
        doc = json.loads(json.dumps(good))
        change(doc["sha256s"])
        path.write_text(json.dumps(doc, sort_keys=True, indent=2))
        with pytest.raises(DataError) as exc:
            restore_to_file(root, chain, tmp_path / f"r{n}.img")
        assert exc.value.object_name == inc2.sha256_name, exc.value
        if n == 0:
            assert "block 5 " in str(exc.value)
    path.write_bytes(b"{}")
    with pytest.raises(DataError, match="sha256s"):
        restore_to_file(root, chain, tmp_path / "r.img")


def test_incremental_whose_parent_is_gone(cinder_data: dict, tree: Path,
                                          tmp_path: Path) -> None:
    for algo in ("zlib", "bz2"):  # a shared container, and Cinder's per-backup ones
        root = cinder.posix_tree(tree)
        inc1 = backup_of(root, record(cinder_data, algo, "inc1"))
        inc2 = backup_of(root, record(cinder_data, algo, "inc2"))
        assert cinder.delete_backup(root, inc1) == len(inc1.objects) + 2
        with pytest.raises(cinder.MissingObject) as exc:
            cinder.chain_of(root, inc2, nested=True)
        assert inc1.id in str(exc.value) and inc2.id in str(exc.value)
        # a chain handed in without its full backup is refused the same way
        full = backup_of(root, record(cinder_data, algo, "full"))
        with pytest.raises(cinder.MissingObject, match=full.id):
            restore_to_file(root, [inc1, inc2], tmp_path / f"{algo}.img")
        with pytest.raises(ValueError, match="not a chain"):
            restore_to_file(root, [full, inc2], tmp_path / f"{algo}.img")


# -- verify --------------------------------------------------------------------------------

def test_verify_of_good_chains(cinder_data: dict, tree: Path) -> None:
    root = cinder.posix_tree(tree)
    for algo in ALGORITHMS:
        rec = record(cinder_data, algo, "inc2")
        rep = cinder.verify_chain(root, cinder.chain_of(root, backup_of(root, rec),
                                                        nested=True))
        assert rep.ok, (algo, rep)
        assert rep.checked_blocks == math.ceil(rec["image_size"] / 32768)


def test_verify_finds_corrupt_and_missing_objects(cinder_data: dict, tree: Path) -> None:
    root = cinder.posix_tree(tree)
    chain = cinder.chain_of(root, backup_of(root, record(cinder_data, "zstd", "inc2")),
                            nested=True)
    full, inc1, inc2 = chain
    # an object inc2 replaced whole: a restore never reads it, verify does
    plan, _ = cinder._plan(chain)
    used = {id(p.obj) for p in plan}
    unused = next(o for o in inc1.objects if id(o) not in used)
    flip_byte(tree / inc1.store_name(unused.name))
    # an object the restore reads
    used_full = next(o for o in full.objects if id(o) in used and o.compression == "zstd")
    flip_byte(tree / full.store_name(used_full.name), 40)
    gone = inc2.store_name(inc2.objects[0].name)
    (tree / gone).unlink()
    rep = cinder.verify_chain(root, chain)
    assert not rep.ok
    assert rep.missing == [gone]
    assert rep.corrupt == sorted([inc1.store_name(unused.name),
                                  full.store_name(used_full.name)])


def test_verify_names_a_corrupt_hash_file(cinder_data: dict, tree: Path) -> None:
    root = cinder.posix_tree(tree)
    chain = cinder.chain_of(root, backup_of(root, record(cinder_data, "bz2", "inc2")),
                            nested=True)
    path = tree / chain[-1].sha256_name
    doc = json.loads(path.read_bytes())
    doc["sha256s"][-1] = hashlib.sha256(b"other").hexdigest()
    path.write_text(json.dumps(doc, sort_keys=True, indent=2))
    rep = cinder.verify_chain(root, chain)
    assert (rep.missing, rep.corrupt) == ([], [chain[-1].sha256_name])


# -- delete and bad metadata ---------------------------------------------------------------

def test_delete_removes_exactly_the_backups_objects(cinder_data: dict, tree: Path,
                                                    tmp_path: Path) -> None:
    root = cinder.posix_tree(tree)
    before = set(root.list(""))
    inc2 = backup_of(root, record(cinder_data, "none", "inc2"))
    n = cinder.delete_backup(root, inc2)
    after = set(root.list(""))
    gone = before - after
    assert n == len(gone) == record(cinder_data, "none", "inc2")["object_count"] + 2
    assert gone == {inc2.metadata_name, inc2.sha256_name,
                    *(inc2.store_name(o.name) for o in inc2.objects)}
    rec = record(cinder_data, "none", "inc1")
    out = tmp_path / "inc1.img"
    restore_to_file(root, cinder.chain_of(root, backup_of(root, rec), nested=True), out)
    assert sha256_file(out) == rec["image_sha256"]


def test_metadata_that_is_not_cinders_is_refused(cinder_data: dict, tree: Path) -> None:
    root = cinder.posix_tree(tree)
    rec = record(cinder_data, "zlib", "inc1")
    b = backup_of(root, rec)
    path = tree / b.metadata_name
    good = json.loads(path.read_bytes())

    def write(doc: dict) -> None:
        path.write_text(json.dumps(doc, sort_keys=True, indent=2))

    # an object outside the backup's prefix (another backup's) is never read
    other = record(cinder_data, "zlib", "full")["service_metadata"] + "-00001"
    doc = json.loads(json.dumps(good))
    doc["objects"][0] = {other: next(iter(doc["objects"][0].values()))}
    write(doc)
    with pytest.raises(FormatError, match="prefix"):
        backup_of(root, rec)
    write({**good, "version": "2.0.0"})
    with pytest.raises(FormatError, match="version"):
        backup_of(root, rec)
    doc = json.loads(json.dumps(good))
    next(iter(doc["objects"][0].values()))["compression"] = "lz4"
    write(doc)
    with pytest.raises(FormatError, match="lz4"):
        backup_of(root, rec)
    path.unlink()
    with pytest.raises(cinder.MissingObject):
        backup_of(root, rec)
