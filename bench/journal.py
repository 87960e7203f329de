"""What usage accounting adds to a request: building the record and ``Journal.append``
(one frame, one ``os.write``) per fsync mode; the request's ``Exchange``; in streams,
reading and removing each chunk's running usage; and, off the request path, the SQLite
writer's rate and CPU per record. In microseconds.

    .venv/bin/python bench/journal.py [--records 200000]

Prints a table; docs/benchmarks.md quotes it with the command that made it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import timeit
from pathlib import Path

from paragate.usage import Exchange, Journal


def measure(mode: str, records: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "journal", "sqlite:///bench.db", fsync=mode)
        journal.open()
        samples = []
        for i in range(records):
            ex = Exchange(request_id=f"{i:x}", record=journal.append, key_id=1, user_id=2,
                          company_id=3, client_request_id="trace-1", model="alfred-4.2",
                          model_id=4, stream=True, upstream="http://gpu-1:8000/v1",
                          status=200, outcome="ok", prompt_tokens=12, completion_tokens=40)
            t = time.perf_counter_ns()
            ex.finish()  # builds the record and appends it
            samples.append(time.perf_counter_ns() - t)
        journal.close()
    samples.sort()
    return (statistics.median(samples) / 1000, samples[int(len(samples) * 0.99)] / 1000,
            sum(samples) / len(samples) / 1000)


def per_call_us(fn: object, number: int = 100_000) -> float:
    return timeit.timeit(fn, number=number) / number * 1e6  # type: ignore[arg-type]


def stream_chunk_us() -> float:
    """One chunk of a stream whose client did not ask for running usage, through the
    relay's ``_Events.feed``: vLLM's running usage read out of it, then removed from the
    bytes."""
    from paragate.proxy import Target, _Events

    chunk = (b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
             b'"choices":[{"index":0,"text":" foo","logprobs":null,"finish_reason":null,'
             b'"stop_reason":null}],"usage":{"prompt_tokens":5,"total_tokens":12,'
             b'"completion_tokens":7}}')
    ex = Exchange(request_id="1", record=None)
    target = Target(fleet=None, body=b"", requested_model="m",  # type: ignore[arg-type]
                    upstream_model="m")
    events = _Events(target, "http://u/v1", False, False, 1, ex)
    out: list[bytes] = []

    def feed() -> None:
        out.clear()
        events.feed(chunk, out)
    return per_call_us(feed)


def sqlite_writer(records: int) -> tuple[float, float]:
    """(records per second, CPU µs per record) of ``Store.insert_usage`` on SQLite, in
    batches of 2,000: all of it in this process, as in the gateway."""
    import datetime as dt

    from paragate.store import Store, UsageRecord

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/bench.db")
        store.migrate()
        start = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
        batch = [UsageRecord(request_id=f"w{i}", created_at=start + dt.timedelta(
            milliseconds=i * 7), key_id=i % 2000 + 1, user_id=i % 1000 + 1,
            company_id=i % 100 + 1, model_id=i % 8 + 1, model=f"m{i % 8}", stream=True,
            status=200, outcome="ok", prompt_tokens=20, completion_tokens=40,
            total_tokens=60, duration_ms=100 + i % 900, ttft_ms=20) for i in range(records)]
        store.insert_usage(batch[:2000])
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(2000, records, 2000):
            store.insert_usage(batch[i:i + 2000])
        n = records - 2000
        result = n / (time.perf_counter() - wall), (time.process_time() - cpu) / n * 1e6
        store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    print("| fsync | p50 µs | p99 µs | mean µs |\n|---|---|---|---|")
    for mode in ("interval", "never", "always"):
        n = args.records if mode != "always" else min(args.records, 2000)
        p50, p99, mean = measure(mode, n)
        print(f"| `{mode}` | {p50:.1f} | {p99:.1f} | {mean:.1f} |")
    print(f"\nExchange(), once per request: {per_call_us(lambda: Exchange('1', None)):.1f} µs")
    print(f"a stream chunk's running usage read and removed: {stream_chunk_us():.1f} µs")
    rate, cpu_us = sqlite_writer(20_000)
    print(f"SQLite writer (Store.insert_usage, batches of 2,000): {rate:,.0f} records/s, "
          f"{cpu_us:.0f} µs CPU per record")


if __name__ == "__main__":
    main()
