"""The ``nbd`` volume driver: any NBD export (qemu-nbd, qemu-storage-daemon, libvirt's
backup pull mode, nbdkit) named by an NBD URI (``nbd://host[:port]/export``,
``nbd+unix:///export?socket=/path``), read and written with libnbd.

Allocation comes from the ``base:allocation`` meta context (extents that read as zeros are
skipped), changed blocks from a ``qemu:dirty-bitmap:NAME`` meta context. The bitmap is
named in the manage request's ``ref`` (``"bitmap": "b0"``) and can be changed later through
the volume's metadata key ``bitmap`` (the metadata wins).

The bitmap contract (docs/volumes.md, "Running VMs (NBD)"): *the bitmap covers every write
since the parent backup was taken*. blockvault never clears or rotates a bitmap (NBD gives
no way to; that is the hypervisor's job, as libvirt's and oVirt's checkpoints do it). It
trusts a bitmap for an incremental only when all of these hold, and otherwise reads the
whole export (allocated extents only) and logs why:

- the parent is the last backup of this volume that blockvault recorded, and that backup
  read the export while it exposed the *same* bitmap name (kept in a small state file per
  volume under ``<data_dir>/nbd``); so a bitmap added, renamed or re-pointed through the
  metadata after the parent is not trusted until a full read has been taken with it;
- the export exposes the bitmap now (a missing or not-exported bitmap is a full read);
- the export's size is the parent's.

A bitmap that was never cleared (a persistent qcow2 bitmap left alone) covers more than
needed: correct, only larger. A bitmap that someone deleted and re-created under the same
name after the parent cannot be told apart over NBD: change the ``bitmap`` key then.

libnbd's Python binding is Debian's ``python3-libnbd`` (the ``nbd`` module), built for the
system's Python 3. When ``import nbd`` fails in the service's interpreter,
:func:`load_libnbd` loads exactly that module and its extension from Debian's
dist-packages if their ABI tag matches this interpreter (CPython 3.11 for 3.11.x) — no other
Debian package leaks into the interpreter's path.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from blockvault.directio import AlignedBuffer
from blockvault.engine.errors import TargetError
from blockvault.volume.backends import (
    BackupSource,
    Disk,
    GiB,
    InvalidReference,
    Managed,
    Parent,
    RestoreTarget,
    SourceError,
    VolumeDriver,
)

log = logging.getLogger(__name__)

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
_DIST_PACKAGES = ("/usr/lib/python3/dist-packages",)
_BASE = "base:allocation"
_BITMAP_PREFIX = "qemu:dirty-bitmap:"
_STATUS_SPAN = 1 << 30  # one block status request (the protocol's lengths are 32-bit)
_IO_MAX = 4 * 1024 * 1024  # one read or write request (qemu serves up to 32 MiB)
_STATE_HOLE, _STATE_ZERO, _STATE_DIRTY = 1, 2, 1
#: Connections of their own for reads, when the export allows several (multi-conn). libnbd
#: runs one handle's synchronous calls one at a time, so the engine's reader threads
#: sharing a handle read one after the other (22 MiB of a dirty bitmap's extents: 32 ms on
#: one handle, 21 ms on two, whatever the threads), and the allocation and bitmap queries
#: waited behind them. nbdcopy opens several connections on the same condition.
_READ_CONNS = 2
#: How long an extra connection may take: a server that advertises multi-conn but has
#: reached its client limit (``qemu-nbd --shared N``) leaves the handshake unanswered.
_CONNECT_WAIT = 2.0

_nbd: ModuleType | None = None
_nbd_mu = threading.Lock()


def load_libnbd() -> ModuleType:
    """The ``nbd`` module (libnbd's Python binding); ImportError saying what to install."""
    global _nbd
    with _nbd_mu:
        if _nbd is not None:
            return _nbd
        try:
            import nbd  # type: ignore[import-not-found]
        except ImportError:
            nbd = None
        if not hasattr(nbd, "NBD"):  # missing, or another module named nbd came first
            nbd = _load_from_dist_packages()
        _nbd = nbd
        return nbd


def _load_from_dist_packages() -> ModuleType:
    for d in _DIST_PACKAGES:
        py = Path(d) / "nbd.py"
        ext = next((Path(d) / f"libnbdmod{s}" for s in importlib.machinery.EXTENSION_SUFFIXES
                    if (Path(d) / f"libnbdmod{s}").exists()), None)
        if not py.exists() or ext is None:
            continue
        # The extension first (nbd.py imports it by name), each from its own file only.
        spec = importlib.util.spec_from_file_location("libnbdmod", ext)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["libnbdmod"] = mod
        spec = importlib.util.spec_from_file_location("nbd", py)
        assert spec is not None and spec.loader is not None
        nbd = importlib.util.module_from_spec(spec)
        sys.modules["nbd"] = nbd
        try:
            spec.loader.exec_module(nbd)
        except BaseException:
            sys.modules.pop("nbd", None)
            raise
        return nbd
    raise ImportError("libnbd's Python binding is missing: install Debian's python3-libnbd "
                      f"(built for this Python's ABI, {sys.implementation.cache_tag})")


def check_uri(uri: Any) -> str:
    """An NBD URI as given, or InvalidReference saying what is wrong with it."""
    if not isinstance(uri, str) or not uri:
        raise InvalidReference("ref source-name must be an NBD URI (nbd://HOST[:PORT]/EXPORT "
                               "or nbd+unix:///EXPORT?socket=PATH).")
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise InvalidReference(f"{uri} is not an NBD URI (schemes: {', '.join(SCHEMES)}).")
    if parts.scheme.endswith("+unix") and "socket=" not in parts.query:
        raise InvalidReference(f"{uri} names no socket (nbd+unix:///EXPORT?socket=PATH).")
    if not parts.scheme.endswith("+unix") and not parts.hostname:
        raise InvalidReference(f"{uri} names no host.")
    return uri


def _why(e: BaseException) -> str:
    return getattr(e, "string", None) or str(e) or type(e).__name__


def _close_handle(h: Any) -> None:
    try:
        h.shutdown()
    except Exception:  # the server may be gone: nothing left to say goodbye to
        pass
    close = getattr(h, "close", None)  # libnbd >= 1.16; older ones close on del
    if close is not None:
        close()


def _connect_within(uri: str, seconds: float) -> Any:
    """A plain libnbd handle connected to ``uri``, or OSError when the server has not
    finished the handshake within ``seconds``."""
    h = load_libnbd().NBD()
    try:
        h.aio_connect_uri(uri)
        deadline = time.monotonic() + seconds
        while not h.aio_is_ready():
            left = deadline - time.monotonic()
            if h.aio_is_dead() or h.aio_is_closed():
                raise OSError("the server closed the connection")
            if left <= 0:
                raise OSError(f"no handshake within {seconds:g} s")
            h.poll(max(1, int(left * 1000)))
        return h
    except BaseException:
        _close_handle(h)
        raise


class _Conn:
    """One libnbd handle with the meta contexts we ask for. libnbd handles are
    thread-safe, one call at a time: the engine's reader threads share it only where the
    export allows no second connection (NbdSource._read_handle)."""

    def __init__(self, uri: str, bitmap: str | None, writable: bool = False) -> None:
        nbd = load_libnbd()
        self.uri = uri
        self.h = nbd.NBD()
        try:
            self.h.add_meta_context(_BASE)
            if bitmap:
                self.h.add_meta_context(_BITMAP_PREFIX + bitmap)
            self.h.connect_uri(uri)
            self.size = self.h.get_size()
            self.allocation = bool(self.h.can_meta_context(_BASE))
            self.bitmap = bool(bitmap) and bool(self.h.can_meta_context(_BITMAP_PREFIX + bitmap))
            self.read_only = bool(self.h.is_read_only())
            self.multi_conn = bool(self.h.can_multi_conn())
        except BaseException:
            self.close()
            raise
        self.writable = writable

    def close(self) -> None:
        h, self.h = self.h, None
        if h is not None:
            _close_handle(h)

    def status(self, context: str, start: int, stop: int,
               want: Any) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` extents of [start, stop) whose ``context`` flags satisfy
        ``want(flags)``, merged, in order."""
        pos = start
        cur: list[int] | None = None
        while pos < stop:
            got: list[tuple[int, int, int]] = []

            def cb(meta: str, off: int, entries: list[int], err: Any,
                   got: list[tuple[int, int, int]] = got) -> int:
                if meta == context:
                    o = off
                    for i in range(0, len(entries) - 1, 2):
                        got.append((o, entries[i], entries[i + 1]))
                        o += entries[i]
                return 0

            self.h.block_status(min(_STATUS_SPAN, stop - pos), pos, cb)
            before = pos
            for off, n, flags in got:
                a, b = max(off, pos), min(off + n, stop)
                if b <= a:
                    continue
                if want(flags):
                    if cur is not None and cur[1] == a:
                        cur[1] = b
                    else:
                        if cur is not None:
                            yield cur[0], cur[1]
                        cur = [a, b]
                pos = max(pos, b)
            if pos == before:  # never loop forever on a server that answers nothing new
                raise OSError(f"NBD export {self.uri} answered no block status at {pos}")
        if cur is not None:
            yield cur[0], cur[1]


class NbdSource:
    """An NBD export as an engine Source (blockvault.engine.source). ``bitmap`` is the
    dirty bitmap to ask for; ``trust_bitmap`` says whether it covers every write since the
    parent the backup names (the driver decides, see the module docstring)."""

    def __init__(self, uri: str, bitmap: str | None = None, trust_bitmap: bool = False,
                 name: str | None = None) -> None:
        self.uri = uri
        self.name = name or uri
        self.bitmap = bitmap
        self.trust_bitmap = trust_bitmap
        self.bytes_read = 0
        self.bitmap_seen = False  # the export exposed ``bitmap`` when this backup began
        self._conn: _Conn | None = None
        #: the allocation of one window of the export, ``(lo, hi, extents)``: an incremental
        #: asks for each changed extent's allocation, and one request per window instead of
        #: one per extent saves a round trip each (37 of them for a 1% rewrite of 2 GiB)
        self._alloc: tuple[int, int, list[tuple[int, int]]] | None = None
        self._mu = threading.Lock()
        #: reads' own connections (multi-conn), idle ones here; how many were opened
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._read_conns = 0
        #: connections opened for reads besides the main one (0: the export allows one)
        self.read_connections = 0

    def _fail(self, doing: str, e: BaseException) -> SourceError:
        return SourceError(self.name, f"NBD export {self.name} failed {doing}: {_why(e)}")

    def _c(self) -> _Conn:
        with self._mu:
            if self._conn is None:
                try:
                    self._conn = _Conn(self.uri, self.bitmap)
                except ImportError:
                    raise
                except Exception as e:
                    raise SourceError(self.name, f"NBD export {self.name} is unreachable: "
                                      f"{_why(e)}") from e
                self.bitmap_seen = self.bitmap_seen or self._conn.bitmap
            return self._conn

    def open(self, direct: bool) -> None:
        self._c()

    def close(self) -> None:
        """Close every connection. Called when no read is running (the engine closes a
        source after its reader threads have stopped)."""
        with self._mu:
            conn, self._conn = self._conn, None
            self._read_conns = 0
        while True:
            try:
                _close_handle(self._idle.get_nowait())
            except queue.Empty:
                break
        if conn is not None:
            conn.close()

    def _read_handle(self, c: _Conn) -> Any:
        """A handle for one read: one of the reads' own connections where the export
        allows several, else (or while all of them are busy) the main one."""
        if not c.multi_conn:
            return c.h
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._mu:
            opening = self._read_conns < _READ_CONNS
            if opening:
                self._read_conns += 1
        if not opening:
            return c.h
        try:
            h = _connect_within(self.uri, _CONNECT_WAIT)
            if h.get_size() != c.size:
                _close_handle(h)
                raise OSError("it shows another size")
            with self._mu:
                self.read_connections += 1
            return h
        except Exception as e:
            log.info("%s: reading on one connection: another one failed: %s", self.name,
                     _why(e))
            with self._mu:
                self._read_conns = _READ_CONNS  # no more attempts in this backup
            return c.h

    def length(self) -> int:
        return self._c().size

    def extents(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        c = self._c()
        if not c.allocation:
            yield start, stop
            return
        pos = start
        while pos < stop:
            lo, hi, window = self._allocation_window(c, pos)
            for a, b in window:
                a, b = max(a, pos), min(b, stop)
                if a < b:
                    yield a, b
            pos = min(stop, hi)

    def _allocation_window(self, c: _Conn, pos: int) -> tuple[int, int, list[tuple[int, int]]]:
        """The cached allocation window holding ``pos``, fetched (one block status request
        of up to ``_STATUS_SPAN``) when the cache does not hold it."""
        w = self._alloc
        if w is None or not w[0] <= pos < w[1]:
            hi = min(c.size, pos + _STATUS_SPAN)
            try:
                w = (pos, hi, list(c.status(_BASE, pos, hi, lambda f: not f & _STATE_ZERO)))
            except Exception as e:
                raise self._fail(f"reading its allocation at {pos}", e) from e
            self._alloc = w
        return w

    def read_into(self, buf: AlignedBuffer, offset: int, length: int,
                  limit: int) -> memoryview:
        mv = buf.view[:length]
        want = max(0, min(length, limit - offset))
        c = self._c()
        h = self._read_handle(c)
        got = 0
        try:
            while got < want:
                n = min(_IO_MAX, want - got)
                mv[got : got + n] = h.pread(n, offset + got)
                got += n
        except Exception as e:
            raise self._fail(f"reading at offset {offset + got}", e) from e
        finally:
            if h is not c.h:
                self._idle.put(h)
        if got < length:
            mv[got:] = bytes(length - got)
        self.bytes_read += want
        return mv

    def changed_extents(self) -> Sequence[tuple[int, int]] | None:
        if not self.bitmap:
            log.info("%s: no dirty bitmap configured; reading all allocated data", self.name)
            return None
        c = self._c()
        if not self.trust_bitmap:
            log.info("%s: bitmap %s is not known to cover every write since the parent "
                     "backup (first backup with it, or it changed); reading all allocated "
                     "data", self.name, self.bitmap)
            return None
        if not c.bitmap:
            log.warning("%s: the export does not expose dirty bitmap %s (missing, or not "
                        "exported); reading all allocated data", self.name, self.bitmap)
            return None
        try:
            ctx = _BITMAP_PREFIX + self.bitmap
            dirty = [(a, b - a) for a, b in c.status(ctx, 0, c.size,
                                                     lambda f: f & _STATE_DIRTY)]
        except Exception as e:
            raise self._fail(f"reading dirty bitmap {self.bitmap}", e) from e
        log.info("%s: incremental from dirty bitmap %s: %d extents, %d bytes", self.name,
                 self.bitmap, len(dirty), sum(n for _, n in dirty))
        return dirty


class NbdTarget:
    """An NBD export as an engine restore Target (blockvault.engine.restorer)."""

    def __init__(self, uri: str, name: str | None = None) -> None:
        self.uri = uri
        self.name = name or uri
        self._conn: _Conn | None = None

    def _err(self, doing: str, e: BaseException) -> TargetError:
        return TargetError(f"restore target {self.name} (NBD) failed {doing}: {_why(e)}",
                           self.name, getattr(e, "errno", None))

    def open(self, size: int) -> None:
        try:
            self._conn = _Conn(self.uri, None, writable=True)
        except ImportError:
            raise
        except Exception as e:
            raise self._err("connecting", e) from e
        if self._conn.read_only:
            raise TargetError(f"restore target {self.name} (NBD) is read-only", self.name)
        if self._conn.size < size:
            raise TargetError(f"restore target {self.name} (NBD) holds {self._conn.size} "
                              f"bytes, the backup {size}", self.name)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def write(self, bufs: list, offset: int) -> None:
        assert self._conn is not None
        h = self._conn.h
        data = memoryview(b"".join(bufs))
        pos = 0
        try:
            while pos < len(data):
                n = min(_IO_MAX, len(data) - pos)
                h.pwrite(bytes(data[pos : pos + n]), offset + pos)
                pos += n
        except Exception as e:
            raise self._err(f"at offset {offset + pos}", e) from e

    def zero(self, offset: int, length: int) -> None:
        assert self._conn is not None
        h = self._conn.h
        end = offset + length
        try:
            if h.can_zero():
                while offset < end:
                    n = min(_STATUS_SPAN, end - offset)
                    h.zero(n, offset)
                    offset += n
                return
            zeros = bytes(_IO_MAX)
            while offset < end:
                n = min(_IO_MAX, end - offset)
                h.pwrite(zeros[:n], offset)
                offset += n
        except Exception as e:
            raise self._err(f"zeroing at offset {offset}", e) from e

    def flush(self) -> None:
        assert self._conn is not None
        try:
            if self._conn.h.can_flush():
                self._conn.h.flush()
        except Exception as e:
            raise self._err("flushing", e) from e


def probe(uri: str, bitmap: str | None = None) -> tuple[int, bool]:
    """(size in bytes, whether ``bitmap`` is exposed) of an export; errors propagate."""
    c = _Conn(uri, bitmap)
    try:
        return c.size, c.bitmap
    finally:
        c.close()


class NbdDriver(VolumeDriver):
    """Volumes that are NBD exports. blockvault never owns them: deleting or unmanaging a
    volume leaves the export alone."""

    kind = "nbd"

    def __init__(self, name: str, options: dict[str, Any], *, data_dir: Path) -> None:
        super().__init__(name, options, data_dir=data_dir)
        self.unknown_options({"state_dir"})
        sd = self.options.get("state_dir")
        self.state_dir = Path(sd).expanduser() if sd else Path(data_dir) / "nbd" / name

    def capabilities(self) -> dict[str, Any]:
        return {"thin_provisioning_support": True, "changed_block_tracking": "dirty-bitmap"}

    @staticmethod
    def bitmap(disk: Disk) -> str | None:
        b = disk.metadata.get("bitmap") if disk.metadata else None
        if b is None:
            b = disk.info.get("bitmap")
        return str(b) if b else None

    def check_ref(self, ref: dict[str, Any], metadata: dict[str, str]) -> Managed:
        uri = check_uri(ref.get("source-name"))
        bitmap = metadata.get("bitmap") or ref.get("bitmap")
        if bitmap is not None and (not isinstance(bitmap, str) or not bitmap
                                   or len(bitmap) > 1023):
            raise InvalidReference("ref bitmap must be the name of a dirty bitmap.")
        try:
            size, seen = probe(uri, bitmap)
        except ImportError as e:
            raise InvalidReference(f"Backend {self.name} cannot reach NBD exports: {e}") from e
        except Exception as e:
            raise InvalidReference(f"NBD export {uri} is unreachable: {_why(e)}") from e
        if size % GiB:
            raise InvalidReference(f"NBD export {uri} holds {size} bytes, not a whole number "
                                   "of GiB (volumes are sized in GiB).")
        if size == 0:
            raise InvalidReference(f"NBD export {uri} is empty.")
        if bitmap and not seen:
            log.warning("NBD export %s does not expose bitmap %s now; backups read it whole "
                        "until it does", uri, bitmap)
        return Managed(location=uri, size=size, info={"bitmap": bitmap} if bitmap else {})

    # -- change tracking state ---------------------------------------------------------------
    def _state_path(self, disk: Disk) -> Path:
        return self.state_dir / f"{disk.volume_id}.json"

    def _state(self, disk: Disk) -> dict[str, Any]:
        try:
            doc = json.loads(self._state_path(disk).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _save_state(self, disk: Disk, doc: dict[str, Any] | None) -> None:
        p = self._state_path(disk)
        if doc is None:
            p.unlink(missing_ok=True)
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, p)

    def open_backup(self, disk: Disk, parent: Parent | None) -> BackupSource:
        uri = check_uri(disk.location)
        bitmap = self.bitmap(disk)
        st = self._state(disk)
        trust = (parent is not None and bitmap is not None and st.get("base") == parent.backup_id
                 and st.get("bitmap") == bitmap and st.get("uri") == uri)
        src = NbdSource(uri, bitmap, trust, name=uri)
        return _NbdBackup(self, disk, src)

    def open_restore(self, disk: Disk) -> RestoreTarget:
        uri = check_uri(disk.location)
        # The export's data is about to change behind any bitmap: next backup reads whole.
        self._save_state(disk, None)
        return _NbdRestore(NbdTarget(uri, name=uri), uri)

    def source_name(self, disk: Disk) -> str:
        return disk.location or disk.volume_id


class _NbdBackup(BackupSource):
    def __init__(self, driver: NbdDriver, disk: Disk, src: NbdSource) -> None:
        super().__init__(src, disk.size, src.name)
        self.driver, self.disk, self.src = driver, disk, src

    def finish(self) -> None:
        try:
            size, _ = probe(self.src.uri)
        except Exception as e:
            raise SourceError(self.src.name, f"NBD export {self.src.name} went away during "
                              f"the backup: {_why(e)}") from e
        if size != self.disk.size:
            raise SourceError(self.src.name, f"NBD export {self.src.name} changed size during "
                              f"the backup ({size} bytes, the volume {self.disk.size})")

    def committed(self, backup_id: str) -> None:
        # From now on the bitmap is trusted relative to this backup, if it was there when
        # this backup read the export (a bitmap that appears later may have started later).
        self.driver._save_state(self.disk, {
            "base": backup_id, "uri": self.src.uri,
            "bitmap": self.src.bitmap if self.src.bitmap_seen else None})

    def close(self) -> None:
        self.src.close()


class _NbdRestore(RestoreTarget):
    def close(self) -> None:
        self.target.close()


__all__ = ["NbdDriver", "NbdSource", "NbdTarget", "check_uri", "load_libnbd", "probe"]
