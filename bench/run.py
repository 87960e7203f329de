#!/usr/bin/env python3
"""Run the whole paragate benchmark (issue 4) in one go and write docs/benchmarks.md.

The gateway (one worker) is pinned to core 0; the fake vLLM upstream (bench/fake_upstream.py)
and the load drivers (wrk + bench/completion.lua, bench/load.py) to core 1. Each figure is
measured direct to the fake and through paragate with everything ON: authentication, model
lookup, the rate limit check, usage accounting into a SQLite store of its own.
The c=1 latency, the rate sweep and the unpaced c=1 stream figures are measured for each
endpoint of --endpoints (default: /api/v2/completions, then /api/v2/chat/completions beside
it, with bench/chat.lua's body); the other figures for completions only.

    .venv/bin/python bench/run.py                 # ~5 minutes + the soak (10 by default)
    .venv/bin/python bench/run.py --smoke         # every step for ~1 s; prints the table only
    .venv/bin/python bench/run.py --only latency,rate,streams --endpoints completions,chat
    .venv/bin/python bench/run.py --population DB --only idle,latency,rate   # see --help
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
PY = str(BIN / "python") if (BIN / "python").exists() else sys.executable
GW_CPU, AUX_CPU = "0", "1"  # the gateway | the fake upstream and the load driver
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PARAGATE_")}
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}
GIB_MB = 2**30 / 1e6  # memory is reported in MB = 10^6 bytes
Result = dict[str, Any]


@dataclass(frozen=True)
class Endpoint:
    """An endpoint whose c=1 latency, rate sweep and unpaced c=1 stream figures are
    measured (--endpoints), direct to the fake and through paragate, the same way."""

    upstream: str  # the fake's (vLLM's) path
    gateway: str  # paragate's
    lua: str  # the wrk script that posts its body
    load: tuple[str, ...]  # bench/load.py's options for its body
    label: str  # appended to its figures' names: "" for completions (the names as ever)


ENDPOINTS = {
    "completions": Endpoint("/v1/completions", "/api/v2/completions", "bench/completion.lua",
                            (), ""),
    "chat": Endpoint("/v1/chat/completions", "/api/v2/chat/completions", "bench/chat.lua",
                     ("--chat",), ", /chat/completions"),
}
COMPLETIONS = ENDPOINTS["completions"]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    secs: int  # per measurement
    sweep: list[int]  # concurrencies of the rate tests
    stream_c: int  # concurrency of the unpaced streams/s test
    paced_rate: int  # streams/s of the paced time-to-first-byte test
    warmup_s: int  # unmeasured load before each time-to-first-byte measurement
    rounds: int  # direct/through pairs of the c=1 latency test
    paced_c: list[int]  # concurrencies of the paced streams/s test
    soak_s: float
    sample_s: float
    holds: list[int]
    hold_pace_ms: float
    hold_ramp_s: float


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path  # stdout and stderr

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self) -> str:
        return " / ".join(self.text().strip().splitlines()[-3:])


class Procs:
    """Every process the benchmark starts, each in a process group of its own."""

    def __init__(self, tmp: Path, pin: bool) -> None:
        self.tmp, self.n, self.pin = tmp, 0, pin
        self.live: list[Proc] = []

    def start(self, cmd: Sequence[str], cpu: str | None = AUX_CPU,
              env: dict[str, str] | None = None) -> Proc:
        self.n += 1
        log = self.tmp / f"{self.n:03d}-{Path(cmd[1] if cmd[0] == PY else cmd[0]).stem}.log"
        with log.open("wb") as f:
            p = subprocess.Popen(["taskset", "-c", cpu, *cmd] if cpu and self.pin else cmd,
                                 stdout=f,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                 env=BASE_ENV if env is None else env, start_new_session=True)
        self.live.append(Proc(p, log))
        return self.live[-1]

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        """SIGTERM to its group (uvicorn's workers too), SIGKILL after `grace` seconds. Only
        while it runs: once reaped, its id (and group id) may be another process's."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if proc.popen.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(wait)
        if proc in self.live:
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.live[:]):
            self.stop(proc)

    def run(self, cmd: Sequence[str], timeout: float, cpu: str | None = AUX_CPU,
            env: dict[str, str] | None = None) -> str:
        proc = self.start(cmd, cpu, env)
        try:
            proc.popen.wait(timeout)
        finally:
            self.stop(proc, grace=1.0)
        return proc.text()


def request(port: int, method: str, path: str, body: Any = None, key: str = "",
            timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """VmRSS of `pid` and all its descendants (uvicorn's workers), in MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total * 1024 / 1e6


@contextlib.contextmanager
def sampling(pid: int, every: float) -> Iterator[list[float]]:
    """rss_mb(pid) every `every` seconds, appended to the yielded list while the block runs."""
    samples: list[float] = []
    done = threading.Event()

    def loop() -> None:
        samples.append(rss_mb(pid))
        while not done.wait(every):
            samples.append(rss_mb(pid))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


def last_json(out: str) -> Result:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"no result from the driver: {out[-300:]!r}")
    result: Result = json.loads(lines[-1])
    return result


def judge(value: float, op: str, limit: float, unit: str, digits: int) -> str:
    if value <= limit if op == "<=" else value >= limit:
        return "met"
    gap = abs(value - limit)
    return f"missed by {gap:,.{digits}f} {unit} ({gap / limit:.0%})"


def wrk_errors(out: str) -> int:
    """Socket errors (connect, read, write, timeout) + non-2xx responses in wrk's output."""
    return sum(int(n) for n in re.findall(
        r"(?:connect|read|write|timeout|Non-2xx or 3xx responses:) (\d+)", out))


def errs(r: Result) -> str:
    bad = r["errors"] or r["dropped"]
    return f" **{r['errors']} errors, {r['dropped']} dropped**" if bad else ""


def table(title: str, head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [f"\n{title}\n", "| " + " | ".join(head) + " |", "|---" * len(head) + "|",
            *("| " + " | ".join(str(x) for x in row) + " |" for row in rows)]


class Bench:
    def __init__(self, plan: Plan, procs: Procs, tmp: Path, profile: bool,
                 population: str | None = None, gateway_env: dict[str, str] | None = None,
                 endpoints: Sequence[Endpoint] = (COMPLETIONS,)) -> None:
        self.plan, self.procs, self.tmp, self.profile_on = plan, procs, tmp, profile
        self.endpoints = list(endpoints)
        self.population = population
        self.env = {**BASE_ENV, "PARAGATE_DATABASE_URL": f"sqlite:///{tmp}/bench.db",
                    # the load comes from one address, up to 10,000 streams held at once:
                    # a per-client limit above that (counted as by default, never reached)
                    "PARAGATE_MAX_CONNECTIONS_PER_CLIENT": "1000000",
                    **(gateway_env or {})}
        self.redis = bool(self.env.get("PARAGATE_REDIS_URL"))
        self.rows: list[tuple[str, str, str, str]] = []
        self.details: list[str] = []
        self.notes: list[str] = []
        self.failed: list[str] = []
        self.fakes: dict[str, tuple[Proc, int]] = {}
        self.key = ""
        self.gw: tuple[Proc, int] | None = None
        self.idle = 0.0

    # -- processes ---------------------------------------------------------------------
    def paragate(self, *argv: str) -> str:
        r = subprocess.run([str(BIN / "paragate"), *argv], env=self.env, cwd=self.tmp,
                           capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"paragate {' '.join(argv[:2])}: {r.stderr.strip()[-300:]}")
        return r.stdout

    def start_fake(self, model: str, pace_ms: float) -> None:
        proc = self.procs.start([PY, "bench/fake_upstream.py", "--port", "0",
                                 "--pace-ms", str(pace_ms)])
        for _ in range(200):
            if m := re.search(r"listening on (\d+)", proc.text()):
                self.fakes[model] = (proc, int(m[1]))
                self.paragate("models", "add", model, "--upstream",
                              f"http://127.0.0.1:{m[1]}/v1", "--upstream-model", "fake-model")
                return
            if proc.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"the fake upstream did not start: {proc.tail()}")

    def use_population(self, path: str) -> None:
        """The store: a copy of a pre-loaded SQLite one (bench/control_plane.py makes them);
        the key: one of its company users' keys, rotated through the CLI to learn a secret."""
        src = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        dst = sqlite3.connect(self.tmp / "bench.db")
        try:
            src.backup(dst)  # the WAL's pages too, which a file copy could miss
        finally:
            src.close()
            dst.close()
        with contextlib.closing(sqlite3.connect(self.tmp / "bench.db")) as db:
            n = [db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                 for t in ("companies", "users", "api_keys")]
            plain = ("FROM api_keys k JOIN users u ON u.id = k.user_id WHERE u.role = 'user' "
                     "AND NOT u.key_manager AND u.builtin IS NULL AND u.deleted_at IS NULL "
                     "AND k.revoked_at IS NULL")
            count = db.execute(f"SELECT count(*) {plain}").fetchone()[0]
            row = db.execute("SELECT k.public_id, json_extract(k.rate_limits, '$.rpm'), "
                             f"u.company_id {plain} "
                             "ORDER BY k.id LIMIT 1 OFFSET ?", (count // 2,)).fetchone()
        if row is None:
            raise RuntimeError(f"{path} holds no active key of a plain company user")
        public_id, rpm, company = row
        self.key = self.paragate("keys", "rotate", public_id).strip().splitlines()[-1]
        self.notes.append(
            f"Population: {n[0]:,} companies, {n[1]:,} users, {n[2]:,} keys (a copy of "
            f"`{path}`); the key is a company user's ({public_id}, company {company}, role "
            "user, no key_manager).")
        self.notes.append(f"Rate limit ON: the key's limit is {rpm:,} requests/minute." if rpm
                          else "**Rate limit OFF**: the population's key has no limit.")

    def setup(self) -> None:
        if self.population:
            self.use_population(self.population)
        self.start_fake("fake-model", 0)
        self.start_fake("fake-paced", 20)
        self.start_fake("fake-hold", self.plan.hold_pace_ms)
        if self.population:
            return
        create = ["keys", "create", "--name", "bench"]
        options = self.paragate("keys", "create", "--help")
        if "--max-concurrent" in options:
            # four limits, none ever reached: what checking them costs
            create += ["--rpm", "1000000000", "--tpm", "1000000000000",
                       "--max-concurrent", "1000000", "--daily-tokens", "1000000000000000"]
            self.notes.append("Limits ON: the key has four (10^9 requests and 10^12 tokens "
                              "per minute, 10^6 in flight, 10^15 tokens a day), checked on "
                              "every request" + (" in Redis" if self.redis else
                                                 " in process") + ".")
        elif "--rate-limit-rpm" in options:
            create += ["--rate-limit-rpm", "1000000000"]
            self.notes.append("Rate limit ON: the key's limit is 10^9 requests/minute.")
        else:
            self.notes.append("**Rate limit OFF**: `paragate keys create` has no "
                              "`--rate-limit-rpm` yet.")
            say("rate limit OFF: paragate keys create has no --rate-limit-rpm")
        self.key = self.paragate(*create).strip().splitlines()[-1]

    def start_gateway(self, workers: int = 1, cpu: str | None = GW_CPU,
                      extra: dict[str, str] | None = None) -> None:
        """A fresh gateway, ready, after one request; sets self.idle (its RSS then)."""
        self.stop_gateway()
        port = free_port()
        proc = self.procs.start([str(BIN / "paragate"), "serve", "--port", str(port),
                                 "--workers", str(workers)], cpu, {**self.env, **(extra or {})})
        self.gw = (proc, port)
        deadline = time.monotonic() + 60
        while True:
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start: {proc.tail()}")
            with contextlib.suppress(OSError):
                if request(port, "GET", "/health", timeout=1)[0] == 200:
                    break
            time.sleep(0.1)
        time.sleep(0.5 * workers)  # every worker up
        status, body = request(port, "POST", "/api/v2/completions", key=self.key,
                               body={"model": "fake-model", "prompt": "Hi", "max_tokens": 16})
        if status != 200:
            raise RuntimeError(f"first request: {status} {body[:200]!r} / {proc.tail()}")
        time.sleep(1.0)
        self.idle = rss_mb(proc.popen.pid)

    def stop_gateway(self) -> None:
        if self.gw:
            self.procs.stop(self.gw[0], grace=10.0)
            self.gw = None

    def fake_stats(self, model: str) -> dict[str, int]:
        stats: dict[str, int] = json.loads(request(self.fakes[model][1], "GET", "/stats")[1])
        return stats

    # -- drivers -----------------------------------------------------------------------
    def url(self, model: str, direct: bool, ep: Endpoint = COMPLETIONS) -> tuple[str, str]:
        """(url, key) of `ep` on the fake behind `model` (direct) or on the gateway."""
        if direct:
            return f"http://127.0.0.1:{self.fakes[model][1]}{ep.upstream}", ""
        assert self.gw is not None
        return f"http://127.0.0.1:{self.gw[1]}{ep.gateway}", self.key

    def load(self, model: str, direct: bool, *opts: str, timeout: float = 60.0,
             ep: Endpoint = COMPLETIONS) -> Result:
        url, key = self.url(model, direct, ep)
        return last_json(self.procs.run(
            [PY, "bench/load.py", "--url", url, "--key", key, "--json", "--timeout",
             str(timeout), "--model", "fake-model" if direct else model, *ep.load, *opts],
            timeout + self.plan.secs + 60))

    def wrk(self, direct: bool, c: int, cpu: str | None = AUX_CPU,
            ep: Endpoint = COMPLETIONS) -> Result:
        url, key = self.url("fake-model", direct, ep)
        out = self.procs.run(["wrk", "-t1", f"-c{c}", f"-d{self.plan.secs}s", "--latency",
                              "--timeout", "2s", "-s", ep.lua, url],
                             self.plan.secs + 30, cpu, {**BASE_ENV, "PARAGATE_KEY": key})
        try:
            lat = {p: float(v) * UNITS[u] for p, v, u in
                   re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)$", out, re.M)}
            return {"c": c, "rate": float(re.findall(r"Requests/sec:\s+([\d.]+)", out)[0]),
                    "p50": lat["50"], "p99": lat["99"], "errors": wrk_errors(out),
                    "requests": int(re.findall(r"(\d+) requests in", out)[0])}
        except (IndexError, KeyError) as e:
            raise RuntimeError(f"cannot read wrk's output: {out[-300:]!r}") from e

    # -- the report --------------------------------------------------------------------
    def row(self, figure: str, measured: str, target: str = "-", result: str = "-") -> None:
        self.rows.append((figure, measured, target, result))
        say(f"  {figure}: {measured}  [{result}]")

    def step(self, name: str, fn: Callable[[], None]) -> bool:
        say(f"step: {name}")
        try:
            fn()
            return True
        except Exception as e:
            traceback.print_exc()
            self.failed.append(name)
            why = " ".join(str(e).split()).replace("|", "/")[:400]
            self.row(name, f"could not run: {why}", "-", "**not run**")
            return False

    # -- the figures -------------------------------------------------------------------
    def idle_memory(self) -> None:
        self.row("Idle memory (gateway RSS after start-up and one request)",
                 f"{self.idle:.1f} MB", "< 80 MB", judge(self.idle, "<=", 80, "MB", 1))

    def latency(self) -> None:
        # Rounds of direct-then-through, and the round with the median added p50: this
        # host's speed drifts over tens of seconds (six back-to-back single runs gave
        # +0.229 to +0.360 ms), and a pair measured side by side shares the drift. With
        # several endpoints, each round measures each in turn: they share it too.
        rounds: list[list[tuple[float, Result, Result]]] = [[] for _ in self.endpoints]
        for _ in range(self.plan.rounds):
            for ep, done in zip(self.endpoints, rounds, strict=True):
                d, g = (self.load("fake-model", direct, "-c", "1", "-d", str(self.plan.secs),
                                  ep=ep) for direct in (True, False))
                done.append((g["latency_ms"]["p50"] - d["latency_ms"]["p50"], d, g))
        for ep, done in zip(self.endpoints, rounds, strict=True):
            done.sort(key=lambda r: r[0])
            _, d, g = done[len(done) // 2]
            self.details += table(
                f"Latency at c=1, non-streaming{ep.label}, {self.plan.rounds} rounds of "
                f"{self.plan.secs} s direct then through (the table above shows the median "
                "round):",
                ("round", "added p50 ms", "added p99 ms", "direct p50 / p99",
                 "through p50 / p99"),
                [(i + 1, f"{a:+.3f}",
                  f"{gg['latency_ms']['p99'] - dd['latency_ms']['p99']:+.3f}",
                  f"{dd['latency_ms']['p50']:.3f} / {dd['latency_ms']['p99']:.3f}",
                  f"{gg['latency_ms']['p50']:.3f} / {gg['latency_ms']['p99']:.3f}")
                 for i, (a, dd, gg) in enumerate(done)])
            for p, limit in (("p50", 0.25), ("p99", 1.0)):
                d_ms, g_ms = d["latency_ms"][p], g["latency_ms"][p]
                self.row(f"Added latency {p}, non-streaming, c=1{ep.label}",
                         f"{g_ms - d_ms:+.3f} ms (direct {d_ms:.3f}, through {g_ms:.3f})"
                         f"{errs(g)}", f"<= {limit} ms",
                         judge(g_ms - d_ms, "<=", limit, "ms", 3))

    def sweep(self, title: str, cpu: str | None, ep: Endpoint = COMPLETIONS
              ) -> tuple[list[Result], Result | None]:
        """wrk through the gateway at every concurrency; the best with p99 < 10 ms, 0 errors."""
        runs = []
        for c in self.plan.sweep:
            runs.append(r := self.wrk(False, c, cpu, ep))
            say(f"    c={c}: {r['rate']:,.0f} req/s p99 {r['p99']:.2f} ms errors {r['errors']}")
        self.details += table(title, ("concurrency", "req/s", "p50 ms", "p99 ms", "errors"),
                              [(r["c"], f"{r['rate']:,.0f}", f"{r['p50']:.2f}",
                                f"{r['p99']:.2f}", r["errors"]) for r in runs])
        good = [r for r in runs if r["p99"] < 10 and r["errors"] == 0]
        return runs, max(good, key=lambda r: r["rate"]) if good else None

    def rate(self) -> None:
        # Every endpoint's sweep, then their rows side by side; the connections opened
        # are the first endpoint's (the later ones find the gateway's pool warm).
        swept = []
        for ep in self.endpoints:
            before = self.fake_stats("fake-model")["connections"]
            runs, best = self.sweep(f"Rate sweep{ep.label}, 1 worker pinned to core 0, wrk -t1 "
                                    f"on core 1, {self.plan.secs} s each:", AUX_CPU, ep)
            opened = self.fake_stats("fake-model")["connections"] - before - 1  # - /stats'
            swept.append((ep, runs, best, opened, self.wrk(True, max(self.plan.sweep), ep=ep)))
        for ep, _, best, _, direct in swept:
            ref = f"; direct upstream {direct['rate']:,.0f} req/s at c={direct['c']}"
            self.row(f"Request rate, 1 worker on 1 core, p99 < 10 ms, 0 errors{ep.label}",
                     (f"{best['rate']:,.0f} req/s at c={best['c']} (p99 {best['p99']:.2f} ms)"
                      if best else "no concurrency qualified") + ref, ">= 5,000 req/s",
                     judge(best["rate"] if best else 0, ">=", 5000, "req/s", 0))
        ep, runs, best, opened, _ = swept[0]
        n, top = sum(r["requests"] for r in runs), max(self.plan.sweep)
        self.row(f"Upstream connections opened by the gateway during the rate sweep{ep.label}",
                 f"{opened} for {n:,} requests (concurrency up to {top})",
                 "about the concurrency, not the requests",
                 "met" if opened <= 2 * top else f"missed: {opened / top:.1f}x the concurrency")
        if self.profile_on:
            self.profile(best["c"] if best else top, ep)

    def profile(self, c: int, ep: Endpoint = COMPLETIONS) -> None:
        assert self.gw is not None
        if not (BIN / "py-spy").exists():
            self.notes.append("--profile: there is no .venv/bin/py-spy, so no profile.")
            return
        out = ROOT / "bench" / "profiles"
        out.mkdir(exist_ok=True)
        (out / ".gitignore").write_text("*\n")
        path = out / f"gateway-rate-c{c}-{time.strftime('%Y%m%d-%H%M%S')}.speedscope.json"
        spy = self.procs.start([str(BIN / "py-spy"), "record", "--pid", str(self.gw[0].popen.pid),
                                "--duration", str(self.plan.secs), "--rate", "200",
                                "--nonblocking", "--format", "speedscope", "-o", str(path)])
        try:
            self.wrk(False, c, ep=ep)
            spy.popen.wait(30)
        finally:
            self.procs.stop(spy)
        self.notes.append(f"Profile of the gateway under wrk at c={c} (py-spy, open in "
                          f"speedscope.app): `{path.relative_to(ROOT)}`.")

    def streams(self) -> None:
        s, c, tok = str(self.plan.secs), str(self.plan.stream_c), ("--stream", "--max-tokens", "64")
        d, g = (self.load("fake-model", x, *tok, "-c", c, "-d", s) for x in (True, False))
        self.row(f"64-token streams/s, unpaced, c={c}", f"{g['rate']:,.0f}/s (direct "
                 f"{d['rate']:,.0f}/s){errs(g)}", ">= 750/s", judge(g["rate"], ">=", 750, "/s", 0))
        # Paced, closed loop: each stream lasts 64 x 20 ms, so pc streams at a time can
        # make at most pc / 1.28 streams/s; the gateway keeps up if it gets close to that
        # with inter-chunk gaps as direct, i.e. it relays pc x 50 events/s one by one.
        for pc in self.plan.paced_c:
            d, g = (self.load("fake-paced", x, *tok, "-c", str(pc), "-d",
                              str(2 * self.plan.secs)) for x in (True, False))
            self.row(f"64-token streams/s, paced 20 ms/token, c={pc} (at most {pc}/1.28 s = "
                     f"{pc / 1.28:,.0f}/s)",
                     f"{g['rate']:,.0f}/s, inter-chunk p99 {g['inter_chunk_ms']['p99']:.2f} ms"
                     f" (direct {d['rate']:,.0f}/s, {d['inter_chunk_ms']['p99']:.2f} ms)"
                     + errs(g))
        # Paced: open loop (evenly spaced starts, ~1.3 x rate open at once), not c streams
        # that start and end in lockstep and so measure their own burst.
        # The paced run is 4x longer: at 25 streams/s, 5 s hold 125 first bytes, too few
        # for a p99 (it would be the second largest).
        # Unpaced c=1: each endpoint of --endpoints; paced: completions.
        rate, paced_s = self.plan.paced_rate, str(4 * self.plan.secs)
        cases: list[tuple[str, str, tuple[str, ...], str, Endpoint]] = [
            ("fake-model", f"unpaced, c=1{ep.label}", ("-c", "1"), s, ep)
            for ep in self.endpoints]
        cases.append(("fake-paced", f"paced 20 ms/token, {rate} streams/s open loop",
                      ("--rate", str(rate), "-c", str(3 * rate)), paced_s, COMPLETIONS))
        for model, label, opts, secs, ep in cases:
            # Unmeasured first, the same load for a while: the driver opens its connections
            # before it starts its clock, so the gateway's pool to this upstream must be as
            # warm, or the added figure counts the gateway's first connects (~0.5-2.5 ms).
            for x in (True, False):
                self.load(model, x, *tok, *opts, "-d", str(self.plan.warmup_s), ep=ep)
            d, g = (self.load(model, x, *tok, *opts, "-d", secs, ep=ep) for x in (True, False))
            for what, k, target in (("time to first byte", "ttfb_ms", 1.0),
                                    ("inter-chunk latency", "inter_chunk_ms", 0.0)):
                a50, a99 = (g[k][p] - d[k][p] for p in ("p50", "p99"))
                self.row(f"Added {what} p50 / p99, {label}",
                         f"{a50:+.3f} / {a99:+.3f} ms (direct {d[k]['p50']:.3f} / "
                         f"{d[k]['p99']:.3f}, through {g[k]['p50']:.3f} / {g[k]['p99']:.3f})"
                         + errs(g), f"p99 <= {target} ms" if target else "-",
                         judge(a99, "<=", target, "ms", 3) if target else "-")

    def soak(self) -> None:
        assert self.gw is not None
        secs = max(1, round(self.plan.soak_s))
        url, key = self.url("fake-model", False)
        wrk = self.procs.start(["wrk", "-t1", "-c8", f"-d{secs}s", "-s", "bench/completion.lua",
                                url], env={**BASE_ENV, "PARAGATE_KEY": key})
        streams = self.procs.start([PY, "bench/load.py", "--url", url, "--key", key, "--json",
                                    "--stream", "--usage", "--max-tokens", "64", "-c", "4",
                                    "-d", str(secs)])
        try:
            with sampling(self.gw[0].popen.pid, self.plan.sample_s) as rss:
                for p in (wrk, streams):
                    p.popen.wait(secs + 60)
        finally:
            self.procs.stop(wrk)
            self.procs.stop(streams)
        res, bad = last_json(streams.text()), wrk_errors(wrk.text())
        rss = rss[1:] or rss  # the first sample is taken as the load starts
        growth = rss[-1] - rss[0]
        self.row(f"Memory over a {self.plan.soak_s / 60:g}-minute soak (wrk c=8 + 4 streams)",
                 f"start {rss[0]:.1f}, end {rss[-1]:.1f}, max {max(rss):.1f} MB: growth "
                 f"{growth:+.1f} MB ({len(rss)} samples){errs(res)}"
                 + (f", **wrk: {bad} errors**" if bad else ""),
                 "no growth (<= 2 MB)", judge(growth, "<=", 2, "MB", 1))

    def hold(self) -> None:
        """The largest count of plan.holds (tried largest first, each on a fresh gateway)
        whose streams were all open at once and completed with no dropped chunk."""
        pace, ramp, rows, held = self.plan.hold_pace_ms, self.plan.hold_ramp_s, [], None
        # The gateway needs 2 descriptors a stream (client + upstream) and a few of its own.
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        fit = (limit - 100) // 2
        if max(self.plan.holds) > fit:
            self.notes.append(f"RLIMIT_NOFILE is {limit} here (the hard limit; raising "
                              f"it needs CAP_SYS_RESOURCE): at most {fit:,} held streams fit in "
                              "the gateway's descriptors, so larger counts were tried at that.")
        for n in sorted({min(n, fit) for n in self.plan.holds}, reverse=True):
            self.start_gateway(extra={"PARAGATE_UPSTREAM_MAX_CONNECTIONS": "0"})
            assert self.gw is not None
            self.fake_stats("fake-hold")  # resets its peak count of open streams
            with sampling(self.gw[0].popen.pid, 0.2) as rss:
                r = self.load("fake-hold", False, "--hold", "--max-tokens", "64", "-c", str(n),
                              "--ramp", str(ramp), timeout=64 * pace / 1000 * 4 + 30)
            self.stop_gateway()
            peak, up = max(rss), self.fake_stats("fake-hold")["peak_active_streams"]
            per = (peak - self.idle) * 1000 / n
            rows.append((f"{n:,}", f"{r['ok']:,}", r["dropped"], r["errors"], f"{up:,}",
                         f"{self.idle:.1f}", f"{peak:.1f}", f"{per:.1f}",
                         f"{r['last_send_s']:.1f}", f"{r['latency_ms']['max'] / 1000:.1f}"))
            say(f"    {n} streams: ok {r['ok']} dropped {r['dropped']} errors {r['errors']} "
                f"open at once {up} peak RSS {peak:.1f} MB {r['first_error']}")
            if r["ok"] == n and not r["dropped"] and not r["errors"] and up >= n:
                held = (n, peak, per)
                break
        self.details += table(
            f"Held paced streams (64 tokens, {pace:g} ms/token, opened over {ramp:g} s; 10,000 "
            "streams at 200 ms/token would be 50,000 chunks/s, more than one core relays, so the "
            "first would end before the last opened; largest "
            "count first, each on a fresh gateway with PARAGATE_UPSTREAM_MAX_CONNECTIONS=0 so "
            "that the upstream pool does not queue them):",
            ("streams", "ok", "dropped", "errors", "open at once (upstream)", "idle MB",
             "peak RSS MB", "KB/stream", "opening took s", "longest stream s"), rows)
        what = f"Concurrent paced streams held with no dropped chunk ({pace:g} ms/token)"
        if held is None:
            self.row(what, "none of " + ", ".join(f"{n:,}" for n in self.plan.holds)
                     + " (see the details)", "10,000 in < 1 GiB", "missed")
            return
        n, peak, per = held
        if n < 10000 and n == fit:  # the descriptor limit, not the gateway, stopped it
            at10k = self.idle + per * 10
            self.row(what, f"{n:,}, the descriptor limit's most (peak RSS {peak:.1f} MB; "
                     f"10,000 at {per:.1f} KB each: {at10k:.0f} MB)", "10,000 in < 1 GiB",
                     ("met" if at10k < GIB_MB else "missed") + " (projected to 10,000)")
        else:
            self.row(what, f"{n:,} (peak RSS {peak:.1f} MB)", "10,000 in < 1 GiB",
                     "met" if n >= 10000 and peak < GIB_MB else
                     f"missed: {n:,} held, peak {peak:.0f} MB")
        self.row("Memory per held stream ((peak - idle RSS) / streams)", f"{per:.1f} KB")

    def workers2(self) -> None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(self.fakes["fake-model"][0].popen.pid, os.sched_getaffinity(0))
        # the bench key's limits are never reached: counting them per worker is fine here
        self.start_gateway(workers=2, cpu=None, extra=None if self.redis else {
            "PARAGATE_LIMITS_PER_PROCESS": "true"})
        runs, best = self.sweep("Rate sweep, 2 workers; the gateway, the fake and wrk -t1 "
                                "unpinned, sharing the 2 cores:", None)
        b = best or max(runs, key=lambda r: r["rate"])
        self.row("Request rate, 2 workers (gateway, upstream and driver share the 2 cores)",
                 f"{b['rate']:,.0f} req/s at c={b['c']} (p99 {b['p99']:.2f} ms)")
        self.stop_gateway()

    def run(self, only: set[str]) -> None:
        if not self.step("set-up (fakes, models, key)", self.setup):
            return
        steps: list[tuple[str, Callable[[], None]]] = [
            ("idle", self.idle_memory), ("latency", self.latency), ("rate", self.rate),
            ("streams", self.streams), ("soak", self.soak)]
        steps = [(name, fn) for name, fn in steps if not only or name in only]
        if steps and self.step("gateway start-up", self.start_gateway):
            assert self.gw is not None
            pid, t0 = self.gw[0].popen.pid, time.monotonic()
            (busy0, steal0), own0 = core0(), ticks(pid)
            for name, fn in steps:
                self.step(name, fn)
            pct = 100 / ((time.monotonic() - t0) * os.sysconf("SC_CLK_TCK"))
            with contextlib.suppress(OSError):  # unless the gateway died
                (busy, steal), own = core0(), ticks(pid)
                self.notes.append(
                    f"Core 0 during the 1-worker steps: the gateway {(own - own0) * pct:.0f}%, "
                    f"other processes {max(0, busy - busy0 - own + own0) * pct:.0f}%, hypervisor "
                    f"steal {(steal - steal0) * pct:.0f}% (noise check: both should be ~0).")
        self.stop_gateway()
        if not only or "hold" in only:
            self.step("held streams", self.hold)
        if not only or "workers2" in only:
            self.step("2 workers", self.workers2)


def core0() -> tuple[int, int]:
    """Core 0's (busy, steal) clock ticks since boot; busy counts irq and softirq (a task's
    system time includes the softirqs it ran, such as loopback TCP)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\ncpu0 ")[1].split()[:8]]
    return f[0] + f[1] + f[2] + f[5] + f[6], f[7]


def ticks(pid: int) -> int:
    """User + system clock ticks of `pid` (all its threads)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def versions() -> str:
    code = ("import importlib.metadata as m, platform; print('python', platform.python_version())"
            "\nfor p in ('uvicorn','uvloop','httptools','msgspec'): "
            "print(p, m.version(p))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60).stdout
    git = [subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
           for a in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain", "src"])]
    pairs = [line.split(" ", 1) for line in out.splitlines()]
    pairs.append(["paragate", git[0] + (" + uncommitted changes in src/" if git[1] else "")])
    return ", ".join(f"{k} {v}" for k, v in pairs)


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text()
    cpu = m[1] if (m := re.search(r"model name\s*:\s*(.*)", info)) else platform.processor()
    mem = int(re.findall(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[0]) / 2**20
    return f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GiB memory, Linux {platform.release()}"


def report_head(title: str, intro: str, command: str, load: str, took: float,
                notes: Sequence[str], smoke: str | None) -> list[str]:
    """The lines that open a report: what ran, when, where, with which versions, and
    the start of its table of figures (``smoke``: why its figures are no measurements)."""
    lines = [title, "", intro, "", f"- Command: `{command}`",
             f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {took:.0f} s",
             f"- Machine: {machine()}; load average at the start {load}, at the end "
             "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
             f"- Versions: {versions()}", *(f"- {n}" for n in notes)]
    if smoke:
        lines.append(f"- **Smoke run**: {smoke}; the figures are not measurements.")
    return [*lines, "", "| Figure | Measured | Target | Result |", "|---|---|---|---|"]


def render(b: Bench, command: str, load: str, took: float, smoke: bool) -> str:
    lines = report_head(
        "# Benchmarks", "From one run of `bench/run.py` (issue 4). The gateway: one "
        "worker pinned to core 0, everything ON (authentication, model lookup, rate limit "
        "check, usage accounting to SQLite); the fake vLLM upstream and the load driver "
        "pinned to core 1. *Added* = through paragate - direct to the fake upstream. "
        "MB = 10^6 bytes.", command, load, took, b.notes,
        "every step ran for about a second" if smoke else None)
    lines += [f"| {' | '.join(r)} |" for r in b.rows]
    return "\n".join([*lines, "", "## Details", *b.details, ""])


def kept_sections(path: Path, report: str) -> str:
    """The ``## `` sections of the file being replaced that this report does not write
    (another program's, such as bench/control_plane.py's, or written by hand), so that a
    full run replaces its own figures and nothing else."""
    if not path.exists():
        return ""
    ours = set(re.findall(r"^## .*$", report, re.M))
    parts = re.split(r"(?=^## )", path.read_text(), flags=re.M)[1:]
    kept = [p.rstrip() + "\n" for p in parts if p.splitlines()[0] not in ours]
    return "".join("\n" + p for p in kept)


def raise_nofile() -> None:
    """Soft limit = hard (as root, both to 65536 at least); the children inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if os.geteuid() == 0 and hard < 65536:
            resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))


def start_redis(procs: Procs, cpu: str) -> str:
    """A redis-server of the benchmark's own on a free port, pinned to ``cpu``: its URL."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is missing (apt-get install redis-server)")
    port = free_port()
    procs.start([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(procs.tmp)], cpu)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                say(f"redis-server on port {port}, core {cpu}")
                return f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="every step for ~1 s, tiny counts, "
                    "no thresholds; writes a file only if --out is given")
    ap.add_argument("--out", help="where to write the report [default: docs/benchmarks.md; "
                    "--smoke: stdout only]")
    ap.add_argument("--soak-minutes", type=float, help="length of the soak [default: 10; "
                    "--smoke: 0.05]")
    ap.add_argument("--seconds", type=int, help="seconds per measurement [default: 5; --smoke: 1]")
    ap.add_argument("--sweep", help="concurrencies of the rate tests [default: 1,2,4,8,16,32,64]")
    ap.add_argument("--holds", help="held stream counts to try, largest first "
                    "[default: 1000,5000,10000]")
    ap.add_argument("--hold-pace-ms", type=float, help="pace of held streams [default: 1000: "
                    "10,000 streams at 200 ms are 50,000 chunks/s, more than one core relays]")
    ap.add_argument("--only", help="run only these steps: idle,latency,rate,streams,soak,hold,"
                    "workers2 [default: all]; writes a file only if --out is given")
    ap.add_argument("--endpoints", default="completions,chat", help="the endpoints whose "
                    "c=1 latency (step latency), rate sweep (rate) and unpaced c=1 stream "
                    "figures (streams) are measured, side by side: completions "
                    "(/api/v2/completions, bench/completion.lua's body), chat "
                    "(/api/v2/chat/completions, bench/chat.lua's) [default: completions,chat; "
                    "completions alone: the figures of the runs before chat]")
    ap.add_argument("--profile", action="store_true", help="py-spy profile of the gateway "
                    "under wrk at the best concurrency, into bench/profiles/")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (the "
                    "store, every process's output)")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                    help="a PARAGATE_* setting for the gateway (repeatable), to measure "
                    "what one setting costs")
    ap.add_argument("--redis", choices=["gateway-core", "aux-core"], help="count the "
                    "limits in a Redis of the benchmark's own (redis-server, no persistence) "
                    "pinned to the gateway's core or to the other one; a round trip to an "
                    "otherwise idle core pays the VM's wake-up from idle (about 45 us here)")
    ap.add_argument("--population", metavar="DB", help="run on a copy of this SQLite store, "
                    "pre-loaded with companies, users and keys (bench/control_plane.py), with "
                    "one of its company users' keys instead of a fresh one; writes a file "
                    "only if --out is given")
    return ap.parse_args()


def main() -> int:
    args, started = parse(), time.monotonic()
    s = args.smoke
    endpoints = list(dict.fromkeys(e.strip() for e in args.endpoints.split(",") if e.strip()))
    if not endpoints or not set(endpoints) <= ENDPOINTS.keys():
        say(f"--endpoints: a comma-separated list of {', '.join(ENDPOINTS)}")
        return 2

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    soak_min = args.soak_minutes if args.soak_minutes is not None else (0.05 if s else 10.0)
    plan = Plan(secs=args.seconds or (1 if s else 5),
                sweep=ints(args.sweep or ("1,8" if s else "1,2,4,8,16,32,64")),
                stream_c=8 if s else 32, paced_rate=10 if s else 25, warmup_s=1 if s else 3,
                rounds=1 if s else 3, paced_c=[50] if s else [500, 1000],
                soak_s=soak_min * 60,
                sample_s=0.5 if s else 5.0,
                holds=ints(args.holds or ("100" if s else "1000,5000,10000")),
                hold_pace_ms=args.hold_pace_ms or (20 if s else 1000),
                hold_ramp_s=0.3 if s else 10.0)
    out = args.out or (None if s or args.only or args.population
                       else str(ROOT / "docs" / "benchmarks.md"))
    load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    say(f"paragate benchmark ({'smoke' if s else 'full'}); load average {load}")
    for tool in ("wrk", "taskset", str(BIN / "paragate")):
        if shutil.which(tool) is None:
            say(f"{tool} is missing (wrk: apt-get install wrk; paragate: make install)")
            return 2
    raise_nofile()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # both run the clean-up below
    tmp = Path(tempfile.mkdtemp(prefix="paragate-bench-"))
    pin = {0, 1} <= os.sched_getaffinity(0)
    procs = Procs(tmp, pin)
    gateway_env = dict(kv.split("=", 1) for kv in args.gateway_env)
    if args.redis:
        gateway_env["PARAGATE_REDIS_URL"] = start_redis(
            procs, GW_CPU if args.redis == "gateway-core" else AUX_CPU)
    bench = Bench(plan, procs, tmp, args.profile, args.population, gateway_env,
                  [ENDPOINTS[name] for name in endpoints])
    for name, value in gateway_env.items():
        bench.notes.append(f"The gateway ran with `{name}={value}`.")
    if "chat" in endpoints:
        bench.notes.append(
            "Figures marked /chat/completions: POST /api/v2/chat/completions (direct: the "
            "fake's /v1/chat/completions, which answers as vLLM 0.32: a role chunk, then a "
            "delta chunk a token) with `{\"model\": ..., \"messages\": [{\"role\": \"user\", "
            "\"content\": \"Hello, my name is\"}], \"max_tokens\": 16}` (bench/chat.lua, "
            "bench/load.py --chat); the others POST /api/v2/completions with `{\"model\": ..., "
            "\"prompt\": \"Hello, my name is\", \"max_tokens\": 16}`; both with `\"stream\": true` "
            "and 64 tokens in the stream figures.")
    if not pin:
        bench.notes.append("**Nothing pinned**: cores 0 and 1 are not both available here.")
    try:
        bench.run(set(args.only.split(",")) if args.only else set())
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            say(f"kept the store and every process's output in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) \
        else Path(sys.executable).name
    report = render(bench, shlex.join([exe, "bench/run.py", *sys.argv[1:]]), load,
                    time.monotonic() - started, s)
    print(report)
    if out:
        Path(out).write_text(report + kept_sections(Path(out), report))
        say(f"wrote {out}")
    say(f"done in {time.monotonic() - started:.0f} s" + (
        f"; steps that could not run: {', '.join(bench.failed)}" if bench.failed else ""))
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
