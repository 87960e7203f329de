"""The data plane's handlers and route table: the endpoints that forward to a model
(completions, chat completions, embeddings, tokenize: ``OPERATIONS``), the model list,
health and the OpenAPI document. Each handler is parse -> service -> render."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from . import views
from .access import ADMIN, PERMISSIONS, require
from .asgi import send_json
from .dispatch import Operation, forward
from .errors import ModelNotFound
from .gateway import Gateway
from .openapi import document
from .protocol import parse_chat, parse_embeddings, parse_request, parse_tokenize
from .protocol.tokenize import with_total
from .routing import Endpoint, Request, Table, query
from .schemas import ModelList

__all__ = ["OPERATIONS", "ROUTES", "get_model", "health", "list_models", "openapi", "ready"]



# The endpoints that forward to a model, each one request path (``dispatch.forward``).
OPERATIONS: dict[str, Operation] = {op.path: op for op in (
    Operation("/api/v2/completions", parse_request, "completions", ("llm",)),
    Operation("/api/v2/chat/completions", parse_chat, "chat/completions", ("llm",)),
    Operation("/api/v2/embeddings", parse_embeddings, "embeddings", ("embedding",),
              generates=False),
    Operation("/api/v2/tokenize", parse_tokenize, "/tokenize", ("llm", "embedding"),
              answer=with_total, generates=False),
)}


def _forwarding(op: Operation) -> Callable[[Gateway, Request], Awaitable[None]]:
    async def handler(gw: Gateway, r: Request) -> None:
        await forward(gw, r, op)
    handler.__name__ = handler.__qualname__ = op.path.rsplit("/v2/", 1)[1].replace("/", "_")
    return handler


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
    **{path: {"POST": _e(_forwarding(op), "inference")} for path, op in OPERATIONS.items()},
    "/api/v2/models": {"GET": _e(list_models, "inference")},
    "/api/v2/models/{model}": {"GET": _e(get_model, "inference")},
    "/api/v2/openapi.json": {"GET": _e(openapi, None)},
    "/health": {"GET": _e(health, None)},
    "/ready": {"GET": _e(ready, None)},
}
