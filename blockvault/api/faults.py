"""Cinder's error bodies: ``{"<faultName>": {"code": N, "message": "..."}}`` (reference §8)."""

from __future__ import annotations

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


class HTTPFault(Exception):
    """An error decided by the API layer itself (auth, routing, versions, media type)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def fault_response(status: int, message: str, headers: dict[str, str] | None = None,
                   retry_after: bool = False) -> JSONResponse:
    body: dict = {"code": status, "message": message}
    headers = dict(headers or {})
    if retry_after:
        body["retryAfter"] = "0"
        headers["Retry-After"] = "0"
    return JSONResponse({FAULT_NAMES.get(status, "computeFault"): body}, status, headers=headers)


def service_fault(exc: errors.ServiceError, quota_prefix: bool = True) -> JSONResponse:
    status = next(code for cls, code in _STATUS.items() if isinstance(exc, cls))
    if isinstance(exc, errors.OverQuota):
        message = f"{exc.kind}: {exc.message}" if quota_prefix else exc.message
        return fault_response(413, message, retry_after=True)
    return fault_response(status, exc.message)


INTERNAL_ERROR = (
    "The server has either erred or is incapable of performing the requested operation."
)
