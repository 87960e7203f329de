"""Upstream URLs: checked where they are stored, whoever stores them; what a client is
told when an upstream fails (never its address, never credentials); the ``Host`` header;
host names that are not ASCII; rows stored before the checks."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from paragate import control
from paragate.app import App
from paragate.errors import InvalidRequest, UpstreamUnavailable
from paragate.gateway import Gateway
from paragate.store import Store
from paragate.store.schema import audit_log, model_replicas, models
from paragate.upstream import urls
from paragate.upstream.pool import Upstreams

from .conftest import CLI, Keys, add_model, build_gateway, make_key
from .fake_vllm import FakeVLLM
from .test_completions import assert_envelope, auth, post, sse_events

PASSWORD = "sk-url-password"  # shaped like an upstream key: the log scan finds a leak

NORMALISED = [
    ("http://h/v1", "http://h/v1"),
    ("https://vllm-0.internal:8443/v1", "https://vllm-0.internal:8443/v1"),
    ("http://vllm_0.svc.cluster.local:8000", "http://vllm_0.svc.cluster.local:8000"),
    ("http://10.0.0.5:8000/v1", "http://10.0.0.5:8000/v1"),
    ("http://[::1]:8000/v1", "http://[::1]:8000/v1"),
    ("http://例え.test:8000/v1", "http://xn--r8jz45g.test:8000/v1"),
    ("https://Bücher.example/v1", "https://xn--bcher-kva.example/v1"),
]
REFUSED = [
    ("ftp://h/v1", "must be an http:// or https:// URL with a host"),
    ("http:///v1", "must be an http:// or https:// URL with a host"),
    ("h:8000/v1", "must be an http:// or https:// URL with a host"),
    ("http://h/v1\r\nX: y", "must be an http:// or https:// URL with a host"),
    (f"http://user:{PASSWORD}@h/v1", "must not hold a user name or password"),
    (f"http://{PASSWORD}@h/v1", "must not hold a user name or password"),
    ("http://h/v1?api_key=x", "must not have a query string"),
    ("http://h/v1?", "must not have a query string"),
    ("http://h/v1#top", "must not have a query string (?...) or a fragment"),
    ("http://h:0/v1", "has a port that is not a number from 1 to 65535"),
    ("http://h:65536/v1", "has a port that is not a number from 1 to 65535"),
    ("http://h:80a/v1", "has a port that is not a number from 1 to 65535"),
    ("http://h:/v1", "has a port that is not a number from 1 to 65535"),
    ("http://a..b/v1", "has a host name that is not valid"),
    ("http://h;x/v1", "has a host name that is not valid"),
    ("http://" + "x" * 64 + ".test/v1", "has a host name that is not valid"),
    ("http://[::zz]/v1", "must be an http:// or https:// URL with a host"),
]


@pytest.mark.parametrize(("url", "stored"), NORMALISED)
def test_a_url_is_stored_plain(url: str, stored: str) -> None:
    assert urls.check(url) == stored


@pytest.mark.parametrize(("url", "words"), REFUSED)
def test_a_bad_url_is_refused_without_repeating_it(url: str, words: str) -> None:
    with pytest.raises(urls.BadURL) as refused:
        urls.check(url)
    assert str(refused.value).startswith(words)
    assert PASSWORD not in str(refused.value) and url not in str(refused.value)


def test_redacted_hides_what_a_url_must_not_show() -> None:
    assert urls.redacted(f"http://user:{PASSWORD}@h:8/v1?key=v#f") == "http://***@h:8/v1?***#***"
    assert urls.redacted("http://h:8/v1") == "http://h:8/v1"


def _stored(store: Store, name: str) -> tuple[str, list[tuple[str, str | None]]]:
    with store.read() as conn:
        model_id, url = conn.execute(select(models.c.id, models.c.upstream_url).where(
            models.c.name == name, models.c.deleted_at.is_(None))).one()
        replicas = conn.execute(select(model_replicas.c.url, model_replicas.c.health_url)
                                .where(model_replicas.c.model_id == model_id)
                                .order_by(model_replicas.c.id)).all()
    return url, [(r[0], r[1]) for r in replicas]


def test_every_url_is_checked_where_it_is_stored(store: Store) -> None:
    """Models' upstream_url, replicas' url and health_url, created or updated: the
    control layer is where both the API and the CLI pass."""
    bad = f"http://user:{PASSWORD}@h/v1"
    add_model(store, "ok", "http://a/v1", "ok")
    first = control.replicas.list_(store, CLI, "ok")[1][0].id
    attempts: list[tuple[str, Any]] = [
        ("upstream_url", lambda: control.models.create(store, CLI, "m", upstream_url=bad)),
        ("upstream_url", lambda: control.models.update(store, CLI, "ok", upstream_url=bad)),
        ("url", lambda: control.replicas.create(store, CLI, "ok", url=bad)),
        ("health_url", lambda: control.replicas.create(store, CLI, "ok", url="http://b/v1",
                                                       health_url=bad)),
        ("url", lambda: control.replicas.update(store, CLI, "ok", first, url=bad)),
        ("health_url", lambda: control.replicas.update(store, CLI, "ok", first,
                                                       health_url=bad)),
    ]
    for field, attempt in attempts:
        with pytest.raises(InvalidRequest) as refused:
            attempt()
        assert refused.value.param == field
        assert refused.value.message == (
            f"'{field}' must not hold a user name or password (user:password@): an "
            "upstream's key goes in upstream_api_key.")
    assert _stored(store, "ok") == ("http://a/v1", [("http://a/v1", None)])
    with store.read() as conn:  # nothing refused reached the audit log either
        assert PASSWORD not in str(conn.execute(select(audit_log)).all())


def test_a_host_name_that_is_not_ascii_is_stored_in_its_idna_form(store: Store) -> None:
    add_model(store, "m", "http://例え.test:8000/v1", "ok")
    control.replicas.create(store, CLI, "m", url="http://bücher.example:8000/v1",
                            health_url="http://bücher.example:8001")
    assert _stored(store, "m") == ("http://xn--r8jz45g.test:8000/v1", [
        ("http://xn--r8jz45g.test:8000/v1", None),
        ("http://xn--bcher-kva.example:8000/v1", "http://xn--bcher-kva.example:8001")])
    # the same URL again, either way it is written, is the same replica
    with pytest.raises(Exception, match="has a replica at"):
        control.replicas.create(store, CLI, "m", url="http://xn--bcher-kva.example:8000/v1")


async def test_the_api_refuses_a_url_with_credentials_without_repeating_them(
        client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.post("/api/v2/models", headers=auth(keys.admin), json={
        "name": "m2", "upstream_url": f"http://user:{PASSWORD}@127.0.0.1:9/v1"})
    err = assert_envelope(r, 400, "invalid_value", "upstream_url")
    assert "user:password@" in err["message"] and PASSWORD not in r.text
    r = await client.post("/api/v2/models/alfred-4.2/replicas", headers=auth(keys.admin),
                          json={"url": "http://127.0.0.1:9/v1?token=x"})
    assert_envelope(r, 400, "invalid_value", "url")


# -- what a client is told ----------------------------------------------------------------


def _no_address(text: str, fake: FakeVLLM) -> None:
    assert "127.0.0.1" not in text and f":{fake.port}" not in text and ":9/" not in text


@pytest.mark.parametrize(("model", "status", "code", "words"), [
    ("down", 503, "upstream_unavailable",
     "The model server is unreachable (Connection refused)."),
    ("hang", 504, "upstream_first_byte_timeout", "The model server sent nothing for 1 s."),
])
async def test_an_upstream_failure_never_names_the_upstream(
        client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM, caplog: pytest.LogCaptureFixture,
        model: str, status: int, code: str, words: str) -> None:
    """Regression: the 503 said "The model server at http://127.0.0.1:9 is unreachable";
    the address (and the system's own words) are for the operators' log."""
    with caplog.at_level(logging.WARNING, logger="paragate.upstream"):
        for stream in (False, True):
            r = await post(client, keys.full, model=model, prompt="x", stream=stream)
            err = assert_envelope(r, status, code, type_="upstream_error")
            assert err["message"] == words
            _no_address(r.text, fake)
    logged = [m for m in caplog.messages if f"model '{model}'" in m]
    assert logged and "127.0.0.1" in logged[0]  # the operators' line names it


async def test_a_broken_stream_never_names_the_upstream(
        client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM) -> None:
    r = await post(client, keys.full, model="drop", prompt="x", max_tokens=5, stream=True)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "The model server closed the connection." in events[-2]
    _no_address(r.text, fake)


async def _serve_heads(heads: list[bytes]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_the_host_header_never_carries_credentials() -> None:
    """Regression: with ``user:password@`` in the URL the pool sent
    ``Host: user:password@host:port``, and its errors named both."""
    heads: list[bytes] = []
    server = await _serve_heads(heads)
    port = server.sockets[0].getsockname()[1]
    up = Upstreams(connect_timeout=1, read_timeout=1, max_connections=0)
    try:
        async with up.post(f"http://user:{PASSWORD}@127.0.0.1:{port}/v1/completions", b"{}",
                           "sk-bearer") as r:
            assert r.status == 200 and await r.read() == b"{}"
        status, _ = await up.get(f"http://user:{PASSWORD}@127.0.0.1:{port}/health", 1)
        assert status == 200
        with pytest.raises(UpstreamUnavailable) as refused:
            async with up.post(f"http://user:{PASSWORD}@127.0.0.1:9/v1/completions", b"{}",
                               None):
                pass
        assert PASSWORD not in refused.value.message and "user:" not in refused.value.message
    finally:
        await up.close()
        server.close()
        await server.wait_closed()
    assert [h.split(b"\r\n")[1] for h in heads] == [f"Host: 127.0.0.1:{port}".encode()] * 2
    assert PASSWORD.encode() not in b"".join(heads)
    assert b"Authorization: Bearer sk-bearer\r\n" in heads[0]


@pytest.fixture
def resolves_punycode(monkeypatch: pytest.MonkeyPatch) -> None:
    """``xn--r8jz45g.test`` (例え.test) resolves to 127.0.0.1 (asyncio's resolver calls
    ``socket.getaddrinfo``)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("xn--r8jz45g.test", b"xn--r8jz45g.test"):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
async def recording() -> AsyncIterator[FakeVLLM]:
    server = await FakeVLLM(record_headers=True).start()
    yield server
    await server.stop()


async def _running(store: Store, tmp_path: Path) -> tuple[Gateway, httpx.AsyncClient]:
    gw = build_gateway(store, tmp_path, health_interval=0)
    await gw.start()
    transport = httpx.ASGITransport(app=App(gw))
    return gw, httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30)


def _legacy(store: Store, model: str, url: str, health_url: str | None = None) -> None:
    """The URL written as the store took it before the checks (straight into the rows)."""
    with store.change(CLI.audit_columns()) as ch:
        model_id = ch.conn.execute(select(models.c.id).where(models.c.name == model)
                                   ).scalar_one()
        ch.conn.execute(update(models).where(models.c.id == model_id).values(
            upstream_url=url, version=ch.version))
        ch.conn.execute(update(model_replicas).where(model_replicas.c.model_id == model_id)
                        .values(url=url, health_url=health_url, version=ch.version))


async def test_a_host_that_is_not_ascii_is_served_not_a_500(
        store: Store, tmp_path: Path, recording: FakeVLLM, resolves_punycode: None) -> None:
    """Regression: a host name outside Latin-1 made every request a 500 (the request
    head could not be encoded); stored through the API it is now in IDNA form, and a
    row stored before is converted where it is loaded."""
    add_model(store, "new", f"http://例え.test:{recording.port}/v1", "ok")
    add_model(store, "old", "http://127.0.0.1:9/v1", "ok")
    _legacy(store, "old", f"http://例え.test:{recording.port}/v1")
    key, _ = make_key(store, "k")
    gw, api = await _running(store, tmp_path)
    try:
        for model in ("new", "old"):
            r = await post(api, key, model=model, prompt="x", max_tokens=2)
            assert r.status_code == 200, r.text
            assert recording.headers[-1]["Host"] == f"xn--r8jz45g.test:{recording.port}"
        _legacy(store, "old", "http://例え.invalid:9/v1")  # resolves to nothing
        await gw.refresher.refresh()
        r = await post(api, key, model="old", prompt="x", max_tokens=2)
        err = assert_envelope(r, 503, "upstream_unavailable")
        assert err["message"] == ("The model server is unreachable (its host name does "
                                  "not resolve).")
    finally:
        await api.aclose()
        await gw.stop()


@pytest.mark.parametrize("url", [
    f"http://user:{PASSWORD}@127.0.0.1:{{port}}/v1",
    "http://127.0.0.1:{port}/v1?token=" + PASSWORD,
    "ftp://127.0.0.1:{port}/v1",
    "http://127.0.0.1:0/v1",
])
async def test_a_row_stored_before_the_checks_is_out_of_service_not_a_leak(
        store: Store, tmp_path: Path, recording: FakeVLLM, caplog: pytest.LogCaptureFixture,
        url: str) -> None:
    """A URL the checks now refuse, stored before them: the replica is never tried (its
    clients get a 503 that names the model only), the operators' log says why with the
    URL's credentials hidden, and the admin API shows it the same way."""
    add_model(store, "m", recording.base_url, "ok")
    _legacy(store, "m", url.format(port=recording.port))
    key, _ = make_key(store, "k")
    admin, _ = make_key(store, "root", is_admin=True)
    with caplog.at_level(logging.ERROR, logger="paragate.upstream"):
        gw, api = await _running(store, tmp_path)
    try:
        for stream in (False, True):
            r = await post(api, key, model="m", prompt="x", max_tokens=2, stream=stream)
            err = assert_envelope(r, 503, "upstream_misconfigured", type_="upstream_error")
            assert err["message"] == (
                "The model 'm' cannot be served: the configuration of its model server is "
                "invalid; an administrator must correct it.")
            assert PASSWORD not in r.text and "127.0.0.1" not in r.text
        assert recording.requests == []
        (line,) = [m for m in caplog.messages if "out of service" in m]
        assert "replica" in line and "model 'm'" in line and "127.0.0.1" in line
        assert PASSWORD not in line
        r = await api.get("/api/v2/models/m/replicas", headers=auth(admin))
        (seen,) = r.json()["data"]
        assert seen["state"] == "ejected" and seen["last_error"].startswith("misconfigured: ")
        assert PASSWORD not in r.text
        r = await api.get("/api/v2/models?all=true", headers=auth(admin))
        assert PASSWORD not in r.text
        # corrected through the API: served again, without a restart
        r = await api.patch("/api/v2/models/m", headers=auth(admin),
                            json={"upstream_url": recording.base_url})
        assert r.status_code == 200, r.text
        r = await post(api, key, model="m", prompt="x", max_tokens=2)
        assert r.status_code == 200, r.text
    finally:
        await api.aclose()
        await gw.stop()
