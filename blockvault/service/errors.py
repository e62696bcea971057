"""Domain errors. Each carries the exact Cinder message; the API maps the class to a
status code and fault name."""

from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(ServiceError):
    """The request breaks a rule (400)."""


class NotFound(ServiceError):
    """The resource does not exist or is not visible to the caller (404)."""


class Forbidden(ServiceError):
    """Policy does not allow the call (403)."""


class Conflict(ServiceError):
    """The resource is in a state that does not allow the call (409)."""


class NotSupported(ServiceError):
    """The operation is not supported (405)."""


class Unavailable(ServiceError):
    """A needed service is not available (503)."""


class OverQuota(ServiceError):
    """Over a quota limit (413). ``kind`` is Cinder's exception class name, which the API
    puts in front of the message where Cinder does."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def invalid_input(reason: str) -> Invalid:
    return Invalid(f"Invalid input received: {reason}")


def invalid_backup(reason: str) -> Invalid:
    return Invalid(f"Invalid backup: {reason}")


def invalid_volume(reason: str) -> Invalid:
    return Invalid(f"Invalid volume: {reason}")
