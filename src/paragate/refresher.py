"""Keeping the registry's view current, in every gateway process.

Every change to the control plane bumps the store's config version and stamps the rows
it wrote with it. The refresher asks for the rows above the version it holds and applies
just those, in slices small enough that the event loop is never held for long. It wakes:

- at once on PostgreSQL, where every change ends with ``NOTIFY paragate_config``: a
  thread of its own LISTENs on a connection of its own;
- every ``refresh_interval`` seconds (0.25 by default): the fallback on PostgreSQL, the
  mechanism on SQLite (the query is one indexed integer read);
- when this process's admin API has made a change (``refresh()`` is awaited directly).

Its queries run in a thread of their own, never behind the usage writer's inserts. When
the store cannot be reached it logs how old its view is (again every 10 s), keeps
serving from the last view, and ``/ready`` says so; past ``PARAGATE_MAX_VIEW_AGE`` the
registry refuses requests with 503 (and ``/ready`` answers 503 ``stale``).

Upstream API keys are decrypted as the rows are read (``Store.changes``). One that none
of the secret keys decrypts stops the start-up (a gateway started with the wrong keys
would fail every request of those models), naming the replicas; found by a later
refresh (a key written by a gateway with other keys), it is logged as an error naming
the replica, which stays out of service (``balancer``: misconfigured) until fixed.

Prompts and completions are never logged unless a model's ``log_payloads`` is on; then
the refresher says so in one warning naming those models, when the first view loads
and again whenever the set of them changes (not at every refresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from .background import StoreThread
from .registry import Registry, slices
from .secrets import Undecryptable
from .store import NOTIFY_CHANNEL, Changes, Store

__all__ = ["Refresher"]

log = logging.getLogger("paragate.registry")

_REPORT_EVERY = 10.0  # seconds between two warnings about the same outage
_LISTEN_RETRY = 1.0


class Refresher:
    def __init__(self, registry: Registry, store: Store, thread: StoreThread, *,
                 interval: float) -> None:
        self._registry = registry
        self._store = store
        self._thread = thread
        self._interval = interval
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self._failing_since: float | None = None
        self._reported_at = 0.0
        self._logging_payloads: tuple[str, ...] = ()  # as last reported

    async def load(self, *, strict: bool = True) -> None:
        """The whole view, built in the thread and swapped in at once. ``strict`` (the
        start-up): ``Undecryptable`` when an upstream API key cannot be decrypted."""
        changes = await self._thread.run(self._store.changes, 0)
        if strict and changes.undecryptable:
            found = changes.undecryptable
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise Undecryptable(
                f"cannot decrypt the upstream API key of {'; '.join(found[:5])}{more}. "
                "Start with the secret key that encrypted them among the configured ones "
                "(PARAGATE_SECRET_KEY or secret_key_file, after the current key), or set "
                "those keys again (paragate models replicas update).")
        self._report_undecryptable(changes)
        view = await self._thread.run(self._registry.build, changes)
        self._registry.install(view)
        self._registry.fresh_at = time.monotonic()
        self._report_payload_logging()

    async def refresh(self) -> int:
        """Apply what changed since the version held; how many rows that was."""
        async with self._lock:
            registry = self._registry
            version = await self._thread.run(self._store.version)
            registry.fresh_at = time.monotonic()
            if version == registry.version:
                return 0
            if version < registry.version:  # a restored or replaced database
                log.warning("the store's config version went back from %d to %d; "
                            "reloading everything", registry.version, version)
                await self.load(strict=False)
                return len(registry.keys)
            changes = await self._thread.run(self._store.changes, registry.version)
            self._report_undecryptable(changes)
            for piece in slices(changes):
                registry.apply(piece)
                await asyncio.sleep(0)  # let requests through between slices
            log.info("applied config version %d (%d changed rows)", registry.version,
                     changes.rows)
            self._report_payload_logging()
            return changes.rows

    @staticmethod
    def _report_undecryptable(changes: Changes) -> None:
        for what in changes.undecryptable:
            log.error("cannot decrypt the upstream API key of %s; it is out of service "
                      "until its key is set again or the secret key that encrypted it is "
                      "configured", what)

    def _report_payload_logging(self) -> None:
        """Warn when models log their prompts and completions: at the first view, then
        only when the set of those models changes."""
        names = self._registry.logging_payloads()
        if names == self._logging_payloads:
            return
        self._logging_payloads = names
        if names:
            log.warning("prompts and completions of model(s) %s are written to the log "
                        "(log_payloads is on)", ", ".join(names))
        else:
            log.info("no model's prompts and completions are written to the log any more")

    def wake(self) -> None:
        """Refresh now (callable from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Refresh on every wake-up or interval, forever; a failing store is reported
        and retried, the last view kept."""
        self._loop = asyncio.get_running_loop()
        if self._store.is_postgres:
            self._listener = threading.Thread(target=self._listen, daemon=True,
                                              name="paragate-listen")
            self._listener.start()
        try:
            while not self._stopping.is_set():
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation that arrives while the event is being set, and the loop
                # would then never end (a shutdown that hangs)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._wake.wait()
                self._wake.clear()
                if self._stopping.is_set():
                    break
                try:
                    await self.refresh()
                except Exception as exc:
                    self._failed(exc)
                else:
                    self._recovered()
        finally:
            self._stopping.set()

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._reported_at < _REPORT_EVERY:
            return
        self._reported_at = now
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("cannot refresh keys and models from the store (%s); serving config "
                    "version %d, %.1f s old", first[:300], self._registry.version,
                    self._registry.age())

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning("the store answers again after %.1f s; config version %d",
                        time.monotonic() - self._failing_since, self._registry.version)
            self._failing_since = None

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def _listen(self) -> None:
        """LISTEN on a connection of its own; every notification wakes the refresher.
        After (re)connecting it wakes it too: notifications sent meanwhile are lost."""
        import psycopg

        conninfo = self._store.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        while not self._stopping.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.wake()
                    while not self._stopping.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self.wake()
            except Exception as exc:  # the store is down: the poll reports it
                log.debug("LISTEN connection failed: %s", exc)
                self._stopping.wait(_LISTEN_RETRY)

    def stop(self) -> None:
        self._stopping.set()
