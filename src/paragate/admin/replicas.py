"""``GET, POST /api/v2/models/{name}/replicas``, ``PATCH, DELETE
/api/v2/models/{name}/replicas/{id}``: system admins only. The state, in-flight count,
latency and errors are this gateway process's view of each replica."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import schemas as s
from .. import views
from ..control import replicas
from ..errors import NotFound
from ..gateway import Gateway
from ..routing import Request
from .common import actor, body, changed, reply, run

if TYPE_CHECKING:
    from ..store import ReplicaRecord

__all__ = ["create", "delete", "list_", "update"]


def _id(r: Request) -> int:
    raw = r.sub_param
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise NotFound(f"No replica with id {raw[:40]!r}.", param="replica",
                       code="replica_not_found")
    return int(raw)


def _view(gw: Gateway, model: str, record: ReplicaRecord) -> s.Replica:
    gw.health.sync()  # a change just applied reaches the balancer's replicas now
    return views.replica(model, record, gw.balancer.replica(record.id),
                         gw.balancer.discovered(record.id))


async def list_(gw: Gateway, r: Request) -> None:
    model, found = await run(gw, replicas.list_, gw.store, actor(gw, r), r.path_param)
    data = [_view(gw, model.name, x) for x in found]
    await reply(r, 200, views.listing(s.ReplicaList, data))


async def create(gw: Gateway, r: Request) -> None:
    who = actor(gw, r)
    await run(gw, replicas.list_, gw.store, who, r.path_param)  # 404 before the body's 400
    b = await body(gw, r, s.ReplicaCreate)
    made = await run(gw, replicas.create, gw.store, who, r.path_param, **s.given(b))
    await changed(gw)
    await reply(r, 201, _view(gw, r.path_param, made))


async def update(gw: Gateway, r: Request) -> None:
    who = actor(gw, r)
    replica_id = _id(r)
    await run(gw, replicas.list_, gw.store, who, r.path_param)
    b = await body(gw, r, s.ReplicaUpdate)
    done = await run(gw, replicas.update, gw.store, who, r.path_param, replica_id,
                     **s.given(b))
    await changed(gw)
    await reply(r, 200, _view(gw, r.path_param, done))


async def delete(gw: Gateway, r: Request) -> None:
    gone = await run(gw, replicas.delete, gw.store, actor(gw, r), r.path_param, _id(r))
    await changed(gw)
    await reply(r, 200, s.Deleted(object="model.replica", id=gone.id, deleted=True))
