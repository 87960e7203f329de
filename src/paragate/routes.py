"""The data plane's handlers and route table: the endpoints that forward to a model
(completions, chat completions, embeddings, tokenize: ``OPERATIONS``), the model list,
health and the OpenAPI document. Each handler is parse -> service -> render."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from . import views
from .access import ADMIN, PERMISSIONS, require
from .asgi import header, send_json, start_response
from .dispatch import Operation, forward
from .errors import ModelNotFound, NotFound
from .gateway import Gateway
from .metrics import CONTENT_TYPE
from .openapi import document
from .protocol import parse_chat, parse_embeddings, parse_request, parse_tokenize
from .protocol.tokenize import with_total
from .routing import Endpoint, Request, Table, query
from .schemas import ModelList

__all__ = ["OPERATIONS", "ROUTES", "get_model", "health", "list_models", "metrics",
           "openapi", "ready", "status"]



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
    """Whether to send this process traffic, and why. 503 before the first view of keys
    and models has loaded (``starting``), from the moment a shutdown begins
    (``draining``), and while that view is older than ``PARAGATE_MAX_VIEW_AGE``
    (``stale``: ``Registry.too_old``, the very check that refuses requests then). The
    store's reachability and the view's age are told, but are no reason by themselves;
    nor is a model whose replicas are all down: one dead model must not take every
    gateway out of its load balancer (``/api/v2/status`` tells that)."""
    registry = gw.registry
    stale = registry.too_old()
    age, limit, unreachable = registry.age(), registry.max_view_age, gw.refresher.failing
    if gw.shutdown.draining:
        code, state = 503, "draining"
        reason = "Shutting down: requests in flight finish; send new ones elsewhere."
    elif not registry.loaded:
        code, state = 503, "starting"
        reason = "The first view of keys and models has not loaded yet."
    elif stale:
        code, state = 503, "stale"
        reason = (f"The store has not answered for {age:.1f} s, longer than "
                  f"PARAGATE_MAX_VIEW_AGE ({limit:g} s): requests with a key are refused.")
    elif unreachable:
        code, state = 200, "ready"
        bound = (f"requests are refused past {limit:g} s" if limit
                 else "PARAGATE_MAX_VIEW_AGE is 0: no bound")
        reason = (f"Serving from the last view of keys and models; the store has not "
                  f"answered for {age:.1f} s ({bound}).")
    else:
        code, state, reason = 200, "ready", "Serving requests."
    await send_json(r.send, code, msgspec.json.encode(views.readiness(
        state, reason, unreachable=unreachable, version=registry.version, age=age,
        max_view_age=limit)))


_LIVE = msgspec.json.encode({"status": "ok"})


async def health(gw: Gateway, r: Request) -> None:
    """Liveness: 200 while the process serves, whatever its store or its models do. An
    orchestrator restarts an instance that fails it, so a database outage must not:
    every instance would restart at once. Whether to send traffic is ``/ready``'s."""
    await send_json(r.send, 200, _LIVE)


async def status(gw: Gateway, r: Request) -> None:
    """Paradigm's platform status: each model the key may use, and whether it can take
    a request now (one replica at least in rotation and healthy, as this process sees
    them); system admins also get each model's replica counts by state."""
    counts = r.caller.role == ADMIN
    balancer = gw.balancer
    models = [views.model_status(m, balancer.fleet(m.id, m.name, m.replicas), counts)
              for m in gw.registry.usable(r.caller)]
    await send_json(r.send, 200, msgspec.json.encode(views.status(models)))


async def metrics(gw: Gateway, r: Request) -> None:
    """Prometheus's scrape: for an admin's key, or ``PARAGATE_METRICS_TOKEN`` as the
    bearer token (model names and traffic are not for every key holder)."""
    if gw.metrics is None:
        raise NotFound("Metrics are off (PARAGATE_METRICS=false).")
    authorization = header(r.scope, b"authorization")
    token = gw.settings.metrics_token
    if not (token and authorization and hmac.compare_digest(
            authorization.strip(), b"Bearer " + token.encode())):
        r.principal = gw.registry.authenticate(authorization)
        require(r.principal, PERMISSIONS["metrics.read"])
    await start_response(r.send, 200, [(b"content-type", CONTENT_TYPE)])
    await r.send({"type": "http.response.body", "body": gw.render_metrics(),
                  "more_body": False})


_OPENAPI = msgspec.json.encode(document())


async def openapi(gw: Gateway, r: Request) -> None:
    await send_json(r.send, 200, _OPENAPI)


def _e(handler: Any, permission: str | None) -> Endpoint:
    return Endpoint(handler, PERMISSIONS[permission] if permission else None)


ROUTES: Table = {
    **{path: {"POST": Endpoint(_forwarding(op), PERMISSIONS["inference"], forwards=True)}
       for path, op in OPERATIONS.items()},
    "/api/v2/models": {"GET": _e(list_models, "inference")},
    "/api/v2/models/{model}": {"GET": _e(get_model, "inference")},
    "/api/v2/status": {"GET": _e(status, "inference")},
    "/api/v2/openapi.json": {"GET": _e(openapi, None)},
    "/health": {"GET": _e(health, None)},
    "/ready": {"GET": _e(ready, None)},
    "/metrics": {"GET": _e(metrics, None)},  # an admin key or the metrics token
}
