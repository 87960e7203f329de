"""The served OpenAPI document describes what the code accepts and returns."""

from __future__ import annotations

import httpx

from paragate.app import ROUTES
from paragate.protocol import FIELDS

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
