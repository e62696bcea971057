"""Moving volumes from one ``HOST@BACKEND`` to another: Cinder's
``cinder-manage volume update_host``, as ``blockvault volume update-host``.

A volume keeps the HOST it was made on and its jobs go to workers announcing its
``HOST@BACKEND`` (docs/deployment.md, "Routing"). When a host is renamed, or a backend's
``backend_host`` or name changes, the volumes (and the jobs already queued for them) must
follow, or they wait for a worker that never comes back. This is the operator's tool for
it: one transaction on the database, run with the service's own configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from blockvault.db.models import Job, Runner, Volume
from blockvault.db.session import Database
from blockvault.volume.backends import Backends


class UpdateHostError(ValueError):
    """The move is refused; the message says why (nothing was changed)."""


@dataclass(frozen=True)
class Moved:
    volumes: int
    jobs: int


def _parse(option: str, value: str) -> tuple[str, str]:
    host, at, backend = value.partition("@")
    if not at or not host or not backend or "@" in backend:
        raise UpdateHostError(f"{option} {value!r} is not of the form HOST@BACKEND.")
    if "#" in value or any(c.isspace() for c in value):
        raise UpdateHostError(f"{option} {value!r}: give HOST@BACKEND, without '#POOL' or "
                              "spaces (a volume's pool is its backend's).")
    return host, backend


def nameable(db: Database, backends: Backends) -> tuple[list[str], list[str]]:
    """(what this configuration's backends name, what workers' heartbeats announce): the
    ``HOST@BACKEND`` a volume can be moved to, since some worker can reach it."""
    with db.reader() as s:
        announced = {route for row in s.scalars(
            select(Runner.backends).where(Runner.backends.is_not(None)))
            for route in (row or [])}
    return sorted(backends.reachable()), sorted(announced)


def update_host(db: Database, backends: Backends, current: str, new: str) -> Moved:
    """Move every live volume on ``current`` (``HOST@BACKEND``) to ``new``, and the routes
    of the unfinished jobs queued or running for ``current`` (a running job's route matters
    again if its worker dies and the job is queued anew). Refuses a ``new`` that no
    configured backend names (this configuration's, or any worker's announced backends):
    volumes moved there would wait for a worker forever."""
    old_host, old_backend = _parse("--current-host", current)
    new_host, new_backend = _parse("--new-host", new)
    if current == new:
        raise UpdateHostError(f"--new-host is --current-host ({current}): nothing to move.")
    here, announced = nameable(db, backends)
    if new not in here and new not in announced:
        raise UpdateHostError(
            f"No configured backend can name {new}, so no worker would run its volumes' "
            f"jobs. This configuration's backends name: {', '.join(here)}; workers announce: "
            f"{', '.join(announced) or 'none'}.")
    old_driver, new_driver = backends.drivers.get(old_backend), backends.drivers.get(new_backend)
    if old_driver is not None and new_driver is not None and old_driver.kind != new_driver.kind:
        # a disk is found by its driver (a raw file by id, a device by path, an NBD URI):
        # the other kind would not find it
        raise UpdateHostError(
            f"Backend {old_backend} (driver {old_driver.kind}) and backend {new_backend} "
            f"(driver {new_driver.kind}) find disks differently; volumes cannot move "
            "between them.")
    on_old_backend = Volume.backend == old_backend
    if old_backend == backends.default:
        # rows from before backends existed (NULL) are on the default backend
        on_old_backend = or_(on_old_backend, Volume.backend.is_(None))
    try:
        with db.session() as s:
            volumes = s.execute(
                update(Volume)
                .where(Volume.host == old_host, on_old_backend, Volume.deleted.is_(False))
                .values(host=new_host, backend=new_backend)
                .execution_options(synchronize_session=False)
            ).rowcount
            jobs = s.execute(
                update(Job)
                .where(Job.route == current, Job.state.in_(("queued", "running")))
                .values(route=new)
                .execution_options(synchronize_session=False)
            ).rowcount
    except IntegrityError:
        # ix_volumes_backend_location: one live volume per disk of a backend
        raise UpdateHostError(
            f"Some volumes of {current} name disks that volumes of backend {new_backend} "
            "already have; nothing was moved.") from None
    return Moved(volumes=volumes, jobs=jobs)
