"""Backups written by Cinder itself: runs tools/cinder/make-cinder-backups.sh (Cinder's
unmodified chunked drivers, in a cached venv) and loads the backups.json it writes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = ROOT / "tools" / "cinder" / "make-cinder-backups.sh"


def written_by_cinder(out: Path, *args: str) -> dict:
    """Cinder's backups in ``out`` (``args`` go to the script: algorithms, driver and its
    endpoint); the test is failed under CI, skipped elsewhere, when Cinder cannot run."""
    proc = subprocess.run(["bash", str(MAKE), str(out), *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=1800, check=False)
    if proc.returncode != 0:
        why = f"Cinder's backup driver could not be run:\n{proc.stderr[-3000:]}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    data = json.loads((out / "backups.json").read_text())
    data["out"] = out
    return data
