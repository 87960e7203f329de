"""Two real vLLM replicas behind one model: a replica killed under load, and prefix
affinity seen in vLLM's own prefix-cache counters.

The second vLLM lives for this module only (two at once at most on these machines); the
session's gateway takes it as the model's second replica, and lets it go at the end.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from paragate import control
from paragate.control import Actor
from paragate.control.users import SYSTEM_ADMIN
from paragate.store import Store

from .conftest import MODEL, SERVED_NAME, Stack, localvllm

pytestmark = pytest.mark.e2e
CLI = Actor.cli()


@dataclass
class Pair:
    stack: Stack
    second: localvllm.VLLMServer
    store: Store
    admin: str
    replica_id: int
    logs: Path

    def replicas(self) -> dict[str, dict[str, object]]:
        r = httpx.get(f"{self.stack.gateway.url}/api/v2/models/{MODEL}/replicas",
                      headers={"Authorization": f"Bearer {self.admin}"}, timeout=10)
        assert r.status_code == 200, r.text
        return {x["url"]: x for x in r.json()["data"]}

    def wait_state(self, url: str, state: str, within: float) -> float:
        started = time.monotonic()
        while (now := self.replicas()[url]["state"]) != state:
            assert time.monotonic() - started < within, f"{url} still {now}"
            time.sleep(0.2)
        return time.monotonic() - started


@pytest.fixture(scope="module")
def pair(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    logs = tmp_path_factory.mktemp("replicas")
    second = localvllm.VLLMServer(localvllm.ensure_demo_model(),
                                  served_model_name=SERVED_NAME, max_model_len=4096,
                                  log_path=logs / "vllm-2.log").start()
    store = Store(stack.gateway.env["PARAGATE_DATABASE_URL"])
    p = Pair(stack, second, store, "", 0, logs)
    try:
        admin = control.keys.create(store, CLI, name="replicas-admin",
                                    builtin=SYSTEM_ADMIN).secret
        assert admin is not None
        p.admin = admin
        p.replica_id = control.replicas.create(store, CLI, MODEL, url=second.base_url).id
        time.sleep(1)  # the gateway applies the change (SQLite: within its refresh)
        p.wait_state(second.base_url, "healthy", 30)
        yield p
    finally:
        if p.replica_id:
            control.replicas.delete(store, CLI, MODEL, p.replica_id)
        control.models.update(store, CLI, MODEL, affinity="none")
        time.sleep(1)  # the gateway lets the replica go before it stops
        p.second.stop()  # the one running now (a restarted one, after the kill test)
        store.close()


@dataclass
class Outcome:
    request_id: str
    stream: bool
    started: float
    ended: float = 0.0
    status: int = 0
    ok: bool = False
    clean: bool = False  # a failure in our envelope (JSON, or an error event then [DONE])
    code: str | None = None


@dataclass
class Load:
    """Requests from a few threads, half of them streams, until stopped."""

    url: str
    key: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def worker(self, n: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not self.stop.is_set():
                stream = (i + n) % 2 == 0
                i += 1
                o = Outcome(str(uuid.uuid4()), stream, time.monotonic())
                self.outcomes.append(o)
                body = {"model": MODEL, "prompt": f"def worker_{n}_{i}(",
                        "max_tokens": 96 if stream else 24, "temperature": 0,
                        "stream": stream}
                headers = {"Authorization": f"Bearer {self.key}", "x-request-id": o.request_id}
                try:
                    r = client.post(self.url, json=body, headers=headers)
                except httpx.HTTPError as exc:  # pragma: no cover - the test fails on it
                    o.code = f"transport: {exc}"
                    o.ended = time.monotonic()
                    continue
                o.ended, o.status = time.monotonic(), r.status_code
                if not stream:
                    o.ok = r.status_code == 200 and "choices" in r.json()
                    if not o.ok:
                        error = r.json().get("error") or {}
                        o.clean, o.code = bool(error.get("code")), error.get("code")
                    continue
                events = [e for e in r.text.split("\n\n") if e]
                done = bool(events) and events[-1] == "data: [DONE]"
                failed = [e for e in events if e.startswith('data: {"error"')]
                o.ok = r.status_code == 200 and done and not failed
                if not o.ok:
                    o.clean = done and bool(failed) if r.status_code == 200 else (
                        "error" in r.text)
                    o.code = failed[-1][:200] if failed else r.text[:200]


def stack_records(pair: Pair) -> list:  # type: ignore[type-arg]
    time.sleep(0.5)  # the usage writer's flush
    return pair.store.list_usage()


def _counter(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _prefix_cache(urls: list[str]) -> tuple[float, float]:
    """(queries, hits) in tokens, summed over the replicas."""
    queries = hits = 0.0
    for url in urls:
        text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
        queries += _counter(text, "vllm:prefix_cache_queries_total")
        hits += _counter(text, "vllm:prefix_cache_hits_total")
    assert queries or hits, "vLLM reports no prefix cache counters"
    return queries, hits


def test_prefix_affinity_raises_vllms_prefix_cache_hit_rate(pair: Pair) -> None:
    stack = pair.stack
    urls = [stack.vllm.base_url, pair.second.base_url]
    rates = {}
    with httpx.Client(timeout=120) as client:
        for mode in ("none", "prefix"):
            control.models.update(pair.store, CLI, MODEL, affinity=mode)
            time.sleep(1)
            before = _prefix_cache(urls)
            for p in range(8):  # 8 long shared prefixes, 4 requests each
                shared = f"# {mode} {p} {uuid.uuid4()}\n" + "".join(
                    f"def helper_{p}_{k}(value):\n    return value * {k}\n" for k in range(60))
                for q in range(4):
                    r = client.post(stack.through,
                                    headers={"Authorization": f"Bearer {stack.key}"},
                                    json={"model": MODEL, "prompt": shared + f"# {q}\n",
                                          "max_tokens": 1})
                    assert r.status_code == 200, r.text
            after = _prefix_cache(urls)
            rates[mode] = (after[1] - before[1]) / max(after[0] - before[0], 1)
    print(f"\nprefix-cache hit rate: affinity none {rates['none']:.2f}, "
          f"prefix {rates['prefix']:.2f}")
    assert rates["prefix"] > rates["none"]


def test_killing_a_replica_under_load_fails_only_what_was_on_it(pair: Pair) -> None:
    stack, second = pair.stack, pair.second
    load = Load(stack.through, stack.key)
    threads = [threading.Thread(target=load.worker, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(6)
    deadline = time.monotonic() + 10
    while pair.replicas()[second.base_url]["in_flight"] == 0:  # kill it while it works
        assert time.monotonic() < deadline, "the second replica never had a request"
        time.sleep(0.01)
    os.killpg(second.pid, signal.SIGKILL)  # the whole vLLM, engine processes too
    # A request sent while the signal takes effect can still reach the dying server:
    # what was in flight on it is what started before its API server was gone (its
    # engine processes may take a while longer to give their memory back).
    deadline = time.monotonic() + 10
    while second.returncode() is None:
        assert time.monotonic() < deadline, "the killed vLLM did not exit"
        time.sleep(0.002)
    killed_at = time.monotonic()
    time.sleep(8)
    load.stop.set()
    for t in threads:
        t.join(90)
        assert not t.is_alive(), "a request hung"
    ejected_after = pair.wait_state(second.base_url, "ejected", 10)

    records = {r.client_request_id: r for r in stack_records(pair)}
    assert len(load.outcomes) > 20
    failed = [o for o in load.outcomes if not o.ok]
    for o in failed:
        record = records.get(o.request_id)
        assert record is not None, o
        # only what was on the killed replica when it died, and each in our envelope
        assert record.upstream == second.base_url, (o, record)
        assert o.started < killed_at, o
        assert o.clean, o
    assert failed, "nothing was in flight on the killed replica"
    after = [o for o in load.outcomes if o.started > killed_at + 0.5]
    assert after and all(o.ok for o in after)
    assert any(records[o.request_id].upstream == second.base_url
               for o in load.outcomes if o.ended < killed_at and o.ok), "B never served"
    print(f"\n{len(load.outcomes)} requests, {len(failed)} failed (in flight on the "
          f"killed replica), ejected {ejected_after:.1f} s after the load ended")

    # restarted on the same port: taken back, and given requests again
    restarted = localvllm.VLLMServer(localvllm.ensure_demo_model(),
                                     served_model_name=SERVED_NAME, max_model_len=4096,
                                     port=second.port, log_path=pair.logs / "vllm-2b.log")
    second.stop(grace=1)  # what is left of the killed group
    pair.second = restarted.start()
    back_after = pair.wait_state(second.base_url, "healthy", 20)
    served = 0
    with httpx.Client(timeout=60) as client:
        for i in range(12):
            r = client.post(stack.through, headers={"Authorization": f"Bearer {stack.key}"},
                            json={"model": MODEL, "prompt": f"x{i}", "max_tokens": 2})
            assert r.status_code == 200
    time.sleep(1)
    served = sum(1 for r in stack_records(pair) if r.upstream == second.base_url
                 and r.created_at.timestamp() > time.time() - 30)
    assert served > 0
    print(f"re-admitted {back_after:.1f} s after it answered /health again")
