"""The few ASGI pieces paragate needs, without a framework on the hot path."""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .errors import GatewayError, RequestTooLarge

__all__ = [
    "Message",
    "Receive",
    "Scope",
    "Send",
    "header",
    "identity",
    "read_body",
    "request_id",
    "send_error",
    "send_json",
    "start_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# Request ids: random per process, then a counter (cheaper than random per request).
_ID_PREFIX = os.urandom(8).hex() + "-"
_ids = itertools.count(1)


def request_id() -> str:
    """A new id, unique across processes and restarts."""
    return f"{_ID_PREFIX}{next(_ids):x}"


class ClientGone(Exception):
    """The client hung up before its request body arrived."""


async def start_response(
    send: Send, status: int, headers: Iterable[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})


async def send_json(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await start_response(send, status, [(b"content-type", b"application/json"), *headers])
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, error: GatewayError,
                     more: Iterable[tuple[bytes, bytes]] = ()) -> None:
    headers = [(k.encode(), v.encode()) for k, v in error.headers.items()]
    await send_json(send, error.http_status, error.render(), [*headers, *more])


def identity(request_id: str, spent: float) -> list[tuple[bytes, bytes]]:
    """The headers every answer carries: its request id, and the gateway's own time on
    it so far (``spent`` seconds, the upstream's left out), in milliseconds."""
    return [(b"x-request-id", request_id.encode()),
            (b"x-paragate-overhead-ms", b"%.3f" % (max(spent, 0.0) * 1000))]


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, or 413 as soon as it is known to exceed ``limit``."""
    too_large = RequestTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    length = header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
