"""Randomized soak test of garbage collection against everything else at once.

Many concurrent backups, incrementals (with and without ``changed`` ranges), deletes,
imports (``clone_backup``), collections, restores and verifies on ONE container whose
listings lag (tests/faults.py), with paused, cancelled, killed (SIGKILLed child process)
and clock-skewed (child process whose ``time.time`` is hours off) workers, and writes that
stall before they start (a process paused between reading a manifest and writing its copy).
Grace period 0.8 s, listing lag 0.2 s: pauses and stalls of up to 2.5 grace periods outlast
every grace period. At the end
every backup that succeeded and was not deleted restores byte-exact, ``verify`` finds
nothing missing or corrupt, the container holds exactly the manifests of those backups,
and once everything is deleted and collected no pack is left.

Knobs (environment):

- ``BLOCKVAULT_SOAK_SEED``: seed of every random choice (default: random, printed).
  Each worker thread has its own generator, so a seed reproduces the mix of operations,
  data and fault timings; thread scheduling still varies, so not the exact interleaving.
- ``BLOCKVAULT_SOAK_SECONDS``: how long workers pick operations (default 45).

Any failure message starts with the seed and the command that reruns it; the full event
log of the run is written next to the test's temporary directory and named there.

What counts as a backup that succeeded ("live" unless deleted later):

- a ``backup``/``clone_backup`` call that returned, in this process or in a child process
  that printed DONE before it exited or was killed;
- a backup whose child was killed before it printed DONE is *never* live, whether or not
  its manifest made it to the store: the manifest is written before the backup's check
  against garbage collection (its commit point), so a kill can leave a manifest that was
  never vouched for. Such a leftover is the debris of a failed job: at the end it must
  restore byte-exact or fail with DataError (never yield wrong bytes); then it is discarded,
  as the service discards the backup of a failed job;
- an operation that raised leaves no manifest behind. Cancelled is expected when our
  callback cancelled; DataError is expected when the backup it reads from (a clone's
  source) was deleted; anything else is a finding and fails the test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest

from blockvault.engine import Cancelled, DataError, Engine, EngineConfig
from blockvault.engine.format import group_manifests
from blockvault.store import Backend, Container
from blockvault.store.local import LocalBackend
from tests.faults import LaggingBackend

KiB = 1024
MiB = 1024 * KiB
BLOCK = 32 * KiB  # the engine's default block size
LAG = 0.2  # listing lag of the store
GRACE = 0.8  # gc_grace; the engine requires GRACE >= 2 * LAG
CONTAINER = "soak"
REPO = Path(__file__).resolve().parents[1]


def _seconds() -> float:
    return float(os.environ.get("BLOCKVAULT_SOAK_SECONDS") or 45)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- the model ---------------------------------------------------------------------------


@dataclass
class Volume:
    idx: int
    path: Path
    size: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    seq: int = 0  # number of writes so far
    writes: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, offset, length)


@dataclass(frozen=True)
class Rec:
    """What a backup id holds: a frozen copy of ``volume`` after its ``seq``-th write."""

    volume: int
    seq: int
    sha: str
    size: int


class RepackLog(logging.Handler):
    """Counts the repacking rounds of this process's engines (its log), so the summary
    shows that repacking ran under the faults, and how often a version was found unsafe."""

    def __init__(self, model: Model) -> None:
        super().__init__(logging.INFO)
        self.model = model

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "packs copied" in msg:
            self.model.count("repack round condemned old packs")
        elif "removed uncommitted" in msg:
            self.model.count("repack version removed uncommitted")
        self.model.event(msg)


class Model:
    """What the engine must keep, lock-protected. ``live``: succeeded and not deleted."""

    def __init__(self, log_path: Path) -> None:
        self.lock = threading.Lock()
        self.recs: dict[str, Rec] = {}
        self.live: set[str] = set()
        self.deleted: set[str] = set()
        self.failed: dict[str, str] = {}  # id -> why (no manifest may remain)
        self.killed: set[str] = set()  # child killed before it reported success
        self.stats: Counter[str] = Counter()
        self.findings: list[str] = []
        self.notes: list[str] = []
        self._n = 0
        self._t0 = time.monotonic()
        self._log = open(log_path, "w", buffering=1)  # closed by close()
        self.log_path = log_path

    def close(self) -> None:
        self._log.close()

    def new_id(self, rec: Rec) -> str:
        with self.lock:
            self._n += 1
            bid = f"b{self._n:05d}"
            self.recs[bid] = rec
            return bid

    def event(self, msg: str) -> None:
        line = f"{time.monotonic() - self._t0:8.3f} {threading.current_thread().name}: {msg}"
        with self.lock:
            self._log.write(line + "\n")

    def count(self, what: str) -> None:
        with self.lock:
            self.stats[what] += 1

    def finding(self, msg: str) -> None:
        self.event("FINDING " + msg)
        with self.lock:
            self.findings.append(msg)

    def note(self, msg: str) -> None:
        self.event("note " + msg)
        with self.lock:
            self.notes.append(msg)

    def succeeded(self, bid: str) -> None:
        with self.lock:
            self.live.add(bid)

    def failed_with(self, bid: str, why: str) -> None:
        with self.lock:
            self.failed[bid] = why

    def is_live(self, bid: str) -> bool:
        with self.lock:
            return bid in self.live

    def pick_live(self, rnd: random.Random, volume: int | None = None) -> str | None:
        with self.lock:
            ids = sorted(b for b in self.live
                         if volume is None or self.recs[b].volume == volume)
        return rnd.choice(ids) if ids else None

    def take_for_delete(self, rnd: random.Random) -> str | None:
        with self.lock:
            ids = sorted(self.live)
            if not ids:
                return None
            bid = rnd.choice(ids)
            self.live.discard(bid)  # before the engine starts: a racing restore may fail
            self.deleted.add(bid)
            return bid


class Fault:
    """A ``cancelled`` callback: a paused process (blocks once, up to 2.5 grace periods,
    so some pauses outlast every grace period), a cancel, or a slow source."""

    def __init__(self, rnd: random.Random) -> None:
        r = rnd.random()
        self.mode = ("pause" if r < 0.25 else "cancel" if r < 0.35
                     else "slow" if r < 0.5 else "none")
        self.at = rnd.randint(1, 4)  # poll: the index sync, each 4 MiB read, the end
        self.pause = rnd.uniform(0, 2.5 * GRACE)
        self.slow = rnd.uniform(0.01, 0.12)
        self.calls = 0
        self.fired = False

    def __call__(self) -> bool:
        self.calls += 1
        if self.mode == "slow":
            time.sleep(self.slow)
        elif self.calls == self.at and self.mode in ("pause", "cancel"):
            self.fired = True
            if self.mode == "cancel":
                return True
            time.sleep(self.pause)
        return False

    def describe(self) -> str:
        if self.mode == "pause":
            return f"pause {self.pause:.2f}s at poll {self.at}"
        if self.mode == "cancel":
            return f"cancel at poll {self.at}"
        return self.mode if self.mode == "none" else f"slow {self.slow:.2f}s/poll"


class StallingBackend(Backend):
    """``inner`` whose writes sometimes stall before they start, as a process paused between
    deciding to write and writing would: a manifest put (of a backup or an import) up to
    2.5 grace periods, a pack upload up to one. The second engine's view of the store."""

    def __init__(self, inner: Backend, seed: str, model: Model) -> None:
        self.inner, self.kind, self.model = inner, inner.kind, model
        self.rnd = random.Random(seed)
        self.mu = threading.Lock()
        self.stalled = threading.local()  # .secs: longest stall of this thread's operation

    def _stall(self, name: str) -> None:
        with self.mu:
            r = self.rnd.random()
            if name.startswith("manifests/") and r < 0.15:
                secs = self.rnd.uniform(0, 2.5 * GRACE)
            elif name.startswith("packs/") and r < 0.03:
                secs = self.rnd.uniform(0, GRACE)
            else:
                return
        self.model.event(f"stall {secs:.2f}s before writing {name}")
        self.model.count("stalled " + name.split("/")[0])
        self.stalled.secs = max(secs, getattr(self.stalled, "secs", 0.0))
        time.sleep(secs)

    def open(self, container: str, create: bool = True) -> Container:
        c = self.inner.open(container, create)
        put, put_file = c.put, c.put_file

        def stalling_put(name: str, data: bytes | memoryview) -> None:
            self._stall(name)
            put(name, data)

        def stalling_put_file(name: str, f: BinaryIO, size: int) -> None:
            self._stall(name)
            put_file(name, f, size)

        c.put = stalling_put  # type: ignore[method-assign]
        c.put_file = stalling_put_file  # type: ignore[method-assign]
        return c

    def validate_container_name(self, container: str) -> str | None:
        return self.inner.validate_container_name(container)

    def close(self) -> None:
        self.inner.close()


# -- a child process: a killed worker, or a worker whose clock is hours off --------------

CHILD = r"""
import json, random, sys, time
from pathlib import Path
a = json.loads(sys.argv[1])
if a["skew"]:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + a["skew"]
    time.time_ns = lambda: _time_ns() + int(a["skew"] * 1e9)
from blockvault.engine import Engine, EngineConfig, EngineError
from blockvault.store import Backend, Container
from blockvault.store.local import LocalBackend
from tests.faults import LaggingBackend
eng = Engine(LaggingBackend(LocalBackend(Path(a["root"])), a["lag"]), Path(a["cache"]),
             EngineConfig(pack_size=a["pack_size"], workers=1, upload_concurrency=2,
                          gc_grace=a["grace"], store_lag=a["lag"]))
rnd = random.Random(a["seed"])
def slow():
    time.sleep(rnd.uniform(0, a["poll_sleep"]))
    return False
print("START", flush=True)
for step in a["steps"]:
    try:
        if step == "gc":
            eng.collect_garbage(container=a["container"])
        else:
            b = a["backup"]
            eng.backup(container=a["container"], backup_id=b["id"], source=Path(b["source"]),
                       size=b["size"], parent_id=b["parent"], changed=b["changed"],
                       cancelled=slow if a["poll_sleep"] else None, record={"id": b["id"]})
            print("DONE", flush=True)
    except EngineError as e:
        print("FAILED", step, type(e).__name__, str(e).replace("\n", " "), flush=True)
print("EXIT", flush=True)
"""


# -- the soak ----------------------------------------------------------------------------


class Soak:
    def __init__(self, tmp: Path, seed: int, seconds: float) -> None:
        self.tmp, self.seed, self.seconds = tmp, seed, seconds
        rnd = random.Random(f"{seed}-setup")
        self.root = tmp / "store"
        self.scratch = tmp / "scratch"
        self.scratch.mkdir()
        self.caches = [tmp / "cache-a", tmp / "cache-b"]
        self.backend = LaggingBackend(LocalBackend(self.root), LAG)  # one shared listing
        self.pack_sizes = [rnd.choice([256 * KiB, 512 * KiB, 1 * MiB]) for _ in self.caches]
        self.m = Model(tmp / "soak.log")
        self.repack_log = RepackLog(self.m)
        repack_logger = logging.getLogger("blockvault.engine.repack")
        repack_logger.setLevel(logging.INFO)
        repack_logger.addHandler(self.repack_log)
        self.stalling = StallingBackend(self.backend, f"{seed}-stall", self.m)
        backends = [self.backend, self.stalling]
        self.engines = [
            Engine(backend, cache, EngineConfig(
                pack_size=ps, workers=1, upload_concurrency=2, gc_grace=GRACE, store_lag=LAG))
            for backend, cache, ps in zip(backends, self.caches, self.pack_sizes, strict=True)]
        self.stop = threading.Event()
        self.threads = rnd.randint(4, 6)
        self.current: dict[str, tuple[str, float]] = {}
        self.children: dict[int, subprocess.Popen] = {}
        self.children_mu = threading.Lock()
        # Blocks shared by every volume: deduplication across backups and volumes is heavy.
        self.pool = [rnd.randbytes(64) * (BLOCK // 64) if i % 3 == 0 else rnd.randbytes(BLOCK)
                     for i in range(48)]
        self.volumes = []
        for i in range(rnd.randint(4, 6)):
            size = rnd.choice([1, 2, 3, 4, 6, 8]) * MiB
            if rnd.random() < 0.5:
                size += rnd.randrange(1, BLOCK)  # a partial last block
            path = tmp / f"vol{i}"
            with open(path, "wb") as f:
                f.truncate(size)
                for b in range(-(-size // BLOCK)):
                    r = rnd.random()
                    if r < 0.2:
                        continue  # a hole
                    f.seek(b * BLOCK)
                    data = rnd.choice(self.pool) if r < 0.8 else rnd.randbytes(BLOCK)
                    f.write(data[: size - b * BLOCK])
            self.volumes.append(Volume(i, path, size))

    # -- helpers -------------------------------------------------------------------------
    def engine(self, rnd: random.Random) -> Engine:
        return rnd.choice(self.engines)

    def freeze(self, vol: Volume) -> tuple[Path, int, str]:
        """A frozen copy of the volume to back up, its write count and its sha256."""
        snap = self.scratch / f"snap-{uuid.uuid4().hex}"
        with vol.lock:
            shutil.copyfile(vol.path, snap)
            seq = vol.seq
        return snap, seq, sha256(snap)

    def changed_since(self, vol: Volume, after: int, upto: int,
                      rnd: random.Random) -> list[tuple[int, int]]:
        with vol.lock:
            out = [(o, n) for s, o, n in vol.writes if after < s <= upto]
        if rnd.random() < 0.2:  # a superset of the real changes keeps the promise
            out.append((rnd.randrange(vol.size), rnd.randint(1, 300 * KiB)))
        rnd.shuffle(out)
        return out

    def restore_sha(self, eng: Engine, bid: str) -> str:
        out = self.scratch / f"restore-{uuid.uuid4().hex}"
        out.touch()
        try:
            eng.restore(container=CONTAINER, backup_id=bid, target=out, target_is_new=True)
            return sha256(out)
        finally:
            out.unlink(missing_ok=True)

    # -- operations ----------------------------------------------------------------------
    def op_write(self, rnd: random.Random) -> None:
        vol = rnd.choice(self.volumes)
        r = rnd.random()
        if r < 0.5:  # whole blocks from the shared pool
            off = rnd.randrange(-(-vol.size // BLOCK)) * BLOCK
            data = b"".join(rnd.choice(self.pool) for _ in range(rnd.randint(1, 16)))
        elif r < 0.85:  # new bytes anywhere
            off = rnd.randrange(vol.size)
            data = rnd.randbytes(rnd.randint(1, 256 * KiB))
        else:  # zeros (a discard)
            off = rnd.randrange(vol.size)
            data = bytes(rnd.randint(1, 512 * KiB))
        data = data[: vol.size - off]
        with vol.lock:
            with open(vol.path, "r+b") as f:
                f.seek(off)
                f.write(data)
            vol.seq += 1
            vol.writes.append((vol.seq, off, len(data)))
        self.m.count("write")

    def _plan_backup(self, rnd: random.Random, kind: str) -> dict:
        vol = rnd.choice(self.volumes)
        parent = changed = None
        if kind == "incremental":
            parent = self.m.pick_live(rnd, vol.idx)
        elif kind == "cross":  # a parent from any volume: only a dedup hint
            parent = self.m.pick_live(rnd)
        snap, seq, digest = self.freeze(vol)
        if parent is not None and rnd.random() < 0.6:
            prec = self.m.recs[parent]
            if prec.volume == vol.idx:
                changed = self.changed_since(vol, prec.seq, seq, rnd)
        bid = self.m.new_id(Rec(vol.idx, seq, digest, vol.size))
        return {"id": bid, "source": str(snap), "size": vol.size, "parent": parent,
                "changed": changed}

    def op_backup(self, rnd: random.Random, kind: str) -> None:
        eng = self.engine(rnd)
        b = self._plan_backup(rnd, kind)
        bid = b["id"]
        fault = Fault(rnd)
        what = (f"{kind} backup {bid} of vol{self.m.recs[bid].volume} parent={b['parent']} "
                f"changed={None if b['changed'] is None else len(b['changed'])} "
                f"engine={self.engines.index(eng)} fault={fault.describe()}")
        self.m.event("start " + what)
        try:
            eng.backup(container=CONTAINER, backup_id=bid, source=Path(b["source"]),
                       size=b["size"], parent_id=b["parent"], changed=b["changed"],
                       cancelled=fault, record={"id": bid})
        except Cancelled:
            self.m.failed_with(bid, "cancelled")
            if fault.mode == "cancel" and fault.fired:
                self.m.count("backup cancelled")
                self.m.event(f"cancelled {bid}")
            else:
                self.m.finding(f"{what}: Cancelled without a cancel\n{traceback.format_exc()}")
        except Exception:
            self.m.failed_with(bid, "error")
            self.m.finding(f"{what} failed:\n{traceback.format_exc()}")
        else:
            self.m.succeeded(bid)
            self.m.count(f"{kind} backup ok" + (" after pause" if fault.fired else ""))
            self.m.event(f"done {bid}")
        finally:
            Path(b["source"]).unlink(missing_ok=True)

    def op_delete(self, rnd: random.Random) -> None:
        bid = self.m.take_for_delete(rnd)
        if bid is None:
            return
        eng = self.engine(rnd)
        if rnd.random() < 0.3:
            self.m.event(f"discard {bid}")
            eng.discard(container=CONTAINER, backup_id=bid)  # no collection
        else:
            self.m.event(f"delete {bid}")
            eng.delete(container=CONTAINER, backup_id=bid)
        self.m.count("delete")

    def op_clone(self, rnd: random.Random) -> None:
        src = self.m.pick_live(rnd)
        if src is None:
            return
        tid = self.m.new_id(self.m.recs[src])
        self.m.event(f"clone {src} -> {tid}")
        stalling = self.stalling
        stalling.stalled.secs = 0.0
        try:
            eng = self.engine(rnd)
            eng.clone_backup(container=CONTAINER, source_id=src, target_id=tid)
            # As the service does: a finished import has its record (repacking rewrites
            # the manifests of finished backups only).
            eng.write_record(container=CONTAINER, backup_id=tid, record={"id": tid})
        except DataError as e:
            self.m.failed_with(tid, "clone refused")
            stalled = stalling.stalled.secs
            if self.m.is_live(src) and stalled >= 2 * GRACE - LAG:
                self.m.count("clone refused, stalled too long to tell")  # by design
            elif self.m.is_live(src):
                # Conservative, not unsafe: it saw a condemnation of packs its live source
                # uses (a collection that did not see the source yet). Reported, not failed.
                self.m.count("clone refused, source live")
                self.m.note(f"clone {src} -> {tid} refused while {src} was live "
                            f"(stalled {stalled:.2f}s): {e}")
            else:
                self.m.count("clone refused, source deleted")
                self.m.event(f"clone {tid} refused (source deleted): {e}")
        except Exception:
            self.m.failed_with(tid, "error")
            self.m.finding(f"clone {src} -> {tid} failed:\n{traceback.format_exc()}")
        else:
            self.m.succeeded(tid)
            self.m.count("clone ok")
            self.m.event(f"cloned {tid}")

    def op_gc(self, rnd: random.Random) -> None:
        done = self.engine(rnd).collect_garbage(container=CONTAINER)
        self.m.count(f"gc {'settled' if done else 'pending'}")

    def op_restore(self, rnd: random.Random) -> None:
        bid = self.m.pick_live(rnd)
        if bid is None:
            return
        want = self.m.recs[bid].sha
        try:
            got = self.restore_sha(self.engine(rnd), bid)
        except Exception:
            if self.m.is_live(bid):
                self.m.finding(f"restore of live backup {bid} failed:\n{traceback.format_exc()}")
            else:
                self.m.count("restore raced a delete")
            return
        if got != want:
            self.m.finding(f"restore of {bid} returned wrong bytes (sha {got}, want {want})")
        else:
            self.m.count("restore ok")

    def op_verify(self, rnd: random.Random) -> None:
        bid = self.m.pick_live(rnd)
        if bid is None:
            return
        rep = self.engine(rnd).verify(container=CONTAINER, backup_id=bid)
        if not rep.ok and self.m.is_live(bid):
            self.m.finding(f"verify of live backup {bid}: missing {rep.missing} "
                           f"corrupt {rep.corrupt}")
        self.m.count("verify ok" if rep.ok else "verify raced a delete")

    def op_child(self, rnd: random.Random, kind: str) -> None:
        """``kind`` "killed": a backup (or a collection) SIGKILLed at a random moment;
        "skewed": collect, back up, collect with time.time hours off."""
        steps = ["backup"]
        if kind == "killed" and rnd.random() < 0.3:
            steps = ["gc", "gc"]
        elif kind == "skewed":
            steps = ["gc", "backup", "gc"]
        b = None
        if "backup" in steps:
            b = self._plan_backup(rnd, rnd.choice(["full", "incremental", "incremental"]))
        cache = rnd.choice(self.caches + [self.scratch / f"cache-{uuid.uuid4().hex}"])
        skew = rnd.choice([-1, 1]) * rnd.uniform(1, 6) * 3600 if kind == "skewed" else 0
        args = {"root": str(self.root), "cache": str(cache), "lag": LAG, "grace": GRACE,
                "pack_size": rnd.choice([256 * KiB, 1 * MiB]), "container": CONTAINER,
                "seed": rnd.randrange(1 << 30), "skew": skew, "steps": steps, "backup": b,
                "poll_sleep": rnd.uniform(0.05, 0.3) if kind == "killed" else 0}
        kill_after = rnd.uniform(0, 1.0 if b else 0.3) if kind == "killed" else None
        what = (f"{kind} child {steps} {'' if b is None else b['id']} parent="
                f"{None if b is None else b['parent']} skew={skew / 3600:+.1f}h "
                f"kill_after={kill_after}")
        self.m.event("start " + what)
        out = self.scratch / f"child-{uuid.uuid4().hex}.out"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        try:
            with open(out, "w") as fo:
                p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)],
                                     cwd=REPO, env=env, stdout=fo, stderr=subprocess.STDOUT)
            with self.children_mu:
                self.children[p.pid] = p
            try:
                killed = False
                if kill_after is not None:
                    deadline = time.monotonic() + 60
                    while (p.poll() is None and time.monotonic() < deadline
                           and "START" not in out.read_text()):
                        time.sleep(0.02)
                    time.sleep(kill_after)
                    if p.poll() is None:
                        p.send_signal(signal.SIGKILL)
                        killed = True
                try:
                    p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    self.m.finding(f"{what}: child hung for 120 s:\n{out.read_text()}")
                    return
            finally:
                with self.children_mu:
                    self.children.pop(p.pid, None)
            text = out.read_text()
            lines = text.splitlines()
            if not killed and (p.returncode != 0 or "EXIT" not in lines):
                self.m.finding(f"{what}: child exited with {p.returncode}:\n{text}")
            for line in lines:
                if line.startswith("FAILED"):
                    parent_live = b is not None and b["parent"] and self.m.is_live(b["parent"])
                    self.m.finding(f"{what}: {line} (parent live: {parent_live})\n{text}")
            if b is not None:
                if "DONE" in lines:
                    self.m.succeeded(b["id"])
                    self.m.count(f"{kind} child backup ok")
                    self.m.event(f"done {b['id']}" + (" (then killed)" if killed else ""))
                elif killed:
                    with self.m.lock:
                        self.m.killed.add(b["id"])
                    self.m.count(f"{kind} child killed mid-backup")
                    self.m.event(f"killed {b['id']}")
                else:
                    self.m.failed_with(b["id"], "child failed")
            elif killed:
                self.m.count("child killed mid-collection")
            if kind == "skewed" and not killed:
                self.m.count("skewed child ok" if "EXIT" in lines else "skewed child failed")
        finally:
            if b is not None:
                Path(b["source"]).unlink(missing_ok=True)
            out.unlink(missing_ok=True)

    # -- workers -------------------------------------------------------------------------
    def worker(self, i: int) -> None:
        rnd = random.Random(f"{self.seed}-worker-{i}")
        name = threading.current_thread().name
        while not self.stop.is_set():
            with self.m.lock:
                nlive = len(self.m.live)
            ops: dict[str, float] = {
                "write": 20, "full": 8, "incremental": 16, "cross": 3,
                "delete": 0 if nlive < 4 else 80 if nlive > 40 else 9,
                "clone": 6, "gc": 8, "restore": 8, "verify": 3, "killed": 2, "skewed": 1.5,
            }
            op = rnd.choices(list(ops), weights=list(ops.values()))[0]
            self.current[name] = (op, time.monotonic())
            try:
                if op in ("full", "incremental", "cross"):
                    self.op_backup(rnd, op)
                elif op in ("killed", "skewed"):
                    self.op_child(rnd, op)
                else:
                    getattr(self, f"op_{op}")(rnd)
            except Exception:
                self.m.finding(f"{op} raised:\n{traceback.format_exc()}")
            finally:
                self.current.pop(name, None)
            with self.m.lock:
                if self.m.findings:
                    self.stop.set()  # report early; the final checks still run

    def stacks(self, threads: list[threading.Thread]) -> str:
        frames = sys._current_frames()
        out = []
        for t in threads:
            if t.is_alive() and t.ident in frames:
                op = self.current.get(t.name)
                out.append(f"--- {t.name} in {op}:\n"
                           + "".join(traceback.format_stack(frames[t.ident])))
        return "\n".join(out)

    def run_workers(self) -> None:
        for vol in self.volumes:  # creates the container; a first population
            snap, seq, digest = self.freeze(vol)
            bid = self.m.new_id(Rec(vol.idx, seq, digest, vol.size))
            self.engines[0].backup(container=CONTAINER, backup_id=bid, source=snap,
                                   size=vol.size, record={"id": bid})
            snap.unlink()
            self.m.succeeded(bid)
        threads = [threading.Thread(target=self.worker, args=(i,), name=f"w{i}", daemon=True)
                   for i in range(self.threads)]
        for t in threads:
            t.start()
        self.stop.wait(self.seconds)
        self.stop.set()
        deadline = time.monotonic() + 150  # a paused backup, a child: seconds, not minutes
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            with self.children_mu:
                for p in list(self.children.values()):
                    p.kill()
            self.m.finding("workers hung:\n" + self.stacks(threads))
            raise Hang()

    # -- the end -------------------------------------------------------------------------
    def drain(self, what: str, rounds: int = 40) -> float:
        """Collect until nothing waits; returns how long that took."""
        eng = self.engines[0]
        started = time.monotonic()
        for _ in range(rounds):
            if eng.collect_garbage(container=CONTAINER):
                return time.monotonic() - started
            time.sleep(GRACE / 2)
        self.m.finding(f"{what}: garbage collection never settled ({rounds} rounds)")
        return time.monotonic() - started

    def store_files(self, sub: str, temporary: bool = False) -> list[Path]:
        """The objects under ``sub`` (or the local store's temporary files: debris of a
        process killed mid-write, which listings skip and nothing cleans)."""
        d = self.root / CONTAINER / sub
        if not d.exists():
            return []
        return sorted(p for p in d.rglob("*")
                      if p.is_file() and p.name.startswith(".tmp-") == temporary)

    def final_checks(self) -> None:
        m, eng = self.m, self.engines[0]
        # Debris of killed backups: restores byte-exact or fails cleanly; then discarded.
        for bid in sorted(m.killed):
            if not eng.has_backup(container=CONTAINER, backup_id=bid):
                continue
            try:
                ok = self.restore_sha(eng, bid) == m.recs[bid].sha
                m.count("killed leftover restores" if ok else "killed leftover WRONG")
                if not ok:
                    m.finding(f"leftover manifest of killed backup {bid} restores wrong bytes")
            except DataError as e:
                m.count("killed leftover unrestorable")
                m.note(f"leftover manifest of killed backup {bid} does not restore: {e}")
            eng.discard(container=CONTAINER, backup_id=bid)
        for bid in sorted(set(m.failed) | m.deleted):
            if eng.has_backup(container=CONTAINER, backup_id=bid):
                why = "deleted" if bid in m.deleted else m.failed[bid]
                m.finding(f"backup {bid} ({why}) still has a manifest")
                eng.discard(container=CONTAINER, backup_id=bid)  # the checks below go on
        time.sleep(GRACE + LAG)  # reference lists of killed backups expire
        m.event(f"drained in {self.drain('before the final restores'):.1f}s")
        names = set(group_manifests(f"manifests/{p.name}" for p in self.store_files("manifests")))
        if names != m.live:
            m.finding(f"manifests in the store != live backups: extra {sorted(names - m.live)}"
                      f", missing {sorted(m.live - names)}")
        for bid in sorted(m.live):
            try:
                got = self.restore_sha(self.engines[int(bid[1:]) % 2], bid)
            except Exception:
                m.finding(f"final restore of live backup {bid} failed:\n{traceback.format_exc()}")
                continue
            if got != m.recs[bid].sha:
                m.finding(f"final restore of live backup {bid} returned wrong bytes")
        rep = eng.verify(container=CONTAINER)
        if not rep.ok:
            m.finding(f"final verify: missing {rep.missing}, corrupt {rep.corrupt}")
        m.event(f"final: {len(m.live)} live backups restored, {rep.checked_blocks} blocks "
                "verified")
        # Delete everything: every pack goes, garbage of cancelled and killed runs too.
        for bid in sorted(m.live):
            eng.discard(container=CONTAINER, backup_id=bid)
        time.sleep(GRACE + LAG)
        m.event(f"emptied in {self.drain('after deleting everything'):.1f}s")
        left = self.store_files("packs")
        if left:
            m.finding(f"{len(left)} packs remain after deleting everything and collecting")
        gc_left = self.store_files("gc")
        if gc_left:
            now = time.time()
            old = [p for p in gc_left if now - p.stat().st_mtime >= 2 * GRACE]
            m.note(f"{len(gc_left)} gc objects remain, {len(old)} older than 2 grace periods")
            if old:
                m.finding(f"gc objects older than 2 grace periods remain: {old}")
        tmps = self.store_files("", temporary=True)
        probes = self.store_files("clock")
        if tmps or probes:  # from killed children: the local store never cleans them
            m.note(f"store debris of killed processes: {len(tmps)} temporary files, "
                   f"{len(probes)} clock probes")

    def summary(self) -> str:
        m = self.m
        lines = [f"event log {m.log_path}",
                 f"seed {self.seed}, {self.seconds:g}s, {self.threads} workers, "
                 f"{len(self.volumes)} volumes "
                 f"({', '.join(str(v.size // KiB) + ' KiB' for v in self.volumes)}), "
                 f"pack sizes {[p // KiB for p in self.pack_sizes]} KiB",
                 f"backups: {len(m.recs)} ids, {len(m.live)} live at the end, "
                 f"{len(m.deleted)} deleted, {len(m.failed)} failed, {len(m.killed)} killed"]
        lines += [f"  {k}: {v}" for k, v in sorted(m.stats.items())]
        lines += [f"note: {n}" for n in m.notes[:20]]
        return "\n".join(lines)


class Hang(Exception):
    pass


@pytest.mark.timeout(int(_seconds()) + 240)
def test_soak_concurrent_operations_with_faults(tmp_path: Path) -> None:
    """The acceptance test of GC data safety (module docstring)."""
    env_seed = os.environ.get("BLOCKVAULT_SOAK_SEED")
    seed = int(env_seed) if env_seed else random.SystemRandom().randrange(1 << 32)
    seconds = _seconds()
    rerun = (f"BLOCKVAULT_SOAK_SEED={seed} BLOCKVAULT_SOAK_SECONDS={seconds:g} "
             "python -m pytest tests/test_soak.py")
    print(f"soak seed {seed} ({seconds:g}s); rerun: {rerun}", flush=True)
    soak = None
    started = time.monotonic()
    try:
        soak = Soak(tmp_path, seed, seconds)
        try:
            soak.run_workers()
            soak.final_checks()
        except Hang:
            pass
    except BaseException as e:  # our own error, or the timeout: still name the seed
        detail = "".join(traceback.format_exception(e))
        log = soak.m.log_path if soak else "(none)"
        raise AssertionError(f"soak failed with seed {seed}; rerun: {rerun}\n"
                             f"event log: {log}\n{detail}") from e
    finally:
        if soak is not None:
            logging.getLogger("blockvault.engine.repack").removeHandler(soak.repack_log)
            soak.m.close()
    summary = soak.summary() + f"\ntook {time.monotonic() - started:.1f}s"
    print(summary)
    findings = soak.m.findings
    assert not findings, (
        f"soak failed with seed {seed}; rerun: {rerun}\nevent log: {soak.m.log_path}\n"
        f"{summary}\n{len(findings)} findings:\n" + "\n\n".join(findings[:10]))
