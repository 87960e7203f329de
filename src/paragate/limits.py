"""Rate limits: a token bucket per key, checked before a request is forwarded.

A key with ``rate_limit_rpm = N`` may send N requests in a burst, refilled at N per
minute. The buckets live in this process's memory: with several workers or gateways
each one counts on its own, so the limit a key really gets is N times the number of
processes. (Limits exact across instances, in Redis, are a later step; this class is
where they will plug in.) Nothing here touches the database.
"""

from __future__ import annotations

import math
import time

from .auth import Principal
from .errors import RateLimited

__all__ = ["RateLimiter"]


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float]] = {}  # key id -> (tokens, at)

    def check(self, who: Principal) -> None:
        """Take one request from the key's bucket, or raise 429 with Retry-After."""
        rpm = who.rate_limit_rpm
        if rpm is None:
            return
        now = time.monotonic()
        tokens, at = self._buckets.get(who.key_id, (float(rpm), now))
        tokens = min(float(rpm), tokens + (now - at) * rpm / 60.0)
        if tokens < 1.0:
            self._buckets[who.key_id] = (tokens, now)
            wait = math.ceil((1.0 - tokens) * 60.0 / rpm) if rpm else 60
            raise RateLimited(
                f"Rate limit of {rpm} requests per minute reached for this key; "
                f"retry in {wait} s.", retry_after=wait)
        self._buckets[who.key_id] = (tokens - 1.0, now)
