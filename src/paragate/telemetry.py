"""What the gateway tells about each request once it is answered: its metrics and its
log line (``metrics.py``, ``logs.py``), in one place, for forwarded requests
(``forwarded``, from ``dispatch.forward``) and every other one (``answered``, from
the app)."""

from __future__ import annotations

import time
from collections.abc import Callable

from .logs import AccessLine, AccessLog
from .metrics import Metrics
from .registry import Registry
from .routing import Request
from .usage import Exchange

__all__ = ["LIMIT_REFUSALS", "Telemetry"]

# the error codes that are a limit's refusal (``paragate_limit_rejections_total{kind}``)
LIMIT_REFUSALS = frozenset({"rate_limit_exceeded", "concurrency_limit_exceeded",
                            "budget_exceeded", "limits_unavailable",
                            "reservation_too_large"})


class Telemetry:
    __slots__ = ("access", "company_label", "in_flight", "metrics", "registry", "streams")

    def __init__(self, registry: Registry, metrics: Metrics | None,
                 access: AccessLog | None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.access = access
        self.company_label = metrics is not None and metrics.company_label
        # by endpoint: forwarded requests in progress, and streams being relayed
        self.in_flight: dict[str, int] = {}
        self.streams: dict[str, int] = {}

    def gap(self, endpoint: str, model: str) -> Callable[[float], None] | None:
        """What a stream's relay calls with the time between two pieces it sent."""
        if self.metrics is None:
            return None
        return self.metrics.series(endpoint, model).gap

    def model_label(self, ex: Exchange) -> str:
        """A configured model's name; ``unknown`` for any other name (or none)."""
        if ex.model_id is not None or ex.model in self.registry.routes:
            return ex.model
        return "unknown"

    def _company(self, company_id: int | None) -> str | None:
        if company_id is None:
            return None
        company = self.registry.companies.get(company_id)
        return company.name if company is not None else None

    def forwarded(self, r: Request, endpoint: str, ex: Exchange,
                  payload: tuple[str, str] | None = None) -> None:
        now = time.monotonic()
        elapsed = now - ex.started
        status = ex.status or 500
        upstream = ex.upstream is not None
        overhead = max(elapsed - ex.waited, 0.0)
        m = self.metrics
        if m is not None:
            model = self.model_label(ex)
            company = self._company(ex.company_id) if self.company_label else None
            series = m.series(endpoint, model, company)
            series.count(status)
            series.duration(elapsed)
            if upstream:
                series.overhead(overhead)
            if ex.first_byte is not None:
                series.ttft(ex.first_byte - ex.started)
            if ex.prompt_tokens or ex.completion_tokens:
                m.tokens(model, ex.prompt_tokens, ex.completion_tokens, company)
            if ex.outcome == "client_disconnected":
                m.disconnected(endpoint, model, during=status != 499)
            elif ex.error_type in LIMIT_REFUSALS:
                m.rejected(ex.error_type)
        if self.access is not None:
            who = r.principal
            line = AccessLine(
                r.response_id, "POST", endpoint, status, ex.model[:200] or None,
                who.public_id if who is not None else None, ex.company_id, ex.user_id,
                ex.upstream, ex.stream, ex.outcome,
                None if ex.outcome == "ok" else (ex.error_type or ex.outcome),
                ex.prompt_tokens, ex.completion_tokens, round(elapsed * 1000, 3),
                round((ex.first_byte - ex.started) * 1000, 3)
                if ex.first_byte is not None else None,
                round(ex.waited * 1000, 3) if upstream else None,
                round(overhead * 1000, 3),
                ex.request_id if r.response_id != ex.request_id else None)
            if payload is not None:
                line.prompt, line.completion = payload
            self.access.write(line)

    def answered(self, r: Request, method: str, endpoint: str, status: int,
                 error: str | None, model: str = "") -> None:
        """A request not forwarded to a model (the model list, the admin API, health,
        an error before any handler: ``model`` is then ``unknown`` on a model's
        endpoint)."""
        elapsed = time.monotonic() - r.started
        m = self.metrics
        if m is not None:
            series = m.series(endpoint, model, None)
            series.count(status)
            series.duration(elapsed)
            if status == 499:
                m.disconnected(endpoint, model, during=False)
        if self.access is not None:
            who = r.principal
            self.access.write(AccessLine(
                r.response_id, method[:20], endpoint, status,
                key=who.public_id if who is not None else None,
                company=who.company_id if who is not None else None,
                user=who.user_id if who is not None else None,
                error=error, duration_ms=round(elapsed * 1000, 3)))
