"""A real Keystone (identity v3) for a test module: tools/keystone/start-keystone.sh on a
free loopback port (Keystone from PyPI in a cached venv, SQLite, fernet tokens, admin
bootstrapped with ``ADMIN_PASSWORD``), stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import free_port

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "keystone"
ADMIN_PASSWORD = "secret"  # start-keystone.sh's bootstrap admin


@contextlib.contextmanager
def keystone_process(run_dir: Path) -> Iterator[str]:
    """Keystone's base URL (``http://127.0.0.1:PORT``, no ``/v3``) while it runs;
    ``BLOCKVAULT_SKIP_KEYSTONE=1`` skips the test instead."""
    if os.environ.get("BLOCKVAULT_SKIP_KEYSTONE") == "1":
        pytest.skip("BLOCKVAULT_SKIP_KEYSTONE=1")
    port = free_port()
    env = {**os.environ, "KEYSTONE_PORT": str(port), "KEYSTONE_ADMIN_PASSWORD": ADMIN_PASSWORD}
    p = subprocess.run(["bash", str(TOOLS / "start-keystone.sh"), str(run_dir)], env=env,
                       check=False, timeout=900, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(TOOLS / "stop-keystone.sh"), str(run_dir)], check=False)
