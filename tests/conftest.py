"""Shared fixtures: a real store (SQLite, or PostgreSQL on 127.0.0.1), the fake vLLM,
and the gateway driven in-process through ASGI."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
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
from paragate.logs import AccessLog, JsonFormatter
from paragate.secrets import Secrets, generate_key
from paragate.store import Store, UsageRecord
from paragate.store.schema import api_keys

from . import logcapture
from .fake_vllm import FakeVLLM

POSTGRES_ADMIN_URL = os.environ.get(
    "PARAGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# A PostgreSQL store has no key file of its own (a SQLite one makes its own beside it):
# the tests' stores, and gateway processes on them, share this one (PARAGATE_SECRET_KEY).
TEST_SECRET_KEY = generate_key()
FAKE_BEHAVIOURS = ("slow", "hang", "drop", "error-event", "status-400", "status-404",
                   "status-500", "status-503", "garbage", "unauthorized", "gated")


_real_run = subprocess.run
_access_fd: list[int] = []  # the in-process gateways' copy of their access lines


def _is_paragate(command: object) -> bool:
    if not isinstance(command, list | tuple):
        return False
    words = [str(word) for word in command[:3]]
    return words[1:3] == ["-m", "paragate"] or (bool(words) and Path(words[0]).name == "paragate")


def _keep_stderr(command: object, stderr: object) -> None:
    if stderr and _is_paragate(command):
        text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else str(stderr)
        logcapture.append("cli.log", f"# stderr of a paragate command\n{text}")


def _run_keeping_stderr(*args: Any, **kwargs: Any) -> Any:
    """``subprocess.run``, keeping what a ``paragate`` command wrote to a captured stderr
    in the run's logs (its command line is left out: tests pass secrets on it)."""
    command = args[0] if args else kwargs.get("args")
    try:
        result = _real_run(*args, **kwargs)
    except subprocess.SubprocessError as exc:
        _keep_stderr(command, getattr(exc, "stderr", None))
        raise
    _keep_stderr(command, result.stderr)
    return result


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory: pytest.TempPathFactory,
                         request: pytest.FixtureRequest) -> Iterator[None]:
    """Every log line of the run lands in one directory (tests/logcapture.py): the
    in-process gateways' records (debug level) and access lines, every gateway
    process's log (tests/servers.py), every paragate command's stderr, what tests wrote
    to stdout and stderr and every ``*.log`` under the temporary directories. At the end
    none may hold a key, an upstream API key or a canary (tests/test_log_leaks.py)."""
    directory = logcapture.session_dir()
    handler = logging.FileHandler(directory / "in-process.log", encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    ours = logging.getLogger("paragate")
    ours.addHandler(handler)
    previous = ours.level
    ours.setLevel(logging.DEBUG)  # debug lines too
    _access_fd.append(os.open(directory / "in-process-access.log",
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "run", _run_keeping_stderr)
        yield
    ours.removeHandler(handler)
    ours.setLevel(previous)
    handler.close()
    os.close(_access_fd.pop())
    logcapture.sweep(tmp_path_factory.getbasetemp())
    leaks = logcapture.scan(directory)
    logcapture.close()
    if leaks:
        pytest.fail(f"{logcapture.report(leaks)}\n(every log of this run: {directory})",
                    pytrace=False)
    root, owned = logcapture.root_dir()
    if owned and not request.session.testsfailed:  # kept to look into a failure
        shutil.rmtree(root, ignore_errors=True)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """What each test wrote to stdout and stderr (pytest's capture) goes to the logs."""
    for name, output in report.sections:
        if name.startswith("Captured std") and name.endswith(f" {report.when}"):
            # the test's name without its parameters (they may be secrets)
            logcapture.append("captured-output.log",
                              f"# {name} of {report.nodeid.split('[')[0]}\n{output}")


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
    store = Store(postgres_url, secrets=Secrets([TEST_SECRET_KEY], source="the tests' key"))
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
        s = Store(store_url, secrets=Secrets([TEST_SECRET_KEY], source="the tests' key"))
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


async def caught_up(gateway: Gateway) -> None:
    """Bring the gateway's view up to the store's version. Asserting that ``refresh()``
    applied rows is racy: the refresher's own loop (woken by PostgreSQL's NOTIFY) may
    have applied them already, and then ``refresh()`` rightly returns 0."""
    await gateway.refresher.refresh()
    assert gateway.registry.version == await asyncio.to_thread(gateway.store.version)


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
    """A gateway on ``store`` with the test settings, its usage journal in ``tmp_path``
    (its access lines copied to the run's logs)."""
    gw = Gateway.build(TEST_SETTINGS.replace(
        database_url=str(store.url), journal_dir=str(tmp_path / "journal"), **settings), store)
    if gw.telemetry.access is not None and _access_fd:
        gw.telemetry.access = _CopiedAccessLog(gw.settings.log_format, _access_fd[0])
    return gw


class _CopiedAccessLog(AccessLog):
    """The access log, on stderr as ever, and a copy of each line in the run's logs."""

    __slots__ = ("_copy",)

    def __init__(self, fmt: str, copy_fd: int) -> None:
        super().__init__(fmt)
        self._copy = AccessLog(fmt, copy_fd)

    def write(self, fields: dict[str, Any]) -> None:
        super().write(fields)
        self._copy.write(fields)


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
