import pytest

from tests.server import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("bv")).start()
    yield srv
    srv.stop()


@pytest.fixture
def alice(server):
    return server.client("alice", "proja")


@pytest.fixture
def bob(server):
    return server.client("bob", "projb")


@pytest.fixture
def admin(server):
    return server.client("admin", "admin")
