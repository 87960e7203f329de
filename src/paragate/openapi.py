"""The OpenAPI document, built from ``protocol.FIELDS`` so it describes what the code
accepts. The response schemas are the seed's (Paradigm API v2)."""

from __future__ import annotations

from typing import Any

from . import __version__
from .protocol import FIELDS, MAX_STOP, Field

__all__ = ["document"]

_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


def _schema(f: Field) -> dict[str, Any]:
    schema: dict[str, Any]
    if f.kind == "prompt":
        schema = {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1},
            _TOKEN_IDS,
            {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
        ]}
    elif f.kind == "stop":
        schema = {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP},
        ], "nullable": True}
    elif f.kind == "logit_bias":
        schema = {"type": "object", "nullable": True,
                  "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}
    elif f.kind == "object":
        schema = {"type": "object", "nullable": True, "additionalProperties": {}}
    else:
        schema = {"type": f.kind, "nullable": f.name not in ("model",)}
        if f.kind == "number":
            schema["format"] = "double"
    if f.minimum is not None:
        schema["minimum"] = f.minimum
        if f.exclusive_minimum:
            schema["exclusiveMinimum"] = True
    if f.maximum is not None:
        schema["maximum"] = f.maximum
    schema["description"] = f.description
    return schema


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}


_ERRORS = {
    "400": _error_response("Invalid request (the envelope names the field in `param`)."),
    "401": _error_response("Missing, malformed, unknown, revoked or expired API key."),
    "404": _error_response("Unknown, disabled or not permitted model (`model_not_found`)."),
    "405": _error_response("Method not allowed."),
    "413": _error_response("Request body too large."),
    "415": _error_response("Unsupported content type."),
    "429": {**_error_response("The key's rate limit is spent (`rate_limit_exceeded`)."),
            "headers": {"Retry-After": {"description": "Seconds until a request may succeed.",
                                        "schema": {"type": "integer"}}}},
    "502": _error_response("The model server failed."),
    "503": _error_response("The model server is unreachable."),
    "504": _error_response("The model server timed out."),
}


def document() -> dict[str, Any]:
    request_schema = {
        "type": "object",
        "description": "Request for the completions endpoint (OpenAI-compatible). Fields "
                       "not listed are passed to vLLM unchanged.",
        "properties": {f.name: _schema(f) for f in FIELDS},
        "required": ["model", "prompt"],
        "additionalProperties": True,
    }
    ref = {"$ref": "#/components/schemas/CompletionsRequest"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Paradigm API (paragate)", "version": f"v2 / paragate {__version__}",
                 "description": "Completions, served by paragate in front of vLLM."},
        "paths": {
            "/api/v2/completions": {"post": {
                "tags": ["Models"],
                "summary": "Generate a text completion",
                "operationId": "api_v2_completions_create",
                "security": [{"bearerAuth": []}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": ref},
                    "application/x-www-form-urlencoded": {"schema": ref},
                    "multipart/form-data": {"schema": ref},
                }},
                "responses": {
                    "200": {
                        "description": "A completion (JSON), or with `stream: true` "
                                       "server-sent events ending with `data: [DONE]`.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/CompletionsResponse"}},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    **_ERRORS,
                },
            }},
            "/api/v2/models": {"get": {
                "tags": ["Models"], "summary": "List the models this key may use",
                "operationId": "api_v2_models_list", "security": [{"bearerAuth": []}],
                "responses": {"200": {"description": "OpenAI list of models", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}},
                    "401": _ERRORS["401"]},
            }},
            "/api/v2/models/{model}": {"get": {
                "tags": ["Models"], "summary": "Describe one model",
                "operationId": "api_v2_models_retrieve", "security": [{"bearerAuth": []}],
                "parameters": [{"name": "model", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The model", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}},
                    "401": _ERRORS["401"], "404": _ERRORS["404"]},
            }},
            "/health": {"get": {
                "summary": "Liveness (public)", "operationId": "health",
                "responses": {"200": {"description": "The gateway is up."}},
            }},
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "CompletionsRequest": request_schema,
                "CompletionsResponse": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"type": "string", "description": "Always 'text_completion'"},
                        "created": {"type": "integer"},
                        "model": {"type": "string",
                                  "description": "The model name the request used"},
                        "choices": {"type": "array",
                                    "items": {"$ref": "#/components/schemas/CompletionChoice"}},
                        "usage": {"$ref": "#/components/schemas/CompletionUsage"},
                    },
                    "required": ["choices", "created", "id", "model", "object"],
                },
                "CompletionChoice": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "index": {"type": "integer"},
                        "logprobs": {"nullable": True},
                        "finish_reason": {"type": "string", "nullable": True},
                    },
                    "required": ["index", "text"],
                },
                "CompletionUsage": {
                    "type": "object",
                    "properties": {
                        "prompt_tokens": {"type": "integer"},
                        "completion_tokens": {"type": "integer"},
                        "total_tokens": {"type": "integer"},
                    },
                    "required": ["completion_tokens", "prompt_tokens", "total_tokens"],
                },
                "Model": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"}, "object": {"type": "string"},
                        "created": {"type": "integer"}, "owned_by": {"type": "string"},
                        "display_name": {"type": "string"}, "type": {"type": "string"},
                    },
                    "required": ["id", "object", "created", "owned_by"],
                },
                "ModelList": {
                    "type": "object",
                    "properties": {
                        "object": {"type": "string"},
                        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                    },
                    "required": ["object", "data"],
                },
                "Error": {
                    "type": "object",
                    "properties": {"error": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": "string", "nullable": True},
                            "code": {"type": "string"},
                        },
                        "required": ["message", "type", "param", "code"],
                    }},
                    "required": ["error"],
                },
            },
        },
    }
