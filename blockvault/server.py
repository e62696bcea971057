"""Wiring: builds the whole service (DB, object store, engine, volume driver, rules, job
runner) from settings, and the ASGI application around it."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from blockvault.api import backups as backup_routes
from blockvault.api import health as health_routes
from blockvault.api import metrics as metrics_routes
from blockvault.api import openapi as openapi_routes
from blockvault.api import schedules as schedule_routes
from blockvault.api import services as service_routes
from blockvault.api import volumes as volume_routes
from blockvault.api.auth import make_authenticator
from blockvault.api.faults import HTTPFault, fault_response
from blockvault.api.http import make_routes, public_base
from blockvault.api.versions import fmt, negotiate, v2_document, versions_document
from blockvault.config import Settings
from blockvault.dashboard import routes as dashboard_routes
from blockvault.db import Database
from blockvault.engine import Engine, EngineConfig
from blockvault.metrics.registry import Metrics
from blockvault.service import policy
from blockvault.service.backups import BackupService
from blockvault.service.context import RequestContext
from blockvault.service.heartbeats import (
    BINARY_API,
    BINARY_BACKUP,
    Heartbeat,
    RouteWatch,
    ServiceListing,
)
from blockvault.service.jobs import JobRunner
from blockvault.service.quotas import QuotaDefaults, Quotas
from blockvault.service.recovery import sweep_orphans
from blockvault.service.scheduler import Scheduler
from blockvault.service.schedules import ScheduleService
from blockvault.service.tasks import Tasks
from blockvault.service.volumes import VolumeService
from blockvault.store import Backend
from blockvault.store.factory import backup_service_name, make_backend, make_cinder_backend
from blockvault.volume.backends import Backends, resolve_host_name
from blockvault.worker_process import WorkerProcess

log = logging.getLogger("blockvault")


def make_engine(settings: Settings, backend: Backend) -> Engine:
    return Engine(
        backend,
        settings.cache_dir,
        EngineConfig(
            block_size=settings.block_size,
            pack_size=settings.pack_size,
            compression=settings.compression,
            zstd_level=settings.zstd_level,
            workers=settings.engine_workers,
            upload_concurrency=settings.upload_concurrency,
            direct_io=settings.direct_io,
            encryption_key=settings.encryption_key_bytes(),
            gc_grace=settings.gc_grace,
            store_lag=settings.store_lag,
            repack=settings.repack,
            repack_max_unused=settings.repack_max_unused,
            dedup_scope=settings.dedup_scope,
        ),
    )


def policy_path(settings: Settings) -> Path:
    """The policy file: a relative ``policy_file`` is in data_dir (load_settings has
    already made one given in a config file absolute, from that file's folder)."""
    path = Path(getattr(settings, "policy_file", "policy.yaml")).expanduser()
    return path if path.is_absolute() else settings.data_dir / path


class Services:
    """The running service: every long-lived object, built once from settings.

    Roles (docs/deployment.md): ``serve_api`` serves HTTP and beats as ``cinder-api``;
    ``run_jobs`` runs the job runner, the scheduler and maintenance and beats as
    ``cinder-backup``. ``api`` and ``worker`` are one each; an API without jobs only queues
    them in the DB, for workers elsewhere to claim. ``blockvault serve`` is an API whose
    ``worker`` is its own child process (blockvault.worker_process): it wakes it when it
    queues a job and asks it for its health."""

    def __init__(self, settings: Settings, *, run_jobs: bool = True,
                 serve_api: bool = True, worker: WorkerProcess | None = None) -> None:
        self.settings = settings
        self.run_jobs, self.serve_api = run_jobs, serve_api
        self.worker = worker
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.db_url, pool_size=settings.db_pool_size,
                           max_overflow=settings.db_max_overflow)
        self.db.upgrade()
        self.auth = make_authenticator(settings, self.db)
        self.policy = policy.configure(policy_path(settings))
        #: GET /metrics: this service's registry (blockvault.metrics)
        self.metrics = Metrics(self.db)
        self.backend = make_backend(settings, observer=self.metrics.store)
        self.engine = make_engine(settings, self.backend)
        # an unset host_name is the one kept in data_dir: stable across hostname changes
        self.backends = Backends.from_config(
            settings.backends, data_dir=settings.data_dir,
            host_name=resolve_host_name(settings.host_name, settings.data_dir))
        #: the embedded default backend's raw files (volumes blockvault creates)
        self.driver = self.backends.raw.files
        self.quotas = Quotas(
            QuotaDefaults(
                volumes=settings.quota_volumes,
                gigabytes=settings.quota_gigabytes,
                snapshots=settings.quota_snapshots,
                backups=settings.quota_backups,
                backup_gigabytes=settings.quota_backup_gigabytes,
            )
        )
        self.volumes = VolumeService(
            self.db, self.backends, self.quotas, settings.availability_zone,
            settings.osapi_max_limit,
        )
        service_name = backup_service_name(self.backend.kind)
        self.backups = BackupService(
            self.db,
            self.volumes,
            self.quotas,
            default_container=settings.default_container,
            service_name=service_name,
            validate_container=self.backend.validate_container_name,
            max_limit=settings.osapi_max_limit,
            # without a runner or worker process here, workers elsewhere find new jobs at
            # their next poll
            wake_workers=self._wake_workers,
        )
        self.tasks = tasks = Tasks(
            self.db,
            self.engine,
            self.backends,
            default_container=settings.default_container,
            availability_zone=settings.availability_zone,
            service_name=service_name,
            host=self.backends.host_name,
            gc_grace=settings.gc_grace,
            metrics=self.metrics.jobs,
            cinder_store=make_cinder_backend(settings, observer=self.metrics.store),
        )
        self.metrics.state.job_kinds = tuple(tasks.handlers())
        self.metrics.state.down_time = settings.service_down_time
        #: says in the log which jobs wait for a host no live worker serves
        self.route_watch = RouteWatch(self.db, settings.service_down_time)
        self.runner = JobRunner(
            self.db,
            tasks.handlers(),
            tasks.fail,
            workers=settings.backup_workers,
            lease_seconds=settings.job_lease_seconds,
            data_dir=settings.data_dir,
            on_end=tasks.on_end,
            maintenance=[tasks.collect_owed, self.route_watch],
            maintenance_interval=settings.maintenance_seconds,
            retention=settings.job_retention,
            host=self.backends.host_name,
            # jobs on volumes only where their disks are (docs/deployment.md, "Routing")
            routes=self.backends.reachable(),
        )
        tasks.bind(self.runner)
        self.services = ServiceListing(self.db, settings.service_down_time)
        #: heartbeats of this process's roles (started by start())
        self.heartbeats: list[Heartbeat] = []
        self.schedules = ScheduleService(self.db, self.backups, settings.osapi_max_limit)
        self.scheduler = Scheduler(self.db, self.backups, interval=settings.scheduler_interval,
                                   lease_seconds=settings.scheduler_lease_seconds)

    def _wake_workers(self) -> None:
        if self.run_jobs:
            self.runner.wake()
        elif self.worker is not None:
            self.worker.wake()

    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()
        host, interval = self.backends.host_name, self.settings.report_interval
        if self.serve_api:
            self.heartbeats.append(Heartbeat(
                self.db, f"{host}:api:{os.getpid()}:{uuid.uuid4().hex[:8]}", host,
                BINARY_API, interval=interval))
        if self.run_jobs:
            self.runner.start()
            sweep_orphans(self.db)
            try:
                self.tasks.owe_gc_everywhere()
            except Exception:
                log.exception("listing containers for garbage collection failed")
            self.scheduler.start()
            # the runner's own row (its owner is known once it started)
            self.heartbeats.append(Heartbeat(
                self.db, self.runner.owner, host, BINARY_BACKUP,
                backends=self.backends.reachable(),
                interval=interval))
        for heartbeat in self.heartbeats:
            heartbeat.start()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether jobs can run: worker threads alive and the DB taking writes (an API
        without jobs: whether the DB takes its heartbeat; with a worker process: its
        answer)."""
        if self.worker is not None:
            return self.worker.health()
        if not self.run_jobs:
            problem = self.heartbeats[0].beat_once() if self.heartbeats else None
            body: dict[str, Any] = {"status": "ok" if not problem else "unhealthy",
                                    "workers_alive": 0, "workers": 0}
            if problem:
                body["problems"] = [problem]
                log.error("health check failed: %s", problem)
            return not problem, body
        problems = self.runner.health()
        body = {
            "status": "ok" if not problems else "unhealthy",
            "workers_alive": self.runner.alive_workers(),
            "workers": self.runner.workers,
        }
        if problems:
            body["problems"] = problems
            log.error("health check failed: %s", "; ".join(problems))
        return not problems, body

    def stop(self) -> None:
        """Graceful: running jobs get ``shutdown_timeout`` seconds to finish, then go back
        to the queue for another worker (JobRunner.drain)."""
        if self.run_jobs:
            self.scheduler.stop()
            self.runner.drain(self.settings.shutdown_timeout)
        if self.worker is not None:
            self.worker.stop(self.settings.shutdown_timeout)
        for heartbeat in self.heartbeats:
            heartbeat.stop()
        self.db.dispose()

    # -- quotas (thin: the rules live in Quotas) ----------------------------------------------

    def quota_view(self, ctx: RequestContext, target: str) -> tuple[dict, dict]:
        # Cinder's target is the quota's project: a reader sees its own, an admin any.
        ctx.authorize("volume_extension:quotas:show", {"project_id": target})
        with self.db.reader() as s:
            return self.quotas.limits(s, target), self.quotas.usage(s, target)

    def quota_defaults(self, ctx: RequestContext, target: str) -> dict[str, int]:
        # Cinder authorizes the defaults with the same policy as the quota set, against the
        # target project: another project's defaults are an admin's to read (403).
        ctx.authorize("volume_extension:quotas:show", {"project_id": target})
        return asdict(self.quotas.defaults)

    def used_limits(self, ctx: RequestContext) -> tuple[dict, dict]:
        """The caller's own limits and usage (``/limits``)."""
        ctx.authorize("limits_extension:used_limits")
        with self.db.reader() as s:
            return (self.quotas.limits(s, ctx.project_id),
                    self.quotas.usage(s, ctx.project_id))

    def set_quotas(self, ctx: RequestContext, target: str, values: dict[str, Any]) -> dict:
        ctx.authorize("volume_extension:quotas:update", {"project_id": target})
        with self.db.session() as s:
            self.quotas.set_limits(s, target, values)
            s.flush()
            return self.quotas.limits(s, target)


def create_app(services: Services, manage_lifecycle: bool = True) -> Starlette:
    settings = services.settings

    async def root(request: Request) -> JSONResponse:
        return JSONResponse(versions_document(public_base(request, settings.public_endpoint)), 300)

    async def v3_root(request: Request) -> JSONResponse:
        return JSONResponse(versions_document(public_base(request, settings.public_endpoint)))

    async def v2_root(request: Request) -> JSONResponse:
        return JSONResponse(v2_document(public_base(request, settings.public_endpoint)))

    async def v3_redirect(request: Request) -> RedirectResponse:
        return RedirectResponse(str(request.url).rstrip("/") + "/", 302)

    def version_headers(request: Request) -> dict[str, str]:
        """Every v3 response carries the version it was served at, errors included."""
        if not request.url.path.startswith("/v3/"):
            return {}
        try:
            version = negotiate(request.headers.get("openstack-api-version"))
        except HTTPFault:
            return {}
        return {"OpenStack-API-Version": f"volume {fmt(version)}",
                "Vary": "OpenStack-API-Version"}

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return fault_response(404, "The resource could not be found.", version_headers(request))

    async def bad_method(request: Request, exc: Exception) -> JSONResponse:
        return fault_response(405, "The method is not allowed for the requested URL.",
                              version_headers(request))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_lifecycle:
            services.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                services.stop()

    routes = [
        Route("/", root),
        Route("/v3/", v3_root),
        Route("/v3", v3_redirect),
        Route("/v2/", v2_root),
        *health_routes.routes(services),
        *metrics_routes.routes(services),
        *openapi_routes.routes(settings),
        *dashboard_routes(services),
        *make_routes(backup_routes.ENDPOINTS + volume_routes.ENDPOINTS
                    + schedule_routes.ENDPOINTS + service_routes.ENDPOINTS, services),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: bad_method},
        lifespan=lifespan,
    )
