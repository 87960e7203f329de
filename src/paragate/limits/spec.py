"""What a limit is, how one is written in the store and the API, and how the answer's
``x-ratelimit-*`` headers are made. Shared by both backends.

A scope (a key, a user, a company or a model) holds any of five limits, as a JSON
object in its ``rate_limits`` column::

    {"rpm": 60, "tpm": 100000, "max_concurrent": 4,
     "daily_tokens": 2000000, "monthly_tokens": 40000000}

``rpm`` and ``tpm`` are token buckets (GCRA) whose capacity is the per-minute limit,
refilled continuously: a burst admits at most the limit. ``max_concurrent`` counts the
requests in flight. The budgets count the tokens (prompt + completion) of a UTC day or
month. A request reserves its worst case against every limit that applies, and
settles with what it really used when it ends (``Ticket.settle``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import InvalidRequest

__all__ = [
    "BUDGET",
    "CONCURRENCY",
    "KINDS",
    "RATE",
    "Limit",
    "Standing",
    "check_rate_limits",
    "duration",
    "headers",
    "limits_of",
    "merge_rate_limits",
    "period_end",
    "period_of",
]

KINDS = ("rpm", "tpm", "max_concurrent", "daily_tokens", "monthly_tokens")
RATE, CONCURRENCY, BUDGET = "r", "c", "b"
_CLASS = {"rpm": RATE, "tpm": RATE, "max_concurrent": CONCURRENCY,
          "daily_tokens": BUDGET, "monthly_tokens": BUDGET}
_TOKENS = ("tpm", "daily_tokens", "monthly_tokens")  # the kinds that count tokens
_MAX_VALUE = 10**15


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of one scope. ``name`` identifies its counter (both backends)."""

    scope: str  # k | u | c | m
    scope_id: int
    kind: str  # one of KINDS
    value: int
    name: str  # "k:12:rpm"
    cls: str  # r (a per-minute bucket) | c (concurrency) | b (a budget)
    tokens: bool  # counts tokens (tpm, budgets), else requests


def limits_of(scope: str, scope_id: int, rate_limits: Mapping[str, int] | None
              ) -> tuple[Limit, ...]:
    """The limits a scope's ``rate_limits`` object sets, in ``KINDS`` order."""
    if not rate_limits:
        return ()
    return tuple(
        Limit(scope, scope_id, kind, int(rate_limits[kind]), f"{scope}:{scope_id}:{kind}",
              _CLASS[kind], kind in _TOKENS)
        for kind in KINDS if rate_limits.get(kind))


def check_rate_limits(value: Any, param: str = "rate_limits") -> dict[str, int] | None:
    """A ``rate_limits`` object as given to the API or the CLI, checked: known kinds,
    integers of at least 1 (null or absent: not set). None when nothing is set."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"'{param}' must be an object or null.", param=param,
                             code="invalid_type")
    unknown = sorted(set(value) - set(KINDS))
    if unknown:
        raise InvalidRequest(f"'{param}' has unknown limits: {', '.join(unknown)} (known: "
                             f"{', '.join(KINDS)}).", param=param, code="invalid_value")
    out: dict[str, int] = {}
    for kind in KINDS:
        v = value.get(kind)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _MAX_VALUE:
            raise InvalidRequest(f"'{param}.{kind}' must be an integer from 1 to 10^15, or "
                                 f"null for no limit; got {v!r}.", param=f"{param}.{kind}",
                                 code="invalid_value")
        out[kind] = v
    return out or None


def merge_rate_limits(current: Mapping[str, int] | None, changes: Any,
                      param: str = "rate_limits") -> dict[str, int] | None:
    """An update: the kinds ``changes`` names replace the current ones, a null removes
    one; ``changes`` null removes them all."""
    if changes is None:
        return None
    if not isinstance(changes, Mapping):
        raise InvalidRequest(f"'{param}' must be an object or null.", param=param,
                             code="invalid_type")
    merged: dict[str, Any] = dict(current or {})
    merged.update(changes)
    return check_rate_limits({k: v for k, v in merged.items() if v is not None}, param)


# -- periods ---------------------------------------------------------------------------

def period_of(kind: str, at: float) -> str:
    """The budget period ``at`` (Unix time) falls in: "2026-12-01" or "2026-12"."""
    day = datetime.fromtimestamp(at, UTC)
    return day.strftime("%Y-%m-%d") if kind == "daily_tokens" else day.strftime("%Y-%m")


_ENDS: dict[str, tuple[float, float]] = {}  # kind -> (start, end) of the last period seen


def period_end(kind: str, at: float) -> float:
    """When the budget period ``at`` falls in ends (Unix time)."""
    known = _ENDS.get(kind)
    if known is not None and known[0] <= at < known[1]:  # the common case: no datetime
        return known[1]
    end = _period_end(kind, at)
    start = (end - 86400 if kind == "daily_tokens"
             else datetime.fromtimestamp(end - 86400, UTC).replace(
                 day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
    _ENDS[kind] = (start, end)
    return end


def _period_end(kind: str, at: float) -> float:
    day = datetime.fromtimestamp(at, UTC).replace(hour=0, minute=0, second=0,
                                                  microsecond=0)
    if kind == "daily_tokens":
        return day.timestamp() + 86400
    month = day.replace(day=1)
    nxt = month.replace(year=month.year + 1, month=1) if month.month == 12 else (
        month.replace(month=month.month + 1))
    return nxt.timestamp()


# -- answers ---------------------------------------------------------------------------

def duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format: ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``2h0m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        text = f"{seconds:.3f}".rstrip("0").rstrip(".")
        return f"{text}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s"


@dataclass(slots=True)
class Standing:
    """Where one limit stands after a request was admitted: what is left, and in how
    many seconds it is whole again."""

    limit: Limit
    remaining: int
    reset: float


def headers(standings: Sequence[Standing]) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-*`` headers for the tightest limit of each kind (requests:
    ``rpm``; tokens: ``tpm`` and the budgets); none for a kind that did not apply."""
    requests: Standing | None = None
    tokens: Standing | None = None
    for s in standings:
        if s.limit.kind == "max_concurrent":
            continue
        if s.limit.tokens:
            if tokens is None or s.remaining < tokens.remaining:
                tokens = s
        elif requests is None or s.remaining < requests.remaining:
            requests = s
    out: list[tuple[bytes, bytes]] = []
    for word, tight in ((b"requests", requests), (b"tokens", tokens)):
        if tight is not None:
            out += [(b"x-ratelimit-limit-" + word, str(tight.limit.value).encode()),
                    (b"x-ratelimit-remaining-" + word, str(max(tight.remaining, 0)).encode()),
                    (b"x-ratelimit-reset-" + word, duration(tight.reset).encode())]
    return out
