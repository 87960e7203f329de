"""The transport's limits (paragate/transport.py) against a real `paragate serve`, over
raw sockets: slow heads and stalled bodies, idle keep-alive connections, header limits,
connections per address; and HTTPS with the server's own certificate."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from uvicorn.config import Config
from uvicorn.server import ServerState

from paragate.store import Store
from paragate.transport import GuardedProtocol, Limits, open_connections

from . import logcapture
from .conftest import make_key
from .servers import LOGS, GatewayProcess, free_port, start_gateway

LIMITS = {"PARAGATE_HEADER_TIMEOUT": "1", "PARAGATE_BODY_TIMEOUT": "1",
          "PARAGATE_KEEPALIVE_TIMEOUT": "1", "PARAGATE_MAX_HEADERS": "20",
          "PARAGATE_MAX_HEADER_BYTES": "4096"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path_factory.mktemp('transport') / 'gw.db'}")
    s.migrate()
    yield s
    s.close()


@pytest.fixture(scope="module")
def key(store: Store) -> str:
    return make_key(store, "transport")[0]


def _start(tmp: Path, store: Store, **settings: str) -> GatewayProcess:
    return start_gateway(tmp, store.url.render_as_string(hide_password=False), **settings)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, store: Store,
            key: str) -> Iterator[GatewayProcess]:
    gw = _start(tmp_path_factory.mktemp("gw"), store, **LIMITS)
    yield gw
    gw.stop()


def _port(gw: GatewayProcess) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def _connect(gw: GatewayProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(gw)))
    sock.settimeout(10)
    return sock


def _trickle(sock: socket.socket, pieces: list[bytes], pause: float) -> float:
    """Send ``pieces`` ``pause`` seconds apart until the server answers (or resets):
    when it did, in monotonic time."""
    try:
        for piece in pieces:
            sock.send(piece)
            if select.select([sock], [], [], pause)[0]:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    return time.monotonic()


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole answer on a kept-alive connection (a length, or chunked)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    status, headers, body = _response(data)
    if "content-length" in headers:
        while len(body) < int(headers["content-length"]):
            body += sock.recv(65536)
    else:
        while not body.endswith(b"0\r\n\r\n"):
            body += sock.recv(65536)
    return status, headers, body


def _envelope(data: bytes, status: int, code: str) -> dict[str, Any]:
    got, headers, body = _response(data)
    assert got == status, data[:300]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert headers["x-content-type-options"] == "nosniff"
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


GET = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"


# -- slow clients -----------------------------------------------------------------------


def test_a_trickled_head_is_cut_at_the_header_timeout(gateway: GatewayProcess) -> None:
    """A slowloris: one byte of its head every 0.2 s, never done; cut 1 s after the
    connection opened, however steadily it trickles."""
    head = b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Slow: " + b"a" * 100
    with _connect(gateway) as sock:
        opened = time.monotonic()
        cut = _trickle(sock, [bytes([b]) for b in head], 0.2) - opened
        data = _until_closed(sock)
    assert 0.9 <= cut < 2.5, cut
    error = _envelope(data, 408, "request_timeout")
    assert error["type"] == "invalid_request_error"
    assert "1 s" in error["message"]


def test_a_silent_connection_is_closed_without_an_answer(gateway: GatewayProcess) -> None:
    with _connect(gateway) as sock:
        opened = time.monotonic()
        assert _until_closed(sock) == b""  # no request, nothing to answer
    assert 0.9 <= time.monotonic() - opened < 2.5


def test_a_stalled_body_is_cut_and_a_slow_one_is_not(gateway: GatewayProcess,
                                                     key: str) -> None:
    body = json.dumps({"model": "none", "prompt": "x" * 60}).encode()
    head = (b"POST /api/v2/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: "
            b"application/json\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    # slow but moving: a byte every 0.3 s for 3 s, three times the body timeout
    with _connect(gateway) as sock:
        sock.send(head + body[:-10])
        for byte in body[-10:]:
            time.sleep(0.3)
            sock.send(bytes([byte]))
        status, _, answer = _read_answer(sock)
    assert status == 404 and b"model_not_found" in answer, answer  # it got through
    # then stalled: cut 1 s after its last byte
    with _connect(gateway) as sock:
        sock.send(head + body[:20])
        time.sleep(0.5)
        sock.send(body[20:30])
        last = time.monotonic()
        data = _until_closed(sock)
    assert 0.9 <= time.monotonic() - last < 2.5
    error = _envelope(data, 408, "request_timeout")
    assert "stalled" in error["message"]


def test_an_idle_keep_alive_connection_is_closed(gateway: GatewayProcess) -> None:
    with _connect(gateway) as sock:
        sock.send(GET)
        assert _read_answer(sock)[0] == 200
        answered = time.monotonic()
        assert _until_closed(sock) == b""
    assert 0.9 <= time.monotonic() - answered < 2.5


def test_an_answer_before_the_body_ends_still_lets_the_connection_go(
        gateway: GatewayProcess) -> None:
    """A 401 answered before the body came: the connection is kept alive for the rest
    of the body, then closed after the keep-alive time (uvicorn alone would keep it for
    ever: the body's bytes stop its keep-alive timer)."""
    with _connect(gateway) as sock:
        sock.send(b"POST /api/v2/completions HTTP/1.1\r\nHost: gw\r\n"
                  b"Content-Length: 20\r\n\r\n0123456789")
        assert _read_answer(sock)[0] == 401
        time.sleep(0.3)
        sock.send(b"0123456789")  # the body's end
        ended = time.monotonic()
        assert _until_closed(sock) == b""
    assert 0.9 <= time.monotonic() - ended < 2.5


def test_a_kept_alive_connection_is_used_again_then_blank_lines_do_not_hold_it(
        gateway: GatewayProcess) -> None:
    with _connect(gateway) as sock:
        for _ in range(3):  # each request within the keep-alive time
            sock.send(GET)
            assert _read_answer(sock)[0] == 200
            time.sleep(0.5)
        # blank lines begin no request (the parser skips them): they still count as the
        # next head's first bytes, so the connection is cut at the header timeout
        started = time.monotonic()
        cut = _trickle(sock, [b"\r\n"] * 20, 0.3) - started
        _envelope(_until_closed(sock), 408, "request_timeout")
    assert 0.9 <= cut < 2.5, cut


# -- header limits ----------------------------------------------------------------------


def _headers(n: int) -> bytes:
    return b"".join(b"X-H%d: v\r\n" % i for i in range(n))


def _ask(gw: GatewayProcess, request: bytes) -> bytes:
    """What the server sends back to ``request`` (which asks it to close, or is refused)."""
    with _connect(gw) as sock:
        sock.sendall(request)
        return _until_closed(sock)


def test_header_count_limit(gateway: GatewayProcess) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
    assert _response(_ask(gateway, head + _headers(18) + b"\r\n"))[0] == 200  # 20: the limit
    error = _envelope(_ask(gateway, head + _headers(19) + b"\r\n"), 431, "too_many_headers")
    assert error["type"] == "invalid_request_error" and "20" in error["message"]


def test_header_size_limit(gateway: GatewayProcess) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-Big: "
    assert _response(_ask(gateway, head + b"a" * 3000 + b"\r\n\r\n"))[0] == 200
    error = _envelope(_ask(gateway, head + b"a" * 5000 + b"\r\n\r\n"), 431,
                      "headers_too_large")  # in one read
    assert "4096" in error["message"]
    _envelope(_ask(gateway, b"GET /health?" + b"q" * 5000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n"),
              431, "headers_too_large")  # a long target


def test_one_endless_header_line_is_cut_before_it_ends(gateway: GatewayProcess) -> None:
    """The parser hands a header over only once it is whole: the size of a head that
    is still arriving is counted read by read."""
    with _connect(gateway) as sock:
        sock.send(b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Endless: ")
        started = time.monotonic()
        _trickle(sock, [b"a" * 1000] * 1000, 0.01)
        assert time.monotonic() - started < 3.0  # about 4 KiB in, not 1 MB (10 s)
        _envelope(_until_closed(sock), 431, "headers_too_large")


def test_not_http_is_answered_400_in_the_envelope(gateway: GatewayProcess) -> None:
    error = _envelope(_ask(gateway, b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n"), 400,
                      "invalid_http")
    assert error["type"] == "invalid_request_error" and "not valid HTTP" in error["message"]
    _envelope(_ask(gateway, b"\x16\x03\x01\x02\x00\x01"), 400, "invalid_http")  # TLS


# -- connections per address ------------------------------------------------------------


def test_connections_per_client(tmp_path: Path, store: Store) -> None:
    gw = _start(tmp_path, store, PARAGATE_MAX_CONNECTIONS_PER_CLIENT="3",
                PARAGATE_HEADER_TIMEOUT="30", PARAGATE_KEEPALIVE_TIMEOUT="30")
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            sock = _connect(gw)
            held.append(sock)
            sock.send(GET)
            assert _read_answer(sock)[0] == 200  # accepted, and held open
        error = _envelope(_ask(gw, b""), 429, "too_many_connections")
        assert error["type"] == "rate_limit_error" and "3" in error["message"]
        _envelope(_ask(gw, GET), 429, "too_many_connections")  # a request, the same
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the server sees the close a moment later
            status = _response(_ask(gw, GET.replace(b"\r\n\r\n",
                                                    b"\r\nConnection: close\r\n\r\n")))[0]
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 200
    finally:
        for sock in held:
            sock.close()
        gw.stop()


class _Transport:
    """Just enough of an asyncio transport for the protocol, from a given peer."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return {"peername": (self.peer, 40000), "sockname": ("10.0.0.9", 8080)}.get(name)

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def _nothing(scope: Any, receive: Any, send: Any) -> None: ...


async def test_trusted_proxies_are_not_counted() -> None:
    """Behind a load balancer every connection is the balancer's: not counted."""
    class Protocol(GuardedProtocol):
        limits = Limits(max_connections_per_client=1,
                        exempt=(ipaddress.ip_network("10.1.0.0/16"),))

    config = Config(_nothing, lifespan="off")
    state = ServerState()

    def connect(peer: str) -> _Transport:
        transport = _Transport(peer)
        Protocol(config, state, {}).connection_made(transport)  # type: ignore[arg-type]
        return transport

    proxies = [connect("10.1.2.3") for _ in range(5)]
    assert not any(t.closed for t in proxies)
    assert "10.1.2.3" not in open_connections()
    first, second = connect("192.0.2.7"), connect("192.0.2.7")
    assert not first.closed and second.closed and b" 429 " in second.written
    assert open_connections()["192.0.2.7"] == 1
    for protocol in list(state.connections):
        protocol.connection_lost(None)
    assert "192.0.2.7" not in open_connections()
    await asyncio.sleep(0)


async def test_time_the_gateway_is_not_reading_is_not_a_stall() -> None:
    """64 KiB of body is buffered and reading paused until the app takes it: that wait
    is the gateway's, not a stall of the client's. Once the gateway reads again, the
    client's clock runs: this one sends the rest, that one stalls and is cut."""
    class Protocol(GuardedProtocol):
        limits = Limits(header_timeout=0.3, body_timeout=0.3)

    got: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(1.0)  # busy: the body waits, reading is paused
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        got.append(size)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    config = Config(app, lifespan="off", log_config=None, proxy_headers=False)
    head = b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n"
    for stalls in (False, True):
        protocol = Protocol(config, ServerState(), {})
        transport = _Transport("192.0.2.1")
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(head + b"a" * 70_000)
        assert protocol.flow.read_paused
        await asyncio.sleep(1.05)
        assert not transport.closed  # three body timeouts, paused all along
        if not stalls:
            protocol.data_received(b"a" * 30_000)
        await asyncio.sleep(0.5)
        if stalls:
            assert transport.closed and b" 408 " in transport.written and not got
        else:
            assert got == [100_000] and transport.written.startswith(b"HTTP/1.1 200 ")
            assert not transport.closed
            got.clear()
        protocol.connection_lost(None)


# -- TLS --------------------------------------------------------------------------------


def _certificate(tmp: Path, password: bytes | None = None) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = tmp / "cert.pem", tmp / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption()))
    return certfile, keyfile


def test_https_with_the_servers_own_certificate(tmp_path: Path, store: Store) -> None:
    certfile, keyfile = _certificate(tmp_path, b"s3cret-pass")
    port = free_port()
    log = logcapture.new_log(f"gateway-tls-{port}")
    LOGS.append(log)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}
    env.update({"PARAGATE_DATABASE_URL": store.url.render_as_string(hide_password=False),
                "PARAGATE_JOURNAL_DIR": str(tmp_path / "journal"),
                "PARAGATE_SHUTDOWN_DELAY": "0", "PARAGATE_TLS_CERTFILE": str(certfile),
                "PARAGATE_TLS_KEYFILE": str(keyfile),
                "PARAGATE_TLS_KEYFILE_PASSWORD": "s3cret-pass"})
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "paragate", "serve", "--port",
                                    str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    gw = GatewayProcess(f"https://127.0.0.1:{port}", process, env, log)
    try:
        context = ssl.create_default_context(cafile=str(certfile))
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                r = httpx.get(gw.url + "/health", verify=context, timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert "strict-transport-security" not in r.headers  # the admin API's only
        admin = httpx.get(gw.url + "/api/v2/me", verify=context, timeout=5)
        assert admin.status_code == 401
        assert admin.headers["strict-transport-security"] == "max-age=31536000"
        with pytest.raises(httpx.ConnectError):  # not trusted without the certificate
            httpx.get(gw.url + "/health", timeout=5)
        with pytest.raises(httpx.RemoteProtocolError):  # and no plain HTTP on it
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert "s3cret-pass" not in log.read_text()
    finally:
        gw.stop()


@pytest.mark.parametrize("case", ["missing certificate", "missing key", "wrong key",
                                  "no password", "key alone"])
def test_tls_mistakes_stop_serve_at_once(tmp_path: Path, case: str) -> None:
    certfile, keyfile = _certificate(tmp_path, b"pw" if case == "no password" else None)
    (tmp_path / "other").mkdir()
    other = _certificate(tmp_path / "other")[1]
    env = {"missing certificate": {"PARAGATE_TLS_CERTFILE": str(tmp_path / "nope.pem")},
           "missing key": {"PARAGATE_TLS_CERTFILE": str(certfile),
                           "PARAGATE_TLS_KEYFILE": str(tmp_path / "nope.pem")},
           "wrong key": {"PARAGATE_TLS_CERTFILE": str(certfile),
                         "PARAGATE_TLS_KEYFILE": str(other)},
           "no password": {"PARAGATE_TLS_CERTFILE": str(certfile),
                           "PARAGATE_TLS_KEYFILE": str(keyfile)},
           "key alone": {"PARAGATE_TLS_KEYFILE": str(keyfile)}}[case]
    words = {"missing certificate": "PARAGATE_TLS_CERTFILE=.*nope.pem: no such file",
             "missing key": "PARAGATE_TLS_KEYFILE=.*nope.pem: no such file",
             "wrong key": "the key is not the certificate's",
             "no password": "without its password",
             "key alone": "set tls_certfile too"}[case]
    base = {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "paragate", "serve", "--port", str(free_port())],
        env={**base, "PARAGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", **env},
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert re.search(words, lines[0]), lines[0]
    assert time.monotonic() - started < 30
    assert not (tmp_path / "x.db").exists()  # stopped before it touched the store
