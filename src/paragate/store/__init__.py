"""The store: keys, models and usage records in SQLite (embedded default) or PostgreSQL.

Synchronous SQLAlchemy Core on purpose: the CLI uses it directly, and the gateway calls
it only off the request path (a background refresh and a batch writer, in threads), so
an async driver would buy nothing. Writes to keys and models bump ``config_state.version``
in the same transaction; that single integer is what running gateways poll.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Dialect,
    Engine,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from .records import KeyRecord, ModelRecord, Snapshot, UsageRecord
from .schema import api_keys, config_state, models, usage_records

__all__ = [
    "KeyRecord",
    "ModelRecord",
    "Snapshot",
    "Store",
    "StoreError",
    "UsageRecord",
]

_MIGRATIONS = Path(__file__).with_name("migrations")
_USAGE_FIELDS = [f.name for f in dataclasses.fields(UsageRecord)]
# (SQL, parameter names in order, (index, bind processor) pairs, positional paramstyle?)
_CompiledInsert = tuple[str, list[str], list[tuple[int, Callable[[Any], Any]]], bool]


def _compile_usage_insert(dialect: Dialect) -> _CompiledInsert:
    compiled = insert(usage_records).compile(dialect=dialect, column_keys=_USAGE_FIELDS)
    names = list(compiled.positiontup or _USAGE_FIELDS)
    processors: list[tuple[int, Callable[[Any], Any]]] = []
    for i, name in enumerate(names):
        process = usage_records.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((i, process))
    return str(compiled), names, processors, bool(compiled.positional)
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelRecord)} - {"created_at", "updated_at"}


class StoreError(Exception):
    """A write the store refused: a duplicate name, or a row that does not exist."""


def _now() -> datetime:
    return datetime.now(UTC)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the gateway read while the CLI writes; the busy timeout makes concurrent
    # writers (the usage writer, a CLI) wait instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    """All reads and writes of paragate's tables."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # the driver we ship
        self.url = parsed
        self.engine: Engine = create_engine(parsed, pool_pre_ping=True)
        self._usage_insert: _CompiledInsert | None = None
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # -- keys and models ------------------------------------------------------------------

    def _bump(self, conn: Connection) -> None:
        conn.execute(update(config_state).values(version=config_state.c.version + 1))

    def version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(config_state.c.version)).scalar_one())

    def add_key(
        self,
        *,
        public_id: str,
        secret_hash: str,
        name: str,
        is_admin: bool = False,
        allowed_models: Sequence[str] | None = None,
        rate_limit_rpm: int | None = None,
        expires_at: datetime | None = None,
    ) -> KeyRecord:
        with self.engine.begin() as conn:
            conn.execute(
                insert(api_keys).values(
                    public_id=public_id,
                    secret_hash=secret_hash,
                    name=name,
                    is_admin=is_admin,
                    allowed_models=list(allowed_models) if allowed_models is not None else None,
                    rate_limit_rpm=rate_limit_rpm,
                    created_at=_now(),
                    expires_at=expires_at,
                )
            )
            self._bump(conn)
            row = conn.execute(select(api_keys).where(api_keys.c.public_id == public_id)).one()
        return _key(row._mapping)

    def list_keys(self) -> list[KeyRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.id)).all()
        return [_key(r._mapping) for r in rows]

    def revoke_key(self, public_id: str) -> KeyRecord:
        with self.engine.begin() as conn:
            done = conn.execute(
                update(api_keys)
                .where(api_keys.c.public_id == public_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
            row = conn.execute(
                select(api_keys).where(api_keys.c.public_id == public_id)
            ).one_or_none()
            if row is None:
                raise StoreError(f"no key with id {public_id!r}")
            if done.rowcount:
                self._bump(conn)
        return _key(row._mapping)

    def add_model(self, model: ModelRecord) -> ModelRecord:
        now = _now()
        values = {f: getattr(model, f) for f in _MODEL_FIELDS}
        values["display_name"] = model.display_name or model.name
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(models).values(**values, created_at=now, updated_at=now))
                self._bump(conn)
        except IntegrityError:
            raise StoreError(f"a model named {model.name!r} exists already") from None
        return self.get_model(model.name)

    def update_model(self, name: str, /, **changes: Any) -> ModelRecord:
        unknown = set(changes) - _MODEL_FIELDS
        if unknown:
            raise StoreError(f"unknown model fields: {', '.join(sorted(unknown))}")
        try:
            with self.engine.begin() as conn:
                done = conn.execute(
                    update(models)
                    .where(models.c.name == name)
                    .values(**changes, updated_at=_now())
                )
                if not done.rowcount:
                    raise StoreError(f"no model named {name!r}")
                self._bump(conn)
        except IntegrityError:
            raise StoreError(f"a model named {changes.get('name')!r} exists already") from None
        return self.get_model(changes.get("name", name))

    def remove_model(self, name: str) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(delete(models).where(models.c.name == name))
            if not done.rowcount:
                raise StoreError(f"no model named {name!r}")
            self._bump(conn)

    def get_model(self, name: str) -> ModelRecord:
        with self.engine.connect() as conn:
            row = conn.execute(select(models).where(models.c.name == name)).one_or_none()
        if row is None:
            raise StoreError(f"no model named {name!r}")
        return _model(row._mapping)

    def list_models(self) -> list[ModelRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(models).order_by(models.c.name)).all()
        return [_model(r._mapping) for r in rows]

    def snapshot(self) -> Snapshot:
        """Keys, models and the version they belong to, read consistently."""
        with self.engine.begin() as conn:
            version = int(conn.execute(select(config_state.c.version)).scalar_one())
            keys = tuple(_key(r._mapping) for r in conn.execute(select(api_keys)))
            mods = tuple(_model(r._mapping) for r in conn.execute(select(models)))
        return Snapshot(version=version, keys=keys, models=mods)

    # -- usage ----------------------------------------------------------------------------

    def insert_usage(self, records: Sequence[UsageRecord]) -> int:
        """Write a batch of usage records in one transaction; returns how many.

        This runs beside the request path for every request, so it goes straight to the
        driver's executemany with a statement compiled once (about half the CPU of
        SQLAlchemy's per-row handling); each value still passes through its column
        type's bind processor, so what is stored is what ``insert()`` would store."""
        if not records:
            return 0
        if self._usage_insert is None:
            self._usage_insert = _compile_usage_insert(self.engine.dialect)
        sql, names, processors, positional = self._usage_insert
        rows: list[Any] = []
        for r in records:
            values = [getattr(r, n) for n in names]
            for i, process in processors:
                values[i] = process(values[i])
            rows.append(tuple(values) if positional else dict(zip(names, values, strict=True)))
        with self.engine.begin() as conn:
            conn.exec_driver_sql(sql, rows)
        return len(rows)

    def list_usage(self) -> list[UsageRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(usage_records).order_by(usage_records.c.id)).all()
        return [
            UsageRecord(**{k: v for k, v in r._mapping.items() if k != "id"}) for r in rows
        ]


def _key(row: Any) -> KeyRecord:
    allowed = row["allowed_models"]
    return KeyRecord(
        id=row["id"],
        public_id=row["public_id"],
        secret_hash=row["secret_hash"],
        name=row["name"],
        is_admin=bool(row["is_admin"]),
        allowed_models=tuple(allowed) if allowed is not None else None,
        rate_limit_rpm=row["rate_limit_rpm"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


def _model(row: Any) -> ModelRecord:
    return ModelRecord(**{k: v for k, v in row.items() if k != "id"})
