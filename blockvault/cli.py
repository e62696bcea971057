"""The ``blockvault`` command: ``serve`` runs the service; the other commands are a small
client of its HTTP API (volumes, data upload/download, backups with progress)."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx

DEFAULT_URL = "http://127.0.0.1:8776"


@click.group()
def main() -> None:
    """blockvault: Block Storage backups with the OpenStack Cinder API."""


# -- serve --------------------------------------------------------------------------------


def _service_options(f: Any) -> Any:
    f = click.option("--log-level", default="info", show_default=True)(f)
    f = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Where the database, volumes and local object store live.")(f)
    f = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     default=None, help="TOML configuration file.")(f)
    return f


def _listen_options(f: Any) -> Any:
    f = click.option("--port", type=int, default=None,
                     help="Port to listen on (default 8776).")(f)
    f = click.option("--host", default=None,
                     help="Address to listen on (default 127.0.0.1; with auth_strategy = "
                          "noauth, loopback only unless noauth_allow_remote).")(f)
    return f


def _services(config_file: str | None, data_dir: str | None, log_level: str, *,
              run_jobs: bool, serve_api: bool, worker_process: bool = False,
              **listen: Any) -> Any:
    """Settings and Services for one role (docs/deployment.md). ``worker_process``: the
    jobs run in a child ``blockvault worker`` (blockvault.worker_process), as ``serve``'s."""
    from blockvault.api.auth import check_listen
    from blockvault.config import load_settings

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        settings = load_settings(config_file, data_dir=data_dir, **listen)
        if serve_api:
            check_listen(settings)
        worker = None
        if worker_process:
            from blockvault.worker_process import WorkerProcess

            _count_across_processes(settings.data_dir / "metrics")
            args = ["--log-level", log_level, "--data-dir", str(settings.data_dir)]
            if config_file:
                args += ["--config", config_file]
            worker = WorkerProcess(args, settings.backup_workers)
        from blockvault.server import Services  # after the metrics' mode is chosen

        return Services(settings, run_jobs=run_jobs, serve_api=serve_api, worker=worker)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


def _count_across_processes(root: Path) -> None:
    """The API's ``GET /metrics`` counts what its worker process did too: prometheus_client's
    multiprocess mode (each process's counters in files of one directory, summed when
    served), chosen by the environment before prometheus_client is imported here or in the
    child. A directory per ``serve`` (processes may share a data dir); those of ``serve``
    processes no longer running are removed: counters start at zero with the service, as a
    single process's do."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if not (old.name.isdigit() and Path(f"/proc/{old.name}").exists()):
            shutil.rmtree(old, ignore_errors=True)
    directory = root / str(os.getpid())
    directory.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def _run_http(services: Any, log_level: str, role: str) -> None:
    import gc

    import uvicorn

    from blockvault.api.proxies import TrustedProxies
    from blockvault.server import create_app

    settings = services.settings
    app = create_app(services)
    click.echo(
        f"blockvault {role} listening on http://{settings.host}:{settings.port} "
        f"(data in {settings.data_dir}, store: {settings.store}, "
        f"auth: {settings.auth_strategy})",
        err=True,
    )
    # Forwarded headers are ours to judge (api/proxies.py, from trusted_proxies only):
    # uvicorn's own handling would believe any local peer's X-Forwarded-Proto/-For.
    # loop/http "auto": uvloop and httptools (uvicorn[standard]) where installed, else
    # asyncio and h11 — the same server, a fast event loop and HTTP parser when available.
    # SIGTERM/SIGINT: uvicorn stops accepting, finishes in-flight requests (for at most
    # shutdown_timeout), then the lifespan's end drains the jobs (Services.stop).
    # Everything built so far (modules, routes, SQLAlchemy's tables and caches) lives as
    # long as the process: kept out of the collector's full passes, which otherwise walk it
    # all every few list pages (a 1000-row page: p99 65 ms, 11 ms without them).
    gc.collect()
    gc.freeze()
    uvicorn.run(TrustedProxies(app, settings.trusted_proxies), host=settings.host,
                port=settings.port, log_level=log_level, access_log=False,
                proxy_headers=False, loop="auto", http="auto",
                timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout)))


@main.command()
@_service_options
@_listen_options
def serve(config_file: str | None, host: str | None, port: int | None, data_dir: str | None,
          log_level: str) -> None:
    """Run the API and the embedded stores, with the jobs in a worker process of its own."""
    services = _services(config_file, data_dir, log_level, run_jobs=False, serve_api=True,
                         worker_process=True, host=host, port=port)
    _run_http(services, log_level, "serve")


@main.command()
@_service_options
@_listen_options
def api(config_file: str | None, host: str | None, port: int | None, data_dir: str | None,
        log_level: str) -> None:
    """Run the HTTP API only: jobs are queued in the database for workers (several API
    processes may run behind a load balancer; docs/deployment.md)."""
    services = _services(config_file, data_dir, log_level, run_jobs=False, serve_api=True,
                         host=host, port=port)
    _run_http(services, log_level, "api")


@main.command()
@_service_options
@click.option("--link-fd", type=int, default=None, hidden=True,
              help="Run as the jobs of `blockvault serve`: its end of the link "
                   "(blockvault.worker_process).")
def worker(config_file: str | None, data_dir: str | None, log_level: str,
           link_fd: int | None) -> None:
    """Run the jobs only (backups, restores, deletes, verifications), the scheduler and
    maintenance, until SIGTERM or SIGINT: then running jobs get shutdown_timeout seconds
    to finish and the rest go back to the queue for another worker."""
    import signal
    import threading

    from blockvault.worker_process import ParentLink, die_with_parent

    if link_fd is not None:
        die_with_parent()
    services = _services(config_file, data_dir, log_level, run_jobs=True, serve_api=False)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    services.start()
    if link_fd is not None:
        ParentLink(link_fd, services.runner.wake, services.health, stop.set).start()
    click.echo(f"blockvault worker {services.runner.owner} running "
               f"({services.settings.backup_workers} job threads, "
               f"data in {services.settings.data_dir})", err=True)
    while not stop.wait(3600):
        pass
    click.echo("blockvault worker stopping", err=True)
    services.stop()
    click.echo("blockvault worker stopped", err=True)


# -- client ---------------------------------------------------------------------------------


#: where OpenStack tools look for clouds.yaml, first found wins (openstacksdk's order)
CLOUDS_YAML = ("clouds.yaml", "~/.config/openstack/clouds.yaml", "/etc/openstack/clouds.yaml")

NO_CREDENTIALS = """no credentials: the blockvault client no longer assumes an admin token.
Give one of:
  export OS_AUTH_TOKEN=KEY            an API key from `blockvault apikey create`
  export OS_AUTH_TOKEN=demo:demo      on a noauth server (the default): USER:PROJECT
  export OS_CLOUD=NAME                an entry of clouds.yaml (auth_type: admin_token)
and, for a server elsewhere than http://127.0.0.1:8776, OS_ENDPOINT=http://HOST:PORT/v3.
See docs/cli.md."""


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _cloud_entry(name: str) -> dict[str, Any]:
    """The ``clouds.<name>`` entry of the first clouds.yaml found (``OS_CLIENT_CONFIG_FILE``
    first, as openstacksdk does)."""
    import yaml

    paths = [p for p in [os.environ.get("OS_CLIENT_CONFIG_FILE"), *CLOUDS_YAML] if p]
    for path in (Path(p).expanduser() for p in paths):
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise click.ClickException(f"{path}: {exc}") from exc
        clouds = data.get("clouds") if isinstance(data, dict) else None
        if isinstance(clouds, dict) and isinstance(clouds.get(name), dict):
            return clouds[name]
        raise click.ClickException(f"{path} has no cloud named {name!r}")
    raise click.ClickException(
        f"OS_CLOUD={name}, but no clouds.yaml in {', '.join(CLOUDS_YAML)}")


def _split_endpoint(url: str) -> tuple[str, str | None]:
    """``http://h:8776``, ``.../v3`` or ``.../v3/PROJECT`` as (root, project or None)."""
    url = url.rstrip("/")
    head, _, tail = url.rpartition("/")
    if tail in ("v3", "v2"):
        return head, None
    root, _, version = head.rpartition("/")
    if version in ("v3", "v2") and tail:
        return root, tail
    return url, None


class Credentials:
    """Where the client's URL and token come from, in the order OpenStack tools use: the
    command line (``--url``/``--token``), ``BLOCKVAULT_URL``/``BLOCKVAULT_TOKEN``, the
    ``OS_*`` environment, then the ``OS_CLOUD`` entry of clouds.yaml. Resolved when a
    command runs, so ``--help`` never needs credentials."""

    def __init__(self, url: str | None, token: str | None, cloud: str | None) -> None:
        self.url, self.token, self.cloud = url, token, cloud
        self._client: Client | None = None

    def resolve(self) -> tuple[str, str, str | None]:
        """(root URL, token, project or None)."""
        url = self.url or _env("OS_ENDPOINT")
        token = self.token or _env("OS_AUTH_TOKEN", "OS_TOKEN")
        project = _env("OS_PROJECT_ID")
        if self.cloud and not (url and token):
            entry = _cloud_entry(self.cloud)
            auth = entry.get("auth") or {}
            kind = str(entry.get("auth_type") or "")
            if kind not in ("admin_token", "token_endpoint", "token", "none", "noauth", ""):
                raise click.ClickException(
                    f"cloud {self.cloud!r}: auth_type {kind} is not one the blockvault client "
                    "speaks (admin_token with token and endpoint); use the openstack CLI")
            token = token or auth.get("token")
            url = (url or auth.get("endpoint") or entry.get("block_storage_endpoint_override")
                   or entry.get("volume_endpoint_override"))
            project = project or auth.get("project_id")
        if not token:
            raise click.ClickException(NO_CREDENTIALS)
        root, url_project = _split_endpoint(url or DEFAULT_URL)
        if url_project is None and project is None and ":" in token:
            # noauth's USER:PROJECT names the project; API keys and Keystone tokens carry
            # theirs, and project-less URLs (3.67) serve them
            project = token.partition(":")[2] or None
        return root, token, url_project or project

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(*self.resolve())
        return self._client


class Client:
    def __init__(self, url: str, token: str, project: str | None = None) -> None:
        self.project = project
        self.base = f"{url.rstrip('/')}/v3" + (f"/{project}" if project else "")
        self.http = httpx.Client(
            headers={"X-Auth-Token": token, "OpenStack-API-Version": "volume 3.71"},
            timeout=httpx.Timeout(60.0, read=None),
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.http.request(method, self.base + path, **kwargs)
        if resp.status_code >= 400:
            try:
                fault = next(iter(resp.json().values()))
                message = fault.get("message", resp.text)
            except (ValueError, StopIteration, AttributeError):
                message = resp.text
            raise click.ClickException(f"{resp.status_code}: {message}")
        if resp.content and resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return None

    def wait(self, kind: str, item_id: str, done: set[str], progress: bool) -> dict:
        """Poll until the resource reaches one of ``done``; shows progress for backups."""
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        bar = Progress("{task.description}", BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), transient=True, disable=not progress)
        with bar:
            task = bar.add_task(f"{kind} {item_id[:8]}", total=None)
            while True:
                item = self.call("GET", f"/{kind}s/{item_id}")[kind]
                if item["status"] in done:
                    return item
                if kind == "backup":
                    p = self.call("GET", f"/backups/{item_id}/progress")["progress"]
                    if p["bytes_total"]:
                        bar.update(task, total=p["bytes_total"], completed=p["bytes_done"],
                                   description=f"{p['operation']} {p['phase'] or ''}")
                time.sleep(0.5)


def pass_client(f: Any) -> Any:
    """Hands the command a ``Client`` built from its group's credentials."""

    @click.pass_context
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        return ctx.invoke(f, ctx.find_object(Credentials).client(), *args, **kwargs)

    return functools.update_wrapper(wrapper, f)


def credential_options(f: Any) -> Any:
    f = click.option("--os-cloud", "cloud", envvar="OS_CLOUD", default=None,
                     help="Entry of clouds.yaml to use (env OS_CLOUD).")(f)
    f = click.option("--token", envvar="BLOCKVAULT_TOKEN", default=None,
                     help="API key, Keystone token, or USER:PROJECT on a noauth server "
                          "(env BLOCKVAULT_TOKEN, OS_AUTH_TOKEN or OS_TOKEN).")(f)
    return click.option("--url", envvar="BLOCKVAULT_URL", default=None,
                        help=f"Service URL (env BLOCKVAULT_URL or OS_ENDPOINT; "
                             f"default {DEFAULT_URL}).")(f)


@main.group()
@credential_options
@click.pass_context
def volume(ctx: click.Context, url: str | None, token: str | None, cloud: str | None) -> None:
    """Volumes and their data."""
    ctx.obj = Credentials(url, token, cloud)


@volume.command("create")
@click.option("--size", type=int, required=True, help="Size in GiB.")
@click.option("--name", default=None)
@pass_client
def volume_create(client: Client, size: int, name: str | None) -> None:
    vol = client.call("POST", "/volumes", json={"volume": {"size": size, "name": name}})
    click.echo(vol["volume"]["id"])


@volume.command("show")
@click.argument("volume_id")
@pass_client
def volume_show(client: Client, volume_id: str) -> None:
    click.echo(json.dumps(client.call("GET", f"/volumes/{volume_id}")["volume"], indent=2))


@volume.command("upload")
@click.argument("volume_id")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--offset", type=int, default=0, help="Byte offset in the volume.")
@pass_client
def volume_upload(client: Client, volume_id: str, file: str, offset: int) -> None:
    """Write FILE into the volume (holes in FILE are skipped)."""
    sent = 0
    for start, data in _data_extents(Path(file)):
        client.call("PUT", f"/volumes/{volume_id}/data", params={"offset": offset + start},
                    content=data, headers={"Content-Type": "application/octet-stream"})
        sent += len(data)
    click.echo(f"wrote {sent} bytes to volume {volume_id}", err=True)


def _data_extents(path: Path, piece: int = 64 * 1024 * 1024):
    """(offset, bytes) for the data regions of a possibly sparse file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                end = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError:  # past the last data region, or no SEEK_DATA support
                if pos == 0:
                    start, end = 0, size
                else:
                    break
            while start < end:
                n = min(piece, end - start)
                f.seek(start)
                yield start, f.read(n)
                start += n
            pos = end


@volume.command("download")
@click.argument("volume_id")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_client
def volume_download(client: Client, volume_id: str, file: str) -> None:
    """Save the volume's bytes to FILE (zero runs become holes)."""
    zero = bytes(1024 * 1024)
    with client.http.stream("GET", f"{client.base}/volumes/{volume_id}/data") as resp:
        if resp.status_code != 200:
            resp.read()
            raise click.ClickException(f"{resp.status_code}: {resp.text}")
        with open(file, "wb") as out:
            pos = 0
            for chunk in resp.iter_bytes(1024 * 1024):
                if chunk == zero[: len(chunk)]:
                    out.seek(len(chunk), os.SEEK_CUR)
                else:
                    out.write(chunk)
                pos += len(chunk)
            out.truncate(pos)
    click.echo(f"saved {pos} bytes to {file}", err=True)


@main.group()
@credential_options
@click.pass_context
def backup(ctx: click.Context, url: str | None, token: str | None, cloud: str | None) -> None:
    """Backups."""
    ctx.obj = Credentials(url, token, cloud)


@backup.command("create")
@click.argument("volume_id")
@click.option("--name", default=None)
@click.option("--incremental", is_flag=True)
@click.option("--force", is_flag=True)
@click.option("--container", default=None)
@click.option("--snapshot", "snapshot_id", default=None)
@click.option("--wait", is_flag=True, help="Wait until done, with a progress bar.")
@pass_client
def backup_create(client: Client, volume_id: str, name: str | None, incremental: bool,
                  force: bool, container: str | None, snapshot_id: str | None,
                  wait: bool) -> None:
    body = {"volume_id": volume_id, "name": name, "incremental": incremental, "force": force,
            "container": container, "snapshot_id": snapshot_id}
    backup_id = client.call("POST", "/backups", json={"backup": body})["backup"]["id"]
    if wait:
        item = client.wait("backup", backup_id, {"available", "error"}, sys.stderr.isatty())
        if item["status"] == "error":
            raise click.ClickException(f"backup {backup_id} failed: {item['fail_reason']}")
    click.echo(backup_id)


@backup.command("restore")
@click.argument("backup_id")
@click.option("--volume", "volume_id", default=None, help="Existing target volume.")
@click.option("--name", default=None, help="Name of the new volume.")
@click.option("--wait", is_flag=True)
@pass_client
def backup_restore(client: Client, backup_id: str, volume_id: str | None, name: str | None,
                   wait: bool) -> None:
    body = {"volume_id": volume_id, "name": name} if volume_id else {"name": name}
    target = client.call("POST", f"/backups/{backup_id}/restore", json={"restore": body})
    volume_id = target["restore"]["volume_id"]
    if wait:
        client.wait("backup", backup_id, {"available", "error"}, sys.stderr.isatty())
        vol = client.wait("volume", volume_id, {"available", "error_restoring", "error"}, False)
        if vol["status"] != "available":
            raise click.ClickException(f"restore into {volume_id} failed ({vol['status']})")
    click.echo(volume_id)


@backup.command("list")
@pass_client
def backup_list(client: Client) -> None:
    for b in client.call("GET", "/backups/detail")["backups"]:
        click.echo(f"{b['id']}  {b['status']:<16} {b['size']:>5}G  {b['name'] or ''}")


@backup.command("show")
@click.argument("backup_id")
@pass_client
def backup_show(client: Client, backup_id: str) -> None:
    click.echo(json.dumps(client.call("GET", f"/backups/{backup_id}")["backup"], indent=2))


@backup.command("verify")
@click.argument("backup_id")
@pass_client
def backup_verify(client: Client, backup_id: str) -> None:
    """Check every block of a backup (present, decrypts, hash matches) and wait for it."""
    client.call("POST", f"/backups/{backup_id}/verify")
    _wait_verification(client, f"/backups/{backup_id}/verify")


@backup.command("verify-container")
@click.argument("container")
@pass_client
def backup_verify_container(client: Client, container: str) -> None:
    """Check every block of every backup in CONTAINER through the API (admin) and wait."""
    v = client.call("POST", "/os-container-verifications",
                    json={"verification": {"container": container}})["verification"]
    _wait_verification(client, f"/os-container-verifications/{v['id']}")


def _wait_verification(client: Client, path: str) -> None:
    """Poll a verification until it ends; print it; exit 1 unless it found all well."""
    while True:
        v = client.call("GET", path)["verification"]
        if v["state"] in ("ok", "failed"):
            break
        time.sleep(0.5)
    click.echo(json.dumps(v, indent=2))
    if v["state"] != "ok":
        raise SystemExit(1)


@backup.command("delete")
@click.argument("backup_id")
@pass_client
def backup_delete(client: Client, backup_id: str) -> None:
    client.call("DELETE", f"/backups/{backup_id}")


_KEEPS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def keep_options(f: Any) -> Any:
    """--keep-last … --keep-yearly, as restic's forget names them."""
    for name in reversed(_KEEPS):
        f = click.option(f"--keep-{name}", f"keep_{name}", type=int, default=None,
                         help=f"Keep the newest backup of this many {name} buckets"
                              if name != "last" else "Keep this many newest backups.")(f)
    return f


@backup.command("forget")
@click.option("--volume", "volume_id", default=None, help="Every available backup of a volume.")
@click.option("--schedule", "schedule_id", default=None,
              help="The backups a schedule made (its own keep-policy unless --keep-* given).")
@keep_options
@click.option("--timezone", default=None, help="Zone of the calendar buckets (default UTC).")
@click.option("--dry-run", is_flag=True, help="Only show what would be kept and removed.")
@pass_client
def backup_forget(client: Client, volume_id: str | None, schedule_id: str | None,
                  timezone: str | None, dry_run: bool, **keeps: int | None) -> None:
    """Apply a keep-policy (restic's forget rules): list kept backups with the reasons,
    and the removed ones; without --dry-run, delete them (children before parents)."""
    body: dict[str, Any] = {"dry_run": dry_run, **{k: v for k, v in keeps.items() if v is not None}}
    if volume_id:
        body["volume_id"] = volume_id
    if schedule_id:
        body["schedule_id"] = schedule_id
    if timezone:
        body["timezone"] = timezone
    result = client.call("POST", "/os-backup-forget", json={"forget": body})["forget"]
    for item in result["kept"]:
        click.echo(f"keep    {item['id']}  {item['created_at'][:19]}  "
                   f"{', '.join(item['reasons'])}")
    for item in result["removed"]:
        click.echo(f"remove  {item['id']}  {item['created_at'][:19]}")
    if not dry_run:
        click.echo(f"{len(result['deleted'])} deleted, {len(result['pending'])} pending, "
                   f"{len(result['refused'])} refused", err=True)


@main.group()
@credential_options
@click.pass_context
def schedule(ctx: click.Context, url: str | None, token: str | None, cloud: str | None) -> None:
    """Backup schedules with retention (docs/schedules.md)."""
    ctx.obj = Credentials(url, token, cloud)


@schedule.command("create")
@click.option("--volume", "volume_ids", multiple=True, help="A volume (repeat for several).")
@click.option("--metadata-key", default=None,
              help="Every volume carrying this metadata key (KEY or KEY=VALUE).")
@click.option("--cron", default=None, help="When, as a cron expression ('30 2 * * *').")
@click.option("--interval", type=int, default=None, help="Or every this many seconds (>= 60).")
@click.option("--timezone", default=None, help="Zone of the cron and of retention (UTC).")
@click.option("--full-every", type=int, default=None,
              help="A full backup every N (0: first full, then incremental; 1: always full).")
@click.option("--container", default=None)
@click.option("--name", default=None)
@click.option("--description", default=None)
@keep_options
@pass_client
def schedule_create(client: Client, volume_ids: tuple[str, ...], metadata_key: str | None,
                    cron: str | None, interval: int | None, timezone: str | None,
                    full_every: int | None, container: str | None, name: str | None,
                    description: str | None, **keeps: int | None) -> None:
    body: dict[str, Any] = {
        "volume_ids": list(volume_ids) or None, "volume_metadata_key": metadata_key,
        "cron": cron, "interval_seconds": interval, "timezone": timezone,
        "full_every": full_every, "container": container, "name": name,
        "description": description, **keeps,
    }
    body = {k: v for k, v in body.items() if v is not None}
    made = client.call("POST", "/os-backup-schedules", json={"backup_schedule": body})
    click.echo(made["backup_schedule"]["id"])


@schedule.command("list")
@pass_client
def schedule_list(client: Client) -> None:
    for s in client.call("GET", "/os-backup-schedules")["backup_schedules"]:
        when = s["cron"] or f"every {s['interval_seconds']}s"
        click.echo(f"{s['id']}  {s['name'] or '':<16} {when:<16} next {s['next_run_at'][:19]}"
                   f"  last {s['last_outcome'] or '-'}")


@schedule.command("show")
@click.argument("schedule_id")
@pass_client
def schedule_show(client: Client, schedule_id: str) -> None:
    click.echo(json.dumps(
        client.call("GET", f"/os-backup-schedules/{schedule_id}")["backup_schedule"], indent=2))


@schedule.command("delete")
@click.argument("schedule_id")
@pass_client
def schedule_delete(client: Client, schedule_id: str) -> None:
    """Stop a schedule; the backups it made stay."""
    client.call("DELETE", f"/os-backup-schedules/{schedule_id}")


@main.command("verify-container")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="The server's TOML configuration (for the store and the key).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--container", default=None, help="Container to check (default: the default).")
def verify_container(config_file: str | None, data_dir: str | None,
                     container: str | None) -> None:
    """Check every block every backup of a container references, straight from the store.

    Exits 1 and names each missing or corrupt object if anything is wrong."""
    from blockvault.config import load_settings
    from blockvault.engine import EngineError
    from blockvault.server import make_engine
    from blockvault.store import StoreError
    from blockvault.store.factory import make_backend

    settings = load_settings(config_file, data_dir=data_dir)
    container = container or settings.default_container
    engine = make_engine(settings, make_backend(settings))
    try:
        report = engine.verify(container=container)
    except (EngineError, StoreError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"container {container}: {report.checked_blocks} blocks checked")
    for name in report.missing:
        click.echo(f"missing: {name}")
    for name in report.corrupt:
        click.echo(f"corrupt: {name}")
    if not report.ok:
        raise SystemExit(1)


# -- API keys (against the service's database, as the operator) -------------------------------


def _server_options(f: Any) -> Any:
    f = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="The server's data dir (for its SQLite database).")(f)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        default=None, help="The server's TOML configuration (database_url, "
                        "data_dir).")(f)


def _key_db(config_file: str | None, data_dir: str | None) -> Any:
    from blockvault.config import load_settings
    from blockvault.db import Database

    try:
        settings = load_settings(config_file, data_dir=data_dir)
        if not settings.database_url:  # SQLite lives in data_dir
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.db_url)
        # the table may not exist yet if no server of this version has started
        db.upgrade()
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    return settings, db


# -- volume update-host (against the service's database, as the operator) ---------------


@volume.command("update-host")
@_server_options
@click.option("--current-host", required=True, metavar="HOST@BACKEND",
              help="Where the volumes are now (as os-vol-host-attr:host, without #POOL).")
@click.option("--new-host", required=True, metavar="HOST@BACKEND",
              help="Where they go: a backend of this configuration, or one a worker "
                   "announces.")
def volume_update_host(config_file: str | None, data_dir: str | None, current_host: str,
                       new_host: str) -> None:
    """Move every volume of --current-host to --new-host, and its unfinished jobs with
    them (cinder-manage volume update_host): after a host's rename, or a backend's.

    Works on the service's database directly: run it as the operator, with the
    --config/--data-dir the service runs with."""
    from blockvault.service.rehoming import UpdateHostError, update_host
    from blockvault.volume.backends import Backends, resolve_host_name

    settings, db = _key_db(config_file, data_dir)
    try:
        # this configuration's backends, named as its service names them (the host_name
        # kept in data_dir is read, never written, by an admin command)
        backends = Backends.from_config(
            settings.backends, data_dir=settings.data_dir,
            host_name=resolve_host_name(settings.host_name, settings.data_dir, persist=False))
        moved = update_host(db, backends, current_host, new_host)
    except (UpdateHostError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        db.dispose()
    click.echo(f"moved {moved.volumes} volume(s) and {moved.jobs} unfinished job(s) from "
               f"{current_host} to {new_host}")


def _utc(value: Any) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"


@main.group()
def apikey() -> None:
    """API keys for auth_strategy = apikey (create, list, revoke).

    These commands work on the service's database directly: run them as the operator,
    with the --config/--data-dir the server runs with."""


@apikey.command("create")
@_server_options
@click.option("--project", required=True, help="Project the key acts in.")
@click.option("--user", required=True, help="User id recorded for what the key does.")
@click.option("--role", "roles", multiple=True, required=True,
              help="Role (reader, member, admin or any a policy names); repeatable.")
@click.option("--expires", default=None,
              help="When the key stops working: 2027-01-01T00:00Z, or a duration (30d, 12h).")
def apikey_create(config_file: str | None, data_dir: str | None, project: str, user: str,
                  roles: tuple[str, ...], expires: str | None) -> None:
    """Create a key and print it, alone, on standard output (it is shown only this once)."""
    import re

    from blockvault.service import apikeys

    settings, db = _key_db(config_file, data_dir)
    try:
        if not re.fullmatch(settings.project_id_regex, project):
            raise ValueError(f"project {project!r} does not match project_id_regex, so no "
                             "request URL could name it")
        expires_at = apikeys.parse_expiry(expires) if expires else None
        key_id, key = apikeys.create(db, project_id=project, user_id=user, roles=list(roles),
                                     expires_at=expires_at)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        db.dispose()
    click.echo(f"created API key {key_id} for user {user} in project {project} "
               f"(roles {', '.join(roles)}; expires {_utc(expires_at)})", err=True)
    if settings.auth_strategy != "apikey":
        click.echo(f"note: the service runs with auth_strategy = {settings.auth_strategy}; "
                   "keys are honoured only with auth_strategy = apikey", err=True)
    click.echo(key)


@apikey.command("list")
@_server_options
@click.option("--project", default=None, help="Only this project's keys.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def apikey_list(config_file: str | None, data_dir: str | None, project: str | None,
                as_json: bool) -> None:
    """List keys (ids and who they speak for; secrets are never stored, so never shown)."""
    from blockvault.db.models import utcnow
    from blockvault.service import apikeys

    _, db = _key_db(config_file, data_dir)
    try:
        keys = apikeys.list_keys(db, project)
    finally:
        db.dispose()
    now = utcnow()
    rows = [{"id": k.id, "project_id": k.project_id, "user_id": k.user_id,
             "roles": list(k.roles), "created_at": _utc(k.created_at),
             "expires_at": _utc(k.expires_at) if k.expires_at else None,
             "revoked_at": _utc(k.revoked_at) if k.revoked_at else None,
             "state": k.state(now)} for k in keys]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['id']}  {r['state']:<8} {r['project_id']:<20} {r['user_id']:<16} "
                   f"{','.join(r['roles']):<16} created {r['created_at']}  "
                   f"expires {r['expires_at'] or '-'}")


@apikey.command("revoke")
@_server_options
@click.argument("key_id")
def apikey_revoke(config_file: str | None, data_dir: str | None, key_id: str) -> None:
    """Revoke a key: every request with it is refused from now on, in every process."""
    from blockvault.service import apikeys

    key_id = apikeys.key_id_of(key_id)
    _, db = _key_db(config_file, data_dir)
    try:
        outcome = apikeys.revoke(db, key_id)
    finally:
        db.dispose()
    if outcome == "unknown":
        raise click.ClickException(f"no API key {key_id}")
    click.echo(f"API key {key_id}: {outcome}", err=True)


# -- disaster recovery ----------------------------------------------------------------------


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="The server's TOML configuration (for the store and the key).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--container", default=None, help="Container to scan (default: the default).")
@credential_options
@click.option("--dry-run", is_flag=True, help="Only list the backups found.")
def recover(config_file: str | None, data_dir: str | None, container: str | None,
            url: str | None, token: str | None, cloud: str | None, dry_run: bool) -> None:
    """Re-import every backup recorded in a container into a running service.

    For a deployment that lost its database: each backup's record in the object store is
    imported through the API's import_record, as an admin; backups already known are kept.
    """
    import base64

    from blockvault.config import load_settings
    from blockvault.engine import EngineError
    from blockvault.server import make_engine
    from blockvault.store import StoreError
    from blockvault.store.factory import backup_service_name, make_backend

    settings = load_settings(config_file, data_dir=data_dir)
    container = container or settings.default_container
    backend = make_backend(settings)
    engine = make_engine(settings, backend)
    # an admin's credentials (import_record is admin-only), checked before any work
    client = None if dry_run else Credentials(url, token, cloud).client()
    service = backup_service_name(backend.kind)
    imported = skipped = 0
    try:
        names = sorted(backend.open(container, create=False).list("records/"))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    for name in names:
        backup_id = name[len("records/"):]
        try:
            record = engine.read_record(container=container, backup_id=backup_id)
        except (EngineError, StoreError) as exc:
            click.echo(f"{backup_id}: unreadable record: {exc}", err=True)
            continue
        if client is None:
            click.echo(f"{backup_id}  {record.get('display_name') or ''}")
            continue
        backup_url = base64.b64encode(json.dumps(record).encode()).decode("ascii")
        resp = client.http.post(f"{client.base}/backups/import_record", json={
            "backup-record": {"backup_service": service, "backup_url": backup_url}})
        if resp.status_code == 201:
            imported += 1
            click.echo(f"{backup_id}: imported")
        else:
            skipped += 1
            click.echo(f"{backup_id}: skipped ({resp.status_code} {resp.text.strip()})", err=True)
    if client is not None:
        click.echo(f"{imported} imported, {skipped} skipped", err=True)


@main.command("import-cinder")
@click.argument("container", required=False)
@click.option("--posix-path", type=click.Path(file_okay=False, exists=True), default=None,
              help="Cinder's backup_posix_path: import from every container under it "
                   "(Cinder's default ab/cd/<id> ones too), read directly.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="The server's TOML configuration: CONTAINER is read from its "
                   "[cinder_store], else its store.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--backup-service", default=None,
              help="Cinder driver to name in the records (default: the one that writes "
                   "the store's layout, e.g. cinder.backup.drivers.posix.PosixBackupDriver).")
@credential_options
@click.option("--dry-run", is_flag=True, help="Only list the backups found, in chain order.")
def import_cinder(container: str | None, posix_path: str | None, config_file: str | None,
                  data_dir: str | None, backup_service: str | None, url: str | None,
                  token: str | None, cloud: str | None, dry_run: bool) -> None:
    """Import every backup Cinder wrote in CONTAINER (or under --posix-path) into the
    caller's project, found from the backups' _metadata objects alone.

    Parents are imported before their incrementals, each through the API's import_record
    (an admin's call) with the record Cinder's export would give; the data stays where
    Cinder wrote it. Reports what was imported and what could not be, and why (exit 1 if
    anything could not be). docs/migration.md walks through a migration.
    """
    from blockvault.engine import EngineError
    from blockvault.engine import cinder as cinder_format
    from blockvault.service.cinder_records import driver_for_store, record_from_metadata
    from blockvault.store import StoreError

    if (container is None) == (posix_path is None):
        raise click.UsageError("give a CONTAINER or --posix-path (not both)")
    problems: list[str] = []

    def problem(name: str, why: str) -> None:
        problems.append(f"{name}: not a readable backup: {why}")

    try:
        if posix_path is not None:
            kind = "local"
            found = cinder_format.discover(cinder_format.posix_tree(posix_path), nested=True,
                                           on_problem=problem)
        else:
            from blockvault.config import load_settings
            from blockvault.store.factory import make_backend, make_cinder_backend

            settings = load_settings(config_file, data_dir=data_dir)
            backend = make_cinder_backend(settings) or make_backend(settings)
            kind = backend.kind
            root = getattr(getattr(backend, "inner", backend), "root", None)
            if kind == "local" and root is not None:
                # a local store is Cinder's backup_posix_path: CONTAINER is a directory
                found = [b for b in cinder_format.discover(
                    cinder_format.posix_tree(root), nested=True, on_problem=problem)
                    if b.directory == container.strip("/") + "/"]
                problems = [p for p in problems if p.startswith(container.strip("/") + "/")]
            else:
                found = cinder_format.discover(backend.open(container, create=False),
                                               on_problem=problem)
    except (StoreError, EngineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    service = backup_service or driver_for_store(kind)
    if dry_run:
        for b in found:
            click.echo(f"{b.id}  {b.container}  parent={b.parent_id or '-'}  "
                       f"{len(b.objects)} objects  {b.name or ''}")
        for line in problems:
            click.echo(line, err=True)
        return
    client = Credentials(url, token, cloud).client()
    imported: set[str] = set()
    failed = len(problems)
    for line in problems:
        click.echo(line, err=True)
    for b in found:
        why = None
        if b.parent_id and b.parent_id not in imported:
            why = f"its parent backup {b.parent_id} was not imported"
        else:
            resp = client.http.post(f"{client.base}/backups/import_record", json={
                "backup-record": record_from_metadata(b, service)})
            if resp.status_code != 201:
                try:
                    why = next(iter(resp.json().values()))["message"]
                except (ValueError, StopIteration, KeyError, TypeError, AttributeError):
                    why = f"{resp.status_code} {resp.text.strip()}"
            else:
                item = _wait_import(client, b.id)
                if item["status"] != "available":
                    why = item.get("fail_reason") or f"status {item['status']}"
        if why is None:
            imported.add(b.id)
            click.echo(f"{b.id}: imported ({b.container}, {b.name or 'unnamed'})")
        else:
            failed += 1
            click.echo(f"{b.id}: not imported: {why}", err=True)
    click.echo(f"{len(imported)} imported, {failed} not imported", err=True)
    if failed:
        sys.exit(1)


def _wait_import(client: Client, backup_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        item = client.call("GET", f"/backups/{backup_id}")["backup"]
        if item["status"] != "creating" or time.monotonic() > deadline:
            return item
        time.sleep(0.2)


main.add_command(__import__("blockvault.policy_cli").policy_cli.policy_command)

if __name__ == "__main__":  # pragma: no cover
    main()
