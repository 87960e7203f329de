"""The data plane's handlers and route table: completions, the model list, health and
the OpenAPI document. Each handler is parse -> service -> render."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from . import views
from .access import ADMIN, PERMISSIONS, require
from .asgi import ClientGone, Receive, header, read_body, request_id, send_json
from .errors import GatewayError, ModelNotFound, ShuttingDown
from .gateway import Gateway
from .openapi import document
from .protocol import parse_request
from .proxy import Target, relay_json, relay_stream
from .routing import Endpoint, Request, Table, query
from .schemas import ModelList
from .upstream.balancer import affinity_key
from .usage import Exchange, client_request_id

__all__ = ["ROUTES", "completions", "get_model", "health", "list_models", "openapi", "ready"]



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


def exchange(gw: Gateway, r: Request, endpoint: str) -> Exchange:
    """The usage of one authenticated request, journaled unless its key opted out."""
    who = r.caller
    return Exchange(
        request_id=request_id(),
        record=gw.journal.append if who.usage_opt_in else None,
        key_id=who.key_id, user_id=who.user_id, company_id=who.company_id,
        client_request_id=client_request_id(header(r.scope, b"x-request-id")),
        endpoint=endpoint)


async def completions(gw: Gateway, r: Request) -> None:
    ex = exchange(gw, r, "/api/v2/completions")
    task = asyncio.current_task()
    assert task is not None
    hangup = _Hangup(task)
    watcher: asyncio.Task[None] | None = None
    try:
        raw = await read_body(r.scope, r.receive, gw.settings.max_body_bytes)
        req = parse_request(header(r.scope, b"content-type"), raw)
        ex.model, ex.stream, ex.n = req.model, req.stream, req.n
        route = gw.registry.resolve(r.caller, req.model)
        ex.model, ex.model_id = route.name, route.id
        who = r.caller
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
        # Last before forwarding, so that only a request that will be sent spends it.
        limits = who.limits + route.limits if route.limits else who.limits
        if limits:
            ex.ticket = await gw.limiter.admit(limits, tokens, prompt, route.name)
        target = Target(
            fleet=gw.balancer.fleet(route.id, route.name, route.replicas),
            body=body,
            requested_model=req.model,
            upstream_model=route.upstream_model,
            timeouts=route.timeouts,
            affinity=None if route.affinity == "none" else affinity_key(
                route.affinity, req.body, gw.settings.affinity_prefix_chars),
            headers=ex.ticket.headers if ex.ticket is not None else (),
        )
        watcher = asyncio.create_task(hangup.watch(r.receive, task))
        if req.stream:
            gw.shutdown.streams[hangup] = hangup.cut
            await relay_stream(gw.balancer, target, req.include_usage, req.running_usage,
                               req.n, r.send, ex)
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


async def ready(gw: Gateway, r: Request) -> None:
    """Whether to send this process traffic: 503 before the first view of keys and
    models has loaded, and from the moment a shutdown begins."""
    if gw.shutdown.draining:
        status, state = 503, "draining"
    elif not gw.registry.loaded:
        status, state = 503, "starting"
    else:
        status, state = 200, "ready"
    await send_json(r.send, status, msgspec.json.encode({"status": state}))


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
    "/ready": {"GET": _e(ready, None)},
}
