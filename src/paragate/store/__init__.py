"""The store: the control plane's tables and the usage records, in SQLite (embedded
default) or PostgreSQL.

Synchronous SQLAlchemy Core on purpose: the CLI uses it directly, and the gateway calls
it only off the request path (the refresher, the usage writer and the admin API, each in
a thread of its own), so an async driver would buy nothing.

Every change to the control plane runs in ``Store.change()``: one transaction that first
bumps ``config_state.version`` (which also serialises writers: the row lock on
PostgreSQL, the write lock on SQLite, taken before anything is read), stamps every row it
writes with that version, writes its audit rows and, on PostgreSQL, sends
``NOTIFY paragate_config`` on commit. A gateway applies a change by reading the rows
stamped above the version it holds (``Store.changes``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    RowMapping,
    String,
    Table,
    cast,
    create_engine,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url

from ..config import Settings
from ..secrets import Secrets, SecretsError, is_encrypted
from . import usage
from .records import (
    AuditRecord,
    Changes,
    CompanyRecord,
    KeyRecord,
    ModelRecord,
    ReplicaRecord,
    UsageRecord,
    UserRecord,
)
from .schema import (
    api_keys,
    audit_log,
    companies,
    config_state,
    limit_counters,
    model_replicas,
    models,
    usage_records,
    users,
)

__all__ = [
    "NOTIFY_CHANNEL",
    "AuditRecord",
    "Change",
    "Changes",
    "CompanyRecord",
    "KeyRecord",
    "ModelRecord",
    "ReplicaRecord",
    "Store",
    "UsageRecord",
    "UserRecord",
    "audit_of",
    "company_of",
    "key_of",
    "model_of",
    "now",
    "replica_of",
    "upstream_keys",
    "user_of",
]

NOTIFY_CHANNEL = "paragate_config"
_MIGRATIONS = Path(__file__).with_name("migrations")
# Any 64-bit number, the same in every paragate: serialises concurrent migrations.
_MIGRATION_LOCK = 0x70617261676174  # "paragat"
log = logging.getLogger("paragate.store")


def now() -> datetime:
    return datetime.now(UTC)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the gateway read while the CLI writes; the busy timeout makes concurrent
    # writers (the usage writer, a CLI) wait instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Change:
    """One control-plane transaction: its version, and its audit rows."""

    def __init__(self, conn: Connection, version: int, actor: Mapping[str, Any]) -> None:
        self.conn = conn
        self.version = version
        self._actor = actor
        self.at = now()

    def audit(self, action: str, target_type: str, target_id: object,
              company_id: int | None, changes: Mapping[str, Sequence[object]]) -> None:
        self.conn.execute(insert(audit_log).values(
            created_at=self.at, action=action, target_type=target_type,
            target_id=str(target_id), company_id=company_id,
            changes={k: list(v) for k, v in changes.items()}, **self._actor))


class Store:
    """The engine, the migrations, and the few reads and writes that are not one
    aggregate's (the version, the changes, usage)."""

    def __init__(self, url: str, secrets: Secrets | None = None) -> None:
        """``secrets``: the keys of the upstream API keys (``secrets.py``); by default
        those of a store with no key configured (a key file beside a SQLite database)."""
        # what encrypts the upstream API keys written, and decrypts those loaded
        self.secrets = secrets if secrets is not None else Secrets.for_database(url)
        parsed = make_url(url)
        if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # the driver we ship
        self.url = parsed
        self.is_postgres = parsed.get_backend_name() == "postgresql"
        self.engine: Engine = create_engine(parsed, pool_pre_ping=True)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """The store of ``settings``, with its secret keys (ConfigError when bad)."""
        return cls(settings.database_url, secrets=Secrets.from_settings(settings))

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent). On PostgreSQL an
        advisory lock makes gateways that start at once migrate one after the other."""
        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        with self.engine.begin() as conn:
            if self.is_postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            self._encrypt_plaintext(conn)

    def _encrypt_plaintext(self, conn: Connection) -> None:
        """Encrypt the upstream API keys stored in plaintext (before encryption existed),
        at every start: also those left when no key was configured yet. Not a config
        change (no version): what the gateways hold stays true."""
        found = [(table, row_id, value) for table, row_id, _, value in upstream_keys(conn)
                 if not is_encrypted(value)]
        if not found:
            return
        if not self.secrets.can_encrypt:
            log.warning("%d upstream API key(s) are stored unencrypted: set "
                        "PARAGATE_SECRET_KEY or secret_key_file, and they are encrypted at "
                        "the next start", len(found))
            return
        for table, row_id, value in found:
            # only if unchanged since read: a gateway running beside may have set another
            conn.execute(update(table).where(
                table.c.id == row_id, table.c.upstream_api_key == value).values(
                upstream_api_key=self.secrets.encrypt(value)))
        log.info("encrypted %d upstream API key(s) that were stored in plaintext",
                 len(found))

    # -- the control plane ----------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def change(self, actor: Mapping[str, Any]) -> Iterator[Change]:
        """A transaction that changes the control plane (see the module's docstring).
        ``actor`` holds the audit columns: actor_type, actor_user_id, actor_key,
        request_id, client_addr."""
        with self.engine.begin() as conn:
            conn.execute(update(config_state).values(version=config_state.c.version + 1))
            version = int(conn.execute(select(config_state.c.version)).scalar_one())
            yield Change(conn, version, actor)
            if self.is_postgres:  # delivered when the transaction commits, not before
                conn.execute(text("SELECT pg_notify(:c, :v)"),
                             {"c": NOTIFY_CHANNEL, "v": str(version)})

    def version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(config_state.c.version)).scalar_one())

    def changes(self, since: int) -> Changes:
        """Every config row stamped above ``since`` (all of them for ``since=0``), the
        replicas' upstream API keys decrypted: the gateway's one decryption, here in the
        refresher's thread, never per request. A key that cannot be decrypted stays as
        stored (the balancer keeps that replica out of service) and the replica is named
        in ``Changes.undecryptable``.

        The version is read first: a writer bumps it and stamps its rows in one
        transaction, so every row up to that version is visible to the reads after it."""
        with self.engine.connect() as conn:
            version = int(conn.execute(select(config_state.c.version)).scalar_one())

            def rows(table: Any, convert: Callable[[RowMapping], Any]) -> tuple[Any, ...]:
                # ordered by version first: ordered by id, SQLite would walk the whole
                # table in id order rather than search the version index (20 ms per
                # change at 200,000 keys instead of 0.2)
                query = select(table).where(table.c.version > since).order_by(
                    table.c.version, table.c.id)
                return tuple(convert(r) for r in conn.execute(query).mappings())

            replicas, undecryptable = self._decrypted(conn, rows(model_replicas, replica_of))
            return Changes(
                since=since,
                version=version,
                companies=rows(companies, company_of),
                users=rows(users, user_of),
                keys=rows(api_keys, key_of),
                models=rows(models, model_of),
                replicas=replicas,
                undecryptable=undecryptable,
            )

    def _decrypted(self, conn: Connection, replicas: tuple[ReplicaRecord, ...]
                   ) -> tuple[tuple[ReplicaRecord, ...], tuple[str, ...]]:
        out, failed = [], []
        for r in replicas:
            key = r.upstream_api_key
            if key is not None and is_encrypted(key):
                try:
                    r = replace(r, upstream_api_key=self.secrets.decrypt(key))
                except SecretsError as exc:
                    if r.deleted_at is None:
                        failed.append((r, str(exc)))
            out.append(r)
        if not failed:
            return tuple(out), ()
        names = {row[0]: row[1] for row in conn.execute(select(models.c.id, models.c.name)
                 .where(models.c.id.in_({r.model_id for r, _ in failed})))}
        return tuple(out), tuple(f"replica {r.id} of model '{names.get(r.model_id, '?')}' "
                                 f"({why})" for r, why in failed)

    def touch_keys(self, key_ids: Iterable[int], at: datetime) -> None:
        """Record when keys were last used. Not a config change: no version, no audit."""
        ids = sorted(key_ids)
        with self.engine.begin() as conn:
            for start in range(0, len(ids), 500):
                conn.execute(update(api_keys).where(api_keys.c.id.in_(ids[start:start + 500]))
                             .values(last_used_at=at))

    # -- usage ----------------------------------------------------------------------------

    def insert_usage(self, records: Sequence[UsageRecord]) -> int:
        """Write a batch of usage records and their rollups in one transaction, skipping
        the ones already there; returns how many were new (see ``store.usage``)."""
        if not records:
            return 0
        with self.engine.begin() as conn:
            return usage.write(conn, records)

    def usage_report(self, query: usage.ReportQuery) -> list[usage.ReportRow]:
        with self.engine.connect() as conn:
            return usage.report(conn, query)

    def prune_usage(self, before: datetime) -> int:
        """Delete raw usage records older than ``before``, in chunks; returns how many."""
        deleted = 0
        while True:
            with self.engine.begin() as conn:
                n = usage.prune(conn, before)
            deleted += n
            if n == 0:
                return deleted

    # -- the in-process limiter's budgets ---------------------------------------------------

    def has_rate_limits(self) -> bool:
        """Whether any live key, user, company or model has a rate limit set."""
        with self.engine.connect() as conn:
            for table in (api_keys, users, companies, models):
                # a JSON null or {} is no limit (an unset column may hold either)
                query = select(table.c.id).where(
                    table.c.rate_limits.is_not(None),
                    cast(table.c.rate_limits, String).not_in(("null", "{}")))
                if "deleted_at" in table.c:
                    query = query.where(table.c.deleted_at.is_(None))
                if table is api_keys:
                    query = query.where(api_keys.c.revoked_at.is_(None))
                if conn.execute(query.limit(1)).first() is not None:
                    return True
        return False

    def limit_counters(self, periods: Sequence[str]) -> list[tuple[str, int, str, int]]:
        """(scope, scope id, period, tokens) of every budget counter of ``periods``."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(limit_counters.c.scope, limit_counters.c.scope_id,
                                       limit_counters.c.period, limit_counters.c.tokens)
                                .where(limit_counters.c.period.in_(list(periods)))).all()
        return [(r[0], r[1], r[2], int(r[3])) for r in rows]

    def add_limit_counters(self, added: Mapping[tuple[str, int, str], int]) -> None:
        """Add tokens to budget counters (made when missing), in one transaction."""
        if not added:
            return
        with self.engine.begin() as conn:
            stmt = usage.upsert(conn, limit_counters)
            stmt = stmt.on_conflict_do_update(
                index_elements=["scope", "scope_id", "period"],
                set_={"tokens": limit_counters.c.tokens + stmt.excluded.tokens})
            conn.execute(stmt, [{"scope": scope, "scope_id": scope_id, "period": period,
                                 "tokens": tokens}
                                for (scope, scope_id, period), tokens in sorted(added.items())])

    def list_usage(self) -> list[UsageRecord]:
        """Every raw record, in the order written (for tests and tools)."""
        fields = UsageRecord.__struct_fields__
        with self.engine.connect() as conn:
            rows = conn.execute(select(*(usage_records.c[f] for f in fields))
                                .order_by(usage_records.c.id)).all()
        return [UsageRecord(*r) for r in rows]


# -- rows to records ----------------------------------------------------------------------


def company_of(row: RowMapping) -> CompanyRecord:
    return CompanyRecord(**row)


def user_of(row: RowMapping) -> UserRecord:
    return UserRecord(**row)


def key_of(row: RowMapping) -> KeyRecord:
    values = dict(row)
    ids = values["model_ids"]
    values["model_ids"] = tuple(ids) if ids is not None else None
    return KeyRecord(**values)


def model_of(row: RowMapping) -> ModelRecord:
    values = dict(row)
    ids = values["company_ids"]
    values["company_ids"] = tuple(ids) if ids is not None else None
    return ModelRecord(**values)


def upstream_keys(conn: Connection) -> list[tuple[Table, int, str, str]]:
    """Every stored upstream API key, deleted rows' too: (its table, its row's id, the
    row in words, the value as stored)."""
    found: list[tuple[Table, int, str, str]] = []
    for row in conn.execute(select(models.c.id, models.c.name, models.c.upstream_api_key)
                            .where(models.c.upstream_api_key.is_not(None))
                            .order_by(models.c.id)):
        found.append((models, row[0], f"model '{row[1]}'", row[2]))
    for row in conn.execute(select(model_replicas.c.id, models.c.name,
                                   model_replicas.c.upstream_api_key)
                            .join_from(model_replicas, models,
                                       model_replicas.c.model_id == models.c.id)
                            .where(model_replicas.c.upstream_api_key.is_not(None))
                            .order_by(model_replicas.c.id)):
        found.append((model_replicas, row[0], f"replica {row[0]} of model '{row[1]}'",
                      row[2]))
    return found


def replica_of(row: RowMapping) -> ReplicaRecord:
    return ReplicaRecord(**row)


def audit_of(row: RowMapping) -> AuditRecord:
    return AuditRecord(**row)
