"""Phase boundaries, host state, run inputs, crash-loop bookkeeping (expand only)

Adds nullable columns to run_checkpoints; no data moves. Rows written under 0002 keep NULL
boundaries and resume from their whole transcript, as they did; ``status`` may now also be
``'failed'`` (a String column: no constraint to change). Code of the previous release keeps
working on this schema: it neither reads nor writes these columns.

- inputs: RunInfo.inputs (JSON) given back by run_info();
- extra: the host's state of the last save (JSON);
- boundary_message_count / boundary_iteration / boundary_extra: the state at the last phase
  boundary (NULL: not recorded, resume from the whole transcript);
- progress_at: time of the last save; claimed_at: time of the last recovery claim (a claim
  with no save since the previous one counts as a failed attempt).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here, not imported: a migration is frozen, the live schema moves on.
_COLUMNS = (
    ("inputs", sa.LargeBinary),
    ("extra", sa.LargeBinary),
    ("boundary_message_count", sa.Integer),
    ("boundary_iteration", sa.Integer),
    ("boundary_extra", sa.LargeBinary),
    ("progress_at", sa.DateTime(timezone=True)),
    ("claimed_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    with op.batch_alter_table("run_checkpoints") as batch:
        for name, kind in _COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    # Failed runs are a status 0002 does not know: they go back to dead (kept, never resumed).
    op.execute("UPDATE run_checkpoints SET status = 'dead' WHERE status = 'failed'")
    with op.batch_alter_table("run_checkpoints") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
