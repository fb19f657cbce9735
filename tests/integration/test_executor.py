"""Executor in one process, on every store: ownership, interrupted-ness, recovery loop, drain,
stats. The multi-process scenarios (SIGKILL, SIGTERM, SIGSTOP) are in tests/replicas."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from executus_ckpt import (
    CheckpointFencedError,
    CheckpointStatus,
    Executor,
    RunCheckpoint,
    RunCheckpointState,
    RunInfo,
    StoreCheckpointerFactory,
    checkpointed_run,
)

FAST = {"heartbeat_interval": 0.2, "stale_after": 1.0, "sweep_interval": 0.1}


async def _eventually(predicate: Any, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_runs_of_a_live_executor_are_not_interrupted(store: Any) -> None:
    async with Executor(store, name="a", **FAST) as a:
        release = asyncio.Event()

        async def live_run() -> None:
            async with checkpointed_run(a.factory(), RunInfo("live")) as cp:
                await cp.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
                await release.wait()

        task = asyncio.create_task(live_run())
        await _eventually(lambda: _exists(store, "live"))
        assert await store.list_interrupted() == []
        # a second replica booting now leaves it alone
        async with Executor(store, name="b", **FAST) as b:
            dispatched: list[str] = []

            async def dispatch(cp: RunCheckpoint) -> None:
                dispatched.append(cp.run_id)

            b.recover(dispatch)
            await asyncio.sleep(0.5)
            assert dispatched == []
            assert b.stats().live_executors == 2
        release.set()
        await task
    assert await store.load("live") is None


async def test_a_dead_executors_runs_are_rescued_after_stale_after(store: Any) -> None:
    a = Executor(store, name="a", **FAST)
    await a.start()
    factory = a.factory()
    cp = await factory.begin(RunInfo("orphan", inputs={"prompt": "p"}))
    await cp.save(RunCheckpointState(messages=[{"m": 0}], iteration=1, completed_phases=["x"]))
    assert a._heartbeat is not None
    await a._heartbeat.stop()  # a dies: no more heartbeats, no drain
    async with Executor(store, name="b", **FAST) as b:
        finished: list[str] = []

        async def dispatch(ckpt: RunCheckpoint) -> None:
            async with checkpointed_run(b.factory(), ckpt.run_info()) as again:
                await again.save(RunCheckpointState(messages=[{"m": 0}, {"m": 1}], iteration=2))
            finished.append(ckpt.run_id)

        b.recover(dispatch)
        await _eventually(lambda: _true(finished == ["orphan"]), within=8)
        assert b.stats().rescues == 1 and b.stats().claims == 1
    with pytest.raises(CheckpointFencedError):  # the zombie writer is fenced
        await cp.save(RunCheckpointState(messages=[{"m": 9}], iteration=9))
    await cp.complete()  # changes nothing
    assert await store.load("orphan") is None, "finished once, not resurrected"


async def test_drain_cancels_releases_and_a_peer_takes_over_at_once(store: Any) -> None:
    slow = {**FAST, "stale_after": 60.0}  # a peer takes the runs because they were released
    a = Executor(store, name="a", **slow)
    await a.start()
    started = asyncio.Event()

    async def long_run(run_id: str) -> None:
        async with checkpointed_run(a.factory(), RunInfo(run_id)) as cp:
            await cp.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
            started.set()
            await asyncio.sleep(60)

    tasks = [asyncio.create_task(long_run(f"r{i}")) for i in range(3)]
    await started.wait()
    await asyncio.sleep(0.1)
    await a.drain(grace=0.2)
    assert all(t.cancelled() for t in tasks)
    assert a.stats().releases >= 3 and a.state == "stopped"
    rows = [await store.load(f"r{i}") for i in range(3)]
    assert all(r is not None and r.owner is None for r in rows)
    async with Executor(store, name="b", **slow) as b:
        taken: list[str] = []

        async def dispatch(cp: RunCheckpoint) -> None:
            taken.append(cp.run_id)
            await store.delete(cp.run_id)

        b.recover(dispatch)
        await _eventually(lambda: _true(sorted(taken) == ["r0", "r1", "r2"]), within=3)
    for _ in range(4):  # drains in a row never make a run dead
        row = await store.load("r0")
        assert row is None or row.status == CheckpointStatus.ACTIVE


async def test_begin_after_drain_is_refused(store: Any) -> None:
    async with Executor(store, **FAST) as ex:
        factory = ex.factory()
    with pytest.raises(Exception, match="stopped"):
        await factory.begin(RunInfo("late"))


async def test_single_process_hosts_keep_todays_behaviour(store: Any) -> None:
    factory = StoreCheckpointerFactory(store, executor_id="bot-1")  # never registered
    cp = await factory.begin(RunInfo("r"))
    await cp.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
    assert [c.run_id for c in await store.list_interrupted()] == ["r"]


async def test_executors_are_listed(store: Any) -> None:
    async with Executor(store, name="lister", app_version="v9", **FAST) as ex:
        await ex.factory().begin(RunInfo("owned"))
        (info,) = [e for e in await store.list_executors() if e.id == ex.id]
        assert info.name == "lister" and info.app_version == "v9" and info.alive
        assert info.runs_owned == 1 and info.heartbeat_age < 5
    assert all(e.id != ex.id for e in await store.list_executors())


async def _exists(store: Any, run_id: str) -> bool:
    return await store.load(run_id) is not None


async def _true(value: bool) -> bool:
    return value


async def _beat(store: Any, ids: list[str], times: int, interval: float = 0.1) -> None:
    for _ in range(times):
        for executor_id in ids:
            assert await store.heartbeat_executor(executor_id) is not None
        await asyncio.sleep(interval)


async def test_a_judge_whose_own_heartbeats_stalled_rescues_nobody(store: Any) -> None:
    """Everyone's heartbeats stalled together (the database froze, or a process stopped while
    holding SQLite's write lock): the owner's expired heartbeat says nothing about the owner
    while the judge's own heartbeats were late too. The claim's own statement refuses until the
    judge has beaten on time for stale_after again; then the owner, still silent, is gone."""
    beat = {"stale_after": 0.5, "heartbeat_interval": 0.1}
    for executor_id in ("P", "J"):
        await store.register_executor(
            executor_id, name=executor_id, host=None, pid=None, app_version=None, **beat
        )
    cp = await StoreCheckpointerFactory(store, executor_id="P").begin(RunInfo("r"))
    await cp.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
    await _beat(store, ["P", "J"], 7)
    stored = await store.load("r")
    assert stored is not None and stored.owner == "P"
    await asyncio.sleep(0.7)  # nobody could write: every heartbeat is late, J's too
    # J's claim runs before J's own next beat: J's heartbeat is stale, J judges nobody
    assert await store.claim("r", epoch=stored.epoch, owner="J") is None
    await store.heartbeat_executor("J")  # J's first beat after the stall
    assert await store.claim("r", epoch=stored.epoch, owner="J") is None
    await _beat(store, ["J"], 2)  # on time again, but not yet for stale_after
    assert await store.claim("r", epoch=stored.epoch, owner="J") is None
    await _beat(store, ["J"], 5)  # J on time for stale_after; P silent all along: P is gone
    claimed = await store.claim("r", epoch=stored.epoch, owner="J")
    assert claimed is not None and claimed.owner == "J"


async def test_an_owner_that_came_back_after_the_stall_keeps_its_run(store: Any) -> None:
    beat = {"stale_after": 0.5, "heartbeat_interval": 0.1}
    for executor_id in ("P", "J"):
        await store.register_executor(
            executor_id, name=executor_id, host=None, pid=None, app_version=None, **beat
        )
    cp = await StoreCheckpointerFactory(store, executor_id="P").begin(RunInfo("r"))
    await cp.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
    await _beat(store, ["P", "J"], 7)
    await asyncio.sleep(0.7)
    await _beat(store, ["J", "P"], 8)  # both back; J healthy for stale_after again
    stored = await store.load("r")
    assert stored is not None
    assert await store.claim("r", epoch=stored.epoch, owner="J") is None
    await cp.save(RunCheckpointState(messages=[{"m": 0}, {"m": 1}], iteration=2))  # not fenced


async def test_an_unregistered_recoverer_still_rescues_stale_owners(store: Any) -> None:
    """A host without an Executor (or the CLI) has no heartbeat to be judged by: an owner's
    expired heartbeat is enough, as before."""
    await store.register_executor(
        "P",
        name="P",
        host=None,
        pid=None,
        app_version=None,
        stale_after=0.3,
        heartbeat_interval=0.1,
    )
    cp = await StoreCheckpointerFactory(store, executor_id="P").begin(RunInfo("r"))
    await cp.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
    await asyncio.sleep(0.5)
    stored = await store.load("r")
    assert stored is not None
    claimed = await store.claim("r", epoch=stored.epoch, owner="bot-1")
    assert claimed is not None and claimed.owner == "bot-1"


@pytest.mark.parametrize("owner_then", ["completes", "fails_kept", "beats_again"])
async def test_a_run_that_changed_between_listing_and_claim_is_left_alone(
    store: Any, owner_then: str
) -> None:
    """River #1302: a rescuer listed a run, then its slow-but-alive owner finished it (or
    came back) before the rescuer's UPDATE. The claim re-checks in its own statement: it
    takes nothing, and a finished run is not resurrected."""
    await store.register_executor(
        "P",
        name="P",
        host=None,
        pid=None,
        app_version=None,
        stale_after=0.3,
        heartbeat_interval=0.1,
    )
    factory = StoreCheckpointerFactory(store, executor_id="P", keep_failed=True)
    cp = await factory.begin(RunInfo("r"))
    await cp.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
    await asyncio.sleep(0.5)  # P's heartbeat expired: the run is interrupted
    [listed] = await store.list_interrupted()
    if owner_then == "completes":
        await cp.complete()
    elif owner_then == "fails_kept":
        await cp.fail(RuntimeError("tool broke"))
    else:
        assert await store.heartbeat_executor("P") is not None
    assert await store.claim("r", epoch=listed.epoch, owner="bot-1") is None
    after = await store.load("r")
    if owner_then == "completes":
        assert after is None, "a finished run was resurrected"
    elif owner_then == "fails_kept":
        assert after is not None and after.status == CheckpointStatus.FAILED
    else:
        assert after is not None and after.owner == "P" and after.epoch == listed.epoch


async def test_postgres_claims_skip_a_locked_run(pg_url: str) -> None:
    """FOR UPDATE SKIP LOCKED: a run whose row another transaction holds (a peer claiming it,
    its owner writing) is skipped at once, not waited for; once free it is claimed."""
    import asyncpg

    from executus_ckpt import SQLCheckpointStore

    async with SQLCheckpointStore.open(pg_url) as store:
        cp = await StoreCheckpointerFactory(store).begin(RunInfo("r"))  # no owner: interrupted
        await cp.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
        stored = await store.load("r")
        assert stored is not None
        holder = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM run_checkpoints WHERE run_id = 'r' FOR UPDATE")
            started = asyncio.get_running_loop().time()
            assert await store.claim("r", epoch=stored.epoch, owner="bot-1") is None
            assert asyncio.get_running_loop().time() - started < 5.0  # skipped, not waited
            await tx.rollback()
        finally:
            await holder.close()
        claimed = await store.claim("r", epoch=stored.epoch, owner="bot-1")
        assert claimed is not None and claimed.owner == "bot-1"


async def test_recover_applies_dead_letter_and_quarantine_rules(store: Any) -> None:
    """executor.recover follows recover_interrupted's rules: a run over max_attempts is marked
    dead and never dispatched, a run ``accept`` rejects is quarantined, the rest run."""
    from executus_ckpt import recover_interrupted

    await StoreCheckpointerFactory(store, app_version="v2").begin(RunInfo("poison"))

    async def nothing(cp: RunCheckpoint) -> None:
        return None

    # One claim without progress (a boot that died in it): the budget of max_attempts=1 is spent.
    assert (await recover_interrupted(store, nothing, max_attempts=1)).dispatched == ("poison",)
    await StoreCheckpointerFactory(store, app_version="v1").begin(RunInfo("old"))
    await StoreCheckpointerFactory(store, app_version="v2").begin(RunInfo("good"))
    dispatched: list[str] = []

    async def dispatch(cp: RunCheckpoint) -> None:
        dispatched.append(cp.run_id)
        async with checkpointed_run(ex.factory(), cp.run_info()):
            pass

    async with Executor(store, name="x", **FAST) as ex:
        ex.recover(dispatch, max_attempts=1, accept=lambda cp: cp.app_version == "v2")

        async def settled() -> bool:
            rows = [await store.load(r) for r in ("poison", "old")]
            return dispatched == ["good"] and all(
                r is not None and r.status == CheckpointStatus.DEAD for r in rows
            )

        await _eventually(settled)
    poison, old = await store.load("poison"), await store.load("old")
    assert poison.last_error is not None and "max_attempts" in poison.last_error
    assert old.last_error is not None and "quarantine" in old.last_error
    assert await store.load("good") is None, "the accepted run ran and finished"
    assert dispatched == ["good"], "neither the dead nor the quarantined run was dispatched"


@pytest.mark.parametrize(
    ("skew", "warned"), [(4.9, False), (-4.9, False), (5.1, True), (-5.1, True)]
)
def test_clock_skew_warns_above_five_seconds(
    skew: float, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The host-vs-database clock warning's threshold (the replica test uses 10 minutes)."""
    from executus_ckpt import InMemoryCheckpointStore

    caplog.set_level("WARNING", logger="executus_ckpt.executor")
    Executor(InMemoryCheckpointStore(), name="x")._warn_on_skew(skew)
    assert any("host clock differs" in r.getMessage() for r in caplog.records) is warned


async def test_a_recovered_run_left_unfinished_by_its_dispatch_is_retried_then_dead(
    store: Any,
) -> None:
    """A dispatch that ends without finishing or handing back its run (it raised outside
    checkpointed_run, or its fail() could not reach the database) leaves the run owned by a
    live executor: nobody else may take it. The executor hands it back at its next sweep,
    counted as a failed attempt (no progress), so it is retried and, if it never makes
    progress, dead after max_attempts, instead of stranded until the executor stops."""
    first = await StoreCheckpointerFactory(store).begin(RunInfo("stuck"))
    await first.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
    attempts: list[int] = []

    async with Executor(store, name="x", **FAST) as ex:

        async def dispatch(cp: RunCheckpoint) -> None:
            attempts.append(cp.attempts)
            await ex.factory().begin(cp.run_info())
            raise RuntimeError("the host's own dispatch gave up")

        ex.recover(dispatch, max_attempts=2)

        async def dead() -> bool:
            row = await store.load("stuck")
            return row is not None and row.status == CheckpointStatus.DEAD

        await _eventually(dead, within=8)
    assert attempts == [1, 2], attempts
    row = await store.load("stuck")
    assert "RuntimeError: the host's own dispatch gave up" in (row.last_error or ""), row


async def test_a_begun_run_outlives_the_task_that_began_it(store: Any) -> None:
    """Runs begun through executor.factory are never handed back while the executor runs,
    even after the task that began them ended: a host may hand the writer to another task
    (begin in a request handler, run in the background). Only recovered runs, whose
    dispatch the executor awaits, are handed back when their dispatch ends unfinished."""
    async with Executor(store, name="x", **FAST) as ex:
        ex.recover(lambda cp: asyncio.sleep(0))

        async def begin() -> Any:
            cp = await ex.factory().begin(RunInfo("handed-on"))
            await cp.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
            return cp

        cp = await asyncio.create_task(begin())
        await asyncio.sleep(10 * FAST["sweep_interval"])  # several sweeps
        await cp.save(RunCheckpointState(messages=[{"m": 0}, {"m": 1}], iteration=2))
        row = await store.load("handed-on")
        assert row is not None and row.owner == ex.id and row.iteration == 2
        await cp.complete()
