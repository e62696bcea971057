"""A throwaway PostgreSQL database for a test: the machine's server (127.0.0.1:5432, trust
auth, or ``BLOCKVAULT_TEST_PG``), a database of its own, dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

PG = os.environ.get("BLOCKVAULT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database; dropped (connections and all) after."""
    psycopg = pytest.importorskip("psycopg")
    name = f"bv_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG}: {exc}")
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        base = PG.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        try:
            yield f"{base}/{name}"
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.close()
