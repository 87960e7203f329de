"""What the transport's limits cost (paragate/transport.py): prints figures, asserts nothing.

    .venv/bin/python bench/transport.py

uvicorn's ``HttpToolsProtocol`` and paragate's ``GuardedProtocol`` side by side, fed the
same bytes on uvloop through a fake transport, with an ASGI app that answers at once: the
difference is what the limits add. Per request on one kept-alive connection: a GET with
the headers an SDK sends, and a POST whose 4 KiB body comes in a read of its own; per
connection: opened, one GET, closed; and what uvicorn spends writing one more answer
header (``nosniff``, now on every answer). Then the app itself: an answer to a browser's request
with CORS on (an allowed origin) against the same with CORS off. The two sides take
turns, one step each (a request, a connection), 100,000 times: the medians of each
side's steps and of the differences, in µs (on a shared machine a neighbour's load then
shifts both sides alike, and a preempted step does not move a median).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from paragate.transport import GuardedProtocol, Limits

N = 100_000
WARM = 2_000
HEAD = (b"Host: gateway\r\nAuthorization: Bearer pg-0123456789ab-secret\r\n"
        b"User-Agent: OpenAI/Python 1.99.0\r\nAccept: application/json\r\n"
        b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
        b"X-Stainless-Lang: python\r\nX-Stainless-Os: Linux\r\n")
GET = b"GET /api/v2/models HTTP/1.1\r\n" + HEAD + b"\r\n"
BODY = b"x" * 4096
POST = (b"POST /api/v2/completions HTTP/1.1\r\n" + HEAD
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY))


class _Transport:
    def __init__(self) -> None:
        self.closing = False

    def get_extra_info(self, name: str) -> Any:
        return {"peername": ("192.0.2.7", 40000), "sockname": ("192.0.2.1", 8080)}.get(name)

    def write(self, data: bytes) -> None: ...

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"2")]
_NOSNIFF = [*_HEADERS, (b"x-content-type-options", b"nosniff")]


async def _app(scope: Any, receive: Any, send: Any) -> None:
    if scope["method"] == "POST":
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": b"{}"})


async def _app_nosniff(scope: Any, receive: Any, send: Any) -> None:  # the same, but
    await send({"type": "http.response.start", "status": 200, "headers": _NOSNIFF})
    await send({"type": "http.response.body", "body": b"{}"})


class _Guarded(GuardedProtocol):
    limits = Limits()  # the defaults, rather than the environment's


def _protocol(cls: type[HttpToolsProtocol], app: Any = _app) -> HttpToolsProtocol:
    config = Config(app, lifespan="off", log_config=None, proxy_headers=False)
    return cls(config=config, server_state=ServerState(), app_state={})


Step = Callable[[], Awaitable[None]]


def _requests(cls: type[HttpToolsProtocol], reads: list[bytes], app: Any = _app) -> Step:
    """One request on a connection kept alive."""
    proto = _protocol(cls, app)
    proto.connection_made(_Transport())  # type: ignore[arg-type]

    async def step() -> None:
        for data in reads:
            proto.data_received(data)
        await asyncio.sleep(0)  # the request's task runs to its end
    return step


def _connections(cls: type[HttpToolsProtocol]) -> Step:
    """A connection: opened, one GET, closed."""
    config = Config(_app, lifespan="off", log_config=None, proxy_headers=False)
    state = ServerState()

    async def step() -> None:
        proto = cls(config=config, server_state=state, app_state={})
        proto.connection_made(_Transport())  # type: ignore[arg-type]
        proto.data_received(GET)
        await asyncio.sleep(0)
        proto.connection_lost(None)
    return step


async def _apps(stack: contextlib.AsyncExitStack) -> tuple[Step, Step]:
    """App answering GET /health with an allowed Origin: CORS off, CORS on."""
    from paragate.app import App
    from paragate.config import Settings
    from paragate.gateway import Gateway

    scope = {"type": "http", "method": "GET", "path": "/health", "query_string": b"",
             "headers": [(b"host", b"gateway"), (b"origin", b"https://app.example.com")]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None: ...

    tmp = stack.enter_context(tempfile.TemporaryDirectory())
    steps = []
    for cors in ("", "https://app.example.com"):
        gw = Gateway.build(Settings(database_url=f"sqlite:///{tmp}/b.db", journal_dir=tmp,
                                    access_log=False, metrics=False, cors_origins=cors))
        gw.store.migrate()
        await gw.start()
        stack.push_async_callback(gw.stop)
        app = App(gw)
        steps.append(lambda app=app: app(scope, receive, send))
    return steps[0], steps[1]


async def _duel(a: Step, b: Step) -> tuple[float, float, float]:
    """Median µs of ``a``, of ``b``, and of their difference, one step of each in turn
    (the order alternating), after a warm-up."""
    clock = time.perf_counter_ns
    times: tuple[list[int], list[int]] = ([], [])
    for i in range(WARM + N):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        t0 = clock()
        await first()
        t1 = clock()
        await second()
        t2 = clock()
        if i >= WARM:
            times[i % 2].append(t1 - t0)
            times[1 - i % 2].append(t2 - t1)
    ta, tb = times
    return (statistics.median(ta) / 1000, statistics.median(tb) / 1000,
            statistics.median(y - x for x, y in zip(ta, tb, strict=True)) / 1000)


async def _main() -> None:
    print(f"python {sys.version.split()[0]}, uvloop {uvloop.__version__}, "
          f"load {os.getloadavg()[0]:.2f}; medians of {N:,} steps of each side, in turns")
    rows = [
        ("uvicorn", "paragate", "per request: GET, 8 headers",
         _requests(HttpToolsProtocol, [GET]), _requests(_Guarded, [GET])),
        ("uvicorn", "paragate", "per request: POST, a 4 KiB body",
         _requests(HttpToolsProtocol, [POST, BODY]), _requests(_Guarded, [POST, BODY])),
        ("uvicorn", "paragate", "per connection: opened, one GET, closed",
         _connections(HttpToolsProtocol), _connections(_Guarded)),
        ("2 headers", "3", "uvicorn writes nosniff too (asgi.identity)",
         _requests(HttpToolsProtocol, [GET]), _requests(HttpToolsProtocol, [GET], _app_nosniff)),
    ]
    async with contextlib.AsyncExitStack() as stack:
        off, on = await _apps(stack)
        rows.append(("CORS off", "CORS on", "app: GET /health with an allowed Origin", off, on))
        heading = None
        for left, right, name, a, b in rows:
            if heading != (left, right):
                heading = (left, right)
                print(f"{'µs':48s} {left:>9s} {right:>9s} {'added':>7s}")
            ta, tb, added = await _duel(a, b)
            print(f"  {name:46s} {ta:9.2f} {tb:9.2f} {added:7.2f}")


def main() -> int:
    uvloop.run(_main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
