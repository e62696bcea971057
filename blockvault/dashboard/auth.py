"""The dashboard's login: a browser cannot send ``X-Auth-Token`` on a navigation, so the
token (a Keystone token, an API key, or noauth's ``user:project``) is kept in a cookie and
handed to the API's own ``Authenticator`` on every request, as if it were that header.

Nothing is cached: each page and each poll is validated again, so a revoked key or token
stops working at once, as it does for the API. The cookie is HttpOnly (page scripts never
see it), SameSite=Strict (no other site's page can make the browser send it) and Secure
when the dashboard is served over https.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from blockvault.api.auth import AUTH_REQUIRED, Authenticator
from blockvault.api.faults import HTTPFault
from blockvault.service.context import RequestContext

COOKIE = "blockvault_dashboard"
#: a Fernet token is ~200 characters, an API key ~70; a cookie holds ~4 KiB
MAX_TOKEN = 3072

#: headers that carry credentials to an Authenticator: the request's own are dropped, so
#: the cookie is the one credential a dashboard request has
_CREDENTIAL_HEADERS = {b"x-auth-token", b"x-storage-token", b"x-service-token"}


def valid_token_text(token: str) -> bool:
    """Whether ``token`` can be a header value: printable ASCII, not too long. Anything else
    is no credential of any strategy, and must not reach a header (no CR/LF)."""
    return 0 < len(token) <= MAX_TOKEN and token.isascii() and token.isprintable()


def as_api_request(request: Request, token: str) -> Request:
    """``request`` as the API would have received it with ``X-Auth-Token: token``."""
    headers = [(k, v) for k, v in request.scope["headers"]
               if k.lower() not in _CREDENTIAL_HEADERS and k.lower() != b"cookie"]
    headers.append((b"x-auth-token", token.encode("ascii")))
    return Request({**request.scope, "headers": headers})


async def authenticate_token(auth: Authenticator, request: Request,
                             token: str) -> RequestContext:
    """The caller's context for ``token``; ``HTTPFault`` (401, or 503 when Keystone cannot
    be reached) as the API would answer."""
    if not valid_token_text(token):
        raise HTTPFault(401, AUTH_REQUIRED)
    return await auth.authenticate(as_api_request(request, token))


def cookie_token(request: Request) -> str | None:
    token = request.cookies.get(COOKIE)
    return token if token and valid_token_text(token) else None


def _cookie_path(request: Request) -> str:
    # sent to the dashboard's pages only, never to the API
    return request.scope.get("root_path", "").rstrip("/") + "/dashboard"


def set_cookie(response: Response, request: Request, token: str) -> None:
    # no Max-Age: a session cookie, gone when the browser closes; the token's own
    # expiry (Keystone's, an API key's) still applies on every request
    response.set_cookie(COOKIE, token, path=_cookie_path(request), httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def clear_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path=_cookie_path(request), httponly=True,
                           samesite="strict", secure=request.url.scheme == "https")
