"""Settings: defaults, then a TOML file, then ``BLOCKVAULT_*`` environment variables,
then command-line options — each later source overriding the earlier ones."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "blockvault"


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8776
    data_dir: Path = field(default_factory=default_data_dir)
    #: SQLAlchemy URL of the metadata DB; empty means SQLite in data_dir.
    database_url: str = ""
    #: DB connections each process keeps open once opened: as many as requests run at once
    #: (the API runs them in a pool of 40 threads), so none is opened per request
    db_pool_size: int = 40
    #: DB connections opened beyond db_pool_size under a burst (closed when returned)
    db_max_overflow: int = 10
    #: "noauth" (token user:project, loopback only), "apikey" (keys made with
    #: ``blockvault apikey create``) or "keystone" (docs/auth.md)
    auth_strategy: str = "noauth"
    #: let noauth listen on a non-loopback address (anyone reaching it is any project, and
    #: an admin): for closed test networks only, and warned about at every start
    noauth_allow_remote: bool = False
    #: noauth: users (the user part of the token) who are admins.
    admin_users: list[str] = field(default_factory=lambda: ["admin"])
    #: keystone: keystonemiddleware's auth_token options and its auth plugin's (TOML table
    #: [keystone_authtoken], env BLOCKVAULT_KEYSTONE_AUTHTOKEN__<OPTION>; docs/auth.md).
    #: Holds the service user's password: never in repr or logs.
    keystone_authtoken: dict[str, Any] = field(default_factory=dict, repr=False)
    #: oslo.policy file (YAML or JSON, Cinder's rule names) overriding the policy defaults;
    #: relative: from the config file's folder, else data_dir. Absent = defaults; re-read
    #: when it changes (docs/policy.md).
    policy_file: str = "policy.yaml"
    #: Scheme://host[:port][/prefix] used in links instead of the request's host.
    public_endpoint: str = ""
    availability_zone: str = "nova"
    #: HOST of Cinder's ``HOST@BACKEND#POOL`` volume hosts; empty = the machine's hostname
    host_name: str = ""
    #: volume backends by name: TOML tables ``[backends.NAME]`` with ``driver = "file" |
    #: "block" | "nbd" | "raw"`` and the driver's options (docs/volumes.md). The embedded
    #: ``rawfile`` backend (blockvault's own raw files) is always there.
    backends: dict[str, Any] = field(default_factory=dict)
    default_container: str = "volumebackups"
    osapi_max_limit: int = 1000
    project_id_regex: str = r"[0-9a-zA-Z_\-]+"
    #: bytes a JSON request body may have (Cinder's osapi_max_request_body_size); larger
    #: ones get 413 before they are read. The volume data upload is bounded by the volume.
    max_request_body_size: int = 114688
    #: addresses/CIDR networks of reverse proxies whose X-Forwarded-For/-Proto/-Host are
    #: believed; from anyone else those headers are ignored
    trusted_proxies: list[str] = field(default_factory=list)
    #: serve ``GET /metrics`` (Prometheus) without a credential to every client, not only
    #: to this machine's (loopback); remote clients otherwise need an admin's token
    #: (docs/operations.md)
    metrics_allow_remote: bool = False
    # Worker pool
    backup_workers: int = 2
    job_lease_seconds: int = 60
    #: seconds between runs of the maintenance timer (garbage collections owed, worker
    #: supervision); 0 = min(60, gc_grace / 4), at least 1
    maintenance_interval: float = 0.0
    #: seconds finished jobs are kept before the maintenance timer prunes them (0 = forever)
    job_retention: float = 259200.0
    #: seconds between a service process's heartbeats (Cinder's report_interval)
    report_interval: float = 10.0
    #: seconds since its last heartbeat after which os-services shows a service ``down``
    #: (Cinder's service_down_time)
    service_down_time: float = 60.0
    #: seconds a stopping worker (SIGTERM/SIGINT) lets running jobs finish before it hands
    #: them back to the queue for another worker (docs/deployment.md)
    shutdown_timeout: float = 60.0
    #: seconds between the backup scheduler's looks at due schedules (docs/schedules.md)
    scheduler_interval: float = 30.0
    #: seconds a process holds a schedule's lease while it fires or settles a run
    scheduler_lease_seconds: int = 300
    # Quotas (Cinder's defaults)
    quota_volumes: int = 10
    quota_snapshots: int = 10
    quota_gigabytes: int = 1000
    quota_backups: int = 10
    quota_backup_gigabytes: int = 1000
    # Object store
    store: str = "local"
    #: root of the local store's containers; empty means data_dir/store
    local_store_dir: str = ""
    swift_auth_url: str = ""
    swift_user: str = ""
    swift_key: str = field(default="", repr=False)
    swift_auth_version: str = "1"
    swift_project_name: str = ""
    swift_user_domain_name: str = "Default"
    swift_project_domain_name: str = "Default"
    swift_region_name: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    s3_secret_key: str = field(default="", repr=False)
    s3_addressing_style: str = "path"
    #: where the objects of backups imported from Cinder's records are read: a TOML table
    #: ``[cinder_store]`` with the store keys above (``store``, ``local_store_dir``,
    #: ``swift_*``, ``s3_*``; env BLOCKVAULT_CINDER_STORE as JSON), opened read-only
    #: (docs/migration.md). Empty: the store configured above. Holds credentials: no repr.
    cinder_store: dict[str, Any] = field(default_factory=dict, repr=False)
    store_retry_attempts: int = 10
    store_retry_budget: float = 60.0
    store_pool_size: int = 8
    # Engine
    block_size: int = 32768
    pack_size: int = 16 * 1024 * 1024
    compression: str = "zstd"
    zstd_level: int = 1
    engine_workers: int = 0
    upload_concurrency: int = 4
    #: O_DIRECT for volume reads of full backups; see docs/configuration.md.
    direct_io: bool = True
    #: seconds an unreferenced pack stays condemned before garbage collection deletes it
    gc_grace: float = 3600.0
    #: seconds the store's listings may lag behind its writes (Swift's do)
    store_lag: float = 300.0
    #: repack partly referenced packs during garbage collection (docs/format.md, "Repacking")
    repack: bool = True
    #: unused bytes tolerated in packs, as a fraction of the live bytes, before repacking
    repack_max_unused: float = 0.1
    #: "project": a backup deduplicates only against its own project's blocks, so nothing
    #: a tenant observes depends on another's data; "container": across every project
    #: (single-tenant deployments). See docs/configuration.md.
    dedup_scope: str = "project"
    #: Path of a file holding the 32-byte encryption key (raw or hex); empty = no encryption.
    encryption_key_file: str = ""
    #: The key itself as 64 hex characters (prefer the file; never logged).
    encryption_key: str = field(default="", repr=False)

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "blockvault.sqlite"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path}"

    @property
    def volumes_dir(self) -> Path:
        return self.data_dir / "volumes"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def maintenance_seconds(self) -> float:
        if self.maintenance_interval > 0:
            return self.maintenance_interval
        return max(1.0, min(60.0, self.gc_grace / 4))

    def encryption_key_bytes(self) -> bytes | None:
        raw = self.encryption_key
        if self.encryption_key_file:
            data = Path(self.encryption_key_file).read_bytes()
            raw = data.decode("ascii", "replace").strip() if len(data) != 32 else ""
            if len(data) == 32:
                return data
        if not raw:
            return None
        try:
            key = bytes.fromhex(raw)
        except ValueError:
            raise ValueError("encryption key must be 64 hex characters or a 32-byte file") from None
        if len(key) != 32:
            raise ValueError("encryption key must be 32 bytes (64 hex characters)")
        return key


def _coerce(value: Any, current: Any, name: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, str):
            word = value.strip().lower()
            if word in ("1", "true", "yes", "on", "y", "t"):
                return True
            if word in ("0", "false", "no", "off", "n", "f", ""):
                return False
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return bool(value)
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, Path):
        return Path(value).expanduser()
    if isinstance(current, dict):
        if isinstance(value, str) and value.strip().startswith("{"):
            value = json.loads(value)  # a table in an environment variable, as JSON
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a table of options")
        return {**current, **{str(k): v for k, v in value.items()}}
    if isinstance(current, list):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return list(value)
    return str(value)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from defaults, ``config_file`` (TOML), the environment and ``overrides``.

    Unknown keys in the file are an error: a typo must not silently fall back to a default.
    """
    settings = Settings()
    names = {f.name for f in dataclasses.fields(Settings)}
    sources: list[dict[str, Any]] = []
    config_file = config_file or os.environ.get("BLOCKVAULT_CONFIG")
    if config_file:
        with open(config_file, "rb") as f:
            data = tomllib.load(f)
        # a [cinder_store] table next to [blockvault] (out before the tables below rebuild
        # ``data`` from [blockvault])
        cinder_table = data.pop("cinder_store", None) if "blockvault" in data else None
        if "blockvault" in data and "keystone_authtoken" in data:
            # [keystone_authtoken] next to [blockvault], as in an OpenStack service's file
            data = {**data["blockvault"], "keystone_authtoken": data["keystone_authtoken"]}
        if "blockvault" in data and "backends" in data:
            # [backends.NAME] tables next to [blockvault]
            data = {**data["blockvault"], "backends": data["backends"]}
        data = data.get("blockvault", data)
        if cinder_table is not None:
            data = {**data, "cinder_store": cinder_table}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown option(s) in {config_file}: {', '.join(unknown)}")
        sources.append(data)
    env = {}
    for name in names:
        value = os.environ.get(f"BLOCKVAULT_{name.upper()}")
        if value is not None:
            env[name] = value
    # one option of a table each: BLOCKVAULT_KEYSTONE_AUTHTOKEN__AUTH_URL=...
    for key, value in os.environ.items():
        if key.startswith("BLOCKVAULT_KEYSTONE_AUTHTOKEN__") and len(key) > 31:
            env.setdefault("keystone_authtoken", {})[key[31:].lower()] = value
    sources.append(env)
    sources.append({k: v for k, v in overrides.items() if v is not None})
    for source in sources:
        for key, value in source.items():
            setattr(settings, key, _coerce(value, getattr(settings, key), key))
    if config_file and not Path(settings.policy_file).expanduser().is_absolute():
        settings.policy_file = str(Path(config_file).resolve().parent / settings.policy_file)
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    """Refuse at start-up the settings that would otherwise fail on the first request."""
    if settings.auth_strategy not in ("noauth", "apikey", "keystone"):
        raise ValueError("auth_strategy must be noauth, apikey or keystone, "
                         f"not {settings.auth_strategy!r}")
    for name in ("report_interval", "service_down_time"):
        if getattr(settings, name) <= 0:
            raise ValueError(f"{name} must be a positive number of seconds")
    if settings.shutdown_timeout < 0:
        raise ValueError("shutdown_timeout must be 0 or more seconds")
    if settings.max_request_body_size < 1:
        raise ValueError("max_request_body_size must be a positive number of bytes")
    for entry in settings.trusted_proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(
                f"trusted_proxies: {entry!r} is not an IP address or network"
            ) from None
