"""Rate limits and token budgets on keys, users, companies and models, in this process
(``memory``) or shared by every instance (``redis``): see docs/limits.md.

The request path asks one question, ``limiter.admit(limits, tokens, prompt, model)``,
only when some limit applies (the common case, none, costs one tuple test), and holds
the ``Ticket`` it gets until the request ends, when the usage record's tokens settle it.
"""

from __future__ import annotations

from ..background import StoreThread
from ..config import Settings
from ..store import Store
from .core import Limiter, Ticket
from .memory import MemoryLimiter
from .spec import KINDS, Limit, check_rate_limits, limits_of, merge_rate_limits

__all__ = ["KINDS", "Limit", "Limiter", "MemoryLimiter", "Ticket", "build",
           "check_rate_limits", "limits_of", "merge_rate_limits"]


def build(settings: Settings, store: Store | None, thread: StoreThread | None) -> Limiter:
    """The backend the settings choose: Redis when ``redis_url`` is set."""
    if settings.redis_url:
        from .redis import RedisLimiter

        return RedisLimiter(settings.redis_url, prefix=settings.redis_prefix,
                            timeout=settings.redis_timeout,
                            ttl=settings.limits_reservation_ttl,
                            fail_mode=settings.limits_fail_mode)
    return MemoryLimiter(store, thread)
