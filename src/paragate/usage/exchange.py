"""What one request used, filled in as it goes and journaled once, before its response's
last byte is sent (or, when it fails, before its error is sent)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..limits.core import Ticket
from ..store import UsageRecord

__all__ = ["Exchange", "client_request_id"]

_CLIENT_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")


def client_request_id(value: bytes | None) -> str | None:
    """The client's own ``x-request-id``, when well formed (1 to 128 letters, digits,
    ``.``, ``_`` or ``-``); anything else is not kept."""
    if value is None or not _CLIENT_ID.fullmatch(value):
        return None
    return value.decode()


@dataclass(slots=True)
class Exchange:
    request_id: str
    record: Callable[[UsageRecord], None] | None  # None: the key opted out of usage
    key_id: int | None = None
    user_id: int | None = None
    company_id: int | None = None
    client_request_id: str | None = None
    endpoint: str = "/api/v2/completions"
    started: float = field(default_factory=time.monotonic)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    model: str = ""
    model_id: int | None = None
    stream: bool = False
    n: int = 1
    upstream: str | None = None
    status: int = 0
    outcome: str = "error"  # ok | error | upstream_error | client_disconnected | shutdown
    error_type: str | None = None
    partial: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    first_byte: float | None = None  # monotonic: the first text sent (streams)
    waited: float = 0.0  # seconds spent waiting on the upstream
    # a stream's relay: puts the usage known so far in, when the stream ends early
    settle: Callable[[], None] | None = None
    ticket: Ticket | None = None  # its reservation against the limits that apply
    answer: list[bytes] | None = None  # the answer as sent, kept for a model's log_payloads
    done: bool = False

    def tried(self, upstream: str) -> None:
        """The replica a try goes to (the last one tried is the record's upstream)."""
        self.upstream = upstream

    def finish(self) -> None:
        """Journal the record (once; later calls do nothing)."""
        if self.done:
            return
        self.done = True
        if self.settle is not None:
            self.settle()
        prompt, completion = self.prompt_tokens, self.completion_tokens
        ticket = self.ticket
        if ticket is not None:
            if prompt is None and completion is None:
                # vLLM reported nothing: a request it never got spent nothing; one left
                # by its client before the answer had its prompt processed (docs/limits.md)
                used = ticket.prompt if (
                    self.outcome == "client_disconnected" and self.upstream) else 0
            else:
                used = (prompt or 0) + (completion or 0)
            ticket.settle(used)
        if self.record is None:
            return
        elapsed = time.monotonic() - self.started
        total = None if prompt is None and completion is None else (
            (prompt or 0) + (completion or 0))
        self.record(UsageRecord(
            request_id=self.request_id,
            created_at=self.created_at,
            key_id=self.key_id,
            model=self.model[:200],
            stream=self.stream,
            status=self.status or 500,
            outcome=self.outcome,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=total,
            duration_ms=int(elapsed * 1000),
            user_id=self.user_id,
            company_id=self.company_id,
            model_id=self.model_id,
            client_request_id=self.client_request_id,
            endpoint=self.endpoint,
            upstream=self.upstream[:500] if self.upstream else None,
            n=self.n,
            error_type=None if self.outcome == "ok" else (self.error_type or self.outcome),
            partial=self.partial,
            cached_tokens=self.cached_tokens,
            ttft_ms=(int((self.first_byte - self.started) * 1000)
                     if self.first_byte is not None else None),
            gateway_us=int(max(elapsed - self.waited, 0.0) * 1_000_000),
        ))
