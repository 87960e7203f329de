"""Limits exact across instances: two ``paragate serve`` processes sharing the machine's
real Redis and PostgreSQL, a burst split across both; a gateway killed with reservations
held; Redis cut off under load (through a TCP proxy the test owns)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from paragate import control
from paragate.store import Store

from .conftest import CLI, REDIS, make_key, seed
from .fake_vllm import FakeVLLM
from .servers import GatewayProcess, TcpProxy, start_gateway

pytestmark = pytest.mark.postgres


async def burst(urls: list[str], key: str, body: bytes, n: int) -> tuple[list[int],
                                                                         list[bytes], float]:
    """``n`` requests at once, spread over ``urls``: each on a connection opened
    beforehand (``Connection: close``), all written in one go, so the whole burst lands
    within a fraction of a second. (status, the whole answer) of each, and how long the
    burst took."""
    conns = []
    for i in range(n):
        host, port = urls[i % len(urls)].removeprefix("http://").split(":")
        conns.append(await asyncio.open_connection(host, int(port)))
    request = (b"POST /api/v2/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
               b"Authorization: Bearer " + key.encode() + b"\r\nContent-Type: "
               b"application/json\r\nContent-Length: " + str(len(body)).encode()
               + b"\r\n\r\n" + body)
    started = time.monotonic()
    for _, writer in conns:
        writer.write(request)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        data = await reader.read()
        writer.close()
        return data

    answers = await asyncio.gather(*(answer(r, w) for r, w in conns))
    took = time.monotonic() - started
    return [int(a.split(b" ", 2)[1]) for a in answers], answers, took


def _retry_after(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"retry-after:"):
            return int(line.split(b":", 1)[1])
    raise AssertionError(f"no Retry-After: {answer[:300]!r}")


def two_gateways(tmp_path: Path, store: Store, prefix: str,
                 **settings: str) -> list[GatewayProcess]:
    return [start_gateway(tmp_path, str(store.url), PARAGATE_REDIS_URL=REDIS,
                          PARAGATE_REDIS_PREFIX=prefix, **settings) for _ in range(2)]


async def test_a_burst_across_two_instances_admits_the_limit(
        pg_store: Store, tmp_path: Path, fake: FakeVLLM, redis_prefix: str) -> None:
    seed(pg_store, fake)
    key, _ = make_key(pg_store, "burst", rate_limit_rpm=60)
    gws = await asyncio.to_thread(two_gateways, tmp_path, pg_store, redis_prefix)
    try:
        body = b'{"model": "alfred-4.2", "prompt": "x", "max_tokens": 1}'
        statuses, answers, took = await burst([g.url for g in gws], key, body, 500)
        admitted = statuses.count(200)
        print(f"burst of 500 over 2 gateways in {took:.2f} s: {admitted} admitted")
        # 60 at once, plus what refills during the burst (one a second)
        assert 59 <= admitted <= 61 + int(took), (admitted, took)
        assert statuses.count(429) == 500 - admitted
        for status, answer in zip(statuses, answers, strict=True):
            if status == 429:
                assert b'"code":"rate_limit_exceeded"' in answer
                assert 1 <= _retry_after(answer) <= 2  # one request refills each second
        assert len(fake.requests) == admitted  # the others never reached vLLM
    finally:
        for g in gws:
            g.stop()


async def test_a_token_budget_across_two_instances_with_streams(
        pg_store: Store, tmp_path: Path, fake: FakeVLLM, redis_prefix: str) -> None:
    """Each stream reserves 3 (its prompt: three token ids) + 7 tokens and uses as many
    (the fake reports 3 prompt tokens and 7 completion tokens): a budget of 600 admits
    60, whatever the order in which they are admitted and settle."""
    seed(pg_store, fake)
    user = control.users.create(pg_store, CLI, email="b@budget.example", company_id=1,
                                rate_limits={"daily_tokens": 600})
    key, _ = make_key(pg_store, "budget", user_id=user.id)
    gws = await asyncio.to_thread(two_gateways, tmp_path, pg_store, redis_prefix)
    try:
        body = (b'{"model": "alfred-4.2", "prompt": [1, 2, 3], "max_tokens": 7, '
                b'"stream": true}')
        statuses, answers, took = await burst([g.url for g in gws], key, body, 300)
        admitted = statuses.count(200)
        print(f"300 streams over 2 gateways in {took:.2f} s: {admitted} admitted")
        assert admitted == 60  # a budget does not refill
        for status, answer in zip(statuses, answers, strict=True):
            if status == 200:
                assert b"data: [DONE]\n\n" in answer
            else:
                assert status == 429 and b'"code":"budget_exceeded"' in answer
        await asyncio.sleep(0.5)  # the settlements: 60 x 10 committed, exactly
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(gws[1].url + "/api/v2/completions",
                                  headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "alfred-4.2", "prompt": "", "max_tokens": 0})
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
        assert "0 are left" in r.json()["error"]["message"]
    finally:
        for g in gws:
            g.stop()


async def test_a_killed_gateways_reservations_expire(
        pg_store: Store, tmp_path: Path, fake: FakeVLLM, redis_prefix: str) -> None:
    seed(pg_store, fake)
    key, public_id = make_key(pg_store, "held")
    control.keys.update(pg_store, CLI, public_id,
                        rate_limits={"max_concurrent": 2, "daily_tokens": 1000})
    gws = await asyncio.to_thread(two_gateways, tmp_path, pg_store, redis_prefix,
                                  PARAGATE_LIMITS_RESERVATION_TTL="2")
    doomed, other = gws
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            held = [client.build_request(
                "POST", doomed.url + "/api/v2/completions", headers=headers, json={
                    "model": "slow", "prompt": "x", "max_tokens": 400, "stream": True})
                for _ in range(2)]
            streams = [await client.send(r, stream=True) for r in held]
            assert [s.status_code for s in streams] == [200, 200]  # 2 x 402 reserved
            doomed.process.send_signal(signal.SIGKILL)  # dies holding both
            doomed.process.wait()
            for s in streams:
                await s.aclose()
            r = await client.post(other.url + "/api/v2/completions", headers=headers,
                                  json={"model": "alfred-4.2", "prompt": "x", "max_tokens": 1})
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "concurrency_limit_exceeded"
            killed = time.monotonic()
            while True:  # the dead gateway's reservations go by themselves
                r = await client.post(other.url + "/api/v2/completions", headers=headers,
                                      json={"model": "alfred-4.2", "prompt": "x" * 97,
                                            "max_tokens": 901})  # reserves the whole 1000
                if r.status_code == 200:
                    break
                assert time.monotonic() - killed < 10, r.text
                await asyncio.sleep(0.2)
            print(f"reservations expired {time.monotonic() - killed:.1f} s after the kill")
            assert 1.0 < time.monotonic() - killed < 6
    finally:
        for g in gws:
            g.stop()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_cut_off_under_load(pg_store: Store, tmp_path: Path, fake: FakeVLLM,
                                        redis_prefix: str, mode: str) -> None:
    seed(pg_store, fake)
    key, _ = make_key(pg_store, "load", rate_limit_rpm=1_000_000)
    proxy = TcpProxy("127.0.0.1", 6379)
    gw = await asyncio.to_thread(
        start_gateway, tmp_path, str(pg_store.url),
        PARAGATE_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0", PARAGATE_REDIS_PREFIX=redis_prefix,
        PARAGATE_LIMITS_FAIL_MODE=mode)
    seen: dict[int, int] = {}
    codes: set[str] = set()
    stop = asyncio.Event()

    async def load(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await client.post(gw.url + "/api/v2/completions",
                                  headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "alfred-4.2", "prompt": "x", "max_tokens": 1})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            if r.status_code != 200:
                codes.add(r.json()["error"]["code"])

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            workers = [asyncio.create_task(load(client)) for _ in range(8)]
            await asyncio.sleep(1)
            proxy.down()
            await asyncio.sleep(2)
            down = dict(seen)
            proxy.up()
            await asyncio.sleep(2.5)  # back-off, then counted again
            stop.set()
            await asyncio.gather(*workers)
        assert gw.process.poll() is None  # no crash
        print(f"{mode}: {seen} ({codes}); by the end of the outage: {down}")
        if mode == "open":
            assert set(seen) == {200}
        else:
            assert set(seen) <= {200, 503} and seen.get(503, 0) > 0
            assert codes == {"limits_unavailable"}
        assert seen[200] > down.get(200, 0)  # served again once Redis was back
        log = gw.log.read_text()
        assert "Redis is unreachable for rate limits" in log
        assert "Redis answers again" in log
    finally:
        gw.stop()
        proxy.close()
