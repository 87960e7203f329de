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
    {paragate}:bz:c:1:daily_tokens     a budget's reservations: request -> expiry
    {paragate}:bh:c:1:daily_tokens     ... their tokens, and their sum ("r")
    {paragate}:b:c:1:daily_tokens      its committed tokens by period (they only grow)
    {paragate}:s:<request>             the request has been settled (for 10 minutes)

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
from .resp import (
    Arg,
    RedisClient,
    RedisReplyError,
    RedisUnavailable,
    Script,
    encode_args,
)
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

# KEYS: per limit: r -> its bucket; c -> its set (request -> expiry); b -> its
# reservations (a set: request -> expiry; a hash: request -> tokens, "r" -> their sum)
# and its committed tokens (a hash: period -> tokens). ARGV: id, ttl, the request's
# tokens, then per limit: class (r|c|b), value, counts tokens (1|0), budget period (d|m,
# else -). Answers, as one string of words (quicker to read than an array): "1 now" then
# remaining and reset per limit, or "0 <the limit that refused> <its figure> now".
# Reads are cheap in a script, writes less so (each is replicated): an expiry is moved
# only when it would end too soon.
_ADMIT = Script(_PERIOD + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local id, ttl, cost = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = (#ARGV - 3) / 4
local k, a = 1, 4
local st, lefts = {}, {}
for i = 1, n do
  local cls, value = ARGV[a], tonumber(ARGV[a + 1])
  local c = 1
  if ARGV[a + 2] == '1' then c = cost end
  if cls == 'r' then
    local tat = tonumber(redis.call('GET', KEYS[k]) or '0')
    if tat < now then tat = now end
    local new = tat + c * 60 / value
    local over = new - now - 60
    if over > 1e-9 then return '0 ' .. i .. ' ' .. over .. ' ' .. now end
    st[i] = new
    k = k + 1
  elseif cls == 'c' then
    local held = redis.call('ZCARD', KEYS[k])
    if held >= value then  -- expired slots (a dead gateway's) only make it look fuller
      redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
      held = redis.call('ZCARD', KEYS[k])
    end
    if held >= value then return '0 ' .. i .. ' 1 ' .. now end
    st[i] = value - held - 1
    k = k + 1
  else
    local zk, hk = KEYS[k], KEYS[k + 1]
    local reserved = tonumber(redis.call('HGET', hk, 'r') or '0')
    local spent = tonumber(redis.call('HGET', KEYS[k + 2], period(now, ARGV[a + 3])) or '0')
    local left = value - spent - reserved
    if left < c then
      -- expired reservations (a dead gateway's) only make it look fuller: swept, a
      -- thousand at a time, only when the request would not fit otherwise
      while true do
        local gone = redis.call('ZRANGEBYSCORE', zk, '-inf', now, 'LIMIT', 0, 1000)
        if #gone == 0 then break end
        local amounts = redis.call('HMGET', hk, unpack(gone))
        local freed = 0
        for j = 1, #gone do freed = freed + (tonumber(amounts[j]) or 0) end
        redis.call('HDEL', hk, unpack(gone))
        redis.call('ZREM', zk, unpack(gone))
        redis.call('HINCRBY', hk, 'r', -freed)
        reserved = reserved - freed
      end
      left = value - spent - reserved
    end
    if left < c then return '0 ' .. i .. ' ' .. string.format('%d', left) .. ' ' .. now end
    st[i] = reserved
    lefts[i] = left - c
    k = k + 3
  end
  a = a + 4
end
local ms = math.ceil(ttl * 1000) + 1000
local out = {'1', now}
k, a = 1, 4
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
    if redis.call('PTTL', KEYS[k]) < ms then redis.call('PEXPIRE', KEYS[k], 2 * ms) end
    out[#out + 1] = string.format('%d', st[i])
    out[#out + 1] = '0'
    k = k + 1
  else
    local zk, hk = KEYS[k], KEYS[k + 1]
    redis.call('ZADD', zk, now + ttl, id)
    if redis.call('PTTL', zk) < ms then redis.call('PEXPIRE', zk, 2 * ms) end
    redis.call('HSET', hk, id, c, 'r', st[i] + c)
    if redis.call('PTTL', hk) < ms then redis.call('PEXPIRE', hk, 2 * ms) end
    out[#out + 1] = string.format('%d', lefts[i])
    out[#out + 1] = '0'
    k = k + 3
  end
  a = a + 4
end
return table.concat(out, ' ')
""")

# ARGV: how many tickets; per ticket: id, reserved, used, release (1: an admission
# whose answer was lost, which may never have run), how many limits, then per limit the
# four fields of _ADMIT. KEYS: per ticket its settled-marker, then its limits' keys as
# _ADMIT's. A ticket settles once: its marker is set the first time (a batch sent again,
# after a reply that came too late or at shutdown, changes nothing). A reservation is
# released only if it is still there; the tokens used are committed whatever became of
# it (one that expired, Redis having been away longer than its ttl, was swept already).
_SETTLE = Script(_PERIOD + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local keep = 35 * 86400
local k, a = 1, 2
for _ = 1, tonumber(ARGV[1]) do
  local id, reserved = ARGV[a], tonumber(ARGV[a + 1])
  local used, release, n = tonumber(ARGV[a + 2]), ARGV[a + 3] == '1', tonumber(ARGV[a + 4])
  a = a + 5
  local first = redis.call('SET', KEYS[k], '1', 'NX', 'PX', 600000)
  k = k + 1
  for _ = 1, n do
    local cls, value = ARGV[a], tonumber(ARGV[a + 1])
    local tok, kind = ARGV[a + 2], ARGV[a + 3]
    a = a + 4
    if cls == 'r' then
      -- a release does not know whether the bucket was charged: it is left alone
      if first and not release and tok == '1' and used ~= reserved then
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
      if first then redis.call('ZREM', KEYS[k], id) end
      k = k + 1
    else
      if first then
        local zk, hk, ck = KEYS[k], KEYS[k + 1], KEYS[k + 2]
        if redis.call('ZREM', zk, id) == 1 then
          redis.call('HDEL', hk, id)
          redis.call('HINCRBY', hk, 'r', -reserved)
        end
        if used > 0 then
          local p = period(now, kind)
          if redis.call('HLEN', ck) > 1 then  -- drop the periods gone by
            for _, old in ipairs(redis.call('HKEYS', ck)) do
              if old ~= p then redis.call('HDEL', ck, old) end
            end
          end
          redis.call('HINCRBY', ck, p, used)
          redis.call('EXPIRE', ck, keep)
        end
      end
      k = k + 3
    end
  end
end
return 1
""")

# ARGV: ttl, then per ticket: id, how many keys, and per key 'z' (a set: the request's
# expiry moves) or 'p' (a hash: only the key's own expiry may). KEYS: those keys.
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
    if redis.call('PTTL', KEYS[k]) < ms then redis.call('PEXPIRE', KEYS[k], 2 * ms) end
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
        # settlements to send: the ticket, the tokens used, whether it is a release
        self._queue: deque[tuple[Ticket, int, bool]] = deque()
        self._wake = asyncio.Event()
        self._failing_since: float | None = None
        self._reported_at = 0.0
        self.failures = 0  # requests admitted or refused by the fail mode
        self._tasks: list[asyncio.Task[None]] = []
        self.sending = False  # a batch of settlements is on its way
        self._parts: dict[tuple[str, int], tuple[bytes, bytes, int]] = {}
        self._ttl_arg = repr(float(ttl))

    # -- the request path ---------------------------------------------------------------

    async def admit(self, limits: Sequence[Limit], tokens: int, prompt: int,
                    model: str) -> Ticket:
        for lim in limits:  # what no amount of waiting would admit: no round trip
            if lim.tokens and tokens > lim.value:
                raise too_large(lim, tokens, model)
        ticket_id = f"{self._prefix}-{next(self._ids)}"
        keys, args, count, numkeys, holds = self._encoded(limits)
        body = b"%s%s%s" % (keys, encode_args((ticket_id, self._ttl_arg, tokens)), args)
        try:
            reply = await self._client.evalsha_encoded(_ADMIT, numkeys, count, body)
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
        if self._failing_since is not None:
            self._recovered()
        if not isinstance(reply, bytes):
            raise RedisReplyError(f"unexpected reply from the admit script: {reply!r}")
        words = reply.split()
        if words[0] != b"1":
            lim = limits[int(words[1]) - 1]
            figure, now = float(words[2]), float(words[3])
            if lim.cls == BUDGET:
                raise refusal(lim, 0.0, tokens, int(figure), model, now)
            raise refusal(lim, figure, tokens, 0, model, now)
        now = float(words[1])
        standings = []
        for i, lim in enumerate(limits, 1):
            reset = (period_end(lim.kind, now) - now if lim.cls == BUDGET
                     else float(words[2 * i + 1]))
            standings.append(Standing(lim, int(words[2 * i]), reset))
        if not holds:
            return Ticket(limits, tokens, prompt, ticket_id, headers(standings), _nothing)
        ticket = Ticket(limits, tokens, prompt, ticket_id, headers(standings), self._settle)
        if any(lim.cls != RATE for lim in limits):  # its reservations expire: renewed
            self._live[ticket_id] = ticket
        return ticket

    def _encoded(self, limits: Sequence[Limit]) -> tuple[bytes, bytes, int, int, bool]:
        """The limits' keys and arguments, encoded once per (limit, value) and kept: the
        encoded keys, the encoded per-limit arguments, how many bulk strings the whole
        command body holds, how many of them are keys, and whether the ticket has
        anything to settle (not when only rpm limits apply)."""
        keys: list[bytes] = []
        args: list[bytes] = []
        numkeys = 0
        holds = False
        for lim in limits:
            part = self._parts.get((lim.name, lim.value))
            if part is None:
                if len(self._parts) > 100_000:  # limits come and go: keep it bounded
                    self._parts.clear()
                k, a = self._layout((lim,))
                part = self._parts[(lim.name, lim.value)] = (
                    encode_args(k), encode_args(a), len(k))
            keys.append(part[0])
            args.append(part[1])
            numkeys += part[2]
            holds = holds or lim.cls != RATE or lim.tokens
        return (b"".join(keys), b"".join(args), numkeys + 3 + 4 * len(limits), numkeys,
                holds)

    def _layout(self, limits: Sequence[Limit]) -> tuple[list[str], list[Arg]]:
        """The KEYS and the per-limit ARGV of the admit and settle scripts."""
        p = self._p
        keys: list[str] = []
        args: list[Arg] = []
        for lim in limits:
            if lim.cls == RATE:
                keys.append(f"{p}r:{lim.name}")
            elif lim.cls == CONCURRENCY:
                keys.append(f"{p}c:{lim.name}")
            else:
                keys += [f"{p}bz:{lim.name}", f"{p}bh:{lim.name}", f"{p}b:{lim.name}"]
            args += [lim.cls, lim.value, 1 if lim.tokens else 0,
                     ("d" if lim.kind == "daily_tokens" else "m") if lim.cls == BUDGET
                     else "-"]
        return keys, args

    def _release(self, limits: Sequence[Limit], tokens: int, ticket_id: str) -> None:
        """Undo an admission whose answer never came: what it may hold is freed if it is
        there (its rate buckets are left alone: whether they were charged is not known)."""
        ticket = Ticket(limits, tokens, 0, ticket_id, [], self._settle)
        ticket.done = True
        self._queue.append((ticket, 0, True))
        self._wake.set()

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
            lost, _, _ = self._queue.popleft()
            log.error("more than %d rate-limit settlements wait for Redis: the oldest is "
                      "dropped (its reservation expires on its own)", _MAX_QUEUED)
            self._live.pop(lost.id, None)
        self._queue.append((ticket, used, False))
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
                    for ticket, _, _ in batch:
                        self._live.pop(ticket.id, None)
                except asyncio.CancelledError:  # stop() sends them (again: counted once)
                    self._queue.extendleft(reversed(batch))
                    raise
                else:
                    for ticket, _, _ in batch:
                        self._live.pop(ticket.id, None)
                finally:
                    self.sending = False

    async def _send(self, batch: Sequence[tuple[Ticket, int, bool]]) -> None:
        keys: list[str] = []
        args: list[Arg] = [len(batch)]
        for ticket, used, release in batch:
            k, a = self._layout(ticket.limits)
            keys += [f"{self._p}s:{ticket.id}", *k]
            args += [ticket.id, ticket.reserved, used, 1 if release else 0,
                     len(ticket.limits), *a]
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
                    mine: list[tuple[str, str]] = []
                    for lim in ticket.limits:
                        if lim.cls == CONCURRENCY:
                            mine.append((f"{p}c:{lim.name}", "z"))
                        elif lim.cls == BUDGET:
                            mine += [(f"{p}bz:{lim.name}", "z"), (f"{p}bh:{lim.name}", "p")]
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


def _nothing(ticket: Ticket, used: int) -> None:
    """A ticket of the fail-open mode holds nothing to settle."""

