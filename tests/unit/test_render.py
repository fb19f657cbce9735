"""The CLI's JSON shapes follow the value types' fields (``executus_ckpt._render``)."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, datetime

from executus_ckpt import (
    CheckpointStats,
    CheckpointStatus,
    CheckpointSummary,
    RunCheckpoint,
    RunCheckpointMeta,
)
from executus_ckpt._render import LISTED_META, checkpoint_json, stats_json, summary_json

T0 = datetime(2026, 11, 24, 23, 2, 37, 240079, tzinfo=UTC)
META = RunCheckpointMeta(run_id="run-1", agent_id="agent-a", agent_name="A", prompt="hi")


def names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def test_summary_has_every_summary_field_in_declaration_order() -> None:
    summary = CheckpointSummary(
        meta=META,
        iteration=3,
        completed_phases=("plan",),
        message_count=2,
        size_bytes=10,
        created_at=T0,
        updated_at=T0,
        status=CheckpointStatus.DEAD,
    )
    doc = summary_json(summary)
    expected = ["run_id", *LISTED_META, *(n for n in names(CheckpointSummary) if n != "meta")]
    assert list(doc) == expected
    assert doc["run_id"] == "run-1" and doc["agent_id"] == "agent-a"
    assert doc["status"] == "dead"
    assert doc["completed_phases"] == ["plan"]
    assert doc["created_at"] == T0.isoformat()
    assert json.loads(json.dumps(doc)) == doc


def test_checkpoint_has_every_field_with_the_transcript_as_a_count() -> None:
    messages = [{"n": i} for i in range(5)]
    cp = RunCheckpoint(meta=META, messages=messages, iteration=2, created_at=T0, updated_at=T0)
    doc = checkpoint_json(cp, 2)
    expected = [
        "run_id",
        *("message_count" if n == "messages" else n for n in names(RunCheckpoint)),
        "messages",
    ]
    assert list(doc) == expected
    assert list(doc["meta"]) == [n for n in names(RunCheckpointMeta) if n != "run_id"]
    assert doc["meta"]["prompt"] == "hi"
    assert doc["message_count"] == 5
    assert doc["messages"] == [{"n": 3}, {"n": 4}]
    assert checkpoint_json(cp, 0)["messages"] == []
    assert checkpoint_json(cp, None)["messages"] == []
    assert json.loads(json.dumps(doc)) == doc


def test_stats_has_every_stats_field() -> None:
    stats = CheckpointStats(
        total=2,
        by_status={"active": 2},
        by_agent={"": 1, "agent-a": 1},
        oldest_interrupted_run_id="run-1",
        oldest_interrupted_at=T0,
    )
    doc = stats_json(stats)
    assert list(doc) == names(CheckpointStats)
    assert doc["by_agent"] == {"": 1, "agent-a": 1}
    assert doc["oldest_interrupted_at"] == T0.isoformat()
    assert json.loads(json.dumps(doc)) == doc
