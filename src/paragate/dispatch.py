"""One forwarded request, whatever the endpoint: read and check the body, resolve the
model, apply its caps and the limits, forward it to a replica, relay the answer and
record its usage.

An endpoint is an ``Operation``: its path, how its body is parsed (``protocol/``), the
model types that serve it and where vLLM serves it. Everything else is shared, so a new
endpoint is a protocol module and one line in ``routes.OPERATIONS``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .asgi import ClientGone, Receive, header, read_body
from .errors import GatewayError, ShuttingDown, WrongModelType
from .gateway import Gateway
from .protocol import BodyLimits, ModelRequest
from .proxy import Target, relay_json, relay_stream
from .routing import Request
from .upstream.balancer import affinity_key
from .usage import Exchange

__all__ = ["Operation", "forward"]


@dataclass(frozen=True, slots=True)
class Operation:
    """One endpoint that forwards to a model."""

    path: str  # ours, e.g. /api/v2/chat/completions (the usage record's endpoint)
    parse: Callable[[bytes | None, bytes, BodyLimits], ModelRequest]  # the body, checked
    upstream: str  # vLLM's: under the replica's URL (chat/completions), or /tokenize
    model_types: tuple[str, ...]  # the model types that serve it
    answer: Callable[[bytes], bytes] | None = None  # rewrites vLLM's JSON answer
    generates: bool = True  # answers carry vLLM's system_fingerprint

    def check_type(self, model: str, model_type: str) -> None:
        if model_type not in self.model_types:
            wanted = " or ".join(self.model_types)
            raise WrongModelType(
                f"Model '{model}' is of type {model_type}; {self.path} serves models of "
                f"type {wanted}.", param="model")


class _Hangup:
    """Watches for the client going away once its body is read, and cancels the
    handler so the upstream request is closed at once (vLLM then aborts). ``cut`` ends
    a stream the same way at the shutdown timeout."""

    __slots__ = ("disconnected", "finished", "shutdown", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.disconnected = False
        self.finished = False
        self.shutdown = False
        self.task = task

    def cut(self) -> None:
        if not self.finished:
            self.shutdown = True
            self.task.cancel()

    async def watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    self.disconnected = True
                    task.cancel()
                return


def _exchange(gw: Gateway, r: Request, endpoint: str) -> Exchange:
    """The usage of one authenticated request, journaled unless its key opted out."""
    who = r.caller
    return Exchange(
        request_id=r.request_id,
        record=gw.journal.append if who.usage_opt_in else None,
        key_id=who.key_id, user_id=who.user_id, company_id=who.company_id,
        client_request_id=r.response_id if r.response_id != r.request_id else None,
        endpoint=endpoint, started=r.started)


async def forward(gw: Gateway, r: Request, op: Operation) -> None:
    ex = r.exchange = _exchange(gw, r, op.path)
    task = asyncio.current_task()
    assert task is not None
    hangup = _Hangup(task)
    watcher: asyncio.Task[None] | None = None
    trace = r.trace
    counts = gw.telemetry.in_flight
    counts[op.path] = counts.get(op.path, 0) + 1
    streams: dict[str, int] | None = None
    raw = b""
    keep = False
    try:
        raw = await read_body(r.scope, r.receive, gw.settings.max_body_bytes)
        with trace.span("paragate.route"):
            req = op.parse(header(r.scope, b"content-type"), raw, gw.body_limits)
            ex.model, ex.stream, ex.n = req.model, req.stream, req.n
            who = r.caller
            route = gw.registry.resolve(who, req.model)
            ex.model, ex.model_id = route.name, route.id
            op.check_type(route.name, route.type)
            req.check_caps(max_prompts=route.max_prompts, max_n=route.max_n,
                           allow_priority=who.allow_priority)
            body = req.upstream_body(  # the model's own limits (logprobs, max_tokens) apply
                route.upstream_model,
                max_logprobs=route.max_logprobs,
                default_max_tokens=route.default_max_tokens,
                max_tokens_limit=route.max_tokens_limit,
            )
            tokens, prompt = req.reservation(
                reserve_max_tokens=route.max_tokens_limit or gw.settings.reserve_max_tokens,
                max_request_tokens=route.max_request_tokens)
        keep = route.log_payloads
        # Last before forwarding, so that only a request that will be sent spends it.
        limits = who.limits + route.limits if route.limits else who.limits
        if limits:
            with trace.span("paragate.limits"):
                ex.ticket = await gw.limiter.admit(limits, tokens, prompt, route.name)
        with trace.span("paragate.upstream"):
            target = Target(
                fleet=gw.balancer.fleet(route.id, route.name, route.replicas),
                body=body,
                requested_model=req.model,
                upstream_model=route.upstream_model,
                timeouts=route.timeouts,
                affinity=None if route.affinity == "none" else affinity_key(
                    route.affinity, req.affinity_fields(),
                    gw.settings.affinity_prefix_chars),
                headers=ex.ticket.headers if ex.ticket is not None else (),
                path=op.upstream,
                answer=op.answer,
                generates=op.generates,
                upstream_headers=trace.upstream_headers(),
                gap=gw.telemetry.gap(op.path, route.name) if req.stream else None,
                keep=keep,
            )
            watcher = asyncio.create_task(hangup.watch(r.receive, task))
            if req.stream:
                gw.shutdown.streams[hangup] = hangup.cut
                streams = gw.telemetry.streams
                streams[op.path] = streams.get(op.path, 0) + 1
                await relay_stream(gw.balancer, target, req.include_usage,
                                   req.running_usage, req.n, r.send, ex)
            else:
                await relay_json(gw.balancer, target, r.send, ex)
    except asyncio.CancelledError:
        # Our own cancellations end the request quietly: the client left, or the
        # shutdown timeout cut the stream. Any other (uvicorn giving up) propagates.
        if hangup.shutdown and task.uncancel() == 0:
            await _end_cut_stream(r, ex)
            return
        if not (hangup.disconnected and task.uncancel() == 0):
            ex.outcome, ex.partial = "shutdown", True
            raise
        ex.outcome = "client_disconnected"
        ex.status = ex.status or 499
        ex.partial = True
    except ClientGone:
        ex.outcome, ex.status, ex.partial = "client_disconnected", 499, True
        raise
    except GatewayError as exc:
        ex.status, ex.error_type = exc.http_status, exc.code
        if ex.ticket is not None and ex.ticket.headers:  # the limits it was counted in
            exc.headers.update((k.decode(), v.decode()) for k, v in ex.ticket.headers)
        raise
    except Exception:
        ex.status, ex.error_type = 500, "internal_error"
        raise
    finally:
        hangup.finished = True
        gw.shutdown.streams.pop(hangup, None)
        if watcher is not None:
            watcher.cancel()
        ex.finish()
        counts[op.path] -= 1
        if streams is not None:
            streams[op.path] -= 1
        gw.telemetry.forwarded(r, op.path, ex, _payload(raw, ex) if keep else None)
        if gw.tracing is not None:
            trace.attributes(**{
                "paragate.request_id": ex.request_id, "gen_ai.request.model": ex.model,
                "gen_ai.usage.input_tokens": ex.prompt_tokens,
                "gen_ai.usage.output_tokens": ex.completion_tokens,
                "paragate.replica": ex.upstream, "paragate.outcome": ex.outcome})


def _payload(raw: bytes, ex: Exchange) -> tuple[str, str]:
    """What a model with ``log_payloads`` on logs: the request body and the answer as
    sent (a stream's events), each cut at 64 KiB."""
    answer = b"".join(ex.answer) if ex.answer else b""
    return (raw[:65536].decode("utf-8", "replace"),
            answer[:65536].decode("utf-8", "replace"))


async def _end_cut_stream(r: Request, ex: Exchange) -> None:
    """A stream still open at the shutdown timeout: an error event and ``[DONE]``
    (journaled first), or a 503 if its answer had not started."""
    ex.outcome, ex.partial, ex.error_type = "shutdown", True, "shutting_down"
    if not ex.status:
        ex.status = 503
        ex.finish()
        raise ShuttingDown()
    ex.finish()
    failure = ShuttingDown()
    await r.send({"type": "http.response.body", "more_body": True,
                  "body": b"data: " + failure.render() + b"\n\ndata: [DONE]\n\n"})
    await r.send({"type": "http.response.body", "body": b"", "more_body": False})
