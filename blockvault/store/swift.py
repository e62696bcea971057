"""OpenStack Swift backend (python-swiftclient).

Auth v1 (tempauth, swauth, RadosGW's Swift API) and Keystone v3 (``auth_version="3"``
with ``os_options`` such as ``project_name``, ``user_domain_name``,
``project_domain_name``, ``region_name``; needs python-keystoneclient installed).

swiftclient's own retry loop is switched off (``retries=0``): the one
:class:`~blockvault.store.retry.RetryingBackend` owns retries and their time budget.
swiftclient still re-authenticates once on a 401 (an expired token), which is what we want.

``put_new`` sends ``If-None-Match: *``, which Swift checks when the PUT *starts*, not when
it commits, so it is not atomic against a writer whose PUT overlaps (see
:meth:`SwiftContainer.put_new`).

A full store is :class:`StoreFull`: 507 Insufficient Storage (the object servers' disks)
and 413 Request Entity Too Large (the container_quotas/account_quotas middlewares' answer to
an upload past a quota, or an object above the cluster's max_file_size).

Connections: a bounded pool of ``pool_size`` swiftclient Connections shared by all threads
(a swiftclient Connection is not safe to use from two threads at once). A Connection that
saw a transport error is dropped rather than returned. The auth token is shared, so new
Connections do not each authenticate again.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import hashlib
import http.client
import queue
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

import requests
import swiftclient
import urllib3
from swiftclient.exceptions import ClientException

from blockvault.store.base import (
    Backend,
    Container,
    ObjectInfo,
    ObjectNotFound,
    StoreError,
    StoreFull,
    StorePermanentError,
    StoreUnavailable,
    file_md5,
)

#: transport-level failures: the store may be back on a retry
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    socket.error,  # OSError: refused, reset, unreachable, timeouts
    TimeoutError,
)

_AUTH_HINTS = (
    "unauthorized",
    "authorization failure",
    "keystoneclient",
    "keystoneauth",
    "tenant",
    "project",
    "endpoint for",
    "auth version",
    "unsupported scheme",
)

DEFAULT_TIMEOUT = 60.0

#: 507: no room on the object servers' disks; 413: a container or account quota (or the
#: cluster's max_file_size) refused the upload
_FULL_STATUSES = frozenset({413, 507})

#: object metadata naming the put_new call that wrote an object (read back to confirm it)
_CREATE_ID_HEADER = "X-Object-Meta-Blockvault-Create-Id"


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _response_text(exc: ClientException) -> str:
    """The short plain-text body of an error answer (``Upload exceeds quota.``), or ``""``
    (HTML pages and long bodies say nothing the status does not)."""
    body = exc.http_response_content or b""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    text = " ".join(text.split())
    return text if text and len(text) <= 200 and "<" not in text else ""


def _map_error(exc: BaseException, what: str, name: str = "", container: str = "") -> StoreError:
    """Translate a swiftclient/transport exception into the store contract's errors
    (``name`` and ``container``: what was being written, for :class:`StoreFull`)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, ClientException):
        status = exc.http_status
        reason = f"{status} {exc.http_reason}".strip() if status else str(exc.msg).strip()
        if status in _FULL_STATUSES:
            text = _response_text(exc)
            return StoreFull(f"swift: {reason}{': ' + text if text else ''}", name, container)
        if status is None:
            low = str(exc.msg).lower()
            if any(h in low for h in _AUTH_HINTS):
                return StorePermanentError(
                    f"swift: {what}: authentication failed or is misconfigured: {reason}"
                )
            return StoreUnavailable(f"swift: {what}: {reason}")
        if status in (401, 403):
            return StorePermanentError(
                f"swift: {what}: authentication/access denied ({reason}); "
                "check swift_user/swift_key and the account's ACLs"
            )
        if status in (408, 429, 498) or status >= 500:
            return StoreUnavailable(f"swift: {what}: {reason}")
        return StorePermanentError(f"swift: {what}: {reason}")
    if isinstance(exc, _TRANSPORT_ERRORS):
        return StoreUnavailable(f"swift: {what}: {type(exc).__name__}: {exc}")
    mod = type(exc).__module__ or ""
    if mod.startswith(("keystoneauth1", "keystoneclient")):
        name = type(exc).__name__
        if any(k in name for k in ("Connect", "Timeout", "Unavailable", "Gateway")):
            return StoreUnavailable(f"swift: {what}: keystone unreachable: {name}: {exc}")
        return StorePermanentError(f"swift: {what}: keystone authentication failed: {name}")
    raise exc  # a bug, not a store failure: let it surface


def _listing_mtime(item: dict[str, Any]) -> float:
    """``last_modified`` of a JSON container listing entry: ISO 8601 in UTC without a zone
    suffix (``2024-05-01T12:00:00.123450``)."""
    value = item.get("last_modified")
    try:
        when = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        # a store that sends no usable time will not send one on a retry
        raise StorePermanentError(
            f"swift: listing entry {item.get('name')!r} has no valid last_modified ({value!r})"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _head_mtime(hdrs: dict[str, str], name: str) -> float:
    """The object's time from HEAD headers: X-Timestamp (sub-second, the same time the
    listing shows) or else Last-Modified (whole seconds, rounded up by the proxy)."""
    stamp = hdrs.get("x-timestamp")
    if stamp:
        try:
            return float(stamp.split("_")[0])  # an internal form may carry an offset
        except ValueError:
            pass
    modified = hdrs.get("last-modified")
    if modified:
        try:
            return email.utils.parsedate_to_datetime(modified).timestamp()
        except (TypeError, ValueError):
            pass
    raise StorePermanentError(
        f"swift: HEAD {name}: no valid X-Timestamp or Last-Modified ({stamp!r}, {modified!r})"
    )


class _ConnectionPool:
    """At most ``size`` swiftclient Connections; a thread borrows one per call."""

    def __init__(self, factory: Any, size: int) -> None:
        self._factory = factory
        self._idle: queue.LifoQueue[swiftclient.Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max(1, size))

    @contextlib.contextmanager
    def connection(self) -> Iterator[swiftclient.Connection]:
        self._slots.acquire()
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._factory()
            try:
                yield conn
            except BaseException as exc:
                # a transport error may leave the HTTP connection half-used: drop it
                if isinstance(exc, _TRANSPORT_ERRORS) or (
                    isinstance(exc, ClientException)
                    and (exc.http_status is None or exc.http_status >= 500)
                ):
                    with contextlib.suppress(Exception):
                        conn.close()
                else:
                    self._idle.put(conn)
                raise
            else:
                self._idle.put(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                conn.close()


class SwiftContainer(Container):
    #: objects per listing request (Swift's default container_listing_limit is 10000)
    list_page_size = 10000

    def __init__(self, backend: SwiftBackend, name: str) -> None:
        self.name = name
        self._backend = backend

    def _call(self, what: str, fn: str, *args: Any, **kwargs: Any) -> Any:
        return self._backend._call(f"{what} {self.name}", fn, self.name, *args, **kwargs)

    def put(self, name: str, data: bytes) -> None:
        data = bytes(data)
        self._put(name, data, len(data), _md5_hex(data))

    def put_file(self, name: str, f: BinaryIO, size: int) -> None:
        # swiftclient sends a file body in 64 KiB pieces
        self._put(name, f, size, file_md5(f, size).hexdigest())

    def put_new(self, name: str, data: bytes) -> bool:
        """PUT with ``If-None-Match: *`` (412 if the object exists: ``False``), then read
        the object back (HEAD with ``X-Newest``) and answer ``True`` only if it carries this
        call's create id.

        **Not atomic against overlapping writers.** The object server checks
        ``If-None-Match`` when a PUT starts and commits later without checking again; of
        the objects written, the one with the newest timestamp (given by the proxy when the
        PUT arrived) stays. So two PUTs that both start before either commits both succeed.
        The read-back turns most such overlaps into one ``True``: a writer whose object was
        replaced by a newer one before it looked answers ``False`` (as does one whose older
        object was discarded). What remains: a writer B whose PUT started before writer A's
        committed, has a newer timestamp and commits only after A read back -- A and B both
        answer ``True``, and B's bytes stay (tests/test_store_backends.py shows it with
        stalled uploads). Whatever is stored is always the object of a caller that got
        ``True``. A caller that must agree with the others re-reads the object after using
        it, or creates it where no other writer can start at the same moment.
        """
        data = bytes(data)
        create_id = uuid.uuid4().hex
        try:
            self._put(
                name,
                data,
                len(data),
                _md5_hex(data),
                {"If-None-Match": "*", _CREATE_ID_HEADER: create_id},
            )
        except _PreconditionFailed:
            return False
        try:
            hdrs = self._call(
                f"HEAD object {name} in", "head_object", name, headers={"X-Newest": "true"}
            )
        except _NotFound:
            # deleted at once by someone else: not known created; a retry finds out
            raise StoreUnavailable(
                f"swift: PUT {name} in {self.name}: the object was gone right after it was "
                "created"
            ) from None
        return hdrs.get(_CREATE_ID_HEADER.lower()) == create_id

    def _put(
        self,
        name: str,
        body: bytes | BinaryIO,
        size: int,
        want: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        # etag= makes the proxy verify the body too (422 on mismatch)
        try:
            got = self._call(
                f"PUT object {name} in",
                "put_object",
                name,
                body,
                content_length=size,
                etag=want,
                content_type="application/octet-stream",
                headers=headers,
            )
        except StorePermanentError as exc:
            if "422" in str(exc):
                raise StoreUnavailable(f"swift: PUT {name}: body corrupted in transit") from exc
            raise
        got = (got or "").strip('"')
        if got and got != want:
            raise StoreUnavailable(
                f"swift: PUT {name}: ETag {got} does not match the uploaded data's MD5 {want}"
            )

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must be non-negative")
        headers: dict[str, str] = {}
        if length == 0:
            # nothing to read, but a missing object must still raise
            if self.head(name) is None:
                raise ObjectNotFound(name, self.name)
            return b""
        if length is not None:
            headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            _hdrs, body = self._call(
                f"GET object {name} in", "get_object", name, headers=headers or None
            )
        except _NotFound:
            raise ObjectNotFound(name, self.name) from None
        except _RangeNotSatisfiable:
            return b""  # the object exists but the range starts past its end
        return bytes(body)

    def head(self, name: str) -> int | None:
        hdrs = self._head(name)
        return None if hdrs is None else int(hdrs.get("content-length", 0))

    def stat(self, name: str) -> ObjectInfo | None:
        hdrs = self._head(name)
        if hdrs is None:
            return None
        return ObjectInfo(name, int(hdrs.get("content-length", 0)), _head_mtime(hdrs, name))

    def _head(self, name: str) -> dict[str, str] | None:
        try:
            return self._call(f"HEAD object {name} in", "head_object", name)
        except _NotFound:
            return None

    def delete(self, name: str) -> None:
        try:
            self._call(f"DELETE object {name} in", "delete_object", name)
        except _NotFound:
            pass

    def list(self, prefix: str = "") -> Iterator[str]:
        for info in self.list_info(prefix):
            yield info.name

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        marker = ""
        while True:
            try:
                _hdrs, page = self._call(
                    "list",
                    "get_container",
                    marker=marker,
                    limit=self.list_page_size,
                    prefix=prefix or None,
                )
            except _NotFound:
                raise StorePermanentError(f"swift: container {self.name} does not exist") from None
            if not page:
                return
            for item in page:
                yield ObjectInfo(
                    item["name"], int(item.get("bytes", 0)), _listing_mtime(item)
                )
            marker = page[-1]["name"]


class _NotFound(Exception):
    pass


class _RangeNotSatisfiable(Exception):
    pass


class _PreconditionFailed(Exception):
    """412: a conditional request's condition (``If-None-Match: *``) did not hold."""


def _target(fn: str, args: tuple[Any, ...]) -> tuple[str, str]:
    """(object, container) a swiftclient call ``fn(*args)`` addresses, for error messages."""
    if fn.endswith("_object") and len(args) >= 2:
        return str(args[1]), str(args[0])
    if fn.endswith("_container") and args:
        return "", str(args[0])
    return "", ""


class SwiftBackend(Backend):
    kind = "swift"

    def __init__(
        self,
        auth_url: str,
        user: str,
        key: str,
        auth_version: str = "1",
        *,
        os_options: dict[str, str] | None = None,
        insecure: bool = False,
        pool_size: int = 8,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not auth_url:
            raise StorePermanentError("swift: no auth URL configured (swift_auth_url)")
        self.auth_url = auth_url
        self.user = user
        self._key = key
        self.auth_version = str(auth_version or "1")
        if self.auth_version in ("1", "1.0"):
            self.auth_version = "1.0"
        self.os_options = {k: v for k, v in (os_options or {}).items() if v}
        self.insecure = insecure
        self.timeout = timeout
        self._token_lock = threading.Lock()
        self._storage_url: str | None = None
        self._token: str | None = None
        self._pool = _ConnectionPool(self._new_connection, pool_size)

    def __repr__(self) -> str:  # never show the key
        return f"SwiftBackend(auth_url={self.auth_url!r}, user={self.user!r})"

    def _new_connection(self) -> swiftclient.Connection:
        with self._token_lock:
            url, token = self._storage_url, self._token
        return swiftclient.Connection(
            authurl=self.auth_url,
            user=self.user,
            key=self._key,
            auth_version=self.auth_version,
            os_options=dict(self.os_options),
            insecure=self.insecure,
            retries=0,  # RetryingBackend owns retries
            retry_on_ratelimit=False,
            timeout=self.timeout,
            preauthurl=url,
            preauthtoken=token,
        )

    def _call(self, what: str, fn: str, *args: Any, **kwargs: Any) -> Any:
        try:
            with self._pool.connection() as conn:
                result = getattr(conn, fn)(*args, **kwargs)
                if conn.url and conn.token and conn.token != self._token:
                    with self._token_lock:
                        self._storage_url, self._token = conn.url, conn.token
                return result
        except ClientException as exc:
            if exc.http_status == 404:
                raise _NotFound(what) from None
            if exc.http_status == 416:
                raise _RangeNotSatisfiable(what) from None
            if exc.http_status == 412:
                raise _PreconditionFailed(what) from None
            raise _map_error(exc, what, *_target(fn, args)) from None
        except StoreError:
            raise
        except Exception as exc:
            raise _map_error(exc, what, *_target(fn, args)) from exc

    def validate_container_name(self, container: str) -> str | None:
        if not container:
            return "Swift container names must not be empty"
        if "/" in container:
            return "Swift container names must not contain '/'"
        if len(container.encode("utf-8")) > 256:
            return "Swift container names must be at most 256 bytes (UTF-8)"
        if container in (".", ".."):
            return "Swift container names must not be '.' or '..'"
        # Swift itself takes most of these, but a name with a newline or NUL is a mistake
        # (or a log injection), never a container anyone means to use.
        if not container.isprintable():
            return "Swift container names must not contain control characters"
        return None

    def open(self, container: str, create: bool = True) -> Container:
        reason = self.validate_container_name(container)
        if reason:
            raise StorePermanentError(f"invalid container {container!r}: {reason}")
        what = f"open container {container}"
        try:
            self._call(what, "head_container", container)
        except _NotFound:
            if not create:
                raise StorePermanentError(f"swift: container {container} does not exist") from None
            try:
                self._call(f"create container {container}", "put_container", container)
            except _NotFound:
                raise StorePermanentError(
                    f"swift: cannot create container {container}: account not found"
                ) from None
        return SwiftContainer(self, container)

    def close(self) -> None:
        self._pool.close()
