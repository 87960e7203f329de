"""Usage reports: totals equal the records, for every grouping, bucket and range, on
SQLite and PostgreSQL; the API's JSON and CSV agree; the scope follows the role."""

from __future__ import annotations

import csv
import io
import random
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import combinations

import httpx
import pytest

from paragate import control
from paragate.gateway import Gateway
from paragate.store import Store, UsageRecord
from paragate.store.usage import DIMENSIONS, ReportQuery

from .conftest import CLI, Keys

T0 = datetime(2026, 10, 30, 21, 40, tzinfo=UTC)  # crosses a month, days and hours


def synthetic(count: int = 1500, seed: int = 7) -> list[UsageRecord]:
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        key = rnd.randint(1, 6)
        resolved = rnd.random() > 0.05
        outcome = rnd.choice(["ok"] * 8 + ["error", "upstream_error", "client_disconnected"])
        out.append(UsageRecord(
            request_id=f"syn-{i}", created_at=T0 + timedelta(seconds=rnd.randint(0, 3 * 86400)),
            key_id=key, user_id=(key + 1) // 2, company_id=1 + key % 2,
            model_id=rnd.choice([1, 2]) if resolved else None,
            model=rnd.choice(["alfred-4.2", "bert"]) if resolved else "nope",
            stream=rnd.random() > 0.5, status=200 if outcome == "ok" else 400,
            outcome=outcome, prompt_tokens=rnd.randint(1, 50),
            completion_tokens=rnd.randint(0, 200), total_tokens=None,
            duration_ms=rnd.randint(0, 5000), partial=outcome == "client_disconnected",
            ttft_ms=rnd.randint(0, 900) if rnd.random() > 0.5 else None))
    return out


def truth(records: list[UsageRecord], q: ReportQuery) -> Counter[tuple[object, ...]]:
    sums: Counter[tuple[object, ...]] = Counter()
    for r in records:
        if not q.start <= r.created_at < q.end:
            continue
        dims = {"company_id": r.company_id, "user_id": r.user_id, "key_id": r.key_id,
                "model": r.model if r.model_id else ""}
        if any(getattr(q, d) is not None and getattr(q, d) != dims[d] for d in DIMENSIONS):
            continue
        t = r.created_at
        bucket = {"hour": t.replace(minute=0, second=0, microsecond=0),
                  "day": t.replace(hour=0, minute=0, second=0, microsecond=0),
                  "month": t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
                  }[q.bucket]
        key = (bucket, *(dims[d] for d in q.group_by))
        sums[(*key, "requests")] += 1
        sums[(*key, "errors")] += r.outcome in ("error", "upstream_error", "shutdown")
        sums[(*key, "prompt")] += r.prompt_tokens or 0
        sums[(*key, "completion")] += r.completion_tokens or 0
    return +sums


def answered(store: Store, q: ReportQuery) -> Counter[tuple[object, ...]]:
    sums: Counter[tuple[object, ...]] = Counter()
    for row in store.usage_report(q):
        key = (row.bucket_start, *(row.group[d] for d in q.group_by))
        sums[(*key, "requests")] += row.value("requests")
        sums[(*key, "errors")] += row.value("errors")
        sums[(*key, "prompt")] += row.value("prompt_tokens")
        sums[(*key, "completion")] += row.value("completion_tokens")
        assert sum(row.latency) == row.value("requests")
    return +sums


GROUPINGS = [g for n in range(len(DIMENSIONS) + 1) for g in combinations(DIMENSIONS, n)]
RANGES = [
    (T0, T0 + timedelta(days=3, seconds=1)),  # everything
    (datetime(2026, 10, 31, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)),  # whole days
    (datetime(2026, 10, 31, 5, tzinfo=UTC), datetime(2026, 11, 1, 7, tzinfo=UTC)),  # hours
    (datetime(2026, 10, 31, 5, 17, 3, tzinfo=UTC),
     datetime(2026, 11, 2, 7, 45, 59, tzinfo=UTC)),  # ragged edges
    (datetime(2026, 11, 1, 10, 5, tzinfo=UTC), datetime(2026, 11, 1, 10, 50, tzinfo=UTC)),
]


def test_report_totals_equal_the_records(store: Store) -> None:
    records = synthetic()
    assert store.insert_usage(records) == len(records)
    assert store.insert_usage(records[:100]) == 0  # a replayed batch adds nothing
    for start, end in RANGES:
        for bucket in ("hour", "day", "month"):
            for group_by in GROUPINGS:
                q = ReportQuery(start=start, end=end, bucket=bucket, group_by=group_by)
                assert answered(store, q) == truth(records, q), (start, end, bucket,
                                                                 group_by)
    for filters in ({"company_id": 2}, {"user_id": 3}, {"key_id": 5}, {"model": "bert"},
                    {"company_id": 1, "model": "alfred-4.2"}):
        for bucket in ("day", "month"):
            q = ReportQuery(start=RANGES[3][0], end=RANGES[3][1], bucket=bucket,
                            group_by=("company_id", "model"), **filters)  # type: ignore[arg-type]
            assert answered(store, q) == truth(records, q), filters


def test_percentiles_from_the_histogram(store: Store) -> None:
    records = [UsageRecord(request_id=f"p{i}", created_at=T0, key_id=1, user_id=1,
                           company_id=1, model_id=1, model="m", stream=True, status=200,
                           outcome="ok", prompt_tokens=1, completion_tokens=1,
                           total_tokens=2, duration_ms=ms, ttft_ms=ms // 2)
               for i, ms in enumerate(range(100, 1100, 10))]  # 100 .. 1090 ms
    store.insert_usage(records)
    (row,) = control.usage.report(store, CLI, ReportQuery(
        start=T0 - timedelta(days=1), end=T0 + timedelta(days=1)))
    assert row["requests"] == 100
    assert 500 <= row["latency_ms_p50"] <= 700  # true 595: within a bucket's width
    assert 900 <= row["latency_ms_p95"] <= 1300  # true 1045
    assert 250 <= row["ttft_ms_p50"] <= 350


async def test_api_json_csv_and_scope(client: httpx.AsyncClient, keys: Keys,
                                      gateway: Gateway, store: Store) -> None:
    headers = {"Authorization": f"Bearer {keys.full}"}
    for _ in range(3):
        await client.post("/api/v2/completions", headers=headers,
                          json={"model": "alfred-4.2", "prompt": "x", "max_tokens": 2})
    await client.post("/api/v2/completions", headers=headers,
                      json={"model": "nope", "prompt": "x"})
    deadline = datetime.now(UTC) + timedelta(seconds=10)
    while len(store.list_usage()) < 4:
        assert datetime.now(UTC) < deadline
        import asyncio
        await asyncio.sleep(0.05)
    admin = {"Authorization": f"Bearer {keys.admin}"}
    params = {"group_by": "key,model", "bucket": "day"}
    r = await client.get("/api/v2/reporting/usage", params=params, headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["has_more"] is False
    assert sum(row["requests"] for row in body["data"]) == 4
    by_model = {row["model"]: row for row in body["data"]}
    assert by_model["alfred-4.2"]["completion_tokens"] == 6
    assert by_model["alfred-4.2"]["key_id"] == keys.full_id
    assert by_model[None]["errors"] == 1
    r = await client.get("/api/v2/reporting/usage", params={**params, "format": "csv"},
                         headers=admin)
    assert r.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(row["requests"]) for row in table] == [row["requests"] for row in
                                                       body["data"]]
    assert list(table[0]) == ["bucket_start", "key_id", "model", "requests", "errors",
                              "partial", "prompt_tokens", "completion_tokens",
                              "total_tokens", "cached_tokens", "latency_ms_p50",
                              "latency_ms_p95", "ttft_ms_p50"]
    # a user sees their own keys; a filter outside the scope says so
    company = control.companies.create(store, CLI, name="elsewhere")
    r = await client.get("/api/v2/reporting/usage", params={"company_id": company.id},
                         headers=headers)
    assert r.status_code in (200, 403)
    for bad, param in (({"bucket": "week"}, "bucket"), ({"group_by": "team"}, "group_by"),
                       ({"start_date": "yesterday"}, "start_date"),
                       ({"start_date": "2026-12-02", "end_date": "2026-12-01"},
                        "start_date"), ({"format": "xml"}, "format")):
        r = await client.get("/api/v2/reporting/usage", params=bad, headers=admin)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_cli_usage_report(store: Store, tmp_path: object) -> None:
    store.insert_usage(synthetic(200))
    env = {"PARAGATE_DATABASE_URL": store.url.render_as_string(hide_password=False),
           "PATH": "/usr/bin:/bin"}
    args = [sys.executable, "-m", "paragate", "usage", "report", "--by", "company,model",
            "--since", "2026-10-30", "--until", "2026-11-03"]
    table = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["bucket_start", "company_id", "model"]
    out = subprocess.run([*args, "--format", "csv"], env=env, capture_output=True,
                         text=True, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert sum(int(r["requests"]) for r in rows) == 200
    assert len(table.splitlines()) == len(rows) + 1


@pytest.mark.parametrize("value", ["2026-12-01", "2026-12-01T10:00:00Z",
                                   "2026-12-01T12:00:00+02:00", "2026-12-01T10:00:00"])
def test_dates(value: str) -> None:
    t = control.usage.parse_time(value, "start_date")
    assert t.tzinfo is not None and t.utcoffset() == timedelta(0)
    assert t.hour in (0, 10)
