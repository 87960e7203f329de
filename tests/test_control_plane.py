"""The control plane through the admin API, in-process: the key lifecycle, limits on
keys, the audit log, client addresses, and how the gateway's view follows the store."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from paragate import control
from paragate.app import App
from paragate.config import Settings
from paragate.control.users import SYSTEM_ADMIN
from paragate.gateway import Gateway
from paragate.store import Store

from .conftest import CLI, Keys, build_gateway, force_expiry, wait_usage
from .test_completions import assert_envelope, auth


class Tenancy:
    """A company with an admin and a key manager, beside the seeded models and keys."""

    def __init__(self, store: Store) -> None:
        self.company = control.companies.create(store, CLI, "ACME").id
        self.admin_id = control.users.create(store, CLI, company_id=self.company,
                                             email="boss@acme.example",
                                             role="company_admin").id
        self.user_id = control.users.create(store, CLI, company_id=self.company,
                                            email="ana@acme.example", key_manager=True).id
        self.plain_id = control.users.create(store, CLI, company_id=self.company,
                                             email="bo@acme.example").id
        self.admin = self._key(store, self.admin_id, "boss")
        self.user = self._key(store, self.user_id, "ana")
        self.plain = self._key(store, self.plain_id, "bo")
        made = control.keys.create(store, CLI, name="root", builtin=SYSTEM_ADMIN)
        assert made.secret is not None
        self.root = made.secret

    @staticmethod
    def _key(store: Store, user_id: int, name: str) -> str:
        secret = control.keys.create(store, CLI, name=name, user_id=user_id).secret
        assert secret is not None
        return secret


async def _gateway(store: Store, **settings: Any) -> Gateway:
    gw = build_gateway(store, Path(tempfile.mkdtemp(prefix="paragate-test-")), **settings)
    await gw.start()
    return gw


@pytest.fixture
def tenancy(store: Store, keys: Keys) -> Tenancy:
    return Tenancy(store)


@pytest.fixture
async def api(gateway: Gateway, tenancy: Tenancy) -> AsyncIterator[httpx.AsyncClient]:
    await gateway.refresher.refresh()  # the tenancy was made after the gateway started
    transport = httpx.ASGITransport(app=App(gateway), client=("10.1.2.3", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


async def complete(api: httpx.AsyncClient, key: str) -> httpx.Response:
    return await api.post("/api/v2/completions", headers=auth(key),
                          json={"model": "alfred-4.2", "prompt": "x", "max_tokens": 1})


async def test_key_lifecycle(api: httpx.AsyncClient, tenancy: Tenancy,
                             gateway: Gateway) -> None:
    r = await api.post("/api/v2/api-keys", headers=auth(tenancy.user), json={"name": "laptop"})
    assert r.status_code == 201, r.text
    made = r.json()
    secret = made["key"]
    assert secret.startswith(f"pg-{made['id']}-") and made["state"] == "active"
    assert made["user_id"] == tenancy.user_id and made["company_id"] == tenancy.company
    days = (made["expires_at"] - made["created_at"]) / 86400
    assert 179.99 < days < 180.01  # PARAGATE_DEFAULT_KEY_DAYS
    assert (await complete(api, secret)).status_code == 200
    # the secret is shown once: never again
    for path in (f"/api/v2/api-keys/{made['id']}", "/api/v2/api-keys"):
        got = await api.get(path, headers=auth(tenancy.user))
        assert got.status_code == 200 and secret.split("-", 2)[2] not in got.text
        assert "key" not in (got.json() if "list" not in got.json()["object"]
                             else got.json()["data"][0])
    # rotate: same id, new secret; the old one works during the grace
    r = await api.post(f"/api/v2/api-keys/{made['id']}/rotate", headers=auth(tenancy.user))
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["id"] == made["id"] and rotated["key"] != secret
    assert rotated["previous_secret_expires_at"] - rotated["created_at"] >= 86400
    assert (await complete(api, rotated["key"])).status_code == 200
    assert (await complete(api, secret)).status_code == 200
    # expire it: both secrets stop
    force_expiry(gateway.store, made["id"], datetime.now(UTC) - timedelta(seconds=1))
    await gateway.refresher.refresh()
    err = assert_envelope(await complete(api, rotated["key"]), 401, "invalid_api_key")
    assert "expired" in err["message"]
    # revoke: for good, and idempotent
    force_expiry(gateway.store, made["id"], None)
    await gateway.refresher.refresh()
    assert (await complete(api, rotated["key"])).status_code == 200
    r = await api.delete(f"/api/v2/api-keys/{made['id']}", headers=auth(tenancy.user))
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    err = assert_envelope(await complete(api, rotated["key"]), 401, "invalid_api_key")
    assert "revoked" in err["message"]
    r = await api.delete(f"/api/v2/api-keys/{made['id']}", headers=auth(tenancy.user))
    assert r.status_code == 200
    r = await api.post(f"/api/v2/api-keys/{made['id']}/rotate", headers=auth(tenancy.user))
    assert_envelope(r, 409, "conflict")


async def test_rotation_without_grace_refuses_the_old_secret_at_once(
        store: Store, tenancy: Tenancy) -> None:
    gw = await _gateway(store, key_rotation_grace=0)
    try:
        transport = httpx.ASGITransport(app=App(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            assert (await complete(api, tenancy.user)).status_code == 200  # now cached
            public_id = tenancy.user.split("-")[1]
            r = await api.post(f"/api/v2/api-keys/{public_id}/rotate",
                               headers=auth(tenancy.user))
            assert r.status_code == 200 and r.json()["previous_secret_expires_at"] is None
            assert_envelope(await complete(api, tenancy.user), 401, "invalid_api_key")
            assert (await complete(api, r.json()["key"])).status_code == 200
    finally:
        await gw.stop()


async def test_the_old_secret_stops_when_the_grace_ends(store: Store,
                                                        tenancy: Tenancy) -> None:
    gw = await _gateway(store, key_rotation_grace=1)
    try:
        transport = httpx.ASGITransport(app=App(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            public_id = tenancy.user.split("-")[1]
            r = await api.post(f"/api/v2/api-keys/{public_id}/rotate",
                               headers=auth(tenancy.user))
            assert (await complete(api, tenancy.user)).status_code == 200  # cached now
            await asyncio.sleep(1.1)
            err = assert_envelope(await complete(api, tenancy.user), 401, "invalid_api_key")
            assert "rotated" in err["message"]
            assert (await complete(api, r.json()["key"])).status_code == 200
    finally:
        await gw.stop()


async def test_at_most_five_active_keys(api: httpx.AsyncClient, tenancy: Tenancy) -> None:
    made = []
    for i in range(4):  # ana holds one already
        r = await api.post("/api/v2/api-keys", headers=auth(tenancy.user),
                           json={"name": f"k{i}"})
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
    r = await api.post("/api/v2/api-keys", headers=auth(tenancy.user), json={"name": "k5"})
    err = assert_envelope(r, 409, "conflict")
    assert "5 active keys" in err["message"]
    # a revoked key frees its place
    await api.delete(f"/api/v2/api-keys/{made[0]}", headers=auth(tenancy.user))
    r = await api.post("/api/v2/api-keys", headers=auth(tenancy.user), json={"name": "k5"})
    assert r.status_code == 201
    # the built-in system admin is exempt
    for i in range(6):
        r = await api.post("/api/v2/api-keys", headers=auth(tenancy.root),
                           json={"name": f"root{i}"})
        assert r.status_code == 201, r.text


async def test_an_expired_key_brought_back_counts_again(
        api: httpx.AsyncClient, tenancy: Tenancy, gateway: Gateway) -> None:
    old = tenancy.user.split("-")[1]
    force_expiry(gateway.store, old, datetime.now(UTC) - timedelta(seconds=1))
    for i in range(5):  # the expired one leaves room for five
        r = await api.post("/api/v2/api-keys", headers=auth(tenancy.root),
                           json={"name": f"k{i}", "user_id": tenancy.user_id})
        assert r.status_code == 201, r.text
    r = await api.patch(f"/api/v2/api-keys/{old}", headers=auth(tenancy.root),
                        json={"expires_at": None})
    assert_envelope(r, 409, "conflict")
    r = await api.patch(f"/api/v2/api-keys/{old}", headers=auth(tenancy.root),
                        json={"name": "still expired"})
    assert r.status_code == 200 and r.json()["state"] == "expired"


async def test_a_company_admin_cannot_revoke_a_system_admins_key(
        store: Store, keys: Keys) -> None:
    boss = control.users.create(store, CLI, company_id=1, email="boss@example.com",
                                role="company_admin").id
    boss_key = control.keys.create(store, CLI, name="boss", user_id=boss).secret
    assert boss_key is not None
    root = control.keys.create(store, CLI, name="root", builtin=SYSTEM_ADMIN)
    gw = await _gateway(store)
    try:
        transport = httpx.ASGITransport(app=App(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            r = await api.delete(f"/api/v2/api-keys/{root.record.public_id}",
                                 headers=auth(boss_key))
            assert_envelope(r, 403, "permission_denied")
            assert (await api.get("/api/v2/me", headers=auth(root.secret or ""))
                    ).status_code == 200
    finally:
        await gw.stop()


@pytest.mark.parametrize(("body", "param", "code"), [
    ({}, "name", "missing_field"),
    ({"name": ""}, "name", "invalid_value"),
    ({"name": "x" * 51}, "name", "invalid_value"),
    ({"name": 5}, "name", "invalid_type"),
    ({"name": "k", "colour": "red"}, "colour", "unknown_field"),
    ({"name": "k", "expires_at": 1}, "expires_at", "invalid_value"),
    ({"name": "k", "models": []}, "models", "invalid_value"),
    ({"name": "k", "rate_limit_rpm": 0}, "rate_limit_rpm", "invalid_value"),
    ({"name": "k", "usage_opt_in": "yes"}, "usage_opt_in", "invalid_type"),
])
async def test_key_bodies_are_checked(api: httpx.AsyncClient, tenancy: Tenancy,
                                      body: dict[str, Any], param: str, code: str) -> None:
    r = await api.post("/api/v2/api-keys", headers=auth(tenancy.user), json=body)
    assert_envelope(r, 400, code, param)


async def test_keys_name_models_and_never_expire(api: httpx.AsyncClient,
                                                 tenancy: Tenancy) -> None:
    r = await api.post("/api/v2/api-keys", headers=auth(tenancy.user),
                       json={"name": "k", "models": ["alfred-4.2"], "expires_at": None,
                             "usage_opt_in": False})
    assert r.status_code == 201, r.text
    key = r.json()
    assert key["expires_at"] is None and key["models"] == ["alfred-4.2"]
    assert key["usage_opt_in"] is False
    r = await api.post("/api/v2/completions", headers=auth(key["key"]),
                       json={"model": "limited", "prompt": "x"})
    assert_envelope(r, 404, "model_not_found", "model")
    me = (await api.get("/api/v2/me", headers=auth(key["key"]))).json()
    assert me["key"]["models"] == ["alfred-4.2"] and me["role"] == "user"
    assert me["company"]["id"] == tenancy.company and me["user"]["key_manager"] is True
    # a model that the key's company may not use does not exist for its holder
    r = await api.post("/api/v2/api-keys", headers=auth(tenancy.user),
                       json={"name": "k", "models": ["off"]})
    assert_envelope(r, 404, "model_not_found", "models")


async def test_a_renamed_model_keeps_its_keys(api: httpx.AsyncClient, tenancy: Tenancy,
                                              gateway: Gateway) -> None:
    r = await api.post("/api/v2/api-keys", headers=auth(tenancy.user),
                       json={"name": "k", "models": ["alfred-4.2"]})
    key = r.json()["key"]
    r = await api.patch("/api/v2/models/alfred-4.2", headers=auth(tenancy.root),
                        json={"name": "alfred-5"})
    assert r.status_code == 200 and r.json()["id"] == "alfred-5"
    r = await api.post("/api/v2/completions", headers=auth(key),
                       json={"model": "alfred-5", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "alfred-5"
    assert_envelope(await complete(api, key), 404, "model_not_found", "model")
    *_, done, refused = await wait_usage(  # the 404 is recorded too
        gateway.store, lambda rows: bool(rows) and rows[-1].status == 404)
    assert done.model == "alfred-5" and done.model_id is not None and done.status == 200
    assert done.company_id == tenancy.company and done.user_id == tenancy.user_id
    assert (refused.model, refused.model_id, refused.status) == ("alfred-4.2", None, 404)


async def test_models_per_company(api: httpx.AsyncClient, tenancy: Tenancy,
                                  gateway: Gateway) -> None:
    other = control.companies.create(gateway.store, CLI, "Other").id
    r = await api.patch("/api/v2/models/alfred-4.2", headers=auth(tenancy.root),
                        json={"companies": [other]})
    assert r.status_code == 200 and r.json()["companies"] == [other]
    missing = await api.post("/api/v2/completions", headers=auth(tenancy.user),
                             json={"model": "nope", "prompt": "x"})
    hidden = await api.post("/api/v2/completions", headers=auth(tenancy.user),
                            json={"model": "alfred-4.2", "prompt": "x"})
    assert hidden.status_code == missing.status_code == 404
    assert hidden.text == missing.text.replace("nope", "alfred-4.2")
    # the system admin too uses only what its own company may use
    assert (await complete(api, tenancy.root)).status_code == 404
    listed = await api.get("/api/v2/models", headers=auth(tenancy.root))
    assert "alfred-4.2" not in [m["id"] for m in listed.json()["data"]]
    every = await api.get("/api/v2/models?all=true", headers=auth(tenancy.root))
    names = {m["id"]: m for m in every.json()["data"]}
    assert names["alfred-4.2"]["companies"] == [other] and "off" in names
    assert names["off"]["enabled"] is False
    r = await api.patch("/api/v2/models/alfred-4.2", headers=auth(tenancy.root),
                        json={"companies": [tenancy.company]})
    assert (await complete(api, tenancy.user)).status_code == 200
    r = await api.get("/api/v2/models?all=true", headers=auth(tenancy.user))
    assert_envelope(r, 403, "permission_denied")
    r = await api.get("/api/v2/models?all=maybe", headers=auth(tenancy.root))
    assert_envelope(r, 400, "invalid_type", "all")
    r = await api.get("/api/v2/models/alfred-4.2?colour=red", headers=auth(tenancy.root))
    assert_envelope(r, 400, "unknown_field", "colour")


async def test_models_configuration_is_for_system_admins_only(
        api: httpx.AsyncClient, tenancy: Tenancy) -> None:
    r = await api.post("/api/v2/models", headers=auth(tenancy.root), json={
        "name": "m2", "upstream_url": "http://127.0.0.1:9/v1", "upstream_api_key": "sk-up-1",
        "limits": {"max_tokens_limit": 10}})
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["has_upstream_api_key"] is True and "sk-up-1" not in r.text
    assert model["limits"] == {"max_logprobs": None, "default_max_tokens": None,
                               "max_tokens_limit": 10, "max_prompts": None, "max_n": None,
                               "max_request_tokens": None}
    assert model["rate_limits"] == dict.fromkeys(
        ("rpm", "tpm", "max_concurrent", "daily_tokens", "monthly_tokens"))
    for who in (tenancy.user, tenancy.admin):
        seen = await api.get("/api/v2/models/m2", headers=auth(who))
        assert set(seen.json()) == {"id", "object", "created", "owned_by", "display_name",
                                    "type"}
    # the upstream key and URL are checked where the API and the CLI both pass
    for body, param in (({"upstream_api_key": "a\r\nX-Evil: 1"}, "upstream_api_key"),
                        ({"upstream_url": "http://h/v1\r\nX: y"}, "upstream_url"),
                        ({"upstream_url": "ftp://h"}, "upstream_url")):
        r = await api.patch("/api/v2/models/m2", headers=auth(tenancy.root), json=body)
        assert_envelope(r, 400, "invalid_value", param)
    r = await api.delete("/api/v2/models/m2", headers=auth(tenancy.root))
    assert r.json() == {"object": "model", "id": "m2", "deleted": True}
    r = await api.post("/api/v2/models", headers=auth(tenancy.root),
                       json={"name": "m2", "upstream_url": "http://127.0.0.1:9/v1"})
    assert r.status_code == 201  # a deleted model's name is free again


async def test_every_change_is_audited(api: httpx.AsyncClient, tenancy: Tenancy) -> None:
    r = await api.post("/api/v2/users", headers=auth(tenancy.admin),
                       json={"email": "Cy@ACME.example", "role": "company_admin"})
    assert r.status_code == 201, r.text
    user = r.json()
    assert user["email"] == "cy@acme.example" and user["company_id"] == tenancy.company
    r = await api.post("/api/v2/users", headers=auth(tenancy.admin),
                       json={"email": "cy@acme.example"})
    assert_envelope(r, 409, "conflict", "email")
    await api.patch(f"/api/v2/users/{user['id']}", headers=auth(tenancy.admin),
                    json={"key_manager": True})
    r = await api.get("/api/v2/audit-log?target=user:" + str(user["id"]),
                      headers=auth(tenancy.admin))
    entries = r.json()["data"]
    assert [e["action"] for e in entries] == ["user.create", "user.update"]
    update = entries[1]
    assert update["changes"] == {"key_manager": [False, True]}
    assert update["actor"] == {"type": "user", "user_id": tenancy.admin_id,
                               "key_id": tenancy.admin.split("-")[1]}
    assert update["client_addr"] == "10.1.2.3" and update["request_id"]
    assert update["company_id"] == tenancy.company
    # a company admin reads their company's rows only; the CLI's rows are marked so
    r = await api.get("/api/v2/audit-log?actor=cli&limit=100", headers=auth(tenancy.root))
    assert all(e["actor"]["type"] == "cli" for e in r.json()["data"])
    r = await api.get("/api/v2/audit-log?limit=100", headers=auth(tenancy.admin))
    assert {e["company_id"] for e in r.json()["data"]} == {tenancy.company}
    r = await api.get("/api/v2/audit-log?action=api_key.&limit=2", headers=auth(tenancy.root))
    page = r.json()
    assert page["has_more"] and len(page["data"]) == 2
    nxt = await api.get(f"/api/v2/audit-log?action=api_key.&after={page['last_id']}",
                        headers=auth(tenancy.root))
    assert nxt.json()["data"][0]["id"] > page["last_id"]
    assert all(e["action"].startswith("api_key.") for e in nxt.json()["data"])


async def test_client_address_from_trusted_proxies_only(store: Store,
                                                        tenancy: Tenancy) -> None:
    gw = await _gateway(store, trusted_proxies="10.0.0.0/8")
    try:
        for peer, forwarded, expected in (
            ("10.1.2.3", "198.51.100.7, 10.9.9.9", "198.51.100.7"),  # proxy chain
            ("203.0.113.5", "198.51.100.7", "203.0.113.5"),  # not a proxy: ignored
            ("10.1.2.3", None, "10.1.2.3"),
        ):
            transport = httpx.ASGITransport(app=App(gw), client=(peer, 1234))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
                headers = auth(tenancy.root)
                if forwarded:
                    headers["x-forwarded-for"] = forwarded
                r = await api.post("/api/v2/companies", headers=headers,
                                   json={"name": f"from {peer} {forwarded}"})
                assert r.status_code == 201, r.text
                entry = control.audit.list_(store, CLI, target=f"company:{r.json()['id']}")
                assert entry.data[0].client_addr == expected
    finally:
        await gw.stop()


async def test_deleting_a_company_revokes_its_keys_and_keeps_history(
        api: httpx.AsyncClient, tenancy: Tenancy, gateway: Gateway) -> None:
    assert (await complete(api, tenancy.user)).status_code == 200
    r = await api.delete(f"/api/v2/companies/{tenancy.company}", headers=auth(tenancy.root))
    assert r.status_code == 200 and r.json()["deleted"] is True
    for key in (tenancy.user, tenancy.admin, tenancy.plain):
        assert_envelope(await complete(api, key), 401, "invalid_api_key")
    r = await api.get(f"/api/v2/users/{tenancy.user_id}", headers=auth(tenancy.root))
    assert_envelope(r, 404, "not_found")
    keys = control.keys.list_(gateway.store, CLI, company_id=tenancy.company, limit=100)
    assert {k.state for k in keys.data} == {"revoked"}
    await wait_usage(gateway.store,
                     lambda rows: any(u.company_id == tenancy.company for u in rows))
    r = await api.get(f"/api/v2/audit-log?target=company:{tenancy.company}",
                      headers=auth(tenancy.root))
    assert [e["action"] for e in r.json()["data"]] == ["company.create", "company.delete"]
    r = await api.delete("/api/v2/companies/1", headers=auth(tenancy.root))
    assert_envelope(r, 409, "conflict")


@pytest.mark.postgres
async def test_refresh_does_not_wait_behind_usage_writes(postgres_url: str, store: Store,
                                                         tenancy: Tenancy) -> None:
    """Regression: the refresh shared the one store thread with usage batches, so a slow
    insert delayed a revocation by as long as the insert took. Here the insert really
    waits: another session holds a lock on the usage table."""
    if not store.is_postgres:
        pytest.skip("a lock on one table is a PostgreSQL test")
    gw = await _gateway(store)
    blocker = create_engine(postgres_url)
    try:
        with blocker.connect() as conn:
            conn.execute(text("LOCK TABLE usage_records IN ACCESS EXCLUSIVE MODE"))
            transport = httpx.ASGITransport(app=App(gw))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
                assert (await complete(api, tenancy.user)).status_code == 200
                await asyncio.sleep(0.3)  # the usage writer is now stuck on the lock
                assert gw.writer.written == 0 and gw.journal.pending() == 1
                await asyncio.to_thread(control.keys.revoke, store, CLI,
                                        tenancy.user.split("-")[1])
                revoked_at = time.monotonic()
                while (await complete(api, tenancy.user)).status_code == 200:
                    assert time.monotonic() - revoked_at < 1.0, "the revocation waited"
                    await asyncio.sleep(0.02)
            conn.rollback()  # the lock goes; the usage records follow
    finally:
        await gw.stop()
        blocker.dispose()
    assert len(store.list_usage()) >= 1


async def test_last_used_is_written_in_batches(store: Store, tenancy: Tenancy) -> None:
    gw = await _gateway(store)
    try:
        transport = httpx.ASGITransport(app=App(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
            for _ in range(3):
                assert (await complete(api, tenancy.user)).status_code == 200
        public_id = tenancy.user.split("-")[1]
        assert control.keys.get(store, CLI, public_id).record.last_used_at is None
        await gw.touches.flush()  # what the 10 s timer (and shutdown) does
        used = control.keys.get(store, CLI, public_id).record.last_used_at
        assert used is not None and abs(used.timestamp() - time.time()) < 5
    finally:
        await gw.stop()


def test_settings_of_the_control_plane() -> None:
    s = Settings()
    assert (s.default_key_days, s.max_keys_per_user, s.key_rotation_grace) == (180, 5, 86400)
    assert s.max_view_age == 0 and s.proxy_networks() == ()


async def test_cached_principals_follow_role_changes(
        api: httpx.AsyncClient, tenancy: Tenancy, gateway: Gateway) -> None:
    assert (await api.get("/api/v2/users", headers=auth(tenancy.plain))).status_code == 403
    control.users.update(gateway.store, CLI, tenancy.plain_id, role="company_admin")
    await gateway.refresher.refresh()
    assert (await api.get("/api/v2/users", headers=auth(tenancy.plain))).status_code == 200



async def test_the_gateway_stops_right_after_a_wake_up(store: Store) -> None:
    """Regression: the refresher waited with ``asyncio.wait_for``, which on Python 3.11
    swallows a cancellation that arrives while the event it waits on is being set; a
    wake-up (the LISTEN thread's, on every NOTIFY) just before ``stop()`` made the
    shutdown wait for ever."""
    gw = await _gateway(store, refresh_interval=60)
    await asyncio.sleep(0.3)  # idle: waiting for a wake-up
    gw.refresher.wake()
    await asyncio.sleep(0)  # the wake-up is applied; the refresher has not run yet
    stopping = asyncio.create_task(gw.stop())
    done, _ = await asyncio.wait({stopping}, timeout=2)
    if not done:
        stopping.cancel()  # a second cancellation ends the old loop: no hung test run
    await stopping
    assert done, "Gateway.stop() did not return within 2 s"


# -- log_payloads: prompts and completions in the log, per model, off by default -----------


async def test_log_payloads_through_the_api(api: httpx.AsyncClient, tenancy: Tenancy,
                                            gateway: Gateway) -> None:
    root = auth(tenancy.root)
    r = await api.post("/api/v2/models", headers=root, json={
        "name": "quiet", "upstream_url": "http://127.0.0.1:9/v1"})
    assert r.status_code == 201 and r.json()["log_payloads"] is False  # the default
    r = await api.post("/api/v2/models", headers=root, json={
        "name": "loud", "upstream_url": "http://127.0.0.1:9/v1", "log_payloads": True})
    assert r.status_code == 201, r.text
    assert r.json()["log_payloads"] is True
    assert gateway.registry.routes["loud"].log_payloads is True  # the Route has it
    assert gateway.registry.routes["quiet"].log_payloads is False
    seen = await api.get("/api/v2/models/loud", headers=root)
    assert seen.json()["log_payloads"] is True
    for who in (tenancy.user, tenancy.admin):  # configuration: system admins only
        seen = await api.get("/api/v2/models/loud", headers=auth(who))
        assert seen.status_code == 200 and "log_payloads" not in seen.json()
    # a change that leaves it alone keeps it; false clears it
    r = await api.patch("/api/v2/models/loud", headers=root, json={"display_name": "Loud"})
    assert r.json()["log_payloads"] is True
    r = await api.patch("/api/v2/models/loud", headers=root, json={"log_payloads": False})
    assert r.status_code == 200 and r.json()["log_payloads"] is False
    assert gateway.registry.routes["loud"].log_payloads is False
    r = await api.patch("/api/v2/models/quiet", headers=root, json={"log_payloads": True})
    assert r.json()["log_payloads"] is True
    # anything but a boolean is refused, in the envelope, naming the field
    for method, path, body in (
            ("POST", "/api/v2/models", {"name": "m3", "upstream_url": "http://h/v1",
                                        "log_payloads": "yes"}),
            ("POST", "/api/v2/models", {"name": "m3", "upstream_url": "http://h/v1",
                                        "log_payloads": 1}),
            ("PATCH", "/api/v2/models/quiet", {"log_payloads": "false"}),
            ("PATCH", "/api/v2/models/quiet", {"log_payloads": 0}),
            ("PATCH", "/api/v2/models/quiet", {"log_payloads": None})):
        r = await api.request(method, path, headers=root, json=body)
        assert_envelope(r, 400, "invalid_type", "log_payloads",
                        type_="invalid_request_error")
    assert gateway.registry.routes["quiet"].log_payloads is True  # nothing changed
    assert "m3" not in gateway.registry.routes
    # audited like every model field: on create even when off, on update when changed
    entries = {}
    for name in ("loud", "quiet"):
        model_id = gateway.registry.routes[name].id
        r = await api.get(f"/api/v2/audit-log?target=model:{model_id}", headers=root)
        entries[name] = r.json()["data"]
    assert [e["action"] for e in entries["loud"]] == ["model.create", "model.update",
                                                      "model.update"]
    assert entries["loud"][0]["changes"]["log_payloads"] == [None, True]
    assert entries["loud"][1]["changes"] == {"display_name": ["loud", "Loud"]}
    assert entries["loud"][2]["changes"] == {"log_payloads": [True, False]}
    assert entries["quiet"][0]["changes"]["log_payloads"] == [None, False]
    assert entries["quiet"][1]["changes"] == {"log_payloads": [False, True]}
    assert entries["loud"][2]["actor"]["user_id"] is not None


def test_log_payloads_is_checked_below_the_api(store: Store) -> None:
    """The CLI's path, ``control``, refuses what the API's body types would."""
    from paragate.errors import InvalidRequest

    control.models.create(store, CLI, "m", upstream_url="http://h/v1")
    for value, words in (("yes", "true or false"), (1, "true or false"),
                         (None, "cannot be unset")):
        with pytest.raises(InvalidRequest, match=words) as err:
            control.models.update(store, CLI, "m", log_payloads=value)
        assert err.value.param == "log_payloads"
    with pytest.raises(InvalidRequest, match="true or false"):
        control.models.create(store, CLI, "n", upstream_url="http://h/v1", log_payloads="on")
    assert control.models.get(store, CLI, "m").log_payloads is False
    assert control.models.update(store, CLI, "m", log_payloads=True).log_payloads is True


def _payload_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "log_payloads" in r.getMessage()]


async def test_a_warning_names_the_models_whose_payloads_are_logged(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="paragate")
    control.models.create(store, CLI, "alfred-4.2", upstream_url="http://127.0.0.1:9/v1",
                          log_payloads=True)
    control.models.create(store, CLI, "beta", upstream_url="http://127.0.0.1:9/v1")
    control.models.create(store, CLI, "gamma", upstream_url="http://127.0.0.1:9/v1")
    gw = await _gateway(store, refresh_interval=60)  # only our refreshes below
    try:
        # at start-up: one line, naming the one model
        assert _payload_warnings(caplog) == [
            "prompts and completions of model(s) alfred-4.2 are written to the log "
            "(log_payloads is on)"]
        assert {r.name for r in caplog.records if "log_payloads" in r.getMessage()} == {
            "paragate.registry"}
        caplog.clear()
        # a refresh that changes other things, or nothing, says nothing again
        control.models.update(store, CLI, "beta", display_name="Beta")
        control.models.update(store, CLI, "alfred-4.2", max_n=4)
        await gw.refresher.refresh()
        await gw.refresher.refresh()
        assert _payload_warnings(caplog) == []
        # the set changes: one line naming them all
        control.models.update(store, CLI, "beta", log_payloads=True)
        await gw.refresher.refresh()
        assert _payload_warnings(caplog) == [
            "prompts and completions of model(s) alfred-4.2, beta are written to the log "
            "(log_payloads is on)"]
        caplog.clear()
        # a rename or a disabled model changes the names that log
        control.models.update(store, CLI, "alfred-4.2", name="alfred-5", enabled=False)
        await gw.refresher.refresh()
        assert _payload_warnings(caplog) == [
            "prompts and completions of model(s) beta are written to the log "
            "(log_payloads is on)"]
        caplog.clear()
        # none any more: no warning, one line saying so
        control.models.update(store, CLI, "beta", log_payloads=False)
        await gw.refresher.refresh()
        assert _payload_warnings(caplog) == []
        assert "no model's prompts and completions are written to the log any more" in (
            caplog.text)
        caplog.clear()
        control.models.update(store, CLI, "gamma", display_name="Gamma")
        await gw.refresher.refresh()
        assert "written to the log" not in caplog.text
    finally:
        await gw.stop()
    # a gateway that starts with no such model says nothing about it
    caplog.clear()
    quiet = await _gateway(store, refresh_interval=60)
    await quiet.stop()
    assert "written to the log" not in caplog.text

