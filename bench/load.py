#!/usr/bin/env python3
"""Cheap async load driver for /api/v2/completions (gateway) or /v1/completions (vLLM/fake),
or, with --chat, for /api/v2/chat/completions or /v1/chat/completions.

The driver shares a core with the fake upstream, so it avoids aiohttp/httpx and tasks:
raw asyncio Protocols on uvloop, httptools' response parser, one precomputed request
byte string, and callback-driven request chaining (a response's completion sends the next).

    .venv/bin/python bench/load.py --url http://127.0.0.1:8000/v1/completions -c 32 -d 5
    .venv/bin/python bench/load.py --url ... --stream --max-tokens 64 --hold -c 2000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import sys
from collections import deque
from time import perf_counter
from typing import Any
from urllib.parse import urlsplit

import httptools
import msgspec
import uvloop


class Run:
    """Shared state: what to send, when to stop, and every measurement."""

    def __init__(self, a: argparse.Namespace) -> None:
        u = urlsplit(a.url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        body: dict[str, Any] = {"model": a.model, "prompt": a.prompt, "max_tokens": a.max_tokens}
        if a.chat:  # the same text, as the one user message
            body = {"model": a.model, "messages": [{"role": "user", "content": a.prompt}],
                    "max_tokens": a.max_tokens}
        if a.stream:
            body["stream"] = True
            if a.usage:
                body["stream_options"] = {"include_usage": True}
        raw = msgspec.json.encode(body)
        auth = f"authorization: Bearer {a.key}\r\n" if a.key else ""
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.req = (f"POST {path} HTTP/1.1\r\nhost: {u.netloc}\r\n{auth}"
                    f"content-type: application/json\r\ncontent-length: {len(raw)}\r\n\r\n"
                    ).encode() + raw
        self.stream: bool = a.stream
        # (chat: the role chunk +) tokens + optional usage event + [DONE]
        self.expected = (1 if a.chat else 0) + a.max_tokens + (1 if a.usage else 0) + 1
        self.total: int = a.requests or 0
        self.rate: float = a.rate or 0.0
        self.hold: bool = a.hold
        self.loop = asyncio.get_running_loop()
        self.issuing = True
        self.issued = self.scheduled = self.inflight = self.peak = 0
        self.ok = self.errors = self.dropped = 0
        self.status: dict[int, int] = {}
        self.first_error = ""
        self.error_kinds: dict[str, int] = {}  # the first 100 characters of each error: count
        # Histograms {microseconds: count}: O(1) per sample and bounded memory however long
        # the run (an array of 5M gaps sorted at the end cost ~300 MB of RSS).
        self.lat: dict[int, int] = {}
        self.ttfb: dict[int, int] = {}
        self.gaps: dict[int, int] = {}
        self.zero_gaps = 0  # events that arrived in the same read as the previous one
        self.t_start = self.t_end = self.t_last_send = 0.0
        self.idle: list[Conn] = []
        self.backlog: deque[float] = deque()  # open loop: intended send times not yet sent
        self.conns: set[Conn] = set()
        self.drained: asyncio.Future[None] = self.loop.create_future()

    def may_issue(self) -> bool:
        if self.issuing and self.total and self.issued >= self.total:
            self.issuing = False
        return self.issuing

    def ready(self, c: Conn) -> None:
        """A connection is free: give it the next request, or park it."""
        if self.hold:
            c.transport.close()
        elif self.rate:
            if self.backlog:
                c.send(self.backlog.popleft())
            else:
                self.idle.append(c)
        elif self.may_issue():
            c.send(perf_counter())
        self.check_drained()

    def tick(self) -> None:
        # Open loop: issue everything due by now at the ideal times t_start + k/rate, so
        # latency includes queueing when the target falls behind (no coordinated omission).
        due = int((perf_counter() - self.t_start) * self.rate) + 1
        if self.total:
            due = min(due, self.total)
        while self.scheduled < due and self.issuing:
            when = self.t_start + self.scheduled / self.rate
            self.scheduled += 1
            if self.idle:
                # Sent now: this tick's lateness (the ~1 ms timer granularity) is the
                # driver's, and would blur sub-millisecond latencies.
                self.idle.pop().send(perf_counter())
            else:
                self.backlog.append(when)  # waits because every connection is busy
        if self.total and self.scheduled >= self.total:
            self.issuing = False
        if self.issuing:
            self.loop.call_later(0.001, self.tick)

    def failed(self, why: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = why[:300]
        kind = why[:100]
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def check_drained(self) -> None:
        if not self.issuing and self.inflight == 0 and not self.backlog \
                and not self.drained.done():
            self.drained.set_result(None)

    async def connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: Conn(self), self.host, self.port)
        except OSError as e:
            self.failed(f"connect: {e}")


class Conn(asyncio.Protocol):
    __slots__ = ("busy", "done", "errbody", "events", "first", "last", "parser", "run",
                 "status", "t0", "tail", "transport")

    def __init__(self, run: Run) -> None:
        self.run = run
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False
        self.transport: asyncio.Transport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.run.conns.add(self)
        if self.run.hold:
            self.send(perf_counter())
        elif self.run.t_start:  # a reconnect during the run (not initial setup)
            self.run.ready(self)

    def send(self, t0: float) -> None:
        r = self.run
        r.issued += 1
        r.inflight += 1
        r.peak = max(r.peak, r.inflight)
        self.busy, self.t0, self.status, self.errbody = True, t0, 0, b""
        r.t_last_send = t0
        self.first = self.last = 0.0
        self.events, self.done, self.tail = 0, False, b"\n"
        self.transport.write(r.req)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        if self.status != 200:
            self.errbody += data[:300]
            return
        if not self.run.stream:
            return
        # Count SSE events as "\ndata:" occurrences; the 5-byte tail of the previous read
        # catches a marker split across reads without ever counting one twice.
        now = perf_counter()
        buf = self.tail + data
        k = buf.count(b"\ndata:")
        if k:
            r = self.run
            if self.last:
                g = r.gaps
                us = int((now - self.last) * 1e6)
                g[us] = g.get(us, 0) + 1
            else:
                self.first = now
            r.zero_gaps += k - 1
            self.last = now
            self.events += k
            if b"[DONE]" in buf:
                self.done = True
        self.tail = buf[-5:]

    def on_message_complete(self) -> None:
        now = perf_counter()
        r = self.run
        self.busy = False
        r.inflight -= 1
        r.t_end = now
        r.status[self.status] = r.status.get(self.status, 0) + 1
        if self.status != 200:
            r.failed(f"HTTP {self.status}: {self.errbody.decode(errors='replace')}")
        elif r.stream and (self.events != r.expected or not self.done):
            r.dropped += 1
            if not r.first_error:
                r.first_error = f"stream had {self.events} events, want {r.expected}"
        else:
            r.ok += 1
            add(r.lat, now - self.t0)
            if r.stream:
                add(r.ttfb, self.first - self.t0)
        if not self.parser.should_keep_alive():
            self.transport.close()  # connection_lost reconnects
        else:
            r.ready(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.transport.abort()
            if self.busy:
                self.lost(f"bad response: {e}")

    def lost(self, why: str) -> None:
        r = self.run
        self.busy = False
        r.inflight -= 1
        r.failed(why)

    def connection_lost(self, exc: Exception | None) -> None:
        r = self.run
        r.conns.discard(self)
        if self.busy:
            self.lost(f"connection lost: {exc or 'closed by peer'}")
        if r.issuing and not r.hold:
            r.loop.create_task(r.connect())  # keep the concurrency level
        r.check_drained()


def add(h: dict[int, int], seconds: float) -> None:
    us = int(seconds * 1e6)
    h[us] = h.get(us, 0) + 1


def pcts(h: dict[int, int], ps: dict[str, float], zeros: int = 0) -> dict[str, float]:
    """Nearest-rank percentiles in ms of a {us: count} histogram (+ `zeros` zero samples)."""
    h = dict(h)
    h[0] = h.get(0, 0) + zeros
    n = sum(h.values())
    out = {name: 0.0 for name in ps}
    if n == 0:
        return out
    keys = sorted(h)
    for name, p in ps.items():
        rank, seen = max(1, -(-p * n // 1)), 0
        for k in keys:
            seen += h[k]
            if seen >= rank:
                out[name] = k / 1000
                break
    return out


async def main(a: argparse.Namespace) -> dict[str, Any]:
    r = Run(a)
    gc.freeze()  # nothing we allocate per request is cyclic; skip scanning setup objects
    if a.hold:
        r.t_start = perf_counter()
        # Spread the opens over --ramp seconds so the listener's backlog is not flooded;
        # open what is due by the clock, so a late wake-up does not stretch the ramp.
        tasks: list[asyncio.Task[None]] = []
        while len(tasks) < a.concurrency:
            due = int((perf_counter() - r.t_start) / a.ramp * a.concurrency) + 1
            while len(tasks) < min(due, a.concurrency):
                tasks.append(r.loop.create_task(r.connect()))
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        r.issuing = False
    else:
        await asyncio.gather(*(r.connect() for _ in range(a.concurrency)))
        r.t_start = perf_counter()
        for c in list(r.conns):
            r.ready(c)
        if r.rate:
            r.tick()
        if a.duration:
            await asyncio.sleep(a.duration)
            r.issuing = False
    r.check_drained()
    try:
        await asyncio.wait_for(asyncio.shield(r.drained), a.timeout)
    except TimeoutError:
        for c in list(r.conns):
            if c.busy:
                c.lost("timeout")
        r.errors += len(r.backlog)  # open loop: never even sent
    for c in list(r.conns):
        c.transport.abort()
    await asyncio.sleep(0)
    elapsed = max((r.t_end or perf_counter()) - r.t_start, 1e-9)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {
        "url": a.url, "stream": r.stream, "hold": r.hold, "concurrency": a.concurrency,
        "requests": r.ok + r.dropped, "ok": r.ok, "errors": r.errors, "dropped": r.dropped,
        "status": {str(k): v for k, v in r.status.items()}, "peak_inflight": r.peak,
        "last_send_s": round(r.t_last_send - r.t_start, 3),  # --hold: how long opening took
        "elapsed_s": round(elapsed, 3), "rate": round((r.ok + r.dropped) / elapsed, 1),
        "latency_ms": pcts(r.lat, {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}),
    }
    if r.stream:
        out["events_expected"] = r.expected
        out["ttfb_ms"] = pcts(r.ttfb, {"p50": 0.5, "p99": 0.99})
        out["inter_chunk_ms"] = pcts(r.gaps, {"p50": 0.5, "p99": 0.99}, r.zero_gaps)
    out["driver_cpu_s"] = round(ru.ru_utime + ru.ru_stime, 3)
    out["driver_max_rss_mb"] = round(ru.ru_maxrss / 1024, 1)
    out["first_error"] = r.first_error
    out["error_kinds"] = r.error_kinds
    return out


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", default="", help="bearer token")
    ap.add_argument("--model", default="fake-model")
    ap.add_argument("--prompt", default="Hello, my name is", help="--chat: the user message")
    ap.add_argument("--chat", action="store_true", help="a chat completions body (--url must "
                    "be a chat/completions endpoint)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--usage", action="store_true", help="stream_options.include_usage")
    ap.add_argument("-c", "--concurrency", type=int, default=1)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("-d", "--duration", type=float, help="seconds of issuing requests")
    g.add_argument("-n", "--requests", type=int, help="total requests")
    ap.add_argument("--rate", type=float, help="open-loop target requests/s (total)")
    ap.add_argument("--hold", action="store_true", help="open C streams once, hold to the end")
    ap.add_argument("--ramp", type=float, default=1.0, help="--hold: seconds to open all")
    ap.add_argument("--timeout", type=float, default=60.0, help="drain limit after issuing")
    ap.add_argument("--cpu", type=int, help="pin to this core")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    if a.hold:
        a.stream = True
    elif not a.duration and not a.requests:
        a.duration = 5.0
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out = uvloop.run(main(a))
    if a.json:
        print(msgspec.json.encode(out).decode())
    else:
        for k, v in out.items():
            if isinstance(v, dict):
                v = " ".join(f"{kk}={vv}" for kk, vv in v.items())
            print(f"{k:18} {v}")
    sys.exit(1 if out["errors"] or out["dropped"] else 0)


if __name__ == "__main__":
    cli()
