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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Table,
    case,
    func,
    literal,
    literal_column,
    select,
)
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

    @property
    def key_columns(self) -> list[str]:
        return ["bucket", *self.dims, *(["month"] if self.month else [])]


ROLLUPS = (
    _Rollup(usage_hourly, HOUR, DIMENSIONS, month=False),
    _Rollup(usage_daily, DAY, DIMENSIONS, month=True),
    _Rollup(usage_daily_company, DAY, ("company_id", "model"), month=True),
)
_SUM_COLUMNS = [*_SUMS, *(f"lat{i}" for i in range(HISTOGRAM_BUCKETS)),
                *(f"ttft{i}" for i in range(HISTOGRAM_BUCKETS))]


def upsert(conn: Connection, table: Table) -> Any:
    """An INSERT of the connection's dialect, which has ``on_conflict_do_*``."""
    return (postgresql.insert(table) if conn.dialect.name == "postgresql"
            else sqlite.insert(table))


def _dims() -> dict[str, ColumnElement[Any]]:
    """A record's dimensions as the rollups key them: 0 and "" for none."""
    t = usage_records.c
    return {"company_id": func.coalesce(t.company_id, 0),
            "user_id": func.coalesce(t.user_id, 0), "key_id": func.coalesce(t.key_id, 0),
            "model": case((t.model_id.is_(None), ""), else_=t.model)}


def _make_sums() -> list[ColumnElement[Any]]:
    t = usage_records.c
    return [func.count(), func.count().filter(t.outcome.in_(sorted(ERROR_OUTCOMES))),
            func.count().filter(t.partial), func.coalesce(func.sum(t.prompt_tokens), 0),
            func.coalesce(func.sum(t.completion_tokens), 0),
            func.coalesce(func.sum(t.cached_tokens), 0), func.sum(t.duration_ms),
            *(func.count().filter(t.lat_bucket == i) for i in range(HISTOGRAM_BUCKETS)),
            *(func.count().filter(t.ttft_bucket == i) for i in range(HISTOGRAM_BUCKETS))]


# Built once: the rollups' sums over raw records, in ``_SUM_COLUMNS`` order (each
# record's histogram buckets are stored with it, so a bucket is one comparison).
_RECORD_SUMS = _make_sums()
_DIMS = _dims()


def _epoch_bucket(conn: Connection, grain: int | None) -> ColumnElement[Any]:
    """The start (epoch seconds, UTC) of the hour, day (``grain``) or month (None) of a
    record's ``created_at``, in the database's own dialect."""
    created = usage_records.c.created_at
    if conn.dialect.name == "postgresql":
        if grain is None:
            return func.cast(func.date_part("epoch", func.date_trunc(
                "month", created, "UTC")), BigInteger)
        return func.cast(func.floor(func.date_part("epoch", created) / grain) * grain,
                         BigInteger)
    if grain is None:
        return func.cast(func.strftime("%s", created, "start of month"), BigInteger)
    return func.cast(func.strftime("%s", created), BigInteger) // grain * grain


def _rollup_statements(conn: Connection, where: ColumnElement[bool]) -> list[Any]:
    """One INSERT ... SELECT ... GROUP BY ... ON CONFLICT DO UPDATE per rollup, over the
    raw records ``where`` selects, summed by the database itself, in key order (so
    concurrent writers lock rows in the same order)."""
    out = []
    for rollup in ROLLUPS:
        keys = [_epoch_bucket(conn, rollup.grain), *(_DIMS[d] for d in rollup.dims)]
        if rollup.month:
            keys.append(_epoch_bucket(conn, None))
        columns = rollup.key_columns
        source = (select(*(k.label(c) for k, c in zip(keys, columns, strict=True)),
                         *_RECORD_SUMS)
                  .where(where).group_by(*keys).order_by(*keys))
        table = rollup.table
        stmt = upsert(conn, table).from_select([*columns, *_SUM_COLUMNS], source)
        out.append(stmt.on_conflict_do_update(
            index_elements=columns,
            set_={c: table.c[c] + stmt.excluded[c] for c in _SUM_COLUMNS}))
    return out


def add_rollups(conn: Connection, where: ColumnElement[bool]) -> None:
    """Add the raw records that ``where`` selects (just inserted) to every rollup."""
    for stmt in _rollup_statements(conn, where):
        conn.execute(stmt)


# The writer's rollup statements, compiled once per dialect to SQL text with one
# parameter: the new rows' ids (PostgreSQL), or the highest id before them (SQLite).
_ROLLUP_SQL: dict[str, list[str]] = {}
_NEW_ROWS = {"postgresql": ("usage_records.id = ANY(NEW_ROWS)", "%(ids)s"),
             "sqlite": ("usage_records.id > NEW_ROWS", "?")}


def _add_new_rows(conn: Connection, param: Any) -> None:
    name = conn.dialect.name
    sql = _ROLLUP_SQL.get(name)
    if sql is None:
        condition, placeholder = _NEW_ROWS[name]
        where = literal_column(condition, Boolean)
        sql = _ROLLUP_SQL[name] = [
            str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            .replace("NEW_ROWS", placeholder) for stmt in _rollup_statements(conn, where)]
    for statement in sql:
        conn.exec_driver_sql(statement, param)


def write(conn: Connection, records: Sequence[UsageRecord]) -> int:
    """Insert the records not there yet and add them to the rollups, in ``conn``'s
    transaction (which must not have begun yet); returns how many were new.

    This runs beside the request path for every request, so the raw rows go in by the
    cheapest way each database has, past SQLAlchemy's per-row handling (each value still
    passes its column type's bind processor). PostgreSQL: COPY into a temporary table,
    then one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING id``. SQLite (one
    writer at a time): the transaction takes the write lock first (``BEGIN IMMEDIATE``),
    the driver's executemany inserts, and the new rows are those above the highest id
    seen before."""
    if not records:
        return 0
    rows = _rows(conn, records)
    if conn.dialect.name == "postgresql":
        ids = _copy_in(conn, rows)
        if ids:
            _add_new_rows(conn, {"ids": ids})
        return len(ids)
    conn.exec_driver_sql("BEGIN IMMEDIATE")
    before = conn.execute(select(func.coalesce(func.max(usage_records.c.id), 0))).scalar_one()
    conn.exec_driver_sql(_compiled_insert(conn)[0], rows)
    new = conn.execute(select(func.count()).where(usage_records.c.id > before)).scalar_one()
    if new:
        _add_new_rows(conn, (before,))
    return int(new)


_COLUMNS = [*UsageRecord.__struct_fields__, "lat_bucket", "ttft_bucket"]
_Processors = list[tuple[int, Callable[[Any], Any]]]
_COMPILED: dict[str, tuple[str, list[str], _Processors]] = {}


def _compiled_insert(conn: Connection) -> tuple[str, list[str], _Processors]:
    """``INSERT ... ON CONFLICT (request_id) DO NOTHING`` compiled once per dialect: the
    SQL, its parameter names in order, and the (index, bind processor) pairs."""
    dialect = conn.dialect
    found = _COMPILED.get(dialect.name)
    if found is None:
        stmt = upsert(conn, usage_records).on_conflict_do_nothing(
            index_elements=["request_id"])
        compiled = stmt.compile(dialect=dialect, column_keys=_COLUMNS)
        names = list(compiled.positiontup or _COLUMNS)
        processors: _Processors = []
        for i, name in enumerate(names):
            process = usage_records.c[name].type.dialect_impl(dialect).bind_processor(
                dialect)
            if process is not None:
                processors.append((i, process))
        found = _COMPILED[dialect.name] = (str(compiled), names, processors)
    return found


def _rows(conn: Connection, records: Sequence[UsageRecord]) -> list[Any]:
    """Each record's values in the compiled statement's order, bind-processed (lists,
    for COPY, on PostgreSQL; tuples for SQLite's positional parameters)."""
    _, names, processors = _compiled_insert(conn)
    positional = conn.dialect.name != "postgresql"
    out: list[Any] = []
    fields = [n for n in names if n not in ("lat_bucket", "ttft_bucket")]
    lat, ttft = names.index("lat_bucket"), names.index("ttft_bucket")
    get = attrgetter(*fields)
    for r in records:
        values = list(get(r))
        values.insert(min(lat, ttft), None)
        values.insert(max(lat, ttft), None)
        values[lat] = bucket_of(r.duration_ms)
        values[ttft] = None if r.ttft_ms is None else bucket_of(r.ttft_ms)
        for i, process in processors:
            values[i] = process(values[i])
        out.append(tuple(values) if positional else values)
    return out


def _copy_in(conn: Connection, rows: list[Any]) -> list[int]:
    """PostgreSQL: the rows COPYed into a temporary table (emptied at commit), then
    inserted where their request id is new; the ids of the new rows."""
    _, names, _ = _compiled_insert(conn)
    columns = ", ".join(names)
    raw: Any = conn.connection.dbapi_connection
    with raw.cursor() as cur:
        cur.execute("CREATE TEMPORARY TABLE IF NOT EXISTS usage_incoming ON COMMIT DELETE "
                    f"ROWS AS SELECT {columns} FROM usage_records WITH NO DATA")
        with cur.copy(f"COPY usage_incoming ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(f"INSERT INTO usage_records ({columns}) SELECT {columns} FROM "
                    "usage_incoming ON CONFLICT (request_id) DO NOTHING RETURNING id")
        return [row[0] for row in cur.fetchall()]


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


def _raw_select(q: ReportQuery, a: int, b: int) -> Any:
    t = usage_records.c
    groups = [_DIMS[d].label(d) for d in q.group_by]
    where = [t.created_at >= datetime.fromtimestamp(a, UTC),
             t.created_at < datetime.fromtimestamp(b, UTC)]
    for name in ("company_id", "user_id", "key_id"):
        if getattr(q, name) is not None:
            where.append(t[name] == getattr(q, name))
    if q.model is not None:
        where += [t.model == q.model, t.model_id.is_not(None)]
    return (select(literal(_constant_bucket(a, q.bucket)).label("b"), *groups,
                   *_RECORD_SUMS).where(*where).group_by(*groups))


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
    # cast: PostgreSQL sums BIGINTs as NUMERIC (Decimal in Python, slow to add)
    return (select(bucket.label("b"), *groups,
                   *(func.cast(func.sum(c[n]), BigInteger) for n in cols))
            .where(*where).group_by(bucket, *groups))


def report(conn: Connection, q: ReportQuery) -> list[ReportRow]:
    """Rows per bucket and group, in order; totals equal the records exactly. Pieces of
    the range answered by different sources add up where their keys meet."""
    merged: dict[tuple[Any, ...], list[int]] = {}
    width = 1 + len(q.group_by)
    for source, a, b in _plan(q):
        stmt = _raw_select(q, a, b) if source == "raw" else _rollup_select(q, source, a, b)
        for row in conn.execute(stmt):
            key = tuple(row[:width])
            nums = row[width:]
            if not nums[0]:
                continue  # an aggregate over no rows (no GROUP BY) still answers one
            seen = merged.get(key)
            merged[key] = ([int(v or 0) for v in nums] if seen is None
                           else [x + int(v or 0) for x, v in zip(seen, nums, strict=True)])
    n, h = len(_SUMS), HISTOGRAM_BUCKETS
    return [ReportRow(datetime.fromtimestamp(int(k[0]), UTC),
                      dict(zip(q.group_by, k[1:], strict=True)),
                      v[:n], v[n:n + h], v[n + h:]) for k, v in
            sorted(merged.items(), key=lambda kv: _order(kv[0]))]


def _order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((0, v) if isinstance(v, int) else (1, str(v)) for v in key)
