"""Round-robin, random and paragate's default choice of replica, compared on time to
first token and throughput: a discrete-event simulation of vLLM-like replicas (queueing,
continuous batching) behind two gateway processes, each choosing with the real
``Fleet.choose`` on its own in-flight counts plus the queue each replica's /metrics
showed at the last health check (every second).

A replica runs at most ``--slots`` sequences at once (vLLM's max_num_seqs); the rest wait
in its queue. A running sequence's prefill takes ``prompt / prefill_rate`` and each
output token ``step * (1 + batch / slots)`` seconds (a fuller batch steps slower). The
replicas differ in speed (the last one is three times slower, as an older GPU), and one
of the two gateways sends most of the traffic, so neither sees the whole load alone.

    .venv/bin/python bench/balancing.py [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from paragate.store import ReplicaRecord
from paragate.upstream.balancer import Fleet, Replica

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@dataclass
class Request:
    arrived: float
    prompt: int
    output: int
    gateway: int
    first_token: float | None = None
    done: float | None = None


@dataclass
class Server:
    """One vLLM: a batch of running sequences, a FIFO queue, a speed."""

    speed: float  # 1.0: the reference GPU; 3.0: three times slower
    slots: int
    running: list[tuple[Request, int]] = field(default_factory=list)  # (request, left)
    waiting: list[Request] = field(default_factory=list)


class Simulation:
    def __init__(self, policy: str, *, seed: int, rate: float, seconds: float,
                 slots: int, speeds: list[float]) -> None:
        self.policy = policy
        self.rng = random.Random(seed)
        self.rate, self.seconds, self.slots = rate, seconds, slots
        self.servers = [Server(s, slots) for s in speeds]
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()
        self.done: list[Request] = []
        records = tuple(ReplicaRecord(
            id=i + 1, model_id=1, url=f"http://gpu-{i}:8000/v1", weight=1,
            upstream_api_key=None, enabled=True, draining=False, health_url=None, discover=False,
            version=1, created_at=NOW, updated_at=NOW, deleted_at=None)
            for i in range(len(speeds)))
        # two gateway processes, each with its own view of the same replicas
        self.fleets = [Fleet("m", records, [Replica(r) for r in records]) for _ in range(2)]
        self.turn = [0, 0]
        self.step = 0.02  # seconds per output token on the reference GPU, batch of one
        self.prefill_rate = 4000.0  # prompt tokens per second

    def at(self, t: float, kind: str, data: object = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    def choose(self, gateway: int) -> int:
        fleet = self.fleets[gateway]
        if self.policy == "round-robin":
            self.turn[gateway] = (self.turn[gateway] + 1) % len(self.servers)
            return self.turn[gateway]
        if self.policy == "random":
            return self.rng.randrange(len(self.servers))
        return fleet.choose([], self.rng).id - 1

    def run(self) -> dict[str, float]:
        t = 0.0
        while t < self.seconds:  # Poisson arrivals; gateway 0 gets 70% of them
            t += self.rng.expovariate(self.rate)
            req = Request(t, int(self.rng.uniform(200, 1200)),
                          int(self.rng.uniform(32, 256)), 0 if self.rng.random() < 0.7 else 1)
            self.at(t, "arrive", req)
        for s in range(int(self.seconds) + 60):
            self.at(float(s), "scrape")
        self.at(0.0, "tick")
        now = 0.0
        while self.events:
            now, _, kind, data = heapq.heappop(self.events)
            if kind == "arrive":
                assert isinstance(data, Request)
                i = self.choose(data.gateway)
                self.fleets[data.gateway].members[i].inflight += 1
                self.servers[i].waiting.append(data)
            elif kind == "scrape" and self.policy == "least-loaded (default)":
                for fleet in self.fleets:
                    for i, replica in enumerate(fleet.members):
                        server = self.servers[i]
                        queued = len(server.running) + len(server.waiting)
                        replica.others = max(queued - replica.inflight, 0)
            elif kind == "tick":
                self.tick(now)
                if now < self.seconds + 600 and (any(s.running or s.waiting
                                                     for s in self.servers)
                                                 or self.events):
                    self.at(now + 0.005, "tick")
        return self.figures()

    def tick(self, now: float) -> None:
        """5 ms of every server: admit waiting sequences, advance the running ones."""
        for i, server in enumerate(self.servers):
            while server.waiting and len(server.running) < server.slots:
                req = server.waiting.pop(0)
                # prefill: the first token comes after the prompt is processed
                prefill = req.prompt / self.prefill_rate * server.speed
                server.running.append((req, req.output))
                req.first_token = now + prefill
            batch = len(server.running)
            if not batch:
                continue
            per_token = self.step * server.speed * (1 + batch / server.slots)
            tokens = 0.005 / per_token  # tokens each sequence makes in this tick
            still = []
            for req, left in server.running:
                if req.first_token is not None and req.first_token > now:
                    still.append((req, left))
                    continue
                left_after = left - tokens
                if left_after <= 0:
                    req.done = now
                    self.done.append(req)
                    self.fleets[req.gateway].members[i].inflight -= 1
                else:
                    still.append((req, left_after))
            server.running = still

    def figures(self) -> dict[str, float]:
        measured = [r for r in self.done if r.arrived >= 5.0 and r.arrived < self.seconds]
        ttft = sorted((r.first_token or 0) - r.arrived for r in measured)
        end = max(r.done or 0 for r in self.done)
        tokens = sum(r.output for r in measured)
        span = max((r.done or 0) for r in measured) - 5.0
        return {
            "ttft_p50": statistics.median(ttft),
            "ttft_p99": ttft[int(len(ttft) * 0.99) - 1],
            "tokens_per_s": tokens / span,
            "all_done": end,
            "requests": len(measured),
        }


POLICIES = ["round-robin", "random", "least-loaded, this gateway's counts only",
            "least-loaded (default)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="4,7,8.5",
                        help="requests per second, comma-separated (capacity is about 9)")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", help="the file whose '## Balancing' section to write")
    args = parser.parse_args()
    speeds = [1.0, 1.0, 1.0, 3.0]
    rows = []
    rates = [float(r) for r in args.rates.split(",")]
    for rate in rates:
        for policy in POLICIES:
            runs = [Simulation(policy, seed=s, rate=rate, seconds=args.seconds,
                               slots=args.slots, speeds=speeds).run()
                    for s in range(args.seeds)]

            def med(k: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r[k] for r in runs)

            rows.append(f"| {rate:g}/s | {policy} | {med('ttft_p50'):.2f} s | "
                        f"{med('ttft_p99'):.2f} s | {med('tokens_per_s'):,.0f} | "
                        f"{med('all_done') - args.seconds:.0f} s |")
    table = ("| load | policy | time to first token p50 | p99 | output tokens/s | last "
             "request done after the arrivals end |\n|---|---|---|---|---|---|\n"
             + "\n".join(rows))
    text = (f"## Balancing\n\nFrom `bench/balancing.py` (a simulation, not a measurement "
            f"of the gateway: the real `Fleet.choose` in a discrete-event model of vLLM): "
            f"{len(speeds)} replicas, the last 3x slower; {args.slots} sequences at once "
            f"each; Poisson arrivals at {', '.join(f'{r:g}' for r in rates)} requests/s "
            f"(the four replicas finish about 9/s at most) for {args.seconds:g} s, "
            f"prompts 200-1200 tokens, answers 32-256; two gateway processes (70% / 30% of "
            f"the traffic); the first 5 s not measured; median of {args.seeds} seeds.\n\n"
            f"{table}\n")
    print(text)
    if args.out:
        path = Path(args.out)
        doc = path.read_text()
        start = doc.find("## Balancing")
        if start < 0:
            doc = doc.rstrip("\n") + "\n\n" + text
        else:
            end = doc.find("\n## ", start + 5)
            doc = doc[:start] + text + (doc[end + 1:] if end >= 0 else "")
        path.write_text(doc)


if __name__ == "__main__":
    main()
