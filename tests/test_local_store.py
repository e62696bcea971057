"""The local store under failure: unreadable directories, a full disk, durability of renames
and deletes; and the fault-injection wrappers of tests/faults.py.

Errors are produced for real where the kernel can be made to produce them (a 1 MiB tmpfs
for ENOSPC, RLIMIT_FSIZE for EFBIG, names too long); errors that cannot be (EIO, ESTALE,
EMFILE from a directory, a power loss) are injected at the edge, on the os calls.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvault.directio import AlignedBuffer
from blockvault.store import (
    Container,
    ObjectInfo,
    ObjectNotFound,
    StoreError,
    StoreFull,
    StorePermanentError,
    StoreUnavailable,
)
from blockvault.store.local import LocalBackend
from blockvault.store.retry import RetryingBackend
from tests.faults import LaggingBackend, LaggingContainer

KiB = 1024
MiB = 1024 * KiB
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "store")


@pytest.fixture
def container(backend: LocalBackend) -> Container:
    return backend.open("c")


def tmp_files(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".tmp-*")]


def assert_absent(c: Container, root: Path, name: str) -> None:
    """Nothing of a failed put is visible: no object, no listing entry, no temporary file."""
    assert c.head(name) is None
    assert c.stat(name) is None
    assert name not in list(c.list())
    assert tmp_files(root) == []


# --------------------------------------------- listings never return fewer names ---


def _fill_layout(c: Container) -> None:
    for name in ("manifests/m1", "packs/ab/p1", "packs/ab/p2", "packs/cd/p3", "top"):
        c.put(name, name.encode())


def _scandir_failing(monkeypatch, victim: Path, exc: OSError, after: int = 0) -> None:
    """os.scandir of ``victim`` raises ``exc``: at once, or after handing out ``after``
    entries (getdents failing in the middle of a directory)."""
    real = os.scandir

    class Failing:
        """A scandir iterator (os.walk calls next() on it) that fails part way."""

        def __init__(self, path) -> None:
            self._it = real(path)
            self._handed = 0

        def __enter__(self) -> Failing:
            return self

        def __exit__(self, *a) -> None:
            self._it.close()

        def close(self) -> None:
            self._it.close()

        def __iter__(self) -> Failing:
            return self

        def __next__(self) -> os.DirEntry:
            if self._handed >= after:
                raise exc
            self._handed += 1
            return next(self._it)

    def scandir(path=".", *a, **k):
        if os.fspath(path) == str(victim):
            if not after:
                raise exc
            return Failing(path)
        return real(path, *a, **k)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE, errno.EMFILE])
def test_listing_raises_when_a_directory_cannot_be_read(code, monkeypatch, backend, container):
    _fill_layout(container)
    victim = backend.root / "c" / "packs" / "ab"
    _scandir_failing(monkeypatch, victim, OSError(code, os.strerror(code)))
    for listing in (container.list, container.list_info):
        for prefix in ("", "packs/", "packs/ab/"):
            with pytest.raises(StoreUnavailable) as ei:
                list(listing(prefix))
            msg = str(ei.value)
            assert str(victim) in msg and errno.errorcode[code] in msg, msg
    # a prefix whose objects are all elsewhere does not read the broken directory
    assert sorted(container.list("packs/cd/")) == ["packs/cd/p3"]


def test_listing_raises_when_a_directory_fails_half_read(monkeypatch, backend, container):
    _fill_layout(container)
    _scandir_failing(monkeypatch, backend.root / "c" / "packs", OSError(errno.EIO, "I/O"),
                     after=1)
    with pytest.raises(StoreUnavailable, match="EIO"):
        list(container.list())


def test_listing_error_is_retried_then_reported(monkeypatch, tmp_path):
    c = RetryingBackend(LocalBackend(tmp_path / "store"), attempts=3,
                        sleep=lambda d: None).open("c")
    _fill_layout(c)
    calls = []
    real = os.scandir

    def scandir(path=".", *a, **k):
        calls.append(os.fspath(path))
        if len(calls) == 1:  # one EMFILE, then the descriptors are back
            raise OSError(errno.EMFILE, "Too many open files")
        return real(path, *a, **k)

    monkeypatch.setattr(os, "scandir", scandir)
    assert sorted(c.list()) == ["manifests/m1", "packs/ab/p1", "packs/ab/p2",
                                "packs/cd/p3", "top"]


def test_listing_a_removed_container_raises(backend, container):
    container.put("x", b"1")
    os.unlink(backend.root / "c" / "x")
    os.rmdir(backend.root / "c")
    with pytest.raises(StorePermanentError, match="does not exist"):
        list(container.list())


def test_list_info_reports_size_and_mtime(backend, container):
    container.put("packs/ab/p", b"12345")
    (info,) = container.list_info("packs/")
    st = os.stat(backend.root / "c" / "packs" / "ab" / "p")
    assert info == ObjectInfo("packs/ab/p", 5, st.st_mtime)
    assert container.stat("packs/ab/p") == info
    assert container.stat("packs/ab") is None  # a directory is not an object


# ---------------------------------------------------------------- a full disk ---


@contextlib.contextmanager
def _tmpfs(d: Path, options: str) -> Iterator[None]:
    """A real small filesystem mounted on ``d`` (skips the test where mount is refused)."""
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill for real (needs root/CAP_SYS_ADMIN): "
                    f"{r.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem to fill up."""
    d = tmp_path / "tiny"
    d.mkdir()
    with _tmpfs(d, "size=1m"):
        yield d


def _leave_free(fs: Path, free: int) -> Path:
    """Fill ``fs`` with a filler file but for about ``free`` bytes."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        chunk = b"\xff" * (64 * KiB)
        while True:
            os.write(fd, chunk)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - free))
    return filler


def _full_store(tiny_fs: Path) -> tuple[Container, Path]:
    c = LocalBackend(tiny_fs / "store").open("c")
    c.put("packs/ab/old", b"x")  # the directories exist: only the object needs room
    _leave_free(tiny_fs, 256 * KiB)
    return c, tiny_fs / "store" / "c"


def _assert_full(exc: StoreFull, name: str) -> None:
    msg = str(exc)
    assert "the object store is full (no space left on device)" in msg, msg
    assert f"while writing {name} in container c" in msg, msg
    assert exc.name == name and exc.container == "c"


def test_put_file_with_a_short_last_write_fails_whole(tiny_fs, tmp_path):
    """One piece bigger than the free space: write() stores what fits and returns the count;
    only the next write fails. Ignoring the count renamed a truncated object into place."""
    c, root = _full_store(tiny_fs)
    src = tmp_path / "manifest"
    src.write_bytes(os.urandom(512 * KiB))  # one piece (pieces are 1 MiB)
    with open(src, "rb") as f, pytest.raises(StoreFull) as ei:
        c.put_file("manifests/m", f, 512 * KiB)
    _assert_full(ei.value, "manifests/m")
    assert_absent(c, root, "manifests/m")
    assert c.get("packs/ab/old") == b"x"


@pytest.mark.parametrize("aligned", [False, True], ids=["buffered", "direct"])
def test_put_on_a_full_disk_fails_whole(tiny_fs, aligned):
    c, root = _full_store(tiny_fs)
    if aligned:  # a pack buffer: written with O_DIRECT (tmpfs takes it on recent kernels)
        buf = AlignedBuffer(MiB)
        buf.view[:] = os.urandom(MiB)
        data: bytes | memoryview = buf.view
    else:
        data = os.urandom(512 * KiB)
    with pytest.raises(StoreFull) as ei:
        c.put("packs/ab/new", data)
    _assert_full(ei.value, "packs/ab/new")
    assert_absent(c, root, "packs/ab/new")


def test_a_full_disk_is_not_retried_and_clears_when_space_is_freed(tiny_fs):
    c = RetryingBackend(LocalBackend(tiny_fs / "store"),
                        sleep=lambda d: pytest.fail("a full disk must not be retried")).open("c")
    c.put("packs/ab/old", b"x")
    filler = _leave_free(tiny_fs, 128 * KiB)
    data = os.urandom(256 * KiB)
    with pytest.raises(StoreFull):
        c.put("packs/ab/new", data)
    assert_absent(c, tiny_fs / "store" / "c", "packs/ab/new")
    filler.unlink()
    c.put("packs/ab/new", data)
    assert c.get("packs/ab/new") == data


def test_creating_containers_until_the_disk_is_full(tmp_path):
    """A tmpfs with few inodes: mkdir of a container fails with ENOSPC."""
    d = tmp_path / "few-inodes"
    d.mkdir()
    with _tmpfs(d, "size=1m,nr_inodes=8"):
        backend = LocalBackend(d / "store")
        with pytest.raises(StoreFull, match=r"is full \(no space left on device\) in container c"):
            for i in range(10):
                backend.open(f"c{i}")


_EFBIG_CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    from blockvault.directio import AlignedBuffer
    from blockvault.store.local import LocalBackend

    root, how, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead
    c = LocalBackend(root).open("c")
    c.put("packs/ab/old", b"x")
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    size = 2 * limit
    try:
        if how == "put_file":
            with open(os.path.join(root, "..", "src"), "rb") as f:
                c.put_file("obj", f, size)
        else:
            buf = AlignedBuffer(size)
            buf.view[:] = b"z" * size
            c.put("obj", buf.view if how == "put_direct" else bytes(buf.view))
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    else:
        print(json.dumps({"error": None}))
""")


@pytest.mark.parametrize("how", ["put_file", "put", "put_direct"])
def test_file_size_limit_fails_whole(tmp_path, how):
    """RLIMIT_FSIZE (in a child process): a write crossing it is cut short, the next fails
    with EFBIG."""
    limit = 512 * KiB if how != "put_direct" else MiB
    (tmp_path / "src").write_bytes(b"y" * 2 * limit)
    r = subprocess.run([sys.executable, "-c", _EFBIG_CHILD, str(tmp_path / "store"), how,
                        str(limit)], capture_output=True, text=True, cwd=REPO, check=False,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["error"] == "StoreFull", got
    assert "(file too large) while writing obj in container c" in got["message"]
    c = LocalBackend(tmp_path / "store").open("c", create=False)
    assert_absent(c, tmp_path / "store" / "c", "obj")


# ------------------------------------------------- other OS errors, never raw ---


def test_name_too_long_is_a_permanent_store_error(container):
    name = "packs/" + "x" * 300
    for call in (lambda: container.put(name, b"1"), lambda: container.head(name),
                 lambda: container.get(name)):
        with pytest.raises(StorePermanentError, match="ENAMETOOLONG"):
            call()


def test_object_in_the_way_of_a_directory(backend, container):
    container.put("a", b"1")
    with pytest.raises(StorePermanentError, match="cannot write a/b in container c.*ENOTDIR"):
        container.put("a/b", b"2")
    assert container.head("a/b") is None
    with pytest.raises(ObjectNotFound):
        container.get("a/b")
    container.delete("a/b")  # not an object: nothing to delete
    assert tmp_files(backend.root) == []


def test_a_directory_is_not_an_object(container):
    container.put("packs/ab/p", b"1")
    with pytest.raises(ObjectNotFound):
        container.get("packs/ab")
    assert container.head("packs/ab") is None
    container.delete("packs/ab")
    assert container.get("packs/ab/p") == b"1"


def _failing(monkeypatch, fn: str, code: int, when=lambda *a: True) -> None:
    real = getattr(os, fn)

    def failing(*a, **k):
        if when(*a):
            raise OSError(code, os.strerror(code))
        return real(*a, **k)

    monkeypatch.setattr(os, fn, failing)


def _is_file_fd(fd, *a) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _is_dir_fd(fd, *a) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


@pytest.mark.parametrize("fn,when", [
    ("fsync", _is_file_fd),  # the data never reached the disk
    ("replace", lambda *a: True),
], ids=["fsync", "rename"])
def test_io_error_while_writing_leaves_nothing(monkeypatch, backend, container, fn, when):
    container.put("packs/ab/other", b"1")
    _failing(monkeypatch, fn, errno.EIO, when)
    with pytest.raises(StoreUnavailable,
                       match=r"cannot write packs/ab/p in container c: .*\(EIO\)"):
        container.put("packs/ab/p", b"data")
    with open(__file__, "rb") as f, pytest.raises(StoreUnavailable, match=r"\(EIO\)"):
        container.put_file("packs/ab/p", f, 10)
    monkeypatch.undo()
    assert_absent(container, backend.root, "packs/ab/p")


def test_io_errors_of_reads_and_deletes_are_store_errors(monkeypatch, container):
    container.put("o", b"1")
    _failing(monkeypatch, "stat", errno.EIO, lambda p, *a: os.fspath(p).endswith("/o"))
    with pytest.raises(StoreUnavailable, match="cannot stat o .*EIO"):
        container.head("o")
    monkeypatch.undo()
    _failing(monkeypatch, "unlink", errno.EROFS)
    with pytest.raises(StorePermanentError, match="cannot delete o .*EROFS"):
        container.delete("o")
    monkeypatch.undo()
    real_open = open

    def failing_open(path, *a, **k):
        if os.fspath(path).endswith("/o"):
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(StoreUnavailable, match="cannot read o .*ESTALE"):
        container.get("o")


def test_store_errors_are_exported():
    assert issubclass(StoreFull, StoreError)
    assert not issubclass(StoreFull, StoreUnavailable | StorePermanentError)
    assert str(StoreFull("disk quota exceeded", "o", "c")) == (
        "the object store is full (disk quota exceeded) while writing o in container c")


# ------------------------------------------------------------------ durability ---


class SyncLog:
    """What reached the disk, in order: renames, unlinks, mkdirs and fsyncs (of files and
    of directories, by path). A power loss cannot be produced in a test; what survives one
    is exactly what was fsynced, so the calls are recorded (the real calls still run)."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace
        real_mkdir, real_unlink = os.mkdir, os.unlink

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            kind = "fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file"
            real_fsync(fd)
            self.events.append((kind, path))

        def replace(src, dst, **k) -> None:
            real_replace(src, dst, **k)
            self.events.append(("replace", os.fspath(dst)))

        def mkdir(path, *a, **k) -> None:
            real_mkdir(path, *a, **k)
            self.events.append(("mkdir", os.fspath(path)))

        def unlink(path, *a, **k) -> None:
            real_unlink(path, *a, **k)
            self.events.append(("unlink", os.fspath(path)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "unlink", unlink)

    def index(self, event: str, path: Path) -> int:
        return self.events.index((event, str(path)))

    def synced_after(self, directory: Path, event: str, path: Path) -> bool:
        """Was ``directory`` fsynced after ``event`` on ``path``?"""
        i = self.index(event, path)
        return ("fsync-dir", str(directory)) in self.events[i + 1:]


def test_put_fsyncs_the_directory_after_the_rename(monkeypatch, backend, container):
    root = backend.root / "c"
    log = SyncLog(monkeypatch)
    container.put("packs/ab/p1", b"one")
    obj = root / "packs" / "ab" / "p1"
    assert log.synced_after(obj.parent, "replace", obj), log.events
    # the directories created for it: each one's entry in its parent is durable
    assert log.synced_after(root, "mkdir", root / "packs"), log.events
    assert log.synced_after(root / "packs", "mkdir", root / "packs" / "ab"), log.events
    # and the file itself before it was renamed into place
    fsyncs = [i for i, (e, _) in enumerate(log.events) if e == "fsync-file"]
    assert fsyncs and fsyncs[0] < log.index("replace", obj)

    log.events.clear()
    with open(__file__, "rb") as f:
        container.put_file("manifests/m", f, 100)
    assert log.synced_after(root / "manifests", "replace", root / "manifests" / "m")
    assert log.synced_after(root, "mkdir", root / "manifests")


def test_creating_a_container_fsyncs_its_parents(monkeypatch, tmp_path):
    log = SyncLog(monkeypatch)
    store = tmp_path / "store"
    LocalBackend(store).open("c")
    assert log.synced_after(tmp_path, "mkdir", store), log.events
    assert log.synced_after(store, "mkdir", store / "c"), log.events


def test_delete_fsyncs_the_directory(monkeypatch, backend, container):
    container.put("packs/ab/p1", b"one")
    log = SyncLog(monkeypatch)
    container.delete("packs/ab/p1")
    obj = backend.root / "c" / "packs" / "ab" / "p1"
    assert log.synced_after(obj.parent, "unlink", obj), log.events


def test_a_failed_directory_fsync_fails_the_put(monkeypatch, container):
    container.put("packs/ab/other", b"1")
    _failing(monkeypatch, "fsync", errno.EIO, _is_dir_fd)
    with pytest.raises(StoreUnavailable, match="EIO"):
        container.put("packs/ab/p", b"data")  # in place, but not known durable: retry it


def test_a_retried_delete_fsyncs_again(monkeypatch, backend, container):
    container.put("packs/ab/p1", b"one")
    _failing(monkeypatch, "fsync", errno.EIO, _is_dir_fd)
    with pytest.raises(StoreUnavailable, match="cannot delete packs/ab/p1 .*EIO"):
        container.delete("packs/ab/p1")  # gone, but maybe not for good
    monkeypatch.undo()
    log = SyncLog(monkeypatch)
    container.delete("packs/ab/p1")  # the retry: nothing to unlink, the fsync is still owed
    assert ("fsync-dir", str(backend.root / "c" / "packs" / "ab")) in log.events


def test_filesystems_without_directory_fsync_still_work(monkeypatch, container):
    """Some filesystems answer EINVAL to fsync of a directory: nothing more can be done
    there, so the put succeeds (after trying)."""
    tried: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            tried.append(fd)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    container.put("packs/ab/p", b"data")
    container.delete("packs/ab/p")
    assert container.head("packs/ab/p") is None
    assert len(tried) >= 4  # root for packs/, packs/ for ab/, ab/ after rename and delete


# -------------------------------------------------------- the lagging wrappers ---


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lagging_container_hides_new_objects_from_listings(container):
    clock = FakeClock()
    c = LaggingContainer(container, 5.0, clock=clock)
    c.put("old", b"1")
    clock.now += 5
    c.put("new", b"22")
    with open(__file__, "rb") as f:
        c.put_file("new-file", f, 3)
    assert list(c.list()) == ["old"]
    assert [i.name for i in c.list_info()] == ["old"]
    # read-after-write for a known name
    assert c.get("new") == b"22" and c.head("new") == 2 and c.stat("new").size == 2
    clock.now += 4
    assert list(c.list()) == ["old"]
    clock.now += 1
    assert sorted(c.list()) == ["new", "new-file", "old"]


def test_lagging_container_keeps_deleted_objects_in_listings(container):
    clock = FakeClock()
    c = LaggingContainer(container, 5.0, clock=clock)
    c.put("gone", b"123")
    clock.now += 5
    info = c.stat("gone")
    c.delete("gone")
    assert list(c.list()) == ["gone"]
    assert list(c.list_info("go")) == [info]
    assert list(c.list_info("x")) == []
    with pytest.raises(ObjectNotFound):
        c.get("gone")
    assert c.head("gone") is None and c.stat("gone") is None
    c.delete("gone")  # deleting it again is fine, and does not extend its ghost
    clock.now += 5
    assert list(c.list()) == []
    # re-created while its ghost shows: listed once, and only after the lag
    c.put("back", b"1")
    clock.now += 5
    c.delete("back")
    c.put("back", b"2")
    assert list(c.list()) == []
    clock.now += 5
    assert list(c.list()) == ["back"]


def test_lagging_backend_shares_the_lag_across_opens(backend):
    clock = FakeClock()
    lagging = LaggingBackend(backend, 2.0, clock=clock)
    assert lagging.kind == "local"
    assert lagging.validate_container_name("../x") is not None
    writer, reader = lagging.open("shared"), lagging.open("shared")
    writer.put("o", b"1")
    assert list(reader.list()) == [] and reader.get("o") == b"1"
    assert list(lagging.open("other").list()) == []
    clock.now += 2
    assert list(reader.list()) == ["o"]
    reader.delete("o")
    assert list(writer.list()) == ["o"]
    assert isinstance(writer.clock(), float)
    assert list(lagging.open("shared").list()) == ["o"]  # the probe object is not listed
    lagging.close()


def test_lagging_backend_with_real_time(backend):
    c = LaggingBackend(backend, 0.3).open("c")
    c.put("o", b"1")
    assert list(c.list()) == []
    time.sleep(0.35)
    assert list(c.list()) == ["o"]


# ------------------------------------------------------------------- put_new ---


def _record_links(monkeypatch, log: SyncLog) -> None:
    real_link = os.link

    def link(src, dst, *a, **k) -> None:
        real_link(src, dst, *a, **k)
        log.events.append(("link", os.fspath(dst)))

    monkeypatch.setattr(os, "link", link)


def test_put_new_links_durably(monkeypatch, backend, container):
    root = backend.root / "c"
    log = SyncLog(monkeypatch)
    _record_links(monkeypatch, log)
    assert container.put_new("meta/config", b"v1") is True
    obj = root / "meta" / "config"
    assert log.synced_after(obj.parent, "link", obj), log.events
    assert log.synced_after(root, "mkdir", root / "meta"), log.events
    fsyncs = [i for i, (e, _) in enumerate(log.events) if e == "fsync-file"]
    assert fsyncs and fsyncs[0] < log.index("link", obj)  # the data before its name
    assert not any(e == "replace" for e, _ in log.events)  # never a rename over a name
    assert tmp_files(backend.root) == []
    assert obj.stat().st_nlink == 1  # the temporary name is gone


def test_put_new_of_a_taken_name_writes_nothing_and_still_fsyncs(monkeypatch, backend,
                                                                  container):
    container.put("config", b"theirs")
    before = (backend.root / "c" / "config").stat()
    log = SyncLog(monkeypatch)
    assert container.put_new("config", b"ours, longer") is False
    after = (backend.root / "c" / "config").stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)
    assert container.get("config") == b"theirs"
    assert tmp_files(backend.root) == []
    # the object found may be this caller's own from an attempt whose fsync failed
    assert ("fsync-dir", str(backend.root / "c")) in log.events


def test_put_new_retried_after_a_lost_answer_says_false_for_its_own_object(monkeypatch,
                                                                           tmp_path):
    """The retry layer's documented case: the first attempt linked the object, then its
    directory fsync failed (StoreUnavailable); the retry finds the object -- its own -- and
    answers False. The caller re-reads it and finds its bytes; the retry made it durable."""
    c = RetryingBackend(LocalBackend(tmp_path / "store"), attempts=3,
                        sleep=lambda d: None).open("c")
    real_fsync = os.fsync
    failed: list[int] = []

    def fsync(fd: int) -> None:
        if _is_dir_fd(fd) and os.path.exists(tmp_path / "store" / "c" / "config") and not failed:
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = SyncLog(monkeypatch)  # records the real calls after ours
    assert c.put_new("config", b"ours") is False
    assert failed  # the first attempt did fail after linking
    assert c.get("config") == b"ours"
    assert log.events.count(("fsync-dir", str(tmp_path / "store" / "c"))) >= 1
    assert tmp_files(tmp_path / "store") == []


def test_put_new_on_a_directory_of_the_layout_is_a_permanent_error(backend, container):
    container.put("packs/ab/p", b"1")
    with pytest.raises(StorePermanentError, match=r"cannot write packs/ab .*EISDIR"):
        container.put_new("packs/ab", b"2")
    assert tmp_files(backend.root) == []
    assert container.get("packs/ab/p") == b"1"


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_put_new_on_a_filesystem_without_hard_links(monkeypatch, backend, container, code):
    _failing(monkeypatch, "link", code)
    with pytest.raises(StorePermanentError, match="does not support hard links") as ei:
        container.put_new("meta/config", b"1")
    assert "cannot create meta/config in container c" in str(ei.value)
    monkeypatch.undo()
    assert_absent(container, backend.root, "meta/config")


def test_put_new_over_nfs_with_a_retransmitted_link(monkeypatch, backend, container):
    """NFS: the first LINK linked, its answer was lost, the retransmission answers EEXIST.
    The name holds our own inode: created."""
    real_link = os.link

    def link(src, dst, *a, **k) -> None:
        real_link(src, dst, *a, **k)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)

    monkeypatch.setattr(os, "link", link)
    assert container.put_new("config", b"ours") is True
    monkeypatch.undo()
    assert container.get("config") == b"ours"
    assert tmp_files(backend.root) == []


def test_put_new_on_a_full_disk_fails_whole(tiny_fs):
    c, root = _full_store(tiny_fs)
    with pytest.raises(StoreFull) as ei:
        c.put_new("packs/ab/new", os.urandom(512 * KiB))
    _assert_full(ei.value, "packs/ab/new")
    assert_absent(c, root, "packs/ab/new")


_PUT_NEW_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from blockvault.store.local import LocalBackend

    root, me, go, names = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    c = LocalBackend(root).open("c")
    while not os.path.exists(go):
        time.sleep(0.001)
    won = [c.put_new(f"race/{i}/config", f"process {me} ".encode() * (1 + int(me)))
           for i in range(names)]
    print(json.dumps(won))
""")


def test_put_new_race_between_processes(tmp_path):
    """Deployments are processes: several create the same names at the same moment, and
    for each name exactly one wins and its bytes are stored."""
    procs, names, go = 4, 30, tmp_path / "go"
    LocalBackend(tmp_path / "store").open("c")
    children = [
        subprocess.Popen([sys.executable, "-c", _PUT_NEW_CHILD, str(tmp_path / "store"),
                          str(me), str(go), str(names)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
        for me in range(procs)
    ]
    time.sleep(0.5)  # all started and polling
    go.touch()
    won = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        won.append(json.loads(out))
    c = LocalBackend(tmp_path / "store").open("c", create=False)
    for i in range(names):
        winners = [me for me in range(procs) if won[me][i]]
        assert len(winners) == 1, (i, winners)
        me = winners[0]
        assert c.get(f"race/{i}/config") == f"process {me} ".encode() * (1 + me)
    assert tmp_files(tmp_path / "store") == []
