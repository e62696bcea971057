"""``auth_strategy = keystone``: tokens validated against an external Keystone v3 by
keystonemiddleware's ``auth_token``, the component every OpenStack service runs.

``auth_token`` is WSGI middleware. It is built once (it holds the token cache and the
service user's keystoneauth session, whose own token it reuses) around a tiny inner WSGI
app; each request's token headers go through it in a worker thread (it validates with
blocking HTTP), and the identity it sets in the environ (``X-Identity-Status``,
``X-User-Id``, ``X-Project-Id``, ``X-Roles``) becomes the ``RequestContext``. Its own
answers — 401 with ``WWW-Authenticate: Keystone uri="..."``, 503 when Keystone cannot be
reached — become blockvault's faults with the same status and challenge.

Its options are keystonemiddleware's ``[keystone_authtoken]`` options and the options of
the ``auth_type`` plugin (``password``: ``auth_url``, ``username``, ``password``,
``project_name``, ...), given as the ``keystone_authtoken`` settings table
(docs/auth.md). They live on a private oslo.config object, so nothing is read from
``/etc`` behind the operator's back, values are type-checked as oslo.config checks them,
the password is a secret option (masked if oslo.config ever logs it), and an unknown
option is an error at start-up rather than a silent default.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from keystoneauth1 import exceptions as ksa_exceptions
from keystoneauth1 import loading as ks_loading
from keystonemiddleware import auth_token
from keystonemiddleware import exceptions as ksm_exceptions
from oslo_config import cfg
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from blockvault.api.faults import HTTPFault
from blockvault.service.context import RequestContext

if TYPE_CHECKING:
    from blockvault.config import Settings

log = logging.getLogger("blockvault.keystone")

GROUP = "keystone_authtoken"

#: keystonemiddleware's words for a missing, invalid, expired or revoked token (one text
#: for all: the caller learns nothing about which); the log of the middleware says which.
AUTH_REQUIRED = "The request you have made requires authentication."
UNAVAILABLE = "The Keystone service is temporarily unavailable."

#: the request headers the middleware reads (the user token, Swift's alias of it, and the
#: service token); nothing else is handed to it, so no header a caller sends can come back
#: as identity (the middleware strips spoofed ``X-User-Id`` and friends too)
_TOKEN_HEADERS = ("x-auth-token", "x-storage-token", "x-service-token")

#: set by the inner app: the request passed the middleware
_REACHED = "blockvault.keystone.reached"

#: options whose values never appear anywhere blockvault writes
SECRET_OPTIONS = frozenset({"password", "memcache_secret_key", "memcache_password",
                            "application_credential_secret", "token", "passcode"})


def _inner_app(environ: dict, start_response: Any) -> list[bytes]:
    # reached only with a token the middleware accepted (or, with delay_auth_decision,
    # with any request): the identity it found is in ``environ`` for the caller to read
    environ[_REACHED] = True
    start_response("204 No Content", [])
    return []


def build_conf(options: Mapping[str, Any]) -> cfg.ConfigOpts:
    """A private oslo.config object holding ``options`` in the ``[keystone_authtoken]``
    group: keystonemiddleware's options and the ``auth_type`` plugin's. ``ValueError`` for
    an unknown option, a value of the wrong type, or a required option left out."""
    options = {str(k).strip().lower(): v for k, v in options.items()}
    conf = cfg.ConfigOpts()
    # no files, no command line: the settings table is the whole configuration
    conf([], project=None, default_config_files=[], default_config_dirs=[],
         use_env=False)
    for group, opts in auth_token.list_opts():
        conf.register_opts(opts, group=group)
    ks_loading.register_auth_conf_options(conf, GROUP)
    auth_type = str(options.get("auth_type") or "").strip()
    if not auth_type:
        raise ValueError(
            "keystone_authtoken.auth_type is required (e.g. password): the service user "
            "is what validates tokens with Keystone")
    try:
        plugin_opts = ks_loading.get_auth_plugin_conf_options(auth_type)
    except Exception:
        raise ValueError(f"keystone_authtoken.auth_type: unknown plugin {auth_type!r}") from None
    conf.register_opts(plugin_opts, group=GROUP)
    group = conf[GROUP]
    unknown = sorted(k for k in options if k not in group)
    if unknown:
        raise ValueError(f"unknown option(s) in keystone_authtoken: {', '.join(unknown)}")
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        try:
            conf.set_override(key, str(value), group=GROUP)
            getattr(group, key)  # conversion happens on read
        except (ValueError, cfg.Error) as exc:
            if key in SECRET_OPTIONS:  # the value, and oslo's text quoting it, stay out
                raise ValueError(f"keystone_authtoken.{key}: not a valid value") from None
            raise ValueError(f"keystone_authtoken.{key} = {value!r}: {exc}") from None
    # include_service_catalog keeps its default (true) although blockvault calls no other
    # service: the middleware checks application credentials' access rules against the
    # token's catalog, which a ?nocatalog validation leaves out (a KeyError, tested)
    if not group.www_authenticate_uri:
        raise ValueError(
            "keystone_authtoken.www_authenticate_uri is required: the public Keystone URL "
            "that 401 replies send clients to (WWW-Authenticate)")
    return conf


class KeystoneAuthenticator:
    """The caller is whoever Keystone says the ``X-Auth-Token`` belongs to."""

    def __init__(self, settings: Settings) -> None:
        self.conf = build_conf(getattr(settings, "keystone_authtoken", {}) or {})
        self.www_authenticate_uri: str = self.conf[GROUP].www_authenticate_uri
        self.challenge = {"WWW-Authenticate": f'Keystone uri="{self.www_authenticate_uri}"'}
        # Built once: the token cache and the service user's session (and its token)
        # outlive requests.
        try:
            self.protocol = auth_token.AuthProtocol(_inner_app,
                                                    {"oslo_config_config": self.conf})
        except (ksa_exceptions.AuthPluginException, ksm_exceptions.ConfigurationError) as exc:
            # e.g. "Auth plugin requires parameters which were not given: auth_url": option
            # names, never values; a ValueError stops ``blockvault serve`` with it, no trace
            raise ValueError(f"keystone_authtoken: {exc}") from None
        group = self.conf[GROUP]
        cache_time = group.token_cache_time
        log.info("keystone auth: tokens validated at %s (token cache: %s)",
                 group.auth_url if "auth_url" in group else "-",
                 "off" if cache_time < 0 else
                 f"{cache_time} s, {'memcached' if group.memcached_servers else 'in-process'}")

    async def authenticate(self, request: Request) -> RequestContext:
        headers = {name: request.headers[name] for name in _TOKEN_HEADERS
                   if name in request.headers}
        return await run_in_threadpool(self.validate, request.method, request.url.path,
                                       headers)

    def validate(self, method: str, path: str, headers: Mapping[str, str]) -> RequestContext:
        """Run the middleware on a WSGI environ holding only the token headers."""
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": "",
            "SERVER_NAME": "blockvault",
            "SERVER_PORT": "0",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(),
            "wsgi.errors": io.StringIO(),
            "wsgi.version": (1, 0),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in headers.items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        answer: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(status: str, response_headers: list, exc_info: Any = None) -> Any:
            answer.append((status, response_headers))
            return lambda data: None

        try:
            chunks = self.protocol(environ, start_response)
            try:
                for _ in chunks:
                    pass
            finally:
                close = getattr(chunks, "close", None)
                if close:
                    close()
        except Exception as exc:
            # e.g. no identity endpoint in the service user's catalog; the exception's
            # text names URLs, never the password (keystoneauth keeps it out of errors)
            log.error("keystone auth: token validation failed: %s: %s",
                      type(exc).__name__, exc)
            raise HTTPFault(503, UNAVAILABLE) from None
        status = int(answer[0][0].split()[0]) if answer else 500
        if not environ.get(_REACHED):
            if status == 401:
                challenge = next((v for k, v in answer[0][1]
                                  if k.lower() == "www-authenticate"), None)
                raise self._unauthorized(method, path, challenge)
            log.error("keystone auth: the middleware answered %s", answer[0][0] if answer
                      else "nothing")
            raise HTTPFault(503, UNAVAILABLE)
        # with delay_auth_decision the middleware lets everyone through, marked: the
        # decision is still ours
        if environ.get("HTTP_X_IDENTITY_STATUS") != "Confirmed":
            raise self._unauthorized(method, path)
        user_id = environ.get("HTTP_X_USER_ID", "")
        project_id = environ.get("HTTP_X_PROJECT_ID", "")
        roles = [r for r in environ.get("HTTP_X_ROLES", "").split(",") if r.strip()]
        if not user_id:
            raise self._unauthorized(method, path)
        if not project_id:
            # a domain-, system- or unscoped token is valid but names no project, and every
            # call blockvault serves is a project's
            log.info("keystone auth: token of user %s has no project scope: %s %s",
                     user_id, method, path)
            raise HTTPFault(403, "A project-scoped token is required.")
        return RequestContext.from_identity(user_id, project_id, roles)

    def _unauthorized(self, method: str, path: str, challenge: str | None = None) -> HTTPFault:
        log.info("keystone auth: refused (no valid token): %s %s", method, path)
        headers = {"WWW-Authenticate": challenge} if challenge else dict(self.challenge)
        # The body is blockvault's fault shape for every strategy (``unauthorized``, as in
        # reference §8); Cinder passes on the middleware's ``{"error": {...}}`` instead.
        # Clients act on the status and the WWW-Authenticate challenge only.
        return HTTPFault(401, AUTH_REQUIRED, headers)
