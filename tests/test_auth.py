"""Key format, hashing and checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from paragate.auth import check_key, hash_secret, new_key, new_secret, parse_key
from paragate.errors import AuthenticationFailed
from paragate.store import KeyRecord


def record(public_id: str, secret_hash: str, **kw: object) -> KeyRecord:
    values: dict[str, object] = dict(
        id=1, public_id=public_id, secret_hash=secret_hash, previous_hash=None,
        previous_expires_at=None, user_id=1, name="n", model_ids=None,
        usage_opt_in=True, version=1, created_at=datetime.now(UTC), expires_at=None,
        revoked_at=None, last_used_at=None)
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


def test_check_key() -> None:
    token, public_id, secret_hash = new_key()
    keys = {public_id: record(public_id, secret_hash)}
    found, until = check_key(f"Bearer {token}".encode(), keys)
    assert found.public_id == public_id and until is None
    assert check_key(f"bearer   {token}  ".encode(), keys)[0].id == 1
    with pytest.raises(AuthenticationFailed, match="Invalid"):
        check_key(f"Bearer {token}x".encode(), keys)
    past = datetime.now(UTC) - timedelta(seconds=1)
    with pytest.raises(AuthenticationFailed, match="revoked"):
        check_key(f"Bearer {token}".encode(),
                  {public_id: record(public_id, secret_hash, revoked_at=past)})
    with pytest.raises(AuthenticationFailed, match="expired"):
        check_key(f"Bearer {token}".encode(),
                  {public_id: record(public_id, secret_hash, expires_at=past)})
    with pytest.raises(AuthenticationFailed, match="Missing"):
        check_key(None, keys)


def test_a_rotated_secret_works_until_its_grace_ends() -> None:
    old, public_id, old_hash = new_key()
    secret, new_hash = new_secret()
    soon = datetime.now(UTC) + timedelta(hours=1)
    past = datetime.now(UTC) - timedelta(seconds=1)
    rotated = {public_id: record(public_id, new_hash, previous_hash=old_hash,
                                 previous_expires_at=soon)}
    found, until = check_key(f"Bearer {old}".encode(), rotated)
    assert found.public_id == public_id
    assert until == soon.timestamp()  # the cache must drop the old secret then
    assert check_key(f"Bearer pg-{public_id}-{secret}".encode(), rotated)[1] is None
    over = {public_id: record(public_id, new_hash, previous_hash=old_hash,
                              previous_expires_at=past)}
    with pytest.raises(AuthenticationFailed, match="rotated"):
        check_key(f"Bearer {old}".encode(), over)
    with pytest.raises(AuthenticationFailed, match="Invalid"):  # no grace at all
        check_key(f"Bearer {old}".encode(), {public_id: record(public_id, new_hash)})
