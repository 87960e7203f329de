#!/usr/bin/env python3
"""One gateway app (paragate.app:create_app, factory), several ASGI servers side by side.

    .venv/bin/python bench/servers.py [--seconds 3] [--rate-seconds 5]

Servers: uvicorn with uvloop + httptools (the options of `paragate serve`), granian (ASGI,
uvloop, 1 worker) and uvicorn with its defaults' h11 + asyncio loop. A server whose package
is missing is skipped with a note. The server runs pinned to core 0; the fake vLLM
(bench/fake_upstream.py) and the drivers to core 1. The store is a temporary SQLite file
with the model `fake-model` (upstream = the fake) and one key, made with the `paragate` CLI.
Figures: latency p50/p99 at c=1 (bench/load.py), requests/s at c=32 (wrk, bench/completion.lua),
the server's CPU time per request during the wrk run, and its RSS (all its processes) after.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import free_port  # bench/run.py, beside this file (on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
PY = str(BIN / "python") if (BIN / "python").exists() else sys.executable
SERVER_CPU, AUX_CPU = "0", "1"
UVICORN = ["-m", "uvicorn", "paragate.app:create_app", "--factory", "--host", "127.0.0.1",
           "--lifespan", "on", "--log-level", "info", "--no-access-log", "--no-server-header",
           "--no-proxy-headers", "--no-date-header"]
# name: (package it needs, argv after the python interpreter; {port} is filled in)
SERVERS: dict[str, tuple[str, list[str]]] = {
    "uvicorn uvloop+httptools (paragate serve)":
        ("uvicorn", [*UVICORN, "--loop", "uvloop", "--http", "httptools", "--port", "{port}"]),
    "granian asgi uvloop, 1 worker":
        ("granian", ["-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--workers", "1",
                     "--http", "1", "--no-ws", "--no-access-log", "--factory", "--host",
                     "127.0.0.1", "--port", "{port}", "paragate.app:create_app"]),
    "uvicorn asyncio+h11 (default)":
        ("uvicorn", [*UVICORN, "--loop", "asyncio", "--http", "h11", "--port", "{port}"]),
}
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start(argv: list[str], cpu: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # a session of its own: the group is stopped as one
        return subprocess.Popen(["taskset", "-c", cpu, *argv], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out = [pid]
    for p in out:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def rss_mb(pid: int) -> float:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text(), re.M)
            total += int(m[1]) if m else 0
    return total * 1024 / 1e6


def cpu_s(pid: int) -> float:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def post(port: int, path: str, key: str = "") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        body = json.dumps({"model": "fake-model", "prompt": "Hi", "max_tokens": 16})
        conn.request("POST" if key else "GET", path, body if key else None,
                     {"authorization": f"Bearer {key}", "content-type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="the c=1 latency run")
    ap.add_argument("--rate-seconds", type=int, default=5, help="the c=32 wrk run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="paragate-servers-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}
    env["PARAGATE_DATABASE_URL"] = f"sqlite:///{tmp / 'paragate.db'}"
    aux = ["taskset", "-c", AUX_CPU]
    fake = start([PY, "bench/fake_upstream.py", "--port", "0"], AUX_CPU, env, tmp / "fake.log")
    rows: list[str] = []
    notes: list[str] = []
    try:
        for _ in range(200):
            if m := re.search(r"listening on (\d+)", (tmp / "fake.log").read_text()):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the fake upstream did not start")

        def cli(*argv: str) -> str:
            return subprocess.run([str(BIN / "paragate"), *argv], env=env, cwd=tmp, check=True,
                                  capture_output=True, text=True, timeout=120).stdout

        cli("models", "add", "fake-model", "--upstream", f"http://127.0.0.1:{m[1]}/v1")
        key = cli("keys", "create", "--name", "bench").strip().splitlines()[-1]
        for name, (package, argv) in SERVERS.items():
            if importlib.util.find_spec(package) is None:
                notes.append(f"{name}: skipped, `{package}` is not installed.")
                say(notes[-1])
                continue
            port = free_port()
            say(f"{name}: starting on port {port}")
            log = tmp / f"server-{port}.log"
            server = start([PY, *(a.format(port=port) for a in argv)], SERVER_CPU, env, log)
            try:
                deadline = time.monotonic() + 60
                while True:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not start: {log.read_text()[-500:]}")
                    with contextlib.suppress(OSError):
                        if post(port, "/health") == 200:
                            break
                    time.sleep(0.1)
                if (status := post(port, "/api/v2/completions", key)) != 200:
                    raise RuntimeError(f"{name}: first request answered {status}")
                url = f"http://127.0.0.1:{port}/api/v2/completions"
                load = [*aux, PY, "bench/load.py", "--url", url, "--key", key, "--json"]
                subprocess.run([*load, "-c", "8", "-d", "1"], cwd=ROOT, check=True,
                               capture_output=True, timeout=60)  # warm-up
                say(f"{name}: latency, c=1, {args.seconds} s")
                out = subprocess.run([*load, "-c", "1", "-d", str(args.seconds)], cwd=ROOT,
                                     capture_output=True, text=True, timeout=120).stdout
                lat = json.loads(out.strip().splitlines()[-1])
                say(f"{name}: rate, wrk c=32, {args.rate_seconds} s")
                cpu0 = cpu_s(server.pid)
                wrk = subprocess.run(
                    [*aux, "wrk", "-t1", "-c32", f"-d{args.rate_seconds}s", "--latency",
                     "--timeout", "2s", "-s", "bench/completion.lua", url], cwd=ROOT,
                    env={**env, "PARAGATE_KEY": key, "MODEL": "fake-model"},
                    capture_output=True, text=True, timeout=args.rate_seconds + 60).stdout
                cpu = cpu_s(server.pid) - cpu0
                time.sleep(0.5)
                rss = rss_mb(server.pid)
                nproc = len(tree(server.pid))  # taskset exec'd the server: same pid
                rate = float(re.findall(r"Requests/sec:\s+([\d.]+)", wrk)[0])
                done = int(re.findall(r"(\d+) requests in", wrk)[0])
                p99 = {p: float(v) * UNITS[u] for p, v, u in
                       re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", wrk, re.M)}["99"]
                bad = re.findall(r"Non-2xx or 3xx responses: (\d+)", wrk)
                errors = lat["errors"] + lat["dropped"] + (int(bad[0]) if bad else 0)
                rows.append(f"| {name} | {lat['latency_ms']['p50']:.2f} ms | "
                            f"{lat['latency_ms']['p99']:.2f} ms | {rate:,.0f} | {p99:.2f} ms | "
                            f"{cpu / done * 1e6:.0f} µs | {rss:.1f} MB ({nproc}) | {errors} |")
            finally:
                stop(server)
        print("| server | c=1 p50 | c=1 p99 | c=32 requests/s | c=32 p99 | server CPU "
              "per request (c=32) | server RSS after (processes) | errors |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        for note in notes:
            print(f"\n{note}")
    finally:
        stop(fake)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
