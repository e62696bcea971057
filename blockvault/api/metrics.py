"""``GET /metrics``: the service's Prometheus metrics (blockvault.metrics), outside the
Cinder API (no version prefix, no Cinder body).

Who may scrape: anyone on this machine (a loopback client) without a credential; from
elsewhere, anyone if ``metrics_allow_remote`` says so, else only an admin (Cinder's
``context_is_admin``) with a valid token. The metrics name no tenant's data beyond ids and
sizes, but they are the whole deployment's: not a tenant's to read.

The client address is the connection's, or the one a trusted proxy forwarded
(blockvault.api.proxies): a proxy on this machine that is not in ``trusted_proxies`` makes
every client look local, so such a proxy must not forward ``/metrics``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from blockvault.api.faults import HTTPFault, fault_response

REFUSED = ("Metrics are served without a credential only to this machine (loopback) or when "
           "metrics_allow_remote is set; send an admin's X-Auth-Token.")
NOT_ADMIN = "Metrics are for administrators: this token's user is not an admin."


def _local(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def routes(services: Any) -> list[Route]:
    settings = services.settings

    async def metrics(request: Request) -> Response:
        if not (settings.metrics_allow_remote or _local(request)):
            if not request.headers.get("x-auth-token"):
                return fault_response(403, REFUSED)
            try:
                ctx = await services.auth.authenticate(request)
            except HTTPFault as fault:
                return fault_response(fault.status, fault.message, fault.headers)
            if not ctx.is_admin:
                return fault_response(403, NOT_ADMIN)
        body, content_type = await run_in_threadpool(
            services.metrics.render, request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    return [Route("/metrics", metrics, methods=["GET"])]
