"""Starting and stopping `paragate serve` as a real process, on a free port, by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["GatewayProcess", "free_port", "start_gateway"]


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
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}
    env.update({"PARAGATE_DATABASE_URL": database_url, "PARAGATE_REFRESH_INTERVAL": "0.2",
                "PARAGATE_USAGE_FLUSH_INTERVAL": "0.1", **settings})
    log = log_dir / f"gateway-{port}.log"
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
