"""Connections to vLLM: a small HTTP/1.1 client built for this one job.

Each upstream origin gets a pool of keep-alive connections. A connection is an asyncio
protocol with httptools' response parser (the same C parser uvicorn uses for requests):
one write sends a request, and the response's body arrives as the parser hands it over,
already de-chunked. It takes a third of the CPU per request of aiohttp's client, which it
replaced (bench/clients.py measures them; docs/stack.md has the figures).
Every failure is translated here, once, into the error a client sees:

- cannot connect (refused, DNS): 503 ``upstream_unavailable``; no connection within the
  connect timeout: 503 ``upstream_connect_timeout``;
- connected, but no answer headers within the first-byte timeout: 504
  ``upstream_first_byte_timeout``; an answer started, then nothing for the idle timeout:
  504 ``upstream_idle_timeout``; past the request's deadline (a model's total timeout):
  504 ``upstream_total_timeout``;
- the connection broke, or the answer is not HTTP: 502 ``upstream_error``.

Their messages go to clients, so they never name the upstream's address (nor its
credentials): "The model server is unreachable (Connection refused)." The address, and
the system's own words (which may name it), stay for the log: the error's ``__cause__``,
which the balancer logs with the replica's URL.

The timeouts are the pool's (``connect_timeout``, ``read_timeout`` for both the first
byte and the gaps) unless a request brings its own ``Timeouts`` (a model's).

A request is written once and never resent from here: whether another try is safe (and
where it should go) is the caller's decision, which knows the fleet.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast
from urllib.parse import SplitResult, urlsplit

import httptools

from ..errors import (
    UpstreamConnectTimeout,
    UpstreamFailed,
    UpstreamFirstByteTimeout,
    UpstreamIdleTimeout,
    UpstreamTimeout,
    UpstreamTotalTimeout,
    UpstreamUnavailable,
)

__all__ = ["Response", "Timeouts", "Upstreams"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """A request's timeouts, in seconds (a model's, its unset ones the gateway's)."""

    connect: float
    first_byte: float  # until the answer's headers
    idle: float  # between two pieces of an answer
    total: float | None = None  # from the first try to the last byte; None: none


_HIGH_WATER = 1 << 20  # stop reading from vLLM while this much is buffered, unread
_Origin = tuple[str, str, int]  # scheme, host (ASCII), port
# origin key, request head up to the Content-Length value, and after it
_Target = tuple[_Origin, bytes, bytes]


class _Connection(asyncio.Protocol):
    """One keep-alive connection, carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.broken: str | None = None  # why the connection can no longer be used
        self.chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self.framed = False  # the answer says where its body ends (length or chunked)
        self.idle_since = 0.0  # loop time it went back to the pool

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"answered with something that is not HTTP ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        if (exc is None and self.headers_done and not self.framed
                and self.broken is None and not self.complete):
            # an answer with neither Content-Length nor chunked encoding: its body ends
            # where the server closes the connection (RFC 9112, 6.3), so this is its end
            self.complete = True
            self.keep_alive = False
            self._wake()
        if self.broken is None and not self.complete:
            self._fail("closed the connection")
        self.broken = self.broken or "closed"

    # -- httptools callbacks -----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in (14, 17) and name.lower() in (b"content-length",
                                                       b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- used by Response --------------------------------------------------------------

    def _fail(self, why: str) -> None:
        self.broken = why
        if self.transport:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, seconds: float) -> None:
        """Until the parser reports progress, or raise TimeoutError after ``seconds``.

        A plain timer on the future, not ``asyncio.timeout``: this runs once per chunk
        of every stream, and it leaves the task's cancellation count alone (the handler
        uses it to tell a client's hang-up from a shutdown)."""
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(seconds, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self._buffered = 0
        if self._paused and self.transport:
            self._paused = False
            self.transport.resume_reading()
        return data

    def reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers_done = self.complete = self.framed = False
        self.chunks.clear()
        self._buffered = 0
        if self._paused and self.transport:
            # the last answer filled the buffer and ended unread (its client left):
            # reading stayed paused, and this request's answer would never arrive
            self._paused = False
            self.transport.resume_reading()


def _where(url: str) -> tuple[SplitResult, _Origin, str]:
    """``url``'s parts, its pool key and its ``Host`` header: the host in IDNA form with
    the port, never a ``user:password@``. URLs are checked where they are stored
    (``urls.check``); this is the last line, a 503 for what got past."""
    bad = UpstreamUnavailable("The model server's address is not a valid http:// or "
                              "https:// URL; an administrator must correct it.")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
        if host and not host.isascii():
            host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise bad from None
    if parts.scheme not in ("http", "https") or not host:
        raise bad
    name = f"[{host}]" if ":" in host else host
    key = (parts.scheme, host, port or (443 if parts.scheme == "https" else 80))
    return parts, key, name + (f":{port}" if port is not None else "")


def _reason(exc: OSError) -> str:
    """The system's reason, in words that never name the address ("Connect call failed
    ('10.0.0.5', 8000)" would): the errno's text, or a lookup's."""
    if isinstance(exc, socket.gaierror):
        return "its host name does not resolve"
    if isinstance(exc, ssl.SSLError):  # its message may name the host a certificate lacks
        return f"TLS: {exc.reason or 'handshake failed'}"  # CERTIFICATE_VERIFY_FAILED...
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)  # Connection refused, Too many open files...
    return "connection failed"


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Response:
    """The answer to one request: ``status``, then ``read()`` or ``iter_chunks()``."""

    def __init__(self, conn: _Connection, first_byte: float, idle: float,
                 deadline: float | None = None) -> None:
        self._conn = conn
        self._first_byte = first_byte
        self._idle = idle
        self._deadline = deadline  # loop time
        # set by the reader when an answer that started well broke (a stream cut, a
        # body that is not JSON): the balancer counts it against the replica
        self.failure: str | None = None

    @property
    def status(self) -> int:
        return self._conn.status

    async def _progress(self) -> None:
        conn = self._conn
        wait = self._idle if conn.headers_done else self._first_byte
        last = False  # this wait ends at the deadline
        if self._deadline is not None:
            left = self._deadline - asyncio.get_running_loop().time()
            if left <= wait:
                wait, last = max(left, 0.0), True
        try:
            await conn.wait(wait)
        except TimeoutError:
            conn.broken = "timed out"
            error: type[UpstreamTimeout]
            if last:
                error, what = UpstreamTotalTimeout, "did not finish within the model's " \
                    "total timeout"
            elif conn.headers_done:
                error, what = UpstreamIdleTimeout, f"sent nothing for {wait:g} s"
            else:
                error, what = UpstreamFirstByteTimeout, f"sent nothing for {wait:g} s"
            raise error(f"The model server {what}.") from None
        if conn.broken and not conn.complete:
            raise UpstreamFailed(f"The model server {conn.broken}.")

    async def read(self) -> bytes:
        parts = []
        async for chunk in self.iter_chunks():
            parts.append(chunk)
        return b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body, piece by piece, as it arrives."""
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                return
            else:
                await self._progress()


class Upstreams:
    """A pool of keep-alive connections per upstream origin."""

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, max_connections: int,
        max_idle: float = 4.0,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle  # seconds a pooled connection may wait unused (0: any)
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._limits: dict[_Origin, asyncio.Semaphore] = {}
        self._tls_context: ssl.SSLContext | None = None
        self._max = max_connections
        self.opened = 0  # connections opened since start (the benchmark reads it)
        self._targets: dict[tuple[str, str | None], _Target] = {}

    def _tls(self) -> ssl.SSLContext:
        # The system's CAs (or SSL_CERT_FILE's), hostname checked: an https upstream
        # must prove who it is before it sees an upstream API key.
        if self._tls_context is None:
            self._tls_context = ssl.create_default_context()
        return self._tls_context

    async def _connect(self, key: _Origin, *, count: bool = True,
                       seconds: float | None = None) -> _Connection:
        scheme, host, port = key
        tls = self._tls() if scheme == "https" else None
        loop = asyncio.get_running_loop()
        limit = self._connect_timeout if seconds is None else seconds
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), host, port, ssl=tls,
                    server_hostname=host if tls else None)
        except TimeoutError as exc:
            raise UpstreamConnectTimeout(
                f"The model server did not accept a connection within {limit:g} s."
            ) from exc
        except OSError as exc:
            raise UpstreamUnavailable(
                f"The model server is unreachable ({_reason(exc)}).") from exc
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if count:
            self.opened += 1
        return conn

    def _acquire_idle(self, key: _Origin) -> _Connection | None:
        """The most recently used live connection; those the server closed, or idle for
        longer than ``max_idle`` (the oldest, at the bottom of the stack), are closed."""
        idle = self._idle.get(key)
        if not idle:
            return None
        if self._max_idle:
            oldest = asyncio.get_running_loop().time() - self._max_idle
            if idle[0].idle_since < oldest:
                stale = [c for c in idle if c.idle_since < oldest]
                idle[:] = [c for c in idle if c.idle_since >= oldest]
                for conn in stale:
                    conn.broken = "idle too long"
                    if conn.transport is not None:
                        conn.transport.close()
        while idle:
            conn = idle.pop()
            if conn.broken is None and conn.transport and not conn.transport.is_closing():
                return conn
        return None

    def _target(self, url: str, api_key: str | None) -> _Target:
        """Where ``url`` leads and the request head for it, worked out once per URL."""
        parts, key, host = _where(url)
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        target = (
            key,
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nContent-Length: ".encode("latin-1"),
            f"\r\n{auth}\r\n".encode("latin-1"),
        )  # fmt: skip
        if len(self._targets) >= 1024:  # URLs come from the model table: a few in practice
            self._targets.clear()
        self._targets[(url, api_key)] = target
        return target

    @asynccontextmanager
    async def post(self, url: str, body: bytes, api_key: str | None,
                   timeouts: Timeouts | None = None, deadline: float | None = None,
                   headers: bytes = b"") -> AsyncIterator[Response]:
        """POST ``body`` to ``url``. Leaving the block returns the connection to the pool
        if its answer was read to the end, else closes it, which is how vLLM learns that
        a client went away (it then aborts the generation). ``deadline`` (loop time)
        bounds the whole answer: a model's total timeout. ``headers``: more header
        lines, each ending in CRLF (``traceparent``)."""
        target = self._targets.get((url, api_key)) or self._target(url, api_key)
        key, head_start, head_end = target
        head = (b"%s%d%s" % (head_start, len(body), head_end) if not headers else
                b"%s%d\r\n%s%s" % (head_start, len(body), headers, head_end[2:]))
        limit = self._limits.get(key)
        if limit is None and self._max:
            limit = self._limits[key] = asyncio.Semaphore(self._max)
        if limit is not None:
            await limit.acquire()
        conn: _Connection | None = None
        try:
            # Never sent twice: once the request is written, vLLM may be generating it
            # (it sends a non-streaming answer's headers only when generation ends), so
            # a connection that breaks after the write is a failure for the caller to
            # judge, not a retry here. A pooled connection the server closed is found
            # before the write (``_acquire_idle``), and one idle for longer than
            # ``max_idle`` is not used at all, which keeps clear of the server's own
            # keep-alive timeout (vLLM's uvicorn: 5 s) racing the write.
            conn = self._acquire_idle(key) or await self._connect(
                key, seconds=timeouts.connect if timeouts else None)
            conn.reset()
            assert conn.transport is not None
            conn.transport.write(head + body)
            response = Response(
                conn, timeouts.first_byte if timeouts else self._read_timeout,
                timeouts.idle if timeouts else self._read_timeout, deadline)
            while not conn.headers_done:
                await response._progress()
            yield response
        finally:
            if conn is not None:
                if conn.complete and conn.keep_alive and conn.broken is None:
                    conn.idle_since = asyncio.get_running_loop().time()
                    self._idle.setdefault(key, []).append(conn)
                elif conn.transport is not None:
                    conn.broken = conn.broken or "released early"
                    conn.transport.close()
            if limit is not None:
                limit.release()

    async def get(self, url: str, seconds: float, max_bytes: int = 4 << 20
                  ) -> tuple[int, bytes]:
        """GET ``url`` on a connection of its own, closed after: (status, body). For
        the health checks (``/health``, ``/metrics``), kept out of the request pool
        and out of ``opened``. Raises the usual errors, ``UpstreamTimeout`` after
        ``seconds`` in all."""
        parts, key, host = _where(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(seconds):
                conn = await self._connect(key, count=False)
                assert conn.transport is not None
                conn.transport.write(f"GET {path or '/'} HTTP/1.1\r\nHost: {host}"
                                     "\r\nConnection: close\r\n\r\n".encode("latin-1"))
                response = Response(conn, seconds, seconds)
                parts_read: list[bytes] = []
                size = 0
                async for chunk in response.iter_chunks():
                    parts_read.append(chunk)
                    size += len(chunk)
                    if size > max_bytes:
                        raise UpstreamFailed(f"The model server answered more than "
                                             f"{max_bytes} bytes.")
                return conn.status, b"".join(parts_read)
        except TimeoutError:
            raise UpstreamTimeout(f"The model server did not answer within {seconds:g} s."
                                  ) from None
        finally:
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing

