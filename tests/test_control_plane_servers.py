"""The control plane across real processes: revocation between two `paragate serve`
processes sharing the machine's PostgreSQL, a store outage made with a TCP proxy,
upgrading a database made by the previous release, concurrent migrations, the CLI's
contract, and no secret anywhere it should not be."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

import paragate.store
from paragate import control
from paragate.app import App
from paragate.auth import new_key
from paragate.control.users import SYSTEM_ADMIN
from paragate.store import _MIGRATIONS as MIGRATIONS
from paragate.store import Store
from paragate.store.schema import audit_log, usage_records
from paragate.store.usage import ReportQuery, bucket_of

from .conftest import CLI, POSTGRES_ADMIN_URL, build_gateway
from .fake_vllm import FakeVLLM
from .servers import GatewayProcess, TcpProxy, start_gateway
from .test_cli import run as cli
from .test_completions import auth


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """A database of its own on the machine's PostgreSQL, empty, dropped afterwards."""
    name = f"paragate_cp_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _root(store: Store) -> str:
    secret = control.keys.create(store, CLI, name="root", builtin=SYSTEM_ADMIN).secret
    assert secret is not None
    return secret


async def _until(check: Any, timeout: float) -> float:
    """Seconds until ``check()`` (a coroutine function) is true; fails after timeout."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, "never happened"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


@pytest.mark.postgres
async def test_revocation_reaches_another_process_within_a_second(
        tmp_path: Path, fresh_pg: str) -> None:
    store = Store(fresh_pg)
    store.migrate()
    root = _root(store)
    user = control.users.create(store, CLI, company_id=1, email="ana@acme.example").id
    # a poll every 5 s could not explain a change applied within a second: NOTIFY does
    slow_poll = {"PARAGATE_REFRESH_INTERVAL": "5"}
    one, two = (await asyncio.gather(*(asyncio.to_thread(
        start_gateway, tmp_path, fresh_pg, **slow_poll) for _ in range(2))))
    delays: dict[str, list[float]] = {"new key": [], "revoked": []}
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for i in range(3):
                r = await http.post(one.url + "/api/v2/api-keys", headers=auth(root),
                                    json={"name": f"k{i}", "user_id": user})
                assert r.status_code == 201, r.text
                key, key_id = r.json()["key"], r.json()["id"]

                async def status(key: str = key) -> int:
                    got = await http.get(two.url + "/api/v2/models", headers=auth(key))
                    return got.status_code

                async def known() -> bool:
                    return await status() == 200

                async def refused() -> bool:
                    return await status() == 401

                delays["new key"].append(await _until(known, 5))
                r = await http.delete(f"{one.url}/api/v2/api-keys/{key_id}",
                                      headers=auth(root))
                assert r.status_code == 200
                delays["revoked"].append(await _until(refused, 5))
    finally:
        one.stop()
        two.stop()
        store.close()
    print("\nchange applied in the other process (PostgreSQL NOTIFY): " + ", ".join(
        f"{what} {' / '.join(f'{d * 1000:.0f} ms' for d in ds)}"
        for what, ds in delays.items()))
    assert max(delays["revoked"]) < 1.0
    assert max(delays["new key"]) < 1.0


@pytest.mark.postgres
async def test_a_store_outage_is_reported_then_bounded(tmp_path: Path, fresh_pg: str) -> None:
    store = Store(fresh_pg)
    store.migrate()
    root = _root(store)
    url = make_url(fresh_pg)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    through = url.set(port=proxy.port).render_as_string(hide_password=False)
    gateway, unbounded = await asyncio.gather(
        asyncio.to_thread(start_gateway, tmp_path, through, PARAGATE_MAX_VIEW_AGE="2"),
        asyncio.to_thread(start_gateway, tmp_path, through))
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:
            assert (await http.get("/api/v2/me", headers=auth(root))).status_code == 200
            assert (await http.get(unbounded.url + "/api/v2/me",
                                   headers=auth(root))).status_code == 200
            proxy.down()
            started = time.monotonic()

            async def unreachable() -> bool:
                return (await http.get("/ready")).json()["store"] == "unreachable"

            await _until(unreachable, 3)
            assert (await http.get("/api/v2/me", headers=auth(root))).status_code == 200
            await asyncio.sleep(max(0.0, 2.3 - (time.monotonic() - started)))
            r = await http.get("/api/v2/me", headers=auth(root))
            assert r.status_code == 503 and r.json()["error"]["code"] == (
                "control_plane_unavailable")
            assert (await http.get("/ready")).json()["status"] == "stale"
            assert (await http.get("/health")).status_code == 200  # liveness holds
            # without a bound (the default) the last view keeps serving, and says so
            r = await http.get(unbounded.url + "/api/v2/me", headers=auth(root))
            assert r.status_code == 200
            ready = await http.get(unbounded.url + "/ready")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            assert ready.json()["view"]["age_seconds"] > 2
            assert ready.json()["store"] == "unreachable"
            assert "no bound" in ready.json()["reason"]
            proxy.up()

            async def serving() -> bool:
                return (await http.get("/api/v2/me", headers=auth(root))).status_code == 200

            await _until(serving, 5)
    finally:
        gateway.stop()
        unbounded.stop()
        proxy.close()
        store.close()
    log = gateway.log.read_text()
    assert "cannot refresh keys and models" in log and "s old" in log
    assert "the store answers again" in log


def _at_0002(url: str) -> None:
    """A database exactly as the previous release's migrations left it."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(Store(url).url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    engine.dispose()


async def test_a_database_of_the_previous_release_upgrades_in_place(
        store_url: str, fake: FakeVLLM, tmp_path: Path) -> None:
    _at_0002(store_url)
    engine = create_engine(Store(store_url).url)
    tokens = {}
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO models (name, display_name, type, upstream_url, upstream_model, "
            "enabled, created_at, updated_at) VALUES ('alfred-4.2', 'Alfred', 'llm', :u, "
            "'ok', true, :t, :t), ('other', 'Other', 'llm', :u, 'ok', true, :t, :t)"),
            {"u": fake.base_url, "t": "2026-11-30 10:00:00+00:00"})
        for name, admin, allowed, rpm in (
                ("admin", True, None, None), ("plain", False, None, 600),
                ("only-alfred", False, '["alfred-4.2", "gone"]', None)):
            token, public_id, secret_hash = new_key()
            tokens[name] = token
            conn.execute(text(
                "INSERT INTO api_keys (public_id, secret_hash, name, is_admin, "
                "allowed_models, rate_limit_rpm, created_at) VALUES (:p, :h, :n, :a, :m, "
                ":r, :t)"), {"p": public_id, "h": secret_hash, "n": name, "a": admin,
                             "m": allowed, "r": rpm, "t": "2026-11-30 10:00:00+00:00"})
        conn.execute(text(
            "INSERT INTO usage_records (request_id, created_at, key_id, model, stream, "
            "status, outcome, duration_ms) VALUES ('r1', :t, 2, 'alfred-4.2', false, 200, "
            "'ok', 5)"), {"t": "2026-11-30 10:00:00+00:00"})
    engine.dispose()

    store = Store(store_url)
    store.migrate()
    gw = build_gateway(store, tmp_path)
    await gw.start()
    try:
        transport = httpx.ASGITransport(app=App(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            me = {n: (await api.get("/api/v2/me", headers=auth(t))).json()
                  for n, t in tokens.items()}
            assert me["admin"]["role"] == "admin"  # `--admin` is now enforced...
            assert me["admin"]["user"]["email"] == "system-admin@paragate.invalid"
            assert me["plain"]["role"] == "user"  # ...and a plain key is a plain user
            assert me["plain"]["company"] == {"id": 1, "name": "Default"}
            assert me["only-alfred"]["key"]["models"] == ["alfred-4.2"]
            r = await api.post("/api/v2/companies", headers=auth(tokens["admin"]),
                               json={"name": "ACME"})
            assert r.status_code == 201
            r = await api.post("/api/v2/companies", headers=auth(tokens["plain"]),
                               json={"name": "ACME 2"})
            assert r.status_code == 403
            for name, model, status in (("plain", "other", 200),
                                        ("only-alfred", "alfred-4.2", 200),
                                        ("only-alfred", "other", 404)):
                r = await api.post("/api/v2/completions", headers=auth(tokens[name]),
                                   json={"model": model, "prompt": "x", "max_tokens": 1})
                assert r.status_code == status, (name, model, r.text)
            r = await api.post("/api/v2/models", headers=auth(tokens["admin"]),
                               json={"name": "third", "upstream_url": fake.base_url})
            assert r.status_code == 201, r.text  # the sequences continue past old rows
    finally:
        await gw.stop()
    # 0006: a key's rate_limit_rpm is its rate_limits' rpm
    limits = {k.record.name: k.record.rate_limits
              for k in control.keys.list_(store, CLI, limit=100).data}
    assert limits["plain"] == {"rpm": 600} and limits["admin"] is None
    (old,) = [u for u in store.list_usage() if u.request_id == "r1"]
    assert old.model_id is not None and old.user_id is not None and old.company_id == 1
    # 0004: the old record is in the rollups that reports read, with its latency bucket
    (day,) = store.usage_report(ReportQuery(start=datetime(2026, 11, 30, tzinfo=UTC),
                                            end=datetime(2026, 12, 1, tzinfo=UTC)))
    assert (day.value("requests"), day.value("duration_ms"), sum(day.latency)) == (1, 5, 1)
    assert day.latency[bucket_of(5)] == 1
    store.close()


@pytest.mark.postgres
def test_gateways_starting_at_once_migrate_one_after_the_other(
        tmp_path: Path, fresh_pg: str) -> None:
    env = {"PARAGATE_DATABASE_URL": fresh_pg}
    logs = [tmp_path / f"upgrade-{i}.log" for i in range(4)]
    runs = []
    for log in logs:
        with log.open("wb") as out:
            runs.append(subprocess.Popen([sys.executable, "-m", "paragate", "db", "upgrade"],
                                         env={**_clean_env(), **env}, stdout=out,
                                         stderr=subprocess.STDOUT))
    codes = [p.wait(120) for p in runs]
    assert codes == [0, 0, 0, 0], [log.read_text() for log in logs]
    head = max(p.name[:4] for p in (Path(paragate.store.__file__).parent / "migrations"
                                     / "versions").glob("[0-9]*.py"))
    store = Store(fresh_pg)
    try:
        with store.read() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")
                                ).scalar() == head
            assert conn.execute(text("SELECT count(*) FROM companies")).scalar() == 1
    finally:
        store.close()


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}


def test_the_cli_contract(tmp_path: Path) -> None:
    def last(*args: str) -> str:
        done = cli(tmp_path, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    company = last("companies", "create", "ACME")
    assert company.isdigit()
    user = last("users", "create", "--company", company, "--email", "ana@acme.example",
                "--name", "Ana", "--role", "company_admin", "--key-manager")
    assert user.isdigit()
    assert cli(tmp_path, "keys", "create", "--name", "x", "--models", "alfred-4.2",
               "--user", user).returncode == 1  # no such model yet
    last("models", "add", "alfred-4.2", "--upstream", "http://127.0.0.1:9/v1",
         "--upstream-model", "served", "--companies", company)
    key = last("keys", "create", "--name", "ana-laptop", "--user", user, "--models",
               "alfred-4.2", "--expires-in-days", "30")
    assert key.startswith("pg-")
    admin_key = last("keys", "create", "--name", "root", "--admin")
    default_key = last("keys", "create", "--name", "bot")
    listed = cli(tmp_path, "models", "list").stdout
    assert f"  {company}  " in listed
    last("models", "update", "alfred-4.2", "--all-companies")
    assert "  *  " in cli(tmp_path, "models", "list").stdout
    users = cli(tmp_path, "users", "list", "--company", company).stdout
    assert "ana@acme.example" in users and "company_admin" in users
    keys = cli(tmp_path, "keys", "list", "--user", user).stdout
    assert key.split("-")[1] in keys and admin_key.split("-")[1] not in keys
    keys = cli(tmp_path, "keys", "list").stdout
    assert default_key.split("-")[1] in keys and admin_key.split("-")[1] in keys
    rotated = last("keys", "rotate", key.split("-")[1])
    assert rotated.startswith(f"pg-{key.split('-')[1]}-") and rotated != key
    last("users", "update", user, "--no-key-manager", "--name", "Ana B.")
    last("companies", "update", company, "--name", "ACME Corp")
    assert "ACME Corp" in cli(tmp_path, "companies", "list").stdout
    log = cli(tmp_path, "audit", "list", "--since", "1h").stdout
    for action in ("company.create", "user.create", "api_key.create", "model.create",
                   "model.update", "api_key.rotate", "user.update", "company.update"):
        assert action in log
    entries = [json.loads(line) for line in cli(
        tmp_path, "audit", "list", "--json", "--action", "api_key.").stdout.splitlines()]
    assert entries and {e["actor"]["type"] for e in entries} == {"cli"}
    assert {e["object"] for e in entries} == {"audit_log_entry"}
    last("users", "remove", user)
    assert "revoked" in cli(tmp_path, "keys", "list", "--user", user).stdout
    last("companies", "remove", company)
    assert "ACME" not in cli(tmp_path, "companies", "list").stdout
    for secret in (key, rotated, admin_key, default_key):
        assert secret.split("-", 2)[2] not in log


_KEY = re.compile(r"pg-[0-9a-f]{12}-[A-Za-z0-9_-]{20,}")


async def test_no_secret_anywhere(tmp_path: Path, fake: FakeVLLM) -> None:
    """Every secret made (key secrets, an upstream API key) is looked for in every API
    answer after the one that created it, in the gateway's whole log (access log and
    debug level on), in the audit log and the usage records: none is found."""
    db = f"sqlite:///{tmp_path / 'g.db'}"
    store = Store(db)
    store.migrate()
    root = _root(store)
    store.close()
    gateway: GatewayProcess = await asyncio.to_thread(
        start_gateway, tmp_path, db, PARAGATE_ACCESS_LOG="true", PARAGATE_LOG_LEVEL="debug")
    upstream_key = "sk-upstream-" + uuid.uuid4().hex
    secrets = [root, upstream_key]
    answers: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            async def call(method: str, path: str, key: str, body: Any = None) -> Any:
                r = await http.request(method, path, headers=auth(key), json=body)
                answers.append(r.text)
                return r.json() if r.headers["content-type"] == "application/json" else None

            company = (await call("POST", "/api/v2/companies", root, {"name": "ACME"}))["id"]
            user = (await call("POST", "/api/v2/users", root, {
                "company_id": company, "email": "ana@acme.example", "key_manager": True}))["id"]
            r = await http.post("/api/v2/models", headers=auth(root), json={
                "name": "alfred-4.2", "upstream_url": fake.base_url, "upstream_model": "ok",
                "upstream_api_key": upstream_key})
            assert r.status_code == 201 and upstream_key not in r.text
            answers.append(r.text)
            r = await http.post("/api/v2/api-keys", headers=auth(root),
                                json={"name": "ana", "user_id": user})
            key = r.json()["key"]  # this answer holds it, once
            secrets.append(key)
            body = {"model": "alfred-4.2", "prompt": "x", "max_tokens": 2}
            await call("POST", "/api/v2/completions", key, body)
            await call("POST", "/api/v2/completions", key, {**body, "stream": True})
            r = await http.post(f"/api/v2/api-keys/{key.split('-')[1]}/rotate",
                                headers=auth(key))
            rotated = r.json()["key"]
            secrets.append(rotated)
            for wrong in (key[:-3] + "abc", rotated + "x", "pg-000000000000-" + key[-30:]):
                await call("GET", "/api/v2/models", wrong)
            await call("GET", "/api/v2/api-keys", rotated)
            await call("GET", f"/api/v2/api-keys/{key.split('-')[1]}", root)
            await call("GET", "/api/v2/models?all=true", root)
            await call("GET", "/api/v2/me", rotated)
            await call("DELETE", f"/api/v2/api-keys/{key.split('-')[1]}", root)
            await call("POST", "/api/v2/completions", rotated, body)
            await call("GET", "/api/v2/audit-log?limit=100", root)
    finally:
        gateway.stop()
    store = Store(db)
    with store.read() as conn:
        stored = json.dumps([dict(r) for r in conn.execute(select(audit_log)).mappings()],
                            default=str)
        stored += json.dumps([dict(r) for r in conn.execute(
            select(usage_records)).mappings()], default=str)
    store.close()
    places = {"answers": "\n".join(answers), "log": gateway.log.read_text(),
              "audit and usage rows": stored}
    assert "api_key.rotate" in stored and (
        '"method":"GET","endpoint":"/api/v2/models"' in places["log"])
    assert "paragate ready" in places["log"]  # paragate's own lines are there too
    assert "applied config version" in places["log"]
    for where, found in places.items():
        for secret in secrets:
            for part in (secret, secret.split("-", 2)[-1]):
                assert part not in found, f"a secret in the {where}"
        assert not _KEY.search(found), f"something shaped like a key in the {where}"

