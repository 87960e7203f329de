"""The requests the gateway forwards to models: one module per endpoint over the shared
field machinery of ``fields``, and the body decoding of ``bodies``."""

from .bodies import BodyLimits, json_body
from .chat import ChatRequest, parse_chat
from .completions import FIELDS, CompletionRequest, parse_request
from .embeddings import EmbeddingRequest, parse_embeddings
from .fields import MAX_STOP, Field, ModelRequest
from .tokenize import TokenizeRequest, parse_tokenize

__all__ = [
    "FIELDS",
    "MAX_STOP",
    "BodyLimits",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "Field",
    "ModelRequest",
    "TokenizeRequest",
    "json_body",
    "parse_chat",
    "parse_embeddings",
    "parse_request",
    "parse_tokenize",
]
