"""What the fuzzing tier (tests/test_fuzz.py) found, each kept as a plain regression
test that failed on the code before its fix, on SQLite and PostgreSQL."""

from __future__ import annotations

import httpx
import pytest

from .conftest import Keys
from .test_completions import auth

# '³' and '٣' are digits to str.isdigit() but not to int(): an id or an integer query
# parameter made of them was a 500 (ValueError) before the ASCII check
NOT_ASCII_DIGITS = ["\u00b3", "\u0663", "1\u00b2"]


@pytest.mark.parametrize("raw", NOT_ASCII_DIGITS)
@pytest.mark.parametrize("path", ["/api/v2/users/{}", "/api/v2/companies/{}",
                                  "/api/v2/models/alfred-4.2/replicas/{}"])
async def test_an_id_of_digits_that_are_not_ascii_names_nothing(
        client: httpx.AsyncClient, keys: Keys, path: str, raw: str) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        r = await client.request(method, path.format(raw), headers=auth(keys.admin),
                                 json={} if method == "PATCH" else None)
        if r.status_code == 405:
            continue
        assert r.status_code == 404, (method, r.text)
        assert r.json()["error"]["code"] in ("not_found", "replica_not_found"), r.text


@pytest.mark.parametrize("raw", NOT_ASCII_DIGITS)
@pytest.mark.parametrize("path", ["/api/v2/companies", "/api/v2/users", "/api/v2/audit-log"])
async def test_an_integer_query_parameter_of_digits_that_are_not_ascii_is_a_400(
        client: httpx.AsyncClient, keys: Keys, path: str, raw: str) -> None:
    r = await client.get(path, headers=auth(keys.admin), params={"after": raw})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": "'after' must be an integer.",
                                 "type": "invalid_request_error", "param": "after",
                                 "code": "invalid_type"}


@pytest.mark.parametrize("raw", [*NOT_ASCII_DIGITS, "9" * 30])
async def test_an_audit_actor_of_digits_that_are_not_ascii_is_a_key_id(
        client: httpx.AsyncClient, keys: Keys, raw: str) -> None:
    r = await client.get("/api/v2/audit-log", headers=auth(keys.admin),
                         params={"actor": raw})
    assert r.status_code == 200, r.text
    assert r.json()["data"] == []


@pytest.mark.parametrize("priority", [False, True, 1.5, "1"])
async def test_priority_must_be_an_integer(client: httpx.AsyncClient, keys: Keys,
                                           priority: object) -> None:
    """``false == 0`` in Python: a boolean priority passed the check and went to vLLM."""
    r = await client.post("/api/v2/completions", headers=auth(keys.full), json={
        "model": "alfred-4.2", "prompt": "x", "max_tokens": 1, "priority": priority})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "priority"
    assert r.json()["error"]["code"] == "invalid_type"


@pytest.mark.parametrize("field", ["echo", "seed", "temperature", "logit_bias"])
async def test_a_form_null_is_an_unset_field(client: httpx.AsyncClient, keys: Keys,
                                             field: str) -> None:
    """The document says these fields are nullable; a form's ``null`` was refused as
    not a boolean (or number, or object)."""
    for files in (None, {"prompt": (None, "x")}):
        data = {"model": "alfred-4.2", "max_tokens": "1", field: "null"}
        if files is None:
            data["prompt"] = "x"
        r = await client.post("/api/v2/completions", headers=auth(keys.full), data=data,
                              files=files)
        assert r.status_code == 200, r.text


async def test_a_logit_bias_key_of_digits_that_are_not_ascii_is_refused(
        client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.post("/api/v2/completions", headers=auth(keys.full), json={
        "model": "alfred-4.2", "prompt": "x", "logit_bias": {"\u00b3": 1}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias"


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/v2/completions", {"model": "alfred-4.2", "prompt": "x",
                             "return_tokens_as_token_ids": 1}, "return_tokens_as_token_ids"),
    ("/api/v2/chat/completions", {"model": "alfred-4.2", "chat_template_kwargs": [],
                                  "messages": [{"role": "user", "content": "x"}]},
     "chat_template_kwargs"),
    ("/api/v2/embeddings", {"model": "embedder", "input": "x", "normalize": "yes"},
     "normalize"),
])
async def test_vllms_own_fields_are_held_to_their_documented_type(
        client: httpx.AsyncClient, keys: Keys, path: str, body: dict[str, object],
        field: str) -> None:
    """They went to vLLM whatever their type; now the type the document gives."""
    r = await client.post(path, headers=auth(keys.full), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    assert r.json()["error"]["code"] == "invalid_type"
