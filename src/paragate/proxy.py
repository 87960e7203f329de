"""Forwarding one completion to vLLM and relaying the answer, JSON or SSE.

Bytes pass through untouched except the few that must change: the ``model`` field
(vLLM's served name becomes the name the client asked for) and, in a stream, the usage
chunk that paragate asked for on its own behalf (dropped when the client did not ask).
Token usage is taken from the answer into ``Exchange`` as it passes; the caller records
it, whatever happens.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from .asgi import Send, identity, start_response
from .errors import (
    GatewayError,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .upstream.balancer import Balancer, Fleet
from .upstream.pool import Timeouts
from .usage import Exchange

__all__ = ["Target", "relay_json", "relay_stream", "upstream_rejection"]

log = logging.getLogger("paragate.proxy")

_DONE = b"data: [DONE]"
# A chunk's choice index, as vLLM writes it: ``"choices":[{"index":N`` (a JSON string
# cannot hold an unescaped quote, so this can only be the member itself)
_CHOICE_INDEX = re.compile(rb'"choices":\[\{"index":(\d+)')
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _head(base: list[tuple[bytes, bytes]], target: Target, ex: Exchange
          ) -> list[tuple[bytes, bytes]]:
    """The answer's headers: ``base``, the limits' (x-ratelimit-*), its request id and
    the gateway's own time on it so far, in milliseconds (less the upstream's)."""
    return [*base, *target.headers, *identity(ex.client_request_id or ex.request_id,
                                              time.monotonic() - ex.started - ex.waited)]


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _Details | None = None


class _Answer(msgspec.Struct):
    """What paragate reads of a JSON answer, or of a stream's final usage chunk."""

    usage: _Usage | None = None
    system_fingerprint: str | None = None


class _Index(msgspec.Struct):
    index: int = 0


class _Chunk(msgspec.Struct):
    """What paragate reads of a stream chunk: its choice and vLLM's running usage."""

    choices: list[_Index] = []
    usage: _Usage | None = None


class _UpstreamError(msgspec.Struct):
    message: str = ""
    type: str = ""
    param: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _UpstreamError | None = None
    # FastAPI-style bodies, for a vLLM behind something that answers {"detail": ...}
    detail: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    fleet: Fleet  # the model's replicas: the balancer picks one
    body: bytes
    requested_model: str
    upstream_model: str
    timeouts: Timeouts | None = None  # the model's; None: the pool's defaults
    affinity: int | None = None  # the request's affinity key (``balancer.affinity_key``)
    headers: Sequence[tuple[bytes, bytes]] = ()  # more answer headers (x-ratelimit-*)
    path: str = "completions"  # upstream, under the replica's URL (``Replica.endpoint``)
    answer: Callable[[bytes], bytes] | None = None  # rewrites a JSON answer (tokenize)
    generates: bool = True  # the answer is a generation's (it has system_fingerprint)
    upstream_headers: bytes = b""  # more request header lines for vLLM (traceparent)
    gap: Callable[[float], None] | None = None  # hears the time between two sent pieces
    keep: bool = False  # keep the answer as sent in ``Exchange.answer`` (log_payloads)

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


# vLLM's system_fingerprint per upstream URL, learned from its answers. When paragate asks
# for usage the client did not, vLLM leaves the fingerprint off each choice's last chunk
# (it rides on the usage chunk instead); paragate puts it back from here, at once, rather
# than hold the chunk until the usage chunk arrives. Until an upstream's fingerprint has
# been seen (its first answer through this process), a last chunk goes without it.
_FINGERPRINTS: dict[str, str | None] = {}


def _learn_fingerprint(url: str, fingerprint: str | None) -> None:
    if len(_FINGERPRINTS) > 1024 and url not in _FINGERPRINTS:
        _FINGERPRINTS.clear()  # upstreams come and go: keep the map small
    _FINGERPRINTS[url] = fingerprint


def _take_usage(ex: Exchange, usage: _Usage | None) -> None:
    if usage is None:
        return
    ex.prompt_tokens = usage.prompt_tokens
    ex.completion_tokens = usage.completion_tokens
    details = usage.prompt_tokens_details
    ex.cached_tokens = details.cached_tokens if details else None


async def relay_json(balancer: Balancer, target: Target, send: Send, ex: Exchange) -> None:
    waiting = time.monotonic()
    try:
        async with balancer.post(target.fleet, target.body, target.timeouts,
                                 target.affinity, ex.tried, target.path,
                                 target.upstream_headers) as (replica, resp):
            url = replica.url
            data = await resp.read()
            status = resp.status
            answer = None
            if status == 200:
                try:
                    answer = msgspec.json.decode(data, type=_Answer)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    resp.failure = "sent a malformed answer"  # counted against it
    finally:
        ex.waited += time.monotonic() - waiting
    if status != 200:
        ex.outcome = "upstream_error"
        raise upstream_rejection(status, data)
    if answer is None:
        ex.outcome = "upstream_error"
        raise UpstreamFailed("The model server sent a malformed response.")
    _take_usage(ex, answer.usage)
    if target.generates and (answer.system_fingerprint is not None
                             or url not in _FINGERPRINTS):
        _learn_fingerprint(url, answer.system_fingerprint)
    rewrite = target.model_rewriter()
    if rewrite:
        data = data.replace(rewrite[0], rewrite[1], 1)
    if target.answer is not None:
        data = target.answer(data)
    ex.status, ex.outcome = 200, "ok"
    if target.keep:
        ex.answer = [data]
    ex.finish()  # journaled before the answer leaves
    await start_response(send, 200, _head(_JSON_HEADERS, target, ex))
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _strip_usage(event: bytes) -> bytes:
    """The chunk without the ``"usage"`` member that paragate asked vLLM for: the bytes
    vLLM sends when it is not asked (it leaves unset fields out). A JSON string cannot
    hold an unescaped quote, so ``,"usage":{`` can only be the member itself. A chunk's
    running usage is flat (numbers only), so its first ``}`` ends it; a nested object,
    should vLLM ever add one, is walked brace by brace."""
    at = event.rfind(b',"usage":{')
    if at < 0:
        return event
    start = at + 10
    end = event.find(b"}", start)
    if end < 0:
        return event  # pragma: no cover - vLLM's JSON is whole
    if b"{" not in event[start:end]:
        return event[:at] + event[end + 1:]
    depth = 1
    for i in range(start, len(event)):
        c = event[i]
        if c == 123:  # {
            depth += 1
        elif c == 125:  # }
            depth -= 1
            if depth == 0:
                return event[:at] + event[i + 1:]
    return event  # pragma: no cover - vLLM's JSON is whole


class _Events:
    """Turns vLLM's SSE events into the ones the client gets, one event at a time, and
    reads usage from them as they pass; nothing is held back.

    paragate always asks vLLM for usage, running (``continuous_usage_stats``: every
    chunk carries its prompt's tokens and its choice's completion tokens so far) and
    final (the usage chunk before ``[DONE]``). What the client did not ask for is
    removed again: the running usage from each chunk, the usage chunk itself, and, as
    vLLM would have sent it, the fingerprint goes back on each choice's last chunk.
    """

    __slots__ = ("completion", "done", "ex", "final", "fingerprint", "n", "prompt",
                 "rewrite", "url", "want_running", "want_usage")

    def __init__(self, target: Target, url: str, want_usage: bool, want_running: bool,
                 n: int, ex: Exchange) -> None:
        self.rewrite = target.model_rewriter()
        self.url = url
        self.want_usage = want_usage
        self.want_running = want_usage and want_running  # vLLM's own rule
        self.n = max(n, 1)
        self.ex = ex
        self.done = False
        self.final = False
        self.prompt: dict[int, int] = {}  # per prompt: its tokens
        self.completion: dict[int, int] = {}  # per choice: tokens generated so far
        fingerprint = _FINGERPRINTS.get(url)
        self.fingerprint = (b',"system_fingerprint":' + msgspec.json.encode(fingerprint)
                            + b"}") if fingerprint is not None else None

    def feed(self, event: bytes, out: list[bytes]) -> None:
        if event == _DONE:
            self.done = True
        elif event.startswith(b'data: {"error"'):
            self.ex.outcome = "upstream_error"
            event = _error_event(event)
        elif b'"choices":[]' in event and b'"usage":{' in event:
            self.take_final(event)
            if not self.want_usage:
                return
        elif event.startswith(b"data: {"):
            at = event.rfind(b',"usage":{')
            if at >= 0:
                end = event.find(b"}", at + 10)
                flat = end > 0 and b"{" not in event[at + 10:end]
                if not (flat and self.take_flat(event, at, end)):
                    self.take_running(event)
                if not self.want_running:
                    event = event[:at] + event[end + 1:] if flat else _strip_usage(event)
            if (not self.want_usage and self.fingerprint is not None
                    and b'"finish_reason":null' not in event and event.endswith(b"}")):
                event = event[:-1] + self.fingerprint
        if self.rewrite:
            event = event.replace(self.rewrite[0], self.rewrite[1], 1)
        out.append(event + b"\n\n")

    def look_ahead(self, events: list[bytes]) -> None:
        """A fingerprint not known yet may be in this very read, in the usage chunk
        after the last text chunks: take it from there (reading ahead holds nothing)."""
        for event in reversed(events):
            if b'"choices":[]' in event and b'"system_fingerprint":' in event:
                try:
                    answer = msgspec.json.decode(event[6:], type=_Answer)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    return
                if answer.system_fingerprint is not None:
                    self.fingerprint = (b',"system_fingerprint":'
                                        + msgspec.json.encode(answer.system_fingerprint)
                                        + b"}")
                return

    def take_flat(self, event: bytes, at: int, end: int) -> bool:
        """Running usage read from the chunk's bytes, without decoding its text: the
        flat usage object at ``at``..``end`` and the index of the chunk's choice (the
        first member of ``choices``, as vLLM writes it). False: not in that shape
        (``take_running`` decodes the chunk whole)."""
        found = _CHOICE_INDEX.search(event, 6, at)
        if found is None:
            return False
        try:
            usage = msgspec.json.decode(event[at + 9:end + 1], type=_Usage)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        i = int(found[1])
        if usage.prompt_tokens is not None:
            self.prompt[i // self.n] = usage.prompt_tokens
        if usage.completion_tokens is not None:
            self.completion[i] = usage.completion_tokens
        return True

    def take_running(self, event: bytes) -> None:
        try:
            chunk = msgspec.json.decode(event[6:], type=_Chunk)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        usage = chunk.usage
        if usage is None or not chunk.choices:
            return
        i = chunk.choices[0].index
        if usage.prompt_tokens is not None:
            self.prompt[i // self.n] = usage.prompt_tokens
        if usage.completion_tokens is not None:
            self.completion[i] = usage.completion_tokens

    def take_final(self, event: bytes) -> None:
        try:
            answer = msgspec.json.decode(event[6:], type=_Answer)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        _take_usage(self.ex, answer.usage)
        self.final = True
        _learn_fingerprint(self.url, answer.system_fingerprint)

    def settle(self) -> None:
        """Put what is known into the exchange: the final usage when it came, else the
        running usage last reported (marked partial)."""
        if self.final:
            return
        self.ex.partial = True
        if self.prompt or self.completion:
            self.ex.prompt_tokens = sum(self.prompt.values())
            self.ex.completion_tokens = sum(self.completion.values())


async def relay_stream(balancer: Balancer, target: Target, want_usage: bool,
                       want_running: bool, n: int, send: Send, ex: Exchange) -> None:
    """Relay vLLM's SSE as it arrives. Failures before the first byte raise (a normal
    error response); after it they become an SSE error event, then ``[DONE]``. The
    record is journaled before the event that ends the stream is sent."""
    waiting = time.monotonic()
    async with balancer.post(target.fleet, target.body, target.timeouts,
                             target.affinity, ex.tried, target.path,
                             target.upstream_headers) as (replica, resp):
        ex.waited += time.monotonic() - waiting
        events = _Events(target, replica.url, want_usage, want_running, n, ex)
        ex.settle = events.settle
        if resp.status != 200:
            ex.outcome = "upstream_error"
            try:
                data = await resp.read()
            except GatewayError:
                data = b""
            raise upstream_rejection(resp.status, data)
        await start_response(send, 200, _head(_SSE_HEADERS, target, ex))
        ex.status = 200
        gap = target.gap
        kept = ex.answer = [] if target.keep else None
        sent = 0.0
        pending = b""
        chunks = resp.iter_chunks().__aiter__()
        try:
            while True:
                waiting = time.monotonic()
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    ex.waited += time.monotonic() - waiting
                pending = pending + chunk if pending else chunk  # usually whole events
                if b"\n\n" not in pending:
                    continue
                *complete, pending = pending.split(b"\n\n")
                if events.fingerprint is None and not want_usage:
                    events.look_ahead(complete)
                out: list[bytes] = []
                for event in complete:
                    if event:
                        events.feed(event, out)
                if out:
                    now = time.monotonic()
                    if ex.first_byte is None:
                        ex.first_byte = now
                    elif gap is not None:
                        gap(now - sent)
                    sent = now
                    if kept is not None and len(kept) < 4096:
                        kept.extend(out)
                if events.done:
                    if ex.outcome != "upstream_error":
                        ex.outcome = "ok"
                    events.settle()
                    if ex.outcome != "ok":
                        ex.partial = True
                    ex.finish()  # journaled before the stream's last event leaves
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out),
                                "more_body": True})
                if events.done:
                    break
            if not events.done:
                raise UpstreamFailed("The model server ended the stream early.")
        except GatewayError as failure:
            log.warning("stream from %s failed after it started: %s", replica.url,
                        failure.message)
            resp.failure = failure.message  # counted against the replica
            ex.outcome = "upstream_error"
            ex.error_type = failure.code
            events.settle()
            ex.finish()
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + failure.render() + b"\n\n" + _DONE + b"\n\n"})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


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
