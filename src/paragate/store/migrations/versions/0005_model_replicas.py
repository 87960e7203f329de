"""Replicas: the vLLM servers behind each model; each model's own timeouts and affinity.

Every live model gets one replica made of its own upstream URL and upstream API key, so
that a model configured before replicas existed goes on working unchanged. Models gain
four optional timeouts (connect, first byte, idle between chunks, total), unset, and an
affinity (how a request picks its replica), `none`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from paragate.store.schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


_TIMEOUTS = ("connect_timeout", "first_byte_timeout", "idle_timeout", "total_timeout")


def upgrade() -> None:
    for name in _TIMEOUTS:
        op.add_column("models", sa.Column(name, sa.Float, nullable=True))
    op.add_column("models", sa.Column("affinity", sa.String(16), nullable=False,
                                      server_default="none"))
    replicas = op.create_table(
        "model_replicas",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("upstream_api_key", sa.Text, nullable=True),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("draining", sa.Boolean, nullable=False),
        sa.Column("health_url", sa.Text, nullable=True),
        sa.Column("discover", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("deleted_at", UTCDateTime, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_model_replicas_model_id", "model_replicas", ["model_id"])
    op.create_index("ix_model_replicas_version", "model_replicas", ["version"])
    bind = op.get_bind()
    models = sa.table("models", sa.column("id", sa.Integer), sa.column("upstream_url"),
                      sa.column("upstream_api_key"), sa.column("version", sa.BigInteger),
                      sa.column("deleted_at"))
    now = datetime.now(UTC)
    rows = [{"model_id": m.id, "url": m.upstream_url, "weight": 1,
             "upstream_api_key": m.upstream_api_key, "enabled": True, "draining": False,
             "health_url": None, "discover": False, "version": m.version, "created_at": now,
             "updated_at": now, "deleted_at": None}
            for m in bind.execute(sa.select(models).where(models.c.deleted_at.is_(None))
                                  .order_by(models.c.id))]
    if rows:
        op.bulk_insert(replicas, rows)


def downgrade() -> None:
    op.drop_table("model_replicas")
    with op.batch_alter_table("models") as batch:
        for name in (*_TIMEOUTS, "affinity"):
            batch.drop_column(name)
