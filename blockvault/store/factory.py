"""Build the configured object store backend from settings.

``settings`` is any object with the attributes below (missing ones take the defaults), so
the service's Settings, a test's SimpleNamespace or argparse's Namespace all work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockvault.store.base import Backend
from blockvault.store.retry import NO_OBSERVER, RetryingBackend, StoreObserver

KINDS = ("local", "swift", "s3")

DEFAULT_RETRY_ATTEMPTS = 10  # with full jitter, rides out outages of ~half a minute
DEFAULT_RETRY_BUDGET = 60.0
DEFAULT_POOL_SIZE = 8


def _get(settings: Any, name: str, default: Any = None) -> Any:
    value = getattr(settings, name, None)
    return default if value is None or value == "" else value


def make_inner_backend(settings: Any) -> Backend:
    """The configured backend without the retry wrapper."""
    kind = str(_get(settings, "store", "local")).strip().lower()
    # Enough connections for every concurrent upload of every worker, so no upload
    # waits for a connection.
    concurrent = int(_get(settings, "upload_concurrency", 4)) * int(
        _get(settings, "backup_workers", 2))
    pool_size = max(int(_get(settings, "store_pool_size", DEFAULT_POOL_SIZE)), concurrent)
    if kind == "local":
        from blockvault.store.local import LocalBackend

        root = _get(settings, "local_store_dir")
        if root is None:
            data_dir = _get(settings, "data_dir")
            if data_dir is None:
                raise ValueError("store = 'local' needs local_store_dir or data_dir")
            root = Path(data_dir) / "store"
        return LocalBackend(Path(root))
    if kind == "swift":
        from blockvault.store.swift import SwiftBackend

        auth_url = _get(settings, "swift_auth_url")
        user = _get(settings, "swift_user")
        key = _get(settings, "swift_key")
        missing = [
            n
            for n, v in (("swift_auth_url", auth_url), ("swift_user", user), ("swift_key", key))
            if not v
        ]
        if missing:
            raise ValueError(f"store = 'swift' needs {', '.join(missing)}")
        os_options = {
            "project_name": _get(settings, "swift_project_name"),
            "user_domain_name": _get(settings, "swift_user_domain_name"),
            "project_domain_name": _get(settings, "swift_project_domain_name"),
            "region_name": _get(settings, "swift_region_name"),
        }
        return SwiftBackend(
            auth_url,
            user,
            key,
            str(_get(settings, "swift_auth_version", "1")),
            os_options={k: v for k, v in os_options.items() if v},
            insecure=bool(_get(settings, "swift_insecure", False)),
            pool_size=pool_size,
        )
    if kind == "s3":
        from blockvault.store.s3 import S3Backend

        return S3Backend(
            endpoint_url=_get(settings, "s3_endpoint_url"),
            region=_get(settings, "s3_region", "us-east-1"),
            access_key=_get(settings, "s3_access_key"),
            secret_key=_get(settings, "s3_secret_key"),
            addressing_style=_get(settings, "s3_addressing_style", "path"),
            pool_size=pool_size,
        )
    raise ValueError(
        f"unknown store {kind!r}: the store setting (BLOCKVAULT_STORE) must be one of "
        + ", ".join(KINDS)
    )


def make_backend(settings: Any, observer: StoreObserver = NO_OBSERVER) -> Backend:
    """The configured backend, wrapped in the one retry layer (which tells ``observer``
    about every attempt: the service's metrics)."""
    return RetryingBackend(
        make_inner_backend(settings),
        attempts=int(_get(settings, "store_retry_attempts", DEFAULT_RETRY_ATTEMPTS)),
        budget=float(_get(settings, "store_retry_budget", DEFAULT_RETRY_BUDGET)),
        observer=observer,
    )


def make_cinder_backend(settings: Any, observer: StoreObserver = NO_OBSERVER) -> Backend | None:
    """The store named by the ``cinder_store`` table (where backups imported from Cinder's
    records are read; blockvault.service.cinder_import opens it read-only), or None when
    there is none: Cinder's objects are then in the main store. Keys the table leaves out
    are the main store's retry settings; it names its own store kind and credentials."""
    table = dict(_get(settings, "cinder_store", None) or {})
    if not table:
        return None
    unknown = sorted(set(table) - _STORE_KEYS)
    if unknown:
        raise ValueError(f"unknown option(s) in cinder_store: {', '.join(unknown)}")
    from types import SimpleNamespace

    retry = {k: _get(settings, k) for k in ("store_retry_attempts", "store_retry_budget")}
    return make_backend(SimpleNamespace(**{**retry, **table}), observer)


#: the settings a ``cinder_store`` table may hold (those of the main store)
_STORE_KEYS = frozenset({
    "store", "local_store_dir", "swift_auth_url", "swift_user", "swift_key",
    "swift_auth_version", "swift_project_name", "swift_user_domain_name",
    "swift_project_domain_name", "swift_region_name", "swift_insecure", "s3_endpoint_url",
    "s3_region", "s3_access_key", "s3_secret_key", "s3_addressing_style",
    "store_retry_attempts", "store_retry_budget", "store_pool_size",
})


def backup_service_name(kind: str) -> str:
    """The Cinder ``service`` value reported for backups stored in ``kind``."""
    if kind == "local":
        return "cinder.backup.drivers.posix"
    if kind in ("swift", "s3"):
        return f"cinder.backup.drivers.{kind}"
    raise ValueError(f"unknown store {kind!r}: expected one of {', '.join(KINDS)}")
