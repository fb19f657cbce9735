"""executors: one row per running service instance (heartbeats), for many replicas (expand only)

A run's ``owner`` names the executor that runs it; a run whose owner is not a live executor
(no row, deregistered, or heartbeat expired by the database's clock) is interrupted. Times
here are seconds since the epoch *by the database's clock* (never a host's), so liveness is
one comparison in SQL on every backend. Code of the previous release keeps working on this
schema: it neither reads nor writes the table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "executus_ckpt_executors",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255)),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("app_version", sa.String(255)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stale_after", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("stopped_at", sa.Float),
    )
    op.create_index("ix_run_checkpoints_owner", "run_checkpoints", ["owner"])
    # Rolling deploys: which older releases may keep using this schema. A release whose
    # required revision is at least this one accepts the database (expand-only migrations
    # keep it low; a contracting migration raises it).
    info = op.create_table(
        "executus_ckpt_schema_info",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(64), nullable=False),
    )
    op.bulk_insert(info, [{"name": "oldest_compatible_revision", "value": "0003"}])


def downgrade() -> None:
    op.drop_table("executus_ckpt_schema_info")
    op.drop_index("ix_run_checkpoints_owner", table_name="run_checkpoints")
    op.drop_table("executus_ckpt_executors")
