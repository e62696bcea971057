"""Cinder's error bodies: ``{"<faultName>": {"code": N, "message": "..."}}`` (reference §8)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import orjson
from starlette.responses import JSONResponse

from blockvault.service import errors

FAULT_NAMES = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
    501: "notImplemented",
    503: "serviceUnavailable",
}

_STATUS = {
    errors.Invalid: 400,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.NotSupported: 405,
    errors.Conflict: 409,
    errors.OverQuota: 413,
    errors.Unavailable: 503,
}


log = logging.getLogger("blockvault.api")

#: the longest message an error body carries (values in it are quoted as excerpts already;
#: this bounds whatever else a message may hold)
MAX_MESSAGE = 1000
# Server-side locations: URLs (Swift/S3/Keystone endpoints) and absolute paths of two
# components or more (data_dir, store directories). They help an operator, who finds them
# in the log, and tell a tenant about the deployment, so error bodies never carry them.
# Device names (/dev/...) are kept: an admin managing a block device gives them, and an
# error about one must say which.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
_PATH = re.compile(r"(?<![\w.~:-])/(?!dev/)(?:[\w.~@+-]+/)+[\w.~@+-]*")


class SafeJSONResponse(JSONResponse):
    """A JSON response that renders any ``str``, with orjson (compact UTF-8, as Starlette's
    own rendering, several times faster on long lists). Python strings may hold lone
    surrogates (``json.loads('"\\ud800"')`` makes one), which UTF-8 cannot encode: those
    replies are written with ``\\uXXXX`` escapes, which parse back to the same string,
    instead of failing into a plain-text 500. What orjson declines (those strings, integers
    beyond 64 bits) is rendered by ``json``."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except (orjson.JSONEncodeError, TypeError):
            pass
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False,
                              separators=(",", ":")).encode("ascii")


def public_message(message: str) -> str:
    """``message`` as a tenant may see it: no server paths or URLs, bounded in length."""
    cleaned = _PATH.sub("<path>", _URL.sub("<url>", message))
    if cleaned != message:
        printable = message.encode("utf-8", "backslashreplace").decode("utf-8")
        log.warning("error detail withheld from the reply: %s", printable[:4000])
    if len(cleaned) > MAX_MESSAGE:
        cleaned = cleaned[:MAX_MESSAGE] + "..."
    return cleaned


class HTTPFault(Exception):
    """An error decided by the API layer itself (auth, routing, versions, media type)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def fault_response(status: int, message: str, headers: dict[str, str] | None = None,
                   retry_after: bool = False) -> JSONResponse:
    body: dict = {"code": status, "message": public_message(message)}
    headers = dict(headers or {})
    if retry_after:
        body["retryAfter"] = "0"
        headers["Retry-After"] = "0"
    return SafeJSONResponse({FAULT_NAMES.get(status, "computeFault"): body}, status,
                            headers=headers)


def service_fault(exc: errors.ServiceError, quota_prefix: bool = True) -> JSONResponse:
    status = next(code for cls, code in _STATUS.items() if isinstance(exc, cls))
    if isinstance(exc, errors.OverQuota):
        message = f"{exc.kind}: {exc.message}" if quota_prefix else exc.message
        return fault_response(413, message, retry_after=True)
    return fault_response(status, exc.message)


INTERNAL_ERROR = (
    "The server has either erred or is incapable of performing the requested operation."
)
