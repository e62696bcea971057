"""The web dashboard in a real browser: Debian's headless Chromium driven by Playwright
against a live server, with backups made through the API.

What a person would check: signing in (and being sent to sign in without a credential),
the project's backups listed with their statuses and nobody else's, a progress bar that
moves while a backup really runs, charts drawn from real data, an admin's view across
projects, and an API key that stops working on the dashboard the moment it is revoked.
Screenshots go to ``$BLOCKVAULT_ARTIFACTS`` (default ``tests/artifacts/``).

Chromium must be there: without it this module fails rather than skips (``.ci/run``
installs Debian's ``chromium``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from blockvault.db import Database
from blockvault.db.models import Backup, Job, Schedule, utcnow
from blockvault.service import overview
from blockvault.service.context import RequestContext
from blockvault.service.errors import Forbidden
from tests.pg import pg_database
from tests.server import Server

MiB = 1024 * 1024
CHROMIUM = os.environ.get("BLOCKVAULT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("BLOCKVAULT_ARTIFACTS")
                 or Path(__file__).parent / "artifacts")
#: the stored-bytes chart's line colour (dashboard.js): its pixels prove a series was drawn
STORED_RGB = (0x25, 0x63, 0xEB)


def _text(n: int, seed: int) -> bytes:
    """Compressible, non-repeating data: slow to compress at zstd level 19, so a backup of
    some tens of MiB takes long enough to watch (~1.5 s per 8 MiB on one engine thread)."""
    rng = random.Random(seed)
    words = [rng.randbytes(3).hex().encode() for _ in range(4096)]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choices(words, k=4096)) + b"\n"
    return bytes(out[:n])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """One job at a time, one engine thread, zstd 19: a backup of tens of MiB runs for
    seconds, long enough for the page to poll it several times."""
    srv = Server(tmp_path_factory.mktemp("bv-dash"), {
        "BLOCKVAULT_BACKUP_WORKERS": "1", "BLOCKVAULT_ENGINE_WORKERS": "1",
        "BLOCKVAULT_ZSTD_LEVEL": "19",
        # a TLS-terminating proxy on this machine (only test_sign_in_... says so)
        "BLOCKVAULT_TRUSTED_PROXIES": "127.0.0.1",
    }).start()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log()


@pytest.fixture(scope="module")
def world(server):
    """Two projects with backups made through the API, and one verification."""
    alice = server.client("alice", "dash-" + uuid.uuid4().hex[:8])
    bob = server.client("bob", "dash-" + uuid.uuid4().hex[:8])
    web = alice.create_volume(1, name="web")
    db = alice.create_volume(1, name="db")
    alice.write(web, 0, os.urandom(4 * MiB))
    alice.write(db, 0, os.urandom(2 * MiB))
    backups = {
        "web-full": alice.create_backup(web, name="web-full"),
        "db-full": alice.create_backup(db, name="db-full"),
    }
    alice.write(web, 8 * MiB, os.urandom(MiB))
    backups["web-incr"] = alice.create_backup(web, name="web-incr", incremental=True)
    r = alice.post(f"/backups/{backups['web-full']}/verify")
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while (alice.get(f"/backups/{backups['web-full']}/verify").json()
           .get("verification", {}).get("state") not in ("ok", "failed")):
        assert time.monotonic() < deadline, "verify never finished"
        time.sleep(0.1)
    schedule = _schedule(alice, name="nightly-web", volume_ids=[web], cron="30 2 * * *",
                         timezone="Europe/Berlin", full_every=7, keep_daily=7)
    vol = bob.create_volume(1, name="bob-vol")
    bob.write(vol, 0, os.urandom(MiB))
    bob_backup = bob.create_backup(vol, name="bob-secret-backup")
    _schedule(bob, name="bob-secret-schedule", volume_ids=[vol], interval_seconds=3600)
    return {"alice": alice, "bob": bob, "backups": backups, "bob_backup": bob_backup,
            "web": web, "schedule": schedule}


def _schedule(api, **fields) -> dict:
    r = api.post("/os-backup-schedules", {"backup_schedule": fields})
    assert r.status_code == 200, r.text
    return r.json()["backup_schedule"]


def login(browser: Browser, server: Server, token: str) -> Page:
    """A fresh browser (no cookies) signed in through the form, on the dashboard."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(server.url + "/dashboard")
    assert page.url == server.url + "/dashboard/login"
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(server.url + "/dashboard")
    return page


def shot(page: Page, name: str) -> Path:
    path = ARTIFACTS / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def token_of(api) -> str:
    return api.http.headers["X-Auth-Token"]


def listed_backups(page: Page) -> dict[str, str]:
    """Backup name -> status, as the page shows them."""
    rows = page.locator("#backups tbody tr")
    return {rows.nth(i).locator("td.name").inner_text():
            rows.nth(i).locator(".status").inner_text() for i in range(rows.count())}


def coloured_pixels(page: Page, selector: str, rgb: tuple[int, int, int]) -> tuple[int, float]:
    """How many pixels of ``rgb`` (±24 per channel) the chart's canvas has, and where they
    are on average across it (0 = left edge, 1 = right): the series really drawn, not just
    axes, and where."""
    return tuple(page.evaluate(
        """([sel, rgb]) => {
            const c = document.querySelector(sel + ' canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0, xs = 0;
            for (let i = 0; i < d.length; i += 4) {
              if (d[i + 3] > 200 && Math.abs(d[i] - rgb[0]) < 24 &&
                  Math.abs(d[i + 1] - rgb[1]) < 24 && Math.abs(d[i + 2] - rgb[2]) < 24) {
                n++;
                xs += (i / 4) % c.width;
              }
            }
            return [n, n ? xs / n / c.width : 0];
        }""", [selector, list(rgb)]))


# -- tests ---------------------------------------------------------------------------------


def test_without_a_credential_the_dashboard_sends_to_sign_in(browser, server):
    page = browser.new_context().new_page()
    page.goto(server.url + "/dashboard")
    assert page.url == server.url + "/dashboard/login"
    assert page.locator("#login-form input#token[type=password]").count() == 1
    # a credential the API refuses is refused here, in the API's words, and sets nothing
    page.fill("#token", ":nobody")
    page.click("#login-form button[type=submit]")
    assert page.locator("#login-error").inner_text() == \
        "The request you have made requires authentication."
    assert page.context.cookies() == []
    # the JSON the page polls answers 401 as the API would
    r = httpx.get(server.url + "/dashboard/api/jobs")
    assert r.status_code == 401
    assert r.json() == {"unauthorized": {
        "code": 401, "message": "The request you have made requires authentication."}}
    page.context.close()


def test_sign_in_refuses_other_sites_and_pages_carry_their_protections(server):
    # a login form posted from another site's page: refused, no cookie set
    r = httpx.post(server.url + "/dashboard/login", data={"token": "alice:p1"},
                   headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert "Cross-site login refused." in r.text
    # the same form from the dashboard's own page: signed in
    r = httpx.post(server.url + "/dashboard/login", data={"token": "alice:p1"},
                   headers={"Origin": server.url})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    set_cookie = r.headers["set-cookie"]
    assert set_cookie.startswith("blockvault_dashboard=alice:p1;")
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie
    assert "Path=/dashboard" in set_cookie and "Secure" not in set_cookie  # plain http here
    # served over https (a trusted proxy says so): the cookie is Secure, and the page's own
    # https origin is the one sign-in accepts
    r = httpx.post(server.url + "/dashboard/login", data={"token": "alice:p1"},
                   headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "bv.example",
                            "Origin": "https://bv.example"})
    assert r.status_code == 303 and "; Secure" in r.headers["set-cookie"]
    # not a form: 415, as the API answers a body it does not read
    r = httpx.post(server.url + "/dashboard/login", content=b'{"token": "alice:p1"}',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and "set-cookie" not in r.headers

    page = httpx.get(server.url + "/dashboard", cookies={"blockvault_dashboard": "alice:p1"})
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store"
    assert "alice:p1" not in page.text  # the credential is never rendered
    # the chart library is served from the package itself, byte for byte (no CDN), at a
    # URL naming its content's digest: cached for a year, and a new file is a new URL
    vendored = Path(__file__).parents[1] / "blockvault/dashboard/static/vendor/uplot"
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        body = (vendored / name).read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:16]
        url = f"/dashboard/static/{name}?v={digest}"
        assert url in page.text
        served = httpx.get(server.url + url)
        assert served.status_code == 200 and served.content == body
        assert served.headers["cache-control"] == "public, max-age=31536000, immutable"
        again = httpx.get(server.url + url, headers={"If-None-Match": served.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    stale = httpx.get(server.url + "/dashboard/static/dashboard.js?v=old")
    assert stale.status_code == 200 and stale.headers["cache-control"] == "no-cache"
    # only the listed files: nothing else of the package or the disk is reachable
    for path in ("README.md", "vendor", "..%2F__init__.py", "..%2F..%2Fserver.py"):
        r = httpx.get(server.url + f"/dashboard/static/{path}")
        assert r.status_code == 404, path
        assert r.json()["itemNotFound"]["code"] == 404
    assert "https://" not in page.text and "http://" not in page.text


def test_lists_the_projects_backups_and_draws_the_charts(browser, server, world):
    alice = world["alice"]
    page = login(browser, server, token_of(alice))
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.reload()  # with the console listened to from the start (CSP violations show there)

    # the cookie: HttpOnly, SameSite=Strict, for the dashboard only
    (cookie,) = page.context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == \
        (True, "Strict", "/dashboard")

    assert page.locator("#scope").inner_text() == f"Project {alice.project}"
    assert listed_backups(page) == {"web-full": "available", "db-full": "available",
                                    "web-incr": "available"}
    incr = page.locator(f'#backups tr[data-backup-id="{world["backups"]["web-incr"]}"]')
    assert "incremental" in incr.inner_text()
    # another project's backup is nowhere on the page
    html = page.content()
    assert "bob-secret-backup" not in html and world["bob_backup"] not in html

    # storage: what the API says the backups stored, summed; logical = three 1 GiB volumes
    details = alice.get("/backups/detail").json()["backups"]
    assert page.locator("#stat-backups").inner_text() == "3"
    stored = int(re.search(r"\d+", page.locator("#stat-stored").get_attribute("title"))[0])
    with server_db(server) as conn:
        expected = conn.execute("SELECT SUM(stored_bytes) FROM backups WHERE project_id = ? "
                                "AND NOT deleted", (alice.project,)).fetchone()[0]
    assert stored == expected > 0
    assert len(details) == 3
    assert page.locator("#stat-logical").inner_text() == "3.0 GiB"
    assert page.locator("#stat-ratio").inner_text() == f"{3 * 1024**3 / stored:.1f}×"

    # the charts: drawn by uPlot on a canvas, with one point per backup (and per create job)
    page.wait_for_selector("#chart-stored canvas")
    assert page.get_attribute("#chart-stored", "data-points") == "3"
    assert page.get_attribute("#chart-durations", "data-points") == "3"
    pixels, _ = coloured_pixels(page, "#chart-stored", STORED_RGB)
    assert pixels > 200

    # the verification made through the API, as the API reports it
    web_full = world["backups"]["web-full"]
    report = alice.get(f"/backups/{web_full}/verify").json()["verification"]
    verify = page.locator(f'#verifies tr[data-backup-id="{web_full}"]')
    assert verify.locator(".status").inner_text() == "ok"
    assert [verify.locator("td.num").nth(i).inner_text() for i in range(3)] == \
        [str(report["checked_blocks"]), "0", "0"]
    assert report["checked_blocks"] > 0

    # the schedule made through the API: when, and its next run as the API says it
    sched = world["schedule"]
    row = page.locator(f'#schedules tr[data-schedule-id="{sched["id"]}"]')
    assert row.locator("td.name").inner_text() == "nightly-web"
    assert row.locator("td").nth(1).inner_text() == "30 2 * * * Europe/Berlin"
    assert row.locator("td").nth(4).inner_text() == \
        sched["next_run_at"][:16].replace("T", " ") + " UTC"
    assert page.locator("#schedules tbody tr").count() == 1
    assert "bob-secret-schedule" not in html

    shot(page, "backups")
    assert not [m for m in console if "Content Security Policy" in m or "error" in m], console
    page.context.close()


def test_a_progress_bar_moves_while_a_backup_runs(browser, server, world):
    alice, bob = world["alice"], world["bob"]
    vol = alice.create_volume(1, name="big")
    # 48 MiB of slow data spread over the whole GiB: the bar moves all the way, not only
    # through the first few per cent
    data = _text(48 * MiB, 7)
    for i in range(12):
        alice.write(vol, i * 85 * MiB, data[i * 4 * MiB:(i + 1) * 4 * MiB])
    page = login(browser, server, token_of(alice))
    bob_page = login(browser, server, token_of(bob))
    assert page.locator("#jobs tbody tr").count() == 0
    assert page.locator("#jobs-none").is_visible()

    backup = alice.create_backup(vol, wait=False, name="big-backup")
    # the page's poll finds the job and adds its row with a bar
    bar = page.locator("#jobs tbody tr progress")
    bar.wait_for(timeout=15000)
    row = page.locator("#jobs tbody tr")
    assert row.locator("td.name").inner_text() == "big-backup"
    assert row.locator("td.kind").inner_text() == "create"
    first = _wait_value(page, lambda v: v > 0)
    second = _wait_value(page, lambda v: v > first)
    shot(page, "running")
    assert 0 < first < second <= 1024**3
    assert bar.get_attribute("max") == str(1024**3)

    # bob's dashboard shows no job of alice's, while it runs
    assert bob_page.evaluate("fetch('/dashboard/api/jobs').then(r => r.json())") == {"jobs": []}
    assert alice.get(f"/backups/{backup}").json()["backup"]["status"] == "creating"

    # when it ends, the page renders again: no running row, the backup listed available
    alice.wait("backup", backup, {"available", "error"})
    # (expect polls through locators: the page's CSP forbids the eval wait_for_function uses)
    expect(page.locator(f'#backups tr[data-backup-id="{backup}"] .status')).to_have_text(
        "available", timeout=20000)
    assert page.locator("#jobs tbody tr").count() == 0
    page.context.close()
    bob_page.context.close()


def _wait_value(page: Page, good, timeout: float = 30) -> float:
    """The bar's value, read by the page's own polling, once ``good(value)``."""
    deadline = time.monotonic() + timeout
    while True:
        value = float(page.locator("#jobs tbody tr progress").get_attribute("value") or 0)
        if good(value):
            return value
        assert time.monotonic() < deadline, f"the progress bar stayed at {value}"
        time.sleep(0.2)


def test_projects_are_kept_apart_and_an_admin_sees_across(browser, server, world):
    alice, bob = world["alice"], world["bob"]
    page = login(browser, server, token_of(bob))
    assert listed_backups(page) == {"bob-secret-backup": "available"}
    assert page.locator("#project").count() == 0  # no project picker for a member
    # another project by the query parameter: refused, nothing of it shown
    page.goto(server.url + f"/dashboard?project={alice.project}")
    assert page.locator("#error-message").inner_text() == \
        "Your credential is valid, but it may not view this dashboard."
    assert "web-full" not in page.content()
    poll = f"fetch('/dashboard/api/jobs?project={alice.project}').then(r => r.status)"
    assert page.evaluate(poll) == 403
    page.goto(server.url + "/dashboard?project=*")
    assert page.locator("#error-message").count() == 1
    page.context.close()

    admin = login(browser, server, "admin:admin")
    admin.select_option("#project", "*")
    admin.click(".picker button")
    admin.wait_for_url(re.compile(r".*/dashboard\?project=.*"))
    assert admin.locator("#scope").inner_text() == "All projects"
    shown = listed_backups(admin)
    assert {"web-full", "db-full", "web-incr", "bob-secret-backup"} <= set(shown)
    schedules = admin.locator("#schedules td.name").all_inner_texts()
    assert {"nightly-web", "bob-secret-schedule"} <= set(schedules)
    admin.select_option("#project", bob.project)
    admin.click(".picker button")
    admin.wait_for_url(re.compile(rf".*project={bob.project}$"))
    assert listed_backups(admin) == {"bob-secret-backup": "available"}
    # one backup: one point, in the middle of its chart (not at an edge of a 1000-day axis)
    admin.wait_for_selector("#chart-stored canvas")
    pixels, where = coloured_pixels(admin, "#chart-stored", STORED_RGB)
    assert pixels > 10 and 0.4 < where < 0.6, (pixels, where)
    shot(admin, "admin")
    # signing out forgets the credential: the dashboard asks again
    admin.click("#logout")
    admin.wait_for_url(server.url + "/dashboard/login")
    assert admin.context.cookies() == []
    admin.goto(server.url + "/dashboard")
    assert admin.url == server.url + "/dashboard/login"
    admin.context.close()


def test_a_revoked_api_key_is_signed_out_at_once(browser, tmp_path):
    srv = Server(tmp_path / "bv", {"BLOCKVAULT_AUTH_STRATEGY": "apikey"}).start()
    try:
        key = _apikey(srv, "create", "--project", "keyproj", "--user", "carol",
                      "--role", "reader")
        page = login(browser, srv, key)
        assert page.locator("#scope").inner_text() == "Project keyproj"
        assert key.split("_", 2)[2] not in page.content()  # the secret is never rendered
        _apikey(srv, "revoke", key.split("_")[1])
        # the page's next poll is refused: it goes to sign in, and the stale cookie goes
        page.wait_for_url(srv.url + "/dashboard/login", timeout=10000)
        page.goto(srv.url + "/dashboard")
        assert page.url == srv.url + "/dashboard/login"
        assert page.context.cookies() == []
        page.context.close()
    finally:
        srv.stop()
    assert key.split("_", 2)[2] not in srv.log()


def _apikey(server: Server, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "blockvault.cli", "apikey", args[0], "--data-dir",
         str(server.data_dir), *args[1:]],
        capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def server_db(server: Server) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(server.data_dir / "blockvault.sqlite"))


# -- the queries behind the page, on SQLite and PostgreSQL -----------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> Iterator[Database]:
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'bv.sqlite'}")
        db.upgrade()
        yield db
        db.dispose()
        return
    with pg_database() as url:
        db = Database(url)
        db.upgrade()
        yield db
        db.dispose()


def _history(db: Database) -> dict:
    """p1: 600 backups, one a day (every third one deleted a day later), create jobs, a
    verification, a schedule; p2: two backups, a running restore, a schedule."""
    now = utcnow().replace(microsecond=0)
    live = stored = 0
    with db.session() as s:
        for i in range(600):
            made = now - dt.timedelta(days=600 - i)
            deleted = i % 3 == 0
            s.add(Backup(id=f"b1-{i:04d}", user_id="u", project_id="p1", volume_id="v1",
                         status="deleted" if deleted else "available", size=2,
                         stored_bytes=1000 + i, created_at=made, deleted=deleted,
                         deleted_at=made + dt.timedelta(days=1) if deleted else None,
                         display_name=f"p1-backup-{i}"))
            if not deleted:
                live += 1
                stored += 1000 + i
        for i in range(3):
            s.add(Job(kind="create", backup_id=f"b1-{599 - i:04d}", project_id="p1",
                      state="done", started_at=now - dt.timedelta(hours=i, seconds=30),
                      finished_at=now - dt.timedelta(hours=i)))
        s.add(Job(kind="verify", backup_id="b1-0599", project_id="p1", state="done",
                  finished_at=now, result={"ok": False, "checked_blocks": 9,
                                           "missing": ["a", "b"], "corrupt": ["c"],
                                           "error": None}))
        for i in range(2):
            s.add(Backup(id=f"b2-{i}", user_id="u", project_id="p2", volume_id="v2",
                         status="available", size=1, stored_bytes=500,
                         created_at=now - dt.timedelta(minutes=10 - i)))
        s.add(Job(kind="restore", backup_id="b2-0", project_id="p2", state="running",
                  bytes_done=300, bytes_total=1000, phase="restore", started_at=now))
        for project in ("p1", "p2"):
            s.add(Schedule(project_id=project, user_id="u", name=f"{project}-nightly",
                           volume_ids=["v"], cron="0 3 * * *", next_run_at=now,
                           last_outcome="partial", runs_total=4, failures_total=1))
    return {"live": live, "stored": stored}


def test_overview_is_scoped_and_summed_in_the_database(database):
    facts = _history(database)
    member = RequestContext.from_identity("u", "p1", ["reader"])
    admin = RequestContext.from_identity("admin", "admin", ["admin"])

    # a reader sees its own project; another project, or all, is refused
    assert overview.resolve_scope(member, None) == overview.Scope("p1")
    for other in ("p2", "*"):
        with pytest.raises(Forbidden):
            overview.resolve_scope(member, other)
    assert overview.resolve_scope(admin, "p2") == overview.Scope("p2")
    assert overview.resolve_scope(admin, "*") == overview.Scope(None)

    o = overview.overview(database, member, overview.Scope("p1"))
    assert o.backups_total == facts["live"] == 400
    assert len(o.backups) == overview.MAX_BACKUPS
    assert {b.project_id for b in o.backups} == {"p1"}
    assert o.backups[0].name == "p1-backup-599"  # newest first
    assert (o.storage.backups, o.storage.stored_bytes, o.storage.logical_bytes) == \
        (400, facts["stored"], 400 * 2 * 1024**3)
    assert o.jobs == [] and o.projects == []
    assert [r.name for r in o.schedules] == ["p1-nightly"]
    assert (o.schedules[0].when, o.schedules[0].last_outcome) == ("0 3 * * *", "partial")
    (v,) = o.verifies
    assert (v.ok, v.checked_blocks, v.missing, v.corrupt) == (False, 9, 2, 1)
    assert [d for _, d in o.duration_series] == [30.0, 30.0, 30.0]
    # 600 backups and 200 deletions: past MAX_POINTS // 2 events, summed per day in SQL
    series = o.stored_series
    assert 500 < len(series) <= overview.MAX_POINTS
    assert [t for t, _ in series] == sorted(t for t, _ in series)
    assert series[-1][1] == facts["stored"]  # ends at what the live backups hold
    assert max(v for _, v in series) <= facts["stored"] + 2000

    o2 = overview.overview(database, admin, overview.Scope("p2"))
    assert [b.id for b in o2.backups] == ["b2-1", "b2-0"]
    (job,) = o2.jobs
    assert (job.kind, job.bytes_done, job.bytes_total, job.backup_name) == \
        ("restore", 300, 1000, None)
    assert [v for _, v in o2.stored_series] == [500, 1000]  # one point per backup
    assert o2.verifies == [] and o2.duration_series == []
    assert o2.projects == ["p1", "p2"]  # the admin's picker

    every = overview.overview(database, admin, overview.Scope(None))
    assert every.backups_total == 402
    assert {r.name for r in every.schedules} == {"p1-nightly", "p2-nightly"}
    assert [j.id for j in overview.running_jobs(database, overview.Scope(None))] == \
        [j.id for j in o2.jobs]
    assert overview.running_jobs(database, overview.Scope("p1")) == []
