"""``POST /api/v2/embeddings``: the embeddings request's fields and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest
from .completions import too_large
from .fields import (
    LIMITS,
    BodyLimits,
    Field,
    ModelRequest,
    check_fields,
    check_priority,
    check_prompt,
    checked_fields,
    decode_body,
    estimate_prompt_tokens,
    prompt_count,
    required_model,
)
from .fields import extra as _extra
from .fields import field as _f

__all__ = ["FIELDS", "EmbeddingRequest", "parse_embeddings"]

FIELDS: tuple[Field, ...] = (
    _f("model", "string", "Model to use: one of type `embedding`."),
    _f("input", "prompt", "What to embed: a string, a list of strings, a list of token "
       "ids or a list of lists of token ids."),
    _f("encoding_format", "string", "`float` (default) or `base64` (little-endian float32).",
       enum=("float", "base64")),
    _f("dimensions", "integer", "Truncate the vectors to this many dimensions (models that "
       "support it; vLLM answers 400 otherwise).", minimum=1),
    _f("user", "string", "A unique identifier representing your end-user."),
    _extra("truncate_prompt_tokens", "integer", "vLLM: keep only the last k input tokens."),
    _extra("add_special_tokens", "boolean", "vLLM: add the tokenizer's special tokens."),
    _extra("normalize", "boolean", "vLLM: normalise the vectors."),
    _extra("priority", "integer", "vLLM: scheduling priority."),
)
_BY_NAME = {f.name: f for f in FIELDS}
_CHECKED = checked_fields(FIELDS, "model", "input")


@dataclass(slots=True)
class EmbeddingRequest(ModelRequest):
    """A checked embeddings request: it uses its input's tokens, and generates none."""

    def affinity_fields(self) -> dict[str, Any]:
        return {"prompt": self.body["input"], "user": self.body.get("user")}

    def check_caps(self, *, max_prompts: int, max_n: int, allow_priority: bool) -> None:
        inputs = prompt_count(self.body["input"])
        if inputs > max_prompts:
            raise InvalidRequest(f"'input' may hold at most {max_prompts} inputs for model "
                                 f"'{self.model}', got {inputs}.", param="input")
        check_priority(self.body, allow_priority)

    def reservation(self, *, reserve_max_tokens: int, max_request_tokens: int
                    ) -> tuple[int, int]:
        estimate = estimate_prompt_tokens(self.body["input"])
        return too_large(estimate, max_request_tokens, self.model,
                         what="its input, estimated", param="input",
                         advice="send fewer or shorter inputs"), estimate


def parse_embeddings(content_type: bytes | None, raw: bytes,
                     limits: BodyLimits = LIMITS) -> EmbeddingRequest:
    body, as_sent = decode_body(content_type, raw, _BY_NAME, limits=limits)
    return _check(body, as_sent)


def _check(body: dict[str, Any], raw: bytes | None) -> EmbeddingRequest:
    model = required_model(body)
    if body.get("input") is None:
        raise InvalidRequest("'input' is required.", param="input", code="missing_field")
    check_prompt(body["input"], "input")
    check_fields(body, _CHECKED)
    return EmbeddingRequest(body=body, raw=raw, model=model)
