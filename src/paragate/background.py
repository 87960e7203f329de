"""Where the gateway's store work runs: threads at a low OS priority, one per kind of
work (the refresher, the usage writer, the admin API), so that none waits behind another:
a slow batch of usage inserts never delays a revocation.

The event loop must never wait for the database, so reloading keys and writing usage
happen in a thread. But a thread shares the loop's core (and the GIL): left at normal
priority, the OS lets it run a full time slice (milliseconds) while requests wait, and
that shows up as tail latency. At nice 10 the scheduler gives the loop the larger share;
the usage writer, which works all the time under load, runs at the idle policy, which
hands the core back the moment the loop has work; the GIL switch interval the gateway
sets bounds the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["StoreThread"]

log = logging.getLogger("paragate")

P = ParamSpec("P")
T = TypeVar("T")


def _lower_priority(idle: bool) -> None:
    native = threading.get_native_id()
    try:  # Linux: a thread is a task of its own and can have its own nice value
        os.setpriority(os.PRIO_PROCESS, native, 10)
        if idle:
            os.sched_setscheduler(native, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        log.debug("could not lower the store thread's priority")


class StoreThread:
    """One thread for one kind of store work. ``idle``: the thread runs under Linux's
    SCHED_IDLE policy, only when the core has nothing else to run, and any other
    thread that wakes up takes the core from it at once (nice 10 only makes it yield
    at the end of a time slice). That suits work that may lag but must not touch the
    request path: the usage writer (see ``UsageWriter`` for how it catches up when a
    busy core starves it)."""

    def __init__(self, name: str = "paragate-store", *, idle: bool = False) -> None:
        self.name = name
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=_lower_priority,
            initargs=(idle,),
        )

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
