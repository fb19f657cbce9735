"""Checkpointer semantics on the in-memory store: throttle, ordering, finalize, the factory.

Time is a ManualClock: nothing here sleeps to test timing. The same semantics on every backend
(memory, SQLite, PostgreSQL) are in ``tests/integration/test_checkpointer_stores.py``. A
``Recorder`` wraps the store to count, gate and fail writes; every test runs over the plain
save path and the append path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from executus_ckpt import (
    InMemoryCheckpointStore,
    NoopCheckpointer,
    RunInfo,
    StoreCheckpointerFactory,
    StoreUnavailableError,
    new_checkpointer,
)
from executus_ckpt.protocols import AppendingStore
from executus_ckpt.testing import ManualClock
from tests._support.helpers import META, drain, settle, state, stored_iteration
from tests._support.wrappers import WRITE_PATHS, Recorder
from tests._support.wrappers import write_path as use_write_path


@pytest.fixture(autouse=True, params=WRITE_PATHS)
def write_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run every test over a plain store and over an appending one."""
    with use_write_path(request.param) as path:
        yield path


def test_recorders_take_the_declared_path(write_path: str) -> None:
    rec = Recorder(InMemoryCheckpointStore())
    assert isinstance(rec, AppendingStore) is (write_path == "append")


# -- persistence and throttle -----------------------------------------------------------------


async def test_stored_state_never_more_than_throttle_behind() -> None:
    clock = ManualClock()
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=2, clock=clock)
    # A save every 0.5 s for 20 s: at every instant the store is within 2 s of the newest save.
    newest_at: dict[int, float] = {}
    for i in range(1, 41):
        await cp.save(state(i))
        newest_at[i] = clock()
        await clock.run_for(0.5)
        stored = await stored_iteration(store)
        assert stored is not None
        lag = clock() - newest_at[stored]
        assert lag <= 2.0 + 1e-9, f"stored iteration {stored} is {lag}s old"
    assert len(rec.saved) < 40 / 2 + 2, "throttle bounds the write rate"


async def test_failed_trailing_flush_is_logged_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=10, clock=clock)
    await cp.save(state(1))
    await cp.save(state(2))
    rec.fail_next = 1
    with caplog.at_level(logging.WARNING, logger="executus_ckpt.checkpointer"):
        await clock.run_for(10)
        await drain()
    assert await stored_iteration(store) == 1
    assert any("trailing flush" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    await clock.run_for(10)  # retried one window later
    await drain()
    assert await stored_iteration(store) == 2
    await cp.complete()


# -- ordering and concurrency -----------------------------------------------------------------


async def test_older_snapshot_never_overwrites_newer_when_writes_are_slow() -> None:
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    rec.gate = asyncio.Event()
    cp = new_checkpointer(rec, META, throttle=0)
    first = asyncio.ensure_future(cp.save(state(1)))
    await rec.entered.wait()
    later = [asyncio.ensure_future(cp.save(state(i))) for i in (2, 3, 4)]
    await settle()
    rec.gate.set()
    await asyncio.gather(first, *later)
    assert rec.saved == [1, 4]
    assert await stored_iteration(store) == 4


async def test_cancelled_save_still_finishes_its_write() -> None:
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    rec.gate = asyncio.Event()
    cp = new_checkpointer(rec, META, throttle=0)
    task = asyncio.ensure_future(cp.save(state(1)))
    await rec.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rec.gate.set()
    await cp.complete()  # waits for the in-flight write, then deletes
    assert rec.saved == [1]
    assert await store.load("run-1") is None


async def test_a_write_task_cancelled_before_it_starts_cancels_its_flush() -> None:
    """A flush waits on its write task's outcome: a write task cancelled before its first
    step (loop shutdown, a host cancelling every task) must not leave the flush waiting."""
    clock = ManualClock()
    cp = new_checkpointer(InMemoryCheckpointStore(), META, throttle=5, clock=clock)
    await cp.save(state(1))
    await cp.save(state(2))  # inside the window: pending
    assert cp.pending
    flushing = asyncio.ensure_future(cp.flush())
    await asyncio.sleep(0)  # the flush has created its write task, which has not run yet
    writes = [t for t in asyncio.all_tasks() if t.get_name().startswith("executus_ckpt.write")]
    assert len(writes) == 1
    writes[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(flushing, 2)
    await cp.aclose()


async def test_a_save_writes_in_its_callers_task() -> None:
    """The common path starts no task: the store is called from the saving task itself."""
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    seen: list[asyncio.Task[object] | None] = []
    inner_save = rec.save

    async def save(checkpoint: object) -> None:
        seen.append(asyncio.current_task())
        await inner_save(checkpoint)

    rec.save = save  # type: ignore[method-assign]
    if hasattr(rec, "append"):
        inner_append = rec.append

        async def append(checkpoint: object, **kw: object) -> None:
            seen.append(asyncio.current_task())
            await inner_append(checkpoint, **kw)

        rec.append = append  # type: ignore[method-assign]
    cp = new_checkpointer(rec, META, throttle=0)
    await cp.save(state(1))
    await cp.save(state(2))
    assert seen == [asyncio.current_task()] * 2
    assert await stored_iteration(store) == 2


async def test_a_save_cancelled_while_waiting_for_the_lock_is_still_written() -> None:
    """Cancelled behind another write, the save's state is still written (by a task the
    checkpointer owns), and complete() waits for it before deleting."""
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    rec.gate = asyncio.Event()
    cp = new_checkpointer(rec, META, throttle=0)
    first = asyncio.ensure_future(cp.save(state(1)))
    await rec.entered.wait()
    second = asyncio.ensure_future(cp.save(state(2)))
    await settle()
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    rec.gate.set()
    await first
    await drain()
    assert rec.saved == [1, 2]
    assert await stored_iteration(store) == 2
    await cp.complete()
    assert await store.load("run-1") is None


async def test_aclose_waits_for_a_save_writing_in_another_task() -> None:
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    rec.gate = asyncio.Event()
    cp = new_checkpointer(rec, META, throttle=0)
    saving = asyncio.ensure_future(cp.save(state(1)))
    await rec.entered.wait()
    closing = asyncio.ensure_future(cp.aclose())
    await settle()
    assert not closing.done()
    rec.gate.set()
    await asyncio.wait_for(closing, 2)
    assert saving.done() and rec.saved == [1]


# -- finalize ---------------------------------------------------------------------------------


async def test_complete_waits_for_in_flight_write() -> None:
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    rec.gate = asyncio.Event()
    cp = new_checkpointer(rec, META)
    saving = asyncio.ensure_future(cp.save(state(1)))
    await rec.entered.wait()
    completing = asyncio.ensure_future(cp.complete())
    await settle()
    assert not completing.done() and rec.deletes == 0
    rec.gate.set()
    await asyncio.gather(saving, completing)
    assert rec.saved == [1] and rec.deletes == 1
    assert await store.load("run-1") is None, "the in-flight write did not resurrect the run"


async def test_complete_failure_can_be_retried() -> None:
    store = InMemoryCheckpointStore()

    class FailingDelete(Recorder):
        failures = 1

        async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailableError("down", run_id=run_id)
            return await super().delete(run_id, epoch=epoch)

    rec = FailingDelete(store)
    cp = new_checkpointer(rec, META)
    await cp.save(state(1))
    with pytest.raises(StoreUnavailableError):
        await cp.complete()
    await cp.save(state(2))
    assert await stored_iteration(store) == 1, "no saves after complete was called"
    await cp.complete()
    assert await store.load("run-1") is None


# -- factory, take-over, fencing --------------------------------------------------------------


async def test_factory_without_store_is_noop() -> None:
    cp = await StoreCheckpointerFactory(None).begin(RunInfo("r"))
    assert isinstance(cp, NoopCheckpointer)
    await cp.save(state(1))
    await cp.flush()
    await cp.complete()
    await cp.fail(None)
    assert isinstance(new_checkpointer(None, META), NoopCheckpointer)
