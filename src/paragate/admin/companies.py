"""``/api/v2/companies``: system admins manage them; company admins read and rename
their own."""

from __future__ import annotations

from .. import schemas as s
from .. import views
from ..control import companies
from ..gateway import Gateway
from ..routing import Request, query
from .common import actor, body, changed, path_int, reply, run

__all__ = ["create", "delete", "list_", "retrieve", "update"]


async def list_(gw: Gateway, r: Request) -> None:
    q = query(r, limit=int, after=int)
    found = await run(gw, companies.list_, gw.store, actor(gw, r), **q)
    data = [views.company(c) for c in found.data]
    await reply(r, 200, views.listing(s.CompanyList, data, found.has_more))


async def create(gw: Gateway, r: Request) -> None:
    b = await body(gw, r, s.CompanyCreate)
    fields = s.given(b)
    made = await run(gw, companies.create, gw.store, actor(gw, r), fields.pop("name"),
                     **fields)
    await changed(gw)
    await reply(r, 201, views.company(made))


async def retrieve(gw: Gateway, r: Request) -> None:
    found = await run(gw, companies.get, gw.store, actor(gw, r), path_int(r, "company"))
    await reply(r, 200, views.company(found))


async def update(gw: Gateway, r: Request) -> None:
    company_id = path_int(r, "company")
    who = actor(gw, r)
    await run(gw, companies.get, gw.store, who, company_id)  # 404 before the body's 400
    b = await body(gw, r, s.CompanyUpdate)
    done = await run(gw, companies.update, gw.store, who, company_id, **s.given(b))
    await changed(gw)
    await reply(r, 200, views.company(done))


async def delete(gw: Gateway, r: Request) -> None:
    gone = await run(gw, companies.delete, gw.store, actor(gw, r), path_int(r, "company"))
    await changed(gw)
    await reply(r, 200, s.Deleted(object="company", id=gone.id, deleted=True))
