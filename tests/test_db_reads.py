"""Reads that never wait for writers, lists that never sort a whole project, a PostgreSQL
pool that keeps its connections (issue 14, database part).

Real SQLite files and a real PostgreSQL (tests/pg.py): the write lock is held by a real
second connection, query plans are the databases' own EXPLAIN, connections are counted by
the server's backend pids.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import event, insert, text
from sqlalchemy.exc import DBAPIError

from blockvault.db.models import Backup, QuotaLimit, Schedule, Snapshot, Volume
from blockvault.db.session import Database
from blockvault.service.backups import BACKUP_LIST
from blockvault.service.context import RequestContext
from blockvault.service.listing import ListSpec, list_resources
from blockvault.service.schedules import ScheduleService
from blockvault.service.volumes import SNAPSHOT_LIST, VOLUME_LIST
from tests.pg import pg_database
from tests.server import Server

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'bv.sqlite'}")
        database.upgrade()
        yield database
        database.dispose()
    else:
        with pg_database() as url:
            database = Database(url)
            database.upgrade()
            yield database
            database.dispose()


# -- read-only transactions -----------------------------------------------------------------


def test_sqlite_reader_proceeds_while_another_connection_holds_the_write_lock(tmp_path):
    path = tmp_path / "bv.sqlite"
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    with db.session() as s:
        s.add(QuotaLimit(project_id="p1", resource="backups", hard_limit=7))
    # A real second connection (another process would look the same) takes the write lock
    # and keeps it while the reader runs.
    holder = sqlite3.connect(path, isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE quota_limits SET hard_limit = 8")  # not committed: invisible
    try:
        started = time.monotonic()
        with db.reader() as s:
            seen = s.scalar(text("SELECT hard_limit FROM quota_limits"))
        assert seen == 7  # the last committed value, read at once
        assert time.monotonic() - started < 2.0  # the busy timeout (30 s) never ran

        # A read-then-write transaction queues behind the holder, as it must.
        blocked = threading.Event()
        done = threading.Event()

        def write() -> None:
            blocked.set()
            with db.session() as s:
                s.execute(text("UPDATE quota_limits SET hard_limit = 9"))
            done.set()

        t = threading.Thread(target=write)
        t.start()
        blocked.wait()
        assert not done.wait(0.5)  # waiting for the write lock
        holder.execute("COMMIT")
        assert done.wait(10)
        t.join()
    finally:
        holder.close()
    with db.reader() as s:
        assert s.scalar(text("SELECT hard_limit FROM quota_limits")) == 9
    db.dispose()


def test_a_write_in_a_reader_fails_and_changes_nothing(db):
    with pytest.raises(DBAPIError) as err:
        with db.reader() as s:
            s.add(QuotaLimit(project_id="p1", resource="backups", hard_limit=3))
            s.flush()
    message = str(err.value).lower()
    assert "read-only transaction" in message or "readonly database" in message
    with pytest.raises(DBAPIError):
        with db.reader() as s:
            s.execute(text("DELETE FROM quota_limits"))
    with db.session() as s:  # the same pool's connections write again afterwards
        assert s.scalar(text("SELECT count(*) FROM quota_limits")) == 0
        s.add(QuotaLimit(project_id="p1", resource="backups", hard_limit=3))
    with db.reader() as s:
        assert s.scalar(text("SELECT hard_limit FROM quota_limits")) == 3


def test_postgresql_reader_is_a_read_only_transaction_and_writers_stay_read_write():
    with pg_database() as url:
        db = Database(url, pool_size=1, max_overflow=0)  # one connection: both share it
        db.upgrade()
        with db.reader() as s:
            assert s.scalar(text("SHOW transaction_read_only")) == "on"
            reader_pid = s.scalar(text("SELECT pg_backend_pid()"))
            with pytest.raises(DBAPIError, match="FOR UPDATE|read-only"):
                s.execute(text("SELECT 1 FROM quota_limits FOR UPDATE")).all()
        with db.session() as s:
            assert s.scalar(text("SHOW transaction_read_only")) == "off"
            assert s.scalar(text("SELECT pg_backend_pid()")) == reader_pid
        db.dispose()


# -- list indexes ---------------------------------------------------------------------------

#: rows of the project whose lists are explained (other projects' and deleted rows as well)
ROWS = 20000
#: other projects' backups: most of the table, as in a shared deployment
OTHERS = 40000


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(request, tmp_path_factory) -> Iterator[tuple[Database, dict[str, str]]]:
    """One seeded database per backend for the plan tests (they only read)."""
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path_factory.mktemp('plans') / 'bv.sqlite'}")
        database.upgrade()
        yield database, _seed(database)
        database.dispose()
    else:
        with pg_database() as url:
            database = Database(url)
            database.upgrade()
            yield database, _seed(database)
            database.dispose()


def _seed(db: Database) -> dict[str, str]:
    """Backups, volumes, snapshots and schedules of several projects, inserted directly
    (data setup); statistics gathered as a running database would have them."""
    base = dt.datetime(2024, 1, 1)
    projects = ["p-main", "p-other", "p-third"]
    rows = []
    for i in range(ROWS + OTHERS):
        project = projects[0] if i < ROWS else projects[1 + i % 2]
        rows.append(dict(
            id=str(uuid.uuid4()), user_id="u", project_id=project,
            volume_id=f"00000000-0000-0000-0000-{i % 5:012d}",
            display_name=None if i % 7 == 0 else f"b{i % 300}",
            status="available" if i % 10 else "error", container="c", size=1,
            object_count=0, metadata_={}, created_at=base + dt.timedelta(seconds=i // 3),
            deleted=i % 13 == 0, num_dependent_backups=0))
    common = dict(user_id="u", size=1, metadata_={}, status="available", deleted=False)
    owners = [projects[0] if i < ROWS else projects[1 + i % 2] for i in range(ROWS + 4000)]
    when = [base + dt.timedelta(seconds=i // 3) for i in range(ROWS + 4000)]
    with db.session() as s:
        s.execute(insert(Backup), rows)
        s.execute(insert(Volume), [dict(common, id=str(uuid.uuid4()), project_id=p,
                                        availability_zone="nova", created_at=t)
                                   for p, t in zip(owners, when, strict=True)])
        s.execute(insert(Snapshot), [dict(common, id=str(uuid.uuid4()), project_id=p,
                                          volume_id="v", created_at=t)
                                     for p, t in zip(owners, when, strict=True)])
        s.execute(insert(Schedule), [dict(id=str(uuid.uuid4()), project_id=p, user_id="u",
                                          interval_seconds=3600, next_run_at=base,
                                          created_at=t, deleted=False)
                                     for p, t in zip(owners, when, strict=True)])
    if db.is_sqlite:
        with db.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    else:  # what autovacuum does: statistics, and the visibility map index-only scans read
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    return {"volume_id": rows[5]["volume_id"], "marker": rows[ROWS - 1000]["id"]}


def _plans(db: Database, run) -> list[tuple[str, str]]:
    """(statement, the database's plan for it) of every SELECT ``run()`` reads with."""
    seen: list[tuple[str, object]] = []

    def grab(_conn, _cursor, statement, parameters, _context, _many):
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(db.read_engine.engine, "before_cursor_execute", grab)
    try:
        run()
    finally:
        event.remove(db.read_engine.engine, "before_cursor_execute", grab)
    out = []
    with db.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        for statement, parameters in seen:
            cur = raw.cursor()
            if db.is_sqlite:
                cur.execute("EXPLAIN QUERY PLAN " + statement, parameters)
                plan = "\n".join(row[-1] for row in cur.fetchall())
            else:
                cur.execute("EXPLAIN " + statement, parameters)
                plan = "\n".join(row[0] for row in cur.fetchall())
            cur.close()
            out.append((statement, plan))
    return out


def _uses_index_in_order(db: Database, plan: str, index: str) -> bool:
    if db.is_sqlite:
        return f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan
    return (f"Index Scan using {index}" in plan or f"Index Scan Backward using {index}" in plan
            or f"Index Only Scan using {index}" in plan
            or f"Index Only Scan Backward using {index}" in plan)


def _sorts(db: Database, plan: str) -> bool:
    return "TEMP B-TREE" in plan if db.is_sqlite else "Sort" in plan


def _list_plan(db, spec: ListSpec, params: dict[str, str], admin: bool = False,
               version: tuple[int, int] = (3, 64)) -> list[tuple[str, str]]:
    ctx = RequestContext("u", "p-main", is_admin=admin)

    def run() -> None:
        with db.reader() as s:
            list_resources(s, ctx, spec, params, version, 1000)

    return _plans(db, run)


LIST_CASES = [
    # (spec, params, admin, index the page must be read through)
    (BACKUP_LIST, {}, False, "ix_backups_list"),
    (BACKUP_LIST, {"limit": "1000"}, False, "ix_backups_list"),
    (BACKUP_LIST, {"sort": "created_at:asc"}, False, "ix_backups_list"),
    (BACKUP_LIST, {"sort_key": "created_at", "sort_dir": "asc"}, False, "ix_backups_list"),
    (BACKUP_LIST, {"status": "error"}, False, "ix_backups_list_status"),
    (BACKUP_LIST, {"name": "b7"}, False, "ix_backups_list_name"),
    (BACKUP_LIST, {"sort": "name:asc"}, False, "ix_backups_list_name"),
    (BACKUP_LIST, {"sort": "name:desc"}, False, "ix_backups_list_name"),
    (BACKUP_LIST, {"all_tenants": "1"}, True, "ix_backups_list_all"),
    (VOLUME_LIST, {}, False, "ix_volumes_list"),
    (SNAPSHOT_LIST, {}, False, "ix_snapshots_list"),
]


def test_every_list_reads_its_page_through_an_index_in_its_order(seeded):
    db, ids = seeded
    cases = [*LIST_CASES, (BACKUP_LIST, {"volume_id": ids["volume_id"]}, False,
                           "ix_backups_list_volume")]
    for spec, params, admin, index in cases:
        plans = _list_plan(db, spec, params, admin)
        assert len(plans) == 1, plans
        _statement, plan = plans[0]
        assert _uses_index_in_order(db, plan, index), (params, plan)
        assert not _sorts(db, plan), (params, plan)


def test_a_marker_page_and_the_count_use_the_index(seeded):
    db, ids = seeded
    plans = _list_plan(db, BACKUP_LIST, {"marker": ids["marker"], "with_count": "true",
                                         "limit": "50"})
    # the count, the marker's row, the page
    assert len(plans) == 3, plans
    (_, count), (_, _marker), (_, page) = plans
    assert _uses_index_in_order(db, page, "ix_backups_list") and not _sorts(db, page), page
    # The count reads the index alone (no table rows).
    if db.is_sqlite:
        assert "COVERING INDEX ix_backups_list" in count, count
    else:
        assert "Index Only Scan" in count and "ix_backups_list" in count, count


def test_schedule_list_and_its_order(seeded):
    db, _ids = seeded
    service = ScheduleService(db, backups=None)  # type: ignore[arg-type]
    listed: list[Schedule] = []
    plans = _plans(db, lambda: listed.extend(service.list(RequestContext("u", "p-main"))))
    assert len(listed) == 1000 and {x.project_id for x in listed} == {"p-main"}
    keys = [(x.created_at, x.id) for x in listed]
    assert keys == sorted(keys, reverse=True)
    assert len(plans) == 1, plans
    _, plan = plans[0]
    assert _uses_index_in_order(db, plan, "ix_backup_schedules_list"), plan
    assert not _sorts(db, plan), plan


def test_the_migration_creates_exactly_the_models_indexes(db):
    """Migration 0008 and the models' __table_args__ name the same indexes."""
    from sqlalchemy import inspect

    insp = inspect(db.engine)
    for model in (Backup, Volume, Snapshot, Schedule):
        table = model.__table__
        in_db = {ix["name"] for ix in insp.get_indexes(table.name)}
        in_model = {ix.name for ix in table.indexes}
        assert in_db == in_model, (table.name, in_db ^ in_model)
    assert "ix_backups_project_deleted" not in {
        ix["name"] for ix in insp.get_indexes("backups")}


# -- PostgreSQL pool ------------------------------------------------------------------------


def _burst(base: str, headers: dict[str, str], volume_id: str, clients: int = 32) -> int:
    """``clients`` clients at once, 20 shows and 20 detail lists each; the 200s counted."""
    def one(_i: int) -> int:
        with httpx.Client(headers=headers, timeout=60) as c:
            ok = 0
            for _ in range(20):
                ok += c.get(f"{base}/volumes/{volume_id}").status_code == 200
                ok += c.get(f"{base}/backups/detail?limit=5").status_code == 200
            return ok

    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        return sum(ex.map(one, range(clients)))


def test_concurrent_requests_reuse_the_pools_connections(tmp_path):
    """Two bursts of 32 clients at once against a live server on PostgreSQL (2,560
    requests): every backend connection of its database seen while they run (sampled from
    pg_stat_activity every 10 ms) is still open afterwards — none was opened for a request
    and closed after it — and there are no more than the requests running at once need."""
    with pg_database() as url:
        srv = Server(tmp_path / "d", {"BLOCKVAULT_DATABASE_URL": url}).start()
        admin = Database(url.rsplit("/", 1)[0] + "/postgres", pool_size=1, max_overflow=0)
        try:
            headers = {"X-Auth-Token": "alice:p1"}
            base = f"{srv.url}/v3/p1"
            with httpx.Client(headers=headers, timeout=30) as c:
                vol = c.post(f"{base}/volumes", json={"volume": {"size": 1}}).json()["volume"]
            database = url.rsplit("/", 1)[1]

            def backends() -> set[tuple[int, dt.datetime]]:
                with admin.engine.connect() as conn:
                    return {tuple(r) for r in conn.execute(text(
                        "SELECT pid, backend_start FROM pg_stat_activity WHERE datname = :d"
                    ), {"d": database}).all()}

            seen: set[tuple[int, dt.datetime]] = set()
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    seen.update(backends())
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                assert _burst(base, headers, vol["id"]) == 32 * 40
                assert _burst(base, headers, vol["id"]) == 32 * 40
            finally:
                stop.set()
                sampler.join()
            time.sleep(0.5)  # a connection closed by the pool has left pg_stat_activity
            after = backends()
        finally:
            admin.dispose()
            srv.stop()
    closed = seen - after
    assert not closed, f"{len(closed)} of {len(seen)} connections were closed and reopened"
    # 32 clients need at most 32 request connections, plus the workers' and scheduler's
    assert 1 <= len(seen) <= 40, len(seen)


def test_serve_runs_on_uvloop_and_httptools(tmp_path):
    """`blockvault serve` picks the fast event loop and HTTP parser of uvicorn[standard]:
    their compiled modules are mapped into the server process."""
    pytest.importorskip("uvloop")
    pytest.importorskip("httptools")
    srv = Server(tmp_path / "d").start()
    try:
        maps = open(f"/proc/{srv.proc.pid}/maps").read()
    finally:
        srv.stop()
    assert "/uvloop/loop." in maps
    assert "/httptools/parser/parser." in maps
