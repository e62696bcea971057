import uuid

import pytest

from tests.server import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("bv")).start()
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
