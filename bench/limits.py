#!/usr/bin/env python3
"""What the limiter adds to one request, in microseconds: admitting and settling a
request against four limits (rpm, tpm, max_concurrent, daily_tokens), in process and in
the machine's Redis, and the caps every request passes (no limit set).

    .venv/bin/python bench/limits.py [--redis redis://127.0.0.1:6379/0] [--n 20000]

Sequential (c=1): the Redis figure is one round trip on loopback plus the client's and
the script's work; settlements are batched off the request path (their cost per request
is measured separately, sent 200 at a time as the background task does).
"""

from __future__ import annotations

import argparse
import time
import uuid

import uvloop

from paragate.limits import MemoryLimiter, limits_of
from paragate.limits.redis import RedisLimiter
from paragate.limits.resp import RedisClient
from paragate.protocol import parse_request

LIMITS = {"rpm": 10**9, "tpm": 10**12, "max_concurrent": 10**6, "daily_tokens": 10**15}
BODY = b'{"model": "m", "prompt": "Hello, my name is", "max_tokens": 16}'


def per_call(seconds: float, n: int) -> float:
    return seconds / n * 1e6


async def memory(n: int) -> float:
    limiter = MemoryLimiter()
    limits = limits_of("k", 1, LIMITS)
    started = time.perf_counter()
    for _ in range(n):
        ticket = await limiter.admit(limits, 100, 10, "m")
        ticket.settle(90)
    return per_call(time.perf_counter() - started, n)


def caps(n: int) -> float:
    req = parse_request(b"application/json", BODY)
    started = time.perf_counter()
    for _ in range(n):
        req.check_caps(max_prompts=64, max_n=16, allow_priority=False)
        req.reservation(reserve_max_tokens=16384, max_request_tokens=1_000_000)
    return per_call(time.perf_counter() - started, n)


async def redis(url: str, n: int) -> tuple[float, float, float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    limiter = RedisLimiter(url, prefix=prefix)  # not started: settlements sent here
    limits = limits_of("k", 1, LIMITS)
    for _ in range(200):  # connect, load the scripts
        (await limiter.admit(limits, 100, 10, "m")).settle(90)
    limiter._queue.clear()
    limiter._live.clear()
    started = time.perf_counter()
    tickets = []
    for _ in range(n):
        tickets.append(await limiter.admit(limits, 100, 10, "m"))
    admit = per_call(time.perf_counter() - started, n)
    started = time.perf_counter()
    for t in tickets:
        t.settle(90)
    queue = per_call(time.perf_counter() - started, n)
    started = time.perf_counter()
    while limiter._queue:
        batch = [limiter._queue.popleft() for _ in range(min(len(limiter._queue), 200))]
        await limiter._send(batch)
    send = per_call(time.perf_counter() - started, n)
    client = RedisClient(url)
    cursor: object = b"0"
    while True:
        reply = await client.execute("SCAN", cursor, "MATCH", f"{{{prefix}}}:*", "COUNT", 1000)
        assert isinstance(reply, list)
        cursor, found = reply[0], reply[1]
        if found:
            await client.execute("DEL", *found)  # type: ignore[misc]
        if cursor in (b"0", 0):
            break
    await client.close()
    await limiter._client.close()
    return admit, queue, send


async def ping(url: str, n: int) -> float:
    client = RedisClient(url)
    await client.execute("PING")
    started = time.perf_counter()
    for _ in range(n):
        await client.execute("PING")
    took = per_call(time.perf_counter() - started, n)
    await client.close()
    return took


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    n = args.n
    rows = [("caps and reservation, every request (no limit set)", caps(n)),
            ("in process: admit + settle, 4 limits", await memory(n))]
    admit, queue, send = await redis(args.redis, n)
    rows += [("Redis: a PING round trip (the floor)", await ping(args.redis, n)),
             ("Redis: admit, 4 limits (one script call, c=1)", admit),
             ("Redis: settle on the request path (queued)", queue),
             ("Redis: settle, sent off the request path, 200 a script", send)]
    print("| What | µs per request |\n|---|---|")
    for what, us in rows:
        print(f"| {what} | {us:.1f} |")


if __name__ == "__main__":
    uvloop.run(main())
