"""What browsers are told (paragate/cors.py, and app's security headers): CORS, off by
default and per origin when on; the admin API's security headers; nosniff everywhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from paragate.app import App
from paragate.config import ConfigError, load
from paragate.store import Store

from .conftest import Keys, build_gateway
from .test_completions import URL, assert_envelope, auth, sse_events

APP = "https://app.example.com"
OTHER = "https://evil.example.net"
PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
BODY = {"model": "alfred-4.2", "prompt": "Hello", "max_tokens": 2}


async def _client(store: Store, tmp_path: Path, **settings: Any
                  ) -> AsyncIterator[httpx.AsyncClient]:
    gw = build_gateway(store, tmp_path, **settings)
    await gw.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=App(gw)),
                                     base_url="http://gateway") as c:
            yield c
    finally:
        await gw.stop()


@pytest.fixture
async def cors(store: Store, keys: Keys, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(store, tmp_path, cors_origins=f"{APP}, http://localhost:3000"):
        yield c


def _cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-")}


# -- off --------------------------------------------------------------------------------


async def test_off_by_default(client: httpx.AsyncClient, keys: Keys) -> None:
    for r in (await client.get("/health", headers={"Origin": APP}),
              await client.post(URL, json=BODY, headers={**auth(keys.full), "Origin": APP}),
              await client.post(URL, json=BODY, headers={"Origin": APP})):
        assert not _cors_headers(r) and "vary" not in r.headers, r.headers
    # a preflight is routed like any OPTIONS: 405, the method is not served
    for headers in ({}, PREFLIGHT, {**PREFLIGHT, **auth(keys.full)}):
        r = await client.options(URL, headers=headers)
        assert_envelope(r, 405, "method_not_allowed")
        assert not _cors_headers(r)
    r = await client.options("/api/v2/companies", headers=PREFLIGHT)
    assert_envelope(r, 405, "method_not_allowed")


# -- on ---------------------------------------------------------------------------------


async def test_preflight_of_an_allowed_origin(cors: httpx.AsyncClient) -> None:
    for path in (URL, "/api/v2/api-keys", "/api/v2/no/such/path"):  # any path, no key
        r = await cors.options(path, headers=PREFLIGHT)
        assert r.status_code == 204 and r.content == b"", (path, r.text)
        assert _cors_headers(r) == {
            "access-control-allow-origin": APP,
            "access-control-allow-methods": "GET, POST, PATCH, DELETE",
            "access-control-allow-headers": "authorization, content-type, x-stainless-os",
            "access-control-max-age": "600",
        }
        assert r.headers["vary"] == ("origin, access-control-request-method, "
                                     "access-control-request-headers")
        assert r.headers["x-request-id"] and r.headers["x-content-type-options"] == "nosniff"
    # headers asked for that are not header names get the fixed list back
    r = await cors.options(URL, headers={**PREFLIGHT,
                                         "Access-Control-Request-Headers": "a b, (c)"})
    assert r.headers["access-control-allow-headers"].startswith("authorization, content-type")
    r = await cors.options(URL, headers={**PREFLIGHT, "Origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"


async def test_an_options_that_is_no_preflight_is_routed(cors: httpx.AsyncClient,
                                                         keys: Keys) -> None:
    """Without Access-Control-Request-Method it is no preflight: the route decides, as
    for any request (a preflight never opens a route)."""
    for headers in ({"Origin": APP}, {"Origin": APP, **auth(keys.full)}):
        r = await cors.options(URL, headers=headers)
        assert_envelope(r, 405, "method_not_allowed")
        assert r.headers["access-control-allow-origin"] == APP
    r = await cors.options("/api/v2/companies", headers={"Origin": APP})
    assert_envelope(r, 405, "method_not_allowed")


async def test_answers_to_an_allowed_origin(cors: httpx.AsyncClient, keys: Keys) -> None:
    headers = {**auth(keys.full), "Origin": APP}
    plain = await cors.post(URL, json=BODY, headers=headers)
    stream = await cors.post(URL, json={**BODY, "stream": True}, headers=headers)
    assert plain.status_code == 200 and stream.status_code == 200
    assert sse_events(stream.text)[-1] == "[DONE]"
    for r in (plain, stream,
              await cors.get("/api/v2/models", headers=headers),
              await cors.get("/api/v2/companies", headers=headers),  # 403: a user's key
              await cors.post(URL, json=BODY, headers={"Origin": APP}),  # 401
              await cors.post(URL, json={**BODY, "model": "nope"}, headers=headers),  # 404
              await cors.get("/health", headers={"Origin": APP})):
        assert r.headers["access-control-allow-origin"] == APP, (r.url, r.status_code)
        assert r.headers.get_list("vary") == ["origin"]
        exposed = r.headers["access-control-expose-headers"]
        assert "x-request-id" in exposed and "x-ratelimit-remaining-tokens" in exposed


async def test_a_disallowed_origin_gets_nothing(cors: httpx.AsyncClient, keys: Keys) -> None:
    r = await cors.options(URL, headers={**PREFLIGHT, "Origin": OTHER})
    err = assert_envelope(r, 403, "origin_not_allowed", type_="permission_error")
    assert OTHER in err["message"] and not _cors_headers(r)
    r = await cors.options(URL, headers={**PREFLIGHT, "Origin": APP + ".evil.example.net"})
    assert r.status_code == 403
    for r in (await cors.post(URL, json=BODY, headers={**auth(keys.full), "Origin": OTHER}),
              await cors.post(URL, json={**BODY, "stream": True},
                              headers={**auth(keys.full), "Origin": OTHER}),
              await cors.get("/health")):  # no Origin: no browser, but caches must know
        assert r.status_code == 200 and not _cors_headers(r)
        assert r.headers.get_list("vary") == ["origin"]


async def test_any_origin(store: Store, keys: Keys, tmp_path: Path) -> None:
    async for c in _client(store, tmp_path, cors_origins="*"):
        r = await c.options(URL, headers={**PREFLIGHT, "Origin": OTHER})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
        r = await c.post(URL, json={**BODY, "stream": True},
                         headers={**auth(keys.full), "Origin": OTHER})
        assert r.headers["access-control-allow-origin"] == "*" and "vary" not in r.headers
        r = await c.get("/health")
        assert not _cors_headers(r) and "vary" not in r.headers


@pytest.mark.parametrize(("origins", "words"), [
    ("https://app.example.com/", "is not an origin"),
    ("app.example.com", "is not an origin"),
    ("https://a.example.com/path", "is not an origin"),
    ("null", "is not an origin"),
    ("*, https://a.example.com", "list no others"),
])
def test_origins_are_checked(origins: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load({"PARAGATE_CORS_ORIGINS": origins})
    assert load({"PARAGATE_CORS_ORIGINS": " HTTPS://App.Example.com:8443 ,http://[::1]:3000"}
                ).cors_origin_list() == ("https://app.example.com:8443", "http://[::1]:3000")


# -- security headers -------------------------------------------------------------------

SECURITY = {"cache-control": "no-store", "x-frame-options": "DENY",
            "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
            "referrer-policy": "no-referrer", "x-content-type-options": "nosniff"}


async def test_security_headers_on_every_admin_answer(client: httpx.AsyncClient,
                                                      keys: Keys) -> None:
    admin = auth(keys.admin)
    answers = [
        await client.get("/api/v2/companies", headers=admin),  # 200
        await client.post("/api/v2/users", json={}, headers=admin),  # 400
        await client.get("/api/v2/companies"),  # 401
        await client.get("/api/v2/companies", headers=auth(keys.full)),  # 403
        await client.get("/api/v2/users/999999", headers=admin),  # 404
        await client.put("/api/v2/users", headers=admin),  # 405
        await client.post("/api/v2/models", json={}, headers=admin),  # the admin's POST
        await client.get("/api/v2/me", headers=auth(keys.full)),
    ]
    assert sorted({r.status_code for r in answers}) == [200, 400, 401, 403, 404, 405]
    for r in answers:
        for name, value in SECURITY.items():
            assert r.headers.get_list(name) == [value], (r.url, r.status_code, name)
        assert "strict-transport-security" not in r.headers  # no TLS of our own


async def test_data_path_answers_carry_nosniff_only(client: httpx.AsyncClient,
                                                    keys: Keys) -> None:
    for r in (await client.post(URL, json=BODY, headers=auth(keys.full)),
              await client.post(URL, json={**BODY, "stream": True}, headers=auth(keys.full)),
              await client.post(URL, json=BODY),  # 401
              await client.get("/api/v2/models", headers=auth(keys.full)),  # GET: data plane
              await client.get("/health"),
              await client.get("/nope")):
        assert r.headers.get_list("x-content-type-options") == ["nosniff"], r.url
        assert "x-frame-options" not in r.headers and "referrer-policy" not in r.headers
        assert r.headers.get("cache-control") in (None, "no-cache")  # the stream's


async def test_hsts_with_our_own_tls(store: Store, keys: Keys, tmp_path: Path) -> None:
    async for c in _client(store, tmp_path, tls_certfile="/unused/by/the/app.pem"):
        r = await c.get("/api/v2/companies", headers=auth(keys.admin))
        assert r.headers["strict-transport-security"] == "max-age=31536000"
        r = await c.post(URL, json=BODY, headers=auth(keys.full))
        assert "strict-transport-security" not in r.headers
