"""The route table: authentication around every route but the public ones."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from paragate import control
from paragate.app import PUBLIC_PATHS, ROUTES

from .conftest import CLI, Keys, caught_up
from .test_completions import assert_envelope, auth


def concrete(path: str) -> str:
    return path.replace("{model}", "alfred-4.2").replace("{id}", "1")


PROTECTED = [(p, m) for p, methods in ROUTES.items() for m in methods if p not in PUBLIC_PATHS]


def test_public_routes_are_few_and_known() -> None:
    assert set(PUBLIC_PATHS) == {"/health", "/ready", "/api/v2/openapi.json", "/metrics"}
    assert set(PUBLIC_PATHS) <= set(ROUTES)
    assert len(PROTECTED) >= 3


@pytest.mark.parametrize(("path", "method"), PROTECTED)
@pytest.mark.parametrize("header", [
    None, "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer not-a-key",
    "Bearer pg-000000000000-wrongsecret",
])
async def test_every_protected_route_needs_a_valid_key(
    client: httpx.AsyncClient, keys: Keys, path: str, method: str, header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = await client.request(method, concrete(path), headers=headers,
                             json={"model": "alfred-4.2", "prompt": "x"})
    assert_envelope(r, 401, "invalid_api_key", type_="authentication_error")
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("path", "method"), PROTECTED)
@pytest.mark.parametrize(("which", "words"), [("revoked", "revoked"), ("expired", "expired")])
async def test_revoked_and_expired_keys_refused(
    client: httpx.AsyncClient, keys: Keys, path: str, method: str, which: str, words: str
) -> None:
    key = getattr(keys, which)
    r = await client.request(method, concrete(path), headers=auth(key),
                             json={"model": "alfred-4.2", "prompt": "x"})
    err = assert_envelope(r, 401, "invalid_api_key")
    assert words in err["message"]
    assert key not in r.text


async def test_the_key_is_never_echoed(client: httpx.AsyncClient, keys: Keys) -> None:
    wrong = keys.full[:-4] + "AAAA"
    r = await client.get("/api/v2/models", headers=auth(wrong))
    assert_envelope(r, 401, "invalid_api_key")
    assert wrong not in r.text and wrong[-20:] not in r.text


@pytest.mark.parametrize("path", sorted(set(PUBLIC_PATHS) - {"/metrics"}))
async def test_public_routes_answer_without_a_key(client: httpx.AsyncClient,
                                                   path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 200


async def test_metrics_want_an_admin_key_or_the_metrics_token(
        client: httpx.AsyncClient, keys: Keys) -> None:
    assert_envelope(await client.get("/metrics"), 401, "invalid_api_key")
    assert_envelope(await client.get("/metrics", headers=auth(keys.full)), 403,
                    "permission_denied")
    r = await client.get("/metrics", headers=auth(keys.admin))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    assert "paragate_requests_total" in r.text


async def test_unknown_path(client: httpx.AsyncClient, keys: Keys) -> None:
    assert_envelope(await client.get("/nope", headers=auth(keys.full)), 404, "not_found")


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v2/files"), ("POST", "/api/v2/files"), ("GET", "/api/v2/files/abc"),
    ("DELETE", "/api/v2/files/abc/content"), ("POST", "/api/v2/query"),
    ("POST", "/api/v2/chat/document-search"),
    ("POST", "/api/v2/chat/document-analysis/start"), ("POST", "/api/v2/upload-session"),
    ("GET", "/api/v2/upload-session/x/files"), ("GET", "/api/v2/rate/feedback"),
    ("GET", "/api/v2/companies/1/workspaces"), ("POST", "/api/v2/companies/1/workspaces/2"),
    ("GET", "/api/v2/reporting/chats"), ("GET", "/api/v2/files/"),
])
async def test_paradigms_paths_not_served_are_501_after_authentication(
        client: httpx.AsyncClient, keys: Keys, method: str, path: str) -> None:
    assert_envelope(await client.request(method, path), 401, "invalid_api_key")
    r = await client.request(method, path, headers=auth(keys.full))
    err = assert_envelope(r, 501, "not_implemented", type_="invalid_request_error")
    assert "does not serve" in err["message"]


@pytest.mark.parametrize("path", ["/api/v2/filez", "/api/v2/querys", "/api/v2/companies/1/x",
                                  "/api/v2/chat/documents"])
async def test_a_typo_is_still_404(client: httpx.AsyncClient, keys: Keys, path: str) -> None:
    assert_envelope(await client.get(path, headers=auth(keys.full)), 404, "not_found")
    # the served neighbours are untouched
    r = await client.get("/api/v2/reporting/usage", headers=auth(keys.full))
    assert r.status_code == 200


async def test_models_list_shows_what_the_key_may_use(client: httpx.AsyncClient,
                                                      keys: Keys) -> None:
    r = await client.get("/api/v2/models", headers=auth(keys.full))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    names = [m["id"] for m in body["data"]]
    assert "alfred-4.2" in names and "off" not in names
    alfred = next(m for m in body["data"] if m["id"] == "alfred-4.2")
    assert alfred["object"] == "model" and alfred["display_name"] == "Alfred 4.2"
    assert alfred["type"] == "llm" and alfred["created"] > 0
    assert "upstream" not in r.text and "ok" not in names
    r = await client.get("/api/v2/models", headers=auth(keys.restricted))
    assert [m["id"] for m in r.json()["data"]] == ["alfred-4.2"]


async def test_model_retrieve(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.get("/api/v2/models/alfred-4.2", headers=auth(keys.full))
    assert r.json()["id"] == "alfred-4.2"
    r = await client.get("/api/v2/models/limited", headers=auth(keys.restricted))
    assert_envelope(r, 404, "model_not_found", "model")


async def test_revocation_takes_effect_while_running(
    client: httpx.AsyncClient, keys: Keys, gateway: object
) -> None:
    from paragate.gateway import Gateway

    assert isinstance(gateway, Gateway)
    assert (await client.get("/api/v2/models", headers=auth(keys.full))).status_code == 200
    control.keys.revoke(gateway.store, CLI, keys.full_id)
    await caught_up(gateway)
    r = await client.get("/api/v2/models", headers=auth(keys.full))
    assert_envelope(r, 401, "invalid_api_key")


async def test_a_key_expiring_while_cached_is_refused(
    client: httpx.AsyncClient, keys: Keys, gateway: object
) -> None:
    from datetime import UTC, datetime, timedelta

    from paragate.gateway import Gateway

    from .conftest import make_key

    assert isinstance(gateway, Gateway)
    token, _ = make_key(gateway.store, "short", expires_at=datetime.now(UTC) + timedelta(
        seconds=1))
    await caught_up(gateway)
    assert (await client.get("/api/v2/models", headers=auth(token))).status_code == 200
    await asyncio.sleep(1.05)
    r = await client.get("/api/v2/models", headers=auth(token))
    err = assert_envelope(r, 401, "invalid_api_key")
    assert "expired" in err["message"]
