"""Request plumbing shared by every route: auth, project check, microversions, body
parsing, fault mapping, response headers and the one log line per request."""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from blockvault.api.faults import (
    INTERNAL_ERROR,
    HTTPFault,
    SafeJSONResponse,
    fault_response,
    service_fault,
)
from blockvault.api.proxies import FORWARDED_HOST
from blockvault.api.versions import fmt, negotiate
from blockvault.api.views import Links
from blockvault.service.context import RequestContext
from blockvault.service.errors import ServiceError
from blockvault.store import StoreError

log = logging.getLogger("blockvault.api")


@dataclass
class Call:
    """Everything a route handler needs about one request."""

    request: Request
    ctx: RequestContext
    version: tuple[int, int]
    api: str
    path: dict[str, str]
    query: dict[str, str]
    links: Links
    services: Any
    #: the parsed JSON body; None when there was none (treated as JSON null)
    body: Any = None
    raw_query: list[tuple[str, str]] = field(default_factory=list)

    @property
    def is_admin(self) -> bool:
        return self.ctx.is_admin


Handler = Callable[[Call], Response]
AsyncHandler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # below the project prefix, e.g. "/backups/{backup_id}"
    handler: Any
    min_version: tuple[int, int] = (3, 0)
    #: "json": parse a JSON body; "raw": the handler streams the body; None: no body
    body: str | None = None
    is_async: bool = False
    #: 413 message prefixed with the quota exception class (Cinder does, except restore)
    quota_prefix: bool = True
    #: a list page: up to ``osapi_max_limit`` rows made views, a few at a time per process
    #: (pages_at_once)
    page: bool = False


def pages_at_once(db: Any) -> anyio.CapacityLimiter:
    """How many list pages one process renders at once. A page is Python work on up to a
    thousand rows; under the GIL, eight at once only interleave, and each then waits for
    all of them (a 1000-row page, 8 clients: p99 240-340 ms at once, 87-141 ms so limited;
    docs/benchmarks.md). One on SQLite, whose reads are in-process; two on PostgreSQL, so
    that one page's database round trip overlaps another's rendering. Waiting pages queue
    in arrival order (anyio's limiter is fair) in the event loop; other requests pass by."""
    return anyio.CapacityLimiter(1 if db is None or db.is_sqlite else 2)


#: JSON nested deeper than this is refused. Valid bodies nest 3 levels (an action's
#: metadata); 64 is far above that and far below the parser's and jsonschema's recursion
#: limits, where deep nesting was a 500 with a traceback.
MAX_JSON_DEPTH = 64
MALFORMED = "Malformed request body"


def public_base(request: Request, public_endpoint: str) -> str:
    """scheme://host[:port][/prefix] for links (reference §3.1). A forwarded host counts
    only when a trusted proxy sent it (``api.proxies``); the scheme is the request's, which
    that middleware sets from a trusted ``X-Forwarded-Proto``."""
    root = request.scope.get("root_path", "").rstrip("/")
    if public_endpoint:
        return public_endpoint.rstrip("/") + root
    host = request.scope.get(FORWARDED_HOST) or request.headers.get("host", "localhost")
    return f"{request.url.scheme}://{host}{root}"


def _too_large(limit: int) -> HTTPFault:
    # Cinder's sizelimit middleware says "Request is too large."; the limit is added so a
    # person knows what fits. No Retry-After: the same request will never fit. The
    # connection is closed, so the unread rest of the body is not read at all.
    return HTTPFault(413, f"Request is too large. A request body may be at most {limit} bytes.",
                     headers={"Connection": "close"})


async def read_bounded_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass ``limit`` bytes: at once
    from ``Content-Length``, or while streaming one without (chunked). It is never held
    in memory whole beyond the limit."""
    length = request.headers.get("content-length")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses
    if length is not None and length.isascii() and length.strip().isdigit() \
            and int(length) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _not_json_constant(name: str) -> Any:
    # NaN and Infinity are Python's extensions, not JSON (RFC 8259)
    raise ValueError(name)


def _finite(text: str) -> float:
    # 1e400 is valid JSON that Python reads as inf, which no field accepts
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _check_parsed(value: Any) -> None:
    """Depth and text checks on a parsed body, without recursion (that is the point)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise HTTPFault(400, f"{MALFORMED}: nested more than {MAX_JSON_DEPTH} levels.")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                children = item.values()
            else:
                children = item
            stack.extend((child, depth + 1) for child in children)


def _check_text(text: str) -> None:
    """A string is refused unless it is Unicode text a database stores: ``"\\ud800"`` (a
    lone surrogate) has no UTF-8 form and NUL is refused by PostgreSQL's text type."""
    if "\x00" in text:
        raise HTTPFault(400, f"{MALFORMED}: strings must not contain NUL characters.")
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPFault(
            400, f"{MALFORMED}: strings must be Unicode text (a lone surrogate is not)."
        ) from None


def _parse_json_body(request: Request, raw: bytes) -> Any:
    ctype = request.headers.get("content-type")
    if ctype is None:
        if raw.strip():
            raise HTTPFault(415, "Unsupported Content-Type")
        return None
    media = ctype.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise HTTPFault(415, "Unsupported Content-Type")
    if not raw.strip():
        return None
    try:
        body = json.loads(raw, parse_constant=_not_json_constant, parse_float=_finite)
    except RecursionError:
        raise HTTPFault(400, f"{MALFORMED}: nested more than {MAX_JSON_DEPTH} levels.") from None
    except (UnicodeDecodeError, ValueError):
        raise HTTPFault(400, MALFORMED) from None
    _check_parsed(body)
    return body


def make_routes(endpoints: list[Endpoint], services: Any) -> list[Route]:
    settings = services.settings
    # matched with fullmatch: "$" would also accept a trailing newline
    project_re = re.compile(settings.project_id_regex)
    auth = getattr(services, "auth", None)
    if auth is None:
        # routes mounted on a bare settings holder (tests, embedding): the strategy its
        # settings name, never a weaker one
        from blockvault.api.auth import make_authenticator

        auth = make_authenticator(settings, getattr(services, "db", None))
    pages = pages_at_once(getattr(services, "db", None))
    routes: list[Route] = []
    # Project-less v3 routes first (3.67 style) so "/v3/backups" never reads as a project.
    prefixes = [("v3", False), ("v3", True), ("v2", True)]
    for api, with_project in prefixes:
        for ep in endpoints:
            path = f"/{api}/{{project_id}}{ep.path}" if with_project else f"/{api}{ep.path}"
            routes.append(
                Route(path, _endpoint(ep, api, with_project, services, project_re, auth, pages),
                      methods=[ep.method], name=None)
            )
    return routes


def _endpoint(ep: Endpoint, api: str, with_project: bool, services: Any, project_re: Any,
              auth: Any, pages: anyio.CapacityLimiter):
    settings = services.settings

    async def endpoint(request: Request) -> Response:
        started = time.monotonic()
        request_id = f"req-{uuid.uuid4()}"
        headers = {"x-openstack-request-id": request_id, "x-compute-request-id": request_id}
        version = (3, 0)
        try:
            if api == "v3":
                version = negotiate(request.headers.get("openstack-api-version"))
                headers["OpenStack-API-Version"] = f"volume {fmt(version)}"
                headers["Vary"] = "OpenStack-API-Version"
            # the configured strategy (api/auth.py) says who is calling, or answers 401
            ctx = await auth.authenticate(request)
            path = dict(request.path_params)
            url_project = path.pop("project_id", None)
            if url_project is not None and (
                url_project != ctx.project_id or not project_re.fullmatch(url_project)
            ):
                raise HTTPFault(400, "Malformed request url")
            if version < ep.min_version:
                raise HTTPFault(404, "The resource could not be found.")
            call = Call(
                request=request,
                ctx=ctx,
                version=version,
                api=api,
                path=path,
                query=dict(request.query_params),
                raw_query=list(request.query_params.multi_items()),
                links=Links(public_base(request, settings.public_endpoint), api, url_project),
                services=services,
            )
            if ep.body == "json":
                raw = await read_bounded_body(request, settings.max_request_body_size)
                call.body = _parse_json_body(request, raw)
            if ep.is_async:
                response = await ep.handler(call)
            elif ep.page:
                response = await anyio.to_thread.run_sync(ep.handler, call, limiter=pages)
            else:
                response = await run_in_threadpool(ep.handler, call)
        except HTTPFault as exc:
            headers.update(exc.headers)
            if exc.status == 400 and exc.message.startswith("API Version String"):
                headers.pop("OpenStack-API-Version", None)
                headers.pop("Vary", None)
            response = fault_response(exc.status, exc.message)
        except ServiceError as exc:
            response = service_fault(exc, ep.quota_prefix)
        except StoreError as exc:
            # The store's text names its endpoint or paths: the operator's, in the log.
            log.warning("%s %s: object store: %s", request.method, request.url.path, exc)
            response = fault_response(503, "The object store is not available. Try again later.")
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            response = fault_response(500, INTERNAL_ERROR)
        response.headers.update(headers)
        log.info(
            '%s "%s %s" %d %.1fms', request.client.host if request.client else "-",
            request.method, request.url.path + (f"?{request.url.query}" if request.url.query
                                                else ""),
            response.status_code, (time.monotonic() - started) * 1000,
        )
        return response

    return endpoint


def list_response(call: Call, collection: str, page: Any, items: list, detail: bool) -> Response:
    """A list body with Cinder's ``count`` and ``<collection>_links`` (reference §6.3)."""
    body: dict = {collection: items}
    if page.count is not None:
        body["count"] = page.count
    if page.has_next:
        body[f"{collection}_links"] = [
            call.links.next(collection, detail, call.query, page.items[-1].id)
        ]
    return SafeJSONResponse(body)


def json_response(body: Any, status: int = 200) -> JSONResponse:
    return SafeJSONResponse(body, status)


def accepted() -> Response:
    return Response(status_code=202)


