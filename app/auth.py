"""API keys and tenants: create, list, revoke, authenticate; the per-key request rate limit.

A key is ``mc_`` followed by a random 32-byte URL-safe token (`secrets.token_urlsafe`). Only its
SHA-256 is stored, with its first characters (`PREFIX_LEN`, the ``prefix``) to tell keys apart in
lists and to revoke one. A fast hash is right here: the key has 256 random bits, so nobody can
guess it from its hash by trying candidates, which is what a slow password hash (bcrypt, argon2)
protects against; a fast one keeps the per-request check cheap.

Tenants are made with their first key. Sessions made without a tenant, and every request while
auth is off, belong to the tenant ``local`` (`memory_store.models.LOCAL_TENANT_ID`).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from memory_store.models import ApiKey, Tenant

KEY_PREFIX = "mc_"
PREFIX_LEN = 11  # "mc_" and 8 characters of the token: shown in lists, enough to name a key
# last_used_at is written at most this often per key and process (not on every request)
LAST_USED_RESOLUTION_S = 60.0


class KeyNotFound(LookupError):
    """No key matches, or more than one does (a prefix too short)."""


def hash_key(key: str) -> str:
    """SHA-256 (hex) of a key: what the database stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    """Who a request acts for: the tenant, and the key (None while auth is off)."""

    tenant_id: str
    key_id: str | None = None


@dataclass(frozen=True)
class KeyInfo:
    """A key as ``keys list`` shows it (never the key itself)."""

    id: str
    prefix: str
    name: str
    tenant: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _utc(t: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they were written in UTC."""
    return t if t is None or t.tzinfo is not None else t.replace(tzinfo=UTC)


def tenant_for_name(db: DbSession, name: str) -> Tenant:
    """The tenant called ``name``, created (in ``db``'s transaction) when there is none."""
    tenant = db.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        db.add(tenant)
        db.flush()
    return tenant


def create_key(db: sessionmaker[DbSession], tenant: str, name: str = "") -> tuple[str, KeyInfo]:
    """A new key for the tenant called ``tenant`` (created if new): (the key, its record). The
    key is not stored: this is the only time it is seen."""
    key = new_key()
    with db.begin() as s:
        t = tenant_for_name(s, tenant)
        row = ApiKey(tenant_id=t.id, name=name, prefix=key[:PREFIX_LEN], hash=hash_key(key))
        s.add(row)
        s.flush()
        return key, _info(row, t.name)


def list_keys(db: sessionmaker[DbSession], tenant: str | None = None) -> list[KeyInfo]:
    """Every key (of one tenant, by name), oldest first."""
    with db() as s:
        q = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
        if tenant is not None:
            q = q.where(Tenant.name == tenant)
        rows = s.execute(q.order_by(ApiKey.created_at, ApiKey.id)).all()
        return [_info(k, t) for k, t in rows]


def revoke_key(db: sessionmaker[DbSession], prefix_or_id: str) -> KeyInfo:
    """Revoke the key with this id, the one key whose prefix starts so (``mc_`` and at least 4
    more characters), or the key itself. Raises KeyNotFound when none or several match. Revoking
    twice keeps the first time."""
    with db.begin() as s:
        conds = [ApiKey.id == prefix_or_id]
        if len(prefix_or_id) > PREFIX_LEN:
            conds.append(ApiKey.hash == hash_key(prefix_or_id))
        elif len(prefix_or_id) >= len(KEY_PREFIX) + 4:
            conds.append(ApiKey.prefix.startswith(prefix_or_id, autoescape=True))
        rows = s.execute(
            select(ApiKey, Tenant.name)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(or_(*conds))
        ).all()
        if not rows:
            raise KeyNotFound(f"no key has the id or prefix {prefix_or_id!r}")
        if len(rows) > 1:
            found = ", ".join(k.prefix for k, _ in rows)
            raise KeyNotFound(f"{prefix_or_id!r} matches {len(rows)} keys ({found}); give the id")
        key, tenant = rows[0]
        if key.revoked_at is None:
            key.revoked_at = datetime.now(UTC)
        s.flush()
        return _info(key, tenant)


def _info(row: ApiKey, tenant: str) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        prefix=row.prefix,
        name=row.name,
        tenant=tenant,
        created_at=_utc(row.created_at) or datetime.now(UTC),
        last_used_at=_utc(row.last_used_at),
        revoked_at=_utc(row.revoked_at),
    )


class KeyChecker:
    """Finds the tenant of a presented key (a database read per request, so that a revocation
    takes effect at once) and notes when keys are used (at most once a minute per key)."""

    def __init__(self, db: sessionmaker[DbSession]) -> None:
        self.db = db
        self._noted: dict[str, float] = {}
        self._mu = threading.Lock()

    def caller(self, key: str) -> Caller | None:
        """The caller this key stands for; None when it is unknown or revoked."""
        if not key.startswith(KEY_PREFIX) or len(key) > 200:
            return None
        digest = hash_key(key)
        with self.db() as s:
            row = s.execute(
                select(ApiKey.id, ApiKey.tenant_id).where(
                    ApiKey.hash == digest, ApiKey.revoked_at.is_(None)
                )
            ).one_or_none()
        if row is None:
            return None
        self._note_use(row.id)
        return Caller(tenant_id=row.tenant_id, key_id=row.id)

    def _note_use(self, key_id: str) -> None:
        now = time.monotonic()
        with self._mu:
            if now - self._noted.get(key_id, -math.inf) < LAST_USED_RESOLUTION_S:
                return
            self._noted[key_id] = now
        with self.db.begin() as s:
            s.execute(
                update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=datetime.now(UTC))
            )


class RateLimiter:
    """A token bucket per key in this process: ``per_minute`` requests a minute, bursts of up to
    ``per_minute``. Several processes (workers, replicas) each keep their own buckets."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0  # tokens per second
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._mu = threading.Lock()
        self._now = time.monotonic

    def take(self, key: str) -> float:
        """Take a token for ``key``: 0.0 when the request may go, else the seconds to wait."""
        if self.per_minute <= 0:
            return 0.0
        now = self._now()
        with self._mu:
            tokens, at = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - at) * self._rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate
