"""A token budget in front of real vLLM: a stream settles with vLLM's own count."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from paragate import control
from paragate.control import Actor
from paragate.store import Store

from .conftest import MODEL, Stack

pytestmark = pytest.mark.e2e


def test_a_stream_settles_a_budget_with_vllms_count(stack: Stack) -> None:
    store = Store(stack.gateway.env["PARAGATE_DATABASE_URL"])
    user = control.users.create(store, Actor.cli(), email="budget@e2e.example",
                                company_id=1, rate_limits={"daily_tokens": 10_000})
    key = control.keys.create(store, Actor.cli(), name="budgeted", user_id=user.id).secret
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "prompt": "def fib(n):", "max_tokens": 40, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=stack.gateway.url, timeout=120) as client:
        deadline = time.monotonic() + 5  # the gateway polls its SQLite store
        while (r := client.post("/api/v2/completions", headers=headers, json=body)
               ).status_code == 401:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        reserved = 10_000 - int(r.headers["x-ratelimit-remaining-tokens"])
        assert reserved == len(b"def fib(n):") + 2 + 40  # the estimate, and max_tokens
        usage = [e for e in r.text.split("\n\n") if '"usage":{' in e][-1]
        used = json.loads(usage.removeprefix("data: "))["usage"]["total_tokens"]
        assert used < reserved  # the estimate is never below vLLM's count
        time.sleep(0.2)  # the settlement (in process: at once; it rides on the stream end)
        r = client.post("/api/v2/completions", headers=headers,
                        json={**body, "stream": False, "stream_options": None})
        assert r.status_code == 200, r.text
        # what is left: the budget minus the first request's real tokens, minus this
        # one's reservation
        assert int(r.headers["x-ratelimit-remaining-tokens"]) == 10_000 - used - reserved
    store.close()
