"""Verify: check that every block a backup (or a whole container) references is present,
decrypts and matches its id, without writing anything."""

from __future__ import annotations

import sqlite3
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from blockvault.engine.blobs import MissingObject, Run, decode_run, raw_entries, runs
from blockvault.engine.config import VerifyReport
from blockvault.engine.errors import DataError
from blockvault.engine.format import (
    CONFIG_NAME,
    ManifestReader,
    check_id,
    group_manifests,
    manifest_exists,
    manifest_object,
)

if TYPE_CHECKING:
    from blockvault.engine.engine import Engine


def verify(engine: Engine, *, container: str, backup_id: str | None = None) -> VerifyReport:
    c = engine.backend.open(container, create=False)
    rep = VerifyReport()
    missing: set[str] = set()
    corrupt: set[str] = set()
    if backup_id is not None:
        check_id(backup_id)
        ids: Iterator[str] = iter([backup_id])
    else:
        ids = iter(sorted(group_manifests(c.list("manifests/"))))
    cfg = engine._config(c, container, create=False)
    seen = sqlite3.connect("")  # private on-disk temp db: blobs already checked
    seen.execute("CREATE TABLE seen (pack BLOB, off INTEGER, scope TEXT, "
                 "PRIMARY KEY (pack, off, scope))")
    mu = threading.Lock()

    def on_bad(e: DataError) -> None:
        with mu:
            (missing if isinstance(e, MissingObject) else corrupt).add(e.object_name)

    def check(run: Run) -> int:
        try:
            return len(decode_run(c, crypto, run, bs, on_bad))
        except DataError as e:
            on_bad(e)
            return 0

    with ThreadPoolExecutor(max_workers=engine.config.upload_concurrency + engine.workers,
                            thread_name_prefix="bv-verify") as pool:
        for bid in ids:
            mname = manifest_object(bid)
            if not manifest_exists(c, bid):
                missing.add(mname)
                continue
            if cfg is None:
                missing.add(CONFIG_NAME)
                break
            pending: deque[Future] = deque()
            try:
                m = ManifestReader(c, bid, cfg.crypto, container)
                # Each manifest's blocks are checked with the ids of its own dedup scope,
                # and a blob once per scope that names it (a blob's id is keyed by the
                # scope it was stored in, so another scope naming it must fail the check).
                crypto = m.id_crypto
                scope = m.scope or ""
                bs = m.block_size

                def fresh(entries: Iterator[tuple], scope: str) -> Iterator[tuple]:
                    for e in entries:
                        cur = seen.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)",
                                           (e[2], e[3], scope))
                        if cur.rowcount:
                            yield e

                for run in runs(fresh(raw_entries(m), scope), bs):
                    pending.append(pool.submit(check, run))
                    while len(pending) > engine.config.upload_concurrency + engine.workers:
                        rep.checked_blocks += pending.popleft().result()
            except DataError as e:
                corrupt.add(e.object_name or mname)
            finally:
                while pending:
                    rep.checked_blocks += pending.popleft().result()
    seen.close()
    rep.missing = sorted(missing)
    rep.corrupt = sorted(corrupt)
    return rep
