"""A small asyncio Redis client (RESP2) for the request path.

Limits that hold across gateways cost a Redis round trip per request, on the request
path. redis-py's asyncio client spends tens of microseconds of Python on each call (its
connection pool, its stream-reader parser, its command and response machinery), which is
more than the round trip itself on a local network. This client is an asyncio protocol,
like the vLLM client in ``upstream/pool.py``: one connection per client, each command
written at once (pipelining, many callers sharing the connection) and each reply handed
to its caller in the order the commands went out (a deque of futures).

Failures reach callers as two exceptions:

- ``RedisUnavailable``: no answer to be had. Cannot connect (refused, reset, no
  connection within ``connect_timeout``), the connection broke, or no reply within
  ``timeout``. A missing reply leaves the queue of waiting callers out of step with
  the stream, so the connection is closed and every caller on it fails. A failed
  connect (or a refused AUTH/SELECT) also marks Redis down for ``retry_interval``
  seconds, during which calls fail at once without trying: under an outage a request
  loses no time to Redis. The first call after that connects again.
- ``RedisReplyError``: Redis answered with an error reply; its message is Redis's.

A command is written once and never resent from here: whether another try is safe is
the caller's decision.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, cast
from urllib.parse import unquote, urlsplit

__all__ = [
    "Arg",
    "RedisClient",
    "RedisReplyError",
    "RedisURL",
    "RedisUnavailable",
    "Reply",
    "RespParser",
    "Script",
    "encode_args",
]


class RedisUnavailable(Exception):
    """Redis cannot answer now: no connection, a broken one, no reply in time, or still
    in back-off after a failure."""


class RedisReplyError(Exception):
    """Redis answered with an error reply (``-ERR ...``); the message is Redis's."""

    @property
    def code(self) -> str:
        """The error's first word: ``ERR``, ``WRONGTYPE``, ``NOSCRIPT``..."""
        return str(self).split(" ", 1)[0]


Arg: TypeAlias = bytes | str | int | float
# Simple strings are str ("OK", "PONG"), bulk strings bytes, nil None. An error inside an
# array (a script's table, EXEC) is a RedisReplyError in its place; one at the top is
# raised by ``execute``.
Reply: TypeAlias = "int | str | bytes | list[Reply | RedisReplyError] | None"
_Result: TypeAlias = "Reply | RedisReplyError"


class Script:
    """A Lua script and its SHA1 (hex), computed once, for ``RedisClient.evalsha``."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return f"Script(sha={self.sha!r})"


@dataclass(frozen=True, slots=True)
class RedisURL:
    """Where Redis is: ``redis[s]://[[user]:password@]host[:port][/db]``."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """The parts of ``url``; ValueError (never quoting a password) if it is not one."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"A Redis URL starts with redis:// or rediss://, not "
                             f"{parts.scheme or '(none)'}://.")
        path = parts.path.strip("/")
        try:
            port = parts.port
            db = int(path) if path else 0
        except ValueError:
            raise ValueError("A Redis URL's port and database are numbers "
                             "(redis://host:6379/0).") from None
        if db < 0:
            raise ValueError("A Redis URL's database number is 0 or more.")
        return cls(host=parts.hostname or "127.0.0.1", port=port or 6379, db=db,
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password else None,
                   tls=parts.scheme == "rediss")


# -- encoding and parsing ------------------------------------------------------------------


def _encode(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is bytes:
            data = arg
        elif type(arg) is str:
            data = arg.encode()
        elif type(arg) is int:
            data = b"%d" % arg
        else:
            data = _encode_other(arg)
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def encode_args(args: Sequence[Arg]) -> bytes:
    """``args`` as bulk strings, without the array header: a fixed part of a command,
    encoded once and sent many times (``evalsha_encoded``)."""
    return _encode(args).split(b"\r\n", 1)[1]


def _encode_other(arg: object) -> bytes:
    if isinstance(arg, bool):  # True would go out as "1": a bug more often than not
        raise TypeError("A Redis command argument cannot be a bool.")
    if isinstance(arg, float):
        return repr(arg).encode()  # shortest exact form; Redis reads "inf", "1e+16"
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, bytes | bytearray | memoryview):
        return bytes(arg)
    if isinstance(arg, str):
        return arg.encode()
    raise TypeError(f"A Redis command argument is bytes, str, int or float, not "
                    f"{type(arg).__name__}.")


class _Incomplete(Exception):
    """The buffer ends inside a reply; ``need``: the length worth parsing again at."""

    def __init__(self, need: int) -> None:
        self.need = need


def _parse(buf: bytes, pos: int) -> tuple[_Result, int]:
    """The reply starting at ``buf[pos]`` and where the next one starts."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete(len(buf) + 1)
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        start = end + 2
        stop = start + int(buf[pos + 1:end])
        if stop < start:  # $-1: nil
            return None, start
        if stop + 2 > len(buf):
            raise _Incomplete(stop + 2)
        return buf[start:stop], stop + 2
    if kind == 58:  # : integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 43:  # + simple string
        return buf[pos + 1:end].decode(errors="replace"), end + 2
    if kind == 42:  # * array
        count = int(buf[pos + 1:end])
        pos = end + 2
        if count < 0:  # *-1: nil
            return None, pos
        items: list[_Result] = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 45:  # - error
        return RedisReplyError(buf[pos + 1:end].decode(errors="replace")), end + 2
    raise ValueError(f"not a RESP2 reply (starts with {bytes([kind])!r})")


class RespParser:
    """An incremental RESP2 parser: ``feed`` it what the socket read, in any pieces, and
    it returns the replies completed so far, in order."""

    __slots__ = ("_chunks", "_need", "_size")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []  # the start of an incomplete reply, in pieces
        self._size = 0  # their length
        self._need = 0  # the length at which parsing it again is worth a try

    def feed(self, data: bytes) -> list[_Result]:
        """Replies completed by ``data``; ValueError if the stream is not RESP2."""
        if self._chunks:
            self._chunks.append(data)
            self._size += len(data)
            if self._size < self._need:  # a large bulk string arriving: wait for it all
                return []
            data = b"".join(self._chunks)
            self._chunks = []
        replies: list[_Result] = []
        pos = 0
        size = len(data)
        try:
            while pos < size:
                reply, pos = _parse(data, pos)
                replies.append(reply)
        except _Incomplete as exc:  # pos: where the incomplete reply starts
            rest = data[pos:]
            self._chunks = [rest]
            self._size = len(rest)
            self._need = exc.need - pos
        except RecursionError:
            raise ValueError("a RESP2 reply nested too deep") from None
        return replies


# -- the connection ------------------------------------------------------------------------

_Waiter: TypeAlias = "asyncio.Future[_Result] | None"  # None: an AUTH or SELECT reply


class _Connection(asyncio.Protocol):
    """One connection; replies go to the waiting futures in the order of the commands."""

    transport: asyncio.Transport

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, where: str,
                 refused: Callable[[str], None]) -> None:
        self._loop = loop
        self._timeout = timeout
        self._where = where  # "Redis at host:port", for messages
        self._refused = refused  # told when AUTH or SELECT fails, or a reply is late
        self._parser = RespParser()
        # a waiter and the loop time its reply is due by, per command written
        self.pending: deque[tuple[_Waiter, float]] = deque()
        self.closed = False  # takes no more commands
        self.lost: asyncio.Future[None] = loop.create_future()
        # One timer for the oldest unanswered command, not one per command: replies come
        # in order, so when the oldest is on time so far, so are the rest.
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ValueError as exc:
            self._fail(f"{self._where} sent something that is not RESP2 ({exc}).")
            return
        pending = self.pending
        for reply in replies:
            if not pending:
                self._fail(f"{self._where} sent a reply to no command.")
                return
            waiter = pending.popleft()[0]
            if waiter is None:  # AUTH or SELECT, sent on connecting
                if isinstance(reply, RedisReplyError):
                    why = f"refused the connection's AUTH or SELECT: {reply}"
                    self._refused(why)
                    self._fail(f"{self._where} {why}")  # before a reply that came after
                    return
            elif not waiter.done():  # else its caller was cancelled, and left
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed or self.pending:
            why = f" ({exc})" if exc else ""
            self._fail(f"{self._where} closed the connection{why}.", abort=False)
        if not self.lost.done():
            self.lost.set_result(None)

    # -- used by the client ----------------------------------------------------------------

    def call(self, data: bytes) -> asyncio.Future[_Result]:
        """Write one command; the future gets its reply."""
        waiter = self._loop.create_future()
        due = self._loop.time() + self._timeout
        self.pending.append((waiter, due))
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._watch)
        self.transport.write(data)
        return waiter

    def call_many(self, data: bytes, count: int) -> list[asyncio.Future[_Result]]:
        """Write ``count`` commands at once; a future per reply."""
        create = self._loop.create_future
        waiters = [create() for _ in range(count)]
        due = self._loop.time() + self._timeout
        self.pending.extend([(waiter, due) for waiter in waiters])
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._watch)
        self.transport.write(data)
        return waiters

    def set_up(self, data: bytes, count: int) -> None:
        """Write AUTH and SELECT; a failure fails the connection and what follows."""
        due = self._loop.time() + self._timeout
        self.pending.extend([(None, due)] * count)
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._watch)
        self.transport.write(data)

    def close(self, why: str) -> None:
        self._fail(why, abort=False)
        self.transport.close()

    def _watch(self) -> None:
        self._timer = None
        if self.closed or not self.pending:
            return  # the next command arms it again
        due = self.pending[0][1]
        if self._loop.time() >= due - 0.001:  # timers may fire a hair early (uvloop: ms)
            why = f"sent no reply within {self._timeout:g} s"
            # a stalled server that still accepts connections: back off like a refused
            # one, or every call would wait the whole timeout again
            self._refused(why)
            self._fail(f"{self._where} {why}.")
        else:
            self._timer = self._loop.call_at(due, self._watch)

    def _fail(self, why: str, *, abort: bool = True) -> None:
        """No more commands; every waiting caller gets RedisUnavailable(``why``)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self.pending = self.pending, deque()
        for waiter, _ in pending:
            if waiter is not None and not waiter.done():
                # one exception each: a shared one would collect every caller's traceback
                waiter.set_exception(RedisUnavailable(why))
        if abort:
            self.transport.abort()


# -- the client ----------------------------------------------------------------------------


class RedisClient:
    """A Redis client on one multiplexed connection, opened on first use and again after
    a failure (not before ``retry_interval`` has passed after a failed connect)."""

    def __init__(self, url: str, *, timeout: float = 0.25, connect_timeout: float = 0.5,
                 retry_interval: float = 1.0) -> None:
        self.url = RedisURL.parse(url)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._retry_interval = retry_interval
        self._where = f"Redis at {self.url.host}:{self.url.port}"
        self._tls = ssl.create_default_context() if self.url.tls else None
        setup: list[tuple[Arg, ...]] = []
        if self.url.password is not None:
            setup.append(("AUTH", self.url.password) if self.url.username is None
                         else ("AUTH", self.url.username, self.url.password))
        if self.url.db:
            setup.append(("SELECT", self.url.db))
        self._setup = b"".join(map(_encode, setup)), len(setup)
        self._setup_proven = not setup  # AUTH and SELECT have succeeded once
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()  # one connect at a time; the others wait for it
        self._down_until = 0.0  # loop time; before it, calls fail without trying
        self._down_why = ""
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisClient({self.url!r})"

    @property
    def connected(self) -> bool:
        """Whether a connection is open and usable now."""
        conn = self._conn
        return conn is not None and not conn.closed

    async def execute(self, *args: Arg) -> Reply:
        """Send one command, return its reply; an error reply is raised as
        RedisReplyError. Example: ``await client.execute("INCRBY", key, 5)``."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
        reply = await conn.call(_encode(args))
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[tuple[Arg, ...]]
                       ) -> list[Reply | RedisReplyError]:
        """Send several commands in one write; their replies in order, an error reply as
        a RedisReplyError in its place (not raised). RedisUnavailable fails them all."""
        if not commands:
            return []
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
        waiters = conn.call_many(b"".join(map(_encode, commands)), len(commands))
        try:
            await waiters[-1]  # replies come in order: the last one done, all are
        except BaseException:
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()  # its reply, when it comes, goes nowhere
                elif not waiter.cancelled():
                    waiter.exception()  # seen: no "exception never retrieved"
            raise
        return [waiter.result() for waiter in waiters]

    async def evalsha(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]
                      ) -> Reply:
        """Run ``script`` by its SHA1; the first time on a server (``NOSCRIPT``) by its
        source, which loads it there, so the calls after it go by SHA1 again."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # EVAL caches the script on the server: from now on EVALSHA finds it (until the
        # server restarts or its scripts are flushed, and then this runs again).
        return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def evalsha_encoded(self, script: Script, numkeys: int, count: int, body: bytes
                              ) -> Reply:
        """``evalsha`` with its keys and arguments already encoded: ``body`` holds
        ``count`` bulk strings (``encode_args``), the first ``numkeys`` of them keys. For
        the request path, where encoding the same keys again each time is most of the
        client's cost. An error reply is raised."""
        data = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%d\r\n%s" % (
            count + 3, script.sha.encode(), len(str(numkeys)), numkeys, body)
        for _ in range(2):
            conn = self._conn
            if conn is None or conn.closed:
                conn = await self._connect()
            reply = await conn.call(data)
            if not isinstance(reply, RedisReplyError):
                return reply
            if not str(reply).startswith("NOSCRIPT"):
                raise reply
            await self.execute("SCRIPT", "LOAD", script.source)  # then once more by SHA1
        raise RedisReplyError(f"NOSCRIPT: {script!r} could not be loaded")

    async def close(self) -> None:
        """Close the connection; waiting callers and any later call get RedisUnavailable."""
        self._closed = True
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.close(f"The client for {self._where} was closed.")
            try:
                async with asyncio.timeout(1.0):
                    await asyncio.shield(conn.lost)
            except TimeoutError:
                conn.transport.abort()

    # -- connecting ------------------------------------------------------------------------

    def _down(self) -> RedisUnavailable:
        left = self._down_until - asyncio.get_running_loop().time()
        return RedisUnavailable(f"{self._where} is down ({self._down_why}); the next try "
                                f"is in {left:.2f} s.")

    def _mark_down(self, why: str) -> RedisUnavailable:
        self._down_until = asyncio.get_running_loop().time() + self._retry_interval
        self._down_why = why
        return RedisUnavailable(f"{self._where} {why}; no new try for "
                                f"{self._retry_interval:g} s.")

    def _refused(self, why: str) -> None:
        self._mark_down(why)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until and not self._closed:
            raise self._down()
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn  # another caller connected while this one waited
            if self._closed:
                raise RedisUnavailable(f"The client for {self._where} is closed.")
            if loop.time() < self._down_until:
                raise self._down()  # another caller's try failed while this one waited
            url = self.url
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, self._timeout, self._where, self._refused),
                        url.host, url.port, ssl=self._tls,
                        server_hostname=url.host if self._tls else None)
            except TimeoutError as exc:
                raise self._mark_down(f"did not accept a connection within "
                                      f"{self._connect_timeout:g} s") from exc
            except OSError as exc:  # refused, reset, DNS, TLS
                why = exc.strerror or str(exc) or type(exc).__name__
                raise self._mark_down(f"is unreachable ({why})") from exc
            sock = conn.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data, count = self._setup
            if count:
                conn.set_up(data, count)
                if not self._setup_proven:
                    # The first time, wait for AUTH and SELECT to succeed: a SELECT of a
                    # database out of range would leave the first command running in
                    # database 0. Later connections send them ahead of the first command.
                    try:
                        await conn.call(_encode(("PING",)))  # raises if either failed
                    except BaseException:
                        conn.close(f"{self._where}: connecting was given up.")
                        raise
                    self._setup_proven = True
            self._conn = conn
            return conn
