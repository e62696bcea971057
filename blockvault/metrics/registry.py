"""The registry a service serves at ``GET /metrics``: its own instruments, its database
state collector and the process's standard metrics, rendered in the format asked for."""

from __future__ import annotations

import os
from collections.abc import Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from blockvault.db.session import Database
from blockvault.metrics.instruments import JobMetrics, StoreMetrics
from blockvault.metrics.state import StateCollector

# Counters' ``*_created`` series double the page and say only when this process started.
prometheus_client.disable_created_metrics()


class Metrics:
    """A registry of its own (not prometheus_client's global one: a test process runs
    several services), with the process's standard metrics.

    In prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by
    ``blockvault serve`` for itself and its worker process) the instruments' values live in
    that directory's files, and the page sums every process's from there."""

    def __init__(self, db: Database, job_kinds: Sequence[str] = (), max_containers: int = 100
                 ) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        # multiprocess: registered apart, or this process's values would be served twice
        own = CollectorRegistry() if shared else self.registry
        self.store = StoreMetrics(own)
        self.jobs = JobMetrics(own)
        if shared:
            MultiProcessCollector(self.registry, path=shared)
        #: its ``job_kinds`` (the job kinds always exported, 0 when none) are the runner's
        self.state = StateCollector(db, job_kinds, max_containers)
        self.registry.register(self.state)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The page and its content type: the Prometheus text format, or OpenMetrics if
        the scraper asks for it (``Accept``)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
