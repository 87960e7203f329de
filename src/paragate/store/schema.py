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
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)

__all__ = ["api_keys", "config_state", "metadata", "models", "usage_records"]


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

# One row, id 1. Every change to keys or models bumps `version` in the same transaction,
# so a running gateway reloads its in-memory view by polling one integer.
config_state = Table(
    "config_state",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", BigInteger, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("secret_hash", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("is_admin", Boolean, nullable=False, default=False),
    # null: every model; else a JSON list of model names this key may use.
    Column("allowed_models", JSON, nullable=True),
    # null: no limit; else requests per minute (see limits.py)
    Column("rate_limit_rpm", Integer, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
)

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("display_name", String(200), nullable=False),
    Column("type", String(32), nullable=False),
    Column("upstream_url", Text, nullable=False),
    Column("upstream_model", String(200), nullable=False),
    Column("upstream_api_key", Text, nullable=True),
    Column("enabled", Boolean, nullable=False),
    Column("max_logprobs", Integer, nullable=True),
    Column("default_max_tokens", Integer, nullable=True),
    Column("max_tokens_limit", Integer, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

usage_records = Table(
    "usage_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False, index=True),
    Column("key_id", Integer, nullable=True),
    Column("model", String(200), nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("status", Integer, nullable=False),
    # ok | client_disconnected | upstream_error | error
    Column("outcome", String(32), nullable=False),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("total_tokens", Integer, nullable=True),
    Column("duration_ms", Integer, nullable=False),
)
