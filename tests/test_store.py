"""The store on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from paragate.store import ModelRecord, Store, StoreError, UsageRecord
from paragate.store.schema import metadata

from .conftest import make_key


def test_migrations_match_the_tables_the_code_uses(store: Store) -> None:
    store.migrate()  # idempotent
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_keys(store: Store) -> None:
    v0 = store.version()
    token, public_id = make_key(store, "ci", allowed_models=["a", "b"])
    assert store.version() == v0 + 1
    (key,) = store.list_keys()
    assert key.public_id == public_id and key.name == "ci"
    assert key.allowed_models == ("a", "b")
    assert key.secret_hash not in token and len(key.secret_hash) == 64
    assert key.created_at.tzinfo is not None
    assert store.revoke_key(public_id).revoked_at is not None
    assert store.version() == v0 + 2
    store.revoke_key(public_id)  # revoking twice changes nothing
    assert store.version() == v0 + 2
    with pytest.raises(StoreError):
        store.revoke_key("000000000000")


def test_models(store: Store) -> None:
    m = store.add_model(ModelRecord(name="alfred-4.2", upstream_url="http://h:8000/v1",
                                    upstream_model="served", upstream_api_key="sk-up"))
    assert m.display_name == "alfred-4.2" and m.enabled and m.type == "llm"
    with pytest.raises(StoreError, match="exists"):
        store.add_model(ModelRecord(name="alfred-4.2", upstream_url="x", upstream_model="y"))
    v = store.version()
    m = store.update_model("alfred-4.2", enabled=False, max_tokens_limit=100)
    assert (m.enabled, m.max_tokens_limit, m.upstream_api_key) == (False, 100, "sk-up")
    assert store.version() == v + 1
    store.update_model("alfred-4.2", name="alfred-5")
    assert [x.name for x in store.list_models()] == ["alfred-5"]
    with pytest.raises(StoreError):
        store.update_model("nope", enabled=True)
    with pytest.raises(StoreError, match="unknown"):
        store.update_model("alfred-5", colour="red")
    store.remove_model("alfred-5")
    with pytest.raises(StoreError):
        store.remove_model("alfred-5")
    assert store.list_models() == []


def test_snapshot_is_consistent(store: Store) -> None:
    make_key(store, "k")
    store.add_model(ModelRecord(name="m", upstream_url="http://h/v1", upstream_model="m"))
    snap = store.snapshot()
    assert snap.version == store.version()
    assert [k.name for k in snap.keys] == ["k"] and [m.name for m in snap.models] == ["m"]


def test_usage_batch(store: Store) -> None:
    now = datetime.now(UTC)
    records = [UsageRecord(request_id=f"r{i}", created_at=now, key_id=1, model="m",
                           stream=bool(i % 2), status=200, outcome="ok", prompt_tokens=i,
                           completion_tokens=2, total_tokens=i + 2, duration_ms=5)
               for i in range(50)]
    assert store.insert_usage(records) == 50
    assert store.insert_usage([]) == 0
    assert store.list_usage() == records


def test_postgres_url_without_driver_uses_psycopg() -> None:
    assert Store("postgresql://u@h/db").url.drivername == "postgresql+psycopg"
