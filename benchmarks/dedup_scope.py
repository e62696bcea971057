#!/usr/bin/env python3
"""The cost of per-project dedup scopes (docs/benchmarks.md, "Dedup scopes").

    python benchmarks/dedup_scope.py [--size 256M] [--projects 4] [--workdir DIR]

1. N projects back up the same image into one container, once with ``dedup_scope =
   "project"`` (the default) and once with ``"container"``: stored bytes, objects and
   backup time per project. Every backup is restored and checked byte-exact (sha256).
2. Block-id hashing: plain BLAKE3 (the container-wide ids, as before scopes) vs keyed
   BLAKE3 (a scope's ids) of 32 KiB blocks, one thread, best of several rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import blake3

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blockvault.engine import Engine, EngineConfig  # noqa: E402
from blockvault.engine.crypto import scope_key  # noqa: E402
from blockvault.store.local import LocalBackend  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
BS = 32 * KiB


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": 1024 * MiB}.get(s[-1:], 1)
    return int(float(s.rstrip("KMG")) * mult)


def make_image(path: Path, size: int, seed: int = 1) -> str:
    """Half compressible text (every 4 KiB distinct), a quarter random, a quarter hole.
    Returns its sha256."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 9)))
             for _ in range(500)]
    base = b" ".join(rnd.choices(words, k=200_000))
    h = hashlib.sha256()
    with open(path, "wb") as f:
        f.truncate(size)
        done = 0
        i = 0
        while done < size // 2:
            piece = bytearray()
            while len(piece) < 4 * MiB:
                a = (i * 7919) % (len(base) - 5000)
                page = (b"<%d>" % i + base[a : a + 4096])[:4096]
                piece += page
                i += 1
            f.write(piece)
            h.update(piece)
            done += len(piece)
        while done < 3 * size // 4:
            piece = rnd.randbytes(4 * MiB)
            f.write(piece)
            h.update(piece)
            done += len(piece)
    left = size - done
    while left:
        n = min(left, 4 * MiB)
        h.update(bytes(n))
        left -= n
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(4 * MiB):
            h.update(b)
    return h.hexdigest()


def scopes(work: Path, image: Path, size: int, want: str, projects: int, mode: str) -> dict:
    root = work / mode
    shutil.rmtree(root, ignore_errors=True)
    store = LocalBackend(root / "store")
    eng = Engine(store, root / "cache", EngineConfig(dedup_scope=mode))
    rows = []
    for p in range(projects):
        t = time.perf_counter()
        r = eng.backup(container="bench", backup_id=f"b{p}", source=image, size=size,
                       scope=f"project-{p}")
        rows.append({"seconds": round(time.perf_counter() - t, 2),
                     "stored_bytes": r.stored_bytes, "objects": r.object_count,
                     "new_blocks": r.new_blocks})
    for p in range(projects):
        target = root / "restore"
        target.touch()
        eng.restore(container="bench", backup_id=f"b{p}", target=target, target_is_new=True)
        assert sha256_file(target) == want, f"{mode}: restore of b{p} differs"
        target.unlink()
    packs = sum(f.stat().st_size for f in (root / "store" / "bench" / "packs").rglob("*")
                if f.is_file())
    shutil.rmtree(root)
    return {"backups": rows, "pack_bytes": packs,
            "total_seconds": round(sum(r["seconds"] for r in rows), 2)}


def hashing(total: int, rounds: int = 5) -> dict:
    data = random.Random(2).randbytes(64 * MiB)
    mv = memoryview(data)
    key = scope_key(None, "0123456789abcdef0123456789abcdef")  # a project id's length
    out = {}
    for name, fn in (
        ("plain", lambda b: blake3.blake3(b).digest()),
        ("keyed", lambda b: blake3.blake3(b, key=key).digest()),
    ):
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            for k in range(0, total, BS):
                a = k % len(data)
                fn(mv[a : a + BS])
            best = min(best, time.perf_counter() - t)
        out[name] = round(total / MiB / best, 1)  # MiB/s
    out["keyed/plain"] = round(out["keyed"] / out["plain"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--projects", type=int, default=4)
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "work" / "dedup-scope"))
    ap.add_argument("--hash-bytes", default="512M")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    image = work / "image.raw"
    want = make_image(image, size)
    res = {"size": size, "projects": args.projects}
    for mode in ("container", "project"):
        res[mode] = scopes(work, image, size, want, args.projects, mode)
        print(mode, json.dumps(res[mode]), flush=True)
    res["stored_ratio"] = round(res["project"]["pack_bytes"] / res["container"]["pack_bytes"], 2)
    res["time_ratio"] = round(res["project"]["total_seconds"]
                              / res["container"]["total_seconds"], 2)
    res["hash_mib_s"] = hashing(parse_size(args.hash_bytes))
    print(json.dumps(res, indent=1))
    (work / "result.json").write_text(json.dumps(res, indent=1))
    image.unlink()


if __name__ == "__main__":
    main()
