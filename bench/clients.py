"""Upstream HTTP clients side by side: paragate's own (paragate.upstream) against aiohttp
and httpx, each posting completions to the fake vLLM as fast as it can.

    .venv/bin/python bench/clients.py [--seconds 3] [--concurrency 1 32]

The fake upstream runs on core 1, the client under test on core 0, one client at a time.
Figures: requests/s and the client process's CPU time per request (the figure that
decides how much of the gateway's core a client takes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve().parent
BODY = b'{"model":"fake-model","prompt":"Hello, my name is","max_tokens":16}'

Post = Callable[[], Awaitable[int]]


async def paragate_client(url: str) -> tuple[Post, Callable[[], Awaitable[None]]]:
    from paragate.upstream import Upstreams

    up = Upstreams(connect_timeout=5, read_timeout=30, max_connections=0)

    async def post() -> int:
        async with up.post(url, BODY, None) as r:
            await r.read()
            return r.status

    return post, up.close


async def aiohttp_client(url: str) -> tuple[Post, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def post() -> int:
        async with session.post(url, data=BODY,
                                headers={"Content-Type": "application/json"}) as r:
            await r.read()
            return r.status

    return post, session.close


async def httpx_client(url: str) -> tuple[Post, Callable[[], Awaitable[None]]]:
    import httpx

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None))

    async def post() -> int:
        r = await client.post(url, content=BODY, headers={"Content-Type": "application/json"})
        return r.status_code

    return post, client.aclose


CLIENTS = {"paragate": paragate_client, "aiohttp": aiohttp_client, "httpx": httpx_client}


async def measure(name: str, url: str, concurrency: int, seconds: float) -> tuple[float, float]:
    post, close = await CLIENTS[name](url)
    for _ in range(50):  # warm up: connections, caches
        await post()
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            if await post() != 200:
                raise RuntimeError("upstream refused")
            done += 1

    cpu0 = time.process_time()
    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu0
    await close()
    return done / elapsed, cpu / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fake = subprocess.Popen(
        [sys.executable, str(HERE / "fake_upstream.py"), "--port", "0", "--cpu", "1"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        port = int(fake.stdout.readline().split()[-1])
        url = f"http://127.0.0.1:{port}/v1/completions"
        os.sched_setaffinity(0, {0})
        print("| client | concurrency | requests/s | client CPU per request |")
        print("|---|---|---|---|")
        for concurrency in args.concurrency:
            for name in CLIENTS:
                print(f"{name}, concurrency {concurrency}", file=sys.stderr, flush=True)
                rate, cpu_us = uvloop.run(measure(name, url, concurrency, args.seconds))
                print(f"| {name} | {concurrency} | {rate:,.0f} | {cpu_us:.0f} µs |", flush=True)
    finally:
        fake.terminate()
        fake.wait(timeout=10)


if __name__ == "__main__":
    main()
