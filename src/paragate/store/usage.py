"""Usage in the store: records written idempotently together with their rollups, reports
read from the coarsest rollup that can answer them, raw records pruned after retention.

Idempotent: the raw insert is ``ON CONFLICT (request_id) DO NOTHING RETURNING
request_id``, and the rollups are incremented, in the same transaction, from the records
that insert returned. A batch replayed after a commit whose acknowledgement was lost
inserts nothing and adds nothing.
"""

from __future__ import annotations

import calendar
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table, and_, case, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from .records import UsageRecord
from .schema import (
    HISTOGRAM_BUCKETS,
    LATENCY_BOUNDS,
    ROLLUP_DIMS,
    usage_daily,
    usage_daily_company,
    usage_hourly,
    usage_records,
)

__all__ = ["DIMENSIONS", "ERROR_OUTCOMES", "ReportQuery", "ReportRow", "bucket_of",
           "percentile", "prune", "report", "write"]

HOUR = 3600
DAY = 86400
DIMENSIONS = ROLLUP_DIMS  # company_id, user_id, key_id, model
# What `errors` counts: the gateway or the upstream failed the request. A client that
# hangs up is not an error (its record says client_disconnected).
ERROR_OUTCOMES = frozenset({"error", "upstream_error", "shutdown"})
_SUMS = ("requests", "errors", "partial", "prompt_tokens", "completion_tokens",
         "cached_tokens", "duration_ms")


def bucket_of(ms: float) -> int:
    """The histogram bucket of a latency in milliseconds."""
    return bisect_right(LATENCY_BOUNDS, ms)


def percentile(histogram: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of the values counted in ``histogram``, interpolated linearly
    inside its bucket; None when it counts nothing."""
    total = sum(histogram)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(histogram):
        if count and seen + count >= rank:
            low = LATENCY_BOUNDS[i - 1] if i else 0.0
            if i == len(LATENCY_BOUNDS):
                return round(low, 1)  # the open-ended last bucket
            high = LATENCY_BOUNDS[i]
            return round(low + (high - low) * max(rank - seen, 0) / count, 1)
        seen += count
    return round(LATENCY_BOUNDS[-1], 1)  # pragma: no cover - rank <= total


def month_start(ts: int) -> int:
    t = datetime.fromtimestamp(ts, UTC)
    return calendar.timegm((t.year, t.month, 1, 0, 0, 0))


def _epoch(t: datetime) -> int:
    return calendar.timegm(t.utctimetuple())


# -- writing --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rollup:
    table: Table
    grain: int  # HOUR or DAY
    dims: tuple[str, ...]
    month: bool  # also keeps the month the day is in

    def key(self, r: UsageRecord) -> tuple[Any, ...]:
        ts = int(r.created_at.timestamp())
        bucket = ts - ts % self.grain
        values = {"company_id": r.company_id or 0, "user_id": r.user_id or 0,
                  "key_id": r.key_id or 0, "model": r.model if r.model_id else ""}
        key = (bucket, *(values[d] for d in self.dims))
        return (*key, month_start(bucket)) if self.month else key

    @property
    def key_columns(self) -> list[str]:
        return ["bucket", *self.dims, *(["month"] if self.month else [])]


ROLLUPS = (
    _Rollup(usage_hourly, HOUR, DIMENSIONS, month=False),
    _Rollup(usage_daily, DAY, DIMENSIONS, month=True),
    _Rollup(usage_daily_company, DAY, ("company_id", "model"), month=True),
)


def _insert(conn: Connection, table: Table) -> Any:
    return (postgresql.insert(table) if conn.dialect.name == "postgresql"
            else sqlite.insert(table))


def _sums(records: Iterable[UsageRecord], rollup: _Rollup) -> list[dict[str, Any]]:
    rows: dict[tuple[Any, ...], list[int]] = {}
    width = len(_SUMS)
    for r in records:
        sums = rows.get(key := rollup.key(r))
        if sums is None:
            sums = rows[key] = [0] * (width + 2 * HISTOGRAM_BUCKETS)
        sums[0] += 1
        sums[1] += r.outcome in ERROR_OUTCOMES
        sums[2] += r.partial
        sums[3] += r.prompt_tokens or 0
        sums[4] += r.completion_tokens or 0
        sums[5] += r.cached_tokens or 0
        sums[6] += r.duration_ms
        sums[width + bucket_of(r.duration_ms)] += 1
        if r.ttft_ms is not None:
            sums[width + HISTOGRAM_BUCKETS + bucket_of(r.ttft_ms)] += 1
    names = [*_SUMS, *(f"lat{i}" for i in range(HISTOGRAM_BUCKETS)),
             *(f"ttft{i}" for i in range(HISTOGRAM_BUCKETS))]
    cols = rollup.key_columns
    # in key order, so that concurrent writers lock rows in the same order (no deadlock)
    return [dict(zip(cols, key, strict=True)) | dict(zip(names, sums, strict=True))
            for key, sums in sorted(rows.items())]


def add_rollups(conn: Connection, records: Sequence[UsageRecord]) -> None:
    """Add ``records`` (already inserted) to every rollup."""
    if not records:
        return
    for rollup in ROLLUPS:
        rows = _sums(records, rollup)
        table = rollup.table
        stmt = _insert(conn, table)
        added = [c for c in rows[0] if c not in rollup.key_columns]
        stmt = stmt.on_conflict_do_update(
            index_elements=rollup.key_columns,
            set_={c: table.c[c] + stmt.excluded[c] for c in added})
        conn.execute(stmt, rows)


def write(conn: Connection, records: Sequence[UsageRecord]) -> int:
    """Insert the records not there yet and add them to the rollups, in ``conn``'s
    transaction; returns how many were new."""
    if not records:
        return 0
    stmt = (_insert(conn, usage_records)
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(usage_records.c.request_id))
    rows = [_row(r) for r in records]
    inserted = set(conn.execute(stmt, rows).scalars())
    new = [r for r in records if r.request_id in inserted]
    add_rollups(conn, new)
    return len(new)


_FIELDS = UsageRecord.__slots__


def _row(r: UsageRecord) -> dict[str, Any]:
    return {name: getattr(r, name) for name in _FIELDS}


def prune(conn: Connection, before: datetime, *, limit: int = 10_000) -> int:
    """Delete at most ``limit`` raw records older than ``before`` (the rollups stay)."""
    ids = select(usage_records.c.id).where(usage_records.c.created_at < before).limit(limit)
    result = conn.execute(usage_records.delete().where(usage_records.c.id.in_(ids)))
    return result.rowcount or 0


# -- reports --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportQuery:
    start: datetime
    end: datetime  # exclusive
    bucket: str = "day"  # hour | day | month
    group_by: tuple[str, ...] = ()  # among DIMENSIONS
    company_id: int | None = None
    user_id: int | None = None
    key_id: int | None = None
    model: str | None = None


@dataclass(slots=True)
class ReportRow:
    bucket_start: datetime
    group: dict[str, Any]
    sums: list[int] = field(default_factory=lambda: [0] * len(_SUMS))
    latency: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)
    ttft: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)

    def value(self, name: str) -> int:
        return self.sums[_SUMS.index(name)]


def _ceil(ts: int, grain: int) -> int:
    return -(-ts // grain) * grain


def _floor(ts: int, grain: int) -> int:
    return ts - ts % grain


def _split(start: int, end: int, grain: int) -> Iterator[tuple[int, int]]:
    """[start, end) cut at every multiple of ``grain``: each piece lies in one hour (or
    day), so its bucket, whatever the report's, is one constant."""
    while start < end:
        edge = _floor(start, grain) + grain
        yield start, min(edge, end)
        start = edge


def _plan(q: ReportQuery) -> list[tuple[str, int, int]]:
    """The range cut into pieces, each answered by one source: ``raw`` for pieces
    shorter than an hour, ``hourly`` for whole hours, ``daily`` for whole days."""
    start, end = _epoch(q.start), _epoch(q.end)
    pieces: list[tuple[str, int, int]] = []
    h0, h1 = _ceil(start, HOUR), _floor(end, HOUR)
    if h0 >= h1:
        return [("raw", a, b) for a, b in _split(start, end, HOUR)]
    pieces += [("raw", a, b) for a, b in _split(start, h0, HOUR)]
    pieces += [("raw", a, b) for a, b in _split(h1, end, HOUR)]
    if q.bucket == "hour":
        return [*pieces, ("hourly", h0, h1)]
    d0, d1 = _ceil(h0, DAY), _floor(h1, DAY)
    if d0 >= d1:
        return pieces + [("hourly", a, b) for a, b in _split(h0, h1, DAY)]
    pieces += [("hourly", a, b) for a, b in _split(h0, d0, DAY)]
    pieces += [("hourly", a, b) for a, b in _split(d1, h1, DAY)]
    return [*pieces, ("daily", d0, d1)]


def _constant_bucket(ts: int, bucket: str) -> int:
    if bucket == "hour":
        return _floor(ts, HOUR)
    if bucket == "day":
        return _floor(ts, DAY)
    return month_start(ts)


def _histogram_sums(value: ColumnElement[Any]) -> list[ColumnElement[Any]]:
    bounds = (0.0, *LATENCY_BOUNDS)
    out: list[ColumnElement[Any]] = []
    for i in range(HISTOGRAM_BUCKETS):
        cond = value >= bounds[i] if i == len(LATENCY_BOUNDS) else and_(
            value >= bounds[i], value < bounds[i + 1])
        out.append(func.sum(case((cond, 1), else_=0)))
    return out


def _raw_select(q: ReportQuery, a: int, b: int) -> Any:
    t = usage_records.c
    dims: dict[str, ColumnElement[Any]] = {
        "company_id": func.coalesce(t.company_id, 0), "user_id": func.coalesce(t.user_id, 0),
        "key_id": func.coalesce(t.key_id, 0),
        "model": case((t.model_id.is_(None), ""), else_=t.model)}
    groups = [dims[d].label(d) for d in q.group_by]
    where = [t.created_at >= datetime.fromtimestamp(a, UTC),
             t.created_at < datetime.fromtimestamp(b, UTC)]
    for name in ("company_id", "user_id", "key_id"):
        if getattr(q, name) is not None:
            where.append(t[name] == getattr(q, name))
    if q.model is not None:
        where += [t.model == q.model, t.model_id.is_not(None)]
    sums = [func.count(), func.sum(case((t.outcome.in_(sorted(ERROR_OUTCOMES)), 1), else_=0)),
            func.sum(case((t.partial, 1), else_=0)), func.sum(t.prompt_tokens),
            func.sum(t.completion_tokens), func.sum(t.cached_tokens), func.sum(t.duration_ms)]
    return (select(literal(_constant_bucket(a, q.bucket)).label("b"), *groups, *sums,
                   *_histogram_sums(t.duration_ms), *_histogram_sums(t.ttft_ms))
            .where(*where).group_by(*groups))


def _rollup_select(q: ReportQuery, source: str, a: int, b: int) -> Any:
    if source == "hourly":
        table = usage_hourly
        bucket: ColumnElement[Any] = (table.c.bucket if q.bucket == "hour"
                                      else literal(_constant_bucket(a, q.bucket)))
    else:
        coarse = {*q.group_by} <= {"company_id", "model"} and q.user_id is None and (
            q.key_id is None)
        table = usage_daily_company if coarse else usage_daily
        bucket = table.c.bucket if q.bucket == "day" else table.c.month
    c = table.c
    groups = [c[d].label(d) for d in q.group_by]
    where = [c.bucket >= a, c.bucket < b]
    for name in ("company_id", "user_id", "key_id", "model"):
        if getattr(q, name) is not None:
            where.append(c[name] == getattr(q, name))
    cols = [*_SUMS, *(f"lat{i}" for i in range(HISTOGRAM_BUCKETS)),
            *(f"ttft{i}" for i in range(HISTOGRAM_BUCKETS))]
    return (select(bucket.label("b"), *groups, *(func.sum(c[n]) for n in cols))
            .where(*where).group_by(bucket, *groups))


def report(conn: Connection, q: ReportQuery) -> list[ReportRow]:
    """Rows per bucket and group, in order; totals equal the records exactly."""
    merged: dict[tuple[Any, ...], ReportRow] = {}
    width = len(_SUMS)
    for source, a, b in _plan(q):
        stmt = _raw_select(q, a, b) if source == "raw" else _rollup_select(q, source, a, b)
        for row in conn.execute(stmt):
            values = tuple(row)
            key = values[:1 + len(q.group_by)]
            if not values[len(key)]:
                continue  # an aggregate over no rows (no GROUP BY) still answers one
            out = merged.get(key)
            if out is None:
                out = merged[key] = ReportRow(
                    datetime.fromtimestamp(int(key[0]), UTC),
                    dict(zip(q.group_by, key[1:], strict=True)))
            nums = [int(v or 0) for v in values[len(key):]]
            for i in range(width):
                out.sums[i] += nums[i]
            for i in range(HISTOGRAM_BUCKETS):
                out.latency[i] += nums[width + i]
                out.ttft[i] += nums[width + HISTOGRAM_BUCKETS + i]
    return [merged[k] for k in sorted(merged, key=_order)]


def _order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((0, v) if isinstance(v, int) else (1, str(v)) for v in key)
