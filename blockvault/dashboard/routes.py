"""The dashboard's routes: the overview page, its login and logout, the JSON its script
polls for running jobs, and the package's static files.

Read-only apart from login and logout (which only set or clear the cookie), so there is
nothing for a forged cross-site request to do; the two POSTs also refuse a foreign
``Origin``. Every page and poll re-validates the cookie's token with the API's own
Authenticator and checks ``blockvault:dashboard:view`` on the project shown.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from blockvault.api.auth import AUTH_REQUIRED
from blockvault.api.faults import HTTPFault, SafeJSONResponse, fault_response, service_fault
from blockvault.api.http import public_base, read_bounded_body
from blockvault.dashboard import auth as cookie
from blockvault.dashboard.assets import Assets
from blockvault.dashboard.templates import make_templates
from blockvault.service import overview
from blockvault.service.context import RequestContext
from blockvault.service.errors import Forbidden, ServiceError

log = logging.getLogger("blockvault.dashboard")

#: how often the page asks for running jobs' progress (the engine reports every 0.5 s)
POLL_MS = 1000
#: a login form is one short field
MAX_FORM = 8192

#: the page runs only its own script and styles: a name a tenant chose can never run as
#: code, even if escaping were ever missed; no framing (clickjacking)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # not "no-referrer": with it, Chromium sends "Origin: null" on the login form's POST
    "Referrer-Policy": "same-origin",
    # tenants' data: never kept by a shared cache or the browser's history cache
    "Cache-Control": "no-store",
}

NOT_ALLOWED = "Your credential is valid, but it may not view this dashboard."


class Dashboard:
    def __init__(self, services: Any) -> None:
        self.services = services
        self.assets = Assets()
        self.templates = make_templates(self.assets.url)

    # -- who is asking --------------------------------------------------------------------

    async def caller(self, request: Request) -> RequestContext | None:
        """The context of the cookie's token, None without a valid one; ``HTTPFault``
        other than 401 (Keystone unreachable: 503) goes up."""
        token = cookie.cookie_token(request)
        if token is None:
            return None
        try:
            return await cookie.authenticate_token(self.services.auth, request, token)
        except HTTPFault as exc:
            if exc.status == 401:
                return None
            raise

    def _base(self, request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/") + "/dashboard"

    def _render(self, request: Request, name: str, context: dict[str, Any],
                status: int = 200) -> Response:
        context = {"base": self._base(request), **context}
        return self.templates.TemplateResponse(request, name, context, status_code=status,
                                               headers=SECURITY_HEADERS)

    def _to_login(self, request: Request) -> Response:
        response = RedirectResponse(self._base(request) + "/login", 303,
                                    headers=SECURITY_HEADERS)
        if request.cookies.get(cookie.COOKIE):  # a stale or revoked token: forget it
            cookie.clear_cookie(response, request)
        return response

    def _same_origin(self, request: Request) -> bool:
        """A browser sends ``Origin`` with every POST; one that names another site is a
        forged request. Absent (an old client, curl) is allowed: SameSite=Strict still
        keeps the cookie from a cross-site request."""
        origin = request.headers.get("origin")
        if origin is None:
            return True
        own = urlsplit(public_base(request, self.services.settings.public_endpoint))
        theirs = urlsplit(origin)
        return (theirs.scheme, theirs.netloc) == (own.scheme, own.netloc)

    # -- pages ----------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        try:
            ctx = await self.caller(request)
        except HTTPFault as exc:
            return self._render(request, "error.html", {"message": exc.message}, exc.status)
        if ctx is None:
            return self._to_login(request)
        requested = request.query_params.get("project")
        try:
            scope = overview.resolve_scope(ctx, requested)
        except Forbidden:
            return self._render(request, "error.html", {"message": NOT_ALLOWED, "ctx": ctx},
                                403)
        data = await run_in_threadpool(overview.overview, self.services.db, ctx, scope)
        jobs_url = self._base(request) + "/api/jobs"
        if requested:
            jobs_url += "?" + urlencode({"project": requested})
        charts = {
            "stored": [[t for t, _ in data.stored_series], [v for _, v in data.stored_series]],
            "durations": [[t for t, _ in data.duration_series],
                          [v for _, v in data.duration_series]],
            "jobsUrl": jobs_url,
            "loginUrl": self._base(request) + "/login",
            "pollMs": POLL_MS,
        }
        return self._render(request, "overview.html", {
            "ctx": ctx, "data": data, "all_projects": scope.all_projects,
            "requested": requested or "", "charts": charts,
        })

    async def login_form(self, request: Request) -> Response:
        return self._render(request, "login.html", self._login_context(None))

    def _login_context(self, error: str | None) -> dict[str, Any]:
        return {"error": error, "strategy": self.services.settings.auth_strategy}

    async def login(self, request: Request) -> Response:
        if not self._same_origin(request):
            return self._render(request, "error.html",
                                {"message": "Cross-site login refused."}, 403)
        try:
            raw = await read_bounded_body(request, MAX_FORM)
        except HTTPFault as exc:
            return self._render(request, "login.html", self._login_context(exc.message),
                                exc.status)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            return self._render(request, "login.html",
                                self._login_context("Unsupported Content-Type"), 415)
        try:
            fields = parse_qs(raw.decode("ascii"), max_num_fields=4)
        except (UnicodeDecodeError, ValueError):
            fields = {}
        token = (fields.get("token") or [""])[0].strip()
        try:
            ctx = await cookie.authenticate_token(self.services.auth, request, token)
        except HTTPFault as exc:
            # the API's own words (one text for every cause of a 401)
            return self._render(request, "login.html", self._login_context(exc.message),
                                exc.status)
        try:
            overview.resolve_scope(ctx, None)
        except Forbidden:
            return self._render(request, "login.html", self._login_context(NOT_ALLOWED), 403)
        log.info("dashboard login: user %s, project %s", ctx.user_id, ctx.project_id)
        response = RedirectResponse(self._base(request), 303, headers=SECURITY_HEADERS)
        cookie.set_cookie(response, request, token)
        return response

    async def logout(self, request: Request) -> Response:
        if not self._same_origin(request):
            return self._render(request, "error.html",
                                {"message": "Cross-site logout refused."}, 403)
        response = RedirectResponse(self._base(request) + "/login", 303,
                                    headers=SECURITY_HEADERS)
        cookie.clear_cookie(response, request)
        return response

    # -- what the page polls --------------------------------------------------------------

    async def jobs(self, request: Request) -> Response:
        try:
            ctx = await self.caller(request)
            if ctx is None:
                raise HTTPFault(401, AUTH_REQUIRED)
            scope = overview.resolve_scope(ctx, request.query_params.get("project"))
        except HTTPFault as exc:
            return fault_response(exc.status, exc.message, {"Cache-Control": "no-store"})
        except ServiceError as exc:
            response = service_fault(exc)
            response.headers["Cache-Control"] = "no-store"
            return response
        rows = await run_in_threadpool(overview.running_jobs, self.services.db, scope)
        return SafeJSONResponse({"jobs": [r.as_json() for r in rows]},
                                headers={"Cache-Control": "no-store"})


def routes(services: Any) -> list[Route]:
    dash = Dashboard(services)

    async def slash(request: Request) -> Response:
        return RedirectResponse(dash._base(request), 308)

    return [
        Route("/dashboard", dash.page, methods=["GET"]),
        Route("/dashboard/", slash, methods=["GET"]),
        Route("/dashboard/login", dash.login_form, methods=["GET"]),
        Route("/dashboard/login", dash.login, methods=["POST"]),
        Route("/dashboard/logout", dash.logout, methods=["POST"]),
        Route("/dashboard/api/jobs", dash.jobs, methods=["GET"]),
        Route("/dashboard/static/{name}", dash.assets.serve, methods=["GET"]),
    ]
