"""The control plane's request bodies and answers, as msgspec structs.

The admin API decodes bodies into the request structs (strict types, unknown fields
refused) and renders answers from the response structs; the OpenAPI document is
generated from the same structs, so the three cannot drift apart. The checks that go
beyond types (lengths, formats, scope) are the control layer's, shared with the CLI.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

__all__ = [
    "REQUESTS",
    "RESPONSES",
    "ApiKey",
    "ApiKeyList",
    "AuditEntry",
    "AuditEntryList",
    "Company",
    "CompanyList",
    "Deleted",
    "Me",
    "Model",
    "ModelList",
    "RateLimits",
    "RateLimitsBody",
    "Ready",
    "Replica",
    "ReplicaCreate",
    "ReplicaList",
    "ReplicaUpdate",
    "Status",
    "User",
    "UserList",
]

Role = Literal["admin", "company_admin", "user"]


class _Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    pass


# -- requests ------------------------------------------------------------------------------


class RateLimitsBody(_Body):
    """Limits on a key, a user, a company or a model (docs/limits.md). On create, each
    given is set; on update, each given replaces the current one and null removes it."""

    rpm: int | UnsetType | None = UNSET  # requests per minute
    tpm: int | UnsetType | None = UNSET  # tokens (prompt + completion) per minute
    max_concurrent: int | UnsetType | None = UNSET  # requests in flight at once
    daily_tokens: int | UnsetType | None = UNSET  # tokens per UTC day
    monthly_tokens: int | UnsetType | None = UNSET  # tokens per UTC month


class CompanyCreate(_Body):
    name: str
    rate_limits: RateLimitsBody | None = None
    allow_priority: bool = False  # its keys may set vLLM's `priority`


class CompanyUpdate(_Body):
    name: str | UnsetType = UNSET
    rate_limits: RateLimitsBody | UnsetType | None = UNSET
    allow_priority: bool | UnsetType = UNSET


class UserCreate(_Body):
    email: str
    company_id: int | None = None  # default: the caller's company
    name: str = ""
    role: Role = "user"
    key_manager: bool = False
    rate_limits: RateLimitsBody | None = None


class UserUpdate(_Body):
    email: str | UnsetType = UNSET
    name: str | UnsetType = UNSET
    role: Role | UnsetType = UNSET
    key_manager: bool | UnsetType = UNSET
    rate_limits: RateLimitsBody | UnsetType | None = UNSET


class ApiKeyCreate(_Body):
    name: str
    user_id: int | None = None  # default: the caller
    models: list[str] | None = None  # default: every model the company may use
    # Unix time; absent: PARAGATE_DEFAULT_KEY_DAYS from now; null: never
    expires_at: int | UnsetType | None = UNSET
    usage_opt_in: bool = True
    rate_limits: RateLimitsBody | None = None
    rate_limit_rpm: int | None = None  # the older name of rate_limits.rpm


class ApiKeyUpdate(_Body):
    name: str | UnsetType = UNSET
    models: list[str] | UnsetType | None = UNSET
    expires_at: int | UnsetType | None = UNSET
    usage_opt_in: bool | UnsetType = UNSET
    rate_limits: RateLimitsBody | UnsetType | None = UNSET
    rate_limit_rpm: int | UnsetType | None = UNSET


class ModelLimits(_Body):
    """What one request may ask of the model (unset or null: the gateway's default)."""

    max_logprobs: int | UnsetType | None = UNSET
    default_max_tokens: int | UnsetType | None = UNSET
    max_tokens_limit: int | UnsetType | None = UNSET
    max_prompts: int | UnsetType | None = UNSET  # prompts in one request's list
    max_n: int | UnsetType | None = UNSET  # n and best_of
    max_request_tokens: int | UnsetType | None = UNSET  # tokens one request may reserve


class ModelTimeouts(_Body):
    """Seconds; each unset (or null) one is the gateway's default."""

    connect: float | UnsetType | None = UNSET
    first_byte: float | UnsetType | None = UNSET
    idle: float | UnsetType | None = UNSET
    total: float | UnsetType | None = UNSET


class ModelCreate(_Body):
    name: str
    upstream_url: str
    upstream_model: str | None = None  # default: the name
    display_name: str | None = None  # default: the name
    type: Literal["llm", "embedding"] = "llm"
    upstream_api_key: str | None = None
    enabled: bool = True
    companies: list[int] | None = None  # default: every company
    limits: ModelLimits | None = None
    timeouts: ModelTimeouts | None = None
    affinity: Literal["none", "prefix", "user"] = "none"
    rate_limits: RateLimitsBody | None = None  # for all its callers together
    log_payloads: bool = False  # write its prompts and completions to the log


class ModelUpdate(_Body):
    name: str | UnsetType = UNSET  # renames; keys and usage follow the model's id
    upstream_url: str | UnsetType = UNSET
    upstream_model: str | UnsetType = UNSET
    display_name: str | UnsetType | None = UNSET
    type: Literal["llm", "embedding"] | UnsetType = UNSET
    upstream_api_key: str | UnsetType | None = UNSET
    enabled: bool | UnsetType = UNSET
    companies: list[int] | UnsetType | None = UNSET
    limits: ModelLimits | UnsetType = UNSET
    timeouts: ModelTimeouts | UnsetType = UNSET
    affinity: Literal["none", "prefix", "user"] | UnsetType = UNSET
    rate_limits: RateLimitsBody | UnsetType | None = UNSET
    log_payloads: bool | UnsetType = UNSET


class ReplicaCreate(_Body):
    url: str  # the vLLM base, as a model's upstream_url: http://host:8000/v1
    weight: int = 1
    upstream_api_key: str | None = None
    enabled: bool = True
    draining: bool = False
    health_url: str | None = None  # default: the url without a trailing /v1
    discover: bool = False  # the URL's host names the replicas (a headless Service)


class ReplicaUpdate(_Body):
    url: str | UnsetType = UNSET
    weight: int | UnsetType = UNSET
    upstream_api_key: str | UnsetType | None = UNSET
    enabled: bool | UnsetType = UNSET
    draining: bool | UnsetType = UNSET
    health_url: str | UnsetType | None = UNSET
    discover: bool | UnsetType = UNSET


def given(body: msgspec.Struct) -> dict[str, Any]:
    """The fields a body set (an update changes only those); a ``rate_limits`` object
    becomes a dict of the kinds it set."""
    out = {f: getattr(body, f) for f in body.__struct_fields__
           if getattr(body, f) is not UNSET}
    limits = out.get("rate_limits")
    if isinstance(limits, RateLimitsBody):
        out["rate_limits"] = given(limits)
    return out


# -- answers -------------------------------------------------------------------------------


class RateLimits(msgspec.Struct):
    """The limits set on a key, a user, a company or a model (null: none)."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None


class Company(msgspec.Struct, tag="company", tag_field="object"):
    id: int
    name: str
    builtin: bool
    created_at: int
    updated_at: int
    rate_limits: RateLimits
    allow_priority: bool


class User(msgspec.Struct, tag="user", tag_field="object"):
    id: int
    company_id: int
    email: str
    name: str
    role: Role
    key_manager: bool
    builtin: str | None
    created_at: int
    updated_at: int
    rate_limits: RateLimits


class ApiKey(msgspec.Struct, tag="api_key", tag_field="object"):
    id: str  # the public id: pg-<id>-<secret>
    name: str
    prefix: str
    user_id: int
    company_id: int
    models: list[str] | None
    usage_opt_in: bool
    rate_limit_rpm: int | None  # rate_limits.rpm, by its older name
    rate_limits: RateLimits
    state: Literal["active", "expired", "revoked"]
    created_at: int
    expires_at: int | None
    last_used_at: int | None
    revoked_at: int | None
    previous_secret_expires_at: int | None
    key: str | UnsetType = UNSET  # the whole key: in the answers to create and rotate only


class Limits(msgspec.Struct):
    max_logprobs: int | None
    default_max_tokens: int | None
    max_tokens_limit: int | None
    max_prompts: int | None
    max_n: int | None
    max_request_tokens: int | None


class Timeouts(msgspec.Struct):
    """A model's own timeouts, in seconds (null: the gateway's default)."""

    connect: float | None
    first_byte: float | None
    idle: float | None
    total: float | None


class Model(msgspec.Struct, tag="model", tag_field="object"):
    """OpenAI's model object; the configuration fields are for system admins only."""

    id: str
    created: int
    owned_by: str
    display_name: str
    type: str
    enabled: bool | UnsetType = UNSET
    upstream_url: str | UnsetType = UNSET
    upstream_model: str | UnsetType = UNSET
    has_upstream_api_key: bool | UnsetType = UNSET
    companies: list[int] | UnsetType | None = UNSET
    limits: Limits | UnsetType = UNSET
    timeouts: Timeouts | UnsetType = UNSET
    affinity: str | UnsetType = UNSET
    rate_limits: RateLimits | UnsetType = UNSET
    log_payloads: bool | UnsetType = UNSET  # its prompts and completions go to the log


class Actor(msgspec.Struct):
    type: Literal["user", "cli"]
    user_id: int | None
    key_id: str | None


class Target(msgspec.Struct):
    type: str
    id: str


class AuditEntry(msgspec.Struct, tag="audit_log_entry", tag_field="object"):
    id: int
    created_at: int
    actor: Actor
    action: str
    target: Target
    company_id: int | None
    changes: dict[str, list[Any]]
    request_id: str | None
    client_addr: str | None


class MeKey(msgspec.Struct):
    id: str
    name: str
    prefix: str
    expires_at: int | None
    models: list[str] | None
    usage_opt_in: bool


class MeUser(msgspec.Struct):
    id: int
    email: str
    name: str
    role: Role
    key_manager: bool


class MeCompany(msgspec.Struct):
    id: int
    name: str


class Me(msgspec.Struct, tag="me", tag_field="object"):
    key: MeKey
    user: MeUser
    company: MeCompany
    role: Role


class Deleted(msgspec.Struct):
    object: str
    id: int | str
    deleted: bool


def _list_of(item: type, name: str) -> type:
    return msgspec.defstruct(name, [
        ("object", Literal["list"]), ("data", list[item]),  # type: ignore[valid-type]
        ("has_more", bool), ("first_id", int | str | None), ("last_id", int | str | None)])


CompanyList = _list_of(Company, "CompanyList")
UserList = _list_of(User, "UserList")
ApiKeyList = _list_of(ApiKey, "ApiKeyList")
class Queue(msgspec.Struct):
    """What vLLM's /metrics said at the last health check (models with several
    replicas only; null until then)."""

    running: int | None
    waiting: int | None


class ReplicaAddress(msgspec.Struct):
    """One address a discovered replica's name resolved to: a replica of its own."""

    url: str
    state: Literal["healthy", "ejected", "draining"]
    in_flight: int
    queue: Queue
    latency_ms: float | None
    requests: int
    errors: int
    consecutive_failures: int
    last_error: str | None


class Replica(msgspec.Struct, tag="model.replica", tag_field="object"):
    """A replica's configuration and, as this gateway process sees it, its state."""

    id: int
    model: str
    url: str
    weight: int
    enabled: bool
    draining: bool
    has_upstream_api_key: bool
    health_url: str | None
    discover: bool
    # discover: what its name resolved to at the last look (null before), each address
    # with its own state; the fields below then sum them (state: healthy if one is)
    addresses: list[ReplicaAddress] | None
    state: Literal["healthy", "ejected", "draining"]
    in_flight: int  # requests this process has on it now
    queue: Queue
    latency_ms: float | None  # moving average of the time to vLLM's answer headers
    requests: int  # sent by this process since it started
    errors: int
    consecutive_failures: int
    last_error: str | None
    created_at: int
    updated_at: int


ModelList = _list_of(Model, "ModelList")
ReplicaList = _list_of(Replica, "ReplicaList")
AuditEntryList = _list_of(AuditEntry, "AuditEntryList")


class ReplicaCounts(msgspec.Struct):
    """How many of a model's replicas are in each state, as this gateway process sees
    them (each address of a discovered replica counts as one)."""

    total: int
    healthy: int
    ejected: int
    draining: int


class ModelStatus(msgspec.Struct):
    id: str
    type: str
    available: bool  # one of its replicas at least takes requests and is healthy now
    replicas: ReplicaCounts | UnsetType = UNSET  # system admins only


class Status(msgspec.Struct, tag="status", tag_field="object"):
    """Paradigm's platform status, for the caller's key: the models it may use."""

    status: Literal["ok", "degraded"]  # degraded: one of them at least is unavailable
    models: list[ModelStatus]


class ViewState(msgspec.Struct):
    version: int  # the config version the view of keys and models holds
    age_seconds: float  # since the store last answered this process
    max_view_age: float | None  # PARAGATE_MAX_VIEW_AGE; null: no bound


class Ready(msgspec.Struct):
    """Whether to send this process traffic, and why."""

    status: Literal["ready", "starting", "draining", "stale"]
    reason: str
    store: Literal["ok", "unreachable"]
    view: ViewState

class UsageRow(msgspec.Struct, omit_defaults=True):
    """One bucket of one group; the grouped fields are present only when grouped by."""

    bucket_start: str
    requests: int
    errors: int
    partial: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    ttft_ms_p50: float | None
    company_id: int | None = None
    user_id: int | None = None
    key_id: str | None = None
    model: str | None = None


class UsageReport(msgspec.Struct):
    data: list[UsageRow]
    has_more: bool
    object: Literal["list"] = "list"


REQUESTS: tuple[type, ...] = (RateLimitsBody, CompanyCreate, CompanyUpdate, UserCreate, UserUpdate,
                              ApiKeyCreate, ApiKeyUpdate, ModelCreate, ModelUpdate,
                              ReplicaCreate, ReplicaUpdate)
RESPONSES: tuple[type, ...] = (Company, CompanyList, User, UserList, ApiKey, ApiKeyList,
                               Model, ModelList, Replica, ReplicaList, AuditEntry,
                               AuditEntryList, Me, Deleted, UsageReport, Status, Ready)
