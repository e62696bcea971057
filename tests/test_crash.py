"""The crash run as a test: a real server is killed with SIGKILL twenty times at random
points of backups, incrementals, restores and deletes. After each restart every backup and
volume leaves its transitional status within the documented bound (docs/configuration.md,
"Jobs after a crash"), no backup that was available is lost, and every available backup
restores byte-exact.

Volumes are 1 GiB but written only in their first few MiB (random data), so that a digest
of that region plus a check that the rest reads as zeros (through SEEK_DATA, without
reading the holes) is the sha256 of exactly what was uploaded.

Reproduce a failure with ``BLOCKVAULT_CRASH_SEED=<seed printed in the failure>``.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from tests.server import Server

MiB = 1024 * 1024
REGION = 6 * MiB
ROUNDS = 20
#: seconds after a restart by which nothing is transitional any more: a restarted
#: process takes its own jobs back at once, so this is the time to run them again
BOUND = 60.0
BUDGET = 180.0
BACKUP_TRANSITIONAL = {"creating", "restoring", "deleting"}
VOLUME_TRANSITIONAL = {"creating", "backing-up", "restoring-backup", "deleting", "uploading",
                       "downloading"}


def region_digest(path: Path) -> str:
    """sha256 of the first REGION bytes; asserts every byte after them is zero."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(REGION)).hexdigest()
        fd, size, off = f.fileno(), os.fstat(f.fileno()).st_size, REGION
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole up to the end
                break
            end = os.lseek(fd, data, os.SEEK_HOLE)
            while data < end:
                chunk = os.pread(fd, min(4 * MiB, end - data), data)
                assert chunk.count(0) == len(chunk), f"{path} has data at {data}"
                data += len(chunk)
            off = end
    return digest


class Run:
    def __init__(self, srv: Server, rng: random.Random) -> None:
        self.srv, self.rng = srv, rng
        self.api = srv.client("alice", "crash")
        self.admin = srv.client("admin", "admin")
        self.expected: dict[str, str] = {}  # backup -> digest of its volume at backup time
        self.targets: dict[str, str] = {}  # restore target volume -> expected digest
        self.alive: set[str] = set()  # backups available after the last settle
        self.deleting: set[str] = set()
        self.sources: list[str] = []

    def path(self, volume_id: str) -> Path:
        return self.srv.data_dir / "volumes" / f"{volume_id}.raw"

    def setup(self) -> None:
        quota = {"volumes": 500, "gigabytes": 5000, "backups": 500, "backup_gigabytes": 5000}
        r = self.admin.put("/os-quota-sets/crash", {"quota_set": quota})
        assert r.status_code == 200, r.text
        for _ in range(3):
            vol = self.api.create_volume(1)
            self.api.write(vol, 0, os.urandom(MiB))
            self.sources.append(vol)

    # -- the operations a round starts ----------------------------------------------------

    def backups(self) -> dict[str, dict]:
        r = self.api.get("/backups/detail")
        assert r.status_code == 200, r.text
        return {b["id"]: b for b in r.json()["backups"]}

    def volumes(self) -> dict[str, dict]:
        r = self.api.get("/volumes/detail")
        assert r.status_code == 200, r.text
        return {v["id"]: v for v in r.json()["volumes"]}

    def start_backup(self, vol: str, incremental: bool) -> None:
        for _ in range(self.rng.randint(1, 3)):
            n = self.rng.choice((4096, 65536, 300_000, MiB))
            off = self.rng.randrange(0, REGION - n)
            self.api.write(vol, off, os.urandom(n))
        digest = region_digest(self.path(vol))
        body = {"volume_id": vol, "incremental": incremental}
        r = self.api.post("/backups", {"backup": body})
        if r.status_code == 400 and incremental:  # no parent yet
            r = self.api.post("/backups", {"backup": {"volume_id": vol}})
        assert r.status_code == 202, r.text
        self.expected[r.json()["backup"]["id"]] = digest

    def start_restore(self, backup: str) -> None:
        r = self.api.post(f"/backups/{backup}/restore", {"restore": {}})
        assert r.status_code == 202, r.text
        self.targets[r.json()["restore"]["volume_id"]] = self.expected[backup]

    def start_delete(self, backup: str) -> None:
        r = self.api.delete(f"/backups/{backup}")
        if r.status_code == 202:
            self.deleting.add(backup)
        else:  # an incremental depends on it
            assert r.status_code == 400 and "Incremental backups exist" in r.text, r.text

    def round(self) -> None:
        vols, backups = self.volumes(), self.backups()
        available = [b for b, v in backups.items() if v["status"] == "available"]
        for _ in range(self.rng.randint(1, 3)):
            op = self.rng.choice(("full", "incremental", "incremental", "restore", "delete"))
            free = [v for v in self.sources if vols[v]["status"] == "available"]
            if op in ("full", "incremental") and free:
                vol = self.rng.choice(free)
                vols[vol]["status"] = "backing-up"
                self.start_backup(vol, op == "incremental")
            elif op == "restore" and available:
                b = self.rng.choice(available)
                available.remove(b)
                self.start_restore(b)
            elif op == "delete" and available:
                b = self.rng.choice(available)
                available.remove(b)
                self.start_delete(b)

    # -- after a restart ------------------------------------------------------------------

    def settle(self) -> None:
        deadline = time.monotonic() + BOUND
        while True:
            backups, vols = self.backups(), self.volumes()
            stuck = [f"backup {b} {v['status']}" for b, v in backups.items()
                     if v["status"] in BACKUP_TRANSITIONAL]
            stuck += [f"volume {i} {v['status']}" for i, v in vols.items()
                      if v["status"] in VOLUME_TRANSITIONAL]
            if not stuck:
                break
            assert time.monotonic() < deadline, f"still transitional after {BOUND}s: {stuck}"
            time.sleep(0.2)
        lost = [b for b in self.alive - self.deleting if backups.get(b, {}).get("status")
                != "available"]
        assert not lost, f"available backups lost: {lost}"
        self.deleting = {b for b in self.deleting if b in backups}
        self.alive = {b for b, v in backups.items() if v["status"] == "available"}
        for v in backups.values():
            if v["status"] == "error":
                assert v["fail_reason"], v
        for vol in list(self.targets):
            status = vols[vol]["status"]
            if status == "available":
                assert region_digest(self.path(vol)) == self.targets[vol], f"restore {vol}"
            else:
                assert status == "error_restoring", vols[vol]
            del self.targets[vol]
            assert self.api.delete(f"/volumes/{vol}").status_code == 202

    def check_every_backup(self) -> None:
        for b in sorted(self.alive):
            r = self.api.post(f"/backups/{b}/restore", {"restore": {}})
            assert r.status_code == 202, r.text
            vol = r.json()["restore"]["volume_id"]
            self.api.wait("backup", b, {"available"})
            v = self.api.wait("volume", vol, {"available", "error_restoring"})
            assert v["status"] == "available", (b, v)
            assert region_digest(self.path(vol)) == self.expected[b], f"backup {b}"
            assert self.api.delete(f"/volumes/{vol}").status_code == 202


def test_kill_9_twenty_times(tmp_path):
    seed = int(os.environ.get("BLOCKVAULT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    # Garbage collection runs all along (a short grace period), so that kills also land
    # in collections and in backups racing them.
    env = {"BLOCKVAULT_GC_GRACE": "6", "BLOCKVAULT_STORE_LAG": "1",
           "BLOCKVAULT_MAINTENANCE_INTERVAL": "0.5"}
    srv = Server(tmp_path / "bv", env).start()
    started = time.monotonic()
    try:
        run = Run(srv, rng)
        run.setup()
        for i in range(ROUNDS):
            if time.monotonic() - started > BUDGET:
                break
            run.round()
            # mostly while the work runs (it is quick: small volumes), sometimes after
            time.sleep(rng.choice((0.0, rng.uniform(0, 0.15), rng.uniform(0, 0.6))))
            srv.stop(kill=True)
            srv.start()
            run.settle()
            if i % 5 == 4:  # a backup's bytes, now and then, not only at the end
                for b in rng.sample(sorted(run.alive), min(1, len(run.alive))):
                    run.alive, keep = {b}, run.alive
                    run.check_every_backup()
                    run.alive = keep
        run.check_every_backup()
        assert run.expected, "no backup was ever started"
    except AssertionError as exc:
        pytest.fail(f"crash run failed with BLOCKVAULT_CRASH_SEED={seed}: {exc}\n"
                    f"server log: {srv.log_path}")
    finally:
        srv.stop()
