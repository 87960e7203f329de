"""Connections to vLLM: one pooled keep-alive aiohttp session per upstream origin, and
the single place where aiohttp's failures become paragate errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import aiohttp

from .errors import GatewayError, UpstreamFailed, UpstreamTimeout, UpstreamUnavailable

__all__ = ["Upstreams", "translate"]


def translate(exc: BaseException, url: str) -> GatewayError:
    """Map an aiohttp/asyncio failure talking to ``url`` to the error a client sees.

    Connect failures (refused, DNS, connect timeout) mean vLLM is unreachable: 503.
    A read timeout means it is there but silent for too long: 504. Anything else
    (reset, malformed response) is a bad gateway: 502.
    """
    where = _origin(url)
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return UpstreamUnavailable(f"The model server at {where} is unreachable.")
    if isinstance(exc, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout(f"The model server at {where} did not answer in time.")
    return UpstreamFailed(f"The model server at {where} failed: {type(exc).__name__}.")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class Upstreams:
    """Pooled sessions, created on first use and closed at shutdown."""

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, max_connections: int
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._max_connections = max_connections
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def session(self, url: str) -> aiohttp.ClientSession:
        origin = _origin(url)
        session = self._sessions.get(origin)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                ttl_dns_cache=300,
                enable_cleanup_closed=False,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                skip_auto_headers=("User-Agent",),
                auto_decompress=False,
            )
            self._sessions[origin] = session
        return session

    @asynccontextmanager
    async def post(
        self, url: str, body: bytes, api_key: str | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST ``body`` to ``url``. On leaving the block the connection goes back to the
        pool if the body was read to its end, else it is closed, which is how vLLM learns
        that a client went away (it then aborts the generation)."""
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        try:
            response = await self.session(url).post(url, data=body, headers=headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise translate(exc, url) from exc
        try:
            yield response
        finally:
            response.release()

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()
