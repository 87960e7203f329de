"""``POST /api/v2/tokenize``: a prompt or a conversation, tokenized by the model's own
tokenizer (vLLM's ``/tokenize``). Nothing is generated, so nothing is reserved."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from ..errors import InvalidRequest
from .chat import FIELDS as _CHAT_FIELDS
from .chat import check_messages
from .fields import (
    LIMITS,
    BodyLimits,
    Field,
    ModelRequest,
    check_fields,
    check_priority,
    checked_fields,
    decode_body,
    required_model,
    type_error,
)
from .fields import extra as _extra
from .fields import field as _f

__all__ = ["FIELDS", "TokenizeRequest", "parse_tokenize", "with_total"]

_CHAT = {f.name: f for f in _CHAT_FIELDS}

FIELDS: tuple[Field, ...] = (
    _f("model", "string", "Model whose tokenizer to use."),
    _f("prompt", "string", "Text to tokenize (give this or `messages`)."),
    _f("messages", "array", "A conversation to tokenize as the chat template renders it "
       "(give this or `prompt`). In a form body, a JSON string."),
    _f("add_special_tokens", "boolean", "Add the tokenizer's special tokens (default: true "
       "for `prompt`, false for `messages`)."),
    _f("return_token_strs", "boolean", "Also return each token as text (`token_strs`)."),
    _CHAT["tools"],
    _extra("add_generation_prompt", "boolean", "vLLM: with `messages`, end with the "
           "template's generation prompt (default true)."),
    _extra("continue_final_message", "boolean", "vLLM: with `messages`, continue the last "
           "message."),
    _extra("chat_template_kwargs", "object", "vLLM: more variables for the chat template."),
)
_BY_NAME = {f.name: f for f in FIELDS}
_CHECKED = checked_fields(FIELDS, "model", "messages")


@dataclass(slots=True)
class TokenizeRequest(ModelRequest):
    """A checked tokenize request."""

    def check_caps(self, *, max_prompts: int, max_n: int, allow_priority: bool) -> None:
        check_priority(self.body, allow_priority)


def parse_tokenize(content_type: bytes | None, raw: bytes,
                   limits: BodyLimits = LIMITS) -> TokenizeRequest:
    body, as_sent = decode_body(content_type, raw, _BY_NAME, limits=limits)
    model = required_model(body)
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise InvalidRequest("Give exactly one of 'prompt' and 'messages'.", param="prompt",
                             code="missing_field" if prompt is None else "invalid_value")
    if prompt is not None and not isinstance(prompt, str):
        raise type_error("prompt", "string", prompt)
    if messages is not None:
        check_messages(messages)
    check_fields(body, _CHECKED)
    return TokenizeRequest(body=body, raw=as_sent, model=model)


class _Count(msgspec.Struct):
    count: int


def with_total(data: bytes) -> bytes:
    """vLLM's answer with Paradigm's ``total_tokens`` (its ``count``) in front."""
    try:
        count = msgspec.json.decode(data, type=_Count).count
    except (msgspec.DecodeError, msgspec.ValidationError):
        return data  # not vLLM's shape: relayed as it is
    return b'{"total_tokens":' + str(count).encode() + b"," + data.lstrip()[1:]
