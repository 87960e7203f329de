"""POST /api/v2/completions through the ASGI app, with the fake vLLM as upstream."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from paragate.gateway import Gateway

from .conftest import Keys
from .fake_vllm import FakeVLLM
from .test_protocol import multipart

URL = "/api/v2/completions"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_envelope(r: httpx.Response, status: int, code: str, param: str | None = None,
                    type_: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] == code
    assert err["param"] == param
    if type_ is not None:
        assert err["type"] == type_
    return err  # type: ignore[no-any-return]


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] for e in events]


async def post(client: httpx.AsyncClient, key: str, **body: Any) -> httpx.Response:
    return await client.post(URL, json=body, headers=auth(key))


async def test_completion_relayed_with_requested_model(
    client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM
) -> None:
    r = await post(client, keys.full, model="alfred-4.2", prompt="Hello, ", max_tokens=4)
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "alfred-4.2"
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " tok" * 4
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                             "prompt_tokens_details": None}
    assert fake.requests[-1] == {"model": "ok", "prompt": "Hello, ", "max_tokens": 4}


async def test_stream_relayed_and_usage_chunk_dropped_unless_asked(
    client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM
) -> None:
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", max_tokens=3, stream=True)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == [" t0", " t1", " t2"]
    assert {c["model"] for c in chunks} == {"alfred-4.2"}
    # paragate asked vLLM for usage on its own behalf (running and final), and kept it
    assert fake.requests[-1]["stream_options"] == {"include_usage": True,
                                                   "continuous_usage_stats": True}
    assert all("usage" not in c for c in chunks)


async def test_stream_identical_to_what_vllm_sends_the_client(
    client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM
) -> None:
    """The usage paragate asks for on its own behalf leaves no trace in the stream: the
    running usage leaves every chunk, vLLM's fingerprint goes back on the last chunk
    (known from the upstream's first answer), the usage chunk is dropped."""
    await post(client, keys.full, model="alfred-4.2", prompt="x", max_tokens=1)
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", max_tokens=3,
                   stream=True)
    async with httpx.AsyncClient() as direct_client:
        direct = await direct_client.post(fake.base_url + "/completions", json={
            "model": "ok", "prompt": "x", "max_tokens": 3, "stream": True})
    def same(text: str) -> str:  # two requests may straddle a second
        return re.sub(r'"created":\d+', '"created":0', text)

    model_member = '"model":"ok"'
    assert same(r.text) == same(direct.text.replace(model_member, '"model":"alfred-4.2"'))
    assert '"system_fingerprint":"vllm-fake-0001"}' in r.text


async def test_stream_with_usage_when_asked(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", max_tokens=2,
                   stream=True, stream_options={"include_usage": True})
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    assert chunks[-1]["model"] == "alfred-4.2"


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_recorded(
    client: httpx.AsyncClient, keys: Keys, gateway: Gateway, stream: bool
) -> None:
    r = await post(client, keys.full, model="alfred-4.2", prompt="x", max_tokens=5,
                   stream=stream)
    assert r.status_code == 200
    for _ in range(100):
        records = gateway.store.list_usage()
        if records:
            break
        await asyncio.sleep(0.02)
    (rec,) = records
    assert (rec.model, rec.stream, rec.status, rec.outcome) == ("alfred-4.2", stream, 200, "ok")
    assert (rec.prompt_tokens, rec.completion_tokens, rec.total_tokens) == (3, 5, 8)


async def test_form_and_multipart_bodies(client: httpx.AsyncClient, keys: Keys,
                                         fake: FakeVLLM) -> None:
    form = urlencode({"model": "alfred-4.2", "prompt": "Hi", "max_tokens": "2",
                      "temperature": "0"})
    r = await client.post(URL, content=form, headers={
        **auth(keys.full), "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert fake.requests[-1] == {"model": "ok", "prompt": "Hi", "max_tokens": 2,
                                 "temperature": 0.0}
    ctype, raw = multipart([("model", "alfred-4.2"), ("prompt", "Hi"), ("stream", "true"),
                            ("max_tokens", "2")])
    r = await client.post(URL, content=raw, headers={**auth(keys.full), "content-type":
                                                     ctype.decode()})
    assert r.status_code == 200
    assert sse_events(r.text)[-1] == "[DONE]"


async def test_model_limits_applied(client: httpx.AsyncClient, keys: Keys,
                                    fake: FakeVLLM) -> None:
    r = await post(client, keys.full, model="limited", prompt="x")
    assert r.status_code == 200
    assert fake.requests[-1]["max_tokens"] == 3  # the model's default
    r = await post(client, keys.full, model="limited", prompt="x", logprobs=3)
    assert_envelope(r, 400, "invalid_value", "logprobs")
    r = await post(client, keys.full, model="limited", prompt="x", max_tokens=11)
    assert_envelope(r, 400, "invalid_value", "max_tokens")


# -- errors before anything is forwarded ----------------------------------------------

@pytest.mark.parametrize(("body", "param", "code"), [
    ({"prompt": "x"}, "model", "missing_field"),
    ({"model": "alfred-4.2", "prompt": "x", "temperature": 3}, "temperature", "invalid_value"),
    ({"model": "alfred-4.2", "prompt": "x", "n": "2"}, "n", "invalid_type"),
    ({"model": "alfred-4.2", "prompt": "x", "stop": ["1", "2", "3", "4", "5"]}, "stop",
     "invalid_value"),
])
async def test_invalid_bodies(client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM,
                              body: dict[str, Any], param: str, code: str) -> None:
    r = await client.post(URL, json=body, headers=auth(keys.full))
    assert_envelope(r, 400, code, param, "invalid_request_error")
    assert fake.requests == []


M = {"model": "alfred-4.2", "prompt": "x"}


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "alfred-4.2"}, "prompt", "missing_field"),
    ({**M, "top_p": 0}, "top_p", "invalid_value"),
    ({**M, "top_p": 1.5}, "top_p", "invalid_value"),
    ({**M, "presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({**M, "frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
    ({**M, "logit_bias": {"50256": 101}}, "logit_bias", "invalid_value"),
    ({**M, "logit_bias": [1, 2]}, "logit_bias", "invalid_type"),
    ({**M, "max_tokens": -1}, "max_tokens", "invalid_value"),
    ({**M, "n": 0}, "n", "invalid_value"),
    ({**M, "n": 3, "best_of": 2}, "best_of", "invalid_value"),
    ({**M, "best_of": 2, "stream": True}, "best_of", "invalid_value"),
    ({**M, "logprobs": 6}, "logprobs", "invalid_value"),  # the default maximum is 5
    ({**M, "temperature": "hot"}, "temperature", "invalid_type"),
    ({**M, "stream": "yes"}, "stream", "invalid_type"),
    ({**M, "prompt": {"a": 1}}, "prompt", "invalid_type"),
])
async def test_every_rule_over_http(client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM,
                                    body: dict[str, Any], param: str, code: str) -> None:
    r = await client.post(URL, json=body, headers=auth(keys.full))
    assert_envelope(r, 400, code, param, "invalid_request_error")
    assert fake.requests == []


@pytest.mark.parametrize(("ctype", "raw", "param", "code"), [
    (b"application/x-www-form-urlencoded", b"model=alfred-4.2&prompt=x&temperature=hot",
     "temperature", "invalid_type"),
    (b"application/x-www-form-urlencoded", b"model=alfred-4.2&prompt=x&stream=maybe",
     "stream", "invalid_type"),
    (b"application/x-www-form-urlencoded", b"model=alfred-4.2&prompt=x&logit_bias=%5B1%5D",
     "logit_bias", "invalid_type"),
    (b"application/x-www-form-urlencoded", b"model=alfred-4.2&prompt=x&n=0", "n",
     "invalid_value"),
    (b"application/x-www-form-urlencoded", b"prompt=x", "model", "missing_field"),
    (*multipart([("model", "alfred-4.2"), ("prompt", "x"), ("max_tokens", "many")]),
     "max_tokens", "invalid_type"),
])
async def test_form_rules_over_http(client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM,
                                    ctype: bytes, raw: bytes, param: str, code: str) -> None:
    r = await client.post(URL, content=raw, headers={**auth(keys.full),
                                                     "content-type": ctype.decode()})
    assert_envelope(r, 400, code, param, "invalid_request_error")
    assert fake.requests == []


@pytest.mark.parametrize(("ctype", "raw"), [
    ("multipart/form-data; boundary=nope", b"garbage"),
    ("multipart/form-data", b"--x\r\n"),  # no boundary at all
    ("application/x-www-form-urlencoded", b"model=\xff\xfe&prompt=x"),  # not UTF-8
    ("application/json", b"[1, 2]"),  # JSON, but not an object
    ("application/json", b"\xff"),
])
async def test_unreadable_bodies(client: httpx.AsyncClient, keys: Keys, fake: FakeVLLM,
                                 ctype: str, raw: bytes) -> None:
    r = await client.post(URL, content=raw, headers={**auth(keys.full), "content-type": ctype})
    assert r.status_code == 400, r.text
    err = assert_envelope(r, 400, r.json()["error"]["code"], None, "invalid_request_error")
    assert err["code"] in ("invalid_json", "invalid_body")
    assert fake.requests == []


async def test_chunked_body_over_the_limit(client: httpx.AsyncClient, keys: Keys,
                                           fake: FakeVLLM) -> None:
    async def chunks() -> Any:  # no Content-Length: the limit must hold while reading
        yield b'{"model": "alfred-4.2", "prompt": "'
        for _ in range(80):
            yield b"x" * 1000
        yield b'"}'

    r = await client.post(URL, content=chunks(), headers={**auth(keys.full),
                                                          "content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_envelope(r, 413, "request_too_large")
    assert fake.requests == []


async def test_malformed_json(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.post(URL, content=b'{"model": ', headers={
        **auth(keys.full), "content-type": "application/json"})
    assert_envelope(r, 400, "invalid_json")


async def test_a_string_that_is_not_utf8_is_a_400(client: httpx.AsyncClient,
                                                  keys: Keys) -> None:
    """It was a 500 and a traceback in the log (msgspec raises UnicodeDecodeError)."""
    r = await client.post(URL, content=b'{"model": "alfred-4.2", "prompt": "x\xff\xfe"}',
                          headers={**auth(keys.full), "content-type": "application/json"})
    assert_envelope(r, 400, "invalid_json")


async def test_unsupported_media_type(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.post(URL, content=b"hi", headers={**auth(keys.full),
                                                       "content-type": "text/plain"})
    assert_envelope(r, 415, "unsupported_media_type")


async def test_body_too_large(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await post(client, keys.full, model="alfred-4.2", prompt="x" * 70_000)
    assert_envelope(r, 413, "request_too_large")


async def test_wrong_method(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.get(URL, headers=auth(keys.full))
    assert_envelope(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


@pytest.mark.parametrize("model", ["nope", "off"])
async def test_unknown_or_disabled_model(client: httpx.AsyncClient, keys: Keys,
                                         model: str) -> None:
    r = await post(client, keys.full, model=model, prompt="x")
    err = assert_envelope(r, 404, "model_not_found", "model")
    assert model in err["message"]


async def test_model_not_permitted_for_key(client: httpx.AsyncClient, keys: Keys) -> None:
    assert (await post(client, keys.restricted, model="alfred-4.2", prompt="x")).status_code == 200
    r = await post(client, keys.restricted, model="limited", prompt="x")
    assert_envelope(r, 404, "model_not_found", "model")


# -- upstream failures ------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_4xx_relayed_with_its_status(client: httpx.AsyncClient, keys: Keys,
                                                    stream: bool) -> None:
    r = await post(client, keys.full, model="status-400", prompt="x", stream=stream)
    err = assert_envelope(r, 400, "upstream_error", "max_tokens", "BadRequestError")
    assert err["message"] == "fake refusal 400"
    r = await post(client, keys.full, model="status-404", prompt="x", stream=stream)
    assert_envelope(r, 404, "upstream_error", "max_tokens")


@pytest.mark.parametrize(("model", "status", "code"), [
    ("status-500", 502, "upstream_error"),
    ("status-503", 503, "upstream_unavailable"),
    ("garbage", 502, "upstream_error"),
    ("down", 503, "upstream_unavailable"),
    ("hang", 504, "upstream_first_byte_timeout"),
])
async def test_upstream_failures(client: httpx.AsyncClient, keys: Keys, model: str,
                                 status: int, code: str) -> None:
    r = await post(client, keys.full, model=model, prompt="x")
    assert_envelope(r, status, code, type_="upstream_error")


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_refusing_the_gateways_credentials_is_a_502(
        client: httpx.AsyncClient, keys: Keys, stream: bool) -> None:
    # A 401 relayed as is would tell an SDK user that their own key is wrong.
    r = await post(client, keys.full, model="unauthorized", prompt="x", stream=stream)
    err = assert_envelope(r, 502, "upstream_error", type_="upstream_error")
    assert "upstream API key" in err["message"] and "Unauthorized" in err["message"]


@pytest.mark.parametrize(("model", "status", "code"), [
    ("down", 503, "upstream_unavailable"),
    ("hang", 504, "upstream_first_byte_timeout"),
])
async def test_upstream_failures_before_stream_starts(client: httpx.AsyncClient, keys: Keys,
                                                      model: str, status: int,
                                                      code: str) -> None:
    r = await post(client, keys.full, model=model, prompt="x", stream=True)
    assert_envelope(r, status, code, type_="upstream_error")


@pytest.mark.parametrize(("model", "message"), [
    ("drop", "closed the connection"),
    ("error-event", "engine died"),
])
async def test_failure_mid_stream_is_an_error_event_then_done(
    client: httpx.AsyncClient, keys: Keys, gateway: Gateway, model: str, message: str
) -> None:
    r = await post(client, keys.full, model=model, prompt="x", max_tokens=5, stream=True)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["code"] == "upstream_error"
    assert message in error["error"]["message"]
    assert json.loads(events[0])["choices"][0]["text"] == " t0"
    for _ in range(100):
        if gateway.store.list_usage():
            break
        await asyncio.sleep(0.02)
    assert gateway.store.list_usage()[0].outcome == "upstream_error"
