"""The ``paragate`` command: serve the gateway, manage keys and models.

Every command reads the same settings as the server (``PARAGATE_*`` variables, or the
file named by ``PARAGATE_CONFIG``); ``PARAGATE_DATABASE_URL`` picks the store. A mistake
is reported as one line on stderr with a non-zero exit, never as a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from . import __version__
from .auth import new_key
from .config import SETTINGS, ConfigError, Settings, load
from .store import ModelRecord, Store, StoreError

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str) -> NoReturn:
    raise click.ClickException(message)


def _settings(**overrides: Any) -> Settings:
    try:
        return load(**overrides)
    except ConfigError as exc:
        _fail(str(exc))


def _store() -> Store:
    store = Store(_settings().database_url)
    store.migrate()
    return store


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

    Settings come from PARAGATE_* environment variables (see `paragate settings`);
    PARAGATE_DATABASE_URL selects the store (default: SQLite file ./paragate.db).
    """


@cli.command()
@click.option("--host", help="Address to listen on [default: PARAGATE_HOST or 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [default: PARAGATE_PORT or 8080].")
@click.option("--workers", type=int, help="Worker processes [default: PARAGATE_WORKERS or 1].")
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the gateway.

    \b
    Example:
      PARAGATE_DATABASE_URL=postgresql+psycopg://paragate@db/paragate paragate serve --port 8080
    """
    import uvicorn

    settings = _settings(host=host, port=port, workers=workers)
    Store(settings.database_url).migrate()  # once, before the workers start
    uvicorn.run(
        "paragate.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=settings.log_level,
        access_log=settings.access_log,
        server_header=False,
        proxy_headers=False,  # paragate does not use the client address
        date_header=False,
    )


@cli.command("settings")
def show_settings() -> None:
    """List every setting: its variable, its value now and what it does."""
    current = _settings()
    for s in SETTINGS:
        value = getattr(current, s.name)
        if s.name == "database_url":  # shown on screens and in logs: never its password
            value = make_url(value).render_as_string(hide_password=True)
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


# -- keys ----------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--admin", is_flag=True, help="An administrator's key.")
@click.option("--models", "models_", help="Comma-separated models the key may use "
              "[default: every model].")
@click.option("--rate-limit-rpm", type=click.IntRange(min=1),
              help="Requests per minute the key may send, counted per gateway process "
              "[default: no limit].")
@click.option("--expires-in-days", type=click.FloatRange(min=0, min_open=True),
              help="Expire the key after this many days [default: never].")
def keys_create(name: str, admin: bool, models_: str | None, rate_limit_rpm: int | None,
                expires_in_days: float | None) -> None:
    """Create a key. Its secret is printed once, alone on the last line of stdout.

    \b
    Example:
      KEY=$(paragate keys create --name ci-bot | tail -n 1)
    """
    allowed = [m.strip() for m in models_.split(",") if m.strip()] if models_ else None
    expires = (datetime.now(UTC) + timedelta(days=expires_in_days)) if expires_in_days else None
    token, public_id, secret_hash = new_key()
    _store().add_key(public_id=public_id, secret_hash=secret_hash, name=name, is_admin=admin,
                     allowed_models=allowed, rate_limit_rpm=rate_limit_rpm,
                     expires_at=expires)
    kind = "admin key" if admin else "key"
    click.echo(f"created {kind} {public_id} ({name}); store the secret now, it is not kept:")
    click.echo(token)


@keys.command("list")
def keys_list() -> None:
    """List keys (never their secrets)."""
    rows = []
    for k in _store().list_keys():
        state = "revoked" if k.revoked_at else (
            "expired" if k.expires_at and k.expires_at <= datetime.now(UTC) else "active")
        rows.append([k.public_id, k.name, "yes" if k.is_admin else "no", state,
                     ",".join(k.allowed_models) if k.allowed_models is not None else "*",
                     str(k.rate_limit_rpm or "-"),
                     k.created_at.strftime("%Y-%m-%d %H:%M"),
                     k.expires_at.strftime("%Y-%m-%d %H:%M") if k.expires_at else "-"])
    _table(rows, ["ID", "NAME", "ADMIN", "STATE", "MODELS", "RPM", "CREATED", "EXPIRES"])


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke the key with this id (the 12 characters after `pg-`)."""
    record = _store().revoke_key(key_id)
    click.echo(f"revoked {record.public_id} ({record.name})")


# -- models --------------------------------------------------------------------------


def _model_options(f: F) -> F:
    options = [
        click.option("--upstream-model", help="Model name vLLM serves "
                     "[default on add: the model's name]."),
        click.option("--display-name", help="Name shown to people [default on add: NAME]."),
        click.option("--upstream-api-key", envvar="PARAGATE_UPSTREAM_API_KEY",
                     help="Key vLLM expects (--api-key); never shown by any command or API. "
                     "Also read from PARAGATE_UPSTREAM_API_KEY."),
        click.option("--max-logprobs", type=click.IntRange(0, 20),
                     help="Largest `logprobs` allowed [default: PARAGATE_DEFAULT_MAX_LOGPROBS]."),
        click.option("--default-max-tokens", type=click.IntRange(min=1),
                     help="`max_tokens` used when a request gives none."),
        click.option("--max-tokens-limit", type=click.IntRange(min=1),
                     help="Largest `max_tokens` a request may ask for."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# `models update --unset X`: the optional fields, by their option names
_UNSETTABLE = {"upstream-api-key": "upstream_api_key", "max-logprobs": "max_logprobs",
               "default-max-tokens": "default_max_tokens",
               "max-tokens-limit": "max_tokens_limit"}


@cli.group()
def models() -> None:
    """Add, list, update and remove the models the gateway serves."""


@models.command("add")
@click.argument("name")
@click.option("--upstream", required=True, help="vLLM base URL, e.g. http://host:8000/v1.")
@_model_options
@click.option("--disabled", is_flag=True, help="Add it disabled.")
def models_add(name: str, upstream: str, upstream_model: str | None,
               display_name: str | None, upstream_api_key: str | None,
               max_logprobs: int | None, default_max_tokens: int | None,
               max_tokens_limit: int | None, disabled: bool) -> None:
    """Register a model served by vLLM at --upstream.

    \b
    Example:
      paragate models add alfred-4.2 --upstream http://gpu-1:8000/v1 \\
          --upstream-model /models/alfred-4.2-awq --max-tokens-limit 4096
    """
    _check_url(upstream)
    _check_api_key(upstream_api_key)
    record = _store().add_model(ModelRecord(
        name=name, upstream_url=upstream, upstream_model=upstream_model or name,
        display_name=display_name or name, upstream_api_key=upstream_api_key,
        enabled=not disabled, max_logprobs=max_logprobs,
        default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit))
    click.echo(f"added {record.name} -> {record.upstream_url} ({record.upstream_model})")


@models.command("update")
@click.argument("name")
@click.option("--upstream", help="New vLLM base URL.")
@click.option("--rename", help="New technical name.")
@_model_options
@click.option("--enable/--disable", default=None, help="Enable or disable the model.")
@click.option("--unset", "unset", multiple=True, type=click.Choice(sorted(_UNSETTABLE)),
              help="Remove a limit or the upstream key (back to the default); repeatable.")
def models_update(name: str, upstream: str | None, rename: str | None,
                  unset: tuple[str, ...], **options: Any) -> None:
    """Change a model; only the options given change."""
    changes = {k: v for k, v in options.items() if v is not None}
    for option in unset:
        field = _UNSETTABLE[option]
        if field in changes:
            _fail(f"--unset {option} and --{option} contradict each other")
        changes[field] = None
    _check_api_key(changes.get("upstream_api_key"))
    if "enable" in changes:
        changes["enabled"] = changes.pop("enable")
    if upstream is not None:
        _check_url(upstream)
        changes["upstream_url"] = upstream
    if rename is not None:
        changes["name"] = rename
    if not changes:
        _fail("nothing to change: give at least one option")
    record = _store().update_model(name, **changes)
    click.echo(f"updated {record.name}")


@models.command("remove")
@click.argument("name")
def models_remove(name: str) -> None:
    """Remove a model."""
    _store().remove_model(name)
    click.echo(f"removed {name}")


@models.command("list")
def models_list() -> None:
    """List models (never their upstream keys)."""
    rows = [[m.name, m.display_name or "-", m.upstream_url, m.upstream_model,
             "yes" if m.enabled else "no", "yes" if m.upstream_api_key else "no",
             _limits(m)] for m in _store().list_models()]
    _table(rows, ["NAME", "DISPLAY NAME", "UPSTREAM", "UPSTREAM MODEL", "ENABLED",
                  "UPSTREAM KEY", "LIMITS"])


def _limits(m: ModelRecord) -> str:
    parts = [f"{label}={value}" for label, value in (
        ("max-logprobs", m.max_logprobs), ("default-max-tokens", m.default_max_tokens),
        ("max-tokens-limit", m.max_tokens_limit)) if value is not None]
    return " ".join(parts) or "-"


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(
        c.isspace() for c in url
    ):
        _fail(f"--upstream must be an http:// or https:// URL with a host, got {url!r}")


def _check_api_key(key: str | None) -> None:
    # it goes into an HTTP header: a control character or space would break (or forge) it
    if key is not None and (not key or not all(33 <= ord(c) < 127 for c in key)):
        _fail("--upstream-api-key must be printable ASCII without spaces")


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
    except StoreError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)
        first = str(orig or exc).splitlines()[0]
        click.echo(f"Error: the store failed: {first}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
