"""Starting and stopping `paragate serve` as a real process, on a free port, by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from . import logcapture

__all__ = ["GatewayProcess", "TcpProxy", "free_port", "start_gateway"]


LOGS: list[Path] = []  # every gateway process's log, for the end-of-run secret check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path

    def stop(self) -> int:
        """SIGTERM, as an orchestrator would; SIGKILL if it has not left in 15 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_gateway(log_dir: Path, database_url: str, **settings: str) -> GatewayProcess:
    """``paragate serve`` on a free port, its journal in ``log_dir``, its stdout and
    stderr in the run's logs (``GatewayProcess.log``, tests/logcapture.py)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}
    env.update({"PARAGATE_DATABASE_URL": database_url, "PARAGATE_REFRESH_INTERVAL": "0.2",
                "PARAGATE_USAGE_FLUSH_INTERVAL": "0.1", "PARAGATE_SHUTDOWN_DELAY": "0",
                "PARAGATE_JOURNAL_DIR": str(log_dir / f"journal-{port}"), **settings})
    log = logcapture.new_log(f"gateway-{port}")  # with the run's other logs, scanned
    LOGS.append(log)
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "paragate", "serve", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    gateway = GatewayProcess(f"http://127.0.0.1:{port}", process, env, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text()}")
        try:
            if httpx.get(gateway.url + "/health", timeout=1).status_code == 200:
                return gateway
        except httpx.TransportError:
            time.sleep(0.05)
    gateway.stop()
    raise RuntimeError(f"gateway did not start: {log.read_text()}")



class TcpProxy:
    """A TCP proxy the test owns, in a thread of its own: ``down()`` cuts every
    connection and refuses new ones (an outage of what is behind it, without stopping a
    server other tests share); ``up()`` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # lose_answer_after(): the next client message holding these bytes is delivered,
        # then every connection is cut before the server's answer gets back
        self.drop_after: bytes | None = None
        self.dropped = 0
        # time.monotonic() of each connection its client ended (FIN or reset)
        self.client_closed: list[float] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.up()

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    outbound: bool = False) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
                if outbound and self.drop_after is not None and self.drop_after in data:
                    # the server gets the request (a COMMIT, say) and acts on it; its
                    # answer never reaches the client
                    self.drop_after, self.dropped = None, self.dropped + 1
                    await asyncio.sleep(0.3)
                    self._loop.create_task(self._cut_connections())
                    return
            if outbound:
                self.client_closed.append(time.monotonic())
        except OSError:
            if outbound:
                self.client_closed.append(time.monotonic())
        finally:
            writer.close()

    async def _cut_connections(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pair = {writer, up_writer}
        self._writers |= pair
        await asyncio.gather(self._pipe(reader, up_writer, outbound=True),
                             self._pipe(up_reader, writer))
        self._writers -= pair

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def lose_answer_after(self, marker: bytes) -> None:
        self.drop_after = marker

    def up(self) -> None:
        self._call(self._listen())

    def down(self) -> None:
        self._call(self._cut())

    def close(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
