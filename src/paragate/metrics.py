"""Prometheus metrics: what happened (counters and histograms, recorded as it happens)
and what is (gauges, sampled from the live state when scraped).

Names and labels are an interface (docs/observability.md lists them; a test pins them).
Cardinality is bounded by design: ``endpoint`` is a route template, ``model`` a
configured model's name (``unknown`` for any other; empty where an endpoint takes no
model), ``replica`` a configured replica's URL; no key, user or company id is a label
(``company``, the company's name, only with ``PARAGATE_METRICS_COMPANY_LABEL=true``).

**Cost.** The request path records through children looked up once per label set and
kept in a dict (prometheus-client's ``labels()`` costs more than the update itself), and
records nothing for gauges: those are set from the live state at each scrape.

**Several workers.** ``paragate serve --workers N`` points ``PROMETHEUS_MULTIPROC_DIR``
at a fresh directory before the workers start: prometheus-client's multiprocess mode
then keeps each worker's values in a memory-mapped file of its own, and a scrape, which
any worker may answer, adds them up (``MultiProcessCollector``). Counters and histograms
are exact at every scrape. Gauges are per worker and combined per metric (``livesum``,
``livemin``, ``livemax``: over live workers only); each worker sets its own every
``SAMPLE_INTERVAL`` seconds, so another worker's gauges may be that old.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "SAMPLE_INTERVAL", "Metrics", "Series", "multiprocess_dir"]

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``*_created`` series: half the scrape, nothing lost
SAMPLE_INTERVAL = 1.0  # seconds: how often a worker sets its gauges (several workers)

_DURATION = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
             120.0, 300.0)
_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_GAP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_OVERHEAD = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
             0.1, 0.25, 1.0)
_RESPONSE = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
             120.0)


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, when it is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _observer(child: Any) -> Callable[[float], None]:
    """A histogram child's ``observe``. In one process the event loop is the only
    writer of these values (and a scrape reads them on the loop too), so the request
    path updates them without prometheus-client's lock: about a quarter of its cost.
    With several workers each update is a write to the worker's file, as the library
    does it."""
    if multiprocess_dir() is not None:
        return child.observe  # type: ignore[no-any-return]
    bounds = tuple(child._upper_bounds)
    buckets = child._buckets
    total = child._sum

    def observe(amount: float) -> None:
        total._value += amount
        buckets[bisect_left(bounds, amount)]._value += 1

    return observe


def _incrementer(child: Any) -> Callable[[float], None]:
    """A counter child's ``inc`` (lock-free in one process, as ``_observer``)."""
    if multiprocess_dir() is not None:
        return child.inc  # type: ignore[no-any-return]
    value = child._value

    def inc(amount: float = 1) -> None:
        value._value += amount

    return inc


class Series:
    """The children of one (endpoint, model[, company]): looked up once, then kept."""

    __slots__ = ("_labels", "duration", "gap", "overhead", "requests", "status", "ttft")

    def __init__(self, m: Metrics, labels: tuple[str, ...]) -> None:
        endpoint, model = labels[0], labels[1]
        self.requests = m._requests
        self.status: dict[int, Callable[[float], None]] = {}
        self.duration = _observer(m.request_duration.labels(endpoint, model))
        self.ttft = _observer(m.ttft.labels(endpoint, model))
        self.gap = _observer(m.gap.labels(endpoint, model))
        self.overhead = _observer(m.overhead.labels(endpoint, model))
        self._labels = labels

    def count(self, status: int) -> None:
        inc = self.status.get(status)
        if inc is None:
            endpoint, model, *company = self._labels
            inc = self.status[status] = _incrementer(self.requests.labels(
                endpoint, model, str(status), *company))
        inc(1)


class Metrics:
    """Every metric of one gateway process, in a registry of its own."""

    def __init__(self, *, company_label: bool = False, version: str = "") -> None:
        self.directory = multiprocess_dir()
        self.registry = CollectorRegistry(auto_describe=True)
        self.company_label = company_label
        r = self.registry
        company = ("company",) if company_label else ()
        self._requests = Counter(
            "paragate_requests_total", "Requests answered, by route template, model and "
            "the HTTP status sent (499: the client left before any response).",
            ("endpoint", "model", "status", *company), registry=r)
        self.request_duration = Histogram(
            "paragate_request_duration_seconds", "Whole request time, from its arrival to "
            "its last byte.", ("endpoint", "model"), buckets=_DURATION, registry=r)
        self.ttft = Histogram(
            "paragate_time_to_first_token_seconds", "Streams: from the request's arrival "
            "to its first text event sent.", ("endpoint", "model"), buckets=_TTFT,
            registry=r)
        self.gap = Histogram(
            "paragate_time_between_chunks_seconds", "Streams: time between two pieces of "
            "the answer sent to the client.", ("endpoint", "model"), buckets=_GAP,
            registry=r)
        self.overhead = Histogram(
            "paragate_overhead_seconds", "Per request forwarded upstream: its whole time "
            "in the gateway less the time spent waiting on the upstream.",
            ("endpoint", "model"), buckets=_OVERHEAD, registry=r)
        self._tokens = Counter(
            "paragate_tokens_total", "Tokens vLLM reported, by model and kind (prompt or "
            "completion).", ("model", "kind", *company), registry=r)
        self._disconnects = Counter(
            "paragate_client_disconnects_total", "Clients that left before their answer "
            "ended: before any response was sent, or during it.",
            ("endpoint", "model", "when"), registry=r)
        self._rejections = Counter(
            "paragate_limit_rejections_total", "Requests refused by a rate limit, a "
            "concurrency limit, a budget, the limits backend being down, or a "
            "reservation no limit could admit.", ("kind",), registry=r)
        self._replica_requests = Counter(
            "paragate_replica_requests_total", "Tries sent to a replica.",
            ("model", "replica"), registry=r)
        self._replica_errors = Counter(
            "paragate_replica_errors_total", "A replica's failures: connect errors, "
            "timeouts, broken answers, 5xx, failed health checks.", ("model", "replica"),
            registry=r)
        self.replica_response = Histogram(
            "paragate_replica_response_seconds", "Per try: time until the replica's "
            "response headers.", ("model", "replica"), buckets=_RESPONSE, registry=r)
        self._limiter_failures = Counter(
            "paragate_limits_backend_failures_total", "Requests decided by the fail mode "
            "because Redis did not answer.", (), registry=r)
        # gauges: set from the live state by ``sample``
        self._in_flight = Gauge(
            "paragate_in_flight_requests", "Forwarded requests in progress.",
            ("endpoint",), multiprocess_mode="livesum", registry=r)
        self._streams = Gauge(
            "paragate_open_streams", "Streams being relayed.", ("endpoint",),
            multiprocess_mode="livesum", registry=r)
        self._replica_up = Gauge(
            "paragate_replica_up", "1: the replica takes traffic and is healthy; 0: "
            "ejected, draining or disabled.", ("model", "replica"),
            multiprocess_mode="livemin", registry=r)
        self._replica_in_flight = Gauge(
            "paragate_replica_in_flight", "Requests in flight on a replica from this "
            "gateway.", ("model", "replica"), multiprocess_mode="livesum", registry=r)
        self._journal_depth = Gauge(
            "paragate_usage_journal_depth", "Usage records journaled and not yet in the "
            "database.", (), multiprocess_mode="livesum", registry=r)
        self._write_lag = Gauge(
            "paragate_usage_write_lag_seconds", "How long the usage journal has not been "
            "empty (0: every record is in the database).", (),
            multiprocess_mode="livemax", registry=r)
        self._view_age = Gauge(
            "paragate_view_age_seconds", "Age of the control-plane view (keys, models) "
            "this gateway serves from.", (), multiprocess_mode="livemax", registry=r)
        self._config_version = Gauge(
            "paragate_config_version", "Version of the control-plane view served.", (),
            multiprocess_mode="livemin", registry=r)
        info = Gauge("paragate_info", "The running paragate's version.", ("version",),
                     multiprocess_mode="livemax", registry=r)
        info.labels(version or "unknown").set(1)
        if self.directory is None:
            ProcessCollector(registry=r)
        self._series: dict[tuple[str, ...], Series] = {}
        self._token_children: dict[tuple[str, ...], tuple[Callable[[float], None],
                                                          Callable[[float], None]]] = {}
        self._replicas: dict[tuple[str, str], Callable[[float], None]] = {}
        self._gauged: set[tuple[Gauge, tuple[str, ...]]] = set()
        self._limiter_seen = 0
        self._sampled_at = 0.0

    # -- the request path ---------------------------------------------------------------

    def series(self, endpoint: str, model: str, company: str | None = None) -> Series:
        key = (endpoint, model, company or "") if self.company_label else (endpoint, model)
        found = self._series.get(key)
        if found is None:
            if len(self._series) > 10_000:  # a bug upstream of here: keep memory bounded
                self._series.clear()
            found = self._series[key] = Series(self, key)
        return found

    def tokens(self, model: str, prompt: int | None, completion: int | None,
               company: str | None = None) -> None:
        key = (model, company or "") if self.company_label else (model,)
        children = self._token_children.get(key)
        if children is None:
            rest = key[1:]
            children = self._token_children[key] = (
                _incrementer(self._tokens.labels(model, "prompt", *rest)),
                _incrementer(self._tokens.labels(model, "completion", *rest)))
        if prompt:
            children[0](prompt)
        if completion:
            children[1](completion)

    def disconnected(self, endpoint: str, model: str, during: bool) -> None:
        self._disconnects.labels(endpoint, model,
                                 "during_response" if during else "before_response").inc()

    def rejected(self, kind: str) -> None:
        self._rejections.labels(kind).inc()

    def replica_counters(self, model: str, replica: str
                         ) -> tuple[Callable[[float], None], Callable[[float], None]]:
        """The ``inc`` of a replica's tries and of its failures."""
        return (_incrementer(self._replica_requests.labels(model, replica)),
                _incrementer(self._replica_errors.labels(model, replica)))

    def replica_timer(self, model: str, replica: str) -> Callable[[float], None]:
        """The ``observe`` of a replica's response-time histogram."""
        observe = self._replicas.get((model, replica))
        if observe is None:
            if len(self._replicas) > 10_000:  # pragma: no cover - replicas are configured
                self._replicas.clear()
            observe = self._replicas[(model, replica)] = _observer(
                self.replica_response.labels(model, replica))
        return observe

    # -- the gauges ---------------------------------------------------------------------

    def sample(self, *, in_flight: dict[str, int], streams: dict[str, int],
               replicas: Iterable[tuple[str, str, bool, int]],
               journal_depth: int, write_lag: float, view_age: float,
               config_version: int, limiter_failures: int) -> None:
        """Set every gauge (and the limiter's failure counter, kept there) from the
        live state. ``replicas``: (model, url, up, in flight) each."""
        self._sampled_at = time.monotonic()
        seen: set[tuple[Gauge, tuple[str, ...]]] = set()

        def put(gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
            (gauge.labels(*labels) if labels else gauge).set(value)
            seen.add((gauge, labels))

        for endpoint, n in in_flight.items():
            put(self._in_flight, (endpoint,), n)
        for endpoint, n in streams.items():
            put(self._streams, (endpoint,), n)
        for model, url, up, inflight in replicas:
            labels = (model, url)
            put(self._replica_up, labels, 1 if up else 0)
            put(self._replica_in_flight, labels, inflight)
            self._replica_requests.labels(*labels)  # present from the start, at 0
            self._replica_errors.labels(*labels)
        put(self._journal_depth, (), journal_depth)
        put(self._write_lag, (), write_lag)
        put(self._view_age, (), view_age)
        put(self._config_version, (), config_version)
        if limiter_failures > self._limiter_seen:
            self._limiter_failures.inc(limiter_failures - self._limiter_seen)
        self._limiter_seen = limiter_failures
        for gauge, gone in self._gauged - seen:  # replicas gone: their series go too
            if gone:
                gauge.remove(*gone)
        self._gauged = seen

    def due(self) -> bool:
        """Whether this worker's gauges are older than ``SAMPLE_INTERVAL``."""
        return time.monotonic() - self._sampled_at >= SAMPLE_INTERVAL

    # -- a scrape -----------------------------------------------------------------------

    def render(self) -> bytes:
        """The exposition text: this process's metrics, or, with several workers,
        every worker's added up."""
        if self.directory is None:
            return generate_latest(self.registry)
        _forget_dead_workers(self.directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def _forget_dead_workers(directory: str) -> None:
    """Drop the live-mode gauges of workers that are gone (a restarted worker's, say);
    their counters and histograms stay in the sums."""
    for name in os.listdir(directory):
        if not name.startswith("gauge_live") or not name.endswith(".db"):
            continue
        pid = name[:-3].rsplit("_", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        multiprocess.mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's: alive
        return True
    return True
