"""Usage accounting with the gateway as a real process: no chunk held back, the shutdown
sequence, and ``kill -9`` under load (see docs/usage.md)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from paragate.store import Store

from .conftest import seed, wait_usage
from .fake_vllm import FakeVLLM
from .servers import GatewayProcess, start_gateway


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    s.migrate()
    return s


async def test_no_chunk_is_held_back_for_usage(tmp_path: Path, sqlite_store: Store,
                                               fake: FakeVLLM) -> None:
    """The fake waits for the test's signal between the last text chunk and the usage
    chunk: the client must have the last text (finish_reason set) before the signal."""
    keys = seed(sqlite_store, fake)
    gw = await asyncio.to_thread(start_gateway, tmp_path, str(sqlite_store.url))
    try:
        body = {"model": "gated", "prompt": "x", "max_tokens": 3, "stream": True}
        async with httpx.AsyncClient(timeout=10) as client, client.stream(
                "POST", gw.url + "/api/v2/completions", json=body,
                headers={"Authorization": f"Bearer {keys.full}"}) as r:
            assert r.status_code == 200
            seen = ""
            stream = r.aiter_text()
            async for text in stream:
                seen += text
                if '"finish_reason":"length"' in seen:
                    break
            assert not fake.gate.is_set()
            assert '" t2"' in seen  # the last text arrived while the usage was withheld
            fake.gate.set()
            async for text in stream:
                seen += text
        assert seen.endswith("data: [DONE]\n\n")
        assert '"usage"' not in seen
        (record,) = await wait_usage(sqlite_store, lambda rs: len(rs) == 1)
        assert (record.completion_tokens, record.partial) == (3, False)
    finally:
        await asyncio.to_thread(gw.stop)


async def test_client_disconnect_mid_stream_gives_a_partial_record(
        tmp_path: Path, sqlite_store: Store, fake: FakeVLLM) -> None:
    """The record holds the prompt tokens and the completion tokens vLLM had reported
    (its running usage) when the gateway last heard from it."""
    keys = seed(sqlite_store, fake)
    gw = await asyncio.to_thread(start_gateway, tmp_path, str(sqlite_store.url))
    try:
        body = {"model": "slow", "prompt": "x", "max_tokens": 200, "stream": True}
        seen = ""
        async with httpx.AsyncClient(timeout=10) as client, client.stream(
                "POST", gw.url + "/api/v2/completions", json=body,
                headers={"Authorization": f"Bearer {keys.full}"}) as r:
            async for text in r.aiter_text():
                seen += text
                if seen.count('"text"') >= 3:
                    break  # hang up after three tokens
        (record,) = await wait_usage(sqlite_store, lambda rs: len(rs) == 1)
        # one token every 50 ms: the gateway heard of at most a few more than we read
        assert record.outcome == "client_disconnected" and record.partial
        assert record.status == 200 and record.prompt_tokens == 3
        assert record.completion_tokens is not None
        assert 3 <= record.completion_tokens <= 3 + 10
        assert '"usage"' not in seen  # the running usage never reached the client
    finally:
        await asyncio.to_thread(gw.stop)


async def test_shutdown_sequence(tmp_path: Path, sqlite_store: Store,
                                 fake: FakeVLLM) -> None:
    keys = seed(sqlite_store, fake)
    gw = await asyncio.to_thread(start_gateway, tmp_path, str(sqlite_store.url),
                                 PARAGATE_SHUTDOWN_DELAY="1", PARAGATE_SHUTDOWN_TIMEOUT="2.5")
    headers = {"Authorization": f"Bearer {keys.full}"}
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(gw.url + "/ready")).status_code == 200
        body = {"model": "slow", "prompt": "x", "max_tokens": 500, "stream": True}
        async with client.stream("POST", gw.url + "/api/v2/completions", json=body,
                                 headers=headers) as r:
            stream = r.aiter_text()
            seen = await stream.__anext__()
            signalled = time.monotonic()
            gw.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            ready = await client.get(gw.url + "/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            # still accepting during the delay, on a new connection too
            async with httpx.AsyncClient(timeout=5) as fresh:
                done = await fresh.post(gw.url + "/api/v2/completions", headers=headers,
                                        json={"model": "alfred-4.2", "prompt": "x",
                                              "max_tokens": 2})
                assert done.status_code == 200
            async for text in stream:
                seen += text
        cut_after = time.monotonic() - signalled
    assert 2.0 < cut_after < 6, cut_after
    events = [e.removeprefix("data: ") for e in seen.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert await asyncio.to_thread(gw.process.wait, 15) in (0, -signal.SIGTERM)
    records = sqlite_store.list_usage()
    (cut,) = [r for r in records if r.model == "slow"]
    assert (cut.outcome, cut.partial, cut.status) == ("shutdown", True, 200)
    assert cut.completion_tokens and cut.completion_tokens > 5  # 50 ms a token, 2.5 s
    assert len(records) == 2


async def test_sigterm_under_load_fails_nothing_and_exits_once_idle(
        tmp_path: Path, sqlite_store: Store, fake: FakeVLLM) -> None:
    """Streams in flight at SIGTERM all finish; once the delay is over new connections
    are refused; the process leaves as soon as the last one is done, not at the
    shutdown timeout (20 s here)."""
    keys = seed(sqlite_store, fake)
    gw = await asyncio.to_thread(start_gateway, tmp_path, str(sqlite_store.url),
                                 PARAGATE_SHUTDOWN_DELAY="0.5",
                                 PARAGATE_SHUTDOWN_TIMEOUT="20")
    headers = {"Authorization": f"Bearer {keys.full}"}
    body = {"model": "slow", "prompt": "x", "max_tokens": 30, "stream": True}  # 1.5 s

    async def one(client: httpx.AsyncClient) -> str:
        r = await client.post(gw.url + "/api/v2/completions", json=body, headers=headers)
        assert r.status_code == 200
        return r.text

    async with httpx.AsyncClient(timeout=30) as client:
        streams = [asyncio.create_task(one(client)) for _ in range(6)]
        await asyncio.sleep(0.3)
        signalled = time.monotonic()
        gw.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)  # past the delay: the listener is closed
        async with httpx.AsyncClient(timeout=5) as fresh:
            with pytest.raises(httpx.ConnectError):
                await fresh.get(gw.url + "/health")
        texts = await asyncio.gather(*streams)
    for text in texts:
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and '"error"' not in text
    assert await asyncio.to_thread(gw.process.wait, 15) in (0, -signal.SIGTERM)
    assert time.monotonic() - signalled < 6  # the streams' 1.5 s, not the 20 s timeout
    assert len([r for r in sqlite_store.list_usage() if r.outcome == "ok"]) == 6


@pytest.mark.postgres
async def test_kill_9_under_load_loses_no_record(tmp_path: Path, pg_store: Store,
                                                 fake: FakeVLLM) -> None:
    """Every request that got a complete response has exactly one record after a
    ``kill -9`` and a restart on the same journal."""
    store, postgres_url = pg_store, str(pg_store.url)
    keys = seed(store, fake)
    journal = str(tmp_path / "journal")
    gw = await asyncio.to_thread(start_gateway, tmp_path, postgres_url,
                                 PARAGATE_JOURNAL_DIR=journal,
                                 PARAGATE_USAGE_FLUSH_INTERVAL="0.5")
    completed: list[str] = []
    stop = asyncio.Event()

    async def client_loop(worker: int) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            i = 0
            while not stop.is_set():
                rid = f"w{worker}-{i}"
                i += 1
                stream = i % 2 == 0
                try:
                    r = await client.post(gw.url + "/api/v2/completions", json={
                        "model": "alfred-4.2", "prompt": "x", "max_tokens": 3,
                        "stream": stream}, headers={"Authorization": f"Bearer {keys.full}",
                                                    "x-request-id": rid})
                except httpx.HTTPError:
                    continue
                if r.status_code == 200 and (not stream or r.text.endswith("[DONE]\n\n")):
                    completed.append(rid)

    tasks = [asyncio.create_task(client_loop(w)) for w in range(8)]
    await asyncio.sleep(1.5)
    gw.process.kill()  # SIGKILL: no shutdown at all
    await asyncio.to_thread(gw.process.wait)
    stop.set()
    await asyncio.gather(*tasks)
    assert len(completed) > 50
    restarted: GatewayProcess = await asyncio.to_thread(
        start_gateway, tmp_path, postgres_url, PARAGATE_JOURNAL_DIR=journal)
    try:
        records = await wait_usage(store, lambda rs: {
            r.client_request_id for r in rs} >= set(completed), timeout=20)
        ids = [r.client_request_id for r in records]
        assert len(ids) == len(set(ids))  # exactly one each
        assert all(r.completion_tokens == 3 for r in records
                   if r.client_request_id in set(completed))
    finally:
        await asyncio.to_thread(restarted.stop)
