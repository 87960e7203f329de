"""Active health checks: every ``interval`` seconds, each replica's ``/health`` (and, for
a model with more than one replica, ``/metrics``, for its queue), at its root: the
stored URL without a trailing ``/v1``, or the replica's ``health_url``.

A failed check counts as a failure (``Balancer.failed``: ``eject_after`` in a row eject
the replica); an ejected replica is checked again once its back-off is over, and the
first good answer re-admits it. With the defaults (every 1 s, 2 s to answer, 3 failures)
a dead replica is out within about 4 s even without traffic, and a restarted one is back
within the 8 s back-off plus a second.

A discovered replica (``discover``: its URL's host names the replicas, as a Kubernetes
headless Service does) is resolved at start-up and again every ``dns_interval``
seconds; each address is a replica of its own, checked and balanced like any other,
and one that leaves the answer leaves the fleet. A failed lookup keeps the addresses
last seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from ..errors import GatewayError
from .balancer import Balancer, Fleet, Replica

__all__ = ["HealthChecker", "queue_of"]

log = logging.getLogger("paragate.upstream")

_RUNNING = b"vllm:num_requests_running"
_WAITING = b"vllm:num_requests_waiting"


def _gauge(text: bytes, name: bytes) -> int | None:
    """The sum of a gauge's samples (one per engine) in Prometheus text, or None. Found
    with ``bytes.find``: /metrics is tens of kilobytes, read every second."""
    total: float | None = None
    needle = b"\n" + name
    text = b"\n" + text
    at = text.find(needle)
    while at >= 0:
        end = text.find(b"\n", at + 1)
        line = text[at + 1:end if end >= 0 else len(text)]
        if line[len(name):len(name) + 1] in (b"{", b" "):
            with contextlib.suppress(ValueError, IndexError):
                total = (total or 0.0) + float(line.rsplit(b" ", 1)[1])
        at = text.find(needle, end) if end >= 0 else -1
    return None if total is None else int(total)


def queue_of(metrics: bytes) -> tuple[int | None, int | None]:
    """(running, waiting) from vLLM's /metrics."""
    return _gauge(metrics, _RUNNING), _gauge(metrics, _WAITING)


Resolver = Callable[[str, int], Awaitable[tuple[str, ...]]]


async def resolve(host: str, port: int) -> tuple[str, ...]:
    """The addresses of ``host``, sorted, each once (the system's resolver)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                         type=socket.SOCK_STREAM)
    return tuple(sorted({str(info[4][0]) for info in infos}))


class HealthChecker:
    def __init__(self, balancer: Balancer, fleets: Callable[[], Iterable[Fleet]], *,
                 interval: float, timeout: float, dns_interval: float = 5.0,
                 resolver: Resolver = resolve) -> None:
        self._balancer = balancer
        self._fleets = fleets  # the fleets of the enabled models, as configured now
        self.interval = interval
        self.timeout = timeout
        self.dns_interval = dns_interval
        self.resolver = resolver
        self._stopping = asyncio.Event()
        self._next_lookup = 0.0

    async def resolve_all(self) -> None:
        """Look up every discovered replica's name (at most ``timeout`` seconds each)."""
        self._next_lookup = time.monotonic() + self.dns_interval
        seen: dict[int, str] = {}
        for fleet in self.sync():
            for record in fleet.source:
                if record.discover and record.enabled:
                    seen[record.id] = record.url
        for replica_id, url in seen.items():
            parts = urlsplit(url)
            host, port = parts.hostname or "", parts.port or 80
            try:
                async with asyncio.timeout(self.timeout):
                    addresses = await self.resolver(host, port)
            except (OSError, TimeoutError) as exc:
                log.warning("replica %d: looking up %s failed (%s); keeping %s", replica_id,
                            host, exc or "timeout",
                            ", ".join(self._balancer.addresses.get(replica_id, ())) or
                            "no address")
                continue
            if self._balancer.resolved(replica_id, addresses):
                log.info("replica %d: %s resolves to %s", replica_id, host,
                         ", ".join(addresses) or "no address")

    async def run(self) -> None:
        """Checks every ``interval`` (none when it is 0), lookups every
        ``dns_interval``, until ``stop``."""
        next_check = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            try:
                if now >= self._next_lookup:
                    await self.resolve_all()
                if self.interval > 0 and now >= next_check:
                    next_check = now + self.interval
                    await self.check_all()
            except Exception:  # pragma: no cover - a bug must not stop the checks
                log.exception("the replica health checks failed")
            wake = min(next_check if self.interval > 0 else float("inf"), self._next_lookup)
            delay = max(wake - time.monotonic(), 0.05)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def stop(self) -> None:
        self._stopping.set()

    def sync(self) -> list[Fleet]:
        """The fleets of the enabled models, each replica's state made if new."""
        return list(self._fleets())

    async def check_all(self) -> None:
        now = time.monotonic()
        checks = []
        for fleet in self.sync():
            queue = fleet.single is None
            for replica in fleet.members:
                if not replica.record.enabled or replica.problem is not None:
                    continue  # a misconfigured one is not reached at all
                if replica.ejected and now < replica.probe_at:
                    continue
                checks.append(self.check(replica, queue))
        if checks:
            await asyncio.gather(*checks)

    async def check(self, replica: Replica, queue: bool) -> None:
        upstreams = self._balancer.upstreams
        try:
            status, _ = await upstreams.get(replica.base_url + "/health", self.timeout)
            if status != 200:
                raise _Bad(f"/health answered {status}")
        except (GatewayError, _Bad) as exc:
            was = replica.ejected
            self._balancer.failed(replica, f"health check: {exc}")
            if replica.ejected and not was:
                log.warning("replica %d (%s) ejected: %s", replica.id, replica.url,
                            replica.last_error)
            return
        if replica.ejected:
            log.info("replica %d (%s) answers again: re-admitted", replica.id, replica.url)
        self._balancer.succeeded(replica, probe=True)
        if queue:
            await self.read_queue(replica)

    async def read_queue(self, replica: Replica) -> None:
        """The replica's queue from its /metrics. vLLM's API server can be slow to answer
        it (seconds, at times, on a busy CPU) while /health is fine: a failure here keeps
        the last figures and says nothing about health."""
        mine = replica.inflight
        try:
            status, text = await self._balancer.upstreams.get(
                replica.base_url + "/metrics", self.timeout)
        except GatewayError:
            return
        if status != 200:
            return
        running, waiting = queue_of(text)
        replica.running, replica.waiting = running, waiting
        if running is not None or waiting is not None:
            replica.others = max((running or 0) + (waiting or 0) - mine, 0)


class _Bad(Exception):
    pass
