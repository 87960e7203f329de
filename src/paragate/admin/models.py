"""``POST /api/v2/models``, ``PATCH`` and ``DELETE /api/v2/models/{name}``: system
admins only. (Reading models is the data plane's: ``routes.list_models``.)"""

from __future__ import annotations

from typing import Any

from .. import schemas as s
from .. import views
from ..control import models
from ..errors import ModelNotFound
from ..gateway import Gateway
from ..routing import Request
from .common import actor, body, changed, reply, run

__all__ = ["create", "delete", "update"]


def _fields(b: s.ModelCreate | s.ModelUpdate) -> dict[str, Any]:
    fields = s.given(b)
    if "companies" in fields:
        fields["company_ids"] = fields.pop("companies")
    limits = fields.pop("limits", None)
    if limits is not None:
        fields.update(s.given(limits))
    timeouts = fields.pop("timeouts", None)
    if timeouts is not None:
        fields.update({f"{k}_timeout": v for k, v in s.given(timeouts).items()})
    return fields


async def _answer(gw: Gateway, r: Request, status: int, model_id: int) -> None:
    await changed(gw)
    route = gw.registry.catalog.get(model_id)
    if route is None:  # pragma: no cover - the change was just applied
        raise ModelNotFound(str(model_id))
    await reply(r, status, views.model(route, config=True))


async def create(gw: Gateway, r: Request) -> None:
    b = await body(gw, r, s.ModelCreate)
    fields = _fields(b)
    made = await run(gw, models.create, gw.store, actor(gw, r), fields.pop("name"), **fields)
    await _answer(gw, r, 201, made.id)


async def update(gw: Gateway, r: Request) -> None:
    who = actor(gw, r)
    await run(gw, models.get, gw.store, who, r.path_param)  # 404 before the body's 400
    b = await body(gw, r, s.ModelUpdate)
    done = await run(gw, models.update, gw.store, who, r.path_param, **_fields(b))
    await _answer(gw, r, 200, done.id)


async def delete(gw: Gateway, r: Request) -> None:
    gone = await run(gw, models.delete, gw.store, actor(gw, r), r.path_param)
    await changed(gw)
    await reply(r, 200, s.Deleted(object="model", id=gone.name, deleted=True))
