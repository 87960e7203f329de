"""The ASGI application: the route table, authentication around every route but the
named public ones, the one error handler, and the lifespan.

No framework sits on the hot path: a dict lookup routes a request, so the cost per
request is what the handlers do.
"""

from __future__ import annotations

import logging

from . import admin, routes
from .access import require
from .asgi import ClientGone, Receive, Scope, Send, header, send_error
from .config import Settings
from .errors import GatewayError, MethodNotAllowed, NotFound, NotServed
from .gateway import Gateway
from .routing import Endpoint, Request, Router, Table
from .store import Store

__all__ = ["NOT_SERVED", "PUBLIC_PATHS", "ROUTES", "App", "create_app"]

log = logging.getLogger("paragate.app")


def _merge(*tables: Table) -> dict[str, dict[str, Endpoint]]:
    merged: dict[str, dict[str, Endpoint]] = {}
    for table in tables:
        for path, methods in table.items():
            for method, endpoint in methods.items():
                if method in merged.setdefault(path, {}):
                    raise RuntimeError(f"{method} {path} is routed twice")  # a bug
                merged[path][method] = endpoint
    return merged


# The data plane's routes and the control plane's, side by side; each endpoint names
# the permission it needs (access.PERMISSIONS), or is public.
ROUTES = _merge(routes.ROUTES, admin.ROUTES)

# Routes answered without a key, and why. Everything else requires one.
PUBLIC_PATHS: dict[str, str] = {
    "/health": "load balancers and orchestrators probe liveness without credentials",
    "/ready": "load balancers probe readiness (503 while draining) without credentials",
    "/api/v2/openapi.json": "the API's description holds no data and helps clients integrate",
}
_ROUTER = Router(ROUTES)

# Paradigm's /api/v2 paths that paragate does not serve, each with everything below it:
# after authentication (401 without a key) they answer 501 `not_implemented`, so that a
# client can tell a missing feature from a typo (404). `*` stands for one segment.
NOT_SERVED: tuple[str, ...] = (
    "/api/v2/files",
    "/api/v2/query",
    "/api/v2/chat/document-search",
    "/api/v2/chat/document-analysis",
    "/api/v2/upload-session",
    "/api/v2/rate",
    "/api/v2/companies/*/workspaces",
    "/api/v2/reporting",  # but /api/v2/reporting/usage, which is served
)
_NOT_SERVED = tuple(tuple(p.strip("/").split("/")) for p in NOT_SERVED)


def _not_served(path: str) -> str | None:
    """The NOT_SERVED entry that ``path`` is, or lies below; None if none."""
    parts = path.strip("/").split("/")
    for entry, pattern in zip(NOT_SERVED, _NOT_SERVED, strict=True):
        if len(parts) >= len(pattern) and all(
                want == "*" or got == want
                for want, got in zip(pattern, parts[:len(pattern)], strict=True)):
            return entry
    return None


if {p for p, m in ROUTES.items() for e in m.values() if e.permission is None} != set(
        PUBLIC_PATHS):  # pragma: no cover - a bug, caught at import
    raise RuntimeError("the public endpoints and PUBLIC_PATHS disagree")


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
        try:
            found = _ROUTER.match(scope["path"])
            if found is None:
                feature = _not_served(scope["path"])
                if feature is None:
                    raise NotFound(f"No route for {scope['path'][:200]}.")
                gw.registry.authenticate(header(scope, b"authorization"))
                raise NotServed(f"{feature} is part of Paradigm's API that this gateway "
                                "does not serve.")
            _, (param, sub), methods = found
            endpoint = methods.get(scope["method"])
            if endpoint is None:
                allowed = ", ".join(sorted(methods))
                raise MethodNotAllowed(
                    f"Method {scope['method'][:20]} is not allowed here; use {allowed}.",
                    headers={"allow": allowed})
            principal = None
            permission = endpoint.permission
            if permission is not None:  # the one authorization check, before any body
                principal = gw.registry.authenticate(header(scope, b"authorization"))
                if principal.role not in permission.roles or permission.key_manager:
                    require(principal, permission)
            await endpoint.handler(gw, Request(scope, receive, send, principal, param, sub))
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
                self.gateway.shutdown.install()  # around uvicorn's signal handlers
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(settings: Settings | None = None, store: Store | None = None) -> App:
    from .config import load

    return App(Gateway.build(settings or load(), store))
