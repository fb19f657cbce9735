"""run_checkpoint_messages: the transcript as append-only rows, one per message

Moves every stored transcript out of run_checkpoints.messages (a JSON array) into one row per
message, so that a save writes only the new messages. The downgrade puts them back.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 200

# Frozen copies of the tables as this revision sees them (migrations never import the live
# schema, which moves on).
_meta = sa.MetaData()
_headers = sa.Table(
    "run_checkpoints",
    _meta,
    sa.Column("run_id", sa.String(255), primary_key=True),
    sa.Column("messages", sa.LargeBinary),
    sa.Column("message_count", sa.Integer),
    sa.Column("size_bytes", sa.BigInteger),
)
_messages = sa.Table(
    "run_checkpoint_messages",
    _meta,
    sa.Column("run_id", sa.String(255), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)


def upgrade() -> None:
    op.create_table(
        "run_checkpoint_messages",
        sa.Column("run_id", sa.String(255), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    conn = op.get_bind()
    last = ""
    while True:  # keyset batches: memory bounded by _BATCH transcripts
        rows = conn.execute(
            sa.select(_headers.c.run_id, _headers.c.messages)
            .where(_headers.c.run_id > last)
            .order_by(_headers.c.run_id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        for run_id, blob in rows:
            items = orjson.loads(blob) if blob else []
            encoded = [orjson.dumps(m) for m in items]
            if encoded:
                conn.execute(
                    _messages.insert(),
                    [{"run_id": run_id, "seq": i, "data": d} for i, d in enumerate(encoded)],
                )
            conn.execute(
                _headers.update()
                .where(_headers.c.run_id == run_id)
                .values(message_count=len(encoded), size_bytes=sum(map(len, encoded)))
            )
        last = rows[-1][0]
    with op.batch_alter_table("run_checkpoints") as batch:
        batch.drop_column("messages")


def downgrade() -> None:
    with op.batch_alter_table("run_checkpoints") as batch:
        batch.add_column(sa.Column("messages", sa.LargeBinary, nullable=True))
    conn = op.get_bind()
    last = ""
    while True:
        run_ids = (
            conn.execute(
                sa.select(_headers.c.run_id)
                .where(_headers.c.run_id > last)
                .order_by(_headers.c.run_id)
                .limit(_BATCH)
            )
            .scalars()
            .all()
        )
        if not run_ids:
            break
        for run_id in run_ids:
            parts = (
                conn.execute(
                    sa.select(_messages.c.data)
                    .where(_messages.c.run_id == run_id)
                    .order_by(_messages.c.seq)
                )
                .scalars()
                .all()
            )
            blob = b"[" + b",".join(parts) + b"]"
            conn.execute(
                _headers.update()
                .where(_headers.c.run_id == run_id)
                .values(messages=blob, message_count=len(parts), size_bytes=len(blob))
            )
        last = run_ids[-1]
    with op.batch_alter_table("run_checkpoints") as batch:
        batch.alter_column("messages", existing_type=sa.LargeBinary, nullable=False)
    op.drop_table("run_checkpoint_messages")
