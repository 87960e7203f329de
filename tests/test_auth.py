"""Key format, hashing and checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from paragate.auth import authenticate, hash_secret, new_key, parse_key
from paragate.errors import AuthenticationFailed
from paragate.store import KeyRecord


def record(public_id: str, secret_hash: str, **kw: object) -> KeyRecord:
    values: dict[str, object] = dict(
        id=1, public_id=public_id, secret_hash=secret_hash, name="n", is_admin=False,
        allowed_models=None, rate_limit_rpm=None, created_at=datetime.now(UTC),
        expires_at=None, revoked_at=None)
    values.update(kw)
    return KeyRecord(**values)  # type: ignore[arg-type]


def test_new_keys_are_random_and_parse() -> None:
    token, public_id, secret_hash = new_key()
    assert token.startswith(f"pg-{public_id}-")
    parsed = parse_key(token)
    assert parsed is not None and parsed[0] == public_id
    assert hash_secret(parsed[1]) == secret_hash
    assert len({new_key()[0] for _ in range(100)}) == 100


@pytest.mark.parametrize("token", ["", "pg", "pg-", "xx-0123456789ab-s", "pg-short-s",
                                   "pg-0123456789ab-", "pg-0123456789ab"])
def test_malformed_keys_do_not_parse(token: str) -> None:
    assert parse_key(token) is None


def test_authenticate() -> None:
    token, public_id, secret_hash = new_key()
    keys = {public_id: record(public_id, secret_hash, allowed_models=("a",))}
    who = authenticate(f"Bearer {token}".encode(), keys)
    assert who.public_id == public_id and who.may_use("a") and not who.may_use("b")
    assert authenticate(f"bearer   {token}  ".encode(), keys).key_id == 1
    with pytest.raises(AuthenticationFailed, match="Invalid"):
        authenticate(f"Bearer {token}x".encode(), keys)
    past = datetime.now(UTC) - timedelta(seconds=1)
    with pytest.raises(AuthenticationFailed, match="revoked"):
        authenticate(f"Bearer {token}".encode(),
                     {public_id: record(public_id, secret_hash, revoked_at=past)})
    with pytest.raises(AuthenticationFailed, match="expired"):
        authenticate(f"Bearer {token}".encode(),
                     {public_id: record(public_id, secret_hash, expires_at=past)})
    with pytest.raises(AuthenticationFailed, match="Missing"):
        authenticate(None, keys)
