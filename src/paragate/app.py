"""The ASGI application: the route table, authentication around every route but the
named public ones, the one error handler, and the lifespan.

No framework sits on the hot path: a dict lookup routes a request, so the cost per
request is what the handlers do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable

from . import admin, routes
from .access import require
from .asgi import (
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    header,
    identity,
    request_id,
    send_error,
)
from .config import Settings
from .cors import Cors
from .errors import GatewayError, MethodNotAllowed, NotFound, NotServed, PermissionDenied
from .gateway import Gateway
from .routing import Endpoint, Request, Router, Table
from .store import Store
from .tracing import NO_TRACE
from .usage import client_request_id

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
    "/metrics": "Prometheus scrapes it with PARAGATE_METRICS_TOKEN, which is no API key; "
                "the handler checks that token, else an admin's key",
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


# The admin API's templates, each with its methods there: its answers (and its 405s)
# carry the security headers below. A template may serve the data plane too, with other
# methods (GET /api/v2/models): those answers do not.
_ADMIN: dict[str, frozenset[str]] = {p: frozenset(m) for p, m in admin.ROUTES.items()}
# Beside nosniff, which every answer carries (asgi.identity): an admin answer is never
# cached, framed, or told where it came from.
_ADMIN_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
]
_HSTS = (b"strict-transport-security", b"max-age=31536000")  # with our own TLS only
_NONE: list[tuple[bytes, bytes]] = []


def _identity(r: Request) -> list[tuple[bytes, bytes]]:
    """``asgi.identity`` of a request (less the upstream's time, once forwarded)."""
    ex = r.exchange
    return identity(r.response_id, time.monotonic() - r.started - (
        ex.waited if ex is not None else 0.0))


class _Answer:
    """``send`` for the handlers that are not forwarded: adds the identity headers (and
    ``extra``: CORS, security) to the answer and remembers its status."""

    __slots__ = ("extra", "r", "send", "status")

    def __init__(self, send: Send, r: Request, extra: list[tuple[bytes, bytes]]) -> None:
        self.send = send
        self.r = r
        self.extra = extra
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message["headers"] = [*message.get("headers", ()), *_identity(self.r),
                                  *self.extra]
        await self.send(message)


class _Extra:
    """``send`` for a forwarded request when CORS is on: adds ``extra`` to the answer's
    head (``proxy`` builds the rest). A plain call handing back ``send``'s awaitable,
    so that the relay's every chunk costs one call, not one more coroutine."""

    __slots__ = ("extra", "send")

    def __init__(self, send: Send, extra: list[tuple[bytes, bytes]]) -> None:
        self.send = send
        self.extra = extra

    def __call__(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *self.extra]
        return self.send(message)


class App:
    """``App(gateway)`` is an ASGI 3 application."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        settings = gateway.settings
        origins = settings.cors_origin_list()
        self.cors = Cors(origins) if origins else None  # None: CORS off
        self.admin_headers = [*_ADMIN_HEADERS, *([_HSTS] if settings.tls_certfile else [])]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        started = time.monotonic()
        ours = request_id()
        shown = client_request_id(header(scope, b"x-request-id")) or ours
        r = Request(scope, receive, send, None, request_id=ours, response_id=shown,
                    started=started)
        endpoint_name = "unmatched"  # the metrics' and the log's ``endpoint``
        endpoint: Endpoint | None = None
        status, error = 0, None
        tracing = gw.tracing
        trace = r.trace = NO_TRACE
        extra = _NONE  # more answer headers: CORS, and the admin API's security headers
        cors = self.cors
        origin = None
        if cors is not None:
            origin = header(scope, b"origin")
            extra = cors.headers(origin)
        try:
            if cors is not None and origin is not None and scope["method"] == "OPTIONS" and (
                    header(scope, b"access-control-request-method") is not None):
                endpoint_name = "cors_preflight"  # answered here: no key, no handler
                if not cors.allows(origin):
                    raise PermissionDenied(
                        f"The origin {origin[:200].decode('latin-1')} may not call this "
                        "API from a browser (PARAGATE_CORS_ORIGINS).",
                        code="origin_not_allowed")
                answer = _Answer(send, r, cors.preflight(
                    origin, header(scope, b"access-control-request-headers")))
                await answer({"type": "http.response.start", "status": 204, "headers": []})
                await answer({"type": "http.response.body", "body": b"", "more_body": False})
                status = answer.status
                return
            found = _ROUTER.match(scope["path"])
            if found is None:
                feature = _not_served(scope["path"])
                if feature is None:
                    raise NotFound(f"No route for {scope['path'][:200]}.")
                endpoint_name = feature
                r.principal = gw.registry.authenticate(header(scope, b"authorization"))
                raise NotServed(f"{feature} is part of Paradigm's API that this gateway "
                                "does not serve.")
            endpoint_name, (r.path_param, r.sub_param), methods = found
            if endpoint_name in _ADMIN and (scope["method"] in _ADMIN[endpoint_name]
                                            or scope["method"] not in methods):
                extra = [*extra, *self.admin_headers]
            if tracing is not None:
                trace = r.trace = tracing.request(scope, endpoint_name)
            endpoint = methods.get(scope["method"])
            if endpoint is None:
                allowed = ", ".join(sorted(methods))
                raise MethodNotAllowed(
                    f"Method {scope['method'][:20]} is not allowed here; use {allowed}.",
                    headers={"allow": allowed})
            permission = endpoint.permission
            if permission is not None:  # the one authorization check, before any body
                with trace.span("paragate.auth"):
                    principal = r.principal = gw.registry.authenticate(
                        header(scope, b"authorization"))
                    if principal.role not in permission.roles or permission.key_manager:
                        require(principal, permission)
            if endpoint.forwards:
                if extra:
                    r.send = _Extra(send, extra)
                await endpoint.handler(gw, r)
                return
            answer = r.send = _Answer(send, r, extra)
            await endpoint.handler(gw, r)
            status = answer.status
        except GatewayError as exc:
            status, error = exc.http_status, exc.code
            await send_error(send, exc, [*_identity(r), *extra])
        except ClientGone:
            status, error = 499, "client_disconnected"  # nobody is left to answer
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], endpoint_name)
            status, error = 500, "internal_error"
            await send_error(send, GatewayError("Internal server error."),
                             [*_identity(r), *extra])
        finally:
            ex = r.exchange
            if ex is None:  # a forwarded request counts itself (dispatch.forward)
                gw.telemetry.answered(
                    r, scope["method"], endpoint_name, status or 500, error,
                    "unknown" if endpoint is not None and endpoint.forwards else "")
            if tracing is not None:
                if ex is not None:
                    status, error = ex.status or status, ex.error_type or error
                trace.end(status or 500, error)

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
