"""Metrics with the gateway as a real process (``paragate serve``): with ``--workers 2``
every scrape, whichever worker answers it, adds up both workers' counters exactly
(prometheus-client's multiprocess mode, in a directory ``serve`` makes and removes);
the metrics port (``PARAGATE_METRICS_PORT``) serves ``/metrics`` without a key, on
127.0.0.1 only, and nothing else.

Which worker answered a request is told by its ``x-request-id``: ours begin with a
random prefix of each process (``asgi.request_id``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from paragate.store import Store

from .conftest import add_model, make_key
from .fake_vllm import FakeVLLM
from .servers import GatewayProcess, free_port, start_gateway
from .test_metrics import Samples, k, parse

COMPLETIONS = "/api/v2/completions"
MODEL = "alfred-4.2"


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    s.migrate()
    return s


@dataclass(repr=False)  # no key secrets in a failure's report
class Served:
    gw: GatewayProcess
    metrics_port: int
    admin: str
    full: str
    fake: FakeVLLM

    @property
    def url(self) -> str:
        return self.gw.url


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


async def _serve(tmp_path: Path, store: Store, fake: FakeVLLM, workers: int,
                 **settings: str) -> AsyncIterator[Served]:
    add_model(store, MODEL, fake.base_url, "ok")
    admin, _ = make_key(store, "admin", is_admin=True)
    full, _ = make_key(store, "full")
    port = free_port()
    if workers > 1:  # no Redis: see test_serve_with_workers_and_no_limits_needs_no_flag
        settings.setdefault("PARAGATE_LIMITS_PER_PROCESS", "true")
    gw = await asyncio.to_thread(
        start_gateway, tmp_path, str(store.url), PARAGATE_WORKERS=str(workers),
        PARAGATE_METRICS_PORT=str(port), PARAGATE_HEALTH_INTERVAL="0.5", **settings)
    ours = {gw.process.pid}
    try:
        # /health answered: one worker is up; the others once they hold the port too
        deadline = asyncio.get_running_loop().time() + 30
        while len(await asyncio.to_thread(_listeners, port)) < workers:
            assert gw.process.poll() is None, gw.log.read_text()
            assert asyncio.get_running_loop().time() < deadline, "a worker did not start"
            await asyncio.sleep(0.05)
        yield Served(gw, port, admin, full, fake)
    finally:
        ours.update(_children(gw.process.pid))  # its workers (and resource tracker)
        await asyncio.to_thread(gw.stop)
        children = ours - {gw.process.pid}
        deadline = asyncio.get_running_loop().time() + 10
        while any(_alive(pid) for pid in children):  # each leaves once its parent has
            if asyncio.get_running_loop().time() > deadline:
                left = [pid for pid in children if _alive(pid)]
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"processes {left} outlived their gateway")
            await asyncio.sleep(0.02)


@pytest.fixture
async def two_workers(tmp_path: Path, sqlite_store: Store, fake: FakeVLLM
                      ) -> AsyncIterator[Served]:
    async for served in _serve(tmp_path, sqlite_store, fake, 2):
        yield served


@pytest.fixture
async def one_worker(tmp_path: Path, sqlite_store: Store, fake: FakeVLLM
                     ) -> AsyncIterator[Served]:
    async for served in _serve(tmp_path, sqlite_store, fake, 1):
        yield served


def worker_of(r: httpx.Response) -> str:
    return r.headers["x-request-id"].split("-", 1)[0]


async def fresh(method: str, url: str, **kw: Any) -> httpx.Response:
    """One request on a connection of its own (any worker may accept it)."""
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.request(method, url, **kw)


async def scrape_port(s: Served, path: str = "/metrics") -> httpx.Response:
    return await fresh("GET", f"http://127.0.0.1:{s.metrics_port}{path}")


async def _traffic(s: Served, rounds: int = 30) -> tuple[int, int, int, set[str]]:
    """Requests on fresh connections, 6 at a time (plain and streamed alternately),
    until both workers have served some (at most ``rounds`` bursts): (requests,
    streams, completion tokens, the workers seen)."""
    requests = streams = tokens = 0
    seen: set[str] = set()
    headers = {"Authorization": f"Bearer {s.full}"}
    for _ in range(rounds):
        burst = []
        for i in range(6):
            stream = i % 2 == 1
            burst.append(fresh("POST", s.url + COMPLETIONS, headers=headers, json={
                "model": MODEL, "prompt": "x", "max_tokens": 1 + i, "stream": stream}))
            requests += 1
            streams += stream
            tokens += 1 + i
        for r in await asyncio.gather(*burst):
            assert r.status_code == 200, r.text
            seen.add(worker_of(r))
            if r.headers["content-type"].startswith("text/event-stream"):
                assert r.text.endswith("data: [DONE]\n\n")
        if len(seen) == 2:
            break
    return requests, streams, tokens, seen


def _answered(samples: Samples) -> float:
    return samples.get(k("paragate_requests_total", endpoint=COMPLETIONS, model=MODEL,
                         status="200"), 0.0)


async def _counted(s: Served, requests: int) -> None:
    deadline = asyncio.get_running_loop().time() + 15
    while (seen := _answered(parse((await scrape_port(s)).text))) != requests:
        assert seen < requests, seen
        assert asyncio.get_running_loop().time() < deadline, (seen, requests)
        await asyncio.sleep(0.02)


def _exact(samples: Samples, requests: int, streams: int, tokens: int) -> None:
    ep = {"endpoint": COMPLETIONS, "model": MODEL}
    assert samples[k("paragate_requests_total", **ep, status="200")] == requests
    assert samples[k("paragate_request_duration_seconds_count", **ep)] == requests
    assert samples[k("paragate_overhead_seconds_count", **ep)] == requests
    assert samples[k("paragate_time_to_first_token_seconds_count", **ep)] == streams
    assert samples[k("paragate_tokens_total", model=MODEL, kind="prompt")] == 3 * requests
    assert samples[k("paragate_tokens_total", model=MODEL, kind="completion")] == tokens
    assert samples[k("paragate_replica_response_seconds_count", model=MODEL,
                     replica=_replica(samples))] == requests


def _replica(samples: Samples) -> str:
    (replica,) = {dict(labels)["replica"] for name, labels in samples
                  if name == "paragate_replica_up"}
    return replica


def test_serve_with_workers_and_no_limits_needs_no_flag(sqlite_store: Store) -> None:
    """``paragate serve --workers 2`` without Redis refuses to start only when a rate
    limit is configured (``Store.has_rate_limits``); keys made without any are none."""
    make_key(sqlite_store, "admin", is_admin=True)
    make_key(sqlite_store, "plain")
    assert not sqlite_store.has_rate_limits()


# -- 9. two workers ---------------------------------------------------------------------

async def test_two_workers_every_scrape_adds_up_both(two_workers: Served) -> None:
    s = two_workers
    requests, streams, tokens, seen = await _traffic(s)
    assert len(seen) == 2, "one worker served every request"
    # a request is counted once its last byte is sent, a moment after its client has
    # it: wait for the last ones (on the metrics port: no scrape of the API counted)
    await _counted(s, requests)
    # scrapes of the main port, each on a connection of its own, until each worker
    # has answered one: each must show both workers' requests, exactly
    answered: set[str] = set()
    scrapes = 0
    admin = {"Authorization": f"Bearer {s.admin}"}
    while len(answered) < 2:
        assert scrapes < 60, "one worker answered every scrape"
        r = await fresh("GET", s.url + "/metrics", headers=admin)
        assert r.status_code == 200
        scrapes += 1
        answered.add(worker_of(r))
        samples = parse(r.text)
        _exact(samples, requests, streams, tokens)
        # a scrape counts once it is answered: those before this one, on either worker
        assert samples.get(k("paragate_requests_total", endpoint="/metrics", model="",
                             status="200"), 0) == scrapes - 1
    # and the metrics port, whichever worker holds the connection
    for _ in range(6):
        r = await scrape_port(s)
        assert r.status_code == 200
        samples = parse(r.text)
        _exact(samples, requests, streams, tokens)
        replica = _replica(samples)
        assert replica == s.fake.base_url
        assert samples[k("paragate_replica_up", model=MODEL, replica=replica)] == 1
        # no process_* series (one process's figures, not the sum), no pid label
        assert not [n for n, _ in samples if n.startswith("process_")]
        assert not [labels for _, labels in samples if "pid" in dict(labels)]
        # the metrics port's scrapes are not requests of the API
        assert samples[k("paragate_requests_total", endpoint="/metrics", model="",
                         status="200")] == scrapes


async def test_two_workers_replica_counters_are_exact_at_every_scrape(
        two_workers: Served) -> None:
    """``paragate_replica_requests_total`` is a counter like the others: a scrape that
    one worker answers right after the other worker's request must count it."""
    s = two_workers
    # one kept-alive connection per worker (a connection stays with its worker)
    clients: dict[str, httpx.AsyncClient] = {}
    admin = {"Authorization": f"Bearer {s.admin}"}
    try:
        for _ in range(60):
            if len(clients) == 2:
                break
            client = httpx.AsyncClient(timeout=10)
            r = await client.get(s.url + "/metrics", headers=admin)
            assert r.status_code == 200
            if worker_of(r) in clients:
                await client.aclose()
            else:
                clients[worker_of(r)] = client
        assert len(clients) == 2, "one worker accepted every connection"
        one, other = clients.values()
        sent = 0
        for _ in range(3):
            for client, scraper in ((one, other), (other, one)):
                r = await client.post(s.url + COMPLETIONS, headers={
                    "Authorization": f"Bearer {s.full}"}, json={
                    "model": MODEL, "prompt": "x", "max_tokens": 1})
                assert r.status_code == 200
                sent += 1
                # the other worker answers the scrapes, until it sees the request
                # counted (once its last byte was sent)
                deadline = asyncio.get_running_loop().time() + 15
                while True:
                    m = await scraper.get(s.url + "/metrics", headers=admin)
                    assert worker_of(m) != worker_of(r)
                    samples = parse(m.text)
                    if _answered(samples) == sent:
                        break
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.01)
                # then that very scrape counts its try on the replica too
                replica = _replica(samples)
                assert samples[k("paragate_replica_requests_total", model=MODEL,
                                 replica=replica)] == sent
                assert samples[k("paragate_replica_response_seconds_count", model=MODEL,
                                 replica=replica)] == sent
    finally:
        for client in clients.values():
            await client.aclose()


async def test_two_workers_gauges_and_the_directory(two_workers: Served) -> None:
    s = two_workers
    workers = _children(s.gw.process.pid)
    directories = {_environ(pid).get("PROMETHEUS_MULTIPROC_DIR") for pid in workers}
    assert len(directories) == 1
    (directory,) = directories
    assert directory and await asyncio.to_thread(os.path.isdir, directory)
    assert "PROMETHEUS_MULTIPROC_DIR" not in s.gw.env  # serve made it, not the test
    requests, *_ = await _traffic(s)
    await _counted(s, requests)
    # each worker sets its gauges every second (SAMPLE_INTERVAL): both workers' are
    # there, and at 0, within a second or so
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        samples = parse((await scrape_port(s)).text)
        gauges = (samples.get(k("paragate_in_flight_requests", endpoint=COMPLETIONS)),
                  samples.get(k("paragate_open_streams", endpoint=COMPLETIONS)))
        if gauges == (0, 0):
            break
        assert asyncio.get_running_loop().time() < deadline, gauges
        await asyncio.sleep(0.1)
    assert samples[k("paragate_config_version")] > 0
    import paragate
    assert samples[k("paragate_info", version=paragate.__version__)] == 1
    await asyncio.to_thread(s.gw.stop)
    assert not await asyncio.to_thread(os.path.exists, directory)  # serve removed it


# -- 10. the metrics port ---------------------------------------------------------------

def _listeners(port: int) -> list[str]:
    """The local addresses listening on ``port`` (IPv4 and IPv6), from /proc."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, _, hex_port = fields[1].rpartition(":")
                if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                    found.append(address)
    return found


async def test_the_metrics_port(one_worker: Served) -> None:
    s = one_worker
    r = await fresh("POST", s.url + COMPLETIONS, headers={
        "Authorization": f"Bearer {s.full}"}, json={"model": MODEL, "prompt": "x",
                                                      "max_tokens": 2})
    assert r.status_code == 200
    r = await scrape_port(s)  # no key
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    on_port = parse(r.text)
    main = await fresh("GET", s.url + "/metrics",
                       headers={"Authorization": f"Bearer {s.admin}"})
    on_main = parse(main.text)
    _exact(on_port, 1, 0, 2)
    _exact(on_main, 1, 0, 2)
    assert any(n.startswith("process_") for n, _ in on_port)  # one process: its own
    # not the API: other paths and methods are refused, a query is ignored
    for path in ("/", "/health", "/api/v2/models", "/metrics/", "/metricsx"):
        r = await scrape_port(s, path)
        assert r.status_code == 404, path
    assert (await scrape_port(s, "/metrics?name[]=x")).status_code == 200
    r = await fresh("POST", f"http://127.0.0.1:{s.metrics_port}/metrics")
    assert r.status_code == 405
    r = await fresh("HEAD", f"http://127.0.0.1:{s.metrics_port}/metrics")
    assert r.status_code == 200 and r.content == b""
    # a connection that sends nothing whole is closed, and the port still serves
    reader, writer = await asyncio.open_connection("127.0.0.1", s.metrics_port)
    writer.write(b"GET /metrics HTTP/1.1\r\n" + b"x" * 9000)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 15) == b""
    writer.close()
    assert (await scrape_port(s)).status_code == 200
    # bound to 127.0.0.1 only (the default PARAGATE_METRICS_HOST)
    assert _listeners(s.metrics_port) == ["0100007F"]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", s.metrics_port),
                                                          timeout=5):
        pass


async def test_the_metrics_port_of_two_workers(two_workers: Served) -> None:
    """Each worker binds it (SO_REUSEPORT), on 127.0.0.1."""
    assert _listeners(two_workers.metrics_port) == ["0100007F", "0100007F"]
    assert (await scrape_port(two_workers)).status_code == 200
