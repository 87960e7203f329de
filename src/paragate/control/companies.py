"""Companies: created and deleted by system admins; a company admin reads and renames
their own. Deleting one deletes its users and revokes their keys; their usage and audit
history stays readable (rows are marked deleted, never removed)."""

from __future__ import annotations

from sqlalchemy import Connection, func, insert, select
from sqlalchemy import update as sql_update

from ..errors import Conflict
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


def create(store: Store, actor: Actor, name: str) -> CompanyRecord:
    require_admin(actor)
    name = check_text(name, "name", _NAME_MAX)
    with store.change(actor.audit_columns()) as ch:
        _unique(ch.conn, name)
        company_id = ch.conn.execute(insert(companies).values(
            name=name, builtin=False, version=ch.version, created_at=ch.at,
            updated_at=ch.at).returning(companies.c.id)).scalar_one()
        ch.audit("company.create", "company", company_id, company_id,
                 {"name": [None, name]})
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


def update(store: Store, actor: Actor, company_id: int, *, name: str | None = None
           ) -> CompanyRecord:
    with store.change(actor.audit_columns()) as ch:
        before = live_company(ch.conn, actor, company_id)
        if name is None or name == before.name:
            return before
        name = check_text(name, "name", _NAME_MAX)
        _unique(ch.conn, name, but=company_id)
        ch.conn.execute(sql_update(companies).where(companies.c.id == company_id).values(
            name=name, version=ch.version, updated_at=ch.at))
        ch.audit("company.update", "company", company_id, company_id,
                 {"name": [before.name, name]})
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
