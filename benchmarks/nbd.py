#!/usr/bin/env python3
"""A running VM's disk over NBD: a qcow2 exported by qemu-nbd with a dirty bitmap, 1% of it
rewritten; a full backup and an incremental from the bitmap, engine level and through the
API (manage the export, create backups), against borg on the same raw image in the same run.

    python benchmarks/nbd.py [--size 2G] [--workdir DIR] [--seed N] [--skip-api]

The image is benchmarks/run.py's (holes, zeros, text, binary, random) converted to qcow2,
and its 1% rewrite plan (scattered 64 KiB-1 MiB writes) is written through a writable
qemu-nbd export, so the image's persistent bitmap ``b0`` records exactly those writes. The
same writes go into the raw image borg reads. Every restore is checked byte-exact against
``qemu-img convert -O raw``. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py: the image, the rewrites, borg's flags)

MiB, GiB = 1024**2, 1024**3


class Export:
    def __init__(self, img: Path, sock: Path, bitmap: str | None = None,
                 readonly: bool = True) -> None:
        sock.unlink(missing_ok=True)
        args = ["qemu-nbd", "-f", "qcow2", "--socket", str(sock), "--persistent",
                "--shared", "8", "--cache", "none", "--aio", "native"]
        if readonly:
            args.append("--read-only")
        if bitmap:
            args += ["-B", bitmap]
        self.proc = subprocess.Popen([*args, str(img)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-nbd did not start: {self.proc.stderr.read()!r}")
            time.sleep(0.05)
        self.uri = f"nbd+unix:///?socket={sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def __enter__(self) -> Export:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def timed(fn):  # type: ignore[no-untyped-def]
    t0, c0 = time.perf_counter(), os.times()
    out = fn()
    c1 = os.times()
    return out, {"wall": time.perf_counter() - t0,
                 "cpu": (c1.user - c0.user) + (c1.system - c0.system)}


def raw_of(img: Path, out: Path) -> str:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(out)],
                   check=True)
    return bench.sha256_file(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--workdir", default="/var/tmp/blockvault-nbd-bench")
    ap.add_argument("--seed", type=int, default=20260401)
    ap.add_argument("--skip-api", action="store_true")
    ap.add_argument("--repeat", type=int, default=3,
                    help="incrementals per tool, each from the previous: the first is "
                         "recorded as 'inc', the median of the others as 'again'")
    a = ap.parse_args()
    import numpy

    bench.np = numpy
    from blockvault.engine import Engine
    from blockvault.store.local import LocalBackend
    from blockvault.volume.nbd import NbdSource, load_libnbd

    nbd = load_libnbd()
    size = bench.parse_size(a.size)
    wd = Path(a.workdir)
    shutil.rmtree(wd, ignore_errors=True)
    (wd / "logs").mkdir(parents=True)
    R: dict = {}

    def record(tool: str, step: str, m: dict) -> None:
        m["mbps"] = size / m["wall"] / 1e6
        R.setdefault(tool, {})[step] = m
        bench.log(f"  {tool:10s} {step:6s} {m['wall']:7.2f}s {m['mbps']:8.0f} MB/s  "
                  f"cpu {m['cpu']:6.2f}s"
                  + (f"  read {m['read'] / MiB:8.1f} MiB" if "read" in m else "")
                  + (f"  stored {m['stored'] / MiB:7.1f} MiB" if "stored" in m else "")
                  + (f"  (service {m['service']:.3f}s)" if "service" in m else "")
                  + (f"  (available after {m['available']:.3f}s)" if "available" in m else ""))

    content = bench.Content(a.seed)
    raw, img = wd / "image.raw", wd / "disk.qcow2"
    bench.log(f"building the {size / GiB:g} GiB image, converting it to qcow2 with bitmap b0")
    bench.build_image(raw, size, a.seed, content)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)],
                   check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    plan = bench.rewrite_plan(size, a.seed)
    rewritten = sum(n for _, n, _ in plan)
    sock = wd / "vm.sock"

    # -- borg on the raw image (its flags as in benchmarks/run.py) --------------------------
    have_borg = shutil.which("borg") is not None
    borg_env = {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                "BORG_BASE_DIR": str(wd / "borg-home"), "BORG_REPO": str(wd / "borg" / "repo")}
    borg = ["borg", "create", "--chunker-params", "fixed,4194304", "--sparse", "-C", "zstd,3"]
    if have_borg:
        (wd / "borg").mkdir()
        bench.run_child(["borg", "init", "-e", "none"], env=borg_env, logf=wd / "logs/borg.log")
        bench.drop_cache([raw])
        m = bench.run_child([*borg, "::full", "image.raw"], env=borg_env, cwd=wd,
                            logf=wd / "logs/borg.log")
        m["stored"] = bench.dir_bytes(wd / "borg" / "repo")
        record("borg", "full", m)

    # -- blockvault engine: full backup of the export -----------------------------------------
    eng = Engine(LocalBackend(wd / "store"), wd / "cache")
    with Export(img, sock, "b0") as ex:
        src = NbdSource(ex.uri, "b0", trust_bitmap=False)
        res, m = timed(lambda: eng.backup(container="bench", backup_id="full", source=src,
                                          size=size))
        m.update(read=src.bytes_read, stored=res.stored_bytes)
        record("bv-nbd", "full", m)

    # -- API: manage the export, full backup ------------------------------------------------
    api = None if a.skip_api else Api(wd, size)
    try:
        if api is not None:
            with Export(img, sock, "b0") as ex:
                api.manage(ex.uri)
                record("bv-api", "full", api.backup(incremental=False))

        # -- 1% rewritten through a writable export (the bitmap records it) ----------------
        bench.log(f"rewriting {rewritten / MiB:.1f} MiB in {len(plan)} scattered writes")
        with Export(img, sock, readonly=False) as ex:
            h = nbd.NBD()
            h.connect_uri(ex.uri)
            fd = os.open(raw, os.O_WRONLY)
            for i, (off, n, kind) in enumerate(plan):
                data = bench.rewrite_data(content, a.seed, i, n, kind)
                h.pwrite(data, off)
                os.pwrite(fd, data, off)
            h.flush()
            h.shutdown()
            os.fsync(fd)
            os.close(fd)
            del h

        # The bitmap is never cleared, so every incremental of the run reads the same 1%.
        runs: dict[str, list[dict]] = {}
        for i in range(a.repeat):
            if have_borg:
                bench.drop_cache([raw])
                before = bench.dir_bytes(wd / "borg" / "repo")
                m = bench.run_child([*borg, f"::inc{i}", "image.raw"], env=borg_env, cwd=wd,
                                    logf=wd / "logs/borg.log")
                m["stored"] = bench.dir_bytes(wd / "borg" / "repo") - before
                runs.setdefault("borg", []).append(m)
            with Export(img, sock, "b0") as ex:
                src = NbdSource(ex.uri, "b0", trust_bitmap=True)
                res, m = timed(partial(
                    eng.backup, container="bench", backup_id=f"inc{i}", source=src,
                    size=size, parent_id=f"inc{i - 1}" if i else "full"))
                m.update(read=src.bytes_read, stored=res.stored_bytes)
                runs.setdefault("bv-nbd", []).append(m)
                if api is not None:
                    runs.setdefault("bv-api", []).append(api.backup(incremental=True))
        for tool, ms in runs.items():
            record(tool, "inc", ms[0])  # the one that stores the rewritten 1%
            if len(ms) > 1:  # the same bitmap again: nothing new to store, same reads
                record(tool, "again", sorted(ms[1:], key=lambda m: m["wall"])[len(ms) // 2 - 1])
    finally:
        if api is not None:
            api.stop()

    # -- byte-exact -------------------------------------------------------------------------
    want = raw_of(img, wd / "converted.raw")
    (wd / "converted.raw").unlink()
    checks = {"raw image == qcow2": bench.sha256_file(raw) == want}
    out = wd / "restored.raw"
    out.touch()
    eng.restore(container="bench", backup_id=f"inc{a.repeat - 1}", target=out,
                target_is_new=True)
    checks["engine restore of inc"] = bench.sha256_file(out, size) == want
    out.unlink()
    for k, v in checks.items():
        bench.log(f"  byte-exact {k}: {'yes' if v else 'NO'}")

    print("\n| tool | step | wall s | MB/s (logical) | CPU s | read from source MiB | "
          "stored MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for tool, steps in R.items():
        for step, m in steps.items():
            rd = f"{m['read'] / MiB:.1f}" if "read" in m else "-"
            st = f"{m['stored'] / MiB:.1f}" if "stored" in m else "-"
            print(f"| {tool} | {step} | {m['wall']:.2f} | {m['mbps']:.0f} | {m['cpu']:.2f} | "
                  f"{rd} | {st} |")
    if have_borg:
        for tool in ("bv-nbd", "bv-api"):
            if "inc" in R.get(tool, {}):
                print(f"\n{tool} incremental vs borg's: "
                      f"{R['borg']['inc']['wall'] / R[tool]['inc']['wall']:.1f}x faster")
        if "available" in R.get("bv-api", {}).get("inc", {}):
            print(f"bv-api incremental until available (no poll) vs borg's: "
                  f"{R['borg']['inc']['wall'] / R['bv-api']['inc']['available']:.1f}x faster")
    print(f"\nrewritten: {rewritten / MiB:.1f} MiB ({rewritten / size:.2%}) in {len(plan)} writes")
    (wd / "results.json").write_text(json.dumps({"results": R, "checks": checks,
                                                 "rewritten": rewritten}, indent=2))
    if not all(checks.values()):
        sys.exit("a restore was not byte-exact")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants: ``serve`` runs its
    jobs in a child ``blockvault worker`` (995a2a3), whose time is not the parent's."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(tree_cpu(int(child)) for child in f.read().split())
    except FileNotFoundError:  # it ended meanwhile
        pass
    return total


class Api:
    """blockvault serve with an ``nbd`` backend, driven over HTTP (noauth admin)."""

    def __init__(self, wd: Path, size: int) -> None:
        import socket

        import httpx

        self.size = size
        d = wd / "service"
        d.mkdir()
        cfg = d / "blockvault.toml"
        cfg.write_text('host_name = "bench"\n[backends.vms]\ndriver = "nbd"\n')
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO), "BLOCKVAULT_CONFIG": str(cfg),
               "BLOCKVAULT_QUOTA_GIGABYTES": "100000",
               "BLOCKVAULT_QUOTA_BACKUP_GIGABYTES": "100000"}
        self.logf = open(wd / "logs" / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blockvault.cli", "serve", "--port", str(port),
             "--data-dir", str(d / "data")], env=env, stdout=self.logf,
            stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}/v3/bench"
        self.http = httpx.Client(headers={"X-Auth-Token": "admin:bench",
                                          "OpenStack-API-Version": "volume 3.8"}, timeout=120)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("blockvault serve exited; see logs/server.log")
            try:
                if self.http.get(f"http://127.0.0.1:{port}/").status_code == 300:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("blockvault serve did not start")
            time.sleep(0.1)
        self.volume: str | None = None

    def manage(self, uri: str) -> None:
        r = self.http.post(f"{self.base}/manageable_volumes", json={"volume": {
            "host": "bench@vms#vms", "ref": {"source-name": uri, "bitmap": "b0"},
            "name": "vm1"}})
        if r.status_code != 202:
            raise RuntimeError(f"manage: {r.status_code} {r.text}")
        self.volume = r.json()["volume"]["id"]
        self.wait("volume", self.volume)

    def wait(self, kind: str, item: str) -> dict:
        # Polls back off from 5 ms to 50 ms: a short job's end is seen soon after it
        # happens, and a long one is not slowed by a stream of requests to the same server.
        pause = 0.005
        while True:
            b = self.http.get(f"{self.base}/{kind}s/{item}").json()[kind]
            if b["status"] in ("available", "error"):
                if b["status"] == "error":
                    raise RuntimeError(f"{kind} {item}: {b}")
                return b
            time.sleep(pause)
            pause = min(0.05, pause * 1.5)

    def backup(self, incremental: bool) -> dict:
        asked = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # the rows' clock
        t0 = time.perf_counter()
        r = self.http.post(f"{self.base}/backups", json={"backup": {
            "volume_id": self.volume, "incremental": incremental}})
        if r.status_code != 202:
            raise RuntimeError(f"backup: {r.status_code} {r.text}")
        b = self.wait("backup", r.json()["backup"]["id"])
        wall = time.perf_counter() - t0
        cpu = tree_cpu(self.proc.pid)
        out = {"wall": wall, "cpu": cpu - getattr(self, "_cpu", 0.0)}  # service's CPU
        # What the service itself took, by its own clock: from the row the create inserted
        # to the outcome it wrote (the backup's updated_at); and ``available``, from just
        # before the POST to that outcome (the service runs on this machine's clock): the
        # backup as the API finished it, without the client's poll, which backs off to
        # 50 ms and so adds 0-50 ms to ``wall`` (real clients poll every 1-5 s).
        stamps = [b.get(k) for k in ("created_at", "updated_at")]
        if all(stamps):
            created, updated = (dt.datetime.fromisoformat(s) for s in stamps)
            out["service"] = (updated - created).total_seconds()
            out["available"] = (updated - asked).total_seconds()
        self._cpu = cpu
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.logf.close()


if __name__ == "__main__":
    main()
