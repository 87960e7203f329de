"""The Grafana dashboard (deploy/grafana/paragate.json) against a real Prometheus.

A gateway of its own (its own SQLite store, the session's vLLM behind it) serves its
metrics on a port of its own; Prometheus (the `prometheus` binary, Debian's package;
`.ci/run` installs it) scrapes it every second with deploy/prometheus/prometheus.yml.
Two rounds of load, each seen by a scrape, cover every panel: completions, chat, plain
and streamed, a tokenize, the model list, a 400, a 404, a 5xx from a model whose only
replica nobody listens on, a 429 from a key with an rpm limit, and a client that leaves
before its answer and one that leaves mid-stream. Then every panel's query, its Grafana
variables substituted, must come back from Prometheus with data: none is exempt.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from paragate import control
from paragate.control import Actor
from paragate.store import Store

from ..servers import GatewayProcess, free_port, start_gateway
from .conftest import MODEL, SERVED_NAME, Stack

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "paragate.json"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
EXAMPLE_TARGET = "127.0.0.1:9464"  # what the example scrapes; the test swaps in its own
COMPANY = "Dashboard Works"
DEAD = "dead-end"  # its only replica's port has no listener: 5xx and replica errors
HANG_UP_TOKENS = 3000  # a generation of seconds: the client leaves long before its end

# Every metric the gateway promises (docs/observability.md); each has a panel.
METRICS = (
    "paragate_requests_total", "paragate_request_duration_seconds",
    "paragate_time_to_first_token_seconds", "paragate_time_between_chunks_seconds",
    "paragate_overhead_seconds", "paragate_tokens_total",
    "paragate_client_disconnects_total", "paragate_limit_rejections_total",
    "paragate_replica_requests_total", "paragate_replica_errors_total",
    "paragate_replica_response_seconds", "paragate_in_flight_requests",
    "paragate_open_streams", "paragate_replica_up", "paragate_replica_in_flight",
    "paragate_usage_journal_depth", "paragate_usage_write_lag_seconds",
    "paragate_view_age_seconds", "paragate_config_version", "paragate_info",
)
# Grafana's interval variables, in each of its spellings; the dashboard's own variables
_INTERVAL = re.compile(r"\$__(?:rate_interval|interval|range)\b"
                       r"|\$\{__(?:rate_interval|interval|range)(?::[^}]*)?\}")
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\]")


def load_dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows something (rows left out, collapsed rows' panels in)."""
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def substitute(expr: str, window: str) -> str:
    """A target's expression as Grafana sends it with every variable at "All"."""
    expr = _INTERVAL.sub(window, expr)
    expr = _VARIABLE.sub(".*", expr)
    assert "$" not in expr, expr
    return expr


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["definition"] == "label_values(paragate_requests_total, model)"
    assert model["includeAll"] and model["allValue"] == ".*"
    shown = panels(dashboard)
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    ids = [p["id"] for p in rows + shown]
    assert len(ids) == len(set(ids))
    exprs = []
    for panel in shown:
        where = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["targets"], where
        assert panel.get("description"), where
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            expr = target["expr"]
            exprs.append(expr)
            # a variable may be "All" (.*) or several values (a|b): only in a regex match
            for m in _VARIABLE.finditer(_INTERVAL.sub("", expr)):
                assert re.search(r'=~"' + re.escape(m.group(0)) + '"', expr), (where, expr)
                assert (m.group(1) or m.group(2) or m.group(3)) in variables, (where, expr)
            if "rate(" in expr:
                assert "[$__rate_interval]" in expr, (where, expr)
    for name in METRICS:
        assert any(re.search(rf"\b{name}(_bucket)?\b", e) for e in exprs), name


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    started: float

    def query(self, expr: str) -> dict[str, Any]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body: dict[str, Any] = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body

    def vector(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        result = self.query(expr)["data"]["result"]
        return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in result}

    def wait_scrape_after(self, moment: float, scrapes: int = 1) -> None:
        """Until the ``scrapes``-th scrape (1 s apart) that started after ``moment``
        (a time.time()) has been stored."""
        deadline = time.monotonic() + 30
        while True:
            found = self.vector('timestamp(up{job="paragate"} == 1)')
            if found and max(found.values()) > moment + scrapes - 1:
                return
            if time.monotonic() > deadline:
                targets = httpx.get(self.url + "/api/v1/targets", timeout=10).json()
                raise AssertionError(f"no scrape after {moment}: {targets}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("the prometheus binary is missing (.ci/run installs Debian's "
                        "prometheus package)")
        pytest.skip("no prometheus binary (apt-get install --no-install-recommends "
                    "prometheus)")
    return found


def start_prometheus(binary: str, workdir: Path, metrics_port: int) -> Prometheus:
    config = SCRAPE_CONFIG.read_text()
    assert EXAMPLE_TARGET in config and "scrape_interval: 15s" in config
    config = config.replace(EXAMPLE_TARGET, f"127.0.0.1:{metrics_port}").replace(
        "scrape_interval: 15s", "scrape_interval: 1s\n  scrape_timeout: 1s")
    (workdir / "prometheus.yml").write_text(config)
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log, time.monotonic())
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log.read_text()}")
        try:
            if httpx.get(prometheus.url + "/-/ready", timeout=1).status_code == 200:
                return prometheus
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            prometheus.stop()
            raise RuntimeError(f"prometheus did not start: {log.read_text()}")
        time.sleep(0.1)


@dataclass
class Gateway:
    process: GatewayProcess
    metrics_url: str
    metrics_port: int
    key: str
    limited_key: str
    replica: str
    dead_replica: str
    prometheus_binary: str

    def samples(self, name: str, **labels: str) -> list[float]:
        """The values of ``name``'s samples with these labels, from the gateway's own
        exposition on its metrics port (no key)."""
        text = httpx.get(self.metrics_url, timeout=10).text
        return [s.value for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == name and labels.items() <= s.labels.items()]

    def total(self, name: str, **labels: str) -> float:
        return sum(self.samples(name, **labels))


@pytest.fixture
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    binary = _prometheus_binary()  # before the session's vLLM starts, if it has not
    stack: Stack = request.getfixturevalue("stack")
    database = f"sqlite:///{tmp_path / 'gateway.db'}"
    store = Store(database)
    store.migrate()
    cli = Actor.cli()
    company = control.companies.create(store, cli, COMPANY)
    user = control.users.create(store, cli, email="dashboard@e2e.example",
                                company_id=company.id)
    key = control.keys.create(store, cli, name="dashboard", user_id=user.id).secret
    limited = control.keys.create(store, cli, name="dashboard-rpm", user_id=user.id,
                                  rate_limits={"rpm": 1}).secret
    assert key is not None and limited is not None
    control.models.create(store, cli, MODEL, upstream_url=stack.vllm.base_url,
                          upstream_model=SERVED_NAME)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    control.models.create(store, cli, DEAD, upstream_url=dead)
    store.close()
    metrics_port = free_port()
    process = start_gateway(tmp_path, database, PARAGATE_METRICS_PORT=str(metrics_port),
                            PARAGATE_METRICS_COMPANY_LABEL="true")
    try:
        yield Gateway(process, f"http://127.0.0.1:{metrics_port}/metrics", metrics_port,
                      key, limited, stack.vllm.base_url, dead, binary)
    finally:
        process.stop()
        # the generations its clients left may still be aborting: the next tests get an
        # idle vLLM
        _wait_for(partial(_vllm_idle, stack.vllm.base_url.removesuffix("/v1")), 60)


def _stream(gateway: Gateway, client: httpx.Client, path: str,
            body: dict[str, Any]) -> None:
    """A stream whose chunks the gateway sent apart, so that the time between chunks
    grows in every round: on 2 busy cores vLLM may hand over a whole short answer in
    one read, which the relay sends as one chunk (no gap), so then again, longer."""
    gaps = "paragate_time_between_chunks_seconds_count"
    for attempt in range(3):
        before = gateway.total(gaps)
        with client.stream("POST", path, json={
                **body, "stream": True, "max_tokens": 8 * 4 ** attempt,
                "ignore_eos": True}) as r:
            assert r.status_code == 200, r.read()
            assert b"data: [DONE]" in r.read()
        if _wait_for(lambda b=before: gateway.total(gaps) > b, 10):
            return
    raise AssertionError(f"no time between chunks observed on {path}")


def _hang_up_during(client: httpx.Client) -> None:
    with client.stream("POST", "/api/v2/completions", json={
            "model": MODEL, "prompt": "while", "max_tokens": HANG_UP_TOKENS,
            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        for _ in r.iter_bytes():
            break  # the first chunk arrived: leave


def _hang_up_before(gateway: Gateway) -> None:
    # a whole answer comes at its end: the client gives up long before it
    with httpx.Client(base_url=gateway.process.url, timeout=httpx.Timeout(60, read=0.5),
                      headers={"Authorization": f"Bearer {gateway.key}"}) as client, \
            contextlib.suppress(httpx.ReadTimeout):
        client.post("/api/v2/completions", json={
            "model": MODEL, "prompt": "for", "max_tokens": HANG_UP_TOKENS,
            "ignore_eos": True})


def put_load(gateway: Gateway, round_: int) -> set[int]:
    """One round of requests; the statuses the gateway answered."""
    completions, chat = "/api/v2/completions", "/api/v2/chat/completions"
    messages = [{"role": "user", "content": "def main("}]
    statuses = set()
    with httpx.Client(base_url=gateway.process.url, timeout=120,
                      headers={"Authorization": f"Bearer {gateway.key}"}) as client:
        for path, body in ((completions, {"prompt": "def main(", "max_tokens": 8}),
                           (chat, {"messages": messages, "max_tokens": 8})):
            r = client.post(path, json={"model": MODEL, **body})
            assert r.status_code == 200, r.text
            _stream(gateway, client, path, {"model": MODEL, **body})
        r = client.post("/api/v2/tokenize", json={"model": MODEL, "prompt": "import os"})
        assert r.status_code == 200, r.text
        assert client.get("/api/v2/models").status_code == 200
        statuses.add(200)
        r = client.post(completions, json={"model": "no-such-model", "prompt": "x"})
        assert r.status_code == 404, r.text
        r = client.post(completions, json={"model": MODEL, "prompt": "x",
                                           "max_tokens": "many"})
        assert r.status_code == 400, r.text
        r = client.post(completions, json={"model": DEAD, "prompt": "x", "max_tokens": 1})
        assert r.status_code >= 500, r.text
        statuses |= {400, 404, r.status_code}
        limited = {"Authorization": f"Bearer {gateway.limited_key}"}
        answered = {client.post(completions, headers=limited, json={
            "model": MODEL, "prompt": "x", "max_tokens": 1}).status_code for _ in range(2)}
        assert 429 in answered and answered <= {200, 429}, answered
        statuses |= answered
        # the hang-ups, each until the gateway has counted it (on 2 busy cores a
        # generation may, rarely, end before the client's read timeout: then again)
        hang_ups = {"during_response": partial(_hang_up_during, client),
                    "before_response": partial(_hang_up_before, gateway)}
        for when, hang_up in hang_ups.items():
            for _attempt in range(3):
                hang_up()
                if _wait_for(partial(_disconnects_reach, gateway, when, round_), 30):
                    break
            else:
                raise AssertionError(f"no client disconnect {when} counted")
        statuses.add(499)
    # every request has ended, in the gateway too
    assert _wait_for(partial(_in_flight_none, gateway), 60)
    return statuses


def _disconnects_reach(gateway: Gateway, when: str, count: int) -> bool:
    return gateway.total("paragate_client_disconnects_total", when=when) >= count


def _in_flight_none(gateway: Gateway) -> bool:
    return gateway.total("paragate_in_flight_requests") == 0


def _vllm_idle(vllm_url: str) -> bool:
    text = httpx.get(vllm_url + "/metrics", timeout=10).text
    return not any(s.value for family in text_string_to_metric_families(text)
                   for s in family.samples if s.name in (
                       "vllm:num_requests_running", "vllm:num_requests_waiting"))


def _wait_for(condition: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.e2e
def test_every_panel_query_returns_data(gateway: Gateway, tmp_path: Path) -> None:
    started = time.monotonic()
    prometheus = start_prometheus(gateway.prometheus_binary, tmp_path, gateway.metrics_port)
    try:
        # two rounds, a scrape after each: every series exists at the first and has
        # grown by the second, so each rate and each quantile has something to show
        prometheus.wait_scrape_after(time.time())
        statuses = put_load(gateway, 1)
        prometheus.wait_scrape_after(time.time())
        statuses |= put_load(gateway, 2)
        # the dead replica, failing, is taken out (seconds)
        assert _wait_for(lambda: gateway.samples(
            "paragate_replica_up", model=DEAD) == [0.0], 30)
        prometheus.wait_scrape_after(time.time(), scrapes=2)
        window = f"{math.ceil(time.monotonic() - prometheus.started) + 5}s"
        loaded = time.monotonic() - started

        empty = []
        dashboard = load_dashboard()
        for panel in panels(dashboard):
            for target in panel["targets"]:
                expr = substitute(target["expr"], window)
                result = prometheus.query(expr)["data"]
                assert result["resultType"] == "vector", (panel["title"], result)
                values = [float(s["value"][1]) for s in result["result"]]
                if not any(math.isfinite(v) for v in values):
                    empty.append((panel["title"], target["refId"], expr, values))
        assert not empty, "panels without data:\n" + "\n".join(map(str, empty))

        # the labels the spec promises, as Prometheus stored them
        def label(expr: str, name: str) -> set[str]:
            return {dict(k).get(name, "") for k in prometheus.vector(expr)}

        total = "sum by ({}) (paragate_requests_total)"
        assert {"200", "400", "404", "429", "499"} <= label(total.format("status"),
                                                          "status")
        assert statuses <= {int(s) for s in label(total.format("status"), "status")}
        assert {"/api/v2/completions", "/api/v2/chat/completions", "/api/v2/tokenize",
                "/api/v2/models"} <= label(total.format("endpoint"), "endpoint")
        assert "unknown" in label('paragate_requests_total{status="404"}', "model")
        assert label('paragate_requests_total{endpoint="/api/v2/models"}', "model") == {""}
        assert COMPANY in label('paragate_requests_total{status="200"}', "company")
        assert label("paragate_tokens_total", "kind") == {"prompt", "completion"}
        assert label(f'paragate_tokens_total{{model="{MODEL}"}}', "company") == {COMPANY}
        assert {"before_response", "during_response"} <= label(
            "paragate_client_disconnects_total", "when")
        assert "rate_limit_exceeded" in label("paragate_limit_rejections_total", "kind")
        up = {dict(k)["replica"]: v for k, v in prometheus.vector(
            "paragate_replica_up").items()}
        assert up == {gateway.replica: 1.0, gateway.dead_replica: 0.0}, up
        errors = {dict(k)["replica"]: v for k, v in prometheus.vector(
            "paragate_replica_errors_total").items()}
        assert errors[gateway.dead_replica] > 0, errors
        assert label("paragate_info", "version") - {""}
        print(f"\nload and scrapes {loaded:.1f} s, "
              f"{sum(len(p['targets']) for p in panels(dashboard))} panel queries")
    finally:
        prometheus.stop()
