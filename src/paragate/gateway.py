"""The gateway's parts, built from the settings, and their start and stop.

Everything a handler may use hangs here, typed; nothing is looked up by name at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from dataclasses import dataclass, field

from .background import StoreThread
from .config import Settings
from .limits import RateLimiter
from .registry import Registry
from .store import Store
from .upstream import Upstreams
from .usage import UsageRecorder

__all__ = ["Gateway"]

log = logging.getLogger("paragate")


@dataclass
class Gateway:
    settings: Settings
    store: Store
    registry: Registry
    upstreams: Upstreams
    recorder: UsageRecorder
    thread: StoreThread
    limiter: RateLimiter = field(default_factory=RateLimiter)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings, store: Store | None = None) -> Gateway:
        store = store or Store(settings.database_url)
        thread = StoreThread()
        return cls(
            settings=settings,
            store=store,
            thread=thread,
            registry=Registry(
                store,
                thread,
                default_max_logprobs=settings.default_max_logprobs,
                refresh_interval=settings.refresh_interval,
            ),
            upstreams=Upstreams(
                connect_timeout=settings.upstream_connect_timeout,
                read_timeout=settings.upstream_read_timeout,
                max_connections=settings.upstream_max_connections,
            ),
            recorder=UsageRecorder(
                store, thread, flush_interval=settings.usage_flush_interval
            ),
        )

    async def start(self) -> None:
        await self.thread.run(self.store.migrate)
        await self.registry.refresh()
        self._tasks = [
            asyncio.create_task(self.registry.run(), name="paragate-refresh"),
            asyncio.create_task(self.recorder.run(), name="paragate-usage"),
        ]
        # The background writers (usage, refresh) run Python in threads; a short switch
        # interval bounds how long they can keep the event loop from the GIL, which is
        # what the request path's tail latency is made of.
        sys.setswitchinterval(0.001)
        # Everything alive now lives as long as the process: keep the cyclic collector
        # from walking it again and again (shorter pauses under load).
        gc.collect()
        gc.freeze()
        log.info("paragate ready: %d keys, %d enabled models",
                 len(self.registry.keys), len(self.registry.routes))

    async def stop(self) -> None:
        refresh, usage = self._tasks or (None, None)
        if refresh is not None:
            refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresh
        if usage is not None:
            self.recorder.stop()  # it writes what is pending, then returns
            await usage
        await self.upstreams.close()
        await self.thread.run(self.store.close)
        self.thread.close()  # closes pooled connections; the engine stays usable
        self._tasks = []
