"""The upstream client: pooling, stale connections, broken answers, timeouts."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from paragate.errors import UpstreamFailed, UpstreamTimeout, UpstreamUnavailable
from paragate.upstream import Upstreams

from .fake_vllm import FakeVLLM

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def _read_request(reader: asyncio.StreamReader) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return True


@pytest.fixture
async def raw_server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, list[int]]]:
    """A tiny HTTP server whose behaviour the test picks; yields (url, connections)."""
    behaviour: Handler = request.param
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await behaviour(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1/completions", connections
    server.close()
    await server.wait_closed()


def pool(read_timeout: float = 1.0) -> Upstreams:
    return Upstreams(connect_timeout=1.0, read_timeout=read_timeout, max_connections=8)


async def answer_once_then_close(reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
    # answers as if the connection stayed open, then closes it: the pooled connection
    # goes stale, as when vLLM restarts or an idle timeout fires
    await _read_request(reader)
    writer.write(OK)
    await writer.drain()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
    await writer.drain()
    await reader.read()  # until the client hangs up


async def cut_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial")
    await writer.drain()


async def silent_after_headers(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await reader.read()  # until the client hangs up


async def test_connections_are_reused(fake: FakeVLLM) -> None:
    up = pool()
    url = fake.base_url + "/completions"
    for _ in range(20):
        async with up.post(url, b'{"model":"ok","prompt":"x","max_tokens":2}', None) as r:
            assert r.status == 200
            assert b'"text_completion"' in await r.read()
    assert up.opened == 1
    await up.close()


async def test_concurrent_requests_open_about_the_concurrency(fake: FakeVLLM) -> None:
    up = pool()
    url = fake.base_url + "/completions"

    async def one() -> None:
        async with up.post(url, b'{"model":"ok","prompt":"x","max_tokens":2}', None) as r:
            await r.read()

    for _ in range(10):
        await asyncio.gather(*(one() for _ in range(4)))
    assert up.opened <= 4
    await up.close()


async def test_a_body_left_unread_closes_the_connection(fake: FakeVLLM) -> None:
    up = pool()
    url = fake.base_url + "/completions"
    body = b'{"model":"slow","prompt":"x","max_tokens":50,"stream":true}'
    async with up.post(url, body, None) as r:
        async for _ in r.iter_chunks():
            break
    for _ in range(100):
        if fake.closed_early:
            break
        await asyncio.sleep(0.02)
    assert fake.closed_early == 1
    async with up.post(url, b'{"model":"ok","prompt":"x"}', None) as r:
        await r.read()
    assert up.opened == 2  # the half-read connection was not reused
    await up.close()


@pytest.mark.parametrize("raw_server", [answer_once_then_close], indirect=True)
async def test_a_pooled_connection_the_server_closed_is_not_used(
    raw_server: tuple[str, list[int]],
) -> None:
    url, connections = raw_server
    up = pool()
    for _ in range(3):
        async with up.post(url, b"{}", None) as r:
            assert r.status == 200 and await r.read() == b"{}"
        await asyncio.sleep(0.05)  # the server closes its side meanwhile
    assert len(connections) == 3
    await up.close()


RECEIVED: list[int] = []


async def answer_then_take_one_and_die(reader: asyncio.StreamReader,
                                       writer: asyncio.StreamWriter) -> None:
    # keeps the connection for a second request, receives it whole, then dies without
    # an answer: as a vLLM that crashes mid-generation (its headers come at the end)
    while await _read_request(reader):
        RECEIVED.append(1)
        if len(RECEIVED) % 2 == 0:
            return
        writer.write(OK)
        await writer.drain()


@pytest.mark.parametrize("raw_server", [answer_then_take_one_and_die], indirect=True)
async def test_a_request_is_never_sent_twice(raw_server: tuple[str, list[int]]) -> None:
    """Regression: a reused connection that failed before any answer was silently tried
    again on a fresh one, after vLLM had received (and maybe generated) the request:
    the completion ran twice and was recorded once."""
    url, connections = raw_server
    RECEIVED.clear()
    up = pool()
    async with up.post(url, b"{}", None) as r:
        assert await r.read() == b"{}"
    with pytest.raises(UpstreamFailed, match="closed the connection"):
        async with up.post(url, b"{}", None) as r:
            await r.read()
    assert len(RECEIVED) == 2 and len(connections) == 1
    await up.close()


async def big_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # a first answer just over the client's 1 MiB buffer, sent in one go, then small ones
    size = (1 << 20) + 100
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
    await writer.drain()
    while await _read_request(reader):
        writer.write(OK)
        await writer.drain()


@pytest.mark.parametrize("raw_server", [big_answers], indirect=True)
async def test_a_connection_pooled_with_reading_paused_reads_again(
        raw_server: tuple[str, list[int]]) -> None:
    """Regression: an answer that filled the buffer and ended while its reader was away
    (a slow client on a large stream, then gone) put the connection back in the pool
    with reading paused; the next request on it waited for the read timeout."""
    url, connections = raw_server
    up = pool(read_timeout=0.5)
    async with up.post(url, b"{}", None) as r:
        assert r.status == 200
        await asyncio.sleep(0.3)  # the whole answer arrives; nobody reads it
    async with up.post(url, b"{}", None) as r:
        assert await r.read() == b"{}"
    assert len(connections) == 1
    await up.close()


async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"1}")
    await writer.drain()  # then the handler returns and the connection closes


@pytest.mark.parametrize("raw_server", [until_close], indirect=True)
async def test_a_body_that_ends_with_the_connection_is_whole(
        raw_server: tuple[str, list[int]]) -> None:
    """Regression: an answer without Content-Length or chunked encoding ends where the
    server closes the connection (HTTP/1.1 allows it); it was taken for a failure."""
    url, _ = raw_server
    up = pool()
    async with up.post(url, b"{}", None) as r:
        assert await r.read() == b'{"a":1}'
    await up.close()


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await _read_request(reader):
        writer.write(OK)
        await writer.drain()


@pytest.mark.parametrize("raw_server", [keep_alive], indirect=True)
async def test_a_connection_idle_for_too_long_is_not_reused(
        raw_server: tuple[str, list[int]]) -> None:
    url, connections = raw_server
    up = Upstreams(connect_timeout=1.0, read_timeout=1.0, max_connections=8, max_idle=0.2)
    for pause in (0.0, 0.05, 0.3):  # reused, reused, then past max_idle: a new one
        await asyncio.sleep(pause)
        async with up.post(url, b"{}", None) as r:
            assert await r.read() == b"{}"
    assert len(connections) == 2
    await up.close()


@pytest.mark.parametrize(("raw_server", "error", "words"), [
    (garbage, UpstreamFailed, "not HTTP"),
    (cut_body, UpstreamFailed, "closed the connection"),
    (silent_after_headers, UpstreamTimeout, "sent nothing for 0.3 s"),
], indirect=["raw_server"])
async def test_broken_answers(raw_server: tuple[str, list[int]], error: type[Exception],
                              words: str) -> None:
    url, _ = raw_server
    up = pool(read_timeout=0.3)
    with pytest.raises(error, match=words):
        async with up.post(url, b"{}", None) as r:
            await r.read()
    await up.close()


async def test_unreachable() -> None:
    up = pool()
    with pytest.raises(UpstreamUnavailable, match=r"unreachable \(Connection refused\)") as e:
        async with up.post("http://127.0.0.1:9/v1/completions", b"{}", None):
            pass
    assert "127.0.0.1" not in e.value.message  # the client is not told the address
    with pytest.raises(UpstreamUnavailable, match="not a valid http:// or https://") as e:
        async with up.post("ftp://127.0.0.1:9/v1/completions", b"{}", None):
            pass
    assert "127.0.0.1" not in e.value.message


@pytest.fixture
def tls_upstream(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    yield cert, key


async def test_https_upstream(tls_upstream: tuple[Path, Path],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tls_upstream
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        await reader.readexactly(2)
        writer.write(OK)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions"
    try:
        # not trusted: refused before the request (and its upstream key) is sent
        with pytest.raises(UpstreamUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            async with pool().post(url, b"{}", "sk-upstream"):
                pass
        assert seen == []
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        up = pool()
        async with up.post(url, b"{}", "sk-upstream") as r:
            assert r.status == 200 and await r.read() == b"{}"
        assert b"Authorization: Bearer sk-upstream" in seen[0]
        await up.close()
    finally:
        server.close()
        await server.wait_closed()
