"""The control plane in front of real vLLM: a system admin enables a model for one
company through the admin API, hands a key to one of its users, and revokes it; the
official `openai` SDK is the client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from paragate import control
from paragate.control import Actor
from paragate.control.users import SYSTEM_ADMIN
from paragate.store import Store

from .conftest import SERVED_NAME, Stack

pytestmark = pytest.mark.e2e


def test_a_company_model_a_user_key_and_its_revocation(stack: Stack) -> None:
    store = Store(stack.gateway.env["PARAGATE_DATABASE_URL"])
    root = control.keys.create(store, Actor.cli(), name="e2e root", builtin=SYSTEM_ADMIN)
    store.close()
    admin = {"Authorization": f"Bearer {root.secret}"}
    base = stack.gateway.url + "/api/v2"
    with httpx.Client(base_url=base, headers=admin, timeout=30) as http:
        deadline = time.monotonic() + 5  # the gateway polls its SQLite store
        while http.get("/me").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        company = http.post("/companies", json={"name": "e2e ACME"}).json()["id"]
        user = http.post("/users", json={"company_id": company, "email": "e2e@acme.example",
                                         "key_manager": True}).json()["id"]
        r = http.post("/models", json={"name": "acme-alfred", "upstream_url":
                                       stack.vllm.base_url, "upstream_model": SERVED_NAME,
                                       "companies": [company]})
        assert r.status_code == 201, r.text
        made = http.post("/api-keys", json={"name": "ana", "user_id": user})
        assert made.status_code == 201, made.text
        key, key_id = made.json()["key"], made.json()["id"]
        try:
            sdk = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
            done = sdk.completions.create(model="acme-alfred", prompt="def main(",
                                          max_tokens=8, temperature=0)
            assert done.model == "acme-alfred" and done.usage is not None
            assert done.usage.completion_tokens == 8
            texts = [c.choices[0].text for c in sdk.completions.create(
                model="acme-alfred", prompt="def main(", max_tokens=8, temperature=0,
                stream=True) if c.choices]
            assert "".join(texts) == done.choices[0].text
            assert [m.id for m in sdk.models.list().data] == ["acme-alfred", "alfred-4.2"]
            # the default company's key does not see the model at all
            default = openai.OpenAI(base_url=base, api_key=stack.key, max_retries=0)
            with pytest.raises(openai.NotFoundError):
                default.completions.create(model="acme-alfred", prompt="x", max_tokens=1)
            assert http.delete(f"/api-keys/{key_id}").status_code == 200
            revoked_at = time.monotonic()
            with pytest.raises(openai.AuthenticationError):
                sdk.completions.create(model="acme-alfred", prompt="x", max_tokens=1)
            assert time.monotonic() - revoked_at < 1.0
        finally:
            http.delete("/models/acme-alfred")
            http.delete(f"/companies/{company}")
