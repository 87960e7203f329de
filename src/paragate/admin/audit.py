"""``GET /api/v2/audit-log`` and ``GET /api/v2/me``."""

from __future__ import annotations

from .. import schemas as s
from .. import views
from ..control import audit as audit_log
from ..control.common import from_unix
from ..gateway import Gateway
from ..routing import Request, query
from .common import actor, reply, run

__all__ = ["list_", "me"]


async def list_(gw: Gateway, r: Request) -> None:
    q = query(r, limit=int, after=int, actor=str, action=str, target=str, since=int,
              until=int)
    found = await run(
        gw, audit_log.list_, gw.store, actor(gw, r), actor_filter=q.get("actor"),
        action=q.get("action"), target=q.get("target"),
        since=from_unix(q["since"], "since") if "since" in q else None,
        until=from_unix(q["until"], "until") if "until" in q else None,
        limit=q.get("limit", 20), after=q.get("after"))
    data = [views.audit(a) for a in found.data]
    await reply(r, 200, views.listing(s.AuditEntryList, data, found.has_more))


async def me(gw: Gateway, r: Request) -> None:
    """The caller's key, user and company, from the in-memory view (no query)."""
    who = r.caller
    user = gw.registry.users[who.user_id]
    company = gw.registry.companies[who.company_id]
    await reply(r, 200, s.Me(
        key=s.MeKey(id=who.public_id, name=who.name, prefix=f"pg-{who.public_id}",
                    expires_at=int(who.expires_at) if who.expires_at is not None else None,
                    models=gw.registry.model_names(who.model_ids),
                    usage_opt_in=who.usage_opt_in),
        user=s.MeUser(id=user.id, email=user.email, name=user.name,
                      role=user.role, key_manager=user.key_manager),  # type: ignore[arg-type]
        company=s.MeCompany(id=company.id, name=company.name),
        role=who.role))  # type: ignore[arg-type]
