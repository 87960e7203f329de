"""The control plane's objects rendered as the API answers them (``schemas``' structs).

Times are Unix seconds (OpenAI's convention). No answer holds a secret: a key's secret
appears only in the answers to create and rotate (``key``), and a model's upstream API
key never (``has_upstream_api_key`` says whether one is set).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from msgspec import UNSET

from . import schemas as s
from .control.keys import Key
from .registry import Route
from .store import AuditRecord, CompanyRecord, ReplicaRecord, UserRecord
from .upstream.urls import redacted

if TYPE_CHECKING:
    from .upstream.balancer import Fleet, Replica

__all__ = ["audit", "company", "key", "listing", "model", "model_status", "rate_limits",
           "readiness", "status", "user"]


def _t(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _ts(value: datetime) -> int:
    return int(value.timestamp())


def listing(kind: type, data: Sequence[Any], has_more: bool = False) -> Any:
    return kind(object="list", data=list(data), has_more=has_more,
                first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


def rate_limits(limits: dict[str, int] | None) -> s.RateLimits:
    return s.RateLimits(**limits) if limits else s.RateLimits()


def company(c: CompanyRecord) -> s.Company:
    return s.Company(id=c.id, name=c.name, builtin=c.builtin, created_at=_ts(c.created_at),
                     updated_at=_ts(c.updated_at), rate_limits=rate_limits(c.rate_limits),
                     allow_priority=c.allow_priority)


def user(u: UserRecord) -> s.User:
    return s.User(id=u.id, company_id=u.company_id, email=u.email, name=u.name,
                  role=u.role, key_manager=u.key_manager,  # type: ignore[arg-type]
                  builtin=u.builtin, created_at=_ts(u.created_at),
                  updated_at=_ts(u.updated_at), rate_limits=rate_limits(u.rate_limits))


def key(k: Key) -> s.ApiKey:
    r = k.record
    return s.ApiKey(
        id=r.public_id, name=r.name, prefix=f"pg-{r.public_id}", user_id=r.user_id,
        company_id=k.company_id, models=list(k.models) if k.models is not None else None,
        usage_opt_in=r.usage_opt_in,
        rate_limit_rpm=r.rate_limits.get("rpm") if r.rate_limits else None,
        rate_limits=rate_limits(r.rate_limits),
        state=k.state,  # type: ignore[arg-type]
        created_at=_ts(r.created_at), expires_at=_t(r.expires_at),
        last_used_at=_t(r.last_used_at), revoked_at=_t(r.revoked_at),
        previous_secret_expires_at=_t(r.previous_expires_at),
        key=k.secret if k.secret is not None else UNSET)


def model(route: Route, config: bool) -> s.Model:
    """OpenAI's model object; with ``config`` (system admins only) its configuration."""
    out = s.Model(id=route.name, created=route.created, owned_by="paragate",
                  display_name=route.display_name, type=route.type)
    if config:
        out.enabled = route.enabled
        out.upstream_url = redacted(route.upstream_url)  # a row from before the URL checks
        out.upstream_model = route.upstream_model
        out.has_upstream_api_key = route.upstream_api_key is not None
        out.companies = sorted(route.company_ids) if route.company_ids is not None else None
        out.limits = s.Limits(max_logprobs=route.max_logprobs_set,
                              default_max_tokens=route.default_max_tokens,
                              max_tokens_limit=route.max_tokens_limit,
                              max_prompts=route.caps_set[0], max_n=route.caps_set[1],
                              max_request_tokens=route.caps_set[2])
        out.rate_limits = rate_limits(route.limits_set)
        out.timeouts = s.Timeouts(*route.timeouts_set)
        out.affinity = route.affinity
        out.log_payloads = route.log_payloads
    return out


def model_status(route: Route, fleet: Fleet, counts: bool) -> s.ModelStatus:
    """Whether a model can take a request now: one of its replicas at least takes
    traffic and is healthy (``Replica.state``); with ``counts`` (system admins only) how
    many replicas are in each state."""
    states = [r.state for r in fleet.members]
    out = s.ModelStatus(id=route.name, type=route.type, available="healthy" in states)
    if counts:
        out.replicas = s.ReplicaCounts(
            total=len(states), healthy=states.count("healthy"),
            ejected=states.count("ejected"), draining=states.count("draining"))
    return out


def readiness(state: str, reason: str, *, unreachable: bool, version: int, age: float,
              max_view_age: float) -> s.Ready:
    return s.Ready(status=state, reason=reason,  # type: ignore[arg-type]
                   store="unreachable" if unreachable else "ok",
                   view=s.ViewState(version=version, age_seconds=round(age, 3),
                                    max_view_age=max_view_age or None))


def status(models: list[s.ModelStatus]) -> s.Status:
    return s.Status(status="ok" if all(m.available for m in models) else "degraded",
                    models=models)


def _queue(live: Replica | None) -> s.Queue:
    return s.Queue(running=live.running if live else None,
                   waiting=live.waiting if live else None)


def _latency(live: Replica | None) -> float | None:
    return round(live.latency_ms, 3) if live and live.latency_ms is not None else None


def replica(model: str, r: ReplicaRecord, live: Replica | None,
            members: list[Replica] | None = None) -> s.Replica:
    """A replica's configuration, and this process's view of it (``live``: None when
    no request or check has seen it yet, e.g. a model that is disabled; ``members``: a
    discovered replica's addresses, None until its name was first resolved; the counts
    are then their sums)."""
    takes = r.enabled and not r.draining
    parts = (members or []) if r.discover else [live] if live else []
    if r.discover:
        states = {m.state for m in parts}
        state = "draining" if not takes else "healthy" if "healthy" in states else "ejected"
    else:
        state = live.state if live else "healthy" if takes else "draining"
    addresses = None if members is None else [s.ReplicaAddress(
        url=m.url, state=m.state, in_flight=m.inflight,  # type: ignore[arg-type]
        queue=_queue(m), latency_ms=_latency(m), requests=m.requests, errors=m.errors,
        consecutive_failures=m.fails, last_error=m.last_error) for m in members]
    return s.Replica(
        id=r.id, model=model, url=redacted(r.url), weight=r.weight, enabled=r.enabled,
        draining=r.draining, has_upstream_api_key=r.upstream_api_key is not None,
        health_url=redacted(r.health_url) if r.health_url else None, discover=r.discover,
        addresses=addresses,
        state=state,  # type: ignore[arg-type]
        in_flight=sum(m.inflight for m in parts), queue=_queue(live),
        latency_ms=_latency(live), requests=sum(m.requests for m in parts),
        errors=sum(m.errors for m in parts),
        consecutive_failures=live.fails if live else 0,
        last_error=live.last_error if live else None,
        created_at=_ts(r.created_at), updated_at=_ts(r.updated_at))


def audit(a: AuditRecord) -> s.AuditEntry:
    return s.AuditEntry(
        id=a.id, created_at=_ts(a.created_at),
        actor=s.Actor(type=a.actor_type, user_id=a.actor_user_id,  # type: ignore[arg-type]
                      key_id=a.actor_key),
        action=a.action, target=s.Target(type=a.target_type, id=a.target_id),
        company_id=a.company_id, changes=a.changes, request_id=a.request_id,
        client_addr=a.client_addr)
