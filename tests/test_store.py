"""The store on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from paragate import control
from paragate.store import _MIGRATIONS as MIGRATIONS
from paragate.store import Store, UsageRecord
from paragate.store.schema import metadata

from .conftest import CLI, add_model, make_key


def test_migrations_match_the_tables_the_code_uses(store: Store) -> None:
    store.migrate()  # idempotent
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_every_change_bumps_the_version_and_stamps_its_rows(store: Store) -> None:
    v0 = store.version()
    token, public_id = make_key(store, "ci")
    v1 = store.version()
    assert v1 > v0
    changes = store.changes(v0)
    assert changes.version == v1
    assert [k.public_id for k in changes.keys] == [public_id]
    assert [u.builtin for u in changes.users] == ["default_user"]  # made on first use
    assert changes.models == () and changes.companies == ()
    key = changes.keys[0]
    assert key.secret_hash not in token and len(key.secret_hash) == 64
    assert key.created_at.tzinfo is not None and key.version == v1
    assert store.changes(v1).rows == 0
    control.keys.revoke(store, CLI, public_id)
    (revoked,) = store.changes(v1).keys
    assert revoked.revoked_at is not None and revoked.version > v1


def test_a_full_load_is_every_row(store: Store) -> None:
    make_key(store, "k")
    add_model(store, "m", "http://h/v1", "m")
    everything = store.changes(0)
    assert everything.version == store.version()
    assert [k.name for k in everything.keys] == ["k"]
    assert [m.name for m in everything.models] == ["m"]
    assert [c.name for c in everything.companies] == ["Default"]


def test_a_failed_change_leaves_nothing(store: Store) -> None:
    v = store.version()
    with pytest.raises(RuntimeError), store.change(CLI.audit_columns()) as ch:
        ch.audit("test.nothing", "company", 1, 1, {})
        raise RuntimeError("in the middle")
    assert store.version() == v
    assert control.audit.list_(store, CLI, action="test.nothing").data == []


def test_usage_batch(store: Store) -> None:
    now = datetime.now(UTC)
    records = [UsageRecord(request_id=f"r{i}", created_at=now, key_id=1, model="m",
                           stream=bool(i % 2), status=200, outcome="ok", prompt_tokens=i,
                           completion_tokens=2, total_tokens=i + 2, duration_ms=5,
                           user_id=1, company_id=1, model_id=3)
               for i in range(50)]
    assert store.insert_usage(records) == 50
    assert store.insert_usage([]) == 0
    assert store.list_usage() == records


def test_last_used_is_not_a_config_change(store: Store) -> None:
    make_key(store, "k")
    (key,) = store.changes(0).keys
    v = store.version()
    at = datetime.now(UTC)
    store.touch_keys({key.id}, at)
    assert store.version() == v
    (touched,) = store.changes(0).keys
    assert touched.last_used_at is not None
    assert abs(touched.last_used_at.timestamp() - at.timestamp()) < 1e-3


def test_postgres_url_without_driver_uses_psycopg() -> None:
    assert Store("postgresql://u@h/db").url.drivername == "postgresql+psycopg"


def _alembic(url: str, step: str, revision: str) -> None:
    """Run one of alembic's commands (``upgrade``, ``downgrade``) on the store at ``url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(Store(url).url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, step)(cfg, revision)
    engine.dispose()


def _model_columns(url: str) -> set[str]:
    engine = create_engine(Store(url).url)
    try:
        return {c["name"] for c in inspect(engine).get_columns("models")}
    finally:
        engine.dispose()


def test_migration_0007_adds_log_payloads_off(store_url: str) -> None:
    """A model configured before 0007 keeps its prompts out of the log; 0007 goes down
    and up again cleanly."""
    _alembic(store_url, "upgrade", "0006")
    assert "log_payloads" not in _model_columns(store_url)
    engine = create_engine(Store(store_url).url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO models (name, display_name, type, upstream_url, upstream_model, "
            "enabled, version, created_at, updated_at) VALUES ('old', 'Old', 'llm', "
            "'http://h/v1', 'old', true, 1, :t, :t)"), {"t": "2026-11-30 10:00:00+00:00"})
    engine.dispose()
    store = Store(store_url)
    try:
        store.migrate()
        (old,) = store.changes(0).models
        assert old.name == "old" and old.log_payloads is False
        control.models.update(store, CLI, "old", log_payloads=True)
        assert control.models.get(store, CLI, "old").log_payloads is True
    finally:
        store.close()
    _alembic(store_url, "downgrade", "0006")
    assert "log_payloads" not in _model_columns(store_url)
    _alembic(store_url, "upgrade", "head")
    assert "log_payloads" in _model_columns(store_url)
    store = Store(store_url)
    try:
        assert store.changes(0).models[0].log_payloads is False  # the default again
    finally:
        store.close()

