"""Replicas: the vLLM servers behind a model, managed by system admins.

A model has at least one replica: a model is created with one (its ``upstream_url``), and
its last replica cannot be removed (remove the model, or add the new replica first). The
model's own ``upstream_url`` and ``upstream_api_key`` follow its first replica (the
lowest id), so what the model views show stays true. A deleted replica's row stays,
marked deleted, as every config row does."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy import update as sql_update

from ..errors import Conflict, InvalidRequest, NotFound
from ..store import Change, ModelRecord, ReplicaRecord, Store, replica_of
from ..store.schema import model_replicas, models
from .common import (
    Actor,
    check_api_key,
    check_int,
    check_url,
    live_model,
    require_admin,
    same_key,
    seal,
)

__all__ = ["FIELDS", "MAX_WEIGHT", "create", "delete", "list_", "update"]

# What `create` and `update` take (`url` is required to create).
FIELDS = ("url", "weight", "upstream_api_key", "enabled", "draining", "health_url",
          "discover")
MAX_WEIGHT = 1000
_SECRET = "upstream_api_key"
MASK = "<secret>"


def _check(values: dict[str, Any]) -> dict[str, Any]:
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise InvalidRequest(f"Unknown replica fields: {', '.join(sorted(unknown))}.")
    for required in ("url", "weight", "enabled", "draining", "discover"):
        if required in values and values[required] is None:
            raise InvalidRequest(f"'{required}' cannot be unset.", param=required)
    if "url" in values:
        values["url"] = check_url(values["url"], "url")
    check_int(values.get("weight"), "weight", 1, MAX_WEIGHT)
    check_api_key(values.get(_SECRET))
    if values.get("health_url") is not None:
        values["health_url"] = check_url(values["health_url"], "health_url")
    return values


def _check_discover(url: str, discover: bool, health_url: str | None) -> None:
    """A discovered replica connects to addresses, not to its name: plain http only
    (a certificate names the host), and no health_url (each address has its own)."""
    if not discover:
        return
    if not url.startswith("http://"):
        raise InvalidRequest("'discover' needs an http:// URL: each address is reached "
                             "directly, and a certificate names a host.", param="discover")
    if health_url is not None:
        raise InvalidRequest("'discover' and 'health_url' do not go together: each "
                             "address is checked at its own root.", param="health_url")


def _replicas(conn: Connection, model_id: int) -> list[ReplicaRecord]:
    return [replica_of(r) for r in conn.execute(select(model_replicas).where(
        model_replicas.c.model_id == model_id, model_replicas.c.deleted_at.is_(None))
        .order_by(model_replicas.c.id)).mappings()]


def _replica(conn: Connection, model: ModelRecord, replica_id: int) -> ReplicaRecord:
    for r in _replicas(conn, model.id):
        if r.id == replica_id:
            return r
    raise NotFound(f"The model '{model.name}' has no replica {replica_id}.",
                   param="replica", code="replica_not_found")


def _masked(field: str, value: Any) -> Any:
    return (MASK if value else None) if field == _SECRET else value


def follow_first(ch: Change, model: ModelRecord) -> None:
    """Keep the model's upstream_url and upstream_api_key those of its first replica."""
    replicas = _replicas(ch.conn, model.id)
    if not replicas:
        return
    first = replicas[0]
    if (first.url, first.upstream_api_key) != (model.upstream_url, model.upstream_api_key):
        ch.conn.execute(sql_update(models).where(models.c.id == model.id).values(
            upstream_url=first.url, upstream_api_key=first.upstream_api_key,
            version=ch.version, updated_at=ch.at))


def add(ch: Change, model_id: int, **values: Any) -> int:
    """Insert a replica in a change already open (``models.create`` uses it)."""
    row = {"weight": 1, "upstream_api_key": None, "enabled": True, "draining": False,
           "health_url": None, "discover": False, **values, "model_id": model_id}
    _check_discover(row["url"], row["discover"], row["health_url"])
    return int(ch.conn.execute(insert(model_replicas).values(
        **row, version=ch.version, created_at=ch.at, updated_at=ch.at,
    ).returning(model_replicas.c.id)).scalar_one())


def list_(store: Store, actor: Actor, model: str) -> tuple[ModelRecord, list[ReplicaRecord]]:
    require_admin(actor)
    with store.read() as conn:
        found = live_model(conn, model)
        return found, _replicas(conn, found.id)


def create(store: Store, actor: Actor, model: str, **values: Any) -> ReplicaRecord:
    require_admin(actor)
    if values.get("url") is None:
        raise InvalidRequest("'url' is required.", param="url", code="missing_field")
    values = _check({k: v for k, v in values.items() if v is not None})
    with store.change(actor.audit_columns()) as ch:
        found = live_model(ch.conn, model)
        if any(r.url == values["url"] for r in _replicas(ch.conn, found.id)):
            raise Conflict(f"The model '{found.name}' has a replica at {values['url']} "
                           "already.", param="url")
        replica_id = add(ch, found.id, **{
            **values, _SECRET: seal(store, values.get(_SECRET))})
        created = _replica(ch.conn, found, replica_id)
        ch.audit("replica.create", "replica", replica_id, None,
                 {"model": [None, found.name], **{
                     k: [None, _masked(k, getattr(created, k))] for k in FIELDS}})
        follow_first(ch, found)
        return created


def update(store: Store, actor: Actor, model: str, replica_id: int, /,
           **changes: Any) -> ReplicaRecord:
    """Change the fields given (None unsets ``upstream_api_key`` or ``health_url``)."""
    require_admin(actor)
    changes = _check(changes)
    with store.change(actor.audit_columns()) as ch:
        found = live_model(ch.conn, model)
        before = _replica(ch.conn, found, replica_id)
        diff = {k: [_masked(k, getattr(before, k)), _masked(k, v)]
                for k, v in changes.items()
                if (not same_key(store, before.upstream_api_key, v) if k == _SECRET
                    else getattr(before, k) != v)}
        if not diff:
            return before
        if _SECRET in diff:
            changes[_SECRET] = seal(store, changes[_SECRET])
        _check_discover(changes.get("url", before.url),
                        changes.get("discover", before.discover),
                        changes.get("health_url", before.health_url))
        if "url" in diff and any(r.url == changes["url"] and r.id != replica_id
                                 for r in _replicas(ch.conn, found.id)):
            raise Conflict(f"The model '{found.name}' has a replica at {changes['url']} "
                           "already.", param="url")
        ch.conn.execute(sql_update(model_replicas).where(
            model_replicas.c.id == replica_id).values(
            **{k: changes[k] for k in diff}, version=ch.version, updated_at=ch.at))
        ch.audit("replica.update", "replica", replica_id, None,
                 {"model": [found.name, found.name], **diff})
        follow_first(ch, found)
        return _replica(ch.conn, found, replica_id)


def delete(store: Store, actor: Actor, model: str, replica_id: int) -> ReplicaRecord:
    require_admin(actor)
    with store.change(actor.audit_columns()) as ch:
        found = live_model(ch.conn, model)
        replica = _replica(ch.conn, found, replica_id)
        if len(_replicas(ch.conn, found.id)) == 1:
            raise Conflict(f"Replica {replica_id} is the last of the model '{found.name}': "
                           "add another first, or delete the model.", param="replica")
        ch.conn.execute(sql_update(model_replicas).where(
            model_replicas.c.id == replica_id).values(
            deleted_at=ch.at, version=ch.version, updated_at=ch.at))
        ch.audit("replica.delete", "replica", replica_id, None,
                 {"model": [found.name, None], "url": [replica.url, None]})
        follow_first(ch, found)
        return replica


def delete_all(ch: Change, model_id: int) -> None:
    """Mark every replica of a model deleted (``models.delete`` uses it)."""
    ch.conn.execute(sql_update(model_replicas).where(
        model_replicas.c.model_id == model_id, model_replicas.c.deleted_at.is_(None))
        .values(deleted_at=ch.at, version=ch.version, updated_at=ch.at))


def set_only(ch: Change, model: ModelRecord, changes: dict[str, Any]) -> None:
    """A model's ``upstream_url`` or ``upstream_api_key`` changed through the model: the
    same change to its replica, when it has exactly one; refused when it has several."""
    fields = {"upstream_url": "url", "upstream_api_key": "upstream_api_key"}
    wanted = {fields[k]: v for k, v in changes.items() if k in fields}
    if not wanted:
        return
    replicas = _replicas(ch.conn, model.id)
    if len(replicas) > 1:
        raise Conflict(f"The model '{model.name}' has {len(replicas)} replicas: change "
                       f"their URLs and keys through /api/v2/models/{model.name}/replicas.",
                       param=next(iter(k for k in changes if k in fields)))
    if replicas:
        ch.conn.execute(sql_update(model_replicas).where(
            model_replicas.c.id == replicas[0].id).values(
            **wanted, version=ch.version, updated_at=ch.at))
    else:  # pragma: no cover - every model has a replica since migration 0005
        add(ch, model.id, url=wanted.get("url", model.upstream_url),
            upstream_api_key=wanted.get("upstream_api_key", model.upstream_api_key))
