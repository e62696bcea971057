"""Routing jobs to the host that holds the volume (issue 14): two simulated hosts, each an
``api`` and a ``worker`` process with its own ``host_name`` and its own volume files (a
worker of one host cannot reach the other's), sharing PostgreSQL and the object store.
Every backup and restore runs on a worker of its volume's host (from the job rows and the
workers' heartbeat rows); with the only worker of a host stopped its jobs wait, visibly
(``blockvault_jobs_unroutable``, the other worker's log), and run when it returns."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.pg import pg_database
from tests.server import Api, GiB, sha256_of_file
from tests.test_roles import Role, db_rows, wait_for

MiB = 1024 * 1024


class HostRole(Role):
    """A process of one simulated host: its host_name, and volume files only that host
    has (``shared/<host>/...`` stands for the host's local disks)."""

    def __init__(self, role: str, host: str, base: Path, db_url: str, **env: str) -> None:
        super().__init__(role, base / f"{host}-{role}", base / "shared", db_url,
                         BLOCKVAULT_HOST_NAME=host, BLOCKVAULT_SERVICE_DOWN_TIME="2",
                         BLOCKVAULT_MAINTENANCE_INTERVAL="0.3", **env)
        self.host = host
        self.local = base / host

    def config_text(self) -> str:
        text = (f'[blockvault]\n[backends.rawfile]\ndriver = "raw"\n'
                f'root = "{self.local / "volumes"}"\n')
        if self.host == "hostb":  # a backend only host B has
            text += f'[backends.images]\ndriver = "file"\nroot = "{self.local / "images"}"\n'
        return text

    def client(self, user: str = "admin", project: str = "admin") -> Api:
        # an admin: managing an existing disk is theirs (volume_extension:volume_manage)
        return Api(self.url, user, project, version="3.8", data_dir=self.local)


def raw_sha256(host: HostRole, volume_id: str) -> str:
    return sha256_of_file(host.local / "volumes" / f"{volume_id}.raw")


def unroutable(api: HostRole) -> dict[str, float]:
    """``blockvault_jobs_unroutable`` by host, as the API process's /metrics says."""
    text = httpx.get(api.url + "/metrics", timeout=10).text
    return {s.labels["host"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "blockvault_jobs_unroutable" for s in f.samples}


def routed_jobs(db_url: str, backup_ids: list[str]) -> list[tuple]:
    """(kind, route, volume host@backend, runner host, runner backends) of every job on a
    volume of these backups, joined to the heartbeat row of the worker that ran it."""
    rows = []
    for b in backup_ids:
        rows += db_rows(
            db_url,
            "SELECT j.kind, j.route, v.host || '@' || v.backend, r.host, r.backends, j.state "
            "FROM jobs j JOIN volumes v ON v.id = j.volume_id "
            "JOIN runners r ON r.owner = j.owner WHERE j.backup_id = :b", b=b)
    return rows


@pytest.fixture
def hosts(tmp_path):
    with pg_database() as url:
        procs = {(role, host): HostRole(role, host, tmp_path, url)
                 for host in ("hosta", "hostb") for role in ("api", "worker")}
        try:
            for p in procs.values():  # four interpreters start side by side
                p.launch()
            for p in procs.values():
                p.ready()
            yield procs, url
        finally:
            for p in procs.values():
                p.stop()


def test_jobs_run_where_the_volume_is(hosts):
    procs, url = hosts
    api_a, api_b = procs["api", "hosta"], procs["api", "hostb"]
    worker_a, worker_b = procs["worker", "hosta"], procs["worker", "hostb"]
    a, b = api_a.client(), api_b.client()

    # a raw volume on each host (made by that host's API), and a disk image only host B has
    va, vb = a.create_volume(1), b.create_volume(1)
    a.write(va, 0, os.urandom(2 * MiB))
    b.write(vb, 5 * MiB, os.urandom(2 * MiB))
    images = api_b.local / "images"
    images.mkdir(parents=True)
    with open(images / "disk.img", "wb") as f:
        f.truncate(GiB)
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    r = b.post("/manageable_volumes", {"volume": {"host": "hostb@images#images",
                                                  "ref": {"source-name": "disk.img"}}})
    assert r.status_code == 202, r.text
    vi = r.json()["volume"]["id"]
    b.wait("volume", vi, {"available"})
    # host A's API shows each volume on its own host, not on host A
    hosts_shown = {v: a.get(f"/volumes/{v}").json()["volume"]["os-vol-host-attr:host"]
                   for v in (va, vb, vi)}
    assert hosts_shown == {va: "hosta@rawfile#rawfile", vb: "hostb@rawfile#rawfile",
                           vi: "hostb@images#images"}, hosts_shown
    sums = {va: raw_sha256(api_a, va), vb: raw_sha256(api_b, vb),
            vi: sha256_of_file(images / "disk.img")}

    # every backup asked of host A's API (a load balancer may send it anywhere)
    backups = {v: a.create_backup(v, wait=False) for v in (va, vb, vi)}
    for backup in backups.values():
        assert a.wait("backup", backup, {"available", "error"})["status"] == "available"
    # restores across hosts through the shared store: each new target is made on the
    # host of the API that served the request, and restored by that host's worker
    targets = {va: (b.restore(backups[va]), api_b), vb: (a.restore(backups[vb]), api_a),
               vi: (a.restore(backups[vi]), api_a)}
    for v, (target, host) in targets.items():
        assert raw_sha256(host, target) == sums[v], v

    rows = routed_jobs(url, list(backups.values()))
    assert len(rows) == 6, rows  # three backups, three restores
    for _kind, route, volume_route, runner_host, reaches, state in rows:
        assert state == "done"
        assert route == volume_route, rows
        assert runner_host == route.split("@")[0] and route in reaches, rows
    ran_on = {(kind, route) for kind, route, *_ in rows}
    assert ran_on == {("create", "hosta@rawfile"), ("create", "hostb@rawfile"),
                      ("create", "hostb@images"), ("restore", "hostb@rawfile"),
                      ("restore", "hosta@rawfile")}, ran_on
    assert unroutable(api_a) == {"hosta@rawfile": 0, "hostb@rawfile": 0, "hostb@images": 0}

    # host B's only worker stops: its volumes' jobs wait, queued, and say so
    worker_b.signal(signal.SIGTERM)
    assert worker_b.wait(30) == 0, worker_b.log()
    waiting = [a.create_backup(vb, wait=False), a.create_backup(vi, wait=False)]
    wait_for(lambda: unroutable(api_a) == {"hosta@rawfile": 0, "hostb@rawfile": 1,
                                           "hostb@images": 1}, 30,
             "host B's jobs to be counted unroutable")
    # host A's worker is alive and claiming meanwhile: a backup on host A runs and ends
    # while host B's stay as they were
    a.create_backup(va)
    for backup in waiting:
        assert a.get(f"/backups/{backup}").json()["backup"]["status"] == "creating"
    jobs = db_rows(url, "SELECT state, attempts, owner FROM jobs WHERE backup_id IN "
                        "(:x, :y)", x=waiting[0], y=waiting[1])
    assert sorted(jobs) == [("queued", 0, None)] * 2, jobs
    assert b.get(f"/volumes/{vb}").json()["volume"]["status"] == "backing-up"
    said = wait_for(lambda: "no live backup worker reaches hostb@rawfile" in worker_a.log(),
                    10, "host A's worker to log the waiting jobs")
    assert said and "no live backup worker reaches hostb@images" in worker_a.log()
    # Cinder's bodies say nothing new about it
    body = a.get(f"/backups/{waiting[0]}").json()["backup"]
    assert "route" not in str(body) and "unroutable" not in str(body)

    # host B's worker returns (same data dir: the same runner): they run and finish
    worker_b.start()
    for backup in waiting:
        assert a.wait("backup", backup, {"available", "error"})["status"] == "available"
    rows = routed_jobs(url, waiting)
    assert sorted((kind, route, host, state) for kind, route, _, host, _, state in rows) == [
        ("create", "hostb@images", "hostb", "done"), ("create", "hostb@rawfile", "hostb",
                                                     "done")], rows
    wait_for(lambda: unroutable(api_a).get("hostb@rawfile") == 0, 10, "the gauge to clear")
    wait_for(lambda: "hostb@rawfile are no longer waiting" in worker_a.log(), 10,
             "host A's worker to log that they no longer wait")
    target = b.restore(waiting[0])
    assert raw_sha256(api_b, target) == sums[vb]


def test_backend_host_names_shared_storage(tmp_path):
    """``backend_host`` (Cinder's option): a backend every host reaches alike is announced
    under one HOST by all of them, so its volumes' jobs may run on any of their workers;
    a host-local one under the host's own name."""
    from blockvault.volume.backends import Backends, InvalidReference

    tables = {"rawfile": {"driver": "raw", "root": str(tmp_path / "shared"),
                          "backend_host": "shared"},
              "images": {"driver": "file", "root": str(tmp_path / "local")}}
    (tmp_path / "local").mkdir()
    a, b = (Backends.from_config(tables, data_dir=tmp_path, host_name=h)
            for h in ("hosta", "hostb"))
    assert a.reachable() == ["shared@rawfile", "hosta@images"]
    assert b.reachable() == ["shared@rawfile", "hostb@images"]
    assert a.host("rawfile") == "shared@rawfile#rawfile"
    # a volume keeps the host it was made on, whichever process shows it
    assert a.host("images", "hostb") == "hostb@images#images"
    assert a.route("images", "hostb") == "hostb@images"
    # managing checks the disk here: only this process's own HOST of the backend
    assert a.parse_host("hosta@images#images").name == "images"
    with pytest.raises(InvalidReference, match="not this service's host"):
        a.parse_host("hostb@images#images")
    with pytest.raises(InvalidReference, match="not this service's host"):
        a.parse_host("hosta@rawfile")
    with pytest.raises(ValueError, match="backend_host"):
        Backends.from_config({"x": {"driver": "raw", "backend_host": "a@b"}},
                             data_dir=tmp_path, host_name="hosta")
