#!/usr/bin/env python3
"""Engine throughput against each object store: local directory, a real Swift and its S3 API.

    python benchmarks/stores.py [--size 1G] [--workdir DIR]

Starts the project's Swift all-in-one (tools/swift/start-swift.sh) on free loopback ports,
builds an image (half random, a quarter text, a quarter holes), backs it up and restores it
through blockvault's Engine with each backend (behind the retry wrapper, pool sized as the
service sizes it), checks each restore with sha256 and prints MB/s of logical size.
Client and servers share the machine's cores, so remote-store numbers are a lower bound.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blockvault.engine import Engine, EngineConfig  # noqa: E402
from blockvault.store.factory import make_backend  # noqa: E402
from tests.swift_fixture import start_swift_server  # noqa: E402

MiB = 1024 * 1024


def build_image(path: Path, size: int) -> str:
    words = b"volume backup chunk manifest container store restore verify " * 64
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 4 * MiB):
            kind = (off // (4 * MiB)) % 4
            if kind == 3:
                continue  # a hole
            f.seek(off)
            f.write(os.urandom(4 * MiB) if kind < 2 else (words * 1024)[: 4 * MiB])
    return sha256(path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def measure(name: str, settings: SimpleNamespace, image: Path, digest: str, wd: Path) -> dict:
    engine = Engine(make_backend(settings), wd / f"cache-{name}", EngineConfig(zstd_level=1))
    container = f"bench-{os.getpid()}-{name}"
    size = image.stat().st_size
    t = time.monotonic()
    result = engine.backup(container=container, backup_id="b1", source=image, size=size)
    backup_s = time.monotonic() - t
    out = wd / f"restore-{name}.raw"
    out.write_bytes(b"")
    t = time.monotonic()
    engine.restore(container=container, backup_id="b1", target=out, target_is_new=True)
    restore_s = time.monotonic() - t
    ok = sha256(out) == digest
    out.unlink()
    engine.delete(container=container, backup_id="b1")
    return {"store": name, "backup_MBps": size / backup_s / 1e6,
            "restore_MBps": size / restore_s / 1e6, "stored_MiB": result.stored_bytes / MiB,
            "objects": result.object_count, "byte_exact": ok}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    size = int(float(a.size.rstrip("GgMm")) * (1024 if a.size[-1] in "Gg" else 1) * MiB)
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="bv-stores-"))
    wd.mkdir(parents=True, exist_ok=True)
    image = wd / "image.raw"
    digest = build_image(image, size)
    swift = start_swift_server(wd / "swift")
    base = dict(data_dir=wd, upload_concurrency=4, backup_workers=2, store_retry_budget=60)
    stores = {
        "local": SimpleNamespace(store="local", **base),
        "swift": SimpleNamespace(store="swift", swift_auth_url=swift.auth_url,
                                 swift_user="test:tester", swift_key="testing", **base),
        "s3": SimpleNamespace(store="s3", s3_endpoint_url=swift.s3_endpoint,
                              s3_region=swift.region, s3_access_key="test:tester",
                              s3_secret_key="testing", **base),
    }
    rows = []
    try:
        for name, settings in stores.items():
            rows.append(measure(name, settings, image, digest, wd))
            print(rows[-1], flush=True)
    finally:
        swift.stop_all()
    print(f"\nimage {size / MiB:.0f} MiB (1/2 random, 1/4 text, 1/4 holes), {os.cpu_count()} cores")
    print(f"{'store':<7}{'backup MB/s':>13}{'restore MB/s':>14}{'stored MiB':>12}{'objects':>9}"
          f"{'exact':>7}")
    for r in rows:
        print(f"{r['store']:<7}{r['backup_MBps']:>13.0f}{r['restore_MBps']:>14.0f}"
              f"{r['stored_MiB']:>12.1f}{r['objects']:>9}{'yes' if r['byte_exact'] else 'NO':>7}")


if __name__ == "__main__":
    main()
