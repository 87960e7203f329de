"""The Redis client, against the machine's real Redis (database 15, keys under a prefix
of the test's own) and, for failures, a proxy cut on demand and fake servers."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest

from paragate.limits.resp import (
    RedisClient,
    RedisReplyError,
    RedisUnavailable,
    RedisURL,
    RespParser,
    Script,
)

from .servers import TcpProxy

REDIS = "redis://127.0.0.1:6379/15"


@pytest.fixture
async def client() -> AsyncIterator[RedisClient]:
    c = RedisClient(REDIS)
    yield c
    await c.close()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    p = f"test-resp:{uuid.uuid4().hex}:"
    yield p
    c = RedisClient(REDIS)
    cursor = b"0"
    found: list[bytes] = []
    while True:
        reply = await c.execute("SCAN", cursor, "MATCH", p + "*", "COUNT", 1000)
        assert isinstance(reply, list)
        cursor, batch = reply  # type: ignore[assignment]
        assert isinstance(batch, list)
        found += [k for k in batch if isinstance(k, bytes)]
        if cursor == b"0":
            break
    if found:
        await c.execute("DEL", *found)
    await c.close()


# -- commands and replies ------------------------------------------------------------------


async def test_set_get_and_nil(client: RedisClient, prefix: str) -> None:
    assert await client.execute("SET", prefix + "a", "v1") == "OK"
    assert await client.execute("GET", prefix + "a") == b"v1"
    assert await client.execute("GET", prefix + "missing") is None
    assert await client.execute("SET", prefix + "b", b"\x00\r\n\xff") == "OK"
    assert await client.execute(b"GET", prefix.encode() + b"b") == b"\x00\r\n\xff"
    assert await client.execute("SET", prefix + "c", "") == "OK"
    assert await client.execute("GET", prefix + "c") == b""
    big = bytes(random.getrandbits(8) for _ in range(300_000))  # many reads
    assert await client.execute("SET", prefix + "big", big) == "OK"
    assert await client.execute("GET", prefix + "big") == big
    assert await client.execute("PING") == "PONG"
    assert client.connected


async def test_arguments_of_every_type(client: RedisClient) -> None:
    assert await client.execute("ECHO", 42) == b"42"
    assert await client.execute("ECHO", -(10**20)) == b"-100000000000000000000"
    assert await client.execute("ECHO", 1.5) == b"1.5"
    assert await client.execute("ECHO", "é€") == "é€".encode()
    assert await client.execute("ECHO", bytearray(b"ba")) == b"ba"  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await client.execute("ECHO", True)
    with pytest.raises(TypeError):
        await client.execute("ECHO", None)  # type: ignore[arg-type]
    assert await client.execute("PING") == "PONG"  # nothing half-written before


async def test_integers(client: RedisClient, prefix: str) -> None:
    assert await client.execute("INCR", prefix + "n") == 1
    assert await client.execute("INCRBY", prefix + "n", -11) == -10
    assert await client.execute("INCRBY", prefix + "n", 2**62) == 2**62 - 10
    assert await client.execute("EXISTS", prefix + "n", prefix + "nope") == 1
    assert await client.execute("DEL", prefix + "n") == 1


async def test_arrays(client: RedisClient, prefix: str) -> None:
    assert await client.execute("RPUSH", prefix + "l", "a", "b", "c") == 3
    assert await client.execute("LRANGE", prefix + "l", 0, -1) == [b"a", b"b", b"c"]
    assert await client.execute("LRANGE", prefix + "nope", 0, -1) == []
    assert await client.execute("MGET", prefix + "nope", prefix + "l2") == [None, None]
    nested = await client.execute("EVAL", "return {1, {2, 'x', {}}, 'y', {err='E inner'}}", 0)
    assert isinstance(nested, list)
    assert nested[:3] == [1, [2, b"x", []], b"y"]
    assert isinstance(nested[3], RedisReplyError) and str(nested[3]) == "E inner"
    # a nil array: BLPOP timing out
    assert await client.execute("BLPOP", prefix + "empty", 0.01) is None


async def test_an_error_reply_is_raised(client: RedisClient, prefix: str) -> None:
    await client.execute("SET", prefix + "s", "text")
    with pytest.raises(RedisReplyError) as e:
        await client.execute("INCR", prefix + "s")
    assert str(e.value) == "ERR value is not an integer or out of range"
    assert e.value.code == "ERR"
    with pytest.raises(RedisReplyError) as e:
        await client.execute("LPUSH", prefix + "s", "x")
    assert e.value.code == "WRONGTYPE"
    with pytest.raises(RedisReplyError, match="unknown command"):
        await client.execute("NOSUCHCOMMAND")
    assert await client.execute("GET", prefix + "s") == b"text"  # still in step


async def test_pipeline(client: RedisClient, prefix: str) -> None:
    replies = await client.pipeline([
        ("SET", prefix + "p", "text"),
        ("INCR", prefix + "p"),
        ("GET", prefix + "p"),
        ("INCR", prefix + "q"),
        ("LRANGE", prefix + "nope", 0, -1),
    ])
    assert replies[0] == "OK"
    assert isinstance(replies[1], RedisReplyError) and replies[1].code == "ERR"
    assert replies[2:] == [b"text", 1, []]
    assert await client.pipeline([]) == []
    many = await client.pipeline([("INCR", prefix + "m")] * 500)
    assert many == list(range(1, 501))


async def test_evalsha_loads_a_script_it_does_not_find(client: RedisClient,
                                                       prefix: str) -> None:
    # a source no server has seen: the first EVALSHA is answered NOSCRIPT (no flushing
    # of a server other tests share)
    script = Script(f"-- {uuid.uuid4()}\n"
                    "return {redis.call('INCRBY', KEYS[1], ARGV[1]), ARGV[2]}")
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
    assert await client.evalsha(script, [prefix + "e"], [5, "x"]) == [5, b"x"]
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]  # EVAL loaded it
    assert await client.evalsha(script, [prefix + "e"], [2, "y"]) == [7, b"y"]
    assert await client.execute("GET", prefix + "e") == b"7"
    assert script.sha == hashlib.sha1(script.source.encode()).hexdigest()
    # a script's own error is raised, not taken for NOSCRIPT
    failing = Script(f"-- {uuid.uuid4()}\nreturn redis.error_reply('MINE went wrong')")
    with pytest.raises(RedisReplyError, match="MINE went wrong"):
        await client.evalsha(failing, [], [])
    with pytest.raises(RedisReplyError, match="MINE went wrong"):
        await client.evalsha(failing, [], [])  # by SHA1 this time


async def test_1000_concurrent_callers_share_one_connection(client: RedisClient,
                                                            prefix: str) -> None:
    first = await client.execute("CLIENT", "ID")

    async def caller(n: int) -> list[object]:
        got: list[object] = []
        for i in range(10):
            got.append(await client.execute("ECHO", f"{n}:{i}"))
            if i % 3 == 0:
                await asyncio.sleep(0)
        return got

    results = await asyncio.gather(*(caller(n) for n in range(100)))
    assert results == [[f"{n}:{i}".encode() for i in range(10)] for n in range(100)]
    # in the order they were sent: 1000 INCRs started in order get 1..1000
    counts = await asyncio.gather(*(client.execute("INCR", prefix + "c") for _ in range(1000)))
    assert counts == list(range(1, 1001))
    assert await client.execute("CLIENT", "ID") == first


async def test_a_cancelled_caller_leaves_the_others_in_step(client: RedisClient,
                                                            prefix: str) -> None:
    await client.execute("PING")  # connected: a task's command is written on its first step
    slow = asyncio.create_task(client.execute("BLPOP", prefix + "empty", 0.05))
    await asyncio.sleep(0)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert await client.execute("ECHO", "mine") == b"mine"  # not BLPOP's nil
    pipe = asyncio.create_task(client.pipeline([("BLPOP", prefix + "empty", 0.05),
                                                ("ECHO", "lost")]))
    await asyncio.sleep(0)
    pipe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pipe
    assert await client.execute("ECHO", "again") == b"again"


async def test_select_and_auth(prefix: str) -> None:
    c = RedisClient(REDIS)
    assert b"db=15" in await c.execute("CLIENT", "INFO")  # type: ignore[operator]
    first = await c.execute("CLIENT", "ID")
    assert isinstance(first, int)
    assert await c.execute("CLIENT", "KILL", "ID", first, "SKIPME", "no") == 1
    for _ in range(100):  # the server closes it after the reply
        if not c.connected:
            break
        await asyncio.sleep(0.01)
    assert not c.connected
    # the next connection sends SELECT ahead of the first command, in one write
    assert b"db=15" in await c.execute("CLIENT", "INFO")  # type: ignore[operator]
    assert await c.execute("CLIENT", "ID") != first
    await c.close()
    # the server has no password: AUTH fails, and the client counts Redis as down
    c = RedisClient("redis://:wrong@127.0.0.1:6379/15", retry_interval=30)
    with pytest.raises(RedisUnavailable, match="AUTH or SELECT"):
        await c.execute("PING")
    with pytest.raises(RedisUnavailable, match="down"):
        await c.execute("PING")
    await c.close()
    # a database out of range: the first command never runs, in database 0 or any
    c = RedisClient("redis://127.0.0.1:6379/100000")
    with pytest.raises(RedisUnavailable, match="AUTH or SELECT"):
        await c.execute("SET", prefix + "wrong-db", 1)
    await c.close()
    c = RedisClient("redis://127.0.0.1:6379/0")
    try:
        assert await c.execute("EXISTS", prefix + "wrong-db") == 0
    finally:
        await c.execute("DEL", prefix + "wrong-db")
        await c.close()


async def test_close(prefix: str) -> None:
    c = RedisClient(REDIS)
    await c.execute("PING")
    waiting = asyncio.create_task(c.execute("BLPOP", prefix + "empty", 0.2))
    await asyncio.sleep(0)  # written
    assert c.connected
    await c.close()
    assert not c.connected
    with pytest.raises(RedisUnavailable, match="closed"):
        await waiting
    with pytest.raises(RedisUnavailable, match="closed"):
        await c.execute("PING")


# -- the parser ----------------------------------------------------------------------------

PIECES = (b"+OK\r\n", b"-ERR bad thing\r\n", b":42\r\n", b":-7\r\n", b"$5\r\nhe\r\no\r\n",
          b"$0\r\n\r\n", b"$-1\r\n", b"*3\r\n:1\r\n*2\r\n$1\r\nx\r\n*0\r\n+y\r\n", b"*-1\r\n",
          b"*2\r\n-E in\r\n$-1\r\n", b"$10\r\n0123456789\r\n")  # one reply each
STREAM = b"".join(PIECES)


def _check(replies: Sequence[object]) -> None:
    assert len(replies) == 11
    assert replies[0] == "OK"
    assert isinstance(replies[1], RedisReplyError) and str(replies[1]) == "ERR bad thing"
    assert replies[2:9] == [42, -7, b"he\r\no", b"", None, [1, [b"x", []], "y"], None]
    inner = replies[9]
    assert isinstance(inner, list) and isinstance(inner[0], RedisReplyError)
    assert str(inner[0]) == "E in" and inner[1] is None
    assert replies[10] == b"0123456789"


def test_parser_all_at_once() -> None:
    _check(RespParser().feed(STREAM))


def test_parser_byte_by_byte() -> None:
    parser = RespParser()
    replies: list[object] = []
    ends = [sum(map(len, PIECES[:i + 1])) - 1 for i in range(len(PIECES))]
    for i in range(len(STREAM)):
        got = parser.feed(STREAM[i:i + 1])
        assert len(got) == (1 if i in ends else 0), i  # each one at its last byte
        replies += got
    _check(replies)


def test_parser_in_random_pieces() -> None:
    rng = random.Random(7)
    for _ in range(200):
        parser = RespParser()
        replies: list[object] = []
        pos = 0
        data = STREAM * 3
        while pos < len(data):
            step = rng.randint(1, 20)
            replies += parser.feed(data[pos:pos + step])
            pos += step
        assert len(replies) == 33
        _check(replies[11:22])


def test_parser_refuses_what_is_not_resp() -> None:
    with pytest.raises(ValueError):
        RespParser().feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(ValueError):
        RespParser().feed(b":12x\r\n")


def test_urls() -> None:
    assert RedisURL.parse("redis://") == RedisURL()
    assert RedisURL.parse("redis://10.0.0.5") == RedisURL(host="10.0.0.5")
    assert RedisURL.parse("redis://h:6380/3") == RedisURL(host="h", port=6380, db=3)
    url = RedisURL.parse("redis://:s%40cret@h:1/2")
    assert (url.username, url.password, url.host, url.port, url.db) == (None, "s@cret",
                                                                        "h", 1, 2)
    url = RedisURL.parse("rediss://alice:pw@redis.example.com/0")
    assert (url.username, url.password, url.tls, url.port) == ("alice", "pw", True, 6379)
    assert "pw" not in repr(url) and "pw" not in repr(RedisClient("rediss://a:pw@h"))
    assert RedisURL.parse("redis://[::1]:7000").host == "::1"
    for bad in ("http://h", "redis://h:port", "redis://h/db", "redis://h/-1"):
        with pytest.raises(ValueError) as e:
            RedisURL.parse(bad.replace("h", "u:topsecret@h", 1))
        assert "topsecret" not in str(e.value)


# -- failures ------------------------------------------------------------------------------


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy("127.0.0.1", 6379)
    yield p
    p.close()


async def test_an_outage_fails_fast_then_heals(proxy: TcpProxy, prefix: str) -> None:
    c = RedisClient(f"redis://127.0.0.1:{proxy.port}/15", retry_interval=0.5)
    assert await c.execute("SET", prefix + "k", "1") == "OK"
    proxy.down()
    start = time.monotonic()
    for _ in range(2):  # the connection is found broken, then the connect is refused
        with pytest.raises(RedisUnavailable):
            await c.execute("GET", prefix + "k")
    assert time.monotonic() - start < 0.5
    assert not c.connected
    # in back-off: no try at all, many callers at once
    start = time.monotonic()
    results = await asyncio.gather(*(c.execute("GET", prefix + "k") for _ in range(100)),
                                   return_exceptions=True)
    assert time.monotonic() - start < 0.1
    assert all(isinstance(r, RedisUnavailable) and "down" in str(r) for r in results)
    proxy.up()
    with pytest.raises(RedisUnavailable, match="down"):  # back-off not over yet
        await c.execute("GET", prefix + "k")
    await asyncio.sleep(0.5)
    assert await c.execute("GET", prefix + "k") == b"1"
    assert c.connected
    await c.close()


async def test_an_outage_fails_the_callers_waiting(proxy: TcpProxy, prefix: str) -> None:
    c = RedisClient(f"redis://127.0.0.1:{proxy.port}/15", timeout=5)
    await c.execute("PING")
    waiting = [asyncio.create_task(c.execute("BLPOP", prefix + "empty", 2)) for _ in range(5)]
    await asyncio.sleep(0.05)
    start = time.monotonic()
    await asyncio.to_thread(proxy.down)
    for task in waiting:
        with pytest.raises(RedisUnavailable, match="closed the connection"):
            await task
    assert time.monotonic() - start < 0.5
    await c.close()


class FakeRedis:
    """Counts connections; answers each PING with PONG, or nothing while ``silent``."""

    def __init__(self) -> None:
        self.silent = False
        self.connections = 0
        self.server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        silent = self.silent
        try:
            while data := await reader.read(65536):
                if not silent:
                    writer.write(b"+PONG\r\n" * data.count(b"PING"))
        except OSError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()


@pytest.fixture
async def fake() -> AsyncIterator[FakeRedis]:
    f = FakeRedis()
    await f.start()
    yield f
    await f.stop()


async def test_a_reconnect_is_one_connect_for_all(fake: FakeRedis) -> None:
    assert fake.server is not None
    port = fake.server.sockets[0].getsockname()[1]
    c = RedisClient(f"redis://127.0.0.1:{port}")
    assert await asyncio.gather(*(c.execute("PING") for _ in range(100))) == ["PONG"] * 100
    assert fake.connections == 1
    await c.close()


async def test_no_reply_in_time(fake: FakeRedis) -> None:
    assert fake.server is not None
    port = fake.server.sockets[0].getsockname()[1]
    c = RedisClient(f"redis://127.0.0.1:{port}", timeout=0.2, retry_interval=0.3)
    fake.silent = True
    start = time.monotonic()
    first = asyncio.create_task(c.execute("PING"))
    await asyncio.sleep(0.1)
    later = [asyncio.create_task(c.execute("PING")) for _ in range(10)]
    results = await asyncio.gather(first, *later, return_exceptions=True)
    elapsed = time.monotonic() - start
    # every caller on the connection fails when the oldest one's reply is overdue
    assert all(isinstance(r, RedisUnavailable) and "no reply within 0.2 s" in str(r)
               for r in results), results
    assert 0.19 <= elapsed < 0.4
    assert not c.connected
    fake.silent = False
    # a stalled server backs off like a refused one: no call waits the timeout again
    with pytest.raises(RedisUnavailable, match="down"):
        await c.execute("PING")
    assert time.monotonic() - start < 0.45
    await asyncio.sleep(0.35)
    assert await c.execute("PING") == "PONG"  # after the back-off: a new connection
    assert fake.connections == 2
    await c.close()


async def test_nothing_listening() -> None:
    c = RedisClient("redis://127.0.0.1:9/0", retry_interval=30)
    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match="unreachable"):
        await c.execute("PING")
    with pytest.raises(RedisUnavailable, match="down"):
        await c.execute("PING")
    assert time.monotonic() - start < 0.5
    await c.close()
