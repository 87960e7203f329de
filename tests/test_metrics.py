"""Prometheus metrics through the ASGI app, with the fake vLLM as upstream: /metrics is
scraped and parsed with prometheus-client's own parser, and every counter and histogram
must move by exactly what a known request implies (plain, streamed, failed, refused,
disconnected), and nothing else may move. Also: the names, types and labels (an
interface: pinned here), label cardinality, who may scrape, the request id and
overhead headers, and the gauges.

The gateway here runs without health checks (``health_interval=0``), so that nothing
but the test's requests moves a counter between two scrapes. A scrape counts itself
once it is answered: between two scrapes, ``/metrics`` has moved by exactly one
request (``SCRAPED``)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from paragate import control
from paragate.app import App
from paragate.gateway import Gateway
from paragate.store import Store

from . import logcapture
from .conftest import CLI, Keys, add_model, build_gateway, make_key
from .fake_vllm import FakeVLLM
from .servers import free_port
from .test_completions import assert_envelope, auth, sse_events
from .test_endpoints import ENDPOINTS, Endpoint

COMPLETIONS = "/api/v2/completions"
CHAT = "/api/v2/chat/completions"

Key = tuple[str, frozenset[tuple[str, str]]]
Samples = dict[Key, float]

# -- the interface --------------------------------------------------------------------

# Every metric the gateway exposes: its type and label names. Renaming one, adding or
# removing a label breaks dashboards and alerts (deploy/grafana, docs/observability.md).
CONTRACT: dict[str, tuple[str, frozenset[str]]] = {
    name: (kind, frozenset(labels)) for name, kind, labels in (
        ("paragate_requests_total", "counter", ("endpoint", "model", "status")),
        ("paragate_request_duration_seconds", "histogram", ("endpoint", "model")),
        ("paragate_time_to_first_token_seconds", "histogram", ("endpoint", "model")),
        ("paragate_time_between_chunks_seconds", "histogram", ("endpoint", "model")),
        ("paragate_overhead_seconds", "histogram", ("endpoint", "model")),
        ("paragate_tokens_total", "counter", ("model", "kind")),
        ("paragate_client_disconnects_total", "counter", ("endpoint", "model", "when")),
        ("paragate_limit_rejections_total", "counter", ("kind",)),
        ("paragate_replica_requests_total", "counter", ("model", "replica")),
        ("paragate_replica_errors_total", "counter", ("model", "replica")),
        ("paragate_replica_response_seconds", "histogram", ("model", "replica")),
        ("paragate_limits_backend_failures_total", "counter", ()),
        ("paragate_in_flight_requests", "gauge", ("endpoint",)),
        ("paragate_open_streams", "gauge", ("endpoint",)),
        ("paragate_replica_up", "gauge", ("model", "replica")),
        ("paragate_replica_in_flight", "gauge", ("model", "replica")),
        ("paragate_usage_journal_depth", "gauge", ()),
        ("paragate_usage_write_lag_seconds", "gauge", ()),
        ("paragate_view_age_seconds", "gauge", ()),
        ("paragate_config_version", "gauge", ()),
        ("paragate_info", "gauge", ("version",)),
    )
}
OUR_ID = re.compile(r"[0-9a-f]{16}-[0-9a-f]+")
TOKEN = "scrape-me-0123456789"  # PARAGATE_METRICS_TOKEN where a test sets one


def k(name: str, **labels: str) -> Key:
    return name, frozenset(labels.items())


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"{key} exposed twice"
            samples[key] = s.value
    return samples


async def scrape(client: httpx.AsyncClient, admin_key: str) -> Samples:
    r = await client.get("/metrics", headers=auth(admin_key))
    assert r.status_code == 200, r.text
    return parse(r.text)


def moved(before: Samples, after: Samples) -> Samples:
    """How much each counter and each histogram's count moved (only those that did)."""
    out: Samples = {}
    for key, value in after.items():
        name = key[0]
        if name.startswith("paragate_") and name.endswith(("_total", "_count")):
            delta = value - before.get(key, 0.0)
            assert delta >= 0, f"{key} went down: {before.get(key)} -> {value}"
            if delta:
                out[key] = delta
    for key in before:
        assert key in after, f"{key} disappeared"
    return out


def request_series(endpoint: str, model: str, status: int, n: int = 1) -> Samples:
    """A request answered: its count and its duration."""
    return {k("paragate_requests_total", endpoint=endpoint, model=model,
              status=str(status)): n,
            k("paragate_request_duration_seconds_count", endpoint=endpoint, model=model): n}


def forwarded(endpoint: str, model: str, replica: str, status: int = 200, *,
              prompt: int | None = None, completion: int | None = None,
              answered: bool = True) -> Samples:
    """A request that reached the upstream: its count and duration, its overhead, the
    try on the replica (and its time to headers when ``answered``), its tokens."""
    out = {**request_series(endpoint, model, status),
           k("paragate_overhead_seconds_count", endpoint=endpoint, model=model): 1,
           k("paragate_replica_requests_total", model=model, replica=replica): 1}
    if answered:
        out[k("paragate_replica_response_seconds_count", model=model, replica=replica)] = 1
    if prompt:
        out[k("paragate_tokens_total", model=model, kind="prompt")] = prompt
    if completion:
        out[k("paragate_tokens_total", model=model, kind="completion")] = completion
    return out


def add(*parts: Samples) -> Samples:
    """The sum of several expected moves."""
    out: Samples = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0) + value
    return out


SCRAPED = request_series("/metrics", "", 200)  # the scrape before (it counts itself)


# -- the harness ----------------------------------------------------------------------

@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite only: the store's backend changes nothing here."""
    return f"sqlite:///{tmp_path / 'paragate.db'}"


@dataclass(repr=False)  # no settings nor key secrets in a failure's report
class Harness:
    gw: Gateway
    app: App
    client: httpx.AsyncClient
    keys: Keys
    fake: FakeVLLM
    extra: dict[str, str]  # more keys, by name

    @property
    def replica(self) -> str:
        """The replica label of every model on the fake."""
        return self.fake.base_url

    async def scrape(self) -> Samples:
        return await scrape(self.client, self.keys.admin)

    async def text(self) -> str:
        r = await self.client.get("/metrics", headers=auth(self.keys.admin))
        assert r.status_code == 200
        return r.text

    async def post(self, path: str, key: str, body: dict[str, Any],
                   **headers: str) -> httpx.Response:
        return await self.client.post(path, json=body, headers={**auth(key), **headers})

    async def drive(self, path: str, key: str, body: dict[str, Any] | None, *,
                    gone: asyncio.Event | None = None,
                    hang_up: Callable[[list[dict[str, Any]]], bool] | None = None,
                    ) -> list[dict[str, Any]]:
        """One POST straight through the ASGI app, every message it sends kept (the
        httpx transport joins a body's pieces). The client hangs up once ``gone`` is
        set or ``hang_up`` holds of the messages sent so far; ``body`` None: before
        its body."""
        gone = gone or asyncio.Event()
        sent: list[dict[str, Any]] = []
        first = body is not None

        async def receive() -> dict[str, Any]:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": json.dumps(body).encode(),
                        "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(dict(message))
            if hang_up is not None and hang_up(sent):
                gone.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"gateway"),
                             (b"authorization", f"Bearer {key}".encode()),
                             (b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 40000), "server": ("gateway", 80)}
        await self.app(scope, receive, send)
        return sent


def bodies(sent: list[dict[str, Any]]) -> list[bytes]:
    """The non-empty body pieces sent, in order."""
    return [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body")]


def start_of(sent: list[dict[str, Any]]) -> dict[str, Any]:
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    return start


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness(store: Store, keys: Keys, fake: FakeVLLM, tmp_path: Path
                       ) -> AsyncIterator[HarnessFactory]:
    """Starts a gateway with more settings (each test at most one); stopped after."""
    started: list[tuple[Gateway, httpx.AsyncClient]] = []
    # the test's own: a model whose replica listens nowhere, a key of 1 request a
    # minute, a key that may hold one request at a time, a key of a named company
    add_model(store, "dead", f"http://127.0.0.1:{free_port()}/v1", "ok")
    extra = {"one_rpm": make_key(store, "one-rpm", rate_limit_rpm=1)[0]}
    user = control.users.create(store, CLI, email="solo@metrics.example", company_id=1,
                                rate_limits={"max_concurrent": 1})
    extra["solo"] = make_key(store, "solo", user_id=user.id)[0]
    company = control.companies.create(store, CLI, "Metrics Works")
    worker = control.users.create(store, CLI, email="w@metrics.example",
                                  company_id=company.id)
    extra["works"] = make_key(store, "works", user_id=worker.id)[0]

    async def make(**settings: Any) -> Harness:
        gw = build_gateway(store, tmp_path, **{"health_interval": 0,
                                               "upstream_read_timeout": 10.0, **settings})
        await gw.start()
        app = App(gw)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                   base_url="http://gateway")
        started.append((gw, client))
        return Harness(gw, app, client, keys, fake, extra)

    yield make
    for gw, client in started:
        await client.aclose()
        await gw.stop()


@pytest.fixture
async def h(make_harness: HarnessFactory) -> Harness:
    return await make_harness()


# -- 1. names, types, help and labels -------------------------------------------------

async def _one_of_each(h: Harness) -> None:
    """A request of every kind: plain on each endpoint, a stream, a failure, a
    refusal, a client gone mid-stream, an unknown route."""
    for ep in ENDPOINTS:
        assert (await h.post(ep.path, h.keys.full, ep.request())).status_code == 200
    r = await h.post(COMPLETIONS, h.keys.full, {"model": "alfred-4.2", "prompt": "x",
                                                "max_tokens": 2, "stream": True})
    assert r.status_code == 200
    assert (await h.post(COMPLETIONS, h.keys.full, {"model": "dead", "prompt": "x"})
            ).status_code == 503
    for expected in (200, 429):
        r = await h.post(COMPLETIONS, h.extra["one_rpm"], {"model": "alfred-4.2",
                                                           "prompt": "x"})
        assert r.status_code == expected
    await h.drive(COMPLETIONS, h.keys.full, {"model": "slow", "prompt": "x",
                                             "max_tokens": 50, "stream": True},
                  hang_up=lambda sent: bool(bodies(sent)))
    assert (await h.client.get("/nope")).status_code == 404


async def test_names_types_help_and_labels_are_pinned(h: Harness) -> None:
    await _one_of_each(h)
    text = await h.text()
    exposed: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("paragate_"):
            # beside ours, only the process collector's (one process: no multiprocess)
            assert family.name.startswith("process_"), family.name
            continue
        assert family.documentation.strip(), f"{family.name} has no HELP"
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = frozenset(label for s in family.samples for label in s.labels) - {"le"}
        assert family.samples, f"{name} has no sample"
        exposed[name] = (family.type, labels)
    assert exposed == CONTRACT
    # every sample of a family carries every label of that family
    for family in text_string_to_metric_families(text):
        if family.name.startswith("paragate_"):
            _, labels = CONTRACT[family.name + "_total" if family.type == "counter"
                                 else family.name]
            for s in family.samples:
                assert set(s.labels) - {"le"} == labels, (family.name, s)
    assert "_created" not in text  # disable_created_metrics()
    info = parse(text)
    import paragate
    assert info[k("paragate_info", version=paragate.__version__)] == 1


def test_contract_documented() -> None:
    """Every metric of the interface is in docs/observability.md (metrics.py cites it)."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "observability.md"
    assert doc.exists(), "docs/observability.md: the metrics' names and labels"
    text = doc.read_text()
    missing = [name for name in CONTRACT if name not in text]
    assert not missing, f"not in docs/observability.md: {missing}"


# -- 2. plain requests ----------------------------------------------------------------

@pytest.mark.parametrize("ep", ENDPOINTS, ids=[e.path.removeprefix("/api/v2/")
                                               for e in ENDPOINTS])
async def test_a_plain_request_moves_exactly_its_series(h: Harness, ep: Endpoint) -> None:
    before = await h.scrape()
    r = await h.post(ep.path, h.keys.full, ep.request())
    assert r.status_code == 200, r.text
    after = await h.scrape()
    usage = r.json().get("usage")
    prompt, completion, _ = ep.usage
    if usage is not None:  # what the answer says is what is counted
        assert (usage["prompt_tokens"], usage.get("completion_tokens") or None) == (
            prompt, completion or None)
    assert moved(before, after) == {
        **forwarded(ep.path, ep.model, h.replica, prompt=prompt, completion=completion),
        **SCRAPED}
    # a JSON answer has no first token nor chunks: those histograms did not move
    for name in ("paragate_time_to_first_token_seconds_count",
                 "paragate_time_between_chunks_seconds_count"):
        assert after[k(name, endpoint=ep.path, model=ep.model)] == 0
    # the sums moved with the counts
    for name in ("paragate_request_duration_seconds_sum", "paragate_overhead_seconds_sum"):
        key = k(name, endpoint=ep.path, model=ep.model)
        assert after[key] > before.get(key, 0.0)
    key = k("paragate_replica_response_seconds_sum", model=ep.model, replica=h.replica)
    assert after[key] > before.get(key, 0.0)
    # a histogram's +Inf bucket is its count
    assert after[("paragate_request_duration_seconds_bucket", frozenset(
        {"endpoint": ep.path, "model": ep.model, "le": "+Inf"}.items()))] == after[
        k("paragate_request_duration_seconds_count", endpoint=ep.path, model=ep.model)]


async def test_many_requests_add_up(h: Harness) -> None:
    before = await h.scrape()
    for tokens in (1, 2, 3, 4, 5):
        r = await h.post(COMPLETIONS, h.keys.full, {"model": "alfred-4.2", "prompt": "x",
                                                    "max_tokens": tokens})
        assert r.status_code == 200
    diff = moved(before, await h.scrape())
    assert diff == {
        **{key: 5 * v for key, v in forwarded(COMPLETIONS, "alfred-4.2", h.replica).items()},
        k("paragate_tokens_total", model="alfred-4.2", kind="prompt"): 15,
        k("paragate_tokens_total", model="alfred-4.2", kind="completion"): 15,
        **SCRAPED}


# -- 3. streams -----------------------------------------------------------------------

@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_moves_its_series_and_one_gap_per_piece_after_the_first(
        h: Harness, path: str, include_usage: bool) -> None:
    body: dict[str, Any] = {"model": "alfred-4.2", "max_tokens": 4, "stream": True}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "x"
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    before = await h.scrape()
    sent = await h.drive(path, h.keys.full, body)
    after = await h.scrape()
    assert start_of(sent)["status"] == 200
    pieces = bodies(sent)
    events = sse_events(b"".join(pieces).decode())
    assert events[-1] == "[DONE]"
    if include_usage:  # the counted tokens are those the client was told
        usage = json.loads(events[-2])["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3, 4)
    gaps = len(pieces) - 1
    expected = {**forwarded(path, "alfred-4.2", h.replica, prompt=3, completion=4),
                k("paragate_time_to_first_token_seconds_count", endpoint=path,
                  model="alfred-4.2"): 1, **SCRAPED}
    if gaps:
        expected[k("paragate_time_between_chunks_seconds_count", endpoint=path,
                    model="alfred-4.2")] = gaps
    assert moved(before, after) == expected
    ttft = k("paragate_time_to_first_token_seconds_sum", endpoint=path, model="alfred-4.2")
    duration = k("paragate_request_duration_seconds_sum", endpoint=path,
                 model="alfred-4.2")
    assert 0 < after[ttft] - before.get(ttft, 0.0) <= after[duration] - before.get(
        duration, 0.0)


async def test_a_slow_stream_observes_a_gap_for_each_piece(h: Harness) -> None:
    """One token every 50 ms: each arrives on its own, each is a piece of its own."""
    before = await h.scrape()
    sent = await h.drive(COMPLETIONS, h.keys.full, {"model": "slow", "prompt": "x",
                                                    "max_tokens": 3, "stream": True})
    after = await h.scrape()
    pieces = bodies(sent)
    assert len(pieces) >= 3  # three tokens 50 ms apart, then [DONE]
    gap = k("paragate_time_between_chunks_seconds_count", endpoint=COMPLETIONS,
            model="slow")
    assert after[gap] - before.get(gap, 0.0) == len(pieces) - 1
    total = k("paragate_time_between_chunks_seconds_sum", endpoint=COMPLETIONS,
              model="slow")
    assert after[total] - before.get(total, 0.0) > 0


# -- 4. failures ----------------------------------------------------------------------

async def test_an_unknown_model_counts_as_unknown(h: Harness) -> None:
    name = f"no-such-model-{uuid.uuid4().hex[:8]}"
    before = await h.scrape()
    r = await h.post(COMPLETIONS, h.keys.full, {"model": name, "prompt": "x"})
    assert_envelope(r, 404, "model_not_found", "model")
    text = await h.text()
    assert moved(before, parse(text)) == {
        **request_series(COMPLETIONS, "unknown", 404), **SCRAPED}  # no overhead: not sent
    assert name not in text


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"model": "alfred-4.2", "prompt": "x", "temperature": 9}, 400, "invalid_value"),
    ({"prompt": "x"}, 400, "missing_field"),
    ({"model": "alfred-4.2", "prompt": "x", "max_tokens": "many"}, 400, "invalid_type"),
])
async def test_a_bad_body_counts_as_unknown(h: Harness, body: dict[str, Any], status: int,
                                            code: str) -> None:
    before = await h.scrape()
    r = await h.post(COMPLETIONS, h.keys.full, body)
    assert r.status_code == status, r.text
    assert moved(before, await h.scrape()) == {
        **request_series(COMPLETIONS, "unknown", status), **SCRAPED}


async def test_a_refusal_before_the_model_is_known_counts_as_unknown(h: Harness) -> None:
    """No key, a wrong key: the model's endpoint, model unknown, no overhead."""
    before = await h.scrape()
    r = await h.client.post(COMPLETIONS, json={"model": "alfred-4.2", "prompt": "x"})
    assert_envelope(r, 401, "invalid_api_key")
    r = await h.post(COMPLETIONS, "pg-000000000000-nope-nope-nope-nope-nope",
                     {"model": "alfred-4.2"})
    assert_envelope(r, 401, "invalid_api_key")
    assert moved(before, await h.scrape()) == {
        **request_series(COMPLETIONS, "unknown", 401, 2), **SCRAPED}


async def test_a_model_the_key_may_not_use(h: Harness) -> None:
    """A configured name (bounded) keeps its label, even when refused."""
    before = await h.scrape()
    r = await h.post(COMPLETIONS, h.keys.restricted, {"model": "limited", "prompt": "x"})
    assert r.status_code in (403, 404), r.text
    assert moved(before, await h.scrape()) == {
        **request_series(COMPLETIONS, "limited", r.status_code), **SCRAPED}


@pytest.mark.parametrize(("model", "status"), [("status-500", 502), ("garbage", 502)])
async def test_an_upstream_failure_counts_a_replica_error(h: Harness, model: str,
                                                          status: int) -> None:
    before = await h.scrape()
    r = await h.post(COMPLETIONS, h.keys.full, {"model": model, "prompt": "x"})
    assert r.status_code == status, r.text
    assert moved(before, await h.scrape()) == {
        **forwarded(COMPLETIONS, model, h.replica, status),
        k("paragate_replica_errors_total", model=model, replica=h.replica): 1,
        **SCRAPED}


async def test_an_upstream_4xx_is_no_replica_error(h: Harness) -> None:
    before = await h.scrape()
    r = await h.post(COMPLETIONS, h.keys.full, {"model": "status-400", "prompt": "x"})
    assert r.status_code == 400, r.text
    assert moved(before, await h.scrape()) == {
        **forwarded(COMPLETIONS, "status-400", h.replica, 400), **SCRAPED}


async def test_a_replica_that_refuses_connections(h: Harness) -> None:
    (record,) = h.gw.registry.routes["dead"].replicas
    replica = record.url
    before = await h.scrape()
    r = await h.post(COMPLETIONS, h.keys.full, {"model": "dead", "prompt": "x"})
    assert_envelope(r, 503, "upstream_unavailable")
    after = await h.scrape()
    assert moved(before, after) == {
        **forwarded(COMPLETIONS, "dead", replica, 503, answered=False),
        k("paragate_replica_errors_total", model="dead", replica=replica): 1,
        **SCRAPED}
    assert after[k("paragate_replica_up", model="dead", replica=replica)] == 1
    for _ in range(2):  # the third failure in a row ejects it
        r = await h.post(COMPLETIONS, h.keys.full, {"model": "dead", "prompt": "x"})
        assert r.status_code == 503
    after = await h.scrape()
    assert after[k("paragate_replica_up", model="dead", replica=replica)] == 0
    assert after[k("paragate_replica_errors_total", model="dead", replica=replica)] == 3
    assert after[k("paragate_replica_up", model="alfred-4.2", replica=h.replica)] == 1


async def test_a_stream_that_fails_before_its_first_byte(h: Harness) -> None:
    before = await h.scrape()
    r = await h.post(COMPLETIONS, h.keys.full, {"model": "status-500", "prompt": "x",
                                                "stream": True})
    assert r.status_code == 502
    assert moved(before, await h.scrape()) == {
        **forwarded(COMPLETIONS, "status-500", h.replica, 502),
        k("paragate_replica_errors_total", model="status-500", replica=h.replica): 1,
        **SCRAPED}  # no first token


async def test_a_stream_cut_by_the_upstream(h: Harness) -> None:
    """The fake closes the connection after two tokens: the answer had begun (200), the
    replica failed (a broken answer: ``paragate_replica_errors_total``, and a failure
    towards its ejection, as for a JSON answer cut short), and the tokens vLLM had
    reported are counted."""
    before = await h.scrape()
    sent = await h.drive(COMPLETIONS, h.keys.full, {"model": "drop", "prompt": "x",
                                                    "max_tokens": 5, "stream": True})
    after = await h.scrape()
    assert start_of(sent)["status"] == 200
    # the text pieces relayed, then the error event (no text: no gap)
    *pieces, failure = bodies(sent)
    assert b'"code":"upstream_error"' in failure and failure.endswith(b"data: [DONE]\n\n")
    diff = moved(before, after)
    completion = diff.pop(k("paragate_tokens_total", model="drop", kind="completion"))
    assert 1 <= completion <= 2
    expected = {**forwarded(COMPLETIONS, "drop", h.replica, prompt=3),
                k("paragate_replica_errors_total", model="drop", replica=h.replica): 1,
                k("paragate_time_to_first_token_seconds_count", endpoint=COMPLETIONS,
                  model="drop"): 1, **SCRAPED}
    if len(pieces) > 1:
        expected[k("paragate_time_between_chunks_seconds_count", endpoint=COMPLETIONS,
                    model="drop")] = len(pieces) - 1
    assert diff == expected


# -- 5. refusals ----------------------------------------------------------------------

async def test_a_rate_limit_refusal(h: Harness) -> None:
    key = h.extra["one_rpm"]
    before = await h.scrape()
    r = await h.post(COMPLETIONS, key, {"model": "alfred-4.2", "prompt": "x",
                                        "max_tokens": 2})
    assert r.status_code == 200
    r = await h.post(COMPLETIONS, key, {"model": "alfred-4.2", "prompt": "x",
                                        "max_tokens": 2})
    assert_envelope(r, 429, "rate_limit_exceeded")
    assert moved(before, await h.scrape()) == add(
        forwarded(COMPLETIONS, "alfred-4.2", h.replica, prompt=3, completion=2),
        request_series(COMPLETIONS, "alfred-4.2", 429),  # never sent: no overhead
        {k("paragate_limit_rejections_total", kind="rate_limit_exceeded"): 1}, SCRAPED)


async def test_a_concurrency_refusal_while_a_stream_is_held(h: Harness) -> None:
    """The fake holds the ``gated`` stream before its end: a second request of the
    same user (one at a time) is refused, and the gauges show the stream open."""
    key = h.extra["solo"]
    before = await h.scrape()
    pieces = asyncio.Event()

    def started(sent: list[dict[str, Any]]) -> bool:
        if bodies(sent):
            pieces.set()
        return False  # the client stays

    held = asyncio.create_task(h.drive(
        COMPLETIONS, key, {"model": "gated", "prompt": "x", "max_tokens": 2,
                           "stream": True}, hang_up=started))
    try:
        await asyncio.wait_for(pieces.wait(), 10)
        during = await h.scrape()
        assert during[k("paragate_in_flight_requests", endpoint=COMPLETIONS)] == 1
        assert during[k("paragate_open_streams", endpoint=COMPLETIONS)] == 1
        assert during[k("paragate_replica_in_flight", model="gated",
                        replica=h.replica)] == 1
        r = await h.post(COMPLETIONS, key, {"model": "alfred-4.2", "prompt": "x"})
        assert_envelope(r, 429, "concurrency_limit_exceeded")
    finally:
        h.fake.gate.set()
        sent = await held
    after = await h.scrape()
    assert after[k("paragate_in_flight_requests", endpoint=COMPLETIONS)] == 0
    assert after[k("paragate_open_streams", endpoint=COMPLETIONS)] == 0
    assert after[k("paragate_replica_in_flight", model="gated", replica=h.replica)] == 0
    gaps = len(bodies(sent)) - 1
    expected = add(
        forwarded(COMPLETIONS, "gated", h.replica, prompt=3, completion=2),
        {k("paragate_time_to_first_token_seconds_count", endpoint=COMPLETIONS,
           model="gated"): 1},
        request_series(COMPLETIONS, "alfred-4.2", 429),
        {k("paragate_limit_rejections_total", kind="concurrency_limit_exceeded"): 1},
        request_series("/metrics", "", 200, 2))  # two scrapes before this one
    if gaps:
        expected[k("paragate_time_between_chunks_seconds_count", endpoint=COMPLETIONS,
                    model="gated")] = gaps
    assert moved(before, after) == expected


# -- 6. clients that leave ------------------------------------------------------------

async def test_a_client_gone_mid_stream(h: Harness) -> None:
    before = await h.scrape()
    sent = await h.drive(COMPLETIONS, h.keys.full,
                         {"model": "slow", "prompt": "x", "max_tokens": 100,
                          "stream": True},
                         hang_up=lambda sent: bool(bodies(sent)))
    after = await h.scrape()
    assert start_of(sent)["status"] == 200
    pieces = bodies(sent)
    assert not pieces[-1].endswith(b"[DONE]\n\n")  # it never ended
    diff = moved(before, after)
    completion = diff.pop(k("paragate_tokens_total", model="slow", kind="completion"))
    assert 1 <= completion < 100  # vLLM's running count when the client left
    expected = {
        **forwarded(COMPLETIONS, "slow", h.replica, prompt=3),  # status 200: it was sent
        k("paragate_time_to_first_token_seconds_count", endpoint=COMPLETIONS,
          model="slow"): 1,
        k("paragate_client_disconnects_total", endpoint=COMPLETIONS, model="slow",
          when="during_response"): 1,
        **SCRAPED}
    if len(pieces) > 1:
        expected[k("paragate_time_between_chunks_seconds_count", endpoint=COMPLETIONS,
                    model="slow")] = len(pieces) - 1
    assert diff == expected
    assert after[k("paragate_open_streams", endpoint=COMPLETIONS)] == 0
    assert after[k("paragate_in_flight_requests", endpoint=COMPLETIONS)] == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_gone_before_any_response(h: Harness, stream: bool) -> None:
    """The fake's ``hang`` never answers: the client leaves once vLLM has the request."""
    before = await h.scrape()
    gone = asyncio.Event()
    seen = len(h.fake.requests)
    task = asyncio.create_task(h.drive(COMPLETIONS, h.keys.full,
                                       {"model": "hang", "prompt": "x", "stream": stream},
                                       gone=gone))
    while len(h.fake.requests) == seen:
        assert not task.done(), task.result()
        await asyncio.sleep(0.005)
    gone.set()
    sent = await asyncio.wait_for(task, 10)
    assert sent == []  # nobody was left to answer
    after = await h.scrape()
    assert moved(before, after) == {
        **forwarded(COMPLETIONS, "hang", h.replica, 499, answered=False),
        k("paragate_client_disconnects_total", endpoint=COMPLETIONS, model="hang",
          when="before_response"): 1,
        **SCRAPED}
    assert after[k("paragate_in_flight_requests", endpoint=COMPLETIONS)] == 0


async def test_a_client_gone_before_its_body(h: Harness) -> None:
    before = await h.scrape()
    gone = asyncio.Event()
    gone.set()
    sent = await h.drive(COMPLETIONS, h.keys.full, None, gone=gone)
    assert sent == []
    assert moved(before, await h.scrape()) == {
        **request_series(COMPLETIONS, "unknown", 499),
        k("paragate_client_disconnects_total", endpoint=COMPLETIONS, model="unknown",
          when="before_response"): 1,
        **SCRAPED}


# -- 7. bounded labels ----------------------------------------------------------------

async def test_no_series_for_names_the_client_made_up(h: Harness) -> None:
    made_up = uuid.uuid4().hex
    for path, body in (
            (COMPLETIONS, {"model": f"m-{made_up}", "prompt": "x"}),
            (CHAT, {"model": f"m-{made_up}", "messages": [{"role": "user",
                                                          "content": "x"}]}),
            ("/api/v2/embeddings", {"model": f"m-{made_up}", "input": "x"})):
        assert (await h.post(path, h.keys.full, body)).status_code == 404
    assert (await h.client.get(f"/api/v2/models/m-{made_up}", headers=auth(h.keys.full))
            ).status_code == 404
    assert (await h.client.get(f"/x-{made_up}")).status_code == 404
    assert (await h.client.post(f"/api/v2/files/{made_up}")).status_code == 401
    text = await h.text()
    assert made_up not in text
    samples = parse(text)
    endpoints = {dict(labels).get("endpoint") for _, labels in samples} - {None}
    # route templates only: the made-up path is "unmatched", a model's path a template
    assert "unmatched" in endpoints and "/api/v2/models/{model}" in endpoints
    assert "/api/v2/files" in endpoints
    assert all(e == "unmatched" or (e or "").startswith("/") for e in endpoints), endpoints
    assert not any("no-such" in (e or "") for e in endpoints)


async def test_the_company_label_when_asked_for(make_harness: HarnessFactory) -> None:
    h = await make_harness(metrics_company_label=True)
    before = await h.scrape()
    r = await h.post(COMPLETIONS, h.extra["works"], {"model": "alfred-4.2", "prompt": "x",
                                                      "max_tokens": 2})
    assert r.status_code == 200
    r = await h.post(COMPLETIONS, h.extra["works"], {"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    after = await h.scrape()
    default = control.companies.get(h.gw.store, CLI, 1).name
    r = await h.post(COMPLETIONS, h.keys.full, {"model": "alfred-4.2", "prompt": "x",
                                                "max_tokens": 1})
    assert r.status_code == 200
    last = await h.scrape()
    ep, m = COMPLETIONS, "alfred-4.2"
    assert moved(before, after) == {
        k("paragate_requests_total", endpoint=ep, model=m, status="200",
          company="Metrics Works"): 1,
        k("paragate_requests_total", endpoint=ep, model="unknown", status="404",
          company="Metrics Works"): 1,
        k("paragate_request_duration_seconds_count", endpoint=ep, model=m): 1,
        k("paragate_request_duration_seconds_count", endpoint=ep, model="unknown"): 1,
        k("paragate_overhead_seconds_count", endpoint=ep, model=m): 1,
        k("paragate_replica_requests_total", model=m, replica=h.replica): 1,
        k("paragate_replica_response_seconds_count", model=m, replica=h.replica): 1,
        k("paragate_tokens_total", model=m, kind="prompt", company="Metrics Works"): 3,
        k("paragate_tokens_total", model=m, kind="completion",
          company="Metrics Works"): 2,
        k("paragate_requests_total", endpoint="/metrics", model="", status="200",
          company=""): 1,
        k("paragate_request_duration_seconds_count", endpoint="/metrics", model=""): 1}
    diff = moved(after, last)
    assert diff[k("paragate_requests_total", endpoint=ep, model=m, status="200",
                  company=default)] == 1
    assert diff[k("paragate_tokens_total", model=m, kind="completion",
                  company=default)] == 1


async def test_no_company_label_by_default(h: Harness) -> None:
    r = await h.post(COMPLETIONS, h.extra["works"], {"model": "alfred-4.2", "prompt": "x"})
    assert r.status_code == 200
    text = await h.text()
    assert "company=" not in text and "Metrics Works" not in text


# -- 8. who may scrape, the identity headers, the gauges ------------------------------

async def test_who_may_scrape(make_harness: HarnessFactory) -> None:
    logcapture.register(TOKEN, "metrics token")  # never in a log line
    h = await make_harness(metrics_token=TOKEN)
    assert_envelope(await h.client.get("/metrics"), 401, "invalid_api_key")
    assert_envelope(await h.client.get("/metrics", headers=auth(h.keys.full)), 403,
                    "permission_denied")
    assert (await h.client.get("/metrics", headers=auth(h.keys.admin))).status_code == 200
    r = await h.client.get("/metrics", headers=auth(TOKEN))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    parse(r.text)
    for wrong in (TOKEN[:-1], TOKEN + "0", TOKEN.capitalize()):
        assert_envelope(await h.client.get("/metrics", headers=auth(wrong)), 401,
                        "invalid_api_key")
    assert_envelope(await h.client.get(
        "/metrics", headers={"Authorization": TOKEN}), 401,
        "invalid_api_key")
    samples = await h.scrape()
    counts = {dict(labels)["status"]: v for (name, labels), v in samples.items()
              if name == "paragate_requests_total" and dict(labels)["endpoint"] == "/metrics"}
    assert counts == {"401": 5, "403": 1, "200": 2}


async def test_the_token_is_no_key_elsewhere(make_harness: HarnessFactory) -> None:
    h = await make_harness(metrics_token=TOKEN)
    r = await h.client.get("/api/v2/models", headers=auth(TOKEN))
    assert_envelope(r, 401, "invalid_api_key")


async def test_metrics_off(make_harness: HarnessFactory) -> None:
    h = await make_harness(metrics=False, metrics_token=TOKEN)
    assert h.gw.metrics is None
    for headers in ({}, auth(h.keys.admin), auth(TOKEN)):
        assert_envelope(await h.client.get("/metrics", headers=headers), 404, "not_found")
    r = await h.post(COMPLETIONS, h.keys.full, {"model": "alfred-4.2", "prompt": "x"})
    assert r.status_code == 200 and float(r.headers["x-paragate-overhead-ms"]) >= 0
    sent = await h.drive(COMPLETIONS, h.keys.full, {"model": "alfred-4.2", "prompt": "x",
                                                    "max_tokens": 3, "stream": True})
    assert b"".join(bodies(sent)).endswith(b"data: [DONE]\n\n")


def _identity(headers: httpx.Headers) -> tuple[str, float]:
    assert headers.get_list("x-request-id") == [headers["x-request-id"]]  # once
    assert headers.get_list("x-paragate-overhead-ms") == [headers["x-paragate-overhead-ms"]]
    overhead = headers["x-paragate-overhead-ms"]
    assert re.fullmatch(r"\d+\.\d{3}", overhead), overhead
    return headers["x-request-id"], float(overhead)


async def _every_kind(h: Harness, headers: dict[str, str]) -> list[httpx.Response]:
    c = h.client
    return [
        await h.post(COMPLETIONS, h.keys.full, {"model": "alfred-4.2", "prompt": "x"},
                     **headers),
        await h.post(COMPLETIONS, h.keys.full, {"model": "alfred-4.2", "prompt": "x",
                                                "stream": True, "max_tokens": 2}, **headers),
        await h.post(COMPLETIONS, h.keys.full, {"model": "nope", "prompt": "x"}, **headers),
        await h.post(COMPLETIONS, h.keys.full, {"model": "status-500", "prompt": "x"},
                     **headers),
        await c.post(COMPLETIONS, json={}, headers=headers),  # 401
        await c.get("/nope", headers=headers),  # 404
        await c.get("/health", headers=headers),
        await c.get("/api/v2/models", headers={**auth(h.keys.full), **headers}),
        await c.get("/api/v2/companies", headers={**auth(h.keys.admin), **headers}),
        await c.post("/api/v2/companies", json={"name": ""},
                     headers={**auth(h.keys.admin), **headers}),  # 400 from the admin API
        await c.delete("/api/v2/models", headers={**auth(h.keys.admin), **headers}),  # 405
        await c.get("/metrics", headers={**auth(h.keys.admin), **headers}),
    ]


async def test_request_id_and_overhead_headers_on_every_answer(h: Harness) -> None:
    statuses = []
    ours: set[str] = set()
    for r in await _every_kind(h, {}):
        statuses.append(r.status_code)
        rid, overhead = _identity(r.headers)
        assert OUR_ID.fullmatch(rid), rid
        assert overhead >= 0
        ours.add(rid)
    assert statuses == [200, 200, 404, 502, 401, 404, 200, 200, 200, 400, 405, 200]
    assert len(ours) == len(statuses)  # a new one each
    for r in await _every_kind(h, {"x-request-id": "client.Trace_id-42"}):
        assert _identity(r.headers)[0] == "client.Trace_id-42", r.request.url


@pytest.mark.parametrize("given", [b"a" * 129, b"two words", b"semi;colon",
                                   "\u00fcn\u00ef".encode(), b""])
async def test_a_malformed_request_id_is_replaced(h: Harness, given: bytes) -> None:
    for r in (await h.client.post(COMPLETIONS, json={"model": "alfred-4.2", "prompt": "x"},
                                  headers={b"authorization": f"Bearer {h.keys.full}".encode(),
                                           b"x-request-id": given}),
              await h.client.get("/nope", headers={b"x-request-id": given})):
        rid, _ = _identity(r.headers)
        assert OUR_ID.fullmatch(rid), rid


async def test_a_request_id_of_128_characters_is_kept(h: Harness) -> None:
    given = "A" * 128
    r = await h.post(COMPLETIONS, h.keys.full, {"model": "alfred-4.2", "prompt": "x"},
                     **{"x-request-id": given})
    assert r.headers["x-request-id"] == given


async def test_gauges_after_requests_and_replicas(h: Harness) -> None:
    await _one_of_each(h)
    samples = await h.scrape()
    in_flight = {dict(labels)["endpoint"]: v for (name, labels), v in samples.items()
                 if name == "paragate_in_flight_requests"}
    streams = {dict(labels)["endpoint"]: v for (name, labels), v in samples.items()
               if name == "paragate_open_streams"}
    assert set(in_flight) == {ep.path for ep in ENDPOINTS}  # every endpoint used
    assert set(in_flight.values()) == {0}
    assert streams == {COMPLETIONS: 0}
    # every enabled model's replica, and only those
    up = {dict(labels)["model"]: v for (name, labels), v in samples.items()
          if name == "paragate_replica_up"}
    assert set(up) == set(h.gw.registry.routes)
    assert "off" not in up and set(up.values()) == {1}
    assert all(v == 0 for (name, _), v in samples.items()
               if name == "paragate_replica_in_flight")
    assert samples[k("paragate_config_version")] == h.gw.registry.version
    assert samples[k("paragate_usage_journal_depth")] >= 0
    assert samples[k("paragate_view_age_seconds")] >= 0
    assert samples[k("paragate_limits_backend_failures_total")] == 0


@pytest.mark.parametrize("checked", [False, True], ids=["no-checks", "after-a-check"])
async def test_a_model_disabled_takes_its_replica_gauges_away(h: Harness,
                                                              checked: bool) -> None:
    """Its replica no longer takes traffic: no ``replica_up`` of 1 for it (the series
    goes). ``checked``: also after the health checker's own pass over the fleets
    (which runs every ``PARAGATE_HEALTH_INTERVAL``; never when that is 0)."""
    assert (await h.post(COMPLETIONS, h.keys.full, {"model": "limited", "prompt": "x"})
            ).status_code == 200
    samples = await h.scrape()
    assert samples[k("paragate_replica_up", model="limited", replica=h.replica)] == 1
    control.models.update(h.gw.store, CLI, "limited", enabled=False)
    await h.gw.refresher.refresh()
    assert "limited" not in h.gw.registry.routes
    if checked:
        h.gw.health.sync()
    samples = await h.scrape()
    assert k("paragate_replica_up", model="limited", replica=h.replica) not in samples
    assert k("paragate_replica_in_flight", model="limited", replica=h.replica) not in samples
    # what happened stays: its counters are history
    assert samples[k("paragate_replica_requests_total", model="limited",
                     replica=h.replica)] == 1


async def test_a_drained_replica_is_down(h: Harness) -> None:
    """An administrator drains the replica: ``replica_up`` says 0 at the next scrape,
    with or without a request or a health check in between."""
    (record,) = h.gw.registry.routes["alfred-4.2"].replicas
    assert (await h.scrape())[k("paragate_replica_up", model="alfred-4.2",
                                replica=h.replica)] == 1
    control.replicas.update(h.gw.store, CLI, "alfred-4.2", record.id, draining=True)
    await h.gw.refresher.refresh()
    assert (await h.scrape())[k("paragate_replica_up", model="alfred-4.2",
                                replica=h.replica)] == 0
