"""Another company's model and a model nobody configured: the same work, measured.

    .venv/bin/python bench/isolation.py

A key of company A asks, through the whole ASGI app in process (authentication,
body, route, the 404 and its usage record and log line), for: a name nobody
configured, company B's model, a disabled model, and a model its key is not allowed.
Printed per kind: the Python function calls one request makes (``sys.setprofile``:
exact, the same on any machine) and the best of 7 runs of 5,000 requests in µs, the
kinds interleaved so that the machine's drift falls on all alike. The calls must be
equal; the times equal within noise. ``Registry.resolve`` alone is timed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
import timeit
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from paragate import control
from paragate.app import App
from paragate.config import Settings
from paragate.control.common import Actor
from paragate.errors import ModelNotFound
from paragate.gateway import Gateway
from paragate.store import Store

N = 5_000
KINDS = {
    "unknown (nobody's)": "no-such-mdl",
    "company B's": "b-only-mdl",
    "disabled": "off-model",
    "not among the key's models": "a-other",
}


def populate(store: Store) -> str:
    cli = Actor.cli()
    a = control.companies.create(store, cli, "Company A").id
    b = control.companies.create(store, cli, "Company B").id
    user = control.users.create(store, cli, company_id=a, email="a@example.com").id
    url = "http://127.0.0.1:9/v1"  # never called: every request here ends in a 404
    control.models.create(store, cli, "a-model", upstream_url=url, upstream_model="m")
    control.models.create(store, cli, "a-other", upstream_url=url, upstream_model="m")
    control.models.create(store, cli, "b-only-mdl", upstream_url=url, upstream_model="m",
                          company_ids=[b])
    control.models.create(store, cli, "off-model", upstream_url=url, upstream_model="m",
                          enabled=False)
    made = control.keys.create(store, cli, name="a", user_id=user, models=["a-model"])
    assert made.secret is not None
    return made.secret


async def request(app: App, key: str, body: bytes) -> int:
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/api/v2/completions",
        "raw_path": b"/api/v2/completions", "query_string": b"", "root_path": "",
        "headers": [(b"authorization", b"Bearer " + key.encode()),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def calls(loop: asyncio.AbstractEventLoop, app: App, key: str, body: bytes) -> int:
    counted = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal counted
        if event in ("call", "c_call"):
            counted += 1

    sys.setprofile(profile)
    try:
        status = loop.run_until_complete(request(app, key, body))
    finally:
        sys.setprofile(None)
    assert status == 404, status
    return counted


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="paragate-bench-isolation-"))
    store = Store(f"sqlite:///{tmp / 'bench.db'}")
    store.migrate()
    key = populate(store)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # the access lines, as in production, to a descriptor: /dev/null
    gw = Gateway.build(Settings(database_url=str(store.url), journal_dir=str(tmp / "j"),
                                refresh_interval=60), store)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(gw.start())
    app = App(gw)
    bodies = {kind: b'{"model":"%s","prompt":"hello","max_tokens":4}' % name.encode()
              for kind, name in KINDS.items()}
    for body in bodies.values():  # warm every cache the first request fills
        for _ in range(50):
            loop.run_until_complete(request(app, key, body))
    print(f"python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}", file=sys.stdout)
    print("POST /api/v2/completions answered 404 model_not_found, for a key of company A")
    counts = {kind: calls(loop, app, key, body) for kind, body in bodies.items()}
    best: dict[str, float] = {kind: float("inf") for kind in KINDS}
    for _ in range(7):
        for kind, body in bodies.items():
            started = time.perf_counter()
            for _ in range(N):
                loop.run_until_complete(request(app, key, body))
            best[kind] = min(best[kind], (time.perf_counter() - started) / N * 1e6)
    principal = gw.registry.authenticate(b"Bearer " + key.encode())
    print(f"  {'model named':30s} {'function calls':>14s} {'µs / request':>13s} "
          f"{'resolve, ns':>11s}")
    for kind, name in KINDS.items():
        def resolve(n: str = name) -> None:
            with contextlib.suppress(ModelNotFound):
                gw.registry.resolve(principal, n)
        ns = min(timeit.repeat(resolve, number=100_000, repeat=5)) / 100_000 * 1e9
        print(f"  {kind:30s} {counts[kind]:14d} {best[kind]:13.1f} {ns:11.0f}")
    loop.run_until_complete(gw.stop())
    store.close()
    same = len(set(counts.values())) == 1
    print("function calls: the same for every kind" if same else
          "function calls DIFFER between kinds")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
