"""What the admin handlers share: the actor of a request, its body, running a
control operation off the event loop, and the answer."""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any, ParamSpec, TypeVar

import msgspec

from ..asgi import header, read_body, request_id, send_json
from ..control import Actor
from ..errors import InvalidRequest, UnsupportedMediaType
from ..gateway import Gateway
from ..protocol import json_body
from ..routing import Request

__all__ = ["actor", "body", "changed", "client_addr", "path_int", "reply", "run"]

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

_FIELD = re.compile(r"`\$\.([A-Za-z_][A-Za-z0-9_.]*)")
_NAMED = re.compile(r"field `([^`]+)`")


async def run(gw: Gateway, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """A control operation, in the admin API's own thread (never the refresher's or the
    usage writer's, so neither waits behind an admin's query)."""
    return await gw.admin_thread.run(fn, *args, **kwargs)


async def changed(gw: Gateway) -> None:
    """After a change: apply it to this process's view before answering, so that the
    caller's next request sees it (other processes follow within the refresh bounds)."""
    await gw.refresher.refresh()


def client_addr(gw: Gateway, r: Request) -> str | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy
    (``PARAGATE_TRUSTED_PROXIES``), the last address in X-Forwarded-For that is not one."""
    peer = r.scope.get("client")
    addr: str | None = str(peer[0]) if peer else None
    networks = gw.settings.proxy_networks()
    if addr is None or not networks:
        return addr
    forwarded = header(r.scope, b"x-forwarded-for")

    def trusted(a: str) -> bool:
        try:
            ip = ip_address(a)
        except ValueError:
            return False
        return any(ip in n for n in networks)

    if not trusted(addr) or not forwarded:
        return addr
    for hop in reversed(forwarded.decode("latin-1").split(",")):
        hop = hop.strip()
        if not trusted(hop):
            try:
                return str(ip_address(hop))
            except ValueError:
                return addr  # garbage from beyond the proxy: keep what we know
    return addr


def actor(gw: Gateway, r: Request) -> Actor:
    who = r.caller
    return Actor(kind="user", role=who.role, user_id=who.user_id, company_id=who.company_id,
                 key_manager=who.key_manager, key_public_id=who.public_id,
                 request_id=request_id(), client_addr=client_addr(gw, r))


def path_int(r: Request, what: str) -> int:
    """An integer id from the path; anything else names no object (404)."""
    from ..errors import NotFound

    raw = r.path_param
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # not '³': int() refuses it
        raise NotFound(f"No {what} with id {raw[:40]!r}.")
    return int(raw)


async def body(gw: Gateway, r: Request, kind: type[S]) -> S:
    """The JSON body decoded into ``kind``: 400 naming the field on any mismatch, and
    the checks of every JSON body first (``protocol.json_body``: a BOM, lone
    surrogates, depth, numbers out of range, a key given twice, each named)."""
    content_type = (header(r.scope, b"content-type") or b"").split(b";")[0].strip().lower()
    raw = await read_body(r.scope, r.receive, gw.settings.max_body_bytes)
    # `curl -d '{...}'` labels JSON as a form; like /completions, read it as what it is
    curl_json = content_type == b"application/x-www-form-urlencoded" and raw.lstrip(
        b" \t\r\n").removeprefix(b"\xef\xbb\xbf").startswith(b"{")
    if content_type not in (b"application/json", b"") and not content_type.endswith(
            b"+json") and not curl_json:
        raise UnsupportedMediaType("The admin API takes application/json bodies.")
    raw = raw or b"{}"
    if not _within_int64(json_body(raw, gw.body_limits)):
        raise InvalidRequest("The body holds an integer out of range: the admin API's "
                             "integers are signed 64-bit ones (-2^63 to 2^63-1).",
                             code="invalid_json")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None
    except msgspec.DecodeError:  # not reached: json_value decoded it
        raise InvalidRequest("The body is not valid JSON.", code="invalid_json") from None


def _within_int64(value: Any) -> bool:
    """Whether every integer of a decoded JSON value fits the store's BIGINT (the JSON
    checks allow uint64 too; a larger id reached the database and was a 500)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is int:
            if not -(2**63) <= item < 2**63:
                return False
        elif type(item) is dict:
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return True


def _invalid(message: str) -> InvalidRequest:
    where = _FIELD.search(message)
    named = _NAMED.search(message)
    param = where.group(1) if where else (named.group(1) if named else None)
    if "missing required field" in message:
        code = "missing_field"
    elif "unknown field" in message:
        code = "unknown_field"
    elif message.startswith("Expected"):
        code = "invalid_type"
    else:
        code = "invalid_value"
    if len(message) > 200:  # msgspec quotes a bad enum value whole: never echo megabytes
        message = message[:200] + "…"
    return InvalidRequest(f"Invalid body: {message}.", param=param, code=code)


async def reply(r: Request, status: int, obj: Any) -> None:
    await send_json(r.send, status, msgspec.json.encode(obj))
