"""Users: each belongs to one company and has one role. System admins manage every
user; a company admin manages their own company's users, up to their own role; nobody
changes their own role. Two built-in users exist for the CLI: the system admin (keys made
with ``--admin``) and the default company's default user (keys made with neither
``--admin`` nor ``--user``, and the keys of databases upgraded from before users)."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, func, insert, select
from sqlalchemy import update as sql_update

from ..access import ADMIN, ROLES, USER
from ..errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from ..limits.spec import check_rate_limits, merge_rate_limits
from ..store import Change, Store, UserRecord
from ..store.schema import api_keys, users
from .common import (
    INT_MAX,
    Actor,
    Page,
    check_choice,
    check_text,
    live_company,
    page,
    require_limit_setter,
    require_rank,
)

__all__ = [
    "DEFAULT_USER",
    "SYSTEM_ADMIN",
    "create",
    "delete",
    "delete_users",
    "ensure_builtin",
    "get",
    "list_",
    "live_user",
    "update",
]

SYSTEM_ADMIN, DEFAULT_USER = "system_admin", "default_user"
_BUILTIN = {
    SYSTEM_ADMIN: ("system-admin@paragate.invalid", "System admin", ADMIN),
    DEFAULT_USER: ("default-user@paragate.invalid", "Default user", USER),
}
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")


def check_email(email: str) -> str:
    email = check_text(email, "email", 320).strip().lower()
    if not _EMAIL.match(email):
        raise InvalidRequest(f"'email' is not an email address: {email[:80]!r}.",
                             param="email")
    return email


def live_user(conn: Connection, actor: Actor, user_id: int, param: str | None = None
              ) -> UserRecord:
    """The user, if it exists, is not deleted and is in the actor's scope; else 404."""
    if not 1 <= user_id <= INT_MAX:
        raise NotFound(f"No user with id {user_id}.", param=param)
    row = conn.execute(select(users).where(
        users.c.id == user_id, users.c.deleted_at.is_(None))).mappings().first()
    if row is None or not actor.sees_company(row["company_id"]) or (
        actor.role == USER and user_id != actor.user_id
    ):
        raise NotFound(f"No user with id {user_id}.", param=param)
    return UserRecord(**row)


def _unique(conn: Connection, email: str) -> None:
    if conn.execute(select(users.c.id).where(
        users.c.email == email, users.c.deleted_at.is_(None))).first() is not None:
        raise Conflict(f"A user with the email '{email}' exists already.", param="email")


def create(store: Store, actor: Actor, *, email: str, company_id: int | None = None,
           name: str = "", role: str = USER, key_manager: bool = False,
           rate_limits: dict[str, Any] | None = None) -> UserRecord:
    limits = check_rate_limits(rate_limits)
    if limits:
        require_limit_setter(actor)
    email = check_email(email)
    name = check_text(name, "name", 200, min_len=0)
    check_choice(role, "role", ROLES)
    if company_id is None:
        if actor.company_id is None:
            raise InvalidRequest("'company_id' is required.", param="company_id",
                                 code="missing_field")
        company_id = actor.company_id
    with store.change(actor.audit_columns()) as ch:
        live_company(ch.conn, actor, company_id, param="company_id")
        require_rank(actor, role, "create")
        _unique(ch.conn, email)
        user_id = ch.conn.execute(insert(users).values(
            company_id=company_id, email=email, name=name, role=role,
            key_manager=key_manager, rate_limits=limits, version=ch.version,
            created_at=ch.at, updated_at=ch.at).returning(users.c.id)).scalar_one()
        ch.audit("user.create", "user", user_id, company_id, {
            "email": [None, email], "name": [None, name], "role": [None, role],
            "key_manager": [None, key_manager], "rate_limits": [None, limits]})
        return live_user(ch.conn, actor, user_id)


def get(store: Store, actor: Actor, user_id: int) -> UserRecord:
    with store.read() as conn:
        return live_user(conn, actor, user_id)


def list_(store: Store, actor: Actor, *, company_id: int | None = None, limit: int = 20,
          after: int | None = None) -> Page[UserRecord]:
    query = select(users).where(users.c.deleted_at.is_(None))
    if company_id is not None:
        query = query.where(users.c.company_id == company_id)
    if not actor.is_admin:  # a filter narrows the scope, never widens it
        query = query.where(users.c.company_id == actor.company_id)
    if actor.role == USER:
        query = query.where(users.c.id == actor.user_id)
    with store.read() as conn:
        rows, more = page(conn, query, users.c.id, after, limit)
    return Page([UserRecord(**r) for r in rows], more)


def update(store: Store, actor: Actor, user_id: int, **changes: Any) -> UserRecord:
    """Change ``email``, ``name``, ``role``, ``key_manager`` or ``rate_limits`` (the
    kinds given replace the current ones; null removes one, or all); only those given."""
    unknown = set(changes) - {"email", "name", "role", "key_manager", "rate_limits"}
    if unknown:
        raise InvalidRequest(f"Unknown user fields: {', '.join(sorted(unknown))}.")
    with store.change(actor.audit_columns()) as ch:
        before = live_user(ch.conn, actor, user_id)
        if "rate_limits" in changes:
            require_limit_setter(actor)
            changes["rate_limits"] = merge_rate_limits(before.rate_limits,
                                                       changes["rate_limits"])
        if "email" in changes:
            changes["email"] = check_email(changes["email"])
        if "name" in changes:
            check_text(changes["name"], "name", 200, min_len=0)
        if "role" in changes:
            check_choice(changes["role"], "role", ROLES)
        require_rank(actor, before.role, "change")
        diff = {k: [getattr(before, k), v] for k, v in changes.items()
                if getattr(before, k) != v}
        if "role" in diff:
            if user_id == actor.user_id:
                raise PermissionDenied("Nobody may change their own role.")
            require_rank(actor, changes["role"], "grant")
            if before.builtin:
                raise Conflict("A built-in user's role cannot be changed.")
        if not diff:
            return before
        if "email" in diff:
            _unique(ch.conn, changes["email"])
        ch.conn.execute(sql_update(users).where(users.c.id == user_id).values(
            **{k: changes[k] for k in diff}, version=ch.version, updated_at=ch.at))
        ch.audit("user.update", "user", user_id, before.company_id, diff)
        return live_user(ch.conn, actor, user_id)


def delete(store: Store, actor: Actor, user_id: int) -> UserRecord:
    with store.change(actor.audit_columns()) as ch:
        user = live_user(ch.conn, actor, user_id)
        require_rank(actor, user.role, "delete")
        if user.builtin:
            raise Conflict("A built-in user cannot be deleted.")
        if user_id == actor.user_id:
            raise Conflict("Nobody may delete themselves.")
        delete_users(ch, [user_id])
        return user


def delete_users(ch: Change, user_ids: list[int]) -> int:
    """Mark users deleted and revoke their keys (one audit row each); how many keys."""
    if not user_ids:
        return 0
    revoked = 0
    for start in range(0, len(user_ids), 500):
        chunk = user_ids[start:start + 500]
        for user in ch.conn.execute(select(users).where(users.c.id.in_(chunk))).mappings():
            ch.audit("user.delete", "user", user["id"], user["company_id"],
                     {"email": [user["email"], None]})
        ch.conn.execute(sql_update(users).where(users.c.id.in_(chunk)).values(
            deleted_at=ch.at, version=ch.version, updated_at=ch.at))
        revoked += ch.conn.execute(sql_update(api_keys).where(
            api_keys.c.user_id.in_(chunk), api_keys.c.revoked_at.is_(None)).values(
            revoked_at=ch.at, version=ch.version)).rowcount
    return revoked


def ensure_builtin(ch: Change, kind: str) -> UserRecord:
    """The built-in user ``kind`` (system_admin or default_user), made on first use."""
    row = ch.conn.execute(select(users).where(users.c.builtin == kind)).mappings().first()
    if row is None:
        email, name, role = _BUILTIN[kind]
        user_id = ch.conn.execute(insert(users).values(
            company_id=1, email=email, name=name, role=role, key_manager=True,
            builtin=kind, version=ch.version, created_at=ch.at, updated_at=ch.at
        ).returning(users.c.id)).scalar_one()
        ch.audit("user.create", "user", user_id, 1, {"builtin": [None, kind]})
        row = ch.conn.execute(select(users).where(users.c.id == user_id)).mappings().one()
    return UserRecord(**row)


def role_of(conn: Connection, user_id: int) -> str:
    """A user's role, deleted or not (a key outlives nothing, but its row stays)."""
    return str(conn.execute(select(users.c.role).where(users.c.id == user_id)).scalar_one())


def active_key_count(conn: Connection, user_id: int, at: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(api_keys).where(
        api_keys.c.user_id == user_id, api_keys.c.revoked_at.is_(None),
        (api_keys.c.expires_at.is_(None)) | (api_keys.c.expires_at > at))).scalar_one())
