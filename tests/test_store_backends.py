"""The object store contract, run against every backend: local, Swift and S3.

Swift and S3 run against a real Swift all-in-one (Swift API + s3api) started by the
``swift_server`` session fixture (tests/swift_fixture.py, tools/swift/start-swift.sh).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import swiftclient

from blockvault.store.base import (
    Backend,
    Container,
    ObjectInfo,
    ObjectNotFound,
    StoreFull,
    StorePermanentError,
    StoreUnavailable,
)
from blockvault.store.factory import backup_service_name, make_backend
from blockvault.store.retry import RetryingBackend
from blockvault.store.s3 import S3Backend, bucket_name_problem
from blockvault.store.swift import SwiftBackend
from tests.swift_fixture import swift_server  # noqa: F401  (fixture)

KINDS = ["local", "swift", "s3"]


def settings_for(kind: str, saio, tmp_path: Path, **over) -> SimpleNamespace:
    s = SimpleNamespace(
        store=kind,
        data_dir=tmp_path,
        store_retry_attempts=3,
        store_retry_budget=10.0,
        store_pool_size=8,
    )
    if kind == "swift":
        s.swift_auth_url = saio.auth_url
        s.swift_user = saio.user
        s.swift_key = saio.key
        s.swift_auth_version = "1"
    elif kind == "s3":
        s.s3_endpoint_url = saio.s3_endpoint
        s.s3_region = saio.region
        s.s3_access_key = saio.user
        s.s3_secret_key = saio.key
        s.s3_addressing_style = "path"
    for k, v in over.items():
        setattr(s, k, v)
    return s


def new_container_name() -> str:
    return f"bv-test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def saio(kind, request):
    """The Swift all-in-one (``swift_server``) for swift/s3; ``None`` for local, so the local
    tests run without Swift."""
    if kind == "local":
        return None
    return request.getfixturevalue("swift_server")


@pytest.fixture
def backend(kind, saio, tmp_path) -> Backend:
    b = make_backend(settings_for(kind, saio, tmp_path))
    yield b
    b.close()


@pytest.fixture
def container(backend) -> Container:
    return backend.open(new_container_name())


# ------------------------------------------------------------------ contract ---


def test_put_get_head_delete(container: Container):
    data = b"0123456789" * 100 + b"tail"
    container.put("snap/1/chunk-a", data)
    assert container.get("snap/1/chunk-a") == data
    assert container.head("snap/1/chunk-a") == len(data)
    container.delete("snap/1/chunk-a")
    assert container.head("snap/1/chunk-a") is None
    with pytest.raises(ObjectNotFound):
        container.get("snap/1/chunk-a")
    container.delete("snap/1/chunk-a")  # deleting a missing object is not an error


def test_range_get(container: Container):
    data = bytes(range(256)) * 4
    container.put("obj", data)
    assert container.get("obj", 0, 10) == data[:10]
    assert container.get("obj", 100, 50) == data[100:150]
    assert container.get("obj", 1000) == data[1000:]
    assert container.get("obj", 1000, 100) == data[1000:]  # overlaps the end
    assert container.get("obj", 5000, 10) == b""  # entirely past the end
    assert container.get("obj", 5000) == b""
    assert container.get("obj", 3, 0) == b""


def test_missing_object(container: Container):
    assert container.head("nope") is None
    with pytest.raises(ObjectNotFound) as ei:
        container.get("nope")
    assert ei.value.name == "nope"
    with pytest.raises(ObjectNotFound):
        container.get("nope", 10, 10)
    with pytest.raises(ObjectNotFound):
        container.get("nope", 0, 0)


def test_put_file_streams_and_retries_send_the_same_bytes(container: Container,
                                                          tmp_path: Path):
    import random
    import tempfile

    data = random.Random(1).randbytes(9 * 1024 * 1024 + 123)
    with tempfile.TemporaryFile(dir=tmp_path) as f:
        f.write(data)
        f.seek(4096)  # the backend seeks to 0 itself
        container.put_file("manifests/big", f, len(data))
        f.read()  # at EOF, as after a failed attempt: a second put sends it all again
        container.put_file("manifests/again", f, len(data))
    want = hashlib.sha256(data).hexdigest()
    for name in ("manifests/big", "manifests/again"):
        assert container.head(name) == len(data)
        assert hashlib.sha256(container.get(name)).hexdigest() == want
    with tempfile.TemporaryFile(dir=tmp_path) as f:
        f.write(b"short")
        with pytest.raises(ValueError):
            container.put_file("manifests/short", f, 10)
    assert container.head("manifests/short") is None


def test_overwrite(container: Container):
    container.put("k", b"first version")
    container.put("k", b"second")
    assert container.get("k") == b"second"
    assert container.head("k") == 6


def test_empty_object(container: Container):
    container.put("empty", b"")
    assert container.head("empty") == 0
    assert container.get("empty") == b""


def test_list_prefix(container: Container):
    for n in ["a/1", "a/2", "a/sub/3", "b/1", "ab"]:
        container.put(n, n.encode())
    assert sorted(container.list("a/")) == ["a/1", "a/2", "a/sub/3"]
    assert sorted(container.list("a")) == ["a/1", "a/2", "a/sub/3", "ab"]
    assert sorted(container.list()) == ["a/1", "a/2", "a/sub/3", "ab", "b/1"]
    assert list(container.list("zzz")) == []


def test_reopen_existing_container(backend: Backend):
    name = new_container_name()
    backend.open(name).put("x", b"1")
    assert backend.open(name, create=False).get("x") == b"1"
    with pytest.raises(StorePermanentError):
        backend.open(new_container_name(), create=False)


def test_concurrent_puts(container: Container):
    blobs = {f"c/{i:03d}": hashlib.sha256(str(i).encode()).digest() * (i + 1) for i in range(64)}

    def put(item):
        container.put(*item)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, blobs.items()))

    def check(name):
        return container.get(name) == blobs[name]

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(check, blobs))
    assert sorted(container.list("c/")) == sorted(blobs)


def test_list_paginates(kind, backend: Backend):
    """Listing returns every object across pages. S3 runs with >1000 objects (it pages at
    the protocol's maximum of 1000 keys); Swift and local page at 100 over 250 objects to
    keep the test quick (the SAIO stores ~50 objects/s)."""
    c = backend.open(new_container_name())
    count = 1050 if kind == "s3" else 250
    c.inner.list_page_size = 100 if kind != "s3" else c.inner.list_page_size
    names = [f"p/{i:05d}" for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: c.put(n, b"x"), names))
    c.put("q/other", b"y")
    listed = list(c.list("p/"))
    assert len(listed) == len(names)
    assert sorted(listed) == names


# The test stores (a directory, the SAIO) run on this machine, so their clock is ours give or
# take S3's whole-second Last-Modified (Swift's proxy rounds it up) and scheduling delays.
CLOCK_SLACK = 3.0


def test_clock_is_the_store_time(container: Container):
    before = time.time()
    t = container.clock()
    after = time.time()
    assert before - CLOCK_SLACK <= t <= after + CLOCK_SLACK
    assert list(container.list("clock/")) == []  # the probe object is gone


def test_stat(container: Container):
    t0 = container.clock()
    container.put("s/a", b"12345")
    a = container.stat("s/a")
    t1 = container.clock()
    assert a is not None and (a.name, a.size) == ("s/a", 5)
    assert t0 - CLOCK_SLACK <= a.mtime <= t1 + CLOCK_SLACK
    assert container.stat("s/missing") is None
    assert container.stat("s") is None  # a prefix is not an object
    container.delete("s/a")
    assert container.stat("s/a") is None


def test_later_put_has_later_mtime(container: Container):
    container.put("m/first", b"1")
    container.put("m/second", b"2")  # at once: the same second at least
    first, second = container.stat("m/first"), container.stat("m/second")
    assert second.mtime >= first.mtime
    time.sleep(1.1)  # past S3's whole-second resolution
    container.put("m/first", b"rewritten")
    again = container.stat("m/first")
    assert again.size == 9 and again.mtime > first.mtime
    listed = {i.name: i for i in container.list_info("m/")}
    assert listed["m/first"].mtime > listed["m/second"].mtime


def test_list_info(container: Container):
    t0 = container.clock()
    objects = {"i/a": b"", "i/b": b"xy", "i/sub/c": b"xyz" * 100, "j/d": b"d"}
    for name, data in objects.items():
        container.put(name, data)
    t1 = container.clock()
    infos = list(container.list_info("i/"))
    assert sorted(i.name for i in infos) == ["i/a", "i/b", "i/sub/c"]
    for info in infos:
        assert info.size == len(objects[info.name])
        assert t0 - CLOCK_SLACK <= info.mtime <= t1 + CLOCK_SLACK
        # a listing and a HEAD give the same time, up to S3's whole seconds
        assert abs(info.mtime - container.stat(info.name).mtime) <= 1.0
    assert sorted(i.name for i in container.list_info()) == sorted(objects)
    assert list(container.list_info("zzz")) == []
    container.delete("i/b")
    assert sorted(i.name for i in container.list_info("i")) == ["i/a", "i/sub/c"]


def test_list_info_paginates(kind, backend: Backend):
    c = backend.open(new_container_name())
    c.inner.list_page_size = 3 if kind != "s3" else 2  # several pages from a few objects
    names = [f"p/{i:02d}" for i in range(7)]
    for n in names:
        c.put(n, n.encode())
    infos = list(c.list_info("p/"))
    assert sorted(i.name for i in infos) == names
    assert all(i.size == 4 for i in infos)


def test_swift_time_parsing():
    """HEAD prefers X-Timestamp (sub-second); the listing's ISO time is UTC without a zone."""
    from blockvault.store.swift import _head_mtime, _listing_mtime

    hdrs = {"x-timestamp": "1700000000.12345", "last-modified": "Tue, 14 Nov 2023 22:13:21 GMT"}
    assert _head_mtime(hdrs, "o") == 1700000000.12345
    del hdrs["x-timestamp"]
    assert _head_mtime(hdrs, "o") == 1700000001.0  # the proxy rounds Last-Modified up
    with pytest.raises(StorePermanentError, match="no valid X-Timestamp"):
        _head_mtime({}, "o")
    item = {"name": "o", "last_modified": "2023-11-14T22:13:20.123450"}
    assert _listing_mtime(item) == pytest.approx(1700000000.12345)
    with pytest.raises(StorePermanentError, match="no valid last_modified"):
        _listing_mtime({"name": "o", "last_modified": "yesterday"})


# ------------------------------------------------------------------ put_new ---


def test_put_new_creates_only_when_absent(container: Container):
    assert container.put_new("config", b"first deployment") is True
    assert container.get("config") == b"first deployment"
    assert container.put_new("config", b"second deployment!") is False
    assert container.get("config") == b"first deployment"  # the old bytes, untouched
    assert container.head("config") == len(b"first deployment")
    container.put("plain", b"written by put")
    assert container.put_new("plain", b"other") is False
    assert container.get("plain") == b"written by put"
    assert container.put_new("deep/er/name", b"") is True  # empty, under new "directories"
    assert container.get("deep/er/name") == b""
    container.delete("config")
    assert container.put_new("config", b"again") is True  # absent again: created again
    assert container.get("config") == b"again"
    assert sorted(container.list()) == ["config", "deep/er/name", "plain"]


RACE_WRITERS = 8


def _race(container: Container, name: str) -> tuple[list[bytes], bytes]:
    """RACE_WRITERS threads call put_new(name) with different bytes at the same moment:
    (the bytes of those answered True, the bytes stored)."""
    barrier = threading.Barrier(RACE_WRITERS)

    def create(i: int) -> tuple[bytes, bool]:
        data = f"deployment {i} ".encode() * (i + 1)
        barrier.wait()
        return data, container.put_new(name, data)

    with ThreadPoolExecutor(RACE_WRITERS) as pool:
        results = list(pool.map(create, range(RACE_WRITERS)))
    return [data for data, won in results if won], container.get(name)


def test_put_new_race(kind, container: Container):
    """Writers racing to create one name: on the local store exactly one wins and its bytes
    are stored. Swift and S3 (Swift's s3api here) check If-None-Match when a PUT starts, not
    when it commits (see test_swift_put_new_overlapping_writers_both_win): overlapping
    writers can both answer True there, so only what holds on every backend is asserted for
    them: someone won, and what is stored is a winner's bytes, never a loser's."""
    rounds = 20 if kind == "local" else 6
    several = 0
    for r in range(rounds):
        winners, stored = _race(container, f"race/{r}/config")
        assert winners, "nobody created the object"
        assert stored in winners
        if kind == "local":
            assert len(winners) == 1, winners
            assert stored == winners[0]
        several += len(winners) > 1
    if several:
        print(f"{kind}: {several}/{rounds} races had more than one True")


@pytest.mark.parametrize("kind", ["swift"])
def test_swift_put_new_overlapping_writers_both_win(kind, backend, monkeypatch):
    """Why put_new is not atomic on Swift, made deterministic: A's PUT reaches the proxy
    (timestamp t_A, the object server finds no object), then B's (t_B > t_A, no object
    yet either); A's body completes, A reads back its own object: True. Then B's body
    completes: its newer object replaces A's and B reads back its own: True as well. Both
    bodies are held back by stalling their first read."""
    c = backend.open(new_container_name())
    bodies = {b"A" * 100: threading.Event(), b"B" * 100: threading.Event()}
    started = {data: threading.Event() for data in bodies}

    class Stalled(io.BytesIO):
        def __init__(self, data: bytes) -> None:
            super().__init__(data)
            self.data = data

        def read(self, size: int | None = -1) -> bytes:
            started[self.data].set()  # the request headers are sent
            assert bodies[self.data].wait(30)
            return super().read(size)

    real_put = swiftclient.Connection.put_object

    def put_object(self, container, obj, contents, *args, **kwargs):
        if isinstance(contents, bytes) and contents in bodies:
            contents = Stalled(contents)
        return real_put(self, container, obj, contents, *args, **kwargs)

    monkeypatch.setattr(swiftclient.Connection, "put_object", put_object)
    results: dict[bytes, bool] = {}

    def create(data: bytes) -> None:
        results[data] = c.put_new("config", data)

    a, b = list(bodies)
    ta = threading.Thread(target=create, args=(a,))
    tb = threading.Thread(target=create, args=(b,))
    try:
        ta.start()
        assert started[a].wait(30)
        time.sleep(0.5)  # the proxy stamps A and the object server checks: no object
        tb.start()
        assert started[b].wait(30)
        time.sleep(0.5)  # B too, later
        bodies[a].set()
        ta.join(30)
        assert results.get(a) is True
        bodies[b].set()
        tb.join(30)
    finally:
        for ev in bodies.values():
            ev.set()
        ta.join()
        tb.join()
    assert results == {a: True, b: True}  # two "creators": not atomic
    assert c.get("config") == b  # the newer object stays
    # Once an object exists, If-None-Match holds: a later creator loses.
    assert c.put_new("config", b"C") is False


@pytest.mark.parametrize("kind", ["swift", "s3"])
def test_put_new_read_back_turns_a_replaced_writer_into_false(kind, backend, monkeypatch):
    """On Swift and S3, put_new answers True only if the object it reads back right after
    its PUT is its own: here another writer's object replaces it in between."""
    c = backend.open(new_container_name())
    inner = c.inner
    real_put = type(inner)._put

    def put_then_replaced(self, name, body, size, *args, **kwargs):
        real_put(self, name, body, size, *args, **kwargs)
        if body == b"ours":
            c.put(name, b"the other writer's")  # lands between our PUT and our read-back

    monkeypatch.setattr(type(inner), "_put", put_then_replaced)
    assert c.put_new("config", b"ours") is False
    monkeypatch.undo()
    assert c.get("config") == b"the other writer's"


# ------------------------------------------------------------ configuration ---


def test_backup_service_name():
    assert backup_service_name("local") == "cinder.backup.drivers.posix"
    assert backup_service_name("swift") == "cinder.backup.drivers.swift"
    assert backup_service_name("s3") == "cinder.backup.drivers.s3"
    for k in KINDS:
        assert backup_service_name(k).startswith("cinder.backup.drivers")


def test_unknown_store_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown store 'ftp'"):
        make_backend(SimpleNamespace(store="ftp", data_dir=tmp_path))


def test_factory_local_root_and_wrapper(tmp_path):
    b = make_backend(SimpleNamespace(store="local", data_dir=tmp_path))
    assert isinstance(b, RetryingBackend) and b.kind == "local"
    b.open("cont").put("o", b"1")
    assert (tmp_path / "store" / "cont" / "o").read_bytes() == b"1"


def test_factory_swift_needs_credentials(tmp_path):
    with pytest.raises(ValueError, match="swift_auth_url"):
        make_backend(SimpleNamespace(store="swift", data_dir=tmp_path))


@pytest.mark.parametrize(
    "name,ok",
    [
        ("abc", True),
        ("my.bucket-01", True),
        ("ab", False),
        ("a" * 64, False),
        ("Upper", False),
        ("under_score", False),
        ("-start", False),
        ("end-", False),
        ("a..b", False),
        ("192.168.1.10", False),
    ],
)
def test_s3_bucket_name_rules(name, ok):
    assert (bucket_name_problem(name) is None) == ok
    b = S3Backend(endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b")
    reason = b.validate_container_name(name)
    assert (reason is None) == ok
    if not ok:
        assert "bucket" in reason
        wrapped = RetryingBackend(b)
        assert wrapped.validate_container_name(name) == reason  # delegated
        with pytest.raises(StorePermanentError, match="invalid bucket name"):
            wrapped.open(name)  # rejected before contacting the store


def test_swift_container_name_rules():
    b = SwiftBackend("http://127.0.0.1:9/auth/v1.0", "u", "k")
    assert b.validate_container_name("Any_Name.OK") is None
    assert "'/'" in b.validate_container_name("a/b")
    assert b.validate_container_name("x" * 300)


# ------------------------------------------------------------ access errors ---


@pytest.mark.parametrize("kind", ["swift", "s3"])
def test_bad_credentials(kind, saio, tmp_path):
    over = {"swift_key": "wrong"} if kind == "swift" else {"s3_secret_key": "wrong"}
    b = make_backend(settings_for(kind, saio, tmp_path, **over))
    t0 = time.monotonic()
    with pytest.raises(StorePermanentError, match="authentication/access denied") as ei:
        b.open(new_container_name())
    assert time.monotonic() - t0 < 5, "permanent errors must not be retried"
    assert "wrong" not in str(ei.value)


@pytest.mark.parametrize("kind", ["swift", "s3"])
def test_accounts_are_isolated(kind, saio, tmp_path):
    owner = make_backend(settings_for(kind, saio, tmp_path))
    name = new_container_name()
    owner.open(name).put("secret", b"only for AUTH_test")
    if kind == "swift":
        other = settings_for(kind, saio, tmp_path, swift_user=saio.user2, swift_key=saio.key2)
    else:
        other = settings_for(
            kind, saio, tmp_path, s3_access_key=saio.user2, s3_secret_key=saio.key2
        )
    intruder = make_backend(other)
    with pytest.raises((StorePermanentError, ObjectNotFound)):
        intruder.open(name, create=False).get("secret")
    try:
        c = intruder.open(name)
    except StorePermanentError:
        pass
    else:
        try:
            names = list(c.list())
        except StorePermanentError:
            names = []
        assert "secret" not in names
        with pytest.raises((StorePermanentError, ObjectNotFound)):
            c.get("secret")


@pytest.mark.parametrize("kind", ["swift"])
def test_swift_non_admin_user_denied(kind, saio, tmp_path):
    """test:tester3 is in AUTH_test but not an admin: no access without an ACL."""
    owner = make_backend(settings_for(kind, saio, tmp_path))
    name = new_container_name()
    owner.open(name).put("o", b"1")
    b = make_backend(settings_for(kind, saio, tmp_path, swift_user=saio.user3, swift_key=saio.key3))
    with pytest.raises(StorePermanentError, match="access denied"):
        b.open(name)


# --------------------------------------------------------------- a full store ---


def _swift_admin(saio) -> swiftclient.Connection:
    return swiftclient.Connection(
        authurl=saio.auth_url, user=saio.user, key=saio.key, retries=0
    )


@pytest.mark.parametrize("kind", ["swift", "s3"])
def test_container_quota_is_store_full(kind, saio, tmp_path):
    """A real 413 from Swift's container_quotas middleware (s3api turns it into
    EntityTooLarge): StoreFull at once, not retried, and gone once the quota is lifted."""
    b = RetryingBackend(
        make_backend(settings_for(kind, saio, tmp_path)).inner,
        sleep=lambda d: pytest.fail("a full store must not be retried"),
    )
    name = new_container_name()
    c = b.open(name)
    c.put("small", b"12345")
    admin = _swift_admin(saio)  # the S3 bucket is the Swift container of the same account
    admin.post_container(name, {"X-Container-Meta-Quota-Bytes": "10"})
    try:
        with pytest.raises(StoreFull) as ei:
            c.put("packs/ab/big", b"x" * 100)
        msg = str(ei.value)
        assert msg.startswith("the object store is full (")
        assert f"while writing packs/ab/big in container {name}" in msg, msg
        assert "Upload exceeds quota" in msg, msg
        assert ("413" if kind == "swift" else "EntityTooLarge") in msg, msg
        assert (ei.value.name, ei.value.container) == ("packs/ab/big", name)
        with pytest.raises(StoreFull):
            c.put_new("config", b"y" * 100)
        with tempfile.TemporaryFile() as f:
            f.write(b"z" * 100)
            with pytest.raises(StoreFull):
                c.put_file("manifests/m", f, 100)
        assert c.head("packs/ab/big") is None and c.head("config") is None
    finally:
        admin.post_container(name, {"X-Container-Meta-Quota-Bytes": ""})
        admin.close()
    c.put("packs/ab/big", b"x" * 100)
    assert c.get("packs/ab/big") == b"x" * 100


class _CannedStore:
    """A fake Swift/S3 endpoint that answers every object PUT with one canned error, so
    swiftclient and botocore raise exactly what they raise for a real one (507s cannot be
    produced on the test SAIO without filling its disk). Auth, container/bucket HEADs and
    object HEADs (404) answer enough for a backend to get to the PUT."""

    def __init__(self, status: int, reason: str, body: bytes, content_type: str) -> None:
        self.answer = (status, reason, body, content_type)
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def _reply(self, status, reason="", body=b"", headers=None, ctype="text/plain"):
                self.send_response(status, reason or None)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # tempauth
                port = self.server.server_address[1]
                self._reply(200, headers={
                    "X-Storage-Url": f"http://127.0.0.1:{port}/v1/AUTH_t",
                    "X-Auth-Token": "tok",
                })

            def do_HEAD(self) -> None:
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                is_object = len(parts) >= (4 if parts[:1] == ["v1"] else 2)
                self._reply(404 if is_object else 204)

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, reason, body, ctype = store.answer
                self._reply(status, reason, body, ctype=ctype)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _s3_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>r</RequestId></Error>").encode()


FULL_ANSWERS = [
    # Swift: the object servers' disks full; an account quota (account_quotas)
    ("swift", 507, "Insufficient Storage",
     b"<html><h1>Insufficient Storage</h1><p>There was not enough space to save the "
     b"resource. Drive: sdb1</p></html>", "text/html", "swift: 507 Insufficient Storage"),
    ("swift", 413, "Request Entity Too Large", b"Upload exceeds quota.", "text/plain",
     "swift: 413 Request Entity Too Large: Upload exceeds quota."),
    # S3: MinIO's full drives and bucket quota, RGW's quota (a 403!), AWS's size limit,
    # any other 507
    ("s3", 507, "Insufficient Storage",
     _s3_error("XMinioStorageFull", "Storage backend has reached its minimum free drive "
               "threshold. Please delete a few objects to proceed."), "application/xml",
     "s3: XMinioStorageFull: Storage backend has reached"),
    ("s3", 400, "Bad Request", _s3_error("XMinioAdminBucketQuotaExceeded",
                                         "Bucket quota exceeded"), "application/xml",
     "s3: XMinioAdminBucketQuotaExceeded: Bucket quota exceeded"),
    ("s3", 403, "Forbidden", _s3_error("QuotaExceeded", ""), "application/xml",
     "s3: QuotaExceeded"),
    ("s3", 400, "Bad Request", _s3_error("EntityTooLarge", "Your proposed upload exceeds "
                                         "the maximum allowed size"), "application/xml",
     "s3: EntityTooLarge: Your proposed upload exceeds"),
    ("s3", 507, "Insufficient Storage", b"", "text/plain", "s3: 507"),
]


@pytest.mark.parametrize(
    "kind,status,reason,body,ctype,want", FULL_ANSWERS,
    ids=["swift-507-disks", "swift-413-quota", "s3-minio-full", "s3-minio-bucket-quota",
         "s3-rgw-quota-403", "s3-entity-too-large", "s3-507-no-code"],
)
def test_full_store_answers_are_store_full(kind, status, reason, body, ctype, want):
    fake = _CannedStore(status, reason, body, ctype)
    try:
        if kind == "swift":
            inner: Backend = SwiftBackend(f"http://127.0.0.1:{fake.port}/auth/v1.0", "u", "k")
        else:
            inner = S3Backend(endpoint_url=f"http://127.0.0.1:{fake.port}",
                              access_key="a", secret_key="b")
        b = RetryingBackend(inner, sleep=lambda d: pytest.fail("a full store is not retried"))
        c = b.open("bucket")
        for put in (lambda: c.put("packs/ab/p", b"data"),
                    lambda: c.put_new("packs/ab/p", b"data")):
            with pytest.raises(StoreFull) as ei:
                put()
            msg = str(ei.value)
            assert msg.startswith(f"the object store is full ({want}"), msg
            assert msg.endswith(") while writing packs/ab/p in container bucket"), msg
            assert (ei.value.name, ei.value.container) == ("packs/ab/p", "bucket")
            assert not isinstance(ei.value, StoreUnavailable | StorePermanentError)
        b.close()
    finally:
        fake.close()


# ------------------------------------------------------------------ outages ---


def _outage_backend(kind, saio, tmp_path, **retry) -> RetryingBackend:
    inner = make_backend(settings_for(kind, saio, tmp_path)).inner
    return RetryingBackend(inner, **retry)


@pytest.mark.parametrize("kind", ["swift", "s3"])
def test_proxy_down_is_unavailable_after_retries(kind, saio, tmp_path):
    b = _outage_backend(
        kind, saio, tmp_path, attempts=4, base_delay=0.05, max_delay=0.2, budget=3.0
    )
    c = b.open(new_container_name())
    c.put("before", b"1")
    saio.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable") as ei:
            c.put("during", b"2")
        assert time.monotonic() - t0 < 10
        msg = str(ei.value)
        assert kind in msg and "4 time(s)" in msg
        assert saio.key not in msg  # never the credentials
        with pytest.raises(StoreUnavailable):
            c.get("before")
        with pytest.raises(StoreUnavailable):
            b.open(new_container_name())
    finally:
        saio.start()
    assert c.get("before") == b"1"


@pytest.mark.parametrize("kind", ["swift", "s3"])
def test_proxy_restarted_within_budget(kind, saio, tmp_path):
    b = _outage_backend(
        kind, saio, tmp_path, attempts=200, base_delay=0.05, max_delay=0.5, budget=60.0
    )
    c = b.open(new_container_name())
    c.put("before", b"1")
    saio.stop()
    errors: list[BaseException] = []

    def restart():
        time.sleep(1.0)
        try:
            saio.start()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=restart)
    t.start()
    try:
        t0 = time.monotonic()
        c.put("during", b"survived the outage")
        assert time.monotonic() - t0 >= 0.9  # it really waited for the proxy
    finally:
        t.join()
        if errors:
            saio.start()
    assert not errors
    assert c.get("during") == b"survived the outage"


# --------------------------------------------------------------- retry layer ---


class _Flaky(Backend):
    """A backend whose containers fail ``failures`` times with ``exc`` before working."""

    kind = "flaky"

    def __init__(self, failures: int, exc: Exception) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc

    def open(self, container: str, create: bool = True) -> Container:
        backend = self

        class C(Container):
            name = container

            def put(self, name, data):
                backend._maybe_fail()

            def put_file(self, name, f, size):
                backend._maybe_fail()

            def put_new(self, name, data):
                backend._maybe_fail()
                return name == "new"

            def get(self, name, offset=0, length=None):
                backend._maybe_fail()
                return b"data"

            def head(self, name):
                backend._maybe_fail()
                return 4

            def delete(self, name):
                backend._maybe_fail()

            def list(self, prefix=""):
                backend._maybe_fail()
                yield from ["a", "b"]

            def list_info(self, prefix=""):
                backend._maybe_fail()
                yield from [ObjectInfo("a", 4, 1.0), ObjectInfo("b", 4, 2.0)]

            def stat(self, name):
                backend._maybe_fail()
                return ObjectInfo(name, 4, 1.0)

        return C()

    def validate_container_name(self, container):
        return "never" if container == "bad" else None


def test_retry_recovers_from_transient_errors():
    sleeps: list[float] = []
    inner = _Flaky(3, StoreUnavailable("503 Service Unavailable"))
    b = RetryingBackend(inner, attempts=5, base_delay=0.1, max_delay=1.0, sleep=sleeps.append)
    c = b.open("c")
    assert c.get("x") == b"data"
    assert inner.calls == 4 and len(sleeps) == 3
    assert all(0 <= d <= min(1.0, 0.1 * 2**i) for i, d in enumerate(sleeps))  # full jitter
    inner.calls, inner.failures = 0, 2
    assert list(c.list()) == ["a", "b"]  # the first page is retried too
    assert b.kind == "flaky" and b.validate_container_name("bad") == "never"


def test_retry_covers_stat_and_list_info():
    inner = _Flaky(2, StoreUnavailable("503 Service Unavailable"))
    c = RetryingBackend(inner, attempts=3, sleep=lambda d: None).open("c")
    assert c.stat("x") == ObjectInfo("x", 4, 1.0)
    assert inner.calls == 3
    inner.calls = 0
    assert [i.name for i in c.list_info()] == ["a", "b"]
    assert inner.calls == 3
    inner.calls, inner.failures = 0, 100
    with pytest.raises(StoreUnavailable, match="unreachable"):
        c.stat("x")
    assert inner.calls == 3


def test_retry_covers_put_new():
    inner = _Flaky(2, StoreUnavailable("503 Service Unavailable"))
    c = RetryingBackend(inner, attempts=3, sleep=lambda d: None).open("c")
    assert c.put_new("new", b"1") is True
    assert inner.calls == 3
    inner.calls = 0
    assert c.put_new("taken", b"1") is False  # the inner answer, passed on
    inner.calls, inner.failures = 0, 100
    with pytest.raises(StoreUnavailable, match=r"PUT \(if absent\) c/new failed 3 time"):
        c.put_new("new", b"1")


def test_put_new_is_not_implemented_by_default():
    class Bare(Container):
        name = "c"
        put = put_file = get = head = delete = list = list_info = stat = None

    with pytest.raises(NotImplementedError, match="Bare does not implement put_new"):
        Bare().put_new("config", b"1")


def test_retry_gives_up_after_attempts():
    inner = _Flaky(100, StoreUnavailable("connection refused"))
    b = RetryingBackend(inner, attempts=4, sleep=lambda d: None)
    with pytest.raises(StoreUnavailable, match="flaky object store was unreachable") as ei:
        b.open("c").put("x", b"1")
    assert "connection refused" in str(ei.value) and "4 time(s)" in str(ei.value)
    assert inner.calls == 4


def test_retry_respects_time_budget():
    inner = _Flaky(1000, StoreUnavailable("timeout"))
    b = RetryingBackend(inner, attempts=1000, base_delay=0.05, max_delay=0.05, budget=0.3)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        b.open("c").head("x")
    assert time.monotonic() - t0 < 1.0
    assert inner.calls < 1000


@pytest.mark.parametrize(
    "exc",
    [StorePermanentError("403 Forbidden"), ObjectNotFound("x", "c"),
     StoreFull("no space left on device", "x", "c")],
    ids=repr,
)
def test_retry_does_not_retry_permanent_errors(exc):
    inner = _Flaky(1, exc)
    b = RetryingBackend(inner, sleep=lambda d: pytest.fail("must not sleep"))
    with pytest.raises(type(exc)):
        b.open("c").get("x")
    assert inner.calls == 1
