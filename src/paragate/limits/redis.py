"""The Redis backend: every gateway process and instance counts in the same Redis, so
a limit holds whatever their number.

A request costs one round trip before it is forwarded: one Lua script (atomic: no
other client runs between its reads and its writes) checks every limit that applies
and, only when all fit, reserves against each. The time is Redis's own (``TIME``), so
gateways whose clocks differ still agree. Settlements are queued and sent by a
background task, many in one script call, off the request's critical path.

Keys, all with the hash tag ``{paragate}`` (``PARAGATE_REDIS_PREFIX``; one Redis
Cluster slot, as a script that touches several of them needs)::

    {paragate}:r:k:12:rpm              a per-minute bucket: its GCRA arrival time
    {paragate}:c:u:3:max_concurrent    a sorted set: request -> expiry of its slot
    {paragate}:b:c:1:daily_tokens      a budget's committed tokens, by period (only grow)
    {paragate}:bz:... / :bh:... / :bs:...      its reservations: expiries, amounts, sum
    {paragate}:t:<request>             there while the request has something to settle

A reservation (a concurrency slot, budget tokens) expires ``limits_reservation_ttl``
seconds after it was made or last renewed; the gateway renews those of its requests in
flight every third of that, so the reservations of a gateway that died go by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Sequence

from ..errors import LimitsUnavailable
from .core import Ticket, refusal, too_large
from .resp import Arg, RedisClient, RedisReplyError, RedisUnavailable, Reply, Script
from .spec import BUDGET, CONCURRENCY, RATE, Limit, Standing, headers, period_end

__all__ = ["RedisLimiter"]

log = logging.getLogger("paragate.limits")

_REPORT_EVERY = 10.0
_MAX_QUEUED = 200_000  # settlements kept while Redis is away

# The UTC day ("2026-12-01") or month ("2026-12") of a Unix time, in Lua (Redis has no
# os.date): Howard Hinnant's days-to-civil. Budgets take their period from Redis's
# clock, so gateways whose clocks differ agree at midnight too.
_PERIOD = """
local function period(now, kind)
  local z = math.floor(now / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  if kind == 'm' then return string.format('%04d-%02d', y, m) end
  return string.format('%04d-%02d-%02d', y, m, d)
end
"""

# KEYS: the ticket's key ({p}t:<id>: exists while the request holds something to
# settle), then per limit: r -> its bucket; c -> its set; b -> committed (a hash: period
# -> tokens), reservations' expiries (zset), amounts (hash), sum. ARGV: id, ttl, the
# request's tokens, whether it holds anything (1|0), then per limit: class (r|c|b),
# value, counts tokens (1|0), budget period (d|m, else -). Answers {1, now, remaining
# and reset per limit} or {0, the limit that refused, its figure, now}.
_ADMIT = Script(_PERIOD + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local stamp = string.format('%.6f', now)
local id, ttl, cost = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = (#ARGV - 4) / 4
local k, a = 2, 5
local st = {}
for i = 1, n do
  local cls, value = ARGV[a], tonumber(ARGV[a + 1])
  local c = 1
  if ARGV[a + 2] == '1' then c = cost end
  if cls == 'r' then
    local tat = tonumber(redis.call('GET', KEYS[k]) or '0')
    if tat < now then tat = now end
    local new = tat + c * 60 / value
    local over = new - now - 60
    if over > 1e-9 then return {0, i, string.format('%.6f', over), stamp} end
    st[i] = new
    k = k + 1
  elseif cls == 'c' then
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
    local held = redis.call('ZCARD', KEYS[k])
    if held >= value then return {0, i, '1', stamp} end
    st[i] = value - held - 1
    k = k + 1
  else
    local zk, hk, sk = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
    while true do  -- expired reservations (a dead gateway's), a thousand at a time
      local gone = redis.call('ZRANGEBYSCORE', zk, '-inf', now, 'LIMIT', 0, 1000)
      if #gone == 0 then break end
      local amounts = redis.call('HMGET', hk, unpack(gone))
      local freed = 0
      for j = 1, #gone do freed = freed + (tonumber(amounts[j]) or 0) end
      redis.call('HDEL', hk, unpack(gone))
      redis.call('ZREM', zk, unpack(gone))
      if freed > 0 then redis.call('DECRBY', sk, freed) end
    end
    local spent = tonumber(redis.call('HGET', KEYS[k], period(now, ARGV[a + 3])) or '0')
    local left = value - spent - tonumber(redis.call('GET', sk) or '0')
    if left < c then return {0, i, string.format('%d', left), stamp} end
    st[i] = left - c
    k = k + 4
  end
  a = a + 4
end
local ms = math.ceil(ttl * 1000) + 1000
if ARGV[4] == '1' then redis.call('SET', KEYS[1], '1', 'PX', ms) end
local out = {1, stamp}
k, a = 2, 5
for i = 1, n do
  local cls, value = ARGV[a], tonumber(ARGV[a + 1])
  local c = 1
  if ARGV[a + 2] == '1' then c = cost end
  if cls == 'r' then
    local new = st[i]
    redis.call('SET', KEYS[k], string.format('%.6f', new),
               'PX', math.ceil((new - now) * 1000) + 1000)
    out[#out + 1] = string.format('%d', math.floor((60 - (new - now)) * value / 60 + 0.01))
    out[#out + 1] = string.format('%.6f', new - now)
    k = k + 1
  elseif cls == 'c' then
    redis.call('ZADD', KEYS[k], now + ttl, id)
    redis.call('PEXPIRE', KEYS[k], ms)
    out[#out + 1] = string.format('%d', st[i])
    out[#out + 1] = '0'
    k = k + 1
  else
    redis.call('ZADD', KEYS[k + 1], now + ttl, id)
    redis.call('HSET', KEYS[k + 2], id, c)
    redis.call('INCRBY', KEYS[k + 3], c)
    for j = 1, 3 do redis.call('PEXPIRE', KEYS[k + j], ms) end
    out[#out + 1] = string.format('%d', st[i])
    out[#out + 1] = '0'
    k = k + 4
  end
  a = a + 4
end
return out
""")

# ARGV: how many tickets; per ticket: id, reserved, used, how many limits, then per limit
# the four fields of _ADMIT. KEYS: per ticket its key and its limits' keys, as _ADMIT's.
# A ticket settles only if its key is still there (deleted here): a batch sent twice (a
# reply that came too late, a shutdown) counts once, and so does a release sent for an
# admission whose answer was lost.
_SETTLE = Script(_PERIOD + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local keep = 35 * 86400
local k, a = 1, 2
for _ = 1, tonumber(ARGV[1]) do
  local id, reserved = ARGV[a], tonumber(ARGV[a + 1])
  local used, n = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  local live = redis.call('DEL', KEYS[k]) == 1
  k = k + 1
  for _ = 1, n do
    local cls, value = ARGV[a], tonumber(ARGV[a + 1])
    local tok, kind = ARGV[a + 2], ARGV[a + 3]
    a = a + 4
    if cls == 'r' then
      if live and tok == '1' and used ~= reserved then
        local tat = tonumber(redis.call('GET', KEYS[k]) or '0')
        if tat < now then tat = now end
        local new = tat + (used - reserved) * 60 / value
        if new > now then
          redis.call('SET', KEYS[k], string.format('%.6f', new),
                     'PX', math.ceil((new - now) * 1000) + 1000)
        else
          redis.call('DEL', KEYS[k])
        end
      end
      k = k + 1
    elseif cls == 'c' then
      if live then redis.call('ZREM', KEYS[k], id) end
      k = k + 1
    else
      if live then
        if used > 0 then
          local p = period(now, kind)
          if redis.call('HLEN', KEYS[k]) > 1 then  -- drop the periods gone by
            for _, old in ipairs(redis.call('HKEYS', KEYS[k])) do
              if old ~= p then redis.call('HDEL', KEYS[k], old) end
            end
          end
          redis.call('HINCRBY', KEYS[k], p, used)
          redis.call('EXPIRE', KEYS[k], keep)
        end
        if redis.call('ZREM', KEYS[k + 1], id) == 1 then
          local amount = tonumber(redis.call('HGET', KEYS[k + 2], id) or '0')
          redis.call('HDEL', KEYS[k + 2], id)
          if amount > 0 then redis.call('DECRBY', KEYS[k + 3], amount) end
        end
      end
      k = k + 4
    end
  end
end
return 1
""")

# ARGV: ttl, then per ticket: id, how many keys, and per key 'z' (a sorted set: its
# member's expiry moves) or 'p' (only the key's own expiry moves).
_RENEW = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
local ms = math.ceil(ttl * 1000) + 1000
local k, a = 1, 2
while a <= #ARGV do
  local id, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    if ARGV[a] == 'z' then redis.call('ZADD', KEYS[k], 'XX', now + ttl, id) end
    redis.call('PEXPIRE', KEYS[k], ms)
    k = k + 1
    a = a + 1
  end
end
return 1
""")


class RedisLimiter:
    kind = "redis"

    def __init__(self, url: str, *, prefix: str = "paragate", timeout: float = 0.25,
                 ttl: float = 60.0, fail_mode: str = "open",
                 client: RedisClient | None = None) -> None:
        self._p = f"{{{prefix}}}:"
        self._client = client or RedisClient(url, timeout=timeout,
                                             connect_timeout=max(timeout, 0.5))
        self._ttl = ttl
        self._fail_open = fail_mode == "open"
        self._ids = itertools.count(1)
        self._prefix = os.urandom(6).hex()
        self._live: dict[str, Ticket] = {}  # tickets holding expiring reservations
        self._queue: deque[tuple[Ticket, int]] = deque()  # settlements to send
        self._wake = asyncio.Event()
        self._failing_since: float | None = None
        self._reported_at = 0.0
        self.failures = 0  # requests admitted or refused by the fail mode
        self._tasks: list[asyncio.Task[None]] = []
        self.sending = False  # a batch of settlements is on its way

    # -- the request path ---------------------------------------------------------------

    async def admit(self, limits: Sequence[Limit], tokens: int, prompt: int,
                    model: str) -> Ticket:
        for lim in limits:  # what no amount of waiting would admit: no round trip
            if lim.tokens and tokens > lim.value:
                raise too_large(lim, tokens, model)
        ticket_id = f"{self._prefix}-{next(self._ids)}"
        # only an rpm limit: nothing to settle (the request is spent when admitted)
        holds = any(lim.cls != RATE or lim.tokens for lim in limits)
        keys, args = self._layout(limits, ticket_id)
        try:
            reply = await self._client.evalsha(
                _ADMIT, keys, [ticket_id, self._ttl, tokens, 1 if holds else 0, *args])
        except RedisUnavailable as exc:
            if holds:  # its answer may be what was lost: release what it may hold
                self._release(limits, tokens, ticket_id)
            return self._unreachable(exc, prompt, ticket_id)
        except RedisReplyError as exc:  # a bug, or another deployment's keys (the prefix)
            log.error("the rate-limit script failed in Redis: %s", exc)
            return self._unreachable(exc, prompt, ticket_id)
        except asyncio.CancelledError:  # the client left while it was being admitted
            if holds:
                self._release(limits, tokens, ticket_id)
            raise
        self._recovered()
        assert isinstance(reply, list)
        if reply[0] != 1:
            lim = limits[int(_num(reply[1])) - 1]
            figure, now = _num(reply[2]), _num(reply[3])
            if lim.cls == BUDGET:
                raise refusal(lim, 0.0, tokens, int(figure), model, now)
            raise refusal(lim, figure, tokens, 0, model, now)
        now = _num(reply[1])
        standings = []
        for i, lim in enumerate(limits):
            remaining, reset = int(_num(reply[2 + 2 * i])), _num(reply[3 + 2 * i])
            if lim.cls == BUDGET:
                reset = period_end(lim.kind, now) - now
            standings.append(Standing(lim, remaining, reset))
        if not holds:
            return Ticket(limits, tokens, prompt, ticket_id, headers(standings), _nothing)
        ticket = Ticket(limits, tokens, prompt, ticket_id, headers(standings), self._settle)
        self._live[ticket_id] = ticket
        return ticket

    def _layout(self, limits: Sequence[Limit], ticket_id: str) -> tuple[list[str], list[Arg]]:
        """The KEYS and the per-limit ARGV of the admit and settle scripts."""
        p = self._p
        keys: list[str] = [f"{p}t:{ticket_id}"]
        args: list[Arg] = []
        for lim in limits:
            if lim.cls == RATE:
                keys.append(f"{p}r:{lim.name}")
            elif lim.cls == CONCURRENCY:
                keys.append(f"{p}c:{lim.name}")
            else:
                keys += [f"{p}b:{lim.name}", f"{p}bz:{lim.name}", f"{p}bh:{lim.name}",
                         f"{p}bs:{lim.name}"]
            args += [lim.cls, lim.value, 1 if lim.tokens else 0,
                     ("d" if lim.kind == "daily_tokens" else "m") if lim.cls == BUDGET
                     else "-"]
        return keys, args

    def _release(self, limits: Sequence[Limit], tokens: int, ticket_id: str) -> None:
        """Undo an admission whose answer never came (a no-op if it never ran)."""
        Ticket(limits, tokens, 0, ticket_id, [], self._settle).settle(0)

    def _unreachable(self, exc: Exception, prompt: int, ticket_id: str) -> Ticket:
        """The fail mode: admit without counting (open), or 503 (closed)."""
        self.failures += 1
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._reported_at >= _REPORT_EVERY:
            self._reported_at = now
            log.warning("Redis is unreachable for rate limits (%s): %s", exc,
                        "admitting requests without counting them against their limits "
                        "(PARAGATE_LIMITS_FAIL_MODE=open)" if self._fail_open else
                        "refusing requests with 503 (PARAGATE_LIMITS_FAIL_MODE=closed)")
        if not self._fail_open:
            raise LimitsUnavailable("Rate limits cannot be checked (their store, Redis, is "
                                    "unreachable); retry shortly.",
                                    headers={"retry-after": "1"})
        return Ticket((), 0, prompt, ticket_id, [], _nothing)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning("Redis answers again after %.1f s; limits are counted again",
                        time.monotonic() - self._failing_since)
            self._failing_since = None
            self._reported_at = 0.0

    def _settle(self, ticket: Ticket, used: int) -> None:
        if len(self._queue) >= _MAX_QUEUED:
            lost, _ = self._queue.popleft()
            log.error("more than %d rate-limit settlements wait for Redis: the oldest is "
                      "dropped (its reservation expires on its own)", _MAX_QUEUED)
            self._live.pop(lost.id, None)
        self._queue.append((ticket, used))
        self._wake.set()

    # -- the background -----------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send_settlements(), name="paragate-settle"),
                       asyncio.create_task(self._renew(), name="paragate-renew")]

    async def _send_settlements(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 200))]
                self.sending = True
                try:
                    await self._send(batch)
                except RedisUnavailable as exc:  # sent again later: it counts once
                    self._queue.extendleft(reversed(batch))
                    log.debug("settlements wait for Redis: %s", exc)
                    await asyncio.sleep(0.5)
                except RedisReplyError as exc:  # would fail again: their reservations
                    log.error("the rate-limit settlement script failed in Redis (%s); "
                              "%d settlements dropped, their reservations expire on "
                              "their own", exc, len(batch))
                    for ticket, _ in batch:
                        self._live.pop(ticket.id, None)
                except asyncio.CancelledError:  # stop() sends them (again: counted once)
                    self._queue.extendleft(reversed(batch))
                    raise
                else:
                    for ticket, _ in batch:
                        self._live.pop(ticket.id, None)
                finally:
                    self.sending = False

    async def _send(self, batch: Sequence[tuple[Ticket, int]]) -> None:
        keys: list[str] = []
        args: list[Arg] = [len(batch)]
        for ticket, used in batch:
            k, a = self._layout(ticket.limits, ticket.id)
            keys += k
            args += [ticket.id, ticket.reserved, used, len(ticket.limits), *a]
        await self._client.evalsha(_SETTLE, keys, args)

    async def _renew(self) -> None:
        every = self._ttl / 3
        while True:
            await asyncio.sleep(every)
            live = list(self._live.values())
            if not live:
                continue
            p = self._p
            for start in range(0, len(live), 500):
                keys: list[str] = []
                args: list[Arg] = [self._ttl]
                for ticket in live[start:start + 500]:
                    mine: list[tuple[str, str]] = [(f"{p}t:{ticket.id}", "p")]
                    for lim in ticket.limits:
                        if lim.cls == CONCURRENCY:
                            mine.append((f"{p}c:{lim.name}", "z"))
                        elif lim.cls == BUDGET:
                            mine += [(f"{p}bz:{lim.name}", "z"), (f"{p}bh:{lim.name}", "p"),
                                     (f"{p}bs:{lim.name}", "p")]
                    keys += [k for k, _ in mine]
                    args += [ticket.id, len(mine), *(f for _, f in mine)]
                with contextlib.suppress(RedisUnavailable, RedisReplyError):
                    await self._client.evalsha(_RENEW, keys, args)

    async def stop(self, grace: float = 2.0) -> None:
        """Send the settlements still queued (for at most ``grace`` s), then close."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        deadline = time.monotonic() + grace
        while self._queue and time.monotonic() < deadline:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), 200))]
            try:
                await self._send(batch)
            except (RedisUnavailable, RedisReplyError):
                self._queue.extendleft(reversed(batch))
                await asyncio.sleep(0.1)
        if self._queue:
            log.warning("%d rate-limit settlements could not reach Redis before shutdown; "
                        "their reservations expire on their own, their tokens are not "
                        "added to the budgets", len(self._queue))
        await self._client.close()


def _num(value: Reply | RedisReplyError) -> float:
    """A number the scripts return (as an integer, or as text to keep its fraction)."""
    if isinstance(value, int | bytes | str):
        return float(value)
    raise RedisReplyError(f"unexpected reply from a limits script: {value!r}")


def _nothing(ticket: Ticket, used: int) -> None:
    """A ticket of the fail-open mode holds nothing to settle."""

