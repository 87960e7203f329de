"""The served OpenAPI document describes what the code accepts and returns."""

from __future__ import annotations

from typing import Any

import httpx

from paragate.app import ROUTES
from paragate.protocol import FIELDS
from paragate.routes import OPERATIONS

from .conftest import Keys

# The seed's schemas (shared/seed: Paradigm API v2, POST /api/v2/completions).
SEED_REQUEST = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream",
                "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty",
                "best_of", "logit_bias", "user", "suffix"}
SEED_RESPONSE_REQUIRED = {"choices", "created", "id", "model", "object"}
SEED_USAGE_REQUIRED = {"completion_tokens", "prompt_tokens", "total_tokens"}


async def test_openapi_document(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/api/v2/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    request = schemas["CompletionsRequest"]
    assert set(request["properties"]) == {f.name for f in FIELDS}
    assert set(request["properties"]) >= SEED_REQUEST
    assert request["properties"]["temperature"]["maximum"] == 2
    assert request["properties"]["top_p"]["exclusiveMinimum"] is True
    assert set(schemas["CompletionsResponse"]["required"]) == SEED_RESPONSE_REQUIRED
    assert set(schemas["CompletionUsage"]["required"]) == SEED_USAGE_REQUIRED
    assert set(schemas["Error"]["properties"]["error"]["required"]) == {
        "message", "type", "param", "code"}
    post = doc["paths"]["/api/v2/completions"]["post"]
    assert set(post["requestBody"]["content"]) == {
        "application/json", "application/x-www-form-urlencoded", "multipart/form-data"}
    assert {"400", "401", "404", "405", "413", "415", "429", "502", "503", "504"} <= set(
        post["responses"])
    documented = {p for p in doc["paths"]}
    served = {p for p in ROUTES if p != "/api/v2/openapi.json"}
    assert documented == served


# The seed's type of each request field; ours must accept at least that type.
SEED_TYPES = {"model": "string", "prompt": "string", "max_tokens": "integer",
              "temperature": "number", "top_p": "number", "n": "integer", "stream": "boolean",
              "logprobs": "integer", "echo": "boolean", "stop": "array",
              "presence_penalty": "number", "frequency_penalty": "number",
              "best_of": "integer", "logit_bias": "object", "user": "string",
              "suffix": "string"}
_PY_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
             "array": list, "object": dict}


def _types(schema: dict[str, Any]) -> set[str]:
    alternatives = schema.get("oneOf") or schema.get("anyOf") or [schema]
    return {a["type"] for a in alternatives if "type" in a}


def conforms(doc: dict[str, Any], schema: dict[str, Any], value: Any, where: str) -> None:
    """Check ``value`` against the subset of OpenAPI 3.0 the document uses."""
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    for part in schema.get("allOf", []):
        conforms(doc, part, value, where)
    if value is None:
        assert schema.get("nullable") or "type" not in schema, f"{where}: null"
        return
    if "oneOf" in schema or "anyOf" in schema:
        errors = 0
        for alternative in schema.get("oneOf") or schema["anyOf"]:
            try:
                conforms(doc, alternative, value, where)
            except AssertionError:
                errors += 1
        assert errors < len(schema.get("oneOf") or schema["anyOf"]), f"{where}: no match"
        return
    if "type" in schema:
        wanted = _PY_TYPES[schema["type"]]
        assert isinstance(value, wanted) and not (
            schema["type"] in ("integer", "number") and isinstance(value, bool)
        ), f"{where}: {value!r} is not {schema['type']}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    for name in schema.get("required", []):
        assert name in value, f"{where}: {name} missing"
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                conforms(doc, sub, value[name], f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            conforms(doc, schema["items"], item, f"{where}[{i}]")


async def test_request_fields_take_the_seeds_types(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/api/v2/openapi.json")).json()
    properties = doc["components"]["schemas"]["CompletionsRequest"]["properties"]
    for name, seed_type in SEED_TYPES.items():
        assert seed_type in _types(properties[name]), name


async def test_real_answers_match_the_document(client: httpx.AsyncClient, keys: Keys) -> None:
    doc = (await client.get("/api/v2/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    headers = {"Authorization": f"Bearer {keys.full}"}
    done = await client.post("/api/v2/completions", headers=headers, json={
        "model": "alfred-4.2", "prompt": "Hi", "max_tokens": 3, "n": 2, "logprobs": 1})
    assert done.status_code == 200, done.text
    conforms(doc, schemas["CompletionsResponse"], done.json(), "completion")
    listed = await client.get("/api/v2/models", headers=headers)
    conforms(doc, schemas["ModelList"], listed.json(), "models")
    for bad in ({"model": "alfred-4.2", "prompt": "x", "temperature": 9},
                {"model": "nope", "prompt": "x"}):
        refused = await client.post("/api/v2/completions", headers=headers, json=bad)
        assert str(refused.status_code) in doc["paths"]["/api/v2/completions"]["post"][
            "responses"]
        conforms(doc, schemas["Error"], refused.json(), "error")
    conforms(doc, schemas["Error"], (await client.get("/api/v2/models")).json(), "401")


async def test_admin_answers_match_the_document(client: httpx.AsyncClient,
                                                keys: Keys) -> None:
    """Every admin operation, called as the system admin: each answer conforms to the
    schema the document gives for its status."""
    doc = (await client.get("/api/v2/openapi.json")).json()
    root = {"Authorization": f"Bearer {keys.admin}"}
    seen: set[tuple[str, str]] = set()

    async def call(method: str, template: str, path: str, body: Any = None) -> Any:
        r = await client.request(method, path, headers=root, json=body)
        op = doc["paths"][template][method.lower()]
        answer = op["responses"].get(str(r.status_code))
        assert answer is not None, f"{method} {path}: {r.status_code} is not documented"
        schema = answer["content"]["application/json"]["schema"]
        conforms(doc, schema, r.json(), f"{method} {template}")
        seen.add((method.lower(), template))
        return r.json()

    company = (await call("POST", "/api/v2/companies", "/api/v2/companies",
                          {"name": "ACME"}))["id"]
    await call("GET", "/api/v2/companies", "/api/v2/companies")
    one = "/api/v2/companies/{id}"
    await call("GET", one, f"/api/v2/companies/{company}")
    await call("PATCH", one, f"/api/v2/companies/{company}", {"name": "ACME 2"})
    user = (await call("POST", "/api/v2/users", "/api/v2/users",
                       {"company_id": company, "email": "a@acme.example"}))["id"]
    await call("GET", "/api/v2/users", "/api/v2/users?company_id=1")
    await call("GET", "/api/v2/users/{id}", f"/api/v2/users/{user}")
    await call("PATCH", "/api/v2/users/{id}", f"/api/v2/users/{user}", {"key_manager": True})
    key = (await call("POST", "/api/v2/api-keys", "/api/v2/api-keys",
                      {"name": "k", "user_id": user}))["id"]
    await call("GET", "/api/v2/api-keys", "/api/v2/api-keys?state=active")
    await call("GET", "/api/v2/api-keys/{id}", f"/api/v2/api-keys/{key}")
    await call("PATCH", "/api/v2/api-keys/{id}", f"/api/v2/api-keys/{key}", {"name": "k2"})
    await call("POST", "/api/v2/api-keys/{id}/rotate", f"/api/v2/api-keys/{key}/rotate")
    await call("DELETE", "/api/v2/api-keys/{id}", f"/api/v2/api-keys/{key}")
    await call("POST", "/api/v2/api-keys", "/api/v2/api-keys", {"name": ""})  # a 400
    made = await call("POST", "/api/v2/models", "/api/v2/models",
                      {"name": "m", "upstream_url": "http://h/v1", "companies": [company],
                       "limits": {"max_logprobs": 3}, "log_payloads": True})
    assert made["log_payloads"] is True
    for name, default in (("ModelCreate", {"default": False}), ("ModelUpdate", {}),
                          ("Model", {})):
        field = doc["components"]["schemas"][name]["properties"]["log_payloads"]
        assert field == {"type": "boolean", **default}, name
    await call("GET", "/api/v2/models", "/api/v2/models?all=true")
    await call("GET", "/api/v2/models/{model}", "/api/v2/models/m?all=true")
    await call("PATCH", "/api/v2/models/{model}", "/api/v2/models/m", {"enabled": False})
    replicas = "/api/v2/models/{model}/replicas"
    replica = (await call("POST", replicas, "/api/v2/models/m/replicas",
                          {"url": "http://h2/v1", "weight": 2}))["id"]
    await call("GET", replicas, "/api/v2/models/m/replicas")
    await call("POST", replicas, "/api/v2/models/m/replicas", {"weight": 0})  # a 400
    one_replica = replicas + "/{replica}"
    await call("PATCH", one_replica, f"/api/v2/models/m/replicas/{replica}",
               {"draining": True})
    await call("DELETE", one_replica, f"/api/v2/models/m/replicas/{replica}")
    await call("DELETE", one_replica, "/api/v2/models/m/replicas/1")  # the last: a 409
    await call("DELETE", "/api/v2/models/{model}", "/api/v2/models/m")
    await call("GET", "/api/v2/audit-log", "/api/v2/audit-log?action=user.")
    await call("GET", "/api/v2/me", "/api/v2/me")
    await call("GET", "/api/v2/reporting/usage", "/api/v2/reporting/usage?group_by=key,model")
    await call("GET", "/api/v2/reporting/usage", "/api/v2/reporting/usage?bucket=week")
    await call("GET", "/ready", "/ready")
    await call("GET", "/health", "/health")
    await call("GET", "/api/v2/status", "/api/v2/status")
    await call("DELETE", "/api/v2/users/{id}", f"/api/v2/users/{user}")
    await call("DELETE", one, f"/api/v2/companies/{company}")
    await call("DELETE", one, "/api/v2/companies/1")  # a 409
    metrics = await client.get("/metrics", headers=root)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "200" in doc["paths"]["/metrics"]["get"]["responses"]
    seen.add(("get", "/metrics"))  # text, not JSON: checked here
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops
                  if m != "parameters" and p not in OPERATIONS}
    assert documented - seen == set()
