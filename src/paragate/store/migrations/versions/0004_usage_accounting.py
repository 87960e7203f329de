"""Usage accounting: the fields of a full usage record, and the rollups reports read.

Usage records gain the client's request id, the endpoint, the upstream, `n`, the error's
code, the partial flag, cached prompt tokens, time to first token and the gateway's own
time. Three rollup tables (hourly and daily per key and model, daily per company and
model) are created and filled from the records already there, so that reports over old
records agree with them exactly.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BUCKETS = 42  # schema.HISTOGRAM_BUCKETS when this migration was written


def _rollup(name: str, *dims: tuple[str, Any]) -> None:
    op.create_table(
        name,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("bucket", sa.BigInteger, nullable=False),
        *(sa.Column(d, kind, nullable=False) for d, kind in dims),
        *(sa.Column(c, sa.BigInteger, nullable=False) for c in (
            "requests", "errors", "partial", "prompt_tokens", "completion_tokens",
            "cached_tokens", "duration_ms")),
        *(sa.Column(f"lat{i}", sa.BigInteger, nullable=False, server_default="0")
          for i in range(_BUCKETS)),
        *(sa.Column(f"ttft{i}", sa.BigInteger, nullable=False, server_default="0")
          for i in range(_BUCKETS)),
        sqlite_autoincrement=True,
    )
    op.create_index(f"uq_{name}", name, ["bucket", *(d for d, _ in dims)], unique=True)


def upgrade() -> None:
    # Plain ADD COLUMNs (constant defaults where NOT NULL): no table copy on SQLite.
    for column in (
        sa.Column("client_request_id", sa.String(128), nullable=True),
        sa.Column("endpoint", sa.String(64), nullable=False,
                  server_default="/api/v2/completions"),
        sa.Column("upstream", sa.String(500), nullable=True),
        sa.Column("n", sa.Integer, nullable=False, server_default="1"),
        sa.Column("error_type", sa.String(64), nullable=True),
        sa.Column("partial", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("cached_tokens", sa.Integer, nullable=True),
        sa.Column("ttft_ms", sa.Integer, nullable=True),
        sa.Column("gateway_us", sa.BigInteger, nullable=True),
        sa.Column("lat_bucket", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("ttft_bucket", sa.SmallInteger, nullable=True),
    ):
        op.add_column("usage_records", column)
    dims = [("company_id", sa.Integer), ("user_id", sa.Integer), ("key_id", sa.Integer),
            ("model", sa.String(200))]
    _rollup("usage_hourly", *dims)
    _rollup("usage_daily", *dims, ("month", sa.BigInteger))
    _rollup("usage_daily_company", ("company_id", sa.Integer), ("model", sa.String(200)),
            ("month", sa.BigInteger))
    _fill_rollups()


def _fill_rollups() -> None:
    # Each old record's latency bucket, then the writer's own statements (store.usage),
    # so that old and new records are summed the same way, by the database.
    if op.get_bind().execute(sa.text("SELECT 1 FROM usage_records LIMIT 1")).first() is None:
        return  # a new database: nothing to sum (and compiling the sums takes a while)
    from paragate.store import usage
    from paragate.store.schema import LATENCY_BOUNDS

    duration = sa.column("duration_ms", sa.Integer)
    bucket = sa.case(*((duration < bound, i) for i, bound in enumerate(LATENCY_BOUNDS)),
                     else_=len(LATENCY_BOUNDS))
    op.execute(sa.table("usage_records", sa.column("lat_bucket")).update().values(
        lat_bucket=bucket))
    usage.add_rollups(op.get_bind(), sa.true())


def downgrade() -> None:
    for name in ("usage_daily_company", "usage_daily", "usage_hourly"):
        op.drop_table(name)
    with op.batch_alter_table("usage_records") as batch:
        for name in ("ttft_bucket", "lat_bucket", "gateway_us", "ttft_ms", "cached_tokens",
                     "partial", "error_type", "n",
                     "upstream", "endpoint", "client_request_id"):
            batch.drop_column(name)
