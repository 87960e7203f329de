"""Plain, frozen records the store reads and writes. They know nothing of HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["KeyRecord", "ModelRecord", "Snapshot", "UsageRecord"]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    public_id: str
    secret_hash: str
    name: str
    is_admin: bool
    allowed_models: tuple[str, ...] | None  # None: every model
    rate_limit_rpm: int | None  # None: no limit
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def usable_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class ModelRecord:
    name: str
    upstream_url: str
    upstream_model: str
    display_name: str = ""
    type: str = "llm"
    upstream_api_key: str | None = None
    enabled: bool = True
    max_logprobs: int | None = None
    default_max_tokens: int | None = None
    max_tokens_limit: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the request path needs from the store, read in one transaction."""

    version: int
    keys: tuple[KeyRecord, ...]
    models: tuple[ModelRecord, ...]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    created_at: datetime
    key_id: int | None
    model: str
    stream: bool
    status: int
    outcome: str
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    duration_ms: int
