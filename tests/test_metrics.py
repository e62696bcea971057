"""GET /metrics (blockvault.metrics) on live servers: what a scrape says after real backups,
restores, deletes and verifies matches the database and the bytes moved; store retries and
errors during a real Swift outage; the job queue while no worker runs (SQLite and
PostgreSQL); refusal of remote scrapers; Prometheus naming conventions; a scrape's cost at
100k backups; and docs/operations.md's alert rules use metrics that exist."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from blockvault.config import load_settings
from blockvault.db.models import Backup, Job, utcnow
from blockvault.server import Services, create_app
from tests.conftest import FAST_GC, store_env
from tests.pg import pg_database
from tests.server import Server, free_port, verify_backup

MiB = 1024**2
GiB = 1024**3
DOCS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- scraping ---------------------------------------------------------------------------------


def scrape(url: str, **kw) -> Samples:
    r = httpx.get(url + "/metrics", timeout=30, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(r.text) for s in f.samples}


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def db_rows(srv: Server, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(srv.data_dir / "blockvault.sqlite") as c:
        return c.execute(sql, args).fetchall()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {**FAST_GC, "BLOCKVAULT_SCHEDULER_INTERVAL": "0.5"}
    srv = Server(tmp_path_factory.mktemp("bv-metrics"), env).start()
    yield srv
    srv.stop()


# -- the data path and the database, end to end -----------------------------------------------


def test_backup_restore_delete_verify_are_counted(server):
    api = server.client("alice", uuid.uuid4().hex)
    container = f"metrics-{uuid.uuid4().hex[:8]}"
    before = scrape(server.url)

    vol = api.create_volume(1)
    api.write(vol, 0, os.urandom(8 * MiB))
    api.write(vol, 512 * MiB, b"\x5a" * (4 * MiB))  # compressible
    full = api.create_backup(vol, container=container)
    full_packs = sorted((server.data_dir / "store" / container).rglob("packs/*/*"))
    api.write(vol, 64 * MiB, os.urandom(2 * MiB))
    incr = api.create_backup(vol, container=container, incremental=True)
    h = api.volume_sha256(vol)
    target = api.restore(incr)
    assert api.volume_sha256(target) == h
    assert verify_backup(api, full)["state"] == "ok"

    mid = scrape(server.url)
    stored = dict(db_rows(server, "SELECT id, stored_bytes FROM backups WHERE id IN (?, ?)",
                          full, incr))
    # 12 MiB written, 8 of them random: dedup, compression and skipped zeros keep it < 9
    assert 0 < stored[incr] < stored[full] < 9 * MiB
    assert delta(mid, before, "blockvault_backup_attempts_total", outcome="success") == 2
    assert delta(mid, before, "blockvault_backup_logical_bytes_total") == 2 * GiB
    assert delta(mid, before, "blockvault_backup_stored_bytes_total") == sum(stored.values())
    assert delta(mid, before, "blockvault_backup_duration_seconds_count") == 2
    assert delta(mid, before, "blockvault_backup_throughput_bytes_per_second_count") == 2
    blocks = GiB // 32768
    assert sum(delta(mid, before, "blockvault_backup_blocks_total", disposition=d)
               for d in ("new", "reused", "zero")) == 2 * blocks
    # the incremental stored its 2 MiB of new blocks; the full stored 8 + 4 MiB worth
    assert delta(mid, before, "blockvault_backup_blocks_total", disposition="new") == (
        (8 + 2) * MiB // 32768 + 1)  # the 0x5a blocks are identical: one stored
    assert delta(mid, before, "blockvault_restore_attempts_total", outcome="success") == 1
    assert delta(mid, before, "blockvault_restore_bytes_total") == GiB
    assert delta(mid, before, "blockvault_restore_duration_seconds_count") == 1
    assert delta(mid, before, "blockvault_verify_runs_total", target="backup", result="ok") == 1
    # the store saw at least the backups' uploads and the restore's and verify's reads
    assert delta(mid, before, "blockvault_store_bytes_total", operation="put") >= sum(
        stored.values())
    assert delta(mid, before, "blockvault_store_bytes_total", operation="get") >= stored[incr]
    assert delta(mid, before, "blockvault_store_requests_total", operation="put") > 0
    # per container, from the database
    assert val(mid, "blockvault_container_backups", container=container) == 2
    assert val(mid, "blockvault_container_logical_bytes", container=container) == 2 * GiB
    assert val(mid, "blockvault_container_uploaded_bytes", container=container) == sum(
        stored.values())
    assert delta(mid, before, "blockvault_verify_backups", result="ok") == 1

    # delete the incremental: the container counts only the full any more
    assert api.delete(f"/backups/{incr}").status_code == 202
    api.wait("backup", incr, {"deleted"})
    # one corrupt pack: the full's verify fails, and the gauge of failing backups says so
    victim = full_packs[0]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert verify_backup(api, full)["state"] == "failed"

    after = scrape(server.url)
    assert val(after, "blockvault_container_backups", container=container) == 1
    assert val(after, "blockvault_container_logical_bytes", container=container) == GiB
    assert val(after, "blockvault_container_uploaded_bytes", container=container) == (
        stored[full])
    assert delta(after, mid, "blockvault_verify_backups", result="ok") == -1
    assert delta(after, mid, "blockvault_verify_backups", result="failed") == 1
    assert delta(after, mid, "blockvault_verify_runs_total", target="backup",
                 result="failed") == 1
    assert val(after, "blockvault_verify_last_timestamp_seconds", result="failed") == (
        pytest.approx(time.time(), abs=60))

    # every DB-backed gauge equals the database, for every status
    for table, name in (("backups", "blockvault_backups"), ("volumes", "blockvault_volumes")):
        counts = dict(db_rows(server, f"SELECT status, count(*) FROM {table} "
                                      "WHERE NOT deleted GROUP BY status"))
        shown = {dict(k[1])["status"]: v for k, v in after.items() if k[0] == name}
        assert {s: n for s, n in shown.items() if n} == counts
    assert val(after, "blockvault_metrics_database_up") == 1


def test_schedule_counters_come_from_the_database(server):
    api = server.client("alice", uuid.uuid4().hex)
    vol = api.create_volume(1)
    r = api.post("/os-backup-schedules", {"backup_schedule": {
        "name": "hourly", "volume_ids": [vol], "interval_seconds": 3600}})
    assert r.status_code == 200, r.text
    sid = r.json()["backup_schedule"]["id"]
    labels = {"schedule_id": sid, "project_id": api.project}
    m = scrape(server.url)
    assert val(m, "blockvault_schedule_runs_total", **labels) == 0
    assert val(m, "blockvault_schedule_enabled", **labels) == 1
    assert val(m, "blockvault_schedule_period_seconds", **labels) == 3600
    assert val(m, "blockvault_schedule_last_success_timestamp_seconds", **labels) == 0
    assert val(m, "blockvault_schedule_created_timestamp_seconds", **labels) == (
        pytest.approx(time.time(), abs=60))

    # due now: the scheduler fires it, the backup is made, the run settles as a success
    with sqlite3.connect(server.data_dir / "blockvault.sqlite") as c:
        c.execute("UPDATE backup_schedules SET next_run_at = '2000-01-01 00:00:00.000000' "
                  "WHERE id = ?", (sid,))
    deadline = time.monotonic() + 60
    while True:
        m = scrape(server.url)
        if val(m, "blockvault_schedule_last_success_timestamp_seconds", **labels):
            break
        assert time.monotonic() < deadline, "the schedule never succeeded"
        time.sleep(0.2)
    assert val(m, "blockvault_schedule_runs_total", **labels) == 1
    assert val(m, "blockvault_schedule_failures_total", **labels) == 0
    assert val(m, "blockvault_schedule_last_success_timestamp_seconds", **labels) == (
        pytest.approx(time.time(), abs=60))
    assert val(m, "blockvault_schedule_next_run_timestamp_seconds", **labels) == (
        pytest.approx(time.time() + 3600, abs=60))

    # the counters are the table's, whichever process wrote them
    with sqlite3.connect(server.data_dir / "blockvault.sqlite") as c:
        c.execute("UPDATE backup_schedules SET runs_total = 7, failures_total = 2, "
                  "misses_total = 1, last_success_at = '2030-01-02 03:04:05.000000' "
                  "WHERE id = ?", (sid,))
    m = scrape(server.url)
    assert val(m, "blockvault_schedule_runs_total", **labels) == 7
    assert val(m, "blockvault_schedule_failures_total", **labels) == 2
    assert val(m, "blockvault_schedule_misses_total", **labels) == 1
    assert val(m, "blockvault_schedule_last_success_timestamp_seconds", **labels) == (
        1893553445)  # 2030-01-02T03:04:05Z

    assert api.delete(f"/os-backup-schedules/{sid}").status_code in (202, 204)
    assert not any(dict(k[1]).get("schedule_id") == sid for k in scrape(server.url))


# -- names -------------------------------------------------------------------------------------


_NAME = re.compile(r"^blockvault_[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
_UNITS = ("_seconds", "_bytes", "_bytes_per_second", "_timestamp_seconds")


def test_names_follow_prometheus_conventions(server):
    r = httpx.get(server.url + "/metrics")
    families = [f for f in text_string_to_metric_families(r.text)
                if f.name.startswith("blockvault_")]
    assert len(families) >= 30
    for f in families:
        assert _NAME.match(f.name), f.name
        assert f.documentation and len(f.documentation) > 20, f.name
        assert f.type in ("counter", "gauge", "histogram"), (f.name, f.type)
        for s in f.samples:
            assert all(_LABEL.match(k) and not k.startswith("__") for k in s.labels), s
            if f.type == "counter":
                assert s.name == f.name + "_total", s.name
        if f.type != "counter":
            assert not f.name.endswith("_total"), f.name
        # a unit, when there is one, is a base unit at the end of the name
        for unit in ("bytes", "seconds"):
            if unit in f.name.split("_"):
                assert f.name.endswith(_UNITS), f.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|gb|kib|mib|gib|minutes|hours)\b",
                             f.name), f.name
    # the process collector's standard metrics are there too
    assert "process_resident_memory_bytes" in r.text


# -- the job queue with no worker --------------------------------------------------------------


class LiveApp:
    """A service built in this process, served by uvicorn on a real port; its job runner
    starts only when the test says (until then, queued jobs stay queued)."""

    def __init__(self, data_dir: Path, **settings) -> None:
        self.services = Services(load_settings(None, data_dir=str(data_dir), **settings))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        config = uvicorn.Config(create_app(self.services, manage_lifecycle=False),
                                host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveApp:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.services.stop()

    def client(self, user: str, project: str):
        from tests.server import Api

        return Api(self.url, user, project, data_dir=self.data_dir)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> Iterator[str]:
    if request.param == "sqlite":
        yield ""
    else:
        with pg_database() as url:
            yield url


def test_queue_depth_and_age_while_no_worker_runs(tmp_path, database_url):
    with LiveApp(tmp_path, database_url=database_url, gc_grace=3, store_lag=0.5,
                 maintenance_interval=0.5) as app:
        api = app.client("alice", uuid.uuid4().hex)
        vols = [api.create_volume(1) for _ in range(3)]
        for v in vols:
            api.write(v, 0, os.urandom(MiB))
        backups = [api.create_backup(v, wait=False) for v in vols]
        m = scrape(app.url)
        assert val(m, "blockvault_jobs", kind="create", state="queued") == 3
        assert val(m, "blockvault_jobs", kind="restore", state="queued") == 0
        assert val(m, "blockvault_backups", status="creating") == 3
        assert val(m, "blockvault_volumes", status="backing-up") == 3
        time.sleep(2.0)
        age = val(scrape(app.url), "blockvault_jobs_oldest_queued_age_seconds")
        assert 2.0 <= age < 30, age

        app.services.start()  # the workers come: the queue drains
        for b in backups:
            api.wait("backup", b, {"available"})
        m = scrape(app.url)
        assert val(m, "blockvault_jobs", kind="create", state="queued") == 0
        assert val(m, "blockvault_jobs_oldest_queued_age_seconds") == 0
        assert val(m, "blockvault_backups", status="available") == 3

        # verify results from the jobs' JSON reports, on this database too
        assert verify_backup(api, backups[0])["state"] == "ok"
        packs = sorted((tmp_path / "store" / "volumebackups").rglob("packs/*/*"))
        assert verify_backup(api, backups[1])["state"] == "ok"
        for p in packs:
            p.unlink()
        assert verify_backup(api, backups[1])["state"] == "failed"
        m = scrape(app.url)
        assert val(m, "blockvault_verify_backups", result="ok") == 1
        assert val(m, "blockvault_verify_backups", result="failed") == 1
        assert val(m, "blockvault_metrics_database_up") == 1


def test_a_scrape_is_cheap_at_100k_backups(tmp_path):
    services = Services(load_settings(None, data_dir=str(tmp_path)))
    try:
        now = utcnow()
        rows = [dict(id=str(uuid.uuid4()), user_id="u", project_id=f"p{i % 50}",
                     volume_id=str(uuid.uuid4()), container=f"c{i % 300}",
                     status="available" if i % 10 else "error", size=1 + i % 4,
                     stored_bytes=1000 + i, created_at=now, deleted=i % 7 == 0)
                for i in range(100_000)]
        jobs = [dict(id=str(uuid.uuid4()), kind="verify", backup_id=r["id"], state="done",
                     result={"ok": i % 100 != 0}, created_at=now, finished_at=now,
                     attempts=1, bytes_done=0, bytes_total=0, params={})
                for i, r in enumerate(rows[:20_000])]
        with services.db.session() as s:
            s.execute(insert(Backup), rows)
            s.execute(insert(Job), jobs)
        services.metrics.render(None)  # warm the caches, as every scrape after the first
        started = time.perf_counter()
        body, _ = services.metrics.render(None)
        took = time.perf_counter() - started
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    finally:
        services.stop()
    live = [r for r in rows if not r["deleted"]]
    assert val(samples, "blockvault_backups", status="available") == sum(
        r["status"] == "available" for r in live)
    # 300 containers: the 100 largest by name, the other 200 summed in one series
    containers = {dict(k[1])["container"]: v for k, v in samples.items()
                  if k[0] == "blockvault_container_logical_bytes"}
    assert len(containers) == 101 and "_other" in containers
    assert sum(containers.values()) == sum(r["size"] * GiB for r in live
                                           if r["status"] == "available")
    verified = {r["id"] for r in live}
    failed = sum(1 for j in jobs if not j["result"]["ok"] and j["backup_id"] in verified)
    assert val(samples, "blockvault_verify_backups", result="failed") == failed
    assert took < 5.0, f"a scrape at 100k backups took {took:.2f}s"


# -- store faults: a real outage ---------------------------------------------------------------


def _swift_server(tmp_path: Path, saio, budget: float) -> Server:
    env = store_env("swift", saio)
    env.update({"BLOCKVAULT_DEFAULT_CONTAINER": f"bv-{uuid.uuid4().hex[:12]}",
                "BLOCKVAULT_STORE_RETRY_ATTEMPTS": "1000",
                "BLOCKVAULT_STORE_RETRY_BUDGET": str(budget)})
    return Server(tmp_path / f"swift-{budget:g}", env).start()


def _total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples carrying ``labels`` (whatever their other labels)."""
    return sum(v for (n, lab), v in samples.items()
               if n == name and labels.items() <= dict(lab).items())


def test_store_retries_and_errors_during_an_outage(tmp_path, swift_server):
    # a short outage: retried, and the backup makes it
    srv = _swift_server(tmp_path, swift_server, budget=60)
    try:
        api = srv.client("alice", uuid.uuid4().hex)
        vol = api.create_volume(1)
        api.write(vol, 0, os.urandom(4 * MiB))
        before = scrape(srv.url)
        swift_server.stop()
        restarter = threading.Timer(1.5, swift_server.start)
        restarter.start()
        try:
            ok = api.create_backup(vol, wait=False)
            b = api.wait("backup", ok, {"available", "error"}, timeout=120)
        finally:
            restarter.join()
            swift_server.start()
        assert b["status"] == "available", b
        after = scrape(srv.url)
        retries = (_total(after, "blockvault_store_retries_total")
                   - _total(before, "blockvault_store_retries_total"))
        unavailable = (_total(after, "blockvault_store_errors_total", kind="unavailable")
                       - _total(before, "blockvault_store_errors_total", kind="unavailable"))
        assert retries >= 1 and unavailable >= retries
        assert _total(after, "blockvault_store_retries_exhausted_total") == 0
        assert delta(after, before, "blockvault_backup_attempts_total", outcome="success") == 1
    finally:
        srv.stop()

    # a long one: the retries run out and the backup fails
    srv = _swift_server(tmp_path, swift_server, budget=2)
    try:
        api = srv.client("alice", uuid.uuid4().hex)
        vol = api.create_volume(1)
        api.write(vol, 0, os.urandom(MiB))
        before = scrape(srv.url)
        swift_server.stop()
        try:
            bad = api.create_backup(vol, wait=False)
            b = api.wait("backup", bad, {"available", "error"}, timeout=120)
        finally:
            swift_server.start()
        assert b["status"] == "error", b
        after = scrape(srv.url)
        assert (_total(after, "blockvault_store_retries_exhausted_total")
                - _total(before, "blockvault_store_retries_exhausted_total")) >= 1
        assert delta(after, before, "blockvault_backup_attempts_total", outcome="failed") == 1
    finally:
        srv.stop()


# -- who may scrape ----------------------------------------------------------------------------


def _own_address() -> str | None:
    """This machine's first non-loopback IPv4 address, if it has one."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for word in out.split():
        if "." in word and not word.startswith("127."):
            with socket.socket() as s:
                try:
                    s.bind((word, 0))
                except OSError:
                    continue
            return word
    return None


def test_remote_scrapers_need_an_admin_or_the_setting(tmp_path):
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to connect from")
    env = {"BLOCKVAULT_HOST": "0.0.0.0", "BLOCKVAULT_NOAUTH_ALLOW_REMOTE": "true"}
    srv = Server(tmp_path / "closed", env).start()
    try:
        remote = f"http://{address}:{srv.port}/metrics"
        r = httpx.get(remote)
        assert r.status_code == 403
        assert "metrics_allow_remote" in r.json()["forbidden"]["message"]
        r = httpx.get(remote, headers={"X-Auth-Token": "alice:proja"})
        assert r.status_code == 403 and "admin" in r.json()["forbidden"]["message"]
        r = httpx.get(remote, headers={"X-Auth-Token": "admin:admin"})
        assert r.status_code == 200 and "blockvault_backups" in r.text
        assert httpx.get(srv.url + "/metrics").status_code == 200  # loopback: no token
    finally:
        srv.stop()
    env["BLOCKVAULT_METRICS_ALLOW_REMOTE"] = "true"
    srv = Server(tmp_path / "open", env).start()
    try:
        r = httpx.get(f"http://{address}:{srv.port}/metrics")
        assert r.status_code == 200 and "blockvault_jobs" in r.text
    finally:
        srv.stop()


def test_openmetrics_when_asked(server):
    r = httpx.get(server.url + "/metrics",
                  headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


# -- docs/operations.md -------------------------------------------------------------------------


def _yaml_blocks() -> list:
    text = DOCS.read_text()
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_operations_doc_rules_use_metrics_that_exist(server, tmp_path):
    blocks = _yaml_blocks()
    scrape_configs = [b for b in blocks if "scrape_configs" in b]
    assert scrape_configs and scrape_configs[0]["scrape_configs"][0]["metrics_path"] == (
        "/metrics")
    rules = [b for b in blocks if "groups" in b]
    assert len(rules) == 1
    alerts = [r for g in rules[0]["groups"] for r in g["rules"]]
    assert len(alerts) >= 3 and all("alert" in a and "expr" in a for a in alerts)
    # a schedule, so that the per-schedule series exist
    api = server.client("alice", uuid.uuid4().hex)
    r = api.post("/os-backup-schedules", {"backup_schedule": {
        "volume_ids": [api.create_volume(1)], "interval_seconds": 86400}})
    assert r.status_code == 200, r.text
    exported = {name for name, _ in scrape(server.url)}
    for a in alerts:
        used = set(re.findall(r"\bblockvault_[a-z0-9_]+", a["expr"]))
        assert used, a
        assert used <= exported, (a["alert"], used - exported)
    # every metric the docs list is one the service exports, and the other way round
    listed = set(re.findall(r"^\| `(blockvault_[a-z0-9_]+)`", DOCS.read_text(), re.M))
    families = {f.name + ("_total" if f.type == "counter" else "")
                for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
                if f.name.startswith("blockvault_")}
    assert listed == families, (listed ^ families)
    promtool = shutil.which("promtool")
    if promtool is None:  # Debian's prometheus package has it; .ci/run installs it
        assert not os.environ.get("CI"), "promtool is missing (Debian package prometheus)"
        pytest.skip("promtool is not installed (Debian package prometheus)")
    # Prometheus's own checker, and the rules run on series that should (not) fire them
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules[0]))
    out = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for g in rules[0]["groups"]:
        for rule in g["rules"]:
            rule.pop("annotations", None)  # the unit test compares labels only
    (tmp_path / "bare.yml").write_text(yaml.safe_dump(rules[0]))
    (tmp_path / "test.yml").write_text(RULE_TESTS)
    out = subprocess.run([promtool, "test", "rules", str(tmp_path / "test.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


#: series for ``promtool test rules``: schedule s1 (hourly) last succeeded at 0 and alerts
#: once 1.5 periods and the rule's 10 minutes have passed; s2 was made at 100 min and
#: never ran (young: no alert); a verify fails at 31 min; the queue grows from the start;
#: host B's jobs wait from 10 min (alert past 10 min of waiting), host A's never.
RULE_TESTS = """
rule_files: [bare.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: blockvault_schedule_last_success_timestamp_seconds{schedule_id="s1",project_id="p"}
        values: 1x150
      - series: blockvault_schedule_created_timestamp_seconds{schedule_id="s1",project_id="p"}
        values: 0x150
      - series: blockvault_schedule_period_seconds{schedule_id="s1",project_id="p"}
        values: 3600x150
      - series: blockvault_schedule_enabled{schedule_id="s1",project_id="p"}
        values: 1x150
      - series: blockvault_schedule_last_success_timestamp_seconds{schedule_id="s2",project_id="p"}
        values: 0x150
      - series: blockvault_schedule_created_timestamp_seconds{schedule_id="s2",project_id="p"}
        values: 6000x150
      - series: blockvault_schedule_period_seconds{schedule_id="s2",project_id="p"}
        values: 3600x150
      - series: blockvault_schedule_enabled{schedule_id="s2",project_id="p"}
        values: 1x150
      - series: blockvault_verify_backups{result="failed"}
        values: 0x30 1x120
      - series: blockvault_verify_containers{result="failed"}
        values: 0x150
      - series: blockvault_jobs_oldest_queued_age_seconds
        values: 0+60x150
      - series: blockvault_jobs{kind="create",state="queued"}
        values: 0+1x150
      - series: blockvault_jobs_unroutable_oldest_age_seconds{host="hostb@rawfile"}
        values: 0x10 0+60x140
      - series: blockvault_jobs_unroutable_oldest_age_seconds{host="hosta@rawfile"}
        values: 0x150
    alert_rule_test:
      - {eval_time: 95m, alertname: BlockvaultScheduleNotSucceeding, exp_alerts: []}
      - eval_time: 110m
        alertname: BlockvaultScheduleNotSucceeding
        exp_alerts: [{exp_labels: {severity: warning, schedule_id: s1, project_id: p}}]
      - {eval_time: 20m, alertname: BlockvaultVerifyFailed, exp_alerts: []}
      - eval_time: 40m
        alertname: BlockvaultVerifyFailed
        exp_alerts: [{exp_labels: {severity: critical}}]
      - {eval_time: 40m, alertname: BlockvaultJobQueueGrowing, exp_alerts: []}
      - eval_time: 60m
        alertname: BlockvaultJobQueueGrowing
        exp_alerts: [{exp_labels: {severity: warning}}]
      - {eval_time: 19m, alertname: BlockvaultJobsUnroutable, exp_alerts: []}
      - eval_time: 22m
        alertname: BlockvaultJobsUnroutable
        exp_alerts: [{exp_labels: {severity: warning, host: hostb@rawfile}}]
"""
