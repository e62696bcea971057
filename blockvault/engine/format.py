"""Binary layouts of the storage format (see docs/format.md): packs, manifests, config."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from blockvault.engine.crypto import Crypto, SealError
from blockvault.engine.errors import DataError, FormatError, KeyMismatch, MissingObject
from blockvault.store import Container, ObjectNotFound

FORMAT_VERSION = 1  # records, and manifests of the container-wide dedup scope
#: Manifests of a backup deduplicated within a dedup scope (docs/format.md, "Dedup
#: scopes"): their header names the scope whose key made the block ids. A distinct
#: version so that engines from before scopes refuse them (FormatError) instead of
#: checking their blocks against the wrong ids and calling valid backups corrupt.
MANIFEST_VERSION_SCOPED = 2
MANIFEST_VERSIONS = (FORMAT_VERSION, MANIFEST_VERSION_SCOPED)
#: Version 2 containers hold version 2 packs (a random salt in each trailer, so no two
#: uploads ever make the same pack name) and the garbage collection objects under ``gc/``.
#: Version 1 containers are read as they are and upgraded on their first write.
CONFIG_VERSION = 2
CONFIG_VERSIONS = (1, 2)
PACK_VERSION = 2
PACK_VERSIONS = (1, 2)
PACK_SALT = 16

CODEC_NONE = 0
CODEC_ZSTD = 1
CODEC_LZ4 = 2  # LZ4 block format, no size header (the raw size is the block size)

CONFIG_NAME = "config"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_id(backup_id: str) -> None:
    """Backup ids name objects: refuse anything but one safe path component."""
    if not _ID_RE.fullmatch(backup_id):  # "$" alone passes a final "\n"
        raise ValueError(f"invalid backup id {backup_id!r}")


def pack_object(name_hex: str) -> str:
    return f"packs/{name_hex[:2]}/{name_hex}"


def manifest_object(backup_id: str) -> str:
    """The manifest a backup writes (its version 0)."""
    return f"manifests/{backup_id}"


# Later versions, written by repacking next to the first and never over it (docs/format.md,
# "Manifest versions"): "manifests/<id>@<generation>.<token>", and its commit, the same name
# with ".ok", put only once the version is known to name no pack a collection may delete.
# "@" never occurs in a backup id, so names parse back without ambiguity.
_VERSION_RE = re.compile(r"^manifests/(?P<id>[A-Za-z0-9][A-Za-z0-9._-]{0,199})"
                         r"(?:@(?P<gen>[0-9]{8})\.(?P<token>[0-9a-f]{16})(?P<ok>\.ok)?)?$")


@dataclass(frozen=True, order=True)
class ManifestVersion:
    """One version object of a backup's manifest; ordered oldest to newest."""

    generation: int
    token: str
    name: str

    @property
    def commit_name(self) -> str:
        return self.name + ".ok"


def version_object(backup_id: str, generation: int, token: str) -> ManifestVersion:
    return ManifestVersion(generation, token,
                           f"manifests/{backup_id}@{generation:08d}.{token}")


def parse_manifest_name(name: str) -> tuple[str, ManifestVersion, bool] | None:
    """(backup id, version, is it the version's commit) of an object under
    ``manifests/``; None for a name that is neither."""
    m = _VERSION_RE.fullmatch(name)
    if m is None:
        return None
    if m["gen"] is None:
        return m["id"], ManifestVersion(0, "", name), False
    v = version_object(m["id"], int(m["gen"]), m["token"])
    return m["id"], v, m["ok"] is not None


@dataclass
class ManifestVersions:
    """What a listing shows of one backup's manifest versions."""

    versions: set[ManifestVersion]  # version objects listed
    commits: set[ManifestVersion]  # versions whose commit is listed (version 0 implied)

    def committed(self) -> list[ManifestVersion]:
        """The versions a reader may take, newest first."""
        return sorted((v for v in self.versions if v.generation == 0 or v in self.commits),
                      reverse=True)


def group_manifests(names: Iterable[str]) -> dict[str, ManifestVersions]:
    """Listed names under ``manifests/``, grouped by backup id."""
    out: dict[str, ManifestVersions] = {}
    for name in names:
        parsed = parse_manifest_name(name)
        if parsed is None:
            continue
        bid, v, commit = parsed
        g = out.setdefault(bid, ManifestVersions(set(), set()))
        (g.commits if commit else g.versions).add(v)
    return out


def manifest_versions(c: Container, backup_id: str) -> ManifestVersions:
    return group_manifests(c.list(manifest_object(backup_id))).get(
        backup_id, ManifestVersions(set(), set()))


def manifest_candidates(c: Container, backup_id: str, newest: bool = False) -> Iterator[str]:
    """The object names a reader tries for ``backup_id``'s manifest, in order. Every
    committed version that exists is complete and valid, so by default version 0 comes
    first (one GET, no listing, for a backup never repacked); ``newest`` puts the committed
    versions first, newest first (what repacking rewrites). A listing may not show a
    version 0 written a moment ago, so it is tried in any case. Lazy: the listing is made
    only when the names before it failed."""
    first = manifest_object(backup_id)
    if not newest:
        yield first
    listed = [v.name for v in manifest_versions(c, backup_id).committed()]
    for name in listed:
        if newest or name != first:
            yield name
    if newest and first not in listed:
        yield first


def manifest_exists(c: Container, backup_id: str) -> bool:
    return any(c.head(n) is not None for n in manifest_candidates(c, backup_id))


def record_object(backup_id: str) -> str:
    return f"records/{backup_id}"


# ---------------------------------------------------------------------------------------
# Container config
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerConfig:
    block_size: int
    crypto: Crypto
    raw: dict


def make_config(block_size: int, compression: str, key: bytes | None) -> dict:
    doc: dict = {
        "format": "blockvault",
        "version": CONFIG_VERSION,
        "block_size": block_size,
        "hash": "blake3",
        "compression": compression,
        "created_at": int(time.time()),
        "encryption": None,
    }
    if key is not None:
        salt = os.urandom(32)
        doc["encryption"] = {
            "cipher": "aes-256-gcm",
            "kdf": "blake3-derive-key",
            "id_hash": "blake3-keyed",
            "salt": salt.hex(),
            "key_check": Crypto(key).key_check(salt).hex(),
        }
    return doc


def parse_config(container: str, data: bytes, key: bytes | None) -> ContainerConfig:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != "blockvault":
            raise ValueError("not a blockvault config")
    except ValueError as e:
        raise DataError(f"config of container {container} is corrupt: {e}", CONFIG_NAME) from None
    if doc.get("version") not in CONFIG_VERSIONS:
        raise FormatError(
            f"container {container} has format version {doc.get('version')!r}; "
            f"this engine reads versions {', '.join(map(str, CONFIG_VERSIONS))}"
        )
    bs = doc.get("block_size")
    if not isinstance(bs, int) or bs <= 0 or bs & (bs - 1):
        raise DataError(f"config of container {container} has a bad block_size", CONFIG_NAME)
    enc = doc.get("encryption")
    if enc is None:
        return ContainerConfig(bs, Crypto(None), doc)
    if enc.get("cipher") != "aes-256-gcm" or enc.get("kdf") != "blake3-derive-key":
        raise FormatError(f"container {container} uses an unknown encryption scheme")
    if key is None:
        raise KeyMismatch(f"container {container} is encrypted and no encryption key is configured")
    crypto = Crypto(key)
    try:
        ok = crypto.key_check(bytes.fromhex(enc["salt"])).hex() == enc["key_check"]
    except (KeyError, ValueError, TypeError):
        raise DataError(f"config of container {container} is corrupt", CONFIG_NAME) from None
    if not ok:
        raise KeyMismatch(
            f"container {container} is encrypted and the configured key does not open it"
        )
    return ContainerConfig(bs, crypto, doc)


# ---------------------------------------------------------------------------------------
# Packs: blob* | sealed trailer | footer
# ---------------------------------------------------------------------------------------

TRAILER_ENTRY = struct.Struct("<32sIIIB")  # block id, offset, stored length, raw length, codec
FOOTER = struct.Struct("<4sBBHII")  # magic, version, flags, reserved, trailer length, count
PACK_MAGIC = b"BVPK"
FLAG_ENCRYPTED = 1
TRAILER_AAD = b"bv1-pack-trailer"


@dataclass(frozen=True)
class PackEntry:
    block_id: bytes
    offset: int
    length: int
    raw_length: int
    codec: int


def build_trailer(entries: list[tuple[bytes, int, int, int, int]], crypto: Crypto) -> bytes:
    # The salt makes every pack's bytes, and so its name, unique: a pack condemned by
    # garbage collection can never be uploaded again under its name (docs/format.md).
    body = os.urandom(PACK_SALT) + b"".join(TRAILER_ENTRY.pack(*e) for e in entries)
    sealed = crypto.seal(body, TRAILER_AAD)
    flags = FLAG_ENCRYPTED if crypto.encrypted else 0
    return sealed + FOOTER.pack(PACK_MAGIC, PACK_VERSION, flags, 0, len(sealed), len(entries))


def read_pack_entries(c: Container, name: str, crypto: Crypto, guess: int = 128 * 1024) -> (
    list[PackEntry]
):
    """Read a pack's trailer with one or two range GETs. Raises DataError if unreadable."""
    obj = pack_object(name)
    size = c.head(obj)
    if size is None:
        raise DataError(f"pack {obj} is missing", obj)
    if size < FOOTER.size:
        raise DataError(f"pack {obj} is truncated", obj)
    start = max(0, size - guess)
    tail = c.get(obj, start, size - start)
    if len(tail) != size - start:
        raise DataError(f"pack {obj} is truncated", obj)
    magic, version, _flags, _r, tlen, count = FOOTER.unpack_from(tail, len(tail) - FOOTER.size)
    if magic != PACK_MAGIC:
        raise DataError(f"pack {obj} has no valid footer", obj)
    if version not in PACK_VERSIONS:
        raise FormatError(f"pack {obj} has unknown format version {version}")
    need = tlen + FOOTER.size
    if need > size:
        raise DataError(f"pack {obj} has a corrupt footer", obj)
    if need > len(tail):
        tail = c.get(obj, size - need, need)
    sealed = bytes(tail[len(tail) - need : len(tail) - FOOTER.size])
    try:
        body = crypto.open(sealed, TRAILER_AAD)
    except SealError:
        raise DataError(f"trailer of pack {obj} is corrupt or sealed with another key",
                        obj) from None
    salt = PACK_SALT if version >= 2 else 0
    if len(body) != salt + count * TRAILER_ENTRY.size:
        raise DataError(f"trailer of pack {obj} has a wrong length", obj)
    return [PackEntry(*e) for e in TRAILER_ENTRY.iter_unpack(memoryview(body)[salt:])]


# ---------------------------------------------------------------------------------------
# Manifests: prefix | sealed JSON header | (u32 len, sealed zstd segment)* | u32 0
# ---------------------------------------------------------------------------------------

MANIFEST_MAGIC = b"BVMF"
MANIFEST_PREFIX = struct.Struct("<4sHHI")  # magic, version, flags, header length
MANIFEST_ENTRY = struct.Struct("<Q32s32sIIB")  # index, block id, pack, offset, length, codec
_ENTRY_PACK = struct.Struct("<40x32s9x")  # just an entry's pack name
SEGMENT_LEN = struct.Struct("<I")
SEGMENT_ENTRIES = 4096
_SEGMENT_BYTES = SEGMENT_ENTRIES * MANIFEST_ENTRY.size


def entry_packs(raw: bytes | memoryview) -> set[bytes]:
    """The pack names packed manifest entries reference (set() of C-made tuples first:
    no Python work per entry)."""
    return {t[0] for t in set(_ENTRY_PACK.iter_unpack(raw))}


def _header_aad(backup_id: str) -> bytes:
    return b"bv1-manifest-header\0" + backup_id.encode()


def _segment_aad(backup_id: str, seq: int) -> bytes:
    return b"bv1-manifest-segment\0" + backup_id.encode() + b"\0" + seq.to_bytes(4, "little")


@dataclass(frozen=True)
class ManifestEntry:
    index: int
    block_id: bytes
    pack: str  # 64 hex digits
    offset: int
    length: int
    codec: int


class ManifestBuilder:
    """Accumulates packed entries in index order and writes the manifest object.

    Sealed segments go to a temporary file (in ``tmpdir``) as they fill, not to memory: a
    manifest holds ~40 bytes per non-zero block, over 1 GiB for a TiB of data. Close it
    (or use it as a context manager) to drop that file."""

    def __init__(self, backup_id: str, crypto: Crypto, tmpdir: Path | None = None) -> None:
        self.backup_id = backup_id
        self.crypto = crypto
        self._segments = tempfile.TemporaryFile(dir=tmpdir, prefix="manifest-segments-")
        self._segment_count = 0
        self._pending = bytearray()
        self._cctx = zstandard.ZstdCompressor(level=3)
        self.entries = 0

    def add_raw(self, packed_entries: bytes | bytearray | memoryview) -> None:
        """Append packed MANIFEST_ENTRY records (any number of them, in index order)."""
        n = len(packed_entries)
        if n % MANIFEST_ENTRY.size:
            raise ValueError("not a whole number of manifest entries")
        self._pending += packed_entries
        self.entries += n // MANIFEST_ENTRY.size
        while len(self._pending) >= _SEGMENT_BYTES:
            self._flush(_SEGMENT_BYTES)

    def _flush(self, n: int | None = None) -> None:
        if not self._pending:
            return
        raw = bytes(self._pending[:n])
        del self._pending[:n]
        sealed = self.crypto.seal(
            self._cctx.compress(raw), _segment_aad(self.backup_id, self._segment_count)
        )
        self._segments.write(SEGMENT_LEN.pack(len(sealed)))
        self._segments.write(sealed)
        self._segment_count += 1

    def finish(self, header: dict, out: BinaryIO) -> int:
        """Write the whole manifest object to ``out`` (a new, empty file) and return its
        size; ``out`` is left at offset 0."""
        self._flush()
        # Container-wide manifests stay exactly what engines before scopes wrote.
        version = FORMAT_VERSION
        if header.get("dedup_scope") is not None:
            version = MANIFEST_VERSION_SCOPED
        else:
            header = {k: v for k, v in header.items() if k != "dedup_scope"}
        header = dict(header, backup_id=self.backup_id, entries=self.entries,
                      segments=self._segment_count, version=version)
        hdr = self.crypto.seal(json.dumps(header).encode(), _header_aad(self.backup_id))
        flags = FLAG_ENCRYPTED if self.crypto.encrypted else 0
        out.write(MANIFEST_PREFIX.pack(MANIFEST_MAGIC, version, flags, len(hdr)))
        out.write(hdr)
        self._segments.seek(0)
        shutil.copyfileobj(self._segments, out, 1024 * 1024)
        out.write(SEGMENT_LEN.pack(0))
        out.flush()
        size = out.tell()
        out.seek(0)
        return size

    def close(self) -> None:
        self._segments.close()

    def __enter__(self) -> ManifestBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RangeReader:
    """Sequential reads of a (possibly huge) object through bounded range GETs."""

    def __init__(self, c: Container, name: str, window: int = 4 * 1024 * 1024) -> None:
        self.c, self.name, self.window = c, name, window
        self.pos = 0
        self.buf = b""
        self.bpos = 0

    def read(self, n: int) -> bytes:
        if self.bpos + n > len(self.buf):
            rest = self.buf[self.bpos :]
            want = max(self.window, n - len(rest))
            try:
                more = self.c.get(self.name, self.pos, want)
            except ObjectNotFound:
                raise MissingObject(f"manifest {self.name} is missing", self.name) from None
            self.pos += len(more)
            self.buf = rest + more
            self.bpos = 0
            if len(self.buf) < n:
                raise DataError(f"manifest {self.name} is truncated", self.name)
        out = self.buf[self.bpos : self.bpos + n]
        self.bpos += n
        return out


class ManifestReader:
    """Streams a manifest: ``header`` is read on open, ``entries()`` yields in index order.

    Without ``name`` it reads a committed version of the backup's manifest that exists,
    the newest one with ``newest`` (``manifest_candidates``); with ``name``, that version
    object only."""

    def __init__(self, c: Container, backup_id: str, crypto: Crypto, container: str = "",
                 name: str | None = None, newest: bool = False) -> None:
        self.backup_id = backup_id
        self.crypto = crypto
        self._c, self._container, self._fixed = c, container, name
        names = [name] if name is not None else manifest_candidates(c, backup_id, newest)
        missing: MissingObject | None = None
        for n in names:
            try:
                self._open_version(n)
                return
            except MissingObject as e:  # deleted meanwhile: the next one
                missing = missing or e
        assert missing is not None
        raise missing

    def _open_version(self, name: str) -> None:
        backup_id = self.backup_id
        crypto, container = self.crypto, self._container
        self.name = name
        parsed = parse_manifest_name(name)
        self.version = parsed[1] if parsed else ManifestVersion(0, "", name)
        self._r = _RangeReader(self._c, name)
        prefix = self._r.read(MANIFEST_PREFIX.size)
        magic, version, flags, hlen = MANIFEST_PREFIX.unpack(prefix)
        if magic != MANIFEST_MAGIC:
            raise DataError(f"manifest {self.name} is corrupt (bad magic)", self.name)
        if version not in MANIFEST_VERSIONS:
            raise FormatError(f"manifest {self.name} has unknown format version {version}")
        if bool(flags & FLAG_ENCRYPTED) != crypto.encrypted:
            if flags & FLAG_ENCRYPTED:
                raise KeyMismatch(
                    f"container {container} is encrypted and the configured key does not open it"
                )
            raise DataError(f"manifest {self.name} is not encrypted in an encrypted container",
                            self.name)
        hdr = self._open(self._r.read(hlen), _header_aad(backup_id))
        try:
            self.header = json.loads(hdr)
            self.size = int(self.header["size"])
            self.block_size = int(self.header["block_size"])
            self.parent_id = self.header.get("parent_id")
            self.entry_count = int(self.header["entries"])
            self.segment_count = int(self.header["segments"])
            # The dedup scope whose key made this manifest's block ids; None (version 1:
            # every manifest written before scopes) is the container-wide one.
            self.scope: str | None = None
            if version >= MANIFEST_VERSION_SCOPED:
                self.scope = self.header["dedup_scope"]
                if not isinstance(self.scope, str) or not self.scope:
                    raise ValueError("bad dedup_scope")
        except (ValueError, KeyError, TypeError):
            raise DataError(f"manifest {self.name} has a corrupt header", self.name) from None
        # Reads the blocks with the scope's ids; sealing does not depend on the scope.
        try:
            self.id_crypto = crypto.scoped(self.scope)
        except ValueError:
            raise DataError(f"manifest {self.name} has a corrupt header", self.name) from None

    def _open(self, sealed: bytes, aad: bytes) -> bytes:
        try:
            return self.crypto.open(sealed, aad)
        except SealError:
            raise DataError(f"manifest {self.name} is corrupt", self.name) from None

    def _segment(self, dctx: zstandard.ZstdDecompressor, seq: int) -> bytes | None:
        (n,) = SEGMENT_LEN.unpack(self._r.read(SEGMENT_LEN.size))
        if n == 0:
            return None
        if n > 2 * _SEGMENT_BYTES:  # no sealed segment is that long: not a length field
            raise DataError(f"manifest {self.name} is corrupt", self.name)
        body = self._open(self._r.read(n), _segment_aad(self.backup_id, seq))
        try:
            raw = dctx.decompress(body)
        except zstandard.ZstdError:
            raise DataError(f"manifest {self.name} is corrupt", self.name) from None
        if len(raw) % MANIFEST_ENTRY.size:
            raise DataError(f"manifest {self.name} is corrupt", self.name)
        return raw

    def _reopen(self, seq: int) -> None:
        """Open the manifest again and skip to segment ``seq``: the version being read was
        removed because repacking committed a newer one (docs/format.md, "Manifest
        versions"). All versions hold the same blocks in the same segments (only where
        their blobs live differs), so reading on from segment ``seq`` of another is sound;
        a header that disagrees means it is not such a version (DataError)."""
        again = ManifestReader(self._c, self.backup_id, self.crypto, self._container,
                               self._fixed)
        same = ("size", "block_size", "entries", "segments", "dedup_scope")
        if any(again.header.get(k) != self.header.get(k) for k in same):
            raise DataError(f"manifest {self.name} changed while it was read", self.name)
        for _ in range(seq):  # sealed under their own numbers: read past, not trusted
            (n,) = SEGMENT_LEN.unpack(again._r.read(SEGMENT_LEN.size))
            if n == 0:
                raise DataError(f"manifest {self.name} is incomplete", self.name)
            again._r.read(n)
        self._r = again._r

    def raw_segments(self) -> Iterator[bytes]:
        """Yield each segment's packed entries (MANIFEST_ENTRY records)."""
        dctx = zstandard.ZstdDecompressor()
        seq = 0
        total = 0
        retries = 0
        while True:
            try:
                raw = self._segment(dctx, seq)
            except DataError:
                # Perhaps replaced by a newer version meanwhile: read on from that. A
                # manifest that is really damaged fails the same way again.
                if retries >= 2:
                    raise
                retries += 1
                self._reopen(seq)
                continue
            if raw is None:
                break
            seq += 1
            total += len(raw) // MANIFEST_ENTRY.size
            yield raw
        if seq != self.segment_count or total != self.entry_count:
            raise DataError(f"manifest {self.name} is incomplete", self.name)

    def entries(self) -> Iterator[ManifestEntry]:
        for raw in self.raw_segments():
            for idx, bid, pack, off, length, codec in MANIFEST_ENTRY.iter_unpack(raw):
                yield ManifestEntry(idx, bid, pack.hex(), off, length, codec)
