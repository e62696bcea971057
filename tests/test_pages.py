"""List pages are rendered a few at a time per process (api.http.pages_at_once): under the
GIL, pages rendered at once only interleave. Other requests are not held up by them."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette

from blockvault.api.http import Endpoint, json_response, make_routes
from blockvault.config import load_settings


class Gauge:
    """How many handlers run at once, and the most seen."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def handler(self, call):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.15)
        with self.lock:
            self.now -= 1
        return json_response({"ok": True})


def run_at_once(tmp_path, db, paths: list[str]) -> tuple[Gauge, Gauge]:
    pages, plain = Gauge(), Gauge()
    services = type("S", (), {"settings": load_settings(data_dir=tmp_path), "db": db})()
    app = Starlette(routes=make_routes([Endpoint("GET", "/pages", pages.handler, page=True),
                                        Endpoint("GET", "/plain", plain.handler)], services))

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            replies = await asyncio.gather(*[
                client.get(f"/v3/p1{path}", headers={"X-Auth-Token": "u:p1"})
                for path in paths])
        assert [r.status_code for r in replies] == [200] * len(paths)

    asyncio.run(main())
    return pages, plain


@pytest.mark.parametrize("db, limit", [
    (None, 1),
    (type("SQLite", (), {"is_sqlite": True})(), 1),
    (type("PostgreSQL", (), {"is_sqlite": False})(), 2),
])
def test_pages_rendered_a_few_at_a_time(tmp_path, db, limit):
    pages, plain = run_at_once(tmp_path, db, ["/pages", "/plain"] * 6)
    assert pages.most == limit
    # the other requests, sent at the same moment, ran side by side
    assert plain.most >= 4
