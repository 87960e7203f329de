"""What traces cost on the request path: prints figures, asserts nothing.

    .venv/bin/python bench/tracing.py

1. Tracing off: ns per call of the null trace (NO_TRACE), as app.py and dispatch.py
   make them, against `with contextlib.nullcontext()` (best of 9 runs of 1M, minus the
   loop's own cost).
2. Tracing on: CPU µs per request (process time, every thread: the batch exporter's
   thread too) for a request span, 4 steps, the upstream headers, attributes and its
   end, sampled (ratio 1) and sampled out (ratio 0). The spans are exported to a
   stand-in collector in another process (its parsing is not counted).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import timeit

COLLECTOR = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def off() -> None:
    from paragate.tracing import NO_TRACE

    g = {"t": NO_TRACE, "tracing": None, "null": contextlib.nullcontext()}
    n = 1_000_000

    def ns(stmt: str) -> float:
        return min(timeit.repeat(stmt, globals=g, number=n, repeat=9)) / n * 1e9

    base = ns("pass")
    cases = {
        'with trace.span("paragate.auth"): pass': 'with t.span("paragate.auth"):\n pass',
        "trace.upstream_headers()": "t.upstream_headers()",
        "trace.end(200)": "t.end(200)",
        "a request's calls (3 steps, the headers, 2 checks)":
            "if tracing is not None: pass\n"
            'with t.span("paragate.auth"):\n pass\n'
            'with t.span("paragate.route"):\n pass\n'
            'with t.span("paragate.upstream"):\n h = t.upstream_headers()\n'
            "if tracing is not None: pass",
        "reference: with contextlib.nullcontext(): pass": "with null:\n pass",
    }
    print("tracing off (ns per call)")
    for name, stmt in cases.items():
        print(f"  {name:55s} {ns(stmt) - base:7.1f}")


def on(port: int) -> None:
    from paragate.config import Settings
    from paragate.tracing import Tracing

    scope = {"method": "POST", "scheme": "http", "headers": [(b"host", b"gateway")]}

    def request(t: Tracing) -> None:
        trace = t.request(scope, "/api/v2/completions")
        with trace.span("paragate.auth"):
            pass
        with trace.span("paragate.route"):
            pass
        with trace.span("paragate.limits"):
            pass
        with trace.span("paragate.upstream"):
            trace.upstream_headers()
        trace.attributes(request_id="abc-1", model="alfred-4.2", input_tokens=3,
                         output_tokens=2)
        trace.end(200)

    print("tracing on (CPU µs per request, making and exporting its spans)")
    for ratio in (1.0, 0.0):
        t = Tracing.build(Settings(otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces",
                                   traces_sample_ratio=ratio))
        assert t is not None
        n = 400  # 2,000 spans: under the batch processor's queue (2,048), none dropped
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for _ in range(n):
                request(t)
            t._provider.force_flush()  # the exports' CPU counts too
            best = min(best, (time.process_time() - started) / n)
        t.shutdown()
        print(f"  ratio {ratio:g}: {best * 1e6:7.1f}")


def main() -> None:
    collector = subprocess.Popen([sys.executable, "-c", COLLECTOR], stdout=subprocess.PIPE,
                                 text=True)
    try:
        assert collector.stdout is not None
        port = int(collector.stdout.readline())
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load "
              f"{os.getloadavg()[0]:.1f}")
        off()
        on(port)
    finally:
        collector.kill()
        collector.wait()


if __name__ == "__main__":
    main()
