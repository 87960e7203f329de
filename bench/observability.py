"""What a forwarded request's metrics and log line cost: prints figures, asserts nothing.

    .venv/bin/python bench/observability.py

``Telemetry.forwarded`` (what ``dispatch.forward`` calls once a request is answered)
with metrics and the JSON access line, each alone, the text line, and neither; the log
writes to /dev/null (a file or a pipe costs the same ``write``). Best of 7 runs of
50,000 calls, in µs per request. bench/run.py measures the same end to end, with
``--gateway-env PARAGATE_METRICS=false --gateway-env PARAGATE_ACCESS_LOG=false`` for off.
"""

from __future__ import annotations

import os
import sys
import time
import timeit

from paragate.logs import AccessLog
from paragate.metrics import Metrics
from paragate.registry import Registry
from paragate.routing import Request
from paragate.telemetry import Telemetry
from paragate.usage import Exchange

N = 50_000


def main() -> int:
    registry = Registry(default_max_logprobs=5)
    metrics = Metrics(version="bench")
    null = os.open(os.devnull, os.O_WRONLY)
    r = Request({}, None, None, None, request_id="0123456789abcdef-1",  # type: ignore[arg-type]
                response_id="0123456789abcdef-1", started=time.monotonic())
    ex = Exchange(request_id="0123456789abcdef-1", record=None, model="m1", model_id=1,
                  company_id=1, user_id=1, endpoint="/api/v2/completions")
    ex.status, ex.outcome, ex.upstream = 200, "ok", "http://127.0.0.1:8000/v1"
    ex.prompt_tokens, ex.completion_tokens, ex.waited = 6, 16, 0.001
    cases = {
        "metrics and the JSON line (the default)": Telemetry(registry, metrics,
                                                            AccessLog("json", null)),
        "metrics alone": Telemetry(registry, metrics, None),
        "the JSON line alone": Telemetry(registry, None, AccessLog("json", null)),
        "the text line alone": Telemetry(registry, None, AccessLog("text", null)),
        "neither (PARAGATE_METRICS=false PARAGATE_ACCESS_LOG=false)": Telemetry(
            registry, None, None),
    }
    print(f"python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}")
    print("Telemetry.forwarded, µs per request")
    for name, telemetry in cases.items():
        def call(t: Telemetry = telemetry) -> None:
            t.forwarded(r, "/api/v2/completions", ex)
        best = min(timeit.repeat(call, number=N, repeat=7)) / N * 1e6
        print(f"  {name:60s} {best:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
