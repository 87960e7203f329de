"""One shutdown sequence for the whole gateway, on SIGTERM (or Ctrl-C):

1. ``/ready`` answers 503 at once, while requests are still accepted for
   ``shutdown_delay`` seconds (so that a load balancer notices; skipped on Ctrl-C);
2. then uvicorn closes the listener and waits for the requests in flight;
3. ``shutdown_timeout`` seconds after the signal, streams still open end with an SSE
   error event and ``[DONE]``, each with a partial usage record;
4. the lifespan's shutdown writes the usage records still pending (``Gateway.stop``);
   what cannot be written stays in the journal for the next start.

A second signal goes straight to uvicorn (which then stops waiting). The handlers are
installed from the lifespan's start-up, inside each worker, around uvicorn's own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["Shutdown"]

log = logging.getLogger("paragate")

_Handler = Callable[[int, FrameType | None], Any]


class Shutdown:
    def __init__(self, delay: float, timeout: float) -> None:
        self.delay = delay
        self.timeout = timeout
        self.draining = False
        self._previous: dict[int, _Handler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # the streams open now: each is cut, at the deadline, by calling its function
        self.streams: dict[object, Callable[[], None]] = {}

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if callable(previous):  # uvicorn's: without one (tests, embedding) do nothing
                self._previous[sig] = previous
                signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self.begin, sig, frame)

    def begin(self, sig: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        previous = self._previous.get(sig)
        if self.draining:  # a second signal: hand it on now
            if previous is not None:
                previous(sig, frame)
            return
        self.draining = True
        delay = 0.0 if sig == signal.SIGINT else self.delay
        log.info("shutting down: not ready; the listener closes in %.1f s, open streams "
                 "end in %.1f s", delay, self.timeout)
        assert self._loop is not None
        if previous is not None:
            self._loop.call_later(delay, previous, sig, frame)
        self._loop.call_later(self.timeout, self.cut_streams)

    def cut_streams(self) -> None:
        if self.streams:
            log.warning("ending %d streams still open at the shutdown timeout",
                        len(self.streams))
        for cut in list(self.streams.values()):
            cut()
