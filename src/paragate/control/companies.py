"""Companies: created and deleted by system admins; a company admin reads and renames
their own. Deleting one deletes its users and revokes their keys; their usage and audit
history stays readable (rows are marked deleted, never removed)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, insert, select
from sqlalchemy import update as sql_update

from ..errors import Conflict, InvalidRequest
from ..limits.spec import check_rate_limits, merge_rate_limits
from ..store import Change, CompanyRecord, Store
from ..store.schema import companies, users
from .common import Actor, Page, check_text, live_company, page, require_admin
from .users import delete_users

__all__ = ["DEFAULT_COMPANY", "create", "delete", "get", "list_", "update"]

DEFAULT_COMPANY = 1  # made by the migrations; where the CLI's keys live by default
_NAME_MAX = 200


def _unique(conn: Connection, name: str, but: int | None = None) -> None:
    query = select(companies.c.id).where(
        func.lower(companies.c.name) == name.lower(), companies.c.deleted_at.is_(None))
    if but is not None:
        query = query.where(companies.c.id != but)
    if conn.execute(query).first() is not None:
        raise Conflict(f"A company named '{name}' exists already.", param="name")


def create(store: Store, actor: Actor, name: str, *,
           rate_limits: dict[str, Any] | None = None,
           allow_priority: bool = False) -> CompanyRecord:
    require_admin(actor)
    name = check_text(name, "name", _NAME_MAX)
    limits = check_rate_limits(rate_limits)
    with store.change(actor.audit_columns()) as ch:
        _unique(ch.conn, name)
        company_id = ch.conn.execute(insert(companies).values(
            name=name, builtin=False, rate_limits=limits, allow_priority=allow_priority,
            version=ch.version, created_at=ch.at,
            updated_at=ch.at).returning(companies.c.id)).scalar_one()
        ch.audit("company.create", "company", company_id, company_id,
                 {"name": [None, name], "rate_limits": [None, limits],
                  "allow_priority": [None, allow_priority]})
        return live_company(ch.conn, actor, company_id)


def get(store: Store, actor: Actor, company_id: int) -> CompanyRecord:
    with store.read() as conn:
        return live_company(conn, actor, company_id)


def list_(store: Store, actor: Actor, *, limit: int = 20, after: int | None = None
          ) -> Page[CompanyRecord]:
    query = select(companies).where(companies.c.deleted_at.is_(None))
    if not actor.is_admin:  # a company admin sees their own, whatever they ask
        query = query.where(companies.c.id == actor.company_id)
    with store.read() as conn:
        rows, more = page(conn, query, companies.c.id, after, limit)
    return Page([CompanyRecord(**r) for r in rows], more)


def update(store: Store, actor: Actor, company_id: int, **changes: Any) -> CompanyRecord:
    """Change ``name`` (company admins may rename their own), ``rate_limits`` (the
    kinds given replace the current ones; null removes one, or all) or
    ``allow_priority`` (system admins only); only those given."""
    unknown = set(changes) - {"name", "rate_limits", "allow_priority"}
    if unknown:
        raise InvalidRequest(f"Unknown company fields: {', '.join(sorted(unknown))}.")
    with store.change(actor.audit_columns()) as ch:
        before = live_company(ch.conn, actor, company_id)
        values: dict[str, Any] = {}
        if changes.get("name") is not None:
            values["name"] = check_text(changes["name"], "name", _NAME_MAX)
        if "rate_limits" in changes:
            require_admin(actor)
            values["rate_limits"] = merge_rate_limits(before.rate_limits,
                                                      changes["rate_limits"])
        if "allow_priority" in changes:
            require_admin(actor)
            values["allow_priority"] = bool(changes["allow_priority"])
        diff = {k: [getattr(before, k), v] for k, v in values.items()
                if getattr(before, k) != v}
        if not diff:
            return before
        if "name" in diff:
            _unique(ch.conn, values["name"], but=company_id)
        ch.conn.execute(sql_update(companies).where(companies.c.id == company_id).values(
            **{k: values[k] for k in diff}, version=ch.version, updated_at=ch.at))
        ch.audit("company.update", "company", company_id, company_id, diff)
        return live_company(ch.conn, actor, company_id)


def delete(store: Store, actor: Actor, company_id: int) -> CompanyRecord:
    with store.change(actor.audit_columns()) as ch:
        company = live_company(ch.conn, actor, company_id)
        require_admin(actor)
        if company.builtin:
            raise Conflict("The default company cannot be deleted; it holds the built-in "
                           "users and the keys made by the CLI.")
        _delete(ch, company)
        return company


def _delete(ch: Change, company: CompanyRecord) -> None:
    user_ids = list(ch.conn.execute(select(users.c.id).where(
        users.c.company_id == company.id, users.c.deleted_at.is_(None))).scalars())
    revoked = delete_users(ch, user_ids)
    ch.conn.execute(sql_update(companies).where(companies.c.id == company.id).values(
        deleted_at=ch.at, version=ch.version, updated_at=ch.at))
    ch.audit("company.delete", "company", company.id, company.id,
             {"name": [company.name, None], "users_deleted": [None, len(user_ids)],
              "keys_revoked": [None, revoked]})
