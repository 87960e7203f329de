"""Optional OpenTelemetry traces: one SERVER span per request, a child span for each
step (authentication, routing, limits, the upstream call), exported over OTLP/HTTP,
and the W3C ``traceparent`` of the upstream span sent on to vLLM.

Off unless ``otlp_endpoint`` is set: ``Tracing.build`` then answers None, opentelemetry
is never imported, and the request path holds ``NO_TRACE``, whose every method does
nothing (``span()`` hands back one shared context manager: no allocation per call).

The spans never go through OpenTelemetry's current context: a handler awaits between
its steps, and other requests' steps run in between, so every child is started with
the request span as its explicit parent. Each ``Tracing`` owns its ``TracerProvider``
(the global one is left alone: several gateways may live in one process, as in tests).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .asgi import Scope
from .config import ConfigError, Settings

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanKind, Tracer

__all__ = ["NO_TRACE", "RequestTrace", "Tracing", "attribute_name"]

log = logging.getLogger("paragate.tracing")

UPSTREAM = "paragate.upstream"  # the one child span of kind CLIENT
_FLUSH_SECONDS = 3.0  # what shutdown waits for the last export before dropping it

Value = str | int | float | bool | None

# Short names the callers may use, and the OpenTelemetry semantic conventions' names
# they stand for. A name with a dot is taken as it is; any other becomes paragate.<name>.
_NAMES: dict[str, str] = {
    "model": "gen_ai.request.model",
    "response_model": "gen_ai.response.model",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "server_address": "server.address",
    "server_port": "server.port",
    "error_type": "error.type",
    "status_code": "http.response.status_code",
}

# gen_ai.operation.name of the endpoints that forward to a model.
_OPERATIONS: dict[str, str] = {
    "/api/v2/completions": "text_completion",
    "/api/v2/chat/completions": "chat",
    "/api/v2/embeddings": "embeddings",
}


def attribute_name(name: str) -> str:
    """The attribute a keyword of ``attributes()`` or ``span()`` sets."""
    found = _NAMES.get(name)
    if found is not None:
        return found
    return name if "." in name else "paragate." + name


def _attributes(values: Mapping[str, Value]) -> dict[str, str | int | float | bool]:
    return {attribute_name(k): v for k, v in values.items() if v is not None}


def parse_headers(text: str) -> dict[str, str]:
    """``otlp_headers`` as a dict: ``name=value`` pairs separated by commas, values
    percent-decoded as in ``OTEL_EXPORTER_OTLP_HEADERS`` (``%2C`` is a comma)."""
    headers: dict[str, str] = {}
    for pair in text.split(","):
        if pair.strip():
            name, _, value = pair.partition("=")
            headers[name.strip()] = unquote(value.strip())
    return headers


class _Nothing:
    """The context manager of a step that is not traced."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


_NOTHING = _Nothing()


class RequestTrace:
    """What one request records of its trace. This base records nothing: it is
    ``NO_TRACE``, the trace of every request while tracing is off (or before a route
    is known); ``Tracing.request`` makes the recording kind."""

    __slots__ = ()

    def span(self, name: str, **values: Value) -> AbstractContextManager[None]:
        """A step of the request: a context manager around a child span of the request
        span (kind CLIENT for ``paragate.upstream``, else INTERNAL), with ``values`` as
        its attributes (named as in ``attributes``). An exception that leaves it,
        ``CancelledError`` included, is recorded and sets the span's status to ERROR,
        then goes on up."""
        return _NOTHING

    def upstream_headers(self) -> bytes:
        """``traceparent`` (and ``tracestate``) header lines of the innermost open step
        (the request span if none), ready for a raw HTTP/1.1 request head; b"" when
        the request is not traced."""
        return b""

    def attributes(self, **values: Value) -> None:
        """Set attributes of the request span; a None value is skipped. Short names map
        to OpenTelemetry's (``model``: gen_ai.request.model, ``input_tokens``,
        ``output_tokens``: gen_ai.usage.*, ``server_address``...); other names become
        ``paragate.<name>``, dotted names are taken as they are."""

    def end(self, status: int, error: str | None = None) -> None:
        """End the request span with the HTTP status answered and, when it failed, the
        error's code (``error.type``). Its status is ERROR for a 5xx only (a 4xx is the
        client's error, not the server's, in OpenTelemetry's HTTP conventions)."""


NO_TRACE = RequestTrace()


class _Step:
    """The context manager of one traced step: its span starts on entry, ends on exit."""

    __slots__ = ("_name", "_span", "_trace", "_values")

    def __init__(self, trace: _Recording, name: str, values: Mapping[str, Value]) -> None:
        self._trace = trace
        self._name = name
        self._values = values
        self._span: Span | None = None

    def __enter__(self) -> None:
        t = self._trace
        tracing = t.tracing
        self._span = span = tracing.tracer.start_span(
            self._name, context=t.context,
            kind=tracing.client if self._name == UPSTREAM else tracing.internal,
            attributes=_attributes(self._values) if self._values else None)
        t.open.append(span)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        span = self._span
        assert span is not None
        open_spans = self._trace.open
        if open_spans and open_spans[-1] is span:
            open_spans.pop()
        else:  # pragma: no cover - steps left out of order
            open_spans.remove(span)
        if exc is not None:
            _failed(span, exc)
        span.end()


def _failed(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    code = getattr(exc, "code", None)  # a GatewayError's code, e.g. model_not_found
    span.set_attribute("error.type", code if isinstance(code, str) and code
                       else type(exc).__qualname__)
    span.record_exception(exc, escaped=True)
    message = str(exc)
    what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    span.set_status(Status(StatusCode.ERROR, what[:500]))


class _Recording(RequestTrace):
    """The trace of one sampled (or parent-decided) request."""

    __slots__ = ("context", "ended", "open", "request_span", "tracing")

    def __init__(self, tracing: Tracing, request_span: Span, context: Context) -> None:
        self.tracing = tracing
        self.request_span = request_span
        self.context = context  # the request span's, parent of every step
        self.open: list[Span] = []  # the steps under way, innermost last
        self.ended = False

    def span(self, name: str, **values: Value) -> _Step:
        return _Step(self, name, values)

    def upstream_headers(self) -> bytes:
        return _propagated(self.open[-1] if self.open else self.request_span)

    def attributes(self, **values: Value) -> None:
        if self.ended:
            return
        self.request_span.set_attributes(_attributes(values))

    def end(self, status: int, error: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        span = self.request_span
        span.set_attribute("http.response.status_code", status)
        if error:
            span.set_attribute("error.type", error)
        if status >= 500:
            from opentelemetry.trace import Status, StatusCode

            if not error:
                span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR, error or str(status)))
        span.end()


class _Unsampled(RequestTrace):
    """The trace of a request the sampler left out: no step is recorded (under a
    parent-based sampler none would be), and vLLM is told so, with the request span's
    ids and its not-sampled flag."""

    __slots__ = ("request_span",)

    def __init__(self, request_span: Span) -> None:
        self.request_span = request_span

    def upstream_headers(self) -> bytes:
        return _propagated(self.request_span)


def _propagated(span: Span) -> bytes:
    """The W3C header lines naming ``span`` as the parent."""
    ctx = span.get_span_context()
    if not ctx.is_valid:  # OTEL_SDK_DISABLED=true: OpenTelemetry's no-op spans
        return b""
    head = b"traceparent: 00-%032x-%016x-%02x\r\n" % (
        ctx.trace_id, ctx.span_id, ctx.trace_flags)
    if not ctx.trace_state:
        return head
    return head + b"tracestate: " + ctx.trace_state.to_header().encode("ascii") + b"\r\n"


def _require_sdk() -> None:
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "otlp_endpoint: traces need OpenTelemetry, which is not installed "
            f"({exc.name or exc}); install paragate[otel]") from None


class _Exporter:
    """The OTLP exporter with a ``shutdown`` that may be called twice: once by
    ``Tracing.shutdown`` when the last export takes too long (which aborts its retries),
    once by the batch processor afterwards."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._done = False
        self.export = inner.export
        self.force_flush = inner.force_flush

    def shutdown(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._inner.shutdown()


class Tracing:
    """The tracer of one gateway: ``request`` starts a request's trace, ``shutdown``
    sends what is left. Built by ``Tracing.build`` from the settings."""

    __slots__ = ("_closed", "_context", "_exporter", "_extract", "_in_context", "_provider",
                 "client", "internal", "server", "tracer")

    def __init__(self, provider: TracerProvider, exporter: _Exporter) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        from . import __version__

        self._provider = provider
        self._exporter = exporter
        self._extract = TraceContextTextMapPropagator().extract
        self._context: type[Context] = Context
        self._in_context: Callable[[Span, Context], Context] = set_span_in_context
        self._closed = False
        self.tracer: Tracer = provider.get_tracer("paragate", __version__)
        self.server: SpanKind = SpanKind.SERVER
        self.internal: SpanKind = SpanKind.INTERNAL
        self.client: SpanKind = SpanKind.CLIENT

    @staticmethod
    def check(settings: Settings) -> None:
        """``build``'s ConfigError when traces are on and OpenTelemetry is missing,
        without building anything: for ``paragate serve`` to say so in one line before
        its workers start (in a worker it would be uvicorn's traceback)."""
        if settings.otlp_endpoint:
            _require_sdk()

    @staticmethod
    def build(settings: Settings) -> Tracing | None:
        """None when ``otlp_endpoint`` is empty; else a tracer exporting to it in
        batches, from a thread of its own. ConfigError if opentelemetry is missing."""
        if not settings.otlp_endpoint:
            return None
        _require_sdk()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        from . import __version__

        exporter = _Exporter(OTLPSpanExporter(
            endpoint=settings.otlp_endpoint, headers=parse_headers(settings.otlp_headers)))
        provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(settings.traces_sample_ratio)),
            resource=Resource.create({"service.name": "paragate",
                                      "service.version": __version__}),
            shutdown_on_exit=False,  # Gateway.stop shuts it down, within a bound
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))  # type: ignore[arg-type]
        return Tracing(provider, exporter)

    def request(self, scope: Scope, endpoint: str) -> RequestTrace:
        """Start the SERVER span of a request to ``endpoint`` (the route's template):
        its parent is the caller's ``traceparent`` (and ``tracestate``) when valid."""
        parent = None
        state: list[str] = []
        for name, value in scope["headers"]:
            if name == b"traceparent" and parent is None:
                parent = value.decode("latin-1")
            elif name == b"tracestate":
                state.append(value.decode("latin-1"))
        context = self._context()  # empty: never the current context's span
        if parent is not None:
            carrier = {"traceparent": parent}
            if state:
                carrier["tracestate"] = ",".join(state)
            context = self._extract(carrier, context)
        attributes: dict[str, str] = {
            "http.request.method": scope["method"],
            "url.path": endpoint,  # the template: a path may name objects
            "http.route": endpoint,
            "url.scheme": scope.get("scheme", "http"),
        }
        operation = _OPERATIONS.get(endpoint)
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        span = self.tracer.start_span(f"{scope['method']} {endpoint}", context=context,
                                      kind=self.server, attributes=attributes)
        if not span.is_recording():  # sampled out: its steps would be too, skip them
            return _Unsampled(span)
        return _Recording(self, span, self._in_context(span, self._context()))

    def shutdown(self) -> None:
        """Export the spans still queued and stop, within about ``_FLUSH_SECONDS``: a
        collector that is gone or slow makes the last spans dropped, never a hang."""
        if self._closed:
            return
        self._closed = True
        stopping = threading.Thread(target=self._provider.shutdown,
                                    name="paragate-traces-stop", daemon=True)
        stopping.start()
        stopping.join(_FLUSH_SECONDS)
        if stopping.is_alive():
            log.warning("traces: the collector took more than %g s for the last spans; "
                        "they are dropped", _FLUSH_SECONDS)
            self._exporter.shutdown()  # ends the exporter's retries
            stopping.join(1.0)
