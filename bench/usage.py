#!/usr/bin/env python3
"""Usage accounting at scale, on PostgreSQL: reports over 10 million records and the
usage writer's rate; writes its section of docs/benchmarks.md ("## Usage accounting at
scale").

The records (a month of them: 100 companies, 1,000 users, 2,000 keys used with a Zipf
skew, 8 models) are loaded with COPY, a day at a time, and summed into the rollups by the
writer's own statements (``store.usage.add_rollups``), so the tables are what the writer
would have made;
then each report is timed through ``Store.usage_report`` (three runs, the median), and
the writer's own path (``Store.insert_usage``: raw insert + rollups, batches of 2,000)
writes fresh records into the full tables.

    .venv/bin/python bench/usage.py                    # 10 M records, ~10 minutes
    .venv/bin/python bench/usage.py --smoke            # 100,000 records; prints only
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from control_plane import postgres_database, write_section
from run import ROOT, report_head, say
from sqlalchemy import and_, text

from paragate.store import Store, UsageRecord
from paragate.store import usage as usage_store
from paragate.store.schema import usage_records

SECTION = "## Usage accounting at scale"
DOC = ROOT / "docs" / "benchmarks.md"
START = datetime(2026, 11, 1, tzinfo=UTC)
DAYS = 30
COMPANIES, USERS, KEYS, MODELS = 100, 1000, 2000, 8


def zipf_picker(n: int, s: float, rnd: random.Random) -> Callable[[], int]:
    weights = [1 / (i + 1) ** s for i in range(n)]
    population = list(range(1, n + 1))
    cum = list(_accumulate(weights))

    def pick() -> int:
        return rnd.choices(population, cum_weights=cum)[0]
    return pick


def _accumulate(values: list[float]) -> Iterator[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


def day_of_records(day: int, count: int, rnd: random.Random, key_of: Callable[[], int],
                   model_of: Callable[[], int], first_id: int) -> list[UsageRecord]:
    base = START + timedelta(days=day)
    out = []
    for i in range(count):
        key = key_of()
        user = (key - 1) % USERS + 1
        company = (user - 1) % COMPANIES + 1
        model = model_of()
        failed = rnd.random() < 0.02
        stream = rnd.random() < 0.6
        latency = int(rnd.lognormvariate(6.5, 0.8))
        out.append(UsageRecord(
            request_id=f"bench-{first_id + i:x}",
            created_at=base + timedelta(microseconds=rnd.randrange(86_400_000_000)),
            key_id=key, user_id=user, company_id=company, model_id=model,
            model=f"model-{model}", stream=stream, status=502 if failed else 200,
            outcome="upstream_error" if failed else "ok", prompt_tokens=rnd.randint(5, 900),
            completion_tokens=rnd.randint(1, 600), total_tokens=None, duration_ms=latency,
            ttft_ms=latency // 8 if stream else None, gateway_us=180,
            upstream="http://gpu-1:8000/v1"))
    return out


def load(store: Store, total: int, say_every: int = 5) -> float:
    """``total`` records over DAYS days, with their rollups; returns the seconds taken.
    Each day: the records' rows as the writer makes them (``store.usage._rows``), COPYed
    in, then the writer's own rollup statements over that day, in one transaction."""
    started = time.monotonic()
    rnd = random.Random(0)
    key_of = zipf_picker(KEYS, 1.1, rnd)
    model_of = zipf_picker(MODELS, 1.5, rnd)
    per_day = total // DAYS
    t = usage_records.c
    for day in range(DAYS):
        records = day_of_records(day, per_day + (total % DAYS if day == 0 else 0), rnd,
                                 key_of, model_of, day * per_day * 2)
        with store.engine.begin() as conn:
            names = usage_store._compiled_insert(conn)[1]
            rows = usage_store._rows(conn, records)
            raw: Any = conn.connection.dbapi_connection
            with raw.cursor() as cur, cur.copy(
                    f"COPY usage_records ({', '.join(names)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            usage_store.add_rollups(conn, and_(
                t.created_at >= START + timedelta(days=day),
                t.created_at < START + timedelta(days=day + 1)))
        if (day + 1) % say_every == 0:
            say(f"  day {day + 1}/{DAYS}: {(day + 1) * per_day:,} records, "
                f"{time.monotonic() - started:.0f} s")
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    return time.monotonic() - started


def timed(fn: Callable[[], Any], runs: int = 3) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


REPORTS: list[tuple[str, dict[str, Any]]] = [
    ("a month, by day and company", {"bucket": "day", "group_by": ("company_id",)}),
    ("a month, by day, company and model", {"bucket": "day",
                                            "group_by": ("company_id", "model")}),
    ("a month, by month and key", {"bucket": "month", "group_by": ("key_id",)}),
    ("a month, by day and user, one company", {"bucket": "day", "group_by": ("user_id",),
                                               "company_id": 7}),
    ("a month, by day, one user's keys", {"bucket": "day", "group_by": ("key_id",),
                                          "user_id": 7, "company_id": 7}),
    ("one day, by hour and model", {"bucket": "hour", "group_by": ("model",),
                                    "days": 1}),
    ("a month with ragged ends (10:17 to 16:43), by day and company",
     {"bucket": "day", "group_by": ("company_id",), "ragged": True}),
]


def reports(store: Store) -> list[tuple[str, float, int]]:
    out = []
    for name, spec in REPORTS:
        spec = dict(spec)
        start, end = START, START + timedelta(days=DAYS)
        if spec.pop("days", None):
            start, end = START + timedelta(days=10), START + timedelta(days=11)
        if spec.pop("ragged", None):
            start = START + timedelta(hours=10, minutes=17)
            end = START + timedelta(days=DAYS - 1, hours=16, minutes=43)
        q = usage_store.ReportQuery(start=start, end=end, **spec)
        seconds, rows = timed(lambda q=q: store.usage_report(q))
        out.append((name, seconds, len(rows)))
        say(f"  {name}: {seconds * 1000:.0f} ms, {len(rows):,} rows")
    return out


def writer_rate(store: Store, count: int) -> tuple[float, float]:
    """(records per second, CPU µs per record) for the writer's own path."""
    rnd = random.Random(1)
    records = day_of_records(DAYS - 1, count, rnd, zipf_picker(KEYS, 1.1, rnd),
                             zipf_picker(MODELS, 1.5, rnd), 10 ** 12)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, count, 2000):
        store.insert_usage(records[i:i + 2000])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return count / wall, cpu / count * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--postgres", default=os.environ.get(
        "PARAGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL server (a database of its own is made there and dropped)")
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--smoke", action="store_true", help="100,000 records; prints only")
    ap.add_argument("--out", help=f"the file whose {SECTION!r} section to write "
                    "[default: docs/benchmarks.md; --smoke: none]")
    args = ap.parse_args()
    total = 100_000 if args.smoke else args.records
    load_avg = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    began = time.monotonic()
    with postgres_database(args.postgres) as url:
        store = Store(url)
        store.migrate()
        say(f"loading {total:,} usage records and their rollups")
        loaded = load(store, total)
        with store.engine.connect() as conn:
            sizes = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in (
                "usage_records", "usage_hourly", "usage_daily", "usage_daily_company")}
            mb = conn.execute(text("SELECT pg_database_size(current_database())")).scalar()
        say(f"loaded in {loaded:.0f} s: {sizes}")
        answered = reports(store)
        rate, cpu_us = writer_rate(store, 20_000 if args.smoke else 100_000)
        say(f"writer: {rate:,.0f} records/s, {cpu_us:.0f} µs CPU per record")
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM usage_records")).scalar() == (
                total + (20_000 if args.smoke else 100_000))
        store.close()
    took = time.monotonic() - began
    command = "bench/usage.py" + (" --smoke" if args.smoke else "")
    lines = report_head(
        SECTION, f"{total:,} usage records over {DAYS} days (100 companies, 1,000 users, "
        "2,000 keys used with a Zipf skew, 8 models), loaded with their rollups, then each "
        "report answered through `Store.usage_report` (median of 3) and fresh records "
        "written through the writer's own path (batches of 2,000: raw insert ON CONFLICT "
        "DO NOTHING RETURNING, then the three rollups).", command, load_avg, took,
        [f"Rows: {', '.join(f'{t} {n:,}' for t, n in sizes.items())}; database "
         f"{int(mb or 0) / 1e6:,.0f} MB; load {loaded:.0f} s"],
        "100,000 records" if args.smoke else None)
    for name, seconds, rows in answered:
        target = "< 1 s" if name == REPORTS[0][0] else "-"
        result = ("met" if seconds < 1 else "missed") if target != "-" else "-"
        lines.append(f"| report: {name} ({rows:,} rows) | {seconds * 1000:,.0f} ms | "
                     f"{target} | {result} |")
    lines.append(f"| writer: records per second into the full tables | {rate:,.0f} | "
                 f">= 5,000 | {'met' if rate >= 5000 else 'missed'} |")
    lines.append(f"| writer: CPU per record (the writer thread's share at 5,000/s) | "
                 f"{cpu_us:,.0f} µs ({cpu_us * 5000 / 1e6:.0%} of a core) | - | - |")
    section = "\n".join(lines) + "\n"
    print(section)
    out = args.out or (None if args.smoke else str(DOC))
    if out:
        write_section(Path(out), section, SECTION)
        say(f"wrote {SECTION!r} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
