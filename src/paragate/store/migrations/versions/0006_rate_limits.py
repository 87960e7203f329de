"""Rate limits and token budgets on keys, users, companies and models; the committed
token counters of the in-process limiter; per-model caps on what one request may ask.

Each of the four tables gains `rate_limits`, a JSON object of the limits set on it
(`rpm`, `tpm`, `max_concurrent`, `daily_tokens`, `monthly_tokens`; null: none). A key's
`rate_limit_rpm` moves into its `rate_limits` as `rpm`, and the column goes. Companies
gain `allow_priority` (may their keys set vLLM's scheduling fields), false. Models gain
three caps, unset (the gateway's defaults apply): `max_prompts`, `max_n`,
`max_request_tokens`.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TABLES = ("companies", "users", "api_keys", "models")
_CAPS = ("max_prompts", "max_n", "max_request_tokens")


def upgrade() -> None:
    for table in _TABLES:
        op.add_column(table, sa.Column("rate_limits", sa.JSON, nullable=True))
    op.add_column("companies", sa.Column("allow_priority", sa.Boolean, nullable=False,
                                         server_default=sa.false()))
    for name in _CAPS:
        op.add_column("models", sa.Column(name, sa.Integer, nullable=True))
    bind = op.get_bind()
    keys = sa.table("api_keys", sa.column("id", sa.Integer),
                    sa.column("rate_limit_rpm", sa.Integer),
                    sa.column("rate_limits", sa.JSON))
    for key_id, rpm in bind.execute(sa.select(keys.c.id, keys.c.rate_limit_rpm).where(
            keys.c.rate_limit_rpm.is_not(None))).all():
        bind.execute(sa.update(keys).where(keys.c.id == key_id).values(
            rate_limits={"rpm": rpm}))
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("rate_limit_rpm")
    op.create_table(
        "limit_counters",
        sa.Column("scope", sa.String(1), nullable=False),
        sa.Column("scope_id", sa.Integer, nullable=False),
        sa.Column("period", sa.String(10), nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("scope", "scope_id", "period"),
    )


def downgrade() -> None:
    op.drop_table("limit_counters")
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("rate_limit_rpm", sa.Integer, nullable=True))
    bind = op.get_bind()
    keys = sa.table("api_keys", sa.column("id", sa.Integer),
                    sa.column("rate_limit_rpm", sa.Integer),
                    sa.column("rate_limits", sa.JSON))
    for key_id, limits in bind.execute(sa.select(keys.c.id, keys.c.rate_limits).where(
            keys.c.rate_limits.is_not(None))).all():
        if limits and limits.get("rpm"):
            bind.execute(sa.update(keys).where(keys.c.id == key_id).values(
                rate_limit_rpm=limits["rpm"]))
    with op.batch_alter_table("models") as batch:
        for name in _CAPS:
            batch.drop_column(name)
    with op.batch_alter_table("companies") as batch:
        batch.drop_column("allow_priority")
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("rate_limits")
