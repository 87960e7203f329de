"""Handlers: each is parse -> service -> render. The route table is in ``app``."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from .asgi import Receive, Scope, Send, header, read_body, send_json
from .auth import Principal
from .errors import GatewayError, ModelNotFound
from .gateway import Gateway
from .openapi import document
from .protocol import parse_request
from .proxy import Exchange, Target, relay_json, relay_stream
from .registry import Route
from .store import UsageRecord

__all__ = ["Request", "completions", "get_model", "health", "list_models", "openapi"]


@dataclass(slots=True)
class Request:
    scope: Scope
    receive: Receive
    send: Send
    principal: Principal | None  # None only on public routes
    path_param: str = ""

    @property
    def caller(self) -> Principal:
        assert self.principal is not None, "an authenticated route"
        return self.principal


# Request ids: random per process, then a counter (cheaper than random per request).
_ID_PREFIX = os.urandom(8).hex() + "-"
_ids = itertools.count(1)


class _Hangup:
    """Watches for the client going away once its body is read, and cancels the
    handler so the upstream request is closed at once (vLLM then aborts)."""

    __slots__ = ("disconnected", "finished")

    def __init__(self) -> None:
        self.disconnected = False
        self.finished = False

    async def watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    self.disconnected = True
                    task.cancel()
                return


async def completions(gw: Gateway, r: Request) -> None:
    raw = await read_body(r.scope, r.receive, gw.settings.max_body_bytes)
    req = parse_request(header(r.scope, b"content-type"), raw)
    route = gw.registry.resolve(r.caller, req.model)
    body = req.upstream_body(  # the model's own limits (logprobs, max_tokens) apply here
        route.upstream_model,
        max_logprobs=route.max_logprobs,
        default_max_tokens=route.default_max_tokens,
        max_tokens_limit=route.max_tokens_limit,
    )
    # Last before forwarding, so that only a request that will be sent spends the limit.
    gw.limiter.check(r.caller)  # token budgets will be checked here too
    target = Target(
        url=route.completions_url,
        body=body,
        api_key=route.upstream_api_key,
        requested_model=req.model,
        upstream_model=route.upstream_model,
    )
    ex = Exchange()
    started = time.monotonic()
    task = asyncio.current_task()
    assert task is not None
    hangup = _Hangup()
    watcher = asyncio.create_task(hangup.watch(r.receive, task))
    try:
        if req.stream:
            await relay_stream(gw.upstreams, target, req.include_usage, r.send, ex)
        else:
            await relay_json(gw.upstreams, target, r.send, ex)
        hangup.finished = True
    except asyncio.CancelledError:
        # Our own cancellation (the client left) ends the request quietly; any other
        # cancellation (shutdown) propagates.
        if not (hangup.disconnected and task.uncancel() == 0):
            raise
        ex.outcome = "client_disconnected"
        ex.status = ex.status or 499
    except GatewayError as exc:
        ex.status = exc.http_status
        raise
    finally:
        hangup.finished = True
        watcher.cancel()
        _record(gw, r.caller, route, req.stream, ex, started)


def _record(gw: Gateway, who: Principal, route: Route, stream: bool, ex: Exchange,
            started: float) -> None:
    usage = ex.usage
    gw.recorder.record(UsageRecord(
        request_id=f"{_ID_PREFIX}{next(_ids):x}",
        created_at=datetime.now(UTC),
        key_id=who.key_id,
        model=route.name,
        stream=stream,
        status=ex.status or 500,
        outcome=ex.outcome,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        total_tokens=usage.total_tokens if usage else None,
        duration_ms=int((time.monotonic() - started) * 1000),
    ))


def _model_object(route: Route) -> dict[str, Any]:
    return {
        "id": route.name,
        "object": "model",
        "created": route.created,
        "owned_by": "paragate",
        "display_name": route.display_name,
        "type": route.type,
    }


async def list_models(gw: Gateway, r: Request) -> None:
    data = [_model_object(route) for route in gw.registry.visible_to(r.caller)]
    await send_json(r.send, 200, msgspec.json.encode({"object": "list", "data": data}))


async def get_model(gw: Gateway, r: Request) -> None:
    name = r.path_param
    route = gw.registry.routes.get(name)
    if route is None or not r.caller.may_use(name):
        raise ModelNotFound(name)
    await send_json(r.send, 200, msgspec.json.encode(_model_object(route)))


async def health(gw: Gateway, r: Request) -> None:
    await send_json(r.send, 200, b'{"status":"ok"}')


_OPENAPI = msgspec.json.encode(document())


async def openapi(gw: Gateway, r: Request) -> None:
    await send_json(r.send, 200, _OPENAPI)
