"""The objects of the garbage collection protocol (docs/format.md, "Garbage collection"):
condemnation marks, which name packs a collection found unreferenced and will delete a
grace period later, and reference lists, which running backups publish so that packs they
use before their manifest exists are not condemned.

Both are write-once objects under fresh names (never overwritten, so an eventually
consistent store cannot serve an old version), sealed like every other metadata object.
Their modification times are the store's clock.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from blockvault.engine.crypto import Crypto, SealError
from blockvault.engine.errors import DataError
from blockvault.store import Container, ObjectNotFound

MARK_PREFIX = "gc/condemned/"
REFS_PREFIX = "gc/refs/"
_MARK_AAD = b"bv2-gc-condemned"
_REFS_AAD = b"bv2-gc-refs"
_NAME = 32


@dataclass(frozen=True)
class Mark:
    """One condemnation: ``packs`` were unreferenced when the store stamped ``time``."""

    name: str
    time: float
    packs: frozenset[bytes]


def _encode(crypto: Crypto, packs: Iterable[bytes], aad: bytes) -> bytes:
    return crypto.seal(b"".join(sorted(packs)), aad)


def _decode(crypto: Crypto, name: str, data: bytes, aad: bytes) -> frozenset[bytes]:
    try:
        body = crypto.open(data, aad)
    except SealError:
        raise DataError(f"garbage collection object {name} is corrupt", name) from None
    if len(body) % _NAME:
        raise DataError(f"garbage collection object {name} has a wrong length", name)
    return frozenset(body[i : i + _NAME] for i in range(0, len(body), _NAME))


def write_mark(c: Container, crypto: Crypto, packs: Iterable[bytes]) -> str:
    name = MARK_PREFIX + uuid.uuid4().hex
    c.put(name, _encode(crypto, packs, _MARK_AAD))
    return name


def read_marks(c: Container, crypto: Crypto) -> list[Mark]:
    """Every condemnation mark the listing shows (it may lag: see docs/format.md)."""
    out = []
    for info in c.list_info(MARK_PREFIX):
        try:
            data = c.get(info.name)
        except ObjectNotFound:
            continue  # swept meanwhile
        out.append(Mark(info.name, info.mtime, _decode(crypto, info.name, data, _MARK_AAD)))
    return out


def write_refs(c: Container, crypto: Crypto, packs: Iterable[bytes]) -> str:
    name = REFS_PREFIX + uuid.uuid4().hex
    c.put(name, _encode(crypto, packs, _REFS_AAD))
    return name


def read_live_refs(c: Container, crypto: Crypto, now: float, ttl: float) -> Iterator[bytes]:
    """Packs named by reference lists younger than ``ttl`` (store clock). Older lists are
    left over from backups that ended or died; they are deleted here."""
    for info in c.list_info(REFS_PREFIX):
        if now - info.mtime >= ttl:
            c.delete(info.name)
            continue
        try:
            data = c.get(info.name)
        except ObjectNotFound:
            continue  # its backup finished meanwhile
        yield from _decode(crypto, info.name, data, _REFS_AAD)
