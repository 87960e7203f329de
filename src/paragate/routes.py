"""The data plane's handlers and route table: completions, the model list, health and
the OpenAPI document. Each handler is parse -> service -> render."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from . import views
from .access import ADMIN, PERMISSIONS, require
from .asgi import Receive, header, read_body, request_id, send_json
from .auth import Principal
from .errors import GatewayError, ModelNotFound
from .gateway import Gateway
from .openapi import document
from .protocol import parse_request
from .proxy import Exchange, Target, relay_json, relay_stream
from .registry import Route
from .routing import Endpoint, Request, Table, query
from .schemas import ModelList
from .store import UsageRecord

__all__ = ["ROUTES", "completions", "get_model", "health", "list_models", "openapi"]



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
        request_id=request_id(),
        created_at=datetime.now(UTC),
        key_id=who.key_id,
        user_id=who.user_id,
        company_id=who.company_id,
        model_id=route.id,
        model=route.name,
        stream=stream,
        status=ex.status or 500,
        outcome=ex.outcome,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        total_tokens=usage.total_tokens if usage else None,
        duration_ms=int((time.monotonic() - started) * 1000),
    ))


def _all_models(r: Request) -> bool:
    """Whether ``?all=true`` asks for every configured model (system admins only)."""
    if query(r, all=bool).get("all", False):
        require(r.caller, PERMISSIONS["models.manage"])
        return True
    return False


async def list_models(gw: Gateway, r: Request) -> None:
    config = r.caller.role == ADMIN
    routes = (sorted(gw.registry.catalog.values(), key=lambda m: m.name)
              if _all_models(r) else gw.registry.usable(r.caller))
    data = [views.model(route, config) for route in routes]
    await send_json(r.send, 200, msgspec.json.encode(views.listing(ModelList, data)))


async def get_model(gw: Gateway, r: Request) -> None:
    name = r.path_param
    if _all_models(r):
        route = next((m for m in gw.registry.catalog.values() if m.name == name), None)
        if route is None:
            raise ModelNotFound(name)
    else:
        route = gw.registry.resolve(r.caller, name)
    await send_json(r.send, 200, msgspec.json.encode(
        views.model(route, r.caller.role == ADMIN)))


async def health(gw: Gateway, r: Request) -> None:
    """Liveness, and how current the view of keys and models is. 503 only once that
    view is older than ``PARAGATE_MAX_VIEW_AGE`` (when set): requests are refused then."""
    age = gw.registry.age()
    limit = gw.settings.max_view_age
    stale = bool(limit) and age > limit
    body = {"status": "stale" if stale else "ok", "config": {
        "version": gw.registry.version, "age_seconds": round(age, 3),
        "store": "unreachable" if gw.refresher.failing else "ok",
        "max_view_age": limit or None}}
    await send_json(r.send, 503 if stale else 200, msgspec.json.encode(body))


_OPENAPI = msgspec.json.encode(document())


async def openapi(gw: Gateway, r: Request) -> None:
    await send_json(r.send, 200, _OPENAPI)


def _e(handler: Any, permission: str | None) -> Endpoint:
    return Endpoint(handler, PERMISSIONS[permission] if permission else None)


ROUTES: Table = {
    "/api/v2/completions": {"POST": _e(completions, "inference")},
    "/api/v2/models": {"GET": _e(list_models, "inference")},
    "/api/v2/models/{model}": {"GET": _e(get_model, "inference")},
    "/api/v2/openapi.json": {"GET": _e(openapi, None)},
    "/health": {"GET": _e(health, None)},
}
