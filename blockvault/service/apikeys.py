"""API keys for ``auth_strategy = apikey``: created, listed and revoked by the operator's
CLI against the service's database, checked by the API on every request.

A key reads ``bvk_<id>_<secret>``: the id finds the row (one primary-key lookup), the
secret is compared with the stored sha256 in constant time. Secrets are 256 random bits,
so a slow KDF would add nothing but latency; the database never holds a secret."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update

from blockvault.db import Database
from blockvault.db.models import ApiKey, utcnow

PREFIX = "bvk_"
_KEY = re.compile(r"bvk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
#: role names as Keystone would have them: no spaces or commas (policy rules read
#: ``role:NAME``)
_ROLE = re.compile(r"[A-Za-z0-9_.-]{1,255}")
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Identity:
    key_id: str
    user_id: str
    project_id: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class Refusal:
    """Why a token was refused (for the log; the caller gets one 401 for every reason)."""

    reason: str


@dataclass(frozen=True)
class KeyInfo:
    id: str
    project_id: str
    user_id: str
    roles: tuple[str, ...]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None

    def state(self, now: dt.datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_expiry(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``text`` as a naive UTC time: an ISO 8601 time (``2027-01-01T00:00Z``; without a zone
    it is UTC) or a duration from now (``90s``, ``30m``, ``12h``, ``30d``, ``2w``). It must lie
    in the future."""
    now = now or utcnow()
    text = text.strip()
    match = _DURATION.fullmatch(text)
    if match:
        when = now + dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    else:
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"expires must be an ISO 8601 time (2027-01-01T00:00Z) or a duration "
                f"(30d, 12h, 90m, 3600s), not {text!r}") from None
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
        when = parsed
    if when <= now:
        raise ValueError(f"expires must be in the future ({when:%Y-%m-%dT%H:%M:%SZ} is not)")
    return when


def create(db: Database, *, project_id: str, user_id: str, roles: list[str],
           expires_at: dt.datetime | None = None) -> tuple[str, str]:
    """A new key: ``(key_id, key)``. ``key`` is the only copy of the secret."""
    if not project_id or not user_id:
        raise ValueError("a key needs a project and a user")
    if len(project_id) > 255 or len(user_id) > 255:
        raise ValueError("project and user are at most 255 characters")
    names: list[str] = []
    for role in roles:
        role = role.strip()
        if not _ROLE.fullmatch(role):
            raise ValueError(f"role names are letters, digits, '_', '.' and '-', not {role!r}")
        if role not in names:
            names.append(role)
    if not names:
        raise ValueError("a key needs at least one role (--role member, reader or admin)")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)  # 43 characters, 256 random bits
    with db.session() as s:
        s.add(ApiKey(id=key_id, project_id=project_id, user_id=user_id, roles=names,
                     secret_hash=_hash(secret), created_at=utcnow(), expires_at=expires_at))
    return key_id, f"{PREFIX}{key_id}_{secret}"


def check(db: Database, token: str) -> Identity | Refusal:
    """Who ``token`` speaks for, or why it is refused."""
    match = _KEY.fullmatch(token)
    if not match:
        return Refusal("not an API key")
    key_id, secret = match.groups()
    with db.reader() as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            return Refusal(f"unknown key {key_id}")
        info = (row.secret_hash, row.revoked_at, row.expires_at, row.user_id, row.project_id,
                tuple(row.roles or ()))
    secret_hash, revoked_at, expires_at, user_id, project_id, roles = info
    if not hmac.compare_digest(_hash(secret), secret_hash):
        return Refusal(f"wrong secret for key {key_id}")
    if revoked_at is not None:
        return Refusal(f"key {key_id} revoked")
    if expires_at is not None and expires_at <= utcnow():
        return Refusal(f"key {key_id} expired")
    return Identity(key_id, user_id, project_id, roles)


def list_keys(db: Database, project_id: str | None = None) -> list[KeyInfo]:
    with db.reader() as s:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if project_id is not None:
            query = query.where(ApiKey.project_id == project_id)
        return [KeyInfo(r.id, r.project_id, r.user_id, tuple(r.roles or ()), r.created_at,
                        r.expires_at, r.revoked_at) for r in s.scalars(query)]


def key_id_of(text: str) -> str:
    """The id in ``text``: an id, or a whole key pasted instead (whose secret must then not
    be echoed back anywhere)."""
    match = _KEY.fullmatch(text.strip())
    return match.group(1) if match else text.strip()


def revoke(db: Database, key_id: str) -> str:
    """Revoke a key: ``"revoked"``, ``"already revoked"`` or ``"unknown"``."""
    with db.session() as s:
        done = s.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                         .values(revoked_at=utcnow())).rowcount
        if done:
            return "revoked"
        return "already revoked" if s.get(ApiKey, key_id) is not None else "unknown"
