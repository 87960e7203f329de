"""When keys were last used, written in batches off the request path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ..background import StoreThread
from ..store import Store, now

__all__ = ["KeyTouches"]

log = logging.getLogger("paragate.usage")


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
