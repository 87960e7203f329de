"""Which replica gets a request, and another try where one is safe.

Each model's replicas form a ``Fleet``; each replica's live state (requests in flight
from this process, the queue vLLM last reported, consecutive failures, ejection) is a
``Replica``, kept across configuration changes by replica id.

**Choice**: among the replicas that take traffic (enabled, not draining, not ejected),
two picked at random in proportion to their weights, and the less loaded of the two
(power of two choices: near the best choice, without a scan or a lock). A replica's
load is what this process has in flight on it plus what others had there at the last
read of vLLM's ``/metrics`` (``vllm:num_requests_running`` + ``..._waiting``, less this
process's own share then), divided by its weight. A model with one replica skips all
of it.

**Affinity** (a model's ``affinity``: ``prefix`` or ``user``): requests with the same key
(the prompt's first characters, or the ``user`` field) go to the same replica, so that
vLLM's prefix cache is reused: the replica ranked first for the key by weighted
rendezvous hashing among those in rotation (stable across gateway processes, and only
the keys of a replica that leaves move). When that replica is much busier than the least
loaded (more than twice its load plus ``_SLACK`` requests), the least loaded gets the
request instead. A request without a key is balanced as usual.

**Another try**, only when the request cannot have been processed: the connection could
not be opened, or vLLM answered 503 (its queue is full) or 429, before anything reached
the client. It goes to a replica not tried yet, at most ``retries`` times and not after
``retry_window`` seconds. A connection that breaks once the request was written is a
502: vLLM may be generating it.

**Ejection**: ``eject_after`` consecutive failures (a connect error, a 5xx other than
503, a broken or timed-out answer, or a failed health check) take a replica out of
rotation; the health checker probes it again after a back-off that doubles from
``base_backoff`` to ``max_backoff`` and re-admits it on the first good answer.

**Misconfigured**: a replica whose stored URL fails the checks made where URLs are
stored now (``urls.check``: a row from before them, with ``user:password@``, a query, a
bad host or port), or whose upstream API key none of the secret keys could decrypt, is
out of service until an administrator corrects it: never tried, never health-checked,
shown as ejected with the reason, and logged once (its URL without credentials). Its
clients get a 503 that names the model only.

What a client is told never names a replica's address; the log line does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from ..errors import (
    GatewayError,
    NoReplica,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..secrets import is_encrypted
from ..store import ReplicaRecord
from . import urls
from .pool import Response, Timeouts, Upstreams

__all__ = ["Balancer", "Fleet", "Replica", "affinity_key"]

_BUSY = (429, 503)  # vLLM's "queue full" and a rate limit in front of it: try elsewhere
_SLACK = 8  # requests: how much busier than the least loaded an affine replica may be
_MASK = (1 << 64) - 1
_REPORT_EVERY = 10.0  # seconds between two log lines about one replica's failed tries

log = logging.getLogger("paragate.upstream")


def affinity_key(mode: str, body: Mapping[str, object], prefix_chars: int) -> int | None:
    """The request's affinity key under a model's ``mode`` (``prefix``: the prompt's first
    ``prefix_chars`` characters, or its first ``prefix_chars // 4`` token ids; ``user``:
    the ``user`` field), as a 64-bit hash the same in every process; None: no key."""
    value: object = body.get("user") if mode == "user" else body.get("prompt")
    if mode == "prefix":
        if isinstance(value, list) and value:
            value = value[0] if not isinstance(value[0], int) else value
        if isinstance(value, list):
            value = value[0] if value and isinstance(value[0], list) else value
            value = ",".join(map(str, value[:max(prefix_chars // 4, 1)]))
        if isinstance(value, str):
            value = value[:prefix_chars]
    if not isinstance(value, str) or not value:
        return None
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


def _at(url: str, address: str) -> str:
    """``url`` with its host replaced by ``address`` (an IPv6 one in brackets)."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _mix(x: int) -> int:
    """splitmix64's finaliser: a key and a replica id to a well-spread 64-bit value."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


class Replica:
    """One replica's configuration and its live state in this process."""

    __slots__ = ("_urls", "address", "api_key", "backoff", "base_url", "counted", "ejected",
                 "errors", "fails", "id", "inflight", "last_error", "latency_ms", "model",
                 "others", "probe_at", "problem", "record", "reported", "reported_at",
                 "requests", "running", "salt", "takes_traffic", "timer", "url", "waiting",
                 "weight")

    def __init__(self, record: ReplicaRecord, address: str | None = None) -> None:
        self.address = address  # a discovered replica: one address its name resolved to
        self.model = ""  # its model's name (set by the fleet it is in)
        self.inflight = 0
        self.others = 0  # requests vLLM had beyond ours at the last /metrics read
        self.running: int | None = None
        self.waiting: int | None = None
        self.fails = 0  # consecutive
        self.ejected = False
        self.probe_at = 0.0  # monotonic time of the next probe while ejected
        self.backoff = 0.0
        self.requests = 0
        self.errors = 0
        self.latency_ms: float | None = None  # moving average, time to vLLM's headers
        self.last_error: str | None = None
        self.reported_at = 0.0  # monotonic time of the last log line on a failed try
        self.configure(record)

    def configure(self, record: ReplicaRecord) -> None:
        self.record = record
        self.id = record.id
        self.salt = record.id * 0x9E3779B97F4A7C15 & _MASK  # mixed with affinity keys
        self.problem: str | None = None  # why it is out of service (misconfigured)
        self.reported: ReplicaRecord | None = None  # the configuration it was logged for
        # a row stored before the URL checks: never reached, shown without credentials
        url, health = record.url, record.health_url
        try:
            url = urls.check(url)
        except urls.BadURL as exc:
            self.problem, url = f"its URL {exc}", urls.redacted(url)
        if health is not None:
            try:
                health = urls.check(health)
            except urls.BadURL as exc:
                self.problem = self.problem or f"its health_url {exc}"
                health = urls.redacted(health)
        key = record.upstream_api_key
        if key is not None and is_encrypted(key):  # Store.changes could not decrypt it
            self.problem = "none of the secret keys decrypts its upstream API key"
            key = None
        base = ReplicaRecord.base_of(url, health)
        if self.address is not None and self.problem is None:
            url, base = _at(url, self.address), _at(base, self.address)
            self.salt ^= _mix(int.from_bytes(hashlib.blake2b(
                self.address.encode(), digest_size=8).digest(), "big"))
        self.url = url
        self.base_url = base
        self._urls: dict[str, str] = {}
        self.timer: Callable[[float], None] | None = None  # its response-time histogram
        # its request and error counters (``Balancer.counters``), once it has a model
        self.counted: tuple[Callable[[float], None], Callable[[float], None]] | None = None
        self.api_key = key
        self.weight = max(record.weight, 1)
        self.takes_traffic = record.enabled and not record.draining and self.problem is None
        if self.problem is not None:
            self.last_error = f"misconfigured: {self.problem}"
        elif self.last_error is not None and self.last_error.startswith("misconfigured:"):
            self.last_error = None

    def endpoint(self, path: str) -> str:
        """The URL of an upstream path: ``completions`` lies under the replica's URL
        (vLLM's ``/v1``), ``/tokenize`` (a leading slash) at that URL's root (not at
        ``health_url``, which may be a sidecar's)."""
        url = self._urls.get(path)
        if url is None:
            here = self.url.rstrip("/")
            if path[0] == "/":  # the root of the replica's own URL, never its health_url
                url = (here[:-3] if here.endswith("/v1") else here) + path
            else:
                url = here + "/" + path
            self._urls[path] = url
        return url

    @property
    def state(self) -> str:
        """``draining`` (an administrator's: draining or disabled), ``ejected`` (also a
        misconfigured one: ``last_error`` says why) or ``healthy``."""
        if self.problem is not None and self.record.enabled and not self.record.draining:
            return "ejected"
        if not self.takes_traffic:
            return "draining"
        return "ejected" if self.ejected else "healthy"


class Fleet:
    """The replicas of one model."""

    __slots__ = ("generation", "members", "model", "single", "source")

    def __init__(self, model: str, source: tuple[ReplicaRecord, ...],
                 members: list[Replica]) -> None:
        self.generation = 0  # the balancer's DNS generation it was built at
        self.model = model
        self.source = source  # the registry's tuple this fleet was built from
        self.members = members
        self.single = members[0] if len(members) == 1 else None

    def choose(self, tried: Sequence[Replica], rng: random.Random,
               key: int | None = None) -> Replica:
        single = self.single
        if single is not None:
            if single.takes_traffic and not single.ejected and not tried:
                return single
            raise self._none_left(tried)
        candidates = [r for r in self.members
                      if r.takes_traffic and not r.ejected and r not in tried]
        if len(candidates) < 2:
            if candidates:
                return candidates[0]
            raise self._none_left(tried)
        if key is not None:
            return self._affine(candidates, key)
        if all(r.weight == candidates[0].weight for r in candidates):
            a, b = rng.sample(candidates, 2)
        else:
            a, b = rng.choices(candidates, [r.weight for r in candidates], k=2)
            if a is b:
                rest = [r for r in candidates if r is not a]
                b = rng.choices(rest, [r.weight for r in rest])[0]
        # a.load / a.weight <= b.load / b.weight, without dividing
        if (a.inflight + a.others) * b.weight <= (b.inflight + b.others) * a.weight:
            return a
        return b

    @staticmethod
    def _affine(candidates: list[Replica], key: int) -> Replica:
        """The candidate ranked first for ``key`` (weighted rendezvous hashing), unless
        it is much busier than the least loaded."""
        weight = candidates[0].weight
        if all(r.weight == weight for r in candidates):  # the common case: no logarithms
            best = max(candidates, key=lambda r: _mix(key ^ r.salt))
        else:
            best, top = candidates[0], -1.0
            for r in candidates:
                u = ((_mix(key ^ r.salt) >> 11) + 0.5) / (1 << 53)
                score = -r.weight / math.log(u)
                if score > top:
                    best, top = r, score
        load = best.inflight + best.others
        if load > _SLACK:  # only then can it be much busier than the least loaded
            least = min(candidates, key=lambda r: (r.inflight + r.others) / r.weight)
            if load > 2 * (least.inflight + least.others) + _SLACK:
                return least
        return best

    def has_another(self, tried: Sequence[Replica]) -> bool:
        return any(r.takes_traffic and not r.ejected and r not in tried
                   for r in self.members)

    def _none_left(self, tried: Sequence[Replica]) -> GatewayError:
        if tried:  # pragma: no cover - callers check has_another first
            return NoReplica(f"No other replica of '{self.model}' can take the request.")
        if not self.members:
            return NoReplica(f"The model '{self.model}' has no replica to send to (a "
                             "discovered name has resolved to no address yet).")
        if all(r.problem is not None for r in self.members):
            return NoReplica(f"The model '{self.model}' cannot be served: the configuration "
                             "of its model server is invalid; an administrator must correct "
                             "it.", code="upstream_misconfigured")
        states = sorted({r.state for r in self.members})
        return NoReplica(f"Every replica of the model '{self.model}' is out of rotation "
                         f"({', '.join(states)}); try again shortly.")


class Balancer:
    def __init__(self, upstreams: Upstreams, *, retries: int = 2,
                 retry_window: float = 10.0, eject_after: int = 3,
                 base_backoff: float = 1.0, max_backoff: float = 8.0,
                 probes: bool = True) -> None:
        self.upstreams = upstreams
        self.retries = retries
        self.retry_window = retry_window
        self.eject_after = eject_after
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        # without a health checker, an ejected replica's back-off ending re-admits it
        # (the next request is the probe); with one, only a good health check does
        self.probes = probes
        self.rng = random.Random()
        # (model, replica URL) -> what hears each try's time to the answer's headers,
        # and the counters of its tries and failures (metrics.py)
        self.timers: Callable[[str, str], Callable[[float], None]] | None = None
        self.counters: Callable[[str, str], tuple[Callable[[float], None],
                                                  Callable[[float], None]]] | None = None
        self.fleets: dict[int, Fleet] = {}
        self._replicas: dict[int, Replica] = {}  # every static replica, by id
        # discovered replicas: what each one's name resolved to, and a member per address
        self.addresses: dict[int, tuple[str, ...]] = {}
        self._discovered: dict[tuple[int, str], Replica] = {}
        self._generation = 0  # bumped whenever a name resolves to other addresses

    # -- the fleets -------------------------------------------------------------------

    def fleet(self, model_id: int, model: str, replicas: tuple[ReplicaRecord, ...]
              ) -> Fleet:
        """The fleet of a model as configured now (rebuilt when its replicas changed,
        each replica keeping its live state)."""
        found = self.fleets.get(model_id)
        if (found is not None and found.source is replicas
                and found.generation == self._generation):
            return found
        members = []
        for record in replicas:
            if record.discover:
                members.extend(self._members(record))
                continue
            replica = self._replicas.get(record.id)
            if replica is None:
                replica = self._replicas[record.id] = Replica(record)
            elif replica.record is not record:
                replica.configure(record)
            members.append(replica)
        for replica in members:
            replica.model = model
            if replica.problem is not None and replica.reported is not replica.record:
                replica.reported = replica.record  # once per configuration
                log.error("replica %d of model '%s' (%s) is out of service until an "
                          "administrator corrects it: %s", replica.id, model, replica.url,
                          replica.problem)
        fleet = self.fleets[model_id] = Fleet(model, replicas, members)
        fleet.generation = self._generation
        return fleet

    def _members(self, record: ReplicaRecord) -> list[Replica]:
        out = []
        for address in self.addresses.get(record.id, ()):
            replica = self._discovered.get((record.id, address))
            if replica is None:
                replica = self._discovered[(record.id, address)] = Replica(record, address)
            elif replica.record is not record:
                replica.configure(record)
            out.append(replica)
        return out

    def resolved(self, replica_id: int, addresses: tuple[str, ...]) -> bool:
        """What a discovered replica's name resolves to now; True if that changed."""
        if self.addresses.get(replica_id) == addresses:
            return False
        self.addresses[replica_id] = addresses
        self._generation += 1
        return True

    def forget(self, live_models: set[int]) -> None:
        """Drop the fleets of models gone, and replicas no fleet has."""
        for model_id in [m for m in self.fleets if m not in live_models]:
            del self.fleets[model_id]
        kept = {r.id for f in self.fleets.values() for r in f.members if r.address is None}
        for replica_id in [r for r in self._replicas if r not in kept]:
            del self._replicas[replica_id]
        live = {(r.id, r.address) for f in self.fleets.values() for r in f.members}
        for found in [k for k in self._discovered if k not in live]:
            del self._discovered[found]
        discovering = {r.id for f in self.fleets.values() for r in f.source if r.discover}
        for replica_id in [i for i in self.addresses if i not in discovering]:
            del self.addresses[replica_id]

    def replica(self, replica_id: int) -> Replica | None:
        return self._replicas.get(replica_id)

    def discovered(self, replica_id: int) -> list[Replica] | None:
        """The members a discovered replica's name gave, by address; None: not yet
        resolved."""
        addresses = self.addresses.get(replica_id)
        if addresses is None:
            return None
        return [r for a in addresses if (r := self._discovered.get((replica_id, a)))]

    # -- what happened ----------------------------------------------------------------

    def succeeded(self, replica: Replica, *, probe: bool = False) -> None:
        """A good answer. Only a probe (a health check) re-admits an ejected replica: a
        request that was in flight when it was ejected says little about new ones."""
        if replica.ejected and not probe:
            return
        replica.fails = 0
        if replica.ejected:
            replica.ejected = False
            replica.backoff = 0.0

    def _count(self, replica: Replica, error: bool) -> None:
        counted = replica.counted
        if counted is None:
            if self.counters is None:
                return
            counted = replica.counted = self.counters(replica.model, replica.url)
        counted[error](1)

    def failed(self, replica: Replica, why: str) -> None:
        replica.errors += 1
        self._count(replica, True)
        replica.fails += 1
        replica.last_error = why
        if replica.fails < self.eject_after:
            return
        now = time.monotonic()
        if replica.ejected and now < replica.probe_at:
            return  # in flight when it was ejected: the back-off already runs
        replica.backoff = min(max(replica.backoff * 2, self.base_backoff), self.max_backoff)
        replica.probe_at = now + replica.backoff
        replica.ejected = True

    def _lost(self, replica: Replica, exc: GatewayError) -> None:
        """A try failed: counted against the replica, and logged with what the client is
        not told (the replica's address, the system's reason), at most every
        ``_REPORT_EVERY`` seconds for one replica."""
        cause = exc.__cause__
        detail = exc.message + (f" ({cause})" if isinstance(cause, OSError) and str(cause)
                                else "")
        self.failed(replica, detail)
        now = time.monotonic()
        if now - replica.reported_at >= _REPORT_EVERY:
            replica.reported_at = now
            log.warning("model '%s' replica %d (%s): %s [%d failure(s) in a row]",
                        replica.model, replica.id, replica.url, detail, replica.fails)

    def readmit_due(self) -> None:
        """Without probes: replicas whose back-off is over take traffic again."""
        now = time.monotonic()
        for replica in (*self._replicas.values(), *self._discovered.values()):
            if replica.ejected and now >= replica.probe_at:
                replica.ejected = False

    # -- one request ------------------------------------------------------------------

    def _can_retry(self, fleet: Fleet, tried: list[Replica], first: float) -> bool:
        """Whether another try may start: tries left, time left, a replica left."""
        return (len(tried) <= self.retries and time.monotonic() < first + self.retry_window
                and fleet.has_another(tried))

    @asynccontextmanager
    async def post(self, fleet: Fleet, body: bytes, timeouts: Timeouts | None = None,
                   key: int | None = None, chosen: Callable[[str], None] | None = None,
                   path: str = "completions", headers: bytes = b""
                   ) -> AsyncIterator[tuple[Replica, Response]]:
        """POST ``body`` to ``path`` (``Replica.endpoint``) of a replica of ``fleet``
        (trying others where safe) and yield
        (the replica, its answer, headers read). The replica's counts and health follow
        from how the block ends. ``timeouts``: the model's (its total counts from here,
        across tries); ``key``: the request's affinity key, if its model has one;
        ``chosen`` hears each replica's URL as it is tried (the usage record's
        upstream, also when the try fails before an answer); ``headers``: more request
        header lines (``pool.Upstreams.post``)."""
        if not self.probes:
            self.readmit_due()
        tried: list[Replica] = []
        first = started = time.monotonic()
        total = timeouts.total if timeouts is not None else None
        until = asyncio.get_running_loop().time() + total if total else None
        while True:
            replica = fleet.choose(tried, self.rng, key)
            tried.append(replica)
            if chosen is not None:
                chosen(replica.url)
            replica.inflight += 1
            replica.requests += 1
            self._count(replica, False)
            if len(tried) > 1:
                started = time.monotonic()
            yielded = False
            try:
                async with self.upstreams.post(replica.endpoint(path), body,
                                               replica.api_key, timeouts, until,
                                               headers) as resp:
                    took = time.monotonic() - started
                    timer = replica.timer
                    if timer is None and self.timers is not None:
                        timer = replica.timer = self.timers(fleet.model, replica.url)
                    if timer is not None:
                        timer(took)
                    took *= 1000
                    replica.latency_ms = took if replica.latency_ms is None else (
                        replica.latency_ms * 0.8 + took * 0.2)
                    if resp.status in _BUSY and self._can_retry(fleet, tried, first):
                        replica.last_error = f"answered {resp.status}"
                        continue  # leaving the block closes this answer unread
                    yielded = True
                    try:
                        yield replica, resp
                    except (UpstreamFailed, UpstreamTimeout) as exc:
                        self._lost(replica, exc)
                        raise
                    if resp.failure is not None:
                        self.failed(replica, resp.failure)
                    elif resp.status >= 500 and resp.status not in _BUSY:
                        self.failed(replica, f"answered {resp.status}")
                    else:
                        self.succeeded(replica)
                    return
            except UpstreamUnavailable as exc:  # could not connect: never sent
                if yielded:
                    raise
                self._lost(replica, exc)
                if not self._can_retry(fleet, tried, first):
                    raise
            except (UpstreamFailed, UpstreamTimeout) as exc:
                if not yielded:  # broken or silent before the headers: maybe processed
                    self._lost(replica, exc)
                raise
            finally:
                replica.inflight -= 1
