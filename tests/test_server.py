"""The gateway as a real process (`paragate serve`), called with the official `openai`
SDK and raw HTTP, in front of the fake vLLM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from paragate.store import Store

from .conftest import Keys, seed
from .fake_vllm import FakeVLLM
from .servers import GatewayProcess, start_gateway


@dataclass
class Server:
    url: str
    gateway: GatewayProcess
    store: Store
    keys: Keys

    @property
    def env(self) -> dict[str, str]:
        return self.gateway.env


def start_server(tmp_path: Path, store: Store, keys: Keys, **settings: str) -> Server:
    gateway = start_gateway(tmp_path, store.url.render_as_string(hide_password=False),
                            **settings)
    return Server(gateway.url, gateway, store, keys)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    s.migrate()
    yield s
    s.close()


@pytest.fixture
async def server(tmp_path: Path, sqlite_store: Store,
                 fake: FakeVLLM) -> AsyncIterator[Server]:
    keys = seed(sqlite_store, fake)
    srv = await asyncio.to_thread(start_server, tmp_path, sqlite_store, keys)
    yield srv
    await asyncio.to_thread(srv.gateway.stop)


def sdk(server: Server, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/api/v2",
                              api_key=key or server.keys.full, max_retries=0)


async def test_openai_sdk_completion_and_stream(server: Server) -> None:
    async with sdk(server) as client:
        done = await client.completions.create(model="alfred-4.2", prompt="Hello, ",
                                               max_tokens=4)
        assert done.model == "alfred-4.2"
        assert done.choices[0].text == " tok" * 4
        assert done.usage is not None and done.usage.completion_tokens == 4

        stream = await client.completions.create(model="alfred-4.2", prompt="Hello, ",
                                                 max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True})
        texts, usage = [], None
        async for chunk in stream:
            texts += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(texts) == " t0 t1 t2 t3 t4"
        assert usage is not None and usage.total_tokens == 8

        models = await client.models.list()
        assert "alfred-4.2" in [m.id for m in models.data]


async def test_openai_sdk_errors(server: Server) -> None:
    async with sdk(server) as client:
        with pytest.raises(openai.NotFoundError) as nf:
            await client.completions.create(model="nope", prompt="x")
        assert nf.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model="alfred-4.2", prompt="x", temperature=5)
        assert bad.value.code == "invalid_value" and bad.value.param == "temperature"
    async with sdk(server, key="pg-000000000000-nope") as client:
        with pytest.raises(openai.AuthenticationError) as unauth:
            await client.completions.create(model="alfred-4.2", prompt="x")
        assert unauth.value.code == "invalid_api_key"


async def test_client_disconnect_closes_the_upstream_request(server: Server,
                                                             fake: FakeVLLM) -> None:
    body = {"model": "slow", "prompt": "x", "max_tokens": 200, "stream": True}
    headers = {"Authorization": f"Bearer {server.keys.full}"}
    async with httpx.AsyncClient(timeout=10) as client, client.stream(
        "POST", server.url + "/api/v2/completions", json=body, headers=headers
    ) as r:
        assert r.status_code == 200
        async for _ in r.aiter_bytes():
            break  # one chunk seen; now hang up
    hung_up = time.monotonic()
    while fake.closed_early == 0 and time.monotonic() - hung_up < 5:
        await asyncio.sleep(0.01)
    assert fake.closed_early == 1
    # the fake streams 200 tokens 50 ms apart: closing early is what ended it
    assert time.monotonic() - hung_up < 1.0
    await _wait_for_usage(server.store, lambda rs: rs and rs[-1].outcome ==
                          "client_disconnected")


async def _wait_for_usage(store: Store, ok: object, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = await asyncio.to_thread(store.list_usage)
        if ok(records):  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"usage records never matched: {records}")


async def test_cli_revocation_reaches_the_running_gateway(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.keys.full}"}
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/api/v2/models", headers=headers)).status_code == 200
        public_id = server.keys.full.split("-")[1]
        revoke = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "paragate", "keys", "revoke", public_id],
            env=server.env, capture_output=True, text=True)
        assert revoke.returncode == 0, revoke.stderr
        deadline = time.monotonic() + 5
        while (await client.get("/api/v2/models", headers=headers)).status_code == 200:
            assert time.monotonic() < deadline, "revocation never took effect"
            await asyncio.sleep(0.05)
        assert (await client.get("/api/v2/models", headers=headers)).status_code == 401


async def test_usage_flushed_on_shutdown(tmp_path: Path, sqlite_store: Store,
                                         fake: FakeVLLM) -> None:
    keys = seed(sqlite_store, fake)
    # a flush interval longer than the test: only the shutdown can write the records
    srv = await asyncio.to_thread(start_server, tmp_path, sqlite_store, keys,
                                  PARAGATE_USAGE_FLUSH_INTERVAL="600")
    try:
        async with sdk(srv) as client:
            for _ in range(5):
                await client.completions.create(model="alfred-4.2", prompt="x", max_tokens=2)
        assert sqlite_store.list_usage() == []
    finally:
        # uvicorn re-raises the signal once it has shut down gracefully
        assert await asyncio.to_thread(srv.gateway.stop) in (0, -signal.SIGTERM)
    records = sqlite_store.list_usage()
    assert len(records) == 5
    assert all(r.outcome == "ok" and r.total_tokens == 5 for r in records)


async def test_curl(server: Server) -> None:
    out = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", server.url + "/api/v2/completions",
        "-H", f"Authorization: Bearer {server.keys.full}",
        "-d", '{"model": "alfred-4.2", "prompt": "Hello, ", "max_tokens": 2}',
    ], capture_output=True, text=True, timeout=30)
    assert '"model":"alfred-4.2"' in out.stdout, out.stdout + out.stderr
