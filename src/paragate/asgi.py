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


_NOSNIFF = (b"x-content-type-options", b"nosniff")


def identity(request_id: str, spent: float) -> list[tuple[bytes, bytes]]:
    """The headers every answer carries: its request id, the gateway's own time on it
    so far (``spent`` seconds, the upstream's left out) in milliseconds, and
    ``nosniff`` (a browser must never take a JSON answer or an event stream for a page
    or a script)."""
    return [(b"x-request-id", request_id.encode()),
            (b"x-paragate-overhead-ms", b"%.3f" % (max(spent, 0.0) * 1000)), _NOSNIFF]


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, or 413 as soon as it is known to exceed ``limit``: a
    Content-Length over it before a byte is read, a chunked body once it passes it.
    The 413 closes the connection, so that the server does not go on reading (and
    throwing away) the rest of a body that may never end. A Content-Length that lies
    never gets here: more bytes than it says are a malformed next request (the server
    answers 400 and closes), fewer leave the body to the server's stall timeout."""
    too_large = RequestTooLarge(
        f"The request body exceeds the limit of {limit} bytes (PARAGATE_MAX_BODY_BYTES).",
        headers={"connection": "close"})
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
