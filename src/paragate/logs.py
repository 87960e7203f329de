"""Logging: the format of every line on stderr (``PARAGATE_LOG_FORMAT``: ``json``, one
object a line, or ``text``), and the per-request line (``PARAGATE_ACCESS_LOG``).

The per-request line is written straight to stderr's file descriptor, one ``write`` a
line (whole lines from several workers never interleave), without the ``logging``
module's record, handler and lock: a few microseconds a request. It carries no key (the
key's public id only), no prompt and no completion, unless the model's ``log_payloads``
is on (and the registry warns about that whenever it loads such a model).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = ["AccessLine", "AccessLog", "JsonFormatter", "TextFormatter", "logging_config",
           "timestamp"]

_encode = msgspec.json.Encoder().encode


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def timestamp(when: float | None = None) -> str:
    """UTC, to the millisecond, ISO 8601 with a ``Z``."""
    when = time.time() if when is None else when
    whole = int(when)
    if whole != _second[0]:
        _second[:] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((when - whole) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": timestamp(record.created),
                               "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _encode(out).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line += " " + _pairs(fields)
        return line


def _pairs(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_text(v)}" for k, v in fields.items() if v is not None)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and '"' not in value else (
            _encode(value).decode())
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return _encode(value).decode()


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for paragate's loggers and uvicorn's (which
    ``paragate serve`` hands to uvicorn): one handler on stderr, in ``fmt``."""
    formatter = "paragate.logs.JsonFormatter" if fmt == "json" else (
        "paragate.logs.TextFormatter")
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": formatter}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "stream": "ext://sys.stderr"}},
        "loggers": {
            "paragate": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


class AccessLine(msgspec.Struct, omit_defaults=True):
    """One request's line (fields left unset are left out). Durations in ms."""

    request_id: str  # the answer's x-request-id
    method: str
    endpoint: str  # the route template
    status: int  # sent (499: the client left first)
    model: str | None = None
    key: str | None = None  # the key's public id, never its secret
    company: int | None = None
    user: int | None = None
    replica: str | None = None  # the upstream URL tried last
    stream: bool = False
    outcome: str | None = None  # ok | error | upstream_error | client_disconnected | ...
    error: str | None = None  # the error code
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    duration_ms: float = 0.0
    ttft_ms: float | None = None
    upstream_ms: float | None = None
    overhead_ms: float | None = None
    usage_id: str | None = None  # the usage record's id, when the client named its own
    prompt: str | None = None  # only for a model with log_payloads on
    completion: str | None = None  # likewise


class AccessLog:
    """The per-request line, in the log's format; ``write(line)`` writes one."""

    __slots__ = ("_fd", "_json")

    def __init__(self, fmt: str = "json", fd: int | None = None) -> None:
        self._json = fmt == "json"
        self._fd = sys.stderr.fileno() if fd is None else fd

    def write(self, fields: AccessLine) -> None:
        now = time.time()
        if self._json:
            line = b'{"ts":"%s","level":"info","logger":"paragate.access",%s\n' % (
                timestamp(now).encode(), _encode(fields)[1:])
        else:
            line = ("%s INFO paragate.access: %s %s %s\n" % (  # noqa: UP031
                timestamp(now), fields.method, fields.endpoint,
                _pairs(msgspec.structs.asdict(fields)))).encode()
        try:  # noqa: SIM105 - cheaper than contextlib.suppress, once a request
            os.write(self._fd, line)
        except OSError:  # pragma: no cover - stderr gone: nothing to log to
            pass
