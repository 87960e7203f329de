#!/usr/bin/env python3
"""The control plane at scale: start-up, a change applied, memory per key and the cost per
request with a large population of companies, users and keys; writes its section of
docs/benchmarks.md ("## The control plane at scale").

The population goes straight into the tables (bulk SQLAlchemy Core inserts, one config
version for all of it), not through the control layer, which would take far longer for
300,000 rows. Every key has a real secret, so any of them can be used. The gateway runs
as `paragate serve`, pinned to core 0 like bench/run.py's; this program on core 1. The
hot path (c=1 latency, the rate sweep) is bench/run.py's own, run with --population.

    .venv/bin/python bench/control_plane.py            # ~6 minutes; writes the section
    .venv/bin/python bench/control_plane.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/control_plane.py --smoke    # ~2,000 keys, each step ~1 s; prints only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import http.client
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from run import (
    AUX_CPU,
    BASE_ENV,
    BIN,
    GW_CPU,
    PY,
    ROOT,
    Proc,
    Procs,
    free_port,
    judge,
    report_head,
    rss_mb,
    say,
)
from sqlalchemy import create_engine, func, insert, select, text, update
from sqlalchemy.engine import make_url

from paragate import control
from paragate.access import PERMISSIONS, require
from paragate.auth import new_key
from paragate.control import Actor
from paragate.limits import MemoryLimiter
from paragate.registry import Registry
from paragate.store import Changes, ModelRecord, Store
from paragate.store.schema import api_keys, companies, config_state, users

SECTION = "## The control plane at scale"
DOC = ROOT / "docs" / "benchmarks.md"
RPM = 10**9  # every key's rate limit: ON, as in bench/run.py, and never reached
CHUNK = 5000  # rows per executemany


# -- the population ---------------------------------------------------------------------


@dataclass
class Population:
    """What was loaded, and every key's whole token (by key index) to use them."""

    companies: int
    users: int
    keys: int
    tokens: list[str]
    public_ids: list[str]
    hashes: list[str]
    plain: list[int] = field(default_factory=list)  # keys of role-user, non-key_manager users

    @classmethod
    def make(cls, n_companies: int, n_users: int, n_keys: int) -> Population:
        made = [new_key() for _ in range(n_keys)]
        pop = cls(n_companies, n_users, n_keys, [m[0] for m in made], [m[1] for m in made],
                  [m[2] for m in made])
        pop.plain = [k for k in range(n_keys) if pop.role(pop.owner(k))[0] == "user"
                     and not pop.role(pop.owner(k))[1]]
        return pop

    def owner(self, key: int) -> int:
        return key * self.users // self.keys

    def company(self, user: int) -> int:
        return user * self.companies // self.users

    def role(self, user: int) -> tuple[str, bool]:
        """(role, key_manager): each company's first user is its admin, its second a
        key manager, the rest plain users."""
        first = -(-self.company(user) * self.users // self.companies)  # ceil
        return {0: ("company_admin", True), 1: ("user", True)}.get(user - first,
                                                                   ("user", False))


def load(url: str, pop: Population) -> tuple[float, int]:
    """Migrate a fresh store and bulk-insert the population, stamped with one new config
    version; (seconds, that version)."""
    store = Store(url)
    store.migrate()
    started = time.monotonic()
    at = dt.datetime.now(dt.UTC)
    expires = at + dt.timedelta(days=180)  # PARAGATE_DEFAULT_KEY_DAYS' default
    stamps = {"created_at": at, "updated_at": at, "deleted_at": None}
    with store.engine.begin() as conn:
        conn.execute(update(config_state).values(version=config_state.c.version + 1))
        version = int(conn.execute(select(config_state.c.version)).scalar_one())

        def first_id(table: Any) -> int:
            return int(conn.execute(select(func.max(table.c.id))).scalar() or 0) + 1

        c0, u0, k0 = first_id(companies), first_id(users), first_id(api_keys)

        def rows(n: int, make: Callable[[int], dict[str, Any]]) -> Iterator[list[Any]]:
            for start in range(0, n, CHUNK):
                yield [make(i) for i in range(start, min(n, start + CHUNK))]

        for chunk in rows(pop.companies, lambda i: {
                "id": c0 + i, "name": f"Company {i:05d}", "builtin": False,
                "version": version, **stamps}):
            conn.execute(insert(companies), chunk)
        for chunk in rows(pop.users, lambda i: {
                "id": u0 + i, "company_id": c0 + pop.company(i), "email": f"u{i}@c{pop.company(i)}"
                ".example.com", "name": f"User {i}", "role": pop.role(i)[0],
                "key_manager": pop.role(i)[1], "builtin": None, "version": version, **stamps}):
            conn.execute(insert(users), chunk)
        for chunk in rows(pop.keys, lambda i: {
                "id": k0 + i, "public_id": pop.public_ids[i], "secret_hash": pop.hashes[i],
                "previous_hash": None, "previous_expires_at": None,
                "user_id": u0 + pop.owner(i), "name": f"key {i}", "model_ids": None,
                "rate_limits": {"rpm": RPM}, "usage_opt_in": True, "version": version,
                "created_at": at, "expires_at": expires, "revoked_at": None,
                "last_used_at": None}):
            conn.execute(insert(api_keys), chunk)
        if store.is_postgres:  # explicit ids leave the sequences behind
            for table in ("companies", "users", "api_keys"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                  f"(SELECT max(id) FROM {table}))"))
    if store.is_postgres:  # what autovacuum does soon after a load this size; without
        # statistics the planner scans whole tables for `version > n` (~30 ms a change)
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE companies, users, api_keys"))
    store.close()
    return time.monotonic() - started, version


def migrated(url: str) -> None:
    """An empty store, migrated."""
    store = Store(url)
    store.migrate()
    store.close()


@contextlib.contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A database of its own on the server of `server_url`, dropped at the end."""
    name = f"paragate_cp_{uuid.uuid4().hex[:10]}"
    admin = create_engine(make_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- the gateway as a process -----------------------------------------------------------


def get(conn: http.client.HTTPConnection, path: str, key: str = "") -> int:
    conn.request("GET", path, headers={"authorization": f"Bearer {key}"} if key else {})
    resp = conn.getresponse()
    resp.read()
    return resp.status


@dataclass
class Gateway:
    proc: Proc
    port: int
    startup_s: float
    rss_mb: float
    version: int  # the config version its /ready reports


def serve(procs: Procs, url: str) -> Gateway:
    """`paragate serve` on a free port, timed from spawn to the first 200 on /health; its
    RSS a second later."""
    port = free_port()
    env = {**BASE_ENV, "PARAGATE_DATABASE_URL": url}
    started = time.monotonic()
    proc = procs.start([str(BIN / "paragate"), "serve", "--port", str(port)], GW_CPU, env)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while True:
        if proc.popen.poll() is not None or time.monotonic() - started > 120:
            raise RuntimeError(f"the gateway did not start: {proc.tail()}")
        try:
            if get(conn, "/health") == 200:
                break
        except OSError:
            conn.close()
        time.sleep(0.01)
    took = time.monotonic() - started
    time.sleep(1.0)
    conn.request("GET", "/ready")
    version = int(json.loads(conn.getresponse().read())["view"]["version"])
    conn.close()
    return Gateway(proc, port, took, rss_mb(proc.popen.pid), version)


def change_delays(gw: Gateway, url: str, pop: Population, picks: list[int]
                  ) -> list[tuple[float, float]]:
    """For each key: it is used once (so the gateway has it cached), revoked in this
    process (control.keys.revoke, as the CLI does), then polled with until the gateway
    answers 401. (seconds to the 401, seconds the revocation's transaction took), both
    from the start of the revocation."""
    store = Store(url)
    store.version()  # its pool's first connection, before any clock starts
    out = []
    try:
        for k in picks:
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
            if (status := get(conn, "/api/v2/models", pop.tokens[k])) != 200:
                raise RuntimeError(f"key {pop.public_ids[k]} before its revocation: {status}")
            time.sleep(0.05 + 0.1 * (k % 3))  # not in step with the refresher's interval
            started = time.monotonic()
            control.keys.revoke(store, Actor.cli(), pop.public_ids[k])
            committed = time.monotonic() - started
            while (status := get(conn, "/api/v2/models", pop.tokens[k])) != 401:
                if status != 200 or time.monotonic() - started > 30:
                    raise RuntimeError(f"key {pop.public_ids[k]}: {status} after its revocation")
                time.sleep(0.001)
            out.append((time.monotonic() - started, committed))
            conn.close()
    finally:
        store.close()
    return out


# -- in-process: the view and the request path's calls ----------------------------------


def build_view(url: str) -> tuple[Registry, dict[str, float]]:
    """A registry loaded as Refresher.load does, and how long each part took."""
    store = Store(url)
    registry = Registry(default_max_logprobs=5)
    t0 = time.perf_counter()
    store.migrate()  # what the gateway does first, on a store already migrated
    t1 = time.perf_counter()
    changes = store.changes(0)
    t2 = time.perf_counter()
    registry.install(registry.build(changes))
    t3 = time.perf_counter()
    store.close()
    return registry, {"migrate": t1 - t0, "changes": t2 - t1, "build": t3 - t2}


def traced_view(url: str) -> tuple[int, int]:
    """tracemalloc's bytes for a whole view (companies, users, keys and dicts), as held
    once the rows read are dropped; and its peak while loading."""
    store = Store(url)
    store.changes(0)  # warm: SQLAlchemy's compiled-statement cache is not the view
    registry = Registry(default_max_logprobs=5)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    changes = store.changes(0)
    registry.install(registry.build(changes))
    del changes
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    store.close()
    assert registry.keys
    return held - base, peak - base


def deep_size(objs: Any) -> int:
    """Bytes of these objects and of everything they reference (counted once)."""
    seen: set[int] = set()
    todo, total = list(objs), 0
    while todo:
        o = todo.pop()
        if id(o) in seen or o is None or isinstance(o, bool):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            todo += [*o.keys(), *o.values()]
        elif isinstance(o, (tuple, list, set, frozenset)):
            todo += list(o)
        elif hasattr(o, "__slots__"):
            todo += [getattr(o, s) for s in o.__slots__ if hasattr(o, s)]
    return total


def traced_cache(registry: Registry, tokens: list[str]) -> float:
    """tracemalloc's bytes per entry of the cache of checked keys (header -> principal),
    headers made inside the traced region as a request's are."""
    registry._checked = {}
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for t in tokens:
        registry.authenticate(f"Bearer {t}".encode())
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    registry.take_used()
    return held / len(tokens)


def per_call_us(stmt: str, names: dict[str, Any], number: int) -> float:
    """µs per call: the median of 5 timeit repeats."""
    runs = timeit.Timer(stmt, globals=names).repeat(repeat=5, number=number)
    return statistics.median(runs) / number * 1e6


def first_seen_us(registry: Registry, headers: list[bytes], rounds: int = 5) -> float:
    """µs per authenticate() of a key not in the cache (the cache emptied before each,
    as a change does): parse, hash, compare, build the principal."""
    runs = []
    for _ in range(rounds):
        started = time.perf_counter()
        for h in headers:
            registry._checked = {}
            registry.authenticate(h)
        runs.append((time.perf_counter() - started) / len(headers) * 1e6)
    registry.take_used()
    return statistics.median(runs)


def request_path(registry: Registry, headers: list[bytes], number: int) -> dict[str, float]:
    """µs of each control-plane call a request makes, on this registry."""
    model = "bench-model"
    registry.apply(Changes(since=registry.version, version=registry.version, models=(
        ModelRecord(name=model, upstream_url="http://127.0.0.1:9/v1", upstream_model="m",
                    id=10**6, version=registry.version,
                    created_at=dt.datetime.now(dt.UTC)),)))
    header = headers[len(headers) // 2]
    who = registry.authenticate(header)
    permission = PERMISSIONS["inference"]
    names = {"auth": registry.authenticate, "h": header, "resolve": registry.resolve,
             "who": who, "m": model, "p": permission, "require": require,
             "check": MemoryLimiter().admit_now}
    inline = "if who.role not in p.roles or p.key_manager: require(who, p)"  # as app.py
    return {
        "auth": per_call_us("auth(h)", names, number),
        "first": first_seen_us(registry, headers),
        "resolve": per_call_us("resolve(who, m)", names, number),
        "inline": per_call_us(inline, names, number),
        "require": per_call_us("require(who, p)", names, number),
        "limit": per_call_us("check(who.limits, 0, 0, m).settle(0)", names, number),
    }


def small_registry(big: Registry, n: int) -> Registry:
    """A registry of the first `n` keys of `big`, their users and companies."""
    keys = tuple(list(big.keys.values())[:n])
    user_rows = {k.user_id: big.users[k.user_id] for k in keys}
    company_rows = {u.company_id: big.companies[u.company_id] for u in user_rows.values()}
    small = Registry(default_max_logprobs=5)
    small.install(small.build(Changes(0, big.version, tuple(company_rows.values()),
                                      tuple(user_rows.values()), keys)))
    return small


# -- the hot path: bench/run.py on the population ----------------------------------------


def hot_path(db: Path | None, smoke: bool, tmp: Path, only: str
             ) -> tuple[dict[str, str], list[str], str]:
    """bench/run.py (--population DB unless None): its rows by figure, its details, its
    notes."""
    out = tmp / f"run-{len(list(tmp.glob('run-*.md')))}.md"
    cmd = [PY, "bench/run.py", *(["--population", str(db)] if db else []), "--only", only,
           "--out", str(out), *(["--smoke"] if smoke else [])]
    say("  " + shlex.join(cmd[1:]))
    r = subprocess.run(cmd, cwd=ROOT, env=BASE_ENV, capture_output=True, text=True,
                       timeout=900)
    if not out.exists():
        raise RuntimeError(f"bench/run.py failed ({r.returncode}): {r.stderr[-600:]}")
    report = out.read_text()
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4:
            rows[cells[0]] = " | ".join(cells[1:])
    details = report.split("## Details", 1)[1].strip().splitlines() if "## Details" in \
        report else []
    notes = [line[2:] for line in report.splitlines() if line.startswith("- Population")
             or line.startswith("- Core 0")]
    if r.returncode:
        say(f"  bench/run.py exited {r.returncode}: {r.stderr[-300:]}")
    return rows, details, " ".join(notes)


def row_of(rows: dict[str, str], prefix: str) -> tuple[str, str, str]:
    for name, cells in rows.items():
        if name.startswith(prefix):
            measured, target, result = cells.split(" | ")
            return measured, target, result
    return "not measured", "-", "**not run**"


# -- the program --------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def row(self, figure: str, measured: str, target: str = "-", result: str = "-") -> None:
        self.rows.append((figure, measured, target, result))
        say(f"  {figure}: {measured}  [{result}]")


def pinned(cpu: str | None) -> None:
    """This thread (and what it spawns) on one core, or on all again."""
    with contextlib.suppress(OSError, ValueError):
        os.sched_setaffinity(0, {int(cpu)} if cpu else set(range(os.cpu_count() or 1)))


def measure_gateway(r: Report, procs: Procs, url: str, backend: str, pop: Population,
                    version: int, tries: int, picks: list[int], empty_url: str | None
                    ) -> None:
    if empty_url is not None:  # first, alone on core 0
        empty = serve(procs, empty_url)
        procs.stop(empty.proc, grace=10)
    starts, gw = [], None
    for _ in range(tries):
        if gw is not None:
            procs.stop(gw.proc, grace=10)
        gw = serve(procs, url)
        starts.append(gw.startup_s)
        say(f"    start-up {gw.startup_s:.2f} s, RSS {gw.rss_mb:.1f} MB, config version "
            f"{gw.version}")
    assert gw is not None
    if gw.version < version:
        raise RuntimeError(f"the {backend} gateway holds config version {gw.version}, not "
                           f"the population's ({version})")
    start = statistics.median(starts)
    r.row(f"Start-up, {backend} (spawn of `paragate serve` to the first 200 on /health)",
          f"{start:.2f} s (median of {tries}: " + ", ".join(f"{s:.2f}" for s in starts) + ")",
          "< 10 s", judge(start, "<=", 10, "s", 2))
    if empty_url is not None:
        per = (gw.rss_mb - empty.rss_mb) * 1e6 / pop.keys
        r.row(f"Gateway RSS after start-up, {backend}, empty store / with the population",
              f"{empty.rss_mb:.1f} MB (start-up {empty.startup_s:.2f} s) / {gw.rss_mb:.1f} MB")
        r.row(f"Memory per key, from RSS, {backend} ((with - empty) / keys; users and "
              "companies included)", f"{per:,.0f} B", "< 1 KB (aim)",
              judge(per, "<=", 1000, "B", 0))
    delays = change_delays(gw, url, pop, picks)
    procs.stop(gw.proc, grace=10)
    store = Store(url)
    reads = []
    for _ in range(5):
        since = store.version() - 1
        started = time.perf_counter()
        store.changes(since)
        reads.append(time.perf_counter() - started)
    store.close()
    r.row(f"Reading one change from the store, {backend} (`Store.changes(version - 1)`, "
          "in-process; part of the figure below)",
          f"{statistics.median(reads) * 1000:.1f} ms (median of 5)")
    median = statistics.median(d for d, _ in delays)
    how = ("LISTEN/NOTIFY" if backend == "PostgreSQL" else
           "polled every PARAGATE_REFRESH_INTERVAL = 0.25 s")
    r.row(f"A change applied on the request path, {backend} ({how}): a key revoked until "
          "the gateway answers it 401",
          f"{median * 1000:.0f} ms (median of {len(delays)}: "
          + ", ".join(f"{d * 1000:.0f}" for d, _ in delays) + " ms; the revocation's own "
          f"transaction {statistics.median(c for _, c in delays) * 1000:.1f} ms)",
          "< 1 s", judge(median, "<=", 1, "s", 3))


def run(args: argparse.Namespace, r: Report, tmp: Path, procs: Procs) -> None:
    s = args.smoke
    n_c, n_u, n_k = (20, 1000, 2000) if s else (args.companies, args.users, args.keys)
    say(f"population: {n_c:,} companies, {n_u:,} users, {n_k:,} keys")
    pinned(AUX_CPU)
    t0 = time.monotonic()
    pop = Population.make(n_c, n_u, n_k)
    made = time.monotonic() - t0
    db = tmp / "population.db"
    url = f"sqlite:///{db}"
    took, version = load(url, pop)
    r.notes.append(f"Population: {n_c:,} companies, {n_u:,} users ({n_u // n_c} a company: "
                   f"its admin, a key manager, plain users), {n_k:,} keys ({n_k // n_u} a "
                   f"user, each expiring in 180 days, rate limit {RPM:,}/min), all at config "
                   f"version {version}; made in {made:.1f} s, written to SQLite in "
                   f"{took:.1f} s (bulk inserts, not the control layer).")
    say(f"  loaded into SQLite in {took:.1f} s")
    tries = 1 if s else args.tries
    n_picks = 2 if s else 5
    picks = pop.plain[len(pop.plain) // (n_picks + 1)::len(pop.plain) // (n_picks + 1)][:n_picks]

    # In-process first, while nothing else runs.
    say("step: in-process view and request path")
    registry, parts = build_view(url)
    r.notes.append(
        f"Where start-up goes, in-process on SQLite: the migration check "
        f"{parts['migrate']:.2f} s, reading every row (`Store.changes(0)`) "
        f"{parts['changes']:.2f} s, building the view (`Registry.build`) {parts['build']:.2f} s;"
        " the rest is the process: Python and its imports, `paragate serve`'s own migration"
        " check, uvicorn.")
    held, peak = traced_view(url)
    keys_only = deep_size([registry.keys]) / len(registry.keys)
    r.row("Memory per key, from tracemalloc (the view held / keys; users and companies "
          "included)", f"{held / n_k:,.0f} B ({held / 1e6:.1f} MB held, {peak / 1e6:.1f} MB "
          "peak while loading)", "< 1 KB (aim)", judge(held / n_k, "<=", 1000, "B", 0))
    r.row("Memory per key, the key alone (its record, its values, its dict slot; "
          "sys.getsizeof, deep)", f"{keys_only:,.0f} B")
    sample = pop.tokens[: min(5000, n_k)]
    r.row("Memory per entry of the cache of checked keys (header -> principal; at most "
          "10,000 entries)", f"{traced_cache(registry, sample):,.0f} B")
    number = 20_000 if s else 200_000
    headers = [f"Bearer {t}".encode() for t in sample]
    big = request_path(registry, headers, number)
    small = request_path(small_registry(registry, 10), headers[:10] * 100, number)
    rows = (("auth", "`registry.authenticate(header)`, a key already checked (the common "
             "path)"),
            ("first", "`registry.authenticate(header)`, a key first seen since the last "
             "change (parse, SHA-256, compare, principal)"),
            ("resolve", "`registry.resolve(principal, model)`"),
            ("inline", "the permission check in app.py (role in permission.roles)"),
            ("require", "`access.require(principal, permission)` (what app.py skips)"),
            ("limit", "the key's rate limit, admitted and settled in process "
                      "(`MemoryLimiter`; not the control plane)"))
    r.details += ["", f"Per call, in-process (timeit, median of 5 repeats; {number:,} calls "
                  "each, 5,000 distinct keys for the first-seen row), this program on core 1:",
                  "", f"| call | µs, {n_k:,} keys | µs, 10 keys |", "|---|---|---|",
                  *(f"| {what} | {big[k]:.3f} | {small[k]:.3f} |" for k, what in rows)]
    total = big["auth"] + big["resolve"] + big["inline"]
    total_small = small["auth"] + small["resolve"] + small["inline"]
    r.row("What the control plane adds to a request (authenticate a checked key + resolve "
          "+ permission check, in-process)",
          f"{total:.2f} µs with {n_k:,} keys, {total_small:.2f} µs with 10 "
          f"(a first-seen key: {big['first'] + big['resolve'] + big['inline']:.2f} µs)",
          "<= 10 µs (aim)", judge(total, "<=", 10, "µs", 2))
    del registry
    gc.collect()

    say("step: the gateway on SQLite")
    empty = tmp / "empty.db"
    migrated(f"sqlite:///{empty}")
    measure_gateway(r, procs, url, "SQLite", pop, version, tries, picks,
                    f"sqlite:///{empty}")

    if args.postgres:
        say("step: the gateway on PostgreSQL")
        with postgres_database(args.postgres) as pg, \
                postgres_database(args.postgres) as pg_empty:
            migrated(pg_empty)
            took, pg_version = load(pg, pop)
            say(f"  loaded into PostgreSQL in {took:.1f} s")
            r.notes.append(f"PostgreSQL: the same population, written in {took:.1f} s, into a "
                           "database of its own on the server of `--postgres`, dropped after.")
            measure_gateway(r, procs, pg, "PostgreSQL", pop, pg_version, tries, picks,
                            pg_empty)

    say("step: the hot path, bench/run.py --population")
    pinned(None)  # bench/run.py pins its own processes, if it may use both cores
    rows, details, notes = hot_path(db, s, tmp, "idle,latency,rate")
    for prefix in ("Added latency p50", "Added latency p99", "Request rate, 1 worker"):
        measured, target, result = row_of(rows, prefix)
        name = next((n for n in rows if n.startswith(prefix)), prefix)
        r.row(f"{name}, with the population", measured, target, result)
    measured, _, _ = row_of(rows, "Idle memory")
    r.row("Gateway RSS after start-up and one request, with the population (bench/run.py's "
          "idle memory)", measured, "-", "- (issue 4's < 80 MB is for a store without one)")
    say("step: the same c=1 latency without the population, for comparison")
    base, base_details, _ = hot_path(None, s, tmp, "latency")
    for p in ("p50", "p99"):
        measured, target, result = row_of(base, f"Added latency {p}")
        r.row(f"Added latency {p}, non-streaming, c=1, without the population (the same "
              "run, for comparison)", measured, target, result)
    r.notes.append(f"The hot path is `bench/run.py --population` ({notes})" if notes else
                   "The hot path is `bench/run.py --population`.")
    r.details += ["", "From `bench/run.py --population` (the gateway on a copy of the SQLite "
                  "population):", "", *details,
                  "", "From `bench/run.py --only latency` (its own store, no population):",
                  "", *base_details]


def render(r: Report, command: str, load_avg: str, took: float, smoke: bool) -> str:
    lines = report_head(
        SECTION, "From one run of `bench/control_plane.py`: a population of companies, "
        "users and keys loaded into a fresh store, then the gateway (`paragate serve`, one "
        "worker pinned to core 0) started on it, changed under it, and measured in-process "
        "(this program on core 1). MB = 10^6 bytes, KB = 1,000 bytes.", command, load_avg,
        took, r.notes, "tiny population, every step about a second" if smoke else None)
    lines += [*(f"| {' | '.join(x.replace('|', '/') for x in row)} |" for row in r.rows),
              *r.details, ""]
    return "\n".join(lines)


def write_section(path: Path, section: str, title: str = SECTION) -> None:
    """Replace the section ``title`` (up to the next `## `) or append it."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    m = re.search(rf"^{re.escape(title)}$.*?(?=^## |\Z)", doc, re.M | re.S)
    if m:
        doc = doc[:m.start()] + section + ("\n" if m.end() < len(doc) else "") + doc[m.end():]
    else:
        doc = doc.rstrip("\n") + "\n\n" + section
    path.write_text(doc)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="2,000 keys, each step ~1 s; "
                    "writes nothing unless --out is given")
    ap.add_argument("--postgres", metavar="URL", help="also on PostgreSQL: a database of its "
                    "own on this server (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/"
                    "test), dropped at the end")
    ap.add_argument("--companies", type=int, default=1000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--tries", type=int, default=3, help="gateway start-ups per store "
                    "[default: 3]")
    ap.add_argument("--out", help=f"the file whose {SECTION!r} section to write "
                    "[default: docs/benchmarks.md; --smoke: none]")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return ap.parse_args()


def main() -> int:
    args, started = parse(), time.monotonic()
    load_avg = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    say(f"control plane at scale ({'smoke' if args.smoke else 'full'}); load average "
        f"{load_avg}")
    tmp = Path(tempfile.mkdtemp(prefix="paragate-cp-"))
    procs = Procs(tmp, {0, 1} <= os.sched_getaffinity(0))
    r = Report()
    try:
        run(args, r, tmp, procs)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as exc:
        import traceback

        traceback.print_exc()
        r.failed.append(" ".join(str(exc).split())[:300])
    finally:
        procs.stop_all()
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) \
        else Path(sys.executable).name
    section = render(r, shlex.join([exe, "bench/control_plane.py", *sys.argv[1:]]), load_avg,
                     time.monotonic() - started, args.smoke)
    print(section)
    out = args.out or (None if args.smoke else str(DOC))
    if out and not r.failed:
        write_section(Path(out), section)
        say(f"wrote the section into {out}")
    say(f"done in {time.monotonic() - started:.0f} s" + (
        f"; failed: {r.failed[0]}" if r.failed else ""))
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
