"""Revision 0002 moves real transcripts written under 0001 and puts them back on downgrade."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from executus_ckpt import SQLCheckpointStore, migrate

V1 = sa.Table(
    "run_checkpoints",
    sa.MetaData(),
    sa.Column("run_id", sa.String(255), primary_key=True),
    sa.Column("agent_id", sa.String(255)),
    sa.Column("prompt", sa.Text),
    sa.Column("messages", sa.LargeBinary),
    sa.Column("message_count", sa.Integer),
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("iteration", sa.Integer),
    sa.Column("completed_phases", sa.LargeBinary),
    sa.Column("status", sa.String(16)),
    sa.Column("attempts", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("epoch", sa.BigInteger),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)


def transcript(i: int) -> list[Any]:
    return [
        {"role": "user", "content": f"prompt {i} ✓ 日本語 \u0000 end"},
        *[
            {"role": "tool", "n": k, "data": [1.5, None, True, {"x": "y" * 300}]}
            for k in range(i % 7)
        ],
    ]


async def test_upgrade_moves_0001_rows_and_downgrade_restores_them(empty_sql_url: str) -> None:
    await migrate(empty_sql_url, "0001")
    engine = create_async_engine(empty_sql_url)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    rows = []
    for i in range(230):  # more than the migration's batch of 200
        msgs = transcript(i)
        blob = orjson.dumps(msgs)
        rows.append(
            {
                "run_id": f"run-{i:04d}",
                "agent_id": "agent",
                "prompt": f"prompt {i}",
                "messages": blob,
                "message_count": len(msgs),
                "size_bytes": len(blob),
                "iteration": i,
                "completed_phases": orjson.dumps(["plan"] * (i % 3)),
                "status": "dead" if i % 10 == 0 else "active",
                "attempts": i % 4,
                "last_error": "boom" if i % 10 == 0 else None,
                "epoch": i % 5,
                "created_at": now.replace(tzinfo=None) if "sqlite" in empty_sql_url else now,
                "updated_at": now.replace(tzinfo=None) if "sqlite" in empty_sql_url else now,
            }
        )
    async with engine.begin() as conn:
        await conn.execute(V1.insert(), rows)
    await engine.dispose()

    await migrate(empty_sql_url)  # 0001 -> head
    async with SQLCheckpointStore.open(empty_sql_url) as store:
        for i in range(230):
            cp = await store.load(f"run-{i:04d}")
            assert cp is not None
            assert cp.messages == transcript(i)
            assert cp.iteration == i and list(cp.completed_phases) == ["plan"] * (i % 3)
            assert (cp.attempts, cp.epoch, cp.last_error) == (
                i % 4,
                i % 5,
                "boom" if i % 10 == 0 else None,
            )
            assert str(cp.status) == ("dead" if i % 10 == 0 else "active")
        summaries = {s.run_id: s async for s in store.iter_summaries(status=None)}
        assert len(summaries) == 230
        assert all(s.message_count == len(transcript(int(r[4:]))) for r, s in summaries.items())

    await migrate(empty_sql_url, "0001")  # head -> 0001: transcripts back in the blob column
    engine = create_async_engine(empty_sql_url)
    async with engine.connect() as conn:
        back = (await conn.execute(sa.select(V1.c.run_id, V1.c.messages))).all()
    await engine.dispose()
    assert len(back) == 230
    for run_id, blob in back:
        assert orjson.loads(blob) == transcript(int(run_id[4:]))
