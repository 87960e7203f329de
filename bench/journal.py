"""What the usage journal adds to a request: the cost of ``Journal.append`` (one frame,
one ``os.write``) and of building the record, per fsync mode, in microseconds.

    .venv/bin/python bench/journal.py [--records 200000]

Prints a table; docs/benchmarks.md quotes it with the command that made it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    print("| fsync | p50 µs | p99 µs | mean µs |\n|---|---|---|---|")
    for mode in ("interval", "never", "always"):
        n = args.records if mode != "always" else min(args.records, 2000)
        p50, p99, mean = measure(mode, n)
        print(f"| `{mode}` | {p50:.1f} | {p99:.1f} | {mean:.1f} |")


if __name__ == "__main__":
    main()
