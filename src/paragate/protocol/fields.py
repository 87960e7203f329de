"""What every endpoint's request shares: the field table's entries, decoding the three
body types, checking fields by kind, and the part of a request the shared request path
reads (``ModelRequest``).

Each endpoint's module (``completions``, ``chat``, ``embeddings``, ``tokenize``) lists
its fields once; validation, form coercion and the OpenAPI schema are read off that list.
Fields not listed are passed to vLLM untouched: vLLM answers for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from ..errors import InvalidRequest, PermissionDenied, UnsupportedMediaType
from .bodies import (
    INT_MIN,
    LIMITS,
    UINT_MAX,
    BodyLimits,
    JSONError,
    excerpt,
    form_pairs,
    json_body,
    json_value,
)

__all__ = [
    "KIND_WORDS",
    "LIMITS",
    "MAX_STOP",
    "BodyLimits",
    "Field",
    "ModelRequest",
    "check_fields",
    "check_prompt",
    "decode_body",
    "estimate_prompt_tokens",
    "excerpt",
    "extra",
    "field",
    "is_int",
    "prompt_count",
    "type_error",
]

MAX_STOP = 4


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    # string | integer | number | boolean | prompt | stop | logit_bias | object | array
    # | json (any JSON value; a form field holds it as JSON text, or as plain text for a
    # string: tool_choice=auto)
    kind: str
    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    seed: bool = True  # part of the seed's CompletionsRequest schema
    checked: bool = True  # False: vLLM's extension, coerced from forms but not checked here
    enum: tuple[str, ...] = ()  # a string's allowed values, when it has a fixed set


def field(name: str, kind: str, description: str, **kw: Any) -> Field:
    return Field(name, kind, description, **kw)


def extra(name: str, kind: str, description: str) -> Field:
    """vLLM's own field: passed through, typed in forms and the schema, checked by vLLM."""
    return Field(name, kind, description, seed=False, checked=False)


KIND_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "a JSON object",
    "array": "a JSON array",
}


@dataclass(slots=True)
class ModelRequest:
    """A checked request to a model. ``body`` holds every field the client sent,
    unknown ones too; each endpoint's subclass knows its own fields' meaning."""

    body: dict[str, Any]
    raw: bytes | None  # the JSON body as received, forwarded as is when nothing changes
    model: str
    stream: bool = False
    include_usage: bool = False  # the client asked for the final usage chunk
    running_usage: bool = False  # ... and for usage on every chunk (continuous_usage_stats)
    n: int = 1

    def check_caps(self, *, max_prompts: int, max_n: int, allow_priority: bool) -> None:
        """What one request may carry whatever the limits (the model's caps)."""
        check_priority(self.body, allow_priority)

    def upstream_body(self, upstream_model: str, *, max_logprobs: int,
                      default_max_tokens: int | None, max_tokens_limit: int | None) -> bytes:
        """The body for vLLM: the served model name, the model's limits applied."""
        return self.encode(upstream_model, upstream_model != self.model)

    def reservation(self, *, reserve_max_tokens: int, max_request_tokens: int
                    ) -> tuple[int, int]:
        """(tokens, prompt): the most tokens the request may use, and its prompt's
        estimate. Nothing by default (a request that generates nothing)."""
        return 0, 0

    def affinity_fields(self) -> Mapping[str, Any]:
        """What a model's affinity reads (``balancer.affinity_key``): ``prompt`` (or
        what stands for it: its prefix is what vLLM's prefix cache can reuse) and
        ``user``."""
        return self.body

    def encode(self, upstream_model: str, changed: bool) -> bytes:
        """The body as sent upstream. A stream asks for usage on every chunk, so that a
        stream cut short is still counted; the relay removes what the client did not
        ask for."""
        body = self.body
        if self.stream and not (self.include_usage and self.running_usage):
            options = body.get("stream_options") or {}
            body["stream_options"] = {**options, "include_usage": True,
                                      "continuous_usage_stats": True}
            changed = True
        if not changed and self.raw is not None:
            return self.raw
        body["model"] = upstream_model
        return msgspec.json.encode(body)


def check_priority(body: Mapping[str, Any], allow_priority: bool) -> None:
    """vLLM's scheduling field only for a company allowed to set it."""
    priority = body.get("priority")
    if priority is not None and not is_int(priority):  # false == 0 passed before
        raise type_error("priority", "integer", priority)
    if priority is not None and priority != 0 and not allow_priority:
        raise PermissionDenied("'priority' changes how vLLM schedules everyone's "
                               "requests; this key's company may not set it.",
                               param="priority", code="priority_not_allowed")


def check_max(body: Mapping[str, Any], names: Sequence[str], cap: int, model: str) -> None:
    """Each of ``names`` given is at most ``cap`` (a model's limit)."""
    for name in names:
        value = body.get(name)
        if value is not None and value > cap:
            raise InvalidRequest(f"'{name}' must be at most {cap} for model '{model}', "
                                 f"got {excerpt(value)}.", param=name)


def prompt_count(prompt: Any) -> int:
    """How many prompts: one string or one list of token ids, else the list's length."""
    if isinstance(prompt, str) or (prompt and not isinstance(prompt[0], str | list)):
        return 1
    return len(prompt)


def estimate_prompt_tokens(prompt: Any) -> int:
    """The prompt's tokens, never fewer than vLLM counts for text: a string's UTF-8
    bytes plus two (a tokenizer's start token, and the word-start marker SentencePiece
    puts in front of the text; every other token holds at least a byte), a list of
    token ids its length."""
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8", "surrogatepass")) + 2
    first = prompt[0]
    if isinstance(first, str):
        return sum(len(p.encode("utf-8", "surrogatepass")) + 2 for p in prompt)
    if isinstance(first, list):
        return sum(len(p) for p in prompt)
    return len(prompt)


# -- decoding --------------------------------------------------------------------------

def decode_body(content_type: bytes | None, raw: bytes, fields: Mapping[str, Field],
                *, forms: bool = True, limits: BodyLimits = LIMITS,
                ) -> tuple[dict[str, Any], bytes | None]:
    """A JSON, urlencoded or multipart body as a dict, and the JSON bytes as received
    (None for a form, which is always re-encoded). ``forms=False``: JSON only."""
    media = (content_type or b"application/json").split(b";", 1)[0].strip().lower()
    if media == b"application/json" or media.endswith(b"+json") or (
        # `curl -d '{...}'` without -H sends JSON labelled as a form: accept what it means
        media == b"application/x-www-form-urlencoded"
        and raw.lstrip().removeprefix(b"\xef\xbb\xbf").startswith(b"{")
    ):
        return _decode_json(raw, limits), raw
    if forms and media in (b"application/x-www-form-urlencoded", b"multipart/form-data"):
        return _from_form(form_pairs(content_type or b"", raw, limits), fields, limits), None
    accepted = ("application/json, application/x-www-form-urlencoded or "
                "multipart/form-data") if forms else "application/json"
    raise UnsupportedMediaType(
        f"Unsupported Content-Type '{excerpt(media.decode('latin-1'))[1:-1]}': send "
        f"{accepted}.")


def _decode_json(raw: bytes, limits: BodyLimits) -> dict[str, Any]:
    body = json_body(raw, limits)
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_json")
    return body


def _from_form(pairs: list[tuple[str, str]], fields: Mapping[str, Field],
               limits: BodyLimits) -> dict[str, Any]:
    """Form values are strings: give each field its schema type."""
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    body: dict[str, Any] = {}
    for key, values in grouped.items():
        f = fields.get(key)
        kind = f.kind if f else "any"
        if kind in ("stop", "prompt"):
            if len(values) > 1:
                body[key] = values
            else:
                body[key] = _json_list_or_text(key, values[0], limits)
            continue
        if len(values) > 1:
            raise InvalidRequest(f"Form field {excerpt(key)} was given more than once.",
                                 param=key[:60])
        body[key] = _coerce_text(key, kind, values[0], limits)
    return body


def _form_json(key: str, text: str, limits: BodyLimits) -> Any:
    """A form field's JSON text as its value; ``JSONError`` (syntax) if it is not JSON,
    400 if it is but breaks a rule a JSON body is held to."""
    try:
        return json_value(text.encode(), limits)
    except JSONError as exc:
        if exc.syntax:
            raise
        raise InvalidRequest(f"Form field {excerpt(key)} {exc.reason}.", param=key[:60],
                             code="invalid_json") from None


def _json_list_or_text(key: str, value: str, limits: BodyLimits) -> Any:
    if value.lstrip().startswith("["):
        try:
            decoded = _form_json(key, value, limits)
        except JSONError:
            return value
        if isinstance(decoded, list):
            return decoded
    return value


def _coerce_text(key: str, kind: str, value: str, limits: BodyLimits) -> Any:
    text = value.strip()
    if text == "null" and kind in _NULLABLE:
        return None  # as JSON's null: the field is not set (the schema says nullable)
    try:
        if kind == "integer":
            number = int(text)
            if not INT_MIN <= number <= UINT_MAX:
                raise InvalidRequest(f"'{key}' is out of range: an integer must fit in 64 "
                                     "bits.", param=key)
            return number
        if kind == "number":
            real = float(text)
            if not math.isfinite(real):  # float() reads nan, inf and 1e999 (inf)
                raise ValueError
            return real
        if kind == "boolean":
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind in ("object", "logit_bias", "array"):
            return _form_json(key, text, limits)
        if kind in ("json", "any"):  # JSON if it parses, else the text (a string)
            try:
                return _form_json(key, text, limits)
            except JSONError:
                return value
    except (ValueError, JSONError):
        word = "a finite number" if kind == "number" else KIND_WORDS.get(kind, "JSON")
        raise InvalidRequest(f"'{key}' must be {word}, got {excerpt(value)}.", param=key,
                             code="invalid_type") from None
    return value


# the kinds whose form text "null" can only mean JSON's null (a string's is the word)
_NULLABLE = frozenset({"integer", "number", "boolean", "object", "logit_bias", "array"})


# -- checking --------------------------------------------------------------------------

def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def type_error(name: str, kind: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"'{name}' must be {KIND_WORDS[kind]}, got {excerpt(value)}.",
        param=name, code="invalid_type")


def _check_range(f: Field, value: float) -> None:
    low_ok = f.minimum is None or (
        value > f.minimum if f.exclusive_minimum else value >= f.minimum)
    high_ok = f.maximum is None or value <= f.maximum
    if low_ok and high_ok:
        return
    if f.maximum is None:
        bound = f"at least {f.minimum:g}"
    elif f.exclusive_minimum:
        bound = f"greater than {f.minimum:g} and at most {f.maximum:g}"
    else:
        bound = f"between {f.minimum:g} and {f.maximum:g}"
    raise InvalidRequest(f"'{f.name}' must be {bound}, got {excerpt(value)}.",
                         param=f.name)


# msgspec's conversion is the C-speed check of a long list (a million token ids took a
# tenth of a second with a generator, 50 ms with map and min, 20 ms this way); it is
# strict: a bool is no token id, nor "5".
_TOKEN_IDS = list[Annotated[int, msgspec.Meta(ge=0)]]


def _all(values: list[Any], kind: Any) -> bool:
    try:
        msgspec.convert(values, kind)
    except msgspec.ValidationError:
        return False
    return True


def _token_ids(values: list[Any]) -> bool:
    """A non-empty list of integers >= 0."""
    return bool(values) and _all(values, _TOKEN_IDS)


def check_prompt(prompt: Any, name: str = "prompt") -> None:
    """A string, a non-empty list of strings, of token ids or of lists of token ids."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        first = type(prompt[0])  # each test reads every item: only the one that can hold
        if first is str and _all(prompt, list[str]):
            return
        if first is int and _token_ids(prompt):
            return
        if first is list and all(isinstance(p, list) and _token_ids(p) for p in prompt):
            return
    raise InvalidRequest(
        f"'{name}' must be a string, a non-empty list of strings, a non-empty list of "
        "token ids (integers >= 0) or a non-empty list of such lists.", param=name,
        code="invalid_type")


def _check_stop(stop: Any) -> None:
    if isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("'stop' must be a string or a list of strings.", param="stop",
                             code="invalid_type")
    if len(stop) > MAX_STOP:
        raise InvalidRequest(f"'stop' may hold at most {MAX_STOP} sequences, got {len(stop)}.",
                             param="stop")


def _check_logit_bias(bias: Any) -> None:
    if not isinstance(bias, dict):
        raise type_error("logit_bias", "object", bias)
    for token, value in bias.items():
        digits = token.lstrip("-")
        if not (digits.isascii() and digits.isdigit()):  # '³' is a digit to isdigit()
            raise InvalidRequest(f"'logit_bias' keys must be token ids, got "
                                 f"{excerpt(token)}.", param="logit_bias")
        if not _is_number(value) or not -100 <= value <= 100:
            raise InvalidRequest(
                f"'logit_bias' values must be numbers between -100 and 100, got "
                f"{excerpt(value)} for token {excerpt(token)}.", param="logit_bias")


def required_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise InvalidRequest("'model' is required.", param="model", code="missing_field")
    if not isinstance(model, str):
        raise type_error("model", "string", model)
    return model


_CHECKS: dict[str, Callable[[Any], None]] = {
    "stop": _check_stop,
    "logit_bias": _check_logit_bias,
}


def check_fields(body: Mapping[str, Any], checked: Sequence[Field]) -> None:
    """Check each field of ``checked`` that the body holds (null: not given) by kind,
    and by range where it is ours to check (vLLM's own fields: their type only, so that
    the body vLLM gets is the one the document describes)."""
    for f in checked:
        value = body.get(f.name)
        if value is None:
            continue
        kind = f.kind
        if kind == "integer":
            if not is_int(value):
                raise type_error(f.name, kind, value)
            if f.checked:
                _check_range(f, value)
        elif kind == "number":
            if not _is_number(value):
                raise type_error(f.name, kind, value)
            if f.checked:
                _check_range(f, value)
        elif kind == "boolean":
            if not isinstance(value, bool):
                raise type_error(f.name, kind, value)
        elif kind == "string":
            if not isinstance(value, str):
                raise type_error(f.name, kind, value)
            if f.enum and value not in f.enum:
                raise InvalidRequest(f"'{f.name}' must be one of {', '.join(f.enum)}, got "
                                     f"{excerpt(value)}.", param=f.name)
        elif kind == "object":
            if not isinstance(value, dict):
                raise type_error(f.name, kind, value)
        elif kind == "array":
            if not isinstance(value, list):
                raise type_error(f.name, kind, value)
        elif (check := _CHECKS.get(kind)) is not None:
            check(value)


def checked_fields(fields: Sequence[Field], *skip: str) -> tuple[Field, ...]:
    """The fields ``check_fields`` checks: ours, and vLLM's of a plain JSON kind (their
    type; a fuzzing case found a boolean sent as a number reaching vLLM)."""
    return tuple(f for f in fields if f.name not in skip and (f.checked or f.kind in _TYPED))


_TYPED = frozenset({"integer", "number", "boolean", "string", "object", "array"})


def stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, running_usage) of a body that may stream."""
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is not None and not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.",
                             param="stream_options")
    include_usage = bool(options and options.get("include_usage") is True)
    running = bool(options and options.get("continuous_usage_stats") is True)
    return stream, include_usage, running
