"""executors: heartbeat_interval and healthy_since, so a claim judges its claimer too (expand only)

A stall that delays every heartbeat (a frozen database, a process stopped while it holds
SQLite's write lock) used to let the first executor to write again rescue the runs of owners
that were alive all along. A claim of a run whose owner's heartbeat expired now also requires,
in the same statement, that the claimer's own heartbeats have been on time (no gap over two
intervals) for ``stale_after``. Both columns are nullable: the previous release neither reads
nor writes them, and its executors, which never judge by them, keep working.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("executus_ckpt_executors", sa.Column("heartbeat_interval", sa.Float))
    op.add_column("executus_ckpt_executors", sa.Column("healthy_since", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("executus_ckpt_executors") as batch:
        batch.drop_column("healthy_since")
        batch.drop_column("heartbeat_interval")
