"""The backup engine: turns a volume's bytes into deduplicated, compressed, optionally
encrypted packs plus one manifest per backup in an object store container, and back.

It knows bytes and the object store, never the metadata DB or HTTP. See docs/format.md.
"""

from blockvault.engine.config import BackupResult, EngineConfig, Progress, VerifyReport
from blockvault.engine.engine import Engine
from blockvault.engine.errors import (
    Cancelled,
    DataError,
    EngineError,
    FormatError,
    KeyMismatch,
    TargetError,
)

__all__ = [
    "BackupResult",
    "Cancelled",
    "DataError",
    "Engine",
    "EngineConfig",
    "EngineError",
    "FormatError",
    "KeyMismatch",
    "Progress",
    "TargetError",
    "VerifyReport",
]
