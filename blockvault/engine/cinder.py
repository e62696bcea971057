"""Reading backups that Cinder itself wrote with its chunked drivers (posix, nfs, swift, s3).

Cinder's chunked format (cinder/backup/chunkeddriver.py, metadata version ``1.0.0``): a
backup is a set of objects in a container whose names start with the backup's *prefix*
(its ``service_metadata``):

- ``<prefix>_metadata``: JSON with ``version``, ``backup_id``, ``volume_id``, ``parent_id``,
  ``created_at``, ``volume_meta`` and ``objects``, a list of ``{name: {offset, length,
  compression, md5}}``: each data object holds ``length`` volume bytes from ``offset``,
  compressed as named (zlib, bz2, zstd or none, chosen per object: Cinder stores an object
  uncompressed when compression did not make it smaller); ``md5`` is of the uncompressed
  bytes.
- ``<prefix>_sha256file``: JSON with ``chunk_size`` (32 KiB by default) and ``sha256s``, one
  SHA-256 per block of the *whole* volume as it was at that backup, incremental or not.
- ``<prefix>-00001``, ``-00002``...: the data objects. A full backup's objects tile the
  volume; an incremental's hold only the runs of blocks whose SHA-256 changed since its
  parent (never more than one object per ``backup_file_size`` read).

Where the objects are: Swift and S3 name them ``volume_<vol>/<time>/az_<az>_backup_<id>...``
in the backup's container; posix/nfs name them ``volume_<vol>_<time>_backup_<id>...`` in
the directory ``<backup_posix_path>/<container>``, and when a backup was made without a
container that directory is ``<id[0:2]>/<id[2:4]>/<id>`` (one per backup). A blockvault
store :class:`~blockvault.store.base.Container` reads these either way: a container opened
on Cinder's container (a local store rooted at ``backup_posix_path``, the same Swift
account or S3 bucket) has the objects under Cinder's names (``directory=""``), and
:func:`posix_tree` gives the whole ``backup_posix_path`` as one container, where a backup's
objects lie under ``directory = "<its container>/"`` (``nested=True`` in :func:`discover`).

Face (what the service layer uses):

- :class:`CinderBackup`: one backup read from its ``_metadata`` (id, prefix, directory,
  container, parent_id, size in GiB when known, volume_id, volume_meta, created_at...).
- :func:`read_backup` ``(container, prefix, directory="")``: read one backup's metadata.
- :func:`discover` ``(container, nested=False, on_problem=None)``: every backup in a
  container, found from its ``_metadata`` objects alone, parents before children.
- :func:`find_backup`: a parent by id, from the names alone (for chains).
- :func:`chain_of` ``(container, backup, known=None)``: the backup and its ancestors, full
  first; a missing parent is a :class:`DataError` naming it.
- :func:`restore_chain` ``(container, chain, target, ...)``: restore in one pass: for each
  region the newest object of the chain that covers it, every 32 KiB block checked against
  the newest backup's ``_sha256file`` before it is written, every object read at most once
  and its md5 checked; a missing or corrupt object is a :class:`DataError` naming it.
- :func:`verify_chain` ``(container, chain)``: a :class:`VerifyReport` (md5 of every object,
  SHA-256 of every block of the composed volume).
- :func:`delete_backup` ``(container, backup)``: remove the backup's objects as Cinder does
  (everything under its prefix), its ``_metadata`` last. Refusing while incrementals depend
  on it is the caller's rule (it knows the rows); :func:`discover` shows the links.

Memory stays bounded: objects are streamed in range reads and decompressed incrementally,
the volume passes through one window of a few MiB, and the ``_sha256file`` (about 70 bytes
per 32 KiB of volume: 2.3 GB for 1 TiB) is parsed as it streams. Only ``_metadata`` is
loaded whole, as Cinder does (one small entry per data object).
"""

from __future__ import annotations

import bz2
import hashlib
import heapq
import json
import math
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zstandard

from blockvault.engine.config import Progress, Throttle, VerifyReport
from blockvault.engine.errors import Cancelled, DataError, FormatError, MissingObject
from blockvault.engine.source import Target
from blockvault.store.base import Container, ObjectNotFound, StorePermanentError
from blockvault.store.local import LocalContainer

METADATA_SUFFIX = "_metadata"
SHA256_SUFFIX = "_sha256file"
SUPPORTED_VERSIONS = frozenset({"1.0.0"})
GIB = 1024**3

_READ_SIZE = 4 * 1024 * 1024  # one range GET of a stored object
_WINDOW = 4 * 1024 * 1024  # volume bytes checked and written at a time
_MD5_RE = re.compile(r"[0-9a-f]{32}")
_SHA_RE = re.compile(rb'"([0-9a-fA-F]{64})"')
_LIST_RE = re.compile(rb'"sha256s"\s*:\s*\[')
_UUID_RE = re.compile(r"[0-9a-fA-F-]{1,64}")
# Cinder records CONF.backup_compression_algorithm.lower(), so its aliases appear too
_CODECS = {"none": "none", "off": "none", "no": "none", "zlib": "zlib", "gzip": "zlib",
           "bz2": "bz2", "bzip2": "bz2", "zstd": "zstd"}


@dataclass(frozen=True)
class CinderObject:
    """One data object of a backup, as its ``_metadata`` records it."""

    name: str  # Cinder's name (in Cinder's container)
    offset: int
    length: int
    compression: str  # normalised: "none", "zlib", "bz2" or "zstd"
    md5: str


@dataclass(frozen=True)
class CinderBackup:
    """A Cinder backup, read from its ``_metadata`` object."""

    id: str
    prefix: str  # Cinder's service_metadata: every object name of the backup starts with it
    directory: str  # where Cinder's container lies in the store container ("" or "x/y/")
    container: str  # Cinder's container name
    parent_id: str | None
    volume_id: str
    created_at: str
    name: str | None = None
    description: str | None = None
    volume_meta: Any = None
    version: str = "1.0.0"
    #: volume size in GiB: from the chain's full backup (what its objects cover), 0 if unknown
    size: int = 0
    objects: tuple[CinderObject, ...] = field(default=(), repr=False)

    def store_name(self, cinder_name: str) -> str:
        """The name in the store container of the object Cinder calls ``cinder_name``."""
        return self.directory + cinder_name

    @property
    def metadata_name(self) -> str:
        return self.store_name(self.prefix + METADATA_SUFFIX)

    @property
    def sha256_name(self) -> str:
        return self.store_name(self.prefix + SHA256_SUFFIX)

    @property
    def end(self) -> int:
        """One past the last volume byte this backup's objects hold."""
        return max((o.offset + o.length for o in self.objects), default=0)


# -- where the objects are ---------------------------------------------------------------

def posix_tree(backup_posix_path: str | Path) -> Container:
    """Cinder's whole ``backup_posix_path`` as one store container (objects named
    ``<container>/<Cinder's name>``), so backups in Cinder's nested default containers
    (``ab/cd/<id>``, one per backup) and in named ones are read alike. Not created: a path
    that is not a directory is an error."""
    root = Path(backup_posix_path)
    if not root.is_dir():
        raise StorePermanentError(f"Cinder backup directory {root} does not exist")
    return LocalContainer(root, root.name)


def _get(container: Container, name: str, offset: int = 0, length: int | None = None) -> bytes:
    try:
        return container.get(name, offset, length)
    except ObjectNotFound:
        raise MissingObject(f"object {name} is missing", name) from None


# -- metadata ------------------------------------------------------------------------------

def read_backup(container: Container, prefix: str, directory: str = "",
                cinder_container: str | None = None) -> CinderBackup:
    """The backup whose objects are named ``<directory><prefix>...`` in ``container``.

    :class:`MissingObject` if its ``_metadata`` does not exist, :class:`FormatError` if it
    is not Cinder's chunked metadata of a supported version."""
    if directory and not directory.endswith("/"):
        directory += "/"
    name = directory + prefix + METADATA_SUFFIX
    raw = _get(container, name)
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"{name} is not Cinder backup metadata (not JSON: {e})") from None
    return _parse_metadata(meta, name, prefix, directory,
                           cinder_container if cinder_container is not None
                           else (directory.rstrip("/") or container.name))


def _parse_metadata(meta: Any, name: str, prefix: str, directory: str,
                    cinder_container: str) -> CinderBackup:
    def bad(why: str) -> FormatError:
        return FormatError(f"{name} is not valid Cinder backup metadata: {why}")

    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    version = meta.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(f"{name}: Cinder backup metadata version {version!r} is not "
                          f"supported (only {', '.join(sorted(SUPPORTED_VERSIONS))})")
    backup_id, parent_id = meta.get("backup_id"), meta.get("parent_id")
    if not isinstance(backup_id, str) or not _UUID_RE.fullmatch(backup_id):
        raise bad(f"backup_id {backup_id!r}")
    if parent_id is not None and (not isinstance(parent_id, str)
                                  or not _UUID_RE.fullmatch(parent_id)):
        raise bad(f"parent_id {parent_id!r}")
    entries = meta.get("objects")
    if not isinstance(entries, list):
        raise bad("no object list")
    objects = []
    for entry in entries:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise bad(f"object entry {entry!r}")
        ((oname, info),) = entry.items()
        # A backup reads (and deletes) only objects under its own prefix, whatever its
        # metadata says: a crafted _metadata must not reach other backups' objects.
        if not isinstance(oname, str) or not oname.startswith(prefix) or oname == prefix:
            raise bad(f"object {oname!r} is not named under the backup's prefix")
        if not isinstance(info, dict):
            raise bad(f"object {oname}: {info!r}")
        off, length, md5 = info.get("offset"), info.get("length"), info.get("md5")
        comp = _CODECS.get(str(info.get("compression")).lower())
        if info.get("compression") is None:
            comp = "none"  # early Cinder releases wrote null for uncompressed objects
        if (not isinstance(off, int) or isinstance(off, bool) or off < 0
                or not isinstance(length, int) or isinstance(length, bool) or length <= 0):
            raise bad(f"object {oname}: offset {off!r}, length {length!r}")
        if not isinstance(md5, str) or not _MD5_RE.fullmatch(md5):
            raise bad(f"object {oname}: md5 {md5!r}")
        if comp is None:
            raise FormatError(f"{name}: object {oname} is compressed with "
                              f"{info.get('compression')!r}, which blockvault cannot read")
        objects.append(CinderObject(oname, off, length, comp, md5))
    objects.sort(key=lambda o: o.offset)
    for a, b in zip(objects, objects[1:], strict=False):
        if b.offset < a.offset + a.length:
            raise bad(f"objects {a.name} and {b.name} overlap")
    return CinderBackup(
        id=backup_id, prefix=prefix, directory=directory, container=cinder_container,
        parent_id=parent_id, volume_id=str(meta.get("volume_id") or ""),
        created_at=str(meta.get("created_at") or ""), name=meta.get("backup_name"),
        description=meta.get("backup_description"), volume_meta=meta.get("volume_meta"),
        version=version, objects=tuple(objects),
    )


def discover(container: Container, *, nested: bool = False,
             on_problem: Callable[[str, str], None] | None = None) -> list[CinderBackup]:
    """Every Cinder backup in ``container``, found from its ``_metadata`` objects alone, in
    chain order: a backup comes after its parent (when that is in the container), then by
    creation time. ``size`` is set from each chain's full backup (0 when it is missing).

    ``nested``: ``container`` is a whole ``backup_posix_path`` (:func:`posix_tree`), the
    directory part of a name is Cinder's container. A ``_metadata`` object that cannot be
    read as one is passed to ``on_problem(name, reason)`` and skipped."""
    found: dict[str, CinderBackup] = {}
    for name in sorted(container.list("")):
        if not name.endswith(METADATA_SUFFIX):
            continue
        base = name[: -len(METADATA_SUFFIX)]
        directory, prefix = "", base
        if nested and "/" in base:
            directory, prefix = base.rsplit("/", 1)
            directory += "/"
        try:
            b = read_backup(container, prefix, directory)
        except (DataError, FormatError) as e:
            if on_problem is not None:
                on_problem(name, str(e))
            continue
        if b.id in found:
            if on_problem is not None:
                on_problem(name, f"backup {b.id} is also described by "
                                 f"{found[b.id].metadata_name}; this one is skipped")
            continue
        found[b.id] = b
    return _chain_order(found)


def _chain_order(found: Mapping[str, CinderBackup]) -> list[CinderBackup]:
    children: dict[str | None, list[CinderBackup]] = {}
    for b in found.values():
        root_key = b.parent_id if b.parent_id in found else None
        children.setdefault(root_key, []).append(b)
    out: list[CinderBackup] = []
    stack = sorted(children.get(None, []), key=lambda b: (b.created_at, b.id), reverse=True)
    sizes: dict[str, int] = {}
    while stack:
        b = stack.pop()
        if b.parent_id is None:
            size = math.ceil(b.end / GIB) if b.objects else 0
        else:
            size = sizes.get(b.parent_id, 0)
        sizes[b.id] = size
        out.append(_with_size(b, size))
        stack.extend(sorted(children.get(b.id, []), key=lambda c: (c.created_at, c.id),
                            reverse=True))
    # a cycle of parent links (only crafted metadata has one) leaves its members unvisited
    seen = {b.id for b in out}
    out.extend(_with_size(b, 0) for b in found.values() if b.id not in seen)
    return out


def _with_size(b: CinderBackup, size: int) -> CinderBackup:
    return b if b.size == size else replace(b, size=size)


def find_backup(container: Container, backup_id: str, *, volume_id: str = "",
                directory: str = "", nested: bool = False) -> CinderBackup | None:
    """The backup ``backup_id`` (a parent, known by id only), from object names alone:
    every prefix Cinder makes ends in ``backup_<id>``. Looks in ``directory`` (the child's
    container) under the volume's names and, when ``nested``, in Cinder's default container
    of that id (``ab/cd/<id>/``); ``None`` if it is in neither."""
    if not _UUID_RE.fullmatch(backup_id):
        raise ValueError(f"invalid backup id {backup_id!r}")
    suffix = f"backup_{backup_id}{METADATA_SUFFIX}"
    places = [(directory, f"{directory}volume_{volume_id}" if volume_id else directory)]
    if nested:
        d = f"{backup_id[0:2]}/{backup_id[2:4]}/{backup_id}/"
        places.append((d, d))
    for d, listing in places:
        for name in container.list(listing):
            rest = name[len(d):]
            # in a posix tree a name's directory is its container: prefixes have no "/"
            if name.endswith(suffix) and not (nested and "/" in rest):
                return read_backup(container, rest[: -len(METADATA_SUFFIX)], d)
    return None


def chain_of(container: Container, backup: CinderBackup,
             known: Mapping[str, CinderBackup] | None = None, *,
             nested: bool = False) -> list[CinderBackup]:
    """``backup`` and its ancestors, the full backup first. Parents are taken from
    ``known`` (by id) or found with :func:`find_backup`; a missing one is a
    :class:`MissingObject` naming it."""
    chain = [backup]
    seen = {backup.id}
    while chain[-1].parent_id:
        child = chain[-1]
        pid = child.parent_id
        parent = (known or {}).get(pid) or find_backup(
            container, pid, volume_id=child.volume_id, directory=child.directory,
            nested=nested)
        if parent is None:
            raise MissingObject(
                f"backup {child.id} is an incremental whose parent backup {pid} is "
                f"missing: no {pid} _metadata object in container {container.name}",
                f"backup_{pid}{METADATA_SUFFIX}")
        if parent.id in seen:
            raise FormatError(f"the parent links of backup {backup.id} form a cycle")
        seen.add(parent.id)
        chain.append(parent)
    chain.reverse()
    return chain


# -- the _sha256file, streamed -------------------------------------------------------------

class _Sha256File:
    """The hashes of a ``_sha256file`` as they stream in; ``chunk_size`` once opened.

    Cinder writes ``json.dumps(..., sort_keys=True)``, so ``chunk_size`` comes before the
    list. The text outside the list is kept (it is small) and parsed as JSON with the list
    emptied, so the file as a whole is still checked to be what Cinder writes."""

    def __init__(self, container: Container, name: str) -> None:
        self.container, self.name = container, name
        self._off = 0
        self._buf = b""
        self._outside = b""
        self._state = "before"
        self.count = 0
        while self._state == "before":
            if not self._fill():
                raise self._bad("no sha256s list")
        m = re.search(rb'"chunk_size"\s*:\s*(\d+)', self._outside)
        if not m:
            raise self._bad("no chunk_size before the sha256s list")
        self.chunk_size = int(m.group(1))
        if self.chunk_size <= 0:
            raise self._bad(f"chunk_size {self.chunk_size}")

    def _bad(self, why: str) -> DataError:
        return DataError(f"object {self.name} is corrupt: {why}", self.name)

    def _fill(self) -> bool:
        piece = _get(self.container, self.name, self._off, _READ_SIZE)
        if not piece:
            return False
        self._off += len(piece)
        self._buf += piece
        if self._state == "before":
            m = _LIST_RE.search(self._buf)
            if m:
                self._outside += self._buf[: m.end()]
                self._buf = self._buf[m.end():]
                self._state = "list"
            else:  # keep a tail that may hold the start of the key
                cut = max(0, len(self._buf) - 64)
                self._outside += self._buf[:cut]
                self._buf = self._buf[cut:]
                if len(self._outside) > 1 << 20:
                    raise self._bad("no sha256s list in its first MiB")
        return True

    def hashes(self) -> Iterator[bytes]:
        """Each block's SHA-256 (32 raw bytes), in volume order."""
        while True:
            pos = 0
            for m in _SHA_RE.finditer(self._buf):
                if self._buf[pos:m.start()].strip(b" \t\r\n,") != b"":
                    raise self._bad(f"unexpected text in the sha256s list near hash "
                                    f"{self.count}")
                pos = m.end()
                self.count += 1
                yield bytes.fromhex(m.group(1).decode())
            rest = self._buf[pos:]
            end = rest.find(b"]")
            if end >= 0:
                if rest[:end].strip(b" \t\r\n,") != b"":
                    raise self._bad(f"unexpected text in the sha256s list near hash "
                                    f"{self.count}")
                self._outside += b"]" + rest[end + 1:]
                self._buf = b""
                self._state = "after"
                while self._fill_after():
                    pass
                self._check_outside()
                return
            self._buf = rest
            if len(self._buf) > 4096:
                raise self._bad(f"unexpected text in the sha256s list near hash {self.count}")
            if not self._fill():
                raise self._bad("the sha256s list is cut short")

    def _fill_after(self) -> bool:
        piece = _get(self.container, self.name, self._off, _READ_SIZE)
        self._off += len(piece)
        self._outside += piece
        if len(self._outside) > 1 << 20:
            raise self._bad("more than a MiB of text after the sha256s list")
        return bool(piece)

    def _check_outside(self) -> None:
        try:
            doc = json.loads(self._outside)
        except ValueError as e:
            raise self._bad(f"not JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("sha256s") != []:
            raise self._bad("not Cinder's sha256 file")


# -- data objects, streamed ----------------------------------------------------------------

class _ObjectStream:
    """One data object, read once front to back in range GETs and decompressed as it
    goes; every byte passes through its md5, checked by :meth:`finish`."""

    def __init__(self, container: Container, backup: CinderBackup, obj: CinderObject) -> None:
        self.obj = obj
        self.name = backup.store_name(obj.name)
        self.container = container
        self.pos = 0  # uncompressed bytes handed out or skipped
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._raw_off = 0
        self._raw_eof = False
        self._pending = b""  # decompressed, not yet handed out
        self._fetches = 0
        codec = self._codec = obj.compression
        self._zstd = None
        self._dec: Any = None
        if codec == "zlib":
            self._dec = zlib.decompressobj()
        elif codec == "bz2":
            self._dec = bz2.BZ2Decompressor()
        elif codec == "zstd":
            self._zstd = zstandard.ZstdDecompressor().stream_reader(
                _RawReader(self), read_size=_READ_SIZE, closefd=False)

    def corrupt(self, why: str) -> DataError:
        return DataError(f"object {self.name} is corrupt: {why}", self.name)

    def _fetch(self) -> bytes:
        if self._raw_eof:
            return b""
        piece = _get(self.container, self.name, self._raw_off, _READ_SIZE)
        if self._fetches == 0 and not piece:
            # an empty object: no Cinder object is empty (length > 0 before compression)
            raise self.corrupt("it is empty")
        self._fetches += 1
        self._raw_off += len(piece)
        if len(piece) < _READ_SIZE:
            self._raw_eof = True
        return piece

    def _more(self, want: int) -> bytes:
        """Up to ``want`` more uncompressed bytes (b"" at the end of the data)."""
        try:
            if self._zstd is not None:
                return self._zstd.read(want)
            if self._dec is None:
                return self._fetch()
            if self._codec == "zlib":
                while True:
                    if self._dec.unconsumed_tail:
                        out = self._dec.decompress(self._dec.unconsumed_tail, want)
                    elif self._dec.eof:
                        return b""
                    else:
                        raw = self._fetch()
                        if not raw:
                            return self._dec.flush()
                        out = self._dec.decompress(raw, want)
                    if out:
                        return out
            while True:  # bz2
                if self._dec.eof:
                    return b""
                raw = self._fetch() if self._dec.needs_input else b""
                if not raw and self._dec.needs_input:
                    raise self.corrupt("its bz2 stream is cut short")
                out = self._dec.decompress(raw, want)
                if out:
                    return out
        except (zlib.error, OSError, EOFError, zstandard.ZstdError) as e:
            if isinstance(e, DataError):
                raise
            raise self.corrupt(f"cannot {self.obj.compression}-decompress it ({e})") from None

    def read(self, n: int) -> bytes:
        """The next ``n`` uncompressed bytes, exactly."""
        parts = []
        have = 0
        if self._pending:
            take = self._pending[:n]
            self._pending = self._pending[n:]
            parts.append(take)
            have = len(take)
        while have < n:
            out = self._more(max(n - have, 65536))
            if not out:
                raise self.corrupt(f"it holds {self.pos + have} bytes, its metadata "
                                   f"says {self.obj.length}")
            if len(out) > n - have:
                self._pending = out[n - have:]
                out = out[: n - have]
            parts.append(out)
            have += len(out)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pos += n
        if self.pos > self.obj.length:
            raise self.corrupt(f"it holds more than the {self.obj.length} bytes its "
                               "metadata says")
        self._md5.update(data)
        return data

    def skip_to(self, pos: int) -> None:
        while self.pos < pos:
            self.read(min(pos - self.pos, _READ_SIZE))

    def finish(self) -> None:
        """Read what is left, then check the length and the md5 Cinder recorded."""
        self.skip_to(self.obj.length)
        while True:  # nothing may follow the recorded length
            extra = self._pending or self._more(65536)
            self._pending = b""
            if not extra:
                break
            raise self.corrupt(f"it holds more than the {self.obj.length} bytes its "
                               "metadata says")
        if self._md5.hexdigest() != self.obj.md5:
            raise self.corrupt(f"md5 {self._md5.hexdigest()} of its data, "
                               f"{self.obj.md5} in the backup's metadata")


class _RawReader:
    """The stored bytes of an object as a file for zstandard's stream reader."""

    def __init__(self, stream: _ObjectStream) -> None:
        self.stream = stream

    def read(self, n: int = -1) -> bytes:
        return self.stream._fetch()

    def close(self) -> None:
        pass


# -- composing a chain ---------------------------------------------------------------------

@dataclass
class _Piece:
    start: int
    end: int
    backup: CinderBackup
    obj: CinderObject


def _plan(chain: list[CinderBackup]) -> tuple[list[_Piece], int]:
    """The volume as pieces of objects, in volume order: for every byte, the object of the
    newest backup of ``chain`` (full first) that holds it. Checks that the chain is linked
    and covers the volume from 0 without a gap."""
    if not chain:
        raise ValueError("an empty chain")
    if chain[0].parent_id is not None:
        raise MissingObject(
            f"backup {chain[0].id} is an incremental whose parent backup "
            f"{chain[0].parent_id} is missing", f"backup_{chain[0].parent_id}{METADATA_SUFFIX}")
    for parent, child in zip(chain, chain[1:], strict=False):
        if child.parent_id != parent.id:
            raise ValueError(f"backup {child.id}'s parent is {child.parent_id}, "
                             f"not {parent.id}: not a chain")
    items = [(o.offset, o.offset + o.length, gen, b, o)
             for gen, b in enumerate(chain) for o in b.objects]
    end = max((it[1] for it in items), default=0)
    if end == 0:
        raise DataError(f"backup {chain[0].id} holds no data objects",
                        chain[0].metadata_name)
    bounds = sorted({it[0] for it in items} | {it[1] for it in items})
    items.sort(key=lambda it: it[0])
    active: list[tuple[int, int, int]] = []  # (-gen, end, index in items)
    pieces: list[_Piece] = []
    i = 0
    for a, b in zip(bounds, bounds[1:], strict=False):
        while i < len(items) and items[i][0] <= a:
            heapq.heappush(active, (-items[i][2], items[i][1], i))
            i += 1
        while active and active[0][1] <= a:
            heapq.heappop(active)
        if not active:
            raise DataError(
                f"the objects of backups {', '.join(x.id for x in chain)} hold no data for "
                f"volume bytes {a}..{b}: the chain is incomplete", chain[0].metadata_name)
        _, _, idx = active[0]
        _, _, _, backup, obj = items[idx]
        if pieces and pieces[-1].obj is obj and pieces[-1].end == a:
            pieces[-1].end = b
        else:
            pieces.append(_Piece(a, b, backup, obj))
    return pieces, end


class _Composer:
    """Runs a plan: streams the objects, assembles windows of the volume, checks each block
    against the newest backup's ``_sha256file`` and hands checked windows to ``emit``."""

    def __init__(self, container: Container, chain: list[CinderBackup]) -> None:
        self.container, self.chain = container, chain
        self.pieces, self.end = _plan(chain)
        newest = chain[-1]
        self.sha = _Sha256File(container, newest.sha256_name)
        self.bs = self.sha.chunk_size
        self.blocks = -(-self.end // self.bs)
        self.objects_read: list[str] = []

    def run(self, emit: Callable[[int, memoryview], None],
            cancelled: Callable[[], bool] | None = None,
            report: Callable[[int], None] | None = None) -> None:
        bs, end = self.bs, self.end
        window = max(bs, _WINDOW // bs * bs)
        last_piece: dict[int, int] = {}
        for n, p in enumerate(self.pieces):
            last_piece[id(p.obj)] = n
        streams: dict[int, _ObjectStream] = {}
        hashes = self.sha.hashes()
        buf = bytearray(window)
        pos = 0
        pi = 0
        while pos < end:
            if cancelled is not None and cancelled():
                raise Cancelled("restore of Cinder backup "
                                f"{self.chain[-1].id} cancelled")
            wend = min(end, pos + window)
            fill = pos
            while fill < wend:
                p = self.pieces[pi]
                s = streams.get(id(p.obj))
                if s is None:
                    s = streams[id(p.obj)] = _ObjectStream(self.container, p.backup, p.obj)
                    self.objects_read.append(s.name)
                take = min(p.end, wend) - fill
                s.skip_to(fill - p.obj.offset)
                buf[fill - pos: fill - pos + take] = s.read(take)
                fill += take
                if fill == p.end:
                    if last_piece[id(p.obj)] == pi:
                        s.finish()
                        del streams[id(p.obj)]
                    pi += 1
            view = memoryview(buf)[: wend - pos]
            for off in range(0, wend - pos, bs):
                want = next(hashes, None)
                block_no = (pos + off) // bs
                if want is None:
                    raise DataError(
                        f"object {self.sha.name} is corrupt: it holds {block_no} block "
                        f"hashes, the backup's objects hold {self.blocks} blocks",
                        self.sha.name)
                got = hashlib.sha256(view[off: off + bs]).digest()
                if got != want:
                    raise self._block_error(block_no, streams)
            emit(pos, view)
            pos = wend
            if report is not None:
                report(pos)
        if next(hashes, None) is not None:
            raise DataError(f"object {self.sha.name} is corrupt: it holds more block "
                            f"hashes than the {self.blocks} blocks of the backup's objects",
                            self.sha.name)

    def _block_error(self, block_no: int, streams: dict[int, _ObjectStream]) -> DataError:
        """The error for a block whose SHA-256 differs: the object it came from if that
        object's md5 fails (read to its end to know), else the hash file."""
        a, b = block_no * self.bs, min(self.end, (block_no + 1) * self.bs)
        covering = [p for p in self.pieces if p.start < b and p.end > a]
        for p in covering:
            s = streams.pop(id(p.obj), None)
            if s is not None:  # else finished already: its md5 matched
                try:
                    s.finish()
                except DataError as e:
                    return e
        names = " and ".join(p.backup.store_name(p.obj.name) for p in covering)
        return DataError(
            f"object {self.sha.name} is corrupt: volume block {block_no} (bytes {a}..{b}) "
            f"does not match its SHA-256 there, although object {names} matches its md5",
            self.sha.name)


def restore_chain(container: Container, chain: list[CinderBackup], target: Target, *,
                  target_is_new: bool = True, size: int | None = None,
                  progress: Progress | None = None,
                  cancelled: Callable[[], bool] | None = None) -> list[str]:
    """Restore the newest backup of ``chain`` (full backup first, as :func:`chain_of`
    returns) onto ``target`` in one pass, and return the names of the objects read (each
    once, in the order first read).

    ``size``: bytes the target is opened with (the volume's, ``size`` GiB; default: what the
    objects hold). On a target that is not new, all-zero blocks and the bytes past the
    data up to ``size`` are zeroed; on a new one they are left as the holes they are."""
    comp = _Composer(container, chain)
    size = comp.end if size is None else size
    if size < comp.end:
        raise ValueError(f"the target's {size} bytes cannot hold the backup's {comp.end}")
    report = Throttle(progress, size, "restore")
    bs = comp.bs
    zeros = bytes(bs)

    def is_zero(view: memoryview) -> bool:
        return view == zeros[: len(view)]  # a memcmp, not a loop over bytes

    def emit(offset: int, view: memoryview) -> None:
        # runs of zero and non-zero blocks: zero ones are holes on a new target
        n = len(view)
        i = 0
        while i < n:
            j = i
            zero = is_zero(view[i: i + bs])
            while j < n and is_zero(view[j: j + bs]) == zero:
                j = min(n, j + bs)
            if not zero:
                target.write([view[i:j]], offset + i)
            elif not target_is_new:
                target.zero(offset + i, j - i)
            i = j

    target.open(size)
    try:
        comp.run(emit, cancelled, report)
        if size > comp.end and not target_is_new:
            target.zero(comp.end, size - comp.end)
        target.flush()
        report(size, force=True)
    finally:
        target.close()
    return comp.objects_read


def verify_chain(container: Container, chain: list[CinderBackup]) -> VerifyReport:
    """Check every object of ``chain`` (md5 of its data) and every block of the volume the
    chain composes (SHA-256 against the newest ``_sha256file``), writing nothing."""
    rep = VerifyReport()
    missing: set[str] = set()
    corrupt: set[str] = set()

    def check_object(b: CinderBackup, o: CinderObject) -> None:
        s = _ObjectStream(container, b, o)
        try:
            s.finish()
        except MissingObject as e:
            missing.add(e.object_name)
        except DataError as e:
            corrupt.add(e.object_name)

    for b in chain:
        for name in (b.metadata_name, b.sha256_name):
            if container.head(name) is None:
                missing.add(name)
    try:
        comp = _Composer(container, chain)
    except MissingObject as e:
        missing.add(e.object_name)
        comp = None
    except DataError as e:
        corrupt.add(e.object_name)
        comp = None
    used = {id(p.obj) for p in comp.pieces} if comp is not None else set()
    for b in chain:  # objects newer ones replaced whole: the composed pass never reads them
        for o in b.objects:
            if id(o) not in used:
                check_object(b, o)
    if comp is not None:
        try:
            comp.run(lambda _off, _view: None)
            rep.checked_blocks = comp.blocks
        except DataError as e:
            # the pass stops at the first fault: name every bad object, not only that one
            for b in chain:
                for o in b.objects:
                    if id(o) in used:
                        check_object(b, o)
            if isinstance(e, MissingObject):
                missing.add(e.object_name)
            elif not (missing | corrupt) & {p.backup.store_name(p.obj.name)
                                            for p in comp.pieces}:
                corrupt.add(e.object_name)  # the hash file, or what only it shows
    rep.missing = sorted(missing)
    rep.corrupt = sorted(corrupt - missing)
    return rep


def delete_backup(container: Container, backup: CinderBackup) -> int:
    """Delete the backup's objects as Cinder does (every object named under its prefix) and
    return how many there were. Its ``_metadata`` goes last, so a delete cut short leaves a
    backup that is still found, and deleted again, rather than nameless objects."""
    names = sorted(container.list(backup.store_name(backup.prefix)))
    meta = backup.metadata_name
    for name in names:
        if name != meta:
            container.delete(name)
    container.delete(meta)
    return len(names)
