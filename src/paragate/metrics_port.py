"""``/metrics`` on a port of its own (``PARAGATE_METRICS_PORT``), without a key: a
listener bound to ``PARAGATE_METRICS_HOST`` (127.0.0.1 by default) that answers
``GET /metrics`` and nothing else, one request a connection. With several workers each
binds the port (``SO_REUSEPORT``); any of them answers for all (``metrics.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .metrics import CONTENT_TYPE

__all__ = ["MetricsPort"]

log = logging.getLogger("paragate.metrics")

_HEAD_LIMIT = 8192


class MetricsPort:
    def __init__(self, render: Callable[[], bytes]) -> None:
        self._render = render
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, shared: bool) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, reuse_port=shared or None, limit=_HEAD_LIMIT)
        log.info("metrics served without a key at http://%s:%d/metrics", host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                method, _, rest = head.partition(b" ")
                path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
                if method not in (b"GET", b"HEAD"):
                    status, body, kind = b"405 Method Not Allowed", b"use GET\n", b"text/plain"
                elif path != b"/metrics":
                    status, body, kind = b"404 Not Found", b"only /metrics\n", b"text/plain"
                else:
                    status, body, kind = b"200 OK", self._render(), CONTENT_TYPE
                writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (
                                 status, kind, len(body), b"" if method == b"HEAD" else body))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:  # pragma: no cover - a bug: say so, keep serving
            log.exception("the metrics listener failed on a request")
        finally:
            writer.close()
