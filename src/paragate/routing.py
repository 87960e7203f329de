"""Route tables: each path and method names its handler and the permission it needs.

Exact paths are one dict lookup (the hot path: ``/api/v2/completions``); templates with
one ``{param}`` are tried after, longest suffix first. A ``{model}`` parameter may hold
slashes (model names such as ``org/model`` do); every other parameter is one segment.
A template may end in a second, one-segment parameter after a ``{model}``
(``/api/v2/models/{model}/replicas/{replica}``): the last segment is that one, and what
lies between the prefix and the fixed part before it is the model's name (a model name
never has a segment named ``replicas``, so this cannot be mistaken for one).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from .access import Permission
from .asgi import Receive, Scope, Send
from .auth import Principal
from .errors import InvalidRequest
from .tracing import NO_TRACE, RequestTrace

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["Endpoint", "Handler", "Request", "Router", "Table", "query"]


@dataclass(slots=True)
class Request:
    scope: Scope
    receive: Receive
    send: Send
    principal: Principal | None  # None only on public routes
    path_param: str = ""
    sub_param: str = ""  # a template's second parameter (``{replica}``)
    request_id: str = ""  # ours: the usage record's id
    response_id: str = ""  # the answer's ``x-request-id``: the client's own, else ours
    started: float = 0.0  # monotonic: when it arrived
    trace: RequestTrace = NO_TRACE  # its trace (``NO_TRACE`` while tracing is off)
    exchange: Any = None  # a forwarded request's ``usage.Exchange``, once it has one

    @property
    def caller(self) -> Principal:
        assert self.principal is not None, "an authenticated route"
        return self.principal


def query(r: Request, **allowed: type) -> dict[str, Any]:
    """The query parameters, each one of ``allowed`` (by name) and of its type."""
    out: dict[str, Any] = {}
    for name, raw in parse_qsl(r.scope.get("query_string", b"").decode("latin-1"),
                               keep_blank_values=True):
        kind = allowed.get(name)
        if kind is None:
            raise InvalidRequest(f"Unknown query parameter '{name[:40]}'.", param=name[:40],
                                 code="unknown_field")
        if kind is int:
            digits = raw.strip().lstrip("-")
            if not (digits.isascii() and digits.isdigit()) or len(raw) > 18:
                raise InvalidRequest(f"'{name}' must be an integer.", param=name,
                                     code="invalid_type")
            out[name] = int(raw)
        elif kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise InvalidRequest(f"'{name}' must be true or false.", param=name,
                                     code="invalid_type")
            out[name] = raw.lower() in ("true", "1")
        else:
            out[name] = raw
    return out


Handler = Callable[["Gateway", Request], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    handler: Handler
    permission: Permission | None  # None: public (``app.PUBLIC_PATHS`` says why)
    forwards: bool = False  # to a model (``dispatch.forward``: it counts and logs itself)


Table = Mapping[str, Mapping[str, Endpoint]]
_GREEDY = ("{model}",)


class Router:
    def __init__(self, table: Table) -> None:
        self.exact = {p: dict(m) for p, m in table.items() if "{" not in p}
        templates = []
        pairs = []
        for path, methods in table.items():
            if path.count("{") == 2:
                prefix, rest = path.split("{", 1)
                first, rest = rest.split("}", 1)
                middle, rest = rest.split("{", 1)
                _, tail = rest.split("}", 1)
                assert "{" + first + "}" in _GREEDY and not tail, path
                pairs.append((prefix, middle, path, dict(methods)))
            elif "{" in path:
                prefix, rest = path.split("{", 1)
                name, suffix = rest.split("}", 1)
                greedy = "{" + name + "}" in _GREEDY
                templates.append((prefix, suffix, greedy, path, dict(methods)))
        self.templates = sorted(templates, key=lambda t: (-len(t[1]), -len(t[0])))
        self.pairs = pairs

    def match(self, path: str) -> tuple[str, tuple[str, str], dict[str, Endpoint]] | None:
        """(template, (path parameter, second parameter), endpoints by method), or None."""
        methods = self.exact.get(path)
        if methods is not None:
            return path, ("", ""), methods
        for prefix, middle, template, endpoints in self.pairs:
            if path.startswith(prefix):
                at = path.rfind(middle)
                if at > len(prefix):
                    second = path[at + len(middle):]
                    if second and "/" not in second:
                        return template, (path[len(prefix):at], second), endpoints
        for prefix, suffix, greedy, template, endpoints in self.templates:
            if path.startswith(prefix) and path.endswith(suffix) and (
                len(path) > len(prefix) + len(suffix)
            ):
                param = path[len(prefix):len(path) - len(suffix)]
                if greedy or "/" not in param:
                    return template, (param, ""), endpoints
        stripped = path.rstrip("/")
        if stripped != path and stripped:
            return self.match(stripped)
        return None
