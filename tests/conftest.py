import uuid

import pytest

from tests.server import Server
from tests.swift_fixture import swift_server  # noqa: F401  (registers the fixture)

STORES = ["local", "swift", "s3"]
#: Garbage collection on a test's time scale, so API tests run the whole protocol
#: (condemn, then sweep a grace period later) against every store.
FAST_GC = {"BLOCKVAULT_GC_GRACE": "3", "BLOCKVAULT_STORE_LAG": "0.5",
           "BLOCKVAULT_MAINTENANCE_INTERVAL": "0.5"}


def store_env(store: str, saio) -> dict[str, str]:
    """Settings that point a blockvault server at the test Swift (or its S3 API)."""
    if store == "swift":
        return {
            "BLOCKVAULT_STORE": "swift",
            "BLOCKVAULT_SWIFT_AUTH_URL": saio.auth_url,
            "BLOCKVAULT_SWIFT_USER": "test:tester",
            "BLOCKVAULT_SWIFT_KEY": saio.users["test:tester"],
        }
    if store == "s3":
        return {
            "BLOCKVAULT_STORE": "s3",
            "BLOCKVAULT_S3_ENDPOINT_URL": saio.s3_endpoint,
            "BLOCKVAULT_S3_REGION": saio.region,
            "BLOCKVAULT_S3_ACCESS_KEY": "test:tester",
            "BLOCKVAULT_S3_SECRET_KEY": saio.users["test:tester"],
        }
    return {}


@pytest.fixture(scope="module", params=STORES)
def server(request, tmp_path_factory):
    """A real blockvault server process, once per store kind (local, Swift, S3)."""
    env = dict(FAST_GC)
    if request.param != "local":
        saio = request.getfixturevalue("swift_server")
        env.update(store_env(request.param, saio))
        # a container of its own, so servers of different test modules never share one
        env["BLOCKVAULT_DEFAULT_CONTAINER"] = f"bv-{uuid.uuid4().hex[:12]}"
    srv = Server(tmp_path_factory.mktemp(f"bv-{request.param}"), env).start()
    srv.store = request.param
    yield srv
    srv.stop()


def _project() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def alice(server):
    """A member of a fresh project (so quotas and listings start empty)."""
    return server.client("alice", _project())


@pytest.fixture
def bob(server):
    return server.client("bob", _project())


@pytest.fixture
def admin(server):
    return server.client("admin", "admin")
