"""The completions request: decoding its three body types, checking every field, and
writing the body sent upstream.

``FIELDS`` is the one description of the request. Validation, form coercion and the
OpenAPI schema (``openapi.py``) are all read off it, so they cannot drift apart. Fields
not in the table are passed to vLLM untouched: vLLM answers for them.
"""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from .errors import InvalidRequest, PermissionDenied, ReservationTooLarge, UnsupportedMediaType

__all__ = ["FIELDS", "CompletionRequest", "Field", "parse_request"]

@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: str  # string | integer | number | boolean | prompt | stop | logit_bias | object
    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    seed: bool = True  # part of the seed's CompletionsRequest schema
    checked: bool = True  # False: vLLM's extension, coerced from forms but not checked here


def _f(name: str, kind: str, description: str, **kw: Any) -> Field:
    return Field(name, kind, description, **kw)


def _extra(name: str, kind: str, description: str) -> Field:
    return Field(name, kind, description, seed=False, checked=False)


FIELDS: tuple[Field, ...] = (
    _f("model", "string", "Model to use, as configured by the administrator."),
    _f("prompt", "prompt", "The prompt: a string, a list of strings, a list of token ids "
       "or a list of lists of token ids."),
    _f("max_tokens", "integer", "Maximum number of tokens to generate.", minimum=0),
    _f("temperature", "number", "Sampling temperature between 0 and 2.", minimum=0, maximum=2),
    _f("top_p", "number", "Nucleus sampling parameter, in (0, 1].", minimum=0, maximum=1,
       exclusive_minimum=True),
    _f("n", "integer", "Number of completions to generate.", minimum=1, maximum=128),
    _f("stream", "boolean", "Whether to stream back partial progress as server-sent events."),
    _f("logprobs", "integer", "Include the log probabilities of the most likely tokens "
       "(0 up to the model's maximum, 5 by default).", minimum=0),
    _f("echo", "boolean", "Echo back the prompt in addition to the completion."),
    _f("stop", "stop", "Up to 4 sequences where generation stops: a string or a list."),
    _f("presence_penalty", "number", "Penalty for tokens already present, -2 to 2.",
       minimum=-2, maximum=2),
    _f("frequency_penalty", "number", "Penalty by token frequency, -2 to 2.",
       minimum=-2, maximum=2),
    _f("best_of", "integer", "Generate this many completions server-side and return the "
       "best n; at least n, and not with stream.", minimum=1),
    _f("logit_bias", "logit_bias", "Map of token id to a bias between -100 and 100."),
    _f("user", "string", "A unique identifier representing your end-user."),
    _f("suffix", "string", "The suffix that comes after a completion of inserted text "
       "(vLLM answers 400: not supported)."),
    _f("seed", "integer", "Seed for reproducible sampling.", seed=False),
    _f("stream_options", "object", "Streaming options; {\"include_usage\": true} adds a "
       "final chunk with token usage.", seed=False),
    _extra("top_k", "integer", "vLLM: sample from the k most likely tokens (-1: all)."),
    _extra("min_p", "number", "vLLM: minimum probability relative to the most likely token."),
    _extra("repetition_penalty", "number", "vLLM: penalty for repeated tokens (1: none)."),
    _extra("length_penalty", "number", "vLLM: length penalty for beam search."),
    _extra("min_tokens", "integer", "vLLM: generate at least this many tokens."),
    _extra("ignore_eos", "boolean", "vLLM: keep generating after the end-of-sequence token."),
    _extra("stop_token_ids", "object", "vLLM: token ids that stop generation."),
    _extra("include_stop_str_in_output", "boolean", "vLLM: keep the stop string in the text."),
    _extra("skip_special_tokens", "boolean", "vLLM: drop special tokens from the text."),
    _extra("spaces_between_special_tokens", "boolean", "vLLM: spaces around special tokens."),
    _extra("truncate_prompt_tokens", "integer", "vLLM: keep only the last k prompt tokens."),
    _extra("prompt_logprobs", "integer", "vLLM: log probabilities of the prompt tokens."),
    _extra("allowed_token_ids", "object", "vLLM: restrict sampling to these token ids."),
    _extra("return_tokens_as_token_ids", "boolean", "vLLM: tokens as 'token_id:N'."),
    _extra("priority", "integer", "vLLM: scheduling priority."),
)
_BY_NAME = {f.name: f for f in FIELDS}
_CHECKED = tuple(f for f in FIELDS if f.checked and f.name not in ("model", "prompt"))
MAX_STOP = 4

_KIND_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "a JSON object",
}


@dataclass(slots=True)
class CompletionRequest:
    """A checked request. ``body`` holds every field the client sent, unknown ones too."""

    body: dict[str, Any]
    raw: bytes | None  # the JSON body as received, forwarded as is when nothing changes
    model: str
    stream: bool
    include_usage: bool  # the client asked for the final usage chunk
    running_usage: bool = False  # ... and for usage on every chunk (continuous_usage_stats)
    n: int = 1

    def upstream_body(
        self,
        upstream_model: str,
        *,
        max_logprobs: int,
        default_max_tokens: int | None,
        max_tokens_limit: int | None,
    ) -> bytes:
        """The body for vLLM: the served model name, the model's limits applied, and
        (when streaming) usage asked for so that it can be recorded."""
        body = self.body
        logprobs = body.get("logprobs")
        if logprobs is not None and logprobs > max_logprobs:
            raise InvalidRequest(
                f"'logprobs' must be at most {max_logprobs} for model '{self.model}', "
                f"got {logprobs}.", param="logprobs")
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and max_tokens_limit is not None and (
            max_tokens > max_tokens_limit
        ):
            raise InvalidRequest(
                f"'max_tokens' must be at most {max_tokens_limit} for model '{self.model}', "
                f"got {max_tokens}.", param="max_tokens")
        changed = upstream_model != self.model
        if max_tokens is None and default_max_tokens is not None:
            body["max_tokens"] = default_max_tokens
            changed = True
        if self.stream and not (self.include_usage and self.running_usage):
            # usage on every chunk, so that a stream cut short is still counted; the
            # relay removes what the client did not ask for
            options = body.get("stream_options") or {}
            body["stream_options"] = {**options, "include_usage": True,
                                      "continuous_usage_stats": True}
            changed = True
        if not changed and self.raw is not None:
            return self.raw
        body["model"] = upstream_model
        return msgspec.json.encode(body)


    def check_caps(self, *, max_prompts: int, max_n: int, allow_priority: bool) -> None:
        """What one request may carry whatever the limits: the model's caps on the
        prompts in a list and on ``n`` and ``best_of``; vLLM's scheduling fields only
        for a company allowed to set them."""
        body = self.body
        prompts = prompt_count(body["prompt"])
        if prompts > max_prompts:
            raise InvalidRequest(f"'prompt' may hold at most {max_prompts} prompts for model "
                                 f"'{self.model}', got {prompts}.", param="prompt")
        for name in ("n", "best_of"):
            value = body.get(name)
            if value is not None and value > max_n:
                raise InvalidRequest(f"'{name}' must be at most {max_n} for model "
                                     f"'{self.model}', got {value}.", param=name)
        priority = body.get("priority")
        if priority is not None and priority != 0 and not allow_priority:
            raise PermissionDenied("'priority' changes how vLLM schedules everyone's "
                                   "requests; this key's company may not set it.",
                                   param="priority", code="priority_not_allowed")

    def reservation(self, *, reserve_max_tokens: int, max_request_tokens: int
                    ) -> tuple[int, int]:
        """(tokens, prompt): the most tokens the request may use (the prompt's estimate
        plus ``max_tokens`` for every completion of every prompt) and the prompt's
        estimate; 400 when above the model's cap. Call after ``upstream_body`` (which
        applies the model's default ``max_tokens``)."""
        body = self.body
        prompt = body["prompt"]
        estimate = estimate_prompt_tokens(prompt)
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = reserve_max_tokens
        sequences = max(self.n, body.get("best_of") or 1)
        tokens = estimate + max_tokens * sequences * prompt_count(prompt)
        if tokens > max_request_tokens:
            raise ReservationTooLarge(
                f"This request may use up to {tokens} tokens (its prompt, estimated, plus "
                f"max_tokens for each completion), more than the {max_request_tokens} one "
                f"request may use on model '{self.model}'; lower max_tokens or n.",
                param="max_tokens")
        return tokens, estimate


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

def parse_request(content_type: bytes | None, raw: bytes) -> CompletionRequest:
    """Decode a JSON, urlencoded or multipart body and check it."""
    media = (content_type or b"application/json").split(b";", 1)[0].strip().lower()
    if media == b"application/json" or media.endswith(b"+json") or (
        # `curl -d '{...}'` without -H sends JSON labelled as a form: accept what it means
        media == b"application/x-www-form-urlencoded" and raw.lstrip().startswith(b"{")
    ):
        return _check(_decode_json(raw), raw)
    if media == b"application/x-www-form-urlencoded":
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise InvalidRequest("The form body is not valid UTF-8.", code="invalid_body") from None
        return _check(_from_form(parse_qsl(text, keep_blank_values=True)), None)
    if media == b"multipart/form-data":
        return _check(_from_form(_multipart(content_type or b"", raw)), None)
    raise UnsupportedMediaType(
        f"Unsupported Content-Type '{media.decode('latin-1')}': send application/json, "
        "application/x-www-form-urlencoded or multipart/form-data.")


def _decode_json(raw: bytes) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_json")
    return body


def _multipart(content_type: bytes, raw: bytes) -> list[tuple[str, str]]:
    head = b"Content-Type: " + content_type + b"\r\nMIME-Version: 1.0\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    if not message.is_multipart() or message.defects:
        raise InvalidRequest("The multipart/form-data body is malformed.", code="invalid_body")
    pairs = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            raise InvalidRequest("A multipart/form-data part has no field name.",
                                 code="invalid_body")
        try:
            pairs.append((name, payload.decode()))
        except UnicodeDecodeError:
            raise InvalidRequest(f"Form field '{name}' is not valid UTF-8.",
                                 param=name, code="invalid_body") from None
    return pairs


def _from_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Form values are strings: give each field its schema type."""
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    body: dict[str, Any] = {}
    for key, values in grouped.items():
        field = _BY_NAME.get(key)
        kind = field.kind if field else "json"
        if kind in ("stop", "prompt"):
            if len(values) > 1:
                body[key] = values
            else:
                body[key] = _json_list_or_text(values[0])
            continue
        if len(values) > 1:
            raise InvalidRequest(f"Form field '{key}' was given more than once.", param=key)
        body[key] = _coerce_text(key, kind, values[0])
    return body


def _json_list_or_text(value: str) -> Any:
    if value.lstrip().startswith("["):
        try:
            decoded = msgspec.json.decode(value)
        except msgspec.DecodeError:
            return value
        if isinstance(decoded, list):
            return decoded
    return value


def _coerce_text(key: str, kind: str, value: str) -> Any:
    text = value.strip()
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
        if kind == "boolean":
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind in ("object", "logit_bias"):
            return msgspec.json.decode(text)
        if kind == "json":  # a field we do not know: JSON if it parses, else the text
            try:
                return msgspec.json.decode(text)
            except msgspec.DecodeError:
                return value
    except (ValueError, msgspec.DecodeError):
        word = _KIND_WORDS.get(kind, "a JSON object")
        raise InvalidRequest(f"'{key}' must be {word}, got {value!r}.", param=key,
                             code="invalid_type") from None
    return value


# -- checking --------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _type_error(name: str, kind: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"'{name}' must be {_KIND_WORDS[kind]}, got {msgspec.json.encode(value).decode()}.",
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
    raise InvalidRequest(f"'{f.name}' must be {bound}, got {value!r}.", param=f.name)


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return
        if all(_is_int(t) and t >= 0 for t in prompt):
            return
        if all(isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p)
               for p in prompt):
            return
    raise InvalidRequest(
        "'prompt' must be a string, a non-empty list of strings, a non-empty list of token "
        "ids (integers >= 0) or a non-empty list of such lists.", param="prompt",
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
        raise _type_error("logit_bias", "object", bias)
    for token, value in bias.items():
        if not token.lstrip("-").isdigit():
            raise InvalidRequest(f"'logit_bias' keys must be token ids, got {token!r}.",
                                 param="logit_bias")
        if not _is_number(value) or not -100 <= value <= 100:
            raise InvalidRequest(
                f"'logit_bias' values must be numbers between -100 and 100, got {value!r} "
                f"for token {token}.", param="logit_bias")


def _check(body: dict[str, Any], raw: bytes | None) -> CompletionRequest:
    model = body.get("model")
    if model is None or model == "":
        raise InvalidRequest("'model' is required.", param="model", code="missing_field")
    if not isinstance(model, str):
        raise _type_error("model", "string", model)
    if "prompt" not in body or body["prompt"] is None:
        raise InvalidRequest("'prompt' is required.", param="prompt", code="missing_field")
    _check_prompt(body["prompt"])
    for f in _CHECKED:
        value = body.get(f.name)
        if value is None:
            continue
        kind = f.kind
        if kind == "integer":
            if not _is_int(value):
                raise _type_error(f.name, kind, value)
            _check_range(f, value)
        elif kind == "number":
            if not _is_number(value):
                raise _type_error(f.name, kind, value)
            _check_range(f, value)
        elif kind == "boolean":
            if not isinstance(value, bool):
                raise _type_error(f.name, kind, value)
        elif kind == "string":
            if not isinstance(value, str):
                raise _type_error(f.name, kind, value)
        elif kind == "stop":
            _check_stop(value)
        elif kind == "logit_bias":
            _check_logit_bias(value)
        elif kind == "object" and not isinstance(value, dict):
            raise _type_error(f.name, kind, value)
    stream = body.get("stream") is True
    n = body.get("n") or 1
    best_of = body.get("best_of")
    if best_of is not None:
        if best_of < n:
            raise InvalidRequest(f"'best_of' must be at least 'n' ({n}), got {best_of}.",
                                 param="best_of")
        if stream and best_of > 1:
            raise InvalidRequest("'best_of' greater than 1 cannot be used with 'stream'.",
                                 param="best_of")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.",
                             param="stream_options")
    include_usage = bool(options and options.get("include_usage") is True)
    running = bool(options and options.get("continuous_usage_stats") is True)
    return CompletionRequest(body=body, raw=raw, model=model, stream=stream,
                             include_usage=include_usage, running_usage=running, n=n)
