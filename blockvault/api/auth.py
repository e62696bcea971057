"""Who is calling: one ``Authenticator`` per ``auth_strategy`` turns a request into a
``RequestContext`` or refuses it with 401. ``noauth`` (a developer's loopback), ``apikey``
(standalone deployments) and ``keystone`` (``blockvault.api.keystone``)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Any, Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from blockvault.api.faults import HTTPFault
from blockvault.service import apikeys
from blockvault.service.context import RequestContext

if TYPE_CHECKING:
    from blockvault.config import Settings
    from blockvault.db import Database

log = logging.getLogger("blockvault.api")

STRATEGIES = ("noauth", "apikey", "keystone")

#: Keystone's words (keystonemiddleware answers a missing or bad token with them); one text
#: for every cause, so a caller learns nothing about which keys exist. The log says which.
AUTH_REQUIRED = "The request you have made requires authentication."


class Authenticator(Protocol):
    async def authenticate(self, request: Request) -> RequestContext:
        """The caller's context; ``HTTPFault(401, ...)`` without a valid credential."""
        ...


class NoAuth:
    """Cinder's noauth: the token ``user:project`` (or ``user``, project = user) is believed
    as it is. Users named in ``admin_users`` get the admin role, the others member."""

    def __init__(self, admin_users: list[str]) -> None:
        self.admin_users = set(admin_users)

    async def authenticate(self, request: Request) -> RequestContext:
        token = request.headers.get("x-auth-token")
        if not token:
            raise HTTPFault(401, AUTH_REQUIRED)
        user, sep, project = token.partition(":")
        if not sep:
            project = user
        if not user or not project:
            raise HTTPFault(401, AUTH_REQUIRED)
        roles = ("admin",) if user in self.admin_users else ("member",)
        return RequestContext.from_identity(user, project, roles)


class ApiKeyAuth:
    """``X-Auth-Token: bvk_<id>_<secret>``, checked against the database on every request
    (one primary-key lookup): a key created or revoked by the CLI counts at once, in every
    process sharing the database. No cache, so no window in which a revoked key works."""

    #: what clients are told to send (RFC 9110 wants a challenge on every 401)
    CHALLENGE = {"WWW-Authenticate": 'X-Auth-Token realm="blockvault"'}

    def __init__(self, db: Database) -> None:
        self.db = db

    async def authenticate(self, request: Request) -> RequestContext:
        token = request.headers.get("x-auth-token")
        if not token:
            raise HTTPFault(401, AUTH_REQUIRED, dict(self.CHALLENGE))
        identity = await run_in_threadpool(apikeys.check, self.db, token)
        if isinstance(identity, apikeys.Refusal):
            # the key id is no secret and tells the operator which key; the token never logs
            log.info("API key refused (%s): %s %s", identity.reason, request.method,
                     request.url.path)
            raise HTTPFault(401, AUTH_REQUIRED, dict(self.CHALLENGE))
        return RequestContext.from_identity(identity.user_id, identity.project_id,
                                            identity.roles)


def make_authenticator(settings: Settings, db: Database) -> Authenticator:
    strategy = settings.auth_strategy
    if strategy == "noauth":
        return NoAuth(settings.admin_users)
    if strategy == "apikey":
        return ApiKeyAuth(db)
    if strategy == "keystone":
        try:
            from blockvault.api.keystone import KeystoneAuthenticator
        except ImportError as exc:
            raise ValueError(
                f"auth_strategy = keystone is not available in this installation ({exc})"
            ) from exc
        return KeystoneAuthenticator(settings)
    raise ValueError(f"auth_strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only: a loopback address, or a
    name all of whose addresses are loopback (``localhost``). ``0.0.0.0``, ``::`` and ""
    mean every interface."""
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses: set[Any] = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def check_listen(settings: Settings) -> None:
    """noauth lets anyone act as any project and as an admin, so it serves only this
    machine unless ``noauth_allow_remote`` says otherwise; then it warns loudly."""
    if settings.auth_strategy != "noauth":
        return
    if is_loopback(settings.host):
        return
    if not settings.noauth_allow_remote:
        raise ValueError(
            f"auth_strategy = noauth refuses to listen on {settings.host!r}: anyone who can "
            "reach it could act as any project and as an admin. Listen on 127.0.0.1, use "
            "auth_strategy = apikey or keystone (docs/auth.md), or set "
            "noauth_allow_remote = true if you really mean it."
        )
    log.warning(
        "!!! auth_strategy = noauth on %s with noauth_allow_remote = true: NO "
        "AUTHENTICATION. Anyone who can reach this port can act as any project and as an "
        "admin. Use auth_strategy = apikey or keystone for anything but a closed test "
        "network. !!!", settings.host)
