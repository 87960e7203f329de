"""Replicas in process: the choice, retries only where safe, ejection and re-admission,
draining, and the replicas API and CLI. Each fault is a fake upstream of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from paragate import control
from paragate.app import App
from paragate.cli import main
from paragate.errors import NoReplica
from paragate.gateway import Gateway
from paragate.store import ReplicaRecord, Store
from paragate.upstream.balancer import Balancer, Fleet, Replica, affinity_key

from .conftest import CLI, add_model, build_gateway, make_key
from .fake_vllm import FakeVLLM

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def record(i: int, weight: int = 1) -> ReplicaRecord:
    return ReplicaRecord(id=i, model_id=1, url=f"http://r{i}:8000/v1", weight=weight,
                         upstream_api_key=None, enabled=True, draining=False,
                         health_url=None, discover=False, version=1, created_at=NOW,
                         updated_at=NOW, deleted_at=None)


def fleet(*weights: int) -> Fleet:
    records = tuple(record(i + 1, w) for i, w in enumerate(weights))
    return Fleet("m", records, [Replica(r) for r in records])


# -- the choice --------------------------------------------------------------------------


def test_the_less_loaded_of_two_wins() -> None:
    f = fleet(1, 1)
    a, b = f.members
    a.inflight = 5
    rng = random.Random(1)
    assert all(f.choose([], rng) is b for _ in range(100))
    b.others = 9  # another gateway keeps it busy: vLLM's own queue says so
    assert all(f.choose([], rng) is a for _ in range(100))


def test_weights_share_the_traffic() -> None:
    f = fleet(3, 1)
    rng = random.Random(2)
    counts = Counter(f.choose([], rng).id for _ in range(4000))
    assert counts[1] > 2 * counts[2] > 0  # idle replicas: the pick follows the weights


def test_only_a_probe_readmits_an_ejected_replica() -> None:
    f = fleet(1, 1)
    balancer = Balancer(None, eject_after=1)  # type: ignore[arg-type]
    sick = f.members[0]
    balancer.failed(sick, "connect refused")
    assert sick.ejected
    balancer.succeeded(sick)  # a request that was in flight there when it was ejected
    assert sick.ejected
    balancer.succeeded(sick, probe=True)  # a good health check
    assert not sick.ejected and sick.fails == 0


def test_without_probes_a_back_off_ending_readmits_discovered_replicas_too() -> None:
    balancer = Balancer(None, eject_after=1, probes=False)  # type: ignore[arg-type]
    static = record(1)
    named = dataclasses.replace(static, id=2, discover=True)
    balancer.resolved(2, ("10.0.0.7",))
    f = balancer.fleet(1, "m", (static, named))
    assert [r.url for r in f.members] == ["http://r1:8000/v1", "http://10.0.0.7:8000/v1"]
    for r in f.members:
        balancer.failed(r, "refused")
        assert r.ejected
        r.probe_at = 0.0  # the back-off is over
    balancer.readmit_due()
    assert not any(r.ejected for r in f.members)


def test_out_of_rotation_replicas_are_never_chosen() -> None:
    f = fleet(1, 1, 1)
    f.members[0].ejected = True
    f.members[1].takes_traffic = False  # draining
    rng = random.Random(3)
    assert {f.choose([], rng).id for _ in range(50)} == {3}
    assert f.choose([f.members[0]], rng).id == 3
    with pytest.raises(NoReplica, match="No other replica"):
        f.choose([f.members[2]], rng)


# -- against fake upstreams --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sqlite_store(tmp_path: Path, sqlite_template: Path) -> Iterator[Store]:
    shutil.copyfile(sqlite_template, tmp_path / "paragate.db")
    s = Store(f"sqlite:///{tmp_path / 'paragate.db'}")
    yield s
    s.close()


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeVLLM]]:
    servers = [await FakeVLLM().start() for _ in range(2)]
    yield servers
    for s in servers:
        await s.stop()


class Fleet2:
    def __init__(self, store: Store, urls: list[str], model: str = "ok") -> None:
        add_model(store, "m", urls[0], model)
        for url in urls[1:]:
            control.replicas.create(store, CLI, "m", url=url)
        self.key, _ = make_key(store, "k")
        self.admin, _ = make_key(store, "root", is_admin=True)
        self.ids = [r.id for r in control.replicas.list_(store, CLI, "m")[1]]


async def running(store: Store, tmp_path: Path, **settings: Any
                  ) -> tuple[Gateway, httpx.AsyncClient]:
    gw = build_gateway(store, tmp_path, **settings)
    await gw.start()
    transport = httpx.ASGITransport(app=App(gw))
    return gw, httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30)


async def complete(api: httpx.AsyncClient, key: str, **body: Any) -> httpx.Response:
    return await api.post("/api/v2/completions", headers={"authorization": f"Bearer {key}"},
                          json={"model": "m", "prompt": "hi", "max_tokens": 2, **body})


async def test_a_replica_that_refuses_connections_costs_no_request(
        sqlite_store: Store, tmp_path: Path, fakes: list[FakeVLLM]) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    fl = Fleet2(sqlite_store, [dead, fakes[0].base_url])
    gw, api = await running(sqlite_store, tmp_path, health_interval=0)
    try:
        answers = [await complete(api, fl.key) for _ in range(20)]
        assert [r.status_code for r in answers] == [200] * 20
        assert len(fakes[0].requests) == 20
        dead_replica = gw.balancer.replica(fl.ids[0])
        assert dead_replica is not None and dead_replica.ejected
        assert dead_replica.errors == 3  # ejected after three, then left alone
    finally:
        await api.aclose()
        await gw.stop()
    records = sqlite_store.list_usage()
    assert len(records) == 20 and {r.upstream for r in records} == {fakes[0].base_url}


async def test_queue_full_goes_to_another_replica(
        sqlite_store: Store, tmp_path: Path, fakes: list[FakeVLLM]) -> None:
    # "status-503" makes the fake answer 503, as vLLM does when its queue is full
    fl = Fleet2(sqlite_store, [fakes[0].base_url, fakes[1].base_url], model="status-503")
    gw, api = await running(sqlite_store, tmp_path, health_interval=0)
    try:
        r = await complete(api, fl.key)
        # both answer 503: each tried once, then the last 503 is the answer
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
        assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1
        for replica_id in fl.ids:  # busy is not broken: nobody is ejected
            replica = gw.balancer.replica(replica_id)
            assert replica is not None and not replica.ejected and replica.fails == 0
    finally:
        await api.aclose()
        await gw.stop()


async def test_a_request_that_reached_vllm_is_not_retried(
        sqlite_store: Store, tmp_path: Path, fakes: list[FakeVLLM]) -> None:
    # "drop" closes the connection mid-stream: the stream had started, never retried;
    # "hang" answers nothing: after the read timeout, a 504, never retried either
    fl = Fleet2(sqlite_store, [fakes[0].base_url, fakes[1].base_url], model="hang")
    gw, api = await running(sqlite_store, tmp_path, health_interval=0,
                            upstream_read_timeout=0.3)
    try:
        started = time.monotonic()
        r = await complete(api, fl.key)
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_first_byte_timeout"
        assert time.monotonic() - started < 2
        assert len(fakes[0].requests) + len(fakes[1].requests) == 1
    finally:
        await api.aclose()
        await gw.stop()
    # the record names the replica that failed, though no answer ever came from it
    (record,) = sqlite_store.list_usage()
    assert record.upstream in (fakes[0].base_url, fakes[1].base_url)


async def test_every_replica_down_is_an_immediate_503(
        sqlite_store: Store, tmp_path: Path) -> None:
    urls = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    fl = Fleet2(sqlite_store, urls)
    gw, api = await running(sqlite_store, tmp_path, health_interval=0.05,
                            health_timeout=0.2)
    try:
        deadline = time.monotonic() + 5
        while not all(gw.balancer.replica(i) and gw.balancer.replica(i).ejected  # type: ignore[union-attr]
                      for i in fl.ids):
            assert time.monotonic() < deadline, "never ejected"
            await asyncio.sleep(0.05)
        started = time.monotonic()
        r = await complete(api, fl.key)
        assert time.monotonic() - started < 0.1
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_healthy_replica"
        assert "out of rotation (ejected)" in r.json()["error"]["message"]
    finally:
        await api.aclose()
        await gw.stop()


async def test_a_dead_replica_is_ejected_without_traffic_and_readmitted(
        sqlite_store: Store, tmp_path: Path, fakes: list[FakeVLLM]) -> None:
    fl = Fleet2(sqlite_store, [fakes[0].base_url, fakes[1].base_url])
    gw, api = await running(sqlite_store, tmp_path, health_interval=0.05,
                            health_timeout=0.5, replica_max_backoff=0.2)
    try:
        sick = gw.balancer.replica(fl.ids[0])
        assert sick is not None
        fakes[0].health_status = 500
        deadline = time.monotonic() + 5
        while not sick.ejected:
            assert time.monotonic() < deadline, "never ejected"
            await asyncio.sleep(0.02)
        answers = [await complete(api, fl.key) for _ in range(10)]
        assert {r.status_code for r in answers} == {200}
        assert len(fakes[0].requests) == 0 and len(fakes[1].requests) == 10
        r = await api.get("/api/v2/models/m/replicas",
                          headers={"authorization": f"Bearer {fl.admin}"})
        states = {x["id"]: x["state"] for x in r.json()["data"]}
        assert states == {fl.ids[0]: "ejected", fl.ids[1]: "healthy"}
        fakes[0].health_status = 200  # restarted
        while sick.ejected:
            assert time.monotonic() < deadline, "never re-admitted"
            await asyncio.sleep(0.02)
        answers = [await complete(api, fl.key) for _ in range(20)]
        assert {r.status_code for r in answers} == {200} and len(fakes[0].requests) > 0
    finally:
        await api.aclose()
        await gw.stop()


async def test_requests_shift_to_the_faster_replica(
        sqlite_store: Store, tmp_path: Path, fakes: list[FakeVLLM]) -> None:
    # "slow" streams take 50 ms a token: with 8 at once, in-flight counts differ
    fl = Fleet2(sqlite_store, [fakes[0].base_url, fakes[1].base_url], model="slow")
    gw, api = await running(sqlite_store, tmp_path, health_interval=0)
    try:
        fast = gw.balancer.fleet(*_route(gw))
        fast.members[1].others = 20  # replica 2's vLLM reports a long queue
        answers = await asyncio.gather(*(complete(api, fl.key, max_tokens=3)
                                         for _ in range(16)))
        assert {r.status_code for r in answers} == {200}
        assert len(fakes[0].requests) > 3 * len(fakes[1].requests)
    finally:
        await api.aclose()
        await gw.stop()


def _route(gw: Gateway) -> tuple[int, str, tuple[ReplicaRecord, ...]]:
    route = gw.registry.routes["m"]
    return route.id, route.name, route.replicas


async def test_a_draining_replica_takes_no_new_requests(
        sqlite_store: Store, tmp_path: Path, fakes: list[FakeVLLM]) -> None:
    fl = Fleet2(sqlite_store, [fakes[0].base_url, fakes[1].base_url])
    gw, api = await running(sqlite_store, tmp_path, health_interval=0)
    admin = {"authorization": f"Bearer {fl.admin}"}
    try:
        r = await api.patch(f"/api/v2/models/m/replicas/{fl.ids[0]}", headers=admin,
                            json={"draining": True})
        assert r.status_code == 200 and r.json()["state"] == "draining"
        answers = [await complete(api, fl.key) for _ in range(10)]
        assert {r.status_code for r in answers} == {200}
        assert len(fakes[0].requests) == 0 and len(fakes[1].requests) == 10
    finally:
        await api.aclose()
        await gw.stop()


# -- the API and the CLI -----------------------------------------------------------------


async def test_replicas_api(sqlite_store: Store, tmp_path: Path,
                            fakes: list[FakeVLLM]) -> None:
    add_model(sqlite_store, "org/m", fakes[0].base_url, "ok", upstream_api_key="sk-one")
    admin, _ = make_key(sqlite_store, "root", is_admin=True)
    user, _ = make_key(sqlite_store, "user")
    key, _ = make_key(sqlite_store, "k")
    gw, api = await running(sqlite_store, tmp_path, health_interval=0)
    h = {"authorization": f"Bearer {admin}"}
    base = "/api/v2/models/org/m/replicas"
    try:
        r = await api.get(base, headers=h)
        assert r.status_code == 200 and r.json()["object"] == "list"
        (first,) = r.json()["data"]
        assert first["url"] == fakes[0].base_url and first["has_upstream_api_key"]
        assert first["state"] == "healthy" and first["weight"] == 1
        assert "sk-one" not in r.text
        r = await api.post(base, headers=h, json={"url": fakes[1].base_url, "weight": 3})
        assert r.status_code == 201, r.text
        second = r.json()
        assert second["object"] == "model.replica" and second["weight"] == 3
        assert second["model"] == "org/m"
        # at once, without a restart: the new replica takes requests
        for _ in range(20):
            r = await api.post("/api/v2/completions",
                               headers={"authorization": f"Bearer {key}"},
                               json={"model": "org/m", "prompt": "x", "max_tokens": 1})
            assert r.status_code == 200, r.text
        assert len(fakes[1].requests) > 0
        r = await api.get(base, headers=h)
        assert sum(x["requests"] for x in r.json()["data"]) == 20
        for body, code in [({"url": "ftp://x"}, 400), ({"weight": 0}, 400),
                           ({"weight": "3"}, 400), ({"color": 1}, 400),
                           ({"url": fakes[1].base_url}, 409)]:
            r = await api.post(base, headers=h, json=body)
            assert r.status_code == code, (body, r.text)
            assert r.json()["error"]["message"]
        r = await api.patch(f"{base}/{second['id']}", headers=h, json={"weight": 2})
        assert r.status_code == 200 and r.json()["weight"] == 2
        for path in (f"{base}/999", f"{base}/abc"):
            r = await api.patch(path, headers=h, json={"weight": 2})
            assert r.status_code == 404 and r.json()["error"]["code"] == "replica_not_found"
        r = await api.get("/api/v2/models/nope/replicas", headers=h)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await api.get(base, headers={"authorization": f"Bearer {user}"})
        assert r.status_code == 403
        # two replicas: the model's own URL can no longer be changed in one go
        r = await api.patch("/api/v2/models/org/m", headers=h,
                            json={"upstream_url": "http://elsewhere:8000/v1"})
        assert r.status_code == 409, r.text
        r = await api.delete(f"{base}/{first['id']}", headers=h)
        assert r.status_code == 200 and r.json() == {
            "object": "model.replica", "id": first["id"], "deleted": True}
        r = await api.delete(f"{base}/{second['id']}", headers=h)
        assert r.status_code == 409  # the last one
        r = await api.get("/api/v2/models/org/m?all=true", headers=h)
        assert r.json()["upstream_url"] == fakes[1].base_url  # follows its first replica
        r = await api.post("/api/v2/models", headers=h, json={
            "name": "a/replicas", "upstream_url": fakes[0].base_url})
        assert r.status_code == 400 and "replicas" in r.json()["error"]["message"]
    finally:
        await api.aclose()
        await gw.stop()
    actions = [a.action for a in control.audit.list_(sqlite_store, CLI, limit=100).data]
    assert {"replica.create", "replica.update", "replica.delete"} <= set(actions)


def test_replicas_cli(sqlite_store: Store, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PARAGATE_DATABASE_URL", str(sqlite_store.url))

    def run(*args: str) -> tuple[int, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out + out.err

    assert run("models", "add", "m", "--upstream", "http://a:8000/v1")[0] == 0
    code, out = run("models", "replicas", "add", "m", "--upstream", "http://b:8000/v1",
                    "--weight", "2")
    assert code == 0 and "added replica" in out, out
    code, out = run("models", "replicas", "list", "m")
    assert code == 0 and "http://a:8000/v1" in out and "http://b:8000/v1" in out, out
    ids = [x.id for x in control.replicas.list_(sqlite_store, CLI, "m")[1]]
    code, out = run("models", "replicas", "update", "m", str(ids[1]), "--drain")
    assert code == 0 and "draining" in out, out
    assert run("models", "replicas", "remove", "m", str(ids[0]))[0] == 0
    code, out = run("models", "replicas", "remove", "m", str(ids[1]))
    assert code == 1 and "is the last of the model" in out, out
    code, out = run("models", "replicas", "add", "m", "--upstream", "http://c/v1",
                    "--weight", "0")
    assert code == 2 and "--weight" in out, out
    code, out = run("models", "replicas", "add", "nope", "--upstream", "http://c/v1")
    assert code == 1 and "does not exist" in out, out


# -- a model's own timeouts ----------------------------------------------------------------


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A URL whose connections never complete: a listening socket that accepts nothing,
    its one-place queue already taken."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    first = socket.create_connection(("127.0.0.1", port))
    yield f"http://127.0.0.1:{port}/v1"
    first.close()
    server.close()


def _events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e]


@pytest.mark.parametrize(("model", "timeouts", "stream", "code"), [
    ("hang", {"first_byte": 0.3}, False, "upstream_first_byte_timeout"),
    ("slow", {"idle": 0.02}, True, "upstream_idle_timeout"),
    ("slow", {"total": 0.3, "idle": 5}, True, "upstream_total_timeout"),
])
async def test_each_timeout_has_its_own_code(
        sqlite_store: Store, tmp_path: Path, fake: FakeVLLM, model: str,
        timeouts: dict[str, float], stream: bool, code: str) -> None:
    add_model(sqlite_store, "m", fake.base_url, model)
    key, _ = make_key(sqlite_store, "k")
    admin, _ = make_key(sqlite_store, "root", is_admin=True)
    gw, api = await running(sqlite_store, tmp_path, health_interval=0,
                            upstream_read_timeout=30)
    try:
        r = await api.patch("/api/v2/models/m", headers={"authorization": f"Bearer {admin}"},
                            json={"timeouts": timeouts})
        assert r.status_code == 200 and r.json()["timeouts"] == {
            "connect": None, "first_byte": None, "idle": None, "total": None, **timeouts}
        started = time.monotonic()
        r = await complete(api, key, stream=stream, max_tokens=50)
        assert time.monotonic() - started < 2
        if stream:  # the stream had started: an error event, then [DONE]
            events = _events(r.text)
            assert r.status_code == 200 and events[-1] == "data: [DONE]"
            assert f'"code":"{code}"' in events[-2].replace(" ", "")
        else:
            assert r.status_code == 504 and r.json()["error"]["code"] == code
    finally:
        await api.aclose()
        await gw.stop()
    (record,) = sqlite_store.list_usage()
    assert record.error_type == code


async def test_a_connect_timeout_is_tried_on_another_replica(
        sqlite_store: Store, tmp_path: Path, fake: FakeVLLM, black_hole: str) -> None:
    fl = Fleet2(sqlite_store, [black_hole, fake.base_url])
    control.models.update(sqlite_store, CLI, "m", connect_timeout=0.2)
    gw, api = await running(sqlite_store, tmp_path, health_interval=0)
    try:
        stuck = gw.balancer.replica(fl.ids[0])
        assert stuck is not None
        # Each request picks either replica at random (both idle): send until one has
        # been tried on the black hole (1 in 2**30 that none is, not 1 in 64 as with 6)
        for _ in range(30):
            r = await complete(api, fl.key)
            assert r.status_code == 200, r.text
            if stuck.errors:
                break
        assert stuck.errors >= 1
        assert "did not accept a connection within 0.2 s" in (stuck.last_error or "")
    finally:
        await api.aclose()
        await gw.stop()
    # alone, the same replica's timeout is the answer, with its own code
    control.replicas.delete(sqlite_store, CLI, "m", fl.ids[1])
    gw, api = await running(sqlite_store, tmp_path, health_interval=0)
    try:
        r = await complete(api, fl.key)
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_connect_timeout"
    finally:
        await api.aclose()
        await gw.stop()


# -- affinity ------------------------------------------------------------------------------


def test_affinity_keys() -> None:
    chars = 8
    assert affinity_key("prefix", {"prompt": "same start, then one"}, chars) == affinity_key(
        "prefix", {"prompt": "same start, then two"}, chars)
    assert affinity_key("prefix", {"prompt": "a"}, chars) != affinity_key(
        "prefix", {"prompt": "b"}, chars)
    assert affinity_key("prefix", {"prompt": ["batch first", "x"]}, chars) == affinity_key(
        "prefix", {"prompt": "batch first"}, chars)
    assert affinity_key("prefix", {"prompt": [1, 2, 3]}, chars) == affinity_key(
        "prefix", {"prompt": [1, 2, 9]}, chars)  # chars // 4 = 2 token ids
    assert affinity_key("user", {"prompt": "x", "user": "ann"}, chars) == affinity_key(
        "user", {"prompt": "y", "user": "ann"}, chars)
    for body in ({"prompt": "x"}, {"prompt": "x", "user": 3}, {"user": ""}):
        assert affinity_key("user", body, chars) is None


def test_affinity_is_stable_spread_and_gives_way_when_busy() -> None:
    f = fleet(1, 1, 1, 1)
    rng = random.Random(4)
    keys = [affinity_key("user", {"user": f"u{i}"}, 8) for i in range(400)]
    first = [f.choose([], rng, k).id for k in keys]  # type: ignore[arg-type]
    assert first == [f.choose([], rng, k).id for k in keys]  # type: ignore[arg-type]
    assert all(n > 60 for n in Counter(first).values())  # about 100 each
    # a replica leaves: only its keys move
    f.members[0].ejected = True
    moved = [f.choose([], rng, k).id for k in keys]  # type: ignore[arg-type]
    assert all(a == b for a, b in zip(first, moved, strict=True) if a != 1)
    f.members[0].ejected = False
    # the affine replica much busier than the least loaded: the least loaded takes it
    key = keys[0]
    mine = f.members[first[0] - 1]
    mine.inflight = 30
    assert f.choose([], rng, key).id != mine.id  # type: ignore[arg-type]
    mine.inflight = 5  # busier, but not much: it keeps the request
    assert f.choose([], rng, key).id == mine.id  # type: ignore[arg-type]


async def test_prefix_affinity_through_the_gateway(
        sqlite_store: Store, tmp_path: Path, fakes: list[FakeVLLM]) -> None:
    fl = Fleet2(sqlite_store, [fakes[0].base_url, fakes[1].base_url])
    control.models.update(sqlite_store, CLI, "m", affinity="prefix")
    gw, api = await running(sqlite_store, tmp_path, health_interval=0,
                            affinity_prefix_chars=16)
    try:
        for i in range(40):
            r = await complete(api, fl.key, prompt=f"system prompt {i % 4}: question {i}")
            assert r.status_code == 200
        seen: dict[str, set[int]] = {}
        for n, server in enumerate(fakes):
            for body in server.requests:
                seen.setdefault(body["prompt"][:16], set()).add(n)
        assert len(seen) == 4 and all(len(v) == 1 for v in seen.values()), seen
        r = await api.get("/api/v2/models/m?all=true",
                          headers={"authorization": f"Bearer {fl.admin}"})
        assert r.json()["affinity"] == "prefix"
    finally:
        await api.aclose()
        await gw.stop()


async def test_a_slow_metrics_page_is_not_a_failed_health_check(
        sqlite_store: Store, tmp_path: Path, fakes: list[FakeVLLM]) -> None:
    fl = Fleet2(sqlite_store, [fakes[0].base_url, fakes[1].base_url])
    gw, api = await running(sqlite_store, tmp_path, health_interval=0.05,
                            health_timeout=0.2)
    fakes[0].metrics_delay = 1.0  # vLLM's API server can take seconds to render /metrics
    try:
        await asyncio.sleep(1.5)
        replica = gw.balancer.replica(fl.ids[0])
        assert replica is not None and not replica.ejected and replica.fails == 0
        other = gw.balancer.replica(fl.ids[1])
        assert other is not None and other.running == 0 and other.waiting == 0
    finally:
        await api.aclose()
        await gw.stop()


# -- replicas found through DNS ------------------------------------------------------------


async def test_a_discovered_replica_follows_its_name(sqlite_store: Store,
                                                     tmp_path: Path) -> None:
    """A headless Service's name: each address it resolves to is a replica, and the
    fleet follows the answer as it changes (the resolver is the test's)."""
    a = await FakeVLLM().start()
    b = await FakeVLLM(host="127.0.0.2", port=a.port).start()  # the same port, elsewhere
    answers = {"vllm.fleet.svc": ("127.0.0.1",)}

    async def resolver(host: str, port: int) -> tuple[str, ...]:
        if host not in answers:
            raise OSError("Name or service not known")
        return answers[host]

    url = f"http://vllm.fleet.svc:{a.port}/v1"
    fl = Fleet2(sqlite_store, [url])
    with pytest.raises(Exception, match="http://"):
        control.replicas.update(sqlite_store, CLI, "m", fl.ids[0], discover=True,
                                url=f"https://vllm.fleet.svc:{a.port}/v1")
    control.replicas.update(sqlite_store, CLI, "m", fl.ids[0], discover=True)
    gw = build_gateway(sqlite_store, tmp_path, health_interval=0.05, dns_interval=0.05)
    gw.health.resolver = resolver
    await gw.start()
    api = httpx.AsyncClient(transport=httpx.ASGITransport(app=App(gw)), base_url="http://gw")
    admin = {"authorization": f"Bearer {fl.admin}"}
    try:
        for _ in range(6):
            assert (await complete(api, fl.key)).status_code == 200
        assert (len(a.requests), len(b.requests)) == (6, 0)
        answers["vllm.fleet.svc"] = ("127.0.0.1", "127.0.0.2")  # scaled up
        await asyncio.sleep(0.3)
        for _ in range(30):
            assert (await complete(api, fl.key)).status_code == 200
        assert len(b.requests) > 3 and len(a.requests) > 9
        r = await api.get("/api/v2/models/m/replicas", headers=admin)
        (one,) = r.json()["data"]
        assert one["discover"] and one["state"] == "healthy"
        assert sorted(x["url"] for x in one["addresses"]) == [
            f"http://127.0.0.1:{a.port}/v1", f"http://127.0.0.2:{a.port}/v1"]
        assert one["requests"] == 36
        answers["vllm.fleet.svc"] = ("127.0.0.2",)  # scaled down: the first one left
        await asyncio.sleep(0.3)
        before = len(a.requests)
        for _ in range(6):
            assert (await complete(api, fl.key)).status_code == 200
        assert len(a.requests) == before
        del answers["vllm.fleet.svc"]  # the lookup fails: the last answer holds
        await asyncio.sleep(0.3)
        assert gw.balancer.addresses[fl.ids[0]] == ("127.0.0.2",)
        assert (await complete(api, fl.key)).status_code == 200
        answers["vllm.fleet.svc"] = ()  # nothing behind the name
        await asyncio.sleep(0.3)
        r = await complete(api, fl.key)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"
    finally:
        await api.aclose()
        await gw.stop()
        await a.stop()
        await b.stop()


async def test_a_replica_whose_queue_builds_gets_less(sqlite_store: Store, tmp_path: Path,
                                                      fakes: list[FakeVLLM]) -> None:
    """Another router fills replica 2: its /metrics says so, and the health checks that
    read it move this gateway's requests to replica 1."""
    fl = Fleet2(sqlite_store, [fakes[0].base_url, fakes[1].base_url])
    gw, api = await running(sqlite_store, tmp_path, health_interval=0.05)
    try:
        fakes[1].waiting = 40
        busy = gw.balancer.replica(fl.ids[1])
        assert busy is not None
        deadline = time.monotonic() + 5
        while busy.waiting != 40:
            assert time.monotonic() < deadline, "the queue was never read"
            await asyncio.sleep(0.02)
        answers = await asyncio.gather(*(complete(api, fl.key) for _ in range(20)))
        assert {r.status_code for r in answers} == {200}
        assert (len(fakes[0].requests), len(fakes[1].requests)) == (20, 0)
        r = await api.get("/api/v2/models/m/replicas",
                          headers={"authorization": f"Bearer {fl.admin}"})
        queues = {x["id"]: x["queue"] for x in r.json()["data"]}
        assert queues[fl.ids[1]] == {"running": 0, "waiting": 40}
    finally:
        await api.aclose()
        await gw.stop()


def test_each_endpoint_has_its_url_on_a_replica() -> None:
    """Under the replica's /v1, or at that URL's root for /tokenize: never at its
    health_url, which may be a sidecar's (the health checks' alone)."""
    checked = Replica(dataclasses.replace(record(1), health_url="http://sidecar:9000"))
    assert checked.endpoint("chat/completions") == "http://r1:8000/v1/chat/completions"
    assert checked.endpoint("/tokenize") == "http://r1:8000/tokenize"
    assert checked.base_url == "http://sidecar:9000"
    bare = Replica(dataclasses.replace(record(2), url="http://r2:8000/"))
    assert bare.endpoint("/tokenize") == "http://r2:8000/tokenize"
    assert bare.endpoint("embeddings") == "http://r2:8000/embeddings"
