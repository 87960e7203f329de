"""Rate limits and token budgets: each kind on each backend (in process, and the
machine's real Redis), what a request reserves and settles, the answers' headers, the
caps on one request, and the API and CLI that set them (docs/limits.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from paragate import control
from paragate.app import App
from paragate.errors import (
    BudgetExceeded,
    ConcurrencyLimited,
    RateLimited,
    ReservationTooLarge,
)
from paragate.gateway import Gateway
from paragate.limits import Limit, Limiter, MemoryLimiter, limits_of
from paragate.limits.redis import RedisLimiter
from paragate.limits.spec import duration, period_end
from paragate.store import Store

from .conftest import CLI, REDIS, Keys, build_gateway, make_key, wait_usage
from .fake_vllm import FakeVLLM
from .servers import TcpProxy
from .test_completions import assert_envelope, auth, post


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = 1_798_000_000.0  # 2026-12-23 ...

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest, redis_prefix: str
                  ) -> AsyncIterator[tuple[Limiter, Clock | None]]:
    if request.param == "memory":
        clock = Clock()
        yield MemoryLimiter(clock=lambda: clock.now, wall=lambda: clock.wall), clock
        return
    limiter = RedisLimiter(REDIS, prefix=redis_prefix, ttl=60)
    await limiter.start()
    yield limiter, None
    await limiter.stop()


def lim(kind: str, value: int, scope: str = "k", scope_id: int = 1) -> Limit:
    (found,) = limits_of(scope, scope_id, {kind: value})
    return found


def header(ticket: Any, name: str) -> str:
    return dict(ticket.headers)[name.encode()].decode()


async def settled(limiter: Limiter) -> None:
    """Redis settles off the request path: wait until it has."""
    if isinstance(limiter, RedisLimiter):
        for _ in range(200):
            if not limiter._queue and not limiter.sending:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("settlements not sent")


# -- each kind, each backend -------------------------------------------------------------


async def test_a_burst_admits_the_limit_then_refills(backend: tuple[Limiter, Clock | None]
                                                     ) -> None:
    limiter, clock = backend
    rpm = [lim("rpm", 3)]
    remaining = [header(await limiter.admit(rpm, 0, 0, "m"), "x-ratelimit-remaining-requests")
                 for _ in range(3)]
    assert remaining == ["2", "1", "0"]  # the last admitted request says 0
    with pytest.raises(RateLimited) as e:
        await limiter.admit(rpm, 0, 0, "m")
    assert e.value.code == "rate_limit_exceeded" and "3 requests per minute" in e.value.message
    assert 19 <= int(e.value.headers["retry-after"]) <= 20  # one request refills in 20 s
    assert e.value.headers["x-ratelimit-remaining-requests"] == "0"
    await limiter.admit([lim("rpm", 3, scope_id=2)], 0, 0, "m")  # another key: its own
    if clock is not None:
        clock.advance(20)
        await limiter.admit(rpm, 0, 0, "m")
        with pytest.raises(RateLimited):
            await limiter.admit(rpm, 0, 0, "m")


async def test_tokens_per_minute_reserve_then_settle(backend: tuple[Limiter, Clock | None]
                                                     ) -> None:
    limiter, _ = backend
    tpm = [lim("tpm", 1000)]
    first = await limiter.admit(tpm, 600, 10, "m")
    assert header(first, "x-ratelimit-remaining-tokens") == "400"
    assert header(first, "x-ratelimit-limit-tokens") == "1000"
    with pytest.raises(RateLimited) as e:
        await limiter.admit(tpm, 600, 10, "m")
    assert "1000 tokens per minute" in e.value.message
    first.settle(100)  # it used 100 of its 600: 500 come back
    await settled(limiter)
    second = await limiter.admit(tpm, 600, 10, "m")
    assert 299 <= int(header(second, "x-ratelimit-remaining-tokens")) <= 300
    second.settle(900)  # more than reserved (a stream longer than max_tokens cannot be,
    await settled(limiter)  # but the settlement takes what was used, whatever it was)
    with pytest.raises(RateLimited):
        await limiter.admit(tpm, 1, 1, "m")
    with pytest.raises(ReservationTooLarge) as big:  # more than a minute's worth: never
        await limiter.admit(tpm, 1001, 1, "m")
    assert big.value.status == 400 and big.value.param == "max_tokens"


async def test_concurrency(backend: tuple[Limiter, Clock | None]) -> None:
    limiter, _ = backend
    two = [lim("max_concurrent", 2, "u", 7)]
    a = await limiter.admit(two, 0, 0, "m")
    await limiter.admit(two, 0, 0, "m")
    with pytest.raises(ConcurrencyLimited) as e:
        await limiter.admit(two, 0, 0, "m")
    assert e.value.code == "concurrency_limit_exceeded" and "This key's user" in e.value.message
    assert e.value.headers["retry-after"] == "1"
    a.settle(5)
    a.settle(5)  # a second settlement does nothing
    await settled(limiter)
    await limiter.admit(two, 0, 0, "m")
    with pytest.raises(ConcurrencyLimited):
        await limiter.admit(two, 0, 0, "m")


@pytest.mark.parametrize("kind", ["daily_tokens", "monthly_tokens"])
async def test_budgets(backend: tuple[Limiter, Clock | None], kind: str) -> None:
    limiter, clock = backend
    budget = [lim(kind, 1000, "c", 3)]
    first = await limiter.admit(budget, 400, 5, "m")
    assert header(first, "x-ratelimit-remaining-tokens") == "600"
    with pytest.raises(BudgetExceeded) as e:
        await limiter.admit(budget, 700, 5, "m")  # 400 reserved + 700 > 1000
    err = e.value
    assert err.code == "budget_exceeded" and err.status == 429
    assert "600 are left" in err.message and "resets at" in err.message
    wall = clock.wall if clock else time.time()
    assert abs(int(err.headers["retry-after"]) - (period_end(kind, wall) - wall)) <= 2
    first.settle(100)
    await settled(limiter)
    second = await limiter.admit(budget, 700, 5, "m")  # 100 spent + 700 fits
    assert header(second, "x-ratelimit-remaining-tokens") == "200"
    second.settle(700)
    await settled(limiter)
    with pytest.raises(BudgetExceeded) as e:
        await limiter.admit(budget, 201, 5, "m")
    assert "200 are left" in e.value.message
    await limiter.admit(budget, 200, 5, "m")
    with pytest.raises(ReservationTooLarge):
        await limiter.admit(budget, 1001, 5, "m")  # more than the whole budget
    if clock is not None:  # a new period: the budget is whole again
        clock.advance(period_end(kind, clock.wall) - clock.wall + 1)
        await limiter.admit(budget, 800, 5, "m")


async def test_all_limits_or_none(backend: tuple[Limiter, Clock | None]) -> None:
    """A request refused by one limit takes nothing from the others."""
    limiter, _ = backend
    both = [lim("rpm", 3), lim("max_concurrent", 1)]
    held = await limiter.admit(both, 0, 0, "m")
    for _ in range(5):
        with pytest.raises(ConcurrencyLimited):
            await limiter.admit(both, 0, 0, "m")
    held.settle(0)
    await settled(limiter)
    for _ in range(2):  # the refusals spent none of the 3 requests a minute
        (await limiter.admit(both, 0, 0, "m")).settle(0)
        await settled(limiter)
    with pytest.raises(RateLimited):
        await limiter.admit(both, 0, 0, "m")


async def test_the_tightest_limit_of_each_kind_is_in_the_headers(
        backend: tuple[Limiter, Clock | None]) -> None:
    limiter, _ = backend
    limits = [lim("rpm", 100), lim("rpm", 5, "m", 1), lim("tpm", 10_000),
              lim("daily_tokens", 500, "u", 1)]
    ticket = await limiter.admit(limits, 50, 5, "m")
    h = {k.decode(): v.decode() for k, v in ticket.headers}
    assert h["x-ratelimit-limit-requests"] == "5"
    assert h["x-ratelimit-remaining-requests"] == "4"
    assert h["x-ratelimit-limit-tokens"] == "500"  # the budget: 450 left, the bucket 9,950
    assert h["x-ratelimit-remaining-tokens"] == "450"
    with pytest.raises(RateLimited) as e:
        for _ in range(5):
            await limiter.admit(limits, 1, 1, "m")
    assert "the model 'm'" in e.value.message


def test_durations_are_openais() -> None:
    assert [duration(s) for s in (0, 0.0171, 1, 1.5, 59.9994, 60, 360, 3725)] == [
        "0s", "18ms", "1s", "1.5s", "59.999s", "1m0s", "6m0s", "1h2m5s"]


# -- in process: the budgets survive a restart -------------------------------------------


async def test_the_in_process_budgets_survive_a_restart(store: Store) -> None:
    from paragate.background import StoreThread

    thread = StoreThread("test-limits")
    try:
        budget = [lim("daily_tokens", 1000, "k", 9), lim("monthly_tokens", 5000, "k", 9)]
        first = MemoryLimiter(store, thread)
        await first.start()
        (await first.admit(budget, 300, 3, "m")).settle(250)
        (await first.admit(budget, 300, 3, "m")).settle(300)
        await first.stop()  # saves them
        again = MemoryLimiter(store, thread)
        await again.start()
        ticket = await again.admit(budget, 100, 3, "m")
        assert header(ticket, "x-ratelimit-remaining-tokens") == "350"  # 1000 - 550 - 100
        with pytest.raises(BudgetExceeded):
            await again.admit(budget, 400, 3, "m")
        await again.stop()
    finally:
        thread.close()


# -- Redis: reservations expire, outages follow the fail mode ----------------------------


async def test_a_dead_gateways_reservations_expire(redis_prefix: str) -> None:
    """Its reservations are never settled nor renewed: they go by themselves."""
    dead = RedisLimiter(REDIS, prefix=redis_prefix, ttl=0.5)  # never started: no renewal
    limits = [lim("max_concurrent", 1), lim("daily_tokens", 1000)]
    await dead.admit(limits, 800, 5, "m")
    other = RedisLimiter(REDIS, prefix=redis_prefix, ttl=0.5)
    with pytest.raises(ConcurrencyLimited):
        await other.admit(limits, 100, 5, "m")
    await asyncio.sleep(0.7)
    ticket = await other.admit(limits, 1000, 5, "m")  # the whole budget again
    assert header(ticket, "x-ratelimit-remaining-tokens") == "0"
    await dead._client.close()
    await other._client.close()


async def test_reservations_in_flight_are_renewed(redis_prefix: str) -> None:
    live = RedisLimiter(REDIS, prefix=redis_prefix, ttl=0.6)
    await live.start()
    limits = [lim("max_concurrent", 1)]
    ticket = await live.admit(limits, 0, 0, "m")
    await asyncio.sleep(1.5)  # longer than its ttl: renewed every 0.2 s
    with pytest.raises(ConcurrencyLimited):
        await live.admit(limits, 0, 0, "m")
    ticket.settle(0)
    await settled(live)
    await live.admit(limits, 0, 0, "m")
    await live.stop()


async def test_a_settlement_sent_twice_counts_once(redis_prefix: str) -> None:
    """A batch is sent again when its reply came too late (or at shutdown): the
    committed tokens and the bucket's refund count once."""
    limiter = RedisLimiter(REDIS, prefix=redis_prefix)  # not started: sent by hand
    limits = [lim("daily_tokens", 1000), lim("tpm", 1000)]
    ticket = await limiter.admit(limits, 500, 5, "m")
    ticket.settle(300)
    batch = list(limiter._queue)
    await limiter._send(batch)
    await limiter._send(batch)  # again
    ok = await limiter.admit(limits, 700, 5, "m")  # 300 committed once: 700 fit
    h = {k.decode(): v.decode() for k, v in ok.headers}
    assert h["x-ratelimit-remaining-tokens"] == "0"
    await limiter._client.close()


async def test_a_lost_admission_is_released_once(redis_prefix: str) -> None:
    """An admission whose answer never came is released; releasing one that never ran
    (or twice) takes nothing from anyone."""
    limiter = RedisLimiter(REDIS, prefix=redis_prefix)
    limits = [lim("max_concurrent", 1), lim("daily_tokens", 1000)]
    held = await limiter.admit(limits, 600, 5, "m")
    limiter._release(limits, 600, "never-admitted")
    limiter._release(limits, 600, held.id)
    limiter._release(limits, 600, held.id)
    await limiter._send(list(limiter._queue))
    limiter._queue.clear()
    ticket = await limiter.admit(limits, 1000, 5, "m")  # the slot and the budget: whole
    assert header(ticket, "x-ratelimit-remaining-tokens") == "0"
    with pytest.raises(ConcurrencyLimited):
        await limiter.admit(limits, 1, 1, "m")
    await limiter._client.close()


async def test_a_script_error_follows_the_fail_mode_and_says_so(
        redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """A key of the wrong type (another deployment sharing the prefix): the script
    fails; the request gets the fail mode, and the log says it was the script, not an
    outage. A settlement that fails the same way is dropped, not retried for ever."""
    limiter = RedisLimiter(REDIS, prefix=redis_prefix)
    await limiter._client.execute("SET", f"{{{redis_prefix}}}:c:k:1:max_concurrent", "x")
    ticket = await limiter.admit([lim("max_concurrent", 2)], 0, 0, "m")
    assert ticket.headers == []  # admitted uncounted (open, the default)
    assert "the rate-limit script failed in Redis" in caplog.text
    assert "WRONGTYPE" in caplog.text
    await limiter.start()
    budget = [lim("daily_tokens", 100, "k", 2)]
    held = await limiter.admit(budget, 10, 1, "m")
    await limiter._client.execute("SET", f"{{{redis_prefix}}}:b:k:2:daily_tokens", "x")
    held.settle(5)
    await settled(limiter)
    assert "settlements dropped" in caplog.text
    assert not limiter._queue and held.id not in limiter._live
    await limiter.stop()


async def test_thousands_of_expired_reservations_are_swept(redis_prefix: str) -> None:
    """A gateway killed holding more reservations on one budget than Lua can unpack
    at once (about 8,000) must not break the next admission."""
    dead = RedisLimiter(REDIS, prefix=redis_prefix, ttl=0.5)
    budget = [lim("daily_tokens", 100_000, "m", 1)]
    await asyncio.gather(*(dead.admit(budget, 10, 1, "m") for _ in range(9000)))
    await asyncio.sleep(1.6)  # the ticket keys (ttl + 1 s) and the reservations expire
    other = RedisLimiter(REDIS, prefix=redis_prefix)
    ticket = await other.admit(budget, 100_000, 1, "m")  # the whole budget again
    assert header(ticket, "x-ratelimit-remaining-tokens") == "0"
    await dead._client.close()
    await other._client.close()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_unreachable_follows_the_fail_mode(
        redis_prefix: str, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    proxy = TcpProxy("127.0.0.1", 6379)
    limiter = RedisLimiter(f"redis://127.0.0.1:{proxy.port}/0", prefix=redis_prefix,
                           timeout=0.2, fail_mode=mode)
    await limiter.start()
    try:
        rpm = [lim("rpm", 2)]
        await limiter.admit(rpm, 0, 0, "m")
        proxy.down()
        started = time.monotonic()
        for _ in range(20):
            if mode == "open":
                ticket = await limiter.admit(rpm, 0, 0, "m")  # uncounted, no headers
                assert ticket.headers == []
                ticket.settle(0)
            else:
                with pytest.raises(Exception) as e:
                    await limiter.admit(rpm, 0, 0, "m")
                assert getattr(e.value, "code", None) == "limits_unavailable"
                assert getattr(e.value, "status", None) == 503
        assert time.monotonic() - started < 2  # never a hang per request
        assert "Redis is unreachable for rate limits" in caplog.text
        assert caplog.text.count("Redis is unreachable") == 1  # not once per request
        proxy.up()
        await asyncio.sleep(1.1)  # the client's back-off
        await limiter.admit(rpm, 0, 0, "m")  # counted again: the second of 2
        with pytest.raises(RateLimited):
            await limiter.admit(rpm, 0, 0, "m")
        assert "Redis answers again" in caplog.text
    finally:
        await limiter.stop()
        proxy.close()


async def test_settlements_wait_for_redis_to_come_back(redis_prefix: str) -> None:
    proxy = TcpProxy("127.0.0.1", 6379)
    limiter = RedisLimiter(f"redis://127.0.0.1:{proxy.port}/0", prefix=redis_prefix,
                           timeout=0.2)
    await limiter.start()
    try:
        budget = [lim("daily_tokens", 1000)]
        ticket = await limiter.admit(budget, 500, 5, "m")
        proxy.down()
        ticket.settle(300)  # queued while Redis is away
        await asyncio.sleep(0.5)
        proxy.up()
        for _ in range(100):
            if not limiter._queue:
                break
            await asyncio.sleep(0.05)
        ok = await limiter.admit(budget, 700, 5, "m")  # 300 committed: 700 fit, exactly
        assert header(ok, "x-ratelimit-remaining-tokens") == "0"
    finally:
        await limiter.stop()
        proxy.close()


# -- through the gateway -----------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def limited(request: pytest.FixtureRequest, store: Store, keys: Keys, tmp_path: Path,
                  redis_prefix: str) -> AsyncIterator[httpx.AsyncClient]:
    settings: dict[str, Any] = {}
    if request.param == "redis":
        settings = {"redis_url": REDIS, "redis_prefix": redis_prefix}
    gw = build_gateway(store, tmp_path, **settings)
    await gw.start()
    transport = httpx.ASGITransport(app=App(gw))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        c.gateway = gw  # type: ignore[attr-defined]
        yield c
    await gw.stop()


async def _applied(client: httpx.AsyncClient) -> None:
    gw: Gateway = client.gateway  # type: ignore[attr-defined]
    await gw.refresher.refresh()


async def test_429_in_the_envelope_with_headers(limited: httpx.AsyncClient, keys: Keys
                                                ) -> None:
    for left in ("1", "0"):
        r = await post(limited, keys.throttled, model="alfred-4.2", prompt="x", max_tokens=1)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert r.headers["x-ratelimit-remaining-requests"] == left
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    r = await post(limited, keys.throttled, model="alfred-4.2", prompt="x", max_tokens=1)
    err = assert_envelope(r, 429, "rate_limit_exceeded", type_="rate_limit_error")
    assert "2 requests per minute" in err["message"] and "this key" in err["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # other keys are not affected, and carry no limit headers
    r = await post(limited, keys.full, model="alfred-4.2", prompt="x")
    assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers


async def test_refused_requests_spend_nothing(limited: httpx.AsyncClient, keys: Keys) -> None:
    # A bad body, an unknown model and a request over the model's own max_tokens limit
    # are all refused before forwarding: the key's 2 requests/minute are still there.
    for body in ({"model": "alfred-4.2", "prompt": "x", "temperature": 9},
                 {"model": "nope", "prompt": "x"},
                 {"model": "limited", "prompt": "x", "max_tokens": 11},
                 {"model": "alfred-4.2", "prompt": ["x"] * 65}):
        r = await post(limited, keys.throttled, **body)
        assert r.status_code in (400, 404), r.text
    for _ in range(2):
        r = await post(limited, keys.throttled, model="alfred-4.2", prompt="x", max_tokens=1)
        assert r.status_code == 200, r.text
    r = await post(limited, keys.throttled, model="alfred-4.2", prompt="x", max_tokens=1)
    assert r.status_code == 429


async def test_a_nearly_spent_budget_admits_a_stream_only_if_it_fits(
        limited: httpx.AsyncClient, store: Store, keys: Keys) -> None:
    """The fake reports 3 prompt tokens and one completion token per max_tokens; the
    prompt "ab" is estimated at 4 (2 bytes + 2)."""
    control.keys.update(store, CLI, keys.full_id, rate_limits={"daily_tokens": 40})
    await _applied(limited)
    body = {"model": "alfred-4.2", "prompt": "ab", "stream": True}
    r = await limited.post("/api/v2/completions", headers=auth(keys.full),
                           json={**body, "max_tokens": 20})  # reserves 24, uses 23
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert r.headers["x-ratelimit-remaining-tokens"] == "16"
    await settled(limited.gateway.limiter)  # type: ignore[attr-defined]
    r = await post(limited, keys.full, **body, max_tokens=14)  # reserves 18 > 17
    err = assert_envelope(r, 429, "budget_exceeded", type_="rate_limit_error")
    assert "17 are left" in err["message"]
    r = await limited.post("/api/v2/completions", headers=auth(keys.full),
                           json={**body, "max_tokens": 13})  # reserves 17: fits, exactly
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-tokens"] == "0"
    await settled(limited.gateway.limiter)  # type: ignore[attr-defined]
    # it used 3 + 13: one token is left, less than the smallest request reserves (2)
    r = await post(limited, keys.full, model="alfred-4.2", prompt="", max_tokens=0)
    err = assert_envelope(r, 429, "budget_exceeded")
    assert "1 are left" in err["message"]


async def test_a_model_limit_counts_every_caller(limited: httpx.AsyncClient, store: Store,
                                                 keys: Keys) -> None:
    control.models.update(store, CLI, "alfred-4.2", rate_limits={"rpm": 3})
    await _applied(limited)
    for key in (keys.full, keys.admin, keys.restricted):  # admins' keys too
        r = await post(limited, key, model="alfred-4.2", prompt="x", max_tokens=1)
        assert r.status_code == 200
    r = await post(limited, keys.full, model="alfred-4.2", prompt="x", max_tokens=1)
    err = assert_envelope(r, 429, "rate_limit_exceeded")
    assert "the model 'alfred-4.2'" in err["message"]
    r = await post(limited, keys.full, model="limited", prompt="x", max_tokens=1)
    assert r.status_code == 200  # another model


async def test_user_and_company_limits(limited: httpx.AsyncClient, store: Store, fake: FakeVLLM
                                       ) -> None:
    company = control.companies.create(store, CLI, "Limited Inc",
                                       rate_limits={"max_concurrent": 1})
    user = control.users.create(store, CLI, email="u@limited.example", company_id=company.id,
                                rate_limits={"rpm": 2})
    control.models.update(store, CLI, "slow", company_ids=None)
    a, _ = make_key(store, "a", user_id=user.id)
    b, _ = make_key(store, "b", user_id=user.id)
    await _applied(limited)

    async def second() -> httpx.Response:
        await asyncio.sleep(0.1)  # while the slow stream holds the company's one slot
        return await post(limited, b, model="alfred-4.2", prompt="x", max_tokens=1)

    held, r = await asyncio.gather(
        post(limited, a, model="slow", prompt="x", max_tokens=10, stream=True), second())
    assert held.status_code == 200 and held.text.endswith("data: [DONE]\n\n")
    err = assert_envelope(r, 429, "concurrency_limit_exceeded")
    assert "This key's company" in err["message"]
    await settled(limited.gateway.limiter)  # type: ignore[attr-defined]
    r = await post(limited, b, model="alfred-4.2", prompt="x", max_tokens=1)
    assert r.status_code == 200  # the user's second request this minute
    r = await post(limited, a, model="alfred-4.2", prompt="x", max_tokens=1)
    err = assert_envelope(r, 429, "rate_limit_exceeded")
    assert "this key's user" in err["message"]


async def test_errors_after_admission_carry_the_headers(limited: httpx.AsyncClient,
                                                        keys: Keys) -> None:
    r = await post(limited, keys.throttled, model="down", prompt="x", max_tokens=1)
    assert r.status_code == 503 and r.headers["x-ratelimit-remaining-requests"] == "1"


async def test_usage_settles_the_tokens_per_minute(limited: httpx.AsyncClient, store: Store,
                                                   keys: Keys) -> None:
    control.keys.update(store, CLI, keys.full_id, rate_limits={"tpm": 1000})
    await _applied(limited)
    r = await post(limited, keys.full, model="alfred-4.2", prompt="x" * 97, max_tokens=400)
    assert r.status_code == 200  # reserved 99 + 400, used 3 + 400
    assert r.headers["x-ratelimit-remaining-tokens"] == "501"
    await settled(limited.gateway.limiter)  # type: ignore[attr-defined]
    r = await post(limited, keys.full, model="alfred-4.2", prompt="x", max_tokens=590)
    assert r.status_code == 200  # 501 + 96 back (and a little refill): 593 fits
    await wait_usage(store, lambda rows: len(rows) >= 2)


# -- the caps on one request -------------------------------------------------------------


async def test_caps_on_one_request(client: httpx.AsyncClient, store: Store, keys: Keys,
                                   gateway: Gateway) -> None:
    r = await post(client, keys.full, model="alfred-4.2", prompt=["x"] * 65, max_tokens=1)
    assert_envelope(r, 400, "invalid_value", "prompt")
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", n=17, max_tokens=1)
    assert_envelope(r, 400, "invalid_value", "n")
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", n=2, best_of=17,
                   max_tokens=1)
    assert_envelope(r, 400, "invalid_value", "best_of")
    r = await post(client, keys.full, model="alfred-4.2", prompt=["x"] * 64, n=16,
                   max_tokens=1000)  # 64 x 16 x 1,000 > 1,000,000
    err = assert_envelope(r, 400, "reservation_too_large", "max_tokens")
    assert "1000000" in err["message"]
    control.models.update(store, CLI, "alfred-4.2", max_prompts=2, max_n=2,
                          max_request_tokens=100)
    await gateway.refresher.refresh()
    r = await post(client, keys.full, model="alfred-4.2", prompt=["x"] * 3, max_tokens=1)
    assert_envelope(r, 400, "invalid_value", "prompt")
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", max_tokens=98)
    assert_envelope(r, 400, "reservation_too_large", "max_tokens")  # 3 + 98 > 100
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", max_tokens=97)
    assert r.status_code == 200


async def test_priority_only_for_companies_allowed(client: httpx.AsyncClient, store: Store,
                                                   keys: Keys, gateway: Gateway,
                                                   fake: FakeVLLM) -> None:
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", priority=-10)
    assert_envelope(r, 403, "priority_not_allowed", "priority")
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", priority=0)
    assert r.status_code == 200  # the default changes nothing
    control.companies.update(store, CLI, 1, allow_priority=True)
    await gateway.refresher.refresh()
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", priority=-10)
    assert r.status_code == 200
    assert fake.requests[-1]["priority"] == -10


# -- setting them ------------------------------------------------------------------------


LIMITS = {"rpm": 60, "tpm": 100_000, "max_concurrent": 4, "daily_tokens": 2_000_000,
          "monthly_tokens": 40_000_000}
NONE = dict.fromkeys(LIMITS)


async def test_the_api_sets_and_shows_limits(client: httpx.AsyncClient, store: Store,
                                             gateway: Gateway) -> None:
    root, _ = make_key(store, "root", is_admin=True)
    await gateway.refresher.refresh()
    admin = auth(root)
    r = await client.post("/api/v2/companies", headers=admin, json={
        "name": "Budgeted", "rate_limits": {"daily_tokens": 1000}, "allow_priority": True})
    assert r.status_code == 201, r.text
    company = r.json()
    assert company["rate_limits"] == {**NONE, "daily_tokens": 1000}
    assert company["allow_priority"] is True
    r = await client.patch(f"/api/v2/companies/{company['id']}", headers=admin,
                           json={"rate_limits": {"rpm": 5, "daily_tokens": None}})
    assert r.json()["rate_limits"] == {**NONE, "rpm": 5}  # merged; null removed one
    r = await client.post("/api/v2/users", headers=admin, json={
        "email": "b@budgeted.example", "company_id": company["id"], "rate_limits": LIMITS})
    assert r.status_code == 201 and r.json()["rate_limits"] == LIMITS
    user = r.json()["id"]
    r = await client.patch(f"/api/v2/users/{user}", headers=admin, json={"rate_limits": None})
    assert r.json()["rate_limits"] == NONE
    r = await client.post("/api/v2/api-keys", headers=admin, json={
        "name": "k", "user_id": user, "rate_limits": {"tpm": 500}, "rate_limit_rpm": 7})
    assert r.status_code == 201, r.text
    key = r.json()
    assert key["rate_limits"] == {**NONE, "rpm": 7, "tpm": 500} and key["rate_limit_rpm"] == 7
    r = await client.patch(f"/api/v2/api-keys/{key['id']}", headers=admin,
                           json={"rate_limit_rpm": None})
    assert r.json()["rate_limits"] == {**NONE, "tpm": 500} and r.json()["rate_limit_rpm"] is None
    r = await client.patch("/api/v2/models/alfred-4.2", headers=admin, json={
        "rate_limits": {"rpm": 1000}, "limits": {"max_n": 4}})
    assert r.status_code == 200, r.text
    assert r.json()["rate_limits"] == {**NONE, "rpm": 1000}
    assert r.json()["limits"]["max_n"] == 4
    audit = [e.action for e in control.audit.list_(store, CLI, limit=100).data]
    assert "company.update" in audit and "api_key.update" in audit


@pytest.mark.parametrize(("body", "param"), [
    ({"rate_limits": {"rpm": 0}}, "rate_limits.rpm"),
    ({"rate_limits": {"rpm": "60"}}, None),
    ({"rate_limits": {"per_hour": 5}}, None),
    ({"rate_limits": {"tpm": 1.5}}, None),
])
async def test_bad_limits_are_refused(client: httpx.AsyncClient, store: Store,
                                      gateway: Gateway, body: dict[str, Any],
                                      param: str | None) -> None:
    root, _ = make_key(store, "root", is_admin=True)
    await gateway.refresher.refresh()
    r = await client.post("/api/v2/users", headers=auth(root),
                          json={"email": "x@y.example", "company_id": 1, **body})
    assert r.status_code == 400, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param


async def test_only_admins_set_limits(client: httpx.AsyncClient, store: Store,
                                      gateway: Gateway) -> None:
    """A user who manages their own keys could otherwise lift the limits put on them."""
    user = control.users.create(store, CLI, email="km@default.example", company_id=1,
                                key_manager=True)
    secret, public_id = make_key(store, "own", user_id=user.id)
    control.keys.update(store, CLI, public_id, rate_limits={"rpm": 5})
    await gateway.refresher.refresh()
    r = await client.patch(f"/api/v2/api-keys/{public_id}", headers=auth(secret),
                           json={"rate_limits": {"rpm": None}})
    assert_envelope(r, 403, "permission_denied", "rate_limits")
    r = await client.post("/api/v2/api-keys", headers=auth(secret),
                          json={"name": "k2", "rate_limit_rpm": 1000})
    assert_envelope(r, 403, "permission_denied", "rate_limits")
    r = await client.patch(f"/api/v2/api-keys/{public_id}", headers=auth(secret),
                           json={"name": "renamed"})
    assert r.status_code == 200 and r.json()["rate_limits"]["rpm"] == 5


def test_the_cli_sets_limits(store: Store, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    from paragate.cli import main

    monkeypatch.setenv("PARAGATE_DATABASE_URL", str(store.url))

    def run(*argv: str) -> str:
        try:
            main(list(argv))
        except SystemExit as e:
            raise AssertionError(f"exit {e.code}: {capsys.readouterr().err}") from None
        return capsys.readouterr().out

    company = run("companies", "create", "CLI Inc", "--tpm", "1000",
                  "--monthly-tokens", "9000").splitlines()[-1]
    run("companies", "update", company, "--rpm", "10", "--remove-limit", "tpm")
    assert control.companies.get(store, CLI, int(company)).rate_limits == {
        "rpm": 10, "monthly_tokens": 9000}
    user = run("users", "create", "--company", company, "--email", "c@cli.example",
               "--max-concurrent", "2").splitlines()[-1]
    run("users", "update", user, "--daily-tokens", "500")
    assert control.users.get(store, CLI, int(user)).rate_limits == {
        "max_concurrent": 2, "daily_tokens": 500}
    run("keys", "create", "--name", "old", "--user", user, "--rate-limit-rpm", "3")
    run("keys", "create", "--name", "new", "--user", user, "--rpm", "4", "--tpm", "99")
    found = {k.record.name: k for k in control.keys.list_(store, CLI, user_id=int(user)).data}
    assert found["old"].record.rate_limits == {"rpm": 3}
    assert found["new"].record.rate_limits == {"rpm": 4, "tpm": 99}
    out = run("keys", "update", found["new"].record.public_id, "--remove-limit", "rpm",
              "--daily-tokens", "7")
    assert "tpm=99 daily-tokens=7" in out
    assert "rpm=4" not in run("keys", "list", "--user", user)
    run("models", "add", "cli-model", "--upstream", "http://127.0.0.1:9/v1", "--rpm", "100",
        "--max-n", "2", "--max-prompts", "3", "--max-request-tokens", "5000")
    run("models", "update", "cli-model", "--tpm", "10", "--unset", "max-n")
    m = control.models.get(store, CLI, "cli-model")
    assert m.rate_limits == {"rpm": 100, "tpm": 10} and m.max_n is None and m.max_prompts == 3
    assert "rpm=100 tpm=10" in run("models", "list")


def test_serve_refuses_per_process_limits_with_workers(
        store: Store, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from paragate.cli import main

    monkeypatch.setenv("PARAGATE_DATABASE_URL", str(store.url))
    make_key(store, "limited", rate_limit_rpm=5)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--workers", "2", "--port", "1"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "PARAGATE_REDIS_URL" in err and "PARAGATE_LIMITS_PER_PROCESS" in err
