"""The in-process backend: every counter in this process's memory, decided without an
await (so two requests can never interleave between check and reserve).

One process only: with several workers or instances each counts on its own (``paragate
serve`` refuses that while limits are configured, unless told otherwise). The budgets'
committed tokens are written to the store (``limit_counters``) every second and at
shutdown, and read back at start-up, so a restart keeps them; a crash forgets at most
the last second's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence

from ..background import StoreThread
from ..store import Store
from .core import Ticket, refusal, too_large
from .spec import BUDGET, CONCURRENCY, RATE, Limit, Standing, headers, period_end, period_of

__all__ = ["MemoryLimiter"]

log = logging.getLogger("paragate.limits")

_WINDOW = 60.0  # seconds: a per-minute bucket holds a minute's worth
_EPSILON = 1e-9
_FLUSH_EVERY = 1.0
_ids = itertools.count(1)
_PREFIX = os.urandom(4).hex()


class MemoryLimiter:
    kind = "memory"

    def __init__(self, store: Store | None = None, thread: StoreThread | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._store = store
        self._thread = thread
        self._clock = clock
        self._wall = wall
        self._tat: dict[str, float] = {}  # rate limits: theoretical arrival time (GCRA)
        self._inflight: dict[str, int] = {}  # concurrency limits
        self._committed: dict[str, tuple[str, int]] = {}  # budgets: (period, tokens)
        self._reserved: dict[str, int] = {}  # budgets: tokens reserved in flight
        self._unsaved: dict[tuple[str, int, str], int] = {}  # committed, not yet stored
        self._task: asyncio.Task[None] | None = None

    # -- the request path ---------------------------------------------------------------

    async def admit(self, limits: Sequence[Limit], tokens: int, prompt: int,
                    model: str) -> Ticket:
        return self.admit_now(limits, tokens, prompt, model)

    def admit_now(self, limits: Sequence[Limit], tokens: int, prompt: int,
                  model: str) -> Ticket:
        now = self._clock()
        wall = 0.0
        standings: list[Standing] = []
        for lim in limits:
            cost = tokens if lim.tokens else 1
            if lim.cls == RATE:
                if cost > lim.value:
                    raise too_large(lim, tokens, model)
                interval = _WINDOW / lim.value
                tat = self._tat.get(lim.name, now)
                new = (tat if tat > now else now) + cost * interval
                over = new - now - _WINDOW
                if over > _EPSILON:
                    raise refusal(lim, over, tokens, 0, model, self._wall())
                standings.append(Standing(
                    lim, int((_WINDOW - (new - now)) / interval + 0.01), new - now))
            elif lim.cls == CONCURRENCY:
                held = self._inflight.get(lim.name, 0)
                if held >= lim.value:
                    raise refusal(lim, 1.0, tokens, 0, model, self._wall())
                standings.append(Standing(lim, lim.value - held - 1, 0.0))
            else:
                wall = wall or self._wall()
                if cost > lim.value:
                    raise too_large(lim, tokens, model)
                left = (lim.value - self._spent(lim, period_of(lim.kind, wall))
                        - self._reserved.get(lim.name, 0) - cost)
                if left < 0:
                    raise refusal(lim, 0.0, tokens, left + cost, model, wall)
                standings.append(Standing(lim, left, period_end(lim.kind, wall) - wall))
        for st in standings:  # every limit fits: take from each
            lim = st.limit
            if lim.cls == RATE:
                self._tat[lim.name] = now + st.reset
            elif lim.cls == CONCURRENCY:
                self._inflight[lim.name] = self._inflight.get(lim.name, 0) + 1
            else:
                self._reserved[lim.name] = self._reserved.get(lim.name, 0) + tokens
        return Ticket(limits, tokens, prompt, f"{_PREFIX}-{next(_ids)}", headers(standings),
                      self._settle)

    def _spent(self, lim: Limit, period: str) -> int:
        held = self._committed.get(lim.name)
        return held[1] if held is not None and held[0] == period else 0

    def _settle(self, ticket: Ticket, used: int) -> None:
        now = self._clock()
        wall = 0.0
        for lim in ticket.limits:
            if lim.cls == RATE:
                delta = used - ticket.reserved
                if lim.tokens and delta:
                    tat = self._tat.get(lim.name, now)
                    new = (tat if tat > now else now) + delta * _WINDOW / lim.value
                    if new > now:
                        self._tat[lim.name] = new
                    else:
                        self._tat.pop(lim.name, None)
            elif lim.cls == CONCURRENCY:
                held = self._inflight.get(lim.name, 0) - 1
                if held > 0:
                    self._inflight[lim.name] = held
                else:
                    self._inflight.pop(lim.name, None)
            elif lim.cls == BUDGET:
                left = self._reserved.get(lim.name, 0) - ticket.reserved
                if left > 0:
                    self._reserved[lim.name] = left
                else:
                    self._reserved.pop(lim.name, None)
                if used:
                    wall = wall or self._wall()
                    period = period_of(lim.kind, wall)
                    self._committed[lim.name] = (period, self._spent(lim, period) + used)
                    where = (lim.scope, lim.scope_id, period)
                    self._unsaved[where] = self._unsaved.get(where, 0) + used

    # -- keeping the budgets -------------------------------------------------------------

    def load(self) -> None:
        """The committed tokens of the current day and month, from the store (in a
        thread: start-up)."""
        if self._store is None:
            return
        wall = self._wall()
        periods = {period_of("daily_tokens", wall): "daily_tokens",
                   period_of("monthly_tokens", wall): "monthly_tokens"}
        for scope, scope_id, period, tokens in self._store.limit_counters(list(periods)):
            kind = periods[period]
            self._committed[f"{scope}:{scope_id}:{kind}"] = (period, tokens)

    def take_unsaved(self) -> dict[tuple[str, int, str], int]:
        unsaved, self._unsaved = self._unsaved, {}
        return unsaved

    async def flush(self) -> None:
        """Add the tokens committed since the last flush to the store's counters; on
        failure they are kept for the next one."""
        if self._store is None or self._thread is None or not self._unsaved:
            return
        unsaved = self.take_unsaved()
        try:
            await self._thread.run(self._store.add_limit_counters, unsaved)
        except Exception as exc:
            for where, tokens in unsaved.items():
                self._unsaved[where] = self._unsaved.get(where, 0) + tokens
            log.warning("cannot save the budgets' committed tokens (%s); kept for the next "
                        "try", str(exc).splitlines()[0][:200] if str(exc) else exc)

    def prune(self) -> None:
        """Forget the buckets that are full again (their keys may never come back)."""
        now = self._clock()
        for name in [n for n, tat in self._tat.items() if tat <= now]:
            del self._tat[name]

    async def start(self) -> None:
        """Load the budgets, then save them every second (and forget full buckets)."""
        if self._thread is not None and self._store is not None:
            await self._thread.run(self.load)
        self._task = asyncio.create_task(self._run(), name="paragate-limits")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_EVERY)
            await self.flush()
            self.prune()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
