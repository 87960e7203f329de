"""``POST /api/v2/chat/completions``: the chat request's fields and checks, as vLLM's
OpenAI server takes them. The sampling fields are the completions request's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from ..errors import InvalidRequest
from .completions import FIELDS as _COMPLETION_FIELDS
from .completions import too_large
from .fields import (
    LIMITS,
    BodyLimits,
    Field,
    ModelRequest,
    check_fields,
    check_max,
    check_priority,
    checked_fields,
    decode_body,
    excerpt,
    required_model,
    stream_flags,
)
from .fields import extra as _extra
from .fields import field as _f

__all__ = ["FIELDS", "MEDIA_TOKENS", "ChatRequest", "check_messages", "estimate_chat_tokens",
           "parse_chat"]

_SHARED = {f.name: f for f in _COMPLETION_FIELDS}

FIELDS: tuple[Field, ...] = (
    _SHARED["model"],
    _f("messages", "array", "The conversation: a non-empty list of messages, each with a "
       "`role` (system, developer, user, assistant, tool, or one the model's chat template "
       "knows) and a `content` (a string or a list of content parts; absent or null reads "
       "as empty, as for an assistant's `tool_calls`). In a form body, a JSON string.",
       seed=False),
    _f("max_completion_tokens", "integer", "Maximum number of tokens to generate.",
       minimum=0, seed=False),
    _f("max_tokens", "integer", "Maximum number of tokens to generate (deprecated by "
       "OpenAI in favour of `max_completion_tokens`).", minimum=0, seed=False),
    *(_SHARED[name] for name in ("temperature", "top_p", "n", "stream", "stop",
                                 "presence_penalty", "frequency_penalty", "logit_bias",
                                 "user", "seed", "stream_options")),
    _f("logprobs", "boolean", "Return the log probabilities of the output tokens.",
       seed=False),
    _f("top_logprobs", "integer", "With `logprobs`, how many of the most likely tokens to "
       "return at each position (up to the model's maximum).", minimum=0, seed=False),
    _f("tools", "array", "Functions the model may call: `{\"type\": \"function\", "
       "\"function\": {\"name\", \"description\", \"parameters\"}}`. In a form body, a "
       "JSON string.", seed=False),
    _f("tool_choice", "json", "`none`, `auto`, `required`, or `{\"type\": \"function\", "
       "\"function\": {\"name\": ...}}`.", seed=False),
    _f("parallel_tool_calls", "boolean", "Whether the model may call several tools at "
       "once.", seed=False),
    _f("response_format", "object", "`{\"type\": \"text\"}`, `{\"type\": \"json_object\"}` "
       "or `{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}`.",
       seed=False),
    *(f for f in _COMPLETION_FIELDS if not f.checked),  # vLLM's sampling extras
    _extra("add_generation_prompt", "boolean", "vLLM: end the prompt with the template's "
           "generation prompt (default true)."),
    _extra("continue_final_message", "boolean", "vLLM: continue the last message instead "
           "of starting a new one."),
    _extra("echo", "boolean", "vLLM: start the answer with the last message's content."),
    _extra("chat_template_kwargs", "object", "vLLM: more variables for the chat template."),
    _extra("structured_outputs", "object", "vLLM: guided decoding (json, regex, choice, "
           "grammar)."),
)
_BY_NAME = {f.name: f for f in FIELDS}
_CHECKED = checked_fields(FIELDS, "model", "messages", "tool_choice")
_FORMATS = ("text", "json_object", "json_schema", "structural_tag")
_AFFINITY_CHARS = 65_536


@dataclass(slots=True)
class ChatRequest(ModelRequest):
    """A checked chat completions request."""

    def upstream_body(self, upstream_model: str, *, max_logprobs: int,
                      default_max_tokens: int | None, max_tokens_limit: int | None) -> bytes:
        body = self.body
        check_max(body, ("top_logprobs",), max_logprobs, self.model)
        if max_tokens_limit is not None:
            check_max(body, ("max_completion_tokens", "max_tokens"), max_tokens_limit,
                      self.model)
        changed = upstream_model != self.model
        if (default_max_tokens is not None and body.get("max_completion_tokens") is None
                and body.get("max_tokens") is None):
            body["max_completion_tokens"] = default_max_tokens
            changed = True
        return self.encode(upstream_model, changed)

    def affinity_fields(self) -> dict[str, Any]:
        """The conversation as text, message by message: requests that share their
        first messages (a system prompt, a long document) share its prefix."""
        parts, size = [], 0
        for m in self.body["messages"]:
            content = m.get("content")
            text = content if isinstance(content, str) else msgspec.json.encode(
                content).decode()
            parts.append(f"{m.get('role')}\n{text[:_AFFINITY_CHARS]}\n")
            size += len(parts[-1])
            if size >= _AFFINITY_CHARS:  # far more than any prefix the balancer reads
                break
        return {"prompt": "".join(parts), "user": self.body.get("user")}

    def check_caps(self, *, max_prompts: int, max_n: int, allow_priority: bool) -> None:
        check_max(self.body, ("n",), max_n, self.model)
        check_priority(self.body, allow_priority)

    def reservation(self, *, reserve_max_tokens: int, max_request_tokens: int
                    ) -> tuple[int, int]:
        """The prompt's estimate (``estimate_chat_tokens``) plus the most completion
        tokens for each of the ``n`` choices."""
        body = self.body
        estimate = estimate_chat_tokens(body)
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = reserve_max_tokens
        tokens = estimate + max_tokens * self.n
        return too_large(tokens, max_request_tokens, self.model, what="its messages, "
                         "estimated, plus the most completion tokens for each choice",
                         param="max_completion_tokens" if "max_completion_tokens" in body
                         else "max_tokens"), estimate


def parse_chat(content_type: bytes | None, raw: bytes,
               limits: BodyLimits = LIMITS) -> ChatRequest:
    """Decode a JSON (or form: ``messages`` and ``tools`` as JSON text) body and check it."""
    body, as_sent = decode_body(content_type, raw, _BY_NAME, limits=limits)
    model = required_model(body)
    check_messages(body.get("messages"))
    check_fields(body, _CHECKED)
    _check_tools(body)
    _check_response_format(body.get("response_format"))
    if body.get("top_logprobs") not in (None, 0) and body.get("logprobs") is not True:
        raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true.",
                             param="top_logprobs")
    stream, include_usage, running = stream_flags(body)
    return ChatRequest(body=body, raw=as_sent, model=model, stream=stream,
                       include_usage=include_usage, running_usage=running,
                       n=body.get("n") or 1)


def _bad(param: str, message: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def check_messages(messages: Any) -> None:
    """A non-empty list of messages, each with a string role and a content that is a
    string, a list of parts (strings or objects) or absent. vLLM takes any role (a chat
    template may know more than OpenAI's: ``ipython``) and an absent content as empty,
    so only the shapes it would fail on are refused here."""
    if messages is None:
        raise _bad("messages", "'messages' is required.", "missing_field")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of messages.",
                   "invalid_type")
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(at, f"'{at}' must be a JSON object with 'role' and 'content'.",
                       "invalid_type")
        role = message.get("role")
        if role is None:
            raise _bad(f"{at}.role", f"'{at}.role' is required.", "missing_field")
        if not isinstance(role, str) or not role:
            raise _bad(f"{at}.role", f"'{at}.role' must be a non-empty string (system, "
                       "developer, user, assistant, tool, or a role the model's chat "
                       f"template knows), got {excerpt(role)}.",
                       "invalid_type")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict | str):
                    raise _bad(f"{at}.content[{j}]", f"'{at}.content[{j}]' must be a "
                               "content part: a string or a JSON object such as "
                               "{\"type\": \"text\", \"text\": ...}.", "invalid_type")
        elif content is not None and not isinstance(content, str):
            raise _bad(f"{at}.content", f"'{at}.content' must be a string or a list of "
                       "content parts.", "invalid_type")


# What a message's parts other than text reserve: an image or an audio clip is tokens
# that its bytes (a URL, or base64) say nothing about; settling puts vLLM's count in place.
MEDIA_TOKENS = 4096
_TEMPLATE_TOKENS = 32  # the chat template's own words: once a request, and per message
_MESSAGE_TOKENS = 16


def estimate_chat_tokens(body: dict[str, Any]) -> int:
    """The prompt's tokens, estimated: each text's UTF-8 bytes (as for a completion's
    prompt), each other part ``MEDIA_TOKENS``, the chat template's words, and the tools
    and tool calls as JSON."""
    total = _TEMPLATE_TOKENS
    for message in body["messages"]:
        total += _MESSAGE_TOKENS
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.encode("utf-8", "surrogatepass"))
        elif content:
            for part in content:
                if isinstance(part, str):
                    total += len(part.encode("utf-8", "surrogatepass"))
                elif isinstance(part.get("text"), str):
                    total += len(part["text"].encode("utf-8", "surrogatepass"))
                else:
                    total += MEDIA_TOKENS
        if message.get("tool_calls"):
            total += len(msgspec.json.encode(message["tool_calls"]))
    if body.get("tools"):
        total += len(msgspec.json.encode(body["tools"]))
    return total


def _check_tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    names = set()
    for i, tool in enumerate(tools or ()):
        at = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or (
                not isinstance(function, dict)):
            raise _bad(at, f"'{at}' must be {{\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}.", "invalid_type")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise _bad(f"{at}.function.name", f"'{at}.function.name' must be a "
                       "non-empty string.", "invalid_type")
        names.add(function["name"])
    choice = body.get("tool_choice")
    if choice is None or choice in ("none", "auto", "required"):
        return
    if isinstance(choice, str):
        raise _bad("tool_choice", "'tool_choice' must be none, auto, required or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}, got "
                   f"{excerpt(choice)}.")
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise _bad("tool_choice", "'tool_choice' must be none, auto, required or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                   "invalid_type")
    if name not in names:
        raise _bad("tool_choice", f"'tool_choice' names the function {excerpt(name)}, "
                   "which is not among 'tools'.")


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    kind = fmt.get("type")
    if kind is None:
        raise _bad("response_format.type", "'response_format.type' is required: one of "
                   f"{', '.join(_FORMATS)}.", "missing_field")
    if kind not in _FORMATS:
        raise _bad("response_format.type", "'response_format.type' must be one of "
                   f"{', '.join(_FORMATS)}, got {excerpt(kind)}.")
    if kind == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
        raise _bad("response_format.json_schema", "'response_format.json_schema' is "
                   "required with type json_schema: {\"name\": ..., \"schema\": {...}}.",
                   "missing_field")

