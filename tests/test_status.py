"""Health, readiness and the platform status: ``/health`` is liveness and nothing else,
``/ready`` says why this process would or would not take traffic (503 ``stale`` exactly
while requests are refused: a real `paragate serve` whose PostgreSQL is cut off by a TCP
proxy the test owns), and ``GET /api/v2/status`` tells a key which of its models can
take a request now (the replicas' counts for system admins only)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from paragate import control
from paragate.app import App
from paragate.gateway import Gateway
from paragate.store import Store

from .conftest import CLI, Keys, add_model, build_gateway, make_key, seed
from .fake_vllm import FakeVLLM
from .servers import TcpProxy, start_gateway
from .test_completions import assert_envelope, auth
from .test_openapi import conforms

DEAD = "http://127.0.0.1:9/v1"  # nothing listens there: connections are refused


@dataclass
class Setup:
    gw: Gateway
    api: httpx.AsyncClient
    keys: Keys
    company_admin: str
    doc: dict[str, Any]


@pytest.fixture
async def setup(tmp_path: Path, sqlite_template: Path,
                fake: FakeVLLM) -> AsyncIterator[Setup]:
    """The seeded models (``down``: one replica that refuses connections), and two
    more: ``pair`` (one healthy replica, one that refuses connections) and ``drained``
    (its one replica draining); health checks often enough to eject within a second."""
    shutil.copyfile(sqlite_template, tmp_path / "paragate.db")
    store = Store(f"sqlite:///{tmp_path / 'paragate.db'}")
    keys = seed(store, fake)
    add_model(store, "pair", fake.base_url, "ok")
    control.replicas.create(store, CLI, "pair", url=DEAD)
    add_model(store, "drained", fake.base_url, "ok")
    (only,) = control.replicas.list_(store, CLI, "drained")[1]
    control.replicas.update(store, CLI, "drained", only.id, draining=True)
    user = control.users.create(store, CLI, company_id=1, email="ca@acme.example",
                                role="company_admin")
    company_admin, _ = make_key(store, "ca", user_id=user.id)
    gw = build_gateway(store, tmp_path, health_interval=0.05, health_timeout=0.5)
    await gw.start()
    transport = httpx.ASGITransport(app=App(gw))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            doc = (await api.get("/api/v2/openapi.json")).json()
            yield Setup(gw, api, keys, company_admin, doc)
    finally:
        await gw.stop()
        store.close()


def _schema(doc: dict[str, Any], path: str, code: int) -> dict[str, Any]:
    schema: dict[str, Any] = doc["paths"][path]["get"]["responses"][str(code)]["content"][
        "application/json"]["schema"]
    return schema


async def _ready(s: Setup, code: int) -> dict[str, Any]:
    r = await s.api.get("/ready")
    assert r.status_code == code, r.text
    body: dict[str, Any] = r.json()
    conforms(s.doc, _schema(s.doc, "/ready", code), body, "/ready")
    return body


async def _status(s: Setup, key: str) -> dict[str, Any]:
    r = await s.api.get("/api/v2/status", headers=auth(key))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    conforms(s.doc, _schema(s.doc, "/api/v2/status", 200), body, "/api/v2/status")
    return body


# -- /health and /ready ---------------------------------------------------------------------


async def test_health_is_liveness_and_nothing_else(setup: Setup) -> None:
    for draining in (False, True):
        setup.gw.shutdown.draining = draining
        r = await setup.api.get("/health")
        assert r.status_code == 200 and r.content == b'{"status":"ok"}'
        assert r.headers["content-type"] == "application/json"
        conforms(setup.doc, _schema(setup.doc, "/health", 200), r.json(), "/health")


async def test_ready_says_why(setup: Setup) -> None:
    body = await _ready(setup, 200)
    assert body["status"] == "ready" and body["reason"] == "Serving requests."
    assert body["store"] == "ok"
    assert body["view"]["version"] == setup.gw.registry.version > 0
    assert body["view"]["age_seconds"] >= 0 and body["view"]["max_view_age"] is None


async def test_ready_is_503_while_draining_and_requests_are_still_served(
        setup: Setup) -> None:
    setup.gw.shutdown.draining = True
    body = await _ready(setup, 503)
    assert body["status"] == "draining" and "Shutting down" in body["reason"]
    assert body["store"] == "ok"  # information, not the reason
    # the load balancer is told first; the process still answers until it closes
    r = await setup.api.get("/api/v2/models", headers=auth(setup.keys.full))
    assert r.status_code == 200


async def test_ready_is_503_before_the_first_view_has_loaded(
        tmp_path: Path, sqlite_template: Path) -> None:
    shutil.copyfile(sqlite_template, tmp_path / "paragate.db")
    store = Store(f"sqlite:///{tmp_path / 'paragate.db'}")
    gw = build_gateway(store, tmp_path)  # never started: no view yet
    transport = httpx.ASGITransport(app=App(gw))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            r = await api.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "starting"
            assert "not loaded" in r.json()["reason"]
            assert (await api.get("/health")).status_code == 200
    finally:
        store.close()


# -- /api/v2/status ---------------------------------------------------------------------------


async def _until_ejected(s: Setup) -> dict[str, Any]:
    """The system admin's status once the health checks have ejected every replica
    that refuses connections (``down``'s one, ``pair``'s second)."""
    deadline = time.monotonic() + 15
    while True:
        body = await _status(s, s.keys.admin)
        models = {m["id"]: m for m in body["models"]}
        if (models["down"]["replicas"]["ejected"] == 1
                and models["pair"]["replicas"]["ejected"] == 1):
            return body
        assert time.monotonic() < deadline, f"never ejected: {body}"
        await asyncio.sleep(0.05)


async def test_a_model_whose_replicas_are_all_down_is_unavailable_and_ready_stays_200(
        setup: Setup) -> None:
    admin = await _until_ejected(setup)
    assert admin["object"] == "status" and admin["status"] == "degraded"
    models = {m["id"]: m for m in admin["models"]}
    assert [m["id"] for m in admin["models"]] == sorted(models)  # by name
    assert "off" not in models  # disabled: nobody may use it
    assert models["alfred-4.2"] == {
        "id": "alfred-4.2", "type": "llm", "available": True,
        "replicas": {"total": 1, "healthy": 1, "ejected": 0, "draining": 0}}
    assert models["embedder"]["type"] == "embedding" and models["embedder"]["available"]
    assert models["down"] == {
        "id": "down", "type": "llm", "available": False,
        "replicas": {"total": 1, "healthy": 0, "ejected": 1, "draining": 0}}
    assert models["pair"] == {  # one replica left is enough
        "id": "pair", "type": "llm", "available": True,
        "replicas": {"total": 2, "healthy": 1, "ejected": 1, "draining": 0}}
    assert models["drained"] == {
        "id": "drained", "type": "llm", "available": False,
        "replicas": {"total": 1, "healthy": 0, "ejected": 0, "draining": 1}}

    # one dead model must not take the process out of its load balancer
    ready = await _ready(setup, 200)
    assert ready["status"] == "ready"
    # "unavailable" is what a request finds: an immediate 503, the others served
    r = await setup.api.post("/api/v2/completions", headers=auth(setup.keys.full),
                             json={"model": "down", "prompt": "x", "max_tokens": 2})
    assert_envelope(r, 503, "no_healthy_replica", type_="upstream_error")
    for model in ("alfred-4.2", "pair"):
        r = await setup.api.post("/api/v2/completions", headers=auth(setup.keys.full),
                                 json={"model": model, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text


async def test_only_system_admins_see_replica_counts(setup: Setup) -> None:
    admin = await _until_ejected(setup)
    for key in (setup.keys.full, setup.company_admin):
        body = await _status(setup, key)
        assert body["status"] == "degraded"
        assert "replicas" not in str(body) and "healthy" not in str(body)
        assert body["models"] == [{k: v for k, v in m.items() if k != "replicas"}
                                  for m in admin["models"]]


async def test_status_covers_the_models_the_key_may_use(setup: Setup) -> None:
    await _until_ejected(setup)
    body = await _status(setup, setup.keys.restricted)  # alfred-4.2 only
    assert body == {"object": "status", "status": "ok", "models": [
        {"id": "alfred-4.2", "type": "llm", "available": True}]}


@pytest.mark.parametrize("which", [None, "revoked", "expired"])
async def test_status_needs_a_valid_key(setup: Setup, which: str | None) -> None:
    headers = auth(getattr(setup.keys, which)) if which else {}
    r = await setup.api.get("/api/v2/status", headers=headers)
    assert_envelope(r, 401, "invalid_api_key", type_="authentication_error")


# -- a store outage, in a real process ------------------------------------------------------


@pytest.mark.postgres
async def test_ready_is_stale_exactly_while_requests_are_refused(
        tmp_path: Path, pg_store: Store) -> None:
    root, _ = make_key(pg_store, "root", is_admin=True)
    url = pg_store.url
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    through = url.set(port=proxy.port).render_as_string(hide_password=False)
    gateway = await asyncio.to_thread(start_gateway, tmp_path, through,
                                      PARAGATE_MAX_VIEW_AGE="2")
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:
            r = await http.get("/ready")
            assert r.status_code == 200, r.text
            before = r.json()
            assert before["status"] == "ready" and before["store"] == "ok"
            assert before["view"]["max_view_age"] == 2
            proxy.down()
            # At each step a request with a key sits between two looks at /ready: the
            # view only ages while the store is down, so a request served means /ready
            # was still 200 before it, and a request refused that it is 503 after.
            deadline = time.monotonic() + 20
            while True:
                first = await http.get("/ready")
                me = await http.get("/api/v2/me", headers=auth(root))
                then = await http.get("/ready")
                if me.status_code == 200:
                    assert first.status_code == 200 and first.json()["status"] == "ready"
                else:
                    assert_envelope(me, 503, "control_plane_unavailable")
                    assert then.status_code == 503, then.text
                    break
                assert time.monotonic() < deadline, "requests were never refused"
                await asyncio.sleep(0.05)
            stale = then.json()
            assert stale["status"] == "stale" and stale["store"] == "unreachable"
            assert stale["view"]["age_seconds"] > 2
            assert stale["view"]["version"] == before["view"]["version"]
            assert "PARAGATE_MAX_VIEW_AGE (2 s)" in stale["reason"]
            # liveness holds: an orchestrator must not restart every instance over it
            live = await http.get("/health")
            assert live.status_code == 200 and live.json() == {"status": "ok"}

            proxy.up()
            deadline = time.monotonic() + 20
            while (r := await http.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline, f"never ready again: {r.text}"
                await asyncio.sleep(0.05)
            assert r.json()["status"] == "ready"
            assert (await http.get("/api/v2/me", headers=auth(root))).status_code == 200
    finally:
        gateway.stop()
        proxy.close()
