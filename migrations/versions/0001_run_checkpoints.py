"""run_checkpoints: one row per in-flight run, with recovery bookkeeping

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "run_checkpoints",
        sa.Column("run_id", sa.String(255), primary_key=True),
        sa.Column("agent_id", sa.String(255)),
        sa.Column("agent_name", sa.String(255)),
        sa.Column("caller_id", sa.String(255)),
        sa.Column("channel_id", sa.String(255)),
        sa.Column("guild_id", sa.String(255)),
        sa.Column("prompt", sa.Text),
        sa.Column("model_tier", sa.String(255)),
        sa.Column("parent_run_id", sa.String(255)),
        sa.Column("messages", sa.LargeBinary, nullable=False),
        sa.Column("message_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("size_bytes", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("iteration", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("completed_phases", sa.LargeBinary, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default=sa.text("'active'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text),
        sa.Column("app_version", sa.String(255)),
        sa.Column("owner", sa.String(255)),
        sa.Column("epoch", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
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


def downgrade() -> None:
    op.drop_index("ix_run_checkpoints_agent_status_updated_at", table_name="run_checkpoints")
    op.drop_index("ix_run_checkpoints_status_updated_at", table_name="run_checkpoints")
    op.drop_table("run_checkpoints")
