"""Usage reports: the query checked and scoped to the caller, answered from the store's
rollups (``store.usage``), rendered as rows for JSON, CSV or a terminal table.

Scope: a system admin sees everything; a company admin their own company; a user their
own keys. A filter naming what is outside the scope is a 403 that says so.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import select

from ..access import ADMIN, COMPANY_ADMIN
from ..errors import InvalidRequest, PermissionDenied
from ..store import Store
from ..store.schema import api_keys
from ..store.usage import DIMENSIONS, ReportQuery, ReportRow, percentile
from .common import Actor

__all__ = ["BUCKETS", "COLUMNS", "GROUPS", "parse_group_by", "parse_time", "query",
           "report", "rows", "to_csv", "to_table"]

BUCKETS = ("hour", "day", "month")
# what `group_by` names -> the column it adds to each row
GROUPS = {"company": "company_id", "user": "user_id", "key": "key_id", "model": "model"}
COLUMNS = ("bucket_start", *GROUPS.values(), "requests", "errors", "partial",
           "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
           "latency_ms_p50", "latency_ms_p95", "ttft_ms_p50")


def parse_time(value: str, name: str) -> datetime:
    """A UTC ISO date (``2026-12-01``) or date-time (``2026-12-01T10:00:00Z``, an
    offset, or none: UTC)."""
    try:
        if len(value) == 10:
            d = date.fromisoformat(value)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        t = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"'{name}' must be an ISO date (2026-12-01) or date-time "
            f"(2026-12-01T10:00:00Z), got {value[:40]!r}.", param=name) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def parse_group_by(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise InvalidRequest(f"'group_by' may name {', '.join(GROUPS)}; got "
                             f"{unknown[0][:40]!r}.", param="group_by")
    return tuple(dict.fromkeys(GROUPS[n] for n in names))  # in order, once each


def query(*, start_date: str | None = None, end_date: str | None = None,
          bucket: str | None = None, group_by: str | None = None,
          company_id: int | None = None, user_id: int | None = None,
          key_id: str | None = None, model: str | None = None) -> tuple[ReportQuery, str | None]:
    """The checked query (key filter still a public id, returned beside it). Without
    dates: the last 30 days up to the end of today (UTC)."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    end = parse_time(end_date, "end_date") if end_date else today + timedelta(days=1)
    start = parse_time(start_date, "start_date") if start_date else end - timedelta(days=30)
    if start >= end:
        raise InvalidRequest("'start_date' must be before 'end_date' (which is exclusive).",
                             param="start_date")
    bucket = bucket or "day"
    if bucket not in BUCKETS:
        raise InvalidRequest(f"'bucket' must be one of {', '.join(BUCKETS)}; got "
                             f"{bucket[:40]!r}.", param="bucket")
    if bucket == "hour" and end - start > timedelta(days=93):
        raise InvalidRequest("An hourly report covers at most 93 days; narrow the dates "
                             "or use bucket=day.", param="bucket")
    return ReportQuery(start=start, end=end, bucket=bucket, group_by=parse_group_by(group_by),
                       company_id=company_id, user_id=user_id, model=model), key_id


def _scoped(actor: Actor, q: ReportQuery) -> ReportQuery:
    if actor.role == ADMIN:
        return q
    if q.company_id is not None and q.company_id != actor.company_id:
        raise PermissionDenied("Usage reports cover only your own company.")
    if actor.role == COMPANY_ADMIN:
        return _with(q, company_id=actor.company_id)
    if q.user_id is not None and q.user_id != actor.user_id:
        raise PermissionDenied("Usage reports cover only your own keys.")
    return _with(q, company_id=actor.company_id, user_id=actor.user_id)


def _with(q: ReportQuery, **changes: Any) -> ReportQuery:
    values = {name: getattr(q, name) for name in ReportQuery.__slots__}
    return ReportQuery(**(values | changes))


def report(store: Store, actor: Actor, q: ReportQuery,
           key_public_id: str | None = None) -> list[dict[str, Any]]:
    """The report's rows as plain values, in order (key ids are public ids)."""
    q = _scoped(actor, q)
    with store.read() as conn:
        if key_public_id is not None:
            key = conn.execute(select(api_keys.c.id).where(
                api_keys.c.public_id == key_public_id)).scalar()
            q = _with(q, key_id=key if key is not None else -1)  # unknown: no rows
        found = store.usage_report(q)
        ids = {r.group["key_id"] for r in found if "key_id" in r.group}
        public: dict[int, str] = {row.id: row.public_id for row in conn.execute(
            select(api_keys.c.id, api_keys.c.public_id).where(api_keys.c.id.in_(ids)))}
    return rows(found, q.group_by, public)


def rows(found: Sequence[ReportRow], group_by: Sequence[str],
         public: Mapping[int, str]) -> list[dict[str, Any]]:
    out = []
    for r in found:
        row: dict[str, Any] = {"bucket_start": r.bucket_start.strftime("%Y-%m-%dT%H:%M:%SZ")}
        for name in DIMENSIONS:
            if name in group_by:
                value = r.group[name]
                if name == "key_id":
                    value = public.get(value) if value else None
                row[name] = value or None  # 0 and "": none (a request that named no model)
        prompt, completion = r.value("prompt_tokens"), r.value("completion_tokens")
        row.update(requests=r.value("requests"), errors=r.value("errors"),
                   partial=r.value("partial"), prompt_tokens=prompt,
                   completion_tokens=completion, total_tokens=prompt + completion,
                   cached_tokens=r.value("cached_tokens"),
                   latency_ms_p50=percentile(r.latency, 0.5),
                   latency_ms_p95=percentile(r.latency, 0.95),
                   ttft_ms_p50=percentile(r.ttft, 0.5))
        out.append(row)
    return out


def _columns(group_by: Sequence[str]) -> list[str]:
    return [c for c in COLUMNS if c not in DIMENSIONS or c in group_by]


def to_csv(data: Sequence[Mapping[str, Any]], group_by: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = _columns(group_by)
    writer.writerow(columns)
    for row in data:
        writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    return out.getvalue()


def to_table(data: Sequence[Mapping[str, Any]], group_by: Sequence[str]) -> str:
    columns = _columns(group_by)
    cells = [[("-" if row.get(c) is None else str(row[c])) for c in columns] for row in data]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) if v[:1].isdigit() else v.ljust(w)
                        for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
