"""The operator's library calls — ``requeue``, ``purge``, ``stats`` — on every store.

What the CLI only presents is a library call a host can schedule itself; it must behave the
same on the in-memory store, SQLite and PostgreSQL (the ``store`` fixture). Times in the past
are given explicitly; nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from executus_ckpt import (
    CheckpointStats,
    CheckpointStatus,
    RunCheckpoint,
    RunCheckpointMeta,
    SQLCheckpointStore,
)
from executus_ckpt.protocols import AdminStore, CheckpointStore
from executus_ckpt.schema import run_checkpoint_messages

HOUR = 3600.0


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


def make(
    run_id: str,
    *,
    agent: str | None = "agent-a",
    updated: datetime | None = None,
    messages: Sequence[Any] | None = None,
    attempts: int = 0,
    status: CheckpointStatus = CheckpointStatus.ACTIVE,
) -> RunCheckpoint:
    updated = updated or datetime.now(UTC)
    return RunCheckpoint(
        meta=RunCheckpointMeta(run_id=run_id, agent_id=agent),
        messages=[{"role": "user", "content": run_id}] if messages is None else messages,
        iteration=1,
        completed_phases=["plan"],
        created_at=updated,
        updated_at=updated,
        attempts=attempts,
        status=status,
    )


async def put(store: AdminStore, *checkpoints: RunCheckpoint, dead: Sequence[str] = ()) -> None:
    for checkpoint in checkpoints:
        await store.save(checkpoint)
    for run_id in dead:
        assert await store.mark_dead(run_id, reason=f"{run_id} failed too often")


async def must_load(store: AdminStore, run_id: str) -> RunCheckpoint:
    checkpoint = await store.load(run_id)
    assert checkpoint is not None, f"{run_id} is not stored"
    return checkpoint


async def ids(store: AdminStore) -> set[str]:
    return {s.run_id async for s in store.iter_summaries(status=None)}


async def message_rows(store: AdminStore, run_ids: Sequence[str]) -> int:
    """Stored message rows of ``run_ids`` (SQL stores; 0 for the in-memory store)."""
    if not isinstance(store, SQLCheckpointStore):
        return 0
    m = run_checkpoint_messages
    stmt = select(func.count()).select_from(m).where(m.c.run_id.in_(list(run_ids)))
    async with store.engine.connect() as conn:
        return int((await conn.execute(stmt)).scalar_one())


# -- the protocol ----------------------------------------------------------------------------


async def test_every_store_is_an_admin_store(store: AdminStore) -> None:
    """The CLI is typed against AdminStore: both stores must provide the whole surface."""
    assert isinstance(store, CheckpointStore)
    assert isinstance(store, AdminStore)


# -- requeue -----------------------------------------------------------------------------------


async def test_requeue_makes_a_dead_run_active_with_attempts_reset(store: AdminStore) -> None:
    await put(store, make("run-d", attempts=3, messages=[{"n": 1}, {"n": 2}]), dead=["run-d"])
    assert [c.run_id for c in await store.list_interrupted()] == []
    before = await must_load(store, "run-d")
    assert before.status is CheckpointStatus.DEAD and before.attempts == 3

    assert await store.requeue("run-d") is True

    after = await must_load(store, "run-d")
    assert after.status is CheckpointStatus.ACTIVE
    assert after.attempts == 0
    assert after.messages == [{"n": 1}, {"n": 2}]
    assert after.iteration == before.iteration
    assert [c.run_id for c in await store.list_interrupted()] == ["run-d"]
    # Now active: a second requeue is refused.
    assert await store.requeue("run-d") is False


async def test_requeue_refuses_active_and_unknown_runs(store: AdminStore) -> None:
    await put(store, make("run-a", attempts=2))
    assert await store.requeue("run-a") is False
    active = await must_load(store, "run-a")
    assert active.status is CheckpointStatus.ACTIVE and active.attempts == 2
    assert await store.requeue("ghost") is False
    assert await store.load("ghost") is None
    assert await ids(store) == {"run-a"}


# -- purge -------------------------------------------------------------------------------------


async def _seed_mix(store: AdminStore) -> None:
    await put(
        store,
        make("old-dead", updated=ago(hours=3)),
        make("old-active", updated=ago(hours=3)),
        make("fresh-dead", updated=ago(minutes=10)),
        make("fresh-active", updated=ago(minutes=10)),
        dead=["old-dead", "fresh-dead"],
    )


async def test_purge_defaults_to_old_dead_runs(store: AdminStore) -> None:
    await _seed_mix(store)
    assert await store.purge(older_than=HOUR) == 1
    assert await ids(store) == {"old-active", "fresh-dead", "fresh-active"}
    assert await store.load("old-dead") is None
    assert await message_rows(store, ["old-dead"]) == 0


async def test_purge_status_filter(store: AdminStore) -> None:
    await _seed_mix(store)
    assert await store.purge(older_than=HOUR, status=CheckpointStatus.ACTIVE) == 1
    assert await ids(store) == {"old-dead", "fresh-dead", "fresh-active"}
    assert await store.purge(older_than=HOUR, status=CheckpointStatus.DEAD) == 1
    assert await ids(store) == {"fresh-dead", "fresh-active"}


async def test_purge_every_status(store: AdminStore) -> None:
    await _seed_mix(store)
    assert await store.purge(older_than=HOUR, status=None) == 2
    assert await ids(store) == {"fresh-dead", "fresh-active"}
    assert await store.purge(older_than=60, status=None) == 2
    assert await ids(store) == set()


async def test_purge_dry_run_counts_without_deleting(store: AdminStore) -> None:
    await _seed_mix(store)
    everything = await ids(store)
    assert await store.purge(older_than=HOUR, dry_run=True) == 1
    assert await store.purge(older_than=HOUR, status=None, dry_run=True) == 2
    assert await store.purge(older_than=60, status=None, dry_run=True) == 4
    assert await store.purge(older_than=24 * HOUR, status=None, dry_run=True) == 0
    assert await ids(store) == everything
    for run_id in everything:
        loaded = await must_load(store, run_id)
        assert loaded.messages == [{"role": "user", "content": run_id}]


async def test_purge_in_small_batches_deletes_all_and_reports_progress(store: AdminStore) -> None:
    doomed = [f"run-{i}" for i in range(7)]
    await put(
        store,
        *(make(r, updated=ago(hours=2, minutes=i)) for i, r in enumerate(doomed)),
        make("keep", updated=ago(minutes=1)),
        dead=[*doomed, "keep"],
    )
    progress: list[int] = []
    assert await store.purge(older_than=HOUR, batch_size=2, on_progress=progress.append) == 7
    assert await ids(store) == {"keep"}
    assert await message_rows(store, doomed) == 0
    # Called with the running total: rising, never past the total, ending at it, and more
    # than once (batches of 2 for 7 runs).
    assert progress, "on_progress was never called"
    assert progress == sorted(progress)
    assert progress[-1] == 7
    assert all(0 < n <= 7 for n in progress)
    assert len(set(progress)) >= 4


async def test_purge_batch_size_one(store: AdminStore) -> None:
    await put(
        store,
        *(make(f"run-{i}", updated=ago(hours=5)) for i in range(5)),
        dead=[f"run-{i}" for i in range(5)],
    )
    assert await store.purge(older_than=HOUR, batch_size=1) == 5
    assert await ids(store) == set()


async def test_purge_never_deletes_a_run_updated_after_the_cutoff(store: AdminStore) -> None:
    await put(
        store,
        make("just-inside", updated=ago(minutes=59)),  # younger than the 1 h cutoff
        make("rewritten", updated=ago(hours=5)),
        make("old", updated=ago(hours=5)),
        dead=["just-inside", "rewritten", "old"],
    )
    # A write lands after the operator looked (dry run) and before the purge: it counts.
    assert await store.purge(older_than=HOUR, dry_run=True) == 2
    rewritten = await must_load(store, "rewritten")
    await store.save(
        RunCheckpoint(
            meta=rewritten.meta,
            messages=[*rewritten.messages, {"role": "assistant", "content": "new"}],
            iteration=rewritten.iteration + 1,
            completed_phases=rewritten.completed_phases,
            created_at=rewritten.created_at,
            updated_at=datetime.now(UTC),
            epoch=rewritten.epoch,
        )
    )
    assert await store.purge(older_than=HOUR) == 1
    assert await ids(store) == {"just-inside", "rewritten"}
    kept = await must_load(store, "rewritten")
    assert len(kept.messages) == 2 and kept.iteration == rewritten.iteration + 1


async def test_purge_while_runs_are_being_written(store: AdminStore) -> None:
    """Concurrent saves of old runs never lose a write: each rewritten run is intact after."""
    old = [f"run-{i:02d}" for i in range(30)]
    await put(store, *(make(r, updated=ago(hours=4)) for r in old), dead=old)
    rewritten = old[::3]  # 10 runs written again right now

    async def rewrite(run_id: str) -> None:
        await asyncio.sleep(0)
        await store.save(
            make(
                run_id,
                updated=datetime.now(UTC),
                messages=[{"n": i, "run": run_id} for i in range(4)],
                status=CheckpointStatus.DEAD,
            )
        )

    purged, *_ = await asyncio.gather(
        store.purge(older_than=HOUR, batch_size=3), *(rewrite(r) for r in rewritten)
    )
    assert isinstance(purged, int)
    assert len(old) - len(rewritten) <= purged <= len(old)
    assert await ids(store) == set(rewritten)
    for run_id in rewritten:
        loaded = await must_load(store, run_id)
        assert loaded is not None
        assert loaded.messages == [{"n": i, "run": run_id} for i in range(4)]
    summaries = {s.run_id: s async for s in store.iter_summaries(status=None)}
    for run_id in rewritten:
        assert summaries[run_id].message_count == 4
    assert await message_rows(store, [r for r in old if r not in rewritten]) == 0


# -- stats -------------------------------------------------------------------------------------


async def test_stats_of_an_empty_store(store: AdminStore) -> None:
    stats = await store.stats()
    assert isinstance(stats, CheckpointStats)
    assert stats.total == 0
    assert dict(stats.by_status) == {}
    assert dict(stats.by_agent) == {}
    assert stats.total_size_bytes == 0
    assert stats.largest_size_bytes == 0
    assert stats.largest_run_id is None
    assert stats.oldest_interrupted_run_id is None
    assert stats.oldest_interrupted_at is None


async def test_stats_counts_sizes_and_oldest_interrupted(store: AdminStore) -> None:
    big = [{"role": "tool", "content": "x" * 5000}]
    await put(
        store,
        make("run-a1", agent="agent-a", updated=ago(hours=2)),
        make("run-a2", agent="agent-a", updated=ago(hours=1), messages=big),
        make("run-b1", agent="agent-b", updated=ago(hours=9)),  # older, but dead
        make("run-n1", agent=None, updated=ago(minutes=5), messages=[]),
        make("run-n2", agent=None, updated=ago(minutes=4)),
        dead=["run-b1"],
    )
    stats = await store.stats()
    assert stats.total == 5
    assert dict(stats.by_status) == {"active": 4, "dead": 1}
    assert dict(stats.by_agent) == {"agent-a": 2, "agent-b": 1, "": 2}
    assert sum(stats.by_agent.values()) == stats.total
    sizes = {s.run_id: s.size_bytes async for s in store.iter_summaries(status=None)}
    assert stats.total_size_bytes == sum(sizes.values())
    assert sizes["run-n1"] == 0
    assert stats.largest_run_id == "run-a2"
    assert stats.largest_size_bytes == sizes["run-a2"] > 5000
    assert stats.oldest_interrupted_run_id == "run-a1"
    a1 = await must_load(store, "run-a1")
    assert stats.oldest_interrupted_at == a1.updated_at
    assert stats.oldest_interrupted_at.utcoffset() == timedelta(0)


async def test_stats_follow_requeue_and_purge(store: AdminStore) -> None:
    await put(
        store,
        make("run-1", updated=ago(hours=3)),
        make("run-2", updated=ago(hours=2)),
        dead=["run-1"],
    )
    stats = await store.stats()
    assert dict(stats.by_status) == {"active": 1, "dead": 1}
    assert stats.oldest_interrupted_run_id == "run-2"
    assert await store.requeue("run-1")
    stats = await store.stats()
    assert dict(stats.by_status) == {"active": 2}
    assert stats.oldest_interrupted_run_id == "run-1"
    assert await store.purge(older_than=HOUR, status=None) == 2
    assert (await store.stats()).total == 0


async def test_stats_no_agent_and_empty_agent_id_count_together(store: AdminStore) -> None:
    """``by_agent`` keys runs without an agent as ``""``; its counts still add up to the total."""
    await put(
        store,
        make("run-none", agent=None),
        make("run-empty", agent=""),
        make("run-a", agent="agent-a"),
    )
    stats = await store.stats()
    assert stats.total == 3
    assert dict(stats.by_agent) == {"": 2, "agent-a": 1}
    assert sum(stats.by_agent.values()) == stats.total


async def test_stats_largest_run_tie_is_the_same_on_every_store(store: AdminStore) -> None:
    """Equal sizes: every store names the same run (the first by run id, as SQL orders it)."""
    same = [{"role": "user", "content": "same size"}]
    await put(store, make("run-b", messages=same), make("run-a", messages=same), make("run-c"))
    sizes = {s.run_id: s.size_bytes async for s in store.iter_summaries(status=None)}
    assert sizes["run-a"] == sizes["run-b"] > sizes["run-c"]
    stats = await store.stats()
    assert stats.largest_size_bytes == sizes["run-a"]
    assert stats.largest_run_id == "run-a", type(store).__name__
