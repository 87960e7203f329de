"""The fuzzing tier: schemathesis against paragate's own OpenAPI document, sent to a real
``paragate serve`` over HTTP (uvicorn and httptools included) in front of the fake vLLM.

Every operation is called with cases generated from its schema, valid ones and invalid
ones, in each media type the operation takes (JSON, urlencoded, multipart), under four
callers: a system admin's key, a company user's key, a key that does not exist, and no
key. Then stateful sequences through the admin API, by schemathesis's runner, which
follows the links it infers between operations (a company's id into a user's
``company_id``, a user's id into a key's ``user_id``...), and one lifecycle written out
(a key made through the API, used, revoked, refused: a link cannot carry a secret into
a header). Every answer must be one the document promises: no 5xx (the fake answers
every configured model, so no upstream error is legitimate here), the documented status
codes, content types, bodies and SSE events, refusals that say clearly what is wrong,
and no hang (each call has a deadline).

The tier runs with ``pytest -m fuzz`` (``make test``'s own tier) and prints how many
cases it sent; it fails below ``FUZZ_MIN_CASES``. ``PARAGATE_FUZZ_SCALE`` (default 1)
multiplies the examples per operation, for a longer run by hand.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from paragate import control
from paragate.openapi import document
from paragate.store import Store

from .conftest import CLI, add_model, make_key
from .fake_vllm import FakeVLLM
from .servers import GatewayProcess, start_gateway

pytestmark = pytest.mark.fuzz

SCALE = float(os.environ.get("PARAGATE_FUZZ_SCALE", "1"))
FUZZ_MIN_CASES = 5000
DEADLINE = 15.0  # seconds a call may take: past it, the gateway hung

schema = schemathesis.openapi.from_dict(document())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])

MODELS = ("fuzz-text", "fuzz-chat", "fuzz-embed")


@dataclass
class World:
    """The gateway under test and the keys each caller uses."""

    gateway: GatewayProcess
    store: Store
    keys: dict[str, str | None]
    upstream: str  # the fake vLLM's base URL
    sent: Counter[str] = field(default_factory=Counter)
    repairs: int = 0
    session: requests.Session = field(default_factory=requests.Session)

    def mint(self) -> None:
        """Fresh keys for the admin and the member (a company and a user of their own):
        a case may have revoked a key, deleted the user or the company."""
        n = self.repairs
        self.keys["admin"], _ = make_key(self.store, f"fuzz-admin-{n}", is_admin=True)
        company = control.companies.create(self.store, CLI, f"Fuzz Co {n}")
        user = control.users.create(self.store, CLI, company_id=company.id,
                                    email=f"fuzz-{n}@fuzz.example", name="Fuzz", role="user")
        self.keys["member"], _ = make_key(self.store, f"fuzz-member-{n}", user_id=user.id)
        deadline = time.monotonic() + 30
        for caller in ("admin", "member"):
            while self.session.get(self.gateway.url + "/api/v2/me", timeout=DEADLINE, headers={
                    "Authorization": f"Bearer {self.keys[caller]}"}).status_code != 200:
                assert time.monotonic() < deadline, "the gateway never took the new keys"
                time.sleep(0.05)

    def repair(self) -> None:
        self.repairs += 1
        self.mint()


class _FakeThread:
    """The fake vLLM on an event loop of its own, so that the (synchronous) cases can
    block this thread while it answers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake = asyncio.run_coroutine_threadsafe(FakeVLLM().start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("fuzz")
    fake = _FakeThread()
    url = f"sqlite:///{tmp / 'fuzz.db'}"
    store = Store(url)
    store.migrate()
    add_model(store, "fuzz-text", fake.fake.base_url, "ok")
    add_model(store, "fuzz-chat", fake.fake.base_url, "ok")
    add_model(store, "fuzz-embed", fake.fake.base_url, "ok", type="embedding")
    gateway = start_gateway(tmp, url, PARAGATE_ACCESS_LOG="false",
                            PARAGATE_LOG_LEVEL="warning")
    w = World(gateway, store, {"wrong": "pg-AAAAAAAAAAAA-" + "x" * 32, "none": None},
              fake.fake.base_url)
    w.mint()
    try:
        yield w
    finally:
        print(f"\nfuzz: {sum(w.sent.values())} cases sent ("
              + ", ".join(f"{k} {v}" for k, v in sorted(w.sent.items()))
              + f"); keys minted again {w.repairs} times after a case revoked them")
        gateway.stop()
        store.close()
        fake.stop()
    # the whole tier ran (not a -k selection): it must have sent enough
    if not request.config.option.keyword and not request.config.option.markexpr.startswith(
            "not"):
        total = sum(w.sent.values())
        assert total >= FUZZ_MIN_CASES, f"only {total} cases, fewer than {FUZZ_MIN_CASES}"


CALLERS = ("admin", "member", "wrong", "none")


@schemathesis.check
def refusals_are_clear(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    """Every refusal is the documented envelope, its message short (no echo of a large
    input) and, for a 400, naming what is wrong (``param``) or the body as a whole.

    It stands in for schemathesis's "schema-valid request accepted" (excluded): the
    document gives types, not every rule the control layer checks (a name's length,
    a cursor that names an existing key, a date range), so a schema-valid request may
    be refused, but never vaguely."""
    if response.status_code < 400:
        return None
    body = response.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and 0 < len(error["message"]) <= 600, body
    if response.status_code == 400:
        whole = error["code"] in BODY_CODES or "body" in error["message"].lower()
        assert error["param"] is not None or whole, body
    return True


BODY_CODES = {"invalid_json", "invalid_body"}  # a 400 about the body as a whole


def _excluded(case: schemathesis.Case) -> list[Any]:
    """Schema-valid requests may be refused (``refusals_are_clear`` stands in). In a
    form every value is text and is coerced to its field's type, as documented: the 0
    schemathesis sends as a wrong type for a boolean is the form's way to say false,
    so a "schema-violating" form body is not one; JSON bodies are held to it."""
    if case.media_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return [positive_data_acceptance, negative_data_rejection]
    return [positive_data_acceptance]


INFERENCE = ("/api/v2/completions", "/api/v2/chat/completions", "/api/v2/embeddings",
             "/api/v2/tokenize")


def _send(world: World, case: schemathesis.Case, caller: str) -> None:
    body = case.body
    if case.operation.path in INFERENCE and isinstance(body, dict) and isinstance(
            body.get("model"), str):
        # a name made up at random is a 404: three cases in four name a real model, so
        # that the body goes through the checks and on to the fake vLLM
        pick = zlib.crc32(repr(sorted(body, key=str)).encode()) % 4
        if pick:
            body["model"] = MODELS[pick - 1]
    for attempt in range(2):
        key = world.keys[caller]
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        world.sent[caller] += 1
        response = case.call_and_validate(
            base_url=world.gateway.url, session=world.session, headers=headers,
            timeout=DEADLINE, excluded_checks=_excluded(case),
            additional_checks=[refusals_are_clear])
        sent_key = response.request.headers.get("Authorization") == headers.get(
            "Authorization", "")  # a negative case may have dropped the header
        if response.status_code != 401 or caller in ("wrong", "none") or not sent_key:
            return
        assert attempt == 0, "a fresh key was refused"
        world.repair()  # an earlier case revoked the key (or its user): again, anew


_SETTINGS = {"deadline": None, "derandomize": True, "database": None,
             "suppress_health_check": list(HealthCheck),
             "phases": [hypothesis.Phase.explicit, hypothesis.Phase.generate]}


@pytest.mark.parametrize("caller", ["admin", "member"])
@schema.parametrize()
@hypothesis.settings(max_examples=int(25 * SCALE), **_SETTINGS)
def test_with_a_key(case: schemathesis.Case, caller: str, world: World) -> None:
    _send(world, case, caller)


@pytest.mark.parametrize("caller", ["wrong", "none"])
@schema.parametrize()
@hypothesis.settings(max_examples=int(5 * SCALE), **_SETTINGS)
def test_without_a_valid_key(case: schemathesis.Case, caller: str, world: World) -> None:
    _send(world, case, caller)



def test_a_key_made_through_the_api_is_used_then_revoked(world: World) -> None:
    """The lifecycle the generated sequences cannot finish (a link cannot carry a new
    key's secret into the Authorization header): a model, a company, a user, a key,
    made through the admin API; the key used; revoked; refused."""
    def call(method: str, path: str, key: str | None, **kw: Any) -> requests.Response:
        world.sent["lifecycle"] += 1
        return world.session.request(method, world.gateway.url + path, timeout=DEADLINE,
                                     headers={"Authorization": f"Bearer {key}"}, **kw)

    admin = world.keys["admin"]
    model = call("POST", "/api/v2/models", admin, json={
        "name": "lifecycle-model", "upstream_url": world.upstream, "upstream_model": "ok"})
    assert model.status_code == 201, model.text
    company = call("POST", "/api/v2/companies", admin, json={"name": "Lifecycle Co"})
    assert company.status_code == 201, company.text
    user = call("POST", "/api/v2/users", admin, json={
        "email": "life@cycle.example", "company_id": company.json()["id"]})
    assert user.status_code == 201, user.text
    made = call("POST", "/api/v2/api-keys", admin, json={
        "name": "lifecycle", "user_id": user.json()["id"]})
    assert made.status_code == 201, made.text
    key, key_id = made.json()["key"], made.json()["id"]
    me = call("GET", "/api/v2/me", key)
    assert me.status_code == 200 and me.json()["user"]["id"] == user.json()["id"], me.text
    answer = call("POST", "/api/v2/completions", key, json={
        "model": "lifecycle-model", "prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    assert call("DELETE", f"/api/v2/api-keys/{key_id}", admin).status_code == 200
    deadline = time.monotonic() + 10
    while (refused := call("POST", "/api/v2/completions", key, json={
            "model": "lifecycle-model", "prompt": "hi"})).status_code != 401:
        assert time.monotonic() < deadline, refused.text
        time.sleep(0.05)
    assert refused.json()["error"]["code"] == "invalid_api_key"


def test_admin_sequences(world: World, tmp_path: Path) -> None:
    """Stateful: schemathesis's own runner chains the admin operations by the links it
    infers from the document (a company's id into a user's ``company_id``, a user's id
    into a key's ``user_id``, a key's id into its revocation...), as a system admin.
    Its runner, not the pytest plugin: it is made for a server whose state persists
    between scenarios (hypothesis's stateful tests replay choices and call that flaky)."""
    report = tmp_path / "stateful.json"
    command = [str(Path(sys.executable).parent / "schemathesis"), "run",
               f"{world.gateway.url}/api/v2/openapi.json", "--phases", "stateful",
               "-H", f"Authorization: Bearer {world.keys['admin']}",
               "--exclude-checks", "positive_data_acceptance",
               "--max-examples", str(int(150 * SCALE)), "--generation-deterministic",
               "--request-timeout", str(DEADLINE), "--no-color",
               "--report", "ndjson", "--report-ndjson-path", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks"})
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    cases = re.search(r"(\d+) generated", done.stdout)
    links = re.search(r"API Links: +(\d+) covered", done.stdout)
    assert cases and links, done.stdout
    world.sent["stateful"] += int(cases.group(1))
    assert int(links.group(1)) >= 20, "the sequences hardly follow a link"

