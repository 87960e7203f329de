"""The control plane: companies, users, keys that belong to users, model access per
company, the audit log, and a version on every config row.

Existing keys are attached to the default company's default user (keys made with
`--admin` to the built-in system admin) and keep their secrets; a key's permitted model
names become model ids, so a renamed model keeps its keys (names that match no model are
dropped: such a key could use none of them). Usage records gain the ids of their user,
company and model.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from paragate.store.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_LIVE = sa.text("deleted_at IS NULL")
DEFAULT_USER_EMAIL = "default-user@paragate.invalid"
SYSTEM_ADMIN_EMAIL = "system-admin@paragate.invalid"


def _stamps() -> list[sa.Column[Any]]:
    return [
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("deleted_at", UTCDateTime, nullable=True),
    ]


def _resequence(table: str) -> None:
    """After rows with explicit ids, PostgreSQL's sequence must continue past them."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                             f"COALESCE(MAX(id), 0) + 1, false) FROM {table}"))


def upgrade() -> None:
    bind = op.get_bind()
    now = datetime.now(UTC)
    version = bind.execute(sa.text("SELECT version FROM config_state")).scalar_one()

    companies = op.create_table(
        "companies",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("builtin", sa.Boolean, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        *_stamps(),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_companies_version", "companies", ["version"])
    op.create_index("uq_companies_live_name", "companies", ["name"], unique=True,
                    sqlite_where=_LIVE, postgresql_where=_LIVE)
    users = op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("company_id", sa.Integer, sa.ForeignKey("companies.id"), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("key_manager", sa.Boolean, nullable=False),
        sa.Column("builtin", sa.String(20), nullable=True, unique=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        *_stamps(),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_users_company_id", "users", ["company_id"])
    op.create_index("ix_users_version", "users", ["version"])
    op.create_index("uq_users_live_email", "users", ["email"], unique=True,
                    sqlite_where=_LIVE, postgresql_where=_LIVE)
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("actor_type", sa.String(16), nullable=False),
        sa.Column("actor_user_id", sa.Integer, nullable=True),
        sa.Column("actor_key", sa.String(32), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(32), nullable=False),
        sa.Column("target_id", sa.String(200), nullable=False),
        sa.Column("company_id", sa.Integer, nullable=True),
        sa.Column("changes", sa.JSON, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("client_addr", sa.String(64), nullable=True),
        sqlite_autoincrement=True,
    )
    for column in ("created_at", "actor_user_id", "action", "company_id"):
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column])

    # -- the default company, and the built-in users the existing keys move to ----------
    stamps = {"version": version, "created_at": now, "updated_at": now}
    op.bulk_insert(companies, [{"id": 1, "name": "Default", "builtin": True, **stamps}])
    kinds = {bool(a) for (a,) in bind.execute(sa.text("SELECT is_admin FROM api_keys"))}
    builtin_users = []
    if False in kinds:
        builtin_users.append({"id": 1, "email": DEFAULT_USER_EMAIL, "name": "Default user",
                              "role": "user", "builtin": "default_user"})
    if True in kinds:
        builtin_users.append({"id": 2, "email": SYSTEM_ADMIN_EMAIL, "name": "System admin",
                              "role": "admin", "builtin": "system_admin"})
    op.bulk_insert(users, [{**u, "company_id": 1, "key_manager": True, **stamps}
                           for u in builtin_users])
    for table in ("companies", "users"):
        _resequence(table)

    # -- models: rebuilt, for a name unique among live models only ------------------------
    op.create_table(
        "models_v3",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("upstream_url", sa.Text, nullable=False),
        sa.Column("upstream_model", sa.String(200), nullable=False),
        sa.Column("upstream_api_key", sa.Text, nullable=True),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("company_ids", sa.JSON, nullable=True),
        sa.Column("max_logprobs", sa.Integer, nullable=True),
        sa.Column("default_max_tokens", sa.Integer, nullable=True),
        sa.Column("max_tokens_limit", sa.Integer, nullable=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        *_stamps(),
        sqlite_autoincrement=True,
    )
    columns = ("id, name, display_name, type, upstream_url, upstream_model, upstream_api_key, "
               "enabled, max_logprobs, default_max_tokens, max_tokens_limit, created_at, "
               "updated_at")
    bind.execute(sa.text(f"INSERT INTO models_v3 ({columns}, version) "
                         f"SELECT {columns}, :v FROM models"), {"v": version})
    model_ids = {name: id_ for id_, name in bind.execute(sa.text("SELECT id, name FROM models"))}
    op.drop_table("models")
    op.rename_table("models_v3", "models")
    if bind.dialect.name == "postgresql":
        bind.execute(sa.text("ALTER SEQUENCE models_v3_id_seq RENAME TO models_id_seq"))
    _resequence("models")
    op.create_index("ix_models_version", "models", ["version"])
    op.create_index("uq_models_live_name", "models", ["name"], unique=True,
                    sqlite_where=_LIVE, postgresql_where=_LIVE)

    # -- keys: each belongs to a user; permitted model names become ids -------------------
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("previous_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("previous_expires_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("user_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("model_ids", sa.JSON, nullable=True))
        batch.add_column(sa.Column("usage_opt_in", sa.Boolean, nullable=True))
        batch.add_column(sa.Column("version", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("last_used_at", UTCDateTime, nullable=True))
    keys = sa.table("api_keys", sa.column("id"), sa.column("is_admin"),
                    sa.column("allowed_models", sa.JSON), sa.column("user_id"),
                    sa.column("model_ids", sa.JSON), sa.column("usage_opt_in"),
                    sa.column("version"))
    for id_, is_admin, allowed in bind.execute(
            sa.select(keys.c.id, keys.c.is_admin, keys.c.allowed_models)).all():
        ids = None if allowed is None else sorted(
            {model_ids[n] for n in allowed if n in model_ids})
        bind.execute(sa.update(keys).where(keys.c.id == id_).values(
            user_id=2 if is_admin else 1, model_ids=ids, usage_opt_in=True, version=version))
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("user_id", existing_type=sa.Integer, nullable=False)
        batch.alter_column("usage_opt_in", existing_type=sa.Boolean, nullable=False)
        batch.alter_column("version", existing_type=sa.BigInteger, nullable=False)
        batch.create_foreign_key("fk_api_keys_user_id", "users", ["user_id"], ["id"])
        batch.drop_column("is_admin")
        batch.drop_column("allowed_models")
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    op.create_index("ix_api_keys_version", "api_keys", ["version"])

    # -- usage records: the ids of who and what --------------------------------------------
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("user_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("company_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("model_id", sa.Integer, nullable=True))
    bind.execute(sa.text(
        "UPDATE usage_records SET model_id = (SELECT id FROM models "
        "WHERE models.name = usage_records.model), user_id = (SELECT user_id FROM api_keys "
        "WHERE api_keys.id = usage_records.key_id), company_id = 1 "
        "WHERE key_id IS NOT NULL"))


def downgrade() -> None:  # pragma: no cover - the control plane has no way back
    raise NotImplementedError("0003 cannot be downgraded: companies and users would be lost")
