"""The OpenAPI document, built from each endpoint's ``FIELDS`` in ``protocol/`` (the
requests forwarded to models) and ``schemas`` (the control plane's bodies and answers),
so it describes what the code accepts and answers. The completion response schemas are
the seed's (Paradigm API v2); the other endpoints' answers are vLLM's."""

from __future__ import annotations

from typing import Any

import msgspec

from . import __version__
from . import schemas as s
from .protocol import FIELDS, MAX_STOP, Field, chat, embeddings, tokenize

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
    elif f.kind == "array":
        schema = {"type": "array", "nullable": True, "items": {}}
    elif f.kind == "json":
        schema = {"nullable": True}
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
    if f.enum:  # with null among them where null is allowed (OpenAPI 3.0.3's rule)
        schema["enum"] = [*f.enum, None] if schema.get("nullable") else list(f.enum)
    schema["description"] = f.description
    return schema


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}


# OpenAI's, on every answer to a request that a limit applied to (docs/limits.md)
_RATE_HEADERS = {
    f"x-ratelimit-{what}-{kind}": {"description": text.format(kind=kind),
                                   "schema": {"type": "string" if what == "reset"
                                              else "integer"}}
    for kind in ("requests", "tokens")
    for what, text in (("limit", "The tightest {kind} limit that applied."),
                       ("remaining", "What it has left after this request."),
                       ("reset", "Until it is whole again: `20ms`, `1.5s`, `6m0s`."))}

_ERRORS = {
    "400": _error_response("Invalid request (the envelope names the field in `param`)."),
    "401": _error_response("Missing, malformed, unknown, revoked or expired API key."),
    "404": _error_response("Unknown, disabled or not permitted model (`model_not_found`)."),
    "405": _error_response("Method not allowed."),
    "413": _error_response("Request body too large."),
    "415": _error_response("Unsupported content type."),
    "403": _error_response("`priority` set by a key whose company may not "
                           "(`priority_not_allowed`)."),
    "429": {**_error_response("A limit of the key, its user, its company or the model "
                              "cannot hold the request (`rate_limit_exceeded`, "
                              "`concurrency_limit_exceeded`, `budget_exceeded`)."),
            "headers": {"Retry-After": {"description": "Seconds until a request may succeed.",
                                        "schema": {"type": "integer"}}}},
    "502": _error_response("The model server failed."),
    "503": _error_response("The model server is unreachable (or, with "
                           "`PARAGATE_LIMITS_FAIL_MODE=closed`, Redis: `limits_unavailable`)."),
    "504": _error_response("The model server timed out."),
}


def _oas30(node: Any) -> Any:
    """msgspec's JSON Schema (2020-12) in OpenAPI 3.0's dialect: ``nullable`` instead of
    a null type, typed enums, no empty ``required``."""
    if isinstance(node, list):
        return [_oas30(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _oas30(v) for k, v in node.items()}
    alternatives = node.get("anyOf")
    if isinstance(alternatives, list) and {"type": "null"} in alternatives:
        rest = [a for a in alternatives if a != {"type": "null"}]
        del node["anyOf"]
        if len(rest) == 1 and "$ref" in rest[0]:
            node["allOf"] = rest
        elif len(rest) == 1:
            node.update(rest[0])
        else:
            node["anyOf"] = rest
        node["nullable"] = True
    enum = node.get("enum")
    if isinstance(enum, list) and "type" not in node and all(isinstance(v, str) for v in enum):
        node["type"] = "string"
    if node.get("required") == []:
        del node["required"]
    node.pop("title", None)
    return node


_ADMIN_ERRORS = {
    "400": _error_response("Invalid body or query (the envelope names the field in "
                           "`param`)."),
    "401": _ERRORS["401"],
    "403": _error_response("The caller's role may never do this (`permission_denied`)."),
    "404": _error_response("No such object, or one outside the caller's scope."),
    "409": _error_response("A conflict: a duplicate name or email, a sixth active key, a "
                           "built-in object (`conflict`)."),
}
_PAGE = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                "maximum": 100, "default": 20}},
    {"name": "after", "in": "query", "description": "The id of the last object of the "
     "previous page.", "schema": {"type": "string"}},
]


def _q(name: str, kind: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description,
            "schema": {"type": kind}}


def _path(name: str, kind: str = "integer") -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": kind}}


def _op(op_id: str, summary: str, answer: type, *, tag: str, status: str = "200",
        body: type | None = None, params: list[dict[str, Any]] | None = None,
        errors: tuple[str, ...] = ("400", "401", "403", "404", "409")) -> dict[str, Any]:
    op: dict[str, Any] = {
        "tags": [tag], "summary": summary, "operationId": op_id,
        "security": [{"bearerAuth": []}],
        "responses": {status: {"description": summary, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{answer.__name__}"}}}},
            **{e: _ADMIN_ERRORS[e] for e in errors}},
    }
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}
    return op


_HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string", "enum": ["ok"]}}}
_ALL = {"name": "all", "in": "query", "description": "true: every configured model, "
        "disabled ones included (system admins only).", "schema": {"type": "boolean"}}


def _generated() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [*s.REQUESTS, *s.RESPONSES], ref_template="#/components/schemas/{name}")
    return {name: _oas30(schema) for name, schema in components.items()}


def _admin_paths() -> dict[str, Any]:
    key_id = _path("id", "string")
    return {
        "/api/v2/me": {"get": _op("api_v2_me", "The caller's key, user, company and role",
                                  s.Me, tag="Users", errors=("401",))},
        "/api/v2/companies": {
            "get": _op("api_v2_companies_list", "List companies (company admins: their "
                       "own)", s.CompanyList, tag="Companies", params=_PAGE,
                       errors=("400", "401", "403")),
            "post": _op("api_v2_companies_create", "Create a company (system admins)",
                        s.Company, tag="Companies", status="201", body=s.CompanyCreate),
        },
        "/api/v2/companies/{id}": {
            "parameters": [_path("id")],
            "get": _op("api_v2_companies_retrieve", "A company", s.Company,
                       tag="Companies", errors=("401", "403", "404")),
            "patch": _op("api_v2_companies_update", "Rename a company", s.Company,
                         tag="Companies", body=s.CompanyUpdate),
            "delete": _op("api_v2_companies_delete", "Delete a company: its users are "
                          "deleted and their keys revoked", s.Deleted, tag="Companies",
                          errors=("401", "403", "404", "409")),
        },
        "/api/v2/users": {
            "get": _op("api_v2_users_list", "List users (company admins: their company's)",
                       s.UserList, tag="Users", params=[*_PAGE, _q(
                           "company_id", "integer", "Only this company's users.")],
                       errors=("400", "401", "403")),
            "post": _op("api_v2_users_create", "Create a user", s.User, tag="Users",
                        status="201", body=s.UserCreate),
        },
        "/api/v2/users/{id}": {
            "parameters": [_path("id")],
            "get": _op("api_v2_users_retrieve", "A user", s.User, tag="Users",
                       errors=("401", "403", "404")),
            "patch": _op("api_v2_users_update", "Change a user", s.User, tag="Users",
                         body=s.UserUpdate),
            "delete": _op("api_v2_users_delete", "Delete a user and revoke their keys",
                          s.Deleted, tag="Users", errors=("401", "403", "404", "409")),
        },
        "/api/v2/api-keys": {
            "get": _op("api_v2_api_keys_list", "List keys (users: their own; company "
                       "admins: their company's)", s.ApiKeyList, tag="API Keys", params=[
                           *_PAGE, _q("user_id", "integer", "Only this user's keys."),
                           _q("company_id", "integer", "Only this company's keys."),
                           {"name": "state", "in": "query", "schema": {
                               "type": "string", "enum": ["active", "expired", "revoked"]}}],
                       errors=("400", "401")),
            "post": _op("api_v2_api_keys_create", "Create a key; the answer holds its "
                        "secret (`key`), once", s.ApiKey, tag="API Keys", status="201",
                        body=s.ApiKeyCreate),
        },
        "/api/v2/api-keys/{id}": {
            "parameters": [key_id],
            "get": _op("api_v2_api_keys_retrieve", "A key (never its secret)", s.ApiKey,
                       tag="API Keys", errors=("401", "404")),
            "patch": _op("api_v2_api_keys_update", "Change a key", s.ApiKey,
                         tag="API Keys", body=s.ApiKeyUpdate),
            "delete": _op("api_v2_api_keys_revoke", "Revoke a key, for good", s.ApiKey,
                          tag="API Keys", errors=("401", "404")),
        },
        "/api/v2/api-keys/{id}/rotate": {
            "parameters": [key_id],
            "post": _op("api_v2_api_keys_rotate", "A new secret for the same key; the old "
                        "one works for PARAGATE_KEY_ROTATION_GRACE seconds", s.ApiKey,
                        tag="API Keys", errors=("401", "403", "404", "409")),
        },
        "/api/v2/audit-log": {
            "get": _op("api_v2_audit_log_list", "Every change made through the API or the "
                       "CLI, oldest first", s.AuditEntryList, tag="Audit", params=[
                           *_PAGE,
                           _q("actor", "string", "A user id, a key's public id, or cli."),
                           _q("action", "string", "An action, or a prefix ending in '.'."),
                           _q("target", "string", "A target id, or type:id."),
                           _q("since", "integer", "From this Unix time."),
                           _q("until", "integer", "Before this Unix time.")],
                       errors=("400", "401", "403")),
        },
        "/api/v2/reporting/usage": {
            "get": _op("api_v2_reporting_usage", "Usage per bucket and group (system "
                       "admins: all; company admins: their company; users: their keys); "
                       "format=csv answers text/csv with the same columns",
                       s.UsageReport, tag="Reporting", params=[
                           _q("start_date", "string", "UTC ISO date or date-time."),
                           _q("end_date", "string", "UTC ISO date or date-time, exclusive."),
                           _q("bucket", "string", "hour, day (default) or month."),
                           _q("group_by", "string", "Comma-separated: company, user, key, "
                              "model."),
                           _q("company_id", "integer", "Only this company."),
                           _q("user_id", "integer", "Only this user."),
                           _q("key_id", "string", "Only this key (its public id)."),
                           _q("model", "string", "Only this model."),
                           _q("format", "string", "json (default) or csv."),
                           _q("limit", "integer", "At most this many rows (JSON)."),
                           _q("offset", "integer", "Skip this many rows (JSON).")],
                       errors=("400", "401", "403")),
        },
    }


def _request(fields: tuple[Field, ...], what: str, *required: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f"Request for the {what} endpoint (OpenAI-compatible). Fields "
                       "not listed are passed to vLLM unchanged.",
        "properties": {f.name: _schema(f) for f in fields},
        "required": ["model", *required],
        "additionalProperties": True,
    }


def _forwarded(op_id: str, summary: str, request: str, answer: dict[str, Any],
               answered: str, *, forms: str = "form") -> dict[str, Any]:
    """POST of an endpoint that forwards to a model: JSON and form bodies."""
    ref = {"$ref": f"#/components/schemas/{request}"}
    form = {"schema": ref, "description": forms} if forms != "form" else {"schema": ref}
    return {"post": {
        "tags": ["Models"], "summary": summary, "operationId": op_id,
        "security": [{"bearerAuth": []}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": ref},
            "application/x-www-form-urlencoded": form,
            "multipart/form-data": form,
        }},
        "responses": {"200": {"description": answered, "headers": _RATE_HEADERS,
                              "content": answer}, **_ERRORS},
    }}


def _sse(kind: str) -> dict[str, Any]:
    """One event of a stream: its ``data`` is a JSON chunk, or ``[DONE]`` at the end."""
    return {"type": "object", "required": ["data"], "description": f"Server-sent events: "
            f"each `data` is a {kind} chunk (JSON) or an error object; the last is "
            "`data: [DONE]`.", "properties": {
                "data": {"type": "string"}, "event": {"type": "string"},
                "id": {"type": "string"}}}


_OBJECT = {"type": "object", "additionalProperties": True}
_CHAT_ANSWER = {
    "application/json": {"schema": {**_OBJECT, "description": "vLLM's chat.completion "
                                    "object: id, object, created, model, choices "
                                    "(message, finish_reason, logprobs), usage."}},
    "text/event-stream": {"schema": _sse("chat.completion.chunk")},
}
_EMBEDDINGS_ANSWER = {"application/json": {"schema": {
    "type": "object", "required": ["object", "data", "model", "usage"], "properties": {
        "object": {"type": "string", "description": "Always 'list'."},
        "model": {"type": "string"},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "object": {"type": "string"}, "index": {"type": "integer"},
            "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}},
                                    {"type": "string", "format": "byte"}]}}}},
        "usage": {"type": "object", "properties": {
            "prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}},
    }, "additionalProperties": True}}}
_TOKENIZE_ANSWER = {"application/json": {"schema": {
    "type": "object", "required": ["total_tokens", "count", "tokens"], "properties": {
        "total_tokens": {"type": "integer", "description": "Paradigm's name for `count`."},
        "count": {"type": "integer", "description": "vLLM's: the number of tokens."},
        "max_model_len": {"type": "integer", "description": "vLLM's: the model's context."},
        "tokens": {"type": "array", "items": {"type": "integer"}},
        "token_strs": {"type": "array", "items": {"type": "string"}, "nullable": True},
    }, "additionalProperties": True}}}
_JSON_TEXT = ("In a form body, `messages` and `tools` are JSON text; every other field "
              "is coerced to its type.")


def document() -> dict[str, Any]:
    request_schema = _request(FIELDS, "completions", "prompt")
    ref = {"$ref": "#/components/schemas/CompletionsRequest"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Paradigm API (paragate)", "version": f"v2 / paragate {__version__}",
                 "description": "Completions, chat completions, embeddings and tokenize, "
                                "served by paragate in front of vLLM, and the admin API."},
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
                        "headers": _RATE_HEADERS,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/CompletionsResponse"}},
                            "text/event-stream": {"schema": _sse("text_completion")},
                        },
                    },
                    **_ERRORS,
                },
            }},
            "/api/v2/chat/completions": _forwarded(
                "api_v2_chat_completions_create", "Generate a chat completion",
                "ChatCompletionsRequest", _CHAT_ANSWER, "A chat completion (JSON), or "
                "with `stream: true` server-sent events ending with `data: [DONE]`.",
                forms=_JSON_TEXT),
            "/api/v2/embeddings": _forwarded(
                "api_v2_embeddings_create", "Embed text or token ids (models of type "
                "embedding)", "EmbeddingsRequest", _EMBEDDINGS_ANSWER, "The vectors."),
            "/api/v2/tokenize": _forwarded(
                "api_v2_tokenize", "Tokenize a prompt or a conversation with the model's "
                "tokenizer", "TokenizeRequest", _TOKENIZE_ANSWER, "The tokens.",
                forms=_JSON_TEXT),
            "/api/v2/models": {
                "get": _op("api_v2_models_list", "List the models this key may use (system "
                           "admins also see their configuration; `all=true`: every "
                           "configured model)", s.ModelList, tag="Models",
                           params=[_ALL], errors=("400", "401", "403")),
                "post": _op("api_v2_models_create", "Configure a model (system admins)",
                            s.Model, tag="Models", status="201", body=s.ModelCreate),
            },
            "/api/v2/models/{model}": {
                "parameters": [_path("model", "string")],
                "get": _op("api_v2_models_retrieve", "Describe one model", s.Model,
                           tag="Models", params=[_ALL], errors=("400", "401", "403", "404")),
                "patch": _op("api_v2_models_update", "Change a model (system admins)",
                             s.Model, tag="Models", body=s.ModelUpdate),
                "delete": _op("api_v2_models_delete", "Delete a model (system admins)",
                              s.Deleted, tag="Models", errors=("401", "403", "404")),
            },
            "/api/v2/models/{model}/replicas": {
                "parameters": [_path("model", "string")],
                "get": _op("api_v2_models_replicas_list", "The model's replicas and, as "
                           "this gateway process sees them, their state, in-flight "
                           "requests, latency and errors (system admins)", s.ReplicaList,
                           tag="Models", errors=("401", "403", "404")),
                "post": _op("api_v2_models_replicas_create", "Add a replica (system admins)",
                            s.Replica, tag="Models", status="201", body=s.ReplicaCreate),
            },
            "/api/v2/models/{model}/replicas/{replica}": {
                "parameters": [_path("model", "string"), _path("replica", "integer")],
                "patch": _op("api_v2_models_replicas_update", "Change a replica: its URL, "
                             "weight, key, or take it out of rotation with draining "
                             "(system admins)", s.Replica, tag="Models",
                             body=s.ReplicaUpdate),
                "delete": _op("api_v2_models_replicas_delete", "Remove a replica, not the "
                              "model's last (system admins)", s.Deleted, tag="Models",
                              errors=("401", "403", "404", "409")),
            },
            **_admin_paths(),
            "/api/v2/status": {"get": _op(
                "api_v2_status", "Platform status: each model the key may use and whether "
                "it can take a request now (system admins also see its replicas' states)",
                s.Status, tag="Platform Status", errors=("401",))},
            "/ready": {"get": {
                "summary": "Readiness (public), and why: 503 before the first view of keys "
                           "and models has loaded, while shutting down, and while that "
                           "view is older than PARAGATE_MAX_VIEW_AGE (requests are "
                           "refused then)", "operationId": "ready",
                "responses": {code: {"description": what, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Ready"}}}}
                    for code, what in (("200", "Send traffic (`ready`)."),
                                       ("503", "Do not send traffic (`starting`, "
                                        "`draining`, `stale`)."))},
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (text exposition format 0.0.4): for an "
                           "admin's key, or PARAGATE_METRICS_TOKEN as the bearer token "
                           "(docs/observability.md lists every metric)",
                "operationId": "metrics",
                "security": [{"bearerAuth": []}],
                "responses": {
                    "200": {"description": "Every metric, all workers added up.",
                            "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "401": _error_response("No key or token, or a wrong one."),
                    "403": _error_response("A key that is not a system admin's."),
                    "404": _error_response("Metrics are off (PARAGATE_METRICS=false)."),
                },
            }},
            "/health": {"get": {
                "summary": "Liveness (public): 200 while the process serves, whatever its "
                           "store or its models do", "operationId": "health",
                "responses": {"200": {"description": "The process serves.", "content": {
                    "application/json": {"schema": _HEALTH}}}},
            }},
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                **_generated(),
                "CompletionsRequest": request_schema,
                "ChatCompletionsRequest": _request(chat.FIELDS, "chat completions",
                                                   "messages"),
                "EmbeddingsRequest": _request(embeddings.FIELDS, "embeddings", "input"),
                "TokenizeRequest": _request(tokenize.FIELDS, "tokenize"),
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
