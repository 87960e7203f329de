"""``/api/v2/api-keys``: a key's ``{id}`` is its public id (``pg-<id>-<secret>``). The
secret is in the answers to create and rotate, once."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .. import schemas as s
from .. import views
from ..control import keys
from ..control.common import from_unix
from ..errors import NotFound
from ..gateway import Gateway
from ..routing import Request, query
from .common import actor, body, changed, reply, run

__all__ = ["create", "list_", "retrieve", "revoke", "rotate", "update"]


def _key_id(r: Request) -> str:
    raw = r.path_param
    if not (len(raw) == 12 and all(c in "0123456789abcdef" for c in raw)):
        raise NotFound(f"No API key with id {raw[:40]!r}.")
    return raw


def _expiry(value: int | None) -> datetime | None:
    return None if value is None else from_unix(value, "expires_at")


async def list_(gw: Gateway, r: Request) -> None:
    q = query(r, limit=int, after=str, user_id=int, company_id=int, state=str)
    found = await run(gw, keys.list_, gw.store, actor(gw, r), **q)
    data = [views.key(k) for k in found.data]
    await reply(r, 200, views.listing(s.ApiKeyList, data, found.has_more))


async def create(gw: Gateway, r: Request) -> None:
    b = await body(gw, r, s.ApiKeyCreate)
    fields: dict[str, Any] = s.given(b)
    if "expires_at" in fields:
        fields["expires_at"] = _expiry(fields["expires_at"])
    made = await run(gw, keys.create, gw.store, actor(gw, r), **fields,
                     default_days=gw.settings.default_key_days,
                     max_keys=gw.settings.max_keys_per_user)
    await changed(gw)
    await reply(r, 201, views.key(made))


async def retrieve(gw: Gateway, r: Request) -> None:
    await reply(r, 200, views.key(await run(gw, keys.get, gw.store, actor(gw, r),
                                            _key_id(r))))


async def update(gw: Gateway, r: Request) -> None:
    key_id, who = _key_id(r), actor(gw, r)
    await run(gw, keys.get, gw.store, who, key_id)  # 404 before the body's 400
    b = await body(gw, r, s.ApiKeyUpdate)
    fields: dict[str, Any] = s.given(b)
    if "expires_at" in fields:
        fields["expires_at"] = _expiry(fields["expires_at"])
    done = await run(gw, keys.update, gw.store, who, key_id,
                     max_keys=gw.settings.max_keys_per_user, **fields)
    await changed(gw)
    await reply(r, 200, views.key(done))


async def revoke(gw: Gateway, r: Request) -> None:
    done = await run(gw, keys.revoke, gw.store, actor(gw, r), _key_id(r))
    await changed(gw)
    await reply(r, 200, views.key(done))


async def rotate(gw: Gateway, r: Request) -> None:
    done = await run(gw, keys.rotate, gw.store, actor(gw, r), _key_id(r),
                     grace_seconds=gw.settings.key_rotation_grace)
    await changed(gw)
    await reply(r, 200, views.key(done))
