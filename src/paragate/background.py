"""Where the gateway's store work runs: threads at a low OS priority, one per kind of
work (the refresher, the usage writer, the admin API), so that none waits behind another:
a slow batch of usage inserts never delays a revocation.

The event loop must never wait for the database, so reloading keys and writing usage
happen in a thread. But a thread shares the loop's core (and the GIL): left at normal
priority, the OS lets it run a full time slice (milliseconds) while requests wait, and
that shows up as tail latency. At nice 10 the scheduler gives the loop the larger share,
and the GIL switch interval the gateway sets bounds the rest.

No lower than that: a thread of this process that holds the GIL stops the event loop
until it runs again. Under Linux's idle policy (SCHED_IDLE, which the usage writer had
once) or at nice 19, a core that other processes keep busy (vLLM beside the gateway,
another gateway worker) runs such a thread seldom, and the loop waited for it: a 1 ms
sleep of the loop's thread took up to 450 ms (p99 447 ms) beside one busy process on
its core under SCHED_IDLE, 323 ms at nice 19, 55 ms at nice 10 (docs/benchmarks.md).
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


def _lower_priority() -> None:
    native = threading.get_native_id()
    try:  # Linux: a thread is a task of its own and can have its own nice value
        os.setpriority(os.PRIO_PROCESS, native, NICE)
    except (OSError, AttributeError):
        log.debug("could not lower the store thread's priority")


NICE = 10  # the store threads' nice value (see the module's docstring for why not lower)


class StoreThread:
    """One thread for one kind of store work, at nice 10."""

    def __init__(self, name: str = "paragate-store") -> None:
        self.name = name
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=_lower_priority)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
