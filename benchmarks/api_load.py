#!/usr/bin/env python3
"""API throughput under load (issue 14, database part): requests per second and latency of
backup show and detail against live ``blockvault serve`` processes, next to a bare Starlette
endpoint served by the same uvicorn settings (the machine's ceiling), in one run.

    python benchmarks/api_load.py [--seconds 5] [--before TREE] [--skip-pg] [--json OUT]

Measured, each for ``--seconds``:
  * bare endpoint (a sync Starlette route returning a small JSON, through the threadpool
    like blockvault's handlers), 8 and 32 clients;
  * show and detail of a project with 50 backups (as the Cinder comparison measured):
    8 and 32 clients, 1 and 2 API processes, SQLite and PostgreSQL;
  * ``detail?limit=1000`` of a project with 100k backups, 8 clients, 1 and 2 API processes;
  * show while two backups of 1 GiB volumes (random data) run (1 process, SQLite).
``--before TREE`` (a ``git worktree`` of the commit before the change) runs the SQLite and
PostgreSQL 1-process rounds and the 100k round on that code too, in the same run.

Rows are inserted directly into the database (data setup); requests go through real HTTP.
The client is one asyncio process with a raw HTTP/1.1 keep-alive connection per client (far
cheaper per request than the server), and the bare endpoint measures what the machine serves
with that client running beside it. Results: docs/benchmarks.md, "API at scale".
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

PG_ADMIN = os.environ.get("BLOCKVAULT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PROJECT = "p1"
TOKEN = f"alice:{PROJECT}"


# -- the bare endpoint --------------------------------------------------------------------------


def bare_app():
    """A sync route (run in the threadpool, as blockvault's handlers are) and a small JSON."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    body = {"backup": {"id": str(uuid.uuid4()), "status": "available", "size": 1}}

    def show(_request):
        return JSONResponse(body)

    return Starlette(routes=[Route("/bare", show)])


def serve_bare(port: int) -> None:
    import uvicorn

    uvicorn.run(bare_app(), host="127.0.0.1", port=port, log_level="warning",
                access_log=False, proxy_headers=False, loop="auto", http="auto")


# -- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, path: str = "/", proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server on {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                if s.recv(12).startswith(b"HTTP/1.1"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on {port} did not start")


class Servers:
    """``n`` blockvault serve processes on one database (each its own data dir)."""

    def __init__(self, work: Path, url: str, n: int, tree: Path | None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        env = {**os.environ, "BLOCKVAULT_DATABASE_URL": url, **(extra_env or {})}
        cwd = None
        if tree is not None:  # the code before the change, first on the path
            env["PYTHONPATH"] = str(tree)
            cwd = str(tree)
        for i in range(n):
            port = free_port()
            data = work / f"srv{i}"
            data.mkdir(parents=True, exist_ok=True)
            log = open(data / "server.log", "ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "blockvault.cli", "serve", "--port", str(port),
                 "--data-dir", str(data), "--log-level", "warning"],
                env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(proc)
            self.ports.append(port)
            wait_up(port, proc=proc)

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Bare:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, "--bare-server", str(self.port)])
        wait_up(self.port, "/bare", self.proc)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


# -- databases and rows -------------------------------------------------------------------------


class PgDatabase:
    def __init__(self) -> None:
        import psycopg

        self.name = f"bv_load_{uuid.uuid4().hex[:10]}"
        self.admin = psycopg.connect(PG_ADMIN, autocommit=True)
        self.admin.execute(f'CREATE DATABASE "{self.name}"')
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        self.url = f"{base}/{self.name}"

    def drop(self) -> None:
        self.admin.execute(f'DROP DATABASE "{self.name}" WITH (FORCE)')
        self.admin.close()


def insert_backups(url: str, n: int, project: str = PROJECT) -> list[str]:
    """``n`` available backups of ``project`` (and as many deleted rows of other projects'
    as a busy deployment has), inserted directly; the schema is whatever the server made."""
    from sqlalchemy import MetaData, Table, create_engine, insert

    engine = create_engine(url)
    backups = Table("backups", MetaData(), autoload_with=engine)
    base = dt.datetime(2025, 1, 1)
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with engine.begin() as conn:
        for start in range(0, n, 5000):
            conn.execute(insert(backups), [dict(
                id=ids[i], user_id="alice", project_id=project,
                volume_id=f"00000000-0000-0000-0000-{i % 20:012d}", display_name=f"b{i}",
                display_description=None, container="volumebackups", status="available",
                size=1, object_count=1, metadata={}, num_dependent_backups=0,
                availability_zone="nova", created_at=base + dt.timedelta(seconds=i),
                data_timestamp=base + dt.timedelta(seconds=i), deleted=False, stored_bytes=0,
            ) for i in range(start, min(n, start + 5000))])
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("VACUUM ANALYZE backups")
        else:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    engine.dispose()
    return ids


# -- the client ---------------------------------------------------------------------------------


async def _client(port_paths: list[tuple[int, str]], stop_at: float, lat: list[float],
                  errors: list[int]) -> None:
    conns = []
    for port, _ in port_paths:
        conns.append(await asyncio.open_connection("127.0.0.1", port))
    i = 0
    try:
        while time.perf_counter() < stop_at:
            k = i % len(port_paths)  # several API processes: alternate between them
            i += 1
            reader, writer = conns[k]
            req = (f"GET {port_paths[k][1]} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"X-Auth-Token: {TOKEN}\r\nOpenStack-API-Version: volume 3.64\r\n\r\n")
            t0 = time.perf_counter()
            writer.write(req.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(int(head[9:12]))
    finally:
        for _, writer in conns:
            writer.close()


def load(ports: list[int], path: str, clients: int, seconds: float) -> dict:
    """``clients`` connections (per port) requesting ``path`` back to back for ``seconds``."""
    lat: list[float] = []
    errors: list[int] = []

    async def main() -> float:
        stop_at = time.perf_counter() + seconds
        t0 = time.perf_counter()
        pairs = [(p, path) for p in ports]
        await asyncio.gather(*[
            _client(pairs[i % len(pairs):] + pairs[:i % len(pairs)], stop_at, lat, errors)
            for i in range(clients)])
        return time.perf_counter() - t0

    try:
        import uvloop

        elapsed = uvloop.run(main())
    except ImportError:
        elapsed = asyncio.run(main())
    lat.sort()

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else 0.0

    return {"requests": len(lat), "rps": round(len(lat) / elapsed, 1), "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "errors": len(errors),
            "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else 0.0}


# -- rounds -------------------------------------------------------------------------------------


def report(results: list[dict], **row) -> None:
    r = dict(row)
    results.append(r)
    print(json.dumps(r), flush=True)


def round_api(results, work: Path, db: str, procs: int, args, tree: Path | None,
              label: str) -> None:
    pg = PgDatabase() if db == "postgresql" else None
    url = pg.url if pg else f"sqlite:///{work / 'shared.sqlite'}"
    servers = Servers(work, url, procs, tree)
    try:
        ids = insert_backups(url, 50)
        for clients in (8, 32):
            for name, path in (("show", f"/v3/{PROJECT}/backups/{ids[17]}"),
                               ("detail", f"/v3/{PROJECT}/backups/detail")):
                r = load(servers.ports, path, clients, args.seconds)
                report(results, code=label, db=db, processes=procs, clients=clients,
                       request=name, load=os.getloadavg()[0], **r)
    finally:
        servers.stop()
        if pg:
            pg.drop()


def round_100k(results, work: Path, db: str, args, tree: Path | None, label: str) -> None:
    pg = PgDatabase() if db == "postgresql" else None
    url = pg.url if pg else f"sqlite:///{work / 'big.sqlite'}"
    try:
        for procs in (1, 2):  # the same rows, served by one process, then by two
            servers = Servers(work / f"p{procs}", url, procs, tree)
            try:
                if procs == 1:
                    insert_backups(url, 100_000)
                for name, path in (
                        ("detail?limit=1000", f"/v3/{PROJECT}/backups/detail?limit=1000"),
                        ("detail?limit=1000&with_count",
                         f"/v3/{PROJECT}/backups/detail?limit=1000&with_count=true")):
                    r = load(servers.ports, path, 8, args.seconds)
                    report(results, code=label, db=db, processes=procs, clients=8,
                           request=name, rows=100_000, load=os.getloadavg()[0], **r)
            finally:
                servers.stop()
    finally:
        if pg:
            pg.drop()


def round_backups(results, work: Path, args, tree: Path | None, label: str) -> None:
    """show with 8 clients while two backups of 1 GiB volumes (random data) run."""
    import httpx

    # the 50 inserted backups are over the default quota (10): room for two more
    servers = Servers(work, f"sqlite:///{work / 'bk.sqlite'}", 1, tree,
                      {"BLOCKVAULT_QUOTA_BACKUPS": "100"})
    base = f"http://127.0.0.1:{servers.ports[0]}/v3/{PROJECT}"
    try:
        ids = insert_backups(f"sqlite:///{work / 'bk.sqlite'}", 50)
        show = f"/v3/{PROJECT}/backups/{ids[17]}"
        idle = load(servers.ports, show, 8, args.seconds)
        report(results, code=label, db="sqlite", processes=1, clients=8,
               request="show, no backup running", load=os.getloadavg()[0], **idle)
        with httpx.Client(headers={"X-Auth-Token": TOKEN}, timeout=600) as c:
            vols = []
            for _ in range(2):
                v = c.post(f"{base}/volumes", json={"volume": {"size": 1}}).json()["volume"]
                for off in range(0, 1 << 30, 64 << 20):
                    r = c.put(f"{base}/volumes/{v['id']}/data", params={"offset": off},
                              content=os.urandom(64 << 20),
                              headers={"Content-Type": "application/octet-stream"})
                    assert r.status_code == 204, r.text
                vols.append(v["id"])
            started = time.monotonic()
            made = []
            for v in vols:
                r = c.post(f"{base}/backups", json={"backup": {"volume_id": v}})
                assert r.status_code == 202, r.text
                made.append(r.json()["backup"]["id"])
            r = load(servers.ports, show, 8, args.seconds)
            running = [c.get(f"{base}/backups/{b}").json()["backup"]["status"] for b in made]
            report(results, code=label, db="sqlite", processes=1, clients=8,
                   request="show, two backups running", load=os.getloadavg()[0],
                   backups_still_running_at_end=running.count("creating"), **r)
            while any(c.get(f"{base}/backups/{b}").json()["backup"]["status"] == "creating"
                      for b in made):
                time.sleep(0.5)
            print(f"  the two backups took {time.monotonic() - started:.1f} s", flush=True)
    finally:
        servers.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--before", type=Path, help="a worktree of the code before the change")
    ap.add_argument("--skip-pg", action="store_true")
    ap.add_argument("--skip-backups", action="store_true")
    ap.add_argument("--only-backups", action="store_true",
                    help="only the show-while-two-backups-run round")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        serve_bare(args.bare_server)
        return
    results: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="bv-load-"))
    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    try:
        if args.only_backups:
            round_backups(results, work / "bk", args, None, "after")
            if args.before:
                round_backups(results, work / "bk-before", args, args.before, "before")
            return
        bare = Bare()
        try:
            for clients in (8, 32):
                r = load([bare.port], "/bare", clients, args.seconds)
                report(results, code="bare", db="-", processes=1, clients=clients,
                       request="bare endpoint", load=os.getloadavg()[0], **r)
        finally:
            bare.stop()
        dbs = ["sqlite"] + ([] if args.skip_pg else ["postgresql"])
        n = 0
        for db in dbs:
            for procs in (1, 2):
                n += 1
                round_api(results, work / f"r{n}", db, procs, args, None, "after")
            if args.before:
                n += 1
                round_api(results, work / f"r{n}", db, 1, args, args.before, "before")
        for db in dbs:
            n += 1
            round_100k(results, work / f"r{n}", db, args, None, "after")
            if args.before:
                n += 1
                round_100k(results, work / f"r{n}", db, args, args.before, "before")
        if not args.skip_backups:
            round_backups(results, work / "bk", args, None, "after")
            if args.before:
                round_backups(results, work / "bk-before", args, args.before, "before")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
