"""Hardening figures (issue 9): what a hostile or greedy tenant can cost the server.

Runs a real ``blockvault serve`` from a given source tree (``--tree``, default this one) on
a fresh data dir and measures, in one run:

- body limit: one 300 MiB JSON body — status, reply size, time, and the server's peak RSS;
- bad requests: the server's RSS before and after 5,000 requests with invalid bodies;
- fairness: project A queues a verify of each of 100 backups, then project B creates one
  backup; how long B waits for ``available``.

Compare two trees with ``--tree`` on a ``git worktree`` of the older commit::

    git worktree add /tmp/bv-base <rev>
    python benchmarks/hardening.py --tree /tmp/bv-base
    python benchmarks/hardening.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.server import Server  # noqa: E402

MiB = 1024 * 1024


def rss(pid: int, field: str = "VmRSS") -> int:
    """A /proc/PID/status memory figure, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def body_limit(srv: Server, size: int) -> dict:
    api = srv.client("alice", "proja")
    value = b"a" * size
    body = b'{"backup": {"volume_id": "' + value + b'"}}'
    started = time.monotonic()
    try:
        r = api.http.post(api.base + "/backups", content=body,
                          headers={"Content-Type": "application/json"}, timeout=600)
        status, reply = r.status_code, len(r.content)
    except httpx.HTTPError as exc:  # a server that closes early is fine: it refused
        status, reply = f"closed ({type(exc).__name__})", 0
    return {
        "body_MiB": size / MiB,
        "status": status,
        "reply_bytes": reply,
        "seconds": round(time.monotonic() - started, 2),
        "server_peak_rss_MiB": round(rss(srv.proc.pid, "VmHWM") / MiB, 1),
    }


def bad_requests(srv: Server, count: int) -> dict:
    api = srv.client("alice", "proja", version="3.64")
    # warm up code paths so the figure is growth, not first-use allocation
    for _ in range(200):
        api.post("/backups", {"backup": {"volume_id": "not-a-uuid", "name": "x"}})
    before = rss(srv.proc.pid)
    statuses: dict[int, int] = {}
    for i in range(count):
        r = api.post("/backups", {"backup": {"volume_id": f"bad-{i}", "name": "x" * 40}})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    after = rss(srv.proc.pid)
    return {"requests": count, "statuses": statuses,
            "rss_before_MiB": round(before / MiB, 1), "rss_after_MiB": round(after / MiB, 1),
            "growth_MiB": round((after - before) / MiB, 1)}


def fairness(srv: Server, backups: int, data_mib: int) -> dict:
    a = srv.client("alice", "proja")
    b = srv.client("bob", "projb")
    vol = a.create_volume(1)
    a.write(vol, 0, os.urandom(data_mib * MiB))
    ids = [a.create_backup(vol) for _ in range(backups)]
    vol_b = b.create_volume(1)
    b.write(vol_b, 0, os.urandom(MiB))
    # B's backup alone, for the baseline
    started = time.monotonic()
    b.create_backup(vol_b)
    alone = time.monotonic() - started
    for backup_id in ids:
        r = a.post(f"/backups/{backup_id}/verify")
        assert r.status_code == 202, r.text
    started = time.monotonic()
    b.create_backup(vol_b)
    behind = time.monotonic() - started
    return {"verifies_queued": backups, "verify_data_MiB": data_mib,
            "b_backup_alone_s": round(alone, 2), "b_backup_behind_queue_s": round(behind, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=str(HERE.parent),
                    help="source tree whose blockvault package the server runs")
    ap.add_argument("--body-mib", type=int, default=300)
    ap.add_argument("--bad", type=int, default=5000)
    ap.add_argument("--verifies", type=int, default=100)
    ap.add_argument("--verify-mib", type=int, default=64)
    ap.add_argument("--only", action="append", help="run just this figure (repeatable)")
    args = ap.parse_args()
    tree = str(Path(args.tree).resolve())
    results: dict = {"tree": tree}
    with tempfile.TemporaryDirectory(prefix="bv-harden-") as tmp:
        # `python -m` puts the working directory first on sys.path: leave this tree
        os.chdir(tmp)
        # project A keeps 100 backups: more than the default quota allows
        env = {"PYTHONPATH": tree, "BLOCKVAULT_QUOTA_BACKUPS": "-1",
               "BLOCKVAULT_QUOTA_BACKUP_GIGABYTES": "-1"}
        for name, run in (
            ("body_limit", lambda srv: body_limit(srv, args.body_mib * MiB)),
            ("bad_requests", lambda srv: bad_requests(srv, args.bad)),
            ("fairness", lambda srv: fairness(srv, args.verifies, args.verify_mib)),
        ):
            if args.only and name not in args.only:
                continue
            # a server of its own for each figure, so one cannot inflate another's memory
            srv = Server(Path(tmp) / name, env).start()
            try:
                results[name] = run(srv)
            finally:
                srv.stop()
            print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
