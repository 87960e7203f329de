"""API keys: their format, their hash, and turning an ``Authorization`` header into a
``Principal``.

A key reads ``pg-<public_id>-<secret>``. The public id (12 hex characters) is shown in
listings and logs and is how a key is found; only a SHA-256 of the secret is stored.
The secret is 32 random bytes, so a fast hash is enough: there is nothing to brute-force
that a slow KDF would protect (the reason passwords need one is their low entropy).
Comparison is constant-time, and an unknown public id costs the same comparison as a
known one. No error, log line or record ever contains the key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import AuthenticationFailed
from .store.records import KeyRecord

__all__ = [
    "EXPIRED",
    "KEY_PREFIX",
    "Principal",
    "authenticate",
    "hash_secret",
    "new_key",
    "parse_key",
]

KEY_PREFIX = "pg"
EXPIRED = "This API key has expired."
_PUBLIC_ID_LEN = 12
_DUMMY_HASH = hashlib.sha256(b"paragate: no such key").hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the seam where tenancy (user, company, roles) will hang."""

    key_id: int
    public_id: str
    name: str
    is_admin: bool
    allowed_models: frozenset[str] | None  # None: every model
    rate_limit_rpm: int | None  # None: no limit
    expires_at: float | None  # a Unix time, or None: never

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """A fresh key: (full key to hand out once, public id, hash of its secret)."""
    public_id = secrets.token_hex(_PUBLIC_ID_LEN // 2)
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}-{public_id}-{secret}", public_id, hash_secret(secret)


def parse_key(token: str) -> tuple[str, str] | None:
    """(public id, secret) of a well-formed key, else None."""
    prefix, _, rest = token.partition("-")
    public_id, _, secret = rest.partition("-")
    if prefix != KEY_PREFIX or len(public_id) != _PUBLIC_ID_LEN or not secret:
        return None
    return public_id, secret


def authenticate(authorization: bytes | None, keys: dict[str, KeyRecord]) -> Principal:
    """Check an ``Authorization`` header value against the known keys, or raise 401."""
    if not authorization:
        raise AuthenticationFailed(
            "Missing API key: send it as 'Authorization: Bearer <key>'."
        )
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "Malformed Authorization header: expected 'Authorization: Bearer <key>'."
        )
    parsed = parse_key(token.strip())
    record = keys.get(parsed[0]) if parsed else None
    expected = record.secret_hash if record else _DUMMY_HASH
    given = hash_secret(parsed[1]) if parsed else ""
    if not hmac.compare_digest(given, expected) or record is None:
        raise AuthenticationFailed("Invalid API key.")
    now = datetime.now(UTC)
    if record.revoked_at is not None:
        raise AuthenticationFailed("This API key has been revoked.")
    if record.expires_at is not None and now >= record.expires_at:
        raise AuthenticationFailed(EXPIRED)
    return Principal(
        key_id=record.id,
        public_id=record.public_id,
        name=record.name,
        is_admin=record.is_admin,
        allowed_models=frozenset(record.allowed_models)
        if record.allowed_models is not None
        else None,
        rate_limit_rpm=record.rate_limit_rpm,
        expires_at=record.expires_at.timestamp() if record.expires_at else None,
    )
