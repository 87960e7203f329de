"""Decoding and checking request bodies (no server)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest

from paragate.errors import InvalidRequest, UnsupportedMediaType
from paragate.protocol import FIELDS, CompletionRequest, parse_request

JSON = b"application/json"
FORM = b"application/x-www-form-urlencoded"


def parse(body: dict[str, Any]) -> CompletionRequest:
    return parse_request(JSON, json.dumps(body).encode())


def base(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "p", **kw}


@pytest.mark.parametrize("prompt", ["", "text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_prompt_shapes_accepted(prompt: Any) -> None:
    assert parse(base(prompt=prompt)).body["prompt"] == prompt


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [-1], [[1], "a"], 5, {"a": 1}, [True]])
def test_prompt_shapes_refused(prompt: Any) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(base(prompt=prompt))
    assert e.value.param == "prompt"


GOOD = [
    ("max_tokens", 0), ("max_tokens", 100), ("temperature", 0), ("temperature", 2.0),
    ("top_p", 1), ("top_p", 0.01), ("n", 1), ("n", 128), ("logprobs", 0), ("echo", True),
    ("stop", "x"), ("stop", ["a", "b", "c", "d"]), ("presence_penalty", -2),
    ("frequency_penalty", 2), ("best_of", 3), ("logit_bias", {"12": -100, "7": 100}),
    ("user", "u-1"), ("suffix", "s"), ("seed", 42), ("temperature", None), ("stop", None),
]


@pytest.mark.parametrize(("field", "value"), GOOD)
def test_values_accepted(field: str, value: Any) -> None:
    parse(base(**{field: value}))


BAD = [
    ("max_tokens", -1, "at least 0"), ("max_tokens", 1.5, "an integer"),
    ("max_tokens", "10", "an integer"), ("max_tokens", True, "an integer"),
    ("temperature", 2.01, "between 0 and 2"), ("temperature", -0.1, "between 0 and 2"),
    ("temperature", "hot", "a number"), ("top_p", 0, "greater than 0"),
    ("top_p", 1.1, "at most 1"), ("n", 0, "between 1 and 128"), ("n", 129, "between 1 and 128"),
    ("stream", "yes", "a boolean"), ("echo", 1, "a boolean"), ("logprobs", -1, "at least 0"),
    ("stop", ["a", "b", "c", "d", "e"], "at most 4"), ("stop", [1], "list of strings"),
    ("presence_penalty", 2.5, "between -2 and 2"), ("frequency_penalty", -3, "between -2 and 2"),
    ("logit_bias", {"12": 101}, "between -100 and 100"), ("logit_bias", {"x": 1}, "token ids"),
    ("logit_bias", [1], "a JSON object"), ("user", 5, "a string"), ("suffix", [], "a string"),
    ("seed", "1", "an integer"), ("best_of", 0, "at least 1"),
    ("stream_options", {"include_usage": True}, "only allowed when 'stream' is true"),
]


@pytest.mark.parametrize(("field", "value", "words"), BAD)
def test_values_refused_naming_the_field(field: str, value: Any, words: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(base(**{field: value}))
    assert e.value.param == field
    assert words in e.value.message
    assert e.value.http_status == 400


def test_best_of_rules() -> None:
    with pytest.raises(InvalidRequest, match="at least 'n'"):
        parse(base(n=3, best_of=2))
    with pytest.raises(InvalidRequest, match="cannot be used with 'stream'"):
        parse(base(best_of=2, stream=True))
    parse(base(best_of=1, stream=True))


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"prompt": "p"}, "model", "missing_field"),
    ({"model": "", "prompt": "p"}, "model", "missing_field"),
    ({"model": 3, "prompt": "p"}, "model", "invalid_type"),
    ({"model": "m"}, "prompt", "missing_field"),
    ({"model": "m", "prompt": None}, "prompt", "missing_field"),
])
def test_required_fields(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(body)
    assert (e.value.param, e.value.code) == (param, code)


@pytest.mark.parametrize("raw", [b"{", b"[1]", b'"x"', b"", b"\xff"])
def test_malformed_json(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_request(JSON, raw)
    assert e.value.code == "invalid_json"


def test_unsupported_media_type() -> None:
    with pytest.raises(UnsupportedMediaType) as e:
        parse_request(b"text/plain", b"hello")
    assert e.value.http_status == 415


def test_unknown_fields_pass_through_untouched() -> None:
    req = parse(base(top_k=5, some_future_field={"a": [1]}, ignore_eos=True))
    assert req.body["top_k"] == 5
    assert req.body["some_future_field"] == {"a": [1]}


def test_form_values_get_schema_types() -> None:
    raw = urlencode([
        ("model", "m"), ("prompt", "Hello, "), ("max_tokens", "7"), ("temperature", "0.5"),
        ("stream", "true"), ("echo", "0"), ("stop", "a"), ("stop", "b"), ("logprobs", "2"),
        ("logit_bias", '{"5": 10}'), ("top_k", "3"), ("unknown", "[1, 2]"), ("word", "hi"),
    ]).encode()
    body = parse_request(FORM + b"; charset=utf-8", raw).body
    assert body == {"model": "m", "prompt": "Hello, ", "max_tokens": 7, "temperature": 0.5,
                    "stream": True, "echo": False, "stop": ["a", "b"], "logprobs": 2,
                    "logit_bias": {"5": 10}, "top_k": 3, "unknown": [1, 2], "word": "hi"}


def test_form_json_lists_for_stop_and_prompt() -> None:
    raw = urlencode({"model": "m", "prompt": "[1, 2, 3]", "stop": '["x", "y"]'}).encode()
    body = parse_request(FORM, raw).body
    assert body["prompt"] == [1, 2, 3]
    assert body["stop"] == ["x", "y"]


@pytest.mark.parametrize(("pairs", "param"), [
    ([("model", "m"), ("prompt", "p"), ("max_tokens", "ten")], "max_tokens"),
    ([("model", "m"), ("prompt", "p"), ("stream", "maybe")], "stream"),
    ([("model", "m"), ("prompt", "p"), ("logit_bias", "{bad")], "logit_bias"),
    ([("model", "m"), ("prompt", "p"), ("n", "1"), ("n", "2")], "n"),
])
def test_form_coercion_errors(pairs: list[tuple[str, str]], param: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_request(FORM, urlencode(pairs).encode())
    assert e.value.param == param


def multipart(fields: list[tuple[str, str]], boundary: str = "XyZ") -> tuple[bytes, bytes]:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             for k, v in fields]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return f"multipart/form-data; boundary={boundary}".encode(), body


def test_multipart() -> None:
    ctype, raw = multipart([("model", "m"), ("prompt", "héllo\nworld"), ("n", "2"),
                            ("best_of", "2"), ("stop", "a")])
    body = parse_request(ctype, raw).body
    assert body == {"model": "m", "prompt": "héllo\nworld", "n": 2, "best_of": 2, "stop": "a"}


def test_form_covers_every_kind() -> None:
    # the same fields, urlencoded and multipart, give the same body
    pairs = [("model", "m"), ("prompt", "a"), ("prompt", "b"), ("seed", "42"),
             ("stream", "yes"), ("stream_options", '{"include_usage": true}'),
             ("top_p", "0.9"), ("presence_penalty", "-1.5"), ("frequency_penalty", "2"),
             ("logit_bias", '{"7": -100}'), ("stop", "x"), ("stop", "y"), ("echo", "off"),
             ("suffix", "end"), ("user", "u-1"), ("ignore_eos", "true")]
    want = {"model": "m", "prompt": ["a", "b"], "seed": 42, "stream": True,
            "stream_options": {"include_usage": True}, "top_p": 0.9,
            "presence_penalty": -1.5, "frequency_penalty": 2.0, "logit_bias": {"7": -100},
            "stop": ["x", "y"], "echo": False, "suffix": "end", "user": "u-1",
            "ignore_eos": True}
    assert parse_request(FORM, urlencode(pairs).encode()).body == want
    assert parse_request(*multipart(pairs)).body == want


def test_multipart_malformed() -> None:
    with pytest.raises(InvalidRequest):
        parse_request(b"multipart/form-data; boundary=nope", b"garbage")


def test_curl_json_without_content_type_header() -> None:
    # `curl -d '{...}'` labels JSON as a form: read it as the JSON it is
    req = parse_request(FORM, b'{"model": "m", "prompt": "p"}')
    assert req.model == "m"


def test_upstream_body_is_raw_when_nothing_changes() -> None:
    raw = b'{"model":"m","prompt":"p","max_tokens":5}'
    req = parse_request(JSON, raw)
    assert req.upstream_body("m", max_logprobs=5, default_max_tokens=None,
                             max_tokens_limit=None) is raw


def test_upstream_body_rewrites() -> None:
    req = parse(base(stream=True))
    out = json.loads(req.upstream_body("served", max_logprobs=5, default_max_tokens=9,
                                       max_tokens_limit=None))
    assert out["model"] == "served"
    assert out["max_tokens"] == 9
    # usage asked for on paragate's own behalf, running and final (the relay strips it)
    assert out["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert req.include_usage is False


def test_model_limits() -> None:
    with pytest.raises(InvalidRequest, match="at most 2") as e:
        parse(base(logprobs=3)).upstream_body("m", max_logprobs=2, default_max_tokens=None,
                                              max_tokens_limit=None)
    assert e.value.param == "logprobs"
    with pytest.raises(InvalidRequest, match="at most 10") as e:
        parse(base(max_tokens=11)).upstream_body("m", max_logprobs=5, default_max_tokens=None,
                                                 max_tokens_limit=10)
    assert e.value.param == "max_tokens"


def test_every_seed_field_is_described() -> None:
    # The seed's CompletionsRequest properties (shared/seed, Paradigm API v2).
    seed = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "logprobs",
            "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias",
            "user", "suffix"}
    assert {f.name for f in FIELDS if f.seed} == seed


def test_prefix_affinity_reads_a_conversation_and_embedding_inputs() -> None:
    """A chat request's affinity prefix is its conversation, message by message: two
    that share a long system prompt share a key; embeddings read their input."""
    from paragate.protocol import parse_chat, parse_embeddings
    from paragate.upstream.balancer import affinity_key

    def chat(system: str, question: str) -> int | None:
        body = {"model": "m", "messages": [{"role": "system", "content": system},
                                           {"role": "user", "content": question}]}
        req = parse_chat(JSON, json.dumps(body).encode())
        return affinity_key("prefix", req.affinity_fields(), 64)

    manual = "You answer from the manual. " * 4
    assert chat(manual, "a?") == chat(manual, "b?") is not None
    assert chat(manual, "a?") != chat("Another manual. " * 8, "a?")
    embed = parse_embeddings(JSON, b'{"model": "m", "input": ["abc"]}')
    assert affinity_key("prefix", embed.affinity_fields(), 64) == affinity_key(
        "prefix", {"prompt": "abc"}, 64)


def test_tokenize_answer_gets_total_tokens_or_passes_as_it_is() -> None:
    from paragate.protocol.tokenize import with_total

    assert with_total(b'{"count":2,"tokens":[1,2]}') == (
        b'{"total_tokens":2,"count":2,"tokens":[1,2]}')
    assert with_total(b'{"detail":"not vLLM"}') == b'{"detail":"not vLLM"}'
