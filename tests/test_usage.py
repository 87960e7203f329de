"""Usage accounting in process: the journal, the writer under database faults, and the
records the request path makes (see docs/usage.md)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from paragate.background import StoreThread
from paragate.gateway import Gateway
from paragate.store import Store, UsageRecord
from paragate.store.schema import usage_hourly
from paragate.usage import Journal, UsageWriter
from paragate.usage.journal import read_segment

from .conftest import Keys
from .fake_vllm import FakeVLLM
from .servers import TcpProxy
from .test_completions import post

T0 = datetime(2026, 11, 30, 10, 15, tzinfo=UTC)


def rec(i: int, **fields: object) -> UsageRecord:
    values: dict[str, object] = dict(
        request_id=f"req-{i}", created_at=T0 + timedelta(seconds=i), key_id=1, user_id=1,
        company_id=1, model_id=1, model="alfred-4.2", stream=False, status=200,
        outcome="ok", prompt_tokens=3, completion_tokens=5, total_tokens=8, duration_ms=12)
    values.update(fields)
    return UsageRecord(**values)  # type: ignore[arg-type]


def journal(tmp_path: Path, **kw: object) -> Journal:
    j = Journal(tmp_path / "journal", "sqlite:///x.db", **kw)  # type: ignore[arg-type]
    j.open()
    return j


# -- the journal ------------------------------------------------------------------------


def test_journal_round_trip_and_segments_deleted_once_committed(tmp_path: Path) -> None:
    j = journal(tmp_path, segment_bytes=2000)
    records = [rec(i) for i in range(50)]
    for r in records:
        j.append(r)
    assert len(list(j.directory.glob("*.journal"))) > 3  # rotated by size
    got, marks = j.read(1000)
    assert got == records
    assert j.pending() == 50
    j.commit(marks)
    assert j.pending() == 0
    # only the active segment is left, and it goes on close
    assert len(list(j.directory.glob("*.journal"))) == 1
    j.close()
    assert list(j.directory.glob("*.journal")) == []


def test_reading_moves_nothing_until_committed(tmp_path: Path) -> None:
    j = journal(tmp_path)
    for i in range(5):
        j.append(rec(i))
    first, _ = j.read(3)
    again, marks = j.read(3)
    assert first == again == [rec(i) for i in range(3)]
    j.commit(marks)
    rest, marks = j.read(10)
    assert rest == [rec(3), rec(4)]
    j.close()


def test_a_live_segment_is_never_taken_over_a_dead_ones_is(tmp_path: Path) -> None:
    live = journal(tmp_path)
    live.append(rec(1))
    other = journal(tmp_path)
    assert other.take_over() == 0  # held by a live journal (its flock)
    live_path = live._active.path  # type: ignore[union-attr]
    # a process that died: its segment is on disk, unlocked
    os.close(live._active.fd)  # type: ignore[union-attr]  # what death does to the lock
    live._active = None
    assert other.take_over() == 1
    got, marks = other.read(10)
    assert got == [rec(1)]
    other.commit(marks)
    assert not live_path.exists()
    other.close()


def test_a_torn_last_record_is_skipped_the_others_kept(tmp_path: Path) -> None:
    dead = journal(tmp_path)
    for i in range(3):
        dead.append(rec(i))
    path = dead._active.path  # type: ignore[union-attr]
    os.write(dead._active.fd, b"\x50\x00\x00\x00garbage")  # type: ignore[union-attr]
    os.close(dead._active.fd)  # type: ignore[union-attr]
    dead._active = None
    assert read_segment(path) == [rec(i) for i in range(3)]
    j = journal(tmp_path)
    assert j.take_over() == 3
    assert j.read(10)[0] == [rec(i) for i in range(3)]
    j.close()


def test_segments_of_another_database_are_left_alone(tmp_path: Path) -> None:
    other_db = Journal(tmp_path / "journal", "sqlite:///other.db")
    other_db.open()
    other_db.append(rec(1))
    os.close(other_db._active.fd)  # type: ignore[union-attr]
    other_db._active = None
    j = journal(tmp_path)
    assert j.take_over() == 0
    j.close()
    assert len(list((tmp_path / "journal").glob("*.journal"))) == 1


def test_a_disk_that_refuses_keeps_the_record_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from paragate.usage import journal as module

    j = journal(tmp_path)
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        monkeypatch.setattr(module.os, "write", real_write)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module.os, "write", full)
    j.append(rec(1))
    assert j.failed == [rec(1)]
    j.append(rec(2))  # a new segment was started
    got, marks = j.read(10)
    assert got == [rec(1), rec(2)]
    j.commit(marks)
    assert j.failed == [] and j.pending() == 0


# -- the writer under faults ----------------------------------------------------------


def count(store: Store) -> int:
    return len(store.list_usage())


def rolled_up(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.sum(usage_hourly.c.requests))).scalar() or 0)


async def drain(writer: UsageWriter) -> None:
    await writer.drain()


@pytest.fixture
def writer_for(tmp_path: Path) -> Iterator[object]:
    made: list[tuple[Journal, StoreThread]] = []

    def make(store: Store) -> UsageWriter:
        j = Journal(tmp_path / "journal", str(store.url))
        j.open()
        thread = StoreThread("test-usage")
        made.append((j, thread))
        return UsageWriter(store, thread, j, flush_interval=0.02, max_backoff=0.1)

    yield make
    for j, thread in made:
        j.close()
        thread.close()


async def test_a_poison_record_is_isolated_and_the_others_written(
        store: Store, writer_for: object) -> None:
    writer = writer_for(store)  # type: ignore[operator]
    for i in range(10):
        writer.journal.append(rec(i, prompt_tokens=2 ** 63 if i == 4 else 3))
    await writer.drain()
    assert sorted(r.request_id for r in store.list_usage()) == sorted(
        f"req-{i}" for i in range(10) if i != 4)
    assert rolled_up(store) == 9
    assert writer.journal.pending() == 0
    lines = writer.dead_letters.path.read_text().splitlines()
    assert len(lines) == 1 and '"req-4"' in lines[0]
    # an operator fixes what was wrong and replays: here the row stays bad, and stays
    assert writer.dead_letters.replay(store) == (0, 0, 1)
    assert len(writer.dead_letters.path.read_text().splitlines()) == 1


async def test_a_stop_during_a_pass_still_writes_what_came_meanwhile(
        store: Store, writer_for: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the writer returned right after the pass during which it was told to
    stop, so a record journaled while that pass was busy (here: in the first pruning,
    which a lock elsewhere can hold up) stayed behind until the next start."""
    writer = writer_for(store)  # type: ignore[operator]
    pruning, release = threading.Event(), threading.Event()
    prune = store.prune_usage

    def slow_prune(before: datetime) -> int:
        pruning.set()
        release.wait(10)
        return prune(before)

    monkeypatch.setattr(store, "prune_usage", slow_prune)
    task = asyncio.create_task(writer.run())
    await asyncio.to_thread(pruning.wait, 10)
    writer.journal.append(rec(1))
    writer.stop()
    release.set()
    await asyncio.wait_for(task, 10)
    assert count(store) == 1 and writer.journal.pending() == 0


async def test_the_writer_thread_runs_only_on_idle_cpu() -> None:
    """SCHED_IDLE: any other thread that wakes takes the core from it at once."""
    idle, normal = StoreThread("test-idle", idle=True), StoreThread("test-normal")
    try:
        assert await idle.run(os.sched_getscheduler, 0) == os.SCHED_IDLE
        assert await normal.run(os.sched_getscheduler, 0) == os.SCHED_OTHER
        assert await normal.run(os.getpriority, os.PRIO_PROCESS, 0) == 10
    finally:
        idle.close()
        normal.close()


class _Starved(StoreThread):
    """An idle-priority thread on a core that requests keep busy: each call waits."""

    def __init__(self) -> None:
        super().__init__("test-starved")
        self.calls = 0

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        await asyncio.sleep(0.3)
        return await super().run(fn, *args, **kwargs)


async def test_a_starved_writer_catches_up_at_normal_priority(
        store: Store, tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal", str(store.url))
    j.open()
    starved, catch_up = _Starved(), StoreThread("test-catch-up")
    writer = UsageWriter(store, starved, j, flush_interval=0.02, catch_up=catch_up,
                         catch_up_after=0.2, idle_batch=100)
    try:
        for i in range(1000):
            j.append(rec(i))
        await writer.drain()  # 100 a call, 0.3 s each: behind after the first
        assert count(store) == 1000 and j.pending() == 0
        assert starved.calls == 1 and writer.catch_ups == 1
        j.append(rec(1000))
        await writer.drain()  # caught up: back on the idle thread
        assert starved.calls == 2 and writer.catch_ups == 1 and count(store) == 1001
    finally:
        j.close()
        starved.close()
        catch_up.close()


@pytest.mark.postgres
async def test_database_down_then_back_nothing_lost_nothing_doubled(
        postgres_url: str, writer_for: object) -> None:
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    direct = Store(postgres_url)
    direct.migrate()
    through = Store(url.set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False))
    try:
        writer = writer_for(through)  # type: ignore[operator]
        task = asyncio.create_task(writer.run())
        for i in range(100):
            writer.journal.append(rec(i))
        await wait_for(lambda: count(direct) == 100)
        proxy.down()
        for i in range(100, 300):
            writer.journal.append(rec(i))
        await asyncio.sleep(0.5)
        assert count(direct) == 100
        assert writer.failing_since is not None
        assert writer.journal.failed == []  # the journal holds them, not memory
        proxy.up()
        await wait_for(lambda: count(direct) == 300)
        # a COMMIT that succeeds but whose acknowledgement is lost: retried, not doubled
        proxy.lose_answer_after(b"COMMIT")
        for i in range(300, 350):
            writer.journal.append(rec(i))
        await wait_for(lambda: count(direct) == 350 and writer.journal.pending() == 0)
        assert proxy.dropped == 1
        writer.stop()
        await task
        assert rolled_up(direct) == 350
        assert sorted(r.request_id for r in direct.list_usage()) == sorted(
            f"req-{i}" for i in range(350))
    finally:
        proxy.close()
        through.close()
        with direct.engine.begin() as conn:  # leave the database empty for the next test
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        direct.close()


async def wait_for(ok: object, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(ok):  # type: ignore[arg-type]
        assert loop.time() < deadline, "never happened"
        await asyncio.sleep(0.05)


# -- the records the request path makes -------------------------------------------------


async def records_of(gateway: Gateway, n: int) -> list[UsageRecord]:
    await wait_for(lambda: len(gateway.store.list_usage()) >= n)
    return gateway.store.list_usage()


@pytest.mark.parametrize("running", [False, True])
async def test_stream_usage_exact_with_n(client: httpx.AsyncClient, keys: Keys,
                                         gateway: Gateway, running: bool) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True} if running else None
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", max_tokens=4, n=2,
                   stream=True, **({"stream_options": options} if options else {}))
    assert r.status_code == 200
    assert ('"usage"' in r.text) is running  # running usage only when asked
    (record,) = await records_of(gateway, 1)
    assert (record.prompt_tokens, record.completion_tokens, record.n) == (3, 8, 2)
    assert record.partial is False and record.outcome == "ok"
    assert record.ttft_ms is not None and record.gateway_us is not None


async def test_upstream_drop_mid_stream_gives_a_partial_record(
        client: httpx.AsyncClient, keys: Keys, gateway: Gateway) -> None:
    r = await post(client, keys.full, model="drop", prompt="x", max_tokens=10, stream=True)
    assert r.status_code == 200 and "upstream_error" in r.text
    (record,) = await records_of(gateway, 1)
    # the fake sent two chunks, each with vLLM's running usage, then closed
    assert (record.prompt_tokens, record.completion_tokens) == (3, 2)
    assert record.partial and record.outcome == "upstream_error"


async def test_every_authenticated_failure_is_recorded(
        client: httpx.AsyncClient, keys: Keys, gateway: Gateway) -> None:
    await post(client, keys.full, model="no-such-model", prompt="x")
    await post(client, keys.full, prompt="x")  # no model
    await post(client, keys.full, model="status-400", prompt="x")
    await post(client, keys.throttled, model="alfred-4.2", prompt="x")
    await post(client, keys.throttled, model="alfred-4.2", prompt="x")
    await post(client, keys.throttled, model="alfred-4.2", prompt="x")  # 429
    await post(client, "pg-000000000000-wrong", model="alfred-4.2", prompt="x")  # 401
    records = await records_of(gateway, 6)
    await asyncio.sleep(0.2)
    records = gateway.store.list_usage()
    assert len(records) == 6  # the 401 is not an authenticated request
    by_status = sorted((r.status, r.error_type or "", r.model_id is None) for r in records)
    assert by_status == sorted([
        (404, "model_not_found", True), (400, "missing_field", True),
        (400, "upstream_error", False), (200, "", False), (200, "", False),
        (429, "rate_limit_exceeded", False)])
    assert len({r.request_id for r in records}) == 6


async def test_client_request_id_kept_beside_ours(client: httpx.AsyncClient, keys: Keys,
                                                  gateway: Gateway) -> None:
    for value in ("trace-1.a_b", "bad id with spaces", "x" * 129):
        await client.post("/api/v2/completions", json={
            "model": "alfred-4.2", "prompt": "x", "max_tokens": 1},
            headers={"Authorization": f"Bearer {keys.full}", "x-request-id": value})
    records = await records_of(gateway, 3)
    assert sorted(str(r.client_request_id) for r in records) == ["None", "None",
                                                                 "trace-1.a_b"]
    assert all(r.request_id != r.client_request_id for r in records)


async def test_a_key_that_opted_out_gets_no_record(
        client: httpx.AsyncClient, keys: Keys, gateway: Gateway, store: Store) -> None:
    from paragate import control

    from .conftest import CLI

    made = control.keys.create(store, CLI, name="private", usage_opt_in=False,
                               builtin="default_user", expires_at=None)
    await wait_for(lambda: gateway.registry.version >= store.version())
    assert made.secret is not None
    r = await post(client, made.secret, model="alfred-4.2", prompt="x", max_tokens=1)
    assert r.status_code == 200
    await post(client, keys.full, model="alfred-4.2", prompt="x", max_tokens=1)
    (record,) = await records_of(gateway, 1)
    await asyncio.sleep(0.2)
    assert [r.key_id for r in gateway.store.list_usage()] == [record.key_id]
    assert record.key_id != made.record.id


async def test_journaled_before_the_response_ends(
        client: httpx.AsyncClient, keys: Keys, gateway: Gateway, fake: FakeVLLM) -> None:
    gateway.writer.stop()  # nothing moves the records on: they must be in the journal
    await asyncio.sleep(0.1)
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", max_tokens=2,
                   stream=True)
    assert r.text.endswith("data: [DONE]\n\n")
    records, _ = gateway.journal.read(10)
    assert [(x.status, x.completion_tokens) for x in records] == [(200, 2)]


@pytest.mark.parametrize(("event", "expected"), [
    (b'data: {"id":"c","choices":[{"index":0,"text":" }{"}],"usage":{"prompt_tokens":5,'
     b'"total_tokens":12,"completion_tokens":7}}',
     b'data: {"id":"c","choices":[{"index":0,"text":" }{"}]}'),
    (b'data: {"choices":[],"usage":{"prompt_tokens":5,"prompt_tokens_details":'
     b'{"cached_tokens":2},"completion_tokens":7},"x":1}', b'data: {"choices":[],"x":1}'),
    (b'data: {"choices":[{"index":0,"text":"a"}]}', b'data: {"choices":[{"index":0,"text":"a"}]}'),
])
def test_running_usage_removed_as_vllm_would_leave_it_out(event: bytes,
                                                          expected: bytes) -> None:
    from paragate.proxy import _strip_usage

    assert _strip_usage(event) == expected


@pytest.mark.parametrize(("event", "expected", "counts"), [
    # read from the bytes: a completion's chunk, a chat stream's first chunk (members go on
    # after the usage), choice 3 of n=2's second prompt
    (b'data: {"id":"c","choices":[{"index":0,"text":" }{"}],"usage":{"prompt_tokens":5,'
     b'"total_tokens":12,"completion_tokens":7}}',
     b'data: {"id":"c","choices":[{"index":0,"text":" }{"}]}', ({0: 5}, {0: 7})),
    (b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],'
     b'"usage":{"prompt_tokens":10,"total_tokens":10,"completion_tokens":0,'
     b'"completion_tokens_details":null},"prompt_token_ids":null}',
     b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],'
     b'"prompt_token_ids":null}', ({0: 10}, {0: 0})),
    (b'data: {"choices":[{"index":3,"text":"a"}],"usage":{"prompt_tokens":4,'
     b'"completion_tokens":2}}', b'data: {"choices":[{"index":3,"text":"a"}]}',
     ({1: 4}, {3: 2})),
    # decoded whole: a nested usage, choices not first in its place
    (b'data: {"choices":[{"text":"a","index":1}],"usage":{"prompt_tokens":4,'
     b'"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}}',
     b'data: {"choices":[{"text":"a","index":1}]}', ({0: 4}, {1: 2})),
])
def test_running_usage_read_and_removed(event: bytes, expected: bytes,
                                        counts: tuple[dict[int, int], dict[int, int]]) -> None:
    from paragate.proxy import Target, _Events
    from paragate.usage import Exchange

    target = Target(fleet=None, body=b"", requested_model="m",  # type: ignore[arg-type]
                    upstream_model="m")
    events = _Events(target, "http://u/v1", False, False, 2, Exchange("r", None))
    out: list[bytes] = []
    events.feed(event, out)
    assert out == [expected + b"\n\n"]
    assert (events.prompt, events.completion) == counts


def test_a_dead_letter_replayed_once_its_cause_is_gone(store: Store, tmp_path: Path) -> None:
    from paragate.usage import DeadLetters

    letters = DeadLetters(tmp_path / "dead-letter.jsonl")
    letters.add(rec(1), "DataError: it was refused then")
    letters.add(rec(2), "DataError: it was refused then")
    store.insert_usage([rec(2)])  # one got in meanwhile (written by another path)
    assert letters.replay(store) == (1, 1, 0)  # written, already there, still failing
    assert letters.path.read_text() == ""
    assert sorted(r.request_id for r in store.list_usage()) == ["req-1", "req-2"]
    assert letters.replay(store) == (0, 0, 0)
