"""Errors the backup engine raises (store errors propagate unchanged)."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every engine failure."""


class Cancelled(EngineError):
    """The caller asked the operation to stop; no manifest was written."""


class DataError(EngineError):
    """Stored data is missing or corrupt. ``object_name`` names the object at fault."""

    def __init__(self, message: str, object_name: str = "") -> None:
        super().__init__(message)
        self.object_name = object_name


class MissingObject(DataError):
    """A DataError for an object that does not exist (verify reports these apart)."""


class KeyMismatch(EngineError):
    """The container is encrypted and no key, or the wrong key, was configured."""


class FormatError(EngineError):
    """An object has an unknown format or format version."""


class TargetError(EngineError):
    """Writing the restore target failed (it is full, over a file size limit, or the device
    failed): the restore did not complete and the target holds a mix of old and new bytes.
    ``errno`` is the OS error number (None when the OS reported none)."""

    def __init__(self, message: str, target: str, err: int | None = None) -> None:
        super().__init__(message)
        self.target = target
        self.errno = err
