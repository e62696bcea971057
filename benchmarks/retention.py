#!/usr/bin/env python3
"""Stored bytes under a retention policy, with and without repacking (docs/benchmarks.md,
"Retention and repacking").

    python benchmarks/retention.py [--size 1G] [--days 60] [--change 0.02] [--workdir DIR]

A volume of random data (incompressible: stored bytes = data bytes) is backed up once a
simulated day, after ``--change`` of its 32 KiB blocks were rewritten at random places;
after each backup the backups outside keep-daily 7 + keep-weekly 4 (``select_kept``, on
synthetic daily timestamps) are deleted and the container is collected, as the service's
maintenance timer would. The grace period is a few seconds so that the 60 days take
minutes. Default block and pack sizes. Printed: per day, the stored bytes of the kept
backups' distinct blocks ("live") and the bytes of all packs ("stored"), for a run with
repacking and one without; then the final ratio once every collection has settled. Every
kept backup of the last day is restored and checked (sha256). Writes nothing but its
temporary work directory, removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blockvault.engine import Engine, EngineConfig  # noqa: E402
from blockvault.engine.format import ManifestReader  # noqa: E402
from blockvault.service.retention import RetentionPolicy, select_kept  # noqa: E402
from blockvault.store.local import LocalBackend  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
BS = 32 * KiB
GRACE, LAG = 3.0, 0.1
POLICY = RetentionPolicy(keep_daily=7, keep_weekly=4)


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": 1024 * MiB}.get(s[-1:], 1)
    return int(float(s.rstrip("KMG")) * mult)


def packs_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "c" / "packs").rglob("*") if p.is_file())


def live_bytes(eng: Engine, kept: list[str]) -> int:
    c = eng.backend.open("c", create=False)
    cfg = eng._require_config(c, "c")
    distinct: dict[bytes, int] = {}
    for bid in kept:
        for e in ManifestReader(c, bid, cfg.crypto, "c").entries():
            distinct[e.block_id] = e.length
    return sum(distinct.values())


def simulate(work: Path, size: int, days: int, change: float, repack: bool) -> dict:
    root = work / ("store-repack" if repack else "store-plain")
    eng = Engine(LocalBackend(root), work / ("cache-repack" if repack else "cache-plain"),
                 EngineConfig(gc_grace=GRACE, store_lag=LAG, repack=repack))
    vol = work / "volume"
    rnd = random.Random(42)  # the same volume history in both runs
    with open(vol, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(rnd.randbytes(4 * MiB))
    nblocks = size // BS
    digests: dict[str, str] = {}
    backups: list[tuple[str, dt.datetime]] = []
    day0 = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.UTC)
    curve = []
    backup_s = collect_s = 0.0
    for day in range(days):
        started = time.monotonic()
        changed = []
        if backups:
            with open(vol, "r+b") as f:
                for b in sorted(rnd.sample(range(nblocks), int(nblocks * change))):
                    f.seek(b * BS)
                    f.write(rnd.randbytes(BS))
                    changed.append((b * BS, BS))
        bid = f"day{day:02d}"
        t = time.monotonic()
        eng.backup(container="c", backup_id=bid, source=vol, size=size,
                   parent_id=backups[-1][0] if backups else None,
                   changed=changed or None, record={"id": bid})
        backup_s += time.monotonic() - t
        digests[bid] = hashlib.sha256(vol.read_bytes()).hexdigest()
        backups.append((bid, day0 + dt.timedelta(days=day)))
        kept = select_kept(backups, POLICY)
        for old, _when in backups:
            if old not in kept:
                eng.delete(container="c", backup_id=old)
        backups = [b for b in backups if b[0] in kept]
        t = time.monotonic()
        eng.collect_garbage(container="c")
        collect_s += time.monotonic() - t
        curve.append((day + 1, len(backups), live_bytes(eng, [b[0] for b in backups]),
                      packs_bytes(root)))
        # A simulated day lasts at least a grace period, so marks ripen between days.
        time.sleep(max(0.0, GRACE * 1.05 - (time.monotonic() - started)))
    for _ in range(30):  # let every collection settle (sweeps, repacks they lead to)
        if eng.collect_garbage(container="c"):
            break
        time.sleep(GRACE * 1.05)
    live, total = live_bytes(eng, [b[0] for b in backups]), packs_bytes(root)
    for bid, _when in backups:
        out = work / "restored"
        out.unlink(missing_ok=True)
        out.touch()
        eng.restore(container="c", backup_id=bid, target=out, target_is_new=True)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digests[bid], bid
        out.unlink()
    assert eng.verify(container="c").ok
    vol.unlink()
    return {"curve": curve, "live": live, "stored": total, "backup_s": backup_s,
            "collect_s": collect_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--change", type=float, default=0.02)
    ap.add_argument("--every", type=int, default=5, help="print every Nth day")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    size = parse_size(args.size) // BS * BS
    work = Path(tempfile.mkdtemp(prefix="bv-retention-", dir=args.workdir))
    try:
        runs = {r: simulate(work, size, args.days, args.change, r) for r in (True, False)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"volume {size / MiB:.0f} MiB, {args.change:.0%} of 32 KiB blocks rewritten a day, "
          f"keep-daily 7 + keep-weekly 4, {args.days} days")
    print(f"{'day':>4} {'kept':>4} {'live MiB':>9} | {'repack: stored':>14} {'ratio':>6} | "
          f"{'no repack: stored':>17} {'ratio':>6}")
    rp, pl = runs[True]["curve"], runs[False]["curve"]
    for (day, kept, live, s1), (_d, _k, live2, s2) in zip(rp, pl, strict=True):
        if day % args.every and day != 1:
            continue
        print(f"{day:>4} {kept:>4} {live / MiB:>9.0f} | {s1 / MiB:>14.0f} {s1 / live:>6.2f} | "
              f"{s2 / MiB:>17.0f} {s2 / live2:>6.2f}")
    for name, r in (("repack", runs[True]), ("no repack", runs[False])):
        print(f"settled, {name}: live {r['live'] / MiB:.0f} MiB, stored "
              f"{r['stored'] / MiB:.0f} MiB, ratio {r['stored'] / r['live']:.3f}; "
              f"backups {r['backup_s']:.1f} s, collections {r['collect_s']:.1f} s in all")


if __name__ == "__main__":
    main()
