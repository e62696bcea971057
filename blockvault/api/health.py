"""The health check (``GET /healthcheck``): 200 while jobs can run, 503 with the problems
in words when no worker thread is alive or the metadata DB does not take writes. For load
balancers and monitoring; it needs no token and says nothing about any tenant."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def routes(services: Any) -> list[Route]:
    async def healthcheck(request: Request) -> JSONResponse:
        ok, body = await run_in_threadpool(services.health)
        return JSONResponse(body, 200 if ok else 503)

    return [Route("/healthcheck", healthcheck, methods=["GET"])]
