"""The ``paragate`` command: serve the gateway; manage companies, users, keys and models;
read the audit log. Every change goes through ``control``, the layer the admin API uses
too: the same validation, the same audit rows (actor ``cli``).

Every command reads the same settings as the server (``PARAGATE_*`` variables, or the
file named by ``PARAGATE_CONFIG``); ``PARAGATE_DATABASE_URL`` picks the store. A mistake
is reported as one line on stderr with a non-zero exit, never as a traceback.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from . import __version__, control
from .access import ROLES, USER
from .config import SETTINGS, ConfigError, Settings, load
from .control import Actor, Page
from .control.common import MAX_PAGE
from .control.keys import Key
from .control.users import DEFAULT_USER, SYSTEM_ADMIN
from .errors import GatewayError
from .logs import logging_config
from .store import ModelRecord, Store
from .tracing import Tracing
from .upstream.urls import redacted

CLI = Actor.cli()

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str) -> NoReturn:
    raise click.ClickException(message)


def _settings(**overrides: Any) -> Settings:
    try:
        return load(**overrides)
    except ConfigError as exc:
        _fail(str(exc))


def _open_store(settings: Settings) -> Store:
    """The store, with the secret keys of its upstream API keys (a bad one: one line)."""
    try:
        return Store.from_settings(settings)
    except ConfigError as exc:
        _fail(str(exc))


def _store() -> Store:
    store = _open_store(_settings())
    click.get_current_context().call_on_close(store.close)  # its connections, when done
    store.migrate()
    return store


_LIMIT_OPTIONS = (
    ("rpm", "Requests per minute (a bucket of that many, refilled continuously)."),
    ("tpm", "Tokens (prompt + completion) per minute."),
    ("max-concurrent", "Requests in flight at once."),
    ("daily-tokens", "Tokens per UTC day."),
    ("monthly-tokens", "Tokens per UTC month."),
)


def _limit_options(update: bool) -> Callable[[F], F]:
    """--rpm, --tpm, --max-concurrent, --daily-tokens, --monthly-tokens (and, on an
    update, --remove-limit KIND); see docs/limits.md."""
    def decorate(f: F) -> F:
        options = [click.option(f"--{name}", type=click.IntRange(min=1), help=text)
                   for name, text in _LIMIT_OPTIONS]
        if update:
            options.append(click.option(
                "--remove-limit", "remove_limit", multiple=True,
                type=click.Choice([n for n, _ in _LIMIT_OPTIONS]),
                help="Remove this limit; repeatable."))
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def _rate_limits(options: dict[str, Any], update: bool) -> dict[str, Any] | None:
    """Take the limit options out of ``options``: the ``rate_limits`` they make (on an
    update: the kinds to change, None for those removed), or None when none given."""
    limits: dict[str, Any] = {}
    for name, _ in _LIMIT_OPTIONS:
        value = options.pop(name.replace("-", "_"))
        if value is not None:
            limits[name.replace("-", "_")] = value
    for name in options.pop("remove_limit", ()) if update else ():
        kind = name.replace("-", "_")
        if kind in limits:
            _fail(f"--remove-limit {name} and --{name} contradict each other")
        limits[kind] = None
    return limits or None


def _show_limits(limits: dict[str, int] | None) -> str:
    return " ".join(f"{k.replace('_', '-')}={v}" for k, v in (limits or {}).items()) or "-"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="paragate")
def cli() -> None:
    """paragate: an authenticated, metered gateway in front of vLLM.

    \b
    Quick start:
      paragate models add alfred-4.2 --upstream http://127.0.0.1:8000/v1
      paragate keys create --name me --admin
      paragate serve --port 8080

    \b
    A company, its admin and a user's key:
      C=$(paragate companies create ACME | tail -n 1)
      U=$(paragate users create --company $C --email ana@acme.example | tail -n 1)
      paragate keys create --name ana-laptop --user $U

    Settings come from PARAGATE_* environment variables (see `paragate settings`);
    PARAGATE_DATABASE_URL selects the store (default: SQLite file ./paragate.db).
    """


@cli.command()
@click.option("--host", help="Address to listen on [default: PARAGATE_HOST or 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [default: PARAGATE_PORT or 8080].")
@click.option("--workers", type=int, help="Worker processes [default: PARAGATE_WORKERS or 1].")
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the gateway: HTTPS when PARAGATE_TLS_CERTFILE is set, else plain HTTP (e.g.
    behind a proxy that terminates TLS). Slow and hostile clients meet the limits of
    PARAGATE_HEADER_TIMEOUT, PARAGATE_BODY_TIMEOUT, PARAGATE_MAX_HEADERS and their kin
    (see `paragate settings`).

    \b
    Example:
      PARAGATE_DATABASE_URL=postgresql+psycopg://paragate@db/paragate paragate serve --port 8080
      PARAGATE_TLS_CERTFILE=cert.pem PARAGATE_TLS_KEYFILE=key.pem paragate serve --port 8443
    """
    import uvicorn

    from .transport import GuardedProtocol

    settings = _settings(host=host, port=port, workers=workers)
    try:
        Tracing.check(settings)  # the OpenTelemetry extra, when traces are on
    except ConfigError as exc:
        _fail(str(exc))
    if settings.tls_certfile:
        _check_tls(settings)  # here, in one line, rather than a traceback per worker
    store = _open_store(settings)
    try:
        store.migrate()  # once, before the workers start
        if settings.workers > 1 and not settings.redis_url:
            _check_limits_per_process(store, settings)
    finally:
        store.close()
    directory = None
    if settings.workers > 1 and settings.metrics:
        # prometheus-client's multiprocess mode: each worker's values in files here,
        # added up at a scrape (metrics.py); a fresh directory for each run
        directory = tempfile.mkdtemp(prefix="paragate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        uvicorn.run(
            "paragate.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            loop="uvloop",
            http=GuardedProtocol,  # httptools, with the transport's limits (transport.py)
            ws="none",  # no WebSocket upgrade: paragate serves none
            lifespan="on",
            log_level=settings.log_level,
            log_config=logging_config(settings.log_level, settings.log_format),
            access_log=False,  # paragate writes its own line per request (logs.py)
            server_header=False,
            proxy_headers=False,  # paragate reads X-Forwarded-For itself, from trusted proxies
            date_header=False,
            ssl_certfile=settings.tls_certfile or None,
            ssl_keyfile=settings.tls_keyfile or None,
            ssl_keyfile_password=settings.tls_keyfile_password or None,
            # paragate's own sequence (shutdown.py) ends streams at shutdown_timeout; this
            # is uvicorn's backstop for whatever is still running a little after that
            timeout_graceful_shutdown=math.ceil(max(
                settings.shutdown_timeout - settings.shutdown_delay, 0)) + 2,
        )
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def _check_tls(settings: Settings) -> None:
    """The certificate and key load, together: a missing file, a key that is not the
    certificate's or a wrong password stops ``serve`` with one line."""
    import ssl

    for name in ("tls_certfile", "tls_keyfile"):
        path = getattr(settings, name)
        if path and not Path(path).is_file():
            _fail(f"PARAGATE_{name.upper()}={path}: no such file")
    files = settings.tls_certfile + (f" and {settings.tls_keyfile}" if settings.tls_keyfile
                                     else "")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # a password, even empty, so that OpenSSL never prompts on the terminal
        context.load_cert_chain(settings.tls_certfile, settings.tls_keyfile or None,
                                settings.tls_keyfile_password)
    except ssl.SSLError as exc:
        why = ("the key is not the certificate's" if exc.reason == "KEY_VALUES_MISMATCH"
               else "not a PEM certificate and key, or an encrypted key without its "
               "password (PARAGATE_TLS_KEYFILE_PASSWORD)")
        _fail(f"TLS: cannot load the certificate and key from {files}: {why}")
    except OSError as exc:
        _fail(f"TLS: cannot read {files}: {exc.strerror or exc}")


def _check_limits_per_process(store: Store, settings: Settings) -> None:
    """Several workers and no Redis: each would count the limits on its own."""
    limited = store.has_rate_limits()
    if limited and not settings.limits_per_process:
        _fail(f"rate limits are configured and --workers is {settings.workers} without "
              "Redis: each worker would count them on its own, letting through up to "
              f"{settings.workers} times as much. Set PARAGATE_REDIS_URL (limits shared by "
              "every worker and instance), or PARAGATE_LIMITS_PER_PROCESS=true to accept "
              "per-process counting.")
    click.echo(f"WARNING: {settings.workers} workers without PARAGATE_REDIS_URL: rate limits "
               "and budgets are counted by each worker on its own"
               + (" (PARAGATE_LIMITS_PER_PROCESS=true)." if limited else
                  "; limits set later will not hold until Redis is configured."),
               err=True)


@cli.command("settings")
def show_settings() -> None:
    """List every setting: its variable, its value now and what it does."""
    shown = _settings().shown()  # never a password or a token
    for s in SETTINGS:
        value = shown[s.name]
        click.echo(f"{s.env}={value}")
        click.echo(f"    {s.help} [default: {s.default}]")


@cli.group()
def db() -> None:
    """The store's schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the migrations (commands and `serve` also do this on their own)."""
    _store()
    click.echo("schema is up to date")


# -- companies and users ---------------------------------------------------------------


def _ids(value: str | None, option: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        _fail(f"{option} takes comma-separated ids, got {value!r}")


def _all_pages(fetch: Callable[..., Page[Any]], **kwargs: Any) -> list[Any]:
    out: list[Any] = []
    after = None
    while True:
        found = fetch(limit=MAX_PAGE, after=after, **kwargs)
        out += found.data
        if not found.has_more:
            return out
        after = _cursor(found.data[-1])


def _cursor(item: Any) -> Any:
    return item.record.public_id if isinstance(item, Key) else item.id


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


@cli.group()
def companies() -> None:
    """Create, list, rename and remove companies."""


@companies.command("create")
@click.argument("name")
@_limit_options(update=False)
@click.option("--allow-priority", is_flag=True,
              help="Its keys may set vLLM's scheduling `priority`.")
def companies_create(name: str, allow_priority: bool, **options: Any) -> None:
    """Create a company; its id is printed alone on the last line. Its limits apply to
    all its users' requests together.

    \b
    Example:
      COMPANY=$(paragate companies create "ACME Research" --daily-tokens 5000000 | tail -n 1)
    """
    made = control.companies.create(_store(), CLI, name,
                                    rate_limits=_rate_limits(options, update=False),
                                    allow_priority=allow_priority)
    click.echo(f"created company {made.id} ({made.name})")
    click.echo(made.id)


@companies.command("list")
def companies_list() -> None:
    """List the companies."""
    store = _store()
    rows = [[str(c.id), c.name, "yes" if c.builtin else "", _show_limits(c.rate_limits),
             "yes" if c.allow_priority else "no", _when(c.created_at)]
            for c in _all_pages(lambda **kw: control.companies.list_(store, CLI, **kw))]
    _table(rows, ["ID", "NAME", "BUILT-IN", "LIMITS", "PRIORITY", "CREATED"])


@companies.command("update")
@click.argument("company_id", type=int)
@click.option("--name", help="The new name.")
@_limit_options(update=True)
@click.option("--allow-priority/--no-allow-priority", default=None,
              help="May its keys set vLLM's scheduling `priority`.")
def companies_update(company_id: int, name: str | None, allow_priority: bool | None,
                     **options: Any) -> None:
    """Rename a company or change its limits; only the options given change."""
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    limits = _rate_limits(options, update=True)
    if limits is not None:
        changes["rate_limits"] = limits
    if allow_priority is not None:
        changes["allow_priority"] = allow_priority
    if not changes:
        _fail("nothing to change: give at least one option")
    done = control.companies.update(_store(), CLI, company_id, **changes)
    click.echo(f"updated company {done.id} ({done.name})")


@companies.command("remove")
@click.argument("company_id", type=int)
def companies_remove(company_id: int) -> None:
    """Delete a company: its users are deleted and their keys revoked (their usage and
    audit history stay)."""
    gone = control.companies.delete(_store(), CLI, company_id)
    click.echo(f"removed company {gone.id} ({gone.name})")


@cli.group()
def users() -> None:
    """Create, list, change and remove users."""


@users.command("create")
@click.option("--company", "company_id", type=int, required=True, help="The company's id.")
@click.option("--email", required=True, help="The user's email (unique).")
@click.option("--name", default="", help="The name shown to people.")
@click.option("--role", type=click.Choice(ROLES), default=USER, show_default=True,
              help="admin: everything; company_admin: their company; user: their keys.")
@click.option("--key-manager", is_flag=True, help="May create and rotate their own keys.")
@_limit_options(update=False)
def users_create(company_id: int, email: str, name: str, role: str,
                 key_manager: bool, **options: Any) -> None:
    """Create a user; its id is printed alone on the last line.

    \b
    Example:
      USER=$(paragate users create --company 2 --email ana@acme.example --key-manager | tail -n 1)
    """
    made = control.users.create(_store(), CLI, company_id=company_id, email=email,
                                name=name, role=role, key_manager=key_manager,
                                rate_limits=_rate_limits(options, update=False))
    click.echo(f"created user {made.id} ({made.email}, {made.role})")
    click.echo(made.id)


@users.command("list")
@click.option("--company", "company_id", type=int, help="Only this company's users.")
def users_list(company_id: int | None) -> None:
    """List users."""
    store = _store()
    found = _all_pages(lambda **kw: control.users.list_(store, CLI, **kw),
                       company_id=company_id)
    rows = [[str(u.id), str(u.company_id), u.email, u.name, u.role,
             "yes" if u.key_manager else "no", u.builtin or "", _show_limits(u.rate_limits)]
            for u in found]
    _table(rows, ["ID", "COMPANY", "EMAIL", "NAME", "ROLE", "KEY MANAGER", "BUILT-IN",
                  "LIMITS"])


@users.command("update")
@click.argument("user_id", type=int)
@click.option("--email", help="A new email.")
@click.option("--name", help="A new name.")
@click.option("--role", type=click.Choice(ROLES), help="A new role.")
@click.option("--key-manager/--no-key-manager", default=None,
              help="Grant or withdraw the key_manager permission.")
@_limit_options(update=True)
def users_update(user_id: int, **options: Any) -> None:
    """Change a user; only the options given change."""
    limits = _rate_limits(options, update=True)
    changes = {k: v for k, v in options.items() if v is not None}
    if limits is not None:
        changes["rate_limits"] = limits
    if not changes:
        _fail("nothing to change: give at least one option")
    done = control.users.update(_store(), CLI, user_id, **changes)
    click.echo(f"updated user {done.id} ({done.email}, {done.role})")


@users.command("remove")
@click.argument("user_id", type=int)
def users_remove(user_id: int) -> None:
    """Delete a user and revoke their keys (their usage and audit history stay)."""
    gone = control.users.delete(_store(), CLI, user_id)
    click.echo(f"removed user {gone.id} ({gone.email})")


# -- keys ----------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Create, list, rotate and revoke API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for (1-50 characters).")
@click.option("--user", "user_id", type=int, help="The user the key acts as [default: the "
              "built-in default user of the default company].")
@click.option("--admin", is_flag=True, help="A key of the built-in system admin.")
@click.option("--models", "models_", help="Comma-separated models the key may use "
              "[default: every model its company may use].")
@_limit_options(update=False)
@click.option("--rate-limit-rpm", type=click.IntRange(min=1),
              help="The older name of --rpm.")
@click.option("--expires-in-days", type=click.FloatRange(min=0, min_open=True),
              help="Expire the key after this many days [default: never].")
def keys_create(name: str, user_id: int | None, admin: bool, models_: str | None,
                rate_limit_rpm: int | None, expires_in_days: float | None,
                **options: Any) -> None:
    """Create a key. Its secret is printed once, alone on the last line of stdout.

    \b
    Example:
      KEY=$(paragate keys create --name ci-bot | tail -n 1)
    """
    if admin and user_id is not None:
        _fail("--admin and --user contradict each other: give one")
    allowed = [m.strip() for m in models_.split(",") if m.strip()] if models_ else None
    expires = (datetime.now(UTC) + timedelta(days=expires_in_days)) if expires_in_days else None
    builtin = None if user_id is not None else (SYSTEM_ADMIN if admin else DEFAULT_USER)
    settings = _settings()
    made = control.keys.create(
        _store(), CLI, name=name, user_id=user_id, builtin=builtin, models=allowed,
        expires_at=expires, rate_limits=_rate_limits(options, update=False),
        rate_limit_rpm=rate_limit_rpm, max_keys=settings.max_keys_per_user)
    kind = "admin key" if admin else "key"
    click.echo(f"created {kind} {made.record.public_id} ({name}) for user "
               f"{made.record.user_id}; store the secret now, it is not kept:")
    click.echo(made.secret)


@keys.command("list")
@click.option("--user", "user_id", type=int, help="Only this user's keys.")
@click.option("--company", "company_id", type=int, help="Only this company's keys.")
@click.option("--state", type=click.Choice(control.keys.STATES), help="Only keys in this state.")
def keys_list(user_id: int | None, company_id: int | None, state: str | None) -> None:
    """List keys (never their secrets)."""
    store = _store()
    found = _all_pages(lambda **kw: control.keys.list_(store, CLI, **kw), user_id=user_id,
                       company_id=company_id, state=state)
    rows = [[k.record.public_id, k.record.name, str(k.record.user_id), str(k.company_id),
             k.state, ",".join(k.models) if k.models is not None else "*",
             _show_limits(k.record.rate_limits), _when(k.record.created_at),
             _when(k.record.expires_at), _when(k.record.last_used_at)] for k in found]
    _table(rows, ["ID", "NAME", "USER", "COMPANY", "STATE", "MODELS", "LIMITS", "CREATED",
                  "EXPIRES", "LAST USED"])


@keys.command("update")
@click.argument("key_id")
@click.option("--name", help="A new name.")
@click.option("--models", "models_", help="Comma-separated models the key may use.")
@click.option("--all-models", is_flag=True, help="Every model its company may use.")
@click.option("--expires-in-days", type=click.FloatRange(min=0, min_open=True),
              help="Expire the key this many days from now.")
@click.option("--never-expires", is_flag=True, help="Remove the key's expiry.")
@click.option("--usage-opt-in/--no-usage-opt-in", default=None,
              help="Keep usage records of its requests (limits count them either way).")
@_limit_options(update=True)
def keys_update(key_id: str, name: str | None, models_: str | None, all_models: bool,
                expires_in_days: float | None, never_expires: bool,
                usage_opt_in: bool | None, **options: Any) -> None:
    """Change a key (the 12 characters after `pg-`); only the options given change."""
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if models_ is not None and all_models:
        _fail("--models and --all-models contradict each other")
    if models_ is not None:
        changes["models"] = [m.strip() for m in models_.split(",") if m.strip()]
    if all_models:
        changes["models"] = None
    if expires_in_days is not None and never_expires:
        _fail("--expires-in-days and --never-expires contradict each other")
    if expires_in_days is not None:
        changes["expires_at"] = datetime.now(UTC) + timedelta(days=expires_in_days)
    if never_expires:
        changes["expires_at"] = None
    if usage_opt_in is not None:
        changes["usage_opt_in"] = usage_opt_in
    limits = _rate_limits(options, update=True)
    if limits is not None:
        changes["rate_limits"] = limits
    if not changes:
        _fail("nothing to change: give at least one option")
    done = control.keys.update(_store(), CLI, key_id, max_keys=_settings().max_keys_per_user,
                               **changes)
    click.echo(f"updated {done.record.public_id} ({done.record.name}); limits: "
               f"{_show_limits(done.record.rate_limits)}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke the key with this id (the 12 characters after `pg-`)."""
    done = control.keys.revoke(_store(), CLI, key_id)
    click.echo(f"revoked {done.record.public_id} ({done.record.name})")


@keys.command("rotate")
@click.argument("key_id")
def keys_rotate(key_id: str) -> None:
    """Give a key a new secret (same id), printed alone on the last line; the old one
    keeps working for PARAGATE_KEY_ROTATION_GRACE seconds."""
    done = control.keys.rotate(_store(), CLI, key_id,
                               grace_seconds=_settings().key_rotation_grace)
    click.echo(f"rotated {done.record.public_id} ({done.record.name}); the old secret "
               f"works until {_when(done.record.previous_expires_at)}; the new one:")
    click.echo(done.secret)


# -- models --------------------------------------------------------------------------


_SECONDS = click.FloatRange(min=0, max=control.models.MAX_TIMEOUT, min_open=True)


def _model_options(f: F) -> F:
    options = [
        click.option("--upstream-model", help="Model name vLLM serves "
                     "[default on add: the model's name]."),
        click.option("--display-name", help="Name shown to people [default on add: NAME]."),
        click.option("--upstream-api-key", envvar="PARAGATE_UPSTREAM_API_KEY",
                     help="Key vLLM expects (--api-key); never shown by any command or API. "
                     "Also read from PARAGATE_UPSTREAM_API_KEY."),
        click.option("--type", "type_", type=click.Choice(control.models.TYPES),
                     help="What the model serves: llm (completions, chat, tokenize) or "
                          "embedding (embeddings, tokenize) [default on add: llm]."),
        click.option("--max-logprobs", type=click.IntRange(0, 20),
                     help="Largest `logprobs` allowed [default: PARAGATE_DEFAULT_MAX_LOGPROBS]."),
        click.option("--default-max-tokens", type=click.IntRange(min=1),
                     help="`max_tokens` used when a request gives none."),
        click.option("--max-tokens-limit", type=click.IntRange(min=1),
                     help="Largest `max_tokens` a request may ask for."),
        click.option("--max-prompts", type=click.IntRange(min=1),
                     help="Most prompts in one request's list [default: "
                     "PARAGATE_MAX_PROMPTS]."),
        click.option("--max-n", type=click.IntRange(1, 128),
                     help="Largest `n` and `best_of` [default: PARAGATE_MAX_N]."),
        click.option("--max-request-tokens", type=click.IntRange(min=1),
                     help="Most tokens one request may reserve [default: "
                     "PARAGATE_MAX_REQUEST_TOKENS]."),
        click.option("--connect-timeout", type=_SECONDS, help="Seconds to connect to a "
                     "replica [default: PARAGATE_UPSTREAM_CONNECT_TIMEOUT]."),
        click.option("--first-byte-timeout", type=_SECONDS, help="Seconds until vLLM's "
                     "answer starts (a non-streaming answer starts when it is complete) "
                     "[default: PARAGATE_UPSTREAM_READ_TIMEOUT]."),
        click.option("--idle-timeout", type=_SECONDS, help="Seconds between two chunks of "
                     "a stream [default: PARAGATE_UPSTREAM_READ_TIMEOUT]."),
        click.option("--total-timeout", type=_SECONDS, help="Seconds for a whole request, "
                     "every try included [default: none]."),
        click.option("--affinity", type=click.Choice(control.models.AFFINITIES),
                     help="How a request picks its replica: none (the least loaded), prefix "
                     "(prompts that start alike go to the same one, for vLLM's prefix "
                     "cache), user (the same `user` field, the same one) [default on add: "
                     "none]."),
        click.option("--log-payloads/--no-log-payloads", default=None,
                     help="Write the prompts and completions of its requests to the "
                     "gateway's log; gateways warn of it at start-up [default on add: "
                     "off]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# `models update --unset X`: the optional fields, by their option names
_UNSETTABLE = {"upstream-api-key": "upstream_api_key", "max-logprobs": "max_logprobs",
               "default-max-tokens": "default_max_tokens",
               "max-tokens-limit": "max_tokens_limit", "connect-timeout": "connect_timeout",
               "first-byte-timeout": "first_byte_timeout", "idle-timeout": "idle_timeout",
               "total-timeout": "total_timeout", "max-prompts": "max_prompts",
               "max-n": "max_n", "max-request-tokens": "max_request_tokens"}


@cli.group()
def models() -> None:
    """Add, list, update and remove the models the gateway serves."""


@models.command("add")
@click.argument("name")
@click.option("--upstream", required=True, help="vLLM base URL, e.g. http://host:8000/v1.")
@_model_options
@click.option("--companies", "companies_", help="Comma-separated ids of the companies it "
              "is enabled for [default: every company].")
@click.option("--disabled", is_flag=True, help="Add it disabled.")
@_limit_options(update=False)
def models_add(name: str, upstream: str, companies_: str | None, disabled: bool,
               type_: str | None, **options: Any) -> None:
    """Register a model served by vLLM at --upstream.

    \b
    Example:
      paragate models add alfred-4.2 --upstream http://gpu-1:8000/v1 \\
          --upstream-model /models/alfred-4.2-awq --max-tokens-limit 4096
    """
    limits = _rate_limits(options, update=False)
    fields = {k: v for k, v in options.items() if v is not None}
    if limits is not None:
        fields["rate_limits"] = limits
    record = control.models.create(
        _store(), CLI, name, upstream_url=upstream, enabled=not disabled,
        company_ids=_ids(companies_, "--companies"), type=type_ or "llm", **fields)
    click.echo(f"added {record.name} -> {record.upstream_url} ({record.upstream_model})")


@models.command("update")
@click.argument("name")
@click.option("--upstream", help="New vLLM base URL.")
@click.option("--rename", help="New technical name (keys and usage history follow).")
@_model_options
@click.option("--companies", "companies_", help="Enable it only for these companies "
              "(comma-separated ids).")
@click.option("--all-companies", is_flag=True, help="Enable it for every company.")
@click.option("--enable/--disable", default=None, help="Enable or disable the model.")
@click.option("--unset", "unset", multiple=True, type=click.Choice(sorted(_UNSETTABLE)),
              help="Remove a limit or the upstream key (back to the default); repeatable.")
@_limit_options(update=True)
def models_update(name: str, upstream: str | None, rename: str | None,
                  companies_: str | None, all_companies: bool, type_: str | None,
                  unset: tuple[str, ...], **options: Any) -> None:
    """Change a model; only the options given change."""
    limits = _rate_limits(options, update=True)
    changes = {k: v for k, v in options.items() if v is not None}
    if limits is not None:
        changes["rate_limits"] = limits
    for option in unset:
        field = _UNSETTABLE[option]
        if field in changes:
            _fail(f"--unset {option} and --{option} contradict each other")
        changes[field] = None
    if "enable" in changes:
        changes["enabled"] = changes.pop("enable")
    if companies_ is not None and all_companies:
        _fail("--companies and --all-companies contradict each other")
    if companies_ is not None:
        changes["company_ids"] = _ids(companies_, "--companies")
    if all_companies:
        changes["company_ids"] = None
    if type_ is not None:
        changes["type"] = type_
    if upstream is not None:
        changes["upstream_url"] = upstream
    if rename is not None:
        changes["name"] = rename
    if not changes:
        _fail("nothing to change: give at least one option")
    record = control.models.update(_store(), CLI, name, **changes)
    click.echo(f"updated {record.name}")


@models.command("remove")
@click.argument("name")
def models_remove(name: str) -> None:
    """Remove a model (its usage history keeps its name)."""
    control.models.delete(_store(), CLI, name)
    click.echo(f"removed {name}")


@models.command("list")
def models_list() -> None:
    """List models (never their upstream keys)."""
    rows = [[m.name, m.display_name or "-", m.type, redacted(m.upstream_url), m.upstream_model,
             "yes" if m.enabled else "no",
             ",".join(map(str, m.company_ids)) if m.company_ids is not None else "*",
             "yes" if m.upstream_api_key else "no",
             _limits(m)] for m in control.models.list_(_store(), CLI)]
    _table(rows, ["NAME", "DISPLAY NAME", "TYPE", "UPSTREAM", "UPSTREAM MODEL", "ENABLED",
                  "COMPANIES", "UPSTREAM KEY", "LIMITS"])


@models.group("replicas")
def replicas() -> None:
    """The vLLM servers behind a model: add, list, update (weight, draining) and remove.

    A model made with `models add --upstream URL` has that one replica; a running
    gateway follows a change within a second, without a restart."""


@replicas.command("add")
@click.argument("name")
@click.option("--upstream", required=True, help="vLLM base URL, e.g. http://gpu-2:8000/v1.")
@click.option("--weight", type=click.IntRange(1, control.replicas.MAX_WEIGHT), default=1,
              show_default=True, help="Its share of the traffic, relative to the others.")
@click.option("--upstream-api-key", help="The key this replica's vLLM expects "
              "(--api-key); default: none.")
@click.option("--health-url", help="Where its /health and /metrics are "
              "[default: the URL without a trailing /v1].")
@click.option("--draining", is_flag=True, help="Add it out of rotation.")
@click.option("--discover", is_flag=True, help="The URL's host is a DNS name whose "
              "addresses are the replicas (a Kubernetes headless Service); http:// only.")
def replicas_add(name: str, upstream: str, weight: int, upstream_api_key: str | None,
                 health_url: str | None, draining: bool, discover: bool) -> None:
    """Add a replica to the model NAME."""
    record = control.replicas.create(
        _store(), CLI, name, url=upstream, weight=weight, upstream_api_key=upstream_api_key,
        health_url=health_url, draining=draining, discover=discover)
    click.echo(f"added replica {record.id} of {name} -> {record.url} (weight {record.weight})")


@replicas.command("list")
@click.argument("name")
def replicas_list(name: str) -> None:
    """List the replicas of the model NAME (their configuration; a running gateway
    shows their health at GET /api/v2/models/NAME/replicas)."""
    _, found = control.replicas.list_(_store(), CLI, name)
    rows = [[str(r.id), redacted(r.url), str(r.weight), "yes" if r.enabled else "no",
             "yes" if r.draining else "no", "yes" if r.upstream_api_key else "no",
             redacted(r.health_url) if r.health_url else "-",
             "yes" if r.discover else "no"] for r in found]
    _table(rows, ["ID", "UPSTREAM", "WEIGHT", "ENABLED", "DRAINING", "UPSTREAM KEY",
                  "HEALTH URL", "DISCOVER"])


@replicas.command("update")
@click.argument("name")
@click.argument("replica_id", metavar="ID", type=int)
@click.option("--upstream", help="New vLLM base URL.")
@click.option("--weight", type=click.IntRange(1, control.replicas.MAX_WEIGHT))
@click.option("--upstream-api-key", help="New upstream key.")
@click.option("--health-url", help="New /health and /metrics base.")
@click.option("--drain/--undrain", default=None,
              help="Take it out of rotation (requests in flight finish), or back in.")
@click.option("--enable/--disable", default=None, help="Enable or disable it.")
@click.option("--discover/--no-discover", default=None,
              help="Whether its host names a fleet by DNS.")
def replicas_update(name: str, replica_id: int, upstream: str | None, weight: int | None,
                    upstream_api_key: str | None, health_url: str | None,
                    drain: bool | None, enable: bool | None, discover: bool | None) -> None:
    """Change a replica of the model NAME; only the options given change."""
    changes = {k: v for k, v in {
        "url": upstream, "weight": weight, "upstream_api_key": upstream_api_key,
        "health_url": health_url, "draining": drain, "enabled": enable,
        "discover": discover}.items() if v is not None}
    if not changes:
        _fail("nothing to change: give at least one option")
    record = control.replicas.update(_store(), CLI, name, replica_id, **changes)
    state = "draining" if record.draining else "in rotation"
    click.echo(f"updated replica {record.id} of {name} ({state})")


@replicas.command("remove")
@click.argument("name")
@click.argument("replica_id", metavar="ID", type=int)
def replicas_remove(name: str, replica_id: int) -> None:
    """Remove a replica of the model NAME (not its last one)."""
    control.replicas.delete(_store(), CLI, name, replica_id)
    click.echo(f"removed replica {replica_id} of {name}")


def _limits(m: ModelRecord) -> str:
    parts = [f"{label}={value}" for label, value in (
        ("max-logprobs", m.max_logprobs), ("default-max-tokens", m.default_max_tokens),
        ("max-tokens-limit", m.max_tokens_limit), ("connect-timeout", m.connect_timeout),
        ("first-byte-timeout", m.first_byte_timeout), ("idle-timeout", m.idle_timeout),
        ("total-timeout", m.total_timeout), ("max-prompts", m.max_prompts),
        ("max-n", m.max_n), ("max-request-tokens", m.max_request_tokens),
        *((k.replace("_", "-"), v) for k, v in (m.rate_limits or {}).items()))
        if value is not None]
    if m.log_payloads:  # not a limit, but the one switch an operator must not miss
        parts.append("log-payloads")
    return " ".join(parts) or "-"


# -- audit ---------------------------------------------------------------------------


def _since(value: str) -> datetime:
    """An ISO date or time (UTC unless it says), or a span back from now: 30m, 12h, 7d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isascii() and value[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--since takes an ISO date or time or a span like 30m, 12h, 7d; got {value!r}")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@cli.group()
def secrets() -> None:
    """The secret keys that encrypt upstream API keys at rest (PARAGATE_SECRET_KEY or
    PARAGATE_SECRET_KEY_FILE; with neither, a SQLite store's key file beside it).

    \b
    Rotating the key, with every gateway running:
      1. put a new key first, the old one after it, on every gateway and CLI:
         PARAGATE_SECRET_KEY=$(paragate secrets generate),$OLD_KEY (then restart them)
      2. paragate secrets rotate      (every stored key re-encrypted with the new one)
      3. remove the old key from PARAGATE_SECRET_KEY, and restart again
    """


@secrets.command("generate")
def secrets_generate() -> None:
    """Print a new secret key (a Fernet key); nothing is stored.

    \b
    Example:
      export PARAGATE_SECRET_KEY=$(paragate secrets generate)
    """
    from .secrets import generate_key

    click.echo(generate_key())


@secrets.command("rotate")
def secrets_rotate() -> None:
    """Re-encrypt every stored upstream API key with the first secret key, in one
    transaction (all or none), and print how many. Afterwards the other keys can be
    removed from the configuration.

    \b
    Example:
      PARAGATE_SECRET_KEY=$NEW_KEY,$OLD_KEY paragate secrets rotate
    """
    done = control.secrets.rotate(_store(), CLI)  # plaintext ones: encrypted by migrate
    click.echo(f"re-encrypted {done.keys} upstream API key(s) with the first secret key")


@cli.group()
def audit() -> None:
    """Read the audit log of every change made through the API or the CLI."""


@audit.command("list")
@click.option("--since", help="From this time: an ISO date or time, or 30m, 12h, 7d back.")
@click.option("--actor", help="A user id, a key's public id, or cli.")
@click.option("--action", help="An action (api_key.revoke) or a prefix (api_key.).")
@click.option("--target", help="A target id, or type:id (company:3).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line, as GET /api/v2/audit-log answers them.")
def audit_list(since: str | None, actor: str | None, action: str | None,
               target: str | None, as_json: bool) -> None:
    """List audit entries, oldest first."""
    import msgspec

    from . import views

    store = _store()
    found = _all_pages(lambda **kw: control.audit.list_(store, CLI, **kw),
                       since=_since(since) if since else None, actor_filter=actor,
                       action=action, target=target)
    if as_json:  # the API's AuditEntry, one per line
        for a in found:
            click.echo(msgspec.json.encode(views.audit(a)).decode())
        return
    rows = [[str(a.id), a.created_at.strftime("%Y-%m-%d %H:%M:%S"),
             a.actor_type if a.actor_type == "cli" else f"user {a.actor_user_id} "
             f"({a.actor_key})", a.action, f"{a.target_type}:{a.target_id}",
             ", ".join(f"{k}={v[1]!r}" for k, v in a.changes.items())[:80]] for a in found]
    _table(rows, ["ID", "TIME", "ACTOR", "ACTION", "TARGET", "CHANGES"])


@cli.group()
def usage() -> None:
    """Usage reports, and re-importing records the database refused."""


@usage.command("report")
@click.option("--by", "by", help="Group by any of company,user,key,model (comma-separated).")
@click.option("--bucket", type=click.Choice(["hour", "day", "month"]), default="day",
              show_default=True)
@click.option("--since", help="From this UTC date or date-time (default: 30 days back).")
@click.option("--until", help="Up to this UTC date or date-time, exclusive (default: the "
              "end of today).")
@click.option("--company", type=int, help="Only this company id.")
@click.option("--user", type=int, help="Only this user id.")
@click.option("--key", help="Only this key (its public id).")
@click.option("--model", help="Only this model name.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]),
              default="table", show_default=True)
def usage_report(by: str | None, bucket: str, since: str | None, until: str | None,
                 company: int | None, user: int | None, key: str | None,
                 model: str | None, fmt: str) -> None:
    """Requests, errors, tokens and latency per bucket (UTC), as
    GET /api/v2/reporting/usage answers them."""
    import msgspec

    q, key_id = control.usage.query(start_date=since, end_date=until, bucket=bucket,
                                    group_by=by, company_id=company, user_id=user,
                                    key_id=key, model=model)
    data = control.usage.report(_store(), CLI, q, key_id)
    if fmt == "json":
        click.echo(msgspec.json.encode(
            {"object": "list", "data": data, "has_more": False}).decode())
    elif fmt == "csv":
        click.echo(control.usage.to_csv(data, q.group_by), nl=False)
    elif data:
        click.echo(control.usage.to_table(data, q.group_by))
    else:
        click.echo("no usage in this range", err=True)


@usage.command("replay")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
def usage_replay(file: Path | None) -> None:
    """Re-import a dead-letter file (default: the journal directory's
    dead-letter.jsonl). Records already there are skipped; those that still fail stay."""
    from .usage import DeadLetters

    path = file or _settings().journal_path() / "dead-letter.jsonl"
    if not path.exists():
        raise click.ClickException(f"{path} does not exist")
    written, present, failing = DeadLetters(path).replay(_store())
    click.echo(f"{written} written, {present} already there, {failing} still failing "
               f"(kept in {path})")
    if failing:
        sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="paragate", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.UsageError as exc:  # click's own show() adds a usage block: 4 lines
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"Error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except GatewayError as exc:  # the control layer's refusals: one line, like the API's
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(1)
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)
        first = str(orig or exc).splitlines()[0]
        click.echo(f"Error: the store failed: {first}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
