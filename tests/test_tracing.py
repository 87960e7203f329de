"""Traces (``paragate.tracing``): the spans a request makes, as an OTLP/HTTP collector
receives them (an in-process stand-in decoding the protobuf exports), their parents,
kinds, names and attributes; the ``traceparent`` sent upstream; sampling; the null
trace used while tracing is off; and shutdown when the collector is gone."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status as StatusProto

import paragate
from paragate import tracing
from paragate.app import App
from paragate.config import ConfigError, Settings
from paragate.errors import ModelNotFound
from paragate.gateway import Gateway
from paragate.store import Store
from paragate.tracing import NO_TRACE, RequestTrace, Tracing, attribute_name

from .conftest import Keys, build_gateway
from .fake_vllm import FakeVLLM
from .test_completions import auth

SERVER = SpanProto.SpanKind.SPAN_KIND_SERVER
CLIENT = SpanProto.SpanKind.SPAN_KIND_CLIENT
INTERNAL = SpanProto.SpanKind.SPAN_KIND_INTERNAL
ERROR = StatusProto.StatusCode.STATUS_CODE_ERROR
UNSET = StatusProto.StatusCode.STATUS_CODE_UNSET
TRACEPARENT = re.compile(rb"^traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\r\n")
COMPLETIONS = "/api/v2/completions"


# -- the collector stand-in -----------------------------------------------------------

def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class Received:
    """One span as the collector received it (ids in hex, as in a traceparent)."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    attributes: dict[str, Any]
    status: int
    message: str
    events: list[tuple[str, dict[str, Any]]]
    resource: dict[str, Any]
    scope: str


@dataclass
class Collector:
    """An OTLP/HTTP receiver on a free port: POST /v1/traces, protobuf bodies."""

    spans: list[Received] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def receive(self, body: bytes, headers: dict[str, str]) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        self.headers.append(headers)
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(Received(
                        name=s.name, kind=s.kind, trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        status=s.status.code, message=s.status.message,
                        events=[(e.name, {a.key: _value(a.value) for a in e.attributes})
                                for e in s.events],
                        resource=resource, scope=ss.scope.name))

    def named(self, name: str) -> Received:
        found = [s for s in self.spans if s.name == name]
        assert len(found) == 1, f"{len(found)} spans named {name!r}: {self.spans}"
        return found[0]


@pytest.fixture
def collector() -> Iterator[Collector]:
    got = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            got.receive(body, {k.lower(): v for k, v in self.headers.items()})
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    got.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                              daemon=True)
    thread.start()
    yield got
    server.shutdown()
    server.server_close()


def build(endpoint: str, **settings: Any) -> Tracing:
    built = Tracing.build(Settings(otlp_endpoint=endpoint, **settings))
    assert built is not None
    return built


def scope(*headers: tuple[bytes, bytes], method: str = "POST",
          path: str = COMPLETIONS) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "scheme": "http",
            "headers": [(b"host", b"gateway"), *headers]}


def traceparent(headers: bytes) -> tuple[str, str, bool]:
    """The trace id, parent id and sampled flag of the traceparent in ``headers``
    (the other flags' bits, such as level 2's random trace id, may be set)."""
    found = TRACEPARENT.match(headers)
    assert found, headers
    return found.group(1).decode(), found.group(2).decode(), bool(int(found.group(3), 16) & 1)


# -- 1. off by default ----------------------------------------------------------------

def test_off_builds_nothing_and_never_imports_opentelemetry() -> None:
    code = ("import sys\n"
            "import paragate.app\n"
            "from paragate.config import Settings\n"
            "from paragate.tracing import Tracing\n"
            "assert Tracing.build(Settings()) is None\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_without_opentelemetry_installed_the_setting_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    on = Settings(otlp_endpoint="http://127.0.0.1:4318/v1/traces")
    with pytest.raises(ConfigError, match=r"not installed .*; install paragate\[otel\]$"):
        Tracing.build(on)
    with pytest.raises(ConfigError, match=r"install paragate\[otel\]$"):
        Tracing.check(on)  # what `paragate serve` calls before its workers start
    Tracing.check(Settings())  # off: nothing is needed


# -- 2. the spans and what they say ---------------------------------------------------

def test_a_request_trace_arrives_with_its_parents_kinds_and_attributes(
        collector: Collector) -> None:
    t = build(collector.endpoint, otlp_headers="authorization=Bearer%20s3cret, x-team = a")
    trace = t.request(scope(), COMPLETIONS)
    trace.attributes(request_id="abc-1", model="alfred-4.2", company_id=7, skipped=None)
    with trace.span("paragate.auth"):
        pass
    with trace.span("paragate.route"):
        pass
    with trace.span("paragate.limits"):
        pass
    with trace.span("paragate.upstream", server_address="gpu-1", server_port=8000):
        inside = trace.upstream_headers()
    trace.attributes(input_tokens=3, output_tokens=2, replica="gpu-1:8000")
    trace.end(200)
    t.shutdown()

    assert len(collector.spans) == 5
    root = collector.named(f"POST {COMPLETIONS}")
    assert root.kind == SERVER and root.parent_id == "" and root.status == UNSET
    assert root.attributes == {
        "http.request.method": "POST", "url.path": COMPLETIONS, "http.route": COMPLETIONS,
        "url.scheme": "http", "gen_ai.operation.name": "text_completion",
        "paragate.request_id": "abc-1", "gen_ai.request.model": "alfred-4.2",
        "paragate.company_id": 7, "gen_ai.usage.input_tokens": 3,
        "gen_ai.usage.output_tokens": 2, "paragate.replica": "gpu-1:8000",
        "http.response.status_code": 200,
    }
    for name, kind in (("paragate.auth", INTERNAL), ("paragate.route", INTERNAL),
                       ("paragate.limits", INTERNAL), ("paragate.upstream", CLIENT)):
        child = collector.named(name)
        assert (child.kind, child.trace_id, child.parent_id) == (
            kind, root.trace_id, root.span_id), name
        assert child.status == UNSET
    upstream = collector.named("paragate.upstream")
    assert upstream.attributes == {"server.address": "gpu-1", "server.port": 8000}
    # the header vLLM gets names the upstream span as its parent
    assert traceparent(inside) == (root.trace_id, upstream.span_id, True)
    assert root.resource["service.name"] == "paragate"
    assert root.resource["service.version"] == paragate.__version__
    assert root.scope == "paragate"
    # otlp_headers went with the export, percent-decoded
    assert collector.headers[0]["authorization"] == "Bearer s3cret"
    assert collector.headers[0]["x-team"] == "a"


def test_an_incoming_traceparent_is_the_parent_and_its_tracestate_goes_on(
        collector: Collector) -> None:
    t = build(collector.endpoint)
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    trace = t.request(scope((b"traceparent", f"00-{caller_trace}-{caller_span}-01".encode()),
                            (b"tracestate", b"vendor=abc")), COMPLETIONS)
    with trace.span("paragate.upstream"):
        inside = trace.upstream_headers()
    trace.end(200)
    t.shutdown()
    root = collector.named(f"POST {COMPLETIONS}")
    upstream = collector.named("paragate.upstream")
    assert (root.trace_id, root.parent_id) == (caller_trace, caller_span)
    assert upstream.trace_id == caller_trace and upstream.parent_id == root.span_id
    assert traceparent(inside) == (caller_trace, upstream.span_id, True)
    assert inside.endswith(b"\r\ntracestate: vendor=abc\r\n")


@pytest.mark.parametrize("header", [
    b"garbage", b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
])
def test_an_invalid_traceparent_starts_a_trace_of_its_own(
        collector: Collector, header: bytes) -> None:
    t = build(collector.endpoint)
    trace = t.request(scope((b"traceparent", header)), COMPLETIONS)
    trace.end(200)
    t.shutdown()
    root = collector.named(f"POST {COMPLETIONS}")
    assert root.parent_id == "" and root.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"


def test_upstream_headers_name_the_innermost_open_step(collector: Collector) -> None:
    t = build(collector.endpoint)
    trace = t.request(scope(), COMPLETIONS)
    before = trace.upstream_headers()  # no step open: the request span's
    with trace.span("paragate.upstream"):
        first = trace.upstream_headers()
    with trace.span("paragate.upstream"):  # a second try: a span of its own
        second = trace.upstream_headers()
    after = trace.upstream_headers()
    trace.end(200)
    t.shutdown()
    root = collector.named(f"POST {COMPLETIONS}")
    tries = [s for s in collector.spans if s.name == "paragate.upstream"]
    assert [s.parent_id for s in tries] == [root.span_id] * 2
    assert traceparent(before) == traceparent(after) == (root.trace_id, root.span_id, True)
    assert {traceparent(first)[1], traceparent(second)[1]} == {s.span_id for s in tries}
    assert b"tracestate" not in first


async def test_steps_of_requests_in_flight_together_keep_their_own_parents(
        collector: Collector) -> None:
    """Two requests whose steps interleave across awaits: each step's parent is its own
    request's span, never whatever ran last."""
    t = build(collector.endpoint)

    async def one(n: int) -> None:
        trace = t.request(scope(), COMPLETIONS)
        trace.attributes(request_id=f"r{n}")
        for step in ("paragate.auth", "paragate.route", "paragate.upstream"):
            with trace.span(step):
                await asyncio.sleep(0.01)
        trace.end(200)

    await asyncio.gather(*(one(n) for n in range(3)))
    t.shutdown()
    roots = {s.span_id: s for s in collector.spans if s.kind == SERVER}
    assert len(roots) == 3
    steps = [s for s in collector.spans if s.kind != SERVER]
    assert len(steps) == 9
    for root in roots.values():
        mine = [s for s in steps if s.parent_id == root.span_id]
        assert sorted(s.name for s in mine) == [
            "paragate.auth", "paragate.route", "paragate.upstream"]
        assert {s.trace_id for s in mine} == {root.trace_id}


# -- 3. failures ----------------------------------------------------------------------

def test_an_error_in_a_step_is_recorded_and_goes_on(collector: Collector) -> None:
    t = build(collector.endpoint)
    trace = t.request(scope(), COMPLETIONS)
    with pytest.raises(ModelNotFound), trace.span("paragate.route"):
        raise ModelNotFound("The model 'nope' does not exist.")
    trace.end(404, "model_not_found")
    t.shutdown()
    route = collector.named("paragate.route")
    assert route.status == ERROR and "does not exist" in route.message
    assert route.attributes["error.type"] == "model_not_found"
    assert route.events[0][0] == "exception"
    assert route.events[0][1]["exception.type"] == "paragate.errors.ModelNotFound"
    root = collector.named(f"POST {COMPLETIONS}")
    # a 4xx is the client's error: the server span's status stays unset
    assert root.status == UNSET
    assert root.attributes["http.response.status_code"] == 404
    assert root.attributes["error.type"] == "model_not_found"


async def test_a_cancelled_step_is_marked_and_the_cancellation_goes_on(
        collector: Collector) -> None:
    t = build(collector.endpoint)
    trace = t.request(scope(), COMPLETIONS)

    async def upstream() -> None:
        with trace.span("paragate.upstream"):
            await asyncio.sleep(3600)

    task = asyncio.create_task(upstream())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    trace.end(499, "client_disconnected")
    t.shutdown()
    span = collector.named("paragate.upstream")
    assert span.status == ERROR and span.attributes["error.type"] == "CancelledError"
    assert collector.named(f"POST {COMPLETIONS}").status == UNSET


@pytest.mark.parametrize(("status", "error", "error_type"), [
    (503, "no_healthy_replica", "no_healthy_replica"), (502, None, "502")])
def test_a_5xx_answer_makes_the_server_span_an_error(
        collector: Collector, status: int, error: str | None, error_type: str) -> None:
    t = build(collector.endpoint)
    trace = t.request(scope(), COMPLETIONS)
    trace.end(status, error)
    trace.end(200)  # a second end changes nothing
    trace.attributes(model="late")  # nor attributes after the end
    t.shutdown()
    root = collector.named(f"POST {COMPLETIONS}")
    assert root.status == ERROR
    assert root.attributes["http.response.status_code"] == status
    assert root.attributes["error.type"] == error_type
    assert "gen_ai.request.model" not in root.attributes


# -- 4. sampling ----------------------------------------------------------------------

def test_ratio_zero_samples_nothing_but_still_propagates(collector: Collector) -> None:
    t = build(collector.endpoint, traces_sample_ratio=0.0)
    trace = t.request(scope(), COMPLETIONS)
    with trace.span("paragate.auth"):
        pass
    with trace.span("paragate.upstream"):
        inside = trace.upstream_headers()
    trace.end(200)
    t.shutdown()
    assert collector.spans == []
    assert traceparent(inside)[2] is False  # vLLM is told: not sampled


def test_a_sampled_parent_is_followed_whatever_the_ratio(collector: Collector) -> None:
    t = build(collector.endpoint, traces_sample_ratio=0.0)
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    t.request(scope((b"traceparent", parent)), COMPLETIONS).end(200)
    unsampled = b"00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    t2 = build(collector.endpoint)  # ratio 1, but the caller decided against
    t2.request(scope((b"traceparent", unsampled)), COMPLETIONS).end(200)
    t.shutdown()
    t2.shutdown()
    assert [s.trace_id for s in collector.spans] == ["4bf92f3577b34da6a3ce929d0e0e4736"]


def test_otel_sdk_disabled_sends_nothing_upstream(
        collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")  # OpenTelemetry's own off switch
    t = build(collector.endpoint)
    trace = t.request(scope(), COMPLETIONS)
    with trace.span("paragate.upstream"):
        assert trace.upstream_headers() == b""  # never an all-zero traceparent
    trace.end(200)
    t.shutdown()
    assert collector.spans == []


# -- 5. off: the null trace -----------------------------------------------------------

def test_no_trace_does_nothing_and_allocates_nothing() -> None:
    assert isinstance(NO_TRACE, RequestTrace)
    first, second = NO_TRACE.span("paragate.auth"), NO_TRACE.span("paragate.upstream")
    assert first is second  # one shared context manager
    with first as entered:
        assert entered is None
    with pytest.raises(ModelNotFound), NO_TRACE.span("paragate.route"):
        raise ModelNotFound("nope")  # exceptions go through untouched
    assert NO_TRACE.upstream_headers() == b""
    NO_TRACE.attributes(model="x", request_id=None)
    NO_TRACE.end(500, "internal_error")
    with pytest.raises(AttributeError):
        NO_TRACE.anything = 1  # type: ignore[attr-defined]  # slots: no state at all


def test_attribute_names_follow_the_semantic_conventions() -> None:
    assert attribute_name("model") == "gen_ai.request.model"
    assert attribute_name("input_tokens") == "gen_ai.usage.input_tokens"
    assert attribute_name("output_tokens") == "gen_ai.usage.output_tokens"
    assert attribute_name("server_address") == "server.address"
    assert attribute_name("request_id") == "paragate.request_id"
    assert attribute_name("gen_ai.response.id") == "gen_ai.response.id"


# -- 6. shutdown ----------------------------------------------------------------------

def _refusing_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed: connections to it are refused


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@pytest.mark.parametrize("collector_kind", ["refusing", "silent"])
def test_shutdown_is_bounded_when_the_collector_is_gone(
        monkeypatch: pytest.MonkeyPatch, silent_port: int, collector_kind: str) -> None:
    monkeypatch.setattr(tracing, "_FLUSH_SECONDS", 0.5)
    port = _refusing_port() if collector_kind == "refusing" else silent_port
    t = build(f"http://127.0.0.1:{port}/v1/traces")
    for _ in range(3):
        t.request(scope(), COMPLETIONS).end(200)
    started = time.monotonic()
    t.shutdown()
    assert time.monotonic() - started < 2.0
    t.shutdown()  # a second call returns at once


# -- 7. through the gateway -----------------------------------------------------------

@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'paragate.db'}"  # traces do not depend on the store


@pytest.fixture
async def fake() -> AsyncIterator[FakeVLLM]:
    server = await FakeVLLM(record_headers=True).start()
    yield server
    await server.stop()


@dataclass
class Traced:
    gw: Gateway
    client: httpx.AsyncClient
    collector: Collector

    async def post(self, key: str, body: dict[str, Any], path: str = COMPLETIONS,
                   **headers: str) -> httpx.Response:
        return await self.client.post(path, json=body, headers={**auth(key), **headers})

    async def spans(self) -> list[Received]:
        """Every span so far, once the tracer has sent them (it is shut down: one test,
        one flush)."""
        assert self.gw.tracing is not None
        await asyncio.to_thread(self.gw.tracing.shutdown)
        return self.collector.spans


@pytest.fixture
async def traced(store: Store, keys: Keys, tmp_path: Path,
                 collector: Collector) -> AsyncIterator[Traced]:
    gw = build_gateway(store, tmp_path, otlp_endpoint=collector.endpoint)
    await gw.start()
    transport = httpx.ASGITransport(app=App(gw))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield Traced(gw, c, collector)
    await gw.stop()


def children(spans: list[Received], root: Received) -> dict[str, Received]:
    found = {s.name: s for s in spans if s.parent_id == root.span_id}
    assert all(s.trace_id == root.trace_id for s in found.values())
    return found


def sent_traceparent(fake: FakeVLLM) -> tuple[str, str, bool]:
    assert len(fake.headers[-1].getall("traceparent")) == 1
    return traceparent(f"traceparent: {fake.headers[-1]['traceparent']}\r\n".encode())


COMPLETION = {"model": "alfred-4.2", "prompt": "Hi", "max_tokens": 2}


async def test_a_completion_is_traced_from_the_gateway_to_vllm(
        traced: Traced, keys: Keys, fake: FakeVLLM) -> None:
    answer = await traced.post(keys.full, COMPLETION)
    assert answer.status_code == 200
    spans = await traced.spans()
    root = next(s for s in spans if s.kind == SERVER)
    assert root.name == f"POST {COMPLETIONS}" and root.parent_id == ""
    assert root.attributes["http.request.method"] == "POST"
    assert root.attributes["url.path"] == COMPLETIONS
    assert root.attributes["http.response.status_code"] == 200
    assert root.status == UNSET
    steps = children(spans, root)
    # no limit applies to this key, its user, its company or the model: no limits step
    assert sorted(steps) == ["paragate.auth", "paragate.route", "paragate.upstream"]
    assert len(spans) == 4
    assert steps["paragate.upstream"].kind == CLIENT
    assert steps["paragate.auth"].kind == steps["paragate.route"].kind == INTERNAL
    assert all(s.status == UNSET for s in steps.values())
    # vLLM was told: this trace, the upstream span as parent, sampled
    assert sent_traceparent(fake) == (root.trace_id, steps["paragate.upstream"].span_id, True)


async def test_a_limited_key_has_its_limits_step(
        traced: Traced, keys: Keys, fake: FakeVLLM) -> None:
    assert (await traced.post(keys.throttled, COMPLETION)).status_code == 200
    spans = await traced.spans()
    root = next(s for s in spans if s.kind == SERVER)
    assert sorted(children(spans, root)) == [
        "paragate.auth", "paragate.limits", "paragate.route", "paragate.upstream"]


async def test_the_callers_traceparent_is_the_parent_all_the_way_to_vllm(
        traced: Traced, keys: Keys, fake: FakeVLLM) -> None:
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    answer = await traced.post(keys.full, {**COMPLETION, "stream": True},
                               traceparent=f"00-{caller_trace}-{caller_span}-01",
                               tracestate="vendor=abc")
    assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    spans = await traced.spans()
    root = next(s for s in spans if s.kind == SERVER)
    assert (root.trace_id, root.parent_id) == (caller_trace, caller_span)
    upstream = children(spans, root)["paragate.upstream"]
    assert sent_traceparent(fake) == (caller_trace, upstream.span_id, True)
    assert fake.headers[-1]["tracestate"] == "vendor=abc"


async def test_an_unknown_model_is_a_404_on_the_server_span(
        traced: Traced, keys: Keys, fake: FakeVLLM) -> None:
    answer = await traced.post(keys.full, {**COMPLETION, "model": "nope"})
    assert answer.status_code == 404
    spans = await traced.spans()
    root = next(s for s in spans if s.kind == SERVER)
    assert root.attributes["http.response.status_code"] == 404
    assert root.attributes["error.type"] == "model_not_found"
    assert root.status == UNSET  # the client's error, not the server's
    steps = children(spans, root)
    assert sorted(steps) == ["paragate.auth", "paragate.route"]  # never sent upstream
    assert steps["paragate.route"].status == ERROR
    assert steps["paragate.route"].attributes["error.type"] == "model_not_found"
    assert fake.requests == []


async def test_a_bad_key_fails_the_auth_step(traced: Traced, keys: Keys) -> None:
    answer = await traced.post(keys.revoked, COMPLETION)
    assert answer.status_code == 401
    spans = await traced.spans()
    root = next(s for s in spans if s.kind == SERVER)
    assert root.attributes["http.response.status_code"] == 401
    steps = children(spans, root)
    assert sorted(steps) == ["paragate.auth"]
    assert steps["paragate.auth"].status == ERROR
    assert keys.revoked not in repr(spans)  # never a key in a span


async def test_an_unreachable_upstream_is_an_error_on_both_spans(
        traced: Traced, keys: Keys) -> None:
    answer = await traced.post(keys.full, {**COMPLETION, "model": "down"})
    assert answer.status_code == 503
    spans = await traced.spans()
    root = next(s for s in spans if s.kind == SERVER)
    assert root.status == ERROR
    assert root.attributes["http.response.status_code"] == 503
    code = answer.json()["error"]["code"]
    assert root.attributes["error.type"] == code
    upstream = children(spans, root)["paragate.upstream"]
    assert upstream.status == ERROR and upstream.attributes["error.type"] == code


async def test_without_an_endpoint_nothing_is_traced_nor_sent_upstream(
        client: httpx.AsyncClient, gateway: Gateway, keys: Keys, fake: FakeVLLM) -> None:
    assert gateway.tracing is None
    answer = await client.post(COMPLETIONS, json=COMPLETION, headers={
        **auth(keys.full), "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-"
                                          "00f067aa0ba902b7-01"})
    assert answer.status_code == 200
    assert "traceparent" not in fake.headers[-1]  # a caller's is not passed on either
