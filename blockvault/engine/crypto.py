"""Content ids, encryption and integrity tags for everything the engine stores.

An unencrypted container hashes blocks with plain BLAKE3 and protects its metadata
(manifest segments, pack trailers) with a 16-byte BLAKE3 integrity tag. An encrypted one
hashes blocks with keyed BLAKE3 (so ids reveal nothing about content) and seals every blob,
manifest segment, trailer and record with AES-256-GCM under a random 12-byte nonce.
Subkeys come from the master key through BLAKE3's derive_key mode.

Block ids may be *scoped* (``Crypto.scoped``): keyed by a dedup scope (the service's
project), so that identical blocks of two scopes get unrelated ids and never deduplicate.
"""

from __future__ import annotations

import copy
import hmac
import os

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_LEN = 12
GCM_TAG_LEN = 16
PLAIN_TAG_LEN = 16

_CTX = "blockvault 2026 format v1 "


def derive(master: bytes, purpose: str) -> bytes:
    return blake3.blake3(master, derive_key_context=_CTX + purpose).digest()


#: Largest dedup scope name, in UTF-8 bytes (project ids are far shorter).
MAX_SCOPE_BYTES = 255


def scope_key(id_key: bytes | None, scope: str) -> bytes:
    """The block id key of dedup scope ``scope`` (docs/format.md, "Dedup scopes").

    In an encrypted container it is derived from the container's block id key, so it is
    as secret as the key. In an unencrypted one the input is the scope name alone: such
    ids are no secret (nor is anything else in that container), they only need to differ
    between scopes. The block id key has a fixed length (32), so ``key || name`` is
    unambiguous."""
    name = scope.encode()
    if not name or len(name) > MAX_SCOPE_BYTES or b"\0" in name:
        raise ValueError(f"invalid dedup scope {scope[:60]!r}")
    return blake3.blake3((id_key or b"") + name,
                         derive_key_context=_CTX + "dedup scope").digest()


class SealError(ValueError):
    """A sealed object failed to authenticate (corrupt, or the wrong key)."""


class Crypto:
    """Per-container cryptographic context; ``Crypto(None)`` is the unencrypted one."""

    def __init__(self, master_key: bytes | None) -> None:
        self.encrypted = master_key is not None
        if master_key is not None:
            self._aead: AESGCM | None = AESGCM(derive(master_key, "data key"))
            self._id_key: bytes | None = derive(master_key, "block id key")
            self._check_key = derive(master_key, "key check")
        else:
            self._aead = None
            self._id_key = None
            self._check_key = b""
        self.scope: str | None = None
        self._base: Crypto | None = None  # the container-wide context of a scoped one

    def scoped(self, scope: str | None) -> Crypto:
        """This context with the block ids of dedup scope ``scope``; None is the
        container-wide scope (the ids every backup had before scopes existed). Sealing is
        unchanged: a blob's AAD binds it to whatever id it was stored under."""
        if scope == self.scope:
            return self
        if self._base is not None:
            return self._base.scoped(scope)
        other = copy.copy(self)
        other.scope = scope
        other._base = self
        other._id_key = scope_key(self._id_key, scope)
        return other

    # -- block ids ---------------------------------------------------------------------
    def block_id(self, data: bytes) -> bytes:
        if self._id_key is None:
            return blake3.blake3(data).digest()
        return blake3.blake3(data, key=self._id_key).digest()

    # -- blobs: encrypted or stored as is (their id is their integrity check) ----------
    def seal_blob(self, data: bytes, block_id: bytes) -> bytes:
        if self._aead is None:
            return data
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, data, b"bv1-blob" + block_id)

    def open_blob(self, blob: bytes, block_id: bytes) -> bytes:
        if self._aead is None:
            return blob
        return self._open_aead(blob, b"bv1-blob" + block_id)

    # -- metadata: always integrity-protected, encrypted when the container is ---------
    def seal(self, data: bytes, aad: bytes) -> bytes:
        if self._aead is None:
            h = blake3.blake3(aad)
            h.update(data)
            return data + h.digest(PLAIN_TAG_LEN)
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if self._aead is None:
            if len(sealed) < PLAIN_TAG_LEN:
                raise SealError("sealed object too short")
            data = memoryview(sealed)[:-PLAIN_TAG_LEN]
            h = blake3.blake3(aad)
            h.update(data)
            if not hmac.compare_digest(h.digest(PLAIN_TAG_LEN), sealed[-PLAIN_TAG_LEN:]):
                raise SealError("integrity tag mismatch")
            return bytes(data)
        return self._open_aead(sealed, aad)

    def _open_aead(self, sealed: bytes, aad: bytes) -> bytes:
        assert self._aead is not None
        if len(sealed) < NONCE_LEN + GCM_TAG_LEN:
            raise SealError("sealed object too short")
        try:
            return self._aead.decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], aad)
        except InvalidTag:
            raise SealError("authentication failed") from None

    # -- key check stored in the container config --------------------------------------
    def key_check(self, salt: bytes) -> bytes:
        return blake3.blake3(salt, key=self._check_key).digest()
