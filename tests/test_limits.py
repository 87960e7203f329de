"""Per-key rate limits."""

from __future__ import annotations

import time

import httpx
import pytest

from paragate.auth import Principal
from paragate.errors import RateLimited
from paragate.limits import RateLimiter

from .conftest import Keys
from .test_completions import assert_envelope, post


def principal(rpm: int | None, key_id: int = 1) -> Principal:
    return Principal(key_id=key_id, public_id="p", name="n", user_id=1, company_id=1,
                     role="user", key_manager=False, model_ids=None, rate_limit_rpm=rpm,
                     expires_at=None, usage_opt_in=True)


def test_bucket_allows_a_burst_then_refills(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    limiter = RateLimiter()
    who = principal(rpm=3)
    for _ in range(3):
        limiter.check(who)
    with pytest.raises(RateLimited) as e:
        limiter.check(who)
    assert e.value.headers["retry-after"] == "20"  # one request refills in 60/3 s
    now[0] += 20
    limiter.check(who)
    with pytest.raises(RateLimited):
        limiter.check(who)
    limiter.check(principal(rpm=3, key_id=2))  # another key has its own bucket
    for _ in range(100):
        limiter.check(principal(rpm=None, key_id=3))


async def test_429_in_the_envelope(client: httpx.AsyncClient, keys: Keys) -> None:
    for _ in range(2):
        r = await post(client, keys.throttled, model="alfred-4.2", prompt="x", max_tokens=1)
        assert r.status_code == 200
    r = await post(client, keys.throttled, model="alfred-4.2", prompt="x", max_tokens=1)
    err = assert_envelope(r, 429, "rate_limit_exceeded", type_="rate_limit_error")
    assert "2 requests per minute" in err["message"]
    assert int(r.headers["retry-after"]) >= 1
    # other keys are not affected
    assert (await post(client, keys.full, model="alfred-4.2", prompt="x")).status_code == 200


async def test_refused_requests_spend_nothing(client: httpx.AsyncClient, keys: Keys) -> None:
    # A bad body, an unknown model and a request over the model's own max_tokens limit
    # are all refused before forwarding: the key's 2 requests/minute are still there.
    for body in ({"model": "alfred-4.2", "prompt": "x", "temperature": 9},
                 {"model": "nope", "prompt": "x"},
                 {"model": "limited", "prompt": "x", "max_tokens": 11}):
        r = await post(client, keys.throttled, **body)
        assert r.status_code in (400, 404), r.text
    for _ in range(2):
        r = await post(client, keys.throttled, model="alfred-4.2", prompt="x", max_tokens=1)
        assert r.status_code == 200, r.text
    r = await post(client, keys.throttled, model="alfred-4.2", prompt="x", max_tokens=1)
    assert r.status_code == 429
