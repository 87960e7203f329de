"""``/api/v2/users``: system admins manage every user; company admins their own
company's, never above their own role."""

from __future__ import annotations

from .. import schemas as s
from .. import views
from ..control import users
from ..gateway import Gateway
from ..routing import Request, query
from .common import actor, body, changed, path_int, reply, run

__all__ = ["create", "delete", "list_", "retrieve", "update"]


async def list_(gw: Gateway, r: Request) -> None:
    q = query(r, limit=int, after=int, company_id=int)
    found = await run(gw, users.list_, gw.store, actor(gw, r), **q)
    data = [views.user(u) for u in found.data]
    await reply(r, 200, views.listing(s.UserList, data, found.has_more))


async def create(gw: Gateway, r: Request) -> None:
    b = await body(gw, r, s.UserCreate)
    made = await run(gw, users.create, gw.store, actor(gw, r), **s.given(b))
    await changed(gw)
    await reply(r, 201, views.user(made))


async def retrieve(gw: Gateway, r: Request) -> None:
    found = await run(gw, users.get, gw.store, actor(gw, r), path_int(r, "user"))
    await reply(r, 200, views.user(found))


async def update(gw: Gateway, r: Request) -> None:
    user_id = path_int(r, "user")
    who = actor(gw, r)
    await run(gw, users.get, gw.store, who, user_id)  # 404 before the body's 400
    b = await body(gw, r, s.UserUpdate)
    done = await run(gw, users.update, gw.store, who, user_id, **s.given(b))
    await changed(gw)
    await reply(r, 200, views.user(done))


async def delete(gw: Gateway, r: Request) -> None:
    gone = await run(gw, users.delete, gw.store, actor(gw, r), path_int(r, "user"))
    await changed(gw)
    await reply(r, 200, s.Deleted(object="user", id=gone.id, deleted=True))
