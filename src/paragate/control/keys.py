"""API keys: each belongs to one user and acts as that user. A user sees their own keys
and may revoke them; creating, changing and rotating need the ``key_manager`` permission
(company admins and system admins have it for the keys in their scope). The secret is
returned once, by ``create`` and ``rotate``; only its hash is stored."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Select, insert, select
from sqlalchemy import update as sql_update

from ..access import ADMIN, USER
from ..auth import format_key, new_key, new_secret
from ..errors import Conflict, InvalidRequest, NotFound
from ..limits.spec import check_rate_limits, merge_rate_limits
from ..store import KeyRecord, Store, key_of, now
from ..store.schema import api_keys, models, users
from .common import (
    Actor,
    Page,
    check_choice,
    check_int,
    check_text,
    page,
    require_limit_setter,
    require_rank,
)
from .users import active_key_count, ensure_builtin, live_user, role_of

__all__ = ["DEFAULT", "STATES", "Key", "create", "get", "list_", "revoke", "rotate", "update"]

STATES = ("active", "expired", "revoked")
NAME_MAX = 50
MASK = "<secret>"


class _Default(enum.Enum):
    DEFAULT = "default"


DEFAULT = _Default.DEFAULT  # expires_at not given: the policy's default applies


@dataclass(frozen=True, slots=True)
class Key:
    """A key as the API and the CLI show it."""

    record: KeyRecord
    company_id: int
    models: tuple[str, ...] | None  # names of the permitted models; None: all
    secret: str | None = None  # the whole key, in the answers to create and rotate only

    @property
    def state(self) -> str:
        r = self.record
        if r.revoked_at is not None:
            return "revoked"
        return "active" if r.usable_at(now()) else "expired"


def _query() -> Select[Any]:
    return select(api_keys, users.c.company_id).join(users, users.c.id == api_keys.c.user_id)


def _keys(conn: Connection, rows: list[Any]) -> list[Key]:
    ids = {i for r in rows for i in (r["model_ids"] or ())}
    names = dict(conn.execute(select(models.c.id, models.c.name).where(
        models.c.id.in_(sorted(ids)), models.c.deleted_at.is_(None))).all()) if ids else {}
    out = []
    for row in rows:
        values = dict(row)
        company_id = values.pop("company_id")
        record = key_of(values)  # type: ignore[arg-type]
        allowed = None if record.model_ids is None else tuple(
            sorted(names[i] for i in record.model_ids if i in names))
        out.append(Key(record, company_id, allowed))
    return out


def _visible(actor: Actor, user_id: int, company_id: int) -> bool:
    if actor.role == USER:
        return user_id == actor.user_id
    return actor.sees_company(company_id)


def _find(conn: Connection, actor: Actor, public_id: str) -> Key:
    row = conn.execute(_query().where(api_keys.c.public_id == public_id)).mappings().first()
    if row is None or not _visible(actor, row["user_id"], row["company_id"]):
        raise NotFound(f"No API key with id {public_id[:40]!r}.")
    return _keys(conn, [row])[0]


def _model_ids(conn: Connection, actor: Actor, company_id: int,
               names: list[str] | None) -> list[int] | None:
    """The ids of the models named, each of which must exist (and, for anyone but a
    system admin, be enabled for the key's company: others do not exist for them)."""
    if names is None:
        return None
    if not names:
        raise InvalidRequest("'models' must name at least one model, or be null for all.",
                             param="models")
    rows = {r["name"]: r for r in conn.execute(select(models).where(
        models.c.name.in_(sorted(set(names))), models.c.deleted_at.is_(None))).mappings()}
    ids = []
    for name in names:
        row = rows.get(name)
        if row is not None and not actor.is_admin:
            allowed = row["company_ids"]
            if not row["enabled"] or (allowed is not None and company_id not in allowed):
                row = None
        if row is None:
            raise NotFound(f"The model '{name[:200]}' does not exist or you do not have "
                           "access to it.", param="models", code="model_not_found")
        ids.append(row["id"])
    return sorted(set(ids))


def _expiry(value: datetime | _Default | None, default_days: int, at: datetime
            ) -> datetime | None:
    if value is DEFAULT:
        return at + timedelta(days=default_days) if default_days else None
    if value is not None and value <= at:
        raise InvalidRequest("'expires_at' must be in the future.", param="expires_at")
    return value


def _check_room(conn: Connection, user_id: int, at: datetime, max_keys: int) -> None:
    """409 when the user already holds ``max_keys`` active keys (built-in users are
    exempt, so that scripts and `make run` can make keys for ever)."""
    builtin = conn.execute(select(users.c.builtin).where(users.c.id == user_id)).scalar()
    if builtin is None and active_key_count(conn, user_id, at) >= max_keys:
        raise Conflict(f"The user already holds {max_keys} active keys, the most "
                       "allowed: revoke one first.")


def _unix(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def create(store: Store, actor: Actor, *, name: str, user_id: int | None = None,
           builtin: str | None = None, models: list[str] | None = None,
           expires_at: datetime | _Default | None = DEFAULT, usage_opt_in: bool = True,
           rate_limits: dict[str, Any] | None = None, rate_limit_rpm: int | None = None,
           default_days: int = 0, max_keys: int = 5) -> Key:
    """A new key for ``user_id`` (default: the actor; the CLI names a built-in user
    instead). Its secret is in the answer, and nowhere else, ever. ``rate_limit_rpm``
    is the older name of ``rate_limits.rpm``."""
    check_text(name, "name", NAME_MAX)
    limits = _limits(None, rate_limits, rate_limit_rpm, merge=False)
    if limits:
        require_limit_setter(actor)
    token, public_id, secret_hash = new_key()
    with store.change(actor.audit_columns()) as ch:
        expiry = _expiry(expires_at, default_days, ch.at)
        if builtin is not None:
            owner = ensure_builtin(ch, builtin)
        else:
            target = user_id if user_id is not None else actor.user_id
            if target is None:
                raise InvalidRequest("'user_id' is required.", param="user_id",
                                     code="missing_field")
            owner = live_user(ch.conn, actor, target, param="user_id")
        ids = _model_ids(ch.conn, actor, owner.company_id, models)
        require_rank(actor, owner.role, "create a key for")
        _check_room(ch.conn, owner.id, ch.at, max_keys)
        ch.conn.execute(insert(api_keys).values(
            public_id=public_id, secret_hash=secret_hash, user_id=owner.id, name=name,
            model_ids=ids, rate_limits=limits, usage_opt_in=usage_opt_in,
            version=ch.version, created_at=ch.at, expires_at=expiry))
        ch.audit("api_key.create", "api_key", public_id, owner.company_id, {
            "name": [None, name], "user_id": [None, owner.id], "models": [None, models],
            "expires_at": [None, _unix(expiry)], "usage_opt_in": [None, usage_opt_in],
            "rate_limits": [None, limits], "secret": [None, MASK]})
        return replace(_find(ch.conn, actor, public_id), secret=token)


def _limits(current: dict[str, int] | None, rate_limits: Any, rpm: int | None, *,
            merge: bool) -> dict[str, int] | None:
    """The key's limits from ``rate_limits`` and the older ``rate_limit_rpm``."""
    check_int(rpm, "rate_limit_rpm", 1)
    limits = (merge_rate_limits(current, rate_limits) if merge
              else check_rate_limits(rate_limits))
    if rpm is not None:
        if limits and limits.get("rpm") not in (None, rpm):
            raise InvalidRequest("'rate_limit_rpm' and 'rate_limits.rpm' disagree; give "
                                 "one of them.", param="rate_limit_rpm")
        limits = {**(limits or {}), "rpm": rpm}
    return limits


def get(store: Store, actor: Actor, public_id: str) -> Key:
    with store.read() as conn:
        return _find(conn, actor, public_id)


def list_(store: Store, actor: Actor, *, user_id: int | None = None,
          company_id: int | None = None, state: str | None = None, limit: int = 20,
          after: str | None = None) -> Page[Key]:
    query = _query()
    if user_id is not None:
        query = query.where(api_keys.c.user_id == user_id)
    if company_id is not None:
        query = query.where(users.c.company_id == company_id)
    if actor.role == USER:  # filters narrow the scope, never widen it
        query = query.where(api_keys.c.user_id == actor.user_id)
    elif actor.role != ADMIN:
        query = query.where(users.c.company_id == actor.company_id)
    at = now()
    if state is not None:
        check_choice(state, "state", STATES)
        live = (api_keys.c.expires_at.is_(None)) | (api_keys.c.expires_at > at)
        query = query.where(
            api_keys.c.revoked_at.is_not(None) if state == "revoked" else
            api_keys.c.revoked_at.is_(None) & (live if state == "active" else ~live))
    with store.read() as conn:
        cursor = None
        if after is not None:
            cursor = conn.execute(select(api_keys.c.id).where(
                api_keys.c.public_id == after)).scalar()
            if cursor is None:
                raise InvalidRequest(f"'after' names no key: {after[:40]!r}.", param="after")
        rows, more = page(conn, query, api_keys.c.id, cursor, limit)
        return Page(_keys(conn, rows), more)


def update(store: Store, actor: Actor, public_id: str, *, max_keys: int = 5,
           **changes: Any) -> Key:
    """Change ``name``, ``models``, ``expires_at``, ``usage_opt_in``, ``rate_limits``
    (the kinds given replace the current ones; null removes one, or all) or
    ``rate_limit_rpm`` (``rate_limits.rpm``); only those given. An expired key given a
    new expiry counts against its user's ``max_keys`` again."""
    unknown = set(changes) - {"name", "models", "expires_at", "usage_opt_in",
                              "rate_limits", "rate_limit_rpm"}
    if unknown:
        raise InvalidRequest(f"Unknown key fields: {', '.join(sorted(unknown))}.")
    with store.change(actor.audit_columns()) as ch:
        key = _find(ch.conn, actor, public_id)
        r = key.record
        values: dict[str, Any] = {}
        diff: dict[str, list[Any]] = {}
        if "name" in changes:
            check_text(changes["name"], "name", NAME_MAX)
            values["name"] = changes["name"]
            diff["name"] = [r.name, changes["name"]]
        if "rate_limits" in changes or "rate_limit_rpm" in changes:
            require_limit_setter(actor)
            limits = r.rate_limits
            if "rate_limits" in changes:
                limits = _limits(limits, changes["rate_limits"], None, merge=True)
            if "rate_limit_rpm" in changes:  # null removes the rpm limit
                rpm = changes["rate_limit_rpm"]
                limits = _limits(limits, {"rpm": None}, rpm, merge=True) if rpm is not None \
                    else merge_rate_limits(limits, {"rpm": None})
            values["rate_limits"] = limits
            diff["rate_limits"] = [r.rate_limits, limits]
        if "usage_opt_in" in changes:
            values["usage_opt_in"] = bool(changes["usage_opt_in"])
            diff["usage_opt_in"] = [r.usage_opt_in, values["usage_opt_in"]]
        if "expires_at" in changes:
            values["expires_at"] = _expiry(changes["expires_at"], 0, ch.at)
            diff["expires_at"] = [_unix(r.expires_at), _unix(values["expires_at"])]
        if "models" in changes:
            values["model_ids"] = _model_ids(ch.conn, actor, key.company_id,
                                             changes["models"])
            diff["models"] = [list(key.models) if key.models is not None else None,
                              changes["models"]]
        require_rank(actor, role_of(ch.conn, r.user_id), "change a key of")
        if r.revoked_at is not None:
            raise Conflict("A revoked key cannot be changed.")
        if key.state == "expired" and "expires_at" in values and (
            values["expires_at"] is None or values["expires_at"] > ch.at
        ):  # brought back to life: it counts against the user's keys again
            _check_room(ch.conn, r.user_id, ch.at, max_keys)
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        if diff:
            ch.conn.execute(sql_update(api_keys).where(api_keys.c.id == r.id).values(
                **values, version=ch.version))
            ch.audit("api_key.update", "api_key", public_id, key.company_id, diff)
        return _find(ch.conn, actor, public_id)


def revoke(store: Store, actor: Actor, public_id: str) -> Key:
    """Revoke a key, for good (revoking a revoked key changes nothing)."""
    with store.change(actor.audit_columns()) as ch:
        key = _find(ch.conn, actor, public_id)
        require_rank(actor, role_of(ch.conn, key.record.user_id), "revoke a key of")
        if key.record.revoked_at is None:
            ch.conn.execute(sql_update(api_keys).where(api_keys.c.id == key.record.id).values(
                revoked_at=ch.at, version=ch.version))
            ch.audit("api_key.revoke", "api_key", public_id, key.company_id,
                     {"revoked_at": [None, _unix(ch.at)]})
        return _find(ch.conn, actor, public_id)


def rotate(store: Store, actor: Actor, public_id: str, *, grace_seconds: int) -> Key:
    """A new secret for the same key (same id); the old one keeps working for
    ``grace_seconds`` (0: not at all). Only the latest replaced secret is kept."""
    secret, secret_hash = new_secret()
    with store.change(actor.audit_columns()) as ch:
        key = _find(ch.conn, actor, public_id)
        require_rank(actor, role_of(ch.conn, key.record.user_id), "rotate a key of")
        if key.state != "active":
            raise Conflict(f"A {key.state} key cannot be rotated.")
        grace_until = ch.at + timedelta(seconds=grace_seconds) if grace_seconds else None
        ch.conn.execute(sql_update(api_keys).where(api_keys.c.id == key.record.id).values(
            secret_hash=secret_hash,
            previous_hash=key.record.secret_hash if grace_until else None,
            previous_expires_at=grace_until, version=ch.version))
        ch.audit("api_key.rotate", "api_key", public_id, key.company_id,
                 {"secret": [MASK, MASK],
                  "previous_secret_valid_until": [None, _unix(grace_until)]})
        return replace(_find(ch.conn, actor, public_id),
                       secret=format_key(public_id, secret))
