"""Scale-out under concurrency (issue 14): two ``blockvault api`` processes and two
``blockvault worker`` processes on PostgreSQL with the real Swift, and 50 client threads
that create, write, back up (full and incremental), list, show, restore and delete for a
bounded time, each request going to the two APIs in turn as a load balancer would.

Both workers announce the same host (one ``host_name``, one shared volume directory), so
every job may run on either: two workers competing for one queue. Garbage collection runs
on a test's time scale (``FAST_GC``), so collections sweep while backups run. Ten clients
share each project: they list, restore and delete each other's backups, so they race for
them (Cinder's 400s and 404s), and now and then write into a volume being backed up (a
409). Each client waits for its own job (a backup, restore or delete) before it asks for
another, as a user would: at most fifty jobs are queued, and what is queued when the load
stops drains in bounded time.

Afterwards, once everything settled: every backup is ``available`` or deleted and every
volume ``available`` (nothing injects a fault, so an ``error`` is a finding too); every
``available`` backup restores byte-exact, as did every restore the clients saw end, and
every volume holds what was written or restored into it; no job ran twice (one attempt,
one token, a worker's owner, no overlap with another job of its backup, and the one
attempt's storage id is the only one in the store); no request got a 5xx or a status its
operation cannot legitimately answer; no process logged a traceback.

Byte-exactness without hashing gigabytes: the clients write whole 64 KiB blocks made from
a seed, and keep each volume's and each backup's content as {block index: seed}. A
volume's fingerprint is sha256 over its size and (index, bytes) of every non-zero block,
read from the file's data extents only; two volumes of one size have the same fingerprint
exactly when they hold the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import swiftclient

from blockvault.engine.format import parse_manifest_name
from tests.conftest import FAST_GC, store_env
from tests.pg import pg_database
from tests.server import Api, GiB
from tests.test_roles import Role, db_rows, wait_for

#: seconds of load (the CI budget: the whole test takes about two minutes more)
LOAD_SECONDS = float(os.environ.get("BLOCKVAULT_SCALE_OUT_SECONDS", "60"))
CLIENTS, PROJECTS = 50, 5
SEED = 14
BLOCK = 64 * 1024
VOLUME_BLOCKS = GiB // BLOCK
ZERO_BLOCK = bytes(BLOCK)
#: a client keeps at most this many volumes (its own and its restores' targets)
OWN_VOLUMES = 3
#: per project: bounds the backups left for the restores at the end (100 at most) without
#: stopping ten clients' backups (a 413 now and then at most)
QUOTA_BACKUPS = 20
QUOTA_VOLUMES = 50
HOST = "scaleout"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

#: what each operation may legitimately answer under this load (anything else is a
#: finding): 400 a backup in the wrong status, or an incremental with no parent (Cinder's
#: InvalidBackup), 404 a backup another client deleted, 409 a write to a volume that is
#: being backed up, 413 a quota met
ALLOWED = {
    "create volume": {202, 413},
    "show volume": {200},
    "write": {204, 409},
    "delete volume": {202},
    "backup": {202, 400, 413},
    "list": {200},
    "list next page": {200, 404},  # the marker (the last backup shown) was deleted
    "show backup": {200, 404},
    "restore": {202, 400, 404, 413},
    "delete backup": {202, 400, 404},
}


def block(seed: int) -> bytes:
    """A block's content from its seed: never all zeros, never like another seed's."""
    return hashlib.shake_256(seed.to_bytes(8, "little") + b"scale-out").digest(BLOCK)


def model_fingerprint(blocks: dict[int, int], size: int = GiB) -> str:
    h = hashlib.sha256(size.to_bytes(8, "little"))
    for index in sorted(blocks):
        h.update(index.to_bytes(8, "little"))
        h.update(block(blocks[index]))
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    """model_fingerprint of a volume file: its non-zero blocks, read from its data extents
    (holes are zeros)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h = hashlib.sha256(size.to_bytes(8, "little"))
        index = 0  # the first block not looked at yet
        while index * BLOCK < size:
            try:
                start = os.lseek(fd, index * BLOCK, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole up to the end
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            index = max(index, start // BLOCK)
            f.seek(index * BLOCK)
            while index * BLOCK < end:
                data = f.read(BLOCK)
                if data != ZERO_BLOCK:
                    h.update(index.to_bytes(8, "little"))
                    h.update(data)
                index += 1
    return h.hexdigest()


@dataclass
class Expected:
    """What a backup holds: its volume's blocks when it was asked for (the volume is
    ``backing-up`` from that request until the backup ends, so nothing writes to it)."""

    project: str
    blocks: dict[int, int]


@dataclass
class Volume:
    #: its content, None while a restore into it runs (or after one failed)
    blocks: dict[int, int] | None
    #: ("create" | "backup" | "restore", backup id or None) until the volume is available
    pending: tuple[str, str | None] | None = None
    #: a backup of it was asked for (an incremental may find a parent)
    backed_up: bool = False


@dataclass
class Ledger:
    """Everything the clients saw, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    responses: Counter = field(default_factory=Counter)  # (operation, status) -> count
    #: (operation, status, message) -> count of the refusals (for the summary)
    refusals: Counter = field(default_factory=Counter)
    #: 5xx, connection errors and statuses an operation may not answer, with the request
    bad_responses: list[str] = field(default_factory=list)
    #: byte mismatches and anything else a client found wrong
    problems: list[str] = field(default_factory=list)
    backups: dict[str, Expected] = field(default_factory=dict)
    #: backup ids each project's listings showed (checked against backups at the end)
    listed: dict[str, set[str]] = field(default_factory=dict)
    restores_checked: int = 0

    def answer(self, op: str, method: str, url: str, r: httpx.Response | None,
               error: str = "") -> None:
        status = r.status_code if r is not None else 0
        with self.lock:
            self.responses[op, status] += 1
            if status not in ALLOWED[op]:
                body = r.text[:300] if r is not None else error
                self.bad_responses.append(f"{op}: {method} {url} -> {status} {body}")
            elif r is not None and status >= 400:
                fault = next(iter(r.json().values()), {})
                message = UUID.sub("<id>", str(fault.get("message", "")))[:80]
                self.refusals[op, status, message] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


class Client:
    """One simulated user of a project, behind a load balancer (the APIs in turn)."""

    def __init__(self, n: int, project: str, urls: list[str], shared: Path,
                 ledger: Ledger) -> None:
        self.n, self.project, self.ledger, self.shared = n, project, ledger, shared
        self.rng = random.Random(SEED * 1000 + n)
        self.apis = [Api(url, f"user{n}", project, data_dir=shared) for url in urls]
        self.turn = n % len(self.apis)
        self.volumes: dict[str, Volume] = {}
        #: (backup id, status, has dependent backups) of the project's backups, as the
        #: last listing showed them (a summary listing shows neither: "" and None)
        self.seen: list[tuple[str, str, bool | None]] = []
        self.seeds = iter(range((n + 1) << 32, (n + 2) << 32))
        #: the backup this client asked to delete, until it is gone
        self.deleting: str | None = None

    # -- HTTP -------------------------------------------------------------------------

    def call(self, op: str, method: str, path: str, **kw) -> httpx.Response | None:
        api = self.apis[self.turn]
        self.turn = (self.turn + 1) % len(self.apis)
        try:
            r = api.req(method, path, **kw)
        except httpx.HTTPError as exc:
            self.ledger.answer(op, method, api.base + path, None,
                               f"{type(exc).__name__}: {exc}")
            return None
        self.ledger.answer(op, method, api.base + path, r)
        return r

    def path_of(self, volume_id: str) -> Path:
        return self.shared / "volumes" / f"{volume_id}.raw"

    # -- the load ---------------------------------------------------------------------

    def run(self, deadline: float) -> None:
        # a staggered start: fifty clients do not all create a volume in the same instant
        time.sleep(self.rng.uniform(0, 2))
        while time.monotonic() < deadline:
            try:
                self.step()
            except Exception as exc:  # a client's own bug must not pass as quiet
                self.ledger.problem(f"client {self.n} crashed: {type(exc).__name__}: {exc}")
                raise
            time.sleep(self.rng.uniform(0.05, 0.3))

    def idle(self) -> list[str]:
        return [v for v, vol in self.volumes.items()
                if vol.pending is None and vol.blocks is not None]

    def waits(self) -> bool:
        """Whether a job this client asked for (backup, restore, delete) still runs: a
        client has one at a time, as a user waiting for theirs, so at most fifty are queued
        and what is left when the load ends drains in bounded time."""
        return self.deleting is not None or any(
            v.pending is not None and v.pending[0] != "create" for v in self.volumes.values())

    def step(self) -> None:
        self.poll()
        if not self.volumes:
            self.create_volume()
            return
        idle = self.idle()
        free = not self.waits()
        action = self.rng.choices(
            ["create volume", "write", "backup", "list", "show", "restore",
             "delete backup", "delete volume"],
            weights=[4, 22, 20, 18, 6, 16, 12, 3])[0]
        if action == "create volume" and len(self.volumes) < OWN_VOLUMES:
            self.create_volume()
        elif action == "write" and idle:
            backing_up = [v for v, vol in self.volumes.items()
                          if vol.pending is not None and vol.pending[0] == "backup"]
            if backing_up and self.rng.random() < 0.2:
                # into a volume being backed up: a 409, or a 204 if the backup just ended
                # (then, as any write, not part of that backup's content)
                self.write(self.rng.choice(backing_up))
            else:
                self.write(self.rng.choice(idle))
        elif action == "backup" and idle and free:
            self.backup(self.rng.choice(idle))
        elif action == "show" and self.seen:
            self.call("show backup", "GET", f"/backups/{self.rng.choice(self.seen)[0]}")
        elif action == "restore" and self.seen and free:
            self.restore()
        elif action == "delete backup" and self.seen and free:
            self.delete_backup()
        elif action == "delete volume" and len(idle) > 1:
            self.delete_volume(self.rng.choice(idle))
        else:
            self.list()

    def create_volume(self) -> None:
        r = self.call("create volume", "POST", "/volumes", json={"volume": {"size": 1}})
        if r is not None and r.status_code == 202:
            self.volumes[r.json()["volume"]["id"]] = Volume({}, ("create", None))

    def write(self, volume_id: str) -> None:
        vol = self.volumes[volume_id]
        assert vol.blocks is not None
        if vol.blocks and self.rng.random() < 0.15:
            # zeros over written blocks: an incremental must record them as zeros
            start, count = self.rng.choice(list(vol.blocks)), self.rng.randint(1, 4)
            count = min(count, VOLUME_BLOCKS - start)
            seeds: list[int | None] = [None] * count
        else:
            count = self.rng.randint(1, 16)
            start = self.rng.randrange(VOLUME_BLOCKS - count + 1)
            seeds = [next(self.seeds) for _ in range(count)]
        data = b"".join(ZERO_BLOCK if s is None else block(s) for s in seeds)
        r = self.call("write", "PUT", f"/volumes/{volume_id}/data",
                      params={"offset": start * BLOCK}, content=data,
                      headers={"Content-Type": "application/octet-stream"})
        if r is not None and r.status_code == 204:
            for i, s in enumerate(seeds, start):
                if s is None:
                    vol.blocks.pop(i, None)
                else:
                    vol.blocks[i] = s

    def backup(self, volume_id: str) -> None:
        vol = self.volumes[volume_id]
        assert vol.blocks is not None
        # now and then an incremental with no parent yet (a 400)
        incremental = self.rng.random() < (0.6 if vol.backed_up else 0.1)
        body = {"volume_id": volume_id, "incremental": incremental}
        r = self.call("backup", "POST", "/backups", json={"backup": body})
        if r is not None and r.status_code == 202:
            backup_id = r.json()["backup"]["id"]
            with self.ledger.lock:
                self.ledger.backups[backup_id] = Expected(self.project, dict(vol.blocks))
            vol.pending, vol.backed_up = ("backup", backup_id), True

    def list(self) -> None:
        detail = self.rng.random() < 0.5
        limit = self.rng.choice([None, 3, 10, 50])
        params: dict[str, str | int] = {} if limit is None else {"limit": limit}
        path = "/backups/detail" if detail else "/backups"
        seen: list[tuple[str, str, bool | None]] = []
        for page in range(3):
            r = self.call("list next page" if page else "list", "GET", path, params=params)
            if r is None or r.status_code != 200:
                return
            body = r.json()
            rows = body["backups"]
            if limit is not None and len(rows) > limit:
                self.ledger.problem(f"{path} limit={limit} answered {len(rows)} backups")
            seen += [(b["id"], b.get("status", ""), b.get("has_dependent_backups"))
                     for b in rows]
            if not body.get("backups_links") or not rows:
                break
            params = {**params, "marker": rows[-1]["id"]}
        ids = [i for i, _, _ in seen]
        if len(ids) != len(set(ids)):
            self.ledger.problem(f"{path} pages repeated backups: {sorted(ids)}")
        with self.ledger.lock:
            self.ledger.listed.setdefault(self.project, set()).update(ids)
        self.seen = seen

    def restore(self) -> None:
        # mostly one a detail listing showed available, now and then any (a 400 if it is
        # busy or an error, a 404 if deleted since)
        available = [b for b, status, _ in self.seen if status == "available"]
        if not available or self.rng.random() < 0.2:
            available = [b for b, _, _ in self.seen]
        backup_id = self.rng.choice(available)
        idle = self.idle()
        body: dict[str, str] = {}
        if idle and (len(self.volumes) >= OWN_VOLUMES or self.rng.random() < 0.25):
            # onto a volume of its own: every block the backup does not hold becomes zero
            body["volume_id"] = self.rng.choice(idle)
        elif len(self.volumes) >= OWN_VOLUMES:
            return
        r = self.call("restore", "POST", f"/backups/{backup_id}/restore",
                      json={"restore": body})
        if r is not None and r.status_code == 202:
            target = r.json()["restore"]["volume_id"]
            self.volumes[target] = Volume(None, ("restore", backup_id))

    def delete_backup(self) -> None:
        # Mostly one that may be deleted (most backups soon have incrementals: without
        # this, few deletes would succeed and the backup quota would stop the load), now
        # and then any (a 400 for one with dependents, or in the wrong status).
        leaves = [b for b, status, dependents in self.seen
                  if status in ("available", "error") and dependents is False]
        if leaves and self.rng.random() < 0.8:
            backup_id = self.rng.choice(leaves)
        else:
            backup_id = self.rng.choice(self.seen)[0]
        r = self.call("delete backup", "DELETE", f"/backups/{backup_id}")
        if r is not None and r.status_code == 202:
            self.deleting = backup_id

    def delete_volume(self, volume_id: str) -> None:
        r = self.call("delete volume", "DELETE", f"/volumes/{volume_id}")
        if r is not None and r.status_code == 202:
            del self.volumes[volume_id]

    def poll(self) -> None:
        """Look at what waits for a job; settle what is done."""
        if self.deleting is not None:
            r = self.call("show backup", "GET", f"/backups/{self.deleting}")
            if r is not None and r.status_code == 404:
                self.deleting = None
            elif r is not None and r.status_code == 200:
                status = r.json()["backup"]["status"]
                if status != "deleting":
                    self.ledger.problem(f"delete of backup {self.deleting} ended {status}")
                    self.deleting = None
        for volume_id, vol in list(self.volumes.items()):
            if vol.pending is None:
                continue
            r = self.call("show volume", "GET", f"/volumes/{volume_id}")
            if r is None or r.status_code != 200:
                continue
            status = r.json()["volume"]["status"]
            kind, backup_id = vol.pending
            if status == "available":
                vol.pending = None
                if kind == "restore":
                    assert backup_id is not None
                    vol.blocks = self.check_restore(backup_id, volume_id)
            elif status not in ("creating", "backing-up", "restoring-backup"):
                vol.pending = None
                self.ledger.problem(f"volume {volume_id} ended {status} after {kind} "
                                    f"{backup_id}")

    def check_restore(self, backup_id: str, volume_id: str) -> dict[int, int] | None:
        """The restored volume's bytes against the backup's; its blocks if they match."""
        with self.ledger.lock:
            expected = self.ledger.backups.get(backup_id)
        if expected is None or expected.project != self.project:
            self.ledger.problem(f"{self.project} restored {backup_id}, a backup none of its "
                                "clients made")
            return None
        got = file_fingerprint(self.path_of(volume_id))
        if got != model_fingerprint(expected.blocks):
            self.ledger.problem(f"restore of {backup_id} into {volume_id} is not byte-exact")
            return None
        with self.ledger.lock:
            self.ledger.restores_checked += 1
        return dict(expected.blocks)

    def restore_and_check(self, backup_id: str) -> None:
        """At the end: restore into a new volume, compare, delete the volume again."""
        r = self.call("restore", "POST", f"/backups/{backup_id}/restore",
                      json={"restore": {}})
        if r is None or r.status_code != 202:
            self.ledger.problem(f"final restore of {backup_id} refused: "
                                f"{r.status_code if r else None} {r.text if r else ''}")
            return
        target = r.json()["restore"]["volume_id"]
        self.volumes[target] = Volume(None, ("restore", backup_id))
        deadline = time.monotonic() + 120
        while self.volumes[target].pending and time.monotonic() < deadline:
            time.sleep(0.2)
            self.poll()
        if self.volumes[target].pending:
            self.ledger.problem(f"final restore of {backup_id} did not end in 120 s")
        elif self.volumes[target].blocks is not None:
            self.delete_volume(target)


# -- the deployment ---------------------------------------------------------------------------


@pytest.fixture
def scale_out(tmp_path, swift_server):
    """Two API processes and two workers of one host on a new PostgreSQL database, storing
    into a container of their own on the test Swift."""
    container = f"bv-scale-{uuid.uuid4().hex[:12]}"
    env = {**store_env("swift", swift_server), **FAST_GC,
           "BLOCKVAULT_DEFAULT_CONTAINER": container,
           "BLOCKVAULT_HOST_NAME": HOST,
           "BLOCKVAULT_QUOTA_BACKUPS": str(QUOTA_BACKUPS),
           "BLOCKVAULT_QUOTA_VOLUMES": str(QUOTA_VOLUMES),
           # PostgreSQL's 100 connections are the machine's, shared with the other tests
           # running: four processes hold at most 4 x 12 (an API's requests wait for one)
           "BLOCKVAULT_DB_POOL_SIZE": "8", "BLOCKVAULT_DB_MAX_OVERFLOW": "4"}
    with pg_database() as url:
        roles = [Role(role, tmp_path / name, tmp_path / "shared", url, **env)
                 for role, name in (("api", "api1"), ("api", "api2"),
                                    ("worker", "worker1"), ("worker", "worker2"))]
        try:
            for role in roles:  # four interpreters start side by side
                role.launch()
            for role in roles:
                role.ready()
            yield roles, url, container
        finally:
            for role in roles:
                role.stop()


def settled(url: str) -> bool:
    busy = db_rows(url, "SELECT count(*) FROM backups WHERE NOT deleted AND status IN "
                        "('creating', 'restoring', 'deleting')")[0][0]
    moving = db_rows(url, "SELECT count(*) FROM volumes WHERE NOT deleted AND status "
                          "NOT IN ('available', 'error', 'error_restoring')")[0][0]
    active = db_rows(url, "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
    return busy == 0 and moving == 0 and active[0][0] == 0


def manifests_by_backup(saio, container: str) -> dict[str, set[str]]:
    """backup id -> the storage ids that have a manifest (any version) in the container."""
    conn = swiftclient.Connection(authurl=saio.auth_url, user=saio.user, key=saio.key,
                                  retries=2)
    try:
        _, objects = conn.get_container(container, prefix="manifests/", full_listing=True)
    finally:
        conn.close()
    found: dict[str, set[str]] = {}
    for obj in objects:
        parsed = parse_manifest_name(obj["name"])
        assert parsed is not None, obj["name"]
        storage_id = parsed[0]
        found.setdefault(storage_id.split(".")[0], set()).add(storage_id)
    return found


@pytest.mark.timeout(int(LOAD_SECONDS) + 360)
def test_fifty_clients_two_apis_two_workers(scale_out, swift_server):
    roles, url, container = scale_out
    apis, workers = roles[:2], roles[2:]
    shared = apis[0].shared
    ledger = Ledger()
    clients = [Client(n, f"scaleout{n % PROJECTS}", [a.url for a in apis], shared, ledger)
               for n in range(CLIENTS)]

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        for f in [pool.submit(c.run, started + LOAD_SECONDS) for c in clients]:
            f.result()
    load_took = time.monotonic() - started

    # everything asked for runs to its end
    wait_for(lambda: settled(url), 240, "every backup, volume and job to settle")
    settle_took = time.monotonic() - started - load_took
    for c in clients:
        c.poll()
        assert c.deleting is None and all(v.pending is None for v in c.volumes.values()), (
            c.deleting, c.volumes)

    backups = db_rows(url, "SELECT id, project_id, status, deleted, fail_reason, "
                           "service_metadata FROM backups")
    statuses = Counter((status, deleted) for _, _, status, deleted, _, _ in backups)
    stuck = [b for b in backups if not b[3] and b[2] != "available"]
    assert not stuck, f"backups not available: {stuck}"
    assert all(b[2] == "deleted" for b in backups if b[3]), statuses
    volumes = db_rows(url, "SELECT id, status FROM volumes WHERE NOT deleted")
    assert all(status == "available" for _, status in volumes), Counter(
        s for _, s in volumes)
    # the backups are exactly the ones the clients were answered 202 for, each listed
    # only in its own project, and the quota held under concurrent creates
    assert {b[0] for b in backups} == set(ledger.backups)
    for b in backups:
        assert ledger.backups[b[0]].project == b[1]
    for project, ids in ledger.listed.items():
        foreign = {i for i in ids if ledger.backups.get(i, Expected("", {})).project
                   != project}
        assert not foreign, f"{project} listed backups of other projects: {foreign}"
    live = Counter(b[1] for b in backups if not b[3])
    assert max(live.values(), default=0) <= QUOTA_BACKUPS, live

    # every available backup restores byte-exact: six at a time, each by a user of its
    # project (a new one each: the load's clients keep their volumes as they were), through
    # both APIs
    available = [b[0] for b in backups if not b[3]]

    def final(n: int, backup_id: str) -> None:
        project = ledger.backups[backup_id].project
        Client(CLIENTS + n, project, [a.url for a in apis], shared, ledger
               ).restore_and_check(backup_id)

    checked_before = ledger.restores_checked
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(final, range(len(available)), available))
    assert ledger.restores_checked - checked_before == len(available), ledger.problems

    # every volume a client still has holds what the client wrote or restored into it
    kept = 0
    for c in clients:
        for volume_id, vol in c.volumes.items():
            assert vol.blocks is not None and vol.pending is None, (volume_id, vol)
            assert file_fingerprint(c.path_of(volume_id)) == model_fingerprint(vol.blocks), (
                f"volume {volume_id} does not hold what was written into it")
            kept += 1
    total = time.monotonic() - started
    assert not ledger.problems, "\n".join(ledger.problems)
    assert not ledger.bad_responses, "\n".join(ledger.bad_responses[:50])

    # no job ran twice. Each job row records every attempt's fencing token (tokens) and
    # how many claims it had (attempts): one of each, claimed by one of the two workers
    # (by their heartbeat rows), ended done.
    worker_owners = {o for (o,) in db_rows(
        url, 'SELECT owner FROM runners WHERE "binary" = :role AND pid IN (:a, :b)',
        role="cinder-backup", a=workers[0].proc.pid, b=workers[1].proc.pid)}
    assert len(worker_owners) == 2, worker_owners
    jobs = db_rows(url, "SELECT id, kind, backup_id, state, attempts, token, tokens, owner, "
                        "started_at, finished_at, error, route FROM jobs")
    kinds = Counter(j[1] for j in jobs)
    for (job_id, kind, backup_id, state, attempts, token, tokens, owner, _, _, error,
         route) in jobs:
        assert state == "done" and error is None, (job_id, kind, backup_id, state, error)
        assert attempts == 1 and (tokens or "").split() == [token], (job_id, attempts, tokens)
        assert owner in worker_owners, (job_id, owner, worker_owners)
        assert route in (None, f"{HOST}@rawfile"), route
    by_owner = Counter(j[7] for j in jobs)
    assert len(by_owner) == 2, by_owner  # both workers competed for the queue
    # one backup's jobs one after another (by the DB's clock): never two at once
    per_backup: dict[str, list[tuple]] = {}
    for j in jobs:
        per_backup.setdefault(j[2], []).append(j)
    for backup_id, its in per_backup.items():
        its.sort(key=lambda j: j[8])
        for before, after in zip(its, its[1:], strict=False):
            assert before[9] <= after[8], (backup_id, before[1], before[9], after[1], after[8])
        creates = [j for j in its if j[1] == "create"]
        assert len(creates) == 1, (backup_id, its)
    # each available backup's data is its one attempt's: the row names that attempt's
    # storage id, and the store holds manifests of no other attempt, nor of any backup
    # deleted (or of any backup that is not a row at all)
    creates = {j[2]: j for j in jobs if j[1] == "create"}
    want = {}
    for backup_id, _, _, deleted, _, sid in backups:
        if not deleted:
            assert sid == f"{backup_id}.{creates[backup_id][5][:12]}", (backup_id, sid)
            want[backup_id] = {sid}
    # (discards after a delete may reach the listing a moment later)
    wait_for(lambda: manifests_by_backup(swift_server, container) == want, 30,
             "the store to hold exactly the available backups' manifests")

    # nothing went wrong quietly: no tracebacks, no attempt re-queued, superseded,
    # handed back or having lost its lease
    for role in roles:
        said = [line for line in role.log().splitlines()
                if any(words in line for words in (
                    "Traceback", "re-queued", "superseded", "handed back", "lost its lease"))]
        assert not said, f"{role.data_dir.name}:\n" + "\n".join(said)

    print(f"\nscale-out: load {load_took:.0f} s, settle {settle_took:.0f} s, total "
          f"{total:.0f} s; {sum(ledger.responses.values())} requests "
          f"{dict(sorted(ledger.responses.items()))}; backups {dict(statuses)}; jobs "
          f"{dict(kinds)} by worker {sorted(by_owner.values())}; restores checked "
          f"{ledger.restores_checked} ({len(available)} at the end); volumes kept {kept}")
    for (op, status, message), n in sorted(ledger.refusals.items()):
        print(f"  {n:5d} x {op} {status}: {message}")


def test_fingerprint_sees_every_byte(tmp_path):
    """The fingerprint the load test compares volumes by: a file equals its model, a zero
    block written out equals a hole, and one byte changed anywhere (in a block, at a block's
    last byte, in a hole, at the volume's end), another size or another block changes it."""
    blocks = {0: 1, 5: 2, VOLUME_BLOCKS - 1: 3}
    path = tmp_path / "volume.raw"
    with open(path, "wb") as f:
        f.truncate(GiB)
        for index, seed in blocks.items():
            f.seek(index * BLOCK)
            f.write(block(seed))
        f.seek(9 * BLOCK)
        f.write(ZERO_BLOCK)
    assert file_fingerprint(path) == model_fingerprint(blocks)
    for offset in (5 * BLOCK + 7, 7 * BLOCK, GiB - 1, 6 * BLOCK - 1):
        with open(path, "r+b") as f:
            f.seek(offset)
            before = f.read(1)
            f.seek(offset)
            f.write(bytes([before[0] ^ 1]))
        assert file_fingerprint(path) != model_fingerprint(blocks), offset
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(before)
    assert file_fingerprint(path) == model_fingerprint(blocks)
    assert model_fingerprint(blocks, 2 * GiB) != model_fingerprint(blocks)
    assert model_fingerprint({**blocks, 5: 4}) != model_fingerprint(blocks)
