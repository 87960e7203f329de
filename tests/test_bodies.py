"""Hostile and broken request bodies (issue 13): each is refused with a 4xx that names
the problem and echoes no more than an excerpt of it, none is a 5xx, and none holds the
event loop. The body parsers (``protocol.bodies``) directly, with hypothesis; the
forwarding endpoints and the admin API in-process; a lying Content-Length and a chunked
body that never ends against a real ``paragate serve``."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paragate.app import App
from paragate.errors import GatewayError, InvalidRequest, RequestTooLarge
from paragate.gateway import Gateway
from paragate.protocol import BodyLimits, parse_chat, parse_request
from paragate.protocol.bodies import (
    INT_MIN,
    LIMITS,
    UINT_MAX,
    JSONError,
    _outside,
    excerpt,
    json_value,
    multipart_pairs,
    urlencoded_pairs,
)
from paragate.store import Store

from .conftest import Keys, build_gateway, seed
from .fake_vllm import FakeVLLM
from .servers import GatewayProcess, start_gateway
from .test_completions import assert_envelope, auth
from .test_protocol import multipart

JSON = b"application/json"
FORM = b"application/x-www-form-urlencoded"
URL = "/api/v2/completions"
MIB = 1024 * 1024
HYPOTHESIS = settings(deadline=None, max_examples=250,
                      suppress_health_check=[HealthCheck.too_slow])


def refused(raw: bytes, limits: BodyLimits = LIMITS) -> str:
    with pytest.raises(JSONError) as e:
        json_value(raw, limits)
    return e.value.reason


def body(extra: str) -> bytes:
    return ('{"model": "m", "prompt": "p", ' + extra + "}").encode()


# -- JSON: what msgspec refuses, named -------------------------------------------------

@pytest.mark.parametrize(("raw", "says"), [
    (b'\xef\xbb\xbf{"model": "m"}', "byte order mark (BOM)"),
    (b'\xff\xfe{\x00}\x00', "UTF-16 byte order mark (BOM)"),
    (b'{"prompt": "\xff"}', "not valid UTF-8"),
    (b'{"prompt": "\xed\xa0\x80"}', "not valid UTF-8"),  # a surrogate's bytes (CESU-8)
    (b'{"prompt": "\xc0\xaf"}', "not valid UTF-8"),  # an overlong '/'
    (b'{"prompt": "\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"prompt": "\\uD800x"}', "lone UTF-16 surrogate"),
    (b'{"prompt": "\\udfff"}', "lone UTF-16 surrogate"),
    (b'{"prompt": "\\ud800\\u0041"}', "lone UTF-16 surrogate"),
    (b'{"\\udc00": 1}', "lone UTF-16 surrogate"),
    (b'{"x": NaN}', "NaN and Infinity"),
    (b'{"x": Infinity}', "NaN and Infinity"),
    (b'{"x": -Infinity}', "NaN and Infinity"),
    (b'{"x": [1, NaN]}', "NaN and Infinity"),
])
def test_json_that_is_not_json_is_named(raw: bytes, says: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_request(JSON, raw)
    assert e.value.code == "invalid_json" and e.value.http_status == 400
    assert says in e.value.message


@pytest.mark.parametrize("number", [
    "1e999", "-1e999", "1e400", str(UINT_MAX + 1), str(INT_MIN - 1), "9" * 400,
    "9" * 5000, "-" + "9" * 30,
])
def test_numbers_no_integer_type_or_float_holds_are_refused(number: str) -> None:
    assert "number out of range" in refused(body(f'"seed": {number}'))
    assert "number out of range" in refused(body(f'"x": [1, {{"y": {number}}}]'))


@pytest.mark.parametrize("number", [str(UINT_MAX), str(INT_MIN), "1e308", "-0.0", "1e-400"])
def test_numbers_in_range_are_kept(number: str) -> None:
    assert json_value(body(f'"x": {number}'))["x"] == json.loads(number)


def nested(levels: int) -> bytes:
    return body('"x": ' + "[" * levels + "1" + "]" * levels)


def test_containers_are_counted_before_the_body_is_decoded() -> None:
    """A 4 MiB body of empty arrays took 2 s to decode and collect, holding the loop:
    more than ``max_json_containers`` is refused before msgspec sees it."""
    many = b"[" + b",".join([b"[]"] * 1_400_000) + b"]"
    assert "more than 20000 arrays and objects" in refused(many)
    assert "PARAGATE_MAX_JSON_CONTAINERS" in refused(many)
    assert "more than 20000 arrays" in refused(nested(100_000))  # deep is also many
    limits = BodyLimits(max_json_containers=10)
    assert "more than 10 arrays" in refused(body('"x": [' + "[1]," * 9 + "1]"), limits)
    assert json_value(body('"x": [' + "[1]," * 8 + "1]"), limits)  # 10 with the body's
    # brackets in strings are not containers, escaped quotes included
    assert json_value(body('"x": "' + '[{\\\"' * 10_000 + '"'), limits)


def test_keys_are_counted_before_the_body_is_decoded() -> None:
    """A dict of 400,000 keys took 200 ms to build: more than ``max_json_keys`` keys,
    all objects together, are refused before msgspec sees them."""
    many = b"{" + b",".join(b'"%x":0' % i for i in range(100_001)) + b"}"
    assert "more than 100000 object keys" in refused(many)
    assert "PARAGATE_MAX_JSON_KEYS" in refused(many)
    assert json_value(many[:many.rindex(b",")] + b"}")  # 100,000
    limits = BodyLimits(max_json_keys=10)
    assert "more than 10 object keys" in refused(body('"x": [' + '{"a":1},' * 8 + "1]"),
                                                 limits)
    assert json_value(body('"x": [' + '{"a":1},' * 6 + '{"a:b": "c:d"}]'), limits)
    # many containers and keys, with strings full of marks between them: certainly over
    # one of the two limits, before the strings are even cut out
    limits = BodyLimits(max_json_containers=5, max_json_keys=5)
    says = refused(b"[" + b'"[{:",[],' * 20 + b"0]", limits)
    assert "more than 5 arrays and objects" in says and "or more than 5 object keys" in says


MARKED_TEXT = st.text(st.sampled_from('"\\[]{}:,/ aé'), max_size=8)
MARKED_VALUES = st.recursive(
    st.none() | st.integers(0, 9) | MARKED_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(MARKED_TEXT, inner,
                                                                max_size=4),
    max_leaves=24)


def containers_and_keys(value: Any) -> tuple[int, int]:
    if isinstance(value, list):
        counts = [containers_and_keys(v) for v in value]
        return 1 + sum(c for c, _ in counts), sum(k for _, k in counts)
    if isinstance(value, dict):
        counts = [containers_and_keys(v) for v in value.values()]
        return 1 + sum(c for c, _ in counts), len(value) + sum(k for _, k in counts)
    return 0, 0


@HYPOTHESIS
@given(MARKED_VALUES, st.booleans())
def test_marks_outside_strings_are_counted_exactly(value: Any, ascii: bool) -> None:
    """``_outside`` keeps exactly the '[', '{' and ':' of the body's arrays, objects and
    keys, whatever the strings hold (quotes and backslashes escaped, runs of them), and
    gives up (None) only when there are more than it is asked for."""
    raw = json.dumps(value, ensure_ascii=ascii).encode()
    containers, keys = containers_and_keys(value)
    bare = _outside(raw, 10**9)
    assert bare is not None
    assert (bare.count(b"[") + bare.count(b"{"), bare.count(b":")) == (containers, keys)
    for most in range(containers + keys + 2):
        got = _outside(raw, most)
        assert got == bare or (got is None and containers + keys > most)


def test_depth_is_limited_and_deep_bodies_do_not_recurse() -> None:
    # "x" is in the body's object: a value inside the top object and n arrays is n + 1 deep
    assert json_value(nested(127))["x"]
    assert "nested more than 128 levels deep" in refused(nested(128))
    assert "PARAGATE_MAX_JSON_DEPTH" in refused(nested(128))
    for levels in (1000, 15_000):  # msgspec's own guard, then ours: no RecursionError
        assert "nested more than 128" in refused(nested(levels))
        assert "nested more than 128" in refused(body('"x": ' + '{"a":' * levels + "1"
                                                      + "}" * levels))
    assert "nested more than 4" in refused(nested(4), BodyLimits(max_json_depth=4))
    assert json_value(nested(3), BodyLimits(max_json_depth=4))
    # brackets in strings are not levels
    assert json_value(body('"x": "' + "[" * 10_000 + '"'))


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "prompt": "p", "model": "other"}',
    b'{"model": "m", "x": {"a": 1, "b": {"c": 2, "c": 2}}}',
    b'{"model": "m", "x": [{"a": 1}, {"a": 1, "a": 1}]}',
    b'{"model": "m", "m\\u006fdel": "other"}',  # the same key, escaped
    # a colon written as an escape in each value: the colon counts alone balance
    b'{"model": "m", "x": {"a": "\\u003a", "a": "\\u003A"}}',
    b'{"model": "m", "x": {"a": "\\\\u003a", "a": "\\u003a"}}',
])
def test_duplicate_keys_are_refused_anywhere(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_request(JSON, raw)
    assert e.value.code == "invalid_json"
    assert "twice in one object" in e.value.message
    assert "the key" in e.value.message


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "prompt": "a:b::c", "x": {"a": "\\u003a", "b": "\\u003a:"}}',
    b'{"model": "m", "prompt": "\\\\u003a:", "x": {"a:": ":", "b": "\\\\u003A"}}',
    b'{"model": "m", "prompt": "p", "x": [{"a": 1}, {"a": 1}], "y": {"a": {"a": 1}}}',
])
def test_no_duplicate_no_refusal(raw: bytes) -> None:
    assert json_value(raw) == json.loads(raw)


def test_a_duplicate_in_a_large_body_is_refused_unnamed() -> None:
    raw = body('"x": "' + "y:" * 200_000 + '", "x": 1')
    assert "has a key twice" in refused(raw)


# -- no echo of megabytes ----------------------------------------------------------------

def test_excerpt() -> None:
    assert excerpt("abc") == '"abc"'
    assert excerpt("x" * 3_000_000) == '"' + "x" * 60 + '…"'
    assert len(excerpt(list(range(1_000_000)))) == 61
    assert excerpt(12) == "12"


HUGE = "x" * 3 * MIB


@pytest.mark.parametrize(("parse", "fields"), [
    (parse_request, {"prompt": "p", "max_tokens": HUGE}),
    (parse_request, {"prompt": "p", "logit_bias": {HUGE: 1}}),
    (parse_request, {"prompt": "p", "logit_bias": {"5": HUGE}}),
    (parse_request, {"prompt": "p", "n": [HUGE]}),
    (parse_request, {"prompt": "p", "temperature": {"k": HUGE}}),
    (parse_chat, {"messages": [{"role": [HUGE], "content": "c"}]}),
    (parse_chat, {"messages": [{"role": "user", "content": "c"}], "tool_choice": HUGE}),
    (parse_chat, {"messages": [{"role": "user", "content": "c"}],
                  "response_format": {"type": HUGE}}),
    (parse_chat, {"messages": [{"role": "user", "content": "c"}], "tools": [
        {"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": HUGE}}}),
])
def test_errors_never_echo_megabytes(parse: Any, fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(JSON, json.dumps({"model": "m", **fields}).encode())
    assert len(e.value.render()) < 1024


@pytest.mark.parametrize("pairs", [
    [("model", "m"), ("prompt", "p"), ("max_tokens", HUGE[:MIB - 1])],
    [("model", "m"), ("prompt", "p"), ("temperature", HUGE[:MIB - 1])],
    [("model", "m"), ("prompt", "p"), ("n", "1"), ("n", "2"), (HUGE[:MIB - 1], "1"),
     (HUGE[:MIB - 1], "2")],
    [("model", "m"), ("prompt", "p"), ("x" * 5000, "1"), ("x" * 5000, "2")],
])
def test_form_errors_never_echo_megabytes(pairs: list[tuple[str, str]]) -> None:
    for ctype, raw in ((FORM, urlencode(pairs).encode()), multipart(pairs)):
        with pytest.raises(InvalidRequest) as e:
            parse_request(ctype, raw)
        assert len(e.value.render()) < 1024


# -- forms: limits and strictness ------------------------------------------------------

def fields_form(n: int) -> list[tuple[str, str]]:
    return [("model", "m"), ("prompt", "p")] + [(f"f{i}", "v") for i in range(n - 2)]


def test_form_field_limit() -> None:
    limits = BodyLimits(max_form_fields=10)
    assert len(urlencoded_pairs(urlencode(fields_form(10)).encode(), limits)) == 10
    assert len(multipart_pairs(*multipart(fields_form(10)), limits)) == 10
    for ctype, raw in ((FORM, urlencode(fields_form(11)).encode()),
                       multipart(fields_form(11))):
        with pytest.raises(RequestTooLarge) as e:
            parse_request(ctype, raw, limits)
        assert e.value.http_status == 413
        assert "more than 10 fields" in e.value.message
        assert "PARAGATE_MAX_FORM_FIELDS" in e.value.message
    # empty fields are not fields; a million '&' is refused cheaply
    assert len(urlencoded_pairs(b"&&a=1&&&b=2&", limits)) == 2
    with pytest.raises(RequestTooLarge):
        urlencoded_pairs(b"&" * 1_000_000 + b"a=1", limits)


def test_form_part_limit() -> None:
    limits = BodyLimits(max_form_part_bytes=100)
    ok = [("model", "m"), ("prompt", "p" * 100)]
    assert parse_request(FORM, urlencode(ok).encode(), limits).body["prompt"] == "p" * 100
    assert parse_request(*multipart(ok), limits).body["prompt"] == "p" * 100
    # the limit is on the value unescaped: 100 'é' are 200 bytes, 600 escaped
    for pairs in ([("model", "m"), ("prompt", "p" * 101)], [("model", "m"), ("p" * 101, "1")],
                  [("model", "m"), ("prompt", "é" * 51)]):
        for ctype, raw in ((FORM, urlencode(pairs).encode()), multipart(pairs)):
            with pytest.raises(RequestTooLarge) as e:
                parse_request(ctype, raw, limits)
            assert "larger than 100 bytes" in e.value.message
            assert "PARAGATE_MAX_FORM_PART_BYTES" in e.value.message


@pytest.mark.parametrize(("raw", "says"), [
    (b"model=m&prompt=%ff", "is not valid UTF-8"),
    (b"model=m&%ff=1", "field's name is not valid UTF-8"),
    (b"model=m&prompt=\xff", "form body is not valid UTF-8"),
    (b"model=m&prompt=p&" + b"x=" + b"%zz" * 5000, "not %-escapes"),
])
def test_urlencoded_strictness(raw: bytes, says: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_request(FORM, raw)
    assert says in e.value.message and e.value.http_status == 400


def test_urlencoded_reads_what_parse_qsl_read() -> None:
    raw = b"model=m&prompt=100%25+sure%2C+100% sure&stop=a%0D%0Ab&suffix=%3D%3d=&x"
    body = parse_request(FORM, raw).body
    assert body["prompt"] == "100% sure, 100% sure"
    assert body["stop"] == "a\r\nb" and body["suffix"] == "==="
    assert body["x"] == ""


@pytest.mark.parametrize(("value", "says"), [
    ("nan", "finite number"), ("inf", "finite number"), ("-Infinity", "finite number"),
    ("1e999", "finite number"),
])
def test_form_numbers_are_finite(value: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_request(FORM, urlencode({"model": "m", "prompt": "p",
                                       "presence_penalty": value}).encode())
    assert says in e.value.message


@pytest.mark.parametrize(("pairs", "says"), [
    ({"seed": str(UINT_MAX + 1)}, "out of range"),
    ({"logit_bias": '{"5": 1, "5": 2}'}, "twice in one object"),
    ({"unknown": '{"a": 1, "a": 2}'}, "twice in one object"),
    ({"prompt": "[1, 1e999]"}, "number out of range"),
    ({"unknown": "[" * 200 + "]" * 200}, "nested more than 128"),
])
def test_form_json_is_held_to_the_json_rules(pairs: dict[str, str], says: str) -> None:
    fields = {"model": "m", "prompt": "p", **pairs}
    for ctype, raw in ((FORM, urlencode(fields).encode()), multipart(list(fields.items()))):
        with pytest.raises(InvalidRequest) as e:
            parse_request(ctype, raw)
        assert says in e.value.message


def part(headers: str, value: bytes = b"v") -> bytes:
    return f"--B\r\n{headers}\r\n\r\n".encode() + value + b"\r\n"


MP = b"multipart/form-data; boundary=B"


@pytest.mark.parametrize(("ctype", "raw", "says"), [
    (b"multipart/form-data", part('Content-Disposition: form-data; name="model"'),
     "names no boundary"),
    (MP, part('Content-Disposition: form-data; name="model"'), "before its closing boundary"),
    (MP, part("Content-Disposition: form-data") + b"--B--\r\n", "no field name"),
    (MP, part("Content-Type: text/plain") + b"--B--\r\n", "no field name"),
    (MP, part('Content-Disposition: form-data; name="p"\r\nContent-Transfer-Encoding: x-zip')
     + b"--B--\r\n", "unknown Content-Transfer-Encoding"),
    (MP, part('Content-Disposition: form-data; name="p"', b"\xff") + b"--B--\r\n",
     "not valid UTF-8"),
    (MP, b"garbage", "malformed"),
    (MP, part('Content-Disposition: form-data; name="p"\r\n' + "X-A: b\r\n" * 20)
     + b"--B--\r\n", "malformed"),
    (b"multipart/form-data; boundary=" + b"b" * 300, b"--", "malformed"),
])
def test_multipart_malformed_is_named(ctype: bytes, raw: bytes, says: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_request(ctype, raw)
    assert e.value.code == "invalid_body" and says in e.value.message


def test_multipart_reads_what_the_email_parser_read() -> None:
    raw = (part('Content-Disposition: form-data; name="model"', b"m")
           + part('content-disposition: form-data; name="prompt"\r\n'
                  "Content-Transfer-Encoding: base64", b"aMOpbGxv")
           + part('Content-Disposition: form-data; name="suffix"; filename="a.txt"\r\n'
                  "Content-Type: text/plain", b"line\r\n--Bnot a boundary")
           + part('Content-Disposition: form-data; name="hé"', b"1")
           + b"--B--\r\nepilogue")
    body = parse_request(MP, raw).body
    assert body == {"model": "m", "prompt": "héllo", "suffix": "line\r\n--Bnot a boundary",
                    "hé": 1}


# -- properties ---------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(INT_MIN, UINT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=24)


def written(value: Any, rnd: random.Random) -> str:
    """``value`` as JSON text the way a client might write it: random whitespace, any
    character escaped now and then (a colon too), objects as lists of pairs."""
    def space() -> str:
        return rnd.choice(["", "", " ", "\n  ", "\t"])

    def text(s: str) -> str:
        out = []
        for ch in s:
            if rnd.random() < 0.3 or ch in "\"\\" or ch < " ":
                if ord(ch) > 0xFFFF:
                    high, low = divmod(ord(ch) - 0x10000, 0x400)
                    out.append(f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04X}")
                else:
                    out.append(f"\\u{ord(ch):04x}" if rnd.random() < 0.5 else
                               f"\\u{ord(ch):04X}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    if isinstance(value, Pairs):
        return "{" + ",".join(space() + text(k) + space() + ":" + space() + written(v, rnd)
                              for k, v in value) + space() + "}"
    if isinstance(value, dict):
        return written(Pairs(value.items()), rnd)
    if isinstance(value, list):
        return "[" + ",".join(space() + written(v, rnd) for v in value) + space() + "]"
    if isinstance(value, str):
        return text(value)
    return json.dumps(value)


class Pairs(list[tuple[str, Any]]):
    """An object as the pairs it is written with (a key may come twice)."""


def with_duplicate(value: Any, rnd: random.Random, extra: Any) -> tuple[Any, bool]:
    """``value`` with one of its objects given one of its keys again, if it has one."""
    objects: list[Pairs] = []

    def pairs(v: Any) -> Any:
        if isinstance(v, dict):
            out = Pairs((k, pairs(x)) for k, x in v.items())
            objects.append(out)
            return out
        if isinstance(v, list):
            return [pairs(x) for x in v]
        return v

    converted = pairs(value)
    candidates = [o for o in objects if o]
    if not candidates:
        return converted, False
    target = rnd.choice(candidates)
    key = rnd.choice(target)[0]
    target.insert(rnd.randrange(len(target) + 1), (key, extra))
    return converted, True


@HYPOTHESIS
@given(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=6), st.randoms())
def test_json_as_written_decodes_to_the_value(value: dict[str, Any], rnd: random.Random,
                                              ) -> None:
    raw = written(value, rnd).encode()
    assert json_value(raw) == json.loads(raw) == value


@HYPOTHESIS
@given(st.dictionaries(st.text(max_size=4), JSON_VALUES, min_size=1, max_size=6),
       JSON_VALUES, st.randoms())
def test_duplicate_keys_are_always_refused(value: dict[str, Any], extra: Any,
                                           rnd: random.Random) -> None:
    converted, duplicated = with_duplicate(value, rnd, extra)
    assert duplicated
    with pytest.raises(JSONError) as e:
        json_value(written(converted, rnd).encode())
    assert "twice in one object" in e.value.reason


FIELD_NAMES = st.text(st.characters(codec="utf-8", exclude_characters='"\\\r\n%'),
                      max_size=10)
FIELD_VALUES = st.text(st.characters(codec="utf-8"), max_size=30)


@HYPOTHESIS
@given(st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=12))
def test_forms_decode_to_their_fields(pairs: list[tuple[str, str]]) -> None:
    assert urlencoded_pairs(urlencode(pairs).encode()) == pairs
    boundary = "b0undary-7f3a9c"
    assume = [(k, v) for k, v in pairs if boundary not in v]
    assert multipart_pairs(*multipart(assume, boundary)) == assume


CONTENT_TYPES = [JSON, FORM, b"multipart/form-data; boundary=XyZ", b"text/plain", None]


def mutated(data: bytes, rnd: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        at = rnd.randrange(len(out) + 1)
        kind = rnd.random()
        if kind < 0.4 and at < len(out):
            out[at] = rnd.randrange(256)
        elif kind < 0.7:
            out[at:at] = rnd.choice([b"\xff", b'"', b"\\u", b"\r\n", b"--XyZ", b"{", b"[",
                                     b"=", b"&", b"%", b":", b"\x00"])
        else:
            del out[at:at + rnd.randint(1, 8)]
    return bytes(out)


@HYPOTHESIS
@given(st.sampled_from(CONTENT_TYPES), st.binary(max_size=200), st.randoms())
def test_any_bytes_give_a_4xx_or_a_request(ctype: bytes | None, noise: bytes,
                                           rnd: random.Random) -> None:
    fields = [("model", "m"), ("prompt", "p"), ("max_tokens", "3"), ("stop", "x"),
              ("stream_options", '{"include_usage": true}'), ("logit_bias", '{"1": 2}')]
    seeds = [noise, json.dumps(dict(fields)).encode(), urlencode(fields).encode(),
             multipart(fields)[1]]
    for raw in (noise, mutated(rnd.choice(seeds), rnd)):
        for parse in (parse_request, parse_chat):
            try:
                parse(ctype, raw)
            except GatewayError as exc:
                assert 400 <= exc.http_status < 500


# -- in-process: the endpoints, the admin API, the loop ---------------------------------

@pytest.fixture
async def big(store: Store, keys: Keys, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway with the default 4 MiB body limit (the tests' default is 64 KiB)."""
    gw: Gateway = build_gateway(store, tmp_path, max_body_bytes=4 * MIB)
    await gw.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=App(gw)),
                                 base_url="http://gateway", timeout=60) as c:
        yield c
    await gw.stop()


async def test_a_megabyte_string_is_not_sent_back(big: httpx.AsyncClient, keys: Keys,
                                                  fake: FakeVLLM) -> None:
    r = await big.post(URL, headers=auth(keys.full),
                       json={"model": "alfred-4.2", "prompt": "p", "max_tokens": HUGE})
    assert_envelope(r, 400, "invalid_type", "max_tokens")
    assert len(r.content) < 1024
    r = await big.post(URL, headers={**auth(keys.full), "content-type": FORM.decode()},
                       content=urlencode({"model": "alfred-4.2", "prompt": "p",
                                          "n": HUGE[:MIB - 10]}))
    assert r.status_code == 400 and len(r.content) < 1024
    assert fake.requests == []


@pytest.mark.parametrize(("raw", "says"), [
    (b'\xef\xbb\xbf{"name": "acme"}', "BOM"),
    (b'{"name": "acme", "name": "evil"}', 'the key "name" twice'),
    (b'{"name": "acme", "rate_limits": {"rpm": 1, "rpm": 2}}', 'the key "rpm" twice'),
    (b'{"name": "acme", "rate_limits": {"rpm": 1e999}}', "number out of range"),
    (b'{"name": "acme", "rate_limits": {"rpm": 18446744073709551616}}', "out of range"),
    (b'{"name": "\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"name": "acme", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested"),
    (b'{"name": "acme", "x": [' + b"[]," * 20_000 + b"[]]}", "more than 20000 arrays"),
    (b'{"name": NaN}', "NaN"),
    # in uint64 but not int64: the store's integers are BIGINT (a model's companies was a 500)
    (b'{"name": "acme", "rate_limits": {"rpm": 9223372036854775808}}', "signed 64-bit"),
])
async def test_the_admin_api_holds_bodies_to_the_same_rules(
        client: httpx.AsyncClient, keys: Keys, raw: bytes, says: str) -> None:
    r = await client.post("/api/v2/companies", headers={
        **auth(keys.admin), "content-type": "application/json"}, content=raw)
    err = assert_envelope(r, 400, "invalid_json")
    assert says in err["message"]


async def test_an_id_beyond_int64_is_a_400_not_a_500(client: httpx.AsyncClient,
                                                     keys: Keys) -> None:
    r = await client.post("/api/v2/models", headers=auth(keys.admin), json={
        "name": "mm", "upstream_url": "http://127.0.0.1:9/v1", "companies": [2**64 - 1]})
    assert "signed 64-bit" in assert_envelope(r, 400, "invalid_json")["message"]


async def test_the_admin_api_never_echoes_megabytes(big: httpx.AsyncClient,
                                                    keys: Keys) -> None:
    for bad in ({"name": "acme", "allow_priority": HUGE}, {"email": "a@b.c", "role": HUGE}):
        path = "/api/v2/companies" if "name" in bad else "/api/v2/users"
        r = await big.post(path, headers=auth(keys.admin), json=bad)
        assert r.status_code == 400 and len(r.content) < 1024, r.text[:300]


async def test_a_chunked_body_that_never_ends_is_413(client: httpx.AsyncClient,
                                                     keys: Keys, fake: FakeVLLM) -> None:
    sent = 0

    async def forever() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"model": "alfred-4.2", "prompt": "'
        while True:
            sent += 4096
            yield b"x" * 4096

    r = await client.post(URL, content=forever(), headers={
        **auth(keys.full), "content-type": "application/json"})
    err = assert_envelope(r, 413, "request_too_large")
    assert "PARAGATE_MAX_BODY_BYTES" in err["message"]
    assert r.headers["connection"] == "close"
    assert sent <= 64 * 1024 + 4096  # read no further than the limit
    assert fake.requests == []


def worst_bodies() -> Iterator[tuple[str, bytes, bytes, int]]:
    """(name, content type, body, status) of the worst bodies the 4 MiB limit lets a key
    send, each of them as large as it may be."""
    def parts(fields: list[tuple[str, str]]) -> bytes:
        return multipart(fields, "B")[1]
    head = [("model", "nope"), ("prompt", "p")]  # an unknown model: parsed, never sent
    tiny = parts([("f", "x")]).removesuffix(b"--B--\r\n")
    yield ("multipart, tiny parts", MP, tiny * (4 * MIB // len(tiny)) + b"--B--\r\n", 413)
    per = (4 * MIB - 30_000) // 254
    yield ("multipart, 256 parts", MP, parts(head + [(f"f{i}", "x" * per) for i in range(254)]),
           404)
    yield ("multipart, 1 MiB parts", MP, parts(head + [(f"f{i}", "[" + "1," * (MIB // 2 - 8)
                                                        + "1]") for i in range(3)]), 404)
    pairs = head + [(f"f{i}", "é" * (per // 6)) for i in range(254)]
    yield "urlencoded, 256 fields", FORM, urlencode(pairs).encode(), 404
    yield "urlencoded, tiny fields", FORM, b"f=1&" * (MIB - 1), 413


@pytest.mark.parametrize(("name", "ctype", "raw", "status"),
                         [pytest.param(*b, id=b[0]) for b in worst_bodies()])
async def test_the_worst_form_bodies_never_hold_the_loop(
        big: httpx.AsyncClient, keys: Keys, name: str, ctype: bytes, raw: bytes,
        status: int) -> None:
    """/health answers within 1 s while the worst body the limits allow is parsed (the
    email parser used before held the loop for 10 s on the first of these)."""
    assert len(raw) <= 4 * MIB
    done = asyncio.Event()
    gaps: list[float] = []

    async def probe() -> None:  # the longest wait between two answers of /health
        last = time.perf_counter()
        while not done.is_set():
            r = await big.get("/health")
            assert r.status_code == 200
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            await asyncio.sleep(0.005)

    prober = asyncio.create_task(probe())
    await asyncio.sleep(0.05)
    r = await big.post(URL, headers={**auth(keys.full), "content-type": ctype.decode()},
                       content=raw)
    done.set()
    await prober
    assert max(gaps) < 1.0, f"/health waited {max(gaps):.2f} s"
    assert r.status_code == status, r.text[:300]


# -- a real server: a Content-Length that lies ------------------------------------------

async def exchange(url: str, data: bytes, *, close_write: bool = False,
                   wait: float = 10.0) -> tuple[bytes, bool]:
    """What the server answers to ``data`` on a fresh connection within ``wait`` seconds,
    and whether it closed the connection then."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    if close_write:
        writer.write_eof()
    got, closed = b"", False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536),
                                           max(deadline - loop.time(), 0.01))
            if not chunk:
                closed = True
                break
            got += chunk
    except (TimeoutError, ConnectionError):
        closed = True
    finally:
        writer.close()
    return got, closed


@pytest.fixture
async def served(tmp_path: Path, fake: FakeVLLM) -> AsyncIterator[tuple[GatewayProcess, Keys]]:
    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    store.migrate()
    keys = seed(store, fake)
    gateway = await asyncio.to_thread(start_gateway, tmp_path, str(store.url),
                                      PARAGATE_MAX_BODY_BYTES=str(MIB))
    yield gateway, keys
    await asyncio.to_thread(gateway.stop)
    store.close()


async def test_a_content_length_that_lies(served: tuple[GatewayProcess, Keys]) -> None:
    """More bytes than it says are a malformed next request: a 400 or a close. Fewer,
    and the client closes: the connection is closed, nothing is answered (nobody to
    answer). A Content-Length that is not one number: 400. Never a 5xx, never a hang.
    (Fewer, and the client waits: the server's body timeout, tests/test_transport.py.)"""
    gateway, keys = served
    data = json.dumps({"model": "alfred-4.2", "prompt": "hi", "max_tokens": 2}).encode()
    head = (f"POST {URL} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {keys.full}\r\n"
            "Content-Type: application/json\r\n")

    def sent(length: str, extra: bytes = b"") -> bytes:
        return (head + f"Content-Length: {length}\r\n\r\n").encode() + data + extra

    got, closed = await exchange(gateway.url, sent(str(len(data))), wait=2)
    assert got.startswith(b"HTTP/1.1 200 ")  # the same request, told the truth
    for request in (sent(str(len(data) - 5)), sent(str(len(data)), b"garbage\r\n\r\n"),
                    sent("abc"), sent("-5"), sent(f"{len(data)}, {len(data)}"),
                    sent("9" * 30)):
        got, closed = await exchange(gateway.url, request)
        assert closed and (got == b"" or got.startswith(b"HTTP/1.1 4")), (request, got)
        assert b"HTTP/1.1 5" not in got
    got, closed = await exchange(gateway.url, sent(str(len(data) + 50)), close_write=True)
    assert closed and (got == b"" or got.startswith(b"HTTP/1.1 4")), got[:200]


async def test_a_chunked_body_that_never_ends_is_cut(
        served: tuple[GatewayProcess, Keys]) -> None:
    """413 once past the limit, and the connection closed: no server reads on, throwing
    away a body that never ends."""
    gateway, keys = served
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {URL} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {keys.full}\r\n"
                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                 .encode())
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)

    async def pump() -> None:  # 12.5 MiB offered against a 1 MiB limit, unless cut
        try:
            for _ in range(200):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass

    pumping = asyncio.create_task(pump())
    answer = b""
    try:  # until the server closes (a reset, as a close with unread bytes is)
        while piece := await asyncio.wait_for(reader.read(65536), 15):
            answer += piece
    except ConnectionError:
        pass
    finally:
        pumping.cancel()
        writer.close()
    # The server closes rather than reading on (the wait above would time out). Its
    # 413 comes first, but closing with the client's bytes unread sends a reset, which
    # may reach the client before it has read the 413: then nothing is left to check.
    # The reset may also come between the 413's head and its body.
    if answer:
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"connection: close" in answer.lower()
        rest = answer.partition(b"\r\n\r\n")[2]
        if b"{" in rest:
            assert b'"code":"request_too_large"' in rest, answer
