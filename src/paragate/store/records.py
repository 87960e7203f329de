"""Plain, frozen records the store reads and writes. They know nothing of HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import msgspec

__all__ = [
    "AuditRecord",
    "Changes",
    "CompanyRecord",
    "KeyRecord",
    "ModelRecord",
    "UsageRecord",
    "UserRecord",
]


@dataclass(frozen=True, slots=True)
class CompanyRecord:
    id: int
    name: str
    builtin: bool
    version: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    rate_limits: dict[str, int] | None = None  # None: none (see limits/spec.py)
    allow_priority: bool = False  # its keys may set vLLM's scheduling fields


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: int
    company_id: int
    email: str
    name: str
    role: str  # admin | company_admin | user
    key_manager: bool
    builtin: str | None  # system_admin | default_user | None
    version: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    rate_limits: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    public_id: str
    secret_hash: str
    previous_hash: str | None  # a rotated-out secret, accepted until previous_expires_at
    previous_expires_at: datetime | None
    user_id: int
    name: str
    model_ids: tuple[int, ...] | None  # None: every model the company may use
    usage_opt_in: bool
    version: int
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    rate_limits: dict[str, int] | None = None

    def usable_at(self, now: datetime) -> bool:
        """Neither revoked nor expired at ``now`` (what counts as an active key)."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class ModelRecord:
    name: str
    upstream_url: str
    upstream_model: str
    display_name: str = ""
    type: str = "llm"
    upstream_api_key: str | None = None  # as stored: encrypted (secrets.py)
    enabled: bool = True
    company_ids: tuple[int, ...] | None = None  # None: every company
    max_logprobs: int | None = None
    default_max_tokens: int | None = None
    max_tokens_limit: int | None = None
    connect_timeout: float | None = None  # seconds; None: the gateway's default
    first_byte_timeout: float | None = None
    idle_timeout: float | None = None
    total_timeout: float | None = None  # None: none
    affinity: str = "none"  # none | prefix | user
    rate_limits: dict[str, int] | None = None  # for all its callers together
    max_prompts: int | None = None  # None: the gateway's default
    max_n: int | None = None
    max_request_tokens: int | None = None
    log_payloads: bool = False  # prompts and completions go to the log
    id: int = 0
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    """One vLLM server behind a model (``schema.model_replicas``)."""

    id: int
    model_id: int
    url: str  # the vLLM base, as a model's upstream_url: http://host:8000/v1
    weight: int
    upstream_api_key: str | None  # as stored (encrypted); decrypted in Store.changes
    enabled: bool
    draining: bool
    health_url: str | None  # where /health and /metrics are; None: url without /v1
    discover: bool  # the URL's host names the replicas: each of its addresses is one
    version: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None

    @property
    def base_url(self) -> str:
        """Where vLLM serves /health, /metrics and /tokenize: its root."""
        return self.base_of(self.url, self.health_url)

    @staticmethod
    def base_of(url: str, health_url: str | None) -> str:
        if health_url:
            return health_url.rstrip("/")
        url = url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    created_at: datetime
    actor_type: str  # user | cli
    actor_user_id: int | None
    actor_key: str | None
    action: str
    target_type: str
    target_id: str
    company_id: int | None
    changes: dict[str, list[object]]
    request_id: str | None
    client_addr: str | None


@dataclass(frozen=True, slots=True)
class Changes:
    """The config rows stamped with a version above ``since``, and the version they
    lead up to (rows above ``version`` may be included too: applying is idempotent)."""

    since: int
    version: int
    companies: tuple[CompanyRecord, ...] = ()
    users: tuple[UserRecord, ...] = ()
    keys: tuple[KeyRecord, ...] = ()
    models: tuple[ModelRecord, ...] = ()
    replicas: tuple[ReplicaRecord, ...] = ()
    # live replicas whose upstream API key none of the secret keys decrypts, in words
    undecryptable: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return (len(self.companies) + len(self.users) + len(self.keys) + len(self.models)
                + len(self.replicas))


class UsageRecord(msgspec.Struct, frozen=True):
    """One authenticated request, whatever became of it (see docs/usage.md). A msgspec
    struct, not a dataclass: one is made on the request path for every request, and a
    frozen dataclass takes microseconds to build.

    ``request_id`` is the gateway's own (unique: the key that makes writes idempotent);
    ``client_request_id`` is the client's ``x-request-id``, kept beside it. Token counts
    are vLLM's own, None when it reported none; ``partial`` marks a request that ended
    before vLLM's final usage (a hang-up, a broken stream, a shutdown)."""

    request_id: str
    created_at: datetime  # when the request arrived
    key_id: int | None
    model: str  # the name the client asked for ("" when the body named none)
    stream: bool
    status: int  # the HTTP status sent (499: the client left before any response)
    outcome: str  # ok | error | upstream_error | client_disconnected | shutdown
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    duration_ms: int  # total latency, arrival to the last byte
    user_id: int | None = None
    company_id: int | None = None
    model_id: int | None = None  # None: the name resolved to no model the key may use
    client_request_id: str | None = None
    endpoint: str = "/api/v2/completions"
    upstream: str | None = None  # the upstream (replica) the request went to
    n: int = 1
    error_type: str | None = None  # the error's code (model_not_found, ...) when not ok
    partial: bool = False
    cached_tokens: int | None = None  # prompt tokens vLLM served from its prefix cache
    ttft_ms: int | None = None  # streams: arrival to the first text sent
    gateway_us: int | None = None  # time spent in paragate, not waiting on the upstream
