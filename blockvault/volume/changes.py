"""Changed-region tracking for raw-file volumes.

Every write that goes through the service's data path is recorded, per volume, as a byte
range relative to a *base* backup. The next incremental with that base as its parent only
needs to read those ranges. The map is trusted only while the file's size and mtime are
exactly what the last recorded write left: any change behind the service's back (a write
through another path, a copy, a restore) voids it and the engine reads everything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from blockvault.engine.source import FileSource

#: Past this many separate ranges the map is dropped (a full read is then cheaper to reason
#: about than a huge hint, and the file stays small).
MAX_RANGES = 20000


class ChangeMap:
    def __init__(self, path: Path, volume_file: Path) -> None:
        self.path = path
        self.volume_file = volume_file

    def _load(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _save(self, doc: dict | None) -> None:
        if doc is None:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)

    def _stamp(self) -> list[int]:
        st = os.stat(self.volume_file)
        return [st.st_size, st.st_mtime_ns]

    def hint(self, base_backup_id: str) -> list[tuple[int, int]] | None:
        """Ranges changed since ``base_backup_id``, or None if unknown."""
        doc = self._load()
        if not doc or doc.get("base") != base_backup_id or doc.get("stamp") != self._stamp():
            return None
        return [(int(o), int(n)) for o, n in doc["ranges"]]

    def record_write(self, offset: int, length: int) -> None:
        doc = self._load()
        if not doc or not doc.get("base"):
            return  # no base to be relative to: nothing worth tracking until a backup
        ranges = _merge([*map(tuple, doc["ranges"]), (offset, length)])
        if len(ranges) > MAX_RANGES:
            self._save(None)
            return
        doc["ranges"] = ranges
        doc["stamp"] = self._stamp()
        self._save(doc)

    def stamp(self) -> list[int]:
        """The file's identity now; pass it to :meth:`reset` after a backup."""
        return self._stamp()

    def reset(self, base_backup_id: str, stamp_before: list[int]) -> None:
        """A backup of the whole volume just finished; track from it on. If the file
        changed while it ran, the backup may not match the file: track nothing."""
        if self._stamp() != stamp_before:
            self._save(None)
        else:
            self._save({"base": base_backup_id, "stamp": stamp_before, "ranges": []})

    def invalidate(self) -> None:
        self._save(None)


class TrackedFileSource(FileSource):
    """A raw volume file as an engine Source whose change tracking is the writes the data
    API recorded since the parent backup (:meth:`ChangeMap.hint`, taken when the backup
    began), or None when they are not known to be complete."""

    def __init__(self, path: os.PathLike | str,
                 changed: Sequence[tuple[int, int]] | None) -> None:
        super().__init__(path)
        self._changed = changed

    def changed_extents(self) -> Sequence[tuple[int, int]] | None:
        return self._changed


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]
