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
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import AuthenticationFailed
from .limits.spec import Limit
from .store.records import KeyRecord

__all__ = [
    "EXPIRED",
    "KEY_PREFIX",
    "REVOKED",
    "Principal",
    "check_key",
    "format_key",
    "hash_secret",
    "new_key",
    "new_secret",
    "parse_key",
]

KEY_PREFIX = "pg"
EXPIRED = "This API key has expired."
REVOKED = "This API key has been revoked."
_PUBLIC_ID_LEN = 12
_DUMMY_HASH = hashlib.sha256(b"paragate: no such key").hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key, the user it acts as, and that user's company and role."""

    key_id: int
    public_id: str
    name: str
    user_id: int
    company_id: int
    role: str  # admin | company_admin | user (see access.py)
    key_manager: bool
    model_ids: frozenset[int] | None  # None: every model the company may use
    expires_at: float | None  # a Unix time (the key's, or its old secret's), or None
    usage_opt_in: bool
    limits: tuple[Limit, ...] = ()  # the key's, its user's and its company's
    allow_priority: bool = False  # the company may set vLLM's scheduling fields


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> tuple[str, str]:
    """(secret, its hash)."""
    secret = secrets.token_urlsafe(32)
    return secret, hash_secret(secret)


def new_key() -> tuple[str, str, str]:
    """A fresh key: (full key to hand out once, public id, hash of its secret)."""
    public_id = secrets.token_hex(_PUBLIC_ID_LEN // 2)
    secret, secret_hash = new_secret()
    return format_key(public_id, secret), public_id, secret_hash


def format_key(public_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}-{public_id}-{secret}"


def parse_key(token: str) -> tuple[str, str] | None:
    """(public id, secret) of a well-formed key, else None."""
    prefix, _, rest = token.partition("-")
    public_id, _, secret = rest.partition("-")
    if prefix != KEY_PREFIX or len(public_id) != _PUBLIC_ID_LEN or not secret:
        return None
    return public_id, secret


def check_key(authorization: bytes | None,
              keys: Mapping[str, KeyRecord]) -> tuple[KeyRecord, float | None]:
    """The key an ``Authorization`` header value names, if its secret is right and it is
    neither revoked nor expired, and until when that holds (a Unix time, or None);
    else 401. A key's previous secret (see rotation) is accepted until its grace ends."""
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
    until = record.expires_at.timestamp() if record and record.expires_at else None
    if not hmac.compare_digest(given, expected):
        previous = record.previous_hash if record else None
        grace = record.previous_expires_at if record else None
        if previous is None or grace is None or not hmac.compare_digest(given, previous):
            raise AuthenticationFailed("Invalid API key.")
        if time.time() >= grace.timestamp():
            raise AuthenticationFailed("This API key's secret was rotated; use the new one.")
        until = min(until, grace.timestamp()) if until is not None else grace.timestamp()
    assert record is not None
    if record.revoked_at is not None:
        raise AuthenticationFailed(REVOKED)
    if until is not None and time.time() >= until:
        raise AuthenticationFailed(EXPIRED)
    return record, until
