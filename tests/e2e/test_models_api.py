"""Chat completions, embeddings and tokenize through paragate equal what real vLLM
answers directly, except `id`, `created` and `model` (and tool call ids, which vLLM
draws at random); streams chunk for chunk. The same usage records and model access as
/completions, and the official `openai` SDK.

The embedding model is the demo model's weights run as a pooling model: started for
this module, stopped at its end.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from paragate import control
from paragate.control import Actor
from paragate.store import Store

from .conftest import MODEL, SERVED_NAME, Stack, localvllm

pytestmark = pytest.mark.e2e

EMBED_MODEL = "alfred-embed"  # the gateway's name; vLLM serves it as EMBED_SERVED
EMBED_SERVED = "demo-embed"
CLI = Actor.cli()


@dataclass
class Embedder:
    vllm: localvllm.VLLMServer

    @property
    def direct(self) -> str:
        return self.vllm.base_url + "/embeddings"


@pytest.fixture(scope="module")
def embedder(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedder]:
    logs = tmp_path_factory.mktemp("embed")
    vllm = localvllm.VLLMServer(localvllm.ensure_demo_model(),
                                served_model_name=EMBED_SERVED, max_model_len=2048,
                                log_path=logs / "vllm-embed.log",
                                extra_args=localvllm.EMBED_ARGS).start()
    store = Store(stack.gateway.env["PARAGATE_DATABASE_URL"])
    try:
        model = control.models.create(store, CLI, EMBED_MODEL, upstream_url=vllm.base_url,
                                      upstream_model=EMBED_SERVED, type="embedding")
        _wait_listed(stack, EMBED_MODEL)
        yield Embedder(vllm)
        control.models.delete(store, CLI, model.name)
    finally:
        store.close()
        vllm.stop()


def _wait_listed(stack: Stack, name: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = httpx.get(f"{stack.gateway.url}/api/v2/models/{name}",
                      headers={"Authorization": f"Bearer {stack.key}"})
        if r.status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"the gateway never served {name}")


def _auth(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.key}"}


def strip(obj: Any) -> Any:
    """Without what differs between two identical requests: the answer's id, created
    and model, and the ids vLLM draws for tool calls."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items()
                if k not in ("id", "created", "model")}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def pair(stack: Stack, direct: str, path: str, body: dict[str, Any], served: str,
         model: str) -> tuple[httpx.Response, httpx.Response]:
    with httpx.Client(timeout=120) as client:
        d = client.post(direct, json={**body, "model": served})
        t = client.post(stack.gateway.url + path, json={**body, "model": model},
                        headers=_auth(stack))
    return d, t


def chat_pair(stack: Stack, body: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
    return pair(stack, stack.vllm.base_url + "/chat/completions", "/api/v2/chat/completions",
                body, SERVED_NAME, MODEL)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
HELLO = [{"role": "user", "content": "def main("}]
CHAT_CASES: dict[str, dict[str, Any]] = {
    "max_tokens": {"max_tokens": 6, "temperature": 0},
    "max_completion_tokens": {"max_completion_tokens": 6, "temperature": 0},
    "temperature_seed": {"temperature": 0.9, "seed": 7},
    "top_p": {"temperature": 1.0, "top_p": 0.5, "seed": 7},
    "n": {"n": 2, "temperature": 1.0, "seed": 3},
    "logprobs": {"logprobs": True, "top_logprobs": 2, "temperature": 0},
    "stop": {"stop": ["\n", "("], "temperature": 0, "max_tokens": 24},
    "penalties": {"presence_penalty": 1.5, "frequency_penalty": -1.0, "temperature": 0.8,
                  "seed": 5},
    "logit_bias": {"logit_bias": {"65": 100}, "temperature": 0},
    "user": {"user": "user-1234", "temperature": 0},
    "roles": {"messages": [
        {"role": "system", "content": "You write Python."},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "import os"},
        {"role": "assistant", "content": "import sys"},
        {"role": "user", "content": "def main("}], "temperature": 0},
    "content_parts": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "class A:"}, {"type": "text", "text": " pass"}]}],
        "temperature": 0},
    "json_object": {"response_format": {"type": "json_object"}, "temperature": 0,
                    "max_tokens": 16},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "point", "schema": {"type": "object", "properties": {
            "x": {"type": "integer"}}, "required": ["x"]}}}, "temperature": 0,
        "max_tokens": 16},
    "tool_call": {"tools": [WEATHER], "temperature": 0, "max_tokens": 24,
                  "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "tool_auto": {"tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False,
                  "temperature": 0},
    "tool_result": {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "tools": [WEATHER], "temperature": 0},
    "vllm_extras": {"top_k": 5, "min_tokens": 4, "repetition_penalty": 1.2, "seed": 11,
                    "temperature": 1.0},
    "template_fields": {"add_generation_prompt": False, "chat_template_kwargs": {"x": 1},
                        "temperature": 0},
    "continue_final_message": {"messages": [
        {"role": "user", "content": "import os"},
        {"role": "assistant", "content": "def"}], "continue_final_message": True,
        "add_generation_prompt": False, "temperature": 0},
    "structured_outputs": {"structured_outputs": {"choice": ["yes", "no"]},
                           "temperature": 0},
}


def _chat_body(case: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": HELLO, "max_tokens": 10, **case, **extra}


@pytest.mark.parametrize("name", sorted(CHAT_CASES))
def test_chat_json_identical(stack: Stack, name: str) -> None:
    direct, through = chat_pair(stack, _chat_body(CHAT_CASES[name]))
    assert direct.status_code == 200, direct.text
    assert through.status_code == 200, through.text
    d, t = direct.json(), through.json()
    assert t["model"] == MODEL
    assert strip(t) == strip(d)
    if name == "tool_call":  # a real tool call came back, not a refusal
        assert t["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == (
            "get_weather")


def events(response: httpx.Response) -> list[str]:
    text = response.text
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    return [e.removeprefix("data: ") for e in text.split("\n\n")[:-1]]


def by_choice(chunks: list[dict[str, Any]]) -> dict[int, list[Any]]:
    grouped: dict[int, list[Any]] = {}
    for c in chunks:
        for choice in c["choices"]:
            grouped.setdefault(choice["index"], []).append(strip({**c, "choices": [choice]}))
    return grouped


def _same_stream(t_chunks: list[dict[str, Any]], d_chunks: list[dict[str, Any]],
                 interleaved: bool) -> bool:
    if not interleaved:
        return [strip(c) for c in t_chunks] == [strip(c) for c in d_chunks]
    # vLLM interleaves the choices as its scheduler runs: each choice's chunks in order
    return by_choice(t_chunks) == by_choice(d_chunks) and [
        strip(c) for c in t_chunks if not c["choices"]] == [
        strip(c) for c in d_chunks if not c["choices"]]


@pytest.mark.parametrize("usage", ["none", "final", "running"])
@pytest.mark.parametrize("name", ["max_tokens", "n", "logprobs", "json_schema",
                                  "tool_call", "roles"])
def test_chat_stream_identical(stack: Stack, name: str, usage: str) -> None:
    """Chunk for chunk. vLLM puts the tokens that are ready when it sends into one chunk,
    so a busy machine can merge two tokens in one of the pair's streams and not in the
    other: such a pair is sent again (three tries), never compared more loosely."""
    extra: dict[str, Any] = {"stream": True}
    if usage != "none":
        extra["stream_options"] = {"include_usage": True,
                                   **({"continuous_usage_stats": True}
                                      if usage == "running" else {})}
    for attempt in range(3):
        direct, through = chat_pair(stack, _chat_body(CHAT_CASES[name], **extra))
        assert direct.status_code == through.status_code == 200
        assert through.headers["content-type"].startswith("text/event-stream")
        d, t = events(direct), events(through)
        d_chunks = [json.loads(e) for e in d[:-1]]
        t_chunks = [json.loads(e) for e in t[:-1]]
        if _same_stream(t_chunks, d_chunks, name == "n") or attempt == 2:
            break
    assert {c["model"] for c in t_chunks} == {MODEL}
    if name == "n":
        assert by_choice(t_chunks) == by_choice(d_chunks)
    assert [strip(c) for c in t_chunks if name != "n"] == [
        strip(c) for c in d_chunks if name != "n"]
    assert _same_stream(t_chunks, d_chunks, name == "n")
    assert ("usage" in t_chunks[-1] and t_chunks[-1]["choices"] == []) is (usage != "none")
    assert all(("usage" in c) is (usage == "running") for c in t_chunks[:-1])


@pytest.mark.parametrize(("name", "case"), [
    ("max_tokens_beyond_context", {"max_tokens": 100_000}),
    ("tool_choice_without_tools", {"tool_choice": "required"}),
    ("bad_schema", {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "x", "schema": 5}}}),
])
def test_chat_vllm_errors_relayed(stack: Stack, name: str, case: dict[str, Any]) -> None:
    direct, through = chat_pair(stack, _chat_body(case))
    assert direct.status_code >= 400, direct.text
    assert through.status_code == direct.status_code, through.text
    assert through.json()["error"]["message"] == direct.json()["error"]["message"]


EMBED_CASES: dict[str, dict[str, Any]] = {
    "string": {"input": "def main():"},
    "strings": {"input": ["import os", "class A:"]},
    "token_ids": {"input": [10, 20, 30]},
    "token_id_lists": {"input": [[10, 20], [30, 40, 50]]},
    "base64": {"input": ["import os"], "encoding_format": "base64"},
    "float": {"input": "x", "encoding_format": "float", "user": "u-1"},
}


@pytest.mark.parametrize("name", sorted(EMBED_CASES))
def test_embeddings_identical(stack: Stack, embedder: Embedder, name: str) -> None:
    direct, through = pair(stack, embedder.direct, "/api/v2/embeddings", EMBED_CASES[name],
                           EMBED_SERVED, EMBED_MODEL)
    assert direct.status_code == 200, direct.text
    assert through.status_code == 200, through.text
    d, t = direct.json(), through.json()
    assert t["model"] == EMBED_MODEL
    assert strip(t) == strip(d)
    assert t["usage"]["prompt_tokens"] > 0


def test_embeddings_dimensions_refused_as_vllm_does(stack: Stack, embedder: Embedder) -> None:
    direct, through = pair(stack, embedder.direct, "/api/v2/embeddings",
                           {"input": "x", "dimensions": 8}, EMBED_SERVED, EMBED_MODEL)
    assert direct.status_code == 400, direct.text
    assert through.status_code == 400
    assert through.json()["error"]["message"] == direct.json()["error"]["message"]


TOKENIZE_CASES: dict[str, dict[str, Any]] = {
    "prompt": {"prompt": "def main():\n    return 0"},
    "no_special_tokens": {"prompt": "import os", "add_special_tokens": False},
    "token_strs": {"prompt": "class A:", "return_token_strs": True},
    "messages": {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "def main("}]},
    "messages_no_generation_prompt": {"messages": HELLO, "add_generation_prompt": False},
}


@pytest.mark.parametrize("name", sorted(TOKENIZE_CASES))
def test_tokenize_identical(stack: Stack, name: str) -> None:
    root = stack.vllm.base_url.removesuffix("/v1")
    direct, through = pair(stack, root + "/tokenize", "/api/v2/tokenize",
                           TOKENIZE_CASES[name], SERVED_NAME, MODEL)
    assert direct.status_code == 200, direct.text
    assert through.status_code == 200, through.text
    d, t = direct.json(), through.json()
    assert t == {"total_tokens": d["count"], **d}
    assert t["total_tokens"] == len(t["tokens"])


def test_tokenize_an_embedding_model(stack: Stack, embedder: Embedder) -> None:
    root = embedder.vllm.base_url.removesuffix("/v1")
    direct, through = pair(stack, root + "/tokenize", "/api/v2/tokenize",
                           {"prompt": "def main():"}, EMBED_SERVED, EMBED_MODEL)
    assert through.status_code == 200, through.text
    assert through.json() == {"total_tokens": direct.json()["count"], **direct.json()}


def test_a_models_type_is_enforced(stack: Stack, embedder: Embedder) -> None:
    with httpx.Client(base_url=stack.gateway.url, headers=_auth(stack), timeout=60) as c:
        for path, body in (
                ("/api/v2/completions", {"model": EMBED_MODEL, "prompt": "x"}),
                ("/api/v2/chat/completions", {"model": EMBED_MODEL, "messages": HELLO}),
                ("/api/v2/embeddings", {"model": MODEL, "input": "x"})):
            r = c.post(path, json=body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "wrong_model_type"
            assert "of type" in error["message"] and error["param"] == "model"


# -- the official SDK ------------------------------------------------------------------

def _sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway.url + "/api/v2", api_key=stack.key,
                         max_retries=0, timeout=60)


def test_openai_sdk_chat(stack: Stack) -> None:
    client = _sdk(stack)
    done = client.chat.completions.create(model=MODEL, messages=HELLO,  # type: ignore[arg-type]
                                          max_tokens=5, temperature=0)
    assert done.model == MODEL and done.choices[0].message.role == "assistant"
    assert done.usage is not None and done.usage.completion_tokens == 5
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=5, temperature=0,  # type: ignore[arg-type]
        stream=True) if chunk.choices]
    assert "".join(pieces) == done.choices[0].message.content
    called = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=24, temperature=0,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = called.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]


def test_openai_sdk_embeddings(stack: Stack, embedder: Embedder) -> None:
    client = _sdk(stack)
    vectors = client.embeddings.create(model=EMBED_MODEL, input=["import os", "class A:"])
    assert vectors.model == EMBED_MODEL and len(vectors.data) == 2
    assert len(vectors.data[0].embedding) == 128  # the demo model's hidden size
    # the SDK asks for base64 by default and decodes it: the same vectors as floats
    floats = httpx.post(stack.gateway.url + "/api/v2/embeddings", headers=_auth(stack),
                        json={"model": EMBED_MODEL, "input": ["import os", "class A:"]})
    for got, want in zip(vectors.data, floats.json()["data"], strict=True):
        assert got.embedding == pytest.approx(want["embedding"], rel=1e-6)


# -- what /completions has, every endpoint has -----------------------------------------

ENDPOINTS = {
    "completions": ("/api/v2/completions", MODEL, {"prompt": "def main(", "max_tokens": 4}),
    "chat": ("/api/v2/chat/completions", MODEL, {"messages": HELLO, "max_tokens": 4}),
    # min_tokens: the stream's count is known without asking for usage (sampled, the
    # demo model ended a stream after 2 tokens once)
    "chat_stream": ("/api/v2/chat/completions", MODEL,
                    {"messages": HELLO, "max_tokens": 4, "min_tokens": 4, "stream": True}),
    "embeddings": ("/api/v2/embeddings", EMBED_MODEL, {"input": ["import os", "x"]}),
    "tokenize": ("/api/v2/tokenize", MODEL, {"prompt": "def main("}),
}


def _records(stack: Stack, tag: str, count: int) -> list[Any]:
    store = Store(stack.gateway.env["PARAGATE_DATABASE_URL"])
    try:
        deadline = time.monotonic() + 30
        while True:
            found = [r for r in store.list_usage() if (r.client_request_id or "")
                     .startswith(tag)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.2)
    finally:
        store.close()


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_each_endpoint_is_recorded_with_vllms_counts(stack: Stack, embedder: Embedder,
                                                     name: str) -> None:
    path, model, body = ENDPOINTS[name]
    tag = f"ep-{name}-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=stack.gateway.url, headers=_auth(stack), timeout=60) as c:
        r = c.post(path, json={"model": model, **body}, headers={"x-request-id": tag})
        assert r.status_code == 200, r.text
        refused = c.post(path, json={"model": "no-such-model", **body},
                         headers={"x-request-id": tag + "-404"})
        assert refused.status_code == 404
    usage = None if body.get("stream") else r.json().get("usage")
    records = {r.client_request_id: r for r in _records(stack, tag, 2)}
    ok, missing = records[tag], records[tag + "-404"]
    assert ok.endpoint == path and ok.status == 200 and ok.outcome == "ok"
    assert ok.model == model and not ok.partial
    if name == "tokenize":  # nothing generated, nothing computed: no tokens counted
        assert ok.prompt_tokens is None and ok.completion_tokens is None
    elif usage is not None:
        assert ok.prompt_tokens == usage["prompt_tokens"]
        assert (ok.completion_tokens or 0) == usage.get("completion_tokens", 0)
    else:  # a stream: counted from vLLM's running usage
        assert ok.prompt_tokens and ok.completion_tokens == 4
    assert missing.endpoint == path and missing.status == 404
    assert missing.error_type == "model_not_found"
