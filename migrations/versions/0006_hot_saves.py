"""run_checkpoints: no index on updated_at, so a save updates its row in place (expand only)

Every save of a run sets ``updated_at``. With that column in two indexes, every save was a
non-HOT update on PostgreSQL: a new row version on any page plus one entry in each of the
table's four indexes (and two index rewrites on SQLite), for indexes that only the listing and
recovery queries read. Without it, an append leaves every indexed column as it was and
PostgreSQL updates the row in place (HOT: no index entry written); ``fillfactor`` 80 keeps room
on each page for that. The listings filter by status (and agent) through the new indexes and
sort the matching rows by ``updated_at``: a sort of the active (or failed) rows, not of the
table. Code of the previous releases keeps working on this schema: it names no index.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_run_checkpoints_status", "run_checkpoints", ["status"])
    op.create_index("ix_run_checkpoints_agent_status", "run_checkpoints", ["agent_id", "status"])
    op.drop_index("ix_run_checkpoints_agent_status_updated_at", table_name="run_checkpoints")
    op.drop_index("ix_run_checkpoints_status_updated_at", table_name="run_checkpoints")
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE run_checkpoints SET (fillfactor = 80)")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE run_checkpoints RESET (fillfactor)")
    op.create_index(
        "ix_run_checkpoints_status_updated_at",
        "run_checkpoints",
        ["status", "updated_at", "run_id"],
    )
    op.create_index(
        "ix_run_checkpoints_agent_status_updated_at",
        "run_checkpoints",
        ["agent_id", "status", "updated_at"],
    )
    op.drop_index("ix_run_checkpoints_agent_status", table_name="run_checkpoints")
    op.drop_index("ix_run_checkpoints_status", table_name="run_checkpoints")
