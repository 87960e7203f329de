"""The endpoints beside completions (chat completions, embeddings, tokenize) through the
ASGI app, with the fake vLLM as upstream: every validation error they answer, the
behaviours all four forwarding endpoints share (``dispatch.forward``), chat streaming,
tokenize's answer, and the OpenAPI document's account of them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlencode

import httpx
import pytest

from paragate.protocol import chat, completions, embeddings, tokenize
from paragate.store import Store

from .conftest import Keys, wait_usage
from .fake_vllm import FINGERPRINT, FakeVLLM
from .test_completions import assert_envelope, auth, sse_events
from .test_openapi import conforms
from .test_protocol import multipart

COMPLETIONS = "/api/v2/completions"
CHAT = "/api/v2/chat/completions"
EMBEDDINGS = "/api/v2/embeddings"
TOKENIZE = "/api/v2/tokenize"

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
# What the fake's /tokenize answers, whatever it is asked.
VLLM_TOKENIZE = {"count": 3, "max_model_len": 2048, "tokens": [1, 2, 3], "token_strs": None}


class Raw(NamedTuple):
    """A body sent as these bytes with this Content-Type (not as JSON)."""

    content_type: str
    data: bytes


def chat_body(model: str = "alfred-4.2", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], **fields}


def embed_body(model: str = "embedder", **fields: Any) -> dict[str, Any]:
    return {"model": model, "input": "Hi", **fields}


def tok_body(model: str = "alfred-4.2", **fields: Any) -> dict[str, Any]:
    return {"model": model, **fields}


def form(body: dict[str, Any]) -> str:
    """``body`` urlencoded as a client would: strings as they are, the rest as JSON
    text (numbers, booleans, and ``messages`` or ``tools``)."""
    return urlencode([(k, v if isinstance(v, str) else json.dumps(v))
                      for k, v in body.items()])


async def send(client: httpx.AsyncClient, path: str, key: str | None,
               body: dict[str, Any] | Raw) -> httpx.Response:
    headers = auth(key) if key is not None else {}
    if isinstance(body, Raw):
        return await client.post(path, content=body.data,
                                 headers={**headers, "content-type": body.content_type})
    return await client.post(path, json=body, headers=headers)


@dataclass(frozen=True)
class Endpoint:
    """One forwarding endpoint: a minimal valid body for ``model``, where vLLM serves it,
    and what the fake reports as usage for that body."""

    path: str
    upstream: str  # the fake's path
    model: str  # a model of a type it serves, that every key but restricted may use
    body: dict[str, Any]  # without the model
    usage: tuple[int | None, int | None, int | None]  # prompt, completion, total
    forbidden: str  # a model of a type it serves that the restricted key may not use
    rich: dict[str, Any] = field(default_factory=dict)  # more fields, for the form test

    def request(self, model: str | None = None) -> dict[str, Any]:
        return {"model": model or self.model, **self.body}


ENDPOINTS = [
    Endpoint(COMPLETIONS, "/v1/completions", "alfred-4.2", {"prompt": "Hi", "max_tokens": 2},
             (3, 2, 5), "limited", {"temperature": 0.5, "stop": ["\n"], "echo": False}),
    Endpoint(CHAT, "/v1/chat/completions", "alfred-4.2",
             {"messages": MESSAGES, "max_completion_tokens": 2}, (3, 2, 5), "limited",
             {"temperature": 0.5, "logprobs": True, "top_logprobs": 1, "tools": [TOOL],
              "tool_choice": {"type": "function", "function": {"name": "lookup"}},
              "response_format": {"type": "json_object"}, "seed": 7}),
    # the fake reports 3 prompt tokens per input and no completion tokens
    Endpoint(EMBEDDINGS, "/v1/embeddings", "embedder", {"input": "Hi"}, (3, 0, 3),
             "embedder", {"encoding_format": "float", "dimensions": 2, "normalize": True}),
    # vLLM's /tokenize reports no usage: the record holds no tokens
    Endpoint(TOKENIZE, "/tokenize", "alfred-4.2", {"messages": MESSAGES},
             (None, None, None), "limited",
             {"add_special_tokens": False, "return_token_strs": True, "tools": [TOOL]}),
]
each_endpoint = pytest.mark.parametrize(
    "ep", ENDPOINTS, ids=[e.path.removeprefix("/api/v2/") for e in ENDPOINTS])


# -- 1. validation errors -------------------------------------------------------------

def bad(path: str, body: dict[str, Any] | Raw, code: str, param: str | None,
        id: str, status: int = 400) -> Any:
    return pytest.param(path, body, status, code, param, id=id)


INVALID = [
    # chat: the conversation
    bad(CHAT, {"model": "alfred-4.2"}, "missing_field", "messages", "chat-no-messages"),
    bad(CHAT, chat_body(messages=None), "missing_field", "messages", "chat-null-messages"),
    bad(CHAT, chat_body(messages="Hi"), "invalid_type", "messages", "chat-messages-string"),
    bad(CHAT, chat_body(messages={"role": "user"}), "invalid_type", "messages",
        "chat-messages-object"),
    bad(CHAT, chat_body(messages=[]), "invalid_type", "messages", "chat-messages-empty"),
    bad(CHAT, chat_body(messages=["Hi"]), "invalid_type", "messages[0]",
        "chat-message-not-object"),
    bad(CHAT, chat_body(messages=[MESSAGES[0], {"content": "Hi"}]), "missing_field",
        "messages[1].role", "chat-no-role"),
    bad(CHAT, chat_body(messages=[{"role": "", "content": "Hi"}]), "invalid_type",
        "messages[0].role", "chat-empty-role"),
    bad(CHAT, chat_body(messages=[{"role": 5, "content": "Hi"}]), "invalid_type",
        "messages[0].role", "chat-role-not-string"),
    bad(CHAT, chat_body(messages=[{"role": "user", "content": 5}]), "invalid_type",
        "messages[0].content", "chat-content-number"),
    bad(CHAT, chat_body(messages=[{"role": "user", "content": {"type": "text"}}]),
        "invalid_type", "messages[0].content", "chat-content-object"),
    bad(CHAT, chat_body(messages=[{"role": "user", "content": [5]}]), "invalid_type",
        "messages[0].content[0]", "chat-part-a-number"),
    # chat: tools
    bad(CHAT, chat_body(tools={"type": "function"}), "invalid_type", "tools",
        "chat-tools-not-list"),
    bad(CHAT, chat_body(tools=[{"type": "function", "function": {"description": "d"}}]),
        "invalid_type", "tools[0].function.name", "chat-tool-no-name"),
    bad(CHAT, chat_body(tools=[{"type": "function", "function": {"name": ""}}]),
        "invalid_type", "tools[0].function.name", "chat-tool-empty-name"),
    bad(CHAT, chat_body(tools=[{"type": "function"}]), "invalid_type", "tools[0]",
        "chat-tool-no-function"),
    bad(CHAT, chat_body(tools=[TOOL], tool_choice={"type": "function",
                                                   "function": {"name": "other"}}),
        "invalid_value", "tool_choice", "chat-tool-choice-unknown-function"),
    bad(CHAT, chat_body(tool_choice="sometimes"), "invalid_value", "tool_choice",
        "chat-tool-choice-bad-string"),
    bad(CHAT, chat_body(tool_choice=5), "invalid_type", "tool_choice",
        "chat-tool-choice-number"),
    bad(CHAT, chat_body(tools=[TOOL], tool_choice={"type": "function"}), "invalid_type",
        "tool_choice", "chat-tool-choice-no-function"),
    # chat: response_format
    bad(CHAT, chat_body(response_format={"type": "xml"}), "invalid_value",
        "response_format.type", "chat-format-unknown-type"),
    bad(CHAT, chat_body(response_format={"type": "json_schema"}), "missing_field",
        "response_format.json_schema", "chat-json-schema-missing"),
    bad(CHAT, chat_body(response_format={"type": "json_schema", "json_schema": "s"}),
        "missing_field", "response_format.json_schema", "chat-json-schema-not-object"),
    bad(CHAT, chat_body(response_format="json"), "invalid_type", "response_format",
        "chat-format-not-object"),
    bad(CHAT, chat_body(response_format={}), "missing_field", "response_format.type",
        "chat-format-no-type"),
    # chat: logprobs and the model's limits ("limited": max_logprobs 2, max_tokens 10)
    bad(CHAT, chat_body(top_logprobs=1), "invalid_value", "top_logprobs",
        "chat-top-logprobs-without-logprobs"),
    bad(CHAT, chat_body(logprobs=1), "invalid_type", "logprobs", "chat-logprobs-integer"),
    bad(CHAT, chat_body("limited", logprobs=True, top_logprobs=3), "invalid_value",
        "top_logprobs", "chat-top-logprobs-above-model-max"),
    bad(CHAT, chat_body("limited", max_completion_tokens=11), "invalid_value",
        "max_completion_tokens", "chat-max-completion-tokens-above-limit"),
    bad(CHAT, chat_body("limited", max_tokens=11), "invalid_value", "max_tokens",
        "chat-max-tokens-above-limit"),
    bad(CHAT, chat_body(max_completion_tokens=-1), "invalid_value",
        "max_completion_tokens", "chat-max-completion-tokens-negative"),
    # chat: sampling and streaming
    bad(CHAT, chat_body(stream_options={"include_usage": True}), "invalid_value",
        "stream_options", "chat-stream-options-without-stream"),
    bad(CHAT, chat_body(n=129), "invalid_value", "n", "chat-n-above-128"),
    bad(CHAT, chat_body(n=17), "invalid_value", "n", "chat-n-above-model-max"),  # 16
    bad(CHAT, chat_body(temperature=2.5), "invalid_value", "temperature",
        "chat-temperature-too-high"),
    bad(CHAT, chat_body(temperature=-0.1), "invalid_value", "temperature",
        "chat-temperature-negative"),
    bad(CHAT, chat_body(temperature="hot"), "invalid_type", "temperature",
        "chat-temperature-string"),
    # chat: the body itself
    bad(CHAT, {"messages": MESSAGES}, "missing_field", "model", "chat-no-model"),
    bad(CHAT, Raw("application/json", b'{"model": "alfred-4.2", "messages": ['),
        "invalid_json", None, "chat-broken-json"),
    bad(CHAT, Raw("application/json", b"[1, 2]"), "invalid_json", None,
        "chat-json-not-object"),
    # a string that is not UTF-8 was a 500 (msgspec raises UnicodeDecodeError there)
    bad(CHAT, Raw("application/json", b'{"model": "alfred-4.2", "messages": "x\xff\xfe"}'),
        "invalid_json", None, "chat-json-not-utf8"),
    bad(EMBEDDINGS, Raw("application/json", b'{"model": "embedder", "input": "\xff"}'),
        "invalid_json", None, "embeddings-json-not-utf8"),
    bad(CHAT, Raw("text/plain", b"Hi"), "unsupported_media_type", None,
        "chat-unsupported-content-type", 415),
    bad(CHAT, Raw("application/x-www-form-urlencoded", b"model=alfred-4.2&messages=Hi"),
        "invalid_type", "messages", "chat-form-messages-not-json"),
    # embeddings
    bad(EMBEDDINGS, {"model": "embedder"}, "missing_field", "input", "embed-no-input"),
    bad(EMBEDDINGS, embed_body(input=[1, "a"]), "invalid_type", "input", "embed-mixed-list"),
    bad(EMBEDDINGS, embed_body(input=[]), "invalid_type", "input", "embed-empty-list"),
    bad(EMBEDDINGS, embed_body(input={}), "invalid_type", "input", "embed-object"),
    bad(EMBEDDINGS, embed_body(input=5), "invalid_type", "input", "embed-number"),
    bad(EMBEDDINGS, embed_body(input=[[1], [-1]]), "invalid_type", "input",
        "embed-negative-token-id"),
    bad(EMBEDDINGS, embed_body(input=["a"] * 65), "invalid_value", "input",
        "embed-inputs-above-model-max"),  # max_prompts: 64
    bad(EMBEDDINGS, embed_body(encoding_format="int8"), "invalid_value", "encoding_format",
        "embed-encoding-format-unknown"),
    bad(EMBEDDINGS, embed_body(encoding_format=1), "invalid_type", "encoding_format",
        "embed-encoding-format-number"),
    bad(EMBEDDINGS, embed_body(dimensions=0), "invalid_value", "dimensions",
        "embed-dimensions-0"),
    bad(EMBEDDINGS, embed_body(dimensions="2"), "invalid_type", "dimensions",
        "embed-dimensions-string"),
    bad(EMBEDDINGS, {"input": "Hi"}, "missing_field", "model", "embed-no-model"),
    bad(EMBEDDINGS, Raw("application/json", b"{"), "invalid_json", None,
        "embed-broken-json"),
    bad(EMBEDDINGS, Raw("text/csv", b"a,b"), "unsupported_media_type", None,
        "embed-unsupported-content-type", 415),
    # tokenize
    bad(TOKENIZE, tok_body(), "missing_field", "prompt", "tok-neither"),
    bad(TOKENIZE, tok_body(prompt="Hi", messages=MESSAGES), "invalid_value", "prompt",
        "tok-both"),
    bad(TOKENIZE, tok_body(prompt=5), "invalid_type", "prompt", "tok-prompt-number"),
    bad(TOKENIZE, tok_body(prompt=["Hi"]), "invalid_type", "prompt", "tok-prompt-list"),
    bad(TOKENIZE, tok_body(messages=[]), "invalid_type", "messages", "tok-messages-empty"),
    bad(TOKENIZE, tok_body(messages="Hi"), "invalid_type", "messages",
        "tok-messages-string"),
    bad(TOKENIZE, tok_body(messages=[{"role": 1, "content": "Hi"}]), "invalid_type",
        "messages[0].role", "tok-role-not-string"),
    bad(TOKENIZE, tok_body(prompt="Hi", add_special_tokens="yes"), "invalid_type",
        "add_special_tokens", "tok-add-special-tokens-string"),
    bad(TOKENIZE, tok_body(prompt="Hi", tools={}), "invalid_type", "tools",
        "tok-tools-not-list"),
    bad(TOKENIZE, {"prompt": "Hi"}, "missing_field", "model", "tok-no-model"),
    bad(TOKENIZE, Raw("application/json", b"nope"), "invalid_json", None,
        "tok-broken-json"),
    bad(TOKENIZE, Raw("text/plain", b"Hi"), "unsupported_media_type", None,
        "tok-unsupported-content-type", 415),
    # a model of a type the endpoint does not serve
    bad(COMPLETIONS, {"model": "embedder", "prompt": "Hi"}, "wrong_model_type", "model",
        "completions-embedding-model"),
    bad(CHAT, chat_body("embedder"), "wrong_model_type", "model", "chat-embedding-model"),
    bad(EMBEDDINGS, embed_body("alfred-4.2"), "wrong_model_type", "model",
        "embed-llm-model"),
]


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), INVALID)
async def test_invalid_request(client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM,
                               path: str, body: dict[str, Any] | Raw, status: int, code: str,
                               param: str | None) -> None:
    r = await send(client, path, keys.full, body)
    err = assert_envelope(r, status, code, param, "invalid_request_error")
    if param is not None and param != "model":
        assert param.split("[")[0].split(".")[0] in err["message"]
    if code == "wrong_model_type":
        assert isinstance(body, dict)
        assert f"'{body['model']}'" in err["message"] and path in err["message"]
    assert fake.requests == []  # refused before anything was forwarded


# -- 2. what the four endpoints share ---------------------------------------------------

@each_endpoint
async def test_a_key_is_required(client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM,
                                 ep: Endpoint) -> None:
    r = await send(client, ep.path, None, ep.request())
    assert_envelope(r, 401, "invalid_api_key", None, "authentication_error")
    assert r.headers["www-authenticate"] == "Bearer"
    assert fake.requests == []


@each_endpoint
async def test_unknown_disabled_or_forbidden_model(client: httpx.AsyncClient, keys: Keys,
                                                   fake: FakeVLLM, ep: Endpoint) -> None:
    for key, model in ((keys.full, "nope"), (keys.full, "off"),
                       (keys.restricted, ep.forbidden)):
        r = await send(client, ep.path, key, ep.request(model))
        err = assert_envelope(r, 404, "model_not_found", "model", "invalid_request_error")
        assert f"'{model}'" in err["message"]
    assert fake.requests == []


@each_endpoint
async def test_usage_recorded_under_the_endpoint(client: httpx.AsyncClient, keys: Keys,
                                                 store: Store, ep: Endpoint) -> None:
    r = await send(client, ep.path, keys.full, ep.request())
    assert r.status_code == 200, r.text
    (rec,) = await wait_usage(store, lambda rows: len(rows) == 1)
    assert rec.endpoint == ep.path
    assert (rec.model, rec.stream, rec.status, rec.outcome) == (ep.model, False, 200, "ok")
    assert (rec.prompt_tokens, rec.completion_tokens, rec.total_tokens) == ep.usage
    assert rec.model_id is not None and rec.partial is False


@each_endpoint
async def test_rate_limit_applies(client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM,
                                  ep: Endpoint) -> None:
    for left in ("1", "0"):
        r = await send(client, ep.path, keys.throttled, ep.request())
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-remaining-requests"] == left
    r = await send(client, ep.path, keys.throttled, ep.request())
    err = assert_envelope(r, 429, "rate_limit_exceeded", None, "rate_limit_error")
    assert "2 requests per minute" in err["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert len(fake.requests) == 2


@each_endpoint
async def test_forwarded_to_vllms_path_under_the_upstream_name(
        client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM, ep: Endpoint) -> None:
    r = await send(client, ep.path, keys.full, ep.request())
    assert r.status_code == 200, r.text
    assert fake.paths == [ep.upstream]
    assert fake.requests == [{**ep.request(), "model": "ok"}]
    answer = r.json()
    if ep.path != TOKENIZE:  # vLLM's tokenize answer names no model
        assert answer["model"] == ep.model  # the name asked for, not the upstream's
    assert '"ok"' not in r.text


@each_endpoint
async def test_form_bodies_forwarded_as_the_json_body(
        client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM, ep: Endpoint) -> None:
    body = {**ep.request(), **ep.rich}
    as_form = Raw("application/x-www-form-urlencoded", form(body).encode())
    ctype, data = multipart([(k, v if isinstance(v, str) else json.dumps(v))
                             for k, v in body.items()])
    as_multipart = Raw(ctype.decode(), data)
    for sent in (body, as_form, as_multipart):
        r = await send(client, ep.path, keys.full, sent)
        assert r.status_code == 200, r.text
    as_json, *from_forms = fake.requests
    assert as_json == {**body, "model": "ok"}
    assert from_forms == [as_json, as_json]
    assert fake.paths == [ep.upstream] * 3


@pytest.mark.parametrize("path", [CHAT, TOKENIZE])
async def test_messages_vllm_takes_are_forwarded_as_sent(
        client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM, path: str) -> None:
    """What vLLM's chat accepts is not refused here: a role a chat template knows, no
    content (read as empty), content parts as strings or without a type, and
    top_logprobs 0 (vLLM's default) without logprobs."""
    messages = [{"role": "ipython", "content": "42"}, {"role": "user"},
                {"role": "user", "content": ["Hi", {"image_url": "http://x/a.png"}]}]
    extra = {"top_logprobs": 0} if path == CHAT else {}
    r = await send(client, path, keys.full,
                   {"model": "alfred-4.2", "messages": messages, **extra})
    assert r.status_code == 200, r.text
    assert fake.requests[-1]["messages"] == messages


def test_a_chat_reservation_counts_text_and_media_apart() -> None:
    """Text by its bytes, an image by MEDIA_TOKENS whatever its URL or base64 size."""
    from paragate.protocol.chat import MEDIA_TOKENS, estimate_chat_tokens
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10**6}}
    text = estimate_chat_tokens({"messages": [{"role": "user", "content": "Hi"}]})
    both = estimate_chat_tokens({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, image]}]})
    assert both == text + MEDIA_TOKENS
    assert text >= len("Hi") + 2


async def test_a_form_gives_tool_choice_as_plain_text(
        client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM) -> None:
    """`tool_choice=auto` in a form is the string auto (a JSON object also reads)."""
    named = json.dumps({"type": "function", "function": {"name": "lookup"}})
    for choice, sent in (("auto", "auto"), ("required", "required"),
                         (named, json.loads(named))):
        body = form({"model": "alfred-4.2", "messages": MESSAGES, "tools": [TOOL],
                     "tool_choice": choice})
        r = await send(client, CHAT, keys.full,
                       Raw("application/x-www-form-urlencoded", body.encode()))
        assert r.status_code == 200, r.text
        assert fake.requests[-1]["tool_choice"] == sent


# -- 3. chat streaming --------------------------------------------------------------------

async def test_chat_stream_without_usage(client: httpx.AsyncClient, keys: Keys,
                                         fake: FakeVLLM, store: Store) -> None:
    r = await send(client, CHAT, keys.full, chat_body(stream=True, max_completion_tokens=3))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [" t0", " t1", " t2"]
    assert {(c["object"], c["model"]) for c in chunks} == {
        ("chat.completion.chunk", "alfred-4.2")}
    # the gateway asked vLLM for usage on its own behalf; the client sees none of it
    assert fake.requests[-1]["stream_options"] == {"include_usage": True,
                                                   "continuous_usage_stats": True}
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)  # no usage chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    (rec,) = await wait_usage(store, lambda rows: len(rows) == 1)
    assert (rec.endpoint, rec.stream, rec.outcome, rec.partial) == (CHAT, True, "ok", False)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.total_tokens) == (3, 3, 6)


async def test_chat_stream_with_usage_when_asked(client: httpx.AsyncClient, keys: Keys,
                                                 fake: FakeVLLM) -> None:
    r = await send(client, CHAT, keys.full, chat_body(
        stream=True, max_completion_tokens=2, stream_options={"include_usage": True}))
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    *text, last = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in text] == [" t0", " t1"]
    assert all("usage" not in c for c in text)  # no running usage: not asked for
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert last["model"] == "alfred-4.2"
    assert last["system_fingerprint"] == FINGERPRINT
    assert fake.requests[-1]["stream_options"] == {"include_usage": True,
                                                   "continuous_usage_stats": True}


# -- 4. tokenize's answer ----------------------------------------------------------------

@pytest.mark.parametrize("model", ["alfred-4.2", "embedder"])  # either type
@pytest.mark.parametrize("body", [{"prompt": "Hi"}, {"messages": MESSAGES}],
                         ids=["prompt", "messages"])
async def test_tokenize_adds_total_tokens_to_vllms_answer(
        client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM, model: str,
        body: dict[str, Any]) -> None:
    r = await send(client, TOKENIZE, keys.full, {"model": model, **body})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["total_tokens"] == answer["count"]
    assert answer == {"total_tokens": VLLM_TOKENIZE["count"], **VLLM_TOKENIZE}
    async with httpx.AsyncClient() as direct_client:  # vLLM's own bytes, asked directly
        direct = await direct_client.post(fake.base_url.removesuffix("/v1") + "/tokenize",
                                          json={"model": "ok", **body})
    assert r.content == b'{"total_tokens":3,' + direct.content[1:]
    assert fake.requests[0] == {"model": "ok", **body}


# -- 5. the OpenAPI document ----------------------------------------------------------------

SCHEMAS = [(CHAT, "ChatCompletionsRequest", chat.FIELDS, "messages"),
           (EMBEDDINGS, "EmbeddingsRequest", embeddings.FIELDS, "input"),
           (TOKENIZE, "TokenizeRequest", tokenize.FIELDS, None)]


async def test_openapi_request_schemas(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/api/v2/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    for path, name, fields, required in SCHEMAS:
        schema = schemas[name]
        assert set(schema["properties"]) >= {f.name for f in fields}, name
        assert set(schema["required"]) == {"model", *([required] if required else [])}
        content = doc["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "application/x-www-form-urlencoded",
                                "multipart/form-data"}
        assert {c["schema"]["$ref"] for c in content.values()} == {
            f"#/components/schemas/{name}"}
    chat_props = schemas["ChatCompletionsRequest"]["properties"]
    assert chat_props["temperature"]["maximum"] == 2 and chat_props["n"]["maximum"] == 128
    # nullable (null: not given), so null is among the values (OpenAPI 3.0.3)
    assert schemas["EmbeddingsRequest"]["properties"]["encoding_format"]["enum"] == [
        "float", "base64", None]
    # completions' own schema is still exactly its table
    assert set(schemas["CompletionsRequest"]["properties"]) == {
        f.name for f in completions.FIELDS}


async def test_openapi_describes_the_real_answers(client: httpx.AsyncClient,
                                                  keys: Keys) -> None:
    doc = (await client.get("/api/v2/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    good = {
        CHAT: {**chat_body(max_completion_tokens=2), "tools": [TOOL], "logprobs": True,
               "top_logprobs": 1},
        EMBEDDINGS: embed_body(input=["a", "b"]),
        TOKENIZE: tok_body(prompt="Hi", return_token_strs=True),
    }
    refused: dict[str, list[dict[str, Any] | Raw]] = {
        CHAT: [chat_body(temperature=9), chat_body(messages=[]), chat_body("embedder"),
               chat_body("nope"), Raw("text/plain", b"x")],
        EMBEDDINGS: [embed_body(input=[]), embed_body("alfred-4.2"), embed_body("nope")],
        TOKENIZE: [tok_body(), tok_body(messages=[{"role": 1}]), tok_body("nope")],
    }
    for path, name, _, _ in SCHEMAS:
        responses = doc["paths"][path]["post"]["responses"]
        conforms(doc, schemas[name], good[path], f"{name} (sent)")
        r = await send(client, path, keys.full, good[path])
        assert r.status_code == 200, r.text
        conforms(doc, responses["200"]["content"]["application/json"]["schema"], r.json(),
                 f"{path} 200")
        for body in refused[path]:
            r = await send(client, path, keys.full, body)
            assert 400 <= r.status_code < 500, r.text
            answer = responses.get(str(r.status_code))
            assert answer is not None, f"{path}: {r.status_code} is not documented"
            conforms(doc, answer["content"]["application/json"]["schema"], r.json(),
                     f"{path} {r.status_code}")
        r = await send(client, path, None, good[path])
        conforms(doc, responses["401"]["content"]["application/json"]["schema"], r.json(),
                 f"{path} 401")
