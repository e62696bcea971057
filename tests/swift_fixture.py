"""A real OpenStack Swift (with the S3 API) for tests: the session fixture ``swift_server``.

Starts the project's own Swift all-in-one (tools/swift/start-swift.sh) in a temporary
directory on free loopback ports, once per test session, and stops it at session end.
The first run on a machine pip-installs Swift into a cached venv and apt-installs memcached
(see tools/swift/start-swift.sh); later runs start in a few seconds.

Use it from a conftest with either of::

    pytest_plugins = ["tests.swift_fixture"]
    from tests.swift_fixture import swift_server  # noqa: F401

Importing it in several places is fine: one server per session however often the fixture is
registered. Set ``BLOCKVAULT_SKIP_SWIFT=1`` to skip the tests that need it; otherwise a
Swift that fails to start is an error, not a skip.

The yielded :class:`SwiftServer` has ``auth_url``, ``s3_endpoint``, ``region``, the tempauth
``users`` (``{"test:tester": "testing", ...}``), ``stop()`` (stops only the proxy: the
endpoint refuses connections, as in an outage) and ``start()`` (brings it back; idempotent).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "swift"
START_SCRIPT = TOOLS / "start-swift.sh"
STOP_SCRIPT = TOOLS / "stop-swift.sh"

#: first start may apt-get memcached and pip install swift
START_TIMEOUT = float(os.environ.get("BLOCKVAULT_SWIFT_START_TIMEOUT", "900"))

_STASH_ATTR = "_blockvault_swift_server"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class SwiftServer:
    run_dir: Path
    port: int
    account_port: int
    container_port: int
    object_port: int
    memcached_port: int
    region: str = "us-east-1"
    #: tempauth users: test:tester (admin of AUTH_test, also the S3 access key),
    #: test:tester3 (non-admin in AUTH_test), test2:tester2 (admin of AUTH_test2)
    users: dict[str, str] = field(
        default_factory=lambda: {
            "test:tester": "testing",
            "test:tester3": "testing3",
            "test2:tester2": "testing2",
        }
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopped_all: bool = field(default=False, repr=False)

    # convenient names for the two admin users
    user = "test:tester"
    key = "testing"
    user2 = "test2:tester2"
    key2 = "testing2"
    user3 = "test:tester3"
    key3 = "testing3"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth_url(self) -> str:
        return f"{self.url}/auth/v1.0"

    @property
    def s3_endpoint(self) -> str:
        return self.url

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update(
            SWIFT_PORT=str(self.port),
            SWIFT_ACCOUNT_PORT=str(self.account_port),
            SWIFT_CONTAINER_PORT=str(self.container_port),
            SWIFT_OBJECT_PORT=str(self.object_port),
            SWIFT_MEMCACHED_PORT=str(self.memcached_port),
            SWIFT_S3_LOCATION=self.region,
        )
        # two proxy workers: the proxy (SigV4, MD5s, eventlet) is the SAIO's bottleneck
        e.setdefault("SWIFT_PROXY_WORKERS", "2")
        return e

    def _run(self, cmd: list[str], timeout: float) -> None:
        proc = subprocess.run(
            cmd,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
            )

    def start(self) -> None:
        """Start everything not running (all of it the first time, the proxy after stop())."""
        with self._lock:
            self._run(["bash", str(START_SCRIPT), str(self.run_dir)], START_TIMEOUT)

    def stop(self) -> None:
        """Stop only the proxy: Swift and S3 requests now fail with connection refused."""
        with self._lock:
            self._run(["bash", str(STOP_SCRIPT), str(self.run_dir), "proxy-server"], 60)

    def stop_all(self) -> None:
        with self._lock:
            if self._stopped_all:
                return
            self._stopped_all = True
            subprocess.run(
                ["bash", str(STOP_SCRIPT), str(self.run_dir)],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=120,
                check=False,
            )

    def log_tail(self, server: str = "proxy-server", lines: int = 40) -> str:
        try:
            text = (self.run_dir / "log" / f"{server}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_swift_server(run_dir: Path) -> SwiftServer:
    """Start a new SAIO in ``run_dir`` on free ports (also usable outside pytest)."""
    port, account, container, obj, memcached = _free_ports(5)
    server = SwiftServer(
        run_dir=run_dir,
        port=port,
        account_port=account,
        container_port=container,
        object_port=obj,
        memcached_port=memcached,
    )
    try:
        server.start()
    except BaseException:
        server.stop_all()
        raise
    atexit.register(server.stop_all)  # belt and braces if the session dies
    return server


@pytest.fixture(scope="session")
def swift_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A running Swift all-in-one (Swift API + S3 API) for the whole test session."""
    if os.environ.get("BLOCKVAULT_SKIP_SWIFT") == "1":
        pytest.skip("BLOCKVAULT_SKIP_SWIFT=1: tests needing a real Swift are skipped")
    config = request.config
    # One server per session even if the fixture is registered from several modules (each
    # registration is its own FixtureDef): share it through the config, count the users.
    state = getattr(config, _STASH_ATTR, None)
    if state is None:
        server = start_swift_server(tmp_path_factory.mktemp("swift"))
        state = {"server": server, "users": 0}
        setattr(config, _STASH_ATTR, state)
    state["users"] += 1
    server = state["server"]
    try:
        yield server
    finally:
        state["users"] -= 1
        if state["users"] == 0:
            server.stop_all()
            setattr(config, _STASH_ATTR, None)
