"""No key secret, upstream API key or prompt in any log line.

Every log line of the test run lands in one directory, and the run fails when the scan
finds a key, an upstream API key or a canary in it (tests/logcapture.py, the session
fixture in tests/conftest.py, and ``make test``'s "logs" tier). Here: gateways of their
own get requests carrying canaries everywhere a prompt can be (completions, chat, streams,
embeddings, tokenize, refused requests, upstream failures) and keys where keys go; their
logs must show each request and none of the canaries, except the prompts of the one model
whose ``log_payloads`` is on. The canaries are registered, so that the run's scan looks
for them in every other log line too. And the scan itself is shown to fail.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from paragate.store import Store

from . import logcapture
from .conftest import TEST_SECRET_KEY, Keys, add_model, make_key
from .fake_vllm import FakeVLLM
from .servers import start_gateway

TESTS = Path(__file__).resolve().parent


# -- the scan finds what leaked ----------------------------------------------------------


def _write(directory: Path, name: str, *lines: str) -> None:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def test_the_scan_finds_every_kind_of_leak_and_says_where() -> None:
    # not under pytest's temporary directory: the session sweeps its *.log files
    with tempfile.TemporaryDirectory(prefix="paragate-scan-test-") as name:
        directory = Path(name)
        key = f"pg-{secrets.token_hex(6)}-{secrets.token_urlsafe(32)}"
        upstream = "sk-" + secrets.token_hex(8)
        prompt = logcapture.canary("prompt")
        password = "hunter2-" + secrets.token_hex(4)  # shaped like nothing: registered
        allowed = logcapture.canary("payload")
        _write(directory, logcapture.REGISTRY,
               json.dumps({"value": password, "what": "database password", "exempt": False}),
               json.dumps({"value": allowed, "what": "payload", "exempt": True}))
        _write(directory, "session-1/gateway-1.log",
               '{"level":"info","message":"paragate ready"}',
               f'{{"level":"debug","message":"Bearer {key}"}}',
               f'{{"level":"info","logger":"paragate.access","prompt":"{allowed}"}}')
        _write(directory, "session-1/cli.log", f"Error: upstream key {upstream} refused")
        _write(directory, "session-2/swept/vllm.log", "ok", "ok",
               f"Received request: prompt: '{prompt}'",
               f"postgresql://u:{password}@db/x and 'disk-full' and task-1")
        leaks = logcapture.scan(directory)
        found = {(leak.path.relative_to(directory).as_posix(), leak.line, leak.what)
                 for leak in leaks}
        assert found == {
            ("session-1/gateway-1.log", 2, "an API key"),
            ("session-1/cli.log", 1, "an upstream API key"),
            ("session-2/swept/vllm.log", 3, "a canary"),
            ("session-2/swept/vllm.log", 4, "registered database password"),
        }
        text = "\n".join(str(leak) for leak in leaks)
        for secret in (key.split("-", 2)[2], upstream[3:], prompt.rsplit("-", 1)[1], password):
            assert secret not in text  # the report masks what it found
        assert "pg-" + key.split("-")[1] in text  # the public id is no secret
        assert allowed not in text
        assert logcapture.main([name]) == 1  # make test's tier fails


def test_the_scan_of_clean_logs_passes_but_not_of_no_logs() -> None:
    with tempfile.TemporaryDirectory(prefix="paragate-scan-test-") as name:
        directory = Path(name)
        assert logcapture.main([name]) == 1  # nothing at all: the capture is broken
        _write(directory, logcapture.REGISTRY,
               json.dumps({"value": logcapture.canary("prompt"), "what": "prompt",
                           "exempt": False}),
               json.dumps({"value": logcapture.canary("payload"), "what": "payload",
                           "exempt": True}))
        _write(directory, "session-1/gateway-1.log",
               '{"ts":"x","level":"info","logger":"paragate.access","key":"0123456789ab"}')
        assert logcapture.scan(directory) == []
        assert logcapture.main([name]) == 0


def _upstream_keys(tree: ast.AST) -> list[tuple[int, ast.expr]]:
    """Every expression a test hands over as an upstream API key."""
    found: list[tuple[int, ast.expr]] = []
    names = ("upstream_api_key", "PARAGATE_UPSTREAM_API_KEY")
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in names:
            found.append((node.value.lineno, node.value))
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and k.value in names:
                    found.append((v.lineno, v))
        elif isinstance(node, ast.List | ast.Tuple):
            for k, v in zip(node.elts, node.elts[1:], strict=False):
                if isinstance(k, ast.Constant) and k.value == "--upstream-api-key":
                    found.append((v.lineno, v))
    return found


def _leading_text(value: ast.expr, assigned: dict[str, ast.expr], depth: int = 0) -> str | None:
    """The string an expression starts with, where the source says."""
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return value.value
    if isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add):
        return _leading_text(value.left, assigned, depth)
    if isinstance(value, ast.JoinedStr) and value.values:
        return _leading_text(value.values[0], assigned, depth)
    if isinstance(value, ast.Name) and value.id in assigned and depth < 3:
        return _leading_text(assigned[value.id], assigned, depth + 1)
    return None


def test_every_upstream_api_key_in_the_tests_has_the_marked_shape() -> None:
    """The run's scan finds any upstream API key by its ``sk-`` prefix: every key a test
    configures must have it (a value with a line break is one the gateway refuses)."""
    unmarked = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        assigned = {target.id: node.value for node in ast.walk(tree)
                    if isinstance(node, ast.Assign) for target in node.targets
                    if isinstance(target, ast.Name)}
        for line, value in _upstream_keys(tree):
            if isinstance(value, ast.Constant) and value.value in (None, ""):
                continue
            text = _leading_text(value, assigned)
            if text is None or not (text.startswith("sk-") or "\r" in text or "\n" in text):
                unmarked.append(f"{path.relative_to(TESTS)}:{line}")
    assert not unmarked, f"upstream API keys without the sk- prefix: {unmarked}"
    assert len(list(TESTS.rglob("*.py"))) > 10


# -- the capture works --------------------------------------------------------------------


async def test_an_in_process_gateways_lines_are_captured(
        client: httpx.AsyncClient, keys: Keys) -> None:
    prompt = logcapture.canary("prompt")
    logcapture.register(prompt, "prompt")
    r = await client.post("/api/v2/completions", headers={"Authorization": f"Bearer {keys.full}"},
                          json={"model": "alfred-4.2", "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200, r.text
    request_id = r.headers["x-request-id"]
    access = (logcapture.session_dir() / "in-process-access.log").read_text()
    lines = [json.loads(line) for line in access.splitlines() if request_id in line]
    assert [(line["logger"], line["status"], line["key"]) for line in lines] == [
        ("paragate.access", 200, keys.full_id)]
    assert prompt not in access
    records = (logcapture.session_dir() / "in-process.log").read_text()
    assert "configuration (secrets masked)" in records and prompt not in records


def test_a_paragate_commands_stderr_is_captured(tmp_path: Path) -> None:
    marker = secrets.token_hex(8)  # no secret: a name that shows up in the error
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}
    env["PARAGATE_DATABASE_URL"] = f"sqlite:///{tmp_path / 'p.db'}"
    done = subprocess.run([sys.executable, "-m", "paragate", "models", "remove", marker],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and marker in done.stderr  # the test still sees it
    assert marker in (logcapture.session_dir() / "cli.log").read_text()


# -- a gateway's own log -------------------------------------------------------------------


@dataclass
class Canaries:
    """Every canary one gateway gets, by what it stands for."""

    forbidden: dict[str, str] = field(default_factory=dict)  # value: what
    payload: str = ""  # the prompt of the model that logs its payloads
    payload_two: str = ""  # ... and of the one the admin API adds

    def new(self, kind: str, value: str | None = None) -> str:
        value = value or logcapture.canary(kind)
        self.forbidden[value] = kind
        logcapture.register(value, kind)
        return value


def _cli(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "paragate", *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _with_password(store: Store, canaries: Canaries) -> str:
    """The store's URL with a password: its own, or a canary (PostgreSQL on 127.0.0.1
    trusts it and ignores it)."""
    url = make_url(store.url.render_as_string(hide_password=False))
    password = url.password or logcapture.canary("dbpassword")
    canaries.new("dbpassword", str(password))
    return url.set(password=str(password)).render_as_string(hide_password=False)


async def _requests(http: httpx.AsyncClient, key: str, admin: str, c: Canaries,
                    ids: list[str], fake: FakeVLLM) -> None:
    """Every kind of request, each carrying canaries; the ids of their answers."""

    async def send(path: str, body: Any = None, *, bearer: str = key, content: bytes | None = None,
                   status: int | None = None, stream: bool = False) -> httpx.Response:
        headers = {"Authorization": f"Bearer {bearer}"}
        kwargs: dict[str, Any] = {"content": content} if content is not None else {"json": body}
        if content is not None:
            headers["Content-Type"] = "application/json"
        async with http.stream("POST" if body is not None or content is not None else "GET",
                               path, headers=headers, **kwargs) as r:
            try:
                await r.aread()
            except httpx.HTTPError:  # a stream cut: its id is known all the same
                assert stream
            ids.append(r.headers["x-request-id"])
            if status is not None:
                assert r.status_code == status, (path, r.status_code)
            return r

    completions, chat = "/api/v2/completions", "/api/v2/chat/completions"
    await send(completions, {"model": "alfred", "prompt": c.new("prompt"), "max_tokens": 3},
               status=200)
    await send(completions, {"model": "alfred", "prompt": [c.new("prompt"), c.new("prompt")],
                             "max_tokens": 2, "suffix": c.new("suffix"),
                             "stop": [c.new("stop")], "user": c.new("user")}, status=200)
    await send(completions, {"model": "alfred", "prompt": c.new("prompt"), "stream": True,
                             "max_tokens": 3, "stream_options": {"include_usage": True}},
               status=200)
    messages = [{"role": "system", "content": c.new("system")},
                {"role": "user", "content": [{"type": "text", "text": c.new("chat")}]},
                {"role": "assistant", "content": c.new("chat")},
                {"role": "user", "content": c.new("chat")}]
    await send(chat, {"model": "alfred", "messages": messages, "max_tokens": 3,
                      "user": c.new("user")}, status=200)
    await send(chat, {"model": "alfred", "messages": messages, "max_tokens": 3,
                      "stream": True}, status=200)
    await send("/api/v2/embeddings", {"model": "embedder", "input": c.new("embedding")},
               status=200)
    await send("/api/v2/embeddings", {"model": "embedder",
                                      "input": [c.new("embedding"), c.new("embedding")]},
               status=200)
    await send("/api/v2/tokenize", {"model": "alfred", "prompt": c.new("tokenize")},
               status=200)
    await send("/api/v2/tokenize", {"model": "alfred", "messages": [
        {"role": "user", "content": c.new("tokenize")}]}, status=200)
    # the upstream fails: mid-stream, with an error event, refusing, with a bad key
    await send(completions, {"model": "dropper", "prompt": c.new("prompt"), "stream": True,
                             "max_tokens": 8}, stream=True)
    await send(chat, {"model": "dropper", "messages": [{"role": "user", "content": c.new("chat")}],
                      "stream": True, "max_tokens": 8}, stream=True)
    await send(completions, {"model": "erroring", "prompt": c.new("prompt"), "stream": True,
                             "max_tokens": 8}, status=200)
    await send(completions, {"model": "refusing", "prompt": c.new("prompt")}, status=400)
    await send(completions, {"model": "locked", "prompt": c.new("prompt")})
    await send(completions, {"model": "broken", "prompt": c.new("prompt")})
    # refused by the gateway: bad values, an unknown model, bad JSON, bad keys
    await send(completions, {"model": "alfred", "prompt": c.new("prompt"),
                             "temperature": c.new("value")}, status=400)
    await send(completions, {"model": "alfred", "prompt": c.new("prompt"),
                             "max_tokens": c.new("value")}, status=400)
    await send(chat, {"model": "alfred", "messages": [
        {"role": c.new("value"), "content": c.new("chat")}]})  # vLLM's to refuse
    await send(chat, {"model": "alfred", "messages": c.new("chat")}, status=400)
    await send(completions, {"model": "alfred", "prompt": c.new("prompt"),
                             c.new("field"): c.new("value")})
    await send(completions, {"model": "no-such-model", "prompt": c.new("prompt")}, status=404)
    await send(chat, {"model": "no-such-model",
                      "messages": [{"role": "user", "content": c.new("chat")}]}, status=404)
    await send("/api/v2/embeddings", {"model": "alfred", "input": c.new("embedding")})
    await send(completions, content=b'{"model": "alfred", "prompt": "' + c.new(
        "prompt").encode(), status=400)
    # not UTF-8: a 500 and its traceback in the log, for now (a 400 would be right)
    await send(completions, content=b'{"model": "alfred", "prompt": "' + c.new(
        "prompt").encode() + b'\xff\xfe"}')
    wrong = f"pg-{secrets.token_hex(6)}-{secrets.token_urlsafe(32)}"  # shaped like a key
    await send(completions, {"model": "alfred", "prompt": c.new("prompt")}, bearer=c.new(
        "key", wrong), status=401)
    await send(completions, {"model": "alfred", "prompt": c.new("prompt")},
               bearer=key.rsplit("-", 1)[0] + "-" + secrets.token_urlsafe(32), status=401)
    await send(completions, {"model": "alfred", "prompt": c.new("prompt")},
               bearer=c.new("bearer"), status=401)
    # a key made through the admin API: its secret is in that one answer only
    r = await send("/api/v2/api-keys", {"name": "made"}, bearer=admin, status=201)
    made = c.new("key", r.json()["key"])
    await send("/api/v2/models", bearer=made, status=200)
    # the model that logs its payloads, and one more added with the field through the API
    await send(completions, {"model": "scribe", "prompt": c.payload, "max_tokens": 2},
               status=200)
    await send("/api/v2/models", {"name": "scribe-two", "upstream_url": fake.base_url,
                                  "upstream_model": "ok", "log_payloads": True},
               bearer=admin, status=201)
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # until the gateway has the new model
        r = await send(chat, {"model": "scribe-two", "max_tokens": 2,
                              "messages": [{"role": "user", "content": c.payload_two}]})
        if r.status_code == 200:
            break
        assert asyncio.get_running_loop().time() < deadline, r.status_code
        await asyncio.sleep(0.1)


def _access_lines(text: str, fmt: str) -> list[dict[str, Any] | str]:
    if fmt == "json":
        return [line for line in (json.loads(t) for t in text.splitlines())
                if line.get("logger") == "paragate.access"]
    return [t for t in text.splitlines() if " INFO paragate.access: " in t]


@pytest.mark.postgres
@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_a_gateways_log_holds_every_request_and_no_prompt_or_secret(
        fmt: str, pg_store: Store, fake: FakeVLLM, tmp_path: Path) -> None:
    c = Canaries()
    c.payload, c.payload_two = logcapture.canary("payload"), logcapture.canary("payload")
    logcapture.register(c.payload, "payload (log_payloads on)", exempt=True)
    logcapture.register(c.payload_two, "payload (log_payloads on)", exempt=True)
    database = _with_password(pg_store, c)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}
    env["PARAGATE_DATABASE_URL"] = database
    env["PARAGATE_SECRET_KEY"] = c.new("secretkey", TEST_SECRET_KEY)  # pg_store's
    upstream_key = "sk-" + logcapture.canary("upstream")
    locked_key = "sk-" + logcapture.canary("upstream")
    c.new("upstream", upstream_key)
    c.new("upstream", locked_key)
    _cli({**env, "PARAGATE_UPSTREAM_API_KEY": upstream_key}, "models", "add", "alfred",
         "--upstream", fake.base_url, "--upstream-model", "ok")
    _cli(env, "models", "add", "scribe", "--upstream", fake.base_url, "--upstream-model",
         "ok", "--log-payloads")
    add_model(pg_store, "embedder", fake.base_url, "ok", type="embedding")
    add_model(pg_store, "dropper", fake.base_url, "drop")
    add_model(pg_store, "erroring", fake.base_url, "error-event")
    add_model(pg_store, "refusing", fake.base_url, "status-400")
    add_model(pg_store, "broken", fake.base_url, "garbage")
    add_model(pg_store, "locked", fake.base_url, "unauthorized",
              upstream_api_key=locked_key)
    key, _ = make_key(pg_store, "leaks")
    admin, _ = make_key(pg_store, "leaks-admin", is_admin=True)
    c.new("key", key)
    c.new("key", admin)
    metrics_token = c.new("metricstoken")
    otlp = c.new("otlpheader")
    gateway = await asyncio.to_thread(
        start_gateway, tmp_path, database, PARAGATE_LOG_LEVEL="debug",
        PARAGATE_ACCESS_LOG="true", PARAGATE_LOG_FORMAT=fmt,
        PARAGATE_SECRET_KEY=TEST_SECRET_KEY, PARAGATE_METRICS_TOKEN=metrics_token,
        PARAGATE_OTLP_HEADERS=f"authorization={otlp}")
    ids: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            await _requests(http, key, admin, c, ids, fake)
            r = await http.get("/metrics", headers={"Authorization": f"Bearer {metrics_token}"})
            assert r.status_code == 200
            ids.append(r.headers["x-request-id"])
            await asyncio.sleep(0.3)  # the refresher's line on the new model
    finally:
        assert await asyncio.to_thread(gateway.stop) in (0, -15)
    text = gateway.log.read_text()
    lines = text.splitlines()

    # non-vacuous: every request has its line, paragate's own lines are there
    access = _access_lines(text, fmt)
    assert len(access) >= len(ids) > 30
    if fmt == "json":
        logged = {line["request_id"] for line in access if isinstance(line, dict)}
        assert set(ids) <= logged, set(ids) - logged
    else:
        missing = [i for i in ids if not any(f"request_id={i} " in f"{t} " for t in access)]
        assert not missing, missing
    assert any("paragate ready" in line for line in lines)

    # no canary, key or upstream key anywhere but the payloads of the two models
    for value, what in c.forbidden.items():
        assert value not in text, f"a {what} canary in the log"
    assert not logcapture.KEY.search(text), "a key in the log"
    assert not logcapture.UPSTREAM_KEY.search(text), "an upstream key in the log"
    assert {m.group() for m in logcapture.CANARY.finditer(text)} == {c.payload, c.payload_two}

    # the start-up configuration line, secrets masked
    config = [line for line in lines if "configuration (secrets masked)" in line]
    assert len(config) == 1
    if fmt == "json":
        settings = json.loads(config[0])["settings"]
        assert settings["metrics_token"] == "***"
        assert settings["otlp_headers"] == "authorization=***"
        assert settings["database_url"] == make_url(database).render_as_string(
            hide_password=True)
        assert ":***@" in settings["database_url"] and settings["log_format"] == fmt
    else:
        assert '"metrics_token":"***"' in config[0] and ":***@" in config[0]

    # log_payloads: that model's prompts (and completions) are there, in its lines only,
    # and the gateway warned of it at start-up, and again when the API added another
    for payload, model in ((c.payload, "scribe"), (c.payload_two, "scribe-two")):
        holding = [line for line in lines if payload in line]
        assert holding, f"{model}'s prompt is not in the log"
        for line in holding:
            if fmt == "json":
                fields = json.loads(line)
                assert fields["logger"] == "paragate.access" and fields["model"] == model
                assert payload in fields["prompt"] and fields["completion"], fields
            else:
                assert " INFO paragate.access: " in line and f" model={model} " in line
    warnings = [line for line in lines if "written to the log" in line]
    ready = next(i for i, line in enumerate(lines) if "paragate ready" in line)
    assert len(warnings) == 2, warnings
    first, second = (lines.index(w) for w in warnings)
    assert first < ready < second
    for warning, names in zip(warnings, ("scribe", "scribe, scribe-two"), strict=True):
        if fmt == "json":
            fields = json.loads(warning)
            assert fields["level"] == "warning", fields
            assert f"model(s) {names} are written" in fields["message"]
        else:
            assert " WARNING paragate" in warning and f"model(s) {names} are written" in warning
