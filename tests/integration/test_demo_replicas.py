"""The replicas part of the demo, end to end: three real processes on one SQLite file, one
SIGKILLed, one SIGTERMed (drained); the survivor resumes both sets, each run finishes once."""

from __future__ import annotations

from pathlib import Path

from executus_ckpt.demo import REPLICAS, replicas_db_for, run_replicas_demo

STALE_AFTER = 2.0
HEARTBEAT = 0.3


async def test_survivor_resumes_killed_and_drained_runs_exactly_once(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = await run_replicas_demo(
        tmp_path / "replicas.db",
        runs_per_replica=4,
        heartbeat_interval=HEARTBEAT,
        stale_after=STALE_AFTER,
        sweep_interval=0.3,
        grace=0.5,
        out=lines.append,
    )
    text = "\n".join(lines)
    assert summary.problems == [], text
    assert summary.ok, text
    assert summary.runs == 12 and summary.finished_once == 12
    assert len(summary.killed_runs) >= 1 and summary.killed_resumed == len(summary.killed_runs)
    assert len(summary.drained_runs) >= 1 and summary.drained_resumed == len(summary.drained_runs)
    assert summary.fenced == 0 and summary.checkpoints_left == 0
    killed, drained, survivor = REPLICAS
    assert summary.exit_codes == {killed: -9, drained: 0, survivor: 0}

    # Drained runs are released: a peer takes them at its next sweep, long before stale_after.
    assert summary.drain_handoff is not None and 0 < summary.drain_handoff < STALE_AFTER
    # Killed runs wait for the owner's heartbeat to expire: stale_after after its last beat
    # (the kill is timed just after a beat), and not much more.
    assert summary.kill_handoff is not None and summary.heartbeat_age_at_kill is not None
    assert summary.heartbeat_age_at_kill < HEARTBEAT
    assert summary.kill_handoff + summary.heartbeat_age_at_kill >= STALE_AFTER - 0.05
    assert summary.kill_handoff >= STALE_AFTER - HEARTBEAT
    assert summary.kill_handoff < STALE_AFTER + 3.0
    assert summary.drain_handoff < summary.kill_handoff

    assert "!! kill -9" in text and "!! kill -TERM" in text
    assert "== replicas: summary ==" in text
    assert "hand-off after SIGKILL:" in text and "hand-off after SIGTERM:" in text
    assert "runs finished exactly once: 12 of 12" in text
    assert "checkpoints left:           0" in text
    assert lines[-1].split() == ["result", "(replicas):", "OK"]
    assert "PROBLEM" not in text


def test_the_replicas_database_sits_beside_the_demo_database(tmp_path: Path) -> None:
    assert replicas_db_for(tmp_path / "d.db") == tmp_path / "d_replicas.db"
    assert replicas_db_for("executus_ckpt_demo.db") == Path("executus_ckpt_demo_replicas.db")
