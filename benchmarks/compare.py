"""Before/after for a data-path change: the engine's full backup and restore of the same
image, for two commits, run alternately on the same machine in one go.

    python benchmarks/compare.py --base REV [--size 2G] [--workdir DIR] [--rounds 3]

The base commit is checked out in a temporary git worktree; each round runs this tree's
``benchmarks/run.py --only bv-engine --repeat 1`` with the base tree's engine and with this
tree's (in alternating order, so drift in the machine's speed hits both alike) and the
medians are compared: a full backup, a 1% changed-range incremental and a restore.
Wall times on a shared VM vary by ±20% from run to run: compare medians of
several rounds, and CPU seconds, not single runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
STEPS = ("full", "incr", "restore")


def run_tree(tree: Path, a: argparse.Namespace) -> dict:
    # This tree's harness drives both engines, so both run the same steps.
    subprocess.run([sys.executable, str(HERE / "benchmarks" / "run.py"), "--only", "bv-engine",
                    "--repeat", "1", "--size", a.size, "--workdir", a.workdir,
                    "--engine-repo", str(tree)],
                   check=True, stdout=subprocess.DEVNULL)
    runs = json.loads((Path(a.workdir) / "engine-only.json").read_text())["runs"]
    return {step: ms[0] for step, ms in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="commit to compare this tree with")
    ap.add_argument("--size", default="2G")
    ap.add_argument("--workdir", default="/var/tmp/bvb")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rev = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", a.base],
                         check=True, capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bv-base-") as tmp:
        base = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(base), rev],
                       check=True, capture_output=True)
        try:
            res: dict[str, list[dict]] = {"base": [], "head": []}
            for i in range(a.rounds):
                order = [("base", base), ("head", HERE)]
                for name, tree in order if i % 2 == 0 else reversed(order):
                    res[name].append(run_tree(tree, a))
                    m = res[name][-1]
                    print(f"round {i + 1} {name}: " + ", ".join(
                        f"{step} {m[step]['wall']:.2f}s ({m[step]['cpu']:.2f} CPU-s)"
                        for step in STEPS), flush=True)
        finally:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(base)],
                           check=False, capture_output=True)
    print(f"\nmedians of {a.rounds} rounds, base {rev} vs head {head} (uncommitted changes "
          "included):")
    print(f"{'step':8s} {'':5s} {'wall s':>7s} {'CPU s':>7s} {'RSS MiB':>8s}")
    for step in STEPS:
        med = {}
        for name in ("base", "head"):
            ms = [r[step] for r in res[name]]
            med[name] = {k: statistics.median(m[k] for m in ms) for k in ("wall", "cpu", "rss")}
            print(f"{step:8s} {name:5s} {med[name]['wall']:7.2f} {med[name]['cpu']:7.2f} "
                  f"{med[name]['rss'] / 2**20:8.0f}")
        print(f"{step:8s} ratio  wall {med['base']['wall'] / med['head']['wall']:.2f}x faster, "
              f"CPU {med['head']['cpu'] / med['base']['cpu']:.2f}x of base")


if __name__ == "__main__":
    main()
