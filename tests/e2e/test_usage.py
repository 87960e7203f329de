"""Usage records reconciled with vLLM's own counters (see docs/usage.md)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from paragate.store import Store

from .conftest import CONTEXT, MODEL, Stack
from .test_transparency import metric

pytestmark = pytest.mark.e2e
CUT_TOKENS = CONTEXT - 64


def _wait_idle(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while metric(stack, "vllm:num_requests_running") or metric(
            stack, "vllm:num_requests_waiting"):
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_recorded_tokens_equal_vllms_counters(stack: Stack) -> None:
    """After a mixed run (plain, streamed, n > 1, a stream cut short by its client),
    the recorded completion tokens equal the increase of vLLM's generated tokens, and
    the recorded prompt tokens times n the increase of its prompt tokens."""
    store = Store(stack.gateway.env["PARAGATE_DATABASE_URL"])
    _wait_idle(stack)
    generated = metric(stack, "vllm:generation_tokens_total")
    prompted = metric(stack, "vllm:prompt_tokens_total")
    # Each request carries its own x-request-id, kept as client_request_id: the records
    # of earlier tests may still reach the store while this one runs (the writer runs
    # when the CPUs are idle, which a busy vLLM rarely leaves them).
    tag = f"reconcile-{uuid.uuid4().hex[:12]}"
    headers = {"Authorization": f"Bearer {stack.key}"}
    bodies: list[dict[str, Any]] = [
        {"prompt": "def main(", "max_tokens": 12, "temperature": 0},
        {"prompt": "import os\n", "max_tokens": 9, "temperature": 0, "stream": True},
        {"prompt": "class A:", "max_tokens": 7, "n": 2, "temperature": 0.8, "seed": 3},
        {"prompt": ["x = 1", "y = 2"], "max_tokens": 5, "n": 2, "temperature": 0.8,
         "seed": 4, "stream": True},
        {"prompt": "for i in", "max_tokens": 6, "stream": True,
         "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    ]
    with httpx.Client(base_url=stack.gateway.url, headers=headers, timeout=120) as client:
        for i, body in enumerate(bodies):
            r = client.post("/api/v2/completions", json={"model": MODEL, **body},
                            headers={"x-request-id": f"{tag}-{i}"})
            assert r.status_code == 200, r.text
        # a stream the client leaves after its first chunk: counted partial (as long as
        # the context allows, so that the hang-up lands mid-generation: see
        # test_client_disconnect_aborts_generation)
        with client.stream("POST", "/api/v2/completions", json={
                "model": MODEL, "prompt": "while", "max_tokens": CUT_TOKENS,
                "ignore_eos": True, "stream": True},
                headers={"x-request-id": f"{tag}-cut"}) as r:
            for _ in r.iter_bytes():
                break
    _wait_idle(stack)
    deadline = time.monotonic() + 30
    while len(new := [r for r in store.list_usage()
                      if (r.client_request_id or "").startswith(tag)]) < 6:
        assert time.monotonic() < deadline, new
        time.sleep(0.1)
    store.close()
    assert len(new) == 6, new
    whole = [r for r in new if not r.partial]
    (cut,) = [r for r in new if r.partial]
    assert cut.client_request_id == f"{tag}-cut"
    assert len(whole) == 5 and all(r.outcome == "ok" for r in whole)
    assert cut.outcome == "client_disconnected"
    vllm_generated = metric(stack, "vllm:generation_tokens_total") - generated
    vllm_prompted = metric(stack, "vllm:prompt_tokens_total") - prompted
    recorded = sum(r.completion_tokens or 0 for r in new)
    # vLLM may generate a few tokens between the hang-up and its abort: never fewer
    assert recorded <= vllm_generated < recorded + CUT_TOKENS
    assert cut.completion_tokens is not None and cut.completion_tokens < CUT_TOKENS
    assert sum(r.completion_tokens or 0 for r in whole) + (cut.completion_tokens or 0) == (
        recorded)
    assert sum((r.prompt_tokens or 0) * r.n for r in new) == vllm_prompted
