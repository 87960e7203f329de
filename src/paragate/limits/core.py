"""What both backends share: the ticket a request holds while it runs, and the errors
and headers of a refusal."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from ..errors import (
    BudgetExceeded,
    ConcurrencyLimited,
    GatewayError,
    RateLimited,
    ReservationTooLarge,
)
from .spec import BUDGET, CONCURRENCY, Limit, duration, period_end

__all__ = ["Limiter", "Ticket", "refusal", "too_large"]


class Ticket:
    """A request's reservation against the limits that apply to it. ``settle`` (once)
    replaces the reserved tokens with those used; ``headers`` are the answer's
    ``x-ratelimit-*`` headers."""

    __slots__ = ("_settle", "done", "headers", "id", "limits", "prompt", "reserved")

    def __init__(self, limits: Sequence[Limit], reserved: int, prompt: int, ticket_id: str,
                 headers: list[tuple[bytes, bytes]],
                 settle: Callable[[Ticket, int], None]) -> None:
        self.limits = limits
        self.reserved = reserved  # tokens reserved (0 when no token limit applies)
        self.prompt = prompt  # the prompt's estimate, within ``reserved``
        self.id = ticket_id
        self.headers = headers
        self.done = False
        self._settle = settle

    def settle(self, used: int) -> None:
        if self.done:
            return
        self.done = True
        self._settle(self, max(used, 0))


class Limiter(Protocol):
    """A backend: ``admit`` returns the request's ticket or raises the refusal."""

    kind: str  # memory | redis

    async def admit(self, limits: Sequence[Limit], tokens: int, prompt: int,
                    model: str) -> Ticket: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _who(limit: Limit, model: str) -> str:
    return {"k": "this key", "u": "this key's user", "c": "this key's company",
            "m": f"the model '{model}'"}[limit.scope]


def _per(limit: Limit) -> str:
    return {"tpm": "tokens per minute", "daily_tokens": "tokens per UTC day",
            "monthly_tokens": "tokens per UTC month"}[limit.kind]


def too_large(limit: Limit, tokens: int, model: str) -> ReservationTooLarge:
    """The request's worst case exceeds all that the limit could ever admit."""
    return ReservationTooLarge(
        f"This request may use up to {tokens} tokens (its prompt, estimated, plus "
        f"max_tokens for each completion), more than {_who(limit, model)}'s limit of "
        f"{limit.value} {_per(limit)} allows at once; lower max_tokens or n.",
        param="max_tokens")


def refusal(limit: Limit, wait: float, tokens: int, left: int, model: str,
            at: float) -> GatewayError:
    """The 429 for the limit that did not fit: ``wait`` seconds until it would (rates),
    ``left`` what a budget still holds; with its ``x-ratelimit-*`` headers."""
    who = _who(limit, model)
    if limit.cls == CONCURRENCY:
        return ConcurrencyLimited(
            f"{who[0].upper()}{who[1:]} already has {limit.value} requests in flight, the "
            "most allowed; retry when one has ended.", retry_after=1)
    word = "tokens" if limit.tokens else "requests"
    if limit.cls == BUDGET:
        ends = period_end(limit.kind, at)
        when = datetime.fromtimestamp(ends, UTC).strftime("%Y-%m-%d %H:%M UTC")
        span = "daily" if limit.kind == "daily_tokens" else "monthly"
        return BudgetExceeded(
            f"The {span} token budget of {who} ({limit.value} tokens) cannot hold this "
            f"request: it may use up to {tokens} tokens and {max(left, 0)} are left. The "
            f"budget resets at {when}.", retry_after=max(1, math.ceil(ends - at)),
            headers={f"x-ratelimit-limit-{word}": str(limit.value),
                     f"x-ratelimit-remaining-{word}": str(max(left, 0)),
                     f"x-ratelimit-reset-{word}": duration(ends - at)})
    retry = max(1, math.ceil(wait))
    what = (f"{limit.value} requests per minute" if limit.kind == "rpm" else
            f"{limit.value} tokens per minute (this request may use up to {tokens})")
    return RateLimited(
        f"Rate limit of {what} reached for {who}; retry in {retry} s.", retry_after=retry,
        headers={f"x-ratelimit-limit-{word}": str(limit.value),
                 f"x-ratelimit-remaining-{word}": "0",
                 f"x-ratelimit-reset-{word}": duration(wait)})
