"""The HTTP/1.1 transport: uvicorn's httptools protocol with the limits it lacks.

``GuardedProtocol`` is what ``paragate serve`` hands uvicorn as ``http=``. Against slow
or hostile clients it adds, per connection:

- a header deadline: a request's line and headers must be complete within
  ``header_timeout`` seconds, counted from the connection's opening for its first request
  and from a request's first byte for later ones; a total deadline, however slowly the
  bytes trickle. Then 408 (or, if not a byte of a request came, a silent close).
- a body stall rule: once the headers are in, the body must keep coming; a gap of
  ``body_timeout`` seconds with no body bytes ends the request (408 if its answer has
  not started, else a close). Time during which the gateway itself is not reading (the
  app has not taken 64 KiB already buffered, a pipelined request waits its turn, a
  ``100-continue`` not sent yet) is not the client's and does not count.
- header limits: more than ``max_headers`` header fields, or more than
  ``max_header_bytes`` in the request target plus the header lines, is answered 431.
- a keep-alive limit: an idle connection between two requests is closed after
  ``keepalive_timeout`` seconds (uvicorn's own timer, given our setting).
- a per-address limit: past ``max_connections_per_client`` connections open from one
  TCP peer address, a new one is answered 429 at once and closed. The count is per
  worker process, and it is the TCP peer's; peers in ``trusted_proxies`` (load
  balancers, whose connections carry many clients) are not counted.

These answers never reach the app, so they carry no ``x-request-id``; each is the JSON
error envelope with ``Connection: close``, and each kind is logged at most every
10 s with a count. On the request path the cost is a few attribute writes and
``loop.time()`` calls per request: one timer per connection is armed once and re-armed
only when it fires (see docs/benchmarks.md, "Issue 13: transport limits").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from .config import Settings, load
from .errors import GatewayError, InvalidRequest, RateLimited

__all__ = ["GuardedProtocol", "Limits", "open_connections"]

log = logging.getLogger("paragate.transport")

# A connection's phase: no byte of a request yet, in a request's head, in its body, or
# past its body (answering, or idle between requests: uvicorn's keep-alive timer)
_WAIT, _HEAD, _BODY, _DONE = 0, 1, 2, 3
# Seconds a refused connection may take to read its 429 before it is closed
_LINGER = 2.0
# Open connections per TCP peer address, in this process (``max_connections_per_client``)
_OPEN: dict[str, int] = {}


def open_connections() -> dict[str, int]:
    """Connections open now per peer address, counted against the per-client limit."""
    return dict(_OPEN)


@dataclass(frozen=True, slots=True)
class Limits:
    """The transport's settings (``config.SETTINGS`` says what each means)."""

    header_timeout: float = 30.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    max_headers: int = 100
    max_header_bytes: int = 32768
    max_connections_per_client: int = 512
    exempt: tuple[IPv4Network | IPv6Network, ...] = ()  # not counted: trusted proxies

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.header_timeout, settings.body_timeout,
                   settings.keepalive_timeout, settings.max_headers,
                   settings.max_header_bytes, settings.max_connections_per_client,
                   settings.proxy_networks())


@functools.lru_cache(maxsize=4096)
def _exempt(host: str, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    try:
        address = ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


@functools.cache
def _configured() -> Limits:
    return Limits.of(load())  # once per worker process, as create_app reads its own


def _raw(status: int, phrase: str, error: GatewayError) -> bytes:
    body = error.render()
    extra = "".join(f"{k}: {v}\r\n" for k, v in error.headers.items())
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-content-type-options: nosniff\r\n{extra}"
            "connection: close\r\n\r\n").encode() + body


@dataclass(frozen=True, slots=True)
class _Answers:
    head_timeout: bytes
    body_timeout: bytes
    too_many_headers: bytes
    headers_too_large: bytes
    too_many_connections: bytes


@functools.cache
def _answers(lim: Limits) -> _Answers:
    def e408(message: str) -> bytes:
        return _raw(408, "Request Timeout", InvalidRequest(message, code="request_timeout"))

    def e431(message: str, code: str) -> bytes:
        return _raw(431, "Request Header Fields Too Large", InvalidRequest(message, code=code))

    crowded = RateLimited(f"Too many connections from this address (at most "
                          f"{lim.max_connections_per_client} at once); close one and retry.",
                          1)
    crowded.code = "too_many_connections"
    return _Answers(
        e408(f"The request's headers did not arrive within {lim.header_timeout:g} s."),
        e408(f"The request's body stalled: nothing came for {lim.body_timeout:g} s."),
        e431(f"The request has more than {lim.max_headers} header fields.",
             "too_many_headers"),
        e431(f"The request's headers exceed {lim.max_header_bytes} bytes.",
             "headers_too_large"),
        _raw(429, "Too Many Requests", crowded),
    )


class _Refused(Exception):
    """Raised in a parser callback to stop parsing: the request has been answered."""


# When each kind of cut was last logged, and how many since
_NOTED: dict[str, tuple[float, int]] = {}


def _note(kind: str, peer: tuple[str, int] | None, detail: str) -> None:
    """Log a cut, at most once every 10 s per kind (an attack must not flood the log)."""
    now = time.monotonic()
    last, since = _NOTED.get(kind, (-1e9, 0))
    if now - last < 10.0:
        _NOTED[kind] = (last, since + 1)
        return
    _NOTED[kind] = (now, 0)
    log.warning("%s from %s: %s%s", kind.replace("_", " "), peer[0] if peer else "?",
                detail, f" ({since} more since the last such line)" if since else "")


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` with paragate's transport limits (module doc)."""

    limits: ClassVar[Limits | None] = None  # None: from the settings, once per process

    # Slots, not the instance's dict: uvicorn's own attributes fill the dict up to what
    # CPython keeps compact (30 shared keys); more there would slow every attribute
    # lookup of uvicorn's code as well (measured: 0.5 µs a request)
    __slots__ = ("_began", "_first", "_header_timeout", "_lim", "_max_header_bytes",
                 "_max_headers", "_peer", "_phase", "_read", "_refused", "_since",
                 "_spill", "_timer")

    def __init__(self, config: Config, server_state: ServerState,
                 app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None
                 ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        lim = self._lim = self.limits or _configured()
        self.timeout_keep_alive = lim.keepalive_timeout  # type: ignore[assignment]
        self._header_timeout = lim.header_timeout
        self._max_headers = lim.max_headers
        self._max_header_bytes = lim.max_header_bytes
        self._phase = _WAIT
        self._since = 0.0  # loop time: the head's start, or the body's last progress
        self._timer: asyncio.TimerHandle | None = None  # the one timer, see _check
        self._read = 0  # the size of the read being parsed
        self._first = 0  # of the read the head began in
        self._spill = 0  # of the reads after it, the head unfinished
        self._began = False  # a request began in the read being parsed
        self._peer: str | None = None  # the address counted in _OPEN
        self._refused = False  # answered by a limit: the rest is ignored

    # -- the connection --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        lim = self._lim
        most = lim.max_connections_per_client
        if most and self.client is not None and not (
                lim.exempt and _exempt(self.client[0], lim.exempt)):
            host = self.client[0]
            n = _OPEN.get(host, 0)
            if n >= most:
                self._refuse_connection()
                return
            _OPEN[host] = n + 1
            self._peer = host
        self._since = self.loop.time()
        self._timer = self.loop.call_later(self._header_timeout, self._check)

    def _refuse_connection(self) -> None:
        _note("too_many_connections", self.client,
              f"{self._lim.max_connections_per_client} open already, refused")
        self._close(_answers(self._lim).too_many_connections)

    def _close(self, answer: bytes | None) -> None:
        """Send ``answer`` (if any), then close; whatever else comes is ignored."""
        self._refused = True
        transport = self.transport
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if answer is None or not transport.can_write_eof():  # TLS cannot half-close
            if answer is not None:
                transport.write(answer)
            transport.close()
            return
        # half-close and linger: closing with the client's bytes unread would reset the
        # connection, and the client could lose the answer before reading it
        transport.write(answer)
        transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(_LINGER, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        peer = self._peer
        if peer is not None:
            self._peer = None
            n = _OPEN[peer] - 1
            if n:
                _OPEN[peer] = n
            else:
                del _OPEN[peer]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's, less the WebSocket upgrade (``ws="none"``), plus the head's size
        # across reads: httptools hands over a header only once it is whole, so one
        # endless header line would otherwise grow in memory unseen
        if self._refused:
            return
        self._unset_keepalive_if_required()
        before = self._phase
        self._began = False
        self._read = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # answered as a plain request, logged sparingly
            _note("unsupported_upgrade", self.client, "served without the upgrade")
            return
        except httptools.HttpParserError as exc:
            if not self._refused:  # uvicorn's 400, in the envelope and logged sparingly
                self._refuse(_raw(400, "Bad Request", InvalidRequest(
                    f"The request is not valid HTTP/1.1: {str(exc)[:100]}.",
                    code="invalid_http")), "invalid_http")
            return
        if self._began:
            return
        phase = self._phase
        if phase == _HEAD:
            # every byte of this read is the head's: it began earlier and is not over
            self._spill += len(data)
            if self._spill > self._max_header_bytes:
                self._refuse(_answers(self._lim).headers_too_large, "headers_too_large")
        elif before == phase == _DONE and (self.cycle is None or self.cycle.response_complete):
            # bytes that begin no request (blank lines, which the parser skips) would
            # otherwise hold an idle connection open for ever: uvicorn's keep-alive
            # timer stops at any byte. The next head's deadline runs from them.
            self._phase = _HEAD
            self._arm()

    def _refuse(self, answer: bytes, kind: str) -> None:
        _note(kind, self.client, "answered and closed")
        # with an answer under way (a pipelined request's), only close
        self._close(answer if self.cycle is None or self.cycle.response_complete else None)

    # -- the parser's callbacks ------------------------------------------------------
    # (each calls uvicorn's by name: ``super()`` would cost 60 ns more, per request)

    def on_message_begin(self) -> None:
        self._began = True
        self._first = self._read
        self._spill = 0
        if self._phase == _DONE:  # a later request: its own deadline, from its first byte
            self._since = self.loop.time()
            if self._timer is None:
                self._timer = self.loop.call_later(self._header_timeout, self._check)
        self._phase = _HEAD
        HttpToolsProtocol.on_message_begin(self)

    def on_headers_complete(self) -> None:
        # Checked once the head is whole, not header by header (1.2 µs a request, more
        # than all the rest): until then it is bounded by the reads it came in, one
        # read (256 KiB at most) and max_header_bytes of further ones (data_received)
        headers = self.headers
        if len(headers) > self._max_headers:
            self._refuse(_answers(self._lim).too_many_headers, "too_many_headers")
            raise _Refused
        most = self._max_header_bytes
        if self._first + self._spill + self._read > most and len(self.url) + sum(
                len(name) + len(value) + 4 for name, value in headers) > most:
            # (only a head that may be that large is measured)
            self._refuse(_answers(self._lim).headers_too_large, "headers_too_large")
            raise _Refused
        self._phase = _BODY
        self._since = self.loop.time()
        HttpToolsProtocol.on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        self._since = self.loop.time()
        HttpToolsProtocol.on_body(self, body)

    def on_message_complete(self) -> None:
        self._phase = _DONE
        if self.cycle.response_complete and self.timeout_keep_alive_task is None:
            # answered before its body ended (a 401, a 413): the body's bytes stopped
            # uvicorn's keep-alive timer, and uvicorn would not start it again
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)
        HttpToolsProtocol.on_message_complete(self)

    # -- the timer -------------------------------------------------------------------

    def _arm(self) -> None:
        """Start a head's deadline now."""
        self._since = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_later(self._header_timeout, self._check)

    def _check(self) -> None:
        """The connection's one timer: armed at its opening (or at a request's first
        byte once it has lapsed), re-armed for whatever deadline is next, dropped past
        a request's body (uvicorn's keep-alive timer watches the idle connection)."""
        self._timer = None
        phase = self._phase
        if phase == _DONE or self.transport.is_closing():
            return
        lim = self._lim
        wait = lim.body_timeout if phase == _BODY else lim.header_timeout
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or (phase == _BODY and cycle is not None
                                     and cycle.waiting_for_100_continue):
            self._since = now  # the gateway is not reading: the client's clock is stopped
        elif now >= self._since + wait:
            self._expire(phase)
            return
        self._timer = self.loop.call_later(self._since + wait - now, self._check)

    def _expire(self, phase: int) -> None:
        cycle = self.cycle
        answers = _answers(self._lim)
        answer = None
        if phase == _BODY:
            _note("body_timeout", self.client, f"no body bytes for {self._lim.body_timeout:g} s")
            if cycle is not None and not cycle.response_started:
                answer = answers.body_timeout
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app sees http.disconnect, sends nothing
                cycle.message_event.set()
        elif phase == _HEAD:
            _note("header_timeout", self.client,
                  f"headers not complete within {self._lim.header_timeout:g} s")
            if cycle is None or cycle.response_complete:
                answer = answers.head_timeout
        # _WAIT: not a byte came, so there is no request to answer (a browser's
        # speculative connection looks the same): closed without a word
        self._close(answer)
