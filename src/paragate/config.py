"""Settings: one frozen object, read once at start-up.

Sources, later ones winning: the defaults in ``SETTINGS``, an optional TOML file
(``PARAGATE_CONFIG=path``, keys are the setting names), then ``PARAGATE_<NAME>``
environment variables. An unknown key in the file, or an unknown ``PARAGATE_*``
variable, is an error rather than a silence: a typo must not quietly run with a default.
The same table feeds ``paragate settings``, docs/configuration.md and a test that keeps
the two in step.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

__all__ = ["NON_SETTING_VARIABLES", "SETTINGS", "ConfigError", "Setting", "Settings", "load"]


class ConfigError(ValueError):
    """A setting has a bad value, or a key is unknown."""


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: Any
    help: str

    @property
    def env(self) -> str:
        return "PARAGATE_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "database_url",
        "sqlite:///paragate.db",
        "SQLAlchemy URL of the store. SQLite (default, a file in the working directory) "
        "or PostgreSQL (postgresql+psycopg://user@host/db).",
    ),
    Setting("host", "127.0.0.1", "Address `paragate serve` listens on."),
    Setting("port", 8080, "Port `paragate serve` listens on."),
    Setting("workers", 1, "Worker processes for `paragate serve`."),
    Setting("log_level", "info", "Log level: debug, info, warning or error."),
    Setting(
        "log_format",
        "json",
        "Log format on stderr: `json` (one JSON object a line) or `text`.",
    ),
    Setting(
        "access_log",
        True,
        "Log one line per request (request id, key prefix, company, model, endpoint, "
        "replica, status, error code, tokens, durations); never a prompt or a key.",
    ),
    Setting(
        "max_body_bytes",
        4 * 1024 * 1024,
        "Largest request body accepted; a larger one is answered 413.",
    ),
    Setting(
        "max_form_fields",
        256,
        "Most fields in one urlencoded or multipart/form-data body (each repeated "
        "`prompt` or `stop` counts); more is answered 413.",
    ),
    Setting(
        "max_form_part_bytes",
        1024 * 1024,
        "Largest field of an urlencoded or multipart/form-data body, in bytes (its value "
        "once unescaped, a part's data); a larger one is answered 413.",
    ),
    Setting(
        "max_json_depth",
        128,
        "Most levels of arrays and objects nested in a JSON body (or in a form field's "
        "JSON), 1 to 512; a deeper one is answered 400.",
    ),
    Setting(
        "max_json_containers",
        20000,
        "Most arrays and objects in a JSON body (or in a form field's JSON); a body with "
        "more is answered 400 before it is decoded (millions of them would hold the "
        "event loop for seconds).",
    ),
    Setting(
        "max_json_keys",
        100000,
        "Most object keys in a JSON body (or in a form field's JSON), all objects "
        "together; a body with more is answered 400 before it is decoded (a dict of "
        "hundreds of thousands of keys takes a tenth of a second to build).",
    ),
    Setting(
        "default_max_logprobs",
        5,
        "Largest `logprobs` a request may ask for, unless the model sets its own maximum.",
    ),
    Setting(
        "upstream_connect_timeout",
        5.0,
        "Seconds to open a connection to vLLM before answering 503.",
    ),
    Setting(
        "upstream_read_timeout",
        600.0,
        "Seconds to wait for vLLM's answer to start, and then between two pieces of it, "
        "before answering 504 (a model's `timeouts` may set each of its own).",
    ),
    Setting(
        "upstream_keepalive",
        4.0,
        "Seconds a pooled connection to vLLM may wait unused before it is closed rather "
        "than reused; keep it under the upstream's own keep-alive timeout (vLLM: 5 s), so "
        "that the server never closes a connection a request is being written to "
        "(0: no limit).",
    ),
    Setting(
        "upstream_max_connections",
        0,
        "Most connections open to one upstream at once; requests past it wait for a free "
        "one (0: no limit, every request in flight has its own; vLLM queues them itself).",
    ),
    Setting(
        "upstream_retries",
        2,
        "Most further tries of a request on other replicas, made only where it cannot "
        "have been processed: no connection, or vLLM answered 503 (queue full) or 429 "
        "before anything reached the client.",
    ),
    Setting(
        "upstream_retry_window",
        10.0,
        "Seconds after a request's first try during which another may start.",
    ),
    Setting(
        "health_interval",
        1.0,
        "Seconds between health checks of each replica (`/health`, and `/metrics` for "
        "its queue when the model has several); 0: none, an ejected replica is tried "
        "again once its back-off is over.",
    ),
    Setting(
        "health_timeout",
        2.0,
        "Seconds a replica's `/health` (or `/metrics`) may take before the check fails.",
    ),
    Setting(
        "replica_eject_after",
        3,
        "Failures in a row (connect errors, 5xx other than 503, broken or timed-out "
        "answers, failed health checks) that take a replica out of rotation.",
    ),
    Setting(
        "replica_max_backoff",
        8.0,
        "Longest wait, in seconds, before an ejected replica is probed again (the wait "
        "doubles from 1 s).",
    ),
    Setting(
        "dns_interval",
        5.0,
        "Seconds between lookups of the names of replicas with `discover` on (each "
        "address a name resolves to is a replica: a Kubernetes headless Service).",
    ),
    Setting(
        "affinity_prefix_chars",
        256,
        "For models with `affinity: prefix`: how many of a prompt's first characters "
        "(a quarter as many token ids) pick its replica.",
    ),
    Setting(
        "refresh_interval",
        0.25,
        "Seconds between checks of the store's config version. On PostgreSQL a change "
        "is applied at once (LISTEN/NOTIFY) and this poll is the fallback; on SQLite it is "
        "the mechanism, so a change takes effect within this time.",
    ),
    Setting(
        "max_view_age",
        0.0,
        "When above 0: answer 503 once the store has been unreachable for this many "
        "seconds, instead of serving from the last view of keys and models (0: no bound).",
    ),
    Setting(
        "usage_flush_interval",
        0.1,
        "Seconds between batched writes of usage records from the journal to the store.",
    ),
    Setting(
        "journal_dir",
        "",
        "Directory of the usage journal (each record is on disk there before its "
        "response ends). Several gateway processes may share it. Empty: `<name>.usage` "
        "beside the SQLite store, else `paragate.usage` in the working directory.",
    ),
    Setting(
        "journal_fsync",
        "interval",
        "When the journal is flushed to disk: `always` (before each response ends), "
        "`interval` (every `journal_fsync_interval` seconds: a power cut loses at most "
        "that much) or `never` (the kernel decides; a crash of paragate still loses "
        "nothing).",
    ),
    Setting("journal_fsync_interval", 0.1, "Seconds between fsyncs in `interval` mode."),
    Setting(
        "usage_retention_days",
        90,
        "Days raw usage records are kept (0: for ever); the hourly and daily sums that "
        "reports read are kept for ever.",
    ),
    Setting(
        "shutdown_delay",
        5.0,
        "Seconds between SIGTERM and closing the listener, while `/ready` answers 503 so "
        "that a load balancer stops sending (skipped on Ctrl-C).",
    ),
    Setting(
        "shutdown_timeout",
        30.0,
        "Seconds after SIGTERM that requests in flight may take to finish; streams still "
        "open then end with an error event and a partial usage record.",
    ),
    Setting(
        "default_key_days",
        180,
        "Days until a key made through the admin API expires, unless the request sets "
        "`expires_at` (0: never). `paragate keys create` keeps its own default, never.",
    ),
    Setting(
        "max_keys_per_user",
        5,
        "Most active (not revoked, not expired) keys a user may hold; the built-in system "
        "admin and default user are exempt.",
    ),
    Setting(
        "key_rotation_grace",
        86400,
        "Seconds a key's old secret keeps working after the key is rotated (0: none).",
    ),
    Setting(
        "secret_key",
        "",
        "Fernet key(s) that encrypt upstream API keys at rest, separated by commas: the "
        "first encrypts, every one decrypts (rotation: put a new key first, run "
        "`paragate secrets rotate`, then remove the old). Empty, with `secret_key_file` "
        "empty too: a SQLite store uses a key file made beside its database "
        "(`paragate.key`, mode 0600); any other store refuses to store an upstream API "
        "key. `paragate secrets generate` prints a key. Never logged.",
    ),
    Setting(
        "secret_key_file",
        "",
        "A file holding the Fernet key(s) of `secret_key` instead, one a line (the first "
        "encrypts; blank lines and `#` comments are skipped). Set one of the two, not both.",
    ),
    Setting(
        "redis_url",
        "",
        "Redis for rate limits and budgets shared by every gateway process and instance "
        "(e.g. redis://127.0.0.1:6379/0; rediss:// for TLS). Empty: limits are counted "
        "in this process (one instance, one worker).",
    ),
    Setting(
        "redis_prefix",
        "paragate",
        "Namespace of paragate's keys in Redis (the hash tag `{<prefix>}` starts every "
        "key): deployments sharing one Redis need different ones.",
    ),
    Setting(
        "redis_timeout",
        0.25,
        "Seconds a Redis answer may take before Redis counts as unreachable.",
    ),
    Setting(
        "limits_fail_mode",
        "open",
        "While Redis is unreachable: `open` admits requests without counting them against "
        "limits (logged, and every usage record is still kept), `closed` refuses them "
        "with 503 `limits_unavailable`.",
    ),
    Setting(
        "limits_per_process",
        False,
        "Allow `--workers` above 1 without Redis while limits are configured: each "
        "worker then counts on its own, so a limit lets through up to workers times as "
        "much.",
    ),
    Setting(
        "limits_reservation_ttl",
        60.0,
        "Seconds a request's reservation (its concurrency slot, its budget tokens) lives "
        "in Redis unless renewed; the gateway renews those of requests in flight, so a "
        "reservation outlives a dead gateway by at most this long.",
    ),
    Setting(
        "max_prompts",
        64,
        "Most prompts one request may send in a list, unless the model sets its own.",
    ),
    Setting(
        "max_n",
        16,
        "Largest `n` (and `best_of`) one request may ask for, unless the model sets its "
        "own.",
    ),
    Setting(
        "max_request_tokens",
        1_000_000,
        "Most tokens one request may reserve (estimated prompt plus `max_tokens` times "
        "completions), unless the model sets its own.",
    ),
    Setting(
        "reserve_max_tokens",
        16384,
        "The `max_tokens` reserved for a request that sets none when its model has "
        "neither `default_max_tokens` nor `max_tokens_limit` (set the model's "
        "`max_tokens_limit` to its context length for exact reservations).",
    ),
    Setting(
        "metrics",
        True,
        "Record Prometheus metrics and serve them at `/metrics` (false: neither).",
    ),
    Setting(
        "metrics_token",
        "",
        "A bearer token that Prometheus may send to `/metrics` on the main port instead "
        "of an admin key (empty: admin keys only). Never logged.",
    ),
    Setting(
        "metrics_port",
        0,
        "Also serve `/metrics` without a key on this port, bound to `metrics_host` "
        "(0: not served on a port of its own).",
    ),
    Setting("metrics_host", "127.0.0.1", "Address the `metrics_port` listener binds to."),
    Setting(
        "metrics_company_label",
        False,
        "Add a `company` label (the company's name) to the request and token counters; "
        "for small deployments (one series per company and model).",
    ),
    Setting(
        "otlp_endpoint",
        "",
        "OTLP/HTTP traces endpoint (e.g. http://127.0.0.1:4318/v1/traces): spans for "
        "authentication, routing, limits and the upstream call, with `traceparent` sent "
        "to vLLM (empty: tracing off).",
    ),
    Setting(
        "otlp_headers",
        "",
        "Headers sent with each OTLP export, `name=value` pairs separated by commas "
        "(e.g. an authorization token). Never logged.",
    ),
    Setting("traces_sample_ratio", 1.0, "Share of requests traced, 0 to 1 (parent-based)."),
    Setting(
        "trusted_proxies",
        "",
        "Comma-separated networks (e.g. 10.0.0.0/8,127.0.0.1) of load balancers whose "
        "X-Forwarded-For names the client's address; from other peers it is ignored.",
    ),
    Setting(
        "header_timeout",
        30.0,
        "Seconds a client has to send a request's line and headers, however slowly they "
        "trickle: counted from the connection's opening for its first request, from the "
        "request's first byte for later ones; then 408 and the connection is closed.",
    ),
    Setting(
        "body_timeout",
        30.0,
        "Seconds a request's body may stall (not a byte arriving) before the request is "
        "cut: 408 (or a close, if its answer has started). An upload that keeps moving, "
        "however slowly, is never cut.",
    ),
    Setting(
        "keepalive_timeout",
        5.0,
        "Seconds an idle keep-alive connection waits for its next request before it is "
        "closed.",
    ),
    Setting(
        "max_headers",
        100,
        "Most header fields in one request; more is answered 431.",
    ),
    Setting(
        "max_header_bytes",
        32768,
        "Most bytes in a request's target and header lines together; more is answered 431.",
    ),
    Setting(
        "max_connections_per_client",
        512,
        "Most connections open at once from one TCP peer address, in each worker process; "
        "the next one is answered 429 and closed (0: no limit). Peers in "
        "`trusted_proxies` are not counted: a load balancer's connections carry many "
        "clients, and limiting them is its job.",
    ),
    Setting(
        "tls_certfile",
        "",
        "PEM certificate (with its chain) for HTTPS: `paragate serve` speaks TLS with it "
        "(empty: plain HTTP, e.g. behind a proxy that terminates TLS).",
    ),
    Setting(
        "tls_keyfile",
        "",
        "PEM private key of `tls_certfile` (empty: the key is in the certificate's file).",
    ),
    Setting(
        "tls_keyfile_password",
        "",
        "Password of an encrypted private key. Never logged.",
    ),
    Setting(
        "cors_origins",
        "",
        "Comma-separated origins (e.g. https://app.example.com) whose web pages may call "
        "the API from a browser: preflights are answered and responses carry "
        "Access-Control-* headers; `*` for any origin. Empty: CORS off.",
    ),
)

# PARAGATE_* variables that are read by something other than the gateway's settings.
NON_SETTING_VARIABLES = frozenset(
    {
        "PARAGATE_CONFIG",  # path of the optional TOML file
        "PARAGATE_UPSTREAM_API_KEY",  # `paragate models add/update --upstream-api-key`
        "PARAGATE_CACHE",  # tools/localvllm.py: where the vLLM venv and demo model live
        "PARAGATE_VLLM_VENV",  # tools/localvllm.py
        "PARAGATE_VLLM_PACKAGE",  # tools/localvllm.py
        "PARAGATE_TEST_POSTGRES_URL",  # tests
        "PARAGATE_TEST_LOG_DIR",  # tests: where the run's logs go (tools/run_tests.py)
        "PARAGATE_KEY",  # bench/completion.lua (wrk): the key it sends
    }
)


@dataclass(frozen=True, slots=True)
class Settings:
    """The gateway's settings; see ``SETTINGS`` for what each one means."""

    database_url: str = "sqlite:///paragate.db"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    log_level: str = "info"
    log_format: str = "json"
    access_log: bool = True
    max_body_bytes: int = 4 * 1024 * 1024
    max_form_fields: int = 256
    max_form_part_bytes: int = 1024 * 1024
    max_json_depth: int = 128
    max_json_containers: int = 20000
    max_json_keys: int = 100000
    default_max_logprobs: int = 5
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 600.0
    upstream_keepalive: float = 4.0
    upstream_max_connections: int = 0
    upstream_retries: int = 2
    upstream_retry_window: float = 10.0
    health_interval: float = 1.0
    health_timeout: float = 2.0
    replica_eject_after: int = 3
    replica_max_backoff: float = 8.0
    dns_interval: float = 5.0
    affinity_prefix_chars: int = 256
    refresh_interval: float = 0.25
    max_view_age: float = 0.0
    usage_flush_interval: float = 0.1
    journal_dir: str = ""
    journal_fsync: str = "interval"
    journal_fsync_interval: float = 0.1
    usage_retention_days: int = 90
    shutdown_delay: float = 5.0
    shutdown_timeout: float = 30.0
    default_key_days: int = 180
    max_keys_per_user: int = 5
    key_rotation_grace: int = 86400
    secret_key: str = ""
    secret_key_file: str = ""
    redis_url: str = ""
    redis_prefix: str = "paragate"
    redis_timeout: float = 0.25
    limits_fail_mode: str = "open"
    limits_per_process: bool = False
    limits_reservation_ttl: float = 60.0
    max_prompts: int = 64
    max_n: int = 16
    max_request_tokens: int = 1_000_000
    reserve_max_tokens: int = 16384
    metrics: bool = True
    metrics_token: str = ""
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_company_label: bool = False
    otlp_endpoint: str = ""
    otlp_headers: str = ""
    traces_sample_ratio: float = 1.0
    trusted_proxies: str = ""
    header_timeout: float = 30.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    max_headers: int = 100
    max_header_bytes: int = 32768
    max_connections_per_client: int = 512
    tls_certfile: str = ""
    tls_keyfile: str = ""
    tls_keyfile_password: str = ""
    cors_origins: str = ""

    def journal_path(self) -> Path:
        """The journal's directory: the setting, or beside the SQLite store."""
        if self.journal_dir:
            return Path(self.journal_dir)
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            db = Path(url.database or "")
            return db.with_name(db.stem + ".usage")
        return Path("paragate.usage")

    def proxy_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return tuple(ip_network(n.strip(), strict=False)
                     for n in self.trusted_proxies.split(",") if n.strip())

    def cors_origin_list(self) -> tuple[str, ...]:
        """The allowed origins, as browsers send them (lower case, no trailing slash)."""
        return tuple(o.strip().lower() for o in self.cors_origins.split(",") if o.strip())

    def shown(self) -> dict[str, Any]:
        """Every setting as it may be shown on a screen or in a log: passwords in URLs,
        the metrics token, the secret key and the OTLP header values masked."""
        from sqlalchemy.engine import make_url

        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("database_url", "redis_url"):
            if out[name]:
                try:
                    out[name] = make_url(out[name]).render_as_string(hide_password=True)
                except Exception:  # an unparsable URL: shown as nothing rather than leaked
                    out[name] = "***"
        for name in ("metrics_token", "tls_keyfile_password", "secret_key"):
            if out[name]:
                out[name] = "***"
        if out["otlp_headers"]:
            out["otlp_headers"] = ",".join(
                p.split("=", 1)[0].strip() + "=***"
                for p in out["otlp_headers"].split(",") if p.strip())
        return out

    def replace(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


_TYPES: dict[str, type] = {s.name: type(s.default) for s in SETTINGS}
if [f.name for f in fields(Settings)] != [s.name for s in SETTINGS]:  # pragma: no cover
    raise RuntimeError("Settings and SETTINGS disagree")  # a bug, caught at import
_LOG_LEVELS = ("debug", "info", "warning", "error")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s,?#@]+")


def _coerce(name: str, raw: Any) -> Any:
    kind = _TYPES[name]
    if isinstance(raw, str) and kind is not str:
        text = raw.strip().lower()
        try:
            if kind is bool:
                if text in ("1", "true", "yes", "on"):
                    return True
                if text in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return kind(text)
        except ValueError:
            raise ConfigError(f"{name}: expected {kind.__name__}, got {raw!r}") from None
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if type(raw) is not kind:
        raise ConfigError(f"{name}: expected {kind.__name__}, got {raw!r}")
    return raw


def _check(settings: Settings) -> Settings:
    if settings.log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(_LOG_LEVELS)}")
    if settings.log_format not in ("json", "text"):
        raise ConfigError("log_format: expected json or text")
    if not 0 <= settings.metrics_port <= 65535:
        raise ConfigError("metrics_port: must be between 0 and 65535")
    if settings.metrics_port and settings.metrics_port == settings.port:
        raise ConfigError("metrics_port: must differ from port")
    if not 0.0 <= settings.traces_sample_ratio <= 1.0:
        raise ConfigError("traces_sample_ratio: must be between 0 and 1")
    if settings.otlp_endpoint and not settings.otlp_endpoint.startswith(
            ("http://", "https://")):
        raise ConfigError("otlp_endpoint: expected an http:// or https:// URL")
    for pair in filter(None, (p.strip() for p in settings.otlp_headers.split(","))):
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise ConfigError("otlp_headers: expected name=value pairs separated by commas")
    for name in ("port", "workers", "max_body_bytes", "upstream_max_connections",
                 "upstream_keepalive", "upstream_retries", "upstream_retry_window",
                 "health_interval",
                 "max_view_age", "default_key_days", "key_rotation_grace",
                 "usage_retention_days", "shutdown_delay", "shutdown_timeout"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{name}: must not be negative")
    if settings.workers < 1:
        raise ConfigError("workers: must be at least 1")
    if settings.replica_eject_after < 1:
        raise ConfigError("replica_eject_after: must be at least 1")
    if settings.affinity_prefix_chars < 1:
        raise ConfigError("affinity_prefix_chars: must be at least 1")
    for name in ("upstream_connect_timeout", "upstream_read_timeout", "refresh_interval",
                 "health_timeout", "replica_max_backoff", "dns_interval",
                 "usage_flush_interval", "journal_fsync_interval"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name}: must be greater than 0")
    if 0 < settings.max_view_age <= settings.refresh_interval:
        raise ConfigError("max_view_age: must be 0 or longer than refresh_interval")
    if settings.journal_fsync not in ("always", "interval", "never"):
        raise ConfigError("journal_fsync: expected always, interval or never")
    if settings.limits_fail_mode not in ("open", "closed"):
        raise ConfigError("limits_fail_mode: expected open or closed")
    if settings.redis_url and not settings.redis_url.startswith(("redis://", "rediss://")):
        raise ConfigError("redis_url: expected redis://host:port/db or rediss://...")
    if not settings.redis_prefix or any(c in settings.redis_prefix for c in "{} \t\r\n"):
        raise ConfigError("redis_prefix: must be non-empty, without braces or spaces")
    for name in ("redis_timeout", "limits_reservation_ttl"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name}: must be greater than 0")
    for name in ("max_prompts", "max_n", "max_request_tokens", "reserve_max_tokens"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name}: must be at least 1")
    if settings.max_keys_per_user < 1:
        raise ConfigError("max_keys_per_user: must be at least 1")
    for name in ("max_form_fields", "max_form_part_bytes"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name}: must be at least 1")
    if not 1 <= settings.max_json_depth <= 512:  # msgspec's own guard is near 1000
        raise ConfigError("max_json_depth: must be between 1 and 512")
    for name in ("max_json_containers", "max_json_keys"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name}: must be at least 1")
    try:
        settings.proxy_networks()
    except ValueError as exc:
        raise ConfigError(f"trusted_proxies: {exc}") from None
    for name in ("header_timeout", "body_timeout", "keepalive_timeout"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name}: must be greater than 0")
    if settings.max_headers < 1:
        raise ConfigError("max_headers: must be at least 1")
    if settings.max_header_bytes < 1024:
        raise ConfigError("max_header_bytes: must be at least 1024")
    if settings.max_connections_per_client < 0:
        raise ConfigError("max_connections_per_client: must not be negative")
    if (settings.tls_keyfile or settings.tls_keyfile_password) and not settings.tls_certfile:
        raise ConfigError("tls_keyfile: set tls_certfile too (the key's certificate)")
    origins = settings.cors_origin_list()
    if "*" in origins and len(origins) > 1:
        raise ConfigError("cors_origins: `*` allows every origin; list no others beside it")
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(f"cors_origins: {origin!r} is not an origin: expected "
                              "scheme://host[:port], without a path or a trailing slash")
    if not 0 <= settings.default_max_logprobs <= 20:
        raise ConfigError("default_max_logprobs: must be between 0 and 20")
    return settings


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from the file, the environment and explicit ``overrides``."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = env.get("PARAGATE_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read PARAGATE_CONFIG={path}: {exc}") from None
        for key, raw in data.items():
            if key not in _TYPES:
                raise ConfigError(f"unknown setting {key!r} in {path}")
            values[key] = _coerce(key, raw)
    known = {s.env: s.name for s in SETTINGS}
    for var, raw in env.items():
        if not var.startswith("PARAGATE_") or var in NON_SETTING_VARIABLES:
            continue
        if var not in known:
            raise ConfigError(f"unknown environment variable {var}")
        values[known[var]] = _coerce(known[var], raw)
    for key, raw in overrides.items():
        if raw is not None:
            values[key] = _coerce(key, raw)
    return _check(Settings(**values))
