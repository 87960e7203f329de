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
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
    text,
)

__all__ = [
    "CONFIG_TABLES",
    "HISTOGRAM_BUCKETS",
    "LATENCY_BOUNDS",
    "ROLLUP_DIMS",
    "api_keys",
    "audit_log",
    "companies",
    "config_state",
    "limit_counters",
    "metadata",
    "model_replicas",
    "models",
    "usage_daily",
    "usage_daily_company",
    "usage_hourly",
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
    # null: no limits; else a JSON object of those set (see limits/spec.py)
    Column("rate_limits", JSON, nullable=True),
    # may its keys set vLLM's scheduling fields (``priority``)
    Column("allow_priority", Boolean, nullable=False, server_default=false()),
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
    Column("rate_limits", JSON, nullable=True),
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
    # null: no limits; else a JSON object of those set (``rpm`` was ``rate_limit_rpm``)
    Column("rate_limits", JSON, nullable=True),
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
    # seconds; null: the gateway's defaults (PARAGATE_UPSTREAM_CONNECT_TIMEOUT,
    # PARAGATE_UPSTREAM_READ_TIMEOUT for the first byte and between chunks; no total)
    Column("connect_timeout", Float, nullable=True),
    Column("first_byte_timeout", Float, nullable=True),
    Column("idle_timeout", Float, nullable=True),
    Column("total_timeout", Float, nullable=True),
    # which replica a request goes to: none (the least loaded), prefix (requests whose
    # prompts start alike go to the same one), user (the same `user` field, same one)
    Column("affinity", String(16), nullable=False, server_default="none"),
    # a model's limits apply to all its callers together
    Column("rate_limits", JSON, nullable=True),
    # what one request may ask for; null: the gateway's defaults (PARAGATE_MAX_PROMPTS,
    # PARAGATE_MAX_N, PARAGATE_MAX_REQUEST_TOKENS)
    Column("max_prompts", Integer, nullable=True),
    Column("max_n", Integer, nullable=True),
    Column("max_request_tokens", Integer, nullable=True),
    # prompts and completions of its requests are written to the gateway's log (off:
    # never); a gateway warns at start-up and on every change of the models that do
    Column("log_payloads", Boolean, nullable=False, server_default=false()),
    Column("version", BigInteger, nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime, nullable=True),
    _live_unique("uq_models_live_name", "name"),
    sqlite_autoincrement=True,
)

# The vLLM servers behind a model: each a base URL (as models.upstream_url, e.g.
# http://host:8000/v1), its weight among the others, its own upstream API key, and an
# administrator's switches. `health_url` overrides where /health and /metrics are read
# (by default the URL without a trailing /v1). A model made with one upstream has that
# one replica; models.upstream_url and upstream_api_key stay as its first replica's.
model_replicas = Table(
    "model_replicas",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("weight", Integer, nullable=False),
    Column("upstream_api_key", Text, nullable=True),
    Column("enabled", Boolean, nullable=False),
    Column("draining", Boolean, nullable=False),
    Column("health_url", Text, nullable=True),
    # the URL's host is a DNS name whose addresses are the replicas (a Kubernetes
    # headless Service): resolved again every PARAGATE_DNS_INTERVAL seconds
    Column("discover", Boolean, nullable=False, server_default=false()),
    Column("version", BigInteger, nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime, nullable=True),
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
    # ok | error | upstream_error | client_disconnected | shutdown
    Column("outcome", String(32), nullable=False),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("total_tokens", Integer, nullable=True),
    Column("duration_ms", Integer, nullable=False),
    Column("client_request_id", String(128), nullable=True),
    Column("endpoint", String(64), nullable=False, server_default="/api/v2/completions"),
    Column("upstream", String(500), nullable=True),
    Column("n", Integer, nullable=False, server_default="1"),
    Column("error_type", String(64), nullable=True),
    Column("partial", Boolean, nullable=False, server_default=false()),
    Column("cached_tokens", Integer, nullable=True),
    Column("ttft_ms", Integer, nullable=True),
    Column("gateway_us", BigInteger, nullable=True),
    # the histogram buckets (below) of duration_ms and ttft_ms, so that the rollups'
    # sums are one comparison each
    Column("lat_bucket", SmallInteger, nullable=False, server_default="0"),
    Column("ttft_bucket", SmallInteger, nullable=True),
)

# Histogram buckets of the rolled-up latencies, in milliseconds: bucket 0 holds [0, 1),
# bucket k (1..40) [2^((k-1)/2), 2^(k/2)), bucket 41 everything from 2^20 ms (17 min).
# Percentiles cannot be added up; bucket counts can, and a percentile read from them
# (interpolated inside its bucket) is within the bucket's width, 41%, of the truth.
LATENCY_BOUNDS: tuple[float, ...] = tuple(2 ** (k / 2) for k in range(41))
HISTOGRAM_BUCKETS = len(LATENCY_BOUNDS) + 1


def _histogram(prefix: str) -> list[Column[Any]]:
    return [Column(f"{prefix}{i}", BigInteger, nullable=False, server_default="0")
            for i in range(HISTOGRAM_BUCKETS)]


def _rollup(name: str, *dims: Column[Any]) -> Table:
    """Sums of the usage records per time bucket (epoch seconds, UTC) and dimensions,
    kept by the usage writer in the transaction that inserts the records, from the rows
    actually inserted (so a retried batch adds nothing twice). Never pruned."""
    dim_names = [d.name for d in dims]
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("bucket", BigInteger, nullable=False),
        *dims,
        Column("requests", BigInteger, nullable=False),
        Column("errors", BigInteger, nullable=False),
        Column("partial", BigInteger, nullable=False),
        Column("prompt_tokens", BigInteger, nullable=False),
        Column("completion_tokens", BigInteger, nullable=False),
        Column("cached_tokens", BigInteger, nullable=False),
        Column("duration_ms", BigInteger, nullable=False),  # their sum
        *_histogram("lat"),
        *_histogram("ttft"),
        Index(f"uq_{name}", "bucket", *dim_names, unique=True),
        sqlite_autoincrement=True,
    )


def _dims(*names: str) -> list[Column[Any]]:
    kinds: dict[str, Any] = {"company_id": Integer, "user_id": Integer, "key_id": Integer,
                             "model": String(200), "month": BigInteger}
    # 0 and "" stand for none (a request that named no usable model), so that the
    # unique index sees one value; reports show them as null.
    return [Column(n, kinds[n], nullable=False) for n in names]


ROLLUP_DIMS = ("company_id", "user_id", "key_id", "model")
# hourly and daily sums per key and model; daily per company and model, for the
# reports that need no finer grain (the common ones: by company, by model).
usage_hourly = _rollup("usage_hourly", *_dims(*ROLLUP_DIMS))
usage_daily = _rollup("usage_daily", *_dims(*ROLLUP_DIMS, "month"))
usage_daily_company = _rollup("usage_daily_company", *_dims("company_id", "model", "month"))

# The committed tokens of each daily and monthly budget, for the in-process limiter
# (the Redis one keeps them in Redis): scope k | u | c | m, the scope's id, and the
# period ("2026-12-01" a UTC day, "2026-12" a UTC month). Only ever added to.
limit_counters = Table(
    "limit_counters",
    metadata,
    Column("scope", String(1), primary_key=True),
    Column("scope_id", Integer, primary_key=True),
    Column("period", String(10), primary_key=True),
    Column("tokens", BigInteger, nullable=False),
)

# The tables whose rows a gateway holds in memory, in the order they are applied.
CONFIG_TABLES = (companies, users, api_keys, models, model_replicas)
