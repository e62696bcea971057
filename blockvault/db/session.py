"""Engine and session factory; schema upgrades through Alembic.

Two kinds of transaction. ``session()`` is for every decision that reads then writes: on
SQLite it begins with ``BEGIN IMMEDIATE`` (the write lock up front, so no lost update).
``reader()`` is for pure reads (show, list, detail, quotas, dashboard, metrics): on SQLite a
deferred ``BEGIN`` on a ``query_only`` connection (a WAL reader never waits for the write
lock and never holds it), on PostgreSQL a ``READ ONLY`` transaction; a write inside either
fails with an error instead of happening.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"

#: connections kept open / opened beyond those under load (see Database)
DEFAULT_POOL_SIZE = 40
DEFAULT_MAX_OVERFLOW = 10


class Database:
    def __init__(self, url: str, pool_size: int = DEFAULT_POOL_SIZE,
                 max_overflow: int = DEFAULT_MAX_OVERFLOW) -> None:
        self.url = url
        # The API runs service calls in a thread pool (40 threads by default) and workers
        # add their own: a pool smaller than that makes overflow connections that are
        # opened and closed per request (PostgreSQL: a new backend each time).
        kwargs: dict = {"future": True}
        self.is_sqlite = url.startswith("sqlite")
        if not (url in ("sqlite://", "sqlite:///") or ":memory:" in url):  # memory: one conn
            kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
        if self.is_sqlite:
            # Workers run in threads; SQLite serialises writers, and a busy timeout
            # turns momentary lock contention into a short wait instead of an error.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # BEGIN IMMEDIATE so a read-then-write transaction takes the write lock
            # up front; pysqlite's deferred BEGIN would otherwise allow lost updates.
            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
            # Readers get connections of their own: query_only is per connection, and
            # their BEGIN is deferred (a snapshot at the first read, no lock taken).
            self.read_engine: Engine = create_engine(url, **kwargs)
            event.listen(self.read_engine, "connect", _sqlite_reader_pragmas)
            event.listen(self.read_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        else:
            # Same pool; psycopg begins these transactions with BEGIN READ ONLY, and
            # SQLAlchemy restores read-write when the connection goes back to the pool.
            self.read_engine = self.engine.execution_options(postgresql_readonly=True)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._readers = sessionmaker(self.read_engine, expire_on_commit=False)

    def upgrade(self) -> None:
        """Bring the schema to the newest revision (idempotent)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection_url"] = self.url
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Several processes may start at once against a fresh database: one
                # migrates, the others wait and then find nothing to do.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7424658214)")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def reader(self) -> Iterator[Session]:
        """One read-only transaction: a consistent snapshot that takes no write lock.

        For reads that decide nothing: anything that reads and then writes (or locks rows
        with FOR UPDATE) belongs in ``session()``. Objects read stay usable afterwards
        (expire_on_commit is off), as with ``session()``.
        """
        with self._readers() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        if self.is_sqlite:
            self.read_engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Autocommit at the driver level; SQLAlchemy's "begin" event issues BEGIN IMMEDIATE.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_reader_pragmas(dbapi_conn, record) -> None:
    _sqlite_pragmas(dbapi_conn, record)
    cur = dbapi_conn.cursor()
    # Any write on this connection fails ("attempt to write a readonly database").
    cur.execute("PRAGMA query_only=ON")
    cur.close()
