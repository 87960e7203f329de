"""What choosing a replica costs (issue 9's aim: <= 5 µs among eight): ``Fleet.choose``
for 1, 2 and 8 replicas, equal and unequal weights, loads spread as under traffic, and
with prefix affinity, in microseconds per call (median of 5 runs of ``timeit``). Prints
a Markdown table.

    .venv/bin/python bench/balancer.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import timeit
from datetime import UTC, datetime

from paragate.store import ReplicaRecord
from paragate.upstream.balancer import Fleet, Replica, affinity_key

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def fleet(weights: list[int], seed: int) -> Fleet:
    records = tuple(ReplicaRecord(
        id=i + 1, model_id=1, url=f"http://gpu-{i}:8000/v1", weight=w,
        upstream_api_key=None, enabled=True, draining=False, health_url=None,
        discover=False, version=1,
        created_at=NOW, updated_at=NOW, deleted_at=None) for i, w in enumerate(weights))
    members = [Replica(r) for r in records]
    rng = random.Random(seed)
    for m in members:  # as under load: some in flight here, some queued elsewhere
        m.inflight, m.others = rng.randrange(0, 20), rng.randrange(0, 40)
    return Fleet("m", records, members)


def per_call_us(f: Fleet, number: int, key: int | None = None) -> float:
    rng = random.Random(7)
    tried: list[Replica] = []
    runs = timeit.repeat(lambda: f.choose(tried, rng, key), number=number, repeat=5)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    print("| replicas | weights | µs per choice |\n|---|---|---|")
    for label, weights in [("1", [1]), ("2", [1, 1]), ("8", [1] * 8),
                           ("8", [1, 2, 3, 4, 1, 2, 3, 4])]:
        kind = "equal" if len(set(weights)) == 1 else "unequal (1-4)"
        us = per_call_us(fleet(weights, 1), args.number)
        print(f"| {label} | {kind} | {us:.2f} |")
    f = fleet([1] * 8, 2)
    f.members[0].ejected = True
    f.members[1].takes_traffic = False
    print(f"| 8, one ejected and one draining | equal | {per_call_us(f, args.number):.2f} |")
    body = {"prompt": "You are a helpful assistant. " * 20 + "Question 17?"}
    key_us = statistics.median(timeit.repeat(
        lambda: affinity_key("prefix", body, 256), number=args.number, repeat=5)
    ) / args.number * 1e6
    key = affinity_key("prefix", body, 256)
    print(f"| 8, prefix affinity (the key: {key_us:.2f} µs more) | equal | "
          f"{per_call_us(fleet([1] * 8, 1), args.number, key):.2f} |")
    direct, through = post_overhead_us(args.number // 2)
    print(f"\n`Balancer.post` with one replica, fleet lookup included, around a stub pool's "
          f"`post`: {through:.2f} µs against {direct:.2f} µs direct, "
          f"{through - direct:.2f} µs added")


def post_overhead_us(number: int) -> tuple[float, float]:
    """(µs per ``async with`` of a stub pool's ``post``, µs through ``Balancer.post``
    with the fleet lookup): what the balancer adds to a request with one replica."""
    import asyncio
    from contextlib import asynccontextmanager
    from typing import Any

    from paragate.upstream.balancer import Balancer

    class Answer:
        status = 200

    class Pool:
        @asynccontextmanager
        async def post(self, *args: Any) -> Any:
            yield Answer()

    async def run() -> tuple[float, float]:
        pool = Pool()
        balancer = Balancer(pool)  # type: ignore[arg-type]
        records = fleet([1], 1).source
        started = time.perf_counter()
        for _ in range(number):
            async with pool.post("u", b"", None):
                pass
        direct = (time.perf_counter() - started) / number * 1e6
        started = time.perf_counter()
        for _ in range(number):
            async with balancer.post(balancer.fleet(1, "m", records), b""):
                pass
        return direct, (time.perf_counter() - started) / number * 1e6

    return asyncio.run(run())


if __name__ == "__main__":
    main()
