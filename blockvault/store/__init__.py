"""Object store backends: where backup objects live (local directory, S3, Swift).

One small interface (:class:`Backend` opens a :class:`Container`; a container puts, gets,
heads, deletes and lists objects). Retries live in one wrapper that serves every backend.
"""

from blockvault.store.base import (
    Backend,
    Container,
    ObjectInfo,
    ObjectNotFound,
    StoreError,
    StoreFull,
    StorePermanentError,
    StoreUnavailable,
)

__all__ = [
    "Backend",
    "Container",
    "ObjectInfo",
    "ObjectNotFound",
    "StoreError",
    "StoreFull",
    "StorePermanentError",
    "StoreUnavailable",
]
