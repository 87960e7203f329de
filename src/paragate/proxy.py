"""Forwarding one completion to vLLM and relaying the answer, JSON or SSE.

Bytes pass through untouched except the few that must change: the ``model`` field
(vLLM's served name becomes the name the client asked for) and, in a stream, the usage
chunk that paragate asked for on its own behalf (dropped when the client did not ask).
Token usage is taken from the answer into ``Exchange`` as it passes; the caller records
it, whatever happens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec

from .asgi import Send, start_response
from .errors import (
    GatewayError,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .upstream import Upstreams

__all__ = ["Exchange", "Target", "relay_json", "relay_stream", "upstream_rejection"]

log = logging.getLogger("paragate.proxy")

_DONE = b"data: [DONE]"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class _WithUsage(msgspec.Struct):
    usage: _Usage | None = None


class _Final(msgspec.Struct):
    """vLLM's last stream chunk: ``"choices":[]``, usage and fingerprint."""

    usage: _Usage | None = None
    system_fingerprint: str | None = None


class _UpstreamError(msgspec.Struct):
    message: str = ""
    type: str = ""
    param: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _UpstreamError | None = None
    # FastAPI-style bodies, for a vLLM behind something that answers {"detail": ...}
    detail: str | None = None
    message: str | None = None


@dataclass(slots=True)
class Exchange:
    """What happened to one request, filled in as it goes; recorded in ``finally``."""

    status: int = 0
    outcome: str = "error"  # ok | client_disconnected | upstream_error | error
    usage: _Usage | None = None


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    body: bytes
    api_key: str | None
    requested_model: str
    upstream_model: str

    def model_rewriter(self) -> tuple[bytes, bytes] | None:
        """(old, new) bytes of the ``model`` member, or None when the names agree.

        A JSON string never holds an unescaped quote, so ``"model":"<name>"`` can only
        be the member itself, never text inside a completion."""
        if self.requested_model == self.upstream_model:
            return None
        return (
            b'"model":' + msgspec.json.encode(self.upstream_model),
            b'"model":' + msgspec.json.encode(self.requested_model),
        )


def upstream_rejection(status: int, data: bytes) -> GatewayError:
    """vLLM's error answer, in our envelope: its 4xx status, type and message kept;
    a 5xx becomes 502 (503 and 504 keep their meaning). A 401 or 403 is about paragate's
    own credentials upstream, not the client's key, so it is a 502 that says so."""
    try:
        body = msgspec.json.decode(data, type=_ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError):
        body = _ErrorBody()
    err = body.error
    message = (err.message if err else None) or body.detail or body.message or (
        data[:500].decode("utf-8", "replace") or f"HTTP {status}")
    if status in (401, 403):
        return UpstreamFailed(
            f"The model server refused the gateway's credentials ({status}: {message}); "
            "an administrator must check the model's upstream API key.")
    if 400 <= status < 500:
        return UpstreamRejected(status, message, (err.type if err else "") or
                                "invalid_request_error", err.param if err else None)
    if status == 503:
        return UpstreamUnavailable(f"The model server answered 503: {message}")
    if status == 504:
        return UpstreamTimeout(f"The model server answered 504: {message}")
    return UpstreamFailed(f"The model server answered {status}: {message}")


async def relay_json(upstreams: Upstreams, target: Target, send: Send, ex: Exchange) -> None:
    async with upstreams.post(target.url, target.body, target.api_key) as resp:
        data = await resp.read()
        status = resp.status
    if status != 200:
        ex.outcome = "upstream_error"
        raise upstream_rejection(status, data)
    try:
        ex.usage = msgspec.json.decode(data, type=_WithUsage).usage
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        ex.outcome = "upstream_error"
        raise UpstreamFailed("The model server sent a malformed response.") from exc
    rewrite = target.model_rewriter()
    if rewrite:
        data = data.replace(rewrite[0], rewrite[1], 1)
    ex.status, ex.outcome = 200, "ok"
    await start_response(send, 200, [(b"content-type", b"application/json")])
    await send({"type": "http.response.body", "body": data, "more_body": False})


class _Events:
    """Turns vLLM's SSE events into the ones the client gets, one event at a time.

    When paragate asked for usage on its own behalf, vLLM moves ``system_fingerprint``
    from each choice's last chunk to the usage chunk. To keep the stream identical to
    what the client would have had, those last chunks are held until the usage chunk
    arrives (immediately after, in vLLM), stamped with its fingerprint, and released;
    the usage chunk itself is dropped.
    """

    __slots__ = ("done", "ex", "held", "own_usage", "rewrite")

    def __init__(self, rewrite: tuple[bytes, bytes] | None, own_usage: bool,
                 ex: Exchange) -> None:
        self.rewrite = rewrite
        self.own_usage = own_usage
        self.ex = ex
        self.held: list[bytes] = []
        self.done = False

    def feed(self, event: bytes, out: list[bytes]) -> None:
        if event == _DONE:
            self.release(out)
            self.done = True
        elif event.startswith(b'data: {"error"'):
            self.release(out)
            self.ex.outcome = "upstream_error"
            event = _error_event(event)
        elif b'"usage":{' in event and b'"choices":[]' in event:
            final = _final_of(event)
            if final is not None:
                self.ex.usage = final.usage
                if self.own_usage:
                    self.release(out, final.system_fingerprint)
                    return
        if self.rewrite:
            event = event.replace(self.rewrite[0], self.rewrite[1], 1)
        if self.own_usage and event.startswith(b"data: {") and (
            b'"finish_reason":null' not in event
        ):
            self.held.append(event)
            return
        out.append(event + b"\n\n")

    def release(self, out: list[bytes], fingerprint: str | None = None) -> None:
        stamp = b',"system_fingerprint":' + msgspec.json.encode(fingerprint) + b"}"
        for event in self.held:
            if fingerprint is not None and event.endswith(b"}"):
                event = event[:-1] + stamp
            out.append(event + b"\n\n")
        self.held.clear()


async def relay_stream(
    upstreams: Upstreams, target: Target, include_usage: bool, send: Send, ex: Exchange
) -> None:
    """Relay vLLM's SSE as it arrives. Failures before the first byte raise (a normal
    error response); after it they become an SSE error event, then ``[DONE]``."""
    async with upstreams.post(target.url, target.body, target.api_key) as resp:
        if resp.status != 200:
            ex.outcome = "upstream_error"
            try:
                data = await resp.read()
            except GatewayError:
                data = b""
            raise upstream_rejection(resp.status, data)
        await start_response(send, 200, _SSE_HEADERS)
        ex.status = 200
        events = _Events(target.model_rewriter(), not include_usage, ex)
        pending = b""
        try:
            async for chunk in resp.iter_chunks():
                pending = pending + chunk if pending else chunk  # usually whole events
                if b"\n\n" not in pending:
                    continue
                *complete, pending = pending.split(b"\n\n")
                out: list[bytes] = []
                for event in complete:
                    if event:
                        events.feed(event, out)
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out),
                                "more_body": True})
            if not events.done:
                raise UpstreamFailed("The model server ended the stream early.")
            if ex.outcome != "upstream_error":
                ex.outcome = "ok"
        except GatewayError as failure:
            log.warning("stream from %s failed after it started: %s", target.url,
                        failure.message)
            ex.outcome = "upstream_error"
            out = []
            events.release(out)
            out.append(b"data: " + failure.render() + b"\n\n" + _DONE + b"\n\n")
            await send({"type": "http.response.body", "body": b"".join(out),
                        "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _final_of(event: bytes) -> _Final | None:
    try:
        return msgspec.json.decode(event[6:], type=_Final)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _error_event(event: bytes) -> bytes:
    """vLLM's mid-stream error (integer ``code``) rendered in our envelope."""
    try:
        err = msgspec.json.decode(event[6:], type=_ErrorBody).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        err = None
    message = err.message if err and err.message else "The model server failed mid-stream."
    failure = UpstreamRejected(200, message, (err.type if err else "") or "upstream_error",
                               err.param if err else None)
    failure.code = "upstream_error"
    return b"data: " + failure.render()
