"""The gateway's parts, built from the settings, and their start and stop.

Everything a handler may use hangs here, typed; nothing is looked up by name at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import sys
from dataclasses import dataclass, field

from . import limits
from .background import StoreThread
from .config import Settings
from .refresher import Refresher
from .registry import Registry
from .shutdown import Shutdown
from .store import Store
from .upstream import Upstreams
from .upstream.balancer import Balancer, Fleet
from .upstream.health import HealthChecker
from .upstream.pool import Timeouts
from .usage import Journal, KeyTouches, UsageWriter

__all__ = ["Gateway"]

log = logging.getLogger("paragate")


def _give_back_freed_memory() -> None:
    """Loading the view makes and drops hundreds of MB of rows (the driver's buffers,
    SQLAlchemy's rows, the records' dicts); glibc keeps freed memory in its arenas
    unless asked to return it. Linux with glibc only; elsewhere nothing happens."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Gateway:
    settings: Settings
    store: Store
    registry: Registry
    refresher: Refresher
    upstreams: Upstreams
    journal: Journal
    writer: UsageWriter
    touches: KeyTouches
    # One thread per kind of store work, so that none waits behind another.
    refresh_thread: StoreThread
    usage_thread: StoreThread
    catch_up_thread: StoreThread
    admin_thread: StoreThread
    shutdown: Shutdown
    balancer: Balancer
    health: HealthChecker
    limiter: limits.Limiter
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings, store: Store | None = None) -> Gateway:
        store = store or Store(settings.database_url)
        refresh_thread = StoreThread("paragate-refresh")
        usage_thread = StoreThread("paragate-usage", idle=True)
        catch_up_thread = StoreThread("paragate-usage-catch-up")  # started when needed
        registry = Registry(default_max_logprobs=settings.default_max_logprobs,
                            default_timeouts=Timeouts(
                                connect=settings.upstream_connect_timeout,
                                first_byte=settings.upstream_read_timeout,
                                idle=settings.upstream_read_timeout),
                            max_view_age=settings.max_view_age,
                            default_caps=(settings.max_prompts, settings.max_n,
                                          settings.max_request_tokens))
        journal = Journal(settings.journal_path(), settings.database_url,
                          fsync=settings.journal_fsync,
                          fsync_interval=settings.journal_fsync_interval)
        upstreams = Upstreams(
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_read_timeout,
            max_connections=settings.upstream_max_connections,
            max_idle=settings.upstream_keepalive,
        )
        balancer = Balancer(
            upstreams, retries=settings.upstream_retries,
            retry_window=settings.upstream_retry_window,
            eject_after=settings.replica_eject_after,
            max_backoff=settings.replica_max_backoff,
            probes=settings.health_interval > 0)

        def fleets() -> list[Fleet]:
            """The fleets of the enabled models; those of models gone are dropped."""
            balancer.forget(set(registry.catalog))
            return [balancer.fleet(r.id, r.name, r.replicas)
                    for r in registry.routes.values()]

        return cls(
            settings=settings,
            store=store,
            registry=registry,
            refresher=Refresher(registry, store, refresh_thread,
                                interval=settings.refresh_interval),
            upstreams=upstreams,
            journal=journal,
            writer=UsageWriter(store, usage_thread, journal,
                               flush_interval=settings.usage_flush_interval,
                               retention_days=settings.usage_retention_days,
                               catch_up=catch_up_thread),
            touches=KeyTouches(store, usage_thread, registry.take_used),
            refresh_thread=refresh_thread,
            usage_thread=usage_thread,
            catch_up_thread=catch_up_thread,
            admin_thread=StoreThread("paragate-admin"),
            limiter=limits.build(settings, store, usage_thread),
            shutdown=Shutdown(settings.shutdown_delay, settings.shutdown_timeout),
            balancer=balancer,
            health=HealthChecker(balancer, fleets, interval=settings.health_interval,
                                 timeout=settings.health_timeout,
                                 dns_interval=settings.dns_interval),
        )

    async def start(self) -> None:
        await self.refresh_thread.run(self.store.migrate)
        await self.refresher.load()
        self.health.sync()  # every replica has its state before the first request
        await self.health.resolve_all()  # and every discovered one its addresses
        self.journal.open()
        await self.limiter.start()
        self._tasks = [
            asyncio.create_task(self.refresher.run(), name="paragate-refresh"),
            asyncio.create_task(self.writer.run(), name="paragate-usage"),
            asyncio.create_task(self.touches.run(), name="paragate-last-used"),
        ]
        self._tasks.append(asyncio.create_task(self.health.run(), name="paragate-health"))
        # The background writers (usage, refresh) run Python in threads. The OS hands
        # the core back to the loop at once (see background.py), but the GIL only after
        # the switch interval: the loop waits that long before it may ask for it. With
        # the usage writer busy a few per cent of the time, 1 ms put +0.5 ms on the
        # request path's p99 at c=1; 50 µs takes that away and costs no measurable
        # throughput (it only matters while two threads want the GIL).
        sys.setswitchinterval(0.00005)
        # Everything alive now lives as long as the process: keep the cyclic collector
        # from walking it again and again (shorter pauses under load).
        gc.collect()
        gc.freeze()
        _give_back_freed_memory()
        log.info("paragate ready: config version %d, %d companies, %d users, %d keys, "
                 "%d enabled models", self.registry.version, len(self.registry.companies),
                 len(self.registry.users), len(self.registry.keys),
                 len(self.registry.routes))

    async def stop(self) -> None:
        if not self._tasks:
            return
        refresh, usage, touches, *health = self._tasks
        self.health.stop()
        for task in health:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.refresher.stop()
        refresh.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresh
        self.writer.stop()  # it writes what it can, then returns
        self.touches.stop()
        await self.limiter.stop()  # its last settlements and counters
        await usage
        await touches
        self.journal.close()  # what could not be written stays for the next start
        if self.journal.pending():
            log.warning("%d usage records could not be written now; they stay in the "
                        "journal (%s) for the next start", self.journal.pending(),
                        self.journal.directory)
        await self.upstreams.close()
        await self.usage_thread.run(self.store.close)
        for thread in (self.refresh_thread, self.usage_thread, self.catch_up_thread,
                       self.admin_thread):
            thread.close()  # closes pooled connections; the engine stays usable
        self._tasks = []
