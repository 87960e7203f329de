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

from . import __version__, limits
from .background import StoreThread
from .config import Settings
from .logs import AccessLog
from .metrics import SAMPLE_INTERVAL, Metrics
from .metrics_port import MetricsPort
from .protocol import BodyLimits
from .refresher import Refresher
from .registry import Registry
from .shutdown import Shutdown
from .store import Store
from .telemetry import Telemetry
from .tracing import Tracing
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
    metrics: Metrics | None  # None: PARAGATE_METRICS=false
    telemetry: Telemetry
    tracing: Tracing | None  # None: PARAGATE_OTLP_ENDPOINT unset
    metrics_port: MetricsPort | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    body_limits: BodyLimits = field(init=False)  # the settings' limits on a body, once

    def __post_init__(self) -> None:
        self.body_limits = BodyLimits.of(self.settings)

    @classmethod
    def build(cls, settings: Settings, store: Store | None = None) -> Gateway:
        store = store or Store.from_settings(settings)  # its secret keys too
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

        metrics = Metrics(company_label=settings.metrics_company_label,
                          version=__version__) if settings.metrics else None
        if metrics is not None:
            balancer.timers = metrics.replica_timer
            balancer.counters = metrics.replica_counters

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
            metrics=metrics,
            telemetry=Telemetry(registry, metrics, AccessLog(settings.log_format)
                                if settings.access_log else None),
            tracing=Tracing.build(settings),
        )

    # -- metrics ------------------------------------------------------------------------

    def sample_metrics(self) -> None:
        """Set the metrics' gauges from the live state (before a scrape, and every
        second with several workers)."""
        if self.metrics is None:
            return
        # the enabled models' fleets as configured now (a drained replica, a disabled
        # model's replicas: not up, or gone)
        replicas = [(route.name, replica.url, replica.state == "healthy", replica.inflight)
                    for route in self.registry.routes.values()
                    for replica in self.balancer.fleet(route.id, route.name,
                                                       route.replicas).members]
        self.metrics.sample(
            in_flight=self.telemetry.in_flight, streams=self.telemetry.streams,
            replicas=replicas, journal_depth=self.journal.pending(),
            write_lag=self.writer.lag(), view_age=self.registry.age(),
            config_version=self.registry.version,
            limiter_failures=getattr(self.limiter, "failures", 0))

    def render_metrics(self) -> bytes:
        assert self.metrics is not None
        self.sample_metrics()
        return self.metrics.render()

    async def _sample_metrics(self) -> None:
        """With several workers a scrape reads every worker's files: keep this one's
        gauges current there."""
        while True:
            self.sample_metrics()
            await asyncio.sleep(SAMPLE_INTERVAL)

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
        if self.metrics is not None and self.metrics.directory is not None:
            self._tasks.append(asyncio.create_task(self._sample_metrics(),
                                                   name="paragate-metrics"))
        if self.metrics is not None and self.settings.metrics_port:
            self.metrics_port = MetricsPort(self.render_metrics)
            await self.metrics_port.start(self.settings.metrics_host,
                                          self.settings.metrics_port,
                                          shared=self.metrics.directory is not None)
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
        log.info("paragate %s configuration (secrets masked)", __version__,
                 extra={"fields": {"settings": self.settings.shown()}})

    async def stop(self) -> None:
        if not self._tasks:
            return
        refresh, usage, touches, *health = self._tasks
        if self.metrics_port is not None:
            await self.metrics_port.stop()
            self.metrics_port = None
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
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # its last spans
        await self.usage_thread.run(self.store.close)
        for thread in (self.refresh_thread, self.usage_thread, self.catch_up_thread,
                       self.admin_thread):
            thread.close()  # closes pooled connections; the engine stays usable
        self._tasks = []
