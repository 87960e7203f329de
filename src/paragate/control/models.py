"""Models: configured by system admins, enabled for every company or for a list of
them. A deleted model's row stays (marked deleted), so usage that refers to its id keeps
a name; a renamed model keeps its id, its keys' permissions and its usage history."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy import update as sql_update

from ..errors import Conflict, InvalidRequest, NotFound
from ..limits.spec import check_rate_limits, merge_rate_limits
from ..store import ModelRecord, Store, model_of
from ..store.schema import companies, models
from . import replicas
from .common import (
    Actor,
    check_api_key,
    check_choice,
    check_int,
    check_text,
    check_url,
    live_model,
    require_admin,
    same_key,
    seal,
)

__all__ = ["FIELDS", "TYPES", "create", "delete", "get", "list_", "update"]

TYPES = ("llm", "embedding")
AFFINITIES = ("none", "prefix", "user")
TIMEOUTS = ("connect_timeout", "first_byte_timeout", "idle_timeout", "total_timeout")
MAX_TIMEOUT = 86400.0
# What `create` and `update` take, beside `name`.
FIELDS = ("display_name", "type", "upstream_url", "upstream_model", "upstream_api_key",
          "enabled", "company_ids", "max_logprobs", "default_max_tokens", "max_tokens_limit",
          *TIMEOUTS, "affinity", "rate_limits", "max_prompts", "max_n",
          "max_request_tokens", "log_payloads")
_SECRET = "upstream_api_key"
MASK = "<secret>"


def _check_name(name: str) -> str:
    check_text(name, "name", 200)
    if any(c.isspace() for c in name):
        raise InvalidRequest("'name' must not contain spaces.", param="name")
    if "replicas" in name.split("/"):
        # /api/v2/models/<name>/replicas addresses the model's replicas
        raise InvalidRequest("'name' must not have a path segment named 'replicas'.",
                             param="name")
    return name


def _check(conn: Connection, values: dict[str, Any]) -> dict[str, Any]:
    """Validate the fields given; unknown ones are refused."""
    unknown = set(values) - set(FIELDS) - {"name"}
    if unknown:
        raise InvalidRequest(f"Unknown model fields: {', '.join(sorted(unknown))}.")
    if "name" in values:
        _check_name(values["name"])
    if values.get("display_name") is not None:
        check_text(values["display_name"], "display_name", 200, min_len=0)
    if "type" in values:
        check_choice(values["type"], "type", TYPES)
    if "affinity" in values:
        check_choice(values["affinity"], "affinity", AFFINITIES)
    if "log_payloads" in values and not isinstance(values["log_payloads"], bool):
        raise InvalidRequest("'log_payloads' must be true or false.", param="log_payloads",
                             code="invalid_type")
    if "upstream_url" in values:
        values["upstream_url"] = check_url(values["upstream_url"])
    if "upstream_model" in values:
        check_text(values["upstream_model"], "upstream_model", 200)
    check_api_key(values.get(_SECRET))
    check_int(values.get("max_logprobs"), "max_logprobs", 0, 20)
    check_int(values.get("default_max_tokens"), "default_max_tokens", 1)
    check_int(values.get("max_tokens_limit"), "max_tokens_limit", 1)
    check_int(values.get("max_prompts"), "max_prompts", 1)
    check_int(values.get("max_n"), "max_n", 1, 128)
    check_int(values.get("max_request_tokens"), "max_request_tokens", 1)
    if "rate_limits" in values:
        values["rate_limits"] = check_rate_limits(values["rate_limits"])
    for name in TIMEOUTS:
        seconds = values.get(name)
        if seconds is not None and not 0 < seconds <= MAX_TIMEOUT:
            raise InvalidRequest(f"'{name}' must be more than 0 and at most "
                                 f"{MAX_TIMEOUT:g} seconds, got {seconds:g}.", param=name)
    ids = values.get("company_ids")
    if ids is not None:
        ids = sorted(set(ids))
        live = set(conn.execute(select(companies.c.id).where(
            companies.c.id.in_(ids), companies.c.deleted_at.is_(None))).scalars())
        missing = [i for i in ids if i not in live]
        if missing:
            raise NotFound(f"No company with id {missing[0]}.", param="companies")
        values["company_ids"] = ids
    return values


def _unique(conn: Connection, name: str) -> None:
    if conn.execute(select(models.c.id).where(
        models.c.name == name, models.c.deleted_at.is_(None))).first() is not None:
        raise Conflict(f"A model named '{name}' exists already.", param="name")


def _masked(field: str, value: Any) -> Any:
    return (MASK if value else None) if field == _SECRET else value


def create(store: Store, actor: Actor, name: str, **values: Any) -> ModelRecord:
    """Register a model; ``upstream_url`` is required, the rest has defaults."""
    require_admin(actor)
    _check_name(name)
    if "upstream_url" not in values:
        raise InvalidRequest("'upstream_url' is required.", param="upstream_url",
                             code="missing_field")
    values = {k: v for k, v in values.items() if v is not None or k == "company_ids"}
    with store.change(actor.audit_columns()) as ch:
        values = _check(ch.conn, values)
        _unique(ch.conn, name)
        # log_payloads is written even when off: its audit row says so explicitly
        row = {"display_name": name, "type": "llm", "upstream_model": name, "enabled": True,
               "company_ids": None, "log_payloads": False, **values, "name": name}
        key = seal(store, row.get(_SECRET))  # the audit row says only whether one is set
        model_id = ch.conn.execute(insert(models).values(
            **{**row, _SECRET: key}, version=ch.version, created_at=ch.at, updated_at=ch.at
        ).returning(models.c.id)).scalar_one()
        replicas.add(ch, model_id, url=row["upstream_url"], upstream_api_key=key)
        ch.audit("model.create", "model", model_id, None,
                 {k: [None, _masked(k, v)] for k, v in row.items()})
        return live_model(ch.conn, name)


def update(store: Store, actor: Actor, name: str, /, **changes: Any) -> ModelRecord:
    """Change the fields given (``name`` renames; None unsets an optional field)."""
    require_admin(actor)
    with store.change(actor.audit_columns()) as ch:
        before = live_model(ch.conn, name)
        for required in ("name", "upstream_url", "upstream_model", "type", "enabled",
                         "affinity", "log_payloads"):
            if required in changes and changes[required] is None:
                raise InvalidRequest(f"'{required}' cannot be unset.", param=required)
        if "rate_limits" in changes:  # the kinds given replace the current ones
            changes["rate_limits"] = merge_rate_limits(before.rate_limits,
                                                       changes["rate_limits"])
        changes = _check(ch.conn, changes)
        if changes.get("display_name", "") is None:
            changes["display_name"] = changes.get("name", before.name)
        diff = {k: [_masked(k, getattr(before, k)), _masked(k, v)]
                for k, v in changes.items()
                if (not same_key(store, before.upstream_api_key, v) if k == _SECRET
                    else _norm(getattr(before, k)) != _norm(v))}
        if not diff:
            return before
        if _SECRET in diff:
            changes[_SECRET] = seal(store, changes[_SECRET])
        if "name" in diff:
            _unique(ch.conn, changes["name"])
        replicas.set_only(ch, before, {k: changes[k] for k in diff})
        ch.conn.execute(sql_update(models).where(models.c.id == before.id).values(
            **{k: changes[k] for k in diff}, version=ch.version, updated_at=ch.at))
        ch.audit("model.update", "model", before.id, None, diff)
        return live_model(ch.conn, changes.get("name", name))


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def delete(store: Store, actor: Actor, name: str) -> ModelRecord:
    require_admin(actor)
    with store.change(actor.audit_columns()) as ch:
        model = live_model(ch.conn, name)
        replicas.delete_all(ch, model.id)
        ch.conn.execute(sql_update(models).where(models.c.id == model.id).values(
            deleted_at=ch.at, version=ch.version, updated_at=ch.at))
        ch.audit("model.delete", "model", model.id, None, {"name": [name, None]})
        return model


def get(store: Store, actor: Actor, name: str) -> ModelRecord:
    require_admin(actor)
    with store.read() as conn:
        return live_model(conn, name)


def list_(store: Store, actor: Actor) -> list[ModelRecord]:
    require_admin(actor)
    with store.read() as conn:
        return [model_of(r) for r in conn.execute(select(models).where(
            models.c.deleted_at.is_(None)).order_by(models.c.name)).mappings()]
