"""Active health checks: every ``interval`` seconds, each replica's ``/health`` (and, for
a model with more than one replica, ``/metrics``, for its queue), at its root: the
stored URL without a trailing ``/v1``, or the replica's ``health_url``.

A failed check counts as a failure (``Balancer.failed``: ``eject_after`` in a row eject
the replica); an ejected replica is checked again once its back-off is over, and the
first good answer re-admits it. With the defaults (every 1 s, 2 s to answer, 3 failures)
a dead replica is out within about 4 s even without traffic, and a restarted one is back
within the 8 s back-off plus a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

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


class HealthChecker:
    def __init__(self, balancer: Balancer, fleets: Callable[[], Iterable[Fleet]], *,
                 interval: float, timeout: float) -> None:
        self._balancer = balancer
        self._fleets = fleets  # the fleets of the enabled models, as configured now
        self.interval = interval
        self.timeout = timeout
        self._stopping = asyncio.Event()
        self.checks = 0

    async def run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                await self.check_all()
            except Exception:  # pragma: no cover - a bug must not stop the checks
                log.exception("the replica health checks failed")
            delay = max(self.interval - (time.monotonic() - started), 0.05)
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
                if not replica.record.enabled:
                    continue
                if replica.ejected and now < replica.probe_at:
                    continue
                checks.append(self.check(replica, queue))
        if checks:
            await asyncio.gather(*checks)

    async def check(self, replica: Replica, queue: bool) -> None:
        upstreams = self._balancer.upstreams
        self.checks += 1
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
        self._balancer.succeeded(replica)
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
