"""Tables, as SQLAlchemy Core metadata. Alembic migrations create them; this module is
what the code queries through, and a test checks the two agree."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)

__all__ = [
    "CONFIG_TABLES",
    "api_keys",
    "audit_log",
    "companies",
    "config_state",
    "metadata",
    "models",
    "usage_records",
    "users",
]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value  # type: ignore[no-any-return]


metadata = MetaData()

_LIVE = text("deleted_at IS NULL")


def _live_unique(name: str, *columns: str) -> Index:
    """Unique among the rows not deleted: a deleted company's name, a deleted user's email
    or a deleted model's name may be used again, while the old row keeps its history."""
    return Index(name, *columns, unique=True, sqlite_where=_LIVE, postgresql_where=_LIVE)


# One row, id 1. Every change to the control plane bumps `version` in the same
# transaction and stamps the rows it changed with the new value (their `version`
# column), so a running gateway applies a change by reading the rows newer than the
# version it holds, never by reloading every table.
config_state = Table(
    "config_state",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", BigInteger, nullable=False),
)

companies = Table(
    "companies",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("builtin", Boolean, nullable=False),  # the default company
    Column("version", BigInteger, nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime, nullable=True),
    _live_unique("uq_companies_live_name", "name"),
    sqlite_autoincrement=True,  # an id is never reused: history refers to it
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("company_id", Integer, ForeignKey("companies.id"), nullable=False, index=True),
    Column("email", String(320), nullable=False),  # stored lower-case
    Column("name", String(200), nullable=False),
    Column("role", String(20), nullable=False),  # admin | company_admin | user
    Column("key_manager", Boolean, nullable=False),
    # null, or the built-in user this row is: system_admin | default_user
    Column("builtin", String(20), nullable=True, unique=True),
    Column("version", BigInteger, nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime, nullable=True),
    _live_unique("uq_users_live_email", "email"),
    sqlite_autoincrement=True,
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("secret_hash", String(64), nullable=False),
    # the secret a rotation replaced, accepted until `previous_expires_at`
    Column("previous_hash", String(64), nullable=True),
    Column("previous_expires_at", UTCDateTime, nullable=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    # null: every model the key's company may use; else a JSON list of model ids
    Column("model_ids", JSON, nullable=True),
    # null: no limit; else requests per minute (see limits.py)
    Column("rate_limit_rpm", Integer, nullable=True),
    Column("usage_opt_in", Boolean, nullable=False),
    Column("version", BigInteger, nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    # written in batches by the gateways, never per request; not a config change
    Column("last_used_at", UTCDateTime, nullable=True),
)

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("display_name", String(200), nullable=False),
    Column("type", String(32), nullable=False),
    Column("upstream_url", Text, nullable=False),
    Column("upstream_model", String(200), nullable=False),
    Column("upstream_api_key", Text, nullable=True),
    Column("enabled", Boolean, nullable=False),
    # null: enabled for every company; else a JSON list of company ids
    Column("company_ids", JSON, nullable=True),
    Column("max_logprobs", Integer, nullable=True),
    Column("default_max_tokens", Integer, nullable=True),
    Column("max_tokens_limit", Integer, nullable=True),
    Column("version", BigInteger, nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime, nullable=True),
    _live_unique("uq_models_live_name", "name"),
    sqlite_autoincrement=True,
)

# Every change made through the admin API or the CLI, written in the change's own
# transaction. `changes` maps a field to [before, after]; secrets are masked.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", UTCDateTime, nullable=False, index=True),
    Column("actor_type", String(16), nullable=False),  # user | cli
    Column("actor_user_id", Integer, nullable=True, index=True),
    Column("actor_key", String(32), nullable=True),  # the public id of the key used
    Column("action", String(64), nullable=False, index=True),
    Column("target_type", String(32), nullable=False),
    Column("target_id", String(200), nullable=False),
    Column("company_id", Integer, nullable=True, index=True),  # whose company it touched
    Column("changes", JSON, nullable=False),
    Column("request_id", String(64), nullable=True),
    Column("client_addr", String(64), nullable=True),
    sqlite_autoincrement=True,
)

usage_records = Table(
    "usage_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False, index=True),
    Column("key_id", Integer, nullable=True),
    Column("user_id", Integer, nullable=True),
    Column("company_id", Integer, nullable=True),
    Column("model_id", Integer, nullable=True),  # stable across renames
    Column("model", String(200), nullable=False),  # the name it had then
    Column("stream", Boolean, nullable=False),
    Column("status", Integer, nullable=False),
    # ok | client_disconnected | upstream_error | error
    Column("outcome", String(32), nullable=False),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("total_tokens", Integer, nullable=True),
    Column("duration_ms", Integer, nullable=False),
)

# The tables whose rows a gateway holds in memory, in the order they are applied.
CONFIG_TABLES = (companies, users, api_keys, models)
