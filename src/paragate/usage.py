"""Usage records: taken on the request path without waiting, written in batches.

``UsageRecorder.record`` only appends to a list (no await, so a cancelled request
still records in its ``finally``). One task owns the writes: every
``usage_flush_interval`` it hands the pending batch to the store in the store thread. A
batch the store refuses is kept and retried; shutdown writes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .background import StoreThread
from .store import Store, UsageRecord, now

__all__ = ["KeyTouches", "UsageRecorder"]

log = logging.getLogger("paragate.usage")


class UsageRecorder:
    def __init__(self, store: Store, thread: StoreThread, *, flush_interval: float) -> None:
        self._store = store
        self._thread = thread
        self._interval = flush_interval
        self._pending: list[UsageRecord] = []
        self._stopping = asyncio.Event()
        self.written = 0

    def record(self, record: UsageRecord) -> None:
        self._pending.append(record)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self.written += await self._thread.run(self._store.insert_usage, batch)
        except Exception:
            self._pending[:0] = batch  # keep them, in order, for the next try
            raise

    async def run(self) -> None:
        """Write every interval until ``stop``; then write what is left and return.
        Never cancelled mid-write, so a batch is never both kept and written."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            try:
                await self._flush()
            except Exception:
                log.exception("writing %d usage records failed; will retry", self.pending)
        if self._pending:
            log.error("%d usage records could not be written at shutdown", self.pending)

    def stop(self) -> None:
        self._stopping.set()


class KeyTouches:
    """Writes when keys were last used: every ``interval`` seconds, one UPDATE for all
    the keys used meanwhile (``Registry.used``), never a write per request. Failed
    writes are retried with the next batch; shutdown writes what is left."""

    def __init__(self, store: Store, thread: StoreThread, take: Callable[[], set[int]],
                 *, interval: float = 10.0) -> None:
        self._store = store
        self._thread = thread
        self._take = take
        self._interval = interval
        self._pending: set[int] = set()
        self._stopping = asyncio.Event()

    async def flush(self) -> None:
        self._pending |= self._take()
        if not self._pending:
            return
        batch, self._pending = self._pending, set()
        try:
            await self._thread.run(self._store.touch_keys, batch, now())
        except Exception:
            self._pending |= batch
            raise

    async def run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            try:
                await self.flush()
            except Exception:
                log.exception("writing last-used times of %d keys failed; will retry",
                              len(self._pending))

    def stop(self) -> None:
        self._stopping.set()
