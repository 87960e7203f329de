"""``POST /api/v2/completions``: the request's fields, its checks, the caps and the
reservation, and the body sent upstream.

``FIELDS`` is the one description of the request. Validation, form coercion and the
OpenAPI schema (``openapi.py``) are all read off it, so they cannot drift apart. Fields
not in the table are passed to vLLM untouched: vLLM answers for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest, ReservationTooLarge
from .fields import (
    LIMITS,
    BodyLimits,
    Field,
    ModelRequest,
    check_fields,
    check_max,
    check_priority,
    check_prompt,
    checked_fields,
    decode_body,
    estimate_prompt_tokens,
    prompt_count,
    required_model,
    stream_flags,
)
from .fields import extra as _extra
from .fields import field as _f

__all__ = ["FIELDS", "CompletionRequest", "parse_request"]

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
    _extra("stop_token_ids", "array", "vLLM: token ids that stop generation."),
    _extra("include_stop_str_in_output", "boolean", "vLLM: keep the stop string in the text."),
    _extra("skip_special_tokens", "boolean", "vLLM: drop special tokens from the text."),
    _extra("spaces_between_special_tokens", "boolean", "vLLM: spaces around special tokens."),
    _extra("truncate_prompt_tokens", "integer", "vLLM: keep only the last k prompt tokens."),
    _extra("prompt_logprobs", "integer", "vLLM: log probabilities of the prompt tokens."),
    _extra("allowed_token_ids", "array", "vLLM: restrict sampling to these token ids."),
    _extra("return_tokens_as_token_ids", "boolean", "vLLM: tokens as 'token_id:N'."),
    _extra("priority", "integer", "vLLM: scheduling priority."),
)
_BY_NAME = {f.name: f for f in FIELDS}
_CHECKED = checked_fields(FIELDS, "model", "prompt")


@dataclass(slots=True)
class CompletionRequest(ModelRequest):
    """A checked completions request."""

    def upstream_body(self, upstream_model: str, *, max_logprobs: int,
                      default_max_tokens: int | None, max_tokens_limit: int | None) -> bytes:
        """The body for vLLM: the served model name, the model's limits applied, and
        (when streaming) usage asked for so that it can be recorded."""
        body = self.body
        check_max(body, ("logprobs",), max_logprobs, self.model)
        if max_tokens_limit is not None:
            check_max(body, ("max_tokens",), max_tokens_limit, self.model)
        changed = upstream_model != self.model
        if body.get("max_tokens") is None and default_max_tokens is not None:
            body["max_tokens"] = default_max_tokens
            changed = True
        return self.encode(upstream_model, changed)

    def check_caps(self, *, max_prompts: int, max_n: int, allow_priority: bool) -> None:
        """What one request may carry whatever the limits: the model's caps on the
        prompts in a list and on ``n`` and ``best_of``; vLLM's scheduling fields only
        for a company allowed to set them."""
        body = self.body
        prompts = prompt_count(body["prompt"])
        if prompts > max_prompts:
            raise InvalidRequest(f"'prompt' may hold at most {max_prompts} prompts for model "
                                 f"'{self.model}', got {prompts}.", param="prompt")
        check_max(body, ("n", "best_of"), max_n, self.model)
        check_priority(body, allow_priority)

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
        return too_large(tokens, max_request_tokens, self.model), estimate


def too_large(tokens: int, max_request_tokens: int, model: str, *,
              what: str = "its prompt, estimated, plus max_tokens for each completion",
              param: str = "max_tokens", advice: str = "lower max_tokens or n") -> int:
    """``tokens``, or 400 when one request may use more than the model allows."""
    if tokens > max_request_tokens:
        raise ReservationTooLarge(
            f"This request may use up to {tokens} tokens ({what}), more than the "
            f"{max_request_tokens} one request may use on model '{model}'; {advice}.",
            param=param)
    return tokens


def parse_request(content_type: bytes | None, raw: bytes,
                  limits: BodyLimits = LIMITS) -> CompletionRequest:
    """Decode a JSON, urlencoded or multipart body and check it."""
    body, as_sent = decode_body(content_type, raw, _BY_NAME, limits=limits)
    return _check(body, as_sent)


def _check(body: dict[str, Any], raw: bytes | None) -> CompletionRequest:
    model = required_model(body)
    if "prompt" not in body or body["prompt"] is None:
        raise InvalidRequest("'prompt' is required.", param="prompt", code="missing_field")
    check_prompt(body["prompt"])
    check_fields(body, _CHECKED)
    stream, include_usage, running = stream_flags(body)
    n = body.get("n") or 1
    best_of = body.get("best_of")
    if best_of is not None:
        if best_of < n:
            raise InvalidRequest(f"'best_of' must be at least 'n' ({n}), got {best_of}.",
                                 param="best_of")
        if stream and best_of > 1:
            raise InvalidRequest("'best_of' greater than 1 cannot be used with 'stream'.",
                                 param="best_of")
    return CompletionRequest(body=body, raw=raw, model=model, stream=stream,
                             include_usage=include_usage, running_usage=running, n=n)
