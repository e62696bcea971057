"""Tables. Column names follow Cinder's where the API exposes them (``display_name`` …)."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    event,
    false,
    func,
    select,
    text,
    true,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import FunctionElement


def utcnow() -> dt.datetime:
    """Naive UTC, as Cinder stores and prints it."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class db_now(FunctionElement):  # lower case: it reads as a function in queries
    """The database's current UTC time plus ``seconds``, as a naive DateTime.

    Leases are set and compared with this, never with a worker's clock: workers on several
    hosts (or one paused, or one whose clock jumped) then agree on which lease ran out.
    On SQLite the value has exactly the text form SQLAlchemy stores DateTime columns in
    (``YYYY-MM-DD HH:MM:SS.ffffff``), so comparisons are like with like.
    """

    type = DateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = float(seconds)
        super().__init__()


@compiles(db_now)
def _db_now_default(element: db_now, compiler, **kw) -> str:
    return f"(CURRENT_TIMESTAMP + INTERVAL '{element.seconds:.6f} seconds')"


@compiles(db_now, "postgresql")
def _db_now_pg(element: db_now, compiler, **kw) -> str:
    # statement_timestamp(), not now(): a transaction's start may be long past.
    return (f"(timezone('UTC', statement_timestamp()) "
            f"+ make_interval(secs => {element.seconds:.6f}))")


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler, **kw) -> str:
    # %f is SS.SSS; three more digits give SQLAlchemy's own microsecond text form.
    return (f"(strftime('%Y-%m-%d %H:%M:%f', 'now', '{element.seconds:+.3f} seconds') "
            "|| '000')")


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


def list_index(name: str, equal: tuple[str, ...], order: tuple[str, ...]) -> tuple[Index, Index]:
    """An index in a list's order (migration 0008): equality columns, then the sort columns.

    Lists page in Cinder's order, NULLs first going up and last going down. On PostgreSQL
    that is an index of ``DESC NULLS LAST`` columns read forwards (desc) or backwards (asc);
    SQLite's plain ascending index orders NULLs that way already (and takes no NULLS clause).
    """
    return (
        Index(name, *equal, *order).ddl_if(dialect="sqlite"),
        Index(name, *equal, *[text(f"{c} DESC NULLS LAST") for c in order]
              ).ddl_if(dialect="postgresql"),
    )


#: what every list filters on and pages by (blockvault.service.listing)
LIST_SCOPE = ("project_id", "deleted")
LIST_ORDER = ("created_at", "id")


class Volume(Base):
    __tablename__ = "volumes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(String(255), index=True)
    user_id: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    display_name: Mapped[str | None] = mapped_column(String(255))
    display_description: Mapped[str | None] = mapped_column(String(255))
    metadata_: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    status: Mapped[str] = mapped_column(String(32))
    previous_status: Mapped[str | None] = mapped_column(String(32))
    attach_status: Mapped[str] = mapped_column(String(32), default="detached")
    availability_zone: Mapped[str] = mapped_column(String(255))
    volume_type: Mapped[str | None] = mapped_column(String(255))
    bootable: Mapped[bool] = mapped_column(Boolean, default=False)
    snapshot_id: Mapped[str | None] = mapped_column(String(36))
    source_volid: Mapped[str | None] = mapped_column(String(36))
    backup_id: Mapped[str | None] = mapped_column(String(36))
    #: the volume backend (blockvault.volume.backends) its disk is on; shown as Cinder's
    #: host HOST@BACKEND#POOL
    backend: Mapped[str | None] = mapped_column(String(255), default="rawfile")
    #: the HOST of HOST@BACKEND#POOL: whose workers reach the disk (the backend's
    #: ``backend_host`` or the host_name of the process that made or managed the volume;
    #: None for rows from before migration 0010: this process's)
    host: Mapped[str | None] = mapped_column(String(255))
    #: where the backend finds the disk (a path under a file root, a device, an NBD URI);
    #: None for blockvault's own raw files, found by id
    provider_location: Mapped[str | None] = mapped_column(String(1024))
    #: the driver's own facts about the disk (e.g. the inode recorded at manage time)
    provider_info: Mapped[dict | None] = mapped_column(JSON)
    #: whether blockvault made the disk and may delete it (False for managed disks)
    owns_disk: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        # one live volume per disk (migration 0006)
        Index("ix_volumes_backend_location", "backend", "provider_location", unique=True,
              sqlite_where=text("NOT deleted"), postgresql_where=text("NOT deleted")),
        *list_index("ix_volumes_list", LIST_SCOPE, LIST_ORDER),
    )


class Snapshot(Base):
    __tablename__ = "snapshots"
    __table_args__ = (*list_index("ix_snapshots_list", LIST_SCOPE, LIST_ORDER),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(String(255), index=True)
    user_id: Mapped[str] = mapped_column(String(255))
    volume_id: Mapped[str] = mapped_column(String(36), index=True)
    size: Mapped[int] = mapped_column(Integer)
    display_name: Mapped[str | None] = mapped_column(String(255))
    display_description: Mapped[str | None] = mapped_column(String(255))
    metadata_: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    status: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Backup(Base):
    __tablename__ = "backups"
    __table_args__ = (
        # the default list, one per filter a non-admin may use (name also serves
        # sort=name), and an admin's all-projects list (migration 0008)
        *list_index("ix_backups_list", LIST_SCOPE, LIST_ORDER),
        *list_index("ix_backups_list_status", (*LIST_SCOPE, "status"), LIST_ORDER),
        *list_index("ix_backups_list_volume", (*LIST_SCOPE, "volume_id"), LIST_ORDER),
        *list_index("ix_backups_list_name", LIST_SCOPE, ("display_name", *LIST_ORDER)),
        *list_index("ix_backups_list_all", ("deleted",), LIST_ORDER),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(255))
    project_id: Mapped[str] = mapped_column(String(255))
    volume_id: Mapped[str] = mapped_column(String(36), index=True)
    host: Mapped[str | None] = mapped_column(String(255))
    availability_zone: Mapped[str | None] = mapped_column(String(255))
    display_name: Mapped[str | None] = mapped_column(String(255))
    display_description: Mapped[str | None] = mapped_column(String(255))
    container: Mapped[str | None] = mapped_column(String(255))
    parent_id: Mapped[str | None] = mapped_column(String(36), index=True)
    status: Mapped[str] = mapped_column(String(32))
    fail_reason: Mapped[str | None] = mapped_column(String(255))
    service_metadata: Mapped[str | None] = mapped_column(String(255))
    service: Mapped[str | None] = mapped_column(String(255))
    size: Mapped[int | None] = mapped_column(Integer)
    object_count: Mapped[int | None] = mapped_column(Integer)
    temp_volume_id: Mapped[str | None] = mapped_column(String(36))
    temp_snapshot_id: Mapped[str | None] = mapped_column(String(36))
    num_dependent_backups: Mapped[int] = mapped_column(Integer, default=0)
    snapshot_id: Mapped[str | None] = mapped_column(String(36))
    data_timestamp: Mapped[dt.datetime | None] = mapped_column(DateTime)
    restore_volume_id: Mapped[str | None] = mapped_column(String(36))
    encryption_key_id: Mapped[str | None] = mapped_column(String(36))
    metadata_: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    #: Source volume's name, description, metadata and bootable flag at backup time,
    #: applied to the target on restore (Cinder's ``volume_meta``).
    volume_meta: Mapped[dict | None] = mapped_column(JSON)
    #: Bytes this backup added to the object store (blockvault's own accounting).
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    #: the backup schedule that made it (blockvault.service.schedules); NULL for API calls.
    #: Retention prunes only a schedule's own backups, found by this.
    schedule_id: Mapped[str | None] = mapped_column(String(36), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class Schedule(Base):
    """A backup schedule (blockvault extension ``os-backup-schedules``): which volumes, when,
    full or incremental, how many to keep; its last run and counters. The lease columns let
    exactly one of several processes sharing the DB fire a run (blockvault.service.scheduler).
    """

    __tablename__ = "backup_schedules"
    __table_args__ = (*list_index("ix_backup_schedules_list", LIST_SCOPE, LIST_ORDER),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(String(255), index=True)
    user_id: Mapped[str] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(String(255))
    #: selector: these volume ids, or every volume of the project carrying the metadata key
    #: (``key`` or ``key=value``)
    volume_ids: Mapped[list | None] = mapped_column(JSON)
    volume_metadata_key: Mapped[str | None] = mapped_column(String(255))
    #: exactly one of cron / interval_seconds
    cron: Mapped[str | None] = mapped_column(String(255))
    interval_seconds: Mapped[int | None] = mapped_column(Integer)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC", server_default="UTC")
    #: a full backup every N scheduled backups of a volume; 0 = first full, then incremental
    full_every: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    container: Mapped[str | None] = mapped_column(String(255))
    keep_last: Mapped[int | None] = mapped_column(Integer)
    keep_hourly: Mapped[int | None] = mapped_column(Integer)
    keep_daily: Mapped[int | None] = mapped_column(Integer)
    keep_weekly: Mapped[int | None] = mapped_column(Integer)
    keep_monthly: Mapped[int | None] = mapped_column(Integer)
    keep_yearly: Mapped[int | None] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    #: naive UTC
    next_run_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    last_run_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_success_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    #: 'success' | 'partial' | 'failed'
    last_outcome: Mapped[str | None] = mapped_column(String(16))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_backups_made: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_backups_pruned: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: the backups the last run created: its outcome is settled once all their jobs ended
    last_run_backup_ids: Mapped[list | None] = mapped_column(JSON)
    #: monotonic counters in the DB, so every process and /metrics agree
    runs_total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failures_total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    misses_total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: the DB lease: set and compared with db_now, never a process's clock
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class QuotaLimit(Base):
    """A per-project override of a default quota limit."""

    __tablename__ = "quota_limits"

    project_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    resource: Mapped[str] = mapped_column(String(64), primary_key=True)
    hard_limit: Mapped[int] = mapped_column(Integer)


#: a job is active (its key taken, see ``Job.once_key``) while queued or running
JOB_ACTIVE = "state IN ('queued', 'running') AND once_key IS NOT NULL"


class Job(Base):
    """Asynchronous work claimed by workers with a lease (see blockvault.service.jobs)."""

    __tablename__ = "jobs"
    __table_args__ = (
        # claims pick the project least recently served (blockvault.service.jobs)
        Index("ix_jobs_project_state", "project_id", "state"),
        # at most one active job per (kind, key): two concurrent verify requests queue one
        Index("ux_jobs_active_once", "kind", "once_key", unique=True,
              sqlite_where=text(JOB_ACTIVE), postgresql_where=text(JOB_ACTIVE)),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))
    backup_id: Mapped[str] = mapped_column(String(36), index=True)
    #: whose turn a claim serves: the backup's project (filled in the INSERT itself, see
    #: _job_project), or the caller's for jobs that belong to no backup
    project_id: Mapped[str] = mapped_column(String(255), default="", server_default="")
    #: jobs that need not run twice at once (verifies) carry a key; while one is queued or
    #: running, no other job of its kind may take the same key (ux_jobs_active_once)
    once_key: Mapped[str | None] = mapped_column(String(255))
    volume_id: Mapped[str | None] = mapped_column(String(36))
    #: HOST@BACKEND of the volume the job reads or writes: only a runner announcing it
    #: claims the job; None (store-only work: delete, verify, import) any runner
    route: Mapped[str | None] = mapped_column(String(255))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    #: queued -> running -> done | failed
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    owner: Mapped[str | None] = mapped_column(String(255))
    #: the current attempt's fencing token, new at every claim: every write that finishes
    #: an attempt is conditional on it (a stale attempt's writes change nothing)
    token: Mapped[str | None] = mapped_column(String(32))
    #: every attempt's token, space-separated: what each attempt may have written in the
    #: store under its own storage id, for clean-up
    tokens: Mapped[str | None] = mapped_column(Text)
    #: set and compared with the DB's clock (db_now), never a worker's
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    phase: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    #: what the job found (verify reports)
    result: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Runner(Base):
    """A service process (a job runner, an API) and when it last proved the DB writable:
    its heartbeat, which ``os-services`` lists (blockvault.service.heartbeats)."""

    __tablename__ = "runners"

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime)
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime)
    #: Cinder's binary name of the role: ``cinder-backup`` (job runner) or ``cinder-api``
    binary: Mapped[str] = mapped_column(String(64), default="cinder-backup",
                                        server_default="cinder-backup")
    #: the volume backends it reaches, as Cinder's HOST@BACKEND (for routing jobs by host)
    backends: Mapped[list | None] = mapped_column(JSON)


class ApiKey(Base):
    """An API key (``auth_strategy = apikey``): who it speaks for and a hash of its secret.
    The secret itself is shown once, at creation, and never stored."""

    __tablename__ = "api_keys"

    #: the public part of the key (``bvk_<id>_<secret>``): requests look the key up by it
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(255), index=True)
    user_id: Mapped[str] = mapped_column(String(255))
    #: role names as given (implied roles are added per request, as for Keystone tokens)
    roles: Mapped[list] = mapped_column(JSON, default=list)
    #: sha256 of the secret, hex: the secret has 256 random bits, so a fast hash suffices
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: naive UTC; NULL = never expires
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


@event.listens_for(Job, "before_insert")
def _job_project(_mapper, _conn, job: Job) -> None:
    """A job queued without a project takes its backup's, read in the INSERT itself: no
    enqueue site can forget it, and no extra round trip is made."""
    if not job.project_id:
        job.project_id = func.coalesce(  # type: ignore[assignment]
            select(Backup.project_id).where(Backup.id == job.backup_id).scalar_subquery(), "")
