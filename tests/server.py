"""A real blockvault server in a child process on a free port, and a small HTTP client."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

GiB = 1024**3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``blockvault serve`` as a user runs it: a process, a port, a data dir."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.env = dict(env or {})
        #: a command the server runs under (e.g. ``unshare`` for a private mount)
        self.prefix = list(prefix or [])
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "server.log"

    @property
    def default_container(self) -> str:
        return self.env.get("BLOCKVAULT_DEFAULT_CONTAINER", "volumebackups")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env.setdefault("BLOCKVAULT_JOB_LEASE_SECONDS", "6")
        # stop() allows 20 s before SIGKILL: running jobs are handed back well before
        env.setdefault("BLOCKVAULT_SHUTDOWN_TIMEOUT", "5")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "blockvault.cli",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/", timeout=1).status_code == 300:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start in 30 s")

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(
        self,
        user: str = "alice",
        project: str = "proja",
        api: str = "v3",
        version: str | None = None,
    ) -> Api:
        return Api(self.url, user, project, api, version, self.data_dir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Api:
    def __init__(
        self,
        url: str,
        user: str,
        project: str,
        api: str = "v3",
        version: str | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.url = url
        self.data_dir = data_dir
        self.project = project
        self.base = f"{url}/{api}/{project}"
        headers = {"X-Auth-Token": f"{user}:{project}"}
        if version:
            headers["OpenStack-API-Version"] = f"volume {version}"
        self.http = httpx.Client(headers=headers, timeout=60)

    def req(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.http.request(method, self.base + path, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.req("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        if body is not None:
            kw["json"] = body
        return self.req("POST", path, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        if body is not None:
            kw["json"] = body
        return self.req("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.req("DELETE", path, **kw)

    # -- helpers -----------------------------------------------------------------------

    def create_volume(self, size: int = 1, **extra: Any) -> str:
        r = self.post("/volumes", {"volume": {"size": size, **extra}})
        assert r.status_code == 202, r.text
        return r.json()["volume"]["id"]

    def write(self, volume_id: str, offset: int, data: bytes) -> None:
        r = self.put(
            f"/volumes/{volume_id}/data",
            params={"offset": offset},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 204, r.text

    def volume_sha256(self, volume_id: str) -> str:
        """sha256 of the volume's bytes, read from its file on this machine (fast), checked
        to be the same length as the volume the API reports."""
        size = self.get(f"/volumes/{volume_id}").json()["volume"]["size"] * GiB
        path = self.data_dir / "volumes" / f"{volume_id}.raw"
        assert path.stat().st_size == size
        return sha256_of_file(path)

    def volume_sha256_http(self, volume_id: str) -> str:
        """sha256 of the volume's bytes as ``GET .../data`` streams them."""
        h = hashlib.sha256()
        with self.http.stream("GET", f"{self.base}/volumes/{volume_id}/data") as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes(4 * 1024 * 1024):
                h.update(chunk)
        return h.hexdigest()

    def create_backup(self, volume_id: str, wait: bool = True, **extra: Any) -> str:
        r = self.post("/backups", {"backup": {"volume_id": volume_id, **extra}})
        assert r.status_code == 202, r.text
        backup_id = r.json()["backup"]["id"]
        if wait:
            b = self.wait("backup", backup_id, {"available", "error"})
            assert b["status"] == "available", b
        return backup_id

    def wait(self, kind: str, item_id: str, statuses: set[str], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            r = self.get(f"/{kind}s/{item_id}")
            if r.status_code == 404 and "deleted" in statuses:
                return {"status": "deleted"}
            assert r.status_code == 200, r.text
            item = r.json()[kind]
            if item["status"] in statuses:
                return item
            if time.monotonic() > deadline:
                raise AssertionError(f"{kind} {item_id} stuck in {item['status']}")
            time.sleep(0.1)

    def restore(self, backup_id: str, volume_id: str | None = None, wait: bool = True) -> str:
        body = {"volume_id": volume_id} if volume_id else {}
        r = self.post(f"/backups/{backup_id}/restore", {"restore": body})
        assert r.status_code == 202, r.text
        target = r.json()["restore"]["volume_id"]
        if wait:
            self.wait("backup", backup_id, {"available"})
            v = self.wait("volume", target, {"available", "error_restoring", "error"})
            assert v["status"] == "available", v
        return target


def verify_backup(api: Api, backup: str) -> dict:
    """Ask for a backup's verification and wait for its report (at most 60 s)."""
    assert api.post(f"/backups/{backup}/verify").status_code == 202
    deadline = time.monotonic() + 60
    while True:
        v = api.get(f"/backups/{backup}/verify").json()["verification"]
        if v["state"] in ("ok", "failed"):
            return v
        assert time.monotonic() < deadline, v
        time.sleep(0.1)


def sha256_of_file(path: Path, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    if size is not None:
        pad = size - path.stat().st_size
        while pad > 0:
            n = min(pad, 4 * 1024 * 1024)
            h.update(bytes(n))
            pad -= n
    return h.hexdigest()
