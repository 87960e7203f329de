"""Shared fixtures: a real store (SQLite, or PostgreSQL on 127.0.0.1), the fake vLLM,
and the gateway driven in-process through ASGI."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url

from paragate import control
from paragate.app import App
from paragate.config import Settings
from paragate.control import Actor
from paragate.control.users import DEFAULT_USER, SYSTEM_ADMIN
from paragate.gateway import Gateway
from paragate.limits.resp import RedisClient
from paragate.store import Store, UsageRecord
from paragate.store.schema import api_keys

from .fake_vllm import FakeVLLM
from .servers import LOGS

POSTGRES_ADMIN_URL = os.environ.get(
    "PARAGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
FAKE_BEHAVIOURS = ("slow", "hang", "drop", "error-event", "status-400", "status-404",
                   "status-500", "status-503", "garbage", "unauthorized", "gated")


_KEY = re.compile(r"pg-[0-9a-f]{12}-[A-Za-z0-9_-]{20,}")


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def no_key_in_any_log() -> Iterator[None]:
    """After the whole run: nothing shaped like an API key in any line paragate logged
    in-process (debug level included), nor in any gateway process's log."""
    handler = _Everything()
    ours = logging.getLogger("paragate")
    ours.addHandler(handler)
    previous = ours.level
    ours.setLevel(logging.DEBUG)  # debug lines too
    yield
    ours.removeHandler(handler)
    ours.setLevel(previous)
    found = [line for line in handler.lines if _KEY.search(line)]
    found += [f"{log}: {line}" for log in LOGS if log.exists()
              for line in log.read_text(errors="replace").splitlines() if _KEY.search(line)]
    assert not found, f"API keys in the logs: {found[:3]}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of its own on the machine's PostgreSQL, dropped afterwards."""
    name = f"paragate_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - depends on the machine
        admin.dispose()
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not usable: {exc}")
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _empty(url: str) -> None:
    """Leave a test database empty for the next test."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[Store]:
    """A migrated store on the machine's PostgreSQL, emptied afterwards (for tests whose
    gateways are processes of their own, sharing it)."""
    store = Store(postgres_url)
    store.migrate()
    yield store
    store.close()
    _empty(postgres_url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'paragate.db'}"
        return
    url: str = request.getfixturevalue("postgres_url")
    yield url
    _empty(url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store migrated once per session; each test's store starts as a copy
    (migrating a new file for every test cost a tenth of a second or more each)."""
    path = tmp_path_factory.mktemp("template") / "paragate.db"
    s = Store(f"sqlite:///{path}")
    s.migrate()
    with s.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    s.engine.dispose()
    return path


@pytest.fixture
def store(store_url: str, request: pytest.FixtureRequest) -> Iterator[Store]:
    url = make_url(store_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(
            url.database).exists():
        shutil.copyfile(request.getfixturevalue("sqlite_template"), url.database)
        s = Store(store_url)
    else:
        s = Store(store_url)
        s.migrate()
    yield s
    s.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeVLLM]:
    server = await FakeVLLM().start()
    yield server
    await server.stop()


@dataclass
class Keys:
    full: str
    admin: str
    restricted: str  # may use alfred-4.2 only
    revoked: str
    expired: str
    full_id: str
    throttled: str  # 2 requests per minute


CLI = Actor.cli()
REDIS = "redis://127.0.0.1:6379/0"  # the machine's Redis, shared: tests use own prefixes


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A namespace of its own in the shared Redis, removed afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix

    async def clean() -> None:
        client = RedisClient(REDIS)
        cursor = b"0"
        while True:
            reply = await client.execute("SCAN", cursor, "MATCH", f"{{{prefix}}}:*",
                                         "COUNT", 1000)
            assert isinstance(reply, list)
            cursor, found = reply[0], reply[1]
            assert isinstance(found, list)
            if found:
                await client.execute("DEL", *found)  # type: ignore[arg-type]
            if cursor in (b"0", 0):
                break
        await client.close()

    asyncio.run(clean())


async def wait_usage(store: Store, done: Callable[[list[UsageRecord]], bool],
                     timeout: float = 10.0) -> list[UsageRecord]:
    """The usage records once ``done`` holds of them: the writer runs when the CPUs are
    otherwise idle (a loaded machine delays it by seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await asyncio.to_thread(store.list_usage)
        if done(rows):
            return rows
        assert time.monotonic() < deadline, f"usage records never matched: {rows}"
        await asyncio.sleep(0.05)


def make_key(store: Store, name: str, *, is_admin: bool = False, user_id: int | None = None,
             allowed_models: list[str] | None = None, rate_limit_rpm: int | None = None,
             expires_at: datetime | None = None) -> tuple[str, str]:
    """A key made as the CLI makes it (an expiry in the past is written afterwards)."""
    past = expires_at is not None and expires_at <= datetime.now(UTC)
    made = control.keys.create(
        store, CLI, name=name, user_id=user_id,
        builtin=None if user_id is not None else SYSTEM_ADMIN if is_admin else DEFAULT_USER,
        models=allowed_models, rate_limit_rpm=rate_limit_rpm,
        expires_at=None if past else expires_at, max_keys=100)
    if past:
        force_expiry(store, made.record.public_id, expires_at)
    assert made.secret is not None
    return made.secret, made.record.public_id


def force_expiry(store: Store, public_id: str, at: datetime | None) -> None:
    """Set a key's expiry to any time, the past included (the API refuses that)."""
    with store.change(CLI.audit_columns()) as ch:
        ch.conn.execute(update(api_keys).where(api_keys.c.public_id == public_id).values(
            expires_at=at, version=ch.version))


def add_model(store: Store, name: str, upstream_url: str, upstream_model: str,
              **fields: object) -> None:
    control.models.create(store, CLI, name, upstream_url=upstream_url,
                          upstream_model=upstream_model, **fields)


def seed(store: Store, fake: FakeVLLM) -> Keys:
    add_model(store, "alfred-4.2", fake.base_url, "ok", display_name="Alfred 4.2")
    add_model(store, "limited", fake.base_url, "ok", max_logprobs=2, default_max_tokens=3,
              max_tokens_limit=10)
    add_model(store, "off", fake.base_url, "ok", enabled=False)
    add_model(store, "down", "http://127.0.0.1:9/v1", "ok")
    add_model(store, "embedder", fake.base_url, "ok", type="embedding")
    for behaviour in FAKE_BEHAVIOURS:
        add_model(store, behaviour, fake.base_url, behaviour)
    full, full_id = make_key(store, "full")
    admin, _ = make_key(store, "admin", is_admin=True)
    restricted, _ = make_key(store, "restricted", allowed_models=["alfred-4.2"])
    revoked, revoked_id = make_key(store, "revoked")
    control.keys.revoke(store, CLI, revoked_id)
    expired, _ = make_key(store, "expired",
                          expires_at=datetime.now(UTC) - timedelta(seconds=1))
    throttled, _ = make_key(store, "throttled", rate_limit_rpm=2)
    return Keys(full=full, admin=admin, restricted=restricted, revoked=revoked,
                expired=expired, full_id=full_id, throttled=throttled)


TEST_SETTINGS = Settings(refresh_interval=0.05, usage_flush_interval=0.05,
                         upstream_read_timeout=1.0, upstream_connect_timeout=1.0,
                         max_body_bytes=64 * 1024)


def build_gateway(store: Store, tmp_path: Path, **settings: Any) -> Gateway:
    """A gateway on ``store`` with the test settings, its usage journal in ``tmp_path``."""
    return Gateway.build(TEST_SETTINGS.replace(
        database_url=str(store.url), journal_dir=str(tmp_path / "journal"), **settings), store)


@pytest.fixture
def keys(store: Store, fake: FakeVLLM) -> Keys:
    return seed(store, fake)


@pytest.fixture
async def gateway(store: Store, keys: Keys, tmp_path: Path) -> AsyncIterator[Gateway]:
    gw = build_gateway(store, tmp_path)
    await gw.start()
    yield gw
    await gw.stop()


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=App(gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c
