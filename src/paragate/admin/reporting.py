"""``GET /api/v2/reporting/usage``: usage per bucket and group, as JSON or CSV."""

from __future__ import annotations

import msgspec

from ..asgi import send_json, start_response
from ..control import usage
from ..errors import InvalidRequest
from ..gateway import Gateway
from ..routing import Request, query
from .common import actor, run

__all__ = ["usage_report"]

_MAX_LIMIT = 100_000


async def usage_report(gw: Gateway, r: Request) -> None:
    q = query(r, start_date=str, end_date=str, bucket=str, group_by=str, company_id=int,
              user_id=int, key_id=str, model=str, format=str, limit=int, offset=int)
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest(f"'format' must be json or csv; got {fmt[:20]!r}.",
                             param="format")
    limit, offset = q.get("limit", 10_000), q.get("offset", 0)
    if not 1 <= limit <= _MAX_LIMIT:
        raise InvalidRequest(f"'limit' must be between 1 and {_MAX_LIMIT}.", param="limit")
    if offset < 0:
        raise InvalidRequest("'offset' must not be negative.", param="offset")
    report_query, key = usage.query(
        start_date=q.get("start_date"), end_date=q.get("end_date"), bucket=q.get("bucket"),
        group_by=q.get("group_by"), company_id=q.get("company_id"),
        user_id=q.get("user_id"), key_id=q.get("key_id"), model=q.get("model"))
    data = await run(gw, usage.report, gw.store, actor(gw, r), report_query, key)
    if fmt == "csv":  # every row: an export
        body = usage.to_csv(data, report_query.group_by).encode()
        await start_response(r.send, 200, [(b"content-type", b"text/csv; charset=utf-8")])
        await r.send({"type": "http.response.body", "body": body, "more_body": False})
        return
    page = data[offset:offset + limit]
    await send_json(r.send, 200, msgspec.json.encode(
        {"object": "list", "data": page, "has_more": offset + limit < len(data)}))
