"""Reading the audit log: system admins read all of it, company admins the rows about
their own company."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from ..store import AuditRecord, Store, audit_of
from ..store.schema import audit_log
from .common import Actor, Page, page

__all__ = ["list_"]


def list_(store: Store, actor: Actor, *, actor_filter: str | None = None,
          action: str | None = None, target: str | None = None,
          since: datetime | None = None, until: datetime | None = None, limit: int = 20,
          after: int | None = None) -> Page[AuditRecord]:
    """Newest last. ``actor_filter``: a user id, a key's public id, or ``cli``;
    ``action``: exact (``api_key.revoke``) or a prefix ending in a dot (``api_key.``);
    ``target``: an id, or ``type:id`` (``company:3``)."""
    query = select(audit_log)
    if not actor.is_admin:
        query = query.where(audit_log.c.company_id == actor.company_id)
    if actor_filter is not None:
        if actor_filter == "cli":
            query = query.where(audit_log.c.actor_type == "cli")
        elif actor_filter.isascii() and actor_filter.isdigit() and len(actor_filter) <= 18:
            query = query.where(audit_log.c.actor_user_id == int(actor_filter))
        else:
            query = query.where(audit_log.c.actor_key == actor_filter)
    if action is not None:
        query = query.where(audit_log.c.action.startswith(action, autoescape=True)
                            if action.endswith(".") else audit_log.c.action == action)
    if target is not None:
        kind, sep, ident = target.partition(":")
        query = query.where(audit_log.c.target_id == (ident if sep else kind))
        if sep:
            query = query.where(audit_log.c.target_type == kind)
    if since is not None:
        query = query.where(audit_log.c.created_at >= since)
    if until is not None:
        query = query.where(audit_log.c.created_at < until)
    with store.read() as conn:
        rows, more = page(conn, query, audit_log.c.id, after, limit)
    return Page([audit_of(r) for r in rows], more)
