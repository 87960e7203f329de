"""The ASGI application: the route table, authentication around every route but the
named public ones, the one error handler, and the lifespan.

No framework sits on the hot path: a dict lookup routes a request, so the cost per
request is what the handlers do.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from .asgi import ClientGone, Receive, Scope, Send, header, send_error
from .config import Settings
from .errors import GatewayError, MethodNotAllowed, NotFound
from .gateway import Gateway
from .routes import Request, completions, get_model, health, list_models, openapi
from .store import Store

__all__ = ["PUBLIC_PATHS", "ROUTES", "App", "create_app"]

log = logging.getLogger("paragate.app")

Handler = Callable[[Gateway, Request], Awaitable[None]]

ROUTES: dict[str, dict[str, Handler]] = {
    "/api/v2/completions": {"POST": completions},
    "/api/v2/models": {"GET": list_models},
    "/api/v2/models/{model}": {"GET": get_model},
    "/api/v2/openapi.json": {"GET": openapi},
    "/health": {"GET": health},
}

# Routes answered without a key, and why. Everything else requires one.
PUBLIC_PATHS: dict[str, str] = {
    "/health": "load balancers and orchestrators probe liveness without credentials",
    "/api/v2/openapi.json": "the API's description holds no data and helps clients integrate",
}

_MODEL_PREFIX = "/api/v2/models/"


def _route(path: str) -> tuple[str, str]:
    """(route template, path parameter) for a request path."""
    if path.startswith(_MODEL_PREFIX) and len(path) > len(_MODEL_PREFIX):
        return "/api/v2/models/{model}", path[len(_MODEL_PREFIX):]
    return path.rstrip("/") or "/", ""


class App:
    """``App(gateway)`` is an ASGI 3 application."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        template, param = _route(scope["path"])
        try:
            methods = ROUTES.get(template)
            if methods is None:
                raise NotFound(f"No route for {scope['path']}.")
            handler = methods.get(scope["method"])
            if handler is None:
                allowed = ", ".join(sorted(methods))
                raise MethodNotAllowed(
                    f"Method {scope['method']} is not allowed here; use {allowed}.",
                    headers={"allow": allowed})
            principal = None
            if template not in PUBLIC_PATHS:
                principal = gw.registry.authenticate(header(scope, b"authorization"))
            await handler(gw, Request(scope, receive, send, principal, param))
        except GatewayError as exc:
            await send_error(send, exc)
        except ClientGone:
            pass  # nobody is left to answer
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            await send_error(send, GatewayError("Internal server error."))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.gateway.start()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(settings: Settings | None = None, store: Store | None = None) -> App:
    from .config import load

    return App(Gateway.build(settings or load(), store))
